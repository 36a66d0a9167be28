//! The runtimes of this node: which workload types run here, how each is
//! started and probed ([`Registry`]), and what each one's health is, as
//! HealthCheck reports it ([`RuntimeBoard`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::BoxStream;
use persys_api::v1::WorkloadType;
use persys_controllers::compose::usage::UsageSampler as ComposeUsageSampler;
use persys_controllers::compose::{ComposeConfig, ComposeController};
use persys_controllers::docker::usage::RunningContainers;
use persys_controllers::docker::{DockerConfig, DockerController};
use persys_controllers::io::WorkloadIo;
use persys_controllers::policy::NodePolicy;
use persys_controllers::probes::Prober;
use persys_controllers::vm::{VmConfig, VmController, default_disk_roots};
use persys_controllers::{Controller, ControllerConfig, ControllerObserver, Informer, Reconciler};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::tasks::Tasks;

/// One workload type's runtime, as the agent's wiring sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    pub kind: WorkloadType,
    /// Its name on the health board, in metrics and in HealthCheck.
    pub name: &'static str,
    /// The variable that turns it on or off.
    pub variable: &'static str,
    /// The finalizer its controller holds on every workload of its type.
    pub finalizer: &'static str,
    pub enabled: bool,
}

/// Every runtime the agent knows, in one place: the server (which types
/// it accepts), the scheduler link (which types it offers) and the
/// controllers' start-up ask it instead of keeping lists of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    runtimes: [Runtime; 3],
}

impl Registry {
    pub fn new(config: &Config) -> Self {
        let runtime = |kind, name, variable, enabled| Runtime {
            kind,
            name,
            variable,
            finalizer: WorkloadType::finalizer(kind).unwrap_or_default(),
            enabled,
        };
        Registry {
            runtimes: [
                runtime(
                    WorkloadType::Container,
                    "docker",
                    "PERSYS_DOCKER_ENABLED",
                    config.docker_enabled,
                ),
                runtime(
                    WorkloadType::Compose,
                    "compose",
                    "PERSYS_COMPOSE_ENABLED",
                    config.compose_enabled,
                ),
                runtime(
                    WorkloadType::Vm,
                    "vm",
                    "PERSYS_VM_ENABLED",
                    config.vm_enabled,
                ),
            ],
        }
    }

    /// Every runtime, enabled or not.
    pub fn all(&self) -> impl Iterator<Item = &Runtime> {
        self.runtimes.iter()
    }

    pub fn enabled(&self) -> impl Iterator<Item = &Runtime> {
        self.runtimes.iter().filter(|r| r.enabled)
    }

    /// The runtime of a workload type (an unspecified type is a container).
    pub fn get(&self, kind: WorkloadType) -> &Runtime {
        match kind {
            WorkloadType::Container | WorkloadType::Unspecified => &self.runtimes[0],
            WorkloadType::Compose => &self.runtimes[1],
            WorkloadType::Vm => &self.runtimes[2],
        }
    }
}

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
    pub io: WorkloadIoSet,
}

/// Each enabled runtime's logs, exec and console, by workload type.
#[derive(Clone, Default)]
pub struct WorkloadIoSet {
    container: Option<Arc<dyn WorkloadIo>>,
    compose: Option<Arc<dyn WorkloadIo>>,
    vm: Option<Arc<dyn WorkloadIo>>,
}

impl WorkloadIoSet {
    pub fn set(&mut self, kind: WorkloadType, io: Arc<dyn WorkloadIo>) {
        match kind {
            WorkloadType::Container | WorkloadType::Unspecified => self.container = Some(io),
            WorkloadType::Compose => self.compose = Some(io),
            WorkloadType::Vm => self.vm = Some(io),
        }
    }

    /// The runtime of a workload type, when it is enabled.
    pub fn get(&self, kind: WorkloadType) -> Option<Arc<dyn WorkloadIo>> {
        match kind {
            WorkloadType::Container | WorkloadType::Unspecified => self.container.clone(),
            WorkloadType::Compose => self.compose.clone(),
            WorkloadType::Vm => self.vm.clone(),
        }
    }
}

/// HealthCheck's `runtime_status` key saying how container and compose
/// usage is read on this host (`cgroup v2 (systemd driver)`, or `docker
/// stats: …` and why).
pub const CONTAINER_USAGE_INFO: &str = "container_usage";

