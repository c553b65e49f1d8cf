//! The monthly report over a real serving store seeded through the pipeline's
//! stages, checked against an exact computation over the events and the
//! dimension CSVs; the CSV output is also compared with golden files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::render::{cells, group_digits};
use super::{build as build_span, monthly, write, Format, Month, MonthlyReport, ReportQuery, Span};

const H: i64 = 3_600_000;
const D: i64 = 24 * H;

#[derive(Debug, Clone)]
struct Ev {
    video: String,
    kind: &'static str,
    t: i64,
    value: Option<i64>,
}

fn month() -> Month {
    Month {
        year: 2026,
        month: 11,
    }
}

/// Events from mid-September to mid-December 2026 (only October and November
/// count), over 40 videos of the dims plus two unknown ones; seeded.
fn events() -> Vec<Ev> {
    let mut rng = ChaCha12Rng::seed_from_u64(42);
    let kinds = ["view", "like", "share"];
    let start = Month {
        year: 2026,
        month: 9,
    }
    .start_ms()
        + 15 * D;
    let end = Month {
        year: 2026,
        month: 12,
    }
    .start_ms()
        + 15 * D;
    (0..12_000)
        .map(|i| {
            // Skewed popularity: low ids far more often.
            let r: u32 = rng.random_range(0..40);
            let v = r * rng.random_range(0..40u32) / 40;
            let video = match i % 97 {
                0 => "vid-99999".to_string(),
                1 => "zz-unknown".to_string(),
                _ => format!("vid-{v:05}"),
            };
            let kind = kinds[rng.random_range(0..3)];
            // November gets more traffic than October.
            let t = if rng.random_bool(0.3) {
                month().start_ms() + rng.random_range(0..30 * D)
            } else {
                rng.random_range(start..end)
            };
            Ev {
                video,
                kind,
                t,
                value: (kind == "view").then(|| rng.random_range(1..=600)),
            }
        })
        .collect()
}

fn payloads(evs: &[Ev]) -> Vec<String> {
    evs.iter()
        .map(|e| {
            let v = e
                .value
                .map(|v| format!(r#","value":{v}"#))
                .unwrap_or_default();
            format!(
                r#"{{"video_id":"{}","event_type":"{}","event_time":{}{v}}}"#,
                e.video, e.kind, e.t
            )
        })
        .collect()
}

async fn build(dir: &std::path::Path) -> (MonthlyReport, Vec<Ev>) {
    // Late enough that every event is in the past, so it is accepted.
    let now = Month {
        year: 2027,
        month: 1,
    }
    .start_ms();
    let settings = crate::testing::settings(dir, &[("TALLY__DECODE__MAX_EVENT_AGE", "400days")]);
    let evs = events();
    crate::testing::seed(&settings, &payloads(&evs), now, 3).await;
    (monthly(&settings, month()).await.unwrap(), evs)
}

/// Dims parsed independently of DataFusion: video -> (title, channel id), channel -> name.
fn dims() -> (BTreeMap<String, (String, String)>, BTreeMap<String, String>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dims");
    let videos = std::fs::read_to_string(root.join("videos.csv")).unwrap();
    let channels = std::fs::read_to_string(root.join("channels.csv")).unwrap();
    let v = videos
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), (f[1].to_string(), f[2].to_string()))
        })
        .collect();
    let c = channels
        .lines()
        .skip(1)
        .map(|l| {
            let (id, name) = l.split_once(',').unwrap();
            (id.to_string(), name.to_string())
        })
        .collect();
    (v, c)
}

fn table(r: &MonthlyReport, name: &str) -> Vec<BTreeMap<String, String>> {
    let t = r
        .tables
        .iter()
        .find(|t| t.query.name == name)
        .unwrap_or_else(|| panic!("no table {name}"));
    let names: Vec<String> = t
        .batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    cells(&t.batch)
        .into_iter()
        .map(|row| names.iter().cloned().zip(row).collect())
        .collect()
}

fn num(s: &str) -> Option<f64> {
    (!s.is_empty()).then(|| {
        s.parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {s:?}"))
    })
}

fn pct(cur: u64, prev: u64) -> Option<f64> {
    (prev > 0).then(|| (1000.0 * (cur as f64 - prev as f64) / prev as f64).round() / 10.0)
}

