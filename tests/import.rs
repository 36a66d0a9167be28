//! Import from the Go agent: a real bbolt `state.db`, written by the Go
//! program in `tests/fixtures/goagent-state` with the real Go bbolt library
//! and the Go agent's JSON, read by the agent into a real fjall store.
//!
//! The agent runs with its runtimes enabled but unreachable, so imported
//! workloads are stored and nothing runs anywhere.

mod common;
#[path = "common/goagent.rs"]
mod goagent;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use common::{AgentProcess, UNREACHABLE_RUNTIMES, free_port};
use persys_agent::store::{ACTION_APPLY, Store, StoreConfig};
use persys_api::v1::{
    ComposeSpec, ContainerSpec, DesiredState, DiskConfig, EventType, ManagedVolumeSpec,
    NetworkConfig, PortMapping, ResourceLimits, RestartPolicy, VmSpec, VolumeMount, WorkloadType,
    workload_spec,
};

const IMAGE: &str = "persys-test/busybox:latest";

/// Writes `<dir>/state.db` as the Go agent leaves it, with `args` for the
/// fixture (`-n`, `-refused`, `-unknown-field`).
fn go_state(dir: &Path, args: &[&str]) -> Option<PathBuf> {
    let program = goagent::fixture_program("import")?;
    let file = dir.join("state.db");
    let vm_disk = dir.join("state/vm/gvm-1/root.qcow2");
    let output = Command::new(program)
        .arg("-out")
        .arg(&file)
        .args(["-image", IMAGE, "-vm-disk"])
        .arg(&vm_disk)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fixture failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(file)
}

/// The file's bytes and modification time.
fn fingerprint(file: &Path) -> (Vec<u8>, SystemTime) {
    (
        std::fs::read(file).unwrap(),
        std::fs::metadata(file).unwrap().modified().unwrap(),
    )
}

fn env_with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = UNREACHABLE_RUNTIMES.to_vec();
    env.extend_from_slice(extra);
    env
}

/// The store in `dir`, opened after the agent stopped.
fn open_store(dir: &Path) -> Store {
    Store::open(StoreConfig::new(dir)).expect("open the imported store")
}

fn container_expected() -> ContainerSpec {
    ContainerSpec {
        image: IMAGE.into(),
        command: vec!["sleep".into()],
        args: vec!["3600".into()],
        env: BTreeMap::from([
            ("MODE".into(), "prod".into()),
            ("TOKEN".into(), "s3cret".into()),
        ]),
        volumes: vec![VolumeMount {
            host_path: "/var/lib/persys/volumes/gweb".into(),
            container_path: "/data".into(),
            read_only: true,
        }],
        ports: vec![PortMapping {
            host_port: 18080,
            container_port: 80,
            protocol: "tcp".into(),
        }],
        resources: Some(ResourceLimits {
            cpu_shares: 512,
            memory_bytes: 268_435_456,
            memory_swap_bytes: 536_870_912,
        }),
        restart_policy: Some(RestartPolicy {
            policy: "on-failure".into(),
            max_retry_count: 3,
        }),
        labels: BTreeMap::from([("team".into(), "web".into())]),
        managed_volumes: vec![ManagedVolumeSpec {
            name: "cache".into(),
            driver: "local".into(),
            size_gb: 1,
            access_mode: "rwo".into(),
            fs_type: "ext4".into(),
            mount_path: "/cache".into(),
            read_only: false,
            retain_policy: "Retain".into(),
        }],
        ..Default::default()
    }
}

fn vm_expected(dir: &Path) -> VmSpec {
    VmSpec {
        name: "web-vm".into(),
        vcpus: 2,
        memory_mb: 1024,
        disks: vec![DiskConfig {
            path: dir.join("state/vm/gvm-1/root.qcow2").display().to_string(),
            device: "vda".into(),
            format: "qcow2".into(),
            size_gb: 2,
            r#type: "disk".into(),
            boot: true,
        }],
        networks: vec![NetworkConfig {
            network: "default".into(),
            mac_address: "52:54:00:12:34:56".into(),
            ip_address: String::new(),
        }],
        cloud_init: "#cloud-config\npassword: changeme\n".into(),
        metadata: BTreeMap::from([("owner".into(), "ops".into())]),
        cloud_init_config: Some(persys_api::v1::CloudInitConfig {
            meta_data: "instance-id: gvm-1\n".into(),
            ..Default::default()
        }),
        managed_volumes: Vec::new(),
    }
}

