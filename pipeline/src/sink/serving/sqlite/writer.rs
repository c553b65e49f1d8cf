//! SQLite batch commits, on one rusqlite connection opened on first use.
//! Each rollup row is one step of a prepared one-row upsert: no statement
//! text per chunk, no copy of every value into an owned parameter, and a
//! one-row statement needs no statement journal. After a failed commit the
//! connection is closed (rolling back whatever SQLite left open, e.g. after
//! SQLITE_FULL) and the next commit opens a new one.
//!
//! Batch commits merge into each rollup's small `<rollup>__delta` table; once
//! the deltas hold `serving.sqlite_fold_rows` rows, each commit is followed
//! by a fold of one range of keys into the rollup table, in a transaction of
//! its own (a commit rewrites every page it touches, a delta has few, and a
//! range touches one slice of the rollup table). Readers sum both tables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use datafusion::arrow::array::Array;

use super::super::schema::*;
use super::super::{sq, CommitOutcome, CommitRequest, SinkError};
use crate::aggregate::RollupOutput;

/// Rows upserted into the SQLite delta tables between folds, unless set
/// (`serving.sqlite_fold_rows`).
pub(in super::super) const DEFAULT_FOLD_ROWS: usize = 200_000;
/// `serving.sqlite_direct_rows` unless set: a fold slice's worth.
const DEFAULT_DIRECT_ROWS: usize = DEFAULT_FOLD_ROWS / FOLD_SLICES;

/// The write side of a SQLite store (see the module docs).
#[derive(Debug)]
pub(super) struct SqliteWriter {
    pub(super) path: PathBuf,
    conn: Mutex<Option<rusqlite::Connection>>,
    /// Where folding the delta tables stands.
    fold: Mutex<FoldState>,
    fold_rows: AtomicUsize,
    /// A table's rows in one batch from which they skip the delta table
    /// (`serving.sqlite_direct_rows`).
    direct_rows: AtomicUsize,
    /// Folds done by this process, their time (µs) and the rows they moved.
    pub(super) folds: AtomicU64,
    pub(super) fold_micros: AtomicU64,
    pub(super) fold_moved: AtomicU64,
}

/// Ranged folds move at least `1 / FOLD_SLICES` of `serving.sqlite_fold_rows`
/// each, so one cycle over the key space takes at most this many folds.
pub(super) const FOLD_SLICES: usize = 8;

/// The writer's view of the delta tables, one entry per rollup table (in
/// `ServingStore::tables` order).
#[derive(Debug, Default)]
struct FoldState {
    /// Rows in each delta table: counted when the write connection opens and
    /// when a cycle of ranged folds wraps; in between an upper bound (rows
    /// upserted, less rows folded).
    rows: Vec<usize>,
    /// Where each table's next ranged fold starts: after this leading key,
    /// or at the start. Not stored: a new process starts at the start.
    cursor: Vec<Option<rusqlite::types::Value>>,
}

impl SqliteWriter {
    pub(super) fn new(path: PathBuf) -> SqliteWriter {
        SqliteWriter {
            path,
            conn: Mutex::new(None),
            fold: Mutex::new(FoldState::default()),
            fold_rows: AtomicUsize::new(DEFAULT_FOLD_ROWS),
            direct_rows: AtomicUsize::new(DEFAULT_DIRECT_ROWS),
            folds: AtomicU64::new(0),
            fold_micros: AtomicU64::new(0),
            fold_moved: AtomicU64::new(0),
        }
    }

