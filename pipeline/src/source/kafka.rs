//! The consumer thread and its rebalance handling.
//!
//! Epochs: every rebalance and every fence failure bumps the epoch. A batch
//! carries the epoch it was built in; the committer drops stale ones, and the
//! consumer re-seeks to the stored offsets, so a batch is either committed
//! exactly once or re-read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::assign::{assign_all, reset_offset};
use super::fetch::{FetchQueue, Fetched, FORWARD_EVERY, MAX_BATCH};
use super::offsets::{LockGuard, OffsetStore, UnfinishedFiles};
use super::outage::Outage;
use super::SourceError;
use crate::batch::{Batch, BatchBuilder, PartitionRange};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;

/// Run `fut` to completion from a rebalance callback. It normally runs on
/// the consumer thread, but librdkafka also calls it while the consumer is
/// dropped (closing), which can happen on a runtime thread at shutdown; there
/// a plain `block_on` would panic, so leave the runtime context first.
pub(super) fn block_on<F: std::future::Future>(
    handle: &tokio::runtime::Handle,
    fut: F,
) -> F::Output {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(|| handle.block_on(fut))
    } else {
        handle.block_on(fut)
    }
}

/// State shared by the consumer thread, its rebalance callback and the committer.
#[derive(Debug, Default)]
pub struct ConsumerControl {
    pub epoch: AtomicU64,
    /// Batches handed to the committer / finished (committed or dropped) by it.
    pub sent: AtomicU64,
    pub done: AtomicU64,
    /// Set by the committer after a fence failure.
    pub reset_requested: AtomicBool,
    pub shutdown: AtomicBool,
    /// Set by the rebalance callback; the poll loop discards its open batch.
    rebalanced: AtomicBool,
    /// Assigned partitions -> next offset to accept (`None`: nothing stored).
    pub(super) partitions: Mutex<BTreeMap<i32, Option<i64>>>,
    /// Where each assigned partition's archive and serving store stood when
    /// it was assigned or re-seeked; the poll loop hands them to its builder.
    pub(super) positions: Mutex<BTreeMap<i32, crate::batch::Positions>>,
    /// Newly assigned partitions whose dead archive files (left by a crash or
    /// a fenced zombie) the committer sweeps after its first commit there,
    /// then periodically (`pipeline/sweeper.rs`, `OrphanSweeper`).
    pub cleanup_pending: Mutex<std::collections::BTreeSet<i32>>,
    /// An error found by the rebalance callback that must stop consumption
    /// (a stored offset beyond the end of the log); the poll loop returns it.
    pub(super) fatal: Mutex<Option<SourceError>>,
}

