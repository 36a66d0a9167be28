//! Disks: what each `DiskConfig` becomes (format, device, bus, boot order),
//! the rules a disk path must pass, `qemu-img create` for missing files,
//! and the record of the files the agent created — the only ones it ever
//! deletes.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use persys_api::v1::{DiskConfig, ManagedVolumeSpec};

use super::errors::SpecError;
use crate::policy::{ALWAYS, refusal};

/// `qemu-img create` of a sparse file is quick; this only bounds a hang.
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(120);

/// The record of agent-created disks, in the VM's state folder.
pub(crate) const CREATED_DISKS_FILE: &str = "created-disks";

/// Where a VM's managed volumes live, in its state folder.
const VOLUMES_DIR: &str = "volumes";

const GIB: u64 = 1 << 30;

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
    Iso,
}

impl DiskFormat {
    /// The format as `qemu-img -f` and libvirt's `<driver type>` name it.
    pub fn driver_type(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw | DiskFormat::Iso => "raw",
        }
    }

    /// The spec's format, or the file's extension when it gives none
    /// (qcow2 when that says nothing). Formats are never probed from file
    /// contents: a raw image could pose as anything.
    fn resolve(format: &str, path: &str) -> Option<DiskFormat> {
        match format.to_ascii_lowercase().as_str() {
            "qcow2" => Some(DiskFormat::Qcow2),
            "raw" | "img" => Some(DiskFormat::Raw),
            "iso" => Some(DiskFormat::Iso),
            "" => {
                let extension = Path::new(path)
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                Some(match extension.as_deref() {
                    Some("iso") => DiskFormat::Iso,
                    Some("raw" | "img") => DiskFormat::Raw,
                    _ => DiskFormat::Qcow2,
                })
            }
            _ => None,
        }
    }
}

/// How the guest sees a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    Disk,
    Cdrom,
}

/// The bus a device sits on, from its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// `vdX`
    Virtio,
    /// `sdX`: works on both i440fx (libvirt adds an AHCI controller) and q35.
    Sata,
    /// `hdX`
    Ide,
}

impl Bus {
    pub fn name(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
            Bus::Ide => "ide",
        }
    }

    fn of(device: &str) -> Option<Bus> {
        // Checked: a device name is the spec's text, and its second byte
        // may fall inside a character.
        let (prefix, letters) = device.split_at_checked(2)?;
        let letters_ok =
            (1..=2).contains(&letters.len()) && letters.chars().all(|c| c.is_ascii_lowercase());
        if !letters_ok {
            return None;
        }
        match prefix {
            "vd" => Some(Bus::Virtio),
            "sd" => Some(Bus::Sata),
            "hd" => Some(Bus::Ide),
            _ => None,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Bus::Virtio => "vd",
            Bus::Sata => "sd",
            Bus::Ide => "hd",
        }
    }
}

/// One disk of a domain, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The file, with symlinks resolved (checked against the roots).
    pub path: PathBuf,
    pub format: DiskFormat,
    pub kind: DiskKind,
    /// The guest device name: `vda`, `sdb`…
    pub target: String,
    pub bus: Bus,
    pub boot_order: Option<u32>,
    /// The size to create a missing file with, in GiB (0: must exist).
    pub size_gb: i64,
    /// The agent's cloud-init seed, not a disk of the spec.
    pub is_seed: bool,
    /// Where the spec asks for it (`spec.vm.disks[0]`,
    /// `spec.vm.managed_volumes[0]`; `seed` for the seed), for messages.
    pub field: String,
    /// Attached read-only (cdroms always are).
    pub read_only: bool,
    /// The serial the guest sees (a managed volume's name: the guest finds
    /// it at `/dev/disk/by-id/virtio-<name>`).
    pub serial: Option<String>,
}

impl DiskPlan {
    pub fn readonly(&self) -> bool {
        self.kind == DiskKind::Cdrom || self.read_only
    }

