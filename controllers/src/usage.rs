//! The last resource-usage sample of each running workload, shared by the
//! runtimes that sample usage in the background (Docker, Compose, VMs),
//! and how the samples are taken on this host.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use persys_api::v1::WorkloadUsageSnapshot;

/// The last sample of each running workload; cheap to clone, read by the
/// API server (`WorkloadStatus.usage`, heartbeats).
#[derive(Debug, Clone, Default)]
pub struct UsageSnapshots {
    /// A std lock: readers copy values out and never hold it across awaits.
    inner: Arc<RwLock<HashMap<String, WorkloadUsageSnapshot>>>,
    /// How the sampler reads usage on this host (`cgroup v1 …`, `docker
    /// stats: …`), once it has chosen; HealthCheck reports it.
    source: Arc<RwLock<Option<String>>>,
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

    /// How usage is read on this host; none before the sampler chose.
    pub fn source(&self) -> Option<String> {
        self.source
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_source(&self, source: String) {
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
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

/// Runs one sampling round every `interval` until `shutdown`; a round that
/// fails is logged and the next one tries again. A late round delays the
/// next rather than bunching them up.
pub(crate) async fn sample_every<E: Display, R: Future<Output = Result<usize, E>>>(
    interval: Duration,
    shutdown: &CancellationToken,
    what: &str,
    mut round: impl FnMut() -> R,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let sampled = tokio::select! {
            _ = shutdown.cancelled() => return,
            sampled = round() => sampled,
        };
        if let Err(error) = sampled {
            tracing::debug!(%error, "{what} usage sampling failed");
        }
    }
}

/// Now, in seconds since the Unix epoch: a snapshot's `collected_at`.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
