//! The VM controller's lifecycle logic on libvirt's built-in test driver
//! (`test:///default`: no daemon, guests that are only bookkeeping), with
//! the real fjall store and the real controller runtime. Fast, and runs
//! everywhere libvirt's client library is installed; `tests/vm.rs` runs
//! the same lifecycle against real qemu guests.

mod vm_support;

use std::time::Duration;

use persys_api::CONDITION_READY;
use persys_api::v1::{ActualState, DesiredState, DiskConfig, NetworkConfig, VmSpec};
use persys_controllers::vm::errors::Operation;
use persys_controllers::vm::xml::Element;
use vm_support::*;

const CONVERGE: Duration = Duration::from_secs(15);

/// The DHCP host entry for `mac` on the test driver's network "default".
async fn dhcp_host(bed: &TestBed, mac: &str) -> Option<Element> {
    let xml = bed
        .hypervisor
        .call("test", Operation::UpdateNetwork, |conn| {
            Ok(conn.lookup_network_by_name("default")?.xml_desc(0)?)
        })
        .await
        .expect("the network's XML");
    let network = Element::parse(&xml).expect("network XML");
    network
        .children_named("ip")
        .filter_map(|ip| ip.child("dhcp"))
        .flat_map(|dhcp| dhcp.children_named("host").cloned().collect::<Vec<_>>())
        .find(|host| host.attribute("mac") == Some(mac))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_defined_started_stopped_started_replaced_and_deleted() {
    let Some(bed) = TestBed::new("lifecycle", TEST_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("lifecycle");
    let disk = bed.images().join(format!("{id}.qcow2"));
    // A static address on the test driver's libvirt network "default": a
    // DHCP host entry.
    let ip = format!("192.168.122.{}", fastrand::u8(100..250));
    let spec = VmSpec {
        cloud_init: "#cloud-config\nhostname: lifecycle\n".into(),
        networks: vec![NetworkConfig {
            network: "default".into(),
            mac_address: String::new(),
            ip_address: ip.clone(),
        }],
        ..small_vm(vec![qcow2(&disk, 1)])
    };

    let applied = agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let first = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = status(&first);
    assert_eq!(
        s.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("True")
    );
    let domains = managed(&bed.hypervisor, &bed.scope, Some(&id)).await;
    assert_eq!(domains.len(), 1, "{domains:?}");
    assert_eq!(
        s.runtime_ref, domains[0].uuid,
        "runtime_ref is the domain UUID"
    );
    let marks = domains[0].marks.clone().expect("marks");
    assert_eq!(marks.spec_hash, applied.spec_hash());
    assert_eq!(marks.revision, "r1");
    assert_eq!(marks.created_disks, [disk.to_string_lossy()]);
    assert!(disk.exists(), "the missing disk was created");
    let seed = bed.state_dir().join("vm").join(&id).join("seed.iso");
    assert_eq!(iso_volume_id(&seed), "cidata");
    assert_eq!(s.facts["vm.domain"], id);
    assert_eq!(s.facts["vm.vcpus"], "1");
    for reason in ["DiskCreated", "SeedBuilt", "Defined", "Started"] {
        assert!(agent.event(&id, reason).is_some(), "no {reason} event");
    }
    let mac = s.facts["vm.macs"].clone();
    let host = dhcp_host(&bed, &mac).await.expect("a DHCP host entry");
    assert_eq!(host.attribute("ip"), Some(ip.as_str()));
    assert_eq!(host.attribute("name"), Some(id.as_str()));

    agent
        .apply(&id, "r1", DesiredState::Stopped, spec.clone())
        .await;
    agent.wait_for(&id, CONVERGE, "stopped", stopped).await;
    // The test driver's state lives in this process: ask libvirt here, not
    // through a virsh process.
    let domains = managed(&bed.hypervisor, &bed.scope, Some(&id)).await;
    assert!(!domains[0].state.power.is_active(), "{domains:?}");
    assert!(agent.event(&id, "ShuttingDown").is_some());

    agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let again = agent
        .wait_for(&id, CONVERGE, "running again", running)
        .await;
    assert_eq!(
        status(&again).runtime_ref,
        s.runtime_ref,
        "started, not recreated"
    );
    assert_eq!(
        status(&again).restart_count,
        0,
        "a requested start is not a restart"
    );

    // A new spec: stopped, redefined in place (same UUID), started.

    let bigger = VmSpec {
        vcpus: 2,
        cloud_init: "#cloud-config\nhostname: bigger\n".into(),
        ..spec.clone()
    };
    let second = agent.apply(&id, "r2", DesiredState::Running, bigger).await;
    let replaced = agent
        .wait_for(&id, CONVERGE, "running r2", |w| {
            running(w) && status(w).facts.get("vm.vcpus").map(String::as_str) == Some("2")
        })
        .await;
    assert_eq!(status(&replaced).runtime_ref, s.runtime_ref);
    let domains = managed(&bed.hypervisor, &bed.scope, Some(&id)).await;
    assert_eq!(domains.len(), 1);
    let marks = domains[0].marks.clone().expect("marks");
    assert_eq!(marks.spec_hash, second.spec_hash());
    assert_eq!(marks.revision, "r2");
    assert_eq!(
        iso_file(&seed, "user-data"),
        "#cloud-config\nhostname: bigger\n",
        "the seed is rebuilt from the new user-data"
    );
    assert_eq!(agent.event_count(&id, "SeedBuilt"), 2);

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(
        managed(&bed.hypervisor, &bed.scope, Some(&id))
            .await
            .is_empty()
    );
    assert!(!disk.exists(), "the agent-created disk is removed");
    assert!(
        dhcp_host(&bed, &mac).await.is_none(),
        "the DHCP host entry is removed"
    );
    assert!(!seed.exists(), "the seed is removed");
    assert!(!bed.state_dir().join("vm").join(&id).exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_destroyed_behind_the_agents_back_is_restarted_by_events() {
    let Some(bed) = TestBed::new("drift", TEST_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("drift");
    agent
        .apply(&id, "r1", DesiredState::Running, small_vm(Vec::new()))
        .await;
    let before = agent.wait_for(&id, CONVERGE, "running", running).await;

    bed.hypervisor
        .destroy("test", &status(&before).runtime_ref)
        .await
        .expect("destroy out of band");
    let after = agent
        .wait_for(&id, Duration::from_secs(5), "restarted", |w| {
            running(w) && status(w).restart_count == 1
        })
        .await;
    assert_eq!(status(&after).runtime_ref, status(&before).runtime_ref);
    let restarted = agent.event(&id, "Restarted").expect("a Restarted event");
    assert!(
        restarted.message.contains("destroyed"),
        "{}",
        restarted.message
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_outside_the_roots_is_an_invalid_spec_and_nothing_is_created() {
    let Some(bed) = TestBed::new("invalid", TEST_URI).await else {
        return;
    };
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("invalid");
    let outside = tempfile::tempdir().expect("a folder outside the roots");
    let escape = bed.images().join("escape");
    std::os::unix::fs::symlink(outside.path(), &escape).expect("symlink");
    let spec = small_vm(vec![qcow2(&escape.join("disk.qcow2"), 1)]);
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let failed = agent
        .wait_for(&id, CONVERGE, "failed", |w| {
            status(w).actual_state() == ActualState::Failed
        })
        .await;
    let s = status(&failed);
    assert_eq!(s.failure_reason, "INVALID_SPEC");
    assert!(s.retry_terminal);
    assert!(
        s.last_error.contains("outside the VM disk roots"),
        "{}",
        s.last_error
    );
    assert!(
        managed(&bed.hypervisor, &bed.scope, Some(&id))
            .await
            .is_empty()
    );
    assert!(
        !outside.path().join("disk.qcow2").exists(),
        "no file created through the link"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_held_by_an_unmanaged_domain_is_reported_and_left_alone() {
    let Some(bed) = TestBed::new("taken", TEST_URI).await else {
        return;
    };
    let name = unique("taken");
    let foreign = format!(
        "<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
    );
    let uuid = bed
        .hypervisor
        .define("test", foreign)
        .await
        .expect("define a foreign domain");
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let id = unique("taken-wl");
    let spec = VmSpec {
        name: name.clone(),
        ..small_vm(Vec::new())
    };
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let failed = agent
        .wait_for(&id, CONVERGE, "failed", |w| {
            status(w).actual_state() == ActualState::Failed
        })
        .await;
    let s = status(&failed);
    assert_eq!(s.failure_reason, "RUNTIME_ERROR");
    assert!(!s.retry_terminal);
    assert!(
        s.message.contains("persys does not manage"),
        "{}",
        s.message
    );
    let state = bed.hypervisor.state("test", &uuid).await.expect("state");
    assert!(
        state.is_some_and(|s| !s.power.is_active()),
        "the foreign domain is untouched"
    );
    agent.stop().await;
    bed.hypervisor
        .undefine("test", &uuid)
        .await
        .expect("undefine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_libvirt_is_reported_unknown_and_unhealthy() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = persys_controllers::vm::VmConfig::new(
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        dir.path().join("state"),
    );
    config.reconnect_backoff = fast_backoff();
    let agent = Agent::start(&dir.path().join("state"), config).await;
    let id = unique("unreachable");
    agent
        .apply(
            &id,
            "r1",
            DesiredState::Running,
            small_vm(Vec::<DiskConfig>::new()),
        )
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
        s.condition(CONDITION_READY).map(|c| c.reason.as_str()),
        Some("RuntimeUnreachable")
    );
    assert_eq!(
        unknown.spec.as_ref().map(|s| s.desired_state()),
        Some(DesiredState::Running),
        "desired state is never rewritten"
    );
    let health = agent.controller.health().await;
    assert_ne!(health, "healthy");
    assert!(health.contains("libvirt unreachable"), "{health}");
    agent.stop().await;
}
