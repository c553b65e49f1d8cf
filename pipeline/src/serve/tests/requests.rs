//! The API contract for bad and hostile requests: 400s naming the parameter,
//! tokens, overload, slow clients, content types, hosts.

use super::*;

#[tokio::test]
async fn bad_requests_are_400_and_name_the_parameter() {
    let f = fixture(&[]).await;
    let ok = range_q(NOW - D, NOW);
    let long_id = "x".repeat(257);
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("/v1/count?{ok}"), "missing_parameter", "video_id"),
        (
            "/v1/count?video_id=v1&end=2026-11-28T00:00:00Z".into(),
            "missing_parameter",
            "start",
        ),
        (
            format!(
                "/v1/count?video_id=v1&start=yesterday&end={}",
                enc(&fmt_time(NOW))
            ),
            "invalid_parameter",
            "start",
        ),
        (
            format!(
                "/v1/count?video_id=v1&start={}&end=2026-13-01T00:00:00Z",
                enc(&fmt_time(NOW))
            ),
            "invalid_parameter",
            "end",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW, NOW)),
            "invalid_range",
            "start",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW, NOW - H)),
            "invalid_range",
            "end",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW - 401 * D, NOW)),
            "range_too_long",
            "api.max_range",
        ),
        (
            format!("/v1/count?video_id=v1&{}", range_q(NOW - D + 1_000, NOW)),
            "unaligned_range",
            "1d, 1h, 1m",
        ),
        (
            format!("/v1/count?video_id={long_id}&{ok}"),
            "invalid_parameter",
            "video_id",
        ),
        (
            format!("/v1/count?video_id=v1&event_type={long_id}&{ok}"),
            "invalid_parameter",
            "event_type",
        ),
        (
            format!("/v1/count?video_id=v1&video=v2&{ok}"),
            "unknown_parameter",
            "video",
        ),
        (
            format!("/v1/count?video_id=v1&video_id=v2&{ok}"),
            "invalid_parameter",
            "video_id",
        ),
        (
            format!("/v1/stats?video_id=v1&{ok}"),
            "missing_parameter",
            "function",
        ),
        (
            format!("/v1/stats?video_id=v1&function=median&{ok}"),
            "invalid_parameter",
            "function",
        ),
        (
            format!("/v1/series?video_id=v1&granularity=week&{ok}"),
            "invalid_parameter",
            "granularity",
        ),
        (
            format!(
                "/v1/series?video_id=v1&granularity=minute&{}",
                range_q(NOW - 30 * D, NOW)
            ),
            "range_too_long",
            "granularity",
        ),
        (
            format!(
                "/v1/series?video_id=v1&granularity=day&{}",
                range_q(NOW - D - H, NOW)
            ),
            "unaligned_range",
            "start",
        ),
        (
            format!("/v1/top?limit=1001&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            format!("/v1/top?limit=0&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            format!("/v1/top?limit=ten&{ok}"),
            "invalid_parameter",
            "limit",
        ),
        (
            "/v1/top?start=%FF&end=x".into(),
            "invalid_parameter",
            "start",
        ),
    ];
    for (uri, code, names) in cases {
        let (st, v) = get(&f.app, &uri).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert_eq!(v["error"]["code"], code, "{uri}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(names),
            "{uri}: message {msg:?} should name {names}"
        );
    }
    // SQL never comes from input: an injection string is just an unknown video.
    let evil = "v1'%3B%20DROP%20TABLE%20hour_video_events%3B--";
    let (st, v) = get(&f.app, &format!("/v1/count?video_id={evil}&{ok}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 0);
    let (st, v) = get(&f.app, &format!("/v1/count?video_id=v1&{ok}")).await;
    assert_eq!(st, StatusCode::OK, "the table is intact: {v}");
    let (st, v) = get(&f.app, "/v1/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn post_events_validates_all_or_nothing_with_the_pipeline_decoder() {
    let f = fixture(&[("TALLY__API__MAX_BODY", "2KiB")]).await;
    let now = chrono::Utc::now().timestamp_millis();
    let good = format!(r#"{{"video_id":"v1","event_type":"view","event_time":{now}}}"#);
    let body = format!(
        r#"[{good}, {{"video_id":"v1","event_type":"VIEW","event_time":{now}}}, {good}, "text", {{"event_type":"view","event_time":{now}}}]"#
    );
    let (st, v) = call(&f.app, "POST", "/v1/events", None, body.into_bytes()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_events");
    let listed: Vec<(i64, String)> = v["error"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_i64().unwrap(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, "invalid_value".into()),
            (3, "not_object".into()),
            (4, "missing_field".into())
        ]
    );
    let ndjson = format!("{good}\n{{not json\n");
    let (st, v) = call(&f.app, "POST", "/v1/events", None, ndjson.into_bytes()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["events"][0]["index"], 1);
    assert_eq!(v["error"]["events"][0]["reason"], "not_json");

    for (body, code) in [
        (Vec::new(), "invalid_body"),
        (b"[{}, ".to_vec(), "invalid_body"),
        (vec![b' '; 4096], "body_too_large"),
    ] {
        let (st, v) = call(&f.app, "POST", "/v1/events", None, body).await;
        assert!(
            st == StatusCode::BAD_REQUEST || st == StatusCode::PAYLOAD_TOO_LARGE,
            "{v}"
        );
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    let m = f.state.metrics.render(false, None, 0);
    assert!(m.contains("tally_api_events_invalid_total 4\n"), "{m}");
}

#[tokio::test]
async fn tokens_guard_reads_and_writes_separately() {
    let f = fixture(&[
        ("TALLY__API__READ_TOKENS", READ),
        ("TALLY__API__WRITE_TOKENS", WRITE),
    ])
    .await;
    let uri = format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW));
    let (st, v) = call(&f.app, "GET", &uri, None, Vec::new()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    assert_eq!(
        call(
            &f.app,
            "GET",
            &uri,
            Some("read-token-0123456788"),
            Vec::new()
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.app, "GET", &uri, Some(WRITE), Vec::new()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.app, "GET", &uri, Some(READ), Vec::new()).await.0,
        StatusCode::OK
    );
    let (st, _) = call(&f.app, "POST", "/v1/events", Some(READ), b"[{}]".to_vec()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = call(&f.app, "POST", "/v1/events", Some(WRITE), b"[{}]".to_vec()).await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "the write token passes; the event is invalid: {v}"
    );
    for open in ["/metrics", "/livez", "/openapi.json"] {
        assert_eq!(
            call(&f.app, "GET", open, None, Vec::new()).await.0,
            StatusCode::OK,
            "{open}"
        );
    }
    // Tokens never appear in the effective config.
    let shown = f.state.cfg.read_tokens.clone();
    assert!(!format!("{shown:?}").contains(READ));
}

#[tokio::test]
async fn overload_is_an_immediate_503_and_health_stays_open() {
    let f = fixture(&[("TALLY__API__MAX_CONCURRENCY", "2")]).await;
    let held = f.state.shed.clone().acquire_many_owned(2).await.unwrap();
    let (st, v) = get(
        &f.app,
        &format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW)),
    )
    .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "overloaded");
    assert_eq!(get(&f.app, "/livez").await.0, StatusCode::OK);
    drop(held);
    assert_eq!(
        get(
            &f.app,
            &format!("/v1/count?video_id=v1&{}", range_q(NOW - D, NOW))
        )
        .await
        .0,
        StatusCode::OK
    );
    // Requests are counted by route template, never by id.
    let m = f.state.metrics.render(false, None, 0);
    assert!(
        m.contains("tally_http_requests_total{route=\"/v1/count\",status=\"503\"} 1"),
        "{m}"
    );
    assert!(!m.contains("v1\""), "no video id in labels: {m}");
    let (st, doc) = get(&f.app, "/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    for path in [
        "/v1/count",
        "/v1/stats",
        "/v1/series",
        "/v1/top",
        "/v1/events",
        "/metrics",
        "/livez",
        "/readyz",
        "/v1/rollups",
        "/v1/rollups/hour_video_events",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    // Each rollup's path carries its real keys and measures.
    let op = &doc["paths"]["/v1/rollups/hour_video_events"]["get"];
    let names: Vec<&str> = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"video_id") && names.contains(&"event_type"),
        "{names:?}"
    );
    let order = op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "order_by")
        .unwrap();
    assert!(order["schema"]["enum"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("value_max")));
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let f = fixture(&[
        ("TALLY__API__LISTEN", listen.as_str()),
        ("TALLY__API__REQUEST_TIMEOUT", "1s"),
        ("TALLY__API__MAX_CONNECTIONS", "2"),
    ])
    .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = crate::serve::bind(f.state.clone(), async {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let server = tokio::spawn(server);
    let addr: std::net::SocketAddr = listen.parse().unwrap();

    // A client trickling its request head is disconnected after the timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHo").await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server kept a half-sent request open for 5 s"
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(900),
        "cut off too early: {:?}",
        t.elapsed()
    );

    // Two open connections fill api.max_connections = 2; a third is closed at once.
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(format!("GET /livez HTTP/1.1\r\nHost: {listen}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    a.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = c
        .write_all(format!("GET /livez HTTP/1.1\r\nHost: {listen}\r\n\r\n").as_bytes())
        .await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), c.read_to_end(&mut rest)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection was served: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // Graceful shutdown returns.
    let _ = stop_tx.send(());
    tokio::time::timeout(std::time::Duration::from_secs(15), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A write needs its token before the body is read, and a JSON content
/// type (a cross-origin page can send text/plain without a preflight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_authorized_first_and_need_a_json_content_type() {
    let f = fixture(&[
        ("TALLY__API__WRITE_TOKENS", WRITE),
        ("TALLY__API__MAX_BODY", "1KiB"),
    ])
    .await;
    // No token: 401 even for a body over the limit (it is never read).
    let (st, v) = call_with(
        &f.app,
        "POST",
        "/v1/events",
        None,
        &[("content-type", "application/json")],
        vec![b' '; 4096],
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data"),
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let (st, v) = call_with(
            &f.app,
            "POST",
            "/v1/events",
            Some(WRITE),
            &headers,
            b"[{}]".to_vec(),
        )
        .await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{v}"
        );
    }
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "application/x-ndjson",
    ] {
        let (st, v) = call_with(
            &f.app,
            "POST",
            "/v1/events",
            Some(WRITE),
            &[("content-type", ct)],
            b"[{}]".to_vec(),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{ct}: passes the gate, the event is invalid: {v}"
        );
    }
}

