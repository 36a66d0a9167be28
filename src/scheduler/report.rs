//! What the node tells the scheduler: its registration (identity, capacity,
//! reachable runtimes) and each heartbeat's usage and workload statuses.
//!
//! Everything comes from the configuration, the host, the runtime board and
//! the informer cache; building a report never waits on a runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use persys_api::CONDITION_READY;
use persys_api::control::v1::{
    HeartbeatRequest, NodeCapabilities, NodeUsage, ReasonDetail, RegisterNodeRequest, StoragePool,
    WorkloadStatus, WorkloadUsageSnapshot,
};
use persys_api::v1::{self as agent, ActualState, Workload, WorkloadType};
use persys_controllers::Cache;
use prometheus_client::metrics::counter::Counter;
use prost::Message;

use crate::config::Config;
use crate::node::NodeSampler;
use crate::runtimes::Registry;
use crate::runtimes::RuntimeBoard;
use crate::server::UsageLookup;
use crate::server::ceilings::Figures;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Where libvirt keeps VM disk images: a storage pool when VMs are enabled.
const LIBVIRT_IMAGES: &str = "/var/lib/libvirt/images";

/// Builds the node's registration and heartbeats.
#[derive(Clone)]
pub struct NodeReporter {
    node_id: String,
    labels: BTreeMap<String, String>,
    agent_version: String,
    cluster_id: String,
    /// The directories workload data is kept in, each offered as a local
    /// pool named by its path.
    storage_pools: Vec<PathBuf>,
    /// The runtimes enabled by configuration, by board name; only those the
    /// board also calls healthy are offered to the scheduler.
    enabled: Vec<(&'static str, WorkloadType)>,
    /// The filesystem whose use is reported (the state directory's).
    disk_path: PathBuf,
    cache: Cache,
    node: NodeSampler,
    runtimes: RuntimeBoard,
    usage: Option<UsageLookup>,
    /// Heartbeats trimmed to fit the scheduler's message limit
    /// (`persys_agent_heartbeats_trimmed_total` once registered).
    trimmed: Counter,
}

impl NodeReporter {
    pub fn new(
        config: &Config,
        cache: Cache,
        node: NodeSampler,
        runtimes: RuntimeBoard,
        usage: Option<UsageLookup>,
    ) -> Self {
        let registry = Registry::new(config);
        let enabled = registry.enabled().map(|r| (r.name, r.kind)).collect();
        let mut storage_pools = vec![config.state_path.clone()];
        if registry.get(WorkloadType::Vm).enabled {
            storage_pools.push(PathBuf::from(LIBVIRT_IMAGES));
        }
        NodeReporter {
            node_id: node_id(config),
            labels: labels(config),
            agent_version: config.agent_version(),
            cluster_id: config.cluster_id.clone().unwrap_or_default(),
            storage_pools,
            enabled,
            disk_path: config.state_path.clone(),
            cache,
            node,
            runtimes,
            usage,
            trimmed: Counter::default(),
        }
    }

