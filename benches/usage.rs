//! The cost of a usage sample per container: N running containers (200
//! unless `--count N`), one round through their cgroup files against one
//! round through the engine's stats endpoint, at the same concurrency (4
//! unless `--concurrency N`, the agent's stats concurrency), side by side in
//! one run. Also this process's CPU time and the engine's for each way.
//!
//! Run: `cargo bench --bench usage -- --count 200`. Needs the engine on
//! this host and the offline test image (hack/runtimes-up.sh). It removes
//! the containers it started, also when it fails.

#[path = "support/sampling.rs"]
mod sampling;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptions, RemoveContainerOptions,
};
use futures::StreamExt;
use persys_controllers::docker::Engine;

const IMAGE: &str = "persys-test/busybox:latest";

fn flag(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Removes every container of the run when dropped.
struct Cleanup {
    label: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = self.label.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let docker = Docker::connect_with_local_defaults()
                    .ok()?
                    .negotiate_version()
                    .await
                    .ok()?;
                let listed = docker
                    .list_containers(Some(ListContainersOptions {
                        all: true,
                        filters: Some(HashMap::from([("label".to_string(), vec![label])])),
                        ..Default::default()
                    }))
                    .await
                    .ok()?;
                futures::stream::iter(listed.into_iter().filter_map(|c| c.id))
                    .for_each_concurrent(8, |id| {
                        let docker = docker.clone();
                        async move {
                            let _ = docker
                                .remove_container(
                                    &id,
                                    Some(RemoveContainerOptions {
                                        force: true,
                                        ..Default::default()
                                    }),
                                )
                                .await;
                        }
                    })
                    .await;
                Some(())
            })
        })
        .join();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let count = flag("--count", 200);
    let concurrency = flag("--concurrency", 4);
    let engine = Engine::new(None);
    let docker = engine.client().await.expect("the Docker engine");
    let run = format!("{:08x}", fastrand::u32(..));
    let label = format!("persys.bench=usage-{run}");
    let _cleanup = Cleanup {
        label: label.clone(),
    };

    let started = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..count)
        .map(|n| {
            let docker = docker.clone();
            let run = run.clone();
            async move {
                let name = format!("usage-bench-{run}-{n:04}");
                let body = ContainerCreateBody {
                    image: Some(IMAGE.to_string()),
                    cmd: Some(vec!["sleep".into(), "3600".into()]),
                    labels: Some(HashMap::from([(
                        "persys.bench".to_string(),
                        format!("usage-{run}"),
                    )])),
                    host_config: Some(HostConfig {
                        init: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let options = CreateContainerOptionsBuilder::default().name(&name).build();
                let id = docker
                    .create_container(Some(options), body)
                    .await
                    .expect("create a container")
                    .id;
                docker
                    .start_container(&id, None)
                    .await
                    .expect("start a container");
                id
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    println!(
        "started {count} containers in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let cost = sampling::per_container_costs(&engine, &ids, concurrency).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "usage sample per container, {} containers, {} at a time:",
        cost.containers, cost.concurrency
    );
    println!("                 wall (µs)   agent CPU (µs)   engine CPU (µs)");
    println!(
        "  cgroup files   {:>10.1} {:>16.1} {:>17.1}  (mean of {} rounds; {} sampled)",
        us(cost.cgroup),
        us(cost.cgroup_cpu),
        us(cost.cgroup_engine_cpu),
        cost.rounds,
        cost.cgroup_sampled
    );
    println!(
        "  docker stats   {:>10.1} {:>16.1} {:>17.1}  (one round; {} sampled)",
        us(cost.stats),
        us(cost.stats_cpu),
        us(cost.stats_engine_cpu),
        cost.stats_sampled
    );
    println!("  ratio          {:>10.0}× (stats / cgroup)", cost.ratio());
    println!(
        "  one round of {} containers: cgroup {:.1} ms, stats {:.1} s",
        cost.containers,
        cost.cgroup.as_secs_f64() * 1e3 * cost.containers as f64,
        cost.stats.as_secs_f64() * cost.containers as f64
    );
    assert_eq!(
        cost.cgroup_sampled, count,
        "every container through its cgroup"
    );
    assert_eq!(cost.stats_sampled, count, "every container through stats");
}