fn close(a: Option<f64>, b: Option<f64>, what: &str) {
    match (a, b) {
        (Some(x), Some(y)) => assert!(
            (x - y).abs() < 1e-6 * y.abs().max(1.0),
            "{what}: {x} != {y}"
        ),
        (None, None) => {}
        _ => panic!("{what}: {a:?} != {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_numbers_equal_an_exact_computation() {
    let dir = tempfile::tempdir().unwrap();
    let (r, evs) = build(dir.path()).await;
    let (videos, channels) = dims();
    let (m0, m1, p0) = (
        month().start_ms(),
        month().end_ms(),
        month().prev().start_ms(),
    );
    let cur: Vec<&Ev> = evs.iter().filter(|e| e.t >= m0 && e.t < m1).collect();
    let prev: Vec<&Ev> = evs.iter().filter(|e| e.t >= p0 && e.t < m0).collect();
    assert!(
        cur.len() > 3000 && prev.len() > 1000,
        "the data set covers both months"
    );
    let channel_of = |v: &str| videos.get(v).map(|(_, c)| c.clone());

    // Summary.
    let s = &table(&r, "summary")[0];
    assert_eq!(num(&s["events"]), Some(cur.len() as f64));
    assert_eq!(num(&s["prev_events"]), Some(prev.len() as f64));
    close(
        num(&s["change_pct"]),
        pct(cur.len() as u64, prev.len() as u64),
        "summary change_pct",
    );
    let active: BTreeSet<&str> = cur.iter().map(|e| e.video.as_str()).collect();
    assert_eq!(num(&s["active_videos"]), Some(active.len() as f64));
    let active_channels: BTreeSet<String> = active.iter().filter_map(|v| channel_of(v)).collect();
    assert_eq!(
        num(&s["active_channels"]),
        Some(active_channels.len() as f64)
    );

    // Totals by event type.
    let totals = table(&r, "totals_by_event_type");
    assert_eq!(totals.len(), 3);
    let mut last = f64::INFINITY;
    for row in &totals {
        let k = row["event_type"].as_str();
        let c: Vec<&&Ev> = cur.iter().filter(|e| e.kind == k).collect();
        let p = prev.iter().filter(|e| e.kind == k).count() as u64;
        let events = num(&row["events"]).unwrap();
        assert_eq!(events, c.len() as f64, "{k} events");
        assert!(events <= last, "sorted by events");
        last = events;
        assert_eq!(num(&row["prev_events"]), Some(p as f64), "{k} prev");
        close(
            num(&row["change_pct"]),
            pct(c.len() as u64, p),
            "change_pct",
        );
        let values: Vec<i64> = c.iter().filter_map(|e| e.value).collect();
        let sum: i64 = values.iter().sum();
        close(
            num(&row["value_sum"]),
            (!values.is_empty()).then_some(sum as f64),
            "value_sum",
        );
        let avg = (!values.is_empty())
            .then(|| (100.0 * sum as f64 / values.len() as f64).round() / 100.0);
        close(num(&row["value_avg"]), avg, "value_avg");
    }

    // Daily trend: every day of November times every event type.
    let daily = table(&r, "daily_trend");
    assert_eq!(daily.len(), 30 * 3);
    for row in &daily {
        let day = chrono::NaiveDate::parse_from_str(&row["day"], "%Y-%m-%d").unwrap();
        let d0 = day
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis();
        let n = cur
            .iter()
            .filter(|e| e.kind == row["event_type"] && e.t >= d0 && e.t < d0 + D)
            .count();
        assert_eq!(
            num(&row["events"]),
            Some(n as f64),
            "{} {}",
            row["day"],
            row["event_type"]
        );
    }

    // Top videos.
    let mut per_video: BTreeMap<&str, (u64, [u64; 3], u64)> = BTreeMap::new();
    for e in &cur {
        let x = per_video.entry(&e.video).or_default();
        x.0 += 1;
        x.1[["view", "like", "share"]
            .iter()
            .position(|k| *k == e.kind)
            .unwrap()] += 1;
    }
    for e in &prev {
        if let Some(x) = per_video.get_mut(e.video.as_str()) {
            x.2 += 1;
        }
    }
    let mut ranked: Vec<(&str, (u64, [u64; 3], u64))> = per_video.into_iter().collect();
    ranked.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    let top = table(&r, "top_videos");
    assert_eq!(top.len(), 10);
    for (row, (video, (events, by_kind, p))) in top.iter().zip(&ranked) {
        assert_eq!(row["video_id"], *video);
        let (title, channel) = videos
            .get(*video)
            .cloned()
            .unwrap_or_else(|| (video.to_string(), String::new()));
        assert_eq!(row["title"], title);
        assert_eq!(
            row["channel"],
            channels
                .get(&channel)
                .cloned()
                .unwrap_or_else(|| "(unknown)".into())
        );
        assert_eq!(num(&row["events"]), Some(*events as f64));
        assert_eq!(
            [num(&row["views"]), num(&row["likes"]), num(&row["shares"])],
            by_kind.map(|n| Some(n as f64))
        );
        assert_eq!(num(&row["prev_events"]), Some(*p as f64));
        close(
            num(&row["change_pct"]),
            pct(*events, *p),
            "video change_pct",
        );
    }

    // Top channels ("" = videos missing from the dims).
    let mut per_channel: BTreeMap<String, (BTreeSet<&str>, u64, u64)> = BTreeMap::new();
    for e in &cur {
        let x = per_channel
            .entry(channel_of(&e.video).unwrap_or_default())
            .or_default();
        x.0.insert(&e.video);
        x.1 += 1;
    }
    for e in &prev {
        if let Some(x) = per_channel.get_mut(&channel_of(&e.video).unwrap_or_default()) {
            x.2 += 1;
        }
    }
    let name = |c: &str| {
        channels
            .get(c)
            .cloned()
            .unwrap_or_else(|| "(unknown)".into())
    };
    let mut ranked: Vec<(String, (BTreeSet<&str>, u64, u64))> = per_channel.into_iter().collect();
    ranked.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(name(&a.0).cmp(&name(&b.0))));
    let top = table(&r, "top_channels");
    assert_eq!(top.len(), ranked.len().min(10));
    for (row, (channel, (vids, events, p))) in top.iter().zip(&ranked) {
        assert_eq!(row["channel"], name(channel));
        assert_eq!(num(&row["videos"]), Some(vids.len() as f64));
        assert_eq!(num(&row["events"]), Some(*events as f64));
        assert_eq!(num(&row["prev_events"]), Some(*p as f64));
        close(
            num(&row["change_pct"]),
            pct(*events, *p),
            "channel change_pct",
        );
    }

    // The rendered HTML shows the same numbers, is one file and loads nothing.
    let html = super::render::html(&r);
    assert!(
        !html.contains("<script")
            && !html.contains(" src=")
            && !html.contains(" href=")
            && !html.contains("@import")
    );
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "bar charts for totals, videos, channels; a line chart for the trend"
    );
    let section = &html[html.find(r#"<table id="t-top_videos">"#).unwrap()..];
    let section = &section[..section.find("</table>").unwrap()];
    for t in table(&r, "top_videos") {
        let (video, events) = (&t["video_id"], &t["events"]);
        let row_start = section
            .find(&format!("<td>{video}</td>"))
            .unwrap_or_else(|| panic!("{video} in the HTML table"));
        let row = &section[row_start..section[row_start..].find("</tr>").unwrap() + row_start];
        assert!(
            row.contains(&format!(">{}</td>", group_digits(events))),
            "{row}"
        );
    }
    assert!(
        html.contains(&group_digits(&cur.len().to_string())),
        "headline total"
    );
    let md = super::render::markdown(&r);
    assert!(
        md.contains("## Top 10 videos")
            && md.contains(&format!("| {} |", group_digits(&cur.len().to_string())))
    );
}

/// `UPDATE_GOLDEN=1 cargo test ... golden` rewrites the files after a reviewed change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_output_matches_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = build(dir.path()).await;
    let out = dir.path().join("csv");
    let files = write(&r, Format::Csv, &out, false).unwrap();
    assert_eq!(files.len(), 5);
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/report-2026-11");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for f in files {
        let name = f.file_name().unwrap();
        let got = std::fs::read_to_string(&f).unwrap();
        let want_path = golden.join(name);
        if update {
            std::fs::create_dir_all(&golden).unwrap();
            std::fs::write(&want_path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&want_path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
                want_path.display()
            )
        });
        assert_eq!(
            got,
            want,
            "{} differs from the golden file",
            name.to_string_lossy()
        );
    }
}