/// A body of many invalid events lists the first 1,000 and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_listed_up_to_a_cap_and_counted() {
    let f = fixture(&[]).await;
    let body = "1\n".repeat(5_000).into_bytes();
    let (st, v) = call(&f.app, "POST", "/v1/events", None, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["events"].as_array().unwrap().len(), 1000);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("5000 of 5000 events are invalid"),
        "{v}"
    );
    let m = f.state.metrics.render(false, None, 0);
    assert!(m.contains("tally_api_events_invalid_total 5000\n"), "{m}");
}

/// DNS rebinding: a request addressed to a name the API is not known by gets 421.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_other_hosts_are_refused() {
    let f = fixture(&[]).await;
    let listen = f.state.cfg.listen;
    let ok = [
        listen.to_string(),
        "localhost".into(),
        format!("localhost:{}", listen.port()),
        "127.0.0.1".into(),
    ];
    for host in &ok {
        let (st, v) = call_with(&f.app, "GET", "/livez", None, &[("host", host)], Vec::new()).await;
        assert_eq!(st, StatusCode::OK, "{host}: {v}");
    }
    let (st, v) = call_with(
        &f.app,
        "GET",
        "/v1/count?video_id=v1",
        None,
        &[("host", "evil.example:8080")],
        Vec::new(),
    )
    .await;
    assert_eq!(st, StatusCode::MISDIRECTED_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.allowed_hosts"),
        "{v}"
    );
}

