//! A thousand containers on one node, side by side with the hand-made
//! alternative in the same run: the release agent binary as a child
//! process driven over gRPC, the real dockerd, and `docker` CLI loops
//! (`xargs -P N docker run -d …`) at the agent's concurrency and at the
//! best N found.
//!
//! Rows: 1 converge, 2 idle (CPU, RSS, Docker API calls per resync, the
//! oldest usage sample), 3 sampling cost (see [`sampling_cost`]), 4 mass
//! drift, 5 restart (SIGKILL), 6 delete; then memory (bytes per workload
//! in the informer cache, agent RSS) and the heartbeat (size, build time).
//!
//! Run: `cargo bench --bench scale -- --count 1000` (needs dockerd and the
//! test image; each container costs a shim process, about 13 MiB: check
//! `free -g`). Flags: `--count N` (1000), `--idle-seconds S` (120),
//! `--ns 4,8,16` (the CLI concurrencies tried), `--reconciles N` (the
//! agent's `PERSYS_MAX_CONCURRENT_RECONCILES`; default: the agent's own),
//! `--drift N` (100). Engine calls are counted by a proxy on a unix socket
//! between the agent and dockerd. Containers carry a per-run name prefix
//! and agent scope, and are removed at the end, on a failure and on Ctrl-C.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/engine.rs"]
mod engine;
#[path = "support/sampling.rs"]
mod sampling;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{AgentProcess, plaintext_client};
use engine::{Calls, cpu_seconds, forward, rss_mib};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use prost::Message;
use tokio::net::UnixListener;
use tonic::transport::Channel;

/// Counts the bytes this process holds, for the informer-cache figure.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn free_gib() -> String {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    format!(
        "{:.1} GiB available of {:.1}",
        kib("MemAvailable:") / 1048576.0,
        kib("MemTotal:") / 1048576.0
    )
}

struct Options {
    count: usize,
    idle: Duration,
    ns: Vec<usize>,
    reconciles: Option<usize>,
    drift: usize,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number = |flag: &str| value(flag).and_then(|v| v.parse::<usize>().ok());
    let count = number("--count").unwrap_or(1000);
    Options {
        count,
        idle: Duration::from_secs(number("--idle-seconds").unwrap_or(120) as u64),
        ns: value("--ns")
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_else(|| vec![4, 8, 16]),
        reconciles: number("--reconciles"),
        drift: number("--drift").unwrap_or(100).min(count),
    }
}

/// Runs `script` with `sh -c`, its output discarded; panics on failure.
fn sh(script: &str) {
    let status = Command::new("sh")
        .args(["-c", script])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "failed: {script}");
}

/// Every container the run made: those of the agent's scope and those of
/// the baseline's name prefix. Called at the end, on a panic and on Ctrl-C.
fn remove_everything(scope: &str, prefix: &str, parallel: usize) {
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{{ docker ps -aq --filter label=persys.scope={scope}; docker ps -aq --filter name=^/{prefix}; }} | sort -u | xargs -r -P {parallel} -n 20 docker rm -f"
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("docker")
        .args(["network", "rm", &drift_network(prefix)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The bridge network of the drift baseline's containers. A Linux bridge
/// holds at most 1,024 ports: with the agent's containers on `docker0`,
/// the baseline's get a bridge of their own.
fn drift_network(prefix: &str) -> String {
    format!("{prefix}drift")
}

struct Cleanup {
    scope: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        eprintln!("removing the run's containers…");
        remove_everything(&self.scope, &self.prefix, 8);
    }
}

/// The baseline's `docker run -d` of containers `range` at concurrency `n`
/// (on the default bridge unless `network` names another).
fn cli_run(
    prefix: &str,
    image: &str,
    range: std::ops::Range<usize>,
    n: usize,
    network: Option<&str>,
) -> Duration {
    let network = network.map_or(String::new(), |n| format!("--network {n} "));
    let started = Instant::now();
    sh(&format!(
        "seq {} {} | xargs -P {n} -I@ docker run -d {network}--name {prefix}@ {image} sh -c \"{PROGRAM}\"",
        range.start,
        range.end - 1
    ));
    started.elapsed()
}

/// `docker <verb>` of the named containers, `n` at a time (one CLI call
/// per container, as the agent makes one engine call per workload).
fn cli_each(verb: &str, names: &[String], n: usize) -> Duration {
    let list = names.join("\n");
    let started = Instant::now();
    let mut child = Command::new("sh")
        .args(["-c", &format!("xargs -P {n} -I@ docker {verb} @")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all_sync(list.as_bytes());
    assert!(child.wait().unwrap().success(), "docker {verb} failed");
    started.elapsed()
}

trait WriteAllSync {
    fn write_all_sync(self, bytes: &[u8]);
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, bytes: &[u8]) {
        use std::io::Write;
        self.write_all(bytes).unwrap();
    }
}

/// What every container runs, the agent's and the CLI's alike: a shell
/// that exits on SIGTERM (busybox `sleep` as PID 1 ignores it, so every
/// graceful stop would wait out its grace period and a delete would be
/// measured against `docker rm -f`'s SIGKILL).
const PROGRAM: &str = "trap 'exit 0' TERM; sleep 86400 & wait";

fn container(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.to_string(),
        command: vec!["sh".into(), "-c".into(), PROGRAM.into()],
        stop_grace_period_seconds: 10,
        ..Default::default()
    }
}

fn apply(id: &str, image: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.to_string(),
        r#type: WorkloadType::Container as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(container(image))),
        }),
    }
}

