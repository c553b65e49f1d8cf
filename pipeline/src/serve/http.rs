//! Routes, parameter parsing, errors, bearer tokens and limits.
//!
//! Every error is `{"error": {"code", "message"}}` and names the parameter.
//! Parameters are parsed strictly: unknown or repeated ones are refused.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::SecondsFormat;
use serde_json::{json, Value};

use super::reader::Totals;
use super::tiers::width_name;
use super::{ApiState, ServeError};

type Shared = Arc<ApiState>;

/// Longest id accepted in `video_id` / `event_type`.
pub(crate) const MAX_ID_BYTES: usize = 256;
pub(crate) const MAX_TOP_LIMIT: u32 = 1000;
const MAX_LISTED_INVALID: usize = 1000;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<(&'static str, Value)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: None,
        }
    }
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        tracing::error!(error = %e, "request failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e}; retry later"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"code": self.code, "message": self.message});
        if let (Some((k, v)), Some(obj)) = (self.extra, err.as_object_mut()) {
            obj.insert(k.to_string(), v);
        }
        let mut resp = (self.status, Json(json!({ "error": err }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

pub(crate) fn router(state: Shared) -> Router {
    let max_body = state.cfg.max_body.as_usize();
    Router::new()
        .route("/", get(console))
        .route("/v1/count", get(count))
        .route("/v1/stats", get(stats))
        .route("/v1/series", get(series))
        .route("/v1/top", get(top))
        .route("/v1/rollups", get(rollups::list))
        .route("/v1/rollups/{name}", get(rollups::query))
        .route("/v1/reports/monthly/{file}", get(reports::monthly))
        .route("/v1/sql", post(sql::query))
        .route(
            "/v1/events",
            post(events).route_layer(from_fn_with_state(state.clone(), ingest_gate)),
        )
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
            .into_response()
        }))
        .layer(from_fn_with_state(state.clone(), guard))
        .layer(from_fn_with_state(state.clone(), host_check))
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Metrics per route and status (route templates only: no ids in labels).
async fn observe(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let t = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .observe_http(&route, resp.status().as_u16(), t.elapsed().as_secs_f64());
    resp
}

/// Load shedding and the request timeout for `/v1/*`: over
/// `api.max_concurrency` requests in flight, answer 503 at once.
async fn guard(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let Ok(_permit) = s.shed.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "more than api.max_concurrency = {} requests in flight; retry with backoff",
                s.cfg.max_concurrency
            ),
        )
        .into_response();
    };
    match tokio::time::timeout(s.cfg.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than api.request_timeout = {}",
                humantime::format_duration(s.cfg.request_timeout)
            ),
        )
        .into_response(),
    }
}

/// DNS rebinding: answer only requests addressed to a name this API is
/// known by (see `api.allowed_hosts`), 421 otherwise.
async fn host_check(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    match host {
        Some(h) if !host_allowed(&h, s.cfg.listen, &s.cfg.allowed_hosts) => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host `{h}` is not an address of this API; add it to api.allowed_hosts to serve it"
            ),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Whether a request with `Host: host` may be answered by an API listening
/// on `listen`.
pub(crate) fn host_allowed(host: &str, listen: std::net::SocketAddr, allowed: &[String]) -> bool {
    let name = match host.rsplit_once(':') {
        // `[::1]:8080`, `name:8080`; a bare IPv6 literal has no brackets.
        Some((n, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && !n.is_empty()
                && (!n.contains(':') || n.ends_with(']')) =>
        {
            n
        }
        _ => host,
    };
    if allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
    {
        return true;
    }
    let ip = listen.ip();
    if ip.is_unspecified() {
        return allowed.is_empty();
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok_and(|h| h == ip) {
        return true;
    }
    ip.is_loopback() && matches!(bare, "localhost" | "127.0.0.1" | "::1")
}

/// `POST /v1/events`, before its body is read: the write token, then a JSON
/// content type (a web page can send `text/plain` across origins without
/// asking, but not `application/json`).
async fn ingest_gate(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Err(e) = authorize(&s.cfg.write_tokens.0, req.headers(), "write") {
        return e.into_response();
    }
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !matches!(mime.as_str(), "application/json" | "application/x-ndjson") {
        let shown = if ct.is_empty() {
            "none".to_string()
        } else {
            format!("`{ct}`")
        };
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type {shown}: send `Content-Type: application/json` (a JSON array) or `application/x-ndjson` (one event per line)"),
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}; see /openapi.json", req.uri().path()),
    )
}

// ---------------------------------------------------------------- tokens

/// Constant-time comparison (no early exit on the first differing byte).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

fn authorize(tokens: &[String], headers: &HeaderMap, which: &str) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Ok(());
    }
    let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            unauthorized(format!(
                "missing bearer token: send `Authorization: Bearer <{which} token>`"
            ))
        })?;
    // Check every token, so timing does not reveal which one is close.
    let ok = tokens
        .iter()
        .fold(false, |acc, t| acc | ct_eq(t.as_bytes(), given.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(unauthorized(format!(
            "the bearer token is not a valid {which} token"
        )))
    }
}

