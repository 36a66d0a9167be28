//! The compose policy against random compose files whose verdict under the
//! default policy is known ([`persys_test_support::compose`]): a file is
//! refused exactly when it asks for something the policy keeps closed, and
//! the refusal names one of the keys that do. Files with random edits, and
//! random spec variables, are answered without a panic, and every refusal
//! names a field: `spec.compose.…`, and for the file, a path that starts at
//! one of its top-level keys.

use std::collections::BTreeMap;

use persys_api::v1::ComposeSpec;
use persys_test_support::compose::{ComposeFile, YAML_SYNTAX, compose_file};
use persys_test_support::mutate::{apply_text, edits};
use proptest::prelude::*;
use serde_yaml_ng::Value;

use super::super::{ComposeEnvironment, validate_compose_spec};
use super::{ComposeRules, check_compose_policy, key_text};
use crate::docker::HostPathPolicy;
use crate::policy::NodePolicy;
use crate::spec::SpecError;

const FILE: &str = "spec.compose.compose_yaml";

/// A spec variable and whether validation or the policy refuses it.
fn variable() -> impl Strategy<Value = (String, String, bool)> {
    prop_oneof![
        // Not a name compose or its processes read.
        3 => ("V_[A-Z0-9_]{0,6}", "[a-z0-9 ./:=#'\"-]{0,12}").prop_map(|(k, v)| (k, v, false)),
        1 => prop::sample::select(vec![
            ("PATH", "/tmp/x", true),
            ("LD_PRELOAD", "/tmp/evil.so", true),
            ("COMPOSE_FILE", "/etc/x.yml", true),
            ("DOCKER_HOST", "tcp://x", true),
            ("COMPOSE_PROFILES", "debug", false),
            ("A", "${HOME}", true),
            ("B", "it's $HOME", true),
            ("C", "pa$$word", false),
            ("1X", "v", true),
            ("D", "nul\0byte", true),
        ])
        .prop_map(|(k, v, refused)| (k.to_string(), v.to_string(), refused)),
    ]
}

fn spec(text: &str, env: BTreeMap<String, String>) -> ComposeSpec {
    ComposeSpec {
        project_name: String::new(),
        compose_yaml: text.to_string(),
        env,
        ..ComposeSpec::default()
    }
}

/// Validation, then the policy with its defaults, as the API server runs
/// them.
fn judge(spec: &ComposeSpec) -> Result<Value, SpecError> {
    let valid = validate_compose_spec(spec)?;
    let environment = ComposeEnvironment::new(Vec::new(), "unix:///var/run/docker.sock");
    let vars = environment.interpolation(&spec.env, "proptest");
    let policy = NodePolicy::default();
    let host_paths = HostPathPolicy::default();
    let rules = ComposeRules {
        policy: &policy,
        host_paths: &host_paths,
        vars: &vars,
    };
    check_compose_policy(spec, &valid.document, &rules)?;
    Ok(valid.document)
}

/// The key path a refusal of the file starts with (`services.web.cap_add`).
fn named_path(error: &SpecError) -> &str {
    error.message.split(": ").next().unwrap_or_default()
}

/// Whether `path` is `expected` or lies under it.
fn names(path: &str, expected: &str) -> bool {
    path == expected
        || path.starts_with(&format!("{expected}."))
        || path.starts_with(&format!("{expected}["))
}

proptest! {
    #[test]
    fn compose_files_are_refused_exactly_when_they_ask_for_what_the_policy_keeps_closed(
        file in compose_file(),
        variables in prop::collection::vec(variable(), 0..3),
    ) {
        let ComposeFile { text, refused } = file;
        let mut env = BTreeMap::new();
        let mut refused_env = Vec::new();
        for (name, value, refused) in variables {
            if refused {
                refused_env.push(format!("spec.compose.env[{name:?}]"));
            }
            env.insert(name, value);
        }
        // A name given twice keeps its last value: judge by what is kept.
        refused_env.retain(|field| env.keys().any(|k| *field == format!("spec.compose.env[{k:?}]")));
        match judge(&spec(&text, env.clone())) {
            Ok(_) => {
                prop_assert!(refused_env.is_empty(), "variables {:?} passed", env);
                prop_assert!(refused.is_empty(), "passed, but should refuse {:?}:\n{}", refused, text);
            }
            Err(error) if error.field == FILE => {
                prop_assert!(refused_env.is_empty(), "the file was judged before the variables {:?}: {}", refused_env, error);
                let path = named_path(&error);
                prop_assert!(
                    refused.iter().any(|r| names(path, r)),
                    "refused {}, expected one of {:?}: {}\n{}", path, refused, error, text
                );
            }
            Err(error) => {
                prop_assert!(
                    refused_env.contains(&error.field),
                    "refused {}, expected one of {:?}: {}", error.field, refused_env, error
                );
            }
        }
    }

    #[test]
    fn an_edited_compose_file_is_judged_without_a_panic_and_a_refusal_names_its_key(
        file in compose_file(),
        edits in edits(YAML_SYNTAX, 6),
        base64 in any::<bool>(),
    ) {
        let mut text = apply_text(&file.text, &edits);
        if base64 {
            use base64::Engine;
            text = base64::engine::general_purpose::STANDARD.encode(text);
        }
        let spec = spec(&text, BTreeMap::new());
        match validate_compose_spec(&spec) {
            Err(error) => prop_assert_eq!(&error.field, FILE, "{}", error),
            Ok(valid) => {
                if let Err(error) = judge(&spec) {
                    prop_assert_eq!(&error.field, FILE, "{}", error);
                    let path = named_path(&error);
                    let keys: Vec<String> = match &valid.document {
                        Value::Mapping(mapping) => mapping.keys().map(key_text).collect(),
                        _ => Vec::new(),
                    };
                    // A key may hold '.' or '[' itself: match whole keys.
                    prop_assert!(
                        keys.iter().any(|k| !k.is_empty() && names(path, k)),
                        "the refusal names {:?}, not a key of the file ({:?}): {}", path, keys, error
                    );
                }
            }
        }
    }
}
