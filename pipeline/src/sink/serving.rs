//! The serving store: one table per rollup plus tally's bookkeeping tables,
//! in SQLite (WAL mode, the default) or PostgreSQL (chosen by URL). Every
//! batch commits in one transaction that
//! 1. fences: each partition's stored next offset must equal the offset the
//!    batch was built on, so a stale or zombie writer fails here;
//! 2. merges the rollup rows (count/sum add, min/max take the extreme);
//!    on SQLite into each rollup's small `<rollup>__delta` table; once the
//!    deltas hold `serving.sqlite_fold_rows` rows, each commit is followed
//!    by a fold of one range of keys into the rollup table (in a
//!    transaction of its own; a commit rewrites every page it touches, a
//!    delta has few, and a range touches one slice of the rollup table).
//!    Readers sum a rollup and its delta;
//! 3. records the archive files the batch wrote;
//! 4. advances the offsets and the counters.
//!
//! SQLite serializes writers with `BEGIN IMMEDIATE`. PostgreSQL writers (many
//! `tally run` processes) take a transaction-scoped advisory lock per
//! (topic, partition) before the fence read, and merge rows in key order so
//! that concurrent batches touching the same keys do not deadlock.
//!
//! The same statement text serves both engines: it is written with `?`
//! placeholders and numbered (`$1`, `$2`, ...) for PostgreSQL.
//!
//! SQL here is built only from identifiers validated by the SQL catalog
//! (`[a-z_][a-z0-9_]*`); every value is a bound parameter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::row::{RowConverter, SortField};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection as _, Row};

use super::archive::WrittenFile;
use super::{db, sq, SinkError};
use crate::aggregate::{ColumnKind, MergeRule, RollupDef, RollupOutput};
use crate::batch::PartitionRange;

/// Bound parameters per statement: SQLite allows 32766, PostgreSQL 65535.
const MAX_PARAMS: usize = 32_000;
const MAX_ROWS_PER_STATEMENT: usize = 1_000;

/// `{int}`, `{real}` and `{noid}` are filled in per engine.
const BOOKKEEPING: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tally_offsets (
        topic TEXT NOT NULL,
        partition {int} NOT NULL,
        next_offset {int} NOT NULL,
        updated_at_ms {int} NOT NULL,
        max_event_ms {int},
        caught_up_ms {int},
        PRIMARY KEY (topic, partition)
    ){noid}",
    "CREATE TABLE IF NOT EXISTS tally_files (
        path TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        topic TEXT NOT NULL,
        partition {int} NOT NULL,
        first_offset {int} NOT NULL,
        last_offset {int} NOT NULL,
        rows {int} NOT NULL,
        bytes {int} NOT NULL,
        committed_at_ms {int} NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tally_counters (
        name TEXT PRIMARY KEY,
        value {int} NOT NULL
    ){noid}",
    // The definition each rollup table was computed with (see
    // `ServingStore::check_definitions`).
    "CREATE TABLE IF NOT EXISTS tally_rollups (
        name TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        definition TEXT NOT NULL,
        recorded_at_ms {int} NOT NULL
    )",
];

/// The SQL engine behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Number `?` placeholders as `$1, $2, ...` for PostgreSQL; `?N` becomes `$N`.
    pub fn sql(self, text: &str) -> String {
        match self {
            Dialect::Sqlite => text.to_string(),
            Dialect::Postgres => number_placeholders(text),
        }
    }
    fn int(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER",
            Dialect::Postgres => "BIGINT",
        }
    }
    fn sql_type(self, kind: ColumnKind) -> &'static str {
        match (self, kind) {
            (_, ColumnKind::Text) => "TEXT",
            (d, ColumnKind::Int) => d.int(),
            (Dialect::Sqlite, ColumnKind::Real) => "REAL",
            (Dialect::Postgres, ColumnKind::Real) => "DOUBLE PRECISION",
        }
    }
    /// Two-argument minimum and maximum.
    fn least(self) -> &'static str {
        match self {
            Dialect::Sqlite => "min",
            Dialect::Postgres => "least",
        }
    }
    fn greatest(self) -> &'static str {
        match self {
            Dialect::Sqlite => "max",
            Dialect::Postgres => "greatest",
        }
    }
    fn ddl(self, template: &str) -> String {
        template.replace("{int}", self.int()).replace(
            "{noid}",
            match self {
                Dialect::Sqlite => " WITHOUT ROWID",
                // Room on each page for the new version of an upserted row, so
                // most updates are HOT (no index insert): measured 15% less
                // server CPU per batch commit than the default 100 (README).
                Dialect::Postgres => " WITH (fillfactor = 70)",
            },
        )
    }
}

/// `?` -> `$n` (in order) and `?N` -> `$N`, outside quoted strings and identifiers.
pub fn number_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut n = 0;
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                out.push('$');
                if chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                        out.push(d);
                        chars.next();
                    }
                } else {
                    n += 1;
                    out.push_str(&n.to_string());
                }
            }
            (None, c) => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Run the same code against whichever pool the store has.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

#[derive(Debug, Clone)]
struct TableSpec {
    name: String,
    columns: Vec<(String, ColumnKind)>,
    key_count: usize,
    /// Full-chunk upsert statement and its row count.
    rows_per_statement: usize,
    upsert_head: String,
    upsert_tail: String,
    row_placeholder: String,
    /// PostgreSQL: the whole batch as one `UNNEST` of column arrays.
    unnest_sql: String,
    /// SQLite batch commits: a one-row upsert into the delta table, prepared
    /// once and stepped per row.
    delta_upsert_sql: String,
    /// SQLite: the same into the rollup table itself.
    direct_upsert_sql: String,
    /// SQLite: fold the delta rows of one range of the leading key, then
    /// delete them; indexed `[has lower bound][has upper bound]`, with the
    /// bounds as `:lo` (exclusive) and `:hi` (inclusive).
    fold_range_sql: [[[String; 2]; 2]; 2],
    /// SQLite: the leading key `:n` rows into the delta after `:lo` (or
    /// from its start), where a ranged fold of about `:n` rows ends.
    range_end_sql: [String; 2],
}

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
}

/// One value read back from a rollup table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Real(f64),
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
pub type TableRows = Vec<Vec<Cell>>;

#[derive(Debug, Clone)]
pub struct ServingStore {
    pool: Pool,
    dialect: Dialect,
    url: String,
    tables: Vec<TableSpec>,
    /// SQLite: the batch-commit connection.
    writer: Option<Arc<SqliteWriter>>,
}

/// Held while a `tally replay` runs (see [`ServingStore::lock_source`]).
#[derive(Debug)]
pub enum SourceLock {
    File(std::fs::File),
    Postgres(sqlx::PgConnection),
}

/// The write transaction of a window replacement (see [`ServingStore::begin_replace`]).
pub enum ReplaceTx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Rows upserted into the SQLite delta tables between folds, unless set
/// with [`ServingStore::with_fold_rows`] (`serving.sqlite_fold_rows`).
const DEFAULT_FOLD_ROWS: usize = 200_000;
/// `serving.sqlite_direct_rows` unless set: a fold slice's worth.
const DEFAULT_DIRECT_ROWS: usize = DEFAULT_FOLD_ROWS / FOLD_SLICES;

impl super::archive::CommittedFiles for ServingStore {
    async fn committed_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, SinkError> {
        ServingStore::committed_among(self, paths).await
    }
}

/// The SQLite view of rollup table `table` that merges in its delta table:
/// one row per key, as the API reads them.
pub fn merged_view(table: &str) -> String {
    format!("{table}__merged")
}

