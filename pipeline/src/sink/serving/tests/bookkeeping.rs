//! The stores' bookkeeping: `as_of`, recorded partition starts and resets,
//! rollup definitions, recorded files, redaction.

use super::*;

#[test]
fn as_of_never_claims_a_partition_with_nothing_committed() {
    assert_eq!(complete_up_to([Some(5), Some(3), Some(9)]), Some(3));
    assert_eq!(
        complete_up_to([Some(5), None]),
        None,
        "a registered, never-committed partition"
    );
    assert_eq!(complete_up_to(std::iter::empty()), None);
}

#[allow(clippy::unwrap_used)]
/// Registration keeps the first start; a reset moves it (and a batch
/// built on the old offset is then fenced); both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_starts_register_once_and_resets_fence_running_writers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
    let catalog = crate::testing::catalog(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
    )
    .await
    .unwrap();
    let pg = crate::testing::pg_database().await;
    for url in [
        format!("sqlite://{}/serving.db", dir.path().display()),
        pg.clone(),
    ] {
        let store = ServingStore::open(&url, &catalog.rollups).await.unwrap();
        assert_eq!(store.register_start("t", 0, 100, 1).await.unwrap(), 100);
        assert_eq!(
            store.register_start("t", 0, 900, 2).await.unwrap(),
            100,
            "{url}: the first start stays"
        );
        assert_eq!(
            store.as_of("t").await.unwrap(),
            None,
            "{url}: registered, nothing committed"
        );
        assert_eq!(store.reset_offset("t", 0, 7, 3).await.unwrap(), Some(100));
        assert_eq!(store.reset_offset("t", 1, 0, 3).await.unwrap(), None);
        let partitions = [(
            0,
            PartitionRange {
                expected_start: Some(100),
                first: 100,
                last: 109,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic: "t",
            partitions: &partitions,
            outputs: &[],
            files: &[],
            counters: &[],
            max_event_ms: &Default::default(),
            caught_up: &Default::default(),
            sealed_at_ms: 0,
            now_ms: 0,
            replayed: None,
            open_hours: &[],
            archive_with_batch: true,
        };
        assert_eq!(
            store.commit(&req).await.unwrap(),
            CommitOutcome::Fenced {
                partition: 0,
                expected: Some(100),
                stored: Some(7)
            },
            "{url}"
        );
        store.close().await;
    }
}

#[allow(clippy::unwrap_used)]
/// A rollup edited in place is refused by name; reformatting is not an edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_rollup_definitions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
    let sql_dir = dir.path().join("rollups");
    std::fs::create_dir_all(&sql_dir).unwrap();
    let sql =
        std::fs::read_to_string(settings.sql.rollups_dir.join("hour_video_events.sql")).unwrap();
    let file = sql_dir.join("hour_video_events.sql");
    let load =
        || crate::testing::catalog(&sql_dir, schema.arrow.clone(), &settings.schema.time_field);
    let url = format!("sqlite://{}/serving.db", dir.path().display());
    std::fs::write(&file, &sql).unwrap();
    ServingStore::open(&url, &load().await.unwrap().rollups)
        .await
        .unwrap()
        .close()
        .await;
    std::fs::write(
        &file,
        format!("-- a comment\n{}", sql.to_lowercase().replace('\n', "\n\t")),
    )
    .unwrap();
    ServingStore::open(&url, &load().await.unwrap().rollups)
        .await
        .unwrap()
        .close()
        .await;
    std::fs::write(
        &file,
        sql.replace("FROM events", "FROM events WHERE event_type <> 'like'"),
    )
    .unwrap();
    let err = ServingStore::open(&url, &load().await.unwrap().rollups)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("hour_video_events.sql has changed"), "{err}");
    assert!(
        err.contains("put the new definition in a new version beside it"),
        "{err}"
    );
}

#[allow(clippy::unwrap_used)]
/// The orphan sweep's check: recorded paths are found among many
/// (more than one statement's worth), unknown ones are not, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_among_finds_exactly_the_recorded_paths() {
    let dir = tempfile::tempdir().unwrap();
    let settings = crate::testing::settings(dir.path(), &[]);
    let schema = crate::decode::EventSchema::from_config(&settings.schema).unwrap();
    let catalog = crate::testing::catalog(
        &settings.sql.rollups_dir,
        schema.arrow.clone(),
        &settings.schema.time_field,
    )
    .await
    .unwrap();
    let pg = crate::testing::pg_database().await;
    for url in [
        format!("sqlite://{}/serving.db", dir.path().display()),
        pg.clone(),
    ] {
        let store = ServingStore::open(&url, &catalog.rollups).await.unwrap();
        let file = |i: i64| WrittenFile {
            path: format!(
                "raw/events/dt=2026-11-29/hour=10/t-p00000-{:020}-{:020}-w1.parquet",
                i * 10,
                i * 10 + 9
            ),
            kind: crate::sink::archive::FileKind::Raw,
            partition: 0,
            first_offset: i * 10,
            last_offset: i * 10 + 9,
            rows: 10,
            bytes: 100,
        };
        // Every third of 1,300 files is recorded.
        let recorded: Vec<WrittenFile> = (0..1_300).filter(|i| i % 3 == 0).map(file).collect();
        let partitions: BTreeMap<i32, PartitionRange> = [(
            0,
            PartitionRange {
                expected_start: None,
                first: 0,
                last: 12_999,
            },
        )]
        .into_iter()
        .collect();
        let req = CommitRequest {
            topic: "t",
            partitions: &partitions,
            outputs: &[],
            files: &recorded,
            counters: &[],
            max_event_ms: &BTreeMap::new(),
            caught_up: &BTreeMap::new(),
            sealed_at_ms: 0,
            now_ms: 0,
            replayed: None,
            open_hours: &[],
            archive_with_batch: true,
        };
        assert_eq!(store.commit(&req).await.unwrap(), CommitOutcome::Committed);
        let asked: Vec<String> = (0..1_300)
            .map(|i| file(i).path)
            .chain(["raw/events/elsewhere.parquet".to_string()])
            .collect();
        let found = store.committed_among(&asked).await.unwrap();
        let want: std::collections::HashSet<String> =
            recorded.iter().map(|f| f.path.clone()).collect();
        assert_eq!(found, want, "{url}");
        assert!(store.committed_among(&[]).await.unwrap().is_empty());
        store.close().await;
    }
    crate::testing::drop_pg_database(&pg).await;
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact("postgres://tally:secret@db:5432/tally"),
        "postgres://tally:***@db:5432/tally"
    );
    assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    assert_eq!(redact("postgres://tally@db/t"), "postgres://tally@db/t");
    assert_eq!(
        redact("postgres://db/t?user=tally&password=S3cret&sslmode=require"),
        "postgres://db/t?user=tally&password=***&sslmode=require"
    );
}
