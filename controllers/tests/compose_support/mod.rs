#![allow(dead_code)] // the tests and the benchmark each use part of it
//! Harness for the Compose controller's tests: a real engine, the real
//! compose CLI, a real fjall store in a temporary directory, and the real
//! informer and controller runner in-process.
//!
//! Tests run in parallel against one engine (also with the Docker
//! controller's tests), so every project name is unique to its test, and a
//! [`Sweep`] removes whatever a test left behind, even when it fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, ListNetworksOptions, ListVolumesOptions,
    RemoveContainerOptions, RemoveVolumeOptions,
};
use futures::StreamExt;
use persys_agent::store::{ApplyOutcome, ApplyRequest, Store, StoreConfig};
use persys_api::v1::{
    ComposeSpec, DesiredState, Event, Workload, WorkloadSpec, WorkloadType, workload_spec,
};
use persys_controllers::backoff::Backoff;
use persys_controllers::compose::observe::PROJECT_LABEL;
use persys_controllers::compose::{ComposeConfig, ComposeController, binary};
use persys_controllers::docker::CrashLoopPolicy;
use persys_controllers::{Controller, ControllerConfig, Informer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_TEST_IMAGE: &str = "persys-test/busybox:latest";

/// The offline test image (`PERSYS_TEST_IMAGE`).
pub fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| DEFAULT_TEST_IMAGE.to_string())
}

/// The engine the tests run against: `DOCKER_HOST` or the default socket.
pub fn engine_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A client of the engine, when the engine, the test image and a compose
/// CLI are all there. Otherwise `None` outside CI (the test is skipped,
/// loudly), and a failure in CI (`CI=true`).
pub async fn runtime_or_skip(test: &str) -> Option<Docker> {
    let ready = async {
        let docker = Docker::connect_with_host(&engine_host()).map_err(|e| e.to_string())?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        docker
            .inspect_image(&test_image())
            .await
            .map_err(|e| format!("test image {}: {e}", test_image()))?;
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k == "PATH" || k == "HOME")
            .collect();
        binary::detect(std::env::var("PERSYS_COMPOSE_BINARY").ok().as_deref(), &env)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(docker)
    }
    .await;
    match ready {
        Ok(docker) => Some(docker),
        Err(error) if in_ci() => panic!(
            "{test}: the Docker engine, the test image or the compose CLI is not available in CI: {error} (run hack/runtimes-up.sh)"
        ),
        Err(error) => {
            eprintln!(
                "\n!!! SKIPPING {test}: no Docker engine / test image / compose CLI ({error}). Run hack/runtimes-up.sh; in CI this fails.\n"
            );
            None
        }
    }
}

/// A name unique to this test run: `<prefix>-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

/// The resync of the tests' controllers: never within a test, so whatever
/// is repaired is repaired by engine events, requeues and back-offs.
pub const RESYNC: Duration = Duration::from_secs(600);

/// Controller settings for tests: project folders under `state`, short
/// back-offs and grace.
pub fn test_config(state: &Path) -> ComposeConfig {
    let second = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        jitter: 0.0,
    };
    ComposeConfig {
        binary: std::env::var("PERSYS_COMPOSE_BINARY").ok(),
        command_timeout: Duration::from_secs(120),
        orphan_grace: Duration::from_secs(3),
        crash_loop: CrashLoopPolicy {
            backoff: second,
            reset_after: Duration::from_secs(600),
        },
        failure_backoff: second,
        events_backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            jitter: 0.0,
        },
        ..ComposeConfig::new(state)
    }
}

