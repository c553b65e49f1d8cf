//! `[retention]`: how long rollup rows, dead letters and raw archive files
//! are kept. A value is a duration (`"14d"`, `"400d"`) or `"forever"`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// How long something is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    #[default]
    Forever,
    For(Duration),
}

impl Keep {
    /// The oldest time kept at `now_ms`, aligned down to `align_ms` (a
    /// window width, a day): everything starting before it may be pruned.
    /// `None`: kept for ever.
    pub fn horizon(self, now_ms: i64, align_ms: i64) -> Option<i64> {
        match self {
            Keep::Forever => None,
            Keep::For(d) => {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                let t = now_ms.saturating_sub(ms);
                Some(t - t.rem_euclid(align_ms.max(1)))
            }
        }
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Forever => f.write_str("forever"),
            Keep::For(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Keep, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "forever" {
            return Ok(Keep::Forever);
        }
        match humantime::parse_duration(s.trim()) {
            Ok(d) if !d.is_zero() => Ok(Keep::For(d)),
            Ok(_) => Err(serde::de::Error::custom(
                "a retention of zero would delete everything; write \"forever\" or a duration such as \"14d\"",
            )),
            Err(e) => Err(serde::de::Error::custom(format!(
                "{s:?}: {e}; write \"forever\" or a duration such as \"14d\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often `tally run` prunes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Per rollup (by name); a rollup not named is kept for ever.
    #[serde(default)]
    pub rollups: BTreeMap<String, Keep>,
    /// The dead-letter dataset, by rejection day.
    pub dead_letters: Keep,
    /// The raw archive, by event day.
    pub archive: Keep,
}

impl RetentionConfig {
    /// The retention of rollup `name`; every version (`name@N`) has its
    /// rollup's.
    pub fn rollup(&self, name: &str) -> Keep {
        let base = name.split_once('@').map_or(name, |(b, _)| b);
        self.rollups.get(base).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizons_align_down() {
        let day = 86_400_000;
        let now = 20 * day + 5 * 3_600_000 + 7;
        assert_eq!(Keep::Forever.horizon(now, 60_000), None);
        let keep = Keep::For(Duration::from_secs(14 * 86_400));
        assert_eq!(keep.horizon(now, day), Some(6 * day));
        assert_eq!(keep.horizon(now, 3_600_000), Some(6 * day + 5 * 3_600_000));
    }
}
