//! Stage 3: messages -> one micro-batch. Rows are decoded straight into Arrow
//! builders; a batch is sealed when `max_rows`, `max_bytes` or `linger` is hit.

pub(crate) mod rejects;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;

use crate::config::BatchConfig;
use crate::decode::{EventColumns, RecordDecoder, RejectReason};

/// A rejected message on its way to the dead-letter dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: RejectReason,
    pub detail: String,
    pub partition: i32,
    pub offset: i64,
    pub rejected_at_ms: i64,
    /// Lossy UTF-8, truncated to `decode.dlq_payload_bytes` (by default
    /// `decode.max_event_bytes`: whole, so `tally dlq replay` can resend it).
    pub payload: String,
    pub payload_bytes: usize,
}

/// The offsets one batch covers in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    /// The partition's stored next offset this batch builds on (`None`: no
    /// offset stored yet). The serving commit fences on it.
    pub expected_start: Option<i64>,
    pub first: i64,
    pub last: i64,
}

impl PartitionRange {
    pub fn next_offset(&self) -> i64 {
        self.last + 1
    }
}

/// Where a partition's archive and serving store stand, read when it was
/// assigned (or re-read after a fence): the consumer starts at the lower of
/// the two; messages below `serve_from` are re-read for the archive only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    /// The archive's committed position (`None`: nothing stored).
    pub archive: Option<i64>,
    /// The serving store's next offset, when above the archive's.
    pub serve_from: Option<i64>,
}

/// The messages one batch covers in one partition, for the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveRange {
    /// The archive position read at assignment.
    pub from: Option<i64>,
    /// The offset the consumer expected before this batch's first message
    /// of the partition: the archive writer checks it continues its files.
    pub expected: Option<i64>,
    pub first: i64,
    pub last: i64,
}

/// Counters for one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub messages: u64,
    pub accepted: u64,
    pub late: u64,
    pub rejected: BTreeMap<RejectReason, u64>,
    pub bytes: u64,
    /// Messages below the serving offset, read again for the archive only
    /// (not in the other counters).
    pub archive_only: u64,
}

/// A sealed micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Consumer epoch; batches from before a rebalance or fence reset are dropped.
    pub epoch: u64,
    pub topic: String,
    /// Accepted events, in the configured event schema.
    pub events: RecordBatch,
    /// The Kafka partition and offset of each row of `events`.
    pub row_partitions: Vec<i32>,
    pub row_offsets: Vec<i64>,
    pub dead_letters: Vec<DeadLetter>,
    pub partitions: BTreeMap<i32, PartitionRange>,
    /// Newest accepted event time per partition (epoch ms), for `as_of`.
    pub max_event_ms: BTreeMap<i32, i64>,
    /// Partitions the consumer had read to the end when the batch was sealed,
    /// with their next offset: everything appended before `sealed_at_ms` is in.
    pub caught_up: BTreeMap<i32, i64>,
    pub stats: BatchStats,
    /// Wall-clock time the batch was sealed (epoch ms); names DLQ partitions.
    pub sealed_at_ms: i64,
    /// Wall-clock time its first message arrived (epoch ms; `sealed_at_ms`
    /// for a heartbeat).
    pub opened_at_ms: i64,
    /// Oldest Kafka message timestamp in the batch (epoch ms), when the
    /// messages carry one: the start of produce -> visible.
    pub oldest_produced_ms: Option<i64>,
    /// `tally dlq replay`: where each accepted row came from.
    pub origins: Option<Origins>,
    /// Every message's partition range, for the archive (served or not).
    pub archive: BTreeMap<i32, ArchiveRange>,
    /// Partitions with rows below this offset: archive only, not counted.
    pub serve_from: BTreeMap<i32, i64>,
}

impl Batch {
    /// `partition:first-last` of each partition, for log lines
    /// (`offsets = "0:100-199 1:40-80"`).
    pub fn offsets_field(&self) -> String {
        self.partitions
            .iter()
            .map(|(p, r)| format!("{p}:{}-{}", r.first, r.last))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The dead letters a `tally dlq replay` batch counts: their original topic
/// and, per row of `events`, the (partition, offset) they had there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    pub topic: String,
    pub rows: Vec<(i32, i64)>,
}

impl Batch {
    /// A batch without messages that only reports caught-up partitions
    /// (keeps `as_of` moving while the topic is idle).
    pub fn is_heartbeat(&self) -> bool {
        self.stats.messages == 0 && self.stats.archive_only == 0
    }

