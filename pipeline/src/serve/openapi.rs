//! `GET /openapi.json`: the API described in OpenAPI 3.1.

use serde_json::{json, Value};

fn param(name: &str, required: bool, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": required, "description": description, "schema": schema})
}

fn time_param(name: &str) -> Value {
    let d = if name == "start" {
        "Range start, inclusive (RFC 3339)."
    } else {
        "Range end, exclusive (RFC 3339)."
    };
    param(
        name,
        true,
        d,
        json!({"type": "string", "format": "date-time"}),
    )
}

fn id_param(name: &str, required: bool, description: &str) -> Value {
    param(
        name,
        required,
        description,
        json!({"type": "string", "minLength": 1, "maxLength": 256}),
    )
}

fn errors() -> Value {
    let e = json!({"$ref": "#/components/responses/Error"});
    json!({"400": e, "401": e, "503": e})
}

fn get_op(summary: &str, params: Vec<Value>, ok: &str) -> Value {
    let mut responses = errors();
    if let Some(o) = responses.as_object_mut() {
        o.insert("200".into(), json!({"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}));
    }
    json!({"get": {"summary": summary, "parameters": params, "security": [{"read": []}, {}], "responses": responses}})
}

fn json_type(k: crate::aggregate::ColumnKind) -> &'static str {
    match k {
        crate::aggregate::ColumnKind::Text => "string",
        crate::aggregate::ColumnKind::Int => "integer",
        crate::aggregate::ColumnKind::Real | crate::aggregate::ColumnKind::Bytes => "number",
    }
}

/// `GET /v1/rollups/<name>` for one rollup, with its real keys and measures.
fn rollup_op(r: &super::generic::ServedRollup, family: &[String]) -> Value {
    let keys: Vec<&str> = r.keys.iter().map(|(n, _)| n.as_str()).collect();
    let measures: Vec<&str> = r.measures.iter().map(|m| m.name.as_str()).collect();
    let mut params = vec![time_param("start"), time_param("end")];
    for (name, kind) in &r.keys {
        params.push(json!({"name": name, "in": "query", "required": false, "explode": true,
            "description": format!("Only rows whose `{name}` is one of these (repeat the parameter)."),
            "schema": {"type": "array", "items": {"type": json_type(*kind)}}}));
    }
    params.push(param("group_by", false, "Comma-separated keys: one row per combination (default: one row of totals).",
        json!({"type": "string", "pattern": format!("^({})(,({}))*$", keys.join("|"), keys.join("|"))})));
    params.push(param(
        "granularity",
        false,
        "Bucket width (15m, 1h, 1d): a row per non-empty bucket, with `bucket`.",
        json!({"type": "string"}),
    ));
    params.push(param(
        "order_by",
        false,
        "Measure to sort by, descending (top-K with limit).",
        json!({"type": "string", "enum": measures}),
    ));
    params.push(param(
        "limit",
        false,
        "Rows at most (default 1000).",
        json!({"type": "integer", "minimum": 1, "maximum": super::http::MAX_ROLLUP_ROWS}),
    ));
    let mut props = serde_json::Map::new();
    for (name, kind) in &r.keys {
        props.insert(name.clone(), json!({"type": json_type(*kind)}));
    }
    props.insert(
        "bucket".into(),
        json!({"type": "string", "format": "date-time"}),
    );
    for m in &r.measures {
        props.insert(
            m.name.clone(),
            json!({"type": [json_type(m.kind), "null"],
            "description": format!("{}({}) merged by {}", m.function, m.name, m.merge.name())}),
        );
    }
    let mut responses = errors();
    if let Some(o) = responses.as_object_mut() {
        o.insert(
            "200".into(),
            json!({"description": "{rollup, start, end, rows, truncated, as_of}",
            "content": {"application/json": {"schema": {"type": "object", "properties": {
                "rollup": {"type": "string"}, "truncated": {"type": "boolean"},
                "as_of": {"type": ["string", "null"], "format": "date-time"},
                "rows": {"type": "array", "items": {"type": "object", "properties": props}}}}}}}),
        );
    }
    json!({"get": {
        "summary": format!("`{}` ({} windows; answered with its family: {})", r.name,
            super::tiers::width_name(r.width_ms), family.join(", ")),
        "parameters": params, "security": [{"read": []}, {}], "responses": responses}})
}

pub(super) fn document(served: &super::generic::Served) -> Value {
    let mut doc = base();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        paths.insert(
            "/v1/rollups".into(),
            get_op(
                "Every rollup: keys, window, measures, retention, fingerprint, family",
                vec![],
                "{rollups: [{name, file, keys, window, measures, retention, fingerprint, family}]}",
            ),
        );
        for r in &served.rollups {
            paths.insert(
                format!("/v1/rollups/{}", r.name),
                rollup_op(r, &served.family(r).members),
            );
        }
    }
    doc
}

fn base() -> Value {
    let video = || id_param("video_id", true, "Video id.");
    let etype = || id_param("event_type", false, "Event type; omitted means all types.");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "tally",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Exact windowed counts. Ranges are half-open [start, end) in RFC 3339 UTC and must fall on window boundaries of the configured rollups; every answer carries as_of, the time up to which the data is complete."
        },
        "paths": {
            "/v1/count": get_op("getCount: events for a video in a range", vec![video(), etype(), time_param("start"), time_param("end")],
                "{video_id, event_type, start, end, count, as_of}"),
            "/v1/stats": get_op("getStats: count, sum, avg, min or max of value", vec![
                video(), etype(),
                param("function", true, "Statistic; avg = sum / value_count; min, max and avg are null without values.",
                      json!({"type": "string", "enum": ["count", "sum", "avg", "min", "max"]})),
                time_param("start"), time_param("end")],
                "{video_id, event_type, function, start, end, value, count, value_count, as_of}"),
            "/v1/series": get_op("Per-bucket count, sum, min, max and avg for charts", vec![
                video(), etype(), time_param("start"), time_param("end"),
                param("granularity", false, "Bucket width (default hour).", json!({"type": "string", "enum": ["minute", "hour", "day"]}))],
                "{video_id, event_type, granularity, start, end, points: [{start, count, sum, value_count, min, max, avg}], as_of}"),
            "/v1/top": get_op("Trending: the videos with the most events", vec![
                etype(), time_param("start"), time_param("end"),
                param("limit", false, "How many videos (default 10).", json!({"type": "integer", "minimum": 1, "maximum": 1000}))],
                "{event_type, start, end, limit, videos: [{video_id, count}], as_of}"),
            "/v1/sql": {"post": {
                "summary": "One read-only SQL query over events (the archive, with dt and hour), dead_letters and every rollup by name",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["query"], "properties": {"query": {"type": "string"}}}}}},
                "responses": {
                    "200": {"description": "{columns: [{name, type}], rows: [{...}], row_count}; or text/csv, application/vnd.apache.arrow.stream, application/vnd.apache.parquet by Accept"},
                    "400": {"$ref": "#/components/responses/Error"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "406": {"$ref": "#/components/responses/Error"},
                    "429": {"$ref": "#/components/responses/Error"},
                    "503": {"$ref": "#/components/responses/Error"}}}},
            "/v1/reports/monthly/{file}": {"get": {
                "summary": "The monthly report: YYYY-MM.html, YYYY-MM.md or YYYY-MM.csv (a month in progress is compared to date)",
                "parameters": [
                    {"name": "file", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}\\.(html|md|csv)$"}},
                    param("table", false, "CSV: one table by name (default: every table, each under its title).", json!({"type": "string"})),
                    param("bom", false, "CSV: start with a UTF-8 byte-order mark.", json!({"type": "boolean"}))],
                "responses": {
                    "200": {"description": "text/html, text/markdown or text/csv"},
                    "400": {"$ref": "#/components/responses/Error"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "503": {"$ref": "#/components/responses/Error"}}}},
            "/v1/events": {"post": {
                "summary": "processEvents: validate all, then produce all to Kafka (idempotent, acks=all)",
                "security": [{"write": []}, {}],
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                    "application/x-ndjson": {"schema": {"type": "string"}}}},
                "responses": {
                    "202": {"description": "Every event was acknowledged by the broker: {accepted}"},
                    "400": {"description": "Invalid events (nothing produced): error.events lists {index, reason, detail}"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "413": {"$ref": "#/components/responses/Error"},
                    "503": {"description": "The broker failed: error.acknowledged says how many were acknowledged"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "responses": {"200": {"description": "text/plain"}}}},
            "/livez": {"get": {"summary": "The process is alive", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "The serving store and the broker can be reached",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready; checks say which"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "securitySchemes": {
                "read": {"type": "http", "scheme": "bearer", "description": "api.read_tokens (when configured)"},
                "write": {"type": "http", "scheme": "bearer", "description": "api.write_tokens (when configured)"}
            },
            "responses": {"Error": {"description": "{error: {code, message}}", "content": {"application/json": {"schema": {
                "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}}}}}
        }
    })
}