#[tokio::test]
async fn an_empty_month_renders_and_bad_inputs_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    crate::testing::seed(&settings, &[], 1_795_824_000_000, 1).await;
    let r = monthly(
        &settings,
        Month {
            year: 2020,
            month: 1,
        },
    )
    .await
    .unwrap();
    assert_eq!(table(&r, "summary")[0]["events"], "0");
    assert!(table(&r, "top_videos").is_empty());
    assert!(super::render::html(&r).contains("No events in this month."));

    let bad = crate::testing::settings(dir.path(), &[("TALLY__REPORT__DIMS_DIR", "/nonexistent")]);
    let e = monthly(&bad, month()).await.unwrap_err().to_string();
    assert!(
        e.contains("videos.csv") && e.contains("report.dims_dir"),
        "{e}"
    );
    let bad = crate::testing::settings(dir.path(), &[("TALLY__REPORT__ROLLUP", "nope")]);
    let e = monthly(&bad, month()).await.unwrap_err().to_string();
    assert!(
        e.contains("report.rollup") && e.contains("hour_video_events"),
        "{e}"
    );

    let sql_dir = dir.path().join("reports");
    std::fs::create_dir_all(&sql_dir).unwrap();
    std::fs::write(
        sql_dir.join("10_broken.sql"),
        "SELECT no_such_column FROM hour_video_events",
    )
    .unwrap();
    let bad = crate::testing::settings(
        dir.path(),
        &[("TALLY__REPORT__SQL_DIR", sql_dir.to_str().unwrap())],
    );
    let e = monthly(&bad, month()).await.unwrap_err().to_string();
    assert!(
        e.contains("10_broken.sql") && e.contains("no_such_column"),
        "{e}"
    );
    std::fs::write(
        sql_dir.join("10_broken.sql"),
        "-- chart: bar label=x value=y\nSELECT 1 AS x",
    )
    .unwrap();
    let e = monthly(&bad, month()).await.unwrap_err().to_string();
    assert!(e.contains("10_broken.sql") && e.contains("\"y\""), "{e}");
    // `tally check` plans report queries too, without a serving store.
    let schema = crate::decode::EventSchema::from_config(&bad.schema).unwrap();
    let catalog = crate::testing::catalog(
        &bad.sql.rollups_dir,
        schema.arrow.clone(),
        &bad.schema.time_field,
    )
    .await
    .unwrap();
    let e = super::check(&bad, &catalog).await.unwrap_err().to_string();
    assert!(e.contains("10_broken.sql") && e.contains("\"y\""), "{e}");
    assert_eq!(
        super::check(&settings, &catalog)
            .await
            .unwrap()
            .unwrap()
            .len(),
        5
    );
    std::fs::write(
        sql_dir.join("10_broken.sql"),
        "-- chart: pie\nSELECT 1 AS x",
    )
    .unwrap();
    let e = monthly(&bad, month()).await.unwrap_err().to_string();
    assert!(
        e.contains("10_broken.sql") && e.contains("unknown chart kind"),
        "{e}"
    );
}

