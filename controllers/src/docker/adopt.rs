//! Taking over the containers the Go agent left running.
//!
//! The Go agent named a workload's container by the workload id and labelled
//! it `persys.managed=true`, `persys.workload_id=<id>` and
//! `persys.revision_id=<revision>` (underscores; this agent's keys use
//! hyphens and add a scope). Such a container, for a workload in the store,
//! is this agent's to run: when it is what the Go agent would have created
//! from the stored spec it is adopted as it runs, else replaced once.
//! Docker labels cannot change, so the adoption is recorded in the
//! workload's status facts: the container id and the marks it would have
//! carried. Later reconciles, restarts of the agent and deletes read the
//! container through that record.
//!
//! Nothing else is taken: a container without those labels, with a scope
//! label (another agent's), with another name, or for an id not in the
//! store is never touched.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerInspectResponse, ContainerSummary};
use persys_api::v1::{ContainerSpec, ObjectStatus, Workload};

use super::labels;

/// The Go agent's workload label.
pub const GO_WORKLOAD_ID: &str = "persys.workload_id";

/// Status fact: the id of the adopted container.
pub const FACT_CONTAINER: &str = "adopted.container-id";
/// Status facts under this prefix: the marks the adopted container would
/// carry had this agent created it (`adopted.label.persys.spec-hash`…).
pub const FACT_LABEL_PREFIX: &str = "adopted.label.";

/// The workload a container of the Go agent's belongs to, from its labels:
/// managed, with the Go agent's workload label and none of this agent's
/// marks (a container with a scope is an agent's of this kind, adopted or
/// collected by its own marks only).
pub fn go_owner(labels: Option<&HashMap<String, String>>) -> Option<&str> {
    let labels = labels?;
    if labels.get(labels::MANAGED).map(String::as_str) != Some("true")
        || labels.contains_key(labels::SCOPE)
        || labels.contains_key(labels::WORKLOAD_ID)
    {
        return None;
    }
    labels
        .get(GO_WORKLOAD_ID)
        .map(String::as_str)
        .filter(|id| !id.is_empty())
}

/// True when `summary` is the Go agent's container of workload `id`: its
/// labels say so and it is named by the id, as the Go agent names them.
pub(crate) fn is_go_container_of(summary: &ContainerSummary, id: &str) -> bool {
    go_owner(summary.labels.as_ref()) == Some(id)
        && summary
            .names
            .iter()
            .flatten()
            .any(|name| name.trim_start_matches('/') == id)
}

/// The same rules on an inspected container.
pub(crate) fn is_go_inspected_of(found: &ContainerInspectResponse, id: &str) -> bool {
    let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
    go_owner(labels) == Some(id)
        && found.name.as_deref().map(|n| n.trim_start_matches('/')) == Some(id)
}

/// An adopted container, as recorded with its workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Adoption {
    /// The engine's id of the adopted container.
    pub(crate) container_id: String,
    /// The marks it would carry had this agent created it.
    pub(crate) marks: BTreeMap<String, String>,
}

impl Adoption {
    /// The adoption of container `container_id` for `workload` as it is now.
    pub(crate) fn new(container_id: &str, workload: &Workload, scope: &str) -> Adoption {
        Adoption {
            container_id: container_id.to_string(),
            marks: labels::for_workload(workload, scope).into_iter().collect(),
        }
    }

