//! ApplyWorkload over mutual TLS against the real agent binary, with 64
//! concurrent clients, beside a HealthCheck (same TLS and gRPC path, no store
//! write) in the same run.
//!
//! Each client applies new revisions of its 50 workloads in turn (3,200 on
//! the node, each apply a spec change written durably), so the store is in
//! its steady state: the log is compacted as it goes over 100,000 entries.
//! The clients connect (TLS handshakes) before the clock starts; each round
//! runs a warm-up second that is not counted, and starts once the agent is
//! idle. The Docker controller runs, pointed at an engine that is not there:
//! it reconciles each workload once, reports it `Unknown`, and then holds
//! it until the engine answers, so each later apply costs it an informer
//! update and a queue visit (all counted in the agent CPU per call). Three
//! rounds per RPC, and the median round by p99: the machine is a shared VM
//! whose speed drifts from minute to minute.
//!
//! Each round also reports the benchmark's own CPU per call (the clients,
//! on the same cores as the agent) and how busy the machine was; open-loop
//! rounds the p99 of how late the benchmark itself sent its calls.
//!
//! Two layouts of the same 64 clients, in the same run: one connection
//! each (64 TLS sessions), and all multiplexed over one connection, as a
//! gRPC client normally keeps one channel per target.
//!
//! Those clients each keep one call in flight (closed loop), so the agent is
//! saturated and latency is what 64 queued calls cost. The open-loop part
//! then offers fixed rates (1,000, 5,000 and 10,000 applies/s) over the same
//! 64 connections, each call due at a set time whether or not earlier calls
//! have returned, and counts its latency from when it was due: what a
//! scheduler sending at that rate would see, stalls included. The agent's
//! peak resident memory closes the run.
//!
//! Before the agent starts, the machine is measured alone: one thread per
//! core doing fixed work in cache reports how much of the time every core
//! at once runs at under half (and under a fifth of) its usual pace. Each
//! closed-loop round reports the same for the agent: the share of its 10 ms
//! windows that completed under half the calls of its median window. The
//! closed-loop tail is made of those windows, and the machine has as many
//! of them with nothing running on it.
//!
//! Run: `cargo bench --bench grpc`. For comparing agent builds,
//! `PERSYS_BENCH_APPLY_ONLY=1` runs only ApplyWorkload over 64 connections
//! (and the open-loop part), `PERSYS_BENCH_ROUNDS=N` sets the rounds
//! (default 3), `PERSYS_BENCH_RATES=1000,5000` the offered rates and
//! `PERSYS_BENCH_PROBE_SECS` how long the machine is measured alone
//! (default 20; 0 skips it).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use support::{cpu_ticks, open_loop, percentile, request};
use tonic::transport::Channel;

const CLIENTS: usize = 64;
const WARM_UP: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(5);
const DEFAULT_ROUNDS: usize = 3;
/// Offered rates of the open-loop part, applies/s.
const DEFAULT_RATES: [f64; 3] = [1_000.0, 5_000.0, 10_000.0];
/// 64 × 50 = 3,200 workloads: a very large node.
const WORKLOADS_PER_CLIENT: usize = 50;

type Client = AgentServiceClient<Channel>;

/// The clients share the agent's 2 cores, so every microsecond they spend is
/// taken from the agent. With the system allocator, malloc and free took
/// about 12 % of their CPU (59–68 µs per apply); with mimalloc, as the agent
/// uses, 52–57 µs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, PartialEq)]
enum Rpc {
    Apply,
    Health,
}