    /// Counts trimmed heartbeats on `counter` (a registered metric).
    pub fn with_trim_counter(mut self, counter: Counter) -> Self {
        self.trimmed = counter;
        self
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The enabled runtimes the board calls healthy, by the scheduler's names.
    pub fn supported_workload_types(&self) -> Vec<String> {
        self.enabled
            .iter()
            .filter(|(name, _)| self.runtimes.is_healthy(name))
            .map(|(_, kind)| kind.short_name().to_string())
            .collect()
    }

    pub fn capabilities(&self) -> NodeCapabilities {
        NodeCapabilities {
            cpu_total_millicores: cpu_total_millicores(),
            memory_total_mb: memory_total_mb().unwrap_or(0),
            storage_pools: self.storage_pools.iter().map(|p| storage_pool(p)).collect(),
            supported_workload_types: self.supported_workload_types(),
            supported_storage_drivers: vec!["local".to_string()],
        }
    }

    /// The registration, advertising `grpc_endpoint` as this node's address.
    pub fn registration(&self, grpc_endpoint: String) -> RegisterNodeRequest {
        RegisterNodeRequest {
            node_id: self.node_id.clone(),
            capabilities: Some(self.capabilities()),
            labels: self.labels.clone(),
            agent_version: self.agent_version.clone(),
            grpc_endpoint,
            cluster_id: self.cluster_id.clone(),
            timestamp: Some(SystemTime::now().into()),
        }
    }

    /// A heartbeat: node usage and every cached workload's status, fitted
    /// to [`HEARTBEAT_BUDGET`].
    pub fn heartbeat(&self) -> HeartbeatRequest {
        self.heartbeat_of(&self.cache.list())
    }

    /// The heartbeat of `workloads` (the cache's list). O(workloads): one
    /// usage lookup and one status each, all from memory; when it would not
    /// fit the scheduler's message limit it is trimmed ([`fit_heartbeat`]),
    /// counted and logged.
    pub fn heartbeat_of(&self, workloads: &[Arc<Workload>]) -> HeartbeatRequest {
        let mut statuses = Vec::with_capacity(workloads.len());
        let mut workload_usage = Vec::new();
        for workload in workloads {
            let usage = self.usage.as_ref().and_then(|lookup| lookup(workload.id()));
            let usage = usage.as_ref().map(usage_snapshot);
            if let Some(snapshot) = &usage {
                workload_usage.push(snapshot.clone());
            }
            statuses.push(status_report(workload, usage));
        }
        let mut heartbeat = HeartbeatRequest {
            node_id: self.node_id.clone(),
            usage: Some(self.usage(workloads)),
            workload_statuses: statuses,
            timestamp: Some(SystemTime::now().into()),
            workload_usage,
        };
        if let Some(trimmed) = fit_heartbeat(&mut heartbeat, HEARTBEAT_BUDGET) {
            self.trimmed.inc();
            tracing::warn!(
                workloads = workloads.len(),
                bytes_before = trimmed.bytes_before,
                bytes_after = trimmed.bytes_after,
                limit = SCHEDULER_MESSAGE_LIMIT,
                texts_cut_to = ?trimmed.texts_cut_to,
                usage_list_dropped = trimmed.usage_list_dropped,
                statuses_dropped = trimmed.statuses_dropped,
                "the heartbeat would near the scheduler's message limit: trimmed (persys_agent_heartbeats_trimmed_total)"
            );
        }
        heartbeat
    }

    fn usage(&self, workloads: &[Arc<Workload>]) -> NodeUsage {
        let allocated = Allocation::of(workloads);
        let host = self.node.latest();
        let cpu_used = host.cpu / 100.0 * cpu_total_millicores() as f64;
        let memory_used = host.memory / 100.0 * host.memory_total_bytes as f64 / MIB as f64;
        NodeUsage {
            cpu_allocated_millicores: allocated.cpu_millicores,
            cpu_used_millicores: cpu_used.round() as i64,
            memory_allocated_mb: allocated.memory_mb,
            memory_used_mb: memory_used.round() as i64,
            disk_allocated_gb: allocated.disk_gb,
            disk_used_gb: disk_used_gb(&self.disk_path).unwrap_or(0),
        }
    }
}

/// The scheduler's gRPC message limit: grpc-go's default, which the Persys
/// scheduler keeps.
pub const SCHEDULER_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

/// The most a heartbeat is made to take: the limit less room for the
/// gRPC frame and metadata, so a heartbeat never nears the limit itself.
pub const HEARTBEAT_BUDGET: usize = SCHEDULER_MESSAGE_LIMIT - 256 * 1024;

/// Lengths (in characters) the free texts of statuses (`message`,
/// `reason.message`) are cut to, one after the other, while a heartbeat is
/// over its budget.
const TEXT_CUTS: [usize; 4] = [1024, 256, 64, 0];

/// What [`fit_heartbeat`] cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trimmed {
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// The length the statuses' texts were cut to, if they were.
    pub texts_cut_to: Option<usize>,
    /// The top-level `workload_usage` list was left out (each status still
    /// carries its workload's usage).
    pub usage_list_dropped: bool,
    /// Statuses left out, from the end of the list.
    pub statuses_dropped: usize,
}

/// Makes `heartbeat` encode to at most `budget` bytes, cutting the least
/// first: the statuses' free texts (ever shorter), then the duplicate
/// `workload_usage` list, and only then whole statuses from the end (which
/// takes tens of thousands of workloads). None when it fitted already.
pub fn fit_heartbeat(heartbeat: &mut HeartbeatRequest, budget: usize) -> Option<Trimmed> {
    let bytes_before = heartbeat.encoded_len();
    if bytes_before <= budget {
        return None;
    }
    let mut trimmed = Trimmed {
        bytes_before,
        ..Trimmed::default()
    };
    let mut size = bytes_before;
    for cut in TEXT_CUTS {
        if size <= budget {
            break;
        }
        for status in &mut heartbeat.workload_statuses {
            cut_text(&mut status.message, cut);
            if let Some(reason) = status.reason.as_mut() {
                cut_text(&mut reason.message, cut);
            }
        }
        trimmed.texts_cut_to = Some(cut);
        size = heartbeat.encoded_len();
    }
    if size > budget && !heartbeat.workload_usage.is_empty() {
        heartbeat.workload_usage = Vec::new();
        trimmed.usage_list_dropped = true;
        size = heartbeat.encoded_len();
    }
    while size > budget {
        let Some(status) = heartbeat.workload_statuses.pop() else {
            break;
        };
        // A repeated field's element: its tag (one byte), its length, itself.
        let len = status.encoded_len();
        size = size.saturating_sub(1 + prost::length_delimiter_len(len) + len);
        trimmed.statuses_dropped += 1;
    }
    trimmed.bytes_after = heartbeat.encoded_len();
    Some(trimmed)
}

/// Cuts `text` to at most `chars` characters, marking the cut with `…`.
fn cut_text(text: &mut String, chars: usize) {
    if let Some((at, _)) = text.char_indices().nth(chars) {
        text.truncate(at);
        if chars > 0 {
            text.push('…');
        }
    }
}

/// PERSYS_NODE_ID, or the host name with the first 8 characters of
/// /etc/machine-id, so that two hosts with the same name stay apart and a
/// host keeps its id across restarts.
pub fn node_id(config: &Config) -> String {
    match &config.node_id {
        Some(id) => id.clone(),
        None => default_node_id(
            &config.node_id(),
            std::fs::read_to_string("/etc/machine-id").ok().as_deref(),
        ),
    }
}

fn default_node_id(hostname: &str, machine_id: Option<&str>) -> String {
    match machine_id.map(str::trim) {
        Some(id) if id.len() >= 8 && id.is_char_boundary(8) => format!("{hostname}-{}", &id[..8]),
        _ => hostname.to_string(),
    }
}

/// PERSYS_NODE_LABELS, with PERSYS_NODE_REGION and PERSYS_NODE_ENV as the
/// labels `region` and `env` (they win over the same keys in the list).
pub fn labels(config: &Config) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = config.node_labels.iter().cloned().collect();
    if let Some(region) = &config.node_region {
        labels.insert("region".into(), region.clone());
    }
    if let Some(env) = &config.node_env {
        labels.insert("env".into(), env.clone());
    }
    labels
}

