//! `GET /v1/reports/monthly/{YYYY-MM}.{html|csv|md}` against an exact
//! computation over the fixture's events: November 2026 is in progress at
//! the fixture's `as_of` (27 November, 23:59:59), so it is compared to date.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_report_is_served_to_date_in_three_formats() {
    let f = fixture(&[]).await;
    let nov = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    let (st, v) = get(
        &f.app,
        "/v1/reports/monthly/2026-11.csv?table=totals_by_event_type",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let csv = v.as_str().unwrap().to_string();
    assert!(csv.ends_with("\r\n") && !csv.starts_with('\u{feff}'));
    let mut lines = csv.split("\r\n").filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut seen = 0;
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        let kind = cells[col("event_type")];
        let want = brute(&f.events, None, Some(kind), nov, NOW).count();
        assert_eq!(cells[col("events")], want.to_string(), "{kind}");
        // To date: October 1 up to the same elapsed time, where the
        // fixture has no events (not all of October either).
        assert_eq!(cells[col("prev_events")], "0", "{kind}");
        seen += 1;
    }
    assert_eq!(seen, 3, "{csv}");

    // Every table in one CSV, with a byte-order mark when asked.
    let (st, v) = get(&f.app, "/v1/reports/monthly/2026-11.csv?bom=true").await;
    assert_eq!(st, StatusCode::OK);
    let all = v.as_str().unwrap();
    assert!(all.starts_with('\u{feff}'));
    for title in ["Month at a glance", "Totals by event type", "Daily trend"] {
        assert!(all.contains(&format!("{title}\r\n")), "{title}");
    }

    let (st, v) = get(&f.app, "/v1/reports/monthly/2026-11.html").await;
    assert_eq!(st, StatusCode::OK);
    let html = v.as_str().unwrap();
    assert!(html.contains("Monthly report · November 2026"));
    assert!(html.contains("to date, compared with the same time of the period before"));
    assert!(
        html.contains("2026-11-27 (partial day)"),
        "the last day is partial"
    );
    let total = brute(&f.events, None, None, nov, NOW).count();
    assert!(html.contains(&crate::jobs::report::render::group_digits(
        &total.to_string()
    )));
    let (st, v) = get(&f.app, "/v1/reports/monthly/2026-11.md").await;
    assert_eq!(st, StatusCode::OK);
    assert!(v
        .as_str()
        .unwrap()
        .starts_with("# Monthly report · November 2026"));

    for (uri, names) in [
        ("/v1/reports/monthly/2026-13.html", "YYYY-MM.html"),
        ("/v1/reports/monthly/2026-11.pdf", "YYYY-MM.html"),
        ("/v1/reports/monthly/2026-11", "YYYY-MM.html"),
        (
            "/v1/reports/monthly/2026-11.csv?table=nope",
            "summary, totals_by_event_type, daily_trend, top_videos, top_channels",
        ),
        ("/v1/reports/monthly/2026-11.html?bom=true", "`bom`"),
        ("/v1/reports/monthly/2026-11.csv?bom=yes", "`bom`"),
        ("/v1/reports/monthly/2026-11.csv?month=x", "table, bom"),
    ] {
        let (st, v) = get(&f.app, uri).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{uri}: {message}");
    }
}
