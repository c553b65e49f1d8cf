//! Renderers of a [`MonthlyReport`]: self-contained HTML with inline SVG
//! charts (no scripts, no fonts or styles from the network), CSV (RFC 4180,
//! raw values) and Markdown.

use std::fmt::Write;

use datafusion::arrow::array::{Array, BooleanArray, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

use super::{Chart, MonthlyReport, ReportTable};
use crate::serve::http::fmt_time;

const PALETTE: [&str; 8] = [
    "#2563eb", "#db2777", "#16a34a", "#ea580c", "#7c3aed", "#0891b2", "#ca8a04", "#64748b",
];

/// The raw text of every cell, row by row (empty for null).
pub fn cells(batch: &RecordBatch) -> Vec<Vec<String>> {
    let opts = FormatOptions::default().with_null("");
    let formatters: Vec<Option<ArrayFormatter<'_>>> = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).ok())
        .collect();
    (0..batch.num_rows())
        .map(|r| {
            formatters
                .iter()
                .map(|f| {
                    f.as_ref()
                        .map_or_else(String::new, |f| f.value(r).to_string())
                })
                .collect()
        })
        .collect()
}

fn is_numeric(t: &DataType) -> bool {
    t.is_integer()
        || t.is_floating()
        || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..))
}

/// A column as f64 (null and non-numeric as None).
fn numbers(batch: &RecordBatch, column: &str) -> Vec<Option<f64>> {
    let Ok(i) = batch.schema().index_of(column) else {
        return vec![None; batch.num_rows()];
    };
    let col = batch.column(i);
    if !is_numeric(col.data_type()) {
        return vec![None; batch.num_rows()];
    }
    match cast(col, &DataType::Float64) {
        Ok(a) => match a.as_any().downcast_ref::<Float64Array>() {
            Some(f) => (0..f.len())
                .map(|r| (!f.is_null(r)).then(|| f.value(r)))
                .collect(),
            None => vec![None; batch.num_rows()],
        },
        Err(_) => vec![None; batch.num_rows()],
    }
}

fn column_text(batch: &RecordBatch, column: &str) -> Vec<String> {
    let Ok(i) = batch.schema().index_of(column) else {
        return vec![String::new(); batch.num_rows()];
    };
    let all = cells(batch);
    all.into_iter()
        .map(|mut r| std::mem::take(&mut r[i]))
        .collect()
}

/// `1234567` -> `1,234,567`; other text unchanged.
pub fn group_digits(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map_or(("", s), |r| ("-", r));
    let (int, frac) = rest
        .split_once('.')
        .map_or((rest, None), |(a, b)| (a, Some(b)));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + int.len() / 3);
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// `prev_events` -> `Prev events`, `change_pct` -> `Change %`.
pub fn heading(column: &str) -> String {
    let words: Vec<String> = column
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w == "pct" {
                "%".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let text = words.join(" ");
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_uppercase().collect::<String>() + chars.as_str()
    })
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// A "nice" axis maximum at or above `v`: 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn short_number(v: f64) -> String {
    let a = v.abs();
    let (d, s) = if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / d;
    if (x - x.round()).abs() < 1e-9 {
        format!("{}{s}", x.round())
    } else {
        format!("{x:.1}{s}")
    }
}