    /// A disk the spec names by path (not the seed, not a managed volume).
    pub fn is_spec_disk(&self) -> bool {
        self.field.starts_with("spec.vm.disks[")
    }

    /// The field that names the file: a disk's `path`, a managed volume's
    /// `name`.
    pub fn path_field(&self) -> String {
        if self.is_spec_disk() {
            format!("{}.path", self.field)
        } else {
            format!("{}.name", self.field)
        }
    }
}

/// Resolves a spec's disks: formats, kinds, device names (given ones are
/// kept, the rest allocated in order), boot order and checked paths. A
/// path inside the agent's VM folders (`<state>/vm`, the parent of
/// `workload_dir`) must lie in this workload's own folder and be none of
/// the files the agent keeps there.
pub fn plan_disks(
    disks: &[DiskConfig],
    roots: &[PathBuf],
    workload_dir: &Path,
) -> Result<Vec<DiskPlan>, SpecError> {
    let mut planned = Vec::with_capacity(disks.len());
    let mut taken: Vec<String> = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let field = format!("spec.vm.disks[{i}]");
        let format = DiskFormat::resolve(&disk.format, &disk.path).ok_or_else(|| {
            SpecError::new(
                format!("{field}.format"),
                format!("{:?} is not one of qcow2, raw, iso", disk.format),
            )
        })?;
        let kind = match disk.r#type.to_ascii_lowercase().as_str() {
            "cdrom" => DiskKind::Cdrom,
            "" if format == DiskFormat::Iso => DiskKind::Cdrom,
            "" | "disk" => DiskKind::Disk,
            other => {
                return Err(SpecError::new(
                    format!("{field}.type"),
                    format!("{other:?} is not disk or cdrom"),
                ));
            }
        };
        if disk.size_gb < 0 {
            return Err(SpecError::new(
                format!("{field}.size_gb"),
                "must not be negative",
            ));
        }
        let path = check_disk_path(&format!("{field}.path"), &disk.path, roots)?;
        check_not_agent_file(&format!("{field}.path"), &path, workload_dir)?;
        if planned.iter().any(|p: &DiskPlan| p.path == path) {
            return Err(SpecError::new(
                format!("{field}.path"),
                format!("{} is attached twice", path.display()),
            ));
        }
        let device = disk.device.trim().trim_start_matches("/dev/");
        let (target, bus) = if device.is_empty() {
            (String::new(), default_bus(kind))
        } else {
            let bus = Bus::of(device).ok_or_else(|| {
                SpecError::new(
                    format!("{field}.device"),
                    format!("{device:?} is not a device name like vda, sdb or hdc"),
                )
            })?;
            if kind == DiskKind::Cdrom && bus == Bus::Virtio {
                return Err(SpecError::new(
                    format!("{field}.device"),
                    format!("a cdrom cannot be a virtio device ({device}); use sdX"),
                ));
            }
            if taken.iter().any(|t| t == device) {
                return Err(SpecError::new(
                    format!("{field}.device"),
                    format!("{device} is used twice"),
                ));
            }
            taken.push(device.to_string());
            (device.to_string(), bus)
        };
        planned.push(DiskPlan {
            path,
            format,
            kind,
            target,
            bus,
            boot_order: None,
            size_gb: disk.size_gb,
            is_seed: false,
            field,
            read_only: false,
            serial: None,
        });
    }
    for plan in planned.iter_mut().filter(|p| p.target.is_empty()) {
        plan.target = next_free(plan.bus, &taken);
        taken.push(plan.target.clone());
    }
    // Boot from the disks marked `boot`, in order; with none marked, from
    // the disks, then the cdroms, in order.
    let marked: Vec<usize> = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.boot)
        .map(|(i, _)| i)
        .collect();
    let order: Vec<usize> = if marked.is_empty() {
        let by_kind = |kind| {
            planned
                .iter()
                .enumerate()
                .filter(move |(_, p)| p.kind == kind)
                .map(|(i, _)| i)
        };
        by_kind(DiskKind::Disk)
            .chain(by_kind(DiskKind::Cdrom))
            .collect()
    } else {
        marked
    };
    for (position, index) in order.into_iter().enumerate() {
        planned[index].boot_order = Some(position as u32 + 1);
    }
    Ok(planned)
}