/// An agent in-process: the store, the informer and the Compose controller.
pub struct Agent {
    pub store: Store,
    pub controller: Arc<ComposeController>,
    pub informer: Informer,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Opens the store in `state` and starts the informer and the
    /// controller.
    pub async fn start(state: &Path, config: ComposeConfig) -> Agent {
        let store = Store::open(StoreConfig::new(state)).expect("open the store");
        let informer = Informer::new(Arc::new(store.clone()));
        let controller = Arc::new(ComposeController::new(
            config,
            Arc::new(store.clone()),
            informer.cache(),
        ));
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn({
            let informer = informer.clone();
            let shutdown = shutdown.clone();
            async move { informer.run(shutdown).await }
        }));
        let runner = Controller::new(
            controller.clone(),
            informer.clone(),
            Arc::new(store.clone()),
            ControllerConfig {
                concurrency: 4,
                resync_interval: Some(RESYNC),
                ..ControllerConfig::default()
            },
        )
        .with_trigger(controller.trigger());
        tasks.push(tokio::spawn(runner.run(shutdown.clone())));
        Agent {
            store,
            controller,
            informer,
            shutdown,
            tasks,
        }
    }

    /// Stops the controller and the informer and closes the store.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.store.close().await;
    }

    pub async fn apply(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: ComposeSpec,
    ) -> Arc<Workload> {
        let outcome = self
            .store
            .apply(ApplyRequest {
                id: id.to_string(),
                workload_type: WorkloadType::Compose,
                revision_id: revision.to_string(),
                desired_state: desired,
                spec: WorkloadSpec {
                    spec: Some(workload_spec::Spec::Compose(spec)),
                },
                finalizers: vec![persys_api::FINALIZER_COMPOSE.to_string()],
                labels: Default::default(),
            })
            .await
            .expect("apply");
        match outcome {
            ApplyOutcome::Created(w) | ApplyOutcome::Updated(w) | ApplyOutcome::Unchanged(w) => w,
        }
    }

    /// Waits, following the store's change log, until the workload
    /// satisfies `condition`; panics with the last state after `timeout`.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&Workload) -> bool,
    ) -> Workload {
        let mut changes = Box::pin(self.store.watch(self.store.resource_version()));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.store.get(id).expect("read the store");
            if let Some(workload) = &current
                && condition(workload)
            {
                return workload.clone();
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => panic!(
                    "timed out after {timeout:?} waiting for {id} to be {what}; last state: {:#?}",
                    current.map(|w| w.status)
                ),
                change = changes.next() => {
                    change.expect("the store's watch ended").expect("watch error");
                }
            }
        }
    }

    /// Waits until the workload has left the store.
    pub async fn wait_gone(&self, id: &str, timeout: Duration) {
        let mut changes = Box::pin(self.store.watch(self.store.resource_version()));
        let deadline = tokio::time::Instant::now() + timeout;
        while self.store.get(id).expect("read the store").is_some() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => panic!(
                    "timed out after {timeout:?} waiting for {id} to leave the store; it is {:#?}",
                    self.store.get(id)
                ),
                change = changes.next() => {
                    change.expect("the store's watch ended").expect("watch error");
                }
            }
        }
    }

    /// The workload's recorded events with this reason.
    pub fn events(&self, id: &str, reason: &str) -> Vec<Event> {
        self.store
            .events(id)
            .expect("read events")
            .into_iter()
            .filter(|e| e.reason == reason)
            .collect()
    }

    /// How many times an event with this reason was recorded.
    pub fn event_count(&self, id: &str, reason: &str) -> i64 {
        self.events(id, reason)
            .iter()
            .map(|e| i64::from(e.count))
            .sum()
    }
}

impl Drop for Agent {
    /// A test that panics stops its controller too, so it does not bring
    /// back what the sweep removes.
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A compose file of `services`, each `(name, extra YAML lines)`, running
/// the test image with `init: true` (busybox as PID 1 ignores SIGTERM) and
/// `sleep 3600` unless the extra lines say otherwise.
pub fn compose_file(services: &[(&str, &str)]) -> String {
    let mut text = String::from("services:\n");
    for (name, extra) in services {
        text.push_str(&format!("  {name}:\n"));
        if !extra.contains("image:") {
            text.push_str(&format!("    image: {}\n", test_image()));
        }
        text.push_str("    init: true\n");
        if !extra.contains("command:") {
            text.push_str("    command: sleep 3600\n");
        }
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            text.push_str(&format!("    {line}\n"));
        }
    }
    text
}

/// The spec of a project: plain YAML, an explicit project name, env.
pub fn compose_spec(project: &str, compose: &str, env: &[(&str, &str)]) -> ComposeSpec {
    ComposeSpec {
        project_name: project.to_string(),
        compose_yaml: compose.to_string(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Every container (any state) of a project.
pub async fn containers_of(docker: &Docker, project: &str) -> Vec<ContainerSummary> {
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(label_filter(project)),
            ..Default::default()
        }))
        .await
        .expect("list containers")
}

/// Container id by service, of a project's containers.
pub async fn ids_by_service(docker: &Docker, project: &str) -> BTreeMap<String, String> {
    containers_of(docker, project)
        .await
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            (
                labels
                    .get("com.docker.compose.service")
                    .cloned()
                    .unwrap_or_default(),
                c.id.unwrap_or_default(),
            )
        })
        .collect()
}

