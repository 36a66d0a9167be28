//! The Docker controller: makes the engine's containers match the container
//! workloads, one level-triggered reconcile at a time.

use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary};
use bollard::query_parameters::{CreateContainerOptions, StartContainerOptions};
use futures::stream::BoxStream;
use persys_api::now_ms;
use persys_api::v1::{
    ContainerSpec, DesiredState, EventType, Workload, WorkloadType, workload_spec,
};
use tokio::time::Instant;

use super::config::DockerConfig;
use super::container;
use super::credentials::credentials_for;
use super::engine::{Engine, EngineVersion};
use super::errors::{DockerError, FailureReason, Operation};
use super::events::ContainerEvents;
use super::follow;
use super::image::{ImageReference, PullPolicy};
use super::labels::{self, Marks};
use super::observed::Observed;
use super::restart::{ExitDecision, RestartRule};
use super::spec::{create_body, stop_grace, volume_requests};
use super::status::{self, Outcome, Report};
use super::usage::{UsageSampler, UsageSnapshots};
use super::validate::{SpecError, validate_container_spec};
use crate::controller::{Action, Cleanup, Reconciler};
use crate::crash_loop::{CrashLoop, Gate, RetryGate};
use crate::informer::Cache;
use crate::kit::{self, Failed, Recorder, Workloads};
use crate::source::WorkloadWriter;

/// How soon to look again at a container in a passing state (stopping,
/// being removed).
const TRANSIENT_REQUEUE: Duration = Duration::from_secs(1);

/// What the controller remembers of one workload between reconciles. None of
/// it needs to survive an agent restart: kubelet forgets its back-offs too,
/// and the restart count is carried over from the stored status.
#[derive(Debug, Default)]
struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    spec_hash: String,
    crash: CrashLoop,
    /// Pull attempts of `pull_image`.
    pull: RetryGate,
    pull_image: String,
    /// Why the last pull, create or start failed, reported while backing off.
    last_failure: Option<(FailureReason, String)>,
    /// The spec failed in a way no retry fixes (the engine answered 400).
    terminal: Option<(FailureReason, String)>,
}

/// How a convergence stopped short of the desired state.
type Halt = kit::Halt<DockerError>;

impl From<DockerError> for Halt {
    fn from(error: DockerError) -> Self {
        Halt::Error(error)
    }
}

/// The result of one convergence, to publish as status.
struct Converged {
    outcome: Outcome,
    container: Option<ContainerInspectResponse>,
    requeue: Option<Duration>,
    log_tail: Option<String>,
}

impl Converged {
    fn new(outcome: Outcome, container: Option<ContainerInspectResponse>) -> Self {
        Converged {
            outcome,
            container,
            requeue: None,
            log_tail: None,
        }
    }
}

/// Converges Docker containers to the container workloads.
pub struct DockerController {
    config: DockerConfig,
    engine: Engine,
    writer: Arc<dyn WorkloadWriter>,
    /// What is remembered per workload between reconciles, and orphans.
    workloads: Workloads<Memory>,
    events: Recorder,
    /// The last usage sample of each running workload.
    usage: UsageSnapshots,
    /// Containers as last seen, valid until an event or a change of ours.
    observed: Arc<Observed>,
}

impl DockerController {
    /// A controller writing status through `writer`. Does not contact the
    /// engine: the agent starts, and reports `Unknown`, while it is down.
    pub fn new(config: DockerConfig, writer: Arc<dyn WorkloadWriter>) -> Self {
        let engine = Engine::new(config.host.clone());
        DockerController {
            config,
            engine,
            events: Recorder::new(writer.clone()),
            writer,
            workloads: Workloads::default(),
            usage: UsageSnapshots::default(),
            observed: Arc::new(Observed::default()),
        }
    }

    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The health probe: the engine's version, or why it cannot be reached.
    pub async fn ping(&self) -> Result<EngineVersion, EngineError> {
        self.engine.version().await
    }

