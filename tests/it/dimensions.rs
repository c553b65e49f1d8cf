//! Dimension tables end to end: a rollup joining a CSV counts with the
//! table as it was when each batch ran; a file changed while `tally run`
//! runs is reloaded without a restart; `tally backfill` recomputes the
//! history with the table as it is now.

use std::time::{Duration, Instant};

use tally_tests::*;

/// v000..v034 in `channels(i)`, written as a new file renamed over the old.
fn write_videos(path: &std::path::Path, channel: impl Fn(usize) -> String) {
    let mut csv = String::from("video_id,channel_id\n");
    for i in 0..35 {
        csv.push_str(&format!("v{i:03},{}\n", channel(i)));
    }
    let tmp = path.with_extension("csv.new");
    std::fs::write(&tmp, csv).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn mapping(channel: impl Fn(usize) -> String) -> impl Fn(&str) -> String {
    move |video: &str| match video
        .strip_prefix('v')
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(i) if i < 35 => channel(i),
        _ => "unknown".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dimension_is_used_from_the_next_batch_and_backfill_recomputes_with_it() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("dims");
    broker.create_topic(&topic, 2).await;
    let data = dir.path().join("data");
    let db = data.join("serving.db");
    let videos = dir.path().join("videos.csv");
    let before = |i: usize| format!("ch-{}", i % 5);
    let after = |i: usize| format!("new-{}", i % 2);
    write_videos(&videos, before);
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set(
        "TALLY__SQL__DIMENSIONS__VIDEOS",
        &videos.display().to_string(),
    );
    env.set("TALLY__SQL__DIMENSION_RELOAD", "200ms");
    let mut tally = Tally::start(&env);

    let now = chrono::Utc::now().timestamp_millis();
    let first = dataset(31, 1_500, now);
    produce(&broker.bootstrap(), &topic, &first).await;
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    let mut want = ExpectedChannels::new();
    add_channel_rollup(&mut want, &first, mapping(before));
    assert_eq!(serving_channel_rollup(&db).await, want, "before the change");

    // The file changes; tally reads it again within the reload interval.
    write_videos(&videos, after);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&env.log)
        .unwrap_or_default()
        .contains("dimension table reloaded")
    {
        assert!(Instant::now() < deadline, "no reload: {}", tally.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = dataset(32, 1_500, now);
    produce(&broker.bootstrap(), &topic, &second).await;
    let end = broker.end_offsets(&topic, 2);
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    add_channel_rollup(&mut want, &second, mapping(after));
    assert_eq!(
        serving_channel_rollup(&db).await,
        want,
        "each batch with its version"
    );
    let (_, metrics) = http(env.api, "GET", "/metrics", None, b"");
    assert!(
        metrics.contains("tally_dimension_reloads_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_dimension_rows{dimension=\"videos\"} 35\n"),
        "{metrics}"
    );
    assert!(tally.stop().success());

    // A backfill recomputes every window with the table as it is now.
    let day = 86_400_000;
    let (from, to) = (
        rfc3339(now - now.rem_euclid(day) - day),
        rfc3339(now - now.rem_euclid(day) + day),
    );
    let out = tally_command()
        .args([
            "backfill",
            "--from",
            &from,
            "--to",
            &to,
            "--rollup",
            "hour_channel_events",
        ])
        .envs(env.vars.iter().cloned())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tally backfill: {text}");
    let mut now_all = ExpectedChannels::new();
    add_channel_rollup(&mut now_all, &first, mapping(after));
    add_channel_rollup(&mut now_all, &second, mapping(after));
    assert_ne!(now_all, want);
    assert_eq!(
        serving_channel_rollup(&db).await,
        now_all,
        "backfilled with the new table"
    );
}
