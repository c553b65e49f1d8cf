//! The open files: rows per (partition, event hour) across batches, closed
//! by size, age and the open-file cap, committed under final names only
//! after staging, continued across epochs only where nothing moved.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use super::*;
use crate::batch::{BatchBuilder, Positions};
use crate::config::Settings;
use crate::decode::{EventSchema, RecordDecoder};

const T0: i64 = 1_764_300_000_000 / HOUR_MS * HOUR_MS;

fn builder() -> BatchBuilder {
    let s = Settings::defaults().unwrap();
    let schema = EventSchema::from_config(&s.schema).unwrap();
    BatchBuilder::new(RecordDecoder::new(schema, &s.decode), &s.batch, 1024)
}

/// Messages `offsets` of `partition`, the i-th in hour `hours[i % len]`.
fn batch(
    b: &mut BatchBuilder,
    epoch: u64,
    msgs: &[(i32, std::ops::Range<i64>, i64)],
    from: Option<i64>,
) -> Batch {
    let now = Instant::now();
    let positions: BTreeMap<i32, Positions> = msgs
        .iter()
        .map(|(p, _, _)| {
            (
                *p,
                Positions {
                    archive: from,
                    serve_from: None,
                },
            )
        })
        .collect();
    b.set_positions(positions);
    for (p, offsets, hour) in msgs {
        for o in offsets.clone() {
            let t = T0 + hour * HOUR_MS + o;
            let ev = format!(r#"{{"video_id":"v{o}","event_type":"view","event_time":{t}}}"#);
            b.push(*p, o, Some(o), Some(ev.as_bytes()), T0 + 10 * HOUR_MS, now);
        }
    }
    b.seal(epoch, "t", T0, BTreeMap::new()).unwrap()
}

fn rotation(file_bytes: u64, roll: Duration, max_open: usize) -> Rotation {
    Rotation {
        file_bytes,
        roll_interval: roll,
        max_open_files: max_open,
        row_group_bytes: 64 << 20,
    }
}

fn rows_in(path: &std::path::Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024).unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let ids = b.column(0).as_string::<i32>();
        out.extend(ids.iter().map(|v| v.unwrap_or_default().to_string()));
    }
    out.sort();
    out
}

#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn batches_fill_one_file_per_partition_hour_and_appear_only_when_committed() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let mut w = RawWriter::new(
        sink.clone(),
        dir.path(),
        "t",
        rotation(1 << 30, Duration::from_secs(600), 64),
    )
    .unwrap();
    let mut b = builder();
    // Three batches: partition 0 in hours 0 and 1 (a late event in 0 at
    // the end), partition 1 in hour 1.
    let none = HashSet::new();
    w.append(
        &batch(&mut b, 1, &[(0, 0..5, 0), (1, 0..3, 1)], Some(0)),
        &none,
    )
    .unwrap();
    w.append(
        &batch(&mut b, 1, &[(0, 5..9, 1), (1, 3..6, 1)], Some(0)),
        &none,
    )
    .unwrap();
    w.append(&batch(&mut b, 1, &[(0, 9..10, 0)], Some(0)), &none)
        .unwrap();
    assert!(w.due(Instant::now()).is_empty(), "nothing is due yet");
    assert_eq!(w.all(), vec![0, 1]);
    // Nothing is visible under raw/ before the flush commits.
    let raw = dir.path().join(RAW_PREFIX);
    let visible = |root: &std::path::Path| -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else {
                    out.push(e.file_name().to_string_lossy().to_string());
                }
            }
        }
        out.sort();
        out
    };
    assert!(visible(&raw).is_empty());

    let flush = w.close(0).unwrap().unwrap();
    assert_eq!((flush.expected, flush.next), (Some(0), 10));
    assert_eq!(flush.files.len(), 2, "one file per event hour: {flush:?}");
    assert_eq!(flush.files.iter().map(|f| f.rows).sum::<u64>(), 10);
    w.stage(&flush).await.unwrap();
    let staged = visible(&raw);
    assert!(
        staged.len() == 2 && staged.iter().all(|n| n.starts_with('.')),
        "staged under hidden names: {staged:?}"
    );
    let paths: Vec<String> = flush.files.iter().map(|f| f.path.clone()).collect();
    sink.publish(&paths).await.unwrap();
    // Renaming again (a roll forward after a crash) finds them done.
    sink.publish(&paths).await.unwrap();
    let hour0 = dir.path().join(&flush.files[0].path);
    let hour1 = dir.path().join(&flush.files[1].path);
    assert_eq!(rows_in(&hour0), ["v0", "v1", "v2", "v3", "v4", "v9"]);
    assert_eq!(rows_in(&hour1), ["v5", "v6", "v7", "v8"]);
    assert!(flush.files[0]
        .path
        .ends_with(&file_name("t", 0, 0, 9, &sink.writer)));
    // The partition continues from the flush's end; nothing new: no flush.
    assert!(w.close(0).unwrap().is_none());
    assert_eq!(w.all(), vec![1]);
}

