//! The agent binary running a libvirt VM (qemu:///system) end to end.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{AgentProcess, Certs, client};
use persys_api::v1::agent_service_client::AgentServiceClient;
use persys_api::v1::*;
use tonic::transport::Channel;

/// True when libvirtd answers on qemu:///system. Otherwise the test `test`
/// is skipped (and recorded as skipped), or fails in CI.
fn libvirt_available(test: &str) -> bool {
    let ok = Command::new("virsh")
        .args(["-c", "qemu:///system", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        persys_test_support::skip(
            test,
            "libvirtd on qemu:///system",
            &"`virsh -c qemu:///system version` failed",
        );
    }
    ok
}

fn domain_state(name: &str) -> Option<String> {
    let output = Command::new("virsh")
        .args(["-c", "qemu:///system", "domstate", name])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

async fn status(api: &mut AgentServiceClient<Channel>, id: &str) -> Option<WorkloadStatus> {
    api.get_workload_status(GetWorkloadStatusRequest { id: id.into() })
        .await
        .ok()
        .and_then(|r| r.into_inner().status)
}

#[tokio::test]
async fn a_vm_runs_is_restarted_after_destroy_and_is_deleted() {
    if !libvirt_available("a_vm_runs_is_restarted_after_destroy_and_is_deleted") {
        return;
    }
    let id = format!("vm-e2e-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&dir.path().join("certs"));
    let agent = AgentProcess::start(
        &dir.path().join("state"),
        &certs,
        &[
            ("PERSYS_VM_ENABLED", "true"),
            ("PERSYS_RECONCILE_INTERVAL", "10m"),
            ("PERSYS_VM_STOP_TIMEOUT", "2s"),
        ],
    )
    .await;
    let mut api = client(agent.port, &certs).await.unwrap();
    api.apply_workload(ApplyWorkloadRequest {
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

    let wait_running = |what: &'static str| {
        let id = id.clone();
        let log = agent.log.clone();
        move |api: AgentServiceClient<Channel>| async move {
            let mut api = api;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if status(&mut api, &id)
                    .await
                    .is_some_and(|s| s.actual_state() == ActualState::Running)
                    && domain_state(&id).as_deref() == Some("running")
                {
                    return api;
                }
                assert!(
                    Instant::now() < deadline,
                    "VM not {what} within 60 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut api = wait_running("running")(api).await;

    // Destroyed out of band: started again because of libvirt's events (the
    // resync is 10 minutes).
    assert!(
        Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &id])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while domain_state(&id).as_deref() != Some("running") {
        assert!(
            Instant::now() < deadline,
            "destroyed VM not restarted within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    api.delete_workload(DeleteWorkloadRequest { id: id.clone() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&mut api, &id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "VM workload not deleted within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(domain_state(&id), None, "domain undefined");
}
