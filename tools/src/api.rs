//! `tally-bench api`: an open-loop HTTP load generator for the query API.
//!
//! Requests are scheduled at a fixed rate whatever the server does (open
//! loop), and each latency is measured from the request's *scheduled* time,
//! so a stalled server shows up as queueing delay instead of being hidden
//! (no coordinated omission). Keep-alive HTTP/1.1 over a pool of connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

#[derive(Debug, Clone)]
pub(crate) struct BenchApiSpec {
    pub addr: SocketAddr,
    /// Requests per second.
    pub rate: u64,
    pub duration: Duration,
    pub connections: usize,
    /// Request paths, used round-robin.
    pub paths: Vec<String>,
    pub token: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct BenchApiReport {
    pub ok: u64,
    pub errors: u64,
    pub wall: Duration,
    /// Latencies in microseconds.
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// Server-side p50 / p99 (upper bucket bounds of
    /// `tally_http_request_duration_seconds` over the run), in microseconds.
    pub server_p50: Option<u64>,
    pub server_p99: Option<u64>,
}

impl BenchApiReport {
    pub(crate) fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Paths for `/v1/count` and `/v1/stats` over `days`-day ranges ending at
/// `end_ms` (hour-aligned), for videos `vid-00000`.. (the `tally produce` ids).
pub(crate) fn query_paths(videos: u64, days: i64, end_ms: i64, seed: u64) -> Vec<String> {
    let end = end_ms - end_ms.rem_euclid(3_600_000);
    let start = end - days * 86_400_000;
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
            .replace(':', "%3A")
    };
    let (s, e) = (fmt(start), fmt(end));
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let functions = ["sum", "avg", "min", "max", "count"];
    (0..4096)
        .map(|i| {
            // Skewed towards popular videos, like real dashboards.
            let v = (rng.random::<f64>().powi(3) * videos as f64) as u64;
            if i % 2 == 0 {
                format!("/v1/count?video_id=vid-{v:05}&event_type=view&start={s}&end={e}")
            } else {
                let f = functions[rng.random_range(0..functions.len())];
                format!(
                    "/v1/stats?video_id=vid-{v:05}&event_type=view&function={f}&start={s}&end={e}"
                )
            }
        })
        .collect()
}

/// Paths for `GET /v1/rollups/hour_video_events` over `days`-day ranges
/// ending at `end_ms` (hour-aligned): `per` videos (`video_id` repeated),
/// grouped by video (one video: by event type). `per` 0: views per channel
/// from `hour_channel_events` (the videos dimension's ~20 channels).
pub(crate) fn generic_paths(
    videos: u64,
    per: usize,
    days: i64,
    end_ms: i64,
    seed: u64,
) -> Vec<String> {
    let end = end_ms - end_ms.rem_euclid(3_600_000);
    let start = end - days * 86_400_000;
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
            .replace(':', "%3A")
    };
    let (s, e) = (fmt(start), fmt(end));
    if per == 0 {
        return vec![format!(
            "/v1/rollups/hour_channel_events?start={s}&end={e}&event_type=view&group_by=channel_id"
        )];
    }
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    (0..4096)
        .map(|_| {
            let ids: Vec<String> = (0..per.max(1))
                .map(|_| {
                    let v = (rng.random::<f64>().powi(3) * videos as f64) as u64;
                    format!("video_id=vid-{v:05}")
                })
                .collect();
            let by = if per <= 1 { "event_type" } else { "video_id" };
            format!(
                "/v1/rollups/hour_video_events?start={s}&end={e}&{}&group_by={by}",
                ids.join("&")
            )
        })
        .collect()
}

/// Paths for the seed's `/v1/series` (one video, every event type, hourly
/// buckets) or `/v1/top` (the ten most viewed videos) over `days`-day
/// ranges ending at `end_ms` (hour-aligned).
pub(crate) fn seed_paths(
    endpoint: &str,
    videos: u64,
    days: i64,
    end_ms: i64,
    seed: u64,
) -> Vec<String> {
    let end = end_ms - end_ms.rem_euclid(3_600_000);
    let start = end - days * 86_400_000;
    let fmt = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
            .replace(':', "%3A")
    };
    let (s, e) = (fmt(start), fmt(end));
    if endpoint == "top" {
        return vec![format!(
            "/v1/top?event_type=view&start={s}&end={e}&limit=10"
        )];
    }
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    (0..4096)
        .map(|_| {
            let v = (rng.random::<f64>().powi(3) * videos as f64) as u64;
            format!("/v1/series?video_id=vid-{v:05}&start={s}&end={e}&granularity=hour")
        })
        .collect()
}

pub(crate) struct Conn {
    stream: TcpStream,
    /// The `Host` header: the address connected to.
    host: String,
    buf: Vec<u8>,
    body_at: usize,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            host: addr.to_string(),
            buf: Vec::with_capacity(16 * 1024),
            body_at: 0,
        })
    }

    /// The body of the last response.
    pub(crate) fn body(&self) -> &[u8] {
        self.buf.get(self.body_at..).unwrap_or_default()
    }

    /// One request; returns the status code.
    pub(crate) async fn get(&mut self, path: &str, token: Option<&str>) -> std::io::Result<u16> {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\n", self.host);
        self.stream.write_all(req.as_bytes()).await?;
        self.buf.clear();
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("non-UTF-8 head"))?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| bad("no content-length"))?;
        while self.buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("connection closed mid-body"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.body_at = head_end;
        Ok(status)
    }
}

