//! SIGKILL during concurrent applies loses no acknowledged write and leaves
//! nothing half-written. The test binary re-runs itself as the writer child.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use persys_agent::store::{ApplyRequest, Store, StoreConfig};
use persys_api::v1::{ContainerSpec, DesiredState, WorkloadSpec, WorkloadType, workload_spec};

const CHILD_ENV: &str = "PERSYS_CRASH_CHILD_DIR";
const TEST_NAME: &str = "acknowledged_applies_survive_sigkill";

fn request(id: String) -> ApplyRequest {
    ApplyRequest {
        id,
        workload_type: WorkloadType::Container,
        revision_id: String::new(),
        desired_state: DesiredState::Running,
        spec: WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: "persys-test/busybox:latest".into(),
                command: vec!["sleep".into(), "3600".into()],
                ..Default::default()
            })),
        },
        finalizers: vec![persys_api::FINALIZER_DOCKER.into()],
        labels: BTreeMap::new(),
        caller: Default::default(),
    }
}

/// The child: applies from 32 tasks as fast as it can, printing each
/// acknowledged apply, until it is killed.
fn run_child(dir: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(StoreConfig::new(dir)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for writer in 0..32 {
            let store = store.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("c{writer}-{i}");
                    let outcome = store.apply(request(id.clone())).await.unwrap();
                    let _ = tx.send(format!(
                        "ack {id} {}",
                        outcome.workload().resource_version()
                    ));
                }
            });
        }
        let mut out = std::io::stdout().lock();
        while let Some(line) = rx.recv().await {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn acknowledged_applies_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return run_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<(String, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 3000 {
        assert!(
            Instant::now() < deadline,
            "child acknowledged only {}",
            acked.len()
        );
        let line = lines.next().expect("child output").unwrap();
        if let Some(rest) = line.strip_prefix("ack ") {
            let (id, rv) = rest.split_once(' ').unwrap();
            acked.push((id.to_string(), rv.parse().unwrap()));
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Lines already printed were acknowledged before the kill.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ack ") {
            let (id, rv) = rest.split_once(' ').unwrap();
            acked.push((id.to_string(), rv.parse().unwrap()));
        }
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store =
            Store::open(StoreConfig::new(dir.path().join("state"))).expect("reopen after SIGKILL");
        for (id, rv) in &acked {
            let object = store
                .get(id)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged apply {id} lost"));
            assert_eq!(object.resource_version(), *rv, "{id}");
        }
        // Nothing half-written: the log is gapless up to the last version, and
        // every object is the one its last log entry wrote.
        let last = store.resource_version();
        assert!(last >= acked.iter().map(|(_, rv)| *rv).max().unwrap());
        let listing = store.snapshot().unwrap();
        assert_eq!(listing.resource_version, last);
        let mut watch = Box::pin(store.watch(0));
        let mut latest = std::collections::HashMap::new();
        for expected in 1..=last {
            let change = watch.next().await.unwrap().unwrap();
            assert_eq!(change.resource_version, expected);
            latest.insert(change.object.id().to_string(), change.object.clone());
        }
        assert_eq!(latest.len(), listing.objects.len());
        for object in &listing.objects {
            assert_eq!(latest[object.id()].as_ref(), object.as_ref());
        }
        // Versions keep increasing after the crash.
        let next = store.apply(request("after-crash".into())).await.unwrap();
        assert_eq!(next.workload().resource_version(), last + 1);
        eprintln!(
            "{} acknowledged applies, {} on disk after SIGKILL",
            acked.len(),
            last
        );
    });
}
