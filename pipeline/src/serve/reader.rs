//! Read queries over the API rollups. SQL text is built from identifiers the
//! SQL catalog validated; every request value is a bound parameter.
//!
//! On SQLite, reads use their own read-only connections (rusqlite, linked to
//! the same bundled SQLite as sqlx) and run on the calling thread: an indexed
//! lookup takes tens of microseconds, less than handing it to a connection
//! thread and back. Scans that can take longer (series, top) move off the
//! async worker with `block_in_place`. On PostgreSQL, reads go through a
//! sqlx pool; the statement text is the same, with numbered placeholders.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{params_from_iter, types::Value as Sql, Connection, OpenFlags};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};

use crate::sink::serving::{number_placeholders, quote};

use super::tiers::{Segment, Tiers};
use super::ServeError;

/// count / sum / value count / min / max over some rows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    pub events: i64,
    pub value_sum: f64,
    pub value_count: i64,
    pub value_min: Option<f64>,
    pub value_max: Option<f64>,
}

impl Totals {
    pub fn merge(&mut self, o: &Totals) {
        self.events += o.events;
        self.value_sum += o.value_sum;
        self.value_count += o.value_count;
        self.value_min = match (self.value_min, o.value_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.value_max = match (self.value_max, o.value_max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    pub fn avg(&self) -> Option<f64> {
        (self.value_count > 0).then(|| self.value_sum / self.value_count as f64)
    }
}

#[derive(Debug, Clone)]
struct TierSql {
    series_type: String,
    series_all: String,
    /// The quoted tables that hold this tier's rows: the rollup table and,
    /// on SQLite, its delta table (see `sink::serving`). Every read sums
    /// over all of them.
    tables: Vec<String>,
    window: String,
}

// Integer sums are cast back to BIGINT: PostgreSQL sums BIGINT into NUMERIC.
const MEASURES_SQL: &str =
    "CAST(coalesce(sum(r.events), 0) AS BIGINT), coalesce(sum(r.value_sum), 0.0), \
     CAST(coalesce(sum(r.value_count), 0) AS BIGINT), min(r.value_min), max(r.value_max)";

/// `part(table)` for each table, as one `UNION ALL`.
fn each_table(tables: &[String], part: impl Fn(&str) -> String) -> String {
    tables
        .iter()
        .map(|t| part(t))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Distinct event types of one video by index skip-scan (one B-tree probe
/// per type and table), so queries over all types never scan a video's history.
fn types_cte(tables: &[String]) -> String {
    let first = each_table(tables, |t| {
        format!("SELECT min(event_type) AS et FROM {t} WHERE video_id = ?1")
    });
    let next = each_table(tables, |t| {
        format!(
            "SELECT min(event_type) AS et FROM {t} WHERE video_id = ?1 AND event_type > types.et"
        )
    });
    format!(
        "WITH RECURSIVE types(et) AS (
           SELECT (SELECT min(et) FROM ({first}) f)
           UNION ALL
           SELECT (SELECT min(et) FROM ({next}) n)
           FROM types WHERE types.et IS NOT NULL)"
    )
}

impl TierSql {
    fn new(table: &str, window: &str, with_delta: bool) -> TierSql {
        let mut tables = vec![quote(table)];
        if with_delta {
            tables.push(quote(&crate::sink::serving::delta_table(table)));
        }
        let w = quote(window);
        let by_type = each_table(&tables, |t| {
            format!("SELECT * FROM {t} WHERE video_id = ?1 AND event_type = ?2 AND {w} >= ?3 AND {w} < ?4")
        });
        let all_types = each_table(&tables, |t| {
            format!("SELECT r.* FROM types JOIN {t} r ON r.video_id = ?1 AND r.event_type = types.et AND r.{w} >= ?2 AND r.{w} < ?3")
        });
        TierSql {
            series_type: format!(
                "SELECT (r.{w} / ?5) * ?5 AS b, {MEASURES_SQL} FROM ({by_type}) r GROUP BY b"
            ),
            series_all: format!(
                "{} SELECT (r.{w} / ?4) * ?4 AS b, {MEASURES_SQL} FROM ({all_types}) r GROUP BY b",
                types_cte(&tables)
            ),
            tables,
            window: w,
        }
    }
}

/// `as_of` is re-read at most this often (it moves once per committed batch).
const AS_OF_TTL: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Backend {
    Sqlite {
        conns: Vec<Mutex<Connection>>,
        next: AtomicUsize,
    },
    Postgres(PgPool),
}

/// Read access to the API rollups.
#[derive(Debug)]
pub struct Reader {
    backend: Backend,
    pub tiers: Tiers,
    sql: Vec<TierSql>,
    topic: String,
    as_of_cache: Mutex<Option<(Instant, Option<i64>)>>,
}

fn store_err(what: &'static str) -> impl Fn(rusqlite::Error) -> ServeError {
    move |e| ServeError::Store(format!("{what}: {e}"))
}

fn pg_totals(r: &PgRow, from: usize) -> Result<Totals, sqlx::Error> {
    Ok(Totals {
        events: r.try_get(from)?,
        value_sum: r.try_get(from + 1)?,
        value_count: r.try_get(from + 2)?,
        value_min: r.try_get(from + 3)?,
        value_max: r.try_get(from + 4)?,
    })
}

fn totals(r: &rusqlite::Row<'_>, from: usize) -> rusqlite::Result<Totals> {
    Ok(Totals {
        events: r.get(from)?,
        value_sum: r.get(from + 1)?,
        value_count: r.get(from + 2)?,
        value_min: r.get(from + 3)?,
        value_max: r.get(from + 4)?,
    })
}

use super::blocking;

/// The file path of a `sqlite://PATH[?options]` URL.
fn sqlite_path(url: &str) -> Result<String, ServeError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| {
            ServeError::Store(format!(
                "{url}: the API reads SQLite stores only (sqlite://PATH)"
            ))
        })?;
    Ok(rest.split('?').next().unwrap_or(rest).to_string())
}

impl Reader {
    /// Open `connections` read-only connections to the store at `url`
    /// (PostgreSQL: a pool of that size, connected on first use).
    pub fn open(
        url: &str,
        connections: usize,
        tiers: Tiers,
        topic: &str,
    ) -> Result<Reader, ServeError> {
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(|e| {
                ServeError::Store(format!("{}: {e}", crate::sink::serving::redact(url)))
            })?;
            Backend::Postgres(
                PgPoolOptions::new()
                    .max_connections(connections.max(1) as u32)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy_with(opts),
            )
        } else {
            let path = sqlite_path(url)?;
            let open_err = |e: rusqlite::Error| {
                ServeError::Store(format!("cannot open {path} read-only: {e}"))
            };
            let mut conns = Vec::with_capacity(connections);
            for _ in 0..connections.max(1) {
                let c = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(open_err)?;
                c.busy_timeout(Duration::from_secs(2)).map_err(open_err)?;
                c.set_prepared_statement_cache_capacity(64);
                conns.push(Mutex::new(c));
            }
            Backend::Sqlite {
                conns,
                next: AtomicUsize::new(0),
            }
        };
        let with_delta = matches!(backend, Backend::Sqlite { .. });
        let sql = tiers
            .tiers
            .iter()
            .map(|t| TierSql::new(&t.rollup, &t.window, with_delta))
            .collect();
        Ok(Reader {
            backend,
            tiers,
            sql,
            topic: topic.to_string(),
            as_of_cache: Mutex::new(None),
        })
    }

    /// Run `text` with `args` on PostgreSQL.
    async fn pg<T>(
        pool: &PgPool,
        text: &str,
        args: Vec<Sql>,
        what: &'static str,
        row: impl Fn(&PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, ServeError> {
        let sql = number_placeholders(text);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            q = match a {
                Sql::Integer(v) => q.bind(v),
                Sql::Text(v) => q.bind(v),
                Sql::Real(v) => q.bind(v),
                _ => q.bind(Option::<i64>::None),
            };
        }
        let rows = q
            .fetch_all(pool)
            .await
            .map_err(|e| ServeError::Store(format!("{what}: {e}")))?;
        rows.iter()
            .map(|r| row(r).map_err(|e| ServeError::Store(format!("{what}: {e}"))))
            .collect()
    }

    /// Run `f` on a free connection (or wait for one).
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
        what: &'static str,
    ) -> Result<T, ServeError> {
        let Backend::Sqlite { conns, next } = &self.backend else {
            return Err(ServeError::Store(format!("{what}: not a SQLite store")));
        };
        let n = conns.len();
        let start = next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Some(Ok(c)) = conns.get((start + i) % n).map(Mutex::try_lock) {
                return f(&c).map_err(store_err(what));
            }
        }
        // All busy: wait for one off the async workers, so a burst of slow
        // reads never stalls the committer or `/livez` that share them.
        blocking(|| {
            let c = conns
                .get(start)
                .ok_or_else(|| ServeError::Store("no connection".into()))?
                .lock()
                .map_err(|_| ServeError::Store("a reader connection was poisoned".into()))?;
            f(&c).map_err(store_err(what))
        })
    }

