//! Poison rows: a batch whose commit fails because of its data (a rollup's
//! SQL fails on some event, or the serving store refuses a rollup row) would
//! fail on every retry and stall every partition. Such a batch is bisected
//! down to the events that fail; they go to the dead-letter dataset
//! (`rollup_failed`, with DataFusion's or the store's message as the
//! detail), and the rest of the batch commits as usual (same offsets).
//!
//! A probe of a set of rows runs the rollup SQL over them and, on
//! PostgreSQL, merges the result in a transaction that is rolled back.
//! Bisection costs about `2 · log2(rows)` probes per poison row.

use datafusion::arrow::array::{BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;

use crate::aggregate::{AggregateError, RollupAggregator};
use crate::batch::{Batch, DeadLetter};
use crate::decode::RejectReason;
use crate::error::Error;
use crate::sink::{ServingStore, SinkError};

/// Whether `e` is an error of the batch's data, which retrying cannot fix.
pub(crate) fn is_data_error(e: &Error) -> bool {
    use datafusion::error::DataFusionError as D;
    match e {
        Error::Aggregate(AggregateError::Execute { source, .. }) => !matches!(
            source.as_ref(),
            D::ResourcesExhausted(_) | D::IoError(_) | D::ObjectStore(_) | D::External(_)
        ),
        Error::Sink(SinkError::Database { source, .. }) => match source.as_ref() {
            // SQLSTATE class 22 (data exception: invalid text, numeric out
            // of range, …) and 21 (cardinality violation: one statement
            // updating a row twice).
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("21")),
            _ => false,
        },
        Error::Sink(SinkError::Sqlite { source, .. }) => matches!(
            source.as_ref(),
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, rusqlite::ErrorCode::TypeMismatch | rusqlite::ErrorCode::TooBig)
        ),
        _ => false,
    }
}

/// Whether the rows of `events` pass the rollup SQL and (PostgreSQL) the
/// store; the error message when they do not.
async fn probe(
    events: &RecordBatch,
    aggregator: &mut RollupAggregator,
    store: &ServingStore,
) -> Result<(), String> {
    let outputs = aggregator
        .aggregate(std::slice::from_ref(events))
        .await
        .map_err(|e| e.to_string())?;
    store.probe_merge(&outputs).await.map_err(|e| e.to_string())
}

/// Row indexes of `events[range]` that fail on their own, with the message.
async fn failing(
    events: &RecordBatch,
    lo: usize,
    hi: usize,
    aggregator: &mut RollupAggregator,
    store: &ServingStore,
    out: &mut Vec<(usize, String)>,
) -> Result<(), Error> {
    // Iterative bisection (an explicit stack: async recursion needs boxing).
    let mut todo = vec![(lo, hi)];
    while let Some((lo, hi)) = todo.pop() {
        if lo >= hi {
            continue;
        }
        let slice = events.slice(lo, hi - lo);
        match probe(&slice, aggregator, store).await {
            Ok(()) => {}
            Err(message) if hi - lo == 1 => out.push((lo, message)),
            Err(_) => {
                let mid = lo + (hi - lo) / 2;
                todo.push((mid, hi));
                todo.push((lo, mid));
            }
        }
    }
    Ok(())
}

/// The batch without the events that make `cause` happen, those events as
/// dead letters; `None` when no single event fails alone (the error needs
/// several rows together, or is not about the data after all): the caller
/// then retries as for any store error.
pub(crate) async fn isolate(
    batch: &Batch,
    cause: &Error,
    aggregator: &mut RollupAggregator,
    store: &ServingStore,
) -> Result<Option<Batch>, Error> {
    let n = batch.events.num_rows();
    let mut bad = Vec::new();
    failing(&batch.events, 0, n, aggregator, store, &mut bad).await?;
    if bad.is_empty() {
        tracing::error!(error = %cause, rows = n, "a batch fails on its data, but no single event fails alone; retrying");
        return Ok(None);
    }
    let keep: BooleanArray = {
        let mut k = vec![true; n];
        for (i, _) in &bad {
            k[*i] = false;
        }
        k.into_iter().map(Some).collect()
    };
    let events = filter_record_batch(&batch.events, &keep)
        .map_err(|e| Error::Internal(format!("cannot remove poison rows from a batch: {e}")))?;
    let mut out = batch.clone();
    out.events = events;
    out.row_partitions = filtered(&batch.row_partitions, &keep);
    out.row_offsets = filtered(&batch.row_offsets, &keep);
    if let (Some(o), Some(from)) = (out.origins.as_mut(), batch.origins.as_ref()) {
        o.rows = filtered(&from.rows, &keep);
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    for (i, message) in &bad {
        let (partition, offset) = (
            batch.row_partitions.get(*i).copied().unwrap_or(-1),
            batch.row_offsets.get(*i).copied().unwrap_or(-1),
        );
        let payload = row_json(&batch.events, *i);
        crate::batch::rejects::rejected(
            partition,
            offset,
            RejectReason::RollupFailed.code(),
            message,
        );
        out.dead_letters.push(DeadLetter {
            reason: RejectReason::RollupFailed,
            detail: message.clone(),
            partition,
            offset,
            rejected_at_ms: now_ms,
            payload_bytes: payload.len(),
            payload,
        });
    }
    out.stats.accepted = out.stats.accepted.saturating_sub(bad.len() as u64);
    *out.stats
        .rejected
        .entry(RejectReason::RollupFailed)
        .or_default() += bad.len() as u64;
    Ok(Some(out))
}

fn filtered<T: Copy>(values: &[T], keep: &BooleanArray) -> Vec<T> {
    values
        .iter()
        .zip(keep.values().iter())
        .filter(|(_, k)| *k)
        .map(|(v, _)| *v)
        .collect()
}

/// One row as a JSON object of its decoded fields (the original bytes are
/// not kept past decoding).
fn row_json(events: &RecordBatch, row: usize) -> String {
    let slice = events.slice(row, 1);
    let mut buf = Vec::new();
    let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut buf);
    if writer.write(&slice).is_err() || writer.finish().is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).trim_end().to_string()
}