/// How often each runtime's health is probed for HealthCheck and metrics.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The Docker controller's settings from the agent's configuration and
/// the node's workload policy.
pub fn docker_config(config: &Config, policy: &NodePolicy) -> DockerConfig {
    DockerConfig {
        host: Some(config.docker_host.clone()),
        scope: config.docker_scope.clone(),
        host_paths: crate::policy::host_path_policy(config, policy),
        pull_timeout: config.pull_timeout,
        pull_concurrency: usize::from(config.max_concurrent_pulls),
        registry_auth: Some(config.registry_auth()),
        usage_interval: config.usage_interval,
        ..DockerConfig::default()
    }
}

/// `DOCKER_CONFIG` for compose: the directory of the registry auth file
/// named by `PERSYS_REGISTRY_AUTH_FILE`, when it is named `config.json`
/// (the only name compose reads). None otherwise: compose then reads the
/// agent's own `DOCKER_CONFIG` or `$HOME/.docker`, which is where the
/// default file is looked for anyway.
pub fn compose_docker_config(config: &Config) -> Option<PathBuf> {
    let named = config.registry_auth_file.as_deref()?;
    if named.file_name()? != "config.json" {
        return None;
    }
    named.parent().map(Path::to_path_buf)
}

/// The VM controller's settings from the agent's configuration.
pub fn vm_config(config: &Config) -> VmConfig {
    let mut vm = VmConfig::new(config.libvirt_uri.clone(), config.state_path.clone());
    // The same roots the API server checks disk paths against.
    vm.disk_roots = default_disk_roots(&config.state_path);
    vm.stop_timeout = config.vm_stop_timeout;
    vm.domain_type = config.vm_domain_type.clone();
    vm.usage_interval = config.usage_interval;
    vm
}

fn controller_config(config: &Config, observer: Arc<dyn ControllerObserver>) -> ControllerConfig {
    ControllerConfig {
        resync_interval: config
            .reconcile_enabled
            .then_some(config.reconcile_interval),
        observer,
        concurrency: usize::from(config.max_concurrent_reconciles),
        ..ControllerConfig::default()
    }
}

/// What every runtime's start-up shares: the agent's settings for its
/// controller, and where its tasks go.
struct Starter<'a> {
    config: &'a Config,
    policy: &'a NodePolicy,
    store: &'a Store,
    informer: &'a Informer,
    board: &'a RuntimeBoard,
    observer: Arc<dyn ControllerObserver>,
    tasks: &'a Tasks,
    shutdown: CancellationToken,
    controllers: Controllers,
    /// One prober for the Docker and Compose controllers' probes: one
    /// timer wheel and one bound on checks in flight for the node. Its task
    /// starts with the first probe registered, and ends with the
    /// controllers.
    prober: Prober,
    /// One list of the engine's running containers per usage round, for
    /// the Docker and Compose samplers both.
    running: Arc<RunningContainers>,
}

