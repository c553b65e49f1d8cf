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
}

struct Fixture {
    _dir: tempfile::TempDir,
    app: axum::Router,
    state: Arc<ApiState>,
    events: Vec<Ev>,
}

async fn fixture(extra_env: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), extra_env);
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
                r#"{{"video_id":"{}","event_type":"{}","event_time":{}{value}}}"#,
                e.video, e.kind, e.t
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

/// The same answers from a PostgreSQL serving store (same SQL, numbered
/// placeholders, BIGINT sums).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_answers_equal_brute_force() {
    let url = crate::testing::pg_database().await;
    let f = fixture(&[("TALLY__SERVING__URL", &url)]).await;
    check_count_and_stats(&f).await;
    check_series_and_top(&f).await;
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

#[tokio::test]
async fn bad_requests_are_400_and_name_the_parameter() {
    let f = fixture(&[]).await;
    let ok = range_q(NOW - D, NOW);
    let long_id = "x".repeat(257);
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("/v1/count?{ok}"), "missing_parameter", "video_id"),
        (
            "/v1/count?video_id=v1&end=2026-11-28T00:00:00Z".into(),
            "missing_parameter",
            "start",
        ),
        (
            format!(
                "/v1/count?video_id=v1&start=yesterday&end={}",
                enc(&fmt_time(NOW))
            ),
            "invalid_parameter",
            "start",
        ),
        (
            format!(
                "/v1/count?video_id=v1&start={}&end=2026-13-01T00:00:00Z",
                enc(&fmt_time(NOW))
            ),
            "invalid_parameter",
            "end",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW, NOW)),
            "invalid_range",
            "start",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW, NOW - H)),
            "invalid_range",
            "end",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW - 401 * D, NOW)),
            "range_too_long",
            "api.max_range",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW - D + 1_000, NOW)),
            "unaligned_range",
            "1d, 1h, 1m",
        ),
        (
            format!("/v1/count?video_id={long_id}&{ok}"),
            "invalid_parameter",
            "video_id",
        ),
        (
            format!("/v1/count?video_id=v1&event_type={long_id}&{ok}"),
            "invalid_parameter",
            "event_type",
        ),
        (
            format!("/v1/count?video_id=v1&video=v2&{ok}"),
            "unknown_parameter",
            "video",
        ),
        (
            format!("/v1/count?video_id=v1&video_id=v2&{ok}"),
            "invalid_parameter",
            "video_id",
        ),
        (
            format!("/v1/stats?video_id=v1&{ok}"),
            "missing_parameter",
            "function",
        ),
        (
            format!("/v1/stats?video_id=v1&function=median&{ok}"),
            "invalid_parameter",
            "function",
        ),
        (
            format!("/v1/series?video_id=v1&granularity=week&{ok}"),
            "invalid_parameter",
            "granularity",
        ),
        (
            format!(
                "/v1/series?video_id=v1&granularity=minute&{}",
                range_q(NOW - 30 * D, NOW)
            ),
            "range_too_long",
            "granularity",
        ),
        (
            format!(
                "/v1/series?video_id=v1&granularity=day&{}",
                range_q(NOW - D - H, NOW)
            ),
            "unaligned_range",
            "start",
        ),
        (
            format!("/v1/top?limit=1001&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            format!("/v1/top?limit=0&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            format!("/v1/top?limit=ten&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            "/v1/top?start=%FF&end=x".into(),
            "invalid_parameter",
            "start",
        ),
    ];
    for (uri, code, names) in cases {
        let (st, v) = get(&f.app, &uri).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(v["error"]["code"], code, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(names),
            "{uri}: message {msg:?} should name {names}"
        );
    }
    // SQL never comes from input: an injection string is just an unknown video.
    let evil = "v1'%3B%20DROP%20TABLE%20hour_video_events%3B--";
    let (st, v) = get(&f.app, &format!("/v1/count?video_id={evil}&{ok}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 0);
    let (st, v) = get(&f.app, &format!("/v1/count?video_id=v1&{ok}")).await;
    assert_eq!(st, StatusCode::OK, "the table is intact: {v}");
    let (st, v) = get(&f.app, "/v1/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn post_events_validates_all_or_nothing_with_the_pipeline_decoder() {
    let f = fixture(&[("TALLY__API__MAX_BODY", "2KiB")]).await;
    let now = chrono::Utc::now().timestamp_millis();
    let good = format!(r#"{{"video_id":"v1","event_type":"view","event_time":{now}}}"#);
    let body = format!(
        r#"[{good}, {{"video_id":"v1","event_type":"VIEW","event_time":{now}}}, {good}, "text", {{"event_type":"view","event_time":{now}}}]"#
    );
    let (st, v) = call(&f.app, "POST", "/v1/events", None, body.into_bytes()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_events");
    let listed: Vec<(i64, String)> = v["error"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_i64().unwrap(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, "invalid_value".into()),
            (3, "not_object".into()),
            (4, "missing_field".into())
        ]
    );
    let ndjson = format!("{good}\n{{not json\n");
    let (st, v) = call(&f.app, "POST", "/v1/events", None, ndjson.into_bytes()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["events"][0]["index"], 1);
    assert_eq!(v["error"]["events"][0]["reason"], "not_json");

    for (body, code) in [
        (Vec::new(), "invalid_body"),
        (b"[{}, ".to_vec(), "invalid_body"),
        (vec![b' '; 4096], "body_too_large"),
    ] {
        let (st, v) = call(&f.app, "POST", "/v1/events", None, body).await;
        assert!(
            st == StatusCode::BAD_REQUEST || st == StatusCode::PAYLOAD_TOO_LARGE,
            "{v}"
        );
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    let m = f.state.metrics.render(false, None, 0);
    assert!(m.contains("tally_api_events_invalid_total 4\n"), "{m}");
}

#[tokio::test]
async fn tokens_guard_reads_and_writes_separately() {
    let f = fixture(&[
        ("TALLY__API__READ_TOKENS", READ),
        ("TALLY__API__WRITE_TOKENS", WRITE),
    ])
    .await;
    let uri = format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW));
    let (st, v) = call(&f.app, "GET", &uri, None, Vec::new()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    assert_eq!(
        call(
            &f.app,
            "GET",
            &uri,
            Some("read-token-0123456788"),
            Vec::new()
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.app, "GET", &uri, Some(WRITE), Vec::new()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.app, "GET", &uri, Some(READ), Vec::new()).await.0,
        StatusCode::OK
    );
    let (st, _) = call(&f.app, "POST", "/v1/events", Some(READ), b"[{}]".to_vec()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = call(&f.app, "POST", "/v1/events", Some(WRITE), b"[{}]".to_vec()).await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "the write token passes; the event is invalid: {v}"
    );
    for open in ["/metrics", "/livez", "/openapi.json"] {
        assert_eq!(
            call(&f.app, "GET", open, None, Vec::new()).await.0,
            StatusCode::OK,
            "{open}"
        );
    }
    // Tokens never appear in the effective config.
    let shown = f.state.cfg.read_tokens.clone();
    assert!(!format!("{shown:?}").contains(READ));
}

#[tokio::test]
async fn overload_is_an_immediate_503_and_health_stays_open() {
    let f = fixture(&[("TALLY__API__MAX_CONCURRENCY", "2")]).await;
    let held = f.state.shed.clone().acquire_many_owned(2).await.unwrap();
    let (st, v) = get(
        &f.app,
        &format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW)),
    )
    .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "overloaded");
    assert_eq!(get(&f.app, "/livez").await.0, StatusCode::OK);
    drop(held);
    assert_eq!(
        get(
            &f.app,
            &format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW))
        )
        .await
        .0,
        StatusCode::OK
    );
    // Requests are counted by route template, never by id.
    let m = f.state.metrics.render(false, None, 0);
    assert!(
        m.contains("tally_http_requests_total{route=\"/v1/count\",status=\"503\"} 1"),
        "{m}"
    );
    assert!(!m.contains("v1\""), "no video id in labels: {m}");
    let (st, doc) = get(&f.app, "/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    for path in [
        "/v1/count",
        "/v1/stats",
        "/v1/series",
        "/v1/top",
        "/v1/events",
        "/metrics",
        "/livez",
        "/readyz",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let f = fixture(&[
        ("TALLY__API__LISTEN", listen.as_str()),
        ("TALLY__API__REQUEST_TIMEOUT", "1s"),
        ("TALLY__API__MAX_CONNECTIONS", "2"),
    ])
    .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = super::bind(f.state.clone(), async {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let server = tokio::spawn(server);
    let addr: std::net::SocketAddr = listen.parse().unwrap();

    // A client trickling its request head is disconnected after the timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHo").await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server kept a half-sent request open for 5 s"
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(900),
        "cut off too early: {:?}",
        t.elapsed()
    );

    // Two open connections fill api.max_connections = 2; a third is closed at once.
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(format!("GET /livez HTTP/1.1\r\nHost: {listen}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    a.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = c
        .write_all(format!("GET /livez HTTP/1.1\r\nHost: {listen}\r\n\r\n").as_bytes())
        .await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), c.read_to_end(&mut rest)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection was served: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // Graceful shutdown returns.
    let _ = stop_tx.send(());
    tokio::time::timeout(std::time::Duration::from_secs(15), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A write needs its token before the body is read, and a JSON content
/// type (a cross-origin page can send text/plain without a preflight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_authorized_first_and_need_a_json_content_type() {
    let f = fixture(&[
        ("TALLY__API__WRITE_TOKENS", WRITE),
        ("TALLY__API__MAX_BODY", "1KiB"),
    ])
    .await;
    // No token: 401 even for a body over the limit (it is never read).
    let (st, v) = call_with(
        &f.app,
        "POST",
        "/v1/events",
        None,
        &[("content-type", "application/json")],
        vec![b' '; 4096],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data"),
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let (st, v) = call_with(
            &f.app,
            "POST",
            "/v1/events",
            Some(WRITE),
            &headers,
            b"[{}]".to_vec(),
        )
        .await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{v}"
        );
    }
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "application/x-ndjson",
    ] {
        let (st, v) = call_with(
            &f.app,
            "POST",
            "/v1/events",
            Some(WRITE),
            &[("content-type", ct)],
            b"[{}]".to_vec(),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{ct}: passes the gate, the event is invalid: {v}"
        );
    }
}

/// A body of many invalid events lists the first 1,000 and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_listed_up_to_a_cap_and_counted() {
    let f = fixture(&[]).await;
    let body = "1\n".repeat(5_000).into_bytes();
    let (st, v) = call(&f.app, "POST", "/v1/events", None, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["events"].as_array().unwrap().len(), 1000);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("5000 of 5000 events are invalid"),
        "{v}"
    );
    let m = f.state.metrics.render(false, None, 0);
    assert!(m.contains("tally_api_events_invalid_total 5000\n"), "{m}");
}

