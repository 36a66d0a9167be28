//! persysctl, run as a user runs it: the real binary against a real agent
//! over mutual TLS (and once in plaintext).

mod common;
#[path = "common/ctl.rs"]
mod ctl;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{AgentProcess, Authority, Certs, UNREACHABLE_RUNTIMES, client};
use ctl::persysctl;
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

/// The words of the ACTUAL column. A runtime's controller may already have
/// written a status (Unknown while its engine is unreachable), so tests
/// that run nothing accept any of them there.
const STATES: &[&str] = &[
    "Pending",
    "Running",
    "Stopped",
    "Failed",
    "Unknown",
    "Terminating",
];

fn assert_state(word: &str, context: &str) {
    assert!(STATES.contains(&word), "{word:?} is no state: {context}");
}

struct Fixture {
    dir: tempfile::TempDir,
    certs: Certs,
    agent: AgentProcess,
}

async fn start(env: &[(&str, &str)]) -> Fixture {
    // Built (or found fresh) before the agent starts, so a first build's
    // minutes do not count against any of the test's deadlines.
    persysctl();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(&dir.path().join("state"), &certs, env).await;
    std::fs::create_dir_all(dir.path().join("home")).unwrap();
    Fixture { dir, certs, agent }
}

/// What a finished persysctl run left.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Standard output of a successful run.
    fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// The one error line of a run that failed with `code`.
    fn failed(self, code: i32) -> String {
        assert_eq!(
            self.code,
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        if code == 1 {
            assert_eq!(self.stderr.lines().count(), 1, "one line:\n{}", self.stderr);
            assert!(self.stderr.starts_with("persysctl: "), "{}", self.stderr);
        }
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self.stderr.trim_end().to_string()
    }
}

impl Fixture {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// persysctl pointed at the agent with the test certificates, in an
    /// environment of its own.
    fn ctl(&self) -> Command {
        let mut command = Command::new(persysctl());
        self.configure(&mut command);
        command
    }

    /// The environment of [`Fixture::ctl`], for a command that runs
    /// persysctl itself.
    fn configure(&self, command: &mut Command) {
        isolate(command, &self.home());
        command
            .env("PERSYSCTL_SERVER", self.agent.endpoint())
            .env("PERSYSCTL_CA", self.certs.dir.join("ca.crt"))
            .env("PERSYSCTL_CERT", self.certs.dir.join("client.crt"))
            .env("PERSYSCTL_KEY", self.certs.dir.join("client.key"));
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.ctl().args(args).output().unwrap())
    }

    fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .ctl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        Run::from(child.wait_with_output().unwrap())
    }

    /// Writes a file under the fixture's directory.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn apply(&self, name: &str, manifest: &str) -> String {
        let path = self.write(name, manifest);
        self.run(&["apply", "-f", path.to_str().unwrap()]).ok()
    }

    async fn client(&self) -> AgentServiceClient<Channel> {
        client(self.agent.port, &self.certs).await.unwrap()
    }

    /// Starts a long-running persysctl (watch, get -w).
    fn follow(&self, args: &[&str]) -> Follower {
        Follower::spawn(self.ctl().args(args))
    }
}

/// persysctl with nothing but PATH and HOME in its environment.
fn bare_ctl(home: &Path) -> Command {
    let mut command = Command::new(persysctl());
    isolate(&mut command, home);
    command
}

/// Nothing of the test's environment but PATH, and a home of its own.
fn isolate(command: &mut Command, home: &Path) {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .stdin(Stdio::null());
}

/// A persysctl that runs until interrupted; its output read line by line.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn spawn(command: &mut Command) -> Follower {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to 20 s for a line with every one of `words` (as whole
    /// columns), and returns it.
    fn expect(&mut self, words: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let columns: Vec<&str> = line.split_whitespace().collect();
                    if words.iter().all(|w| columns.contains(w)) {
                        return line;
                    }
                }
                Err(_) => {
                    let stderr = self.stop_and_read_stderr();
                    panic!(
                        "no line with {words:?} within 20 s; saw:\n{}\nstderr:\n{stderr}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    fn stop_and_read_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        stderr
    }

    /// Ctrl-C, then the exit status and what it wrote to stderr.
    fn interrupt(mut self) -> (Option<i32>, String) {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
                }
                return (status.code(), stderr);
            }
            assert!(Instant::now() < deadline, "persysctl ignored Ctrl-C");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const THREE_KINDS: &str = "\
# a container, a compose project and a VM
id: web
type: container
revision_id: r1
spec:
  image: nginx:1
  ports:
  - host_port: 8080
    container_port: 80
