//! The VM controller: makes libvirt's domains match the VM workloads, one
//! level-triggered reconcile at a time.
//!
//! Each reconcile plans the domain from the spec (checking it again), looks
//! the workload's domains up by the marks in their metadata, and takes one
//! step: define and start; ACPI shutdown, then destroy once the stop timeout
//! has passed (by requeueing, never by sleeping); replace a domain of an
//! older spec; restart a guest that stopped on its own, with kubelet's
//! crash-loop back-off. The status is written only when it changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use persys_api::now_ms;
use persys_api::v1::{
    ActualState, DesiredState, EventType, VmSpec, Workload, WorkloadType, workload_spec,
};
use tokio::time::Instant;

use super::config::{VmConfig, resolve_domain_type};
use super::disks::{self, CreatedDisks, DiskKind, add_seed, plan_disks};
use super::domain_xml::{
    DomainPlan, NicSource, dhcp_host_xml, domain_name, graphics, plan_nics, resources,
};
use super::errors::{FailureReason, Operation, SpecError, VmError};
use super::events::{DomainIndex, LifecycleTrigger};
use super::libvirt::{FoundDomain, Hypervisor};
use super::marks::Marks;
use super::seed::{SEED_FILE, SeedContent, ensure_seed, seed_content};
use super::status::{self, Outcome, Report};
use super::usage::{UsageSampler, UsageSnapshots};
use crate::controller::{Action, Cleanup, Reconciler};
use crate::crash_loop::{CrashLoop, Gate};
use crate::informer::Cache;
use crate::kit::{self, Failed, Recorder, Workloads};
use crate::source::WorkloadWriter;

/// How soon to look again at a guest in a passing state (shutting down on
/// its own, suspended).
const TRANSIENT_REQUEUE: Duration = Duration::from_secs(1);

/// How soon to retry when the domain name is held by a domain the agent
/// does not manage.
const NAME_TAKEN_RETRY: Duration = Duration::from_secs(30);

/// What the controller remembers of one workload between reconciles. None
/// of it needs to survive an agent restart: a shutdown in progress starts
/// over (ACPI again, a full timeout), back-offs are forgotten as kubelet
/// forgets them, and the restart count comes back from the stored status.
#[derive(Debug, Default)]
struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    spec_hash: String,
    crash: CrashLoop,
    /// When the ACPI shutdown in progress was asked for.
    shutdown_since: Option<Instant>,
    /// Whether every domain was searched for this workload's marks since
    /// the agent started (later reconciles look it up by name).
    scanned: bool,
    /// Why the last define or start failed, reported while backing off.
    last_failure: Option<(FailureReason, String)>,
}

/// How a convergence stopped short of the desired state.
type Halt = kit::Halt<VmError>;

impl From<VmError> for Halt {
    fn from(error: VmError) -> Self {
        Halt::Error(error)
    }
}

/// The result of one convergence, to publish as status.
struct Converged {
    outcome: Outcome,
    /// The domain to describe in status.
    uuid: Option<String>,
    requeue: Option<Duration>,
}

impl Converged {
    fn new(outcome: Outcome, uuid: Option<String>) -> Self {
        Converged {
            outcome,
            uuid,
            requeue: None,
        }
    }

    fn requeue(mut self, after: Duration) -> Self {
        self.requeue = Some(after);
        self
    }
}

/// Where a stop is.
enum StopProgress {
    /// The domain is off.
    Off,
    /// Waiting for the guest to power off; look again after this long.
    Waiting(Duration),
}

/// A workload's domain, planned from its spec.
struct Plan {
    domain: DomainPlan,
    seed: Option<SeedContent>,
    /// `<state>/vm/<id>`.
    vm_dir: PathBuf,
}

/// Converges libvirt domains to the VM workloads.
pub struct VmController {
    config: VmConfig,
    /// `kvm` or `qemu`, decided once.
    domain_type: String,
    hypervisor: Hypervisor,
    writer: Arc<dyn WorkloadWriter>,
    /// What is remembered per workload between reconciles, and since when
    /// each orphan (a managed domain without a workload) has been seen.
    workloads: Workloads<Memory>,
    events: Recorder,
    /// Domain UUID → workload id, shared with the event trigger.
    index: DomainIndex,
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

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// `kvm` or `qemu`: the type new domains are defined with.
    pub fn domain_type(&self) -> &str {
        &self.domain_type
    }

