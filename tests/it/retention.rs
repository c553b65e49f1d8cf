//! Retention: minute rows kept one hour. The pruner deletes older minute
//! rows while hour rows stay; the API answers a range whose start is on a
//! whole hour from hour rows, refuses one that needs pruned minute rows with
//! 400 range_not_retained naming the oldest start, and verify and backfill
//! leave the pruned windows alone.

use std::time::{Duration, Instant};

use tally_tests::*;

const M: i64 = 60_000;
const H: i64 = 60 * M;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_minutes_are_answered_from_hours_or_refused() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("retention");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Late events reach 3 h back: their minute rows are past the retention.
    let messages = dataset(61, 3_000, now);
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__RETENTION__ROLLUPS__MINUTE_VIDEO_EVENTS", "1h");
    env.set("TALLY__RETENTION__INTERVAL", "1s");
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    let db = data.join("serving.db");
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;

    // Every minute row before this horizon goes within a few passes.
    let t0 = chrono::Utc::now().timestamp_millis();
    let horizon = (t0 - H) - (t0 - H).rem_euclid(M);
    let minute_rows_before = |h: i64| {
        let db = db.clone();
        async move {
            serving_rollup(&db, "minute_video_events")
                .await
                .keys()
                .filter(|(_, _, w)| *w < h)
                .count()
        }
    };
    assert!(
        minute_rows_before(horizon).await > 0 || {
            // Pruned already; the late events did land there.
            expected_rollup(&messages, M)
                .keys()
                .any(|(_, _, w)| *w < horizon)
        }
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while minute_rows_before(horizon).await > 0 {
        assert!(
            Instant::now() < deadline,
            "minute rows before the horizon were not pruned"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = http(env.api, "GET", "/metrics", None, b"").1;
    let pruned: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("tally_retention_pruned_rows_total{rollup=\"minute_video_events\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(pruned > 0.0, "{metrics}");

    // Kept minute rows (well after any horizon during this test) and every
    // hour row are exact.
    let keep_from = t0 - 50 * M;
    let minutes = serving_rollup(&db, "minute_video_events").await;
    let want = expected_rollup(&messages, M);
    let kept: Vec<_> = want
        .iter()
        .filter(|((_, _, w), _)| *w >= keep_from)
        .collect();
    assert!(!kept.is_empty());
    for (k, v) in kept {
        assert_eq!(minutes.get(k), Some(v), "minute row {k:?}");
    }
    assert_eq!(
        serving_rollup(&db, "hour_video_events").await,
        expected_rollup(&messages, H)
    );

    // The API: a start on a minute two hours back needs pruned minute rows.
    let (video, _) = want
        .keys()
        .map(|(v, _, _)| v.clone())
        .fold(
            std::collections::BTreeMap::<String, usize>::new(),
            |mut m, v| {
                *m.entry(v).or_default() += 1;
                m
            },
        )
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut start = (now - 2 * H) - (now - 2 * H).rem_euclid(M) + M;
    if start % H == 0 {
        // On a whole hour, hour rows would answer: keep it on a minute.
        start += M;
    }
    let stop = now - now.rem_euclid(M);
    let path = |s: i64| {
        format!(
            "/v1/count?video_id={video}&start={}&end={}",
            rfc3339(s),
            rfc3339(stop)
        )
    };
    let (status, body) = http(env.api, "GET", &path(start), None, b"");
    assert_eq!(status, 400, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "range_not_retained", "{body}");
    let oldest =
        chrono::DateTime::parse_from_rfc3339(err["error"]["oldest_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
    assert_eq!(
        oldest,
        start + (H - start.rem_euclid(H)) % H,
        "the next whole hour: {body}"
    );
    // From there hour rows answer the old edge, exactly.
    let exact = messages
        .iter()
        .filter(|m| {
            matches!(&m.expect, Expect::Accepted { video: v, time_ms, .. }
                if *v == video && *time_ms >= oldest && *time_ms < stop)
        })
        .count() as i64;
    let answer = get_json(env.api, &path(oldest), None);
    assert_eq!(answer["count"], exact, "{answer}");
    // A minute series over pruned minutes is refused the same way.
    let (status, body) = http(
        env.api,
        "GET",
        &format!(
            "/v1/series?video_id={video}&granularity=minute&start={}&end={}",
            rfc3339(start),
            rfc3339(stop)
        ),
        None,
        b"",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("range_not_retained"), "{body}");
    assert!(tally.stop().success());

    // verify and backfill over the last 4 hours leave pruned windows alone.
    let (from, to) = (rfc3339(stop - 4 * H), rfc3339(stop + H));
    for job in ["verify", "backfill"] {
        let out = tally_command()
            .args([job, "--from", &from, "--to", &to])
            .envs(env.vars.iter().cloned())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tally {job}: {text}");
    }
    assert_eq!(
        minute_rows_before(horizon).await,
        0,
        "backfill refilled pruned windows"
    );
    assert_eq!(
        serving_rollup(&db, "hour_video_events").await,
        expected_rollup(&messages, H)
    );
}