/// Appends the cloud-init seed as a read-only cdrom on the next free
/// `sdX`; it is never booted from.
pub fn add_seed(disks: &mut Vec<DiskPlan>, seed: PathBuf) {
    let taken: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
    disks.push(DiskPlan {
        path: seed,
        format: DiskFormat::Iso,
        kind: DiskKind::Cdrom,
        target: next_free(Bus::Sata, &taken),
        bus: Bus::Sata,
        boot_order: None,
        size_gb: 0,
        is_seed: true,
        field: "seed".into(),
        read_only: true,
        serial: None,
    });
}

/// Appends the spec's managed volumes: qcow2 files of their declared size
/// in `<workload_dir>/volumes/<name>.qcow2`, attached as virtio disks
/// after the spec's disks, never booted from. What a VM cannot honour is
/// refused, never ignored: the guest formats and mounts its own disks, and
/// the volumes go with the workload's folder.
pub fn add_volumes(
    disks: &mut Vec<DiskPlan>,
    volumes: &[ManagedVolumeSpec],
    workload_dir: &Path,
) -> Result<(), SpecError> {
    let mut taken: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
    let mut names: Vec<&str> = Vec::new();
    for (i, volume) in volumes.iter().enumerate() {
        let field = format!("spec.vm.managed_volumes[{i}]");
        let refuse =
            |key: &str, message: String| Err(SpecError::new(format!("{field}.{key}"), message));
        let name = volume.name.as_str();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return refuse(
                "name",
                format!(
                    "{name:?} must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
                ),
            );
        }
        if names.contains(&name) {
            return refuse("name", format!("{name:?} is used twice"));
        }
        names.push(name);
        if !matches!(
            volume.driver.to_ascii_lowercase().as_str(),
            "" | "local" | "qcow2"
        ) {
            return refuse(
                "driver",
                format!(
                    "{:?} is not supported for VMs (a VM's managed volume is a qcow2 disk in the workload's folder: local or qcow2)",
                    volume.driver
                ),
            );
        }
        if volume.size_gb < 1 {
            return refuse(
                "size_gb",
                "must be at least 1 (GiB): the disk is created at this size".into(),
            );
        }
        if !matches!(
            volume.access_mode.to_ascii_lowercase().as_str(),
            "" | "readwriteonce" | "rwo"
        ) {
            return refuse(
                "access_mode",
                format!(
                    "{:?} is not supported for VMs: a disk belongs to one guest (ReadWriteOnce)",
                    volume.access_mode
                ),
            );
        }
        for (key, value) in [
            ("fs_type", &volume.fs_type),
            ("mount_path", &volume.mount_path),
        ] {
            if !value.is_empty() {
                return refuse(
                    key,
                    format!(
                        "{value:?} cannot be honoured for a VM: the volume is attached as a blank virtio disk (serial {name:?}, /dev/disk/by-id/virtio-{name}) that the guest formats and mounts itself, e.g. with cloud-init; leave {key} empty"
                    ),
                );
            }
        }
        if !matches!(
            volume.retain_policy.to_ascii_lowercase().as_str(),
            "" | "delete"
        ) {
            return refuse(
                "retain_policy",
                format!(
                    "{:?} is not supported for VMs: a VM's managed volume lives in the workload's folder and is deleted with it (Delete)",
                    volume.retain_policy
                ),
            );
        }
        let target = next_free(Bus::Virtio, &taken);
        taken.push(target.clone());
        disks.push(DiskPlan {
            path: workload_dir.join(VOLUMES_DIR).join(format!("{name}.qcow2")),
            format: DiskFormat::Qcow2,
            kind: DiskKind::Disk,
            target,
            bus: Bus::Virtio,
            boot_order: None,
            size_gb: volume.size_gb,
            is_seed: false,
            field,
            read_only: volume.read_only,
            // virtio-blk serials are at most 20 bytes.
            serial: Some(name.chars().take(20).collect()),
        });
    }
    Ok(())
}

