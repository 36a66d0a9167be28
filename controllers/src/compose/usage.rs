//! Resource usage of compose workloads: the sum of their running service
//! containers, each read as a container workload's is (cgroup files, else
//! the engine's stats). One container list per round.

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use persys_api::v1::{WorkloadType, WorkloadUsageSnapshot};
use tokio_util::sync::CancellationToken;

use super::naming::project_name_of;
use super::observe::{ONEOFF_LABEL, PROJECT_LABEL};
use crate::docker::Engine;
use crate::docker::labels::{MANAGED, WORKLOAD_ID};
use crate::docker::usage::{ContainerReader, Sample, list_running};
use crate::informer::Cache;
use crate::usage::{UsageSnapshots, sample_every, unix_now};

/// Samples every running compose workload of the informer's cache and
/// replaces the snapshots with the result.
pub struct UsageSampler {
    engine: Engine,
    /// Which workloads are compose workloads, and their project names: a
    /// container counts only for the workload that owns its project.
    cache: Cache,
    interval: Duration,
    snapshots: UsageSnapshots,
    reader: ContainerReader,
}

impl UsageSampler {
    /// A sampler of the projects on `engine`; `concurrency` bounds stats
    /// requests where usage comes from the engine's stats.
    pub fn new(engine: Engine, cache: Cache, interval: Duration, concurrency: usize) -> Self {
        let snapshots = UsageSnapshots::default();
        UsageSampler {
            reader: ContainerReader::new(engine.clone(), concurrency, snapshots.clone()),
            engine,
            cache,
            interval,
            snapshots,
        }
    }

    /// The last samples, for the API server and heartbeats.
    pub fn snapshots(&self) -> UsageSnapshots {
        self.snapshots.clone()
    }

    /// Samples every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        sample_every(self.interval, &shutdown, "compose", || self.sample_once()).await;
    }

    /// One round; returns how many workloads were sampled.
    pub async fn sample_once(&self) -> Result<usize, EngineError> {
        let docker = self.engine.client().await?;
        let listed = list_running(
            &docker,
            vec![format!("{MANAGED}=true"), PROJECT_LABEL.to_string()],
        )
        .await?;
        // Container id → the workload it counts for.
        let mut owners: HashMap<String, String> = HashMap::new();
        for summary in listed {
            let labels = summary.labels.unwrap_or_default();
            if labels.get(ONEOFF_LABEL).is_some_and(|v| v == "True") {
                continue;
            }
            let (Some(container), Some(workload), Some(project)) = (
                summary.id,
                labels.get(WORKLOAD_ID),
                labels.get(PROJECT_LABEL),
            ) else {
                continue;
            };
            let owned = self
                .cache
                .get(workload)
                .and_then(|w| project_name_of(&w))
                .is_some_and(|name| name == *project);
            if owned {
                owners.insert(container, workload.clone());
            }
        }
        let read = self
            .reader
            .read(&docker, owners.keys().cloned().collect())
            .await?;
        let collected_at = unix_now();
        let samples = sum_by_workload(&owners, &read, collected_at);
        let count = samples.len();
        self.snapshots.replace(samples);
        Ok(count)
    }
}

/// Each workload's snapshot: the sum of its containers' samples.
fn sum_by_workload(
    owners: &HashMap<String, String>,
    read: &HashMap<String, Sample>,
    collected_at: i64,
) -> HashMap<String, WorkloadUsageSnapshot> {
    let mut sums: HashMap<&str, Sample> = HashMap::new();
    for (container, sample) in read {
        let Some(workload) = owners.get(container) else {
            continue;
        };
        sums.entry(workload.as_str())
            .and_modify(|sum| sum.add(sample))
            .or_insert(*sample);
    }
    sums.into_iter()
        .map(|(workload, sum)| {
            (
                workload.to_string(),
                sum.snapshot(workload, WorkloadType::Compose, collected_at),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::usage::Source;

    #[test]
    fn a_projects_usage_is_the_sum_of_its_containers() {
        let owners = HashMap::from([
            ("c1".to_string(), "shop".to_string()),
            ("c2".to_string(), "shop".to_string()),
            ("c3".to_string(), "blog".to_string()),
        ]);
        let sample = |memory| Sample {
            cpu_percent: 2.0,
            memory_bytes: memory,
            source: Source::Cgroup,
            ..Sample::default()
        };
        let read = HashMap::from([
            ("c1".to_string(), sample(100)),
            ("c2".to_string(), sample(50)),
            ("c3".to_string(), sample(7)),
            ("stranger".to_string(), sample(1_000)),
        ]);
        let sums = sum_by_workload(&owners, &read, 9);
        assert_eq!(sums.len(), 2);
        assert_eq!(sums["shop"].memory_bytes, 150);
        assert_eq!(sums["shop"].cpu_percent, 4.0);
        assert_eq!(sums["shop"].r#type, WorkloadType::Compose as i32);
        assert_eq!(sums["shop"].source, "cgroup");
        assert_eq!(sums["blog"].memory_bytes, 7);
    }
}
