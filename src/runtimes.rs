//! What each runtime's health is, as HealthCheck reports it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use persys_controllers::compose::{ComposeConfig, ComposeController};
use persys_controllers::docker::{DockerConfig, DockerController, HostPathPolicy};
use persys_controllers::vm::{VmConfig, VmController, default_disk_roots};
use persys_controllers::{Controller, ControllerConfig, ControllerObserver, Informer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;

/// `runtime name → "healthy" or the reason it is not`. Written by the
/// runtime probes, read by HealthCheck and metrics.
#[derive(Debug, Clone, Default)]
pub struct RuntimeBoard {
    statuses: Arc<RwLock<BTreeMap<String, String>>>,
    /// Facts shown beside the statuses (e.g. the compose CLI's version);
    /// not runtimes, so not exported as `runtime_up`.
    info: Arc<RwLock<BTreeMap<String, String>>>,
}

pub const HEALTHY: &str = "healthy";

impl RuntimeBoard {
    pub fn set(&self, runtime: &str, status: impl Into<String>) {
        let status = status.into();
        let mut statuses = self.statuses.write().unwrap_or_else(|p| p.into_inner());
        let changed = statuses.get(runtime) != Some(&status);
        if changed {
            if status == HEALTHY {
                tracing::info!(runtime, "runtime healthy");
            } else {
                tracing::warn!(runtime, %status, "runtime unhealthy");
            }
        }
        statuses.insert(runtime.to_string(), status);
    }

    /// Sets a fact shown in HealthCheck's `runtime_status`.
    pub fn set_info(&self, key: &str, value: impl Into<String>) {
        self.info
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), value.into());
    }

    /// Runtime statuses only.
    pub fn statuses(&self) -> BTreeMap<String, String> {
        self.statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Statuses and facts, as HealthCheck reports them.
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        let mut all = self.statuses();
        for (key, value) in self.info.read().unwrap_or_else(|p| p.into_inner()).iter() {
            all.insert(key.clone(), value.clone());
        }
        all
    }

    pub fn is_healthy(&self, runtime: &str) -> bool {
        self.statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(runtime)
            .is_some_and(|s| s == HEALTHY)
    }
}

/// The running controllers and what the server reads from them.
#[derive(Default)]
pub struct Controllers {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub usage: Option<crate::server::UsageLookup>,
}

/// How often each runtime's health is probed for HealthCheck and metrics.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The Docker controller's settings from the agent's configuration.
pub fn docker_config(config: &Config) -> DockerConfig {
    DockerConfig {
        host: Some(config.docker_host.clone()),
        host_paths: host_path_policy(config),
        ..DockerConfig::default()
    }
}

/// The VM controller's settings from the agent's configuration.
pub fn vm_config(config: &Config) -> VmConfig {
    let mut vm = VmConfig::new(config.libvirt_uri.clone(), config.state_path.clone());
    // The same roots the API server checks disk paths against.
    vm.disk_roots = default_disk_roots(&config.state_path);
    vm.stop_timeout = config.vm_stop_timeout;
    vm.domain_type = config.vm_domain_type.clone();
    vm
}

/// Which host paths containers may bind-mount on this node.
pub fn host_path_policy(config: &Config) -> HostPathPolicy {
    HostPathPolicy::new(Some(&config.state_path), config.allowed_host_paths.clone())
}

fn controller_config(config: &Config, observer: Arc<dyn ControllerObserver>) -> ControllerConfig {
    ControllerConfig {
        resync_interval: config
            .reconcile_enabled
            .then_some(config.reconcile_interval),
        observer,
        ..ControllerConfig::default()
    }
}

/// Starts the controller of every enabled runtime. A runtime that cannot be
/// reached does not stop the agent: its controller keeps retrying and the
/// board says why it is unhealthy.
pub fn start_controllers(
    config: &Config,
    store: &Store,
    informer: &Informer,
    board: &RuntimeBoard,
    observer: Arc<dyn ControllerObserver>,
    shutdown: CancellationToken,
) -> Controllers {
    let mut controllers = Controllers::default();
    if config.docker_enabled {
        let docker = Arc::new(DockerController::new(
            docker_config(config),
            Arc::new(store.clone()),
        ));
        let controller = Controller::new(
            docker.clone(),
            informer.clone(),
            Arc::new(store.clone()),
            controller_config(config, observer.clone()),
        )
        .with_trigger(docker.trigger(informer.cache()));
        controllers
            .tasks
            .push(tokio::spawn(controller.run(shutdown.clone())));
        controllers
            .tasks
            .push(tokio::spawn(docker.usage_sampler().run(shutdown.clone())));
        let usage = docker.usage();
        controllers.usage = Some(Arc::new(move |id: &str| usage.get(id)));
        let board = board.clone();
        let stop = shutdown.clone();
        controllers.tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PROBE_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                match docker.ping().await {
                    Ok(_) => board.set("docker", HEALTHY),
                    Err(error) => board.set("docker", format!("unreachable: {error}")),
                }
            }
        }));
    }
    if config.compose_enabled {
        let compose_config = ComposeConfig {
            host: Some(config.docker_host.clone()),
            binary: config.compose_binary.clone(),
            command_timeout: config.compose_timeout,
            ..ComposeConfig::new(&config.state_path)
        };
        let compose = Arc::new(ComposeController::new(
            compose_config,
            Arc::new(store.clone()),
            informer.cache(),
        ));
        let controller = Controller::new(
            compose.clone(),
            informer.clone(),
            Arc::new(store.clone()),
            controller_config(config, observer.clone()),
        )
        .with_trigger(compose.trigger());
        controllers
            .tasks
            .push(tokio::spawn(controller.run(shutdown.clone())));
        let board = board.clone();
        let stop = shutdown.clone();
        controllers.tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PROBE_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let health = compose.probe().await;
                board.set("compose", health.status.clone());
                if let Some(binary) = &health.binary {
                    board.set_info(
                        "compose_binary",
                        format!("{} {}", binary.kind, binary.version),
                    );
                }
            }
        }));
    }
    if config.vm_enabled {
        let vm = Arc::new(VmController::new(
            vm_config(config),
            Arc::new(store.clone()),
        ));
        let controller = Controller::new(
            vm.clone(),
            informer.clone(),
            Arc::new(store.clone()),
            controller_config(config, observer.clone()),
        )
        .with_trigger(vm.trigger(informer.cache()));
        controllers
            .tasks
            .push(tokio::spawn(controller.run(shutdown.clone())));
        controllers
            .tasks
            .push(tokio::spawn(vm.usage_sampler().run(shutdown.clone())));
        let vm_usage = vm.usage();
        let others = controllers.usage.take();
        controllers.usage = Some(Arc::new(move |id: &str| {
            others
                .as_ref()
                .and_then(|lookup| lookup(id))
                .or_else(|| vm_usage.get(id))
        }));
        let board = board.clone();
        let stop = shutdown.clone();
        controllers.tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PROBE_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                board.set("vm", vm.health().await);
            }
        }));
    }
    controllers
}
