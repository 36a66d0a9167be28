//! The node's workload policy as the agent loads it: `PERSYS_POLICY_FILE`
//! (else the secure default), then the environment's overrides, checked
//! once at start. A bad file or override stops the agent with exit status
//! 2, naming file:line or the variable. The rules themselves, and what
//! each switch opens, are in [`persys_controllers::policy`].

use std::path::{Path, PathBuf};

use persys_controllers::docker::HostPathPolicy;
use persys_controllers::policy::NodePolicy;
use serde_yaml_ng::Value;

use crate::config::Config;

/// A policy file or override that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyFileError(String);

/// Largest policy file read: a policy is a page of switches.
const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;

/// The policy in force: the file (or the default) with the environment's
/// overrides, checked.
pub fn load(config: &Config) -> Result<NodePolicy, PolicyFileError> {
    let (mut policy, text) = match &config.policy_file {
        Some(path) => {
            let text = read_file(path)?;
            (parse(&text, &path.display().to_string())?, Some(text))
        }
        None => (NodePolicy::default(), None),
    };
    let overridden = apply_overrides(&mut policy, config)?;
    policy.check().map_err(|(key, message)| {
        let origin = match overridden.iter().find(|(k, _)| *k == key) {
            Some((_, variable)) => variable.to_string(),
            None => match (&config.policy_file, &text) {
                (Some(path), Some(text)) => match key_line(text, &key) {
                    Some(line) => format!("{}:{line}", path.display()),
                    None => path.display().to_string(),
                },
                _ => "the default policy".to_string(),
            },
        };
        PolicyFileError(format!("{origin}: {key}: {message}"))
    })?;
    Ok(policy)
}