    /// The part the serving store counts: without rows re-read for the
    /// archive only (below their partition's serving offset).
    pub fn served(
        &self,
    ) -> Result<std::borrow::Cow<'_, Batch>, datafusion::arrow::error::ArrowError> {
        if self.stats.archive_only == 0 {
            return Ok(std::borrow::Cow::Borrowed(self));
        }
        let keep: Vec<bool> = self
            .row_partitions
            .iter()
            .zip(&self.row_offsets)
            .map(|(p, o)| self.serve_from.get(p).is_none_or(|s| o >= s))
            .collect();
        let mask = datafusion::arrow::array::BooleanArray::from(keep.clone());
        let events = datafusion::arrow::compute::filter_record_batch(&self.events, &mask)?;
        let pick = |v: &[i64]| -> Vec<i64> {
            v.iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(x, _)| *x)
                .collect()
        };
        let mut out = self.clone();
        out.events = events;
        out.row_partitions = self
            .row_partitions
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| *p)
            .collect();
        out.row_offsets = pick(&self.row_offsets);
        out.stats.archive_only = 0;
        out.serve_from.clear();
        Ok(std::borrow::Cow::Owned(out))
    }
}

/// Wall-clock milliseconds derived from a monotonic [`Instant`] the caller
/// already has, re-read from the system clock once a second: one clock read
/// per message instead of two (the clock was 3% of replay CPU).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallClock {
    base: Instant,
    base_ms: i64,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock {
            base: Instant::now(),
            base_ms: chrono::Utc::now().timestamp_millis(),
        }
    }
}

impl WallClock {
    pub(crate) fn now_ms(&mut self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.base);
        if since >= Duration::from_secs(1) {
            *self = WallClock::default();
            return self.base_ms;
        }
        self.base_ms + since.as_millis() as i64
    }
}

#[derive(Debug)]
pub struct BatchBuilder {
    decoder: RecordDecoder,
    columns: EventColumns,
    row_partitions: Vec<i32>,
    row_offsets: Vec<i64>,
    dead_letters: Vec<DeadLetter>,
    partitions: BTreeMap<i32, PartitionRange>,
    max_event_ms: BTreeMap<i32, i64>,
    stats: BatchStats,
    started: Option<Instant>,
    opened_at_ms: Option<i64>,
    oldest_produced_ms: Option<i64>,
    archive: BTreeMap<i32, ArchiveRange>,
    serve_from: BTreeMap<i32, i64>,
    /// Per partition, set at assignment (see [`Positions`]).
    positions: BTreeMap<i32, Positions>,
    max_rows: usize,
    max_bytes: usize,
    linger: Duration,
    dlq_payload_bytes: usize,
}

impl BatchBuilder {
    pub fn new(decoder: RecordDecoder, cfg: &BatchConfig, dlq_payload_bytes: usize) -> Self {
        let cap = cfg.max_rows.min(65_536);
        let columns = decoder.schema().new_columns(cap);
        BatchBuilder {
            decoder,
            columns,
            row_partitions: Vec::with_capacity(cap),
            row_offsets: Vec::with_capacity(cap),
            dead_letters: Vec::new(),
            partitions: BTreeMap::new(),
            max_event_ms: BTreeMap::new(),
            stats: BatchStats::default(),
            started: None,
            opened_at_ms: None,
            oldest_produced_ms: None,
            archive: BTreeMap::new(),
            serve_from: BTreeMap::new(),
            positions: BTreeMap::new(),
            max_rows: cfg.max_rows,
            max_bytes: cfg.max_bytes.as_usize(),
            linger: cfg.linger,
            dlq_payload_bytes,
        }
    }

    /// Accepted rows so far.
    pub fn rows(&self) -> usize {
        self.row_offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stats.messages == 0 && self.stats.archive_only == 0
    }

    /// Where each partition's archive and serving store stand (set after
    /// every assignment or re-seek; see [`Positions`]).
    pub fn set_positions(&mut self, positions: BTreeMap<i32, Positions>) {
        self.positions = positions;
    }

