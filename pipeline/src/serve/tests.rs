//! Contract tests: the real router over a real SQLite store seeded through
//! the real pipeline stages (decoder -> rollup SQL -> serving commit), with
//! every answer checked against a brute-force computation over the events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use serde_json::Value;
use tower::ServiceExt;

use super::http::{fmt_time, router};
use super::ApiState;
use crate::metrics::Metrics;

const M: i64 = 60_000;
const H: i64 = 60 * M;
const D: i64 = 24 * H;
/// 2026-11-28T00:00:00Z
const NOW: i64 = 1_795_824_000_000;
const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";

#[derive(Debug, Clone)]
struct Ev {
    video: String,
    kind: &'static str,
    t: i64,
    value: Option<f64>,
    user: u32,
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: axum::Router,
    state: Arc<ApiState>,
    events: Vec<Ev>,
}

async fn fixture(extra_env: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    // The videos dimension: v0..v9 in four channels, v10 in none.
    let videos = dir.path().join("videos.csv");
    let mut csv = String::from("video_id,channel_id\n");
    for i in 0..10 {
        csv.push_str(&format!("v{i},{}\n", channel_of(&format!("v{i}"))));
    }
    std::fs::write(&videos, csv).unwrap();
    let videos = videos.display().to_string();
    let mut env = vec![("TALLY__SQL__DIMENSIONS__VIDEOS", videos.as_str())];
    env.extend_from_slice(extra_env);
    let settings = crate::testing::settings(dir.path(), &env);
    // Three days before NOW, Zipf-ish videos, values on views only.
    let mut rng = ChaCha12Rng::seed_from_u64(7);
    let kinds = ["view", "like", "share"];
    let events: Vec<Ev> = (0..6000)
        .map(|_| {
            let a: u32 = rng.random_range(0..12);
            let b: u32 = rng.random_range(0..12);
            let kind = kinds[rng.random_range(0..3)];
            Ev {
                video: format!("v{}", a * b / 12),
                kind,
                t: NOW - 3 * D + rng.random_range(0..3 * D),
                value: (kind == "view").then(|| f64::from(rng.random_range(1..1000u32))),
                user: rng.random_range(0..1500),
            }
        })
        .collect();
    let payloads: Vec<String> = events
        .iter()
        .map(|e| {
            let value = e
                .value
                .map(|v| format!(r#","value":{v}"#))
                .unwrap_or_default();
            format!(
                r#"{{"video_id":"{}","event_type":"{}","event_time":{},"user_id":"u{}"{value}}}"#,
                e.video, e.kind, e.t, e.user
            )
        })
        .collect();
    // Committed in two batches, so merging is exercised too.
    let (catalog, schema) = crate::testing::seed(&settings, &payloads, NOW, 2).await;
    let state = ApiState::build(
        &settings,
        &catalog,
        &schema,
        Arc::new(Metrics::new()),
        false,
    )
    .await
    .unwrap();
    Fixture {
        _dir: dir,
        app: router(state.clone()),
        state,
        events,
    }
}

/// The channel the fixture's videos dimension gives `video`.
fn channel_of(video: &str) -> String {
    match video.trim_start_matches('v').parse::<u32>() {
        Ok(i) if i < 10 => format!("ch-{}", i % 4),
        _ => "unknown".into(),
    }
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let headers: &[(&str, &str)] = if method == "POST" {
        &[("content-type", "application/json")]
    } else {
        &[]
    };
    call_with(app, method, uri, token, headers, body).await
}

async fn call_with(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

async fn get(app: &axum::Router, uri: &str) -> (StatusCode, Value) {
    call(app, "GET", uri, None, Vec::new()).await
}

fn enc(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

fn range_q(s: i64, e: i64) -> String {
    format!("start={}&end={}", enc(&fmt_time(s)), enc(&fmt_time(e)))
}

fn brute<'a>(
    events: &'a [Ev],
    video: Option<&str>,
    kind: Option<&str>,
    s: i64,
    e: i64,
) -> impl Iterator<Item = &'a Ev> {
    let video = video.map(str::to_string);
    let kind = kind.map(str::to_string);
    events.iter().filter(move |ev| {
        video.as_deref().is_none_or(|v| ev.video == v)
            && kind.as_deref().is_none_or(|k| ev.kind == k)
            && ev.t >= s
            && ev.t < e
    })
}

fn random_range(rng: &mut ChaCha12Rng) -> (i64, i64) {
    let unit = [M, H, D][rng.random_range(0..3)];
    let span = 4 * D / unit;
    let a = rng.random_range(0..span);
    let b = rng.random_range(a + 1..=span);
    let base = NOW - 4 * D;
    (base + a * unit, base + b * unit)
}

#[tokio::test]
async fn count_and_stats_equal_brute_force_over_random_ranges() {
    check_count_and_stats(&fixture(&[]).await).await;
}

#[tokio::test]
async fn series_and_top_equal_brute_force() {
    check_series_and_top(&fixture(&[]).await).await;
}

/// With an index on every window (`serving.window_index`), ranges are read
/// through it instead of walking the leading key: the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_a_window_index_equal_brute_force() {
    let f = fixture(&[("TALLY__SERVING__WINDOW_INDEX", "true")]).await;
    check_count_and_stats(&f).await;
    check_series_and_top(&f).await;
    rollups::check_generic(&f).await;
}

/// The same answers from a PostgreSQL serving store (same SQL, numbered
/// placeholders, BIGINT sums).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_answers_equal_brute_force() {
    let url = crate::testing::pg_database().await;
    let f = fixture(&[("TALLY__SERVING__URL", &url)]).await;
    check_count_and_stats(&f).await;
    check_series_and_top(&f).await;
    rollups::check_generic(&f).await;
    crate::testing::drop_pg_database(&url).await;
}

