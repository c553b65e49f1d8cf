use super::*;

#[test]
fn file_names_round_trip() {
    let n = file_name("video-events.v1", 3, 100, 199, "0a1b2c3d");
    assert_eq!(
        n,
        "video-events.v1-p00003-00000000000000000100-00000000000000000199-w0a1b2c3d.parquet"
    );
    let old = "video-events.v1-p00003-00000000000000000100-00000000000000000199.parquet";
    assert_eq!(
        parse_file_name(old),
        Some(("video-events.v1".into(), 3, 100, 199, false))
    );
    assert_eq!(
        parse_file_name(&n),
        Some(("video-events.v1".into(), 3, 100, 199, false))
    );
    let hidden = format!(".{n}.inprogress");
    assert_eq!(
        parse_file_name(&hidden),
        Some(("video-events.v1".into(), 3, 100, 199, true))
    );
    assert_eq!(parse_file_name("README.md"), None);
}

#[test]
fn staging_files_of_a_crashed_put_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let hour = dir.path().join(RAW_PREFIX).join("dt=2026-11-28/hour=09");
    std::fs::create_dir_all(&hour).unwrap();
    let ours = format!(".{}.inprogress#1", file_name("t", 0, 10, 19, "1"));
    let other_topic = format!(".{}.inprogress#1", file_name("u", 0, 10, 19, "1"));
    let other_partition = format!("{}#2", file_name("t", 1, 10, 19, "1"));
    for n in [
        &ours,
        &other_topic,
        &other_partition,
        &file_name("t", 0, 0, 9, "1"),
    ] {
        std::fs::write(hour.join(n), b"x").unwrap();
    }
    let wanted: HashMap<i32, Option<i64>> = [(0, Some(10))].into_iter().collect();
    assert_eq!(
        staging_files(dir.path(), "t", &wanted),
        vec![hour.join(&ours)]
    );
}

/// A record of committed files that notes how many paths each check asked about.
struct Record(
    std::collections::HashSet<String>,
    std::sync::Mutex<Vec<usize>>,
);

impl CommittedFiles for Record {
    async fn committed_among(
        &self,
        paths: &[String],
    ) -> Result<std::collections::HashSet<String>, SinkError> {
        self.1.lock().unwrap().push(paths.len());
        Ok(paths
            .iter()
            .filter(|p| self.0.contains(*p))
            .cloned()
            .collect())
    }
}

/// What each sweep scope removes: a bounded sweep finds the recent dead
/// files in recent (or undated) directories; a full one finds them all;
/// neither touches a recorded file, one at or beyond the committed
/// offset, another topic's or an in-progress one.
#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn dead_files_are_found_in_the_scope_swept() {
    let dir = tempfile::tempdir().unwrap();
    let archive = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let now = Utc::now().timestamp_millis();
    let (today, hh) = ymd_h(now);
    let (old_day, _) = ymd_h(now - 30 * DAY_MS);
    let recent_raw = format!("{RAW_PREFIX}/dt={today}/hour={hh}");
    let put = |rel: &str, age_ms: i64| -> String {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_millis(age_ms as u64);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
        rel.to_string()
    };
    let name = |t: &str, p: i32, first: i64| file_name(t, p, first, first + 9, "1");
    let dead_recent = put(&format!("{recent_raw}/{}", name("t", 0, 100)), 0);
    let recorded = put(&format!("{recent_raw}/{}", name("t", 0, 200)), 0);
    let beyond = put(&format!("{recent_raw}/{}", name("t", 0, 1_000)), 0);
    let other_topic = put(&format!("{recent_raw}/{}", name("u", 0, 100)), 0);
    let in_progress = put(
        &format!("{recent_raw}/.{}.inprogress", name("t", 0, 110)),
        0,
    );
    let dead_old = put(&format!("{recent_raw}/{}", name("t", 0, 300)), 2 * DAY_MS);
    let dead_in_old_dir = put(
        &format!("{RAW_PREFIX}/dt={old_day}/hour=00/{}", name("t", 0, 400)),
        0,
    );
    let dead_undated = put(&format!("{RAW_PREFIX}/backfill/{}", name("t", 0, 500)), 0);
    let dead_letters = put(&format!("{DLQ_PREFIX}/dt={today}/{}", name("t", 0, 600)), 0);
    // Unrecorded but named by a visible manifest entry (a store behind its
    // archive): kept.
    let manifested = put(&format!("{recent_raw}/{}", name("t", 0, 700)), 0);
    let entry = put(&super::manifest::entry_path("t", 0, 700, 709, "1"), 0);
    let many: Vec<String> = (0..1_100)
        .map(|i| put(&format!("{recent_raw}/{}", name("t", 1, i * 10)), 0))
        .collect();
    let record = Record([recorded.clone()].into_iter().collect(), Default::default());
    let committed: HashMap<i32, i64> = [(0, 1_000), (1, 1_000_000)].into_iter().collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    let since = SweepScope::Since {
        since_ms: now - 600_000,
        max_event_age_ms: 7 * DAY_MS,
    };
    let removed = archive
        .remove_dead("t", &committed, since, &record)
        .await
        .unwrap();
    let mut want = vec![dead_recent, dead_undated, dead_letters];
    want.extend(many);
    assert_eq!(sorted(removed), sorted(want));
    let checks = record.1.lock().unwrap().clone();
    assert!(
        checks.len() >= 2 && checks.iter().all(|n| *n <= 1_000),
        "checked in chunks: {checks:?}"
    );

    let removed = archive
        .remove_dead("t", &committed, SweepScope::Full, &record)
        .await
        .unwrap();
    assert_eq!(sorted(removed), sorted(vec![dead_old, dead_in_old_dir]));
    for kept in [
        recorded,
        beyond,
        other_topic,
        in_progress,
        manifested,
        entry,
    ] {
        assert!(dir.path().join(&kept).exists(), "{kept} was removed");
    }
    assert!(archive
        .remove_dead("t", &committed, SweepScope::Full, &record)
        .await
        .unwrap()
        .is_empty());
}

#[test]
fn hour_partition_names() {
    assert_eq!(
        ymd_h(1_764_300_000_000),
        ("2025-11-28".to_string(), "03".to_string())
    );
}
