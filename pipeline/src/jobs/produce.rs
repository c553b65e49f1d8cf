//! `tally produce`: a seeded load generator with Zipf-distributed video
//! popularity, optional late and malformed events, to Kafka or a JSONL file.

use std::io::Write;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use crate::source::SourceError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// Generator parameters.
#[derive(Debug, Clone)]
pub struct ProduceSpec {
    pub count: u64,
    /// Events per second; 0 means as fast as possible.
    pub rate: u64,
    pub seed: u64,
    pub videos: u64,
    pub zipf_exponent: f64,
    pub event_types: Vec<String>,
    /// Event times are spread uniformly over `[now - time_spread, now]`.
    pub time_spread: Duration,
    /// Fraction of events 2 minutes to 1 hour behind (late, still accepted).
    pub late_fraction: f64,
    /// Fraction of malformed messages (rejected to the dead-letter dataset).
    pub malformed_fraction: f64,
    /// Video ids to draw from (rank order = popularity order), e.g. from
    /// `data/dims/videos.csv`; `None` makes `vid-00000` .. `vid-{videos-1}`.
    pub video_ids: Option<Vec<String>>,
}

/// The `video_id` column (the first) of a dimension CSV with a header row.
pub fn video_ids_from_csv(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if header.split(',').next().map(str::trim) != Some("video_id") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: the first column must be video_id (found header {header:?})",
                path.display()
            ),
        ));
    }
    let ids: Vec<String> = lines
        .filter_map(|l| l.split(',').next())
        .map(|id| id.trim().trim_matches('"').to_string())
        .filter(|id| !id.is_empty())
        .collect();
    if ids.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: no video ids", path.display()),
        ));
    }
    Ok(ids)
}

/// A Zipf sampler over ranks `0..n` (rank 0 most popular).
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, exponent: f64) -> Zipf {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(exponent);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    pub fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) as u64
    }
}

/// Generates message payloads.
#[derive(Debug)]
pub struct Generator {
    spec: ProduceSpec,
    rng: ChaCha12Rng,
    zipf: Zipf,
    n: u64,
}

impl Generator {
    pub fn new(spec: ProduceSpec) -> Generator {
        let n = spec
            .video_ids
            .as_ref()
            .map_or(spec.videos, |v| v.len() as u64);
        let zipf = Zipf::new(n, spec.zipf_exponent);
        Generator {
            rng: ChaCha12Rng::seed_from_u64(spec.seed),
            zipf,
            spec,
            n: 0,
        }
    }

