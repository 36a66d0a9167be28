//! Image pulls run in slots of their own: pulls stuck on a registry that
//! never answers leave the reconcile slots to quick reconciles. Real Docker
//! engine, the agent binary, and a registry on loopback that answers the
//! engine's `/v2/` ping and then never answers a manifest request.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{AgentProcess, plaintext_client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use docker::{ScopeCleanup, test_image};

/// True when the engine and the test image are there; otherwise skipped
/// (a failure in CI).
fn prerequisites(test: &str) -> bool {
    docker::engine_ready(
        test,
        "the Docker engine with the test image (bash hack/deps.sh)",
        &[],
    )
}

/// A registry on 127.0.0.1 that refuses TLS (so the engine, which treats
/// loopback registries as insecure, falls back to HTTP), answers the `/v2/`
/// ping, and holds every other request open without a word: a pull from it
/// never ends. Counts the manifest requests it holds.
async fn silent_registry() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(AtomicUsize::new(0));
    let counter = held.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            open.push(tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if buffer[0] == 0x16 {
                        return; // a TLS ClientHello: refuse
                    }
                    let request = String::from_utf8_lossy(&buffer[..n]);
                    if request.starts_with("GET /v2/ ") {
                        let ping = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDocker-Distribution-Api-Version: registry/2.0\r\nContent-Length: 2\r\n\r\n{}";
                        if stream.write_all(ping.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    // A manifest request: held open, never answered.
                    counter.fetch_add(1, Ordering::SeqCst);
                    let mut rest = [0u8; 1024];
                    while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                    return;
                }
            }));
        }
    });
    (port, held)
}

fn workload(id: &str, image: &str) -> ApplyWorkloadRequest {
    docker::sleeper(id, image)
}

async fn status(api: &mut AgentServiceClient<Channel>, id: &str) -> WorkloadStatus {
    api.get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap_or_default()
}

async fn wait_for(
    api: &mut AgentServiceClient<Channel>,
    id: &str,
    what: &str,
    condition: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    docker::wait_for_status(api, id, what, Duration::from_secs(120), condition).await
}

fn pulling(status: &WorkloadStatus) -> bool {
    status.actual_state() == ActualState::Pending && status.message.contains("pulling image")
}

#[tokio::test]
async fn quick_containers_start_while_every_pull_slot_is_stuck_on_a_silent_registry() {
    let test = "quick_containers_start_while_every_pull_slot_is_stuck_on_a_silent_registry";
    if !prerequisites(test) {
        return;
    }
    let (port, held) = silent_registry().await;
    let suffix = format!("{}-{port}", std::process::id());
    let scope = format!("pull-slots-{suffix}");
    let _cleanup = ScopeCleanup {
        scope: scope.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    // Two reconcile slots and one pull slot; three stuck pulls would have
    // held both reconcile slots when pulls ran inside reconciles.
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_DOCKER_SCOPE", scope.as_str()),
        ("PERSYS_MAX_CONCURRENT_RECONCILES", "2"),
        ("PERSYS_MAX_CONCURRENT_PULLS", "1"),
        ("PERSYS_PULL_TIMEOUT", "10m"),
    ];
    let agent = AgentProcess::start_plaintext(&dir.path().join("state"), &env).await;
    let mut api = plaintext_client(agent.port).await.unwrap();

    let stuck: Vec<String> = (0..3).map(|i| format!("stuck-{i}-{suffix}")).collect();
    for (i, id) in stuck.iter().enumerate() {
        let image = format!("127.0.0.1:{port}/persys-stuck/app-{i}:v1");
        api.apply_workload(workload(id, &image)).await.unwrap();
    }
    for id in &stuck {
        wait_for(&mut api, id, "pulling", pulling).await;
    }
    // The engine is inside the one pull slot's pull, held by the registry.
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the engine never asked the registry for a manifest:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let quick: Vec<String> = (0..3).map(|i| format!("quick-{i}-{suffix}")).collect();
    for id in &quick {
        api.apply_workload(workload(id, &test_image()))
            .await
            .unwrap();
    }
    for id in &quick {
        wait_for(&mut api, id, "running", |s| {
            s.actual_state() == ActualState::Running
        })
        .await;
    }
    // The pulls are still stuck: the quick containers did not wait for them.
    for id in &stuck {
        let status = status(&mut api, id).await;
        assert!(pulling(&status), "{id}: {status:?}");
    }
    let log = agent.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
