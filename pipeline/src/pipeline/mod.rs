//! `tally run`: wires source -> decode/batch (consumer thread) -> aggregate +
//! archive -> serving commit (committer task).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::aggregate::{RollupAggregator, SqlCatalog};
use crate::batch::{Batch, BatchBuilder};
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder, RejectReason};
use crate::error::{Error, RetryHint};
use crate::failpoint::failpoint;
use crate::metrics::Metrics;
use crate::sink::{
    ArchiveLocation, CommitOutcome, CommitRequest, ParquetArchiveSink, ServingStore,
};
use crate::source::kafka::GroupCommitter;

mod sweeper;
use crate::source::{ConsumerControl, KafkaSource};
use sweeper::OrphanSweeper;

/// Everything built from settings before consuming: fails fast on bad SQL,
/// bad schema or an unreachable serving store.
pub struct Stages {
    pub settings: Settings,
    pub schema: EventSchema,
    pub catalog: SqlCatalog,
    pub store: ServingStore,
    pub archive: ParquetArchiveSink,
}

impl Stages {
    pub async fn build(settings: Settings) -> Result<Stages, Error> {
        let schema = EventSchema::from_config(&settings.schema)?;
        let catalog = SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await?;
        let store = ServingStore::open_with(
            &settings.serving_url(),
            &catalog.rollups,
            settings.serving.window_index,
        )
        .await?
        .with_fold_rows(settings.serving.sqlite_fold_rows)
        .with_direct_rows(settings.serving.sqlite_direct_rows);
        let location = ArchiveLocation::open(&settings.storage)?;
        let archive = ParquetArchiveSink::open(
            &location,
            schema.time_index,
            settings.storage.zstd_level,
            settings.storage.multipart_threshold.0,
        )?;
        Ok(Stages {
            settings,
            schema,
            catalog,
            store,
            archive,
        })
    }
}

/// Totals for a run (logged at exit).
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub batches: u64,
    pub messages: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub fenced: u64,
    pub dropped_stale: u64,
}

/// Run the pipeline until `shutdown` resolves.
pub async fn run(
    stages: Stages,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunStats, Error> {
    let Stages {
        settings,
        schema,
        catalog,
        store,
        archive,
    } = stages;
    let mut aggregator = RollupAggregator::new(&catalog, schema.arrow.clone()).await?;
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let builder = BatchBuilder::new(
        decoder,
        &settings.batch,
        settings.decode.dlq_payload_bytes.as_usize(),
    );
    let heartbeat = settings.batch.linger.max(Duration::from_secs(1));
    refuse_lost_store(&settings.kafka.topic, &store, &archive).await?;
    let source = KafkaSource::new(
        &settings.kafka,
        store.clone(),
        archive.clone(),
        tokio::runtime::Handle::current(),
        metrics.clone(),
        heartbeat,
    )?;
    let control = source.control();
    let group = source.committer();
    let (tx, mut rx) = mpsc::channel::<Batch>(1);
    let consumer_thread = std::thread::Builder::new()
        .name("tally-consumer".into())
        .spawn(move || source.run(builder, tx))
        .map_err(|e| Error::Internal(format!("cannot start the consumer thread: {e}")))?;
    tracing::info!(topic = %settings.kafka.topic, serving = %crate::sink::serving::redact(store.url()), data_dir = %settings.storage.data_dir.display(), archive = %archive.describe(), "tally running");

    let mut sweeper = OrphanSweeper::new(
        &settings.kafka.topic,
        settings.storage.orphan_sweep_interval,
        settings.decode.max_event_age,
    );
    let committer = async {
        let mut stats = RunStats::default();
        let mut last_log = Instant::now();
        let mut window = RunStats::default();
        while let Some(batch) = rx.recv().await {
            let result = commit_batch(
                &batch,
                &control,
                &mut aggregator,
                &archive,
                &store,
                &group,
                &mut sweeper,
                &metrics,
                &mut stats,
            )
            .await;
            control.done.fetch_add(1, Ordering::AcqRel);
            result?;
            if last_log.elapsed() >= Duration::from_secs(10) {
                let secs = last_log.elapsed().as_secs_f64();
                tracing::info!(
                    batches = stats.batches - window.batches,
                    events_per_sec = ((stats.messages - window.messages) as f64 / secs).round(),
                    accepted_total = stats.accepted,
                    rejected_total = stats.rejected,
                    "progress"
                );
                window = stats.clone();
                last_log = Instant::now();
            }
        }
        sweeper.finish().await;
        Ok::<RunStats, Error>(stats)
    };
    let control_for_shutdown = control.clone();
    tokio::pin!(committer);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut committer => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: flushing the open batch");
            control_for_shutdown.shutdown.store(true, Ordering::Release);
            committer.await
        }
    };
    control.shutdown.store(true, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || consumer_thread.join())
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let stats = result?;
    match joined {
        Ok(r) => r?,
        Err(_) => return Err(Error::Internal("consumer thread panicked".into())),
    }
    store.close().await;
    tracing::info!(?stats, "stopped");
    Ok(stats)
}

