//! Sketch measures on PostgreSQL, which has no sketch functions: a batch's
//! sketches are merged with the stored ones in Rust, inside the batch's
//! transaction, and the upsert then writes the merged bytes
//! (`col = excluded.col`, see `schema::merge_sql`). A transaction-scoped
//! advisory lock per rollup table makes the read-modify-write safe against
//! another writer inserting the same new key concurrently; every writer
//! takes these locks in catalog order, so two of them cannot deadlock.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

use super::schema::{quote, source_hash, Dialect, TableSpec};
use super::{db, SinkError};
use crate::aggregate::sketch;
use crate::aggregate::ColumnKind;

/// The key of row `row` of `b` as one comparable string.
fn key_of(b: &RecordBatch, spec: &TableSpec, row: usize) -> String {
    let mut k = String::new();
    for (c, (_, kind)) in spec.columns.iter().enumerate().take(spec.key_count) {
        let a = b.column(c);
        match kind {
            ColumnKind::Text => {
                k.push_str(a.as_string::<i32>().value(row));
            }
            ColumnKind::Int => k.push_str(&a.as_primitive::<Int64Type>().value(row).to_string()),
            ColumnKind::Real => k.push_str(
                &a.as_primitive::<Float64Type>()
                    .value(row)
                    .to_bits()
                    .to_string(),
            ),
            ColumnKind::Bytes => {}
        }
        k.push('\u{0}');
    }
    k
}

/// `b` with each sketch cell merged with the stored cell of its key.
pub(super) async fn premerge(
    conn: &mut PgConnection,
    spec: &TableSpec,
    b: &RecordBatch,
) -> Result<RecordBatch, SinkError> {
    let sketches: Vec<usize> = spec
        .columns
        .iter()
        .enumerate()
        .filter(|(_, (_, k))| *k == ColumnKind::Bytes)
        .map(|(i, _)| i)
        .collect();
    if sketches.is_empty() || b.num_rows() == 0 {
        return Ok(b.clone());
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(source_hash(&format!("tally sketches {}", spec.name)) as i64)
        .execute(&mut *conn)
        .await
        .map_err(db("lock a sketch rollup"))?;
    // The stored rows of the batch's keys.
    let keys: Vec<String> = spec.columns[..spec.key_count]
        .iter()
        .map(|(n, _)| quote(n))
        .collect();
    let arrays: Vec<String> = spec.columns[..spec.key_count]
        .iter()
        .enumerate()
        .map(|(i, (_, k))| format!("${}::{}[]", i + 1, Dialect::Postgres.sql_type(*k)))
        .collect();
    let on: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{k} = q.k{i}"))
        .collect();
    let q_cols: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
    let mut select: Vec<String> = keys.iter().map(|k| format!("t.{k}")).collect();
    select.extend(
        sketches
            .iter()
            .map(|i| format!("t.{}", quote(&spec.columns[*i].0))),
    );
    let text = format!(
        "SELECT {} FROM {} t JOIN UNNEST({}) AS q({}) ON {}",
        select.join(", "),
        quote(&spec.name),
        arrays.join(", "),
        q_cols.join(", "),
        on.join(" AND ")
    );
    let mut q = sqlx::query(AssertSqlSafe(text));
    for (c, (_, kind)) in spec.columns.iter().enumerate().take(spec.key_count) {
        let a = b.column(c);
        q = match kind {
            ColumnKind::Text => {
                let a = a.as_string::<i32>();
                q.bind((0..a.len()).map(|i| a.value(i)).collect::<Vec<&str>>())
            }
            ColumnKind::Int => q.bind(a.as_primitive::<Int64Type>().values().to_vec()),
            ColumnKind::Real => q.bind(a.as_primitive::<Float64Type>().values().to_vec()),
            ColumnKind::Bytes => q,
        };
    }
    let rows = q
        .fetch_all(&mut *conn)
        .await
        .map_err(db("read stored sketches"))?;
    if rows.is_empty() {
        return Ok(b.clone());
    }
    let mut stored: HashMap<String, Vec<Option<Vec<u8>>>> = HashMap::with_capacity(rows.len());
    for r in rows {
        let mut k = String::new();
        for (i, (_, kind)) in spec.columns.iter().enumerate().take(spec.key_count) {
            let part = match kind {
                ColumnKind::Text => r.try_get::<String, _>(i),
                ColumnKind::Int => r.try_get::<i64, _>(i).map(|v| v.to_string()),
                ColumnKind::Real => r.try_get::<f64, _>(i).map(|v| v.to_bits().to_string()),
                ColumnKind::Bytes => Ok(String::new()),
            }
            .map_err(db("read stored sketches"))?;
            k.push_str(&part);
            k.push('\u{0}');
        }
        let cells = (0..sketches.len())
            .map(|j| r.try_get::<Option<Vec<u8>>, _>(spec.key_count + j))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("read stored sketches"))?;
        stored.insert(k, cells);
    }
    let row_keys: Vec<String> = (0..b.num_rows()).map(|i| key_of(b, spec, i)).collect();
    let mut columns: Vec<ArrayRef> = b.columns().to_vec();
    for (j, &c) in sketches.iter().enumerate() {
        let fresh = b.column(c).as_binary::<i32>();
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(b.num_rows());
        for (row, key) in row_keys.iter().enumerate() {
            let mine = (!fresh.is_null(row)).then(|| fresh.value(row));
            let old = stored.get(key).and_then(|cells| cells[j].as_deref());
            out.push(match (old, mine) {
                (None, m) => m.map(<[u8]>::to_vec),
                (Some(o), None) => Some(o.to_vec()),
                (Some(o), Some(m)) => {
                    let kind = sketch::kind_of(m).ok_or_else(|| SinkError::Encode {
                        path: spec.name.clone(),
                        message: "a sketch cell is not an HLL or KLL sketch".into(),
                    })?;
                    Some(sketch::merge(kind, o, m).map_err(|e| SinkError::Encode {
                        path: spec.name.clone(),
                        message: format!("merge stored sketches: {e}"),
                    })?)
                }
            });
        }
        columns[c] = Arc::new(BinaryArray::from_iter(out));
    }
    RecordBatch::try_new(b.schema(), columns).map_err(|e| SinkError::Encode {
        path: spec.name.clone(),
        message: format!("merge stored sketches: {e}"),
    })
}

/// The union of sketch cells of one kind (read back as a `bytea[]`).
pub(super) fn union_cells(
    parts: Vec<Vec<u8>>,
) -> Result<Option<Vec<u8>>, crate::aggregate::sketch::SketchError> {
    use crate::aggregate::sketch;
    let Some(kind) = parts.first().and_then(|p| sketch::kind_of(p)) else {
        return Ok(None);
    };
    sketch::union(kind, parts.iter().map(Vec::as_slice))
}
