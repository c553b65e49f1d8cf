//! One contract, both backends: the same commits, fences, reads, snapshot
//! and window replacement give the answers computed here (the fixture's
//! exact hourly totals), on SQLite and on PostgreSQL.

use super::*;

/// Run the contract against `store` (empty, with the fixture's rollups).
async fn contract(fx: &Fixture, store: &ServingStore) {
    let n = fx.per_batch;
    for b in 0..fx.batches.len() {
        let start = (b > 0).then(|| b as i64 * n);
        assert_eq!(
            fx.commit(store, b, start).await.unwrap(),
            CommitOutcome::Committed,
            "batch {b}"
        );
    }
    let end = fx.batches.len() as i64 * n;
    // A stale writer re-sending batch 1 is fenced and changes nothing.
    assert_eq!(
        fx.commit(store, 1, Some(n)).await.unwrap(),
        CommitOutcome::Fenced {
            partition: 0,
            expected: Some(n),
            stored: Some(end)
        }
    );
    assert_eq!(
        store.load_offsets("t").await.unwrap(),
        [(0, end)].into_iter().collect()
    );
    assert_eq!(
        store.counters().await.unwrap().get("accepted_total"),
        Some(&end)
    );
    assert_eq!(store.as_of("t").await.unwrap(), Some(fx.now));
    assert_eq!(fx.hourly_of(store).await, fx.hourly, "reads after commits");

    // One snapshot reads what the single reads read; no files were recorded.
    let hourly = fx
        .catalog
        .rollups
        .iter()
        .find(|d| d.name == "hour_video_events")
        .unwrap();
    let everything = ("raw/".to_string(), "raw0".to_string());
    let (tables, files, _) = store
        .read_snapshot(&[hourly], &[(i64::MIN, i64::MAX)], &everything)
        .await
        .unwrap();
    let rows = store
        .read_rows(hourly, i64::MIN, i64::MAX, None)
        .await
        .unwrap();
    assert_eq!(sorted(tables[0].clone()), sorted(rows));
    assert!(files.is_empty() && store.raw_files(&everything).await.unwrap().is_empty());

    // One recompute's rows alone (one part: PostgreSQL COPYs them into the
    // emptied windows) leave exactly those rows.
    let single: Vec<RollupOutput> = fx.batches[0]
        .iter()
        .filter(|o| o.rollup == hourly.name)
        .cloned()
        .collect();
    assert_eq!(single.len(), 1);
    let mut want = BTreeMap::new();
    for b in &single[0].batches {
        use datafusion::arrow::array::{Array, AsArray};
        use datafusion::arrow::datatypes::{Float64Type, Int64Type};
        let text = |c: usize, r: usize| b.column(c).as_string::<i32>().value(r).to_string();
        let int = |c: usize, r: usize| b.column(c).as_primitive::<Int64Type>().value(r);
        let real = |c: usize, r: usize| {
            let a = b.column(c).as_primitive::<Float64Type>();
            (!a.is_null(r)).then(|| a.value(r))
        };
        for r in 0..b.num_rows() {
            want.insert(
                (text(0, r), text(1, r), int(2, r)),
                (
                    int(3, r),
                    real(4, r).unwrap_or(0.0),
                    int(5, r),
                    real(6, r),
                    real(7, r),
                ),
            );
        }
    }
    assert!(want.len() > 10);
    let tx = store.begin_replace().await.unwrap();
    store
        .replace_windows(tx, &[(hourly.clone(), i64::MIN, i64::MAX)], &single)
        .await
        .unwrap();
    assert_eq!(fx.hourly_of(store).await, want, "one part replaced");

    // Replacing every hourly window with the same batches recomputed
    // deletes the old rows and leaves exactly the totals again.
    let outputs: Vec<RollupOutput> = fx
        .batches
        .iter()
        .flatten()
        .filter(|o| o.rollup == hourly.name)
        .cloned()
        .collect();
    let mut tx = store.begin_replace().await.unwrap();
    assert!(ServingStore::raw_files_in(&mut tx, &everything)
        .await
        .unwrap()
        .is_empty());
    let deleted = store
        .replace_windows(tx, &[(hourly.clone(), i64::MIN, i64::MAX)], &outputs)
        .await
        .unwrap();
    assert_eq!(deleted, want.len() as u64, "the part's rows deleted");
    assert_eq!(
        fx.hourly_of(store).await,
        fx.hourly,
        "reads after a replacement"
    );
    // The offsets and counters are not the replacement's business.
    assert_eq!(
        store.load_offsets("t").await.unwrap(),
        [(0, end)].into_iter().collect()
    );
    files_and_replayed_letters(store, end).await;
    archive_record(store, end).await;
}