/// A store without offsets for the topic beside an archive that holds its
/// files means the store was lost or swapped: consuming would re-read (or
/// skip) the history, and the orphan sweep would then delete every archive
/// file the new store does not list. Refuse to start instead.
async fn refuse_lost_store(
    topic: &str,
    store: &ServingStore,
    archive: &ParquetArchiveSink,
) -> Result<(), Error> {
    if !store.load_offsets(topic).await?.is_empty() {
        return Ok(());
    }
    match archive.any_file_of(topic).await? {
        None => Ok(()),
        Some(example) => Err(crate::source::SourceError::StoreLost {
            topic: topic.to_string(),
            store: crate::sink::serving::redact(store.url()),
            archive: archive.describe(),
            example,
        }
        .into()),
    }
}

fn counters(batch: &Batch) -> Vec<(String, i64)> {
    let mut c = vec![
        ("messages_total".to_string(), batch.stats.messages as i64),
        ("accepted_total".to_string(), batch.stats.accepted as i64),
        ("late_total".to_string(), batch.stats.late as i64),
    ];
    for r in RejectReason::ALL {
        if let Some(n) = batch.stats.rejected.get(&r) {
            c.push((format!("rejected_total.{}", r.code()), *n as i64));
        }
    }
    c
}

#[allow(clippy::too_many_arguments)]
async fn commit_batch(
    original: &Batch,
    control: &Arc<ConsumerControl>,
    aggregator: &mut RollupAggregator,
    archive: &ParquetArchiveSink,
    store: &ServingStore,
    group: &GroupCommitter,
    sweeper: &mut OrphanSweeper,
    metrics: &Arc<Metrics>,
    stats: &mut RunStats,
) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(100);
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    // Set after a failed attempt: its COMMIT may have been applied even
    // though the reply was lost (a dropped connection), so a later fence
    // failure may be this very batch.
    let mut ambiguous = false;
    // The batch without its poison rows, once they were found.
    let mut isolated: Option<Batch> = None;
    loop {
        let batch = isolated.as_ref().unwrap_or(original);
        if batch.epoch != control.epoch.load(Ordering::Acquire) {
            stats.dropped_stale += 1;
            tracing::debug!(
                epoch = batch.epoch,
                "dropping a batch from before a rebalance"
            );
            // Its messages must be read again: with the cooperative protocol a
            // kept partition is not re-seeked by the assignment itself.
            control.reset_requested.store(true, Ordering::Release);
            return Ok(());
        }
        let attempt = match try_commit(batch, aggregator, archive, store).await {
            Ok((CommitOutcome::Fenced { .. }, files, rows))
                if ambiguous && committed_earlier(batch, &files, store).await =>
            {
                metrics.commits_resolved.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partitions = ?batch.partitions, "an earlier attempt whose reply was lost had committed this batch; counting it once");
                Ok((CommitOutcome::Committed, files, rows))
            }
            other => other,
        };
        match attempt {
            Ok((CommitOutcome::Committed, _, _)) if batch.is_heartbeat() => {
                sweeper
                    .after_commit(batch, control, archive, store, metrics)
                    .await;
                return Ok(());
            }
            Ok((CommitOutcome::Committed, files, rows_merged)) => {
                group.commit(&batch.partitions);
                sweeper
                    .after_commit(batch, control, archive, store, metrics)
                    .await;
                record_commit(metrics, batch, &files, rows_merged, started.elapsed());
                let folds = store.fold_stats();
                metrics.sqlite_folds.store(folds.folds, Ordering::Relaxed);
                metrics
                    .sqlite_fold_micros
                    .store((folds.seconds * 1e6) as u64, Ordering::Relaxed);
                metrics
                    .sqlite_fold_rows
                    .store(folds.rows, Ordering::Relaxed);
                metrics.observe_batch_latency(
                    batch.oldest_produced_ms,
                    batch.opened_at_ms,
                    batch.sealed_at_ms,
                    started_ms,
                    chrono::Utc::now().timestamp_millis(),
                );
                stats.batches += 1;
                stats.messages += batch.stats.messages;
                stats.accepted += batch.stats.accepted;
                stats.rejected += batch.stats.rejected.values().sum::<u64>();
                tracing::debug!(rows = batch.events.num_rows(), partitions = ?batch.partitions, "batch committed");
                return Ok(());
            }
            Ok((
                CommitOutcome::Fenced {
                    partition,
                    expected,
                    stored,
                },
                files,
                _,
            )) => {
                stats.fenced += 1;
                metrics.batches_fenced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    partition,
                    ?expected,
                    ?stored,
                    "batch fenced: another writer advanced the partition; re-reading"
                );
                discard_uncommitted(archive, store, files).await;
                control.bump_epoch();
                control.reset_requested.store(true, Ordering::Release);
                return Ok(());
            }
            Err(e) if crate::quarantine::is_data_error(&e) && isolated.is_none() => {
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, rows = batch.events.num_rows(), "a batch fails on its data; bisecting it to find the events that fail");
                match crate::quarantine::isolate(batch, &e, aggregator, store).await? {
                    Some(without) => isolated = Some(without),
                    None if e.retry() == RetryHint::WithBackoff => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    None => return Err(e),
                }
            }
            Err(e) if e.retry() == RetryHint::WithBackoff => {
                ambiguous = true;
                metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retry_in = ?backoff, "batch commit failed; retrying (offsets do not advance)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a batch that the fence refused was in fact committed by an
/// earlier attempt of its own whose reply was lost: every partition's stored
/// offset is the batch's end and every file it wrote (the same names on
/// every attempt) is recorded. A lookup that fails answers no; the fence
/// path then keeps the files (see [`discard_uncommitted`]).
async fn committed_earlier(
    batch: &Batch,
    files: &[crate::sink::WrittenFile],
    store: &ServingStore,
) -> bool {
    if files.is_empty() {
        return false;
    }
    let Ok(stored) = store.load_offsets(&batch.topic).await else {
        return false;
    };
    if !batch
        .partitions
        .iter()
        .all(|(p, r)| stored.get(p) == Some(&r.next_offset()))
    {
        return false;
    }
    let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    store
        .committed_among(&paths)
        .await
        .is_ok_and(|found| found.len() == paths.len())
}

/// Delete the files of a batch that did not commit, except those a committed
/// record names: a retry rewrites the same names as an earlier attempt, and
/// that attempt (or an earlier read of the same range by this process) may
/// have committed them. When the store cannot be asked, nothing is deleted;
/// the orphan sweep removes what is truly dead later.
pub(crate) async fn discard_uncommitted(
    archive: &ParquetArchiveSink,
    store: &ServingStore,
    files: Vec<crate::sink::WrittenFile>,
) {
    if files.is_empty() {
        return;
    }
    let paths: Vec<String> = files.into_iter().map(|f| f.path).collect();
    let recorded = match store.committed_among(&paths).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot tell which of a fenced batch's files are committed; keeping them for the orphan sweep");
            return;
        }
    };
    let doomed: Vec<String> = paths
        .into_iter()
        .filter(|p| !recorded.contains(p))
        .collect();
    if !recorded.is_empty() {
        tracing::warn!(
            kept = recorded.len(),
            "a fenced batch rewrote files that are already committed; keeping them"
        );
    }
    if let Err(e) = archive.delete(&doomed).await {
        tracing::error!(error = %e, "cannot delete a fenced batch's files; the orphan sweep removes them");
    }
}

