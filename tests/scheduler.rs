//! The scheduler link, end to end: the real agent binary against a fake
//! `persys.control.v1.AgentControl` served in this process (the real
//! scheduler is Go), which records what it is sent and answers from a script.
//! The fake answers as the Go scheduler does: leases as
//! `google.protobuf.Timestamp`s, and whole seconds.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{AgentProcess, Certs, UNREACHABLE_RUNTIMES, client, plaintext_client};
use persys_api::control::v1::agent_control_server::{AgentControl, AgentControlServer};
use persys_api::control::v1::{
    FailureReason, HeartbeatRequest, HeartbeatResponse, RegisterNodeRequest, RegisterNodeResponse,
};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status};

/// How the fake scheduler answers; tests change it as they go.
#[derive(Debug, Clone)]
struct Script {
    accept: bool,
    interval_seconds: i32,
    lease_seconds: u64,
    acknowledge: bool,
    drain: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            accept: true,
            interval_seconds: 1,
            lease_seconds: 30,
            acknowledge: true,
            drain: false,
        }
    }
}

/// One call the fake scheduler received.
#[derive(Debug, Clone)]
enum Call {
    Register {
        request: RegisterNodeRequest,
        /// The client certificate the caller presented (DER), under mTLS.
        peer_cert: Option<Vec<u8>>,
    },
    Heartbeat {
        at: Instant,
        request: HeartbeatRequest,
        acknowledged: bool,
    },
}

impl Call {
    fn registration(&self) -> Option<&RegisterNodeRequest> {
        match self {
            Call::Register { request, .. } => Some(request),
            Call::Heartbeat { .. } => None,
        }
    }

    fn heartbeat(&self) -> Option<(Instant, &HeartbeatRequest)> {
        match self {
            Call::Heartbeat { at, request, .. } => Some((*at, request)),
            Call::Register { .. } => None,
        }
    }
}

/// `AgentControl` that records every call and answers from its script.
#[derive(Clone, Default)]
struct FakeScheduler {
    script: Arc<Mutex<Script>>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Bumped on every call, so tests await calls instead of polling.
    recorded: Arc<watch::Sender<usize>>,
}

/// A lease ending `seconds` from now, in whole seconds as the Go scheduler
/// sends it (`timestamppb.New(now.Add(…))` on its clock). Saturates at the
/// last second a Timestamp holds (`i64::MAX`), as a hostile or broken
/// scheduler may send.
fn lease_in<T: From<SystemTime>>(seconds: u64) -> Option<T> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let end = now.as_secs().saturating_add(seconds).min(i64::MAX as u64);
    Some((UNIX_EPOCH + Duration::from_secs(end)).into())
}

/// How far a time the agent sent is from now, in seconds.
fn seconds_from_now<T>(time: Option<T>) -> u64
where
    SystemTime: TryFrom<T>,
{
    let time = time.and_then(|t| SystemTime::try_from(t).ok());
    let time = time.expect("a valid timestamp");
    match time.duration_since(SystemTime::now()) {
        Ok(ahead) => ahead.as_secs(),
        Err(behind) => behind.duration().as_secs(),
    }
}