/// The names of a project's networks.
pub async fn networks_of(docker: &Docker, project: &str) -> Vec<String> {
    docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(label_filter(project)),
        }))
        .await
        .expect("list networks")
        .into_iter()
        .filter_map(|n| n.name)
        .collect()
}

/// The names of a project's volumes.
pub async fn volumes_of(docker: &Docker, project: &str) -> Vec<String> {
    docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(label_filter(project)),
        }))
        .await
        .expect("list volumes")
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect()
}

/// The environment of a container, as `KEY=value` lines.
pub async fn env_of(docker: &Docker, container: &str) -> Vec<String> {
    docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .expect("inspect")
        .config
        .and_then(|c| c.env)
        .unwrap_or_default()
}

fn label_filter(project: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![format!("{PROJECT_LABEL}={project}")],
    )])
}

/// Polls `check` every 100 ms until it holds; panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes every container, network and volume of the projects a test
/// used when dropped, so a failed test leaves nothing on the shared engine.
#[derive(Default)]
pub struct Sweep {
    projects: Mutex<Vec<String>>,
}

impl Sweep {
    pub fn add(&self, project: &str) {
        self.projects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(project.to_string());
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let projects =
            std::mem::take(&mut *self.projects.lock().unwrap_or_else(|p| p.into_inner()));
        if projects.is_empty() {
            return;
        }
        let failed = std::thread::panicking();
        // Drop cannot await, and may run inside the test's runtime: sweep on
        // a thread of its own with a runtime of its own.
        let swept = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let docker = Docker::connect_with_host(&engine_host())
                    .ok()?
                    .negotiate_version()
                    .await
                    .ok()?;
                // A failed test's controller may have had a compose command
                // running that still creates something: sweep again.
                let rounds = if failed { 2 } else { 1 };
                for round in 0..rounds {
                    if round > 0 {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    sweep(&docker, &projects).await;
                }
                Some(())
            })
        })
        .join();
        if !matches!(swept, Ok(Some(()))) {
            eprintln!("sweeping compose projects failed");
        }
    }
}

/// Removes the containers (with their anonymous volumes), networks and
/// volumes of `projects`.
async fn sweep(docker: &Docker, projects: &[String]) {
    for project in projects {
        for c in containers_of(docker, project).await {
            if let Some(id) = c.id {
                let _ = docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            link: false,
                        }),
                    )
                    .await;
            }
        }
        for network in networks_of(docker, project).await {
            let _ = docker.remove_network(&network).await;
        }
        for volume in volumes_of(docker, project).await {
            let _ = docker
                .remove_volume(&volume, None::<RemoveVolumeOptions>)
                .await;
        }
    }
}

/// A test's surroundings: a state directory, the engine, and the sweep.
pub struct TestBed {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub docker: Docker,
    pub sweep: Sweep,
}

impl TestBed {
    pub async fn new(test: &str) -> Option<TestBed> {
        let docker = runtime_or_skip(test).await?;
        Some(TestBed {
            name: test.to_string(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            docker,
            sweep: Sweep::default(),
        })
    }

    /// The agent's state directory; project folders go under `compose/`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config(&self) -> ComposeConfig {
        test_config(&self.state_dir())
    }

    /// A project name unique to this run, swept at the end.
    pub fn project(&self, prefix: &str) -> String {
        let project = unique(&format!("pc-{prefix}"));
        self.sweep.add(&project);
        project
    }
}

/// A unix socket that forwards to the real engine, which a test can take
/// away and bring back: an engine outage and restart as the controller (and
/// the compose CLI it runs) sees it, without disturbing the engine other
/// tests are using.
pub struct EngineProxy {
    path: PathBuf,
    /// The accept loop; aborting it drops every forwarded connection.
    running: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl EngineProxy {
    pub fn new(path: PathBuf) -> EngineProxy {
        EngineProxy {
            path,
            running: tokio::sync::Mutex::new(None),
        }
    }

    /// `unix://<socket>`, for `ComposeConfig::host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Listens and forwards, until [`EngineProxy::stop`].
    pub async fn start(&self) {
        let upstream = engine_host()
            .strip_prefix("unix://")
            .map(PathBuf::from)
            .expect("the engine proxy forwards to a unix socket (DOCKER_HOST=unix://…)");
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind the proxy socket");
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.running.lock().await = Some(accept);
    }

    /// Closes the socket and every connection through it.
    pub async fn stop(&self) {
        if let Some(accept) = self.running.lock().await.take() {
            accept.abort();
            let _ = accept.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