/// Files the agent keeps in a VM's folder: a spec never names them.
const AGENT_FILES: &[&str] = &[
    super::seed::SEED_FILE,
    "seed.iso.sha256",
    "seed.iso.partial",
    CREATED_DISKS_FILE,
    "created-disks.tmp",
    super::graphics::PASSWORD_FILE,
];

/// A spec disk inside the agent's VM folders (`workload_dir`'s parent)
/// must lie in this workload's own folder, and not be one of the agent's
/// files or managed volumes there: another workload's seed, volumes and
/// records are not a disk root.
fn check_not_agent_file(field: &str, path: &Path, workload_dir: &Path) -> Result<(), SpecError> {
    let Some(vm_root) = workload_dir.parent().filter(|p| p.is_absolute()) else {
        return Ok(());
    };
    let vm_root = resolve_root(vm_root);
    let Ok(inside) = path.strip_prefix(&vm_root) else {
        return Ok(());
    };
    let refuse = |why: String| Err(SpecError::new(field, refusal(why, ALWAYS)));
    let mut parts = inside
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let (Some(owner), Some(first)) = (parts.next(), parts.next()) else {
        return refuse(format!(
            "{} is not inside a workload's folder",
            path.display()
        ));
    };
    let own = workload_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if owner != own {
        return refuse(format!(
            "{} lies in the folder of workload {owner:?}; a workload's files are its own",
            path.display()
        ));
    }
    if AGENT_FILES.contains(&first.as_str()) || first == VOLUMES_DIR || first == "seed" {
        return refuse(format!(
            "{} is a file the agent keeps for this workload, not a disk",
            path.display()
        ));
    }
    Ok(())
}

/// Refuses to create a `size_gb` disk on a filesystem with less free space
/// (`available` bytes, what an unprivileged writer may use), naming the
/// field and the figures.
pub fn check_free_space(
    field: &str,
    size_gb: i64,
    folder: &Path,
    available: u64,
) -> Result<(), String> {
    let wanted = (size_gb.max(0) as u64).saturating_mul(GIB);
    if wanted <= available {
        return Ok(());
    }
    Err(format!(
        "{field}.size_gb: {size_gb} GiB requested but the filesystem holding {} has {:.1} GiB free; free space there or ask for less",
        folder.display(),
        available as f64 / GIB as f64
    ))
}