fn record_commit(
    metrics: &Metrics,
    batch: &Batch,
    files: &[crate::sink::WrittenFile],
    rows_merged: u64,
    took: Duration,
) {
    let add = |c: &std::sync::atomic::AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
    add(&metrics.batches_committed, 1);
    add(&metrics.messages_consumed, batch.stats.messages);
    add(&metrics.events_accepted, batch.stats.accepted);
    add(&metrics.events_late, batch.stats.late);
    for (reason, n) in &batch.stats.rejected {
        metrics.add_rejected(*reason, *n);
    }
    add(
        &metrics.raw_bytes_written,
        files.iter().map(|f| f.bytes).sum(),
    );
    add(&metrics.archive_files_written, files.len() as u64);
    add(&metrics.rollup_rows_merged, rows_merged);
    for (partition, range) in &batch.partitions {
        metrics.set_committed_offset(*partition, range.next_offset());
    }
    if let Some(newest) = batch.max_event_ms.values().max() {
        metrics
            .newest_committed_event_ms
            .fetch_max(*newest, Ordering::Relaxed);
    }
    metrics.commit_duration.observe(took.as_secs_f64());
}

pub(crate) type Attempt = (CommitOutcome, Vec<crate::sink::WrittenFile>, u64);

pub(crate) async fn try_commit(
    batch: &Batch,
    aggregator: &mut RollupAggregator,
    archive: &ParquetArchiveSink,
    store: &ServingStore,
) -> Result<Attempt, Error> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    if batch.is_heartbeat() {
        let req = CommitRequest {
            topic: &batch.topic,
            partitions: &batch.partitions,
            outputs: &[],
            files: &[],
            counters: &[],
            max_event_ms: &batch.max_event_ms,
            caught_up: &batch.caught_up,
            sealed_at_ms: batch.sealed_at_ms,
            now_ms,
        };
        return Ok((store.commit(&req).await?, Vec::new(), 0));
    }
    let write = archive.write_batch(batch);
    let events = [batch.events.clone()];
    let agg = aggregator.aggregate(&events);
    let (files, outputs) = tokio::join!(write, agg);
    let files = files?;
    failpoint("after_archive_write");
    let outputs = outputs?;
    failpoint("after_aggregate");
    if let Some(pause) = crate::failpoint::pause("after_aggregate") {
        tokio::time::sleep(pause).await;
    }
    let counters = counters(batch);
    let req = CommitRequest {
        topic: &batch.topic,
        partitions: &batch.partitions,
        outputs: &outputs,
        files: &files,
        counters: &counters,
        max_event_ms: &batch.max_event_ms,
        caught_up: &batch.caught_up,
        sealed_at_ms: batch.sealed_at_ms,
        now_ms,
    };
    let outcome = store.commit(&req).await?;
    failpoint("after_serving_commit");
    let rows_merged = outputs
        .iter()
        .flat_map(|o| o.batches.iter())
        .map(|b| b.num_rows() as u64)
        .sum();
    Ok((outcome, files, rows_merged))
}
