//! `GET /v1/rollups` (every rollup: keys, window, measures, retention,
//! fingerprint, family) and `GET /v1/rollups/{name}` (any rollup queried:
//! filters, group by, granularity, top-K). See `serve/generic.rs`.

use axum::extract::Path;

use super::*;
use crate::aggregate::sketch;
use crate::aggregate::ColumnKind;
use crate::aggregate::MergeRule;
use crate::serve::generic::{statement, Ask, Measure, Served, ServedRollup};
use crate::sink::serving::{Arg, Cell};

/// Rows an answer holds at most (`limit`'s bound and default).
pub(crate) const MAX_ROWS: u32 = 10_000;
const DEFAULT_ROWS: u32 = 1_000;
const FIXED: &[&str] = &[
    "start",
    "end",
    "group_by",
    "granularity",
    "order_by",
    "limit",
];

fn type_name(k: ColumnKind) -> &'static str {
    match k {
        ColumnKind::Text => "string",
        ColumnKind::Int => "integer",
        ColumnKind::Real => "number",
        // A sketch is answered by its estimate.
        ColumnKind::Bytes => "number",
    }
}

fn describe(served: &Served, r: &ServedRollup) -> Value {
    let family = served.family(r);
    let versions: Vec<Value> = served
        .rollups
        .iter()
        .filter(|o| o.base == r.base)
        .map(|o| json!({"version": o.version, "name": o.name, "live": o.live}))
        .collect();
    json!({
        "name": r.name,
        "version": r.version,
        "live": r.live,
        "versions": versions,
        "keys": r.keys.iter().map(|(n, k)| json!({"name": n, "type": type_name(*k)})).collect::<Vec<_>>(),
        "window": {"column": r.window, "width": width_name(r.width_ms), "width_ms": r.width_ms},
        "measures": r.measures.iter().map(|m| {
            let mut o = json!({
                "name": m.name, "kind": m.function, "merge": m.merge.name(), "type": type_name(m.kind),
            });
            if m.merge.sketch().is_some() {
                o["bounds"] = json!([format!("{}_low", m.name), format!("{}_high", m.name)]);
                o["sketch"] = json!(match m.merge { MergeRule::Distinct => "hll", _ => "kll" });
            }
            if let Some(q) = m.quantile {
                o["quantile"] = json!(q);
            }
            o
        }).collect::<Vec<_>>(),
        "retention": r.keep.to_string(),
        "file": r.file,
        "fingerprint": r.fingerprint,
        "family": family.members,
    })
}

pub(super) async fn list(State(s): State<Shared>, headers: HeaderMap) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let served = s.served();
    let rollups: Vec<Value> = served
        .rollups
        .iter()
        .map(|r| describe(&served, r))
        .collect();
    Ok(Json(json!({ "rollups": rollups })).into_response())
}

/// `group_by` / `order_by` names: one of `valid`, or a 400 naming them.
fn pick(param: &str, name: &str, valid: &[&str], what: &str) -> Result<usize, ApiError> {
    valid.iter().position(|v| *v == name).ok_or_else(|| {
        let shown: String = name.chars().take(64).collect();
        ApiError::bad(
            "invalid_parameter",
            format!(
                "`{param}` names {what} `{shown}`, which this rollup does not have; its {what}s are: {}",
                valid.join(", ")
            ),
        )
    })
}

