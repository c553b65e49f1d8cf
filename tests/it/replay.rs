//! `tally replay --file`: the pipeline without a broker. Exact against the
//! independent computation, a second replay changes nothing, and replays
//! killed with SIGKILL mid-flight resume without loss or double counting.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tally_tests::*;

use crate::e2e::verify_outputs;

fn write_lines(path: &std::path::Path, messages: &[Message]) -> Vec<Message> {
    // One message per line: payloads with a line break cannot be framed.
    let kept: Vec<Message> = messages
        .iter()
        .filter(|m| !m.payload.contains(&b'\n') && !m.payload.ends_with(b"\r"))
        .cloned()
        .collect();
    let mut text = Vec::new();
    for m in &kept {
        text.extend_from_slice(&m.payload);
        text.push(b'\n');
    }
    std::fs::write(path, text).unwrap();
    kept
}

/// The pseudo-topic a replay's output names (`<topic>: N messages …`).
fn topic_of(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.split_once(": ")
                .filter(|(_, r)| r.contains(" messages in "))
                .map(|(t, _)| t.to_string())
        })
        .unwrap()
}

fn replay(env: &TallyEnv, file: &std::path::Path) -> String {
    let out = tally_command()
        .args(["replay", "--file"])
        .arg(file)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_exact_idempotent_and_survives_sigkill() {
    let dir = test_dir();
    let now = chrono::Utc::now().timestamp_millis();

    // Straight through, then again (nothing new).
    let data = dir.path().join("data");
    let file = dir.path().join("events.jsonl");
    let messages = write_lines(&file, &dataset(5, 5_000, now));
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__BATCH__MAX_ROWS", "700");
    let out = replay(&env, &file);
    assert!(
        out.contains(&format!("{} messages", messages.len())),
        "{out}"
    );
    let topic = topic_of(&out);
    assert!(topic.starts_with("replay.events."), "{topic}");
    verify_outputs(&data, &topic, &messages).await;
    let out = replay(&env, &file);
    assert!(
        out.contains(" 0 messages")
            && out.contains(&format!("{} lines committed before", messages.len())),
        "{out}"
    );
    assert_eq!(topic_of(&out), topic);
    verify_outputs(&data, &topic, &messages).await;

    // Killed mid-flight (small batches, so it is mid-commit often), then resumed.
    let data = dir.path().join("data-kill");
    let file = dir.path().join("big.jsonl");
    let messages = write_lines(&file, &dataset(6, 30_000, now));
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__BATCH__MAX_ROWS", "150");
    let db = data.join("serving.db");
    let mut kills = 0;
    let mut last = 0;
    for _ in 0..4 {
        let mut child = tally_command()
            .args(["replay", "--file"])
            .arg(&file)
            .envs(env.vars.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until this incarnation committed a few more batches.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut done = false;
        loop {
            let committed = if db.exists() {
                // The schema may not exist yet right after the process started.
                try_serving_query_i64(&db, "SELECT topic, next_offset FROM tally_offsets")
                    .await
                    .map_or(0, |rows| rows.first().map_or(0, |r| r.1))
            } else {
                0
            };
            if child.try_wait().unwrap().is_some() {
                done = true;
                break;
            }
            if committed >= last + 1_500 {
                last = committed;
                break;
            }
            assert!(Instant::now() < deadline, "replay made no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rand_ms(kills as u64))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 3, "the replay was killed mid-flight {kills} times");
    let topic = topic_of(&replay(&env, &file));
    verify_outputs(&data, &topic, &messages).await;
    report_faults(&[("sigkill", kills)]);
}

/// Two files with the same name in different directories are two sources
/// (the second one's first lines used to be skipped as already committed);
/// `--source-id` names a source; a second replay of a source while one runs
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_identified_by_content_and_run_one_at_a_time() {
    let dir = test_dir();
    let now = chrono::Utc::now().timestamp_millis();
    let data = dir.path().join("data");
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    let mut all = Vec::new();
    let mut topics = Vec::new();
    for (day, seed) in [("day1", 31), ("day2", 32)] {
        std::fs::create_dir_all(dir.path().join(day)).unwrap();
        let file = dir.path().join(day).join("events.jsonl");
        let messages = write_lines(&file, &dataset(seed, 2_000, now));
        let out = replay(&env, &file);
        assert!(
            out.contains(&format!("{} messages", messages.len())),
            "{day}: every line is new: {out}"
        );
        topics.push(topic_of(&out));
        all.push(messages);
    }
    assert_ne!(topics[0], topics[1]);
    let db = data.join("serving.db");
    let offsets: std::collections::BTreeMap<String, i64> =
        serving_query_i64(&db, "SELECT topic, next_offset FROM tally_offsets")
            .await
            .into_iter()
            .collect();
    for (topic, messages) in topics.iter().zip(&all) {
        assert_eq!(
            offsets.get(topic),
            Some(&(messages.len() as i64)),
            "{topic}: {offsets:?}"
        );
    }
    let both: Vec<Message> = all.concat();
    assert_eq!(
        serving_rollup(&db, "hour_video_events").await,
        expected_rollup(&both, 3_600_000),
        "both files counted once"
    );

    // An explicit id, and a concurrent replay of it.
    let file = dir.path().join("big.jsonl");
    write_lines(&file, &dataset(33, 100_000, now));
    env.set("TALLY__BATCH__MAX_ROWS", "100");
    let mut first = tally_command()
        .args(["replay", "--source-id", "backfill-2026-11", "--file"])
        .arg(&file)
        .envs(env.vars.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = data.join("serving.db");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = try_serving_query_i64(
            &db,
            "SELECT topic, next_offset FROM tally_offsets WHERE topic = 'replay.backfill-2026-11'",
        )
        .await;
        if rows.is_ok_and(|r| r.first().is_some_and(|(_, n)| *n > 0)) {
            break;
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first replay ended before the second started"
        );
        assert!(
            Instant::now() < deadline,
            "the first replay made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = tally_command()
        .args(["replay", "--source-id", "backfill-2026-11", "--file"])
        .arg(&file)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        still_running,
        "the first replay (1,000 batches) was still running"
    );
    assert!(
        !out.status.success(),
        "a concurrent replay of one source is refused"
    );
    assert!(
        text.contains("another `tally replay` of replay.backfill-2026-11 is running"),
        "{text}"
    );
}

/// Deterministic, varied delays before each kill.
fn rand_ms(i: u64) -> u64 {
    [3, 41, 17, 88, 9][(i % 5) as usize]
}

/// A rollup whose SQL fails on some events (a CAST of "abc") used to stop
/// every batch holding one, for good. The batch is bisected: those events
/// are dead letters (`rollup_failed`, with DataFusion's message), and every
/// other event is counted and archived exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_rollup_fails_on_are_dead_letters_and_the_rest_commits() {
    let dir = test_dir();
    let now = chrono::Utc::now().timestamp_millis();
    let rollups = copy_of_rollups(dir.path());
    std::fs::write(
        rollups.join("hour_user_sum.sql"),
        "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS window_start, sum(CAST(user_id AS BIGINT)) AS user_sum \
         FROM events GROUP BY video_id, window_start",
    )
    .unwrap();
    let mut messages = dataset(41, 3_000, now);
    for i in [17, 1_234, 2_999] {
        let payload = format!(
            r#"{{"video_id":"v001","event_type":"view","event_time":{now},"user_id":"abc"}}"#
        );
        messages[i] = Message {
            key: "x".into(),
            payload: payload.into_bytes(),
            expect: Expect::Rejected {
                reason: "rollup_failed",
            },
        };
    }
    let file = dir.path().join("poison.jsonl");
    let messages = write_lines(&file, &messages);
    let data = dir.path().join("data");
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__BATCH__MAX_ROWS", "400");
    env.set("TALLY__SQL__ROLLUPS_DIR", &rollups.display().to_string());
    let out = replay(&env, &file);
    assert!(
        out.contains(&format!("{} messages", messages.len())),
        "{out}"
    );
    let topic = topic_of(&out);
    verify_outputs(&data, &topic, &messages).await;
    let rows = datafusion_rows(&[
        format!("CREATE EXTERNAL TABLE dlq STORED AS PARQUET LOCATION '{}/'", data.join("dlq").display()),
        "SELECT count(*) FROM dlq WHERE reason = 'rollup_failed' AND detail LIKE '%hour_user_sum%' AND payload LIKE '%abc%'".into(),
    ])
    .await;
    assert_eq!(rows[0][0], "3", "each names the rollup and keeps the event");
}
