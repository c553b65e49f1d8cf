//! Read queries over the API rollups. SQL text is built once at startup from
//! identifiers the SQL catalog validated; every request value is a bound
//! parameter.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Row, SqlitePool};

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
    quoted: String,
    window: String,
}

const MEASURES_SQL: &str =
    "coalesce(sum(r.events), 0), coalesce(sum(r.value_sum), 0.0), coalesce(sum(r.value_count), 0), min(r.value_min), max(r.value_max)";

/// Distinct event types of one video by index skip-scan (one B-tree probe
/// per type), so queries over all types never scan a video's history.
fn types_cte(t: &str) -> String {
    format!(
        "WITH RECURSIVE types(et) AS (
           SELECT (SELECT min(event_type) FROM {t} WHERE video_id = ?1)
           UNION ALL
           SELECT (SELECT min(event_type) FROM {t} WHERE video_id = ?1 AND event_type > types.et)
           FROM types WHERE types.et IS NOT NULL)"
    )
}

impl TierSql {
    fn new(table: &str, window: &str) -> TierSql {
        let t = format!("\"{}\"", table.replace('"', "\"\""));
        let w = format!("\"{}\"", window.replace('"', "\"\""));
        TierSql {
            series_type: format!(
                "SELECT (r.{w} / ?5) * ?5 AS b, {MEASURES_SQL} FROM {t} r
                 WHERE r.video_id = ?1 AND r.event_type = ?2 AND r.{w} >= ?3 AND r.{w} < ?4 GROUP BY b"
            ),
            series_all: format!(
                "{} SELECT (r.{w} / ?4) * ?4 AS b, {MEASURES_SQL} FROM types JOIN {t} r
                 ON r.video_id = ?1 AND r.event_type = types.et AND r.{w} >= ?2 AND r.{w} < ?3 GROUP BY b",
                types_cte(&t)
            ),
            quoted: t,
            window: w,
        }
    }
}

/// `as_of` is re-read at most this often (it moves once per committed batch).
const AS_OF_TTL: Duration = Duration::from_millis(100);

/// Read access to the API rollups.
#[derive(Debug)]
pub struct Reader {
    pool: SqlitePool,
    pub tiers: Tiers,
    sql: Vec<TierSql>,
    topic: String,
    as_of_cache: Mutex<Option<(Instant, Option<i64>)>>,
}

fn store_err(what: &'static str) -> impl Fn(sqlx::Error) -> ServeError {
    move |e| ServeError::Store(format!("{what}: {e}"))
}

fn totals(r: &sqlx::sqlite::SqliteRow, from: usize) -> Result<Totals, sqlx::Error> {
    Ok(Totals {
        events: r.try_get(from)?,
        value_sum: r.try_get(from + 1)?,
        value_count: r.try_get(from + 2)?,
        value_min: r.try_get(from + 3)?,
        value_max: r.try_get(from + 4)?,
    })
}

impl Reader {
    pub fn new(pool: SqlitePool, tiers: Tiers, topic: &str) -> Reader {
        let sql = tiers.tiers.iter().map(|t| TierSql::new(&t.rollup, &t.window)).collect();
        Reader { pool, tiers, sql, topic: topic.to_string(), as_of_cache: Mutex::new(None) }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
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
        let v = crate::sink::serving::as_of(&self.pool, &self.topic)
            .await
            .map_err(|e| ServeError::Store(e.to_string()))?;
        if let Ok(mut cache) = self.as_of_cache.lock() {
            *cache = Some((Instant::now(), v));
        }
        Ok(v)
    }

    /// Totals for one video (one or all event types) over planned segments,
    /// in one statement: a `UNION ALL` of one index range per segment.
    pub async fn totals(&self, video: &str, event_type: Option<&str>, plan: &[Segment]) -> Result<Totals, ServeError> {
        let text = self.totals_sql(plan, event_type.is_some());
        let mut q = sqlx::query(AssertSqlSafe(text)).bind(video);
        if let Some(et) = event_type {
            q = q.bind(et);
        }
        for seg in plan {
            q = q.bind(seg.lo).bind(seg.hi);
        }
        let row = q.fetch_one(&self.pool).await.map_err(store_err("read totals"))?;
        totals(&row, 0).map_err(store_err("decode totals"))
    }

