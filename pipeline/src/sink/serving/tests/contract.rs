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
    let (tables, files) = store
        .read_snapshot(&[hourly], &[(i64::MIN, i64::MAX)])
        .await
        .unwrap();
    let rows = store
        .read_rows(hourly, i64::MIN, i64::MAX, None)
        .await
        .unwrap();
    assert_eq!(sorted(tables[0].clone()), sorted(rows));
    assert!(files.is_empty() && store.raw_files().await.unwrap().is_empty());

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
    assert!(ServingStore::raw_files_in(&mut tx)
        .await
        .unwrap()
        .is_empty());
    let deleted = store
        .replace_windows(tx, &[(hourly.clone(), i64::MIN, i64::MAX)], &outputs)
        .await
        .unwrap();
    assert!(deleted >= fx.hourly.len() as u64, "{deleted} rows deleted");
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
