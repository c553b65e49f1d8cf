use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_and_validate() {
    let s = Settings::defaults().unwrap();
    assert_eq!(s.kafka.topic, "events");
    assert_eq!(s.batch.linger, Duration::from_millis(500));
    assert_eq!(s.decode.max_event_bytes, ByteSize(64 * 1024));
    assert_eq!(s.decode.max_future_skew, Duration::from_secs(300));
    assert_eq!(s.serving_url(), "sqlite://data/serving.db");
    assert_eq!(s.api.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn every_shipped_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Settings::load(Some(&path), std::iter::empty())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn env_overrides_file_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[kafka]\ntopic = \"from_file\"\n[batch]\nmax_rows = 5\n",
    )
    .unwrap();
    let s = Settings::load(
        Some(&file),
        env(&[
            ("TALLY__KAFKA__TOPIC", "from_env"),
            (
                "TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS",
                "10.0.0.1:9092",
            ),
            ("TALLY__BATCH__LINGER", "250ms"),
            ("OTHER", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(s.kafka.topic, "from_env");
    assert_eq!(s.batch.max_rows, 5);
    assert_eq!(s.batch.linger, Duration::from_millis(250));
    assert_eq!(
        s.kafka
            .properties
            .get("bootstrap.servers")
            .unwrap()
            .to_string(),
        "10.0.0.1:9092"
    );
}

#[test]
fn unknown_key_in_file_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[batch]\nmax_rowz = 5\n").unwrap();
    let err = Settings::load(Some(&file), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("max_rowz"), "{err}");
    assert!(err.contains("remove or rename"), "{err}");
}

#[test]
fn unknown_env_key_names_variable() {
    let err = Settings::load(None, env(&[("TALLY__STORAGE__DATADIR", "x")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TALLY__STORAGE__DATADIR"), "{err}");
    assert!(err.contains("datadir"), "{err}");
}

#[test]
fn bad_value_names_dotted_key() {
    let err = Settings::load(None, env(&[("TALLY__BATCH__MAX_BYTES", "lots")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch.max_bytes"), "{err}");
    let err = Settings::load(None, env(&[("TALLY__STORAGE__ZSTD_LEVEL", "99")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("storage.zstd_level"), "{err}");
    let err = Settings::load(
        None,
        env(&[("TALLY__KAFKA__PROPERTIES__ENABLE_AUTO_COMMIT", "true")]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("enable.auto.commit"), "{err}");
}

#[test]
fn byte_sizes() {
    assert_eq!(ByteSize::parse("64KiB"), Some(ByteSize(65536)));
    assert_eq!(ByteSize::parse("1MB"), Some(ByteSize(1_000_000)));
    assert_eq!(ByteSize::parse("12"), Some(ByteSize(12)));
    assert_eq!(ByteSize::parse("12 parsecs"), None);
}

#[test]
fn masks_secrets() {
    let s = Settings::load(
        None,
        env(&[
            ("TALLY__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("TALLY__SERVING__URL", "postgres://u:pw@h/db"),
        ]),
    )
    .unwrap();
    let t = s.to_masked_toml();
    assert!(!t.contains("hunter2") && !t.contains(":pw@"), "{t}");
}

#[test]
fn the_extra_column_name_is_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schema.toml");
    std::fs::write(
        &file,
        "[schema]\ntime_field = \"t\"\n[[schema.fields]]\nname = \"t\"\ntype = \"timestamp\"\nrequired = true\n[[schema.fields]]\nname = \"_extra\"\ntype = \"string\"\n",
    )
    .unwrap();
    let err = Settings::load(Some(&file), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema.fields[1].name"), "{err}");
    assert!(err.contains("undeclared fields"), "{err}");
}
