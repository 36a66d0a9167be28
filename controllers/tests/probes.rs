//! Liveness and readiness probes of container workloads, on the real
//! engine, the real fjall store and the real controller runtime. Nothing
//! here sleeps: each test waits on the workload's status (through the
//! store's change log) with a deadline.
//!
//! Needs a Docker engine and the offline test image (hack/runtimes-up.sh).
//! Outside CI a test without them is skipped with a loud message; in CI
//! (`CI=true`) it fails.

mod docker_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::models::{ContainerConfig, ContainerCreateBody, HealthConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptions,
    RemoveImageOptions,
};
use docker_support::*;
use persys_api::CONDITION_READY;
use persys_api::v1::{
    ActualState, ContainerSpec, DesiredState, GrpcAction, HttpGetAction, Probe, TcpSocketAction,
    Workload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tonic_health::ServingStatus;

const CONVERGE: Duration = Duration::from_secs(30);

/// Running, and the Ready condition is `ready` with `reason` (any reason
/// when None).
fn running_with_ready(w: &Workload, ready: bool, reason: Option<&str>) -> bool {
    let s = status(w);
    let want = if ready { "True" } else { "False" };
    s.actual_state() == ActualState::Running
        && s.observed_generation == w.generation()
        && s.condition(CONDITION_READY)
            .is_some_and(|c| c.status == want && reason.is_none_or(|r| c.reason == r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readiness_probe_on_a_file_keeps_ready_false_until_the_file_is_created() {
    let Some(bed) = TestBed::new("readiness").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("ready");
    let spec = ContainerSpec {
        readiness_probe: Some(exec_probe("test -f /tmp/ready", 1)),
        ..shell_spec("exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;

    let unready = agent
        .wait_for(&id, CONVERGE, "running but not ready", |w| {
            running_with_ready(w, false, Some("ReadinessProbeFailed"))
        })
        .await;
    let s = status(&unready);
    assert_eq!(s.facts["ready"], "false");
    assert_eq!(s.facts["probe.readiness"], "failing");
    assert!(
        unready
            .to_wire_status()
            .metadata
            .get("ready")
            .is_some_and(|v| v == "false")
    );

    exec_in(&bed.docker, &s.runtime_ref, ": > /tmp/ready").await;
    let ready = agent
        .wait_for(&id, CONVERGE, "ready", |w| {
            running_with_ready(w, true, None)
        })
        .await;
    let s = status(&ready);
    assert_eq!(s.facts["ready"], "true");
    assert_eq!(s.facts["probe.readiness"], "passing");
    assert_eq!(s.restart_count, 0, "readiness never restarts");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_probe_that_starts_failing_restarts_the_container_with_an_unhealthy_event() {
    let Some(bed) = TestBed::new("liveness").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("live");
    let spec = ContainerSpec {
        liveness_probe: Some(Probe {
            failure_threshold: 2,
            ..exec_probe("test \"$(cat /tmp/state)\" != dead", 1)
        }),
        ..shell_spec("echo alive > /tmp/state; exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let first = agent
        .wait_for(&id, CONVERGE, "running and live", |w| {
            running_with_ready(w, true, None)
                && status(w).facts.get("probe.liveness").map(String::as_str) == Some("passing")
        })
        .await;
    let s = status(&first);
    let started = s.facts["container.started_at"].clone();
    assert_eq!(s.restart_count, 0);

    exec_in(&bed.docker, &s.runtime_ref, "echo dead > /tmp/state").await;
    let restarted = agent
        .wait_for(&id, CONVERGE, "restarted", |w| {
            let s = status(w);
            s.restart_count >= 1
                && s.actual_state() == ActualState::Running
                && s.facts.get("container.started_at") != Some(&started)
        })
        .await;
    let unhealthy = agent.event(&id, "Unhealthy").expect("an Unhealthy event");
    assert_eq!(unhealthy.r#type(), persys_api::v1::EventType::Warning);
    assert!(
        unhealthy.message.contains("Liveness probe failed"),
        "{unhealthy:?}"
    );
    // The same container, started again: its script made it alive again.
    assert_eq!(status(&restarted).runtime_ref, s.runtime_ref);
    agent
        .wait_for(&id, CONVERGE, "live again", |w| {
            status(w).facts.get("probe.liveness").map(String::as_str) == Some("passing")
        })
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_tcp_probes_pass_against_a_listener_in_the_container() {
    let Some(bed) = TestBed::new("netprobes").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("net");
    let spec = ContainerSpec {
        readiness_probe: Some(Probe {
            http_get: Some(HttpGetAction {
                path: "/index.html".into(),
                port: 8080,
                ..Default::default()
            }),
            period_seconds: 1,
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TcpSocketAction {
                port: 8080,
                host: String::new(),
            }),
            period_seconds: 1,
            ..Default::default()
        }),
        ..shell_spec("echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let ready = agent
        .wait_for(&id, CONVERGE, "ready by its http probe", |w| {
            running_with_ready(w, true, None)
                && status(w).facts.get("probe.readiness").map(String::as_str) == Some("passing")
                && status(w).facts.get("probe.liveness").map(String::as_str) == Some("passing")
        })
        .await;
    assert_eq!(status(&ready).restart_count, 0);

    // A probe on a port nothing listens on fails, and says why.
    let closed = ContainerSpec {
        readiness_probe: Some(Probe {
            tcp_socket: Some(TcpSocketAction {
                port: 9,
                host: String::new(),
            }),
            period_seconds: 1,
            failure_threshold: 1,
            ..Default::default()
        }),
        ..shell_spec("echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp")
    };
    agent.apply(&id, "r2", DesiredState::Running, closed).await;
    let refused = agent
        .wait_for(&id, CONVERGE, "not ready on a closed port", |w| {
            running_with_ready(w, false, Some("ReadinessProbeFailed"))
        })
        .await;
    let message = status(&refused)
        .condition(CONDITION_READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("dial tcp"), "{message}");
    agent.stop().await;
}

/// An image of the test image with a HEALTHCHECK passing once
/// /tmp/healthy exists; removed on drop.
struct HealthcheckImage {
    docker: bollard::Docker,
    name: String,
}

impl HealthcheckImage {
    async fn build(bed: &TestBed) -> HealthcheckImage {
        let name = format!("persys-test/{}", unique("healthcheck"));
        let base = bed
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().build()),
                ContainerCreateBody {
                    image: Some(test_image()),
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("create the base container");
        let second = 1_000_000_000;
        bed.docker
            .commit_container(
                CommitContainerOptionsBuilder::new()
                    .container(&base.id)
                    .repo(&name)
                    .tag("latest")
                    .build(),
                ContainerConfig {
                    healthcheck: Some(HealthConfig {
                        test: Some(vec!["CMD-SHELL".into(), "test -f /tmp/healthy".into()]),
                        interval: Some(second),
                        timeout: Some(second),
                        retries: Some(1),
                        ..Default::default()
                    }),
                    env: Some(vec!["PATH=/bin".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("commit the healthcheck image");
        let _ = bed
            .docker
            .remove_container(&base.id, None::<RemoveContainerOptions>)
            .await;
        HealthcheckImage {
            docker: bed.docker.clone(),
            name: format!("{name}:latest"),
        }
    }
}

impl Drop for HealthcheckImage {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                docker
                    .remove_image(
                        &name,
                        Some(RemoveImageOptions {
                            force: true,
                            ..Default::default()
                        }),
                        None,
                    )
                    .await
                    .ok()
            })
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_readiness_probe_the_images_healthcheck_decides_readiness() {
    let Some(bed) = TestBed::new("healthcheck").await else {
        return;
    };
    let image = HealthcheckImage::build(&bed).await;
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("hc");
    let spec = ContainerSpec {
        image: image.name.clone(),
        image_pull_policy: "Never".into(),
        ..shell_spec("exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let unhealthy = agent
        .wait_for(&id, CONVERGE, "unhealthy, so not ready", |w| {
            running_with_ready(w, false, Some("HealthCheckFailed"))
        })
        .await;
    let s = status(&unhealthy);
    assert_eq!(s.facts["ready"], "false");
    assert_eq!(s.facts["probe.healthcheck"], "unhealthy");

    exec_in(&bed.docker, &s.runtime_ref, ": > /tmp/healthy").await;
    let healthy = agent
        .wait_for(&id, CONVERGE, "healthy, so ready", |w| {
            running_with_ready(w, true, None)
        })
        .await;
    assert_eq!(status(&healthy).facts["ready"], "true");
    assert_eq!(
        status(&healthy).restart_count,
        0,
        "HEALTHCHECK never restarts"
    );
    agent.stop().await;
}

/// The Ready condition's message.
fn ready_message(w: &Workload) -> String {
    status(w)
        .condition(CONDITION_READY)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// A container of the test image that forwards each connection to `port`
/// inside it to `host_port` on this host (through its network's gateway),
/// with busybox `nc`: a probe of the container's `port` reaches a server
/// the test runs, by the container's own address as every probe does.
fn forwarding_spec(port: u16, host_port: u16) -> ContainerSpec {
    shell_spec(&format!(
        "gw=$(ip route | awk '/^default/ {{print $3}}'); \
         exec nc -ll -p {port} -e nc \"$gw\" {host_port}"
    ))
}

/// An HTTPS server on every address of this host, with a self-signed
/// certificate for a name that is not the address probed (so a client
/// that verified it would refuse it). It answers `GET /healthz` with 200
/// while `healthy`, everything else with 503. Returns its port.
async fn https_server(healthy: Arc<AtomicBool>) -> u16 {
    let certified =
        rcgen::generate_simple_self_signed(vec!["elsewhere.invalid".to_string()]).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key.into())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, healthy) = (acceptor.clone(), healthy.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let status =
                    if healthy.load(Ordering::SeqCst) && request.starts_with(b"GET /healthz ") {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                let response =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_probe_skips_certificate_verification_and_fails_on_an_error_status() {
    let Some(bed) = TestBed::new("httpsprobe").await else {
        return;
    };
    let healthy = Arc::new(AtomicBool::new(true));
    let host_port = https_server(healthy.clone()).await;
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("https");
    let spec = ContainerSpec {
        readiness_probe: Some(Probe {
            http_get: Some(HttpGetAction {
                path: "/healthz".into(),
                port: 8443,
                scheme: "HTTPS".into(),
                ..Default::default()
            }),
            period_seconds: 1,
            failure_threshold: 1,
            ..Default::default()
        }),
        ..forwarding_spec(8443, host_port)
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let ready = agent
        .wait_for(&id, CONVERGE, "ready by its https probe", |w| {
            running_with_ready(w, true, None)
                && status(w).facts.get("probe.readiness").map(String::as_str) == Some("passing")
        })
        .await;
    let started = status(&ready).facts["container.started_at"].clone();

    // The server starts answering 503: the same container turns unready,
    // saying why.
    healthy.store(false, Ordering::SeqCst);
    let unready = agent
        .wait_for(&id, CONVERGE, "unready on HTTP 503", |w| {
            running_with_ready(w, false, Some("ReadinessProbeFailed"))
                && ready_message(w).contains("statuscode: 503")
        })
        .await;
    let s = status(&unready);
    assert_eq!(s.facts["ready"], "false");
    assert_eq!(s.facts["container.started_at"], started);
    assert_eq!(s.restart_count, 0, "readiness never restarts");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_probe_passes_while_its_service_is_serving_and_fails_when_it_is_not() {
    let Some(bed) = TestBed::new("grpcprobe").await else {
        return;
    };
    let service = "persys.probe.Test";
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service, ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let host_port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("grpc");
    let spec = ContainerSpec {
        readiness_probe: Some(Probe {
            grpc: Some(GrpcAction {
                port: 9090,
                service: service.into(),
            }),
            period_seconds: 1,
            failure_threshold: 1,
            ..Default::default()
        }),
        ..forwarding_spec(9090, host_port)
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let ready = |w: &Workload| {
        running_with_ready(w, true, None)
            && status(w).facts.get("probe.readiness").map(String::as_str) == Some("passing")
    };
    let first = agent
        .wait_for(&id, CONVERGE, "ready by grpc health", ready)
        .await;
    let started = status(&first).facts["container.started_at"].clone();

    // The service reports NOT_SERVING: unready, saying so.
    reporter
        .set_service_status(service, ServingStatus::NotServing)
        .await;
    let unready = agent
        .wait_for(&id, CONVERGE, "unready on NOT_SERVING", |w| {
            running_with_ready(w, false, Some("ReadinessProbeFailed"))
                && ready_message(w).contains("NOT_SERVING")
        })
        .await;
    assert_eq!(status(&unready).facts["ready"], "false");

    // Serving again: ready again, the same container start.
    reporter
        .set_service_status(service, ServingStatus::Serving)
        .await;
    let again = agent.wait_for(&id, CONVERGE, "ready again", ready).await;
    let s = status(&again);
    assert_eq!(s.facts["container.started_at"], started);
    assert_eq!(s.restart_count, 0, "readiness never restarts");
    agent.stop().await;
}
