//! PostgreSQL: a backfill's rows go into the windows it has just emptied
//! with `COPY … FROM STDIN (FORMAT csv)` instead of the batch commits'
//! `INSERT … ON CONFLICT` of `UNNEST`ed arrays. A rollup's rows from one
//! recompute are one GROUP BY's output (unique keys) inside the deleted
//! ranges, so nothing can conflict, and COPY skips the per-row conflict
//! check and planning.

use std::io::Write as _;

use datafusion::arrow::array::{Array, RecordBatch};
use sqlx::postgres::PgConnection;

use super::schema::{quote, TableSpec, TypedColumn};
use super::{db, SinkError};
use crate::aggregate::{RollupDef, RollupOutput};

/// Bytes of CSV sent per `CopyData` message.
const CHUNK: usize = 1 << 20;

/// Write a backfill's `outputs` into the windows of `ranges` just deleted:
/// a rollup recomputed once (no files committed meanwhile) has unique keys
/// there, so its rows are COPYed; one recomputed twice is upserted.
pub(super) async fn insert_replaced(
    conn: &mut PgConnection,
    tables: &[TableSpec],
    ranges: &[(RollupDef, i64, i64)],
    outputs: &[RollupOutput],
) -> Result<(), SinkError> {
    let mut upsert: Vec<RollupOutput> = Vec::new();
    for spec in tables {
        let parts: Vec<&RollupOutput> = outputs.iter().filter(|o| o.rollup == spec.name).collect();
        match parts.as_slice() {
            [one] if ranges.iter().any(|(d, ..)| d.name == spec.name) => {
                copy_rows(conn, spec, &one.batches).await?;
            }
            _ => upsert.extend(parts.into_iter().cloned()),
        }
    }
    super::postgres::merge_rows(conn, tables, &upsert).await?;
    crate::failpoint::failpoint("inside_backfill_transaction");
    Ok(())
}

/// COPY `batches` (canonical rollup rows) into `spec`'s table; the rows
/// copied.
pub(super) async fn copy_rows(
    conn: &mut PgConnection,
    spec: &TableSpec,
    batches: &[RecordBatch],
) -> Result<u64, SinkError> {
    let names: Vec<String> = spec.columns.iter().map(|(n, _)| quote(n)).collect();
    let statement = format!(
        "COPY {} ({}) FROM STDIN WITH (FORMAT csv)",
        quote(&spec.name),
        names.join(", ")
    );
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    // In key order, PostgreSQL appends to the primary key's B-tree instead
    // of inserting all over it: 2.7x faster for 619k rows into an empty table.
    let Some(first) = batches.first() else {
        return Ok(0);
    };
    let one =
        datafusion::arrow::compute::concat_batches(&first.schema(), batches).map_err(|e| {
            SinkError::Encode {
                path: spec.name.clone(),
                message: format!("concatenate rollup rows: {e}"),
            }
        })?;
    let order = spec
        .row_order(&one)?
        .unwrap_or_else(|| (0..one.num_rows()).collect());
    let cols: Vec<TypedColumn<'_>> = spec
        .columns
        .iter()
        .enumerate()
        .map(|(c, (_, kind))| TypedColumn::new(one.column(c).as_ref(), *kind))
        .collect();
    let mut copy = conn
        .copy_in_raw(&statement)
        .await
        .map_err(db("copy rollup rows"))?;
    for row in order {
        csv_row(&mut buf, &cols, row);
        if buf.len() >= CHUNK {
            copy.send(buf.as_slice())
                .await
                .map_err(db("copy rollup rows"))?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        copy.send(buf.as_slice())
            .await
            .map_err(db("copy rollup rows"))?;
    }
    copy.finish().await.map_err(db("copy rollup rows"))
}

/// One CSV line: text quoted (a NULL is an unquoted empty field), floats
/// in their shortest exact form, infinities as PostgreSQL spells them.
fn csv_row(buf: &mut Vec<u8>, cols: &[TypedColumn<'_>], row: usize) {
    for (i, col) in cols.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        match col {
            TypedColumn::Text(a) if !a.is_null(row) => {
                buf.push(b'"');
                for &c in a.value(row).as_bytes() {
                    if c == b'"' {
                        buf.push(b'"');
                    }
                    buf.push(c);
                }
                buf.push(b'"');
            }
            TypedColumn::Int(a) if !a.is_null(row) => {
                let _ = write!(buf, "{}", a.value(row));
            }
            TypedColumn::Real(a) if !a.is_null(row) => {
                let v = a.value(row);
                if v.is_finite() {
                    let _ = write!(buf, "{v:?}");
                } else if v.is_nan() {
                    buf.extend_from_slice(b"NaN");
                } else if v > 0.0 {
                    buf.extend_from_slice(b"Infinity");
                } else {
                    buf.extend_from_slice(b"-Infinity");
                }
            }
            // bytea's hex input form; CSV gives backslashes no meaning.
            TypedColumn::Bytes(a) if !a.is_null(row) => {
                buf.extend_from_slice(b"\\x");
                for b in a.value(row) {
                    let _ = write!(buf, "{b:02x}");
                }
            }
            _ => {}
        }
    }
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};

    use super::*;

    #[test]
    fn rows_are_csv_that_postgresql_reads_back_exactly() {
        let text = StringArray::from(vec![Some("a,\"b\"\nc"), None, Some("")]);
        let int = Int64Array::from(vec![Some(-7), Some(i64::MAX), None]);
        let real = Float64Array::from(vec![Some(0.1), Some(f64::INFINITY), Some(1e300)]);
        let cols = [
            TypedColumn::Text(&text),
            TypedColumn::Int(&int),
            TypedColumn::Real(&real),
        ];
        let mut buf = Vec::new();
        for row in 0..3 {
            csv_row(&mut buf, &cols, row);
        }
        assert_eq!(
            String::from_utf8(buf).unwrap_or_default(),
            "\"a,\"\"b\"\"\nc\",-7,0.1\n,9223372036854775807,Infinity\n\"\",,1e300\n"
        );
    }
}
