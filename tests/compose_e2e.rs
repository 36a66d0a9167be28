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
