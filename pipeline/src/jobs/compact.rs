//! `tally compact --before T`: rewrite the small raw files an older tally
//! wrote (a file per batch, partition and event hour, named by no manifest
//! entry) into the current layout: per partition and event hour, runs of
//! them in offset order become one file of up to half of
//! `storage.archive_file_bytes` of input, named by a manifest entry.
//!
//! Each rewrite is committed in the archive's protocol, safe while `tally
//! run` is live (`sink/serving/compaction.rs` for the record):
//! 1. record the new file and its manifest entry as `compacting` (so no
//!    sweep removes their staged copies), then write them staged (hidden);
//! 2. one transaction: the old files from `raw` to `compacted` (all of
//!    them or, if retention or another compaction changed one, nothing:
//!    the run is skipped), the new ones to `raw`/`manifest` and pending;
//! 3. rename the entry, then the file; forget them as pending;
//! 4. delete the old files, then their records.
//!
//! A crash leaves `compacting` records (their staged files are deleted at
//! the next start), pending files (renamed, as `tally run` does) or
//! `compacted` ones (deleted). Readers through tally (verify, backfill,
//! rebuild) are exact throughout; a reader of the raw glob sees a run's old
//! and new files both between steps 3 and 4 (milliseconds on a local disk).

use std::collections::BTreeMap;
use std::time::Instant;

use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::config::Settings;
use crate::error::internal;
use crate::failpoint::failpoint;
use crate::sink::archive::manifest::{entry_path, entry_path_of, ManifestEntry};
use crate::sink::archive::{file_name, raw_hour, staging_path, FileKind};
use crate::sink::serving::compaction::{COMPACTED, COMPACTING};
use crate::sink::{raw_path_range, ParquetArchiveSink, ServingStore, WrittenFile};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Default)]
pub struct CompactReport {
    /// Old files rewritten (and deleted).
    pub old_files: usize,
    /// New files written.
    pub new_files: usize,
    pub events: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Runs left alone: one of their files changed meanwhile.
    pub skipped: usize,
    /// What an earlier, crashed compaction left: files renamed or deleted.
    pub recovered: usize,
    pub seconds: f64,
}

