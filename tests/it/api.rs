//! The HTTP API end to end: events go in through `POST /v1/events` (real
//! tansu broker), `tally run` consumes them, and /v1/count, /v1/stats,
//! /v1/series and /v1/top answer exactly what an independent computation says.
//! Then `tally serve` answers the same from the same SQLite file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;

const READ: &str = "e2e-read-token-0123456789";
const WRITE: &str = "e2e-write-token-0123456789";

struct Ev {
    video: String,
    kind: String,
    t: i64,
    value: Option<i64>,
}

fn accepted(messages: &[Message]) -> Vec<(Vec<u8>, Ev)> {
    messages
        .iter()
        .filter_map(|m| match &m.expect {
            Expect::Accepted {
                video,
                kind,
                time_ms,
                value,
                ..
            } => Some((
                m.payload.clone(),
                Ev {
                    video: video.clone(),
                    kind: kind.clone(),
                    t: *time_ms,
                    value: *value,
                },
            )),
            Expect::Rejected { .. } => None,
        })
        .collect()
}

fn q(s: i64, e: i64) -> String {
    format!(
        "start={}&end={}",
        rfc3339(s).replace(':', "%3A"),
        rfc3339(e).replace(':', "%3A")
    )
}

pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
}

fn check_answers(api: std::net::SocketAddr, events: &[Ev], s: i64, e: i64) {
    let mut videos: BTreeMap<&str, usize> = BTreeMap::new();
    for ev in events {
        *videos.entry(ev.video.as_str()).or_default() += 1;
    }
    let in_range = |ev: &&Ev, v: &str, k: Option<&str>| {
        ev.video == v && k.is_none_or(|k| ev.kind == k) && ev.t >= s && ev.t < e
    };
    for v in videos.keys().take(12) {
        for k in [None, Some("view"), Some("like")] {
            let et = k.map(|k| format!("&event_type={k}")).unwrap_or_default();
            let want: Vec<&Ev> = events.iter().filter(|ev| in_range(ev, v, k)).collect();
            let got = get_json(
                api,
                &format!("/v1/count?video_id={v}{et}&{}", q(s, e)),
                Some(READ),
            );
            assert_eq!(got["count"], want.len() as i64, "count {v} {k:?}");
            assert!(got["as_of"].is_string(), "{got}");
            let vals: Vec<i64> = want.iter().filter_map(|e| e.value).collect();
            let sum = get_json(
                api,
                &format!("/v1/stats?video_id={v}{et}&function=sum&{}", q(s, e)),
                Some(READ),
            );
            assert_eq!(
                sum["value"].as_f64().unwrap(),
                vals.iter().sum::<i64>() as f64,
                "sum {v} {k:?}"
            );
            let max = get_json(
                api,
                &format!("/v1/stats?video_id={v}{et}&function=max&{}", q(s, e)),
                Some(READ),
            );
            assert_eq!(
                max["value"].as_f64(),
                vals.iter().max().map(|x| *x as f64),
                "max {v} {k:?}"
            );
            let avg = get_json(
                api,
                &format!("/v1/stats?video_id={v}{et}&function=avg&{}", q(s, e)),
                Some(READ),
            );
            let want_avg =
                (!vals.is_empty()).then(|| vals.iter().sum::<i64>() as f64 / vals.len() as f64);
            match want_avg {
                None => assert!(avg["value"].is_null(), "{avg}"),
                Some(a) => assert!(
                    (avg["value"].as_f64().unwrap() - a).abs() < 1e-9,
                    "avg {v} {k:?}"
                ),
            }
        }
    }
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    for ev in events.iter().filter(|ev| ev.t >= s && ev.t < e) {
        *totals.entry(ev.video.as_str()).or_default() += 1;
    }
    let mut want: Vec<(String, i64)> = totals
        .into_iter()
        .map(|(v, n)| (v.to_string(), n))
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    want.truncate(7);
    let top = get_json(api, &format!("/v1/top?limit=7&{}", q(s, e)), Some(READ));
    let got: Vec<(String, i64)> = top["videos"]
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
    assert_eq!(got, want, "top 7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_posted_over_http_are_answered_exactly() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("api");
    broker.create_topic(&topic, 2).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__API__READ_TOKENS", READ);
    env.set("TALLY__API__WRITE_TOKENS", WRITE);
    env.set("TALLY__VERIFY__INTERVAL", "1s");
    let api = env.api;
    let mut tally = Tally::start(&env);
    wait_http_ok(api, "/readyz", Duration::from_secs(60));

    // An invalid batch is refused whole: nothing reaches the topic.
    let now = chrono::Utc::now().timestamp_millis();
    let bad = format!(
        r#"[{{"video_id":"v1","event_type":"view","event_time":{now}}},{{"video_id":"v1","event_type":"view"}}]"#
    );
    let (st, body) = http(api, "POST", "/v1/events", Some(WRITE), bad.as_bytes());
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains(r#""index":1"#) && body.contains("missing_field"),
        "{body}"
    );
    assert_eq!(
        http(api, "POST", "/v1/events", Some(READ), b"[]").0,
        401,
        "a read token cannot write"
    );
    assert_eq!(
        broker.end_offsets(&topic, 2).values().sum::<i64>(),
        0,
        "nothing was produced"
    );

    // Valid events in JSON-array and NDJSON requests.
    let messages = dataset(23, 3_000, now);
    let events = accepted(&messages);
    for (i, chunk) in events.chunks(400).enumerate() {
        let payloads: Vec<String> = chunk
            .iter()
            .map(|(p, _)| String::from_utf8(p.clone()).unwrap())
            .collect();
        let body = if i % 2 == 0 {
            format!("[{}]", payloads.join(","))
        } else {
            payloads.join("\n")
        };
        let (st, resp) = http(api, "POST", "/v1/events", Some(WRITE), body.as_bytes());
        assert_eq!(st, 202, "{resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(v["accepted"], chunk.len() as i64);
    }
    let end = broker.end_offsets(&topic, 2);
    assert_eq!(
        end.values().sum::<i64>(),
        events.len() as i64,
        "acknowledged means on the broker"
    );
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;

    let evs: Vec<Ev> = events.into_iter().map(|(_, e)| e).collect();
    let newest = evs.iter().map(|e| e.t).max().unwrap();
    let oldest = evs.iter().map(|e| e.t).min().unwrap();
    // Whole range (hour tiers in the middle, minute edges), and a cut through the data.
    let (s, e) = (
        oldest - oldest.rem_euclid(60_000) - 7 * 60_000,
        newest - newest.rem_euclid(3_600_000) + 3_600_000,
    );
    check_answers(api, &evs, s, e);
    let cut = newest - newest.rem_euclid(60_000) - 5 * 60_000;
    check_answers(api, &evs, s, cut);

    // Series: hourly buckets for the busiest video add up.
    let busiest = &evs[0].video;
    let (hs, he) = (s - s.rem_euclid(3_600_000), e);
    let series = get_json(
        api,
        &format!(
            "/v1/series?video_id={busiest}&granularity=hour&{}",
            q(hs, he)
        ),
        Some(READ),
    );
    for p in series["points"].as_array().unwrap() {
        let b = chrono::DateTime::parse_from_rfc3339(p["start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let want = evs
            .iter()
            .filter(|ev| &ev.video == busiest && ev.t >= b && ev.t < b + 3_600_000)
            .count();
        assert_eq!(p["count"], want as i64, "bucket {b}");
    }

    // as_of reaches past the newest event once the partitions are read to the end.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get_json(
            api,
            &format!("/v1/count?video_id={busiest}&{}", q(s, e)),
            Some(READ),
        );
        let as_of = v["as_of"].as_str().map(|a| {
            chrono::DateTime::parse_from_rfc3339(a)
                .unwrap()
                .timestamp_millis()
        });
        if as_of.is_some_and(|a| a >= newest) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "as_of {as_of:?} never reached the newest event {newest}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Metrics agree with what was sent. The periodic verify (every 1 s) may
    // still be on its first run on a loaded machine: wait for it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (st, m) = loop {
        let (st, m) = http(api, "GET", "/metrics", None, b"");
        if st == 200 && metric(&m, "tally_verify_runs_total") >= 1.0 || Instant::now() > deadline {
            break (st, m);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(st, 200);
    let n = evs.len() as f64;
    assert_eq!(metric(&m, "tally_api_events_produced_total"), n);
    assert_eq!(metric(&m, "tally_api_events_invalid_total"), 1.0);
    assert_eq!(metric(&m, "tally_events_accepted_total"), n);
    assert_eq!(metric(&m, "tally_messages_consumed_total"), n);
    assert_eq!(
        metric(&m, "tally_events_rejected_total{reason=\"not_json\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "tally_events_late_total"),
        evs.len() as f64
            - messages
                .iter()
                .filter(|m| matches!(m.expect, Expect::Accepted { late: false, .. }))
                .count() as f64
    );
    assert!(metric(&m, "tally_batches_committed_total") >= 1.0);
    // Every metric deploy/ (alerts, dashboard) references is exported.
    crate::deploy::assert_exported(&m);
    // The process metrics and the build.
    assert!(metric(&m, "process_resident_memory_bytes") > 1e6);
    assert!(metric(&m, "process_cpu_seconds_total") > 0.0);
    assert!(metric(&m, "process_open_fds") >= 3.0);
    assert!(metric(&m, "process_threads") >= 2.0);
    let build = m
        .lines()
        .find(|l| l.starts_with("tally_build_info{"))
        .unwrap_or_else(|| panic!("no tally_build_info in\n{m}"));
    assert!(
        build.ends_with("} 1") && build.contains("version=\""),
        "{build}"
    );
    // `make` builds with the commit; a bare `cargo build` says unknown.
    if let Some(c) = std::env::var("TALLY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
    {
        assert!(build.contains(&format!("commit=\"{c}\"")), "{build}");
    }
    assert!(metric(&m, "tally_rollup_rows_merged_total") >= 1.0);
    assert!(metric(&m, "tally_raw_bytes_written_total") > 0.0);
    assert!(metric(&m, "tally_batch_commit_duration_seconds_count") >= 1.0);
    assert!(
        metric(
            &m,
            "tally_http_requests_total{route=\"/v1/events\",status=\"202\"}"
        ) >= 1.0
    );
    assert!(metric(&m, "tally_event_time_lag_seconds") < 60.0);
    assert!(!m.contains(busiest.as_str()), "no video id in any label");
    assert!(
        metric(&m, "tally_verify_runs_total") >= 1.0,
        "periodic verify ran"
    );
    assert_eq!(
        metric(&m, "tally_verify_drift_rows"),
        0.0,
        "no drift while live"
    );
    assert!(tally.stop().success(), "clean exit on SIGTERM");

    // `tally serve` answers the same from the same file (read replica), and
    // stays ready once the broker is gone: reads need only the store.
    let serve_port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], serve_port).into();
    let mut serve_env = env;
    serve_env.set("TALLY__API__LISTEN", &addr.to_string());
    serve_env.set("TALLY__API__REQUEST_TIMEOUT", "5s");
    let mut serve = Tally::serve(&serve_env);
    wait_http_ok(addr, "/livez", Duration::from_secs(30));
    check_answers(addr, &evs, s, e);
    wait_http_ok(addr, "/readyz", Duration::from_secs(30));
    drop(broker);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = http(addr, "GET", "/readyz", None, b"");
        assert_eq!(st, 200, "ready through a Kafka outage: {body}");
        if body.contains("unreachable") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never noticed the broker gone: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_answers(addr, &evs, s, e);
    assert_eq!(http(addr, "GET", "/livez", None, b"").0, 200);
    // With the broker gone, a produce fails inside the request timeout and
    // says how much the broker acknowledged (nothing).
    let one = format!(r#"[{{"video_id":"v1","event_type":"view","event_time":{now}}}]"#);
    let started = Instant::now();
    let (st, body) = http(addr, "POST", "/v1/events", Some(WRITE), one.as_bytes());
    assert_eq!(st, 503, "{body}");
    assert!(
        body.contains("produce_failed") && body.contains(r#""acknowledged":0"#),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the delivery failed within the 5 s request timeout"
    );
    assert!(
        serve.stop().success(),
        "tally serve exits cleanly on SIGTERM"
    );
}
