//! The Docker controller: makes the engine's containers match the container
//! workloads, one level-triggered reconcile at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bollard::errors::Error as EngineError;
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use futures::StreamExt;
use futures::stream::BoxStream;
use persys_api::v1::{ContainerSpec, Workload, WorkloadType, workload_spec};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::act::{Act, Converged, Halt, StartKind, TakeOver};
use super::adopt::Adoption;
use super::config::DockerConfig;
use super::engine::{Engine, EngineVersion};
use super::errors::{DockerError, FailureReason};
use super::events::ContainerEvents;
use super::follow;
use super::memory::Memory;
use super::observe::{kept_afresh, observe};
use super::observed::Observed;
use super::plan::{self, Desired, Plan};
use super::pulls::Pulls;
use super::runtime::Runtime;
use super::spec::stop_grace;
use super::status::{self, Outcome, Report};
use super::usage::{UsageSampler, UsageSnapshots};
use super::validate::{SpecError, validate_stored_container_spec};
use crate::controller::{Action, Cleanup, Reconciler, orphan_grace_left};
use crate::informer::Cache;
use crate::kit::status::Readiness;
use crate::kit::{self, Classify, Failed, Recorder, Workloads};
use crate::probes::{Instance, InstanceHealth, Notifier, ProbeKind, ProbeSpec, Prober};
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
    /// Runs the containers' liveness and readiness probes; may be shared
    /// with the Compose controller (one timer for the node).
    prober: Prober,
    /// Wakes this controller when a probe's verdict changes.
    probe_wake: Notifier,
    /// The other end, until [`DockerController::trigger`] takes it.
    probe_woken: Mutex<Option<mpsc::Receiver<String>>>,
    /// Image pulls, run outside the reconcile slots; they wake their
    /// workloads through `probe_wake`'s channel when they end.
    pulls: Pulls,
}

/// Probe verdict changes waiting for the controller; more are dropped (a
/// wake is pending anyway).
const PROBE_WAKES: usize = 1024;

impl DockerController {
    /// A controller writing status through `writer`. Does not contact the
    /// engine: the agent starts, and reports `Unknown`, while it is down.
    pub fn new(config: DockerConfig, writer: Arc<dyn WorkloadWriter>) -> Self {
        let engine = Engine::new(config.host.clone());
        let (probe_wake, probe_woken) = mpsc::channel(PROBE_WAKES);
        let pulls = Pulls::new(engine.clone(), config.pull_concurrency, probe_wake.clone());
        DockerController {
            pulls,
            prober: Prober::default(),
            probe_wake,
            probe_woken: Mutex::new(Some(probe_woken)),
            config,
            engine,
            events: Recorder::new(writer.clone()),
            writer,
            workloads: Workloads::default(),
            usage: UsageSnapshots::default(),
            observed: Arc::new(Observed::default()),
        }
    }

    /// Runs this controller's probes on `prober`, shared with other
    /// controllers.
    pub fn with_prober(mut self, prober: Prober) -> Self {
        self.prober = prober;
        self
    }

    /// The prober running this controller's probes.
    pub fn prober(&self) -> &Prober {
        &self.prober
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
    /// container) and from probe verdicts that changed: the trigger to pass
    /// to `Controller::with_trigger`.
    pub fn trigger(&self, cache: Cache) -> BoxStream<'static, String> {
        let events = self.engine_trigger(cache);
        let woken = self
            .probe_woken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match woken {
            Some(woken) => futures::stream::select(events, ReceiverStream::new(woken)).boxed(),
            None => events,
        }
    }

    fn engine_trigger(&self, cache: Cache) -> BoxStream<'static, String> {
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

