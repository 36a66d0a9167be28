//! The VM controller against real libvirt (`qemu:///system`) and real qemu
//! guests, the real fjall store and the real controller runtime. The
//! resync is ten minutes, so whatever is repaired here is repaired by
//! lifecycle events, requeues and back-offs.
//!
//! Guests have no OS (empty disks): they run (SeaBIOS looks for a boot
//! device forever) and ignore ACPI, so every stop takes the stop timeout
//! (3 s here) and ends in a destroy.
//!
//! Needs libvirtd (hack/runtimes-up.sh), qemu-img and genisoimage. Outside
//! CI a test without libvirtd is skipped with a loud message; in CI
//! (`CI=true`) it fails.

mod vm_support;

use std::time::Duration;

use persys_api::CONDITION_READY;
use persys_api::v1::{ActualState, CloudInitConfig, DesiredState, VmSpec};
use persys_controllers::vm::Marks;
use persys_controllers::vm::xml::Element;
use tokio::time::Instant;
use vm_support::*;

/// Define + start of a qemu guest takes well under a second; a stop takes
/// the 3 s timeout.
const CONVERGE: Duration = Duration::from_secs(30);

async fn dumpxml(name: &str) -> Element {
    let (ok, xml) = virsh(SYSTEM_URI, &["dumpxml", name]).await;
    assert!(ok, "virsh dumpxml {name}: {xml}");
    Element::parse(&xml).expect("domain XML")
}

