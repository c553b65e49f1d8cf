//! Seeded test events and the exact rollups they must give, computed here.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// One test message and what tally should make of it.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    Accepted {
        event_id: String,
        video: String,
        kind: String,
        time_ms: i64,
        value: Option<i64>,
        late: bool,
        user: String,
    },
    Rejected {
        reason: &'static str,
    },
}

/// A seeded dataset: valid events (some late, both time forms, unknown
/// fields) and malformed messages with the reason tally must give.
pub fn dataset(seed: u64, n: usize, now_ms: i64) -> Vec<Message> {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let kinds = ["view", "like", "share"];
    (0..n)
        .map(|i| {
            let video = format!("v{:03}", (rng.random_range(0..40u32) * rng.random_range(0..40u32)) / 40);
            let key = video.clone();
            let roll: f64 = rng.random();
            if roll < 0.04 {
                let (payload, reason): (String, &'static str) = match i % 6 {
                    0 => ("{\"video_id\": oops".into(), "not_json"),
                    1 => (format!(r#"{{"event_type":"view","event_time":{now_ms}}}"#), "missing_field"),
                    2 => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{now_ms},"value":"x"}}"#), "wrong_type"),
                    3 => (format!(r#"{{"video_id":"{video}","event_type":"VIEW","event_time":{now_ms}}}"#), "invalid_value"),
                    4 => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{}}}"#, now_ms + 3_600_000), "future_event_time"),
                    _ => (format!(r#"{{"video_id":"{video}","event_type":"view","event_time":{}}}"#, now_ms - 30 * 86_400_000), "too_old"),
                };
                return Message { key, payload: payload.into_bytes(), expect: Expect::Rejected { reason } };
            }
            let kind = kinds[rng.random_range(0..3)].to_string();
            let late = roll < 0.10;
            let back = if late { rng.random_range(30 * 60_000..3 * 3_600_000) } else { rng.random_range(0..20_000) };
            let time_ms = now_ms - back;
            let value = if kind == "view" { Some(rng.random_range(1..500i64)) } else { None };
            let event_id = format!("e{seed}-{i}");
            // Derived, not drawn: the rest of the dataset stays as it was.
            // Digits only: a test casts them (`replay::events_a_rollup_fails_on…`).
            let user = ((i as u64).wrapping_mul(2_654_435_761) % 900).to_string();
            let time = if i % 2 == 0 {
                time_ms.to_string()
            } else {
                format!("\"{}\"", chrono::DateTime::from_timestamp_millis(time_ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            };
            let value_s = value.map(|v| format!(r#","value":{v}"#)).unwrap_or_default();
            let payload = format!(
                r#"{{"event_id":"{event_id}","video_id":"{video}","event_type":"{kind}","event_time":{time}{value_s},"user_id":"{user}","unknown":{{"nested":[1,2]}}}}"#
            );
            Message { key, payload: payload.into_bytes(), expect: Expect::Accepted { event_id, video, kind, time_ms, value, late, user } }
        })
        .collect()
}

/// Expected rollup row: (count, sum, min, max) per (video, type, window start).
pub type Expected = BTreeMap<(String, String, i64), (i64, Option<i64>, Option<i64>, Option<i64>)>;

pub fn expected_rollup(messages: &[Message], width_ms: i64) -> Expected {
    let mut out: Expected = BTreeMap::new();
    for m in messages {
        if let Expect::Accepted {
            video,
            kind,
            time_ms,
            value,
            ..
        } = &m.expect
        {
            let w = time_ms - time_ms.rem_euclid(width_ms);
            let e = out
                .entry((video.clone(), kind.clone(), w))
                .or_insert((0, None, None, None));
            e.0 += 1;
            if let Some(v) = value {
                e.1 = Some(e.1.unwrap_or(0) + v);
                e.2 = Some(e.2.map_or(*v, |m| m.min(*v)));
                e.3 = Some(e.3.map_or(*v, |m| m.max(*v)));
            }
        }
    }
    out
}

/// The channel the tests' videos dimension (`tests/testdata/videos.csv`)
/// gives `video`, as `sql/rollups/hour_channel_events.sql` joins it.
pub fn channel_of(video: &str) -> String {
    let csv = std::fs::read_to_string(crate::test_videos_csv()).unwrap();
    csv.lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .find(|(v, _)| *v == video)
        .map_or_else(|| "unknown".to_string(), |(_, c)| c.to_string())
}

/// Expected `hour_channel_events`: (events, value sum) per
/// (channel, type, hour).
pub type ExpectedChannels = BTreeMap<(String, String, i64), (i64, Option<i64>)>;

pub fn expected_channel_rollup(messages: &[Message]) -> ExpectedChannels {
    let mut out = ExpectedChannels::new();
    add_channel_rollup(&mut out, messages, channel_of);
    out
}

/// Add `messages` to `out`, with `channel` mapping a video to its channel.
pub fn add_channel_rollup(
    out: &mut ExpectedChannels,
    messages: &[Message],
    channel: impl Fn(&str) -> String,
) {
    let mut channels: BTreeMap<String, String> = BTreeMap::new();
    for m in messages {
        if let Expect::Accepted {
            video,
            kind,
            time_ms,
            value,
            ..
        } = &m.expect
        {
            let channel = channels
                .entry(video.clone())
                .or_insert_with(|| channel(video))
                .clone();
            let w = time_ms - time_ms.rem_euclid(3_600_000);
            let e = out.entry((channel, kind.clone(), w)).or_insert((0, None));
            e.0 += 1;
            if let Some(v) = value {
                e.1 = Some(e.1.unwrap_or(0) + v);
            }
        }
    }
}

/// Exact answers for the sketch rollups, per (video, window start):
/// `day_video_uniques` (views, distinct viewers) and `hour_video_watch`
/// (the view values, sorted).
#[derive(Debug, Default)]
pub struct ExpectedSketches {
    pub uniques: BTreeMap<(String, i64), (i64, std::collections::BTreeSet<String>)>,
    pub watch: BTreeMap<(String, i64), Vec<f64>>,
}

pub fn expected_sketches(messages: &[Message]) -> ExpectedSketches {
    let mut out = ExpectedSketches::default();
    for m in messages {
        if let Expect::Accepted {
            video,
            kind,
            time_ms,
            value,
            user,
            ..
        } = &m.expect
        {
            if kind != "view" {
                continue;
            }
            let day = time_ms - time_ms.rem_euclid(86_400_000);
            let e = out.uniques.entry((video.clone(), day)).or_default();
            e.0 += 1;
            e.1.insert(user.clone());
            let hour = time_ms - time_ms.rem_euclid(3_600_000);
            let w = out.watch.entry((video.clone(), hour)).or_default();
            if let Some(v) = value {
                w.push(*v as f64);
            }
        }
    }
    for v in out.watch.values_mut() {
        v.sort_by(f64::total_cmp);
    }
    out
}
