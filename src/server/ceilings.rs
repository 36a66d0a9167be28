//! The policy's ceilings, enforced at apply: what one workload may be
//! promised, and what the node promises in all. Beyond one, the apply is
//! refused with RESOURCE_EXHAUSTED naming the ceiling and the figures, and
//! nothing is stored.
//!
//! "In use" is what the other workloads' specs promise (the informer's
//! cache), plus applies admitted but not yet in the cache: each admitted
//! apply holds a [`Reservation`] until the cache has it, so concurrent
//! applies cannot each fit alone and together overshoot. A re-apply of a
//! workload replaces its own share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use persys_api::v1::{DesiredState, Workload, workload_spec};
use persys_controllers::Informer;
use persys_controllers::policy::{Ceilings, refusal};

const MIB: u64 = 1024 * 1024;

/// What a workload's spec promises: CPU (VM vCPUs; container CPU shares at
/// 1024 a CPU), memory (VM memory; container memory limits) and disk (VM
/// disks, managed volumes). Compose projects declare nothing the agent
/// reads, so they count for nothing but their number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub millicpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

impl Figures {
    pub fn of_spec(spec: &workload_spec::Spec) -> Figures {
        match spec {
            workload_spec::Spec::Container(container) => {
                let (millicpus, memory_mib) = match &container.resources {
                    Some(resources) => (
                        (resources.cpu_shares.max(0) * 1000 + 512) / 1024,
                        (resources.memory_bytes.max(0) as u64).div_ceil(MIB) as i64,
                    ),
                    None => (0, 0),
                };
                Figures {
                    millicpus,
                    memory_mib,
                    disk_gib: container
                        .managed_volumes
                        .iter()
                        .map(|v| v.size_gb.max(0))
                        .sum(),
                }
            }
            workload_spec::Spec::Vm(vm) => Figures {
                millicpus: i64::from(vm.vcpus.max(0)) * 1000,
                memory_mib: vm.memory_mb.max(0),
                disk_gib: vm.disks.iter().map(|d| d.size_gb.max(0)).sum::<i64>()
                    + vm.managed_volumes
                        .iter()
                        .map(|v| v.size_gb.max(0))
                        .sum::<i64>(),
            },
            workload_spec::Spec::Compose(_) => Figures::default(),
        }
    }

