//! Node utilisation (CPU, memory, disk), sampled in the background so
//! HealthCheck never waits for it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::tasks::Tasks;

/// Percentages, 0–100.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Utilization {
    pub cpu: f64,
    pub memory: f64,
    pub disk: f64,
    /// Totals, for capacity reports.
    pub cpu_count: usize,
    pub memory_total_bytes: u64,
}

/// The latest sample; cheap to clone and read.
#[derive(Debug, Clone, Default)]
pub struct NodeSampler {
    latest: Arc<RwLock<Utilization>>,
}

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    let total: u64 = values.iter().take(8).sum();
    Some((total - idle, total))
}

fn memory() -> Option<(f64, u64)> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((
        100.0 * (total.saturating_sub(available)) as f64 / total.max(1) as f64,
        total * 1024,
    ))
}

fn disk(path: &PathBuf) -> Option<f64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    let total = stat.f_blocks as f64 * stat.f_frsize as f64;
    let available = stat.f_bavail as f64 * stat.f_frsize as f64;
    (total > 0.0).then(|| 100.0 * (total - available) / total)
}

impl NodeSampler {
    pub fn latest(&self) -> Utilization {
        *self.latest.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples now, then every `interval` until the tasks' stop, as the
    /// watched background task `node-sampler`.
    pub fn start(disk_path: PathBuf, interval: Duration, tasks: &Tasks) -> Self {
        let shutdown = tasks.stop().clone();
        let sampler = NodeSampler::default();
        let latest = sampler.latest.clone();
        let cpu_count = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let sample = move |previous: &mut Option<(u64, u64)>| {
            let now = cpu_times();
            let cpu = match (*previous, now) {
                (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                    100.0 * (busy1 - busy0) as f64 / (total1 - total0) as f64
                }
                _ => 0.0,
            };
            *previous = now;
            let (memory, memory_total_bytes) = memory().unwrap_or((0.0, 0));
            Utilization {
                cpu,
                memory,
                disk: disk(&disk_path).unwrap_or(0.0),
                cpu_count,
                memory_total_bytes,
            }
        };
        tasks.spawn("node-sampler", async move {
            let mut previous = None;
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let value = sample(&mut previous);
                *latest.write().unwrap_or_else(|p| p.into_inner()) = value;
            }
        });
        sampler
    }
}
