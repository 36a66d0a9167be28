//! The Compose controller: makes each compose workload's project run as
//! declared, one level-triggered reconcile at a time.
//!
//! A reconcile renders the project folder from the spec, reads the
//! project's containers from the engine by compose's project label, and
//! runs `up -d --remove-orphans` when the spec hash differs from the one
//! last brought up or a service is not running; `stop` when the desired
//! state is stopped; `down --remove-orphans` (named volumes stay) on delete.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    ListNetworksOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures::stream::BoxStream;
use persys_api::now_ms;
use persys_api::v1::{
    ActualState, ComposeSpec, DesiredState, EventType, Workload, WorkloadType, workload_spec,
};
use tokio::time::Instant;

use super::binary::{self, ComposeBinary, DetectError};
use super::cli::{self, Verb};
use super::command::{CommandRunner, Output, RunError};
use super::config::ComposeConfig;
use super::errors::{ComposeError, FailureReason, Operation, classify_stderr};
use super::events::ProjectEvents;
use super::naming::{self, project_name_of};
use super::observe::{self, Observed, ServiceReport, assess, project_filter};
use super::project::{ProjectDir, ProjectFiles, ProjectIndex, render_env};
use super::services::DeclaredServices;
use super::status::{self, Outcome, Report};
use super::validate::validate_compose_spec;
use crate::controller::{Action, Cleanup, Reconciler};
use crate::crash_loop::{CrashLoop, Gate, RetryGate};
use crate::docker::follow;
use crate::docker::{Engine, EngineVersion};
use crate::informer::Cache;
use crate::kit::{self, Recorder, Workloads};
use crate::source::WorkloadWriter;

/// How soon to look again at a project that is coming up (a service the
/// engine is restarting, one that exited right after `up`): engine events
/// usually come first.
const PENDING_REQUEUE: Duration = Duration::from_secs(5);

/// How soon a workload whose project name another workload owns looks
/// again: nothing else tells it when the owner is gone.
const CONTESTED_REQUEUE: Duration = Duration::from_secs(30);

/// A compose failure remembered while backing off from it.
#[derive(Debug, Clone)]
struct Failure {
    reason: FailureReason,
    message: String,
    detail: String,
}

/// What the controller remembers of one workload between reconciles. None
/// of it needs to survive an agent restart: the spec hash brought up is on
/// disk, back-offs start afresh, and the restart count is carried over from
/// the stored status.
#[derive(Debug, Default)]
struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    spec_hash: String,
    /// Repairs of services that stopped running.
    crash: CrashLoop,
    /// Compose commands that failed.
    failures: RetryGate,
    last_failure: Option<Failure>,
}

/// Why `up` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpReason {
    /// The spec was never brought up, or changed since.
    Spec,
    /// Services stopped running or went missing.
    Repair,
    /// The desired state turned to running after a stop: not a repair.
    Start,
}

/// The result of one convergence, to publish as status.
struct Converged {
    outcome: Outcome,
    services: Option<Vec<ServiceReport>>,
    requeue: Option<Duration>,
    /// A compose failure to hand to the runtime's back-off once the status
    /// says what happened.
    error: Option<ComposeError>,
}

impl Converged {
    fn new(outcome: Outcome, services: Vec<ServiceReport>) -> Converged {
        Converged {
            outcome,
            services: Some(services),
            requeue: None,
            error: None,
        }
    }
}

/// A compose workload ready to act on.
struct Prepared {
    project: String,
    dir: ProjectDir,
    files: ProjectFiles,
    declared: DeclaredServices,
    env: BTreeMap<String, String>,
}

/// What the agent reports for the compose runtime (HealthCheck's
/// `runtime_status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeHealth {
    /// `"healthy"`, or why not.
    pub status: String,
    /// The compose CLI in use: kind and version.
    pub binary: Option<ComposeBinary>,
    pub engine: Option<EngineVersion>,
}

impl ComposeHealth {
    pub const HEALTHY: &'static str = "healthy";

    pub fn is_healthy(&self) -> bool {
        self.status == Self::HEALTHY
    }
}

