//! The policy's ceilings, enforced at apply: what one workload may be
//! promised, and what the node promises in all. Beyond one, the apply is
//! refused with RESOURCE_EXHAUSTED naming the ceiling and the figures, and
//! nothing is stored.
//!
//! "In use" is what the other workloads' specs promise: a ledger kept from
//! the informer's notifications (so an apply costs a lookup, not a sum over
//! the node), plus applies admitted but not yet in it: each admitted apply
//! holds a [`Reservation`] until the ledger has it, so concurrent applies
//! cannot each fit alone and together overshoot. A re-apply of a workload
//! replaces its own share.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use persys_api::v1::{DesiredState, Workload, WorkloadSpec, workload_spec};
use persys_controllers::policy::{Ceilings, refusal};
use persys_controllers::source::ChangeKind;
use persys_controllers::{Informer, Notification};
use tokio::sync::broadcast::error::RecvError;

use crate::tasks::Tasks;

const MIB: u64 = 1024 * 1024;

/// Object label: the CPU (millicpus) a compose workload's services are
/// limited to in all, as counted at apply.
pub const COMPOSE_MILLICPUS: &str = "persys.compose.limits.millicpus";
/// Object label: the memory (MiB) a compose workload's services are
/// limited to in all, as counted at apply.
pub const COMPOSE_MEMORY_MIB: &str = "persys.compose.limits.memory-mib";

/// The labels that record a compose workload's figures.
pub fn compose_labels(
    resources: persys_controllers::compose::ComposeResources,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            COMPOSE_MILLICPUS.to_string(),
            resources.millicpus.clamp(0, MAX_FIGURE).to_string(),
        ),
        (
            COMPOSE_MEMORY_MIB.to_string(),
            resources.memory_mib.clamp(0, MAX_FIGURE).to_string(),
        ),
    ])
}

/// What a workload's spec promises: CPU (VM vCPUs; container CPU shares at
/// 1024 a CPU; a compose project's CPU limits), memory (VM memory;
/// container and compose memory limits) and disk (VM disks, managed
/// volumes).
///
/// A compose project's figures are its services' limits times their
/// containers ([`persys_controllers::compose::declared_resources`]), read
/// from the file once, at apply, and recorded with the object under
/// [`COMPOSE_MILLICPUS`] and [`COMPOSE_MEMORY_MIB`]: the ledger and the
/// heartbeat read them from there instead of parsing the file at every
/// status change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub millicpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The most one workload is counted for in each dimension: 2^40 (a
/// billion CPUs, an exbibyte of memory, a zebibyte of disk). The figures
/// come from the client's spec, which may say anything up to `i64::MAX`;
/// beyond this no ceiling can pass them anyway, and capped figures keep the
/// ledger's sums exact for four million workloads.
pub const MAX_FIGURE: i64 = 1 << 40;

/// Sums `values` without overflow, each and the total within [`MAX_FIGURE`].
fn sum_capped(values: impl Iterator<Item = i64>) -> i64 {
    values
        .fold(0i64, |total, v| {
            total.saturating_add(v.clamp(0, MAX_FIGURE))
        })
        .min(MAX_FIGURE)
}

