//! `tally backfill` while `tally run` is live: events stream in, backfills
//! over the same windows run again and again, and in the end every rollup row
//! equals the exact computation (nothing lost, nothing counted twice).

use std::time::Duration;

use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_during_live_ingest_stays_exact() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("bf");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let messages = dataset(31, 8_000, now);
    let data = dir.path().join("data");
    let mut env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    env.set("TALLY__BATCH__LINGER", "100ms");
    env.set("TALLY__BATCH__MAX_ROWS", "500");
    let mut tally = Tally::start(&env);

    let producer = produce_in_background(
        &broker.bootstrap(),
        &topic,
        &messages,
        800,
        Duration::from_millis(700),
    );
    let day = 86_400_000;
    let (from, to) = (
        rfc3339(now - now.rem_euclid(day) - day),
        rfc3339(now - now.rem_euclid(day) + day),
    );
    let mut runs = 0;
    let mut caught_up = 0;
    while !producer.is_finished() || runs < 3 {
        let out = std::process::Command::new(tally_bin())
            .args(["backfill", "--from", &from, "--to", &to])
            .envs(env.vars.iter().cloned())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        if !text.contains("(+0 committed during the backfill)") {
            caught_up += 1;
        }
        runs += 1;
    }
    producer.await.unwrap();
    let end = broker.end_offsets(&topic, 2);
    wait_committed(
        &data.join("serving.db"),
        &topic,
        &end,
        Duration::from_secs(120),
        &mut tally,
    )
    .await;
    assert!(tally.stop().success());
    eprintln!(
        "{runs} backfills during ingest; {caught_up} merged batches committed while they ran"
    );
    assert!(runs >= 3);
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
}