    /// `serving.sqlite_fold_rows` (see [`super::SqliteStore::set_fold_rows`]).
    pub(super) fn set_fold_rows(&self, rows: usize) {
        self.fold_rows.store(rows, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(super) fn connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    /// `serving.sqlite_direct_rows`.
    pub(super) fn set_direct_rows(&self, rows: usize) {
        self.direct_rows.store(rows, Ordering::Relaxed);
    }

    pub(super) fn commit(
        &self,
        tables: &[TableSpec],
        req: &CommitRequest<'_>,
    ) -> Result<CommitOutcome, SinkError> {
        // A panic elsewhere cannot leave the connection mid-transaction:
        // every failed commit below drops it.
        let mut slot = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut fold = self
            .fold
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = self.connection(&mut slot, &mut fold, tables)?;
        let rows: Vec<usize> = tables
            .iter()
            .map(|t| {
                let outputs = req.outputs.iter().filter(|o| o.rollup == t.name);
                outputs
                    .flat_map(|o| o.batches.iter())
                    .map(|b| b.num_rows())
                    .sum()
            })
            .collect();
        // A table's rows of a large batch (catching up) go straight to the
        // rollup table: they touch about as many of its pages as a fold
        // slice would, and skip the delta's insert, fold and delete.
        let direct: Vec<bool> = rows
            .iter()
            .map(|&n| n > 0 && n >= self.direct_rows.load(Ordering::Relaxed).max(1))
            .collect();
        let added: Vec<usize> = rows
            .iter()
            .zip(&direct)
            .map(|(&n, &d)| if d { 0 } else { n })
            .collect();
        let outcome = commit_sqlite(conn, tables, req, &direct);
        match outcome {
            Err(_) => *slot = None,
            Ok(CommitOutcome::Committed) => {
                for (rows, a) in fold.rows.iter_mut().zip(&added) {
                    *rows += a;
                }
                let held: usize = fold.rows.iter().sum();
                let fold_rows = self.fold_rows.load(Ordering::Relaxed);
                if held >= fold_rows {
                    // In its own transaction once the batch is visible: the
                    // fold delays the next commit, not this batch. It moves
                    // one range of keys: at least as many rows as this
                    // commit added (so the deltas stop growing), at least
                    // 1/FOLD_SLICES of the threshold, and at least the rows
                    // over the threshold (so deltas left larger, e.g. by a
                    // lower setting, shrink back at once); all rows if that
                    // is as many (always with a threshold of 0). A failed
                    // fold rolls back whole and is tried after the next
                    // batch.
                    let target = (fold_rows / FOLD_SLICES)
                        .max(added.iter().sum())
                        .max(held - fold_rows);
                    let target = (target < held).then_some(target);
                    if let Err(e) = self.timed_fold(conn, tables, &mut fold, target) {
                        tracing::warn!(error = %e, "folding the SQLite delta tables failed; retrying after the next batch");
                        *slot = None;
                    }
                }
            }
            Ok(CommitOutcome::Fenced { .. }) => {}
        }
        outcome
    }
}

impl SqliteWriter {
    fn timed_fold(
        &self,
        conn: &rusqlite::Connection,
        tables: &[TableSpec],
        state: &mut FoldState,
        target: Option<usize>,
    ) -> Result<(), SinkError> {
        let started = std::time::Instant::now();
        let moved = fold_in_transaction(conn, tables, state, target)?;
        self.folds.fetch_add(1, Ordering::Relaxed);
        self.fold_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.fold_moved.fetch_add(moved as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The write connection, opened if needed. On open, the rows the delta
    /// tables hold (e.g. left by the previous process) are counted, so a
    /// process that restarts often still folds.
    fn connection<'a>(
        &self,
        slot: &'a mut Option<rusqlite::Connection>,
        state: &mut FoldState,
        tables: &[TableSpec],
    ) -> Result<&'a mut rusqlite::Connection, SinkError> {
        if slot.is_none() {
            let conn = super::connect(&self.path).map_err(sq("open the write connection"))?;
            let mut rows = Vec::with_capacity(tables.len());
            for spec in tables {
                rows.push(count_delta(&conn, spec)?);
            }
            *state = FoldState {
                cursor: vec![None; rows.len()],
                rows,
            };
            *slot = Some(conn);
        }
        slot.as_mut().ok_or_else(|| SinkError::Encode {
            path: self.path.display().to_string(),
            message: "no write connection".into(),
        })
    }

    /// Fold all rows of the delta tables into the rollup tables now, in one
    /// transaction.
    pub(super) fn fold(&self, tables: &[TableSpec]) -> Result<(), SinkError> {
        let mut slot = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut fold = self
            .fold
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = self.connection(&mut slot, &mut fold, tables)?;
        let folded = self.timed_fold(conn, tables, &mut fold, None);
        if folded.is_err() {
            *slot = None;
        }
        folded
    }
}

fn count_delta(conn: &rusqlite::Connection, spec: &TableSpec) -> Result<usize, SinkError> {
    let n: i64 = conn
        .prepare_cached(&format!(
            "SELECT count(*) FROM {}",
            quote(&delta_table(&spec.name))
        ))
        .and_then(|mut st| st.query_row([], |r| r.get(0)))
        .map_err(sq("count the delta rows"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Fold delta rows into their rollup tables (merged as the rollup's merge
/// rules say), then delete them, in one transaction: a crash leaves all of
/// the fold or none of it, and readers (who read both tables in one
/// statement or transaction) see the same sums before and after.
///
/// `target: None` folds every row. `Some(n)` folds about `n` rows in all,
/// shared by the tables as their deltas' sizes: each table's rows of one
/// range of its leading key, from its cursor on. The range ends at a whole
/// leading key, so it may hold a few more rows; at the end of the key space
/// the cursor wraps to the start. Ranges keep a fold's page writes to one
/// slice of the rollup table, so no single fold stalls the next commit for
/// long. Returns the rows folded.
fn fold_in_transaction(
    conn: &rusqlite::Connection,
    tables: &[TableSpec],
    state: &mut FoldState,
    target: Option<usize>,
) -> Result<usize, SinkError> {
    use rusqlite::types::Value;
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(sq("begin the fold"))?;
    let held = state.rows.iter().sum::<usize>().max(1);
    let mut next: Vec<(Option<Value>, usize)> = Vec::with_capacity(tables.len());
    let mut moved = 0;
    for (i, spec) in tables.iter().enumerate() {
        let rows = state.rows.get(i).copied().unwrap_or(0);
        let cursor = state.cursor.get(i).cloned().flatten();
        let share = target.map(|t| (t * rows).div_ceil(held).max(1));
        let (lo, hi) = match share {
            // Nothing to fold (`rows` is an upper bound).
            Some(_) if rows == 0 => {
                next.push((cursor, 0));
                continue;
            }
            Some(n) if spec.key_count > 0 => {
                let mut st = conn
                    .prepare_cached(&spec.range_end_sql[usize::from(cursor.is_some())])
                    .map_err(sq("find the fold range"))?;
                let skip = i64::try_from(n - 1).unwrap_or(i64::MAX);
                let mut params: Vec<(&str, &dyn rusqlite::ToSql)> = vec![(":n", &skip)];
                if let Some(lo) = &cursor {
                    params.push((":lo", lo));
                }
                let hi: Option<Value> = st
                    .query_row(params.as_slice(), |r| r.get(0))
                    .map(Some)
                    .or_else(|e| {
                        if e == rusqlite::Error::QueryReturnedNoRows {
                            Ok(None)
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(sq("find the fold range"))?;
                (cursor, hi)
            }
            _ => (None, None),
        };
        let mut params: Vec<(&str, &dyn rusqlite::ToSql)> = Vec::with_capacity(2);
        if let Some(lo) = &lo {
            params.push((":lo", lo));
        }
        if let Some(hi) = &hi {
            params.push((":hi", hi));
        }
        let [insert, delete] =
            &spec.fold_range_sql[usize::from(lo.is_some())][usize::from(hi.is_some())];
        conn.prepare_cached(insert)
            .and_then(|mut st| st.execute(params.as_slice()))
            .map_err(sq("fold the delta table"))?;
        let deleted = conn
            .prepare_cached(delete)
            .and_then(|mut st| st.execute(params.as_slice()))
            .map_err(sq("fold the delta table"))?;
        moved += deleted;
        next.push(match (target, &hi) {
            (None, _) => (None, 0),
            // A range to the end of the key space: the next starts over, from
            // a fresh count.
            (Some(_), None) => (None, count_delta(conn, spec)?),
            (Some(_), Some(_)) => (hi.clone(), rows.saturating_sub(deleted)),
        });
    }
    crate::failpoint::failpoint("inside_fold_transaction");
    conn.execute_batch("COMMIT")
        .map_err(sq("commit the fold"))?;
    state.cursor = next.iter().map(|(c, _)| c.clone()).collect();
    state.rows = next.into_iter().map(|(_, r)| r).collect();
    Ok(moved)
}

/// One batch commit on a rusqlite connection (see the module docs).
fn commit_sqlite(
    conn: &rusqlite::Connection,
    tables: &[TableSpec],
    req: &CommitRequest<'_>,
    direct: &[bool],
) -> Result<CommitOutcome, SinkError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sq("begin"))?;

    // 1. Fence.
    let mut stored: BTreeMap<i32, i64> = BTreeMap::new();
    {
        let mut st = conn.prepare_cached(FENCE_SQL).map_err(sq("read offsets"))?;
        let mut rows = st.query([req.topic]).map_err(sq("read offsets"))?;
        while let Some(r) = rows.next().map_err(sq("read offsets"))? {
            let p: i64 = r.get(0).map_err(sq("read offsets"))?;
            stored.insert(p as i32, r.get(1).map_err(sq("read offsets"))?);
        }
    }
    for (p, range) in req.partitions {
        let have = stored.get(p).copied();
        if have != range.expected_start {
            conn.execute_batch("ROLLBACK").map_err(sq("rollback"))?;
            return Ok(CommitOutcome::Fenced {
                partition: *p,
                expected: range.expected_start,
                stored: have,
            });
        }
    }

    // 2. Merge rollups, into the delta tables (folded by `SqliteWriter::commit`)
    //    or, for a table's rows of a large batch, into the rollup table.
    merge_rows(conn, tables, req.outputs, direct)?;
    crate::failpoint::failpoint("inside_serving_transaction");

    // 3. Record files.
    {
        let mut st = conn
            .prepare_cached(RECORD_FILE_SQL)
            .map_err(sq("record files"))?;
        let mut pending = conn
            .prepare_cached(RECORD_PENDING_SQL)
            .map_err(sq("record files"))?;
        for f in req.files {
            st.execute(rusqlite::params![
                f.path,
                f.kind.as_str(),
                req.topic,
                i64::from(f.partition),
                f.first_offset,
                f.last_offset,
                f.rows as i64,
                f.bytes as i64,
                req.now_ms
            ])
            .map_err(sq("record files"))?;
            // Under its staging name until renamed after this commit.
            pending
                .execute(rusqlite::params![f.path, req.topic, i64::from(f.partition)])
                .map_err(sq("record files"))?;
        }
    }

    if !req.open_hours.is_empty() {
        let mut st = conn
            .prepare_cached(&open_hour_sql(Dialect::Sqlite))
            .map_err(sq("note open archive hours"))?;
        for (p, hour, through) in req.open_hours {
            st.execute(rusqlite::params![req.topic, i64::from(*p), hour, through])
                .map_err(sq("note open archive hours"))?;
        }
    }

    // Dead letters counted by a replay.
    if let Some((topic, letters)) = req.replayed {
        let mut st = conn
            .prepare_cached(RECORD_REPLAYED_SQL)
            .map_err(sq("record replayed dead letters"))?;
        for (p, o) in letters {
            st.execute(rusqlite::params![topic, i64::from(*p), o, req.now_ms])
                .map_err(sq("record replayed dead letters"))?;
        }
    }

    // 4. Offsets and counters.
    {
        let mut st = conn
            .prepare_cached(&advance_sql(Dialect::Sqlite))
            .map_err(sq("advance offsets"))?;
        for (p, range) in req.partitions {
            st.execute(rusqlite::params![
                req.topic,
                i64::from(*p),
                range.next_offset(),
                req.now_ms,
                req.max_event_ms.get(p)
            ])
            .map_err(sq("advance offsets"))?;
        }
    }
    {
        let sql = if req.archive_with_batch {
            ARCHIVE_ADVANCE_SQL
        } else {
            ARCHIVE_START_SQL
        };
        let mut st = conn.prepare_cached(sql).map_err(sq("archive positions"))?;
        for (p, range) in req.partitions {
            let at = if req.archive_with_batch {
                range.next_offset()
            } else {
                range.expected_start.unwrap_or(range.first)
            };
            st.execute(rusqlite::params![req.topic, i64::from(*p), at, req.now_ms])
                .map_err(sq("archive positions"))?;
        }
    }
    if !req.caught_up.is_empty() {
        let mut st = conn
            .prepare_cached(&caught_up_sql(Dialect::Sqlite))
            .map_err(sq("mark caught-up partitions"))?;
        for (p, next) in req.caught_up {
            st.execute(rusqlite::params![
                req.sealed_at_ms,
                req.topic,
                i64::from(*p),
                next
            ])
            .map_err(sq("mark caught-up partitions"))?;
        }
    }
    {
        let mut st = conn
            .prepare_cached(COUNTER_SQL)
            .map_err(sq("update counters"))?;
        for (name, delta) in req.counters.iter().filter(|(_, d)| *d != 0) {
            st.execute(rusqlite::params![name, delta])
                .map_err(sq("update counters"))?;
        }
    }
    conn.execute_batch("COMMIT").map_err(sq("commit"))?;
    Ok(CommitOutcome::Committed)
}

/// Each rollup row, in key order, through the table's prepared one-row
/// upsert into its delta table, or into the rollup table where `direct`.
pub(super) fn merge_rows(
    conn: &rusqlite::Connection,
    tables: &[TableSpec],
    outputs: &[RollupOutput],
    direct: &[bool],
) -> Result<(), SinkError> {
    for out in outputs {
        let Some(t) = tables.iter().position(|t| t.name == out.rollup) else {
            continue;
        };
        let spec = &tables[t];
        let sql = if direct.get(t).copied().unwrap_or(false) {
            &spec.direct_upsert_sql
        } else {
            &spec.delta_upsert_sql
        };
        let mut st = conn
            .prepare_cached(sql)
            .map_err(sq("prepare the rollup upsert"))?;
        for b in &out.batches {
            let order = spec.leading_key_order(b)?;
            let cols: Vec<TypedColumn<'_>> = spec
                .columns
                .iter()
                .enumerate()
                .map(|(c, (_, kind))| TypedColumn::new(b.column(c).as_ref(), *kind))
                .collect();
            for &row in &order {
                for (i, col) in cols.iter().enumerate() {
                    match col {
                        TypedColumn::Text(a) => {
                            st.raw_bind_parameter(i + 1, (!a.is_null(row)).then(|| a.value(row)))
                        }
                        TypedColumn::Int(a) => {
                            st.raw_bind_parameter(i + 1, (!a.is_null(row)).then(|| a.value(row)))
                        }
                        TypedColumn::Real(a) => {
                            st.raw_bind_parameter(i + 1, (!a.is_null(row)).then(|| a.value(row)))
                        }
                        TypedColumn::Bytes(a) => {
                            st.raw_bind_parameter(i + 1, (!a.is_null(row)).then(|| a.value(row)))
                        }
                    }
                    .map_err(sq("merge rollup rows"))?;
                }
                st.raw_execute().map_err(sq("merge rollup rows"))?;
            }
        }
    }
    Ok(())
}
