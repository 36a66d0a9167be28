//! `.env` quoting: every value `render_env` writes reads back as it was,
//! by the reading compose does of the three forms it writes (plain, single
//! quotes: literal, double quotes: `\\`, `\"`, `\n`, `\r` escaped), and no
//! value can end its line early or set another variable. What it leaves
//! out is exactly what validation refuses. And a sample of 64 values goes
//! through the real `docker-compose config`, which must print each one
//! unchanged (as a compose file writes it: `$` as `$$`).

use std::collections::BTreeMap;
use std::process::Command;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::{env_value_problem, render_env};
use crate::compose::cli::is_reserved_env;

/// Values with what quoting is about: spaces, both quotes, `#`, `=`, `$`,
/// backslashes, line breaks, unicode.
fn value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-zA-Z0-9]{1,4}",
            4 => prop::sample::select(vec![
                " ", "  ", "'", "\"", "#", " #", "=", "$", "$$", "$X", "\\", "\\n", "\n", "\r",
                "\t", "${", "}", "é", "日本", "🦀", "`", "!", "*", ";", "&", "|", "-", "_", ".",
                "/", ":", "@", ",", "+", "%", "~",
            ])
            .prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

/// One `.env` line as compose reads the forms `render_env` writes; `None`
/// for anything else.
fn read_line(line: &str) -> Option<(String, String)> {
    let (key, raw) = line.split_once('=')?;
    let value = if let Some(inner) = raw.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'')?;
        if inner.contains('\'') {
            return None;
        }
        inner.to_string()
    } else if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    _ => return None,
                },
                '"' => return None,
                c => out.push(c),
            }
        }
        out
    } else {
        if !raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+%".contains(c))
        {
            return None;
        }
        raw.to_string()
    };
    Some((key.to_string(), value))
}

fn read_env(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = read_line(line).ok_or_else(|| format!("unreadable line {line:?}"))?;
        if env.insert(key.clone(), value).is_some() {
            return Err(format!("{key} set twice"));
        }
    }
    Ok(env)
}

/// Whether `value` reaches `.env` (and so compose).
fn written(name: &str, value: &str) -> bool {
    !is_reserved_env(name) && env_value_problem(value).is_none() && !value.contains('\0')
}

proptest! {
    #[test]
    fn env_values_read_back_as_written_and_what_is_left_out_is_refused(
        env in prop::collection::btree_map(
            prop_oneof![
                4 => "V_[A-Z0-9_]{0,6}",
                1 => prop::sample::select(vec!["PATH", "LD_PRELOAD", "COMPOSE_FILE", "DOCKER_HOST"])
                    .prop_map(String::from),
            ],
            value(),
            0..6,
        )
    ) {
        let text = render_env(&env);
        let read = read_env(&text).map_err(|e| TestCaseError::fail(format!("{e} in:\n{text}")))?;
        let expected: BTreeMap<String, String> = env
            .iter()
            .filter(|(k, v)| written(k, v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(read, expected, "{}", text);
    }
}

/// 64 values `render_env` writes (seeded, so every run checks the same).
fn sample() -> Vec<String> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut values = Vec::new();
    let strategy = value();
    while values.len() < 64 {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let value = tree.current();
        if written("V", &value) && !value.is_empty() {
            values.push(value);
        }
    }
    values
}

#[test]
fn docker_compose_config_reads_every_env_value_as_written() {
    const TEST: &str = "docker_compose_config_reads_every_env_value_as_written";
    let values = sample();
    let env: BTreeMap<String, String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("V{i:02}"), v.clone()))
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    std::fs::write(dir.path().join(".env"), render_env(&env)).expect("write .env");
    let mut compose = String::from("services:\n  s:\n    image: busybox\n    environment:\n");
    for name in env.keys() {
        compose.push_str(&format!("      {name}: ${{{name}}}\n"));
    }
    std::fs::write(dir.path().join("docker-compose.yml"), compose).expect("write compose file");
    let output = match Command::new("docker-compose")
        .arg("config")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .output()
    {
        Ok(output) => output,
        Err(error) => return persys_test_support::skip(TEST, "docker-compose", &error),
    };
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(&output.stdout).expect("docker-compose config prints YAML");
    let printed = &config["services"]["s"]["environment"];
    for (name, value) in &env {
        // `config` prints a compose file, where a `$` is written `$$`.
        let read = printed[name.as_str()]
            .as_str()
            .map(|v| v.replace("$$", "$"));
        assert_eq!(
            read.as_deref(),
            Some(value.as_str()),
            "{name} ({value:?}) as docker-compose read it from:\n{}",
            render_env(&env)
        );
    }
}
