//! `deploy/`: the Prometheus alerting rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), and every metric the rules and
//! the Grafana dashboard reference is one tally exports (checked against a
//! live `/metrics` by the API test, [`assert_exported`]).

use std::collections::BTreeSet;
use std::process::Command;

use tally_tests::*;

/// promtool: `$TALLY_TEST_PROMTOOL`, else what `scripts/promtool.sh` finds
/// or unpacks.
fn promtool() -> String {
    if let Some(p) = std::env::var("TALLY_TEST_PROMTOOL")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return p;
    }
    let out = Command::new(workspace_root().join("scripts/promtool.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/promtool.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn alerting_rules_pass_promtool_and_their_unit_tests() {
    let promtool = promtool();
    let dir = workspace_root().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        assert!(text.contains("SUCCESS"), "{text}");
    }
}

/// Metric names in the rules and the dashboard (histogram series reduced to
/// their family), besides Prometheus's own `up`.
pub(crate) fn referenced() -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b((?:tally|process)_[a-z_]+)").unwrap();
    let mut names = BTreeSet::new();
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/tally.json"] {
        let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
        for c in re.captures_iter(&text) {
            let n = &c[1];
            let n = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            names.insert(n.to_string());
        }
    }
    names
}

/// Every metric the deploy files reference is a family in `metrics` (a
/// `/metrics` scrape).
pub(crate) fn assert_exported(metrics: &str) {
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let referenced = referenced();
    assert!(referenced.len() > 20, "{referenced:?}");
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ references metrics tally does not export: {missing:?}"
    );
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let text = std::fs::read_to_string(workspace_root().join("deploy/grafana/tally.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 15);
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "{p}"
        );
    }
    assert!(referenced().contains("tally_ready"));
}
