//! The in-place switch from the Go agent, end to end: a `state.db` written
//! with the real Go bbolt library in the Go agent's schema, a container, a
//! compose project and a libvirt domain started as the Go agent starts
//! them, then this agent started on the same `PERSYS_STATE_PATH`. Every
//! workload is imported, Running and adopted as it runs: the same
//! container, compose container and domain, none restarted, none doubled.

mod common;
#[path = "common/goagent.rs"]
mod goagent;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

const URI: &str = "qemu:///system";

fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into())
}

fn compose_binary() -> String {
    std::env::var("PERSYS_COMPOSE_BINARY").unwrap_or_else(|_| "docker-compose".to_string())
}

fn run(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn runtimes_available(test: &str) -> bool {
    let docker = Command::new("docker")
        .args(["image", "inspect", &test_image()])
        .output()
        .is_ok_and(|o| o.status.success());
    let libvirt = Command::new("virsh")
        .args(["-c", URI, "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !(docker && libvirt) {
        persys_test_support::skip(
            test,
            "the Docker engine with the test image and libvirtd",
            &format!("docker: {docker}, libvirt: {libvirt}"),
        );
    }
    docker && libvirt
}

/// Removes what the test started, whatever happened to the agent.
struct Cleanup {
    container: String,
    project: String,
    project_dir: std::path::PathBuf,
    domain: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        let mut words = compose_binary()
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>();
        let program = words.remove(0);
        let _ = Command::new(program)
            .args(words)
            .args(["-p", &self.project, "down", "-v", "--remove-orphans"])
            .current_dir(&self.project_dir)
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "destroy", &self.domain])
            .output();
        let _ = Command::new("virsh")
            .args(["-c", URI, "undefine", &self.domain])
            .output();
    }
}

/// A container as the Go agent runs one: named by the workload id, its
/// labels, the spec's restart policy, command then args.
fn run_container_as_go_agent(id: &str) {
    run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            id,
            "--label",
            "persys.managed=true",
            "--label",
            &format!("persys.workload_id={id}"),
            "--label",
            "persys.revision_id=rev-web-1",
            "--label",
            "team=web",
            "--env",
            "MODE=prod",
            "--restart",
            "unless-stopped",
            &test_image(),
            "sleep",
            "3600",
        ],
        None,
    );
}

/// A compose project as the Go agent runs one: its files in
/// `<root>/<id>/`, `docker-compose -p <id> up -d` from there.
fn run_compose_as_go_agent(root: &Path, id: &str) -> std::path::PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let compose = format!(
        "services:\n  web:\n    image: {}\n    command: [\"sleep\", \"3600\"]\n",
        test_image()
    );
    std::fs::write(dir.join("docker-compose.yml"), compose).unwrap();
    std::fs::write(dir.join(".env"), "GREETING=hello").unwrap();
    let mut words = compose_binary()
        .split_whitespace()
        .map(String::from)
        .collect::<Vec<_>>();
    let program = words.remove(0);
    let mut args: Vec<&str> = words.iter().map(String::as_str).collect();
    args.extend(["-p", id, "up", "-d"]);
    run(&program, &args, Some(&dir));
    dir
}

/// A domain as the Go agent defines one: named by the workload id, no
/// marks of its own (its host-passthrough CPU left out: qemu refuses it in
/// the nested guests these tests run in).
fn run_domain_as_go_agent(dir: &Path, id: &str) {
    let xml = format!(
        "<domain type='kvm'><name>{id}</name>\
         <memory unit='MiB'>64</memory><currentMemory unit='MiB'>64</currentMemory>\
         <vcpu placement='static'>1</vcpu>\
         <os><type arch='x86_64' machine='pc-q35-5.2'>hvm</type></os><features></features>\
         <clock offset='utc'></clock>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <serial type='pty'><target port='0'/></serial>\
         <console type='pty'><target type='serial' port='0'/></console></devices></domain>"
    );
    let file = dir.join(format!("{id}.xml"));
    std::fs::write(&file, xml).unwrap();
    run(
        "virsh",
        &["-c", URI, "define", file.to_str().unwrap()],
        None,
    );
    run("virsh", &["-c", URI, "start", id], None);
}

/// Each container's id and start time.
fn started(filter: &str) -> Vec<String> {
    let ids = run(
        "docker",
        &["ps", "-aq", "--no-trunc", "--filter", filter],
        None,
    );
    let mut found: Vec<String> = ids
        .lines()
        .map(|id| {
            run(
                "docker",
                &["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", id],
                None,
            )
        })
        .collect();
    found.sort();
    found
}

fn domid(name: &str) -> String {
    run("virsh", &["-c", URI, "domid", name], None)
}

