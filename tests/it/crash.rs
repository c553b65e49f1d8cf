//! SIGKILL `tally run` at random moments while events stream in; after each
//! restart the pipeline resumes, and in the end counts and archive are exact.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_ingest_keeps_counts_and_archive_exact() {
    kill_loop(20_000, 6, 5, Duration::from_secs(150)).await;
}

/// `make soak`: at least 20 SIGKILLs during at least 1 M events (override
/// with SOAK_EVENTS and SOAK_KILLS); prints the faults injected and survived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by `make soak`"]
async fn soak_kill_loop() {
    let events = std::env::var("SOAK_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let kills = std::env::var("SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let started = Instant::now();
    let done = kill_loop(events, kills, kills, Duration::from_secs(3600)).await;
    println!("SOAK kill loop: {done} SIGKILLs injected and survived over {events} events in {:.0} s; counts, archive and DLQ exact", started.elapsed().as_secs_f64());
}

/// SIGKILL `tally run` `kills` times (at least `min_kills`) at random moments
/// while `events` stream in, restarting it each time; then check everything.
/// Returns the number of kills.
async fn kill_loop(events: usize, kills: usize, min_kills: usize, budget: Duration) -> usize {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("crash");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(23, events, now);

    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__LINGER", "150ms");
    env.set("TALLY__BATCH__MAX_ROWS", "1500");
    // Fold a range of the SQLite delta tables once they hold 1,000 rows
    // (most commits), so kills land before, during and after folds.
    env.set("TALLY__SERVING__SQLITE_FOLD_ROWS", "1000");
    // A rollup's rows of a batch go straight to its table from 100 rows on
    // (in this run about a third of the commits send every rollup there,
    // two thirds none, a few some), so kills land on both paths.
    env.set("TALLY__SERVING__SQLITE_DIRECT_ROWS", "100");

    // Produce in the background, in slices spread over the run, while tally is killed and restarted.
    let slice = (events / (2 * kills).max(10)).max(1);
    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        slice,
        Duration::from_millis(4_000),
    );

    let db = data.join("serving.db");
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(std::process::id() as u64);
    let mut done = 0;
    let started = Instant::now();
    let watch = GlobWatch::start(&data);
    let mut tally = Tally::start(&env);
    while done < kills && started.elapsed() < budget {
        // Kill only once this incarnation has committed something, so every
        // kill lands while batches are flowing; then at a random moment.
        let before = committed_total(&db).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        if before >= messages.len() as i64 {
            break; // everything is in; later kills would not be mid-ingest
        }
        while committed_total(&db).await <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_200))).await;
        tally.kill9();
        done += 1;
        eprintln!(
            "kill {done} at {:?}, committed {}",
            started.elapsed(),
            committed_total(&db).await
        );
        tally = Tally::start(&env);
    }
    producer.await.unwrap();
    assert!(done >= min_kills, "only {done} kills");
    let looks = watch.stop().await;
    assert!(looks >= 10, "the archive was looked at only {looks} times");
    let end = broker.end_offsets(&topic, 4);
    assert_eq!(end.values().sum::<i64>(), messages.len() as i64);
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(180 + events as u64 / 5_000),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    eprintln!("survived {done} SIGKILLs");
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "tally panicked:\n{log}");
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
    let folded = serving_query_i64(&db, "SELECT 'rows', count(*) FROM minute_video_events").await;
    assert!(
        folded.first().is_some_and(|(_, n)| *n > 0),
        "the delta tables were folded: {folded:?}"
    );
    // Past 1,000 rows each commit folds one range of keys, leaving the rest
    // (in some delta: a fold's range spans every rollup, and the small
    // rollups, whose rows of a batch always go to their delta, may fill it).
    let left = serving_query_i64(
        &db,
        "SELECT 'rows', (SELECT count(*) FROM minute_video_events__delta) \
         + (SELECT count(*) FROM hour_video_events__delta) \
         + (SELECT count(*) FROM day_video_events__delta) \
         + (SELECT count(*) FROM hour_channel_events__delta)",
    )
    .await;
    assert!(
        left.first().is_some_and(|(_, n)| *n > 0),
        "ranged folds left rows in the delta: {left:?}"
    );
    report_faults(&[("sigkill", done)]);
    done
}

/// Reads the raw archive the way a reader of the glob does, every 100 ms:
/// every visible file must be committed (recorded) when it is seen.
struct GlobWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl GlobWatch {
    fn start(data: &std::path::Path) -> GlobWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, data) = (stop.clone(), data.to_path_buf());
        let task = tokio::spawn(async move {
            let db = data.join("serving.db");
            let mut looks = 0;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let visible: Vec<String> = files_under(&data.join("raw"))
                    .into_iter()
                    .map(|p| format!("raw/{}", p.display()))
                    .filter(|p| !p.contains("/.") && p.ends_with(".parquet"))
                    .collect();
                if visible.is_empty() || !store_exists(&db) {
                    continue;
                }
                let Ok(recorded) =
                    try_serving_query_i64(&db, "SELECT path, rows FROM tally_files").await
                else {
                    continue;
                };
                let recorded: std::collections::HashSet<String> =
                    recorded.into_iter().map(|(p, _)| p).collect();
                for v in &visible {
                    assert!(
                        recorded.contains(v),
                        "{v} is visible to readers but not committed"
                    );
                }
                looks += 1;
            }
            looks
        });
        GlobWatch { stop, task }
    }

    async fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.task.await.unwrap()
    }
}

