//! Fault scenarios on the process's limits: hostile API clients, and a
//! full disk under the archive and the serving store.

use std::time::Duration;

use tally_tests::*;

use crate::faults::rss_kib;

/// A tolerant request: write errors (the server may close early, e.g. on an
/// oversized body) are ignored; `0` when no status line came back.
fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ctype = if method == "POST" {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n", body.len());
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .get(9..12)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// API abuse against `tally serve`: injection strings in every parameter,
/// a 1 MB id, absurd ranges and limits, an oversized body, wrong tokens and
/// 10,000 concurrent connections. Nothing crashes or answers 5xx, memory
/// stays bounded, the server answers normally afterwards, and the tables are
/// unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_abuse_leaves_server_and_tables_intact() {
    let dir = test_dir();
    let data = dir.path().join("data");
    let file = dir.path().join("seed.jsonl");
    let now = chrono::Utc::now().timestamp_millis();
    let seed: Vec<u8> = dataset(91, 3_000, now)
        .iter()
        .filter(|m| !m.payload.contains(&b'\n'))
        .flat_map(|m| m.payload.iter().copied().chain([b'\n']))
        .collect();
    std::fs::write(&file, seed).unwrap();
    let (read, write) = ("read-token-0123456789", "write-token-0123456789");
    let mut env = TallyEnv::new("127.0.0.1:1", "abuse", "g", &data);
    env.set("TALLY__API__READ_TOKENS", read);
    env.set("TALLY__API__WRITE_TOKENS", write);
    let out = tally_command()
        .args(["replay", "--file"])
        .arg(&file)
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = data.join("serving.db");
    let counts = || async {
        let mut v = Vec::new();
        for t in [
            "minute_video_events",
            "hour_video_events",
            "day_video_events",
            "tally_offsets",
            "tally_files",
        ] {
            let sql: &'static str =
                Box::leak(format!("SELECT '{t}', count(*) FROM {t}").into_boxed_str());
            v.extend(serving_query_i64(&db, sql).await);
        }
        v
    };
    let before = counts().await;
    let mut serve = Tally::serve(&env);
    let api = env.api;
    wait_http_ok(api, "/livez", Duration::from_secs(30));
    let t = Some(read);
    let day = |ms: i64| rfc3339(ms - ms.rem_euclid(86_400_000));
    let (start, end) = (day(now), day(now + 86_400_000));
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut hit = |method: &str, path: &str, token: Option<&str>, body: &[u8]| {
        let s = raw(api, method, path, token, body);
        assert!(
            s != 0 && s < 500 || s == 503,
            "{method} {} -> {s}",
            &path[..path.len().min(120)]
        );
        *statuses.entry(s).or_default() += 1;
        s
    };

    // Injection strings in every parameter.
    let evil = [
        "' OR 1=1 --",
        "1; DROP TABLE hour_video_events; --",
        "\" UNION SELECT * FROM tally_offsets --",
        "%00",
        "../../etc/passwd",
        "${jndi:ldap://x}",
    ];
    for e in evil {
        let e = e
            .replace('%', "%25")
            .replace(' ', "%20")
            .replace('"', "%22")
            .replace('\'', "%27")
            .replace(';', "%3B")
            .replace('{', "%7B")
            .replace('}', "%7D");
        for (k, path) in [
            (
                "video_id",
                format!("/v1/count?video_id={e}&start={start}&end={end}"),
            ),
            (
                "event_type",
                format!("/v1/count?video_id=v001&event_type={e}&start={start}&end={end}"),
            ),
            (
                "start",
                format!("/v1/count?video_id=v001&start={e}&end={end}"),
            ),
            (
                "end",
                format!("/v1/count?video_id=v001&start={start}&end={e}"),
            ),
            (
                "function",
                format!("/v1/stats?video_id=v001&function={e}&start={start}&end={end}"),
            ),
            (
                "granularity",
                format!("/v1/series?video_id=v001&granularity={e}&start={start}&end={end}"),
            ),
            (
                "limit",
                format!("/v1/top?limit={e}&start={start}&end={end}"),
            ),
        ] {
            let s = hit("GET", &path, t, b"");
            assert!(s == 200 || s == 400, "{k}: {s}");
        }
    }
    // A 1 MB id, absurd ranges and limits.
    let big = "v".repeat(1 << 20);
    hit(
        "GET",
        &format!("/v1/count?video_id={big}&start={start}&end={end}"),
        t,
        b"",
    );
    assert_eq!(
        hit(
            "GET",
            "/v1/count?video_id=v001&start=0001-01-01T00:00:00Z&end=9999-12-31T00:00:00Z",
            t,
            b""
        ),
        400
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/top?limit=99999999999999999999999&start={start}&end={end}"),
            t,
            b""
        ),
        400
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/top?limit=-1&start={start}&end={end}"),
            t,
            b""
        ),
        400
    );
    // An oversized body, wrong and missing tokens.
    assert_eq!(
        hit("POST", "/v1/events", Some(write), &vec![b'x'; 20 << 20]),
        413
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/count?video_id=v001&start={start}&end={end}"),
            Some("wrong-token-0123456789"),
            b""
        ),
        401
    );
    assert_eq!(
        hit(
            "GET",
            &format!("/v1/count?video_id=v001&start={start}&end={end}"),
            None,
            b""
        ),
        401
    );
    assert_eq!(hit("POST", "/v1/events", Some(read), b"[]"), 401);

    // 10,000 concurrent connections (beyond api.max_connections = 4096 they are closed).
    let rss = |pid: u32| rss_kib(pid);
    let rss_before = rss(serve.child.id());
    let mut held = Vec::new();
    for _ in 0..10_000 {
        if let Ok(s) = std::net::TcpStream::connect(api) {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held = rss(serve.child.id());
    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "tally serve survived 10k connections"
    );
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        rss_held < rss_before + 512 * 1024,
        "memory bounded under 10k connections: {rss_before} -> {rss_held} KiB"
    );
    let (s, body) = http(
        api,
        "GET",
        &format!("/v1/count?video_id=v001&start={start}&end={end}"),
        t,
        b"",
    );
    assert_eq!(s, 200, "{body}");

    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "no crash:\n{}",
        serve.log_tail()
    );
    assert!(serve.stop().success());
    assert_eq!(counts().await, before, "tables intact");
    eprintln!("api abuse statuses: {statuses:?}");
    report_faults(&[
        ("hostile_requests", statuses.values().sum()),
        ("concurrent_connections", 10_000),
    ]);
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Write zeros into `path` until the file system says it is full.
fn fill_disk(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = f.sync_all();
    written
}