    /// Image pulls running or waiting for a pull slot.
    pub fn pulls_in_flight(&self) -> usize {
        self.pulls.in_flight()
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
        UsageSampler::new(
            self.engine.clone(),
            self.config.scope.clone(),
            self.config.usage_interval,
            self.config.usage_concurrency,
            self.usage.clone(),
        )
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

    /// The Go agent's container adopted for the workload: just now (in
    /// memory) or as its status records.
    fn adoption_of(&self, workload: &Workload) -> Option<Adoption> {
        let hash = workload.spec_hash();
        self.workloads
            .get(workload.id(), |m| {
                m.adopted.clone().filter(|_| m.spec_hash == hash)
            })
            .flatten()
            .or_else(|| Adoption::recorded(workload.status.as_ref(), &self.config.scope))
    }

    /// Writes `converged` as the status, if it differs from the stored one.
    /// The record of an adopted container stays with it while it is the
    /// one the status describes (or none is known).
    async fn publish(
        &self,
        workload: &Workload,
        converged: Converged,
    ) -> Result<Action, DockerError> {
        let previous = workload.status_or_default();
        let (readiness, mut probe_facts) = self.probe(workload, &converged);
        if let Some(adoption) = self.adoption_of(workload) {
            let described = converged.container.as_ref().and_then(|c| c.id.as_deref());
            if described.is_none_or(|cid| cid == adoption.container_id) {
                probe_facts.extend(adoption.facts());
            }
        }
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
                readiness,
                probe_facts,
            },
        );
        kit::publish_status(self.writer.as_ref(), workload, status, converged.requeue)
            .await
            .map_err(|source| DockerError::Store {
                id: workload.id().to_string(),
                source,
            })
    }

    /// Registers the running container's probes (or drops them when it
    /// does not run), and answers its readiness: the readiness probe's
    /// verdict, else the image's HEALTHCHECK, else ready; with what the
    /// probes last said, as status facts.
    fn probe(
        &self,
        workload: &Workload,
        converged: &Converged,
    ) -> (Readiness, BTreeMap<String, String>) {
        let id = workload.id();
        let running = converged.outcome == Outcome::Running;
        let container = converged.container.as_ref().filter(|_| running);
        let spec = match workload.workload_spec() {
            Some(workload_spec::Spec::Container(spec)) => Some(spec),
            _ => None,
        };
        let instance = container
            .zip(spec)
            .and_then(|(c, spec)| instance_of(c, spec));
        let health = match &instance {
            Some(instance) => {
                self.prober.watch(
                    id,
                    &self.engine,
                    &self.probe_wake,
                    std::slice::from_ref(instance),
                );
                self.prober
                    .health(id, &instance.container_id, &instance.started_at)
            }
            None => {
                self.prober.forget(id);
                InstanceHealth::default()
            }
        };
        match container {
            Some(container) => readiness_of(&health, container),
            None => (Readiness::Ready, BTreeMap::new()),
        }
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

    /// The output of the kept container's liveness probe, when it failed
    /// beyond its threshold since the container's current start.
    fn liveness_failure(
        &self,
        id: &str,
        kept: Option<&ContainerInspectResponse>,
    ) -> Option<String> {
        let kept = kept?;
        let cid = kept.id.as_deref()?;
        let started_at = kept.state.as_ref()?.started_at.as_deref()?;
        self.prober
            .health(id, cid, started_at)
            .liveness_failure()
            .map(str::to_string)
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
        let act = Act {
            runtime,
            events: &self.events,
            workloads: &self.workloads,
            config: &self.config,
            workload,
            spec,
            pulls: &self.pulls,
        };
        let adoption = self.adoption_of(workload);
        let mut observed = observe(runtime, &hash, adoption.as_ref()).await?;
        let mut took_over = false;
        if let Some(go) = observed.go.take() {
            match act.take_over(&go).await? {
                TakeOver::Adopted(adoption) => {
                    observed = observe(runtime, &hash, Some(&adoption)).await?;
                    took_over = true;
                }
                TakeOver::Replace => observed.stale.push(go),
                TakeOver::Gone => {}
            }
        }
        observed.unhealthy = self.liveness_failure(id, observed.kept.as_ref());
        act.remove_duplicates(&observed.duplicates).await?;
        if first_sight
            && !took_over
            && let Some(found) = &observed.kept
        {
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
                Plan::RestartUnhealthy { output } => {
                    act.stop_unhealthy(&found(), &output).await?;
                    observed = observe(runtime, &hash, self.adoption_of(workload).as_ref()).await?;
                    continue;
                }
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

/// The running container `container` to probe, when `spec` has probes.
fn instance_of(container: &ContainerInspectResponse, spec: &ContainerSpec) -> Option<Instance> {
    let probe = |kind, probe: &Option<persys_api::v1::Probe>| {
        probe.as_ref().and_then(|p| ProbeSpec::of(kind, p))
    };
    let liveness = probe(ProbeKind::Liveness, &spec.liveness_probe);
    let readiness = probe(ProbeKind::Readiness, &spec.readiness_probe);
    if liveness.is_none() && readiness.is_none() {
        return None;
    }
    let started_at = container.state.as_ref()?.started_at.clone()?;
    Some(Instance {
        container_id: container.id.clone()?,
        started: humantime::parse_rfc3339(&started_at).unwrap_or_else(|_| SystemTime::now()),
        started_at,
        address: address_of(container),
        liveness,
        readiness,
    })
}

/// The container's address on its first network (by name) that gave it
/// one.
pub(crate) fn address_of(container: &ContainerInspectResponse) -> Option<std::net::IpAddr> {
    let networks = container.network_settings.as_ref()?.networks.as_ref()?;
    let mut networks: Vec<_> = networks.iter().collect();
    networks.sort_by(|a, b| a.0.cmp(b.0));
    networks
        .into_iter()
        .filter_map(|(_, endpoint)| endpoint.ip_address.as_deref())
        .find_map(|ip| ip.parse().ok())
}

/// Readiness from the probes' verdicts, else from the image's
/// HEALTHCHECK as the engine reports it; and the status facts saying so.
pub(crate) fn readiness_of(
    health: &InstanceHealth,
    container: &ContainerInspectResponse,
) -> (Readiness, BTreeMap<String, String>) {
    let mut facts = BTreeMap::new();
    let word = |passing: Option<bool>| match passing {
        Some(true) => "passing",
        Some(false) => "failing",
        None => "pending",
    };
    if let Some(liveness) = &health.liveness {
        facts.insert("probe.liveness".into(), word(liveness.passing).into());
    }
    if let Some(verdict) = &health.readiness {
        facts.insert("probe.readiness".into(), word(verdict.passing).into());
        let readiness = match verdict.passing {
            Some(true) => Readiness::Ready,
            Some(false) => Readiness::NotReady {
                reason: "ReadinessProbeFailed".into(),
                message: if verdict.output.is_empty() {
                    "readiness probe failed".into()
                } else {
                    format!("readiness probe failed: {}", verdict.output)
                },
            },
            None => Readiness::NotReady {
                reason: "ReadinessProbePending".into(),
                message: "the readiness probe has not passed yet".into(),
            },
        };
        return (readiness, facts);
    }
    let Some(health) = container.state.as_ref().and_then(|s| s.health.as_ref()) else {
        return (Readiness::Ready, facts);
    };
    let last_output = || {
        health
            .log
            .as_ref()
            .and_then(|log| log.last())
            .and_then(|r| r.output.as_deref())
            .map(|o| crate::kit::status::keep_start(o.trim(), 1024).to_string())
            .unwrap_or_default()
    };
    let readiness = match health.status {
        Some(HealthStatusEnum::HEALTHY) => Readiness::Ready,
        Some(HealthStatusEnum::STARTING) => Readiness::NotReady {
            reason: "HealthCheckStarting".into(),
            message: "the image's HEALTHCHECK has not passed yet".into(),
        },
        Some(HealthStatusEnum::UNHEALTHY) => Readiness::NotReady {
            reason: "HealthCheckFailed".into(),
            message: format!("the image's HEALTHCHECK fails: {}", last_output()),
        },
        _ => return (Readiness::Ready, facts),
    };
    if let Some(status) = health.status {
        facts.insert("probe.healthcheck".into(), status.to_string());
    }
    (readiness, facts)
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
                let adoption = self.adoption_of(&workload);
                let found = kept_afresh(&runtime, &workload.spec_hash(), adoption.as_ref()).await;
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
        // The Go agent's container of a workload in the store is the
        // workload's, adopted or not yet.
        let mut containers = runtime.list().await?;
        containers.extend(runtime.list_go().await?);
        for found in containers {
            if let Some(cid) = found.id.as_deref() {
                tracing::info!(container = cid, "removing: the workload is deleted");
                runtime.stop_and_remove(cid, grace).await?;
            }
        }
        runtime.remove_volumes().await?;
        self.workloads.forget(id);
        self.usage.remove(id);
        self.prober.forget(id);
        self.pulls.forget(id);
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
            self.prober.forget(id);
            self.pulls.forget(id);
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
        self.prober.forget(id);
        self.pulls.forget(id);
        Ok(Action::await_change())
    }
}
