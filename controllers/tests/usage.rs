//! Usage sampling against the real engine: containers and compose services
//! read from their cgroups (not the engine's stats endpoint), every
//! container fresh within two intervals, a compose project reported as the
//! sum of its services.
//!
//! Needs a Docker engine on this host, the offline test image and the
//! compose CLI (hack/runtimes-up.sh). Outside CI a test without them is
//! skipped with a loud message; in CI (`CI=true`) it fails.

// Both runtimes' support modules include the one test harness.
#![allow(clippy::duplicate_mod)]

mod compose_support;
mod docker_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use docker_support::running;
use persys_api::v1::DesiredState;
use persys_controllers::cgroup::Hierarchy;
use persys_controllers::compose::usage::UsageSampler as ComposeUsageSampler;
use persys_controllers::docker::{DockerConfig, Engine};
use tokio_util::sync::CancellationToken;

/// The sampling interval of these tests: short, so two intervals are short.
const INTERVAL: Duration = Duration::from_secs(1);
const CONVERGE: Duration = Duration::from_secs(120);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seconds two intervals span (collected_at is in whole seconds).
fn two_intervals() -> i64 {
    2 * INTERVAL.as_secs().max(1) as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_container_of_a_fifty_container_set_has_fresh_usage_from_its_cgroup() {
    use docker_support::{Agent, TestBed, shell_spec};
    let Some(bed) = TestBed::new("usage50").await else {
        return;
    };
    let config = DockerConfig {
        usage_interval: INTERVAL,
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config).await;
    let prefix = docker_support::unique("use");
    let ids: Vec<String> = (0..50).map(|n| format!("{prefix}-{n:02}")).collect();
    let busy = ids[0].clone();
    agent
        .apply(
            &busy,
            "r1",
            DesiredState::Running,
            shell_spec("while :; do :; done"),
        )
        .await;
    for id in &ids[1..] {
        agent.apply_sleeper(id).await;
    }
    for id in &ids {
        agent.wait_for(id, CONVERGE, "running", running).await;
    }

    let shutdown = CancellationToken::new();
    let sampler = tokio::spawn(agent.controller.usage_sampler().run(shutdown.clone()));
    let usage = agent.controller.usage();
    // Fresh: every container sampled within the last two intervals, each
    // through its cgroup; the busy one shows CPU use once two rounds have
    // passed.
    docker_support::eventually(
        Duration::from_secs(60),
        "every container has a fresh cgroup sample and the busy one uses CPU",
        || {
            let usage = usage.clone();
            let ids = ids.clone();
            let busy = busy.clone();
            async move {
                let now = now();
                ids.iter().all(|id| {
                    usage.get(id).is_some_and(|u| {
                        u.source == "cgroup"
                            && now - u.collected_at <= two_intervals()
                            && u.memory_bytes > 0
                    })
                }) && usage.get(&busy).is_some_and(|u| u.cpu_percent > 0.0)
            }
        },
    )
    .await;
    // Still fresh a few rounds later: the sampler keeps up with the set.
    tokio::time::sleep(INTERVAL * 3).await;
    let now = now();
    for id in &ids {
        let u = usage.get(id).expect("a sample of every container");
        assert_eq!(u.source, "cgroup", "{u:?}");
        assert!(now - u.collected_at <= two_intervals(), "stale: {u:?}");
    }
    let busy_cpu = usage.get(&busy).map(|u| u.cpu_percent).unwrap_or(0.0);
    assert!(busy_cpu > 10.0, "a spinning shell uses CPU: {busy_cpu}");
    let source = usage.source().unwrap_or_default();
    assert!(source.starts_with("cgroup v"), "{source}");
    shutdown.cancel();
    let _ = sampler.await;
    agent.stop().await;
}

/// Forwards TCP connections on a loopback port to the engine's unix
/// socket: an engine the agent reaches over TCP, as it would a remote one.
async fn tcp_to_engine() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("its address");
    let socket = docker_support::engine_socket();
    let forwarding = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    (format!("tcp://{address}"), forwarding)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_reached_over_tcp_is_sampled_through_its_stats_and_the_reason_is_published() {
    use docker_support::{Agent, TestBed};
    let Some(bed) = TestBed::new("usage-remote").await else {
        return;
    };
    let (host, forwarding) = tcp_to_engine().await;
    let config = DockerConfig {
        host: Some(host.clone()),
        ..bed.config()
    };
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = docker_support::unique("usage-remote");
    agent.apply_sleeper(&id).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let sampler = agent.controller.usage_sampler();
    assert_eq!(sampler.sample_once().await.expect("a round"), 1);
    let usage = agent.controller.usage();
    let sample = usage.get(&id).expect("a sample");
    assert_eq!(sample.source, "docker", "{sample:?}");
    assert!(sample.memory_bytes > 0, "{sample:?}");
    let source = usage.source().unwrap_or_default();
    assert!(
        source.starts_with("docker stats") && source.contains(&host),
        "{source}"
    );
    agent.stop().await;
    forwarding.abort();
}

/// Memory of each container of `project` as its cgroup says, read by the
/// test itself through the container's process.
async fn memory_of_each(docker: &Docker, project: &str) -> Vec<u64> {
    let hierarchy = Hierarchy::detect().expect("the host's cgroups");
    let mut each = Vec::new();
    for container in compose_support::containers_of(docker, project).await {
        let id = container.id.expect("a container id");
        let pid = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .expect("inspect")
            .state
            .and_then(|s| s.pid)
            .expect("a running container's pid");
        let path = hierarchy.cgroup_of(pid as u32).expect("its cgroup");
        each.push(hierarchy.read(&path).expect("its counters").memory_bytes);
    }
    each
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compose_projects_usage_is_the_sum_of_its_services() {
    use compose_support::{Agent, TestBed, compose_file, compose_spec};
    let Some(bed) = TestBed::new("usage-compose").await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = compose_support::unique("usage-shop");
    let project = bed.project("usage");
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

    let sampler = ComposeUsageSampler::new(
        Engine::new(Some(compose_support::engine_host())),
        agent.informer.cache(),
        INTERVAL,
        4,
    );
    let usage = sampler.snapshots();
    // Idle services' memory holds still; read both sides until one round
    // and the test's own reading agree.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (snapshot, each) = loop {
        assert_eq!(sampler.sample_once().await.expect("a round"), 1);
        let snapshot = usage.get(&id).expect("the project's sample");
        let each = memory_of_each(&bed.docker, &project).await;
        if snapshot.memory_bytes as u64 == each.iter().sum::<u64>() {
            break (snapshot, each);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the project's memory {} is never the sum of its services' {each:?}",
            snapshot.memory_bytes
        );
    };
    assert_eq!(each.len(), 2, "both services counted");
    assert!(each.iter().all(|m| *m > 0), "{each:?}");
    assert_eq!(snapshot.source, "cgroup");
    assert_eq!(
        snapshot.r#type,
        persys_api::v1::WorkloadType::Compose as i32
    );
    assert!(now() - snapshot.collected_at <= two_intervals());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_under_another_cgroup_parent_are_still_read_from_their_cgroups() {
    use bollard::models::HostConfig;
    use bollard::query_parameters::RemoveContainerOptions;
    use persys_controllers::docker::usage::{ContainerReader, Source};

    let Some(bed) = docker_support::TestBed::new("usage-parent").await else {
        return;
    };
    let docker = &bed.docker;
    let systemd = docker
        .info()
        .await
        .expect("engine info")
        .cgroup_driver
        .is_some_and(|d| d.to_string() == "systemd");
    let run = docker_support::unique("persys-usage");
    let parent = if systemd {
        format!("{}.slice", run.replace('-', "_"))
    } else {
        format!("/{run}")
    };
    let mut ids = Vec::new();
    for n in 0..3 {
        let host_config = HostConfig {
            cgroup_parent: Some(parent.clone()),
            init: Some(true),
            ..Default::default()
        };
        let id = start_sleeper(&bed, &format!("{run}-{n}"), Some(host_config)).await;
        ids.push(id);
    }

    let reader = ContainerReader::new(
        Engine::new(Some(docker_support::engine_host())),
        4,
        Default::default(),
    );
    let read = reader.read(docker, ids.clone()).await.expect("a round");
    assert!(reader.uses_cgroups(), "an engine on this host");
    for id in &ids {
        let sample = read.get(id).expect("every container sampled");
        assert_eq!(sample.source, Source::Cgroup, "{id}: {sample:?}");
        assert!(sample.memory_bytes > 0, "{sample:?}");
    }

    for id in &ids {
        let _ = docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }
    // The engine leaves the (now empty) parent cgroups behind.
    if !systemd && let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") {
        for mount in mounts.flatten() {
            let _ = std::fs::remove_dir(mount.path().join(&run));
        }
    }
}

/// Starts a container of the test's scope sleeping an hour, made by hand
/// (not by a controller); returns its id.
async fn start_sleeper(
    bed: &docker_support::TestBed,
    name: &str,
    host_config: Option<bollard::models::HostConfig>,
) -> String {
    use bollard::models::ContainerCreateBody;
    use bollard::query_parameters::CreateContainerOptionsBuilder;
    let body = ContainerCreateBody {
        image: Some(docker_support::test_image()),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        labels: Some(
            [(
                persys_controllers::docker::labels::SCOPE.to_string(),
                bed.scope.clone(),
            )]
            .into(),
        ),
        host_config,
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    let id = bed
        .docker
        .create_container(Some(options), body)
        .await
        .expect("create")
        .id;
    bed.docker.start_container(&id, None).await.expect("start");
    id
}

async fn pid_of(docker: &Docker, id: &str) -> i64 {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .expect("inspect")
        .state
        .and_then(|s| s.pid)
        .unwrap_or_default()
}

/// The reader keeps each container's counter files open between rounds.
/// A restart removes the container's cgroup and makes a new one: the kept
/// files go stale and are opened again, so the container is still read
/// from its cgroup; once it is gone, its files are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_containers_new_cgroup_is_read_and_a_removed_ones_files_are_closed() {
    use bollard::query_parameters::{RemoveContainerOptions, RestartContainerOptions};
    use persys_controllers::docker::usage::{ContainerReader, Source};

    let Some(bed) = docker_support::TestBed::new("usage-restart").await else {
        return;
    };
    let docker = &bed.docker;
    let name = docker_support::unique("persys-usage-restart");
    let id = start_sleeper(&bed, &name, None).await;

    let reader = ContainerReader::new(
        Engine::new(Some(docker_support::engine_host())),
        4,
        Default::default(),
    );
    // One round of the container alone; its sample, read from its cgroup.
    let sampled = async |when: &str| {
        let read = reader
            .read(docker, vec![id.clone()])
            .await
            .expect("a round");
        let sample = *read
            .get(&id)
            .unwrap_or_else(|| panic!("not sampled {when}"));
        assert_eq!(sample.source, Source::Cgroup, "{when}: {sample:?}");
        assert!(sample.memory_bytes > 0, "{when}: {sample:?}");
    };
    sampled("at first").await;
    let held = reader.files_held();
    assert!(
        held >= 4,
        "cpu, memory, memory.stat and cgroup.procs kept: {held}"
    );
    let before = pid_of(docker, &id).await;

    docker
        .restart_container(
            &id,
            Some(RestartContainerOptions {
                t: Some(0),
                ..Default::default()
            }),
        )
        .await
        .expect("restart");
    assert_ne!(pid_of(docker, &id).await, before, "a new process");
    sampled("after the restart").await;
    assert_eq!(reader.files_held(), held, "opened again, none twice");

    docker
        .remove_container(
            &id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .expect("remove");
    reader.read(docker, Vec::new()).await.expect("a round");
    assert_eq!(
        reader.files_held(),
        0,
        "a removed container's files are closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_and_compose_samplers_share_one_list_of_the_engine_per_round() {
    use persys_controllers::docker::usage::RunningContainers;
    let Some(docker_bed) = docker_support::TestBed::new("usage-shared").await else {
        return;
    };
    let Some(compose_bed) = compose_support::TestBed::new("usage-shared-compose").await else {
        return;
    };
    let containers =
        docker_support::Agent::start(&docker_bed.state_dir(), docker_bed.config()).await;
    let projects =
        compose_support::Agent::start(&compose_bed.state_dir(), compose_bed.config()).await;
    let sleeper = docker_support::unique("shared-sleeper");
    containers.apply_sleeper(&sleeper).await;
    let shop = compose_support::unique("shared-shop");
    let project = compose_bed.project("shared");
    let compose = compose_support::compose_file(&[("web", "")]);
    projects
        .apply(
            &shop,
            "r1",
            DesiredState::Running,
            compose_support::compose_spec(&project, &compose, &[]),
        )
        .await;
    containers
        .wait_for(&sleeper, CONVERGE, "running", running)
        .await;
    projects.wait_for(&shop, CONVERGE, "running", running).await;

    // As the agent wires them: one listing, young for half an interval.
    let running_containers = RunningContainers::for_interval(Duration::from_secs(60));
    let container_sampler = containers
        .controller
        .usage_sampler()
        .sharing(running_containers.clone());
    let compose_sampler = ComposeUsageSampler::new(
        Engine::new(Some(compose_support::engine_host())),
        projects.informer.cache(),
        Duration::from_secs(60),
        4,
    )
    .sharing(running_containers.clone());
    assert_eq!(container_sampler.sample_once().await.expect("a round"), 1);
    assert_eq!(compose_sampler.sample_once().await.expect("a round"), 1);
    assert_eq!(running_containers.lists(), 1, "one list for both samplers");
    assert!(containers.controller.usage().get(&sleeper).is_some());
    assert!(compose_sampler.snapshots().get(&shop).is_some());
    containers.stop().await;
    projects.stop().await;
}
