//! Stage 6: the HTTP API (axum). Served in-process by `tally run` and
//! standalone by `tally serve` (a read replica of the serving store).
//!
//! - [`tiers`]: which rollup answers which part of a range (exact or 400).
//! - [`reader`]: the read queries (bound parameters only).
//! - [`ingest`]: `POST /v1/events` through the idempotent producer.
//! - [`http`]: routes, parameters, errors, tokens, limits.

pub(crate) mod generic;
pub(crate) mod http;
pub(crate) mod ingest;
mod openapi;
pub(crate) mod reader;
mod server;
pub(crate) mod sql;
#[cfg(test)]
mod tests;
pub(crate) mod tiers;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::aggregate::SqlCatalog;
use crate::config::{ApiConfig, Settings};
use crate::decode::{EventSchema, RecordDecoder};
use crate::error::{ErrorKind, RetryHint};
use crate::metrics::Metrics;

pub(crate) use reader::Reader;
pub(crate) use tiers::Tiers;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("config key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("api.listen = {addr}: cannot listen: {message}; pick a free address or stop the other process")]
    Bind { addr: String, message: String },
    #[error("serving store: {0}")]
    Store(String),
    #[error("kafka producer: {0}")]
    Kafka(String),
    #[error("http server: {0}")]
    Server(String),
}

impl ServeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServeError::Config { .. } | ServeError::Bind { .. } => ErrorKind::User,
            ServeError::Store(_) | ServeError::Kafka(_) | ServeError::Server(_) => {
                ErrorKind::External
            }
        }
    }
    pub fn retry(&self) -> RetryHint {
        match self {
            ServeError::Store(_) => RetryHint::WithBackoff,
            _ => RetryHint::NoRetry,
        }
    }
}

/// Everything the handlers share.
pub(crate) struct ApiState {
    pub cfg: ApiConfig,
    pub reader: Reader,
    /// Every rollup and its family (`GET /v1/rollups`), swapped whole when
    /// a version is promoted ([`ApiState::served`]).
    served: std::sync::RwLock<Arc<generic::Served>>,
    /// What `served` and the reader's tiers are rebuilt from.
    catalog: SqlCatalog,
    retention: crate::config::RetentionConfig,
    /// The live versions `served` was built with.
    live: std::sync::Mutex<std::collections::BTreeMap<String, u32>>,
    pub ingest: ingest::Ingest,
    pub decoder: RecordDecoder,
    pub metrics: Arc<Metrics>,
    /// `tally run` (pipeline metrics are live) or `tally serve`.
    pub pipeline: bool,
    pub broker_ok: AtomicBool,
    pub(crate) shed: Arc<tokio::sync::Semaphore>,
    /// What the on-demand reports are built with (`/v1/reports/…`).
    pub(crate) settings: Arc<Settings>,
    /// One report is built at a time.
    pub(crate) report_turn: tokio::sync::Mutex<()>,
    /// `POST /v1/sql`: queries at once, and the store rollups load from.
    pub(crate) sql_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) sql_store: tokio::sync::OnceCell<crate::sink::ServingStore>,
}

impl ApiState {
    /// Resolve the API rollups and open the read pool. Fails fast on a bad
    /// `api.*` key or an unreadable store.
    pub(crate) async fn build(
        settings: &Settings,
        catalog: &SqlCatalog,
        schema: &EventSchema,
        metrics: Arc<Metrics>,
        pipeline: bool,
    ) -> Result<Arc<ApiState>, ServeError> {
        // The versions the API answers from: promoted ones, once the store
        // records any (an older store, or a read-only one, has none yet).
        let none = Default::default();
        let tiers =
            Tiers::from_catalog(&settings.api.rollups, catalog, &settings.retention, &none)?;
        let reader = Reader::open(
            &settings.serving_url(),
            4,
            tiers,
            catalog,
            &settings.kafka.topic,
            settings.serving.window_index,
        )?;
        let live = reader.pool().live_versions().await.unwrap_or_default();
        if live != none {
            reader.set_tiers(
                Tiers::from_catalog(&settings.api.rollups, catalog, &settings.retention, &live)?,
                catalog,
            );
        }
        let ingest = ingest::Ingest::new(settings)?;
        let served =
            generic::Served::from_catalog(catalog, &settings.retention, reader.pool(), &live);
        Ok(Arc::new(ApiState {
            cfg: settings.api.clone(),
            reader,
            served: std::sync::RwLock::new(Arc::new(served)),
            catalog: catalog.clone(),
            retention: settings.retention.clone(),
            live: std::sync::Mutex::new(live),
            ingest,
            decoder: RecordDecoder::new(schema.clone(), &settings.decode),
            metrics,
            pipeline,
            broker_ok: AtomicBool::new(false),
            shed: Arc::new(tokio::sync::Semaphore::new(settings.api.max_concurrency)),
            settings: Arc::new(settings.clone()),
            report_turn: tokio::sync::Mutex::new(()),
            sql_slots: Arc::new(tokio::sync::Semaphore::new(settings.api.sql_concurrency)),
            sql_store: tokio::sync::OnceCell::new(),
        }))
    }
}

