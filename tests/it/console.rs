//! The web console in a real browser: headless Chromium (Debian's
//! `chromium`) loads each page from a running `tally run` fed by the test's
//! producer, and the test checks what a person sees against the API and the
//! exact data: numbers equal, a chart drawn, no script error. With
//! `TALLY_CONSOLE_SCREENSHOTS=DIR` it also saves a screenshot per page.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tally_tests::*;

use crate::api::metric;

const READ: &str = "console-read-token-0123456789";

/// Chromium: `$TALLY_TEST_CHROMIUM`, else `scripts/chromium.sh`'s.
fn chromium() -> String {
    if let Some(p) = std::env::var("TALLY_TEST_CHROMIUM")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return p;
    }
    let out = Command::new(workspace_root().join("scripts/chromium.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/chromium.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The page's DOM after its scripts ran (and its fetches answered), and
/// the browser's log (console messages land there).
fn render(browser: &str, profile: &Path, url: &str, screenshot: Option<&Path>) -> (String, String) {
    // Bounded: a browser that hangs fails the test instead of the run.
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "90", browser]);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        "--window-size=1280,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The text of the element with `data-k="key"`.
fn shown(dom: &str, key: &str) -> String {
    let re = regex::Regex::new(&format!(r#"data-k="{key}"[^>]*>([^<]*)<"#)).unwrap();
    re.captures(dom)
        .map(|c| c[1].to_string())
        .unwrap_or_else(|| panic!("no {key} on the page:\n{dom}"))
}

fn group(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn number(s: &str) -> i64 {
    let digits: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .collect();
    digits
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_page_shows_what_the_api_says() {
    let browser = chromium();
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("console");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(17, 3_000, now);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__API__READ_TOKENS", READ);
    env.set("TALLY__VERIFY__INTERVAL", "1s");
    // Close raw files fast: the dead letters and events are then queryable.
    env.set("TALLY__STORAGE__ARCHIVE_ROLL_INTERVAL", "1s");
    env.set(
        "TALLY__REPORT__DIMS_DIR",
        workspace_root().join("data/dims").to_str().unwrap(),
    );
    env.set(
        "TALLY__REPORT__SQL_DIR",
        workspace_root().join("sql/reports").to_str().unwrap(),
    );
    let api = env.api;
    let mut tally = Tally::start(&env);
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    wait_http_ok(api, "/readyz", Duration::from_secs(60));
    let accepted = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { .. }))
        .count() as i64;
    let rejected = messages.len() as i64 - accepted;
    // The dead letters' files are committed with their batches; wait until
    // SQL sees all of them (and the verify has run once).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (st, body) = http(
            api,
            "POST",
            "/v1/sql",
            Some(READ),
            br#"{"query": "SELECT count(*) AS n FROM dead_letters"}"#,
        );
        let m = http(api, "GET", "/metrics", None, b"").1;
        let seen = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["rows"][0]["n"].as_i64());
        if st == 200 && seen == Some(rejected) && metric(&m, "tally_verify_runs_total") >= 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st} {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let shots = std::env::var_os("TALLY_CONSOLE_SCREENSHOTS").map(std::path::PathBuf::from);
    let base = format!("http://127.0.0.1:{}/", api.port());
    let profile = dir.path().join("chromium");
    let page = |hash: &str, name: &str| {
        let url = format!("{base}#{hash}&token={READ}");
        let (dom, log) = render(&browser, &profile, &url, None);
        assert!(
            dom.contains(r#"data-ready="1""#),
            "{name} finished loading:\n{dom}\n{log}"
        );
        assert!(
            dom.contains(r#"data-errors="0""#),
            "{name}: a script error:\n{dom}\n{log}"
        );
        for line in log.lines().filter(|l| l.contains("CONSOLE")) {
            assert!(
                !line.contains("Uncaught") && !line.to_lowercase().contains("error"),
                "{name}: {line}"
            );
        }
        if let Some(dir) = &shots {
            std::fs::create_dir_all(dir).unwrap();
            render(
                &browser,
                &profile,
                &url,
                Some(&dir.join(format!("console-{name}.png"))),
            );
        }
        dom
    };

    // Pipeline: the totals and the partitions equal /metrics.
    let dom = page("page=pipeline", "pipeline");
    let m = http(api, "GET", "/metrics", None, b"").1;
    assert_eq!(number(&shown(&dom, "events_accepted")), accepted);
    assert_eq!(number(&shown(&dom, "events_rejected")), rejected);
    assert_eq!(metric(&m, "tally_events_accepted_total") as i64, accepted);
    assert_eq!(shown(&dom, "ready"), "ready");
    assert_eq!(shown(&dom, "verify_drift"), "0 rows");
    let re = regex::Regex::new(
        r#"data-col="partition">([0-9]+)</td><td class="num" data-col="committed_offset">([0-9,]+)<"#,
    )
    .unwrap();
    let shown_offsets: std::collections::BTreeMap<i32, i64> = re
        .captures_iter(&dom)
        .map(|c| (c[1].parse().unwrap(), number(&c[2])))
        .collect();
    assert_eq!(shown_offsets, end, "committed offsets per partition");

    // Rollups: views per hour over two days, grouped by event type, as a
    // table and a chart; the rows and their total equal the API's answer.
    let e = now - now.rem_euclid(3_600_000) + 3_600_000;
    let s = e - 2 * 86_400_000;
    let (st, e_s) = (rfc3339(s), rfc3339(e));
    let hash = format!(
        "page=rollups&rollup=hour_video_events&start={st}&end={e_s}&group_by=event_type&granularity=1h"
    );
    let dom = page(&hash, "rollups");
    let want = get_json(
        api,
        &format!(
            "/v1/rollups/hour_video_events?start={}&end={}&group_by=event_type&granularity=1h",
            st.replace(':', "%3A"),
            e_s.replace(':', "%3A")
        ),
        Some(READ),
    );
    let rows = want["rows"].as_array().unwrap();
    assert!(!rows.is_empty());
    assert!(
        shown(&dom, "row_count").starts_with(&format!("{} rows", rows.len())),
        "{}",
        shown(&dom, "row_count")
    );
    let total: i64 = rows.iter().map(|r| r["events"].as_i64().unwrap()).sum();
    let re = regex::Regex::new(r#"data-col="events">([0-9,]+)<"#).unwrap();
    let on_page: i64 = re.captures_iter(&dom).map(|c| number(&c[1])).sum();
    assert_eq!(on_page, total, "the table's events add up to the API's");
    assert!(
        dom.contains("<svg") && dom.contains("<polyline"),
        "a chart is drawn"
    );
    assert!(
        dom.contains("hour_channel_events"),
        "every rollup is listed"
    );

    // Dead letters: the count and the reasons equal the data set's.
    let dom = page("page=dlq", "dlq");
    assert_eq!(number(&shown(&dom, "dlq_total")), rejected);
    assert!(
        dom.contains("tally dlq replay"),
        "the replay command is shown"
    );

    // Reports: this month's report in the page, with its total.
    let month = chrono::DateTime::from_timestamp_millis(now)
        .unwrap()
        .format("%Y-%m")
        .to_string();
    let dom = page(&format!("page=reports&month={month}"), "reports");
    assert_eq!(
        shown(&dom, "report_title"),
        format!(
            "Monthly report · {}",
            chrono::DateTime::from_timestamp_millis(now)
                .unwrap()
                .format("%B %Y")
        )
    );
    // The report's own total (this month's events), in the frame.
    let month_start = chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis();
    let this_month = messages
        .iter()
        .filter(|m| matches!(m.expect, Expect::Accepted { time_ms, .. } if time_ms >= month_start))
        .count() as i64;
    assert!(
        dom.contains(&format!("&gt;{}&lt;", group(this_month))),
        "the report shows {this_month} events:\n{dom}"
    );
    assert!(dom.contains("csv-download"));

    // The page itself: served with a policy that forbids anything remote.
    let (st, head) = http(api, "GET", "/", None, b"");
    assert_eq!(st, 200);
    assert!(
        !head.contains("http://") || !head.contains("<script src"),
        "no remote scripts"
    );
    drop(broker);
    let _ = tally.stop();
}