/// DNS rebinding: a request addressed to a name the API is not known by gets 421.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_hosts_are_refused() {
    let f = fixture(&[]).await;
    let listen = f.state.cfg.listen;
    let ok = [
        listen.to_string(),
        "localhost".into(),
        format!("localhost:{}", listen.port()),
        "127.0.0.1".into(),
    ];
    for host in &ok {
        let (st, v) = call_with(&f.app, "GET", "/livez", None, &[("host", host)], Vec::new()).await;
        assert_eq!(st, StatusCode::OK, "{host}: {v}");
    }
    let (st, v) = call_with(
        &f.app,
        "GET",
        "/v1/count?video_id=v1",
        None,
        &[("host", "evil.example:8080")],
        Vec::new(),
    )
    .await;
    assert_eq!(st, StatusCode::MISDIRECTED_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.allowed_hosts"),
        "{v}"
    );
}

#[test]
fn host_rules_follow_the_listen_address_and_the_allow_list() {
    use super::http::host_allowed;
    let lo: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let v6: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
    assert!(host_allowed("127.0.0.1:8080", lo, &[]));
    assert!(host_allowed("localhost", lo, &[]));
    assert!(host_allowed("[::1]:8080", v6, &[]));
    assert!(!host_allowed("attacker.example", lo, &[]));
    assert!(!host_allowed("10.0.0.5:8080", lo, &[]));
    assert!(host_allowed(
        "tally.internal:8080",
        lo,
        &["tally.internal".into()]
    ));
    assert!(host_allowed("anything", any, &[]));
    assert!(!host_allowed("anything", any, &["tally.internal".into()]));
}

#[test]
fn half_protected_apis_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let warn =
        |env: &[(&str, &str)]| super::auth_warnings(&crate::testing::settings(dir.path(), env).api);
    assert!(warn(&[]).is_empty());
    assert!(warn(&[
        ("TALLY__API__READ_TOKENS", READ),
        ("TALLY__API__WRITE_TOKENS", WRITE)
    ])
    .is_empty());
    let w = warn(&[("TALLY__API__READ_TOKENS", READ)]);
    assert!(
        w.len() == 1 && w[0].contains("api.write_tokens is empty"),
        "{w:?}"
    );
    let w = warn(&[("TALLY__API__WRITE_TOKENS", WRITE)]);
    assert!(
        w.len() == 1 && w[0].contains("api.read_tokens is empty"),
        "{w:?}"
    );
    assert!(!w[0].contains(WRITE), "no token in the message");
}
