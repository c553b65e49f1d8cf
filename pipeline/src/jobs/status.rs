//! `tally status [--json]`: is the pipeline healthy? Per partition the
//! committed offset, the broker's high watermark and the lag; `as_of`; the
//! last commit and its age; the last verify and its drift; the archive's
//! and the dead letters' files. It only reads (the store through its read
//! connections, the broker's watermarks), so it can be a probe: its exit
//! code is 1 when a problem is found.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::aggregate::ColumnKind;
use crate::config::Settings;
use crate::sink::serving::{Arg, Cell, ReadPool};

/// One partition's positions.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The next offset the serving store has counted up to.
    pub committed: Option<i64>,
    /// The archive's committed position.
    pub archived: Option<i64>,
    pub high: Option<i64>,
}

impl PartitionStatus {
    pub fn lag(&self) -> Option<i64> {
        Some((self.high? - self.committed.unwrap_or(0)).max(0))
    }
}

/// Committed files of one kind (`raw`, `dlq`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FileTotals {
    pub files: i64,
    pub rows: i64,
    pub bytes: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub topic: String,
    pub now_ms: i64,
    pub partitions: Vec<PartitionStatus>,
    pub as_of: Option<i64>,
    pub last_commit_ms: Option<i64>,
    /// (at, from, to, drift rows)
    pub last_verify: Option<(i64, i64, i64, i64)>,
    pub files: BTreeMap<String, FileTotals>,
    /// Why the pipeline is not healthy; empty when it is.
    pub problems: Vec<String>,
}

fn int(c: Option<&Cell>) -> Option<i64> {
    match c {
        Some(Cell::Int(v)) => Some(*v),
        _ => None,
    }
}

/// Gather the status; `max_commit_age`: how long messages may wait with no
/// commit before that is a problem.
pub async fn status(settings: &Settings, max_commit_age: Duration) -> Result<Status, crate::Error> {
    let topic = settings.kafka.topic.clone();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let pool = ReadPool::open(&settings.serving_url(), 1)?;
    let t = || vec![Arg::Text(topic.clone())];
    let rows = |text: &'static str, kinds: Vec<ColumnKind>, args: Vec<Arg>| {
        let pool = &pool;
        async move { pool.cells(text, args, kinds, false).await }
    };
    use ColumnKind::{Int, Text};
    let committed = rows(
        "SELECT partition, next_offset, updated_at_ms FROM tally_offsets WHERE topic = ?1",
        vec![Int, Int, Int],
        t(),
    )
    .await?;
    let archived = rows(
        "SELECT partition, next_offset FROM tally_archive_offsets WHERE topic = ?1",
        vec![Int, Int],
        t(),
    )
    .await?;
    let files = rows(
        "SELECT kind, count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0) FROM tally_files WHERE topic = ?1 GROUP BY kind",
        vec![Text, Int, Int, Int],
        t(),
    )
    .await?;
    let counters = rows(
        "SELECT name, value FROM tally_counters WHERE name LIKE 'verify_last_%'",
        vec![Text, Int],
        vec![],
    )
    .await?;
    let as_of = pool.as_of(&topic).await?;

    let mut parts: BTreeMap<i32, PartitionStatus> = BTreeMap::new();
    let mut last_commit_ms: Option<i64> = None;
    for r in &committed {
        if let (Some(p), Some(next)) = (int(r.first()), int(r.get(1))) {
            let s = parts.entry(p as i32).or_insert_with(|| blank(p as i32));
            s.committed = Some(next);
            last_commit_ms = last_commit_ms.max(int(r.get(2)));
        }
    }
    for r in &archived {
        if let (Some(p), Some(next)) = (int(r.first()), int(r.get(1))) {
            parts
                .entry(p as i32)
                .or_insert_with(|| blank(p as i32))
                .archived = Some(next);
        }
    }
    let mut problems = Vec::new();
    let s = settings.clone();
    let tp = topic.clone();
    match tokio::task::spawn_blocking(move || super::offsets::watermarks(&s, &tp, None))
        .await
        .map_err(crate::error::internal)?
    {
        Ok(marks) => {
            for (p, (_, high)) in marks {
                parts.entry(p).or_insert_with(|| blank(p)).high = Some(high);
            }
        }
        Err(e) => problems.push(format!(
            "the broker cannot be reached for the topic's watermarks: {e}"
        )),
    }
    for p in parts.values() {
        if let (Some(c), Some(h)) = (p.committed, p.high) {
            if c > h {
                problems.push(format!(
                    "partition {}: the committed offset {c} is beyond the end of the log ({h}); see `tally offsets show`",
                    p.partition
                ));
            }
        }
    }
    let waiting: i64 = parts.values().filter_map(PartitionStatus::lag).sum();
    let max_age = i64::try_from(max_commit_age.as_millis()).unwrap_or(i64::MAX);
    if waiting > 0 {
        match last_commit_ms {
            Some(t) if now_ms - t > max_age => problems.push(format!(
                "{waiting} messages wait and the last commit was {}s ago (more than --max-commit-age {}s)",
                (now_ms - t) / 1000,
                max_age / 1000
            )),
            None => problems.push(format!(
                "{waiting} messages wait and nothing has been committed yet"
            )),
            _ => {}
        }
    }
    let counter: BTreeMap<String, i64> = counters
        .iter()
        .filter_map(|r| match (r.first(), int(r.get(1))) {
            (Some(Cell::Text(n)), Some(v)) => Some((n.clone(), v)),
            _ => None,
        })
        .collect();
    let last_verify = match (
        counter.get("verify_last_at_ms"),
        counter.get("verify_last_from_ms"),
        counter.get("verify_last_to_ms"),
        counter.get("verify_last_drift_rows"),
    ) {
        (Some(a), Some(f), Some(t), Some(d)) => Some((*a, *f, *t, *d)),
        _ => None,
    };
    if let Some((_, f, t, d)) = last_verify {
        if d > 0 {
            problems.push(format!(
                "the last verify ({} to {}) found {d} rows that differ from the archive; run `tally backfill` over that range",
                fmt(f),
                fmt(t)
            ));
        }
    }
    let files = files
        .iter()
        .filter_map(|r| match r.first() {
            Some(Cell::Text(kind)) => Some((
                kind.clone(),
                FileTotals {
                    files: int(r.get(1)).unwrap_or(0),
                    rows: int(r.get(2)).unwrap_or(0),
                    bytes: int(r.get(3)).unwrap_or(0),
                },
            )),
            _ => None,
        })
        .collect();
    Ok(Status {
        topic,
        now_ms,
        partitions: parts.into_values().collect(),
        as_of,
        last_commit_ms,
        last_verify,
        files,
        problems,
    })
}

