//! Never silently wrong (issue #22): the ways tally used to lose data, skip
//! messages or leak secrets while looking healthy. Each test ends with the
//! full exactness check where data flows (rollups, archive exactly once,
//! dead letters, no orphan files).

use std::time::{Duration, Instant};

use tally_tests::*;

use crate::e2e::verify_outputs_in;

fn run_job(env: &TallyEnv, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = tally_command()
        .args(args)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    (
        out.status,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Wait for a `tally run` to exit by itself; its status.
fn wait_exit(tally: &mut Tally, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = tally.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "tally kept running:\n{}",
            tally.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn archive_files(data: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = ["raw", "dlq"]
        .iter()
        .flat_map(|sub| {
            files_under(&data.join(sub))
                .into_iter()
                .map(move |f| format!("{sub}/{}", f.display()))
        })
        .collect();
    out.sort();
    out
}

/// PostgreSQL applies a batch's COMMIT and the connection drops before the
/// reply (a proxy hangs up right after forwarding it). The retry is fenced
/// by its own commit: it must count it once and keep the committed archive
/// files it rewrote (it used to delete them: the archive then lacked events
/// the rollups counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_reply_is_resolved_and_the_archive_stays_exact() {
    let dir = test_dir();
    let pg = pg_store().await;
    let db = pg.path();
    let broker = Broker::start(dir.path());
    let topic = unique("lostreply");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(221, 6_000, now);
    let data = dir.path().join("data");
    // Every 7th COMMIT from the 7th loses its reply (schema setup and the
    // first batches pass), up to 8 of them. An odd period: a batch's commit
    // and its files' rename (a COMMIT of its own) alternate, and an even one
    // would only ever hit the renames.
    let proxy = CommitDropProxy::start("127.0.0.1:5432".parse().unwrap(), |n| {
        n >= 7 && n % 7 == 0 && n <= 56
    });
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__SERVING__URL", &proxy.url(&pg.url));
    env.set("TALLY__BATCH__MAX_ROWS", "300");
    env.set("TALLY__BATCH__LINGER", "100ms");
    env.set("TALLY__VERIFY__INTERVAL", "0s");
    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        500,
        Duration::from_millis(300),
    );
    let mut tally = Tally::start(&env);
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(180), &mut tally).await;
    assert!(tally.stop().success(), "clean exit:\n{}", tally.log_tail());
    // Exact first (without the fix the archive lacks committed events), then how.
    verify_outputs_in(&data, &db, &topic, &messages).await;
    let dropped = proxy.dropped.load(std::sync::atomic::Ordering::SeqCst);
    assert!(dropped >= 3, "only {dropped} commit replies were dropped");
    let log = std::fs::read_to_string(&env.log).unwrap();
    let resolved = log
        .matches("had committed this batch; counting it once")
        .count();
    assert!(
        resolved >= 1,
        "no lost reply hit a batch commit ({dropped} dropped):\n{}",
        tally.log_tail()
    );

    report_faults(&[
        ("commit_reply_lost", dropped),
        ("batch_commit_resolved", resolved),
    ]);
}

/// The serving store is deleted under a running deployment. `tally run`
/// must refuse to start (it used to re-read from Kafka's group offset and
/// then delete every archive file the new store did not list), saying what
/// happened and how to recover, and delete nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_serving_store_never_deletes_an_archive_file() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("loststore");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let first = dataset(231, 2_000, now);
    produce(&broker.bootstrap(), &topic, &first).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "1s");
    let db = data.join("serving.db");
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 2),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    let before = archive_files(&data);
    assert!(!before.is_empty());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(data.join(format!("serving.db{suffix}")));
    }
    produce(&broker.bootstrap(), &topic, &dataset(232, 500, now)).await;
    let mut again = Tally::start(&env);
    let status = wait_exit(&mut again, Duration::from_secs(60));
    assert!(!status.success());
    let log = std::fs::read_to_string(&env.log).unwrap();
    assert!(
        log.contains(&format!(
            "holds no offsets for topic `{topic}`, but the archive"
        )),
        "{}",
        again.log_tail()
    );
    assert!(
        log.contains("tally rebuild"),
        "the message names the recovery"
    );
    // Give a (wrongly) started sweeper its chance, then compare.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(archive_files(&data), before, "no archive file disappeared");
    report_faults(&[("serving_store_deleted", 1)]);
}

