//! The node's workload policy: what a workload spec may ask of this host.
//!
//! One value, [`NodePolicy`], read by the agent at start
//! (`PERSYS_POLICY_FILE` and its environment overrides) and handed to each
//! runtime's validator. Every switch is closed by default: a spec that
//! needs more is refused at apply with the switch's name (its [`Rule`]), so
//! the operator knows what to open. Some things no switch opens (the
//! Docker socket, the agent's state and keys, the host's critical paths,
//! `docker0`): those refusals name `always`.
//!
//! The shape, as `persys-agent policy show` prints it:
//!
//! ```yaml
//! host_paths:
//!   allowed_roots: [/var/lib/persys/volumes]
//! containers:
//!   privileged: false
//!   host_network: false
//!   host_pid: false
//!   host_ipc: false
//!   host_userns: false
//!   devices: false
//!   capabilities: []
//!   security_opt: false
//!   sysctls: false
//! compose:
//!   build: false
//!   external: false
//! vm:
//!   networks: [default]
//!   bridges: []
//! ceilings:
//!   node: {workloads: 1000, vcpus: …, memory_mib: …, disk_gib: …}
//!   workload: {vcpus: …, memory_mib: …, disk_gib: …}
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The root bind mounts may use when the policy names none.
pub const DEFAULT_VOLUME_ROOT: &str = "/var/lib/persys/volumes";

/// libvirt's own NAT network, the only one open by default.
pub const DEFAULT_VM_NETWORK: &str = "default";

/// Docker's bridge: a VM on it would sit among the node's containers.
pub const DOCKER_BRIDGE: &str = "docker0";

/// Workloads a node holds by default (every stored workload counts).
pub const DEFAULT_MAX_WORKLOADS: u64 = 1000;

/// What a workload spec may ask of this node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodePolicy {
    pub host_paths: HostPaths,
    pub containers: Containers,
    pub compose: Compose,
    pub vm: Vm,
    pub ceilings: Ceilings,
}

/// Host directories bind mounts (container `volumes`, compose bind
/// sources) may lie under. The Docker socket, the agent's state directory
/// and key, the TLS key and the host's critical paths are refused even
/// under an allowed root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostPaths {
    pub allowed_roots: Vec<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            allowed_roots: vec![PathBuf::from(DEFAULT_VOLUME_ROOT)],
        }
    }
}

/// Host privileges a container (a compose service) may ask for. The
/// container spec of the API has none of these fields; compose files do.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Containers {
    /// `privileged: true`.
    pub privileged: bool,
    /// `network_mode: host`, or joining another container's network.
    pub host_network: bool,
    /// `pid: host`, or another container's.
    pub host_pid: bool,
    /// `ipc: host`, or another container's.
    pub host_ipc: bool,
    /// `userns_mode: host`.
    pub host_userns: bool,
    /// `devices`, `device_cgroup_rules`, `gpus`.
    pub devices: bool,
    /// Capabilities `cap_add` may name (without `CAP_`; `ALL` opens all).
    pub capabilities: Vec<String>,
    /// `security_opt` beyond `no-new-privileges` (unconfined seccomp or
    /// AppArmor, a seccomp profile file, SELinux labels).
    pub security_opt: bool,
    /// `sysctls` beyond Kubernetes' safe set.
    pub sysctls: bool,
}

/// Compose features beyond running images.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compose {
    /// `build`: building images on the node (contexts must still lie in
    /// the project directory).
    pub build: bool,
    /// `external` networks, volumes, secrets and configs: things made
    /// outside the project, possibly another workload's.
    pub external: bool,
}

/// Where VM network interfaces may attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Vm {
    /// libvirt networks by name (`user` is qemu's user-mode networking).
    pub networks: Vec<String>,
    /// Host bridges by name; `docker0` is never allowed.
    pub bridges: Vec<String>,
}

impl Default for Vm {
    fn default() -> Self {
        Vm {
            networks: vec![DEFAULT_VM_NETWORK.to_string()],
            bridges: Vec::new(),
        }
    }
}