pub(crate) async fn committed_total(db: &std::path::Path) -> i64 {
    if !store_exists(db) {
        return 0;
    }
    try_serving_query_i64(
        db,
        "SELECT 'total', CAST(coalesce(sum(next_offset), 0) AS BIGINT) FROM tally_offsets",
    )
    .await
    .unwrap_or_default()
    .first()
    .map_or(0, |(_, v)| *v)
}

/// Crash exactly between the archive write and the serving commit, then
/// between the serving commit and Kafka's group commit, then inside the
/// fold of the SQLite delta tables; the restart must delete the orphan
/// files and count nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failpoints_around_the_commit_leave_no_trace() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("failpoint");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(31, 5_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 4);

    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__MAX_ROWS", "700");
    // Fold the SQLite delta tables after every commit (in a transaction of
    // its own, after the batch's).
    env.set("TALLY__SERVING__SQLITE_FOLD_ROWS", "0");
    // Open raw files write a row group every few batches.
    env.set("TALLY__STORAGE__ARCHIVE_ROW_GROUP_BYTES", "64KiB");

    // Each failpoint aborts the first batch (or archive flush) that reaches
    // it; `inside_fold_transaction` and `after_serving_commit` leave that
    // batch committed. The archive's own steps come after the counts:
    // the files of a flush killed before its commit stay hidden (and are
    // removed later); those of a committed flush are renamed by the restart.
    let mut committed = 0;
    for (point, commits) in [
        ("after_archive_write", Some(false)),
        ("after_aggregate", Some(false)),
        ("inside_serving_transaction", Some(false)),
        ("inside_fold_transaction", Some(true)),
        ("after_serving_commit", Some(true)),
        // From here on a restart first re-reads, for the archive only, what
        // the counts already hold: its first commit may count nothing.
        ("after_row_group", None),
        ("after_file_closed", None),
        ("inside_archive_commit", None),
        ("after_archive_commit", None),
        ("after_archive_rename", None),
    ] {
        env.set("TALLY_FAILPOINT", point);
        let mut t = Tally::start(&env);
        let status = wait_exit(&mut t, Duration::from_secs(60));
        assert!(
            !status.success(),
            "{point}: the failpoint aborts the process"
        );
        let log = std::fs::read_to_string(&env.log).unwrap_or_default();
        assert!(
            log.contains(&format!(
                "failpoint reached: aborting failpoint=\"{point}\""
            )) || log.contains(point),
            "{point} reached"
        );
        let now_committed = committed_total(&db).await;
        let staged = files_under(&data.join("raw"))
            .iter()
            .filter(|p| p.to_string_lossy().contains("/."))
            .count();
        let pending = serving_query_i64(&db, "SELECT 'n', count(*) FROM tally_archive_pending")
            .await
            .first()
            .map_or(0, |(_, n)| *n);
        match commits {
            Some(true) => assert!(
                now_committed > committed,
                "{point}: the batch was committed before the abort"
            ),
            Some(false) => assert_eq!(
                now_committed, committed,
                "{point}: nothing more was committed"
            ),
            None => {}
        }
        match point {
            "after_file_closed" | "inside_archive_commit" => {
                assert!(staged > 0, "{point}: the flush's files were staged");
                assert_eq!(pending, 0, "{point}: the flush did not commit");
            }
            "after_archive_commit" => {
                assert!(
                    staged > 0 && pending > 0,
                    "{point}: committed, not renamed ({staged} staged, {pending} pending)"
                );
            }
            "after_row_group" => {
                assert!(
                    !files_under(&data.join(".spool")).is_empty(),
                    "{point}: a row group was in the open file"
                );
            }
            "after_archive_rename" => {
                assert!(
                    pending > 0,
                    "{point}: renamed, not yet forgotten as pending"
                );
            }
            _ => {}
        }
        if point == "inside_fold_transaction" {
            let delta = serving_query_i64(
                &db,
                "SELECT 'rows', count(*) FROM minute_video_events__delta",
            )
            .await;
            assert!(
                delta.first().is_some_and(|(_, n)| *n > 0),
                "the aborted fold left the batch in the delta: {delta:?}"
            );
        }
        committed = now_committed;
    }

    env.set("TALLY_FAILPOINT", "none");
    let mut t = Tally::start(&env);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut t).await;
    assert!(t.stop().success());
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(
        log.contains("removed orphan archive files"),
        "orphans were cleaned up:\n{log}"
    );
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
    let folded = serving_query_i64(
        &db,
        "SELECT 'rows', count(*) FROM minute_video_events__delta",
    )
    .await;
    assert_eq!(
        folded.first().map(|(_, n)| *n),
        Some(0),
        "later folds emptied the delta"
    );
    report_faults(&[("failpoint_crashes", 10)]);
}