#[test]
fn months_and_headers_parse() {
    assert_eq!(
        Month::parse("2026-11"),
        Ok(Month {
            year: 2026,
            month: 11
        })
    );
    for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
        assert!(Month::parse(bad).unwrap_err().contains("YYYY-MM"), "{bad}");
    }
    let jan = Month {
        year: 2027,
        month: 1,
    };
    assert_eq!(
        jan.prev(),
        Month {
            year: 2026,
            month: 12
        }
    );
    assert_eq!(jan.prev().next(), jan);
    assert_eq!(
        crate::serve::http::fmt_time(jan.start_ms()),
        "2027-01-01T00:00:00Z"
    );
    assert_eq!(
        Month::previous_to(jan.start_ms() + 5 * D),
        Month {
            year: 2026,
            month: 12
        }
    );
    let q = ReportQuery::parse(
        std::path::Path::new("sql/reports/30_top_videos.sql"),
        "-- title: Top videos\n-- note: n\n-- chart: bar label=title value=events\nSELECT 1",
    )
    .unwrap();
    assert_eq!(
        (q.name.as_str(), q.title.as_str(), q.note.as_deref()),
        ("top_videos", "Top videos", Some("n"))
    );
    assert_eq!(group_digits("1234567"), "1,234,567");
    assert_eq!(group_digits("-1234.5"), "-1,234.5");
    assert_eq!(group_digits("123"), "123");
    assert_eq!(group_digits("abc"), "abc");
}

