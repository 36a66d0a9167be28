#![allow(dead_code)] // each test binary uses part of the support module
//! Harness for the VM controller's tests: real libvirt (`qemu:///system`,
//! or the daemonless `test:///default`), a real fjall store in a temporary
//! directory, and the real informer and controller runner in-process.
//!
//! Tests run in parallel against one libvirtd, so every test gets its own
//! scope (the `scope` mark: its controller never sees another test's
//! domains), unique workload ids, and a [`Sweep`] that destroys and
//! undefines whatever the test left behind, even when it fails.

#[path = "../harness/mod.rs"]
mod harness;
#[allow(unused_imports)] // each test binary uses part of it
pub use harness::{RESYNC, SocketProxy, eventually, skip, unique};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use persys_api::v1::{ActualState, DesiredState, DiskConfig, VmSpec, Workload, workload_spec};
use persys_controllers::backoff::Backoff;
use persys_controllers::vm::libvirt::{FoundDomain, Hypervisor};
use persys_controllers::vm::{CrashLoopPolicy, VmConfig, VmController};

pub const SYSTEM_URI: &str = "qemu:///system";
pub const TEST_URI: &str = "test:///default";

/// The stop timeout of the tests' controllers: the guests have no OS and
/// ignore ACPI, so every stop waits this long and then destroys.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// A hypervisor handle on `uri` when libvirt answers there, or `None` when
/// it does not and this is not CI (the test is then skipped, loudly). In
/// CI a missing libvirtd fails the test.
pub async fn libvirt_or_skip(test: &str, uri: &str) -> Option<Hypervisor> {
    let hypervisor = Hypervisor::new(uri, fast_backoff());
    match hypervisor.ping().await {
        Ok(_) => Some(hypervisor),
        Err(error) => {
            skip(test, &format!("libvirt at {uri}"), &error);
            None
        }
    }
}

pub fn fast_backoff() -> Backoff {
    Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(1),
        jitter: 0.0,
    }
}

/// An agent in-process: the store, the informer and the VM controller.
pub type Agent = harness::Agent<VmController>;

impl Agent {
    /// Opens the store in `dir` and starts the informer and the controller
    /// with its lifecycle-event trigger.
    pub async fn start(dir: &Path, config: VmConfig) -> Agent {
        Agent::start_with(
            dir,
            persys_api::FINALIZER_VM,
            |store, _| VmController::new(config, Arc::new(store.clone())),
            |controller, informer| controller.trigger(informer.cache()),
        )
        .await
    }

    pub async fn apply(
        &self,
        id: &str,
        revision: &str,
        desired: DesiredState,
        spec: VmSpec,
    ) -> Arc<Workload> {
        self.apply_spec(id, revision, desired, workload_spec::Spec::Vm(spec))
            .await
    }
}

/// Running, as of the current generation.
pub fn running(w: &Workload) -> bool {
    w.status.as_ref().is_some_and(|s| {
        s.actual_state() == ActualState::Running && s.observed_generation == w.generation()
    })
}

/// Stopped, as of the current generation.
pub fn stopped(w: &Workload) -> bool {
    w.status.as_ref().is_some_and(|s| {
        s.actual_state() == ActualState::Stopped && s.observed_generation == w.generation()
    })
}

pub fn status(w: &Workload) -> persys_api::v1::ObjectStatus {
    w.status.clone().unwrap_or_default()
}

/// A guest without an OS: small, no network, booting from nothing (it still
/// runs — SeaBIOS keeps looking for a boot device — and ignores ACPI).
pub fn small_vm(disks: Vec<DiskConfig>) -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mb: 64,
        disks,
        ..Default::default()
    }
}

pub fn qcow2(path: &Path, size_gb: i64) -> DiskConfig {
    DiskConfig {
        path: path.to_string_lossy().into_owned(),
        format: "qcow2".into(),
        size_gb,
        r#type: "disk".into(),
        ..Default::default()
    }
}

