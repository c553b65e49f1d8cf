//! Fault scenarios of issue #5 that run in `make test`: poison pills through
//! a real broker, a serving store locked by another process.

use std::time::Duration;

use tally_tests::*;

use crate::e2e::verify_outputs;

/// Hostile messages and the reason each must get in the dead-letter dataset.
fn poison(now_ms: i64) -> Vec<(Vec<u8>, &'static str)> {
    let t = now_ms;
    let ok = |extra: &str| {
        format!(r#"{{"video_id":"v001","event_type":"view","event_time":{t}{extra}}}"#).into_bytes()
    };
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    vec![
        (b"this is not json".to_vec(), "not_json"),
        (
            vec![b'{', b'"', b'v', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            "not_utf8",
        ),
        (b"".to_vec(), "empty"),
        // 4 MB: 4x librdkafka's default per-partition fetch size, 64x decode.max_event_bytes.
        // (tansu 0.6.0 stores an 8 MB or 10 MB record but never serves it: the partition
        // stalls before tally sees it. See README, "Poison pills".)
        (
            ok(&format!(r#","pad":"{}""#, "x".repeat(4_000_000))),
            "too_large",
        ),
        (deep(100_000).into_bytes(), "too_large"),
        (deep(30_000).into_bytes(), "not_object"),
        (
            format!(r#"{{"video_id":7,"event_type":"view","event_time":{t}}}"#).into_bytes(),
            "wrong_type",
        ),
        (
            format!(r#"{{"video_id":"v001","event_type":"view","event_time":{t},"value":"ten"}}"#)
                .into_bytes(),
            "wrong_type",
        ),
        (
            format!(r#"{{"event_type":"view","event_time":{t}}}"#).into_bytes(),
            "missing_field",
        ),
        (
            format!(
                r#"{{"video_id":"{}","event_type":"view","event_time":{t}}}"#,
                "v".repeat(60_000)
            )
            .into_bytes(),
            "invalid_value",
        ),
        (
            r#"{"video_id":"v001","event_type":"view","event_time":253402300799000}"#
                .as_bytes()
                .to_vec(),
            "future_event_time",
        ),
        (
            r#"{"video_id":"v001","event_type":"view","event_time":"9999-12-31T23:59:59Z"}"#
                .as_bytes()
                .to_vec(),
            "future_event_time",
        ),
        (
            r#"{"video_id":"v001","event_type":"view","event_time":0}"#
                .as_bytes()
                .to_vec(),
            "too_old",
        ),
        (
            r#"{"video_id":"v001","event_type":"view","event_time":"1970-01-01T00:00:00Z"}"#
                .as_bytes()
                .to_vec(),
            "too_old",
        ),
        (ok(r#","value":NaN"#), "not_json"),
        (ok(r#","value":Infinity"#), "not_json"),
        (ok(r#","value":1e999"#), "not_json"),
        (
            format!(
                r#"{{"video_id":"v001","video_id":"v002","event_type":"view","event_time":{t}}}"#
            )
            .into_bytes(),
            "duplicate_key",
        ),
        (
            format!(
                r#"{{"video_id":"v001","event_type":"view","event_type":"like","event_time":{t}}}"#
            )
            .into_bytes(),
            "duplicate_key",
        ),
        (b"[1,2,3]".to_vec(), "not_object"),
        (b"null".to_vec(), "not_object"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_go_to_the_dead_letter_dataset_and_partitions_keep_flowing() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("poison");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Valid events before, between and after the poison, on the same keys.
    let mut messages = dataset(41, 3_000, now);
    let pills = poison(now);
    let n = pills.len();
    for (i, (payload, reason)) in pills.into_iter().enumerate() {
        let at = (i + 1) * messages.len() / (n + 1);
        let key = if i % 2 == 0 { "v001" } else { "v002" };
        messages.insert(
            at,
            Message {
                key: key.into(),
                payload,
                expect: Expect::Rejected { reason },
            },
        );
    }
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    assert_eq!(
        end.values().sum::<i64>(),
        messages.len() as i64,
        "the broker took every message, 4 MB included"
    );

    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set(
        "TALLY__KAFKA__PROPERTIES__FETCH_MESSAGE_MAX_BYTES",
        "20000000",
    );
    let mut tally = Tally::start(&env);
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success(), "no crash: {}", tally.log_tail());
    // Rollups exact, archive exact, every pill in the DLQ once with its reason.
    verify_outputs(&data, &topic, &messages).await;
    // The DLQ keeps a bounded prefix of each payload, not 10 MB.
    let dlq_bytes: u64 = files_under(&data.join("dlq"))
        .iter()
        .map(|f| std::fs::metadata(data.join("dlq").join(f)).unwrap().len())
        .sum();
    assert!(
        dlq_bytes < 1 << 20,
        "dead letters are truncated ({dlq_bytes} bytes)"
    );
    report_faults(&[("poison_pills", n)]);
}

/// Another process holds the SQLite serving store locked (an exclusive write
/// transaction) for 12 s while events stream in: commits fail and retry with
/// backoff, offsets do not advance, consumption pauses (memory stays
/// bounded), and tally recovers by itself when the lock goes; counts exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_serving_store_retries_pauses_and_recovers() {
    use sqlx::Connection;
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("locked");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(51, 8_000, now);
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__MAX_ROWS", "400");
    let mut tally = Tally::start(&env);

    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        500,
        Duration::from_millis(600),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::crash::committed_total(&db).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing committed before the lock"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("PRAGMA busy_timeout = 10000")
        .execute(&mut lock)
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();
    let before = crate::crash::committed_total(&db).await;
    let rss_before = rss_kib(tally.child.id());
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = crate::crash::committed_total(&db).await;
    let rss_during = rss_kib(tally.child.id());
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    assert_eq!(
        during, before,
        "offsets do not advance while the store is locked"
    );
    assert!(
        rss_during < rss_before + 200 * 1024,
        "memory stays bounded: {rss_before} -> {rss_during} KiB"
    );

    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(
        log.contains("batch commit failed; retrying"),
        "commits were retried:\n{}",
        tally.log_tail()
    );
    verify_outputs(&data, &topic, &messages).await;
    report_faults(&[
        ("serving_store_locked_12s", 1),
        (
            "commit_retries",
            log.matches("batch commit failed; retrying").count(),
        ),
    ]);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// tansu (SQLite storage) is SIGKILLed mid-ingest and restarted 8 s later:
/// tally does not crash, `/readyz` turns 503 while the broker is down, and
/// after the restart every event is counted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_ingest() {
    let dir = test_dir();
    let mut broker = Broker::start(dir.path());
    let topic = unique("brokerkill");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(61, 6_000, now);
    let (first, second) = messages.split_at(3_000);
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, first).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::crash::committed_total(&db).await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing committed before the broker kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    broker.kill9();
    let api = env.api;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http(api, "GET", "/readyz", None, b"").0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed 200 with the broker down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        tally.child.try_wait().unwrap().is_none(),
        "tally survives the broker outage:\n{}",
        tally.log_tail()
    );
    broker.restart();
    produce(&broker.bootstrap(), &topic, second).await;
    let end = broker.end_offsets(&topic, 2);
    assert_eq!(
        end.values().sum::<i64>(),
        messages.len() as i64,
        "the broker kept every acknowledged message"
    );
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    wait_http_ok(api, "/readyz", Duration::from_secs(30));
    assert!(tally.stop().success());
    verify_outputs(&data, &topic, &messages).await;
    report_faults(&[("broker_kill9", 1)]);
}

/// Two `tally run` instances in one consumer group: one is stopped and
/// started every few seconds (rebalances), the other is frozen with SIGSTOP
/// until its partitions move, then resumed (a zombie). The offset fence and
/// the epochs keep every count exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_and_a_frozen_zombie_stay_exact() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("zombie");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(71, 16_000, now);
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let group = unique("g");
    let mut env_a = TallyEnv::new(&broker.bootstrap(), &topic, &group, &data);
    env_a.set("TALLY__BATCH__MAX_ROWS", "400");
    env_a.set("TALLY__BATCH__LINGER", "200ms");
    let mut env_b = TallyEnv::new(&broker.bootstrap(), &topic, &group, &data);
    env_b.set("TALLY__BATCH__MAX_ROWS", "400");
    env_b.set("TALLY__BATCH__LINGER", "200ms");
    env_b.log = data.join("tally-b.log");

    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        800,
        Duration::from_millis(1_500),
    );
    let mut a = Tally::start(&env_a);
    let mut b = Tally::start(&env_b);
    // Rebalances: B leaves and comes back three times.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(b.stop().success(), "B stops cleanly: {}", b.log_tail());
        tokio::time::sleep(Duration::from_secs(2)).await;
        b = Tally::start(&env_b);
    }
    // A zombie writer: a stale `tally run` (its own group, so tansu keeps
    // handing it partitions) pauses its next batch just before the serving
    // commit (TALLY_PAUSEPOINT) and is frozen there with SIGSTOP while B
    // commits past it; resumed, its commit must be refused by the offset fence
    // and it must carry on from the stored offsets. (tansu 0.6.0 does not
    // expire a frozen member's session, so a frozen group member keeps its
    // partitions; the fence is what protects the counts either way.)
    assert!(a.stop().success());
    let mut env_z = TallyEnv::new(&broker.bootstrap(), &topic, &unique("zombie"), &data);
    env_z.set("TALLY__BATCH__MAX_ROWS", "400");
    env_z.set("TALLY__BATCH__LINGER", "200ms");
    env_z.set("TALLY_PAUSEPOINT", "after_aggregate:3000");
    env_z.log = data.join("tally-zombie.log");
    a = Tally::start(&env_z);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&env_z.log)
        .unwrap_or_default()
        .contains("pausepoint reached")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the zombie never reached its pausepoint: {}",
            a.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signal = |sig: &str, pid: u32| {
        assert!(std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP", a.child.id());
    tokio::time::sleep(Duration::from_secs(6)).await;
    signal("-CONT", a.child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&env_z.log)
        .unwrap_or_default()
        .contains("batch fenced")
    {
        if std::time::Instant::now() > deadline {
            let grep = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        l.contains("assigned")
                            || l.contains("revoked")
                            || l.contains("fenced")
                            || l.contains("pausepoint")
                            || l.contains("rebalance")
                    })
                    .map(|l| l.chars().skip(30).take(200).collect::<String>())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "not fenced.\nZ:\n{}\nB:\n{}",
                grep(&env_z.log),
                grep(&env_b.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 4);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut b).await;
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the zombie survives its fencing: {}",
        a.log_tail()
    );
    assert!(a.stop().success() && b.stop().success());
    let logs = std::fs::read_to_string(&env_a.log).unwrap_or_default()
        + &std::fs::read_to_string(&env_b.log).unwrap_or_default()
        + &std::fs::read_to_string(&env_z.log).unwrap_or_default();
    eprintln!(
        "rebalance test: {} fenced batches, {} stale batches dropped",
        logs.matches("batch fenced").count(),
        logs.matches("dropping a batch from before a rebalance")
            .count()
    );
    verify_outputs(&data, &topic, &messages).await;
    report_faults(&[
        ("rebalances", logs.matches("partitions assigned").count()),
        ("zombie_sigstop", 1),
        ("fenced_commits", logs.matches("batch fenced").count()),
    ]);
}

/// Broker faults from librdkafka's mock cluster (in a helper process):
/// request errors on Fetch and OffsetCommit, a slow broker, a leaderless
/// partition, and the broker down for 30 s with events waiting. tally never
/// crashes, `/readyz` is 503 while the broker is down, the backlog drains
/// after it comes back, and the counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_broker_faults() {
    let dir = test_dir();
    let topic = unique("mock");
    let mut mock = MockBroker::start(&topic, 2);
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(81, 6_000, now);
    let parts: Vec<&[Message]> = messages.chunks(1_200).collect();
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&mock.bootstrap, &topic, &unique("g"), &data);
    env.set("TALLY__KAFKA__PROPERTIES__STATISTICS_INTERVAL_MS", "500");
    let mut tally = Tally::start(&env);
    let api = env.api;
    let lag = LagSampler::start(api);
    let mut sent = 0;
    let step = |tally_alive: &mut Tally, what: &str| {
        assert!(
            tally_alive.child.try_wait().unwrap().is_none(),
            "tally crashed during {what}:\n{}",
            tally_alive.log_tail()
        );
        eprintln!("fault step done: {what}");
    };

    // 1. Baseline.
    produce(&mock.bootstrap, &topic, parts[0]).await;
    sent += parts[0].len();
    wait_committed(
        &db,
        &topic,
        &end_offsets_at(&mock.bootstrap, &topic, 2),
        Duration::from_secs(60),
        &mut tally,
    )
    .await;
    // 2. Request errors on Fetch and OffsetCommit.
    mock.cmd("errors fetch 30");
    mock.cmd("errors offsetcommit 30");
    produce(&mock.bootstrap, &topic, parts[1]).await;
    sent += parts[1].len();
    wait_committed(
        &db,
        &topic,
        &end_offsets_at(&mock.bootstrap, &topic, 2),
        Duration::from_secs(60),
        &mut tally,
    )
    .await;
    step(&mut tally, "request errors");
    // 3. A slow broker (500 ms per request).
    mock.cmd("rtt 500");
    produce(&mock.bootstrap, &topic, parts[2]).await;
    sent += parts[2].len();
    wait_committed(
        &db,
        &topic,
        &end_offsets_at(&mock.bootstrap, &topic, 2),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    mock.cmd("rtt 0");
    step(&mut tally, "slow broker");
    // 4. Partition 1 without a reachable leader for 5 s (moved to broker 2, which goes down).
    mock.cmd("leader 1 2");
    mock.cmd("down 2");
    tokio::time::sleep(Duration::from_secs(5)).await;
    mock.cmd("up 2");
    mock.cmd("leader 1 1");
    produce(&mock.bootstrap, &topic, parts[3]).await;
    sent += parts[3].len();
    wait_committed(
        &db,
        &topic,
        &end_offsets_at(&mock.bootstrap, &topic, 2),
        Duration::from_secs(60),
        &mut tally,
    )
    .await;
    step(&mut tally, "leaderless partition");
    // 5. Events waiting, then the broker down for 30 s.
    produce(&mock.bootstrap, &topic, parts[4]).await;
    sent += parts[4].len();
    mock.cmd("down");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http(api, "GET", "/readyz", None, b"").0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed 200 with the broker down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        http(api, "GET", "/livez", None, b"").0,
        200,
        "alive while the broker is down"
    );
    step(&mut tally, "broker down 30 s");
    mock.cmd("up");
    produce(&mock.bootstrap, &topic, parts[5..].concat().as_slice()).await;
    sent += parts[5..].iter().map(|p| p.len()).sum::<usize>();
    assert_eq!(sent, messages.len());
    let end = end_offsets_at(&mock.bootstrap, &topic, 2);
    assert_eq!(end.values().sum::<i64>(), messages.len() as i64);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    wait_http_ok(api, "/readyz", Duration::from_secs(30));
    // The consumer lag rose during the faults and drains to zero.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while consumer_lag(api) != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "lag never drained: {:?}",
            consumer_lag(api)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let peak = lag.stop();
    assert!(
        peak > 0,
        "tally_consumer_lag_messages never rose during the faults"
    );
    eprintln!("peak consumer lag during the faults: {peak} messages; drained to 0");
    assert!(tally.stop().success());
    verify_outputs(&data, &topic, &messages).await;
    report_faults(&[
        ("fetch_errors", 30),
        ("offsetcommit_errors", 30),
        ("slow_broker", 1),
        ("leaderless_partition", 1),
        ("broker_outage_30s", 1),
    ]);
}

/// Sum of `tally_consumer_lag_messages` over partitions; `None` when the
/// metric has no partitions yet (or /metrics does not answer).
fn consumer_lag(api: std::net::SocketAddr) -> Option<i64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let body = String::from_utf8_lossy(&out);
    if body.get(9..12) != Some("200") {
        return None;
    }
    let values: Vec<i64> = body
        .lines()
        .filter(|l| l.starts_with("tally_consumer_lag_messages{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Samples the consumer lag every 250 ms in a thread; `stop` returns the peak.
struct LagSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<i64>,
}

impl LagSampler {
    fn start(api: std::net::SocketAddr) -> LagSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(consumer_lag(api).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        });
        LagSampler { stop, thread }
    }
    fn stop(self) -> i64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// A tolerant request: write errors (the server may close early, e.g. on an
/// oversized body) are ignored; `0` when no status line came back.
fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ctype = if method == "POST" {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n", body.len());
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .get(9..12)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// API abuse against `tally serve`: injection strings in every parameter,
/// a 1 MB id, absurd ranges and limits, an oversized body, wrong tokens and
/// 10,000 concurrent connections. Nothing crashes or answers 5xx, memory
/// stays bounded, the server answers normally afterwards, and the tables are
/// unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_abuse_leaves_server_and_tables_intact() {
    let dir = test_dir();
    let data = dir.path().join("data");
    let file = dir.path().join("seed.jsonl");
    let now = chrono::Utc::now().timestamp_millis();
    let seed: Vec<u8> = dataset(91, 3_000, now)
        .iter()
        .filter(|m| !m.payload.contains(&b'\n'))
        .flat_map(|m| m.payload.iter().copied().chain([b'\n']))
        .collect();
    std::fs::write(&file, seed).unwrap();
    let (read, write) = ("read-token-0123456789", "write-token-0123456789");
    let mut env = TallyEnv::new("127.0.0.1:1", "abuse", "g", &data);
    env.set("TALLY__API__READ_TOKENS", read);
    env.set("TALLY__API__WRITE_TOKENS", write);
    let out = std::process::Command::new(tally_bin())
        .args(["replay", "--file"])
        .arg(&file)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = data.join("serving.db");
    let counts = || async {
        let mut v = Vec::new();
        for t in [
            "minute_video_events",
            "hour_video_events",
            "day_video_events",
            "tally_offsets",
            "tally_files",
        ] {
            let sql: &'static str =
                Box::leak(format!("SELECT '{t}', count(*) FROM {t}").into_boxed_str());
            v.extend(serving_query_i64(&db, sql).await);
        }
        v
    };
    let before = counts().await;
    let mut serve = Tally::serve(&env);
    let api = env.api;
    wait_http_ok(api, "/livez", Duration::from_secs(30));
    let t = Some(read);
    let day = |ms: i64| rfc3339(ms - ms.rem_euclid(86_400_000));
    let (start, end) = (day(now), day(now + 86_400_000));
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut hit = |method: &str, path: &str, token: Option<&str>, body: &[u8]| {
        let s = raw(api, method, path, token, body);
        assert!(
            s != 0 && s < 500 || s == 503,
            "{method} {} -> {s}",
            &path[..path.len().min(120)]
        );
        *statuses.entry(s).or_default() += 1;
        s
    };

    // Injection strings in every parameter.
    let evil = [
        "' OR 1=1 --",
        "1; DROP TABLE hour_video_events; --",
        "\" UNION SELECT * FROM tally_offsets --",
        "%00",
        "../../etc/passwd",
        "${jndi:ldap://x}",
    ];
    for e in evil {
        let e = e
            .replace('%', "%25")
            .replace(' ', "%20")
            .replace('"', "%22")
            .replace('\'', "%27")
            .replace(';', "%3B")
            .replace('{', "%7B")
            .replace('}', "%7D");
        for (k, path) in [
            (
                "video_id",
                format!("/v1/count?video_id={e}&start={start}&end={end}"),
            ),
            (
                "event_type",
                format!("/v1/count?video_id=v001&event_type={e}&start={start}&end={end}"),
            ),
            (
                "start",
                format!("/v1/count?video_id=v001&start={e}&end={end}"),
            ),
            (
                "end",
                format!("/v1/count?video_id=v001&start={start}&end={e}"),
            ),
            (
                "function",
                format!("/v1/stats?video_id=v001&function={e}&start={start}&end={end}"),
            ),
            (
                "granularity",
                format!("/v1/series?video_id=v001&granularity={e}&start={start}&end={end}"),
            ),
            (
                "limit",
                format!("/v1/top?limit={e}&start={start}&end={end}"),
            ),
        ] {
            let s = hit("GET", &path, t, b"");
            assert!(s == 200 || s == 400, "{k}: {s}");
        }
    }
    // A 1 MB id, absurd ranges and limits.
    let big = "v".repeat(1 << 20);
    hit(
        "GET",
        &format!("/v1/count?video_id={big}&start={start}&end={end}"),
        t,
        b"",
    );
    assert_eq!(
        hit(
            "GET",
            "/v1/count?video_id=v001&start=0001-01-01T00:00:00Z&end=9999-12-31T00:00:00Z",
            t,
            b""
        ),
        400
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/top?limit=99999999999999999999999&start={start}&end={end}"),
            t,
            b""
        ),
        400
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/top?limit=-1&start={start}&end={end}"),
            t,
            b""
        ),
        400
    );
    // An oversized body, wrong and missing tokens.
    assert_eq!(
        hit("POST", "/v1/events", Some(write), &vec![b'x'; 20 << 20]),
        413
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/count?video_id=v001&start={start}&end={end}"),
            Some("wrong-token-0123456789"),
            b""
        ),
        401
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/count?video_id=v001&start={start}&end={end}"),
            None,
            b""
        ),
        401
    );
    assert_eq!(hit("POST", "/v1/events", Some(read), b"[]"), 401);

    // 10,000 concurrent connections (beyond api.max_connections = 4096 they are closed).
    let rss = |pid: u32| rss_kib(pid);
    let rss_before = rss(serve.child.id());
    let mut held = Vec::new();
    for _ in 0..10_000 {
        if let Ok(s) = std::net::TcpStream::connect(api) {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held = rss(serve.child.id());
    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "tally serve survived 10k connections"
    );
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        rss_held < rss_before + 512 * 1024,
        "memory bounded under 10k connections: {rss_before} -> {rss_held} KiB"
    );
    let (s, body) = http(
        api,
        "GET",
        &format!("/v1/count?video_id=v001&start={start}&end={end}"),
        t,
        b"",
    );
    assert_eq!(s, 200, "{body}");

    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "no crash:\n{}",
        serve.log_tail()
    );
    assert!(serve.stop().success());
    assert_eq!(counts().await, before, "tables intact");
    eprintln!("api abuse statuses: {statuses:?}");
    report_faults(&[
        ("hostile_requests", statuses.values().sum()),
        ("concurrent_connections", 10_000),
    ]);
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Write zeros into `path` until the file system says it is full.
fn fill_disk(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = f.sync_all();
    written
}

fn metric(api: std::net::SocketAddr, name: &str) -> f64 {
    let (status, body) = http(api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The data directory (archive, dead letters and the SQLite serving store)
/// is a 48 MB tmpfs, filled up mid-ingest: commits fail with ENOSPC and
/// retry (the error is logged and counted in `tally_commit_errors_total`),
/// offsets do not advance, DataFusion still reads the archive (nothing
/// partial is visible), and once space is freed tally resumes by itself and
/// every count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_surfaces_errors_and_resumes_when_space_is_freed() {
    disk_full(false).await;
}

/// The same with only the SQLite serving store on the full tmpfs, so the
/// failure is SQLITE_FULL inside the serving transaction (the archive write
/// succeeds). The failed connection must not poison the pool: tally resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_store_disk_full_inside_the_transaction_resumes() {
    disk_full(true).await;
}

async fn disk_full(store_only: bool) {
    let dir = test_dir();
    let data = dir.path().join("data");
    let full = if store_only {
        dir.path().join("store")
    } else {
        data.clone()
    };
    // The store-only disk holds the SQLite file and its WAL: with 64 KiB
    // pages the WAL grows to about 64 MiB before SQLite's first checkpoint.
    let _tmpfs = Tmpfs::mount(&full, if store_only { "96m" } else { "48m" });
    let broker = Broker::start(dir.path());
    let topic = unique("diskfull");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(81, 12_000, now);
    let (first, second) = messages.split_at(4_000);
    let db = full.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.log = dir.path().join("tally.log"); // not on the full disk
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    env.set("TALLY__SERVING__URL", &format!("sqlite://{}", db.display()));
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, first).await;
    let end_first = broker.end_offsets(&topic, 2);
    wait_committed(
        &db,
        &topic,
        &end_first,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;

    let filler = full.join("filler");
    let filled = fill_disk(&filler);
    assert!(filled > 0);
    produce(&broker.bootstrap(), &topic, second).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(env.api, "tally_commit_errors_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no commit error surfaced on a full disk:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = crate::crash::committed_total(&db).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = crate::crash::committed_total(&db).await;
    assert_eq!(
        during, before,
        "offsets do not advance while the disk is full"
    );
    assert_eq!(
        before,
        first.len() as i64,
        "nothing of the second half committed on a full disk"
    );
    assert!(
        tally.child.try_wait().unwrap().is_none(),
        "tally survives a full disk:\n{}",
        tally.log_tail()
    );
    // Whatever is visible in the archive is complete: DataFusion reads it all.
    let raw = data.join("raw/events");
    let rows = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION '{}/'",
            raw.display()
        ),
        "SELECT count(*) >= 0 FROM events".into(),
    ])
    .await;
    assert_eq!(rows[0][0], "true");
    // The first write to hit the full disk names the cause: the archive or
    // dead-letter writer reports ENOSPC, SQLite reports SQLITE_FULL.
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("batch commit failed"))
        .collect();
    assert!(
        failures
            .iter()
            .any(|l| l.contains("No space left on device")
                || l.contains("os error 28")
                || l.contains("database or disk is full")),
        "the error names the cause:\n{}",
        failures
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );

    std::fs::remove_file(&filler).unwrap();
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success(), "clean exit: {}", tally.log_tail());
    crate::e2e::verify_outputs_in(&data, &db, &topic, &messages).await;
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    if store_only {
        assert!(
            log.contains("database or disk is full"),
            "SQLite reported the full disk inside the transaction"
        );
    }
    report_faults(&[
        (
            if store_only {
                "serving_store_disk_full"
            } else {
                "disk_full"
            },
            1,
        ),
        (
            "commit_retries",
            log.matches("batch commit failed; retrying").count(),
        ),
    ]);
}
