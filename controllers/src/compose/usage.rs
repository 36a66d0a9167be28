//! Resource usage of compose workloads: the sum of their running service
//! containers, each read as a container workload's is (cgroup files, else
//! the engine's stats). One container list per round, shared with the
//! container sampler ([`RunningContainers`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use persys_api::v1::{ActualState, Workload, WorkloadType, WorkloadUsageSnapshot};
use tokio_util::sync::CancellationToken;

use super::naming::project_name_of;
use super::observe::{ONEOFF_LABEL, PROJECT_LABEL};
use crate::docker::Engine;
use crate::docker::labels::WORKLOAD_ID;
use crate::docker::usage::{ContainerReader, RunningContainers, Sample};
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
    /// Its own unless shared ([`UsageSampler::sharing`]).
    running: Arc<RunningContainers>,
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
            running: RunningContainers::for_interval(interval),
        }
    }

    /// Reads the running containers from `running`, which other samplers
    /// of the same engine read too.
    pub fn sharing(mut self, running: Arc<RunningContainers>) -> Self {
        self.running = running;
        self
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
        let listed = self.running.get(&docker).await?;
        let projects = self.projects();
        // Container id → the workload it counts for.
        let mut owners: HashMap<String, String> = HashMap::new();
        for summary in listed.iter() {
            let Some(labels) = summary.labels.as_ref() else {
                continue;
            };
            if labels.get(ONEOFF_LABEL).is_some_and(|v| v == "True") {
                continue;
            }
            let (Some(container), Some(project)) = (&summary.id, labels.get(PROJECT_LABEL)) else {
                continue;
            };
            let Some(owner) = projects.get(project.as_str()) else {
                continue;
            };
            let counts = match labels.get(WORKLOAD_ID) {
                Some(workload) => *workload == owner.id,
                // The Go agent's services carry no labels of this agent's:
                // theirs once the workload runs the project (adopted).
                None => owner.runs_unlabelled,
            };
            if counts {
                owners.insert(container.clone(), owner.id.clone());
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

/// The compose workload a project's containers count for.
struct ProjectOwner {
    id: String,
    /// The workload runs the project with containers that carry none of
    /// this agent's labels: the Go agent's, adopted.
    runs_unlabelled: bool,
}

impl UsageSampler {
    /// Every compose workload by the project it runs: the one its status
    /// records (an adopted project keeps the Go agent's name), else the
    /// one its spec names.
    fn projects(&self) -> HashMap<String, ProjectOwner> {
        self.cache
            .ids_of_type(WorkloadType::Compose)
            .into_iter()
            .filter_map(|id| self.cache.get(&id))
            .filter_map(|workload| {
                let (project, runs_unlabelled) = project_of(&workload)?;
                let id = workload.id().to_string();
                Some((
                    project,
                    ProjectOwner {
                        id,
                        runs_unlabelled,
                    },
                ))
            })
            .collect()
    }
}

/// The project workload `w` runs and whether it runs it (so its
/// unlabelled containers, adopted, are its).
fn project_of(w: &Workload) -> Option<(String, bool)> {
    let status = w.status.as_ref();
    let recorded = status
        .map(|s| s.runtime_ref.clone())
        .filter(|r| !r.is_empty());
    let running = status.is_some_and(|s| s.actual_state() == ActualState::Running);
    match recorded {
        Some(project) => Some((project, running)),
        None => project_name_of(w).map(|project| (project, false)),
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
