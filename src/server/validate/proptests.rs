//! Apply validation against random requests of every type, drawn from
//! values each rule accepts and values it refuses: it never panics, it is
//! deterministic, a refusal names a field of the request, and a request it
//! accepts is accepted again, as the same store write, after a protobuf
//! encode and decode (what the scheduler's bytes go through). A check
//! below keeps the generators honest: each type reaches accepted requests.

use std::cell::RefCell;
use std::sync::Arc;

use base64::Engine;
use persys_api::v1::{
    ApplyWorkloadRequest, CloudInitConfig, ComposeSpec, ContainerSpec, DiskConfig,
    ManagedVolumeSpec, NetworkConfig, PortMapping, ResourceLimits, RestartPolicy, VmSpec,
    VolumeMount, WorkloadSpec, workload_spec,
};
use persys_controllers::compose::ComposeEnvironment;
use persys_controllers::docker::HostPathPolicy;
use persys_controllers::policy::NodePolicy;
use persys_test_support::compose::compose_file;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

use super::{FieldError, Limits, apply_request};
use crate::store::ApplyRequest;

/// Stands for the VM disk root in generated paths.
const ROOT: &str = "{ROOT}";

/// Limits of a node with the default policy, a VM disk root and no host
/// bridges; one per test thread, with its folders.
struct Node {
    limits: Limits,
    root: String,
    _dir: tempfile::TempDir,
}

thread_local! {
    static NODE: RefCell<Option<Node>> = const { RefCell::new(None) };
}

fn with_node<T>(f: impl FnOnce(&Node) -> T) -> T {
    NODE.with(|node| {
        let mut node = node.borrow_mut();
        let node = node.get_or_insert_with(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            let disks = dir.path().join("disks");
            let net = dir.path().join("net");
            std::fs::create_dir_all(&disks).expect("disk root");
            std::fs::create_dir_all(&net).expect("fake /sys/class/net");
            std::fs::write(disks.join("existing.qcow2"), b"").expect("a disk file");
            Node {
                root: disks.display().to_string(),
                limits: Limits {
                    host_paths: HostPathPolicy::default(),
                    vm_disk_roots: vec![disks],
                    vm_root: dir.path().join("vm"),
                    policy: Arc::new(NodePolicy::default()),
                    sys_class_net: net,
                    compose_env: ComposeEnvironment::new(Vec::new(), "unix:///var/run/docker.sock"),
                },
                _dir: dir,
            }
        });
        f(node)
    })
}

fn one_of<T: Clone + std::fmt::Debug + 'static>(values: &[T]) -> impl Strategy<Value = T> + use<T> {
    prop::sample::select(values.to_vec())
}

/// Mostly one of `good` (values the rule accepts), sometimes one of `bad`
/// or anything: a request of many fields is then accepted often enough.
fn text(good: &[&'static str], bad: &[&'static str]) -> impl Strategy<Value = String> + use<> {
    prop_oneof![
        40 => one_of(good).prop_map(String::from),
        1 => one_of(bad).prop_map(String::from),
        1 => ".{0,10}",
    ]
}

fn int<T>(good: &[T], bad: &[T]) -> impl Strategy<Value = T> + use<T>
where
    T: Clone + std::fmt::Debug + proptest::arbitrary::Arbitrary + 'static,
{
    prop_oneof![40 => one_of(good), 1 => one_of(bad), 1 => any::<T>()]
}

fn env() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
    prop::collection::btree_map(
        text(
            &["A", "V_1", "HTTP_PORT"],
            &["", "A=B", "PATH", "LD_PRELOAD"],
        ),
        text(&["1", "x y", "it's", "é"], &["${HOME}", "$HOME", "nul\0"]),
        0..3,
    )
}

fn managed_volume() -> impl Strategy<Value = ManagedVolumeSpec> {
    (
        text(&["data", "cache-1"], &["bad name", ""]),
        text(&["", "local"], &["nfs"]),
        int(&[0i64, 1, 10], &[-1]),
        text(&["/data", "/var/cache"], &["data", "/a:b"]),
        any::<bool>(),
        text(&["", "Delete", "Retain"], &["keep"]),
    )
        .prop_map(
            |(name, driver, size_gb, mount_path, read_only, retain_policy)| ManagedVolumeSpec {
                name,
                driver,
                size_gb,
                mount_path,
                read_only,
                retain_policy,
                ..Default::default()
            },
        )
}

