//! Taking over the domains the Go agent left defined, on real libvirt
//! (`qemu:///system`): each domain here is defined as the Go agent defines
//! one (named by the workload id, type kvm, machine pc-q35-5.2, no
//! metadata), and the workload is stored as the import
//! leaves it (with the spec's own `name`, which the Go agent ignored).
//!
//! Needs libvirtd (hack/runtimes-up.sh) and qemu-img.

mod vm_support;

use std::path::Path;
use std::time::Duration;

use persys_api::v1::{DesiredState, DiskConfig, VmSpec};
use persys_controllers::vm::Marks;
use vm_support::*;

const CONVERGE: Duration = Duration::from_secs(30);

/// Destroys and undefines the named domains when dropped: the Go agent's
/// carry no marks, so the test bed's sweep does not see them.
struct Named(Vec<String>);

impl Drop for Named {
    fn drop(&mut self) {
        for name in &self.0 {
            for args in [["destroy", name.as_str()], ["undefine", name.as_str()]] {
                let _ = std::process::Command::new("virsh")
                    .args(["-c", SYSTEM_URI])
                    .args(args)
                    .output();
            }
        }
    }
}

/// The domain XML the Go agent generates for `spec` under `name`, but for
/// its `<cpu mode='host-passthrough'/>`, which qemu refuses in the nested
/// guests these tests run in (adoption does not look at the CPU mode).
fn go_domain_xml(name: &str, spec: &VmSpec) -> String {
    let mut disks = String::new();
    for disk in &spec.disks {
        disks.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/><target dev='{}' bus='virtio'/></disk>",
            disk.format, disk.path, disk.device
        ));
    }
    format!(
        "<domain type='kvm'><name>{name}</name>\
         <memory unit='MiB'>{m}</memory><currentMemory unit='MiB'>{m}</currentMemory>\
         <vcpu placement='static'>{v}</vcpu>\
         <os><type arch='x86_64' machine='pc-q35-5.2'>hvm</type></os><features></features>\
         <clock offset='utc'></clock>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}\
         <serial type='pty'><target port='0'/></serial>\
         <console type='pty'><target type='serial' port='0'/></console>\
         <graphics type='vnc' port='-1' listen='0.0.0.0'/></devices></domain>",
        m = spec.memory_mb,
        v = spec.vcpus,
    )
}

/// Defines and starts `name` as the Go agent does; answers its UUID.
async fn run_as_go_agent(bed: &TestBed, name: &str, spec: &VmSpec) -> String {
    let uuid = bed
        .hypervisor
        .define("test", go_domain_xml(name, spec))
        .await
        .expect("define as the Go agent does");
    bed.hypervisor.start("test", &uuid).await.expect("start");
    uuid
}

/// The domain's id: libvirt gives a running domain a new one at every
/// start, so an unchanged id means no restart.
async fn domid(name: &str) -> String {
    let (ok, id) = virsh(SYSTEM_URI, &["domid", name]).await;
    assert!(ok, "virsh domid {name}: {id}");
    id.trim().to_string()
}

async fn domuuid(name: &str) -> Option<String> {
    let (ok, uuid) = virsh(SYSTEM_URI, &["domuuid", name]).await;
    ok.then(|| uuid.trim().to_string())
}

async fn marks_of(name: &str) -> Option<Marks> {
    let (ok, metadata) = virsh(
        SYSTEM_URI,
        &["metadata", name, persys_controllers::vm::marks::NAMESPACE],
    )
    .await;
    if !ok {
        return None;
    }
    Marks::parse(&metadata)
}

/// A disk file the Go agent created (qemu-img), under the test's root.
async fn go_disk(dir: &Path, name: &str) -> DiskConfig {
    let path = dir.join(format!("{name}.qcow2"));
    let made = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .status()
        .await
        .expect("run qemu-img");
    assert!(made.success(), "qemu-img create {}", path.display());
    DiskConfig {
        path: path.to_string_lossy().into_owned(),
        device: "vda".into(),
        format: "qcow2".into(),
        r#type: "disk".into(),
        ..Default::default()
    }
}

