//! `POST /v1/sql` (read token): `{"query": "SELECT …"}` answered as JSON
//! rows, or CSV, Arrow IPC or Parquet by `Accept`. See `serve/sql.rs` for
//! the tables and the limits.

use datafusion::arrow::record_batch::RecordBatch;

use super::*;
use crate::serve::sql::{self, Answer, Limits, SqlError};

/// The answer's encodings, by `Accept`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Json,
    Csv,
    Arrow,
    Parquet,
}

const ARROW: &str = "application/vnd.apache.arrow.stream";
const PARQUET: &str = "application/vnd.apache.parquet";

fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    for part in accept.split(',') {
        let media = part.split(';').next().unwrap_or("").trim();
        match media {
            "application/json" | "*/*" | "application/*" | "" => return Ok(Encoding::Json),
            "text/csv" => return Ok(Encoding::Csv),
            ARROW => return Ok(Encoding::Arrow),
            PARQUET | "application/x-parquet" => return Ok(Encoding::Parquet),
            _ => {}
        }
    }
    let shown: String = accept.chars().take(64).collect();
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        format!("`Accept: {shown}` is none of application/json, text/csv, {ARROW}, {PARQUET}"),
    ))
}

fn encode(a: &Answer, enc: Encoding) -> Result<(Vec<u8>, &'static str), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut out = Vec::new();
    match enc {
        Encoding::Json => {
            let columns: Vec<Value> = a
                .schema
                .fields()
                .iter()
                .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
                .collect();
            out.extend_from_slice(b"{\"columns\":");
            out.extend_from_slice(&serde_json::to_vec(&columns).map_err(|x| e(&x))?);
            out.extend_from_slice(b",\"rows\":");
            {
                let mut w = datafusion::arrow::json::ArrayWriter::new(&mut out);
                let refs: Vec<&RecordBatch> = a.batches.iter().collect();
                w.write_batches(&refs).map_err(|x| e(&x))?;
                w.finish().map_err(|x| e(&x))?;
            }
            if a.rows == 0 {
                // The writer writes nothing for no rows.
                if !out.ends_with(b"]") {
                    out.extend_from_slice(b"[]");
                }
            }
            out.extend_from_slice(format!(",\"row_count\":{}}}", a.rows).as_bytes());
            Ok((out, "application/json"))
        }
        Encoding::Csv => {
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for b in &a.batches {
                    w.write(b).map_err(|x| e(&x))?;
                }
            }
            if a.batches.is_empty() {
                let names: Vec<&str> = a
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                out.extend_from_slice(names.join(",").as_bytes());
                out.push(b'\n');
            }
            Ok((out, "text/csv; charset=utf-8"))
        }
        Encoding::Arrow => {
            let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &a.schema)
                .map_err(|x| e(&x))?;
            for b in &a.batches {
                w.write(b).map_err(|x| e(&x))?;
            }
            w.finish().map_err(|x| e(&x))?;
            drop(w);
            Ok((out, ARROW))
        }
        Encoding::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, a.schema.clone(), None)
                .map_err(|x| e(&x))?;
            for b in &a.batches {
                w.write(b).map_err(|x| e(&x))?;
            }
            w.close().map_err(|x| e(&x))?;
            Ok((out, PARQUET))
        }
    }
}

pub(super) async fn query(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let enc = encoding(&headers)?;
    let body = body.map_err(|e| ApiError::bad("invalid_body", e.to_string()))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            "invalid_body",
            format!("the body is not JSON ({e}); send {{\"query\": \"SELECT …\"}}"),
        )
    })?;
    let Some(text) = v.get("query").and_then(Value::as_str) else {
        return Err(ApiError::bad(
            "invalid_parameter",
            "`query` is missing or not a string; send {\"query\": \"SELECT …\"}",
        ));
    };
    let Ok(_slot) = s.sql_slots.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_queries",
            format!(
                "api.sql_concurrency = {} queries run already; retry shortly",
                s.settings.api.sql_concurrency
            ),
        ));
    };
    let store = s
        .sql_store
        .get_or_try_init(|| async {
            crate::sink::ServingStore::open_existing(
                &s.settings.serving_url(),
                &s.catalog.rollups,
                s.settings.serving.window_index,
            )
            .await
        })
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    let live = s.live.lock().map(|l| l.clone()).unwrap_or_default();
    let answer = sql::run(
        &s.settings,
        &s.catalog,
        s.decoder.schema(),
        store,
        &live,
        text,
        Limits::of(&s.settings),
    )
    .await
    .map_err(|e| match e {
        SqlError::Bad(m) => ApiError::bad("invalid_query", m),
        SqlError::Limit(m) => ApiError::bad("query_limit", m),
        SqlError::Internal(m) => ServeError::Store(m).into(),
    })?;
    let (bytes, content_type) = encode(&answer, enc)
        .map_err(|m| ApiError::from(ServeError::Store(format!("cannot encode the answer: {m}"))))?;
    let mut resp = (StatusCode::OK, bytes).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}
