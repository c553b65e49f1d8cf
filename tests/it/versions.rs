//! A rollup's SQL changed while events stream in and a client polls the API
//! (issue #25 §3): the new version is deployed beside the live one
//! (`hour_type_events@2.sql`), backfilled while live, compared, promoted
//! without a restart. Every answer before the promotion is the old SQL over
//! the events counted so far, every answer after it the new SQL, and no
//! request fails. Then the old version is retired and its tables dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_tests::*;

const V1: &str = "SELECT event_type, date_bin(INTERVAL '1 hour', event_time) AS window_start, count(*) AS events \
                  FROM events GROUP BY event_type, window_start";
/// The new definition: only events that carry a value (views, here).
const V2: &str = "SELECT event_type, date_bin(INTERVAL '1 hour', event_time) AS window_start, count(value) AS events \
                  FROM events GROUP BY event_type, window_start";

fn job(env: &TallyEnv, args: &[&str]) -> (bool, String) {
    let out = tally_command()
        .args(args)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Events per type in `[lo, hi)` under each definition.
fn expected(
    messages: &[Message],
    lo: i64,
    hi: i64,
) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
    for m in messages {
        if let Expect::Accepted {
            kind,
            time_ms,
            value,
            ..
        } = &m.expect
        {
            if *time_ms < lo || *time_ms >= hi {
                continue;
            }
            *old.entry(kind.clone()).or_insert(0) += 1;
            *new.entry(kind.clone()).or_insert(0) += i64::from(value.is_some());
        }
    }
    (old, new)
}

#[derive(Debug)]
struct Answer {
    status: u16,
    version: i64,
    events: BTreeMap<String, i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_version_is_deployed_backfilled_and_promoted_without_a_failed_request() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("versions");
    broker.create_topic(&topic, 3).await;
    let now = chrono::Utc::now().timestamp_millis();
    let day = 86_400_000;
    let (lo, hi) = (
        now - now.rem_euclid(day) - day,
        now - now.rem_euclid(day) + day,
    );
    let messages = dataset(61, 6_000, now);
    let (first, second) = messages.split_at(3_000);

    let rollups = copy_of_rollups(dir.path());
    std::fs::write(rollups.join("hour_type_events.sql"), V1).unwrap();
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__SQL__ROLLUPS_DIR", rollups.to_str().unwrap());
    let db = data.join("serving.db");