/// Every client calls `rpc` back to back for `window`; returns the calls/s
/// and each call's latency (sorted), and hands the clients back.
async fn run(
    clients: Vec<Client>,
    rpc: Rpc,
    round: &str,
    window: Duration,
) -> (f64, Vec<Duration>, f64, Vec<Client>) {
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let round = round.to_string();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut done = Vec::new();
                let mut i = 0;
                while started.elapsed() < window {
                    let t = Instant::now();
                    match rpc {
                        Rpc::Apply => {
                            let response = client
                                .apply_workload(request(
                                    format!("c{c}-{}", i % WORKLOADS_PER_CLIENT),
                                    format!("{round}-{i}"),
                                ))
                                .await
                                .unwrap();
                            assert!(response.get_ref().applied);
                        }
                        Rpc::Health => {
                            client.health_check(HealthCheckRequest {}).await.unwrap();
                        }
                    }
                    latencies.push(t.elapsed());
                    done.push(started.elapsed());
                    i += 1;
                }
                (latencies, done, client)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut done = Vec::new();
    let mut clients = Vec::new();
    for task in tasks {
        let (latencies, finished, client) = task.await.unwrap();
        all.extend(latencies);
        done.extend(finished);
        clients.push(client);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    let paces = window_paces(done.into_iter(), window);
    let slow = paces.iter().filter(|&&pace| pace < 0.5).count() as f64 / paces.len().max(1) as f64;
    (rate, all, slow, clients)
}

/// Open loop: the clients together are offered `rate` applies a second for
/// `window`, each call due at a fixed time and sent on the next client in
/// turn without waiting for that client's earlier calls (they multiplex over
/// its connection). A pacing thread sleeps until each call is due (thread
/// sleeps wake within tens of microseconds; the runtime's timer has 1 ms
/// ticks) and hands it to the runtime. Each call's latency counts from when
/// it was due, not from when it was sent, so a stall counts against every
/// call it held back (no coordinated omission). Returns the completed
/// calls/s, the latencies (sorted) and each call's send lag (sorted): how
/// late its task began, which is the benchmark's own delay (the pacing
/// thread or the client runtime waiting for a CPU), not the agent's.
async fn run_at_rate(
    clients: &[Client],
    rate: f64,
    round: &str,
    window: Duration,
) -> (f64, Vec<Duration>, Vec<Duration>) {
    let clients = clients.to_vec();
    let round = round.to_string();
    let started = Instant::now();
    let calls = open_loop(rate, window, move |n, due| {
        let c = n % clients.len();
        let id = format!("c{c}-{}", (n / clients.len()) % WORKLOADS_PER_CLIENT);
        let revision = format!("{round}-{n}");
        let mut client = clients[c].clone();
        async move {
            let lag = due.elapsed();
            let response = client.apply_workload(request(id, revision)).await.unwrap();
            assert!(response.get_ref().applied);
            (due.elapsed(), lag)
        }
    })
    .await;
    let rate = calls.len() as f64 / started.elapsed().as_secs_f64();
    let (mut latencies, mut lags): (Vec<Duration>, Vec<Duration>) = calls.into_iter().unzip();
    latencies.sort();
    lags.sort();
    (rate, latencies, lags)
}

/// Windows in which the pace of the machine or of the agent is measured.
const PACE_WINDOW: Duration = Duration::from_millis(10);

/// The pace of each 10 ms window of `span`, against the median window's:
/// the number of events (completed units of work, completed calls) that
/// fell in it, at `offsets` from the start, over the median window's number.
fn window_paces(offsets: impl Iterator<Item = Duration>, span: Duration) -> Vec<f64> {
    let windows = (span.as_nanos() / PACE_WINDOW.as_nanos()) as usize;
    let mut counts = vec![0_u32; windows];
    for offset in offsets {
        if let Some(count) = counts.get_mut((offset.as_nanos() / PACE_WINDOW.as_nanos()) as usize) {
            *count += 1;
        }
    }
    let mut sorted = counts.clone();
    sorted.sort();
    let median = f64::from(sorted.get(windows / 2).copied().unwrap_or(0).max(1));
    counts
        .into_iter()
        .map(|count| f64::from(count) / median)
        .collect()
}

/// How steady the machine's cores are with nothing else running: one thread
/// per core hashes a 16 KiB buffer (in cache, no system calls) over and
/// over for `duration`, and each 10 ms window of each thread is compared
/// with the thread's median window. Windows in which even the fastest
/// thread did under half its usual work are the whole machine slowing
/// down; adjacent ones make one episode.
fn steadiness(duration: Duration) -> Steadiness {
    use sha2::Digest;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let paces: Vec<Vec<f64>> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let buffer = vec![0x5a_u8; 16 * 1024];
                let mut done = Vec::with_capacity(1 << 20);
                while started.elapsed() < duration {
                    std::hint::black_box(sha2::Sha256::digest(&buffer));
                    done.push(started.elapsed());
                }
                window_paces(done.into_iter(), duration)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect();
    let fastest: Vec<f64> = (0..paces[0].len())
        .map(|w| paces.iter().map(|pace| pace[w]).fold(0.0, f64::max))
        .collect();
    let share = |under: f64| {
        fastest.iter().filter(|&&pace| pace < under).count() as f64 / fastest.len().max(1) as f64
    };
    let mut episodes: Vec<usize> = Vec::new();
    let mut run = 0;
    for pace in fastest.iter().chain([1.0].iter()) {
        if *pace < 0.5 {
            run += 1;
        } else if run > 0 {
            episodes.push(run);
            run = 0;
        }
    }
    episodes.sort();
    let ms = |n: usize| n as f64 * PACE_WINDOW.as_secs_f64() * 1e3;
    Steadiness {
        under_half: share(0.5),
        under_fifth: share(0.2),
        episodes_per_s: episodes.len() as f64 / duration.as_secs_f64(),
        median_ms: episodes.get(episodes.len() / 2).map_or(0.0, |&n| ms(n)),
        longest_ms: episodes.last().map_or(0.0, |&n| ms(n)),
    }
}

struct Steadiness {
    /// Share of the time every core ran at under half its usual pace.
    under_half: f64,
    /// … at under a fifth.
    under_fifth: f64,
    /// Episodes of every core under half pace, per second.
    episodes_per_s: f64,
    median_ms: f64,
    longest_ms: f64,
}

/// The process's peak resident set, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the agent has finished the work the last round left it (it
/// uses under 5 % of a core over a quarter second), for at most two minutes.
async fn wait_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let before = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_millis(250)).await;
        // 100 ticks a second: under 5 % of a core is at most 1 tick in 250 ms.
        if cpu_ticks(pid) - before <= 1 {
            return;
        }
    }
    println!("(the agent was still busy after two minutes)");
}