pub async fn compact(settings: &Settings, before: i64) -> Result<CompactReport, crate::Error> {
    let started = Instant::now();
    let before = before.div_euclid(HOUR_MS) * HOUR_MS;
    let (schema, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let store = crate::pipeline::Stages::open_store(settings, &catalog).await?;
    let archive = crate::pipeline::Stages::archive(settings, &schema)?;
    let location = crate::sink::ArchiveLocation::open(&settings.storage)?;
    let ctx = SessionContext::new();
    location.register(&ctx)?;
    let mut report = CompactReport {
        recovered: recover(&store, &archive).await?,
        ..Default::default()
    };
    let cap = (settings.storage.archive_file_bytes.0 / 2).max(1);
    let first = match store.first_raw_path().await? {
        Some(p) => raw_hour(&p),
        None => None,
    };
    if let Some(first) = first.filter(|f| *f < before) {
        let first_day = first.div_euclid(DAY_MS) * DAY_MS;
        let days = (before - first_day + DAY_MS - 1) / DAY_MS;
        let mut progress = super::Progress::new("compact", days.max(0) as u64);
        let mut day = first_day;
        let mut run: u64 = 0;
        while day < before {
            let hi = (day + DAY_MS).min(before);
            let paths = store.raw_files(&raw_path_range(day, hi)).await?;
            let runs = legacy_runs(&store, &paths, cap).await?;
            for (topic, files) in runs {
                run += 1;
                // A token of its own per run: two runs of one offset range
                // (a batch's files on both sides of midnight) never share names.
                let token = format!("{}{run:08x}", archive.writer_token());
                let job = Run {
                    store: &store,
                    archive: &archive,
                    ctx: &ctx,
                    location: &location,
                    token: &token,
                };
                match job.rewrite(&topic, &files).await? {
                    Some(new) => {
                        report.old_files += files.len();
                        report.new_files += new.len();
                        report.events += new.iter().map(|f| f.rows).sum::<u64>();
                        report.bytes_before += files.iter().map(|f| f.bytes).sum::<u64>();
                        report.bytes_after += new.iter().map(|f| f.bytes).sum::<u64>();
                    }
                    None => report.skipped += 1,
                }
            }
            progress.step(&format!("{} done", crate::serve::http::fmt_time(day)));
            day += DAY_MS;
        }
        progress.finish();
    }
    store.close().await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The raw files among `paths` named by no recorded manifest entry, in runs
/// per (topic, partition): offset order, at most `cap` bytes of input each
/// (a run holds at least one file). (topic, files).
async fn legacy_runs(
    store: &ServingStore,
    paths: &[String],
    cap: u64,
) -> Result<Vec<(String, Vec<WrittenFile>)>, crate::Error> {
    let entries: Vec<String> = paths.iter().filter_map(|p| entry_path_of(p)).collect();
    let named = store.committed_among(&entries).await?;
    let legacy: Vec<String> = paths
        .iter()
        .filter(|p| entry_path_of(p).is_none_or(|e| !named.contains(&e)))
        .cloned()
        .collect();
    let mut by_partition: BTreeMap<(String, i32), Vec<WrittenFile>> = BTreeMap::new();
    for (topic, f) in store.raw_records(&legacy).await? {
        by_partition
            .entry((topic, f.partition))
            .or_default()
            .push(f);
    }
    Ok(runs_of(by_partition, cap))
}

fn runs_of(
    by_partition: BTreeMap<(String, i32), Vec<WrittenFile>>,
    cap: u64,
) -> Vec<(String, Vec<WrittenFile>)> {
    let mut runs = Vec::new();
    for ((topic, _), mut files) in by_partition {
        files.sort_by(|a, b| {
            (a.first_offset, a.last_offset, &a.path).cmp(&(b.first_offset, b.last_offset, &b.path))
        });
        let mut run: Vec<WrittenFile> = Vec::new();
        let mut bytes = 0;
        for f in files {
            if !run.is_empty() && bytes + f.bytes > cap {
                runs.push((topic.clone(), std::mem::take(&mut run)));
                bytes = 0;
            }
            bytes += f.bytes;
            run.push(f);
        }
        if !run.is_empty() {
            runs.push((topic, run));
        }
    }
    runs
}

/// What rewriting a run needs.
struct Run<'a> {
    store: &'a ServingStore,
    archive: &'a ParquetArchiveSink,
    ctx: &'a SessionContext,
    location: &'a crate::sink::ArchiveLocation,
    /// The writer token in the new files' names.
    token: &'a str,
}

impl Run<'_> {
    /// Rewrite one run of old files as one new file per hour directory,
    /// named by one manifest entry (steps 1 to 4). `None`: one of them
    /// changed meanwhile; nothing was changed.
    async fn rewrite(
        &self,
        topic: &str,
        old: &[WrittenFile],
    ) -> Result<Option<Vec<WrittenFile>>, crate::Error> {
        let store = self.store;
        let partition = old[0].partition;
        let first = old.iter().map(|f| f.first_offset).min().unwrap_or(0);
        let last = old.iter().map(|f| f.last_offset).max().unwrap_or(0);
        let name = file_name(topic, partition, first, last, self.token);
        let mut by_dir: BTreeMap<String, Vec<&WrittenFile>> = BTreeMap::new();
        for f in old {
            let dir = f.path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
            by_dir.entry(dir).or_default().push(f);
        }
        let stub = |path: String, kind: FileKind| WrittenFile {
            path,
            kind,
            partition,
            first_offset: first,
            last_offset: last,
            rows: 0,
            bytes: 0,
        };
        let entry_stub = stub(
            entry_path(topic, partition, first, last, self.token),
            FileKind::Manifest,
        );
        let mut new: Vec<WrittenFile> = by_dir
            .keys()
            .map(|d| stub(format!("{d}/{name}"), FileKind::Raw))
            .collect();
        let now = || chrono::Utc::now().timestamp_millis();
        // 1. The new names recorded, then the files staged.
        let mut names = vec![entry_stub.clone()];
        names.extend(new.iter().cloned());
        store.begin_compaction(topic, &names, now()).await?;
        let all: Vec<String> = names.iter().map(|f| f.path.clone()).collect();
        for (f, files) in new.iter_mut().zip(by_dir.values()) {
            let urls: Vec<String> = files.iter().map(|f| self.location.url(&f.path)).collect();
            let df = self
                .ctx
                .read_parquet(urls, ParquetReadOptions::default())
                .await
                .map_err(internal)?;
            let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(internal)?;
            f.rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            let recorded: u64 = files.iter().map(|f| f.rows).sum();
            if f.rows != recorded {
                abandon(store, self.archive, &all).await?;
                return Err(internal(format!(
                    "the files {} … hold {} rows, their records {}: left as they are",
                    files[0].path, f.rows, recorded
                )));
            }
            f.bytes = self
                .archive
                .stage_batches(&f.path, schema, &batches)
                .await?;
        }
        let entry = ManifestEntry::new(topic, partition, first, last, &new, None);
        let manifest = self.archive.stage_manifest_as(&entry, self.token).await?;
        failpoint("after_compaction_stage");
        // 2. The swap.
        let old_paths: Vec<String> = old.iter().map(|f| f.path.clone()).collect();
        let mut files = vec![manifest];
        files.extend(new.iter().cloned());
        if !store
            .commit_compaction(topic, &old_paths, &files, now())
            .await?
        {
            tracing::warn!(first = %old_paths[0], "an old file changed during compaction (retention?); this run is left as it was");
            abandon(store, self.archive, &all).await?;
            return Ok(None);
        }
        failpoint("after_compaction_commit");
        // 3. Rename: the entry first.
        self.archive.publish(&all).await?;
        store.finish_archive(topic, partition, &all).await?;
        // 4. The old files go.
        self.archive.delete(&old_paths).await?;
        store.forget_files_of_kind(&old_paths, COMPACTED).await?;
        Ok(Some(new))
    }
}

