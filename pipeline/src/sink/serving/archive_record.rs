//! The archive's own record in the serving store: its committed position
//! per partition (`tally_archive_offsets`), the event hours counted but not
//! yet archived (`tally_archive_open`) and the committed files still under
//! their staging names (`tally_archive_pending`). See `sink/archive/open.rs`
//! for the protocol.

use std::collections::BTreeMap;

use super::{CommitOutcome, ServingStore, SinkError, WrittenFile};
use crate::serve::blocking;

/// One flush of a partition's open raw files: the archive's commit.
#[derive(Debug)]
pub struct ArchiveCommit<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The archive position the files build on (the fence).
    pub expected: Option<i64>,
    /// The position after them.
    pub next: i64,
    /// The files, by final path (recorded as pending until renamed).
    pub files: &'a [WrittenFile],
    pub now_ms: i64,
}

impl ServingStore {
    /// The archive's committed position of each partition of `topic`,
    /// adopting the serving offset for a partition that has none yet.
    pub async fn archive_positions(&self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        match &self.backend {
            super::Backend::Sqlite(s) => blocking(|| s.archive_positions(topic)),
            super::Backend::Postgres(s) => s.archive_positions(topic).await,
        }
    }

    /// Commit a flush: fence on the partition's archive position, record the
    /// files (and as pending), advance the position; or report the fence.
    pub async fn commit_archive(&self, c: &ArchiveCommit<'_>) -> Result<CommitOutcome, SinkError> {
        match &self.backend {
            super::Backend::Sqlite(s) => blocking(|| s.commit_archive(c)),
            super::Backend::Postgres(s) => s.commit_archive(c).await,
        }
    }

    /// After the renames: forget `paths` as pending and, when the partition
    /// has no pending file left, the hours it counted below its position.
    pub async fn finish_archive(
        &self,
        topic: &str,
        partition: i32,
        paths: &[String],
    ) -> Result<(), SinkError> {
        match &self.backend {
            super::Backend::Sqlite(s) => blocking(|| s.finish_archive(topic, partition, paths)),
            super::Backend::Postgres(s) => s.finish_archive(topic, partition, paths).await,
        }
    }

    /// Committed files of `topic` not yet renamed: (partition, final path).
    pub async fn pending_archive(&self, topic: &str) -> Result<Vec<(i32, String)>, SinkError> {
        match &self.backend {
            super::Backend::Sqlite(s) => blocking(|| s.pending_archive(topic)),
            super::Backend::Postgres(s) => s.pending_archive(topic).await,
        }
    }

    /// Event hours (epoch ms) with counted events not yet archived.
    pub async fn open_hours(&self) -> Result<Vec<i64>, SinkError> {
        match &self.backend {
            super::Backend::Sqlite(s) => blocking(|| s.open_hours()),
            super::Backend::Postgres(s) => s.open_hours().await,
        }
    }
}
