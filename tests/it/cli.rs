//! The binary's startup checks: bad config and bad SQL stop it with a message
//! naming the file, the key and the fix.

use tally_tests::*;

fn tally(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let out = tally_command()
        .args(args)
        .envs(envs.iter().copied())
        .env(
            "TALLY__SQL__ROLLUPS_DIR",
            workspace_root().join("sql/rollups"),
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_prints_derived_rollups() {
    let (ok, out) = tally(&["check"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("rollup hour_video_events"), "{out}");
    assert!(out.contains("window:  window_start = 1h"), "{out}");
    assert!(out.contains("value_min (Real, merge min)"), "{out}");
    assert!(out.contains("window:  window_start = 1m"), "{out}");
}

#[test]
fn api_rollups_are_checked_at_startup() {
    let (ok, out) = tally(&["check"], &[]);
    assert!(
        ok && out
            .contains("day_video_events (1d), hour_video_events (1h), minute_video_events (1m)"),
        "{out}"
    );
    let (ok, out) = tally(
        &["check"],
        &[("TALLY__API__ROLLUPS", "[\"hour_video_events\", \"weekly\"]")],
    );
    assert!(!ok);
    assert!(
        out.contains("api.rollups") && out.contains("no rollup named `weekly`"),
        "{out}"
    );
    // A rollup without the API measures cannot answer queries; the message says what it needs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("thin.sql"),
        "SELECT video_id, event_type, date_bin(INTERVAL '1 hour', event_time) AS window_start, count(*) AS events FROM events GROUP BY video_id, event_type, window_start",
    )
    .unwrap();
    let out = tally_command()
        .arg("check")
        .env("TALLY__SQL__ROLLUPS_DIR", dir.path())
        .env("TALLY__API__ROLLUPS", "[\"thin\"]")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("thin.sql") && text.contains("value_sum") && text.contains("api.rollups"),
        "{text}"
    );
    let (ok, out) = tally(&["check"], &[("TALLY__API__READ_TOKENS", "short")]);
    assert!(
        !ok && out.contains("api.read_tokens") && out.contains("16"),
        "{out}"
    );
    assert!(!out.contains("short\""), "tokens are never echoed: {out}");
}

#[test]
fn unknown_config_key_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prod.toml");
    std::fs::write(&f, "[storage]\ndata_dri = \"x\"\n").unwrap();
    let (ok, out) = tally(&["check", "--config", f.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        out.contains("prod.toml") && out.contains("data_dri") && out.contains("remove or rename"),
        "{out}"
    );
    let (ok, out) = tally(&["check"], &[("TALLY__BATCH__LINGERS", "1s")]);
    assert!(!ok);
    assert!(out.contains("TALLY__BATCH__LINGERS"), "{out}");
}

#[test]
fn unmergeable_sql_is_refused_with_the_fix() {
    let cases = [
        ("avg_rollup.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, avg(value) AS a FROM events GROUP BY video_id, w", "store sum(x) and count(x)"),
        ("distinct_rollup.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, count(DISTINCT user_id) AS u FROM events GROUP BY video_id, w", "DISTINCT"),
        ("no_window.sql", "SELECT video_id, count(*) AS n FROM events GROUP BY video_id", "no time window"),
        ("ratio.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, sum(value) / count(*) AS r FROM events GROUP BY video_id, w", "cannot be merged"),
        ("having.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, count(*) AS n FROM events GROUP BY video_id, w HAVING count(*) > 1", "HAVING"),
        ("typo.sql", "SELECT vidoe_id, count(*) AS n FROM events GROUP BY vidoe_id", "vidoe_id"),
        ("median.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, median(value) AS m FROM events GROUP BY video_id, w", "approx_percentile_cont(value, p)"),
        ("rank_param.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, approx_percentile_cont(value, value) AS m FROM events GROUP BY video_id, w", "literal percentile"),
        ("rank_range.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, approx_percentile_cont(value, 1.5) AS m FROM events GROUP BY video_id, w", "between 0 and 1"),
        ("hour__delta.sql", "SELECT video_id, date_bin(INTERVAL '1 hour', event_time) AS w, count(*) AS n FROM events GROUP BY video_id, w", "no \"__\""),
    ];
    for (file, sql, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file), sql).unwrap();
        let out = tally_command()
            .arg("check")
            .env("TALLY__SQL__ROLLUPS_DIR", dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} accepted");
        assert!(
            text.contains(file),
            "{file}: error does not name the file: {text}"
        );
        assert!(
            text.contains(needle),
            "{file}: expected {needle:?} in {text}"
        );
    }
}

#[test]
fn help_lists_subcommands() {
    let (ok, out) = tally(&["--help"], &[]);
    assert!(ok);
    for s in ["run", "check", "produce", "topic"] {
        assert!(out.contains(s), "{out}");
    }
}

