//! The SQLite serving store (the embedded default), in WAL mode, through
//! rusqlite (the bundled SQLite) only: batch commits and folds on the
//! writer's connection ([`writer`]), everything else on one connection of
//! its own. SQLite serializes writers with `BEGIN IMMEDIATE`. Calls block;
//! they run through [`crate::serve::blocking`], off the async workers' queue.

mod archive;
pub(super) mod functions;
pub(super) mod reads;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params_from_iter, types::Value, Connection, OpenFlags};

use super::schema::*;
use super::{
    sq, Cell, CommitOutcome, CommitRequest, FoldStats, PathRange, SinkError, Snapshot, TableRows,
};
use crate::aggregate::{ColumnKind, RollupDef, RollupOutput};
#[cfg(test)]
pub(super) use writer::DEFAULT_FOLD_ROWS;
use writer::{merge_rows, SqliteWriter};

/// Page size of a new SQLite serving store (SQLite's largest).
pub(crate) const SQLITE_PAGE_SIZE: u32 = 65_536;

#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    tables: Vec<TableSpec>,
    /// Schema setup, bookkeeping and job reads; reopened after a failure.
    conn: Mutex<Option<Connection>>,
    writer: SqliteWriter,
}

/// A window replacement in progress: a connection holding `BEGIN IMMEDIATE`
/// (batch commits wait); dropped without [`SqliteStore::replace_windows`], it
/// rolls back.
pub struct SqliteReplace(Connection);

/// The file of a `sqlite://PATH[?options]` URL.
pub(crate) fn url_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// A read-write connection with tally's settings. WAL mode is a property of
/// the file, set by [`SqliteStore::open`].
pub(super) fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    functions::register(&conn)?;
    // 64 MiB of page cache per connection (default 2 MiB): large merge
    // transactions otherwise spill dirty pages to the WAL mid-transaction.
    // A statement journal in a temp file is a pwrite per page (measured: a
    // fifth of all replay CPU); in memory it is a copy.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536; PRAGMA temp_store = memory;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// SQLITE_BUSY or SQLITE_LOCKED.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Create the file if needed with 64 KiB pages, and switch it to WAL mode.
