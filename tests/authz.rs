//! Who may do what, on the real binary over real mutual TLS: a certificate
//! per role (and unknown ones) against every RPC, the default policy, a
//! policy file reloaded while the agent runs, a broken one, `authz check`,
//! redaction for viewers and the audit trail of applies and deletes.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs};
use futures::StreamExt;
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::workload_spec::Spec;
use persys_api::v1::{
    ApplyWorkloadRequest, ConsoleRequest, ConsoleStart, ContainerSpec, DeleteWorkloadRequest,
    DescribeWorkloadRequest, ExecRequest, ExecStart, GetWorkloadStatusRequest, HealthCheckRequest,
    ListActionsRequest, ListWorkloadsRequest, StreamLogsRequest, WatchRequest, WorkloadSpec,
    WorkloadType, console_request, exec_request,
};
use tonic::Code;
use tonic::transport::Channel;

/// The client certificates of the test, signed by the agent's CA.
struct Callers {
    scheduler: (String, String),
    operator: (String, String),
    viewer: (String, String),
    /// A node's own certificate: CN compute-agent, as the Go agent's.
    node: (String, String),
    stranger: (String, String),
}

impl Callers {
    fn new(certs: &Certs) -> Callers {
        Callers {
            scheduler: certs.ca.leaf("persys-scheduler", false),
            operator: (certs.client_cert.clone(), certs.client_key.clone()),
            viewer: certs.ca.leaf("persys-viewer", false),
            node: certs.ca.leaf("compute-agent", false),
            stranger: certs.ca.leaf("someone-else", false),
        }
    }
}

async fn client_as(
    agent: &AgentProcess,
    certs: &Certs,
    who: &(String, String),
) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(channel_as(agent, certs, who).await)
}

const POLICY: &str = "\
# the platform's names, plus a viewer
rules:
  - match: {cn: persys-scheduler}
    role: scheduler
  - match: {cn: persysctl}
    role: operator
  - match: {cn: persys-viewer}
    role: viewer
";

