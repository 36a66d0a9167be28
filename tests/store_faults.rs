//! Store faults, on the real agent and real filesystems: a full disk, a
//! failing fsync, and a damaged state directory.
//!
//! - A full disk (a small tmpfs filled up): applies answer UNAVAILABLE
//!   saying why, `/readyz` and grpc.health turn not ready, and writes
//!   resume by themselves once space is freed, losing nothing.
//! - A failing fsync (`persys-lazyfs` fault injection): the group it
//!   covered is not acknowledged, nothing is acknowledged after it, and the
//!   agent exits 1 to be restarted; after a power cut every acknowledged
//!   apply is there.
//! - A damaged state directory, one case per kind of file: the agent exits
//!   1 naming the file and the way out, never panics, never starts empty,
//!   and `persys-agent store check` exits 1 too.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AgentProcess, UNREACHABLE_RUNTIMES, http_get, plaintext_client};
use persys_api::v1::*;
use persys_lazyfs::LazyFs;
use tonic::Code;

const EIO: i32 = 5;

fn request(id: &str, revision: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        revision_id: revision.into(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: format!("persys-test/busybox:{revision}"),
                ..Default::default()
            })),
        }),
    }
}

/// The agent on `state`, its key beside `state` (never on a test mount).
async fn start(state: &Path) -> AgentProcess {
    let key = key_file(state);
    let mut env = UNREACHABLE_RUNTIMES.to_vec();
    env.push(("PERSYS_STATE_KEY_FILE", key.to_str().unwrap()));
    AgentProcess::start_plaintext(state, &env).await
}

fn key_file(state: &Path) -> PathBuf {
    state.with_extension("key")
}

/// The stored revision of `id`, if any.
async fn stored_revision(port: u16, id: &str) -> Option<String> {
    let mut client = plaintext_client(port).await.unwrap();
    match client
        .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
    {
        Ok(response) => Some(response.into_inner().status.unwrap().revision_id),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => panic!("reading {id}: {status}"),
    }
}

/// What grpc.health.v1 says of the agent's service.
async fn grpc_health(port: u16) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "persys.agent.v1.AgentService".into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

/// Polls `probe` until it holds (the health reporter ticks every 5 s).
async fn eventually<F, Fut>(what: &str, agent: &AgentProcess, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the agent to exit by itself.
async fn wait_exit(agent: &mut AgentProcess) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit within 60 s:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file until it is full; returns
/// the file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 1 << 20];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(28) => break,
            Err(error) => panic!("filling {}: {error}", dir.display()),
        }
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_applies_until_space_returns_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The state directory is the root of a 160 MiB tmpfs: room for the
    // store's 64 MiB reserve, until it is filled. Its key and the agent's
    // log lie beside it.
    let state = dir.path().join("state");
    let _tmpfs = Tmpfs::mount(&state, "160m");
    let mut agent = start(&state).await;
    let mut client = plaintext_client(agent.port).await.unwrap();
    for i in 0..5 {
        let applied = client
            .apply_workload(request(&format!("before-{i}"), "r1"))
            .await
            .unwrap();
        assert!(applied.get_ref().applied);
    }

    let filler = fill(&state);
    for i in 0..3 {
        let id = format!("while-full-{i}");
        let status = client
            .apply_workload(request(&id, "r1"))
            .await
            .expect_err("an apply on a full disk must not answer OK");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("the store cannot write")
                && status.message().contains("the disk is full"),
            "the refusal says what and why: {}",
            status.message()
        );
        assert_eq!(
            stored_revision(agent.port, &id).await,
            None,
            "a refused apply stored nothing"
        );
    }
    let (code, body) = http_get(agent.metrics_port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("store not writable") && body.contains("the disk is full"),
        "/readyz names the store and why: {body}"
    );
    eventually("grpc.health NOT_SERVING", &agent, || async {
        grpc_health(agent.port).await
            == tonic_health::pb::health_check_response::ServingStatus::NotServing
    })
    .await;

    // Space back: the agent writes again by itself, without a restart.
    std::fs::remove_file(&filler).unwrap();
    eventually("/readyz ready again", &agent, || async {
        http_get(agent.metrics_port, "/readyz").0 == 200
    })
    .await;
    let applied = client
        .apply_workload(request("after-space-returned", "r1"))
        .await
        .unwrap();
    assert!(applied.get_ref().applied);
    eventually("grpc.health SERVING again", &agent, || async {
        grpc_health(agent.port).await
            == tonic_health::pb::health_check_response::ServingStatus::Serving
    })
    .await;
    assert!(agent.child.try_wait().unwrap().is_none(), "never restarted");

    // Nothing acknowledged was lost, also after a restart.
    assert_eq!(agent.signal("TERM").await.code(), Some(0));
    let agent = start(&state).await;
    for id in (0..5)
        .map(|i| format!("before-{i}"))
        .chain(["after-space-returned".to_string()])
    {
        assert_eq!(
            stored_revision(agent.port, &id).await.as_deref(),
            Some("r1"),
            "{id}"
        );
    }
    for i in 0..3 {
        assert_eq!(
            stored_revision(agent.port, &format!("while-full-{i}")).await,
            None
        );
    }
}