/// Horizontal bar chart, one bar per row.
fn bar_svg(t: &ReportTable, label: &str, value: &str) -> String {
    let labels = column_text(&t.batch, label);
    let values = numbers(&t.batch, value);
    let (w, label_w, row_h, top) = (760.0, 260.0, 26.0, 8.0);
    let h = top * 2.0 + row_h * labels.len().max(1) as f64;
    let max = nice_max(values.iter().flatten().copied().fold(0.0, f64::max));
    let bar_w = w - label_w - 90.0;
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {w} {h}" width="100%" xmlns="http://www.w3.org/2000/svg">"#,
        esc(&t.query.title)
    );
    for (i, (l, v)) in labels.iter().zip(&values).enumerate() {
        let y = top + i as f64 * row_h;
        let v = v.unwrap_or(0.0);
        let len = (v.max(0.0) / max * bar_w).max(if v > 0.0 { 1.0 } else { 0.0 });
        let _ = write!(
            s,
            r#"<text x="{lx}" y="{ty}" text-anchor="end" class="lbl">{l}</text><rect x="{label_w}" y="{ry}" width="{len:.1}" height="{bh}" rx="3" fill="{c}"><title>{full}: {val}</title></rect><text x="{vx:.1}" y="{ty}" class="val">{val}</text>"#,
            lx = label_w - 8.0,
            ty = y + row_h * 0.65,
            l = esc(&truncate(l, 36)),
            ry = y + 4.0,
            bh = row_h - 8.0,
            c = PALETTE[0],
            full = esc(l),
            vx = label_w + len + 6.0,
            val = esc(&group_digits(&format_value(v))),
        );
    }
    s.push_str("</svg>");
    s
}

fn format_value(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}")
    }
}

/// Line chart: one polyline per series over the x values (in row order).
fn line_svg(t: &ReportTable, x: &str, series: &str, y: &str) -> String {
    let xs = column_text(&t.batch, x);
    let ss = column_text(&t.batch, series);
    let ys = numbers(&t.batch, y);
    let mut x_order: Vec<String> = Vec::new();
    let mut s_order: Vec<String> = Vec::new();
    for (xv, sv) in xs.iter().zip(&ss) {
        if !x_order.contains(xv) {
            x_order.push(xv.clone());
        }
        if !s_order.contains(sv) {
            s_order.push(sv.clone());
        }
    }
    let (w, h, left, right, top, bottom) = (760.0, 300.0, 56.0, 16.0, 16.0, 56.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max = nice_max(ys.iter().flatten().copied().fold(0.0, f64::max));
    let px = |i: usize| {
        left + if x_order.len() > 1 {
            pw * i as f64 / (x_order.len() - 1) as f64
        } else {
            pw / 2.0
        }
    };
    let py = |v: f64| top + ph - ph * v / max;
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{}" viewBox="0 0 {w} {h}" width="100%" xmlns="http://www.w3.org/2000/svg">"#,
        esc(&t.query.title)
    );
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let yy = py(v);
        let _ = write!(
            s,
            r#"<line x1="{left}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" class="grid"/><text x="{tx}" y="{ty:.1}" text-anchor="end" class="axis">{}</text>"#,
            short_number(v),
            x2 = w - right,
            tx = left - 6.0,
            ty = yy + 4.0,
        );
    }
    let step = (x_order.len() / 8).max(1);
    let partial = partial_xs(t, x);
    for (i, xv) in x_order.iter().enumerate() {
        let is_partial = partial.contains(xv);
        if i % step == 0 || i + 1 == x_order.len() || is_partial {
            let label = xv.get(5..).filter(|_| xv.len() == 10).unwrap_or(xv);
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle" class="axis">{}{}</text>"#,
                px(i),
                top + ph + 16.0,
                esc(label),
                if is_partial { " (partial)" } else { "" }
            );
        }
        if is_partial {
            // The partial day's points sit behind a dashed marker.
            let _ = write!(
                s,
                r##"<line class="partial" x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{}" stroke="#94a3b8" stroke-dasharray="4 3"/>"##,
                top + ph,
                x = px(i),
            );
        }
    }
    for (k, name) in s_order.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<String> = xs
            .iter()
            .zip(&ss)
            .zip(&ys)
            .filter(|((_, sv), _)| *sv == name)
            .filter_map(|((xv, _), yv)| {
                let i = x_order.iter().position(|o| o == xv)?;
                Some(format!("{:.1},{:.1}", px(i), py(yv.unwrap_or(0.0))))
            })
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let lx = left + k as f64 * 130.0;
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="{ly}" width="12" height="12" rx="2" fill="{color}"/><text x="{tx}" y="{ty}" class="lbl">{}</text>"#,
            esc(name),
            ly = h - 22.0,
            tx = lx + 18.0,
            ty = h - 12.0,
        );
    }
    s.push_str("</svg>");
    s
}

