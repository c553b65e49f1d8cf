//! The bare-consumer baseline of `make bench`: read the whole topic with
//! librdkafka and nothing else.

use std::time::Duration;

/// What [`drain`] read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DrainReport {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Read every message of `topic` (low to high watermark of each partition,
/// as of the start) with a bare librdkafka consumer: manual assignment, no
/// group, no commits, payloads touched but not decoded; read in batches as
/// `tally run` reads (`source/fetch.rs`). The broker-side limit
/// for `make bench`. Fails after `timeout`.
pub(crate) fn drain(
    properties: &[(String, String)],
    topic: &str,
    timeout: Duration,
) -> Result<DrainReport, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut cc = tally::source::client::config(
        properties.iter().map(|(k, v)| (k, v)),
        tally::source::client::Role::Consumer,
    );
    cc.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions (does it exist?)"));
    }
    let mut tpl = TopicPartitionList::new();
    let mut wanted = 0u64;
    for p in &partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        wanted += (hi - lo).max(0) as u64;
        tpl.add_partition_offset(topic, *p, Offset::Offset(lo))
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    // Read as `tally run` does: batches from a fetch queue of its own.
    let fetch = tally::source::fetch::FetchQueue::new(&consumer, topic)
        .ok_or("librdkafka returned no fetch queue")?;
    fetch.forward(partitions.iter().copied());
    let mut fetched = Vec::with_capacity(tally::source::fetch::MAX_BATCH);
    let start = std::time::Instant::now();
    let (mut messages, mut bytes) = (0u64, 0u64);
    while messages < wanted {
        if start.elapsed() > timeout {
            return Err(format!(
                "read {messages} of {wanted} messages in {timeout:?}"
            ));
        }
        // Messages fetched before the forward, and errors, come by `poll`.
        match consumer.poll(Duration::ZERO) {
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                continue;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "fetch error; continuing"),
            None => {}
        }
        fetch.consume(
            Duration::from_millis(100),
            &mut fetched,
            tally::source::fetch::MAX_BATCH,
        );
        for m in fetched.drain(..) {
            if m.error().is_none() {
                messages += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
            }
        }
    }
    drop(fetch);
    Ok(DrainReport {
        messages,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}