/// December 2026 on 10 December: month to date against the same days and
/// hours of November, the last day marked partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_in_progress_is_compared_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let dec = Month {
        year: 2026,
        month: 12,
    };
    let now = dec.start_ms() + 9 * D + 14 * H + 30 * 60_000;
    let settings =
        crate::testing::settings(dir.path(), &[("TALLY__DECODE__MAX_EVENT_AGE", "400days")]);
    let evs: Vec<Ev> = events().into_iter().filter(|e| e.t < now - 1000).collect();
    crate::testing::seed(&settings, &payloads(&evs), now, 3).await;
    let r = build_span(&settings, Span::Month(dec)).await.unwrap();
    assert_eq!(r.period.to_date, Some(now - 1000));
    // The hour of as_of counts in December, so November up to 15:00.
    let prev_end = month().start_ms() + 9 * D + 15 * H;
    assert_eq!(r.period.prev_end, prev_end);
    let cur = evs.iter().filter(|e| e.t >= dec.start_ms()).count();
    let prev = evs
        .iter()
        .filter(|e| e.t >= month().start_ms() && e.t < prev_end)
        .count();
    let whole_nov = evs
        .iter()
        .filter(|e| e.t >= month().start_ms() && e.t < month().end_ms())
        .count();
    assert!(
        cur > 100 && prev > 100 && whole_nov > 2 * prev,
        "{cur} {prev} {whole_nov}"
    );
    let s = &table(&r, "summary")[0];
    assert_eq!(num(&s["events"]), Some(cur as f64));
    assert_eq!(
        num(&s["prev_events"]),
        Some(prev as f64),
        "to date, not all of November"
    );
    close(
        num(&s["change_pct"]),
        pct(cur as u64, prev as u64),
        "change_pct",
    );
    let by_type = table(&r, "totals_by_event_type");
    for row in &by_type {
        let kind = row["event_type"].as_str();
        let want = evs
            .iter()
            .filter(|e| e.kind == kind && e.t >= month().start_ms() && e.t < prev_end)
            .count();
        assert_eq!(num(&row["prev_events"]), Some(want as f64), "{kind}");
    }
    // Ten days, the tenth partial.
    let trend = table(&r, "daily_trend");
    let days: BTreeSet<&str> = trend.iter().map(|r| r["day"].as_str()).collect();
    assert_eq!(days.len(), 10);
    for row in &trend {
        let partial = row["day"] == "2026-12-10";
        assert_eq!(row["partial"], partial.to_string(), "{row:?}");
    }
    let html = super::render::html(&r);
    assert!(
        html.contains("2026-12-10 (partial day)"),
        "the table marks the day"
    );
    assert!(html.contains("12-10 (partial)"), "the chart marks the day");
    assert!(html.contains("to date, compared with the same time of the period before"));
    assert!(html.contains("2026-11-10T15:00:00Z"));
}

#[test]
fn csv_is_crlf_with_formulas_neutralised_and_an_optional_bom() {
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("title", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
    ]));
    let batch = datafusion::arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![
                "=HYPERLINK(\"http://x\",\"y\")",
                "-2+3",
                "+1",
                "@SUM(A1)",
                "plain, with comma",
                "\tx",
            ])),
            Arc::new(Float64Array::from(vec![-5.5, 1.0, 2.0, 3.0, 4.0, 5.0])),
        ],
    )
    .unwrap();
    let csv = super::render::csv(&batch, false);
    assert_eq!(
        csv,
        "title,value\r\n\
         \"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\",-5.5\r\n\
         '-2+3,1.0\r\n\
         '+1,2.0\r\n\
         '@SUM(A1),3.0\r\n\
         \"plain, with comma\",4.0\r\n\
         '\tx,5.0\r\n"
    );
    let with_bom = super::render::csv(&batch, true);
    assert!(with_bom.starts_with('\u{feff}'));
    assert_eq!(&with_bom['\u{feff}'.len_utf8()..], csv);
}
