//! What both serving stores share: the bookkeeping tables, the rollup
//! tables' DDL and merge clauses, identifier quoting and the statements of a
//! batch commit. Statements are written with `?` placeholders and numbered
//! (`$1`, `$2`, ...) for PostgreSQL by [`Dialect::sql`].
//!
//! SQL here is built only from identifiers validated by the SQL catalog
//! (`[a-z_][a-z0-9_]*`); every value is a bound parameter.

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::row::{RowConverter, SortField};

use super::SinkError;
use crate::aggregate::{ColumnKind, MergeRule, RollupDef};

/// `{int}`, `{real}` and `{noid}` are filled in per engine.
pub(super) const BOOKKEEPING: &[&str] = &[
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
    // Dead letters that `tally dlq replay` has counted, by their original
    // position: a second replay of them counts nothing.
    "CREATE TABLE IF NOT EXISTS tally_dlq_replayed (
        topic TEXT NOT NULL,
        partition {int} NOT NULL,
        message_offset {int} NOT NULL,
        replayed_at_ms {int} NOT NULL,
        PRIMARY KEY (topic, partition, message_offset)
    ){noid}",
    // The archive's own committed position per partition: raw events below
    // it are in committed files (see `sink/archive/open.rs`).
    "CREATE TABLE IF NOT EXISTS tally_archive_offsets (
        topic TEXT NOT NULL,
        partition {int} NOT NULL,
        next_offset {int} NOT NULL,
        updated_at_ms {int} NOT NULL,
        PRIMARY KEY (topic, partition)
    ){noid}",
    // Event hours with counted events not yet in committed, visible raw
    // files: verify and backfill leave their windows alone.
    "CREATE TABLE IF NOT EXISTS tally_archive_open (
        topic TEXT NOT NULL,
        partition {int} NOT NULL,
        hour_ms {int} NOT NULL,
        through_offset {int} NOT NULL,
        PRIMARY KEY (topic, partition, hour_ms)
    ){noid}",
    // Committed raw files still under their staging names (renamed next).
    "CREATE TABLE IF NOT EXISTS tally_archive_pending (
        path TEXT PRIMARY KEY,
        topic TEXT NOT NULL,
        partition {int} NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tally_rollups (
        name TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        definition TEXT NOT NULL,
        recorded_at_ms {int} NOT NULL
    )",
    // The version of each rollup the API answers (`tally rollup promote`);
    // a rollup without a row answers from its lowest version.
    "CREATE TABLE IF NOT EXISTS tally_rollup_live (
        name TEXT PRIMARY KEY,
        version {int} NOT NULL,
        promoted_at_ms {int} NOT NULL
    )",
    // A version's backfill by chunks of windows (`tally backfill --rollup`
    // without a range): where it is, so a killed one resumes.
    "CREATE TABLE IF NOT EXISTS tally_backfills (
        rollup TEXT PRIMARY KEY,
        from_ms {int} NOT NULL,
        to_ms {int} NOT NULL,
        done_to_ms {int} NOT NULL,
        updated_at_ms {int} NOT NULL
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
    pub(super) fn int(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER",
            Dialect::Postgres => "BIGINT",
        }
    }
    pub(super) fn sql_type(self, kind: ColumnKind) -> &'static str {
        match (self, kind) {
            (_, ColumnKind::Text) => "TEXT",
            (d, ColumnKind::Int) => d.int(),
            (Dialect::Sqlite, ColumnKind::Real) => "REAL",
            (Dialect::Postgres, ColumnKind::Real) => "DOUBLE PRECISION",
            (Dialect::Sqlite, ColumnKind::Bytes) => "BLOB",
            (Dialect::Postgres, ColumnKind::Bytes) => "BYTEA",
        }
    }
    /// Two-argument minimum and maximum.
    pub(super) fn least(self) -> &'static str {
        match self {
            Dialect::Sqlite => "min",
            Dialect::Postgres => "least",
        }
    }
    pub(super) fn greatest(self) -> &'static str {
        match self {
            Dialect::Sqlite => "max",
            Dialect::Postgres => "greatest",
        }
    }
    pub(super) fn ddl(self, template: &str) -> String {
        template.replace("{int}", self.int()).replace(
            "{noid}",
            match self {
                Dialect::Sqlite => " WITHOUT ROWID",
                // Room on each page for the new version of an upserted row, so
                // most updates are HOT (no index insert): measured 15% less
                // server CPU per batch commit than the default 100 (docs/performance.md).
                Dialect::Postgres => " WITH (fillfactor = 70)",
            },
        )
    }
}

