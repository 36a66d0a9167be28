//! The agent binary running a compose project on the real engine through
//! docker-compose, end to end, and reporting the compose CLI it found.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into())
}

/// True when a Docker engine and docker-compose answer. Otherwise the test
/// `test` is skipped (and recorded as skipped), or fails in CI.
fn compose_available(test: &str) -> bool {
    let engine = Command::new("docker")
        .args(["image", "inspect", &test_image()])
        .output()
        .is_ok_and(|o| o.status.success());
    let compose = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(engine && compose) {
        persys_test_support::skip(
            test,
            "the Docker engine, the test image or docker-compose",
            &format!(
                "`docker image inspect {}`: {}, `docker-compose version`: {}",
                test_image(),
                if engine { "ok" } else { "failed" },
                if compose { "ok" } else { "failed" }
            ),
        );
    }
    engine && compose
}

fn project_containers(project: &str) -> usize {
    let output = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).lines().count()
}

async fn status(api: &mut AgentServiceClient<Channel>, id: &str) -> Option<WorkloadStatus> {
    api.get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .ok()
        .and_then(|r| r.into_inner().status)
}

#[tokio::test]
async fn a_compose_project_runs_reports_its_cli_and_is_deleted() {
    if !compose_available("a_compose_project_runs_reports_its_cli_and_is_deleted") {
        return;
    }
    let id = format!("compose-e2e-{}", std::process::id());
    let project = format!("persys-e2e-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(
        &dir.path().join("state"),
        &certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_RECONCILE_INTERVAL", "10m"),
        ],
    )
    .await;
    let mut api = client(agent.port, &certs).await.unwrap();
    let yaml = format!(
        "services:\n  web:\n    image: {}\n    init: true\n    command: [\"sleep\", \"3600\"]\n    environment:\n      GREETING: ${{GREETING}}\n",
        test_image()
    );
    let applied = api
        .apply_workload(ApplyWorkloadRequest {
            id: id.clone(),
            r#type: WorkloadType::Compose as i32,
            revision_id: String::new(),
            desired_state: DesiredState::Running as i32,
            spec: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                    probes: Default::default(),
                    project_name: project.clone(),
                    compose_yaml: yaml,
                    env: [("GREETING".to_string(), "hello".to_string())].into(),
                })),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(applied.applied);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if status(&mut api, &id)
            .await
            .is_some_and(|s| s.actual_state() == ActualState::Running)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "compose project not running within 60 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(project_containers(&project), 1);

    let health = api
        .health_check(HealthCheckRequest {})
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut health = health;
    while !health.runtime_status.contains_key("compose_binary") {
        assert!(
            Instant::now() < deadline,
            "no compose_binary in {:?}",
            health.runtime_status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        health = api
            .health_check(HealthCheckRequest {})
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(health.runtime_status["compose"], "healthy");
    assert!(
        health.runtime_status["compose_binary"]
            .chars()
            .any(|c| c.is_ascii_digit()),
        "{:?}",
        health.runtime_status
    );

    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&mut api, &id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "compose workload not deleted within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(project_containers(&project), 0, "project taken down");
}

/// Compose processes whose command line names `project`.
fn compose_processes(project: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("compose") && cmdline.contains(project) {
            found.push(cmdline);
        }
    }
    found
}