    /// The next payload and the partitioning key (the video id).
    pub fn next_event(&mut self, now_ms: i64) -> (String, Vec<u8>) {
        self.n += 1;
        let rank = self.zipf.sample(&mut self.rng);
        let video = match &self.spec.video_ids {
            Some(ids) => ids.get(rank as usize).cloned().unwrap_or_default(),
            None => format!("vid-{rank:05}"),
        };
        if self
            .rng
            .random_bool(self.spec.malformed_fraction.clamp(0.0, 1.0))
        {
            let bad = match self.rng.random_range(0..5) {
                0 => "this is not json".to_string(),
                1 => format!(r#"{{"event_type":"view","event_time":{now_ms}}}"#),
                2 => format!(
                    r#"{{"video_id":"{video}","event_type":"view","event_time":{now_ms},"value":"ten"}}"#
                ),
                3 => format!(
                    r#"{{"video_id":"{video}","event_type":"Bad Type","event_time":{now_ms}}}"#
                ),
                _ => format!(
                    r#"{{"video_id":"{video}","event_type":"view","event_time":{}}}"#,
                    now_ms + 86_400_000
                ),
            };
            return (video, bad.into_bytes());
        }
        let types = &self.spec.event_types;
        let et = &types[self
            .rng
            .random_range(0..types.len().max(1))
            .min(types.len().saturating_sub(1))];
        let spread = self.spec.time_spread.as_millis() as i64;
        let back = if self
            .rng
            .random_bool(self.spec.late_fraction.clamp(0.0, 1.0))
        {
            self.rng.random_range(120_000..3_600_000)
        } else if spread > 0 {
            self.rng.random_range(0..=spread)
        } else {
            0
        };
        let t = now_ms - back;
        let time = if self.n.is_multiple_of(2) {
            t.to_string()
        } else {
            let dt = chrono::DateTime::from_timestamp_millis(t).unwrap_or_default();
            format!(
                "\"{}\"",
                dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )
        };
        let id = format!("{}-{}", self.spec.seed, self.n);
        let user = self.rng.random_range(0..100_000u32);
        let payload = if et == "view" {
            let v = self.rng.random_range(1..=600u32);
            format!(
                r#"{{"event_id":"{id}","video_id":"{video}","event_type":"{et}","event_time":{time},"user_id":"u{user}","value":{v}}}"#
            )
        } else {
            format!(
                r#"{{"event_id":"{id}","video_id":"{video}","event_type":"{et}","event_time":{time},"user_id":"u{user}"}}"#
            )
        };
        (video, payload.into_bytes())
    }
}

fn pace(start: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    let elapsed = start.elapsed();
    if due > elapsed {
        std::thread::sleep(due - elapsed);
    }
}

/// Write `spec.count` events as JSON lines.
pub fn to_file(spec: ProduceSpec, path: &std::path::Path) -> std::io::Result<u64> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut g = Generator::new(spec.clone());
    let start = Instant::now();
    for i in 0..spec.count {
        pace(start, i, spec.rate);
        let (_, payload) = g.next_event(chrono::Utc::now().timestamp_millis());
        out.write_all(&payload)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(spec.count)
}

/// An idempotent producer from the `[kafka.properties]` (consumer-only keys dropped).
pub fn producer(
    properties: &[(String, String)],
    linger_ms: u32,
) -> Result<ThreadedProducer<DefaultProducerContext>, SourceError> {
    let mut cc = crate::source::client::config(
        properties.iter().map(|(k, v)| (k, v)),
        crate::source::client::Role::Producer,
    );
    cc.set("linger.ms", linger_ms.to_string());
    cc.set("enable.idempotence", "true");
    cc.create().map_err(|e| SourceError::Create(e.to_string()))
}

/// Produce `spec.count` events to `topic`, keyed by video id.
pub fn to_kafka(
    spec: ProduceSpec,
    properties: &[(String, String)],
    topic: &str,
    progress: impl Fn(u64),
) -> Result<u64, SourceError> {
    let producer = producer(properties, 5)?;
    let mut g = Generator::new(spec.clone());
    let start = Instant::now();
    for i in 0..spec.count {
        pace(start, i, spec.rate);
        let (key, payload) = g.next_event(chrono::Utc::now().timestamp_millis());
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(SourceError::Broker(format!("produce to `{topic}`: {e}")))
                }
            }
        }
        if (i + 1) % 100_000 == 0 {
            progress(i + 1);
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| SourceError::Broker(format!("flush to `{topic}`: {e}")))?;
    Ok(spec.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ProduceSpec {
        ProduceSpec {
            count: 1000,
            rate: 0,
            seed: 7,
            videos: 100,
            zipf_exponent: 1.1,
            event_types: vec!["view".into(), "like".into()],
            time_spread: Duration::from_secs(10),
            late_fraction: 0.0,
            malformed_fraction: 0.0,
            video_ids: None,
        }
    }

    #[test]
    fn dims_csv_gives_the_video_ids() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dims/videos.csv");
        let ids = video_ids_from_csv(&root).unwrap();
        assert_eq!(ids.len(), 500);
        assert_eq!(ids[0], "vid-00000");
        let mut g = Generator::new(ProduceSpec {
            video_ids: Some(ids.clone()),
            ..spec()
        });
        for _ in 0..200 {
            let (key, _) = g.next_event(1);
            assert!(ids.contains(&key), "{key}");
        }
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("v.csv");
        std::fs::write(&bad, "title,video_id\nx,y\n").unwrap();
        assert!(video_ids_from_csv(&bad)
            .unwrap_err()
            .to_string()
            .contains("first column must be video_id"));
    }

    #[test]
    fn zipf_prefers_low_ranks_and_is_seeded() {
        let z = Zipf::new(100, 1.2);
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let samples: Vec<u64> = (0..10_000).map(|_| z.sample(&mut rng)).collect();
        let top = samples.iter().filter(|s| **s == 0).count();
        let tail = samples.iter().filter(|s| **s == 99).count();
        assert!(top > 20 * tail.max(1), "top {top} tail {tail}");
        assert!(samples.iter().all(|s| *s < 100));
        let mut a = Generator::new(spec());
        let mut b = Generator::new(spec());
        assert_eq!(a.next_event(1), b.next_event(1));
    }

    #[test]
    fn generated_events_decode() {
        use crate::config::Settings;
        use crate::decode::{EventSchema, RecordDecoder};
        let s = Settings::defaults().unwrap();
        let schema = EventSchema::from_config(&s.schema).unwrap();
        let mut cols = schema.new_columns(16);
        let d = RecordDecoder::new(schema, &s.decode);
        let mut g = Generator::new(ProduceSpec {
            malformed_fraction: 0.0,
            late_fraction: 0.3,
            ..spec()
        });
        let now = chrono::Utc::now().timestamp_millis();
        for _ in 0..500 {
            let (_, p) = g.next_event(now);
            d.decode(Some(&p), now, &mut cols).unwrap();
        }
        let mut bad = Generator::new(ProduceSpec {
            malformed_fraction: 1.0,
            ..spec()
        });
        for _ in 0..100 {
            let (_, p) = bad.next_event(now);
            assert!(d.decode(Some(&p), now, &mut cols).is_err());
        }
    }
}