/// `?` -> `$n` (in order) and `?N` -> `$N`, outside quoted strings and identifiers.
pub(crate) fn number_placeholders(text: &str) -> String {
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
pub(super) struct TableSpec {
    pub(super) name: String,
    pub(super) columns: Vec<(String, ColumnKind)>,
    pub(super) key_count: usize,
    /// PostgreSQL: the whole batch as one `UNNEST` of column arrays.
    pub(super) unnest_sql: String,
    /// SQLite batch commits: a one-row upsert into the delta table, prepared
    /// once and stepped per row.
    pub(super) delta_upsert_sql: String,
    /// SQLite: the same into the rollup table itself.
    pub(super) direct_upsert_sql: String,
    /// SQLite: fold the delta rows of one range of the leading key, then
    /// delete them; indexed `[has lower bound][has upper bound]`, with the
    /// bounds as `:lo` (exclusive) and `:hi` (inclusive).
    pub(super) fold_range_sql: [[[String; 2]; 2]; 2],
    /// SQLite: the leading key `:n` rows into the delta after `:lo` (or
    /// from its start), where a ranged fold of about `:n` rows ends.
    pub(super) range_end_sql: [String; 2],
}

/// The SQLite view of rollup table `table` that merges in its delta table:
/// one row per key, as the API reads them.
pub(crate) fn merged_view(table: &str) -> String {
    format!("{table}__merged")
}

/// The SQLite delta table of rollup table `table` (see [`SqliteWriter`]).
pub(crate) fn delta_table(table: &str) -> String {
    format!("{table}__delta")
}

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub(super) fn merge_sql(dialect: Dialect, table: &str, col: &str, rule: MergeRule) -> String {
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
        // PostgreSQL merges sketches before the upsert (`pg_sketch`).
        MergeRule::Distinct | MergeRule::Quantile => match dialect {
            Dialect::Sqlite => format!("{c} = tally_sketch_merge({t}.{c}, excluded.{c})"),
            Dialect::Postgres => format!("{c} = excluded.{c}"),
        },
    }
}

