//! What the agent costs over driving Docker by hand, on the real engine.
//!
//! `cargo bench -p persys-controllers --bench docker` prints, side by side:
//! - one container, apply → Running through the store and the controller,
//!   against create + start through the Docker API directly;
//! - 100 containers applied at once → all Running, against a sequential
//!   create + start loop;
//! - drift repair: a running container killed → Running again, over 20 kills.
//!
//! Needs the engine and the offline test image (hack/runtimes-up.sh).

#[path = "../tests/docker_support/mod.rs"]
mod docker_support;

use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, RemoveContainerOptions, StartContainerOptions,
};
use docker_support::*;
use persys_api::v1::{ActualState, DesiredState, Workload};
use tokio::time::Instant;

const SINGLE_RUNS: usize = 10;
const MANY: usize = 100;
const KILLS: usize = 20;
const DEADLINE: Duration = Duration::from_secs(300);

fn running(w: &Workload) -> bool {
    w.status.as_ref().is_some_and(|s| {
        s.actual_state() == ActualState::Running && s.observed_generation == w.generation()
    })
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// create + start straight through the API, the way a hand-written script
/// would, labelled into the bench's scope so the sweep removes it.
async fn create_and_start(docker: &Docker, scope: &str, name: &str) {
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some(test_image()),
                cmd: Some(vec!["sleep".into(), "3600".into()]),
                labels: Some(
                    [(
                        persys_controllers::docker::labels::SCOPE.to_string(),
                        scope.to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .expect("create");
    docker
        .start_container(&created.id, None::<StartContainerOptions>)
        .await
        .expect("start");
}

async fn remove(docker: &Docker, name: &str) {
    let _ = docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(bed) = TestBed::new("bench").await else {
        eprintln!("no Docker engine: nothing to measure");
        return;
    };
    let docker = bed.docker.clone();
    let spec = shell_spec("exec sleep 3600");
    println!("docker controller benchmark (engine at {})", engine_host());
    println!();

    // 1. One container.
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    // Interleaved, so both see the engine in the same state.
    let mut through_agent = Vec::new();
    let mut direct = Vec::new();
    for i in 0..SINGLE_RUNS {
        let id = format!("{}-one-{i}", bed.scope);
        let started = Instant::now();
        agent
            .apply(&id, "r1", DesiredState::Running, spec.clone())
            .await;
        agent.wait_for(&id, DEADLINE, "running", running).await;
        through_agent.push(started.elapsed());

        let name = format!("{}-direct-{i}", bed.scope);
        let started = Instant::now();
        create_and_start(&docker, &bed.scope, &name).await;
        direct.push(started.elapsed());
    }
    let (a, d) = (percentile(&through_agent, 50.0), percentile(&direct, 50.0));
    println!("one container, apply → Running (p50 of {SINGLE_RUNS})");
    println!("  through store + controller : {:>10}", ms(a));
    println!("  create + start via the API : {:>10}", ms(d));
    println!(
        "  ratio                      : {:>10.2}x",
        a.as_secs_f64() / d.as_secs_f64()
    );
    println!();

    // 2. A hundred at once.
    let ids: Vec<String> = (0..MANY)
        .map(|i| format!("{}-many-{i}", bed.scope))
        .collect();
    let started = Instant::now();
    futures::future::join_all(
        ids.iter()
            .map(|id| agent.apply(id, "r1", DesiredState::Running, spec.clone())),
    )
    .await;
    let applied = started.elapsed();
    for id in &ids {
        agent.wait_for(id, DEADLINE, "running", running).await;
    }
    let all_running = started.elapsed();
    let started = Instant::now();
    for i in 0..MANY {
        create_and_start(&docker, &bed.scope, &format!("{}-seq-{i}", bed.scope)).await;
    }
    let sequential = started.elapsed();
    println!("{MANY} containers");
    println!(
        "  applied at once → all Running : {:>10}  (applies acknowledged in {})",
        ms(all_running),
        ms(applied)
    );
    println!("  sequential create + start     : {:>10}", ms(sequential));
    println!(
        "  ratio                         : {:>10.2}x",
        all_running.as_secs_f64() / sequential.as_secs_f64()
    );
    for i in 0..MANY {
        remove(&docker, &format!("{}-seq-{i}", bed.scope)).await;
    }
    println!();

    // 3. Drift repair: kill a running container, time until it runs again.
    let mut repairs = Vec::new();
    for id in ids.iter().take(KILLS) {
        docker
            .kill_container(id, None::<KillContainerOptions>)
            .await
            .expect("kill");
        let killed = Instant::now();
        agent
            .wait_for(id, DEADLINE, "restarted", |w| {
                running(w) && w.status.as_ref().is_some_and(|s| s.restart_count == 1)
            })
            .await;
        repairs.push(killed.elapsed());
    }
    println!("drift repair, kill → Running again ({KILLS} kills)");
    println!("  p50 : {:>10}", ms(percentile(&repairs, 50.0)));
    println!("  p99 : {:>10}", ms(percentile(&repairs, 99.0)));
    println!(
        "  max : {:>10}",
        ms(repairs.iter().copied().max().unwrap_or_default())
    );
    agent.stop().await;
    // `bed` sweeps every container of the scope when dropped.
}