---
id: stack
type: compose
spec:
  project_name: stack
  compose_file: files/compose.yaml
---
id: vm1
type: vm
desired_state: stopped
spec:
  vcpus: 1
  memory_mb: 256
";

const COMPOSE_FILE: &str = "services:\n  web:\n    image: persys-test/busybox:latest\n";

async fn describe(client: &mut AgentServiceClient<Channel>, id: &str) -> Workload {
    client
        .describe_workload(DescribeWorkloadRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .workload
        .unwrap()
}

async fn ids(client: &mut AgentServiceClient<Channel>) -> Vec<String> {
    client
        .list_workloads(ListWorkloadsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workloads
        .into_iter()
        .map(|w| w.id)
        .collect()
}

#[tokio::test]
async fn apply_prints_applied_then_unchanged_for_every_document_of_a_stream() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.write("manifests/files/compose.yaml", COMPOSE_FILE);
    let out = f.apply("manifests/all.yaml", THREE_KINDS);
    assert_eq!(out, "web applied\nstack applied\nvm1 applied\n");

    let mut client = f.client().await;
    let stack = describe(&mut client, "stack").await;
    assert_eq!(stack.workload_type(), WorkloadType::Compose);
    let Some(workload_spec::Spec::Compose(compose)) = stack.workload_spec() else {
        panic!("{stack:?}");
    };
    assert_eq!(
        persys_api::compose_file_text(&compose.compose_yaml).unwrap(),
        COMPOSE_FILE,
        "compose_file is read relative to the manifest"
    );
    assert!(!compose.compose_yaml.contains(':'), "sent as base64");
    let vm = describe(&mut client, "vm1").await;
    assert_eq!(vm.desired_state(), DesiredState::Stopped);
    let web = describe(&mut client, "web").await;
    assert_eq!(web.revision_id(), "r1");

    let again = f.apply("manifests/all.yaml", THREE_KINDS);
    assert_eq!(again, "web unchanged\nstack unchanged\nvm1 unchanged\n");
    let changed = f.apply(
        "manifests/web.yaml",
        "id: web\ntype: container\nrevision_id: r2\nspec: {image: 'nginx:2'}\n",
    );
    assert_eq!(changed, "web applied\n");
    assert_eq!(describe(&mut client, "web").await.generation(), 2);
}

#[tokio::test]
async fn apply_reads_a_json_array_from_standard_input() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    let json = r#"[
        {"id": "a", "type": "container", "spec": {"image": "nginx:1"}},
        {"id": "b", "type": "vm", "desired_state": "running", "spec": {"vcpus": 1, "memory_mb": 128}}
    ]"#;
    let out = f.run_with_stdin(&["apply", "-f", "-"], json).ok();
    assert_eq!(out, "a applied\nb applied\n");
    assert_eq!(ids(&mut f.client().await).await, ["a", "b"]);
}

#[tokio::test]
async fn a_broken_manifest_names_file_line_and_column_and_applies_nothing() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    // A valid first document does not go out when a later one is broken.
    let syntax = f.write(
        "syntax.yaml",
        "id: ok\ntype: container\nspec: {image: nginx}\n---\nid: web\ntype: container\nspec:\n  image: [nginx\n",
    );
    let error = f.run(&["apply", "-f", syntax.to_str().unwrap()]).failed(1);
    assert!(
        error.starts_with(&format!("persysctl: {}:9:1: ", syntax.display())),
        "{error}"
    );

    let typed = f.write(
        "typed.yaml",
        "id: vm1\ntype: vm\nspec:\n  vcpus: many\n  memory_mb: 128\n",
    );
    let error = f.run(&["apply", "-f", typed.to_str().unwrap()]).failed(1);
    assert!(
        error.starts_with(&format!("persysctl: {}:4:10: ", typed.display())),
        "{error}"
    );
    assert!(error.contains("spec.vcpus"), "{error}");

    let json = f.write(
        "bad.json",
        "{\"id\": \"a\",\n \"type\": \"container\",\n \"spec\": {\"image\": 5}}\n",
    );
    let error = f.run(&["apply", "-f", json.to_str().unwrap()]).failed(1);
    assert!(
        error.starts_with(&format!("persysctl: {}:3:", json.display())),
        "{error}"
    );
    assert!(ids(&mut f.client().await).await.is_empty());
}

