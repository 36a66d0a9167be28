//! The Compose controller against the real engine, the real compose CLI
//! (docker-compose 1.29 here), the real fjall store and the real controller
//! runtime. The resync is ten minutes, so whatever is repaired here is
//! repaired by engine events, requeues and back-offs.
//!
//! Needs a Docker engine, a compose CLI and the offline test image
//! (hack/runtimes-up.sh). Outside CI a test without them is skipped with a
//! loud message; in CI (`CI=true`) it fails.

mod compose_support;

use std::time::Duration;

use base64::Engine as _;
use bollard::query_parameters::{RemoveContainerOptions, RemoveVolumeOptions};
use compose_support::*;
use persys_api::CONDITION_READY;
use persys_api::v1::{ActualState, DesiredState};
use persys_controllers::compose::{ComposeConfig, ComposeController};
use persys_controllers::docker::HostPathPolicy;
use tokio::time::Instant;

/// Bringing a project up takes v1 about a second and a half here; the
/// margin is for a machine busy with parallel tests.
const CONVERGE: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_converge_under_the_requested_project_name() {
    let Some(bed) = TestBed::new("converge").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("Shop.Converge");
    let project = bed.project("converge");
    let compose = compose_file(&[("web", ""), ("db", "")]);
    // The scheduler sends the file as base64.
    let encoded = base64::engine::general_purpose::STANDARD.encode(&compose);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &encoded, &[]),
        )
        .await;

    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = status(&w);
    assert_eq!(s.runtime_ref, project, "runtime_ref is the project name");
    assert_eq!(s.facts["service.web"], "running");
    assert_eq!(s.facts["service.db"], "running");
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(
        s.failure_reason.is_empty() && s.last_error.is_empty(),
        "{s:?}"
    );

    let containers = containers_of(&bed.docker, &project).await;
    assert_eq!(containers.len(), 2, "{containers:?}");
    assert!(
        containers
            .iter()
            .all(|c| c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING))
    );
    assert_eq!(
        networks_of(&bed.docker, &project).await,
        vec![format!("{project}_default")]
    );
    let folder = bed.state_dir().join("compose").join(&id);
    assert_eq!(
        std::fs::read_to_string(folder.join("docker-compose.yml")).unwrap(),
        compose,
        "the base64 file is decoded into the project folder"
    );
    assert_eq!(
        std::fs::read_to_string(folder.join(".persys-spec-hash"))
            .unwrap()
            .trim(),
        w.spec_hash()
    );
    assert_eq!(agent.event_count(&id, "Up"), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_env_is_interpolated_into_the_containers() {
    let Some(bed) = TestBed::new("env").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("env");
    let project = bed.project("env");
    let compose = compose_file(&[(
        "web",
        "environment:\n  GREETING: ${GREETING}\n  QUOTE: ${QUOTE}\n  STORED: ${STORED:-left out}\n  PLAIN: fixed",
    )]);
    // STORED is a value the API now refuses (a `$` with a quote: no .env
    // quoting carries it to both compose versions); a spec stored before
    // still runs, without it.
    let env = [
        ("GREETING", "hello \"quoted\" $world"),
        ("QUOTE", "it's a\\b"),
        ("STORED", "it's $world"),
    ];
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &env),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let web = ids_by_service(&bed.docker, &project).await["web"].clone();
    let env = env_of(&bed.docker, &web).await;
    for expected in [
        "GREETING=hello \"quoted\" $world",
        "QUOTE=it's a\\b",
        "STORED=left out",
        "PLAIN=fixed",
    ] {
        assert!(env.contains(&expected.to_string()), "{expected}: {env:?}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_removed_out_of_band_is_back_within_seconds_through_engine_events() {
    let Some(bed) = TestBed::new("drift").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("drift");
    let project = bed.project("drift");
    let compose = compose_file(&[("web", ""), ("db", "")]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let before = ids_by_service(&bed.docker, &project).await;

    // `docker rm -f`.
    bed.docker
        .remove_container(
            &before["web"],
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove the web container");
    let removed_at = Instant::now();
    let after = agent
        .wait_for(&id, Duration::from_secs(10), "repaired", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    let repaired_in = removed_at.elapsed();
    let now = ids_by_service(&bed.docker, &project).await;
    assert_ne!(now["web"], before["web"], "web was recreated");
    assert_eq!(now["db"], before["db"], "db was left alone");
    assert_eq!(status(&after).facts["service.web"], "running");
    // Seen gone, or (on a slow engine) still being removed.
    assert_eq!(
        agent.event_count(&id, "ServiceMissing") + agent.event_count(&id, "ServiceExited"),
        1
    );
    eprintln!("drift repaired in {repaired_in:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_stopped_then_running_stops_and_starts_the_same_containers() {
    let Some(bed) = TestBed::new("stopstart").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("stopstart");
    let project = bed.project("stopstart");
    let spec = compose_spec(&project, &compose_file(&[("web", ""), ("db", "")]), &[]);
    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let first = ids_by_service(&bed.docker, &project).await;

    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    let w = agent.wait_for(&id, CONVERGE, "stopped", stopped).await;
    let s = status(&w);
    assert_eq!(s.facts["service.web"], "exited");
    assert!(s.facts.contains_key("service.web.exit_code"), "{s:?}");
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("False")
    );
    let containers = containers_of(&bed.docker, &project).await;
    assert_eq!(containers.len(), 2, "stop keeps the containers");
    assert!(
        containers
            .iter()
            .all(|c| c.state != Some(bollard::models::ContainerSummaryStateEnum::RUNNING)),
        "{containers:?}"
    );
    assert_eq!(agent.event_count(&id, "Stopped"), 1);

    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    assert_eq!(
        ids_by_service(&bed.docker, &project).await,
        first,
        "the same containers start again"
    );
    assert_eq!(
        status(&w).restart_count,
        0,
        "a requested stop is not a crash"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_compose_file_recreates_only_what_changed() {
    let Some(bed) = TestBed::new("change").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("change");
    let project = bed.project("change");
    let v1 = compose_file(&[("web", "environment:\n  VERSION: one"), ("db", "")]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &v1, &[]),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let before = ids_by_service(&bed.docker, &project).await;

    let v2 = compose_file(&[("web", "environment:\n  VERSION: two"), ("db", "")]);
    let applied = agent
        .apply(
            &id,
            "r2",
            DesiredState::Running,
            compose_spec(&project, &v2, &[]),
        )
        .await;
    assert_eq!(applied.generation(), 2);
    agent.wait_for(&id, CONVERGE, "running r2", running).await;
    let after = ids_by_service(&bed.docker, &project).await;
    assert_ne!(after["web"], before["web"], "web changed: recreated");
    assert_eq!(after["db"], before["db"], "db did not change: kept");
    assert!(
        env_of(&bed.docker, &after["web"])
            .await
            .contains(&"VERSION=two".to_string())
    );
    assert_eq!(agent.event_count(&id, "Up"), 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leaves_no_container_no_network_and_no_folder_but_keeps_named_volumes() {
    let Some(bed) = TestBed::new("delete").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("delete");
    let project = bed.project("delete");
    let compose = format!(
        "{}volumes:\n  data: {{}}\n",
        compose_file(&[("web", ""), ("db", "volumes:\n  - data:/data")])
    );
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let folder = bed.state_dir().join("compose").join(&id);
    assert!(folder.is_dir());
    assert_eq!(volumes_of(&bed.docker, &project).await.len(), 1);

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(containers_of(&bed.docker, &project).await.is_empty());
    assert!(networks_of(&bed.docker, &project).await.is_empty());
    assert!(!folder.exists(), "the project folder is removed");
    let volumes = volumes_of(&bed.docker, &project).await;
    assert_eq!(
        volumes,
        vec![format!("{project}_data")],
        "named volumes stay"
    );
    for volume in volumes {
        let _ = bed
            .docker
            .remove_volume(&volume, None::<RemoveVolumeOptions>)
            .await;
    }
    agent.stop().await;
}

/// The delays of the next `count` retries the workload's status announces
/// after the one due at `first`: each new `next_retry_at_ms`, less the
/// wall-clock time it was seen (status writes reach the store's watchers
/// within milliseconds), in order.
async fn announced_delays(agent: &Agent, id: &str, first: i64, count: usize) -> Vec<i64> {
    let mut last = first;
    let mut delays = Vec::new();
    while delays.len() < count {
        let w = agent
            .wait_for(id, CONVERGE, "the next retry announced", |w| {
                status(w).next_retry_at_ms > last
            })
            .await;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_millis() as i64;
        last = status(&w).next_retry_at_ms;
        delays.push(last - now_ms);
    }
    delays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpullable_image_reports_image_pull_failed_and_backs_off() {
    let Some(bed) = TestBed::new("pull").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("pull");
    let project = bed.project("pull");
    let compose = compose_file(&[("web", "image: registry.invalid/x:1")]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    let w = agent
        .wait_for(&id, CONVERGE, "failed", |w| {
            status(w).actual_state() == ActualState::Failed
        })
        .await;
    let s = status(&w);
    assert_eq!(s.failure_reason, "IMAGE_PULL_FAILED", "{s:?}");
    assert!(s.last_error.contains("registry.invalid"), "{s:?}");
    assert!(!s.retry_terminal);
    assert!(s.next_retry_at_ms > 0, "the next attempt is announced");
    assert_eq!(
        w.desired_state(),
        DesiredState::Running,
        "desired state untouched"
    );

    // Each failed attempt announces the next: with a 1 s base doubling,
    // the second and third wait about 2 s and 4 s. A hot loop would
    // announce no wait, and a fixed delay the same one each time.
    let delays = announced_delays(&agent, &id, s.next_retry_at_ms, 2).await;
    eprintln!("announced delays {delays:?} ms");
    assert!(
        delays[0] >= 1000,
        "retried with back-off, not in a loop: {delays:?} ms"
    );
    assert!(delays[1] > delays[0], "the back-off grows: {delays:?} ms");
    assert!(containers_of(&bed.docker, &project).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_project_without_recreating_it() {
    let Some(bed) = TestBed::new("adopt").await else {
        return;
    };
    let id = unique("adopt");
    let project = bed.project("adopt");
    let spec = compose_spec(&project, &compose_file(&[("web", ""), ("db", "")]), &[]);
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let before = ids_by_service(&bed.docker, &project).await;
    agent.stop().await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    eventually(CONVERGE, "the new agent adopts the project", || async {
        agent.event_count(&id, "Adopted") == 1
    })
    .await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    assert_eq!(
        ids_by_service(&bed.docker, &project).await,
        before,
        "the same containers"
    );
    assert_eq!(agent.event_count(&id, "Up"), 1, "brought up once, ever");
    assert_eq!(status(&w).runtime_ref, project);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_folder_without_a_workload_is_taken_down_after_the_grace_period() {
    let Some(bed) = TestBed::new("orphan").await else {
        return;
    };
    let id = unique("orphan");
    let project = bed.project("orphan");
    let config = bed.config();
    let spec = compose_spec(&project, &compose_file(&[("web", "")]), &[]);
    let agent = Agent::start(&bed.state_dir(), config.clone()).await;
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    agent.stop().await;

    // An agent that lost its store, with the project folders still there.
    let fresh_state = bed.dir.path().join("fresh-state");
    let started = Instant::now();
    let agent = Agent::start(&fresh_state, config.clone()).await;
    let folder = config.project_root.join(&id);
    eventually(CONVERGE, "the orphan project is taken down", || async {
        containers_of(&bed.docker, &project).await.is_empty() && !folder.exists()
    })
    .await;
    assert!(
        started.elapsed() >= config.orphan_grace,
        "taken down after {:?}, before the grace period",
        started.elapsed()
    );
    assert!(networks_of(&bed.docker, &project).await.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_workload_asking_for_a_taken_project_name_fails_instead_of_fighting() {
    let Some(bed) = TestBed::new("contest").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let project = bed.project("contest");
    let spec = compose_spec(&project, &compose_file(&[("web", "")]), &[]);
    let first = unique("contest-a");
    let second = unique("contest-b");
    agent
        .apply(&first, "r1", DesiredState::Stopped, spec.clone())
        .await;
    agent.wait_for(&first, CONVERGE, "stopped", stopped).await;
    agent
        .apply(&second, "r1", DesiredState::Stopped, spec)
        .await;
    let w = agent
        .wait_for(&second, CONVERGE, "failed", |w| {
            status(w).actual_state() == ActualState::Failed
        })
        .await;
    let s = status(&w);
    assert_eq!(s.failure_reason, "INVALID_SPEC");
    assert!(s.message.contains(&first), "{s:?}");
    assert!(stopped(&agent.store.get(&first).unwrap().unwrap()));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_reports_unknown_and_keeps_the_desired_state() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let state = dir.path().join("state");
    let mut config = test_config(&state);
    config.host = Some(format!(
        "unix://{}",
        dir.path().join("no-engine.sock").display()
    ));
    let agent = Agent::start(&state, config).await;
    let id = unique("unknown");
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec("pc-unknown", &compose_file(&[("web", "")]), &[]),
        )
        .await;
    let w = agent
        .wait_for(&id, CONVERGE, "unknown", |w| {
            status(w).actual_state() == ActualState::Unknown
        })
        .await;
    let s = status(&w);
    assert_eq!(s.failure_reason, "RUNTIME_ERROR");
    assert!(s.message.contains("unreachable"), "{s:?}");
    assert_eq!(w.desired_state(), DesiredState::Running);
    let health = agent.controller.probe().await;
    assert!(!health.is_healthy());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_reports_the_compose_kind_and_version() {
    let Some(bed) = TestBed::new("probe").await else {
        return;
    };
    let store = persys_store::Store::open(persys_store::StoreConfig::new(bed.state_dir()))
        .expect("open the store");
    let controller = ComposeController::new(
        bed.config(),
        std::sync::Arc::new(store.clone()),
        persys_controllers::Cache::default(),
    );
    let health = controller.probe().await;
    assert!(health.is_healthy(), "{health:?}");
    let binary = health.binary.expect("a compose binary");
    assert!(!binary.version.is_empty());
    eprintln!("compose: {binary}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_keeps_exiting_is_restarted_with_growing_gaps() {
    let Some(bed) = TestBed::new("crashloop").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("crashloop");
    let project = bed.project("crashloop");
    let compose = compose_file(&[
        ("web", ""),
        ("job", "command: [\"sh\", \"-c\", \"sleep 0.2; exit 3\"]"),
    ]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    let w = agent
        .wait_for(&id, CONVERGE, "backing off", |w| {
            status(w).failure_reason == "CRASH_LOOP_BACKOFF"
        })
        .await;
    let s = status(&w);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert_eq!(s.facts["service.job"], "exited");
    assert_eq!(s.facts["service.job.exit_code"], "3");
    assert_eq!(s.facts["service.web"], "running");
    assert!(s.next_retry_at_ms > 0);

    // Each exit announces the next restart, a doubling gap after the
    // previous one. A hot loop (engine events on every exit) would
    // announce no wait.
    let delays = announced_delays(&agent, &id, s.next_retry_at_ms, 2).await;
    eprintln!("announced delays {delays:?} ms");
    assert!(delays[0] >= 1000, "restarts spaced out: {delays:?} ms");
    assert!(delays[1] > delays[0], "the back-off grows: {delays:?} ms");
    // The restart count and its event are separate writes: a restart may
    // have been counted a moment before its event lands. Each count is
    // reported once the two agree.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = agent.store.get(&id).unwrap().unwrap();
        let restarts = i64::from(status(&w).restart_count);
        let reported = i64::from(agent.event_count(&id, "ServiceExited"));
        if restarts == reported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every restart is reported: {restarts} restarts, {reported} ServiceExited events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_outage_reports_unknown_and_reconnecting_repairs_what_drifted() {
    let Some(bed) = TestBed::new("outage").await else {
        return;
    };
    // The controller and its compose CLI reach the engine through a proxy
    // socket this test can take away and bring back.
    let proxy = SocketProxy::new(bed.dir.path().join("docker.sock"), engine_socket());
    proxy.start().await;
    let mut config = bed.config();
    config.host = Some(proxy.unix_url());
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("outage");
    let project = bed.project("outage");
    let compose = compose_file(&[("web", ""), ("db", "")]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let before = ids_by_service(&bed.docker, &project).await;

    proxy.stop().await;
    // Drift the agent cannot see: a service removed meanwhile.
    bed.docker
        .remove_container(
            &before["web"],
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove the web container");
    let late = unique("outage-late");
    let late_project = bed.project("outage-late");
    agent
        .apply(
            &late,
            "r1",
            DesiredState::Running,
            compose_spec(&late_project, &compose, &[]),
        )
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
    assert_eq!(unknown.desired_state(), DesiredState::Running);

    // The engine is back: the event stream reconnects, and everything is
    // reconciled, since what happened meanwhile was not seen.
    proxy.start().await;
    agent
        .wait_for(&id, CONVERGE, "repaired", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    let after = ids_by_service(&bed.docker, &project).await;
    assert_ne!(after["web"], before["web"]);
    assert_eq!(after["db"], before["db"]);
    agent.wait_for(&late, CONVERGE, "running", running).await;
    agent.stop().await;
    proxy.stop().await;
}

/// A container's state and mounts, by id.
async fn inspect(bed: &TestBed, container: &str) -> bollard::models::ContainerInspectResponse {
    bed.docker
        .inspect_container(
            container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .expect("inspect")
}

/// The host sources of a container's bind mounts, as the engine recorded
/// them.
fn bind_sources(found: &bollard::models::ContainerInspectResponse) -> Vec<String> {
    found
        .mounts
        .iter()
        .flatten()
        .filter(|m| m.typ.as_deref() == Some("bind"))
        .filter_map(|m| m.source.clone())
        .collect()
}

fn started_at(found: &bollard::models::ContainerInspectResponse) -> Option<String> {
    found.state.as_ref().and_then(|s| s.started_at.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_directory_swapped_for_a_link_is_refused_at_the_next_up_and_runs_once_restored() {
    let Some(bed) = TestBed::new("compose-swap").await else {
        return;
    };
    // The allowed root, a directory the spec reaches through a link inside
    // it, and a directory outside it the swapped link will point at.
    let base = std::fs::canonicalize(bed.dir.path()).expect("canonical temp dir");
    let root = base.join("volumes");
    let data = root.join("data");
    let kept_aside = root.join("data.kept");
    let current = root.join("current");
    let outside = base.join("outside");
    std::fs::create_dir_all(&data).expect("mkdir data");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    std::fs::write(outside.join("marker"), "outside").expect("write marker");
    std::os::unix::fs::symlink(&data, &current).expect("link current to data");
    let config = ComposeConfig {
        host_paths: HostPathPolicy::new(Some(&bed.state_dir()), vec![root.clone()]),
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("compose-swap");
    let project = bed.project("swap");
    let compose = compose_file(&[("web", "volumes: ['${DATA}:/data:ro']")]);
    let spec = compose_spec(&project, &compose, &[("DATA", current.to_str().unwrap())]);
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let web = ids_by_service(&bed.docker, &project).await["web"].clone();
    let before = inspect(&bed, &web).await;
    assert_eq!(
        bind_sources(&before),
        [data.display().to_string()],
        "compose is given the resolved path, not the file's link"
    );

    // After apply the directory becomes a link out of the root, and the
    // service exits: the agent's restart must not mount the link.
    std::fs::rename(&data, &kept_aside).expect("move data aside");
    std::os::unix::fs::symlink(&outside, &data).expect("link data outside");
    bed.docker
        .kill_container(
            &web,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .expect("kill web");
    let refused = agent
        .wait_for(&id, CONVERGE, "refused by the policy", |w| {
            status(w).failure_reason == "POLICY_VIOLATION"
        })
        .await;
    let s = status(&refused);
    assert_eq!(s.actual_state(), ActualState::Failed);
    assert!(!s.retry_terminal, "restoring the directory must be enough");
    assert!(s.next_retry_at_ms > 0, "retried with back-off");
    assert!(
        s.message.contains("services.web.volumes[0]")
            && s.message.contains("host_paths.allowed_roots"),
        "{}",
        s.message
    );
    let violation = agent
        .event(&id, "PolicyViolation")
        .expect("a PolicyViolation event");
    assert!(
        violation.message.contains("services.web.volumes[0]"),
        "{violation:?}"
    );
    let after = inspect(&bed, &web).await;
    assert_eq!(after.state.as_ref().and_then(|s| s.running), Some(false));
    assert_eq!(
        started_at(&after),
        started_at(&before),
        "never started again, so the link's target was never mounted"
    );
    for container in containers_of(&bed.docker, &project).await {
        let found = inspect(&bed, container.id.as_deref().unwrap_or_default()).await;
        assert!(
            !bind_sources(&found)
                .iter()
                .any(|s| s.starts_with(&outside.display().to_string())),
            "{:?}",
            bind_sources(&found)
        );
    }

    // The directory put back: the next retry starts the service again.
    std::fs::remove_file(&data).expect("remove link");
    std::fs::rename(&kept_aside, &data).expect("restore data");
    let restored = agent
        .wait_for(&id, CONVERGE, "running again", running)
        .await;
    assert!(status(&restored).failure_reason.is_empty());
    let web = ids_by_service(&bed.docker, &project).await["web"].clone();
    let found = inspect(&bed, &web).await;
    assert_ne!(started_at(&found), started_at(&before), "started again");
    assert_eq!(bind_sources(&found), [data.display().to_string()]);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restarts_services_by_their_policy_and_the_engine_restarts_none() {
    let Some(bed) = TestBed::new("compose-restarts").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("compose-restarts");
    let project = bed.project("restarts");
    let compose = compose_file(&[
        ("web", "restart: always"),
        ("once", "restart: \"no\"\ncommand: [\"true\"]"),
    ]);
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            compose_spec(&project, &compose, &[]),
        )
        .await;
    let w = agent
        .wait_for(&id, CONVERGE, "running, once finished", |w| {
            running(w) && status(w).facts.get("service.once").map(String::as_str) == Some("exited")
        })
        .await;
    assert_eq!(status(&w).facts["service.once.exit_code"], "0");
    let ids = ids_by_service(&bed.docker, &project).await;
    let (web, once) = (ids["web"].clone(), ids["once"].clone());
    for (container, asked) in [(&web, "always"), (&once, "no")] {
        let found = inspect(&bed, container).await;
        let engine_policy = found
            .host_config
            .as_ref()
            .and_then(|h| h.restart_policy.as_ref())
            .and_then(|p| p.name);
        assert_eq!(
            engine_policy,
            Some(bollard::models::RestartPolicyNameEnum::NO),
            "the engine restarts nothing by itself"
        );
        let labels = found.config.and_then(|c| c.labels).unwrap_or_default();
        assert_eq!(labels["persys.restart-policy"], asked);
    }
    let web_before = inspect(&bed, &web).await;
    let once_before = inspect(&bed, &once).await;

    // web exits: the agent starts it again; once stays finished.
    bed.docker
        .kill_container(
            &web,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .expect("kill web");
    let w = agent
        .wait_for(&id, CONVERGE, "web restarted", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    let web_after = inspect(&bed, &web).await;
    assert_eq!(web_after.state.as_ref().and_then(|s| s.running), Some(true));
    assert_ne!(
        started_at(&web_after),
        started_at(&web_before),
        "started again"
    );
    let once_after = inspect(&bed, &once).await;
    assert_eq!(
        once_after.state.as_ref().and_then(|s| s.running),
        Some(false)
    );
    assert_eq!(
        started_at(&once_after),
        started_at(&once_before),
        "a finished one-shot service is not run again"
    );
    assert_eq!(status(&w).facts["service.once"], "exited");
    assert_eq!(agent.event_count(&id, "ServiceExited"), 1, "only web");
    agent.stop().await;
}
