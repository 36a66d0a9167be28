//! Resource usage of running containers: read from each container's
//! cgroup files and network namespace (`crate::cgroup`), with the engine's
//! stats endpoint as the fallback where those cannot be read (a remote
//! `DOCKER_HOST`, say). The path is chosen once per host, at the first round
//! that reaches the engine, and reported in HealthCheck.
//!
//! A round costs one container list, shared with the compose sampler
//! ([`RunningContainers`]); on the cgroup path no engine call is
//! made per container (one inspect, once, for a container whose cgroup is
//! not where the engine's driver puts it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerStatsResponse, ContainerSummary, SystemInfoCgroupVersionEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions, StatsOptions};
use futures::StreamExt;
use persys_api::v1::{WorkloadType, WorkloadUsageSnapshot};
use tokio_util::sync::CancellationToken;

use super::adopt;
use super::engine::Engine;
use super::labels::{self, Marks};
use crate::cgroup::{CgroupSampler, ContainerUsage, Driver, Hierarchy};

pub use crate::usage::UsageSnapshots;
use crate::usage::{sample_every, unix_now};

/// One stats request may take this long (the engine samples twice, about
/// a second apart, to compute CPU use).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a sample came from: a snapshot's `source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Source {
    /// The container's cgroup files and network namespace.
    #[default]
    Cgroup,
    /// The engine's stats endpoint.
    Stats,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cgroup => "cgroup",
            Source::Stats => "docker",
        }
    }
}

/// One container's usage (or several containers' summed), from either
/// source.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Percent of one core.
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub source: Source,
}

impl Sample {
    fn from_cgroup(usage: &ContainerUsage) -> Sample {
        let c = &usage.counters;
        Sample {
            cpu_percent: usage.cpu_percent,
            memory_bytes: c.memory_bytes,
            disk_read_bytes: c.disk_read_bytes,
            disk_write_bytes: c.disk_write_bytes,
            net_rx_bytes: c.net_rx_bytes,
            net_tx_bytes: c.net_tx_bytes,
            source: Source::Cgroup,
        }
    }

    /// Adds another container's usage (a compose project's services); the
    /// sum is from the cgroups only when every part is.
    pub fn add(&mut self, other: &Sample) {
        self.cpu_percent += other.cpu_percent;
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.disk_read_bytes = self.disk_read_bytes.saturating_add(other.disk_read_bytes);
        self.disk_write_bytes = self.disk_write_bytes.saturating_add(other.disk_write_bytes);
        self.net_rx_bytes = self.net_rx_bytes.saturating_add(other.net_rx_bytes);
        self.net_tx_bytes = self.net_tx_bytes.saturating_add(other.net_tx_bytes);
        if other.source == Source::Stats {
            self.source = Source::Stats;
        }
    }

    /// The workload's usage report.
    pub fn snapshot(
        &self,
        workload_id: &str,
        kind: WorkloadType,
        collected_at: i64,
    ) -> WorkloadUsageSnapshot {
        let signed = |v: u64| v.min(i64::MAX as u64) as i64;
        WorkloadUsageSnapshot {
            workload_id: workload_id.to_string(),
            r#type: kind as i32,
            cpu_percent: self.cpu_percent,
            memory_bytes: signed(self.memory_bytes),
            disk_read_bytes: signed(self.disk_read_bytes),
            disk_write_bytes: signed(self.disk_write_bytes),
            net_rx_bytes: signed(self.net_rx_bytes),
            net_tx_bytes: signed(self.net_tx_bytes),
            collected_at,
            source: self.source.as_str().to_string(),
        }
    }
}

/// How this host's containers are read, chosen once.
enum Path {
    /// From the cgroup files. A std mutex: held by one blocking read at a
    /// time, never across an await.
    Cgroup(Arc<Mutex<CgroupSampler>>),
    /// From the engine's stats endpoint.
    Stats,
}

