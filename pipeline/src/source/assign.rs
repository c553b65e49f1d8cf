//! Where each assigned partition starts: the serving store's offset,
//! checked against the broker's watermarks (beyond the end stops the
//! consumer, below the start is a counted gap), or, with nothing stored,
//! `auto.offset.reset` resolved to an offset and recorded; and
//! `kafka.assignment = "manual"` (every partition, no group).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::kafka::{block_on, TallyContext};
use super::SourceError;

/// The start offset `auto.offset.reset` names, in librdkafka's spellings.
pub(super) fn reset_offset(value: Option<&str>) -> Option<Offset> {
    match value.unwrap_or("largest") {
        "smallest" | "earliest" | "beginning" => Some(Offset::Beginning),
        "largest" | "latest" | "end" => Some(Offset::End),
        _ => None,
    }
}

impl TallyContext {
    /// Stored offsets for `partitions`, after removing orphan files. Each
    /// is checked against the partition's watermarks; one with no stored
    /// offset gets its start recorded (see [`super::OffsetStore::register_start`]).
    pub(super) fn stored_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        partitions: &[i32],
    ) -> BTreeMap<i32, Option<i64>> {
        let mut stored = self.load_stored(partitions);
        let marks: BTreeMap<i32, (i64, i64)> = partitions
            .iter()
            .filter_map(|p| match consumer.fetch_watermarks(&self.topic, *p, Duration::from_secs(10)) {
                Ok(m) => Some((*p, m)),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot read the partition's watermarks to check its stored offset");
                    None
                }
            })
            .collect();
        self.check_beyond_end(&stored, &marks);
        let now = chrono::Utc::now().timestamp_millis();
        for (p, next) in stored.iter_mut() {
            let (None, Some((low, high))) = (*next, marks.get(p)) else {
                continue;
            };
            let start = match self.no_offset_start {
                Some(Offset::End) => *high,
                Some(Offset::Beginning) => *low,
                _ => continue,
            };
            match block_on(
                &self.handle,
                self.store.register_start(&self.topic, *p, start, now),
            ) {
                Ok(n) => {
                    tracing::info!(partition = p, start = n, "no stored offset: starting where auto.offset.reset says, recorded in the serving store");
                    *next = Some(n);
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot record the partition's start; starting from auto.offset.reset")
                }
            }
        }
        self.start_at_archive(stored)
    }

    /// The archive commits its files later than the serving store commits
    /// their counts: a partition starts at the lower of the two positions,
    /// and what lies below the serving offset is read for the archive only.
    fn start_at_archive(&self, stored: BTreeMap<i32, Option<i64>>) -> BTreeMap<i32, Option<i64>> {
        let archive = loop {
            match block_on(&self.handle, self.store.archive_committed(&self.topic)) {
                Ok(a) => break a,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the archive's positions; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        let mut positions = BTreeMap::new();
        let start: BTreeMap<i32, Option<i64>> = stored
            .into_iter()
            .map(|(p, serving)| {
                let a = archive.get(&p).copied();
                let pos = crate::batch::Positions {
                    archive: a.or(serving),
                    serve_from: serving.filter(|s| a.is_some_and(|a| a < *s)),
                };
                positions.insert(p, pos);
                (
                    p,
                    match (a, serving) {
                        (Some(a), Some(s)) => Some(a.min(s)),
                        (a, s) => s.or(a),
                    },
                )
            })
            .collect();
        if let Ok(mut m) = self.control.positions.lock() {
            m.extend(positions);
        }
        start
    }

    fn load_stored(&self, partitions: &[i32]) -> BTreeMap<i32, Option<i64>> {
        if !self.control.wait_idle(Duration::from_secs(60)) {
            tracing::warn!(
                "committer still busy after 60s; continuing (the offset fence keeps counts exact)"
            );
        }
        let mut attempt = 0u32;
        let stored = loop {
            match block_on(&self.handle, self.store.committed(&self.topic)) {
                Ok(s) => break s,
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "cannot read stored offsets; retrying");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt.min(25))));
                }
            }
        };
        let wanted: HashMap<i32, Option<i64>> = partitions
            .iter()
            .map(|p| (*p, stored.get(p).map(|(next, _)| *next)))
            .collect();
        // Only hidden files here: a complete file beyond the stored offset may
        // belong to a zombie that can still commit before we do; such files are
        // removed after our first commit on the partition (pipeline/sweeper.rs).
        match block_on(
            &self.handle,
            self.archive.remove_unfinished(&self.topic, &wanted),
        ) {
            Ok(removed) if removed > 0 => {
                tracing::warn!(
                    count = removed,
                    "removed orphan archive files left by a crash"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "orphan cleanup failed; will retry on next assignment")
            }
        }
        if let Ok(mut pending) = self.control.cleanup_pending.lock() {
            pending.extend(partitions.iter().copied());
        }
        wanted.into_iter().collect()
    }
}

