//! Overload: the real agent binary over mutual TLS, offered 5,000 applies/s
//! for a minute while 500 Watch streams are open, one of which never reads;
//! beside the same load with no watcher, in the same run, on a fresh agent.
//!
//! The applies come open loop from 64 connections (as in the gRPC bench):
//! each call is due at a set time and sent whether or not earlier calls
//! have returned, and its latency counts from when it was due. They cycle
//! over 1,000 workloads, every call a spec change written durably. The
//! Docker controller runs against an engine that is not there (it reports
//! each workload `Unknown` once), so the log also carries its status writes.
//!
//! The watchers, opened before the load on 11 connections (an HTTP/2
//! connection carries at most 256 streams): 8 watch every change, 491 watch
//! one workload each (`WatchRequest.id`), and one watches every change on a
//! connection of its own and never reads. The agent's default bounds apply
//! (`PERSYS_WATCH_MAX_BACKLOG` 10,000 changes, `PERSYS_WATCH_MAX_UNREAD`
//! 60 s). The run checks, and prints:
//! - the applies completed per second, and their latency, beside the run
//!   without watchers (ratios);
//! - the agent's peak resident memory (VmHWM, from /proc), against 300 MiB;
//! - that the watcher that never reads was expired (when, how, and that
//!   `persys_agent_watch_expired_total` counted it);
//! - that each of the 499 others saw every change it should, in order:
//!   the 8 full watchers every resource version once, with no gap; each
//!   per-workload watcher every acknowledged apply of its workload.
//!
//! Run: `cargo bench --bench overload`. `PERSYS_BENCH_SECS` (default 60),
//! `PERSYS_BENCH_RATE` (5000), `PERSYS_BENCH_WATCHERS` (500) and
//! `PERSYS_BENCH_FULL_WATCHERS` (8) change the load.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client, sample};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use support::{cpu_ticks, open_loop, percentile, request};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type Client = AgentServiceClient<Channel>;

/// The clients share the agent's cores: as in the gRPC bench, mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 64;
const WORKLOADS: usize = 1_000;
const WARM_UP: Duration = Duration::from_secs(5);
const WATCHERS_PER_CONNECTION: usize = 50;
const RSS_LIMIT_MIB: f64 = 300.0;
/// How long the readers get to catch up once the load stops.
const CATCH_UP: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: not a number: {value}")),
        Err(_) => default,
    }
}

fn workload_id(n: usize) -> String {
    format!("w{n}")
}

/// A line of /proc/PID/status in KiB (VmHWM: peak resident; VmRSS: now).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The agent's /metrics text; empty when it does not answer within 10 s
/// (an overloaded agent may not).
fn scrape_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let fetch = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default())
    };
    fetch().unwrap_or_default()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One acknowledged apply: which workload, at which resource version.
struct Acked {
    workload: usize,
    resource_version: u64,
}

/// Offers `rate` applies a second for `window` over `clients`, open loop.
/// Returns each call's latency from when it was due (sorted), the
/// acknowledged applies, and the calls that failed.
async fn offer(
    clients: &[Client],
    rate: f64,
    window: Duration,
    round: &str,
) -> (Vec<Duration>, Vec<Acked>, Vec<String>) {
    let clients = clients.to_vec();
    let round = round.to_string();
    let calls = open_loop(rate, window, move |n, due| {
        let workload = n % WORKLOADS;
        let mut client = clients[n % clients.len()].clone();
        let revision = format!("{round}-{n}");
        async move {
            let result = client
                .apply_workload(request(workload_id(workload), revision))
                .await;
            let latency = due.elapsed();
            let acked = result.map(|response| {
                let version = response
                    .get_ref()
                    .status
                    .as_ref()
                    .and_then(|s| s.metadata.get("resource_version"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Acked {
                    workload,
                    resource_version: version,
                }
            });
            (latency, acked)
        }
    })
    .await;
    let mut latencies = Vec::with_capacity(calls.len());
    let mut acked = Vec::with_capacity(calls.len());
    let mut failed = Vec::new();
    for (latency, result) in calls {
        latencies.push(latency);
        match result {
            Ok(a) => acked.push(a),
            Err(status) => failed.push(format!("{:?}: {}", status.code(), status.message())),
        }
    }
    latencies.sort();
    (latencies, acked, failed)
}

/// What one reading watcher saw.
struct Seen {
    /// The workload it watched; `None`: every change.
    workload: Option<usize>,
    /// Resource versions of its events, in the order received.
    versions: Vec<u64>,
    /// The version its initial list ended at.
    listed_at: u64,
    /// Why its stream ended before it was stopped, if it did.
    ended: Option<String>,
}

/// Reads a Watch stream until `stop`, publishing the newest version seen.
async fn read(
    mut stream: tonic::Streaming<WatchEvent>,
    workload: Option<usize>,
    newest: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        workload,
        versions: Vec::new(),
        listed_at: 0,
        ended: None,
    };
    let mut listed = false;
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = stream.message() => message,
        };
        match message {
            Ok(Some(event)) if event.r#type() == WatchEventType::Bookmark => {
                if !listed {
                    listed = true;
                    seen.listed_at = event.resource_version;
                }
                newest.fetch_max(event.resource_version, Ordering::Relaxed);
            }
            Ok(Some(event)) => {
                seen.versions.push(event.resource_version);
                newest.fetch_max(event.resource_version, Ordering::Relaxed);
            }
            Ok(None) => {
                seen.ended = Some("the stream ended".into());
                break;
            }
            Err(status) => {
                seen.ended = Some(format!("{:?}: {}", status.code(), status.message()));
                break;
            }
        }
    }
    seen
}

