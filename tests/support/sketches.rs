//! The stored sketches, decoded by Python's `datasketches` (the Apache
//! DataSketches C++ library): an independent reader of the bytes tally
//! writes, and an independent union of a key's rows (SQLite: the table and
//! its delta).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use super::*;

/// Per (video, day) of `day_video_uniques`: views, and unique viewers as
/// Python estimates them.
pub type PyUniques = BTreeMap<(String, i64), (i64, f64)>;
/// Per (video, hour) of `hour_video_watch`: value_count, the KLL sketch's
/// n, and its p50 and p95 (each from its own measure's sketch).
pub type PyWatch = BTreeMap<(String, i64), (i64, u64, Option<f64>, Option<f64>)>;

const SCRIPT: &str = r#"
import sys, json
from datasketches import hll_sketch, hll_union, kll_doubles_sketch
rows = {}
for line in sys.stdin:
    r = json.loads(line)
    e = rows.setdefault((r["table"], r["video"], r["w"]), {"count": 0, "parts": []})
    e["count"] += r["count"]
    e["parts"].append([bytes.fromhex(h) if h else None for h in r["sketches"]])
for (table, video, w), e in rows.items():
    out = {"table": table, "video": video, "w": w, "count": e["count"]}
    if table == "day_video_uniques":
        u = hll_union(12)
        for (b,) in e["parts"]:
            if b:
                u.update(hll_sketch.deserialize(b))
        out["unique"] = u.get_estimate()
    else:
        out["q"] = []
        for i, p in enumerate([0.5, 0.95]):
            k = None
            for parts in e["parts"]:
                if parts[i]:
                    s = kll_doubles_sketch.deserialize(parts[i])
                    if k is None:
                        k = s
                    else:
                        k.merge(s)
            out["n"] = 0 if k is None else k.n
            out["q"].append(None if k is None or k.is_empty() else k.get_quantile(p, True))
    print(json.dumps(out))
"#;

async fn sketch_rows(
    db: &Path,
    table: &str,
    count: &str,
    sketches: &[&str],
) -> Vec<serde_json::Value> {
    use sqlx::Row;
    let pg = pg_url(db).is_some();
    let hex = |c: &str| {
        if pg {
            format!("encode({c}, 'hex')")
        } else {
            format!("hex({c})")
        }
    };
    let cols = format!(
        "video_id, window_start, {count}, {}",
        sketches
            .iter()
            .map(|c| hex(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let sql = if pg {
        format!("SELECT {cols} FROM {table}")
    } else {
        format!("SELECT {cols} FROM {table} UNION ALL SELECT {cols} FROM {table}__delta")
    };
    macro_rules! read {
        ($pool:expr) => {{
            let pool = $pool;
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&pool).await.unwrap();
            pool.close().await;
            rows.iter()
                .map(|r| {
                    let parts: Vec<Option<String>> = (0..sketches.len()).map(|i| r.get(3 + i)).collect();
                    serde_json::json!({
                        "table": table, "video": r.get::<String, _>(0), "w": r.get::<i64, _>(1),
                        "count": r.get::<i64, _>(2), "sketches": parts,
                    })
                })
                .collect()
        }};
    }
    match pg_url(db) {
        Some(url) => read!(sqlx::PgPool::connect(url).await.unwrap()),
        None => read!(
            sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
                .await
                .unwrap()
        ),
    }
}

/// The sketch rollups as stored, decoded and merged by Python.
pub async fn python_sketches(db: &Path) -> (PyUniques, PyWatch) {
    let mut input = sketch_rows(db, "day_video_uniques", "views", &["unique_viewers"]).await;
    input.extend(
        sketch_rows(
            db,
            "hour_video_watch",
            "value_count",
            &["value_p50", "value_p95"],
        )
        .await,
    );
    let python = std::env::var("TALLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e} (run `make moto`, which installs datasketches)"));
    let mut stdin = child.stdin.take().unwrap();
    let text: String = input.iter().map(|r| format!("{r}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "python datasketches: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut uniques = PyUniques::new();
    let mut watch = PyWatch::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            v["video"].as_str().unwrap().to_string(),
            v["w"].as_i64().unwrap(),
        );
        let count = v["count"].as_i64().unwrap();
        if v["table"] == "day_video_uniques" {
            uniques.insert(key, (count, v["unique"].as_f64().unwrap()));
        } else {
            watch.insert(
                key,
                (
                    count,
                    v["n"].as_u64().unwrap(),
                    v["q"][0].as_f64(),
                    v["q"][1].as_f64(),
                ),
            );
        }
    }
    (uniques, watch)
}

/// The sketch rollups as stored are within their error of the exact
/// answers: unique viewers within 3 standard errors (lg_k 12: 1.625%),
/// percentiles within the KLL rank error (k 200: 1.65%); counts exact.
pub async fn check_sketches(db: &Path, messages: &[Message]) {
    let want = expected_sketches(messages);
    let (uniques, watch) = python_sketches(db).await;
    assert_eq!(
        uniques.len(),
        want.uniques.len(),
        "day_video_uniques: row count"
    );
    for (k, (views, users)) in &want.uniques {
        let (got_views, est) = uniques[k];
        assert_eq!(got_views, *views, "day_video_uniques {k:?}: views");
        let exact = users.len() as f64;
        assert!(
            (est - exact).abs() <= 3.0 * 0.01625 * exact + 0.5,
            "day_video_uniques {k:?}: {est} vs exact {exact}"
        );
    }
    assert_eq!(watch.len(), want.watch.len(), "hour_video_watch: row count");
    for (k, values) in &want.watch {
        let (count, n, p50, p95) = watch[k];
        assert_eq!(
            (count, n),
            (values.len() as i64, values.len() as u64),
            "hour_video_watch {k:?}: counts"
        );
        for (got, p) in [(p50, 0.5), (p95, 0.95)] {
            let Some(got) = got else {
                assert!(values.is_empty(), "hour_video_watch {k:?}: no p{p}");
                continue;
            };
            let lo = values.partition_point(|v| *v < got) as f64 / values.len() as f64;
            let hi = values.partition_point(|v| *v <= got) as f64 / values.len() as f64;
            assert!(
                lo - 0.0165 <= p && p <= hi + 0.0165,
                "hour_video_watch {k:?} p{p}: {got} ranks {lo}..{hi}"
            );
        }
    }
}