/// The workloads of the fixture with `-refused -unknown-field`, as they
/// must be stored: every field, revision and desired state kept.
fn assert_imported(store: &Store, dir: &Path, file: &Path) {
    let web = store.get("gweb").unwrap().expect("gweb imported");
    assert_eq!(web.workload_type(), WorkloadType::Container);
    assert_eq!(web.revision_id(), "rev-web-1");
    assert_eq!(web.desired_state(), DesiredState::Running);
    assert_eq!(
        web.workload_spec(),
        Some(&workload_spec::Spec::Container(container_expected()))
    );

    let shop = store.get("gshop").unwrap().expect("gshop imported");
    assert_eq!(shop.revision_id(), "rev-shop-2");
    let Some(workload_spec::Spec::Compose(ComposeSpec {
        project_name,
        compose_yaml,
        env,
        ..
    })) = shop.workload_spec()
    else {
        panic!("gshop is not a compose workload: {shop:?}");
    };
    assert_eq!(project_name, "shop");
    let yaml = persys_api::model::compose_file_text(compose_yaml).unwrap();
    assert!(yaml.contains(&format!("image: {IMAGE}")), "{yaml}");
    assert_eq!(env.get("DB_PASSWORD").map(String::as_str), Some("hunter2"));

    let vm = store.get("gvm-1").unwrap().expect("gvm-1 imported");
    assert_eq!(vm.revision_id(), "rev-vm-1");
    assert_eq!(vm.desired_state(), DesiredState::Stopped);
    assert_eq!(
        vm.workload_spec(),
        Some(&workload_spec::Spec::Vm(vm_expected(dir)))
    );

    // Refused by the node policy (a bind mount outside the allowed roots).
    assert!(store.get("gbad").unwrap().is_none());
    // A field this agent has no place for: imported without it, and said.
    let new = store.get("gnew").unwrap().expect("gnew imported");
    assert_eq!(new.revision_id(), "rev-new-1");
    let events = store.events("gnew").unwrap();
    let imported: Vec<_> = events.iter().filter(|e| e.reason == "Imported").collect();
    assert_eq!(imported.len(), 1, "{events:?}");
    assert_eq!(imported[0].r#type, EventType::Warning as i32);
    assert!(
        imported[0].message.contains("spec.container.runtime_class"),
        "{}",
        imported[0].message
    );

    for id in ["gweb", "gshop", "gvm-1"] {
        let events = store.events(id).unwrap();
        let imported: Vec<_> = events.iter().filter(|e| e.reason == "Imported").collect();
        assert_eq!(imported.len(), 1, "{id}: {events:?}");
        assert_eq!(imported[0].count, 1, "{id}");
        assert_eq!(imported[0].r#type, EventType::Normal as i32, "{id}");
        assert!(
            imported[0].message.contains(&file.display().to_string()),
            "{}",
            imported[0].message
        );
    }
    assert_eq!(store.list(None).unwrap().len(), 4);
}

/// Apply records in the change log, per workload id.
fn applies(store: &Store) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in store
        .log_records(false, usize::MAX, |r| r.action == ACTION_APPLY)
        .unwrap()
    {
        let id = record.object.as_ref().map(|o| o.id().to_string()).unwrap();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

fn marker(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".imported");
    PathBuf::from(name)
}

/// Starts the agent on the Go agent's `file` (it serves once the import is
/// done), stops it with SIGTERM, and answers its log.
async fn start_and_stop(file: &Path) -> String {
    let mut agent = AgentProcess::start_plaintext(file, &env_with(&[])).await;
    let log = agent.log_text();
    assert!(agent.signal("TERM").await.success(), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_imports_the_go_agents_state_once_and_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let Some(file) = go_state(dir.path(), &["-refused", "-unknown-field"]) else {
        return;
    };
    let before = fingerprint(&file);
    let state_dir = dir.path().join("state");

    let log = start_and_stop(&file).await;
    assert!(log.contains("Go agent import done"), "{log}");
    // The refusal names the workload, the field and the policy switch.
    assert!(
        log.lines().any(|l| l.contains("gbad")
            && l.contains("spec.container.volumes[0]")
            && l.contains("host_paths.allowed_roots")),
        "{log}"
    );
    assert!(!log.contains("s3cret") && !log.contains("hunter2"), "{log}");

    assert_eq!(fingerprint(&file), before, "the Go agent's file changed");
    let text = std::fs::read_to_string(marker(&file)).expect("marker written");
    assert!(text.contains("imported_at:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("imported") && l.contains("gweb")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("REFUSED") && l.contains("gbad")),
        "{text}"
    );

    let first_applies = {
        let store = open_store(&state_dir);
        assert_imported(&store, dir.path(), &file);
        let applies = applies(&store);
        assert_eq!(applies.values().sum::<usize>(), 4, "{applies:?}");
        store.close().await;
        applies
    };

    // A second start imports nothing: the marker says it is done.
    let log = start_and_stop(&file).await;
    assert!(log.contains("was imported already"), "{log}");
    let store = open_store(&state_dir);
    assert_eq!(applies(&store), first_applies);
    assert_imported(&store, dir.path(), &file);
    store.close().await;
    assert_eq!(fingerprint(&file), before, "the Go agent's file changed");
}

/// Runs `persys-agent import` with the state directory `state`.
fn import_command(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::offline_agent(state);
    command
        .env("PERSYS_DOCKER_ENABLED", "true")
        .env("PERSYS_COMPOSE_ENABLED", "true")
        .env("PERSYS_VM_ENABLED", "true")
        .arg("import")
        .args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_what_would_be_imported_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(file) = go_state(dir.path(), &["-refused", "-unknown-field"]) else {
        return;
    };
    let before = fingerprint(&file);
    let state_dir = dir.path().join("state");
    let file_arg = file.to_str().unwrap();

    let output = import_command(&state_dir, &["--from", file_arg, "--dry-run"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |id: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{stdout}"))
            .to_string()
    };
    for (id, kind, desired, revision) in [
        ("gweb", "container", "running", "rev-web-1"),
        ("gshop", "compose", "running", "rev-shop-2"),
        ("gvm-1", "vm", "stopped", "rev-vm-1"),
    ] {
        let words: Vec<String> = line(id).split_whitespace().map(String::from).collect();
        assert_eq!(
            words[..5],
            ["import", id, kind, desired, revision],
            "{stdout}"
        );
    }
    assert!(
        line("gnew").contains("spec.container.runtime_class"),
        "{stdout}"
    );
    let refused = line("gbad");
    assert!(refused.starts_with("REFUSED"), "{stdout}");
    assert!(refused.contains("host_paths.allowed_roots"), "{stdout}");
    assert!(stdout.contains("4 would be imported"), "{stdout}");
    assert!(stdout.contains("vol-cache"), "{stdout}");

    assert!(!state_dir.exists(), "a dry run created the state directory");
    assert!(!marker(&file).exists(), "a dry run wrote the marker");
    assert_eq!(fingerprint(&file), before);

    // The node's ceilings apply as to an apply: 2 workloads at most.
    let output = import_command(
        &state_dir,
        &["--from", file_arg, "--dry-run"],
        &[("PERSYS_POLICY_MAX_WORKLOADS", "2")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{stdout}");
    let over: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("REFUSED") && l.contains("ceilings.node.workloads"))
        .collect();
    assert_eq!(over.len(), 2, "{stdout}");
    assert!(!state_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_command_imports_into_the_state_directory_and_again_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(file) = go_state(dir.path(), &["-refused", "-unknown-field"]) else {
        return;
    };
    let before = fingerprint(&file);
    let state_dir = dir.path().join("state");
    let file_arg = file.to_str().unwrap();

    let output = import_command(&state_dir, &["--from", file_arg], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("4 imported"), "{stdout}");
    assert!(marker(&file).exists());

    let output = import_command(&state_dir, &["--from", file_arg], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("0 imported, 4 already in"), "{stdout}");

    let store = open_store(&state_dir);
    assert_imported(&store, dir.path(), &file);
    assert!(applies(&store).values().all(|n| *n == 1));
    store.close().await;
    assert_eq!(fingerprint(&file), before);
}

/// The Go agent still running holds its file's lock: the import refuses,
/// saying to stop it, instead of waiting forever or reading a file in flux.
#[test]
fn an_import_while_the_go_agent_holds_its_file_says_to_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(program) = goagent::fixture_program("import") else {
        return;
    };
    let file = dir.path().join("state.db");
    let mut go_agent = Command::new(program)
        .arg("-out")
        .arg(&file)
        .arg("-hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(go_agent.stdout.take().unwrap()).lines();
    for line in stdout {
        if line.unwrap().contains("holding") {
            break;
        }
    }
    let output = import_command(
        &dir.path().join("state"),
        &["--from", file.to_str().unwrap(), "--dry-run"],
        &[],
    );
    drop(go_agent.stdin.take());
    go_agent.wait().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("stop the Go agent first"), "{stderr}");
}

#[test]
fn a_damaged_state_db_stops_the_agent_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some(file) = go_state(dir.path(), &[]) else {
        return;
    };
    // Pages after the two meta pages (the freelist, the buckets) zeroed:
    // the header still says bbolt.
    let mut damaged = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let length = damaged.metadata().unwrap().len();
    damaged.seek(SeekFrom::Start(8192)).unwrap();
    damaged
        .write_all(&vec![0u8; (length - 8192) as usize])
        .unwrap();
    drop(damaged);
    let before = fingerprint(&file);
    let output = common::offline_agent(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("move the file aside"), "{stderr}");
    assert_eq!(fingerprint(&file), before);
    assert!(!marker(&file).exists());
    assert!(
        !dir.path().join("state").exists(),
        "started over it: {stderr}"
    );

    // A file in the state's place that is not bbolt at all.
    let other = dir.path().join("other.db");
    std::fs::write(&other, b"this is not a database").unwrap();
    let output = common::offline_agent(&other).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains(&other.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a bbolt database"), "{stderr}");
}

/// kill -9 once the import has written 100 workloads (seen in the agent's log),
/// then a normal start: every workload is there once, with one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_import_then_a_restart_completes_it_without_duplicates() {
    const GENERATED: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let Some(file) = go_state(dir.path(), &["-n", &GENERATED.to_string()]) else {
        return;
    };
    let before = fingerprint(&file);
    let state_dir = dir.path().join("state");
    let env = env_with(&[("PERSYS_POLICY_MAX_WORKLOADS", "5000")]);

    let mut command = Command::new(env!("CARGO_BIN_EXE_persys-agent"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PERSYS_STATE_PATH", &file)
        .env("PERSYS_TLS_ENABLED", "false")
        .env("PERSYS_GRPC_ADDR", "127.0.0.1")
        .env("PERSYS_GRPC_PORT", free_port().to_string())
        .env("PERSYS_METRICS_PORT", free_port().to_string())
        // Each durable workload write is logged at debug.
        .env("PERSYS_LOG_LEVEL", "info,persys_agent::import=debug");
    for (key, value) in &env {
        command.env(key, value);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Killed once the log shows 100 workloads written: mid-import, as
    // the import goes on while the log is read.
    let mut seen = Vec::new();
    let mut written = 0;
    while written < 100 {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the agent ended before importing:\n{}", seen.join("\n")))
            .unwrap();
        if line.contains("Go agent workload imported") {
            written += 1;
        }
        seen.push(line);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Where the kill landed, for the record; the assertions below hold
    // wherever it did.
    if marker(&file).exists() {
        eprintln!("killed after the import was done");
    } else if state_dir.exists() {
        let store = open_store(&state_dir);
        eprintln!(
            "killed with {} of {} workloads imported",
            store.list(None).unwrap().len(),
            GENERATED + 3
        );
        store.close().await;
    }

    let mut agent = AgentProcess::start_plaintext(&file, &env).await;
    let log = agent.log_text();
    assert!(agent.signal("TERM").await.success());
    assert!(log.contains("Go agent import done"), "{log}");

    let store = open_store(&state_dir);
    let objects = store.list(None).unwrap();
    assert_eq!(objects.len(), GENERATED + 3);
    let applies = applies(&store);
    assert_eq!(applies.len(), GENERATED + 3);
    assert!(
        applies.values().all(|n| *n == 1),
        "a workload was written twice: {:?}",
        applies.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    for object in &objects {
        let events = store.events(object.id()).unwrap();
        let imported: Vec<_> = events.iter().filter(|e| e.reason == "Imported").collect();
        assert_eq!(imported.len(), 1, "{}: {events:?}", object.id());
        assert_eq!(imported[0].count, 1, "{}", object.id());
    }
    let last = store.get("gen-01999").unwrap().unwrap();
    assert_eq!(last.revision_id(), "rev-gen-1999");
    store.close().await;
    assert!(marker(&file).exists());
    let mut in_progress = file.as_os_str().to_owned();
    in_progress.push(".importing");
    assert!(!Path::new(&in_progress).exists());
    assert_eq!(fingerprint(&file), before);
}
