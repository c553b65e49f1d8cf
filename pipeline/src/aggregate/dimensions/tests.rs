#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};

use super::Dimensions;
use crate::aggregate::{AggregateError, RollupAggregator, SqlCatalog};
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder};

const CHANNEL_SQL: &str = "SELECT coalesce(d.channel_id, 'unknown') AS channel_id,
       date_bin(INTERVAL '1 hour', e.event_time) AS window_start,
       count(*) AS events
FROM events e LEFT JOIN dims d ON e.video_id = d.video_id
GROUP BY 1, 2";

fn rollups(dir: &Path) -> PathBuf {
    let rollups = dir.join("rollups");
    std::fs::create_dir_all(&rollups).unwrap();
    std::fs::write(rollups.join("hour_channel.sql"), CHANNEL_SQL).unwrap();
    rollups
}

/// Events of `videos` (one each), decoded as `tally run` does.
fn events(settings: &Settings, videos: &[&str]) -> RecordBatch {
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let now = chrono::Utc::now().timestamp_millis();
    let mut cols = schema.new_columns(videos.len());
    for v in videos {
        let p = format!(
            r#"{{"video_id":"{v}","event_type":"view","event_time":{},"value":1}}"#,
            now - 1000
        );
        decoder.decode(Some(p.as_bytes()), now, &mut cols).unwrap();
    }
    cols.finish().unwrap()
}

/// The rollup's events per channel over one batch.
async fn per_channel(agg: &mut RollupAggregator, batch: &RecordBatch) -> BTreeMap<String, i64> {
    let out = agg.aggregate(std::slice::from_ref(batch)).await.unwrap();
    let mut got = BTreeMap::new();
    for b in &out[0].batches {
        let ch = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let n = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        for i in 0..b.num_rows() {
            *got.entry(ch.value(i).to_string()).or_default() += n.value(i);
        }
    }
    got
}

fn counts(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

async fn aggregator(dir: &Path, dims: Dimensions) -> RollupAggregator {
    let settings = Settings::defaults().unwrap();
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let catalog = SqlCatalog::load_with(&rollups(dir), schema.arrow.clone(), "event_time", dims)
        .await
        .unwrap();
    assert_eq!(
        catalog.rollups[0]
            .keys()
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["channel_id", "window_start"]
    );
    RollupAggregator::new(&catalog, schema.arrow.clone())
        .await
        .unwrap()
}

/// A CSV dimension joins the events; a changed file is read again and used
/// from the next batch; a file whose columns changed keeps the old rows.
#[tokio::test]
async fn a_csv_dimension_joins_and_a_changed_file_is_used_from_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("videos.csv");
    std::fs::write(&csv, "video_id,channel_id\nv1,ch-a\nv2,ch-b\n").unwrap();
    let config: BTreeMap<String, PathBuf> = [("dims".to_string(), csv.clone())].into();
    let dims = Dimensions::load(&config).await.unwrap();
    assert_eq!(dims.describe(), vec![("dims".to_string(), csv.clone(), 2)]);
    let mut agg = aggregator(dir.path(), dims.clone()).await;
    let settings = Settings::defaults().unwrap();
    let batch = events(&settings, &["v1", "v1", "v1", "v2", "v3", "v3"]);
    let before = counts(&[("ch-a", 3), ("ch-b", 1), ("unknown", 2)]);
    assert_eq!(per_channel(&mut agg, &batch).await, before);

    // Unchanged: nothing read.
    assert!(dims.reload_changed().await.is_empty());
    // v1 moves to another channel, v3 is added (the size changes).
    std::fs::write(&csv, "video_id,channel_id\nv1,ch-c\nv2,ch-b\nv3,ch-d\n").unwrap();
    // Read once the change has held still from one look to the next.
    assert!(dims.reload_changed().await.is_empty());
    assert_eq!(dims.reload_changed().await, ["dims"]);
    assert_eq!(
        dims.reload_counts(),
        (0, 0),
        "swapped in by the next batch only"
    );
    let after = counts(&[("ch-c", 3), ("ch-b", 1), ("ch-d", 2)]);
    assert_eq!(per_channel(&mut agg, &batch).await, after);
    assert_eq!(dims.reload_counts(), (1, 0));

    // A column added: the planned rollup keeps the previous rows.
    std::fs::write(&csv, "video_id,channel_id,title\nv1,ch-x,t\n").unwrap();
    assert!(dims.reload_changed().await.is_empty());
    assert!(dims.reload_changed().await.is_empty());
    assert_eq!(per_channel(&mut agg, &batch).await, after);
    assert_eq!(dims.reload_counts(), (1, 1));
    // A file that cannot be parsed (a row with a field too many): kept,
    // reported once.
    std::fs::write(&csv, "video_id,channel_id\nv1,ch-y\nv2,ch-z,extra\n").unwrap();
    for _ in 0..3 {
        assert!(dims.reload_changed().await.is_empty());
    }
    assert_eq!(per_channel(&mut agg, &batch).await, after);
    // A file gone: kept, reported once.
    std::fs::remove_file(&csv).unwrap();
    assert!(dims.reload_changed().await.is_empty());
    assert!(dims.reload_changed().await.is_empty());
    assert_eq!(per_channel(&mut agg, &batch).await, after);
    assert_eq!(dims.reload_counts(), (1, 3));
}

/// A Parquet file is a dimension table too.
#[tokio::test]
async fn a_parquet_dimension_joins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("videos.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("video_id", DataType::Utf8, false),
        Field::new("channel_id", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["v1", "v2"])),
            Arc::new(StringArray::from(vec![Some("ch-a"), None])),
        ],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let config: BTreeMap<String, PathBuf> = [("dims".to_string(), path)].into();
    let dims = Dimensions::load(&config).await.unwrap();
    let mut agg = aggregator(dir.path(), dims).await;
    let settings = Settings::defaults().unwrap();
    let batch = events(&settings, &["v1", "v2", "v2", "v9"]);
    // v2's channel is NULL in the table: coalesce makes it 'unknown'.
    assert_eq!(
        per_channel(&mut agg, &batch).await,
        counts(&[("ch-a", 1), ("unknown", 3)])
    );
    assert_eq!(batch.column(0).len(), 4);
}

/// A missing file, a file of another kind and a rollup joining a table
/// not configured stop startup with a message naming the key or file.
#[tokio::test]
async fn bad_dimensions_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing: BTreeMap<String, PathBuf> =
        [("videos".to_string(), dir.path().join("nope.csv"))].into();
    let e = Dimensions::load(&missing).await.unwrap_err();
    assert!(matches!(e, AggregateError::Dimension { .. }));
    let text = e.to_string();
    assert!(
        text.contains("sql.dimensions.videos") && text.contains("nope.csv"),
        "{text}"
    );

    let txt = dir.path().join("videos.txt");
    std::fs::write(&txt, "video_id\nv1\n").unwrap();
    let e = Dimensions::load(&[("videos".to_string(), txt)].into())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(".csv") && e.contains(".parquet"), "{e}");

    let settings = Settings::defaults().unwrap();
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let e = SqlCatalog::load_with(
        &rollups(dir.path()),
        schema.arrow.clone(),
        "event_time",
        Dimensions::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("hour_channel.sql") && e.contains("dims"), "{e}");
}
