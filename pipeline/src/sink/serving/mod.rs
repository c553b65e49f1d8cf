//! The serving store: one table per rollup plus tally's bookkeeping tables,
//! in SQLite (WAL mode, the default; [`sqlite`]) or PostgreSQL ([`postgres`]),
//! chosen by URL. This facade is what the stages and jobs use; each backend
//! is one driver in its own module, and what both share (DDL, merge clauses,
//! statement text) is in [`schema`].
//!
//! Every batch commits in one transaction that
//! 1. fences: each partition's stored next offset must equal the offset the
//!    batch was built on, so a stale or zombie writer fails here;
//! 2. merges the rollup rows (count/sum add, min/max take the extreme);
//!    SQLite into small delta tables folded into the rollup tables later
//!    (see `sqlite/writer.rs`); readers sum a rollup and its delta;
//! 3. records the archive files the batch wrote;
//! 4. advances the offsets and the counters.

mod archive_record;
pub(crate) mod compaction;
mod pg_archive;
mod pg_copy;
mod pg_sketch;
mod postgres;
pub(crate) mod reads;
pub(crate) mod restore;
mod schema;
mod sqlite;
#[cfg(test)]
mod tests;
mod versions;

use std::collections::{BTreeMap, HashSet};

use super::archive::WrittenFile;
use super::{db, sq, SinkError};
use crate::aggregate::{RollupDef, RollupOutput};
use crate::batch::PartitionRange;
use crate::serve::blocking;
use crate::source::offsets::{LockGuard, Positions, StoreError};
pub(crate) use archive_record::ArchiveCommit;
use postgres::{PgReplace, PgStore};
pub(crate) use reads::{Arg, ReadPool, Totals};
pub(crate) use schema::quote;
pub(crate) use schema::{delta_table, Dialect};
use sqlite::{SqliteReplace, SqliteStore};
pub(crate) use versions::BackfillProgress;

/// The outcome of a commit attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Another writer advanced this partition; the batch was not applied.
    Fenced {
        partition: i32,
        expected: Option<i64>,
        stored: Option<i64>,
    },
}

/// A range `[lo, hi)` of archive paths (see `sink::archive::raw_path_range`).
pub(crate) type PathRange = (String, String);

/// A verify snapshot: rows per rollup, committed raw files, open hours.
pub(crate) type Snapshot = (Vec<TableRows>, Vec<String>, Vec<i64>);

/// Everything one batch commits.
#[derive(Debug)]
pub struct CommitRequest<'a> {
    pub topic: &'a str,
    pub partitions: &'a BTreeMap<i32, PartitionRange>,
    pub outputs: &'a [RollupOutput],
    pub files: &'a [WrittenFile],
    /// Counter increments (name, delta).
    pub counters: &'a [(String, i64)],
    /// Newest accepted event time per partition in this batch.
    pub max_event_ms: &'a BTreeMap<i32, i64>,
    /// Partitions read to their end, with their next offset, as of `sealed_at_ms`.
    pub caught_up: &'a BTreeMap<i32, i64>,
    pub sealed_at_ms: i64,
    pub now_ms: i64,
    /// `tally dlq replay`: the original topic and (partition, offset) of the
    /// dead letters this batch counts, recorded in `tally_dlq_replayed`.
    pub replayed: Option<(&'a str, &'a [(i32, i64)])>,
    /// (partition, event hour, last offset) of the counted events, which
    /// reach committed raw files later (`tally_archive_open`).
    pub open_hours: &'a [(i32, i64, i64)],
    /// The batch's raw files are in `files`, committed with it: the
    /// archive's position moves with the offsets. Otherwise the archive
    /// commits later and a partition's position starts at the batch's start.
    pub archive_with_batch: bool,
}

/// One value read back from a rollup table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Real(f64),
    /// A serialized sketch (merged, on reads).
    Bytes(Vec<u8>),
}

/// SQLite: the folds of the delta tables done by one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FoldStats {
    pub folds: u64,
    pub seconds: f64,
    /// Delta rows folded into the rollup tables.
    pub rows: u64,
}

/// Rows of one rollup table, columns in the rollup's order.
pub(crate) type TableRows = Vec<Vec<Cell>>;

/// Held while a `tally replay` (or a manual assignment) runs (see
/// [`ServingStore::lock_source`]).
#[derive(Debug)]
pub enum SourceLock {
    File(std::fs::File),
    Postgres(sqlx::PgConnection),
}