/// The bytes free for an unprivileged writer on the filesystem holding
/// `folder`.
pub fn available_bytes(folder: &Path) -> io::Result<u64> {
    let stats = rustix::fs::statvfs(folder)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn default_bus(kind: DiskKind) -> Bus {
    match kind {
        DiskKind::Disk => Bus::Virtio,
        DiskKind::Cdrom => Bus::Sata,
    }
}

/// The first `<prefix><letters>` not taken: `a`…`z`, then `aa`…`zz`.
fn next_free(bus: Bus, taken: &[String]) -> String {
    let letters = (b'a'..=b'z').map(|c| (c as char).to_string());
    let pairs = (b'a'..=b'z')
        .flat_map(|a| (b'a'..=b'z').map(move |b| format!("{}{}", a as char, b as char)));
    letters
        .chain(pairs)
        .map(|suffix| format!("{}{suffix}", bus.prefix()))
        .find(|name| !taken.contains(name))
        .unwrap_or_else(|| format!("{}zz", bus.prefix()))
}

/// A root as the check compares against: resolved when it exists.
fn resolve_root(root: &Path) -> PathBuf {
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// Checks a disk path and resolves it: absolute, no `.` or `..`
/// components, no NUL; if it exists, a regular file (never a device node,
/// folder, FIFO or socket) reached through symlinks that stay inside a
/// root; if not, a place inside a root once its existing folders are
/// resolved. Returns the path with symlinks resolved.
pub fn check_disk_path(field: &str, raw: &str, roots: &[PathBuf]) -> Result<PathBuf, SpecError> {
    let refuse = |message: String| Err(SpecError::new(field, message));
    if raw.is_empty() {
        return refuse("is required".into());
    }
    if raw.contains('\0') {
        return refuse("contains a NUL byte".into());
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return refuse(format!("{raw:?} must be an absolute path"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return refuse(format!("{raw:?} must not contain . or .. components"));
    }
    let resolved = match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let Ok(target) = path.canonicalize() else {
                return refuse(format!("{raw:?} is a dangling symlink"));
            };
            let kind = match std::fs::metadata(&target) {
                Ok(meta) => meta.file_type(),
                Err(e) => return refuse(format!("{raw:?} cannot be inspected: {e}")),
            };
            if !kind.is_file() {
                return refuse(format!(
                    "{raw:?} is {}; only regular files can be VM disks",
                    describe(kind)
                ));
            }
            target
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => resolve_missing(path),
        Err(e) => return refuse(format!("{raw:?} cannot be inspected: {e}")),
    };
    if !roots
        .iter()
        .map(|r| resolve_root(r))
        .any(|root| resolved.starts_with(&root) && resolved != root)
    {
        let roots = roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return refuse(format!(
            "{raw:?} (resolved to {}) is outside the VM disk roots ({roots})",
            resolved.display()
        ));
    }
    Ok(resolved)
}

/// A path that does not exist: its deepest existing folder resolved, the
/// rest appended.
fn resolve_missing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) {
        rest.push(name.to_os_string());
        existing = parent.to_path_buf();
        if let Ok(mut resolved) = existing.canonicalize() {
            for part in rest.iter().rev() {
                resolved.push(part);
            }
            return resolved;
        }
    }
    path.to_path_buf()
}

fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a folder"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Creates a sparse image: `qemu-img create -f <format> <path> <size>G`.
pub async fn create_disk(path: &Path, format: DiskFormat, size_gb: i64) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let mut command = tokio::process::Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", format.driver_type()])
        .arg(path)
        .arg(format!("{size_gb}G"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(QEMU_IMG_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            return Err("qemu-img is not installed (Debian: qemu-utils)".into());
        }
        Ok(Err(e)) => return Err(format!("running qemu-img: {e}")),
        Err(_) => return Err(format!("qemu-img did not finish in {QEMU_IMG_TIMEOUT:?}")),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "qemu-img create {} failed ({}): {}",
            path.display(),
            output.status,
            stderr.trim()
        ));
    }
    Ok(())
}

/// Removes a disk file the agent created, after checking once more that it
/// is a regular file inside a root. A file already gone is fine.
pub async fn remove_disk(path: &Path, roots: &[PathBuf]) -> Result<(), String> {
    let raw = path.to_string_lossy();
    match check_disk_path("disk", &raw, roots) {
        Ok(resolved) => match tokio::fs::remove_file(&resolved).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", resolved.display())),
        },
        Err(error) => Err(format!("not removing {raw}: {}", error.message)),
    }
}

/// The disks the agent created for one VM, one path a line in
/// `<state>/vm/<id>/created-disks`. Written after each creation (and
/// synced) so a disk is never forgotten, nor claimed when the agent did
/// not create it.
#[derive(Debug, Clone)]
pub struct CreatedDisks {
    file: PathBuf,
}

impl CreatedDisks {
    pub fn in_dir(vm_dir: &Path) -> Self {
        CreatedDisks {
            file: vm_dir.join(CREATED_DISKS_FILE),
        }
    }

