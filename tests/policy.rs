//! The node workload policy, enforced at apply by the real agent over
//! mutual TLS: hostile specs are refused with the right code, a message
//! naming the field and the rule, and nothing stored; a switch opened in
//! the policy file lets the matching spec through; an alias bomb is refused
//! within bounds; ceilings name their figures.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, UNREACHABLE_RUNTIMES, client, offline_agent};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::Code;
use tonic::transport::Channel;

struct Fixture {
    dir: tempfile::TempDir,
    agent: AgentProcess,
    client: AgentServiceClient<Channel>,
}

impl Fixture {
    /// An agent with unreachable runtimes, `env` on top. `{dir}` in a value
    /// is the fixture's directory (made before the agent starts).
    async fn start(env: &[(&str, &str)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        let certs = Certs::generate(&dir.path().join("certs"));
        let owned: Vec<(String, String)> = UNREACHABLE_RUNTIMES
            .iter()
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.replace("{dir}", &root)))
            .collect();
        let env: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let agent = AgentProcess::start(&dir.path().join("state"), &certs, &env).await;
        let client = client(agent.port, &certs).await.unwrap();
        Fixture { dir, agent, client }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    async fn ids(&mut self) -> Vec<String> {
        let listed = self
            .client
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap();
        let workloads = &listed.get_ref().workloads;
        let mut ids: Vec<String> = workloads.iter().map(|w| w.id.clone()).collect();
        ids.sort();
        ids
    }
}

fn request(id: &str, spec: workload_spec::Spec) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        spec: Some(WorkloadSpec { spec: Some(spec) }),
        ..Default::default()
    }
}

fn bind(id: &str, host_path: &str) -> ApplyWorkloadRequest {
    request(
        id,
        workload_spec::Spec::Container(ContainerSpec {
            image: "persys-test/busybox:latest".into(),
            volumes: vec![VolumeMount {
                host_path: host_path.into(),
                container_path: "/data".into(),
                read_only: false,
            }],
            ..Default::default()
        }),
    )
}

fn compose(id: &str, yaml: &str) -> ApplyWorkloadRequest {
    request(
        id,
        workload_spec::Spec::Compose(ComposeSpec {
            compose_yaml: yaml.into(),
            ..Default::default()
        }),
    )
}

