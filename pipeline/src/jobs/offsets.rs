//! `tally offsets show` and `tally offsets reset`: the serving store's
//! committed positions beside the broker's watermarks, and the operator's
//! way to move them (after a topic was deleted and created again, or to
//! skip or re-read a range on purpose).

use std::collections::BTreeMap;

use crate::config::Settings;
use crate::sink::ServingStore;

/// Where `tally offsets reset` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The partition's low watermark (the oldest message the broker holds).
    Earliest,
    /// The high watermark: only messages produced from now on are read.
    Latest,
    Offset(i64),
}

impl ResetTo {
    pub fn parse(s: &str) -> Result<ResetTo, String> {
        match s {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            n => n
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(ResetTo::Offset)
                .ok_or_else(|| {
                    format!(
                        "`{s}`: write earliest, latest or an offset (a whole number, 0 or more)"
                    )
                }),
        }
    }
}

/// One partition as `tally offsets show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub partition: i32,
    pub stored: Option<i64>,
    /// The archive's position: events below it are in committed raw files
    /// (it trails `stored` by up to `storage.archive_roll_interval`).
    pub archived: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl PartitionPosition {
    /// Messages waiting: from the stored offset (or the start of the log) to the end.
    pub fn lag(&self) -> i64 {
        (self.high - self.stored.unwrap_or(self.low).max(self.low)).max(0)
    }
    /// What is wrong with the stored offset, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        match self.stored {
            Some(s) if s > self.high => {
                Some("beyond the end of the log: run `tally offsets reset`")
            }
            Some(s) if s < self.low => {
                Some("below the start of the log: messages were deleted before tally read them")
            }
            _ => None,
        }
    }
}

/// Every partition of the topic with its stored offset and watermarks.
pub async fn show(
    settings: &Settings,
    store: &ServingStore,
) -> Result<Vec<PartitionPosition>, crate::Error> {
    let topic = settings.kafka.topic.clone();
    let stored = store.load_offsets(&topic).await?;
    let archived = store.archive_positions(&topic).await?;
    let settings = settings.clone();
    let marks = tokio::task::spawn_blocking(move || watermarks(&settings, &topic, None))
        .await
        .map_err(crate::error::internal)??;
    Ok(marks
        .into_iter()
        .map(|(partition, (low, high))| PartitionPosition {
            partition,
            stored: stored.get(&partition).copied(),
            archived: archived.get(&partition).copied(),
            low,
            high,
        })
        .collect())
}

/// `tally offsets show`'s table, and whether a stored offset is beyond the end.
pub fn render(topic: &str, rows: &[PartitionPosition]) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "topic {topic}");
    let _ = writeln!(
        out,
        "{:>9} {:>14} {:>14} {:>14} {:>14} {:>12}  note",
        "partition", "stored", "archived", "low", "high", "lag"
    );
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |s| s.to_string());
    let mut bad = false;
    for r in rows {
        let note = r.problem().unwrap_or("");
        bad |= r.stored.is_some_and(|s| s > r.high);
        let _ = writeln!(
            out,
            "{:>9} {:>14} {:>14} {:>14} {:>14} {:>12}  {note}",
            r.partition,
            dash(r.stored),
            dash(r.archived),
            r.low,
            r.high,
            r.lag()
        );
    }
    (out, bad)
}

/// Watermarks of `only` (or of every partition of `topic`).
pub fn watermarks(
    settings: &Settings,
    topic: &str,
    only: Option<i32>,
) -> Result<BTreeMap<i32, (i64, i64)>, crate::source::SourceError> {
    let client = crate::source::client::metadata_client(&settings.kafka.properties)?;
    crate::source::client::watermarks(&client, topic, only)
}

/// One partition moved by [`reset`]: (partition, old, new).
pub type Moved = (i32, Option<i64>, i64);

/// Move the stored next offset of `partition` (or of every partition of the
/// topic) to `to`.
pub async fn reset(
    settings: &Settings,
    store: &ServingStore,
    partition: Option<i32>,
    to: ResetTo,
) -> Result<Vec<Moved>, crate::Error> {
    let topic = settings.kafka.topic.clone();
    let s = settings.clone();
    let t = topic.clone();
    let marks = tokio::task::spawn_blocking(move || watermarks(&s, &t, partition))
        .await
        .map_err(crate::error::internal)??;
    let now = chrono::Utc::now().timestamp_millis();
    let mut moved = Vec::new();
    for (p, (low, high)) in marks {
        let next = match to {
            ResetTo::Earliest => low,
            ResetTo::Latest => high,
            ResetTo::Offset(n) => n,
        };
        let old = store.reset_offset(&topic, p, next, now).await?;
        tracing::warn!(topic = %topic, partition = p, old = ?old, new = next, "stored offset reset");
        moved.push((p, old, next));
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse_and_bad_ones_say_what_to_write() {
        assert_eq!(ResetTo::parse("earliest"), Ok(ResetTo::Earliest));
        assert_eq!(ResetTo::parse("latest"), Ok(ResetTo::Latest));
        assert_eq!(ResetTo::parse("42"), Ok(ResetTo::Offset(42)));
        assert!(ResetTo::parse("-1")
            .unwrap_err()
            .contains("earliest, latest or an offset"));
        assert!(ResetTo::parse("start").is_err());
    }

    #[test]
    fn lag_and_problems_follow_the_watermarks() {
        let at = |stored| PartitionPosition {
            partition: 0,
            stored,
            archived: None,
            low: 100,
            high: 500,
        };
        assert_eq!(at(Some(400)).lag(), 100);
        assert_eq!(at(None).lag(), 400);
        assert_eq!(at(Some(50)).lag(), 400);
        assert!(at(Some(50)).problem().unwrap().contains("below the start"));
        assert_eq!(at(Some(900)).lag(), 0);
        assert!(at(Some(900))
            .problem()
            .unwrap()
            .contains("tally offsets reset"));
        assert_eq!(at(Some(500)).problem(), None);
    }
}