async fn statuses(api: &mut AgentServiceClient<Channel>) -> Vec<WorkloadStatus> {
    api.list_workloads(ListWorkloadsRequest::default())
        .await
        .map(|r| r.into_inner().workloads)
        .unwrap_or_default()
}

/// Polls until `done(statuses)`; panics after `limit`.
async fn until(
    api: &mut AgentServiceClient<Channel>,
    what: &str,
    limit: Duration,
    done: impl Fn(&[WorkloadStatus]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let all = statuses(api).await;
        if done(&all) {
            return started.elapsed();
        }
        let running = all
            .iter()
            .filter(|s| s.actual_state() == ActualState::Running)
            .count();
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?} ({running} of {} running)",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Running containers of the engine among `names` (by name).
async fn engine_running(docker: &bollard::Docker, scope: &str) -> HashMap<String, String> {
    let filters = HashMap::from([
        ("label".to_string(), vec![format!("persys.scope={scope}")]),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: false,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            let name = c.names?.first()?.trim_start_matches('/').to_string();
            Some((name, c.id?))
        })
        .collect()
}

fn metric(agent: &AgentProcess, series: &str) -> f64 {
    let (_, text) = common::http_get(agent.metrics_port, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Row 3, the cost of one usage sample per container: the agent's reader
/// through cgroup files against the engine's stats endpoint, side by side
/// (`benches/support/sampling.rs`).
async fn sampling_cost(ids: &[String], concurrency: usize) -> String {
    let engine = persys_controllers::docker::Engine::new(None);
    let cost = sampling::per_container_costs(&engine, ids, concurrency).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "cgroup {:.0} µs wall, {:.0} µs CPU | docker stats {:.0} µs wall, {:.0} µs agent + {:.0} µs dockerd CPU | {:.0}× ({} containers, {} at a time; sampled {} / {})",
        us(cost.cgroup),
        us(cost.cgroup_cpu),
        us(cost.stats),
        us(cost.stats_cpu),
        us(cost.stats_engine_cpu),
        cost.ratio(),
        cost.containers,
        cost.concurrency,
        cost.cgroup_sampled,
        cost.stats_sampled,
    )
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

fn main() {
    let options = options();
    let count = options.count;
    let image =
        std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into());
    let run_id = std::process::id();
    let scope = format!("scale-bench-{run_id}");
    let prefix = format!("scb{run_id}-");
    let cleanup = Cleanup {
        scope: scope.clone(),
        prefix: prefix.clone(),
    };
    {
        let (scope, prefix) = (scope.clone(), prefix.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("interrupted: removing the run's containers…");
                    remove_everything(&scope, &prefix, 8);
                    std::process::exit(130);
                }
            });
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(&options, &image, &scope, &prefix));
    drop(cleanup);
    let _ = count;
}