    /// Decode and add one message. `expected_start` is the partition's fence
    /// value, used when this is the partition's first message in the batch.
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        expected_start: Option<i64>,
        payload: Option<&[u8]>,
        now_ms: i64,
        now: Instant,
    ) {
        if self.started.is_none() {
            self.started = Some(now);
            self.opened_at_ms = Some(now_ms);
        }
        let pos = self.positions.get(&partition).copied().unwrap_or_default();
        let archive = self.archive.entry(partition).or_insert(ArchiveRange {
            from: pos.archive,
            expected: expected_start,
            first: offset,
            last: offset,
        });
        archive.last = offset;
        let len = payload.map_or(0, <[u8]>::len);
        self.stats.bytes += len as u64;
        if let Some(serve) = pos.serve_from.filter(|s| offset < *s) {
            // Counted already: decoded again for the archive only.
            self.stats.archive_only += 1;
            if self
                .decoder
                .decode(payload, now_ms, &mut self.columns)
                .is_ok()
            {
                self.row_partitions.push(partition);
                self.row_offsets.push(offset);
                self.serve_from.insert(partition, serve);
            }
            return;
        }
        // The serving fence of a partition re-read from below its serving
        // offset is that offset.
        let expected_start = match pos.serve_from {
            Some(s) => expected_start.map(|e| e.max(s)),
            None => expected_start,
        };
        let range = self.partitions.entry(partition).or_insert(PartitionRange {
            expected_start,
            first: offset,
            last: offset,
        });
        range.last = offset;
        self.stats.messages += 1;
        match self.decoder.decode(payload, now_ms, &mut self.columns) {
            Ok(outcome) => {
                self.row_partitions.push(partition);
                self.row_offsets.push(offset);
                let newest = self
                    .max_event_ms
                    .entry(partition)
                    .or_insert(outcome.event_time_ms);
                *newest = (*newest).max(outcome.event_time_ms);
                self.stats.accepted += 1;
                if outcome.late {
                    self.stats.late += 1;
                }
            }
            Err(reject) => {
                let shown = payload.unwrap_or_default();
                let cut = &shown[..shown.len().min(self.dlq_payload_bytes)];
                rejects::rejected(partition, offset, reject.reason.code(), &reject.detail);
                *self.stats.rejected.entry(reject.reason).or_default() += 1;
                self.dead_letters.push(DeadLetter {
                    reason: reject.reason,
                    detail: reject.detail,
                    partition,
                    offset,
                    rejected_at_ms: now_ms,
                    payload: String::from_utf8_lossy(cut).into_owned(),
                    payload_bytes: len,
                });
            }
        }
    }

    /// Note a pushed message's Kafka timestamp (producer create time or
    /// broker append time, epoch ms), for the freshness metrics.
    pub fn note_produced(&mut self, produced_ms: i64) {
        if produced_ms > 0 {
            self.oldest_produced_ms = Some(
                self.oldest_produced_ms
                    .map_or(produced_ms, |o| o.min(produced_ms)),
            );
        }
    }

    /// Whether the batch should be sealed now.
    pub fn should_flush(&self, now: Instant) -> bool {
        match self.started {
            None => false,
            Some(t) => {
                (self.stats.messages + self.stats.archive_only) as usize >= self.max_rows
                    || self.stats.bytes as usize >= self.max_bytes
                    || now.duration_since(t) >= self.linger
            }
        }
    }

    /// Time left until linger expires (for poll timeouts).
    pub fn time_to_linger(&self, now: Instant) -> Option<Duration> {
        self.started
            .map(|t| self.linger.saturating_sub(now.duration_since(t)))
    }

    /// Seal the batch; the builder is reset and reusable.
    pub fn seal(
        &mut self,
        epoch: u64,
        topic: &str,
        now_ms: i64,
        caught_up: BTreeMap<i32, i64>,
    ) -> Result<Batch, datafusion::arrow::error::ArrowError> {
        rejects::flush();
        let events = self.columns.finish()?;
        self.started = None;
        let opened_at_ms = self.opened_at_ms.take().unwrap_or(now_ms);
        Ok(Batch {
            epoch,
            topic: topic.to_string(),
            events,
            row_partitions: std::mem::take(&mut self.row_partitions),
            row_offsets: std::mem::take(&mut self.row_offsets),
            dead_letters: std::mem::take(&mut self.dead_letters),
            partitions: std::mem::take(&mut self.partitions),
            max_event_ms: std::mem::take(&mut self.max_event_ms),
            caught_up,
            stats: std::mem::take(&mut self.stats),
            sealed_at_ms: now_ms,
            opened_at_ms,
            oldest_produced_ms: self.oldest_produced_ms.take(),
            origins: None,
            archive: std::mem::take(&mut self.archive),
            serve_from: std::mem::take(&mut self.serve_from),
        })
    }

    /// Drop everything buffered (after a rebalance or a fence reset).
    pub fn discard(&mut self) {
        let _ = self.columns.finish();
        self.row_partitions.clear();
        self.row_offsets.clear();
        self.dead_letters.clear();
        self.partitions.clear();
        self.archive.clear();
        self.serve_from.clear();
        self.max_event_ms.clear();
        self.stats = BatchStats::default();
        self.started = None;
        self.opened_at_ms = None;
        self.oldest_produced_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, Settings};
    use crate::decode::EventSchema;

    const NOW: i64 = 1_764_300_000_000;

    fn builder(max_rows: usize, max_bytes: u64) -> BatchBuilder {
        let s = Settings::defaults().unwrap();
        let schema = EventSchema::from_config(&s.schema).unwrap();
        let cfg = BatchConfig {
            max_rows,
            max_bytes: ByteSize(max_bytes),
            linger: Duration::from_secs(1),
        };
        BatchBuilder::new(RecordDecoder::new(schema, &s.decode), &cfg, 16)
    }

    fn ev(v: &str) -> Vec<u8> {
        format!(r#"{{"video_id":"{v}","event_type":"view","event_time":{NOW}}}"#).into_bytes()
    }

    #[test]
    fn wall_clock_follows_the_system_clock() {
        let mut c = WallClock::default();
        let t0 = Instant::now();
        let sys = chrono::Utc::now().timestamp_millis();
        assert!((c.now_ms(t0) - sys).abs() <= 5);
        let later = c.now_ms(t0 + Duration::from_millis(300));
        assert!((later - sys - 300).abs() <= 5, "{later} vs {sys}");
        // Past a second it re-reads the system clock (here: no time passed).
        let resync = c.now_ms(t0 + Duration::from_secs(2));
        assert!((resync - chrono::Utc::now().timestamp_millis()).abs() <= 5);
    }

    #[test]
    fn flushes_on_rows_bytes_and_linger() {
        let t0 = Instant::now();
        let mut b = builder(3, 1 << 20);
        assert!(
            !b.should_flush(t0 + Duration::from_secs(10)),
            "empty never flushes"
        );
        b.push(0, 0, None, Some(&ev("a")), NOW, t0);
        b.push(0, 1, None, Some(&ev("b")), NOW, t0);
        assert!(!b.should_flush(t0 + Duration::from_millis(999)));
        assert!(b.should_flush(t0 + Duration::from_secs(1)), "linger");
        b.push(1, 7, Some(7), Some(b"junk"), NOW, t0);
        assert!(b.should_flush(t0), "max_rows counts every message");

        let mut small = builder(1000, 100);
        small.push(0, 0, None, Some(&ev("a")), NOW, t0);
        assert!(!small.should_flush(t0));
        small.push(0, 1, None, Some(&ev("a")), NOW, t0);
        assert!(small.should_flush(t0), "max_bytes");
    }

    #[test]
    fn seal_tracks_offsets_partitions_and_rejects() {
        let t0 = Instant::now();
        let mut b = builder(100, 1 << 20);
        b.push(2, 10, Some(10), Some(&ev("a")), NOW, t0);
        b.push(
            1,
            5,
            None,
            Some(b"{not json at all, and long enough to truncate}"),
            NOW,
            t0,
        );
        b.push(2, 11, Some(999), Some(&ev("b")), NOW, t0);
        let batch = b.seal(4, "t", NOW, BTreeMap::new()).unwrap();
        assert_eq!(batch.events.num_rows(), 2);
        assert_eq!(batch.row_partitions, vec![2, 2]);
        assert_eq!(
            batch.partitions[&2],
            PartitionRange {
                expected_start: Some(10),
                first: 10,
                last: 11
            }
        );
        assert_eq!(
            batch.partitions[&1],
            PartitionRange {
                expected_start: None,
                first: 5,
                last: 5
            }
        );
        assert_eq!(batch.max_event_ms, [(2, NOW)].into_iter().collect());
        assert_eq!(batch.dead_letters.len(), 1);
        assert_eq!(batch.dead_letters[0].payload.len(), 16);
        assert_eq!(batch.dead_letters[0].payload_bytes, 46);
        assert_eq!(batch.stats.rejected[&RejectReason::NotJson], 1);
        assert!(b.is_empty());
        let again = b.seal(5, "t", NOW, BTreeMap::new()).unwrap();
        assert_eq!(again.events.num_rows(), 0);
        assert_eq!(
            (again.opened_at_ms, again.oldest_produced_ms),
            (NOW, None),
            "a heartbeat opens when sealed"
        );
    }

    #[test]
    fn seal_reports_when_the_batch_opened_and_its_oldest_message() {
        let t0 = Instant::now();
        let mut b = builder(100, 1 << 20);
        b.push(0, 0, None, Some(&ev("a")), NOW + 5, t0);
        b.note_produced(NOW - 40);
        b.push(1, 0, None, Some(&ev("b")), NOW + 9, t0);
        b.note_produced(NOW - 70);
        b.push(0, 1, None, Some(&ev("c")), NOW + 12, t0);
        b.note_produced(-1); // no timestamp on the message
        let batch = b.seal(1, "t", NOW + 500, BTreeMap::new()).unwrap();
        assert_eq!(
            (
                batch.opened_at_ms,
                batch.sealed_at_ms,
                batch.oldest_produced_ms
            ),
            (NOW + 5, NOW + 500, Some(NOW - 70))
        );
        b.push(0, 2, None, Some(&ev("d")), NOW + 600, t0);
        b.discard();
        b.push(0, 3, None, Some(&ev("e")), NOW + 700, t0);
        let next = b.seal(1, "t", NOW + 900, BTreeMap::new()).unwrap();
        assert_eq!(
            (next.opened_at_ms, next.oldest_produced_ms),
            (NOW + 700, None),
            "nothing carries over"
        );
    }
}