#[test]
#[allow(clippy::unwrap_used)]
fn files_close_by_size_age_and_the_open_file_cap() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let none = HashSet::new();
    let mut b = builder();
    let msgs = [(0, 0..50, 0), (1, 0..50, 1), (1, 50..60, 2), (2, 0..5, 3)];

    let mut w = RawWriter::new(
        sink.clone(),
        dir.path(),
        "t",
        rotation(1 << 30, Duration::from_secs(600), 3),
    )
    .unwrap();
    w.append(&batch(&mut b, 1, &msgs[..1], Some(0)), &none)
        .unwrap();
    w.append(&batch(&mut b, 1, &msgs[1..3], Some(0)), &none)
        .unwrap();
    w.append(&batch(&mut b, 1, &msgs[3..], Some(0)), &none)
        .unwrap();
    // Four files, three allowed: the least recently written one's
    // partition (0) closes.
    assert_eq!(w.due(Instant::now()), vec![0]);
    assert_eq!(
        w.due(Instant::now() + Duration::from_secs(600)),
        vec![0, 1, 2],
        "after the roll interval every partition is due"
    );

    let mut small = RawWriter::new(
        sink,
        dir.path(),
        "t",
        rotation(1, Duration::from_secs(600), 64),
    )
    .unwrap();
    small
        .append(&batch(&mut b, 1, &msgs[..1], Some(0)), &none)
        .unwrap();
    small.close(0).unwrap();
    small
        .append(&batch(&mut b, 1, &[(0, 50..60, 0)], Some(0)), &none)
        .unwrap();
    assert_eq!(small.due(Instant::now()), vec![0], "a file over the size");
}

#[test]
#[allow(clippy::unwrap_used)]
fn open_files_continue_only_where_the_stored_position_did_not_move() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let none = HashSet::new();
    let mut b = builder();
    let mut w = RawWriter::new(
        sink,
        dir.path(),
        "t",
        rotation(1 << 30, Duration::from_secs(600), 64),
    )
    .unwrap();
    w.append(
        &batch(&mut b, 1, &[(0, 0..10, 0), (1, 0..10, 0)], Some(0)),
        &none,
    )
    .unwrap();
    // A re-seek (new epoch): both read again from 0. Partition 0's stored
    // position is still 0 (these files build on it): the re-read rows are
    // skipped. Partition 1's moved to 7 (another writer flushed it): its
    // files are dropped and it starts over at 7.
    let again = batch(&mut b, 2, &[(0, 0..12, 0)], Some(0));
    w.append(&again, &none).unwrap();
    let moved = batch(&mut b, 2, &[(1, 7..12, 0)], Some(7));
    w.append(&moved, &none).unwrap();
    let f0 = w.close(0).unwrap().unwrap();
    assert_eq!((f0.expected, f0.next, f0.files[0].rows), (Some(0), 12, 12));
    let f1 = w.close(1).unwrap().unwrap();
    assert_eq!((f1.expected, f1.next, f1.files[0].rows), (Some(7), 12, 5));
    // Poison rows (now dead letters) are left out; a batch of dead letters
    // only makes no flush: its offsets go with the next one.
    let skip: HashSet<(i32, i64)> = [(0, 13)].into_iter().collect();
    w.append(&batch(&mut b, 2, &[(0, 12..15, 0)], Some(0)), &skip)
        .unwrap();
    let f = w.close(0).unwrap().unwrap();
    assert_eq!((f.expected, f.next, f.files[0].rows), (Some(12), 15, 2));
    let skip_all: HashSet<(i32, i64)> = (15..18).map(|o| (0, o)).collect();
    w.append(&batch(&mut b, 2, &[(0, 15..18, 0)], Some(0)), &skip_all)
        .unwrap();
    assert!(w.close(0).unwrap().is_none(), "no file, no flush");
    w.append(&batch(&mut b, 2, &[(0, 18..20, 0)], Some(0)), &none)
        .unwrap();
    let f = w.close(0).unwrap().unwrap();
    assert_eq!((f.expected, f.next, f.files[0].rows), (Some(15), 20, 2));
}

/// The committed files a test says are recorded.
struct Recorded(HashSet<String>);

impl super::super::CommittedFiles for Recorded {
    async fn committed_among(&self, paths: &[String]) -> Result<HashSet<String>, SinkError> {
        Ok(paths
            .iter()
            .filter(|p| self.0.contains(*p))
            .cloned()
            .collect())
    }
}