#[tokio::test]
async fn sigterm_ends_watches_at_once_and_cancels_a_slow_compose_up_at_the_deadline() {
    if !compose_available(
        "sigterm_ends_watches_at_once_and_cancels_a_slow_compose_up_at_the_deadline",
    ) {
        return;
    }
    // A registry on loopback that accepts connections and never answers:
    // a compose `up` pulling from it stays in flight (the engine waits
    // for its TLS handshake) until the agent cancels it.
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry_port = registry.local_addr().unwrap().port();
    let (pulling_tx, pulling) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in registry.incoming().flatten() {
            held.push(stream);
            let _ = pulling_tx.send(());
        }
    });

    let id = format!("compose-slow-{}", std::process::id());
    let project = format!("persys-slow-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let state = dir.path().join("state");
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_COMPOSE_ENABLED", "true"),
        ("PERSYS_RECONCILE_INTERVAL", "10m"),
        ("PERSYS_SHUTDOWN_TIMEOUT", "3s"),
    ];
    let mut agent = AgentProcess::start(&state, &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    let yaml = format!(
        "services:\n  web:\n    image: 127.0.0.1:{registry_port}/persys-slow/never:1\n    command: [\"sleep\", \"3600\"]\n"
    );
    api.apply_workload(ApplyWorkloadRequest {
        id: id.clone(),
        r#type: WorkloadType::Compose as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                probes: Default::default(),
                project_name: project.clone(),
                compose_yaml: yaml,
                env: Default::default(),
            })),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || pulling.recv_timeout(Duration::from_secs(120)))
        .await
        .unwrap()
        .expect("the engine never reached the registry: compose up did not start");
    assert!(
        !compose_processes(&project).is_empty(),
        "compose up is not running"
    );

    let mut watch = api
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        let event = watch.message().await.unwrap().expect("the initial list");
        if event.r#type == WatchEventType::Bookmark as i32 {
            break;
        }
    }

    let signalled = Instant::now();
    let exit = agent.signal("TERM").await;
    let took = signalled.elapsed();
    assert!(exit.success(), "{}", agent.log_text());
    assert!(
        took < Duration::from_secs(3 + 1),
        "exited {took:?} after SIGTERM, past PERSYS_SHUTDOWN_TIMEOUT=3s + 1 s:\n{}",
        agent.log_text()
    );
    assert!(
        matches!(watch.message().await, Ok(None) | Err(_)),
        "the watch stream ended"
    );
    assert!(
        agent.log_text().contains("cancelling them"),
        "the slow up was cancelled at the deadline:\n{}",
        agent.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !compose_processes(&project).is_empty() {
        assert!(
            Instant::now() < deadline,
            "compose processes outlived the agent: {:?}",
            compose_processes(&project)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It reopens cleanly, and the workload is still there to delete.
    let agent = AgentProcess::start(&state, &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    assert!(status(&mut api, &id).await.is_some());
    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(&mut api, &id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "compose workload not deleted within 120 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `(name, value)` of a NUL-separated environment, as `/proc/<pid>/environ`.
fn environ(bytes: &[u8]) -> std::collections::BTreeMap<String, String> {
    bytes
        .split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (name, value) = entry.split_once('=')?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

/// The `Config` of the project's one container: its environment and labels.
fn container_config(project: &str) -> serde_json::Value {
    let listed = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
        ])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&listed.stdout).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains('\n'),
        "one container: {id:?}"
    );
    let inspected = Command::new("docker")
        .args(["inspect", "--format", "{{json .Config}}", &id])
        .output()
        .unwrap();
    serde_json::from_slice(&inspected.stdout).unwrap()
}

async fn wait_running(api: &mut AgentServiceClient<Channel>, id: &str, agent: &AgentProcess) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let found = status(api, id).await;
        if found
            .as_ref()
            .is_some_and(|s| s.actual_state() == ActualState::Running)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "compose project not running within 90 s: {found:?}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_deleted(api: &mut AgentServiceClient<Channel>, id: &str, agent: &AgentProcess) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while status(api, id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "compose workload not deleted within 90 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn compose_runs_with_an_allow_listed_environment_and_spec_values_only_reach_it_through_dot_env()
 {
    if !compose_available(
        "compose_runs_with_an_allow_listed_environment_and_spec_values_only_reach_it_through_dot_env",
    ) {
        return;
    }
    let n = std::process::id();
    let (id, project) = (format!("compose-env-{n}"), format!("persys-env-{n}"));
    let dir = tempfile::tempdir().unwrap();
    // The real docker-compose, started through a script that first keeps
    // the environment it was given (the shell's own, as exec'd).
    let dumps = dir.path().join("environments");
    std::fs::create_dir(&dumps).unwrap();
    let wrapper = dir.path().join("docker-compose-keeping-env");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncat /proc/$$/environ > '{}'/$$\nexec docker-compose \"$@\"\n",
            dumps.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let engine = "unix:///var/run/docker.sock";
    let agent = AgentProcess::start(
        &dir.path().join("state"),
        &certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_RECONCILE_INTERVAL", "10m"),
            ("PERSYS_COMPOSE_BINARY", wrapper.to_str().unwrap()),
            ("DOCKER_HOST", engine),
            ("LANG", "C.UTF-8"),
            ("PERSYS_TEST_AGENT_ONLY", "agent-secret"),
        ],
    )
    .await;
    let mut api = client(agent.port, &certs).await.unwrap();
    let apply = |env: &[(&str, &str)]| ApplyWorkloadRequest {
        id: id.clone(),
        r#type: WorkloadType::Compose as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                probes: Default::default(),
                project_name: project.clone(),
                compose_yaml: format!(
                    "services:\n  web:\n    image: {}\n    init: true\n    command: [\"sleep\", \"3600\"]\n    environment:\n      GREETING: ${{GREETING}}\n      INJECT: ${{INJECT}}\n      PRELOAD: ${{LD_PRELOAD:-unset}}\n      AGENT: ${{PERSYS_TEST_AGENT_ONLY:-unset}}\n",
                    test_image()
                ),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })),
        }),
        ..Default::default()
    };

    // A spec variable the loader or compose would read as a setting is
    // refused at apply, and nothing is stored.
    let refused = api
        .apply_workload(apply(&[
            ("GREETING", "hi"),
            ("LD_PRELOAD", "/nonexistent.so"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .starts_with("spec.compose.env[\"LD_PRELOAD\"]"),
        "{}",
        refused.message()
    );
    assert!(status(&mut api, &id).await.is_none());

    // A value that tries to end its .env line and set another variable
    // stays one value.
    let inject = "x\nLD_PRELOAD=/tmp/evil.so";
    api.apply_workload(apply(&[("GREETING", "hello"), ("INJECT", inject)]))
        .await
        .unwrap();
    wait_running(&mut api, &id, &agent).await;
    let config = container_config(&project);
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for expected in [
        "GREETING=hello",
        "INJECT=x\nLD_PRELOAD=/tmp/evil.so",
        "PRELOAD=unset",
        "AGENT=unset",
    ] {
        assert!(env.contains(&expected), "{expected:?} not in {env:?}");
    }
    assert_eq!(config["Labels"]["persys.workload-id"], id.as_str());
    assert_eq!(config["Labels"]["persys.managed"], "true");

    // Every compose process (the version probe, `up`) got the allow-list
    // and nothing of the spec or of the rest of the agent's environment.
    let mut allowed: Vec<&str> = persys_controllers::compose::INHERITED_ENV.to_vec();
    allowed.extend(["DOCKER_HOST", "COMPOSE_PROJECT_NAME"]);
    let mut ran_on_the_project = 0;
    for dump in std::fs::read_dir(&dumps).unwrap().flatten() {
        let env = environ(&std::fs::read(dump.path()).unwrap());
        for name in env.keys() {
            assert!(
                allowed.contains(&name.as_str()),
                "{name} reached compose: {env:?}"
            );
        }
        assert_eq!(env["DOCKER_HOST"], engine);
        assert_eq!(env["LANG"], "C.UTF-8");
        if let Some(name) = env.get("COMPOSE_PROJECT_NAME") {
            assert_eq!(name, &project);
            ran_on_the_project += 1;
        }
    }
    assert!(
        ran_on_the_project > 0,
        "no compose command on the project recorded"
    );

    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    wait_deleted(&mut api, &id, &agent).await;
    assert_eq!(project_containers(&project), 0, "project taken down");
}

/// Takes a project started by hand down when the test ends, however.
struct HandProject<'a> {
    dir: &'a std::path::Path,
    project: &'a str,
}

impl HandProject<'_> {
    fn compose(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker-compose")
            .args(["-p", self.project])
            .args(args)
            .current_dir(self.dir)
            .output()
            .unwrap()
    }
}

