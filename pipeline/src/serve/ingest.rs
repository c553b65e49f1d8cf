//! `POST /v1/events` (processEvents): validate with the pipeline's own
//! decoder, all or nothing, then produce through the idempotent producer
//! (`acks=all`) and answer only after the broker acknowledged every event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::decode::{RecordDecoder, Reject};

use super::ServeError;

/// Split a body into events: a JSON array, or NDJSON (one object per line).
/// The array is split at its top-level commas without building values, so
/// each element reaches the decoder as its original bytes.
pub(crate) fn split_events(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    let first = body.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        None => Ok(Vec::new()),
        Some(i) if body[i] == b'[' => split_array(body, i),
        Some(_) => Ok(body
            .split(|b| *b == b'\n')
            .map(trim)
            .filter(|l| !l.is_empty())
            .collect()),
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let a = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let b = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(a, |p| p + 1);
    &s[a..b.max(a)]
}

fn split_array(body: &[u8], open: usize) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let mut start = open + 1;
    let mut i = open + 1;
    while i < body.len() {
        let b = body[i];
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth > 0 => depth -= 1,
                b']' => {
                    let last = trim(&body[start..i]);
                    if !last.is_empty() {
                        out.push(last);
                    } else if !out.is_empty() {
                        return Err(format!(
                            "a trailing comma before byte {i} of the JSON array"
                        ));
                    }
                    if !trim(&body[i + 1..]).is_empty() {
                        return Err(format!(
                            "unexpected bytes after the JSON array at byte {}",
                            i + 1
                        ));
                    }
                    return Ok(out);
                }
                b'}' => return Err(format!("unbalanced `}}` at byte {i} of the JSON array")),
                b',' if depth == 0 => {
                    let el = trim(&body[start..i]);
                    if el.is_empty() {
                        return Err(format!(
                            "an empty element before byte {i} of the JSON array"
                        ));
                    }
                    out.push(el);
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    Err("the JSON array is not closed".into())
}

/// One refused event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invalid {
    pub index: usize,
    pub reject: Reject,
}

/// Validate every event with the pipeline's decoder. Returns the first
/// `max_listed` problems and the number of invalid events (memory stays
/// bounded however many are invalid).
pub(crate) fn validate(
    decoder: &RecordDecoder,
    events: &[&[u8]],
    now_ms: i64,
    max_listed: usize,
) -> (Vec<Invalid>, usize) {
    let mut scratch = decoder.schema().new_columns(events.len().min(4096));
    let mut bad = Vec::new();
    let mut invalid = 0;
    for (index, e) in events.iter().enumerate() {
        if let Err(reject) = decoder.decode(Some(e), now_ms, &mut scratch) {
            invalid += 1;
            if bad.len() < max_listed {
                bad.push(Invalid { index, reject });
            }
        }
        if scratch.len() >= 4096 {
            let _ = scratch.finish();
        }
    }
    (bad, invalid)
}

/// How long one call of the delivery-report poller may block. A delivery
/// report is handled as soon as it arrives; this only bounds how long the
/// poller takes to notice shutdown. (rdkafka's `ThreadedProducer` polls every
/// 100 ms, and each poll ends in a busy wait for the sub-millisecond rest of
/// its deadline: about 1% of a core while idle, 8% of `tally run`'s CPU in
/// the end-to-end drain.)
const DELIVERY_POLL: Duration = Duration::from_secs(1);

/// A delivery report completes the request's one-shot channel.
struct DeliveryContext;