/// Applies from `clients` tasks until the agent stops answering OK;
/// returns every acknowledged (id, revision), and the first refusal each
/// task met.
async fn apply_until_refused(
    port: u16,
    clients: usize,
) -> (
    Arc<Mutex<Vec<(String, String)>>>,
    Vec<tokio::task::JoinHandle<tonic::Status>>,
) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = plaintext_client(port).await.unwrap();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("c{c}-{}", i % 8);
                let revision = format!("r{i}");
                match client.apply_workload(request(&id, &revision)).await {
                    Ok(response) if response.get_ref().applied => {
                        acked.lock().unwrap().push((id, revision));
                    }
                    Ok(response) => panic!("{id}: {response:?}"),
                    Err(status) => return status,
                }
            }
            unreachable!()
        }));
    }
    (acked, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fsync_acknowledges_nothing_more_and_the_agent_exits_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("backing")).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let fs = LazyFs::mount(dir.path().join("backing"), &state).unwrap();
    let mut agent = start(&state).await;

    let (acked, clients) = apply_until_refused(agent.port, 8).await;
    // Let some applies through, then the disk starts failing its syncs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 50 {
        assert!(Instant::now() < deadline, "no applies acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fs.fail_syncs(Some(EIO));
    // Every client is refused: by the store (UNAVAILABLE), or, for one
    // whose call was in flight as the agent exited, by the connection
    // closing (CANCELLED). None is acknowledged.
    let mut refused_by_store = 0;
    for client in clients {
        let status = client.await.unwrap();
        match status.code() {
            Code::Unavailable => refused_by_store += 1,
            Code::Cancelled => {}
            _ => panic!("{status:?}"),
        }
    }
    assert!(refused_by_store > 0, "no client was refused by the store");
    let status = wait_exit(&mut agent).await;
    assert_eq!(status.code(), Some(1), "{}", agent.log_text());
    let log = agent.log_text();
    assert!(
        log.contains("the store cannot write")
            && log.contains("Input/output error")
            && log.contains("restarted"),
        "the agent says why it stops and what comes next:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    // The power goes: what the failed sync covered never reached the disk.
    fs.cut_power().unwrap();
    drop(agent);
    fs.unmount().unwrap();
    let _fs = LazyFs::mount(dir.path().join("backing"), &state).unwrap();
    let agent = start(&state).await;
    let mut last = std::collections::HashMap::new();
    for (id, revision) in &acked {
        last.insert(id.clone(), revision.clone());
    }
    for (id, revision) in &last {
        let stored = stored_revision(agent.port, id).await;
        // The last acknowledged revision, or a later one that was written
        // but never acknowledged.
        let at_least = revision[1..].parse::<u64>().unwrap();
        let stored_n = stored
            .as_deref()
            .and_then(|r| r[1..].parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            stored.is_some() && stored_n >= at_least,
            "{id}: acknowledged {revision}, stored {stored:?}"
        );
    }
    eprintln!(
        "{} applies acknowledged before the failed sync, all there after the power cut",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_meets_a_full_disk_past_the_reserve_stops_the_agent_and_loses_nothing() {
    const ENOSPC: i32 = 28;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("backing")).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let fs = LazyFs::mount(dir.path().join("backing"), &state).unwrap();
    let mut agent = start(&state).await;
    let mut client = plaintext_client(agent.port).await.unwrap();
    for i in 0..5 {
        let applied = client
            .apply_workload(request(&format!("before-{i}"), "r1"))
            .await
            .unwrap();
        assert!(applied.get_ref().applied);
    }
    // The filesystem still reports free space, but writes fail: fjall
    // meets ENOSPC itself (and poisons its database).
    fs.fail_writes(Some(ENOSPC));
    let status = client
        .apply_workload(request("refused", "r1"))
        .await
        .expect_err("a write that failed must not answer OK");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("No space left on device"),
        "{}",
        status.message()
    );
    let status = wait_exit(&mut agent).await;
    assert_eq!(status.code(), Some(1), "{}", agent.log_text());
    assert!(!agent.log_text().contains("panicked"));

    // Space back, and the agent restarted (as systemd would): nothing
    // acknowledged is missing, and it writes again.
    fs.fail_writes(None);
    drop(agent);
    let agent = start(&state).await;
    for i in 0..5 {
        assert_eq!(
            stored_revision(agent.port, &format!("before-{i}"))
                .await
                .as_deref(),
            Some("r1")
        );
    }
    let mut client = plaintext_client(agent.port).await.unwrap();
    assert!(
        client
            .apply_workload(request("after", "r1"))
            .await
            .unwrap()
            .get_ref()
            .applied
    );
}

/// The agent binary, offline, on `state` (its key beside it).
fn agent_command(state: &Path) -> Command {
    let mut command = common::offline_agent(state);
    command
        .env("PERSYS_STATE_KEY_FILE", key_file(state))
        .stdin(Stdio::null());
    command
}

/// Runs `command` until it exits (killed after 30 s: an agent that started
/// on a damaged directory): its exit code and its stderr.
fn run_to_exit(mut command: Command) -> (Option<i32>, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.and_then(|s| s.code()), stderr)
}