    pub fn hypervisor(&self) -> &Hypervisor {
        &self.hypervisor
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
    fn plan(&self, workload: &Workload) -> Result<Plan, SpecError> {
        let id = workload.id();
        let spec = vm_spec(workload)?;
        let name = domain_name(id, spec)?;
        let (vcpus, memory_mib) = resources(spec)?;
        let mut disks = plan_disks(&spec.disks, &self.config.disk_roots)?;
        let nics = plan_nics(id, &spec.networks, &self.sys_class_net)?;
        let graphics = graphics(spec)?;
        let vm_dir = self.config.vm_dir(id);
        let seed = seed_content(id, &name, spec)?;
        let seed_path = seed.as_ref().map(|_| vm_dir.join(SEED_FILE));
        if let Some(path) = &seed_path {
            add_seed(&mut disks, path.clone());
        }
        Ok(Plan {
            domain: DomainPlan {
                name,
                uuid: None,
                domain_type: self.domain_type.clone(),
                vcpus,
                memory_mib,
                disks,
                nics,
                graphics,
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
        let status = status::build(
            &previous,
            Report {
                outcome: converged.outcome,
                generation: workload.generation(),
                domain: domain.as_ref(),
                restarts,
            },
        );
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
            Outcome::Failed {
                reason: error.reason(),
                detail: error.detail(),
                due_ms: None,
            }
        };
        if let Err(write_error) = self.publish(workload, Converged::new(outcome, None)).await {
            tracing::warn!(error = %write_error, "reporting a failure failed");
        }
        Err(error)
    }

    /// Brings libvirt in line with a live workload.
    async fn converge(&self, workload: &Workload, plan: &Plan) -> Result<Converged, Halt> {
        let id = workload.id();
        let hash = plan.domain.marks.spec_hash.clone();
        let (first_sight, scan) = self.workloads.with(id, |m| {
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
                let scanned = m.scanned;
                *m = Memory {
                    spec_hash: hash.clone(),
                    crash: CrashLoop::new(carried),
                    scanned,
                    ..Default::default()
                };
            }
            let scan = !m.scanned;
            m.scanned = true;
            (fresh, scan)
        });

        let scope = &self.config.scope;
        let lookup = self
            .hypervisor
            .lookup(id, scope, &plan.domain.name, scan)
            .await?;
        if let Some(named) = &lookup.by_name
            && !named.marks.as_ref().is_some_and(|m| m.is(id, scope))
        {
            let holder = match &named.marks {
                Some(marks) if marks.scope == *scope => {
                    format!("the domain of workload {:?}", marks.workload_id)
                }
                Some(marks) => format!("a domain of another persys scope ({:?})", marks.scope),
                None => "a domain persys does not manage".to_string(),
            };
            return Err(Halt::Failed(Failed {
                reason: FailureReason::RuntimeError,
                detail: format!(
                    "the domain name {:?} is taken by {holder}",
                    plan.domain.name
                ),
                retry_in: Some(NAME_TAKEN_RETRY),
                due_ms: Some(now_ms() + NAME_TAKEN_RETRY.as_millis() as i64),
            }));
        }
        let mut managed = lookup.managed;
        // The domain with the planned name first.
        managed.sort_by_key(|d| d.name != plan.domain.name);
        for domain in &managed {
            self.index.insert(&domain.uuid, id);
        }
        let mut managed = managed.into_iter();
        let current = managed.next();
        for duplicate in managed {
            tracing::warn!(domain = %duplicate.name, "removing a duplicate domain");
            self.hypervisor.destroy(id, &duplicate.uuid).await?;
            self.hypervisor.undefine(id, &duplicate.uuid).await?;
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Undefined",
                    format!(
                        "undefined duplicate domain {} ({})",
                        duplicate.name, duplicate.uuid
                    ),
                )
                .await;
        }
        if first_sight && let Some(found) = &current {
            tracing::info!(domain = %found.name, uuid = %found.uuid, "adopted an existing domain");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Adopted",
                    format!("adopted domain {} ({})", found.name, found.uuid),
                )
                .await;
        }

        match workload.desired_state() {
            DesiredState::Stopped => self.converge_stopped(workload, current).await,
            DesiredState::Running | DesiredState::Unspecified => {
                self.converge_running(workload, plan, current).await
            }
        }
    }