#[test]
fn host_rules_follow_the_listen_address_and_the_allow_list() {
    use crate::serve::http::host_allowed;
    let lo: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let v6: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
    assert!(host_allowed("127.0.0.1:8080", lo, &[]));
    assert!(host_allowed("localhost", lo, &[]));
    assert!(host_allowed("[::1]:8080", v6, &[]));
    assert!(!host_allowed("attacker.example", lo, &[]));
    assert!(!host_allowed("10.0.0.5:8080", lo, &[]));
    assert!(host_allowed(
        "tally.internal:8080",
        lo,
        &["tally.internal".into()]
    ));
    assert!(host_allowed("anything", any, &[]));
    assert!(!host_allowed("anything", any, &["tally.internal".into()]));
}

#[test]
fn half_protected_apis_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let warn = |env: &[(&str, &str)]| {
        crate::serve::auth_warnings(&crate::testing::settings(dir.path(), env).api)
    };
    assert!(warn(&[]).is_empty());
    assert!(warn(&[
        ("TALLY__API__READ_TOKENS", READ),
        ("TALLY__API__WRITE_TOKENS", WRITE)
    ])
    .is_empty());
    let w = warn(&[("TALLY__API__READ_TOKENS", READ)]);
    assert!(
        w.len() == 1 && w[0].contains("api.write_tokens is empty"),
        "{w:?}"
    );
    let w = warn(&[("TALLY__API__WRITE_TOKENS", WRITE)]);
    assert!(
        w.len() == 1 && w[0].contains("api.read_tokens is empty"),
        "{w:?}"
    );
    assert!(!w[0].contains(WRITE), "no token in the message");
}
