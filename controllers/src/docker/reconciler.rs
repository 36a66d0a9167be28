//! The Docker controller: makes the engine's containers match the container
//! workloads, one level-triggered reconcile at a time.

use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use futures::stream::BoxStream;
use persys_api::v1::{ContainerSpec, Workload, WorkloadType, workload_spec};
use tokio::time::Instant;

use super::act::{Act, Converged, Halt, StartKind};
use super::config::DockerConfig;
use super::engine::{Engine, EngineVersion};
use super::errors::{DockerError, FailureReason};
use super::events::ContainerEvents;
use super::follow;
use super::memory::Memory;
use super::observe::{kept_afresh, observe};
use super::observed::Observed;
use super::plan::{self, Desired, Plan};
use super::runtime::Runtime;
use super::spec::stop_grace;
use super::status::{self, Outcome, Report};
use super::usage::{UsageSampler, UsageSnapshots};
use super::validate::{SpecError, validate_stored_container_spec};
use crate::controller::{Action, Cleanup, Reconciler, orphan_grace_left};
use crate::informer::Cache;
use crate::kit::{self, Classify, Failed, Recorder, Workloads};
use crate::source::WorkloadWriter;

/// How soon to look again at a container in a passing state (stopping,
/// being removed).
const TRANSIENT_REQUEUE: Duration = Duration::from_secs(1);

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

    /// Logs and exec of this controller's containers, for the API server.
    pub fn io(&self) -> super::io::DockerIo {
        super::io::DockerIo::new(self.engine.clone())
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

    /// The engine, connected for one reconcile of workload `id`.
    async fn runtime<'a>(&'a self, id: &'a str) -> Result<Runtime<'a>, DockerError> {
        Runtime::connect(&self.engine, &self.observed, &self.config.scope, id).await
    }

    /// The container spec, validated; host paths as written (where they
    /// lead is checked before every create and start, in `act`).
    fn container_spec<'w>(&self, workload: &'w Workload) -> Result<&'w ContainerSpec, SpecError> {
        match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => {
                validate_stored_container_spec(spec, &self.config.host_paths)?;
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
        converged: Converged,
    ) -> Result<Action, DockerError> {
        let previous = workload.status_or_default();
        let status = status::build(
            &previous,
            Report {
                restarts: self
                    .restarts(workload.id())
                    .unwrap_or(previous.restart_count),
                outcome: converged.outcome,
                generation: workload.generation(),
                image: image_of(workload),
                container: converged.container.as_ref(),
                log_tail: converged.log_tail,
            },
        );
        kit::publish_status(self.writer.as_ref(), workload, status, converged.requeue)
            .await
            .map_err(|source| DockerError::Store {
                id: workload.id().to_string(),
                source,
            })
    }

    /// Reports an error that stopped the reconcile and hands it to the
    /// runtime's back-off: `Unknown` for an unreachable engine, `Failed`
    /// otherwise. Desired state is never touched.
    async fn publish_error(
        &self,
        workload: &Workload,
        error: DockerError,
    ) -> Result<Action, DockerError> {
        let outcome = match &error {
            DockerError::Unreachable { .. } => Outcome::Unknown {
                detail: error.detail(),
            },
            other => Outcome::Failed(Failed::of_error(other)),
        };
        if let Err(write_error) = self.publish(workload, Converged::new(outcome, None)).await {
            tracing::warn!(error = %write_error, "reporting a failure failed");
        }
        Err(error)
    }

    /// Brings the engine in line with a live workload: observe, then act on
    /// each plan until one settles it.
    async fn converge(
        &self,
        runtime: &Runtime<'_>,
        workload: &Workload,
        spec: &ContainerSpec,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        let hash = workload.spec_hash();
        let carried = workload.status.as_ref().map_or(0, |s| s.restart_count);
        let first_sight = self.workloads.with(id, |m| m.renew(&hash, carried));
        let desired = Desired::of(workload, spec, &self.config);
        let mut observed = observe(runtime, &hash).await?;
        let act = Act {
            runtime,
            events: &self.events,
            workloads: &self.workloads,
            config: &self.config,
            workload,
            spec,
        };
        act.remove_duplicates(&observed.duplicates).await?;
        if first_sight && let Some(found) = &observed.kept {
            act.adopted(found).await;
        }
        if plan::replaces_stale_first(&desired, &observed) {
            act.remove_stale(&mut observed.stale).await?;
        }
        // At most three rounds: a dead container replaced, the image looked
        // for, then a create.
        loop {
            let memory = self.workloads.with(id, |m| m.clone());
            let plan = plan::plan(&desired, &observed, &memory, Instant::now());
            tracing::debug!(?plan, "planned");
            let kept = observed.kept.clone();
            // A plan that acts on a container is made only when there is one.
            let found = || kept.clone().unwrap_or_default();
            return match plan {
                Plan::Stop => act.stop(kept, true).await,
                Plan::StayStopped => act.stop(kept, false).await,
                Plan::ReportRunning => Ok(Converged::new(Outcome::Running, kept)),
                Plan::Unpause => act.unpause(&found()).await,
                Plan::StartFirst => act.start(&found(), StartKind::First).await,
                Plan::RestartAfterExit { exit_code } => {
                    act.announce_restart(&found(), exit_code).await;
                    act.start(&found(), StartKind::Restart).await
                }
                Plan::CrashLoopBackOff {
                    exit_code,
                    delay,
                    remaining,
                    due_ms,
                } => Ok(act
                    .back_off(found(), (exit_code, delay, remaining, due_ms))
                    .await),
                Plan::Completed => Ok(Converged::new(Outcome::Completed, kept)),
                Plan::GaveUp { detail } => Ok(act.gave_up(found(), detail).await),
                Plan::ReplaceDead => {
                    act.remove_dead(&found()).await?;
                    observed.kept = None;
                    continue;
                }
                Plan::WaitTransient { state } => {
                    let outcome = Outcome::Failed(Failed::until_changed(
                        FailureReason::RuntimeError,
                        format!("container is {state}"),
                    ));
                    Ok(Converged::new(outcome, kept).requeue_after(TRANSIENT_REQUEUE))
                }
                Plan::HeldByTerminalFailure {
                    reason,
                    detail,
                    announced_restart,
                } => {
                    if let Some(exit_code) = announced_restart {
                        act.announce_restart(&found(), exit_code).await;
                    }
                    let outcome = Outcome::Failed(Failed::until_changed(reason, detail));
                    Ok(Converged::new(outcome, kept))
                }
                Plan::HeldByStartBackOff(failed) | Plan::PullBackOff(failed) => {
                    Err(Halt::Failed(failed))
                }
                Plan::LookForImage => {
                    observed.image_present = Some(runtime.image_present(&spec.image).await?);
                    continue;
                }
                Plan::Create { pull_first } => act.create(pull_first, &mut observed.stale).await,
                Plan::PullPolicyNever { detail } => {
                    Err(act.failed_pull(FailureReason::ImageNotFound, detail))
                }
            };
        }
    }
}