/// Time the machine's CPUs have been idle (or waiting for I/O), in clock
/// ticks. Idle time is measured exactly; busy time in `/proc/stat` is
/// sampled at each tick and misses short bursts between them.
fn idle_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait …
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0)
}

/// CPU counters at the start of a round, to measure it by.
struct Meter {
    agent: u32,
    agent_ticks: u64,
    own_ticks: u64,
    idle_ticks: u64,
    started: Instant,
}

impl Meter {
    fn start(agent: u32) -> Meter {
        Meter {
            agent,
            agent_ticks: cpu_ticks(agent),
            own_ticks: cpu_ticks(std::process::id()),
            idle_ticks: idle_ticks(),
            started: Instant::now(),
        }
    }

    /// The round's figures: `rate` calls/s with these latencies (sorted),
    /// and what only its kind of loop measures.
    fn finish(self, rate: f64, latencies: &[Duration], kind: Loop) -> Figures {
        let calls = latencies.len().max(1) as f64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let idle = (idle_ticks() - self.idle_ticks) as f64 / 100.0;
        // 100 clock ticks a second.
        let per_call = |ticks: u64| ticks as f64 * 10_000.0 / calls;
        Figures {
            rate,
            p50: percentile(latencies, 0.5),
            p99: percentile(latencies, 0.99),
            cpu_per_call_us: per_call(cpu_ticks(self.agent) - self.agent_ticks),
            client_cpu_per_call_us: per_call(cpu_ticks(std::process::id()) - self.own_ticks),
            machine_busy: 1.0 - idle / (self.started.elapsed().as_secs_f64() * cpus),
            send_lag_p99: match kind {
                Loop::Open { lags } => Some(percentile(lags, 0.99)),
                Loop::Closed { .. } => None,
            },
            under_half_pace: match kind {
                Loop::Closed { under_half_pace } => Some(under_half_pace),
                Loop::Open { .. } => None,
            },
        }
    }
}