/// The topic is deleted and created again: the store's offsets are beyond
/// the new log's end. tally used to skip every new message as "already
/// committed", silently. Now it stops naming the partition and both
/// offsets; `tally offsets show` flags it; `tally offsets reset --to
/// earliest` resumes, and the new events are counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_not_silently_skipped() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("recreated");
    broker.create_topic(&topic, 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    let old = dataset(241, 1_000, now);
    produce(&broker.bootstrap(), &topic, &old).await;
    let data = dir.path().join("data");
    let env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    let db = data.join("serving.db");
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 1),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    for r in admin
        .delete_topics(&[&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.create_topic(&topic, 1).await;
    // Valid events only: the new log reuses offsets 0..499, and the
    // dead-letter check counts one dead letter per (partition, offset).
    let new: Vec<Message> = dataset(242, 520, now)
        .into_iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .take(500)
        .collect();
    produce(&broker.bootstrap(), &topic, &new).await;
    assert_eq!(
        broker.end_offsets(&topic, 1)[&0],
        500,
        "the topic starts again at offset 0"
    );

    let mut stopped = Tally::start(&env);
    let status = wait_exit(&mut stopped, Duration::from_secs(60));
    assert!(!status.success());
    let log = std::fs::read_to_string(&env.log).unwrap();
    assert!(
        log.contains(&format!("topic `{topic}` partition 0: the serving store's next offset 1000 is beyond the end of the log (high watermark 500")),
        "{}",
        stopped.log_tail()
    );
    assert!(log.contains(&format!(
        "tally offsets reset --topic {topic} --partition 0 --to earliest"
    )));

    let (status, out) = run_job(&env, &["offsets", "show"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("beyond the end of the log"), "{out}");
    let (status, out) = run_job(
        &env,
        &[
            "offsets",
            "reset",
            "--topic",
            &topic,
            "--partition",
            "0",
            "--to",
            "earliest",
        ],
    );
    assert!(status.success(), "{out}");
    assert!(out.contains("next offset 1000 -> 0"), "{out}");

    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 1),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    let all: Vec<Message> = old.iter().chain(new.iter()).cloned().collect();
    verify_outputs_in(&data, &db, &topic, &all).await;
    report_faults(&[("topic_recreated", 1)]);
}

/// A NUL inside a string field used to be accepted and then refused by
/// PostgreSQL on every retry, stalling every partition. It is a dead letter
/// (`invalid_value`) and the rest is counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_string_is_a_dead_letter_not_a_stalled_store() {
    let dir = test_dir();
    let pg = pg_store().await;
    let db = pg.path();
    let broker = Broker::start(dir.path());
    let topic = unique("nul");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut messages = dataset(251, 5_000, now);
    for (i, field) in [(1_234, "video_id"), (3_210, "user_id")] {
        let payload = if field == "video_id" {
            format!(r#"{{"video_id":"a\u0000b","event_type":"view","event_time":{now}}}"#)
        } else {
            format!(
                r#"{{"video_id":"v1","event_type":"view","event_time":{now},"user_id":"x\u0000"}}"#
            )
        };
        messages[i] = Message {
            key: "nul".into(),
            payload: payload.into_bytes(),
            expect: Expect::Rejected {
                reason: "invalid_value",
            },
        };
    }
    produce(&broker.bootstrap(), &topic, &messages).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__SERVING__URL", &pg.url);
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 2),
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    verify_outputs_in(&data, &db, &topic, &messages).await;
    let rows = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE dlq STORED AS PARQUET LOCATION '{}/'",
            data.join("dlq").display()
        ),
        "SELECT count(*) FROM dlq WHERE detail LIKE '%NUL character%'".into(),
    ])
    .await;
    assert_eq!(rows[0][0], "2", "both dead letters say why");
}