/// A phase's figures.
struct Phase {
    completed_per_s: f64,
    failed: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    agent_cpu_per_apply_us: f64,
    agent_cpu_share: f64,
    peak_rss_mib: f64,
}

impl Phase {
    fn row(&self, name: &str) {
        println!(
            "| {name} | {:.0} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} µs | {:.0} % | {:.1} MiB |",
            self.completed_per_s,
            self.failed,
            self.p50,
            self.p99,
            self.p999,
            self.max,
            self.agent_cpu_per_apply_us,
            self.agent_cpu_share * 100.0,
            self.peak_rss_mib
        );
    }
}

async fn start_agent(dir: &std::path::Path, certs: &Certs) -> AgentProcess {
    std::fs::create_dir_all(dir).unwrap();
    AgentProcess::start(
        &dir.join("state"),
        certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
            ("PERSYS_LOG_LEVEL", "warn"),
            ("PERSYS_POLICY_MAX_WORKLOADS", "100000"),
        ],
    )
    .await
}

async fn measure(
    agent: &AgentProcess,
    clients: &[Client],
    rate: f64,
    window: Duration,
    tag: &str,
) -> (Phase, Vec<Acked>) {
    let pid = agent.child.id();
    // Creates every workload, and warms the connections.
    let (_, warm, _) = offer(clients, rate, WARM_UP, &format!("{tag}-warm")).await;
    let ticks = cpu_ticks(pid);
    let started = Instant::now();
    let (latencies, mut acked, failed) = offer(clients, rate, window, tag).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - ticks) as f64 / 100.0;
    let phase = Phase {
        completed_per_s: acked.len() as f64 / elapsed,
        failed: failed.len(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        max: percentile(&latencies, 1.0),
        agent_cpu_per_apply_us: cpu * 1e6 / acked.len().max(1) as f64,
        agent_cpu_share: cpu / elapsed,
        peak_rss_mib: mib(status_kib(pid, "VmHWM:")),
    };
    if let Some(first) = failed.first() {
        println!(
            "({tag}: {} applies failed; the first: {first})",
            failed.len()
        );
    }
    let mut all = warm;
    all.append(&mut acked);
    (phase, all)
}

