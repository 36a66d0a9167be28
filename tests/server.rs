//! The persys.agent.v1 contract, driven over real mutual TLS against the
//! real agent binary.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    AgentProcess, Authority, Certs, UNREACHABLE_RUNTIMES, channel_with, client, client_with,
    http_get, sample,
};
use futures::StreamExt;
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::Code;
use tonic::transport::Channel;

struct Fixture {
    _dir: tempfile::TempDir,
    certs: Certs,
    agent: AgentProcess,
    client: AgentServiceClient<Channel>,
}

async fn start(env: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, env).await;
    let client = client(agent.port, &certs).await.unwrap();
    Fixture {
        _dir: dir,
        certs,
        agent,
        client,
    }
}

fn container(id: &str, revision: &str, image: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        revision_id: revision.into(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: image.into(),
                ..Default::default()
            })),
        }),
    }
}

fn compose(id: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Compose as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                probes: Default::default(),
                project_name: String::new(),
                compose_yaml: "services:\n  web:\n    image: persys-test/busybox:latest\n".into(),
                env: Default::default(),
            })),
        }),
    }
}

fn vm(id: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Vm as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Vm(VmSpec {
                vcpus: 1,
                memory_mb: 128,
                ..Default::default()
            })),
        }),
    }
}

async fn list(client: &mut AgentServiceClient<Channel>, kind: WorkloadType) -> Vec<String> {
    client
        .list_workloads(ListWorkloadsRequest {
            r#type: kind as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .workloads
        .into_iter()
        .map(|w| w.id)
        .collect()
}

#[tokio::test]
async fn apply_is_applied_then_skipped_and_a_reused_revision_is_refused() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let first = f
        .client
        .apply_workload(container("web", "r1", "nginx:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.applied && !first.skipped, "{first:?}");
    let status = first.status.unwrap();
    assert_eq!(status.id, "web");
    assert_eq!(status.revision_id, "r1");
    assert_eq!(status.desired_state(), DesiredState::Running);
    assert_eq!(status.actual_state(), ActualState::Pending);
    assert_eq!(status.metadata["generation"], "1");

    let again = f
        .client
        .apply_workload(container("web", "r1", "nginx:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.applied && again.skipped, "{again:?}");

    let refused = f
        .client
        .apply_workload(container("web", "r1", "nginx:2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("r1"), "{}", refused.message());
    let stored = f
        .client
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .unwrap()
        .into_inner()
        .workload
        .unwrap();
    assert_eq!(
        stored.workload_spec(),
        container("web", "r1", "nginx:1")
            .spec
            .unwrap()
            .spec
            .as_ref()
    );

    let updated = f
        .client
        .apply_workload(container("web", "r2", "nginx:2"))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.applied);
    assert_eq!(updated.status.unwrap().metadata["generation"], "2");
}

#[tokio::test]
async fn an_empty_revision_is_derived_so_resending_the_spec_is_skipped() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let first = f
        .client
        .apply_workload(container("web", "", "nginx:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.applied);
    let revision = first.status.unwrap().revision_id;
    assert_eq!(revision.len(), 12, "{revision}");
    let second = f
        .client
        .apply_workload(container("web", "", "nginx:1"))
        .await
        .unwrap()
        .into_inner();
    assert!(second.skipped);
    assert_eq!(second.status.unwrap().revision_id, revision);
}

#[tokio::test]
async fn unspecified_type_and_desired_state_mean_container_and_running() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let mut request = container("web", "", "nginx:1");
    request.r#type = 0;
    request.desired_state = 0;
    let status = f
        .client
        .apply_workload(request)
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.r#type(), WorkloadType::Container);
    assert_eq!(status.desired_state(), DesiredState::Running);
}

#[tokio::test]
async fn unknown_ids_are_not_found_and_deleting_them_succeeds() {
    let mut f = start(&[]).await;
    let error = f
        .client
        .get_workload_status(GetWorkloadStatusRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(error.message(), "workload nope not found");
    let deleted = f
        .client
        .delete_workload(DeleteWorkloadRequest { id: "nope".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.success, "{deleted:?}");
}

#[tokio::test]
async fn list_filters_by_type_and_delete_is_recorded_in_actions() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    f.client
        .apply_workload(container("c1", "", "nginx:1"))
        .await
        .unwrap();
    f.client
        .apply_workload(container("c2", "", "nginx:1"))
        .await
        .unwrap();
    f.client.apply_workload(compose("p1")).await.unwrap();
    f.client.apply_workload(vm("v1")).await.unwrap();
    assert_eq!(
        list(&mut f.client, WorkloadType::Unspecified).await,
        ["c1", "c2", "p1", "v1"]
    );
    assert_eq!(
        list(&mut f.client, WorkloadType::Container).await,
        ["c1", "c2"]
    );
    assert_eq!(list(&mut f.client, WorkloadType::Compose).await, ["p1"]);
    assert_eq!(list(&mut f.client, WorkloadType::Vm).await, ["v1"]);

    let deleted = f
        .client
        .delete_workload(DeleteWorkloadRequest { id: "c1".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.success);
    // The Docker controller owns c1's finalizer and its runtime is down, so it
    // stays, marked for deletion.
    let status = f
        .client
        .get_workload_status(GetWorkloadStatusRequest { id: "c1".into() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(
        status.metadata.contains_key("deletion_timestamp"),
        "{status:?}"
    );

    // The controllers' status writes ("reconcile") may land after the
    // delete, so the newest of the API's own actions is looked for.
    let actions = f
        .client
        .list_actions(ListActionsRequest {
            newest_first: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    let api_actions: Vec<_> = actions
        .iter()
        .filter(|a| a.action_type != "reconcile")
        .collect();
    assert_eq!(api_actions.len(), 5, "{actions:?}");
    assert_eq!(api_actions[0].workload_id, "c1");
    assert_eq!(api_actions[0].action_type, "delete_workload");
    let newest_applies: Vec<String> = f
        .client
        .list_actions(ListActionsRequest {
            newest_first: true,
            action_type: "apply_workload".into(),
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions
        .into_iter()
        .map(|a| a.workload_id)
        .collect();
    assert_eq!(newest_applies, ["v1", "p1", "c2"]);
    let mut ids: Vec<u64> = actions.iter().map(|a| a.task_id.parse().unwrap()).collect();
    let sorted = {
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.clone()
    };
    assert_eq!(ids, sorted, "newest first");
    let applies_of_c2 = f
        .client
        .list_actions(ListActionsRequest {
            workload_id: "c2".into(),
            action_type: "apply".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(applies_of_c2.len(), 1);
    assert!(applies_of_c2[0].created_at > 1_700_000_000);
}

#[tokio::test]
async fn a_type_whose_runtime_is_disabled_is_refused() {
    let mut f = start(&[]).await;
    for request in [container("c", "", "nginx"), compose("p"), vm("v")] {
        let error = f.client.apply_workload(request).await.unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(error.message().contains("disabled"), "{}", error.message());
        assert!(
            error.message().contains("_ENABLED=false"),
            "{}",
            error.message()
        );
    }
    assert!(
        list(&mut f.client, WorkloadType::Unspecified)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn every_invalid_request_is_refused_naming_the_field_and_stores_nothing() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let with_container = |id: &str, edit: &dyn Fn(&mut ContainerSpec)| {
        let mut request = container(id, "", "nginx:1");
        if let Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(c)),
        }) = request.spec.as_mut()
        {
            edit(c);
        }
        request
    };
    let with_vm = |edit: &dyn Fn(&mut VmSpec)| {
        let mut request = vm("vm1");
        if let Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Vm(v)),
        }) = request.spec.as_mut()
        {
            edit(v);
        }
        request
    };
    let with_compose = |yaml: &str, project: &str| {
        let mut request = compose("proj");
        if let Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(c)),
        }) = request.spec.as_mut()
        {
            c.compose_yaml = yaml.into();
            c.project_name = project.into();
        }
        request
    };
    let port = |host: i32, container: i32, protocol: &str| PortMapping {
        host_port: host,
        container_port: container,
        protocol: protocol.into(),
    };
    let cases: Vec<(&str, ApplyWorkloadRequest)> = vec![
        ("id", container("", "", "nginx")),
        ("id", container("../etc", "", "nginx")),
        ("id", container("a/b", "", "nginx")),
        ("id", container("has space", "", "nginx")),
        ("id", container("..", "", "nginx")),
        ("id", container(&"x".repeat(129), "", "nginx")),
        (
            "spec",
            ApplyWorkloadRequest {
                id: "nospec".into(),
                ..Default::default()
            },
        ),
        ("type", {
            let mut r = compose("typed");
            r.r#type = WorkloadType::Container as i32;
            r
        }),
        ("spec.container.image", container("img", "", "")),
        (
            "spec.container.image",
            container("img", "", "Not A Valid/Image"),
        ),
        (
            "spec.container.ports[0].container_port",
            with_container("p", &|c| c.ports = vec![port(80, 0, "tcp")]),
        ),
        (
            "spec.container.ports[0].container_port",
            with_container("p", &|c| c.ports = vec![port(80, 70000, "tcp")]),
        ),
        (
            "spec.container.ports[0].host_port",
            with_container("p", &|c| c.ports = vec![port(-1, 80, "tcp")]),
        ),
        (
            "spec.container.ports[0].protocol",
            with_container("p", &|c| c.ports = vec![port(80, 80, "sctp")]),
        ),
        (
            "spec.container.resources.memory_bytes",
            with_container("r", &|c| {
                c.resources = Some(ResourceLimits {
                    memory_bytes: -5,
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.container.resources.cpu_shares",
            with_container("r", &|c| {
                c.resources = Some(ResourceLimits {
                    cpu_shares: -1,
                    ..Default::default()
                })
            }),
        ),
        (
            "spec.container.restart_policy.policy",
            with_container("rp", &|c| {
                c.restart_policy = Some(RestartPolicy {
                    policy: "sometimes".into(),
                    max_retry_count: 0,
                })
            }),
        ),
        (
            "spec.container.env",
            with_container("e", &|c| {
                c.env.insert("BAD=NAME".into(), "x".into());
            }),
        ),
        (
            "spec.container.volumes[0].host_path",
            with_container("v", &|c| {
                c.volumes = vec![VolumeMount {
                    host_path: "/etc".into(),
                    container_path: "/x".into(),
                    read_only: true,
                }]
            }),
        ),
        (
            "spec.container.volumes[0].host_path",
            with_container("v", &|c| {
                c.volumes = vec![VolumeMount {
                    host_path: "/var/run/docker.sock".into(),
                    container_path: "/x".into(),
                    read_only: false,
                }]
            }),
        ),
        ("spec.compose.compose_yaml", with_compose("!!!", "")),
        (
            "spec.compose.compose_yaml",
            with_compose("version: '3'\n", ""),
        ),
        (
            "spec.compose.compose_yaml",
            with_compose("services: [unclosed\n", ""),
        ),
        (
            "spec.compose.project_name",
            with_compose("services:\n  a:\n    image: x\n", "Bad Name"),
        ),
        ("spec.vm.vcpus", with_vm(&|v| v.vcpus = 0)),
        ("spec.vm.memory_mb", with_vm(&|v| v.memory_mb = 32)),
        // The VM controller's own rules, run at apply.
        (
            "spec.vm.metadata[\"graphics\"]",
            with_vm(&|v| {
                v.metadata.insert("graphics".into(), "rdp".into());
            }),
        ),
        (
            "spec.vm.disks[0].format",
            with_vm(&|v| {
                v.disks = vec![DiskConfig {
                    path: "/var/lib/libvirt/images/a.img".into(),
                    format: "vmdk".into(),
                    ..Default::default()
                }]
            }),
        ),
        (
            "spec.vm.disks[0].path",
            with_vm(&|v| {
                v.disks = vec![DiskConfig {
                    path: "/dev/sda".into(),
                    format: "raw".into(),
                    ..Default::default()
                }]
            }),
        ),
    ];
    for (field, request) in cases {
        let error = f.client.apply_workload(request.clone()).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {error:?}");
        assert!(
            error.message().starts_with(field),
            "expected {field}, got {:?}",
            error.message()
        );
    }
    assert!(
        list(&mut f.client, WorkloadType::Unspecified)
            .await
            .is_empty(),
        "nothing stored"
    );
    let actions = f
        .client
        .list_actions(ListActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert!(actions.is_empty());
}

#[tokio::test]
async fn a_request_over_four_mebibytes_is_refused() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let mut request = container("big", "", "nginx");
    if let Some(WorkloadSpec {
        spec: Some(workload_spec::Spec::Container(c)),
    }) = request.spec.as_mut()
    {
        c.env.insert("BLOB".into(), "x".repeat(5 * 1024 * 1024));
    }
    let error = f.client.apply_workload(request).await.unwrap_err();
    // gRPC's status table: a message over the receive limit is
    // RESOURCE_EXHAUSTED (tonic's own answer, OUT_OF_RANGE, is rewritten).
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(error.message().contains("4194304"), "{}", error.message());
    assert!(
        list(&mut f.client, WorkloadType::Unspecified)
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn health_reports_version_runtimes_and_utilisation() {
    let mut f = start(&[("PERSYS_VERSION", "9.9.9-test")]).await;
    let health = f
        .client
        .health_check(HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy);
    assert_eq!(health.version, "9.9.9-test");
    assert!((0.0..=100.0).contains(&health.memory_utilization));
    assert!(health.memory_utilization > 0.0, "sampled at start");
    assert!((0.0..=100.0).contains(&health.disk_utilization));
    assert!(health.disk_utilization > 0.0);
}

#[tokio::test]
async fn an_unreachable_runtime_is_reported_and_does_not_stop_the_agent() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    let health = f
        .client
        .health_check(HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy, "the agent serves");
    for runtime in ["docker", "compose", "vm"] {
        let status = health
            .runtime_status
            .get(runtime)
            .unwrap_or_else(|| panic!("{runtime} in {health:?}"));
        assert_ne!(status, "healthy", "{runtime}");
    }
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_a_foreign_ca_are_refused() {
    let f = start(&[]).await;
    // No client certificate: TLS 1.3 lets the handshake finish on the client
    // side, so the refusal arrives as the first RPC's failure.
    let outcome = match client_with(f.agent.port, &f.certs.ca.cert_pem, None).await {
        Ok(mut client) => client
            .health_check(HealthCheckRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a client without a certificate got an answer"
    );

    let foreign = Authority::new("someone else");
    let (cert, key) = foreign.leaf("intruder", false);
    let outcome = match client_with(f.agent.port, &f.certs.ca.cert_pem, Some((&cert, &key))).await {
        Ok(mut client) => client
            .health_check(HealthCheckRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(outcome.is_err(), "a client from a foreign CA got an answer");

    // The right client still works.
    let mut ok = client(f.agent.port, &f.certs).await.unwrap();
    assert!(ok.health_check(HealthCheckRequest {}).await.is_ok());
}

/// The first RPC's outcome for a client presenting `cert` and `key`: with
/// TLS 1.3 the client finishes its side of the handshake before the server
/// has verified the certificate, so a refusal shows as that RPC failing.
async fn first_rpc(f: &Fixture, cert: &str, key: &str) -> Result<(), String> {
    match client_with(f.agent.port, &f.certs.ca.cert_pem, Some((cert, key))).await {
        Ok(mut client) => client
            .health_check(HealthCheckRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn handshake_failures(f: &Fixture, reason: &str) -> f64 {
    let (_, metrics) = http_get(f.agent.metrics_port, "/metrics");
    sample(
        &metrics,
        &format!("persys_agent_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {reason} handshake failure series in:\n{metrics}"))
}

#[tokio::test]
async fn a_client_certificate_without_client_auth_is_refused_at_the_handshake() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let f = start(&[]).await;
    assert_eq!(handshake_failures(&f, "refused"), 0.0);
    assert_eq!(handshake_failures(&f, "timeout"), 0.0);
    // Another node's server certificate from the same CA: serverAuth only.
    let (cert, key) = f.certs.ca.leaf("persysctl", true);
    let outcome = first_rpc(&f, &cert, &key).await;
    assert!(
        outcome.is_err(),
        "a serverAuth-only certificate got an answer"
    );
    // No extended key usage at all: webpki alone would accept it.
    let (cert, key) = f.certs.ca.leaf_with("persysctl", vec![], &[]);
    let outcome = first_rpc(&f, &cert, &key).await;
    assert!(outcome.is_err(), "a certificate without EKU got an answer");
    // Both uses: fine.
    let (cert, key) = f
        .certs
        .ca
        .leaf_with("persysctl", vec![], &[ServerAuth, ClientAuth]);
    first_rpc(&f, &cert, &key).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake_failures(&f, "refused") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "refused handshakes not counted:\n{}",
            f.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (tonic's channel may dial again after a refusal: at least two.)
    let log = f.agent.log_text();
    assert!(
        log.contains("TLS handshake failed") && log.contains("client authentication"),
        "{log}"
    );
    // Several failures from one address within a minute: one line.
    assert_eq!(log.matches("TLS handshake failed").count(), 1, "{log}");
}

#[tokio::test]
async fn a_connection_that_never_says_hello_does_not_stop_other_clients() {
    let f = start(&[]).await;
    let silent: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", f.agent.port)).unwrap())
        .collect();
    let started = Instant::now();
    let mut other = client(f.agent.port, &f.certs).await.unwrap();
    other.health_check(HealthCheckRequest {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // The silent ones are dropped after the 10 s handshake timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handshake_failures(&f, "timeout") < 8.0 {
        assert!(
            Instant::now() < deadline,
            "silent connections not timed out:\n{}",
            f.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(silent);
    other.health_check(HealthCheckRequest {}).await.unwrap();
}

#[tokio::test]
async fn a_call_to_an_unknown_method_is_counted_as_unknown() {
    use tower::{Service, ServiceExt};
    let f = start(&[]).await;
    let mut channel = channel_with(
        f.agent.port,
        &f.certs.ca.cert_pem,
        Some((&f.certs.client_cert, &f.certs.client_key)),
    )
    .await
    .unwrap();
    for path in [
        "/persys.agent.v1.AgentService/NoSuchMethod",
        "/x7.Random/Path",
    ] {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("https://127.0.0.1:{}{path}", f.agent.port))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::default())
            .unwrap();
        let response = channel.ready().await.unwrap().call(request).await.unwrap();
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("12"), "{path}: {response:?}");
    }
    let mut health = AgentServiceClient::new(channel);
    health.health_check(HealthCheckRequest {}).await.unwrap();

    let (_, metrics) = http_get(f.agent.metrics_port, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            r#"persys_agent_grpc_requests_total{method="unknown",code="Unimplemented"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"persys_agent_grpc_requests_total{method="persys.agent.v1.AgentService/HealthCheck",code="OK"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(!metrics.contains("NoSuchMethod"), "{metrics}");
    assert!(!metrics.contains("x7.Random"), "{metrics}");
}

#[tokio::test]
async fn a_rotated_certificate_is_picked_up_without_restart() {
    let f = start(&[]).await;
    let pid = f.agent.child.id();
    let rotated = Authority::new("rotated CA");
    let (server_cert, server_key) = rotated.leaf("persys-agent", true);
    let (client_cert, client_key) = rotated.leaf("persysctl", false);
    // Write each file atomically, as a secret mount does.
    for (name, content) in [
        ("agent.key", &server_key),
        ("agent.crt", &server_cert),
        ("ca.crt", &rotated.cert_pem),
    ] {
        let tmp = f.certs.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, f.certs.dir.join(name)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = match client_with(
            f.agent.port,
            &rotated.cert_pem,
            Some((&client_cert, &client_key)),
        )
        .await
        {
            Ok(mut c) => c.health_check(HealthCheckRequest {}).await.is_ok(),
            Err(_) => false,
        };
        if answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated certificate not served within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.agent.child.id(), pid);
    // The old CA's clients are refused now.
    let old = match client(f.agent.port, &f.certs).await {
        Ok(mut c) => c.health_check(HealthCheckRequest {}).await.is_ok(),
        Err(_) => false,
    };
    assert!(!old, "the old CA is no longer trusted");
}

#[tokio::test]
async fn watch_lists_then_follows_and_an_expired_version_says_so() {
    let mut f = start(&[
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ("PERSYS_LOG_MAX_ENTRIES", "20"),
    ])
    .await;
    f.client
        .apply_workload(container("a", "", "nginx:1"))
        .await
        .unwrap();
    let mut stream = f
        .client
        .watch(WatchRequest {
            resource_version: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.r#type(), WatchEventType::Added);
    assert_eq!(first.object.unwrap().id(), "a");
    let end_of_list = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        end_of_list.r#type(),
        WatchEventType::Bookmark,
        "end of the initial list"
    );
    f.client
        .apply_workload(container("a", "", "nginx:2"))
        .await
        .unwrap();
    // Status writes of the (unreachable) Docker controller may come first;
    // every event is MODIFIED until the spec change arrives.
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(next.r#type(), WatchEventType::Modified);
        if next.object.as_ref().unwrap().generation() == 2 {
            break;
        }
    }

    for i in 0..60 {
        f.client
            .apply_workload(container(&format!("w{i}"), "", "nginx:1"))
            .await
            .unwrap();
    }
    let error = match f
        .client
        .watch(WatchRequest {
            resource_version: 1,
            ..Default::default()
        })
        .await
    {
        Err(status) => status,
        Ok(response) => response.into_inner().next().await.unwrap().unwrap_err(),
    };
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().starts_with("expired"),
        "{}",
        error.message()
    );
}

/// A connection whose HTTP/2 windows are h2's initial 64 KiB (hyper's
/// client default is megabytes): a stream on it that is not read backs up
/// at the agent after a few large events.
async fn narrow_channel(f: &Fixture) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&f.certs.ca.cert_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            &f.certs.client_cert,
            &f.certs.client_key,
        ));
    Channel::from_shared(format!("https://127.0.0.1:{}", f.agent.port))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap()
}

/// The next event of a Watch stream that is being read; a silent agent
/// fails the test rather than hanging it.
async fn next_event(stream: &mut tonic::Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("no watch event within 30 s")
        .unwrap()
        .expect("the watch ended")
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_expired_while_one_that_reads_gets_every_change_in_order() {
    const MAX_BACKLOG: u64 = 32;
    const APPLIES: usize = 150;
    let mut f = start(&[
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ("PERSYS_WATCH_MAX_BACKLOG", &MAX_BACKLOG.to_string()),
    ])
    .await;
    let mut reader = f
        .client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let end_of_list = next_event(&mut reader).await;
    assert_eq!(end_of_list.r#type(), WatchEventType::Bookmark);
    let from = end_of_list.resource_version;
    // Opened, and never read until it has been expired.
    let mut stalled = AgentServiceClient::new(narrow_channel(&f).await)
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Each apply writes a 4 KiB object; the reader reads up to it before
    // the next, so it is never more than a few changes behind.
    let padding = "x".repeat(4096);
    let mut seen = Vec::new();
    for i in 0..APPLIES {
        let mut request = container(&format!("w{i}"), "", "nginx:1");
        if let Some(workload_spec::Spec::Container(spec)) =
            request.spec.as_mut().and_then(|s| s.spec.as_mut())
        {
            spec.labels.insert("padding".into(), padding.clone());
        }
        f.client.apply_workload(request).await.unwrap();
        loop {
            let event = next_event(&mut reader).await;
            if event.r#type() == WatchEventType::Bookmark {
                continue;
            }
            seen.push(event.resource_version);
            if event.r#type() == WatchEventType::Added
                && event.object.as_ref().unwrap().id() == format!("w{i}")
            {
                break;
            }
        }
    }
    // Every change of the log, in order, none twice.
    let expected: Vec<u64> = (from + 1..=from + seen.len() as u64).collect();
    assert_eq!(seen, expected);
    assert!(seen.len() >= APPLIES);

    // The stalled watcher fell more than MAX_BACKLOG changes behind: its
    // stream is expired, counted, and its task gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = common::http_get(f.agent.metrics_port, "/metrics");
        let expired = sample(
            &metrics,
            r#"persys_agent_watch_expired_total{reason="backlog"}"#,
        );
        let open = sample(&metrics, "persys_agent_watch_streams");
        if expired == Some(1.0) && open == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired {expired:?}, open streams {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What it had been sent comes first, in order; then the status, which
    // says from where to watch again; nothing after.
    let mut last = None;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stalled.message())
            .await
            .expect("the expired stream did not end")
        {
            Ok(Some(event)) => {
                if event.r#type() != WatchEventType::Bookmark {
                    assert_eq!(
                        event.resource_version,
                        last.map_or(from + 1, |l: u64| l + 1)
                    );
                    last = Some(event.resource_version);
                } else {
                    assert_eq!(event.resource_version, from);
                }
            }
            Ok(None) => panic!("the expired stream ended without a status"),
            Err(status) => break status,
        }
    };
    let last = last.expect("the stalled watcher was sent some events first");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let behind: u64 = status
        .message()
        .split("fell behind by ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", status.message()));
    assert!(behind > MAX_BACKLOG, "{}", status.message());
    assert!(
        status.message().contains(&format!(
            "more than PERSYS_WATCH_MAX_BACKLOG allows ({MAX_BACKLOG}); every change through resource_version {last} was sent: watch again from {last}"
        )),
        "{}",
        status.message()
    );

    // The reader goes on.
    f.client
        .apply_workload(container("after", "", "nginx:1"))
        .await
        .unwrap();
    loop {
        let event = next_event(&mut reader).await;
        if event.object.is_some_and(|o| o.id() == "after") {
            break;
        }
    }
}

#[tokio::test]
async fn describe_returns_spec_status_and_events() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    f.client
        .apply_workload(container("web", "r1", "nginx:1"))
        .await
        .unwrap();
    let described = f
        .client
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .unwrap()
        .into_inner();
    let workload = described.workload.unwrap();
    assert_eq!(workload.id(), "web");
    assert_eq!(workload.revision_id(), "r1");
    assert!(workload.has_finalizer(persys_api::FINALIZER_DOCKER));
    assert_eq!(described.status.unwrap().id, "web");
    let missing = f
        .client
        .describe_workload(DescribeWorkloadRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn sigkill_during_concurrent_applies_loses_no_acknowledged_apply() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Arc::new(Certs::generate(&dir.path().join("certs")));
    let state = dir.path().join("state");
    let mut agent = AgentProcess::start(&state, &certs, UNREACHABLE_RUNTIMES).await;
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut client = client(agent.port, &certs).await.unwrap();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let revision = format!("rev-{w}-{i}");
                match client
                    .apply_workload(container(&id, &revision, "nginx:1"))
                    .await
                {
                    Ok(response) if response.get_ref().applied => {
                        acked.lock().unwrap().push((id, revision))
                    }
                    _ => return,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 500 {
        assert!(Instant::now() < deadline, "too few applies acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.child.kill().unwrap(); // SIGKILL, writers mid-flight
    agent.child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    drop(agent);

    let restarted = AgentProcess::start(&state, &certs, UNREACHABLE_RUNTIMES).await;
    let mut client = client(restarted.port, &certs).await.unwrap();
    let stored: HashSet<(String, String)> = client
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workloads
        .into_iter()
        .map(|w| (w.id, w.revision_id))
        .collect();
    for pair in &acked {
        assert!(stored.contains(pair), "acknowledged apply {pair:?} lost");
    }
}

#[tokio::test]
async fn sigterm_finishes_and_exits_cleanly() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    f.client
        .apply_workload(container("web", "", "nginx:1"))
        .await
        .unwrap();
    let started = Instant::now();
    let status = f.agent.signal("TERM").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful, not by the grace deadline"
    );
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        f.agent.log_text()
    );
    assert!(
        f.agent.log_text().contains("store closed"),
        "{}",
        f.agent.log_text()
    );
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_fails_naming_the_directory() {
    let f = start(&[]).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
        .env("PERSYS_STATE_PATH", &f.agent.state)
        .env("PERSYS_GRPC_PORT", common::free_port().to_string())
        .env("PERSYS_TLS_ENABLED", "false")
        .env("PERSYS_DOCKER_ENABLED", "false")
        .env("PERSYS_COMPOSE_ENABLED", "false")
        .env("PERSYS_VM_ENABLED", "false")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&f.agent.state.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn an_invalid_setting_exits_non_zero_naming_the_variable() {
    for (variable, value) in [
        ("PERSYS_GRPC_PORT", "http"),
        ("PERSYS_RECONCILE_INTERVAL", "soon"),
        ("PERSYS_TLS_ENABLED", "maybe"),
        ("PERSYS_LOG_FORMAT", "xml"),
        ("PERSYS_SCHEDULER_TLS_CERT", "/nonexistent/client.crt"),
        ("PERSYS_SCHEDULER_TLS_KEY", "/nonexistent/client.key"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
}

#[test]
fn help_documents_every_variable() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "PERSYS_GRPC_ADDR",
        "PERSYS_GRPC_PORT",
        "PERSYS_TLS_ENABLED",
        "PERSYS_TLS_CERT",
        "PERSYS_TLS_KEY",
        "PERSYS_TLS_CA",
        "PERSYS_STATE_PATH",
        "PERSYS_DOCKER_ENABLED",
        "DOCKER_HOST",
        "PERSYS_COMPOSE_ENABLED",
        "PERSYS_COMPOSE_BINARY",
        "PERSYS_VM_ENABLED",
        "PERSYS_LIBVIRT_URI",
        "PERSYS_RECONCILE_ENABLED",
        "PERSYS_RECONCILE_INTERVAL",
        "PERSYS_LOG_LEVEL",
        "PERSYS_NODE_ID",
        "PERSYS_VERSION",
        "PERSYS_METRICS_PORT",
        "PERSYS_LOG_FORMAT",
        "PERSYS_SCHEDULER_TLS_CERT",
        "PERSYS_SCHEDULER_TLS_KEY",
        "PERSYS_POLICY_FILE",
        "PERSYS_ALLOWED_HOST_PATHS",
        "PERSYS_POLICY_PRIVILEGED",
        "PERSYS_POLICY_HOST_NETWORK",
        "PERSYS_POLICY_DEVICES",
        "PERSYS_POLICY_CAPABILITIES",
        "PERSYS_POLICY_COMPOSE_BUILD",
        "PERSYS_POLICY_VM_NETWORKS",
        "PERSYS_POLICY_VM_BRIDGES",
        "PERSYS_POLICY_MAX_WORKLOADS",
        "PERSYS_POLICY_NODE_VCPUS",
        "PERSYS_POLICY_NODE_MEMORY_MIB",
        "PERSYS_POLICY_NODE_DISK_GIB",
        "PERSYS_WATCH_MAX_BACKLOG",
        "PERSYS_WATCH_MAX_UNREAD",
    ] {
        assert!(help.contains(variable), "{variable} missing from --help");
    }
}

/// Python's grpc_reflection, Postman and older grpcurl speak only
/// reflection v1alpha; both versions list the agent's service.
#[tokio::test]
async fn reflection_answers_in_v1_and_v1alpha() {
    let f = start(&[]).await;
    let channel = channel_with(
        f.agent.port,
        &f.certs.ca.cert_pem,
        Some((&f.certs.client_cert, &f.certs.client_key)),
    )
    .await
    .unwrap();
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = stream.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(list)) = answer else {
            panic!("v1: {answer:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"persys.agent.v1.AgentService"), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = stream.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::ListServicesResponse(list)) = answer else {
            panic!("v1alpha: {answer:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"persys.agent.v1.AgentService"), "{names:?}");
    }
}

#[tokio::test]
async fn list_actions_speaks_the_go_agent_s_vocabulary() {
    let mut f = start(UNREACHABLE_RUNTIMES).await;
    f.client
        .apply_workload(container("w1", "", "nginx:1"))
        .await
        .unwrap();
    f.client
        .delete_workload(DeleteWorkloadRequest { id: "w1".into() })
        .await
        .unwrap();
    let actions = |action_type: &str, status: &str| {
        let request = ListActionsRequest {
            workload_id: "w1".into(),
            action_type: action_type.into(),
            status: status.into(),
            ..Default::default()
        };
        let mut client = f.client.clone();
        async move { client.list_actions(request).await }
    };
    let applies = actions("apply_workload", "")
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(applies.len(), 1, "{applies:?}");
    assert_eq!(applies[0].action_type, "apply_workload");
    assert_eq!(applies[0].status, "completed");
    let deletes = actions("delete_workload", "completed")
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    // A record is written once its action is done: none is running.
    assert!(
        actions("", "running")
            .await
            .unwrap()
            .into_inner()
            .actions
            .is_empty()
    );
    // This agent's earlier words still filter.
    assert_eq!(
        actions("apply", "succeeded")
            .await
            .unwrap()
            .into_inner()
            .actions
            .len(),
        1
    );
    let refused = actions("restart_workload", "").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("apply_workload"),
        "{}",
        refused.message()
    );
}
