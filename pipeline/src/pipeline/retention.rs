//! Retention: every `retention.interval`, `tally run` deletes what
//! `[retention]` no longer keeps: rollup rows whose window starts before the
//! rollup's horizon (now minus its retention, aligned down to its window), and
//! dead-letter and raw archive files of whole UTC days before theirs. The API
//! and the jobs compute the same horizons from the same config, so nothing
//! ever reads a range that may have been pruned (`serve/tiers.rs`,
//! `jobs/verify.rs`).
//!
//! Files: the record in `tally_files` goes first, then the object. A crash in
//! between leaves an unrecorded file, which the orphan sweep deletes like any
//! other; the reverse order could leave a record of a missing file.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::aggregate::SqlCatalog;
use crate::config::{Keep, Settings};
use crate::metrics::Metrics;
use crate::sink::archive::{DLQ_PREFIX, RAW_PREFIX};
use crate::sink::{ParquetArchiveSink, ServingStore};

const DAY_MS: i64 = 86_400_000;

/// What one pruning run deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Pruned {
    /// (rollup, rows deleted).
    pub rows: Vec<(String, u64)>,
    pub dead_letter_files: u64,
    pub raw_files: u64,
}

/// The oldest window start of `rollup` that is kept at `now_ms`.
pub(crate) fn rollup_horizon(
    settings: &Settings,
    rollup: &str,
    window_ms: i64,
    now_ms: i64,
) -> Option<i64> {
    settings.retention.rollup(rollup).horizon(now_ms, window_ms)
}

/// The oldest event time the raw archive keeps at `now_ms` (a UTC day).
pub(crate) fn archive_horizon(settings: &Settings, now_ms: i64) -> Option<i64> {
    settings.retention.archive.horizon(now_ms, DAY_MS)
}

/// `YYYY-MM-DD` of an epoch-ms time.
fn day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// One pruning pass at `now_ms`.
pub(crate) async fn prune(
    settings: &Settings,
    catalog: &SqlCatalog,
    store: &ServingStore,
    archive: &ParquetArchiveSink,
    now_ms: i64,
) -> Result<Pruned, crate::Error> {
    let mut out = Pruned::default();
    for def in &catalog.rollups {
        let Some(before) = rollup_horizon(settings, &def.name, def.window_ms, now_ms) else {
            continue;
        };
        // The backfill's window replacement with nothing to insert: one
        // transaction per rollup, its table and (SQLite) its delta.
        let tx = store.begin_replace().await?;
        let deleted = store
            .replace_windows(tx, &[(def.clone(), i64::MIN, before)], &[])
            .await?;
        out.rows.push((def.name.clone(), deleted));
    }
    for (keep, prefix, count) in [
        (
            settings.retention.dead_letters,
            DLQ_PREFIX,
            &mut out.dead_letter_files,
        ),
        (settings.retention.archive, RAW_PREFIX, &mut out.raw_files),
    ] {
        let Some(before) = keep.horizon(now_ms, DAY_MS) else {
            continue;
        };
        // Paths put the day first: the days before `before` are one range.
        let range = (
            format!("{prefix}/dt="),
            format!("{prefix}/dt={}/", day(before)),
        );
        loop {
            let paths = store.files_in_range(&range).await?;
            if paths.is_empty() {
                break;
            }
            store.forget_files(&paths).await?;
            archive.delete(&paths).await?;
            *count += paths.len() as u64;
        }
    }
    Ok(out)
}

