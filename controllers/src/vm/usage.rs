//! Resource usage of running VMs, sampled from libvirt in the background:
//! CPU from cpu-time deltas between two samples, memory (the qemu
//! process's RSS, else the balloon size), block and interface counters.
//!
//! One round is one `virConnectGetAllDomainStats` call for every active
//! domain. The `virt` crate exposes that call but neither reads its records
//! nor frees them, so it is called here through `virt::sys`. A domain's
//! marks (which workload, which scope) are read once per domain UUID. Where
//! the driver lacks the bulk call, each domain is read on its own.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::sync::{Arc, Mutex};
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
    /// Each active domain's marks by UUID (none: not a managed domain),
    /// read once per domain. Pruned to the active domains every round.
    marks: Arc<Mutex<HashMap<String, Option<Marks>>>>,
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
            marks: Arc::default(),
        }
    }

    /// Samples every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        sample_every(self.interval, &shutdown, "VM", || self.sample_once()).await;
    }

    /// One round; returns how many workloads were sampled.
    pub async fn sample_once(&self) -> Result<usize, VmError> {
        let scope = self.scope.clone();
        let marks = self.marks.clone();
        let raw = self
            .hypervisor
            .call("", Operation::Stats, move |conn| {
                match read_bulk(conn, &scope, &marks) {
                    Err(error) if error.is(virt::error::ErrorNumber::NoSupport) => {
                        read_samples(conn, &scope)
                    }
                    read => read,
                }
            })
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

/// The statistics groups a round asks for.
const BULK_STATS: u32 = sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | sys::VIR_DOMAIN_STATS_BALLOON
    | sys::VIR_DOMAIN_STATS_INTERFACE
    | sys::VIR_DOMAIN_STATS_BLOCK;

/// Active domains only; a domain busy with a job reports what it can
/// without waiting for it.
const BULK_FLAGS: u32 =
    sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;

/// Frees a record list however the reading ends.
struct RecordList(*mut sys::virDomainStatsRecordPtr);

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the list came from virConnectGetAllDomainStats and is
            // freed once, here.
            unsafe { sys::virDomainStatsRecordListFree(self.0) };
        }
    }
}

/// Counters of every active domain marked with `scope`, from one bulk call
/// (blocking). `known` holds each domain's marks by UUID; a domain not in
/// it has its marks read once (one metadata call).
fn read_bulk(
    conn: &virt::connect::Connect,
    scope: &str,
    known: &Mutex<HashMap<String, Option<Marks>>>,
) -> Result<Vec<RawSample>, LibvirtError> {
    let mut list: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: the connection is open for the call; libvirt fills `list`.
    let count = unsafe {
        sys::virConnectGetAllDomainStats(conn.as_ptr(), BULK_STATS, &mut list, BULK_FLAGS)
    };
    let list = RecordList(list);
    if count < 0 {
        return Err(virt::error::Error::last_error().into());
    }
    let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
    let mut seen = HashSet::new();
    let mut samples = Vec::new();
    for index in 0..count as usize {
        // SAFETY: `list` holds `count` records, alive until it is dropped
        // at the end of this function.
        let record = unsafe { &**list.0.add(index) };
        let params: &[sys::virTypedParameter] = if record.params.is_null() || record.nparams <= 0 {
            &[]
        } else {
            // SAFETY: libvirt gives `nparams` parameters at `params`.
            unsafe { std::slice::from_raw_parts(record.params, record.nparams as usize) }
        };
        let Some(uuid) = uuid_of(record.dom) else {
            continue;
        };
        seen.insert(uuid.clone());
        let marks = known
            .entry(uuid.clone())
            .or_insert_with(|| marks_of(record.dom))
            .as_ref()
            .filter(|m| m.scope == scope);
        let Some(marks) = marks else {
            continue;
        };
        let mut sample = bulk_counters(params);
        sample.workload_id = marks.workload_id.clone();
        sample.uuid = uuid;
        samples.push(sample);
    }
    known.retain(|uuid, _| seen.contains(uuid));
    drop(list);
    Ok(samples)
}

