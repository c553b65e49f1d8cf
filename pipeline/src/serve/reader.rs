//! Read queries of the seed's endpoints (`/v1/count`, `/v1/stats`,
//! `/v1/series`, `/v1/top`) over the API rollups: each is an [`Ask`] of the
//! API tiers as one generic rollup (`generic::statement`, like any
//! `/v1/rollups/{name}` query), run by the serving store's read pool
//! ([`ReadPool`]), which knows its backend.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) use crate::sink::serving::Totals;
use crate::sink::serving::{Arg, Cell, ReadPool};

use super::generic::{Ask, Family, ServedRollup};
use super::tiers::{Segment, Tiers};
use super::ServeError;

/// `as_of` is re-read at most this often (it moves once per committed batch).
const AS_OF_TTL: Duration = Duration::from_millis(100);

/// The API rollups' tiers and their statements: one version of each
/// (`Reader::set_tiers` swaps in another when a version is promoted; a
/// request keeps the view it planned with).
#[derive(Debug)]
pub(crate) struct SeedView {
    pub tiers: Tiers,
    /// The same tiers as a generic rollup.
    generic: Option<(ServedRollup, Family)>,
}

impl SeedView {
    fn new(pool: &ReadPool, tiers: Tiers, catalog: &crate::aggregate::SqlCatalog) -> SeedView {
        let generic = super::generic::Served::seed(catalog, &tiers, pool);
        SeedView { tiers, generic }
    }

    /// The generic rollup and an [`Ask`] filtered on `video_id` and
    /// `event_type` where given.
    fn ask(
        &self,
        video: Option<&str>,
        event_type: Option<&str>,
    ) -> Result<(&ServedRollup, &Family, Ask), ServeError> {
        let Some((r, family)) = &self.generic else {
            return Err(ServeError::Store(
                "the API rollups are not in the catalog".into(),
            ));
        };
        let mut ask = Ask::default();
        for (key, value) in [("video_id", video), ("event_type", event_type)] {
            if let (Some(v), Some(k)) = (value, r.key(key)) {
                ask.filters.push((k, vec![Arg::Text(v.to_string())]));
            }
        }
        Ok((r, family, ask))
    }
}

/// Totals from the measures of a row (`events`, `value_sum`, `value_count`,
/// `value_min`, `value_max`, wherever they are), read from `from` on.
fn totals(r: &ServedRollup, row: Option<&[Cell]>, from: usize) -> Totals {
    let cell = |name: &str| {
        r.measures
            .iter()
            .position(|m| m.name == name)
            .and_then(|i| row.and_then(|row| row.get(from + i)))
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
    Totals {
        events: int("events"),
        value_sum: real("value_sum").unwrap_or(0.0),
        value_count: int("value_count"),
        value_min: real("value_min"),
        value_max: real("value_max"),
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
    /// (PostgreSQL: a pool of that size, connected on first use), whose
    /// rollup tables have an index on their window when `window_index`.
    pub(crate) fn open(
        url: &str,
        connections: usize,
        tiers: Tiers,
        catalog: &crate::aggregate::SqlCatalog,
        topic: &str,
        window_index: bool,
    ) -> Result<Reader, ServeError> {
        let pool = ReadPool::open(url, connections)
            .map_err(store_err)?
            .with_window_index(window_index);
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
    /// segments: one index range per segment (a skip-scan over the video's
    /// event types when none is given).
    pub(crate) async fn totals(
        &self,
        view: &SeedView,
        video: &str,
        event_type: Option<&str>,
        plan: &[Segment],
    ) -> Result<Totals, ServeError> {
        let (r, family, mut ask) = view.ask(Some(video), event_type)?;
        ask.limit = 1;
        let st = super::generic::statement(r, family, plan, &ask);
        let rows = self.cells(&st.text, st.args, st.kinds, st.point).await?;
        Ok(totals(r, rows.first().map(Vec::as_slice), 0))
    }

    /// Per-bucket totals of one tier; buckets without rows are absent.
    pub(crate) async fn series(
        &self,
        view: &SeedView,
        video: &str,
        event_type: Option<&str>,
        tier: usize,
        (start, end): (i64, i64),
        granularity_ms: i64,
    ) -> Result<BTreeMap<i64, Totals>, ServeError> {
        let (r, family, mut ask) = view.ask(Some(video), event_type)?;
        ask.granularity = Some(granularity_ms);
        let buckets = (end - start) / granularity_ms.max(1) + 1;
        ask.limit = u32::try_from(buckets).unwrap_or(u32::MAX - 1);
        let plan = [Segment {
            tier,
            lo: start,
            hi: end,
        }];
        let st = super::generic::statement(r, family, &plan, &ask);
        let rows = self.cells(&st.text, st.args, st.kinds, st.point).await?;
        Ok(rows
            .iter()
            .filter_map(|row| match row.first() {
                Some(Cell::Int(b)) => Some((*b, totals(r, Some(row), 1))),
                _ => None,
            })
            .collect())
    }

    /// The `limit` videos with the most events over planned segments (ties
    /// by video id).
    pub(crate) async fn top(
        &self,
        view: &SeedView,
        event_type: Option<&str>,
        plan: &[Segment],
        limit: u32,
    ) -> Result<Vec<(String, i64)>, ServeError> {
        let (r, family, mut ask) = view.ask(None, event_type)?;
        let (Some(video), Some(events)) = (r.key("video_id"), r.measure("events")) else {
            return Err(ServeError::Store(
                "the API rollups have no video_id key or events measure".into(),
            ));
        };
        ask.group_by = vec![video];
        ask.measures = vec![events];
        ask.order_by = Some(events);
        ask.limit = limit;
        let st = super::generic::statement(r, family, plan, &ask);
        let rows = self.cells(&st.text, st.args, st.kinds, st.point).await?;
        Ok(rows
            .into_iter()
            .take(limit as usize)
            .filter_map(|row| match (row.first(), row.get(1)) {
                (Some(Cell::Text(v)), Some(Cell::Int(n))) => Some((v.clone(), *n)),
                _ => None,
            })
            .collect())
    }

    /// A trivial query: is the store readable?
    pub(crate) async fn ping(&self) -> Result<(), ServeError> {
        self.pool.ping().await.map_err(store_err)
    }
}