/// Delete the staged copies of `paths` and their `compacting` records.
async fn abandon(
    store: &ServingStore,
    archive: &ParquetArchiveSink,
    paths: &[String],
) -> Result<(), crate::Error> {
    let staged: Vec<String> = paths.iter().map(|p| staging_path(p)).collect();
    archive.delete(&staged).await?;
    store.forget_files_of_kind(paths, COMPACTING).await?;
    Ok(())
}

/// Finish what a crashed compaction left: pending files renamed (any
/// writer's: the roll forward `tally run` does too), `compacting` ones
/// deleted, `compacted` ones deleted. How many files.
async fn recover(
    store: &ServingStore,
    archive: &ParquetArchiveSink,
) -> Result<usize, crate::Error> {
    let mut n = 0;
    let mut pending: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    for (topic, partition, path) in store.all_pending().await? {
        pending.entry((topic, partition)).or_default().push(path);
    }
    for ((topic, partition), paths) in pending {
        archive.publish(&paths).await?;
        store.finish_archive(&topic, partition, &paths).await?;
        n += paths.len();
    }
    let compacting = store.files_of_kind(COMPACTING).await?;
    if !compacting.is_empty() {
        abandon(store, archive, &compacting).await?;
        n += compacting.len();
    }
    let compacted = store.files_of_kind(COMPACTED).await?;
    if !compacted.is_empty() {
        archive.delete(&compacted).await?;
        store.forget_files_of_kind(&compacted, COMPACTED).await?;
        n += compacted.len();
    }
    if n > 0 {
        tracing::warn!(files = n, "finished what an interrupted compaction left");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: i32, first: i64, bytes: u64) -> WrittenFile {
        WrittenFile {
            path: format!(
                "raw/events/dt=2026-01-01/hour=00/{}",
                file_name("t", p, first, first + 9, "ab")
            ),
            kind: FileKind::Raw,
            partition: p,
            first_offset: first,
            last_offset: first + 9,
            rows: 10,
            bytes,
        }
    }

    #[test]
    fn runs_follow_offsets_and_stop_at_the_cap() {
        let by_partition = BTreeMap::from([
            (
                ("t".to_string(), 0),
                vec![
                    file(0, 30, 40),
                    file(0, 0, 40),
                    file(0, 10, 40),
                    file(0, 20, 40),
                ],
            ),
            (("t".to_string(), 1), vec![file(1, 0, 500)]),
        ]);
        let runs = runs_of(by_partition, 100);
        let firsts: Vec<Vec<i64>> = runs
            .iter()
            .map(|(_, f)| f.iter().map(|f| f.first_offset).collect())
            .collect();
        // 40 + 40 fits 100, a third would not; a file over the cap is a run alone.
        assert_eq!(firsts, vec![vec![0, 10], vec![20, 30], vec![0]]);
        assert!(runs.iter().all(|(t, _)| t == "t"));
    }
}