/// 400 `range_not_retained`, with the oldest start that can be answered.
fn not_retained(e: super::tiers::NotRetained) -> ApiError {
    let mut err = ApiError::bad("range_not_retained", e.message);
    err.extra = Some(("oldest_start", json!(fmt_time(e.oldest_start))));
    err
}

fn opt_f64(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

async fn as_of(s: &ApiState) -> Result<Value, ApiError> {
    Ok(s.reader
        .as_of()
        .await?
        .map_or(Value::Null, |t| json!(fmt_time(t))))
}

// ---------------------------------------------------------------- reads

async fn count(
    State(s): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let p = params(q, &["video_id", "event_type", "start", "end"])?;
    let video = p.id("video_id", true)?.unwrap_or_default();
    let et = p.id("event_type", false)?;
    let (start, end) = p.range(&s)?;
    let view = s.reader.view();
    let plan = p.plan(&view.tiers, start, end)?;
    let (totals, as_of) = tokio::join!(s.reader.totals(&view, video, et, &plan), as_of(&s));
    let totals = totals?;
    Ok(Json(json!({
        "video_id": video,
        "event_type": et,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "count": totals.events,
        "as_of": as_of?,
    }))
    .into_response())
}

const FUNCTIONS: &[&str] = &["count", "sum", "avg", "min", "max"];

async fn stats(
    State(s): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let p = params(q, &["video_id", "event_type", "function", "start", "end"])?;
    let video = p.id("video_id", true)?.unwrap_or_default();
    let et = p.id("event_type", false)?;
    let function = p.required("function")?;
    if let Some((_, rank)) = rollups::SKETCH_FUNCTIONS
        .iter()
        .find(|(f, _)| *f == function)
    {
        return rollups::sketch_stats(&s, &p, video, et, function, *rank).await;
    }
    if !FUNCTIONS.contains(&function) {
        let shown: String = function.chars().take(32).collect();
        let sketches: Vec<&str> = rollups::SKETCH_FUNCTIONS.iter().map(|(f, _)| *f).collect();
        return Err(ApiError::bad(
            "invalid_parameter",
            format!(
                "`function` = {shown:?} is not one of {}, {}",
                FUNCTIONS.join(", "),
                sketches.join(", ")
            ),
        ));
    }
    let (start, end) = p.range(&s)?;
    let view = s.reader.view();
    let plan = p.plan(&view.tiers, start, end)?;
    let (totals, as_of) = tokio::join!(s.reader.totals(&view, video, et, &plan), as_of(&s));
    let t: Totals = totals?;
    let value = match function {
        "count" => json!(t.events),
        "sum" => json!(t.value_sum),
        "avg" => opt_f64(t.avg()),
        "min" => opt_f64(t.value_min),
        _ => opt_f64(t.value_max),
    };
    Ok(Json(json!({
        "video_id": video,
        "event_type": et,
        "function": function,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "value": value,
        "count": t.events,
        "value_count": t.value_count,
        "as_of": as_of?,
    }))
    .into_response())
}

fn granularity_ms(g: &str) -> Option<i64> {
    match g {
        "minute" => Some(60_000),
        "hour" => Some(3_600_000),
        "day" => Some(86_400_000),
        _ => None,
    }
}

async fn series(
    State(s): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let p = params(
        q,
        &["video_id", "event_type", "start", "end", "granularity"],
    )?;
    let video = p.id("video_id", true)?.unwrap_or_default();
    let et = p.id("event_type", false)?;
    let gname = p.get("granularity").unwrap_or("hour");
    let g = granularity_ms(gname).ok_or_else(|| {
        let shown: String = gname.chars().take(32).collect();
        ApiError::bad(
            "invalid_parameter",
            format!("`granularity` = {shown:?} is not one of minute, hour, day"),
        )
    })?;
    let (start, end) = p.range(&s)?;
    let view = s.reader.view();
    let tier = view.tiers.series_tier(g).ok_or_else(|| {
        ApiError::bad(
            "invalid_parameter",
            format!(
                "no rollup can answer `granularity` = {gname}; rollups exist for {} windows",
                view.tiers.granularities()
            ),
        )
    })?;
    for (name, t) in [("start", start), ("end", end)] {
        if t % g != 0 {
            return Err(ApiError::bad(
                "unaligned_range",
                format!("`{name}` is not on a {gname} boundary ({}); align it or choose a finer granularity", width_name(g)),
            ));
        }
    }
    let points = (end - start) / g;
    if points > s.cfg.max_series_points as i64 {
        return Err(ApiError::bad(
            "range_too_long",
            format!(
                "{points} `granularity` = {gname} buckets exceed api.max_series_points = {}; use a coarser granularity or a shorter range",
                s.cfg.max_series_points
            ),
        ));
    }
    view.tiers
        .check_series_retained(tier, start, g, chrono::Utc::now().timestamp_millis())
        .map_err(not_retained)?;
    let (rows, as_of) = tokio::join!(
        s.reader.series(&view, video, et, tier, (start, end), g),
        as_of(&s)
    );
    let rows = rows?;
    let mut out = Vec::with_capacity(points as usize);
    let mut b = start;
    while b < end {
        let t = rows.get(&b).copied().unwrap_or_default();
        out.push(json!({
            "start": fmt_time(b),
            "count": t.events,
            "sum": t.value_sum,
            "value_count": t.value_count,
            "min": opt_f64(t.value_min),
            "max": opt_f64(t.value_max),
            "avg": opt_f64(t.avg()),
        }));
        b += g;
    }
    Ok(Json(json!({
        "video_id": video,
        "event_type": et,
        "granularity": gname,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "points": out,
        "as_of": as_of?,
    }))
    .into_response())
}

async fn top(
    State(s): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let p = params(q, &["event_type", "start", "end", "limit"])?;
    let et = p.id("event_type", false)?;
    let limit = match p.get("limit") {
        None => 10,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=MAX_TOP_LIMIT).contains(&n) => n,
            _ => {
                let shown: String = v.chars().take(32).collect();
                return Err(ApiError::bad(
                    "invalid_parameter",
                    format!("`limit` = {shown:?} must be an integer from 1 to {MAX_TOP_LIMIT}"),
                ));
            }
        },
    };
    let (start, end) = p.range(&s)?;
    let view = s.reader.view();
    let plan = p.plan(&view.tiers, start, end)?;
    let (rows, as_of) = tokio::join!(s.reader.top(&view, et, &plan, limit), as_of(&s));
    let videos: Vec<Value> = rows?
        .into_iter()
        .map(|(v, n)| json!({"video_id": v, "count": n}))
        .collect();
    Ok(Json(json!({
        "event_type": et,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "limit": limit,
        "videos": videos,
        "as_of": as_of?,
    }))
    .into_response())
}

