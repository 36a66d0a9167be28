//! Taking over the compose projects the Go agent left running, with the
//! real engine and compose CLI: each project here is run as the Go agent
//! runs one — `docker-compose.yml` and `.env` in `<go root>/<id>/`, then
//! `docker-compose -p <id> up -d` from there — and the workload is stored
//! as the import leaves it (with a `project_name` the Go agent ignored).
//!
//! Needs a Docker engine, the offline test image and a compose CLI
//! (hack/runtimes-up.sh).

mod compose_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use compose_support::*;
use persys_api::v1::DesiredState;

const CONVERGE: Duration = Duration::from_secs(60);

/// The compose CLI the tests use.
fn compose_binary() -> String {
    std::env::var("PERSYS_COMPOSE_BINARY").unwrap_or_else(|_| "docker-compose".to_string())
}

/// Writes the Go agent's files for `id` under `go_root` and runs the
/// project as it does; answers the folder.
async fn run_as_go_agent(
    go_root: &Path,
    id: &str,
    compose: &str,
    env: &BTreeMap<String, String>,
) -> PathBuf {
    let dir = go_root.join(id);
    std::fs::create_dir_all(&dir).expect("the Go agent's folder");
    std::fs::write(dir.join("docker-compose.yml"), compose).expect("docker-compose.yml");
    let lines: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    std::fs::write(dir.join(".env"), lines.join("\n")).expect(".env");
    let mut words = compose_binary()
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>()
        .into_iter();
    let program = words.next().expect("a compose binary");
    let output = tokio::process::Command::new(program)
        .args(words)
        .args(["-p", id, "up", "-d"])
        .current_dir(&dir)
        .env("DOCKER_HOST", engine_host())
        .output()
        .await
        .expect("run compose");
    assert!(
        output.status.success(),
        "compose up: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// Each container's id and start time, by service.
async fn started(bed: &TestBed, project: &str) -> BTreeMap<String, (String, String)> {
    let mut found = BTreeMap::new();
    for (service, id) in ids_by_service(&bed.docker, project).await {
        let inspected = bed
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .expect("inspect");
        let at = inspected
            .state
            .and_then(|s| s.started_at)
            .unwrap_or_default();
        found.insert(service, (id, at));
    }
    found
}

fn go_events(agent: &Agent, id: &str, reason: &str) -> Vec<persys_api::v1::Event> {
    agent
        .events(id, reason)
        .into_iter()
        .filter(|e| e.message.contains("Go agent"))
        .collect()
}

fn two_services() -> String {
    compose_file(&[
        ("web", "environment:\n  - GREETING=${GREETING}"),
        ("db", ""),
    ])
}

/// One round of the compose usage sampler over the agent's workloads.
async fn usage_round(agent: &Agent) -> persys_controllers::docker::UsageSnapshots {
    let sampler = persys_controllers::compose::usage::UsageSampler::new(
        persys_controllers::docker::Engine::new(Some(engine_host())),
        agent.informer.cache(),
        Duration::from_secs(15),
        4,
    );
    sampler.sample_once().await.expect("a usage round");
    sampler.snapshots()
}

fn greeting(value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("GREETING".to_string(), value.to_string())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_project_that_matches_its_spec_is_adopted_without_a_recreate_and_taken_down_with_it()
 {
    let Some(bed) = TestBed::new("adopt-go-compose").await else {
        return;
    };
    let config = bed.config();
    let go_root = config.go_project_root.clone().expect("a Go project root");
    let id = bed.project("adopt-go");
    // The spec's own project name, which the Go agent ignored.
    let ignored = bed.project("adopt-go-ignored");
    let go_dir = run_as_go_agent(&go_root, &id, &two_services(), &greeting("hello")).await;
    let before = started(&bed, &id).await;
    assert_eq!(before.len(), 2, "{before:?}");

    let agent = Agent::start(&bed.state_dir(), config.clone()).await;
    let spec = compose_spec(&ignored, &two_services(), &[("GREETING", "hello")]);
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    assert_eq!(
        started(&bed, &id).await,
        before,
        "the same containers, not restarted"
    );
    assert_eq!(go_events(&agent, &id, "Adopted").len(), 1);
    assert!(
        containers_of(&bed.docker, &ignored).await.is_empty(),
        "nothing runs under the spec's project name"
    );
    assert_eq!(
        w.status.unwrap_or_default().runtime_ref,
        id,
        "the project it runs as"
    );
    // Its services' usage is sampled, though they carry no labels of this
    // agent's.
    let usage = usage_round(&agent).await;
    let sampled = usage.get(&id).expect("the adopted project's usage");
    assert!(sampled.memory_bytes > 0, "{sampled:?}");
    agent.stop().await;

    // A restarted agent keeps the project as it runs.
    let agent = Agent::start(&bed.state_dir(), config).await;
    // Each agent says it adopted the project it found on its first look.
    eventually(CONVERGE, "the restarted agent has looked at it", || async {
        agent
            .events(&id, "Adopted")
            .iter()
            .filter(|e| !e.message.contains("Go agent"))
            .map(|e| e.count)
            .sum::<u32>()
            >= 2
    })
    .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    assert_eq!(started(&bed, &id).await, before, "still not restarted");
    assert_eq!(
        go_events(&agent, &id, "Adopted").len(),
        1,
        "taken over once"
    );

    // The next `up` (a repair of a removed service) runs under the same
    // project name: compose finds its own containers and keeps the one
    // that needs nothing.
    bed.docker
        .remove_container(
            &before["db"].0,
            Some(bollard::query_parameters::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove db");
    let docker = bed.docker.clone();
    let project = id.clone();
    eventually(CONVERGE, "db is brought back", || {
        let (docker, project) = (docker.clone(), project.clone());
        async move { ids_by_service(&docker, &project).await.contains_key("db") }
    })
    .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let repaired = started(&bed, &id).await;
    assert_eq!(repaired["web"], before["web"], "web was left as it runs");
    assert_eq!(repaired.len(), 2, "{repaired:?}");

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(
        containers_of(&bed.docker, &id).await.is_empty(),
        "taken down"
    );
    assert!(!go_dir.exists(), "the Go agent's folder goes with it");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_project_that_differs_from_its_spec_is_brought_up_from_the_spec_once() {
    let Some(bed) = TestBed::new("adopt-go-compose-differs").await else {
        return;
    };
    let config = bed.config();
    let go_root = config.go_project_root.clone().expect("a Go project root");
    let id = bed.project("adopt-go-differs");
    run_as_go_agent(&go_root, &id, &two_services(), &greeting("hi")).await;
    let before = started(&bed, &id).await;

    let agent = Agent::start(&bed.state_dir(), config).await;
    let spec = compose_spec("", &two_services(), &[("GREETING", "hello")]);
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let replacing = go_events(&agent, &id, "Replacing");
    assert_eq!(replacing.len(), 1, "{replacing:?}");
    assert_eq!(replacing[0].count, 1, "replaced once");
    assert!(
        replacing[0].message.contains(".env: GREETING"),
        "{}",
        replacing[0].message
    );
    assert!(
        !replacing[0].message.contains("hi)"),
        "no env value in events"
    );
    let after = started(&bed, &id).await;
    assert_ne!(
        after["web"].0, before["web"].0,
        "web was recreated from the spec"
    );
    let web = env_of(&bed.docker, &after["web"].0).await;
    assert!(web.contains(&"GREETING=hello".to_string()), "{web:?}");
    assert_eq!(go_events(&agent, &id, "Adopted").len(), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_that_are_not_the_go_agents_by_its_folder_are_never_touched() {
    let Some(bed) = TestBed::new("adopt-go-compose-not").await else {
        return;
    };
    let config = bed.config();
    let go_root = config.go_project_root.clone().expect("a Go project root");
    // A project run as `-p <id>` by hand, from elsewhere, for a stored id.
    let lookalike = bed.project("adopt-go-lookalike");
    let elsewhere = bed.dir.path().join("elsewhere");
    run_as_go_agent(&elsewhere, &lookalike, &two_services(), &greeting("hello")).await;
    // The Go agent's project of an id that is not in the store.
    let ghost = bed.project("adopt-go-ghost");
    let ghost_dir = run_as_go_agent(&go_root, &ghost, &two_services(), &greeting("hello")).await;
    let before = [
        (lookalike.clone(), started(&bed, &lookalike).await),
        (ghost.clone(), started(&bed, &ghost).await),
    ];

    let agent = Agent::start(&bed.state_dir(), config).await;
    let spec = compose_spec("", &two_services(), &[("GREETING", "hello")]);
    agent
        .apply(&lookalike, "r1", DesiredState::Running, spec)
        .await;
    agent
        .wait_for(&lookalike, CONVERGE, "refused", |w| {
            w.status
                .as_ref()
                .is_some_and(|s| s.last_error.contains("did not make it"))
        })
        .await;
    for (project, started_before) in before {
        assert_eq!(
            started(&bed, &project).await,
            started_before,
            "{project} was touched"
        );
    }
    assert!(ghost_dir.join("docker-compose.yml").exists());
    assert!(go_events(&agent, &lookalike, "Adopted").is_empty());
    // The refused workload is not reported with the look-alike's usage.
    let usage = usage_round(&agent).await;
    assert!(
        usage.get(&lookalike).is_none(),
        "{:?}",
        usage.get(&lookalike)
    );
    agent.stop().await;
}
