//! Taking over the containers the Go agent left running, on the real
//! engine: each container here is created exactly as the Go agent creates
//! one (its name, its labels, command then args as Cmd, the spec's restart
//! policy, ports bound on 0.0.0.0), and the workload is stored as the import
//! leaves it.
//!
//! Needs a Docker engine and the offline test image (hack/runtimes-up.sh).

mod docker_support;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, RemoveContainerOptions, StartContainerOptions,
};
use docker_support::*;
use persys_api::v1::{ContainerSpec, DesiredState, PortMapping};
use persys_controllers::docker::labels;

const CONVERGE: Duration = Duration::from_secs(30);

/// The Go agent's labels.
const GO_WORKLOAD_ID: &str = "persys.workload_id";
const GO_REVISION: &str = "persys.revision_id";

/// Removes the named containers when dropped: the Go agent's carry no
/// scope, so the test bed's sweep does not see them.
struct Named {
    docker: Docker,
    names: Vec<String>,
}

impl Drop for Named {
    fn drop(&mut self) {
        let (docker, names) = (self.docker.clone(), std::mem::take(&mut self.names));
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                for name in names {
                    let options = RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    };
                    let _ = docker.remove_container(&name, Some(options)).await;
                }
            });
            Some(())
        })
        .join();
    }
}

/// The spec the tests store: a sleeper with env, a published port and a
/// restart policy, all of which the Go agent passed to the engine.
fn go_spec(port: u16) -> ContainerSpec {
    ContainerSpec {
        image: test_image(),
        command: vec!["sh".into(), "-c".into()],
        args: vec!["exec sleep 3600".into()],
        env: [("GREETING".to_string(), "hello".to_string())].into(),
        ports: vec![PortMapping {
            host_port: i32::from(port),
            container_port: 80,
            protocol: String::new(),
        }],
        restart_policy: Some(persys_api::v1::RestartPolicy {
            policy: "always".into(),
            max_retry_count: 0,
        }),
        ..Default::default()
    }
}

/// Creates and starts container `name` from `spec` as the Go agent does,
/// with `labels`; answers its id.
async fn run_as_go_agent(
    docker: &Docker,
    name: &str,
    spec: &ContainerSpec,
    labels: HashMap<String, String>,
) -> String {
    let cmd: Vec<String> = spec.command.iter().chain(&spec.args).cloned().collect();
    let mut exposed = Vec::new();
    let mut bindings = HashMap::new();
    for port in &spec.ports {
        let key = format!("{}/tcp", port.container_port);
        exposed.push(key.clone());
        bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: Some("0.0.0.0".into()),
                host_port: Some(port.host_port.to_string()),
            }]),
        );
    }
    let policy = spec
        .restart_policy
        .as_ref()
        .map(|p| p.policy.as_str())
        .unwrap_or("no");
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(cmd),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        exposed_ports: Some(exposed),
        host_config: Some(HostConfig {
            restart_policy: Some(RestartPolicy {
                name: Some(policy.parse().expect("a restart policy")),
                maximum_retry_count: Some(0),
            }),
            port_bindings: Some(bindings),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let created = docker
        .create_container(Some(options), body)
        .await
        .expect("create as the Go agent does");
    docker
        .start_container(&created.id, None::<StartContainerOptions>)
        .await
        .expect("start");
    created.id
}

/// How many times the Go agent's container was taken over (a restarted
/// agent also says it adopted its own containers, in other words).
fn go_adoptions(agent: &Agent, id: &str) -> u32 {
    agent
        .events(id, "Adopted")
        .iter()
        .filter(|e| e.message.contains("Go agent"))
        .map(|e| e.count)
        .sum()
}

fn go_labels(id: &str, revision: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (GO_WORKLOAD_ID.to_string(), id.to_string()),
        (GO_REVISION.to_string(), revision.to_string()),
    ])
}

async fn inspect(docker: &Docker, container: &str) -> Option<ContainerInspectResponse> {
    docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .ok()
}

fn started_at(found: &ContainerInspectResponse) -> String {
    found
        .state
        .as_ref()
        .and_then(|s| s.started_at.clone())
        .unwrap_or_default()
}

