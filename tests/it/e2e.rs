//! Real tansu broker -> `tally run` child process -> serving SQLite + Parquet,
//! checked against an independent computation.

use std::collections::BTreeMap;
use std::time::Duration;

use tally_tests::*;

pub async fn verify_outputs(data: &std::path::Path, topic: &str, messages: &[Message]) {
    verify_outputs_in(data, &data.join("serving.db"), topic, messages).await;
}

/// [`verify_outputs`] with the serving store at `db` (a SQLite path or a PostgreSQL URL).
pub async fn verify_outputs_in(
    data: &std::path::Path,
    db: &std::path::Path,
    topic: &str,
    messages: &[Message],
) {
    verify_outputs_but_late(data, db, topic, messages, 0).await
}

/// [`verify_outputs_in`] for a store whose `late_total` does not count
/// `uncounted` of the late messages (a store rebuilt from the archive,
/// which does not keep arrival times).
pub async fn verify_outputs_but_late(
    data: &std::path::Path,
    db: &std::path::Path,
    topic: &str,
    messages: &[Message],
    uncounted: usize,
) {
    let db = db.to_path_buf();
    // Rollups equal the exact computation, row for row.
    for (table, width) in [
        ("minute_video_events", 60_000),
        ("hour_video_events", 3_600_000),
        ("day_video_events", 86_400_000),
    ] {
        let want = expected_rollup(messages, width);
        let got = serving_rollup(&db, table).await;
        assert_eq!(got.len(), want.len(), "{table}: row count");
        for (k, v) in &want {
            assert_eq!(got.get(k), Some(v), "{table} {k:?}");
        }
    }
    // The sketch rollups, decoded by Python's datasketches.
    check_sketches(&db, messages).await;
    // The rollup joining the videos dimension, too.
    let want = expected_channel_rollup(messages);
    assert!(want.keys().any(|k| k.0 == "ch-3") && want.keys().any(|k| k.0 == "unknown"));
    assert_eq!(
        serving_channel_rollup(&db).await,
        want,
        "hour_channel_events"
    );
    let accepted = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .count();
    let late = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { late: true, .. }))
        .count();
    let mut rejected: BTreeMap<String, i64> = BTreeMap::new();
    for m in messages {
        if let Expect::Rejected { reason } = m.expect {
            *rejected.entry(reason.to_string()).or_default() += 1;
        }
    }
    // Counters persisted with the offsets.
    let counters: BTreeMap<String, i64> =
        serving_query_i64(&db, "SELECT name, value FROM tally_counters")
            .await
            .into_iter()
            .collect();
    assert_eq!(counters.get("accepted_total"), Some(&(accepted as i64)));
    assert_eq!(
        counters.get("messages_total"),
        Some(&(messages.len() as i64))
    );
    assert_eq!(
        counters.get("late_total"),
        Some(&((late - uncounted) as i64)),
        "late events are counted and flagged"
    );
    for (reason, n) in &rejected {
        assert_eq!(
            counters.get(&format!("rejected_total.{reason}")),
            Some(n),
            "{reason}"
        );
    }

    // The raw archive, read the way docs/analysts.md tells analysts to.
    let raw = data.join("raw/events");
    let rows = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION '{}/'",
            raw.display()
        ),
        "SELECT count(*), count(DISTINCT event_id), count(DISTINCT dt || hour) FROM events".into(),
    ])
    .await;
    assert_eq!(
        rows[0][0],
        accepted.to_string(),
        "raw archive holds every accepted event"
    );
    assert_eq!(rows[0][1], accepted.to_string(), "... exactly once");
    // Hive partitions match event time.
    let rows = datafusion_rows(&[
        format!("CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION '{}/'", raw.display()),
        "SELECT count(*) FROM events WHERE dt <> to_char(event_time, '%Y-%m-%d') OR hour <> to_char(event_time, '%H')".into(),
    ])
    .await;
    assert_eq!(
        rows[0][0], "0",
        "every row sits in its event-hour partition"
    );

    // Dead letters, with reasons and source coordinates.
    let dlq = data.join("dlq");
    let rows = datafusion_rows(&[
        format!("CREATE EXTERNAL TABLE dlq STORED AS PARQUET LOCATION '{}/'", dlq.display()),
        format!("SELECT reason, count(*), count(DISTINCT partition::varchar || ':' || \"offset\"::varchar) FROM dlq WHERE topic = '{topic}' GROUP BY reason ORDER BY reason"),
    ])
    .await;
    let got: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .collect();
    assert_eq!(
        got, rejected,
        "dead-letter dataset holds every malformed message once"
    );
    for r in &rows {
        assert_eq!(r[1], r[2], "one dead letter per offset");
    }

    // No hidden, in-progress or unrecorded files.
    let recorded: std::collections::BTreeSet<String> =
        serving_query_i64(&db, "SELECT path, rows FROM tally_files")
            .await
            .into_iter()
            .map(|(p, _)| p)
            .collect();
    for sub in ["raw", "dlq"] {
        for f in files_under(&data.join(sub)) {
            let rel = format!("{sub}/{}", f.display());
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            assert!(!name.starts_with('.'), "leftover in-progress file {rel}");
            assert!(
                recorded.contains(&rel),
                "orphan file {rel} is not recorded in tally_files"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_counts_exactly_with_malformed_and_late_events() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("e2e");
    broker.create_topic(&topic, 4).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(11, 6_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 4);
    assert_eq!(end.values().sum::<i64>(), messages.len() as i64);

    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    // JSON log lines, checked below.
    env.set("TALLY_LOG_FORMAT", "json");
    let mut tally = Tally::start(&env);
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success(), "clean exit on SIGTERM");
    verify_outputs(&data, &topic, &messages).await;

    // Every log line is one JSON object (no colour codes: not a terminal),
    // and the dead letters are a summary per interval with an example,
    // not a line per message.
    let log = std::fs::read_to_string(&env.log).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    assert!(!log.contains('\u{1b}'), "no ANSI escapes");
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string()));
    let rejected = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Rejected { .. }))
        .count() as u64;
    let summaries: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("events rejected to the dead-letter dataset"))
        })
        .collect();
    assert!(rejected > 20, "the data set has dead letters");
    assert!(
        !summaries.is_empty() && (summaries.len() as u64) < rejected / 4,
        "{} summary lines for {rejected} dead letters",
        summaries.len()
    );
    let logged: u64 = summaries
        .iter()
        .filter_map(|l| l["rejected"].as_u64())
        .sum();
    // (A message read twice, say after a rebalance, is logged twice.)
    assert!(
        logged >= rejected,
        "every dead letter is in a summary: {logged} < {rejected}"
    );
    assert!(summaries.iter().all(|l| l["example_partition"].is_u64()
        && l["example_offset"].is_u64()
        && l["by_reason"].is_string()));

    // A restart consumes nothing twice.
    let mut again = Tally::start(&env);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(again.stop().success());
    verify_outputs(&data, &topic, &messages).await;

    // `tally verify` recomputes from the raw archive and agrees...
    let day = 86_400_000;
    let (from, to) = (
        rfc3339(now - now.rem_euclid(day) - day),
        rfc3339(now - now.rem_euclid(day) + day),
    );
    let job = |args: &[&str]| {
        let out = tally_command()
            .args(args)
            .args(["--from", &from, "--to", &to])
            .envs(env.vars.iter().cloned())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let verify = || job(&["verify"]);
    let db = data.join("serving.db");
    let tables = [
        "minute_video_events",
        "hour_video_events",
        "day_video_events",
    ];
    let mut before = Vec::new();
    for t in tables {
        before.push(serving_rollup(&db, t).await);
    }
    // A backfill over what the pipeline produced changes nothing, twice.
    for _ in 0..2 {
        let (code, out) = job(&["backfill"]);
        assert_eq!(code, Some(0), "{out}");
        for (t, b) in tables.iter().zip(&before) {
            assert_eq!(
                &serving_rollup(&db, t).await,
                b,
                "{t} changed by a backfill"
            );
        }
    }
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("0 rows differ") && out.contains("day_video_events:"),
        "{out}"
    );

    // `tally status`: every partition committed to its end, the archive and
    // the dead letters hold every message once, the verify just run is
    // recorded without drift; healthy, exit 0.
    let status = |extra: &[(&str, &str)]| {
        let o = tally_command()
            .args(["status", "--json"])
            .envs(env.vars.iter().cloned())
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o.status.code(), v)
    };
    let (code, st) = status(&[]);
    assert_eq!(code, Some(0), "{st}");
    assert_eq!(st["healthy"], true, "{st}");
    for p in st["partitions"].as_array().unwrap() {
        let part = p["partition"].as_i64().unwrap() as i32;
        assert_eq!(p["committed_offset"], end[&part], "{p}");
        assert_eq!(p["high_watermark"], end[&part], "{p}");
        assert_eq!(p["lag"], 0, "{p}");
    }
    let accepted = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .count() as i64;
    assert_eq!(st["files"]["raw"]["rows"], accepted, "{st}");
    assert_eq!(
        st["files"]["dlq"]["rows"],
        messages.len() as i64 - accepted,
        "{st}"
    );
    assert_eq!(st["last_verify"]["drift_rows"], 0, "{st}");
    assert!(st["last_commit_age_seconds"].as_f64().unwrap() < 600.0);
    // `tally sql` over the archive and the dead letters: every accepted
    // event once (by dt and hour partitions too), every dead letter once.
    let sql = |q: &str| {
        let o = tally_command()
            .args(["sql", "--format", "csv", q])
            .envs(env.vars.iter().cloned())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(sql("SELECT count(*) FROM events"), [accepted.to_string()]);
    let per_hour: i64 = sql("SELECT dt, hour, count(*) FROM events GROUP BY dt, hour")
        .iter()
        .map(|l| l.rsplit(',').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(per_hour, accepted);
    assert_eq!(
        sql("SELECT count(*) FROM dead_letters"),
        [(messages.len() as i64 - accepted).to_string()]
    );
    let total_views: i64 =
        sql("SELECT sum(events) FROM day_video_events WHERE event_type = 'view'")[0]
            .parse()
            .unwrap();
    let views = messages
        .iter()
        .filter(|m| matches!(&m.expect, Expect::Accepted { kind, .. } if kind == "view"))
        .count() as i64;
    assert_eq!(total_views, views, "a rollup by name, merged");

    // Without the broker: not healthy, exit 1, and the problem named.
    let (code, st) = status(&[("TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS", "127.0.0.1:9")]);
    assert_eq!(code, Some(1), "{st}");
    assert!(
        st["problems"][0].as_str().unwrap().contains("broker"),
        "{st}"
    );
    // ...and reports drift when serving rows are deleted or corrupted.
    let url = format!("sqlite://{}", data.join("serving.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let deleted = sqlx::query("DELETE FROM hour_video_events WHERE (video_id, event_type, window_start) IN (SELECT video_id, event_type, window_start FROM hour_video_events ORDER BY events DESC LIMIT 1)")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    let corrupted = sqlx::query("UPDATE minute_video_events SET events = events + 1 WHERE (video_id, event_type, window_start) IN (SELECT video_id, event_type, window_start FROM minute_video_events LIMIT 1)")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    pool.close().await;
    assert_eq!((deleted, corrupted), (1, 1));
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("2 rows differ"), "{out}");
    assert!(
        out.contains("DRIFT hour_video_events") && out.contains("(missing)"),
        "{out}"
    );
    assert!(out.contains("DRIFT minute_video_events"), "{out}");

    // --dry-run says what would change and writes nothing; the backfill repairs.
    let (code, out) = job(&["backfill", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("WOULD REWRITE hour_video_events") && out.contains("nothing was written"),
        "{out}"
    );
    assert_eq!(verify().0, Some(1), "dry run wrote nothing");
    let (code, out) = job(&["backfill"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = verify();
    assert_eq!(code, Some(0), "{out}");
    verify_outputs(&data, &topic, &messages).await;

    // Export closed minute windows to Parquet; analysts read them with DataFusion.
    let before_export = chrono::Utc::now().timestamp_millis();
    let (code, out) = job(&["export", "--rollup", "minute_video_events"]);
    assert_eq!(code, Some(0), "{out}");
    let exported = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE r STORED AS PARQUET LOCATION '{}/rollups/minute_video_events/'",
            data.display()
        ),
        "SELECT video_id, event_type, CAST(window_start AS BIGINT), events, dt FROM r".into(),
    ])
    .await;
    let serving = serving_rollup(&db, "minute_video_events").await;
    let closed = serving
        .keys()
        .filter(|k| k.2 + 60_000 <= before_export)
        .count();
    assert!(
        exported.len() >= closed && closed > 0,
        "{} exported, {closed} closed",
        exported.len()
    );
    for r in &exported {
        let key = (r[0].clone(), r[1].clone(), r[2].parse::<i64>().unwrap());
        assert_eq!(
            serving.get(&key).map(|v| v.0.to_string()),
            Some(r[3].clone()),
            "{key:?}"
        );
        assert_eq!(r[4], rfc3339(key.2)[..10], "dt is the window's UTC day");
    }

    // The analyst guide's statements run as written against this data.
    let (code, out) = job(&["export"]);
    assert_eq!(code, Some(0), "{out}");
    let section = std::fs::read_to_string(workspace_root().join("docs/analysts.md")).unwrap();
    let mut statements = Vec::new();
    for block in section.split("```sql").skip(1) {
        let sql = block.split("```").next().unwrap();
        let sql: String = sql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for s in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            statements
                .push(s.replace("LOCATION 'data/", &format!("LOCATION '{}/", data.display())));
        }
    }
    assert!(statements.len() >= 6, "{statements:?}");
    // Each statement runs after the ones before it (fresh context; panics on any error).
    for i in 0..statements.len() {
        datafusion_rows(&statements[..=i]).await;
    }

    // `tally report monthly` over what the pipeline committed: the month's total
    // and the top video equal the exact computation.
    let month = chrono::DateTime::from_timestamp_millis(now)
        .unwrap()
        .format("%Y-%m")
        .to_string();
    let start = chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").unwrap();
    let (m0, m1) = (
        start
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis(),
        start
            .checked_add_months(chrono::Months::new(1))
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis(),
    );
    let mut per_video: BTreeMap<&str, i64> = BTreeMap::new();
    for m in &messages {
        if let Expect::Accepted { video, time_ms, .. } = &m.expect {
            if *time_ms >= m0 && *time_ms < m1 {
                *per_video.entry(video).or_default() += 1;
            }
        }
    }
    let out_dir = dir.path().join("report");
    let report_of = |span: &[&str], format: &str, out: &std::path::Path| {
        let o = tally_command()
            .args(["report", "monthly"])
            .args(span)
            .args(["--format", format, "--out"])
            .arg(out)
            .env(
                "TALLY__REPORT__DIMS_DIR",
                workspace_root().join("data/dims"),
            )
            .env(
                "TALLY__REPORT__SQL_DIR",
                workspace_root().join("sql/reports"),
            )
            .envs(env.vars.iter().cloned())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let report = |format: &str, out: &std::path::Path| report_of(&["--month", &month], format, out);
    report("csv", &out_dir);
    let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    let total: i64 = per_video.values().sum();
    assert_eq!(
        summary.lines().nth(1).unwrap().split(',').next().unwrap(),
        total.to_string(),
        "{summary}"
    );
    let top = std::fs::read_to_string(out_dir.join("top_videos.csv")).unwrap();
    let first: Vec<&str> = top.lines().nth(1).unwrap().split(',').collect();
    let best = per_video.values().max().unwrap();
    assert_eq!(first[3], best.to_string(), "{top}");
    assert_eq!(per_video[first[0]], *best, "{top}");
    // The same days as a range of days: the same total.
    let day = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string()
    };
    let range_dir = dir.path().join("range");
    report_of(&["--from", &day(m0), "--to", &day(m1)], "csv", &range_dir);
    let summary = std::fs::read_to_string(range_dir.join("summary.csv")).unwrap();
    assert_eq!(
        summary.lines().nth(1).unwrap().split(',').next().unwrap(),
        total.to_string(),
        "{summary}"
    );
    report("html", &dir.path().join("report.html"));
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<svg"),
        "self-contained HTML with charts"
    );
}