/// The write transaction of a window replacement (see [`ServingStore::begin_replace`]).
/// A window replacement fed batch by batch (SQLite).
#[derive(Debug)]
pub struct ReplaceStream {
    /// Rows to merge; `None` commits.
    pub send: tokio::sync::mpsc::Sender<Option<Vec<RollupOutput>>>,
    pub writer: std::thread::JoinHandle<Result<u64, SinkError>>,
}

pub enum ReplaceTx {
    Sqlite(SqliteReplace),
    Postgres(PgReplace),
}

/// The store behind the facade.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

#[derive(Debug, Clone)]
pub struct ServingStore {
    backend: Backend,
    url: String,
}

impl super::archive::CommittedFiles for ServingStore {
    async fn committed_among(&self, paths: &[String]) -> Result<HashSet<String>, SinkError> {
        ServingStore::committed_among(self, paths).await
    }
}

/// The source's view of the store: committed offsets, recorded starts, locks.
impl crate::source::OffsetStore for ServingStore {
    fn committed(
        &self,
        topic: &str,
    ) -> futures::future::BoxFuture<'_, Result<Positions, StoreError>> {
        let topic = topic.to_string();
        Box::pin(async move { Ok(self.load_offset_times(&topic).await?) })
    }

    fn register_start<'a>(
        &'a self,
        topic: &'a str,
        partition: i32,
        start: i64,
        now_ms: i64,
    ) -> futures::future::BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            Ok(ServingStore::register_start(self, topic, partition, start, now_ms).await?)
        })
    }

    fn archive_committed<'a>(
        &'a self,
        topic: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<BTreeMap<i32, i64>, StoreError>> {
        Box::pin(async move { Ok(self.archive_positions(topic).await?) })
    }

    fn lock<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<LockGuard>, StoreError>> {
        Box::pin(async move {
            let lock = self.lock_source(name).await?;
            Ok(lock.map(|l| Box::new(l) as LockGuard))
        })
    }
}

impl ServingStore {
    /// Open (creating if needed) the store and its tables.
    pub async fn open(url: &str, rollups: &[RollupDef]) -> Result<ServingStore, SinkError> {
        ServingStore::open_with(url, rollups, false).await
    }

