//! `GET /v1/rollups` and `GET /v1/rollups/{name}` against brute force over
//! the fixture's events: totals, filters (IN), group by, granularity,
//! top-K, and the 400s naming what is valid.

use std::collections::BTreeMap;

use super::*;

const FAMILY: [&str; 3] = [
    "day_video_events",
    "hour_video_events",
    "minute_video_events",
];

/// (events, value_sum, value_count, value_min, value_max) of `evs`.
fn totals<'a>(evs: impl Iterator<Item = &'a Ev>) -> (i64, f64, i64, Option<f64>, Option<f64>) {
    let mut t = (0i64, 0.0, 0i64, None::<f64>, None::<f64>);
    for e in evs {
        t.0 += 1;
        if let Some(v) = e.value {
            t.1 += v;
            t.2 += 1;
            t.3 = Some(t.3.map_or(v, |m| m.min(v)));
            t.4 = Some(t.4.map_or(v, |m| m.max(v)));
        }
    }
    t
}

fn row_totals(row: &Value) -> (i64, f64, i64, Option<f64>, Option<f64>) {
    (
        row["events"].as_i64().unwrap(),
        row["value_sum"].as_f64().unwrap(),
        row["value_count"].as_i64().unwrap(),
        row["value_min"].as_f64(),
        row["value_max"].as_f64(),
    )
}

