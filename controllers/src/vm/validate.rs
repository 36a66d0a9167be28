//! The checks of a VM spec that need no hypervisor: what the API server
//! runs at apply time, and the same rules the controller's plan applies
//! again before acting.

use std::path::PathBuf;

use persys_api::v1::VmSpec;

use super::disks::plan_disks;
use super::domain_xml::{domain_name, graphics, resources};
use super::seed::seed_content;
use crate::spec::SpecError;

/// Checks a VM spec for workload `id`: its domain name, vCPUs and memory,
/// disks (formats, kinds, devices, paths under `disk_roots`), graphics and
/// cloud-init content. Host networks are checked by the controller, on the
/// node where they must exist.
pub fn validate_vm_spec(id: &str, spec: &VmSpec, disk_roots: &[PathBuf]) -> Result<(), SpecError> {
    let name = domain_name(id, spec)?;
    resources(spec)?;
    plan_disks(&spec.disks, disk_roots)?;
    graphics(spec)?;
    seed_content(id, &name, spec)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::DiskConfig;

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
        assert!(validate_vm_spec("web", &vm("/var/lib/libvirt/images/a.qcow2"), &roots).is_ok());
        for bad in [
            "/var/lib/libvirt/images/../images/a.qcow2",
            "relative.qcow2",
            "/dev/sda",
            "/var/lib/libvirt/images",
            "/etc/passwd",
        ] {
            let error = validate_vm_spec("web", &vm(bad), &roots).unwrap_err();
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
                validate_vm_spec("web", &spec, &roots).unwrap_err().field,
                field
            );
        }
    }
}