    /// The adoption recorded in `status`, when it is one of `scope`.
    pub(crate) fn recorded(status: Option<&ObjectStatus>, scope: &str) -> Option<Adoption> {
        let facts = &status?.facts;
        let container_id = facts.get(FACT_CONTAINER).filter(|c| !c.is_empty())?;
        let marks: BTreeMap<String, String> = facts
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(FACT_LABEL_PREFIX)?.to_string(), v.clone())))
            .collect();
        if marks.get(labels::SCOPE).map(String::as_str) != Some(scope)
            || !marks.contains_key(labels::SPEC_HASH)
        {
            return None;
        }
        Some(Adoption {
            container_id: container_id.clone(),
            marks,
        })
    }

    /// The record, as status facts.
    pub(crate) fn facts(&self) -> BTreeMap<String, String> {
        let mut facts: BTreeMap<String, String> = self
            .marks
            .iter()
            .map(|(k, v)| (format!("{FACT_LABEL_PREFIX}{k}"), v.clone()))
            .collect();
        facts.insert(FACT_CONTAINER.to_string(), self.container_id.clone());
        facts
    }

    /// True when `summary` is the adopted container.
    pub(crate) fn is(&self, summary: &ContainerSummary) -> bool {
        summary.id.as_deref() == Some(self.container_id.as_str())
    }

    /// Gives the listed adopted container the marks it would carry, so the
    /// rest of the controller reads it as one of its own.
    pub(crate) fn mark(&self, summary: &mut ContainerSummary) {
        let labels = summary.labels.get_or_insert_with(HashMap::new);
        labels.extend(self.marks.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// Restart policies as the Go agent passed them to the engine: the spec's,
/// `no` when absent.
fn go_restart_policy(spec: &ContainerSpec) -> (String, i64) {
    match &spec.restart_policy {
        Some(policy) if !policy.policy.is_empty() => {
            (policy.policy.clone(), i64::from(policy.max_retry_count))
        }
        _ => ("no".to_string(), 0),
    }
}

/// `KEY=VALUE` lines as a map (a line without `=` is a key with no value).
fn env_map<'a>(lines: impl IntoIterator<Item = &'a String>) -> BTreeMap<&'a str, &'a str> {
    lines
        .into_iter()
        .map(|line| line.split_once('=').unwrap_or((line.as_str(), "")))
        .collect()
}

/// The first way `found` differs from the container the Go agent would have
/// created from `spec` (image, command, env, ports, mounts, restart policy),
/// as `field: what differs`; none when it matches. `image_env` is the
/// image's own environment, which the engine merges into the container's.
pub(crate) fn difference(
    spec: &ContainerSpec,
    found: &ContainerInspectResponse,
    image_env: &[String],
) -> Option<String> {
    let config = found.config.clone().unwrap_or_default();
    let host = found.host_config.clone().unwrap_or_default();

    let image = config.image.unwrap_or_default();
    if image != spec.image {
        return Some(format!(
            "image: the container runs {image:?}, the spec asks for {:?}",
            spec.image
        ));
    }

    // The Go agent passed `command` then `args` as Cmd and kept the image's
    // ENTRYPOINT; with neither, the image's CMD, which the engine recorded.
    let wanted: Vec<String> = spec.command.iter().chain(&spec.args).cloned().collect();
    let cmd = config.cmd.unwrap_or_default();
    if !wanted.is_empty() && cmd != wanted {
        return Some(format!(
            "command: the container runs {cmd:?}, the spec asks for {wanted:?}"
        ));
    }

    let env_lines = config.env.unwrap_or_default();
    let env = env_map(&env_lines);
    let image_env = env_map(image_env);
    for (key, value) in &spec.env {
        if env.get(key.as_str()) != Some(&value.as_str()) {
            // The value is a secret: only the key is named.
            return Some(format!("env: {key} differs from the spec"));
        }
    }
    if let Some(extra) = env
        .keys()
        .find(|k| !spec.env.contains_key(**k) && !image_env.contains_key(**k))
    {
        return Some(format!(
            "env: {extra} is set on the container, not in the spec"
        ));
    }

    let mut wanted_ports: Vec<(String, String)> = spec
        .ports
        .iter()
        .map(|p| {
            let protocol = if p.protocol.is_empty() {
                "tcp"
            } else {
                p.protocol.as_str()
            };
            (
                format!("{}/{protocol}", p.container_port),
                p.host_port.to_string(),
            )
        })
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    wanted_ports.sort();
    let mut ports: Vec<(String, String)> = host
        .port_bindings
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(key, bindings)| {
            bindings.unwrap_or_default().into_iter().map(move |b| {
                let port = b
                    .host_port
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "0".into());
                (key.clone(), port)
            })
        })
        .collect();
    ports.sort();
    ports.dedup();
    if ports != wanted_ports {
        return Some(format!(
            "ports: the container publishes {ports:?}, the spec asks for {wanted_ports:?}"
        ));
    }

    let mut wanted_binds: Vec<(String, String, bool)> = spec
        .volumes
        .iter()
        .map(|v| (v.host_path.clone(), v.container_path.clone(), !v.read_only))
        .collect();
    wanted_binds.sort();
    let mut binds: Vec<(String, String, bool)> = found
        .mounts
        .iter()
        .flatten()
        .filter(|m| m.typ.as_deref() == Some("bind"))
        .map(|m| {
            (
                m.source.clone().unwrap_or_default(),
                m.destination.clone().unwrap_or_default(),
                m.rw.unwrap_or(true),
            )
        })
        .collect();
    binds.sort();
    if binds != wanted_binds {
        return Some(format!(
            "volumes: the container mounts {binds:?}, the spec asks for {wanted_binds:?}"
        ));
    }
    if !spec.managed_volumes.is_empty() {
        return Some(
            "managed_volumes: this agent provides them as Docker volumes the container does not have"
                .to_string(),
        );
    }

    let (wanted_policy, wanted_retries) = go_restart_policy(spec);
    let policy = host.restart_policy.unwrap_or_default();
    let name = policy.name.map(|n| n.to_string()).filter(|n| !n.is_empty());
    let name = name.unwrap_or_else(|| "no".to_string());
    let retries = policy.maximum_retry_count.unwrap_or(0);
    if name != wanted_policy || (name == "on-failure" && retries != wanted_retries) {
        return Some(format!(
            "restart_policy: the container has {name:?} (retries {retries}), the spec asks for {wanted_policy:?} (retries {wanted_retries})"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerConfig, HostConfig, MountPoint, PortBinding, RestartPolicy, RestartPolicyNameEnum,
    };
    use persys_api::v1::{PortMapping, VolumeMount};

    /// The Go agent's revision label.
    const GO_REVISION: &str = "persys.revision_id";

    fn go_labels(id: &str) -> HashMap<String, String> {
        HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (GO_WORKLOAD_ID.to_string(), id.to_string()),
            (GO_REVISION.to_string(), "r1".to_string()),
        ])
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "app:1".into(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["sleep 100".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            ports: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "".into(),
            }],
            volumes: vec![VolumeMount {
                host_path: "/srv/data".into(),
                container_path: "/data".into(),
                read_only: true,
            }],
            restart_policy: Some(persys_api::v1::RestartPolicy {
                policy: "always".into(),
                max_retry_count: 0,
            }),
            ..Default::default()
        }
    }

    /// What the Go agent created from `spec()`, as the engine shows it.
    fn created() -> ContainerInspectResponse {
        ContainerInspectResponse {
            name: Some("/web".into()),
            config: Some(ContainerConfig {
                image: Some("app:1".into()),
                cmd: Some(vec!["sh".into(), "-c".into(), "sleep 100".into()]),
                env: Some(vec!["A=1".into(), "PATH=/bin".into()]),
                labels: Some(go_labels("web")),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    "80/tcp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: Some("0.0.0.0".into()),
                        host_port: Some("8080".into()),
                    }]),
                )])),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::ALWAYS),
                    maximum_retry_count: Some(0),
                }),
                ..Default::default()
            }),
            mounts: Some(vec![MountPoint {
                typ: Some("bind".into()),
                source: Some("/srv/data".into()),
                destination: Some("/data".into()),
                rw: Some(false),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn the_go_agents_container_of_a_spec_matches_it() {
        assert_eq!(difference(&spec(), &created(), &["PATH=/bin".into()]), None);
        assert!(is_go_inspected_of(&created(), "web"));
    }

    /// A change to the spec a test makes.
    type Change = Box<dyn Fn(&mut ContainerSpec)>;

    #[test]
    fn each_field_that_differs_is_named() {
        let image_env = ["PATH=/bin".to_string()];
        let cases: Vec<(&str, Change)> = vec![
            ("image", Box::new(|s| s.image = "app:2".into())),
            ("command", Box::new(|s| s.args = vec!["sleep 5".into()])),
            (
                "env: A",
                Box::new(|s| s.env.insert("A".into(), "2".into()).map(drop).unwrap_or(())),
            ),
            ("ports", Box::new(|s| s.ports[0].host_port = 9090)),
            ("volumes", Box::new(|s| s.volumes[0].read_only = false)),
            ("restart_policy", Box::new(|s| s.restart_policy = None)),
        ];
        for (field, change) in cases {
            let mut spec = spec();
            change(&mut spec);
            let found = difference(&spec, &created(), &image_env);
            assert!(
                found.as_deref().is_some_and(|d| d.starts_with(field)),
                "{field}: {found:?}"
            );
        }
        let found = difference(&spec(), &created(), &[]);
        assert!(
            found.as_deref().is_some_and(|d| d.starts_with("env: PATH")),
            "{found:?}"
        );
    }

    #[test]
    fn env_differences_never_show_the_values() {
        let mut spec = spec();
        spec.env.insert("A".into(), "s3cret".into());
        let found = difference(&spec, &created(), &["PATH=/bin".into()]).unwrap_or_default();
        assert!(
            !found.contains("s3cret") && !found.contains("=1"),
            "{found}"
        );
    }

    #[test]
    fn only_the_go_agents_labels_name_a_go_owner() {
        let go = go_labels("web");
        assert_eq!(go_owner(Some(&go)), Some("web"));
        let mut scoped = go.clone();
        scoped.insert(labels::SCOPE.into(), "default".into());
        assert_eq!(
            go_owner(Some(&scoped)),
            None,
            "an agent's container is not the Go agent's"
        );
        let mut unmanaged = go.clone();
        unmanaged.remove(labels::MANAGED);
        assert_eq!(go_owner(Some(&unmanaged)), None);
        let mut other_name = created();
        other_name.name = Some("/web-copy".into());
        assert!(
            !is_go_inspected_of(&other_name, "web"),
            "named by the id only"
        );
    }

    #[test]
    fn an_adoption_goes_into_status_facts_and_back() {
        let adoption = Adoption {
            container_id: "c0ffee".into(),
            marks: BTreeMap::from([
                (labels::SCOPE.to_string(), "default".to_string()),
                (labels::SPEC_HASH.to_string(), "h1".to_string()),
            ]),
        };
        let status = ObjectStatus {
            facts: adoption.facts(),
            ..Default::default()
        };
        assert_eq!(Adoption::recorded(Some(&status), "default"), Some(adoption));
        assert_eq!(
            Adoption::recorded(Some(&status), "other"),
            None,
            "another scope's"
        );
    }
}
