//! SQL over HTTP for analysts (`POST /v1/sql`) and `tally sql`: one
//! read-only DataFusion query over
//! - `events`: the raw archive (committed files only; schema on read, as
//!   verify reads it), with the `dt` and `hour` partition columns;
//! - `dead_letters`: the dead-letter dataset, with `dt`;
//! - every rollup by name (its live version; other versions as `"name@N"`):
//!   merged rows from the serving store, loaded when a query names it.
//!
//! Limits for a shared service: one `SELECT` / `WITH` statement (no DDL, no
//! `COPY`, no `SET`, no external tables; DataFusion's own options refuse
//! them too, and it has no file-reading functions), a memory pool per query
//! (`api.sql_memory`, loaded rollup rows included), a timeout
//! (`api.sql_timeout`), a row limit (`api.sql_max_rows`) and a number of
//! queries at once (`api.sql_concurrency`). Each refusal names its limit.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use futures::StreamExt as _;

use crate::aggregate::SqlCatalog;
use crate::config::Settings;
use crate::sink::ServingStore;

/// Why a query was refused or failed: the client's (`Bad`, `Limit`) or
/// the service's (`Internal`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SqlError {
    /// Not one read-only query, or DataFusion refused it (unknown table,
    /// column or function; a type error).
    #[error("{0}")]
    Bad(String),
    /// Over a limit: the message names the setting.
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Internal(String),
}

/// The limits of one query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub memory: usize,
    pub timeout: std::time::Duration,
    pub max_rows: usize,
}

impl Limits {
    pub(crate) fn of(settings: &Settings) -> Limits {
        Limits {
            memory: settings.api.sql_memory.as_usize(),
            // The request's own timeout ends it anyway: stop the query first.
            timeout: settings
                .api
                .sql_timeout
                .min(settings.api.request_timeout.mul_f64(0.9)),
            max_rows: settings.api.sql_max_rows,
        }
    }
}

/// The one statement of `sql`, if it is a read-only query.
fn check_statement(sql: &str) -> Result<(), SqlError> {
    let statements = DFParser::parse_sql(sql)
        .map_err(|e| SqlError::Bad(format!("the query cannot be parsed: {e}")))?;
    match statements.len() {
        0 => return Err(SqlError::Bad("`query` is empty".into())),
        1 => {}
        n => {
            return Err(SqlError::Bad(format!(
                "`query` holds {n} statements; send one SELECT or WITH query"
            )))
        }
    }
    match statements.front() {
        Some(Statement::Statement(s)) if matches!(**s, datafusion::sql::sqlparser::ast::Statement::Query(_)) => Ok(()),
        _ => Err(SqlError::Bad(
            "only a SELECT or WITH query is allowed (no DDL, COPY, SET, EXPLAIN ANALYZE or external tables)".into(),
        )),
    }
}

fn df_err(e: datafusion::error::DataFusionError, limits: &Limits) -> SqlError {
    let text = e.to_string();
    if text.contains("Resources exhausted") || text.contains("isk manager") {
        SqlError::Limit(format!(
            "the query needs more memory than api.sql_memory = {} bytes; aggregate, filter on dt, or add a LIMIT",
            limits.memory
        ))
    } else {
        SqlError::Bad(text)
    }
}

/// A listing table of the archive's Parquet files under `prefix`, or an
/// empty table of `schema` when there are none yet.
async fn register_listing(
    ctx: &SessionContext,
    name: &str,
    url: &str,
    schema: SchemaRef,
    partitions: &[&str],
) -> Result<(), SqlError> {
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(
            partitions
                .iter()
                .map(|p| (p.to_string(), DataType::Utf8))
                .collect(),
        );
    let table = match ListingTableUrl::parse(url) {
        Ok(u) => {
            let config = ListingTableConfig::new(u)
                .with_listing_options(options)
                .with_schema(schema.clone());
            ListingTable::try_new(config)
                .map(|t| Arc::new(t) as Arc<dyn datafusion::catalog::TableProvider>)
        }
        Err(e) => Err(e),
    };
    let table = match table {
        Ok(t) => t,
        Err(_) => {
            let empty = MemTable::try_new(schema, vec![vec![]])
                .map_err(|e| SqlError::Internal(e.to_string()))?;
            Arc::new(empty)
        }
    };
    ctx.register_table(name, table)
        .map_err(|e| SqlError::Internal(e.to_string()))?;
    Ok(())
}