/// Reads running containers' usage, through their cgroups where this host
/// allows it, else through the engine's stats. Shared by the Docker and
/// Compose samplers' code; each sampler has its own (its own previous CPU
/// times).
pub struct ContainerReader {
    engine: Engine,
    /// Stats requests in flight at once, on the stats path.
    concurrency: usize,
    /// Chosen at the first round that reaches the engine; fixed after.
    path: OnceLock<Path>,
    /// Containers whose process is not visible from here (another pid
    /// namespace): read through stats even on the cgroup path. Pruned to
    /// the running ones every round.
    stats_only: Mutex<HashSet<String>>,
    /// Where the choice is published for HealthCheck.
    snapshots: UsageSnapshots,
}

impl ContainerReader {
    pub fn new(engine: Engine, concurrency: usize, snapshots: UsageSnapshots) -> Self {
        ContainerReader {
            engine,
            concurrency: concurrency.max(1),
            path: OnceLock::new(),
            stats_only: Mutex::default(),
            snapshots,
        }
    }

    /// A reader that always uses the stats endpoint (the benchmark's
    /// baseline).
    pub fn stats_only(engine: Engine, concurrency: usize) -> Self {
        let reader = ContainerReader::new(engine, concurrency, UsageSnapshots::default());
        let _ = reader.path.set(Path::Stats);
        reader
    }

    /// True once the cgroup path was chosen for this host.
    pub fn uses_cgroups(&self) -> bool {
        matches!(self.path.get(), Some(Path::Cgroup(_)))
    }

    /// Counter files the cgroup path keeps open between rounds.
    pub fn files_held(&self) -> usize {
        match self.path.get() {
            Some(Path::Cgroup(sampler)) => sampler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .files_held(),
            _ => 0,
        }
    }

    /// The usage of each container of `ids` that could be read, by
    /// container id.
    pub async fn read(
        &self,
        docker: &Docker,
        ids: Vec<String>,
    ) -> Result<HashMap<String, Sample>, EngineError> {
        let path = match self.path.get() {
            Some(path) => path,
            None => {
                let (path, description) = choose(self.engine.host(), docker).await?;
                tracing::info!(how = %description, "container usage is sampled");
                self.snapshots.set_source(description);
                self.path.get_or_init(|| path)
            }
        };
        let sampler = match path {
            Path::Stats => return Ok(stats_many(docker, ids, self.concurrency).await),
            Path::Cgroup(sampler) => sampler.clone(),
        };
        let (through_stats, through_cgroups): (Vec<String>, Vec<String>) = {
            let mut stats_only = self.stats_only.lock().unwrap_or_else(|p| p.into_inner());
            let listed: HashSet<&String> = ids.iter().collect();
            stats_only.retain(|id| listed.contains(id));
            ids.into_iter().partition(|id| stats_only.contains(id))
        };
        let reading = sampler.clone();
        let round = tokio::task::spawn_blocking(move || {
            reading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sample(&through_cgroups)
        })
        .await
        .unwrap_or_default();
        let mut samples: HashMap<String, Sample> = round
            .usage
            .iter()
            .map(|(id, usage)| (id.clone(), Sample::from_cgroup(usage)))
            .collect();
        let mut through_stats = through_stats;
        for id in round.unresolved {
            match self.learn(docker, &sampler, &id).await {
                Some(sample) => {
                    samples.insert(id, sample);
                }
                None => {
                    tracing::info!(container = %id, "the container's cgroup is not readable here; its usage comes from the engine's stats");
                    self.stats_only
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone());
                    through_stats.push(id);
                }
            }
        }
        samples.extend(stats_many(docker, through_stats, self.concurrency).await);
        Ok(samples)
    }

    /// Finds container `id`'s cgroup through its process (one inspect) and
    /// reads it.
    async fn learn(
        &self,
        docker: &Docker,
        sampler: &Arc<Mutex<CgroupSampler>>,
        id: &str,
    ) -> Option<Sample> {
        // A parent learned from an earlier container of this round may
        // hold this one too: look again before asking the engine.
        let (again, again_id) = (sampler.clone(), id.to_string());
        let found = tokio::task::spawn_blocking(move || {
            let mut sampler = again.lock().unwrap_or_else(|p| p.into_inner());
            sampler.read_one(&again_id)?.ok()
        })
        .await
        .ok()
        .flatten();
        if let Some(usage) = found {
            return Some(Sample::from_cgroup(&usage));
        }
        let pid = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?
            .state?
            .pid
            .filter(|pid| *pid > 0)?;
        let pid = u32::try_from(pid).ok()?;
        let (sampler, id) = (sampler.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            let mut sampler = sampler.lock().unwrap_or_else(|p| p.into_inner());
            if !sampler.learn(&id, pid) {
                return None;
            }
            sampler.read_one(&id)?.ok().map(|u| Sample::from_cgroup(&u))
        })
        .await
        .ok()
        .flatten()
    }
}

