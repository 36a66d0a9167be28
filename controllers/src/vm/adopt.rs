//! Taking over the domains the Go agent left defined.
//!
//! The Go agent named a VM workload's domain by the workload id (not
//! `spec.name`) and marked it with nothing. Such a domain, for a VM
//! workload in the store, is this agent's to run: when its definition is
//! what the Go agent made of the stored spec (vCPUs, memory, disks,
//! networks) it is adopted as it runs — this agent's marks are added to its
//! definition through libvirt's metadata call, live and persistent, with no
//! restart, and none of its disks is recorded as created by the agent, so a
//! delete keeps them. Otherwise it is replaced once (its disks kept).
//!
//! An adopted workload keeps the domain's name, the workload id, from then
//! on (also across later spec changes): the status fact
//! [`FACT_DOMAIN_NAME`] records it. A domain of another name, or one with
//! marks, is never taken over.

use std::collections::BTreeSet;

use persys_api::v1::{ObjectStatus, VmSpec};

use super::libvirt::LiveDomain;

/// Status fact: the name of the adopted domain, which the workload keeps.
pub const FACT_DOMAIN_NAME: &str = "adopted.domain-name";

/// The adopted domain's name, as `status` records it.
pub(crate) fn recorded_name(status: Option<&ObjectStatus>) -> Option<&str> {
    status?
        .facts
        .get(FACT_DOMAIN_NAME)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// A network disk path as libvirt shows its source (`rbd:pool/image` →
/// `pool/image`).
fn source_of(path: &str) -> &str {
    path.strip_prefix("rbd:").unwrap_or(path)
}

/// The first way `live` differs from the domain the Go agent would have
/// defined from `spec` (vCPUs, memory, disks, networks), as `field: what
/// differs`; none when it matches.
pub(crate) fn difference(spec: &VmSpec, live: &LiveDomain) -> Option<String> {
    if i64::from(live.vcpus) != i64::from(spec.vcpus) {
        return Some(format!(
            "vcpus: the domain has {}, the spec asks for {}",
            live.vcpus, spec.vcpus
        ));
    }
    let memory_mib = live.memory_kib / 1024;
    if i64::try_from(memory_mib).ok() != Some(spec.memory_mb) {
        return Some(format!(
            "memory_mb: the domain has {memory_mib}, the spec asks for {}",
            spec.memory_mb
        ));
    }
    let wanted: BTreeSet<(String, String)> = spec
        .disks
        .iter()
        .filter(|d| d.r#type != "cdrom")
        .map(|d| (d.device.clone(), source_of(&d.path).to_string()))
        .collect();
    let disks: BTreeSet<(String, String)> = live
        .disks
        .iter()
        .filter(|d| d.device == "disk")
        .map(|d| (d.target.clone(), d.source.clone()))
        .collect();
    if disks != wanted {
        return Some(format!(
            "disks: the domain has {disks:?}, the spec asks for {wanted:?}"
        ));
    }
    // The Go agent attached its cloud-init seed as a cdrom too: the spec's
    // own cdroms must be there, others may be.
    let cdroms: BTreeSet<&str> = live
        .disks
        .iter()
        .filter(|d| d.device == "cdrom")
        .map(|d| d.source.as_str())
        .collect();
    if let Some(missing) = spec
        .disks
        .iter()
        .filter(|d| d.r#type == "cdrom")
        .find(|d| !cdroms.contains(d.path.as_str()))
    {
        return Some(format!(
            "disks: the domain has no cdrom {}, the spec asks for it",
            missing.path
        ));
    }
    if live.interfaces.len() != spec.networks.len() {
        return Some(format!(
            "networks: the domain has {} interfaces, the spec asks for {}",
            live.interfaces.len(),
            spec.networks.len()
        ));
    }
    for (i, (interface, network)) in live.interfaces.iter().zip(&spec.networks).enumerate() {
        if interface.kind != "network" {
            return Some(format!(
                "networks[{i}]: the domain's interface is of type {}, the Go agent made network ones",
                interface.kind
            ));
        }
        if !network.mac_address.is_empty()
            && !network.mac_address.eq_ignore_ascii_case(&interface.mac)
        {
            return Some(format!(
                "networks[{i}].mac_address: the domain has {}, the spec asks for {}",
                interface.mac, network.mac_address
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::libvirt::{DomainState, LiveDisk, LiveInterface, PowerState};
    use persys_api::v1::{DiskConfig, NetworkConfig};

    fn spec() -> VmSpec {
        VmSpec {
            name: "demo".into(),
            vcpus: 2,
            memory_mb: 512,
            disks: vec![
                DiskConfig {
                    path: "/var/lib/libvirt/images/demo.qcow2".into(),
                    device: "vda".into(),
                    format: "qcow2".into(),
                    ..Default::default()
                },
                DiskConfig {
                    path: "rbd:pool/data".into(),
                    device: "vdb".into(),
                    ..Default::default()
                },
            ],
            networks: vec![NetworkConfig {
                network: "default".into(),
                mac_address: "52:54:00:AA:BB:CC".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn defined() -> LiveDomain {
        LiveDomain {
            uuid: "u".into(),
            name: "w".into(),
            state: DomainState {
                power: PowerState::Running,
                reason: 1,
            },
            vcpus: 2,
            memory_kib: 512 * 1024,
            domain_type: "kvm".into(),
            disks: vec![
                LiveDisk {
                    target: "vda".into(),
                    source: "/var/lib/libvirt/images/demo.qcow2".into(),
                    device: "disk".into(),
                },
                LiveDisk {
                    target: "vdb".into(),
                    source: "pool/data".into(),
                    device: "disk".into(),
                },
                LiveDisk {
                    target: "hdb".into(),
                    source: "/tmp/cloud-init-123/seed.iso".into(),
                    device: "cdrom".into(),
                },
            ],
            interfaces: vec![LiveInterface {
                kind: "network".into(),
                mac: "52:54:00:aa:bb:cc".into(),
                host_device: None,
            }],
            ips: Vec::new(),
            marks: None,
        }
    }

    #[test]
    fn the_go_agents_domain_of_a_spec_matches_it() {
        assert_eq!(difference(&spec(), &defined()), None);
    }

    /// A change to the spec a test makes.
    type Change = Box<dyn Fn(&mut VmSpec)>;

    #[test]
    fn each_field_that_differs_is_named() {
        let cases: Vec<(&str, Change)> = vec![
            ("vcpus", Box::new(|s| s.vcpus = 4)),
            ("memory_mb", Box::new(|s| s.memory_mb = 1024)),
            (
                "disks",
                Box::new(|s| s.disks[0].path = "/other.qcow2".into()),
            ),
            ("disks", Box::new(|s| s.disks.truncate(1))),
            ("networks", Box::new(|s| s.networks.clear())),
            (
                "networks[0].mac_address",
                Box::new(|s| s.networks[0].mac_address = "52:54:00:00:00:01".into()),
            ),
        ];
        for (field, change) in cases {
            let mut spec = spec();
            change(&mut spec);
            let found = difference(&spec, &defined());
            assert!(
                found.as_deref().is_some_and(|d| d.starts_with(field)),
                "{field}: {found:?}"
            );
        }
    }

    #[test]
    fn the_adopted_name_is_read_from_status_facts() {
        let mut status = ObjectStatus::default();
        assert_eq!(recorded_name(Some(&status)), None);
        status
            .facts
            .insert(FACT_DOMAIN_NAME.to_string(), "web".to_string());
        assert_eq!(recorded_name(Some(&status)), Some("web"));
    }
}