    async fn converge_stopped(
        &self,
        workload: &Workload,
        current: Option<FoundDomain>,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        // A later start is a fresh start, not a crash-loop restart.
        self.workloads.with(id, |m| {
            let restarts = m.crash.restarts();
            m.crash = CrashLoop::new(restarts);
            m.last_failure = None;
        });
        let Some(domain) = current else {
            // Nothing is created to stay stopped.
            return Ok(Converged::new(Outcome::Stopped, None));
        };
        match self
            .stop_step(id, &domain, "the desired state is stopped")
            .await?
        {
            StopProgress::Off => Ok(Converged::new(Outcome::Stopped, Some(domain.uuid))),
            StopProgress::Waiting(remaining) => Ok(Converged::new(
                Outcome::Pending {
                    message: format!(
                        "stopping: waiting up to {}s for the guest to power off",
                        remaining.as_secs().max(1)
                    ),
                },
                Some(domain.uuid),
            )
            .requeue(remaining)),
        }
    }

    async fn converge_running(
        &self,
        workload: &Workload,
        plan: &Plan,
        current: Option<FoundDomain>,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        let Some(domain) = current else {
            self.gate_start(id)?;
            let uuid = self.define(id, plan, None).await?;
            return self.start(workload, plan, &uuid, StartKind::First).await;
        };
        let stale = domain.name != plan.domain.name
            || domain.marks.as_ref().map(|m| m.spec_hash.as_str())
                != Some(plan.domain.marks.spec_hash.as_str());
        if stale {
            return self.replace(workload, plan, domain).await;
        }
        use super::libvirt::PowerState as P;
        match domain.state.power {
            P::Running | P::Blocked => {
                self.workloads.with(id, |m| m.shutdown_since = None);
                Ok(Converged::new(Outcome::Running, Some(domain.uuid)))
            }
            P::Paused => {
                tracing::info!(domain = %domain.name, reason = domain.state.reason_text(), "resuming a paused domain");
                self.hypervisor.resume(id, &domain.uuid).await?;
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Resumed",
                        format!(
                            "resumed domain {} (paused: {})",
                            domain.name,
                            domain.state.reason_text()
                        ),
                    )
                    .await;
                Ok(Converged::new(Outcome::Running, Some(domain.uuid)))
            }
            P::ShuttingDown | P::Suspended => Ok(Converged::new(
                Outcome::Pending {
                    message: format!("the guest is {}", domain.state.power.name()),
                },
                Some(domain.uuid),
            )
            .requeue(TRANSIENT_REQUEUE)),
            P::Crashed => {
                // A crashed guest keeps its qemu process: clear it, then
                // restart as for any guest that stopped on its own.
                self.hypervisor.destroy(id, &domain.uuid).await?;
                self.restart(workload, plan, &domain, "the guest crashed")
                    .await
            }
            P::Shutoff | P::NoState => {
                let stopped_on_its_own = !domain.state.never_ran()
                    && reported_running(workload)
                    && self.workloads.with(id, |m| m.shutdown_since.is_none());
                self.workloads.with(id, |m| m.shutdown_since = None);
                if stopped_on_its_own {
                    let why = format!("the guest stopped ({})", domain.state.reason_text());
                    self.restart(workload, plan, &domain, &why).await
                } else {
                    self.gate_start(id)?;
                    self.start(workload, plan, &domain.uuid, StartKind::First)
                        .await
                }
            }
        }
    }

    /// Starts a guest that stopped on its own, once the crash-loop back-off
    /// allows.
    async fn restart(
        &self,
        workload: &Workload,
        plan: &Plan,
        domain: &FoundDomain,
        why: &str,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        let policy = self.config.crash_loop;
        let gate = self
            .workloads
            .with(id, |m| m.crash.gate(&policy, Instant::now()));
        if let Gate::Closed {
            delay,
            remaining,
            due_ms,
        } = gate
        {
            self.events
                .event(
                    id,
                    EventType::Warning,
                    "BackOff",
                    format!("back-off restarting domain {}: {why}", domain.name),
                )
                .await;
            return Ok(Converged::new(
                Outcome::BackingOff {
                    delay,
                    due_ms,
                    why: why.to_string(),
                },
                Some(domain.uuid.clone()),
            )
            .requeue(remaining));
        }
        tracing::info!(domain = %domain.name, why, "restarting a domain that stopped on its own");
        self.start(
            workload,
            plan,
            &domain.uuid,
            StartKind::Restart(why.to_string()),
        )
        .await
    }

    /// Replaces a domain of an older spec (or name): stop with grace, then
    /// redefine in place (same UUID) or, for a new name, undefine and define
    /// anew; then start.
    async fn replace(
        &self,
        workload: &Workload,
        plan: &Plan,
        domain: FoundDomain,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        let old_revision = domain
            .marks
            .as_ref()
            .map(|m| m.revision.clone())
            .unwrap_or_default();
        let why = format!(
            "the spec changed (revision {old_revision} → {})",
            workload.revision_id()
        );
        if let StopProgress::Waiting(remaining) = self.stop_step(id, &domain, &why).await? {
            return Ok(Converged::new(
                Outcome::Pending {
                    message: format!("replacing: waiting for the guest to power off ({why})"),
                },
                Some(domain.uuid),
            )
            .requeue(remaining));
        }
        let keep_uuid = if domain.name == plan.domain.name {
            Some(domain.uuid.clone())
        } else {
            self.hypervisor.undefine(id, &domain.uuid).await?;
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Undefined",
                    format!(
                        "undefined domain {} ({why}; renamed to {})",
                        domain.name, plan.domain.name
                    ),
                )
                .await;
            None
        };
        self.gate_start(id)?;
        let uuid = self.define(id, plan, keep_uuid).await?;
        self.start(workload, plan, &uuid, StartKind::First).await
    }

    /// One step of a graceful stop: ACPI shutdown first, destroy once the
    /// stop timeout has passed since.
    async fn stop_step(
        &self,
        id: &str,
        domain: &FoundDomain,
        why: &str,
    ) -> Result<StopProgress, VmError> {
        if !domain.state.power.is_active() {
            self.workloads.with(id, |m| m.shutdown_since = None);
            return Ok(StopProgress::Off);
        }
        let timeout = self.config.stop_timeout;
        match self.workloads.with(id, |m| m.shutdown_since) {
            None => {
                tracing::info!(domain = %domain.name, why, "shutting down (ACPI)");
                self.hypervisor.shutdown(id, &domain.uuid).await?;
                self.workloads
                    .with(id, |m| m.shutdown_since = Some(Instant::now()));
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "ShuttingDown",
                        format!(
                            "sent an ACPI shutdown to domain {} ({why}); destroying it after {}s",
                            domain.name,
                            timeout.as_secs()
                        ),
                    )
                    .await;
                // Some guests (and the test driver) are off at once.
                let state = self.hypervisor.state(id, &domain.uuid).await?;
                if state.is_none_or(|s| !s.power.is_active()) {
                    self.workloads.with(id, |m| m.shutdown_since = None);
                    return Ok(StopProgress::Off);
                }
                Ok(StopProgress::Waiting(timeout))
            }
            Some(since) if since.elapsed() >= timeout => {
                tracing::info!(domain = %domain.name, ?timeout, "the guest did not power off in time; destroying");
                self.hypervisor.destroy(id, &domain.uuid).await?;
                self.workloads.with(id, |m| m.shutdown_since = None);
                self.events
                    .event(
                        id,
                        EventType::Warning,
                        "Destroyed",
                        format!(
                            "domain {} did not power off within {}s; destroyed",
                            domain.name,
                            timeout.as_secs()
                        ),
                    )
                    .await;
                Ok(StopProgress::Off)
            }
            Some(since) => Ok(StopProgress::Waiting(
                timeout
                    .saturating_sub(since.elapsed())
                    .max(Duration::from_millis(10)),
            )),
        }
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

    /// Creates what the domain needs on the host: missing disks (recorded
    /// as the agent's), the seed ISO, DHCP host entries. Returns the disks
    /// the agent created for this VM so far.
    async fn prepare(&self, id: &str, plan: &Plan) -> Result<Vec<String>, VmError> {
        let storage = |operation, message: String| {
            VmError::host(id, operation, FailureReason::StorageError, message)
        };
        tokio::fs::create_dir_all(&plan.vm_dir).await.map_err(|e| {
            storage(
                Operation::CreateDisk,
                format!("creating {}: {e}", plan.vm_dir.display()),
            )
        })?;
        let record = CreatedDisks::in_dir(&plan.vm_dir);
        for disk in plan.domain.disks.iter().filter(|d| !d.is_seed) {
            if tokio::fs::metadata(&disk.path).await.is_ok() {
                continue;
            }
            let shown = disk.path.display();
            if disk.kind == DiskKind::Cdrom {
                return Err(storage(
                    Operation::CreateDisk,
                    format!("the cdrom image {shown} does not exist"),
                ));
            }
            if disk.size_gb <= 0 {
                return Err(storage(
                    Operation::CreateDisk,
                    format!(
                        "the disk {shown} does not exist and size_gb is 0, so it cannot be created"
                    ),
                ));
            }
            disks::create_disk(&disk.path, disk.format, disk.size_gb)
                .await
                .map_err(|message| storage(Operation::CreateDisk, message))?;
            record.add(&disk.path).await.map_err(|e| {
                storage(
                    Operation::CreateDisk,
                    format!("recording {shown} as created by the agent: {e}"),
                )
            })?;
            tracing::info!(disk = %shown, size_gb = disk.size_gb, "created a disk");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "DiskCreated",
                    format!(
                        "created disk {shown} ({} GiB {})",
                        disk.size_gb,
                        disk.format.driver_type()
                    ),
                )
                .await;
        }
        if let Some(content) = &plan.seed {
            let (path, built) = ensure_seed(&plan.vm_dir, content)
                .await
                .map_err(|message| storage(Operation::BuildSeed, message))?;
            if built {
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "SeedBuilt",
                        format!("built the cloud-init seed {}", path.display()),
                    )
                    .await;
            }
        }
        for nic in &plan.domain.nics {
            match (&nic.source, dhcp_host_xml(nic, &plan.domain.name)) {
                (NicSource::Network(network), Some(host)) => {
                    self.hypervisor
                        .set_dhcp_host(id, network, host, &nic.mac)
                        .await?;
                }
                (_, Some(_)) => {
                    tracing::warn!(mac = %nic.mac, "ip_address is only applied on libvirt-managed networks (DHCP host entry); configure it in the guest")
                }
                _ => {}
            }
        }
        let created = record.load().await.map_err(|e| {
            storage(
                Operation::CreateDisk,
                format!("reading the record of created disks: {e}"),
            )
        })?;
        Ok(created
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect())
    }

    /// Prepares the host and defines the domain (keeping `uuid` when
    /// redefining); returns its UUID.
    async fn define(&self, id: &str, plan: &Plan, uuid: Option<String>) -> Result<String, Halt> {
        let created = match self.prepare(id, plan).await {
            Ok(created) => created,
            Err(error) if error.is_unreachable() => return Err(Halt::Error(error)),
            Err(error) => return Err(self.failed_attempt(id, error).await),
        };
        let mut domain = plan.domain.clone();
        domain.uuid = uuid;
        domain.marks.created_disks = created;
        let redefined = domain.uuid.is_some();
        let uuid = match self.hypervisor.define(id, domain.to_xml()).await {
            Ok(uuid) => uuid,
            Err(error) if error.is_unreachable() => return Err(Halt::Error(error)),
            Err(error) => return Err(self.failed_attempt(id, error).await),
        };
        self.index.insert(&uuid, id);
        tracing::info!(domain = %domain.name, %uuid, redefined, "defined");
        self.events
            .event(
                id,
                EventType::Normal,
                "Defined",
                format!(
                    "{} domain {} ({uuid}, revision {})",
                    if redefined { "redefined" } else { "defined" },
                    domain.name,
                    domain.marks.revision
                ),
            )
            .await;
        Ok(uuid)
    }

    /// Starts a defined domain.
    async fn start(
        &self,
        workload: &Workload,
        plan: &Plan,
        uuid: &str,
        kind: StartKind,
    ) -> Result<Converged, Halt> {
        let id = workload.id();
        // Disks or the seed may have been removed since the define.
        if let Err(error) = self.prepare(id, plan).await {
            if error.is_unreachable() {
                return Err(Halt::Error(error));
            }
            return Err(self.failed_attempt(id, error).await);
        }
        let started = self.hypervisor.start(id, uuid).await;
        let (now, wall) = (Instant::now(), now_ms());
        match started {
            Ok(()) => {
                let restarts = self.workloads.with(id, |m| {
                    match &kind {
                        StartKind::First => m.crash.started(now, wall),
                        StartKind::Restart(_) => m.crash.restarted(now, wall),
                    }
                    m.last_failure = None;
                    m.shutdown_since = None;
                    m.crash.restarts()
                });
                let (reason, message) = match &kind {
                    StartKind::First => ("Started", format!("started domain {}", plan.domain.name)),
                    StartKind::Restart(why) => (
                        "Restarted",
                        format!(
                            "restarted domain {} ({why}; restart {restarts})",
                            plan.domain.name
                        ),
                    ),
                };
                tracing::info!(domain = %plan.domain.name, %uuid, "{}", message);
                self.events
                    .event(id, EventType::Normal, reason, message)
                    .await;
                Ok(Converged::new(Outcome::Running, Some(uuid.to_string())))
            }
            Err(error) if error.is_unreachable() => Err(Halt::Error(error)),
            Err(error) => Err(self.failed_attempt(id, error).await),
        }
    }

    /// Turns a failed define, start or host preparation into what is
    /// reported: terminal failures are not retried; others wait the
    /// crash-loop back-off.
    async fn failed_attempt(&self, id: &str, error: VmError) -> Halt {
        let reason = error.reason();
        let detail = error.detail();
        tracing::warn!(%error, "the VM could not be started");
        self.events
            .event(id, EventType::Warning, "Failed", detail.clone())
            .await;
        let policy = self.config.crash_loop;
        let now = (Instant::now(), now_ms());
        let failed = self.workloads.with(id, |m| {
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

    /// Stops (gracefully, step by step) and undefines every domain of a
    /// workload, then removes the files the agent created for it.
    async fn tear_down(
        &self,
        id: &str,
        domains: Vec<FoundDomain>,
        graceful: bool,
        why: &str,
    ) -> Result<Option<Duration>, VmError> {
        for domain in &domains {
            if graceful {
                if let StopProgress::Waiting(remaining) = self.stop_step(id, domain, why).await? {
                    return Ok(Some(remaining));
                }
            } else if domain.state.power.is_active() {
                self.hypervisor.destroy(id, &domain.uuid).await?;
                self.events
                    .event(
                        id,
                        EventType::Normal,
                        "Destroyed",
                        format!("destroyed domain {} ({why})", domain.name),
                    )
                    .await;
            }
        }
        let mut created: BTreeSet<PathBuf> = BTreeSet::new();
        for domain in &domains {
            if let Some(marks) = &domain.marks {
                created.extend(marks.created_disks.iter().map(PathBuf::from));
            }
            self.hypervisor.undefine(id, &domain.uuid).await?;
            tracing::info!(domain = %domain.name, why, "undefined");
            self.events
                .event(
                    id,
                    EventType::Normal,
                    "Undefined",
                    format!("undefined domain {} ({why})", domain.name),
                )
                .await;
        }
        let vm_dir = self.config.vm_dir(id);
        match CreatedDisks::in_dir(&vm_dir).load().await {
            Ok(recorded) => created.extend(recorded),
            Err(e) => {
                return Err(VmError::host(
                    id,
                    Operation::RemoveDisk,
                    FailureReason::StorageError,
                    format!("reading the record of created disks: {e}"),
                ));
            }
        }
        for path in &created {
            match disks::remove_disk(path, &self.config.disk_roots).await {
                Ok(()) => {
                    tracing::info!(disk = %path.display(), "removed a disk the agent created")
                }
                Err(message) => {
                    // Never block a deletion on a file the rules now forbid
                    // touching: keep it, say so.
                    tracing::warn!(disk = %path.display(), %message, "keeping a disk");
                    self.events
                        .event(id, EventType::Warning, "DiskKept", message)
                        .await;
                }
            }
        }
        remove_vm_dir(id, &vm_dir).await?;
        Ok(None)
    }

    /// Removes the DHCP host entries the spec asked for (best effort).
    async fn remove_dhcp_hosts(&self, workload: &Workload) {
        let Ok(plan) = self.plan(workload) else {
            return;
        };
        for nic in &plan.domain.nics {
            if let (NicSource::Network(network), Some(_)) = (&nic.source, nic.ip)
                && let Err(error) = self
                    .hypervisor
                    .remove_dhcp_host(workload.id(), network, &nic.mac)
                    .await
            {
                tracing::warn!(%error, "removing a DHCP host entry failed");
            }
        }
    }
}

/// Which start a domain is getting.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StartKind {
    /// A first start, or a start after a requested stop.
    First,
    /// After it stopped on its own: counts as a restart.
    Restart(String),
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

async fn remove_vm_dir(id: &str, vm_dir: &Path) -> Result<(), VmError> {
    match tokio::fs::remove_dir_all(vm_dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmError::host(
            id,
            Operation::RemoveDisk,
            FailureReason::StorageError,
            format!("removing {}: {e}", vm_dir.display()),
        )),
    }
}

impl Reconciler for VmController {
    type Error = VmError;

    fn name(&self) -> &'static str {
        "vm"
    }

    fn is_runtime_unreachable(&self, error: &VmError) -> bool {
        matches!(error, VmError::Unreachable { .. })
    }

    fn workload_type(&self) -> WorkloadType {
        WorkloadType::Vm
    }

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, VmError> {
        let id = workload.id();
        self.workloads.claimed(id);
        let plan = match self.plan(&workload) {
            Ok(plan) => plan,
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
                return self.publish(&workload, converged).await;
            }
        };
        match self.converge(&workload, &plan).await {
            Ok(converged) => self.publish(&workload, converged).await,
            Err(Halt::Failed(Failed {
                reason,
                detail,
                retry_in,
                due_ms,
            })) => {
                let uuid = self
                    .hypervisor
                    .lookup(id, &self.config.scope, &plan.domain.name, false)
                    .await
                    .ok()
                    .and_then(|l| l.managed.into_iter().next())
                    .map(|d| d.uuid);
                let mut converged = Converged::new(
                    Outcome::Failed {
                        reason,
                        detail,
                        due_ms,
                    },
                    uuid,
                );
                converged.requeue = retry_in.map(|d| d.max(Duration::from_millis(10)));
                self.publish(&workload, converged).await
            }
            Err(Halt::Error(error)) => self.publish_error(&workload, error).await,
        }
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, VmError> {
        let id = workload.id();
        let name = vm_spec(&workload)
            .and_then(|spec| domain_name(id, spec))
            .unwrap_or_else(|_| id.to_string());
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

    async fn reconcile_missing(&self, id: &str) -> Result<Action, VmError> {
        let lookup = self
            .hypervisor
            .lookup(id, &self.config.scope, id, true)
            .await?;
        if lookup.managed.is_empty() {
            self.forget(id);
            return Ok(Action::await_change());
        }
        if let Some(left) = self
            .workloads
            .orphan_grace_left(id, self.config.orphan_grace)
        {
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
