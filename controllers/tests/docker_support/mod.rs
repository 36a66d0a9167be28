#![allow(dead_code)] // each test binary uses part of the support module
//! Harness for the Docker controller's tests: a real engine, a real fjall
//! store in a temporary directory, and the real informer and controller
//! runner in-process.
//!
//! Tests run in parallel against one engine, so every test gets its own
//! scope (the `persys.scope` label: its controller never sees another test's
//! containers) and unique workload ids, and a [`Sweep`] that removes
//! whatever the test left behind, even when it fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};
use futures::StreamExt;
use persys_agent::store::{ApplyOutcome, ApplyRequest, Store, StoreConfig};
use persys_api::v1::{
    ContainerSpec, DesiredState, Event, Workload, WorkloadSpec, WorkloadType, workload_spec,
};
use persys_controllers::backoff::Backoff;
use persys_controllers::docker::{CrashLoopPolicy, DockerConfig, DockerController, labels};
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

/// A client of the engine, or `None` when there is none and this is not CI
/// (the test is then skipped, loudly). In CI a missing engine or test image
/// fails the test.
pub async fn docker_or_skip(test: &str) -> Option<Docker> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let connected = async {
        let docker = Docker::connect_with_host(&engine_host()).map_err(|e| e.to_string())?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        docker
            .inspect_image(&test_image())
            .await
            .map_err(|e| format!("test image {}: {e}", test_image()))?;
        Ok::<_, String>(docker)
    }
    .await;
    match connected {
        Ok(docker) => Some(docker),
        Err(error) if in_ci => panic!(
            "{test}: the Docker engine or the test image is not available in CI: {error} (run hack/runtimes-up.sh)"
        ),
        Err(error) => {
            eprintln!(
                "\n!!! SKIPPING {test}: no Docker engine / test image ({error}). Run hack/runtimes-up.sh; in CI this fails.\n"
            );
            None
        }
    }
}

/// A name unique to this test run: `<prefix>-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

/// Controller settings for tests: its own scope, short back-offs, and a
/// resync so long that it cannot be what repairs anything.
pub fn test_config(scope: &str) -> DockerConfig {
    DockerConfig {
        scope: scope.to_string(),
        orphan_grace: Duration::from_secs(2),
        crash_loop: CrashLoopPolicy {
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(30),
                jitter: 0.0,
            },
            reset_after: Duration::from_secs(600),
        },
        pull_backoff: Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            jitter: 0.0,
        },
        events_backoff: Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            jitter: 0.0,
        },
        ..DockerConfig::default()
    }
}

/// The resync of the tests' controllers: never within a test.
pub const RESYNC: Duration = Duration::from_secs(600);

/// An agent in-process: the store, the informer and the Docker controller.
pub struct Agent {
    pub store: Store,
    pub controller: Arc<DockerController>,
    pub informer: Informer,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Opens the store in `dir` and starts the informer and the controller.
    pub async fn start(dir: &Path, config: DockerConfig) -> Agent {
        let store = Store::open(StoreConfig::new(dir)).expect("open the store");
        let informer = Informer::new(Arc::new(store.clone()));
        let controller = Arc::new(DockerController::new(config, Arc::new(store.clone())));
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
        .with_trigger(controller.trigger(informer.cache()));
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
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        self.store.close().await;
    }

    pub async fn apply(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: ContainerSpec,
    ) -> Arc<Workload> {
        let outcome = self
            .store
            .apply(ApplyRequest {
                id: id.to_string(),
                workload_type: WorkloadType::Container,
                revision_id: revision.to_string(),
                desired_state: desired,
                spec: WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(spec)),
                },
                finalizers: vec![persys_api::FINALIZER_DOCKER.to_string()],
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

    /// The workload's recorded event with this reason, if any.
    pub fn event(&self, id: &str, reason: &str) -> Option<Event> {
        self.store
            .events(id)
            .expect("read events")
            .into_iter()
            .find(|e| e.reason == reason)
    }
}

/// A container spec of the test image running `script` under `sh -c`, with
/// a one-second stop grace (busybox as PID 1 ignores SIGTERM).
pub fn shell_spec(script: &str) -> ContainerSpec {
    ContainerSpec {
        image: test_image(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        stop_grace_period_seconds: 1,
        ..Default::default()
    }
}

/// Every container (any state) of one workload in one scope.
pub async fn containers_of(docker: &Docker, scope: &str, id: &str) -> Vec<ContainerSummary> {
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(labels::filter(scope, Some(id))),
            ..Default::default()
        }))
        .await
        .expect("list containers")
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

/// A free TCP port on this host (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Removes every container and volume of a scope when dropped, so a failed
/// test leaves nothing running on the shared engine.
pub struct Sweep {
    pub scope: String,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let scope = self.scope.clone();
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
                let filters = std::collections::HashMap::from([(
                    "label".to_string(),
                    vec![format!("{}={scope}", labels::SCOPE)],
                )]);
                let containers = docker
                    .list_containers(Some(ListContainersOptions {
                        all: true,
                        filters: Some(filters.clone()),
                        ..Default::default()
                    }))
                    .await
                    .ok()?;
                for c in containers {
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
                let volumes = docker
                    .list_volumes(Some(ListVolumesOptions {
                        filters: Some(filters),
                    }))
                    .await
                    .ok()?;
                for v in volumes.volumes.unwrap_or_default() {
                    let _ = docker
                        .remove_volume(&v.name, None::<RemoveVolumeOptions>)
                        .await;
                }
                Some(())
            })
        })
        .join();
        if !matches!(swept, Ok(Some(()))) {
            eprintln!("sweeping scope {} failed", self.scope);
        }
    }
}

/// A test's surroundings: a scope, a state directory, and the sweep.
pub struct TestBed {
    pub scope: String,
    pub dir: tempfile::TempDir,
    pub docker: Docker,
    _sweep: Sweep,
}

impl TestBed {
    pub async fn new(test: &str) -> Option<TestBed> {
        let docker = docker_or_skip(test).await?;
        let scope = unique(&format!("test-{test}"));
        Some(TestBed {
            _sweep: Sweep {
                scope: scope.clone(),
            },
            scope,
            dir: tempfile::tempdir().expect("a temporary directory"),
            docker,
        })
    }

    pub fn config(&self) -> DockerConfig {
        test_config(&self.scope)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// A unix socket that forwards to the real engine, which a test can take
/// away and bring back: an engine outage and restart as the controller sees
/// it, without disturbing the engine other tests are using.
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

    pub fn path(&self) -> &Path {
        &self.path
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
