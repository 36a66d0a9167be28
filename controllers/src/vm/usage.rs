//! Resource usage of running VMs, sampled from libvirt in the background:
//! CPU from cpu-time deltas between two samples, memory (the qemu
//! process's RSS, else the balloon size), block and interface counters.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use persys_api::v1::{WorkloadType, WorkloadUsageSnapshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use virt::sys;

use super::errors::{LibvirtError, Operation, VmError};
use super::libvirt::{DomainState, Hypervisor, LiveDomain, PowerState};
use super::marks::{Marks, NAMESPACE};

pub use crate::usage::UsageSnapshots;
use crate::usage::{sample_every, unix_now};

/// Counters read from one domain in one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSample {
    pub workload_id: String,
    pub uuid: String,
    /// Total CPU time of all vCPUs and the emulator, in nanoseconds.
    pub cpu_time_ns: u64,
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Samples every running domain of one scope and replaces the snapshots.
pub struct UsageSampler {
    pub(crate) hypervisor: Hypervisor,
    pub(crate) scope: String,
    pub(crate) interval: Duration,
    pub(crate) snapshots: UsageSnapshots,
    /// The previous CPU time of each domain (by UUID), for the delta. A std
    /// mutex: only touched between awaits.
    previous: Mutex<HashMap<String, (u64, Instant)>>,
}

impl UsageSampler {
    pub(crate) fn new(
        hypervisor: Hypervisor,
        scope: String,
        interval: Duration,
        snapshots: UsageSnapshots,
    ) -> Self {
        UsageSampler {
            hypervisor,
            scope,
            interval,
            snapshots,
            previous: Mutex::default(),
        }
    }

    /// Samples every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        sample_every(self.interval, &shutdown, "VM", || self.sample_once()).await;
    }

    /// One round; returns how many workloads were sampled.
    pub async fn sample_once(&self) -> Result<usize, VmError> {
        let scope = self.scope.clone();
        let raw = self
            .hypervisor
            .call("", Operation::Stats, move |conn| read_samples(conn, &scope))
            .await?;
        let now = Instant::now();
        let collected_at = unix_now();
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let mut next_previous = HashMap::new();
        let mut samples = HashMap::new();
        for sample in raw {
            let cpu_percent = previous
                .get(&sample.uuid)
                .map(|(cpu, at)| cpu_percent(*cpu, sample.cpu_time_ns, now - *at))
                .unwrap_or(0.0);
            next_previous.insert(sample.uuid.clone(), (sample.cpu_time_ns, now));
            samples.insert(
                sample.workload_id.clone(),
                snapshot(&sample, cpu_percent, collected_at),
            );
        }
        *previous = next_previous;
        drop(previous);
        let count = samples.len();
        self.snapshots.replace(samples);
        Ok(count)
    }
}

/// CPU use between two samples, in percent of one host core.
pub fn cpu_percent(before_ns: u64, after_ns: u64, elapsed: Duration) -> f64 {
    let elapsed = elapsed.as_nanos() as f64;
    if elapsed <= 0.0 || after_ns < before_ns {
        return 0.0;
    }
    (after_ns - before_ns) as f64 / elapsed * 100.0
}

fn snapshot(sample: &RawSample, cpu_percent: f64, collected_at: i64) -> WorkloadUsageSnapshot {
    let signed = |v: u64| v.min(i64::MAX as u64) as i64;
    WorkloadUsageSnapshot {
        workload_id: sample.workload_id.clone(),
        r#type: WorkloadType::Vm as i32,
        cpu_percent,
        memory_bytes: signed(sample.memory_bytes),
        disk_read_bytes: signed(sample.disk_read_bytes),
        disk_write_bytes: signed(sample.disk_write_bytes),
        net_rx_bytes: signed(sample.net_rx_bytes),
        net_tx_bytes: signed(sample.net_tx_bytes),
        collected_at,
        source: "libvirt".to_string(),
    }
}

/// Reads the counters of every active domain marked with `scope`
/// (blocking).
fn read_samples(
    conn: &virt::connect::Connect,
    scope: &str,
) -> Result<Vec<RawSample>, LibvirtError> {
    let mut samples = Vec::new();
    for domain in conn.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
        // A domain can stop or vanish mid-sample: skip it, do not fail the
        // round.
        let sample = (|| -> Result<Option<RawSample>, LibvirtError> {
            let xml = match domain.metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(NAMESPACE),
                0,
            ) {
                Ok(xml) => xml,
                Err(_) => return Ok(None),
            };
            let Some(marks) = Marks::parse(&xml).filter(|m| m.scope == scope) else {
                return Ok(None);
            };
            let uuid = domain.uuid_string()?;
            let info = domain.info()?;
            let rss_kib = domain
                .memory_stats(0)
                .ok()
                .and_then(|stats| {
                    stats
                        .iter()
                        .find(|s| s.tag == sys::VIR_DOMAIN_MEMORY_STAT_RSS)
                        .map(|s| s.val)
                })
                .filter(|rss| *rss > 0);
            let state = DomainState {
                power: PowerState::Running,
                reason: 0,
            };
            let live = LiveDomain::from_xml(&uuid, state, &domain.xml_desc(0)?);
            let mut sample = RawSample {
                workload_id: marks.workload_id,
                uuid,
                cpu_time_ns: info.cpu_time,
                memory_bytes: rss_kib.unwrap_or(info.memory).saturating_mul(1024),
                ..Default::default()
            };
            for disk in live.iter().flat_map(|l| l.disks.iter()) {
                if let Ok(stats) = domain.block_stats(&disk.target) {
                    sample.disk_read_bytes += stats.rd_bytes.max(0) as u64;
                    sample.disk_write_bytes += stats.wr_bytes.max(0) as u64;
                }
            }
            for device in live
                .iter()
                .flat_map(|l| l.interfaces.iter())
                .filter_map(|i| i.host_device.as_deref())
            {
                if let Ok(stats) = domain.interface_stats(device) {
                    sample.net_rx_bytes += stats.rx_bytes.max(0) as u64;
                    sample.net_tx_bytes += stats.tx_bytes.max(0) as u64;
                }
            }
            Ok(Some(sample))
        })();
        match sample {
            Ok(Some(sample)) => samples.push(sample),
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "sampling a domain failed"),
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_is_the_cpu_time_delta_over_the_wall_time() {
        let second = Duration::from_secs(1);
        assert_eq!(cpu_percent(0, 500_000_000, second), 50.0);
        assert_eq!(cpu_percent(1_000_000_000, 3_000_000_000, second), 200.0);
        assert_eq!(
            cpu_percent(5, 4, second),
            0.0,
            "a reset counter is not negative use"
        );
        assert_eq!(cpu_percent(0, 5, Duration::ZERO), 0.0);
    }

    #[test]
    fn a_snapshot_is_a_vm_usage_report() {
        let sample = RawSample {
            workload_id: "w".into(),
            uuid: "u".into(),
            cpu_time_ns: 1,
            memory_bytes: u64::MAX,
            disk_read_bytes: 7,
            disk_write_bytes: 9,
            net_rx_bytes: 100,
            net_tx_bytes: 50,
        };
        let s = snapshot(&sample, 12.5, 42);
        assert_eq!(s.r#type, WorkloadType::Vm as i32);
        assert_eq!(s.memory_bytes, i64::MAX);
        assert_eq!((s.disk_read_bytes, s.disk_write_bytes), (7, 9));
        assert_eq!((s.net_rx_bytes, s.net_tx_bytes), (100, 50));
        assert_eq!((s.cpu_percent, s.collected_at), (12.5, 42));
        assert_eq!(s.source, "libvirt");
    }
}
