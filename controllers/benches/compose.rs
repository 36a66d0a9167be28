//! What the agent costs over running compose by hand, on the real engine
//! and the real compose CLI.
//!
//! `cargo bench -p persys-controllers --bench compose` prints, side by side:
//! - a three-service project, apply → every service Running through the
//!   store and the controller, against `compose up -d` run directly on the
//!   same file (interleaved, so both see the engine in the same state);
//! - drift repair: a service container removed (`docker rm -f`) → Running
//!   again, through engine events.
//!
//! Needs the engine, a compose CLI and the offline test image
//! (hack/runtimes-up.sh).

#[path = "../tests/compose_support/mod.rs"]
mod compose_support;

use std::time::Duration;

use bollard::query_parameters::RemoveContainerOptions;
use compose_support::*;
use persys_api::v1::{ActualState, DesiredState, Workload};
use persys_controllers::compose::binary::{self, ComposeBinary};
use tokio::time::Instant;

const RUNS: usize = 7;
/// At most RUNS: each repair uses one of the projects brought up above.
const REPAIRS: usize = 7;
const DEADLINE: Duration = Duration::from_secs(120);

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

/// `compose -p <project> -f <file> <args>` as a person would run it.
async fn compose(binary: &ComposeBinary, project: &str, file: &std::path::Path, args: &[&str]) {
    let status = tokio::process::Command::new(&binary.program)
        .args(&binary.leading_args)
        .args(["-p", project, "-f"])
        .arg(file)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("run compose");
    assert!(status.success(), "compose {args:?} failed");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(bed) = TestBed::new("bench").await else {
        eprintln!("no Docker engine / compose CLI: nothing to measure");
        return;
    };
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k == "PATH" || k == "HOME")
        .collect();
    let binary = binary::detect(std::env::var("PERSYS_COMPOSE_BINARY").ok().as_deref(), &env)
        .await
        .expect("a compose CLI");
    let compose_text = compose_file(&[("web", ""), ("db", ""), ("cache", "")]);
    let by_hand = bed.dir.path().join("by-hand");
    std::fs::create_dir_all(&by_hand).expect("a folder");
    let file = by_hand.join("docker-compose.yml");
    std::fs::write(&file, &compose_text).expect("write the compose file");
    println!(
        "compose controller benchmark ({binary}, engine at {})",
        engine_host()
    );
    println!();

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let mut through_agent = Vec::new();
    let mut direct = Vec::new();
    // Run 0 warms both paths up (compose detection, page cache) and is not
    // counted.
    for i in 0..=RUNS {
        let id = format!("bench-{i}");
        let project = bed.project("bench-agent");
        let started = Instant::now();
        agent
            .apply(
                &id,
                "r1",
                DesiredState::Running,
                compose_spec(&project, &compose_text, &[]),
            )
            .await;
        agent.wait_for(&id, DEADLINE, "running", running).await;
        let took = started.elapsed();
        if i > 0 {
            through_agent.push(took);
        }

        let project = bed.project("bench-direct");
        let started = Instant::now();
        compose(&binary, &project, &file, &["up", "-d"]).await;
        let took = started.elapsed();
        if i > 0 {
            direct.push(took);
        }
        compose(&binary, &project, &file, &["down"]).await;
        // The agent's projects stay up for the drift-repair part below.
    }
    let (a, d) = (percentile(&through_agent, 50.0), percentile(&direct, 50.0));
    println!("three services, apply → all Running (p50 of {RUNS}, interleaved)");
    println!("  through store + controller : {:>10}", ms(a));
    println!("  compose up -d by hand      : {:>10}", ms(d));
    println!(
        "  ratio                      : {:>10.2}x",
        a.as_secs_f64() / d.as_secs_f64()
    );
    println!(
        "  (min/max: agent {} / {}, by hand {} / {})",
        ms(percentile(&through_agent, 0.0)),
        ms(percentile(&through_agent, 100.0)),
        ms(percentile(&direct, 0.0)),
        ms(percentile(&direct, 100.0))
    );
    println!();

    // Drift repair: remove one service's container out of band.
    let mut repairs = Vec::new();
    for i in 1..=REPAIRS {
        let id = format!("bench-{i}");
        let w = agent.store.get(&id).expect("read").expect("the workload");
        let project = w
            .status
            .as_ref()
            .map(|s| s.runtime_ref.clone())
            .unwrap_or_default();
        let web = ids_by_service(&bed.docker, &project).await["web"].clone();
        let restarts = w.status.as_ref().map(|s| s.restart_count).unwrap_or(0);
        bed.docker
            .remove_container(
                &web,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
            .expect("remove");
        let removed = Instant::now();
        agent
            .wait_for(&id, DEADLINE, "repaired", |w| {
                running(w)
                    && w.status
                        .as_ref()
                        .is_some_and(|s| s.restart_count > restarts)
            })
            .await;
        repairs.push(removed.elapsed());
    }
    println!("drift repair, docker rm -f → Running again ({REPAIRS} repairs)");
    println!("  p50 : {:>10}", ms(percentile(&repairs, 50.0)));
    println!(
        "  max : {:>10}",
        ms(repairs.iter().copied().max().unwrap_or_default())
    );

    for i in 0..=RUNS {
        let _ = agent.store.delete(&format!("bench-{i}")).await;
    }
    for i in 0..=RUNS {
        agent.wait_gone(&format!("bench-{i}"), DEADLINE).await;
    }
    agent.stop().await;
    // `bed` sweeps whatever is left when dropped.
}
