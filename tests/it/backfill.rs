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
        let out = tally_command()
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

/// Nothing dropped, schema on read: events carry a `country` the schema does
/// not declare. Later the schema declares it and a new rollup groups by it;
/// `tally backfill` fills that rollup's history from the archive, exactly as
/// if `country` had always been declared, and `tally verify` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_declared_later_backfills_its_history() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("late-field");
    broker.create_topic(&topic, 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let countries = ["FR", "DE", "US", "BR"];
    let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
    let messages: Vec<Message> = dataset(47, 3_000, now)
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            if let Expect::Accepted { kind, time_ms, .. } = &m.expect {
                let country = countries[i % countries.len()];
                let text = String::from_utf8(m.payload).unwrap();
                m.payload = text
                    .replacen('{', &format!(r#"{{"country":"{country}","#), 1)
                    .into_bytes();
                let hour = time_ms - time_ms.rem_euclid(3_600_000);
                *expected
                    .entry(format!("{country}/{kind}/{hour}"))
                    .or_default() += 1;
            }
            m
        })
        .collect();
    let data = dir.path().join("data");
    let env = TallyEnv::new(&broker.bootstrap(), &topic, &unique("g"), &data);
    let mut tally = Tally::start(&env);
    produce(&broker.bootstrap(), &topic, &messages).await;
    let end = broker.end_offsets(&topic, 2);
    let db = data.join("serving.db");
    wait_committed(&db, &topic, &end, Duration::from_secs(120), &mut tally).await;
    assert!(tally.stop().success());

    // Declare `country`, add a rollup over it.
    let rollups = dir.path().join("rollups");
    std::fs::create_dir_all(&rollups).unwrap();
    for f in std::fs::read_dir(workspace_root().join("sql/rollups")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, rollups.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        rollups.join("hour_country_events.sql"),
        "SELECT coalesce(country, '') AS country, event_type,\n\
         date_bin(INTERVAL '1 hour', event_time) AS window_start,\n\
         count(*) AS events\nFROM events\nGROUP BY coalesce(country, ''), event_type, window_start\n",
    )
    .unwrap();
    let default = std::fs::read_to_string(workspace_root().join("configs/default.toml")).unwrap();
    let schema_start = default.find("[schema]").unwrap();
    let schema_end = schema_start + default[schema_start..].find("\n[sql]").unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[schema.fields]]\nname = \"country\"\ntype = \"string\"\n",
            &default[schema_start..schema_end]
        ),
    )
    .unwrap();
    let day = 86_400_000;
    let (from, to) = (
        rfc3339(now - now.rem_euclid(day) - day),
        rfc3339(now - now.rem_euclid(day) + day),
    );
    for job in ["backfill", "verify"] {
        let out = tally_command()
            .args([job, "--from", &from, "--to", &to])
            .envs(env.vars.iter().cloned())
            .env("TALLY_CONFIG", &config)
            .env("TALLY__SQL__ROLLUPS_DIR", &rollups)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tally {job}: {text}");
    }
    let got: std::collections::BTreeMap<String, i64> = serving_query_i64(
        &db,
        "SELECT country || '/' || event_type || '/' || CAST(window_start AS TEXT), sum(events) \
         FROM (SELECT * FROM hour_country_events UNION ALL SELECT * FROM hour_country_events__delta) \
         GROUP BY country, event_type, window_start",
    )
    .await
    .into_iter()
    .collect();
    assert_eq!(got, expected);
    // The shipped rollups are untouched by the schema change.
    crate::e2e::verify_outputs(&data, &topic, &messages).await;
}
