//! Removing what a crash or a fenced writer left in the archive: files of
//! batches that never committed (in progress, staged or complete) and
//! multipart uploads never completed. A file a committed record names is
//! never removed.

use std::collections::HashMap;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::*;

impl ParquetArchiveSink {
    /// Delete files (a fenced batch's output). Missing files are fine.
    pub(crate) async fn delete(&self, paths: &[String]) -> Result<(), SinkError> {
        for p in paths {
            match self.store.delete(&ObjectPath::from(p.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    return Err(SinkError::ObjectStore {
                        path: p.clone(),
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(())
    }

    /// Single-writer cleanup (`tally replay`, after committed staged files
    /// were renamed): delete hidden files, and complete files starting at or
    /// beyond their position: the archive's for raw files, the serving
    /// store's next offset for dead letters (`None`: nothing committed yet).
    /// Returns the deleted paths.
    pub(crate) async fn remove_orphans(
        &self,
        topic: &str,
        committed_next: &HashMap<i32, Option<i64>>,
        archive: &HashMap<i32, Option<i64>>,
    ) -> Result<Vec<String>, SinkError> {
        self.sweep(
            topic,
            committed_next,
            true,
            |p, first, in_progress, path| {
                let position = if path.starts_with(RAW_PREFIX) {
                    archive
                } else {
                    committed_next
                };
                in_progress
                    || position
                        .get(&p)
                        .is_some_and(|next| next.is_none_or(|n| first >= n))
            },
        )
        .await
    }

    /// At assignment, with other writers possibly alive (a zombie): delete
    /// the local store's temporary files of `partitions` and the multipart
    /// uploads of files written under their final names by older tallies.
    /// Staged files are [`Self::remove_dead_staged`]'s: a committed one may
    /// be waiting for its rename, a live writer's may still commit.
    pub(crate) async fn remove_in_progress(
        &self,
        topic: &str,
        partitions: &HashMap<i32, Option<i64>>,
    ) -> Result<Vec<String>, SinkError> {
        self.sweep(topic, partitions, true, |_, _, _, _| false)
            .await
    }

    /// Delete the complete files of each partition in `committed` (its next
    /// offset) that start below it and that `record` does not hold as
    /// committed. Their writers can never commit them: a commit needs the
    /// stored offset to equal its batch start, which is below the committed
    /// offset, and stored offsets only grow. One listing for all partitions,
    /// limited by `scope`; candidates are checked against `record` a
    /// thousand at a time, so memory does not grow with the archive.
    pub(crate) async fn remove_dead(
        &self,
        topic: &str,
        committed: &HashMap<i32, i64>,
        scope: SweepScope,
        record: &impl CommittedFiles,
    ) -> Result<Vec<String>, SinkError> {
        const CHECK: usize = 1_000;
        let mut doomed = Vec::new();
        let mut candidates = Vec::new();
        for prefix in [RAW_PREFIX, DLQ_PREFIX] {
            // Raw files are dated by event time, which is at most
            // `max_event_age` older than the write; dead letters by rejection time.
            let dirs = match scope {
                SweepScope::Full => vec![ObjectPath::from(prefix)],
                SweepScope::Since {
                    since_ms,
                    max_event_age_ms,
                } => {
                    let age = if prefix == RAW_PREFIX {
                        max_event_age_ms
                    } else {
                        0
                    };
                    let (oldest, _) = ymd_h(since_ms.saturating_sub(age).saturating_sub(DAY_MS));
                    self.dated_dirs(prefix, &oldest, &mut candidates, topic, committed, scope)
                        .await?
                }
            };
            for dir in dirs {
                let mut list = self.store.list(Some(&dir));
                while let Some(meta) = list.next().await {
                    let meta = match meta {
                        Ok(m) => m,
                        Err(object_store::Error::NotFound { .. }) => break,
                        Err(e) => {
                            return Err(SinkError::ObjectStore {
                                path: dir.to_string(),
                                source: Box::new(e),
                            })
                        }
                    };
                    if is_dead_candidate(&meta, topic, committed, scope) {
                        candidates.push(meta.location.to_string());
                    }
                    if candidates.len() >= CHECK {
                        check_candidates(&mut candidates, record, &mut doomed).await?;
                    }
                }
            }
        }
        check_candidates(&mut candidates, record, &mut doomed).await?;
        let doomed = self.without_manifested(doomed).await?;
        if !doomed.is_empty() {
            tracing::warn!(
                files = doomed.len(),
                "removing archive files of uncommitted batches"
            );
            self.delete(&doomed).await?;
        }
        Ok(doomed)
    }

    /// Staged files that can never commit: hidden files and (S3) multipart
    /// uploads of `topic` whose offsets start below their partition's
    /// position, a crash's or a fenced writer's: raw flushes below the
    /// archive's (`archive`), dead-letter files below the serving offset
    /// (`serving`). A staged file whose final name `record` holds is
    /// committed (its rename is pending) and is never removed. Uploads are
    /// checked on every sweep (one listing call per prefix); hidden files in
    /// a full sweep.
    pub(crate) async fn remove_dead_staged(
        &self,
        topic: &str,
        archive: &HashMap<i32, i64>,
        serving: &HashMap<i32, i64>,
        scope: SweepScope,
        record: &impl CommittedFiles,
    ) -> Result<Vec<String>, SinkError> {
        let below = |prefix: &str, name: &str| {
            let position = if prefix == RAW_PREFIX {
                archive
            } else {
                serving
            };
            parse_file_name(name).is_some_and(|(t, p, first, _, hidden)| {
                hidden && t == topic && position.get(&p).is_some_and(|a| first < *a)
            })
        };
        let mut removed = Vec::new();
        if let Some(s3) = &self.s3 {
            let mut uploads = Vec::new();
            for prefix in [RAW_PREFIX, DLQ_PREFIX] {
                let listed = s3
                    .list_uploads(prefix)
                    .await
                    .map_err(|e| SinkError::ObjectStore {
                        path: format!("{prefix} (multipart uploads)"),
                        source: Box::new(e),
                    })?;
                uploads.extend(
                    listed
                        .into_iter()
                        .filter(|u| below(prefix, u.key.rsplit('/').next().unwrap_or(""))),
                );
            }
            if !uploads.is_empty() {
                tracing::warn!(
                    uploads = uploads.len(),
                    "aborting multipart uploads left by a crash"
                );
            }
            for u in uploads {
                let key = ObjectPath::from(u.key.as_str());
                match s3.multipart().abort_multipart(&key, &u.id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                        removed.push(format!("{} (upload {})", u.key, u.id))
                    }
                    Err(e) => {
                        return Err(SinkError::ObjectStore {
                            path: u.key.clone(),
                            source: Box::new(e),
                        })
                    }
                }
            }
        }
        if scope != SweepScope::Full {
            return Ok(removed);
        }
        let mut staged: Vec<(String, String)> = Vec::new();
        for prefix in [RAW_PREFIX, DLQ_PREFIX] {
            let mut list = self.store.list(Some(&ObjectPath::from(prefix)));
            while let Some(meta) = list.next().await {
                let meta = match meta {
                    Ok(m) => m,
                    Err(object_store::Error::NotFound { .. }) => break,
                    Err(e) => {
                        return Err(SinkError::ObjectStore {
                            path: prefix.to_string(),
                            source: Box::new(e),
                        })
                    }
                };
                let Some(name) = meta.location.filename() else {
                    continue;
                };
                if !below(prefix, name) {
                    continue;
                }
                let path = meta.location.to_string();
                let (dir, hidden) = path.rsplit_once('/').unwrap_or(("", &path));
                let Some(final_name) = hidden
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(".inprogress"))
                else {
                    continue;
                };
                staged.push((path.clone(), format!("{dir}/{final_name}")));
            }
        }
        for chunk in staged.chunks(1_000) {
            let finals: Vec<String> = chunk.iter().map(|(_, f)| f.clone()).collect();
            let committed = record.committed_among(&finals).await?;
            let doomed: Vec<String> = chunk
                .iter()
                .filter(|(_, f)| !committed.contains(f))
                .map(|(s, _)| s.clone())
                .collect();
            if !doomed.is_empty() {
                tracing::warn!(
                    files = doomed.len(),
                    "removing staged archive files that never committed"
                );
            }
            self.delete(&doomed).await?;
            removed.extend(doomed);
        }
        Ok(removed)
    }

    /// After a flush of `partition` committed up to `position`: the hidden
    /// raw files of that partition in `dirs` (the flush's hour directories)
    /// whose flush starts below the position and whose final name `record`
    /// does not hold. A crashed or fenced flush left them there; the flush
    /// that read its events again wrote to the same hours. How many.
    pub(crate) async fn remove_dead_staged_in(
        &self,
        dirs: &[String],
        topic: &str,
        partition: i32,
        position: i64,
        record: &impl CommittedFiles,
    ) -> Result<usize, SinkError> {
        let mut staged: Vec<(String, String)> = Vec::new();
        let entries = super::manifest::partition_dir(topic, partition);
        let entries = entries.trim_end_matches('/');
        for dir in dirs {
            let listing = match self
                .store
                .list_with_delimiter(Some(&ObjectPath::from(dir.as_str())))
                .await
            {
                Ok(l) => l,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => {
                    return Err(SinkError::ObjectStore {
                        path: dir.clone(),
                        source: Box::new(e),
                    })
                }
            };
            for meta in listing.objects {
                let Some(name) = meta.location.filename() else {
                    continue;
                };
                let dead = if dir == entries {
                    // The partition's staged manifest entries: `.<first>-<last>-w<writer>.json.inprogress`.
                    name.strip_prefix('.')
                        .filter(|n| n.ends_with(".json.inprogress"))
                        .and_then(|n| n.split('-').next()?.parse::<i64>().ok())
                        .is_some_and(|first| first < position)
                } else {
                    parse_file_name(name).is_some_and(|(t, p, first, _, hidden)| {
                        hidden && t == topic && p == partition && first < position
                    })
                };
                let final_name = name
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(".inprogress"));
                if let (true, Some(f)) = (dead, final_name) {
                    staged.push((meta.location.to_string(), format!("{dir}/{f}")));
                }
            }
        }
        if staged.is_empty() {
            return Ok(0);
        }
        let finals: Vec<String> = staged.iter().map(|(_, f)| f.clone()).collect();
        let committed = record.committed_among(&finals).await?;
        let doomed: Vec<String> = staged
            .into_iter()
            .filter(|(_, f)| !committed.contains(f))
            .map(|(s, _)| s)
            .collect();
        if !doomed.is_empty() {
            tracing::warn!(
                files = doomed.len(),
                partition,
                "removing staged archive files of flushes that never committed"
            );
            self.delete(&doomed).await?;
        }
        Ok(doomed.len())
    }

    /// The `dt=YYYY-MM-DD` directories under `prefix` dated `oldest` or
    /// later, and any other directory (listed whole, to be safe); files
    /// directly under `prefix` go to `candidates` as they are found.
    async fn dated_dirs(
        &self,
        prefix: &str,
        oldest: &str,
        candidates: &mut Vec<String>,
        topic: &str,
        committed: &HashMap<i32, i64>,
        scope: SweepScope,
    ) -> Result<Vec<ObjectPath>, SinkError> {
        let listing = match self
            .store
            .list_with_delimiter(Some(&ObjectPath::from(prefix)))
            .await
        {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => {
                return Err(SinkError::ObjectStore {
                    path: prefix.to_string(),
                    source: Box::new(e),
                })
            }
        };
        for meta in &listing.objects {
            if is_dead_candidate(meta, topic, committed, scope) {
                candidates.push(meta.location.to_string());
            }
        }
        Ok(listing
            .common_prefixes
            .into_iter()
            .filter(
                |dir| match dir.filename().and_then(|n| n.strip_prefix("dt=")) {
                    // `YYYY-MM-DD` sorts as it dates.
                    Some(day) if day.len() == 10 && day.as_bytes()[4] == b'-' => day >= oldest,
                    _ => true,
                },
            )
            .collect())
    }

    /// Some complete raw or dead-letter file of `topic` in the archive, if
    /// there is one (the listing stops at the first).
    pub(crate) async fn any_file_of(&self, topic: &str) -> Result<Option<String>, SinkError> {
        let wanted = file_name(topic, 0, 0, 0, "0");
        let wanted = parse_file_name(&wanted)
            .map(|(t, ..)| t)
            .unwrap_or_default();
        for prefix in [RAW_PREFIX, DLQ_PREFIX] {
            let mut list = self.store.list(Some(&ObjectPath::from(prefix)));
            while let Some(meta) = list.next().await {
                let meta = match meta {
                    Ok(m) => m,
                    Err(object_store::Error::NotFound { .. }) => break,
                    Err(e) => {
                        return Err(SinkError::ObjectStore {
                            path: prefix.to_string(),
                            source: Box::new(e),
                        })
                    }
                };
                let Some(name) = meta.location.filename() else {
                    continue;
                };
                if parse_file_name(name)
                    .is_some_and(|(t, _, _, _, in_progress)| t == wanted && !in_progress)
                {
                    return Ok(Some(meta.location.to_string()));
                }
            }
        }
        Ok(None)
    }

    async fn sweep(
        &self,
        topic: &str,
        staging_of: &HashMap<i32, Option<i64>>,
        staging: bool,
        doomed_if: impl Fn(i32, i64, bool, &str) -> bool,
    ) -> Result<Vec<String>, SinkError> {
        let mut doomed = Vec::new();
        for prefix in [RAW_PREFIX, DLQ_PREFIX] {
            let mut list = self.store.list(Some(&ObjectPath::from(prefix)));
            while let Some(meta) = list.next().await {
                let meta = match meta {
                    Ok(m) => m,
                    Err(object_store::Error::NotFound { .. }) => break,
                    Err(e) => {
                        return Err(SinkError::ObjectStore {
                            path: prefix.to_string(),
                            source: Box::new(e),
                        })
                    }
                };
                let Some(name) = meta.location.filename() else {
                    continue;
                };
                let Some((t, p, first, _last, in_progress)) = parse_file_name(name) else {
                    continue;
                };
                if t == topic && doomed_if(p, first, in_progress, meta.location.as_ref()) {
                    doomed.push(meta.location.to_string());
                }
            }
        }
        let mut doomed = self.without_manifested(doomed).await?;
        if !doomed.is_empty() {
            tracing::warn!(
                files = doomed.len(),
                "removing archive files of uncommitted batches"
            );
            self.delete(&doomed).await?;
        }
        if let (true, Some(s3)) = (staging, &self.s3) {
            // Multipart uploads a crash left in progress: abort them, like staging files.
            for prefix in [RAW_PREFIX, DLQ_PREFIX] {
                let uploads =
                    s3.list_uploads(prefix)
                        .await
                        .map_err(|e| SinkError::ObjectStore {
                            path: format!("{prefix} (multipart uploads)"),
                            source: Box::new(e),
                        })?;
                let ours: Vec<_> = uploads
                    .into_iter()
                    .filter(|u| {
                        let name = u.key.rsplit('/').next().unwrap_or("");
                        // A staging upload is `remove_dead_staged`'s.
                        let staged = name.starts_with('.');
                        !staged
                            && parse_file_name(name)
                                .is_some_and(|(t, p, ..)| t == topic && staging_of.contains_key(&p))
                    })
                    .collect();
                if !ours.is_empty() {
                    tracing::warn!(
                        uploads = ours.len(),
                        "aborting multipart uploads left by a crash"
                    );
                }
                for u in ours {
                    let key = ObjectPath::from(u.key.as_str());
                    match s3.multipart().abort_multipart(&key, &u.id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                            doomed.push(format!("{} (upload {})", u.key, u.id))
                        }
                        Err(e) => {
                            return Err(SinkError::ObjectStore {
                                path: u.key.clone(),
                                source: Box::new(e),
                            })
                        }
                    }
                }
            }
        }
        if let (true, Some(root)) = (staging, &self.local_root) {
            for staged in staging_files(root, topic, staging_of) {
                match std::fs::remove_file(&staged) {
                    Ok(()) => doomed.push(staged.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(SinkError::ObjectStore {
                            path: staged.display().to_string(),
                            source: Box::new(object_store::Error::Generic {
                                store: "local",
                                source: Box::new(e),
                            }),
                        })
                    }
                }
            }
        }
        Ok(doomed)
    }
}

/// Which files a sweep for dead files looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SweepScope {
    /// The whole archive.
    Full,
    /// Files modified at or after `since_ms` (epoch ms, wall clock; the
    /// caller leaves a margin), found in raw directories dated from
    /// `max_event_age` before it and dead-letter directories from then on
    /// (a day earlier each: a margin for a batch slow to reach its write).
    Since {
        since_ms: i64,
        max_event_age_ms: i64,
    },
}