async fn wait_running(api: &mut AgentServiceClient<Channel>, id: &str, agent: &AgentProcess) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = api
            .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
            .await
            .ok()
            .and_then(|r| r.into_inner().status);
        if status
            .as_ref()
            .is_some_and(|s| s.actual_state() == ActualState::Running)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not Running within 120 s: {status:?}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events(api: &mut AgentServiceClient<Channel>, id: &str) -> Vec<Event> {
    api.describe_workload(DescribeWorkloadRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .events
}

#[tokio::test]
async fn the_agent_takes_over_a_go_agents_node_in_place_with_no_restart_and_no_duplicate() {
    let test = "the_agent_takes_over_a_go_agents_node_in_place_with_no_restart_and_no_duplicate";
    if !runtimes_available(test) {
        return;
    }
    let Some(program) = goagent::fixture_program(test) else {
        return;
    };
    let prefix = format!("goup{}", std::process::id());
    let (web, shop, vm) = (
        format!("{prefix}-web"),
        format!("{prefix}-shop"),
        format!("{prefix}-vm"),
    );
    let root = tempfile::tempdir().unwrap();
    let persys = root.path().join("persys");
    std::fs::create_dir_all(&persys).unwrap();
    let state_db = persys.join("state.db");
    let _cleanup = Cleanup {
        container: web.clone(),
        project: shop.clone(),
        project_dir: persys.join("compose").join(&shop),
        domain: vm.clone(),
    };

    // The node as the Go agent leaves it.
    run(
        program.to_str().unwrap(),
        &[
            "-out",
            state_db.to_str().unwrap(),
            "-image",
            &test_image(),
            "-switch",
            &prefix,
        ],
        None,
    );
    let db_before = std::fs::read(&state_db).unwrap();
    run_container_as_go_agent(&web);
    run_compose_as_go_agent(&persys.join("compose"), &shop);
    run_domain_as_go_agent(root.path(), &vm);
    let web_before = started(&format!("name=^{web}$"));
    let shop_before = started(&format!("label=com.docker.compose.project={shop}"));
    let vm_before = domid(&vm);
    assert_eq!(web_before.len(), 1);
    assert_eq!(shop_before.len(), 1);

    // The switch: this agent on the Go agent's PERSYS_STATE_PATH.
    let certs = Certs::generate(&root.path().join("certs"));
    let agent = AgentProcess::start(
        &state_db,
        &certs,
        &[
            ("PERSYS_DOCKER_ENABLED", "true"),
            ("PERSYS_COMPOSE_ENABLED", "true"),
            ("PERSYS_VM_ENABLED", "true"),
            ("PERSYS_RECONCILE_INTERVAL", "10m"),
        ],
    )
    .await;
    let mut api = client(agent.port, &certs).await.unwrap();
    for id in [&web, &shop, &vm] {
        wait_running(&mut api, id, &agent).await;
        let events = events(&mut api, id).await;
        assert!(
            events.iter().any(|e| e.reason == "Imported"),
            "{id}: no Imported event in {events:?}"
        );
        assert!(
            !events.iter().any(|e| e.reason == "Replacing"),
            "{id} was replaced: {events:?}"
        );
    }

    // Adopted as they run: same ids, same start times, nothing doubled.
    assert_eq!(started(&format!("name=^{web}$")), web_before);
    assert_eq!(
        started(&format!("label=persys.workload-id={web}")),
        Vec::<String>::new(),
        "a second container for {web}"
    );
    assert_eq!(
        started(&format!("label=com.docker.compose.project={shop}")),
        shop_before
    );
    assert_eq!(domid(&vm), vm_before, "the domain was restarted");
    let domains = run("virsh", &["-c", URI, "list", "--all", "--name"], None);
    assert_eq!(domains.lines().filter(|d| d.contains(&prefix)).count(), 1);

    // The Go agent's file is left as it was, marked imported, and this
    // agent's state is in the directory beside it.
    assert_eq!(std::fs::read(&state_db).unwrap(), db_before);
    assert!(persys.join("state.db.imported").exists());
    assert!(persys.join("state").is_dir());

    // Deleting through this agent removes what it adopted.
    for id in [&web, &shop, &vm] {
        api.delete_workload(DeleteWorkloadRequest { id: id.to_string() })
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = api
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .workloads
            .len();
        let containers = started(&format!("name=^{web}$")).len()
            + started(&format!("label=com.docker.compose.project={shop}")).len();
        let domain = Command::new("virsh")
            .args(["-c", URI, "domstate", &vm])
            .output()
            .unwrap()
            .status
            .success();
        if left == 0 && containers == 0 && !domain {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left after delete: {left} workloads, {containers} containers, domain {domain}\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