// ---------------------------------------------------------------- writes

/// `POST /v1/events`; the token and content type are checked by
/// [`ingest_gate`] before the body is read.
async fn events(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body exceeds api.max_body = {} bytes; send fewer events per request",
                    s.cfg.max_body.0
                ),
            )
        } else {
            ApiError::bad("invalid_body", format!("cannot read the body: {e}"))
        }
    })?;
    let events = super::ingest::split_events(&body)
        .map_err(|m| ApiError::bad("invalid_body", format!("body: {m}")))?;
    if events.is_empty() {
        return Err(ApiError::bad(
            "invalid_body",
            "body: no events; send a JSON array or NDJSON (one object per line)",
        ));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    // Decoding a large body is CPU work: off the async workers, which the
    // committer and the other requests share.
    let (bad, invalid) = super::blocking(|| {
        super::ingest::validate(&s.decoder, &events, now_ms, MAX_LISTED_INVALID)
    });
    if invalid > 0 {
        s.metrics
            .api_events_invalid
            .fetch_add(invalid as u64, Ordering::Relaxed);
        let listed: Vec<Value> = bad
            .iter()
            .map(|b| json!({"index": b.index, "reason": b.reject.reason.code(), "detail": b.reject.detail}))
            .collect();
        let mut e = ApiError::bad(
            "invalid_events",
            format!(
                "{invalid} of {} events are invalid; nothing was produced (listing the first {})",
                events.len(),
                listed.len()
            ),
        );
        e.extra = Some(("events", Value::Array(listed)));
        return Err(e);
    }
    match s.ingest.produce(&events).await {
        Ok(n) => {
            s.metrics
                .api_events_produced
                .fetch_add(n as u64, Ordering::Relaxed);
            Ok((StatusCode::ACCEPTED, Json(json!({"accepted": n}))).into_response())
        }
        Err(f) => {
            s.metrics
                .api_events_produced
                .fetch_add(f.acknowledged as u64, Ordering::Relaxed);
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "produce_failed",
                format!(
                    "the broker acknowledged {} of {} events before failing: {}",
                    f.acknowledged,
                    events.len(),
                    f.message
                ),
            );
            e.extra = Some(("acknowledged", json!(f.acknowledged)));
            Err(e)
        }
    }
}

