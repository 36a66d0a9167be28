#![allow(dead_code)] // the tests and the benchmark each use part of it
//! Harness for the Compose controller's tests: a real engine, the real
//! compose CLI, a real fjall store in a temporary directory, and the real
//! informer and controller runner in-process.
//!
//! Tests run in parallel against one engine (also with the Docker
//! controller's tests), so every project name is unique to its test, and a
//! [`Sweep`] removes whatever a test left behind, even when it fails.

#[path = "../harness/mod.rs"]
mod harness;
#[allow(unused_imports)] // each test binary uses part of it
pub use harness::{
    DEFAULT_TEST_IMAGE, RESYNC, SocketProxy, engine_host, engine_socket, eventually, exec_in,
    exec_probe, running, skip, status, stopped, test_image, unique,
};

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
use persys_api::v1::{ComposeSpec, DesiredState, Workload, workload_spec};
use persys_controllers::backoff::Backoff;
use persys_controllers::compose::observe::PROJECT_LABEL;
use persys_controllers::compose::{ComposeConfig, ComposeController, binary};
use persys_controllers::docker::CrashLoopPolicy;

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
        Err(error) => {
            skip(
                test,
                "the Docker engine, the test image or the compose CLI",
                &error,
            );
            None
        }
    }
}

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
pub type Agent = harness::Agent<ComposeController>;

impl Agent {
    /// Opens the store in `state` and starts the informer and the
    /// controller with its engine-event trigger.
    pub async fn start(state: &Path, config: ComposeConfig) -> Agent {
        Agent::start_with(
            state,
            persys_api::FINALIZER_COMPOSE,
            |store, informer| {
                ComposeController::new(config, Arc::new(store.clone()), informer.cache())
            },
            |controller, _| controller.trigger(),
        )
        .await
    }

    pub async fn apply(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: ComposeSpec,
    ) -> Arc<Workload> {
        self.apply_spec(id, revision, desired, workload_spec::Spec::Compose(spec))
            .await
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
        probes: Default::default(),
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