/// What the workloads that should run have been promised, from their specs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    pub cpu_millicores: i64,
    pub memory_mb: i64,
    pub disk_gb: i64,
}

impl Allocation {
    /// Sums the specs of the workloads meant to run: stopped ones and ones
    /// being deleted hold nothing. Containers: CPU shares at 1024 per core
    /// (1024 shares = 1000m) and the memory limit; VMs: vCPUs and memory;
    /// disks and managed volumes by their declared size; compose projects:
    /// their services' limits, as the ceilings count them.
    pub fn of(workloads: &[Arc<Workload>]) -> Allocation {
        let mut total = Allocation::default();
        for workload in workloads {
            // Saturating: the figures come from clients' specs.
            let figures = Figures::of(workload);
            total.cpu_millicores = total.cpu_millicores.saturating_add(figures.millicpus);
            total.memory_mb = total.memory_mb.saturating_add(figures.memory_mib);
            total.disk_gb = total.disk_gb.saturating_add(figures.disk_gib);
        }
        total
    }
}

/// One workload's status in the scheduler's words. The failure is the
/// scheduler's coarser `persys.control.v1.FailureReason` (see
/// [`persys_api::FailureReason::control`]); the
/// agent's own code, and without a failure the reason of the `Ready`
/// condition, goes in `reason.code`, so nothing is lost. A workload that
/// runs but is not ready (its readiness probe or HEALTHCHECK fails) is
/// reported `Running` with the condition's reason (`ReadinessProbeFailed`)
/// and, in `reason.message`, its message (the probe's output).
pub fn status_report(workload: &Workload, usage: Option<WorkloadUsageSnapshot>) -> WorkloadStatus {
    let status = workload.status_or_default();
    let state = match status.actual_state() {
        ActualState::Unspecified => ActualState::Pending,
        other => other,
    };
    let last_transition = timestamp_ms(status.last_transition_ms);
    let ready = status.condition(CONDITION_READY);
    let (code, detail) = if status.failure_reason.is_empty() {
        let code = ready.map(|c| c.reason.clone()).unwrap_or_default();
        let detail = match ready {
            Some(c) if c.status != "True" && status.last_error.is_empty() => c.message.clone(),
            _ => status.last_error.clone(),
        };
        (code, detail)
    } else {
        (status.failure_reason.clone(), status.last_error.clone())
    };
    WorkloadStatus {
        workload_id: workload.id().to_string(),
        state: state.short_name().to_string(),
        failure_reason: persys_api::FailureReason::control_of_code(&status.failure_reason) as i32,
        message: status.message.clone(),
        last_transition,
        reason: Some(ReasonDetail {
            code,
            message: detail,
            last_transition,
            next_retry_at: timestamp_ms(status.next_retry_at_ms),
            retryable: !status.retry_terminal,
        }),
        usage,
    }
}

