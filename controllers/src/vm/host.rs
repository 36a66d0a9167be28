//! The host side of a domain: what it needs before a define or start
//! (the checks that its disks are its own and what they claim to be, disks
//! and managed volumes the agent creates, the cloud-init seed, the display
//! password, DHCP host entries), and the tear-down that removes it all
//! with the workload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use persys_api::v1::{EventType, Workload};
use tokio::time::Instant;

use super::act::StopProgress;
use super::config::vm_root;
use super::disks::{self, CreatedDisks, DiskKind, DiskPlan, available_bytes, check_free_space};
use super::domain_xml::{NicSource, dhcp_host_xml};
use super::errors::{FailureReason, Operation, VmError};
use super::graphics::{Password, ensure_password};
use super::image::{ImageRefusal, check_image};
use super::libvirt::FoundDomain;
use super::ownership::{check_attached, check_recorded, recorded_disks};
use super::plan::stop_step;
use super::reconciler::{Layout, VmController};
use super::seed::ensure_seed;

/// What the host preparation made that the domain definition carries.
pub(crate) struct Prepared {
    /// The disks the agent created for this VM so far (recorded in the
    /// domain's marks, so they are removed with it).
    pub(crate) created_disks: Vec<String>,
    /// The display's password, when the spec asks for a display.
    pub(crate) graphics_password: Option<Password>,
}

impl VmController {
    /// Creates what the domain needs on the host, after checking that its
    /// disks are the workload's to use: none attached to another domain or
    /// created for another workload; then missing disks and managed
    /// volumes (recorded as the agent's, if the filesystem has room for
    /// their size), each image's format and backing files (`qemu-img
    /// info`), the seed ISO, the display password, DHCP host entries.
    pub(crate) async fn prepare(&self, id: &str, layout: &Layout) -> Result<Prepared, VmError> {
        let storage = |operation, message: String| {
            VmError::host(id, operation, FailureReason::StorageError, message)
        };
        let violation = |source| VmError::PolicyViolation {
            id: id.to_string(),
            source,
        };
        tokio::fs::create_dir_all(&layout.vm_dir)
            .await
            .map_err(|e| {
                storage(
                    Operation::CreateDisk,
                    format!("creating {}: {e}", layout.vm_dir.display()),
                )
            })?;
        let disks = &layout.domain.disks;
        let others = self
            .hypervisor
            .other_domains_disks(id, &self.config.scope)
            .await?;
        check_attached(disks, &others).map_err(violation)?;
        let root = vm_root(&self.config.state_dir);
        let recorded = tokio::task::spawn_blocking(move || recorded_disks(&root))
            .await
            .unwrap_or_default();
        check_recorded(id, disks, &recorded).map_err(violation)?;

        let record = CreatedDisks::in_dir(&layout.vm_dir);
        for disk in disks.iter().filter(|d| !d.is_seed) {
            if tokio::fs::metadata(&disk.path).await.is_ok() {
                continue;
            }
            self.create_disk(id, disk, &record).await?;
        }
        for disk in disks.iter().filter(|d| !d.is_seed) {
            match check_image(&disk.field, &disk.path, disk.format, &layout.vm_dir).await {
                Ok(()) => {}
                Err(ImageRefusal::Rule(error)) => return Err(violation(error)),
                Err(ImageRefusal::Probe(message)) => {
                    return Err(storage(Operation::InspectDisk, message));
                }
            }
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
        let graphics_password = match layout.domain.graphics {
            Some(kind) => Some(
                ensure_password(&layout.vm_dir, kind)
                    .await
                    .map_err(|message| storage(Operation::SetDisplayPassword, message))?,
            ),
            None => None,
        };
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
        Ok(Prepared {
            created_disks: created
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            graphics_password,
        })
    }

    /// Creates a missing disk (or managed volume) at its declared size when
    /// its filesystem has the room, and records it as the agent's.
    async fn create_disk(
        &self,
        id: &str,
        disk: &DiskPlan,
        record: &CreatedDisks,
    ) -> Result<(), VmError> {
        let storage = |message: String| {
            VmError::host(
                id,
                Operation::CreateDisk,
                FailureReason::StorageError,
                message,
            )
        };
        let shown = disk.path.display();
        if disk.kind == DiskKind::Cdrom {
            return Err(storage(format!("the cdrom image {shown} does not exist")));
        }
        if disk.size_gb <= 0 {
            return Err(storage(format!(
                "the disk {shown} does not exist and size_gb is 0, so it cannot be created"
            )));
        }
        if let Some(folder) = disk.path.parent() {
            tokio::fs::create_dir_all(folder)
                .await
                .map_err(|e| storage(format!("creating {}: {e}", folder.display())))?;
            let statted = folder.to_path_buf();
            let available = tokio::task::spawn_blocking(move || available_bytes(&statted))
                .await
                .map_err(std::io::Error::other)
                .and_then(|statted| statted)
                .map_err(|e| {
                    storage(format!(
                        "reading the free space of {}: {e}",
                        folder.display()
                    ))
                })?;
            check_free_space(&disk.field, disk.size_gb, folder, available).map_err(|message| {
                VmError::host(
                    id,
                    Operation::CreateDisk,
                    FailureReason::InsufficientResources,
                    message,
                )
            })?;
        }
        disks::create_disk(&disk.path, disk.format, disk.size_gb)
            .await
            .map_err(storage)?;
        record
            .add(&disk.path)
            .await
            .map_err(|e| storage(format!("recording {shown} as created by the agent: {e}")))?;
        tracing::info!(disk = %shown, size_gb = disk.size_gb, "created a disk");
        let message = format!(
            "created disk {shown} ({} GiB {})",
            disk.size_gb,
            disk.format.driver_type()
        );
        self.events
            .event(id, EventType::Normal, "DiskCreated", message)
            .await;
        Ok(())
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
