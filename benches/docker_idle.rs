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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

type Calls = Arc<Mutex<BTreeMap<String, u64>>>;

/// `GET /v1.41/containers/abc/json` → `GET /containers/{id}/json`.
fn route(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts
        .first()
        .is_some_and(|p| p.starts_with('v') && p.contains('.'))
    {
        parts.remove(0);
    }
    let shaped: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 1 && parts[0] == "containers" && !matches!(*p, "json" | "create") {
                "{id}".to_string()
            } else {
                p.to_string()
            }
        })
        .collect();
    format!("{method} /{}", shaped.join("/"))
}

/// Forwards one connection to the engine, counting the requests on it.
async fn forward(client: UnixStream, calls: Calls) {
    let Ok(engine) = UnixStream::connect("/var/run/docker.sock").await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut engine_read, mut engine_write) = engine.into_split();
    let upstream = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for line in String::from_utf8_lossy(&buffer[..n]).split("\r\n") {
                let mut words = line.split(' ');
                if let (Some(method), Some(path), Some(version)) =
                    (words.next(), words.next(), words.next())
                    && version.starts_with("HTTP/1")
                    && matches!(method, "GET" | "POST" | "DELETE" | "HEAD" | "PUT")
                {
                    *calls
                        .lock()
                        .unwrap()
                        .entry(route(method, path))
                        .or_default() += 1;
                }
            }
            if engine_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut engine_read, &mut client_write).await;
    };
    tokio::join!(upstream, downstream);
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

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
