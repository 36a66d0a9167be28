//! A workload's `ContainerSpec` as the engine's create request.
//!
//! Semantics, where Docker and Kubernetes differ, follow Kubernetes:
//! `command` replaces the image's ENTRYPOINT and `args` its CMD; a port with
//! `host_port` 0 is exposed but not published. Restarts are the agent's
//! (engine restart policy `no`).

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum, VolumeCreateRequest,
};
use persys_api::v1::{ContainerSpec, Workload};

use super::binds::Bind;
use super::labels;
use super::validate::MAX_STOP_GRACE_SECONDS;

/// Grace period of a stop when the spec gives none.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The engine's name of a port protocol; empty means tcp.
pub fn port_protocol(protocol: &str) -> Option<&'static str> {
    match protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => Some("tcp"),
        "udp" => Some("udp"),
        _ => None,
    }
}

/// SIGTERM, then SIGKILL after this long (at most an hour).
pub fn stop_grace(spec: &ContainerSpec) -> Duration {
    match spec.stop_grace_period_seconds {
        s if s > 0 => Duration::from_secs(s.min(MAX_STOP_GRACE_SECONDS) as u64),
        _ => DEFAULT_STOP_GRACE,
    }
}

fn retained(retain_policy: &str) -> bool {
    retain_policy.eq_ignore_ascii_case("retain")
}

/// The named volumes to create before the container (idempotent in the
/// engine: creating an existing volume returns it).
pub fn volume_requests(
    workload: &Workload,
    spec: &ContainerSpec,
    scope: &str,
) -> Vec<VolumeCreateRequest> {
    spec.managed_volumes
        .iter()
        .map(|volume| VolumeCreateRequest {
            name: Some(labels::volume_name(workload.id(), &volume.name)),
            driver: Some("local".to_string()),
            labels: Some(HashMap::from([
                (labels::MANAGED.to_string(), "true".to_string()),
                (labels::WORKLOAD_ID.to_string(), workload.id().to_string()),
                (labels::SCOPE.to_string(), scope.to_string()),
                (
                    labels::RETAIN.to_string(),
                    retained(&volume.retain_policy).to_string(),
                ),
            ])),
            ..Default::default()
        })
        .collect()
}

/// The create request for `workload`'s container, with its bind mounts
/// `binds` as resolved and checked for this create (`super::binds`): the
/// engine receives those paths, not the spec's strings.
pub fn create_body(
    workload: &Workload,
    spec: &ContainerSpec,
    binds: &[Bind],
    scope: &str,
) -> ContainerCreateBody {
    let mut container_labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    container_labels.extend(labels::for_workload(workload, scope));

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &spec.ports {
        let protocol = port_protocol(&port.protocol).unwrap_or("tcp");
        let key = format!("{}/{protocol}", port.container_port);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        if port.host_port > 0 {
            bindings
                .entry(key)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: None,
                    host_port: Some(port.host_port.to_string()),
                });
        }
    }

    let binds: Vec<String> = binds.iter().map(Bind::engine_form).collect();
    let mounts: Vec<Mount> = spec
        .managed_volumes
        .iter()
        .map(|v| Mount {
            target: Some(v.mount_path.clone()),
            source: Some(labels::volume_name(workload.id(), &v.name)),
            typ: Some(MountType::VOLUME),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect();

    let resources = spec.resources.unwrap_or_default();
    let positive = |v: i64| (v > 0).then_some(v);
    let host_config = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        mounts: (!mounts.is_empty()).then_some(mounts),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        cpu_shares: positive(resources.cpu_shares),
        memory: positive(resources.memory_bytes),
        memory_swap: match resources.memory_swap_bytes {
            -1 => Some(-1),
            v => positive(v),
        },
        ..Default::default()
    };

    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
        cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: (!spec.env.is_empty())
            .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(container_labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        stop_timeout: Some(stop_grace(spec).as_secs() as i64),
        host_config: Some(host_config),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{
        ManagedVolumeSpec, ObjectMeta, ObjectSpec, PortMapping, VolumeMount, WorkloadSpec,
        workload_spec,
    };

    fn workload(spec: &ContainerSpec) -> Workload {
        Workload {
            metadata: Some(ObjectMeta {
                id: "web".into(),
                revision_id: "r1".into(),
                generation: 2,
                ..Default::default()
            }),
            spec: Some(ObjectSpec {
                desired_state: 1,
                workload: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(spec.clone())),
                }),
            }),
            status: None,
        }
    }

    #[test]
    fn create_body_carries_the_spec_and_the_agent_labels() {
        let spec = ContainerSpec {
            image: "persys-test/busybox:latest".into(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["sleep 100".into()],
            env: [
                ("B".to_string(), "2".to_string()),
                ("A".to_string(), "1".to_string()),
            ]
            .into(),
            ports: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "".into(),
                },
                PortMapping {
                    host_port: 8443,
                    container_port: 80,
                    protocol: "tcp".into(),
                },
                PortMapping {
                    host_port: 0,
                    container_port: 9000,
                    protocol: "udp".into(),
                },
            ],
            volumes: vec![VolumeMount {
                host_path: "/srv/current".into(),
                container_path: "/data".into(),
                read_only: true,
            }],
            managed_volumes: vec![ManagedVolumeSpec {
                name: "cache".into(),
                mount_path: "/cache".into(),
                ..Default::default()
            }],
            labels: [("team".to_string(), "a".to_string())].into(),
            stop_grace_period_seconds: 3,
            ..Default::default()
        };
        let w = workload(&spec);
        // `/srv/current` resolved, at create, to `/srv/web`.
        let resolved = [Bind {
            source: "/srv/web".into(),
            target: "/data".into(),
            read_only: true,
        }];
        let body = create_body(&w, &spec, &resolved, "default");
        assert_eq!(
            body.entrypoint,
            Some(vec!["sh".to_string(), "-c".to_string()])
        );
        assert_eq!(body.cmd, Some(vec!["sleep 100".to_string()]));
        assert_eq!(body.env, Some(vec!["A=1".to_string(), "B=2".to_string()]));
        assert_eq!(body.stop_timeout, Some(3));
        let labels = body.labels.unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[labels::WORKLOAD_ID], "web");
        assert_eq!(labels[labels::SPEC_HASH], w.spec_hash());
        assert_eq!(labels[labels::GENERATION], "2");
        assert_eq!(labels[labels::REVISION], "r1");
        assert_eq!(labels[labels::SCOPE], "default");
        let mut exposed = body.exposed_ports.unwrap();
        exposed.sort();
        assert_eq!(exposed, ["80/tcp", "9000/udp"]);
        let host = body.host_config.unwrap();
        let bindings = host.port_bindings.unwrap();
        assert_eq!(bindings["80/tcp"].as_ref().unwrap().len(), 2);
        assert!(
            !bindings.contains_key("9000/udp"),
            "host port 0 is not published"
        );
        assert_eq!(
            host.binds.unwrap(),
            ["/srv/web:/data:ro"],
            "the engine receives the resolved source"
        );
        assert_eq!(
            host.mounts.unwrap()[0].source.as_deref(),
            Some("persys-web-cache")
        );
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
    }

    #[test]
    fn without_command_or_args_the_image_defaults_apply() {
        let spec = ContainerSpec {
            image: "busybox".into(),
            ..Default::default()
        };
        let body = create_body(&workload(&spec), &spec, &[], "s");
        assert_eq!(body.entrypoint, None);
        assert_eq!(body.cmd, None);
        assert_eq!(body.stop_timeout, Some(10));
    }
}