fn prepare_file(path: &Path) -> rusqlite::Result<()> {
    let conn = connect(path)?;
    // Applies to a new file only (before WAL mode is set). Each commit
    // rewrites every page that holds a merged row; with 64 KiB pages the
    // same bytes go to the WAL in a sixteenth of the writes, and the B-tree
    // is two levels shallower. Measured on a 2 M-event replay with 9,000-event
    // batches and the three rollups: 13.6-14.1 CPU-s with 4 KiB pages,
    // 10.3-10.5 with 64 KiB; API point reads unchanged.
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    if pages == 0 {
        conn.execute_batch(&format!("PRAGMA page_size = {SQLITE_PAGE_SIZE}"))?;
    }
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) the file at `url`. Blocks.
    pub(super) fn open(url: &str, rollups: &[RollupDef]) -> Result<SqliteStore, String> {
        let path = url_path(url).ok_or("expected sqlite://PATH")?;
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
        }
        // Another tally opening the same file may hold the lock for a moment
        // (switching to WAL, creating the schema): retry "database is locked".
        let mut attempt = 0;
        loop {
            match prepare_file(&path) {
                Ok(()) => break,
                Err(e) if attempt < 40 && is_busy(&e) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                tables: rollups
                    .iter()
                    .map(|d| TableSpec::new(d, Dialect::Sqlite))
                    .collect(),
                conn: Mutex::new(None),
                writer: SqliteWriter::new(path.clone()),
                path,
            }),
        })
    }

    /// Run `f` on the store's own connection (opened if needed; closed after
    /// a failure, so the next call starts clean).
    pub(super) fn with_conn<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, SinkError> {
        let mut slot = self
            .inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(connect(&self.inner.path).map_err(sq(operation))?);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(SinkError::Encode {
                path: self.inner.path.display().to_string(),
                message: "no connection".into(),
            });
        };
        let out = f(conn);
        if out.is_err() {
            *slot = None;
        }
        out.map_err(sq(operation))
    }

    /// Create the tables, or check them. No long write transaction (readers
    /// such as `tally verify` open the store while `tally run` commits), and
    /// safe when several processes open a new store at once: every statement
    /// is idempotent (IF NOT EXISTS; a concurrent ADD COLUMN is re-checked).
    pub(super) fn setup_schema(
        &self,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<(), SinkError> {
        let mut plan = Vec::new();
        self.with_conn("create bookkeeping tables", |c| {
            for stmt in BOOKKEEPING {
                c.execute_batch(&Dialect::Sqlite.ddl(stmt))?;
            }
            // Stores created before `as_of` existed lack these columns.
            for col in ["max_event_ms", "caught_up_ms"] {
                if !table_columns(c, "tally_offsets")?
                    .iter()
                    .any(|(n, _)| n == col)
                {
                    let added = c.execute_batch(&format!(
                        "ALTER TABLE tally_offsets ADD COLUMN {col} INTEGER"
                    ));
                    if let Err(e) = added {
                        if !e.to_string().contains("duplicate column") {
                            return Err(e);
                        }
                    }
                }
            }
            for def in rollups {
                let have = table_columns(c, &def.name)?;
                let have_delta = table_columns(c, &delta_table(&def.name))?;
                plan.push((def, have, have_delta));
            }
            Ok(())
        })?;
        for (def, have, have_delta) in plan {
            let stmts = rollup_ddl(Dialect::Sqlite, def, &have, &have_delta, window_index)?;
            self.with_conn("create rollup table", |c| {
                stmts.iter().try_for_each(|s| c.execute_batch(s))
            })?;
        }
        Ok(())
    }

    pub(super) fn fold(&self) -> Result<(), SinkError> {
        self.inner.writer.fold(&self.inner.tables)
    }

    pub(super) fn fold_stats(&self) -> FoldStats {
        let w = &self.inner.writer;
        FoldStats {
            folds: w.folds.load(Ordering::Relaxed),
            seconds: w.fold_micros.load(Ordering::Relaxed) as f64 / 1e6,
            rows: w.fold_moved.load(Ordering::Relaxed),
        }
    }

    pub(super) fn set_fold_rows(&self, rows: usize) {
        self.inner.writer.set_fold_rows(rows);
    }

    pub(super) fn set_direct_rows(&self, rows: usize) {
        self.inner.writer.set_direct_rows(rows);
    }

    #[cfg(test)]
    pub(super) fn writer_connected(&self) -> bool {
        self.inner.writer.connected()
    }

    pub(super) fn commit(&self, req: &CommitRequest<'_>) -> Result<CommitOutcome, SinkError> {
        self.inner.writer.commit(&self.inner.tables, req)
    }

    pub(super) fn load_offset_times(&self, topic: &str) -> Result<Vec<(i64, i64, i64)>, SinkError> {
        self.with_conn("load offsets", |c| {
            let mut st = c.prepare_cached(OFFSET_TIMES_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    /// A lock file beside the store, held with `flock` (released if the
    /// process dies), or `None` if another process holds it.
    pub(super) fn lock_source(&self, name: &str) -> Result<Option<std::fs::File>, SinkError> {
        let path = self
            .inner
            .path
            .with_extension(format!("lock-{:016x}", source_hash(name)));
        let open_err = |e: std::io::Error| SinkError::Open {
            url: path.display().to_string(),
            message: e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(open_err)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(open_err(e)),
        }
    }

    pub(super) fn record_definition(
        &self,
        def: &RollupDef,
        now_ms: i64,
    ) -> Result<(String, String), SinkError> {
        self.with_conn("record rollup definitions", |c| {
            c.prepare_cached(RECORD_DEFINITION_SQL)?
                .execute(rusqlite::params![
                    def.name,
                    def.fingerprint(),
                    def.normalized_sql(),
                    now_ms
                ])?;
            c.prepare_cached(READ_DEFINITION_SQL)?
                .query_row([&def.name], |r| Ok((r.get(0)?, r.get(1)?)))
        })
    }

    pub(super) fn register_start(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<i64, SinkError> {
        self.with_conn("register partition start", |c| {
            c.prepare_cached(REGISTER_START_SQL)?
                .execute(rusqlite::params![topic, i64::from(partition), next, now_ms])?;
            c.prepare_cached(READ_OFFSET_SQL)?
                .query_row(rusqlite::params![topic, i64::from(partition)], |r| r.get(0))
        })
    }

    pub(super) fn reset_offset(
        &self,
        topic: &str,
        partition: i32,
        next: i64,
        now_ms: i64,
    ) -> Result<Option<i64>, SinkError> {
        self.with_conn("reset offset", |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let old: Option<i64> = tx
                .prepare_cached(READ_OFFSET_SQL)?
                .query_row(rusqlite::params![topic, i64::from(partition)], |r| r.get(0))
                .map(Some)
                .or_else(no_rows)?;
            tx.prepare_cached(RESET_OFFSET_SQL)?
                .execute(rusqlite::params![topic, i64::from(partition), next, now_ms])?;
            // The archive reads from there too.
            tx.prepare_cached(ARCHIVE_ADVANCE_SQL)?
                .execute(rusqlite::params![topic, i64::from(partition), next, now_ms])?;
            tx.commit()?;
            Ok(old)
        })
    }

    /// A connection of its own in `BEGIN IMMEDIATE`: batch commits wait
    /// until the replacement commits.
    pub(super) fn begin_replace(&self) -> Result<SqliteReplace, SinkError> {
        let conn = connect(&self.inner.path).map_err(sq("begin"))?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sq("begin"))?;
        Ok(SqliteReplace(conn))
    }

    pub(super) fn raw_files(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        self.with_conn("list raw files", |c| raw_files(c, range))
    }

    pub(super) fn raw_files_in(
        tx: &mut SqliteReplace,
        range: &PathRange,
    ) -> Result<Vec<String>, SinkError> {
        raw_files(&tx.0, range).map_err(sq("list raw files"))
    }

    /// Delete each rollup's windows (in its table and its delta), merge
    /// `outputs` into the rollup tables, commit.
    pub(super) fn replace_windows(
        &self,
        tx: SqliteReplace,
        ranges: &[(RollupDef, i64, i64)],
        outputs: &[RollupOutput],
    ) -> Result<u64, SinkError> {
        let conn = tx.0;
        let mut deleted = 0;
        for (def, lo, hi) in ranges {
            for table in [def.name.clone(), delta_table(&def.name)] {
                deleted += conn
                    .prepare_cached(&delete_windows_sql(&table, def))
                    .and_then(|mut st| st.execute([lo, hi]))
                    .map_err(sq("delete windows"))? as u64;
            }
        }
        let direct = vec![true; self.inner.tables.len()];
        merge_rows(&conn, &self.inner.tables, outputs, &direct)?;
        crate::failpoint::failpoint("inside_backfill_transaction");
        conn.execute_batch("COMMIT").map_err(sq("commit"))?;
        Ok(deleted)
    }

    /// [`Self::replace_windows`] with the rows arriving on `rx` while the
    /// caller computes more, on a thread of its own: the windows are deleted
    /// first, each message merged as it comes, and the transaction committed
    /// on `None` (rolled back, with the connection, on an error or when `rx`
    /// closes first).
    pub(super) fn replace_windows_streamed(
        &self,
        tx: SqliteReplace,
        ranges: Vec<(RollupDef, i64, i64)>,
        mut rx: tokio::sync::mpsc::Receiver<Option<Vec<RollupOutput>>>,
    ) -> std::thread::JoinHandle<Result<u64, SinkError>> {
        let inner = self.inner.clone();
        std::thread::spawn(move || {
            let conn = tx.0;
            let mut deleted = 0;
            for (def, lo, hi) in &ranges {
                for table in [def.name.clone(), delta_table(&def.name)] {
                    deleted += conn
                        .prepare_cached(&delete_windows_sql(&table, def))
                        .and_then(|mut st| st.execute([lo, hi]))
                        .map_err(sq("delete windows"))? as u64;
                }
            }
            let direct = vec![true; inner.tables.len()];
            // `None` says commit; a channel closed without it (the caller
            // failed) drops the connection: the transaction rolls back.
            loop {
                match rx.blocking_recv() {
                    Some(Some(outputs)) => merge_rows(&conn, &inner.tables, &outputs, &direct)?,
                    Some(None) => break,
                    None => {
                        return Err(SinkError::Encode {
                            path: inner.path.display().to_string(),
                            message:
                                "the backfill stopped before its last rows; nothing was replaced"
                                    .into(),
                        })
                    }
                }
            }
            crate::failpoint::failpoint("inside_backfill_transaction");
            conn.execute_batch("COMMIT").map_err(sq("commit"))?;
            Ok(deleted)
        })
    }

    pub(super) fn read_rows(
        &self,
        def: &RollupDef,
        lo: i64,
        hi: i64,
        max: Option<i64>,
    ) -> Result<TableRows, SinkError> {
        self.with_conn("read rollup rows", |c| read_rows(c, def, lo, hi, max))
    }

    /// In one read transaction (one snapshot of the WAL).
    pub(super) fn read_snapshot(
        &self,
        defs: &[&RollupDef],
        ranges: &[(i64, i64)],
        files: &PathRange,
    ) -> Result<Snapshot, SinkError> {
        self.with_conn("read a snapshot", |c| {
            let tx = c.transaction()?;
            let mut tables = Vec::with_capacity(defs.len());
            for (def, (lo, hi)) in defs.iter().zip(ranges) {
                tables.push(read_rows(&tx, def, *lo, *hi, None)?);
            }
            let files = raw_files(&tx, files)?;
            let open = open_hours_on(&tx)?;
            tx.rollback()?;
            Ok((tables, files, open))
        })
    }

    pub(super) fn open_hours_in(tx: &mut SqliteReplace) -> Result<Vec<i64>, SinkError> {
        open_hours_on(&tx.0).map_err(sq("read open archive hours"))
    }

    pub(super) fn committed_among(&self, paths: &[String]) -> Result<HashSet<String>, SinkError> {
        self.with_conn("read recorded files", |c| {
            let mut found = HashSet::new();
            for chunk in paths.chunks(PATHS_PER_STATEMENT) {
                let mut st = c.prepare_cached(&recorded_paths_sql(chunk.len()))?;
                let rows = st.query_map(params_from_iter(chunk), |r| r.get::<_, String>(0))?;
                for path in rows {
                    found.insert(path?);
                }
            }
            Ok(found)
        })
    }

    pub(super) fn as_of_rows(&self, topic: &str) -> Result<PartitionTimes, SinkError> {
        self.with_conn("read as_of", |c| {
            let mut st = c.prepare_cached(AS_OF_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub(super) fn files_in_range(&self, range: &PathRange) -> Result<Vec<String>, SinkError> {
        self.with_conn("list files", |c| {
            let mut st = c.prepare_cached(FILES_IN_RANGE_SQL)?;
            let rows = st.query_map([&range.0, &range.1], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub(super) fn forget_files(&self, paths: &[String]) -> Result<(), SinkError> {
        self.with_conn("forget files", |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(FORGET_FILE_SQL)?;
                for p in paths {
                    st.execute([p])?;
                }
            }
            tx.commit()
        })
    }

    pub(super) fn dlq_files(&self, topic: &str) -> Result<Vec<String>, SinkError> {
        self.with_conn("list dead-letter files", |c| {
            let mut st = c.prepare_cached(DLQ_FILES_SQL)?;
            let rows = st.query_map([topic], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub(super) fn replayed(&self, topic: &str) -> Result<Vec<(i32, i64)>, SinkError> {
        self.with_conn("read replayed dead letters", |c| {
            let mut st = c.prepare_cached(REPLAYED_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub(super) fn set_counters(&self, values: &[(&str, i64)]) -> Result<(), SinkError> {
        self.with_conn("set counters", |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(SET_COUNTER_SQL)?;
                for (name, value) in values {
                    st.execute(rusqlite::params![name, value])?;
                }
            }
            tx.commit()
        })
    }

    pub(super) fn counters(&self) -> Result<BTreeMap<String, i64>, SinkError> {
        self.with_conn("read counters", |c| {
            let mut st = c.prepare_cached(COUNTERS_SQL)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Close the store's connection (the writer's closes with the store).
    pub(super) fn close(&self) {
        let mut slot = self
            .inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = None;
    }
}

/// `QueryReturnedNoRows` as `None`.
fn no_rows<T>(e: rusqlite::Error) -> rusqlite::Result<Option<T>> {
    match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    }
}

/// `(name, upper-case type)` of each column of `table`, in order; empty when
/// the table does not exist.
fn table_columns(c: &Connection, table: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = c.prepare_cached("SELECT name, upper(type) FROM pragma_table_info(?)")?;
    let rows = st.query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Committed raw archive files in `range` (paths relative to the data directory).
pub(super) fn open_hours_on(c: &Connection) -> rusqlite::Result<Vec<i64>> {
    let mut st = c.prepare_cached(OPEN_HOURS_SQL)?;
    let rows = st.query_map([], |r| r.get(0))?;
    rows.collect()
}

fn raw_files(c: &Connection, range: &PathRange) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(RAW_FILES_SQL)?;
    let rows = st.query_map([&range.0, &range.1], |r| r.get(0))?;
    rows.collect()
}

/// The rows of `def` with `lo <= window < hi` (and `window <= max`), by
/// window: the rollup table and its delta merged, one row per key.
fn read_rows(
    c: &Connection,
    def: &RollupDef,
    lo: i64,
    hi: i64,
    max: Option<i64>,
) -> rusqlite::Result<TableRows> {
    let mut st = c.prepare_cached(&read_rows_sql(Dialect::Sqlite, def, max.is_some()))?;
    let mut params = vec![Value::Integer(lo), Value::Integer(hi)];
    params.extend(max.map(Value::Integer));
    let mut rows = st.query(params_from_iter(params))?;
    let mut out: TableRows = Vec::new();
    while let Some(r) = rows.next()? {
        let mut cells = Vec::with_capacity(def.columns.len());
        for (i, col) in def.columns.iter().enumerate() {
            let cell = match col.kind {
                ColumnKind::Text => r.get::<_, Option<String>>(i)?.map(Cell::Text),
                ColumnKind::Int => r.get::<_, Option<i64>>(i)?.map(Cell::Int),
                ColumnKind::Real => r.get::<_, Option<f64>>(i)?.map(Cell::Real),
                ColumnKind::Bytes => r.get::<_, Option<Vec<u8>>>(i)?.map(Cell::Bytes),
            };
            cells.push(cell.unwrap_or(Cell::Null));
        }
        out.push(cells);
    }
    Ok(out)
}
