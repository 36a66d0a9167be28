//! The cost of probes: 1,000 TCP probes at kubelet's default period of
//! 10 s, run by the agent's prober (one timer wheel in one task, a bounded
//! number of checks in flight), measured as this process's CPU time
//! (getrusage) over a fixed window. Beside it, in the same run and on the
//! same runtime, the raw alternative: one tokio task with its own interval
//! per probe, doing the same check (a TCP connect with a timeout).
//!
//! The two take turns, in the order prober, raw, raw, prober, … (each
//! round reverses the last), so a machine getting busier or quieter during
//! the run weighs on both alike. Before the rounds each side runs once
//! uncounted (a warm-up, printed), so neither pays for what a process's
//! first window may carry (the connections' TIME_WAIT sockets building up
//! to their steady count, the allocator growing). Each side gets one period
//! to settle before its window. The probes connect to a listener in a child process, so
//! accepting the connections is not counted; the child counts them, which
//! shows both sides did the same work.
//!
//! Run: `cargo bench --bench probes`. `PERSYS_PROBES` (1,000),
//! `PERSYS_PROBE_WINDOW_SECONDS` (30), `PERSYS_PROBE_ROUNDS` (2) and
//! `PERSYS_PROBE_WARMUP_SECONDS` (10; 0 for none) change the size; `PERSYS_PROBE_ONLY=prober` or `=raw` runs one side for one
//! window, for a profiler (`perf record -g`).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use persys_api::v1::{Probe, TcpSocketAction};
use persys_controllers::docker::Engine;
use persys_controllers::probes::{Instance, ProbeKind, ProbeSpec, Prober};

const LISTENER: &str = "PERSYS_PROBE_BENCH_LISTENER";
const PERIOD: Duration = Duration::from_secs(10);

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The child: accepts and drops connections until its parent goes, and
/// answers each line on its stdin with the connections accepted so far.
fn listen() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    println!("{port}");
    std::io::stdout().flush().expect("flush");
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        println!("{}", accepted.load(Ordering::Relaxed));
        std::io::stdout().flush().expect("flush");
    }
}

/// The parent's end of the listener.
struct Listener {
    port: u16,
    ask: ChildStdin,
    answers: BufReader<ChildStdout>,
}

