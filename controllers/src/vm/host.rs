//! The host side of a domain: what it needs before a define or start
//! (disks the agent creates, the cloud-init seed, DHCP host entries), and
//! the tear-down that removes it all with the workload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use persys_api::v1::{EventType, Workload};
use tokio::time::Instant;

use super::act::StopProgress;
use super::disks::{self, CreatedDisks, DiskKind};
use super::domain_xml::{NicSource, dhcp_host_xml};
use super::errors::{FailureReason, Operation, VmError};
use super::libvirt::FoundDomain;
use super::plan::stop_step;
use super::reconciler::{Layout, VmController};
use super::seed::ensure_seed;

impl VmController {
    /// Creates what the domain needs on the host: missing disks (recorded
    /// as the agent's), the seed ISO, DHCP host entries. Returns the disks
    /// the agent created for this VM so far.
    pub(crate) async fn prepare(&self, id: &str, layout: &Layout) -> Result<Vec<String>, VmError> {
        let storage = |operation, message: String| {
            VmError::host(id, operation, FailureReason::StorageError, message)
        };
        tokio::fs::create_dir_all(&layout.vm_dir)
            .await
            .map_err(|e| {
                storage(
                    Operation::CreateDisk,
                    format!("creating {}: {e}", layout.vm_dir.display()),
                )
            })?;
        let record = CreatedDisks::in_dir(&layout.vm_dir);
        for disk in layout.domain.disks.iter().filter(|d| !d.is_seed) {
            if tokio::fs::metadata(&disk.path).await.is_ok() {
                continue;
            }
            let shown = disk.path.display();
            if disk.kind == DiskKind::Cdrom {
                return Err(storage(
                    Operation::CreateDisk,
                    format!("the cdrom image {shown} does not exist"),
                ));
            }
            if disk.size_gb <= 0 {
                return Err(storage(
                    Operation::CreateDisk,
                    format!(
                        "the disk {shown} does not exist and size_gb is 0, so it cannot be created"
                    ),
                ));
            }
            disks::create_disk(&disk.path, disk.format, disk.size_gb)
                .await
                .map_err(|message| storage(Operation::CreateDisk, message))?;
            record.add(&disk.path).await.map_err(|e| {
                storage(
                    Operation::CreateDisk,
                    format!("recording {shown} as created by the agent: {e}"),
                )
            })?;
            tracing::info!(disk = %shown, size_gb = disk.size_gb, "created a disk");
            let message = format!(
                "created disk {shown} ({} GiB {})",
                disk.size_gb,
                disk.format.driver_type()
            );
            self.events
                .event(id, EventType::Normal, "DiskCreated", message)
                .await;
        }
        if let Some(content) = &layout.seed {
            let (path, built) = ensure_seed(&layout.vm_dir, content)
                .await
                .map_err(|message| storage(Operation::BuildSeed, message))?;
            if built {
                let message = format!("built the cloud-init seed {}", path.display());
                self.events
                    .event(id, EventType::Normal, "SeedBuilt", message)
                    .await;
            }
        }
        for nic in &layout.domain.nics {
            match (&nic.source, dhcp_host_xml(nic, &layout.domain.name)) {
                (NicSource::Network(network), Some(host)) => {
                    self.hypervisor
                        .set_dhcp_host(id, network, host, &nic.mac)
                        .await?;
                }
                (_, Some(_)) => {
                    tracing::warn!(mac = %nic.mac, "ip_address is only applied on libvirt-managed networks (DHCP host entry); configure it in the guest")
                }
                _ => {}
            }
        }
        let created = record.load().await.map_err(|e| {
            storage(
                Operation::CreateDisk,
                format!("reading the record of created disks: {e}"),
            )
        })?;
        Ok(created
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect())
    }

    /// Stops (gracefully, step by step) and undefines every domain of a
    /// workload, then removes the files the agent created for it.
    pub(crate) async fn tear_down(
        &self,
        id: &str,
        domains: Vec<FoundDomain>,
        graceful: bool,
        why: &str,
    ) -> Result<Option<Duration>, VmError> {
        for domain in &domains {
            if graceful {
                let since = self.workloads.with(id, |m| m.shutdown_since);
                let step = stop_step(domain, since, self.config.stop_timeout, Instant::now());
                if let StopProgress::Waiting(remaining) =
                    self.stop_step(id, domain, step, why).await?
                {
                    return Ok(Some(remaining));
                }
            } else if domain.state.power.is_active() {
                self.hypervisor.destroy(id, &domain.uuid).await?;
                let message = format!("destroyed domain {} ({why})", domain.name);
                self.events
                    .event(id, EventType::Normal, "Destroyed", message)
                    .await;
            }
        }
        let mut created: BTreeSet<PathBuf> = BTreeSet::new();
        for domain in &domains {
            if let Some(marks) = &domain.marks {
                created.extend(marks.created_disks.iter().map(PathBuf::from));
            }
            self.hypervisor.undefine(id, &domain.uuid).await?;
            tracing::info!(domain = %domain.name, why, "undefined");
            let message = format!("undefined domain {} ({why})", domain.name);
            self.events
                .event(id, EventType::Normal, "Undefined", message)
                .await;
        }
        let vm_dir = self.config.vm_dir(id);
        match CreatedDisks::in_dir(&vm_dir).load().await {
            Ok(recorded) => created.extend(recorded),
            Err(e) => {
                return Err(VmError::host(
                    id,
                    Operation::RemoveDisk,
                    FailureReason::StorageError,
                    format!("reading the record of created disks: {e}"),
                ));
            }
        }
        for path in &created {
            match disks::remove_disk(path, &self.config.disk_roots).await {
                Ok(()) => {
                    tracing::info!(disk = %path.display(), "removed a disk the agent created")
                }
                Err(message) => {
                    // Never block a deletion on a file the rules now forbid
                    // touching: keep it, say so.
                    tracing::warn!(disk = %path.display(), %message, "keeping a disk");
                    self.events
                        .event(id, EventType::Warning, "DiskKept", message)
                        .await;
                }
            }
        }
        remove_vm_dir(id, &vm_dir).await?;
        Ok(None)
    }

    /// Removes the DHCP host entries the spec asked for (best effort).
    pub(crate) async fn remove_dhcp_hosts(&self, workload: &Workload) {
        let Ok(layout) = self.layout(workload) else {
            return;
        };
        for nic in &layout.domain.nics {
            if let (NicSource::Network(network), Some(_)) = (&nic.source, nic.ip)
                && let Err(error) = self
                    .hypervisor
                    .remove_dhcp_host(workload.id(), network, &nic.mac)
                    .await
            {
                tracing::warn!(%error, "removing a DHCP host entry failed");
            }
        }
    }
}

async fn remove_vm_dir(id: &str, vm_dir: &Path) -> Result<(), VmError> {
    match tokio::fs::remove_dir_all(vm_dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmError::host(
            id,
            Operation::RemoveDisk,
            FailureReason::StorageError,
            format!("removing {}: {e}", vm_dir.display()),
        )),
    }
}