    /// See [`crate::sink::ServingStore::as_of`]; at most [`AS_OF_TTL`] old.
    pub async fn as_of(&self) -> Result<Option<i64>, ServeError> {
        if let Ok(cache) = self.as_of_cache.lock() {
            if let Some((at, v)) = *cache {
                if at.elapsed() < AS_OF_TTL {
                    return Ok(v);
                }
            }
        }
        let v = if let Backend::Postgres(pool) = &self.backend {
            let rows = Self::pg(
                pool,
                "SELECT max_event_ms, caught_up_ms FROM tally_offsets WHERE topic = ?1",
                vec![Sql::Text(self.topic.clone())],
                "read as_of",
                |r| {
                    Ok(r.try_get::<Option<i64>, _>(0)?
                        .max(r.try_get::<Option<i64>, _>(1)?))
                },
            )
            .await?;
            crate::sink::serving::complete_up_to(rows)
        } else {
            self.with_conn(
                |c| {
                    let mut st = c.prepare_cached(
                        "SELECT max_event_ms, caught_up_ms FROM tally_offsets WHERE topic = ?1",
                    )?;
                    let rows = st.query_map([&self.topic], |r| {
                        Ok(r.get::<_, Option<i64>>(0)?.max(r.get::<_, Option<i64>>(1)?))
                    })?;
                    let times = rows.collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(crate::sink::serving::complete_up_to(times))
                },
                "read as_of",
            )?
        };
        if let Ok(mut cache) = self.as_of_cache.lock() {
            *cache = Some((Instant::now(), v));
        }
        Ok(v)
    }