/// The image a container workload names, for status (empty without a
/// container spec).
fn image_of(workload: &Workload) -> &str {
    match workload.workload_spec() {
        Some(workload_spec::Spec::Container(spec)) => &spec.image,
        _ => "",
    }
}

impl Reconciler for DockerController {
    type Error = DockerError;

    const WORKLOAD_TYPE: WorkloadType = WorkloadType::Container;

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, DockerError> {
        let id = workload.id();
        let spec = match self.container_spec(&workload) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::warn!(%error, "invalid spec; not acting on it");
                let converged = Converged::new(Outcome::Failed(Failed::invalid_spec(error)), None);
                return self.publish(&workload, converged).await;
            }
        };
        let runtime = match self.runtime(id).await {
            Ok(runtime) => runtime,
            Err(error) => return self.publish_error(&workload, error).await,
        };
        match self.converge(&runtime, &workload, spec).await {
            Ok(converged) => self.publish(&workload, converged).await,
            Err(Halt::Failed(failed)) => {
                let found = kept_afresh(&runtime, &workload.spec_hash()).await;
                let requeue = failed.retry_in.map(|d| d.max(kit::MIN_REQUEUE));
                let mut converged = Converged::new(Outcome::Failed(failed), found);
                converged.requeue = requeue;
                self.publish(&workload, converged).await
            }
            Err(Halt::Error(error)) => self.publish_error(&workload, error).await,
        }
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, DockerError> {
        let id = workload.id();
        let runtime = self.runtime(id).await?;
        let grace = match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => Some(stop_grace(spec)),
            _ => None,
        };
        for found in runtime.list().await? {
            if let Some(cid) = found.id.as_deref() {
                tracing::info!(container = cid, "removing: the workload is deleted");
                runtime.stop_and_remove(cid, grace).await?;
            }
        }
        runtime.remove_volumes().await?;
        self.workloads.forget(id);
        self.usage.remove(id);
        Ok(Cleanup::Done)
    }

    async fn reconcile_missing(
        &self,
        id: &str,
        orphaned_for: Duration,
    ) -> Result<Action, DockerError> {
        let runtime = self.runtime(id).await?;
        let found = runtime.list().await?;
        if found.is_empty() {
            self.workloads.forget(id);
            self.usage.remove(id);
            return Ok(Action::await_change());
        }
        if let Some(left) = orphan_grace_left(self.config.orphan_grace, orphaned_for) {
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
                runtime.stop_and_remove(cid, None).await?;
            }
        }
        runtime.remove_volumes().await?;
        self.workloads.forget(id);
        self.usage.remove(id);
        Ok(Action::await_change())
    }
}