/// The agent's usage snapshot in the scheduler's shape: the type as its word
/// ("container", "compose", "vm"; empty when unknown) and the collection
/// time (Unix seconds; 0 when never collected) as a Timestamp.
pub fn usage_snapshot(usage: &agent::WorkloadUsageSnapshot) -> WorkloadUsageSnapshot {
    let kind = match usage.r#type() {
        WorkloadType::Unspecified => String::new(),
        kind => kind.short_name().to_string(),
    };
    WorkloadUsageSnapshot {
        workload_id: usage.workload_id.clone(),
        r#type: kind,
        cpu_percent: usage.cpu_percent,
        memory_bytes: usage.memory_bytes,
        disk_read_bytes: usage.disk_read_bytes,
        disk_write_bytes: usage.disk_write_bytes,
        net_rx_bytes: usage.net_rx_bytes,
        net_tx_bytes: usage.net_tx_bytes,
        collected_at: timestamp_ms(usage.collected_at.saturating_mul(1000)),
        source: usage.source.clone(),
    }
}

/// A time in Unix milliseconds as a `google.protobuf.Timestamp`; none for 0
/// (or less), which the agent's status uses for "never". Generic over the
/// Timestamp type, which converts from `SystemTime`.
fn timestamp_ms<T: From<SystemTime>>(ms: i64) -> Option<T> {
    let ms = u64::try_from(ms).ok().filter(|ms| *ms > 0)?;
    Some(T::from(UNIX_EPOCH + Duration::from_millis(ms)))
}

