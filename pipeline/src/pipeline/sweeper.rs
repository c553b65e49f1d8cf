//! The orphan sweep of `tally run` (see [`OrphanSweeper`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::metrics::Metrics;
use crate::sink::archive::SweepScope;
use crate::sink::{ParquetArchiveSink, ServingStore};
use crate::source::ConsumerControl;

/// Deletes archive files of batches that can never commit (left by a crash
/// or a fenced zombie; see `ParquetArchiveSink::remove_dead`). Each owned
/// partition is swept after its first commit since assignment, then every
/// `storage.orphan_sweep_interval`: an orphan can appear after a sweep, since
/// S3 may still apply a PUT that a killed process had sent. Sweeps read the
/// stored offsets and run one at a time. The first one after an assignment
/// finishes before the next commit, as before; periodic ones run in the
/// background, so a long listing never delays a commit. A failed sweep is
/// retried within 30 s; shutdown waits for a running one.
///
/// The first sweep after an assignment, and one a day after it, lists the
/// whole archive. The others look only at files modified since an hour
/// before the partition's previous sweep started, in the directories such
/// files can be in (see `SweepScope::Since`), so their cost follows the
/// write rate, not the size of the archive.
pub(super) struct OrphanSweeper {
    topic: String,
    interval: Duration,
    max_event_age: Duration,
    /// Owned partitions past their first commit.
    owned: std::collections::HashMap<i32, SweepState>,
    running: Option<tokio::task::JoinHandle<Result<Swept, Vec<i32>>>>,
}

#[derive(Debug, Clone, Copy)]
struct SweepState {
    /// When the next sweep is due.
    due: Instant,
    /// Start (epoch ms) of the last sweep that succeeded; `None`: none since assignment.
    swept_ms: Option<i64>,
    /// When the last full sweep started.
    full_at: Option<Instant>,
}

/// A sweep that succeeded.
struct Swept {
    partitions: Vec<i32>,
    started_ms: i64,
    started: Instant,
    full: bool,
}

/// Between two sweeps of the whole archive.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(24 * 3600);
/// How far before the previous sweep a bounded sweep looks: S3 dates an
/// object by the start of its upload, and clocks differ.
const SWEEP_OVERLAP_MS: i64 = 3_600_000;

impl OrphanSweeper {
    pub(super) fn new(topic: &str, interval: Duration, max_event_age: Duration) -> Self {
        OrphanSweeper {
            topic: topic.to_string(),
            interval,
            max_event_age,
            owned: Default::default(),
            running: None,
        }
    }

