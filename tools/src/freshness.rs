//! `tally-bench freshness`: how long from producing an event to seeing it in
//! `/v1/count`. Probe events for fresh video ids are produced at a fixed
//! interval (on top of whatever load is running); each probe then polls
//! `/v1/count` for its video until the count is 1. The latency runs from just
//! before the produce call to the response that shows the event, so it holds
//! the producer, the broker, the batch linger, the archive write and the
//! serving commit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, Producer};

use crate::api::{percentile, Conn};

#[derive(Debug, Clone)]
pub(crate) struct FreshnessSpec {
    pub addr: SocketAddr,
    pub topic: String,
    pub probes: u64,
    pub interval: Duration,
    /// A probe not visible after this long counts as lost.
    pub timeout: Duration,
    /// Pause between polls of one probe: the resolution of the measurement.
    /// Short pauses load the API (outstanding probes x polls per second)
    /// on the machine being measured.
    pub poll: Duration,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct FreshnessReport {
    pub probes: u64,
    pub visible: u64,
    /// Produce-to-visible latencies, milliseconds.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `/v1/count` over the minutes around `ms` for one video.
fn count_path(video: &str, ms: i64) -> String {
    let minute = ms - ms.rem_euclid(60_000);
    let (start, end) = (rfc3339(minute - 60_000), rfc3339(minute + 120_000));
    format!(
        "/v1/count?video_id={video}&event_type=view&start={}&end={}",
        start.replace(':', "%3A"),
        end.replace(':', "%3A")
    )
}

fn count_of(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("count")?
        .as_i64()
}

/// Poll until the probe is visible; returns when it was first seen.
async fn await_visible(
    addr: SocketAddr,
    path: String,
    deadline: Instant,
    poll: Duration,
) -> Option<Instant> {
    let mut conn: Option<Conn> = None;
    while Instant::now() < deadline {
        if conn.is_none() {
            conn = Conn::open(addr).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.get(&path, None).await {
                Ok(200) if count_of(c.body()).unwrap_or(0) >= 1 => return Some(Instant::now()),
                Ok(_) => {}
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(poll).await;
    }
    None
}

pub(crate) async fn run(
    spec: FreshnessSpec,
    properties: &[(String, String)],
) -> Result<FreshnessReport, String> {
    if spec.probes == 0 {
        return Err("--probes must be at least 1".into());
    }
    // No linger: a probe leaves at once, as a lone event would.
    let producer =
        Arc::new(tally::jobs::produce::producer(properties, 0).map_err(|e| e.to_string())?);
    let nonce = chrono::Utc::now().timestamp_millis();
    let start = Instant::now();
    let mut waits = Vec::new();
    for i in 0..spec.probes {
        let at = start + spec.interval.mul_f64(i as f64);
        tokio::time::sleep_until(at.into()).await;
        let video = format!("probe-{nonce}-{i}");
        let now_ms = chrono::Utc::now().timestamp_millis();
        let payload = format!(
            r#"{{"event_id":"{video}","video_id":"{video}","event_type":"view","event_time":"{}","value":1}}"#,
            rfc3339(now_ms)
        );
        let sent = Instant::now();
        producer
            .send(BaseRecord::to(&spec.topic).key(&video).payload(&payload))
            .map_err(|(e, _)| format!("cannot produce probe {i}: {e}"))?;
        let path = count_path(&video, now_ms);
        let (addr, poll, deadline) = (spec.addr, spec.poll, sent + spec.timeout);
        waits.push(tokio::spawn(async move {
            await_visible(addr, path, deadline, poll)
                .await
                .map(|seen| seen.duration_since(sent))
        }));
    }
    let mut lat = Vec::new();
    for w in waits {
        if let Some(d) = w.await.map_err(|e| e.to_string())? {
            lat.push(d.as_millis() as u64);
        }
    }
    let _ = producer.flush(Duration::from_secs(10));
    lat.sort_unstable();
    Ok(FreshnessReport {
        probes: spec.probes,
        visible: lat.len() as u64,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_path_covers_the_event_minute_on_minute_boundaries() {
        // 2026-11-28T10:15:42.123Z
        let ms = 1_795_861_000_000 + 942_123;
        let p = count_path("probe-1-2", ms);
        let t = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(&s.replace("%3A", ":"))
                .map(|d| d.timestamp_millis())
        };
        let q: std::collections::HashMap<&str, &str> = p
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let (start, end) = (t(q["start"]).unwrap_or(0), t(q["end"]).unwrap_or(0));
        assert_eq!(start % 60_000, 0);
        assert_eq!(end % 60_000, 0);
        assert!(start <= ms && ms < end, "{start} <= {ms} < {end}");
        assert_eq!(q["video_id"], "probe-1-2");
    }

    #[test]
    fn count_is_read_from_the_response_body() {
        assert_eq!(
            count_of(br#"{"video_id":"v","count":3,"as_of":"x"}"#),
            Some(3)
        );
        assert_eq!(count_of(b"not json"), None);
        assert_eq!(count_of(br#"{"error":"x"}"#), None);
    }
}
