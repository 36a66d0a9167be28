//! The Docker side of the black-box tests: the test image, the check that
//! the engine (and whatever else a test needs) is there, container
//! workloads, waiting on a workload's status over the API, and removing a
//! test's containers however it ends.
#![allow(dead_code)] // each test binary uses part of it

use std::process::Command;
use std::time::{Duration, Instant};

use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

/// The image every container of the tests runs (offline, loaded by
/// `hack/runtimes-up.sh`).
pub fn test_image() -> String {
    std::env::var("PERSYS_TEST_IMAGE").unwrap_or_else(|_| "persys-test/busybox:latest".into())
}

/// True when the engine has the test image and each of `also` (a program
/// and its arguments) succeeds. Otherwise the test `test` is skipped and
/// recorded as skipped, naming `needs` — a failure in CI.
pub fn engine_ready(test: &str, needs: &str, also: &[(&str, &[&str])]) -> bool {
    let image = test_image();
    let engine: (&str, &[&str]) = ("docker", &["image", "inspect", &image]);
    for (program, args) in std::iter::once(engine).chain(also.iter().copied()) {
        let ok = Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            persys_test_support::skip(
                test,
                needs,
                &format!("`{program} {}` failed", args.join(" ")),
            );
            return false;
        }
    }
    true
}

/// An apply of container workload `id`, desired running, its revision
/// derived from `spec`.
pub fn container_request(id: &str, spec: ContainerSpec) -> ApplyWorkloadRequest {
    ApplyWorkloadRequest {
        id: id.into(),
        r#type: WorkloadType::Container as i32,
        revision_id: String::new(),
        desired_state: DesiredState::Running as i32,
        spec: Some(WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(spec)),
        }),
    }
}

/// A container workload `id` that runs `image` sleeping for an hour, and
/// stops within a second.
pub fn sleeper(id: &str, image: &str) -> ApplyWorkloadRequest {
    shell(id, image, &["sleep", "3600"])
}

/// A container workload `id` that runs `command` (program and arguments)
/// in `image`, and stops within a second.
pub fn shell(id: &str, image: &str, command: &[&str]) -> ApplyWorkloadRequest {
    let (program, args) = command.split_first().expect("a program");
    container_request(
        id,
        ContainerSpec {
            image: image.into(),
            command: vec![program.to_string()],
            args: args.iter().map(|a| a.to_string()).collect(),
            stop_grace_period_seconds: 1,
            ..Default::default()
        },
    )
}

/// Workload `id`'s status once `condition` holds, asked every 50 ms; fails
/// naming `what` and the last status seen when `within` passes first.
pub async fn wait_for_status(
    api: &mut AgentServiceClient<Channel>,
    id: &str,
    what: &str,
    within: Duration,
    condition: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok(status) = api
            .get_workload_status(GetWorkloadStatusRequest { id: id.into() })
            .await
            && let Some(status) = status.into_inner().status
        {
            if condition(&status) {
                return status;
            }
            last = Some(status);
        }
        assert!(
            Instant::now() < deadline,
            "{id}: not {what} within {within:?}; last status: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes every container labelled with the agent scope `scope` when
/// dropped, however the test ends.
pub struct ScopeCleanup {
    pub scope: String,
}

impl Drop for ScopeCleanup {
    fn drop(&mut self) {
        let listed = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=persys.scope={}", self.scope),
            ])
            .output();
        if let Ok(listed) = listed {
            for container in String::from_utf8_lossy(&listed.stdout).lines() {
                let _ = Command::new("docker")
                    .args(["rm", "-f", container])
                    .output();
            }
        }
    }
}