impl ApiState {
    /// The rollups as the API answers them now; a request keeps the ones it
    /// started with.
    pub(crate) fn served(&self) -> Arc<generic::Served> {
        match self.served.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Follow `tally rollup promote`: when the store's live versions
    /// changed, rebuild the served rollups and the reader's tiers and swap
    /// them in (requests in flight finish on the old ones, whose tables
    /// remain). Returns whether anything changed.
    pub(crate) async fn refresh_versions(&self) -> bool {
        let Ok(live) = self.reader.pool().live_versions().await else {
            return false;
        };
        {
            let Ok(mut current) = self.live.lock() else {
                return false;
            };
            if *current == live {
                return false;
            }
            *current = live.clone();
        }
        match Tiers::from_catalog(&self.cfg.rollups, &self.catalog, &self.retention, &live) {
            Ok(tiers) => self.reader.set_tiers(tiers, &self.catalog),
            Err(e) => {
                tracing::error!(error = %e, "a promoted version cannot answer the API rollups' endpoints; they keep the previous version")
            }
        }
        let served = generic::Served::from_catalog(
            &self.catalog,
            &self.retention,
            self.reader.pool(),
            &live,
        );
        match self.served.write() {
            Ok(mut s) => *s = Arc::new(served),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(served),
        }
        tracing::info!(live = ?live, "rollup versions changed: the API answers from the promoted ones");
        true
    }
}

/// Bind `api.listen` now (so a taken port fails startup), then serve until
/// `shutdown` resolves.
pub(crate) async fn bind(
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), ServeError>>, ServeError> {
    let addr = state.cfg.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Bind {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
    tracing::info!(listen = %addr, "HTTP API listening");
    for warning in auth_warnings(&state.cfg) {
        tracing::warn!("{warning}");
    }
    let probe_state = state.clone();
    let probe = tokio::spawn(async move {
        loop {
            let s = probe_state.clone();
            let ok = tokio::task::spawn_blocking(move || {
                s.ingest.broker_reachable(Duration::from_secs(2))
            })
            .await
            .unwrap_or(false);
            if probe_state.broker_ok.swap(ok, Ordering::AcqRel) != ok {
                tracing::info!(reachable = ok, "broker reachability changed");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    // Promotions (`tally rollup promote`) apply within a second.
    let versions_state = state.clone();
    let versions = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            versions_state.refresh_versions().await;
        }
    });
    let (timeout, max_connections) = (state.cfg.request_timeout, state.cfg.max_connections);
    let app = http::router(state);
    Ok(async move {
        server::serve(listener, app, timeout, max_connections, shutdown).await;
        probe.abort();
        versions.abort();
        Ok(())
    })
}

/// Loud warnings for an API that is half protected: tokens for one
/// direction and none for the other usually means the other was forgotten.
pub(crate) fn auth_warnings(cfg: &ApiConfig) -> Vec<String> {
    let (read, write) = (cfg.read_tokens.0.is_empty(), cfg.write_tokens.0.is_empty());
    let mut out = Vec::new();
    if write && !read {
        out.push(format!(
            "SECURITY: api.read_tokens is set but api.write_tokens is empty: anyone who can reach {} may POST /v1/events; set api.write_tokens",
            cfg.listen
        ));
    }
    if read && !write {
        out.push(format!(
            "SECURITY: api.write_tokens is set but api.read_tokens is empty: anyone who can reach {} may read every count; set api.read_tokens",
            cfg.listen
        ));
    }
    out
}

/// Run a possibly long piece of work without stalling the async workers
/// (the committer and the other requests share them).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `tally serve`: the API alone over an existing serving store.
pub(crate) async fn serve_standalone(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    let (schema, catalog) = crate::pipeline::Stages::definitions(&settings).await?;
    // Reads only when the writers have set the store up (a SELECT-only role
    // or a hot standby serves); sets it up if this replica starts first.
    let store = crate::sink::ServingStore::open_existing(
        &settings.serving_url(),
        &catalog.rollups,
        settings.serving.window_index,
    )
    .await?;
    let state = ApiState::build(
        &settings,
        &catalog,
        &schema,
        Arc::new(Metrics::new()),
        false,
    )
    .await?;
    // A replica watches for stalled partitions too (`/readyz`, metrics).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stalls = tokio::spawn(crate::source::stall::watch(
        settings.clone(),
        Arc::new(store.clone()),
        state.metrics.clone(),
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        },
    ));
    let server = bind(state, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await?;
    let served = server.await;
    let _ = stalls.await;
    store.close().await;
    served?;
    Ok(())
}
