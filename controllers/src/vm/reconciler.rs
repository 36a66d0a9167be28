//! The VM controller: makes libvirt's domains match the VM workloads, one
//! level-triggered reconcile at a time.
//!
//! Each reconcile lays the workload's domain out from its spec (checking
//! it again), observes its domains ([`super::observe`]), decides one step
//! ([`super::plan`]) and carries it out below, through the operations of
//! [`super::act`] and [`super::host`]: define and start; ACPI shutdown,
//! then destroy once the stop timeout has passed (by requeueing, never by
//! sleeping); replace a domain of an older spec; restart a guest that
//! stopped on its own, with kubelet's crash-loop back-off. The status is
//! written only when it changed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use persys_api::v1::{
    ActualState, DesiredState, EventType, VmSpec, Workload, WorkloadType, workload_spec,
};
use tokio::time::Instant;

use super::act::{Converged, Halt, StartKind, name_taken};
use super::adopt;
use super::config::{VmConfig, resolve_domain_type};
use super::disks::{add_seed, add_volumes, plan_disks};
use super::domain_xml::{DomainPlan, domain_name, graphics, plan_nics, resources};
use super::errors::{FailureReason, SpecError, VmError};
use super::events::{DomainIndex, LifecycleTrigger};
use super::libvirt::Hypervisor;
use super::marks::Marks;
use super::memory::Memory;
use super::observe::observe;
use super::plan::{Desired, Plan, Rules, plan};
use super::seed::{SEED_FILE, SeedContent, seed_content};
use super::status::{self, Outcome, Report};
use super::usage::{UsageSampler, UsageSnapshots};
use crate::controller::{Action, Cleanup, Reconciler, orphan_grace_left};
use crate::informer::Cache;
use crate::kit::{self, Classify, Failed, MIN_REQUEUE, Recorder, Workloads};
use crate::source::WorkloadWriter;

/// How soon to look again at a guest in a passing state (shutting down on
/// its own, suspended).
const TRANSIENT_REQUEUE: Duration = Duration::from_secs(1);

/// A workload's domain and host files, laid out from its spec.
pub(crate) struct Layout {
    /// The domain to define, marked with the spec it comes from.
    pub(crate) domain: DomainPlan,
    /// The cloud-init seed to build, if the spec asks for one.
    pub(crate) seed: Option<SeedContent>,
    /// `<state>/vm/<id>`.
    pub(crate) vm_dir: PathBuf,
}

/// Converges libvirt domains to the VM workloads.
pub struct VmController {
    pub(super) config: VmConfig,
    /// `kvm` or `qemu`, decided once.
    domain_type: String,
    /// The facade every libvirt call goes through.
    pub(super) hypervisor: Hypervisor,
    writer: Arc<dyn WorkloadWriter>,
    /// What is remembered per workload between reconciles, and since when
    /// each orphan (a managed domain without a workload) has been seen.
    pub(super) workloads: Workloads<Memory>,
    pub(super) events: Recorder,
    /// Domain UUID → workload id, shared with the event trigger.
    pub(super) index: DomainIndex,
    usage: UsageSnapshots,
    /// `/sys/class/net`, where host bridges are recognised.
    sys_class_net: PathBuf,
}

impl VmController {
    /// A controller writing status through `writer`. Does not contact
    /// libvirt: the agent starts, and reports `Unknown`, while it is down.
    pub fn new(config: VmConfig, writer: Arc<dyn WorkloadWriter>) -> Self {
        let domain_type = resolve_domain_type(config.domain_type.as_deref());
        let hypervisor = Hypervisor::new(config.uri.clone(), config.reconnect_backoff);
        tracing::info!(uri = %config.uri, %domain_type, scope = %config.scope, "VM controller configured");
        VmController {
            config,
            domain_type,
            hypervisor,
            events: Recorder::new(writer.clone()),
            writer,
            workloads: Workloads::default(),
            index: DomainIndex::default(),
            usage: UsageSnapshots::default(),
            sys_class_net: PathBuf::from("/sys/class/net"),
        }
    }

    /// `kvm` or `qemu`: the type new domains are defined with.
    pub fn domain_type(&self) -> &str {
        &self.domain_type
    }

