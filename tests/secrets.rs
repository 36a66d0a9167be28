//! Secrets at rest, on the real binary over real mutual TLS: a secret
//! applied through the API is in no file under the state directory, comes
//! back after a restart with the node key, and a start without the key
//! fails cleanly and leaves the data intact.

mod common;

use std::path::Path;

use common::{AgentProcess, Certs};
use persys_api::v1::workload_spec::Spec;
use persys_api::v1::{
    ApplyWorkloadRequest, ContainerSpec, DescribeWorkloadRequest, WorkloadSpec, WorkloadType,
};

fn with_secret(id: &str, secret: &str) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        spec: Some(WorkloadSpec {
            spec: Some(Spec::Container(ContainerSpec {
                image: "persys-test/busybox:latest".into(),
                command: vec!["sleep".into(), "3600".into()],
                env: [("DB_PASSWORD".to_string(), secret.to_string())].into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// Every file under `dir` (the journal and tables included) whose bytes
/// contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// The agent with Docker workloads accepted, pointed at an engine that is
/// not there: the spec is stored, nothing runs.
const ENV: &[(&str, &str)] = &[
    ("PERSYS_DOCKER_ENABLED", "true"),
    ("DOCKER_HOST", "unix:///nonexistent/docker.sock"),
];

fn secret_of(response: &persys_api::v1::DescribeWorkloadResponse) -> String {
    match response
        .workload
        .as_ref()
        .and_then(|w| w.spec.as_ref())
        .and_then(|s| s.workload.as_ref())
        .and_then(|w| w.spec.as_ref())
    {
        Some(Spec::Container(c)) => c.env["DB_PASSWORD"].clone(),
        other => panic!("not a container: {other:?}"),
    }
}

#[tokio::test]
async fn a_secret_is_in_no_file_of_the_state_directory_and_the_key_is_needed_to_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let state = dir.path().join("state");
    let key = dir.path().join("state.key");
    let secret = format!("pw-{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..));
    let updated = format!("pw2-{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..));

    let mut agent = AgentProcess::start(&state, &certs, ENV).await;
    {
        let mut client = common::client(agent.port, &certs).await.unwrap();
        client
            .apply_workload(with_secret("db", &secret))
            .await
            .unwrap();
        client
            .apply_workload(with_secret("db", &updated))
            .await
            .unwrap();
        client
            .apply_workload(with_secret("db2", &secret))
            .await
            .unwrap();
    }
    assert!(agent.signal("TERM").await.success());

    // The key sits beside the state directory, owner-only; the directory
    // itself is owner-only too.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&state), 0o700);
    for value in [&secret, &updated] {
        let found = files_containing(&state, value.as_bytes());
        assert!(found.is_empty(), "the secret is readable in {found:?}");
    }

    // Without the key the agent refuses to start, and says why.
    let aside = dir.path().join("key.aside");
    std::fs::rename(&key, &aside).unwrap();
    let output = common::offline_agent(&state).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&key.display().to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!key.exists(), "no new key was made over existing data");

    // With the key back, everything is there.
    std::fs::rename(&aside, &key).unwrap();
    let agent = AgentProcess::start(&state, &certs, ENV).await;
    let mut client = common::client(agent.port, &certs).await.unwrap();
    let described = client
        .describe_workload(DescribeWorkloadRequest { id: "db".into() })
        .await
        .unwrap();
    assert_eq!(secret_of(described.get_ref()), updated);
    let described = client
        .describe_workload(DescribeWorkloadRequest { id: "db2".into() })
        .await
        .unwrap();
    assert_eq!(secret_of(described.get_ref()), secret);
}
