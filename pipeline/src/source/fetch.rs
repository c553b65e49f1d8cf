//! Batched reads of fetched messages (librdkafka's `rd_kafka_consume_batch_queue`).
//!
//! rdkafka-rs hands out one message per `poll`: a queue pop, an event, an
//! `Arc` and several clock reads each. In a bare drain of a local topic that
//! is about 0.4 µs per message; read 1,024 at a time it is about half
//! (docs/performance.md, round 9).
//!
//! The batch call cannot read the consumer queue itself: it would serve a
//! rebalance event there by unassigning everything, since rdkafka-rs takes
//! rebalances as events, not callbacks. So [`FetchQueue`] forwards the
//! assigned partitions' fetch queues into a queue of its own and reads that
//! one in batches, while the poll loop keeps serving the consumer queue
//! (rebalances, statistics, errors) through rdkafka-rs.
//!
//! Order within a partition holds because, for each partition, messages
//! enqueued before [`FetchQueue::forward`] are on the consumer queue and
//! messages enqueued after it are on this queue; the poll loop empties the
//! consumer queue after every forward before it reads this queue. librdkafka
//! drops a partition's forward when its fetcher stops (a revocation or a
//! re-assignment) and, once an application has forwarded a partition, does
//! not forward it again itself. A re-assignment stops and restarts the
//! fetchers asynchronously, so a forward made right after it can be undone
//! a moment later. The poll loop therefore forwards every owned partition
//! again after each assignment and every [`FORWARD_EVERY`]; until then the
//! partition's messages wait in its own fetch queue, in order, and the next
//! forward moves them over ahead of anything newer.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;

/// The most messages one [`FetchQueue::consume`] returns.
pub const MAX_BATCH: usize = 1024;

/// How often the poll loop forwards the owned partitions again. A fetcher
/// stops asynchronously after a re-assignment, after the loop's own forward;
/// its partition then waits in its own queue until the next one (measured
/// by `reassignments_keep_every_partition_in_order_and_flowing`, which
/// stalls without it).
pub const FORWARD_EVERY: Duration = Duration::from_millis(100);

/// tally's own queue for fetched messages, plus a handle on the consumer
/// queue to see whether it still holds anything. Drop it before the consumer.
pub struct FetchQueue {
    rk: NonNull<rd::rd_kafka_t>,
    fetched: NonNull<rd::rd_kafka_queue_t>,
    consumer: Option<NonNull<rd::rd_kafka_queue_t>>,
    topic: CString,
}

impl FetchQueue {
    /// A fetch queue for `topic` on `consumer`. `None` if the topic name
    /// holds a NUL byte or librdkafka returns no queue.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str) -> Option<FetchQueue> {
        let topic = CString::new(topic).ok()?;
        let rk = NonNull::new(consumer.client().native_ptr())?;
        // SAFETY: `rk` is a live client handle (the consumer outlives this
        // value: see the type's documentation); both calls return new
        // references (or NULL), released in `Drop`.
        let (fetched, consumer_queue) = unsafe {
            (
                rd::rd_kafka_queue_new(rk.as_ptr()),
                rd::rd_kafka_queue_get_consumer(rk.as_ptr()),
            )
        };
        let Some(fetched) = NonNull::new(fetched) else {
            if let Some(q) = NonNull::new(consumer_queue) {
                // SAFETY: a reference returned just above, released once.
                unsafe { rd::rd_kafka_queue_destroy(q.as_ptr()) };
            }
            return None;
        };
        Some(FetchQueue {
            rk,
            fetched,
            consumer: NonNull::new(consumer_queue),
            topic,
        })
    }

    /// Route `partitions` of the topic into this queue (again). Idempotent;
    /// messages a partition's own queue holds move here first, in order.
    pub fn forward(&self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            // SAFETY: `rk` and `fetched` are live (see `new`); the partition
            // queue reference is released right after forwarding, which
            // keeps the forward in place.
            unsafe {
                let pq = rd::rd_kafka_queue_get_partition(self.rk.as_ptr(), self.topic.as_ptr(), p);
                if !pq.is_null() {
                    rd::rd_kafka_queue_forward(pq, self.fetched.as_ptr());
                    rd::rd_kafka_queue_destroy(pq);
                }
            }
        }
    }

    /// The partition's end offset as of librdkafka's last fetch response
    /// (`rd_kafka_get_watermark_offsets`: cached, no broker request).
    pub fn cached_high_watermark(&self, partition: i32) -> Option<i64> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: `rk` is live (see `new`); the out pointers are valid.
        let err = unsafe {
            rd::rd_kafka_get_watermark_offsets(
                self.rk.as_ptr(),
                self.topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
    }

    /// Events and messages waiting on the consumer queue (0 without a group).
    pub fn consumer_queue_len(&self) -> usize {
        match self.consumer {
            // SAFETY: a live queue reference (see `new`).
            Some(q) => unsafe { rd::rd_kafka_queue_length(q.as_ptr()) },
            None => 0,
        }
    }

    /// Append up to `max` (at most [`MAX_BATCH`]) messages to `out`, waiting
    /// up to `timeout` for the first one. Returns how many were appended.
    pub fn consume(&self, timeout: Duration, out: &mut Vec<Fetched>, max: usize) -> usize {
        let max = max.clamp(1, MAX_BATCH);
        out.reserve(max);
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let spare = out.spare_capacity_mut();
        // SAFETY: `spare` has room for `max` pointers, and `Fetched` is a
        // transparent non-null message pointer; librdkafka writes `n <= max`
        // valid message pointers, each owned by the caller from then on.
        unsafe {
            let n = rd::rd_kafka_consume_batch_queue(
                self.fetched.as_ptr(),
                timeout_ms,
                spare.as_mut_ptr().cast::<*mut rd::rd_kafka_message_t>(),
                max,
            );
            let n = usize::try_from(n).unwrap_or(0).min(max);
            out.set_len(out.len() + n);
            n
        }
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: each reference was obtained in `new` and is released once.
        unsafe {
            rd::rd_kafka_queue_destroy(self.fetched.as_ptr());
            if let Some(q) = self.consumer {
                rd::rd_kafka_queue_destroy(q.as_ptr());
            }
        }
    }
}