    /// The health probe, for HealthCheck's `runtime_status`: `"healthy"`,
    /// or why libvirt cannot be used.
    pub async fn health(&self) -> String {
        match self.hypervisor.ping().await {
            Ok(_) => "healthy".to_string(),
            Err(error) => error.detail(),
        }
    }

    /// Workload ids to reconcile, from libvirt's lifecycle events (and, on
    /// every (re)connect, every VM workload in `cache` and every managed
    /// domain): the trigger to pass to `Controller::with_trigger`.
    pub fn trigger(&self, cache: Cache) -> BoxStream<'static, String> {
        LifecycleTrigger {
            hypervisor: self.hypervisor.clone(),
            scope: self.config.scope.clone(),
            cache,
            index: self.index.clone(),
            backoff: self.config.reconnect_backoff,
        }
        .into_stream()
    }

    /// Logs and console of this controller's domains, for the API server.
    pub fn io(&self) -> super::io::VmIo {
        super::io::VmIo {
            config: self.config.clone(),
            hypervisor: self.hypervisor.clone(),
        }
    }

    /// The last usage samples, for the API server.
    pub fn usage(&self) -> UsageSnapshots {
        self.usage.clone()
    }

    /// The sampler filling [`VmController::usage`]; run it in a task.
    pub fn usage_sampler(&self) -> UsageSampler {
        UsageSampler::new(
            self.hypervisor.clone(),
            self.config.scope.clone(),
            self.config.usage_interval,
            self.usage.clone(),
        )
    }

    fn forget(&self, id: &str) {
        self.workloads.forget(id);
        self.index.remove_workload(id);
        self.usage.remove(id);
    }

    /// The domain a workload asks for, with every spec rule checked again
    /// (disk paths against the roots, names, networks, cloud-init).
    pub(crate) fn layout(&self, workload: &Workload) -> Result<Layout, SpecError> {
        let id = workload.id();
        let spec = vm_spec(workload)?;
        let name = domain_name(id, spec)?;
        let (vcpus, memory_mib) = resources(spec)?;
        let vm_dir = self.config.vm_dir(id);
        let mut disks = plan_disks(&spec.disks, &self.config.disk_roots, &vm_dir)?;
        add_volumes(&mut disks, &spec.managed_volumes, &vm_dir)?;
        let nics = plan_nics(id, &spec.networks, &self.sys_class_net)?;
        let graphics = graphics(spec)?;
        let seed = seed_content(id, &name, spec)?;
        let seed_path = seed.as_ref().map(|_| vm_dir.join(SEED_FILE));
        if let Some(path) = &seed_path {
            add_seed(&mut disks, path.clone());
        }
        Ok(Layout {
            domain: DomainPlan {
                name,
                uuid: None,
                domain_type: self.domain_type.clone(),
                vcpus,
                memory_mib,
                disks,
                nics,
                graphics,
                graphics_password: None,
                console_log: Some(vm_dir.join(super::serial::CONSOLE_LOG)),
                marks: Marks {
                    workload_id: id.to_string(),
                    scope: self.config.scope.clone(),
                    revision: workload.revision_id().to_string(),
                    spec_hash: workload.spec_hash(),
                    generation: workload.generation(),
                    created_disks: Vec::new(),
                    seed: seed_path.map(|p| p.to_string_lossy().into_owned()),
                },
            },
            seed,
            vm_dir,
        })
    }

    /// The name of the Go agent's domain the workload adopted, which it
    /// keeps: as remembered here, or as its status records.
    fn adopted_name(&self, workload: &Workload) -> Option<String> {
        self.workloads
            .get(workload.id(), |m| m.adopted_name.clone())
            .flatten()
            .or_else(|| adopt::recorded_name(workload.status.as_ref()).map(String::from))
    }

    /// Takes over the Go agent's domain of the workload — the one named by
    /// the workload id, with no marks — once per spec since the agent
    /// started: adopted as it runs when its definition is what the Go
    /// agent made of the spec (marked, nothing recorded as created, named
    /// as it is from then on), else replaced (its disks kept).
    async fn take_over(&self, workload: &Workload, layout: &mut Layout) -> Result<(), VmError> {
        let id = workload.id();
        if self
            .workloads
            .with(id, |m| std::mem::replace(&mut m.go_checked, true))
        {
            return Ok(());
        }
        let looked = async {
            let scope = &self.config.scope;
            let Some(found) = self.hypervisor.lookup(id, scope, id, false).await?.by_name else {
                return Ok(None);
            };
            if found.marks.is_some() {
                // This agent's, or another scope's: never the Go agent's.
                return Ok(None);
            }
            Ok(self
                .hypervisor
                .inspect(id, &found.uuid)
                .await?
                .map(|live| (found, live)))
        };
        let (found, live) = match looked.await {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(()),
            Err(error) => {
                self.workloads.with(id, |m| m.go_checked = false);
                return Err(error);
            }
        };
        let Ok(spec) = vm_spec(workload) else {
            return Ok(());
        };
        match adopt::difference(spec, &live) {
            None => {
                let marks = Marks {
                    created_disks: Vec::new(),
                    seed: None,
                    ..layout.domain.marks.clone()
                };
                if let Err(error) = self.hypervisor.set_marks(id, &found.uuid, &marks).await {
                    self.workloads.with(id, |m| m.go_checked = false);
                    return Err(error);
                }
                layout.domain.name = found.name.clone();
                let stored_restarts = workload.status.as_ref().map_or(0, |s| s.restart_count);
                self.workloads.with(id, |m| {
                    m.adopted_name = Some(found.name.clone());
                    // Adopted here: the first look's generic adoption is not
                    // needed.
                    m.track(&marks.spec_hash, stored_restarts);
                });
                tracing::info!(domain = %found.name, uuid = %found.uuid, "adopted the Go agent's domain");
                let message = format!(
                    "adopted domain {} ({}) of the Go agent as it is (no restart); its disks are not the agent's and stay when the workload is deleted",
                    found.name, found.uuid
                );
                self.events
                    .event(id, EventType::Normal, "Adopted", message)
                    .await;
            }
            Some(difference) => {
                tracing::info!(domain = %found.name, %difference, "replacing the Go agent's domain");
                let message = format!(
                    "domain {} of the Go agent differs from the spec ({difference}); replacing it (its disks are kept)",
                    found.name
                );
                self.events
                    .event(id, EventType::Normal, "Replacing", message)
                    .await;
                let why = "replaced: it differs from the spec";
                if let Err(error) = self.tear_down(id, vec![found], false, why).await {
                    self.workloads.with(id, |m| m.go_checked = false);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Writes `converged` as the status, if it differs from the stored one.
    async fn publish(&self, workload: &Workload, converged: Converged) -> Result<Action, VmError> {
        let id = workload.id();
        let domain = match &converged.uuid {
            Some(uuid) if !matches!(converged.outcome, Outcome::Unknown { .. }) => {
                match self.hypervisor.inspect(id, uuid).await {
                    Ok(found) => found,
                    Err(error) => {
                        tracing::debug!(%error, "inspecting the domain for status failed");
                        None
                    }
                }
            }
            _ => None,
        };
        let restarts = self.workloads.with(id, |m| m.crash.restarts());
        let previous = workload.status_or_default();
        let mut status = status::build(
            &previous,
            Report {
                outcome: converged.outcome,
                generation: workload.generation(),
                domain: domain.as_ref(),
                restarts,
            },
        );
        if let Some(name) = self.adopted_name(workload) {
            status
                .facts
                .insert(adopt::FACT_DOMAIN_NAME.to_string(), name);
        }
        kit::publish_status(self.writer.as_ref(), workload, status, converged.requeue)
            .await
            .map_err(|source| VmError::Store {
                id: id.to_string(),
                source,
            })
    }

    /// Reports an error that stopped the reconcile and hands it to the
    /// runtime's back-off: `Unknown` when libvirt is unreachable, `Failed`
    /// otherwise. Desired state is never touched.
    async fn publish_error(&self, workload: &Workload, error: VmError) -> Result<Action, VmError> {
        let outcome = if error.is_unreachable() {
            Outcome::Unknown {
                detail: error.detail(),
            }
        } else {
            Outcome::Failed(Failed::of_error(&error))
        };
        if let Err(write_error) = self.publish(workload, Converged::new(outcome, None)).await {
            tracing::warn!(error = %write_error, "reporting a failure failed");
        }
        Err(error)
    }

    /// Brings libvirt in line with a live workload: observe, plan, act.
    async fn converge(&self, workload: &Workload, layout: &Layout) -> Result<Converged, Halt> {
        let id = workload.id();
        let marks = &layout.domain.marks;
        let stored_restarts = workload.status.as_ref().map_or(0, |s| s.restart_count);
        let first_look = self
            .workloads
            .with(id, |m| m.track(&marks.spec_hash, stored_restarts));
        let scope = &self.config.scope;
        let observed =
            observe(&self.hypervisor, id, scope, &layout.domain.name, first_look).await?;
        let desired = Desired {
            name: &layout.domain.name,
            marks,
            running: workload.desired_state() != DesiredState::Stopped,
            reported_running: reported_running(workload),
            rules: Rules {
                crash_loop: self.config.crash_loop,
                stop_timeout: self.config.stop_timeout,
            },
        };
        let now = Instant::now();
        let plan = self
            .workloads
            .with(id, |m| plan(&desired, &observed, m, now));
        if !matches!(plan, Plan::NameTaken { .. }) {
            // Lifecycle events of these domains now map to the workload
            // without reading their marks.
            for domain in observed.domains() {
                self.index.insert(&domain.uuid, id);
            }
        }
        self.act(workload, layout, plan, now).await
    }

    /// Carries `plan` out; answers what to publish.
    async fn act(
        &self,
        workload: &Workload,
        layout: &Layout,
        mut plan: Plan,
        now: Instant,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        loop {
            plan = match plan {
                Plan::NameTaken { holder } => {
                    return Err(name_taken(&layout.domain.name, &holder));
                }
                Plan::RemoveDuplicates { duplicates, then } => {
                    self.remove_duplicates(id, &duplicates).await?;
                    *then
                }
                Plan::Adopt { domain, then } => {
                    self.adopted(id, &domain).await;
                    *then
                }
                Plan::StayUndefined => {
                    self.workloads.with(id, Memory::forget_starts);
                    return Ok(Converged::new(Outcome::Stopped, None));
                }
                Plan::Stop { domain, step } => {
                    self.workloads.with(id, Memory::forget_starts);
                    return self.stop(id, domain, step).await;
                }
                Plan::Create => {
                    self.pass_start_gate(id, now);
                    let uuid = self.define(id, layout, None).await?;
                    return self.start(id, layout, &uuid, StartKind::First).await;
                }
                Plan::HoldStart { failed, domain_off } => {
                    if domain_off {
                        self.shutdown_over(id);
                    }
                    return Err(Halt::Failed(failed));
                }
                Plan::Report { domain } => {
                    self.shutdown_over(id);
                    return Ok(Converged::new(Outcome::Running, Some(domain.uuid)));
                }
                Plan::Resume { domain } => return self.resume(id, domain).await,
                Plan::AwaitTransient { domain } => {
                    let message = format!("the guest is {}", domain.state.power.name());
                    let pending = Converged::new(Outcome::Pending { message }, Some(domain.uuid));
                    return Ok(pending.requeue(TRANSIENT_REQUEUE));
                }
                Plan::Restart(restart) => {
                    self.clear_stopped(id, &restart).await?;
                    self.pass_start_gate(id, now);
                    let (name, why) = (&restart.domain.name, &restart.why);
                    tracing::info!(domain = %name, why, "restarting a domain that stopped on its own");
                    let kind = StartKind::Restart(why.clone());
                    return self.start(id, layout, &restart.domain.uuid, kind).await;
                }
                Plan::BackOff {
                    restart,
                    delay,
                    remaining,
                    due_ms,
                } => {
                    self.clear_stopped(id, &restart).await?;
                    let converged = self.back_off(id, restart, delay, due_ms).await;
                    return Ok(converged.requeue(remaining));
                }
                Plan::Start { domain } => {
                    self.shutdown_over(id);
                    self.pass_start_gate(id, now);
                    return self.start(id, layout, &domain.uuid, StartKind::First).await;
                }
                Plan::Replace(replacement) => {
                    return self.replace(id, layout, replacement, now).await;
                }
            }
        }
    }
}

/// The VM spec of a workload.
fn vm_spec(workload: &Workload) -> Result<&VmSpec, SpecError> {
    match workload.workload_spec() {
        Some(workload_spec::Spec::Vm(spec)) => Ok(spec),
        _ => Err(SpecError::new("spec.vm", "a VM workload needs a vm spec")),
    }
}

/// True when the stored status says the current generation was running
/// (or backing off between restarts): a guest found off since then stopped
/// on its own. Read from the status, so it holds across agent restarts.
fn reported_running(workload: &Workload) -> bool {
    workload.status.as_ref().is_some_and(|s| {
        s.observed_generation == workload.generation()
            && (s.actual_state() == ActualState::Running
                || s.failure_reason == FailureReason::CrashLoopBackOff.code())
    })
}

impl Reconciler for VmController {
    type Error = VmError;

    const WORKLOAD_TYPE: WorkloadType = WorkloadType::Vm;

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, VmError> {
        let id = workload.id();
        let mut layout = match self.layout(&workload) {
            Ok(layout) => layout,
            Err(error) => {
                tracing::warn!(%error, "invalid spec; not acting on it");
                let converged = Converged::new(Outcome::Failed(Failed::invalid_spec(error)), None);
                return self.publish(&workload, converged).await;
            }
        };
        if let Some(name) = self.adopted_name(&workload) {
            layout.domain.name = name;
        }
        if let Err(error) = self.take_over(&workload, &mut layout).await {
            return self.publish_error(&workload, error).await;
        }
        match self.converge(&workload, &layout).await {
            Ok(converged) => self.publish(&workload, converged).await,
            Err(Halt::Failed(failed)) => {
                let uuid = self
                    .hypervisor
                    .lookup(id, &self.config.scope, &layout.domain.name, false)
                    .await
                    .ok()
                    .and_then(|l| l.managed.into_iter().next())
                    .map(|d| d.uuid);
                let requeue = failed.retry_in.map(|d| d.max(MIN_REQUEUE));
                let mut converged = Converged::new(Outcome::Failed(failed), uuid);
                converged.requeue = requeue;
                self.publish(&workload, converged).await
            }
            Err(Halt::Error(error)) => self.publish_error(&workload, error).await,
        }
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, VmError> {
        let id = workload.id();
        let name = self.adopted_name(&workload).unwrap_or_else(|| {
            vm_spec(&workload)
                .and_then(|spec| domain_name(id, spec))
                .unwrap_or_else(|_| id.to_string())
        });
        let lookup = self
            .hypervisor
            .lookup(id, &self.config.scope, &name, true)
            .await?;
        if let Some(remaining) = self
            .tear_down(id, lookup.managed, true, "the workload is deleted")
            .await?
        {
            return Ok(Cleanup::RequeueAfter(remaining));
        }
        self.remove_dhcp_hosts(&workload).await;
        self.forget(id);
        Ok(Cleanup::Done)
    }

    async fn reconcile_missing(&self, id: &str, orphaned_for: Duration) -> Result<Action, VmError> {
        let lookup = self
            .hypervisor
            .lookup(id, &self.config.scope, id, true)
            .await?;
        if lookup.managed.is_empty() {
            self.forget(id);
            return Ok(Action::await_change());
        }
        if let Some(left) = orphan_grace_left(self.config.orphan_grace, orphaned_for) {
            tracing::debug!(remaining = ?left, "orphan domain within its grace period");
            return Ok(Action::requeue(left));
        }
        tracing::info!(
            domains = lookup.managed.len(),
            "removing an orphan: no workload for {:?}",
            self.config.orphan_grace
        );
        self.tear_down(id, lookup.managed, false, "its workload is gone")
            .await?;
        self.forget(id);
        Ok(Action::await_change())
    }
}
