//! The committer's archive half: after a batch's serving commit, its raw
//! events go to the open files (`sink/archive/open.rs`), and the partitions
//! whose files are due are flushed: staged, committed with the archive's
//! own fence, renamed. Failures are retried like serving commits.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::committer::{Committer, Retry};
use crate::batch::Batch;
use crate::decode::RejectReason;
use crate::error::{Error, RetryHint};
use crate::serve::blocking;
use crate::sink::archive::manifest::ManifestEntry;
use crate::sink::archive::{staging_path, FileKind, Flush};
use crate::sink::serving::ArchiveCommit;
use crate::sink::CommitOutcome;

/// Backoff between attempts of one archive step.
struct Attempts {
    retry: Retry,
    done: u32,
    backoff: Duration,
}

impl Attempts {
    fn new(retry: Retry) -> Self {
        Attempts {
            retry,
            done: 0,
            backoff: Duration::from_millis(100),
        }
    }

    /// After a failed step: wait and go on, or give up with the error.
    async fn failed(&mut self, step: &str, e: Error) -> Result<(), Error> {
        if e.retry() != RetryHint::WithBackoff {
            return Err(e);
        }
        if let Retry::Times(n) = self.retry {
            if self.done >= n {
                return Err(e);
            }
        }
        self.done += 1;
        tracing::error!(error = %e, step, retry_in = ?self.backoff, "archive flush failed; retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

impl Committer<'_> {
    /// Append `original`'s raw events (but the poison rows `committed` turned
    /// into dead letters) and flush what is due. The partitions whose flush
    /// was fenced.
    pub(super) async fn archive_batch(
        &mut self,
        original: &Batch,
        committed: &Batch,
        retry: Retry,
    ) -> Result<Vec<i32>, Error> {
        let skip: HashSet<(i32, i64)> = committed
            .dead_letters
            .iter()
            .filter(|d| d.reason == RejectReason::RollupFailed)
            .map(|d| (d.partition, d.offset))
            .collect();
        let Some(raw) = self.raw.as_deref_mut() else {
            return Ok(Vec::new());
        };
        if let Err(e) = blocking(|| raw.append(original, &skip)) {
            // An open file may now hold part of the batch: drop the batch's
            // partitions' files and read them again (nothing is counted twice).
            let parts: Vec<i32> = original.archive.keys().copied().collect();
            for p in &parts {
                raw.drop_partition(*p);
            }
            tracing::error!(error = %e, partitions = ?parts, "cannot append to the open archive files; reading those partitions again");
            if let Some(m) = self.metrics {
                m.commit_errors.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Ok(parts);
        }
        let due = raw.due(Instant::now());
        let fenced = self.flush(due, retry).await?;
        if let (Some(m), Some(raw)) = (self.metrics, self.raw.as_deref()) {
            m.archive_open_files
                .store(raw.open_files() as u64, Ordering::Relaxed);
        }
        Ok(fenced)
    }

    /// After a batch's commit: its dead-letter (and, per batch, raw) files
    /// from their staging names to their final ones, then no longer pending.
    /// A crash in between leaves them pending for the next owner to rename.
    pub(super) async fn publish_batch_files(
        &mut self,
        batch: &Batch,
        files: &[crate::sink::WrittenFile],
        retry: Retry,
    ) -> Result<(), Error> {
        let topic = batch.topic.as_str();
        if files.is_empty() {
            return Ok(());
        }
        let mut by_partition: std::collections::BTreeMap<i32, Vec<String>> = Default::default();
        for f in files {
            by_partition
                .entry(f.partition)
                .or_default()
                .push(f.path.clone());
        }
        let mut tries = Attempts::new(retry);
        loop {
            let step = async {
                for (p, paths) in &by_partition {
                    self.archive.publish(paths).await?;
                    self.store.finish_archive(topic, *p, paths).await?;
                }
                Ok::<(), crate::sink::SinkError>(())
            };
            match step.await {
                Ok(()) => break,
                Err(e) => tries.failed("rename", e.into()).await?,
            }
        }
        // What a crashed or fenced batch of these partitions staged in the
        // same directories is dead now (it starts below the new offset).
        for (p, paths) in &by_partition {
            let Some(next) = batch.partitions.get(p).map(|r| r.next_offset()) else {
                continue;
            };
            let mut dirs: Vec<String> = paths
                .iter()
                .filter_map(|f| f.rsplit_once('/').map(|(d, _)| d.to_string()))
                .collect();
            dirs.dedup();
            if let Err(e) = self
                .archive
                .remove_dead_staged_in(&dirs, topic, *p, next, self.store)
                .await
            {
                tracing::warn!(error = %e, "cannot look for dead staged archive files; the sweep removes them");
            }
        }
        Ok(())
    }

    /// Flush every partition with something open (shutdown, a job's end).
    pub(crate) async fn flush_all(&mut self, retry: Retry) -> Result<Vec<i32>, Error> {
        let all = self.raw.as_deref().map(|r| r.all()).unwrap_or_default();
        self.flush(all, retry).await
    }

    async fn flush(&mut self, partitions: Vec<i32>, retry: Retry) -> Result<Vec<i32>, Error> {
        let mut fenced = Vec::new();
        for p in partitions {
            let Some(raw) = self.raw.as_deref_mut() else {
                break;
            };
            let flush = match blocking(|| raw.close(p)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, partition = p, "cannot close the open archive files; reading the partition again");
                    raw.drop_partition(p);
                    fenced.push(p);
                    continue;
                }
            };
            if !self.commit_flush(&flush, retry).await? {
                tracing::warn!(
                    partition = p,
                    expected = ?flush.expected,
                    "archive flush fenced: another writer advanced the partition's archive; re-reading"
                );
                if let Some(raw) = self.raw.as_deref_mut() {
                    raw.abandon(&flush).await;
                    raw.drop_partition(p);
                }
                fenced.push(p);
                continue;
            }
            if let Some(m) = self.metrics {
                m.archive_flushes.fetch_add(1, Ordering::Relaxed);
                m.archive_files_written
                    .fetch_add(flush.files.len() as u64, Ordering::Relaxed);
                m.raw_bytes_written
                    .fetch_add(flush.files.iter().map(|f| f.bytes).sum(), Ordering::Relaxed);
            }
        }
        Ok(fenced)
    }

    /// Stage, commit and rename one flush. `false`: fenced.
    async fn commit_flush(&mut self, flush: &Flush, retry: Retry) -> Result<bool, Error> {
        let Some(topic) = self.raw.as_deref().map(|r| r.topic().to_string()) else {
            return Ok(true);
        };
        // The archive's own record of the flush, renamed before its files.
        let first = flush.files.first().map_or(flush.next, |f| f.first_offset);
        let entry = ManifestEntry::new(
            &topic,
            flush.partition,
            first,
            flush.next - 1,
            &flush.files,
            None,
        );
        let mut files = Vec::with_capacity(flush.files.len() + 1);
        let mut tries = Attempts::new(retry);
        let mut ambiguous = false;
        loop {
            let step = async {
                if let Some(raw) = self.raw.as_deref() {
                    raw.stage(flush).await?;
                }
                let manifest = self.archive.stage_manifest(&entry).await?;
                files.clear();
                files.push(manifest);
                files.extend(flush.files.iter().cloned());
                let commit = ArchiveCommit {
                    topic: &topic,
                    partition: flush.partition,
                    expected: flush.expected,
                    next: flush.next,
                    files: &files,
                    now_ms: chrono::Utc::now().timestamp_millis(),
                };
                self.store.commit_archive(&commit).await
            };
            match step.await {
                Ok(CommitOutcome::Committed) => break,
                Ok(CommitOutcome::Fenced { stored, .. })
                    if ambiguous && stored == Some(flush.next) && self.recorded(&files).await =>
                {
                    if let Some(m) = self.metrics {
                        m.commits_resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(
                        partition = flush.partition,
                        "an earlier attempt whose reply was lost had committed this archive flush; keeping it"
                    );
                    break;
                }
                Ok(CommitOutcome::Fenced { .. }) => {
                    let staged: Vec<String> = files
                        .iter()
                        .filter(|f| f.kind == FileKind::Manifest)
                        .map(|f| staging_path(&f.path))
                        .collect();
                    if let Err(e) = self.archive.delete(&staged).await {
                        tracing::warn!(error = %e, "cannot delete a fenced flush's staged manifest entry");
                    }
                    return Ok(false);
                }
                Err(e) => {
                    ambiguous = true;
                    tries.failed("commit", e.into()).await?;
                }
            }
        }
        failpoint_after_commit();
        let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
        let mut tries = Attempts::new(retry);
        loop {
            let step = async {
                self.archive.publish(&paths).await?;
                self.store
                    .finish_archive(&topic, flush.partition, &paths)
                    .await
            };
            match step.await {
                Ok(()) => break,
                Err(e) => tries.failed("rename", e.into()).await?,
            }
        }
        // What a crashed or fenced flush of this partition staged in the
        // same hours is dead now (it starts below the new position).
        let mut dirs: Vec<String> = paths
            .iter()
            .filter_map(|p| p.rsplit_once('/').map(|(d, _)| d.to_string()))
            .collect();
        dirs.dedup();
        match self
            .archive
            .remove_dead_staged_in(&dirs, &topic, flush.partition, flush.next, self.store)
            .await
        {
            Ok(n) => {
                if let Some(m) = self.metrics {
                    m.archive_orphans_removed
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for dead staged archive files; the sweep removes them")
            }
        }
        Ok(true)
    }

    async fn recorded(&self, files: &[crate::sink::WrittenFile]) -> bool {
        let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
        self.store
            .committed_among(&paths)
            .await
            .is_ok_and(|found| found.len() == paths.len())
    }
}

fn failpoint_after_commit() {
    crate::failpoint::failpoint("after_archive_commit");
}

/// Roll forward: rename every committed raw file of `topic` still under its
/// staging name (a crash after the archive commit), then forget it as
/// pending. How many.
pub(crate) async fn publish_pending(
    archive: &crate::sink::ParquetArchiveSink,
    store: &crate::sink::ServingStore,
    topic: &str,
) -> Result<usize, crate::sink::SinkError> {
    let pending = store.pending_archive(topic).await?;
    let mut by_partition: std::collections::BTreeMap<i32, Vec<String>> = Default::default();
    for (p, path) in pending {
        by_partition.entry(p).or_default().push(path);
    }
    let mut n = 0;
    for (p, paths) in by_partition {
        archive.publish(&paths).await?;
        store.finish_archive(topic, p, &paths).await?;
        n += paths.len();
    }
    if n > 0 {
        tracing::warn!(
            files = n,
            "renamed committed archive files a crash left under their staging names"
        );
    }
    Ok(n)
}

/// What the source calls before it reads assigned partitions again: the
/// committed staged files renamed, then the hidden files that can never
/// commit removed (`ParquetArchiveSink::remove_in_progress`).
pub(crate) struct ArchiveRecovery {
    pub archive: crate::sink::ParquetArchiveSink,
    pub store: crate::sink::ServingStore,
}

impl crate::source::UnfinishedFiles for ArchiveRecovery {
    fn remove_unfinished<'a>(
        &'a self,
        topic: &'a str,
        partitions: &'a std::collections::HashMap<i32, Option<i64>>,
    ) -> futures::future::BoxFuture<'a, Result<usize, crate::source::offsets::StoreError>> {
        Box::pin(async move {
            publish_pending(&self.archive, &self.store, topic).await?;
            let positions = self.store.archive_positions(topic).await?;
            let archive: std::collections::HashMap<i32, i64> = partitions
                .keys()
                .filter_map(|p| positions.get(p).map(|a| (*p, *a)))
                .collect();
            let serving: std::collections::HashMap<i32, i64> = partitions
                .iter()
                .filter_map(|(p, s)| s.map(|s| (*p, s)))
                .collect();
            let staged = self
                .archive
                .remove_dead_staged(
                    topic,
                    &archive,
                    &serving,
                    crate::sink::archive::SweepScope::Full,
                    &self.store,
                )
                .await?;
            Ok(staged.len()
                + self
                    .archive
                    .remove_in_progress(topic, partitions)
                    .await?
                    .len())
        })
    }
}