/// A local pool at `path`, named by it, sized by the filesystem it is on
/// (or would be created on).
fn storage_pool(path: &Path) -> StoragePool {
    StoragePool {
        name: path.display().to_string(),
        r#type: "local".to_string(),
        total_gb: path.ancestors().find_map(disk_total_gb).unwrap_or_default(),
    }
}

fn cpu_total_millicores() -> i64 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cores as i64 * 1000
}

fn memory_total_mb() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((kib / 1024) as i64)
}

/// Size of the filesystem holding `path`, when `path` exists.
fn disk_total_gb(path: &Path) -> Option<i64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some((stat.f_blocks * stat.f_frsize / GIB) as i64)
}

/// Used space of the filesystem holding `path`, as the sampler's percentage
/// counts it (everything but what is available to unprivileged users).
fn disk_used_gb(path: &Path) -> Option<i64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    let used = stat.f_blocks.saturating_sub(stat.f_bavail) * stat.f_frsize;
    Some((used / GIB) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::control::v1::FailureReason;
    use persys_api::v1::{
        ContainerSpec, DesiredState, DiskConfig, ManagedVolumeSpec, ObjectMeta, ObjectSpec,
        ObjectStatus, ResourceLimits, VmSpec, WorkloadSpec, workload_spec,
    };

    fn workload(id: &str, spec: workload_spec::Spec, desired: DesiredState) -> Arc<Workload> {
        Arc::new(Workload {
            metadata: Some(ObjectMeta {
                id: id.into(),
                r#type: WorkloadType::of(&spec) as i32,
                ..Default::default()
            }),
            spec: Some(ObjectSpec {
                desired_state: desired as i32,
                workload: Some(WorkloadSpec { spec: Some(spec) }),
            }),
            status: None,
        })
    }

    fn container(shares: i64, memory_bytes: i64) -> workload_spec::Spec {
        workload_spec::Spec::Container(ContainerSpec {
            image: "nginx".into(),
            resources: Some(ResourceLimits {
                cpu_shares: shares,
                memory_bytes,
                memory_swap_bytes: 0,
            }),
            managed_volumes: vec![ManagedVolumeSpec {
                size_gb: 3,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["persys-agent"];
        all.extend_from_slice(args);
        Config::try_parse_from_iter(all).unwrap()
    }

    #[test]
    fn allocation_sums_what_running_workloads_were_promised() {
        let vm = workload_spec::Spec::Vm(VmSpec {
            vcpus: 2,
            memory_mb: 2048,
            disks: vec![DiskConfig {
                size_gb: 10,
                ..Default::default()
            }],
            managed_volumes: vec![ManagedVolumeSpec {
                size_gb: 5,
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut deleting =
            (*workload("gone", container(1024, 1 << 30), DesiredState::Running)).clone();
        if let Some(meta) = deleting.metadata.as_mut() {
            meta.deletion_timestamp_ms = 1;
        }
        let workloads = vec![
            workload(
                "web",
                container(512, 256 * MIB as i64),
                DesiredState::Running,
            ),
            workload(
                "api",
                container(1024, 100 * MIB as i64 + 1),
                DesiredState::Unspecified,
            ),
            workload("vm", vm, DesiredState::Running),
            workload("idle", container(4096, 1 << 32), DesiredState::Stopped),
            Arc::new(deleting),
        ];
        assert_eq!(
            Allocation::of(&workloads),
            Allocation {
                cpu_millicores: 500 + 1000 + 2000,
                memory_mb: 256 + 101 + 2048,
                disk_gb: 3 + 3 + 10 + 5,
            }
        );
    }

    #[test]
    fn a_status_report_speaks_the_schedulers_words() {
        let mut failed = (*workload("web", container(0, 0), DesiredState::Running)).clone();
        let mut status = ObjectStatus {
            actual_state: ActualState::Failed as i32,
            message: "image not found".into(),
            last_error: "pull access denied".into(),
            failure_reason: "INVALID_IMAGE".into(),
            retry_terminal: true,
            last_transition_ms: 1_700_000_000_999,
            next_retry_at_ms: 1_700_000_060_000,
            ..Default::default()
        };
        status.set_condition(CONDITION_READY, false, "ImagePullFailed", "");
        failed.status = Some(status);
        let usage = WorkloadUsageSnapshot {
            workload_id: "web".into(),
            memory_bytes: 42,
            ..Default::default()
        };
        let report = status_report(&failed, Some(usage.clone()));
        assert_eq!(report.workload_id, "web");
        assert_eq!(report.state, "Failed");
        assert_eq!(report.failure_reason(), FailureReason::ImageNotFound);
        assert_eq!(report.message, "image not found");
        assert_eq!(
            report.last_transition.map(|t| (t.seconds, t.nanos)),
            Some((1_700_000_000, 999_000_000))
        );
        assert_eq!(report.usage, Some(usage));
        let reason = report.reason.unwrap();
        assert_eq!(reason.code, "INVALID_IMAGE", "the agent's own code");
        assert_eq!(reason.message, "pull access denied");
        assert_eq!(reason.last_transition, report.last_transition);
        assert_eq!(
            reason.next_retry_at.map(|t| (t.seconds, t.nanos)),
            Some((1_700_000_060, 0))
        );
        assert!(!reason.retryable);

        // No failure: the Ready condition's reason; no status yet: Pending.
        let mut starting = (*workload("api", container(0, 0), DesiredState::Running)).clone();
        let mut status = ObjectStatus::default();
        status.set_condition(CONDITION_READY, false, "Pulling", "");
        starting.status = Some(status);
        let report = status_report(&starting, None);
        assert_eq!(report.state, "Pending");
        assert_eq!(report.failure_reason(), FailureReason::Unspecified);
        assert_eq!(report.last_transition, None, "never: unset");
        let reason = report.reason.unwrap();
        assert_eq!(reason.code, "Pulling");
        assert!(reason.retryable);
        assert_eq!(reason.next_retry_at, None, "no retry scheduled: unset");
    }

    #[test]
    fn a_running_but_unready_workload_is_reported_with_its_probes_reason_and_output() {
        let mut unready = (*workload("web", container(0, 0), DesiredState::Running)).clone();
        let mut status = ObjectStatus {
            actual_state: ActualState::Running as i32,
            message: "running, not ready".into(),
            ..Default::default()
        };
        status.set_condition(
            CONDITION_READY,
            false,
            "ReadinessProbeFailed",
            "readiness probe failed: HTTP probe failed with statuscode: 503",
        );
        unready.status = Some(status.clone());
        let report = status_report(&unready, None);
        assert_eq!(report.state, "Running");
        assert_eq!(report.failure_reason(), FailureReason::Unspecified);
        let reason = report.reason.unwrap();
        assert_eq!(reason.code, "ReadinessProbeFailed");
        assert!(reason.message.contains("statuscode: 503"), "{reason:?}");
        assert!(reason.retryable);

        status.set_condition(CONDITION_READY, true, "Running", "");
        unready.status = Some(status);
        let reason = status_report(&unready, None).reason.unwrap();
        assert_eq!(reason.code, "Running");
        assert!(reason.message.is_empty());
    }

    #[test]
    fn a_usage_snapshot_takes_the_schedulers_shape() {
        let usage = agent::WorkloadUsageSnapshot {
            workload_id: "web".into(),
            r#type: WorkloadType::Container as i32,
            cpu_percent: 12.5,
            memory_bytes: 1,
            disk_read_bytes: 2,
            disk_write_bytes: 3,
            net_rx_bytes: 4,
            net_tx_bytes: 5,
            collected_at: 1_700_000_000,
            source: "docker".into(),
        };
        let snapshot = usage_snapshot(&usage);
        assert_eq!(
            snapshot,
            WorkloadUsageSnapshot {
                workload_id: "web".into(),
                r#type: "container".into(),
                cpu_percent: 12.5,
                memory_bytes: 1,
                disk_read_bytes: 2,
                disk_write_bytes: 3,
                net_rx_bytes: 4,
                net_tx_bytes: 5,
                collected_at: Some((UNIX_EPOCH + Duration::from_secs(1_700_000_000)).into()),
                source: "docker".into(),
            }
        );
        let never = usage_snapshot(&agent::WorkloadUsageSnapshot::default());
        assert_eq!(never.r#type, "");
        assert_eq!(never.collected_at, None);
    }

    #[test]
    fn supported_types_are_the_enabled_runtimes_the_board_calls_healthy() {
        let board = RuntimeBoard::default();
        let reporter = NodeReporter::new(
            &config(&["--vm-enabled", "false"]),
            Cache::default(),
            NodeSampler::default(),
            board.clone(),
            None,
        );
        assert!(reporter.supported_workload_types().is_empty());
        board.set("docker", crate::runtimes::HEALTHY);
        board.set("compose", "binary not found");
        board.set("vm", crate::runtimes::HEALTHY);
        assert_eq!(reporter.supported_workload_types(), ["container"]);
        board.set("compose", crate::runtimes::HEALTHY);
        assert_eq!(
            reporter.supported_workload_types(),
            ["container", "compose"]
        );
        let capabilities = reporter.capabilities();
        assert_eq!(capabilities.supported_storage_drivers, ["local"]);
        let pools = &capabilities.storage_pools;
        assert_eq!(pools.len(), 1, "{pools:?}");
        assert_eq!(pools[0].name, "/var/lib/persys/state");
        assert_eq!(pools[0].r#type, "local");
        assert!(pools[0].total_gb > 0, "sized by an existing ancestor");
        assert!(capabilities.cpu_total_millicores >= 1000);
        assert_eq!(capabilities.cpu_total_millicores % 1000, 0);
        assert!(capabilities.memory_total_mb > 0);
    }

    #[test]
    fn the_default_node_id_is_the_host_name_and_a_machine_id_prefix() {
        assert_eq!(
            default_node_id("web-1", Some("3d1219c7c4c5404aaa1f6d2a48adfda4\n")),
            "web-1-3d1219c7"
        );
        assert_eq!(default_node_id("web-1", None), "web-1");
        assert_eq!(default_node_id("web-1", Some("\n")), "web-1");
        assert_eq!(node_id(&config(&["--node-id", "n7"])), "n7");
    }

    /// `count` running container workloads whose status carries a
    /// `error_len`-character last error, as a cache of that size lists them.
    fn failing_workloads(count: usize, error_len: usize) -> Vec<Arc<Workload>> {
        (0..count)
            .map(|i| {
                let mut w = (*workload(
                    &format!("w{i:05}"),
                    container(1024, 64 * MIB as i64),
                    DesiredState::Running,
                ))
                .clone();
                w.status = Some(ObjectStatus {
                    actual_state: ActualState::Failed as i32,
                    failure_reason: "RUNTIME_ERROR".into(),
                    last_error: "é".repeat(error_len),
                    message: "x".repeat(error_len),
                    ..Default::default()
                });
                Arc::new(w)
            })
            .collect()
    }

    fn usage_of_every_workload() -> UsageLookup {
        Arc::new(|id: &str| {
            Some(agent::WorkloadUsageSnapshot {
                workload_id: id.to_string(),
                r#type: WorkloadType::Container as i32,
                cpu_percent: 1.5,
                memory_bytes: 1 << 20,
                collected_at: 1_700_000_000,
                source: "cgroup".into(),
                ..Default::default()
            })
        })
    }

    #[test]
    fn a_heartbeat_of_a_thousand_workloads_with_long_errors_is_trimmed_under_the_limit_and_counted()
    {
        let trimmed = Counter::default();
        let reporter = NodeReporter::new(
            &config(&[]),
            Cache::default(),
            NodeSampler::default(),
            RuntimeBoard::default(),
            Some(usage_of_every_workload()),
        )
        .with_trim_counter(trimmed.clone());
        // 1,200 workloads whose two texts take 3 KiB and 1.5 KiB: ~5 MiB.
        let workloads = failing_workloads(1200, 1536);
        let started = std::time::Instant::now();
        let heartbeat = reporter.heartbeat_of(&workloads);
        let took = started.elapsed();
        let size = heartbeat.encoded_len();
        eprintln!("1,200 workloads with 3 KiB errors: {size} bytes, built in {took:?}");
        assert!(size <= HEARTBEAT_BUDGET, "{size} bytes");
        assert!(size < SCHEDULER_MESSAGE_LIMIT);
        assert_eq!(trimmed.get(), 1, "the trim is counted");
        assert_eq!(
            heartbeat.workload_statuses.len(),
            1200,
            "texts go before any status does"
        );
        assert_eq!(heartbeat.workload_usage.len(), 1200);
        let first = &heartbeat.workload_statuses[0];
        assert_eq!(first.state, "Failed");
        assert_eq!(first.usage.as_ref().map(|u| u.memory_bytes), Some(1 << 20));
        let reason = first.reason.as_ref().unwrap();
        assert!(reason.message.ends_with('…'), "{}", reason.message);
        assert!(reason.message.chars().count() <= 1025);
        assert!(
            reason.message.starts_with("éé"),
            "cut on a character boundary"
        );

        // A thousand workloads with short texts fit as they are.
        let heartbeat = reporter.heartbeat_of(&failing_workloads(1000, 40));
        assert_eq!(trimmed.get(), 1, "nothing to trim");
        assert_eq!(heartbeat.workload_statuses.len(), 1000);
        let reason = heartbeat.workload_statuses[999].reason.as_ref().unwrap();
        assert_eq!(reason.message, "é".repeat(40));
        eprintln!(
            "1,000 workloads with usage: {} bytes",
            heartbeat.encoded_len()
        );
    }

    #[test]
    fn a_heartbeat_over_its_budget_drops_texts_then_the_usage_list_then_whole_statuses() {
        let reporter = NodeReporter::new(
            &config(&[]),
            Cache::default(),
            NodeSampler::default(),
            RuntimeBoard::default(),
            Some(usage_of_every_workload()),
        );
        let mut heartbeat = reporter.heartbeat_of(&failing_workloads(1000, 300));
        let full = heartbeat.encoded_len();
        let budget = full / 20;
        let trimmed = fit_heartbeat(&mut heartbeat, budget).unwrap();
        assert_eq!(trimmed.bytes_before, full);
        assert!(trimmed.bytes_after <= budget, "{trimmed:?}");
        assert_eq!(trimmed.bytes_after, heartbeat.encoded_len());
        assert_eq!(trimmed.texts_cut_to, Some(0));
        assert!(trimmed.usage_list_dropped);
        assert!(trimmed.statuses_dropped > 0, "{trimmed:?}");
        assert_eq!(
            heartbeat.workload_statuses.len() + trimmed.statuses_dropped,
            1000
        );
        // What is left is the head of the list, whole but for its texts.
        assert_eq!(heartbeat.workload_statuses[0].workload_id, "w00000");
        assert_eq!(heartbeat.workload_statuses[0].message, "");
        assert!(heartbeat.workload_statuses[0].usage.is_some());
        // Nothing is cut from a heartbeat within its budget.
        let mut small = reporter.heartbeat_of(&failing_workloads(3, 300));
        let before = small.clone();
        assert_eq!(fit_heartbeat(&mut small, HEARTBEAT_BUDGET), None);
        assert_eq!(small, before);
    }

    #[test]
    fn region_and_env_become_labels_over_the_listed_ones() {
        let labels = labels(&config(&[
            "--node-labels",
            "zone=a,region=old",
            "--node-region",
            "eu-west",
            "--node-env",
            "staging",
        ]));
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            [
                ("env".to_string(), "staging".to_string()),
                ("region".to_string(), "eu-west".to_string()),
                ("zone".to_string(), "a".to_string()),
            ]
        );
    }
}