impl Figures {
    /// What `spec` promises, with `labels` the object's (a compose
    /// workload's figures are recorded there). Saturating: no spec can
    /// overflow the sums.
    pub fn of_spec(spec: &workload_spec::Spec, labels: &BTreeMap<String, String>) -> Figures {
        let figures = match spec {
            workload_spec::Spec::Container(container) => {
                let (millicpus, memory_mib) = match &container.resources {
                    Some(resources) => (
                        resources
                            .cpu_shares
                            .max(0)
                            .saturating_mul(1000)
                            .saturating_add(512)
                            / 1024,
                        (resources.memory_bytes.max(0) as u64).div_ceil(MIB) as i64,
                    ),
                    None => (0, 0),
                };
                Figures {
                    millicpus,
                    memory_mib,
                    disk_gib: sum_capped(container.managed_volumes.iter().map(|v| v.size_gb)),
                }
            }
            workload_spec::Spec::Vm(vm) => Figures {
                millicpus: i64::from(vm.vcpus.max(0)).saturating_mul(1000),
                memory_mib: vm.memory_mb.max(0),
                disk_gib: sum_capped(
                    vm.disks
                        .iter()
                        .map(|d| d.size_gb)
                        .chain(vm.managed_volumes.iter().map(|v| v.size_gb)),
                ),
            },
            workload_spec::Spec::Compose(_) => {
                let label = |name: &str| {
                    labels
                        .get(name)
                        .and_then(|value| value.parse::<i64>().ok())
                        .unwrap_or(0)
                };
                Figures {
                    millicpus: label(COMPOSE_MILLICPUS),
                    memory_mib: label(COMPOSE_MEMORY_MIB),
                    disk_gib: 0,
                }
            }
        };
        Figures {
            millicpus: figures.millicpus.clamp(0, MAX_FIGURE),
            memory_mib: figures.memory_mib.clamp(0, MAX_FIGURE),
            disk_gib: figures.disk_gib.clamp(0, MAX_FIGURE),
        }
    }

    /// What a stored workload holds: nothing when it is stopped or being
    /// deleted.
    pub fn of(workload: &Workload) -> Figures {
        if workload.is_deleting() || workload.desired_state() == DesiredState::Stopped {
            return Figures::default();
        }
        let labels = workload
            .metadata
            .as_ref()
            .map(|meta| &meta.labels)
            .unwrap_or(&NO_LABELS);
        workload
            .workload_spec()
            .map(|spec| Figures::of_spec(spec, labels))
            .unwrap_or_default()
    }

    /// CPU (millicpus), memory (MiB), disk (GiB), as [`DIMENSIONS`].
    fn each(self) -> [i64; 3] {
        [self.millicpus, self.memory_mib, self.disk_gib]
    }

    fn max(self, other: Figures) -> Figures {
        Figures {
            millicpus: self.millicpus.max(other.millicpus),
            memory_mib: self.memory_mib.max(other.memory_mib),
            disk_gib: self.disk_gib.max(other.disk_gib),
        }
    }

    /// Saturating, though capped figures cannot reach `i64::MAX` before
    /// millions of workloads.
    fn add(&mut self, other: Figures) {
        self.millicpus = self.millicpus.saturating_add(other.millicpus);
        self.memory_mib = self.memory_mib.saturating_add(other.memory_mib);
        self.disk_gib = self.disk_gib.saturating_add(other.disk_gib);
    }

    fn sub(&mut self, other: Figures) {
        self.millicpus = self.millicpus.saturating_sub(other.millicpus);
        self.memory_mib = self.memory_mib.saturating_sub(other.memory_mib);
        self.disk_gib = self.disk_gib.saturating_sub(other.disk_gib);
    }

    fn minus(mut self, other: Figures) -> Figures {
        self.sub(other);
        self
    }
}

/// `2500` → `2.5`.
fn cpus(millicpus: i64) -> String {
    if millicpus % 1000 == 0 {
        (millicpus / 1000).to_string()
    } else {
        let text = format!("{:.3}", millicpus as f64 / 1000.0);
        text.trim_end_matches('0').to_string()
    }
}

/// An apply beyond a ceiling: what the caller is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("workload {id}: {message}")]
pub struct Exceeded {
    pub id: String,
    pub message: String,
}

/// What every cached workload promises, kept up to date from the
/// informer's notifications, so an apply sums nothing: it reads the total
/// and takes its own share out.
#[derive(Debug, Default)]
struct Ledger {
    /// Every cached workload (being deleted and stopped ones too: they
    /// count as workloads) and its figures.
    figures: HashMap<String, Figures>,
    /// The sum of `figures`.
    total: Figures,
    /// Applies admitted and not yet in `figures`, by token.
    pending: HashMap<u64, Pending>,
    next_token: u64,
    /// The resource version `figures` reflects (kept under the lock, so a
    /// reservation handed over is never left behind by a racing update).
    reached: Option<u64>,
}

