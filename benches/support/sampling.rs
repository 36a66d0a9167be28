//! The cost of one usage sample per container, through the agent's own
//! reader, both ways in one call: the cgroup path (files of each
//! container's cgroup and network namespace) and the engine's stats
//! endpoint, at the same concurrency. Shared by the usage and scale
//! benchmarks: include it with `#[path = "support/sampling.rs"] mod sampling;`.

#![allow(dead_code)] // each benchmark uses part of it

use std::time::{Duration, Instant};

use persys_controllers::docker::Engine;
use persys_controllers::docker::usage::{ContainerReader, Source};

/// What one round cost, per container, each way.
#[derive(Debug, Clone, Copy)]
pub struct SamplingCost {
    pub containers: usize,
    /// Readers (cgroup path) or requests (stats) in flight at once.
    pub concurrency: usize,
    /// Wall time of one round through the cgroups, per container (the mean
    /// of `rounds` rounds after a first one that finds every cgroup).
    pub cgroup: Duration,
    /// Wall time of one round through the engine's stats, per container.
    pub stats: Duration,
    /// Containers each path returned a sample of (a container not sampled
    /// is a failure the caller should report).
    pub cgroup_sampled: usize,
    pub stats_sampled: usize,
    /// Timed cgroup rounds.
    pub rounds: u32,
    /// CPU time per container of this process and of the engine
    /// (`dockerd`, when found), each way.
    pub cgroup_cpu: Duration,
    pub cgroup_engine_cpu: Duration,
    pub stats_cpu: Duration,
    pub stats_engine_cpu: Duration,
}

/// CPU time of process `pid` (user + system), from /proc, in 10 ms ticks.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The engine's process, for its CPU time.
pub fn dockerd_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "dockerd").then_some(pid)
        })
}

/// This process's and the engine's CPU time so far.
fn cpu_now(engine: Option<u32>) -> (Duration, Duration) {
    (
        cpu_of(std::process::id()),
        engine.map(cpu_of).unwrap_or_default(),
    )
}

impl SamplingCost {
    /// How many times a stats sample costs a cgroup sample.
    pub fn ratio(&self) -> f64 {
        self.stats.as_secs_f64() / self.cgroup.as_secs_f64().max(1e-12)
    }
}

/// Times one round of sampling `ids` through the cgroups and one through
/// the engine's stats, `concurrency` at a time, on `engine` (which must be
/// on this host for the cgroup path). Panics when the cgroup path is not
/// available here: the figure would be the fallback's.
pub async fn per_container_costs(
    engine: &Engine,
    ids: &[String],
    concurrency: usize,
) -> SamplingCost {
    let concurrency = concurrency.max(1);
    let docker = engine.client().await.expect("the engine");
    // The cgroup path at the same concurrency: `concurrency` readers, each
    // its share of the containers, read at once (each round of one reader
    // is one blocking task).
    let chunk = ids.len().div_ceil(concurrency).max(1);
    let readers: Vec<(ContainerReader, Vec<String>)> = ids
        .chunks(chunk)
        .map(|part| {
            (
                ContainerReader::new(engine.clone(), concurrency, Default::default()),
                part.to_vec(),
            )
        })
        .collect();
    let cgroup_round = || async {
        let rounds = readers.iter().map(|(reader, part)| {
            let docker = docker.clone();
            async move { reader.read(&docker, part.clone()).await.expect("a round") }
        });
        let read = futures::future::join_all(rounds).await;
        read.iter()
            .flat_map(|r| r.values())
            .filter(|s| s.source == Source::Cgroup)
            .count()
    };
    // The first round chooses the path and finds every cgroup.
    cgroup_round().await;
    assert!(
        readers.iter().all(|(reader, _)| reader.uses_cgroups()),
        "the cgroup path is not available on this host"
    );
    let rounds = 5u32;
    let dockerd = dockerd_pid();
    let per = |total: Duration, n: u32| total / n.max(1) / ids.len().max(1) as u32;
    let cpu_before = cpu_now(dockerd);
    let started = Instant::now();
    let mut cgroup_sampled = usize::MAX;
    for _ in 0..rounds {
        cgroup_sampled = cgroup_sampled.min(cgroup_round().await);
    }
    let cgroup = per(started.elapsed(), rounds);
    let cpu_after = cpu_now(dockerd);
    let (cgroup_cpu, cgroup_engine_cpu) = (
        per(cpu_after.0.saturating_sub(cpu_before.0), rounds),
        per(cpu_after.1.saturating_sub(cpu_before.1), rounds),
    );

    let stats_reader = ContainerReader::stats_only(engine.clone(), concurrency);
    let cpu_before = cpu_now(dockerd);
    let started = Instant::now();
    let stats_sampled = stats_reader
        .read(&docker, ids.to_vec())
        .await
        .expect("a stats round")
        .len();
    let stats = per(started.elapsed(), 1);
    let cpu_after = cpu_now(dockerd);
    SamplingCost {
        cgroup_cpu,
        cgroup_engine_cpu,
        stats_cpu: per(cpu_after.0.saturating_sub(cpu_before.0), 1),
        stats_engine_cpu: per(cpu_after.1.saturating_sub(cpu_before.1), 1),
        containers: ids.len(),
        concurrency,
        cgroup,
        stats,
        cgroup_sampled,
        stats_sampled,
        rounds,
    }
}