impl Listener {
    fn accepted(&mut self) -> u64 {
        writeln!(self.ask).expect("ask the listener");
        self.ask.flush().expect("ask the listener");
        let mut line = String::new();
        self.answers
            .read_line(&mut line)
            .expect("the listener's count");
        line.trim().parse().expect("a count")
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = load.split_whitespace().take(3).collect();
    fields.join(" ")
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One window of one side: CPU as a percentage of one core, and the
/// connections the listener accepted in it.
#[derive(Clone, Copy, Default)]
struct Window {
    cpu: f64,
    checks: u64,
    seconds: f64,
}

impl Window {
    fn add(&mut self, other: Window) {
        // Weighted by time, as one long window would be.
        let seconds = self.seconds + other.seconds;
        self.cpu = (self.cpu * self.seconds + other.cpu * other.seconds) / seconds;
        self.checks += other.checks;
        self.seconds = seconds;
    }
}

/// CPU over `window`, as a percentage of one core.
async fn measure(window: Duration, listener: &mut Listener) -> Window {
    let before = listener.accepted();
    let (cpu, wall) = (cpu_time(), std::time::Instant::now());
    tokio::time::sleep(window).await;
    let used = cpu_time() - cpu;
    let seconds = wall.elapsed().as_secs_f64();
    let checks = listener.accepted() - before;
    Window {
        cpu: used.as_secs_f64() / seconds * 100.0,
        checks,
        seconds,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Prober,
    Raw,
}

/// Starts `side`, lets it settle for a period, measures one window, stops it.
async fn run(side: Side, probes: usize, window: Duration, listener: &mut Listener) -> Window {
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listener.port);
    match side {
        Side::Prober => {
            let prober = prober(probes, listener.port).await;
            tokio::time::sleep(PERIOD).await;
            let measured = measure(window, listener).await;
            let failing = (0..probes)
                .filter(|n| {
                    let health =
                        prober.health(&format!("w{}", n / 10), &format!("c{n}"), &format!("{n}"));
                    health.readiness.and_then(|v| v.passing) != Some(true)
                })
                .count();
            assert_eq!(failing, 0, "every probe passes");
            measured
        }
        Side::Raw => {
            let mut raw = raw(probes, address);
            tokio::time::sleep(PERIOD).await;
            let measured = measure(window, listener).await;
            raw.abort_all();
            while raw.join_next().await.is_some() {}
            measured
        }
    }
}

fn main() {
    if std::env::var_os(LISTENER).is_some() {
        return listen();
    }
    let probes = env_or("PERSYS_PROBES", 1000) as usize;
    let window = Duration::from_secs(env_or("PERSYS_PROBE_WINDOW_SECONDS", 30));
    let rounds = env_or("PERSYS_PROBE_ROUNDS", 2).max(1);
    let warmup = Duration::from_secs(env_or("PERSYS_PROBE_WARMUP_SECONDS", 10));
    let only = std::env::var("PERSYS_PROBE_ONLY").ok();
    let mut child = Command::new(std::env::current_exe().expect("this bench"))
        .env(LISTENER, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the listener");
    let mut answers = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    answers.read_line(&mut line).expect("the listener's port");
    let mut listener = Listener {
        port: line.trim().parse().expect("a port"),
        ask: child.stdin.take().expect("stdin"),
        answers,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!("load average at the start: {}", load_average());
    let (prober_total, raw_total) = runtime.block_on(async {
        let idle = measure(Duration::from_secs(2), &mut listener).await;
        println!("idle runtime: {:.3}% of a core", idle.cpu);
        if let Some(only) = only {
            let side = if only == "raw" {
                Side::Raw
            } else {
                Side::Prober
            };
            let measured = run(side, probes, window, &mut listener).await;
            println!(
                "{only} alone: {:.3}% of a core, {} checks",
                measured.cpu, measured.checks
            );
            std::process::exit(0);
        }
        if !warmup.is_zero() {
            let prober = run(Side::Prober, probes, warmup, &mut listener).await;
            let raw = run(Side::Raw, probes, warmup, &mut listener).await;
            println!(
                "warm-up (not counted): prober {:.3}% ({} checks), raw {:.3}% ({} checks)",
                prober.cpu, prober.checks, raw.cpu, raw.checks
            );
        }
        let (mut prober_total, mut raw_total) = (Window::default(), Window::default());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [Side::Prober, Side::Raw]
            } else {
                [Side::Raw, Side::Prober]
            };
            let mut figures = [Window::default(); 2];
            for side in order {
                let measured = run(side, probes, window, &mut listener).await;
                figures[usize::from(side == Side::Raw)] = measured;
            }
            let [prober, raw] = figures;
            println!(
                "round {}: prober {:.3}% ({} checks), raw {:.3}% ({} checks), raw / prober {:.2}x",
                round + 1,
                prober.cpu,
                prober.checks,
                raw.cpu,
                raw.checks,
                raw.cpu / prober.cpu.max(1e-9)
            );
            prober_total.add(prober);
            raw_total.add(raw);
        }
        (prober_total, raw_total)
    });
    let _ = child.kill();
    let _ = child.wait();
    println!("load average at the end: {}", load_average());
    println!(
        "{probes} TCP probes every {}s, {rounds} rounds of {}s windows each:",
        PERIOD.as_secs(),
        window.as_secs()
    );
    println!(
        "  prober (one timer wheel, one task): {:.3}% of a core, {} checks",
        prober_total.cpu, prober_total.checks
    );
    println!(
        "  raw (a task and an interval per probe): {:.3}% of a core, {} checks",
        raw_total.cpu, raw_total.checks
    );
    println!(
        "  raw / prober: {:.2}x",
        raw_total.cpu / prober_total.cpu.max(1e-9)
    );
    let target = 2.0;
    println!(
        "  target < {target}% of a core and no more than raw: {}",
        if prober_total.cpu < target && prober_total.cpu <= raw_total.cpu {
            "met"
        } else {
            "MISSED"
        }
    );
}

/// Registers `probes` TCP probes on one prober, their first checks spread
/// over one period (after an initial delay of one period) as containers
/// started at different times would be.
async fn prober(probes: usize, port: u16) -> Prober {
    let spec = ProbeSpec::of(
        ProbeKind::Readiness,
        &Probe {
            tcp_socket: Some(TcpSocketAction {
                port: i32::from(port),
                host: String::new(),
            }),
            initial_delay_seconds: PERIOD.as_secs() as i32,
            ..Default::default()
        },
    )
    .expect("a valid probe");
    let prober = Prober::default();
    let engine = Engine::new(None);
    let (notify, mut woken) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while woken.recv().await.is_some() {} });
    let now = SystemTime::now();
    for workload in 0..probes.div_ceil(10) {
        let instances: Vec<Instance> = (0..10)
            .map(|i| workload * 10 + i)
            .take_while(|n| *n < probes)
            .map(|n| Instance {
                container_id: format!("c{n}"),
                started_at: format!("{n}"),
                started: now - PERIOD.mul_f64(n as f64 / probes as f64),
                address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                liveness: None,
                readiness: Some(spec.clone()),
            })
            .collect();
        prober.watch(&format!("w{workload}"), &engine, &notify, &instances);
    }
    assert_eq!(prober.registered(), probes);
    prober
}

/// The raw alternative: a task per probe, each with its interval, the
/// first ticks spread over one period the same way.
fn raw(probes: usize, address: SocketAddr) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for n in 0..probes {
        let first = start + PERIOD.mul_f64(n as f64 / probes as f64);
        tasks.spawn(async move {
            let mut interval = tokio::time::interval_at(first, PERIOD);
            loop {
                interval.tick().await;
                let connected = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(address),
                )
                .await;
                std::hint::black_box(connected.is_ok_and(|c| c.is_ok()));
            }
        });
    }
    tasks
}
