//! The PostgreSQL serving store (issue #6): the same exactness checks as the
//! SQLite tests, with `serving.url = postgres://…` on a real PostgreSQL.

use std::time::{Duration, Instant};

use tally_tests::*;

use crate::crash::committed_total;
use crate::e2e::verify_outputs_in;

fn pg_env(
    broker: &Broker,
    topic: &str,
    group: &str,
    data: &std::path::Path,
    pg: &PgStore,
    name: &str,
) -> TallyEnv {
    let mut env = TallyEnv::new(&broker.bootstrap(), topic, group, data);
    env.set("TALLY__SERVING__URL", &pg.url);
    env.set("TALLY__BATCH__MAX_ROWS", "600");
    env.set("TALLY__BATCH__LINGER", "150ms");
    env.log = data.join(format!("tally-{name}.log"));
    env
}

fn run_job(env: &TallyEnv, args: &[&str]) -> (bool, String) {
    let out = tally_command()
        .args(args)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `tally run` on PostgreSQL, SIGKILLed 4 times mid-ingest: rollups, archive
/// and DLQ exact. Then `tally verify` finds no drift, `tally backfill` changes
/// nothing, and `tally serve` reading the same database answers exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_survives_sigkills_and_serves_exact_answers() {
    let dir = test_dir();
    let pg = pg_store().await;
    let db = pg.path();
    let broker = Broker::start(dir.path());
    let topic = unique("pgkill");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(91, 12_000, now);
    let data = dir.path().join("data");
    let mut env = pg_env(&broker, &topic, &unique("g"), &data, &pg, "run");
    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        1_000,
        Duration::from_millis(800),
    );
    let mut tally = Tally::start(&env);
    let mut kills = 0;
    while kills < 4 {
        let before = committed_total(&db).await;
        if before >= messages.len() as i64 {
            break; // everything is in; later kills would not be mid-ingest
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed_total(&db).await <= before {
            assert!(
                Instant::now() < deadline,
                "nothing committed:\n{}",
                tally.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis([90, 400, 10, 250][kills])).await;
        tally.kill9();
        kills += 1;
        tally = Tally::start(&env);
    }
    assert!(kills >= 2, "only {kills} kills mid-ingest");
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 4);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());
    verify_outputs_in(&data, &db, &topic, &messages).await;

    // Jobs read the same store.
    let (from, to) = (
        rfc3339(now - now.rem_euclid(86_400_000) - 3 * 86_400_000),
        rfc3339(now - now.rem_euclid(3_600_000) + 3_600_000),
    );
    let (ok, out) = run_job(&env, &["verify", "--from", &from, "--to", &to]);
    assert!(ok, "verify on PostgreSQL finds no drift:\n{out}");
    let (ok, out) = run_job(&env, &["backfill", "--from", &from, "--to", &to]);
    assert!(ok, "backfill on PostgreSQL:\n{out}");
    verify_outputs_in(&data, &db, &topic, &messages).await;

    // A read replica on the same database, logged in as a SELECT-only role:
    // it starts, is ready and answers without writing anything (any write
    // would be refused).
    let role = unique("ro").replace('-', "_").to_lowercase();
    let admin = |stmts: Vec<String>| {
        let url = pg.url.clone();
        async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            for stmt in stmts {
                sqlx::query(sqlx::AssertSqlSafe(stmt))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }
    };
    admin(vec![
        format!("CREATE ROLE {role} LOGIN PASSWORD 'ro-secret-1'"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("REVOKE CREATE ON SCHEMA public FROM PUBLIC"),
    ])
    .await;
    let (_, rest) = pg.url.split_once('@').unwrap();
    env.set(
        "TALLY__SERVING__URL",
        &format!("postgres://{role}:ro-secret-1@{rest}"),
    );
    let serve = Tally::serve(&env);
    wait_http_ok(env.api, "/readyz", Duration::from_secs(30));
    for video in ["v001", "v002", "v003"] {
        let want = messages
            .iter()
            .filter(|m| matches!(&m.expect, Expect::Accepted { video: v, .. } if v == video))
            .count();
        let v = get_json(
            env.api,
            &format!("/v1/count?video_id={video}&start={from}&end={to}"),
            None,
        );
        assert_eq!(v["count"], want as i64, "{video}: {v}");
    }
    drop(serve);
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(!log.contains("ro-secret-1"), "no password in the log");
    admin(vec![
        format!("DROP OWNED BY {role}"),
        format!("DROP ROLE {role}"),
    ])
    .await;
    report_faults(&[("sigkill", kills)]);
}

