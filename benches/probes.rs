//! The cost of probes: 1,000 TCP probes at kubelet's default period of
//! 10 s, run by the agent's prober (one timer wheel in one task, a bounded
//! number of checks in flight), measured as this process's CPU time
//! (getrusage) over a fixed window. Beside it, in the same run and on the
//! same runtime, the raw alternative: one tokio task with its own interval
//! per probe, doing the same check (a TCP connect with a timeout).
//!
//! The probes connect to a listener in a child process, so accepting the
//! connections is not counted. Run: `cargo bench --bench probes`;
//! `PERSYS_PROBES` and `PERSYS_PROBE_WINDOW_SECONDS` change the size (1,000
//! probes, a 30 s window).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
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

/// The child: accepts and drops connections until its parent goes.
fn listen() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    println!("{port}");
    std::io::stdout().flush().expect("flush");
    for stream in listener.incoming() {
        drop(stream);
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU over `window`, as a percentage of one core.
async fn measure(window: Duration) -> f64 {
    let (cpu, wall) = (cpu_time(), std::time::Instant::now());
    tokio::time::sleep(window).await;
    let used = cpu_time() - cpu;
    used.as_secs_f64() / wall.elapsed().as_secs_f64() * 100.0
}

fn main() {
    if std::env::var_os(LISTENER).is_some() {
        return listen();
    }
    let probes = env_or("PERSYS_PROBES", 1000) as usize;
    let window = Duration::from_secs(env_or("PERSYS_PROBE_WINDOW_SECONDS", 30));
    let mut child = Command::new(std::env::current_exe().expect("this bench"))
        .env(LISTENER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the listener");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listener's port");
    let port: u16 = line.trim().parse().expect("a port");
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (prober_cpu, raw_cpu) = runtime.block_on(async {
        let idle = measure(Duration::from_secs(2)).await;
        println!("idle runtime: {idle:.3}% of a core");
        let prober = prober(probes, port).await;
        let prober_cpu = measure(window).await;
        drop(prober);
        let mut raw = raw(probes, address);
        let raw_cpu = measure(window).await;
        raw.abort_all();
        (prober_cpu, raw_cpu)
    });
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{probes} TCP probes every {}s, over {}s:",
        PERIOD.as_secs(),
        window.as_secs()
    );
    println!("  prober (one timer wheel, one task): {prober_cpu:.3}% of a core");
    println!("  raw (a task and an interval per probe): {raw_cpu:.3}% of a core");
    println!("  raw / prober: {:.2}x", raw_cpu / prober_cpu.max(1e-9));
    let target = 2.0;
    println!(
        "  target < {target}% of a core: {}",
        if prober_cpu < target { "met" } else { "MISSED" }
    );
}

/// Registers `probes` TCP probes on one prober, their first checks spread
/// over one period as containers started at different times would be; waits
/// one period so every probe is in its steady cycle.
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
    tokio::time::sleep(PERIOD).await;
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