    /// Workload ids to reconcile, from the engine's `/events` (and, on every
    /// (re)connect, every container workload in `cache` and every managed
    /// container): the trigger to pass to `Controller::with_trigger`.
    pub fn trigger(&self, cache: Cache) -> BoxStream<'static, String> {
        follow::trigger(
            self.engine.clone(),
            self.config.events_backoff,
            ContainerEvents {
                scope: self.config.scope.clone(),
                cache,
                observed: self.observed.clone(),
            },
        )
    }

    /// Engine calls the observation cache saved so far.
    pub fn observations_reused(&self) -> u64 {
        self.observed
            .reused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last usage samples, for the API server.
    pub fn usage(&self) -> UsageSnapshots {
        self.usage.clone()
    }

    /// The sampler filling [`DockerController::usage`]; run it in a task.
    pub fn usage_sampler(&self) -> UsageSampler {
        UsageSampler {
            engine: self.engine.clone(),
            scope: self.config.scope.clone(),
            interval: self.config.usage_interval,
            concurrency: self.config.usage_concurrency.max(1),
            snapshots: self.usage.clone(),
        }
    }

    /// The restart count of the workload's current spec, once this process
    /// has reconciled it.
    fn restarts(&self, id: &str) -> Option<i32> {
        self.workloads
            .get(id, |m| {
                (!m.spec_hash.is_empty()).then(|| m.crash.restarts())
            })
            .flatten()
    }

    /// The container spec, validated.
    fn container_spec<'w>(&self, workload: &'w Workload) -> Result<&'w ContainerSpec, SpecError> {
        match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => {
                validate_container_spec(spec, &self.config.host_paths)?;
                Ok(spec)
            }
            _ => Err(SpecError::new(
                "spec.container",
                "a container workload needs a container spec",
            )),
        }
    }

    /// Writes `converged` as the status, if it differs from the stored one.
    async fn publish(
        &self,
        workload: &Workload,
        image: &str,
        converged: Converged,
    ) -> Result<Action, DockerError> {
        let id = workload.id();
        let previous = workload.status_or_default();
        let restarts = self.restarts(id).unwrap_or(previous.restart_count);
        let status = status::build(
            &previous,
            Report {
                outcome: converged.outcome,
                generation: workload.generation(),
                image,
                container: converged.container.as_ref(),
                restarts,
                log_tail: converged.log_tail,
            },
        );
        kit::publish_status(self.writer.as_ref(), workload, status, converged.requeue)
            .await
            .map_err(|source| DockerError::Store {
                id: id.to_string(),
                source,
            })
    }

    /// Reports an error that stopped the reconcile and hands it to the
    /// runtime's back-off: `Unknown` for an unreachable engine, `Failed`
    /// otherwise. Desired state is never touched.
    async fn publish_error(
        &self,
        workload: &Workload,
        image: &str,
        error: DockerError,
    ) -> Result<Action, DockerError> {
        let outcome = match &error {
            DockerError::Unreachable { .. } => Outcome::Unknown {
                detail: error.detail(),
            },
            other => Outcome::Failed {
                reason: other.reason(),
                detail: other.detail(),
                due_ms: None,
            },
        };
        if let Err(write_error) = self
            .publish(workload, image, Converged::new(outcome, None))
            .await
        {
            tracing::warn!(error = %write_error, "reporting a failure failed");
        }
        Err(error)
    }

    /// Brings the engine in line with a live workload.
    async fn converge(
        &self,
        docker: &Docker,
        workload: &Workload,
        spec: &ContainerSpec,
    ) -> Result<Converged, Halt> {
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

        let found = self
            .observed
            .list_for(docker, &self.config.scope, id)
            .await?;
        let (current, stale) = partition(found, &hash);
        let mut current = current.into_iter();
        let keep = current.next();
        for duplicate in current {
            if let Some(cid) = duplicate.id.as_deref() {
                tracing::warn!(container = cid, "removing a duplicate container");
                self.observed.invalidate();
                container::remove(docker, id, cid).await?;
            }
        }
        let inspected = match &keep {
            Some(summary) => self.observed.inspect(docker, id, summary).await?,
            None => None,
        };
        if first_sight && let Some(found) = &inspected {
            let name = display_name(found);
            tracing::info!(container = %name, "adopted an existing container");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Adopted",
                    format!("adopted container {name}"),
                )
                .await;
        }

        match workload.desired_state() {
            DesiredState::Stopped => {
                self.remove_stale(docker, workload, &stale).await?;
                self.converge_stopped(docker, workload, spec, inspected)
                    .await
            }
            DesiredState::Running | DesiredState::Unspecified => {
                self.converge_running(docker, workload, spec, inspected, stale)
                    .await
            }
        }
    }

    async fn converge_stopped(
        &self,
        docker: &Docker,
        workload: &Workload,
        spec: &ContainerSpec,
        inspected: Option<ContainerInspectResponse>,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        // A later start is a fresh start, not a crash-loop restart.
        self.workloads.with(id, |m| {
            let restarts = m.crash.restarts();
            m.crash = CrashLoop::new(restarts);
        });
        let Some(found) = inspected else {
            return Ok(Converged::new(Outcome::Stopped, None));
        };
        let cid = found.id.clone().unwrap_or_default();
        if matches!(
            state_of(&found),
            Some(
                ContainerStateStatusEnum::RUNNING
                    | ContainerStateStatusEnum::PAUSED
                    | ContainerStateStatusEnum::RESTARTING
            )
        ) {
            let grace = stop_grace(spec);
            tracing::info!(container = %cid, ?grace, "stopping: desired state is stopped");
            self.observed.invalidate();
            container::stop(docker, id, &cid, Some(grace)).await?;
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Stopped",
                    format!("stopped container {}", display_name(&found)),
                )
                .await;
        }
        let found = container::inspect(docker, id, &cid).await?;
        Ok(Converged::new(Outcome::Stopped, found))
    }

    async fn converge_running(
        &self,
        docker: &Docker,
        workload: &Workload,
        spec: &ContainerSpec,
        inspected: Option<ContainerInspectResponse>,
        stale: Vec<ContainerSummary>,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        let Some(found) = inspected else {
            return self.create_and_start(docker, workload, spec, stale).await;
        };
        self.remove_stale(docker, workload, &stale).await?;
        let cid = found.id.clone().unwrap_or_default();
        match state_of(&found) {
            Some(ContainerStateStatusEnum::RUNNING) => {
                Ok(Converged::new(Outcome::Running, Some(found)))
            }
            Some(ContainerStateStatusEnum::PAUSED) => {
                tracing::info!(container = %cid, "unpausing");
                self.observed.invalidate();
                docker
                    .unpause_container(&cid)
                    .await
                    .map_err(|e| DockerError::engine(id, Operation::Unpause, e))?;
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Unpaused",
                        format!("unpaused container {}", display_name(&found)),
                    )
                    .await;
                let found = container::inspect(docker, id, &cid).await?;
                Ok(Converged::new(Outcome::Running, found))
            }
            Some(ContainerStateStatusEnum::CREATED) => {
                self.start(docker, workload, &found, StartKind::First).await
            }
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
                self.restart_exited(docker, workload, spec, found).await
            }
            // Restarting (the engine's own policy, which the agent never
            // sets), stopping, being removed: look again shortly.
            _ => {
                let mut converged = Converged::new(
                    Outcome::Failed {
                        reason: FailureReason::RuntimeError,
                        detail: format!(
                            "container is {}",
                            state_of(&found).map(|s| s.to_string()).unwrap_or_default()
                        ),
                        due_ms: None,
                    },
                    Some(found),
                );
                converged.requeue = Some(TRANSIENT_REQUEUE);
                Ok(converged)
            }
        }
    }

    /// Decides what becomes of an exited container, and restarts it when its
    /// policy and the crash-loop back-off say so.
    async fn restart_exited(
        &self,
        docker: &Docker,
        workload: &Workload,
        spec: &ContainerSpec,
        found: ContainerInspectResponse,
    ) -> Result<Converged, Halt> {
        self.observed.invalidate();
        let id = workload.id();
        let cid = found.id.clone().unwrap_or_default();
        let exit_code = found.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0);
        let restarts = self.workloads.with(id, |m| m.crash.restarts());
        match RestartRule::of(spec).decide(exit_code, restarts) {
            ExitDecision::Completed => Ok(Converged::new(Outcome::Completed, Some(found))),
            ExitDecision::GaveUp { limit_reached } => {
                let detail = if limit_reached {
                    format!("container exited; restart limit of {restarts} reached")
                } else {
                    "container exited; its restart policy is no".to_string()
                };
                let mut converged = Converged::new(
                    Outcome::Failed {
                        reason: FailureReason::ContainerExited,
                        detail,
                        due_ms: None,
                    },
                    Some(found),
                );
                converged.log_tail =
                    container::tail_log(docker, &cid, self.config.log_tail_lines).await;
                Ok(converged)
            }
            ExitDecision::Restart => {
                let gate = self.workloads.with(id, |m| {
                    m.crash.gate(&self.config.crash_loop, Instant::now())
                });
                if let Gate::Closed {
                    delay,
                    remaining,
                    due_ms,
                } = gate
                {
                    let name = display_name(&found);
                    let mut converged = Converged::new(
                        Outcome::BackingOff {
                            exit_code,
                            delay,
                            due_ms,
                        },
                        Some(found),
                    );
                    converged.requeue = Some(remaining);
                    converged.log_tail =
                        container::tail_log(docker, &cid, self.config.log_tail_lines).await;
                    self.events
                        .event(
                            id,
                            EventType::Warning,
                            "BackOff",
                            format!("back-off restarting failed container {name}"),
                        )
                        .await;
                    return Ok(converged);
                }
                if state_of(&found) == Some(ContainerStateStatusEnum::DEAD) {
                    // A dead container cannot start again: replace it.
                    container::remove(docker, id, &cid).await?;
                    self.workloads
                        .with(id, |m| m.crash.restarted(Instant::now(), now_ms()));
                    return self
                        .create_and_start(docker, workload, spec, Vec::new())
                        .await;
                }
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Restarting",
                        format!(
                            "restarting container {} (exit code {exit_code})",
                            display_name(&found)
                        ),
                    )
                    .await;
                self.start(docker, workload, &found, StartKind::Restart)
                    .await
            }
        }
    }

    /// Starts an existing container.
    async fn start(
        &self,
        docker: &Docker,
        workload: &Workload,
        found: &ContainerInspectResponse,
        kind: StartKind,
    ) -> Result<Converged, Halt> {
        self.observed.invalidate();
        let id = workload.id();
        let cid = found.id.clone().unwrap_or_default();
        if let Some((reason, detail)) = self.workloads.with(id, |m| m.terminal.clone()) {
            return Ok(Converged::new(
                Outcome::Failed {
                    reason,
                    detail,
                    due_ms: None,
                },
                Some(found.clone()),
            ));
        }
        if kind == StartKind::First {
            // A start that failed before (a port taken…) waits its back-off.
            self.gate_start(id)?;
        }
        tracing::info!(container = %cid, restart = (kind == StartKind::Restart), "starting");
        let started = docker
            .start_container(&cid, None::<StartContainerOptions>)
            .await;
        let now = (Instant::now(), now_ms());
        match started {
            Ok(()) => {
                self.workloads.with(id, |m| {
                    match kind {
                        StartKind::First => m.crash.started(now.0, now.1),
                        StartKind::Restart => m.crash.restarted(now.0, now.1),
                    }
                    m.last_failure = None;
                });
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Started",
                        format!("started container {}", display_name(found)),
                    )
                    .await;
                self.after_start(docker, id, &cid).await
            }
            Err(e) => {
                let error = DockerError::engine(id, Operation::Start, e);
                Err(self.failed_attempt(id, error).await)
            }
        }
    }

    /// Creates the workload's container (pulling its image and replacing any
    /// container of an older spec first) and starts it.
    async fn create_and_start(
        &self,
        docker: &Docker,
        workload: &Workload,
        spec: &ContainerSpec,
        stale: Vec<ContainerSummary>,
    ) -> Result<Converged, Halt> {
        self.observed.invalidate();
        let id = workload.id();
        if let Some((reason, detail)) = self.workloads.with(id, |m| m.terminal.clone()) {
            return Ok(Converged::new(
                Outcome::Failed {
                    reason,
                    detail,
                    due_ms: None,
                },
                None,
            ));
        }
        self.gate_start(id)?;
        // Pull before replacing, so a bad new image leaves the old
        // container running.
        self.ensure_image(docker, id, spec).await?;
        self.remove_stale(docker, workload, &stale).await?;
        for request in volume_requests(workload, spec, &self.config.scope) {
            docker
                .create_volume(request)
                .await
                .map_err(|e| DockerError::engine(id, Operation::CreateVolume, e))?;
        }

        let name = labels::container_name(id);
        let body = create_body(workload, spec, &self.config.scope);
        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await;
        let created = match created {
            Ok(created) => created,
            Err(e) => {
                let mut error = DockerError::engine(id, Operation::Create, e);
                if let DockerError::Engine { source, .. } = &error
                    && matches!(
                        source,
                        EngineError::DockerResponseServerError {
                            status_code: 409,
                            ..
                        }
                    )
                {
                    // The name is held by a container the agent does not
                    // manage (its own would have been listed).
                    error = DockerError::Engine {
                        id: id.to_string(),
                        operation: Operation::Create,
                        reason: FailureReason::RuntimeError,
                        source: EngineError::DockerResponseServerError {
                            status_code: 409,
                            message: format!(
                                "the container name {name:?} is taken by a container persys does not manage"
                            ),
                        },
                    };
                }
                return Err(self.failed_attempt(id, error).await);
            }
        };
        tracing::info!(container = %created.id, %name, "created");
        self.events
            .event(
                id,
                EventType::Normal,
                "Created",
                format!("created container {name}"),
            )
            .await;
        let found = container::inspect(docker, id, &created.id)
            .await?
            .unwrap_or_else(|| ContainerInspectResponse {
                id: Some(created.id.clone()),
                name: Some(name),
                ..Default::default()
            });
        self.start(docker, workload, &found, StartKind::First).await
    }

    /// Refuses a start while the back-off of failed starts runs.
    fn gate_start(&self, id: &str) -> Result<(), Halt> {
        let policy = self.config.crash_loop;
        self.workloads
            .with(id, |m| {
                kit::start_gate(
                    &mut m.crash,
                    m.last_failure.as_ref(),
                    &policy,
                    Instant::now(),
                )
            })
            .map_err(Halt::from)
    }

    /// Turns a failed create or start into what is reported: terminal
    /// failures are remembered; others wait the crash-loop back-off.
    async fn failed_attempt(&self, id: &str, error: DockerError) -> Halt {
        if matches!(error, DockerError::Unreachable { .. }) {
            return Halt::Error(error);
        }
        let reason = error.reason();
        let detail = error.detail();
        tracing::warn!(%error, "container did not start");
        self.events
            .event(id, EventType::Warning, "Failed", detail.clone())
            .await;
        let policy = self.config.crash_loop;
        let now = (Instant::now(), now_ms());
        let failed = self.workloads.with(id, |m| {
            if reason.is_terminal() {
                m.terminal = Some((reason, detail.clone()));
            }
            kit::failed_start(
                &mut m.crash,
                &mut m.last_failure,
                reason,
                &detail,
                &policy,
                now,
            )
        });
        Halt::from(failed)
    }

    /// Makes sure the engine has the spec's image, pulling as its policy says
    /// and backing off between failed pulls.
    async fn ensure_image(
        &self,
        docker: &Docker,
        id: &str,
        spec: &ContainerSpec,
    ) -> Result<(), Halt> {
        let policy = PullPolicy::parse(&spec.image_pull_policy).unwrap_or(PullPolicy::IfNotPresent);
        if policy != PullPolicy::Always && container::image_present(docker, id, &spec.image).await?
        {
            return Ok(());
        }
        let backoff = self.config.pull_backoff;
        let gate = self.workloads.with(id, |m| {
            if m.pull_image != spec.image {
                m.pull_image = spec.image.clone();
                m.pull = RetryGate::default();
            }
            m.pull.gate(&backoff, Duration::MAX, Instant::now())
        });
        if let Gate::Closed {
            remaining, due_ms, ..
        } = gate
        {
            let (reason, detail) = self
                .workloads
                .with(id, |m| m.last_failure.clone())
                .unwrap_or((
                    FailureReason::ImagePullFailed,
                    format!("back-off pulling image {}", spec.image),
                ));
            return Err(Halt::Failed(Failed {
                reason,
                detail,
                retry_in: Some(remaining),
                due_ms: Some(due_ms),
            }));
        }
        let result = if policy == PullPolicy::Never {
            Err((
                FailureReason::ImageNotFound,
                format!(
                    "image {} is not on this node and the pull policy is Never",
                    spec.image
                ),
            ))
        } else {
            self.pull(docker, id, &spec.image).await?
        };
        let (now, now_wall) = (Instant::now(), now_ms());
        match result {
            Ok(()) => {
                self.workloads.with(id, |m| {
                    m.pull = RetryGate::default();
                    m.last_failure = None;
                });
                Ok(())
            }
            Err((reason, detail)) => {
                let gate = self.workloads.with(id, |m| {
                    m.pull.counted(now, now_wall);
                    m.last_failure = Some((reason, detail.clone()));
                    m.pull.gate(&backoff, Duration::MAX, Instant::now())
                });
                let (retry_in, due_ms) = match gate {
                    Gate::Closed {
                        remaining, due_ms, ..
                    } => (Some(remaining), Some(due_ms)),
                    Gate::Open => (Some(Duration::ZERO), None),
                };
                Err(Halt::Failed(Failed {
                    reason,
                    detail,
                    retry_in,
                    due_ms,
                }))
            }
        }
    }

    /// One pull: `Ok(Err(..))` is a failed pull to report, `Err` an engine
    /// that could not be reached.
    async fn pull(
        &self,
        docker: &Docker,
        id: &str,
        image: &str,
    ) -> Result<Result<(), (FailureReason, String)>, DockerError> {
        let reference = match ImageReference::parse(image) {
            Ok(reference) => reference,
            Err(message) => return Ok(Err((FailureReason::InvalidSpec, message))),
        };
        let credentials = match &self.config.registry_auth_file {
            Some(path) => match credentials_for(path, reference.registry()).await {
                Ok(credentials) => credentials,
                Err(message) => {
                    return Ok(Err((
                        FailureReason::ImagePullFailed,
                        format!("registry credentials: {message}"),
                    )));
                }
            },
            None => None,
        };
        self.events
            .event(
                id,
                EventType::Normal,
                "Pulling",
                format!("pulling image {image}"),
            )
            .await;
        let started = Instant::now();
        match container::pull(docker, id, &reference, credentials).await {
            Ok(()) => {
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Pulled",
                        format!(
                            "pulled image {image} in {:.1}s",
                            started.elapsed().as_secs_f64()
                        ),
                    )
                    .await;
                Ok(Ok(()))
            }
            Err(error @ DockerError::Unreachable { .. }) => Err(error),
            Err(error) => {
                let detail = format!("pulling image {image}: {}", error.detail());
                tracing::warn!(%error, "pull failed");
                self.events
                    .event(id, EventType::Warning, "Failed", detail.clone())
                    .await;
                Ok(Err((error.reason(), detail)))
            }
        }
    }

    /// Stops and removes containers of an older spec.
    async fn remove_stale(
        &self,
        docker: &Docker,
        workload: &Workload,
        stale: &[ContainerSummary],
    ) -> Result<(), DockerError> {
        let id = workload.id();
        if !stale.is_empty() {
            self.observed.invalidate();
        }
        for old in stale {
            let Some(cid) = old.id.as_deref() else {
                continue;
            };
            let marks = Marks::read(old.labels.as_ref());
            tracing::info!(container = cid, old_revision = ?marks.revision, "replacing: the spec changed");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Replacing",
                    format!(
                        "spec changed (revision {} → {}); replacing the container",
                        marks.revision.as_deref().unwrap_or("?"),
                        workload.revision_id()
                    ),
                )
                .await;
            // The old container's own stop timeout (its spec's grace).
            container::stop_and_remove(docker, id, cid, None).await?;
        }
        Ok(())
    }

    /// After a start: what the container is doing now.
    async fn after_start(&self, docker: &Docker, id: &str, cid: &str) -> Result<Converged, Halt> {
        let found = container::inspect(docker, id, cid).await?;
        match found.as_ref().and_then(state_of) {
            Some(ContainerStateStatusEnum::RUNNING) | None => {
                Ok(Converged::new(Outcome::Running, found))
            }
            // It exited already: the next reconcile applies the restart
            // policy.
            Some(state) => {
                let mut converged = Converged::new(
                    Outcome::Pending {
                        message: format!("container is {state} right after its start"),
                    },
                    found,
                );
                converged.requeue = Some(Duration::ZERO);
                Ok(converged)
            }
        }
    }
}

