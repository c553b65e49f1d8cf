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

pub(super) fn document() -> Value {
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