/// The cgroup path when the engine runs on this host and this host's
/// cgroups are mounted here, in the version the engine uses; else stats,
/// with why. An engine error means: not chosen yet, try next round.
async fn choose(host: &str, docker: &Docker) -> Result<(Path, String), EngineError> {
    if !is_local(host) {
        return Ok((
            Path::Stats,
            format!("docker stats: the engine at {host} is not on this host"),
        ));
    }
    let hierarchy = match Hierarchy::detect() {
        Ok(hierarchy) => hierarchy,
        Err(why) => return Ok((Path::Stats, format!("docker stats: {why}"))),
    };
    let info = docker.info().await?;
    let driver = Driver::from_engine(
        &info
            .cgroup_driver
            .map(|d| d.to_string())
            .unwrap_or_default(),
    );
    let engine_version = match info.cgroup_version {
        Some(SystemInfoCgroupVersionEnum::_1) => Some("1"),
        Some(SystemInfoCgroupVersionEnum::_2) => Some("2"),
        _ => None,
    };
    if let Some(version) = engine_version
        && version != hierarchy.version()
    {
        return Ok((
            Path::Stats,
            format!(
                "docker stats: the engine uses cgroup v{version}, this process sees v{}",
                hierarchy.version()
            ),
        ));
    }
    let described = format!("cgroup v{} ({driver} driver)", hierarchy.version());
    let sampler = CgroupSampler::new(hierarchy, driver);
    Ok((Path::Cgroup(Arc::new(Mutex::new(sampler))), described))
}

/// A unix socket is on this host; a TCP or SSH address may be anywhere.
fn is_local(host: &str) -> bool {
    host.starts_with("unix://") || host.starts_with('/')
}

/// Stats of each container, `concurrency` requests at a time.
async fn stats_many(
    docker: &Docker,
    ids: Vec<String>,
    concurrency: usize,
) -> HashMap<String, Sample> {
    futures::stream::iter(ids)
        .map(|id| async move {
            let sample = stats_of(docker, &id).await;
            sample.map(|s| (id, s))
        })
        .buffer_unordered(concurrency.max(1))
        .filter_map(|sample| async move { sample })
        .collect()
        .await
}

/// One container's usage through the engine's stats endpoint.
pub async fn stats_of(docker: &Docker, container_id: &str) -> Option<Sample> {
    let mut stats = docker.stats(
        container_id,
        Some(StatsOptions {
            stream: false,
            one_shot: false,
        }),
    );
    match tokio::time::timeout(STATS_TIMEOUT, stats.next()).await {
        Ok(Some(Ok(stats))) => Some(from_stats(&stats)),
        Ok(Some(Err(error))) => {
            tracing::debug!(%error, container = container_id, "stats failed");
            None
        }
        Ok(None) | Err(_) => None,
    }
}