    /// Open, creating (or, when `window_index` is false, dropping) an index on
    /// each rollup's window column.
    pub async fn open_with(
        url: &str,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<ServingStore, SinkError> {
        let open_err = |message: String| SinkError::Open {
            url: redact(url),
            message,
        };
        let backend = if url.starts_with("sqlite:") {
            let store = blocking(|| SqliteStore::open(url, rollups)).map_err(open_err)?;
            blocking(|| store.setup_schema(rollups, window_index))?;
            Backend::Sqlite(store)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = PgStore::open(url, rollups).await.map_err(open_err)?;
            store.setup_schema(rollups, window_index).await?;
            Backend::Postgres(store)
        } else {
            return Err(open_err(
                "unsupported serving.url scheme; use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB".into(),
            ));
        };
        let store = ServingStore {
            backend,
            url: url.to_string(),
        };
        store.check_definitions(rollups).await?;
        Ok(store)
    }

    /// Open a store the writers (`tally run`) have set up, for reading
    /// only (`tally serve`, reports): on PostgreSQL no statement writes, so
    /// a SELECT-only role or a hot standby serves. Every rollup's recorded
    /// definition must match. A store not yet set up for these rollups is
    /// set up as [`ServingStore::open_with`] does, which needs a role that
    /// may create tables. SQLite is opened as by `open_with`.
    pub async fn open_existing(
        url: &str,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<ServingStore, SinkError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return ServingStore::open_with(url, rollups, window_index).await;
        }
        let store = PgStore::open(url, rollups)
            .await
            .map_err(|message| SinkError::Open {
                url: redact(url),
                message,
            })?;
        for def in rollups {
            match store.stored_definition(def).await? {
                None => {
                    tracing::info!(rollup = %def.name, "the serving store is not set up for this rollup yet: setting it up");
                    store.close().await;
                    return ServingStore::open_with(url, rollups, window_index).await;
                }
                Some((stored, old)) if stored != def.fingerprint() => {
                    return Err(schema::changed_definition(
                        def,
                        &stored,
                        &def.fingerprint(),
                        &old,
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(ServingStore {
            backend: Backend::Postgres(store),
            url: url.to_string(),
        })
    }

    /// SQLite: fold the delta tables into the rollup tables now (batch
    /// commits also do, every `serving.sqlite_fold_rows` rows). No effect on
    /// PostgreSQL.
    pub async fn fold(&self) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.fold()),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// SQLite: folds of the delta tables done by this process, their
    /// seconds and the rows they moved, in all; zeros on PostgreSQL.
    pub fn fold_stats(&self) -> FoldStats {
        match &self.backend {
            Backend::Sqlite(s) => s.fold_stats(),
            Backend::Postgres(_) => FoldStats::default(),
        }
    }

    /// SQLite: fold the delta tables into the rollup tables once `rows`
    /// rows went into them (0: on every commit). No effect on PostgreSQL.
    pub fn with_fold_rows(self, rows: usize) -> ServingStore {
        if let Backend::Sqlite(s) = &self.backend {
            s.set_fold_rows(rows);
        }
        self
    }

    /// SQLite: a rollup's rows of one batch go straight to its table,
    /// skipping the delta, from `rows` rows on. No effect on PostgreSQL.
    pub fn with_direct_rows(self, rows: usize) -> ServingStore {
        if let Backend::Sqlite(s) = &self.backend {
            s.set_direct_rows(rows);
        }
        self
    }

    /// SQLite: whether the batch-commit connection is open.
    #[cfg(test)]
    fn writer_connected(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(s) => s.writer_connected(),
            Backend::Postgres(_) => false,
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stored next offset and the time of its last change, per partition of `topic`.
    pub async fn load_offset_times(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<i32, (i64, i64)>, SinkError> {
        let rows = match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.load_offset_times(topic))?,
            Backend::Postgres(s) => s.load_offset_times(topic).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(p, n, t)| (p as i32, (n, t)))
            .collect())
    }

    /// Committed next offsets of `topic`.
    pub async fn load_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        Ok(self
            .load_offset_times(topic)
            .await?
            .into_iter()
            .map(|(p, (n, _))| (p, n))
            .collect())
    }

    /// Whether the store accepts these rollup rows: PostgreSQL merges them
    /// in a transaction that is rolled back (poison-row bisection, see
    /// `quarantine.rs`); SQLite stores any value, so there is nothing to ask.
    pub async fn probe_merge(&self, outputs: &[RollupOutput]) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(s) => s.probe_merge(outputs).await,
        }
    }

    /// An exclusive lock on `name` for as long as the returned guard lives,
    /// or `None` if another process holds it (`tally replay` of one source,
    /// manual assignment). SQLite: a lock file beside the store; PostgreSQL:
    /// a session advisory lock on a connection of its own (released if the
    /// process dies).
    pub async fn lock_source(&self, name: &str) -> Result<Option<SourceLock>, SinkError> {
        Ok(match &self.backend {
            Backend::Sqlite(s) => s.lock_source(name)?.map(SourceLock::File),
            Backend::Postgres(s) => s.lock_source(name).await?.map(SourceLock::Postgres),
        })
    }

    /// Record each rollup's definition the first time a store sees it, and
    /// refuse one whose SQL changed under the same name: its stored rows were
    /// computed by the old definition and new rows would silently mix with
    /// them (a window of an hour read as a day, a new WHERE).
    async fn check_definitions(&self, rollups: &[RollupDef]) -> Result<(), SinkError> {
        let now = chrono::Utc::now().timestamp_millis();
        for def in rollups {
            let (stored, old) = match &self.backend {
                Backend::Sqlite(s) => blocking(|| s.record_definition(def, now))?,
                Backend::Postgres(s) => s.record_definition(def, now).await?,
            };
            let fingerprint = def.fingerprint();
            if stored != fingerprint {
                return Err(schema::changed_definition(def, &stored, &fingerprint, &old));
            }
        }
        Ok(())
    }