fn blank(p: i32) -> PartitionStatus {
    PartitionStatus {
        partition: p,
        committed: None,
        archived: None,
        high: None,
    }
}

fn fmt(ms: i64) -> String {
    crate::serve::http::fmt_time(ms)
}

impl Status {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn to_json(&self) -> Value {
        let age = |t: Option<i64>| t.map(|t| (self.now_ms - t).max(0) as f64 / 1000.0);
        json!({
            "topic": self.topic,
            "healthy": self.healthy(),
            "problems": self.problems,
            "partitions": self.partitions.iter().map(|p| json!({
                "partition": p.partition,
                "committed_offset": p.committed,
                "archived_offset": p.archived,
                "high_watermark": p.high,
                "lag": p.lag(),
            })).collect::<Vec<_>>(),
            "as_of": self.as_of.map(fmt),
            "freshness_seconds": age(self.as_of),
            "last_commit": self.last_commit_ms.map(fmt),
            "last_commit_age_seconds": age(self.last_commit_ms),
            "last_verify": self.last_verify.map(|(at, from, to, drift)| json!({
                "at": fmt(at), "from": fmt(from), "to": fmt(to), "drift_rows": drift,
            })),
            "files": self.files.iter().map(|(k, f)| (k.clone(), json!({
                "files": f.files, "rows": f.rows, "bytes": f.bytes,
            }))).collect::<serde_json::Map<_, _>>(),
        })
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "topic {}: {}",
            self.topic,
            if self.healthy() {
                "healthy"
            } else {
                "NOT HEALTHY"
            }
        );
        let _ = writeln!(
            o,
            "{:>9} {:>16} {:>16} {:>16} {:>12}",
            "partition", "committed", "archived", "high watermark", "lag"
        );
        let show = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        for p in &self.partitions {
            let _ = writeln!(
                o,
                "{:>9} {:>16} {:>16} {:>16} {:>12}",
                p.partition,
                show(p.committed),
                show(p.archived),
                show(p.high),
                show(p.lag())
            );
        }
        let ago = |t: i64| format!("{} ({}s ago)", fmt(t), (self.now_ms - t).max(0) / 1000);
        let _ = writeln!(
            o,
            "as_of        {}",
            self.as_of
                .map_or_else(|| "none (nothing committed)".into(), ago)
        );
        let _ = writeln!(
            o,
            "last commit  {}",
            self.last_commit_ms.map_or_else(|| "never".into(), ago)
        );
        let _ = writeln!(
            o,
            "last verify  {}",
            self.last_verify.map_or_else(
                || "never recorded".into(),
                |(at, from, to, d)| format!(
                    "{}: {} to {}, {d} rows differ",
                    ago(at),
                    fmt(from),
                    fmt(to)
                )
            )
        );
        for (kind, f) in &self.files {
            let _ = writeln!(
                o,
                "{:<12} {} files, {} rows, {} bytes",
                format!("{kind} files"),
                f.files,
                f.rows,
                f.bytes
            );
        }
        for p in &self.problems {
            let _ = writeln!(o, "problem: {p}");
        }
        o
    }
}
