//! Resource usage of running workloads, sampled from the engine's stats.

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as EngineError;
use bollard::models::{ContainerStatsResponse, ContainerSummaryStateEnum};
use bollard::query_parameters::StatsOptions;
use futures::StreamExt;
use persys_api::v1::{WorkloadType, WorkloadUsageSnapshot};
use tokio_util::sync::CancellationToken;

use super::container;
use super::engine::Engine;
use super::labels::Marks;

pub use crate::usage::UsageSnapshots;
use crate::usage::{sample_every, unix_now};

/// One stats request may take this long (the engine samples twice, about
/// a second apart, to compute CPU use).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Samples every running managed container of one scope, a bounded number
/// at a time, and replaces the snapshots with the result.
pub struct UsageSampler {
    pub(crate) engine: Engine,
    pub(crate) scope: String,
    pub(crate) interval: Duration,
    /// Stats requests in flight at once.
    pub(crate) concurrency: usize,
    pub(crate) snapshots: UsageSnapshots,
}

impl UsageSampler {
    /// Samples every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        sample_every(self.interval, &shutdown, "container", || self.sample_once()).await;
    }

    /// One round; returns how many workloads were sampled.
    pub async fn sample_once(&self) -> Result<usize, EngineError> {
        let docker = self.engine.client().await?;
        let running: Vec<(String, String)> = container::list(&docker, &self.scope, None)
            .await?
            .into_iter()
            .filter(|c| c.state == Some(ContainerSummaryStateEnum::RUNNING))
            .filter_map(|c| {
                let id = Marks::read(c.labels.as_ref()).workload_id?;
                Some((id, c.id?))
            })
            .collect();
        let samples: HashMap<String, WorkloadUsageSnapshot> = futures::stream::iter(running)
            .map(|(workload_id, container_id)| {
                let docker = docker.clone();
                async move {
                    let mut stats = docker.stats(
                        &container_id,
                        Some(StatsOptions {
                            stream: false,
                            one_shot: false,
                        }),
                    );
                    match tokio::time::timeout(STATS_TIMEOUT, stats.next()).await {
                        Ok(Some(Ok(stats))) => Some((
                            workload_id.clone(),
                            snapshot(&workload_id, &stats, unix_now()),
                        )),
                        Ok(Some(Err(error))) => {
                            tracing::debug!(%error, workload_id, "stats failed");
                            None
                        }
                        Ok(None) | Err(_) => None,
                    }
                }
            })
            .buffer_unordered(self.concurrency)
            .filter_map(|sample| async move { sample })
            .collect()
            .await;
        let count = samples.len();
        self.snapshots.replace(samples);
        Ok(count)
    }
}

