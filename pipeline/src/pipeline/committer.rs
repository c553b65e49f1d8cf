//! The committer: one batch through the archive, the rollup SQL and the
//! serving transaction, retried until it is done. `tally run` and
//! `tally replay` both commit through [`Committer::commit`]; they differ only
//! in their [`Retry`] policy and in what they do with the outcome.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::aggregate::RollupAggregator;
use crate::batch::Batch;
use crate::decode::RejectReason;
use crate::error::{Error, RetryHint};
use crate::failpoint::failpoint;
use crate::metrics::Metrics;
use crate::sink::archive::RawWriter;
use crate::sink::{CommitOutcome, CommitRequest, ParquetArchiveSink, ServingStore, WrittenFile};

/// The outcome of one attempt: the store's answer, the files written, the
/// rollup rows merged.
pub(crate) type Attempt = (CommitOutcome, Vec<WrittenFile>, u64);

/// How long a failing commit is retried (with backoff from 100 ms to 5 s).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Retry {
    /// Until it commits: `tally run` pauses consumption meanwhile, so
    /// offsets never advance past unwritten data.
    Forever,
    /// At most this many retries, then the error (a job that a person runs).
    Times(u32),
}

/// How a batch's commit ended. (One value per batch, moved once: boxing the
/// large variant would save nothing.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Done<'b> {
    /// Committed (the batch, without its poison rows if any were found).
    Committed {
        batch: Cow<'b, Batch>,
        files: Vec<WrittenFile>,
        rows: u64,
        /// Partitions whose archive flush another writer's fenced (their
        /// open files are dropped; the consumer must read them again).
        archive_fenced: Vec<i32>,
    },
    /// Another writer advanced a partition; nothing of the batch counts, and
    /// its files are the caller's to discard.
    Fenced {
        partition: i32,
        expected: Option<i64>,
        stored: Option<i64>,
        files: Vec<WrittenFile>,
    },
    /// The batch stopped being current (a rebalance) before it committed.
    Stale,
}

/// The stages a commit goes through.
pub(crate) struct Committer<'a> {
    pub aggregator: &'a mut RollupAggregator,
    pub archive: &'a ParquetArchiveSink,
    /// The open raw files the committed batches' events are appended to;
    /// `None`: each batch writes its own raw files, committed with it
    /// (`tally dlq replay`, whose input is not a log it could re-read).
    pub raw: Option<&'a mut RawWriter>,
    pub store: &'a ServingStore,
    /// Counted when given: commit errors, resolved lost replies.
    pub metrics: Option<&'a Metrics>,
}

