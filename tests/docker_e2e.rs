//! The agent binary driving the real Docker engine end to end: converge,
//! repair drift, survive its own SIGKILL by adopting, delete.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

/// True when a Docker engine answers with the test image. Otherwise the
/// test `test` is skipped (and recorded as skipped), or fails in CI.
fn docker_available(test: &str) -> bool {
    docker::engine_ready(test, "the Docker engine or the test image", &[])
}

fn containers_of(id: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=persys.workload-id={id}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn sleeper(id: &str) -> ApplyWorkloadRequest {
    docker::sleeper(id, &docker::test_image())
}

async fn wait_for(
    client: &mut AgentServiceClient<Channel>,
    id: &str,
    what: &str,
    condition: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    docker::wait_for_status(client, id, what, Duration::from_secs(30), condition).await
}

#[tokio::test]
async fn a_container_converges_heals_is_adopted_after_sigkill_and_is_deleted() {
    if !docker_available("a_container_converges_heals_is_adopted_after_sigkill_and_is_deleted") {
        return;
    }
    let id = format!("e2e-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let state = dir.path().join("state");
    // A long resync: drift must be repaired because of Docker's events.
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_RECONCILE_INTERVAL", "10m"),
    ];
    let mut agent = AgentProcess::start(&state, &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(sleeper(&id)).await.unwrap();
    let running = wait_for(&mut api, &id, "running", |s| {
        s.actual_state() == ActualState::Running
    })
    .await;
    let container = running.metadata["runtime_ref"].clone();
    assert_eq!(containers_of(&id), std::slice::from_ref(&container));

    // Drift: killed out of band, restarted by the agent.
    assert!(
        Command::new("docker")
            .args(["kill", &container])
            .status()
            .unwrap()
            .success()
    );
    let restarted = wait_for(&mut api, &id, "restarted", |s| {
        s.actual_state() == ActualState::Running && s.metadata["restart_count"] != "0"
    })
    .await;
    let restarts_before: u32 = restarted.metadata["restart_count"].parse().unwrap();

    // The agent dies, and while no agent runs the container is killed too:
    // only the new agent, on the same state, can see that and start the
    // same container again (adopting it, not creating another). The status
    // stored before the SIGKILL says Running with `restarts_before`, so it
    // cannot pass for the new agent's.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    drop(agent);
    assert!(
        Command::new("docker")
            .args(["kill", &container])
            .status()
            .unwrap()
            .success()
    );
    let agent = AgentProcess::start(&state, &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    let adopted = wait_for(&mut api, &id, "started again by the new agent", |s| {
        s.actual_state() == ActualState::Running
            && s.metadata["restart_count"].parse::<u32>().unwrap() > restarts_before
    })
    .await;
    assert_eq!(
        adopted.metadata["restart_count"],
        (restarts_before + 1).to_string(),
        "one restart, by the new agent, counted on from the stored count"
    );
    assert_eq!(
        adopted.metadata["runtime_ref"], container,
        "the same container"
    );
    assert_eq!(containers_of(&id).len(), 1, "never duplicated");

    // Delete: the container goes, then the workload.
    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let gone = api
            .get_workload_status(GetWorkloadStatusRequest { id: id.clone() })
            .await
            .is_err_and(|e| e.code() == tonic::Code::NotFound);
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workload not deleted within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(containers_of(&id).is_empty(), "container removed");
}