fn billion_laughs() -> String {
    persys_test_support::billion_laughs(
        "x-",
        "id: web\ntype: container\nspec:\n  image: nginx\n  args: *i\n",
    )
}

#[tokio::test]
async fn a_billion_laughs_manifest_is_refused_naming_the_file_and_the_bound() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    let bomb = billion_laughs();
    assert!(bomb.len() < 1024);
    let path = f.write("laughs.yaml", &bomb);
    // Expanded, it would be about a billion strings: an answer at all
    // means it was refused within its bounds.
    let error = f.run(&["apply", "-f", path.to_str().unwrap()]).failed(1);
    assert!(
        error.starts_with(&format!("persysctl: {}: is refused: ", path.display())),
        "{error}"
    );
    assert!(error.contains("manifest"), "{error}");
    let error = f.run_with_stdin(&["apply", "-f", "-"], &bomb).failed(1);
    assert!(
        error.starts_with("persysctl: <stdin>: is refused: "),
        "{error}"
    );
    let big = f.write(
        "big.yaml",
        &format!(
            "id: web\ntype: container\nspec: {{image: nginx}}\n# {}\n",
            "x".repeat(4 << 20)
        ),
    );
    let error = f.run(&["apply", "-f", big.to_str().unwrap()]).failed(1);
    assert!(
        error.ends_with("is refused: it is over the 4194304-byte limit for a manifest"),
        "{error}"
    );
    assert!(ids(&mut f.client().await).await.is_empty());
}

#[tokio::test]
async fn unknown_fields_are_refused_naming_them() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    let path = f.write(
        "typo.yaml",
        "id: web\ntype: container\nrevison_id: r1\nspec:\n  imagee: nginx:1\n  ports:\n  - hostport: 80\n",
    );
    let error = f.run(&["apply", "-f", path.to_str().unwrap()]).failed(1);
    for field in ["revison_id", "spec.imagee", "spec.ports.0.hostport"] {
        assert!(error.contains(field), "{field}: {error}");
    }
    assert!(error.contains("web"), "{error}");
    assert!(ids(&mut f.client().await).await.is_empty());
}

#[tokio::test]
async fn a_refused_apply_prints_the_agents_message() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "r1.yaml",
        "id: web\ntype: container\nrevision_id: r1\nspec: {image: 'nginx:1'}\n",
    );
    let path = f.write(
        "r1-again.yaml",
        "id: web\ntype: container\nrevision_id: r1\nspec: {image: 'nginx:2'}\n",
    );
    let error = f.run(&["apply", "-f", path.to_str().unwrap()]).failed(1);
    assert!(error.starts_with("persysctl: web: refused: "), "{error}");
    assert!(error.contains("revision r1"), "{error}");

    // One refused among several: the others are applied, each refusal named.
    let path = f.write(
        "mixed.yaml",
        "id: Bad/Id\ntype: container\nspec: {image: nginx}\n---\nid: good\ntype: container\nspec: {image: nginx}\n",
    );
    let run = f.run(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stdout, "good applied\n");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stderr);
    assert!(
        lines[0].starts_with("persysctl: Bad/Id: invalid: id"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1], "persysctl: 1 of 2 manifests not applied");
}

