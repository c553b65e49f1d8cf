//! `POST /v1/sql` over the fixture's serving store: rollups answered
//! exactly (against brute force), every encoding, and the hostile queries a
//! shared service must refuse, each naming its limit.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;

const LIMITS: &[(&str, &str)] = &[
    ("TALLY__API__SQL_MEMORY", "4MiB"),
    ("TALLY__API__SQL_TIMEOUT", "2s"),
    ("TALLY__API__SQL_MAX_ROWS", "1000"),
    ("TALLY__API__SQL_CONCURRENCY", "1"),
];

async fn post_sql(app: &axum::Router, query: &str, accept: &str) -> (StatusCode, Vec<u8>) {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/sql")
        .header("content-type", "application/json")
        .header("accept", accept)
        .body(Body::from(
            serde_json::to_vec(&json!({ "query": query })).unwrap(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 26)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_answers_rollups_exactly_in_every_encoding() {
    let f = fixture(LIMITS).await;
    let q = "SELECT video_id, sum(events) AS n FROM hour_video_events \
             WHERE event_type = 'view' GROUP BY video_id ORDER BY video_id";
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    for e in f.events.iter().filter(|e| e.kind == "view") {
        *want.entry(e.video.clone()).or_default() += 1;
    }
    let (st, body) = post_sql(&f.app, q, "application/json").await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let got: BTreeMap<String, i64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["video_id"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(v["row_count"], want.len());
    assert_eq!(v["columns"][0]["name"], "video_id");

    let (st, body) = post_sql(&f.app, q, "text/csv").await;
    assert_eq!(st, StatusCode::OK);
    let csv = String::from_utf8(body).unwrap();
    assert_eq!(csv.lines().count(), want.len() + 1, "{csv}");
    assert!(csv.starts_with("video_id,n\n"), "{csv}");

    let (st, body) = post_sql(&f.app, q, "application/vnd.apache.arrow.stream").await;
    assert_eq!(st, StatusCode::OK);
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, want.len());

    let (st, body) = post_sql(&f.app, q, "application/vnd.apache.parquet").await;
    assert_eq!(st, StatusCode::OK);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        axum::body::Bytes::from(body),
    )
    .unwrap()
    .build()
    .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, want.len());

    // The archive and the dead letters are tables too (empty here: the
    // fixture commits no files).
    let (st, body) = post_sql(
        &f.app,
        "SELECT count(*) AS n FROM events WHERE dt >= '2026-01-01'",
        "application/json",
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (st, _) = post_sql(
        &f.app,
        "SELECT count(*) FROM dead_letters",
        "application/json",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = post_sql(&f.app, "SELECT 1", "image/png").await;
    assert_eq!(st, StatusCode::NOT_ACCEPTABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_a_400_naming_the_limit() {
    let f = fixture(LIMITS).await;
    for (query, code, names) in [
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "invalid_query",
            "only a SELECT",
        ),
        ("COPY (SELECT 1) TO '/tmp/tally-sql-test.csv'", "invalid_query", "only a SELECT"),
        ("SELECT 1; DROP TABLE events", "invalid_query", "2 statements"),
        ("SET datafusion.execution.batch_size = 1", "invalid_query", "only a SELECT"),
        ("SELECT * FROM read_parquet('/etc/passwd')", "invalid_query", "read_parquet"),
        ("SELECT * FROM read_csv('/etc/passwd')", "invalid_query", "read_csv"),
        ("SELECT * FROM nope", "invalid_query", "nope"),
        (
            "SELECT * FROM generate_series(1, 100000000)",
            "query_limit",
            "api.sql_max_rows",
        ),
        (
            "SELECT count(DISTINCT value % 3000000) FROM generate_series(1, 6000000)",
            "query_limit",
            "api.sql_memory",
        ),
        (
            "SELECT sum(a.value * b.value) FROM generate_series(1, 200000) a CROSS JOIN generate_series(1, 200000) b",
            "query_limit",
            "api.sql_timeout",
        ),
    ] {
        let started = std::time::Instant::now();
        let (st, body) = post_sql(&f.app, query, "application/json").await;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(st, StatusCode::BAD_REQUEST, "{query}: {v}");
        assert_eq!(v["error"]["code"], code, "{query}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(names), "{query}: {message}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(8),
            "{query} was stopped within the limits"
        );
    }
    for body in [&b"{}"[..], b"not json", br#"{"query": 7}"#] {
        let (st, v) = call(&f.app, "POST", "/v1/sql", None, body.to_vec()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    }
    // One query at a time (api.sql_concurrency = 1): a second is refused
    // with a 429 while the first runs.
    let slow = "SELECT sum(a.value * b.value) FROM generate_series(1, 200000) a CROSS JOIN generate_series(1, 200000) b";
    let (a, b) = tokio::join!(post_sql(&f.app, slow, "application/json"), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        post_sql(&f.app, "SELECT 1", "application/json").await
    });
    assert_eq!(a.0, StatusCode::BAD_REQUEST, "the slow one times out");
    assert_eq!(
        b.0,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&b.1)
    );
    assert!(String::from_utf8_lossy(&b.1).contains("api.sql_concurrency"));
}
