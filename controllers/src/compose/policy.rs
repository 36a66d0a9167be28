//! A compose file against the node's workload policy, read as compose
//! reads it (the document [`super::validate_compose_spec`] parsed within
//! bounds, merge keys applied, interpolated from what compose will see). A
//! refusal names `services.<name>.<field>` (or the top-level key) and the
//! rule: the policy switch that would open it, or `always`. The spec's
//! variables are checked too: none may name a setting of compose or of the
//! processes it starts.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use persys_api::v1::ComposeSpec;
use serde_yaml_ng::{Mapping, Value};

use super::binds;
use super::cli::is_reserved_env;
use super::document::{self, key_text};
use super::project::env_value_problem;
use super::restarts;
use crate::docker::HostPathPolicy;
use crate::docker::labels::RESERVED_PREFIX;
use crate::policy::{ALWAYS, NodePolicy, Rule, SAFE_SYSCTLS, refusal};
use crate::spec::SpecError;

const FILE: &str = "spec.compose.compose_yaml";

/// What a compose file is checked against.
pub struct ComposeRules<'a> {
    pub policy: &'a NodePolicy,
    /// Bind sources follow the container rule.
    pub host_paths: &'a HostPathPolicy,
    /// The environment compose interpolates from: its process's, over the
    /// spec's variables in `.env` (see
    /// [`super::ComposeEnvironment::interpolation`]).
    pub vars: &'a BTreeMap<String, String>,
}

/// Refuses a compose spec whose variables or file break the policy.
/// `document` is the file as [`super::validate_compose_spec`] read it: the
/// file is not parsed again. Errors name `spec.compose.env[…]` or
/// `spec.compose.compose_yaml`, and then the key in the file. Answers the
/// file as it passed, interpolated as compose will read it (what
/// [`super::declared_resources`] reads).
pub fn check_compose_policy(
    spec: &ComposeSpec,
    document: &Value,
    rules: &ComposeRules<'_>,
) -> Result<Value, SpecError> {
    if let Some(name) = spec.env.keys().find(|name| is_reserved_env(name)) {
        return Err(SpecError::new(
            format!("spec.compose.env[{name:?}]"),
            refusal(
                "names a setting of compose or of the processes it starts (PATH, HOME, LD_*, DOCKER_*, COMPOSE_* but COMPOSE_PROFILES, BUILDKIT_*, BUILDX_*, proxies, locale); compose reads the spec's variables from .env, where such a name would reach it",
                ALWAYS,
            ),
        ));
    }
    for (name, value) in &spec.env {
        if let Some(why) = env_value_problem(value) {
            return Err(SpecError::new(
                format!("spec.compose.env[{name:?}]"),
                refusal(why, ALWAYS),
            ));
        }
    }
    let mut document = document.clone();
    document::interpolate(&mut document, rules.vars, "").map_err(|why| {
        SpecError::new(
            FILE,
            format!("{why} (compose would fail to interpolate it)"),
        )
    })?;
    // Restart policies the agent applies itself (the engine's is `no`):
    // one compose would not run is refused here rather than at the `up`.
    restarts::restarts_of(&document).map_err(|why| SpecError::new(FILE, why))?;
    Checker { rules }
        .document(&document)
        .map_err(|(key, why)| SpecError::new(FILE, format!("{key}: {why}")))?;
    Ok(document)
}

/// A refusal: the key in the file, and why with the rule.
type Refusal = (String, String);

fn refuse<T>(
    key: impl Into<String>,
    what: impl std::fmt::Display,
    rule: Rule,
) -> Result<T, Refusal> {
    Err((key.into(), refusal(what, rule)))
}

/// The value under a tag (`!override`, `!reset`): checked as if untagged.
pub(super) fn untagged(value: &Value) -> &Value {
    match value {
        Value::Tagged(tagged) => untagged(&tagged.value),
        other => other,
    }
}

pub(super) fn text(value: &Value) -> Option<&str> {
    untagged(value).as_str()
}