/// The SQLite delta table of rollup table `table` (see [`SqliteWriter`]).
pub fn delta_table(table: &str) -> String {
    format!("{table}__delta")
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn merge_sql(dialect: Dialect, table: &str, col: &str, rule: MergeRule) -> String {
    let (t, c) = (quote(table), quote(col));
    match rule {
        MergeRule::Sum => format!("{c} = coalesce({t}.{c} + excluded.{c}, {t}.{c}, excluded.{c})"),
        MergeRule::Min => format!(
            "{c} = coalesce({}({t}.{c}, excluded.{c}), {t}.{c}, excluded.{c})",
            dialect.least()
        ),
        MergeRule::Max => format!(
            "{c} = coalesce({}({t}.{c}, excluded.{c}), {t}.{c}, excluded.{c})",
            dialect.greatest()
        ),
    }
}

impl TableSpec {
    fn new(def: &RollupDef, dialect: Dialect) -> TableSpec {
        let columns: Vec<(String, ColumnKind)> = def
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.kind))
            .collect();
        let names: Vec<String> = columns.iter().map(|(n, _)| quote(n)).collect();
        let keys: Vec<String> = def.keys().iter().map(|c| quote(&c.name)).collect();
        let sets: Vec<String> = def
            .measures()
            .iter()
            .filter_map(|c| c.merge.map(|m| merge_sql(dialect, &def.name, &c.name, m)))
            .collect();
        let row_placeholder = format!("({})", vec!["?"; columns.len()].join(","));
        let arrays: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (_, k))| format!("${}::{}[]", i + 1, dialect.sql_type(*k)))
            .collect();
        let unnest_sql = format!(
            "INSERT INTO {} ({}) SELECT * FROM UNNEST({}) ON CONFLICT ({}) DO UPDATE SET {}",
            quote(&def.name),
            names.join(", "),
            arrays.join(", "),
            keys.join(", "),
            sets.join(", ")
        );
        let delta = delta_table(&def.name);
        let delta_sets: Vec<String> = def
            .measures()
            .iter()
            .filter_map(|c| c.merge.map(|m| merge_sql(dialect, &delta, &c.name, m)))
            .collect();
        let delta_upsert_sql = format!(
            "INSERT INTO {} ({}) VALUES {row_placeholder} ON CONFLICT ({}) DO UPDATE SET {}",
            quote(&delta),
            names.join(", "),
            keys.join(", "),
            delta_sets.join(", ")
        );
        let lead = keys.first().cloned().unwrap_or_default();
        let range = |lo: bool, hi: bool| -> [String; 2] {
            let cond = match (lo, hi) {
                // `WHERE true`: SQLite's parser needs it between a SELECT and ON CONFLICT.
                (false, false) => "true".to_string(),
                (true, false) => format!("{lead} > :lo"),
                (false, true) => format!("{lead} <= :hi"),
                (true, true) => format!("{lead} > :lo AND {lead} <= :hi"),
            };
            [
                format!(
                    "INSERT INTO {} ({}) SELECT {} FROM {} WHERE {cond} ON CONFLICT ({}) DO UPDATE SET {}",
                    quote(&def.name),
                    names.join(", "),
                    names.join(", "),
                    quote(&delta),
                    keys.join(", "),
                    sets.join(", ")
                ),
                format!("DELETE FROM {} WHERE {cond}", quote(&delta)),
            ]
        };
        let fold_range_sql = [
            [range(false, false), range(false, true)],
            [range(true, false), range(true, true)],
        ];
        let range_end_sql = [
            format!(
                "SELECT {lead} FROM {} ORDER BY {lead} LIMIT 1 OFFSET :n",
                quote(&delta)
            ),
            format!(
                "SELECT {lead} FROM {} WHERE {lead} > :lo ORDER BY {lead} LIMIT 1 OFFSET :n",
                quote(&delta)
            ),
        ];
        let direct_upsert_sql = format!(
            "INSERT INTO {} ({}) VALUES {row_placeholder} ON CONFLICT ({}) DO UPDATE SET {}",
            quote(&def.name),
            names.join(", "),
            keys.join(", "),
            sets.join(", ")
        );
        TableSpec {
            unnest_sql,
            delta_upsert_sql,
            direct_upsert_sql,
            fold_range_sql,
            range_end_sql,
            name: def.name.clone(),
            key_count: def.key_count,
            rows_per_statement: (MAX_PARAMS / columns.len().max(1))
                .clamp(1, MAX_ROWS_PER_STATEMENT),
            upsert_head: format!(
                "INSERT INTO {} ({}) VALUES ",
                quote(&def.name),
                names.join(", ")
            ),
            upsert_tail: format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                keys.join(", "),
                sets.join(", ")
            ),
            row_placeholder,
            columns,
        }
    }

    fn upsert_sql(&self, rows: usize, dialect: Dialect) -> String {
        let mut s = String::with_capacity(
            self.upsert_head.len()
                + rows * (self.row_placeholder.len() + 1)
                + self.upsert_tail.len(),
        );
        s.push_str(&self.upsert_head);
        for i in 0..rows {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&self.row_placeholder);
        }
        s.push_str(&self.upsert_tail);
        dialect.sql(&s)
    }

    /// Row order for merging: by key. PostgreSQL: concurrent writers lock
    /// shared rows in one order. SQLite: each statement touches fewer B-tree
    /// pages, so fewer go through its statement journal.
    fn row_order(&self, b: &RecordBatch) -> Result<Option<Vec<usize>>, SinkError> {
        if b.num_rows() < 2 {
            return Ok(None);
        }
        // Arrow's row format: each key as one byte string that compares as
        // the columns do in turn, so the sort runs on `memcmp`s instead of
        // a dynamic comparator per column (lexsort; 2-3x slower here).
        let err = |e: datafusion::arrow::error::ArrowError| SinkError::Encode {
            path: self.name.clone(),
            message: format!("sort rollup rows by key: {e}"),
        };
        let keys: Vec<_> = (0..self.key_count).map(|i| b.column(i).clone()).collect();
        let converter = RowConverter::new(
            keys.iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect(),
        )
        .map_err(err)?;
        let rows = converter.convert_columns(&keys).map_err(err)?;
        let mut order: Vec<usize> = (0..b.num_rows()).collect();
        order.sort_unstable_by(|x, y| rows.row(*x).cmp(&rows.row(*y)));
        Ok(Some(order))
    }
}

impl TableSpec {
    /// Row order for a SQLite merge: by the leading key column only. Rows
    /// of one leading key are neighbours in the B-tree, so this gives the
    /// page locality of a full key sort at a fraction of its cost (no lock
    /// order to keep: SQLite has one writer).
    fn leading_key_order(&self, b: &RecordBatch) -> Result<Vec<usize>, SinkError> {
        if b.num_rows() < 2 || self.key_count == 0 {
            return Ok((0..b.num_rows()).collect());
        }
        let idx =
            datafusion::arrow::compute::sort_to_indices(b.column(0), None, None).map_err(|e| {
                SinkError::Encode {
                    path: self.name.clone(),
                    message: format!("sort rollup rows by key: {e}"),
                }
            })?;
        Ok(idx.values().iter().map(|i| *i as usize).collect())
    }
}

