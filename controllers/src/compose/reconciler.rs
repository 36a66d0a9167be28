//! The Compose controller: makes each compose workload's project run as
//! declared, one level-triggered reconcile at a time.
//!
//! A reconcile reads the workload ([`Desired`]) and its project
//! ([`Observation`]: the folder, the containers by compose's project
//! label), lets [`plan()`] decide, and acts: `up -d --remove-orphans` when
//! the spec hash differs from the one last brought up, or of the services
//! whose restart policy brings them back when they are not running (every
//! `up` after the bind sources passed the container rule); `stop` when the
//! desired state is stopped; `down --remove-orphans` (named volumes stay)
//! on delete.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use persys_api::v1::{EventType, Workload, WorkloadType};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};

use super::act::{Converged, PENDING_REQUEUE};
use super::binary::{ComposeBinary, DetectError};
use super::config::ComposeConfig;
use super::desired::{self, Desired};
use super::errors::{ComposeError, FailureReason};
use super::events::ProjectEvents;
use super::memory::{Memory, Rules};
use super::naming::{self, project_name_of};
use super::observe::{self, Observation};
use super::plan::{self, Plan, plan};
use super::probing::ProjectHealth;
use super::project::{ProjectDir, ProjectIndex};
use super::runtime::ComposeRuntime;
use super::status::{self, Outcome, Report};
use crate::controller::{Action, Cleanup, Reconciler, orphan_grace_left};
use crate::docker::follow;
use crate::docker::{Engine, EngineVersion};
use crate::informer::Cache;
use crate::kit::{self, Classify, ErrorClass, Recorder, Workloads};
use crate::probes::{Notifier, Prober};
use crate::source::WorkloadWriter;

/// How soon a workload whose project name another workload owns looks
/// again: nothing else tells it when the owner is gone.
const CONTESTED_REQUEUE: Duration = Duration::from_secs(30);

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
    pub(crate) config: ComposeConfig,
    /// The compose CLI and the engine, behind one facade.
    pub(crate) runtime: ComposeRuntime,
    writer: Arc<dyn WorkloadWriter>,
    /// The informer's cache: which workload owns a project name.
    cache: Cache,
    /// What is remembered per workload between reconciles, and since when
    /// each orphan project folder has been seen.
    pub(crate) workloads: Workloads<Memory>,
    pub(crate) events: Recorder,
    /// Project name → workload id of the folders on disk, shared with the
    /// event trigger.
    pub(crate) index: ProjectIndex,
    /// Runs the services' probes; may be shared with the Docker
    /// controller (one timer for the node).
    pub(crate) prober: Prober,
    /// Wakes this controller when a probe's verdict changes.
    pub(crate) probe_wake: Notifier,
    /// The other end, until [`ComposeController::trigger`] takes it.
    probe_woken: Mutex<Option<mpsc::Receiver<String>>>,
}

/// Probe verdict changes waiting for the controller; more are dropped (a
/// wake is pending anyway).
const PROBE_WAKES: usize = 1024;

impl ComposeController {
    /// A controller writing status through `writer`. Contacts neither the
    /// engine nor the compose CLI: the agent starts, and reports why, while
    /// either is missing.
    pub fn new(config: ComposeConfig, writer: Arc<dyn WorkloadWriter>, cache: Cache) -> Self {
        let (probe_wake, probe_woken) = mpsc::channel(PROBE_WAKES);
        ComposeController {
            prober: Prober::default(),
            probe_wake,
            probe_woken: Mutex::new(Some(probe_woken)),
            runtime: ComposeRuntime::new(&config),
            config,
            events: Recorder::new(writer.clone()),
            writer,
            cache,
            workloads: Workloads::default(),
            index: ProjectIndex::default(),
        }
    }

    /// Runs this controller's probes on `prober`, shared with other
    /// controllers.
    pub fn with_prober(mut self, prober: Prober) -> Self {
        self.prober = prober;
        self
    }

    pub fn config(&self) -> &ComposeConfig {
        &self.config
    }