/// The engine's running containers, listed once for every sampler that
/// reads within `max_age` of the listing: the container and compose
/// samplers of one agent share one list per round. Every running container
/// is listed (no label filter): this agent's carry its labels, but the Go
/// agent's compose services, adopted, carry none of them.
pub struct RunningContainers {
    max_age: Duration,
    /// One listing at a time; the latest, with when its call started.
    slot: tokio::sync::Mutex<Option<(Instant, Arc<Vec<ContainerSummary>>)>>,
    /// List calls made, for tests and benchmarks.
    lists: AtomicU64,
}

impl RunningContainers {
    /// Shared by samplers that sample every `interval`: a listing serves
    /// for half of it, so each round lists once and never reads a listing
    /// of the round before.
    pub fn for_interval(interval: Duration) -> Arc<Self> {
        Arc::new(RunningContainers {
            max_age: interval / 2,
            slot: tokio::sync::Mutex::default(),
            lists: AtomicU64::new(0),
        })
    }

    /// The running containers, from the listing while it is young enough,
    /// else from a new one.
    pub async fn get(&self, docker: &Docker) -> Result<Arc<Vec<ContainerSummary>>, EngineError> {
        let mut slot = self.slot.lock().await;
        if let Some((taken, listed)) = slot.as_ref()
            && taken.elapsed() < self.max_age
        {
            return Ok(listed.clone());
        }
        let taken = Instant::now();
        self.lists.fetch_add(1, Ordering::Relaxed);
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(HashMap::from([(
                    "status".to_string(),
                    vec!["running".to_string()],
                )])),
                ..Default::default()
            }))
            .await?;
        let listed = Arc::new(listed);
        *slot = Some((taken, listed.clone()));
        Ok(listed)
    }

    /// List calls made so far.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }
}

/// Samples every running managed container of one scope and replaces the
/// snapshots with the result.
pub struct UsageSampler {
    pub(crate) engine: Engine,
    pub(crate) scope: String,
    pub(crate) interval: Duration,
    pub(crate) snapshots: UsageSnapshots,
    pub(crate) reader: Arc<ContainerReader>,
    /// Its own unless shared ([`UsageSampler::sharing`]).
    running: Arc<RunningContainers>,
}

impl UsageSampler {
    pub(crate) fn new(
        engine: Engine,
        scope: String,
        interval: Duration,
        concurrency: usize,
        snapshots: UsageSnapshots,
    ) -> Self {
        let reader = Arc::new(ContainerReader::new(
            engine.clone(),
            concurrency,
            snapshots.clone(),
        ));
        UsageSampler {
            engine,
            scope,
            interval,
            snapshots,
            reader,
            running: RunningContainers::for_interval(interval),
        }
    }

    /// Reads the running containers from `running`, which other samplers
    /// of the same engine read too.
    pub fn sharing(mut self, running: Arc<RunningContainers>) -> Self {
        self.running = running;
        self
    }

    /// Samples every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        sample_every(self.interval, &shutdown, "container", || self.sample_once()).await;
    }

    /// One round; returns how many workloads were sampled.
    pub async fn sample_once(&self) -> Result<usize, EngineError> {
        let docker = self.engine.client().await?;
        let mut owners: HashMap<String, String> = HashMap::new();
        for summary in self.running.get(&docker).await?.iter() {
            if let Some(workload) = owner_of(summary, &self.scope)
                && let Some(container) = summary.id.clone()
            {
                owners.insert(container, workload);
            }
        }
        let read = self
            .reader
            .read(&docker, owners.keys().cloned().collect())
            .await?;
        let collected_at = unix_now();
        let samples: HashMap<String, WorkloadUsageSnapshot> = read
            .iter()
            .filter_map(|(container, sample)| {
                let workload = owners.get(container)?;
                Some((
                    workload.clone(),
                    sample.snapshot(workload, WorkloadType::Container, collected_at),
                ))
            })
            .collect();
        let count = samples.len();
        self.snapshots.replace(samples);
        Ok(count)
    }
}