/// Converges compose projects to the compose workloads.
pub struct ComposeController {
    config: ComposeConfig,
    engine: Engine,
    writer: Arc<dyn WorkloadWriter>,
    /// The informer's cache: which workload owns a project name.
    cache: Cache,
    runner: CommandRunner,
    /// The detected compose CLI. A tokio mutex: held across the detection,
    /// so concurrent reconciles detect once. Empty until a detection
    /// succeeds; cleared when the binary disappears.
    binary: tokio::sync::Mutex<Option<ComposeBinary>>,
    /// What is remembered per workload between reconciles, and since when
    /// each orphan project folder has been seen.
    workloads: Workloads<Memory>,
    events: Recorder,
    /// Project name → workload id of the folders on disk, shared with the
    /// event trigger.
    index: ProjectIndex,
}

impl ComposeController {
    /// A controller writing status through `writer`. Contacts neither the
    /// engine nor the compose CLI: the agent starts, and reports why, while
    /// either is missing.
    pub fn new(config: ComposeConfig, writer: Arc<dyn WorkloadWriter>, cache: Cache) -> Self {
        let engine = Engine::new(config.host.clone());
        let runner = CommandRunner::new(config.max_concurrent_commands, config.command_timeout);
        ComposeController {
            config,
            engine,
            events: Recorder::new(writer.clone()),
            writer,
            cache,
            runner,
            binary: tokio::sync::Mutex::new(None),
            workloads: Workloads::default(),
            index: ProjectIndex::default(),
        }
    }

    pub fn config(&self) -> &ComposeConfig {
        &self.config
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Workload ids to reconcile, from the engine's `/events` for compose
    /// containers (and, on every (re)connect, every compose workload and
    /// every project folder): the trigger for `Controller::with_trigger`.
    pub fn trigger(&self) -> BoxStream<'static, String> {
        follow::trigger(
            self.engine.clone(),
            self.config.events_backoff,
            ProjectEvents {
                cache: self.cache.clone(),
                index: self.index.clone(),
                project_root: self.config.project_root.clone(),
            },
        )
    }

    /// The health probe: the compose CLI (kind, version) and the engine.
    pub async fn probe(&self) -> ComposeHealth {
        let binary = self.binary().await;
        let engine = self.engine.version().await;
        let status = match (&binary, &engine) {
            (Ok(_), Ok(_)) => ComposeHealth::HEALTHY.to_string(),
            (Err(error), _) => error.to_string(),
            (Ok(_), Err(error)) => format!("docker engine unreachable: {error}"),
        };
        ComposeHealth {
            status,
            binary: binary.ok(),
            engine: engine.ok(),
        }
    }

    /// The compose CLI, detected on first use.
    pub async fn binary(&self) -> Result<ComposeBinary, DetectError> {
        let mut cached = self.binary.lock().await;
        if let Some(found) = cached.as_ref() {
            return Ok(found.clone());
        }
        let found = binary::detect(self.config.binary.as_deref(), &self.env(None)).await?;
        tracing::info!(compose = %found, "compose CLI detected");
        *cached = Some(found.clone());
        Ok(found)
    }

    /// The environment of a compose process for a spec's `env` (none: an
    /// orphan's, which compose reads from its `.env`).
    fn env(&self, spec_env: Option<&BTreeMap<String, String>>) -> Vec<(String, String)> {
        let empty = BTreeMap::new();
        cli::environment(
            std::env::vars(),
            self.engine.host(),
            spec_env.unwrap_or(&empty),
        )
    }

    /// The repair count of the workload's current spec, once this process
    /// has reconciled it.
    fn restarts(&self, id: &str) -> Option<i32> {
        self.workloads
            .get(id, |m| {
                (!m.spec_hash.is_empty()).then(|| m.crash.restarts())
            })
            .flatten()
    }

    fn forget(&self, id: &str) {
        self.workloads.forget(id);
        self.index.remove_workload(id);
    }