/// What only one kind of round measures.
enum Loop<'a> {
    /// Share of the round's 10 ms windows under half the median window's calls.
    Closed { under_half_pace: f64 },
    /// How late each call was sent (sorted).
    Open { lags: &'a [Duration] },
}

struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
    cpu_per_call_us: f64,
    /// The benchmark's own CPU (the clients) per call.
    client_cpu_per_call_us: f64,
    /// Share of the machine's CPU time (both cores) in use.
    machine_busy: f64,
    /// Open loop only: p99 of how late calls were sent.
    send_lag_p99: Option<f64>,
    /// Closed loop only: share of the round's 10 ms windows that completed
    /// under half the calls of the median window.
    under_half_pace: Option<f64>,
}

impl Figures {
    fn cells(&self) -> String {
        format!(
            "{:.2} ms | {:.2} ms | {:.0} µs | {:.0} µs | {:.0} % |",
            self.p50,
            self.p99,
            self.cpu_per_call_us,
            self.client_cpu_per_call_us,
            self.machine_busy * 100.0
        )
    }

    fn open_row(&self, offered: f64, round: &str) {
        println!(
            "| {offered:.0} | {round} | {:.0} | {} {:.2} ms |",
            self.rate,
            self.cells(),
            self.send_lag_p99.unwrap_or_default()
        );
    }