/// The container workload a running container counts for: this agent's
/// of `scope`, or the Go agent's named and labelled with the workload (an
/// adopted one: the observer, events, logs and exec read it as the
/// workload's too).
fn owner_of(summary: &ContainerSummary, scope: &str) -> Option<String> {
    let labels = summary.labels.as_ref();
    if labels
        .and_then(|l| l.get(labels::SCOPE))
        .map(String::as_str)
        == Some(scope)
    {
        return Marks::read(labels).workload_id;
    }
    let id = adopt::go_owner(labels)?;
    adopt::is_go_container_of(summary, id).then(|| id.to_string())
}

/// A container's usage from one stats answer, computed as `docker stats`
/// does.
fn from_stats(stats: &ContainerStatsResponse) -> Sample {
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
    Sample {
        cpu_percent,
        memory_bytes,
        disk_read_bytes: read,
        disk_write_bytes: write,
        net_rx_bytes: rx,
        net_tx_bytes: tx,
        source: Source::Stats,
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
    fn a_container_counts_for_this_scopes_workload_or_the_go_agents_it_is_named_for() {
        let container = |name: &str, labels: &[(&str, &str)]| ContainerSummary {
            id: Some(format!("id-{name}")),
            names: Some(vec![format!("/{name}")]),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let ours = container(
            "web",
            &[
                (labels::MANAGED, "true"),
                (labels::SCOPE, "s"),
                (labels::WORKLOAD_ID, "web"),
            ],
        );
        assert_eq!(owner_of(&ours, "s").as_deref(), Some("web"));
        assert_eq!(owner_of(&ours, "other"), None);
        let go = container(
            "api",
            &[(labels::MANAGED, "true"), (adopt::GO_WORKLOAD_ID, "api")],
        );
        assert_eq!(owner_of(&go, "s").as_deref(), Some("api"));
        let misnamed = container(
            "api-copy",
            &[(labels::MANAGED, "true"), (adopt::GO_WORKLOAD_ID, "api")],
        );
        assert_eq!(owner_of(&misnamed, "s"), None);
    }

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
        let s = from_stats(&stats).snapshot("web", WorkloadType::Container, 42);
        assert!((s.cpu_percent - 10.0).abs() < 1e-9, "{}", s.cpu_percent);
        assert_eq!(s.memory_bytes, 6_000);
        assert_eq!((s.disk_read_bytes, s.disk_write_bytes), (7, 9));
        assert_eq!((s.net_rx_bytes, s.net_tx_bytes), (100, 50));
        assert_eq!(s.collected_at, 42);
        assert_eq!(s.r#type, WorkloadType::Container as i32);
        assert_eq!(s.source, "docker");
    }

    #[test]
    fn a_compose_sum_adds_every_counter_and_is_from_cgroups_only_when_every_part_is() {
        let part = |source| Sample {
            cpu_percent: 1.5,
            memory_bytes: 10,
            disk_read_bytes: 1,
            disk_write_bytes: 2,
            net_rx_bytes: 3,
            net_tx_bytes: u64::MAX,
            source,
        };
        let mut sum = part(Source::Cgroup);
        sum.add(&part(Source::Cgroup));
        assert_eq!(sum.cpu_percent, 3.0);
        assert_eq!(sum.memory_bytes, 20);
        assert_eq!(sum.source, Source::Cgroup);
        sum.add(&part(Source::Stats));
        assert_eq!(sum.source, Source::Stats);
        let snapshot = sum.snapshot("shop", WorkloadType::Compose, 7);
        assert_eq!(snapshot.net_tx_bytes, i64::MAX);
        assert_eq!(snapshot.r#type, WorkloadType::Compose as i32);
    }

    #[test]
    fn only_a_unix_socket_is_taken_for_an_engine_on_this_host() {
        assert!(is_local("unix:///var/run/docker.sock"));
        assert!(!is_local("tcp://10.0.0.5:2375"));
        assert!(!is_local("ssh://node"));
    }

    #[test]
    fn a_first_sample_without_a_previous_one_reports_no_cpu() {
        let stats = ContainerStatsResponse::default();
        assert_eq!(from_stats(&stats).cpu_percent, 0.0);
    }
}