/// Parse the query string of `GET /v1/rollups/{name}` against `r`.
fn ask_of(r: &ServedRollup, pairs: Vec<(String, String)>) -> Result<(Params, Ask), ApiError> {
    let keys: Vec<&str> = r.keys.iter().map(|(n, _)| n.as_str()).collect();
    let measures: Vec<&str> = r.measures.iter().map(|m| m.name.as_str()).collect();
    let mut fixed = BTreeMap::new();
    let mut filters: BTreeMap<usize, Vec<Arg>> = BTreeMap::new();
    for (k, v) in pairs {
        if FIXED.contains(&k.as_str()) {
            if fixed.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad(
                    "invalid_parameter",
                    format!("parameter `{k}` is given more than once"),
                ));
            }
            continue;
        }
        let Some(i) = keys.iter().position(|n| *n == k) else {
            let shown: String = k.chars().take(64).collect();
            let hint = if k == r.window {
                " (the window is chosen with `start` and `end`)"
            } else {
                ""
            };
            return Err(ApiError::bad(
                "unknown_parameter",
                format!(
                    "unknown parameter `{shown}`{hint}; `{}` takes {} and a filter on a key: {}",
                    r.name,
                    FIXED.join(", "),
                    keys.join(", ")
                ),
            ));
        };
        if v.is_empty() || v.len() > MAX_ID_BYTES {
            return Err(ApiError::bad(
                "invalid_parameter",
                format!("`{k}` must be 1 to {MAX_ID_BYTES} bytes"),
            ));
        }
        let value = match r.keys[i].1 {
            ColumnKind::Text => Arg::Text(v),
            ColumnKind::Int => Arg::Int(v.parse().map_err(|_| {
                ApiError::bad("invalid_parameter", format!("`{k}` is an integer key"))
            })?),
            ColumnKind::Real | ColumnKind::Bytes => {
                return Err(ApiError::bad(
                    "invalid_parameter",
                    format!("`{k}` is a floating-point key: filter it at query time"),
                ))
            }
        };
        // A value given twice is one value (the skip-scan joins on each).
        let values = filters.entry(i).or_default();
        if !values.contains(&value) {
            values.push(value);
        }
    }
    let p = Params(fixed);
    let mut ask = Ask {
        filters: filters.into_iter().collect(),
        limit: DEFAULT_ROWS,
        ..Default::default()
    };
    if let Some(g) = p.get("group_by") {
        for name in g.split(',').filter(|n| !n.is_empty()) {
            let i = pick("group_by", name, &keys, "key")?;
            if !ask.group_by.contains(&i) {
                ask.group_by.push(i);
            }
        }
    }
    if let Some(m) = p.get("order_by") {
        let i = pick("order_by", m, &measures, "measure")?;
        if r.measures[i].merge.sketch().is_some() {
            let exact: Vec<&str> = r
                .measures
                .iter()
                .filter(|m| m.merge.sketch().is_none())
                .map(|m| m.name.as_str())
                .collect();
            return Err(ApiError::bad(
                "invalid_parameter",
                format!(
                    "`order_by` = {m} is a sketch, which a top-K cannot rank yet; order by an exact measure: {}",
                    exact.join(", ")
                ),
            ));
        }
        ask.order_by = Some(i);
    }
    if let Some(l) = p.get("limit") {
        ask.limit = l
            .parse()
            .ok()
            .filter(|n| (1..=MAX_ROWS).contains(n))
            .ok_or_else(|| {
                ApiError::bad(
                    "invalid_parameter",
                    format!("`limit` must be an integer from 1 to {MAX_ROWS}"),
                )
            })?;
    }
    if let Some(g) = p.get("granularity") {
        let ms = humantime::parse_duration(g)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .filter(|ms| *ms > 0)
            .ok_or_else(|| {
                let shown: String = g.chars().take(32).collect();
                ApiError::bad(
                    "invalid_parameter",
                    format!("`granularity` = {shown:?} is not a duration such as 1h, 15m or 1d"),
                )
            })?;
        ask.granularity = Some(ms);
    }
    Ok((p, ask))
}

fn cell(c: &Cell) -> Value {
    match c {
        Cell::Null => Value::Null,
        Cell::Text(t) => json!(t),
        Cell::Int(i) => json!(i),
        Cell::Real(f) => json!(f),
        Cell::Bytes(_) => Value::Null,
    }
}