/// An admitted apply's share while the ledger does not have it.
#[derive(Debug)]
struct Pending {
    id: String,
    figures: Figures,
    /// The resource version of the apply's write, once it is written: the
    /// ledger drops the share when it reaches it.
    until: Option<u64>,
}

impl Ledger {
    fn set(&mut self, id: &str, figures: Figures) {
        if let Some(old) = self.figures.insert(id.to_string(), figures) {
            self.total.sub(old);
        }
        self.total.add(figures);
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.figures.remove(id) {
            self.total.sub(old);
        }
    }

    fn refill(&mut self, workloads: &[Arc<Workload>], version: u64) {
        self.figures.clear();
        self.total = Figures::default();
        for workload in workloads {
            self.set(workload.id(), Figures::of(workload));
        }
        self.reach(version);
    }

    /// The ledger reflects the store up to `version`: shares of applies
    /// written at or before it are now in `figures`.
    fn reach(&mut self, version: u64) {
        self.reached = Some(version);
        self.pending
            .retain(|_, pending| pending.until.is_none_or(|until| until > version));
    }

    /// Workloads and figures in use by everyone but `id`: the ledger, and
    /// the admitted applies it does not have yet (each id once, at the
    /// larger of its figures).
    fn others(&self, id: &str) -> (u64, Figures) {
        let mut count = self.figures.len() as u64;
        let mut in_use = self.total;
        if let Some(own) = self.figures.get(id) {
            count -= 1;
            in_use.sub(*own);
        }
        let mut on_the_way: HashMap<&str, Figures> = HashMap::new();
        for pending in self.pending.values().filter(|pending| pending.id != id) {
            let entry = on_the_way.entry(&pending.id).or_default();
            *entry = entry.max(pending.figures);
        }
        for (other, figures) in on_the_way {
            match self.figures.get(other) {
                Some(known) => in_use.add(figures.max(*known).minus(*known)),
                None => {
                    count += 1;
                    in_use.add(figures);
                }
            }
        }
        (count, in_use)
    }
}

/// The ceilings of the policy in force, and what is promised under them.
#[derive(Clone)]
pub struct Admission {
    ceilings: Ceilings,
    /// A std lock: held only to read, sum and record, never across an await.
    ledger: Arc<Mutex<Ledger>>,
    /// The resource version the ledger has reached; admissions wait for
    /// its first fill, reservations for their own write.
    version: tokio::sync::watch::Sender<Option<u64>>,
}