fn metric(api: std::net::SocketAddr, name: &str) -> f64 {
    let (status, body) = http(api, "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The data directory (archive, dead letters and the SQLite serving store)
/// is a 48 MB tmpfs, filled up mid-ingest: commits fail with ENOSPC and
/// retry (the error is logged and counted in `tally_commit_errors_total`),
/// offsets do not advance, DataFusion still reads the archive (nothing
/// partial is visible), and once space is freed tally resumes by itself and
/// every count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_surfaces_errors_and_resumes_when_space_is_freed() {
    disk_full(false).await;
}

/// The same with only the SQLite serving store on the full tmpfs, so the
/// failure is SQLITE_FULL inside the serving transaction (the archive write
/// succeeds). The failed connection must not poison the pool: tally resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_store_disk_full_inside_the_transaction_resumes() {
    disk_full(true).await;
}

async fn disk_full(store_only: bool) {
    let dir = test_dir();
    let data = dir.path().join("data");
    let full = if store_only {
        dir.path().join("store")
    } else {
        data.clone()
    };
    // The store-only disk holds the SQLite file and its WAL: with 64 KiB
    // pages the WAL grows to about 64 MiB before SQLite's first checkpoint.
    let _tmpfs = Tmpfs::mount(&full, if store_only { "96m" } else { "48m" });
    let broker = Broker::start(dir.path());
    let topic = unique("diskfull");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(81, 12_000, now);
    let (first, second) = messages.split_at(4_000);
    let db = full.join("serving.db");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.log = dir.path().join("tally.log"); // not on the full disk
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    env.set("TALLY__SERVING__URL", &format!("sqlite://{}", db.display()));
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, first).await;
    let end_first = broker.end_offsets(&topic, 2);
    wait_committed(
        &db,
        &topic,
        &end_first,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;

    let filler = full.join("filler");
    let filled = fill_disk(&filler);
    assert!(filled > 0);
    produce(&broker.bootstrap(), &topic, second).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(env.api, "tally_commit_errors_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no commit error surfaced on a full disk:\n{}",
            tally.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = crate::crash::committed_total(&db).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = crate::crash::committed_total(&db).await;
    assert_eq!(
        during, before,
        "offsets do not advance while the disk is full"
    );
    assert_eq!(
        before,
        first.len() as i64,
        "nothing of the second half committed on a full disk"
    );
    assert!(
        tally.child.try_wait().unwrap().is_none(),
        "tally survives a full disk:\n{}",
        tally.log_tail()
    );
    // Whatever is visible in the archive is complete: DataFusion reads it all.
    let raw = data.join("raw/events");
    let rows = datafusion_rows(&[
        format!(
            "CREATE EXTERNAL TABLE events STORED AS PARQUET LOCATION '{}/'",
            raw.display()
        ),
        "SELECT count(*) >= 0 FROM events".into(),
    ])
    .await;
    assert_eq!(rows[0][0], "true");
    // The first write to hit the full disk names the cause: the archive or
    // dead-letter writer reports ENOSPC, SQLite reports SQLITE_FULL.
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("batch commit failed"))
        .collect();
    assert!(
        failures
            .iter()
            .any(|l| l.contains("No space left on device")
                || l.contains("os error 28")
                || l.contains("database or disk is full")),
        "the error names the cause:\n{}",
        failures
            .iter()
            .take(5)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );

    std::fs::remove_file(&filler).unwrap();
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success(), "clean exit: {}", tally.log_tail());
    crate::e2e::verify_outputs_in(&data, &db, &topic, &messages).await;
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    if store_only {
        assert!(
            log.contains("database or disk is full"),
            "SQLite reported the full disk inside the transaction"
        );
    }
    report_faults(&[
        (
            if store_only {
                "serving_store_disk_full"
            } else {
                "disk_full"
            },
            1,
        ),
        (
            "commit_retries",
            log.matches("batch commit failed; retrying").count(),
        ),
    ]);
}