fn container() -> impl Strategy<Value = ContainerSpec> {
    (
        text(
            &[
                "busybox",
                "nginx:1.25",
                "ghcr.io/team/app:v1",
                "localhost:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ],
            &["UPPER/case", ""],
        ),
        prop::collection::vec(text(&["sh", "-c", "echo hi"], &[""]), 0..3),
        env(),
        prop::collection::vec(
            (
                text(
                    &["/var/lib/persys/volumes/data"],
                    &["/etc", "/var/run/docker.sock", "relative", "/var/lib/persys/volumes/../x"],
                ),
                text(&["/data", "/x/y"], &["rel", "/a:b"]),
                any::<bool>(),
            )
                .prop_map(|(host_path, container_path, read_only)| VolumeMount {
                    host_path,
                    container_path,
                    read_only,
                }),
            0..2,
        ),
        prop::collection::vec(
            (
                int(&[0, 8080, 8081], &[70000, -1]),
                int(&[80, 443], &[0, 65536]),
                text(&["", "tcp", "udp"], &["TCP", "sctp"]),
            )
                .prop_map(|(host_port, container_port, protocol)| PortMapping {
                    host_port,
                    container_port,
                    protocol,
                }),
            0..3,
        ),
        prop::option::of(
            (
                int(&[0i64, 512], &[-1]),
                int(&[0i64, 64 << 20], &[1, -1]),
                int(&[0i64, -1], &[-2, 1]),
            )
                .prop_map(|(cpu_shares, memory_bytes, memory_swap_bytes)| ResourceLimits {
                    cpu_shares,
                    memory_bytes,
                    memory_swap_bytes,
                }),
        ),
        prop::option::of(
            (
                text(&["", "no", "always", "on-failure", "unless-stopped"], &["sometimes"]),
                int(&[0, 3], &[-1]),
            )
                .prop_map(|(policy, max_retry_count)| RestartPolicy {
                    policy,
                    max_retry_count,
                }),
        ),
        prop::collection::btree_map(
            text(&["app", "tier"], &["persys.workload-id"]),
            text(&["web", ""], &["\0"]),
            0..2,
        ),
        prop::collection::vec(managed_volume(), 0..2),
        text(&["", "IfNotPresent", "Always", "Never"], &["Sometimes"]),
        int(&[0, 10, 3600, 7200], &[-1]),
    )
        .prop_map(
            |(
                image,
                command,
                env,
                volumes,
                ports,
                resources,
                restart_policy,
                labels,
                managed_volumes,
                image_pull_policy,
                stop_grace_period_seconds,
            )| ContainerSpec {
                liveness_probe: None,
                readiness_probe: None,
                image,
                args: command.clone(),
                command,
                env,
                volumes,
                ports,
                resources,
                restart_policy,
                labels,
                managed_volumes,
                image_pull_policy,
                stop_grace_period_seconds,
            },
        )
}

fn compose() -> impl Strategy<Value = ComposeSpec> {
    (
        text(&["", "shop", "a_b"], &["My-App"]),
        compose_file(),
        any::<bool>(),
        env(),
    )
        .prop_map(|(project_name, file, base64, env)| ComposeSpec {
            probes: Default::default(),
            project_name,
            compose_yaml: if base64 {
                base64::engine::general_purpose::STANDARD.encode(&file.text)
            } else {
                file.text
            },
            env,
        })
}

fn vm() -> impl Strategy<Value = VmSpec> {
    (
        text(&["", "vm-1"], &["bad name"]),
        int(&[1, 2], &[0, -1]),
        int(&[64i64, 512, 2048], &[0, 63]),
        prop::collection::vec(
            (
                text(
                    &["{ROOT}/a.qcow2", "{ROOT}/existing.qcow2", "{ROOT}/b.img"],
                    &["/etc/passwd", "rel.qcow2", "{ROOT}/../x.qcow2", ""],
                ),
                text(&["", "vda", "vdb", "sda"], &["hdc", "xyz"]),
                text(&["", "qcow2", "raw"], &["iso", "vmdk"]),
                int(&[0i64, 1, 10], &[-1]),
                text(&["", "disk"], &["cdrom", "floppy"]),
                any::<bool>(),
            )
                .prop_map(|(path, device, format, size_gb, r#type, boot)| DiskConfig {
                    path,
                    device,
                    format,
                    size_gb,
                    r#type,
                    boot,
                }),
            0..3,
        ),
        prop::collection::vec(
            (
                text(&["default"], &["user", "br0", "docker0", "", "other"]),
                text(&["", "52:54:00:12:34:56"], &["zz", "01:00:5e:00:00:01"]),
                text(&["", "192.168.122.10"], &["999.1.1.1", "::1"]),
            )
                .prop_map(|(network, mac_address, ip_address)| NetworkConfig {
                    network,
                    mac_address,
                    ip_address,
                }),
            0..2,
        ),
        text(&["", "#cloud-config\nhostname: x\n"], &["x"]),
        prop::collection::btree_map(
            text(&["owner", "graphics"], &["\0"]),
            text(&["vnc", "spice", "none"], &["bogus"]),
            0..2,
        ),
        prop::option::of(
            (
                text(&["", "#cloud-config\n"], &["\0"]),
                text(&["", "instance-id: x\n"], &["\0"]),
            )
                .prop_map(|(user_data, meta_data)| CloudInitConfig {
                    user_data,
                    meta_data,
                    ..Default::default()
                }),
        ),
        prop::collection::vec(managed_volume(), 0..2),
    )
        .prop_map(
            |(
                name,
                vcpus,
                memory_mb,
                disks,
                networks,
                cloud_init,
                metadata,
                cloud_init_config,
                managed_volumes,
            )| VmSpec {
                name,
                vcpus,
                memory_mb,
                disks,
                networks,
                cloud_init,
                metadata,
                cloud_init_config,
                managed_volumes,
            },
        )
}

fn request() -> impl Strategy<Value = ApplyWorkloadRequest> {
    (
        text(&["web", "vm-1", "a.b_c-1"], &["", "-x", "a/b", ".."]),
        int(&[0], &[1, 2, 3, 4]),
        text(&["", "r1"], &["rev\u{7}"]),
        int(&[0, 1, 2], &[3]),
        prop::option::of(prop_oneof![
            container().prop_map(workload_spec::Spec::Container),
            compose().prop_map(workload_spec::Spec::Compose),
            vm().prop_map(workload_spec::Spec::Vm),
        ]),
    )
        .prop_map(
            |(id, r#type, revision_id, desired_state, spec)| ApplyWorkloadRequest {
                id,
                r#type,
                revision_id,
                desired_state,
                spec: Some(WorkloadSpec { spec }),
            },
        )
}

/// The request with the node's disk root in its VM disk paths.
fn on_node(mut request: ApplyWorkloadRequest, node: &Node) -> ApplyWorkloadRequest {
    if let Some(workload_spec::Spec::Vm(vm)) = request.spec.as_mut().and_then(|s| s.spec.as_mut()) {
        for disk in &mut vm.disks {
            disk.path = disk.path.replace(ROOT, &node.root);
        }
    }
    request
}

/// What a store write is made of, comparable.
fn parts(apply: &ApplyRequest) -> impl PartialEq + std::fmt::Debug + use<> {
    (
        apply.id.clone(),
        apply.workload_type,
        apply.revision_id.clone(),
        apply.desired_state,
        apply.spec.clone(),
        apply.finalizers.clone(),
    )
}

fn judge(request: &ApplyWorkloadRequest, limits: &Limits) -> Result<ApplyRequest, FieldError> {
    apply_request(request.clone(), limits)
}

const FIELDS: [&str; 5] = ["id", "type", "desired_state", "revision_id", "spec"];

fn check(request: ApplyWorkloadRequest) -> Result<(), TestCaseError> {
    with_node(|node| {
        let request = on_node(request, node);
        let first = judge(&request, &node.limits);
        let second = judge(&request, &node.limits);
        match (&first, &second) {
            (Ok(a), Ok(b)) => prop_assert_eq!(parts(a), parts(b), "deterministic"),
            (Err(a), Err(b)) => prop_assert_eq!(a, b, "deterministic"),
            _ => prop_assert!(
                false,
                "one request, two verdicts: {:?} / {:?}",
                first.as_ref().err(),
                second.as_ref().err()
            ),
        }
        match first {
            Err(error) => prop_assert!(
                FIELDS
                    .iter()
                    .any(|f| error.field == *f || error.field.starts_with(&format!("{f}."))),
                "the refusal names no field of the request: {}",
                error
            ),
            Ok(apply) => {
                let decoded = ApplyWorkloadRequest::decode(&*request.encode_to_vec())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&decoded, &request, "protobuf round trip");
                let again = judge(&decoded, &node.limits).map_err(|e| {
                    TestCaseError::fail(format!("valid, then refused after a round trip: {e}"))
                })?;
                prop_assert_eq!(parts(&again), parts(&apply));
            }
        }
        Ok(())
    })
}

proptest! {
    #[test]
    fn apply_validation_is_total_deterministic_and_stable_across_a_protobuf_round_trip(
        request in request()
    ) {
        check(request)?;
    }
}

#[test]
fn the_request_generator_reaches_accepted_requests_of_every_type() {
    let mut runner = TestRunner::new(Config::default());
    let strategy = request();
    let mut accepted = [0usize; 3];
    let mut drawn = 0;
    while drawn < 3000 && accepted.iter().any(|n| *n < 5) {
        drawn += 1;
        let request = strategy.new_tree(&mut runner).expect("a request").current();
        let accepted_type = with_node(|node| {
            let request = on_node(request, node);
            judge(&request, &node.limits).ok().map(|a| a.workload_type)
        });
        if let Some(t) = accepted_type {
            accepted[(t as usize).saturating_sub(1).min(2)] += 1;
        }
    }
    assert!(
        accepted.iter().all(|n| *n >= 5),
        "accepted (container, compose, vm) of {drawn}: {accepted:?}"
    );
}
