//! The last resource-usage sample of each running workload, shared by the
//! runtimes that sample usage in the background (Docker, VMs).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use persys_api::v1::WorkloadUsageSnapshot;

/// The last sample of each running workload; cheap to clone, read by the
/// API server (`WorkloadStatus.usage`, heartbeats).
#[derive(Debug, Clone, Default)]
pub struct UsageSnapshots {
    /// A std lock: readers copy values out and never hold it across awaits.
    inner: Arc<RwLock<HashMap<String, WorkloadUsageSnapshot>>>,
}

impl UsageSnapshots {
    pub fn get(&self, workload_id: &str) -> Option<WorkloadUsageSnapshot> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload_id)
            .cloned()
    }

    /// Every sample, ordered by workload id.
    pub fn all(&self) -> Vec<WorkloadUsageSnapshot> {
        let mut all: Vec<_> = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.workload_id.cmp(&b.workload_id));
        all
    }

    pub(crate) fn replace(&self, samples: HashMap<String, WorkloadUsageSnapshot>) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = samples;
    }

    pub(crate) fn remove(&self, workload_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(workload_id);
    }
}
