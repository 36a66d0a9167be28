//! What the agent costs over driving libvirt by hand, on real qemu guests.
//!
//! `cargo bench -p persys-controllers --bench vm` prints, side by side, in
//! the same run (interleaved, so both see the same host):
//! - a diskless guest: apply → Running through the store and the VM
//!   controller, against `virsh define` + `virsh start` of the same XML;
//! - a guest with a new 1 GiB qcow2 disk and cloud-init: the same apply,
//!   against `qemu-img create` + `genisoimage` + `virsh define` +
//!   `virsh start`, as a script would do it.
//!
//! Needs libvirtd (hack/runtimes-up.sh), qemu-img and genisoimage.

#[path = "../tests/vm_support/mod.rs"]
mod vm_support;

use std::path::Path;
use std::time::Duration;

use persys_api::v1::{DesiredState, VmSpec};
use persys_controllers::vm::Marks;
use persys_controllers::vm::disks::{Bus, DiskFormat, DiskKind, DiskPlan};
use persys_controllers::vm::domain_xml::DomainPlan;
use tokio::time::Instant;
use vm_support::*;

const RUNS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(120);

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / samples.len() as u32
}

async fn run(program: &str, args: &[&str]) {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The XML a script would write: the same domain the agent defines (its
/// marks carry the bench's scope, so the sweep removes it).
fn domain_xml(name: &str, scope: &str, domain_type: &str, disks: Vec<DiskPlan>) -> String {
    DomainPlan {
        name: name.to_string(),
        uuid: None,
        domain_type: domain_type.to_string(),
        vcpus: 1,
        memory_mib: 64,
        disks,
        nics: Vec::new(),
        graphics: None,
        graphics_password: None,
        console_log: None,
        marks: Marks {
            workload_id: name.to_string(),
            scope: scope.to_string(),
            revision: "direct".into(),
            spec_hash: "direct".into(),
            generation: 1,
            created_disks: Vec::new(),
            seed: None,
        },
    }
    .to_xml()
}

/// The script: (disk, seed,) define, start. Returns how long it took.
async fn by_hand(
    dir: &Path,
    name: &str,
    scope: &str,
    domain_type: &str,
    with_disk: bool,
) -> Duration {
    let xml_path = dir.join(format!("{name}.xml"));
    let started = Instant::now();
    let mut disks = Vec::new();
    if with_disk {
        let disk = dir.join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &disk.to_string_lossy(), "1G"],
        )
        .await;
        let seed_dir = dir.join(format!("{name}-seed"));
        std::fs::create_dir_all(&seed_dir).expect("seed folder");
        std::fs::write(seed_dir.join("user-data"), "#cloud-config\n").expect("user-data");
        std::fs::write(
            seed_dir.join("meta-data"),
            format!("instance-id: {name}\nlocal-hostname: {name}\n"),
        )
        .expect("meta-data");
        let seed = dir.join(format!("{name}-seed.iso"));
        run(
            "genisoimage",
            &[
                "-quiet",
                "-output",
                &seed.to_string_lossy(),
                "-volid",
                "cidata",
                "-joliet",
                "-rock",
                &seed_dir.join("user-data").to_string_lossy(),
                &seed_dir.join("meta-data").to_string_lossy(),
            ],
        )
        .await;
        disks.push(DiskPlan {
            path: disk,
            format: DiskFormat::Qcow2,
            kind: DiskKind::Disk,
            target: "vda".into(),
            bus: Bus::Virtio,
            boot_order: Some(1),
            size_gb: 1,
            is_seed: false,
            field: "spec.vm.disks[0]".into(),
            read_only: false,
            serial: None,
        });
        disks.push(DiskPlan {
            path: seed,
            format: DiskFormat::Iso,
            kind: DiskKind::Cdrom,
            target: "sda".into(),
            bus: Bus::Sata,
            boot_order: None,
            size_gb: 0,
            is_seed: true,
            field: "seed".into(),
            read_only: true,
            serial: None,
        });
    }
    std::fs::write(&xml_path, domain_xml(name, scope, domain_type, disks)).expect("write XML");
    run(
        "virsh",
        &["-c", SYSTEM_URI, "define", &xml_path.to_string_lossy()],
    )
    .await;
    run("virsh", &["-c", SYSTEM_URI, "start", name]).await;
    started.elapsed()
}