/// A state directory with five workloads: three flushed to tables by a
/// clean stop, two in the journal only (the agent was killed), then
/// recovered once and killed again.
async fn populated_state(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    let mut agent = start(&state).await;
    let mut client = plaintext_client(agent.port).await.unwrap();
    for i in 0..3 {
        client
            .apply_workload(request(&format!("flushed-{i}"), "r1"))
            .await
            .unwrap();
    }
    assert_eq!(agent.signal("TERM").await.code(), Some(0));
    let mut agent = start(&state).await;
    let mut client = plaintext_client(agent.port).await.unwrap();
    for i in 0..2 {
        client
            .apply_workload(request(&format!("journaled-{i}"), "r1"))
            .await
            .unwrap();
    }
    agent.signal("KILL").await;
    let mut agent = start(&state).await;
    agent.signal("KILL").await;
    state
}

/// Files under `dir` whose path relative to it matches `pattern` (a
/// simple `*` glob over one component each).
fn files_matching(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    fn matches(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, tail)) => {
                name.len() >= head.len() + tail.len()
                    && name.starts_with(head)
                    && name.ends_with(tail)
            }
        }
    }
    let (mut dir, mut pattern) = (dir.to_path_buf(), pattern);
    while let Some(rest) = pattern.strip_prefix("../") {
        dir = dir.parent().unwrap().to_path_buf();
        pattern = rest;
    }
    let mut found = vec![dir];
    for part in pattern.split('/') {
        found = found
            .into_iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .filter(|e| matches(part, &e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect();
    }
    found.sort();
    found
}

/// What a case does to a file.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Bytes overwritten in the middle.
    Flip,
    /// Cut to this many bytes.
    Truncate(u64),
    Remove,
    /// Replaced by this text.
    Garbage(&'static str),
}

fn damage(file: &Path, how: Damage) {
    use std::os::unix::fs::FileExt;
    match how {
        Damage::Flip => {
            let handle = std::fs::OpenOptions::new().write(true).open(file).unwrap();
            let len = handle.metadata().unwrap().len();
            handle.write_all_at(&[0xff; 8], len / 3).unwrap();
        }
        Damage::Truncate(len) => {
            std::fs::OpenOptions::new()
                .write(true)
                .open(file)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        Damage::Remove => std::fs::remove_file(file).unwrap(),
        Damage::Garbage(text) => std::fs::write(file, text).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_directory_stops_the_agent_naming_the_file_and_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let pristine = populated_state(dir.path()).await;
    let check = agent_command(&pristine)
        .args(["store", "check", "--state-dir"])
        .arg(&pristine)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(out.contains("is sound: 5 objects"), "{out}");

    // (what, file under the state directory or its key, damage, what the
    // message must name)
    let cases: &[(&str, &str, Damage, &str)] = &[
        ("journal bytes", "db/*.jnl", Damage::Flip, "journal"),
        (
            "journal truncated",
            "db/*.jnl",
            Damage::Truncate(0),
            "journal",
        ),
        ("journal lost", "db/*.jnl", Damage::Remove, "journal"),
        (
            "objects table bytes",
            "db/keyspaces/3/tables/*",
            Damage::Flip,
            "db/keyspaces",
        ),
        (
            "change-log table bytes",
            "db/keyspaces/2/tables/*",
            Damage::Flip,
            "db/keyspaces",
        ),
        (
            "table truncated",
            "db/keyspaces/2/tables/*",
            Damage::Truncate(1000),
            "db/keyspaces",
        ),
        (
            "table lost",
            "db/keyspaces/2/tables/*",
            Damage::Remove,
            "db/keyspaces",
        ),
        (
            "fjall's keyspace table bytes",
            "db/keyspaces/0/tables/*",
            Damage::Flip,
            "db/keyspaces",
        ),
        (
            "the store's meta table bytes",
            "db/keyspaces/1/tables/*",
            Damage::Flip,
            "db/keyspaces",
        ),
        (
            "version file bytes",
            "db/keyspaces/2/v*",
            Damage::Flip,
            "db/keyspaces",
        ),
        (
            "version file truncated",
            "db/keyspaces/2/v*",
            Damage::Truncate(10),
            "db/keyspaces",
        ),
        (
            "current version pointer",
            "db/keyspaces/2/current",
            Damage::Garbage("zzzz"),
            "db/keyspaces",
        ),
        (
            "a keyspace's current version pointer lost",
            "db/keyspaces/2/current",
            Damage::Remove,
            "db/keyspaces",
        ),
        (
            "the store's meta keyspace pointer lost",
            "db/keyspaces/1/current",
            Damage::Remove,
            "db/keyspaces",
        ),
        (
            "format marker",
            "db/version",
            Damage::Garbage("zz"),
            "db/version",
        ),
        (
            "format marker lost",
            "db/version",
            Damage::Remove,
            "db/version",
        ),
        (
            "the store's resource version",
            "persys.rv",
            Damage::Garbage("twelve"),
            "persys.rv",
        ),
        (
            "node key",
            "../state.key",
            Damage::Garbage("zz"),
            "state.key",
        ),
        ("node key lost", "../state.key", Damage::Remove, "state.key"),
    ];
    let mut wrong = Vec::new();
    for (i, (what, pattern, how, named)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case-{i}"));
        std::fs::create_dir(&case).unwrap();
        let state = case.join("state");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&pristine)
            .arg(&state)
            .status()
            .unwrap();
        assert!(copied.success());
        std::fs::copy(key_file(&pristine), key_file(&state)).unwrap();
        let files = files_matching(&state, pattern);
        assert!(!files.is_empty(), "{what}: no {pattern} in the state");
        for file in &files {
            damage(file, *how);
        }
        let (code, stderr) = run_to_exit(agent_command(&state));
        let fine = code == Some(1)
            && stderr.contains(named)
            && (stderr.contains("restore") || stderr.contains("Restore"))
            && !stderr.contains("panicked");
        if !fine {
            wrong.push(format!(
                "{what} ({pattern}, {how:?}): exit {code:?}, message:\n{stderr}"
            ));
        }
        let checked = agent_command(&state)
            .args(["store", "check"])
            .output()
            .unwrap();
        if checked.status.code() != Some(1) {
            wrong.push(format!(
                "{what}: `store check` exited {:?}:\n{}",
                checked.status.code(),
                String::from_utf8_lossy(&checked.stdout)
            ));
        }
        std::fs::remove_dir_all(&case).unwrap();
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[tokio::test]
async fn store_check_finds_records_that_do_not_open_and_objects_the_log_disagrees_with() {
    use persys_agent::store::{ApplyRequest, Caller, Store, StoreConfig, check};
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::new(dir.path().join("state"));
    let store = Store::open(config.clone()).unwrap();
    for id in ["a", "b", "c"] {
        store
            .apply(ApplyRequest {
                id: id.into(),
                workload_type: WorkloadType::Container,
                revision_id: String::new(),
                desired_state: DesiredState::Running,
                spec: request(id, "r1").spec.unwrap(),
                finalizers: Vec::new(),
                labels: Default::default(),
                caller: Caller::default(),
            })
            .await
            .unwrap();
    }
    store.close().await;
    drop(store);
    let report = check(&config).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!((report.objects, report.log_entries), (3, 3), "{report}");

    // Damage fjall itself cannot see: every checksum holds.
    {
        let db = fjall::Database::builder(config.path.join("db"))
            .open()
            .unwrap();
        let options = fjall::KeyspaceCreateOptions::default;
        let objects = db.keyspace("objects_sealed", options).unwrap();
        let log = db.keyspace("changelog_sealed", options).unwrap();
        objects.remove("c").unwrap();
        log.insert(2u64.to_be_bytes(), b"not a record".as_slice())
            .unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let report = check(&config).unwrap();
    assert!(!report.is_sound());
    let problems = report.problems.join("\n");
    assert!(problems.contains("log entry 2"), "{problems}");
    assert!(
        problems.contains("log entry 3 wrote object c, which is not stored"),
        "{problems}"
    );
}
