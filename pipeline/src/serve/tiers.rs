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
    pub(crate) fn from_catalog(
        names: &[String],
        catalog: &SqlCatalog,
    ) -> Result<Tiers, ServeError> {
        let config = |message: String| ServeError::Config {
            key: "api.rollups".into(),
            message,
        };
        let mut tiers = Vec::new();
        for name in names {
            let def = catalog.get(name).ok_or_else(|| {
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

    /// The coarsest tier whose width divides `granularity_ms` (series buckets).
    pub(crate) fn series_tier(&self, granularity_ms: i64) -> Option<usize> {
        self.tiers
            .iter()
            .position(|t| granularity_ms % t.width_ms == 0)
    }
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
