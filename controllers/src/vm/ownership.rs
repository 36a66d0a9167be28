//! Which workload a disk belongs to. A disk is one workload's: the one
//! whose spec names it, or the one the agent created it for (the record in
//! `<state>/vm/<id>/created-disks`). At apply, a path another stored VM
//! workload names, or that the agent created for another, is refused; at
//! reconcile, so is one recorded for another workload or attached to a
//! libvirt domain that is not this workload's.

use std::path::{Path, PathBuf};

use persys_api::v1::VmSpec;

use super::disks::{CREATED_DISKS_FILE, DiskPlan, check_disk_path, plan_disks};
use super::errors::SpecError;
use crate::policy::{ALWAYS, refusal};

/// Every path the agent recorded as created, with the workload it was
/// created for: the `created-disks` records under `vm_root` (`<state>/vm`).
/// Unreadable records are skipped: they name nothing.
pub fn recorded_disks(vm_root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(vm_root) else {
        return Vec::new();
    };
    let mut recorded = Vec::new();
    for entry in entries.flatten() {
        let owner = entry.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(entry.path().join(CREATED_DISKS_FILE)) else {
            continue;
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            recorded.push((owner.clone(), PathBuf::from(line)));
        }
    }
    recorded
}

/// Refuses a disk of workload `id` the agent recorded as created for
/// another workload.
pub fn check_recorded(
    id: &str,
    disks: &[DiskPlan],
    recorded: &[(String, PathBuf)],
) -> Result<(), SpecError> {
    for disk in disks.iter().filter(|d| d.is_spec_disk()) {
        if let Some((owner, _)) = recorded
            .iter()
            .find(|(owner, path)| owner != id && same_file(path, &disk.path))
        {
            return Err(SpecError::new(
                format!("{}.path", disk.field),
                refusal(
                    format_args!(
                        "{} was created by the agent for workload {owner:?}; a disk belongs to one workload",
                        disk.path.display()
                    ),
                    ALWAYS,
                ),
            ));
        }
    }
    Ok(())
}

/// Checks at apply that no disk the spec of workload `id` names belongs to
/// another workload: named by another stored VM workload (`others`), or
/// created by the agent for another one.
pub fn check_disk_owners<'a>(
    id: &str,
    spec: &VmSpec,
    disk_roots: &[PathBuf],
    vm_root: &Path,
    others: impl IntoIterator<Item = (&'a str, &'a VmSpec)>,
) -> Result<(), SpecError> {
    let disks = plan_disks(&spec.disks, disk_roots, &vm_root.join(id))?;
    for (other, other_spec) in others {
        if other == id {
            continue;
        }
        for (j, named) in other_spec.disks.iter().enumerate() {
            // As the other workload's controller resolves it; a path its
            // own rules refuse now is compared as written.
            let path = check_disk_path("", &named.path, disk_roots)
                .unwrap_or_else(|_| PathBuf::from(&named.path));
            if let Some(disk) = disks.iter().find(|d| d.path == path) {
                return Err(SpecError::new(
                    format!("{}.path", disk.field),
                    refusal(
                        format_args!(
                            "{} is a disk of workload {other:?} (its spec.vm.disks[{j}].path); a disk belongs to one workload",
                            disk.path.display()
                        ),
                        ALWAYS,
                    ),
                ));
            }
        }
    }
    if vm_root.is_absolute() {
        check_recorded(id, &disks, &recorded_disks(vm_root))?;
    }
    Ok(())
}

/// Two names of one file: equal once resolved (a recorded path is the
/// resolved one; a file since replaced by a link still matches by name).
fn same_file(recorded: &Path, disk: &Path) -> bool {
    recorded == disk || recorded.canonicalize().is_ok_and(|p| p == disk)
}

/// A domain other than the workload's that has one of its disks attached:
/// refused, naming the disk's field and the domain.
pub fn check_attached(
    disks: &[DiskPlan],
    others: &[(String, Vec<String>)],
) -> Result<(), SpecError> {
    for disk in disks.iter().filter(|d| !d.is_seed) {
        for (domain, sources) in others {
            let attached = sources
                .iter()
                .any(|source| same_file(Path::new(source), &disk.path));
            if attached {
                return Err(SpecError::new(
                    disk.path_field(),
                    refusal(
                        format_args!(
                            "{} is attached to the libvirt domain {domain:?}, which is not this workload's; a disk belongs to one workload",
                            disk.path.display()
                        ),
                        ALWAYS,
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::DiskConfig;

    fn vm(paths: &[&Path]) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mb: 64,
            disks: paths
                .iter()
                .map(|p| DiskConfig {
                    path: p.to_string_lossy().into_owned(),
                    format: "qcow2".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_disk_named_or_created_for_another_workload_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let vm_root = dir.path().join("state/vm");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(vm_root.join("db")).unwrap();
        let roots = vec![images.clone(), vm_root.clone()];
        let (a, b, made) = (
            images.join("a.qcow2"),
            images.join("b.qcow2"),
            images.join("made.qcow2"),
        );
        std::fs::write(&made, b"").unwrap();
        std::fs::write(
            vm_root.join("db").join(CREATED_DISKS_FILE),
            format!("{}\n", made.canonicalize().unwrap().display()),
        )
        .unwrap();
        let other = vm(&[&b, &a]);
        let others = [("other", &other)];

        let error = check_disk_owners("web", &vm(&[&a]), &roots, &vm_root, others).unwrap_err();
        assert_eq!(error.field, "spec.vm.disks[0].path");
        assert!(
            error
                .message
                .contains("disk of workload \"other\" (its spec.vm.disks[1].path)"),
            "{error}"
        );
        // Its own stored spec is not another's.
        assert!(check_disk_owners("other", &other, &roots, &vm_root, others).is_ok());

        let error = check_disk_owners(
            "web",
            &vm(&[&images.join("c.qcow2"), &made]),
            &roots,
            &vm_root,
            [],
        )
        .unwrap_err();
        assert_eq!(error.field, "spec.vm.disks[1].path");
        assert!(
            error
                .message
                .contains("created by the agent for workload \"db\""),
            "{error}"
        );
        assert!(check_disk_owners("db", &vm(&[&made]), &roots, &vm_root, []).is_ok());
    }

    #[test]
    fn a_disk_attached_to_a_domain_that_is_not_the_workload_s_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let roots = vec![dir.path().to_path_buf()];
        let path = dir.path().join("a.qcow2");
        std::fs::write(&path, b"").unwrap();
        let disks = plan_disks(&vm(&[&path]).disks, &roots, &dir.path().join("vm/web")).unwrap();
        let source = path.to_string_lossy().into_owned();
        assert!(check_attached(&disks, &[("x".into(), vec!["/other".into()])]).is_ok());
        let error = check_attached(&disks, &[("legacy".into(), vec![source])]).unwrap_err();
        assert_eq!(error.field, "spec.vm.disks[0].path");
        assert!(
            error.message.contains("libvirt domain \"legacy\""),
            "{error}"
        );
    }
}
