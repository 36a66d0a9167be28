#![allow(dead_code)] // each test binary uses part of the harness
//! What the runtime harnesses (`docker_support`, `compose_support`,
//! `vm_support`) share: an agent in-process for one controller (a real
//! fjall store in a temporary directory, the real informer and the real
//! controller runner), waits that follow the store's change log, polling
//! with a deadline, the Docker engine the Docker and Compose tests share,
//! and a socket proxy that lets a test take a daemon away and bring it back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use persys_api::v1::{
    ActualState, DesiredState, Event, ExecAction, ObjectStatus, Probe, Workload, WorkloadSpec,
    workload_spec,
};
use persys_controllers::{Controller, ControllerConfig, Informer, Reconciler};
use persys_store::{ApplyOutcome, ApplyRequest, Store, StoreConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The resync of the tests' controllers: never within a test, so whatever
/// is repaired is repaired by runtime events, requeues and back-offs.
pub const RESYNC: Duration = Duration::from_secs(600);

/// A test whose runtime is missing: skipped and recorded, or failed in CI
/// (`persys_test_support::in_ci`, the one definition of "in CI" for every
/// test binary of the workspace).
pub use persys_test_support::skip;

/// A name unique to this test run: `<prefix>-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

pub const DEFAULT_TEST_IMAGE: &str = "persys-test/busybox:latest";

/// The offline test image (`PERSYS_TEST_IMAGE`).
pub fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| DEFAULT_TEST_IMAGE.to_string())
}

/// The workload's status (empty before its first).
pub fn status(w: &Workload) -> ObjectStatus {
    w.status.clone().unwrap_or_default()
}

/// Running, as reported for the workload's current generation.
pub fn running(w: &Workload) -> bool {
    let s = status(w);
    s.actual_state() == ActualState::Running && s.observed_generation == w.generation()
}

/// Stopped, as reported for the workload's current generation.
pub fn stopped(w: &Workload) -> bool {
    let s = status(w);
    s.actual_state() == ActualState::Stopped && s.observed_generation == w.generation()
}

/// A probe running `script` in a shell every second, failing after
/// `failure_threshold` failures.
pub fn exec_probe(script: &str, failure_threshold: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: vec!["sh".into(), "-c".into(), script.into()],
        }),
        period_seconds: 1,
        failure_threshold,
        ..Default::default()
    }
}

/// Runs `script` in the container, as an operator's `exec` would, waits
/// for it to end, and fails the test unless it exits 0.
pub async fn exec_in(docker: &bollard::Docker, container: &str, script: &str) {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(vec!["sh", "-c", script]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("create exec");
    if let StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&created.id, None)
        .await
        .expect("start exec")
    {
        while output.next().await.is_some() {}
    }
    let inspect = docker.inspect_exec(&created.id).await.expect("inspect");
    assert_eq!(inspect.exit_code, Some(0), "{script} failed in {container}");
}

/// The engine the tests run against: `DOCKER_HOST` or the default socket.
pub fn engine_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

/// The engine's unix socket, for a [`SocketProxy`] in front of it.
pub fn engine_socket() -> PathBuf {
    engine_host()
        .strip_prefix("unix://")
        .map(PathBuf::from)
        .expect("the engine proxy forwards to a unix socket (DOCKER_HOST=unix://…)")
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

/// An agent in-process: the store, the informer and one controller.
pub struct Agent<R: Reconciler> {
    pub store: Store,
    pub controller: Arc<R>,
    pub informer: Informer,
    /// The finalizer the agent puts on workloads of this controller's type.
    finalizer: &'static str,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl<R: Reconciler> Agent<R> {
    /// Opens the store in `dir`, builds the controller with `build`, and
    /// starts the informer and the controller runner (4 reconciles at once,
    /// the [`RESYNC`] interval) fed by the runtime events `trigger` gives.
    pub async fn start_with(
        dir: &Path,
        finalizer: &'static str,
        build: impl FnOnce(&Store, &Informer) -> R,
        trigger: impl FnOnce(&R, &Informer) -> BoxStream<'static, String>,
    ) -> Agent<R> {
        let store = Store::open(StoreConfig::new(dir)).expect("open the store");
        let informer = Informer::new(Arc::new(store.clone()));
        let controller = Arc::new(build(&store, &informer));
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
        .with_trigger(trigger(&controller, &informer));
        tasks.push(tokio::spawn(runner.run(shutdown.clone())));
        Agent {
            store,
            controller,
            informer,
            finalizer,
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

    /// Applies `spec` as workload `id` of the controller's type, as the API
    /// server does (with the runtime's finalizer); returns what is stored.
    pub async fn apply_spec(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: workload_spec::Spec,
    ) -> Arc<Workload> {
        let outcome = self
            .store
            .apply(ApplyRequest {
                id: id.to_string(),
                workload_type: R::WORKLOAD_TYPE,
                revision_id: revision.to_string(),
                desired_state: desired,
                spec: WorkloadSpec { spec: Some(spec) },
                finalizers: vec![self.finalizer.to_string()],
                labels: Default::default(),
                caller: Default::default(),
            })
            .await
            .expect("apply");
        match outcome {
            ApplyOutcome::Created(w) | ApplyOutcome::Updated(w) | ApplyOutcome::Unchanged(w) => w,
        }
    }

    /// Waits, following the store's change log, until the workload
    /// satisfies `condition`; panics with the last state and the events
    /// after `timeout`.
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
                    "timed out after {timeout:?} waiting for {id} to be {what}; last state: {:#?}; events: {:#?}",
                    current.map(|w| w.status),
                    self.store.events(id).unwrap_or_default()
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
                    "timed out after {timeout:?} waiting for {id} to leave the store; it is {:#?}; events: {:#?}",
                    self.store.get(id),
                    self.store.events(id).unwrap_or_default()
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

    /// The workload's recorded event with this reason, if any.
    pub fn event(&self, id: &str, reason: &str) -> Option<Event> {
        self.events(id, reason).into_iter().next()
    }

    /// How many times events with this reason were recorded (an event
    /// folds its repeats into a count).
    pub fn event_count(&self, id: &str, reason: &str) -> u32 {
        self.events(id, reason).iter().map(|e| e.count).sum()
    }
}

impl<R: Reconciler> Drop for Agent<R> {
    /// A test that panics stops its controller too, so it does not bring
    /// back what the test's sweep removes.
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A unix socket that forwards to a daemon's socket, which a test can take
/// away and bring back: an outage and restart of the daemon as the
/// controller sees it, without disturbing the daemon other tests are using.
pub struct SocketProxy {
    path: PathBuf,
    upstream: PathBuf,
    /// The accept loop; aborting it drops every forwarded connection.
    running: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl SocketProxy {
    /// A proxy listening at `path` (once started) for `upstream`.
    pub fn new(path: PathBuf, upstream: PathBuf) -> SocketProxy {
        SocketProxy {
            path,
            upstream,
            running: tokio::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `unix://<socket>`: an engine address (`DOCKER_HOST` form) through
    /// the proxy.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Listens and forwards, until [`SocketProxy::stop`].
    pub async fn start(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind the proxy socket");
        let upstream = self.upstream.clone();
        let accept = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut daemon) = tokio::net::UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.running.lock().await = Some(accept);
    }

    /// Stops listening and cuts every forwarded connection.
    pub async fn stop(&self) {
        if let Some(accept) = self.running.lock().await.take() {
            accept.abort();
            let _ = accept.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