fn is_running(found: &ContainerInspectResponse) -> bool {
    found.state.as_ref().and_then(|s| s.running) == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_container_that_matches_its_spec_is_adopted_without_a_restart_and_deleted_with_it()
 {
    let Some(bed) = TestBed::new("adopt-go").await else {
        return;
    };
    let id = unique("adopt-go");
    let _named = Named {
        docker: bed.docker.clone(),
        names: vec![id.clone()],
    };
    let spec = go_spec(free_port());
    let cid = run_as_go_agent(&bed.docker, &id, &spec, go_labels(&id, "r1")).await;
    let before = inspect(&bed.docker, &cid).await.expect("the Go container");

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = w.status.clone().unwrap_or_default();
    let after = inspect(&bed.docker, &id).await.expect("the container");
    assert_eq!(
        after.id.as_deref(),
        Some(cid.as_str()),
        "the same container"
    );
    assert_eq!(started_at(&after), started_at(&before), "not restarted");
    assert_eq!(s.runtime_ref, cid);
    assert_eq!(
        s.facts.get("adopted.container-id"),
        Some(&cid),
        "{:?}",
        s.facts
    );
    assert_eq!(
        s.facts.get("adopted.label.persys.spec-hash"),
        Some(&w.spec_hash()),
        "the marks it would carry are recorded"
    );
    assert_eq!(go_adoptions(&agent, &id), 1);
    assert_eq!(agent.event_count(&id, "Created"), 0, "nothing was created");
    // Its usage is sampled as a container of this agent's is.
    let sampler = agent.controller.usage_sampler();
    sampler.sample_once().await.expect("a usage round");
    let usage = agent.controller.usage().get(&id);
    let usage = usage.expect("the adopted container's usage is sampled");
    assert!(usage.memory_bytes > 0, "{usage:?}");
    let policy = after
        .host_config
        .and_then(|h| h.restart_policy)
        .and_then(|p| p.name);
    assert_eq!(
        policy,
        Some(RestartPolicyNameEnum::NO),
        "restarts are handed over to this agent"
    );
    agent.stop().await;

    // A restarted agent reads the adoption from the store: a killed
    // container is restarted in place, and nothing is adopted again.
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    bed.docker
        .kill_container(
            &cid,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .expect("kill");
    let docker = bed.docker.clone();
    let first_start = started_at(&before);
    eventually(CONVERGE, "the killed container runs again", || {
        let (docker, cid, first_start) = (docker.clone(), cid.clone(), first_start.clone());
        async move {
            inspect(&docker, &cid)
                .await
                .is_some_and(|c| is_running(&c) && started_at(&c) != first_start)
        }
    })
    .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let again = inspect(&bed.docker, &id).await.expect("the container");
    assert_eq!(
        again.id.as_deref(),
        Some(cid.as_str()),
        "still the adopted container"
    );
    assert_eq!(go_adoptions(&agent, &id), 1, "taken over once, ever");
    assert_eq!(agent.event_count(&id, "Created"), 0);
    let stored = agent.store.get(&id).unwrap().unwrap();
    assert_eq!(
        stored
            .status
            .unwrap_or_default()
            .facts
            .get("adopted.container-id"),
        Some(&cid)
    );

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(
        inspect(&bed.docker, &cid).await.is_none(),
        "deleted with its workload"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_container_that_differs_from_its_spec_is_replaced_once_naming_the_field() {
    let Some(bed) = TestBed::new("adopt-go-differs").await else {
        return;
    };
    let id = unique("adopt-go-differs");
    let _named = Named {
        docker: bed.docker.clone(),
        names: vec![id.clone()],
    };
    let spec = go_spec(free_port());
    let mut ran = spec.clone();
    ran.env.insert("GREETING".into(), "hi".into());
    let cid = run_as_go_agent(&bed.docker, &id, &ran, go_labels(&id, "r0")).await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = w.status.clone().unwrap_or_default();
    assert_ne!(s.runtime_ref, cid, "replaced");
    assert!(
        inspect(&bed.docker, &cid).await.is_none(),
        "the Go container is gone"
    );
    let replacing = agent.events(&id, "Replacing");
    assert_eq!(replacing.len(), 1, "{replacing:?}");
    assert_eq!(replacing[0].count, 1, "replaced once");
    assert!(
        replacing[0].message.contains("env: GREETING"),
        "{}",
        replacing[0].message
    );
    assert!(
        !replacing[0].message.contains("hi"),
        "no env value in events"
    );
    assert!(
        !s.facts.contains_key("adopted.container-id"),
        "{:?}",
        s.facts
    );
    let ours = containers_of(&bed.docker, &bed.scope, &id).await;
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].id.as_deref(), Some(s.runtime_ref.as_str()));
    assert_eq!(agent.event_count(&id, "Adopted"), 0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_that_are_not_the_go_agents_by_its_labels_and_names_are_never_touched() {
    let Some(bed) = TestBed::new("adopt-go-not").await else {
        return;
    };
    // A look-alike without `persys.managed`, named by a stored workload.
    let lookalike = unique("adopt-go-lookalike");
    // The Go agent's labels, named otherwise than its workload id.
    let renamed_for = unique("adopt-go-renamed");
    let renamed = format!("{renamed_for}-copy");
    // The Go agent's container of an id that is not in the store.
    let ghost = unique("adopt-go-ghost");
    // This agent's orphan: its removal after the grace marks a point by
    // which the others would have been collected too.
    let orphan = unique("adopt-go-orphan");
    let _named = Named {
        docker: bed.docker.clone(),
        names: vec![
            lookalike.clone(),
            renamed.clone(),
            renamed_for.clone(),
            ghost.clone(),
            orphan.clone(),
        ],
    };
    let spec = |port| ContainerSpec {
        ports: Vec::new(),
        ..go_spec(port)
    };
    let mut lookalike_labels = go_labels(&lookalike, "r1");
    lookalike_labels.remove(labels::MANAGED);
    let planted = [
        (lookalike.clone(), lookalike_labels),
        (renamed.clone(), go_labels(&renamed_for, "r1")),
        (ghost.clone(), go_labels(&ghost, "r1")),
    ];
    let mut before = Vec::new();
    for (name, container_labels) in planted {
        let cid = run_as_go_agent(&bed.docker, &name, &spec(0), container_labels).await;
        let found = inspect(&bed.docker, &cid).await.expect("planted");
        before.push((name, cid, started_at(&found)));
    }
    let orphan_labels = HashMap::from([
        (labels::MANAGED.to_string(), "true".to_string()),
        (labels::WORKLOAD_ID.to_string(), orphan.clone()),
        (labels::SPEC_HASH.to_string(), "0".to_string()),
        (labels::SCOPE.to_string(), bed.scope.clone()),
    ]);
    let orphan_cid = run_as_go_agent(&bed.docker, &orphan, &spec(0), orphan_labels).await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent
        .apply(&lookalike, "r1", DesiredState::Running, spec(0))
        .await;
    agent
        .apply(&renamed_for, "r1", DesiredState::Running, spec(0))
        .await;
    agent
        .wait_for(&lookalike, CONVERGE, "failed on the taken name", |w| {
            w.status
                .as_ref()
                .is_some_and(|s| s.last_error.contains("persys does not manage"))
        })
        .await;
    let w = agent
        .wait_for(&renamed_for, CONVERGE, "running", running)
        .await;
    let own = w.status.unwrap_or_default().runtime_ref;
    let docker = bed.docker.clone();
    eventually(CONVERGE, "the agent's own orphan is collected", || {
        let (docker, orphan_cid) = (docker.clone(), orphan_cid.clone());
        async move { inspect(&docker, &orphan_cid).await.is_none() }
    })
    .await;

    for (name, cid, started) in before {
        let found = inspect(&bed.docker, &cid)
            .await
            .unwrap_or_else(|| panic!("{name} was removed"));
        assert!(is_running(&found), "{name} was stopped");
        assert_eq!(started_at(&found), started, "{name} was restarted");
    }
    assert!(
        !own.is_empty() && before_ids_exclude(&own, &bed.docker, &renamed).await,
        "the renamed look-alike's workload got a container of its own"
    );
    assert_eq!(agent.event_count(&lookalike, "Adopted"), 0);
    assert_eq!(agent.event_count(&renamed_for, "Adopted"), 0);
    agent.stop().await;
}

/// True when `own` is not the container named `other`.
async fn before_ids_exclude(own: &str, docker: &Docker, other: &str) -> bool {
    inspect(docker, other)
        .await
        .and_then(|c| c.id)
        .is_some_and(|cid| cid != own)
}