/// An admitted apply's share: dropped, it is released at once (the apply
/// did not happen); handed to [`Admission::release_after`], the ledger
/// keeps it until it has the write.
pub struct Reservation {
    ledger: Arc<Mutex<Ledger>>,
    /// `None` once handed over to the ledger.
    token: Option<u64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(token) = self.token {
            lock(&self.ledger).pending.remove(&token);
        }
    }
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    /// Follows `informer` into the ledger until the tasks' stop, as the
    /// watched background task `ceilings-ledger`.
    pub fn start(ceilings: Ceilings, informer: &Informer, tasks: &Tasks) -> Admission {
        let stop = tasks.stop().clone();
        let admission = Admission {
            ceilings,
            ledger: Arc::default(),
            version: tokio::sync::watch::Sender::new(None),
        };
        // Subscribed before the first fill, so nothing falls between.
        let mut changes = informer.subscribe();
        let (informer, follower) = (informer.clone(), admission.clone());
        tasks.spawn("ceilings-ledger", async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = informer.wait_until_synced() => {}
            }
            follower.refill(&informer);
            loop {
                let change = tokio::select! {
                    _ = stop.cancelled() => return,
                    change = changes.recv() => change,
                };
                match change {
                    Ok(change) => follower.record(&change),
                    Err(RecvError::Lagged(_)) => follower.refill(&informer),
                    Err(RecvError::Closed) => return,
                }
            }
        });
        admission
    }

    fn refill(&self, informer: &Informer) {
        let (workloads, version) = informer.cache().snapshot();
        lock(&self.ledger).refill(&workloads, version);
        self.version.send_replace(Some(version));
    }

    fn record(&self, change: &Notification) {
        if self
            .version
            .borrow()
            .is_some_and(|v| change.resource_version <= v)
        {
            return;
        }
        {
            let mut ledger = lock(&self.ledger);
            match change.kind {
                ChangeKind::Deleted => ledger.remove(change.id()),
                ChangeKind::Added | ChangeKind::Modified => {
                    ledger.set(change.id(), Figures::of(&change.new))
                }
            }
            ledger.reach(change.resource_version);
        }
        self.version.send_replace(Some(change.resource_version));
    }

    /// Keeps `reservation` until the ledger has reached `resource_version`
    /// (the apply's write), then lets it go: the ledger drops it as it
    /// records that version, so nothing waits and nothing is spawned.
    pub fn release_after(&self, mut reservation: Reservation, resource_version: u64) {
        let Some(token) = reservation.token.take() else {
            return;
        };
        let mut ledger = lock(&self.ledger);
        if ledger.reached.is_some_and(|v| v >= resource_version) {
            ledger.pending.remove(&token);
        } else if let Some(pending) = ledger.pending.get_mut(&token) {
            pending.until = Some(resource_version);
        }
    }

    /// Waits (up to 5 s) until the ledger holds every write up to
    /// `acknowledged`, so an admission counts what was acknowledged before
    /// it (a stop just answered has freed its share). False when it did
    /// not catch up in time.
    pub async fn caught_up(&self, acknowledged: u64) -> bool {
        let mut reached = self.version.subscribe();
        let caught_up = reached.wait_for(|v| v.is_some_and(|v| v >= acknowledged));
        matches!(
            tokio::time::timeout(Duration::from_secs(5), caught_up).await,
            Ok(Ok(_))
        )
    }

    /// Admits workload `id` with `spec` and `desired` state, or says which
    /// ceiling it would break. Waits (briefly) for the informer's first
    /// list, so the figures in use are the node's.
    pub async fn admit(
        &self,
        id: &str,
        spec: &WorkloadSpec,
        labels: &BTreeMap<String, String>,
        desired: DesiredState,
    ) -> Result<Reservation, Exceeded> {
        let exceeded = |message: String| Exceeded {
            id: id.to_string(),
            message,
        };
        let wanted = spec
            .spec
            .as_ref()
            .map(|spec| Figures::of_spec(spec, labels))
            .unwrap_or_default();
        self.check_workload(wanted).map_err(exceeded)?;
        let mut filled = self.version.subscribe();
        let first_fill = filled.wait_for(Option::is_some);
        if !matches!(
            tokio::time::timeout(Duration::from_secs(5), first_fill).await,
            Ok(Ok(_))
        ) {
            return Err(exceeded(
                "the workloads in use are not known yet (the informer has not listed); retry"
                    .into(),
            ));
        }
        let requested = if desired == DesiredState::Stopped {
            Figures::default()
        } else {
            wanted
        };
        let mut ledger = lock(&self.ledger);
        let (others, in_use) = ledger.others(id);
        let own = ledger.figures.get(id).copied();
        self.check_node(others, in_use, requested, own)
            .map_err(exceeded)?;
        let token = ledger.next_token;
        ledger.next_token += 1;
        ledger.pending.insert(
            token,
            Pending {
                id: id.to_string(),
                figures: requested,
                until: None,
            },
        );
        Ok(Reservation {
            ledger: self.ledger.clone(),
            token: Some(token),
        })
    }

    fn check_workload(&self, wanted: Figures) -> Result<(), String> {
        let ceiling = &self.ceilings.workload;
        let limits = [
            ceiling.vcpus.saturating_mul(1000),
            ceiling.memory_mib,
            ceiling.disk_gib,
        ]
        .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        for (dimension, (limit, wanted)) in
            DIMENSIONS.iter().zip(limits.into_iter().zip(wanted.each()))
        {
            if wanted > limit {
                return Err(refusal(
                    format_args!(
                        "workload {} ceiling {}: {} requested",
                        dimension.name,
                        dimension.show(limit),
                        dimension.show(wanted)
                    ),
                    dimension.workload_rule,
                ));
            }
        }
        Ok(())
    }

    /// The node's ceilings, for a workload that holds `own` now (none: a
    /// new one). An update that asks for no more than it holds passes even
    /// on a node over a ceiling (one lowered since), as Kubernetes' quotas
    /// let through updates that do not grow.
    fn check_node(
        &self,
        others: u64,
        in_use: Figures,
        requested: Figures,
        own: Option<Figures>,
    ) -> Result<(), String> {
        let ceiling = &self.ceilings.node;
        if own.is_none() && others + 1 > ceiling.workloads {
            return Err(refusal(
                format_args!(
                    "node workload ceiling {}: {others} stored, 1 requested",
                    ceiling.workloads
                ),
                "ceilings.node.workloads",
            ));
        }
        let limits = [
            ceiling.vcpus.saturating_mul(1000),
            ceiling.memory_mib,
            ceiling.disk_gib,
        ]
        .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let held = own.unwrap_or_default().each();
        let figures = in_use.each().into_iter().zip(requested.each()).zip(held);
        for (dimension, (limit, ((used, wanted), held))) in
            DIMENSIONS.iter().zip(limits.into_iter().zip(figures))
        {
            if wanted > held && used.saturating_add(wanted) > limit {
                return Err(refusal(
                    format_args!(
                        "node {} ceiling {}: {} in use, {} requested",
                        dimension.name,
                        dimension.show(limit),
                        dimension.show(used),
                        dimension.show(wanted)
                    ),
                    dimension.node_rule,
                ));
            }
        }
        Ok(())
    }
}

