//! The S3 archive (issue #6): `storage.archive_url = "s3://…"` against moto's
//! S3 server on loopback. Same exactness checks as on a local directory, on
//! a mirror of the bucket, plus: no multipart upload survives a crash, and
//! verify, backfill, export and DataFusion read S3.

use std::time::{Duration, Instant};

use tally_tests::*;

use crate::crash::committed_total;
use crate::e2e::verify_outputs_in;

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

async fn wait_more_committed(db: &std::path::Path, before: i64, tally: &mut Tally) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_total(db).await <= before {
        if let Some(s) = tally.child.try_wait().unwrap() {
            panic!("tally exited with {s}:\n{}", tally.log_tail());
        }
        assert!(
            Instant::now() < deadline,
            "nothing committed:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tally run` archiving to S3: first crashed inside a multipart upload (a
/// failpoint aborts the process after a part is uploaded), then SIGKILLed 4
/// times mid-ingest, alternating multipart uploads and single PUTs. The
/// next owner aborts the crashed upload; the rollups, the archive and the
/// dead letters in the bucket are exact; no upload or marker is left;
/// verify, backfill and export work on S3; DataFusion reads `s3://` directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_archive_is_exact_across_sigkills_and_a_crash_mid_multipart_upload() {
    let dir = test_dir();
    let s3 = S3Server::start(dir.path());
    let bucket = "lake";
    s3.create_bucket(bucket);
    let broker = Broker::start(dir.path());
    let topic = unique("s3");
    let prefix = format!("tally/{topic}");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(101, 10_000, now);
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    s3.configure(&mut env, bucket, &prefix);
    env.set("TALLY__BATCH__MAX_ROWS", "600");
    env.set("TALLY__BATCH__LINGER", "150ms");
    // A PUT a killed process sent may land after the new owner's first sweep;
    // the periodic sweep removes it.
    env.set("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "1s");
    let mut multipart = env.vars.clone();
    multipart.push(("TALLY__STORAGE__MULTIPART_THRESHOLD".into(), "0".into()));
    let multipart_env = TallyEnv {
        vars: multipart,
        log: env.log.clone(),
        api: env.api,
    };

    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        1_000,
        Duration::from_millis(600),
    );
    // 1. Crash inside the first multipart upload.
    let mut crashing = multipart_env.vars.clone();
    crashing.push(("TALLY_FAILPOINT".into(), "inside_multipart_upload".into()));
    let mut tally = Tally::start(&TallyEnv {
        vars: crashing,
        log: env.log.clone(),
        api: env.api,
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = tally.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "failpoint not reached:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "the failpoint aborts the process");
    let stale = s3.multipart_uploads(bucket);
    assert!(stale >= 1, "the crash left a multipart upload in progress");

    // 2. Restart (the new owner aborts it), then SIGKILL 4 times.
    let mut kills = 0;
    tally = Tally::start(&multipart_env);
    while kills < 4 {
        let before = committed_total(&db).await;
        if before >= messages.len() as i64 {
            break; // everything is in; later kills would not be mid-ingest
        }
        wait_more_committed(&db, before, &mut tally).await;
        tokio::time::sleep(Duration::from_millis([60, 300, 10, 200][kills])).await;
        tally.kill9();
        kills += 1;
        tally = Tally::start(if kills % 2 == 0 { &multipart_env } else { &env });
    }
    assert!(kills >= 2, "only {kills} kills mid-ingest");
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 4);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    // A PUT a killed process sent can land after the new owner's first sweep;
    // the periodic sweep (every 1 s, run by heartbeat commits while idle)
    // removes it. On a loaded machine that can take longer than a few seconds:
    // wait (at most 30 s) until the bucket holds only recorded files. If it
    // never does, the checks below fail.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let scratch = dir.path().join("scratch");
        let _ = std::fs::remove_dir_all(&scratch);
        let keys: std::collections::BTreeSet<String> = s3
            .mirror(bucket, &prefix, &scratch)
            .await
            .into_iter()
            .collect();
        let recorded: std::collections::BTreeSet<String> =
            serving_query_i64(&db, "SELECT path, rows FROM tally_files")
                .await
                .into_iter()
                .map(|(p, _)| p)
                .collect();
        if keys.is_subset(&recorded) || std::time::Instant::now() > deadline {
            break;
        }
    }
    assert!(tally.stop().success(), "clean exit:\n{}", tally.log_tail());
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(
        log.contains("aborting multipart uploads left by a crash"),
        "the crashed upload was found and aborted"
    );
    // Periodic sweeps list only recent `dt=` directories of the bucket; none may fail.
    assert!(
        !log.contains("orphan sweep failed"),
        "an orphan sweep failed:\n{log}"
    );
    assert_eq!(
        s3.multipart_uploads(bucket),
        0,
        "no multipart upload is left in progress"
    );

    // The bucket, mirrored to disk, passes the same checks as a local archive.
    let mirror = dir.path().join("mirror");
    let keys = s3.mirror(bucket, &prefix, &mirror).await;
    assert!(
        keys.iter().any(|k| k.starts_with("raw/events/dt=")),
        "raw files in S3: {keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.starts_with("raw/events/dt=")
            || k.starts_with("dlq/dt=")
            || k.starts_with("_tally/manifest/")),
        "only archive files in the prefix: {keys:?}"
    );
    // Every raw object is named by a manifest entry in the bucket.
    for k in keys.iter().filter(|k| k.starts_with("raw/events/dt=")) {
        let name = k
            .rsplit('/')
            .next()
            .unwrap()
            .strip_suffix(".parquet")
            .unwrap();
        let (head, writer) = name.rsplit_once("-w").unwrap();
        let mut parts = head.rsplitn(4, '-');
        let (last, first, partition, topic) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let entry = format!("_tally/manifest/{topic}/{partition}/{first}-{last}-w{writer}.json");
        assert!(keys.contains(&entry), "{k} is named by no entry ({entry})");
    }
    assert!(
        !data.join("raw").exists(),
        "nothing archived to the local data_dir"
    );
    verify_outputs_in(&mirror, &db, &topic, &messages).await;

    // Analysts read s3:// directly.
    let accepted = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .count();
    let rows = datafusion_rows_s3(
        bucket,
        s3.store(bucket),
        &[
            format!("CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION 's3://{bucket}/{prefix}/raw/events/'"),
            "SELECT count(*), count(DISTINCT event_id) FROM events".into(),
        ],
    )
    .await;
    assert_eq!(rows[0], vec![accepted.to_string(), accepted.to_string()]);

    // Jobs read the archive from S3.
    let (from, to) = (
        rfc3339(now - now.rem_euclid(86_400_000) - 3 * 86_400_000),
        rfc3339(now - now.rem_euclid(3_600_000) + 3_600_000),
    );
    let (ok, out) = run_job(&env, &["verify", "--from", &from, "--to", &to]);
    assert!(ok, "verify reading S3 finds no drift:\n{out}");
    let read: usize = out
        .lines()
        .find_map(|l| l.strip_suffix(" raw files read; 0 rows differ"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        read > 0,
        "verify read raw files from S3 and found no drift:\n{out}"
    );
    let (ok, out) = run_job(&env, &["backfill", "--from", &from, "--to", &to]);
    assert!(ok, "backfill reading S3:\n{out}");
    verify_outputs_in(&mirror, &db, &topic, &messages).await;
    let (ok, out) = run_job(
        &env,
        &[
            "export",
            "--from",
            &from,
            "--to",
            &rfc3339(now - now.rem_euclid(86_400_000) + 86_400_000),
        ],
    );
    assert!(ok, "export to S3:\n{out}");
    assert!(
        out.contains(&format!("s3://{bucket}/{prefix}")),
        "export names where it wrote:\n{out}"
    );
    let exported = s3
        .mirror(
            bucket,
            &format!("{prefix}/rollups"),
            &dir.path().join("rollups"),
        )
        .await;
    assert!(
        exported
            .iter()
            .any(|k| k.starts_with("minute_video_events/dt=")),
        "exported rollups in S3: {exported:?}"
    );

    report_faults(&[
        ("sigkill", kills),
        ("crash_mid_multipart", 1),
        ("stale_uploads_aborted", stale),
    ]);
}
