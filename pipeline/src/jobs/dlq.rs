//! `tally dlq replay`: dead letters back through the pipeline after a schema
//! or config fix, exactly once.
//!
//! The committed dead letters of the topic (`tally_files`, kind `dlq`) that
//! match the filters and are not yet counted are read from the archive and
//! pushed, in (partition, offset) order, through the same decode -> batch
//! -> archive + rollup SQL -> serving commit stages as `tally replay`. They
//! are messages of partition 0 of the pseudo-topic `dlq.<topic>`, whose
//! offsets continue from its stored next offset, so the offset fence and the
//! orphan cleanup work as for any replay. Each batch's transaction also
//! records the original (partition, offset) of every letter it counts in
//! `tally_dlq_replayed`; the next replay leaves those out. A letter rejected
//! again stays where it is (it is reported, not written a second time) and
//! can be replayed after the next fix. A payload cut at
//! `decode.dlq_payload_bytes` cannot be resent and is reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Int32Type, Int64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::aggregate::RollupAggregator;
use crate::batch::{Batch, BatchBuilder, Origins};
use crate::config::Settings;
use crate::decode::{RecordDecoder, RejectReason};
use crate::error::internal as err;
use crate::pipeline::{Committer, Done, Retry, Stages};

/// What `tally dlq replay` selects.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Rejected at or after (epoch ms).
    pub from: Option<i64>,
    /// Rejected before (epoch ms).
    pub to: Option<i64>,
    /// Only these reason codes (all when empty).
    pub reasons: Vec<String>,
    /// Decode the selected letters and report, write nothing.
    pub dry_run: bool,
}

#[derive(Debug, Default, Clone)]
pub struct DlqReport {
    pub topic: String,
    /// Dead letters matching the selection.
    pub matched: u64,
    /// Counted by an earlier replay (left out).
    pub already: u64,
    /// Payload cut at `decode.dlq_payload_bytes`: cannot be resent.
    pub truncated: u64,
    /// Counted now.
    pub accepted: u64,
    /// Rejected again, by reason.
    pub still_rejected: BTreeMap<String, u64>,
    pub batches: u64,
    pub seconds: f64,
}

/// One dead letter to resend.
struct Letter {
    partition: i32,
    offset: i64,
    payload: String,
}

/// The pseudo-topic the letters of `topic` are replayed as.
pub fn replay_topic(topic: &str) -> String {
    format!("dlq.{topic}")
}

fn check_reasons(reasons: &[String]) -> Result<(), crate::Error> {
    for r in reasons {
        if !RejectReason::ALL.iter().any(|k| k.code() == r) {
            let valid: Vec<&str> = RejectReason::ALL.iter().map(|k| k.code()).collect();
            return Err(crate::error::usage(format!(
                "--reason {r:?} is not a rejection reason; use one of {}",
                valid.join(", ")
            )));
        }
    }
    Ok(())
}

