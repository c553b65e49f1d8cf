use super::*;
use crate::sink::archive::file_name;
use crate::sink::archive::manifest::ManifestFile;

fn raw_path(hour: &str, topic: &str, p: i32, first: i64, last: i64) -> String {
    format!(
        "raw/events/dt=2026-03-01/hour={hour}/{}",
        file_name(topic, p, first, last, "ab")
    )
}

fn entry(
    topic: &str,
    p: i32,
    first: i64,
    last: i64,
    files: &[(&str, u64)],
) -> (String, ManifestEntry) {
    let path = crate::sink::archive::manifest::entry_path(topic, p, first, last, "ab");
    let mut e = ManifestEntry::new(topic, p, first, last, &[], None);
    e.files = files
        .iter()
        .map(|(path, rows)| ManifestFile {
            path: path.to_string(),
            rows: *rows,
            bytes: 100,
        })
        .collect();
    (path, e)
}

#[test]
fn a_plan_records_every_named_file_and_ends_each_partition_at_its_last_range() {
    let a = raw_path("01", "t", 0, 0, 99);
    let b = raw_path("02", "t", 0, 0, 99);
    let c = raw_path("02", "t", 0, 100, 149);
    let d = raw_path("02", "t", 1, 0, 9);
    let entries = vec![
        entry("t", 0, 0, 99, &[(&a, 60), (&b, 40)]),
        entry("t", 0, 100, 149, &[(&c, 50)]),
        entry("t", 1, 0, 9, &[(&d, 10)]),
    ];
    // `c` is still under its staging name (a crash between renames).
    let staged_c = crate::sink::archive::staging_path(&c);
    let raw = Listing::of(vec![
        (a.clone(), 100),
        (b.clone(), 100),
        (staged_c, 100),
        (d.clone(), 100),
        // A dead flush's hidden file: neither counted nor refused.
        (
            crate::sink::archive::staging_path(&raw_path("03", "t", 0, 150, 170)),
            9,
        ),
    ]);
    let dlq_kept = format!("dlq/dt=2026-03-01/{}", file_name("t", 0, 90, 120, "ab"));
    let dlq_beyond = format!("dlq/dt=2026-03-01/{}", file_name("t", 0, 150, 160, "ab"));
    let dlq_other = format!("dlq/dt=2026-03-01/{}", file_name("t", 2, 0, 5, "ab"));
    let dlq = Listing::of(vec![
        (dlq_kept.clone(), 10),
        (dlq_beyond, 10),
        (dlq_other, 10),
    ]);
    let p = plan(&entries, &raw, &dlq, None).unwrap();
    let raw_recorded: Vec<&str> = p
        .restore
        .files
        .iter()
        .filter(|(_, f)| f.kind == FileKind::Raw)
        .map(|(_, f)| f.path.as_str())
        .collect();
    assert_eq!(
        raw_recorded,
        vec![a.as_str(), b.as_str(), c.as_str(), d.as_str()]
    );
    assert_eq!(
        p.restore
            .files
            .iter()
            .filter(|(_, f)| f.kind == FileKind::Manifest)
            .count(),
        3
    );
    assert_eq!(p.rename, vec![vec![entries[1].0.clone(), c.clone()]]);
    assert_eq!(
        p.restore.offsets,
        vec![("t".to_string(), 0, 150), ("t".to_string(), 1, 10)]
    );
    assert!(p.gaps.is_empty(), "{:?}", p.gaps);
    let dead: Vec<&str> = p.dead_letters.iter().map(|d| d.1.as_str()).collect();
    assert_eq!(dead, vec![dlq_kept.as_str()]);
}

#[test]
fn a_raw_file_no_entry_names_stops_the_rebuild_naming_compact() {
    let a = raw_path("01", "t", 0, 0, 99);
    let legacy = raw_path("00", "t", 0, 0, 10);
    let entries = vec![entry("t", 0, 0, 99, &[(&a, 1)])];
    let raw = Listing::of(vec![(a, 1), (legacy.clone(), 1)]);
    let err = plan(&entries, &raw, &Listing::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&legacy) && err.contains("tally compact"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_pruned_before_the_archive_horizon_and_an_error_after() {
    let a = raw_path("01", "t", 0, 0, 99);
    let entries = vec![entry("t", 0, 0, 99, &[(&a, 1)])];
    let hour = hour_of(&a).unwrap();
    assert_eq!(
        hour,
        chrono::DateTime::parse_from_rfc3339("2026-03-01T01:00:00Z")
            .unwrap()
            .timestamp_millis()
    );
    let p = plan(
        &entries,
        &Listing::default(),
        &Listing::default(),
        Some(hour + 1),
    )
    .unwrap();
    assert_eq!(p.pruned, 1);
    assert_eq!(p.restore.offsets, vec![("t".to_string(), 0, 100)]);
    let err = plan(
        &entries,
        &Listing::default(),
        &Listing::default(),
        Some(hour),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("missing") && err.contains(&a), "{err}");
}

#[test]
fn gaps_are_reported_and_counters_follow_the_files() {
    let a = raw_path("01", "t", 0, 0, 9);
    let b = raw_path("01", "t", 0, 20, 29);
    let r = raw_path("01", "dlq.t", 0, 0, 1);
    let mut replay = entry("dlq.t", 0, 0, 1, &[(&r, 2)]);
    replay.1.origins = Some(crate::sink::archive::manifest::ManifestOrigins {
        topic: "t".into(),
        rows: vec![(0, 5), (1, 7)],
    });
    let entries = vec![
        entry("t", 0, 0, 9, &[(&a, 8)]),
        entry("t", 0, 20, 29, &[(&b, 10)]),
        replay,
    ];
    let raw = Listing::of(vec![(a, 1), (b, 1), (r, 1)]);
    let p = plan(&entries, &raw, &Listing::default(), None).unwrap();
    assert_eq!(p.gaps.len(), 1, "{:?}", p.gaps);
    assert_eq!(
        p.restore.replayed,
        vec![("t".to_string(), 0, 5), ("t".to_string(), 1, 7)]
    );
    let rejected = BTreeMap::from([("invalid_json".to_string(), 3)]);
    let c: BTreeMap<String, i64> = counters(&p.restore, &rejected).into_iter().collect();
    assert_eq!(c["accepted_total"], 20);
    assert_eq!(c["messages_total"], 18 + 3);
    assert_eq!(c["dlq_replayed_total"], 2);
    assert_eq!(c["rejected_total.invalid_json"], 3);
}