/// No secret (the PostgreSQL password, an S3 secret key, API tokens)
/// reaches a log line, an error message or `tally check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output() {
    const PASSWORD: &str = "S3cretPassw0rd-pg-7f3a";
    const S3_SECRET: &str = "S3cretKey-s3-91bd";
    const READ: &str = "read-token-S3cret-4c2e";
    const WRITE: &str = "write-token-S3cret-8d1f";
    let dir = test_dir();
    let pg = pg_store().await;
    let role = unique("secret_role").replace('-', "_").to_lowercase();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let (_, rest) = pg.url.split_once('@').unwrap();
    let url = format!("postgres://{role}:{PASSWORD}@{rest}");
    let s3 = S3Server::start(dir.path());
    s3.create_bucket("secrets");
    let broker = Broker::start(dir.path());
    let topic = unique("secrets");
    broker.create_topic(&topic, 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(261, 500, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__SERVING__URL", &url);
    s3.configure(&mut env, "secrets", "archive");
    env.set("TALLY__STORAGE__OPTIONS__AWS_SECRET_ACCESS_KEY", S3_SECRET);
    env.set("TALLY__API__READ_TOKENS", READ);
    env.set("TALLY__API__WRITE_TOKENS", WRITE);
    env.set(
        "TALLY__KAFKA__PROPERTIES__SASL_PASSWORD",
        "S3cretSasl-never-used",
    );
    let db = pg.path();
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 1),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    // Refused requests, with wrong and right tokens.
    let _ = http(
        env.api,
        "GET",
        "/v1/count?video_id=v001",
        Some("wrong-token-0000000000"),
        b"",
    );
    let _ = http(
        env.api,
        "POST",
        "/v1/events",
        Some(WRITE),
        b"[{\"video_id\": 1}]",
    );
    assert!(tally.stop().success());
    let mut outputs = std::fs::read_to_string(&env.log).unwrap();
    outputs.push_str(&run_job(&env, &["check"]).1);
    // An error that names the store: a wrong database name.
    let mut bad = TallyEnv::new(
        &broker.bootstrap(),
        &topic,
        &unique("g"),
        &dir.path().join("bad"),
    );
    bad.vars = env.vars.clone();
    bad.set(
        "TALLY__SERVING__URL",
        &format!(
            "postgres://{role}:{PASSWORD}@{}/no_such_db_x",
            rest.split_once('/').unwrap().0
        ),
    );
    outputs.push_str(&run_job(&bad, &["run"]).1);
    outputs.push_str(
        &run_job(
            &bad,
            &[
                "verify",
                "--from",
                "2026-01-01T00:00:00Z",
                "--to",
                "2026-01-02T00:00:00Z",
            ],
        )
        .1,
    );
    assert!(outputs.contains("tally running"), "the run was logged");
    for secret in [PASSWORD, S3_SECRET, READ, WRITE, "S3cretSasl-never-used"] {
        assert!(!outputs.contains(secret), "a secret leaked: {secret}");
    }
}

/// A rollup's SQL edited in place (its window changed) is refused at
/// startup, naming the file and saying to deploy it as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_rollup_definition_is_refused() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("edited");
    broker.create_topic(&topic, 1).await;
    let rollups = copy_of_rollups(dir.path());
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__SQL__ROLLUPS_DIR", &rollups.display().to_string());
    let mut tally = Tally::start(&env);
    wait_http_ok(env.api, "/readyz", Duration::from_secs(60));
    assert!(tally.stop().success());
    // Reformatting and comments are not a change.
    let file = rollups.join("hour_video_events.sql");
    let sql = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!("-- reformatted\n{}\n", sql.replace('\n', "\n  ")),
    )
    .unwrap();
    let (status, out) = run_job(
        &env,
        &[
            "verify",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T01:00:00Z",
        ],
    );
    assert!(
        status.success(),
        "whitespace and comments do not change a definition: {out}"
    );
    // A new window is.
    assert!(sql.contains("1 hour") || sql.contains("'hour'"), "{sql}");
    std::fs::write(
        &file,
        sql.replace("1 hour", "1 day").replace("'hour'", "'day'"),
    )
    .unwrap();
    let mut again = Tally::start(&env);
    assert!(!wait_exit(&mut again, Duration::from_secs(60)).success());
    let log = std::fs::read_to_string(&env.log).unwrap();
    assert!(
        log.contains("hour_video_events.sql has changed since this serving store recorded it"),
        "{}",
        again.log_tail()
    );
    assert!(
        log.contains("put the new definition in a new version beside it"),
        "{log}"
    );
}

/// A partition that never received an event is registered at assignment and
/// counted in `as_of` (which used to ignore it and claim completeness for
/// partitions not read yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_are_registered_and_counted_in_as_of() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("idle");
    broker.create_topic(&topic, 6).await;
    let now = chrono::Utc::now().timestamp_millis();
    // One key: every event lands in one partition.
    let messages: Vec<Message> = dataset(271, 300, now)
        .into_iter()
        .map(|m| Message {
            key: "one".into(),
            ..m
        })
        .collect();
    produce(&broker.bootstrap(), &topic, &messages).await;
    let data = dir.path().join("data");
    let env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    let db = data.join("serving.db");
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 6),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = serving_query_i64(
            &db,
            "SELECT CAST(partition AS TEXT), coalesce(caught_up_ms, -1) FROM tally_offsets",
        )
        .await;
        if rows.len() == 6 && rows.iter().all(|(_, c)| *c > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every partition registered and caught up: {rows:?}\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = get_json(
        env.api,
        &format!(
            "/v1/count?video_id=v001&start={}&end={}",
            rfc3339(now - now.rem_euclid(86_400_000) - 86_400_000),
            rfc3339(now - now.rem_euclid(86_400_000) + 86_400_000)
        ),
        None,
    );
    assert!(v["as_of"].is_string(), "{v}");
    assert!(tally.stop().success());
    verify_outputs_in(&data, &db, &topic, &messages).await;
}