    /// The spec, checked and rendered into project files.
    fn prepare(&self, workload: &Workload) -> Result<Prepared, ComposeError> {
        let id = workload.id();
        let invalid = |message: String| ComposeError::InvalidSpec {
            id: id.to_string(),
            message,
        };
        let spec: &ComposeSpec = match workload.workload_spec() {
            Some(workload_spec::Spec::Compose(spec)) => spec,
            _ => return Err(invalid("a compose workload needs a compose spec".into())),
        };
        let dir = ProjectDir::for_workload(&self.config.project_root, id)
            .ok_or_else(|| invalid(format!("id {id:?} cannot name a project folder")))?;
        let project = project_name_of(workload).unwrap_or_default();
        if !naming::is_valid_project_name(&project) {
            return Err(invalid(format!(
                "spec.compose.project_name: {project:?} is not a valid compose project name"
            )));
        }
        let declared = validate_compose_spec(spec).map_err(|e| invalid(e.to_string()))?;
        let compose = persys_api::compose_file_text(&spec.compose_yaml)
            .map_err(|why| invalid(format!("spec.compose.compose_yaml {why}")))?;
        Ok(Prepared {
            files: ProjectFiles {
                compose,
                env: render_env(&spec.env),
                project: format!("{project}\n"),
            },
            project,
            dir,
            declared,
            env: spec.env.clone(),
        })
    }

    /// Runs `verb` on a project; a non-zero exit is a classified error.
    async fn run(
        &self,
        id: &str,
        binary: &ComposeBinary,
        project: &str,
        dir: &ProjectDir,
        verb: Verb,
        env: Option<&BTreeMap<String, String>>,
    ) -> Result<Output, ComposeError> {
        let invocation = cli::invocation(binary, project, dir, verb, self.env(env));
        tracing::info!(project, %verb, compose = %binary.command_line(), "running compose");
        let failed = |reason: FailureReason, detail: String| ComposeError::Command {
            id: id.to_string(),
            verb,
            reason,
            detail,
        };
        match self.runner.run(&invocation).await {
            Ok(output) if output.status.success() => {
                if cli::printed_usage(&output.stdout, &output.stderr) {
                    return Err(failed(
                        FailureReason::RuntimeError,
                        format!(
                            "compose printed its usage instead of running: {}",
                            output.stderr.trim()
                        ),
                    ));
                }
                tracing::debug!(project, %verb, took = ?output.took, "compose finished");
                Ok(output)
            }
            Ok(output) => {
                let stderr = output.stderr.trim();
                let detail = if stderr.is_empty() {
                    format!("exited with {}: {}", output.status, output.stdout.trim())
                } else {
                    stderr.to_string()
                };
                Err(failed(classify_stderr(stderr), detail))
            }
            Err(RunError::Spawn { program, source }) => {
                // Uninstalled or replaced: detect again next time.
                *self.binary.lock().await = None;
                Err(failed(
                    FailureReason::RuntimeError,
                    format!("could not start {program}: {source}"),
                ))
            }
            Err(error) => Err(failed(FailureReason::RuntimeError, error.to_string())),
        }
    }

    /// Writes `converged` as the status, if it differs from the stored one;
    /// then hands its error, if any, to the runtime's back-off.
    async fn publish(
        &self,
        workload: &Workload,
        project: &str,
        converged: Converged,
    ) -> Result<Action, ComposeError> {
        let id = workload.id();
        let previous = workload.status_or_default();
        let restarts = self.restarts(id).unwrap_or(previous.restart_count);
        let status = status::build(
            &previous,
            Report {
                outcome: converged.outcome,
                generation: workload.generation(),
                project,
                services: converged.services.as_deref(),
                restarts,
            },
        );
        let written =
            kit::publish_status(self.writer.as_ref(), workload, status, converged.requeue).await;
        match (converged.error, written) {
            // The reconcile's own error goes to the runtime's back-off, even
            // when the status that reports it could not be written.
            (Some(error), _) => Err(error),
            (None, Ok(action)) => Ok(action),
            (None, Err(source)) => Err(ComposeError::Store {
                id: id.to_string(),
                source,
            }),
        }
    }