/// A measure's value into `obj`: a sketch as its estimate, with its bounds
/// as `<name>_low` and `<name>_high` (about 95% confidence).
pub(super) fn put_measure(obj: &mut serde_json::Map<String, Value>, m: &Measure, c: Option<&Cell>) {
    if m.merge.sketch().is_none() {
        obj.insert(m.name.clone(), c.map_or(Value::Null, cell));
        return;
    }
    let e = match c {
        Some(Cell::Bytes(b)) => sketch::estimate(b, m.quantile).ok().flatten(),
        _ => None,
    };
    let (value, low, high) = match (e, m.merge) {
        (Some(e), _) => (json!(e.value), json!(e.low), json!(e.high)),
        // No rows: no one counted, no value ranked.
        (None, MergeRule::Distinct) => (json!(0.0), json!(0.0), json!(0.0)),
        (None, _) => (Value::Null, Value::Null, Value::Null),
    };
    obj.insert(m.name.clone(), value);
    obj.insert(format!("{}_low", m.name), low);
    obj.insert(format!("{}_high", m.name), high);
}

pub(super) async fn query(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let served = s.served();
    let r = served.get(&name).ok_or_else(|| {
        let shown: String = name.chars().take(64).collect();
        ApiError::bad(
            "unknown_rollup",
            format!("no rollup `{shown}`; the rollups are: {}", served.names()),
        )
    })?;
    let Query(pairs) = q.map_err(|e| {
        ApiError::bad(
            "invalid_query",
            format!("the query string cannot be parsed: {e}"),
        )
    })?;
    let (p, ask) = ask_of(r, pairs)?;
    let (start, end) = p.range(&s)?;
    let family = served.family(r);
    let tiers = &family.tiers;
    let now = chrono::Utc::now().timestamp_millis();
    let plan = match ask.granularity {
        Some(g) => {
            let tier = tiers.series_tier(g).ok_or_else(|| {
                ApiError::bad(
                    "invalid_parameter",
                    format!(
                        "`granularity` = {} is not a multiple of a window of `{}`'s family ({})",
                        width_name(g),
                        r.name,
                        tiers.granularities()
                    ),
                )
            })?;
            for (name, t) in [("start", start), ("end", end)] {
                if t.rem_euclid(g) != 0 {
                    return Err(ApiError::bad(
                        "unaligned_range",
                        format!("`{name}` is not on a {} boundary; align it or choose a finer granularity", width_name(g)),
                    ));
                }
            }
            if (end - start) / g > s.cfg.max_series_points as i64 {
                return Err(ApiError::bad(
                    "range_too_long",
                    format!(
                        "{} buckets exceed api.max_series_points = {}; use a coarser granularity or a shorter range",
                        (end - start) / g,
                        s.cfg.max_series_points
                    ),
                ));
            }
            tiers
                .check_series_retained(tier, start, g, now)
                .map_err(not_retained)?;
            vec![super::super::tiers::Segment {
                tier,
                lo: start,
                hi: end,
            }]
        }
        None => {
            let plan = tiers
                .plan(start, end)
                .map_err(|(_, message)| ApiError::bad("unaligned_range", message))?;
            tiers
                .check_retained(&plan, start, end, now)
                .map_err(not_retained)?;
            plan
        }
    };
    let st = statement(r, family, &plan, &ask);
    let (rows, as_of) = tokio::join!(
        s.reader.cells(&st.text, st.args, st.kinds, st.point),
        as_of(&s)
    );
    let mut rows = rows?;
    let truncated = !ask.group_by.is_empty() && rows.len() > ask.limit as usize
        || ask.granularity.is_some() && rows.len() > ask.limit as usize;
    rows.truncate(ask.limit as usize);
    let out: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut obj = serde_json::Map::new();
            let mut cells = row.iter();
            for k in &ask.group_by {
                obj.insert(r.keys[*k].0.clone(), cells.next().map_or(Value::Null, cell));
            }
            if ask.granularity.is_some() {
                let b = match cells.next() {
                    Some(Cell::Int(b)) => json!(fmt_time(*b)),
                    _ => Value::Null,
                };
                obj.insert("bucket".into(), b);
            }
            for m in &r.measures {
                put_measure(&mut obj, m, cells.next());
            }
            Value::Object(obj)
        })
        .collect();
    Ok(Json(json!({
        "rollup": r.name,
        "version": r.version,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "rows": out,
        "truncated": truncated,
        "as_of": as_of?,
    }))
    .into_response())
}