async fn remove_by_hand(name: &str) {
    let _ = virsh(SYSTEM_URI, &["destroy", name]).await;
    let _ = virsh(SYSTEM_URI, &["undefine", name]).await;
}

/// Through the agent: apply, then wait for the status to say Running.
async fn through_agent(agent: &Agent, id: &str, spec: VmSpec) -> Duration {
    let started = Instant::now();
    agent.apply(id, "r1", DesiredState::Running, spec).await;
    agent.wait_for(id, DEADLINE, "running", running).await;
    started.elapsed()
}

async fn remove_through_agent(agent: &Agent, id: &str) {
    agent.store.delete(id).await.expect("delete");
    agent.wait_gone(id, DEADLINE).await;
}

fn report(title: &str, agent: &[Duration], direct: &[Duration], direct_name: &str) {
    let (a, d) = (median(agent), median(direct));
    println!("{title} (median of {RUNS}; mean in brackets)");
    println!(
        "  apply → Running, store + controller : {:>10}  [{}]",
        ms(a),
        ms(mean(agent))
    );
    println!("  {direct_name:<36}: {:>10}  [{}]", ms(d), ms(mean(direct)));
    println!(
        "  ratio                                : {:>10.2}x  (target ≤ 1.3)",
        a.as_secs_f64() / d.as_secs_f64()
    );
    println!();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(bed) = TestBed::new("bench", SYSTEM_URI).await else {
        eprintln!("no libvirtd: nothing to measure");
        return;
    };
    let mut config = bed.config();
    // Guests without an OS ignore ACPI: tear down at once between runs.
    config.stop_timeout = Duration::ZERO;
    // The hand-made domains carry the bench's marks: not orphans to collect.
    config.orphan_grace = Duration::from_secs(3600);
    let agent = Agent::start(&bed.state_dir(), config).await;
    let domain_type = agent.controller.domain_type().to_string();
    let direct_dir = bed.images().join("direct");
    std::fs::create_dir_all(&direct_dir).expect("direct folder");
    println!("VM controller benchmark (libvirt at {SYSTEM_URI}, domain type {domain_type})");
    println!();

    // Warm up both paths once (first qemu start, page cache).
    let warm = format!("{}-warm", bed.scope);
    through_agent(&agent, &warm, small_vm(Vec::new())).await;
    remove_through_agent(&agent, &warm).await;
    by_hand(
        &direct_dir,
        &format!("{warm}-direct"),
        &bed.scope,
        &domain_type,
        false,
    )
    .await;
    remove_by_hand(&format!("{warm}-direct")).await;

    let (mut agent_times, mut direct_times) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let id = format!("{}-a{i}", bed.scope);
        agent_times.push(through_agent(&agent, &id, small_vm(Vec::new())).await);
        remove_through_agent(&agent, &id).await;
        let name = format!("{}-d{i}", bed.scope);
        direct_times.push(by_hand(&direct_dir, &name, &bed.scope, &domain_type, false).await);
        remove_by_hand(&name).await;
    }
    report(
        "diskless guest",
        &agent_times,
        &direct_times,
        "virsh define + virsh start",
    );

    let (mut agent_times, mut direct_times) = (Vec::new(), Vec::new());
    for i in 0..RUNS {
        let id = format!("{}-da{i}", bed.scope);
        let spec = VmSpec {
            cloud_init: "#cloud-config\n".into(),
            ..small_vm(vec![qcow2(&bed.images().join(format!("{id}.qcow2")), 1)])
        };
        agent_times.push(through_agent(&agent, &id, spec).await);
        remove_through_agent(&agent, &id).await;
        let name = format!("{}-dd{i}", bed.scope);
        direct_times.push(by_hand(&direct_dir, &name, &bed.scope, &domain_type, true).await);
        remove_by_hand(&name).await;
    }
    report(
        "1 GiB qcow2 disk + cloud-init seed",
        &agent_times,
        &direct_times,
        "qemu-img + genisoimage + virsh ×2",
    );
    agent.stop().await;
    // `bed` sweeps every domain of the scope when dropped.
}
