//! The Docker controller against the real engine, the real fjall store and
//! the real controller runtime. The resync is ten minutes, so whatever is
//! repaired here is repaired by engine events, requeues and back-offs.
//!
//! Needs a Docker engine and the offline test image (hack/runtimes-up.sh).
//! Outside CI a test without them is skipped with a loud message; in CI
//! (`CI=true`) it fails.

mod docker_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, ListVolumesOptions,
    StartContainerOptions,
};
use docker_support::*;
use persys_api::CONDITION_READY;
use persys_api::v1::{
    ActualState, ContainerSpec, DesiredState, ManagedVolumeSpec, PortMapping, VolumeMount,
};
use persys_controllers::docker::follow::REPLAYED;
use persys_controllers::docker::{DockerConfig, HostPathPolicy, labels, validate_host_path};
use tokio::time::Instant;

const CONVERGE: Duration = Duration::from_secs(20);

/// Applies `id` as a container that sleeps for an hour, and waits until it
/// runs.
async fn run_sleeper(agent: &Agent, id: &str) -> persys_api::v1::Workload {
    agent.apply_sleeper(id).await;
    agent.wait_for(id, CONVERGE, "running", running).await
}

async fn inspect(bed: &TestBed, container: &str) -> bollard::models::ContainerInspectResponse {
    bed.docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .expect("inspect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_converges_to_running_and_reports_its_facts() {
    let Some(bed) = TestBed::new("converge").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("converge");
    let port = free_port();
    let spec = ContainerSpec {
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        ports: vec![PortMapping {
            host_port: port as i32,
            container_port: 80,
            protocol: "tcp".into(),
        }],
        ..shell_spec("exec sleep 3600")
    };
    let applied = agent.apply(&id, "r1", DesiredState::Running, spec).await;

    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = status(&w);
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(s.failure_reason.is_empty(), "{s:?}");

    let found = inspect(&bed, &id).await;
    assert_eq!(
        found.id.as_deref(),
        Some(s.runtime_ref.as_str()),
        "runtime_ref is the container id"
    );
    let config = found.config.expect("config");
    let container_labels = config.labels.expect("labels");
    assert_eq!(container_labels[labels::MANAGED], "true");
    assert_eq!(container_labels[labels::WORKLOAD_ID], id);
    assert_eq!(container_labels[labels::SPEC_HASH], applied.spec_hash());
    assert_eq!(container_labels[labels::REVISION], "r1");
    assert_eq!(container_labels[labels::GENERATION], "1");
    assert!(
        config
            .env
            .unwrap_or_default()
            .contains(&"GREETING=hello".to_string())
    );
    let restart = found
        .host_config
        .and_then(|h| h.restart_policy)
        .and_then(|p| p.name);
    assert_eq!(
        restart.map(|n| n.to_string()).as_deref(),
        Some("no"),
        "restarts are the agent's job"
    );
    assert!(
        s.facts["container.ports"].contains(&format!(":{port}->80/tcp")),
        "{:?}",
        s.facts
    );
    assert!(!s.facts["container.ip"].is_empty());
    assert_eq!(s.facts["container.image"], test_image());
    assert!(agent.event(&id, "Created").is_some());
    assert!(agent.event(&id, "Started").is_some());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_container_is_restarted_by_engine_events_within_seconds() {
    let Some(bed) = TestBed::new("kill").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("kill");
    let before = run_sleeper(&agent, &id).await;
    let started_before = status(&before).facts["container.started_at"].clone();

    bed.docker
        .kill_container(&id, None::<KillContainerOptions>)
        .await
        .expect("kill");
    let killed_at = Instant::now();
    let after = agent
        .wait_for(&id, Duration::from_secs(5), "restarted", |w| {
            let s = status(w);
            running(w)
                && s.restart_count == 1
                && s.facts.get("container.started_at") != Some(&started_before)
        })
        .await;
    let repaired_in = killed_at.elapsed();
    assert_eq!(
        status(&after).runtime_ref,
        status(&before).runtime_ref,
        "the same container restarts"
    );
    let found = inspect(&bed, &id).await;
    assert_eq!(found.state.and_then(|s| s.running), Some(true));
    eprintln!("drift repaired in {repaired_in:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_stopped_then_running_stops_and_starts_the_same_container() {
    let Some(bed) = TestBed::new("stopstart").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("stopstart");
    let spec = shell_spec("exec sleep 3600");

    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    agent
        .wait_for(&id, CONVERGE, "stopped", |w| {
            status(w).actual_state() == ActualState::Stopped
                && status(w).observed_generation == w.generation()
        })
        .await;
    assert!(
        containers_of(&bed.docker, &bed.scope, &id).await.is_empty(),
        "nothing is created to stay stopped"
    );

    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let first = agent.wait_for(&id, CONVERGE, "running", running).await;

    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    let stopped = agent
        .wait_for(&id, CONVERGE, "stopped", |w| {
            status(w).actual_state() == ActualState::Stopped
                && status(w).observed_generation == w.generation()
        })
        .await;
    let found = inspect(&bed, &id).await;
    assert_eq!(found.state.and_then(|s| s.running), Some(false));
    assert_eq!(
        status(&stopped).restart_count,
        0,
        "a requested stop is not a restart"
    );

    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let again = agent
        .wait_for(&id, CONVERGE, "running again", running)
        .await;
    assert_eq!(
        status(&again).runtime_ref,
        status(&first).runtime_ref,
        "the container is started, not recreated"
    );
    assert_eq!(containers_of(&bed.docker, &bed.scope, &id).await.len(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revision_replaces_the_container_with_the_new_env() {
    let Some(bed) = TestBed::new("revision").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("revision");
    let spec = |value: &str| ContainerSpec {
        env: [("VERSION".to_string(), value.to_string())].into(),
        ..shell_spec("exec sleep 3600")
    };
    agent
        .apply(&id, "r1", DesiredState::Running, spec("1"))
        .await;
    let first = agent.wait_for(&id, CONVERGE, "running r1", running).await;

    let second = agent
        .apply(&id, "r2", DesiredState::Running, spec("2"))
        .await;
    assert_eq!(second.generation(), 2);
    let replaced = agent
        .wait_for(&id, CONVERGE, "running r2", |w| {
            running(w) && status(w).runtime_ref != status(&first).runtime_ref
        })
        .await;
    let found = inspect(&bed, &status(&replaced).runtime_ref).await;
    let config = found.config.expect("config");
    assert!(
        config
            .env
            .unwrap_or_default()
            .contains(&"VERSION=2".to_string())
    );
    assert_eq!(config.labels.expect("labels")[labels::REVISION], "r2");
    let all = containers_of(&bed.docker, &bed.scope, &id).await;
    assert_eq!(all.len(), 1, "the old container is gone: {all:?}");
    assert!(agent.event(&id, "Replacing").is_some());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_existing_container() {
    let Some(bed) = TestBed::new("adopt").await else {
        return;
    };
    let id = unique("adopt");
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let before = run_sleeper(&agent, &id).await;
    agent.stop().await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    eventually(CONVERGE, "the new agent adopts the container", || async {
        agent.event(&id, "Adopted").is_some()
    })
    .await;
    let all = containers_of(&bed.docker, &bed.scope, &id).await;
    assert_eq!(all.len(), 1, "exactly one container: {all:?}");
    assert_eq!(
        all[0].id.as_deref(),
        Some(status(&before).runtime_ref.as_str())
    );
    assert_eq!(all[0].state, Some(ContainerSummaryStateEnum::RUNNING));
    let after = agent.store.get(&id).unwrap().unwrap();
    assert!(running(&after));
    assert!(
        agent.event(&id, "Created").is_some_and(|e| e.count == 1),
        "created once, ever"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_container_is_removed_after_the_grace_period_and_nothing_else_is() {
    let Some(bed) = TestBed::new("orphan").await else {
        return;
    };
    let other_scope = unique("test-orphan-other");
    let _other_sweep = Sweep {
        scope: other_scope.clone(),
    };
    let plant = |name: String, container_labels: HashMap<String, String>| {
        let docker = bed.docker.clone();
        async move {
            let created = docker
                .create_container(
                    Some(CreateContainerOptions {
                        name: Some(name),
                        ..Default::default()
                    }),
                    ContainerCreateBody {
                        image: Some(test_image()),
                        cmd: Some(vec!["sleep".into(), "3600".into()]),
                        labels: Some(container_labels),
                        stop_timeout: Some(1),
                        ..Default::default()
                    },
                )
                .await
                .expect("create");
            docker
                .start_container(&created.id, None::<StartContainerOptions>)
                .await
                .expect("start");
            created.id
        }
    };
    let managed = |scope: &str, workload: &str| {
        HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::WORKLOAD_ID.to_string(), workload.to_string()),
            (labels::SPEC_HASH.to_string(), "0".to_string()),
            (labels::SCOPE.to_string(), scope.to_string()),
        ])
    };
    let orphan_id = unique("orphan");
    let orphan = plant(orphan_id.clone(), managed(&bed.scope, &orphan_id)).await;
    let foreign_id = unique("orphan-foreign");
    let foreign = plant(foreign_id.clone(), managed(&other_scope, &foreign_id)).await;
    let unmanaged_name = unique("orphan-unmanaged");
    let mut unmanaged_labels = managed(&bed.scope, &unmanaged_name);
    unmanaged_labels.remove(labels::MANAGED);
    let unmanaged = plant(unmanaged_name, unmanaged_labels).await;

    let started = Instant::now();
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let docker = bed.docker.clone();
    eventually(CONVERGE, "the orphan is removed", || {
        let docker = docker.clone();
        let orphan = orphan.clone();
        async move {
            docker
                .inspect_container(&orphan, None::<InspectContainerOptions>)
                .await
                .is_err()
        }
    })
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= bed.config().orphan_grace,
        "removed after {waited:?}, before the {:?} grace",
        bed.config().orphan_grace
    );
    for (what, container) in [("another scope's", &foreign), ("an unmanaged", &unmanaged)] {
        let found = bed
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .unwrap_or_else(|e| panic!("{what} container was removed: {e}"));
        assert_eq!(
            found.state.and_then(|s| s.running),
            Some(true),
            "{what} container was stopped"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_workload_removes_its_container_and_volumes_then_the_workload() {
    let Some(bed) = TestBed::new("delete").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("delete");
    let spec = ContainerSpec {
        managed_volumes: vec![ManagedVolumeSpec {
            name: "data".into(),
            mount_path: "/data".into(),
            ..Default::default()
        }],
        ..shell_spec("echo persisted > /data/file; exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let volume = labels::volume_name(&id, "data");
    bed.docker
        .inspect_volume(&volume)
        .await
        .expect("the managed volume exists");

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(containers_of(&bed.docker, &bed.scope, &id).await.is_empty());
    let volumes = bed
        .docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(labels::filter(&bed.scope, Some(&id))),
        }))
        .await
        .expect("list volumes");
    assert!(
        volumes.volumes.unwrap_or_default().is_empty(),
        "the managed volume is removed"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_container_restarts_with_growing_gaps() {
    let Some(bed) = TestBed::new("crashloop").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("crashloop");
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            shell_spec("echo crashing now; exit 3"),
        )
        .await;

    // Record when each restart shows up, following every status write.
    let mut restarts: Vec<(i32, Instant)> = Vec::new();
    let mut saw_backoff = None;
    let deadline = Duration::from_secs(30);
    agent
        .wait_for(&id, deadline, "restarted four times", |w| {
            let s = status(w);
            if restarts.last().map(|(n, _)| *n) != Some(s.restart_count) && s.restart_count > 0 {
                restarts.push((s.restart_count, Instant::now()));
            }
            if s.failure_reason == "CRASH_LOOP_BACKOFF" && saw_backoff.is_none() {
                saw_backoff = Some(s.clone());
            }
            s.restart_count >= 4
        })
        .await;
    let times: Vec<Instant> = restarts.iter().map(|(_, t)| *t).collect();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "restarts {:?}, gaps {gaps:?}",
        restarts.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(gaps.len() >= 3, "{restarts:?}");
    // Back-off 1 s, 2 s, 4 s between restarts (base 1 s in tests). Each gap
    // also holds a container start, which a loaded machine stretches, so
    // the gaps are checked against the nominal back-off, not each other's
    // ratio.
    assert!(gaps[0] >= Duration::from_millis(900), "{gaps:?}");
    assert!(
        gaps[1] >= Duration::from_millis(1800),
        "gaps must grow: {gaps:?}"
    );
    assert!(
        gaps[2] >= Duration::from_millis(3600),
        "gaps must grow: {gaps:?}"
    );
    assert!(
        gaps[0] < gaps[1] && gaps[1] < gaps[2],
        "gaps must grow: {gaps:?}"
    );

    let backoff = saw_backoff.expect("a CrashLoopBackOff status was reported");
    assert_eq!(backoff.actual_state(), ActualState::Failed);
    assert!(!backoff.retry_terminal);
    assert!(backoff.next_retry_at_ms > 0);
    assert!(backoff.message.contains("back-off"), "{}", backoff.message);
    assert!(
        backoff.last_error.contains("crashing now"),
        "the log tail is in last_error: {}",
        backoff.last_error
    );
    assert_eq!(
        backoff
            .condition(CONDITION_READY)
            .map(|c| c.reason.as_str()),
        Some("CrashLoopBackOff")
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpullable_image_reports_image_pull_failed_and_backs_off() {
    let Some(bed) = TestBed::new("pull").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("pull");
    let spec = ContainerSpec {
        image: "registry.invalid/persys/nope:1".into(),
        ..shell_spec("true")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;

    // Each failed pull schedules the next: record when a new retry time
    // appears.
    let mut attempts: Vec<(i64, Instant)> = Vec::new();
    let w = agent
        .wait_for(
            &id,
            Duration::from_secs(30),
            "failing to pull three times",
            |w| {
                let s = status(w);
                if s.failure_reason == "IMAGE_PULL_FAILED"
                    && s.next_retry_at_ms > 0
                    && attempts.last().map(|(at, _)| *at) != Some(s.next_retry_at_ms)
                {
                    attempts.push((s.next_retry_at_ms, Instant::now()));
                }
                attempts.len() >= 3
            },
        )
        .await;
    let s = status(&w);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(!s.retry_terminal, "a pull may succeed later");
    assert!(
        s.last_error.contains("registry.invalid"),
        "{}",
        s.last_error
    );
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].1 - w[0].1).collect();
    eprintln!("pull retries scheduled {gaps:?} apart");
    assert!(gaps[0] >= Duration::from_millis(800), "{gaps:?}");
    assert!(
        gaps[1] > gaps[0].mul_f64(1.5),
        "pull back-off must grow: {gaps:?}"
    );
    let pulls = agent
        .event(&id, "Pulling")
        .expect("pull attempts are recorded");
    assert!(
        (3..=4).contains(&pulls.count),
        "{} pulls in {:?}: not backing off",
        pulls.count,
        attempts[0].1.elapsed() + gaps[0]
    );
    assert!(containers_of(&bed.docker, &bed.scope, &id).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_workload_on_a_taken_host_port_gets_port_bind_conflict() {
    let Some(bed) = TestBed::new("port").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let port = free_port();
    let spec = ContainerSpec {
        ports: vec![PortMapping {
            host_port: port as i32,
            container_port: 80,
            protocol: "tcp".into(),
        }],
        ..shell_spec("exec sleep 3600")
    };
    let first = unique("port-a");
    let second = unique("port-b");
    agent
        .apply(&first, "r1", DesiredState::Running, spec.clone())
        .await;
    agent.wait_for(&first, CONVERGE, "running", running).await;

    agent
        .apply(&second, "r1", DesiredState::Running, spec)
        .await;
    let conflicted = agent
        .wait_for(&second, CONVERGE, "in a port conflict", |w| {
            status(w).failure_reason == "PORT_BIND_CONFLICT"
        })
        .await;
    let s = status(&conflicted);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(s.next_retry_at_ms > 0, "retried with back-off");
    assert!(s.last_error.contains(&port.to_string()), "{}", s.last_error);
    assert!(
        running(&agent.store.get(&first).unwrap().unwrap()),
        "the first keeps running"
    );

    // Once the port is free the retry succeeds.
    agent.store.delete(&first).await.expect("delete");
    agent
        .wait_for(&second, CONVERGE, "running once the port is free", running)
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_host_path_is_refused_before_anything_runs() {
    let policy = HostPathPolicy::new(Some(std::path::Path::new("/var/lib/persys")), Vec::new());
    for path in [
        "/etc",
        "/var/run/docker.sock",
        "/var/lib/persys/db",
        "/tmp/../proc",
    ] {
        let error = validate_host_path("spec.container.volumes[0].host_path", path, &policy)
            .expect_err(path);
        assert_eq!(error.field, "spec.container.volumes[0].host_path");
    }

    let Some(bed) = TestBed::new("hostpath").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("hostpath");
    let spec = ContainerSpec {
        volumes: vec![VolumeMount {
            host_path: "/etc".into(),
            container_path: "/host-etc".into(),
            read_only: true,
        }],
        ..shell_spec("exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let refused = agent
        .wait_for(&id, CONVERGE, "refused", |w| {
            status(w).failure_reason == "INVALID_SPEC"
        })
        .await;
    let s = status(&refused);
    assert!(s.retry_terminal);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(
        s.message.contains("spec.container.volumes[0].host_path"),
        "{}",
        s.message
    );
    assert!(containers_of(&bed.docker, &bed.scope, &id).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_source_swapped_for_a_link_is_refused_at_the_next_start_and_runs_once_restored() {
    let Some(bed) = TestBed::new("swap").await else {
        return;
    };
    // The allowed root, and a directory outside it the link will point at.
    let base = std::fs::canonicalize(bed.dir.path()).expect("canonical temp dir");
    let root = base.join("volumes");
    let data = root.join("data");
    let kept_aside = root.join("data.kept");
    let outside = base.join("outside");
    std::fs::create_dir_all(&data).expect("mkdir data");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    std::fs::write(outside.join("marker"), "outside").expect("write marker");
    let config = DockerConfig {
        host_paths: HostPathPolicy::new(Some(&bed.state_dir()), vec![root.clone()]),
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("swap");
    let spec = ContainerSpec {
        volumes: vec![VolumeMount {
            host_path: data.display().to_string(),
            container_path: "/data".into(),
            read_only: true,
        }],
        ..shell_spec("exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let before = inspect(&bed, &id).await;
    let started_before = before.state.as_ref().and_then(|s| s.started_at.clone());
    assert_eq!(bind_sources(&before), [data.display().to_string()]);

    // After apply the directory becomes a link out of the root, and the
    // container exits: the agent's restart must not mount the link.
    std::fs::rename(&data, &kept_aside).expect("move data aside");
    std::os::unix::fs::symlink(&outside, &data).expect("link data outside");
    bed.docker
        .kill_container(&id, None::<KillContainerOptions>)
        .await
        .expect("kill");
    let refused = agent
        .wait_for(&id, CONVERGE, "refused by the policy", |w| {
            status(w).failure_reason == "POLICY_VIOLATION"
        })
        .await;
    let s = status(&refused);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(!s.retry_terminal, "restoring the directory must be enough");
    assert!(
        s.next_retry_at_ms > 0,
        "retried with the failed-start back-off"
    );
    assert!(
        s.last_error.contains("symbolic link") && s.last_error.contains("data"),
        "{}",
        s.last_error
    );
    let violation = agent
        .event(&id, "PolicyViolation")
        .expect("a PolicyViolation event");
    assert!(violation.message.contains("symbolic link"), "{violation:?}");
    let after = inspect(&bed, &id).await;
    let state = after.state.clone().expect("state");
    assert_eq!(state.running, Some(false), "not started");
    assert_eq!(
        state.started_at, started_before,
        "never started again, so the outside directory was never mounted"
    );
    assert!(
        !bind_sources(&after)
            .iter()
            .any(|source| source.starts_with(&outside.display().to_string())),
        "{:?}",
        bind_sources(&after)
    );

    // The directory put back: the next retry starts the same container.
    std::fs::remove_file(&data).expect("remove link");
    std::fs::rename(&kept_aside, &data).expect("restore data");
    let restored = agent
        .wait_for(&id, CONVERGE, "running again", running)
        .await;
    let s = status(&restored);
    assert!(s.failure_reason.is_empty(), "{s:?}");
    assert_eq!(s.runtime_ref, after.id.clone().unwrap_or_default());
    let found = inspect(&bed, &id).await;
    assert_ne!(
        found.state.and_then(|s| s.started_at),
        started_before,
        "started again"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_recorded_on_an_unresolved_link_inside_the_root_is_recreated_on_the_resolved_path()
 {
    let Some(bed) = TestBed::new("relink").await else {
        return;
    };
    // `link` leads to `data`, both inside the allowed root: the spec is
    // valid, but a container that recorded `link` itself (as an older agent
    // created them) would mount through a link at every start.
    let base = std::fs::canonicalize(bed.dir.path()).expect("canonical temp dir");
    let root = base.join("volumes");
    let data = root.join("data");
    let link = root.join("link");
    std::fs::create_dir_all(&data).expect("mkdir data");
    std::os::unix::fs::symlink(&data, &link).expect("link");
    let config = || DockerConfig {
        host_paths: HostPathPolicy::new(Some(&bed.state_dir()), vec![root.clone()]),
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config()).await;
    let id = unique("relink");
    let spec = ContainerSpec {
        volumes: vec![VolumeMount {
            host_path: link.display().to_string(),
            container_path: "/data".into(),
            read_only: true,
        }],
        ..shell_spec("exec sleep 3600")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let made = inspect(&bed, &id).await;
    assert_eq!(
        bind_sources(&made),
        [data.display().to_string()],
        "the engine is given the resolved path"
    );
    agent.stop().await;

    // The same container as an older agent made it: same name and labels,
    // the spec's string as its bind source.
    let config_of = made.config.clone().expect("config");
    bed.docker
        .remove_container(
            &id,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove");
    let old = bed
        .docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(id.clone()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: config_of.image.clone(),
                cmd: config_of.cmd.clone(),
                entrypoint: config_of.entrypoint.clone(),
                labels: config_of.labels.clone(),
                host_config: Some(bollard::models::HostConfig {
                    binds: Some(vec![format!("{}:/data:ro", link.display())]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create the old container")
        .id;
    bed.docker
        .start_container(&old, None::<StartContainerOptions>)
        .await
        .expect("start the old container");

    let agent = Agent::start(&bed.state_dir(), config()).await;
    eventually(
        CONVERGE,
        "the new agent adopts the old container",
        || async { agent.event(&id, "Adopted").is_some() },
    )
    .await;
    // It exits: the restart would mount through the link, so it is
    // recreated on the resolved path instead of refused.
    bed.docker
        .kill_container(&old, None::<KillContainerOptions>)
        .await
        .expect("kill");
    let replaced = agent
        .wait_for(&id, CONVERGE, "running in a new container", |w| {
            running(w) && status(w).runtime_ref != old
        })
        .await;
    let found = inspect(&bed, &status(&replaced).runtime_ref).await;
    assert_eq!(bind_sources(&found), [data.display().to_string()]);
    let event = agent.event(&id, "Replacing").expect("a Replacing event");
    assert!(event.message.contains("unresolved"), "{event:?}");
    assert!(agent.event(&id, "PolicyViolation").is_none());
    let all = containers_of(&bed.docker, &bed.scope, &id).await;
    assert_eq!(all.len(), 1, "the old container is gone: {all:?}");
    agent.stop().await;
}

/// The host sources of a container's bind mounts, as the engine mounted
/// (or will mount) them.
fn bind_sources(found: &bollard::models::ContainerInspectResponse) -> Vec<String> {
    found
        .mounts
        .iter()
        .flatten()
        .filter(|m| m.typ.as_deref() == Some("bind"))
        .filter_map(|m| m.source.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_registry_that_never_answers_is_abandoned_at_its_deadline() {
    let Some(bed) = TestBed::new("stall").await else {
        return;
    };
    // A registry that accepts connections and never answers (the engine
    // speaks plain HTTP to registries on 127.0.0.0/8).
    let registry = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a registry port");
    let port = registry.local_addr().expect("its address").port();
    let contacted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let silent = tokio::spawn({
        let contacted = contacted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = registry.accept().await {
                held.push(connection);
                contacted.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let config = DockerConfig {
        pull_timeout: Duration::from_secs(2),
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("stall");
    let image = format!("127.0.0.1:{port}/stall:1");
    let spec = ContainerSpec {
        image: image.clone(),
        ..shell_spec("true")
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;

    let failed = agent
        .wait_for(&id, CONVERGE, "failing its pull", |w| {
            status(w).failure_reason == "IMAGE_PULL_FAILED"
        })
        .await;
    let s = status(&failed);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(!s.retry_terminal, "a registry may answer later");
    for part in [image.as_str(), "2s", "PERSYS_PULL_TIMEOUT"] {
        assert!(s.last_error.contains(part), "{part}: {}", s.last_error);
    }
    assert!(
        contacted.load(std::sync::atomic::Ordering::SeqCst),
        "the engine went to the stalling registry, which held it past the deadline"
    );
    assert!(containers_of(&bed.docker, &bed.scope, &id).await.is_empty());
    agent.stop().await;
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_a_running_container_is_sampled() {
    let Some(bed) = TestBed::new("usage").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("usage");
    run_sleeper(&agent, &id).await;
    let sampled = agent
        .controller
        .usage_sampler()
        .sample_once()
        .await
        .expect("sample");
    assert_eq!(sampled, 1);
    let usage = agent.controller.usage().get(&id).expect("a sample");
    assert_eq!(usage.workload_id, id);
    assert!(usage.memory_bytes > 0, "{usage:?}");
    assert!(usage.collected_at > 0);
    // An engine on this host: read from the container's cgroup.
    assert_eq!(usage.source, "cgroup");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_outage_reports_unknown_and_reconnecting_repairs_what_drifted() {
    let Some(bed) = TestBed::new("outage").await else {
        return;
    };
    let (agent, proxy) = bed.agent_behind_proxy().await;
    let id = unique("outage");
    run_sleeper(&agent, &id).await;

    proxy.stop().await;
    // Drift the agent cannot see: the container is killed meanwhile.
    bed.docker
        .kill_container(&id, None::<KillContainerOptions>)
        .await
        .expect("kill");
    let late = unique("outage-late");
    let spec = shell_spec("exec sleep 3600");
    agent
        .apply(&late, "r1", DesiredState::Running, spec.clone())
        .await;
    let unknown = agent
        .wait_for(&late, CONVERGE, "unknown", |w| {
            status(w).actual_state() == ActualState::Unknown
        })
        .await;
    let s = status(&unknown);
    assert!(s.message.contains("unreachable"), "{}", s.message);
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.reason.as_str()),
        Some("RuntimeUnreachable")
    );
    assert_eq!(
        unknown.desired_state(),
        DesiredState::Running,
        "desired state is untouched"
    );
    assert_eq!(unknown.generation(), 1);

    proxy.start().await;
    let back = Instant::now();
    agent
        .wait_for(&id, CONVERGE, "restarted after the engine came back", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    agent
        .wait_for(
            &late,
            CONVERGE,
            "created after the engine came back",
            running,
        )
        .await;
    eprintln!("recovered {:?} after the engine came back", back.elapsed());
    assert!(
        back.elapsed() < Duration::from_secs(15),
        "recovery must not wait for a resync"
    );
    agent.stop().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_converged_workloads_reuses_one_listing_and_their_inspects() {
    use persys_controllers::Reconciler;
    let Some(bed) = TestBed::new("resync").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let ids: Vec<String> = (0..3).map(|i| unique(&format!("resync{i}"))).collect();
    for id in &ids {
        agent.apply_sleeper(id).await;
    }
    for id in &ids {
        agent.wait_for(id, CONVERGE, "running", running).await;
    }
    // A resync: every workload reconciled once, nothing changed on the
    // engine. Late events of the starts may still invalidate a first pass;
    // a quiet pass must reuse the listing for all but the first workload and
    // every inspect.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = agent.controller.observations_reused();
        for id in &ids {
            let workload = Arc::new(agent.store.get(id).unwrap().unwrap());
            agent
                .controller
                .reconcile(workload)
                .await
                .expect("reconcile");
        }
        let reused = agent.controller.observations_reused() - before;
        if reused >= 2 * ids.len() as u64 - 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a quiet resync kept calling the engine ({reused} reused)"
        );
    }
    // And a change is still seen at once: the kill's event discards it all.
    bed.docker
        .kill_container(&ids[0], None::<KillContainerOptions>)
        .await
        .expect("kill");
    agent
        .wait_for(&ids[0], Duration::from_secs(5), "restarted", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reconnect_of_the_engine_events_queues_every_container_workload() {
    use futures::StreamExt;
    let Some(bed) = TestBed::new("reconnect").await else {
        return;
    };
    let (agent, proxy) = bed.agent_behind_proxy().await;
    let id = unique("reconnect");
    run_sleeper(&agent, &id).await;
    // A (re)connecting stream is replayed the engine's events from
    // `REPLAYED` before the whole second it opens in: once the container's
    // own events are older than that, nothing but the (re)connect names the
    // workload.
    let unseen = tokio::time::Instant::now() + REPLAYED + Duration::from_millis(1500);

    // A second trigger on the same controller, read by this test alone.
    let mut trigger = agent.controller.trigger(agent.informer.cache());
    let mut until_queued = async |wanted: &str, on: &str| {
        let found = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(next) = trigger.next().await {
                if next == wanted {
                    return;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "the trigger did not queue {wanted} on {on}");
    };
    until_queued(&id, "connect").await;
    // Another workload's container event shows the stream is following.
    // Not its create or start: the controller announces those, and whichever
    // of the two triggers sees one first takes the announcement. A kill
    // nobody announced wakes every trigger.
    let marker = unique("reconnect-marker");
    run_sleeper(&agent, &marker).await;
    bed.docker
        .kill_container(&marker, None::<KillContainerOptions>)
        .await
        .expect("kill the marker");
    until_queued(&marker, "its container's die").await;

    tokio::time::sleep_until(unseen).await;
    proxy.stop().await;
    proxy.start().await;
    until_queued(&id, "reconnect").await;
    agent.stop().await;
    proxy.stop().await;
}