    /// Logs and exec of this controller's projects, for the API server.
    pub fn io(&self) -> super::io::ComposeIo {
        super::io::ComposeIo::new(self.runtime.engine().clone())
    }

    pub fn engine(&self) -> &Engine {
        self.runtime.engine()
    }

    /// Workload ids to reconcile, from the engine's `/events` for compose
    /// containers (and, on every (re)connect, every compose workload and
    /// every project folder), and every compose workload when a compose CLI
    /// is found after it was missing: the trigger for
    /// `Controller::with_trigger`.
    pub fn trigger(&self) -> BoxStream<'static, String> {
        let events = follow::trigger(
            self.runtime.engine().clone(),
            self.config.events_backoff,
            ProjectEvents {
                cache: self.cache.clone(),
                index: self.index.clone(),
                project_root: self.config.project_root.clone(),
                exits: self.runtime.exits.clone(),
            },
        );
        let cache = self.cache.clone();
        let found = WatchStream::from_changes(self.runtime.found_again()).flat_map(move |_| {
            let ids = cache.ids_of_type(WorkloadType::Compose);
            tracing::info!(
                workloads = ids.len(),
                "compose CLI found: reconciling every compose workload"
            );
            stream::iter(ids)
        });
        let woken = self
            .probe_woken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let events = stream::select(events, found);
        match woken {
            Some(woken) => stream::select(events, ReceiverStream::new(woken)).boxed(),
            None => events.boxed(),
        }
    }

    /// The health probe: the compose CLI (kind, version) and the engine.
    pub async fn probe(&self) -> ComposeHealth {
        let binary = self.binary().await;
        let engine = self.runtime.engine_version().await;
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
        self.runtime.binary().await
    }

    /// The repair count of the workload's current spec, once this process
    /// has reconciled it.
    fn restarts(&self, id: &str) -> Option<i32> {
        self.workloads
            .get(id, |m| (!m.is_first_sight()).then(|| m.crash.restarts()))
            .flatten()
    }

    fn forget(&self, id: &str) {
        self.workloads.forget(id);
        self.prober.forget(id);
        self.index.remove_workload(id);
    }

    /// Takes over the Go agent's project of the workload, once: recorded
    /// as the workload's; adopted as it runs (the spec recorded as brought
    /// up, so nothing is recreated) when the Go agent's files say what the
    /// spec says, else left for the next `up` to replace what differs.
    async fn take_over(
        &self,
        desired: &Desired,
        observation: &mut Observation,
    ) -> Result<(), ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        let Some(go) = prepared.go.as_ref().filter(|go| !go.adopted) else {
            return Ok(());
        };
        if observation.owner.is_some() || observation.foreign.is_some() {
            return Ok(());
        }
        let files = |source| self.files_error(id, &prepared.dir, source);
        prepared.dir.write(&prepared.files).await.map_err(files)?;
        let count = observation.containers.containers().count();
        match &prepared.go_difference {
            None if count > 0 => {
                prepared
                    .dir
                    .record_hash(&desired.hash)
                    .await
                    .map_err(files)?;
                observation.brought_up = Some(desired.hash.clone());
                tracing::info!(project = %go.name, containers = count, "adopted the Go agent's compose project");
                let message = format!(
                    "adopted compose project {} of the Go agent as it runs ({count} containers, none recreated)",
                    go.name
                );
                self.event(id, EventType::Normal, "Adopted", message).await;
            }
            None => {}
            Some(difference) => {
                tracing::info!(project = %go.name, %difference, "replacing the Go agent's compose project");
                let message = format!(
                    "compose project {} of the Go agent differs from the spec ({difference}); bringing it up from the spec",
                    go.name
                );
                self.event(id, EventType::Normal, "Replacing", message)
                    .await;
            }
        }
        prepared.dir.record_adopted(&go.name).await.map_err(files)?;
        Ok(())
    }

    /// Carries out `plan` on the workload's project.
    async fn act(
        &self,
        desired: &Desired,
        observation: &Observation,
        memory: &Memory,
        plan: Plan,
    ) -> Result<Converged, ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        let (declared, observed) = (&prepared.declared, &observation.containers);
        if !matches!(plan, Plan::NameTaken { .. } | Plan::NotAdopted { .. }) {
            self.claim(desired, plan::claim(observation, memory))
                .await?;
        }
        Ok(match plan {
            Plan::NameTaken { owner } => {
                let message = format!(
                    "compose project {} is already run by workload {owner}",
                    prepared.project
                );
                tracing::warn!(%message, "project name taken; not acting");
                let contested = Some(CONTESTED_REQUEUE);
                Converged::refused(FailureReason::InvalidSpec, message, contested)
            }
            Plan::NotAdopted { why } => {
                tracing::warn!(project = %prepared.project, "an existing compose project is not the agent's; not acting");
                self.event(id, EventType::Warning, "AdoptionRefused", why.clone())
                    .await;
                let contested = Some(CONTESTED_REQUEUE);
                Converged::refused(FailureReason::PolicyViolation, why, contested)
            }
            Plan::AlreadyStopped => Converged::new(Outcome::Stopped, declared, observed),
            Plan::Running => {
                self.succeeded(id);
                Converged::new(Outcome::Running, declared, observed)
            }
            Plan::GaveUp { message } => {
                let outcome = Outcome::Failed {
                    reason: FailureReason::ContainerExited,
                    detail: message.clone(),
                    message,
                    due_ms: None,
                };
                Converged::new(outcome, declared, observed)
            }
            Plan::EngineRestarting { message } => {
                let outcome = Outcome::Pending { message };
                Converged::new(outcome, declared, observed).after(PENDING_REQUEUE)
            }
            Plan::HoldFailure {
                failure,
                remaining,
                due_ms,
            } => Converged::failure(failure, Some(due_ms), declared, observed).after(remaining),
            Plan::CrashBackOff {
                message,
                remaining,
                due_ms,
            } => {
                let outcome = Outcome::BackingOff { message, due_ms };
                Converged::new(outcome, declared, observed).after(remaining)
            }
            Plan::Stop => self.stop(desired, observation).await?,
            Plan::Up(up) => self.up(desired, up).await?,
        })
    }

    /// Writes `converged` as the status, if it differs from the stored one;
    /// then hands its error, if any, to the runtime's back-off.
    async fn publish(
        &self,
        workload: &Workload,
        project: &str,
        mut converged: Converged,
    ) -> Result<Action, ComposeError> {
        let id = workload.id();
        let health = if converged.outcome == Outcome::Running {
            self.probe_services(workload, project).await
        } else {
            self.prober.forget(id);
            ProjectHealth::default()
        };
        if health.stopped_unhealthy {
            converged.requeue = Some(Duration::ZERO);
        }
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
                readiness: health.readiness,
                probe_facts: health.facts,
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
        let outcome = if error.class() == ErrorClass::Unreachable {
            Outcome::Unknown {
                detail: error.detail(),
            }
        } else {
            Outcome::Failed {
                reason: error.reason(),
                message: error.detail(),
                detail: error.detail(),
                due_ms: None,
            }
        };
        let converged = Converged {
            outcome,
            services: None,
            requeue: None,
            error: Some(error),
        };
        self.publish(workload, project, converged).await
    }

    pub(crate) fn files_error(
        &self,
        id: &str,
        dir: &ProjectDir,
        source: std::io::Error,
    ) -> ComposeError {
        ComposeError::Files {
            id: id.to_string(),
            path: dir.path().to_path_buf(),
            source,
        }
    }
}