#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn a_committed_flush_removes_what_dead_flushes_staged_in_its_hours() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let hour = format!("{RAW_PREFIX}/dt=2025-11-28/hour=03");
    std::fs::create_dir_all(dir.path().join(&hour)).unwrap();
    let staged = |p: i32, first: i64, last: i64, w: &str| {
        let name = format!(".{}.inprogress", file_name("t", p, first, last, w));
        std::fs::write(dir.path().join(&hour).join(&name), b"x").unwrap();
        format!("{hour}/{name}")
    };
    let dead = staged(0, 100, 180, "dead");
    let pending = staged(0, 100, 199, "live");
    let at_position = staged(0, 200, 250, "zombie");
    let other_partition = staged(1, 100, 180, "dead");
    // The partition's staged manifest entries, the same way.
    let entries = crate::sink::archive::manifest::partition_dir("t", 0);
    let entries = entries.trim_end_matches('/').to_string();
    std::fs::create_dir_all(dir.path().join(&entries)).unwrap();
    let entry = |first: i64, last: i64, w: &str| {
        let path = crate::sink::archive::manifest::entry_path("t", 0, first, last, w);
        let staged = staging_path(&path);
        std::fs::write(dir.path().join(&staged), b"{}").unwrap();
        (path, staged)
    };
    let (_, dead_entry) = entry(100, 180, "dead");
    let (live_entry, pending_entry) = entry(100, 199, "live");
    let (_, zombie_entry) = entry(200, 250, "zombie");
    let record = Recorded(
        [
            format!("{hour}/{}", file_name("t", 0, 100, 199, "live")),
            live_entry,
        ]
        .into(),
    );
    let n = sink
        .remove_dead_staged_in(&[hour.clone(), entries], "t", 0, 200, &record)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(
        !dir.path().join(&dead).exists(),
        "a dead flush's staged file is removed"
    );
    assert!(
        !dir.path().join(&dead_entry).exists(),
        "a dead flush's staged manifest entry is removed"
    );
    for kept in [
        pending,
        at_position,
        other_partition,
        pending_entry,
        zombie_entry,
    ] {
        assert!(dir.path().join(&kept).exists(), "{kept} is kept");
    }
}

#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn a_backlog_over_many_hours_holds_rows_not_writers_until_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let sink = ParquetArchiveSink::local(dir.path(), 2, 1).unwrap();
    let mut w = RawWriter::new(
        sink.clone(),
        dir.path(),
        "t",
        rotation(1 << 30, Duration::from_secs(600), 64),
    )
    .unwrap();
    let mut b = builder();
    let none = HashSet::new();
    // One batch of 150 messages, each in an hour of its own (a backlog
    // spanning a week), and 100 more in hour 0.
    let mut msgs: Vec<(i32, std::ops::Range<i64>, i64)> =
        (0..150).map(|o| (0, o..o + 1, 9 - o)).collect();
    msgs.push((0, 150..250, 0));
    w.append(&batch(&mut b, 1, &msgs, Some(0)), &none).unwrap();
    assert_eq!(w.open_files(), 150);
    let spooled = |root: &std::path::Path| {
        walkdir(root.join(".spool"))
            .into_iter()
            .filter(|p| p.is_file())
            .count()
    };
    assert_eq!(spooled(dir.path()), 0, "no writer, no spool file yet");
    // Past the row-group size a file gets its writer and spool file.
    w.rotation.row_group_bytes = 1;
    w.append(&batch(&mut b, 1, &[(0, 250..260, 0)], Some(0)), &none)
        .unwrap();
    assert_eq!(spooled(dir.path()), 1);

    let flush = w.close(0).unwrap().unwrap();
    assert_eq!(flush.files.len(), 150);
    assert_eq!(flush.files.iter().map(|f| f.rows).sum::<u64>(), 260);
    w.stage(&flush).await.unwrap();
    let paths: Vec<String> = flush.files.iter().map(|f| f.path.clone()).collect();
    sink.publish(&paths).await.unwrap();
    let mut all: Vec<String> = paths
        .iter()
        .flat_map(|p| rows_in(&dir.path().join(p)))
        .collect();
    all.sort();
    let mut want: Vec<String> = (0..260).map(|o| format!("v{o}")).collect();
    want.sort();
    assert_eq!(all, want, "every row once, in the file of its hour");
    let hour0 = flush.files.iter().find(|f| f.rows == 111).unwrap();
    assert_eq!(rows_in(&dir.path().join(&hour0.path)).len(), 111);
    assert_eq!(spooled(dir.path()), 0, "every spool file staged");
}

fn walkdir(root: std::path::PathBuf) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