#[tokio::test]
async fn get_prints_a_table_a_wide_table_and_single_workloads() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    let empty = f.run(&["get"]);
    assert_eq!(empty.code, Some(0));
    assert_eq!(empty.stdout, "");
    assert_eq!(empty.stderr, "No workloads found.\n");

    f.write("manifests/files/compose.yaml", COMPOSE_FILE);
    f.apply("manifests/all.yaml", THREE_KINDS);
    let table = f.run(&["get"]).ok();
    assert!(
        !table.contains('\u{1b}'),
        "no colour when not on a terminal"
    );
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "ID", "TYPE", "DESIRED", "ACTUAL", "READY", "RESTARTS", "AGE", "MESSAGE"
        ]
    );
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(lines[1][..3], ["stack", "compose", "running"]);
    assert_eq!(lines[2][..3], ["vm1", "vm", "stopped"]);
    assert_eq!(lines[3][..3], ["web", "container", "running"]);
    for line in &lines[1..] {
        assert_state(line[3], &table);
        assert!(["true", "false", "-"].contains(&line[4]), "ready: {table}");
        assert_eq!(line[5], "0", "restarts: {table}");
    }
    assert!(lines[3][6].ends_with('s'), "an age: {:?}", lines[3]);
    // Columns line up: every row's TYPE starts where the header's does.
    let at = table.lines().next().unwrap().find("TYPE").unwrap();
    for line in table.lines().skip(1) {
        assert_ne!(&line[at..at + 1], " ", "{table}");
        assert_eq!(&line[at - 3..at], "   ", "{table}");
    }

    let vms = f.run(&["get", "-t", "vm"]).ok();
    assert_eq!(vms.lines().count(), 2, "{vms}");
    assert!(vms.lines().nth(1).unwrap().starts_with("vm1 "), "{vms}");

    let wide = f.run(&["get", "web", "-o", "wide"]).ok();
    let header = wide.lines().next().unwrap();
    for column in [
        "REVISION",
        "GENERATION",
        "OBSERVED",
        "RUNTIME REF",
        "FAILURE",
        "MESSAGE",
    ] {
        assert!(header.contains(column), "{column}: {header}");
    }
    let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "web");
    assert_eq!(row[7..9], ["r1", "1"], "revision and generation: {wide}");
    assert!(["0", "1"].contains(&row[9]), "observed generation: {wide}");
    assert_eq!(wide.lines().count(), 2);

    let error = f.run(&["get", "nope"]).failed(1);
    assert_eq!(error, "persysctl: workload nope not found");
    let error = f.run(&["get", "web", "-t", "vm"]).failed(1);
    assert!(error.contains("not found among vm workloads"), "{error}");
}

#[tokio::test]
async fn get_json_and_yaml_are_whole_objects_with_names_for_enums() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.write("manifests/files/compose.yaml", COMPOSE_FILE);
    f.apply("manifests/all.yaml", THREE_KINDS);

    let json: serde_json::Value =
        serde_json::from_str(&f.run(&["get", "-o", "json"]).ok()).unwrap();
    let items = json["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let web = items.iter().find(|i| i["metadata"]["id"] == "web").unwrap();
    assert_eq!(web["metadata"]["type"], "container");
    assert_eq!(web["metadata"]["revision_id"], "r1");
    assert_eq!(web["metadata"]["finalizers"][0], "persys.io/docker");
    assert_eq!(web["spec"]["desired_state"], "running");
    assert_eq!(web["spec"]["workload"]["container"]["image"], "nginx:1");
    assert_eq!(
        web["spec"]["workload"]["container"]["ports"][0]["host_port"],
        8080
    );
    assert_state(
        web["status"]["actual_state"].as_str().unwrap(),
        &web.to_string(),
    );
    let vm = items.iter().find(|i| i["metadata"]["id"] == "vm1").unwrap();
    assert_eq!(vm["spec"]["desired_state"], "stopped");
    assert_eq!(vm["spec"]["workload"]["vm"]["memory_mb"], 256);

    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&f.run(&["get", "stack", "-o", "yaml"]).ok()).unwrap();
    assert_eq!(yaml["metadata"]["id"].as_str(), Some("stack"));
    assert_eq!(yaml["metadata"]["type"].as_str(), Some("compose"));
    assert_state(yaml["status"]["actual_state"].as_str().unwrap(), "yaml");
    assert_eq!(
        yaml["spec"]["workload"]["compose"]["project_name"].as_str(),
        Some("stack")
    );
    let error = f.run(&["get", "nope", "-o", "json"]).failed(1);
    assert_eq!(error, "persysctl: workload nope not found");
}