impl Starter<'_> {
    /// Runs a runtime's controller, woken by the informer and `trigger`.
    fn controller<R: Reconciler>(
        &mut self,
        reconciler: Arc<R>,
        trigger: BoxStream<'static, String>,
    ) {
        let controller = Controller::new(
            reconciler,
            self.informer.clone(),
            Arc::new(self.store.clone()),
            controller_config(self.config, self.observer.clone()),
        )
        .with_trigger(trigger);
        self.spawn(
            format!("{}-controller", R::NAME),
            controller.run(self.shutdown.clone()),
        );
    }

    /// Runs `task` as the background task `name`, watched.
    fn spawn(&mut self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(name, task);
        self.controllers.tasks.push(handle);
    }

    /// Probes a runtime every [`PROBE_INTERVAL`] until shutdown; `probe`
    /// writes what it found on the board.
    fn probe<F, Fut>(&mut self, runtime: &str, probe: F)
    where
        F: Fn(RuntimeBoard) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let board = self.board.clone();
        let stop = self.shutdown.clone();
        self.spawn(format!("{runtime}-probe"), async move {
            let mut ticker = tokio::time::interval(PROBE_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                probe(board.clone()).await;
            }
        });
    }

    /// Adds a runtime's usage samples to what the server can look up.
    fn usage(
        &mut self,
        lookup: impl Fn(&str) -> Option<persys_api::v1::WorkloadUsageSnapshot> + Send + Sync + 'static,
    ) {
        let others = self.controllers.usage.take();
        self.controllers.usage = Some(Arc::new(move |id: &str| {
            others
                .as_ref()
                .and_then(|lookup| lookup(id))
                .or_else(|| lookup(id))
        }));
    }

    fn docker(&mut self) {
        let auth = self.config.registry_auth();
        tracing::info!(
            file = %auth.path.display(),
            named = auth.required,
            "registry credentials for pulls come from this Docker config file"
        );
        let docker = Arc::new(
            DockerController::new(
                docker_config(self.config, self.policy),
                Arc::new(self.store.clone()),
            )
            .with_prober(self.prober.clone()),
        );
        self.controller(docker.clone(), docker.trigger(self.informer.cache()));
        self.controllers
            .io
            .set(WorkloadType::Container, Arc::new(docker.io()));
        self.spawn(
            "docker-usage-sampler".into(),
            docker
                .usage_sampler()
                .sharing(self.running.clone())
                .run(self.shutdown.clone()),
        );
        let usage = docker.usage();
        self.usage({
            let usage = usage.clone();
            move |id| usage.get(id)
        });
        self.probe("docker", move |board| {
            let docker = docker.clone();
            let usage = usage.clone();
            async move {
                match docker.ping().await {
                    Ok(_) => board.set("docker", HEALTHY),
                    Err(error) => board.set("docker", format!("unreachable: {error}")),
                }
                if let Some(source) = usage.source() {
                    board.set_info(CONTAINER_USAGE_INFO, source);
                }
            }
        });
    }

    fn compose(&mut self) {
        if let Some(named) = &self.config.registry_auth_file
            && compose_docker_config(self.config).is_none()
        {
            tracing::warn!(
                file = %named.display(),
                "compose pulls do not use PERSYS_REGISTRY_AUTH_FILE: compose reads only a file named config.json"
            );
        }
        let compose_config = ComposeConfig {
            host: Some(self.config.docker_host.clone()),
            binary: self.config.compose_binary.clone(),
            command_timeout: self.config.compose_timeout,
            // The same host-path rule as containers.
            host_paths: crate::policy::host_path_policy(self.config, self.policy),
            docker_config: compose_docker_config(self.config),
            ..ComposeConfig::new(&self.config.state_path)
        };
        let compose = Arc::new(
            ComposeController::new(
                compose_config,
                Arc::new(self.store.clone()),
                self.informer.cache(),
            )
            .with_prober(self.prober.clone()),
        );
        self.controller(compose.clone(), compose.trigger());
        self.controllers
            .io
            .set(WorkloadType::Compose, Arc::new(compose.io()));
        let sampler = ComposeUsageSampler::new(
            compose.engine().clone(),
            self.informer.cache(),
            self.config.usage_interval,
            DockerConfig::default().usage_concurrency,
        )
        .sharing(self.running.clone());
        let usage = sampler.snapshots();
        self.spawn(
            "compose-usage-sampler".into(),
            sampler.run(self.shutdown.clone()),
        );
        self.usage({
            let usage = usage.clone();
            move |id| usage.get(id)
        });
        self.probe("compose", move |board| {
            let compose = compose.clone();
            let usage = usage.clone();
            async move {
                let health = compose.probe().await;
                board.set("compose", health.status.clone());
                // The same engine as containers: one line, whichever
                // sampler chose first.
                if let Some(source) = usage.source() {
                    board.set_info(CONTAINER_USAGE_INFO, source);
                }
                if let Some(binary) = &health.binary {
                    board.set_info(
                        "compose_binary",
                        format!("{} {}", binary.kind, binary.version),
                    );
                }
            }
        });
    }

    fn vm(&mut self) {
        let vm = Arc::new(VmController::new(
            vm_config(self.config),
            Arc::new(self.store.clone()),
        ));
        self.controller(vm.clone(), vm.trigger(self.informer.cache()));
        self.controllers.io.set(WorkloadType::Vm, Arc::new(vm.io()));
        self.spawn(
            "vm-usage-sampler".into(),
            vm.usage_sampler().run(self.shutdown.clone()),
        );
        self.spawn(
            "vm-console-log-rotator".into(),
            persys_controllers::vm::rotate_console_logs(
                self.config.state_path.clone(),
                self.shutdown.clone(),
            ),
        );
        let usage = vm.usage();
        self.usage(move |id| usage.get(id));
        self.probe("vm", move |board| {
            let vm = vm.clone();
            async move { board.set("vm", vm.health().await) }
        });
    }
}