fn go_events(agent: &Agent, id: &str, reason: &str) -> Vec<persys_api::v1::Event> {
    agent
        .events(id, reason)
        .into_iter()
        .filter(|e| e.message.contains("Go agent"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_domain_that_matches_its_spec_is_adopted_without_a_restart_and_its_disk_outlives_it()
 {
    let Some(bed) = TestBed::new("adopt-go-vm", SYSTEM_URI).await else {
        return;
    };
    let id = unique("adopt-go-vm");
    let _named = Named(vec![id.clone()]);
    let disk = go_disk(&bed.images(), &id).await;
    let spec = VmSpec {
        name: format!("{id}-spec-name"),
        ..small_vm(vec![disk.clone()])
    };
    let uuid = run_as_go_agent(&bed, &id, &spec).await;
    let started_as = domid(&id).await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let applied = agent
        .apply(&id, "r1", DesiredState::Running, spec.clone())
        .await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = status(&w);
    assert_eq!(s.runtime_ref, uuid, "the same domain");
    assert_eq!(domid(&id).await, started_as, "not restarted");
    assert_eq!(s.facts.get("adopted.domain-name"), Some(&id));
    let marks = marks_of(&id).await.expect("marked as managed");
    assert!(marks.is(&id, &bed.scope), "{marks:?}");
    assert_eq!(marks.spec_hash, applied.spec_hash());
    assert!(
        marks.created_disks.is_empty(),
        "its disk is not the agent's"
    );
    assert_eq!(go_events(&agent, &id, "Adopted").len(), 1);
    assert!(
        domuuid(&spec.name).await.is_none(),
        "no second domain under the spec's name"
    );
    agent.stop().await;

    // A restarted agent keeps it, under its name, as it runs.
    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    eventually(CONVERGE, "the restarted agent has looked at it", || async {
        agent
            .event(&id, "Adopted")
            .is_some_and(|e| !e.message.contains("Go agent"))
            || agent.events(&id, "Adopted").len() > 1
    })
    .await;
    agent.wait_for(&id, CONVERGE, "running", running).await;
    assert_eq!(domid(&id).await, started_as, "still not restarted");
    assert_eq!(
        go_events(&agent, &id, "Adopted").len(),
        1,
        "taken over once"
    );
    assert!(domuuid(&spec.name).await.is_none());

    agent.store.delete(&id).await.expect("delete");
    agent.wait_gone(&id, CONVERGE).await;
    assert!(domuuid(&id).await.is_none(), "undefined with its workload");
    assert!(
        Path::new(&disk.path).exists(),
        "the Go agent's disk is kept"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_domain_that_differs_from_its_spec_is_replaced_once_naming_the_field() {
    let Some(bed) = TestBed::new("adopt-go-vm-differs", SYSTEM_URI).await else {
        return;
    };
    let id = unique("adopt-go-vm-differs");
    let _named = Named(vec![id.clone()]);
    let disk = go_disk(&bed.images(), &id).await;
    let spec = small_vm(vec![disk.clone()]);
    let ran = VmSpec {
        memory_mb: 96,
        ..spec.clone()
    };
    let go_uuid = run_as_go_agent(&bed, &id, &ran).await;

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    agent.apply(&id, "r1", DesiredState::Running, spec).await;
    let w = agent.wait_for(&id, CONVERGE, "running", running).await;
    let s = status(&w);
    assert_ne!(s.runtime_ref, go_uuid, "replaced");
    let replacing = go_events(&agent, &id, "Replacing");
    assert_eq!(replacing.len(), 1, "{replacing:?}");
    assert_eq!(replacing[0].count, 1, "replaced once");
    assert!(
        replacing[0].message.contains("memory_mb"),
        "{}",
        replacing[0].message
    );
    assert!(!s.facts.contains_key("adopted.domain-name"));
    let marks = marks_of(&id).await.expect("the new domain is marked");
    assert!(marks.is(&id, &bed.scope));
    assert!(
        marks.created_disks.is_empty(),
        "the Go agent's disk was there already: not the agent's"
    );
    assert!(Path::new(&disk.path).exists(), "the disk is kept");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_that_are_not_the_go_agents_by_name_are_never_touched() {
    let Some(bed) = TestBed::new("adopt-go-vm-not", SYSTEM_URI).await else {
        return;
    };
    // Unmarked, named by no stored workload.
    let ghost = unique("adopt-go-vm-ghost");
    // Unmarked, named by a stored workload's spec.name, not its id.
    let id = unique("adopt-go-vm-named");
    let spec_named = format!("{id}-spec-name");
    let _named = Named(vec![ghost.clone(), spec_named.clone(), id.clone()]);
    let spec = small_vm(Vec::new());
    run_as_go_agent(&bed, &ghost, &spec).await;
    run_as_go_agent(&bed, &spec_named, &spec).await;
    let before = [
        (ghost.clone(), domid(&ghost).await),
        (spec_named.clone(), domid(&spec_named).await),
    ];
    // This agent's orphan: collected after the grace, by which time the
    // others would have been too.
    let orphan = unique("adopt-go-vm-orphan");
    let orphan_uuid = bed
        .hypervisor
        .define(
            "test",
            format!(
                "<domain type='kvm'><name>{orphan}</name><metadata>{}</metadata><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>",
                Marks {
                    workload_id: orphan.clone(),
                    scope: bed.scope.clone(),
                    revision: "r1".into(),
                    spec_hash: "gone".into(),
                    generation: 1,
                    created_disks: Vec::new(),
                    seed: None,
                }
                .to_xml("")
            ),
        )
        .await
        .expect("define the orphan");
    bed.hypervisor
        .start("test", &orphan_uuid)
        .await
        .expect("start");

    let agent = Agent::start(&bed.state_dir(), bed.config()).await;
    let stored = VmSpec {
        name: spec_named.clone(),
        ..spec
    };
    agent.apply(&id, "r1", DesiredState::Running, stored).await;
    agent
        .wait_for(&id, CONVERGE, "refused the taken name", |w| {
            status(w).last_error.contains("persys does not manage")
        })
        .await;
    eventually(CONVERGE, "the agent's own orphan is collected", || async {
        !virsh(SYSTEM_URI, &["dominfo", &orphan]).await.0
    })
    .await;
    for (name, started_as) in before {
        assert_eq!(
            domid(&name).await,
            started_as,
            "{name} was restarted or stopped"
        );
        assert!(marks_of(&name).await.is_none(), "{name} was marked");
    }
    assert!(
        domuuid(&id).await.is_none(),
        "nothing was defined under the id"
    );
    assert!(agent.event(&id, "Adopted").is_none());
    agent.stop().await;
}