/// Which start a container is getting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartKind {
    /// Its first: after create, or of a container whose start failed.
    First,
    /// After it exited: counts as a restart.
    Restart,
}

fn state_of(container: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
    container.state.as_ref().and_then(|s| s.status)
}

fn display_name(container: &ContainerInspectResponse) -> String {
    container
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_string())
        .or_else(|| {
            container
                .id
                .as_ref()
                .map(|id| id.chars().take(12).collect())
        })
        .unwrap_or_default()
}

/// Splits a workload's containers into those of the current spec (newest
/// first; running ones before others) and those of an older spec.
fn partition(
    containers: Vec<ContainerSummary>,
    spec_hash: &str,
) -> (Vec<ContainerSummary>, Vec<ContainerSummary>) {
    let (mut current, stale): (Vec<_>, Vec<_>) = containers
        .into_iter()
        .partition(|c| Marks::read(c.labels.as_ref()).spec_hash.as_deref() == Some(spec_hash));
    current.sort_by_key(|c| {
        let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
        (
            std::cmp::Reverse(running),
            std::cmp::Reverse(c.created.unwrap_or(0)),
        )
    });
    (current, stale)
}

impl Reconciler for DockerController {
    type Error = DockerError;

    fn name(&self) -> &'static str {
        "docker"
    }

    fn is_runtime_unreachable(&self, error: &DockerError) -> bool {
        matches!(error, DockerError::Unreachable { .. })
    }

    fn workload_type(&self) -> WorkloadType {
        WorkloadType::Container
    }

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, DockerError> {
        let id = workload.id();
        self.workloads.claimed(id);
        let image = match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => spec.image.clone(),
            _ => String::new(),
        };
        let spec = match self.container_spec(&workload) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::warn!(%error, "invalid spec; not acting on it");
                let converged = Converged::new(
                    Outcome::Failed {
                        reason: FailureReason::InvalidSpec,
                        detail: error.to_string(),
                        due_ms: None,
                    },
                    None,
                );
                return self.publish(&workload, &image, converged).await;
            }
        };
        let docker = match self.engine.client().await {
            Ok(docker) => docker,
            Err(e) => {
                let error = DockerError::engine(id, Operation::Connect, e);
                return self.publish_error(&workload, &image, error).await;
            }
        };
        match self.converge(&docker, &workload, spec).await {
            Ok(converged) => self.publish(&workload, &image, converged).await,
            Err(Halt::Failed(Failed {
                reason,
                detail,
                retry_in,
                due_ms,
            })) => {
                let current = container::list_for(&docker, &self.config.scope, id)
                    .await
                    .ok()
                    .and_then(|found| partition(found, &workload.spec_hash()).0.into_iter().next());
                let found = match current.and_then(|c| c.id) {
                    Some(cid) => container::inspect(&docker, id, &cid).await.ok().flatten(),
                    None => None,
                };
                let mut converged = Converged::new(
                    Outcome::Failed {
                        reason,
                        detail,
                        due_ms,
                    },
                    found,
                );
                converged.requeue = retry_in.map(|d| d.max(Duration::from_millis(10)));
                self.publish(&workload, &image, converged).await
            }
            Err(Halt::Error(error)) => self.publish_error(&workload, &image, error).await,
        }
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, DockerError> {
        self.observed.invalidate();
        let id = workload.id();
        let docker = self
            .engine
            .client()
            .await
            .map_err(|e| DockerError::engine(id, Operation::Connect, e))?;
        let grace = match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => Some(stop_grace(spec)),
            _ => None,
        };
        for found in container::list_for(&docker, &self.config.scope, id).await? {
            if let Some(cid) = found.id.as_deref() {
                tracing::info!(container = cid, "removing: the workload is deleted");
                container::stop_and_remove(&docker, id, cid, grace).await?;
            }
        }
        container::remove_volumes(&docker, &self.config.scope, id).await?;
        self.workloads.forget(id);
        self.usage.remove(id);
        Ok(Cleanup::Done)
    }

    async fn reconcile_missing(&self, id: &str) -> Result<Action, DockerError> {
        self.observed.invalidate();
        let docker = self
            .engine
            .client()
            .await
            .map_err(|e| DockerError::engine(id, Operation::Connect, e))?;
        let found = container::list_for(&docker, &self.config.scope, id).await?;
        if found.is_empty() {
            self.workloads.forget(id);
            self.usage.remove(id);
            return Ok(Action::await_change());
        }
        if let Some(left) = self
            .workloads
            .orphan_grace_left(id, self.config.orphan_grace)
        {
            tracing::debug!(remaining = ?left, "orphan container within its grace period");
            return Ok(Action::requeue(left));
        }
        for orphan in found {
            if let Some(cid) = orphan.id.as_deref() {
                tracing::info!(
                    container = cid,
                    "removing an orphan: no workload for {:?}",
                    self.config.orphan_grace
                );
                container::stop_and_remove(&docker, id, cid, None).await?;
            }
        }
        container::remove_volumes(&docker, &self.config.scope, id).await?;
        self.workloads.forget(id);
        self.usage.remove(id);
        Ok(Action::await_change())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerSummaryStateEnum;
    use std::collections::HashMap;

    fn summary(
        id: &str,
        hash: &str,
        created: i64,
        state: ContainerSummaryStateEnum,
    ) -> ContainerSummary {
        ContainerSummary {
            id: Some(id.into()),
            created: Some(created),
            state: Some(state),
            labels: Some(HashMap::from([
                (labels::MANAGED.to_string(), "true".to_string()),
                (labels::SPEC_HASH.to_string(), hash.to_string()),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn partition_prefers_the_running_then_newest_container_of_the_current_spec() {
        let (current, stale) = partition(
            vec![
                summary("old-spec", "h0", 5, ContainerSummaryStateEnum::RUNNING),
                summary("exited-new", "h1", 4, ContainerSummaryStateEnum::EXITED),
                summary("running", "h1", 3, ContainerSummaryStateEnum::RUNNING),
                summary("exited-old", "h1", 1, ContainerSummaryStateEnum::EXITED),
            ],
            "h1",
        );
        let ids: Vec<_> = current.iter().map(|c| c.id.clone().unwrap()).collect();
        assert_eq!(ids, ["running", "exited-new", "exited-old"]);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].id.as_deref(), Some("old-spec"));
    }
}