    /// Totals for one video (one or all event types) over planned segments,
    /// in one statement: a `UNION ALL` of one index range per segment.
    pub async fn totals(
        &self,
        video: &str,
        event_type: Option<&str>,
        plan: &[Segment],
    ) -> Result<Totals, ServeError> {
        let text = self.totals_sql(plan, event_type.is_some());
        let mut args: Vec<Sql> = vec![Sql::Text(video.to_string())];
        if let Some(et) = event_type {
            args.push(Sql::Text(et.to_string()));
        }
        for seg in plan {
            args.push(Sql::Integer(seg.lo));
            args.push(Sql::Integer(seg.hi));
        }
        if let Backend::Postgres(pool) = &self.backend {
            let rows = Self::pg(pool, &text, args, "read totals", |r| pg_totals(r, 0)).await?;
            return Ok(rows.into_iter().next().unwrap_or_default());
        }
        self.with_conn(
            |c| {
                c.prepare_cached(&text)?
                    .query_row(params_from_iter(args), |r| totals(r, 0))
            },
            "read totals",
        )
    }

    /// `?1` video, (`?2` event type), then (lo, hi) per segment.
    fn totals_sql(&self, plan: &[Segment], with_type: bool) -> String {
        let mut next = if with_type { 3 } else { 2 };
        let mut parts = Vec::with_capacity(plan.len());
        for seg in plan {
            let Some(sql) = self.sql.get(seg.tier) else {
                continue;
            };
            let (w, lo, hi) = (&sql.window, next, next + 1);
            next += 2;
            parts.push(each_table(&sql.tables, |t| {
                if with_type {
                    format!(
                        "SELECT events, value_sum, value_count, value_min, value_max FROM {t} \
                         WHERE video_id = ?1 AND event_type = ?2 AND {w} >= ?{lo} AND {w} < ?{hi}"
                    )
                } else {
                    format!(
                        "SELECT r.events, r.value_sum, r.value_count, r.value_min, r.value_max FROM types JOIN {t} r \
                         ON r.video_id = ?1 AND r.event_type = types.et AND r.{w} >= ?{lo} AND r.{w} < ?{hi}"
                    )
                }
            }));
        }
        if parts.is_empty() {
            parts.push("SELECT 0 AS events, 0.0 AS value_sum, 0 AS value_count, NULL AS value_min, NULL AS value_max WHERE 1 = 0".into());
        }
        let cte = match (with_type, self.sql.first()) {
            (false, Some(coarsest)) => types_cte(&coarsest.tables),
            _ => String::new(),
        };
        format!(
            "{cte} SELECT {MEASURES_SQL} FROM ({}) r",
            parts.join(" UNION ALL ")
        )
    }

