//! What a report covers and what it is compared with.
//!
//! A whole period (a calendar month, or `--from/--to`) is compared with the
//! period before it: the month before, or as many days just before. A
//! period still in progress (the data's `as_of` falls inside it) is
//! compared **to date**: with the same elapsed time from the start of the
//! period before (1–7 December 14:00 against 1–7 November 14:00), never
//! with all of it; its last day is marked partial.

use chrono::DateTime;

use super::Month;

const HOUR: i64 = 3_600_000;
pub(super) const DAY: i64 = 24 * HOUR;

/// What was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Month(Month),
    /// `[from, to)`, whole UTC days.
    Range {
        from: i64,
        to: i64,
    },
}

impl Span {
    /// Any range of whole UTC days (`--from 2026-11-03 --to 2026-11-17`).
    pub fn range(from: i64, to: i64) -> Result<Span, String> {
        if from.rem_euclid(DAY) != 0 || to.rem_euclid(DAY) != 0 {
            return Err(
                "--from and --to must be UTC day boundaries (YYYY-MM-DD or YYYY-MM-DDT00:00:00Z)"
                    .into(),
            );
        }
        if to <= from {
            return Err("--to must be after --from".into());
        }
        if to - from > 366 * DAY {
            return Err("a report covers at most 366 days; choose a shorter range".into());
        }
        Ok(Span::Range { from, to })
    }

    /// `[start, end)` and the start of the period compared with.
    fn bounds(self) -> (i64, i64, i64) {
        match self {
            Span::Month(m) => (m.start_ms(), m.end_ms(), m.prev().start_ms()),
            Span::Range { from, to } => (from, to, from - (to - from)),
        }
    }

    /// In file names and URLs: `2026-11`, or `2026-11-03_2026-11-16` (the
    /// last day included).
    pub fn slug(self) -> String {
        match self {
            Span::Month(m) => m.to_string(),
            Span::Range { from, to } => format!("{}_{}", ymd(from), ymd(to - DAY)),
        }
    }

    /// `November 2026`, or `3 November 2026 to 16 November 2026`.
    pub fn title(self) -> String {
        match self {
            Span::Month(m) => m.long_name(),
            Span::Range { from, to } => format!("{} to {}", long_day(from), long_day(to - DAY)),
        }
    }

    /// The command that makes this report.
    pub fn command(self) -> String {
        match self {
            Span::Month(m) => format!("tally report monthly --month {m}"),
            Span::Range { from, to } => {
                format!("tally report monthly --from {} --to {}", ymd(from), ymd(to))
            }
        }
    }
}

/// The period of a report, resolved against the data's `as_of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub span: Span,
    pub start: i64,
    pub end: i64,
    pub prev_start: i64,
    /// The end of the comparison: `start` for a whole period; to date, the
    /// same elapsed time (whole hours, the rollup's grain) after `prev_start`.
    pub prev_end: i64,
    /// The data is complete up to here, inside the period: it is in
    /// progress and compared to date.
    pub to_date: Option<i64>,
}

impl Period {
    pub fn new(span: Span, as_of: Option<i64>) -> Period {
        let (start, end, prev_start) = span.bounds();
        let to_date = as_of.filter(|t| *t < end);
        let prev_end = match to_date {
            None => start,
            Some(t) => {
                let elapsed = (t.max(start) - start + HOUR - 1).div_euclid(HOUR) * HOUR;
                (prev_start + elapsed).min(start)
            }
        };
        Period {
            span,
            start,
            end,
            prev_start,
            prev_end,
            to_date,
        }
    }

    /// The UTC days of the report's calendar, each with whether it is
    /// partial: those begun by `as_of` (a period in progress has no future
    /// days).
    pub fn days(&self) -> Vec<(i64, bool)> {
        let until = self
            .to_date
            .map_or(self.end, |t| t.clamp(self.start + 1, self.end));
        (self.start..until)
            .step_by(DAY as usize)
            .map(|d| (d, self.to_date.is_some_and(|t| t < d + DAY)))
            .collect()
    }