    /// `?1` video, (`?2` event type), then (lo, hi) per segment.
    fn totals_sql(&self, plan: &[Segment], with_type: bool) -> String {
        let mut next = if with_type { 3 } else { 2 };
        let mut parts = Vec::with_capacity(plan.len());
        for seg in plan {
            let Some(sql) = self.sql.get(seg.tier) else { continue };
            let (t, w, lo, hi) = (&sql.quoted, &sql.window, next, next + 1);
            next += 2;
            parts.push(if with_type {
                format!(
                    "SELECT events, value_sum, value_count, value_min, value_max FROM {t} \
                     WHERE video_id = ?1 AND event_type = ?2 AND {w} >= ?{lo} AND {w} < ?{hi}"
                )
            } else {
                format!(
                    "SELECT r.events, r.value_sum, r.value_count, r.value_min, r.value_max FROM types JOIN {t} r \
                     ON r.video_id = ?1 AND r.event_type = types.et AND r.{w} >= ?{lo} AND r.{w} < ?{hi}"
                )
            });
        }
        if parts.is_empty() {
            parts.push("SELECT 0 AS events, 0.0 AS value_sum, 0 AS value_count, NULL AS value_min, NULL AS value_max WHERE 0".into());
        }
        let cte = match (with_type, self.sql.first()) {
            (false, Some(coarsest)) => types_cte(&coarsest.quoted),
            _ => String::new(),
        };
        format!("{cte} SELECT {MEASURES_SQL} FROM ({}) r", parts.join(" UNION ALL "))
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
        let sql = self.sql.get(tier).ok_or_else(|| ServeError::Store("no such tier".into()))?;
        let rows = match event_type {
            Some(et) => {
                sqlx::query(AssertSqlSafe(sql.series_type.as_str()))
                    .bind(video)
                    .bind(et)
                    .bind(start)
                    .bind(end)
                    .bind(granularity_ms)
                    .fetch_all(&self.pool)
                    .await
            }
            None => {
                sqlx::query(AssertSqlSafe(sql.series_all.as_str()))
                    .bind(video)
                    .bind(start)
                    .bind(end)
                    .bind(granularity_ms)
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(store_err("read series"))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let b: i64 = r.try_get(0).map_err(store_err("decode series"))?;
            out.insert(b, totals(&r, 1).map_err(store_err("decode series"))?);
        }
        Ok(out)
    }

    /// The `limit` videos with the most events over planned segments.
    pub async fn top(&self, event_type: Option<&str>, plan: &[Segment], limit: u32) -> Result<Vec<(String, i64)>, ServeError> {
        // One statement: a UNION ALL of per-segment partial sums.
        let mut parts = Vec::new();
        for seg in plan {
            let Some(sql) = self.sql.get(seg.tier) else { continue };
            let filter = if event_type.is_some() { " AND event_type = ?" } else { "" };
            parts.push(format!(
                "SELECT video_id, sum(events) AS n FROM {} WHERE {} >= ? AND {} < ?{filter} GROUP BY video_id",
                sql.quoted, sql.window, sql.window
            ));
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let text = format!(
            "SELECT video_id, sum(n) AS total FROM ({}) GROUP BY video_id ORDER BY total DESC, video_id LIMIT ?",
            parts.join(" UNION ALL ")
        );
        let mut q = sqlx::query(AssertSqlSafe(text));
        for seg in plan {
            q = q.bind(seg.lo).bind(seg.hi);
            if let Some(et) = event_type {
                q = q.bind(et.to_string());
            }
        }
        let rows = q.bind(i64::from(limit)).fetch_all(&self.pool).await.map_err(store_err("read top"))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(store_err("decode top"))
    }

    /// A trivial query: is the store readable?
    pub async fn ping(&self) -> Result<(), ServeError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await.map_err(store_err("ping"))?;
        Ok(())
    }
}
