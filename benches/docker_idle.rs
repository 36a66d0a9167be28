//! Idle cost of the agent with 200 converged containers: agent CPU and RSS
//! over 60 s, and the Docker API calls it makes, counted by a proxy between
//! the agent and the engine. Beside it, in the same run, what one
//! inspect-per-container poll of the same 200 containers costs (what an
//! agent without a list-based resync would do each cycle).
//!
//! Run: `cargo bench --bench docker_idle` (needs dockerd and the test image;
//! about 3 minutes). `PERSYS_IDLE_CONTAINERS` and `PERSYS_IDLE_SECONDS`
//! change the size.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/engine.rs"]
mod engine;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use engine::{Calls, cpu_seconds, forward, rss_mib};
use persys_api::v1::*;
use tokio::net::UnixListener;

fn main() {
    let count: usize = std::env::var("PERSYS_IDLE_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seconds: u64 = std::env::var("PERSYS_IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let resync = Duration::from_secs(30);
    let image =
        std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch/docker-idle");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let calls: Calls = Arc::default();
        tokio::spawn({
            let calls = calls.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(forward(stream, calls.clone()));
                }
            }
        });
        let certs = Certs::generate(&dir.join("certs"));
        let docker_host = format!("unix://{}", socket.display());
        let agent = AgentProcess::start(
            &dir.join("state"),
            &certs,
            &[
                ("PERSYS_DOCKER_ENABLED", "true"),
                ("DOCKER_HOST", docker_host.as_str()),
                ("PERSYS_RECONCILE_INTERVAL", "30s"),
                ("PERSYS_LOG_LEVEL", "warn"),
            ],
        )
        .await;
        let mut api = client(agent.port, &certs).await.unwrap();
        let ids: Vec<String> = (0..count).map(|i| format!("idle-{i}")).collect();
        for id in &ids {
            api.apply_workload(ApplyWorkloadRequest {
                id: id.clone(),
                r#type: WorkloadType::Container as i32,
                revision_id: String::new(),
                desired_state: DesiredState::Running as i32,
                spec: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(ContainerSpec {
                        image: image.clone(),
                        command: vec!["sleep".into()],
                        args: vec!["86400".into()],
                        stop_grace_period_seconds: 1,
                        ..Default::default()
                    })),
                }),
            })
            .await
            .unwrap();
        }
        let converge_started = Instant::now();
        loop {
            let running = api
                .list_workloads(ListWorkloadsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .workloads
                .iter()
                .filter(|w| w.actual_state() == ActualState::Running)
                .count();
            if running == count {
                break;
            }
            assert!(converge_started.elapsed() < Duration::from_secs(600), "only {running} of {count} running");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let converged_in = converge_started.elapsed();
        // Let the last status writes and the first usage samples settle.
        tokio::time::sleep(Duration::from_secs(5)).await;

        let pid = agent.child.id();
        calls.lock().unwrap().clear();
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let mut peak_rss: f64 = 0.0;
        while started.elapsed() < Duration::from_secs(seconds) {
            peak_rss = peak_rss.max(rss_mib(pid));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let window = started.elapsed().as_secs_f64();
        let cpu = (cpu_seconds(pid) - cpu_before) / window * 100.0;
        let idle_calls = calls.lock().unwrap().clone();

        // The raw alternative, same engine, same containers: one inspect per
        // container, as a poll-everything cycle would do.
        let docker = bollard::Docker::connect_with_unix_defaults().unwrap().negotiate_version().await.unwrap();
        let poll_started = Instant::now();
        for id in &ids {
            let _ = docker.inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>).await;
        }
        let poll = poll_started.elapsed();

        let resyncs = (window / resync.as_secs_f64()).floor().max(1.0);
        println!("## Idle cost: {count} converged containers, {seconds} s, resync every {} s", resync.as_secs());
        println!("(converged from apply in {:.1} s)\n", converged_in.as_secs_f64());
        println!("| measure | value |");
        println!("|---|---:|");
        println!("| agent CPU | {cpu:.2} % of one core |");
        println!("| agent RSS (peak) | {peak_rss:.1} MiB |");
        println!("\n| Docker API call (during the idle window) | count | per resync |");
        println!("|---|---:|---:|");
        for (call, n) in &idle_calls {
            println!("| `{call}` | {n} | {:.1} |", *n as f64 / resyncs);
        }
        println!(
            "\nRaw alternative: one inspect per container for all {count} took {:.0} ms of engine time per cycle ({count} calls).",
            poll.as_secs_f64() * 1e3
        );
        drop(api);
        drop(agent);
        // Clean up the containers (the agent is gone; remove them directly).
        for id in &ids {
            let _ = docker
                .remove_container(id, Some(bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() }))
                .await;
        }
    });
}