/// Ceilings on what workloads are promised, from their specs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ceilings {
    pub node: NodeCeilings,
    pub workload: WorkloadCeilings,
}

/// The whole node: the sum over every workload meant to run (the count
/// over every stored workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeCeilings {
    pub workloads: u64,
    /// VM vCPUs plus container CPU shares at 1024 a CPU. Default: four
    /// times the node's CPUs (CPU time is shared, not reserved).
    pub vcpus: u64,
    /// VM memory plus container memory limits. Default: the node's memory.
    pub memory_mib: u64,
    /// VM disks and managed volumes by declared size. Default: the size of
    /// the filesystem holding libvirt's image directory (where VM disks
    /// go), else the root filesystem.
    pub disk_gib: u64,
}

impl Default for NodeCeilings {
    /// One workload's default ceilings, CPU four times over.
    fn default() -> Self {
        let one = WorkloadCeilings::default();
        NodeCeilings {
            workloads: DEFAULT_MAX_WORKLOADS,
            vcpus: one.vcpus * 4,
            memory_mib: one.memory_mib,
            disk_gib: one.disk_gib,
        }
    }
}

/// One workload. Defaults: the node's CPUs, memory and root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadCeilings {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Default for WorkloadCeilings {
    /// The whole machine.
    fn default() -> Self {
        let Machine {
            cpus,
            memory_mib,
            disk_gib,
        } = Machine::get();
        WorkloadCeilings {
            vcpus: cpus,
            memory_mib,
            disk_gib,
        }
    }
}

/// The size of this machine, read once: the default ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Machine {
    pub fn get() -> Machine {
        static MACHINE: OnceLock<Machine> = OnceLock::new();
        *MACHINE.get_or_init(Machine::detect)
    }

    /// Online CPUs (not the agent's own affinity or cgroup quota: the
    /// workloads are not confined to the agent's share), memory from
    /// /proc/meminfo, and the size of the filesystem VM disks go to
    /// (libvirt's image directory, or `/` where it does not exist).
    /// Anything unreadable counts as 1 CPU, 1 GiB memory, 10 GiB disk.
    fn detect() -> Machine {
        let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|list| count_cpu_list(list.trim()))
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64)
            })
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("MemTotal:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib / 1024)
            .unwrap_or(1024);
        let disk_gib = [crate::vm::config::LIBVIRT_IMAGES, "/"]
            .into_iter()
            .find_map(|dir| rustix::fs::statvfs(Path::new(dir)).ok())
            .map(|s| s.f_blocks * s.f_frsize / (1 << 30))
            .unwrap_or(10);
        Machine {
            cpus: cpus.max(1),
            memory_mib: memory_mib.max(1),
            disk_gib: disk_gib.max(1),
        }
    }
}

/// `0-3,8-11` → 8.
fn count_cpu_list(list: &str) -> Option<u64> {
    let mut count = 0;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().ok()? - a.parse::<u64>().ok()? + 1,
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    Some(count)
}

/// A policy switch, named in refusals the way the policy file spells it.
pub type Rule = &'static str;

/// The words of a refusal: what broke which rule.
pub fn refusal(what: impl std::fmt::Display, rule: Rule) -> String {
    if rule == ALWAYS {
        format!("{what} (refused on every node, whatever the policy)")
    } else {
        format!("{what} (policy {rule})")
    }
}

/// The rule of refusals no switch opens.
pub const ALWAYS: Rule = "always";

/// Kubernetes' safe sysctls (Pod Security Standards, baseline): namespaced
/// and unable to affect the node or other workloads.
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