/// A record's domain UUID (read from the handle, no call to libvirtd).
fn uuid_of(domain: sys::virDomainPtr) -> Option<String> {
    let mut buffer = [0 as std::os::raw::c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: the domain handle is alive with its record; the buffer has
    // the size libvirt writes.
    let written = unsafe { sys::virDomainGetUUIDString(domain, buffer.as_mut_ptr()) };
    if written < 0 {
        return None;
    }
    // SAFETY: libvirt wrote a NUL-terminated string into the buffer.
    let uuid = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    uuid.to_str().ok().map(str::to_string)
}

/// The agent's marks on a record's domain; none when it has none.
fn marks_of(domain: sys::virDomainPtr) -> Option<Marks> {
    // SAFETY: a reference of our own, released when `handle` drops; the
    // record keeps its own.
    let handle = unsafe {
        if sys::virDomainRef(domain) < 0 {
            return None;
        }
        virt::domain::Domain::from_ptr(domain)
    };
    let xml = handle
        .metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(NAMESPACE), 0)
        .ok()?;
    Marks::parse(&xml)
}

/// A typed parameter's value as a counter; none for strings and doubles.
fn counter(param: &sys::virTypedParameter) -> Option<u64> {
    // SAFETY: the union member read is the one `type_` names.
    unsafe {
        match param.type_ as u32 {
            sys::VIR_TYPED_PARAM_ULLONG => Some(param.value.ul),
            sys::VIR_TYPED_PARAM_LLONG => Some(param.value.l.max(0) as u64),
            sys::VIR_TYPED_PARAM_UINT => Some(u64::from(param.value.ui)),
            sys::VIR_TYPED_PARAM_INT => Some(param.value.i.max(0) as u64),
            _ => None,
        }
    }
}

/// The counters a record's parameters carry (`cpu.time`,
/// `balloon.rss`/`balloon.current`, `block.N.rd.bytes`, `net.N.rx.bytes`…).
fn bulk_counters(params: &[sys::virTypedParameter]) -> RawSample {
    let named = params.iter().filter_map(|p| {
        // SAFETY: `field` is a NUL-terminated name within its array.
        let name = unsafe { CStr::from_ptr(p.field.as_ptr()) };
        Some((name.to_str().ok()?, counter(p)?))
    });
    counters_from(named)
}

/// The counters from `(name, value)` pairs of bulk statistics.
fn counters_from<'a>(named: impl Iterator<Item = (&'a str, u64)>) -> RawSample {
    let (mut rss_kib, mut current_kib) = (0u64, 0u64);
    let mut sample = RawSample::default();
    for (name, value) in named {
        match name {
            "cpu.time" => sample.cpu_time_ns = value,
            "balloon.rss" => rss_kib = value,
            "balloon.current" => current_kib = value,
            _ if name.starts_with("block.") && name.ends_with(".rd.bytes") => {
                sample.disk_read_bytes = sample.disk_read_bytes.saturating_add(value)
            }
            _ if name.starts_with("block.") && name.ends_with(".wr.bytes") => {
                sample.disk_write_bytes = sample.disk_write_bytes.saturating_add(value)
            }
            _ if name.starts_with("net.") && name.ends_with(".rx.bytes") => {
                sample.net_rx_bytes = sample.net_rx_bytes.saturating_add(value)
            }
            _ if name.starts_with("net.") && name.ends_with(".tx.bytes") => {
                sample.net_tx_bytes = sample.net_tx_bytes.saturating_add(value)
            }
            _ => {}
        }
    }
    let kib = if rss_kib > 0 { rss_kib } else { current_kib };
    sample.memory_bytes = kib.saturating_mul(1024);
    sample
}

/// Reads the counters of every active domain marked with `scope`, one
/// domain at a time: where the driver has no bulk statistics (blocking).
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
    fn bulk_statistics_are_summed_over_disks_and_interfaces() {
        let sample = counters_from(
            [
                ("state.state", 1),
                ("cpu.time", 5_000),
                ("balloon.current", 65_536),
                ("balloon.rss", 2_048),
                ("block.count", 2),
                ("block.0.rd.bytes", 10),
                ("block.0.wr.bytes", 20),
                ("block.1.rd.bytes", 1),
                ("block.1.rd.reqs", 999),
                ("net.count", 1),
                ("net.0.rx.bytes", 300),
                ("net.0.tx.bytes", 400),
            ]
            .into_iter(),
        );
        assert_eq!(sample.cpu_time_ns, 5_000);
        assert_eq!(sample.memory_bytes, 2_048 * 1024, "the RSS, when known");
        assert_eq!((sample.disk_read_bytes, sample.disk_write_bytes), (11, 20));
        assert_eq!((sample.net_rx_bytes, sample.net_tx_bytes), (300, 400));
        let no_rss = counters_from([("balloon.current", 4)].into_iter());
        assert_eq!(no_rss.memory_bytes, 4096, "else the balloon size");
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
