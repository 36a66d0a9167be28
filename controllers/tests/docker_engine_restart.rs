//! The Docker controller across a real restart of dockerd.
//!
//! Stopping the engine would break every other test using it, so this test
//! is ignored by default and lives in a binary of its own; run it alone:
//!
//! ```text
//! cargo test -p persys-controllers --test docker_engine_restart -- --ignored
//! ```
//!
//! (`tests/docker.rs` covers the same reconnect logic on every run, through
//! a proxy socket that it takes away and brings back.)

mod docker_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use docker_support::*;
use persys_api::v1::{ActualState, Workload};

const DOCKERD_LOG: &str = "/var/log/persys-dockerd.log";

fn running_again(w: &Workload) -> bool {
    w.status.as_ref().is_some_and(|s| {
        s.actual_state() == ActualState::Running
            && s.observed_generation == w.generation()
            && s.restart_count >= 1
    })
}

/// Stops dockerd (SIGTERM, as systemd would) and starts it again with the
/// command line it had, detached like hack/runtimes-up.sh starts it.
async fn restart_dockerd(docker: &Docker) {
    let pid = std::fs::read_to_string("/var/run/docker.pid")
        .expect("dockerd's pid file (/var/run/docker.pid)")
        .trim()
        .to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("dockerd's command line");
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    assert!(
        argv.first().is_some_and(|a| a.ends_with("dockerd")),
        "pid {pid} is not dockerd: {argv:?}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    eventually(
        Duration::from_secs(60),
        "the old dockerd has exited",
        || async { !Path::new(&format!("/proc/{pid}")).exists() },
    )
    .await;

    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)
        .expect("dockerd log");
    let started = Command::new("setsid")
        .arg("-f")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .status()
        .expect("start dockerd");
    assert!(started.success());
    eventually(Duration::from_secs(60), "dockerd answers again", || {
        let docker = docker.clone();
        async move { docker.ping().await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops and restarts the shared dockerd: run alone with --ignored"]
async fn workloads_run_again_after_dockerd_restarts() {
    let Some(bed) = TestBed::new("dockerd-restart").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let ids = [unique("restart-a"), unique("restart-b")];
    for id in &ids {
        agent.apply_sleeper(id).await;
    }
    for id in &ids {
        agent
            .wait_for(id, Duration::from_secs(20), "running", |w| {
                w.status
                    .as_ref()
                    .is_some_and(|s| s.actual_state() == ActualState::Running)
            })
            .await;
    }

    restart_dockerd(&bed.docker).await;
    let back = tokio::time::Instant::now();
    for id in &ids {
        agent
            .wait_for(id, Duration::from_secs(30), "running again", running_again)
            .await;
        let found = bed
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .expect("inspect");
        assert_eq!(found.state.and_then(|s| s.running), Some(true));
    }
    eprintln!(
        "workloads running again {:?} after dockerd came back",
        back.elapsed()
    );
    agent.stop().await;
}