    /// Called after every committed batch (heartbeats too).
    pub(super) async fn after_commit(
        &mut self,
        batch: &Batch,
        control: &ConsumerControl,
        archive: &ParquetArchiveSink,
        store: &ServingStore,
        metrics: &Arc<Metrics>,
    ) {
        let now = Instant::now();
        let fresh = SweepState {
            due: now,
            swept_ms: None,
            full_at: None,
        };
        // A newly assigned partition is swept after this process's first
        // commit on it: that commit moves its offset past the batch a crash
        // left behind, so those files are then below the stored offset. A
        // partition already read to its end gets no batch of its own, so it
        // is also swept once after the first commit of any partition (its
        // orphans from before the last commit are below the stored offset
        // already). Safe at any time: a sweep deletes only unrecorded files
        // that start below the stored offset it reads, which no writer can
        // commit any more.
        let mut first = false;
        if let Ok(mut pending) = control.cleanup_pending.lock() {
            for p in batch.partitions.keys() {
                if pending.remove(p) {
                    self.owned.insert(*p, fresh);
                    first = true;
                }
            }
            for p in pending.iter() {
                if !self.owned.contains_key(p) {
                    self.owned.insert(*p, fresh);
                    first = true;
                }
            }
        }
        if !first && self.running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.finish().await;
        let owned = control.owned_partitions();
        self.owned.retain(|p, _| owned.contains(p));
        let todo: Vec<i32> = self
            .owned
            .iter()
            .filter(|(_, s)| s.due <= now)
            .map(|(p, _)| *p)
            .collect();
        if todo.is_empty() {
            return;
        }
        let scope = sweep_scope(
            todo.iter().filter_map(|p| self.owned.get(p)),
            now,
            self.max_event_age,
        );
        for p in &todo {
            if let Some(state) = self.owned.get_mut(p) {
                state.due = now + self.interval;
            }
        }
        let (topic, archive, store, metrics) = (
            self.topic.clone(),
            archive.clone(),
            store.clone(),
            metrics.clone(),
        );
        self.running = Some(tokio::spawn(async move {
            let (started, started_ms) = (Instant::now(), chrono::Utc::now().timestamp_millis());
            match sweep_orphans(&topic, &todo, &archive, &store, scope).await {
                Ok(removed) => {
                    let sweeps = if scope == SweepScope::Full {
                        &metrics.archive_sweeps_full
                    } else {
                        &metrics.archive_sweeps_bounded
                    };
                    sweeps.fetch_add(1, Ordering::Relaxed);
                    if !removed.is_empty() {
                        tracing::warn!(partitions = ?todo, count = removed.len(), files = ?removed, "removed orphan archive files left by a crash or a fenced writer");
                        metrics
                            .archive_orphans_removed
                            .fetch_add(removed.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Swept {
                        partitions: todo,
                        started_ms,
                        started,
                        full: scope == SweepScope::Full,
                    })
                }
                Err(e) => {
                    tracing::error!(partitions = ?todo, error = %e, "orphan sweep failed; retrying within 30 s");
                    Err(todo)
                }
            }
        }));
        if first {
            self.finish().await;
        }
    }

    /// Wait for the running sweep: record its start for the next bounded
    /// one, or schedule a retry for the partitions it failed on.
    pub(super) async fn finish(&mut self) {
        let Some(handle) = self.running.take() else {
            return;
        };
        match handle.await {
            Ok(Err(failed)) => {
                let retry = Instant::now() + self.interval.min(Duration::from_secs(30));
                for p in failed {
                    if let Some(state) = self.owned.get_mut(&p) {
                        state.due = state.due.min(retry);
                    }
                }
            }
            Ok(Ok(swept)) => {
                for p in swept.partitions {
                    if let Some(state) = self.owned.get_mut(&p) {
                        state.swept_ms = Some(swept.started_ms);
                        if swept.full {
                            state.full_at = Some(swept.started);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "orphan sweep task failed"),
        }
    }
}

/// The scope of one sweep of several partitions (one listing serves all):
/// bounded only if each of them may be.
fn sweep_scope<'a>(
    states: impl Iterator<Item = &'a SweepState>,
    now: Instant,
    max_event_age: Duration,
) -> SweepScope {
    let mut since = i64::MAX;
    for state in states {
        let full_due = state
            .full_at
            .is_none_or(|t| now.duration_since(t) >= FULL_SWEEP_EVERY);
        match state.swept_ms {
            Some(ms) if !full_due => since = since.min(ms),
            _ => return SweepScope::Full,
        }
    }
    if since == i64::MAX {
        return SweepScope::Full;
    }
    SweepScope::Since {
        since_ms: since.saturating_sub(SWEEP_OVERLAP_MS),
        max_event_age_ms: i64::try_from(max_event_age.as_millis()).unwrap_or(i64::MAX),
    }
}

impl Drop for OrphanSweeper {
    fn drop(&mut self) {
        if let Some(handle) = self.running.take() {
            handle.abort();
        }
    }
}

async fn sweep_orphans(
    topic: &str,
    partitions: &[i32],
    archive: &ParquetArchiveSink,
    store: &ServingStore,
    scope: SweepScope,
) -> Result<Vec<String>, crate::sink::SinkError> {
    let stored = store.load_offsets(topic).await?;
    let committed: std::collections::HashMap<i32, i64> = partitions
        .iter()
        .filter_map(|p| stored.get(p).map(|next| (*p, *next)))
        .collect();
    if committed.is_empty() {
        return Ok(Vec::new());
    }
    let positions = store.archive_positions(topic).await?;
    let archived: std::collections::HashMap<i32, i64> = partitions
        .iter()
        .filter_map(|p| positions.get(p).map(|a| (*p, *a)))
        .collect();
    let mut removed = archive
        .remove_dead_staged(topic, &archived, &committed, scope, store)
        .await?;
    removed.extend(archive.remove_dead(topic, &committed, scope, store).await?);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition new to this process, or one whose last full sweep is a
    /// day old, makes the sweep full; otherwise it starts an hour before the
    /// oldest previous sweep.
    #[test]
    fn sweeps_are_bounded_only_when_every_partition_may_be() {
        let now = Instant::now() + FULL_SWEEP_EVERY + Duration::from_secs(60);
        let age = Duration::from_secs(7 * 86_400);
        let swept = |ms: Option<i64>, full_ago: Option<Duration>| SweepState {
            due: now,
            swept_ms: ms,
            full_at: full_ago.map(|d| now - d),
        };
        let recent = Some(Duration::from_secs(600));
        let (a, b) = (
            swept(Some(5_000_000), recent),
            swept(Some(4_000_000), recent),
        );
        assert_eq!(
            sweep_scope([&a, &b].into_iter(), now, age),
            SweepScope::Since {
                since_ms: 4_000_000 - SWEEP_OVERLAP_MS,
                max_event_age_ms: 7 * 86_400_000
            }
        );
        let new = swept(None, None);
        assert_eq!(
            sweep_scope([&a, &new].into_iter(), now, age),
            SweepScope::Full
        );
        let stale = swept(Some(5_000_000), Some(FULL_SWEEP_EVERY));
        assert_eq!(
            sweep_scope([&a, &stale].into_iter(), now, age),
            SweepScope::Full
        );
        assert_eq!(sweep_scope(std::iter::empty(), now, age), SweepScope::Full);
    }
}

/// Sweep cost by scope on a 90-day local archive of 108,000 committed files
/// recorded in a real SQLite store. A measurement, not a timed test: run
/// `cargo test -p tally --release --lib -- --ignored sweep_cost --nocapture`.
#[cfg(test)]
mod sweep_cost {
    use super::*;
    use crate::batch::PartitionRange;
    use crate::decode::EventSchema;
    use crate::sink::archive::FileKind;
    use crate::sink::WrittenFile;
    use crate::sink::{CommitOutcome, CommitRequest};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    #[allow(clippy::print_stdout)]
    async fn sweep_cost_by_scope() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = EventSchema::from_config(&settings.schema).unwrap();
        let catalog = crate::testing::catalog(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let store = ServingStore::open(
            &format!("sqlite://{}/serving.db", dir.path().display()),
            &catalog.rollups,
        )
        .await
        .unwrap();
        let archive = ParquetArchiveSink::local(&dir.path().join("data"), 2, 1).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let (days, per_hour) = (90i64, 50i64);
        let mut files = Vec::new();
        let mut offset = 0i64;
        for d in (0..days).rev() {
            for h in 0..24 {
                let t = now - d * 86_400_000 - (23 - h) * 3_600_000;
                let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(t as u64);
                let day = chrono::DateTime::from_timestamp_millis(t)
                    .unwrap()
                    .format("dt=%Y-%m-%d/hour=%H")
                    .to_string();
                for _ in 0..per_hour {
                    let path = format!(
                        "{}/{day}/{}",
                        crate::sink::archive::RAW_PREFIX,
                        crate::sink::archive::file_name("t", 0, offset, offset + 9, "1")
                    );
                    let full = dir.path().join("data").join(&path);
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, b"x").unwrap();
                    std::fs::File::options()
                        .write(true)
                        .open(&full)
                        .unwrap()
                        .set_modified(when)
                        .unwrap();
                    files.push(WrittenFile {
                        path,
                        kind: FileKind::Raw,
                        partition: 0,
                        first_offset: offset,
                        last_offset: offset + 9,
                        rows: 10,
                        bytes: 1,
                    });
                    offset += 10;
                }
            }
        }
        let partitions = [(
            0,
            PartitionRange {
                expected_start: None,
                first: 0,
                last: offset - 1,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic: "t",
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
        let committed: std::collections::HashMap<i32, i64> =
            [(0, offset + 1_000)].into_iter().collect();
        let age = 7 * 86_400_000;
        for round in 0..3 {
            // One dead file per round: a recent copy under another writer token.
            let dead = files[files.len() - 1 - round]
                .path
                .replace("-w1.parquet", "-w2.parquet");
            std::fs::write(dir.path().join("data").join(&dead), b"x").unwrap();
            let t = Instant::now();
            let removed = archive
                .remove_dead("t", &committed, SweepScope::Full, &store)
                .await
                .unwrap();
            let full = t.elapsed();
            assert_eq!(removed, vec![dead.clone()]);
            std::fs::write(dir.path().join("data").join(&dead), b"x").unwrap();
            let t = Instant::now();
            let since = SweepScope::Since {
                since_ms: chrono::Utc::now().timestamp_millis() - 600_000 - SWEEP_OVERLAP_MS,
                max_event_age_ms: age,
            };
            let removed = archive
                .remove_dead("t", &committed, since, &store)
                .await
                .unwrap();
            let bounded = t.elapsed();
            assert_eq!(removed, vec![dead]);
            println!(
                "{} committed files over {days} days: full sweep {:.0} ms, bounded sweep {:.0} ms",
                files.len(),
                full.as_secs_f64() * 1e3,
                bounded.as_secs_f64() * 1e3
            );
        }
    }
}
