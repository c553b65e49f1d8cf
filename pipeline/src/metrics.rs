//! Process metrics in the Prometheus text format: `tally_` prefix, base
//! units (seconds, bytes), counters ending in `_total`. Labels are bounded
//! (reason, partition, route, status); a video id never becomes a label.
//!
//! The pipeline stages update plain atomics; `/metrics` renders them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::decode::RejectReason;

mod process;
pub use process::set_build_commit;

/// Bucket upper bounds in seconds for durations.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket upper bounds in seconds for the stages of produce -> visible.
const FRESHNESS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];
/// The stages of `tally_batch_stage_seconds`, in order.
pub(crate) const BATCH_STAGES: [&str; 4] = ["fetch", "linger", "queue", "commit"];
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// A fixed-bucket histogram.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last slot is +Inf.
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + seconds).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts.last().map_or(0, |c| c.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            f64::from_bits(self.sum_bits.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "{name}_count{braces} {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

/// Every metric tally exports.
#[derive(Debug)]
pub struct Metrics {
    pub messages_consumed: AtomicU64,
    pub events_accepted: AtomicU64,
    rejected: Vec<AtomicU64>,
    pub events_late: AtomicU64,
    pub batches_committed: AtomicU64,
    pub batches_fenced: AtomicU64,
    pub commit_errors: AtomicU64,
    /// Commits whose reply was lost, found committed by the retry's fence read.
    pub commits_resolved: AtomicU64,
    /// Fetches whose first offset was not the one expected (a gap), and the
    /// messages stepped over (below the stored offset, or lost in a gap).
    pub offset_gaps: AtomicU64,
    pub messages_skipped: AtomicU64,
    pub commit_duration: Histogram,
    /// Per batch, by stage ([`BATCH_STAGES`]).
    batch_stage: Vec<Histogram>,
    visible_delay: Histogram,
    pub raw_bytes_written: AtomicU64,
    pub archive_files_written: AtomicU64,
    /// The archive's commits (flushes of a partition's open files), and the
    /// raw files open now.
    pub archive_flushes: AtomicU64,
    pub archive_open_files: AtomicU64,
    pub archive_orphans_removed: AtomicU64,
    /// Orphan sweeps that succeeded: of the whole archive, and bounded ones.
    pub archive_sweeps_full: AtomicU64,
    pub archive_sweeps_bounded: AtomicU64,
    pub rollup_rows_merged: AtomicU64,
    /// SQLite delta-table folds, and their seconds (µs), as the store counts them.
    pub sqlite_folds: AtomicU64,
    pub sqlite_fold_micros: AtomicU64,
    pub sqlite_fold_rows: AtomicU64,
    pub api_events_produced: AtomicU64,
    pub api_events_invalid: AtomicU64,
    pub verify_runs: AtomicU64,
    pub retention_runs: AtomicU64,
    pub retention_errors: AtomicU64,
    /// Rollup rows pruned, by rollup; archive files deleted, by kind.
    retention_rows: Mutex<BTreeMap<String, u64>>,
    retention_files: Mutex<BTreeMap<&'static str, u64>>,
    /// Rows that differed in the last periodic verify (-1: none run yet).
    pub verify_drift_rows: AtomicI64,
    /// Newest event time committed by this process (epoch ms; 0: none yet).
    pub newest_committed_event_ms: AtomicI64,
    consumer_lag: Mutex<BTreeMap<i32, i64>>,
    /// Every partition of the topic: messages waiting after the stored
    /// offset, and those stalled (data waits, no commit for `kafka.stall_after`).
    topic_lag: Mutex<BTreeMap<i32, i64>>,
    stalled: Mutex<Vec<i32>>,
    pub partition_stalls: AtomicU64,
    /// Partition -> next offset committed to the serving store by this process.
    committed_offsets: Mutex<BTreeMap<i32, i64>>,
    http: Mutex<BTreeMap<(String, u16), u64>>,
    http_duration: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// The dimension tables `tally run` joins (their reload counters).
    dimensions: Mutex<Option<crate::aggregate::Dimensions>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            messages_consumed: AtomicU64::new(0),
            events_accepted: AtomicU64::new(0),
            rejected: RejectReason::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            events_late: AtomicU64::new(0),
            batches_committed: AtomicU64::new(0),
            batches_fenced: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            commits_resolved: AtomicU64::new(0),
            offset_gaps: AtomicU64::new(0),
            messages_skipped: AtomicU64::new(0),
            commit_duration: Histogram::new(COMMIT_BUCKETS),
            batch_stage: BATCH_STAGES
                .iter()
                .map(|_| Histogram::new(FRESHNESS_BUCKETS))
                .collect(),
            visible_delay: Histogram::new(FRESHNESS_BUCKETS),
            raw_bytes_written: AtomicU64::new(0),
            archive_files_written: AtomicU64::new(0),
            archive_flushes: AtomicU64::new(0),
            archive_open_files: AtomicU64::new(0),
            archive_orphans_removed: AtomicU64::new(0),
            archive_sweeps_full: AtomicU64::new(0),
            archive_sweeps_bounded: AtomicU64::new(0),
            rollup_rows_merged: AtomicU64::new(0),
            sqlite_folds: AtomicU64::new(0),
            sqlite_fold_micros: AtomicU64::new(0),
            sqlite_fold_rows: AtomicU64::new(0),
            api_events_produced: AtomicU64::new(0),
            api_events_invalid: AtomicU64::new(0),
            newest_committed_event_ms: AtomicI64::new(0),
            verify_runs: AtomicU64::new(0),
            retention_runs: AtomicU64::new(0),
            retention_errors: AtomicU64::new(0),
            retention_rows: Mutex::new(BTreeMap::new()),
            retention_files: Mutex::new(BTreeMap::new()),
            verify_drift_rows: AtomicI64::new(-1),
            consumer_lag: Mutex::new(BTreeMap::new()),
            topic_lag: Mutex::new(BTreeMap::new()),
            stalled: Mutex::new(Vec::new()),
            partition_stalls: AtomicU64::new(0),
            committed_offsets: Mutex::new(BTreeMap::new()),
            http: Mutex::new(BTreeMap::new()),
            http_duration: Mutex::new(BTreeMap::new()),
            dimensions: Mutex::new(None),
        }
    }

    pub fn add_rejected(&self, reason: RejectReason, n: u64) {
        if let Some(i) = RejectReason::ALL.iter().position(|r| *r == reason) {
            if let Some(c) = self.rejected.get(i) {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Record where a committed batch's time went, from wall-clock epoch ms:
    /// its oldest message's Kafka timestamp (if any), its first message's
    /// arrival, its seal, and the start and end of its commit. The four
    /// stages add up to the visible delay (each is clamped at zero, as the
    /// Kafka timestamp comes from another clock).
    pub fn observe_batch_latency(
        &self,
        produced_ms: Option<i64>,
        opened_ms: i64,
        sealed_ms: i64,
        commit_start_ms: i64,
        commit_end_ms: i64,
    ) {
        let secs = |from: i64, to: i64| (to - from).max(0) as f64 / 1000.0;
        let stages = [
            produced_ms.map(|p| secs(p, opened_ms)),
            Some(secs(opened_ms, sealed_ms)),
            Some(secs(sealed_ms, commit_start_ms)),
            Some(secs(commit_start_ms, commit_end_ms)),
        ];
        for (h, v) in self.batch_stage.iter().zip(stages) {
            if let Some(v) = v {
                h.observe(v);
            }
        }
        if let Some(p) = produced_ms {
            self.visible_delay.observe(secs(p, commit_end_ms));
        }
    }

    /// Replace the per-partition consumer lag (from librdkafka statistics).
    /// Lag of every partition of the topic and the stalled ones (`source/stall.rs`).
    pub fn set_topic_lag(&self, lag: BTreeMap<i32, i64>, stalled: Vec<i32>) {
        if let Ok(mut m) = self.topic_lag.lock() {
            *m = lag;
        }
        if let Ok(mut m) = self.stalled.lock() {
            *m = stalled;
        }
    }

    /// Partitions whose data waits while nobody commits them.
    pub fn stalled_partitions(&self) -> Vec<i32> {
        self.stalled.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn set_consumer_lag(&self, lag: BTreeMap<i32, i64>) {
        if let Ok(mut m) = self.consumer_lag.lock() {
            *m = lag;
        }
    }

    /// Record a serving-store commit: `partition` is committed up to `next_offset`.
    pub fn set_committed_offset(&self, partition: i32, next_offset: i64) {
        if let Ok(mut m) = self.committed_offsets.lock() {
            let e = m.entry(partition).or_insert(next_offset);
            *e = (*e).max(next_offset);
        }
    }

    /// The next offset this process committed to the serving store for `partition`.
    pub fn committed_offset(&self, partition: i32) -> Option<i64> {
        self.committed_offsets.lock().ok()?.get(&partition).copied()
    }

    pub fn observe_http(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((route.to_string(), status)).or_insert(0) += 1;
        }
        let h = match self.http_duration.lock() {
            Ok(mut m) => m
                .entry(route.to_string())
                .or_insert_with(|| std::sync::Arc::new(Histogram::new(HTTP_BUCKETS)))
                .clone(),
            Err(_) => return,
        };
        h.observe(seconds);
    }

    /// Render everything. `as_of_ms` is the serving store's completeness
    /// time; `pipeline` is false in `tally serve` (no ingest counters).
    pub fn render(&self, pipeline: bool, as_of_ms: Option<i64>, now_ms: i64) -> String {
        let mut o = String::with_capacity(8192);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        process::render(&mut o);
        if pipeline {
            self.render_pipeline(&mut o);
        }
        counter(
            &mut o,
            "tally_api_events_produced_total",
            "Events accepted by POST /v1/events and acknowledged by the broker.",
            load(&self.api_events_produced),
        );
        counter(
            &mut o,
            "tally_api_events_invalid_total",
            "Events refused by POST /v1/events validation.",
            load(&self.api_events_invalid),
        );
        if let Some(a) = as_of_ms {
            gauge(
                &mut o,
                "tally_as_of_timestamp_seconds",
                "Time up to which the serving store is complete (the as_of of answers).",
                a as f64 / 1000.0,
            );
            gauge(
                &mut o,
                "tally_event_time_lag_seconds",
                "How far the complete data lags behind now: now - as_of.",
                ((now_ms - a).max(0)) as f64 / 1000.0,
            );
        }
        header(
            &mut o,
            "tally_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        if let Ok(m) = self.http.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "tally_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        header(
            &mut o,
            "tally_http_request_duration_seconds",
            "histogram",
            "HTTP request duration by route.",
        );
        let hs: Vec<(String, std::sync::Arc<Histogram>)> = match self.http_duration.lock() {
            Ok(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        for (route, h) in hs {
            h.render(
                &mut o,
                "tally_http_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        o
    }
}

impl Metrics {
    fn render_pipeline(&self, o: &mut String) {
        self.render_counts(o);
        self.render_latency(o);
        self.render_storage(o);
        self.render_lag(o);
    }

    /// Messages, events, rejects, batches and commit outcomes.
    fn render_counts(&self, o: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            o,
            "tally_messages_consumed_total",
            "Kafka messages consumed and committed (accepted + rejected).",
            load(&self.messages_consumed),
        );
        counter(
            o,
            "tally_events_accepted_total",
            "Events accepted, archived and counted.",
            load(&self.events_accepted),
        );
        header(
            o,
            "tally_events_rejected_total",
            "counter",
            "Messages sent to the dead-letter dataset, by reason.",
        );
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let v = self.rejected.get(i).map_or(0, load);
            let _ = writeln!(
                o,
                "tally_events_rejected_total{{reason=\"{}\"}} {v}",
                r.code()
            );
        }
        counter(
            o,
            "tally_events_late_total",
            "Accepted events that arrived more than decode.late_after after their event time.",
            load(&self.events_late),
        );
        counter(
            o,
            "tally_batches_committed_total",
            "Micro-batches committed to the serving store.",
            load(&self.batches_committed),
        );
        counter(
            o,
            "tally_batches_fenced_total",
            "Batches refused by the offset fence (another writer owned the partition).",
            load(&self.batches_fenced),
        );
        counter(
            o,
            "tally_commit_errors_total",
            "Failed batch commit attempts (retried with backoff).",
            load(&self.commit_errors),
        );
        counter(o, "tally_commits_resolved_total", "Batch commits whose reply was lost (a dropped connection) and that the retry found committed; counted once.", load(&self.commits_resolved));
        counter(o, "tally_offset_gaps_total", "Times a partition's first fetched offset was not the expected next offset (retention, compaction, a reset).", load(&self.offset_gaps));
        counter(o, "tally_messages_skipped_total", "Messages stepped over: fetched below the stored offset (already committed) or missing in an offset gap.", load(&self.messages_skipped));
    }

    /// Where each batch's time goes, and produce to visible.
    fn render_latency(&self, o: &mut String) {
        header(
            o,
            "tally_batch_commit_duration_seconds",
            "histogram",
            "Archive write + aggregation + serving transaction, per batch.",
        );
        self.commit_duration
            .render(o, "tally_batch_commit_duration_seconds", "");
        header(
            o,
            "tally_batch_stage_seconds",
            "histogram",
            "Where each batch's time goes: fetch (oldest message's Kafka timestamp to the batch's first message at tally), linger (to seal), queue (to commit start), commit (archive, aggregation and serving transaction).",
        );
        for (stage, h) in BATCH_STAGES.iter().zip(&self.batch_stage) {
            h.render(
                o,
                "tally_batch_stage_seconds",
                &format!("stage=\"{stage}\""),
            );
        }
        header(
            o,
            "tally_visible_delay_seconds",
            "histogram",
            "Produce to visible: per batch, from its oldest message's Kafka timestamp to the end of its serving commit.",
        );
        self.visible_delay
            .render(o, "tally_visible_delay_seconds", "");
    }

    /// The archive, the sweeps, rollup rows and SQLite folds.
    fn render_storage(&self, o: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            o,
            "tally_raw_bytes_written_total",
            "Parquet bytes written to the raw archive and the dead-letter dataset.",
            load(&self.raw_bytes_written),
        );
        counter(
            o,
            "tally_archive_files_written_total",
            "Parquet files written to the raw archive and the dead-letter dataset.",
            load(&self.archive_files_written),
        );
        counter(
            o,
            "tally_archive_flushes_total",
            "Commits of the raw archive: a partition's open files closed, committed and renamed.",
            load(&self.archive_flushes),
        );
        header(
            o,
            "tally_archive_open_files",
            "gauge",
            "Raw files open now (one per partition and event hour, committed at the next flush).",
        );
        let _ = writeln!(
            o,
            "tally_archive_open_files {}",
            load(&self.archive_open_files)
        );
        counter(o, "tally_archive_orphans_removed_total", "Archive files of batches that never committed (a crash or a fenced writer), removed by the orphan sweep.", load(&self.archive_orphans_removed));
        header(o, "tally_archive_sweeps_total", "counter", "Orphan sweeps that succeeded, by scope: `full` lists the whole archive (after an assignment and daily), `bounded` only recent directories and files.");
        let _ = writeln!(
            o,
            "tally_archive_sweeps_total{{scope=\"full\"}} {}",
            load(&self.archive_sweeps_full)
        );
        let _ = writeln!(
            o,
            "tally_archive_sweeps_total{{scope=\"bounded\"}} {}",
            load(&self.archive_sweeps_bounded)
        );
        counter(
            o,
            "tally_rollup_rows_merged_total",
            "Rollup rows merged into the serving store.",
            load(&self.rollup_rows_merged),
        );
        counter(
            o,
            "tally_sqlite_folds_total",
            "Folds of the SQLite delta tables into the rollup tables.",
            load(&self.sqlite_folds),
        );
        header(
            o,
            "tally_sqlite_fold_seconds_total",
            "counter",
            "Time spent folding the SQLite delta tables (the next batch commit waits for a fold).",
        );
        let _ = writeln!(
            o,
            "tally_sqlite_fold_seconds_total {}",
            load(&self.sqlite_fold_micros) as f64 / 1e6
        );
        counter(
            o,
            "tally_sqlite_fold_rows_total",
            "Delta rows folded into the SQLite rollup tables.",
            load(&self.sqlite_fold_rows),
        );
    }

    /// Lag, stalls, verify drift and the newest committed event.
    fn render_lag(&self, o: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(o, "tally_topic_lag_messages", "gauge", "Every partition of the topic, owned by this process or not: messages between the serving store's offset and the partition end (broker watermarks, every 10 s).");
        if let Ok(m) = self.topic_lag.lock() {
            for (p, lag) in m.iter() {
                let _ = writeln!(o, "tally_topic_lag_messages{{partition=\"{p}\"}} {lag}");
            }
        }
        let stalled = self.stalled.lock().map(|m| m.len()).unwrap_or(0);
        header(o, "tally_partitions_stalled", "gauge", "Partitions whose messages wait while no owner has committed for kafka.stall_after (a dead or stuck owner); /readyz fails while this is above 0.");
        let _ = writeln!(o, "tally_partitions_stalled {stalled}");
        counter(
            o,
            "tally_partition_stalls_total",
            "Times a partition became stalled.",
            load(&self.partition_stalls),
        );
        header(o, "tally_committed_offset", "gauge", "The next offset this process committed to the serving store, per partition it has committed.");
        if let Ok(m) = self.committed_offsets.lock() {
            for (p, next) in m.iter() {
                let _ = writeln!(o, "tally_committed_offset{{partition=\"{p}\"}} {next}");
            }
        }
        header(o, "tally_consumer_lag_messages", "gauge", "Messages between the offsets committed to the serving store and the partition end (librdkafka statistics).");
        if let Ok(m) = self.consumer_lag.lock() {
            for (p, lag) in m.iter() {
                let _ = writeln!(o, "tally_consumer_lag_messages{{partition=\"{p}\"}} {lag}");
            }
        }
        counter(
            o,
            "tally_verify_runs_total",
            "Periodic verify runs (serving rollups vs the raw archive).",
            load(&self.verify_runs),
        );
        self.render_retention(o);
        self.render_dimensions(o);
        let drift = self.verify_drift_rows.load(Ordering::Relaxed);
        if drift >= 0 {
            gauge(
                o,
                "tally_verify_drift_rows",
                "Rollup rows that differed from the raw archive in the last periodic verify.",
                drift as f64,
            );
        }
        let newest = self.newest_committed_event_ms.load(Ordering::Relaxed);
        if newest > 0 {
            gauge(
                o,
                "tally_newest_committed_event_timestamp_seconds",
                "Newest event time this process committed.",
                newest as f64 / 1000.0,
            );
        }
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

impl Metrics {
    /// Count one retention pass's deletions.
    pub fn retention_pruned(&self, rows: &[(String, u64)], dead_letter_files: u64, raw_files: u64) {
        if let Ok(mut m) = self.retention_rows.lock() {
            for (rollup, n) in rows {
                *m.entry(rollup.clone()).or_default() += n;
            }
        }
        if let Ok(mut m) = self.retention_files.lock() {
            *m.entry("dlq").or_default() += dead_letter_files;
            *m.entry("raw").or_default() += raw_files;
        }
    }

    /// Report the reloads of these dimension tables.
    pub fn watch_dimensions(&self, dimensions: &crate::aggregate::Dimensions) {
        if let Ok(mut d) = self.dimensions.lock() {
            *d = Some(dimensions.clone());
        }
    }

    fn render_dimensions(&self, o: &mut String) {
        let Some(dims) = self.dimensions.lock().ok().and_then(|d| d.clone()) else {
            return;
        };
        let (reloads, errors) = dims.reload_counts();
        counter(
            o,
            "tally_dimension_reloads_total",
            "Changed dimension files read again and used from the next batch.",
            reloads,
        );
        counter(o, "tally_dimension_reload_errors_total", "Changed dimension files not used (unreadable, or their columns changed): rollups keep the previous rows.", errors);
        header(
            o,
            "tally_dimension_rows",
            "gauge",
            "Rows of each dimension table in use, by dimension.",
        );
        for (name, _, rows) in dims.describe() {
            let _ = writeln!(o, "tally_dimension_rows{{dimension=\"{name}\"}} {rows}");
        }
    }

    fn render_retention(&self, o: &mut String) {
        counter(
            o,
            "tally_retention_runs_total",
            "Retention passes that completed (rollup rows and archive files past [retention] deleted).",
            self.retention_runs.load(Ordering::Relaxed),
        );
        counter(
            o,
            "tally_retention_errors_total",
            "Retention passes that failed (retried at the next retention.interval).",
            self.retention_errors.load(Ordering::Relaxed),
        );
        header(
            o,
            "tally_retention_pruned_rows_total",
            "counter",
            "Rollup rows deleted by retention, by rollup.",
        );
        if let Ok(m) = self.retention_rows.lock() {
            for (rollup, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "tally_retention_pruned_rows_total{{rollup=\"{rollup}\"}} {n}"
                );
            }
        }
        header(
            o,
            "tally_retention_deleted_files_total",
            "counter",
            "Archive files deleted by retention, by kind (raw, dlq).",
        );
        if let Ok(m) = self.retention_files.lock() {
            for (kind, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "tally_retention_deleted_files_total{{kind=\"{kind}\"}} {n}"
                );
            }
        }
    }
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    header(o, name, "counter", help);
    let _ = writeln!(o, "{name} {v}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: f64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render(&mut s, "x", "");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
        assert!(s.contains("x_sum 5.55\n"), "{s}");
    }

    #[test]
    fn batch_stages_split_produce_to_visible() {
        let m = Metrics::new();
        // produced at 0, first message at tally 120 ms later, sealed at 620,
        // commit from 700 to 1,900: visible 1.9 s after produce.
        m.observe_batch_latency(Some(1_000_000), 1_000_120, 1_000_620, 1_000_700, 1_001_900);
        // A message stamped by a clock ahead of ours: fetch clamps to zero.
        m.observe_batch_latency(Some(2_000_050), 2_000_000, 2_000_500, 2_000_500, 2_000_600);
        // No Kafka timestamp: no fetch stage and no visible delay.
        m.observe_batch_latency(None, 3_000_000, 3_000_500, 3_000_500, 3_000_600);
        let s = m.render(true, None, 0);
        for want in [
            "tally_batch_stage_seconds_bucket{stage=\"fetch\",le=\"0.01\"} 1\n",
            "tally_batch_stage_seconds_bucket{stage=\"fetch\",le=\"0.25\"} 2\n",
            "tally_batch_stage_seconds_count{stage=\"fetch\"} 2\n",
            "tally_batch_stage_seconds_sum{stage=\"fetch\"} 0.12\n",
            "tally_batch_stage_seconds_bucket{stage=\"linger\",le=\"0.5\"} 3\n",
            "tally_batch_stage_seconds_sum{stage=\"queue\"} 0.08\n",
            "tally_batch_stage_seconds_bucket{stage=\"commit\",le=\"1\"} 2\n",
            "tally_batch_stage_seconds_bucket{stage=\"commit\",le=\"1.5\"} 3\n",
            "tally_visible_delay_seconds_bucket{le=\"0.5\"} 0\n",
            "tally_visible_delay_seconds_bucket{le=\"0.75\"} 1\n",
            "tally_visible_delay_seconds_bucket{le=\"2\"} 2\n",
            "tally_visible_delay_seconds_count 2\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }

    #[test]
    fn render_names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.add_rejected(RejectReason::NotJson, 3);
        m.observe_http("/v1/count", 200, 0.001);
        m.set_consumer_lag([(0, 5)].into_iter().collect());
        let s = m.render(true, Some(1_000), 3_000);
        assert!(
            s.contains("tally_events_rejected_total{reason=\"not_json\"} 3\n"),
            "{s}"
        );
        assert!(
            s.contains("tally_http_requests_total{route=\"/v1/count\",status=\"200\"} 1\n"),
            "{s}"
        );
        assert!(
            s.contains("tally_consumer_lag_messages{partition=\"0\"} 5\n"),
            "{s}"
        );
        assert!(s.contains("tally_event_time_lag_seconds 2\n"), "{s}");
        for line in s.lines().filter(|l| l.starts_with("# TYPE")) {
            let parts: Vec<&str> = line.split(' ').collect();
            assert!(
                parts[2].starts_with("tally_") || parts[2].starts_with("process_"),
                "{line}"
            );
            if parts[3] == "counter" {
                assert!(parts[2].ends_with("_total"), "{line}");
            }
        }
    }
}
