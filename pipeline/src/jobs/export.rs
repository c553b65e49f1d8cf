//! `tally export --from T1 --to T2`: write the closed rollup windows (ended
//! by now) of every whole UTC day inside `[T1, T2)` to Parquet, one file per
//! rollup and day:
//! `<archive>/rollups/<rollup>/dt=YYYY-MM-DD/<rollup>.parquet` (zstd) next to
//! raw/ (under `storage.data_dir`, or in S3 with `storage.archive_url`), so
//! analysts can query rollups with datafusion-cli. Re-exporting a day
//! replaces its object atomically (one PUT; locally a staged file renamed).

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use object_store::ObjectStoreExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::aggregate::{ColumnKind, RollupDef};
use crate::config::Settings;
use crate::sink::serving::Cell;
use crate::sink::ServingStore;

const DAY: i64 = 86_400_000;

#[derive(Debug, Default)]
pub struct ExportReport {
    /// (path relative to the archive root, rows)
    pub files: Vec<(String, usize)>,
    /// The archive root: a directory or an s3:// URL.
    pub root: String,
}

use crate::error::internal as err;

pub(crate) fn arrow_schema(def: &RollupDef) -> Arc<Schema> {
    Arc::new(Schema::new(
        def.columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let dt = match c.kind {
                    _ if i == def.window_column || c.timestamp => {
                        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
                    }
                    ColumnKind::Text => DataType::Utf8,
                    ColumnKind::Int => DataType::Int64,
                    ColumnKind::Real => DataType::Float64,
                    // The sketch's DataSketches bytes (see docs/rollups.md).
                    ColumnKind::Bytes => DataType::Binary,
                };
                Field::new(&c.name, dt, c.merge.is_some())
            })
            .collect::<Vec<_>>(),
    ))
}

pub async fn export(
    settings: &Settings,
    from: i64,
    to: i64,
    only: Option<&str>,
) -> Result<ExportReport, crate::Error> {
    let (_, catalog) = crate::pipeline::Stages::definitions(settings).await?;
    let store = crate::pipeline::Stages::open_store(settings, &catalog).await?;
    let (first_day, end_day) = (
        from + (DAY - from.rem_euclid(DAY)) % DAY,
        to - to.rem_euclid(DAY),
    );
    // Only closed windows (ended by now); re-export a day later to pick up the rest.
    let now = chrono::Utc::now().timestamp_millis();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(settings.storage.zstd_level).map_err(err)?,
        ))
        .build();
    let location = crate::sink::ArchiveLocation::open(&settings.storage)?;
    let mut report = ExportReport {
        root: location.describe(),
        ..Default::default()
    };
    for def in catalog
        .rollups
        .iter()
        .filter(|d| only.is_none_or(|n| n == d.name))
    {
        let schema = arrow_schema(def);
        let mut day = first_day;
        while day < end_day {
            if let Some(batch) =
                load_windows(&store, def, day, day + DAY, Some(now - def.window_ms)).await?
            {
                let dt = chrono::DateTime::from_timestamp_millis(day)
                    .map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_default();
                let rel = format!("rollups/{}/dt={dt}/{}.parquet", def.name, def.name);
                let mut buf = Vec::new();
                let mut w = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props.clone()))
                    .map_err(err)?;
                w.write(&batch).map_err(err)?;
                w.close().map_err(err)?;
                location
                    .store
                    .put(
                        &object_store::path::Path::from(rel.as_str()),
                        object_store::PutPayload::from(buf),
                    )
                    .await
                    .map_err(|e| crate::sink::SinkError::ObjectStore {
                        path: location.url(&rel),
                        source: Box::new(e),
                    })?;
                report.files.push((rel, batch.num_rows()));
            }
            day += DAY;
        }
    }
    store.close().await;
    Ok(report)
}

/// The rows of `def` with `lo <= window < hi` (and `window <= max`) from the
/// serving store, ordered by window, as one Arrow batch with
/// [`arrow_schema`]'s types; `None` when there are no rows.
pub(crate) async fn load_windows(
    store: &ServingStore,
    def: &RollupDef,
    lo: i64,
    hi: i64,
    max: Option<i64>,
) -> Result<Option<RecordBatch>, crate::Error> {
    let rows = store.read_rows(def, lo, hi, max).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let ints = |i: usize| -> Vec<Option<i64>> {
        rows.iter()
            .map(|r| match r.get(i) {
                Some(Cell::Int(v)) => Some(*v),
                _ => None,
            })
            .collect()
    };
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(def.columns.len());
    for (i, c) in def.columns.iter().enumerate() {
        let col: ArrayRef = if i == def.window_column || c.timestamp {
            Arc::new(TimestampMillisecondArray::from(ints(i)).with_timezone("UTC"))
        } else {
            match c.kind {
                ColumnKind::Text => Arc::new(StringArray::from(
                    rows.iter()
                        .map(|r| match r.get(i) {
                            Some(Cell::Text(s)) => Some(s.as_str()),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )),
                ColumnKind::Int => Arc::new(Int64Array::from(ints(i))),
                ColumnKind::Real => Arc::new(Float64Array::from(
                    rows.iter()
                        .map(|r| match r.get(i) {
                            Some(Cell::Real(v)) => Some(*v),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )),
                ColumnKind::Bytes => {
                    Arc::new(BinaryArray::from_iter(rows.iter().map(
                        |r| match r.get(i) {
                            Some(Cell::Bytes(b)) => Some(b.as_slice()),
                            _ => None,
                        },
                    )))
                }
            }
        };
        cols.push(col);
    }
    Ok(Some(
        RecordBatch::try_new(arrow_schema(def), cols).map_err(err)?,
    ))
}