/// One fetched message (or a per-partition event such as end of partition),
/// owned until dropped. Drop it before the consumer.
#[repr(transparent)]
pub struct Fetched(NonNull<rd::rd_kafka_message_t>);

impl Fetched {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: the message stays valid until `drop` destroys it.
        unsafe { self.0.as_ref() }
    }

    /// The error this entry carries, such as `RD_KAFKA_RESP_ERR__PARTITION_EOF`.
    pub fn error(&self) -> Option<RDKafkaRespErr> {
        let err = self.raw().err;
        (err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).then_some(err)
    }

    pub fn partition(&self) -> i32 {
        self.raw().partition
    }

    pub fn offset(&self) -> i64 {
        self.raw().offset
    }

    pub fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        if m.payload.is_null() {
            return None;
        }
        // SAFETY: librdkafka's payload is `len` bytes, valid while the message is.
        Some(unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) })
    }

    /// The Kafka timestamp in milliseconds, if the message has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message; `kind` is a valid out pointer.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.0.as_ptr(), &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts >= 0)
            .then_some(ts)
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        // SAFETY: the message was handed to us by `rd_kafka_consume_batch_queue`
        // and is destroyed exactly once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    use super::*;

    const PARTITIONS: i32 = 3;
    const PER_PARTITION: i64 = 4_000;

    /// What the poll loop of `tally run` does, reduced to recording offsets:
    /// the consumer queue until empty, then (re-)forwarding after an
    /// assignment and every `FORWARD_EVERY`, then a batch.
    /// Every `reassign_every` messages it re-assigns all partitions at the
    /// next offset it expects (as a re-seek does), which stops and restarts
    /// their fetchers and drops their forwards.
    fn read_all(reassign_every: usize) -> (BTreeMap<i32, Vec<i64>>, usize, usize) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", PARTITIONS, 1).expect("topic");
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("producer");
        for i in 0..PER_PARTITION {
            for p in 0..PARTITIONS {
                let payload = format!("{p}:{i}");
                producer
                    .send(BaseRecord::<(), _>::to("t").partition(p).payload(&payload))
                    .expect("send");
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).expect("flush");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let assign = |next: &BTreeMap<i32, i64>| {
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(
                    "t",
                    p,
                    Offset::Offset(next.get(&p).copied().unwrap_or(0)),
                )
                .expect("tpl");
            }
            consumer.assign(&tpl).expect("assign");
        };
        let mut next: BTreeMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
        assign(&next);
        let fetch = FetchQueue::new(&consumer, "t").expect("fetch queue");
        let mut seen: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        let (mut by_poll, mut by_batch, mut since_assign) = (0, 0, 0);
        let mut forwarded: Option<Instant> = None;
        let mut out = Vec::new();
        let record =
            |p: i32, offset: i64, payload: Option<&[u8]>, seen: &mut BTreeMap<i32, Vec<i64>>| {
                assert_eq!(
                    payload,
                    Some(format!("{p}:{offset}").as_bytes()),
                    "payload of {p}@{offset}"
                );
                seen.entry(p).or_default().push(offset);
            };
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.values().map(Vec::len).sum::<usize>()
            < (PARTITIONS as usize) * PER_PARTITION as usize
        {
            assert!(
                Instant::now() < deadline,
                "stalled at {:?}",
                seen.iter().map(|(p, v)| (*p, v.len())).collect::<Vec<_>>()
            );
            if reassign_every > 0 && since_assign >= reassign_every {
                for (p, offsets) in &seen {
                    next.insert(*p, offsets.last().map_or(0, |o| o + 1));
                }
                assign(&next);
                forwarded = None;
                since_assign = 0;
            }
            if let Some(r) = consumer.poll(Duration::ZERO) {
                if let Ok(m) = r {
                    record(m.partition(), m.offset(), m.payload(), &mut seen);
                    by_poll += 1;
                    since_assign += 1;
                }
                continue;
            }
            if fetch.consumer_queue_len() > 0 {
                continue;
            }
            if forwarded.is_none_or(|t| t.elapsed() >= FORWARD_EVERY) {
                fetch.forward(0..PARTITIONS);
                forwarded = Some(Instant::now());
                continue;
            }
            fetch.consume(Duration::from_millis(50), &mut out, 100);
            for m in out.drain(..) {
                if m.error().is_none() {
                    record(m.partition(), m.offset(), m.payload(), &mut seen);
                    by_batch += 1;
                    since_assign += 1;
                }
            }
        }
        drop(out);
        drop(fetch);
        (seen, by_poll, by_batch)
    }

    fn assert_each_partition_in_order(seen: &BTreeMap<i32, Vec<i64>>) {
        assert_eq!(seen.len(), PARTITIONS as usize);
        for (p, offsets) in seen {
            let expected: Vec<i64> = (0..PER_PARTITION).collect();
            assert!(
                offsets == &expected,
                "partition {p}: {} offsets, not 0..{PER_PARTITION} in order",
                offsets.len()
            );
        }
    }

    #[test]
    fn forwarded_partitions_are_read_in_batches_in_order() {
        let (seen, by_poll, by_batch) = read_all(0);
        assert_each_partition_in_order(&seen);
        assert!(by_batch > by_poll, "{by_batch} by batch, {by_poll} by poll");
    }

    #[test]
    fn reassignments_keep_every_partition_in_order_and_flowing() {
        // 24 re-assignments: each drops the forwards, which are made again.
        let (seen, _, by_batch) = read_all(500);
        assert_each_partition_in_order(&seen);
        assert!(by_batch > 0);
    }

    /// A fetcher that restarts after a pause (as in every cooperative
    /// rebalance) resumes at the partition's application position. With
    /// end-of-partition events on, the batched read moves that position past
    /// the end offset the event carries, and the next message is skipped;
    /// so `tally run` turns them off. With `eof = true` this returns 0..=9
    /// and 11..=20: offset 10, the first message after the pause, is lost.
    fn read_across_a_pause(eof: bool) -> Vec<i64> {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .expect("producer");
        let produce = |from: i64, to: i64| {
            for i in from..to {
                let payload = format!("0:{i}");
                producer
                    .send(BaseRecord::<(), _>::to("t").partition(0).payload(&payload))
                    .expect("send");
            }
            producer.flush(Duration::from_secs(30)).expect("flush");
        };
        produce(0, 10);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", if eof { "true" } else { "false" })
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(0))
            .expect("tpl");
        consumer.assign(&tpl).expect("assign");
        let fetch = FetchQueue::new(&consumer, "t").expect("fetch queue");
        fetch.forward([0]);
        let mut offsets = Vec::new();
        let mut out = Vec::new();
        let mut read_for = |d: Duration, offsets: &mut Vec<i64>| {
            let until = Instant::now() + d;
            while Instant::now() < until {
                let _ = consumer.poll(Duration::ZERO);
                fetch.consume(Duration::from_millis(20), &mut out, 100);
                offsets.extend(
                    out.drain(..)
                        .filter(|m| m.error().is_none())
                        .map(|m| m.offset()),
                );
            }
        };
        read_for(Duration::from_secs(2), &mut offsets);
        consumer.pause(&tpl).expect("pause");
        read_for(Duration::from_millis(200), &mut offsets);
        consumer.resume(&tpl).expect("resume");
        produce(10, 21);
        read_for(Duration::from_secs(3), &mut offsets);
        drop(out);
        drop(fetch);
        offsets
    }

    #[test]
    fn a_pause_at_the_end_of_a_partition_loses_nothing() {
        assert_eq!(read_across_a_pause(false), (0..=20).collect::<Vec<i64>>());
    }
}