pub async fn replay(settings: Settings, selection: Selection) -> Result<DlqReport, crate::Error> {
    let started = Instant::now();
    check_reasons(&selection.reasons)?;
    let Stages {
        settings,
        schema,
        catalog,
        store,
        archive,
    } = Stages::build(settings).await?;
    let topic = settings.kafka.topic.clone();
    let pseudo = replay_topic(&topic);
    // One replay of the dead letters at a time: a second one would select
    // the same letters before the first one records them.
    // (A dry run writes nothing and needs no lock.)
    let _lock = if selection.dry_run {
        None
    } else {
        Some(store.lock_source(&pseudo).await?.ok_or_else(|| {
            crate::error::usage(format!(
                "another `tally dlq replay` of {topic} is running against this serving store; wait for it"
            ))
        })?)
    };
    let mut report = DlqReport {
        topic: topic.clone(),
        ..DlqReport::default()
    };

    let files = store.dlq_files(&topic).await?;
    let letters = read_letters(&settings, &files, &topic, &selection).await?;
    report.matched = letters.len() as u64;
    let done: HashSet<(i32, i64)> = store.replayed_letters(&topic).await?.into_iter().collect();
    let mut todo = Vec::with_capacity(letters.len());
    let mut seen = HashSet::new();
    for (letter, whole) in letters {
        let id = (letter.partition, letter.offset);
        if done.contains(&id) || !seen.insert(id) {
            report.already += 1;
        } else if !whole {
            report.truncated += 1;
        } else {
            todo.push(letter);
        }
    }

    if selection.dry_run {
        // What a replay would count now: each letter decoded as it would be.
        let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
        let mut scratch = schema.new_columns(1024);
        let now_ms = chrono::Utc::now().timestamp_millis();
        for letter in &todo {
            match decoder.decode(Some(letter.payload.as_bytes()), now_ms, &mut scratch) {
                Ok(_) => report.accepted += 1,
                Err(r) => {
                    *report
                        .still_rejected
                        .entry(r.reason.code().to_string())
                        .or_default() += 1
                }
            }
            if scratch.len() >= 1024 {
                scratch.finish().map_err(err)?;
            }
        }
        store.close().await;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let committed = store.load_offsets(&pseudo).await?.get(&0).copied();
    let wanted: HashMap<i32, Option<i64>> = [(0, committed)].into_iter().collect();
    crate::pipeline::publish_pending(&archive, &store, &pseudo).await?;
    let removed = archive.remove_orphans(&pseudo, &wanted, &wanted).await?;
    if !removed.is_empty() {
        tracing::warn!(
            files = removed.len(),
            "removed archive files of a dead-letter replay that did not commit"
        );
    }
    let mut aggregator = RollupAggregator::new(&catalog, schema.arrow.clone()).await?;
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let mut builder = BatchBuilder::new(
        decoder,
        &settings.batch,
        settings.decode.dlq_payload_bytes.as_usize(),
    );
    let mut committer = Committer {
        aggregator: &mut aggregator,
        archive: &archive,
        raw: None,
        store: &store,
        metrics: None,
    };
    let max_rows = settings.batch.max_rows.max(1);
    let mut expected = committed;
    let mut next = committed.unwrap_or(0);
    let mut progress = super::Progress::new("dlq replay", todo.len().div_ceil(max_rows) as u64);
    for chunk in todo.chunks(max_rows) {
        let now = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut origins = Vec::with_capacity(chunk.len());
        for letter in chunk {
            let before = builder.rows();
            builder.push(
                0,
                next,
                expected,
                Some(letter.payload.as_bytes()),
                now_ms,
                now,
            );
            if builder.rows() > before {
                origins.push((letter.partition, letter.offset));
            }
            next += 1;
        }
        let mut batch = builder
            .seal(0, &pseudo, now_ms, BTreeMap::new())
            .map_err(err)?;
        expected = batch.partitions.get(&0).map(|r| r.next_offset());
        for dl in std::mem::take(&mut batch.dead_letters) {
            *report
                .still_rejected
                .entry(dl.reason.code().to_string())
                .or_default() += 1;
        }
        batch.origins = Some(Origins {
            topic: topic.clone(),
            rows: origins,
        });
        let committed = commit(&mut committer, &batch, &pseudo).await?;
        report.accepted += committed.origins.as_ref().map_or(0, |o| o.rows.len()) as u64;
        report.batches += 1;
        progress.step(&format!("{} accepted so far", report.accepted));
    }
    progress.finish();
    store.close().await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn commit(
    committer: &mut Committer<'_>,
    batch: &Batch,
    pseudo: &str,
) -> Result<Batch, crate::Error> {
    match committer.commit(batch, Retry::Times(8), |_| true).await? {
        Done::Committed { batch, .. } => Ok(batch.into_owned()),
        Done::Fenced {
            partition,
            expected,
            stored,
            files,
        } => {
            crate::pipeline::discard_uncommitted(committer.archive, committer.store, files).await;
            Err(crate::error::usage(format!(
                "the serving store has offset {stored:?} for {pseudo}:{partition}, this replay expected {expected:?}; \
                 is another `tally dlq replay` running?"
            )))
        }
        Done::Stale => Err(err("a dead-letter replay batch went stale")),
    }
}

/// The committed dead letters of `topic` matching `selection`, in
/// (partition, offset) order, each with whether its payload is whole.
async fn read_letters(
    settings: &Settings,
    files: &[String],
    topic: &str,
    selection: &Selection,
) -> Result<Vec<(Letter, bool)>, crate::Error> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = SessionContext::new();
    let location = crate::sink::ArchiveLocation::open(&settings.storage)?;
    location.register(&ctx)?;
    let paths: Vec<String> = files.iter().map(|p| location.url(p)).collect();
    let schema = crate::sink::dead_letter_schema();
    let df = ctx
        .read_parquet(paths, ParquetReadOptions::default().schema(&schema))
        .await
        .map_err(err)?;
    ctx.register_table("dlq", df.into_view()).map_err(err)?;
    let mut filters = vec![format!("topic = '{}'", topic.replace('\'', "''"))];
    if let Some(from) = selection.from {
        filters.push(format!("rejected_at >= to_timestamp_millis({from})"));
    }
    if let Some(to) = selection.to {
        filters.push(format!("rejected_at < to_timestamp_millis({to})"));
    }
    if !selection.reasons.is_empty() {
        // Codes were checked against the known reasons: no quoting needed.
        let list: Vec<String> = selection.reasons.iter().map(|r| format!("'{r}'")).collect();
        filters.push(format!("reason IN ({})", list.join(", ")));
    }
    let sql = format!(
        "SELECT partition, \"offset\", payload, payload_bytes FROM dlq WHERE {} ORDER BY partition, \"offset\"",
        filters.join(" AND ")
    );
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)?;
    let mut out = Vec::new();
    for b in &batches {
        let partition = b.column(0).as_primitive::<Int32Type>();
        let offset = b.column(1).as_primitive::<Int64Type>();
        let payload = b.column(2).as_string::<i32>();
        let bytes = b.column(3).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            let text = payload.value(i);
            let whole = !payload.is_null(i) && bytes.value(i) == text.len() as i64;
            out.push((
                Letter {
                    partition: partition.value(i),
                    offset: offset.value(i),
                    payload: text.to_string(),
                },
                whole,
            ));
        }
    }
    Ok(out)
}