    /// Reports an error that stopped the reconcile and hands it to the
    /// runtime's back-off: `Unknown` for an unreachable engine, `Failed`
    /// otherwise. Desired state is never touched.
    async fn publish_error(
        &self,
        workload: &Workload,
        project: &str,
        error: ComposeError,
    ) -> Result<Action, ComposeError> {
        let outcome = match &error {
            ComposeError::Unreachable { .. } => Outcome::Unknown {
                detail: error.detail(),
            },
            other => Outcome::Failed {
                reason: other.reason(),
                message: other.detail(),
                detail: other.detail(),
                due_ms: None,
            },
        };
        let converged = Converged {
            outcome,
            services: None,
            requeue: None,
            error: Some(error),
        };
        self.publish(workload, project, converged).await
    }

    /// Brings the engine in line with a live workload.
    async fn converge(
        &self,
        docker: &Docker,
        workload: &Workload,
        prepared: &Prepared,
    ) -> Result<Converged, ComposeError> {
        let id = workload.id();
        let hash = workload.spec_hash();
        let first_sight = self.workloads.with(id, |m| {
            let fresh = m.spec_hash.is_empty();
            if m.spec_hash != hash {
                let carried = if fresh {
                    workload
                        .status
                        .as_ref()
                        .map(|s| s.restart_count)
                        .unwrap_or(0)
                } else {
                    0
                };
                *m = Memory {
                    spec_hash: hash.clone(),
                    crash: CrashLoop::new(carried),
                    ..Default::default()
                };
            }
            fresh
        });

        let observed = observe::observe(docker, id, &prepared.project).await?;
        if first_sight && !observed.is_empty() {
            let count = observed.containers().count();
            tracing::info!(project = %prepared.project, containers = count, "adopted an existing compose project");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Adopted",
                    format!(
                        "adopted compose project {} ({count} containers)",
                        prepared.project
                    ),
                )
                .await;
        }
        match workload.desired_state() {
            DesiredState::Stopped => self.converge_stopped(docker, id, prepared, observed).await,
            DesiredState::Running | DesiredState::Unspecified => {
                self.converge_running(docker, workload, prepared, observed, &hash)
                    .await
            }
        }
    }

    async fn converge_stopped(
        &self,
        docker: &Docker,
        id: &str,
        prepared: &Prepared,
        observed: Observed,
    ) -> Result<Converged, ComposeError> {
        // A later start is a fresh start, not a repair.
        self.workloads.with(id, |m| {
            let restarts = m.crash.restarts();
            m.crash = CrashLoop::new(restarts);
        });
        if !observed.any_up() {
            let reports = assess(&prepared.declared, &observed);
            return Ok(Converged::new(Outcome::Stopped, reports));
        }
        if let Some(waiting) = self.backing_off(id, &prepared.declared, &observed) {
            return Ok(waiting);
        }
        let binary = self.binary_for(id).await?;
        if let Err(error) = self
            .run(
                id,
                &binary,
                &prepared.project,
                &prepared.dir,
                Verb::Stop,
                Some(&prepared.env),
            )
            .await
        {
            return Ok(self.failed(id, &prepared.declared, &observed, error).await);
        }
        self.succeeded(id);
        // Containers of services no longer in the file are not stopped by
        // `compose stop`.
        let observed = observe::observe(docker, id, &prepared.project).await?;
        for container in observed.containers().filter(|c| c.state.is_up()) {
            tracing::info!(container = %container.name, "stopping a container compose left running");
            docker
                .stop_container(&container.id, None::<StopContainerOptions>)
                .await
                .map_err(|e| ComposeError::engine(id, Operation::StopContainer, e))?;
        }
        self.events
            .event(
                id,
                EventType::Normal,
                "Stopped",
                format!("stopped compose project {}", prepared.project),
            )
            .await;
        let observed = observe::observe(docker, id, &prepared.project).await?;
        Ok(Converged::new(
            Outcome::Stopped,
            assess(&prepared.declared, &observed),
        ))
    }

    async fn converge_running(
        &self,
        docker: &Docker,
        workload: &Workload,
        prepared: &Prepared,
        observed: Observed,
        hash: &str,
    ) -> Result<Converged, ComposeError> {
        let id = workload.id();
        let reports = assess(&prepared.declared, &observed);
        let brought_up = prepared.dir.recorded_hash().await;
        let unsatisfied: Vec<&ServiceReport> =
            reports.iter().filter(|r| !r.is_satisfied()).collect();
        let reason = if brought_up.as_deref() != Some(hash) {
            UpReason::Spec
        } else if unsatisfied.is_empty() {
            self.succeeded(id);
            return Ok(Converged::new(Outcome::Running, reports));
        } else if workload.status.as_ref().map(|s| s.actual_state()) == Some(ActualState::Stopped) {
            UpReason::Start
        } else if unsatisfied.iter().all(|r| r.state == "restarting") {
            // The engine is restarting them (a compose `restart:` policy).
            let mut converged = Converged::new(
                Outcome::Pending {
                    message: format!("restarting: {}", names(&unsatisfied)),
                },
                reports,
            );
            converged.requeue = Some(PENDING_REQUEUE);
            return Ok(converged);
        } else {
            UpReason::Repair
        };

        if let Some(waiting) = self.backing_off(id, &prepared.declared, &observed) {
            return Ok(waiting);
        }
        if reason == UpReason::Repair {
            let (now, now_wall) = (Instant::now(), now_ms());
            let policy = self.config.crash_loop;
            let gate = self.workloads.with(id, |m| m.crash.gate(&policy, now));
            if let Gate::Closed {
                delay,
                remaining,
                due_ms,
            } = gate
            {
                let mut converged = Converged::new(
                    Outcome::BackingOff {
                        message: format!(
                            "back-off {}s restarting: {}",
                            delay.as_secs().max(1),
                            describe(&unsatisfied)
                        ),
                        due_ms,
                    },
                    reports,
                );
                converged.requeue = Some(remaining);
                return Ok(converged);
            }
            for service in &unsatisfied {
                let (kind, reason, message) = match (service.state, service.orphan) {
                    (_, true) => (
                        EventType::Normal,
                        "RemovingOrphans",
                        format!("service {} is no longer in the compose file", service.name),
                    ),
                    ("missing", _) => (
                        EventType::Warning,
                        "ServiceMissing",
                        format!("service {} has no container; recreating it", service.name),
                    ),
                    (state, _) => (
                        EventType::Warning,
                        "ServiceExited",
                        match service.exit_code {
                            Some(code) => {
                                format!("service {} {state} with code {code}", service.name)
                            }
                            None => format!("service {} is {state}", service.name),
                        },
                    ),
                };
                self.events.event(id, kind, reason, message).await;
            }
            self.workloads
                .with(id, |m| m.crash.restarted(now, now_wall));
        } else {
            let (now, now_wall) = (Instant::now(), now_ms());
            self.workloads.with(id, |m| m.crash.started(now, now_wall));
        }

        let binary = self.binary_for(id).await?;
        if let Err(error) = self
            .run(
                id,
                &binary,
                &prepared.project,
                &prepared.dir,
                Verb::Up,
                Some(&prepared.env),
            )
            .await
        {
            let observed = observe::observe(docker, id, &prepared.project).await?;
            return Ok(self.failed(id, &prepared.declared, &observed, error).await);
        }
        self.succeeded(id);
        prepared
            .dir
            .record_hash(hash)
            .await
            .map_err(|source| ComposeError::Files {
                id: id.to_string(),
                path: prepared.dir.path().to_path_buf(),
                source,
            })?;
        let observed = observe::observe(docker, id, &prepared.project).await?;
        let reports = assess(&prepared.declared, &observed);
        let message = match reason {
            UpReason::Spec => format!(
                "compose project {} is up (revision {})",
                prepared.project,
                workload.revision_id()
            ),
            UpReason::Repair => format!(
                "compose project {} repaired: {}",
                prepared.project,
                names(&unsatisfied)
            ),
            UpReason::Start => format!("compose project {} started", prepared.project),
        };
        self.events
            .event(id, EventType::Normal, "Up", message)
            .await;
        let still: Vec<&ServiceReport> = reports.iter().filter(|r| !r.is_satisfied()).collect();
        if still.is_empty() {
            return Ok(Converged::new(Outcome::Running, reports));
        }
        let message = format!("waiting for services: {}", describe(&still));
        let mut converged = Converged::new(Outcome::Pending { message }, reports);
        converged.requeue = Some(PENDING_REQUEUE);
        Ok(converged)
    }

    /// The compose CLI, or why there is none, as the workload's error.
    async fn binary_for(&self, id: &str) -> Result<ComposeBinary, ComposeError> {
        self.binary()
            .await
            .map_err(|source| ComposeError::NoBinary {
                id: id.to_string(),
                source,
            })
    }

    /// While a failed command's back-off lasts: the failure again, and when
    /// to look next. Engine events do not shorten it.
    fn backing_off(
        &self,
        id: &str,
        declared: &DeclaredServices,
        observed: &Observed,
    ) -> Option<Converged> {
        let backoff = self.config.failure_backoff;
        let (gate, failure) = self.workloads.with(id, |m| {
            (
                m.failures.gate(&backoff, Duration::MAX, Instant::now()),
                m.last_failure.clone(),
            )
        });
        let (
            Gate::Closed {
                remaining, due_ms, ..
            },
            Some(failure),
        ) = (gate, failure)
        else {
            return None;
        };
        let mut converged = Converged::new(
            Outcome::Failed {
                reason: failure.reason,
                message: failure.message,
                detail: failure.detail,
                due_ms: Some(due_ms),
            },
            assess(declared, observed),
        );
        converged.requeue = Some(remaining);
        Some(converged)
    }

    /// Counts a failed command and reports it (status and a
    /// `ComposeFailed` event); the error goes to the runtime's back-off
    /// once the status is written.
    async fn failed(
        &self,
        id: &str,
        declared: &DeclaredServices,
        observed: &Observed,
        error: ComposeError,
    ) -> Converged {
        let reason = error.reason();
        let detail = match &error {
            ComposeError::Command { detail, .. } => detail.clone(),
            other => other.detail(),
        };
        let message = match &error {
            ComposeError::Command { verb, .. } => format!(
                "compose {verb} failed ({reason}): {}",
                last_line(&detail).unwrap_or("no output")
            ),
            other => other.detail(),
        };
        let backoff = self.config.failure_backoff;
        let (now, now_wall) = (Instant::now(), now_ms());
        let gate = self.workloads.with(id, |m| {
            m.failures.counted(now, now_wall);
            m.last_failure = Some(Failure {
                reason,
                message: message.clone(),
                detail: detail.clone(),
            });
            m.failures.gate(&backoff, Duration::MAX, now)
        });
        let due_ms = match gate {
            Gate::Closed { due_ms, .. } => Some(due_ms),
            Gate::Open => None,
        };
        tracing::warn!(%error, "compose failed");
        self.events
            .event(
                id,
                EventType::Warning,
                "ComposeFailed",
                format!("{message}\n{}", status::keep_end(&detail, 1024)),
            )
            .await;
        Converged {
            outcome: Outcome::Failed {
                reason,
                message,
                detail,
                due_ms,
            },
            services: Some(assess(declared, observed)),
            requeue: None,
            error: Some(error),
        }
    }

    /// A command succeeded: the failure back-off is over.
    fn succeeded(&self, id: &str) {
        self.workloads.with(id, |m| {
            if m.last_failure.is_some() || m.failures.attempts() > 0 {
                m.failures = RetryGate::default();
                m.last_failure = None;
            }
        });
    }

    /// Takes a project down: `compose down --remove-orphans` when the folder
    /// and a compose CLI allow, then whatever is left of it (containers,
    /// networks; never volumes) through the engine, so a delete completes
    /// even when the compose file no longer parses.
    async fn take_down(
        &self,
        docker: &Docker,
        id: &str,
        project: &str,
        dir: &ProjectDir,
        env: Option<&BTreeMap<String, String>>,
    ) -> Result<(), ComposeError> {
        if dir.exists().await {
            match self.binary().await {
                Ok(binary) => {
                    if let Err(error) = self.run(id, &binary, project, dir, Verb::Down, env).await {
                        tracing::warn!(%error, "compose down failed; removing what is left through the engine");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "no compose CLI; removing the project through the engine");
                }
            }
        }
        let observed = observe::observe(docker, id, project).await?;
        for container in observed.containers() {
            tracing::info!(container = %container.name, "removing a container compose left behind");
            match docker
                .remove_container(
                    &container.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: false,
                        link: false,
                    }),
                )
                .await
            {
                Ok(()) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(ComposeError::engine(id, Operation::RemoveContainer, e)),
            }
        }
        let networks = docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(project_filter(project)),
            }))
            .await
            .map_err(|e| ComposeError::engine(id, Operation::ListNetworks, e))?;
        for network in networks {
            let Some(name) = network.id.or(network.name) else {
                continue;
            };
            match docker.remove_network(&name).await {
                Ok(()) => {}
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(ComposeError::engine(id, Operation::RemoveNetwork, e)),
            }
        }
        Ok(())
    }

    /// A spec renamed its project: the old one is taken down first, with
    /// the files it was brought up from (still on disk).
    async fn take_down_renamed(
        &self,
        docker: &Docker,
        id: &str,
        prepared: &Prepared,
    ) -> Result<(), ComposeError> {
        let Some(previous) = prepared.dir.recorded_project().await else {
            return Ok(());
        };
        if previous == prepared.project {
            return Ok(());
        }
        let workloads = self.cache.list_type(WorkloadType::Compose);
        if naming::owner(&previous, &workloads).is_some_and(|w| w.id() != id) {
            // Another workload runs that name now.
            return Ok(());
        }
        tracing::info!(from = %previous, to = %prepared.project, "the project was renamed; taking the old one down");
        self.take_down(docker, id, &previous, &prepared.dir, Some(&prepared.env))
            .await?;
        self.events
            .event(
                id,
                EventType::Normal,
                "ProjectRenamed",
                format!(
                    "took down compose project {previous}; the workload now runs as {}",
                    prepared.project
                ),
            )
            .await;
        Ok(())
    }

    fn files_error(&self, id: &str, dir: &ProjectDir, source: std::io::Error) -> ComposeError {
        ComposeError::Files {
            id: id.to_string(),
            path: dir.path().to_path_buf(),
            source,
        }
    }
}