/// A canonical rollup column, downcast once per batch.
enum TypedColumn<'a> {
    Text(&'a datafusion::arrow::array::StringArray),
    Int(&'a datafusion::arrow::array::Int64Array),
    Real(&'a datafusion::arrow::array::Float64Array),
}

impl<'a> TypedColumn<'a> {
    fn new(arr: &'a dyn Array, kind: ColumnKind) -> TypedColumn<'a> {
        match kind {
            ColumnKind::Text => TypedColumn::Text(arr.as_string::<i32>()),
            ColumnKind::Int => TypedColumn::Int(arr.as_primitive::<Int64Type>()),
            ColumnKind::Real => TypedColumn::Real(arr.as_primitive::<Float64Type>()),
        }
    }
}

/// Merge rollup rows (count/sum add, min/max take the extreme) into the
/// store's tables, inside the caller's transaction.
trait MergeRows {
    async fn merge_rows(
        &mut self,
        store: &ServingStore,
        outputs: &[RollupOutput],
    ) -> Result<(), SinkError>;
}

/// SQLite: multi-row `INSERT … VALUES (…), (…) ON CONFLICT DO UPDATE`, up to
/// 1,000 rows per statement.
impl MergeRows for sqlx::SqliteConnection {
    async fn merge_rows(
        &mut self,
        store: &ServingStore,
        outputs: &[RollupOutput],
    ) -> Result<(), SinkError> {
        for out in outputs {
            let Some(spec) = store.tables.iter().find(|t| t.name == out.rollup) else {
                continue;
            };
            for b in &out.batches {
                let order: Vec<usize> = spec
                    .row_order(b)?
                    .unwrap_or_else(|| (0..b.num_rows()).collect());
                // Downcast each column once, not per cell.
                let cols: Vec<TypedColumn<'_>> = spec
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(c, (_, kind))| TypedColumn::new(b.column(c).as_ref(), *kind))
                    .collect();
                let mut start = 0;
                while start < b.num_rows() {
                    let n = (b.num_rows() - start).min(spec.rows_per_statement);
                    let sql = spec.upsert_sql(n, store.dialect);
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for &row in &order[start..start + n] {
                        for col in &cols {
                            q = match col {
                                TypedColumn::Text(a) => {
                                    q.bind((!a.is_null(row)).then(|| a.value(row).to_string()))
                                }
                                TypedColumn::Int(a) => {
                                    q.bind((!a.is_null(row)).then(|| a.value(row)))
                                }
                                TypedColumn::Real(a) => {
                                    q.bind((!a.is_null(row)).then(|| a.value(row)))
                                }
                            };
                        }
                    }
                    q.execute(&mut *self)
                        .await
                        .map_err(db("merge rollup rows"))?;
                    start += n;
                }
            }
        }
        Ok(())
    }
}

/// PostgreSQL: one `INSERT … SELECT * FROM UNNEST($1::text[], …) ON CONFLICT
/// DO UPDATE` per rollup batch (one array per column, rows in key order),
/// a single statement text per table whatever the row count.
impl MergeRows for sqlx::PgConnection {
    async fn merge_rows(
        &mut self,
        store: &ServingStore,
        outputs: &[RollupOutput],
    ) -> Result<(), SinkError> {
        for out in outputs {
            let Some(spec) = store.tables.iter().find(|t| t.name == out.rollup) else {
                continue;
            };
            for b in &out.batches {
                if b.num_rows() == 0 {
                    continue;
                }
                let order: Vec<usize> = spec
                    .row_order(b)?
                    .unwrap_or_else(|| (0..b.num_rows()).collect());
                let mut q = sqlx::query(AssertSqlSafe(spec.unnest_sql.clone()));
                for (c, (_, kind)) in spec.columns.iter().enumerate() {
                    let arr = b.column(c);
                    q = match kind {
                        ColumnKind::Text => {
                            let a = arr.as_string::<i32>();
                            q.bind(
                                order
                                    .iter()
                                    .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                    .collect::<Vec<Option<&str>>>(),
                            )
                        }
                        ColumnKind::Int => {
                            let a = arr.as_primitive::<Int64Type>();
                            q.bind(
                                order
                                    .iter()
                                    .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                    .collect::<Vec<Option<i64>>>(),
                            )
                        }
                        ColumnKind::Real => {
                            let a = arr.as_primitive::<Float64Type>();
                            q.bind(
                                order
                                    .iter()
                                    .map(|&i| (!a.is_null(i)).then(|| a.value(i)))
                                    .collect::<Vec<Option<f64>>>(),
                            )
                        }
                    };
                }
                q.execute(&mut *self)
                    .await
                    .map_err(db("merge rollup rows"))?;
            }
        }
        Ok(())
    }
}

/// `?1`: low, `?2`: high, `?3`: cap (if `capped`). SQLite: the main and the
/// delta table, one row per key (merged as the rollup's merge rules say).
fn read_rows_sql(d: Dialect, def: &RollupDef, capped: bool) -> String {
    let w = quote(def.window_name());
    let cap = if capped {
        format!(" AND {w} <= ?3")
    } else {
        String::new()
    };
    let range = format!("{w} >= ?1 AND {w} < ?2{cap}");
    if d == Dialect::Postgres {
        return format!(
            "SELECT * FROM {} WHERE {range} ORDER BY {w}",
            quote(&def.name)
        );
    }
    format!(
        "{} ORDER BY {w}",
        merged_sql(def, &format!(" WHERE {range}"))
    )
}

/// SQLite: one row per key over the rollup table and its delta table
/// (`filter` applies to both), merged as the rollup's merge rules say.
fn merged_sql(def: &RollupDef, filter: &str) -> String {
    let keys: Vec<String> = def.keys().iter().map(|c| quote(&c.name)).collect();
    let cols: Vec<String> = def
        .columns
        .iter()
        .map(|c| {
            let name = quote(&c.name);
            match c.merge {
                None => name,
                Some(MergeRule::Sum) => format!("sum({name}) AS {name}"),
                Some(MergeRule::Min) => format!("min({name}) AS {name}"),
                Some(MergeRule::Max) => format!("max({name}) AS {name}"),
            }
        })
        .collect();
    format!(
        "SELECT {} FROM (SELECT * FROM {}{filter} UNION ALL SELECT * FROM {}{filter}) GROUP BY {}",
        cols.join(", "),
        quote(&def.name),
        quote(&delta_table(&def.name)),
        keys.join(", ")
    )
}

/// Read the rows of `def` with `lo <= window < hi` (and `window <= max` if
/// given), ordered by window, on `$conn`.
macro_rules! read_rows {
    ($dialect:expr, $conn:expr, $def:expr, $lo:expr, $hi:expr, $max:expr) => {{
        let def: &RollupDef = $def;
        let max: Option<i64> = $max;
        let sql = $dialect.sql(&read_rows_sql($dialect, def, max.is_some()));
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind($lo).bind($hi);
        if let Some(m) = max {
            q = q.bind(m);
        }
        let rows = q
            .fetch_all(&mut *$conn)
            .await
            .map_err(db("read rollup rows"))?;
        let mut out: TableRows = Vec::with_capacity(rows.len());
        for r in rows {
            let mut cells = Vec::with_capacity(def.columns.len());
            for (i, c) in def.columns.iter().enumerate() {
                let cell = match c.kind {
                    ColumnKind::Text => r
                        .try_get::<Option<String>, _>(i)
                        .map_err(db("read rollup rows"))?
                        .map(Cell::Text),
                    ColumnKind::Int => r
                        .try_get::<Option<i64>, _>(i)
                        .map_err(db("read rollup rows"))?
                        .map(Cell::Int),
                    ColumnKind::Real => r
                        .try_get::<Option<f64>, _>(i)
                        .map_err(db("read rollup rows"))?
                        .map(Cell::Real),
                };
                cells.push(cell.unwrap_or(Cell::Null));
            }
            out.push(cells);
        }
        Ok::<TableRows, SinkError>(out)
    }};
}

/// Committed raw archive files (paths relative to the data directory), on `$conn`.
macro_rules! raw_files {
    ($conn:expr) => {{
        let rows = sqlx::query("SELECT path FROM tally_files WHERE kind = 'raw' ORDER BY path")
            .fetch_all(&mut *$conn)
            .await
            .map_err(db("list raw files"))?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(db("list raw files")))
            .collect::<Result<Vec<String>, SinkError>>()
    }};
}

/// The statements of a batch commit after the rollup merge, shared by both
/// engines (`?` placeholders; see [`Dialect::sql`]).
const FENCE_SQL: &str = "SELECT partition, next_offset FROM tally_offsets WHERE topic = ?";
const RECORD_FILE_SQL: &str = "INSERT INTO tally_files (path, kind, topic, partition, first_offset, last_offset, rows, bytes, committed_at_ms)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT (path) DO UPDATE SET rows = excluded.rows, bytes = excluded.bytes, committed_at_ms = excluded.committed_at_ms";
const COUNTER_SQL: &str = "INSERT INTO tally_counters (name, value) VALUES (?, ?)
     ON CONFLICT (name) DO UPDATE SET value = tally_counters.value + excluded.value";

/// Advance a partition's offset, keeping the newest event time (for as_of).
fn advance_sql(d: Dialect) -> String {
    format!(
        "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms, max_event_ms) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (topic, partition) DO UPDATE SET
           next_offset = excluded.next_offset,
           updated_at_ms = excluded.updated_at_ms,
           max_event_ms = CASE
             WHEN excluded.max_event_ms IS NULL THEN tally_offsets.max_event_ms
             WHEN tally_offsets.max_event_ms IS NULL THEN excluded.max_event_ms
             ELSE {}(tally_offsets.max_event_ms, excluded.max_event_ms) END",
        d.greatest()
    )
}

/// A partition read to its end is complete up to the seal time, but only if
/// the stored offset is the one the consumer saw the end at.
fn caught_up_sql(d: Dialect) -> String {
    format!(
        "UPDATE tally_offsets SET caught_up_ms = {}(coalesce(caught_up_ms, 0), ?)
         WHERE topic = ? AND partition = ? AND next_offset = ?",
        d.greatest()
    )
}

/// One batch commit on `$pool` (see the module docs).
macro_rules! commit {
    ($store:expr, $pool:expr, $begin:expr, $req:expr) => {{
        let store: &ServingStore = $store;
        let req: &CommitRequest<'_> = $req;
        let d = store.dialect;
        let mut tx = $pool.begin_with($begin).await.map_err(db("begin"))?;
        if d == Dialect::Postgres {
            // Serialize the writers of each partition (in partition order).
            for p in req.partitions.keys() {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), $2)")
                    .bind(req.topic)
                    .bind(*p)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("lock partition"))?;
            }
        }

        // 1. Fence.
        let rows = sqlx::query(AssertSqlSafe(d.sql(FENCE_SQL)))
            .bind(req.topic)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("read offsets"))?;
        let mut stored: BTreeMap<i32, i64> = BTreeMap::new();
        for r in rows {
            let p: i64 = r.try_get(0).map_err(db("read offsets"))?;
            let n: i64 = r.try_get(1).map_err(db("read offsets"))?;
            stored.insert(p as i32, n);
        }
        for (p, range) in req.partitions {
            let have = stored.get(p).copied();
            if have != range.expected_start {
                tx.rollback().await.map_err(db("rollback"))?;
                return Ok(CommitOutcome::Fenced {
                    partition: *p,
                    expected: range.expected_start,
                    stored: have,
                });
            }
        }

        // 2. Merge rollups.
        MergeRows::merge_rows(&mut *tx, store, req.outputs).await?;
        crate::failpoint::failpoint("inside_serving_transaction");

        // 3. Record files.
        let record = d.sql(RECORD_FILE_SQL);
        for f in req.files {
            sqlx::query(AssertSqlSafe(record.clone()))
                .bind(&f.path)
                .bind(f.kind.as_str())
                .bind(req.topic)
                .bind(i64::from(f.partition))
                .bind(f.first_offset)
                .bind(f.last_offset)
                .bind(f.rows as i64)
                .bind(f.bytes as i64)
                .bind(req.now_ms)
                .execute(&mut *tx)
                .await
                .map_err(db("record files"))?;
        }

        // 4. Offsets (with the newest event time, for as_of) and counters.
        let advance = d.sql(&advance_sql(d));
        for (p, range) in req.partitions {
            sqlx::query(AssertSqlSafe(advance.clone()))
                .bind(req.topic)
                .bind(i64::from(*p))
                .bind(range.next_offset())
                .bind(req.now_ms)
                .bind(req.max_event_ms.get(p).copied())
                .execute(&mut *tx)
                .await
                .map_err(db("advance offsets"))?;
        }
        let caught_up = d.sql(&caught_up_sql(d));
        for (p, next) in req.caught_up {
            sqlx::query(AssertSqlSafe(caught_up.clone()))
                .bind(req.sealed_at_ms)
                .bind(req.topic)
                .bind(i64::from(*p))
                .bind(*next)
                .execute(&mut *tx)
                .await
                .map_err(db("mark caught-up partitions"))?;
        }
        let count = d.sql(COUNTER_SQL);
        for (name, delta) in req.counters {
            if *delta == 0 {
                continue;
            }
            sqlx::query(AssertSqlSafe(count.clone()))
                .bind(name)
                .bind(*delta)
                .execute(&mut *tx)
                .await
                .map_err(db("update counters"))?;
        }
        tx.commit().await.map_err(db("commit"))?;
        Ok(CommitOutcome::Committed)
    }};
}

/// SQLite batch commits, on one rusqlite connection (the same bundled SQLite
/// as sqlx) opened on first use. Each rollup row is one step of a prepared
/// one-row upsert: no statement text per chunk, no copy of every value into
/// an owned parameter, no hand-off to a connection thread, and a one-row
/// statement needs no statement journal. After a failed commit the
/// connection is closed (rolling back whatever SQLite left open, e.g. after
/// SQLITE_FULL) and the next commit opens a new one.
#[derive(Debug)]
struct SqliteWriter {
    path: PathBuf,
    conn: Mutex<Option<rusqlite::Connection>>,
    /// Where folding the delta tables stands.
    fold: Mutex<FoldState>,
    fold_rows: usize,
    /// A table's rows in one batch from which they skip the delta table
    /// (`serving.sqlite_direct_rows`).
    direct_rows: usize,
    /// Folds done by this process, their time (µs) and the rows they moved.
    folds: AtomicU64,
    fold_micros: AtomicU64,
    fold_moved: AtomicU64,
}

