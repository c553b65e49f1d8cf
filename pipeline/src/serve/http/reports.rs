//! `GET /v1/reports/monthly/{YYYY-MM}.{html|csv|md}`: the monthly report
//! (`jobs/report`) for marketing, without shell access. One report is built
//! at a time (each reads a month of hourly rows); others wait their turn
//! within the request timeout.

use axum::extract::Path;

use super::*;
use crate::jobs::report::{self, Month, Span};

pub(super) async fn monthly(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(file): Path<String>,
    q: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    authorize(&s.cfg.read_tokens.0, &headers, "read")?;
    let p = params(q, &["table", "bom"])?;
    let shown: String = file.chars().take(32).collect();
    let bad_path = || {
        ApiError::bad(
            "invalid_parameter",
            format!("`{shown}` is not YYYY-MM.html, YYYY-MM.csv or YYYY-MM.md (e.g. 2026-11.html)"),
        )
    };
    let (month, ext) = file.rsplit_once('.').ok_or_else(bad_path)?;
    let month = Month::parse(month).map_err(|_| bad_path())?;
    if !matches!(ext, "html" | "csv" | "md") {
        return Err(bad_path());
    }
    let bom = match p.get("bom") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            let v: String = v.chars().take(32).collect();
            return Err(ApiError::bad(
                "invalid_parameter",
                format!("`bom` = {v:?} is not true or false"),
            ));
        }
    };
    if ext != "csv" && (p.get("table").is_some() || bom) {
        return Err(ApiError::bad(
            "invalid_parameter",
            "`table` and `bom` apply to the .csv report only",
        ));
    }
    let built = {
        let _turn = s.report_turn.lock().await;
        report::build(&s.settings, Span::Month(month)).await
    };
    let r = built.map_err(|e| {
        tracing::error!(error = %e, "report failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "report_unavailable",
            format!("the report cannot be built: {e}"),
        )
    })?;
    let (body, content_type) = match ext {
        "html" => (report::render::html(&r), "text/html; charset=utf-8"),
        "md" => (report::render::markdown(&r), "text/markdown; charset=utf-8"),
        _ => match p.get("table") {
            None => (report::render::csv_all(&r, bom), "text/csv; charset=utf-8"),
            Some(name) => {
                let t = r
                    .tables
                    .iter()
                    .find(|t| t.query.name == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> =
                            r.tables.iter().map(|t| t.query.name.as_str()).collect();
                        let name: String = name.chars().take(64).collect();
                        ApiError::bad(
                            "invalid_parameter",
                            format!(
                                "`table` = {name:?} is not a table of the report; valid: {}",
                                names.join(", ")
                            ),
                        )
                    })?;
                (
                    report::render::csv(&t.batch, bom),
                    "text/csv; charset=utf-8",
                )
            }
        },
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if ext == "csv" {
        let name = match p.get("table") {
            Some(t) => format!("report-{month}-{t}.csv"),
            None => format!("report-{month}.csv"),
        };
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}
