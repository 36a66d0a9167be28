//! Store benchmarks: durable apply throughput (group commit beside one fsync
//! per write, and sealed beside plain in the same run), watch fan-out latency (beside a bare broadcast channel), and
//! open + informer sync of a large state (beside a raw fjall scan).
//!
//! Run: `cargo bench --bench store` (figures go to stdout).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use persys_agent::store::{ApplyRequest, Caller, Store, StoreConfig, seal};
use persys_api::v1::{
    ActualState, ContainerSpec, DesiredState, ObjectStatus, PortMapping, WorkloadSpec,
    WorkloadType, workload_spec,
};
use persys_controllers::Informer;
use tokio_util::sync::CancellationToken;

fn request(id: String, image: &str) -> ApplyRequest {
    ApplyRequest {
        id,
        workload_type: WorkloadType::Container,
        revision_id: String::new(),
        desired_state: DesiredState::Running,
        spec: WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: image.into(),
                command: vec!["/bin/sh".into(), "-c".into()],
                args: vec!["httpd -f -p 8080".into()],
                env: [("MODE", "production"), ("REGION", "eu-west-1")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: vec![PortMapping {
                    host_port: 18080,
                    container_port: 8080,
                    protocol: "tcp".into(),
                }],
                ..Default::default()
            })),
        },
        finalizers: vec![persys_api::FINALIZER_DOCKER.into()],
        labels: BTreeMap::new(),
        caller: Caller::default(),
    }
}

/// A scratch directory on the same disk as the project (not tmpfs), so
/// fsync costs what it costs.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-scratch")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The state directory, its key beside it in the scratch directory.
    dir.join("state")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = status
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Durable applies per second with `writers` concurrent tasks for `window`,
/// values sealed or (for the comparison only) not.
async fn applies_per_second(
    writers: usize,
    max_group: usize,
    window: Duration,
    seal: bool,
) -> (f64, f64) {
    let dir = scratch(&format!("apply-{writers}-{max_group}-{seal}"));
    let mut config = StoreConfig::new(&dir);
    config.max_group = max_group;
    config.seal = seal;
    let store = Store::open(config).unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = 0u64;
            while started.elapsed() < window {
                store
                    .apply(request(format!("w{w}-{i}"), "persys-test/busybox:latest"))
                    .await
                    .unwrap();
                i += 1;
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commits = store.metrics().commits.get() as f64;
    store.close().await;
    (total as f64 / elapsed, total as f64 / commits.max(1.0))
}

async fn bench_applies() {
    println!("## Durable applies (each acknowledged write fsynced)");
    println!(
        "| writers | group commit, sealed (applies/s) | group commit, plain (applies/s) | sealed / plain | writes per sync | one fsync per write, sealed (applies/s) | speed-up |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let window = Duration::from_secs(3);
    for writers in [1, 8, 64] {
        // Plain first, then sealed, then the naive one: same machine, same run.
        let (plain, _) = applies_per_second(writers, 1024, window, false).await;
        let (group, per_sync) = applies_per_second(writers, 1024, window, true).await;
        let (naive, _) = applies_per_second(writers, 1, window, true).await;
        println!(
            "| {writers} | {group:.0} | {plain:.0} | {:.3} | {per_sync:.1} | {naive:.0} | {:.1}x |",
            group / plain,
            group / naive
        );
    }
    println!();
}

/// What sealing adds to one write on the committer thread, apart from the
/// fsync: encoding the bench's object, beside encoding and sealing it.
fn bench_seal_cost() {
    use prost::Message;
    const ROUNDS: u32 = 200_000;
    let object = persys_api::v1::Workload {
        metadata: Some(persys_api::v1::ObjectMeta {
            id: "w0-123456".into(),
            uid: "0b7c7a52-3c38-4a53-9a37-1f0e2b6d9c11".into(),
            revision_id: "sha256:9f86d081884c7d659a2feaa0c55ad015".into(),
            finalizers: vec![persys_api::FINALIZER_DOCKER.into()],
            ..Default::default()
        }),
        spec: Some(persys_api::v1::ObjectSpec {
            desired_state: DesiredState::Running as i32,
            workload: Some(request(String::new(), "persys-test/busybox:latest").spec),
        }),
        status: Some(ObjectStatus::default()),
    };
    let sealer = seal::Sealer::new(&seal::NodeKey::generate().unwrap()).unwrap();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(object.encode_to_vec());
    }
    let encode = started.elapsed() / ROUNDS;
    let started = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(
            sealer
                .seal_with(
                    seal::Aad::Object(b"w0-123456"),
                    object.encoded_len(),
                    |out| object.encode_raw(out),
                )
                .unwrap(),
        );
    }
    let sealed = started.elapsed() / ROUNDS;
    // The raw alternative: the cipher alone on the encoded bytes, into a
    // buffer allocated once.
    let raw = {
        use chacha20poly1305::aead::{AeadInOut, KeyInit};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&[7u8; 32].into());
        let nonce = chacha20poly1305::XNonce::default();
        let mut buffer = object.encode_to_vec();
        let started = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(
                cipher
                    .encrypt_inout_detached(&nonce, b"w0-123456", buffer.as_mut_slice().into())
                    .unwrap(),
            );
        }
        started.elapsed() / ROUNDS
    };
    println!(
        "## Sealing cost on the committer: {} B object, encode {:.2} us, encode + seal {:.2} us (+{:.2} us per write); the cipher alone {:.2} us\n",
        object.encoded_len(),
        encode.as_secs_f64() * 1e6,
        sealed.as_secs_f64() * 1e6,
        (sealed.saturating_sub(encode)).as_secs_f64() * 1e6,
        raw.as_secs_f64() * 1e6,
    );
}