/// `/v1/stats` functions answered by a sketch measure, and the rank each
/// asks of a quantile sketch.
pub(super) const SKETCH_FUNCTIONS: &[(&str, Option<f64>)] = &[
    ("unique", None),
    ("p50", Some(0.5)),
    ("p95", Some(0.95)),
    ("p99", Some(0.99)),
];

/// The rollup and measure that answer `/v1/stats?function=…` for one video:
/// keyed by `video_id` (and perhaps `event_type`), with a distinct sketch
/// for `unique`, a quantile sketch for a percentile (the one kept for that
/// rank if there is one: any KLL sketch answers every rank).
fn sketch_source(served: &Served, rank: Option<f64>) -> Option<(&ServedRollup, usize)> {
    let fits = |r: &ServedRollup| {
        r.keys.iter().any(|(n, _)| n == "video_id")
            && r.keys
                .iter()
                .all(|(n, _)| n == "video_id" || n == "event_type")
    };
    let want = if rank.is_some() {
        MergeRule::Quantile
    } else {
        MergeRule::Distinct
    };
    let mut best: Option<(&ServedRollup, usize)> = None;
    for r in served.rollups.iter().filter(|r| r.live && fits(r)) {
        for (i, m) in r.measures.iter().enumerate() {
            if m.merge != want {
                continue;
            }
            if rank.is_some() && m.quantile == rank {
                return Some((r, i));
            }
            best = best.or(Some((r, i)));
        }
    }
    best
}

/// `/v1/stats` with `function=unique|p50|p95|p99`, from a sketch measure
/// through the generic rollup query.
pub(super) async fn sketch_stats(
    s: &ApiState,
    p: &Params,
    video: &str,
    et: Option<&str>,
    function: &str,
    rank: Option<f64>,
) -> ApiResult {
    let served = s.served();
    let (r, m) = sketch_source(&served, rank).ok_or_else(|| {
        let what = if rank.is_some() {
            "approx_percentile_cont(value, p)"
        } else {
            "approx_distinct(x)"
        };
        ApiError::bad(
            "invalid_parameter",
            format!("`function` = {function} needs a rollup keyed by video_id (and optionally event_type) with a {what} measure; none is served"),
        )
    })?;
    let mut ask = Ask {
        limit: 1,
        ..Default::default()
    };
    for (name, value) in [("video_id", Some(video)), ("event_type", et)] {
        let Some(value) = value else { continue };
        let Some(k) = r.keys.iter().position(|(n, _)| n == name) else {
            return Err(ApiError::bad(
                "invalid_parameter",
                format!(
                    "`{name}` cannot be used with `function` = {function}: its rollup `{}` keeps it only for {}",
                    r.name,
                    r.keys.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        ask.filters.push((k, vec![Arg::Text(value.to_string())]));
    }
    let (start, end) = p.range(s)?;
    let family = served.family(r);
    let now = chrono::Utc::now().timestamp_millis();
    let plan = family.tiers.plan(start, end).map_err(|(_, message)| {
        ApiError::bad(
            "unaligned_range",
            format!("{message} (`function` = {function} reads `{}`)", r.name),
        )
    })?;
    family
        .tiers
        .check_retained(&plan, start, end, now)
        .map_err(not_retained)?;
    let st = statement(r, family, &plan, &ask);
    let (rows, as_of) = tokio::join!(
        s.reader.cells(&st.text, st.args, st.kinds, st.point),
        as_of(s)
    );
    let rows = rows?;
    let mut measure = r.measures[m].clone();
    if rank.is_some() {
        measure.quantile = rank;
    }
    let mut obj = serde_json::Map::new();
    put_measure(&mut obj, &measure, rows.first().and_then(|row| row.get(m)));
    let name = &measure.name;
    Ok(Json(json!({
        "video_id": video,
        "event_type": et,
        "function": function,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "value": obj.get(name).cloned().unwrap_or(Value::Null),
        "low": obj.get(&format!("{name}_low")).cloned().unwrap_or(Value::Null),
        "high": obj.get(&format!("{name}_high")).cloned().unwrap_or(Value::Null),
        "rollup": r.name,
        "as_of": as_of?,
    }))
    .into_response())
}
