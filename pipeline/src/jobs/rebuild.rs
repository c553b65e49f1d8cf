//! `tally rebuild`: recreate a serving store from the archive alone.
//!
//! The archive's manifest (`sink/archive/manifest.rs`) names every committed
//! raw file with its partition and offset range. Into an empty store (a new
//! SQLite file, an empty PostgreSQL database) the rebuild records, in one
//! transaction:
//! - every file a visible entry names (renaming one still under its staging
//!   name: its entry is renamed first, so it was committed), and the
//!   entries themselves;
//! - each partition's next offset, for the counts and the archive alike:
//!   the end of its highest committed range;
//! - the dead-letter files below those offsets, and the counters the
//!   archive can tell (accepted, rejected by reason, messages, replayed);
//! - the dead letters `tally dlq replay` counted (the entries' origins);
//!
//! and then recomputes every rollup window from the recorded raw files
//! (`tally backfill`). A visible raw file that no entry names (written by a
//! tally from before the manifest, or left by one's crash) stops the
//! rebuild: only the old store can tell whether it is committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use crate::config::Settings;
use crate::error::usage;
use crate::sink::archive::manifest::ManifestEntry;
use crate::sink::archive::{parse_file_name, FileKind, DLQ_PREFIX, RAW_PREFIX};
use crate::sink::serving::restore::Restore;
use crate::sink::WrittenFile;

const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, Default)]
pub struct RebuildReport {
    /// Manifest entries read.
    pub entries: usize,
    pub raw_files: usize,
    pub events: u64,
    pub dead_letter_files: usize,
    pub dead_letters: u64,
    /// Committed files found under their staging names, renamed.
    pub renamed: usize,
    /// Files named by an entry and gone by archive retention.
    pub pruned: usize,
    /// (topic, partition, next offset).
    pub offsets: Vec<(String, i32, i64)>,
    /// Offsets no entry covers (an `offsets reset`, retention), for the log.
    pub gaps: Vec<String>,
    pub rollup_rows: u64,
    pub seconds: f64,
}

/// What the archive's listing holds, by final path.
#[derive(Debug, Default)]
struct Listing {
    /// Visible files and their sizes.
    visible: HashMap<String, u64>,
    /// Final paths of hidden staged files (`.<name>.inprogress`).
    staged: HashSet<String>,
}

impl Listing {
    fn of(objects: Vec<(String, u64)>) -> Listing {
        let mut l = Listing::default();
        for (path, size) in objects {
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if let Some(core) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".inprogress"))
            {
                l.staged.insert(format!("{dir}/{core}"));
            } else if !name.starts_with('.') && !name.contains('#') && name.ends_with(".parquet") {
                l.visible.insert(path, size);
            }
        }
        l
    }
}

/// What the rebuild records, decided from the listings alone.
#[derive(Debug, Default)]
struct Plan {
    restore: Restore,
    /// Staged files to rename first, per entry (entry path first).
    rename: Vec<Vec<String>>,
    /// Dead-letter files to record: (topic, path, size, partition, first, last).
    dead_letters: Vec<(String, String, u64, i32, i64, i64)>,
    pruned: usize,
    gaps: Vec<String>,
}

use crate::sink::archive::raw_hour as hour_of;