impl Reconciler for ComposeController {
    type Error = ComposeError;

    const WORKLOAD_TYPE: WorkloadType = WorkloadType::Compose;

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, ComposeError> {
        let id = workload.id();
        let roots = (
            self.config.project_root.clone(),
            self.config.go_project_root.clone(),
        );
        let environment = self.runtime.environment().clone();
        let Some(read) = Desired::read_off_runtime(workload.clone(), roots, environment).await
        else {
            return Ok(Action::requeue(PENDING_REQUEUE));
        };
        let desired = match read {
            Ok(desired) => desired,
            Err(error) => {
                tracing::warn!(%error, "invalid spec; not acting on it");
                let project = project_name_of(&workload).unwrap_or_default();
                let invalid = Converged::refused(FailureReason::InvalidSpec, error.detail(), None);
                return self.publish(&workload, &project, invalid).await;
            }
        };
        let project = desired.prepared.project.as_str();
        let workloads = self.cache.list_type(WorkloadType::Compose);
        let mut observation = match Observation::read(&self.runtime, &workloads, &desired).await {
            Ok(observation) => observation,
            Err(error) => return self.publish_error(&workload, project, error).await,
        };
        if let Err(error) = self.take_over(&desired, &mut observation).await {
            return self.publish_error(&workload, project, error).await;
        }
        let memory = self.workloads.get(id, Memory::clone).unwrap_or_default();
        let now = Instant::now();
        let plan = plan(
            &desired,
            &observation,
            &memory,
            &Rules::of(&self.config),
            now,
        );
        match self.act(&desired, &observation, &memory, plan).await {
            Ok(converged) => self.publish(&workload, project, converged).await,
            Err(error) => self.publish_error(&workload, project, error).await,
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
            self.runtime.docker(id).await?;
            // The adoption rule holds on delete too: a project the agent
            // never made for this workload is not taken down with it.
            let found = self.runtime.containers(id, &project).await?;
            if let Some(why) =
                observe::adoption_refusal(id, &project, dir.records(&project, id).await, &found)
            {
                tracing::warn!(%project, "the workload is deleted; its project name's containers are not the agent's and stay");
                self.event(id, EventType::Warning, "AdoptionRefused", why)
                    .await;
                dir.remove()
                    .await
                    .map_err(|source| self.files_error(id, &dir, source))?;
                self.forget(id);
                return Ok(Cleanup::Done);
            }
            // `down` with the current spec when it renders; else with what
            // is on disk. No folder: nothing was brought up from one (or a
            // cleanup already ran), and none is made just to be removed.
            let environment = self.runtime.environment();
            if let Ok(prepared) =
                desired::prepare(&workload, &self.config.project_root, environment)
                && prepared.project == project
                && dir.exists().await
            {
                prepared
                    .dir
                    .write(&prepared.files)
                    .await
                    .map_err(|source| self.files_error(id, &dir, source))?;
            }
            tracing::info!(%project, "taking the project down: the workload is deleted");
            self.runtime.take_down(id, &project, &dir).await?;
            // The Go agent's folder of an adopted project goes with it, as
            // the Go agent removed it (its `.env` may hold secrets).
            if dir.is_adopted().await
                && let Some(go_dir) = self.config.go_project_root.as_ref().map(|r| r.join(id))
            {
                match tokio::fs::remove_dir_all(&go_dir).await {
                    Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                        return Err(ComposeError::Files {
                            id: id.to_string(),
                            path: go_dir,
                            source,
                        });
                    }
                    _ => {}
                }
            }
        }
        dir.remove()
            .await
            .map_err(|source| self.files_error(id, &dir, source))?;
        self.forget(id);
        Ok(Cleanup::Done)
    }

    async fn reconcile_missing(
        &self,
        id: &str,
        orphaned_for: Duration,
    ) -> Result<Action, ComposeError> {
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
        if let Some(remaining) = orphan_grace_left(self.config.orphan_grace, orphaned_for) {
            tracing::debug!(%project, ?remaining, "orphan compose project within its grace period");
            return Ok(Action::requeue(remaining));
        }
        self.runtime.docker(id).await?;
        let found = self.runtime.containers(id, &project).await?;
        let recorded = dir.records(&project, id).await;
        if observe::adoption_refusal(id, &project, recorded, &found).is_none() {
            tracing::info!(%project, grace = ?self.config.orphan_grace, "taking down an orphan compose project: its workload is gone");
            self.runtime.take_down(id, &project, &dir).await?;
        } else {
            tracing::warn!(%project, "an orphan folder names a project the agent did not make; removing only the folder");
        }
        dir.remove()
            .await
            .map_err(|source| self.files_error(id, &dir, source))?;
        self.forget(id);
        Ok(Action::await_change())
    }
}
