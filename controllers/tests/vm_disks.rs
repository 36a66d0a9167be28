//! The VM controller's disk rules against real libvirt (`qemu:///system`),
//! real qemu-img images and real qemu guests: a disk that is not what the
//! spec says, or not the workload's own, keeps the VM from starting; a
//! disk that does not fit is retried; managed volumes are disks in the
//! workload's folder; a display has a password.
//!
//! Needs libvirtd (hack/runtimes-up.sh) and qemu-img. Outside CI a test
//! without libvirtd is skipped with a loud message; in CI it fails.

mod vm_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use persys_api::v1::{DesiredState, DiskConfig, ManagedVolumeSpec, VmSpec, Workload};
use persys_controllers::vm::xml::Element;
use vm_support::*;

const CONVERGE: Duration = Duration::from_secs(30);

async fn qemu_img(args: &[&str]) {
    let output = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Creates a qcow2 overlay at `path` over `base` (of `base_format`).
async fn qcow2_over(base: &str, base_format: &str, path: &str) {
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        base_format,
        "-b",
        base,
        path,
    ];
    qemu_img(&args).await;
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Failed with `reason` as of the current generation.
fn failed_with(reason: &'static str) -> impl Fn(&Workload) -> bool {
    move |w: &Workload| {
        let s = status(w);
        s.failure_reason == reason && s.observed_generation == w.generation()
    }
}

/// A domain defined straight through libvirt, without persys marks;
/// undefined when dropped.
struct ForeignDomain(String);

impl Drop for ForeignDomain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh")
            .args(["-c", SYSTEM_URI, "undefine", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_that_are_not_what_the_spec_says_or_not_the_workload_s_own_keep_the_vm_from_starting()
{
    let Some(bed) = TestBed::new("diskrules", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let images = bed.images();

    // A qcow2 whose backing file lies outside the workload's folder.
    let base = images.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", text(&base), "1G"]).await;
    let overlay = images.join("overlay.qcow2");
    qcow2_over(text(&base), "qcow2", text(&overlay)).await;
    // A raw image declared qcow2.
    let raw = images.join("raw.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", text(&raw), "1G"]).await;
    // A disk another (unmanaged) domain has attached.
    let shared = images.join("shared.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", text(&shared), "1G"]).await;
    let foreign = ForeignDomain(unique("foreign"));
    let xml = format!(
        "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        foreign.0,
        shared.display()
    );
    let xml_file = bed.dir.path().join("foreign.xml");
    std::fs::write(&xml_file, xml).unwrap();
    let (ok, out) = virsh(SYSTEM_URI, &["define", text(&xml_file)]).await;
    assert!(ok, "virsh define: {out}");

    let cases = [
        (
            unique("backing"),
            qcow2(&overlay, 0),
            "POLICY_VIOLATION",
            vec![
                "spec.vm.disks[0].path",
                "has the backing file",
                "must lie in the workload's own directory",
            ],
        ),
        (
            unique("rawqcow"),
            qcow2(&raw, 0),
            "POLICY_VIOLATION",
            vec!["spec.vm.disks[0].format", "is raw but is declared qcow2"],
        ),
        (
            unique("attached"),
            qcow2(&shared, 0),
            "POLICY_VIOLATION",
            vec![
                "spec.vm.disks[0].path",
                "is attached to the libvirt domain",
                foreign.0.as_str(),
            ],
        ),
        (
            unique("toobig"),
            // 1 PiB: more than any test machine has free.
            qcow2(&images.join("huge.qcow2"), 1 << 20),
            "INSUFFICIENT_RESOURCES",
            vec![
                "spec.vm.disks[0].size_gb: 1048576 GiB requested but the filesystem holding",
                "GiB free",
            ],
        ),
    ];
    for (id, disk, _, _) in &cases {
        agent
            .apply(
                id,
                "r1",
                DesiredState::Running,
                small_vm(vec![disk.clone()]),
            )
            .await;
    }
    for (id, _, reason, words) in &cases {
        let w = agent
            .wait_for(id, CONVERGE, reason, failed_with(reason))
            .await;
        let detail = status(&w).last_error;
        for word in words {
            assert!(
                detail.contains(word),
                "{id}: {detail:?} should say {word:?}"
            );
        }
        let kind = if *reason == "POLICY_VIOLATION" {
            "PolicyViolation"
        } else {
            "Failed"
        };
        let event = agent.event(id, kind).expect("an event naming the refusal");
        assert!(event.message.contains(words[0]), "{}", event.message);
        let (defined, _) = virsh(SYSTEM_URI, &["dominfo", id]).await;
        assert!(!defined, "{id}: no domain was defined");
    }
    assert!(
        !images.join("huge.qcow2").exists(),
        "a disk that does not fit is not created"
    );
    let too_big = agent.store.get(&cases[3].0).expect("read").expect("stored");
    assert!(
        !status(&too_big).retry_terminal,
        "no room now may be room later: retried"
    );

    // A backing file in the workload's own folder is fine.
    let id = unique("ownbacking");
    let own_dir = bed.state_dir().join("vm").join(&id);
    std::fs::create_dir_all(&own_dir).unwrap();
    let own_base = own_dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", text(&own_base), "1G"]).await;
    let own_overlay = images.join("own-overlay.qcow2");
    qcow2_over(text(&own_base), "qcow2", text(&own_overlay)).await;
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            small_vm(vec![qcow2(&own_overlay, 0)]),
        )
        .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_volumes_are_disks_in_the_workload_folder_and_the_display_has_a_password() {
    let Some(bed) = TestBed::new("volumes", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("volumes");
    let spec = VmSpec {
        managed_volumes: vec![ManagedVolumeSpec {
            name: "data".into(),
            size_gb: 1,
            ..Default::default()
        }],
        metadata: BTreeMap::from([("graphics".to_string(), "vnc".to_string())]),
        ..small_vm(Vec::<DiskConfig>::new())
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;

    let vm_dir = bed.state_dir().join("vm").join(&id);
    let volume = vm_dir.join("volumes/data.qcow2");
    let (size, format) = image_info(&volume).await;
    assert_eq!((size, format.as_str()), (1 << 30, "qcow2"));
    assert!(agent.event(&id, "DiskCreated").is_some());

    let (ok, xml) = virsh(SYSTEM_URI, &["dumpxml", "--security-info", &id]).await;
    assert!(ok, "{xml}");
    let domain = Element::parse(&xml).expect("domain XML");
    let devices = domain.child("devices").expect("devices");
    let disk = devices
        .children_named("disk")
        .find(|d| d.child("source").and_then(|s| s.attribute("file")) == volume.to_str())
        .expect("the volume is attached");
    assert_eq!(
        disk.child("target").and_then(|t| t.attribute("bus")),
        Some("virtio")
    );
    assert_eq!(disk.child_text("serial"), Some("data"));

    use std::os::unix::fs::PermissionsExt;
    let password_file = vm_dir.join("graphics-password");
    let mode = std::fs::metadata(&password_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let password = std::fs::read_to_string(&password_file).unwrap();
    let graphics = devices.child("graphics").expect("a display");
    assert_eq!(graphics.attribute("listen"), Some("127.0.0.1"));
    assert_eq!(graphics.attribute("passwd"), Some(password.trim()));
    assert_eq!(password.trim().len(), 8, "VNC uses 8 characters");
    let (_, plain) = virsh(SYSTEM_URI, &["dumpxml", &id]).await;
    assert!(
        !plain.contains(password.trim()),
        "shown only with --security-info"
    );

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(
        !vm_dir.exists(),
        "the volume and the password go with the workload"
    );
    agent.stop().await;
}