fn read_file(path: &Path) -> Result<String, PolicyFileError> {
    use std::io::Read;
    let fail = |e: std::io::Error| PolicyFileError(format!("{}: {e}", path.display()));
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(fail)?
        .take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(PolicyFileError(format!(
            "{}: larger than {MAX_POLICY_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Ok(text)
}

/// Parses a policy file; errors lead with `source:line:column`, as the
/// authorization policy's do. Keys left out keep their defaults.
fn parse(text: &str, source: &str) -> Result<NodePolicy, PolicyFileError> {
    if text.trim().is_empty() {
        return Ok(NodePolicy::default());
    }
    serde_yaml_ng::from_str(text).map_err(|error| {
        let message = error.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        match error.location() {
            Some(at) => {
                PolicyFileError(format!("{source}:{}:{}: {message}", at.line(), at.column()))
            }
            None => PolicyFileError(format!("{source}: {message}")),
        }
    })
}

/// The line where `key` (dotted, `vm.bridges`) is written: each part
/// searched for after the previous one.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    for part in key.split('.') {
        let needle = format!("{part}:");
        let found = text[from..].match_indices(&needle).find(|(at, _)| {
            let before = text[..from + at].chars().last();
            before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        })?;
        from += found.0 + needle.len();
    }
    Some(text[..from].lines().count())
}

/// Applies the environment's overrides; answers which keys they set and
/// from which variable, for messages.
fn apply_overrides(
    policy: &mut NodePolicy,
    config: &Config,
) -> Result<Vec<(&'static str, &'static str)>, PolicyFileError> {
    let flag = |value: Option<bool>| value.map(Value::Bool);
    let number = |value: Option<u64>| value.map(|n| Value::Number(n.into()));
    let list = |value: Option<Vec<String>>| {
        value.map(|items| {
            let kept = items.into_iter().map(|v| v.trim().to_string());
            Value::Sequence(kept.filter(|v| !v.is_empty()).map(Value::String).collect())
        })
    };
    let roots = config.allowed_host_paths.as_ref().map(|roots| {
        let roots = roots.iter().map(|r| r.display().to_string());
        roots.collect::<Vec<_>>()
    });
    let overrides = [
        (
            "host_paths.allowed_roots",
            "PERSYS_ALLOWED_HOST_PATHS",
            list(roots),
        ),
        (
            "containers.privileged",
            "PERSYS_POLICY_PRIVILEGED",
            flag(config.policy_privileged),
        ),
        (
            "containers.host_network",
            "PERSYS_POLICY_HOST_NETWORK",
            flag(config.policy_host_network),
        ),
        (
            "containers.devices",
            "PERSYS_POLICY_DEVICES",
            flag(config.policy_devices),
        ),
        (
            "containers.capabilities",
            "PERSYS_POLICY_CAPABILITIES",
            list(config.policy_capabilities.clone()),
        ),
        (
            "compose.build",
            "PERSYS_POLICY_COMPOSE_BUILD",
            flag(config.policy_compose_build),
        ),
        (
            "vm.networks",
            "PERSYS_POLICY_VM_NETWORKS",
            list(config.policy_vm_networks.clone()),
        ),
        (
            "vm.bridges",
            "PERSYS_POLICY_VM_BRIDGES",
            list(config.policy_vm_bridges.clone()),
        ),
        (
            "ceilings.node.workloads",
            "PERSYS_POLICY_MAX_WORKLOADS",
            number(config.policy_max_workloads),
        ),
        (
            "ceilings.node.vcpus",
            "PERSYS_POLICY_NODE_VCPUS",
            number(config.policy_node_vcpus),
        ),
        (
            "ceilings.node.memory_mib",
            "PERSYS_POLICY_NODE_MEMORY_MIB",
            number(config.policy_node_memory_mib),
        ),
        (
            "ceilings.node.disk_gib",
            "PERSYS_POLICY_NODE_DISK_GIB",
            number(config.policy_node_disk_gib),
        ),
    ];
    let failed = |e: serde_yaml_ng::Error| PolicyFileError(format!("environment overrides: {e}"));
    let mut tree = serde_yaml_ng::to_value(&*policy).map_err(failed)?;
    let mut set = Vec::new();
    for (key, variable, value) in overrides {
        let Some(value) = value else { continue };
        let mut node = &mut tree;
        for part in key.split('.') {
            node = &mut node[part];
        }
        *node = value;
        set.push((key, variable));
    }
    *policy = serde_yaml_ng::from_value(tree).map_err(failed)?;
    Ok(set)
}

/// The policy as `persys-agent policy show` prints it.
pub fn show(policy: &NodePolicy, config: &Config) -> String {
    let source = match &config.policy_file {
        Some(path) => path.display().to_string(),
        None => "the default policy".to_string(),
    };
    let yaml = serde_yaml_ng::to_string(policy).unwrap_or_else(|e| format!("# {e}\n"));
    format!("# the workload policy in force: {source}, with the environment's overrides\n{yaml}")
}

/// Which host paths workloads may bind-mount: the policy's roots, never
/// the agent's own files (state, keys, certificates, policies) nor the
/// Docker socket, wherever DOCKER_HOST points.
pub fn host_path_policy(config: &Config, policy: &NodePolicy) -> HostPathPolicy {
    let mut own: Vec<PathBuf> = vec![
        config.state_key_file(),
        config.tls_key.clone(),
        config.tls_cert.clone(),
        config.tls_ca.clone(),
        PathBuf::from("/var/run/docker.sock"),
        PathBuf::from("/run/docker.sock"),
    ];
    own.extend(config.policy_file.iter().cloned());
    own.extend(config.authz_file.iter().cloned());
    own.extend(config.scheduler_tls_key.iter().cloned());
    if let Some(socket) = config.docker_host.strip_prefix("unix://") {
        own.push(PathBuf::from(socket));
    }
    HostPathPolicy::new(
        Some(&config.state_path),
        policy.host_paths.allowed_roots.clone(),
    )
    .forbidding(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["persys-agent"];
        all.extend(args);
        Config::try_parse_from_iter(all).unwrap()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn without_a_file_or_overrides_the_default_is_in_force() {
        assert_eq!(load(&config(&[])).unwrap(), NodePolicy::default());
    }

    #[test]
    fn a_file_opens_what_it_names_and_keeps_the_other_defaults() {
        let (_dir, path) = file(
            "host_paths:\n  allowed_roots: [/srv/data]\ncontainers:\n  privileged: true\n  capabilities: [NET_ADMIN]\nvm:\n  bridges: [br0]\nceilings:\n  node: {memory_mib: 4096}\n",
        );
        let policy = load(&config(&["--policy-file", path.to_str().unwrap()])).unwrap();
        assert_eq!(
            policy.host_paths.allowed_roots,
            [PathBuf::from("/srv/data")]
        );
        assert!(policy.containers.privileged);
        assert!(!policy.containers.host_network);
        assert!(policy.allows_capability("NET_ADMIN"));
        assert_eq!(policy.vm.networks, ["default"]);
        assert_eq!(policy.vm.bridges, ["br0"]);
        assert_eq!(policy.ceilings.node.memory_mib, 4096);
        assert_eq!(
            policy.ceilings.node.workloads,
            NodePolicy::default().ceilings.node.workloads
        );
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let (_dir, path) = file("compose:\n  build: true\nvm:\n  networks: [default, lab]\n");
        let policy = load(&config(&[
            "--policy-file",
            path.to_str().unwrap(),
            "--allowed-host-paths",
            "/srv/a,/srv/b",
            "--policy-compose-build",
            "false",
            "--policy-vm-networks",
            "lab",
            "--policy-max-workloads",
            "7",
            "--policy-privileged",
            "yes",
        ]))
        .unwrap();
        assert_eq!(
            policy.host_paths.allowed_roots,
            [PathBuf::from("/srv/a"), PathBuf::from("/srv/b")]
        );
        assert!(!policy.compose.build);
        assert!(policy.containers.privileged);
        assert_eq!(policy.vm.networks, ["lab"]);
        assert_eq!(policy.ceilings.node.workloads, 7);
    }

    #[test]
    fn a_bad_file_names_the_file_and_line() {
        for (text, line, words) in [
            ("containers:\n  privileged: maybe\n", ":2:", "privileged"),
            ("containers:\n  priviledged: true\n", ":2:", "priviledged"),
            ("vm:\n  bridges: [docker0]\n", ":2", "docker0"),
            ("ceilings:\n  node:\n    workloads: 0\n", ":3", "at least 1"),
            ("host_paths:\n  allowed_roots: [srv]\n", ":2", "absolute"),
            ("hostpaths: {}\n", ":1:", "hostpaths"),
        ] {
            let (_dir, path) = file(text);
            let error = load(&config(&["--policy-file", path.to_str().unwrap()]))
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            let expected = format!("{}{line}", path.display());
            let named = error.starts_with(&expected) && error.contains(words);
            assert!(
                named,
                "{error:?} should start with {expected} and mention {words}"
            );
        }
        let error = load(&config(&["--policy-file", "/nonexistent/policy.yaml"])).unwrap_err();
        assert!(error.to_string().starts_with("/nonexistent/policy.yaml"));
    }

    #[test]
    fn a_bad_override_names_its_variable() {
        let error = load(&config(&["--policy-vm-bridges", "br0,docker0"])).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("PERSYS_POLICY_VM_BRIDGES: vm.bridges"),
            "{error}"
        );
        let error = load(&config(&["--allowed-host-paths", "relative"])).unwrap_err();
        assert!(
            error.to_string().starts_with("PERSYS_ALLOWED_HOST_PATHS"),
            "{error}"
        );
    }

    #[test]
    fn show_prints_yaml_that_loads_back_to_the_same_policy() {
        let config = config(&["--policy-devices", "true"]);
        let policy = load(&config).unwrap();
        let shown = show(&policy, &config);
        assert!(shown.contains("devices: true"), "{shown}");
        assert_eq!(parse(&shown, "shown").unwrap(), policy);
    }

    #[test]
    fn the_agent_s_own_files_and_the_docker_socket_are_never_mountable() {
        let config = config(&[
            "--allowed-host-paths",
            "/",
            "--state-path",
            "/srv/persys/state",
            "--tls-key",
            "/srv/certs/agent.key",
            "--docker-host",
            "unix:///srv/engine/docker.sock",
        ]);
        let paths = host_path_policy(&config, &load(&config).unwrap());
        for refused in [
            "/srv/persys/state/db",
            "/srv/persys/state.key",
            "/srv/certs/agent.key",
            "/srv/engine/docker.sock",
            "/var/run/docker.sock",
            "/run/docker.sock",
        ] {
            assert!(paths.check(refused).is_err(), "{refused}");
        }
        assert!(paths.check("/srv/data").is_ok());
    }
}
