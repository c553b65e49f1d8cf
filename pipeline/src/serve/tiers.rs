//! Which rollup answers which part of a time range.
//!
//! The API rollups (`api.rollups`) share keys and measures and differ only in
//! window width; each width divides the next coarser one. A range `[start,
//! end)` is split so that the coarsest windows cover its middle and finer ones
//! its edges: `[10:30, next day 02:00)` reads 30 minute rows, 13 hour rows and
//! 2 hour rows... and never more than two edge runs per tier. Every piece is a
//! whole number of windows, so the answer is exact; a range that is not on the
//! finest window boundary is refused rather than approximated.

use crate::aggregate::{ColumnKind, MergeRule, RollupDef, SqlCatalog};
use crate::config::{Keep, RetentionConfig};

use super::ServeError;

/// The columns every API rollup has.
pub(crate) const VIDEO: &str = "video_id";
pub(crate) const EVENT_TYPE: &str = "event_type";
/// (name, kind, merge rule) of the measures every API rollup has.
pub(crate) const MEASURES: &[(&str, ColumnKind, MergeRule)] = &[
    ("events", ColumnKind::Int, MergeRule::Sum),
    ("value_sum", ColumnKind::Real, MergeRule::Sum),
    ("value_count", ColumnKind::Int, MergeRule::Sum),
    ("value_min", ColumnKind::Real, MergeRule::Min),
    ("value_max", ColumnKind::Real, MergeRule::Max),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tier {
    pub rollup: String,
    pub window: String,
    pub width_ms: i64,
    /// `retention.rollups.<rollup>`: rows before `now - keep` may be gone.
    pub keep: Keep,
}

/// A range that needs rows retention no longer keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotRetained {
    pub message: String,
    /// The oldest `start` that can be answered (with `end` as asked).
    pub oldest_start: i64,
}

/// One piece of a planned range: rows of `tiers[tier]` with window start in `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub tier: usize,
    pub lo: i64,
    pub hi: i64,
}

/// The API rollups, coarsest first.
#[derive(Debug, Clone)]
pub(crate) struct Tiers {
    pub tiers: Vec<Tier>,
}

