#![allow(dead_code)] // each test binary uses part of the support module
//! Harness for the Docker controller's tests: a real engine, a real fjall
//! store in a temporary directory, and the real informer and controller
//! runner in-process.
//!
//! Tests run in parallel against one engine, so every test gets its own
//! scope (the `persys.scope` label: its controller never sees another test's
//! containers) and unique workload ids, and a [`Sweep`] that removes
//! whatever the test left behind, even when it fails.

#[path = "../harness/mod.rs"]
mod harness;
#[allow(unused_imports)] // each test binary uses part of it
pub use harness::{
    DEFAULT_TEST_IMAGE, RESYNC, SocketProxy, engine_host, engine_socket, eventually, exec_in,
    exec_probe, running, skip, status, stopped, test_image, unique,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerSummary;
use bollard::query_parameters::{
    ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};
use persys_api::v1::{ContainerSpec, DesiredState, Workload, workload_spec};
use persys_controllers::backoff::Backoff;
use persys_controllers::docker::{CrashLoopPolicy, DockerConfig, DockerController, labels};

/// A client of the engine, or `None` when there is none and this is not CI
/// (the test is then skipped, loudly). In CI a missing engine or test image
/// fails the test.
pub async fn docker_or_skip(test: &str) -> Option<Docker> {
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
        Err(error) => {
            skip(test, "the Docker engine or the test image", &error);
            None
        }
    }
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

/// An agent in-process: the store, the informer and the Docker controller.
pub type Agent = harness::Agent<DockerController>;

impl Agent {
    /// Opens the store in `dir` and starts the informer and the controller
    /// with its engine-event trigger.
    pub async fn start(dir: &Path, config: DockerConfig) -> Agent {
        Agent::start_with(
            dir,
            persys_api::FINALIZER_DOCKER,
            |store, _| DockerController::new(config, Arc::new(store.clone())),
            |controller, informer| controller.trigger(informer.cache()),
        )
        .await
    }

    pub async fn apply(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: ContainerSpec,
    ) -> Arc<Workload> {
        self.apply_spec(id, revision, desired, workload_spec::Spec::Container(spec))
            .await
    }

    /// Applies `id` as a container that sleeps for an hour.
    pub async fn apply_sleeper(&self, id: &str) -> Arc<Workload> {
        self.apply(
            id,
            "r1",
            DesiredState::Running,
            shell_spec("exec sleep 3600"),
        )
        .await
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

    /// An agent that reaches the engine through a proxy socket the test
    /// can take away and bring back, without disturbing the real engine
    /// that other tests are using.
    pub async fn agent_behind_proxy(&self) -> (Agent, SocketProxy) {
        let proxy = SocketProxy::new(self.dir.path().join("docker.sock"), engine_socket());
        proxy.start().await;
        let config = DockerConfig {
            host: Some(proxy.unix_url()),
            ..self.config()
        };
        (Agent::start(&self.state_dir(), config).await, proxy)
    }
}