/// Runs `virsh -c <uri> <args>`; returns (success, stdout + stderr).
pub async fn virsh(uri: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .await
        .expect("run virsh");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// The virtual size and format of an image, from `qemu-img info`.
pub async fn image_info(path: &Path) -> (u64, String) {
    let output = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .await
        .expect("run qemu-img");
    assert!(
        output.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("qemu-img JSON");
    (
        info["virtual-size"].as_u64().expect("virtual-size"),
        info["format"].as_str().unwrap_or("").to_string(),
    )
}

/// The volume id of an ISO 9660 image (32 bytes at offset 40 of the
/// primary volume descriptor, sector 16).
pub fn iso_volume_id(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the ISO");
    let start = 16 * 2048 + 40;
    String::from_utf8_lossy(&bytes[start..start + 32])
        .trim()
        .to_string()
}

/// A file of an ISO 9660 image (Rock Ridge names), read with `isoinfo`
/// (from genisoimage): the seed's clear files do not outlive the ISO.
pub fn iso_file(path: &Path, name: &str) -> String {
    let output = std::process::Command::new("isoinfo")
        .args(["-R", "-i"])
        .arg(path)
        .args(["-x", &format!("/{name}")])
        .output()
        .expect("run isoinfo");
    assert!(
        output.status.success(),
        "isoinfo {}: {output:?}",
        path.display()
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// The domains marked with `scope` (optionally of one workload).
pub async fn managed(hypervisor: &Hypervisor, scope: &str, id: Option<&str>) -> Vec<FoundDomain> {
    hypervisor
        .list_managed(scope)
        .await
        .expect("list managed domains")
        .into_iter()
        .filter(|d| id.is_none_or(|id| d.marks.as_ref().is_some_and(|m| m.workload_id == id)))
        .collect()
}

/// Destroys and undefines every domain of a scope when dropped, so a failed
/// test leaves nothing running on the shared libvirtd.
pub struct Sweep {
    pub uri: String,
    pub scope: String,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let (uri, scope) = (self.uri.clone(), self.scope.clone());
        // Drop cannot await, and may run inside the test's runtime: sweep on
        // a thread of its own with a runtime of its own.
        let swept = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let hypervisor = Hypervisor::new(uri, fast_backoff());
                for domain in hypervisor.list_managed(&scope).await.ok()? {
                    let _ = hypervisor.destroy("sweep", &domain.uuid).await;
                    let _ = hypervisor.undefine("sweep", &domain.uuid).await;
                }
                Some(())
            })
        })
        .join();
        if !matches!(swept, Ok(Some(()))) {
            eprintln!("sweeping scope {} failed", self.scope);
        }
    }
}

/// A test's surroundings: a scope, a state directory, an image root, the
/// sweep.
pub struct TestBed {
    pub uri: String,
    pub scope: String,
    pub dir: tempfile::TempDir,
    pub hypervisor: Hypervisor,
    _sweep: Sweep,
}

impl TestBed {
    pub async fn new(test: &str, uri: &str) -> Option<TestBed> {
        let hypervisor = libvirt_or_skip(test, uri).await?;
        let scope = unique(&format!("test-{test}"));
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir_all(dir.path().join("images")).expect("the image root");
        Some(TestBed {
            uri: uri.to_string(),
            _sweep: Sweep {
                uri: uri.to_string(),
                scope: scope.clone(),
            },
            scope,
            dir,
            hypervisor,
        })
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// An image root of the test's own (a disk root of its controller).
    pub fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Controller settings for tests: its own scope and roots, a 3 s stop
    /// timeout, a 2 s orphan grace, 1 s crash-loop base.
    pub fn config(&self) -> VmConfig {
        let mut config = VmConfig::new(&self.uri, self.state_dir());
        config.scope = self.scope.clone();
        config.disk_roots = vec![self.images(), self.state_dir().join("vm")];
        config.stop_timeout = STOP_TIMEOUT;
        config.orphan_grace = Duration::from_secs(2);
        config.crash_loop = CrashLoopPolicy {
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(30),
                jitter: 0.0,
            },
            reset_after: Duration::from_secs(600),
        };
        config.reconnect_backoff = fast_backoff();
        config.usage_interval = Duration::from_secs(1);
        config
    }
}

/// libvirtd's socket for `qemu:///system`.
pub const LIBVIRT_SOCKET: &str = "/var/run/libvirt/libvirt-sock";

/// The URI of `qemu:///system` through `proxy` (a [`SocketProxy`] in front
/// of [`LIBVIRT_SOCKET`]).
pub fn system_uri_through(proxy: &SocketProxy) -> String {
    format!("qemu+unix:///system?socket={}", proxy.path().display())
}
