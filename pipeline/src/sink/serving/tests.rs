//! The serving stores' tests: both backends through the facade, against
//! totals computed here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::schema::{merged_view, number_placeholders, TableSpec};
use super::sqlite::DEFAULT_FOLD_ROWS;
use super::sqlite::SQLITE_PAGE_SIZE;
use super::*;
use crate::aggregate::ColumnKind;
use datafusion::arrow::array::RecordBatch;

#[test]
fn placeholders_are_numbered_for_postgres() {
    assert_eq!(number_placeholders("SELECT ? , ?"), "SELECT $1 , $2");
    assert_eq!(
        number_placeholders("a = ?1 AND b = ?12 AND c = ?1"),
        "a = $1 AND b = $12 AND c = $1"
    );
    assert_eq!(
        number_placeholders("x = '?' AND \"q?\" = ?"),
        "x = '?' AND \"q?\" = $1"
    );
    assert_eq!(Dialect::Sqlite.sql("a = ?"), "a = ?");
}

/// A new SQLite store gets 64 KiB pages and WAL; an existing file keeps
/// its page size (SQLite changes it only by VACUUM) and still opens.
#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn new_sqlite_stores_use_large_pages_and_old_ones_still_open() {
    use crate::decode::EventSchema;
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let catalog = crate::testing::catalog(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
    )
    .await
    .unwrap();
    let pragmas = |path: &Path| {
        let c = rusqlite::Connection::open(path).unwrap();
        let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let tables: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'minute_video_events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (size, mode, tables)
    };
    let new = dir.path().join("new.db");
    let store = ServingStore::open(&format!("sqlite://{}", new.display()), &catalog.rollups)
        .await
        .unwrap();
    store.close().await;
    assert_eq!(
        pragmas(&new),
        (i64::from(SQLITE_PAGE_SIZE), "wal".to_string(), 1)
    );

    let old = dir.path().join("old.db");
    {
        let c = rusqlite::Connection::open(&old).unwrap();
        c.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE keep (x INTEGER);",
        )
        .unwrap();
    }
    let store = ServingStore::open(&format!("sqlite://{}", old.display()), &catalog.rollups)
        .await
        .unwrap();
    assert_eq!(store.load_offsets("t").await.unwrap(), BTreeMap::new());
    store.close().await;
    assert_eq!(pragmas(&old), (4096, "wal".to_string(), 1));
}

/// Merge rows are ordered by the whole key, as a plain sort of the key
/// tuples orders them: PostgreSQL writers lock shared rows in one order.
#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn merge_rows_are_ordered_by_the_whole_key() {
    use crate::decode::EventSchema;
    use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let catalog = crate::testing::catalog(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
    )
    .await
    .unwrap();
    let def = catalog
        .rollups
        .iter()
        .find(|d| d.name == "minute_video_events")
        .unwrap();
    let spec = TableSpec::new(def, Dialect::Postgres);
    assert_eq!(spec.key_count, 3, "video_id, event_type, window");
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(7);
    let n = 2_000;
    let mut keys: Vec<(String, String, i64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while keys.len() < n {
        let k = (
            format!("v{}", rng.random_range(0..300)),
            ["view", "like", "share"][rng.random_range(0..3)].to_string(),
            rng.random_range(-5..60) * 60_000,
        );
        if seen.insert(k.clone()) {
            keys.push(k);
        }
    }
    let columns: Vec<ArrayRef> = def
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| -> ArrayRef {
            match (i, c.kind) {
                (0, _) => Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| k.0.as_str()),
                )),
                (1, _) => Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| k.1.as_str()),
                )),
                (2, _) => Arc::new(Int64Array::from_iter_values(keys.iter().map(|k| k.2))),
                (_, ColumnKind::Real) => {
                    Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64)))
                }
                (_, ColumnKind::Int) => {
                    Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64)))
                }
                (_, ColumnKind::Text) => {
                    Arc::new(StringArray::from_iter_values((0..n).map(|i| i.to_string())))
                }
                (_, ColumnKind::Bytes) => {
                    Arc::new(datafusion::arrow::array::BinaryArray::from_iter_values(
                        (0..n).map(|i| vec![i as u8]),
                    ))
                }
            }
        })
        .collect();
    let fields: Vec<datafusion::arrow::datatypes::Field> = def
        .columns
        .iter()
        .zip(&columns)
        .map(|(c, a)| {
            datafusion::arrow::datatypes::Field::new(&c.name, a.data_type().clone(), true)
        })
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(datafusion::arrow::datatypes::Schema::new(fields)),
        columns,
    )
    .unwrap();
    let got: Vec<(String, String, i64)> = spec
        .row_order(&batch)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|i| keys[i].clone())
        .collect();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(got, want);
}