async fn bench_watch_fanout() {
    const WATCHERS: usize = 100;
    const RATE: u64 = 1000;
    const SECONDS: u64 = 3;
    let total = (RATE * SECONDS) as usize;
    println!("## Watch fan-out: {WATCHERS} watchers, {RATE} writes/s for {SECONDS} s");

    let dir = scratch("watch");
    let store = Store::open(StoreConfig::new(&dir)).unwrap();
    let acked: Arc<Mutex<HashMap<u64, (Instant, Instant)>>> = Arc::default();
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut watch = Box::pin(store.watch(0));
        watchers.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(total);
            while seen.len() < total {
                let change = watch.next().await.unwrap().unwrap();
                seen.push((change.resource_version, Instant::now()));
            }
            seen
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 0..total {
        ticker.tick().await;
        let submitted = Instant::now();
        let outcome = store
            .apply(request(format!("w{i}"), "persys-test/busybox:latest"))
            .await
            .unwrap();
        acked.lock().unwrap().insert(
            outcome.workload().resource_version(),
            (submitted, Instant::now()),
        );
    }
    let mut end_to_end = Vec::new();
    let mut after_ack = Vec::new();
    for w in watchers {
        for (rv, at) in w.await.unwrap() {
            let (submitted, ack) = acked.lock().unwrap()[&rv];
            end_to_end.push(at.saturating_duration_since(submitted));
            after_ack.push(at.saturating_duration_since(ack));
        }
    }
    end_to_end.sort();
    after_ack.sort();
    store.close().await;

    // The raw alternative: a bare tokio broadcast channel, no store, no fsync.
    let (tx, _) = tokio::sync::broadcast::channel::<(u64, Instant)>(8192);
    let mut raw_watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut rx = tx.subscribe();
        raw_watchers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            while latencies.len() < total {
                let (_, sent) = rx.recv().await.unwrap();
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 0..total {
        ticker.tick().await;
        tx.send((i as u64, Instant::now())).unwrap();
    }
    let mut raw = Vec::new();
    for w in raw_watchers {
        raw.extend(w.await.unwrap());
    }
    raw.sort();

    println!("| path | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, samples) in [
        ("store: apply call → watcher (includes fsync)", &end_to_end),
        ("store: commit acknowledged → watcher", &after_ack),
        ("bare broadcast channel (no store)", &raw),
    ] {
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.3} ms |",
            percentile(samples, 0.5).as_secs_f64() * 1e3,
            percentile(samples, 0.99).as_secs_f64() * 1e3,
            samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    println!();
}

async fn bench_open_and_sync() {
    const OBJECTS: usize = 10_000;
    const LOG_ENTRIES: u64 = 100_000;
    println!("## Open + informer sync: {OBJECTS} objects, {LOG_ENTRIES} log entries");
    let dir = scratch("open");
    {
        let mut config = StoreConfig::new(&dir);
        config.max_log_entries = LOG_ENTRIES;
        let store = Store::open(config).unwrap();
        let mut tasks = Vec::new();
        for w in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..OBJECTS).step_by(64) {
                    store
                        .apply(request(format!("w{i}"), "persys-test/busybox:latest"))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Status writes fill the log to its size.
        let mut tasks = Vec::new();
        for w in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                loop {
                    if store.resource_version() >= LOG_ENTRIES {
                        break;
                    }
                    let id = format!("w{}", i % OBJECTS);
                    let current = store.get(&id).unwrap().unwrap();
                    let status = ObjectStatus {
                        actual_state: ActualState::Running as i32,
                        observed_generation: 1,
                        runtime_ref: format!("{:064x}", i),
                        restart_count: (i / OBJECTS) as i32,
                        ..Default::default()
                    };
                    let _ = store
                        .update_status(&id, current.resource_version(), status)
                        .await;
                    i += 64;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        store.close().await;
    }

    let started = Instant::now();
    let store = Store::open(StoreConfig::new(&dir)).unwrap();
    let opened = started.elapsed();
    let rss_before = rss_bytes();
    let synced_at = Instant::now();
    let informer = Informer::new(Arc::new(store.clone()));
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn({
        let informer = informer.clone();
        let shutdown = shutdown.clone();
        async move { informer.run(shutdown).await }
    });
    informer.wait_until_synced().await;
    let synced = synced_at.elapsed();
    let rss_after = rss_bytes();
    assert_eq!(informer.cache().len(), OBJECTS);
    shutdown.cancel();
    runner.await.unwrap();

    // The raw alternative: scan, unseal and decode the objects keyspace
    // with fjall.
    let key_file = StoreConfig::new(&dir).key_file;
    let log_len = store.log_len();
    store.close().await;
    drop(informer);
    drop(store);
    let raw_started = Instant::now();
    let db = fjall::Database::builder(dir.join("db")).open().unwrap();
    let objects = db
        .keyspace("objects_sealed", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let sealer = seal::Sealer::new(&seal::read_key_file(&key_file).unwrap().unwrap()).unwrap();
    let mut decoded = 0;
    for guard in objects.iter() {
        let (key, value) = guard.into_inner().unwrap();
        let plain = sealer
            .open(seal::Aad::Object(&key), &value, "object")
            .unwrap();
        let _: persys_api::v1::Workload = prost::Message::decode(&*plain).unwrap();
        decoded += 1;
    }
    let raw = raw_started.elapsed();
    assert_eq!(decoded, OBJECTS);

    println!("| step | time |");
    println!("|---|---:|");
    println!(
        "| store open (recovery, {log_len} log entries kept) | {:.1} ms |",
        opened.as_secs_f64() * 1e3
    );
    println!(
        "| informer list + sync | {:.1} ms |",
        synced.as_secs_f64() * 1e3
    );
    println!(
        "| **open + sync** | **{:.1} ms** |",
        (opened + synced).as_secs_f64() * 1e3
    );
    println!(
        "| raw fjall open + scan + unseal + decode (no store) | {:.1} ms |",
        raw.as_secs_f64() * 1e3
    );
    println!(
        "\ninformer cache for {OBJECTS} objects: {:.1} MiB resident (RSS growth during sync)\n",
        rss_after.saturating_sub(rss_before) as f64 / (1024.0 * 1024.0)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wanted("applies") || wanted("seal") {
            bench_seal_cost();
        }
        if wanted("applies") {
            bench_applies().await;
        }
        if wanted("watch") {
            bench_watch_fanout().await;
        }
        if wanted("open") {
            bench_open_and_sync().await;
        }
    });
}