/// Three `tally run` instances share one consumer group (cooperative-sticky
/// assignment) over a 6-partition topic and one PostgreSQL store; one is SIGKILLed midway and a fourth
/// joins. Every partition's archive is written by its owner; the final
/// rollups and archive are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_over_six_partitions_one_killed_one_added() {
    let dir = test_dir();
    let pg = pg_store().await;
    let db = pg.path();
    let broker = Broker::start(dir.path());
    let topic = unique("scale");
    broker.create_topic(&topic, 6).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(97, 18_000, now);
    let data = dir.path().join("data");
    let group = unique("g");
    let envs: Vec<TallyEnv> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let mut env = pg_env(&broker, &topic, &group, &data, &pg, n);
            env.set(
                "TALLY__KAFKA__PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY",
                "cooperative-sticky",
            );
            env
        })
        .collect();
    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        1_000,
        Duration::from_millis(700),
    );
    let mut a = Tally::start(&envs[0]);
    let mut b = Tally::start(&envs[1]);
    let mut c = Tally::start(&envs[2]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while committed_total(&db).await < 5_000 {
        assert!(
            Instant::now() < deadline,
            "not enough committed:\n{}",
            a.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.kill9();
    // The group notices the dead member after its session timeout (6 s here)
    // and moves its partitions. (tansu 0.6.0 keeps a dead member that a
    // rebalance started within its session timeout includes, so the new
    // member joins after that.)
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut d = Tally::start(&envs[3]);
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 6);
    wait_committed(&db, &topic, &end, Duration::from_secs(180), &mut a).await;
    for t in [&mut a, &mut c, &mut d] {
        assert!(t.stop().success(), "clean exit:\n{}", t.log_tail());
    }
    let logs: String = envs
        .iter()
        .map(|e| std::fs::read_to_string(&e.log).unwrap_or_default())
        .collect();
    assert!(!logs.contains("panicked"), "no panics");
    // Each live instance committed something.
    for (e, name) in [(&envs[0], "a"), (&envs[2], "c"), (&envs[3], "d")] {
        let log = std::fs::read_to_string(&e.log).unwrap_or_default();
        assert!(
            log.contains("partitions assigned"),
            "{name} was assigned partitions"
        );
    }
    verify_outputs_in(&data, &db, &topic, &messages).await;
    report_faults(&[("sigkill", 1), ("instances_joined", 4)]);
}

/// `tally backfill` on PostgreSQL, where a rollup recomputed once is
/// COPYed into its emptied windows: aborted inside its transaction it
/// changes nothing; run again it rewrites the shipped rollups exactly and
/// fills a new rollup's empty table with exactly the archive's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_inside_its_transaction_changes_nothing() {
    let dir = test_dir();
    let pg = pg_store().await;
    let db = pg.path();
    let broker = Broker::start(dir.path());
    let topic = unique("pgbf");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(93, 3_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    let data = dir.path().join("data");
    let mut env = pg_env(&broker, &topic, &unique("g"), &data, &pg, "run");
    let mut tally = Tally::start(&env);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());

    // A new rollup beside the shipped ones.
    let rollups = copy_of_rollups(dir.path());
    std::fs::copy(
        rollups.join("hour_video_events.sql"),
        rollups.join("new_hour_video_events.sql"),
    )
    .unwrap();
    env.set("TALLY__SQL__ROLLUPS_DIR", &rollups.display().to_string());
    let day = 86_400_000;
    let (from, to) = (
        rfc3339(now - now.rem_euclid(day) - day),
        rfc3339(now - now.rem_euclid(day) + day),
    );
    for rollup in ["hour_video_events", "new_hour_video_events"] {
        let out = tally_command()
            .args(["backfill", "--from", &from, "--to", &to, "--rollup", rollup])
            .envs(env.vars.iter().cloned())
            .env("TALLY_FAILPOINT", "inside_backfill_transaction")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && text.contains("failpoint reached"),
            "{rollup}: {text}"
        );
        verify_outputs_in(&data, &db, &topic, &messages).await;
        assert!(serving_rollup(&db, "new_hour_video_events")
            .await
            .is_empty());
    }
    for rollup in ["hour_video_events", "new_hour_video_events"] {
        let (ok, out) = run_job(
            &env,
            &["backfill", "--from", &from, "--to", &to, "--rollup", rollup],
        );
        assert!(ok, "{rollup}: {out}");
    }
    verify_outputs_in(&data, &db, &topic, &messages).await;
    assert_eq!(
        serving_rollup(&db, "new_hour_video_events").await,
        expected_rollup(&messages, 3_600_000),
        "a new rollup's history, COPYed"
    );
}