/// `tally-bench drain` (the bare-consumer baseline of `make bench`) reads
/// exactly what an independent producer wrote to a real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drain_reads_every_message() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topic = unique("drain");
    broker.create_topic(&topic, 3).await;
    let messages = dataset(7, 2_500, chrono::Utc::now().timestamp_millis());
    produce(&broker.bootstrap(), &topic, &messages).await;
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let out = std::process::Command::new(tally_bench_bin())
        .args(["--log", "warn", "drain", "--timeout", "60s"])
        .env("TALLY__KAFKA__TOPIC", &topic)
        .env(
            "TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS",
            broker.bootstrap(),
        )
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("{} messages, {bytes} bytes in ", messages.len())),
        "{text}"
    );
}

/// Exit codes tell whose fault a failure is (docs/operations.md, "Exit
/// codes"): 2 for the user's mistake, 3 for an outage, 1 for a "no" answer.
#[test]
fn exit_codes_tell_a_usage_error_from_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let code = |args: &[&str], envs: &[(&str, &str)]| {
        let out = tally_command()
            .args(args)
            .envs(envs.iter().copied())
            .env("TALLY__STORAGE__DATA_DIR", &data)
            .env(
                "TALLY__SQL__ROLLUPS_DIR",
                workspace_root().join("sql/rollups"),
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), text)
    };
    let range = [
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-02T00:00:00Z",
    ];
    // The user's mistakes: a flag clap refuses, an unknown rollup, a bad key.
    let (c, out) = code(&["verify", "--from", "yesterday"], &[]);
    assert_eq!(c, Some(2), "{out}");
    let mut args = vec!["backfill", "--rollup", "no_such_rollup"];
    args.extend(range);
    let (c, out) = code(&args, &[]);
    assert_eq!(c, Some(2), "{out}");
    assert!(
        out.contains("--rollup no_such_rollup: no such rollup"),
        "{out}"
    );
    let (c, out) = code(&["check"], &[("TALLY__KAFKA__NO_SUCH_KEY", "1")]);
    assert_eq!(c, Some(2), "{out}");
    // An outage: the serving store does not answer (nothing listens on port 1).
    let mut args = vec!["verify"];
    args.extend(range);
    let (c, out) = code(
        &args,
        &[(
            "TALLY__SERVING__URL",
            "postgres://tally:secret@127.0.0.1:1/tally",
        )],
    );
    assert_eq!(c, Some(3), "{out}");
    assert!(
        out.contains("serving store") && !out.contains("secret"),
        "{out}"
    );
    // A "no" answer is not an error: verify over an empty store finds no drift.
    let (c, out) = code(&args, &[]);
    assert_eq!(c, Some(0), "{out}");
}

/// Shell completions and the man page come from the CLI itself and need
/// no config (a broken one does not stop them).
#[test]
fn completions_and_the_man_page_list_every_subcommand() {
    let broken = [("TALLY__NOPE__KEY", "1")];
    let subcommands = [
        "run", "serve", "backfill", "verify", "report", "rollup", "dlq",
    ];
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tally"),
        ("fish", "complete -c tally"),
    ] {
        let (ok, out) = tally(&["completions", shell], &broken);
        assert!(ok, "{shell}: {out}");
        assert!(out.contains(marker), "{shell}: {out}");
        for s in subcommands {
            assert!(out.contains(s), "{shell} completes {s}");
        }
    }
    let (ok, out) = tally(&["completions", "tcsh"], &[]);
    assert!(!ok && out.contains("bash"), "{out}");
    let (ok, man) = tally(&["man"], &broken);
    assert!(ok, "{man}");
    assert!(
        man.starts_with(".ie \\n(.g .ds Aq") || man.contains(".TH tally"),
        "{man}"
    );
    for s in subcommands {
        assert!(man.contains(s), "the man page names {s}");
    }
    assert!(
        man.contains("log\\-format"),
        "global flags are in the man page"
    );
}

/// `tally sql` without a query is a shell: one answer per `;`-ended
/// statement (over several lines), an error line for a bad one, `\q` leaves.
#[test]
fn the_sql_shell_answers_each_statement() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tally_command()
        .args(["sql", "--format", "csv"])
        .env("TALLY__STORAGE__DATA_DIR", dir.path())
        .env(
            "TALLY__SQL__ROLLUPS_DIR",
            workspace_root().join("sql/rollups"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT 2 AS two;\nSELECT\n  3 AS three;\nDROP TABLE events;\nSELECT count(*) AS n FROM hour_video_events;\n\\q\nSELECT 4 AS never;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("two\n2\n"), "{stdout}");
    assert!(stdout.contains("three\n3\n"), "{stdout}");
    assert!(stdout.contains("n\n0\n"), "a rollup by name: {stdout}");
    assert!(!stdout.contains("never"), "\\q leaves: {stdout}");
    assert!(stderr.contains("only a SELECT"), "{stderr}");
}