async fn connections(agent: &AgentProcess, certs: &Certs, n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(client(agent.port, certs).await.unwrap());
    }
    clients
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let window = Duration::from_secs(env_or("PERSYS_BENCH_SECS", 60));
    let rate: f64 = env_or("PERSYS_BENCH_RATE", 5_000.0);
    let watchers: usize = env_or("PERSYS_BENCH_WATCHERS", 500);
    let full: usize = env_or("PERSYS_BENCH_FULL_WATCHERS", 8);
    assert!(
        watchers > full,
        "PERSYS_BENCH_WATCHERS: at least the full watchers and the stalled one"
    );
    let per_workload = watchers - full - 1;
    assert!(per_workload <= WORKLOADS);
    runtime.block_on(async {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-scratch/overload");
        let _ = std::fs::remove_dir_all(&root);
        let certs = Certs::generate(&root.join("certs"));

        // The same load with no watcher, on a fresh agent.
        let baseline = {
            let dir = root.join("baseline");
            let agent = start_agent(&dir, &certs).await;
            let clients = connections(&agent, &certs, CONNECTIONS).await;
            let (phase, _) = measure(&agent, &clients, rate, window, "baseline").await;
            drop(clients);
            drop(agent);
            let _ = std::fs::remove_dir_all(&dir);
            phase
        };

        // The load with the watchers.
        let dir = root.join("watched");
        let agent = start_agent(&dir, &certs).await;
        let clients = connections(&agent, &certs, CONNECTIONS).await;
        let stop = CancellationToken::new();
        let mut readers = Vec::new();
        let mut newest = Vec::new();
        let reader_connections =
            connections(&agent, &certs, (full + per_workload).div_ceil(WATCHERS_PER_CONNECTION))
                .await;
        for n in 0..full + per_workload {
            let workload = (n >= full).then(|| n - full);
            let mut watch = reader_connections[n / WATCHERS_PER_CONNECTION].clone();
            let stream = watch
                .watch(WatchRequest {
                    id: workload.map(workload_id).unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let seen = Arc::new(AtomicU64::new(0));
            newest.push(seen.clone());
            readers.push(tokio::spawn(read(stream, workload, seen, stop.clone())));
        }
        let mut stalled_client = client(agent.port, &certs).await.unwrap();
        let mut stalled = stalled_client
            .watch(WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let metrics_port = agent.metrics_port;
        let scrape = move || scrape_metrics(metrics_port);
        let open = sample(
            &tokio::task::spawn_blocking(scrape).await.unwrap(),
            "persys_agent_watch_streams",
        );
        println!(
            "Watch streams open on the agent before the load: {}",
            open.unwrap_or(0.0)
        );

        // When the agent counts the stalled watcher expired, from the start
        // of the warm-up.
        let load_started = Instant::now();
        let expired_at = tokio::spawn(async move {
            loop {
                let text = tokio::task::spawn_blocking(scrape).await.unwrap();
                let expired: f64 = ["backlog", "unread"]
                    .iter()
                    .filter_map(|reason| {
                        sample(
                            &text,
                            &format!("persys_agent_watch_expired_total{{reason=\"{reason}\"}}"),
                        )
                    })
                    .sum();
                if expired >= 1.0 {
                    return (load_started.elapsed(), text);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (watched, acked) = measure(&agent, &clients, rate, window, "watched").await;
        let load_ended = Instant::now();

        // The readers catch up with everything acknowledged.
        let mut last_of = vec![0_u64; WORKLOADS];
        for a in &acked {
            last_of[a.workload] = last_of[a.workload].max(a.resource_version);
        }
        let newest_acked = last_of.iter().copied().max().unwrap_or(0);
        let caught_up = loop {
            let behind = (0..full + per_workload)
                .filter(|&n| {
                    let target = if n < full {
                        newest_acked
                    } else {
                        last_of[n - full]
                    };
                    newest[n].load(Ordering::Relaxed) < target
                        && !readers[n].is_finished()
                })
                .count();
            if behind == 0 {
                break Some(load_ended.elapsed());
            }
            if load_ended.elapsed() > CATCH_UP {
                println!("({behind} readers still behind {CATCH_UP:?} after the load)");
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let open_after = sample(
            &tokio::task::spawn_blocking(scrape).await.unwrap(),
            "persys_agent_watch_streams",
        );
        stop.cancel();
        let mut seen = Vec::new();
        for reader in readers {
            seen.push(reader.await.unwrap());
        }

        // Every change each should have seen, in order.
        let mut acked_of: Vec<Vec<u64>> = vec![Vec::new(); WORKLOADS];
        for a in &acked {
            acked_of[a.workload].push(a.resource_version);
        }
        let mut complete = 0;
        let mut events = 0_usize;
        let mut failures = Vec::new();
        for s in &seen {
            events += s.versions.len();
            let in_order = s.versions.windows(2).all(|w| w[0] < w[1]);
            let ok = match s.workload {
                None => {
                    let gapless = s
                        .versions
                        .iter()
                        .enumerate()
                        .all(|(i, v)| *v == s.listed_at + 1 + i as u64);
                    gapless && s.versions.last().copied().unwrap_or(0) >= newest_acked
                }
                Some(w) => {
                    in_order
                        && acked_of[w]
                            .iter()
                            .all(|v| s.versions.binary_search(v).is_ok())
                }
            };
            if ok && in_order && s.ended.is_none() {
                complete += 1;
            } else if failures.len() < 5 {
                failures.push(format!(
                    "watcher of {:?}: {} events, in order {in_order}, ended {:?}",
                    s.workload.map(workload_id),
                    s.versions.len(),
                    s.ended
                ));
            }
        }

        // The stalled watcher: what it was sent, then how it ended.
        let mut stalled_events = 0;
        let stalled_end = loop {
            match tokio::time::timeout(Duration::from_secs(30), stalled.message()).await {
                Ok(Ok(Some(_))) => stalled_events += 1,
                Ok(Ok(None)) => break "ended without a status".to_string(),
                Ok(Err(status)) => break format!("{:?}: {}", status.code(), status.message()),
                Err(_) => break "still open 30 s after it was read again".to_string(),
            }
        };
        let expired = tokio::time::timeout(Duration::from_secs(1), expired_at).await;
        let peak = mib(status_kib(agent.child.id(), "VmHWM:"));

        println!(
            "\n## {rate:.0} applies/s offered for {} s over {CONNECTIONS} mutual-TLS connections, after {} s of warm-up; fresh agent per row",
            window.as_secs(),
            WARM_UP.as_secs()
        );
        println!(
            "| run | completed/s | failed | p50 | p99 | p99.9 | max | agent CPU per apply | agent CPU (of one core) | agent peak RSS |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        baseline.row("no watcher");
        watched.row(&format!(
            "{watchers} watchers ({full} of everything, {per_workload} of one workload, 1 never reading)"
        ));
        println!(
            "| **ratio (watched / none)** | {:.3} | | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            watched.completed_per_s / baseline.completed_per_s,
            watched.p50 / baseline.p50,
            watched.p99 / baseline.p99,
            watched.p999 / baseline.p999,
            watched.max / baseline.max,
            watched.agent_cpu_per_apply_us / baseline.agent_cpu_per_apply_us,
            watched.agent_cpu_share / baseline.agent_cpu_share,
            watched.peak_rss_mib / baseline.peak_rss_mib,
        );
        println!(
            "\nAgent peak RSS with the watchers: {peak:.1} MiB, {} the {RSS_LIMIT_MIB:.0} MiB limit.",
            if peak < RSS_LIMIT_MIB { "under" } else { "OVER" }
        );
        println!("\n| watchers | result |");
        println!("|---|---|");
        match expired {
            Ok(Ok((after, text))) => {
                let reasons: Vec<String> = ["backlog", "unread"]
                    .iter()
                    .filter_map(|reason| {
                        sample(
                            &text,
                            &format!("persys_agent_watch_expired_total{{reason=\"{reason}\"}}"),
                        )
                        .map(|n| format!("{reason} {n}"))
                    })
                    .collect();
                println!(
                    "| the one never reading | expired {:.1} s into the load (warm-up included; `watch_expired_total`: {}); once read, it gave {stalled_events} events, then `{stalled_end}` |",
                    after.as_secs_f64(),
                    reasons.join(", ")
                );
            }
            _ => println!(
                "| the one never reading | NOT EXPIRED; read afterwards it gave {stalled_events} events, then `{stalled_end}` |"
            ),
        }
        println!(
            "| the {} reading | {complete} saw every change they should, in order ({events} events in all); caught up {} after the load; streams open after: {} |",
            full + per_workload,
            match caught_up {
                Some(after) => format!("{:.2} s", after.as_secs_f64()),
                None => "NOT within the limit".to_string(),
            },
            open_after.unwrap_or(0.0)
        );
        for failure in &failures {
            println!("(incomplete: {failure})");
        }
        println!("\n(agent and clients share this machine's cores)");
        drop(clients);
        drop(stalled_client);
        drop(agent);
        let _ = std::fs::remove_dir_all(&root);
    });
}
