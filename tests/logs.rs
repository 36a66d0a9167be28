//! `persysctl logs` through the real agent binary on the real Docker
//! engine, docker-compose and libvirt: tail, stdout and stderr apart,
//! follow across a restart, compose services, a VM's serial console.

mod common;
#[path = "common/ctl.rs"]
mod ctl;
#[path = "common/docker.rs"]
mod docker;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use ctl::{Follower, Run, ctl, run};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

use docker::test_image;

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// True when the Docker engine answers with the test image (and, for
/// `compose`, docker-compose too); otherwise the test is skipped, or
/// fails in CI.
fn docker_available(test: &str, compose: bool) -> bool {
    let engine = succeeds("docker", &["image", "inspect", &test_image()]);
    let cli = !compose || succeeds("docker-compose", &["version"]);
    if !(engine && cli) {
        persys_test_support::skip(
            test,
            "the Docker engine, the test image or docker-compose",
            &format!(
                "`docker image inspect {}`: {engine}, `docker-compose version`: {cli}",
                test_image()
            ),
        );
    }
    engine && cli
}

fn libvirt_available(test: &str) -> bool {
    let ok = succeeds("virsh", &["-c", "qemu:///system", "version"]);
    if !ok {
        persys_test_support::skip(
            test,
            "libvirtd on qemu:///system",
            &"`virsh -c qemu:///system version` failed",
        );
    }
    ok
}

/// The platform's names, plus a viewer.
const POLICY: &str = "\
rules:
  - match: {cn: persys-scheduler}
    role: scheduler
  - match: {cn: persysctl}
    role: operator
  - match: {cn: persys-viewer}
    role: viewer
";

/// An agent with `env`, its certificates and a home for persysctl.
struct Fixture {
    dir: tempfile::TempDir,
    certs: Certs,
    agent: AgentProcess,
}

impl Fixture {
    async fn start(env: &[(&str, &str)]) -> Fixture {
        ctl::persysctl();
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::generate(&dir.path().join("certs"));
        let policy = dir.path().join("authz.yaml");
        std::fs::write(&policy, POLICY).unwrap();
        let mut env = env.to_vec();
        env.push(("PERSYS_RECONCILE_INTERVAL", "10m"));
        env.push(("PERSYS_AUTHZ_FILE", policy.to_str().unwrap()));
        let agent = AgentProcess::start(&dir.path().join("state"), &certs, &env).await;
        Fixture { dir, certs, agent }
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut command = ctl(&self.agent, &self.certs, &self.dir.path().join("home"));
        command.args(args);
        command
    }

    fn logs(&self, args: &[&str]) -> Run {
        let mut all = vec!["logs"];
        all.extend_from_slice(args);
        run(self.ctl(&all))
    }

    fn follow(&self, args: &[&str]) -> Follower {
        let mut all = vec!["logs"];
        all.extend_from_slice(args);
        Follower::spawn(self.ctl(&all))
    }

    async fn api(&self) -> AgentServiceClient<Channel> {
        client(self.agent.port, &self.certs).await.unwrap()
    }