type Key = (String, String, i64);
type Measures = (i64, f64, i64, Option<f64>, Option<f64>);

/// Rollup outputs of `batches` batches of `per_batch` events over
/// `videos` videos, 3 types and 2 hours (every third event has no
/// value), with the hourly rollup computed independently.
struct Fixture {
    dir: tempfile::TempDir,
    catalog: crate::aggregate::SqlCatalog,
    batches: Vec<Vec<RollupOutput>>,
    hourly: BTreeMap<Key, Measures>,
    per_batch: i64,
    now: i64,
}

#[allow(clippy::unwrap_used)]
async fn fixture(batches: i64, per_batch: i64, videos: i64) -> Fixture {
    use crate::aggregate::RollupAggregator;
    use crate::decode::{EventSchema, RecordDecoder};
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = EventSchema::from_config(&settings.schema).unwrap();
    let catalog = crate::testing::catalog(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
    )
    .await
    .unwrap();
    let mut agg = RollupAggregator::new(&catalog, schema.arrow.clone())
        .await
        .unwrap();
    let decoder = RecordDecoder::new(schema.clone(), &settings.decode);
    let now = chrono::Utc::now().timestamp_millis();
    let hour = now - now.rem_euclid(3_600_000) - 3 * 3_600_000;
    let mut hourly: BTreeMap<Key, Measures> = BTreeMap::new();
    let mut outputs = Vec::new();
    for b in 0..batches {
        let mut cols = schema.new_columns(per_batch as usize);
        for i in 0..per_batch {
            let n = b * per_batch + i;
            let (video, kind, t) = (
                format!("v{}", (n * 11 + n / 13) % videos),
                ["view", "like", "share"][(n % 3) as usize],
                hour + (n * 7919) % 7_200_000,
            );
            let value = (n % 3 != 0).then(|| ((n * 37) % 101) as f64 - 50.0);
            let v = value
                .map(|v| format!(r#","value":{v}"#))
                .unwrap_or_default();
            let p =
                format!(r#"{{"video_id":"{video}","event_type":"{kind}","event_time":{t}{v}}}"#);
            decoder.decode(Some(p.as_bytes()), now, &mut cols).unwrap();
            let e = hourly
                .entry((video, kind.to_string(), t - t.rem_euclid(3_600_000)))
                .or_insert((0, 0.0, 0, None, None));
            e.0 += 1;
            if let Some(v) = value {
                e.1 += v;
                e.2 += 1;
                e.3 = Some(e.3.map_or(v, |m: f64| m.min(v)));
                e.4 = Some(e.4.map_or(v, |m: f64| m.max(v)));
            }
        }
        let events = cols.finish().unwrap();
        outputs.push(agg.aggregate(std::slice::from_ref(&events)).await.unwrap());
    }
    Fixture {
        dir,
        catalog,
        batches: outputs,
        hourly,
        per_batch,
        now,
    }
}

impl Fixture {
    /// Commit batch `b` as offsets `b * per_batch ..` of partition 0.
    async fn commit(
        &self,
        store: &ServingStore,
        b: usize,
        expected_start: Option<i64>,
    ) -> Result<CommitOutcome, SinkError> {
        let n = self.per_batch;
        let partitions: BTreeMap<i32, PartitionRange> = [(
            0,
            PartitionRange {
                expected_start,
                first: b as i64 * n,
                last: b as i64 * n + n - 1,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic: "t",
            partitions: &partitions,
            outputs: &self.batches[b],
            files: &[],
            counters: &[("accepted_total".to_string(), n)],
            max_event_ms: &[(0, self.now - 5)].into_iter().collect(),
            caught_up: &[(0, b as i64 * n + n)].into_iter().collect(),
            sealed_at_ms: self.now,
            now_ms: self.now,
            replayed: None,
            open_hours: &[],
            archive_with_batch: true,
        };
        store.commit(&req).await
    }

    async fn store(&self, name: &str, fold_rows: usize) -> ServingStore {
        let url = format!("sqlite://{}/{name}.db", self.dir.path().display());
        ServingStore::open(&url, &self.catalog.rollups)
            .await
            .unwrap()
            .with_fold_rows(fold_rows)
    }

    /// Rows in `table` of store `name`.
    fn count(&self, name: &str, table: &str) -> i64 {
        let c = rusqlite::Connection::open(self.dir.path().join(format!("{name}.db"))).unwrap();
        c.query_row(&format!("SELECT count(*) FROM {}", quote(table)), [], |r| {
            r.get(0)
        })
        .unwrap()
    }

    /// The hourly rollup as read back from `store`.
    async fn hourly_of(&self, store: &ServingStore) -> BTreeMap<Key, Measures> {
        let hourly = self
            .catalog
            .rollups
            .iter()
            .find(|d| d.name == "hour_video_events")
            .unwrap();
        let mut got = BTreeMap::new();
        for r in store
            .read_rows(hourly, i64::MIN, i64::MAX, None)
            .await
            .unwrap()
        {
            let text = |c: &Cell| match c {
                Cell::Text(s) => s.clone(),
                other => panic!("{other:?}"),
            };
            let int = |c: &Cell| match c {
                Cell::Int(v) => *v,
                other => panic!("{other:?}"),
            };
            let real = |c: &Cell| match c {
                Cell::Real(v) => Some(*v),
                Cell::Null => None,
                other => panic!("{other:?}"),
            };
            got.insert(
                (text(&r[0]), text(&r[1]), int(&r[2])),
                (
                    int(&r[3]),
                    real(&r[4]).unwrap_or(0.0),
                    int(&r[5]),
                    real(&r[6]),
                    real(&r[7]),
                ),
            );
        }
        got
    }
}

/// SQLite batch commits with and without folds against each other and
/// against totals computed here: the same batches give the same rows; a stale batch
/// is fenced and changes nothing; a failed commit drops the connection
/// and the next commit opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)]
async fn sqlite_commits_merge_fence_and_fold_without_changing_reads() {
    // 3 batches of 400 events over 7 videos.
    let fx = fixture(3, 400, 7).await;
    let (catalog, now, topic) = (&fx.catalog, fx.now, "t");
    let fast = fx.store("fast", DEFAULT_FOLD_ROWS).await;
    // The same commits folding the delta tables on every commit, and
    // once the deltas hold 500 rows (ranges of keys from the second
    // commit on).
    let folding = fx.store("folding", 0).await;
    let some = fx.store("some", 500).await;
    for store in [&fast, &folding, &some] {
        for b in 0..3 {
            let start = (b > 0).then(|| b as i64 * 400);
            assert_eq!(
                fx.commit(store, b, start).await.unwrap(),
                CommitOutcome::Committed
            );
        }
        // A stale writer re-sending batch 1 is fenced and changes nothing.
        assert_eq!(
            fx.commit(store, 1, Some(400)).await.unwrap(),
            CommitOutcome::Fenced {
                partition: 0,
                expected: Some(400),
                stored: Some(1200)
            }
        );
        assert_eq!(
            store.load_offsets(topic).await.unwrap(),
            [(0, 1200)].into_iter().collect()
        );
        assert_eq!(
            store.counters().await.unwrap().get("accepted_total"),
            Some(&1200)
        );
        assert_eq!(store.as_of(topic).await.unwrap(), Some(now));
    }
    for def in &catalog.rollups {
        let b = sorted(fast.read_rows(def, i64::MIN, i64::MAX, None).await.unwrap());
        for (name, store) in [
            ("fold on every commit", &folding),
            ("fold from 500 rows", &some),
        ] {
            let a = sorted(
                store
                    .read_rows(def, i64::MIN, i64::MAX, None)
                    .await
                    .unwrap(),
            );
            assert_eq!(
                a, b,
                "{}: commits with {name} and without folds differ",
                def.name
            );
        }
    }
    // Where the rows are: all in the deltas without a fold, none after a
    // fold on every commit, in both tables with ranged folds.
    let all: i64 = catalog
        .rollups
        .iter()
        .map(|d| fx.count("fast", &delta_table(&d.name)))
        .sum();
    assert!(
        all > 1_000
            && catalog
                .rollups
                .iter()
                .all(|d| fx.count("fast", &d.name) == 0),
        "{all}"
    );
    assert!(catalog.rollups.iter().all(
        |d| fx.count("folding", &delta_table(&d.name)) == 0 && fx.count("folding", &d.name) > 0
    ));
    let (main, delta): (i64, i64) = catalog
        .rollups
        .iter()
        .map(|d| {
            (
                fx.count("some", &d.name),
                fx.count("some", &delta_table(&d.name)),
            )
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert!(main > 0 && delta > 0, "main {main}, delta {delta}");
    // Folds are counted (timed, and their rows) per process.
    let stats = (fast.fold_stats(), folding.fold_stats(), some.fold_stats());
    assert_eq!((stats.0.folds, stats.1.folds, stats.2.folds), (0, 3, 2));
    assert!(stats.1.seconds > 0.0);
    let rows_in = |name: &str| {
        catalog
            .rollups
            .iter()
            .map(|d| fx.count(name, &d.name))
            .sum::<i64>() as u64
    };
    assert!(
        stats.1.rows >= rows_in("folding") && stats.2.rows >= rows_in("some"),
        "{stats:?}"
    );
    // The `__merged` views show what reads see.
    let c = rusqlite::Connection::open(fx.dir.path().join("some.db")).unwrap();
    super::sqlite::functions::register(&c).unwrap();
    for def in &catalog.rollups {
        let rows = some.read_rows(def, i64::MIN, i64::MAX, None).await.unwrap();
        let Some(at) = def.columns.iter().position(|c| c.name == "events") else {
            let n: i64 = c
                .query_row(
                    &format!("SELECT count(*) FROM {}", quote(&merged_view(&def.name))),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, rows.len() as i64, "{}", def.name);
            continue;
        };
        let events: i64 = rows
            .iter()
            .map(|r| if let Cell::Int(n) = r[at] { n } else { 0 })
            .sum();
        let (n, e): (i64, i64) = c
            .query_row(
                &format!(
                    "SELECT count(*), sum(events) FROM {}",
                    quote(&merged_view(&def.name))
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((n, e), (rows.len() as i64, events), "{}", def.name);
        assert_eq!(e, 1200, "{}: every event once", def.name);
    }
    for store in [&fast, &folding, &some] {
        assert_eq!(fx.hourly_of(store).await, fx.hourly);
    }

    // A commit that fails (its table is gone) drops the connection; once
    // the table is back, the next commit succeeds on a new connection.
    let hourly = delta_table("hour_video_events");
    let raw = rusqlite::Connection::open(fx.dir.path().join("fast.db")).unwrap();
    raw.execute_batch(&format!("ALTER TABLE {} RENAME TO gone", quote(&hourly)))
        .unwrap();
    let failed = fx.commit(&fast, 1, Some(1200)).await;
    assert!(
        matches!(failed, Err(SinkError::Sqlite { .. })),
        "the commit fails while the table is missing: {failed:?}"
    );
    assert!(
        !fast.writer_connected(),
        "the failed commit dropped its connection"
    );
    raw.execute_batch(&format!("ALTER TABLE gone RENAME TO {}", quote(&hourly)))
        .unwrap();
    assert_eq!(
        store_offsets_after(&fast, topic).await,
        1200,
        "the failed commit changed nothing"
    );
    let partitions: BTreeMap<i32, PartitionRange> = [(
        0,
        PartitionRange {
            expected_start: Some(1200),
            first: 1200,
            last: 1599,
        },
    )]
    .into_iter()
    .collect();
    let req = CommitRequest {
        topic,
        partitions: &partitions,
        outputs: &fx.batches[1],
        files: &[],
        counters: &[],
        max_event_ms: &BTreeMap::new(),
        caught_up: &BTreeMap::new(),
        sealed_at_ms: now,
        now_ms: now,
        replayed: None,
        open_hours: &[],
        archive_with_batch: true,
    };
    assert_eq!(fast.commit(&req).await.unwrap(), CommitOutcome::Committed);
    assert_eq!(store_offsets_after(&fast, topic).await, 1600);
}

fn sorted(mut v: TableRows) -> TableRows {
    v.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
    v
}

/// A table's rows of a large batch go straight to the rollup table, a
/// small batch's to the delta, in the same commit: reads after every
/// commit equal a store where everything went through the deltas, the
/// large tables' deltas stay empty, and the hourly rollup equals the
/// totals computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)]
async fn large_batches_skip_the_delta_and_reads_stay_exact() {
    let fx = fixture(12, 300, 40).await;
    let rows = |table: &str| -> usize {
        fx.batches[0]
            .iter()
            .filter(|o| o.rollup == table)
            .flat_map(|o| o.batches.iter())
            .map(|b| b.num_rows())
            .sum()
    };
    let mut by_rows: Vec<(usize, String)> = fx
        .catalog
        .rollups
        .iter()
        .map(|d| (rows(&d.name), d.name.clone()))
        .collect();
    by_rows.sort();
    let (small, large) = (by_rows[0].clone(), by_rows[by_rows.len() - 1].clone());
    assert!(large.0 > small.0 + 1, "{by_rows:?}");
    // Direct from (small + large) / 2 rows.
    let threshold = (small.0 + large.0) / 2;
    let plain = fx.store("plain", DEFAULT_FOLD_ROWS).await;
    let mixed = fx
        .store("mixed", DEFAULT_FOLD_ROWS)
        .await
        .with_direct_rows(threshold);
    for b in 0..fx.batches.len() {
        let start = (b > 0).then(|| b as i64 * fx.per_batch);
        for store in [&plain, &mixed] {
            assert_eq!(
                fx.commit(store, b, start).await.unwrap(),
                CommitOutcome::Committed
            );
        }
        for def in &fx.catalog.rollups {
            let want = sorted(
                plain
                    .read_rows(def, i64::MIN, i64::MAX, None)
                    .await
                    .unwrap(),
            );
            assert_eq!(
                sorted(
                    mixed
                        .read_rows(def, i64::MIN, i64::MAX, None)
                        .await
                        .unwrap()
                ),
                want,
                "{} after batch {b}",
                def.name
            );
        }
    }
    assert_eq!(
        fx.count("mixed", &delta_table(&large.1)),
        0,
        "{large:?} went direct"
    );
    assert!(fx.count("mixed", &large.1) > 0);
    if mixed.fold_stats().folds == 0 {
        assert_eq!(
            fx.count("mixed", &small.1),
            0,
            "{small:?} went through the delta"
        );
        assert!(fx.count("mixed", &delta_table(&small.1)) > 0);
    }
    assert_eq!(fx.hourly_of(&mixed).await, fx.hourly);
    mixed.fold().await.unwrap();
    assert_eq!(fx.hourly_of(&mixed).await, fx.hourly);
}

/// Ranged folds over many small commits: after every commit reads equal
/// a store that never folds; folds leave rows in both tables; over the
/// run the cursor goes round the whole key space (every video reaches
/// the rollup tables); a full fold empties the deltas; and the hourly
/// rollup equals the totals computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)]
async fn ranged_folds_go_round_the_key_space_and_keep_every_row() {
    const VIDEOS: i64 = 60;
    let fx = fixture(40, 120, VIDEOS).await;
    let plain = fx.store("plain", DEFAULT_FOLD_ROWS).await;
    let ranged = fx.store("ranged", 1_500).await;
    let minute = delta_table("minute_video_events");
    let mut partial = 0;
    for b in 0..fx.batches.len() {
        let start = (b > 0).then(|| b as i64 * fx.per_batch);
        let folds = ranged.fold_stats().folds;
        for store in [&plain, &ranged] {
            assert_eq!(
                fx.commit(store, b, start).await.unwrap(),
                CommitOutcome::Committed
            );
        }
        for def in &fx.catalog.rollups {
            let want = sorted(
                plain
                    .read_rows(def, i64::MIN, i64::MAX, None)
                    .await
                    .unwrap(),
            );
            assert_eq!(
                sorted(
                    ranged
                        .read_rows(def, i64::MIN, i64::MAX, None)
                        .await
                        .unwrap()
                ),
                want,
                "{} after batch {b}",
                def.name
            );
        }
        if ranged.fold_stats().folds > folds && fx.count("ranged", &minute) > 0 {
            partial += 1;
        }
    }
    let stats = ranged.fold_stats();
    assert!(
        partial >= 10,
        "{partial} folds left rows in the delta; {stats:?}"
    );
    let c = rusqlite::Connection::open(fx.dir.path().join("ranged.db")).unwrap();
    let videos: i64 = c
        .query_row(
            "SELECT count(DISTINCT video_id) FROM minute_video_events",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(videos, VIDEOS, "every video was folded at least once");
    ranged.fold().await.unwrap();
    assert!(fx
        .catalog
        .rollups
        .iter()
        .all(|d| fx.count("ranged", &delta_table(&d.name)) == 0));
    assert_eq!(fx.hourly_of(&ranged).await, fx.hourly);
    assert_eq!(fx.hourly_of(&plain).await, fx.hourly);
}

async fn store_offsets_after(store: &ServingStore, topic: &str) -> i64 {
    store.load_offsets(topic).await.unwrap()[&0]
}

mod bookkeeping;
mod contract;