fn plan(
    entries: &[(String, ManifestEntry)],
    raw: &Listing,
    dlq: &Listing,
    archive_horizon: Option<i64>,
) -> Result<Plan, crate::Error> {
    let named: HashSet<&str> = entries
        .iter()
        .flat_map(|(_, e)| e.files.iter().map(|f| f.path.as_str()))
        .collect();
    let mut unlisted: Vec<&String> = raw
        .visible
        .keys()
        .filter(|p| !named.contains(p.as_str()))
        .collect();
    if !unlisted.is_empty() {
        unlisted.sort();
        return Err(usage(format!(
            "{} raw archive files are named by no manifest entry (for example {}): a tally from before the archive \
             kept its own record wrote them, or one of its crashes left them, and only the serving store that lists \
             them can tell which are committed. Nothing was changed. Fix: with that store, run `tally compact --before \
             <now>` first (it rewrites them into files the manifest names); without it, move them out of the archive \
             (their events are then not counted)",
            unlisted.len(),
            unlisted[0]
        )));
    }
    let mut p = Plan::default();
    let mut ranges: BTreeMap<(String, i32), Vec<(i64, i64)>> = BTreeMap::new();
    for (entry_path, e) in entries {
        let mut rename = vec![entry_path.clone()];
        p.restore.files.push((
            e.topic.clone(),
            WrittenFile {
                path: entry_path.clone(),
                kind: FileKind::Manifest,
                partition: e.partition,
                first_offset: e.first_offset,
                last_offset: e.last_offset,
                rows: 0,
                bytes: 0,
            },
        ));
        for f in &e.files {
            if !raw.visible.contains_key(&f.path) {
                if raw.staged.contains(&f.path) {
                    rename.push(f.path.clone());
                } else if hour_of(&f.path)
                    .zip(archive_horizon)
                    .is_some_and(|(h, horizon)| h < horizon)
                {
                    p.pruned += 1;
                    continue;
                } else {
                    return Err(usage(format!(
                        "the archive's manifest entry {entry_path} names {} (committed), which is missing: the archive \
                         lost a file, so a rebuild would undercount. Nothing was changed. Fix: restore the file from a \
                         backup of the archive (or its bucket's versions)",
                        f.path
                    )));
                }
            }
            p.restore.files.push((
                e.topic.clone(),
                WrittenFile {
                    path: f.path.clone(),
                    kind: FileKind::Raw,
                    partition: e.partition,
                    first_offset: e.first_offset,
                    last_offset: e.last_offset,
                    rows: f.rows,
                    bytes: f.bytes,
                },
            ));
        }
        if rename.len() > 1 {
            p.rename.push(rename);
        }
        if let Some(o) = &e.origins {
            p.restore.replayed.extend(
                o.rows
                    .iter()
                    .map(|(part, off)| (o.topic.clone(), *part, *off)),
            );
        }
        ranges
            .entry((e.topic.clone(), e.partition))
            .or_default()
            .push((e.first_offset, e.last_offset));
    }
    for ((topic, partition), mut r) in ranges {
        r.sort();
        for w in r.windows(2) {
            if w[1].0 != w[0].1 + 1 {
                p.gaps.push(format!(
                    "{topic} partition {partition}: offsets {}..{} then {}..{}",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        let next = r.iter().map(|x| x.1).max().unwrap_or(-1) + 1;
        p.restore.offsets.push((topic, partition, next));
    }
    let next: HashMap<(String, i32), i64> = p
        .restore
        .offsets
        .iter()
        .map(|(t, part, n)| ((t.clone(), *part), *n))
        .collect();
    let mut dead: Vec<(&String, &u64)> = dlq.visible.iter().collect();
    dead.sort();
    for (path, size) in dead {
        let Some((topic, part, first, last, _)) =
            parse_file_name(path.rsplit('/').next().unwrap_or(""))
        else {
            continue;
        };
        // Below the next offset: committed. Beyond it the messages are read
        // again, and their dead letters written again.
        if next.get(&(topic.clone(), part)).is_some_and(|n| last < *n) {
            p.dead_letters
                .push((topic, path.clone(), *size, part, first, last));
        }
    }
    Ok(p)
}

pub async fn rebuild(settings: &Settings) -> Result<RebuildReport, crate::Error> {
    let started = Instant::now();
    let (schema, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let store = crate::pipeline::Stages::open_store(settings, &catalog).await?;
    let url = crate::sink::serving::redact(store.url());
    if !store.is_empty().await? {
        store.close().await;
        return Err(usage(format!(
            "the serving store ({url}) is not empty: `tally rebuild` writes only into an empty store (a new SQLite \
             file, an empty PostgreSQL database), so it never mixes two histories. Nothing was changed. Fix: point \
             serving.url (or TALLY__SERVING__URL) at a new store"
        )));
    }
    let archive = crate::pipeline::Stages::archive(settings, &schema)?;
    let mut progress = super::Progress::new("rebuild", 5);
    let entries = archive.manifest_entries().await?;
    let raw = Listing::of(archive.list_all(RAW_PREFIX).await?);
    let dlq = Listing::of(archive.list_all(DLQ_PREFIX).await?);
    progress.step(&format!(
        "{} manifest entries, {} raw and {} dead-letter files listed",
        entries.len(),
        raw.visible.len(),
        dlq.visible.len()
    ));
    let now = chrono::Utc::now().timestamp_millis();
    let horizon = crate::pipeline::retention::archive_horizon(settings, now);
    let mut plan = plan(&entries, &raw, &dlq, horizon)?;

    // Roll forward what a crash left between an entry's rename and its files'.
    for paths in &plan.rename {
        archive.publish(paths).await?;
    }
    let mut report = RebuildReport {
        entries: entries.len(),
        renamed: plan.rename.iter().map(|r| r.len() - 1).sum(),
        pruned: plan.pruned,
        gaps: plan.gaps.clone(),
        ..Default::default()
    };
    for (_, f) in &plan.restore.files {
        if f.kind == FileKind::Raw {
            report.raw_files += 1;
            report.events += f.rows;
        }
    }
    // Dead letters: their rows from the footers, their reasons counted.
    let mut dead_paths = Vec::new();
    for (topic, path, size, partition, first, last) in &plan.dead_letters {
        let rows = archive.parquet_rows(path, *size).await?;
        report.dead_letters += rows;
        dead_paths.push(path.clone());
        plan.restore.files.push((
            topic.clone(),
            WrittenFile {
                path: path.clone(),
                kind: FileKind::DeadLetter,
                partition: *partition,
                first_offset: *first,
                last_offset: *last,
                rows,
                bytes: *size,
            },
        ));
    }
    report.dead_letter_files = dead_paths.len();
    let rejected = rejected_by_reason(settings, &dead_paths).await?;
    progress.step(&format!(
        "{} dead-letter files read",
        report.dead_letter_files
    ));
    plan.restore.counters = counters(&plan.restore, &rejected);
    plan.restore.now_ms = now;
    store.restore(&plan.restore).await?;
    store.close().await;
    report.offsets = plan.restore.offsets.clone();
    progress.step("files, offsets and counters recorded");

    // Every window the recorded raw files touch, whole windows of every rollup.
    let hours: Vec<i64> = plan
        .restore
        .files
        .iter()
        .filter(|(_, f)| f.kind == FileKind::Raw)
        .filter_map(|(_, f)| hour_of(&f.path))
        .collect();
    if let (Some(lo), Some(hi)) = (hours.iter().min(), hours.iter().max()) {
        let widest = catalog
            .rollups
            .iter()
            .map(|d| d.window_ms.max(1))
            .max()
            .unwrap_or(HOUR_MS);
        let from = lo.div_euclid(widest) * widest - widest;
        let to = (hi + HOUR_MS).div_euclid(widest) * widest + 2 * widest;
        let b = super::backfill::backfill(settings, from, to, None).await?;
        report.rollup_rows = b.rows_written;
    }
    progress.step("rollups recomputed");
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Dead letters by reason code in `files`.
async fn rejected_by_reason(
    settings: &Settings,
    files: &[String],
) -> Result<BTreeMap<String, i64>, crate::Error> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};
    let err = crate::error::internal;
    let mut out = BTreeMap::new();
    if files.is_empty() {
        return Ok(out);
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
    let batches = ctx
        .sql("SELECT reason, count(*) FROM dlq GROUP BY reason")
        .await
        .map_err(err)?
        .collect()
        .await
        .map_err(err)?;
    for b in &batches {
        let reasons = b.column(0).as_string::<i32>();
        let counts = b.column(1).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            out.insert(reasons.value(i).to_string(), counts.value(i));
        }
    }
    Ok(out)
}

/// The counters the archive can tell: accepted (every archived event),
/// rejected by reason, messages (both, but for dead letters counted again by
/// `tally dlq replay`), replayed. Late arrivals are not in the archive.
fn counters(r: &Restore, rejected: &BTreeMap<String, i64>) -> Vec<(String, i64)> {
    let mut accepted = 0i64;
    let mut replayed = 0i64;
    for (topic, f) in &r.files {
        if f.kind == FileKind::Raw {
            accepted += f.rows as i64;
            if topic.starts_with("dlq.") {
                replayed += f.rows as i64;
            }
        }
    }
    let rejected_total: i64 = rejected.values().sum();
    let mut out = vec![
        ("accepted_total".to_string(), accepted),
        (
            "messages_total".to_string(),
            accepted - replayed + rejected_total,
        ),
    ];
    if replayed > 0 {
        out.push(("dlq_replayed_total".to_string(), replayed));
    }
    for (reason, n) in rejected {
        out.push((format!("rejected_total.{reason}"), *n));
    }
    out
}

#[cfg(test)]
mod tests;