impl TallyContext {
    /// A stored next offset above the partition's high watermark means the
    /// log was replaced under us (topic deleted and created again, offsets
    /// reset): every new message would look already committed. Record the
    /// first such partition as fatal; the poll loop stops on it. A
    /// watermark that cannot be read is logged and not held against the
    /// partition (the broker may be slow; the gap check still applies).
    /// A stored offset below the low watermark (retention deleted messages
    /// before tally read them) is logged and counted as a gap.
    fn check_beyond_end(
        &self,
        stored: &BTreeMap<i32, Option<i64>>,
        marks: &BTreeMap<i32, (i64, i64)>,
    ) {
        for (p, next) in stored {
            let Some(next) = *next else { continue };
            match marks.get(p).copied() {
                Some((low, high)) if next > high => {
                    let e = SourceError::OffsetBeyondEnd {
                        topic: self.topic.clone(),
                        partition: *p,
                        stored: next,
                        high,
                        low,
                    };
                    tracing::error!("{e}");
                    if let Ok(mut fatal) = self.control.fatal.lock() {
                        fatal.get_or_insert(e);
                    }
                }
                Some((low, _)) if next < low => {
                    tracing::warn!(
                        partition = p,
                        stored = next,
                        low,
                        skipped = low - next,
                        "the stored offset is below the start of the log: messages {next}..{low} were deleted by retention before tally read them"
                    );
                    self.metrics.offset_gaps.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .messages_skipped
                        .fetch_add((low - next) as u64, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
}

/// `kafka.assignment = "manual"`: read every partition of `topic` without a
/// consumer group, from the stored offsets, as an assignment would (see
/// `TallyContext::rebalance`). One such process per topic and store: a
/// second would fight the first over every batch (the fence keeps counts
/// exact, but neither gets far), so it is refused.
pub(super) fn assign_all(
    consumer: &BaseConsumer<TallyContext>,
    topic: &str,
) -> Result<super::offsets::LockGuard, SourceError> {
    let ctx = consumer.context();
    let lock = block_on(&ctx.handle, ctx.store.lock(&format!("assign:{topic}")))
        .map_err(|e| SourceError::Create(format!("kafka.assignment = \"manual\": {e}")))?
        .ok_or_else(|| {
            SourceError::Create(format!(
                "kafka.assignment = \"manual\": another `tally run` already reads every partition of `{topic}` with this serving store; run one, or use kafka.assignment = \"group\""
            ))
        })?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|e| SourceError::Subscribe {
            topic: topic.to_string(),
            message: e.to_string(),
        })?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(SourceError::Subscribe {
            topic: topic.to_string(),
            message: "the topic has no partitions (does it exist?)".into(),
        });
    }
    ctx.control.bump_epoch();
    let stored = ctx.stored_offsets(consumer, &parts);
    let mut tpl = TopicPartitionList::new();
    for (p, next) in &stored {
        let start = next
            .map(Offset::Offset)
            .or(ctx.no_offset_start)
            .unwrap_or(Offset::Beginning);
        tpl.add_partition_offset(topic, *p, start)
            .map_err(|e| SourceError::Create(e.to_string()))?;
        if let Some(n) = next {
            ctx.metrics.set_committed_offset(*p, *n);
        }
    }
    tracing::info!(partitions = ?stored, "kafka.assignment = manual: reading every partition from the stored offsets");
    if let Ok(mut map) = ctx.control.partitions.lock() {
        map.extend(stored);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| SourceError::Create(format!("assign: {e}")))?;
    Ok(lock)
}