/// Whether compose would read `value` as true: anything but false, null,
/// or a string compose reads as false.
fn truthy(value: &Value) -> bool {
    match untagged(value) {
        Value::Bool(b) => *b,
        Value::Null => false,
        Value::String(s) => !matches!(s.trim(), "" | "false" | "False" | "FALSE" | "0" | "no"),
        Value::Number(n) => n.as_i64() != Some(0),
        _ => true,
    }
}

/// A list, or a single value as a list of one.
pub(super) fn items(value: &Value) -> Vec<&Value> {
    match untagged(value) {
        Value::Sequence(items) => items.iter().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

pub(super) fn entries(value: &Value) -> Vec<(String, &Value)> {
    match untagged(value) {
        Value::Mapping(mapping) => mapping.iter().map(|(k, v)| (key_text(k), v)).collect(),
        _ => Vec::new(),
    }
}

struct Checker<'a> {
    rules: &'a ComposeRules<'a>,
}

impl Checker<'_> {
    fn policy(&self) -> &NodePolicy {
        self.rules.policy
    }

    fn document(&self, document: &Value) -> Result<(), Refusal> {
        for (name, service) in entries(&document["services"]) {
            let Value::Mapping(service) = untagged(service) else {
                continue;
            };
            self.service(&format!("services.{name}"), service)?;
        }
        for (index, include) in items(&document["include"]).into_iter().enumerate() {
            let key = format!("include[{index}]");
            match untagged(include) {
                Value::Mapping(long) => {
                    for field in ["path", "project_directory", "env_file"] {
                        if let Some(value) = long.get(field) {
                            for path in items(value) {
                                self.project_file(&format!("{key}.{field}"), path)?;
                            }
                        }
                    }
                }
                path => self.project_file(&key, path)?,
            }
        }
        for (name, volume) in entries(&document["volumes"]) {
            self.top_level_volume(&format!("volumes.{name}"), volume)?;
        }
        for (name, network) in entries(&document["networks"]) {
            let key = format!("networks.{name}");
            self.not_external(&key, network)?;
            if text(&network["driver"]) == Some("host") {
                return refuse(
                    format!("{key}.driver"),
                    "the host network driver puts services in the host's network",
                    "containers.host_network",
                );
            }
        }
        for section in ["secrets", "configs"] {
            for (name, item) in entries(&document[section]) {
                let key = format!("{section}.{name}");
                self.not_external(&key, item)?;
                if let Some(file) = untagged(item).get("file") {
                    self.project_file(&format!("{key}.file"), file)?;
                }
            }
        }
        Ok(())
    }

    fn service(&self, key: &str, service: &Mapping) -> Result<(), Refusal> {
        let policy = self.policy();
        let field = |name: &str| format!("{key}.{name}");
        let get = |name: &str| service.get(name).map(untagged);
        if get("privileged").is_some_and(truthy) && !policy.containers.privileged {
            return refuse(
                field("privileged"),
                "privileged containers are not allowed",
                "containers.privileged",
            );
        }
        for name in ["cgroup_parent", "cgroup"] {
            let host_cgroup =
                name == "cgroup_parent" || get(name).and_then(|v| v.as_str()) == Some("host");
            if get(name).is_some() && host_cgroup && !policy.containers.privileged {
                return refuse(
                    field(name),
                    "placing a container in the host's cgroups is not allowed",
                    "containers.privileged",
                );
            }
        }
        let namespaces: [(&str, Rule, bool); 5] = [
            (
                "network_mode",
                "containers.host_network",
                policy.containers.host_network,
            ),
            (
                "uts",
                "containers.host_network",
                policy.containers.host_network,
            ),
            ("pid", "containers.host_pid", policy.containers.host_pid),
            ("ipc", "containers.host_ipc", policy.containers.host_ipc),
            (
                "userns_mode",
                "containers.host_userns",
                policy.containers.host_userns,
            ),
        ];
        for (name, rule, open) in namespaces {
            let Some(mode) = get(name).and_then(|v| v.as_str()) else {
                continue;
            };
            let mode = mode.trim();
            if (mode == "host" || mode.starts_with("container:")) && !open {
                return refuse(
                    field(name),
                    format_args!(
                        "{mode:?}: the host's or another container's namespace is not allowed"
                    ),
                    rule,
                );
            }
        }
        if !policy.containers.devices {
            for name in ["devices", "device_cgroup_rules", "gpus"] {
                if get(name).is_some_and(|v| !items(v).is_empty()) {
                    return refuse(
                        field(name),
                        "host devices are not allowed",
                        "containers.devices",
                    );
                }
            }
            if let Some(devices) = service
                .get("deploy")
                .map(|d| &d["resources"]["reservations"]["devices"])
                && !items(devices).is_empty()
            {
                return refuse(
                    field("deploy.resources.reservations.devices"),
                    "host devices are not allowed",
                    "containers.devices",
                );
            }
        }
        for capability in get("cap_add").map(items).unwrap_or_default() {
            let name = text(capability).unwrap_or_default();
            if !policy.allows_capability(name) {
                return refuse(
                    field("cap_add"),
                    format_args!("capability {name:?} is not allowed"),
                    "containers.capabilities",
                );
            }
        }
        for option in get("security_opt").map(items).unwrap_or_default() {
            let option = text(option).unwrap_or_default().trim();
            let harmless = matches!(
                option,
                "no-new-privileges" | "no-new-privileges:true" | "no-new-privileges=true"
            );
            if !harmless && !policy.containers.security_opt {
                return refuse(
                    field("security_opt"),
                    format_args!("{option:?} is not allowed (only no-new-privileges is)"),
                    "containers.security_opt",
                );
            }
        }
        if !policy.containers.sysctls {
            let names: Vec<String> = match get("sysctls") {
                Some(Value::Mapping(map)) => map.keys().map(key_text).collect(),
                Some(list) => items(list)
                    .into_iter()
                    .filter_map(text)
                    .map(|s| s.split('=').next().unwrap_or(s).trim().to_string())
                    .collect(),
                None => Vec::new(),
            };
            if let Some(name) = names.iter().find(|n| !SAFE_SYSCTLS.contains(&n.as_str())) {
                return refuse(
                    field("sysctls"),
                    format_args!("sysctl {name:?} is not in the safe set"),
                    "containers.sysctls",
                );
            }
        }
        let label_names: Vec<String> = match get("labels") {
            Some(Value::Mapping(map)) => map.keys().map(key_text).collect(),
            Some(list) => items(list)
                .into_iter()
                .filter_map(text)
                .map(|s| s.split('=').next().unwrap_or(s).trim().to_string())
                .collect(),
            None => Vec::new(),
        };
        if let Some(name) = label_names.iter().find(|n| n.starts_with(RESERVED_PREFIX)) {
            return refuse(
                field("labels"),
                format_args!(
                    "label {name:?}: labels under {RESERVED_PREFIX:?} say which workload a container is, and only the agent sets them"
                ),
                ALWAYS,
            );
        }
        if get("provider").is_some() {
            return refuse(
                field("provider"),
                "provider services run programs on the host",
                ALWAYS,
            );
        }
        for (index, volume) in get("volumes")
            .map(items)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            self.service_volume(&format!("{}[{index}]", field("volumes")), volume)?;
        }
        for (index, from) in get("volumes_from")
            .map(items)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if text(from).is_some_and(|f| f.starts_with("container:")) && !policy.compose.external {
                return refuse(
                    format!("{}[{index}]", field("volumes_from")),
                    "another container's volumes are not this project's",
                    "compose.external",
                );
            }
        }
        if get("external_links").is_some_and(|v| !items(v).is_empty()) && !policy.compose.external {
            return refuse(
                field("external_links"),
                "containers outside the project are not this project's",
                "compose.external",
            );
        }
        for name in ["env_file", "label_file"] {
            for (index, file) in get(name)
                .map(items)
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let path = match untagged(file) {
                    Value::Mapping(long) => long.get("path").unwrap_or(&Value::Null),
                    short => short,
                };
                self.project_file(&format!("{}[{index}]", field(name)), path)?;
            }
        }
        if let Some(Value::Mapping(extends)) = get("extends")
            && let Some(file) = extends.get("file")
        {
            self.project_file(&field("extends.file"), file)?;
        }
        if let Some(build) = get("build") {
            self.build(&field("build"), build)?;
        }
        Ok(())
    }

    fn build(&self, key: &str, build: &Value) -> Result<(), Refusal> {
        if !self.policy().compose.build {
            return refuse(
                key,
                "building images on the node is not allowed",
                "compose.build",
            );
        }
        let is_remote = |s: &str| s.contains("://") || s.starts_with("git@");
        match build {
            Value::Mapping(long) => {
                if long.get("ssh").is_some() {
                    return refuse(
                        format!("{key}.ssh"),
                        "the agent's SSH credentials are not lent to builds",
                        ALWAYS,
                    );
                }
                if let Some(context) = long.get("context")
                    && !text(context).is_some_and(is_remote)
                {
                    self.project_file(&format!("{key}.context"), context)?;
                }
                if let Some(dockerfile) = long.get("dockerfile") {
                    self.project_file(&format!("{key}.dockerfile"), dockerfile)?;
                }
                for (name, context) in
                    entries(long.get("additional_contexts").unwrap_or(&Value::Null))
                {
                    let source = text(context).unwrap_or_default();
                    if !is_remote(source)
                        && !source.starts_with("docker-image://")
                        && !source.starts_with("service:")
                    {
                        self.project_file(&format!("{key}.additional_contexts.{name}"), context)?;
                    }
                }
                Ok(())
            }
            context if text(context).is_some_and(is_remote) => Ok(()),
            context => self.project_file(key, context),
        }
    }

    /// A service's `volumes` entry, short (`src:dst[:mode]`) or long
    /// syntax: bind sources follow the container rule.
    fn service_volume(&self, key: &str, volume: &Value) -> Result<(), Refusal> {
        if let Value::Mapping(long) = untagged(volume) {
            let kind = long.get("type").and_then(text).unwrap_or("volume");
            if !matches!(kind, "bind" | "volume" | "tmpfs" | "image") {
                return refuse(
                    format!("{key}.type"),
                    format_args!("mount type {kind:?} is not allowed"),
                    ALWAYS,
                );
            }
        }
        match binds::service_bind(key, volume) {
            Some((key, source, _)) => self.bind_source(&key, &source),
            None => Ok(()),
        }
    }

    /// A bind source: absolute, and allowed by the host-path policy. A
    /// named volume (no `/`, `.` or `~`) is not a bind.
    fn bind_source(&self, key: &str, source: &str) -> Result<(), Refusal> {
        if source.starts_with('/') {
            return self
                .rules
                .host_paths
                .check(source)
                .map(drop)
                .map_err(|why| (key.to_string(), why));
        }
        if source.starts_with('.') || source.starts_with('~') {
            return refuse(
                key,
                format_args!(
                    "relative bind source {source:?} would resolve into the agent's project directory or a home; bind an absolute path under the allowed roots"
                ),
                ALWAYS,
            );
        }
        Ok(())
    }

    fn top_level_volume(&self, key: &str, volume: &Value) -> Result<(), Refusal> {
        self.not_external(key, volume)?;
        if let Some(device) = binds::device_bind(volume) {
            return self.bind_source(&format!("{key}.driver_opts.device"), device);
        }
        let options = &untagged(volume)["driver_opts"];
        let Some(device) = text(&options["device"]) else {
            return Ok(());
        };
        let kind = text(&options["type"]).unwrap_or("none");
        if kind == "tmpfs" {
            return Ok(());
        }
        refuse(
            format!("{key}.driver_opts"),
            format_args!("mounting {device:?} as {kind:?} is not allowed"),
            "containers.devices",
        )
    }

    fn not_external(&self, key: &str, item: &Value) -> Result<(), Refusal> {
        if untagged(item).get("external").is_some_and(truthy) && !self.policy().compose.external {
            return refuse(
                format!("{key}.external"),
                "things made outside the project may be another workload's",
                "compose.external",
            );
        }
        Ok(())
    }

    /// A file the compose file names: relative, inside the project
    /// directory (no absolute path, no `~`, no `..`), and local: a remote
    /// one (an `include` from git or an OCI registry) would bring a
    /// document nobody checked.
    fn project_file(&self, key: &str, path: &Value) -> Result<(), Refusal> {
        let Some(path) = text(path) else {
            return Ok(());
        };
        if path.contains("://") || path.starts_with("git@") || path.starts_with("oci:") {
            return refuse(
                key,
                format_args!(
                    "{path:?} is remote: files a compose file names must lie in the project directory"
                ),
                ALWAYS,
            );
        }
        let escapes = path.starts_with('~')
            || Path::new(path).components().any(|c| {
                matches!(
                    c,
                    Component::RootDir | Component::ParentDir | Component::Prefix(_)
                )
            });
        if escapes {
            return refuse(
                key,
                format_args!(
                    "{path:?} is outside the project directory: files a compose file names must lie inside it"
                ),
                ALWAYS,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn check(yaml: &str, policy: &NodePolicy) -> Result<(), SpecError> {
        let spec = ComposeSpec {
            compose_yaml: yaml.into(),
            ..Default::default()
        };
        check_spec(&spec, policy)
    }

    fn check_spec(spec: &ComposeSpec, policy: &NodePolicy) -> Result<(), SpecError> {
        let vars = BTreeMap::from([("DATA".to_string(), "/srv/app".to_string())]);
        let host_paths = HostPathPolicy::new(None, policy.host_paths.allowed_roots.clone());
        let document =
            document::load(&spec.compose_yaml).map_err(|why| SpecError::new(FILE, why))?;
        check_compose_policy(
            spec,
            &document,
            &ComposeRules {
                policy,
                host_paths: &host_paths,
                vars: &vars,
            },
        )
        .map(drop)
    }

    #[test]
    fn an_ordinary_project_passes() {
        let yaml = "services:\n  web:\n    image: nginx\n    ports: ['8080:80']\n    volumes:\n      - data:/data\n      - /var/lib/persys/volumes/web:/srv\n      - type: tmpfs\n        target: /tmp\n    env_file: [app.env]\n    cap_add: []\n    security_opt: [no-new-privileges:true]\n    sysctls: {net.ipv4.tcp_syncookies: 1}\nvolumes:\n  data: {}\n";
        check(yaml, &NodePolicy::default()).unwrap();
    }

    #[test]
    fn each_refusal_names_the_key_and_the_rule_and_opening_the_switch_lets_it_through() {
        let open = |change: fn(&mut NodePolicy)| {
            let mut policy = NodePolicy::default();
            change(&mut policy);
            policy
        };
        let cases: [(&str, &str, &str, NodePolicy); 6] = [
            (
                "services:\n  a:\n    image: x\n    privileged: true\n",
                "services.a.privileged",
                "policy containers.privileged",
                open(|p| p.containers.privileged = true),
            ),
            (
                "services:\n  a:\n    image: x\n    network_mode: host\n",
                "services.a.network_mode",
                "policy containers.host_network",
                open(|p| p.containers.host_network = true),
            ),
            (
                "services:\n  a:\n    image: x\n    cap_add: [SYS_ADMIN]\n",
                "services.a.cap_add",
                "policy containers.capabilities",
                open(|p| p.containers.capabilities = vec!["SYS_ADMIN".into()]),
            ),
            (
                "services:\n  a:\n    build: .\n",
                "services.a.build",
                "policy compose.build",
                open(|p| p.compose.build = true),
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: ['${DATA}/cache:/cache']\n",
                "services.a.volumes[0]",
                "policy host_paths.allowed_roots",
                open(|p| p.host_paths.allowed_roots = vec![PathBuf::from("/srv")]),
            ),
            (
                "services:\n  a:\n    image: x\nvolumes:\n  v:\n    external: true\n",
                "volumes.v.external",
                "policy compose.external",
                open(|p| p.compose.external = true),
            ),
        ];
        for (yaml, key, rule, opened) in cases {
            let error = check(yaml, &NodePolicy::default()).unwrap_err();
            assert_eq!(error.field, FILE);
            assert!(error.message.starts_with(key), "{key}: {error}");
            assert!(error.message.contains(rule), "{rule}: {error}");
            check(yaml, &opened).unwrap_or_else(|e| panic!("{key} opened: {e}"));
        }
    }

    #[test]
    fn files_outside_the_project_are_refused_whatever_the_policy() {
        let mut all_open = NodePolicy::default();
        all_open.compose.build = true;
        for (yaml, key) in [
            (
                "services:\n  a:\n    image: x\n    env_file: /etc/shadow\n",
                "services.a.env_file[0]",
            ),
            (
                "services:\n  a:\n    image: x\n    env_file: [{path: ../../x.env}]\n",
                "services.a.env_file[0]",
            ),
            (
                "services:\n  a:\n    extends: {file: /srv/other.yml, service: b}\n",
                "services.a.extends.file",
            ),
            (
                "include:\n  - ../other/compose.yml\nservices:\n  a: {image: x}\n",
                "include[0]",
            ),
            (
                "include:\n  - oci://registry/app:1\nservices:\n  a: {image: x}\n",
                "include[0]",
            ),
            (
                "include:\n  - path: https://example.com/x.yml\nservices:\n  a: {image: x}\n",
                "include[0].path",
            ),
            (
                "services:\n  a: {image: x}\nsecrets:\n  s: {file: /etc/ssl/private/key.pem}\n",
                "secrets.s.file",
            ),
            (
                "services:\n  a: {image: x}\nconfigs:\n  c: {file: ~/.docker/config.json}\n",
                "configs.c.file",
            ),
            (
                "services:\n  a:\n    build: {context: ../..}\n",
                "services.a.build.context",
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: ['./data:/data']\n",
                "services.a.volumes[0]",
            ),
        ] {
            let error = check(yaml, &all_open).unwrap_err();
            assert!(error.message.starts_with(key), "{key}: {error}");
            assert!(error.message.contains("whatever the policy"), "{error}");
        }
    }

    #[test]
    fn spec_variables_naming_settings_of_compose_are_refused() {
        for name in [
            "LD_PRELOAD",
            "PATH",
            "DOCKER_HOST",
            "COMPOSE_FILE",
            "https_proxy",
        ] {
            let spec = ComposeSpec {
                compose_yaml: "services:\n  a: {image: x}\n".into(),
                env: [(name.to_string(), "v".to_string())].into(),
                ..Default::default()
            };
            let error = check_spec(&spec, &NodePolicy::default()).unwrap_err();
            assert_eq!(error.field, format!("spec.compose.env[{name:?}]"));
            assert!(error.message.contains("whatever the policy"), "{error}");
        }
        for value in ["${HOME}", "it's $1", "a\\$b", "$X\nY"] {
            let spec = ComposeSpec {
                compose_yaml: "services:\n  a: {image: x}\n".into(),
                env: [("V".to_string(), value.to_string())].into(),
                ..Default::default()
            };
            let error = check_spec(&spec, &NodePolicy::default()).unwrap_err();
            assert_eq!(error.field, "spec.compose.env[\"V\"]", "{value:?}");
        }
        let profiles = ComposeSpec {
            compose_yaml: "services:\n  a: {image: x}\n".into(),
            env: [("COMPOSE_PROFILES".to_string(), "debug".to_string())].into(),
            ..Default::default()
        };
        check_spec(&profiles, &NodePolicy::default()).unwrap();
    }

    #[test]
    fn a_restart_policy_compose_would_not_run_is_refused() {
        let error = check(
            "services:\n  a:\n    image: x\n    restart: sometimes\n",
            &NodePolicy::default(),
        )
        .unwrap_err();
        assert!(error.message.starts_with("services.a.restart"), "{error}");
        check(
            "services:\n  a:\n    image: x\n    restart: on-failure:3\n",
            &NodePolicy::default(),
        )
        .unwrap();
    }

    #[test]
    fn the_agent_s_own_labels_are_refused_in_a_compose_file() {
        for yaml in [
            "services:\n  a:\n    image: x\n    labels: {persys.workload-id: other}\n",
            "services:\n  a:\n    image: x\n    labels: [persys.managed=true]\n",
        ] {
            let error = check(yaml, &NodePolicy::default()).unwrap_err();
            assert!(error.message.starts_with("services.a.labels"), "{error}");
        }
        check(
            "services:\n  a:\n    image: x\n    labels: [app=web]\n",
            &NodePolicy::default(),
        )
        .unwrap();
    }
}