    // Version 1 counts the first half.
    produce(&broker.bootstrap(), &topic, first).await;
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 3),
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());

    // Deploy version 2 beside it: a restart of the writer.
    std::fs::write(rollups.join("hour_type_events@2.sql"), V2).unwrap();
    let (ok, out) = job(&env, &["check"]);
    assert!(ok && out.contains("hour_type_events@2"), "{out}");
    let mut tally = Tally::start(&env);
    wait_http_ok(env.api, "/readyz", Duration::from_secs(60));

    // A client polls the API from now to the end.
    let stop = Arc::new(AtomicBool::new(false));
    let api = env.api;
    let path = format!(
        "/v1/rollups/hour_type_events?start={}&end={}&group_by=event_type",
        rfc3339(lo),
        rfc3339(hi)
    );
    let poller = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut answers: Vec<Answer> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && answers.len() < 200_000
            {
                let (status, body) = http(api, "GET", &path, None, b"");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let events = v["rows"]
                    .as_array()
                    .map(|rows| {
                        rows.iter()
                            .map(|r| {
                                (
                                    r["event_type"].as_str().unwrap_or("").to_string(),
                                    r["events"].as_i64().unwrap_or(-1),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                answers.push(Answer {
                    status,
                    version: v["version"].as_i64().unwrap_or(0),
                    events,
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        })
    };

    // The second half streams in while version 2's history is backfilled.
    let stream = produce_in_background(
        &broker.bootstrap(),
        &topic,
        second,
        300,
        Duration::from_millis(100),
    );
    let (ok, out) = job(&env, &["backfill", "--rollup", "hour_type_events"]);
    assert!(ok, "{out}");
    assert!(out.contains("hour_type_events@2: backfilled"), "{out}");
    stream.await.unwrap();
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 3),
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    let (old, new) = expected(&messages, lo, hi);
    assert_ne!(old, new);

    // Before promotion the API answers version 1: the old SQL over every event.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get_json(api, &path, None);
        let got: BTreeMap<String, i64> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["event_type"].as_str().unwrap().to_string(),
                    r["events"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(v["version"], 1, "{v}");
        if got == old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "version 1 never reached the old SQL's answer: {got:?} vs {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The new version agrees where the definitions agree (views) and differs elsewhere.
    let (ok, out) = job(
        &env,
        &[
            "rollup",
            "diff",
            "hour_type_events",
            "--from",
            &rfc3339(lo),
            "--to",
            &rfc3339(hi),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(" differ") && !out.contains(" 0 differ"),
        "{out}"
    );
    let (ok, out) = job(&env, &["rollup", "status"]);
    assert!(ok && out.contains("100%"), "{out}");

    // Promote: no restart; the API switches within a second.
    let (ok, out) = job(&env, &["rollup", "promote", "hour_type_events"]);
    assert!(ok, "{out}");
    let promoted = Instant::now();
    loop {
        let v = get_json(api, &path, None);
        if v["version"] == 2 {
            break;
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(10),
            "not switched: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = poller.join().unwrap();

    // No request failed; versions only move forward; every version-1
    // answer is the old SQL over a prefix of the stream (never above the
    // total, never shrinking), every version-2 answer is the new SQL.
    assert!(answers.len() > 50, "{} answers", answers.len());
    eprintln!(
        "VERSIONS: {} answers polled while streaming, backfilling and promoting ({} from version 1, {} from version 2), {} failed",
        answers.len(),
        answers.iter().filter(|a| a.version == 1).count(),
        answers.iter().filter(|a| a.version == 2).count(),
        answers.iter().filter(|a| a.status != 200).count()
    );
    assert!(
        answers.iter().all(|a| a.status == 200),
        "failed requests: {:?}",
        answers
            .iter()
            .filter(|a| a.status != 200)
            .take(3)
            .collect::<Vec<_>>()
    );
    let switch = answers
        .iter()
        .position(|a| a.version == 2)
        .expect("no answer from version 2");
    assert!(answers[..switch].iter().all(|a| a.version == 1));
    assert!(answers[switch..].iter().all(|a| a.version == 2));
    for pair in answers[..switch].windows(2) {
        for (k, n) in &pair[0].events {
            assert!(
                pair[1].events.get(k).unwrap_or(&0) >= n,
                "a count went down: {pair:?}"
            );
        }
    }
    for a in &answers[..switch] {
        for (k, n) in &a.events {
            assert!(
                old.get(k).is_some_and(|o| n <= o),
                "{k}: {n} is more than the old SQL's {old:?}"
            );
        }
    }
    assert_eq!(answers[switch - 1].events, old);
    for a in &answers[switch..] {
        assert_eq!(
            a.events, new,
            "an answer after promotion is not the new SQL"
        );
    }

    // Retire version 1: refused while its file defines it, then dropped.
    let (ok, out) = job(&env, &["rollup", "drop", "hour_type_events@1"]);
    assert!(!ok && out.contains("delete the file"), "{out}");
    assert!(tally.stop().success());
    std::fs::remove_file(rollups.join("hour_type_events.sql")).unwrap();
    let (ok, out) = job(&env, &["rollup", "drop", "hour_type_events@1"]);
    assert!(ok, "{out}");
    let tables: Vec<(String, i64)> = serving_query_i64(
        &db,
        "SELECT name, 1 FROM sqlite_master WHERE type = 'table'",
    )
    .await;
    assert!(
        tables.iter().any(|(t, _)| t == "hour_type_events@2"),
        "{tables:?}"
    );
    assert!(
        !tables
            .iter()
            .any(|(t, _)| t == "hour_type_events" || t == "hour_type_events__delta"),
        "{tables:?}"
    );
    // The rollup is still served, from version 2.
    let serve = Tally::serve(&env);
    wait_http_ok(api, "/livez", Duration::from_secs(30));
    let v = get_json(api, &path, None);
    assert_eq!(v["version"], 2, "{v}");
    drop(serve);
}

/// `tally backfill --rollup NAME` of a new version, a day at a time, killed
/// after a chunk and inside a chunk's transaction: the rerun resumes after
/// the last recorded chunk, and the version's history equals the new SQL
/// over every event, computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_backfill_killed_mid_way_resumes_and_is_exact() {
    let dir = test_dir();
    let now = chrono::Utc::now().timestamp_millis();
    let hour = 3_600_000;
    let kinds = ["view", "like", "share"];
    // Four days of events, one every 7 minutes; views carry a value.
    let mut lines = Vec::new();
    let mut want: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    let mut t = now - 4 * 86_400_000;
    let mut i = 0;
    while t < now - 60_000 {
        let kind = kinds[i % 3];
        let value = if kind == "view" {
            format!(r#","value":{}"#, i % 50)
        } else {
            String::new()
        };
        lines.push(format!(
            r#"{{"video_id":"v{}","event_type":"{kind}","event_time":{t}{value}}}"#,
            i % 7
        ));
        let e = want
            .entry((kind.to_string(), t - t.rem_euclid(hour)))
            .or_default();
        e.0 += 1;
        e.1 += i64::from(kind == "view");
        t += 7 * 60_000;
        i += 1;
    }
    let (old_half, new_half) = lines.split_at(lines.len() / 2);
    let rollups = copy_of_rollups(dir.path());
    std::fs::write(rollups.join("hour_type_events.sql"), V1).unwrap();
    let data = dir.path().join("data");
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__SQL__ROLLUPS_DIR", rollups.to_str().unwrap());
    env.set("TALLY__STORAGE__ARCHIVE_ROLL_INTERVAL", "1s");
    let write = |name: &str, lines: &[String]| {
        let f = dir.path().join(name);
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        f
    };
    let (ok, out) = job(
        &env,
        &[
            "replay",
            "--file",
            write("a.jsonl", old_half).to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    // Version 2 deployed; the second half is counted by both versions.
    std::fs::write(rollups.join("hour_type_events@2.sql"), V2).unwrap();
    let (ok, out) = job(
        &env,
        &[
            "replay",
            "--file",
            write("b.jsonl", new_half).to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");

    let killed = |failpoint: &str| {
        let out = tally_command()
            .args(["backfill", "--rollup", "hour_type_events"])
            .envs(env.vars.iter().cloned())
            .env("TALLY_FAILPOINT", failpoint)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{failpoint}: the backfill was not killed"
        );
    };
    // Killed after its first chunk is recorded, then inside the next one.
    killed("after_backfill_chunk");
    let done = serving_query_i64(
        &data.join("serving.db"),
        "SELECT rollup, done_to_ms FROM tally_backfills",
    )
    .await;
    assert_eq!(done.len(), 1, "{done:?}");
    killed("inside_backfill_transaction");
    let again = serving_query_i64(
        &data.join("serving.db"),
        "SELECT rollup, done_to_ms FROM tally_backfills",
    )
    .await;
    assert_eq!(
        again, done,
        "a chunk killed inside its transaction records nothing"
    );
    let (ok, out) = job(&env, &["backfill", "--rollup", "hour_type_events"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("resumed at {}", rfc3339(done[0].1))),
        "{out}"
    );

    // The new version's history is the new SQL over every event.
    let got: BTreeMap<(String, i64), i64> = serving_query_i64(
        &data.join("serving.db"),
        "SELECT event_type || '@' || CAST(window_start AS TEXT), events FROM \"hour_type_events@2__merged\"",
    )
    .await
    .into_iter()
    .map(|(k, n)| {
        let (kind, w) = k.split_once('@').unwrap();
        ((kind.to_string(), w.parse().unwrap()), n)
    })
    .collect();
    let new: BTreeMap<(String, i64), i64> = want
        .iter()
        .map(|(k, (_, views))| (k.clone(), *views))
        .collect();
    assert_eq!(got, new);
    let (ok, out) = job(&env, &["rollup", "status"]);
    assert!(ok && out.contains("100%"), "{out}");
}