// ---------------------------------------------------------------- operations

async fn metrics(State(s): State<Shared>) -> Response {
    let (as_of, (ready, _)) = tokio::join!(s.reader.as_of(), readiness(&s));
    let mut text = s.metrics.render(
        s.pipeline,
        as_of.ok().flatten(),
        chrono::Utc::now().timestamp_millis(),
    );
    text.push_str(&format!(
        "# HELP tally_ready 1 when /readyz answers 200 (serving store readable, broker reachable for tally run, no stalled partition).\n# TYPE tally_ready gauge\ntally_ready {}\n",
        u8::from(ready)
    ));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The web console: one page, everything inline, served by the binary (no
/// CDN, no fonts or scripts from elsewhere; the policy forbids them). It
/// reads the API with the token entered in the page.
async fn console() -> Response {
    const PAGE: &str = include_str!("console/index.html");
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

async fn livez() -> Response {
    Json(json!({"status": "alive"})).into_response()
}

/// Whether the process is ready, and each check's answer.
async fn readiness(s: &ApiState) -> (bool, Value) {
    let store = match tokio::time::timeout(std::time::Duration::from_secs(1), s.reader.ping()).await
    {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 1s".to_string(),
    };
    let broker_ok = s.broker_ok.load(Ordering::Acquire);
    let broker = match (broker_ok, s.pipeline) {
        (true, _) => "ok",
        (false, true) => "unreachable (topic metadata not available)",
        // `tally serve` reads the store alone: only POST /v1/events needs
        // the broker, so reads stay ready through a Kafka outage.
        (false, false) => "unreachable (topic metadata not available); POST /v1/events fails until it returns, reads are served",
    };
    // Only `tally run` watches for stalled partitions (`source/stall.rs`).
    let stalled = s.metrics.stalled_partitions();
    let partitions = if stalled.is_empty() {
        "ok".to_string()
    } else {
        format!("stalled: {stalled:?} (messages wait and no member commits them; see the log)")
    };
    let ready = store == "ok" && (broker_ok || !s.pipeline) && stalled.is_empty();
    (
        ready,
        json!({"serving_store": store, "broker": broker, "partitions": partitions}),
    )
}

async fn readyz(State(s): State<Shared>) -> Response {
    let (ready, checks) = readiness(&s).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

async fn openapi(State(s): State<Shared>) -> Response {
    Json(super::openapi::document(&s.served())).into_response()
}

mod params;
mod reports;
mod rollups;
mod sql;
pub(crate) use params::fmt_time;
use params::{params, Params};
pub(crate) use rollups::MAX_ROWS as MAX_ROLLUP_ROWS;
#[cfg(test)]
mod tests;
