//! ApplyWorkload over mutual TLS against the real agent binary, with 64
//! concurrent clients, beside a HealthCheck (same TLS and gRPC path, no store
//! write) in the same run.
//!
//! Run: `cargo bench --bench grpc`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::*;

const CLIENTS: usize = 64;
const WINDOW: Duration = Duration::from_secs(5);

fn request(id: String) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id,
        r#type: WorkloadType::Container as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: "persys-test/busybox:latest".into(),
                command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into()],
                ports: vec![PortMapping {
                    host_port: 0,
                    container_port: 8080,
                    protocol: "tcp".into(),
                }],
                ..Default::default()
            })),
        }),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

async fn run(agent: &AgentProcess, certs: &Arc<Certs>, apply: bool) -> (f64, Vec<Duration>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = client(agent.port, certs).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while started.elapsed() < WINDOW {
                let t = Instant::now();
                if apply {
                    let response = client
                        .apply_workload(request(format!("c{c}-{i}")))
                        .await
                        .unwrap();
                    assert!(response.get_ref().applied);
                } else {
                    client.health_check(HealthCheckRequest {}).await.unwrap();
                }
                latencies.push(t.elapsed());
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rate, all)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch/grpc");
        let _ = std::fs::remove_dir_all(&dir);
        let certs = Arc::new(Certs::generate(&dir.join("certs")));
        let agent = AgentProcess::start(
            &dir.join("state"),
            &certs,
            &[
                ("PERSYS_DOCKER_ENABLED", "true"),
                ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
                ("PERSYS_LOG_LEVEL", "warn"),
            ],
        )
        .await;
        println!("## ApplyWorkload over mutual TLS: {CLIENTS} concurrent clients, {} s", WINDOW.as_secs());
        println!("| RPC | calls/s | p50 | p99 |");
        println!("|---|---:|---:|---:|");
        let (rate, latencies) = run(&agent, &certs, true).await;
        println!(
            "| ApplyWorkload (validated, fsynced, group-committed) | {rate:.0} | {:.2} ms | {:.2} ms |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
        let (rate, latencies) = run(&agent, &certs, false).await;
        println!(
            "| HealthCheck (same TLS + gRPC path, no write) | {rate:.0} | {:.2} ms | {:.2} ms |",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
        println!("\n(agent and clients share this machine's cores)");
    });
}