/// The archive's own record: adopted at the serving offset, fenced on its
/// position, files pending until renamed, counted hours open until then.
async fn archive_record(store: &ServingStore, end: i64) {
    use crate::sink::archive::FileKind;
    use crate::sink::serving::ArchiveCommit;
    let hour = chrono::DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
        .unwrap()
        .timestamp_millis();
    // The fixture's batches committed their files with them: the archive's
    // position moved with the offsets, to `end`. The last batch (`end`)
    // leaves its events to the archive's later commit and notes their hour.
    let next = end;
    assert_eq!(store.open_hours().await.unwrap(), vec![hour]);
    // That batch's files (written under staging names) are pending until
    // renamed; renaming them is the committer's (here: done).
    let batch_files: Vec<String> = store
        .pending_archive("t")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(batch_files.len(), 5, "{batch_files:?}");
    store.finish_archive("t", 0, &batch_files).await.unwrap();
    assert_eq!(
        store.archive_positions("t").await.unwrap(),
        [(0, next)].into_iter().collect()
    );
    let file = WrittenFile {
        path: "raw/events/dt=2026-11-30/hour=10/t-p00000-f.parquet".into(),
        kind: FileKind::Raw,
        partition: 0,
        first_offset: next,
        last_offset: next + 9,
        rows: 10,
        bytes: 100,
    };
    let commit = |expected: Option<i64>| ArchiveCommit {
        topic: "t",
        partition: 0,
        expected,
        next: next + 10,
        files: std::slice::from_ref(&file),
        now_ms: 0,
    };
    // A writer that started below the position is fenced.
    assert_eq!(
        store.commit_archive(&commit(Some(next - 1))).await.unwrap(),
        CommitOutcome::Fenced {
            partition: 0,
            expected: Some(next - 1),
            stored: Some(next)
        }
    );
    assert!(store.pending_archive("t").await.unwrap().is_empty());
    assert_eq!(
        store.commit_archive(&commit(Some(next))).await.unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        store.archive_positions("t").await.unwrap(),
        [(0, next + 10)].into_iter().collect()
    );
    assert_eq!(
        store.pending_archive("t").await.unwrap(),
        vec![(0, file.path.clone())]
    );
    assert_eq!(
        store
            .committed_among(std::slice::from_ref(&file.path))
            .await
            .unwrap()
            .len(),
        1
    );
    // Counted through `end`, below the new position: open until the rename is done.
    assert_eq!(store.open_hours().await.unwrap(), vec![hour]);
    store
        .finish_archive("t", 0, std::slice::from_ref(&file.path))
        .await
        .unwrap();
    assert!(store.pending_archive("t").await.unwrap().is_empty());
    assert!(store.open_hours().await.unwrap().is_empty());
}

/// Files recorded in three hours around midnight and a dead-letter file,
/// with replayed letters: the file index answers by hour, whatever else is
/// recorded; the letters are recorded with the commit.
async fn files_and_replayed_letters(store: &ServingStore, end: i64) {
    use crate::sink::archive::FileKind;
    let h = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    };
    let file = |path: &str, kind: FileKind, first: i64| WrittenFile {
        path: path.to_string(),
        kind,
        partition: 0,
        first_offset: first,
        last_offset: first,
        rows: 1,
        bytes: 1,
    };
    let files = [
        file(
            "raw/events/dt=2026-11-29/hour=23/t-p00000-a.parquet",
            FileKind::Raw,
            end,
        ),
        file(
            "raw/events/dt=2026-11-30/hour=00/t-p00000-b.parquet",
            FileKind::Raw,
            end,
        ),
        file(
            "raw/events/dt=2026-11-30/hour=01/t-p00000-c.parquet",
            FileKind::Raw,
            end,
        ),
        file(
            "raw/events/dt=2026-11-30/hour=10/t-p00000-d.parquet",
            FileKind::Raw,
            end,
        ),
        file(
            "dlq/dt=2026-11-30/t-p00000-e.parquet",
            FileKind::DeadLetter,
            end,
        ),
    ];
    let partitions: BTreeMap<i32, PartitionRange> = [(
        0,
        PartitionRange {
            expected_start: Some(end),
            first: end,
            last: end,
        },
    )]
    .into_iter()
    .collect();
    let letters = [(3, 17), (5, 2)];
    let req = CommitRequest {
        topic: "t",
        partitions: &partitions,
        outputs: &[],
        files: &files,
        counters: &[],
        max_event_ms: &BTreeMap::new(),
        caught_up: &BTreeMap::new(),
        sealed_at_ms: 0,
        now_ms: 0,
        replayed: Some(("orig", &letters)),
        open_hours: &[(0, h("2026-11-30T10:00:00Z"), end)],
        archive_with_batch: false,
    };
    assert_eq!(store.commit(&req).await.unwrap(), CommitOutcome::Committed);
    let names = |v: Vec<String>| -> Vec<String> {
        v.iter()
            .map(|p| p.rsplit('-').next().unwrap_or_default().to_string())
            .collect()
    };
    for (lo, hi, want) in [
        (
            "2026-11-29T23:00:00Z",
            "2026-11-30T00:00:00Z",
            vec!["a.parquet"],
        ),
        (
            "2026-11-29T23:30:00Z",
            "2026-11-30T00:00:01Z",
            vec!["a.parquet", "b.parquet"],
        ),
        (
            "2026-11-30T00:00:00Z",
            "2026-11-30T10:00:00Z",
            vec!["b.parquet", "c.parquet"],
        ),
        ("2026-11-30T02:00:00Z", "2026-11-30T10:00:00Z", vec![]),
    ] {
        let range = crate::sink::raw_path_range(h(lo), h(hi));
        assert_eq!(
            names(store.raw_files(&range).await.unwrap()),
            want,
            "[{lo}, {hi})"
        );
    }
    assert_eq!(names(store.dlq_files("t").await.unwrap()), ["e.parquet"]);
    let mut replayed = store.replayed_letters("orig").await.unwrap();
    replayed.sort();
    assert_eq!(replayed, letters);
    assert!(store.replayed_letters("t").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)]
async fn sqlite_keeps_the_store_contract() {
    let fx = fixture(3, 300, 7).await;
    // Folds from 500 rows: the reads sum rollup and delta tables.
    let store = fx.store("contract", 500).await;
    contract(&fx, &store).await;
    assert!(
        store.fold_stats().folds > 0,
        "the contract ran across folds"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)]
async fn postgres_keeps_the_store_contract() {
    let fx = fixture(3, 300, 7).await;
    let url = crate::testing::pg_database().await;
    let store = ServingStore::open(&url, &fx.catalog.rollups).await.unwrap();
    contract(&fx, &store).await;
    store.close().await;
    crate::testing::drop_pg_database(&url).await;
}
