//! The archive stands alone (issue #24, item 3): a serving store restored
//! from an old backup, or lost, is refused by `tally run` (naming `tally
//! rebuild`) without a file deleted; `tally rebuild` recreates it from the
//! archive alone, into SQLite and into PostgreSQL (the way to move from one
//! to the other), equal to the store it replaces; `tally run` continues on
//! it exactly once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tally_tests::*;

use crate::e2e::verify_outputs_but_late;

/// What a store answers and records, to compare two stores by.
#[derive(Debug, PartialEq)]
struct StoreState {
    rollups: Vec<Expected>,
    /// Every counter but `late_total` (arrival times are not archived).
    counters: BTreeMap<String, i64>,
    /// Raw and dead-letter files, with their rows.
    files: BTreeMap<String, i64>,
    offsets: Vec<(String, i64)>,
    archive_offsets: Vec<(String, i64)>,
}

async fn state(db: &Path) -> StoreState {
    let mut rollups = Vec::new();
    for table in [
        "minute_video_events",
        "hour_video_events",
        "day_video_events",
    ] {
        rollups.push(serving_rollup(db, table).await);
    }
    let counters = serving_query_i64(db, "SELECT name, value FROM tally_counters")
        .await
        .into_iter()
        // Not rebuilt: `late_total`, and the last verify's result (when it
        // ran is no count; `tally status` reads it).
        .filter(|(k, _)| k != "late_total" && !k.starts_with("verify_last_"))
        .collect();
    let files = serving_query_i64(
        db,
        "SELECT path, rows FROM tally_files WHERE kind IN ('raw', 'dlq')",
    )
    .await
    .into_iter()
    .collect();
    let mut offsets = serving_query_i64(
        db,
        "SELECT topic || ':' || CAST(partition AS TEXT), next_offset FROM tally_offsets",
    )
    .await;
    offsets.sort();
    let mut archive_offsets = serving_query_i64(
        db,
        "SELECT topic || ':' || CAST(partition AS TEXT), next_offset FROM tally_archive_offsets",
    )
    .await;
    archive_offsets.sort();
    StoreState {
        rollups,
        counters,
        files,
        offsets,
        archive_offsets,
    }
}

/// Every file under the archive's trees (the manifest included).
fn archive_listing(data: &Path) -> Vec<String> {
    let mut out: Vec<String> = ["raw", "dlq", "_tally"]
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

fn job(env: &TallyEnv, args: &[&str]) -> (bool, String) {
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

/// `tally run` against this store must exit by itself with an error whose
/// text holds every one of `says`.
fn refused(env: &TallyEnv, says: &[&str]) {
    let _ = std::fs::remove_file(&env.log);
    let mut tally = Tally::start(env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = tally.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tally kept running:\n{}",
            tally.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    for s in says {
        assert!(log.contains(s), "no {s:?} in:\n{}", tally.log_tail());
    }
}

fn remove_sqlite(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_rebuilt_from_the_archive_answers_as_before_and_run_continues_exactly_once() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("rebuild");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "1s");
    let db = data.join("serving.db");

    // 1. A first part, then a backup of the store.
    let first = dataset(251, 1_500, now);
    produce(&broker.bootstrap(), &topic, &first).await;
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
    let backup = dir.path().join("backup.db");
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", db.display());
        if Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{suffix}", backup.display())).unwrap();
        }
    }

    // 2. A second part, through a SIGKILL (its leftovers stay in the archive).
    let second = dataset(252, 1_500, now);
    produce(&broker.bootstrap(), &topic, &second).await;
    let mut tally = Tally::start(&env);
    std::thread::sleep(Duration::from_millis(1_500));
    tally.kill9();
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
    let before = state(&db).await;
    let files = archive_listing(&data);
    assert!(before.files.len() > 4, "{:?}", before.files);
    assert!(
        files.iter().any(|f| f.starts_with("_tally/manifest/")),
        "the archive keeps its own record: {files:?}"
    );

    // 3. The backup is older than its archive: refused, nothing deleted.
    remove_sqlite(&db);
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", backup.display());
        if Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{suffix}", db.display())).unwrap();
        }
    }
    refused(&env, &["holds files committed beyond", "tally rebuild"]);
    assert_eq!(archive_listing(&data), files, "no archive file disappeared");

    // 4. The store is lost: refused, nothing deleted.
    remove_sqlite(&db);
    refused(
        &env,
        &[
            &format!("holds no offsets for topic `{topic}`"),
            "tally rebuild",
        ],
    );
    assert_eq!(archive_listing(&data), files, "no archive file disappeared");

    // 5. Rebuilt into a new SQLite file: the same store.
    remove_sqlite(&db);
    let (ok, out) = job(&env, &["rebuild"]);
    assert!(ok, "{out}");
    assert!(out.contains("rebuilt from"), "{out}");
    assert_eq!(
        state(&db).await,
        before,
        "the rebuilt store answers as before"
    );
    let (ok, out) = job(&env, &["rebuild"]);
    assert!(
        !ok && out.contains("is not empty"),
        "a second rebuild is refused: {out}"
    );
    let (ok, out) = job(
        &env,
        &[
            "verify",
            "--from",
            &rfc3339(now - 86_400_000 * 2),
            "--to",
            &rfc3339(now + 86_400_000),
        ],
    );
    assert!(ok, "no drift after a rebuild: {out}");

    // 6. Rebuilt into PostgreSQL from the same archive: moving stores.
    let pg = pg_store().await;
    let mut pg_env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    pg_env.set("TALLY__SERVING__URL", &pg.url);
    let (ok, out) = job(&pg_env, &["rebuild"]);
    assert!(ok, "{out}");
    assert_eq!(
        state(&pg.path()).await,
        before,
        "PostgreSQL rebuilt as SQLite was"
    );

    // 7. Continue on PostgreSQL: new events counted once, nothing twice.
    let third = dataset(253, 600, now);
    produce(&broker.bootstrap(), &topic, &third).await;
    let mut tally = Tally::start(&pg_env);
    wait_committed(
        &pg.path(),
        &topic,
        &broker.end_offsets(&topic, 2),
        Duration::from_secs(90),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    let all: Vec<Message> = first.iter().chain(&second).chain(&third).cloned().collect();
    let late_before = first
        .iter()
        .chain(&second)
        .filter(|m| matches!(m.expect, Expect::Accepted { late: true, .. }))
        .count();
    verify_outputs_but_late(&data, &pg.path(), &topic, &all, late_before).await;
    report_faults(&[("store_rebuilt", 2), ("stale_store_refused", 1)]);
}

