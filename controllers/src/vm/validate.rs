//! The checks of a VM spec that need no hypervisor: what the API server
//! runs at apply time, and the same rules the controller's plan applies
//! again before acting.

use std::path::{Path, PathBuf};

use persys_api::v1::VmSpec;

use super::disks::{add_volumes, plan_disks};
use super::domain_xml::{NicSource, USER_NETWORK, domain_name, graphics, plan_nics, resources};
use super::seed::seed_content;
use crate::policy::{self, ALWAYS, DOCKER_BRIDGE, refusal};
use crate::spec::SpecError;

/// Where host network interfaces are listed; a bridge has `bridge/` there.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Checks a VM spec for workload `id`: its domain name, vCPUs and memory,
/// disks (formats, kinds, devices, paths under `disk_roots` and, inside
/// `vm_root` (`<state>/vm`), only in the workload's own folder), managed
/// volumes, graphics and cloud-init content (user-data at most 256 KiB).
/// Host networks are checked by the controller, on the node where they
/// must exist; what a disk file holds, when it is attached.
pub fn validate_vm_spec(
    id: &str,
    spec: &VmSpec,
    disk_roots: &[PathBuf],
    vm_root: &Path,
) -> Result<(), SpecError> {
    let name = domain_name(id, spec)?;
    resources(spec)?;
    let workload_dir = vm_root.join(id);
    let mut disks = plan_disks(&spec.disks, disk_roots, &workload_dir)?;
    add_volumes(&mut disks, &spec.managed_volumes, &workload_dir)?;
    graphics(spec)?;
    seed_content(id, &name, spec)?;
    Ok(())
}

/// Checks that every interface of the spec attaches where the node's
/// policy allows: a libvirt network listed in `vm.networks` (qemu's
/// user-mode networking as `user`), or a host bridge listed in
/// `vm.bridges`. `docker0` never. A name is a bridge when
/// `sys_class_net/<name>/bridge` exists, as the controller decides.
pub fn check_vm_networks(
    id: &str,
    spec: &VmSpec,
    rules: &policy::Vm,
    sys_class_net: &Path,
) -> Result<(), SpecError> {
    let nics = plan_nics(id, &spec.networks, sys_class_net)?;
    let listed = |names: &[String]| match names {
        [] => "none".to_string(),
        names => names.join(", "),
    };
    for (i, nic) in nics.iter().enumerate() {
        let field = format!("spec.vm.networks[{i}].network");
        let (name, allowed, kind, rule) = match &nic.source {
            NicSource::Bridge(name) if name == DOCKER_BRIDGE => {
                return Err(SpecError::new(
                    field,
                    refusal(
                        format_args!("{DOCKER_BRIDGE} is Docker's bridge; VMs never attach to it"),
                        ALWAYS,
                    ),
                ));
            }
            NicSource::Bridge(name) => (name.as_str(), &rules.bridges, "host bridge", "vm.bridges"),
            NicSource::Network(name) => (name.as_str(), &rules.networks, "network", "vm.networks"),
            NicSource::User => (USER_NETWORK, &rules.networks, "network", "vm.networks"),
        };
        if !allowed.iter().any(|a| a == name) {
            return Err(SpecError::new(
                field,
                refusal(
                    format_args!(
                        "{kind} {name:?} is not allowed on this node (allowed: {})",
                        listed(allowed)
                    ),
                    rule,
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{DiskConfig, NetworkConfig};

    fn vm(path: &str) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mb: 128,
            disks: vec![DiskConfig {
                path: path.into(),
                format: "qcow2".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// One change that breaks one rule.
    type Change = fn(&mut VmSpec);

    #[test]
    fn every_rule_names_its_field() {
        let roots = [PathBuf::from("/var/lib/libvirt/images")];
        let vm_root = Path::new("/var/lib/persys/state/vm");
        assert!(
            validate_vm_spec(
                "web",
                &vm("/var/lib/libvirt/images/a.qcow2"),
                &roots,
                vm_root
            )
            .is_ok()
        );
        for bad in [
            "/var/lib/libvirt/images/../images/a.qcow2",
            "relative.qcow2",
            "/dev/sda",
            "/var/lib/libvirt/images",
            "/etc/passwd",
        ] {
            let error = validate_vm_spec("web", &vm(bad), &roots, vm_root).unwrap_err();
            assert_eq!(error.field, "spec.vm.disks[0].path", "{bad}");
        }
        let ok = vm("/var/lib/libvirt/images/a.qcow2");
        let cases: [(&str, Change); 6] = [
            ("spec.vm.vcpus", |v| v.vcpus = 0),
            ("spec.vm.memory_mb", |v| v.memory_mb = 32),
            ("spec.vm.name", |v| v.name = "a/b".into()),
            ("spec.vm.disks[0].format", |v| {
                v.disks[0].format = "vmdk".into()
            }),
            ("spec.vm.disks[0].type", |v| {
                v.disks[0].r#type = "floppy".into()
            }),
            ("spec.vm.disks[0].size_gb", |v| v.disks[0].size_gb = -1),
        ];
        for (field, change) in cases {
            let mut spec = ok.clone();
            change(&mut spec);
            assert_eq!(
                validate_vm_spec("web", &spec, &roots, vm_root)
                    .unwrap_err()
                    .field,
                field
            );
        }
    }

    #[test]
    fn networks_attach_only_where_the_policy_allows() {
        let sys = std::env::temp_dir().join(format!("persys-sysnet-{}", std::process::id()));
        for bridge in ["br0", "docker0", "br1"] {
            std::fs::create_dir_all(sys.join(bridge).join("bridge")).unwrap();
        }
        let with = |names: &[&str]| VmSpec {
            networks: names
                .iter()
                .map(|n| NetworkConfig {
                    network: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..vm("/var/lib/libvirt/images/a.qcow2")
        };
        let rules = policy::Vm {
            networks: vec!["default".into()],
            bridges: vec!["br0".into()],
        };
        assert!(check_vm_networks("web", &with(&["default", "br0"]), &rules, &sys).is_ok());
        for (names, index, words) in [
            (&["default", "br1"][..], 1, "policy vm.bridges"),
            (&["docker0"][..], 0, "whatever the policy"),
            (&["isolated"][..], 0, "policy vm.networks"),
            (&["user"][..], 0, "policy vm.networks"),
        ] {
            let error = check_vm_networks("web", &with(names), &rules, &sys).unwrap_err();
            assert_eq!(error.field, format!("spec.vm.networks[{index}].network"));
            assert!(error.message.contains(words), "{error}");
        }
        // A bridge listed as a network is still a bridge.
        let rules = policy::Vm {
            networks: vec!["br1".into()],
            bridges: vec![],
        };
        assert!(check_vm_networks("web", &with(&["br1"]), &rules, &sys).is_err());
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
