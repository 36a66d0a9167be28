//! Specs sealed at rest, on a real fjall database: the secret of a spec is
//! in no file under the state directory, the key is needed to read it back,
//! plain stores of schemas 1 and 2 are sealed, and the key rotates.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use persys_agent::store::seal::{self, NodeKey};
use persys_agent::store::{
    ApplyRequest, Caller, DeleteOutcome, LogRecord, StopAfter, Store, StoreConfig, StoreError,
    rotate_key, rotate_key_until,
};
use persys_api::v1::{
    ContainerSpec, DesiredState, EventType, ObjectMeta, ObjectSpec, WatchEventType, Workload,
    WorkloadSpec, WorkloadType, workload_spec,
};
use prost::Message;

fn secret() -> String {
    (0..48)
        .map(|_| fastrand::alphanumeric())
        .collect::<String>()
}

fn container(env: &str) -> WorkloadSpec {
    WorkloadSpec {
        spec: Some(workload_spec::Spec::Container(ContainerSpec {
            image: "busybox".into(),
            env: [("API_TOKEN".to_string(), env.to_string())].into(),
            ..Default::default()
        })),
    }
}

fn request(id: &str, env: &str) -> ApplyRequest {
    ApplyRequest {
        id: id.into(),
        workload_type: WorkloadType::Container,
        revision_id: String::new(),
        desired_state: DesiredState::Running,
        spec: container(env),
        finalizers: vec![persys_api::FINALIZER_DOCKER.into()],
        labels: BTreeMap::new(),
        caller: Caller {
            identity: "CN=persys-scheduler".into(),
            role: "scheduler".into(),
        },
    }
}

fn env_of(workload: &Workload) -> String {
    match workload
        .spec
        .as_ref()
        .and_then(|s| s.workload.as_ref())
        .and_then(|w| w.spec.as_ref())
    {
        Some(workload_spec::Spec::Container(c)) => c.env["API_TOKEN"].clone(),
        _ => panic!("not a container"),
    }
}

fn config(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig::new(dir.path().join("state"))
}

/// Every file under `root`, journal and tables included.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    assert!(!found.is_empty());
    found
}