    /// The header line: what is covered, what it is compared with, how
    /// complete the data is.
    pub fn describe(&self, as_of: Option<i64>) -> String {
        let compared = match (self.to_date, self.span) {
            (None, Span::Month(m)) => format!("compared with {}", m.prev().long_name()),
            (None, Span::Range { from, to }) => format!(
                "compared with the {} days before ({} to {})",
                (to - from) / DAY,
                long_day(self.prev_start),
                long_day(self.prev_end - DAY)
            ),
            (Some(_), _) if self.prev_end <= self.prev_start => {
                "no time of the period has data yet, so nothing is compared".to_string()
            }
            (Some(_), _) => format!(
                "to date, compared with the same time of the period before: {} to {} (UTC)",
                fmt_time(self.prev_start),
                fmt_time(self.prev_end)
            ),
        };
        let complete = match as_of {
            Some(t) if t < self.end => {
                format!("data complete up to {} (partial period)", fmt_time(t))
            }
            Some(t) => format!("data complete up to {}", fmt_time(t)),
            None => "no committed data yet".to_string(),
        };
        format!(
            "{} to {} (UTC), {compared}; {complete}",
            long_day(self.start),
            long_day(self.end - DAY),
        )
    }
}

/// `YYYY-MM-DD` (UTC midnight) or an RFC 3339 time.
pub fn parse_day(s: &str) -> Result<i64, String> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return Ok(d
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            .timestamp_millis());
    }
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{s:?}: {e}; write a day such as 2026-11-03"))
}

fn ymd(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(String::new, |d| d.format("%Y-%m-%d").to_string())
}

fn long_day(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(String::new, |d| d.format("%-d %B %Y").to_string())
}

fn fmt_time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(String::new, |d| {
        d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .unwrap_or_default()
    }

    #[test]
    fn a_month_in_progress_is_compared_with_the_same_days_of_the_month_before() {
        let dec = Span::Month(Month {
            year: 2026,
            month: 12,
        });
        let p = Period::new(dec, Some(at("2026-12-07T14:23:00Z")));
        assert_eq!(p.start, at("2026-12-01T00:00:00Z"));
        assert_eq!(p.prev_start, at("2026-11-01T00:00:00Z"));
        // Whole hours: the hour of as_of is counted this month.
        assert_eq!(p.prev_end, at("2026-11-07T15:00:00Z"));
        assert_eq!(p.to_date, Some(at("2026-12-07T14:23:00Z")));
        let days = p.days();
        assert_eq!(days.len(), 7);
        assert!(days[..6].iter().all(|(_, partial)| !partial));
        assert_eq!(days[6], (at("2026-12-07T00:00:00Z"), true));
        let line = p.describe(p.to_date);
        assert!(line.contains("to date"), "{line}");
        assert!(line.contains("2026-11-07T15:00:00Z"), "{line}");
        assert!(line.contains("partial period"), "{line}");

        // A whole month: all of the month before, no partial day.
        let nov = Span::Month(Month {
            year: 2026,
            month: 11,
        });
        let p = Period::new(nov, Some(at("2026-12-07T14:23:00Z")));
        assert_eq!(
            (p.prev_start, p.prev_end),
            (at("2026-10-01T00:00:00Z"), at("2026-11-01T00:00:00Z"))
        );
        assert_eq!(p.days().len(), 30);
        assert!(p.days().iter().all(|(_, partial)| !partial));
        assert!(p.describe(Some(0)).contains("compared with October 2026"));

        // March to date is never compared beyond the end of February.
        let mar = Span::Month(Month {
            year: 2027,
            month: 3,
        });
        let p = Period::new(mar, Some(at("2027-03-30T10:00:00Z")));
        assert_eq!(p.prev_end, at("2027-03-01T00:00:00Z"));
        // Midnight exactly: the day before is whole, no day is partial.
        let p = Period::new(dec, Some(at("2026-12-08T00:00:00Z")));
        assert_eq!(p.prev_end, at("2026-11-08T00:00:00Z"));
        assert_eq!(p.days().len(), 7);
        assert!(p.days().iter().all(|(_, partial)| !partial));
    }

    #[test]
    fn a_range_is_whole_days_compared_with_as_many_days_before() {
        let (from, to) = (at("2026-11-03T00:00:00Z"), at("2026-11-17T00:00:00Z"));
        let span = Span::range(from, to).unwrap_or(Span::Range { from: 0, to: 0 });
        assert_eq!(span.slug(), "2026-11-03_2026-11-16");
        assert_eq!(span.title(), "3 November 2026 to 16 November 2026");
        let p = Period::new(span, Some(at("2026-12-01T00:00:00Z")));
        assert_eq!(
            (p.prev_start, p.prev_end),
            (at("2026-10-20T00:00:00Z"), from)
        );
        assert!(p.describe(None).contains("the 14 days before"));
        assert!(Span::range(from + 1, to).is_err());
        assert!(Span::range(to, from).is_err());
        assert!(Span::range(from, from + 400 * DAY).is_err());
        assert_eq!(parse_day("2026-11-03"), Ok(from));
        assert_eq!(parse_day("2026-11-03T00:00:00Z"), Ok(from));
        assert!(parse_day("03/11/2026").is_err());
    }
}
