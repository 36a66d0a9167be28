//! The agent binary across real restarts of the daemons it drives: dockerd
//! stopped and started under running workloads, libvirtd restarted under a
//! running domain, docker-compose missing and then installed. Each must
//! converge with one container or domain per workload (never a duplicate)
//! and lose none of the desired state.
//!
//! Nothing here may disturb the other tests of the workspace:
//! - dockerd: each test runs a private Docker engine of its own (own
//!   socket, data and exec roots, managed containerd, a bridge of its own,
//!   no iptables) with the test image loaded from the system engine, and
//!   points the agent (and so docker-compose) at it. Stopping it touches
//!   nothing else, so it runs wherever root and `dockerd` are.
//! - libvirtd: domains outlive the daemon, so the system one is restarted
//!   (once, for a few seconds). `cargo test` runs test binaries one after
//!   another, and the tests of this binary take [`SERIAL`] in turn, so
//!   nothing else of the suite runs meanwhile.
//!
//! Everything a test starts (the private engine and its directories, the
//! agent, domains) is removed by guards, also when the test fails; a
//! libvirtd the test stopped is started again by its guard.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

/// One test at a time in this binary: they restart daemons.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest any one step may take before the test fails.
const STEP: Duration = Duration::from_secs(60);

const LIBVIRT_URI: &str = "qemu:///system";

fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn stdout_of(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn is_root() -> bool {
    stdout_of("id", &["-u"]).trim() == "0"
}

/// Sends `signal` to one process, by its pid.
fn signal(pid: u32, signal: &str) -> bool {
    succeeds("kill", &[&format!("-{signal}"), &pid.to_string()])
}

/// Polls `check` until it answers `Some`, for at most [`STEP`].
async fn eventually<T, F, Fut>(what: &str, context: impl Fn() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {STEP:?}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// A private Docker engine
// ---------------------------------------------------------------------------

/// A dockerd of this test's own, with everything under a temporary
/// directory. Stopped, unmounted and removed when dropped.
/// The private engine's bridge, made by the test (the tests of this binary
/// run one at a time) and removed by [`PrivateDockerd`]'s drop.
const PRIVATE_BRIDGE: &str = "persys-pdbr0";
const PRIVATE_BRIDGE_ADDRESS: &str = "172.30.253.1/24";

struct PrivateDockerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateDockerd {
    /// Starts an engine with the test image loaded into it, or answers
    /// `None` when this machine cannot run one (the test is then skipped,
    /// or fails in CI).
    async fn start(test: &str) -> Option<PrivateDockerd> {
        let image = test_image();
        let missing = if !is_root() {
            Some("root (a private dockerd needs it)".to_string())
        } else if !succeeds("dockerd", &["--version"]) {
            Some("`dockerd --version` failed".to_string())
        } else if !succeeds("docker", &["image", "inspect", &image]) {
            Some(format!("`docker image inspect {image}` failed"))
        } else {
            None
        };
        if let Some(why) = missing {
            persys_test_support::skip(test, "the Docker engine, dockerd or the test image", &why);
            return None;
        }
        // Short: unix socket paths (containerd's under the exec root)
        // must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("persys-pd")
            .tempdir_in("/tmp")
            .unwrap();
        // A bridge of its own: dockerd told `--bridge none` deletes the
        // host's `docker0`, which the system engine needs.
        let _ = Command::new("ip")
            .args(["link", "del", PRIVATE_BRIDGE])
            .stderr(Stdio::null())
            .status();
        for args in [
            &["link", "add", PRIVATE_BRIDGE, "type", "bridge"][..],
            &["addr", "add", PRIVATE_BRIDGE_ADDRESS, "dev", PRIVATE_BRIDGE],
            &["link", "set", PRIVATE_BRIDGE, "up"],
        ] {
            assert!(succeeds("ip", args), "ip {}", args.join(" "));
        }
        let mut engine = PrivateDockerd { dir, child: None };
        engine.run().await;

        // The test image, from the system engine: there is no registry.
        let archive = engine.dir.path().join("image.tar");
        let archive = archive.to_str().unwrap();
        assert!(
            succeeds("docker", &["save", "-o", archive, &image]),
            "docker save {image}"
        );
        assert!(
            succeeds("docker", &["-H", &engine.host(), "load", "-i", archive]),
            "loading {image} into the private engine"
        );
        std::fs::remove_file(archive).unwrap();
        Some(engine)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `unix://…/docker.sock`: for DOCKER_HOST and `docker -H`.
    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    /// Starts dockerd and waits until it answers.
    async fn run(&mut self) {
        assert!(self.child.is_none(), "the private dockerd already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .unwrap();
        let path = |name: &str| self.path(name).display().to_string();
        let child = Command::new("dockerd")
            .args(["-H", &self.host()])
            .args(["--data-root", &path("data")])
            .args(["--exec-root", &path("exec")])
            .args(["--pidfile", &path("dockerd.pid")])
            .args(["--storage-driver", "overlay2"])
            // Nothing of the host's network: its own bridge (not `none`,
            // which deletes `docker0`), no rules, no sysctl.
            .args(["--bridge", PRIVATE_BRIDGE])
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            // Its own containerd (under the exec root): its own namespace.
            .args(["--containerd-namespace", "persys-test"])
            .args(["--containerd-plugins-namespace", "persys-test-plugins"])
            // The busybox sleepers ignore SIGTERM: a stop kills them at once.
            .args(["--shutdown-timeout", "1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
        let this = &*self;
        eventually(
            "the private dockerd answers",
            || this.log_tail(),
            move || async move { this.answers().then_some(()) },
        )
        .await;
    }

    /// Stops dockerd as systemd would (SIGTERM) and waits until it exited:
    /// its containers are stopped with it.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("the private dockerd runs");
        assert!(signal(child.id(), "TERM"), "SIGTERM to the private dockerd");
        let log = self.log_tail();
        eventually(
            "the private dockerd exits",
            || log.clone(),
            || {
                let exited = child.try_wait().unwrap().is_some();
                async move { exited.then_some(()) }
            },
        )
        .await;
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `docker -H <this engine> args…`, its stdout.
    fn docker(&self, args: &[&str]) -> String {
        let host = self.host();
        let mut all = vec!["-H", host.as_str()];
        all.extend_from_slice(args);
        stdout_of("docker", &all)
    }

    /// Whether the engine answers.
    fn answers(&self) -> bool {
        succeeds(
            "docker",
            &[
                "-H",
                &self.host(),
                "version",
                "--format",
                "{{.Server.Version}}",
            ],
        )
    }

    /// The ids of the containers the agent labelled as `id`'s, any state.
    fn containers_of(&self, id: &str) -> Vec<String> {
        self.docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=persys.workload-id={id}"),
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// (running, started at) of a container, as the engine says.
    fn state_of(&self, container: &str) -> (bool, String) {
        let out = self.docker(&[
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.StartedAt}}",
            container,
        ]);
        let (running, started) = out.trim().split_once(' ').unwrap_or(("", ""));
        (running == "true", started.to_string())
    }

    /// Processes started for this engine (its containerd, shims) that are
    /// still there: the exec root is on their command line.
    fn leftover_processes(&self) -> Vec<u32> {
        let needle = self.path("exec").display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
                && String::from_utf8_lossy(&cmdline).contains(&needle)
            {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A dockerd that died hard leaves its containerd and shims behind.
        for pid in self.leftover_processes() {
            signal(pid, "KILL");
        }
        // And mounts (overlays, shm, the exec root's netns): deepest first.
        let root = self.dir.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", PRIVATE_BRIDGE])
            .status();
        // The TempDir removes the directory.
    }
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

struct Agent {
    process: AgentProcess,
    api: AgentServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::generate(&dir.path().join("certs"));
        let process = AgentProcess::start(&dir.path().join("state"), &certs, env).await;
        let api = client(process.port, &certs).await.unwrap();
        Agent {
            process,
            api,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.process.log_text()
    }

    /// Applies `spec` as workload `id` (desired: running).
    async fn apply(&mut self, id: &str, spec: workload_spec::Spec) {
        let applied = self
            .api
            .apply_workload(ApplyWorkloadRequest {
                id: id.into(),
                r#type: match spec {
                    workload_spec::Spec::Container(_) => WorkloadType::Container,
                    workload_spec::Spec::Compose(_) => WorkloadType::Compose,
                    workload_spec::Spec::Vm(_) => WorkloadType::Vm,
                } as i32,
                revision_id: String::new(),
                desired_state: DesiredState::Running as i32,
                spec: Some(WorkloadSpec { spec: Some(spec) }),
            })
            .await
            .unwrap_or_else(|e| panic!("apply {id}: {e}"))
            .into_inner();
        assert!(applied.applied, "apply {id}: {applied:?}");
    }

    /// The stored object: metadata, desired state and spec, status.
    async fn describe(&mut self, id: &str) -> Option<Workload> {
        self.api
            .describe_workload(DescribeWorkloadRequest { id: id.into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().workload)
    }

    /// Waits until `id`'s stored object satisfies `condition`.
    async fn wait_for(
        &mut self,
        id: &str,
        what: &str,
        condition: impl Fn(&Workload) -> bool,
    ) -> Workload {
        let mut last = None;
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(workload) = self.describe(id).await {
                if condition(&workload) {
                    return workload;
                }
                last = Some(workload);
            }
            assert!(
                Instant::now() < deadline,
                "{id}: not {what} within {STEP:?}; last seen: {:?}\nagent log:\n{}",
                last.as_ref().map(|w| &w.status),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The ids of every stored workload.
    async fn ids(&mut self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .api
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .workloads
            .into_iter()
            .map(|w| w.id)
            .collect();
        ids.sort();
        ids
    }

    /// HealthCheck's word on each runtime.
    async fn runtime_status(&mut self) -> std::collections::HashMap<String, String> {
        self.api
            .health_check(HealthCheckRequest {})
            .await
            .map(|r| r.into_inner().runtime_status.into_iter().collect())
            .unwrap_or_default()
    }

    /// Waits until HealthCheck's word on `runtime` satisfies `condition`
    /// (the agent probes its runtimes every few seconds).
    async fn wait_runtime(&mut self, runtime: &str, what: &str, condition: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + STEP;
        loop {
            let runtimes = self.runtime_status().await;
            if runtimes.get(runtime).is_some_and(|s| condition(s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "HealthCheck: {runtime} not {what} within {STEP:?}: {runtimes:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes `id` and waits until the agent has removed it.
    async fn delete(&mut self, id: &str) {
        self.api
            .delete_workload(DeleteWorkloadRequest { id: id.into() })
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
        let deadline = Instant::now() + STEP;
        while self.describe(id).await.is_some() {
            assert!(
                Instant::now() < deadline,
                "{id}: not deleted within {STEP:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn status(w: &Workload) -> ObjectStatus {
    w.status.clone().unwrap_or_default()
}

/// Running, as observed for the workload's current generation.
fn running(w: &Workload) -> bool {
    let s = status(w);
    s.actual_state() == ActualState::Running && s.observed_generation == w.generation()
}

/// What the agent must never lose: identity, generation, desired state and
/// spec.
fn desired(w: &Workload) -> (String, String, i64, Option<ObjectSpec>) {
    let meta = w.metadata.clone().unwrap_or_default();
    (meta.id, meta.uid, meta.generation, w.spec.clone())
}

fn sleeper() -> workload_spec::Spec {
    workload_spec::Spec::Container(ContainerSpec {
        image: test_image(),
        command: vec!["sleep".into()],
        args: vec!["3600".into()],
        stop_grace_period_seconds: 1,
        ..Default::default()
    })
}

/// A one-service project (`web`) on no network: nothing on the host's.
fn compose_project(project: &str) -> workload_spec::Spec {
    workload_spec::Spec::Compose(ComposeSpec {
        probes: Default::default(),
        project_name: project.into(),
        compose_yaml: format!(
            "services:\n  web:\n    image: {}\n    init: true\n    network_mode: none\n    command: [\"sleep\", \"3600\"]\n",
            test_image()
        ),
        env: Default::default(),
    })
}

fn docker_env(engine: &PrivateDockerd) -> Vec<(&'static str, String)> {
    vec![
        ("PERSYS_DOCKER_ENABLED", "true".into()),
        ("PERSYS_COMPOSE_ENABLED", "true".into()),
        ("DOCKER_HOST", engine.host()),
        // Long: convergence after a restart must come from the agent
        // noticing the engine is back, not from a periodic resync.
        ("PERSYS_RECONCILE_INTERVAL", "10m".into()),
    ]
}

fn as_env<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// ---------------------------------------------------------------------------
// dockerd
// ---------------------------------------------------------------------------

#[tokio::test]
async fn container_and_compose_workloads_run_again_once_each_after_dockerd_restarts() {
    let test = "container_and_compose_workloads_run_again_once_each_after_dockerd_restarts";
    let _serial = SERIAL.lock().await;
    if !compose_on_path(test) {
        return;
    }
    let host_bridge = succeeds("ip", &["link", "show", "docker0"]);
    let Some(mut engine) = PrivateDockerd::start(test).await else {
        return;
    };
    let env = docker_env(&engine);
    let mut agent = Agent::start(&as_env(&env)).await;
    let pid = std::process::id();
    let container = format!("restart-{pid}-c");
    let compose = format!("restart-{pid}-p");
    let project = format!("persys-restart-{pid}");
    let late = format!("restart-{pid}-late");

    agent.apply(&container, sleeper()).await;
    agent.apply(&compose, compose_project(&project)).await;
    let mut before = Vec::new();
    for id in [&container, &compose] {
        let w = agent.wait_for(id, "running", running).await;
        let found = engine.containers_of(id);
        assert_eq!(found.len(), 1, "{id}: one container: {found:?}");
        let (up, started) = engine.state_of(&found[0]);
        assert!(up, "{id}: its container runs");
        before.push((desired(&w), found[0].clone(), started));
    }

    let down = Instant::now();
    engine.stop().await;
    assert!(!engine.answers(), "the engine is down");
    // The agent says so, and still takes applies.
    agent
        .wait_runtime("docker", "unhealthy", |s| s != "healthy")
        .await;
    agent.apply(&late, sleeper()).await;
    engine.run().await;
    let back = Instant::now();

    for (id, (desired_before, container_before, started_before)) in
        [&container, &compose].into_iter().zip(before)
    {
        let w = agent
            .wait_for(id, "running again", |w| {
                running(w) && {
                    let found = engine.containers_of(id);
                    found.len() == 1 && {
                        let (up, started) = engine.state_of(&found[0]);
                        up && started != started_before
                    }
                }
            })
            .await;
        assert_eq!(desired(&w), desired_before, "{id}: desired state kept");
        assert_eq!(
            engine.containers_of(id),
            std::slice::from_ref(&container_before),
            "{id}: the same container, started again, and no other"
        );
        assert_eq!(
            status(&w).runtime_ref,
            if id == &compose {
                project.clone()
            } else {
                container_before
            },
            "{id}: status names what runs"
        );
    }
    agent.wait_for(&late, "running", running).await;
    assert_eq!(
        engine.containers_of(&late).len(),
        1,
        "{late}: one container"
    );
    eprintln!(
        "dockerd down for {:?}; all three workloads running {:?} after it answered",
        back - down,
        back.elapsed()
    );

    let mut ids = vec![container.clone(), compose.clone(), late.clone()];
    ids.sort();
    assert_eq!(agent.ids().await, ids, "every workload kept, none added");
    // The runtimes are probed every few seconds: the workloads may be back
    // before the next probe.
    agent
        .wait_runtime("docker", "healthy again", |s| s == "healthy")
        .await;

    for id in &ids {
        agent.delete(id).await;
        assert!(engine.containers_of(id).is_empty(), "{id}: removed");
    }
    // The private engine left the system engine's network alone.
    assert_eq!(
        succeeds("ip", &["link", "show", "docker0"]),
        host_bridge,
        "the host's docker0 bridge is as it was"
    );
}

// ---------------------------------------------------------------------------
// docker-compose missing, then installed
// ---------------------------------------------------------------------------

/// The docker-compose on PATH, or skipped (fails in CI).
fn compose_on_path(test: &str) -> bool {
    let ok = succeeds("docker-compose", &["version", "--short"]);
    if !ok {
        persys_test_support::skip(test, "docker-compose", &"`docker-compose version` failed");
    }
    ok
}

fn which(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

#[tokio::test]
async fn a_compose_workload_says_compose_is_missing_and_runs_once_it_is_installed() {
    let test = "a_compose_workload_says_compose_is_missing_and_runs_once_it_is_installed";
    let _serial = SERIAL.lock().await;
    if !compose_on_path(test) {
        return;
    }
    let Some(engine) = PrivateDockerd::start(test).await else {
        return;
    };
    // The agent's PATH is one empty directory: neither `docker compose`
    // nor `docker-compose` is found, until docker-compose is put there.
    let bin = engine.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let mut env = docker_env(&engine);
    env.push(("PATH", bin.display().to_string()));
    let mut agent = Agent::start(&as_env(&env)).await;
    let agent_pid = agent.process.child.id();
    let pid = std::process::id();
    let id = format!("nocompose-{pid}");
    let project = format!("persys-nocompose-{pid}");

    agent.apply(&id, compose_project(&project)).await;
    let failed = agent
        .wait_for(&id, "failed for want of compose", |w| {
            status(w).actual_state() == ActualState::Failed
        })
        .await;
    let failed_status = status(&failed);
    assert_eq!(
        failed_status.failure_reason, "RUNTIME_ERROR",
        "{failed_status:?}"
    );
    assert!(!failed_status.retry_terminal, "retried: {failed_status:?}");
    for word in ["no compose binary", "docker-compose"] {
        assert!(
            failed_status.message.contains(word),
            "the status says compose is missing ({word}): {failed_status:?}"
        );
    }
    agent
        .wait_runtime("compose", "naming the missing docker-compose", |s| {
            s.contains("docker-compose")
        })
        .await;
    assert!(engine.containers_of(&id).is_empty(), "nothing ran");

    // docker-compose is installed; the agent is not restarted.
    std::os::unix::fs::symlink(which("docker-compose"), bin.join("docker-compose")).unwrap();
    let installed = Instant::now();
    let w = agent.wait_for(&id, "running", running).await;
    eprintln!(
        "running {:?} after docker-compose was installed",
        installed.elapsed()
    );
    assert!(
        agent
            .log()
            .contains("compose CLI found: reconciling every compose workload"),
        "finding compose queued the compose workloads at once:\n{}",
        agent.log()
    );
    assert_eq!(desired(&w), desired(&failed), "desired state kept");
    assert_eq!(engine.containers_of(&id).len(), 1, "one container");
    assert!(
        agent.process.child.try_wait().unwrap().is_none() && agent.process.child.id() == agent_pid,
        "the same agent process"
    );
    agent
        .wait_runtime("compose", "healthy", |s| s == "healthy")
        .await;

    agent.delete(&id).await;
    assert!(engine.containers_of(&id).is_empty(), "removed");
}

// ---------------------------------------------------------------------------
// libvirtd
// ---------------------------------------------------------------------------

fn virsh(args: &[&str]) -> Option<String> {
    let output = Command::new("virsh")
        .args(["-c", LIBVIRT_URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// How many defined domains are called `name`, and their state and id.
fn domains_named(name: &str) -> usize {
    virsh(&["list", "--all", "--name"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim() == name)
        .count()
}

/// The libvirt daemon the qemu driver runs in here: monolithic libvirtd,
/// or the modular virtqemud.
struct LibvirtDaemon {
    name: &'static str,
    argv: Vec<String>,
    /// The pid it had when found.
    pid: u32,
    /// False from this test's stop until its start.
    running: bool,
}

impl LibvirtDaemon {
    fn find() -> Option<LibvirtDaemon> {
        ["libvirtd", "virtqemud"].into_iter().find_map(|name| {
            let pid: u32 = std::fs::read_to_string(format!("/var/run/{name}.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect();
            argv.first()
                .is_some_and(|a| a.ends_with(name))
                .then_some(LibvirtDaemon {
                    name,
                    argv,
                    pid,
                    running: true,
                })
        })
    }

    /// SIGTERM, as systemd stops it, and waits until it is gone. Its
    /// domains keep running.
    async fn stop(&mut self) {
        let pid = self.pid;
        self.running = false;
        assert!(signal(pid, "TERM"), "SIGTERM to {} ({pid})", self.name);
        eventually("the libvirt daemon exits", String::new, || async move {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .await;
    }

    /// Starts it again with the command line it had, detached (own
    /// session, output to its log) as hack/runtimes-up.sh starts it.
    /// False when it could not be started.
    fn spawn(&mut self) -> bool {
        let Ok(log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("/var/log/persys-{}.log", self.name))
        else {
            return false;
        };
        let Ok(out) = log.try_clone() else {
            return false;
        };
        let started = Command::new("setsid")
            .arg("-f")
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .status()
            .is_ok_and(|s| s.success());
        self.running |= started;
        started
    }

    async fn start(&mut self) {
        assert!(self.spawn(), "setsid -f {:?}", self.argv);
        eventually("libvirt answers again", String::new, || async {
            virsh(&["version"]).map(|_| ())
        })
        .await;
    }
}

impl Drop for LibvirtDaemon {
    fn drop(&mut self) {
        // Stopped by a test that then failed: never leave the node without.
        if self.running {
            return;
        }
        let deadline = Instant::now() + STEP;
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.spawn() {
            while virsh(&["version"]).is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Domains this test may have left: destroyed and undefined on drop, and
/// their qemu logs removed.
struct Domains(Vec<String>);

impl Drop for Domains {
    fn drop(&mut self) {
        for name in &self.0 {
            if domains_named(name) > 0 {
                let _ = virsh(&["destroy", name]);
                let _ =
                    virsh(&["undefine", name, "--nvram"]).or_else(|| virsh(&["undefine", name]));
            }
            // libvirt keeps each domain's qemu log.
            let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{name}.log"));
        }
    }
}

fn vm() -> workload_spec::Spec {
    workload_spec::Spec::Vm(VmSpec {
        vcpus: 1,
        memory_mb: 64,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_running_domain_stays_one_running_domain_across_a_libvirtd_restart() {
    let test = "a_running_domain_stays_one_running_domain_across_a_libvirtd_restart";
    let _serial = SERIAL.lock().await;
    if virsh(&["version"]).is_none() || !is_root() {
        persys_test_support::skip(
            test,
            "libvirtd on qemu:///system (and root, to restart it)",
            &"`virsh -c qemu:///system version` failed, or not root",
        );
        return;
    }
    let pid = std::process::id();
    let first = format!("librestart-{pid}-a");
    let late = format!("librestart-{pid}-b");
    // Before the daemon's guard, so dropped after it: the domains are
    // removed once a libvirtd the test stopped runs again.
    let _domains = Domains(vec![first.clone(), late.clone()]);
    let Some(mut daemon) = LibvirtDaemon::find() else {
        persys_test_support::skip(
            test,
            "a libvirtd or virqemud with a pid file",
            &"no /var/run/libvirtd.pid or /var/run/virtqemud.pid naming a live daemon",
        );
        return;
    };
    let mut agent = Agent::start(&[
        ("PERSYS_VM_ENABLED", "true"),
        ("PERSYS_RECONCILE_INTERVAL", "10m"),
        ("PERSYS_VM_STOP_TIMEOUT", "2s"),
    ])
    .await;

    agent.apply(&first, vm()).await;
    let before = agent
        .wait_for(&first, "running", |w| {
            running(w) && virsh(&["domstate", &first]).as_deref() == Some("running")
        })
        .await;
    let uuid = virsh(&["domuuid", &first]).unwrap();
    let domid = virsh(&["domid", &first]).unwrap();
    assert_eq!(status(&before).runtime_ref, uuid, "status names the domain");

    let down = Instant::now();
    daemon.stop().await;
    // Down: the agent says so, and stores what is applied meanwhile.
    agent
        .wait_runtime("vm", "unhealthy", |s| s != "healthy")
        .await;
    agent.apply(&late, vm()).await;
    daemon.start().await;
    let back = Instant::now();

    let after = agent
        .wait_for(&late, "running once libvirtd is back", |w| {
            running(w) && virsh(&["domstate", &late]).as_deref() == Some("running")
        })
        .await;
    eprintln!(
        "{} down for {:?}; the VM applied meanwhile running {:?} after it answered",
        daemon.name,
        back - down,
        back.elapsed()
    );
    assert_eq!(domains_named(&late), 1, "{late}: one domain");
    assert_eq!(
        status(&after).runtime_ref,
        virsh(&["domuuid", &late]).unwrap()
    );

    let kept = agent.wait_for(&first, "running", running).await;
    assert_eq!(desired(&kept), desired(&before), "desired state kept");
    assert_eq!(domains_named(&first), 1, "{first}: one domain");
    assert_eq!(virsh(&["domstate", &first]).as_deref(), Some("running"));
    assert_eq!(
        (
            virsh(&["domuuid", &first]).unwrap(),
            virsh(&["domid", &first]).unwrap()
        ),
        (uuid.clone(), domid),
        "{first}: the same domain, never restarted"
    );
    assert_eq!(status(&kept).runtime_ref, uuid);
    let mut ids = vec![first.clone(), late.clone()];
    ids.sort();
    assert_eq!(agent.ids().await, ids, "every workload kept, none added");
    agent
        .wait_runtime("vm", "healthy", |s| s == "healthy")
        .await;

    for id in &ids {
        agent.delete(id).await;
        assert_eq!(domains_named(id), 0, "{id}: undefined");
    }
}