async fn run(options: &Options, image: &str, scope: &str, prefix: &str) {
    let count = options.count;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch/scale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let docker = bollard::Docker::connect_with_unix_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    println!("# Scale: {count} containers");
    println!(
        "machine: {} cores, {}; load {} at the start",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        free_gib(),
        loadavg()
    );

    // Row 1 baseline: `docker run -d` at each N; the delete baseline is
    // measured on the set made at the agent's concurrency.
    let agent_n = options
        .reconciles
        .unwrap_or(persys_controllers::DEFAULT_CONCURRENCY);
    let mut ns = options.ns.clone();
    if !ns.contains(&agent_n) {
        ns.insert(0, agent_n);
    }
    let baseline_names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let mut cli_converge = BTreeMap::new();
    let mut cli_delete = Duration::ZERO;
    for &n in &ns {
        let took = cli_run(prefix, image, 0..count, n, None);
        eprintln!(
            "cli: docker run -d × {count} at -P {n}: {:.1} s (load {})",
            took.as_secs_f64(),
            loadavg()
        );
        cli_converge.insert(n, took);
        let removed = cli_each("rm -f", &baseline_names, n);
        if n == agent_n {
            cli_delete = removed;
        }
    }
    let (best_n, best) = cli_converge
        .iter()
        .min_by_key(|(_, d)| **d)
        .map(|(n, d)| (*n, *d))
        .unwrap();

    // The agent, through the counting proxy.
    let socket = dir.join("docker.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let calls: Calls = Arc::default();
    tokio::spawn({
        let calls = calls.clone();
        async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(forward(stream, calls.clone()));
            }
        }
    });
    let docker_host = format!("unix://{}", socket.display());
    let reconciles = agent_n.to_string();
    let resync = Duration::from_secs(30);
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", docker_host.as_str()),
        ("PERSYS_DOCKER_SCOPE", scope),
        ("PERSYS_RECONCILE_INTERVAL", "30s"),
        ("PERSYS_MAX_CONCURRENT_RECONCILES", reconciles.as_str()),
        ("PERSYS_POLICY_MAX_WORKLOADS", "5000"),
        ("PERSYS_LOG_LEVEL", "warn"),
    ];
    let state = dir.join("state");
    let mut agent = AgentProcess::start_plaintext(&state, &env).await;
    let mut api = plaintext_client(agent.port).await.unwrap();
    let rss_empty = rss_mib(agent.child.id());
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}a{i}")).collect();

    // Row 1: apply everything, then wait until all run.
    let started = Instant::now();
    for id in &ids {
        api.apply_workload(apply(id, image)).await.unwrap();
    }
    let applied = started.elapsed();
    until(&mut api, "converge", Duration::from_secs(3600), |all| {
        all.len() == count && all.iter().all(|s| s.actual_state() == ActualState::Running)
    })
    .await;
    let agent_converge = started.elapsed();
    eprintln!(
        "agent: {count} converged in {:.1} s (applies took {:.1} s)",
        agent_converge.as_secs_f64(),
        applied.as_secs_f64()
    );

    // Row 2: idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = agent.child.id();
    calls.lock().unwrap().clear();
    let cpu_before = cpu_seconds(pid);
    let idle_started = Instant::now();
    let idle_load = loadavg();
    let mut peak_rss: f64 = 0.0;
    while idle_started.elapsed() < options.idle {
        peak_rss = peak_rss.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let window = idle_started.elapsed().as_secs_f64();
    let idle_cpu = (cpu_seconds(pid) - cpu_before) / window * 100.0;
    let idle_calls = calls.lock().unwrap().clone();
    let resyncs = (window / resync.as_secs_f64()).floor().max(1.0);
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let all = statuses(&mut api).await;
    let ages: Vec<i64> = all
        .iter()
        .map(|s| {
            s.usage
                .as_ref()
                .filter(|u| u.collected_at > 0)
                .map_or(i64::MAX, |u| now_s - u.collected_at)
        })
        .collect();
    let never_sampled = ages.iter().filter(|a| **a == i64::MAX).count();
    let oldest_sample = ages.iter().filter(|a| **a != i64::MAX).max().copied();

    // Memory: the informer cache's objects, rebuilt here from the agent's
    // own (DescribeWorkload), and the agent's RSS.
    let mut objects = Vec::with_capacity(count);
    for id in &ids {
        if let Ok(described) = api
            .describe_workload(DescribeWorkloadRequest { id: id.clone() })
            .await
            && let Some(workload) = described.into_inner().workload
        {
            objects.push(workload.encode_to_vec());
        }
    }
    let before = LIVE.load(Ordering::Relaxed);
    let cache: HashMap<String, Arc<Workload>> = objects
        .iter()
        .filter_map(|bytes| Workload::decode(bytes.as_slice()).ok())
        .map(|w| (w.id().to_string(), Arc::new(w)))
        .collect();
    let cache_bytes = (LIVE.load(Ordering::Relaxed) - before) as f64 / cache.len().max(1) as f64;

    // The heartbeat of those workloads, as the scheduler link builds it.
    let config = persys_agent::config::Config::try_parse_from_iter(["persys-agent"]).unwrap();
    let reporter = persys_agent::scheduler::NodeReporter::new(
        &config,
        persys_controllers::Cache::default(),
        persys_agent::node::NodeSampler::default(),
        persys_agent::runtimes::RuntimeBoard::default(),
        None,
    );
    let mut listed: Vec<Arc<Workload>> = cache.values().cloned().collect();
    listed.sort_by(|a, b| a.id().cmp(b.id()));
    let built = Instant::now();
    let heartbeat = reporter.heartbeat_of(&listed);
    let heartbeat_took = built.elapsed();
    let heartbeat_bytes = heartbeat.encoded_len();
    drop(cache);

    // Row 3: one usage sample per container through the cgroups against
    // Docker stats, over every running container, at the agent's
    // concurrency.
    let running = engine_running(&docker, scope).await;
    let container_ids: Vec<String> = running.values().cloned().collect();
    let sampling = sampling_cost(&container_ids, agent_n).await;

    // Row 4: mass drift, the agent's.
    let drifted: Vec<String> = ids.iter().take(options.drift).cloned().collect();
    calls.lock().unwrap().clear();
    let started = Instant::now();
    sh(&format!("docker kill {} ", drifted.join(" ")));
    let agent_kill = started.elapsed();
    let limit = Duration::from_secs(600);
    loop {
        let running = engine_running(&docker, scope).await;
        if drifted.iter().all(|id| running.contains_key(id)) {
            break;
        }
        assert!(started.elapsed() < limit, "drift: not running again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent_drift = started.elapsed();
    until(&mut api, "drift status", limit, |all| {
        all.iter().all(|s| s.actual_state() == ActualState::Running)
    })
    .await;
    let agent_drift_status = started.elapsed();
    let drift_calls = calls.lock().unwrap().clone();

    // Row 4 baseline: the same number of containers, killed together, then
    // `docker start` at the agent's concurrency; timed, as the agent's
    // repair is, from the start of the kill.
    let drift_names: Vec<String> = baseline_names.iter().take(options.drift).cloned().collect();
    let network = drift_network(prefix);
    sh(&format!("docker network create {network} >/dev/null"));
    cli_run(prefix, image, 0..options.drift, agent_n, Some(&network));
    let cli_started = Instant::now();
    sh(&format!("docker kill {}", drift_names.join(" ")));
    let cli_kill = cli_started.elapsed();
    cli_each("start", &drift_names, agent_n);
    let cli_drift = cli_started.elapsed();
    cli_each("rm -f", &drift_names, agent_n);

    // Row 5: SIGKILL, restart, serving, every status fresh.
    let before_ids: HashMap<String, String> = engine_running(&docker, scope).await;
    let rss_at_count = rss_mib(agent.child.id());
    agent.signal("KILL").await;
    drop(api);
    drop(agent);
    calls.lock().unwrap().clear();
    let restarted = Instant::now();
    let agent = AgentProcess::start_plaintext(&state, &env).await;
    let serving = restarted.elapsed();
    let mut api = plaintext_client(agent.port).await.unwrap();
    // Fresh: every workload reconciled by the new process (its status
    // checked against the engine).
    loop {
        let reconciled = metric(
            &agent,
            "persys_agent_reconciles_total{controller=\"docker\",result=\"success\"}",
        );
        if reconciled >= count as f64 {
            break;
        }
        assert!(
            restarted.elapsed() < limit,
            "restart: only {reconciled} reconciled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = restarted.elapsed();
    let restart_calls = calls.lock().unwrap().clone();
    let after_ids = engine_running(&docker, scope).await;
    let restarted_containers = before_ids
        .iter()
        .filter(|(name, id)| after_ids.get(*name) != Some(id))
        .count();
    let all_running = statuses(&mut api)
        .await
        .iter()
        .filter(|s| s.actual_state() == ActualState::Running)
        .count();

    // Row 6: delete everything.
    let started = Instant::now();
    for id in &ids {
        api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
            .await
            .unwrap();
    }
    until(&mut api, "delete", Duration::from_secs(3600), |all| {
        all.is_empty()
    })
    .await;
    let agent_delete = started.elapsed();
    loop {
        let left = engine_running(&docker, scope).await.len();
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < limit * 6, "{left} containers left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agent_delete_engine = started.elapsed();

    println!("\nload at the end: {}; {}\n", loadavg(), free_gib());
    println!(
        "agent: PERSYS_MAX_CONCURRENT_RECONCILES={agent_n}; CLI concurrencies tried: {ns:?}\n"
    );
    println!("| row | agent | hand-made | ratio |");
    println!("|---|---:|---:|---:|");
    let s = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    println!(
        "| 1 converge {count} (apply → all Running) | {} | `xargs -P {agent_n} docker run -d`: {} | {} |",
        s(agent_converge),
        s(cli_converge[&agent_n]),
        ratio(agent_converge, cli_converge[&agent_n])
    );
    println!(
        "| 1 converge, against the best N | | `xargs -P {best_n}`: {} | {} |",
        s(best),
        ratio(agent_converge, best)
    );
    for (n, took) in &cli_converge {
        println!("| 1 … `xargs -P {n}` | | {} | |", s(*took));
    }
    println!(
        "| 2 idle {:.0} s: agent CPU | {idle_cpu:.2} % of a core | | (load {idle_load}) |",
        window
    );
    println!("| 2 idle: agent RSS (peak) | {peak_rss:.1} MiB | | |");
    println!(
        "| 2 idle: oldest usage sample | {} | | {never_sampled} never sampled |",
        oldest_sample.map_or("none".to_string(), |a| format!("{a} s"))
    );
    println!("| 3 sampling cost per container | {sampling} |");
    println!(
        "| 4 drift: kill {} → all running (engine), from the kill's start | {} | `docker kill`, then `docker start` at -P {agent_n}: {} | {} |",
        options.drift,
        s(agent_drift),
        s(cli_drift),
        ratio(agent_drift, cli_drift)
    );
    println!(
        "| 4 … of which the `docker kill` of {} | {} | {} | |",
        options.drift,
        s(agent_kill),
        s(cli_kill)
    );
    println!(
        "| 4 drift: … and reported Running | {} | | |",
        s(agent_drift_status)
    );
    println!("| 5 restart (SIGKILL): serving | {} | | |", s(serving));
    println!(
        "| 5 restart: every workload reconciled | {} | | {restarted_containers} containers restarted, {all_running} reported Running |",
        s(fresh)
    );
    println!(
        "| 6 delete {count} (agent: gone from the API / the engine) | {} / {} | `docker rm -f` at -P {agent_n}: {} | {} |",
        s(agent_delete),
        s(agent_delete_engine),
        s(cli_delete),
        ratio(agent_delete_engine, cli_delete)
    );
    println!(
        "\nMemory: agent RSS {rss_empty:.1} MiB empty, {rss_at_count:.1} MiB at {count} ({:.1} KiB per workload); informer cache {:.0} bytes per workload.",
        (rss_at_count - rss_empty) * 1024.0 / count as f64,
        cache_bytes
    );
    println!(
        "Heartbeat of {count} workloads: {heartbeat_bytes} bytes ({:.1} % of the 4 MiB limit), built in {:.2} ms.",
        heartbeat_bytes as f64 / (4.0 * 1048576.0) * 100.0,
        heartbeat_took.as_secs_f64() * 1e3
    );
    println!("\n| Docker API call during the idle window | count | per resync |");
    println!("|---|---:|---:|");
    for (call, n) in &idle_calls {
        println!("| `{call}` | {n} | {:.1} |", *n as f64 / resyncs);
    }
    println!(
        "\n| Docker API call from the kill of {} to all reported Running | count |",
        options.drift
    );
    println!("|---|---:|");
    for (call, n) in &drift_calls {
        println!("| `{call}` | {n} |");
    }
    println!("\n| Docker API call from restart to every workload reconciled | count |");
    println!("|---|---:|");
    for (call, n) in &restart_calls {
        println!("| `{call}` | {n} |");
    }
    drop(api);
    drop(agent);
}