/// An archive written before the manifest (issue #24, item 7): files
/// recorded one by one, no entries, several per partition and hour (what an
/// older tally left; made here by removing a run's entries). `tally compact`
/// rewrites it through a crash at each of its steps; afterwards the counts,
/// the raw glob and the records are exact, every (partition, hour) has one
/// file, and the archive stands alone: the store is lost and rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_rewrites_an_archive_from_before_the_manifest_through_crashes() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("compact");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let data = dir.path().join("data");
    let env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    let db = data.join("serving.db");
    // Three waves, each archived before the next: several files per hour.
    let mut all = Vec::new();
    let mut tally = Tally::start(&env);
    for seed in [261, 262, 263] {
        let wave = dataset(seed, 700, now);
        produce(&broker.bootstrap(), &topic, &wave).await;
        all.extend(wave);
        wait_committed(
            &db,
            &topic,
            &broker.end_offsets(&topic, 2),
            Duration::from_secs(90),
            &mut tally,
        )
        .await;
    }
    assert!(tally.stop().success());

    // As an older tally left it: no manifest.
    std::fs::remove_dir_all(data.join("_tally")).unwrap();
    {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("DELETE FROM tally_files WHERE kind = 'manifest'")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
    }
    let raw = data.join("raw/events");
    let hours: std::collections::BTreeSet<(String, String)> = files_under(&raw)
        .iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            let partition = name.split("-p").nth(1).unwrap()[..5].to_string();
            (f.parent().unwrap().display().to_string(), partition)
        })
        .collect();
    let old = files_under(&raw).len();
    assert!(
        old > hours.len(),
        "several files per partition and hour: {old} for {}",
        hours.len()
    );
    let (ok, out) = job(&env, &["rebuild"]);
    assert!(!ok, "a store exists: {out}");

    // Compaction, killed after staging, then after its commit, then whole.
    let before = rfc3339(now + 2 * 3_600_000);
    for failpoint in ["after_compaction_stage", "after_compaction_commit"] {
        let mut crashing = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
        crashing.set("TALLY_FAILPOINT", failpoint);
        let (ok, out) = job(&crashing, &["compact", "--before", &before]);
        assert!(!ok, "{failpoint} did not abort: {out}");
    }
    let (ok, out) = job(&env, &["compact", "--before", &before]);
    assert!(ok, "{out}");
    assert!(out.contains("interrupted compaction"), "{out}");
    let (ok, out) = job(&env, &["compact", "--before", &before]);
    assert!(
        ok && out.contains("0 old files"),
        "a second compaction has nothing to do: {out}"
    );

    assert_eq!(
        files_under(&raw).len(),
        hours.len(),
        "one file per partition and hour"
    );
    verify_outputs_but_late(&data, &db, &topic, &all, 0).await;
    let (ok, out) = job(
        &env,
        &[
            "verify",
            "--from",
            &rfc3339(now - 86_400_000 * 2),
            "--to",
            &rfc3339(now + 86_400_000),
        ],
    );
    assert!(ok, "no drift after compaction: {out}");

    // The archive now stands alone.
    let compacted = state(&db).await;
    remove_sqlite(&db);
    let (ok, out) = job(&env, &["rebuild"]);
    assert!(ok, "{out}");
    assert_eq!(state(&db).await, compacted);
    report_faults(&[("compaction_killed", 2)]);
}
