//! PostgreSQL: a backfill's rows go into the windows it has just emptied
//! with `COPY … FROM STDIN (FORMAT binary)` instead of the batch commits'
//! `INSERT … ON CONFLICT` of `UNNEST`ed arrays. A rollup's rows from one
//! recompute are one GROUP BY's output (unique keys) inside the deleted
//! ranges, so nothing can conflict, and COPY skips the per-row conflict
//! check and planning.

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
        "COPY {} ({}) FROM STDIN WITH (FORMAT binary)",
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
    buf.extend_from_slice(BINARY_HEADER);
    for row in order {
        binary_row(&mut buf, &cols, row);
        if buf.len() >= CHUNK {
            copy.send(buf.as_slice())
                .await
                .map_err(db("copy rollup rows"))?;
            buf.clear();
        }
    }
    buf.extend_from_slice(BINARY_TRAILER);
    copy.send(buf.as_slice())
        .await
        .map_err(db("copy rollup rows"))?;
    copy.finish().await.map_err(db("copy rollup rows"))
}

/// The binary COPY format's header: signature, flags, no extension.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Its trailer: a tuple of -1 fields.
const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// One tuple of the binary COPY format: the field count, then each field
/// as a length (-1: NULL) and its bytes in the column type's binary form
/// (text: UTF-8; bigint and double precision: 8 bytes big-endian; bytea:
/// the bytes). PostgreSQL parses nothing and formats no float.
fn binary_row(buf: &mut Vec<u8>, cols: &[TypedColumn<'_>], row: usize) {
    let n = i16::try_from(cols.len()).unwrap_or(i16::MAX);
    buf.extend_from_slice(&n.to_be_bytes());
    let field = |buf: &mut Vec<u8>, bytes: &[u8]| {
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(bytes);
    };
    for col in cols {
        match col {
            TypedColumn::Text(a) if !a.is_null(row) => field(buf, a.value(row).as_bytes()),
            TypedColumn::Int(a) if !a.is_null(row) => field(buf, &a.value(row).to_be_bytes()),
            TypedColumn::Real(a) if !a.is_null(row) => field(buf, &a.value(row).to_be_bytes()),
            TypedColumn::Bytes(a) if !a.is_null(row) => field(buf, a.value(row)),
            _ => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{BinaryArray, Float64Array, Int64Array, StringArray};

    use super::*;

    #[test]
    fn rows_are_tuples_of_the_binary_copy_format() {
        let text = StringArray::from(vec![Some("a,\"b\"\nc"), None]);
        let int = Int64Array::from(vec![Some(-7), None]);
        let real = Float64Array::from(vec![Some(0.1), Some(f64::INFINITY)]);
        let bytes = BinaryArray::from(vec![Some(&b"\x00\x01"[..]), None]);
        let cols = [
            TypedColumn::Text(&text),
            TypedColumn::Int(&int),
            TypedColumn::Real(&real),
            TypedColumn::Bytes(&bytes),
        ];
        let mut buf = Vec::new();
        binary_row(&mut buf, &cols, 0);
        let mut want: Vec<u8> = vec![0, 4];
        want.extend_from_slice(&7i32.to_be_bytes());
        want.extend_from_slice(b"a,\"b\"\nc");
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&(-7i64).to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&0.1f64.to_be_bytes());
        want.extend_from_slice(&2i32.to_be_bytes());
        want.extend_from_slice(&[0, 1]);
        assert_eq!(buf, want);
        buf.clear();
        binary_row(&mut buf, &cols, 1);
        let mut want: Vec<u8> = vec![0, 4];
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&f64::INFINITY.to_be_bytes());
        want.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(buf, want);
        assert_eq!(BINARY_HEADER.len(), 19);
    }
}
