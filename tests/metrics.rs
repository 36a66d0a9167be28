//! /metrics, /healthz and /readyz of a running agent: the counters move
//! where things happen.

mod common;
#[path = "common/docker.rs"]
mod docker;

use common::{AgentProcess, Certs, client, http_get, sample};
use persys_api::v1::*;

fn container(id: &str, image: &str) -> ApplyWorkloadRequest {
    docker::container_request(
        id,
        ContainerSpec {
            image: image.into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn metrics_move_after_applies_and_probes_answer() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(
        &dir.path().join("state"),
        &certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ],
    )
    .await;
    let port = agent.metrics_port;
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz"), (200, "ready\n".to_string()));

    let (status, before) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&before, r#"persys_agent_applies_total{outcome="created"}"#),
        None
    );

    let mut client = client(agent.port, &certs).await.unwrap();
    client
        .apply_workload(container("web", "nginx:1"))
        .await
        .unwrap();
    client
        .apply_workload(container("web", "nginx:1"))
        .await
        .unwrap();
    client
        .apply_workload(container("db", "postgres:16"))
        .await
        .unwrap();
    client
        .apply_workload(container("bad id", "nginx"))
        .await
        .unwrap_err();
    client
        .delete_workload(DeleteWorkloadRequest { id: "nope".into() })
        .await
        .unwrap();

    let (_, after) = http_get(port, "/metrics");
    let value = |series: &str| {
        sample(&after, series).unwrap_or_else(|| panic!("{series} missing:\n{after}"))
    };
    assert_eq!(
        value(r#"persys_agent_applies_total{outcome="created"}"#),
        2.0
    );
    assert_eq!(
        value(r#"persys_agent_applies_total{outcome="unchanged"}"#),
        1.0
    );
    assert_eq!(
        value(r#"persys_agent_applies_total{outcome="invalid"}"#),
        1.0
    );
    assert_eq!(
        value(r#"persys_agent_deletes_total{outcome="not_found"}"#),
        1.0
    );
    // Pending until the controller looks, then Unknown (docker is unreachable).
    let containers: f64 = ["Pending", "Running", "Stopped", "Failed", "Unknown"]
        .iter()
        .map(|state| {
            value(&format!(
                r#"persys_agent_workloads{{workload_type="container",state="{state}"}}"#
            ))
        })
        .sum();
    assert_eq!(containers, 2.0);
    assert_eq!(
        value(r#"persys_agent_workloads{workload_type="vm",state="Running"}"#),
        0.0
    );
    assert_eq!(
        value(
            r#"persys_agent_grpc_requests_total{method="persys.agent.v1.AgentService/ApplyWorkload",code="OK"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            r#"persys_agent_grpc_requests_total{method="persys.agent.v1.AgentService/ApplyWorkload",code="InvalidArgument"}"#
        ),
        1.0
    );
    assert!(
        value(
            r#"persys_agent_grpc_request_duration_seconds_count{method="persys.agent.v1.AgentService/ApplyWorkload"}"#
        ) >= 4.0
    );
    assert!(value("persys_agent_store_commits_total") >= 2.0);
    assert!(value("persys_agent_store_writes_total") >= 2.0);
    assert!(value("persys_agent_store_commit_duration_seconds_count") >= 2.0);
    assert!(value("persys_agent_store_log_entries") >= 2.0);
    assert_eq!(
        value(r#"persys_agent_runtime_up{runtime="docker"}"#),
        0.0,
        "docker is unreachable"
    );
    // Every background task runs, each named.
    for task in [
        "informer",
        "docker-controller",
        "docker-probe",
        "scheduler-link",
        "ceilings-ledger",
        "node-sampler",
        "metrics-endpoint",
        "grpc-health",
        "tls-reloader",
    ] {
        let series = format!(r#"persys_agent_background_task_up{{task="{task}"}}"#);
        if task == "scheduler-link" {
            // Standalone: no link task at all.
            assert!(!text_has(port, &series), "{series}");
        } else {
            assert_eq!(value(&series), 1.0, "{series}");
        }
    }

    // The unreachable engine makes the Docker controller's reconciles fail,
    // and each failure is counted against its runtime.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, text) = http_get(port, "/metrics");
        let errors = sample(
            &text,
            r#"persys_agent_runtime_errors_total{runtime="docker"}"#,
        );
        let failed = sample(
            &text,
            r#"persys_agent_reconciles_total{controller="docker",result="error"}"#,
        );
        if errors.is_some_and(|e| e >= 1.0) && failed.is_some_and(|f| f >= 1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no runtime error counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // A Watch stream is counted while it is open.
    let stream = client
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, text) = http_get(port, "/metrics");
        if sample(&text, "persys_agent_watch_streams") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch stream not counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(stream);
}

/// Whether /metrics has a sample named `series`.
fn text_has(port: u16, series: &str) -> bool {
    http_get(port, "/metrics")
        .1
        .lines()
        .any(|line| line.starts_with(series))
}