/// Ranged folds move at least `1 / FOLD_SLICES` of `serving.sqlite_fold_rows`
/// each, so one cycle over the key space takes at most this many folds.
const FOLD_SLICES: usize = 8;

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
    fn new(path: PathBuf, fold_rows: usize) -> SqliteWriter {
        SqliteWriter {
            path,
            conn: Mutex::new(None),
            fold: Mutex::new(FoldState::default()),
            fold_rows,
            direct_rows: DEFAULT_DIRECT_ROWS,
            folds: AtomicU64::new(0),
            fold_micros: AtomicU64::new(0),
            fold_moved: AtomicU64::new(0),
        }
    }

    fn open(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // As the sqlx connections (see `open_sqlite`); WAL mode is a property
        // of the file, set when the store was opened.
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536; PRAGMA temp_store = memory;",
        )?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn commit(
        &self,
        store: &ServingStore,
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
        let conn = self.connection(&mut slot, &mut fold, store)?;
        let rows: Vec<usize> = store
            .tables
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
            .map(|&n| n > 0 && n >= self.direct_rows.max(1))
            .collect();
        let added: Vec<usize> = rows
            .iter()
            .zip(&direct)
            .map(|(&n, &d)| if d { 0 } else { n })
            .collect();
        let outcome = commit_sqlite(conn, store, req, &direct);
        match outcome {
            Err(_) => *slot = None,
            Ok(CommitOutcome::Committed) => {
                for (rows, a) in fold.rows.iter_mut().zip(&added) {
                    *rows += a;
                }
                let held: usize = fold.rows.iter().sum();
                if held >= self.fold_rows {
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
                    let target = (self.fold_rows / FOLD_SLICES)
                        .max(added.iter().sum())
                        .max(held - self.fold_rows);
                    let target = (target < held).then_some(target);
                    if let Err(e) = self.timed_fold(conn, &store.tables, &mut fold, target) {
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
        store: &ServingStore,
    ) -> Result<&'a mut rusqlite::Connection, SinkError> {
        if slot.is_none() {
            let conn = Self::open(&self.path).map_err(sq("open the write connection"))?;
            let mut rows = Vec::with_capacity(store.tables.len());
            for spec in &store.tables {
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
    fn fold(&self, store: &ServingStore) -> Result<(), SinkError> {
        let mut slot = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut fold = self
            .fold
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = self.connection(&mut slot, &mut fold, store)?;
        let folded = self.timed_fold(conn, &store.tables, &mut fold, None);
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
    store: &ServingStore,
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
    merge_rows_sqlite(conn, &store.tables, req.outputs, direct)?;
    crate::failpoint::failpoint("inside_serving_transaction");

    // 3. Record files.
    {
        let mut st = conn
            .prepare_cached(RECORD_FILE_SQL)
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

/// SQLite: each rollup row, in key order, through the table's prepared
/// one-row upsert.
fn merge_rows_sqlite(
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
                    }
                    .map_err(sq("merge rollup rows"))?;
                }
                st.raw_execute().map_err(sq("merge rollup rows"))?;
            }
        }
    }
    Ok(())
}

/// Run blocking work without stalling the other async tasks (the API and
/// the consumer share the runtime).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `(name, upper-case type)` of each column of `$table`, in order; empty when
/// the table does not exist.
macro_rules! table_columns {
    ($dialect:expr, $conn:expr, $table:expr) => {{
        let sql = match $dialect {
            Dialect::Sqlite => "SELECT name, upper(type) FROM pragma_table_info(?)",
            Dialect::Postgres => {
                "SELECT column_name::text, upper(data_type)::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
            }
        };
        sqlx::query(sql)
            .bind($table)
            .fetch_all(&mut *$conn)
            .await
            .map_err(db("inspect table"))?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
            .collect::<Result<Vec<(String, String)>, sqlx::Error>>()
            .map_err(db("inspect table"))
    }};
}

/// Create `$def`'s table if absent, or check that its columns still match.
macro_rules! ensure_table {
    ($dialect:expr, $conn:expr, $def:expr, $window_index:expr) => {{
        let d: Dialect = $dialect;
        let def: &RollupDef = $def;
        // Optional: makes range scans by window (API top-K) index ranges, at
        // roughly a third more ingest CPU (one more B-tree write per upsert).
        let index_name = quote(&format!("{}__by_window", def.name));
        let index = if $window_index {
            format!("CREATE INDEX IF NOT EXISTS {index_name} ON {} ({})", quote(&def.name), quote(def.window_name()))
        } else {
            format!("DROP INDEX IF EXISTS {index_name}")
        };
        let have = table_columns!(d, $conn, def.name.as_str())?;
        let wanted: Vec<(String, String)> = def.columns.iter().map(|c| (c.name.clone(), d.sql_type(c.kind).to_string())).collect();
        let mut cols: Vec<String> = def
            .columns
            .iter()
            .map(|c| {
                let null = if c.merge.is_none() { " NOT NULL" } else { "" };
                format!("{} {}{null}", quote(&c.name), d.sql_type(c.kind))
            })
            .collect();
        let keys: Vec<String> = def.keys().iter().map(|c| quote(&c.name)).collect();
        cols.push(format!("PRIMARY KEY ({})", keys.join(", ")));
        let ddl = |table: &str| d.ddl(&format!("CREATE TABLE IF NOT EXISTS {} (\n  {}\n){{noid}}", quote(table), cols.join(",\n  ")));
        if have.is_empty() {
            sqlx::query(AssertSqlSafe(ddl(&def.name))).execute(&mut *$conn).await.map_err(db("create rollup table"))?;
            sqlx::query(AssertSqlSafe(index)).execute(&mut *$conn).await.map_err(db("create or drop the rollup window index"))?;
        } else if have != wanted {
            let show = |v: &[(String, String)]| v.iter().map(|(n, t)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
            return Err(SinkError::Schema {
                table: def.name.clone(),
                message: format!(
                    "the existing table has columns ({}) but {} now produces ({}); \
                     give the changed rollup a new file name (a new table) and backfill it, or drop the old table \
                     (on SQLite also its __delta table and __merged view)",
                    show(&have),
                    def.file.display(),
                    show(&wanted)
                ),
            });
        } else {
            sqlx::query(AssertSqlSafe(index)).execute(&mut *$conn).await.map_err(db("create or drop the rollup window index"))?;
        }
        if d == Dialect::Sqlite {
            // SQLite batch commits land in the delta table (see `SqliteWriter`).
            let delta = delta_table(&def.name);
            let delta_have = table_columns!(d, $conn, delta.as_str())?;
            if !delta_have.is_empty() && delta_have != wanted {
                return Err(SinkError::Schema {
                    table: delta.clone(),
                    message: format!("the delta table's columns do not match {}; drop both tables and backfill", def.file.display()),
                });
            }
            sqlx::query(AssertSqlSafe(ddl(&delta))).execute(&mut *$conn).await.map_err(db("create rollup delta table"))?;
            // For people and tools that query the store: the current rows.
            let view = format!("CREATE VIEW IF NOT EXISTS {} AS {}", quote(&merged_view(&def.name)), merged_sql(def, ""));
            sqlx::query(AssertSqlSafe(view)).execute(&mut *$conn).await.map_err(db("create rollup view"))?;
        }
        Ok::<(), SinkError>(())
    }};
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
        let mut writer = None;
        let (pool, dialect) = if url.starts_with("sqlite:") {
            let (pool, path) = open_sqlite(url).await.map_err(open_err)?;
            writer = Some(Arc::new(SqliteWriter::new(path, DEFAULT_FOLD_ROWS)));
            (Pool::Sqlite(pool), Dialect::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(|e| open_err(e.to_string()))?;
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await
                .map_err(|e| open_err(e.to_string()))?;
            (Pool::Postgres(pool), Dialect::Postgres)
        } else {
            return Err(open_err("unsupported serving.url scheme; use sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB".into()));
        };
        let store = ServingStore {
            pool,
            dialect,
            url: url.to_string(),
            tables: rollups.iter().map(|d| TableSpec::new(d, dialect)).collect(),
            writer,
        };
        match &store.pool {
            Pool::Sqlite(p) => {
                let mut conn = p.acquire().await.map_err(db("schema setup"))?;
                store.setup_schema(&mut conn, rollups, window_index).await?;
            }
            Pool::Postgres(p) => {
                // Several processes may create a new store at once: one at a time.
                let mut conn = p.acquire().await.map_err(db("schema setup"))?;
                sqlx::query("SELECT pg_advisory_lock(7461626101)")
                    .execute(&mut *conn)
                    .await
                    .map_err(db("schema lock"))?;
                let r = store
                    .setup_schema_pg(&mut conn, rollups, window_index)
                    .await;
                let _ = sqlx::query("SELECT pg_advisory_unlock(7461626101)")
                    .execute(&mut *conn)
                    .await;
                r?;
            }
        }
        store.check_definitions(rollups).await?;
        Ok(store)
    }

    async fn setup_schema(
        &self,
        conn: &mut sqlx::SqliteConnection,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<(), SinkError> {
        // Schema setup without a long write transaction (readers such as
        // `tally verify` open the store while `tally run` commits), and safe
        // when several processes open a new store at once: every statement is
        // idempotent (IF NOT EXISTS; a concurrent ADD COLUMN is re-checked).
        for stmt in BOOKKEEPING {
            sqlx::query(AssertSqlSafe(Dialect::Sqlite.ddl(stmt)))
                .execute(&mut *conn)
                .await
                .map_err(db("create bookkeeping tables"))?;
        }
        // Stores created before `as_of` existed lack these columns.
        for col in ["max_event_ms", "caught_up_ms"] {
            let cols = table_columns!(Dialect::Sqlite, conn, "tally_offsets")?;
            if !cols.iter().any(|(c, _)| c == col) {
                let added = sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE tally_offsets ADD COLUMN {col} INTEGER"
                )))
                .execute(&mut *conn)
                .await;
                if let Err(e) = added {
                    if !e.to_string().contains("duplicate column") {
                        return Err(db("upgrade tally_offsets")(e));
                    }
                }
            }
        }
        for def in rollups {
            ensure_table!(Dialect::Sqlite, conn, def, window_index)?;
        }
        Ok(())
    }

    async fn setup_schema_pg(
        &self,
        conn: &mut sqlx::PgConnection,
        rollups: &[RollupDef],
        window_index: bool,
    ) -> Result<(), SinkError> {
        for stmt in BOOKKEEPING {
            sqlx::query(AssertSqlSafe(Dialect::Postgres.ddl(stmt)))
                .execute(&mut *conn)
                .await
                .map_err(db("create bookkeeping tables"))?;
        }
        for def in rollups {
            ensure_table!(Dialect::Postgres, conn, def, window_index)?;
        }
        Ok(())
    }

    /// SQLite: fold the delta tables into the rollup tables now (batch
    /// commits also do, every `serving.sqlite_fold_rows` rows). No effect on
    /// PostgreSQL.
    pub async fn fold(&self) -> Result<(), SinkError> {
        match &self.writer {
            Some(w) => blocking(|| w.fold(self)),
            None => Ok(()),
        }
    }

    /// SQLite: folds of the delta tables done by this process, their
    /// seconds and the rows they moved, in all; zeros on PostgreSQL.
    pub fn fold_stats(&self) -> FoldStats {
        match &self.writer {
            Some(w) => FoldStats {
                folds: w.folds.load(Ordering::Relaxed),
                seconds: w.fold_micros.load(Ordering::Relaxed) as f64 / 1e6,
                rows: w.fold_moved.load(Ordering::Relaxed),
            },
            None => FoldStats::default(),
        }
    }

    /// SQLite: fold the delta tables into the rollup tables once `rows`
    /// rows went into them (0: on every commit). No effect on PostgreSQL.
    pub fn with_fold_rows(mut self, rows: usize) -> ServingStore {
        if let Some(w) = self.writer.as_mut() {
            match Arc::get_mut(w) {
                Some(w) => w.fold_rows = rows,
                None => {
                    let path = w.path.clone();
                    *w = Arc::new(SqliteWriter::new(path, rows));
                }
            }
        }
        self
    }

    /// SQLite: a rollup's rows of one batch go straight to its table,
    /// skipping the delta, from `rows` rows on. No effect on PostgreSQL.
    pub fn with_direct_rows(mut self, rows: usize) -> ServingStore {
        if let Some(w) = self.writer.as_mut() {
            match Arc::get_mut(w) {
                Some(w) => w.direct_rows = rows,
                None => {
                    let mut new = SqliteWriter::new(w.path.clone(), w.fold_rows);
                    new.direct_rows = rows;
                    *w = Arc::new(new);
                }
            }
        }
        self
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stored next offset and the time of its last change, per partition of `topic`.
    pub async fn load_offset_times(
        &self,
        topic: &str,
    ) -> Result<BTreeMap<i32, (i64, i64)>, SinkError> {
        let sql = self
            .dialect
            .sql("SELECT partition, next_offset, updated_at_ms FROM tally_offsets WHERE topic = ?");
        let rows: Vec<(i64, i64, i64)> = on_pool!(&self.pool, p => {
            sqlx::query(AssertSqlSafe(sql))
                .bind(topic)
                .fetch_all(p)
                .await
                .map_err(db("load offsets"))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(db("load offsets"))?
        });
        Ok(rows
            .into_iter()
            .map(|(p, n, t)| (p as i32, (n, t)))
            .collect())
    }

    /// Committed next offsets of `topic`.
    pub async fn load_offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        let sql = self
            .dialect
            .sql("SELECT partition, next_offset FROM tally_offsets WHERE topic = ?");
        let rows: Vec<(i64, i64)> = on_pool!(&self.pool, p => {
            sqlx::query(AssertSqlSafe(sql))
                .bind(topic)
                .fetch_all(p)
                .await
                .map_err(db("load offsets"))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(db("load offsets"))?
        });
        Ok(rows.into_iter().map(|(p, n)| (p as i32, n)).collect())
    }

    /// Whether the store accepts these rollup rows: PostgreSQL merges them
    /// in a transaction that is rolled back (poison-row bisection, see
    /// `quarantine.rs`); SQLite stores any value, so there is nothing to ask.
    pub async fn probe_merge(&self, outputs: &[RollupOutput]) -> Result<(), SinkError> {
        let Pool::Postgres(p) = &self.pool else {
            return Ok(());
        };
        let mut tx = p.begin().await.map_err(db("begin"))?;
        let merged = MergeRows::merge_rows(&mut *tx, self, outputs).await;
        tx.rollback().await.map_err(db("rollback"))?;
        merged
    }

    /// An exclusive lock on `name` for as long as the returned guard lives,
    /// or `None` if another process holds it (`tally replay` of one source).
    /// SQLite: a lock file beside the store; PostgreSQL: a session advisory
    /// lock on a connection of its own (released if the process dies).
    pub async fn lock_source(&self, name: &str) -> Result<Option<SourceLock>, SinkError> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        match (&self.writer, self.dialect) {
            (Some(w), Dialect::Sqlite) => {
                let path = w.path.with_extension(format!("lock-{h:016x}"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| SinkError::Open {
                        url: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                match file.try_lock() {
                    Ok(()) => Ok(Some(SourceLock::File(file))),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => Err(SinkError::Open {
                        url: path.display().to_string(),
                        message: e.to_string(),
                    }),
                }
            }
            _ => {
                let opts = PgConnectOptions::from_str(&self.url).map_err(db("lock source"))?;
                let mut conn = sqlx::PgConnection::connect_with(&opts)
                    .await
                    .map_err(db("lock source"))?;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
                    .bind(format!("tally.source:{name}"))
                    .fetch_one(&mut conn)
                    .await
                    .map_err(db("lock source"))?;
                Ok(got.then_some(SourceLock::Postgres(conn)))
            }
        }
    }

    /// Record each rollup's definition the first time a store sees it, and
    /// refuse one whose SQL changed under the same name: its stored rows were
    /// computed by the old definition and new rows would silently mix with
    /// them (a window of an hour read as a day, a new WHERE).
    async fn check_definitions(&self, rollups: &[RollupDef]) -> Result<(), SinkError> {
        let insert = self.dialect.sql(
            "INSERT INTO tally_rollups (name, fingerprint, definition, recorded_at_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        );
        let read = self
            .dialect
            .sql("SELECT fingerprint, definition FROM tally_rollups WHERE name = ?");
        let now = chrono::Utc::now().timestamp_millis();
        for def in rollups {
            let (fingerprint, normalized) = (def.fingerprint(), def.normalized_sql());
            let (stored, old): (String, String) = on_pool!(&self.pool, p => {
                sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(&def.name)
                    .bind(&fingerprint)
                    .bind(&normalized)
                    .bind(now)
                    .execute(p)
                    .await
                    .map_err(db("record rollup definitions"))?;
                sqlx::query_as(AssertSqlSafe(read.clone())).bind(&def.name).fetch_one(p).await.map_err(db("read rollup definitions"))?
            });
            if stored != fingerprint {
                return Err(SinkError::Schema {
                    table: def.name.clone(),
                    message: format!(
                        "{} has changed since this serving store recorded it (definition {stored}, now {fingerprint}); its rows \
                         were computed by the old definition, and new rows would silently mix with them. Give the new definition \
                         a new name (a new file under sql.rollups_dir, then `tally backfill` fills its history), or restore the old \
                         SQL. The recorded definition: {old}",
                        def.file.display()
                    ),
                });
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
        let insert = self.dialect.sql(
            "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (topic, partition) DO NOTHING",
        );
        let read = self
            .dialect
            .sql("SELECT next_offset FROM tally_offsets WHERE topic = ? AND partition = ?");
        on_pool!(&self.pool, p => {
            sqlx::query(AssertSqlSafe(insert))
                .bind(topic)
                .bind(i64::from(partition))
                .bind(next)
                .bind(now_ms)
                .execute(p)
                .await
                .map_err(db("register partition start"))?;
            sqlx::query_scalar(AssertSqlSafe(read))
                .bind(topic)
                .bind(i64::from(partition))
                .fetch_one(p)
                .await
                .map_err(db("register partition start"))
        })
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
        let read = self
            .dialect
            .sql("SELECT next_offset FROM tally_offsets WHERE topic = ? AND partition = ?");
        let write = self.dialect.sql(
            "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
             ON CONFLICT (topic, partition) DO UPDATE SET
               next_offset = excluded.next_offset, updated_at_ms = excluded.updated_at_ms, caught_up_ms = NULL",
        );
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await.map_err(db("begin"))?;
            if self.dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), $2)")
                    .bind(topic)
                    .bind(partition)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("lock partition"))?;
            }
            let old: Option<i64> = sqlx::query_scalar(AssertSqlSafe(read))
                .bind(topic)
                .bind(i64::from(partition))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("read offsets"))?;
            sqlx::query(AssertSqlSafe(write))
                .bind(topic)
                .bind(i64::from(partition))
                .bind(next)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(db("reset offset"))?;
            tx.commit().await.map_err(db("commit"))?;
            Ok(old)
        })
    }

    /// Commit one batch atomically, or report that it was fenced.
    pub async fn commit(&self, req: &CommitRequest<'_>) -> Result<CommitOutcome, SinkError> {
        // A connection whose transaction failed is closed, not returned to the
        // pool: after SQLITE_FULL (disk full) SQLite may already have rolled
        // the transaction back itself, sqlx's deferred ROLLBACK then fails, and
        // the pooled connection would refuse every later BEGIN ("non-zero
        // transaction depth") even after space is freed.
        match (&self.pool, &self.writer) {
            (Pool::Sqlite(_), Some(w)) => blocking(|| w.commit(self, req)),
            (Pool::Sqlite(p), None) => {
                let mut conn = p.acquire().await.map_err(db("acquire"))?;
                let outcome = async { commit!(self, conn, "BEGIN IMMEDIATE", req) }.await;
                if outcome.is_err() {
                    let _ = conn.detach().close().await;
                }
                outcome
            }
            (Pool::Postgres(p), _) => {
                let mut conn = p.acquire().await.map_err(db("acquire"))?;
                let outcome = async { commit!(self, conn, "BEGIN", req) }.await;
                if outcome.is_err() {
                    let _ = conn.detach().close().await;
                }
                outcome
            }
        }
    }

    /// Start the write transaction of a window replacement. It excludes batch
    /// commits until [`ServingStore::replace_windows`] commits: SQLite's
    /// `BEGIN IMMEDIATE`; on PostgreSQL, table locks on the rollups and
    /// `tally_files` (taken in the order batch commits write them).
    pub async fn begin_replace(&self) -> Result<ReplaceTx, SinkError> {
        match &self.pool {
            Pool::Sqlite(p) => Ok(ReplaceTx::Sqlite(
                p.begin_with("BEGIN IMMEDIATE").await.map_err(db("begin"))?,
            )),
            Pool::Postgres(p) => {
                let mut tx = p.begin().await.map_err(db("begin"))?;
                let mut tables: Vec<String> = self.tables.iter().map(|t| quote(&t.name)).collect();
                tables.push("tally_files".into());
                sqlx::query(AssertSqlSafe(format!(
                    "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                    tables.join(", ")
                )))
                .execute(&mut *tx)
                .await
                .map_err(db("lock rollup tables"))?;
                Ok(ReplaceTx::Postgres(tx))
            }
        }
    }

    /// Committed raw archive files (paths relative to the data directory).
    pub async fn raw_files(&self) -> Result<Vec<String>, SinkError> {
        on_pool!(&self.pool, p => {
            let mut conn = p.acquire().await.map_err(db("list raw files"))?;
            raw_files!(conn)
        })
    }

    /// [`ServingStore::raw_files`] inside a replacement transaction.
    pub async fn raw_files_in(tx: &mut ReplaceTx) -> Result<Vec<String>, SinkError> {
        match tx {
            ReplaceTx::Sqlite(t) => raw_files!((*t)),
            ReplaceTx::Postgres(t) => raw_files!((*t)),
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
        macro_rules! replace {
            ($tx:expr) => {{
                let mut tx = $tx;
                let mut deleted = 0;
                for (def, lo, hi) in ranges {
                    let w = quote(def.window_name());
                    // SQLite: the windows' rows may be in the delta table too.
                    let mut tables = vec![def.name.clone()];
                    if self.dialect == Dialect::Sqlite {
                        tables.push(delta_table(&def.name));
                    }
                    for table in tables {
                        let sql = self.dialect.sql(&format!(
                            "DELETE FROM {} WHERE {w} >= ? AND {w} < ?",
                            quote(&table)
                        ));
                        deleted += sqlx::query(AssertSqlSafe(sql))
                            .bind(lo)
                            .bind(hi)
                            .execute(&mut *tx)
                            .await
                            .map_err(db("delete windows"))?
                            .rows_affected();
                    }
                }
                MergeRows::merge_rows(&mut *tx, self, outputs).await?;
                tx.commit().await.map_err(db("commit"))?;
                Ok(deleted)
            }};
        }
        match tx {
            ReplaceTx::Sqlite(t) => replace!(t),
            ReplaceTx::Postgres(t) => replace!(t),
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
        on_pool!(&self.pool, p => {
            let mut conn = p.acquire().await.map_err(db("read rollup rows"))?;
            read_rows!(self.dialect, conn, def, lo, hi, max)
        })
    }

    /// The rows of each `defs[i]` in `ranges[i]` and the committed raw files,
    /// all from one snapshot (a read transaction).
    pub async fn read_snapshot(
        &self,
        defs: &[&RollupDef],
        ranges: &[(i64, i64)],
    ) -> Result<(Vec<TableRows>, Vec<String>), SinkError> {
        macro_rules! snapshot {
            ($tx:expr) => {{
                let mut tx = $tx;
                let mut tables = Vec::with_capacity(defs.len());
                for (def, (lo, hi)) in defs.iter().zip(ranges) {
                    tables.push(read_rows!(self.dialect, tx, def, *lo, *hi, None)?);
                }
                let files = raw_files!(tx)?;
                tx.rollback().await.map_err(db("rollback"))?;
                Ok((tables, files))
            }};
        }
        match &self.pool {
            Pool::Sqlite(p) => snapshot!(p.begin().await.map_err(db("begin"))?),
            Pool::Postgres(p) => snapshot!(p
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(db("begin"))?),
        }
    }

    /// Those of `paths` recorded as committed archive files (primary-key
    /// lookups, a few hundred per statement).
    pub async fn committed_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, SinkError> {
        const PER_STATEMENT: usize = 500;
        let mut found = std::collections::HashSet::new();
        for chunk in paths.chunks(PER_STATEMENT) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = self.dialect.sql(&format!(
                "SELECT path FROM tally_files WHERE path IN ({marks})"
            ));
            on_pool!(&self.pool, p => {
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for path in chunk {
                    q = q.bind(path.as_str());
                }
                for r in q.fetch_all(p).await.map_err(db("read recorded files"))? {
                    found.insert(r.try_get::<String, _>(0).map_err(db("read recorded files"))?);
                }
            })
        }
        Ok(found)
    }

    /// The time up to which the store is complete for `topic` (epoch ms):
    /// the minimum over its partitions of the later of the newest committed
    /// event time and the time the partition was last read to its end.
    pub async fn as_of(&self, topic: &str) -> Result<Option<i64>, SinkError> {
        let sql = self
            .dialect
            .sql("SELECT max_event_ms, caught_up_ms FROM tally_offsets WHERE topic = ?");
        let rows: Vec<(Option<i64>, Option<i64>)> = on_pool!(&self.pool, p => {
            sqlx::query(AssertSqlSafe(sql))
                .bind(topic)
                .fetch_all(p)
                .await
                .map_err(db("read as_of"))?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(db("read as_of"))?
        });
        Ok(complete_up_to(rows.into_iter().map(|(a, b)| a.max(b))))
    }

    /// All persistent counters.
    pub async fn counters(&self) -> Result<BTreeMap<String, i64>, SinkError> {
        on_pool!(&self.pool, p => {
            let rows = sqlx::query("SELECT name, value FROM tally_counters ORDER BY name")
                .fetch_all(p)
                .await
                .map_err(db("read counters"))?;
            rows.into_iter()
                .map(|r| Ok((r.try_get(0).map_err(db("read counters"))?, r.try_get(1).map_err(db("read counters"))?)))
                .collect()
        })
    }

    pub async fn close(&self) {
        on_pool!(&self.pool, p => p.close().await)
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
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
pub fn complete_up_to(partitions: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    let mut out: Option<i64> = None;
    for t in partitions {
        let t = t?;
        out = Some(out.map_or(t, |o| o.min(t)));
    }
    out
}

/// Page size of a new SQLite serving store (SQLite's largest).
pub const SQLITE_PAGE_SIZE: u32 = 65_536;

async fn open_sqlite(url: &str) -> Result<(SqlitePool, PathBuf), String> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| e.to_string())?
        .create_if_missing(true)
        // Applies to a new file only (before WAL mode is set). Each commit
        // rewrites every page that holds a merged row; with 64 KiB pages the
        // same bytes go to the WAL in a sixteenth of the writes, and the
        // B-tree is two levels shallower. Measured on a 2 M-event replay with
        // 9,000-event batches and the three rollups: 13.6-14.1 CPU-s with
        // 4 KiB pages, 10.3-10.5 with 64 KiB; API point reads unchanged.
        .page_size(SQLITE_PAGE_SIZE)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        // 64 MiB of page cache per connection (default 2 MiB): large merge
        // transactions otherwise spill dirty pages to the WAL mid-transaction.
        .pragma("cache_size", "-65536")
        // A multi-row upsert keeps a statement journal of every page it
        // touches; in a temp file that is a pwrite per page (measured: a fifth
        // of all replay CPU). In memory it is a copy.
        .pragma("temp_store", "memory");
    if let Some(parent) = opts.get_filename().parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
    }
    // Another tally opening the same file may hold the lock for a moment
    // (switching to WAL, creating the schema): retry "database is locked".
    let mut attempt = 0;
    loop {
        match SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts.clone())
            .await
        {
            Ok(pool) => return Ok((pool, opts.get_filename().to_path_buf())),
            Err(e) if attempt < 40 && is_busy(&e) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// SQLITE_BUSY (5) or SQLITE_LOCKED (6).
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "5" || c == "6")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(number_placeholders("SELECT ? , ?"), "SELECT $1 , $2");
        assert_eq!(
            number_placeholders("a = ?1 AND b = ?12 AND c = ?1"),
            "a = $1 AND b = $12 AND c = $1"
        );
        assert_eq!(
            number_placeholders("x = '?' AND \"q?\" = ?"),
            "x = '?' AND \"q?\" = $1"
        );
        assert_eq!(Dialect::Sqlite.sql("a = ?"), "a = ?");
    }

    /// A new SQLite store gets 64 KiB pages and WAL; an existing file keeps
    /// its page size (SQLite changes it only by VACUUM) and still opens.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn new_sqlite_stores_use_large_pages_and_old_ones_still_open() {
        use crate::aggregate::SqlCatalog;
        use crate::decode::EventSchema;
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = EventSchema::from_config(&settings.schema).unwrap();
        let catalog = SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let pragmas = |path: &Path| {
            let c = rusqlite::Connection::open(path).unwrap();
            let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
            let mode: String = c
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            let tables: i64 = c
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'minute_video_events'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            (size, mode, tables)
        };
        let new = dir.path().join("new.db");
        let store = ServingStore::open(&format!("sqlite://{}", new.display()), &catalog.rollups)
            .await
            .unwrap();
        store.close().await;
        assert_eq!(
            pragmas(&new),
            (i64::from(SQLITE_PAGE_SIZE), "wal".to_string(), 1)
        );

        let old = dir.path().join("old.db");
        {
            let c = rusqlite::Connection::open(&old).unwrap();
            c.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE keep (x INTEGER);").unwrap();
        }
        let store = ServingStore::open(&format!("sqlite://{}", old.display()), &catalog.rollups)
            .await
            .unwrap();
        assert_eq!(store.load_offsets("t").await.unwrap(), BTreeMap::new());
        store.close().await;
        assert_eq!(pragmas(&old), (4096, "wal".to_string(), 1));
    }

    /// Merge rows are ordered by the whole key, as a plain sort of the key
    /// tuples orders them: PostgreSQL writers lock shared rows in one order.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn merge_rows_are_ordered_by_the_whole_key() {
        use crate::aggregate::SqlCatalog;
        use crate::decode::EventSchema;
        use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = EventSchema::from_config(&settings.schema).unwrap();
        let catalog = SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let def = catalog
            .rollups
            .iter()
            .find(|d| d.name == "minute_video_events")
            .unwrap();
        let spec = TableSpec::new(def, Dialect::Postgres);
        assert_eq!(spec.key_count, 3, "video_id, event_type, window");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 2_000;
        let mut keys: Vec<(String, String, i64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while keys.len() < n {
            let k = (
                format!("v{}", rng.random_range(0..300)),
                ["view", "like", "share"][rng.random_range(0..3)].to_string(),
                rng.random_range(-5..60) * 60_000,
            );
            if seen.insert(k.clone()) {
                keys.push(k);
            }
        }
        let columns: Vec<ArrayRef> = def
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| -> ArrayRef {
                match (i, c.kind) {
                    (0, _) => Arc::new(StringArray::from_iter_values(
                        keys.iter().map(|k| k.0.as_str()),
                    )),
                    (1, _) => Arc::new(StringArray::from_iter_values(
                        keys.iter().map(|k| k.1.as_str()),
                    )),
                    (2, _) => Arc::new(Int64Array::from_iter_values(keys.iter().map(|k| k.2))),
                    (_, ColumnKind::Real) => {
                        Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64)))
                    }
                    (_, ColumnKind::Int) => {
                        Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64)))
                    }
                    (_, ColumnKind::Text) => {
                        Arc::new(StringArray::from_iter_values((0..n).map(|i| i.to_string())))
                    }
                }
            })
            .collect();
        let fields: Vec<datafusion::arrow::datatypes::Field> = def
            .columns
            .iter()
            .zip(&columns)
            .map(|(c, a)| {
                datafusion::arrow::datatypes::Field::new(&c.name, a.data_type().clone(), true)
            })
            .collect();
        let batch = RecordBatch::try_new(
            Arc::new(datafusion::arrow::datatypes::Schema::new(fields)),
            columns,
        )
        .unwrap();
        let got: Vec<(String, String, i64)> = spec
            .row_order(&batch)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|i| keys[i].clone())
            .collect();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want);
    }

    type Key = (String, String, i64);
    type Measures = (i64, f64, i64, Option<f64>, Option<f64>);

    /// Rollup outputs of `batches` batches of `per_batch` events over
    /// `videos` videos, 3 types and 2 hours (every third event has no
    /// value), with the hourly rollup computed independently.
    struct Fixture {
        dir: tempfile::TempDir,
        catalog: crate::aggregate::SqlCatalog,
        batches: Vec<Vec<RollupOutput>>,
        hourly: BTreeMap<Key, Measures>,
        per_batch: i64,
        now: i64,
    }

    #[allow(clippy::unwrap_used)]
    async fn fixture(batches: i64, per_batch: i64, videos: i64) -> Fixture {
        use crate::aggregate::{RollupAggregator, SqlCatalog};
        use crate::decode::{EventSchema, RecordDecoder};
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = EventSchema::from_config(&settings.schema).unwrap();
        let catalog = SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let mut agg = RollupAggregator::new(&catalog, schema.arrow.clone())
            .await
            .unwrap();
        let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
        let now = chrono::Utc::now().timestamp_millis();
        let hour = now - now.rem_euclid(3_600_000) - 3 * 3_600_000;
        let mut hourly: BTreeMap<Key, Measures> = BTreeMap::new();
        let mut outputs = Vec::new();
        for b in 0..batches {
            let mut cols = schema.new_columns(per_batch as usize);
            for i in 0..per_batch {
                let n = b * per_batch + i;
                let (video, kind, t) = (
                    format!("v{}", (n * 11 + n / 13) % videos),
                    ["view", "like", "share"][(n % 3) as usize],
                    hour + (n * 7919) % 7_200_000,
                );
                let value = (n % 3 != 0).then(|| ((n * 37) % 101) as f64 - 50.0);
                let v = value
                    .map(|v| format!(r#","value":{v}"#))
                    .unwrap_or_default();
                let p = format!(
                    r#"{{"video_id":"{video}","event_type":"{kind}","event_time":{t}{v}}}"#
                );
                decoder.decode(Some(p.as_bytes()), now, &mut cols).unwrap();
                let e = hourly
                    .entry((video, kind.to_string(), t - t.rem_euclid(3_600_000)))
                    .or_insert((0, 0.0, 0, None, None));
                e.0 += 1;
                if let Some(v) = value {
                    e.1 += v;
                    e.2 += 1;
                    e.3 = Some(e.3.map_or(v, |m: f64| m.min(v)));
                    e.4 = Some(e.4.map_or(v, |m: f64| m.max(v)));
                }
            }
            let events = cols.finish().unwrap();
            outputs.push(agg.aggregate(std::slice::from_ref(&events)).await.unwrap());
        }
        Fixture {
            dir,
            catalog,
            batches: outputs,
            hourly,
            per_batch,
            now,
        }
    }

    impl Fixture {
        /// Commit batch `b` as offsets `b * per_batch ..` of partition 0.
        async fn commit(
            &self,
            store: &ServingStore,
            b: usize,
            expected_start: Option<i64>,
        ) -> Result<CommitOutcome, SinkError> {
            let n = self.per_batch;
            let partitions: BTreeMap<i32, PartitionRange> = [(
                0,
                PartitionRange {
                    expected_start,
                    first: b as i64 * n,
                    last: b as i64 * n + n - 1,
                },
            )]
            .into_iter()
            .collect();
            let req = CommitRequest {
                topic: "t",
                partitions: &partitions,
                outputs: &self.batches[b],
                files: &[],
                counters: &[("accepted_total".to_string(), n)],
                max_event_ms: &[(0, self.now - 5)].into_iter().collect(),
                caught_up: &[(0, b as i64 * n + n)].into_iter().collect(),
                sealed_at_ms: self.now,
                now_ms: self.now,
            };
            store.commit(&req).await
        }

        async fn store(&self, name: &str, fold_rows: usize) -> ServingStore {
            let url = format!("sqlite://{}/{name}.db", self.dir.path().display());
            ServingStore::open(&url, &self.catalog.rollups)
                .await
                .unwrap()
                .with_fold_rows(fold_rows)
        }

        /// Rows in `table` of store `name`.
        fn count(&self, name: &str, table: &str) -> i64 {
            let c = rusqlite::Connection::open(self.dir.path().join(format!("{name}.db"))).unwrap();
            c.query_row(&format!("SELECT count(*) FROM {}", quote(table)), [], |r| {
                r.get(0)
            })
            .unwrap()
        }

        /// The hourly rollup as read back from `store`.
        async fn hourly_of(&self, store: &ServingStore) -> BTreeMap<Key, Measures> {
            let hourly = self
                .catalog
                .rollups
                .iter()
                .find(|d| d.name == "hour_video_events")
                .unwrap();
            let mut got = BTreeMap::new();
            for r in store
                .read_rows(hourly, i64::MIN, i64::MAX, None)
                .await
                .unwrap()
            {
                let text = |c: &Cell| match c {
                    Cell::Text(s) => s.clone(),
                    other => panic!("{other:?}"),
                };
                let int = |c: &Cell| match c {
                    Cell::Int(v) => *v,
                    other => panic!("{other:?}"),
                };
                let real = |c: &Cell| match c {
                    Cell::Real(v) => Some(*v),
                    Cell::Null => None,
                    other => panic!("{other:?}"),
                };
                got.insert(
                    (text(&r[0]), text(&r[1]), int(&r[2])),
                    (
                        int(&r[3]),
                        real(&r[4]).unwrap_or(0.0),
                        int(&r[5]),
                        real(&r[6]),
                        real(&r[7]),
                    ),
                );
            }
            got
        }
    }

    /// The rusqlite batch commit against the sqlx one and against totals
    /// computed here: the same batches give the same tables; a stale batch
    /// is fenced and changes nothing; a failed commit drops the connection
    /// and the next commit opens a new one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn sqlite_commits_merge_fence_and_match_the_sqlx_path() {
        // 3 batches of 400 events over 7 videos.
        let fx = fixture(3, 400, 7).await;
        let (catalog, now, topic) = (&fx.catalog, fx.now, "t");
        let fast = fx.store("fast", DEFAULT_FOLD_ROWS).await;
        // The same commits folding the delta tables on every commit, and
        // once the deltas hold 500 rows (ranges of keys from the second
        // commit on).
        let folding = fx.store("folding", 0).await;
        let some = fx.store("some", 500).await;
        let mut slow = fx.store("slow", DEFAULT_FOLD_ROWS).await;
        slow.writer = None;
        for store in [&fast, &folding, &some, &slow] {
            for b in 0..3 {
                let start = (b > 0).then(|| b as i64 * 400);
                assert_eq!(
                    fx.commit(store, b, start).await.unwrap(),
                    CommitOutcome::Committed
                );
            }
            // A stale writer re-sending batch 1 is fenced and changes nothing.
            assert_eq!(
                fx.commit(store, 1, Some(400)).await.unwrap(),
                CommitOutcome::Fenced {
                    partition: 0,
                    expected: Some(400),
                    stored: Some(1200)
                }
            );
            assert_eq!(
                store.load_offsets(topic).await.unwrap(),
                [(0, 1200)].into_iter().collect()
            );
            assert_eq!(
                store.counters().await.unwrap().get("accepted_total"),
                Some(&1200)
            );
            assert_eq!(store.as_of(topic).await.unwrap(), Some(now));
        }
        for def in &catalog.rollups {
            let b = sorted(slow.read_rows(def, i64::MIN, i64::MAX, None).await.unwrap());
            for (name, store) in [
                ("no fold", &fast),
                ("fold on every commit", &folding),
                ("fold from 500 rows", &some),
            ] {
                let a = sorted(
                    store
                        .read_rows(def, i64::MIN, i64::MAX, None)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    a, b,
                    "{}: rusqlite ({name}) and sqlx commits differ",
                    def.name
                );
            }
        }
        // Where the rows are: all in the deltas without a fold, none after a
        // fold on every commit, in both tables with ranged folds.
        let all: i64 = catalog
            .rollups
            .iter()
            .map(|d| fx.count("fast", &delta_table(&d.name)))
            .sum();
        assert!(
            all > 1_000
                && catalog
                    .rollups
                    .iter()
                    .all(|d| fx.count("fast", &d.name) == 0),
            "{all}"
        );
        assert!(catalog
            .rollups
            .iter()
            .all(|d| fx.count("folding", &delta_table(&d.name)) == 0
                && fx.count("folding", &d.name) > 0));
        let (main, delta): (i64, i64) = catalog
            .rollups
            .iter()
            .map(|d| {
                (
                    fx.count("some", &d.name),
                    fx.count("some", &delta_table(&d.name)),
                )
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert!(main > 0 && delta > 0, "main {main}, delta {delta}");
        // Folds are counted (timed, and their rows) per process.
        let stats = (fast.fold_stats(), folding.fold_stats(), some.fold_stats());
        assert_eq!((stats.0.folds, stats.1.folds, stats.2.folds), (0, 3, 2));
        assert!(stats.1.seconds > 0.0);
        let rows_in = |name: &str| {
            catalog
                .rollups
                .iter()
                .map(|d| fx.count(name, &d.name))
                .sum::<i64>() as u64
        };
        assert!(
            stats.1.rows >= rows_in("folding") && stats.2.rows >= rows_in("some"),
            "{stats:?}"
        );
        // The `__merged` views show what reads see.
        let c = rusqlite::Connection::open(fx.dir.path().join("some.db")).unwrap();
        for def in &catalog.rollups {
            let rows = some.read_rows(def, i64::MIN, i64::MAX, None).await.unwrap();
            let events: i64 = rows
                .iter()
                .map(|r| if let Cell::Int(n) = r[3] { n } else { 0 })
                .sum();
            let (n, e): (i64, i64) = c
                .query_row(
                    &format!(
                        "SELECT count(*), sum(events) FROM {}",
                        quote(&merged_view(&def.name))
                    ),
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((n, e), (rows.len() as i64, events), "{}", def.name);
            assert_eq!(e, 1200, "{}: every event once", def.name);
        }
        assert_eq!(fx.hourly_of(&fast).await, fx.hourly);

        // A commit that fails (its table is gone) drops the connection; once
        // the table is back, the next commit succeeds on a new connection.
        let w = fast.writer.clone().unwrap();
        let hourly = delta_table("hour_video_events");
        let raw = rusqlite::Connection::open(fx.dir.path().join("fast.db")).unwrap();
        raw.execute_batch(&format!("ALTER TABLE {} RENAME TO gone", quote(&hourly)))
            .unwrap();
        let failed = fx.commit(&fast, 1, Some(1200)).await;
        assert!(
            matches!(failed, Err(SinkError::Sqlite { .. })),
            "the commit fails while the table is missing: {failed:?}"
        );
        assert!(
            w.conn.lock().unwrap().is_none(),
            "the failed commit dropped its connection"
        );
        raw.execute_batch(&format!("ALTER TABLE gone RENAME TO {}", quote(&hourly)))
            .unwrap();
        assert_eq!(
            store_offsets_after(&fast, topic).await,
            1200,
            "the failed commit changed nothing"
        );
        let partitions: BTreeMap<i32, PartitionRange> = [(
            0,
            PartitionRange {
                expected_start: Some(1200),
                first: 1200,
                last: 1599,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic,
            partitions: &partitions,
            outputs: &fx.batches[1],
            files: &[],
            counters: &[],
            max_event_ms: &BTreeMap::new(),
            caught_up: &BTreeMap::new(),
            sealed_at_ms: now,
            now_ms: now,
        };
        assert_eq!(fast.commit(&req).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(store_offsets_after(&fast, topic).await, 1600);
    }

    fn sorted(mut v: TableRows) -> TableRows {
        v.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
        v
    }

    /// A table's rows of a large batch go straight to the rollup table, a
    /// small batch's to the delta, in the same commit: reads after every
    /// commit equal a store where everything went through the deltas, the
    /// large tables' deltas stay empty, and the hourly rollup equals the
    /// totals computed here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn large_batches_skip_the_delta_and_reads_stay_exact() {
        let fx = fixture(12, 300, 40).await;
        let rows = |table: &str| -> usize {
            fx.batches[0]
                .iter()
                .filter(|o| o.rollup == table)
                .flat_map(|o| o.batches.iter())
                .map(|b| b.num_rows())
                .sum()
        };
        let mut by_rows: Vec<(usize, String)> = fx
            .catalog
            .rollups
            .iter()
            .map(|d| (rows(&d.name), d.name.clone()))
            .collect();
        by_rows.sort();
        let (small, large) = (by_rows[0].clone(), by_rows[by_rows.len() - 1].clone());
        assert!(large.0 > small.0 + 1, "{by_rows:?}");
        // Direct from (small + large) / 2 rows.
        let threshold = (small.0 + large.0) / 2;
        let plain = fx.store("plain", DEFAULT_FOLD_ROWS).await;
        let mixed = fx
            .store("mixed", DEFAULT_FOLD_ROWS)
            .await
            .with_direct_rows(threshold);
        for b in 0..fx.batches.len() {
            let start = (b > 0).then(|| b as i64 * fx.per_batch);
            for store in [&plain, &mixed] {
                assert_eq!(
                    fx.commit(store, b, start).await.unwrap(),
                    CommitOutcome::Committed
                );
            }
            for def in &fx.catalog.rollups {
                let want = sorted(
                    plain
                        .read_rows(def, i64::MIN, i64::MAX, None)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    sorted(
                        mixed
                            .read_rows(def, i64::MIN, i64::MAX, None)
                            .await
                            .unwrap()
                    ),
                    want,
                    "{} after batch {b}",
                    def.name
                );
            }
        }
        assert_eq!(
            fx.count("mixed", &delta_table(&large.1)),
            0,
            "{large:?} went direct"
        );
        assert!(fx.count("mixed", &large.1) > 0);
        if mixed.fold_stats().folds == 0 {
            assert_eq!(
                fx.count("mixed", &small.1),
                0,
                "{small:?} went through the delta"
            );
            assert!(fx.count("mixed", &delta_table(&small.1)) > 0);
        }
        assert_eq!(fx.hourly_of(&mixed).await, fx.hourly);
        mixed.fold().await.unwrap();
        assert_eq!(fx.hourly_of(&mixed).await, fx.hourly);
    }

    /// Ranged folds over many small commits: after every commit reads equal
    /// a store that never folds; folds leave rows in both tables; over the
    /// run the cursor goes round the whole key space (every video reaches
    /// the rollup tables); a full fold empties the deltas; and the hourly
    /// rollup equals the totals computed here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn ranged_folds_go_round_the_key_space_and_keep_every_row() {
        const VIDEOS: i64 = 60;
        let fx = fixture(40, 120, VIDEOS).await;
        let plain = fx.store("plain", DEFAULT_FOLD_ROWS).await;
        let ranged = fx.store("ranged", 1_500).await;
        let minute = delta_table("minute_video_events");
        let mut partial = 0;
        for b in 0..fx.batches.len() {
            let start = (b > 0).then(|| b as i64 * fx.per_batch);
            let folds = ranged.fold_stats().folds;
            for store in [&plain, &ranged] {
                assert_eq!(
                    fx.commit(store, b, start).await.unwrap(),
                    CommitOutcome::Committed
                );
            }
            for def in &fx.catalog.rollups {
                let want = sorted(
                    plain
                        .read_rows(def, i64::MIN, i64::MAX, None)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    sorted(
                        ranged
                            .read_rows(def, i64::MIN, i64::MAX, None)
                            .await
                            .unwrap()
                    ),
                    want,
                    "{} after batch {b}",
                    def.name
                );
            }
            if ranged.fold_stats().folds > folds && fx.count("ranged", &minute) > 0 {
                partial += 1;
            }
        }
        let stats = ranged.fold_stats();
        assert!(
            partial >= 10,
            "{partial} folds left rows in the delta; {stats:?}"
        );
        let c = rusqlite::Connection::open(fx.dir.path().join("ranged.db")).unwrap();
        let videos: i64 = c
            .query_row(
                "SELECT count(DISTINCT video_id) FROM minute_video_events",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(videos, VIDEOS, "every video was folded at least once");
        ranged.fold().await.unwrap();
        assert!(fx
            .catalog
            .rollups
            .iter()
            .all(|d| fx.count("ranged", &delta_table(&d.name)) == 0));
        assert_eq!(fx.hourly_of(&ranged).await, fx.hourly);
        assert_eq!(fx.hourly_of(&plain).await, fx.hourly);
    }

    #[test]
    fn as_of_never_claims_a_partition_with_nothing_committed() {
        assert_eq!(complete_up_to([Some(5), Some(3), Some(9)]), Some(3));
        assert_eq!(
            complete_up_to([Some(5), None]),
            None,
            "a registered, never-committed partition"
        );
        assert_eq!(complete_up_to(std::iter::empty()), None);
    }

    #[allow(clippy::unwrap_used)]
    /// Registration keeps the first start; a reset moves it (and a batch
    /// built on the old offset is then fenced); both stores.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partition_starts_register_once_and_resets_fence_running_writers() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
        let catalog = crate::aggregate::SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let pg = crate::testing::pg_database().await;
        for url in [
            format!("sqlite://{}/serving.db", dir.path().display()),
            pg.clone(),
        ] {
            let store = ServingStore::open(&url, &catalog.rollups).await.unwrap();
            assert_eq!(store.register_start("t", 0, 100, 1).await.unwrap(), 100);
            assert_eq!(
                store.register_start("t", 0, 900, 2).await.unwrap(),
                100,
                "{url}: the first start stays"
            );
            assert_eq!(
                store.as_of("t").await.unwrap(),
                None,
                "{url}: registered, nothing committed"
            );
            assert_eq!(store.reset_offset("t", 0, 7, 3).await.unwrap(), Some(100));
            assert_eq!(store.reset_offset("t", 1, 0, 3).await.unwrap(), None);
            let partitions = [(
                0,
                PartitionRange {
                    expected_start: Some(100),
                    first: 100,
                    last: 109,
                },
            )]
            .into_iter()
            .collect();
            let req = CommitRequest {
                topic: "t",
                partitions: &partitions,
                outputs: &[],
                files: &[],
                counters: &[],
                max_event_ms: &Default::default(),
                caught_up: &Default::default(),
                sealed_at_ms: 0,
                now_ms: 0,
            };
            assert_eq!(
                store.commit(&req).await.unwrap(),
                CommitOutcome::Fenced {
                    partition: 0,
                    expected: Some(100),
                    stored: Some(7)
                },
                "{url}"
            );
            store.close().await;
        }
    }

    #[allow(clippy::unwrap_used)]
    /// A rollup edited in place is refused by name; reformatting is not an edit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edited_rollup_definitions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
        let sql_dir = dir.path().join("rollups");
        std::fs::create_dir_all(&sql_dir).unwrap();
        let sql = std::fs::read_to_string(settings.sql.rollups_dir.join("hour_video_events.sql"))
            .unwrap();
        let file = sql_dir.join("hour_video_events.sql");
        let load = || {
            crate::aggregate::SqlCatalog::load(
                &sql_dir,
                schema.arrow.clone(),
                &settings.schema.time_field,
            )
        };
        let url = format!("sqlite://{}/serving.db", dir.path().display());
        std::fs::write(&file, &sql).unwrap();
        ServingStore::open(&url, &load().await.unwrap().rollups)
            .await
            .unwrap()
            .close()
            .await;
        std::fs::write(
            &file,
            format!("-- a comment\n{}", sql.to_lowercase().replace('\n', "\n\t")),
        )
        .unwrap();
        ServingStore::open(&url, &load().await.unwrap().rollups)
            .await
            .unwrap()
            .close()
            .await;
        std::fs::write(
            &file,
            sql.replace("FROM events", "FROM events WHERE event_type <> 'like'"),
        )
        .unwrap();
        let err = ServingStore::open(&url, &load().await.unwrap().rollups)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("hour_video_events.sql has changed"), "{err}");
        assert!(err.contains("Give the new definition a new name"), "{err}");
    }

    #[allow(clippy::unwrap_used)]
    /// The orphan sweep's check: recorded paths are found among many
    /// (more than one statement's worth), unknown ones are not, on both stores.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_among_finds_exactly_the_recorded_paths() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::testing::settings(dir.path(), &[]);
        let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
        let catalog = crate::aggregate::SqlCatalog::load(
            &settings.sql.rollups_dir,
            schema.arrow.clone(),
            &settings.schema.time_field,
        )
        .await
        .unwrap();
        let pg = crate::testing::pg_database().await;
        for url in [
            format!("sqlite://{}/serving.db", dir.path().display()),
            pg.clone(),
        ] {
            let store = ServingStore::open(&url, &catalog.rollups).await.unwrap();
            let file = |i: i64| WrittenFile {
                path: format!(
                    "raw/events/dt=2026-11-29/hour=10/t-p00000-{:020}-{:020}-w1.parquet",
                    i * 10,
                    i * 10 + 9
                ),
                kind: super::super::FileKind::Raw,
                partition: 0,
                first_offset: i * 10,
                last_offset: i * 10 + 9,
                rows: 10,
                bytes: 100,
            };
            // Every third of 1,300 files is recorded.
            let recorded: Vec<WrittenFile> = (0..1_300).filter(|i| i % 3 == 0).map(file).collect();
            let partitions: BTreeMap<i32, PartitionRange> = [(
                0,
                PartitionRange {
                    expected_start: None,
                    first: 0,
                    last: 12_999,
                },
            )]
            .into_iter()
            .collect();
            let req = CommitRequest {
                topic: "t",
                partitions: &partitions,
                outputs: &[],
                files: &recorded,
                counters: &[],
                max_event_ms: &BTreeMap::new(),
                caught_up: &BTreeMap::new(),
                sealed_at_ms: 0,
                now_ms: 0,
            };
            assert_eq!(store.commit(&req).await.unwrap(), CommitOutcome::Committed);
            let asked: Vec<String> = (0..1_300)
                .map(|i| file(i).path)
                .chain(["raw/events/elsewhere.parquet".to_string()])
                .collect();
            let found = store.committed_among(&asked).await.unwrap();
            let want: std::collections::HashSet<String> =
                recorded.iter().map(|f| f.path.clone()).collect();
            assert_eq!(found, want, "{url}");
            assert!(store.committed_among(&[]).await.unwrap().is_empty());
            store.close().await;
        }
        crate::testing::drop_pg_database(&pg).await;
    }

    async fn store_offsets_after(store: &ServingStore, topic: &str) -> i64 {
        store.load_offsets(topic).await.unwrap()[&0]
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://tally:secret@db:5432/tally"),
            "postgres://tally:***@db:5432/tally"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
        assert_eq!(redact("postgres://tally@db/t"), "postgres://tally@db/t");
        assert_eq!(
            redact("postgres://db/t?user=tally&password=S3cret&sslmode=require"),
            "postgres://db/t?user=tally&password=***&sslmode=require"
        );
    }
}
