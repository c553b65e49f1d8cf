//! Reading what tally wrote: the serving store (SQLite or PostgreSQL) and the
//! archive (through DataFusion), and a fresh PostgreSQL database per test.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A serving store in these tests: the path of a SQLite file, or a
/// `postgres://` URL held in a path (see [`pg_store`]).
pub fn pg_url(db: &Path) -> Option<&str> {
    db.to_str().filter(|s| s.starts_with("postgres://"))
}

/// Does the serving store exist yet?
pub fn store_exists(db: &Path) -> bool {
    pg_url(db).is_some() || db.exists()
}

/// Read a rollup table from the serving store.
pub async fn serving_rollup(db: &Path, table: &str) -> Expected {
    use sqlx::Row;
    // SQLite: batch commits land in `{table}__delta`, folded into `{table}`
    // every so many rows; a key may be in both.
    let sql = match pg_url(db) {
        Some(_) => format!("SELECT video_id, event_type, window_start, events, value_sum, value_min, value_max FROM {table}"),
        None => format!(
            "SELECT video_id, event_type, window_start, sum(events), sum(value_sum), min(value_min), max(value_max) \
             FROM (SELECT * FROM {table} UNION ALL SELECT * FROM {table}__delta) GROUP BY video_id, event_type, window_start"
        ),
    };
    macro_rules! read {
        ($pool:expr) => {{
            let pool = $pool;
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap();
            let mut out = Expected::new();
            for r in rows {
                let f = |i: usize| {
                    r.get::<Option<f64>, _>(i).map(|x| {
                        assert_eq!(x.fract(), 0.0, "integer inputs give integer sums");
                        x as i64
                    })
                };
                out.insert((r.get(0), r.get(1), r.get(2)), (r.get(3), f(4), f(5), f(6)));
            }
            pool.close().await;
            out
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

/// `hour_channel_events` as stored (SQLite: the table and its delta merged).
pub async fn serving_channel_rollup(db: &Path) -> crate::ExpectedChannels {
    use sqlx::Row;
    let sql = match pg_url(db) {
        Some(_) => "SELECT channel_id, event_type, window_start, events, value_sum FROM hour_channel_events".to_string(),
        None => "SELECT channel_id, event_type, window_start, sum(events), sum(value_sum) \
             FROM (SELECT * FROM hour_channel_events UNION ALL SELECT * FROM hour_channel_events__delta) \
             GROUP BY channel_id, event_type, window_start"
            .to_string(),
    };
    macro_rules! read {
        ($pool:expr) => {{
            let pool = $pool;
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap();
            pool.close().await;
            rows.iter()
                .map(|r| {
                    let sum = r.get::<Option<f64>, _>(4).map(|x| x as i64);
                    ((r.get(0), r.get(1), r.get(2)), (r.get(3), sum))
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

pub async fn serving_query_i64(db: &Path, sql: &'static str) -> Vec<(String, i64)> {
    try_serving_query_i64(db, sql).await.unwrap()
}

/// As [`serving_query_i64`], but an error (e.g. the schema is not created
/// yet by a process that just started) is returned, not a panic.
pub async fn try_serving_query_i64(
    db: &Path,
    sql: &'static str,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    use sqlx::Row;
    if let Some(url) = pg_url(db) {
        let pool = sqlx::PgPool::connect(url).await?;
        let rows = sqlx::query(sql).fetch_all(&pool).await;
        pool.close().await;
        return Ok(rows?
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect());
    }
    let url = format!("sqlite://{}?mode=ro", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    let rows = sqlx::query(sql).fetch_all(&pool).await;
    pool.close().await;
    Ok(rows?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect())
}

/// Run a query through DataFusion and return the first column of every row as strings.
pub async fn datafusion_rows(statements: &[String]) -> Vec<Vec<String>> {
    use datafusion::arrow::util::display::ArrayFormatter;
    let ctx = datafusion::prelude::SessionContext::new();
    let mut last = Vec::new();
    for s in statements {
        last = ctx
            .sql(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .collect()
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    for b in last {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap())
            .collect();
        for i in 0..b.num_rows() {
            out.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
        }
    }
    out
}

/// All files under `dir`, relative.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A copy of the shipped `sql/rollups` under `dir/rollups`, for a test
/// that adds or edits a rollup.
pub fn copy_of_rollups(dir: &Path) -> PathBuf {
    let rollups = dir.join("rollups");
    std::fs::create_dir_all(&rollups).unwrap();
    for f in std::fs::read_dir(workspace_root().join("sql/rollups")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, rollups.join(f.file_name().unwrap())).unwrap();
    }
    rollups
}

/// A new PostgreSQL database (on `TALLY_TEST_PG_URL`, default: the server
/// `scripts/postgres.sh` starts) for one test, dropped when this is dropped.
/// `path()` is its URL in the form the store helpers accept.
pub struct PgStore {
    pub url: String,
    base: String,
    name: String,
}

pub async fn pg_store() -> PgStore {
    use sqlx::Connection;
    let base = std::env::var("TALLY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://tally:tally@127.0.0.1:5432/tally".into());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} is needed (`make postgres` starts one): {e}")
        });
    let name = unique("tally_it").replace('-', "_").to_lowercase();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    PgStore {
        url: format!("{head}/{name}"),
        base,
        name,
    }
}

impl PgStore {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.url)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .arg(&self.base)
            .arg("-qc")
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
