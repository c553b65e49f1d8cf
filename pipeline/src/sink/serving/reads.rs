//! Read-only access to the rollups for the HTTP API, apart from the write
//! path. The API plans its statements (`serve/generic.rs`: tiers, `UNION ALL`
//! of index ranges, `?N` placeholders); the backend says which tables hold a
//! rollup's rows and runs the statements on its own read connections:
//! SQLite on read-only rusqlite connections on the calling thread (an
//! indexed lookup takes tens of microseconds, less than a hand-off to a
//! connection thread), scans off the async workers; PostgreSQL on a pool.

use super::{complete_up_to, postgres, redact, sqlite, Cell, SinkError};
use crate::aggregate::ColumnKind;

/// count / sum / value count / min / max over some rows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Totals {
    pub events: i64,
    pub value_sum: f64,
    pub value_count: i64,
    pub value_min: Option<f64>,
    pub value_max: Option<f64>,
}

impl Totals {
    pub(crate) fn avg(&self) -> Option<f64> {
        (self.value_count > 0).then(|| self.value_sum / self.value_count as f64)
    }
}

/// A bound value of a read statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
}

/// Read connections to a serving store (see the module docs).
#[derive(Debug)]
pub(crate) struct ReadPool {
    backend: Backend,
    /// The rollup tables have an index on their window
    /// (`serving.window_index`).
    window_index: bool,
}

#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::reads::SqliteReads),
    Postgres(postgres::PgReads),
}

impl ReadPool {
    /// `connections` read-only connections to the store at `url`
    /// (PostgreSQL: a pool of that size, connected on first use).
    pub(crate) fn open(url: &str, connections: usize) -> Result<ReadPool, SinkError> {
        let open_err = |message: String| SinkError::Open {
            url: redact(url),
            message,
        };
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(postgres::PgReads::open(url, connections).map_err(open_err)?)
        } else {
            let path = sqlite::url_path(url).ok_or_else(|| {
                open_err("the API reads sqlite://PATH or postgres:// stores".into())
            })?;
            Backend::Sqlite(
                sqlite::reads::SqliteReads::open(&path, connections)
                    .map_err(|e| open_err(format!("cannot open read-only: {e}")))?,
            )
        };
        Ok(ReadPool {
            backend,
            window_index: false,
        })
    }

    /// Plan with (`true`) or without an index on every rollup's window
    /// (`serving.window_index`).
    pub(crate) fn with_window_index(mut self, on: bool) -> ReadPool {
        self.window_index = on;
        self
    }

    pub(crate) fn window_index(&self) -> bool {
        self.window_index
    }

    /// The quoted tables that hold `rollup`'s rows: the rollup table and,
    /// on SQLite, its delta table. Every read sums over all of them.
    pub(crate) fn tables_of(&self, rollup: &str) -> Vec<String> {
        let mut tables = vec![super::quote(rollup)];
        if matches!(self.backend, Backend::Sqlite(_)) {
            tables.push(super::quote(&super::delta_table(rollup)));
        }
        tables
    }

    /// The version each promoted rollup answers from (`tally_rollup_live`;
    /// an error on a store that predates it).
    pub(crate) async fn live_versions(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u32>, SinkError> {
        let rows = self
            .cells(
                "SELECT name, version FROM tally_rollup_live",
                Vec::new(),
                vec![ColumnKind::Text, ColumnKind::Int],
                true,
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match (r.first(), r.get(1)) {
                (Some(super::Cell::Text(n)), Some(super::Cell::Int(v))) => {
                    Some((n.clone(), u32::try_from(*v).ok()?))
                }
                _ => None,
            })
            .collect())
    }

    /// The aggregate that merges sketch cells in a read: SQLite's
    /// registered union (`sqlite::functions`); on PostgreSQL the cells are
    /// gathered into a `bytea[]` and merged as they are read.
    pub(crate) fn sketch_union(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "tally_sketch_union",
            Backend::Postgres(_) => "array_agg",
        }
    }

    /// A statement whose rows are columns of `kinds` (in order), read as
    /// cells: a NULL is [`Cell::Null`]. `point`: a few index ranges, run on
    /// the calling worker like a count; otherwise off the async workers.
    pub(crate) async fn cells(
        &self,
        text: &str,
        args: Vec<Arg>,
        kinds: Vec<ColumnKind>,
        point: bool,
    ) -> Result<Vec<Vec<Cell>>, SinkError> {
        match &self.backend {
            Backend::Sqlite(s) if point => s.cells(text, args, &kinds),
            Backend::Sqlite(s) => crate::serve::blocking(|| s.cells(text, args, &kinds)),
            Backend::Postgres(p) => p.cells(text, args, &kinds).await,
        }
    }

    /// See [`super::ServingStore::as_of`].
    pub(crate) async fn as_of(&self, topic: &str) -> Result<Option<i64>, SinkError> {
        let rows = match &self.backend {
            Backend::Sqlite(s) => s.as_of_rows(topic)?,
            Backend::Postgres(p) => p.as_of_rows(topic).await?,
        };
        Ok(complete_up_to(rows.into_iter().map(|(a, b)| a.max(b))))
    }

    /// A trivial query: is the store readable?
    pub(crate) async fn ping(&self) -> Result<(), SinkError> {
        match &self.backend {
            Backend::Sqlite(s) => s.ping(),
            Backend::Postgres(p) => p.ping().await,
        }
    }
}