    /// The recorded paths (none when there is no record).
    pub async fn load(&self) -> io::Result<Vec<PathBuf>> {
        match tokio::fs::read_to_string(&self.file).await {
            Ok(text) => Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Records `path` (once).
    pub async fn add(&self, path: &Path) -> io::Result<()> {
        let mut paths = self.load().await?;
        if paths.iter().any(|p| p == path) {
            return Ok(());
        }
        paths.push(path.to_path_buf());
        let mut text = String::new();
        for p in &paths {
            text.push_str(&p.to_string_lossy());
            text.push('\n');
        }
        if let Some(dir) = self.file.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let temporary = self.file.with_extension("tmp");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            use std::io::Write;
            let mut out = std::fs::File::create(&temporary)?;
            out.write_all(text.as_bytes())?;
            out.sync_all()?;
            std::fs::rename(&temporary, &file)?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, format: &str, kind: &str, device: &str, boot: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            device: device.into(),
            format: format.into(),
            size_gb: 1,
            r#type: kind.into(),
            boot,
        }
    }

    /// Found by the apply validation property tests: a device name whose
    /// second byte falls inside a character (`0¡`) panicked validation.
    #[test]
    fn a_device_name_with_a_multibyte_character_is_refused_not_a_panic() {
        for device in ["0¡", "v¡", "¡", "vdé", "é"] {
            assert_eq!(Bus::of(device), None, "{device}");
        }
        assert_eq!(Bus::of("vdb"), Some(Bus::Virtio));
        assert_eq!(Bus::of("sd"), None);
    }

    #[test]
    fn devices_are_kept_or_allocated_and_boot_order_follows_the_boot_flags() {
        let root = tempfile::tempdir().unwrap();
        let p = |name: &str| root.path().join(name).to_string_lossy().into_owned();
        let roots = vec![root.path().to_path_buf()];
        let vm_dir = root.path().join("state/vm/web");
        let planned = plan_disks(
            &[
                disk(&p("os.qcow2"), "", "", "", false),
                disk(&p("install.iso"), "", "", "", true),
                disk(&p("data.raw"), "raw", "disk", "vda", false),
                disk(&p("extra.img"), "", "", "hdb", false),
            ],
            &roots,
            &vm_dir,
        )
        .unwrap();
        let summary: Vec<_> = planned
            .iter()
            .map(|d| (d.target.as_str(), d.bus, d.kind, d.format, d.boot_order))
            .collect();
        assert_eq!(
            summary,
            [
                ("vdb", Bus::Virtio, DiskKind::Disk, DiskFormat::Qcow2, None),
                ("sda", Bus::Sata, DiskKind::Cdrom, DiskFormat::Iso, Some(1)),
                ("vda", Bus::Virtio, DiskKind::Disk, DiskFormat::Raw, None),
                ("hdb", Bus::Ide, DiskKind::Disk, DiskFormat::Raw, None),
            ]
        );

        let mut unmarked = plan_disks(
            &[
                disk(&p("cd.iso"), "iso", "cdrom", "", false),
                disk(&p("a.qcow2"), "qcow2", "disk", "", false),
            ],
            &roots,
            &vm_dir,
        )
        .unwrap();
        assert_eq!(unmarked[0].boot_order, Some(2), "disks boot before cdroms");
        assert_eq!(unmarked[1].boot_order, Some(1));
        add_seed(&mut unmarked, root.path().join("seed.iso"));
        let seed = unmarked.last().unwrap();
        assert_eq!(
            (seed.target.as_str(), seed.boot_order, seed.readonly()),
            ("sdb", None, true)
        );
    }

    #[test]
    fn bad_formats_types_and_device_names_name_their_field() {
        let root = tempfile::tempdir().unwrap();
        let roots = vec![root.path().to_path_buf()];
        let vm_dir = root.path().join("state/vm/web");
        let p = root.path().join("a.qcow2").to_string_lossy().into_owned();
        let cases = [
            (disk(&p, "vmdk", "", "", false), "spec.vm.disks[0].format"),
            (disk(&p, "", "floppy", "", false), "spec.vm.disks[0].type"),
            (
                disk(&p, "", "", "nvme0n1", false),
                "spec.vm.disks[0].device",
            ),
            (
                disk(&p, "iso", "cdrom", "vdc", false),
                "spec.vm.disks[0].device",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(
                plan_disks(&[config], &roots, &vm_dir).unwrap_err().field,
                field
            );
        }
        let twice = plan_disks(
            &[
                disk(&p, "", "", "vda", false),
                disk(&p, "", "", "vdb", false),
            ],
            &roots,
            &vm_dir,
        );
        assert!(twice.unwrap_err().message.contains("attached twice"));
    }

    #[test]
    fn disk_paths_must_stay_inside_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let roots = vec![root.path().to_path_buf()];
        let inside = root.path().join("sub/new.qcow2");
        assert_eq!(
            check_disk_path("f", inside.to_str().unwrap(), &roots).unwrap(),
            root.path().canonicalize().unwrap().join("sub/new.qcow2")
        );

        let escape_link = root.path().join("escape");
        std::os::unix::fs::symlink(outside.path(), &escape_link).unwrap();
        let through_link = escape_link.join("x.qcow2");
        let refused = |path: &str| check_disk_path("f", path, &roots).unwrap_err().message;
        assert!(refused(through_link.to_str().unwrap()).contains("outside the VM disk roots"));

        let file_link = root.path().join("passwd.qcow2");
        std::os::unix::fs::symlink("/etc/passwd", &file_link).unwrap();
        assert!(refused(file_link.to_str().unwrap()).contains("outside"));

        let dangling = root.path().join("dangling.qcow2");
        std::os::unix::fs::symlink(root.path().join("nothing"), &dangling).unwrap();
        assert!(refused(dangling.to_str().unwrap()).contains("dangling"));

        let dotted = format!("{}/../etc/x.qcow2", root.path().display());
        assert!(refused(&dotted).contains(".."));
        assert!(refused("relative/x.qcow2").contains("absolute"));
        assert!(refused("/etc/x.qcow2").contains("outside"));
        assert!(refused(root.path().to_str().unwrap()).contains("folder"));
        assert!(
            check_disk_path("f", "/dev/null", &[PathBuf::from("/dev")])
                .unwrap_err()
                .message
                .contains("character device")
        );
    }

    #[tokio::test]
    async fn the_record_of_created_disks_keeps_each_path_once() {
        let dir = tempfile::tempdir().unwrap();
        let record = CreatedDisks::in_dir(&dir.path().join("vm/w"));
        assert!(record.load().await.unwrap().is_empty());
        record.add(Path::new("/a/b.qcow2")).await.unwrap();
        record.add(Path::new("/a/c.qcow2")).await.unwrap();
        record.add(Path::new("/a/b.qcow2")).await.unwrap();
        assert_eq!(
            record.load().await.unwrap(),
            [PathBuf::from("/a/b.qcow2"), PathBuf::from("/a/c.qcow2")]
        );
    }

    #[test]
    fn inside_the_agent_s_vm_folders_a_spec_names_only_its_own_files() {
        let root = tempfile::tempdir().unwrap();
        let vm_root = root.path().join("state/vm");
        std::fs::create_dir_all(vm_root.join("web")).unwrap();
        std::fs::create_dir_all(vm_root.join("db")).unwrap();
        let roots = vec![root.path().join("images"), vm_root.clone()];
        let vm_dir = vm_root.join("web");
        let at = |path: &Path| {
            plan_disks(
                &[disk(&path.to_string_lossy(), "qcow2", "", "", false)],
                &roots,
                &vm_dir,
            )
        };
        assert!(at(&vm_dir.join("data.qcow2")).is_ok());
        for (path, words) in [
            (vm_root.join("db/data.qcow2"), "folder of workload \"db\""),
            (vm_root.join("db/seed.iso"), "folder of workload \"db\""),
            (vm_dir.join("seed.iso"), "a file the agent keeps"),
            (vm_dir.join("created-disks"), "a file the agent keeps"),
            (vm_dir.join("graphics-password"), "a file the agent keeps"),
            (vm_dir.join("volumes/v.qcow2"), "a file the agent keeps"),
            (
                vm_root.join("loose.qcow2"),
                "not inside a workload's folder",
            ),
        ] {
            let error = at(&path).unwrap_err();
            assert_eq!(error.field, "spec.vm.disks[0].path", "{}", path.display());
            assert!(
                error.message.contains(words) && error.message.contains("whatever the policy"),
                "{}: {error}",
                path.display()
            );
        }
    }

    #[test]
    fn managed_volumes_become_qcow2_disks_in_the_workload_folder_or_are_refused() {
        let vm_dir = Path::new("/state/vm/web");
        let volume = |name: &str| ManagedVolumeSpec {
            name: name.into(),
            size_gb: 2,
            ..Default::default()
        };
        let mut disks = Vec::new();
        let mut data = volume("data");
        data.read_only = true;
        add_volumes(&mut disks, &[data, volume("logs")], vm_dir).unwrap();
        let summary: Vec<_> = disks
            .iter()
            .map(|d| {
                (
                    d.path.to_string_lossy().into_owned(),
                    d.target.as_str(),
                    d.format,
                    d.size_gb,
                    d.readonly(),
                    d.serial.as_deref(),
                    d.path_field(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "/state/vm/web/volumes/data.qcow2".to_string(),
                    "vda",
                    DiskFormat::Qcow2,
                    2,
                    true,
                    Some("data"),
                    "spec.vm.managed_volumes[0].name".to_string()
                ),
                (
                    "/state/vm/web/volumes/logs.qcow2".to_string(),
                    "vdb",
                    DiskFormat::Qcow2,
                    2,
                    false,
                    Some("logs"),
                    "spec.vm.managed_volumes[1].name".to_string()
                ),
            ]
        );
        type Change = fn(&mut ManagedVolumeSpec);
        let cases: [(&str, Change); 8] = [
            ("name", |v| v.name = "../x".into()),
            ("name", |v| v.name = String::new()),
            ("driver", |v| v.driver = "nfs".into()),
            ("size_gb", |v| v.size_gb = 0),
            ("access_mode", |v| v.access_mode = "ReadWriteMany".into()),
            ("fs_type", |v| v.fs_type = "ext4".into()),
            ("mount_path", |v| v.mount_path = "/data".into()),
            ("retain_policy", |v| v.retain_policy = "Retain".into()),
        ];
        for (key, change) in cases {
            let mut bad = volume("data");
            change(&mut bad);
            let error = add_volumes(&mut Vec::new(), &[bad], vm_dir).unwrap_err();
            assert_eq!(error.field, format!("spec.vm.managed_volumes[0].{key}"));
        }
        let twice = add_volumes(&mut Vec::new(), &[volume("a"), volume("a")], vm_dir);
        assert!(twice.unwrap_err().message.contains("used twice"));
    }

    #[test]
    fn a_disk_larger_than_the_free_space_is_refused_with_the_figures() {
        let folder = Path::new("/var/lib/libvirt/images");
        assert!(check_free_space("spec.vm.disks[0]", 2, folder, 2 * GIB).is_ok());
        let error = check_free_space("spec.vm.disks[0]", 3, folder, 2 * GIB + GIB / 2).unwrap_err();
        assert_eq!(
            error,
            "spec.vm.disks[0].size_gb: 3 GiB requested but the filesystem holding /var/lib/libvirt/images has 2.5 GiB free; free space there or ask for less"
        );
        assert!(available_bytes(Path::new("/")).unwrap() > 0);
    }
}