/// Cumulative `tally_http_request_duration_seconds` buckets of the /v1 read
/// routes, summed: (upper bound in seconds, count).
fn server_buckets(text: &str) -> Vec<(f64, u64)> {
    let mut by_le: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tally_http_request_duration_seconds_bucket{") else {
            continue;
        };
        if ![
            "/v1/count",
            "/v1/stats",
            "/v1/series",
            "/v1/top",
            "/v1/rollups/{name}",
        ]
        .iter()
        .any(|r| rest.contains(&format!("route=\"{r}\"")))
        {
            continue;
        }
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|l| l.strip_suffix('"'))
        else {
            continue;
        };
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let n: u64 = value.trim().parse().unwrap_or(0);
        let e = by_le.entry(le.to_bits()).or_insert((le, 0));
        e.1 += n;
    }
    let mut v: Vec<(f64, u64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

fn bucket_percentile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<u64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0, |(_, b)| *b)
                    .min(*n),
            )
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    delta.iter().find(|(_, n)| *n >= want).map(|(le, _)| {
        if le.is_finite() {
            (le * 1e6) as u64
        } else {
            u64::MAX
        }
    })
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

pub(crate) fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Run the schedule and collect latencies.
pub(crate) async fn run(spec: BenchApiSpec) -> Result<BenchApiReport, String> {
    if spec.rate == 0 || spec.paths.is_empty() || spec.connections == 0 {
        return Err("rate, paths and connections must be non-zero".into());
    }
    let total = spec.rate.saturating_mul(spec.duration.as_millis() as u64) / 1000;
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, usize)>();
    let rx = Arc::new(Mutex::new(rx));
    let paths = Arc::new(spec.paths.clone());
    let mut workers = Vec::new();
    for _ in 0..spec.connections {
        let rx = rx.clone();
        let paths = paths.clone();
        let token = spec.token.clone();
        let addr = spec.addr;
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut conn: Option<Conn> = None;
            loop {
                let next = rx.lock().await.recv().await;
                let Some((scheduled, i)) = next else { break };
                if conn.is_none() {
                    conn = Conn::open(addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(c) => c.get(&paths[i % paths.len()], token.as_deref()).await.ok(),
                    None => None,
                };
                lat.push(scheduled.elapsed().as_micros() as u64);
                match status {
                    Some(200) => ok += 1,
                    Some(_) => errors += 1,
                    None => {
                        errors += 1;
                        conn = None;
                    }
                }
            }
            (lat, ok, errors)
        }));
    }
    let before = scrape(spec.addr)
        .await
        .map(|t| server_buckets(&t))
        .unwrap_or_default();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / spec.rate as f64);
    // The schedule runs on its own thread: std sleeps are finer than tokio's
    // 1 ms timer, so the generator's own lateness does not pollute latencies.
    let scheduler = std::thread::spawn(move || {
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send((at, i as usize)).is_err() {
                break;
            }
        }
    });
    let mut report = BenchApiReport::default();
    let mut all = Vec::with_capacity(total as usize);
    for w in workers {
        let (lat, ok, errors) = w.await.map_err(|e| e.to_string())?;
        all.extend(lat);
        report.ok += ok;
        report.errors += errors;
    }
    report.wall = start.elapsed();
    let _ = scheduler.join();
    if let Some(after) = scrape(spec.addr).await.map(|t| server_buckets(&t)) {
        report.server_p50 = bucket_percentile(&before, &after, 0.50);
        report.server_p99 = bucket_percentile(&before, &after, 0.99);
    }
    all.sort_unstable();
    report.p50 = percentile(&all, 0.50);
    report.p99 = percentile(&all, 0.99);
    report.p999 = percentile(&all, 0.999);
    report.max = all.last().copied().unwrap_or(0);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn server_percentiles_come_from_bucket_deltas() {
        let before = "tally_http_request_duration_seconds_bucket{route=\"/v1/count\",le=\"0.0005\"} 10\n\
                      tally_http_request_duration_seconds_bucket{route=\"/v1/count\",le=\"+Inf\"} 10\n";
        let after = "tally_http_request_duration_seconds_bucket{route=\"/v1/count\",le=\"0.0005\"} 108\n\
                     tally_http_request_duration_seconds_bucket{route=\"/v1/count\",le=\"+Inf\"} 110\n\
                     tally_http_request_duration_seconds_bucket{route=\"/v1/events\",le=\"+Inf\"} 999\n";
        let (b, a) = (server_buckets(before), server_buckets(after));
        assert_eq!(bucket_percentile(&b, &a, 0.5), Some(500));
        assert_eq!(bucket_percentile(&b, &a, 0.99), Some(u64::MAX));
    }

    #[test]
    fn query_paths_are_hour_aligned_30_day_ranges() {
        let p = query_paths(100, 30, 1_795_856_400_123, 1);
        assert!(p[0].starts_with("/v1/count?video_id=vid-"), "{}", p[0]);
        assert!(
            p[0].contains("start=2026-10-29T09%3A00%3A00Z&end=2026-11-28T09%3A00%3A00Z"),
            "{}",
            p[0]
        );
        assert!(p[1].starts_with("/v1/stats?"), "{}", p[1]);
    }
}
