//! Dead letters in the log as a rate-limited summary: one WARN line per
//! interval with the count per reason and one example (partition, offset,
//! reason, detail), instead of a line per rejected message. The first
//! rejection after a quiet interval is logged at once; the rest of an
//! interval is logged by the next rejection after it, or by [`flush`]
//! (called as batches are sealed, and at shutdown). Every dead letter is in
//! the dead-letter dataset and in `tally_events_rejected_total` whatever
//! the log says.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the summary is written at most.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Example {
    partition: i32,
    offset: i64,
    reason: &'static str,
    detail: String,
}

#[derive(Debug, Default)]
struct Pending {
    counts: BTreeMap<&'static str, u64>,
    example: Option<Example>,
    last: Option<Instant>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// A rejected message (see the module docs).
pub(crate) fn rejected(partition: i32, offset: i64, reason: &'static str, detail: &str) {
    record(partition, offset, reason, detail, Instant::now());
}

fn record(partition: i32, offset: i64, reason: &'static str, detail: &str, now: Instant) {
    if let Ok(mut guard) = PENDING.lock() {
        add(
            guard.get_or_insert_with(Pending::default),
            partition,
            offset,
            reason,
            detail,
            now,
        );
    }
}

/// Count one rejection; log the summary when an interval has passed since
/// the last (whether it was logged now).
fn add(
    p: &mut Pending,
    partition: i32,
    offset: i64,
    reason: &'static str,
    detail: &str,
    now: Instant,
) -> bool {
    *p.counts.entry(reason).or_default() += 1;
    if p.example.is_none() {
        p.example = Some(Example {
            partition,
            offset,
            reason,
            detail: detail.chars().take(300).collect(),
        });
    }
    let due = p.last.is_none_or(|t| now.duration_since(t) >= INTERVAL);
    if due {
        emit(p, now);
    }
    due
}

/// Log what is pending if an interval has passed since the last summary.
pub(crate) fn flush() {
    flush_at(Instant::now(), false);
}

/// Log what is pending now (shutdown).
pub(crate) fn flush_all() {
    flush_at(Instant::now(), true);
}

fn flush_at(now: Instant, force: bool) {
    let Ok(mut guard) = PENDING.lock() else {
        return;
    };
    if let Some(p) = guard.as_mut() {
        if !p.counts.is_empty()
            && (force || p.last.is_none_or(|t| now.duration_since(t) >= INTERVAL))
        {
            emit(p, now);
        }
    }
}

/// The summary line's fields: `reason=count` pairs and the example.
fn summary(p: &Pending) -> (String, u64) {
    let total = p.counts.values().sum();
    let counts = p
        .counts
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    (counts, total)
}

fn emit(p: &mut Pending, now: Instant) {
    let (counts, total) = summary(p);
    if let Some(e) = p.example.take() {
        tracing::warn!(
            rejected = total,
            by_reason = %counts,
            example_partition = e.partition,
            example_offset = e.offset,
            example_reason = e.reason,
            example_detail = %e.detail,
            "events rejected to the dead-letter dataset (at most one such line per {}s; `tally dlq` shows them all)",
            INTERVAL.as_secs()
        );
    }
    p.counts.clear();
    p.last = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_summed_per_interval_with_one_example() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        assert!(
            add(&mut p, 0, 1, "invalid_json", "d", t0),
            "the first is logged at once"
        );
        for o in 2..50 {
            assert!(!add(
                &mut p,
                0,
                o,
                "invalid_json",
                "d",
                t0 + Duration::from_secs(1)
            ));
        }
        assert!(!add(
            &mut p,
            0,
            50,
            "too_old",
            "d",
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(summary(&p), ("invalid_json=48 too_old=1".to_string(), 49));
        assert_eq!(p.example.as_ref().map(|e| e.offset), Some(2));
        assert!(add(&mut p, 0, 51, "too_old", "d", t0 + INTERVAL));
        assert!(p.counts.is_empty() && p.example.is_none());
    }
}
