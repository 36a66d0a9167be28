//! Private registries end to end: Debian's `docker-registry` (the
//! distribution registry) on loopback with TLS and htpasswd auth, the test
//! image pushed there, and the agent binary pulling it through the real
//! Docker engine, with credentials (an `auths` entry and a credential
//! helper) and without (a wrong password, none at all).

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProcess, Authority, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
const USER: &str = "persys";
const PASSWORD: &str = "registry-s3cret";

use docker::test_image;

/// True when the engine, the test image, the registry and htpasswd are
/// all there. Otherwise the test is skipped, or fails in CI.
fn prerequisites(test: &str) -> bool {
    docker::engine_ready(
        test,
        "the Docker engine with the test image, docker-registry and apache2-utils (bash hack/deps.sh)",
        &[
            (REGISTRY_BINARY, &["--version"]),
            ("htpasswd", &["-nbB", "probe", "probe"]),
        ],
    )
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A distribution registry on 127.0.0.1 with TLS and htpasswd auth,
/// storage under the test's directory; killed, and the image tags the test
/// made removed, when dropped.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
    tags: Vec<String>,
    workloads: Vec<String>,
}

impl Registry {
    async fn start(dir: &Path) -> Registry {
        let ca = Authority::new("persys registry test CA");
        let (cert, key) = ca.leaf("registry", true);
        std::fs::write(dir.join("registry.crt"), cert).unwrap();
        std::fs::write(dir.join("registry.key"), key).unwrap();
        let htpasswd = run("htpasswd", &["-Bbn", USER, PASSWORD]);
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        let port = common::free_port();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n\
             http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {dir}/registry.crt\n    key: {dir}/registry.key\n\
             auth:\n  htpasswd:\n    realm: persys-test\n    path: {dir}/htpasswd\n",
            storage = dir.join("storage").display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("registry.yml"), config).unwrap();
        let log = dir.join("registry.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(REGISTRY_BINARY)
            .args(["serve", &dir.join("registry.yml").display().to_string()])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut registry = Registry {
            child,
            port,
            log,
            tags: Vec::new(),
            workloads: Vec::new(),
        };
        // Ready once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!(
                    "docker-registry exited ({status}):\n{}",
                    registry.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not listening within 30 s:\n{}",
                registry.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        registry
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests the registry served for `repository`'s manifests.
    fn manifest_requests(&self, repository: &str) -> usize {
        let path = format!("/v2/{repository}/manifests/");
        self.log_text()
            .lines()
            .filter(|line| line.contains(&path))
            .count()
    }

    /// Logs in with a config directory of the test's own, pushes the test
    /// image as `reference` and removes the local tag.
    fn push(&mut self, config_dir: &Path, reference: &str) {
        let config = config_dir.display().to_string();
        let server = reference.split('/').next().unwrap();
        let mut login = Command::new("docker")
            .args([
                "--config",
                &config,
                "login",
                server,
                "--username",
                USER,
                "--password-stdin",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        login
            .stdin
            .take()
            .unwrap()
            .write_all(PASSWORD.as_bytes())
            .unwrap();
        let output = login.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "docker login {server}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        run("docker", &["tag", &test_image(), reference]);
        self.tags.push(reference.to_string());
        run("docker", &["--config", &config, "push", reference]);
        run("docker", &["rmi", reference]);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for id in &self.workloads {
            let output = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=persys.workload-id={id}"),
                ])
                .output();
            if let Ok(output) = output {
                for container in String::from_utf8_lossy(&output.stdout).lines() {
                    let _ = Command::new("docker")
                        .args(["rm", "-f", container])
                        .output();
                }
            }
        }
        for tag in &self.tags {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A credential helper `docker-credential-<name>` in `dir` that answers
/// `password` for whatever server it is asked, and records each `get` and
/// the server asked for in `dir/asked-<name>`.
fn write_helper(dir: &Path, name: &str, password: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).unwrap();
    let helper = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh
read -r server || true
echo \"$1 $server\" >> {asked}\n\
             echo '{{\"ServerURL\":\"'\"$server\"'\",\"Username\":\"{USER}\",\"Secret\":\"{password}\"}}'\n",
            asked = dir.join(format!("asked-{name}")).display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What helper `name` in `dir` was asked, one `get <server>` a line.
fn asked(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("asked-{name}"))).unwrap_or_default()
}

/// `PATH` with `dir` first: where the agent finds the test's helpers.
fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn workload(id: &str, image: &str) -> ApplyWorkloadRequest {
    docker::sleeper(id, image)
}

async fn wait_for(
    api: &mut AgentServiceClient<Channel>,
    id: &str,
    what: &str,
    condition: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    docker::wait_for_status(api, id, what, Duration::from_secs(120), condition).await
}

/// How many times the agent told of pulling the workload's image.
async fn pulls(api: &mut AgentServiceClient<Channel>, id: &str) -> u32 {
    let described = api
        .describe_workload(DescribeWorkloadRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    described
        .events
        .iter()
        .filter(|e| e.reason == "Pulling")
        .map(|e| e.count.max(1))
        .sum()
}

/// Reconciles the agent's Docker controller has run, from its metrics.
fn docker_reconciles(agent: &AgentProcess) -> f64 {
    let (code, text) = common::http_get(agent.metrics_port, "/metrics");
    assert_eq!(code, 200);
    text.lines()
        .filter(|l| l.starts_with("persys_agent_reconciles_total{controller=\"docker\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn delete(api: &mut AgentServiceClient<Channel>, id: &str) {
    api.delete_workload(DeleteWorkloadRequest { id: id.into() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !api
        .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .is_err_and(|e| e.code() == tonic::Code::NotFound)
    {
        assert!(Instant::now() < deadline, "{id}: not deleted within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_private_image_is_pulled_with_credentials_and_refused_once_without_them() {
    let test = "a_private_image_is_pulled_with_credentials_and_refused_once_without_them";
    if !prerequisites(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::start(dir.path()).await;
    let port = registry.port;
    let suffix = format!("{}-{}", std::process::id(), port);
    // Two names of the same registry, so one agent can take one's
    // credentials from an `auths` entry and the other's from a helper.
    let repository = format!("private/persys-{suffix}");
    let by_ip = format!("127.0.0.1:{port}/{repository}:auths");
    let by_name = format!("localhost:{port}/{repository}:helper");
    let login_dir = dir.path().join("login");
    registry.push(&login_dir, &by_ip);
    registry.push(&login_dir, &by_name);
    let login_config = std::fs::read_to_string(login_dir.join("config.json")).unwrap();
    assert!(
        login_config.contains(&format!("127.0.0.1:{port}")),
        "{login_config}"
    );

    let certs = Certs::generate(&dir.path().join("certs"));
    let (refused_id, helper_refused_id) = (
        format!("reg-refused-{suffix}"),
        format!("reg-anon-{suffix}"),
    );
    let (auths_id, helper_id) = (
        format!("reg-auths-{suffix}"),
        format!("reg-helper-{suffix}"),
    );
    registry.workloads = vec![
        refused_id.clone(),
        helper_refused_id.clone(),
        auths_id.clone(),
        helper_id.clone(),
    ];

    // Wrong credentials: a wrong password in an `auths` entry for one
    // name, from a credential helper for the other. (Not none at all: for
    // a registry it treats as insecure, as it does any on loopback, the
    // engine falls back to plain HTTP after an anonymous refusal, and
    // reports that attempt's error instead.) A resync every second, so the
    // controller looks at the workloads again and again.
    let helpers = dir.path().join("helpers");
    write_helper(&helpers, "persys-wrong", "not-the-password");
    write_helper(&helpers, "persys-right", PASSWORD);
    let path = path_with(&helpers);
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::write(
        wrong.join("config.json"),
        format!(
            r#"{{"auths": {{"127.0.0.1:{port}": {{"username": "{USER}", "password": "not-the-password"}}}},
                "credHelpers": {{"localhost:{port}": "persys-wrong"}}}}"#
        ),
    )
    .unwrap();
    let wrong_file = wrong.join("config.json").display().to_string();
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_RECONCILE_INTERVAL", "1s"),
        ("PERSYS_REGISTRY_AUTH_FILE", wrong_file.as_str()),
        ("PATH", path.as_str()),
    ];
    let agent = AgentProcess::start(&dir.path().join("state-refused"), &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(workload(&refused_id, &by_ip))
        .await
        .unwrap();
    api.apply_workload(workload(&helper_refused_id, &by_name))
        .await
        .unwrap();
    for (id, repo_name) in [(&refused_id, &by_ip), (&helper_refused_id, &by_name)] {
        let failed = wait_for(&mut api, id, "failed", |s| {
            s.actual_state() == ActualState::Failed
        })
        .await;
        let meta = &failed.metadata;
        assert_eq!(
            meta["failure_reason"], "IMAGE_PULL_FAILED",
            "{id}: {meta:?}"
        );
        assert_eq!(
            meta.get("retry_terminal").map(String::as_str),
            Some("true"),
            "{id}: {meta:?}"
        );
        let last_error = &meta["last_error"];
        assert!(last_error.contains("unauthorized"), "{id}: {last_error}");
        assert!(
            last_error.contains(repo_name.as_str()),
            "{id}: {last_error}"
        );
        assert!(!last_error.contains("not-the-password"), "{last_error}");
    }
    let requests = registry.manifest_requests(&repository);
    assert!(requests > 0, "{}", registry.log_text());
    // The pull back-off would pull again 10 s after a failure: twelve
    // resyncs of both workloads a second apart outlast it, and none pulls.
    let looked = docker_reconciles(&agent);
    let deadline = Instant::now() + Duration::from_secs(120);
    while docker_reconciles(&agent) < looked + 24.0 {
        assert!(
            Instant::now() < deadline,
            "no resyncs:\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in [&refused_id, &helper_refused_id] {
        assert_eq!(pulls(&mut api, id).await, 1, "{id}: pulled again");
    }
    assert_eq!(
        registry.manifest_requests(&repository),
        requests,
        "the registry was asked again"
    );
    assert!(!agent.log_text().contains(PASSWORD));
    for id in [&refused_id, &helper_refused_id] {
        delete(&mut api, id).await;
    }
    drop(agent);

    assert_eq!(
        asked(&helpers, "persys-wrong"),
        format!("get localhost:{port}\n"),
        "the helper is asked once, for its registry"
    );

    // With credentials: the login's own `auths` entry for one name, a
    // credential helper (found in PATH, as the Docker CLI finds it) for
    // the other.
    let mut config: serde_json::Value = serde_json::from_str(&login_config).unwrap();
    config["credHelpers"] = serde_json::json!({ format!("localhost:{port}"): "persys-right" });
    if let Some(auths) = config["auths"].as_object_mut() {
        auths.remove(&format!("localhost:{port}"));
    }
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::write(good.join("config.json"), config.to_string()).unwrap();
    let good_file = good.join("config.json").display().to_string();
    let env = [
        ("PERSYS_DOCKER_ENABLED", "true"),
        ("PERSYS_REGISTRY_AUTH_FILE", good_file.as_str()),
        ("PATH", path.as_str()),
    ];
    let agent = AgentProcess::start(&dir.path().join("state-good"), &certs, &env).await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(workload(&auths_id, &by_ip))
        .await
        .unwrap();
    api.apply_workload(workload(&helper_id, &by_name))
        .await
        .unwrap();
    for (id, image) in [(&auths_id, &by_ip), (&helper_id, &by_name)] {
        let running = wait_for(&mut api, id, "running", |s| {
            s.actual_state() == ActualState::Running
        })
        .await;
        let container = &running.metadata["runtime_ref"];
        let inspected = run(
            "docker",
            &["inspect", "--format", "{{.Config.Image}}", container],
        );
        assert_eq!(inspected.trim(), image.as_str());
    }
    assert_eq!(
        asked(&helpers, "persys-right"),
        format!("get localhost:{port}\n")
    );
    assert!(!agent.log_text().contains(PASSWORD));
    for id in [&auths_id, &helper_id] {
        delete(&mut api, id).await;
    }
}