#[tonic::async_trait]
impl AgentControl for FakeScheduler {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let peer_cert = request
            .peer_certs()
            .and_then(|chain| chain.first().map(|cert| cert.to_vec()));
        let script = self.script.lock().unwrap().clone();
        self.record(Call::Register {
            request: request.into_inner(),
            peer_cert,
        });
        Ok(Response::new(RegisterNodeResponse {
            accepted: script.accept,
            reason: if script.accept {
                "registered"
            } else {
                "refused"
            }
            .into(),
            heartbeat_interval_seconds: script.interval_seconds,
            lease_expires_at: lease_in(script.lease_seconds),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let script = self.script.lock().unwrap().clone();
        self.record(Call::Heartbeat {
            at: Instant::now(),
            request: request.into_inner(),
            acknowledged: script.acknowledge,
        });
        Ok(Response::new(HeartbeatResponse {
            acknowledged: script.acknowledge,
            drain_node: script.drain,
            lease_expires_at: lease_in(script.lease_seconds),
        }))
    }
}

/// A fake scheduler serving on a port; stopped when dropped.
struct Serving {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops accepting and closes the agent's connection (GOAWAY).
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeScheduler {
    fn with(script: Script) -> Self {
        let fake = FakeScheduler::default();
        *fake.script.lock().unwrap() = script;
        fake
    }

    fn record(&self, call: Call) {
        let mut calls = self.calls.lock().unwrap();
        calls.push(call);
        self.recorded.send_replace(calls.len());
    }

    fn set(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn registrations(&self) -> Vec<RegisterNodeRequest> {
        self.calls()
            .iter()
            .filter_map(|c| c.registration().cloned())
            .collect()
    }

    async fn serve(&self, listener: TcpListener, tls: Option<ServerTlsConfig>) -> Serving {
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        let router = builder.add_service(AgentControlServer::new(self.clone()));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Serving {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until `check` finds what it looks for in the calls so far.
    async fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        agent: &AgentProcess,
        check: impl Fn(&[Call]) -> Option<T>,
    ) -> T {
        let mut recorded = self.recorded.subscribe();
        let found = tokio::time::timeout(within, async {
            loop {
                if let Some(found) = check(&self.calls.lock().unwrap()) {
                    return found;
                }
                recorded.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no {what} within {within:?}; calls: {:#?}\nagent log:\n{}",
                self.calls(),
                agent.log_text()
            )
        })
    }
}

async fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// The agent's environment for a plaintext link to `scheduler`, on top of
/// `extra`.
fn link_env(scheduler: SocketAddr, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("PERSYS_SCHEDULER_ADDR".to_string(), scheduler.to_string()),
        ("PERSYS_SCHEDULER_INSECURE".to_string(), "true".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    agent: AgentProcess,
    client: AgentServiceClient<Channel>,
}

/// An agent serving mTLS as in production, linked to `scheduler` in
/// plaintext.
async fn start_agent(scheduler: SocketAddr, extra: &[(&str, &str)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let env = link_env(scheduler, extra);
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, &as_refs(&env)).await;
    let client = client(agent.port, &certs).await.unwrap();
    Fixture {
        _dir: dir,
        agent,
        client,
    }
}

/// Polls HealthCheck until `check` holds for its runtime_status.
async fn wait_health(
    f: &mut Fixture,
    what: &str,
    within: Duration,
    check: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let health = f
            .client
            .health_check(HealthCheckRequest {})
            .await
            .unwrap()
            .into_inner();
        if check(&health.runtime_status) {
            return health.runtime_status;
        }
        assert!(
            Instant::now() < deadline,
            "HealthCheck never showed {what} within {within:?}; last: {:?}\nagent log:\n{}",
            health.runtime_status,
            f.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn container(id: &str, revision: &str, cpu_shares: i64, memory_mb: i64) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        revision_id: revision.into(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: "nginx:1".into(),
                resources: Some(ResourceLimits {
                    cpu_shares,
                    memory_bytes: memory_mb * 1024 * 1024,
                    memory_swap_bytes: 0,
                }),
                ..Default::default()
            })),
        }),
    }
}

fn memory_total_mb() -> i64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: i64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024
}

#[tokio::test]
async fn registration_names_the_node_its_endpoint_version_labels_and_capacity() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let mut extra = UNREACHABLE_RUNTIMES.to_vec();
    extra.extend([
        // Bound to every address: the advertised one is the route's.
        ("PERSYS_GRPC_ADDR", "0.0.0.0"),
        ("PERSYS_NODE_ID", "node-a"),
        ("PERSYS_VERSION", "9.9.9-test"),
        ("PERSYS_CLUSTER_ID", "cluster-1"),
        ("PERSYS_NODE_LABELS", "zone=a, rack=r7"),
        ("PERSYS_NODE_REGION", "eu-west"),
        ("PERSYS_NODE_ENV", "staging"),
    ]);
    let mut f = start_agent(serving.addr, &extra).await;
    let registration = fake
        .wait_for("registration", Duration::from_secs(20), &f.agent, |calls| {
            calls.iter().find_map(|c| c.registration().cloned())
        })
        .await;

    assert_eq!(registration.node_id, "node-a");
    assert_eq!(registration.agent_version, "9.9.9-test");
    assert_eq!(registration.cluster_id, "cluster-1");
    assert_eq!(
        registration.grpc_endpoint,
        format!("127.0.0.1:{}", f.agent.port)
    );
    assert_eq!(
        registration.labels.into_iter().collect::<Vec<_>>(),
        [
            ("env".to_string(), "staging".to_string()),
            ("rack".to_string(), "r7".to_string()),
            ("region".to_string(), "eu-west".to_string()),
            ("zone".to_string(), "a".to_string()),
        ]
    );
    assert!(seconds_from_now(registration.timestamp) < 60);
    let capabilities = registration.capabilities.unwrap();
    let cores = std::thread::available_parallelism().unwrap().get() as i64;
    assert_eq!(capabilities.cpu_total_millicores, cores * 1000);
    assert_eq!(capabilities.memory_total_mb, memory_total_mb());
    let pools: Vec<(&str, &str)> = capabilities
        .storage_pools
        .iter()
        .map(|p| (p.name.as_str(), p.r#type.as_str()))
        .collect();
    let state = f.agent.state.display().to_string();
    assert_eq!(
        pools,
        [
            (state.as_str(), "local"),
            ("/var/lib/libvirt/images", "local")
        ]
    );
    assert!(
        capabilities.storage_pools.iter().all(|p| p.total_gb > 0),
        "sized by their filesystem: {:?}",
        capabilities.storage_pools
    );
    assert_eq!(capabilities.supported_storage_drivers, ["local"]);
    assert!(
        capabilities.supported_workload_types.is_empty(),
        "enabled but unreachable runtimes are not offered: {:?}",
        capabilities.supported_workload_types
    );

    let status = wait_health(
        &mut f,
        "the link registered",
        Duration::from_secs(10),
        |s| {
            s.get("scheduler")
                .is_some_and(|s| s.starts_with("registered"))
        },
    )
    .await;
    assert!(
        status["scheduler"].starts_with(&format!("registered with {} as node-a", serving.addr)),
        "{status:?}"
    );
    assert_eq!(status["node"], "schedulable");
}

#[tokio::test]
async fn a_reachable_runtime_is_offered_and_unreachable_ones_are_not() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    // The real Docker Engine; compose and libvirt unreachable.
    let f = start_agent(
        serving.addr,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_COMPOSE_BINARY", "/nonexistent/docker-compose"),
            ("PERSYS_VM_ENABLED", "true"),
            (
                "PERSYS_LIBVIRT_URI",
                "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            ),
        ],
    )
    .await;
    fake.wait_for(
        "registration offering containers",
        Duration::from_secs(30),
        &f.agent,
        |calls| {
            calls
                .iter()
                .filter_map(Call::registration)
                .find(|r| {
                    r.capabilities
                        .as_ref()
                        .is_some_and(|c| c.supported_workload_types == ["container"])
                })
                .cloned()
        },
    )
    .await;
    for registration in fake.registrations() {
        let offered = registration.capabilities.unwrap().supported_workload_types;
        assert!(
            offered.iter().all(|t| t == "container"),
            "offered {offered:?}"
        );
    }
}

#[tokio::test]
async fn heartbeats_come_at_the_returned_interval_with_each_workloads_status_and_allocation() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let mut f = start_agent(serving.addr, UNREACHABLE_RUNTIMES).await;
    let registration = fake
        .wait_for("registration", Duration::from_secs(20), &f.agent, |calls| {
            calls.iter().find_map(|c| c.registration().cloned())
        })
        .await;
    f.client
        .apply_workload(container("web", "r1", 512, 256))
        .await
        .unwrap();
    f.client
        .apply_workload(container("api", "r1", 2048, 100))
        .await
        .unwrap();

    // The engine is unreachable: once the Docker controller has looked,
    // both workloads are Unknown with a runtime error, and a heartbeat
    // says so for each.
    let heartbeat = fake
        .wait_for(
            "heartbeat with both workloads Unknown",
            Duration::from_secs(20),
            &f.agent,
            |calls| {
                calls.iter().filter_map(Call::heartbeat).find_map(|(_, h)| {
                    (h.workload_statuses.len() == 2
                        && h.workload_statuses.iter().all(|s| s.state == "Unknown"))
                    .then(|| h.clone())
                })
            },
        )
        .await;
    assert_eq!(heartbeat.node_id, registration.node_id);
    assert!(!heartbeat.node_id.is_empty());
    let web = heartbeat
        .workload_statuses
        .iter()
        .find(|s| s.workload_id == "web")
        .expect("web reported");
    assert_eq!(web.state, "Unknown", "{web:?}");
    assert_eq!(web.failure_reason(), FailureReason::RuntimeError, "{web:?}");
    let wire = f
        .client
        .get_workload_status(GetWorkloadStatusRequest { id: "web".into() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let reason = web.reason.as_ref().expect("a reason");
    let failure = wire
        .metadata
        .get("failure_reason")
        .cloned()
        .unwrap_or_default();
    assert_eq!(wire.actual_state(), ActualState::Unknown, "{wire:?}");
    assert_eq!(failure, "RUNTIME_ERROR", "{wire:?}");
    assert_eq!(
        web.failure_reason(),
        persys_api::FailureReason::control_of_code(&failure),
        "{web:?}"
    );
    assert_eq!(
        reason.code, "RUNTIME_ERROR",
        "the agent's own code travels too: {web:?}"
    );
    assert!(
        reason.retryable,
        "an unreachable engine is retried: {web:?}"
    );
    let usage = heartbeat.usage.unwrap();
    assert_eq!(usage.cpu_allocated_millicores, 500 + 2000);
    assert_eq!(usage.memory_allocated_mb, 256 + 100);
    assert!(usage.memory_used_mb > 0, "{usage:?}");
    assert!(seconds_from_now(heartbeat.timestamp) < 60);

    // Four more heartbeats: one a second, as the scheduler asked.
    let seen = fake.calls().len();
    let beats = fake
        .wait_for(
            "four more heartbeats",
            Duration::from_secs(20),
            &f.agent,
            |calls| {
                let beats: Vec<Instant> = calls[seen..]
                    .iter()
                    .filter_map(Call::heartbeat)
                    .map(|(at, _)| at)
                    .collect();
                (beats.len() >= 4).then_some(beats)
            },
        )
        .await;
    for gap in beats.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap >= Duration::from_millis(900) && gap <= Duration::from_secs(3),
            "heartbeat gaps {:?}",
            beats.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn a_lease_beyond_any_clock_does_not_kill_the_link_which_keeps_heartbeating() {
    // u64::MAX seconds ahead: the last second a Timestamp holds, about
    // 292 billion years on.
    let fake = FakeScheduler::with(Script {
        lease_seconds: u64::MAX,
        ..Script::default()
    });
    let serving = fake.serve(loopback_listener().await, None).await;
    let mut f = start_agent(serving.addr, UNREACHABLE_RUNTIMES).await;
    fake.wait_for("registration", Duration::from_secs(20), &f.agent, |calls| {
        calls.iter().find_map(|c| c.registration().cloned())
    })
    .await;
    let seen = fake.calls().len();
    fake.wait_for(
        "three heartbeats after the far lease was granted",
        Duration::from_secs(20),
        &f.agent,
        |calls| (calls[seen..].iter().filter_map(Call::heartbeat).count() >= 3).then_some(()),
    )
    .await;
    // HealthCheck answers (it prints the lease's end), the link is
    // registered and no background task died.
    let status = wait_health(
        &mut f,
        "the link registered",
        Duration::from_secs(10),
        |s| {
            s.get("scheduler")
                .is_some_and(|s| s.starts_with("registered"))
        },
    )
    .await;
    assert!(
        !status["tasks"].contains("DEAD"),
        "{status:?}\nagent log:\n{}",
        f.agent.log_text()
    );
    let health = f
        .client
        .health_check(HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy, "{health:?}");
    assert!(
        !f.agent.log_text().contains("panicked"),
        "agent log:\n{}",
        f.agent.log_text()
    );
}

#[tokio::test]
async fn a_restarted_scheduler_is_registered_with_again_and_the_agent_serves_meanwhile() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let addr = serving.addr;
    let mut f = start_agent(addr, UNREACHABLE_RUNTIMES).await;
    fake.wait_for(
        "first heartbeat",
        Duration::from_secs(20),
        &f.agent,
        |calls| calls.iter().find_map(Call::heartbeat).map(|_| ()),
    )
    .await;

    serving.stop().await;
    wait_health(&mut f, "the link failing", Duration::from_secs(20), |s| {
        s.get("scheduler")
            .is_some_and(|s| s.starts_with("not registered"))
    })
    .await;
    // The agent keeps serving without its scheduler.
    let applied = f
        .client
        .apply_workload(container("web", "r1", 0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(applied.applied);

    let restarted = FakeScheduler::with(Script::default());
    let listener = TcpListener::bind(addr).await.unwrap();
    let back = Instant::now();
    let _serving = restarted.serve(listener, None).await;
    restarted
        .wait_for(
            "registration after the restart",
            Duration::from_secs(20),
            &f.agent,
            |calls| calls.iter().find_map(|c| c.registration().cloned()),
        )
        .await;
    // Caught within the backoff reached so far (1 s, 2 s, 4 s… plus jitter).
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "re-registered {:?} after the restart",
        back.elapsed()
    );
    let heartbeat = restarted
        .wait_for(
            "heartbeat after the restart",
            Duration::from_secs(20),
            &f.agent,
            |calls| {
                calls
                    .iter()
                    .find_map(|c| c.heartbeat().map(|(_, h)| h.clone()))
            },
        )
        .await;
    assert!(
        heartbeat
            .workload_statuses
            .iter()
            .any(|s| s.workload_id == "web"),
        "the workload applied during the outage is reported: {heartbeat:?}"
    );
}

#[tokio::test]
async fn an_unacknowledged_heartbeat_makes_the_agent_register_again() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let f = start_agent(serving.addr, UNREACHABLE_RUNTIMES).await;
    fake.wait_for(
        "first heartbeat",
        Duration::from_secs(20),
        &f.agent,
        |calls| calls.iter().find_map(Call::heartbeat).map(|_| ()),
    )
    .await;

    fake.set(|s| s.acknowledge = false);
    let after_nack = fake
        .wait_for(
            "a call after an unacknowledged heartbeat",
            Duration::from_secs(20),
            &f.agent,
            |calls| {
                let nack = calls.iter().position(
                    |c| matches!(c, Call::Heartbeat { acknowledged, .. } if !acknowledged),
                )?;
                calls.get(nack + 1).cloned()
            },
        )
        .await;
    assert!(
        after_nack.registration().is_some(),
        "the agent must register again right after an unacknowledged heartbeat, not {after_nack:?}"
    );
}

#[tokio::test]
async fn a_draining_node_refuses_new_workloads_keeps_existing_ones_and_lifts_the_drain() {
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let mut f = start_agent(serving.addr, UNREACHABLE_RUNTIMES).await;
    f.client
        .apply_workload(container("web", "r1", 0, 0))
        .await
        .unwrap();
    f.client
        .apply_workload(container("old", "r1", 0, 0))
        .await
        .unwrap();

    fake.set(|s| s.drain = true);
    wait_health(&mut f, "draining", Duration::from_secs(20), |s| {
        s.get("node").is_some_and(|n| n == "draining")
    })
    .await;
    let refused = f
        .client
        .apply_workload(container("api", "r1", 0, 0))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refused.message(), "node is draining");
    let missing = f
        .client
        .get_workload_status(GetWorkloadStatusRequest { id: "api".into() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "nothing was stored");

    let updated = f
        .client
        .apply_workload(container("web", "r2", 512, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(
        updated.applied,
        "existing workloads can be updated: {updated:?}"
    );
    let deleted = f
        .client
        .delete_workload(DeleteWorkloadRequest { id: "old".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.success, "existing workloads can be deleted");

    fake.set(|s| s.drain = false);
    wait_health(&mut f, "schedulable", Duration::from_secs(20), |s| {
        s.get("node").is_some_and(|n| n == "schedulable")
    })
    .await;
    let accepted = f
        .client
        .apply_workload(container("api", "r1", 0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(accepted.applied, "{accepted:?}");
}

/// A CA issuing certificates with the uses each party needs. Without a
/// client certificate of its own (PERSYS_SCHEDULER_TLS_CERT) the agent's
/// certificate serves its API and authenticates it to the scheduler, so it
/// carries both server and client use.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `name` on loopback.
    fn issue(&self, name: &str, uses: &[ExtendedKeyUsagePurpose]) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = uses.to_vec();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A scheduler's TLS: a certificate from this CA, and client
    /// certificates required to chain to `client_ca_pem`.
    fn scheduler_tls(&self, client_ca_pem: &str) -> ServerTlsConfig {
        let (cert, key) = self.issue("persys-scheduler", &[ExtendedKeyUsagePurpose::ServerAuth]);
        ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(client_ca_pem))
    }
}

/// The subject common name of a DER certificate: the last CN attribute
/// (the issuer's comes first).
fn common_name(der: &[u8]) -> Option<String> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(5).rposition(|w| w == CN_OID)? + 5;
    let (tag, len) = (*der.get(at)?, *der.get(at + 1)? as usize);
    if !matches!(tag, 0x0c | 0x13) || len >= 0x80 {
        return None;
    }
    String::from_utf8(der.get(at + 2..at + 2 + len)?.to_vec()).ok()
}

/// Files for an agent whose certificate comes from `pki`.
fn agent_identity(pki: &Pki, dir: &std::path::Path) -> (String, Vec<(String, String)>) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = pki.issue(
        "persys-agent",
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    std::fs::write(dir.join("agent.crt"), &cert).unwrap();
    std::fs::write(dir.join("agent.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
    let file = |name: &str| dir.join(name).display().to_string();
    let env = vec![
        ("PERSYS_TLS_CERT".to_string(), file("agent.crt")),
        ("PERSYS_TLS_KEY".to_string(), file("agent.key")),
        ("PERSYS_TLS_CA".to_string(), file("ca.crt")),
    ];
    (cert, env)
}

#[tokio::test]
async fn the_agent_dials_the_scheduler_with_mutual_tls_and_its_own_certificate() {
    let pki = Pki::new("persys test CA");
    let fake = FakeScheduler::with(Script::default());
    let serving = fake
        .serve(
            loopback_listener().await,
            Some(pki.scheduler_tls(&pki.ca_pem)),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (agent_cert, mut env) = agent_identity(&pki, &dir.path().join("certs"));
    env.push(("PERSYS_SCHEDULER_ADDR".into(), serving.addr.to_string()));
    let agent = AgentProcess::start_plaintext(&dir.path().join("state"), &as_refs(&env)).await;

    let peer_cert = fake
        .wait_for(
            "registration over mTLS",
            Duration::from_secs(20),
            &agent,
            |calls| {
                calls.iter().find_map(|c| match c {
                    Call::Register { peer_cert, .. } => Some(peer_cert.clone()),
                    Call::Heartbeat { .. } => None,
                })
            },
        )
        .await
        .expect("the agent presented a client certificate");
    assert_eq!(common_name(&peer_cert).as_deref(), Some("persys-agent"));
    let expected = CertificateDer::from_pem_slice(agent_cert.as_bytes()).unwrap();
    assert_eq!(peer_cert, expected.to_vec(), "the agent's own certificate");
    fake.wait_for(
        "heartbeat over mTLS",
        Duration::from_secs(20),
        &agent,
        |calls| calls.iter().find_map(Call::heartbeat).map(|_| ()),
    )
    .await;
}

#[tokio::test]
async fn with_a_client_certificate_of_its_own_the_agent_presents_that_one() {
    // The agent's server certificate is for serving only (a scheduler
    // verifying client certificates would refuse it); the client certificate
    // names the node's agent, which the agents' default policy maps to no
    // role.
    let pki = Pki::new("persys test CA");
    let fake = FakeScheduler::with(Script::default());
    let serving = fake
        .serve(
            loopback_listener().await,
            Some(pki.scheduler_tls(&pki.ca_pem)),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (server_cert, server_key) =
        pki.issue("persys-agent", &[ExtendedKeyUsagePurpose::ServerAuth]);
    let (client_cert, client_key) =
        pki.issue("compute-agent", &[ExtendedKeyUsagePurpose::ClientAuth]);
    for (name, content) in [
        ("agent.crt", &server_cert),
        ("agent.key", &server_key),
        ("scheduler-client.crt", &client_cert),
        ("scheduler-client.key", &client_key),
        ("ca.crt", &pki.ca_pem),
    ] {
        std::fs::write(certs.join(name), content).unwrap();
    }
    let file = |name: &str| certs.join(name).display().to_string();
    let env = vec![
        ("PERSYS_TLS_CERT".to_string(), file("agent.crt")),
        ("PERSYS_TLS_KEY".to_string(), file("agent.key")),
        ("PERSYS_TLS_CA".to_string(), file("ca.crt")),
        (
            "PERSYS_SCHEDULER_TLS_CERT".to_string(),
            file("scheduler-client.crt"),
        ),
        (
            "PERSYS_SCHEDULER_TLS_KEY".to_string(),
            file("scheduler-client.key"),
        ),
        (
            "PERSYS_SCHEDULER_ADDR".to_string(),
            serving.addr.to_string(),
        ),
    ];
    let agent = AgentProcess::start_plaintext(&dir.path().join("state"), &as_refs(&env)).await;
    let peer_cert = fake
        .wait_for(
            "registration over mTLS",
            Duration::from_secs(20),
            &agent,
            |calls| {
                calls.iter().find_map(|c| match c {
                    Call::Register { peer_cert, .. } => Some(peer_cert.clone()),
                    Call::Heartbeat { .. } => None,
                })
            },
        )
        .await
        .expect("the agent presented a client certificate");
    assert_eq!(common_name(&peer_cert).as_deref(), Some("compute-agent"));
    let expected = CertificateDer::from_pem_slice(client_cert.as_bytes()).unwrap();
    assert_eq!(peer_cert, expected.to_vec());
}

#[tokio::test]
async fn a_scheduler_with_a_certificate_from_another_ca_is_not_registered_with() {
    // The impostor would accept the agent's certificate: only the agent's
    // check of the scheduler's certificate stands in the way.
    let pki = Pki::new("persys test CA");
    let impostor_ca = Pki::new("impostor CA");
    let fake = FakeScheduler::with(Script::default());
    let serving = fake
        .serve(
            loopback_listener().await,
            Some(impostor_ca.scheduler_tls(&pki.ca_pem)),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (_, mut env) = agent_identity(&pki, &dir.path().join("certs"));
    env.push(("PERSYS_SCHEDULER_ADDR".into(), serving.addr.to_string()));
    let agent = AgentProcess::start_plaintext(&dir.path().join("state"), &as_refs(&env)).await;
    let mut client = plaintext_client(agent.port).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let health = client
            .health_check(HealthCheckRequest {})
            .await
            .unwrap()
            .into_inner();
        let status = health.runtime_status["scheduler"].clone();
        if status.starts_with("not registered") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the link never failed: {status}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.contains("cannot reach the scheduler"), "{status}");
    assert!(
        fake.registrations().is_empty(),
        "registered with a scheduler it cannot trust"
    );
}

/// True when the engine, the test image and docker-compose are here; else
/// the test is skipped (or fails, in CI).
fn engine_and_compose(test: &str) -> bool {
    let image =
        std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into());
    let ran = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ready = ran("docker", &["image", "inspect", &image]) && ran("docker-compose", &["version"]);
    if !ready {
        persys_test_support::skip(
            test,
            "the Docker engine, the test image or docker-compose",
            &"`docker image inspect` or `docker-compose version` failed",
        );
    }
    ready
}

/// The first usage of workload `id` with memory in it that a heartbeat to
/// `fake` carried.
async fn heartbeat_usage(
    fake: &FakeScheduler,
    agent: &AgentProcess,
    id: &str,
) -> persys_api::control::v1::WorkloadUsageSnapshot {
    let what = format!("a heartbeat with {id}'s usage");
    fake.wait_for(&what, Duration::from_secs(90), agent, |calls| {
        calls.iter().filter_map(Call::heartbeat).find_map(|(_, h)| {
            h.workload_usage
                .iter()
                .find(|u| u.workload_id == id && u.memory_bytes > 0)
                .cloned()
        })
    })
    .await
}

/// Deletes workload `id` and waits until the agent no longer has it.
async fn delete_and_wait(f: &mut Fixture, id: &str) {
    f.client
        .delete_workload(DeleteWorkloadRequest { id: id.into() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while f
        .client
        .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .is_ok_and(|r| r.into_inner().status.is_some())
    {
        assert!(
            Instant::now() < deadline,
            "{id} was not deleted:\n{}",
            f.agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_compose_workloads_usage_read_from_its_cgroups_reaches_the_scheduler() {
    if !engine_and_compose("a_compose_workloads_usage_read_from_its_cgroups_reaches_the_scheduler")
    {
        return;
    }
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let project = format!("persys-usage-hb-{:08x}", fastrand::u32(..));
    let mut f = start_agent(
        serving.addr,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_USAGE_INTERVAL", "1s"),
        ],
    )
    .await;
    let image =
        std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into());
    let yaml = format!(
        "services:\n  web:\n    image: {image}\n    init: true\n    command: [\"sleep\", \"3600\"]\n  db:\n    image: {image}\n    init: true\n    command: [\"sleep\", \"3600\"]\n"
    );
    f.client
        .apply_workload(ApplyWorkloadRequest {
            id: project.clone(),
            r#type: WorkloadType::Compose as i32,
            revision_id: String::new(),
            desired_state: DesiredState::Running as i32,
            spec: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                    project_name: project.clone(),
                    compose_yaml: yaml,
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();

    let usage = heartbeat_usage(&fake, &f.agent, &project).await;
    assert_eq!(usage.r#type, "compose", "{usage:?}");
    assert_eq!(usage.source, "cgroup", "{usage:?}");
    wait_health(
        &mut f,
        "how container usage is read",
        Duration::from_secs(20),
        |status| {
            status
                .get("container_usage")
                .is_some_and(|s| s.starts_with("cgroup v"))
        },
    )
    .await;

    delete_and_wait(&mut f, &project).await;
}

#[tokio::test]
async fn a_vms_usage_read_with_libvirts_bulk_statistics_reaches_the_scheduler() {
    let test = "a_vms_usage_read_with_libvirts_bulk_statistics_reaches_the_scheduler";
    let libvirt = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !libvirt {
        persys_test_support::skip(
            test,
            "libvirtd on qemu:///system",
            &"`virsh -c qemu:///system version` failed",
        );
        return;
    }
    let fake = FakeScheduler::with(Script::default());
    let serving = fake.serve(loopback_listener().await, None).await;
    let id = format!("persys-usage-vm-{:08x}", fastrand::u32(..));
    let mut f = start_agent(
        serving.addr,
        &[
            ("PERSYS_VM_ENABLED", "true"),
            ("PERSYS_VM_STOP_TIMEOUT", "2s"),
            ("PERSYS_USAGE_INTERVAL", "1s"),
        ],
    )
    .await;
    f.client
        .apply_workload(ApplyWorkloadRequest {
            id: id.clone(),
            r#type: WorkloadType::Vm as i32,
            revision_id: String::new(),
            desired_state: DesiredState::Running as i32,
            spec: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Vm(VmSpec {
                    vcpus: 1,
                    memory_mb: 64,
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();

    let usage = heartbeat_usage(&fake, &f.agent, &id).await;
    assert_eq!(usage.r#type, "vm", "{usage:?}");
    assert_eq!(usage.source, "libvirt", "{usage:?}");

    delete_and_wait(&mut f, &id).await;
}