/// The files under `root` that hold `needle`.
fn holding(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(root)
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .unwrap_or_default()
                .windows(needle.len())
                .any(|w| w == needle)
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_secret_is_in_no_file_of_the_state_and_only_the_key_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (first, second, gone) = (secret(), secret(), secret());
    let store = Store::open(config.clone()).unwrap();
    store.apply(request("keep", &first)).await.unwrap();
    store.apply(request("keep", &second)).await.unwrap();
    store
        .record_event(
            "keep",
            EventType::Warning,
            "Crashed",
            &format!("output: {second}"),
        )
        .await
        .unwrap();
    store.apply(request("drop", &gone)).await.unwrap();
    let outcome = store.delete("drop").await.unwrap();
    assert!(matches!(outcome, DeleteOutcome::Deleting(_)));
    store
        .remove_finalizer("drop", persys_api::FINALIZER_DOCKER)
        .await
        .unwrap();
    // Acknowledged writes are in the journal: sealed there too.
    for value in [&first, &second, &gone] {
        assert_eq!(
            holding(&config.path, value.as_bytes()),
            Vec::<PathBuf>::new()
        );
    }
    store.close().await;
    drop(store);
    for value in [&first, &second, &gone] {
        assert_eq!(
            holding(&config.path, value.as_bytes()),
            Vec::<PathBuf>::new()
        );
    }
    // The key sits beside the state directory, owner-only, as the
    // directory is.
    assert_eq!(config.key_file, dir.path().join("state.key"));
    assert_eq!(mode(&config.key_file), 0o600);
    assert_eq!(mode(&config.path), 0o700);
    let key = std::fs::read_to_string(&config.key_file).unwrap();
    assert!(holding(&config.path, key.trim().as_bytes()).is_empty());

    // With the key, everything reads back.
    let store = Store::open(config.clone()).unwrap();
    assert_eq!(env_of(&store.get("keep").unwrap().unwrap()), second);
    assert!(
        store
            .events("keep")
            .unwrap()
            .iter()
            .any(|e| e.message == format!("output: {second}"))
    );
    let records = store.log_records(false, usize::MAX, |_| true).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(env_of(records[0].object.as_ref().unwrap()), first);
    assert_eq!(records[0].caller, "CN=persys-scheduler");
    store.close().await;
    drop(store);

    // Without it, the open fails naming both paths, and creates no key.
    let saved = dir.path().join("saved.key");
    std::fs::rename(&config.key_file, &saved).unwrap();
    let error = Store::open(config.clone()).err().expect("refused");
    assert!(matches!(error, StoreError::Key { .. }), "{error:?}");
    let message = error.to_string();
    for part in [
        config.key_file.display().to_string(),
        config.path.display().to_string(),
        "Nothing was changed".into(),
        "restore".into(),
    ] {
        assert!(message.contains(&part), "{message}");
    }
    assert!(!config.key_file.exists(), "no new key over existing data");

    // Another key: refused the same way.
    seal::create_key_file(&config.key_file).unwrap();
    let message = Store::open(config.clone())
        .err()
        .expect("refused")
        .to_string();
    assert!(message.contains("does not open"), "{message}");
    assert!(message.contains(&config.key_file.display().to_string()));

    // A key others may read: refused.
    std::fs::remove_file(&config.key_file).unwrap();
    std::fs::rename(&saved, &config.key_file).unwrap();
    std::fs::set_permissions(&config.key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let message = Store::open(config.clone())
        .err()
        .expect("refused")
        .to_string();
    assert!(message.contains("chmod 600"), "{message}");
    std::fs::set_permissions(&config.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The right key again: nothing was lost.
    let store = Store::open(config.clone()).unwrap();
    assert_eq!(env_of(&store.get("keep").unwrap().unwrap()), second);
    assert_eq!(store.resource_version(), 5);
    assert!(store.get("drop").unwrap().is_none());
}

fn plain_object(id: &str, rv: u64, env: &str) -> Workload {
    Workload {
        metadata: Some(ObjectMeta {
            id: id.into(),
            r#type: WorkloadType::Container as i32,
            resource_version: rv,
            generation: 1,
            revision_id: format!("r{rv}"),
            ..Default::default()
        }),
        spec: Some(ObjectSpec {
            desired_state: DesiredState::Running as i32,
            workload: Some(container(env)),
        }),
        status: None,
    }
}

/// Writes a store the way schema 1 or 2 did, values in clear: six applies
/// of `w0`…`w5` carrying `secret`, the log trimmed through 2, and an event.
fn write_plain_store(state: &Path, schema: u64, secret: &str) {
    std::fs::create_dir_all(state).unwrap();
    let db = fjall::Database::builder(state.join("db")).open().unwrap();
    let keyspace = |name: &str| {
        db.keyspace(name, fjall::KeyspaceCreateOptions::default)
            .unwrap()
    };
    let objects = keyspace("objects");
    let events = keyspace("events");
    let meta = keyspace("meta");
    let log = keyspace(if schema == 1 { "log" } else { "changelog" });
    for rv in 1..=6u64 {
        let object = plain_object(&format!("w{}", rv - 1), rv, secret);
        objects
            .insert(object.id().as_bytes(), object.encode_to_vec())
            .unwrap();
        if rv > 2 || schema == 2 {
            // Schema 1 trimmed with deletes; schema 2 logically.
            let record = LogRecord {
                kind: WatchEventType::Added as i32,
                resource_version: rv,
                object: Some(object),
                action: "apply".into(),
                at_ms: persys_api::now_ms(),
                ..Default::default()
            };
            log.insert(rv.to_be_bytes(), record.encode_to_vec())
                .unwrap();
        }
    }
    let event = persys_api::v1::Event {
        workload_id: "w0".into(),
        r#type: EventType::Warning as i32,
        reason: "Crashed".into(),
        message: format!("output: {secret}"),
        count: 1,
        first_seen_ms: 1,
        last_seen_ms: 1,
    };
    let mut key = b"w0\0".to_vec();
    key.extend_from_slice(&[7; 8]);
    events.insert(key, event.encode_to_vec()).unwrap();
    meta.insert("schema_version", schema.to_be_bytes()).unwrap();
    meta.insert("last_resource_version", 6u64.to_be_bytes())
        .unwrap();
    meta.insert("compacted_through", 2u64.to_be_bytes())
        .unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

async fn plain_store_is_sealed(schema: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let value = secret();
    write_plain_store(&config.path, schema, &value);
    assert!(
        !holding(&config.path, value.as_bytes()).is_empty(),
        "the plain store holds the secret in clear"
    );
    assert!(!config.key_file.exists());

    let store = Store::open(config.clone()).unwrap();
    assert!(
        config.key_file.exists(),
        "a key is created for the plain store"
    );
    assert_eq!(store.resource_version(), 6);
    assert_eq!(store.compacted_through(), 2);
    assert_eq!(store.list(None).unwrap().len(), 6);
    assert_eq!(env_of(&store.get("w3").unwrap().unwrap()), value);
    let served: Vec<u64> = store
        .log_records(false, usize::MAX, |_| true)
        .unwrap()
        .iter()
        .map(|r| r.resource_version)
        .collect();
    assert_eq!(served, [3, 4, 5, 6]);
    assert_eq!(
        store.events("w0").unwrap()[0].message,
        format!("output: {value}")
    );
    let outcome = store.apply(request("w-new", "x")).await.unwrap();
    assert_eq!(outcome.workload().resource_version(), 7);
    store.close().await;
    drop(store);

    assert_eq!(
        holding(&config.path, value.as_bytes()),
        Vec::<PathBuf>::new()
    );
    {
        let db = fjall::Database::builder(config.path.join("db"))
            .open()
            .unwrap();
        for old in ["objects", "events", "changelog", "log"] {
            assert!(!db.keyspace_exists(old), "{old} dropped");
        }
        assert!(!config.path.join("db.next").exists());
        assert!(!config.path.join("db.old").exists());
    }
    let store = Store::open(config).unwrap();
    assert_eq!(env_of(&store.get("w0").unwrap().unwrap()), value);
    assert_eq!(store.resource_version(), 7);
}

#[tokio::test]
async fn a_plain_schema_2_store_is_sealed_and_its_plaintext_leaves_the_disk() {
    plain_store_is_sealed(2).await;
}

#[tokio::test]
async fn a_plain_schema_1_store_is_sealed_keeping_its_retained_log() {
    plain_store_is_sealed(1).await;
}

/// Files holding a value sealed under `key` (its version byte and key id).
fn under_key(root: &Path, key: &NodeKey) -> Vec<PathBuf> {
    let mut header = vec![1u8];
    header.extend_from_slice(&key.id());
    holding(root, &header)
}

async fn fill(config: &StoreConfig, value: &str) {
    let store = Store::open(config.clone()).unwrap();
    for i in 0..20 {
        store
            .apply(request(&format!("w{i}"), &format!("{value}-{i}")))
            .await
            .unwrap();
    }
    store
        .record_event("w0", EventType::Normal, "Started", "up")
        .await
        .unwrap();
    store.close().await;
}

async fn check_filled(config: &StoreConfig, value: &str) {
    let store = Store::open(config.clone()).unwrap();
    assert_eq!(store.list(None).unwrap().len(), 20);
    assert_eq!(
        env_of(&store.get("w7").unwrap().unwrap()),
        format!("{value}-7")
    );
    assert_eq!(
        store
            .log_records(false, usize::MAX, |_| true)
            .unwrap()
            .len(),
        20
    );
    assert_eq!(store.events("w0").unwrap().len(), 2, "Applied and Started");
    store.close().await;
}

#[tokio::test]
async fn rotate_key_reseals_everything_and_no_old_key_value_stays_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let value = secret();
    fill(&config, &value).await;
    let old = seal::read_key_file(&config.key_file).unwrap().unwrap();
    assert!(!under_key(&config.path, &old).is_empty());

    // Refused while the store is open.
    let store = Store::open(config.clone()).unwrap();
    let message = rotate_key(&config).unwrap_err().to_string();
    assert!(message.contains("in use"), "{message}");
    store.close().await;
    drop(store);

    let report = rotate_key(&config).unwrap();
    assert_eq!(
        (report.objects, report.log_entries, report.events),
        (20, 20, 21)
    );
    assert!(!report.finished_interrupted);
    let new = seal::read_key_file(&config.key_file).unwrap().unwrap();
    assert_ne!(new.id(), old.id());
    assert_eq!(report.key_id, seal::key_id_hex(&new.id()));
    assert!(!seal::new_key_file(&config.key_file).exists());
    assert_eq!(under_key(&config.path, &old), Vec::<PathBuf>::new());
    assert_eq!(
        holding(&config.path, value.as_bytes()),
        Vec::<PathBuf>::new()
    );
    check_filled(&config, &value).await;
}

#[tokio::test]
async fn an_interrupted_rotation_blocks_the_agent_and_a_rerun_finishes_it() {
    for stop in [
        StopAfter::NewKey,
        StopAfter::PartialCopy,
        StopAfter::Swapped,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let value = secret();
        fill(&config, &value).await;
        let old = seal::read_key_file(&config.key_file).unwrap().unwrap();

        rotate_key_until(&config, stop).unwrap();
        let pending = seal::new_key_file(&config.key_file);
        assert!(pending.exists(), "{stop:?}");
        assert_eq!(mode(&pending), 0o600);
        let message = Store::open(config.clone())
            .err()
            .expect("refused")
            .to_string();
        assert!(message.contains("rotate-key"), "{stop:?}: {message}");

        let report = rotate_key(&config).unwrap();
        assert_eq!(
            report.finished_interrupted,
            stop == StopAfter::Swapped,
            "{stop:?}"
        );
        assert!(!pending.exists());
        let new = seal::read_key_file(&config.key_file).unwrap().unwrap();
        assert_ne!(new.id(), old.id());
        assert_eq!(
            under_key(&config.path, &old),
            Vec::<PathBuf>::new(),
            "{stop:?}"
        );
        check_filled(&config, &value).await;
    }
}

#[test]
fn the_cli_rotates_the_key_and_refuses_cleanly_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(fill(&config, "v"));
    let key_before = std::fs::read_to_string(&config.key_file).unwrap();

    let run = |state: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
            .args(["store", "rotate-key"])
            .env("PERSYS_STATE_PATH", state)
            .env_remove("PERSYS_STATE_KEY_FILE")
            .output()
            .unwrap()
    };
    let output = run(&config.path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.starts_with("persys-agent: re-sealed 20 objects"),
        "{stdout}"
    );
    let key_after = std::fs::read_to_string(&config.key_file).unwrap();
    assert_ne!(key_before, key_after);
    for key in [&key_before, &key_after] {
        assert!(!stdout.contains(key.trim()), "no key material printed");
    }

    let output = run(&dir.path().join("nothing"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("persys-agent: "), "{stderr}");
    assert!(stderr.contains("no store"), "{stderr}");
}

#[test]
fn the_agent_without_its_key_exits_with_the_reason_and_leaves_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(fill(&config, "v"));
    let saved = dir.path().join("saved.key");
    std::fs::rename(&config.key_file, &saved).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_persys-agent"))
        .env("PERSYS_STATE_PATH", &config.path)
        .env_remove("PERSYS_STATE_KEY_FILE")
        .env("PERSYS_TLS_ENABLED", "false")
        .env("PERSYS_GRPC_PORT", "0")
        .env("PERSYS_METRICS_PORT", "0")
        .env("PERSYS_DOCKER_ENABLED", "false")
        .env("PERSYS_COMPOSE_ENABLED", "false")
        .env("PERSYS_VM_ENABLED", "false")
        .env_remove("PERSYS_SCHEDULER_ADDR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is missing"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!config.key_file.exists());
    std::fs::rename(&saved, &config.key_file).unwrap();
    runtime.block_on(check_filled(&config, "v"));
}