/// Starts the controller of every runtime the configuration enables (its
/// [`Registry`]). A runtime that cannot be reached does not stop the agent:
/// its controller keeps retrying and the board says why it is unhealthy.
pub fn start_controllers(
    config: &Config,
    policy: &NodePolicy,
    store: &Store,
    informer: &Informer,
    board: &RuntimeBoard,
    observer: Arc<dyn ControllerObserver>,
    tasks: &Tasks,
) -> Controllers {
    let mut starter = Starter {
        config,
        policy,
        store,
        informer,
        board,
        observer,
        tasks,
        shutdown: tasks.stop().clone(),
        controllers: Controllers::default(),
        prober: Prober::default(),
        running: RunningContainers::for_interval(config.usage_interval),
    };
    for runtime in Registry::new(config).enabled() {
        match runtime.kind {
            WorkloadType::Container | WorkloadType::Unspecified => starter.docker(),
            WorkloadType::Compose => starter.compose(),
            WorkloadType::Vm => starter.vm(),
        }
    }
    starter.controllers
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_registry_knows_every_type_its_variable_and_finalizer_and_follows_the_config() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--docker-enabled",
            "true",
            "--compose-enabled",
            "false",
            "--vm-enabled",
            "true",
        ])
        .unwrap();
        let registry = Registry::new(&config);
        let enabled: Vec<_> = registry.enabled().map(|r| r.name).collect();
        assert_eq!(enabled, ["docker", "vm"]);
        assert_eq!(registry.get(WorkloadType::Unspecified).name, "docker");
        // Each variable is the one the configuration reads, and each
        // finalizer the one its type's controller holds.
        let variables: Vec<_> = Config::command()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        for runtime in registry.all() {
            assert_eq!(registry.get(runtime.kind), runtime);
            assert!(
                variables.iter().any(|v| v == runtime.variable),
                "{runtime:?}"
            );
            assert_eq!(Some(runtime.finalizer), runtime.kind.finalizer());
        }
    }

    #[test]
    fn pulls_and_compose_take_credentials_from_the_named_auth_file() {
        let named = |path: &str| {
            Config::try_parse_from_iter(["persys-agent", "--registry-auth-file", path]).unwrap()
        };
        let config = named("/etc/persys/registry/config.json");
        let auth = docker_config(&config, &NodePolicy::default())
            .registry_auth
            .unwrap();
        assert_eq!(auth.path, PathBuf::from("/etc/persys/registry/config.json"));
        assert!(auth.required);
        assert_eq!(
            compose_docker_config(&config),
            Some(PathBuf::from("/etc/persys/registry"))
        );
        // Compose reads only a file named config.json.
        assert_eq!(compose_docker_config(&named("/etc/persys/pull.json")), None);
        let unnamed = Config::try_parse_from_iter(["persys-agent"]).unwrap();
        assert_eq!(compose_docker_config(&unnamed), None);
    }

    #[test]
    fn the_docker_controller_gets_the_pull_deadline_and_the_agents_forbidden_paths() {
        let config = Config::try_parse_from_iter([
            "persys-agent",
            "--pull-timeout",
            "90s",
            "--docker-host",
            "unix:///srv/engine/docker.sock",
            "--max-concurrent-pulls",
            "3",
            "--max-concurrent-reconciles",
            "16",
        ])
        .unwrap();
        let docker = docker_config(&config, &NodePolicy::default());
        assert_eq!(docker.pull_timeout, Duration::from_secs(90));
        assert_eq!(docker.pull_concurrency, 3);
        assert_eq!(docker.scope, "default");
        let controller = controller_config(&config, Arc::new(persys_controllers::NoObserver));
        assert_eq!(controller.concurrency, 16);
        let auth = docker.registry_auth.unwrap();
        assert!(!auth.required, "the default auth file may be absent");
        let socket = docker
            .host_paths
            .check("/srv/engine/docker.sock")
            .unwrap_err();
        assert!(socket.contains("whatever the policy"), "{socket}");
    }
}