fn container(id: &str, env: &[(&str, &str)]) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        spec: Some(WorkloadSpec {
            spec: Some(Spec::Container(ContainerSpec {
                image: "persys-test/busybox:latest".into(),
                command: vec!["sleep".into(), "3600".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The agent with Docker workloads accepted (pointed at an engine that is
/// not there: these tests are about the API, not the runtime).
async fn start(dir: &Path, certs: &Certs, extra: &[(&str, &str)]) -> AgentProcess {
    let mut env = vec![
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
    ];
    env.extend_from_slice(extra);
    AgentProcess::start(&dir.join("state"), certs, &env).await
}

/// Calls every AgentService RPC once; returns the code of each (OK for a
/// call that succeeded, whatever a stream then does).
async fn call_every_rpc(client: &mut AgentServiceClient<Channel>) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "ApplyWorkload",
            code(
                client
                    .apply_workload(container("probe", &[]))
                    .await
                    .map(drop),
            ),
        ),
        (
            "DeleteWorkload",
            code(
                client
                    .delete_workload(DeleteWorkloadRequest {
                        id: "absent".into(),
                    })
                    .await
                    .map(drop),
            ),
        ),
        (
            "GetWorkloadStatus",
            code(
                client
                    .get_workload_status(GetWorkloadStatusRequest {
                        id: "absent".into(),
                    })
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListWorkloads",
            code(
                client
                    .list_workloads(ListWorkloadsRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "HealthCheck",
            code(client.health_check(HealthCheckRequest {}).await.map(drop)),
        ),
        (
            "ListActions",
            code(
                client
                    .list_actions(ListActionsRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "Watch",
            code(client.watch(WatchRequest::default()).await.map(drop)),
        ),
        (
            "DescribeWorkload",
            code(
                client
                    .describe_workload(DescribeWorkloadRequest {
                        id: "absent".into(),
                    })
                    .await
                    .map(drop),
            ),
        ),
    ]
}

fn allowed(role: &str, rpc: &str) -> bool {
    match role {
        "operator" => true,
        "scheduler" => true,
        "viewer" => !matches!(rpc, "ApplyWorkload" | "DeleteWorkload"),
        _ => false,
    }
}

/// An mTLS channel to the agent presenting `who`'s certificate.
async fn channel_as(agent: &AgentProcess, certs: &Certs, who: &(String, String)) -> Channel {
    Channel::from_shared(format!("https://127.0.0.1:{}", agent.port))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&certs.ca.cert_pem))
                .domain_name("localhost")
                .identity(tonic::transport::Identity::from_pem(&who.0, &who.1)),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("mTLS connect")
}

async fn health_code(agent: &AgentProcess, certs: &Certs, who: &(String, String)) -> Code {
    let channel = channel_as(agent, certs, who).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    match health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn reflection_code(agent: &AgentProcess, certs: &Certs, who: &(String, String)) -> Code {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_response};
    let channel = channel_as(agent, certs, who).await;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    match client
        .server_reflection_info(futures::stream::iter([request]))
        .await
    {
        Ok(response) => {
            let mut stream = response.into_inner();
            match stream.message().await {
                Ok(Some(message)) => {
                    assert!(matches!(
                        message.message_response,
                        Some(server_reflection_response::MessageResponse::ListServicesResponse(_))
                    ));
                    Code::Ok
                }
                Ok(None) => Code::Unknown,
                Err(status) => status.code(),
            }
        }
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_role_gets_exactly_its_rpcs_and_strangers_get_none() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let policy = dir.path().join("authz.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = start(
        dir.path(),
        &certs,
        &[("PERSYS_AUTHZ_FILE", policy.to_str().unwrap())],
    )
    .await;
    let callers = Callers::new(&certs);
    for (role, who) in [
        ("scheduler", &callers.scheduler),
        ("operator", &callers.operator),
        ("viewer", &callers.viewer),
        ("none", &callers.node),
        ("none", &callers.stranger),
    ] {
        let mut client = client_as(&agent, &certs, who).await;
        for (rpc, code) in call_every_rpc(&mut client).await {
            if allowed(role, rpc) {
                assert_ne!(code, Code::PermissionDenied, "{role} calling {rpc}");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{role} calling {rpc}");
            }
        }
        // grpc.health.v1 is open to every verified certificate.
        assert_eq!(health_code(&agent, &certs, who).await, Code::Ok, "{role}");
        // Reflection: operators and viewers.
        let reflection = reflection_code(&agent, &certs, who).await;
        if matches!(role, "operator" | "viewer") {
            assert_eq!(reflection, Code::Ok, "{role} reflection");
        } else {
            assert_eq!(reflection, Code::PermissionDenied, "{role} reflection");
        }
    }

    // The refusal names the identity, the RPC and the rule.
    let mut viewer = client_as(&agent, &certs, &callers.viewer).await;
    let refused = viewer
        .apply_workload(container("web", &[]))
        .await
        .unwrap_err();
    let message = refused.message();
    assert!(message.contains("CN=persys-viewer"), "{message}");
    assert!(message.contains("role viewer"), "{message}");
    assert!(
        message.contains("persys.agent.v1.AgentService/ApplyWorkload"),
        "{message}"
    );
    assert!(message.contains("authz.yaml:7"), "{message}");

    let (_, metrics) = common::http_get(agent.metrics_port, "/metrics");
    let denied = common::sample(
        &metrics,
        "persys_agent_authz_denied_total{rpc=\"ApplyWorkload\",role=\"viewer\"}",
    );
    assert!(denied.is_some_and(|n| n >= 2.0), "{metrics}");
    assert!(
        !metrics.contains("someone-else") && !metrics.contains("compute-agent"),
        "metric labels must not carry identities"
    );
    // The policy file's reloader is a watched background task.
    assert_eq!(
        common::sample(
            &metrics,
            "persys_agent_background_task_up{task=\"authz-policy-reloader\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_default_policy_admits_the_platform_names_and_refuses_the_nodes_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = start(dir.path(), &certs, &[]).await;
    let callers = Callers::new(&certs);

    let mut scheduler = client_as(&agent, &certs, &callers.scheduler).await;
    let applied = scheduler
        .apply_workload(container("web", &[]))
        .await
        .expect("the scheduler applies");
    assert!(applied.get_ref().applied);
    let mut operator = client_as(&agent, &certs, &callers.operator).await;
    operator
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .expect("persysctl describes");

    for who in [&callers.node, &callers.viewer, &callers.stranger] {
        let mut client = client_as(&agent, &certs, who).await;
        let refused = client
            .delete_workload(DeleteWorkloadRequest { id: "web".into() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
        assert!(
            refused.message().contains("no role"),
            "{}",
            refused.message()
        );
        assert!(
            refused.message().contains("DeleteWorkload"),
            "{}",
            refused.message()
        );
        assert!(
            refused
                .message()
                .contains("no rule of the default policy matches"),
            "{}",
            refused.message()
        );
    }
    let mut node = client_as(&agent, &certs, &callers.node).await;
    let refused = node
        .apply_workload(container("web", &[]))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("CN=compute-agent"),
        "{}",
        refused.message()
    );
    // Nothing the refused callers sent reached the store.
    let status = operator
        .get_workload_status(GetWorkloadStatusRequest { id: "web".into() })
        .await
        .unwrap();
    assert!(status.get_ref().status.is_some());
    // A refused identity is logged once a minute, not per call.
    let log = agent.log_text();
    assert_eq!(
        log.matches("CN=compute-agent (no role) may not call")
            .count(),
        1,
        "{log}"
    );
}

/// Polls `check` until it holds (bounded): the policy file is checked on
/// an interval, and nothing else says when it was read.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_changed_policy_file_takes_effect_and_a_broken_one_keeps_the_previous_policy() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let policy = dir.path().join("authz.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = start(
        dir.path(),
        &certs,
        &[("PERSYS_AUTHZ_FILE", policy.to_str().unwrap())],
    )
    .await;
    let callers = Callers::new(&certs);
    let mut viewer = client_as(&agent, &certs, &callers.viewer).await;
    assert_eq!(
        viewer
            .apply_workload(container("web", &[]))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // The viewer becomes an operator, without a restart.
    std::fs::write(&policy, POLICY.replace("role: viewer", "role: operator")).unwrap();
    eventually("the reloaded policy lets persys-viewer apply", async || {
        viewer.apply_workload(container("web", &[])).await.is_ok()
    })
    .await;

    // A broken file is refused on reload: the previous policy stays.
    std::fs::write(
        &policy,
        "rules:\n  - match: {cn: persysctl}\n    role: root\n",
    )
    .unwrap();
    eventually("the broken policy is counted", async || {
        let (_, metrics) = common::http_get(agent.metrics_port, "/metrics");
        common::sample(&metrics, "persys_agent_authz_policy_invalid") == Some(1.0)
    })
    .await;
    let (_, metrics) = common::http_get(agent.metrics_port, "/metrics");
    assert_eq!(
        common::sample(&metrics, "persys_agent_authz_policy_reload_failures_total"),
        Some(1.0)
    );
    viewer
        .apply_workload(container("web2", &[]))
        .await
        .expect("the previous policy is still in force");
    let mut operator = client_as(&agent, &certs, &callers.operator).await;
    operator
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .expect("persysctl is still an operator");
    assert!(
        agent.log_text().contains("authz.yaml:2"),
        "the reload error names the file and line"
    );
}

#[test]
fn a_broken_policy_file_stops_the_agent_at_start_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let policy = dir.path().join("authz.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - match: {cn: persysctl}\n    role: operator\n  - match: {}\n    role: viewer\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
        .env_clear()
        .env("PERSYS_AUTHZ_FILE", &policy)
        .env("PERSYS_STATE_PATH", dir.path().join("state"))
        .env("PERSYS_GRPC_ADDR", "127.0.0.1")
        .env("PERSYS_GRPC_PORT", common::free_port().to_string())
        .env("PERSYS_METRICS_PORT", common::free_port().to_string())
        .env("PERSYS_TLS_CERT", certs.dir.join("agent.crt"))
        .env("PERSYS_TLS_KEY", certs.dir.join("agent.key"))
        .env("PERSYS_TLS_CA", certs.dir.join("ca.crt"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:4", policy.display())),
        "{stderr}"
    );
    assert!(!dir.path().join("state").exists(), "nothing was started");
}

#[test]
fn authz_check_prints_the_role_a_certificate_would_get() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let scheduler = write("scheduler.crt", &certs.ca.leaf("persys-scheduler", false).0);
    let node = write("node.crt", &certs.ca.leaf("compute-agent", false).0);
    let viewer = write("viewer.crt", &certs.ca.leaf("persys-viewer", false).0);
    let policy = write("authz.yaml", POLICY);
    let check = |cert: &Path, policy: Option<&Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"));
        command
            .env_clear()
            .args(["authz", "check", "--cert"])
            .arg(cert);
        if let Some(policy) = policy {
            command.env("PERSYS_AUTHZ_FILE", policy);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let (code, out) = check(&scheduler, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("identity: CN=persys-scheduler"), "{out}");
    assert!(out.contains("role: scheduler"), "{out}");
    let (code, out) = check(&node, None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("role: none"), "{out}");
    let (code, out) = check(&viewer, Some(&policy));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("role: viewer (rule 3"), "{out}");
}

#[tokio::test]
async fn viewers_see_secret_values_redacted_and_the_scheduler_sees_them_as_applied() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let policy = dir.path().join("authz.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = start(
        dir.path(),
        &certs,
        &[("PERSYS_AUTHZ_FILE", policy.to_str().unwrap())],
    )
    .await;
    let callers = Callers::new(&certs);
    let secret = format!("s3cret-{:032x}", fastrand::u128(..));
    let mut scheduler = client_as(&agent, &certs, &callers.scheduler).await;
    scheduler
        .apply_workload(container("web", &[("PASSWORD", &secret), ("EMPTY", "")]))
        .await
        .unwrap();

    let env_of = |response: &persys_api::v1::DescribeWorkloadResponse| {
        let spec = response
            .workload
            .as_ref()
            .and_then(|w| w.spec.as_ref())
            .and_then(|s| s.workload.as_ref())
            .and_then(|w| w.spec.as_ref());
        match spec {
            Some(Spec::Container(c)) => c.env.clone(),
            other => panic!("not a container: {other:?}"),
        }
    };
    let plain = scheduler
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .unwrap();
    assert_eq!(env_of(plain.get_ref())["PASSWORD"], secret);

    let mut viewer = client_as(&agent, &certs, &callers.viewer).await;
    let described = viewer
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .unwrap();
    let env = env_of(described.get_ref());
    assert!(
        env["PASSWORD"].starts_with("<redacted sha256:") && env["PASSWORD"].len() == 26,
        "{env:?}"
    );
    assert_eq!(env["EMPTY"], "");
    let debug = format!("{:?}", described.get_ref());
    assert!(!debug.contains(&secret), "the secret reached a viewer");

    let mut watch = viewer
        .watch(WatchRequest {
            id: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(first.object.is_some());
    assert!(
        !format!("{first:?}").contains(&secret),
        "the secret reached a viewer's watch"
    );
    assert!(format!("{first:?}").contains("<redacted sha256:"));
}

#[tokio::test]
async fn applies_and_deletes_record_who_asked_in_events_and_actions() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = start(dir.path(), &certs, &[]).await;
    let callers = Callers::new(&certs);
    let mut scheduler = client_as(&agent, &certs, &callers.scheduler).await;
    scheduler
        .apply_workload(container("web", &[]))
        .await
        .unwrap();
    let mut operator = client_as(&agent, &certs, &callers.operator).await;
    operator
        .delete_workload(DeleteWorkloadRequest { id: "web".into() })
        .await
        .unwrap();

    let described = operator
        .describe_workload(DescribeWorkloadRequest { id: "web".into() })
        .await
        .unwrap();
    let messages: Vec<&str> = described
        .get_ref()
        .events
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        messages.contains(&"Applied by CN=persys-scheduler (role scheduler)"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"Deletion requested by CN=persysctl (role operator)"),
        "{messages:?}"
    );

    let actions = operator
        .list_actions(ListActionsRequest {
            workload_id: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    let apply = actions
        .iter()
        .find(|a| a.action_type == "apply_workload")
        .expect("the apply is listed");
    assert_eq!(apply.caller, "CN=persys-scheduler");
    assert_eq!(apply.role, "scheduler");
    let delete = actions
        .iter()
        .find(|a| a.action_type == "delete_workload")
        .expect("the delete is listed");
    assert_eq!(delete.caller, "CN=persysctl");
    assert_eq!(delete.role, "operator");
}

/// An Exec request stream: the start, then the stream stays open.
fn exec_start(id: &str) -> impl futures::Stream<Item = ExecRequest> + Send + 'static {
    let start = ExecRequest {
        request: Some(exec_request::Request::Start(ExecStart {
            id: id.into(),
            command: vec!["true".into()],
            ..Default::default()
        })),
    };
    futures::stream::iter([start]).chain(futures::stream::pending())
}

fn console_start(id: &str) -> impl futures::Stream<Item = ConsoleRequest> + Send + 'static {
    let start = ConsoleRequest {
        request: Some(console_request::Request::Start(ConsoleStart {
            id: id.into(),
            force: false,
        })),
    };
    futures::stream::iter([start]).chain(futures::stream::pending())
}

#[tokio::test]
async fn a_viewer_may_stream_logs_but_exec_and_console_are_the_operators() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let policy = dir.path().join("authz.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let agent = start(
        dir.path(),
        &certs,
        &[("PERSYS_AUTHZ_FILE", policy.to_str().unwrap())],
    )
    .await;
    let callers = Callers::new(&certs);
    let mut viewer = client_as(&agent, &certs, &callers.viewer).await;

    let logs = viewer
        .stream_logs(StreamLogsRequest {
            id: "absent".into(),
            ..Default::default()
        })
        .await;
    if let Err(status) = &logs {
        assert_ne!(status.code(), Code::PermissionDenied, "{status:?}");
    }

    let refused = viewer.exec(exec_start("absent")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let message = refused.message();
    assert!(message.contains("CN=persys-viewer"), "{message}");
    assert!(message.contains("role viewer"), "{message}");
    assert!(message.contains("AgentService/Exec"), "{message}");
    assert!(message.contains("authz.yaml:7"), "{message}");

    let refused = viewer.console(console_start("absent")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let message = refused.message();
    assert!(message.contains("role viewer"), "{message}");
    assert!(message.contains("AgentService/Console"), "{message}");

    let mut scheduler = client_as(&agent, &certs, &callers.scheduler).await;
    let refused = scheduler.exec(exec_start("absent")).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let message = refused.message();
    assert!(message.contains("CN=persys-scheduler"), "{message}");
    assert!(message.contains("role scheduler"), "{message}");

    // The operator passes the check and reaches the session's own answer.
    let mut operator = client_as(&agent, &certs, &callers.operator).await;
    let missing = operator.exec(exec_start("absent")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = operator.console(console_start("absent")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}
