//! `tally replay --file`: the pipeline without a broker. Exact against the
//! independent computation, a second replay changes nothing, and replays
//! killed with SIGKILL mid-flight resume without loss or double counting.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally_tests::*;

use crate::e2e::verify_outputs;

fn write_lines(path: &std::path::Path, messages: &[Message]) -> Vec<Message> {
    // One message per line: payloads with a line break cannot be framed.
    let kept: Vec<Message> =
        messages.iter().filter(|m| !m.payload.contains(&b'\n') && !m.payload.ends_with(b"\r")).cloned().collect();
    let mut text = Vec::new();
    for m in &kept {
        text.extend_from_slice(&m.payload);
        text.push(b'\n');
    }
    std::fs::write(path, text).unwrap();
    kept
}

fn replay(env: &TallyEnv, file: &std::path::Path) -> String {
    let out = Command::new(tally_bin()).args(["replay", "--file"]).arg(file).envs(env.vars.iter().cloned()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
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
    assert!(out.contains(&format!("{} messages", messages.len())), "{out}");
    verify_outputs(&data, "replay.events", &messages).await;
    let out = replay(&env, &file);
    assert!(out.contains(" 0 messages") && out.contains(&format!("{} lines committed before", messages.len())), "{out}");
    verify_outputs(&data, "replay.events", &messages).await;

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
        let mut child = Command::new(tally_bin())
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
    replay(&env, &file);
    verify_outputs(&data, "replay.big", &messages).await;
    report_faults(&[("sigkill", kills)]);
}

/// Deterministic, varied delays before each kill.
fn rand_ms(i: u64) -> u64 {
    [3, 41, 17, 88, 9][(i % 5) as usize]
}