/// `tally run`'s pruning task: a pass every `retention.interval`, the first
/// one right away.
pub(crate) async fn run_periodically(
    settings: Settings,
    catalog: Arc<SqlCatalog>,
    store: ServingStore,
    archive: ParquetArchiveSink,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let keeps_all = settings
        .retention
        .rollups
        .values()
        .all(|k| *k == Keep::Forever)
        && settings.retention.dead_letters == Keep::Forever
        && settings.retention.archive == Keep::Forever;
    if keeps_all {
        return;
    }
    tokio::pin!(shutdown);
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        match prune(&settings, &catalog, &store, &archive, now).await {
            Ok(p) => {
                metrics.retention_runs.fetch_add(1, Ordering::Relaxed);
                metrics.retention_pruned(&p.rows, p.dead_letter_files, p.raw_files);
                if p.rows.iter().any(|(_, n)| *n > 0) || p.dead_letter_files + p.raw_files > 0 {
                    tracing::info!(rows = ?p.rows, dead_letter_files = p.dead_letter_files, raw_files = p.raw_files, "retention: pruned");
                }
            }
            Err(e) => {
                metrics.retention_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "retention: pruning failed; retrying at the next interval");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.retention.interval) => {}
            _ = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::batch::PartitionRange;
    use crate::sink::archive::FileKind;
    use crate::sink::{CommitOutcome, CommitRequest, WrittenFile};

    /// Minute rows kept 14 days, dead letters 2 days, the
    /// archive 3 days: one pass deletes exactly what is older, rows and files
    /// (record and object), and a second pass finds nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_deletes_exactly_what_retention_no_longer_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(
            dir.path(),
            &[
                ("TALLY__RETENTION__ROLLUPS__MINUTE_VIDEO_EVENTS", "14d"),
                ("TALLY__RETENTION__DEAD_LETTERS", "2d"),
                ("TALLY__RETENTION__ARCHIVE", "3d"),
            ],
        );
        let now = chrono::Utc::now().timestamp_millis();
        let event = |ago: i64| {
            format!(
                r#"{{"video_id":"v","event_type":"view","event_time":{},"value":1}}"#,
                now - ago
            )
        };
        let payloads = vec![event(20 * DAY_MS), event(20 * DAY_MS), event(3_600_000)];
        let (catalog, _) = crate::testing::seed(&settings, &payloads, now, 2).await;
        let store = ServingStore::open(&settings.serving_url(), &catalog.rollups)
            .await
            .unwrap();
        let archive = ParquetArchiveSink::local(&settings.storage.data_dir, 2, 1).unwrap();
        let path = |prefix: &str, ago: i64, name: &str| {
            let t = chrono::DateTime::from_timestamp_millis(now - ago).unwrap();
            match prefix {
                RAW_PREFIX => format!("{prefix}/{}/{name}", t.format("dt=%Y-%m-%d/hour=%H")),
                _ => format!("{prefix}/{}/{name}", t.format("dt=%Y-%m-%d")),
            }
        };
        let files: Vec<WrittenFile> = [
            (path(RAW_PREFIX, 5 * DAY_MS, "old.parquet"), FileKind::Raw),
            (path(RAW_PREFIX, DAY_MS, "new.parquet"), FileKind::Raw),
            (
                path(DLQ_PREFIX, 5 * DAY_MS, "old.parquet"),
                FileKind::DeadLetter,
            ),
            (path(DLQ_PREFIX, 0, "new.parquet"), FileKind::DeadLetter),
        ]
        .into_iter()
        .map(|(path, kind)| {
            let full = settings.storage.data_dir.join(&path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, b"x").unwrap();
            WrittenFile {
                path,
                kind,
                partition: 0,
                first_offset: 100,
                last_offset: 100,
                rows: 1,
                bytes: 1,
            }
        })
        .collect();
        let partitions = [(
            0,
            PartitionRange {
                expected_start: Some(3),
                first: 3,
                last: 3,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic: &settings.kafka.topic,
            partitions: &partitions,
            outputs: &[],
            files: &files,
            counters: &[],
            max_event_ms: &Default::default(),
            caught_up: &Default::default(),
            sealed_at_ms: now,
            now_ms: now,
            replayed: None,
            open_hours: &[],
            archive_with_batch: true,
        };
        assert_eq!(store.commit(&req).await.unwrap(), CommitOutcome::Committed);

        let minute = catalog.get("minute_video_events").unwrap();
        let hour = catalog.get("hour_video_events").unwrap();
        let rows = |def| store.read_rows(def, i64::MIN, i64::MAX, None);
        assert_eq!(rows(minute).await.unwrap().len(), 2);
        let p = prune(&settings, &catalog, &store, &archive, now)
            .await
            .unwrap();
        // Minute: the 20-day-old window (2 events) went; hour rows stay.
        assert!(
            p.rows.contains(&("minute_video_events".to_string(), 1)),
            "{p:?}"
        );
        assert_eq!(rows(minute).await.unwrap().len(), 1);
        assert_eq!(rows(hour).await.unwrap().len(), 2);
        assert_eq!((p.raw_files, p.dead_letter_files), (1, 1));
        let recorded = store
            .files_in_range(&(String::new(), "~".to_string()))
            .await
            .unwrap();
        let mut kept: Vec<&str> = files[1..]
            .iter()
            .step_by(2)
            .map(|f| f.path.as_str())
            .collect();
        kept.sort_unstable();
        assert_eq!(recorded, kept);
        for f in &files {
            let exists = settings.storage.data_dir.join(&f.path).exists();
            assert_eq!(exists, kept.contains(&f.path.as_str()), "{}", f.path);
        }
        let again = prune(&settings, &catalog, &store, &archive, now)
            .await
            .unwrap();
        assert!(
            again.rows.iter().all(|(_, n)| *n == 0)
                && again.raw_files + again.dead_letter_files == 0
        );
        store.close().await;
    }
}