/// One thing a ceiling bounds: its name and unit in messages, and the
/// policy keys of its two ceilings.
struct Dimension {
    name: &'static str,
    unit: &'static str,
    workload_rule: &'static str,
    node_rule: &'static str,
}

impl Dimension {
    fn show(&self, figure: i64) -> String {
        match self.unit {
            "vCPUs" => format!("{} vCPUs", cpus(figure)),
            unit => format!("{figure} {unit}"),
        }
    }
}

/// In the order of [`Figures::each`].
const DIMENSIONS: [Dimension; 3] = [
    Dimension {
        name: "vCPU",
        unit: "vCPUs",
        workload_rule: "ceilings.workload.vcpus",
        node_rule: "ceilings.node.vcpus",
    },
    Dimension {
        name: "memory",
        unit: "MiB",
        workload_rule: "ceilings.workload.memory_mib",
        node_rule: "ceilings.node.memory_mib",
    },
    Dimension {
        name: "disk",
        unit: "GiB",
        workload_rule: "ceilings.workload.disk_gib",
        node_rule: "ceilings.node.disk_gib",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{
        ContainerSpec, DiskConfig, ManagedVolumeSpec, ResourceLimits, VmSpec, WorkloadType,
    };
    use persys_controllers::policy::{NodeCeilings, WorkloadCeilings};
    use tokio_util::sync::CancellationToken;

    use crate::store::{ApplyRequest, Store, StoreConfig};

    /// Admission over a real, empty store whose informer runs until the
    /// token is cancelled.
    fn admission() -> (tempfile::TempDir, CancellationToken, Admission) {
        let setup = admission_over_a_store();
        (setup.dir, setup.stop, setup.admission)
    }

    /// A real, empty store, its informer running until `stop`, and the
    /// admission following it.
    struct Setup {
        dir: tempfile::TempDir,
        store: Store,
        informer: Informer,
        stop: CancellationToken,
        admission: Admission,
    }

    fn admission_over_a_store() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path().join("state"))).unwrap();
        let informer = Informer::new(Arc::new(store.clone()));
        let stop = CancellationToken::new();
        tokio::spawn({
            let informer = informer.clone();
            let stop = stop.clone();
            async move { informer.run(stop).await }
        });
        let ceilings = Ceilings {
            node: NodeCeilings {
                workloads: 10,
                vcpus: 8,
                memory_mib: 16384,
                disk_gib: 100,
            },
            workload: WorkloadCeilings {
                vcpus: 2,
                memory_mib: 8192,
                disk_gib: 50,
            },
        };
        let admission = Admission::start(ceilings, &informer, &Tasks::new(stop.clone()));
        Setup {
            dir,
            store,
            informer,
            stop,
            admission,
        }
    }

    fn in_spec(spec: workload_spec::Spec) -> WorkloadSpec {
        WorkloadSpec { spec: Some(spec) }
    }

    fn vm(vcpus: i32, memory_mb: i64) -> workload_spec::Spec {
        workload_spec::Spec::Vm(VmSpec {
            vcpus,
            memory_mb,
            ..Default::default()
        })
    }

    #[test]
    fn figures_count_cpu_shares_at_1024_a_cpu_and_memory_in_mib() {
        let container = workload_spec::Spec::Container(ContainerSpec {
            resources: Some(ResourceLimits {
                cpu_shares: 512,
                memory_bytes: 3 * MIB as i64 + 1,
                memory_swap_bytes: 0,
            }),
            ..Default::default()
        });
        assert_eq!(
            Figures::of_spec(&container, &NO_LABELS),
            Figures {
                millicpus: 500,
                memory_mib: 4,
                disk_gib: 0
            }
        );
        assert_eq!(cpus(2500), "2.5");
        assert_eq!(cpus(3000), "3");
    }

    #[tokio::test]
    async fn a_spec_of_figures_near_i64_max_is_refused_by_a_ceiling_not_overflowed() {
        let huge = workload_spec::Spec::Container(ContainerSpec {
            resources: Some(ResourceLimits {
                cpu_shares: i64::MAX,
                memory_bytes: i64::MAX,
                memory_swap_bytes: 0,
            }),
            managed_volumes: vec![
                ManagedVolumeSpec {
                    size_gb: i64::MAX,
                    ..Default::default()
                };
                3
            ],
            ..Default::default()
        });
        let figures = Figures::of_spec(&huge, &NO_LABELS);
        assert_eq!(
            figures,
            Figures {
                millicpus: MAX_FIGURE,
                memory_mib: MAX_FIGURE,
                disk_gib: MAX_FIGURE
            }
        );
        let vm = workload_spec::Spec::Vm(VmSpec {
            vcpus: i32::MAX,
            memory_mb: i64::MAX,
            disks: vec![
                DiskConfig {
                    size_gb: i64::MAX,
                    ..Default::default()
                };
                2
            ],
            ..Default::default()
        });
        assert_eq!(Figures::of_spec(&vm, &NO_LABELS).disk_gib, MAX_FIGURE);
        let (_dir, _stop, admission) = admission();
        let error = admission
            .admit("huge", &in_spec(huge), &NO_LABELS, DesiredState::Running)
            .await
            .err()
            .unwrap();
        assert!(error.message.contains("ceilings.workload"), "{error}");
    }

    /// Admits a running VM of `vcpus` and `memory_mb`.
    async fn admit_vm(
        admission: &Admission,
        id: &str,
        vcpus: i32,
        memory_mb: i64,
    ) -> Result<Reservation, Exceeded> {
        admission
            .admit(
                id,
                &in_spec(vm(vcpus, memory_mb)),
                &NO_LABELS,
                DesiredState::Running,
            )
            .await
    }

    #[tokio::test]
    async fn a_workload_beyond_its_own_ceiling_is_refused_naming_it() {
        let (_dir, _stop, admission) = admission();
        let error = admit_vm(&admission, "big", 1, 9000).await.err().unwrap();
        assert_eq!(
            error.to_string(),
            "workload big: workload memory ceiling 8192 MiB: 9000 MiB requested (policy ceilings.workload.memory_mib)"
        );
        let error = admit_vm(&admission, "big", 3, 128).await.err().unwrap();
        assert!(error.message.contains("ceilings.workload.vcpus"), "{error}");
    }

    #[tokio::test]
    async fn reservations_count_until_released_and_a_reapply_replaces_its_own_share() {
        let (_dir, stop, admission) = admission();
        let a = admit_vm(&admission, "a", 2, 8000).await.unwrap();
        let _b = admit_vm(&admission, "b", 2, 7000).await.unwrap();
        let error = admit_vm(&admission, "c", 1, 2048).await.err().unwrap();
        assert_eq!(
            error.message,
            "node memory ceiling 16384 MiB: 15000 MiB in use, 2048 MiB requested (policy ceilings.node.memory_mib)"
        );
        // The same workload again replaces its share; stopped holds nothing.
        admit_vm(&admission, "b", 2, 8000).await.unwrap();
        admission
            .admit(
                "c",
                &in_spec(vm(2, 2048)),
                &NO_LABELS,
                DesiredState::Stopped,
            )
            .await
            .unwrap();
        drop(a);
        admit_vm(&admission, "c", 1, 2048).await.unwrap();
        stop.cancel();
    }

    #[tokio::test]
    async fn the_ledger_follows_the_store_and_a_reservation_lasts_until_it_has_the_write() {
        let Setup {
            dir: _dir,
            store,
            informer,
            stop,
            admission,
        } = admission_over_a_store();
        let apply = |id: &str, memory_mb: i64, desired: DesiredState| ApplyRequest {
            id: id.into(),
            workload_type: WorkloadType::Vm,
            revision_id: String::new(),
            desired_state: desired,
            spec: in_spec(vm(1, memory_mb)),
            finalizers: Vec::new(),
            labels: Default::default(),
            caller: Default::default(),
        };
        let reservation = admit_vm(&admission, "a", 1, 8192).await.unwrap();
        let written = store
            .apply(apply("a", 8192, DesiredState::Running))
            .await
            .unwrap();
        admission.release_after(reservation, written.workload().resource_version());
        let written = store
            .apply(apply("c", 100, DesiredState::Running))
            .await
            .unwrap();
        let version = written.workload().resource_version();
        let mut ledger = admission.version.subscribe();
        ledger
            .wait_for(|v| v.is_some_and(|v| v >= version))
            .await
            .unwrap();
        assert!(
            lock(&admission.ledger).pending.is_empty(),
            "the ledger drops a handed-over reservation once it has the write"
        );
        // Handed over after the ledger already has the write: let go at once.
        let late = admit_vm(&admission, "c", 1, 100).await.unwrap();
        admission.release_after(late, version);
        assert!(lock(&admission.ledger).pending.is_empty());
        let error = admit_vm(&admission, "b", 1, 8192).await.err().unwrap();
        assert!(
            error
                .message
                .contains("8292 MiB in use, 8192 MiB requested"),
            "{error}"
        );
        admit_vm(&admission, "b", 1, 8092).await.unwrap();
        // On a node over its ceiling, a workload may keep or shrink its
        // share, not grow it.
        let over = Admission::start(
            Ceilings {
                node: NodeCeilings {
                    memory_mib: 4096,
                    ..admission.ceilings.node.clone()
                },
                ..admission.ceilings.clone()
            },
            &informer,
            &Tasks::new(stop.clone()),
        );
        admit_vm(&over, "a", 1, 8192).await.unwrap();
        admit_vm(&over, "a", 1, 1000).await.unwrap();
        admit_vm(&over, "c", 1, 100).await.unwrap();
        let error = admit_vm(&over, "c", 1, 200).await.err().unwrap();
        assert!(
            error.message.contains("8192 MiB in use, 200 MiB requested"),
            "{error}"
        );
        let error = admit_vm(&over, "d", 1, 64).await.err().unwrap();
        assert!(error.message.contains("8292 MiB in use"), "{error}");
        // Stopped, it holds nothing but its place in the count.
        let written = store
            .apply(apply("a", 8192, DesiredState::Stopped))
            .await
            .unwrap();
        let version = written.workload().resource_version();
        ledger
            .wait_for(|v| v.is_some_and(|v| v >= version))
            .await
            .unwrap();
        admit_vm(&admission, "b", 1, 8192).await.unwrap();
        stop.cancel();
    }
}