impl ConsumerControl {
    /// Wait until the committer has finished every batch sent so far.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.done.load(Ordering::Acquire) < self.sent.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Each assigned partition's archive and serving positions.
    pub(super) fn positions_now(&self) -> BTreeMap<i32, crate::batch::Positions> {
        self.positions.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The partitions this member owns now.
    pub fn owned_partitions(&self) -> std::collections::BTreeSet<i32> {
        self.partitions
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// librdkafka context: seeks assigned partitions to the serving store's offsets.
pub struct TallyContext {
    pub(super) topic: String,
    pub(super) control: Arc<ConsumerControl>,
    pub(super) store: Arc<dyn OffsetStore>,
    pub(super) archive: Arc<dyn UnfinishedFiles>,
    pub(super) handle: Handle,
    pub(super) metrics: Arc<Metrics>,
    /// Where a partition with no stored offset starts (`auto.offset.reset`),
    /// rather than at Kafka's group offset, which the store does not vouch for.
    pub(super) no_offset_start: Option<Offset>,
    pub(super) outage: Mutex<Outage>,
    pub(super) in_outage: AtomicBool,
}

impl ClientContext for TallyContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        super::librdkafka_log(level, fac, log_message);
    }

    /// librdkafka statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: Statistics) {
        if statistics
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0)
        {
            self.broker_ok();
        }
        let owned: Vec<i32> = match self.control.partitions.lock() {
            Ok(m) => m.keys().copied().collect(),
            Err(_) => return,
        };
        let lag: BTreeMap<i32, i64> = statistics
            .topics
            .get(&self.topic)
            .map(|t| {
                t.partitions
                    .iter()
                    .filter(|(p, _)| **p >= 0 && owned.contains(p))
                    .filter_map(|(p, part)| {
                        // The serving store holds the real position; Kafka's group
                        // commit is a hint that may fail or lag behind it.
                        let end = if part.ls_offset >= 0 {
                            part.ls_offset
                        } else {
                            part.hi_offset
                        };
                        let position = part
                            .committed_offset
                            .max(self.metrics.committed_offset(*p).unwrap_or(-1));
                        (end >= 0 && position >= 0).then(|| (*p, (end - position).max(0)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.metrics.set_consumer_lag(lag);
    }
}

impl ConsumerContext for TallyContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        self.control.bump_epoch();
        self.control.rebalanced.store(true, Ordering::Release);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                if self.control.shutdown.load(Ordering::Acquire) =>
            {
                // Closing (at shutdown): nothing will be consumed, so neither
                // wait for the committer nor read offsets; accept and move on.
                tracing::info!(
                    count = tpl.count(),
                    "partitions assigned while shutting down; not consuming them"
                );
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts: Vec<i32> = tpl
                    .elements()
                    .iter()
                    .filter(|e| e.topic() == self.topic)
                    .map(|e| e.partition())
                    .collect();
                let stored = self.stored_offsets(consumer, &parts);
                for (p, next) in &stored {
                    let start = match next {
                        Some(n) => Some(Offset::Offset(*n)),
                        None => self.no_offset_start,
                    };
                    if let Some(start) = start {
                        if let Err(e) = tpl.set_partition_offset(&self.topic, *p, start) {
                            tracing::error!(partition = p, error = %e, "cannot set start offset");
                        }
                    }
                }
                tracing::info!(partitions = ?stored, "partitions assigned; starting from stored offsets");
                for (p, next) in &stored {
                    if let Some(n) = next {
                        self.metrics.set_committed_offset(*p, *n);
                    }
                }
                if let Ok(mut map) = self.control.partitions.lock() {
                    if !cooperative {
                        map.clear();
                    }
                    map.extend(stored);
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(count = tpl.count(), "partitions revoked");
                if let Ok(mut map) = self.control.partitions.lock() {
                    for e in tpl.elements() {
                        map.remove(&e.partition());
                    }
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
                if let Ok(mut map) = self.control.partitions.lock() {
                    map.clear();
                }
            }
        }
    }
}

/// One fetched message of the topic, as the batch sees it.
struct Incoming<'a> {
    partition: i32,
    offset: i64,
    payload: Option<&'a [u8]>,
    /// Its Kafka timestamp (producer or broker clock), epoch ms.
    produced_ms: Option<i64>,
}

/// The consumer group member.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<TallyContext>>,
    control: Arc<ConsumerControl>,
    topic: String,
    poll_timeout: Duration,
    /// How often an idle consumer reports caught-up partitions.
    heartbeat: Duration,
    /// When an offset gap was last logged.
    gap_logged: std::cell::Cell<Option<Instant>>,
    /// `kafka.assignment = "manual"`: held while this process reads every partition.
    _manual_lock: Option<LockGuard>,
}

/// librdkafka properties `tally run` sets whatever the config says: the
/// key, the value and why.
const FORCED: &[(&str, &str, &str)] = &[
    ("enable.auto.commit", "false", "offsets are committed with the rollups, in the serving store"),
    ("enable.auto.offset.store", "false", "offsets are committed with the rollups, in the serving store"),
    // No end-of-partition events: `rd_kafka_consume_batch_queue` moves a
    // partition's application position past the end offset such an event
    // carries, and a fetcher that restarts from that position (after a
    // pause, as in every cooperative rebalance) skips the next message.
    // Caught-up partitions come from the cached high watermarks instead.
    (
        "enable.partition.eof",
        "false",
        "batched reads would skip a message after a pause at the end of a partition; caught-up partitions come from the high watermarks",
    ),
];

/// A warning for each configured property that [`FORCED`] overrides with
/// another value.
fn overridden<V: std::fmt::Display>(
    properties: &std::collections::BTreeMap<String, V>,
) -> Vec<String> {
    FORCED
        .iter()
        .filter_map(|(key, value, why)| {
            let v = properties.get(*key)?.to_string();
            (v != *value).then(|| {
                format!("kafka.properties.\"{key}\" = {v:?} is ignored: tally sets it to {value:?} ({why}); remove it from the config")
            })
        })
        .collect()
}

impl KafkaSource {
    pub fn new(
        cfg: &KafkaConfig,
        store: Arc<dyn OffsetStore>,
        archive: Arc<dyn UnfinishedFiles>,
        handle: Handle,
        metrics: Arc<Metrics>,
        heartbeat: Duration,
    ) -> Result<Self, SourceError> {
        let mut cc = super::client::config(&cfg.properties, super::client::Role::Consumer);
        // Consumer lag for /metrics, unless the operator chose an interval.
        if !cfg.properties.contains_key("statistics.interval.ms") {
            cc.set("statistics.interval.ms", "5000");
        }
        // librdkafka's warnings and errors reach tally's log (see `librdkafka_log`).
        cc.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for warning in overridden(&cfg.properties) {
            tracing::warn!("{warning}");
        }
        for (key, value, _) in FORCED {
            cc.set(*key, *value);
        }
        let control = Arc::new(ConsumerControl::default());
        let no_offset_start = reset_offset(
            cfg.properties
                .get("auto.offset.reset")
                .map(|v| v.to_string())
                .as_deref(),
        );
        let context = TallyContext {
            topic: cfg.topic.clone(),
            control: control.clone(),
            store,
            archive,
            handle,
            metrics,
            no_offset_start,
            outage: Mutex::new(Outage::default()),
            in_outage: AtomicBool::new(false),
        };
        let consumer: BaseConsumer<TallyContext> = cc
            .create_with_context(context)
            .map_err(|e| SourceError::Create(e.to_string()))?;
        let manual_lock = match cfg.assignment {
            crate::config::Assignment::Group => {
                consumer
                    .subscribe(&[&cfg.topic])
                    .map_err(|e| SourceError::Subscribe {
                        topic: cfg.topic.clone(),
                        message: e.to_string(),
                    })?;
                None
            }
            crate::config::Assignment::Manual => Some(assign_all(&consumer, &cfg.topic)?),
        };
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            control,
            topic: cfg.topic.clone(),
            poll_timeout: cfg.poll_timeout,
            heartbeat,
            gap_logged: std::cell::Cell::new(None),
            _manual_lock: manual_lock,
        })
    }

