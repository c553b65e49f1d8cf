//! The documents show only commands, flags and config keys that exist: every `tally …` command line
//! in README.md, ARCHITECTURE.md, tests/README.md and docs/*.md runs with `--help` and lists each
//! flag the line shows, and every config key shown (`section.key` in code, or a
//! `TALLY__SECTION__KEY` variable) is a key of the embedded defaults, configs/default.toml.

use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;
use tally_tests::{tally_command, workspace_root};

/// Sections of the config file; a dotted word in code starting with one of them is a key.
const SECTIONS: &str = "kafka|batch|decode|schema|sql|storage|serving|verify|api|report";
/// Dotted words in code that are file names, not keys.
const NOT_KEYS: &[&str] = &["serving.db"];

fn documents() -> Vec<(String, String)> {
    let root = workspace_root();
    let mut paths = vec![
        root.join("README.md"),
        root.join("ARCHITECTURE.md"),
        root.join("tests/README.md"),
    ];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let name = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            (name, text)
        })
        .collect()
}

/// Every `tally …` command line (the part after `tally `) with where it was shown, and every key.
fn shown(docs: &[(String, String)]) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let inline = Regex::new(r"`(?:target/(?:debug|release)/)?tally ([^`]+)`").unwrap();
    let block = Regex::new(r"^(?:target/(?:debug|release)/)?tally (.*)$").unwrap();
    let key = Regex::new(&format!(r"`((?:{SECTIONS})\.[a-z_]+)")).unwrap();
    let env = Regex::new(r"TALLY__([A-Z]+)__([A-Z]+(?:_[A-Z]+)*)").unwrap();
    let (mut commands, mut keys) = (BTreeMap::new(), BTreeMap::new());
    for (name, text) in docs {
        let mut in_block = false;
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
                continue;
            }
            if in_block {
                if let Some(c) = block.captures(line.trim()) {
                    let cmd = c[1].split(" #").next().unwrap_or("").trim().to_string();
                    commands.entry(cmd).or_insert(at.clone());
                }
            }
            for c in inline.captures_iter(line) {
                commands.entry(c[1].to_string()).or_insert(at.clone());
            }
            for c in key.captures_iter(line) {
                if !NOT_KEYS.contains(&&c[1]) {
                    keys.entry(c[1].to_string()).or_insert(at.clone());
                }
            }
            for c in env.captures_iter(line) {
                if &c[1] == "SECTION" {
                    continue; // the placeholder in `TALLY__SECTION__KEY`
                }
                let k = format!("{}.{}", c[1].to_lowercase(), c[2].to_lowercase());
                keys.entry(k).or_insert(at.clone());
            }
        }
    }
    (commands, keys)
}

/// `tally <path> --help`, or the reason it failed.
fn help(path: &[&str]) -> Result<String, String> {
    let out = tally_command()
        .args(path)
        .arg("--help")
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The keys that configs/default.toml does not have, each with where it was shown.
fn unknown_keys(keys: &BTreeMap<String, String>) -> Vec<String> {
    let defaults: toml::Table =
        std::fs::read_to_string(workspace_root().join("configs/default.toml"))
            .unwrap()
            .parse()
            .expect("configs/default.toml parses");
    let mut problems = Vec::new();
    for (k, at) in keys {
        let (section, rest) = k.split_once('.').unwrap_or((k, ""));
        // A map such as kafka.properties takes any name below it.
        let name = rest.split("__").next().unwrap_or(rest);
        let found = defaults
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|s| s.contains_key(name));
        if !found {
            problems.push(format!(
                "{at}: config key `{k}` is not in configs/default.toml"
            ));
        }
    }
    problems
}

#[test]
fn every_documented_command_flag_and_config_key_exists() {
    let docs = documents();
    assert!(
        docs.len() >= 10,
        "README, ARCHITECTURE, tests and the guides"
    );
    let (commands, keys) = shown(&docs);
    let word = Regex::new(r"^[a-z][a-z-]*(\|[a-z][a-z-]*)*$").unwrap();
    let mut problems = Vec::new();
    let mut helps: BTreeMap<Vec<String>, Result<String, String>> = BTreeMap::new();
    let mut checked = 0;
    for (cmd, at) in &commands {
        let tokens: Vec<&str> = cmd.split_whitespace().collect();
        let path: Vec<&str> = tokens
            .iter()
            .take_while(|t| word.is_match(t))
            .copied()
            .collect();
        if path.is_empty() {
            continue; // `tally …`: a placeholder, not a command line
        }
        // `offsets show|reset`: each alternative is a command; a flag must be in one of them.
        let (head, last) = path.split_at(path.len() - 1);
        let mut texts = Vec::new();
        for alt in last[0].split('|') {
            let full: Vec<String> = head
                .iter()
                .map(|s| s.to_string())
                .chain([alt.to_string()])
                .collect();
            let h = helps
                .entry(full.clone())
                .or_insert_with(|| help(&full.iter().map(String::as_str).collect::<Vec<_>>()));
            match h {
                Ok(text) => texts.push(text.clone()),
                Err(e) => problems.push(format!(
                    "{at}: `tally {}` does not exist: {e}",
                    full.join(" ")
                )),
            }
        }
        for flag in tokens.iter().filter_map(|t| {
            let t = t.trim_start_matches('[');
            t.starts_with("--").then(|| {
                t.split(['=', ']'])
                    .next()
                    .unwrap_or(t)
                    .trim_end_matches(',')
                    .to_string()
            })
        }) {
            if flag == "--help" || texts.is_empty() {
                continue;
            }
            let listed = texts.iter().any(|h| {
                h.lines().any(|l| {
                    l.split([' ', ',', '\t'])
                        .any(|w| w == flag || w.starts_with(&format!("{flag}=")))
                })
            });
            if !listed {
                problems.push(format!(
                    "{at}: `tally {}` has no flag {flag}",
                    path.join(" ")
                ));
            }
        }
        checked += 1;
    }
    assert!(checked >= 20, "the docs show the commands: {commands:?}");

    problems.extend(unknown_keys(&keys));
    assert!(keys.len() >= 30, "the docs show the keys: {keys:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself finds what it must: a command, a flag and a key that do not exist.
#[test]
fn the_documentation_check_finds_missing_commands_flags_and_keys() {
    let docs = vec![(
        "x.md".to_string(),
        "Run `tally config show`, `tally run --frobnicate`, set `kafka.no_such_key` or\n\
         `TALLY__KAFKA__PROPERTIES__BOOTSTRAP_SERVERS`.\n```sh\ntally check   # fine\n```\n"
            .to_string(),
    )];
    let (commands, keys) = shown(&docs);
    assert_eq!(
        commands.keys().cloned().collect::<BTreeSet<_>>(),
        ["check", "config show", "run --frobnicate"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        keys.keys().cloned().collect::<BTreeSet<_>>(),
        ["kafka.no_such_key", "kafka.properties"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        unknown_keys(&keys),
        ["x.md:1: config key `kafka.no_such_key` is not in configs/default.toml"]
    );
    assert!(help(&["config"]).is_err(), "no `tally config` command");
    let run = help(&["run"]).expect("tally run --help");
    assert!(run.contains("--config") && !run.contains("--frobnicate"));
}
