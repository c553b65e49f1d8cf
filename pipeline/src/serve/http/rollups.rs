//! `GET /v1/rollups` (every rollup: keys, window, measures, retention,
//! fingerprint, family) and `GET /v1/rollups/{name}` (any rollup queried:
//! filters, group by, granularity, top-K). See `serve/generic.rs`.

use axum::extract::Path;

use super::*;
use crate::aggregate::ColumnKind;
use crate::serve::generic::{statement, Ask, ServedRollup};
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
    }
}

fn describe(s: &ApiState, r: &ServedRollup) -> Value {
    let family = s.served.family(r);
    json!({
        "name": r.name,
        "keys": r.keys.iter().map(|(n, k)| json!({"name": n, "type": type_name(*k)})).collect::<Vec<_>>(),
        "window": {"column": r.window, "width": width_name(r.width_ms), "width_ms": r.width_ms},
        "measures": r.measures.iter().map(|m| json!({
            "name": m.name, "kind": m.function, "merge": m.merge.name(), "type": type_name(m.kind),
        })).collect::<Vec<_>>(),
        "retention": r.keep.to_string(),
        "file": r.file,
        "fingerprint": r.fingerprint,
        "family": family.members,
    })
}

pub(super) async fn list(State(s): State<Shared>, headers: HeaderMap) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let rollups: Vec<Value> = s.served.rollups.iter().map(|r| describe(&s, r)).collect();
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
            ColumnKind::Real => {
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
        ask.order_by = Some(pick("order_by", m, &measures, "measure")?);
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
    }
}

pub(super) async fn query(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let r = s.served.get(&name).ok_or_else(|| {
        let shown: String = name.chars().take(64).collect();
        ApiError::bad(
            "unknown_rollup",
            format!("no rollup `{shown}`; the rollups are: {}", s.served.names()),
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
    let family = s.served.family(r);
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
                obj.insert(m.name.clone(), cells.next().map_or(Value::Null, cell));
            }
            Value::Object(obj)
        })
        .collect();
    Ok(Json(json!({
        "rollup": r.name,
        "start": fmt_time(start),
        "end": fmt_time(end),
        "rows": out,
        "truncated": truncated,
        "as_of": as_of?,
    }))
    .into_response())
}
