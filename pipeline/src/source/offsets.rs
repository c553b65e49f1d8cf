//! What the source needs from the stages it feeds, as interfaces it owns:
//! where committed offsets live ([`OffsetStore`], the serving store) and
//! how a crash's unfinished archive files are cleared before a partition is
//! read again ([`UnfinishedFiles`], the archive). The sinks implement them;
//! the source never names a sink. Both are called from librdkafka's
//! rebalance callback (through `block_on`) and from the stall watch.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;

/// An implementation's failure, for the log: the source retries or reports it.
pub type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// Per partition: the committed next offset and when it last changed (epoch ms).
pub type Positions = BTreeMap<i32, (i64, i64)>;

/// A lock held for as long as the value lives.
pub type LockGuard = Box<dyn Any + Send>;

/// The committed position of each partition, kept with the outputs.
pub trait OffsetStore: Send + Sync {
    /// Per partition of `topic`: the committed next offset and when it last
    /// changed (epoch ms).
    fn committed(&self, topic: &str) -> BoxFuture<'_, Result<Positions, StoreError>>;

    /// Record `start` as the next offset of a partition with none stored,
    /// unless another writer recorded one first; the stored next offset.
    fn register_start<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        start: i64,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;

    /// Per partition of `topic`: the archive's committed position (a
    /// partition with a committed offset and no archive position yet gets
    /// that offset as its archive position).
    fn archive_committed<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<i32, i64>, StoreError>>;

    /// An exclusive lock on `name` across processes, or `None` while another
    /// holds it (`kafka.assignment = "manual"`).
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockGuard>, StoreError>>;
}

/// Files a crashed writer of these partitions left unfinished.
pub trait UnfinishedFiles: Send + Sync {
    /// Remove the in-progress files of `partitions` (with their committed
    /// next offsets) of `topic`; how many were removed.
    fn remove_unfinished<'a>(
        &'a self,
        topic: &'a str,
        partitions: &'a HashMap<i32, Option<i64>>,
    ) -> BoxFuture<'a, Result<usize, StoreError>>;
}