/// A usage snapshot from one stats answer, computed as `docker stats` does.
fn snapshot(
    workload_id: &str,
    stats: &ContainerStatsResponse,
    collected_at: i64,
) -> WorkloadUsageSnapshot {
    let cpu_percent = (|| {
        let cpu = stats.cpu_stats.as_ref()?;
        let pre = stats.precpu_stats.as_ref()?;
        let total = cpu.cpu_usage.as_ref()?.total_usage?;
        let pre_total = pre.cpu_usage.as_ref()?.total_usage.unwrap_or(0);
        let system = cpu.system_cpu_usage?;
        let pre_system = pre.system_cpu_usage.unwrap_or(0);
        let cpu_delta = total.checked_sub(pre_total)? as f64;
        let system_delta = system.checked_sub(pre_system)? as f64;
        if system_delta <= 0.0 {
            return None;
        }
        let cpus = cpu
            .online_cpus
            .map(f64::from)
            .or_else(|| {
                cpu.cpu_usage
                    .as_ref()?
                    .percpu_usage
                    .as_ref()
                    .map(|p| p.len() as f64)
            })
            .filter(|n| *n > 0.0)
            .unwrap_or(1.0);
        Some(cpu_delta / system_delta * cpus * 100.0)
    })()
    .unwrap_or(0.0);

    let memory_bytes = stats
        .memory_stats
        .as_ref()
        .map(|m| {
            let usage = m.usage.unwrap_or(0);
            // Page cache is reclaimable: not counted, as `docker stats` does
            // (cgroup v1 `total_inactive_file`, v2 `inactive_file`).
            let cache = m
                .stats
                .as_ref()
                .and_then(|s| {
                    s.get("total_inactive_file")
                        .or_else(|| s.get("inactive_file"))
                })
                .copied()
                .unwrap_or(0);
            usage.saturating_sub(cache)
        })
        .unwrap_or(0);

    let (mut read, mut write) = (0u64, 0u64);
    for entry in stats
        .blkio_stats
        .as_ref()
        .and_then(|b| b.io_service_bytes_recursive.as_ref())
        .into_iter()
        .flatten()
    {
        match entry.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("read") => read = read.saturating_add(entry.value.unwrap_or(0)),
            Some("write") => write = write.saturating_add(entry.value.unwrap_or(0)),
            _ => {}
        }
    }
    let (mut rx, mut tx) = (0u64, 0u64);
    for network in stats.networks.iter().flat_map(|n| n.values()) {
        rx = rx.saturating_add(network.rx_bytes.unwrap_or(0));
        tx = tx.saturating_add(network.tx_bytes.unwrap_or(0));
    }
    let signed = |v: u64| v.min(i64::MAX as u64) as i64;
    WorkloadUsageSnapshot {
        workload_id: workload_id.to_string(),
        r#type: WorkloadType::Container as i32,
        cpu_percent,
        memory_bytes: signed(memory_bytes),
        disk_read_bytes: signed(read),
        disk_write_bytes: signed(write),
        net_rx_bytes: signed(rx),
        net_tx_bytes: signed(tx),
        collected_at,
        source: "docker".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
        ContainerMemoryStats, ContainerNetworkStats,
    };

    #[test]
    fn snapshots_compute_usage_as_docker_stats_does() {
        let cpu = |total: u64, system: u64| ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage {
                total_usage: Some(total),
                ..Default::default()
            }),
            system_cpu_usage: Some(system),
            online_cpus: Some(2),
            ..Default::default()
        };
        let stats = ContainerStatsResponse {
            cpu_stats: Some(cpu(1_500, 20_000)),
            precpu_stats: Some(cpu(1_000, 10_000)),
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(10_000),
                stats: Some(HashMap::from([("total_inactive_file".to_string(), 4_000)])),
                ..Default::default()
            }),
            blkio_stats: Some(ContainerBlkioStats {
                io_service_bytes_recursive: Some(vec![
                    ContainerBlkioStatEntry {
                        op: Some("Read".into()),
                        value: Some(7),
                        ..Default::default()
                    },
                    ContainerBlkioStatEntry {
                        op: Some("Write".into()),
                        value: Some(9),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            networks: Some(HashMap::from([(
                "eth0".to_string(),
                ContainerNetworkStats {
                    rx_bytes: Some(100),
                    tx_bytes: Some(50),
                    ..Default::default()
                },
            )])),
            ..Default::default()
        };
        let s = snapshot("web", &stats, 42);
        assert!((s.cpu_percent - 10.0).abs() < 1e-9, "{}", s.cpu_percent);
        assert_eq!(s.memory_bytes, 6_000);
        assert_eq!((s.disk_read_bytes, s.disk_write_bytes), (7, 9));
        assert_eq!((s.net_rx_bytes, s.net_tx_bytes), (100, 50));
        assert_eq!(s.collected_at, 42);
        assert_eq!(s.r#type, WorkloadType::Container as i32);
    }

    #[test]
    fn a_first_sample_without_a_previous_one_reports_no_cpu() {
        let stats = ContainerStatsResponse::default();
        assert_eq!(snapshot("w", &stats, 0).cpu_percent, 0.0);
    }
}