async fn domstate(name: &str) -> String {
    let (ok, state) = virsh(SYSTEM_URI, &["domstate", name]).await;
    assert!(ok, "virsh domstate {name}: {state}");
    state.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_a_new_disk_and_cloud_init_converges_to_running() {
    let Some(bed) = TestBed::new("converge", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("converge");
    let disk = bed.images().join(format!("{id}.qcow2"));
    use base64::Engine;
    let user_data = "#cloud-config\nhostname: converge\n";
    let spec = VmSpec {
        cloud_init: base64::engine::general_purpose::STANDARD.encode(user_data),
        cloud_init_config: Some(CloudInitConfig {
            network_config: "version: 2\nethernets: {}\n".into(),
            ..Default::default()
        }),
        ..small_vm(vec![qcow2(&disk, 1)])
    };
    let applied = agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let started = Instant::now();
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    eprintln!("apply → running in {:?}", started.elapsed());
    let s = status(&w);
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(s.failure_reason.is_empty(), "{s:?}");
    assert_eq!(domstate(&id).await, "running");

    // The disk: created by the agent, qcow2, 1 GiB virtual.
    let (size, format) = image_info(&disk).await;
    assert_eq!(size, 1 << 30);
    assert_eq!(format, "qcow2");

    // The domain: our marks, the disk, the seed as a read-only cdrom.
    let (_, uuid) = virsh(SYSTEM_URI, &["domuuid", &id]).await;
    assert_eq!(s.runtime_ref, uuid.trim(), "runtime_ref is the domain UUID");
    let domain = dumpxml(&id).await;
    let (_, metadata) = virsh(
        SYSTEM_URI,
        &["metadata", &id, persys_controllers::vm::marks::NAMESPACE],
    )
    .await;
    let marks = Marks::parse(&metadata).expect("persys marks in the metadata");
    assert!(marks.is(&id, &bed.scope));
    assert_eq!(marks.spec_hash, applied.spec_hash());
    assert_eq!(marks.created_disks, [disk.to_string_lossy()]);
    let seed = bed.state_dir().join("vm").join(&id).join("seed.iso");
    let devices = domain.child("devices").expect("devices");
    let cdrom = devices
        .children_named("disk")
        .find(|d| d.attribute("device") == Some("cdrom"))
        .expect("a cdrom");
    assert_eq!(
        cdrom.child("source").and_then(|s| s.attribute("file")),
        Some(seed.to_string_lossy().as_ref())
    );
    assert!(cdrom.child("readonly").is_some());
    let vda = devices
        .children_named("disk")
        .find(|d| d.attribute("device") == Some("disk"))
        .expect("a disk");
    assert_eq!(
        vda.child("target").and_then(|t| t.attribute("bus")),
        Some("virtio")
    );
    assert!(devices.child("serial").is_some(), "a serial console");
    assert_eq!(iso_volume_id(&seed), "cidata");
    assert_eq!(
        vm_support::iso_file(&seed, "user-data"),
        user_data,
        "base64 user-data is decoded"
    );
    let meta = vm_support::iso_file(&seed, "meta-data");
    assert!(meta.contains(&format!("instance-id: {id}-")), "{meta}");
    assert!(meta.contains(&format!("local-hostname: {id}")), "{meta}");
    assert!(!vm_support::iso_file(&seed, "network-config").is_empty());

    assert_eq!(s.facts["vm.disks"], format!("vda={}", disk.display()));
    assert_eq!(s.facts["vm.memory_mb"], "64");
    for reason in ["DiskCreated", "SeedBuilt", "Defined", "Started"] {
        assert!(agent.event(&id, reason).is_some(), "no {reason} event");
    }

    // Usage is sampled in the background and exposed by workload id.
    let sampler = agent.controller.usage_sampler();
    assert!(sampler.sample_once().await.expect("sample") >= 1);
    let usage = agent.controller.usage().get(&id).expect("a usage sample");
    assert!(usage.memory_bytes > 0, "{usage:?}");
    assert_eq!(usage.source, "libvirt");
    assert_eq!(agent.controller.health().await, "healthy");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_stopped_destroys_a_guest_that_ignores_acpi_then_running_starts_it_again() {
    let Some(bed) = TestBed::new("stopstart", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("stopstart");
    let spec = small_vm(vec![qcow2(&bed.images().join(format!("{id}.qcow2")), 1)]);
    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let first = agent.wait_for(&id, CONVERGE, "running", running).await;

    let asked = Instant::now();
    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    let off = agent.wait_for(&id, CONVERGE, "stopped", stopped).await;
    let took = asked.elapsed();
    assert!(
        took >= STOP_TIMEOUT,
        "an OS-less guest ignores ACPI, so the stop waits the timeout (took {took:?})"
    );
    assert_eq!(domstate(&id).await, "shut off");
    assert!(agent.event(&id, "ShuttingDown").is_some());
    let destroyed = agent.event(&id, "Destroyed").expect("a Destroyed event");
    assert!(
        destroyed.message.contains("did not power off"),
        "{}",
        destroyed.message
    );
    assert_eq!(
        status(&off).restart_count,
        0,
        "a requested stop is not a crash"
    );

    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let again = agent
        .wait_for(&id, CONVERGE, "running again", running)
        .await;
    assert_eq!(domstate(&id).await, "running");
    assert_eq!(
        status(&again).runtime_ref,
        status(&first).runtime_ref,
        "the same domain is started, not a new one defined"
    );
    assert_eq!(status(&again).restart_count, 0);
    assert_eq!(
        managed(&bed.hypervisor, &bed.scope, Some(&id)).await.len(),
        1
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_destroyed_out_of_band_is_restarted_by_lifecycle_events() {
    let Some(bed) = TestBed::new("drift", SYSTEM_URI).await else {
        return;
    };
    let mut config = bed.config();
    config.crash_loop.backoff.base = Duration::from_secs(3);
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("drift");
    agent
        .apply(&id, "r1", DesiredState::Running, small_vm(Vec::new()))
        .await;
    let before = agent.wait_for(&id, CONVERGE, "running", running).await;

    let (ok, out) = virsh(SYSTEM_URI, &["destroy", &id]).await;
    assert!(ok, "virsh destroy: {out}");
    let destroyed_at = Instant::now();
    // The resync is 10 min: only the lifecycle event can bring it back.
    let after = agent
        // The event connection may still be in its reconnect back-off; the
        // resync (10 min) is far beyond this.
        .wait_for(&id, CONVERGE, "restarted", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    eprintln!("drift repaired in {:?}", destroyed_at.elapsed());
    assert_eq!(domstate(&id).await, "running");
    assert_eq!(status(&after).runtime_ref, status(&before).runtime_ref);
    let restarted = agent.event(&id, "Restarted").expect("a Restarted event");
    assert!(
        restarted.message.contains("destroyed"),
        "{}",
        restarted.message
    );

    // A second destroy right away waits the crash-loop back-off: 3 s after
    // the previous start.
    let (ok, out) = virsh(SYSTEM_URI, &["destroy", &id]).await;
    assert!(ok, "virsh destroy: {out}");
    agent
        .wait_for(&id, Duration::from_secs(10), "restarted twice", |w| {
            running(w) && status(w).restart_count == 2
        })
        .await;
    let restart_at = |n: u32| {
        agent
            .store
            .events(&id)
            .expect("events")
            .into_iter()
            .find(|e| e.reason == "Restarted" && e.message.contains(&format!("restart {n})")))
            .unwrap_or_else(|| panic!("no event for restart {n}"))
            .first_seen_ms
    };
    let spacing = restart_at(2) - restart_at(1);
    assert!(
        spacing >= 2950,
        "the second restart backs off 3 s (it came after {spacing} ms)"
    );
    assert!(agent.event(&id, "BackOff").is_some());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_spec_stops_redefines_and_starts_the_domain() {
    let Some(bed) = TestBed::new("respec", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("respec");
    agent
        .apply(&id, "r1", DesiredState::Running, small_vm(Vec::new()))
        .await;
    let first = agent.wait_for(&id, CONVERGE, "running", running).await;

    let spec = VmSpec {
        vcpus: 2,
        memory_mb: 96,
        ..small_vm(Vec::new())
    };
    let second = agent.apply(&id, "r2", DesiredState::Running, spec).await;
    let replaced = agent.wait_for(&id, CONVERGE, "running r2", running).await;
    let domain = dumpxml(&id).await;
    assert_eq!(domain.child_text("vcpu"), Some("2"));
    assert_eq!(
        domain.child_text("currentMemory"),
        Some(&*(96 * 1024).to_string())
    );
    let marks = Marks::parse(&virsh(SYSTEM_URI, &["dumpxml", &id]).await.1).expect("marks");
    assert_eq!(marks.spec_hash, second.spec_hash());
    assert_eq!(marks.revision, "r2");
    assert_eq!(
        status(&replaced).runtime_ref,
        status(&first).runtime_ref,
        "redefined in place"
    );
    assert_eq!(status(&replaced).facts["vm.vcpus"], "2");
    assert!(
        agent.event(&id, "ShuttingDown").is_some(),
        "stopped with grace first"
    );
    assert_eq!(agent.event_count(&id, "Started"), 2);
    assert_eq!(
        managed(&bed.hypervisor, &bed.scope, Some(&id)).await.len(),
        1
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_domain_instead_of_defining_another() {
    let Some(bed) = TestBed::new("adopt", SYSTEM_URI).await else {
        return;
    };
    let id = unique("adopt");
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            small_vm(vec![qcow2(&bed.images().join(format!("{id}.qcow2")), 1)]),
        )
        .await;
    let before = agent.wait_for(&id, CONVERGE, "running", running).await;
    agent.stop().await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    eventually(CONVERGE, "the domain is adopted", || async {
        agent.event(&id, "Adopted").is_some()
    })
    .await;
    let after = agent.wait_for(&id, CONVERGE, "running", running).await;
    let domains = managed(&bed.hypervisor, &bed.scope, Some(&id)).await;
    assert_eq!(domains.len(), 1, "exactly one domain: {domains:?}");
    assert_eq!(domains[0].uuid, status(&before).runtime_ref);
    assert_eq!(status(&after).runtime_ref, status(&before).runtime_ref);
    assert_eq!(agent.event_count(&id, "Defined"), 1, "never defined twice");
    assert_eq!(agent.event_count(&id, "Started"), 1, "never started twice");
    assert_eq!(domstate(&id).await, "running");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_undefines_and_removes_only_what_the_agent_created() {
    let Some(bed) = TestBed::new("delete", SYSTEM_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("delete");
    let kept = bed.images().join(format!("{id}-kept.qcow2"));
    let output = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&kept)
        .arg("1G")
        .output()
        .await
        .expect("qemu-img");
    assert!(output.status.success());
    let created = bed.images().join(format!("{id}-new.qcow2"));
    let spec = VmSpec {
        cloud_init: "#cloud-config\n".into(),
        ..small_vm(vec![qcow2(&kept, 0), qcow2(&created, 1)])
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    assert!(created.exists());
    let vm_dir = bed.state_dir().join("vm").join(&id);
    assert!(vm_dir.join("seed.iso").exists());

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    let (exists, _) = virsh(SYSTEM_URI, &["dominfo", &id]).await;
    assert!(!exists, "the domain is undefined");
    assert!(!created.exists(), "the disk the agent created is removed");
    assert!(
        !vm_dir.exists(),
        "the seed and the VM's state folder are removed"
    );
    assert!(kept.exists(), "a disk the agent did not create survives");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_domain_with_persys_marks_is_removed_after_its_grace() {
    let Some(bed) = TestBed::new("orphan", SYSTEM_URI).await else {
        return;
    };
    let define = |name: &str, marks: Option<Marks>| {
        let metadata = marks
            .map(|m| format!("<metadata>{}</metadata>", m.to_xml("")))
            .unwrap_or_default();
        format!(
            "<domain type='kvm'><name>{name}</name>{metadata}<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><features><acpi/></features></domain>"
        )
    };
    let orphan = unique("orphan");
    let orphan_disk = bed.images().join(format!("{orphan}.qcow2"));
    std::fs::write(&orphan_disk, b"created by an agent that is gone").expect("disk file");
    let marks = |scope: &str, id: &str| Marks {
        workload_id: id.to_string(),
        scope: scope.to_string(),
        revision: "r1".into(),
        spec_hash: "gone".into(),
        generation: 1,
        created_disks: vec![orphan_disk.to_string_lossy().into_owned()],
        seed: None,
    };
    let orphan_uuid = bed
        .hypervisor
        .define("test", define(&orphan, Some(marks(&bed.scope, &orphan))))
        .await
        .expect("define the orphan");
    bed.hypervisor
        .start("test", &orphan_uuid)
        .await
        .expect("start the orphan");
    // Another agent's domain and an unmanaged one must survive.
    let other_scope = unique("other-scope");
    let _other_sweep = Sweep {
        uri: SYSTEM_URI.into(),
        scope: other_scope.clone(),
    };
    let foreign = unique("foreign");
    let foreign_uuid = bed
        .hypervisor
        .define(
            "test",
            define(&foreign, Some(marks(&other_scope, &foreign))),
        )
        .await
        .expect("define another scope's domain");
    let unmanaged = unique("unmanaged");
    let unmanaged_uuid = bed
        .hypervisor
        .define("test", define(&unmanaged, None))
        .await
        .expect("define an unmanaged domain");

    let started = Instant::now();
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    eventually(CONVERGE, "the orphan is removed", || async {
        !virsh(SYSTEM_URI, &["dominfo", &orphan]).await.0
    })
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "removed only after the 2 s grace (took {took:?})"
    );
    // The disk goes right after the domain is undefined.
    eventually(CONVERGE, "its agent-created disk goes with it", || async {
        !orphan_disk.exists()
    })
    .await;
    for (name, uuid) in [(&foreign, &foreign_uuid), (&unmanaged, &unmanaged_uuid)] {
        assert!(
            bed.hypervisor
                .state("test", uuid)
                .await
                .expect("state")
                .is_some(),
            "{name} must survive"
        );
    }
    agent.stop().await;
    bed.hypervisor
        .undefine("test", &unmanaged_uuid)
        .await
        .expect("undefine the unmanaged domain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_libvirt_reports_unknown_then_reconnects_and_converges() {
    let Some(bed) = TestBed::new("outage", SYSTEM_URI).await else {
        return;
    };
    let proxy = SocketProxy::new(bed.dir.path().join("libvirt.sock"), LIBVIRT_SOCKET.into());
    proxy.start().await;
    let mut config = bed.config();
    config.uri = system_uri_through(&proxy);
    let agent = Agent::start(&bed.state_dir(), config).await;
    let id = unique("outage");
    let spec = small_vm(Vec::new());
    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let before = agent.wait_for(&id, CONVERGE, "running", running).await;

    // libvirtd goes away (as the agent sees it); a change arrives meanwhile.
    proxy.stop().await;
    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    let unknown = agent
        .wait_for(&id, CONVERGE, "unknown", |w| {
            status(w).actual_state() == ActualState::Unknown
        })
        .await;
    let s = status(&unknown);
    assert!(
        s.last_error.contains("libvirt unreachable"),
        "{}",
        s.last_error
    );
    assert_eq!(
        s.runtime_ref,
        status(&before).runtime_ref,
        "what was known stays"
    );
    assert_eq!(
        unknown.spec.as_ref().map(|s| s.desired_state()),
        Some(DesiredState::Stopped),
        "desired state is kept"
    );
    assert_ne!(agent.controller.health().await, "healthy");
    assert_eq!(domstate(&id).await, "running", "nothing was done blind");

    // It comes back: the controller reconnects and carries the change out.
    proxy.start().await;
    let off = agent
        .wait_for(&id, CONVERGE, "stopped after reconnecting", stopped)
        .await;
    assert_eq!(status(&off).runtime_ref, status(&before).runtime_ref);
    assert_eq!(domstate(&id).await, "shut off");
    assert_eq!(agent.controller.health().await, "healthy");

    // The event connection is back too: drift is repaired by events again.
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    let (ok, out) = virsh(SYSTEM_URI, &["destroy", &id]).await;
    assert!(ok, "virsh destroy: {out}");
    agent
        // The event connection may still be in its reconnect back-off; the
        // resync (10 min) is far beyond this.
        .wait_for(&id, CONVERGE, "restarted", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    agent.stop().await;
    proxy.stop().await;
}