/// Human name of a window width: `1m`, `1h`, `1d`, `15m`...
pub(crate) fn width_name(ms: i64) -> String {
    if ms % 86_400_000 == 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

fn check_def(def: &RollupDef) -> Result<(), String> {
    let keys: Vec<&str> = def.keys().iter().map(|c| c.name.as_str()).collect();
    let mut want = vec![VIDEO, EVENT_TYPE, def.window_name()];
    let mut have = keys.clone();
    want.sort_unstable();
    have.sort_unstable();
    if want != have {
        return Err(format!(
            "its GROUP BY keys are ({}); an API rollup groups by exactly {VIDEO}, {EVENT_TYPE} and one time window",
            keys.join(", ")
        ));
    }
    for c in def.keys() {
        if c.name != def.window_name() && c.kind != ColumnKind::Text {
            return Err(format!("key `{}` must be a string", c.name));
        }
    }
    for (name, kind, merge) in MEASURES {
        match def.measures().iter().find(|c| c.name == *name) {
            Some(c) if c.kind == *kind && c.merge == Some(*merge) => {}
            Some(c) => {
                return Err(format!(
                    "measure `{name}` is {:?} merged by {:?}; the API needs {kind:?} merged by {merge:?}",
                    c.kind, c.merge
                ))
            }
            None => {
                return Err(format!(
                    "it lacks the measure `{name}`; an API rollup selects count(*) AS events, sum(value) AS value_sum, \
                     count(value) AS value_count, min(value) AS value_min, max(value) AS value_max"
                ))
            }
        }
    }
    Ok(())
}

impl Tiers {
    /// Resolve `api.rollups` against the SQL catalog.
    /// The tiers of `names` (`api.rollups`), each at the version `live`
    /// names (see [`SqlCatalog::live`]).
    pub(crate) fn from_catalog(
        names: &[String],
        catalog: &SqlCatalog,
        retention: &RetentionConfig,
        live: &std::collections::BTreeMap<String, u32>,
    ) -> Result<Tiers, ServeError> {
        let config = |message: String| ServeError::Config {
            key: "api.rollups".into(),
            message,
        };
        let mut tiers = Vec::new();
        for name in names {
            let def = catalog
                .live(name, live)
                .or_else(|| catalog.get(name))
                .ok_or_else(|| {
                    let have: Vec<&str> = catalog.rollups.iter().map(|r| r.name.as_str()).collect();
                    config(format!(
                        "no rollup named `{name}`; the SQL directory defines: {}",
                        have.join(", ")
                    ))
                })?;
            check_def(def).map_err(|m| {
                config(format!(
                    "{} cannot answer API queries: {m}",
                    def.file.display()
                ))
            })?;
            tiers.push(Tier {
                rollup: def.name.clone(),
                window: def.window_name().to_string(),
                width_ms: def.window_ms,
                keep: retention.rollup(&def.name),
            });
        }
        tiers.sort_by_key(|t| std::cmp::Reverse(t.width_ms));
        for pair in tiers.windows(2) {
            if pair[0].width_ms == pair[1].width_ms {
                return Err(config(format!(
                    "`{}` and `{}` have the same window width",
                    pair[0].rollup, pair[1].rollup
                )));
            }
            if pair[0].width_ms % pair[1].width_ms != 0 {
                return Err(config(format!(
                    "the window of `{}` ({}) is not a multiple of the window of `{}` ({}); each width must divide the next coarser one",
                    pair[0].rollup,
                    width_name(pair[0].width_ms),
                    pair[1].rollup,
                    width_name(pair[1].width_ms)
                )));
            }
        }
        if tiers.is_empty() {
            return Err(config("name at least one rollup".into()));
        }
        Ok(Tiers { tiers })
    }

    pub(crate) fn finest_ms(&self) -> i64 {
        self.tiers.last().map_or(1, |t| t.width_ms)
    }

    /// `1d, 1h, 1m`.
    pub(crate) fn granularities(&self) -> String {
        self.tiers
            .iter()
            .map(|t| width_name(t.width_ms))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Split `[start, end)` into whole windows of the coarsest possible tiers.
    /// Errors name the misaligned bound.
    pub(crate) fn plan(
        &self,
        start: i64,
        end: i64,
    ) -> Result<Vec<Segment>, (&'static str, String)> {
        let finest = self.finest_ms();
        for (name, t) in [("start", start), ("end", end)] {
            if t.rem_euclid(finest) != 0 {
                return Err((
                    name,
                    format!(
                        "`{name}` is not on a window boundary; rollups exist for {} windows, so `{name}` must be a whole {}",
                        self.granularities(),
                        width_name(finest)
                    ),
                ));
            }
        }
        let mut out = Vec::new();
        self.split(0, start, end, &mut out);
        out.sort_by_key(|s| s.lo);
        Ok(out)
    }

    fn split(&self, i: usize, lo: i64, hi: i64, out: &mut Vec<Segment>) {
        if lo >= hi {
            return;
        }
        let Some(tier) = self.tiers.get(i) else {
            return;
        };
        let w = tier.width_ms;
        if i + 1 == self.tiers.len() {
            out.push(Segment { tier: i, lo, hi });
            return;
        }
        let a = lo + (w - lo.rem_euclid(w)) % w; // ceil to w
        let b = hi - hi.rem_euclid(w); // floor to w
        if a < b {
            out.push(Segment {
                tier: i,
                lo: a,
                hi: b,
            });
            self.split(i + 1, lo, a, out);
            self.split(i + 1, b, hi, out);
        } else {
            self.split(i + 1, lo, hi, out);
        }
    }

    /// Refuse `plan` (of `[start, end)`) when a piece starts before its
    /// tier's retention horizon at `now_ms` (its rows may be pruned): the
    /// answer would silently undercount. The planner answers each edge from
    /// the coarsest tier it aligns with, so a start on a whole hour never
    /// needs minute rows; the error names the oldest start from `start` on
    /// that can be answered.
    pub(crate) fn check_retained(
        &self,
        plan: &[Segment],
        start: i64,
        end: i64,
        now_ms: i64,
    ) -> Result<(), NotRetained> {
        let Some(bad) = self.first_pruned(plan, now_ms) else {
            return Ok(());
        };
        // Candidates: for each tier, the first start on its window at or
        // after `start` and after the horizons of it and every coarser tier.
        let mut floor = start;
        let mut candidates: Vec<i64> = Vec::new();
        for t in &self.tiers {
            if let Some(h) = t.keep.horizon(now_ms, t.width_ms) {
                floor = floor.max(h);
            }
            let w = t.width_ms;
            candidates.push(floor + (w - floor.rem_euclid(w)) % w);
        }
        candidates.sort_unstable();
        let oldest = candidates
            .into_iter()
            .filter(|c| *c < end)
            .find(|c| {
                self.plan(*c, end)
                    .is_ok_and(|p| self.first_pruned(&p, now_ms).is_none())
            })
            .unwrap_or(end);
        let t = &self.tiers[bad.tier];
        Err(NotRetained {
            message: format!(
                "`start`: the range needs {} rows from {}, which retention.rollups.{} = \"{}\" no longer keeps; {}",
                width_name(t.width_ms),
                fmt(bad.lo),
                t.rollup,
                t.keep,
                if oldest < end {
                    format!("the oldest start that can be answered is {}", fmt(oldest))
                } else {
                    "no start before `end` can be answered".to_string()
                }
            ),
            oldest_start: oldest,
        })
    }

    /// A series reads buckets of `granularity_ms` from tier `tier` alone:
    /// its retention decides.
    pub(crate) fn check_series_retained(
        &self,
        tier: usize,
        start: i64,
        granularity_ms: i64,
        now_ms: i64,
    ) -> Result<(), NotRetained> {
        let Some(t) = self.tiers.get(tier) else {
            return Ok(());
        };
        let Some(h) = t.keep.horizon(now_ms, t.width_ms).filter(|h| start < *h) else {
            return Ok(());
        };
        let g = granularity_ms.max(1);
        let oldest = h + (g - h.rem_euclid(g)) % g;
        Err(NotRetained {
            message: format!(
                "`start`: this granularity reads {} rows, which retention.rollups.{} = \"{}\" keeps from {}; start at or after {} or choose a coarser granularity",
                width_name(t.width_ms),
                t.rollup,
                t.keep,
                fmt(h),
                fmt(oldest)
            ),
            oldest_start: oldest,
        })
    }

    fn first_pruned(&self, plan: &[Segment], now_ms: i64) -> Option<Segment> {
        plan.iter().copied().find(|s| {
            self.tiers
                .get(s.tier)
                .and_then(|t| t.keep.horizon(now_ms, t.width_ms))
                .is_some_and(|h| s.lo < h)
        })
    }

    /// The coarsest tier whose width divides `granularity_ms` (series buckets).
    pub(crate) fn series_tier(&self, granularity_ms: i64) -> Option<usize> {
        self.tiers
            .iter()
            .position(|t| granularity_ms % t.width_ms == 0)
    }
}

fn fmt(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: i64 = 60_000;
    const H: i64 = 60 * M;
    const D: i64 = 24 * H;

    fn tiers() -> Tiers {
        let t = |n: &str, w| Tier {
            rollup: n.into(),
            window: "window_start".into(),
            width_ms: w,
            keep: Keep::Forever,
        };
        Tiers {
            tiers: vec![t("day", D), t("hour", H), t("minute", M)],
        }
    }

    #[test]
    fn coarse_middle_fine_edges() {
        let s = 10 * D + 10 * H + 30 * M;
        let e = 12 * D + 2 * H;
        let plan = tiers().plan(s, e).unwrap();
        assert_eq!(
            plan,
            vec![
                Segment {
                    tier: 2,
                    lo: s,
                    hi: 10 * D + 11 * H
                },
                Segment {
                    tier: 1,
                    lo: 10 * D + 11 * H,
                    hi: 11 * D
                },
                Segment {
                    tier: 0,
                    lo: 11 * D,
                    hi: 12 * D
                },
                Segment {
                    tier: 1,
                    lo: 12 * D,
                    hi: e
                },
            ]
        );
    }

    #[test]
    fn unaligned_bounds_are_refused_by_name() {
        let err = tiers().plan(30_000, H).unwrap_err();
        assert_eq!(err.0, "start");
        assert!(err.1.contains("1d, 1h, 1m"), "{}", err.1);
        assert_eq!(tiers().plan(0, H + 1).unwrap_err().0, "end");
    }

    /// Minute rows kept 2 days, hour rows 30 days, day rows for ever.
    #[test]
    fn ranges_that_need_pruned_rows_are_refused_or_answered_coarser() {
        let mut t = tiers();
        t.tiers[2].keep = Keep::For(std::time::Duration::from_secs(2 * 86_400));
        t.tiers[1].keep = Keep::For(std::time::Duration::from_secs(30 * 86_400));
        let now = 100 * D + 5 * H + 7 * M + 3;
        let ok = |s, e| t.check_retained(&t.plan(s, e).unwrap(), s, e, now);
        // Minute edges within two days: fine.
        assert_eq!(ok(98 * D + 6 * H + 3 * M, 100 * D + 5 * H), Ok(()));
        // A start 10 days back on a minute needs pruned minute rows; the
        // next whole hour is answered from hour rows.
        let err = ok(90 * D + 3 * M, 99 * D).unwrap_err();
        assert!(err.message.contains("1m rows"), "{}", err.message);
        assert_eq!(err.oldest_start, 90 * D + H);
        assert_eq!(ok(err.oldest_start, 99 * D), Ok(()));
        // On a whole hour 10 days back: hour rows answer its edge.
        assert_eq!(ok(90 * D + 3 * H, 99 * D + 4 * M), Ok(()));
        // On a whole day 60 days back: day rows; an hour edge there is gone,
        // and the next answerable start is the next whole day.
        assert_eq!(ok(40 * D, 99 * D), Ok(()));
        let err = ok(40 * D + H, 99 * D).unwrap_err();
        assert!(err.message.contains("1h rows"), "{}", err.message);
        assert_eq!(err.oldest_start, 41 * D);
        // The end edge is recent: minute rows there are kept.
        assert_eq!(ok(40 * D, 100 * D + 5 * H + 7 * M), Ok(()));
    }

    #[test]
    fn series_tier_picks_the_coarsest_divisor() {
        assert_eq!(tiers().series_tier(D), Some(0));
        assert_eq!(tiers().series_tier(H), Some(1));
        assert_eq!(tiers().series_tier(M), Some(2));
        assert_eq!(tiers().series_tier(1_000), None);
    }

    proptest! {
        /// The pieces tile [start, end) exactly, each piece is whole windows of
        /// its tier, and a 400-day range needs only a few hundred rows.
        #[test]
        fn plan_tiles_the_range(a in 0i64..(800 * 24 * 60), len in 1i64..(400 * 24 * 60)) {
            let (s, e) = (a * M, (a + len) * M);
            let t = tiers();
            let plan = t.plan(s, e).unwrap();
            let mut at = s;
            let mut rows = 0;
            for seg in &plan {
                prop_assert_eq!(seg.lo, at);
                prop_assert!(seg.lo < seg.hi);
                let w = t.tiers[seg.tier].width_ms;
                prop_assert_eq!(seg.lo % w, 0);
                prop_assert_eq!(seg.hi % w, 0);
                rows += (seg.hi - seg.lo) / w;
                at = seg.hi;
            }
            prop_assert_eq!(at, e);
            prop_assert!(plan.len() <= 5);
            prop_assert!(rows <= 400 + 2 * 23 + 2 * 59, "rows {}", rows);
        }
    }
}
