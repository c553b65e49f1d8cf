//! Test support: seed a real serving store through the real stages
//! (decoder -> rollup SQL -> serving commit), as `tally run` would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use crate::aggregate::{RollupAggregator, SqlCatalog};
use crate::batch::PartitionRange;
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder};
use crate::sink::{CommitRequest, ServingStore};

/// The repository's dimension tables (`data/dims`), by absolute path.
pub(crate) fn repo_dimensions() -> BTreeMap<String, std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    [("videos".to_string(), root.join("data/dims/videos.csv"))]
        .into_iter()
        .collect()
}

/// [`SqlCatalog::load_with`] the repository's dimension tables.
pub(crate) async fn catalog(
    dir: &std::path::Path,
    events: datafusion::arrow::datatypes::SchemaRef,
    time_field: &str,
) -> Result<SqlCatalog, crate::aggregate::AggregateError> {
    let dims = crate::aggregate::Dimensions::load(&repo_dimensions()).await?;
    SqlCatalog::load_with(dir, events, time_field, dims).await
}

/// Settings over a temporary data directory and the repository's SQL.
pub(crate) fn settings(data_dir: &std::path::Path, extra_env: &[(&str, &str)]) -> Settings {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut env: Vec<(String, String)> = vec![
        (
            "TALLY__STORAGE__DATA_DIR".into(),
            data_dir.display().to_string(),
        ),
        (
            "TALLY__SQL__ROLLUPS_DIR".into(),
            root.join("sql/rollups").display().to_string(),
        ),
        (
            "TALLY__REPORT__SQL_DIR".into(),
            root.join("sql/reports").display().to_string(),
        ),
        (
            "TALLY__SQL__DIMENSIONS__VIDEOS".into(),
            root.join("data/dims/videos.csv").display().to_string(),
        ),
        (
            "TALLY__REPORT__DIMS_DIR".into(),
            root.join("data/dims").display().to_string(),
        ),
        ("TALLY__DECODE__MAX_EVENT_AGE".into(), "30days".into()),
    ];
    env.retain(|(k, _)| !extra_env.iter().any(|(x, _)| x == k));
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Settings::load(None, env).unwrap()
}

/// Decode `payloads` as of `now` and commit their rollups to the serving
/// store of `settings` in `batches` consecutive batches of partition 0.
pub(crate) async fn seed(
    settings: &Settings,
    payloads: &[String],
    now: i64,
    batches: usize,
) -> (SqlCatalog, EventSchema) {
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let dimensions = crate::aggregate::Dimensions::load(&settings.sql.dimensions)
        .await
        .unwrap();
    let catalog = SqlCatalog::load_with(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
        dimensions,
    )
    .await
    .unwrap();
    let store = ServingStore::open_with(
        &settings.serving_url(),
        &catalog.rollups,
        settings.serving.window_index,
    )
    .await
    .unwrap();
    let mut agg = RollupAggregator::new(&catalog, schema.arrow.clone())
        .await
        .unwrap();
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let mut cols = schema.new_columns(payloads.len());
    for p in payloads {
        decoder.decode(Some(p.as_bytes()), now, &mut cols).unwrap();
    }
    let batch = cols.finish().unwrap();
    let per = batch.num_rows().div_ceil(batches.max(1)).max(1);
    let mut expected_start = None;
    let mut offset = 0;
    while offset < batch.num_rows() {
        let part = batch.slice(offset, per.min(batch.num_rows() - offset));
        let outputs = agg.aggregate(std::slice::from_ref(&part)).await.unwrap();
        let first = offset as i64;
        let partitions: BTreeMap<i32, PartitionRange> = [(
            0,
            PartitionRange {
                expected_start,
                first,
                last: first + part.num_rows() as i64 - 1,
            },
        )]
        .into_iter()
        .collect();
        let max_event_ms = [(0, now - 1000)].into_iter().collect();
        let req = CommitRequest {
            topic: &settings.kafka.topic,
            partitions: &partitions,
            outputs: &outputs,
            files: &[],
            counters: &[],
            max_event_ms: &max_event_ms,
            caught_up: &BTreeMap::new(),
            sealed_at_ms: now,
            now_ms: now,
            replayed: None,
            open_hours: &[],
            archive_with_batch: true,
        };
        store.commit(&req).await.unwrap();
        if expected_start.is_none() {
            // SQLite: the first batch's rows go into the rollup tables, the
            // others stay in the delta tables, so reads sum both.
            store.fold().await.unwrap();
        }
        expected_start = Some(first + part.num_rows() as i64);
        offset += part.num_rows();
    }
    store.close().await;
    (catalog, schema)
}

/// A new, empty PostgreSQL database for one test, on the server named by
/// `TALLY_TEST_PG_URL` (default: the one `scripts/postgres.sh` starts).
pub(crate) async fn pg_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("TALLY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://tally:tally@127.0.0.1:5432/tally".into());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {base} is needed (run scripts/postgres.sh or `make postgres`): {e}"
            )
        });
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "tally_t{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        chrono::Utc::now().timestamp_micros() % 1_000_000
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    format!("{head}/{name}")
}

/// Drop a database made by [`pg_database`].
pub(crate) async fn drop_pg_database(url: &str) {
    use sqlx::Connection;
    let base = std::env::var("TALLY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://tally:tally@127.0.0.1:5432/tally".into());
    let (_, name) = url.rsplit_once('/').unwrap();
    if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}
