//! How the VM controller is set up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::crash_loop::CrashLoopPolicy;

/// The scope an agent marks its domains with unless told otherwise.
pub const DEFAULT_SCOPE: &str = "default";

/// Where libvirt keeps images by default: always a disk root.
pub const LIBVIRT_IMAGES: &str = "/var/lib/libvirt/images";

/// Settings of a [`super::VmController`].
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The libvirt connection URI (`PERSYS_LIBVIRT_URI`, default
    /// `qemu:///system`).
    pub uri: String,
    /// The agent's state directory: each VM's own files (seed ISO, managed
    /// volumes, the list of disks the agent created, the display password)
    /// live under `<state>/vm/<id>/`.
    pub state_dir: PathBuf,
    /// Disk files must lie under one of these (checked again at reconcile
    /// time, after the API server's check: defence in depth).
    pub disk_roots: Vec<PathBuf>,
    /// ACPI shutdown, then destroy after this long (`PERSYS_VM_STOP_TIMEOUT`).
    pub stop_timeout: Duration,
    /// A managed domain whose workload is gone is removed after this long.
    /// Longer than the scheduler's 300 s re-list, so an agent that lost its
    /// state gets the workload re-applied and adopts the domain instead.
    pub orphan_grace: Duration,
    /// `kvm` or `qemu` (`PERSYS_VM_DOMAIN_TYPE`); none: `kvm` when
    /// `/dev/kvm` can be opened read-write, else `qemu` (TCG).
    pub domain_type: Option<String>,
    /// The value of the `scope` mark: an agent adopts, watches and collects
    /// only domains of its own scope.
    pub scope: String,
    /// Restarts of a guest that stopped on its own (crash, out-of-band
    /// destroy): kubelet's 10 s doubling to 5 min.
    pub crash_loop: CrashLoopPolicy,
    /// Reconnects to libvirtd after the connection was lost.
    pub reconnect_backoff: Backoff,
    /// How often running domains' usage is sampled.
    pub usage_interval: Duration,
}

impl VmConfig {
    /// Defaults for `uri` with the agent state in `state_dir`.
    pub fn new(uri: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        VmConfig {
            uri: uri.into(),
            disk_roots: default_disk_roots(&state_dir),
            state_dir,
            stop_timeout: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(600),
            domain_type: None,
            scope: DEFAULT_SCOPE.to_string(),
            crash_loop: CrashLoopPolicy::default(),
            reconnect_backoff: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
                jitter: 0.2,
            },
            usage_interval: Duration::from_secs(15),
        }
    }

    /// Where the files of VM `id` live: `<state>/vm/<id>`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        vm_root(&self.state_dir).join(id)
    }
}

/// `<state>/vm`: the folder of every VM's own files (seed, managed
/// volumes, the record of created disks, the display password).
pub fn vm_root(state_dir: &Path) -> PathBuf {
    state_dir.join("vm")
}

/// `/var/lib/libvirt/images` and `<state>/vm`, as the API server uses.
pub fn default_disk_roots(state_dir: &Path) -> Vec<PathBuf> {
    vec![PathBuf::from(LIBVIRT_IMAGES), vm_root(state_dir)]
}

/// The domain type to define: the override when given, else `kvm` when
/// `/dev/kvm` can be opened read-write (what qemu needs), else `qemu`.
pub fn resolve_domain_type(override_type: Option<&str>) -> String {
    if let Some(kind) = override_type.map(str::trim).filter(|k| !k.is_empty()) {
        return kind.to_ascii_lowercase();
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm { "kvm" } else { "qemu" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_wins_over_detection() {
        assert_eq!(resolve_domain_type(Some(" QEMU ")), "qemu");
        let detected = resolve_domain_type(None);
        assert!(detected == "kvm" || detected == "qemu", "{detected}");
        assert_eq!(resolve_domain_type(Some("")), detected);
    }

    #[test]
    fn defaults_follow_the_agent() {
        let config = VmConfig::new("qemu:///system", "/var/lib/persys/state");
        assert_eq!(config.stop_timeout, Duration::from_secs(30));
        assert_eq!(
            config.disk_roots,
            [
                PathBuf::from("/var/lib/libvirt/images"),
                PathBuf::from("/var/lib/persys/state/vm")
            ]
        );
        assert_eq!(
            config.vm_dir("web"),
            PathBuf::from("/var/lib/persys/state/vm/web")
        );
    }
}
