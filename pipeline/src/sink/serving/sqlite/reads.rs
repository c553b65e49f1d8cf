//! The API's read-only SQLite connections (see `serving/reads.rs`). They
//! never wait on the writer's `BEGIN IMMEDIATE` (WAL mode).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params_from_iter, types::Value, Connection, OpenFlags};

use super::super::reads::Arg;
use super::super::schema::{PartitionTimes, AS_OF_SQL};
use super::super::{sq, Cell, SinkError};
use crate::aggregate::ColumnKind;

#[derive(Debug)]
pub(in super::super) struct SqliteReads {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

fn values(args: Vec<Arg>) -> Vec<Value> {
    args.into_iter()
        .map(|a| match a {
            Arg::Int(v) => Value::Integer(v),
            Arg::Text(v) => Value::Text(v),
        })
        .collect()
}

impl SqliteReads {
    pub(in super::super) fn open(path: &Path, connections: usize) -> rusqlite::Result<SqliteReads> {
        let mut conns = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            let c = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            c.busy_timeout(Duration::from_secs(2))?;
            super::functions::register(&c)?;
            c.set_prepared_statement_cache_capacity(64);
            conns.push(Mutex::new(c));
        }
        Ok(SqliteReads {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Run `f` on a free connection, or wait for one off the async workers,
    /// so a burst of slow reads never stalls the committer or `/livez`.
    fn with_conn<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, SinkError> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Some(Ok(c)) = self.conns.get((start + i) % n).map(Mutex::try_lock) {
                return f(&c).map_err(sq(operation));
            }
        }
        crate::serve::blocking(|| {
            let c = self
                .conns
                .get(start)
                .ok_or_else(|| SinkError::Encode {
                    path: operation.into(),
                    message: "no read connection".into(),
                })?
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&c).map_err(sq(operation))
        })
    }

    pub(in super::super) fn cells(
        &self,
        text: &str,
        args: Vec<Arg>,
        kinds: &[ColumnKind],
    ) -> Result<Vec<Vec<Cell>>, SinkError> {
        self.with_conn("read rollup rows", |c| {
            let mut st = c.prepare_cached(text)?;
            let rows = st.query_map(params_from_iter(values(args)), |r| {
                kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        Ok(match k {
                            ColumnKind::Text => r.get::<_, Option<String>>(i)?.map(Cell::Text),
                            ColumnKind::Int => r.get::<_, Option<i64>>(i)?.map(Cell::Int),
                            ColumnKind::Real => r.get::<_, Option<f64>>(i)?.map(Cell::Real),
                            ColumnKind::Bytes => r.get::<_, Option<Vec<u8>>>(i)?.map(Cell::Bytes),
                        }
                        .unwrap_or(Cell::Null))
                    })
                    .collect::<rusqlite::Result<Vec<Cell>>>()
            })?;
            rows.collect()
        })
    }

    pub(in super::super) fn as_of_rows(&self, topic: &str) -> Result<PartitionTimes, SinkError> {
        self.with_conn("read as_of", |c| {
            let mut st = c.prepare_cached(AS_OF_SQL)?;
            let rows = st.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub(in super::super) fn ping(&self) -> Result<(), SinkError> {
        self.with_conn("ping", |c| {
            c.query_row("SELECT count(*) FROM tally_offsets", [], |_| Ok(()))
        })
    }
}