/// A broker that cannot be reached: librdkafka's own reason ("Connection
/// refused") reaches tally's log, and the outage is logged once, then as a
/// summary, not many lines a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_broker_port_is_logged_with_its_reason_and_few_lines() {
    let dir = test_dir();
    let data = dir.path().join("data");
    let env = TallyEnv::new(
        &format!("127.0.0.1:{}", free_port()),
        &unique("closed"),
        &unique("g"),
        &data,
    );
    let mut tally = Tally::start(&env);
    wait_http_ok(env.api, "/livez", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(20));
    assert!(tally.stop().success(), "{}", tally.log_tail());
    let log = std::fs::read_to_string(&env.log).unwrap();
    assert!(
        log.contains("Connection refused"),
        "librdkafka's reason is in the log:\n{}",
        tally.log_tail()
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    assert!(
        warnings <= 40,
        "{warnings} warning lines in 20 s:\n{}",
        tally.log_tail()
    );
    assert!(
        log.contains("the broker is failing"),
        "{}",
        tally.log_tail()
    );
}

/// A crash loop (three SIGKILLs within seconds, each restarted at once)
/// with a backlog: with `kafka.assignment = "manual"` no dead group member
/// can keep partitions (tansu 0.6.0 does not expire them), so every event is
/// counted within 2 minutes, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_with_manual_assignment_counts_everything() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("crashloop");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(281, 60_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__KAFKA__ASSIGNMENT", "manual");
    let db = data.join("serving.db");
    let mut tally = Tally::start(&env);
    let assigned = || {
        std::fs::read_to_string(&env.log)
            .unwrap_or_default()
            .matches("kafka.assignment = manual: reading every partition")
            .count()
    };
    let mut before_last = 0;
    for delay in [1_500, 700, 1_200] {
        std::thread::sleep(Duration::from_millis(delay));
        tally.kill9();
        before_last = assigned();
        tally = Tally::start(&env);
    }
    // A second manual reader of the same topic and store is refused, once
    // the last incarnation holds the lock (it logs its assignment after
    // taking it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while assigned() <= before_last {
        assert!(
            Instant::now() < deadline,
            "the last restart never took its partitions:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut second = Tally::start(&TallyEnv {
        log: data.join("second.log"),
        api: ([127, 0, 0, 1], free_port()).into(),
        vars: {
            let mut v = env.vars.clone();
            v.retain(|(k, _)| k != "TALLY__API__LISTEN");
            v
        },
    });
    assert!(!wait_exit(&mut second, Duration::from_secs(60)).success());
    let log = std::fs::read_to_string(data.join("second.log")).unwrap();
    assert!(
        log.contains("another `tally run` already reads every partition"),
        "{log}"
    );
    let started = Instant::now();
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 4),
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    eprintln!("caught up {:?} after the last restart", started.elapsed());
    assert!(tally.stop().success());
    verify_outputs_in(&data, &db, &topic, &messages).await;
    report_faults(&[("sigkill_crash_loop", 3)]);
}

/// A member that holds partitions and stops committing (frozen with
/// SIGSTOP) while data waits: a replica watching the topic reports the
/// partitions stalled (`/readyz` 503, the metric, a log line) after
/// `kafka.stall_after`, and ready again once the member resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_makes_its_partitions_stalled_until_it_resumes() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("stall");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let first = dataset(291, 1_000, now);
    produce(&broker.bootstrap(), &topic, &first).await;
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__KAFKA__STALL_AFTER", "3s");
    let db = data.join("serving.db");
    let mut tally = Tally::start(&env);
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 2),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    let mut serve_env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    serve_env.vars = env.vars.clone();
    serve_env.log = data.join("serve.log");
    serve_env.set("TALLY__API__LISTEN", &serve_env.api.to_string());
    let _serve = Tally::serve(&serve_env);
    wait_http_ok(serve_env.api, "/readyz", Duration::from_secs(60));

    let pid = tally.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let second = dataset(292, 1_000, now);
    produce(&broker.bootstrap(), &topic, &second).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(serve_env.api, "GET", "/readyz", None, b"");
        if status == 503 && body.contains("stalled") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reported stalled: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(&serve_env.log).unwrap();
    assert!(log.contains("partition stalled"), "{log}");
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let all: Vec<Message> = first.iter().chain(second.iter()).cloned().collect();
    wait_committed(
        &db,
        &topic,
        &broker.end_offsets(&topic, 2),
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(serve_env.api, "GET", "/readyz", None, b"").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "still not ready after the owner resumed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(tally.stop().success());
    verify_outputs_in(&data, &db, &topic, &all).await;
}