impl NodePolicy {
    /// Checks what serde cannot: absolute roots, capability and network
    /// names, `docker0`, non-zero ceilings. The error names the key.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_string(), message));
        for root in &self.host_paths.allowed_roots {
            if !root.is_absolute() {
                return bad(
                    "host_paths.allowed_roots",
                    format!("{} is not an absolute path", root.display()),
                );
            }
        }
        for cap in &self.containers.capabilities {
            let name = cap.strip_prefix("CAP_").unwrap_or(cap);
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                return bad(
                    "containers.capabilities",
                    format!("{cap:?} is not a capability name like NET_ADMIN"),
                );
            }
        }
        for (key, names) in [
            ("vm.networks", &self.vm.networks),
            ("vm.bridges", &self.vm.bridges),
        ] {
            for name in names {
                if name == DOCKER_BRIDGE {
                    return bad(key, format!("{DOCKER_BRIDGE} is never allowed"));
                }
                let ok = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'));
                if !ok {
                    return bad(key, format!("{name:?} is not a network or bridge name"));
                }
            }
        }
        let ceilings = &self.ceilings;
        for (key, value) in [
            ("ceilings.node.workloads", ceilings.node.workloads),
            ("ceilings.node.vcpus", ceilings.node.vcpus),
            ("ceilings.node.memory_mib", ceilings.node.memory_mib),
            ("ceilings.node.disk_gib", ceilings.node.disk_gib),
            ("ceilings.workload.vcpus", ceilings.workload.vcpus),
            ("ceilings.workload.memory_mib", ceilings.workload.memory_mib),
            ("ceilings.workload.disk_gib", ceilings.workload.disk_gib),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Whether `cap_add` may name `capability` (`CAP_` optional).
    pub fn allows_capability(&self, capability: &str) -> bool {
        let wanted = normalise_capability(capability);
        self.containers
            .capabilities
            .iter()
            .map(|c| normalise_capability(c))
            .any(|allowed| allowed == "ALL" || allowed == wanted)
    }
}

fn normalise_capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_opens_nothing_but_the_volume_root_and_the_default_network() {
        let policy = NodePolicy::default();
        assert_eq!(
            policy.host_paths.allowed_roots,
            [PathBuf::from("/var/lib/persys/volumes")]
        );
        assert_eq!(policy.containers, Containers::default());
        assert!(!policy.containers.privileged && !policy.compose.build);
        assert_eq!(policy.vm.networks, ["default"]);
        assert!(policy.vm.bridges.is_empty());
        let machine = Machine::get();
        assert_eq!(policy.ceilings.node.vcpus, machine.cpus * 4);
        assert_eq!(policy.ceilings.workload.memory_mib, machine.memory_mib);
        assert_eq!(policy.ceilings.node.workloads, 1000);
        assert!(policy.check().is_ok());
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("0-1,5"), Some(3));
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn capabilities_match_with_or_without_the_prefix_and_all_opens_all() {
        let mut policy = NodePolicy::default();
        assert!(!policy.allows_capability("NET_ADMIN"));
        policy.containers.capabilities = vec!["CAP_NET_ADMIN".into()];
        assert!(policy.allows_capability("net_admin"));
        assert!(!policy.allows_capability("SYS_ADMIN"));
        policy.containers.capabilities = vec!["ALL".into()];
        assert!(policy.allows_capability("SYS_ADMIN"));
    }

    #[test]
    fn docker0_relative_roots_and_zero_ceilings_are_refused() {
        let mut policy = NodePolicy::default();
        policy.vm.bridges = vec!["docker0".into()];
        assert_eq!(policy.check().unwrap_err().0, "vm.bridges");
        let mut policy = NodePolicy::default();
        policy.host_paths.allowed_roots = vec![PathBuf::from("srv")];
        assert_eq!(policy.check().unwrap_err().0, "host_paths.allowed_roots");
        let mut policy = NodePolicy::default();
        policy.ceilings.node.memory_mib = 0;
        assert_eq!(policy.check().unwrap_err().0, "ceilings.node.memory_mib");
        let mut policy = NodePolicy::default();
        policy.containers.capabilities = vec!["net admin".into()];
        assert_eq!(policy.check().unwrap_err().0, "containers.capabilities");
    }
}