/// The sketch rollups (`day_video_uniques`, `hour_video_watch`) over the
/// API against exact answers: unique viewers within 3 standard errors of
/// the exact distinct count, percentiles within the KLL rank error.
async fn check_sketches(f: &Fixture) {
    let (_, v) = get(&f.app, "/v1/rollups").await;
    let listed = v["rollups"].as_array().unwrap();
    let uniques = listed
        .iter()
        .find(|r| r["name"] == "day_video_uniques")
        .unwrap();
    let m = &uniques["measures"][1];
    assert_eq!(
        (m["name"].as_str(), m["kind"].as_str(), m["sketch"].as_str()),
        (Some("unique_viewers"), Some("approx_distinct"), Some("hll")),
        "{uniques}"
    );
    assert_eq!(
        m["bounds"],
        serde_json::json!(["unique_viewers_low", "unique_viewers_high"])
    );
    let watch = listed
        .iter()
        .find(|r| r["name"] == "hour_video_watch")
        .unwrap();
    assert_eq!(
        watch["measures"][2]["quantile"],
        serde_json::json!(0.95),
        "{watch}"
    );

    let mut rng = ChaCha12Rng::seed_from_u64(31);
    for _ in 0..12 {
        // Whole days (the rollup's window), one to three.
        let a = rng.random_range(0..3);
        let b = rng.random_range(a + 1..=4);
        let (s, e) = (NOW - 4 * D + a * D, NOW - 4 * D + b * D);
        let (x, y) = (
            format!("v{}", rng.random_range(0..11)),
            format!("v{}", rng.random_range(0..11)),
        );
        let exact = |videos: &[&str]| {
            f.events
                .iter()
                .filter(|ev| {
                    ev.kind == "view"
                        && videos.contains(&ev.video.as_str())
                        && ev.t >= s
                        && ev.t < e
                })
                .map(|ev| ev.user)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as f64
        };
        let within = |got: &Value, want: f64| {
            let g = got.as_f64().unwrap();
            assert!(
                (g - want).abs() <= 3.0 * 0.01625 * want + 0.5,
                "{g} vs exact {want}"
            );
        };
        // Two videos: the union of their days, not the sum.
        let (st, v) = get(
            &f.app,
            &format!(
                "/v1/rollups/day_video_uniques?{}&video_id={x}&video_id={y}",
                range_q(s, e)
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let row = &v["rows"][0];
        within(&row["unique_viewers"], exact(&[&x, &y]));
        assert!(row["unique_viewers_low"].as_f64() <= row["unique_viewers"].as_f64());
        assert!(row["unique_viewers_high"].as_f64() >= row["unique_viewers"].as_f64());
        // Grouped by video, and /v1/stats, agree with it.
        let (st, v) = get(
            &f.app,
            &format!(
                "/v1/rollups/day_video_uniques?{}&video_id={x}&video_id={y}&group_by=video_id",
                range_q(s, e)
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        for r in v["rows"].as_array().unwrap() {
            within(
                &r["unique_viewers"],
                exact(&[r["video_id"].as_str().unwrap()]),
            );
        }
        let (st, v) = get(
            &f.app,
            &format!("/v1/stats?{}&video_id={x}&function=unique", range_q(s, e)),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["rollup"], "day_video_uniques");
        within(&v["value"], exact(&[&x]));

        // Percentiles of one video's view values.
        let mut values: Vec<f64> = f
            .events
            .iter()
            .filter(|ev| ev.video == x && ev.t >= s && ev.t < e)
            .filter_map(|ev| ev.value)
            .collect();
        values.sort_by(f64::total_cmp);
        for (function, p) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
            let (st, v) = get(
                &f.app,
                &format!(
                    "/v1/stats?{}&video_id={x}&function={function}",
                    range_q(s, e)
                ),
            )
            .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if values.is_empty() {
                assert!(v["value"].is_null(), "{v}");
                continue;
            }
            let got = v["value"].as_f64().unwrap();
            let lo = values.partition_point(|w| *w < got) as f64 / values.len() as f64;
            let hi = values.partition_point(|w| *w <= got) as f64 / values.len() as f64;
            assert!(
                lo - 0.0165 <= p && p <= hi + 0.0165 + 1.0 / values.len() as f64,
                "{function} {got}: ranks {lo}..{hi} of {}",
                values.len()
            );
        }
    }
    // A sketch cannot rank a top-K yet; a sketch function with a key the
    // rollup lacks is refused.
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/rollups/day_video_uniques?{}&group_by=video_id&order_by=unique_viewers",
            range_q(NOW - 2 * D, NOW)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("views"),
        "{v}"
    );
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/stats?{}&video_id=v1&event_type=like&function=unique",
            range_q(NOW - 2 * D, NOW)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event_type"),
        "{v}"
    );
}

pub(super) async fn check_generic(f: &Fixture) {
    check_sketches(f).await;
    // The listing: every rollup, one family of three tiers.
    let (st, v) = get(&f.app, "/v1/rollups").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let listed = v["rollups"].as_array().unwrap();
    assert_eq!(listed.len(), 6, "{v}");
    let channels = listed
        .iter()
        .find(|r| r["name"] == "hour_channel_events")
        .unwrap();
    assert_eq!(
        channels["family"],
        serde_json::json!(["hour_channel_events"])
    );
    for r in listed
        .iter()
        .filter(|r| FAMILY.contains(&r["name"].as_str().unwrap()))
    {
        assert_eq!(r["family"], serde_json::json!(FAMILY), "{r}");
        let keys: Vec<&str> = r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap())
            .collect();
        assert_eq!(keys, vec!["video_id", "event_type"], "{r}");
        let kinds: BTreeMap<&str, &str> = r["measures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap(), m["kind"].as_str().unwrap()))
            .collect();
        assert_eq!(kinds["events"], "count");
        assert_eq!(kinds["value_sum"], "sum");
        assert_eq!(kinds["value_min"], "min");
        assert_eq!(r["fingerprint"].as_str().unwrap().len(), 16);
    }

    let mut rng = ChaCha12Rng::seed_from_u64(23);
    for i in 0..40 {
        let (s, e) = random_range(&mut rng);
        let rollup = FAMILY[i % 3];
        // Totals: one row, from the family's tiers whatever the member asked.
        let (st, v) = get(&f.app, &format!("/v1/rollups/{rollup}?{}", range_q(s, e))).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{v}");
        let want = totals(brute(&f.events, None, None, s, e));
        let got = row_totals(&rows[0]);
        assert_eq!(
            (got.0, got.2, got.3, got.4),
            (want.0, want.2, want.3, want.4),
            "{rollup} {v}"
        );
        assert!((got.1 - want.1).abs() < 1e-6);

        // Two videos (a repeated key is IN), grouped by event type.
        let (a, b) = (
            format!("v{}", rng.random_range(0..11)),
            format!("v{}", rng.random_range(0..11)),
        );
        let (st, v) = get(
            &f.app,
            &format!(
                "/v1/rollups/{rollup}?{}&video_id={a}&video_id={b}&group_by=event_type",
                range_q(s, e)
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let mut want: BTreeMap<&str, i64> = BTreeMap::new();
        for ev in f
            .events
            .iter()
            .filter(|ev| (ev.video == a || ev.video == b) && ev.t >= s && ev.t < e)
        {
            *want.entry(ev.kind).or_default() += 1;
        }
        let got: BTreeMap<&str, i64> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["event_type"].as_str().unwrap(),
                    r["events"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "{v}");
    }

    // Hourly buckets of one day, one video.
    let (s, e) = (NOW - 2 * D, NOW - D);
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/rollups/minute_video_events?{}&video_id=v1&granularity=1h",
            range_q(s, e)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for ev in brute(&f.events, Some("v1"), None, s, e) {
        *want.entry(fmt_time(ev.t - ev.t.rem_euclid(H))).or_default() += 1;
    }
    let got: BTreeMap<String, i64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["bucket"].as_str().unwrap().to_string(),
                r["events"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Top 3 videos by events over three days.
    let (s, e) = (NOW - 3 * D, NOW);
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/rollups/hour_video_events?{}&group_by=video_id&order_by=events&limit=3",
            range_q(s, e)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for ev in brute(&f.events, None, None, s, e) {
        *counts.entry(ev.video.as_str()).or_default() += 1;
    }
    let mut want: Vec<(&str, i64)> = counts.into_iter().collect();
    want.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
    want.truncate(3);
    let got: Vec<(&str, i64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["video_id"].as_str().unwrap(),
                r["events"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(v["truncated"], true);

    // Views per channel (the videos dimension) over whole hours.
    for (s, e) in [(NOW - 3 * D, NOW), (NOW - 2 * D + 5 * H, NOW - D + 7 * H)] {
        let (st, v) = get(
            &f.app,
            &format!(
                "/v1/rollups/hour_channel_events?{}&event_type=view&group_by=channel_id",
                range_q(s, e)
            ),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let mut want: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        for ev in brute(&f.events, None, Some("view"), s, e) {
            let w = want.entry(channel_of(&ev.video)).or_default();
            w.0 += 1;
            w.1 += ev.value.unwrap_or(0.0);
        }
        let got: BTreeMap<String, (i64, f64)> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["channel_id"].as_str().unwrap().to_string(),
                    (
                        r["events"].as_i64().unwrap(),
                        r["value_sum"].as_f64().unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(got.len(), 5, "four channels and unknown: {v}");
        assert_eq!(got, want, "{v}");
    }
}

#[tokio::test]
async fn any_rollup_answers_equal_brute_force() {
    check_generic(&fixture(&[]).await).await;
}

#[tokio::test]
async fn rollup_queries_refuse_what_a_rollup_does_not_have_naming_what_it_has() {
    let f = fixture(&[]).await;
    let ok = range_q(NOW - D, NOW);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("/v1/rollups/nope?{ok}"),
            "unknown_rollup",
            "hour_video_events",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&country=de"),
            "unknown_parameter",
            "video_id, event_type",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&window_start=1"),
            "unknown_parameter",
            "`start` and `end`",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&group_by=country"),
            "invalid_parameter",
            "video_id, event_type",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&order_by=views"),
            "invalid_parameter",
            "events, value_sum",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&limit=0"),
            "invalid_parameter",
            "limit",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&granularity=7s"),
            "invalid_parameter",
            "granularity",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&granularity=soon"),
            "invalid_parameter",
            "granularity",
        ),
        (
            format!("/v1/rollups/hour_video_events?{ok}&limit=1&limit=2"),
            "invalid_parameter",
            "more than once",
        ),
        (
            "/v1/rollups/hour_video_events?start=2026-11-27T00:00:30Z&end=2026-11-28T00:00:00Z"
                .into(),
            "unaligned_range",
            "start",
        ),
        (
            "/v1/rollups/hour_video_events".into(),
            "missing_parameter",
            "start",
        ),
    ];
    for (uri, code, names) in cases {
        let (st, v) = get(&f.app, &uri).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(v["error"]["code"], code, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(names), "{uri}: {msg}");
    }
}

/// A rollup of another shape (one key, two measures) in two widths beside
/// the shipped ones: a second family, found from the SQL alone, answered
/// across its tiers.
#[tokio::test]
async fn a_rollup_of_any_shape_is_served_with_its_own_family() {
    let rollups = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/rollups");
    for f in std::fs::read_dir(&shipped).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, rollups.path().join(f.file_name().unwrap())).unwrap();
    }
    for (name, width) in [("hour_type_events", "1 hour"), ("day_type_events", "1 day")] {
        std::fs::write(
            rollups.path().join(format!("{name}.sql")),
            format!(
                "SELECT event_type, date_bin(INTERVAL '{width}', event_time) AS window_start, \
                 count(*) AS n, max(value) AS top_value FROM events \
                 GROUP BY event_type, date_bin(INTERVAL '{width}', event_time)"
            ),
        )
        .unwrap();
    }
    let dir = rollups.path().display().to_string();
    let f = fixture(&[("TALLY__SQL__ROLLUPS_DIR", &dir)]).await;
    let (_, v) = get(&f.app, "/v1/rollups").await;
    let hour = v["rollups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "hour_type_events")
        .unwrap()
        .clone();
    assert_eq!(
        hour["family"],
        serde_json::json!(["day_type_events", "hour_type_events"])
    );
    assert_eq!(hour["measures"][1]["kind"], "max");
    // Two days and five hours: day rows in the middle, hour rows at the edges.
    let (s, e) = (NOW - 3 * D + 19 * H, NOW);
    let (st, v) = get(
        &f.app,
        &format!(
            "/v1/rollups/hour_type_events?{}&group_by=event_type",
            range_q(s, e)
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut want: BTreeMap<String, (i64, Option<f64>)> = BTreeMap::new();
    for ev in brute(&f.events, None, None, s, e) {
        let w = want.entry(ev.kind.to_string()).or_default();
        w.0 += 1;
        if let Some(x) = ev.value {
            w.1 = Some(w.1.map_or(x, |m: f64| m.max(x)));
        }
    }
    let got: BTreeMap<String, (i64, Option<f64>)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event_type"].as_str().unwrap().to_string(),
                (r["n"].as_i64().unwrap(), r["top_value"].as_f64()),
            )
        })
        .collect();
    assert_eq!(got, want);
    // An hour boundary is fine; a minute one is not (the family's finest is 1h).
    let (st, v) = get(
        &f.app,
        &format!("/v1/rollups/day_type_events?{}", range_q(s + 30 * M, e)),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "unaligned_range");
}
