//! Read queries over the API rollups: the tiers' statements, planned here
//! once at startup (one index range per tier piece, `UNION ALL` over the
//! tables that hold a rollup's rows, `?N` placeholders), and run by the
//! serving store's read pool ([`ReadPool`]), which knows its backend. SQL
//! text is built from identifiers the SQL catalog validated; every request
//! value is a bound parameter.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) use crate::sink::serving::Totals;
use crate::sink::serving::{quote, Arg, ReadPool};

use super::tiers::{Segment, Tiers};
use super::ServeError;

#[derive(Debug, Clone)]
struct TierSql {
    series_type: String,
    series_all: String,
    /// The quoted tables that hold this tier's rows (the read pool says
    /// which). Every read sums over all of them.
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
    fn new(tables: Vec<String>, window: &str) -> TierSql {
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

/// The API rollups' tiers and their statements: one version of each
/// (`Reader::set_tiers` swaps in another when a version is promoted; a
/// request keeps the view it planned with).
#[derive(Debug)]
pub(crate) struct SeedView {
    pub tiers: Tiers,
    sql: Vec<TierSql>,
    /// The same tiers as a generic rollup (totals go through
    /// `generic::statement`).
    generic: Option<(super::generic::ServedRollup, super::generic::Family)>,
}

impl SeedView {
    fn new(pool: &ReadPool, tiers: Tiers, catalog: &crate::aggregate::SqlCatalog) -> SeedView {
        let sql = tiers
            .tiers
            .iter()
            .map(|t| TierSql::new(pool.tables_of(&t.rollup), &t.window))
            .collect();
        let generic = super::generic::Served::seed(catalog, &tiers, pool);
        SeedView {
            tiers,
            sql,
            generic,
        }
    }
}

/// Read access to the API rollups.
#[derive(Debug)]
pub(crate) struct Reader {
    pool: ReadPool,
    view: std::sync::RwLock<std::sync::Arc<SeedView>>,
    topic: String,
    as_of_cache: Mutex<Option<(Instant, Option<i64>)>>,
}

fn store_err(e: crate::sink::SinkError) -> ServeError {
    ServeError::Store(e.to_string())
}

impl Reader {
    /// The read connections (the generic rollup queries plan their own statements).
    pub(crate) fn pool(&self) -> &ReadPool {
        &self.pool
    }

    /// Rows of a planned statement, as cells of `kinds`.
    pub(crate) async fn cells(
        &self,
        text: &str,
        args: Vec<Arg>,
        kinds: Vec<crate::aggregate::ColumnKind>,
        point: bool,
    ) -> Result<Vec<Vec<crate::sink::serving::Cell>>, ServeError> {
        self.pool
            .cells(text, args, kinds, point)
            .await
            .map_err(store_err)
    }

    /// Open `connections` read-only connections to the store at `url`
    /// (PostgreSQL: a pool of that size, connected on first use).
    pub(crate) fn open(
        url: &str,
        connections: usize,
        tiers: Tiers,
        catalog: &crate::aggregate::SqlCatalog,
        topic: &str,
    ) -> Result<Reader, ServeError> {
        let pool = ReadPool::open(url, connections).map_err(store_err)?;
        let view =
            std::sync::RwLock::new(std::sync::Arc::new(SeedView::new(&pool, tiers, catalog)));
        Ok(Reader {
            pool,
            view,
            topic: topic.to_string(),
            as_of_cache: Mutex::new(None),
        })
    }

    /// The tiers requests plan with now.
    pub(crate) fn view(&self) -> std::sync::Arc<SeedView> {
        match self.view.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Answer from `tiers` from now on (a promoted version).
    pub(crate) fn set_tiers(&self, tiers: Tiers, catalog: &crate::aggregate::SqlCatalog) {
        let view = std::sync::Arc::new(SeedView::new(&self.pool, tiers, catalog));
        match self.view.write() {
            Ok(mut v) => *v = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }

    /// See [`crate::sink::ServingStore::as_of`]; at most [`AS_OF_TTL`] old.
    pub(crate) async fn as_of(&self) -> Result<Option<i64>, ServeError> {
        if let Ok(cache) = self.as_of_cache.lock() {
            if let Some((at, v)) = *cache {
                if at.elapsed() < AS_OF_TTL {
                    return Ok(v);
                }
            }
        }
        let v = self.pool.as_of(&self.topic).await.map_err(store_err)?;
        if let Ok(mut cache) = self.as_of_cache.lock() {
            *cache = Some((Instant::now(), v));
        }
        Ok(v)
    }

    /// Totals for one video (one or all event types) over planned
    /// segments: the generic rollup statement (`generic::statement`) over
    /// the API tiers, one index range per segment (a skip-scan over the
    /// video's event types when none is given).
    pub(crate) async fn totals(
        &self,
        view: &SeedView,
        video: &str,
        event_type: Option<&str>,
        plan: &[Segment],
    ) -> Result<Totals, ServeError> {
        use crate::sink::serving::Cell;
        let Some((r, family)) = &view.generic else {
            return Err(ServeError::Store(
                "the API rollups are not in the catalog".into(),
            ));
        };
        let mut ask = super::generic::Ask {
            limit: 1,
            ..Default::default()
        };
        for (key, value) in [("video_id", Some(video)), ("event_type", event_type)] {
            if let (Some(v), Some(k)) = (value, r.keys.iter().position(|(n, _)| n == key)) {
                ask.filters.push((k, vec![Arg::Text(v.to_string())]));
            }
        }
        let st = super::generic::statement(r, family, plan, &ask);
        let rows = self
            .pool
            .cells(&st.text, st.args, st.kinds, st.point)
            .await
            .map_err(store_err)?;
        let row = rows.first();
        let cell = |name: &str| {
            r.measures
                .iter()
                .position(|m| m.name == name)
                .and_then(|i| row.and_then(|row| row.get(i)))
        };
        let int = |name: &str| match cell(name) {
            Some(Cell::Int(v)) => *v,
            Some(Cell::Real(v)) => *v as i64,
            _ => 0,
        };
        let real = |name: &str| match cell(name) {
            Some(Cell::Real(v)) => Some(*v),
            Some(Cell::Int(v)) => Some(*v as f64),
            _ => None,
        };
        Ok(Totals {
            events: int("events"),
            value_sum: real("value_sum").unwrap_or(0.0),
            value_count: int("value_count"),
            value_min: real("value_min"),
            value_max: real("value_max"),
        })
    }

    /// Per-bucket totals; buckets without rows are absent.
    pub(crate) async fn series(
        &self,
        view: &SeedView,
        video: &str,
        event_type: Option<&str>,
        tier: usize,
        (start, end): (i64, i64),
        granularity_ms: i64,
    ) -> Result<BTreeMap<i64, Totals>, ServeError> {
        let sql = view
            .sql
            .get(tier)
            .ok_or_else(|| ServeError::Store("no such tier".into()))?;
        let (text, args): (&str, Vec<Arg>) = match event_type {
            Some(et) => (
                &sql.series_type,
                vec![
                    Arg::Text(video.into()),
                    Arg::Text(et.into()),
                    Arg::Int(start),
                    Arg::Int(end),
                    Arg::Int(granularity_ms),
                ],
            ),
            None => (
                &sql.series_all,
                vec![
                    Arg::Text(video.into()),
                    Arg::Int(start),
                    Arg::Int(end),
                    Arg::Int(granularity_ms),
                ],
            ),
        };
        self.pool.bucket_totals(text, args).await.map_err(store_err)
    }

    /// The `limit` videos with the most events over planned segments.
    pub(crate) async fn top(
        &self,
        view: &SeedView,
        event_type: Option<&str>,
        plan: &[Segment],
        limit: u32,
    ) -> Result<Vec<(String, i64)>, ServeError> {
        // One statement: a UNION ALL of per-segment partial sums.
        let mut parts = Vec::new();
        let mut args: Vec<Arg> = Vec::new();
        for seg in plan {
            let Some(sql) = view.sql.get(seg.tier) else {
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
                args.push(Arg::Int(seg.lo));
                args.push(Arg::Int(seg.hi));
                if let Some(et) = event_type {
                    args.push(Arg::Text(et.to_string()));
                }
            }
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        args.push(Arg::Int(i64::from(limit)));
        let text = format!(
            "SELECT video_id, CAST(sum(n) AS BIGINT) AS total FROM ({}) parts GROUP BY video_id ORDER BY total DESC, video_id LIMIT ?",
            parts.join(" UNION ALL ")
        );
        self.pool.counts(&text, args).await.map_err(store_err)
    }

    /// A trivial query: is the store readable?
    pub(crate) async fn ping(&self) -> Result<(), ServeError> {
        self.pool.ping().await.map_err(store_err)
    }
}
