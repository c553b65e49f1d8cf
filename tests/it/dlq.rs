//! `tally dlq replay`: events rejected under a too strict schema are counted
//! after the fix, exactly once, through crashes at each step of the commit,
//! and a second replay counts nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use tally_tests::*;

/// The default config's `[schema]` with `event_type` limited to view and
/// like: every share is rejected as `invalid_value`.
fn strict_config(dir: &std::path::Path) -> std::path::PathBuf {
    let default = std::fs::read_to_string(workspace_root().join("configs/default.toml")).unwrap();
    let start = default.find("[schema]").unwrap();
    let end = start + default[start..].find("\n[sql]").unwrap();
    let schema = default[start..end].replace("^[a-z0-9_]{1,64}$", "^(view|like)$");
    assert_ne!(
        schema,
        default[start..end],
        "the pattern to tighten is in default.toml"
    );
    let path = dir.join("strict.toml");
    std::fs::write(&path, schema).unwrap();
    path
}

fn dlq_replay(env: &TallyEnv, failpoint: Option<&str>) -> (bool, String) {
    let mut cmd = tally_command();
    cmd.args(["dlq", "replay", "--reason", "invalid_value"])
        .envs(env.vars.iter().cloned())
        .env("TALLY__BATCH__MAX_ROWS", "40");
    if let Some(p) = failpoint {
        cmd.env("TALLY_FAILPOINT", p);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_after_a_fix_count_exactly_once() {
    replay_after_a_fix(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_after_a_fix_count_exactly_once_on_postgres() {
    let pg = pg_store().await;
    replay_after_a_fix(Some(&pg)).await;
}

async fn replay_after_a_fix(pg: Option<&PgStore>) {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("dlq");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(53, 2_000, now);
    let shares = messages
        .iter()
        .filter(|m| matches!(&m.expect, Expect::Accepted { kind, .. } if kind == "share"))
        .count();
    assert!(shares > 200, "{shares} shares");
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set(
        "TALLY_CONFIG",
        &strict_config(dir.path()).display().to_string(),
    );
    let db = match pg {
        Some(pg) => {
            env.set("TALLY__SERVING__URL", &pg.url);
            pg.path()
        }
        None => data.join("serving.db"),
    };
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());

    // The fix: the default schema. A replay killed at each step of its commit
    // (files written; rollups merged, not committed; committed), then whole.
    env.vars.retain(|(k, _)| k != "TALLY_CONFIG");
    // A dry run says what a replay would count, and writes nothing.
    let out = tally_command()
        .args(["dlq", "replay", "--reason", "invalid_value", "--dry-run"])
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let dry = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{dry}");
    assert!(
        dry.contains(&format!("{shares} accepted now")) && dry.contains("dry run"),
        "{dry}"
    );
    let none: Vec<(String, i64)> = serving_query_i64(
        &db,
        "SELECT topic, count(*) FROM tally_dlq_replayed GROUP BY topic",
    )
    .await;
    assert!(none.is_empty(), "a dry run recorded {none:?}");
    for point in [
        "after_archive_write",
        "inside_serving_transaction",
        "after_serving_commit",
    ] {
        let (ok, text) = dlq_replay(&env, Some(point));
        assert!(!ok, "the failpoint {point} should abort the replay: {text}");
        assert!(text.contains("failpoint reached"), "{point}: {text}");
    }
    let (ok, text) = dlq_replay(&env, None);
    assert!(ok, "{text}");
    eprintln!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("dead letters"))
            .unwrap_or_default()
    );
    let still_invalid = messages
        .iter()
        .filter(|m| {
            matches!(
                m.expect,
                Expect::Rejected {
                    reason: "invalid_value"
                }
            )
        })
        .count();
    assert!(
        text.contains(&format!(
            "{still_invalid} still rejected: invalid_value {still_invalid}"
        )),
        "{text}"
    );
    // Once more: everything was counted already.
    let (ok, again) = dlq_replay(&env, None);
    assert!(ok, "{again}");
    eprintln!(
        "{}",
        again
            .lines()
            .find(|l| l.starts_with("dead letters"))
            .unwrap_or_default()
    );
    assert!(again.contains(" 0 accepted now"), "{again}");
    assert!(
        again.contains(&format!("{} counted by an earlier replay", shares)),
        "{again}"
    );

    // A reason that does not exist is a usage error naming the valid ones.
    let out = tally_command()
        .args(["dlq", "replay", "--reason", "typo"])
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--reason \"typo\"") && err.contains("invalid_value"),
        "{err}"
    );

    // Every rollup as if the fix had always been there.
    for (table, width) in [
        ("minute_video_events", 60_000),
        ("hour_video_events", 3_600_000),
        ("day_video_events", 86_400_000),
    ] {
        assert_eq!(
            serving_rollup(&db, table).await,
            expected_rollup(&messages, width),
            "{table}"
        );
    }
    let accepted = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .count() as i64;
    let counters: BTreeMap<String, i64> =
        serving_query_i64(&db, "SELECT name, value FROM tally_counters")
            .await
            .into_iter()
            .collect();
    assert_eq!(counters.get("accepted_total"), Some(&accepted));
    assert_eq!(counters.get("dlq_replayed_total"), Some(&(shares as i64)));
    assert_eq!(
        counters.get("messages_total"),
        Some(&(messages.len() as i64))
    );
    // The archive holds every accepted event once, the replayed ones too.
    let rows = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION '{}/'",
            data.join("raw/events").display()
        ),
        "SELECT count(*), count(DISTINCT event_id) FROM events".into(),
    ])
    .await;
    assert_eq!(rows[0], vec![accepted.to_string(), accepted.to_string()]);
}