    /// Waits up to 60 s for the workload's status to pass `condition`.
    async fn wait_status(
        &self,
        id: &str,
        what: &str,
        condition: impl Fn(&WorkloadStatus) -> bool,
    ) -> WorkloadStatus {
        let mut api = self.api().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(status) = api
                .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
                .await
                && let Some(status) = status.into_inner().status
                && condition(&status)
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: not {what} within 60 s:\n{}",
                self.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `logs args` until its output passes `done` (the runtime
    /// writes asynchronously), up to 60 s; that run.
    fn logs_until(&self, args: &[&str], done: impl Fn(&Run) -> bool) -> Run {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = self.logs(args);
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "logs {args:?} never showed what was expected; last run: {run:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes the workload and waits (up to 60 s) until it is gone with
    /// its runtime objects, so nothing outlives the test's agent.
    async fn delete(&self, id: &str) {
        let mut api = self.api().await;
        api.delete_workload(DeleteWorkloadRequest { id: id.into() })
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let gone = api
                .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
                .await
                .is_err_and(|e| e.code() == tonic::Code::NotFound);
            if gone {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: not deleted within 60 s:\n{}",
                self.agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn container(id: &str, script: &str) -> ApplyWorkloadRequest {
    docker::shell(id, &test_image(), &["sh", "-c", script])
}

fn numbered(from: u32, to: u32) -> String {
    (from..=to).map(|n| format!("line {n}\n")).collect()
}

#[tokio::test]
async fn logs_tail_prints_exactly_the_last_lines_with_stderr_kept_apart() {
    let test = "logs_tail_prints_exactly_the_last_lines_with_stderr_kept_apart";
    if !docker_available(test, false) {
        return;
    }
    let fixture = Fixture::start(&[("PERSYS_DOCKER_ENABLED", "true")]).await;
    let id = format!("logs-tail-{}", std::process::id());
    let mixed = format!("logs-mixed-{}", std::process::id());
    let script = "for i in $(seq 1 20); do echo \"line $i\"; done; exec sleep 3600";
    // The engine's two copiers may order an stderr line anywhere among
    // the stdout lines (and a tail counts both): another container.
    let both = "echo 'to stdout'; echo 'to stderr' >&2; exec sleep 3600";
    let mut api = fixture.api().await;
    api.apply_workload(container(&id, script)).await.unwrap();
    api.apply_workload(container(&mixed, both)).await.unwrap();
    for id in [&id, &mixed] {
        fixture
            .wait_status(id, "running", |s| s.actual_state() == ActualState::Running)
            .await;
    }
    let all = fixture.logs_until(&[&id], |run| run.stdout.contains("line 20\n"));
    assert_eq!(all.code, Some(0), "{all:?}");
    assert_eq!(all.stdout, numbered(1, 20));
    let apart = fixture.logs_until(&[&mixed], |run| {
        run.stdout.contains("to stdout") && run.stderr.contains("to stderr")
    });
    assert_eq!(apart.stdout, "to stdout\n", "stdout holds stdout only");
    assert_eq!(apart.stderr, "to stderr\n", "stderr holds stderr only");

    let tail = fixture.logs(&["--tail", "5", &id]);
    assert_eq!(tail.code, Some(0), "{tail:?}");
    assert_eq!(tail.stdout, numbered(16, 20));
    assert_eq!(tail.stderr, "");

    // Every line carries the engine's time when asked.
    let stamped = fixture.logs(&["--tail", "1", "--timestamps", &id]);
    let (time, line) = stamped.stdout.split_once(' ').unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok(),
        "{:?}",
        stamped.stdout
    );
    assert_eq!(line, "line 20\n");
    let later = fixture.logs(&["--since", "2099-01-01T00:00:00Z", &id]);
    assert_eq!(later.code, Some(1), "a time in the future: {later:?}");
    let recent = fixture.logs(&["--since", "1h", &id]);
    assert_eq!(recent.stdout, numbered(1, 20));

    // Ctrl-C ends a followed stream with status 0.
    let mut follower = fixture.follow(&["-f", "--tail", "1", &id]);
    follower.expect("line 20", Duration::from_secs(20));
    let sent = Command::new("kill")
        .args(["-INT", &follower_pid(&follower)])
        .status()
        .unwrap();
    assert!(sent.success());
    let (code, stderr) = follower.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{stderr}");

    // A viewer may read logs (and may not delete).
    let (cert, key) = fixture.certs.ca.leaf("persys-viewer", false);
    let viewer_cert = fixture.dir.path().join("viewer.crt");
    let viewer_key = fixture.dir.path().join("viewer.key");
    std::fs::write(&viewer_cert, cert).unwrap();
    std::fs::write(&viewer_key, key).unwrap();
    let as_viewer = |args: &[&str]| {
        let mut command = fixture.ctl(args);
        command
            .env("PERSYSCTL_CERT", &viewer_cert)
            .env("PERSYSCTL_KEY", &viewer_key);
        run(command)
    };
    let viewed = as_viewer(&["logs", "--tail", "2", &id]);
    assert_eq!(viewed.code, Some(0), "{viewed:?}");
    assert_eq!(viewed.stdout, numbered(19, 20));
    let refused = as_viewer(&["delete", &id]);
    assert_eq!(
        refused.code,
        Some(1),
        "a viewer may not delete: {refused:?}"
    );

    let missing = fixture.logs(&["no-such-workload"]);
    assert_eq!(missing.code, Some(1));
    assert_eq!(
        missing.stderr.trim(),
        "persysctl: workload no-such-workload not found"
    );
    fixture.delete(&id).await;
    fixture.delete(&mixed).await;
}

fn follower_pid(follower: &Follower) -> String {
    follower.pid().to_string()
}

#[tokio::test]
async fn logs_follow_carries_on_across_a_restart_and_ends_when_the_workload_is_deleted() {
    let test = "logs_follow_carries_on_across_a_restart_and_ends_when_the_workload_is_deleted";
    if !docker_available(test, false) {
        return;
    }
    let fixture = Fixture::start(&[("PERSYS_DOCKER_ENABLED", "true")]).await;
    let id = format!("logs-follow-{}", std::process::id());
    // Each start of the container counts itself in its own filesystem,
    // which a restart keeps.
    let script = "n=$(( $(cat /tmp/runs 2>/dev/null || echo 0) + 1 )); echo $n > /tmp/runs; \
                  for i in 1 2 3; do echo \"run $n line $i\"; done; exec sleep 3600";
    fixture
        .api()
        .await
        .apply_workload(container(&id, script))
        .await
        .unwrap();
    let running = fixture
        .wait_status(&id, "running", |s| s.actual_state() == ActualState::Running)
        .await;
    let mut follower = fixture.follow(&["-f", &id]);
    follower.expect("run 1 line 3", Duration::from_secs(20));

    // Killed out of band: the agent starts the container again, and the
    // stream goes on with the new run's lines.
    let container = running.metadata["runtime_ref"].clone();
    assert!(succeeds("docker", &["kill", &container]));
    follower.expect("run 2 line 3", Duration::from_secs(30));

    // Deleting the workload ends the stream, with status 0.
    fixture.delete(&id).await;
    let (code, stderr) = follower.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    let expected: Vec<String> = (1..=2)
        .flat_map(|run| (1..=3).map(move |line| format!("run {run} line {line}")))
        .collect();
    assert_eq!(follower.seen, expected, "no line lost or repeated");
}

#[tokio::test]
async fn compose_logs_prefix_every_service_and_show_one_when_asked() {
    let test = "compose_logs_prefix_every_service_and_show_one_when_asked";
    if !docker_available(test, true) {
        return;
    }
    let fixture = Fixture::start(&[
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_COMPOSE_ENABLED", "true"),
    ])
    .await;
    let id = format!("logs-compose-{}", std::process::id());
    let service = |name: &str| {
        format!(
            "  {name}:\n    image: {}\n    init: true\n    command: [\"sh\", \"-c\", \"echo {name} one; echo {name} two; echo {name} err >&2; exec sleep 3600\"]\n",
            test_image()
        )
    };
    let yaml = format!("services:\n{}{}", service("web"), service("db"));
    fixture
        .api()
        .await
        .apply_workload(ApplyWorkloadRequest {
            id: id.clone(),
            r#type: WorkloadType::Compose as i32,
            revision_id: String::new(),
            desired_state: DesiredState::Running as i32,
            spec: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                    compose_yaml: yaml,
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();
    fixture
        .wait_status(&id, "running", |s| s.actual_state() == ActualState::Running)
        .await;

    let all = fixture.logs_until(&[&id], |run| {
        run.stdout.contains("web | web two") && run.stdout.contains("db | db two")
    });
    let mut lines: Vec<&str> = all.stdout.lines().collect();
    // Each service's lines in its order; the services interleave by time.
    let web: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("web"))
        .collect();
    assert_eq!(web, ["web | web one", "web | web two"]);
    lines.sort();
    assert_eq!(
        lines,
        [
            "db | db one",
            "db | db two",
            "web | web one",
            "web | web two"
        ]
    );
    let mut errors: Vec<&str> = all.stderr.lines().collect();
    errors.sort();
    assert_eq!(errors, ["db | db err", "web | web err"]);

    let db = fixture.logs(&["--service", "db", &id]);
    assert_eq!(db.code, Some(0), "{db:?}");
    assert_eq!(db.stdout, "db one\ndb two\n", "one service, not prefixed");
    // The last line the engine recorded for web: stdout and stderr come
    // through two pipes, so `web err` may be recorded before or after
    // `web two`. The times (RFC 3339, always nine digits) order them.
    let stamped = fixture.logs(&["--service", "web", "--timestamps", &id]);
    assert_eq!(stamped.code, Some(0), "{stamped:?}");
    let (last, on_stderr) = stamped
        .stdout
        .lines()
        .map(|line| (line, false))
        .chain(stamped.stderr.lines().map(|line| (line, true)))
        .max_by(|a, b| a.0.cmp(b.0))
        .unwrap();
    let text = format!("{}\n", last.split_once(' ').unwrap().1);
    let expected = if on_stderr {
        (String::new(), text)
    } else {
        (text, String::new())
    };
    let tail = fixture.logs(&["--service", "web", "--tail", "1", &id]);
    assert_eq!(
        (tail.stdout, tail.stderr),
        expected,
        "exactly the last line"
    );

    let unknown = fixture.logs(&["--service", "cache", &id]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(
        unknown.stderr.contains("no service \"cache\"") && unknown.stderr.contains("db, web"),
        "names the services: {}",
        unknown.stderr
    );
    fixture.delete(&id).await;
}

#[tokio::test]
async fn a_vm_s_boot_output_on_its_serial_console_appears_in_logs() {
    let test = "a_vm_s_boot_output_on_its_serial_console_appears_in_logs";
    if !libvirt_available(test) {
        return;
    }
    let fixture = Fixture::start(&[
        ("PERSYS_VM_ENABLED", "true"),
        ("PERSYS_VM_STOP_TIMEOUT", "2s"),
    ])
    .await;
    let id = format!("logs-vm-{}", std::process::id());
    fixture
        .api()
        .await
        .apply_workload(ApplyWorkloadRequest {
            id: id.clone(),
            r#type: WorkloadType::Vm as i32,
            revision_id: String::new(),
            desired_state: DesiredState::Running as i32,
            spec: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Vm(VmSpec {
                    vcpus: 1,
                    memory_mb: 64,
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap();
    fixture
        .wait_status(&id, "running", |s| s.actual_state() == ActualState::Running)
        .await;
    // SeaBIOS greets on the serial console, then finds nothing to boot.
    let boot = fixture.logs_until(&[&id], |run| run.stdout.contains("SeaBIOS"));
    assert_eq!(boot.code, Some(0), "{boot:?}");
    assert!(!boot.stdout.contains('\r'), "lines end in a plain newline");
    let log = fixture
        .dir
        .path()
        .join(format!("state/vm/{id}/console.log"));
    assert!(log.exists(), "captured under the state directory");

    // Truncated in place, as the agent's rotation does: qemu appends, so
    // it carries on at the new start (no hole of zeros before it), and a
    // follower sees the firmware's next boot attempt (every 10 s).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    let mut follower = fixture.follow(&["-f", "--tail", "0", &id]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let attempts = |f: &Follower| f.seen.iter().filter(|l| l.contains("Booting")).count();
    while attempts(&follower) == 0 {
        assert!(
            Instant::now() < deadline,
            "no boot attempt followed: {:?}",
            follower.seen
        );
        follower.poll(Duration::from_secs(1));
    }
    let written = std::fs::read(&log).unwrap();
    assert!(
        !written.is_empty() && written[0] != 0,
        "qemu wrote at its old offset after the truncation: {:?}",
        String::from_utf8_lossy(&written[..written.len().min(64)])
    );
    fixture.delete(&id).await;
    let (code, stderr) = follower.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "deleting the VM ends the stream: {stderr}");
}