type Delivered = Result<(), String>;

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::source::librdkafka_log(level, fac, log_message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<Delivered>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        // The request may have gone (timeout); then nobody waits for the answer.
        let _ = tx.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// The producer behind `POST /v1/events` (also the broker readiness probe).
pub(crate) struct Ingest {
    producer: Arc<BaseProducer<DeliveryContext>>,
    /// Tells the delivery-report poller to stop; it drops the producer then.
    stop: Arc<AtomicBool>,
    topic: String,
    timeout: Duration,
    /// A request answers by then even if some deliveries are unreported.
    answer_by: Duration,
}

/// A produce that did not fully succeed.
#[derive(Debug)]
pub(crate) struct ProduceFailure {
    pub acknowledged: usize,
    pub message: String,
}

impl Ingest {
    pub(crate) fn new(settings: &Settings) -> Result<Ingest, ServeError> {
        let mut cc = crate::source::client::config(
            &settings.kafka.properties,
            crate::source::client::Role::Producer,
        );
        // Deliveries must fail before the HTTP request times out. librdkafka
        // scans for timed-out messages once a second, and a busy machine adds
        // its own delay: give up at half the request timeout (at most 2 s
        // before it would leave too little on a busy machine; at least 1 s).
        let half = settings.api.request_timeout / 2;
        let timeout = half
            .min(
                settings
                    .api
                    .request_timeout
                    .saturating_sub(Duration::from_secs(2)),
            )
            .max(Duration::from_secs(1));
        cc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        let producer: Arc<BaseProducer<DeliveryContext>> = Arc::new(
            cc.create_with_context(DeliveryContext)
                .map_err(|e| ServeError::Kafka(e.to_string()))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (poller, stopped) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tally-producer".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    poller.poll(DELIVERY_POLL);
                }
            })
            .map_err(|e| {
                ServeError::Kafka(format!("cannot start the producer's poll thread: {e}"))
            })?;
        // Should a report come later than librdkafka promises (a busy
        // machine), answer `produce_failed` with the count rather than let
        // the request time out with none.
        let answer_by = settings.api.request_timeout.mul_f64(0.8);
        Ok(Ingest {
            producer,
            stop,
            topic: settings.kafka.topic.clone(),
            timeout,
            answer_by,
        })
    }

    /// Produce every event; Ok only when the broker acknowledged all of them.
    pub(crate) async fn produce(&self, events: &[&[u8]]) -> Result<usize, ProduceFailure> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pending = Vec::with_capacity(events.len());
        for e in events {
            let (tx, rx) = oneshot::channel();
            let mut record =
                BaseRecord::<(), [u8], _>::with_opaque_to(&self.topic, Box::new(tx)).payload(*e);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break pending.push(rx),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        let acknowledged = count_acks(pending).await;
                        return Err(ProduceFailure {
                            acknowledged,
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        let total = pending.len();
        let answer_by = tokio::time::Instant::from_std(started + self.answer_by);
        let (mut acked, mut unconfirmed) = (0, 0);
        let mut first_error = None;
        for rx in pending {
            match tokio::time::timeout_at(answer_by, rx).await {
                Ok(Ok(Ok(()))) => acked += 1,
                Ok(Ok(Err(e))) => {
                    first_error.get_or_insert(e);
                }
                Ok(Err(_)) => {
                    first_error.get_or_insert_with(|| "the producer was dropped".to_string());
                }
                Err(_) => unconfirmed += 1,
            }
        }
        if unconfirmed > 0 && first_error.is_none() {
            first_error = Some(format!(
                "{unconfirmed} deliveries were not reported within {:?} (the broker may be down; they may still arrive)",
                self.answer_by
            ));
        }
        match first_error {
            None => Ok(total),
            Some(message) => Err(ProduceFailure {
                acknowledged: acked,
                message,
            }),
        }
    }

    /// Can the broker be reached (topic metadata within `timeout`)?
    pub(crate) fn broker_reachable(&self, timeout: Duration) -> bool {
        match self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
        {
            Ok(md) => md
                .topics()
                .iter()
                .any(|t| t.name() == self.topic && t.error().is_none()),
            Err(_) => false,
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // The poller exits within `DELIVERY_POLL` and drops the last reference
        // to the producer, which purges and fails what is still queued.
        self.stop.store(true, Ordering::Release);
    }
}

async fn count_acks(pending: Vec<oneshot::Receiver<Delivered>>) -> usize {
    let mut n = 0;
    for rx in pending {
        if matches!(rx.await, Ok(Ok(()))) {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_arrays_at_top_level_commas_only() {
        let body = br#" [ {"a":"x,]}","b":[1,2]} , {"c":{"d":"\"]"}} ]  "#;
        let got = split_events(body).unwrap();
        assert_eq!(
            got,
            vec![
                &br#"{"a":"x,]}","b":[1,2]}"#[..],
                &br#"{"c":{"d":"\"]"}}"#[..]
            ]
        );
        assert_eq!(split_events(b"[]").unwrap().len(), 0);
        assert_eq!(
            split_events(b"[1, \"s\", null]").unwrap().len(),
            3,
            "non-objects reach the decoder"
        );
    }

    #[test]
    fn malformed_arrays_are_errors() {
        for bad in [&b"[{}"[..], b"[{},]", b"[,{}]", b"[{}] x", b"[{}}]"] {
            assert!(
                split_events(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn ndjson_lines_skip_blank_lines() {
        let got = split_events(b"{\"a\":1}\r\n\n  {\"b\":2}\n").unwrap();
        assert_eq!(got, vec![&b"{\"a\":1}"[..], &b"{\"b\":2}"[..]]);
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let mut body = b"[".to_vec();
        body.extend(std::iter::repeat_n(b'[', 100_000));
        body.extend(std::iter::repeat_n(b']', 100_000));
        body.push(b']');
        assert_eq!(split_events(&body).unwrap().len(), 1);
    }
}