/// The session a query runs in: the archive, the dead letters and the
/// rollups `sql` names (loaded from `store`).
async fn session(
    settings: &Settings,
    catalog: &SqlCatalog,
    schema: &crate::decode::EventSchema,
    store: &ServingStore,
    live: &std::collections::BTreeMap<String, u32>,
    sql: &str,
    limits: &Limits,
) -> Result<SessionContext, SqlError> {
    // No spilling: a query's memory and disk stay bounded.
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(limits.memory)))
        .with_disk_manager_builder(
            datafusion::execution::disk_manager::DiskManagerBuilder::default()
                .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| SqlError::Internal(e.to_string()))?;
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(2);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let location = crate::sink::ArchiveLocation::open(&settings.storage)
        .map_err(|e| SqlError::Internal(e.to_string()))?;
    location
        .register(&ctx)
        .map_err(|e| SqlError::Internal(e.to_string()))?;
    let dir = |prefix: &str| {
        let mut u = location.url(prefix);
        if !u.ends_with('/') {
            u.push('/');
        }
        u
    };
    register_listing(
        &ctx,
        "tally_raw_events",
        &dir(crate::sink::archive::RAW_PREFIX),
        crate::decode::read_schema(schema),
        &["dt", "hour"],
    )
    .await?;
    let select = crate::decode::events_select(schema, &ctx);
    ctx.sql(&format!(
        "CREATE VIEW events AS SELECT {select}, dt, hour FROM tally_raw_events"
    ))
    .await
    .map_err(|e| SqlError::Internal(e.to_string()))?;
    register_listing(
        &ctx,
        "dead_letters",
        &dir(crate::sink::archive::DLQ_PREFIX),
        crate::sink::archive::dead_letter_schema(),
        &["dt"],
    )
    .await?;
    // The rollups the query names, merged, each within the memory limit.
    let state = ctx.state();
    let statement = state
        .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
        .map_err(|e| SqlError::Bad(e.to_string()))?;
    let refs = state
        .resolve_table_references(&statement)
        .map_err(|e| SqlError::Bad(e.to_string()))?;
    for r in refs {
        let name = r.table();
        let Some(def) = catalog.rollups.iter().find(|d| {
            let is_live = catalog
                .live(&d.base, live)
                .is_some_and(|l| l.name == d.name);
            (is_live && d.base == name) || (!is_live && format!("{}@{}", d.base, d.version) == name)
        }) else {
            continue;
        };
        let rows = crate::jobs::export::load_windows(store, def, i64::MIN, i64::MAX, None)
            .await
            .map_err(|e| SqlError::Internal(e.to_string()))?;
        let bytes: usize = rows.iter().map(RecordBatch::get_array_memory_size).sum();
        if bytes > limits.memory {
            return Err(SqlError::Limit(format!(
                "rollup {name} holds {bytes} bytes of rows, more than api.sql_memory = {} bytes; query it through GET /v1/rollups/{name} or its `tally export` Parquet",
                limits.memory
            )));
        }
        let table = MemTable::try_new(
            crate::jobs::export::arrow_schema(def),
            vec![rows.into_iter().collect()],
        )
        .map_err(|e| SqlError::Internal(e.to_string()))?;
        ctx.register_table(name, Arc::new(table))
            .map_err(|e| SqlError::Internal(e.to_string()))?;
    }
    Ok(ctx)
}

/// What a query returned.
#[derive(Debug)]
pub(crate) struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
}

/// Run `sql` within `limits`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    settings: &Settings,
    catalog: &SqlCatalog,
    schema: &crate::decode::EventSchema,
    store: &ServingStore,
    live: &std::collections::BTreeMap<String, u32>,
    sql: &str,
    limits: Limits,
) -> Result<Answer, SqlError> {
    check_statement(sql)?;
    let work = async {
        let ctx = session(settings, catalog, schema, store, live, sql, &limits).await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| df_err(e, &limits))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let mut stream: SendableRecordBatchStream =
            df.execute_stream().await.map_err(|e| df_err(e, &limits))?;
        let mut batches = Vec::new();
        let mut rows = 0;
        while let Some(b) = stream.next().await {
            let b = b.map_err(|e| df_err(e, &limits))?;
            rows += b.num_rows();
            if rows > limits.max_rows {
                return Err(SqlError::Limit(format!(
                    "the answer has more than api.sql_max_rows = {} rows; aggregate or add a LIMIT",
                    limits.max_rows
                )));
            }
            batches.push(b);
        }
        Ok(Answer {
            schema,
            batches,
            rows,
        })
    };
    match tokio::time::timeout(limits.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(SqlError::Limit(format!(
            "the query ran longer than api.sql_timeout = {} (at most 90% of api.request_timeout); aggregate, filter on dt, or add a LIMIT",
            humantime::format_duration(limits.timeout)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_read_only_query_passes() {
        for ok in [
            "SELECT 1",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "select count(*) from events where dt = '2026-11-28'",
        ] {
            assert!(check_statement(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "SELECT 1; SELECT 2",
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc/'",
            "COPY (SELECT 1) TO '/tmp/x.parquet'",
            "INSERT INTO events VALUES (1)",
            "DROP TABLE events",
            "SET datafusion.execution.batch_size = 1",
            "CREATE VIEW v AS SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
        ] {
            assert!(
                matches!(check_statement(bad), Err(SqlError::Bad(_))),
                "{bad:?} must be refused"
            );
        }
    }
}