async fn check_count_and_stats(f: &Fixture) {
    let mut rng = ChaCha12Rng::seed_from_u64(11);
    for _ in 0..120 {
        let video = format!("v{}", rng.random_range(0..11));
        let kind = [None, Some("view"), Some("like"), Some("share")][rng.random_range(0..4)];
        let (s, e) = random_range(&mut rng);
        // Minute-aligned edges on some ranges too.
        let (s, e) = if rng.random_bool(0.5) {
            (s + 7 * M, e + 13 * M)
        } else {
            (s, e)
        };
        let et = kind.map(|k| format!("&event_type={k}")).unwrap_or_default();
        let want: Vec<&Ev> = brute(&f.events, Some(&video), kind, s, e).collect();

        let (st, v) = get(
            &f.app,
            &format!("/v1/count?video_id={video}{et}&{}", range_q(s, e)),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(
            v["count"],
            want.len() as i64,
            "count {video} {kind:?} {s}..{e}"
        );
        assert_eq!(v["start"], fmt_time(s));
        assert_eq!(v["as_of"], fmt_time(NOW - 1000));

        let values: Vec<f64> = want.iter().filter_map(|e| e.value).collect();
        for (function, expected) in [
            ("count", Some(want.len() as f64)),
            ("sum", Some(values.iter().sum::<f64>())),
            (
                "avg",
                (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64),
            ),
            ("min", values.iter().copied().reduce(f64::min)),
            ("max", values.iter().copied().reduce(f64::max)),
        ] {
            let (st, v) = get(
                &f.app,
                &format!(
                    "/v1/stats?video_id={video}{et}&function={function}&{}",
                    range_q(s, e)
                ),
            )
            .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            match expected {
                None => assert!(v["value"].is_null(), "{function}: {v}"),
                Some(x) => {
                    let got = v["value"].as_f64().unwrap();
                    assert!(
                        (got - x).abs() < 1e-6 * x.abs().max(1.0),
                        "{function}: got {got}, want {x}"
                    );
                }
            }
            assert_eq!(v["count"], want.len() as i64);
            assert_eq!(v["value_count"], values.len() as i64);
        }
    }
}

async fn check_series_and_top(f: &Fixture) {
    let (s, e) = (NOW - 3 * D, NOW);
    for (g, width) in [("hour", H), ("day", D)] {
        let (st, v) = get(
            &f.app,
            &format!(
                "/v1/series?video_id=v0&event_type=view&granularity={g}&{}",
                range_q(s, e)
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let points = v["points"].as_array().unwrap();
        assert_eq!(points.len() as i64, (e - s) / width);
        for (i, p) in points.iter().enumerate() {
            let b = s + i as i64 * width;
            let want: Vec<&Ev> = brute(&f.events, Some("v0"), Some("view"), b, b + width).collect();
            assert_eq!(p["start"], fmt_time(b));
            assert_eq!(p["count"], want.len() as i64, "bucket {b}");
            let vals: Vec<f64> = want.iter().filter_map(|e| e.value).collect();
            assert_eq!(p["sum"].as_f64().unwrap(), vals.iter().sum::<f64>());
            assert_eq!(p["min"].as_f64(), vals.iter().copied().reduce(f64::min));
        }
    }
    // A minute series over two hours, all event types.
    let (ms, me) = (NOW - D + 5 * M, NOW - D + 2 * H + 5 * M);
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/series?video_id=v1&granularity=minute&{}",
            range_q(ms, me)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let total: i64 = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_i64().unwrap())
        .sum();
    assert_eq!(
        total,
        brute(&f.events, Some("v1"), None, ms, me).count() as i64
    );

    for (kind, s, e) in [
        (Some("like"), NOW - 2 * D + 3 * M, NOW - 5 * H),
        (None, NOW - 3 * D, NOW),
    ] {
        let et = kind.map(|k| format!("&event_type={k}")).unwrap_or_default();
        let (st, v) = get(&f.app, &format!("/v1/top?limit=5{et}&{}", range_q(s, e))).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for ev in brute(&f.events, None, kind, s, e) {
            *counts.entry(ev.video.as_str()).or_default() += 1;
        }
        let mut want: Vec<(&str, i64)> = counts.into_iter().collect();
        want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        want.truncate(5);
        let got: Vec<(String, i64)> = v["videos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["video_id"].as_str().unwrap().to_string(),
                    x["count"].as_i64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, i64)> = want.into_iter().map(|(a, b)| (a.to_string(), b)).collect();
        assert_eq!(got, want);
    }
}

mod reports;
mod requests;
mod rollups;
mod sql;