    fn row(&self, name: &str, connections: &str, round: &str) {
        println!(
            "| {name} | {connections} | {round} | {:.0} | {} {:.1} % |",
            self.rate,
            self.cells(),
            self.under_half_pace.unwrap_or_default() * 100.0
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let apply_only = std::env::var_os("PERSYS_BENCH_APPLY_ONLY").is_some();
    let rounds: usize = match std::env::var("PERSYS_BENCH_ROUNDS") {
        Ok(n) => n.parse().expect("PERSYS_BENCH_ROUNDS: a number of rounds"),
        Err(_) => DEFAULT_ROUNDS,
    };
    let rates: Vec<f64> = match std::env::var("PERSYS_BENCH_RATES") {
        Ok(list) => list
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .expect("PERSYS_BENCH_RATES: applies/s, comma-separated")
            })
            .collect(),
        Err(_) => DEFAULT_RATES.to_vec(),
    };
    let probe = Duration::from_secs(match std::env::var("PERSYS_BENCH_PROBE_SECS") {
        Ok(n) => n.parse().expect("PERSYS_BENCH_PROBE_SECS: seconds"),
        Err(_) => 20,
    });
    // PERSYS_BENCH_PROBE_SECS=0 skips it (when comparing agent builds).
    if !probe.is_zero() {
        println!(
            "## The machine alone: one thread per core hashing in cache for {} s, in 10 ms windows",
            probe.as_secs()
        );
        let machine = steadiness(probe);
        println!(
            "| every core under half speed | every core under a fifth | episodes under half speed | episode length (median / longest) |"
        );
        println!("|---:|---:|---:|---:|");
        println!(
            "| {:.1} % of the time | {:.1} % of the time | {:.1} per s | {:.0} / {:.0} ms |\n",
            machine.under_half * 100.0,
            machine.under_fifth * 100.0,
            machine.episodes_per_s,
            machine.median_ms,
            machine.longest_ms
        );
    }
    runtime.block_on(async {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch/grpc");
        let _ = std::fs::remove_dir_all(&dir);
        let certs = Arc::new(Certs::generate(&dir.join("certs")));
        let agent = AgentProcess::start(
            &dir.join("state"),
            &certs,
            &[
                ("PERSYS_DOCKER_ENABLED", "true"),
                ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
                ("PERSYS_LOG_LEVEL", "warn"),
                // Clients × workloads each, beyond the default ceiling.
                ("PERSYS_POLICY_MAX_WORKLOADS", "100000"),
            ],
        )
        .await;
        let pid = agent.child.id();
        let mut sessions = Vec::new();
        for _ in 0..CLIENTS {
            sessions.push(client(agent.port, &certs).await.unwrap());
        }
        let shared = client(agent.port, &certs).await.unwrap();
        let open_loop = sessions.clone();
        println!(
            "## ApplyWorkload over mutual TLS: {CLIENTS} concurrent clients, {rounds} rounds of {} s, each after {} s of warm-up",
            WINDOW.as_secs(),
            WARM_UP.as_secs()
        );
        println!(
            "| RPC | connections | round | calls/s | p50 | p99 | agent CPU per call | client CPU per call | machine busy | time under half pace |"
        );
        println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for (tag, (layout, clients)) in [
            (format!("{CLIENTS} (one per client)"), sessions),
            ("1 (shared)".to_string(), vec![shared; CLIENTS]),
        ]
        .into_iter()
        .take(if apply_only { 1 } else { 2 })
        .enumerate()
        {
            let mut clients = clients;
            for (rpc, name) in [
                (Rpc::Apply, "ApplyWorkload (validated, fsynced, group-committed)"),
                (Rpc::Health, "HealthCheck (same TLS + gRPC path, no write)"),
            ]
            .into_iter()
            .take(if apply_only { 1 } else { 2 })
            {
                let mut results = Vec::new();
                for round in 0..rounds {
                    // Each round starts with the agent done with the last
                    // one's work (the store flushing, the controller catching up).
                    let settled = Instant::now();
                    wait_idle(pid).await;
                    let settled = settled.elapsed();
                    let (_, _, _, warm) =
                        run(clients, rpc, &format!("l{tag}w{round}"), WARM_UP).await;
                    let meter = Meter::start(pid);
                    let (rate, latencies, under_half_pace, done) =
                        run(warm, rpc, &format!("l{tag}r{round}"), WINDOW).await;
                    let figures = meter.finish(rate, &latencies, Loop::Closed { under_half_pace });
                    clients = done;
                    let round = format!("{} (settled in {:.1} s)", round + 1, settled.as_secs_f64());
                    figures.row(name, &layout, &round);
                    results.push(figures);
                }
                results.sort_by(|a, b| a.p99.total_cmp(&b.p99));
                results[results.len() / 2].row(name, &layout, "**median by p99**");
            }
        }
        println!(
            "\n## ApplyWorkload at fixed offered rates (open loop): the same {CLIENTS} connections, {rounds} rounds of {} s per rate, each after {} s of warm-up",
            WINDOW.as_secs(),
            WARM_UP.as_secs()
        );
        println!(
            "| offered/s | round | completed/s | p50 | p99 | agent CPU per call | client CPU per call | machine busy | send lag p99 |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for offered in &rates {
            let mut results = Vec::new();
            for round in 0..rounds {
                let settled = Instant::now();
                wait_idle(pid).await;
                let settled = settled.elapsed();
                run_at_rate(&open_loop, *offered, &format!("o{offered}w{round}"), WARM_UP).await;
                let meter = Meter::start(pid);
                let (rate, latencies, lags) =
                    run_at_rate(&open_loop, *offered, &format!("o{offered}r{round}"), WINDOW).await;
                let figures = meter.finish(rate, &latencies, Loop::Open { lags: &lags });
                let round = format!("{} (settled in {:.1} s)", round + 1, settled.as_secs_f64());
                figures.open_row(*offered, &round);
                results.push(figures);
            }
            results.sort_by(|a, b| a.p99.total_cmp(&b.p99));
            results[results.len() / 2].open_row(*offered, "**median by p99**");
        }
        println!(
            "\nAgent peak resident memory (VmHWM): {:.1} MiB",
            peak_rss_kib(pid) as f64 / 1024.0
        );
        println!("\n(agent and clients share this machine's cores)");
    });
}