/// `web, db`.
fn names(services: &[&ServiceReport]) -> String {
    services
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `web exited (code 3), db missing`.
fn describe(services: &[&ServiceReport]) -> String {
    services
        .iter()
        .map(|s| match s.exit_code {
            Some(code) => format!("{} {} (code {code})", s.name, s.state),
            None => format!("{} {}", s.name, s.state),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}

impl Reconciler for ComposeController {
    type Error = ComposeError;

    fn name(&self) -> &'static str {
        "compose"
    }

    fn is_runtime_unreachable(&self, error: &ComposeError) -> bool {
        matches!(error, ComposeError::Unreachable { .. })
    }

    fn workload_type(&self) -> WorkloadType {
        WorkloadType::Compose
    }

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, ComposeError> {
        let id = workload.id();
        self.workloads.claimed(id);
        let fallback_project = project_name_of(&workload).unwrap_or_default();
        let prepared = match self.prepare(&workload) {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::warn!(%error, "invalid spec; not acting on it");
                let converged = Converged {
                    outcome: Outcome::Failed {
                        reason: FailureReason::InvalidSpec,
                        message: error.detail(),
                        detail: error.detail(),
                        due_ms: None,
                    },
                    services: None,
                    requeue: None,
                    error: None,
                };
                return self.publish(&workload, &fallback_project, converged).await;
            }
        };
        let workloads = self.cache.list_type(WorkloadType::Compose);
        if let Some(owner) = naming::owner(&prepared.project, &workloads)
            && owner.id() != id
        {
            let message = format!(
                "compose project {} is already run by workload {}",
                prepared.project,
                owner.id()
            );
            tracing::warn!(%message, "project name taken; not acting");
            let converged = Converged {
                outcome: Outcome::Failed {
                    reason: FailureReason::InvalidSpec,
                    message: message.clone(),
                    detail: message,
                    due_ms: None,
                },
                services: None,
                requeue: Some(CONTESTED_REQUEUE),
                error: None,
            };
            return self.publish(&workload, &prepared.project, converged).await;
        }
        let docker = match self.engine.client().await {
            Ok(docker) => docker,
            Err(e) => {
                let error = ComposeError::engine(id, Operation::Connect, e);
                return self
                    .publish_error(&workload, &prepared.project, error)
                    .await;
            }
        };
        if let Err(error) = self.take_down_renamed(&docker, id, &prepared).await {
            return self
                .publish_error(&workload, &prepared.project, error)
                .await;
        }
        if let Err(source) = prepared.dir.write(&prepared.files).await {
            let error = self.files_error(id, &prepared.dir, source);
            return self
                .publish_error(&workload, &prepared.project, error)
                .await;
        }
        self.index.insert(&prepared.project, id);
        match self.converge(&docker, &workload, &prepared).await {
            Ok(converged) => self.publish(&workload, &prepared.project, converged).await,
            Err(error) => {
                self.publish_error(&workload, &prepared.project, error)
                    .await
            }
        }
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, ComposeError> {
        let id = workload.id();
        let Some(dir) = ProjectDir::for_workload(&self.config.project_root, id) else {
            self.forget(id);
            return Ok(Cleanup::Done);
        };
        let project = dir
            .recorded_project()
            .await
            .or_else(|| project_name_of(&workload))
            .unwrap_or_default();
        let workloads = self.cache.list_type(WorkloadType::Compose);
        let taken_over = naming::owner(&project, &workloads).is_some_and(|w| w.id() != id);
        if !taken_over && naming::is_valid_project_name(&project) {
            let docker = self
                .engine
                .client()
                .await
                .map_err(|e| ComposeError::engine(id, Operation::Connect, e))?;
            // `down` with the current spec when it renders; else with what
            // is on disk. No folder: nothing was brought up from one (or a
            // cleanup already ran), and none is made just to be removed.
            let env = match self.prepare(&workload) {
                Ok(prepared) if prepared.project == project && dir.exists().await => {
                    prepared
                        .dir
                        .write(&prepared.files)
                        .await
                        .map_err(|source| self.files_error(id, &dir, source))?;
                    Some(prepared.env)
                }
                _ => None,
            };
            tracing::info!(%project, "taking the project down: the workload is deleted");
            self.take_down(&docker, id, &project, &dir, env.as_ref())
                .await?;
        }
        dir.remove()
            .await
            .map_err(|source| self.files_error(id, &dir, source))?;
        self.forget(id);
        Ok(Cleanup::Done)
    }

    async fn reconcile_missing(&self, id: &str) -> Result<Action, ComposeError> {
        let Some(dir) = ProjectDir::for_workload(&self.config.project_root, id) else {
            return Ok(Action::await_change());
        };
        if !tokio::fs::try_exists(dir.path()).await.unwrap_or(false) {
            self.forget(id);
            return Ok(Action::await_change());
        }
        let project = dir
            .recorded_project()
            .await
            .unwrap_or_else(|| naming::derive_project_name(id));
        let workloads = self.cache.list_type(WorkloadType::Compose);
        if naming::owner(&project, &workloads).is_some() {
            // Another workload runs this project now: the folder is all
            // that is left of this one.
            dir.remove()
                .await
                .map_err(|source| self.files_error(id, &dir, source))?;
            self.forget(id);
            return Ok(Action::await_change());
        }
        if let Some(remaining) = self
            .workloads
            .orphan_grace_left(id, self.config.orphan_grace)
        {
            tracing::debug!(%project, ?remaining, "orphan compose project within its grace period");
            return Ok(Action::requeue(remaining));
        }
        let docker = self
            .engine
            .client()
            .await
            .map_err(|e| ComposeError::engine(id, Operation::Connect, e))?;
        tracing::info!(%project, grace = ?self.config.orphan_grace, "taking down an orphan compose project: its workload is gone");
        self.take_down(&docker, id, &project, &dir, None).await?;
        dir.remove()
            .await
            .map_err(|source| self.files_error(id, &dir, source))?;
        self.forget(id);
        Ok(Action::await_change())
    }
}