impl Drop for HandProject<'_> {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "--remove-orphans"]);
    }
}

/// `(id, running)` of each container of `project`.
fn containers_of(project: &str) -> Vec<(String, String)> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.State}}",
            "--filter",
            &format!("label=com.docker.compose.project={project}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, state)| (id.to_string(), state.to_string()))
        .collect()
}

#[tokio::test]
async fn a_project_started_by_hand_under_the_workload_s_name_is_neither_adopted_nor_destroyed() {
    if !compose_available(
        "a_project_started_by_hand_under_the_workload_s_name_is_neither_adopted_nor_destroyed",
    ) {
        return;
    }
    let n = std::process::id();
    let (id, project) = (format!("compose-adopt-{n}"), format!("persys-adopt-{n}"));
    let dir = tempfile::tempdir().unwrap();
    let by_hand = dir.path().join("by-hand");
    std::fs::create_dir(&by_hand).unwrap();
    std::fs::write(
        by_hand.join("docker-compose.yml"),
        format!(
            "services:\n  web:\n    image: {}\n    init: true\n    command: [\"sleep\", \"3600\"]\n",
            test_image()
        ),
    )
    .unwrap();
    let hand = HandProject {
        dir: &by_hand,
        project: &project,
    };
    let up = hand.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let before = containers_of(&project);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].1, "running");

    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(
        &dir.path().join("state"),
        &certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_RECONCILE_INTERVAL", "10m"),
        ],
    )
    .await;
    let mut api = client(agent.port, &certs).await.unwrap();
    // Another command: an `up` over the hand-made project would recreate
    // its container.
    api.apply_workload(ApplyWorkloadRequest {
        id: id.clone(),
        r#type: WorkloadType::Compose as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                probes: Default::default(),
                project_name: project.clone(),
                compose_yaml: format!(
                    "services:\n  web:\n    image: {}\n    init: true\n    command: [\"sleep\", \"7200\"]\n",
                    test_image()
                ),
                env: Default::default(),
            })),
        }),
        ..Default::default()
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let found = status(&mut api, &id).await;
        if let Some(found) = found.filter(|s| s.message.contains("adoption rule")) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no adoption refusal within 60 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.actual_state(), ActualState::Failed);
    assert!(refused.message.contains(&project), "{}", refused.message);
    assert_eq!(
        refused.metadata.get("failure_reason").map(String::as_str),
        Some("POLICY_VIOLATION"),
        "{:?}",
        refused.metadata
    );
    let described = api
        .describe_workload(DescribeWorkloadRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        described
            .events
            .iter()
            .any(|e| e.reason == "AdoptionRefused" && e.message.contains(&project)),
        "{:?}",
        described.events
    );
    assert_eq!(containers_of(&project), before, "not brought up over");

    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    wait_deleted(&mut api, &id, &agent).await;
    assert_eq!(
        containers_of(&project),
        before,
        "not taken down with the workload"
    );
    drop(hand);
    assert!(containers_of(&project).is_empty());
}