impl Committer<'_> {
    /// Commit `original`, retrying store and archive failures as `retry`
    /// says. A batch that fails on its data is bisected once and committed
    /// without its poison rows (`quarantine.rs`). After a failed attempt,
    /// a fence failure may be this very batch, committed by an attempt whose
    /// reply was lost: that is checked and counted once. `current` is asked
    /// before every attempt.
    pub(crate) async fn commit<'b>(
        &mut self,
        original: &'b Batch,
        retry: Retry,
        current: impl Fn(&Batch) -> bool,
    ) -> Result<Done<'b>, Error> {
        let mut backoff = Duration::from_millis(100);
        let mut retries = 0u32;
        // Set after a failed attempt: its COMMIT may have been applied even
        // though the reply was lost (a dropped connection).
        let mut ambiguous = false;
        let mut isolated: Option<Batch> = None;
        let view = original
            .served()
            .map_err(|e| Error::Internal(e.to_string()))?;
        // One commit time for every attempt: a lost reply's commit is
        // recognised by it (see [`committed_earlier`]).
        let now_ms = chrono::Utc::now().timestamp_millis();
        loop {
            let batch = isolated.as_ref().unwrap_or(&view);
            if !current(batch) {
                return Ok(Done::Stale);
            }
            let per_batch = self.raw.is_none();
            let attempt = match try_commit(
                batch,
                self.aggregator,
                self.archive,
                self.store,
                per_batch,
                now_ms,
            )
            .await
            {
                Ok((CommitOutcome::Fenced { .. }, files, rows))
                    if ambiguous && committed_earlier(batch, &files, now_ms, self.store).await =>
                {
                    if let Some(m) = self.metrics {
                        m.commits_resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(topic = %batch.topic, offsets = %batch.offsets_field(), "an earlier attempt whose reply was lost had committed this batch; counting it once");
                    Ok((CommitOutcome::Committed, files, rows))
                }
                other => other,
            };
            let e = match attempt {
                Ok((CommitOutcome::Committed, files, rows)) => {
                    let batch = match isolated {
                        Some(b) => Cow::Owned(b),
                        None => view,
                    };
                    self.publish_batch_files(&batch, &files, retry).await?;
                    let archive_fenced = self.archive_batch(original, &batch, retry).await?;
                    return Ok(Done::Committed {
                        batch,
                        files,
                        rows,
                        archive_fenced,
                    });
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
                    return Ok(Done::Fenced {
                        partition,
                        expected,
                        stored,
                        files,
                    })
                }
                Err(e) => e,
            };
            if let Some(m) = self.metrics {
                m.commit_errors.fetch_add(1, Ordering::Relaxed);
            }
            if crate::quarantine::is_data_error(&e) && isolated.is_none() {
                tracing::error!(error = %e, topic = %batch.topic, offsets = %batch.offsets_field(), rows = batch.events.num_rows(), "a batch fails on its data; bisecting it to find the events that fail");
                match crate::quarantine::isolate(batch, &e, self.aggregator, self.store).await? {
                    Some(without) => {
                        isolated = Some(without);
                        continue;
                    }
                    None if e.retry() == RetryHint::WithBackoff => {}
                    None => return Err(e),
                }
            } else if e.retry() == RetryHint::WithBackoff {
                ambiguous = true;
            } else {
                return Err(e);
            }
            if let Retry::Times(n) = retry {
                if retries >= n {
                    return Err(e);
                }
            }
            retries += 1;
            tracing::error!(error = %e, topic = %batch.topic, offsets = %batch.offsets_field(), retry_in = ?backoff, "batch commit failed; retrying (offsets do not advance)");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

async fn try_commit(
    batch: &Batch,
    aggregator: &mut RollupAggregator,
    archive: &ParquetArchiveSink,
    store: &ServingStore,
    per_batch: bool,
    now_ms: i64,
) -> Result<Attempt, Error> {
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
            replayed: None,
            open_hours: &[],
            archive_with_batch: per_batch,
        };
        return Ok((store.commit(&req).await?, Vec::new(), 0));
    }
    let write = async {
        if per_batch {
            archive.write_batch(batch).await
        } else {
            archive.write_dead_letters(batch).await
        }
    };
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
    let open_hours = if per_batch {
        Vec::new()
    } else {
        open_hours(batch, archive.time_index())
    };
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
        replayed: batch
            .origins
            .as_ref()
            .map(|o| (o.topic.as_str(), o.rows.as_slice())),
        open_hours: &open_hours,
        archive_with_batch: per_batch,
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

/// (partition, event hour, last offset of the partition in the batch) of
/// every counted row: hours whose events reach committed files later.
fn open_hours(batch: &Batch, time_index: usize) -> Vec<(i32, i64, i64)> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::TimestampMillisecondType;
    let mut hours = std::collections::BTreeSet::new();
    if batch.events.num_rows() > 0 {
        let times = batch
            .events
            .column(time_index)
            .as_primitive::<TimestampMillisecondType>();
        for (i, p) in batch.row_partitions.iter().enumerate() {
            hours.insert((*p, times.value(i).div_euclid(3_600_000) * 3_600_000));
        }
    }
    hours
        .into_iter()
        .filter_map(|(p, h)| batch.partitions.get(&p).map(|r| (p, h, r.last)))
        .collect()
}

fn counters(batch: &Batch) -> Vec<(String, i64)> {
    if let Some(o) = &batch.origins {
        // Dead letters counted now: no new message, and their rejection was
        // counted when they were first read.
        return vec![
            ("accepted_total".to_string(), batch.stats.accepted as i64),
            ("late_total".to_string(), batch.stats.late as i64),
            ("dlq_replayed_total".to_string(), o.rows.len() as i64),
        ];
    }
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

/// Whether a batch that the fence refused was in fact committed by an
/// earlier attempt of its own whose reply was lost: every partition's stored
/// offset is the batch's end, changed at this batch's commit time (the same
/// on every attempt), and every file it wrote (the same names on every
/// attempt) is recorded. A lookup that fails answers no; the fence path
/// then keeps the files (see [`discard_uncommitted`]).
async fn committed_earlier(
    batch: &Batch,
    files: &[crate::sink::WrittenFile],
    now_ms: i64,
    store: &ServingStore,
) -> bool {
    if batch.partitions.is_empty() {
        return false;
    }
    let Ok(stored) = store.load_offset_times(&batch.topic).await else {
        return false;
    };
    if !batch
        .partitions
        .iter()
        .all(|(p, r)| stored.get(p) == Some(&(r.next_offset(), now_ms)))
    {
        return false;
    }
    if files.is_empty() {
        return true;
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
        .map(|p| crate::sink::archive::staging_path(&p))
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