/// A plain compose file with the spec variables `env`.
fn compose_env(id: &str, env: &[(&str, &str)]) -> ApplyWorkloadRequest {
    request(
        id,
        workload_spec::Spec::Compose(ComposeSpec {
            compose_yaml: "services:\n  a: {image: persys-test/busybox:latest}\n".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    )
}

/// A compose file of one service `a` with `extra` (YAML, indented four
/// spaces) in it.
fn service(id: &str, extra: &str) -> ApplyWorkloadRequest {
    compose(
        id,
        &format!("services:\n  a:\n    image: persys-test/busybox:latest\n{extra}"),
    )
}

fn vm_with(id: &str, edit: impl FnOnce(&mut VmSpec)) -> ApplyWorkloadRequest {
    let mut vm = VmSpec {
        vcpus: 1,
        memory_mb: 128,
        ..Default::default()
    };
    edit(&mut vm);
    request(id, workload_spec::Spec::Vm(vm))
}

fn qcow2_disk(path: &str) -> DiskConfig {
    DiskConfig {
        path: path.into(),
        format: "qcow2".into(),
        ..Default::default()
    }
}

fn network(id: &str, name: &str) -> ApplyWorkloadRequest {
    vm_with(id, |vm| {
        vm.networks = vec![NetworkConfig {
            network: name.into(),
            ..Default::default()
        }]
    })
}

/// One hostile apply: the code it must get and words its message must hold
/// (the field, then the rule).
struct Case {
    request: ApplyWorkloadRequest,
    code: Code,
    words: Vec<String>,
}

fn case(request: ApplyWorkloadRequest, code: Code, words: &[&str]) -> Case {
    Case {
        request,
        code,
        words: words.iter().map(|w| w.to_string()).collect(),
    }
}

const ALWAYS: &str = "whatever the policy";
const INVALID: Code = Code::InvalidArgument;

#[tokio::test]
async fn hostile_specs_are_refused_naming_the_field_and_the_rule_and_nothing_is_stored() {
    let mut f = Fixture::start(&[
        ("PERSYS_ALLOWED_HOST_PATHS", "{dir}/volumes"),
        ("PERSYS_POLICY_NODE_MEMORY_MIB", "4096"),
        ("PERSYS_POLICY_NODE_DISK_GIB", "100"),
    ])
    .await;
    let volumes = f.path("volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    std::os::unix::fs::symlink("/etc", volumes.join("etc-link")).unwrap();
    let outside = f.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, volumes.join("outside-link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/escape", volumes.join("dangling")).unwrap();
    // What the node already holds: 3000 MiB promised, and a disk (of no
    // declared size: it must exist when the VM starts).
    let base_disk = format!(
        "/var/lib/libvirt/images/policy-base-{}.qcow2",
        std::process::id()
    );
    f.client
        .apply_workload(vm_with("base", |vm| {
            vm.memory_mb = 3000;
            vm.disks = vec![qcow2_disk(&base_disk)];
        }))
        .await
        .unwrap();
    // A disk the agent recorded as created for a workload since deleted
    // from a store that was lost.
    let vm_root = f.agent.state.join("vm");
    let recorded = format!(
        "/var/lib/libvirt/images/policy-ghost-{}.qcow2",
        std::process::id()
    );
    std::fs::create_dir_all(vm_root.join("ghost")).unwrap();
    std::fs::write(vm_root.join("ghost/created-disks"), format!("{recorded}\n")).unwrap();
    let over_256_kib = format!("#cloud-config\n#{}\n", "x".repeat(256 * 1024));

    let state = f.agent.state.display().to_string();
    let host_path = "spec.container.volumes[0].host_path";
    let roots = "policy host_paths.allowed_roots";
    let file = "spec.compose.compose_yaml";
    let cases = vec![
        // Containers: bind mounts.
        case(bind("c1", "/etc"), INVALID, &[host_path, ALWAYS]),
        case(
            bind("c2", "/var/run/docker.sock"),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(
            bind("c3", "/run/docker.sock"),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(
            bind("c4", "/nonexistent/docker.sock"),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(bind("c5", &state), INVALID, &[host_path, ALWAYS]),
        case(
            bind("c6", &format!("{state}.key")),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(bind("c7", "/srv/data"), INVALID, &[host_path, roots]),
        case(bind("c8", "/usr/local/sbin"), INVALID, &[host_path, roots]),
        case(
            bind(
                "c9",
                &format!("{}/../../../../../../../../../../etc", volumes.display()),
            ),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(
            bind(
                "c10",
                &volumes.join("etc-link/cron.d").display().to_string(),
            ),
            INVALID,
            &[host_path, ALWAYS],
        ),
        case(
            bind("c11", &volumes.join("outside-link/x").display().to_string()),
            INVALID,
            &[host_path, roots],
        ),
        case(
            bind("c12", &volumes.join("dangling").display().to_string()),
            INVALID,
            &[host_path, ALWAYS],
        ),
        // Compose: host privileges.
        case(
            service("p1", "    privileged: true\n"),
            INVALID,
            &["services.a.privileged", "policy containers.privileged"],
        ),
        case(
            service("p2", "    network_mode: host\n"),
            INVALID,
            &["services.a.network_mode", "policy containers.host_network"],
        ),
        case(
            service("p3", "    network_mode: container:other\n"),
            INVALID,
            &["services.a.network_mode", "policy containers.host_network"],
        ),
        case(
            service("p4", "    pid: host\n"),
            INVALID,
            &["services.a.pid", "policy containers.host_pid"],
        ),
        case(
            service("p5", "    ipc: host\n"),
            INVALID,
            &["services.a.ipc", "policy containers.host_ipc"],
        ),
        case(
            service("p6", "    userns_mode: host\n"),
            INVALID,
            &["services.a.userns_mode", "policy containers.host_userns"],
        ),
        case(
            service("p7", "    devices: [/dev/sda:/dev/sda]\n"),
            INVALID,
            &["services.a.devices", "policy containers.devices"],
        ),
        case(
            service("p8", "    cap_add: [SYS_ADMIN]\n"),
            INVALID,
            &["services.a.cap_add", "policy containers.capabilities"],
        ),
        case(
            service("p9", "    security_opt: [seccomp:unconfined]\n"),
            INVALID,
            &["services.a.security_opt", "policy containers.security_opt"],
        ),
        case(
            service("p10", "    sysctls: {kernel.core_pattern: '|/tmp/x'}\n"),
            INVALID,
            &["services.a.sysctls", "policy containers.sysctls"],
        ),
        case(
            service("p11", "    cgroup_parent: /\n"),
            INVALID,
            &["services.a.cgroup_parent", "policy containers.privileged"],
        ),
        case(
            compose(
                "p12",
                "x-root: &root\n  privileged: true\nservices:\n  a:\n    <<: *root\n    image: x\n",
            ),
            INVALID,
            &["services.a.privileged", "policy containers.privileged"],
        ),
        // Compose: bind sources, as compose would resolve them.
        case(
            service("b1", "    volumes: ['/:/host']\n"),
            INVALID,
            &["services.a.volumes[0]", ALWAYS],
        ),
        case(
            service(
                "b2",
                "    volumes: [{type: bind, source: /var/run/docker.sock, target: /s}]\n",
            ),
            INVALID,
            &["services.a.volumes[0].source", ALWAYS],
        ),
        case(
            service("b3", "    volumes: ['${UNSET:-/etc}:/x']\n"),
            INVALID,
            &["services.a.volumes[0]", ALWAYS],
        ),
        case(
            service("b4", "    volumes: ['./data:/data']\n"),
            INVALID,
            &["services.a.volumes[0]", ALWAYS],
        ),
        case(
            service("b5", "    volumes: ['/srv:/srv']\n"),
            INVALID,
            &["services.a.volumes[0]", roots],
        ),
        case(
            compose(
                "b6",
                "services:\n  a: {image: x, volumes: ['v:/v']}\nvolumes:\n  v:\n    driver_opts: {type: none, o: bind, device: /etc}\n",
            ),
            INVALID,
            &["volumes.v.driver_opts.device", ALWAYS],
        ),
        case(
            service("b7", "    volumes_from: ['container:db']\n"),
            INVALID,
            &["services.a.volumes_from[0]", "policy compose.external"],
        ),
        case(
            compose(
                "b8",
                "services:\n  a: {image: x}\nvolumes:\n  v: {external: true}\n",
            ),
            INVALID,
            &["volumes.v.external", "policy compose.external"],
        ),
        // Compose: files outside the project, and build.
        case(
            service("f1", "    env_file: /etc/shadow\n"),
            INVALID,
            &["services.a.env_file[0]", ALWAYS],
        ),
        case(
            service("f2", "    env_file: ['../../other/.env']\n"),
            INVALID,
            &["services.a.env_file[0]", ALWAYS],
        ),
        case(
            compose(
                "f3",
                "services:\n  a:\n    extends: {file: /srv/base.yml, service: b}\n",
            ),
            INVALID,
            &["services.a.extends.file", ALWAYS],
        ),
        case(
            compose(
                "f4",
                "include: [../x/compose.yml]\nservices:\n  a: {image: x}\n",
            ),
            INVALID,
            &["include[0]", ALWAYS],
        ),
        case(
            compose(
                "f5",
                "services:\n  a: {image: x}\nsecrets:\n  k: {file: /etc/ssl/private/agent.key}\n",
            ),
            INVALID,
            &["secrets.k.file", ALWAYS],
        ),
        case(
            compose(
                "f6",
                "services:\n  a: {image: x}\nconfigs:\n  c: {file: ../../../etc/passwd}\n",
            ),
            INVALID,
            &["configs.c.file", ALWAYS],
        ),
        case(
            compose("f7", "services:\n  a:\n    build: .\n"),
            INVALID,
            &["services.a.build", "policy compose.build"],
        ),
        case(
            service("f8", "    provider: {type: model}\n"),
            INVALID,
            &["services.a.provider", ALWAYS],
        ),
        case(
            compose(
                "f9",
                "include: ['git@github.com:x/y.git']\nservices:\n  a: {image: x}\n",
            ),
            INVALID,
            &["include[0]", "is remote", ALWAYS],
        ),
        // Compose: what reaches the compose CLI, and whose a container is.
        case(
            compose_env("g1", &[("LD_PRELOAD", "/tmp/evil.so")]),
            INVALID,
            &[
                "spec.compose.env[\"LD_PRELOAD\"]",
                "names a setting",
                ALWAYS,
            ],
        ),
        case(
            compose_env("g2", &[("KEY", "${HOME}")]),
            INVALID,
            &["spec.compose.env[\"KEY\"]", "expands", ALWAYS],
        ),
        case(
            service("g3", "    labels: {persys.workload-id: someone-else}\n"),
            INVALID,
            &["services.a.labels", ALWAYS],
        ),
        // VMs: networks.
        case(
            network("v1", "docker0"),
            INVALID,
            &["spec.vm.networks[0].network", "docker0"],
        ),
        case(
            network("v2", "isolated"),
            INVALID,
            &["spec.vm.networks[0].network", "policy vm.networks"],
        ),
        case(
            network("v3", "user"),
            INVALID,
            &["spec.vm.networks[0].network", "policy vm.networks"],
        ),
        case(
            network("v4", "eth0"),
            INVALID,
            &["spec.vm.networks[0].network", "policy vm.networks"],
        ),
        // VMs: cloud-init, disks that are another workload's or the agent's
        // own files, managed volumes a VM cannot honour.
        case(
            vm_with("u1", |vm| vm.cloud_init = over_256_kib.clone()),
            INVALID,
            &[
                "spec.vm.cloud_init",
                "user-data is 262160 bytes decoded, over the limit of 262144 bytes (256 KiB)",
                ALWAYS,
            ],
        ),
        case(
            vm_with("u2", |vm| {
                vm.cloud_init_config = Some(CloudInitConfig {
                    user_data: over_256_kib.clone(),
                    ..Default::default()
                })
            }),
            INVALID,
            &[
                "spec.vm.cloud_init_config.user_data",
                "over the limit of 262144 bytes",
                ALWAYS,
            ],
        ),
        case(
            vm_with("d1", |vm| vm.disks = vec![qcow2_disk(&base_disk)]),
            INVALID,
            &[
                "spec.vm.disks[0].path",
                "is a disk of workload \"base\" (its spec.vm.disks[0].path)",
                ALWAYS,
            ],
        ),
        case(
            vm_with("d2", |vm| vm.disks = vec![qcow2_disk(&recorded)]),
            INVALID,
            &[
                "spec.vm.disks[0].path",
                "created by the agent for workload \"ghost\"",
                ALWAYS,
            ],
        ),
        case(
            vm_with("d3", |vm| {
                vm.disks = vec![DiskConfig {
                    path: format!("{state}/vm/base/seed.iso"),
                    format: "iso".into(),
                    ..Default::default()
                }]
            }),
            INVALID,
            &[
                "spec.vm.disks[0].path",
                "lies in the folder of workload \"base\"",
                ALWAYS,
            ],
        ),
        case(
            vm_with("d4", |vm| {
                vm.disks = vec![qcow2_disk(&format!("{state}/vm/d4/graphics-password"))]
            }),
            INVALID,
            &[
                "spec.vm.disks[0].path",
                "a file the agent keeps for this workload",
                ALWAYS,
            ],
        ),
        case(
            vm_with("m1", |vm| {
                vm.managed_volumes = vec![ManagedVolumeSpec {
                    name: "data".into(),
                    size_gb: 1,
                    mount_path: "/data".into(),
                    ..Default::default()
                }]
            }),
            INVALID,
            &[
                "spec.vm.managed_volumes[0].mount_path",
                "the guest formats and mounts itself",
            ],
        ),
        case(
            vm_with("m2", |vm| {
                vm.managed_volumes = vec![ManagedVolumeSpec {
                    name: "data".into(),
                    size_gb: 1,
                    retain_policy: "Retain".into(),
                    ..Default::default()
                }]
            }),
            INVALID,
            &[
                "spec.vm.managed_volumes[0].retain_policy",
                "deleted with it",
            ],
        ),
        case(
            vm_with("m3", |vm| {
                vm.managed_volumes = vec![ManagedVolumeSpec {
                    name: "../data".into(),
                    size_gb: 1,
                    ..Default::default()
                }]
            }),
            INVALID,
            &["spec.vm.managed_volumes[0].name", "letters, digits"],
        ),
        // Ceilings.
        case(
            vm_with("r1", |vm| vm.memory_mb = 2048),
            Code::ResourceExhausted,
            &[
                "workload r1",
                "node memory ceiling 4096 MiB: 3000 MiB in use, 2048 MiB requested",
                "policy ceilings.node.memory_mib",
            ],
        ),
        case(
            vm_with("r2", |vm| vm.vcpus = 100_000),
            Code::ResourceExhausted,
            &[
                "workload r2",
                "workload vCPU ceiling",
                "policy ceilings.workload.vcpus",
            ],
        ),
        case(
            vm_with("r3", |vm| {
                vm.disks = vec![DiskConfig {
                    path: "/var/lib/libvirt/images/r3.qcow2".into(),
                    format: "qcow2".into(),
                    size_gb: 101,
                    ..Default::default()
                }]
            }),
            Code::ResourceExhausted,
            &[
                "node disk ceiling 100 GiB: 0 GiB in use, 101 GiB requested",
                "policy ceilings.node.disk_gib",
            ],
        ),
        // A compose project counts its services' limits times their
        // containers.
        case(
            compose(
                "r4",
                "services:\n  web:\n    image: busybox\n    mem_limit: 1g\n    scale: 2\n",
            ),
            Code::ResourceExhausted,
            &[
                "workload r4",
                "node memory ceiling 4096 MiB: 3000 MiB in use, 2048 MiB requested",
                "policy ceilings.node.memory_mib",
            ],
        ),
        case(
            compose(
                "r5",
                "services:\n  web:\n    image: busybox\n    deploy:\n      replicas: 3\n      resources: {limits: {memory: 400m}}\n",
            ),
            Code::ResourceExhausted,
            &["node memory ceiling 4096 MiB: 3000 MiB in use, 1200 MiB requested"],
        ),
        case(
            compose(
                "r6",
                "services:\n  web: {image: busybox, mem_limit: plenty}\n",
            ),
            INVALID,
            &[file, "services.web.mem_limit", "not a size compose reads"],
        ),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for Case {
        request,
        code,
        words,
    } in cases
    {
        let id = request.id.clone();
        let error = f.client.apply_workload(request).await.unwrap_err();
        assert_eq!(error.code(), code, "{id}: {error:?}");
        for word in &words {
            assert!(
                error.message().contains(word.as_str()),
                "{id}: {:?} should name {word:?}",
                error.message()
            );
        }
        if code == INVALID && words[0] != file {
            // The field leads, then the rule.
            assert!(
                error.message().starts_with(&words[0]) || error.message().starts_with(file),
                "{id}: {:?}",
                error.message()
            );
        }
        let missing = f
            .client
            .get_workload_status(GetWorkloadStatusRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{id} was stored");
    }
    assert_eq!(
        f.ids().await,
        ["base"],
        "nothing but the base workload stored"
    );
    let applies = ListActionsRequest {
        action_type: "apply".into(),
        ..Default::default()
    };
    let recorded = f.client.list_actions(applies).await.unwrap();
    assert_eq!(
        recorded.get_ref().actions.len(),
        1,
        "only the base workload's apply was recorded"
    );
    // A re-apply of the same workload replaces its own share.
    f.client
        .apply_workload(vm_with("base", |vm| vm.memory_mb = 4096))
        .await
        .unwrap();
}

/// A compose project's limits count against the node's ceilings as a
/// container's do: once it is stored, a container that would take the
/// node over is refused, and stopping the project frees its share.
#[tokio::test]
async fn a_stored_compose_project_s_limits_count_against_the_node_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "ceilings:\n  node: {vcpus: 2, memory_mib: 2048}\n  workload: {vcpus: 2, memory_mib: 2048}\n",
    )
    .unwrap();
    let mut f = Fixture::start(&[("PERSYS_POLICY_FILE", policy.to_str().unwrap())]).await;
    let yaml = "services:\n  web:\n    image: busybox\n    mem_limit: ${MEM}\n    cpus: 0.75\n    scale: 2\n";
    let mut project = compose("limits", yaml);
    if let Some(workload_spec::Spec::Compose(c)) =
        project.spec.as_mut().and_then(|s| s.spec.as_mut())
    {
        c.env.insert("MEM".into(), "768m".into());
    }
    let mut stopped = project.clone();
    stopped.desired_state = DesiredState::Stopped as i32;
    // Stored stopped first: it holds nothing.
    f.client.apply_workload(stopped.clone()).await.unwrap();
    f.client.apply_workload(project.clone()).await.unwrap();
    let container = |id: &str, memory_mib: i64| {
        request(
            id,
            workload_spec::Spec::Container(ContainerSpec {
                image: "busybox".into(),
                resources: Some(ResourceLimits {
                    memory_bytes: memory_mib * 1024 * 1024,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
    };
    let error = f
        .client
        .apply_workload(container("extra", 1024))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error
            .message()
            .contains("node memory ceiling 2048 MiB: 1536 MiB in use, 1024 MiB requested"),
        "{}",
        error.message()
    );
    let cpu = f
        .client
        .apply_workload(request(
            "cpu",
            workload_spec::Spec::Container(ContainerSpec {
                image: "busybox".into(),
                resources: Some(ResourceLimits {
                    cpu_shares: 1024,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ))
        .await
        .unwrap_err();
    assert!(
        cpu.message()
            .contains("node vCPU ceiling 2 vCPUs: 1.5 vCPUs in use, 1 vCPUs requested"),
        "{}",
        cpu.message()
    );
    // Stopped, the project frees its share.
    f.client.apply_workload(stopped).await.unwrap();
    f.client
        .apply_workload(container("extra", 1024))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_vm_applies_naming_one_disk_store_exactly_one() {
    let mut f = Fixture::start(&[]).await;
    let disk = format!(
        "/var/lib/libvirt/images/policy-race-{}.qcow2",
        std::process::id()
    );
    let applies = (0..8).map(|i| {
        let mut client = f.client.clone();
        let request = vm_with(&format!("race{i}"), |vm| vm.disks = vec![qcow2_disk(&disk)]);
        async move { client.apply_workload(request).await }
    });
    let outcomes = futures::future::join_all(applies).await;
    let stored: Vec<_> = outcomes.iter().filter(|o| o.is_ok()).collect();
    assert_eq!(stored.len(), 1, "{outcomes:?}");
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(refused.code(), INVALID);
        assert!(
            refused.message().starts_with("spec.vm.disks[0].path")
                && refused.message().contains("is a disk of workload \"race"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(f.ids().await.len(), 1);
}

#[tokio::test]
async fn switches_opened_in_the_policy_file_let_the_matching_specs_through() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "host_paths:\n  allowed_roots: [{}]\ncontainers:\n  privileged: true\n  host_network: true\n  devices: true\n  capabilities: [NET_ADMIN]\n  sysctls: true\ncompose:\n  build: true\n  external: true\nvm:\n  networks: [default, isolated]\n",
            data.display()
        ),
    )
    .unwrap();
    let mut f = Fixture::start(&[("PERSYS_POLICY_FILE", policy.to_str().unwrap())]).await;
    let data = data.display().to_string();
    let opened = [
        bind("c1", &format!("{data}/web")),
        service("p1", "    privileged: true\n"),
        service("p2", "    network_mode: host\n"),
        service("p3", "    devices: [/dev/fuse:/dev/fuse]\n"),
        service("p4", "    cap_add: [NET_ADMIN]\n"),
        service("p5", "    sysctls: {kernel.msgmax: 65536}\n"),
        service("b1", &format!("    volumes: ['{data}/a:/a']\n")),
        compose(
            "b2",
            "services:\n  a: {image: x}\nvolumes:\n  v: {external: true}\n",
        ),
        compose(
            "f1",
            "services:\n  a:\n    build: {context: ., dockerfile: Dockerfile}\n",
        ),
        network("v1", "isolated"),
    ];
    let mut ids: Vec<String> = Vec::new();
    for request in opened {
        let id = request.id.clone();
        let response = f
            .client
            .apply_workload(request)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"))
            .into_inner();
        assert!(response.applied, "{id}");
        ids.push(id);
    }
    ids.sort();
    assert_eq!(f.ids().await, ids);
    // What stays closed: the switches left out, and what no switch opens.
    for (request, words) in [
        (
            service("n1", "    pid: host\n"),
            "policy containers.host_pid",
        ),
        (
            service("n2", "    cap_add: [SYS_ADMIN]\n"),
            "policy containers.capabilities",
        ),
        (bind("n3", "/var/run/docker.sock"), ALWAYS),
        (network("n4", "docker0"), "docker0"),
    ] {
        let error = f.client.apply_workload(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains(words), "{}", error.message());
    }
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// User plus system CPU time of a process, in clock ticks (10 ms).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state is field 3, utime 14.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn billion_laughs() -> String {
    persys_test_support::billion_laughs("", "services:\n  web:\n    image: x\n    command: *i\n")
}

#[tokio::test]
async fn an_alias_bomb_is_refused_quickly_and_without_memory_growth() {
    let mut f = Fixture::start(&[]).await;
    let pid = f.agent.child.id();
    // Warm the apply path first, so the measure is the bomb's alone.
    f.client
        .apply_workload(compose(
            "warm",
            "services:\n  web: {image: x, command: [a, b]}\n",
        ))
        .await
        .unwrap();
    let before = rss_kib(pid);
    let cpu_before = cpu_ticks(pid);
    let bomb = billion_laughs();
    assert!(bomb.len() < 1024);
    for i in 0..5 {
        let start = Instant::now();
        let error = f
            .client
            .apply_workload(compose(&format!("bomb{i}"), &bomb))
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(
            error.message().starts_with("spec.compose.compose_yaml")
                && error.message().contains("more than 100000 nodes"),
            "{}",
            error.message()
        );
        assert!(took < Duration::from_secs(2), "bomb {i} took {took:?}");
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 20 * 1024, "RSS grew by {grown} KiB");
    // The agent's CPU time for five bombs (and their TLS calls): under
    // 100 ms each, in clock ticks of 10 ms.
    let spent = cpu_ticks(pid) - cpu_before;
    assert!(spent < 5 * 10, "five bombs took {spent} ticks of CPU");
    // Over the size cap: refused before parsing.
    let big = format!(
        "services:\n  web:\n    image: x\n# {}\n",
        "x".repeat(1024 * 1024)
    );
    let refused = f.client.apply_workload(compose("big", &big)).await;
    let status = refused.expect_err("a compose file over 1 MiB is refused");
    let over_cap = status.message().contains("1048576-byte limit");
    assert!(
        status.code() == Code::InvalidArgument && over_cap,
        "{status:?}"
    );
    assert_eq!(f.ids().await, ["warm"]);
}

#[tokio::test]
async fn the_workload_count_ceiling_counts_every_stored_workload_but_the_one_applied() {
    let mut f = Fixture::start(&[("PERSYS_POLICY_MAX_WORKLOADS", "1")]).await;
    f.client.apply_workload(bind_free("a", "r1")).await.unwrap();
    let error = f
        .client
        .apply_workload(bind_free("b", "r1"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(
        error.message().contains(
            "node workload ceiling 1: 1 stored, 1 requested (policy ceilings.node.workloads)"
        ),
        "{}",
        error.message()
    );
    // The stored one may change.
    let response = f
        .client
        .apply_workload(bind_free("a", "r2"))
        .await
        .unwrap()
        .into_inner();
    assert!(response.applied);
    assert_eq!(f.ids().await, ["a"]);
}

fn bind_free(id: &str, revision: &str) -> ApplyWorkloadRequest {
    let mut request = request(
        id,
        workload_spec::Spec::Container(ContainerSpec {
            image: "persys-test/busybox:latest".into(),
            ..Default::default()
        }),
    );
    request.revision_id = revision.into();
    request
}

#[test]
fn policy_show_prints_the_policy_in_force_and_a_bad_file_exits_2_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, "vm:\n  networks: [default]\n  bridges: [br0]\n").unwrap();
    let show = |env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"));
        command.env_clear().args(["policy", "show"]);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let output = show(&[
        ("PERSYS_POLICY_FILE", file.to_str().unwrap()),
        ("PERSYS_POLICY_COMPOSE_BUILD", "true"),
    ]);
    let text = String::from_utf8(output.stdout).unwrap();
    let missing: Vec<&str> = [
        "allowed_roots:\n  - /var/lib/persys/volumes",
        "privileged: false",
        "build: true",
        "bridges:\n  - br0",
        "workloads: 1000",
    ]
    .into_iter()
    .filter(|line| !text.contains(line))
    .collect();
    assert!(
        output.status.success() && missing.is_empty(),
        "{missing:?} missing from:\n{text}"
    );
    std::fs::write(&file, "vm:\n  networks: [default]\n  bridges: [docker0]\n").unwrap();
    let output = show(&[("PERSYS_POLICY_FILE", file.to_str().unwrap())]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3: vm.bridges", file.display())),
        "{stderr}"
    );
    // The agent itself refuses to start on it, the same way.
    let state = dir.path().join("state");
    let output = offline_agent(&state)
        .env("PERSYS_POLICY_FILE", &file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("{}:3", file.display())),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The example specs of the Go agent's README, as they are written there:
/// they apply once the policy opens their host path and sizes.
#[tokio::test]
async fn the_go_agent_s_example_specs_apply_under_a_policy_that_allows_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "host_paths:\n  allowed_roots: [/data]\nceilings:\n  node: {vcpus: 8, memory_mib: 16384, disk_gib: 100}\n  workload: {vcpus: 4, memory_mib: 8192, disk_gib: 50}\n",
    )
    .unwrap();
    let mut f = Fixture::start(&[("PERSYS_POLICY_FILE", policy.to_str().unwrap())]).await;
    let container = ContainerSpec {
        image: "nginx:latest".into(),
        command: vec!["/bin/sh".into()],
        args: vec!["-c".into(), "nginx -g 'daemon off;'".into()],
        env: [("ENV_VAR".to_string(), "value".to_string())].into(),
        volumes: vec![VolumeMount {
            host_path: "/data".into(),
            container_path: "/app/data".into(),
            read_only: false,
        }],
        ports: vec![PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
        }],
        resources: Some(ResourceLimits {
            cpu_shares: 1024,
            memory_bytes: 536870912,
            memory_swap_bytes: 0,
        }),
        restart_policy: Some(RestartPolicy {
            policy: "unless-stopped".into(),
            max_retry_count: 3,
        }),
        ..Default::default()
    };
    let vm = VmSpec {
        name: "web-vm".into(),
        vcpus: 4,
        memory_mb: 8192,
        disks: vec![DiskConfig {
            path: "/var/lib/libvirt/images/web-vm.qcow2".into(),
            device: "vda".into(),
            format: "qcow2".into(),
            size_gb: 50,
            ..Default::default()
        }],
        networks: vec![NetworkConfig {
            network: "default".into(),
            mac_address: "52:54:00:12:34:56".into(),
            ip_address: "192.168.122.100".into(),
        }],
        ..Default::default()
    };
    let myapp = ComposeSpec {
        probes: Default::default(),
        project_name: "myapp".into(),
        compose_yaml: "services:\n  web:\n    image: nginx:latest\n    ports: ['8080:80']\n    environment:\n      DATABASE_URL: ${DATABASE_URL}\n".into(),
        env: [("DATABASE_URL".to_string(), "postgres://db/app".to_string())].into(),
    };
    for (id, spec) in [
        ("web", workload_spec::Spec::Container(container)),
        ("web-vm", workload_spec::Spec::Vm(vm)),
        ("myapp", workload_spec::Spec::Compose(myapp)),
    ] {
        let response = f
            .client
            .apply_workload(request(id, spec))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert!(response.get_ref().applied, "{id}");
    }
    assert_eq!(f.ids().await, ["myapp", "web", "web-vm"]);
}