    /// Per-bucket totals; buckets without rows are absent.
    pub async fn series(
        &self,
        video: &str,
        event_type: Option<&str>,
        tier: usize,
        start: i64,
        end: i64,
        granularity_ms: i64,
    ) -> Result<BTreeMap<i64, Totals>, ServeError> {
        let sql = self
            .sql
            .get(tier)
            .ok_or_else(|| ServeError::Store("no such tier".into()))?;
        let (text, args): (&str, Vec<Sql>) = match event_type {
            Some(et) => (
                &sql.series_type,
                vec![
                    Sql::Text(video.into()),
                    Sql::Text(et.into()),
                    Sql::Integer(start),
                    Sql::Integer(end),
                    Sql::Integer(granularity_ms),
                ],
            ),
            None => (
                &sql.series_all,
                vec![
                    Sql::Text(video.into()),
                    Sql::Integer(start),
                    Sql::Integer(end),
                    Sql::Integer(granularity_ms),
                ],
            ),
        };
        if let Backend::Postgres(pool) = &self.backend {
            let rows = Self::pg(pool, text, args, "read series", |r| {
                Ok((r.try_get::<i64, _>(0)?, pg_totals(r, 1)?))
            })
            .await?;
            return Ok(rows.into_iter().collect());
        }
        blocking(|| {
            self.with_conn(
                |c| {
                    let mut st = c.prepare_cached(text)?;
                    let rows = st.query_map(params_from_iter(args), |r| {
                        Ok((r.get::<_, i64>(0)?, totals(r, 1)?))
                    })?;
                    rows.collect::<rusqlite::Result<BTreeMap<i64, Totals>>>()
                },
                "read series",
            )
        })
    }

    /// The `limit` videos with the most events over planned segments.
    pub async fn top(
        &self,
        event_type: Option<&str>,
        plan: &[Segment],
        limit: u32,
    ) -> Result<Vec<(String, i64)>, ServeError> {
        // One statement: a UNION ALL of per-segment partial sums.
        let mut parts = Vec::new();
        let mut args: Vec<Sql> = Vec::new();
        for seg in plan {
            let Some(sql) = self.sql.get(seg.tier) else {
                continue;
            };
            let filter = if event_type.is_some() {
                " AND event_type = ?"
            } else {
                ""
            };
            for t in &sql.tables {
                parts.push(format!(
                    "SELECT video_id, sum(events) AS n FROM {t} WHERE {} >= ? AND {} < ?{filter} GROUP BY video_id",
                    sql.window, sql.window
                ));
                args.push(Sql::Integer(seg.lo));
                args.push(Sql::Integer(seg.hi));
                if let Some(et) = event_type {
                    args.push(Sql::Text(et.to_string()));
                }
            }
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        args.push(Sql::Integer(i64::from(limit)));
        let text = format!(
            "SELECT video_id, CAST(sum(n) AS BIGINT) AS total FROM ({}) parts GROUP BY video_id ORDER BY total DESC, video_id LIMIT ?",
            parts.join(" UNION ALL ")
        );
        if let Backend::Postgres(pool) = &self.backend {
            return Self::pg(pool, &text, args, "read top", |r| {
                Ok((r.try_get(0)?, r.try_get(1)?))
            })
            .await;
        }
        blocking(|| {
            self.with_conn(
                |c| {
                    let mut st = c.prepare_cached(&text)?;
                    let rows =
                        st.query_map(params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect()
                },
                "read top",
            )
        })
    }

    /// A trivial query: is the store readable?
    pub async fn ping(&self) -> Result<(), ServeError> {
        if let Backend::Postgres(pool) = &self.backend {
            return Self::pg(
                pool,
                "SELECT count(*) FROM tally_offsets",
                vec![],
                "ping",
                |_| Ok(()),
            )
            .await
            .map(|_| ());
        }
        self.with_conn(
            |c| c.query_row("SELECT count(*) FROM tally_offsets", [], |_| Ok(())),
            "ping",
        )
    }
}