/// A line chart's table, pivoted for reading: one row per x value, one
/// column per series (the CSV keeps the long form).
fn pivot_table(t: &ReportTable, x: &str, series: &str, y: &str) -> String {
    let xs = column_text(&t.batch, x);
    let ss = column_text(&t.batch, series);
    let ys = column_text(&t.batch, y);
    let mut x_order: Vec<&String> = Vec::new();
    let mut s_order: Vec<&String> = Vec::new();
    let mut values: std::collections::HashMap<(&String, &String), &String> =
        std::collections::HashMap::new();
    for ((xv, sv), yv) in xs.iter().zip(&ss).zip(&ys) {
        if !x_order.contains(&xv) {
            x_order.push(xv);
        }
        if !s_order.contains(&sv) {
            s_order.push(sv);
        }
        values.insert((xv, sv), yv);
    }
    let mut s = format!(
        r#"<table id="t-{}"><thead><tr><th>{}</th>"#,
        esc(&t.query.name),
        esc(&heading(x))
    );
    for sv in &s_order {
        let _ = write!(s, r#"<th class="num">{}</th>"#, esc(sv));
    }
    s.push_str("</tr></thead><tbody>");
    let partial = partial_xs(t, x);
    for xv in &x_order {
        let mark = if partial.contains(xv) {
            " (partial day)"
        } else {
            ""
        };
        let _ = write!(s, "<tr><td>{}{mark}</td>", esc(xv));
        for sv in &s_order {
            let v = values
                .get(&(*xv, *sv))
                .map_or_else(|| "–".to_string(), |v| group_digits(v));
            let _ = write!(s, r#"<td class="num">{}</td>"#, esc(&v));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

fn html_table(t: &ReportTable) -> String {
    let schema = t.batch.schema();
    let numeric: Vec<bool> = schema
        .fields()
        .iter()
        .map(|f| is_numeric(f.data_type()))
        .collect();
    let mut s = format!(r#"<table id="t-{}"><thead><tr>"#, esc(&t.query.name));
    for (f, num) in schema.fields().iter().zip(&numeric) {
        let _ = write!(
            s,
            r#"<th{}>{}</th>"#,
            if *num { r#" class="num""# } else { "" },
            esc(&heading(f.name()))
        );
    }
    s.push_str("</tr></thead><tbody>");
    for row in cells(&t.batch) {
        s.push_str("<tr>");
        for ((cell, num), f) in row.iter().zip(&numeric).zip(schema.fields()) {
            if *num {
                let shown = if cell.is_empty() {
                    "–".to_string()
                } else {
                    group_digits(cell)
                };
                let class = if f.name().ends_with("_pct") && cell.starts_with('-') {
                    "num down"
                } else if f.name().ends_with("_pct") && !cell.is_empty() {
                    "num up"
                } else {
                    "num"
                };
                let _ = write!(s, r#"<td class="{class}">{}</td>"#, esc(&shown));
            } else {
                let _ = write!(s, "<td>{}</td>", esc(cell));
            }
        }
        s.push_str("</tr>");
    }
    if t.batch.num_rows() == 0 {
        let _ = write!(
            s,
            r#"<tr><td colspan="{}" class="empty">No events in this month.</td></tr>"#,
            numeric.len().max(1)
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// Single-row tables render as headline figures.
fn kpis(t: &ReportTable) -> String {
    let schema = t.batch.schema();
    let row = cells(&t.batch).into_iter().next().unwrap_or_default();
    let mut s = format!(r#"<div class="kpis" id="t-{}">"#, esc(&t.query.name));
    for (f, cell) in schema.fields().iter().zip(row) {
        let shown = if cell.is_empty() {
            "–".to_string()
        } else {
            group_digits(&cell)
        };
        let shown = if f.name().ends_with("_pct") && !cell.is_empty() {
            format!("{}{shown} %", if cell.starts_with('-') { "" } else { "+" })
        } else {
            shown
        };
        let _ = write!(
            s,
            r#"<div class="kpi"><div class="k">{}</div><div class="v">{}</div></div>"#,
            esc(&heading(f.name())),
            esc(&shown)
        );
    }
    s.push_str("</div>");
    s
}

const CSS: &str = r#"
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #0f172a; background: #f8fafc; margin: 0; }
main { max-width: 980px; margin: 0 auto; padding: 32px 24px 48px; }
header h1 { font-size: 26px; margin: 0 0 4px; }
header p { margin: 0; color: #475569; }
section { background: #fff; border: 1px solid #e2e8f0; border-radius: 10px; padding: 18px 20px; margin-top: 20px; }
h2 { font-size: 17px; margin: 0 0 2px; }
p.note { color: #64748b; margin: 0 0 12px; font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin-top: 8px; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid #e2e8f0; text-align: left; }
th { font-size: 12px; color: #475569; font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
.num { text-align: right; }
td.up { color: #15803d; } td.down { color: #b91c1c; }
td.empty { color: #64748b; text-align: center; }
.kpis { display: flex; gap: 12px; flex-wrap: wrap; }
.kpi { flex: 1 1 150px; border: 1px solid #e2e8f0; border-radius: 8px; padding: 10px 14px; }
.kpi .k { font-size: 12px; color: #475569; text-transform: uppercase; letter-spacing: .03em; }
.kpi .v { font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
svg.chart { max-width: 100%; height: auto; display: block; }
svg .lbl { font-size: 12px; fill: #334155; } svg .val { font-size: 11px; fill: #475569; }
svg .axis { font-size: 11px; fill: #64748b; } svg .grid { stroke: #e2e8f0; }
footer { color: #64748b; font-size: 12px; margin-top: 24px; }
"#;

fn period_line(r: &MonthlyReport) -> String {
    r.period.describe(r.as_of)
}

/// `Monthly report · November 2026`, or `Report · 3 November 2026 to …`.
fn title(r: &MonthlyReport) -> String {
    match r.period.span {
        super::Span::Month(_) => format!("Monthly report · {}", r.period.span.title()),
        super::Span::Range { .. } => format!("Report · {}", r.period.span.title()),
    }
}

/// The `x` values of rows whose `partial` column (a boolean, as
/// `report_days` gives it) is true: drawn and listed as partial.
fn partial_xs(t: &ReportTable, x: &str) -> Vec<String> {
    let Some(col) = t
        .batch
        .column_by_name("partial")
        .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
    else {
        return Vec::new();
    };
    column_text(&t.batch, x)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| col.is_valid(*i) && col.value(*i))
        .map(|(_, v)| v)
        .collect()
}

/// One self-contained HTML document.
pub fn html(r: &MonthlyReport) -> String {
    let mut s = String::with_capacity(64 * 1024);
    let _ = write!(
        s,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{long} · tally</title><style>{CSS}</style></head><body><main><header><h1>{long}</h1><p>{period}</p></header>"#,
        long = esc(&title(r)),
        period = esc(&period_line(r)),
    );
    for t in &r.tables {
        let _ = write!(s, "<section><h2>{}</h2>", esc(&t.query.title));
        if let Some(n) = &t.query.note {
            let _ = write!(s, r#"<p class="note">{}</p>"#, esc(n));
        }
        if t.batch.num_rows() == 1 && t.query.chart.is_none() {
            s.push_str(&kpis(t));
        } else {
            match &t.query.chart {
                Some(_) if t.batch.num_rows() == 0 => {}
                Some(Chart::Bar { label, value }) => s.push_str(&bar_svg(t, label, value)),
                Some(Chart::Line { x, series, y }) => {
                    s.push_str(&line_svg(t, x, series, y));
                    s.push_str(&pivot_table(t, x, series, y));
                    s.push_str("</section>");
                    continue;
                }
                None => {}
            }
            s.push_str(&html_table(t));
        }
        s.push_str("</section>");
    }
    let _ = writeln!(
        s,
        "<footer>Generated {} by <code>{}</code> from sql/reports/*.sql over the {} rollup.</footer></main></body></html>",
        fmt_time(r.generated_at / 1000 * 1000),
        esc(&r.period.span.command()),
        esc(&r.rollup),
    );
    s
}

/// One CSV field. A text cell beginning with `=`, `+`, `-`, `@`, a tab or
/// a carriage return is prefixed with `'`, so spreadsheet programs show it
/// as text instead of running it as a formula (CSV injection); numbers are
/// left as they are.
fn csv_field(s: &str, text: bool) -> String {
    let neutral;
    let s = if text && s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutral = format!("'{s}");
        neutral.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// RFC 4180 CSV with a header row and CRLF line ends; raw values (no
/// digit grouping); text cells neutralised (see `csv_field`); with `bom`,
/// a UTF-8 byte-order mark first (Excel then reads UTF-8).
pub fn csv(batch: &RecordBatch, bom: bool) -> String {
    let mut s = String::new();
    if bom {
        s.push('\u{feff}');
    }
    let schema = batch.schema();
    let text: Vec<bool> = schema
        .fields()
        .iter()
        .map(|f| !is_numeric(f.data_type()))
        .collect();
    let names: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| csv_field(f.name(), true))
        .collect();
    s.push_str(&names.join(","));
    s.push_str("\r\n");
    for row in cells(batch) {
        let fields: Vec<String> = row
            .iter()
            .zip(&text)
            .map(|(c, t)| csv_field(c, *t))
            .collect();
        s.push_str(&fields.join(","));
        s.push_str("\r\n");
    }
    s
}

/// Every table of the report in one CSV: each under a line with its
/// title, the tables separated by an empty line.
pub fn csv_all(r: &MonthlyReport, bom: bool) -> String {
    let mut s = String::new();
    if bom {
        s.push('\u{feff}');
    }
    for (i, t) in r.tables.iter().enumerate() {
        if i > 0 {
            s.push_str("\r\n");
        }
        s.push_str(&csv_field(&t.query.title, true));
        s.push_str("\r\n");
        s.push_str(&csv(&t.batch, false));
    }
    s
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// One Markdown document with a pipe table per query.
pub fn markdown(r: &MonthlyReport) -> String {
    let mut s = format!("# {}\n\n{}\n", title(r), period_line(r));
    for t in &r.tables {
        let _ = write!(s, "\n## {}\n\n", t.query.title);
        if let Some(n) = &t.query.note {
            let _ = write!(s, "{n}\n\n");
        }
        let schema = t.batch.schema();
        let heads: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| md_cell(&heading(f.name())))
            .collect();
        let aligns: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| {
                if is_numeric(f.data_type()) {
                    "---:"
                } else {
                    "---"
                }
            })
            .collect();
        let _ = write!(s, "| {} |\n| {} |\n", heads.join(" | "), aligns.join(" | "));
        for row in cells(&t.batch) {
            let shown: Vec<String> = row
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| {
                    if is_numeric(f.data_type()) {
                        group_digits(c)
                    } else {
                        md_cell(c)
                    }
                })
                .collect();
            let _ = writeln!(s, "| {} |", shown.join(" | "));
        }
        if t.batch.num_rows() == 0 {
            s.push_str("\n_No events in this month._\n");
        }
    }
    s
}