#[tokio::test]
async fn describe_shows_metadata_spec_status_conditions_runtime_and_events() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.write("manifests/files/compose.yaml", COMPOSE_FILE);
    f.apply("manifests/all.yaml", THREE_KINDS);
    let text = f.run(&["describe", "web"]).ok();
    let field = |label: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{label}:")))
            .unwrap_or_else(|| panic!("no {label}:\n{text}"));
        line[label.len() + 1..].trim().to_string()
    };
    assert_eq!(field("ID"), "web");
    assert_eq!(field("Type"), "container");
    assert_eq!(field("Revision"), "r1");
    assert!(field("Generation").starts_with("1 (observed "), "{text}");
    assert_eq!(field("Finalizers"), "persys.io/docker");
    assert_eq!(field("Desired State"), "running");
    assert!(field("Created").ends_with("s ago)"), "{}", field("Created"));

    // Sections in kubectl's order, each with its content indented under it.
    let sections = ["Spec:", "Status:", "Conditions:", "Runtime:", "Events:"];
    let positions: Vec<usize> = sections
        .iter()
        .map(|s| {
            text.lines()
                .position(|l| l == *s)
                .unwrap_or_else(|| panic!("no {s}\n{text}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let spec = &lines[positions[0] + 1..positions[1]];
    assert!(spec.contains(&"  image: nginx:1"), "{text}");
    assert!(spec.contains(&"  - container_port: 80"), "{text}");
    assert!(
        !text.contains("command: []"),
        "empty fields are left out:\n{text}"
    );
    let status = lines[positions[1] + 1..positions[2]].join("\n");
    let actual = lines[positions[1] + 1];
    assert!(actual.starts_with("  Actual State:"), "{text}");
    assert_state(actual.split_whitespace().nth(2).unwrap(), &text);
    assert!(status.contains("Restarts:"), "{text}");
    let runtime = lines[positions[3] + 1];
    assert!(runtime.starts_with("  Container ID:"), "{text}");
    // Nothing reports events while no controller runs: the section says so.
    let events = &lines[positions[4] + 1..];
    assert!(
        events == ["  <none>"]
            || events[0]
                .split_whitespace()
                .eq(["TYPE", "REASON", "AGE", "MESSAGE"]),
        "{text}"
    );

    let stack = f.run(&["describe", "stack"]).ok();
    assert!(stack.contains("  Compose Project:"), "{stack}");
    assert!(
        stack.contains("    services:\n      web:\n        image: persys-test/busybox:latest"),
        "the compose file is shown as text:\n{stack}"
    );
}

#[tokio::test]
async fn describe_of_an_unknown_id_says_not_found() {
    let f = start(&[]).await;
    let error = f.run(&["describe", "nope"]).failed(1);
    assert_eq!(error, "persysctl: workload nope not found");
}

#[tokio::test]
async fn watch_prints_added_then_modified_and_exits_zero_on_ctrl_c() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "web.yaml",
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    );
    let mut watch = f.follow(&["watch"]);
    let header = watch.expect(&["TIME", "EVENT", "ID", "VERSION"]);
    assert!(header.starts_with("TIME"), "{header}");
    let added = watch.expect(&["ADDED", "web"]);
    let columns: Vec<&str> = added.split_whitespace().collect();
    assert!(columns[0].ends_with('Z'), "a UTC time first: {added}");
    assert_eq!(columns[3..5], ["container", "running"], "{added}");
    assert_state(columns[5], &added);
    let first_version: u64 = columns[6].parse().unwrap();

    f.apply(
        "web.yaml",
        "id: web\ntype: container\ndesired_state: stopped\nspec: {image: 'nginx:1'}\n",
    );
    let modified = watch.expect(&["MODIFIED", "web", "stopped"]);
    let version: u64 = modified.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert!(version > first_version, "{modified}");

    f.apply(
        "db.yaml",
        "id: db\ntype: container\nspec: {image: 'postgres'}\n",
    );
    watch.expect(&["ADDED", "db"]);
    // The Docker controller is not running, so its finalizer holds the
    // workload: the delete shows as the workload terminating.
    f.run(&["delete", "web"]).ok();
    watch.expect(&["MODIFIED", "web", "Terminating"]);

    let (code, stderr) = watch.interrupt();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[tokio::test]
async fn watch_relists_without_a_word_when_its_version_expired() {
    let f = start(&[
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
        ("PERSYS_LOG_MAX_ENTRIES", "20"),
    ])
    .await;
    let mut client = f.client().await;
    for i in 0..60 {
        client
            .apply_workload(ApplyWorkloadRequest {
                id: format!("w{i}"),
                r#type: WorkloadType::Container as i32,
                spec: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(ContainerSpec {
                        image: "nginx:1".into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Version 1 has been compacted away: the agent says "expired", and the
    // watch lists instead.
    let mut watch = f.follow(&["watch", "--since", "1"]);
    watch.expect(&["ADDED", "w0"]);
    watch.expect(&["ADDED", "w59"]);
    f.apply(
        "w0.yaml",
        "id: w0\ntype: container\ndesired_state: stopped\nspec: {image: 'nginx:1'}\n",
    );
    watch.expect(&["MODIFIED", "w0", "stopped"]);
    let w0_added = watch
        .seen
        .iter()
        .filter(|l| l.split_whitespace().take(3).skip(1).eq(["ADDED", "w0"]))
        .count();
    assert_eq!(w0_added, 1, "listed once:\n{}", watch.seen.join("\n"));
    assert!(
        !watch.seen.iter().any(|l| l.contains("BOOKMARK")),
        "bookmarks are not printed"
    );
    let (code, stderr) = watch.interrupt();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "", "the relist is not reported");
}

#[tokio::test]
async fn get_watch_lists_then_prints_a_row_per_change() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "web.yaml",
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    );
    let mut get = f.follow(&["get", "-w"]);
    get.expect(&["ID", "TYPE", "DESIRED", "ACTUAL"]);
    get.expect(&["web", "container", "running"]);
    f.apply(
        "web.yaml",
        "id: web\ntype: container\ndesired_state: stopped\nspec: {image: 'nginx:1'}\n",
    );
    get.expect(&["web", "container", "stopped"]);
    f.apply(
        "db.yaml",
        "id: db\ntype: vm\nspec: {vcpus: 1, memory_mb: 64}\n",
    );
    get.expect(&["db", "vm", "running"]);
    let (code, stderr) = get.interrupt();
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn delete_wait_times_out_while_a_finalizer_holds_the_workload() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "web.yaml",
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    );
    let started = Instant::now();
    let error = f
        .run(&["delete", "web", "--wait", "--timeout", "2s"])
        .failed(1);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(error.contains("timed out after 2s"), "{error}");
    assert!(error.contains("web is still terminating"), "{error}");
    assert!(error.contains("persys.io/docker"), "{error}");
    let web = describe(&mut f.client().await, "web").await;
    assert!(web.is_deleting(), "the delete was requested");
}

#[tokio::test]
async fn delete_reports_deleting_and_an_unknown_id_fails_unless_ignored() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "web.yaml",
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    );
    assert_eq!(f.run(&["delete", "web"]).ok(), "web deleting\n");
    assert!(describe(&mut f.client().await, "web").await.is_deleting());

    let error = f.run(&["delete", "nope"]).failed(1);
    assert_eq!(error, "persysctl: workload nope not found");
    assert_eq!(f.run(&["delete", "nope", "--ignore-not-found"]).ok(), "");
    // An id that is already gone needs no waiting either.
    assert_eq!(
        f.run(&["delete", "nope", "--ignore-not-found", "--wait"])
            .ok(),
        ""
    );
}

#[tokio::test]
async fn health_and_version_report_the_agent() {
    let f = start(&[("PERSYS_VERSION", "9.9.9-test")]).await;
    let version = f.run(&["version"]).ok();
    assert_eq!(
        version,
        format!(
            "Client Version: {}\nServer Version: 9.9.9-test\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    let health = f.run(&["health"]).ok();
    assert!(health.contains("Health:    healthy"), "{health}");
    assert!(health.contains("Version:   9.9.9-test"), "{health}");
    assert!(health.contains(&f.agent.endpoint()), "{health}");
    let json: serde_json::Value =
        serde_json::from_str(&f.run(&["health", "-o", "json"]).ok()).unwrap();
    assert_eq!(json["healthy"], true);
    assert_eq!(json["version"], "9.9.9-test");

    // The client's version needs no agent.
    let client_only = bare_ctl(&f.home())
        .args(["version", "--client", "--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(
        Run::from(client_only).ok(),
        format!("Client Version: {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let f = start(UNREACHABLE_RUNTIMES).await;
    f.apply(
        "web.yaml",
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    );
    // `script` gives persysctl a terminal.
    let on_terminal = |no_color: Option<&str>| {
        let mut script = Command::new("script");
        f.configure(&mut script);
        script.args([
            "-qec",
            &format!("{} get", persysctl().display()),
            "/dev/null",
        ]);
        if let Some(value) = no_color {
            script.env("NO_COLOR", value);
        }
        Run::from(script.output().unwrap()).ok()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    assert!(coloured.contains("web"), "{coloured:?}");
    let plain = on_terminal(Some("1"));
    assert!(!plain.contains('\u{1b}'), "{plain:?}");
    assert!(plain.contains("web"), "{plain:?}");
}

#[test]
fn completion_prints_a_script_for_each_shell() {
    let home = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_persysctl()"),
        ("zsh", "#compdef persysctl"),
        ("fish", "complete -c persysctl"),
    ] {
        let script = Run::from(
            bare_ctl(home.path())
                .args(["completion", shell])
                .output()
                .unwrap(),
        )
        .ok();
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("describe"), "{shell} completes subcommands");
    }
}

#[test]
fn usage_errors_exit_with_status_two() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        &["frobnicate"][..],
        &["get", "-o", "xml"],
        &["get", "-t", "lxc"],
        &["apply"],
        &["delete"],
        &["get", "--timeout", "soon"],
        &["completion", "tcsh"],
        &["watch", "--since", "-4"],
    ] {
        let run = Run::from(bare_ctl(home.path()).args(args).output().unwrap());
        run.failed(2);
    }
}

#[tokio::test]
async fn a_missing_certificate_file_is_named() {
    let f = start(&[]).await;
    let error = f
        .run(&["get", "--cert", "/nonexistent/client.crt"])
        .failed(1);
    assert!(error.contains("/nonexistent/client.crt"), "{error}");
    assert!(error.contains("No such file"), "{error}");

    let error = f.run(&["get", "--ca", "/nonexistent/ca.crt"]).failed(1);
    assert!(error.contains("/nonexistent/ca.crt"), "{error}");

    // Nothing given and nothing in ~/.persys: say where it was looked for.
    let error = Run::from(
        bare_ctl(&f.home())
            .env("PERSYSCTL_SERVER", f.agent.endpoint())
            .arg("get")
            .output()
            .unwrap(),
    )
    .failed(1);
    assert!(error.contains("~/.persys/ca.crt"), "{error}");
    assert!(error.contains("--insecure"), "{error}");
}

#[tokio::test]
async fn the_default_certificates_in_home_are_used() {
    let f = start(&[]).await;
    let dir = f.home().join(".persys");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["ca.crt", "client.crt", "client.key"] {
        std::fs::copy(f.certs.dir.join(name), dir.join(name)).unwrap();
    }
    let run = bare_ctl(&f.home())
        .env("PERSYSCTL_SERVER", f.agent.endpoint())
        .arg("get")
        .output()
        .unwrap();
    Run::from(run).ok();
}

#[tokio::test]
async fn a_foreign_ca_fails_the_tls_handshake_in_one_clear_line() {
    let f = start(&[]).await;
    let foreign = Authority::new("someone else");
    let ca = f.write("foreign-ca.crt", &foreign.cert_pem);
    let error = f.run(&["get", "--ca", ca.to_str().unwrap()]).failed(1);
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(error.contains("certificate"), "{error}");
    assert!(
        error.contains(ca.to_str().unwrap()),
        "names the CA file: {error}"
    );
}

#[tokio::test]
async fn a_client_certificate_the_agent_does_not_trust_is_named() {
    let f = start(&[]).await;
    let foreign = Authority::new("someone else");
    let (cert, key) = foreign.leaf("intruder", false);
    let cert = f.write("intruder.crt", &cert);
    let key = f.write("intruder.key", &key);
    let error = f
        .run(&[
            "get",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
        .failed(1);
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(error.contains("refused the client certificate"), "{error}");
    assert!(error.contains(cert.to_str().unwrap()), "{error}");

    let without = f
        .ctl()
        .env_remove("PERSYSCTL_CERT")
        .env_remove("PERSYSCTL_KEY")
        .arg("get")
        .output()
        .unwrap();
    let error = Run::from(without).failed(1);
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(error.contains("requires a client certificate"), "{error}");
}

#[tokio::test]
async fn the_agents_certificate_is_checked_against_the_address_or_the_given_name() {
    let f = start(&[]).await;
    // 127.0.0.1 is verified against the certificate's IP SAN, localhost
    // against its DNS SAN.
    f.run(&["get", "--server", &f.agent.endpoint()]).ok();
    f.run(&["get", "--server", &format!("localhost:{}", f.agent.port)])
        .ok();
    f.run(&["get", "--tls-server-name", "localhost"]).ok();
    let error = f
        .run(&["get", "--tls-server-name", "other.example"])
        .failed(1);
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(error.contains("not valid for \"other.example\""), "{error}");
}

#[tokio::test]
async fn an_agent_that_is_not_there_is_reported() {
    let f = start(&[]).await;
    let port = common::free_port();
    let error = f
        .run(&["get", "--server", &format!("127.0.0.1:{port}")])
        .failed(1);
    assert!(
        error.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{error}"
    );
    assert!(error.contains("connection refused"), "{error}");
}

#[tokio::test]
async fn insecure_talks_to_a_plaintext_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent =
        AgentProcess::start_plaintext(&dir.path().join("state"), UNREACHABLE_RUNTIMES).await;
    let manifest = dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "id: web\ntype: container\nspec: {image: 'nginx:1'}\n",
    )
    .unwrap();
    let ctl = |args: &[&str]| {
        Run::from(
            bare_ctl(dir.path())
                .env("PERSYSCTL_SERVER", agent.endpoint())
                .args(args)
                .output()
                .unwrap(),
        )
    };
    assert_eq!(
        ctl(&["--insecure", "apply", "-f", manifest.to_str().unwrap()]).ok(),
        "web applied\n"
    );
    let table = ctl(&["get", "--insecure"]).ok();
    assert!(table.lines().nth(1).unwrap().starts_with("web "), "{table}");
    ctl(&["health", "--insecure"]).ok();

    // TLS against a plaintext agent says what to do.
    let certs = Certs::generate(&dir.path().join("certs"));
    let error = ctl(&["get", "--ca", certs.dir.join("ca.crt").to_str().unwrap()]).failed(1);
    assert!(error.contains("--insecure"), "{error}");
}

/// The offline image hack/runtimes-up.sh builds.
fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into())
}

/// True when the Docker engine and the test image are there. Without them
/// the test is skipped loudly, except in CI, where it fails.
fn docker_available(test: &str) -> bool {
    let found = Command::new("docker")
        .args(["image", "inspect", &test_image()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        persys_test_support::skip(
            test,
            "the Docker engine or the test image",
            &format!("`docker image inspect {}` failed", test_image()),
        );
    }
    found
}

/// Removes the containers of a workload, whatever the test did.
struct ContainerSweep(String);

impl Drop for ContainerSweep {
    fn drop(&mut self) {
        let listed = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=persys.workload-id={}", self.0),
            ])
            .output();
        if let Ok(listed) = listed {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

#[tokio::test]
async fn with_docker_delete_wait_returns_once_the_workload_is_gone_and_watch_says_deleted() {
    let test = "with_docker_delete_wait_returns_once_the_workload_is_gone_and_watch_says_deleted";
    if !docker_available(test) {
        return;
    }
    let docker_host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let f = start(&[
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("DOCKER_HOST", docker_host.as_str()),
    ])
    .await;
    let id = format!("cli-{:08x}", fastrand::u32(..));
    let _sweep = ContainerSweep(id.clone());
    f.apply(
        "sleeper.yaml",
        &format!(
            "id: {id}\ntype: container\nspec:\n  image: {}\n  image_pull_policy: Never\n  \
             command: [sleep, '3600']\n  stop_grace_period_seconds: 1\n",
            test_image()
        ),
    );
    let mut watch = f.follow(&["watch", &id]);
    watch.expect(&["ADDED", &id]);
    watch.expect(&["MODIFIED", &id, "Running"]);

    // The controller records what it did: describe lists it.
    let described = f.run(&["describe", &id]).ok();
    let events = described
        .split("\nEvents:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{described}"));
    assert!(
        events
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["Normal", "Started"])),
        "{described}"
    );
    assert!(
        described.contains("  container.state: running"),
        "{described}"
    );

    let out = f.run(&["delete", &id, "--wait", "--timeout", "60s"]).ok();
    assert_eq!(out, format!("{id} deleted\n"));
    watch.expect(&["DELETED", &id]);
    let error = f.run(&["get", &id]).failed(1);
    assert_eq!(error, format!("persysctl: workload {id} not found"));
    let (code, stderr) = watch.interrupt();
    assert_eq!(code, Some(0), "{stderr}");
}