fn wait_exit(t: &mut Tally, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = t.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "tally did not reach the failpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Graceful shutdown mid-ingest: SIGTERM and SIGINT (Ctrl-C), twice each,
/// while batches are in flight. Each stop finishes or abandons the in-flight
/// batch, commits, and exits 0 within 10 s; after the restarts every count
/// and the archive are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_ctrl_c_mid_ingest_exit_cleanly_and_stay_exact() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("graceful");
    broker.create_topic(&topic, 4).await;
    let messages = dataset(29, 16_000, chrono::Utc::now().timestamp_millis());
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__LINGER", "150ms");
    env.set("TALLY__BATCH__MAX_ROWS", "800");
    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        1_000,
        Duration::from_millis(700),
    );
    let mut tally = Tally::start(&env);
    let mut slowest = Duration::ZERO;
    for signal in ["TERM", "INT", "TERM", "INT"] {
        let before = committed_total(&db).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed_total(&db).await <= before {
            assert!(
                Instant::now() < deadline,
                "nothing committed before SIG{signal}:\n{}",
                tally.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(120)).await; // mid-batch
        let sent = Instant::now();
        std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(tally.child.id().to_string())
            .status()
            .unwrap();
        let status = loop {
            if let Some(s) = tally.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(10),
                "no exit within 10 s of SIG{signal}:\n{}",
                tally.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        slowest = slowest.max(sent.elapsed());
        assert!(
            status.success(),
            "SIG{signal} exits 0, got {status}:\n{}",
            tally.log_tail()
        );
        tally = Tally::start(&env);
    }
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 4);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());
    eprintln!("4 graceful stops mid-ingest; slowest exit {slowest:?}");
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "tally panicked:\n{log}");
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
    report_faults(&[("sigterm", 2), ("sigint", 2)]);
}

/// An archive file of a batch that never committed can appear after the
/// new owner's first sweep: S3 may still apply a PUT that a killed process
/// had sent. The periodic sweep (`storage.orphan_sweep_interval`) removes
/// it, and leaves alone a file starting at or beyond the committed offset,
/// which a live writer may still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_orphan_file_is_removed_by_the_periodic_sweep() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("sweep");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(41, 3_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);

    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    env.set("TALLY__STORAGE__ORPHAN_SWEEP_INTERVAL", "1s");
    let mut tally = Tally::start(&env);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;

    // The first sweep (after the first commit) lists the whole archive; wait
    // for a periodic, bounded one, so that the next ones are bounded too.
    let sweeps = |scope: &str| -> u64 {
        let (_, metrics) = http(env.api, "GET", "/metrics", None, b"");
        let line = format!("tally_archive_sweeps_total{{scope=\"{scope}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sweeps("bounded") == 0 {
        assert!(
            Instant::now() < deadline,
            "no bounded sweep:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let full_sweeps = sweeps("full");
    assert!(full_sweeps >= 1, "the first sweep lists the whole archive");

    // A killed writer's file of a committed offset range (same range, another
    // writer token), and a file starting at partition 0's committed offset.
    let recorded = serving_query_i64(&db, "SELECT path, rows FROM tally_files").await;
    let (path, _) = recorded
        .iter()
        .find(|(p, _)| p.starts_with("raw/") && p.contains(&format!("{topic}-p00000-")))
        .expect("a recorded raw file of partition 0");
    let source = data.join(path);
    let name = source.file_name().unwrap().to_string_lossy().to_string();
    let range: Vec<&str> = name
        .trim_start_matches(&format!("{topic}-p00000-"))
        .splitn(3, '-')
        .collect();
    let (first, last) = (range[0], range[1]);
    let late = source.with_file_name(format!("{topic}-p00000-{first}-{last}-w0badc0de.parquet"));
    let beyond = source.with_file_name(format!(
        "{topic}-p00000-{:020}-{:020}-w0badc0de.parquet",
        end[&0],
        end[&0] + 99
    ));
    std::fs::copy(&source, &late).unwrap();
    std::fs::copy(&source, &beyond).unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while late.exists() {
        assert!(
            Instant::now() < deadline,
            "the late orphan was not removed:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two more sweep intervals: the file a live writer may commit stays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        beyond.exists(),
        "a file at the committed offset was removed:\n{}",
        tally.log_tail()
    );
    assert_eq!(
        sweeps("full"),
        full_sweeps,
        "the late orphan was found by a bounded sweep"
    );
    let (status, metrics) = http(env.api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l == "tally_archive_orphans_removed_total 1"),
        "orphans metric:\n{metrics}"
    );
    assert!(tally.stop().success(), "clean exit:\n{}", tally.log_tail());
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(
        log.contains("removed orphan archive files"),
        "the sweep logs what it removed:\n{log}"
    );
    assert!(
        !log.contains("orphan sweep failed"),
        "an orphan sweep failed:\n{log}"
    );
    std::fs::remove_file(&beyond).unwrap();
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
}
