//! Sketch measures end to end (`day_video_uniques`: HLL of user_id;
//! `hour_video_watch`: KLL of value). `tally replay` in small batches, so
//! sketches merge on every commit; then the API's unique viewers and
//! percentiles equal what Python's `datasketches` reads from the stored
//! bytes, both within their error of exact; `tally verify` finds no drift;
//! and a PostgreSQL backfill of the sketch rollups (bytea by COPY) reads
//! back within the same error.

use std::collections::BTreeMap;

use tally_tests::*;

use crate::e2e::verify_outputs;

const D: i64 = 86_400_000;

fn run(env: &TallyEnv, args: &[&str]) -> String {
    let out = tally_command()
        .args(args)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tally {args:?}:\n{text}");
    text
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sketches_are_within_their_error_and_python_reads_what_the_api_answers() {
    let dir = test_dir();
    let now = chrono::Utc::now().timestamp_millis();
    let data = dir.path().join("data");
    let file = dir.path().join("events.jsonl");
    let messages: Vec<Message> = dataset(41, 6_000, now)
        .into_iter()
        .filter(|m| !m.payload.contains(&b'\n') && !m.payload.ends_with(b"\r"))
        .collect();
    let mut text = Vec::new();
    for m in &messages {
        text.extend_from_slice(&m.payload);
        text.push(b'\n');
    }
    std::fs::write(&file, text).unwrap();
    let mut env = TallyEnv::new("127.0.0.1:1", "unused", "unused", &data);
    env.set("TALLY__BATCH__MAX_ROWS", "400");
    env.set("TALLY__API__MAX_RANGE", "10d");
    let out = run(&env, &["replay", "--file", file.to_str().unwrap()]);
    let topic = out
        .lines()
        .find_map(|l| {
            l.split_once(": ")
                .filter(|(_, r)| r.contains(" messages in "))
        })
        .map(|(t, _)| t.to_string())
        .unwrap();
    // Counts exact, sketches within their error (decoded by Python).
    let db = data.join("serving.db");
    verify_outputs(&data, &topic, &messages).await;
    let (py_uniques, py_watch) = python_sketches(&db).await;
    assert!(
        py_uniques.len() >= 20 && py_watch.len() >= 40,
        "{} {}",
        py_uniques.len(),
        py_watch.len()
    );

    // The API answers what Python reads from the same bytes.
    let serve = Tally::serve(&env);
    wait_http_ok(env.api, "/livez", std::time::Duration::from_secs(30));
    let mut compared = 0;
    for ((video, day), (views, est)) in py_uniques.iter().take(40) {
        let v = get_json(
            env.api,
            &format!(
                "/v1/rollups/day_video_uniques?start={}&end={}&video_id={video}",
                time(*day),
                time(day + D)
            ),
            None,
        );
        let row = &v["rows"][0];
        assert_eq!(row["views"].as_i64(), Some(*views), "{v}");
        let api = row["unique_viewers"].as_f64().unwrap();
        assert!(
            (api - est).abs() <= 1e-9 * est.max(1.0),
            "{video} {day}: API {api}, Python {est}"
        );
        compared += 1;
    }
    for ((video, hour), (_, n, p50, p95)) in py_watch.iter().take(60) {
        let v = get_json(
            env.api,
            &format!(
                "/v1/rollups/hour_video_watch?start={}&end={}&video_id={video}",
                time(*hour),
                time(hour + 3_600_000)
            ),
            None,
        );
        let row = &v["rows"][0];
        assert_eq!(row["value_count"].as_u64(), Some(*n), "{v}");
        // Fewer than k = 200 values a sketch: no compaction, so Rust's and
        // C++'s merges hold the same items and answer the same value.
        assert_eq!(row["value_p50"].as_f64(), *p50, "{video} {hour}: {v}");
        assert_eq!(row["value_p95"].as_f64(), *p95, "{video} {hour}: {v}");
        compared += 1;
    }
    assert!(compared >= 60, "{compared}");
    // Two days of unique viewers are the union of the days, not their sum.
    let today = now - now.rem_euclid(D);
    let busiest = {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for (v, _) in py_uniques.keys() {
            *per.entry(v.as_str()).or_default() += 1;
        }
        per.into_iter()
            .max_by_key(|(_, n)| *n)
            .unwrap()
            .0
            .to_string()
    };
    let want = expected_sketches(&messages);
    let exact: std::collections::BTreeSet<&String> = want
        .uniques
        .iter()
        .filter(|((v, d), _)| *v == busiest && *d >= today - D && *d < today + D)
        .flat_map(|(_, (_, users))| users)
        .collect();
    let v = get_json(
        env.api,
        &format!(
            "/v1/stats?function=unique&video_id={busiest}&start={}&end={}",
            time(today - D),
            time(today + D)
        ),
        None,
    );
    let got = v["value"].as_f64().unwrap();
    let exact = exact.len() as f64;
    assert!(
        (got - exact).abs() <= 3.0 * 0.01625 * exact + 0.5,
        "{v}: exact {exact}"
    );
    assert!(
        v["low"].as_f64().unwrap() <= got && got <= v["high"].as_f64().unwrap(),
        "{v}"
    );
    drop(serve);

    // Recomputed from the archive, the stored sketches agree.
    let (from, to) = (time(today - 2 * D), time(today + D));
    let out = run(&env, &["verify", "--from", &from, "--to", &to]);
    assert!(out.contains(" 0 rows differ"), "{out}");

    // PostgreSQL: the same replay (sketches merged in Rust inside each
    // batch's transaction), then a backfill of the sketch rollups (bytea by
    // COPY), each within the error; verify agrees.
    let pg = pg_store().await;
    let mut pg_env = TallyEnv::new(
        "127.0.0.1:1",
        "unused",
        "unused",
        &dir.path().join("data_pg"),
    );
    pg_env.set("TALLY__BATCH__MAX_ROWS", "400");
    pg_env.set("TALLY__SERVING__URL", &pg.url);
    run(&pg_env, &["replay", "--file", file.to_str().unwrap()]);
    check_sketches(&pg.path(), &messages).await;
    for rollup in ["day_video_uniques", "hour_video_watch"] {
        let out = run(
            &pg_env,
            &["backfill", "--rollup", rollup, "--from", &from, "--to", &to],
        );
        assert!(out.contains(rollup), "{out}");
    }
    let (pg_uniques, pg_watch) = python_sketches(&pg.path()).await;
    assert_eq!(
        (pg_uniques.len(), pg_watch.len()),
        (py_uniques.len(), py_watch.len())
    );
    check_sketches(&pg.path(), &messages).await;
    let out = run(&pg_env, &["verify", "--from", &from, "--to", &to]);
    assert!(out.contains(" 0 rows differ"), "{out}");
}