pub(super) const DAY_MS: i64 = 86_400_000;

/// The serving store's record of committed archive files.
#[allow(async_fn_in_trait)]
pub(crate) trait CommittedFiles {
    /// Those of `paths` recorded as committed.
    async fn committed_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, SinkError>;
}

/// A complete file of `topic` starting below its partition's committed
/// offset (and, in a `Since` sweep, modified since then).
fn is_dead_candidate(
    meta: &object_store::ObjectMeta,
    topic: &str,
    committed: &HashMap<i32, i64>,
    scope: SweepScope,
) -> bool {
    let Some(name) = meta.location.filename() else {
        return false;
    };
    let Some((t, p, first, _last, in_progress)) = parse_file_name(name) else {
        return false;
    };
    let recent = match scope {
        SweepScope::Full => true,
        SweepScope::Since { since_ms, .. } => meta.last_modified.timestamp_millis() >= since_ms,
    };
    t == topic && !in_progress && recent && committed.get(&p).is_some_and(|next| first < *next)
}

/// Move the candidates that `record` does not hold as committed to `doomed`.
async fn check_candidates(
    candidates: &mut Vec<String>,
    record: &impl CommittedFiles,
    doomed: &mut Vec<String>,
) -> Result<(), SinkError> {
    if candidates.is_empty() {
        return Ok(());
    }
    let committed = record.committed_among(candidates).await?;
    doomed.extend(candidates.drain(..).filter(|p| !committed.contains(p)));
    Ok(())
}

/// The source clears a crash's unfinished files before it reads a partition again.
impl crate::source::UnfinishedFiles for ParquetArchiveSink {
    fn remove_unfinished<'a>(
        &'a self,
        topic: &'a str,
        partitions: &'a HashMap<i32, Option<i64>>,
    ) -> futures::future::BoxFuture<'a, Result<usize, crate::source::offsets::StoreError>> {
        Box::pin(async move { Ok(self.remove_in_progress(topic, partitions).await?.len()) })
    }
}