impl TableSpec {
    pub(super) fn new(def: &RollupDef, dialect: Dialect) -> TableSpec {
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
            columns,
        }
    }

    /// Row order for merging: by key. PostgreSQL: concurrent writers lock
    /// shared rows in one order. SQLite: each statement touches fewer B-tree
    /// pages, so fewer go through its statement journal.
    pub(super) fn row_order(&self, b: &RecordBatch) -> Result<Option<Vec<usize>>, SinkError> {
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
    pub(super) fn leading_key_order(&self, b: &RecordBatch) -> Result<Vec<usize>, SinkError> {
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
pub(super) enum TypedColumn<'a> {
    Text(&'a datafusion::arrow::array::StringArray),
    Int(&'a datafusion::arrow::array::Int64Array),
    Real(&'a datafusion::arrow::array::Float64Array),
    Bytes(&'a datafusion::arrow::array::BinaryArray),
}

impl<'a> TypedColumn<'a> {
    pub(super) fn new(arr: &'a dyn Array, kind: ColumnKind) -> TypedColumn<'a> {
        match kind {
            ColumnKind::Text => TypedColumn::Text(arr.as_string::<i32>()),
            ColumnKind::Int => TypedColumn::Int(arr.as_primitive::<Int64Type>()),
            ColumnKind::Real => TypedColumn::Real(arr.as_primitive::<Float64Type>()),
            ColumnKind::Bytes => TypedColumn::Bytes(arr.as_binary::<i32>()),
        }
    }
}

/// `?1`: low, `?2`: high, `?3`: cap (if `capped`). SQLite: the main and the
/// delta table, one row per key (merged as the rollup's merge rules say).
pub(super) fn read_rows_sql(d: Dialect, def: &RollupDef, capped: bool) -> String {
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
pub(super) fn merged_sql(def: &RollupDef, filter: &str) -> String {
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
                Some(MergeRule::Distinct | MergeRule::Quantile) => {
                    format!("tally_sketch_union({name}) AS {name}")
                }
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

/// The statements of a batch commit after the rollup merge, shared by both
/// engines (`?` placeholders; see [`Dialect::sql`]).
pub(super) const FENCE_SQL: &str =
    "SELECT partition, next_offset FROM tally_offsets WHERE topic = ?";
pub(super) const RECORD_FILE_SQL: &str = "INSERT INTO tally_files (path, kind, topic, partition, first_offset, last_offset, rows, bytes, committed_at_ms)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT (path) DO UPDATE SET rows = excluded.rows, bytes = excluded.bytes, committed_at_ms = excluded.committed_at_ms";
/// A replayed dead letter (a conflict is a bug: the replay selected only
/// letters not yet recorded, under its lock, and the fence holds).
pub(super) const RECORD_REPLAYED_SQL: &str = "INSERT INTO tally_dlq_replayed (topic, partition, message_offset, replayed_at_ms) VALUES (?, ?, ?, ?)";
pub(super) const REPLAYED_SQL: &str =
    "SELECT partition, message_offset FROM tally_dlq_replayed WHERE topic = ?";
pub(super) const COUNTER_SQL: &str = "INSERT INTO tally_counters (name, value) VALUES (?, ?)
     ON CONFLICT (name) DO UPDATE SET value = tally_counters.value + excluded.value";

/// Advance a partition's offset, keeping the newest event time (for as_of).
pub(super) fn advance_sql(d: Dialect) -> String {
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
pub(super) fn caught_up_sql(d: Dialect) -> String {
    format!(
        "UPDATE tally_offsets SET caught_up_ms = {}(coalesce(caught_up_ms, 0), ?)
         WHERE topic = ? AND partition = ? AND next_offset = ?",
        d.greatest()
    )
}

/// The statements that create `def`'s tables (or change its window index),
/// given the columns its table (`have`) and, on SQLite, its delta table
/// (`have_delta`) have now: empty when absent. A table whose columns differ
/// from what the rollup produces is refused, naming the file and the fix.
pub(super) fn rollup_ddl(
    d: Dialect,
    def: &RollupDef,
    have: &[(String, String)],
    have_delta: &[(String, String)],
    window_index: bool,
) -> Result<Vec<String>, SinkError> {
    // Optional: makes range scans by window (API top-K) index ranges, at
    // roughly a third more ingest CPU (one more B-tree write per upsert).
    let index_name = quote(&format!("{}__by_window", def.name));
    let index = if window_index {
        format!(
            "CREATE INDEX IF NOT EXISTS {index_name} ON {} ({})",
            quote(&def.name),
            quote(def.window_name())
        )
    } else {
        format!("DROP INDEX IF EXISTS {index_name}")
    };
    let wanted: Vec<(String, String)> = def
        .columns
        .iter()
        .map(|c| (c.name.clone(), d.sql_type(c.kind).to_string()))
        .collect();
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
    let ddl = |table: &str| {
        d.ddl(&format!(
            "CREATE TABLE IF NOT EXISTS {} (\n  {}\n){{noid}}",
            quote(table),
            cols.join(",\n  ")
        ))
    };
    let show = |v: &[(String, String)]| {
        v.iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    if have.is_empty() {
        out.push(ddl(&def.name));
    } else if have != wanted {
        return Err(SinkError::Schema {
            table: def.name.clone(),
            message: format!(
                "the existing table has columns ({}) but {} now produces ({}); \
                 deploy the change as a new version beside it ({}@{}.sql, a new table; docs/rollups.md), or drop the old table \
                 (on SQLite also its __delta table and __merged view)",
                show(have),
                def.file.display(),
                show(&wanted),
                def.base,
                def.version + 1
            ),
        });
    }
    out.push(index);
    if d == Dialect::Sqlite {
        // SQLite batch commits land in the delta table (see `sqlite::writer`).
        let delta = delta_table(&def.name);
        if !have_delta.is_empty() && have_delta != wanted {
            return Err(SinkError::Schema {
                table: delta,
                message: format!(
                    "the delta table's columns do not match {}; drop both tables and backfill",
                    def.file.display()
                ),
            });
        }
        out.push(ddl(&delta));
        // For people and tools that query the store: the current rows.
        out.push(format!(
            "CREATE VIEW IF NOT EXISTS {} AS {}",
            quote(&merged_view(&def.name)),
            merged_sql(def, "")
        ));
    }
    Ok(out)
}

/// The message for a rollup whose SQL changed under the same name (see
/// `ServingStore::check_definitions`).
pub(super) fn changed_definition(def: &RollupDef, stored: &str, now: &str, old: &str) -> SinkError {
    SinkError::Schema {
        table: def.name.clone(),
        message: format!(
            "{} has changed since this serving store recorded it (definition {stored}, now {now}); its rows \
             were computed by the old definition, and new rows would silently mix with them. Restore the old SQL and \
             put the new definition in a new version beside it, {}@{}.sql (then `tally backfill --rollup {}`, \
             `tally rollup diff`, `tally rollup promote`: docs/rollups.md). The recorded definition: {old}",
            def.file.display(),
            def.base,
            def.version + 1,
            def.base
        ),
    }
}

/// Per partition: the newest committed event time and when it was last
/// read to its end (see `ServingStore::as_of`).
pub(super) type PartitionTimes = Vec<(Option<i64>, Option<i64>)>;

/// Statements that record a rollup's definition once and read it back.
pub(super) const RECORD_DEFINITION_SQL: &str =
    "INSERT INTO tally_rollups (name, fingerprint, definition, recorded_at_ms) VALUES (?, ?, ?, ?)
     ON CONFLICT (name) DO NOTHING";
pub(super) const READ_DEFINITION_SQL: &str =
    "SELECT fingerprint, definition FROM tally_rollups WHERE name = ?";
/// Register a partition's start unless one is stored; read the stored one.
pub(super) const REGISTER_START_SQL: &str =
    "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
     ON CONFLICT (topic, partition) DO NOTHING";
pub(super) const READ_OFFSET_SQL: &str =
    "SELECT next_offset FROM tally_offsets WHERE topic = ? AND partition = ?";
/// Set a partition's next offset (`tally offsets reset`).
pub(super) const RESET_OFFSET_SQL: &str = "INSERT INTO tally_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
     ON CONFLICT (topic, partition) DO UPDATE SET
       next_offset = excluded.next_offset, updated_at_ms = excluded.updated_at_ms, caught_up_ms = NULL";
pub(super) const OFFSET_TIMES_SQL: &str =
    "SELECT partition, next_offset, updated_at_ms FROM tally_offsets WHERE topic = ?";
pub(super) const AS_OF_SQL: &str =
    "SELECT max_event_ms, caught_up_ms FROM tally_offsets WHERE topic = ?";
pub(super) const COUNTERS_SQL: &str = "SELECT name, value FROM tally_counters ORDER BY name";
/// Set a counter (not add to it): the last verify's time and drift.
pub(super) const SET_COUNTER_SQL: &str =
    "INSERT INTO tally_counters (name, value) VALUES (?1, ?2) \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value";
/// Committed raw files with `? <= path < ?`: a range of the primary key
/// (see `sink::archive::raw_path_range`), so the cost follows the window, not
/// the archive's age.
pub(super) const RAW_FILES_SQL: &str =
    "SELECT path FROM tally_files WHERE path >= ? AND path < ? AND kind = 'raw' ORDER BY path";
/// Recorded files (any kind) with `? <= path < ?`, a bounded page.
pub(super) const FILES_IN_RANGE_SQL: &str =
    "SELECT path FROM tally_files WHERE path >= ? AND path < ? ORDER BY path LIMIT 5000";
pub(super) const FORGET_FILE_SQL: &str = "DELETE FROM tally_files WHERE path = ?";
pub(super) const DLQ_FILES_SQL: &str =
    "SELECT path FROM tally_files WHERE kind = 'dlq' AND topic = ? ORDER BY path";
/// Recorded archive paths are looked up this many at a time.
pub(super) const PATHS_PER_STATEMENT: usize = 500;

/// `SELECT path FROM tally_files WHERE path IN (?, ?, …)` for `n` paths.
pub(super) fn recorded_paths_sql(n: usize) -> String {
    format!(
        "SELECT path FROM tally_files WHERE path IN ({})",
        vec!["?"; n].join(", ")
    )
}

/// Delete one rollup table's windows in `[?1, ?2)`.
pub(super) fn delete_windows_sql(table: &str, def: &RollupDef) -> String {
    let w = quote(def.window_name());
    format!("DELETE FROM {} WHERE {w} >= ?1 AND {w} < ?2", quote(table))
}

/// The archive's position of every partition of a topic that has a serving
/// offset but none of its own yet (a partition first assigned, or a store
/// from before the archive had its own position: its files were committed
/// with each batch, so the archive holds everything below the offset).
pub(super) const ADOPT_ARCHIVE_SQL: &str =
    "INSERT INTO tally_archive_offsets (topic, partition, next_offset, updated_at_ms)
     SELECT topic, partition, next_offset, updated_at_ms FROM tally_offsets WHERE topic = ?
     ON CONFLICT (topic, partition) DO NOTHING";
pub(super) const ARCHIVE_POSITIONS_SQL: &str =
    "SELECT partition, next_offset FROM tally_archive_offsets WHERE topic = ?";
pub(super) const ARCHIVE_FENCE_SQL: &str =
    "SELECT next_offset FROM tally_archive_offsets WHERE topic = ? AND partition = ?";
pub(super) const ARCHIVE_ADVANCE_SQL: &str = "INSERT INTO tally_archive_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset, updated_at_ms = excluded.updated_at_ms";
/// A batch commit makes sure its partitions have an archive position: the
/// batch's start when the archive commits later (nothing of it archived
/// yet); unless one exists.
pub(super) const ARCHIVE_START_SQL: &str = "INSERT INTO tally_archive_offsets (topic, partition, next_offset, updated_at_ms) VALUES (?, ?, ?, ?)
     ON CONFLICT (topic, partition) DO NOTHING";
pub(super) const RECORD_PENDING_SQL: &str =
    "INSERT INTO tally_archive_pending (path, topic, partition) VALUES (?, ?, ?)
     ON CONFLICT (path) DO NOTHING";
pub(super) const PENDING_SQL: &str =
    "SELECT partition, path FROM tally_archive_pending WHERE topic = ? ORDER BY path";
pub(super) const FORGET_PENDING_SQL: &str = "DELETE FROM tally_archive_pending WHERE path = ?";
/// Once a partition has no pending file, its hours counted below its
/// archive position are archived.
pub(super) const CLOSE_HOURS_SQL: &str = "DELETE FROM tally_archive_open
     WHERE topic = ?1 AND partition = ?2
       AND through_offset < (SELECT next_offset FROM tally_archive_offsets WHERE topic = ?1 AND partition = ?2)
       AND NOT EXISTS (SELECT 1 FROM tally_archive_pending WHERE topic = ?1 AND partition = ?2)";
/// Every hour with counted events not yet archived (any topic: the rollups
/// count them all).
pub(super) const OPEN_HOURS_SQL: &str =
    "SELECT DISTINCT hour_ms FROM tally_archive_open ORDER BY hour_ms";

/// A batch commit notes the event hours it counted per partition, up to
/// the partition's last offset in the batch.
pub(super) fn open_hour_sql(d: Dialect) -> String {
    format!(
        "INSERT INTO tally_archive_open (topic, partition, hour_ms, through_offset) VALUES (?, ?, ?, ?)
         ON CONFLICT (topic, partition, hour_ms) DO UPDATE SET
           through_offset = {}(tally_archive_open.through_offset, excluded.through_offset)",
        d.greatest()
    )
}

/// The lock name of a source (`tally replay`, manual assignment): FNV-1a.
pub(super) fn source_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