    pub fn control(&self) -> Arc<ConsumerControl> {
        self.control.clone()
    }

    /// Handle used by the committer for Kafka's (monitoring-only) group commit.
    pub fn committer(&self) -> GroupCommitter {
        GroupCommitter {
            consumer: self.consumer.clone(),
            topic: self.topic.clone(),
        }
    }

    /// Run the poll loop on the current (dedicated) thread until shutdown.
    ///
    /// Each round serves the consumer queue first (rebalances, statistics,
    /// errors, and messages of partitions not yet forwarded), one event at a
    /// time until it is empty, then reads up to [`MAX_BATCH`] messages from
    /// the fetch queue (see `fetch.rs` for why this keeps each partition in
    /// order).
    pub fn run(
        self,
        mut builder: BatchBuilder,
        tx: mpsc::Sender<Batch>,
    ) -> Result<(), SourceError> {
        let control = self.control.clone();
        let fetch = FetchQueue::new(&self.consumer, &self.topic)
            .ok_or_else(|| SourceError::Create("librdkafka returned no fetch queue".into()))?;
        let mut fetched: Vec<Fetched> = Vec::with_capacity(MAX_BATCH);
        let mut epoch = control.epoch.load(Ordering::Acquire);
        // Partitions read to their end (cleared by the next message or a re-seek).
        let mut at_end: BTreeMap<i32, ()> = BTreeMap::new();
        let mut last_sent = Instant::now();
        let mut clock = crate::batch::WallClock::default();
        // When the last poll returned: the arrival time of its messages and
        // the time the flush checks use (one clock read per poll).
        let mut now = Instant::now();
        // When the owned partitions were last forwarded into `fetch`.
        let mut forwarded: Option<Instant> = None;
        builder.set_positions(control.positions_now());
        loop {
            if control.shutdown.load(Ordering::Acquire) {
                break;
            }
            if let Some(e) = control.fatal.lock().ok().and_then(|mut f| f.take()) {
                builder.discard();
                drop(tx);
                self.consumer.unsubscribe();
                return Err(e);
            }
            if control.reset_requested.swap(false, Ordering::AcqRel) {
                builder.discard();
                at_end.clear();
                self.reseek();
                builder.set_positions(control.positions_now());
                epoch = control.epoch.load(Ordering::Acquire);
                forwarded = None;
            }
            if builder.should_flush(now)
                || (builder.is_empty()
                    && !at_end.is_empty()
                    && now.duration_since(last_sent) >= self.heartbeat)
            {
                self.send(&mut builder, epoch, &at_end, &tx)?;
                last_sent = now;
            }
            // 1. The consumer queue, until it is empty.
            let polled = self.consumer.poll(Duration::ZERO);
            now = Instant::now();
            if control.rebalanced.swap(false, Ordering::AcqRel) {
                let had_rows = !builder.is_empty();
                builder.discard();
                at_end.clear();
                // Eager rebalances re-seek every partition on assignment; with the
                // cooperative protocol, kept partitions must be moved back explicitly.
                if had_rows
                    && matches!(
                        self.consumer.rebalance_protocol(),
                        RebalanceProtocol::Cooperative
                    )
                {
                    self.reseek();
                }
                builder.set_positions(control.positions_now());
                epoch = control.epoch.load(Ordering::Acquire);
                forwarded = None;
            }
            if let Some(result) = polled {
                match result {
                    Ok(msg) if msg.topic() == self.topic => {
                        let (p, offset) = (msg.partition(), msg.offset());
                        let Ok(mut map) = control.partitions.lock() else {
                            continue;
                        };
                        let produced = msg.timestamp().to_millis();
                        self.accept(
                            &mut map,
                            &mut builder,
                            &mut clock,
                            &mut at_end,
                            Incoming {
                                partition: p,
                                offset,
                                payload: msg.payload(),
                                produced_ms: produced,
                            },
                            now,
                        );
                    }
                    Ok(_) => {}
                    Err(KafkaError::PartitionEOF(p)) => {
                        at_end.insert(p, ());
                    }
                    Err(e) => self.consumer.context().broker_error(&e.to_string()),
                }
                continue;
            }
            if fetch.consumer_queue_len() > 0 {
                continue;
            }
            // 2. (Re-)forward the owned partitions after an assignment and every
            // FORWARD_EVERY, then empty the consumer queue again before reading.
            if forwarded.is_none_or(|t| now.duration_since(t) >= FORWARD_EVERY) {
                fetch.forward(control.owned_partitions());
                forwarded = Some(now);
                continue;
            }
            // 3. A batch of fetched messages.
            let timeout = builder
                .time_to_linger(now)
                .unwrap_or(self.poll_timeout)
                .min(self.poll_timeout);
            let wait = timeout
                .min(FORWARD_EVERY.saturating_sub(now.duration_since(forwarded.unwrap_or(now))));
            if fetch.consume(wait, &mut fetched, MAX_BATCH) == 0 {
                now = Instant::now();
                self.note_caught_up(&fetch, &mut at_end);
                continue;
            }
            now = Instant::now();
            self.consumer.context().broker_ok();
            let mut entries = fetched.drain(..);
            'batch: loop {
                {
                    let Ok(mut map) = control.partitions.lock() else {
                        break 'batch;
                    };
                    loop {
                        let Some(m) = entries.next() else {
                            break 'batch;
                        };
                        if let Some(err) = m.error() {
                            if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF {
                                at_end.insert(m.partition(), ());
                            } else {
                                self.consumer.context().broker_error(&format!(
                                    "fetch error on partition {}: {err:?}",
                                    m.partition()
                                ));
                            }
                            continue;
                        }
                        let (p, offset) = (m.partition(), m.offset());
                        if self.accept(
                            &mut map,
                            &mut builder,
                            &mut clock,
                            &mut at_end,
                            Incoming {
                                partition: p,
                                offset,
                                payload: m.payload(),
                                produced_ms: m.timestamp_ms(),
                            },
                            now,
                        ) && builder.should_flush(now)
                        {
                            break;
                        }
                    }
                }
                // The batch is full: seal it (outside the partition lock) and go on.
                self.send(&mut builder, epoch, &at_end, &tx)?;
                last_sent = now;
            }
        }
        // Graceful shutdown: hand over what is buffered.
        if !builder.is_empty() && epoch == control.epoch.load(Ordering::Acquire) {
            self.send(&mut builder, epoch, &at_end, &tx)?;
        }
        drop(tx);
        fetched.clear();
        drop(fetch);
        control.wait_idle(Duration::from_secs(30));
        self.consumer.unsubscribe();
        Ok(())
    }

    /// With nothing fetched: mark the owned partitions whose next offset has
    /// reached the end librdkafka last saw (its cached high watermark). This
    /// replaces end-of-partition events, which the batched read cannot take
    /// (see `KafkaSource::new`).
    fn note_caught_up(&self, fetch: &FetchQueue, at_end: &mut BTreeMap<i32, ()>) {
        let Ok(map) = self.control.partitions.lock() else {
            return;
        };
        for (p, next) in map.iter() {
            let Some(next) = next else { continue };
            if fetch
                .cached_high_watermark(*p)
                .is_some_and(|high| *next >= high)
            {
                at_end.insert(*p, ());
            }
        }
    }

    /// Add one message of the topic to the batch unless its partition is not
    /// (or no longer) ours or its offset is already committed. Returns
    /// whether it was added.
    fn accept(
        &self,
        map: &mut BTreeMap<i32, Option<i64>>,
        builder: &mut BatchBuilder,
        clock: &mut crate::batch::WallClock,
        at_end: &mut BTreeMap<i32, ()>,
        msg: Incoming<'_>,
        now: Instant,
    ) -> bool {
        let Incoming {
            partition: p,
            offset,
            payload,
            produced_ms,
        } = msg;
        at_end.remove(&p);
        let Some(next) = map.get_mut(&p) else {
            return false;
        }; // not (or no longer) ours
        if let Some(n) = *next {
            if offset < n {
                // Already committed (read again after a seek).
                self.metrics()
                    .messages_skipped
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if offset > n {
                self.note_gap(p, n, offset);
            }
        }
        let expected = *next;
        *next = Some(offset + 1);
        let now_ms = clock.now_ms(now);
        builder.push(p, offset, expected, payload, now_ms, now);
        if let Some(produced) = produced_ms {
            builder.note_produced(produced);
        }
        true
    }

    fn metrics(&self) -> &Metrics {
        &self.consumer.context().metrics
    }

    /// The first message after `expected` is at `got`: offsets in between
    /// are gone (retention, compaction, transaction markers, a reset).
    /// Counted always; logged at most every 10 s, with the gaps since.
    fn note_gap(&self, p: i32, expected: i64, got: i64) {
        let m = self.metrics();
        let gaps = m.offset_gaps.fetch_add(1, Ordering::Relaxed) + 1;
        m.messages_skipped
            .fetch_add((got - expected) as u64, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .gap_logged
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.gap_logged.set(Some(now));
            tracing::warn!(
                partition = p,
                expected,
                got,
                gaps_total = gaps,
                "offset gap: the partition's next message is not the expected offset (retention, compaction, transaction markers or a reset); the missing offsets are skipped"
            );
        }
    }

    fn send(
        &self,
        builder: &mut BatchBuilder,
        epoch: u64,
        at_end: &BTreeMap<i32, ()>,
        tx: &mpsc::Sender<Batch>,
    ) -> Result<(), SourceError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let caught_up: BTreeMap<i32, i64> = match self.control.partitions.lock() {
            Ok(m) => at_end
                .keys()
                .filter_map(|p| m.get(p).copied().flatten().map(|n| (*p, n)))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        let batch = builder
            .seal(epoch, &self.topic, now_ms, caught_up)
            .map_err(|e| SourceError::Thread(e.to_string()))?;
        self.control.sent.fetch_add(1, Ordering::AcqRel);
        // Blocks while the committer is busy: consumption pauses, memory stays bounded.
        tx.blocking_send(batch)
            .map_err(|_| SourceError::Thread("committer stopped".into()))
    }

    /// After a fence failure: re-read stored offsets and seek every assigned partition.
    fn reseek(&self) {
        let parts: Vec<i32> = match self.control.partitions.lock() {
            Ok(m) => m.keys().copied().collect(),
            Err(_) => return,
        };
        let stored = self
            .consumer
            .context()
            .stored_offsets(&self.consumer, &parts);
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &stored {
            let off = next.map_or(Offset::Beginning, Offset::Offset);
            let _ = tpl.add_partition_offset(&self.topic, *p, off);
        }
        if tpl.count() > 0 {
            // Re-assigning with explicit offsets is the reliable way to move a
            // partition's fetch position (seek fails while a fetch is starting).
            let r = if matches!(
                self.consumer.rebalance_protocol(),
                RebalanceProtocol::Cooperative
            ) {
                self.consumer.seek_partitions(tpl, Duration::from_secs(10)).map(|done| {
                    // The call succeeds as a whole while single partitions fail.
                    let failed: Vec<(i32, String)> = done
                        .elements()
                        .iter()
                        .filter_map(|e| e.error().err().map(|err| (e.partition(), err.to_string())))
                        .collect();
                    if !failed.is_empty() {
                        // The fetch position of these partitions did not move:
                        // their next message would not be the stored offset.
                        // Seek again shortly rather than read past it.
                        tracing::error!(?failed, "seek to the stored offsets failed for some partitions; seeking again");
                        std::thread::sleep(Duration::from_millis(200));
                        self.control.reset_requested.store(true, Ordering::Release);
                    }
                })
            } else {
                self.consumer.assign(&tpl)
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "seek after fence failure failed");
            }
        }
        if let Ok(mut map) = self.control.partitions.lock() {
            for (p, next) in stored {
                if let Some(slot) = map.get_mut(&p) {
                    *slot = next;
                }
            }
        }
        tracing::warn!("re-seeked to stored offsets after a fenced batch");
    }
}

/// Kafka's group commit, after the serving commit (monitoring only).
#[derive(Clone)]
pub struct GroupCommitter {
    consumer: Arc<BaseConsumer<TallyContext>>,
    topic: String,
}

impl GroupCommitter {
    pub fn commit(&self, partitions: &BTreeMap<i32, PartitionRange>) {
        let mut tpl = TopicPartitionList::new();
        for (p, r) in partitions {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(r.next_offset()));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "kafka group commit failed (monitoring only)");
        }
    }
}

#[cfg(test)]
mod tests;