    /// The first owner of a partition with no stored offset records where
    /// it starts (from `auto.offset.reset`, resolved to an offset), unless
    /// another writer recorded one first; returns the stored start. So every
    /// partition ever assigned has a row: `as_of` cannot skip it, and its
    /// caught-up time can be recorded before its first event.
    pub async fn register_start(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<i64, SinkError> {
        let start = match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.register_start(topic, partition, next, now_ms))?,
            Backend::Postgres(s) => s.register_start(topic, partition, next, now_ms).await?,
        };
        // The archive starts where the serving offset does.
        self.archive_positions(topic).await?;
        Ok(start)
    }

    /// Set the next offset of `topic`/`partition` (`tally offsets reset`),
    /// returning the one it replaces. A `tally run` that owns the partition
    /// is fenced at its next commit and re-reads from here.
    pub async fn reset_offset(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.reset_offset(topic, partition, next, now_ms)),
            Backend::Postgres(s) => s.reset_offset(topic, partition, next, now_ms).await,
        }
    }

    /// Commit one batch atomically, or report that it was fenced. A failed
    /// commit closes its connection: after SQLITE_FULL (disk full) SQLite
    /// may already have rolled the transaction back itself, and a reused
    /// connection could refuse every later BEGIN even after space is freed.
    pub async fn commit(&self, req: &CommitRequest<'_>) -> Result<CommitOutcome, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.commit(req)),
            Backend::Postgres(s) => s.commit(req).await,
        }
    }

    /// Start the write transaction of a window replacement. It excludes batch
    /// commits until [`ServingStore::replace_windows`] commits: SQLite's
    /// `BEGIN IMMEDIATE`; on PostgreSQL, table locks on the rollups and
    /// `tally_files` (taken in the order batch commits write them).
    pub async fn begin_replace(&self) -> Result<ReplaceTx, SinkError> {
        Ok(match &self.backend {
            Backend::Sqlite(s) => ReplaceTx::Sqlite(blocking(|| s.begin_replace())?),
            Backend::Postgres(s) => ReplaceTx::Postgres(s.begin_replace().await?),
        })
    }

    /// Committed raw archive files (paths relative to the data directory)
    /// in `range` (from `sink::archive::raw_path_range`).
    pub async fn raw_files(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.raw_files(range)),
            Backend::Postgres(s) => s.raw_files(range).await,
        }
    }

    /// Recorded files (raw and dead letters) with paths in `range`, at most
    /// 5,000 (call again after forgetting them).
    pub async fn files_in_range(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.files_in_range(range)),
            Backend::Postgres(s) => s.files_in_range(range).await,
        }
    }

    /// Remove `paths` from the record of committed files (retention: the
    /// files are deleted next).
    pub async fn forget_files(&self, paths: &[String]) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.forget_files(paths)),
            Backend::Postgres(s) => s.forget_files(paths).await,
        }
    }

    /// Committed dead-letter files of `topic`.
    pub async fn dlq_files(&self, topic: &str) -> Result<Vec<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.dlq_files(topic)),
            Backend::Postgres(s) => s.dlq_files(topic).await,
        }
    }

    /// The (partition, offset) of every dead letter of `topic` that
    /// `tally dlq replay` has counted.
    pub async fn replayed_letters(&self, topic: &str) -> Result<Vec<(i32, i64)>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.replayed(topic)),
            Backend::Postgres(s) => s.replayed(topic).await,
        }
    }

    /// [`ServingStore::open_hours`] inside a replacement transaction.
    pub async fn open_hours_in(tx: &mut ReplaceTx) -> Result<Vec<i64>, SinkError> {
        match tx {
            ReplaceTx::Sqlite(t) => blocking(|| SqliteStore::open_hours_in(t)),
            ReplaceTx::Postgres(t) => PgStore::open_hours_in(t).await,
        }
    }

    /// [`ServingStore::raw_files`] inside a replacement transaction.
    pub async fn raw_files_in(
        tx: &mut ReplaceTx,
        range: &PathRange,
    ) -> Result<Vec<String>, SinkError> {
        match tx {
            ReplaceTx::Sqlite(t) => blocking(|| SqliteStore::raw_files_in(t, range)),
            ReplaceTx::Postgres(t) => PgStore::raw_files_in(t, range).await,
        }
    }

    /// In `tx`: delete each rollup's windows in its `[lo, hi)`, then merge
    /// `outputs` (rows outside the ranges must already be filtered out), and commit.
    pub async fn replace_windows(
        &self,
        tx: ReplaceTx,
        ranges: &[(RollupDef, i64, i64)],
        outputs: &[RollupOutput],
    ) -> Result<u64, SinkError> {
        match (&self.backend, tx) {
            (Backend::Sqlite(s), ReplaceTx::Sqlite(t)) => {
                blocking(|| s.replace_windows(t, ranges, outputs))
            }
            (Backend::Postgres(s), ReplaceTx::Postgres(t)) => {
                s.replace_windows(t, ranges, outputs).await
            }
            _ => Err(SinkError::Encode {
                path: redact(&self.url),
                message: "a replacement transaction of another store".into(),
            }),
        }
    }

    /// SQLite: replace the windows of `ranges` with rows sent on the
    /// returned channel while the caller computes the next ones (see
    /// `SqliteStore::replace_windows_streamed`); the handle gives the rows
    /// deleted once the channel is closed and the transaction committed.
    /// `None` on PostgreSQL (its replacement takes every row at once; the
    /// transaction is rolled back).
    pub fn replace_windows_streamed(
        &self,
        tx: ReplaceTx,
        ranges: Vec<(RollupDef, i64, i64)>,
    ) -> Option<ReplaceStream> {
        match (&self.backend, tx) {
            (Backend::Sqlite(s), ReplaceTx::Sqlite(t)) => {
                let (send, rx) = tokio::sync::mpsc::channel(2);
                Some(ReplaceStream {
                    send,
                    writer: s.replace_windows_streamed(t, ranges, rx),
                })
            }
            // Dropped: rolled back.
            _ => None,
        }
    }

    /// Rows of `def` with `lo <= window < hi` (and `window <= max`), by window.
    pub async fn read_rows(
        &self,
        def: &RollupDef,
        lo: i64,
        hi: i64,
        max: Option<i64>,
    ) -> Result<TableRows, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.read_rows(def, lo, hi, max)),
            Backend::Postgres(s) => s.read_rows(def, lo, hi, max).await,
        }
    }

    /// The rows of each `defs[i]` in `ranges[i]`, the committed raw files and
    /// the event hours not yet archived, all from one snapshot (a read
    /// transaction).
    pub async fn read_snapshot(
        &self,
        defs: &[&RollupDef],
        ranges: &[(i64, i64)],
        files: &PathRange,
    ) -> Result<Snapshot, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.read_snapshot(defs, ranges, files)),
            Backend::Postgres(s) => s.read_snapshot(defs, ranges, files).await,
        }
    }

    /// Those of `paths` recorded as committed archive files (primary-key
    /// lookups, a few hundred per statement).
    pub async fn committed_among(&self, paths: &[String]) -> Result<HashSet<String>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.committed_among(paths)),
            Backend::Postgres(s) => s.committed_among(paths).await,
        }
    }

    /// The time up to which the store is complete for `topic` (epoch ms):
    /// the minimum over its partitions of the later of the newest committed
    /// event time and the time the partition was last read to its end.
    pub async fn as_of(&self, topic: &str) -> Result<Option<i64>, SinkError> {
        let rows = match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.as_of_rows(topic))?,
            Backend::Postgres(s) => s.as_of_rows(topic).await?,
        };
        Ok(complete_up_to(rows.into_iter().map(|(a, b)| a.max(b))))
    }

    /// All persistent counters.
    /// Set counters to values (the last verify: `verify_last_at_ms`,
    /// `verify_last_drift_rows`), in one transaction.
    pub async fn set_counters(&self, values: &[(&str, i64)]) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.set_counters(values)),
            Backend::Postgres(s) => s.set_counters(values).await,
        }
    }

    pub async fn counters(&self) -> Result<BTreeMap<String, i64>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => blocking(|| s.counters()),
            Backend::Postgres(s) => s.counters().await,
        }
    }

    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close(),
            Backend::Postgres(s) => s.close().await,
        }
    }
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    };
    // libpq-style parameters: `?password=…`, `&sslpassword=…`.
    match url.split_once('?') {
        Some((head, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            format!("{head}?{}", params.join("&"))
        }
        None => url,
    }
}

/// `as_of` from each partition's completeness time (the later of its newest
/// committed event and when it was last read to its end): the earliest of
/// them, and none while any partition has neither (registered at assignment,
/// nothing committed or caught up yet): never claim data not yet read.
pub(crate) fn complete_up_to(partitions: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    let mut out: Option<i64> = None;
    for t in partitions {
        let t = t?;
        out = Some(out.map_or(t, |o| o.min(t)));
    }
    out
}
