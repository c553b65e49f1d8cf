//! `tally replay --file events.jsonl`: the pipeline without a broker. Each
//! line is one message of partition 0 of a pseudo-topic (see
//! [`replay_topic`]), its offset the line number (from 0). Lines go through the same
//! decode -> batch -> archive + rollup SQL -> serving commit stages as
//! `tally run`, with the same offset fence, so a replay is exactly once: a
//! second run of the same file skips what was committed, and a replay killed
//! midway resumes where its last batch committed (its orphan files are
//! removed first). It backs the core-path benchmark and loads archives for
//! backfill benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::aggregate::RollupAggregator;
use crate::batch::{Batch, BatchBuilder};
use crate::config::Settings;
use crate::decode::RecordDecoder;
use crate::pipeline::{Committer, Done, Retry, Stages};

#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    pub topic: String,
    /// Lines committed before this run (skipped).
    pub skipped: u64,
    pub messages: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub batches: u64,
    pub seconds: f64,
}

use crate::error::internal as err;

fn clean(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The pseudo-topic of a replay: `replay.<source id>` when one is given,
/// else `replay.<file stem>.<hash of its first line>`. The first line, not
/// the name, tells two files apart (`day1/events.jsonl` and
/// `day2/events.jsonl`), while a file that grew at its end keeps its id, so
/// a second replay of it commits only the new lines. Characters outside
/// Kafka's topic alphabet are replaced.
pub fn replay_topic(file: &Path, source_id: Option<&str>) -> Result<String, crate::Error> {
    if let Some(id) = source_id {
        return Ok(format!("replay.{}", clean(id)));
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("file");
    let f = std::fs::File::open(file)
        .map_err(|e| crate::error::usage(format!("{}: {e}", file.display())))?;
    let mut first = Vec::new();
    std::io::BufReader::new(f)
        .take(64 * 1024)
        .read_until(b'\n', &mut first)
        .map_err(|e| err(format!("{}: {e}", file.display())))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &first {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("replay.{}.{:08x}", clean(stem), h >> 32))
}

pub async fn replay(
    settings: Settings,
    file: PathBuf,
    source_id: Option<String>,
) -> Result<ReplayReport, crate::Error> {
    let started = Instant::now();
    let stages = Stages::build(settings).await?;
    let Stages {
        settings,
        schema,
        catalog,
        store,
        archive,
    } = stages;
    let topic = replay_topic(&file, source_id.as_deref())?;
    // One replay of a source at a time: a second one would delete the
    // first one's files before they commit (below) and race its commits.
    let _lock = store.lock_source(&topic).await?.ok_or_else(|| {
        crate::error::usage(format!(
            "{}: another `tally replay` of {topic} is running against this serving store; wait for it (a replay resumes where the last one committed)",
            file.display()
        ))
    })?;
    // The archive commits later than the serving store: a replay resumes
    // at the lower of the two positions, re-reading what lies below the
    // serving offset for the archive only.
    let committed = store.load_offsets(&topic).await?.get(&0).copied();
    crate::pipeline::publish_pending(&archive, &store, &topic).await?;
    let archived = store.archive_positions(&topic).await?.get(&0).copied();
    let wanted: HashMap<i32, Option<i64>> = [(0, committed)].into_iter().collect();
    let archive_wanted: HashMap<i32, Option<i64>> = [(0, archived)].into_iter().collect();
    let removed = archive
        .remove_orphans(&topic, &wanted, &archive_wanted)
        .await?;
    if !removed.is_empty() {
        tracing::warn!(
            files = removed.len(),
            "removed archive files of a replay that did not commit"
        );
    }
    let mut aggregator = RollupAggregator::new(&catalog, schema.arrow.clone()).await?;
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let mut builder = BatchBuilder::new(
        decoder,
        &settings.batch,
        settings.decode.dlq_payload_bytes.as_usize(),
    );
    let max_rows = settings.batch.max_rows.max(1);
    builder.set_positions(
        [(
            0,
            crate::batch::Positions {
                archive: archived.or(committed),
                serve_from: committed.filter(|s| archived.is_some_and(|a| a < *s)),
            },
        )]
        .into_iter()
        .collect(),
    );
    let resume = match (archived, committed) {
        (Some(a), Some(s)) => Some(a.min(s)),
        (a, s) => s.or(a),
    };
    let mut raw = crate::pipeline::raw_writer(&settings, &archive, &topic)?;

    // Reader + decoder thread -> bounded channel -> committer (this task),
    // as in `tally run`: decoding the next batch overlaps the commit.
    let (tx, mut rx) = mpsc::channel::<Batch>(1);
    let reader_topic = topic.clone();
    let reader_file = file.clone();
    let reader = std::thread::Builder::new()
        .name("tally-replay-reader".into())
        .spawn(move || -> Result<u64, String> {
            let f = std::fs::File::open(&reader_file)
                .map_err(|e| format!("{}: {e}", reader_file.display()))?;
            let mut lines = std::io::BufReader::with_capacity(1 << 20, f);
            let start = resume.unwrap_or(0);
            let mut expected = resume;
            let mut offset: i64 = 0;
            let mut line = Vec::with_capacity(512);
            let mut pending = 0usize;
            let mut clock = crate::batch::WallClock::default();
            let mut now = Instant::now();
            let mut now_ms = clock.now_ms(now);
            loop {
                line.clear();
                let n = lines
                    .read_until(b'\n', &mut line)
                    .map_err(|e| format!("{}: {e}", reader_file.display()))?;
                if n == 0 {
                    break;
                }
                let this = offset;
                offset += 1;
                if this < start {
                    continue;
                }
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                // The clock is read every 256 lines (a file replays at about
                // a million lines a second, so that is well within a millisecond).
                if offset % 256 == 1 {
                    now = Instant::now();
                    now_ms = clock.now_ms(now);
                }
                builder.push(0, this, expected, Some(&line), now_ms, now);
                pending += 1;
                if pending >= max_rows {
                    let batch = builder
                        .seal(0, &reader_topic, now_ms, BTreeMap::new())
                        .map_err(|e| e.to_string())?;
                    expected = batch.archive.get(&0).map(|r| r.last + 1);
                    pending = 0;
                    if tx.blocking_send(batch).is_err() {
                        return Ok(start.max(0) as u64);
                    }
                }
            }
            if pending > 0 {
                let now_ms = chrono::Utc::now().timestamp_millis();
                let batch = builder
                    .seal(0, &reader_topic, now_ms, BTreeMap::new())
                    .map_err(|e| e.to_string())?;
                let _ = tx.blocking_send(batch);
            }
            Ok(start.max(0) as u64)
        })
        .map_err(err)?;

    let mut report = ReplayReport {
        topic: topic.clone(),
        ..ReplayReport::default()
    };
    let mut committer = Committer {
        aggregator: &mut aggregator,
        archive: &archive,
        raw: Some(&mut raw),
        store: &store,
        metrics: None,
    };
    while let Some(original) = rx.recv().await {
        // A person runs a replay: a store that stays down ends it with the
        // error (rerun it to resume), where `tally run` waits.
        let batch = match committer
            .commit(&original, Retry::Times(8), |_| true)
            .await?
        {
            Done::Committed {
                batch,
                archive_fenced,
                ..
            } if archive_fenced.is_empty() => batch,
            Done::Committed { archive_fenced, .. } => {
                return Err(crate::error::usage(format!(
                    "{}: another writer committed archive files of {topic} partitions {archive_fenced:?}; \
                     is another `tally replay` of the same file running?",
                    file.display()
                )));
            }
            Done::Fenced {
                partition,
                expected,
                stored,
                files,
            } => {
                crate::pipeline::discard_uncommitted(&archive, &store, files).await;
                return Err(crate::error::usage(format!(
                    "{}: the serving store has offset {stored:?} for {topic}:{partition}, this replay expected {expected:?}; \
                     is another `tally replay` of the same file running?",
                    file.display()
                )));
            }
            Done::Stale => continue,
        };
        report.batches += 1;
        report.messages += batch.stats.messages;
        report.accepted += batch.stats.accepted;
        report.rejected += batch.stats.rejected.values().sum::<u64>();
        if report.batches.is_multiple_of(20) {
            tracing::info!(
                messages = report.messages,
                batches = report.batches,
                "replay progress"
            );
        }
    }
    // The end of the file: commit every open archive file.
    let fenced = committer.flush_all(Retry::Times(8)).await?;
    raw.close_spool();
    if !fenced.is_empty() {
        return Err(crate::error::usage(format!(
            "{}: another writer committed archive files of {topic} partitions {fenced:?}; \
             is another `tally replay` of the same file running?",
            file.display()
        )));
    }
    report.skipped = reader
        .join()
        .map_err(|_| err("the replay reader thread panicked"))?
        .map_err(err)?;
    store.close().await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