    /// What a stored workload holds: nothing when it is stopped or being
    /// deleted.
    pub fn of(workload: &Workload) -> Figures {
        if workload.is_deleting() || workload.desired_state() == DesiredState::Stopped {
            return Figures::default();
        }
        workload
            .workload_spec()
            .map(Figures::of_spec)
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

    fn add(&mut self, other: Figures) {
        self.millicpus += other.millicpus;
        self.memory_mib += other.memory_mib;
        self.disk_gib += other.disk_gib;
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

/// Applies admitted and not yet seen in the informer's cache.
#[derive(Debug, Default)]
struct Pending {
    next: u64,
    entries: HashMap<u64, (String, Figures)>,
}

/// The ceilings of the policy in force, and the applies on their way.
#[derive(Clone)]
pub struct Admission {
    ceilings: Ceilings,
    informer: Informer,
    /// A std lock: held only to sum and to record, never across an await.
    pending: Arc<Mutex<Pending>>,
}

/// An admitted apply's share, held until the informer's cache has it (or
/// dropped at once when the apply did not happen).
pub struct Reservation {
    pending: Arc<Mutex<Pending>>,
    token: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .remove(&self.token);
    }
}

/// How long a reservation waits for the cache before it lets go anyway.
const CACHE_WAIT: Duration = Duration::from_secs(60);

impl Reservation {
    /// Keeps the share until the informer has reached `resource_version`.
    pub fn release_after(self, informer: &Informer, resource_version: u64) {
        let cache = informer.clone();
        tokio::spawn(async move {
            let reached = cache.wait_for_version(resource_version);
            if tokio::time::timeout(CACHE_WAIT, reached).await.is_err() {
                tracing::debug!(
                    resource_version,
                    "reservation released before the cache caught up"
                );
            }
            drop(self);
        });
    }
}

impl Admission {
    pub fn new(ceilings: Ceilings, informer: Informer) -> Admission {
        Admission {
            ceilings,
            informer,
            pending: Arc::default(),
        }
    }

    /// Admits workload `id` with `spec` and `desired` state, or says which
    /// ceiling it would break. Waits (briefly) for the informer's first
    /// list, so the figures in use are the node's.
    pub async fn admit(
        &self,
        id: &str,
        spec: &workload_spec::Spec,
        desired: DesiredState,
    ) -> Result<Reservation, Exceeded> {
        let exceeded = |message: String| Exceeded {
            id: id.to_string(),
            message,
        };
        let wanted = Figures::of_spec(spec);
        self.check_workload(wanted).map_err(exceeded)?;
        if !self.informer.is_synced()
            && tokio::time::timeout(Duration::from_secs(5), self.informer.wait_until_synced())
                .await
                .is_err()
        {
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
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut others: HashMap<String, Figures> = self
            .informer
            .cache()
            .list()
            .iter()
            .filter(|w| w.id() != id)
            .map(|w| (w.id().to_string(), Figures::of(w)))
            .collect();
        for (other, figures) in pending.entries.values() {
            if other != id {
                others
                    .entry(other.clone())
                    .and_modify(|f| *f = f.max(*figures))
                    .or_insert(*figures);
            }
        }
        let mut in_use = Figures::default();
        for figures in others.values() {
            in_use.add(*figures);
        }
        self.check_node(others.len() as u64, in_use, requested)
            .map_err(exceeded)?;
        let token = pending.next;
        pending.next += 1;
        pending.entries.insert(token, (id.to_string(), requested));
        Ok(Reservation {
            pending: self.pending.clone(),
            token,
        })
    }

    fn check_workload(&self, wanted: Figures) -> Result<(), String> {
        let ceiling = &self.ceilings.workload;
        let limits = [ceiling.vcpus * 1000, ceiling.memory_mib, ceiling.disk_gib];
        for (dimension, (limit, wanted)) in
            DIMENSIONS.iter().zip(limits.into_iter().zip(wanted.each()))
        {
            if wanted > limit as i64 {
                return Err(refusal(
                    format_args!(
                        "workload {} ceiling {}: {} requested",
                        dimension.name,
                        dimension.show(limit as i64),
                        dimension.show(wanted)
                    ),
                    dimension.workload_rule,
                ));
            }
        }
        Ok(())
    }

    fn check_node(&self, others: u64, in_use: Figures, requested: Figures) -> Result<(), String> {
        let ceiling = &self.ceilings.node;
        if others + 1 > ceiling.workloads {
            return Err(refusal(
                format_args!(
                    "node workload ceiling {}: {others} stored, 1 requested",
                    ceiling.workloads
                ),
                "ceilings.node.workloads",
            ));
        }
        let limits = [ceiling.vcpus * 1000, ceiling.memory_mib, ceiling.disk_gib];
        let figures = in_use.each().into_iter().zip(requested.each());
        for (dimension, (limit, (used, wanted))) in
            DIMENSIONS.iter().zip(limits.into_iter().zip(figures))
        {
            if wanted > 0 && used + wanted > limit as i64 {
                return Err(refusal(
                    format_args!(
                        "node {} ceiling {}: {} in use, {} requested",
                        dimension.name,
                        dimension.show(limit as i64),
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
    use persys_api::v1::{ContainerSpec, ResourceLimits, VmSpec};
    use persys_controllers::policy::{NodeCeilings, WorkloadCeilings};
    use tokio_util::sync::CancellationToken;

    use crate::store::{Store, StoreConfig};

    /// Admission over a real, empty store whose informer runs until the
    /// token is cancelled.
    fn admission() -> (tempfile::TempDir, CancellationToken, Admission) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path().join("state"))).unwrap();
        let informer = Informer::new(Arc::new(store));
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
        (dir, stop, Admission::new(ceilings, informer))
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
            Figures::of_spec(&container),
            Figures {
                millicpus: 500,
                memory_mib: 4,
                disk_gib: 0
            }
        );
        assert_eq!(cpus(2500), "2.5");
        assert_eq!(cpus(3000), "3");
    }

    /// Admits a running VM of `vcpus` and `memory_mb`.
    async fn admit_vm(
        admission: &Admission,
        id: &str,
        vcpus: i32,
        memory_mb: i64,
    ) -> Result<Reservation, Exceeded> {
        admission
            .admit(id, &vm(vcpus, memory_mb), DesiredState::Running)
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
            .admit("c", &vm(2, 2048), DesiredState::Stopped)
            .await
            .unwrap();
        drop(a);
        admit_vm(&admission, "c", 1, 2048).await.unwrap();
        stop.cancel();
    }
}
