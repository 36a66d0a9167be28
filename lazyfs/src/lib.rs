//! A FUSE passthrough that loses, on a simulated power cut, everything that
//! was not made durable — for tests only.
//!
//! In the spirit of [LazyFS] (which etcd's robustness tests run on): the
//! filesystem under test is mounted over a *backing* directory, every
//! operation goes through to it at once (reads need no merging), and each
//! change not yet made durable is remembered as how to undo it.
//! [`LazyFs::cut_power`] undoes them all, newest first, under the same lock
//! that serialises every operation: afterwards the backing directory holds
//! exactly what was durable at that instant, and every further operation on
//! the mount fails with `EIO`, so a process still running cannot write
//! anything "after the power went".
//!
//! # The durability model
//!
//! Stricter than LazyFS, which only loses file data: this one also loses
//! directory entries, as POSIX allows and as the Linux `fsync(2)` manual
//! warns ("an explicit fsync() on a file descriptor for the directory is
//! also needed").
//!
//! * **File contents and size** are durable as of the file's last `fsync` or
//!   `fdatasync` (both count as a full sync). A write or truncation since
//!   then is undone: the old bytes and the old length come back.
//! * **Directory entries** are durable as of the directory's last `fsync`.
//!   Creating a file, directory or symlink, unlinking, `rmdir` and renaming
//!   are entry changes; one not yet durable is undone: a new file whose
//!   directory was never synced disappears (even if the file itself was
//!   synced), an unlinked file comes back (with its contents as of its last
//!   sync), a renamed file goes back to its old name and whatever the rename
//!   replaced comes back.
//! * A **rename** is one atomic change of both directories: syncing either of
//!   them makes it durable (as one journal transaction does on ext4). A
//!   rename that replaced an entry makes that removal durable with it.
//! * An undo that no longer applies — its entry has since been moved by a
//!   change that is durable — is skipped: the durable change wins.
//! * Not modelled: hard links (`link` fails with `EPERM`), special files,
//!   `fallocate`, xattrs, permission and time changes (passed through and
//!   kept), and torn writes (a write is lost or kept whole).
//!
//! Unlinked and replaced entries are kept, until the cut or the unmount, in
//! a hidden directory `.lazyfs-removed` in the backing root.
//!
//! # Faults
//!
//! [`LazyFs::fail_syncs`] makes every `fsync`, `fdatasync` and directory
//! sync fail with an error of the test's choosing, as a failing disk does;
//! [`LazyFs::fail_writes`] does the same for writes (`ENOSPC` for a full
//! disk), which then change nothing. A failed file sync behaves as Linux
//! does after a writeback error ("fsyncgate"): what it covered stays
//! readable, but is not durable, and a later sync that succeeds does not
//! make it so either: the next power cut drops it. A failed directory sync
//! makes nothing durable.
//!
//! [LazyFS]: https://github.com/dsrhaslab/lazyfs

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Where removed entries wait, in the backing root, hidden from the mount.
const REMOVED: &str = ".lazyfs-removed";

const EBUSY: i32 = 16;

/// Attributes and entries are never cached by the kernel: every size and
/// name it sees comes from the backing directory as it is now.
const TTL: Duration = Duration::ZERO;

/// A mounted lazy filesystem. Unmounted when dropped.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    /// `None` once unmounted.
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

/// What a power cut dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose unsynced writes or truncations were undone.
    pub files_reverted: usize,
    /// Directory entry changes undone, newest first, as `created <path>`,
    /// `unlinked <path>` or `renamed <from> -> <to>` (paths in the mount).
    pub entries_reverted: Vec<String>,
}

impl LazyFs {
    /// Mounts a lazy view of `backing` on `mountpoint` (both existing
    /// directories), served by a background thread of this process.
    pub fn mount(backing: impl AsRef<Path>, mountpoint: impl AsRef<Path>) -> io::Result<LazyFs> {
        let root = backing.as_ref().canonicalize()?;
        let removed = root.join(REMOVED);
        if removed.exists() {
            std::fs::remove_dir_all(&removed)?;
        }
        std::fs::create_dir(&removed)?;
        let root_ino = std::fs::metadata(&root)?.ino();
        let mut paths = HashMap::new();
        paths.insert(INodeNo::ROOT.0, PathBuf::new());
        let state = Arc::new(Mutex::new(State {
            root,
            root_ino,
            paths,
            handles: HashMap::new(),
            next_fh: 1,
            unsynced: HashMap::new(),
            journal: Vec::new(),
            next_removed: 0,
            powered_off: false,
            sync_fault: None,
            write_fault: None,
            lost: HashMap::new(),
        }));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into())];
        let mountpoint = mountpoint.as_ref().to_path_buf();
        let session = fuser::spawn_mount(
            Passthrough {
                state: state.clone(),
            },
            &mountpoint,
            &config,
        )?;
        Ok(LazyFs {
            state,
            session: Some(session),
            mountpoint,
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Cuts the power: undoes every change not yet durable, newest first,
    /// and fails every later operation with `EIO`. Atomic with respect to
    /// the operations of the mount. Kill the processes using the mount
    /// before unmounting it.
    pub fn cut_power(&self) -> io::Result<CutReport> {
        lock(&self.state).cut_power()
    }

    /// From now on, every file and directory sync fails with `errno` (for
    /// example `libc::EIO`, 5), and what it was to make durable is lost at
    /// the next power cut even if a later sync succeeds; `None` makes syncs
    /// work again.
    pub fn fail_syncs(&self, errno: Option<i32>) {
        lock(&self.state).sync_fault = errno.map(Errno::from_i32);
    }

    /// From now on, every write fails with `errno` (for example `ENOSPC`,
    /// 28) and changes nothing; `None` makes writes work again.
    pub fn fail_writes(&self, errno: Option<i32>) {
        lock(&self.state).write_fault = errno.map(Errno::from_i32);
    }

    /// Unmounts and waits for the serving thread. Unsynced changes are kept,
    /// as by a clean shutdown, unless the power was cut before.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let result = match self.session.take().map(BackgroundSession::umount_and_join) {
            // Still in use (a test's own open file): detach it; the serving
            // thread ends when the last user closes.
            Some(Err(error)) if error.raw_os_error() == Some(EBUSY) => {
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
                    .map_err(io::Error::from)
            }
            Some(result) => result,
            None => Ok(()),
        };
        let removed = lock(&self.state).root.join(REMOVED);
        if removed.exists() {
            std::fs::remove_dir_all(&removed)?;
        }
        result
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = self.unmount_inner();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One undoable change of a file's contents: before it, the file was
/// `old_len` long and held `old` at `offset`.
struct Undo {
    offset: u64,
    old: Vec<u8>,
    old_len: u64,
}

/// One directory entry change not yet durable.
#[derive(Debug)]
enum EntryChange {
    /// `name` was created in `dir` for inode `ino`.
    Added { dir: u64, name: OsString, ino: u64 },
    /// `name` (inode `ino`) was removed from `dir`; the inode is kept in
    /// the removed directory.
    Removed { dir: u64, name: OsString, ino: u64 },
    /// `ino` moved from `from` to `to`, replacing inode `replaced` (kept in
    /// the removed directory).
    Renamed {
        from: (u64, OsString),
        to: (u64, OsString),
        ino: u64,
        replaced: Option<u64>,
    },
}

impl EntryChange {
    /// True when syncing `dir` makes this change durable.
    fn in_dir(&self, dir: u64) -> bool {
        match self {
            EntryChange::Added { dir: d, .. } | EntryChange::Removed { dir: d, .. } => *d == dir,
            EntryChange::Renamed { from, to, .. } => from.0 == dir || to.0 == dir,
        }
    }
}

/// An open file of the mount: the backing file, opened read-write so the
/// bytes a write replaces can be read first.
struct Handle {
    ino: u64,
    file: File,
    /// Opened with `O_APPEND`: writes go to the end, whatever the offset.
    append: bool,
}

struct State {
    /// The backing directory, absolute.
    root: PathBuf,
    /// Inode number of the backing root, which the mount shows as 1.
    root_ino: u64,
    /// Inode → path relative to `root` (no hard links: one path each).
    /// Unlinked inodes point into the removed directory.
    paths: HashMap<u64, PathBuf>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Inode → changes of its contents since its last sync, oldest first.
    unsynced: HashMap<u64, Vec<Undo>>,
    /// Entry changes not yet durable, oldest first.
    journal: Vec<EntryChange>,
    /// Names the next entry kept in the removed directory.
    next_removed: u64,
    /// Set by the cut: every operation fails from then on.
    powered_off: bool,
    /// What every sync fails with, while set.
    sync_fault: Option<Errno>,
    /// What every write fails with, while set.
    write_fault: Option<Errno>,
    /// Inode → changes a failed sync was to make durable, oldest first: no
    /// later sync makes them durable, a power cut undoes them.
    lost: HashMap<u64, Vec<Undo>>,
}

type Result<T> = std::result::Result<T, Errno>;

fn errno(error: io::Error) -> Errno {
    Errno::from(error)
}

impl State {
    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// The mount's inode number for a backing one: the backing root is 1
    /// (and a backing inode 1, if any, takes the root's number).
    fn mount_ino(&self, backing: u64) -> u64 {
        if backing == self.root_ino {
            INodeNo::ROOT.0
        } else if backing == INodeNo::ROOT.0 {
            self.root_ino
        } else {
            backing
        }
    }

    fn path(&self, ino: u64) -> Result<PathBuf> {
        self.paths.get(&ino).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf> {
        if parent == INodeNo::ROOT.0 && name == REMOVED {
            return Err(Errno::ENOENT);
        }
        Ok(self.path(parent)?.join(name))
    }

    fn attr(&self, rel: &Path) -> Result<FileAttr> {
        let meta = std::fs::symlink_metadata(self.abs(rel)).map_err(errno)?;
        Ok(FileAttr {
            ino: INodeNo(self.mount_ino(meta.ino())),
            size: meta.size(),
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The attributes of `rel`, remembering its path under its inode.
    fn register(&mut self, rel: PathBuf) -> Result<FileAttr> {
        let attr = self.attr(&rel)?;
        self.paths.insert(attr.ino.0, rel);
        Ok(attr)
    }

    /// The inode at `rel`, if any.
    fn ino_at(&self, rel: &Path) -> Option<u64> {
        std::fs::symlink_metadata(self.abs(rel))
            .ok()
            .map(|meta| self.mount_ino(meta.ino()))
    }

    /// Renames in the backing directory and moves every known path under
    /// `from` to `to`.
    fn move_entry(&mut self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(self.abs(from), self.abs(to)).map_err(errno)?;
        for path in self.paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
        Ok(())
    }

    /// Moves the entry at `rel` into the removed directory; returns its inode.
    fn keep_removed(&mut self, rel: &Path) -> Result<u64> {
        let ino = self.ino_at(rel).ok_or(Errno::ENOENT)?;
        let kept = Path::new(REMOVED).join(self.next_removed.to_string());
        self.next_removed += 1;
        self.move_entry(rel, &kept)?;
        self.paths.insert(ino, kept);
        Ok(ino)
    }

    /// Records the bytes `[offset, offset + len)` of `file` (as far as the
    /// file goes) and its length, so the change about to be made to them
    /// can be undone.
    fn record(&mut self, ino: u64, file: &File, offset: u64, len: u64) -> Result<()> {
        let old_len = file.metadata().map_err(errno)?.len();
        let end = offset.saturating_add(len).min(old_len);
        let mut old = vec![0; end.saturating_sub(offset) as usize];
        file.read_exact_at(&mut old, offset).map_err(errno)?;
        self.unsynced.entry(ino).or_default().push(Undo {
            offset,
            old,
            old_len,
        });
        Ok(())
    }

    /// Sets the length of `file` (inode `ino`), undoably.
    fn truncate(&mut self, ino: u64, file: &File, size: u64) -> Result<()> {
        let len = file.metadata().map_err(errno)?.len();
        self.record(ino, file, size.min(len), len.saturating_sub(size))?;
        file.set_len(size).map_err(errno)
    }

    fn cut_power(&mut self) -> io::Result<CutReport> {
        self.powered_off = true;
        self.handles.clear();
        let mut report = CutReport::default();
        // What failed syncs covered is older than what no sync covered yet.
        let mut pending = std::mem::take(&mut self.lost);
        for (ino, undos) in std::mem::take(&mut self.unsynced) {
            pending.entry(ino).or_default().extend(undos);
        }
        // Contents first, where each file is now (perhaps removed), then
        // the entries, newest first.
        for (ino, undos) in pending {
            let Some(rel) = self.paths.get(&ino) else {
                continue;
            };
            let file = match OpenOptions::new().write(true).open(self.abs(rel)) {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            for undo in undos.iter().rev() {
                file.set_len(undo.old_len)?;
                file.write_all_at(&undo.old, undo.offset)?;
            }
            report.files_reverted += 1;
        }
        for change in std::mem::take(&mut self.journal).into_iter().rev() {
            if let Some(undone) = self
                .undo(change)
                .map_err(|e| io::Error::from_raw_os_error(e.code()))?
            {
                report.entries_reverted.push(undone);
            }
        }
        std::fs::remove_dir_all(self.root.join(REMOVED))?;
        std::fs::create_dir(self.root.join(REMOVED))?;
        Ok(report)
    }

    /// Undoes one entry change and describes it; `None` when a durable
    /// change overtook it.
    fn undo(&mut self, change: EntryChange) -> Result<Option<String>> {
        match change {
            EntryChange::Added { dir, name, ino } => {
                let rel = self.child(dir, &name)?;
                if self.ino_at(&rel) != Some(ino) {
                    return Ok(None);
                }
                let abs = self.abs(&rel);
                if std::fs::symlink_metadata(&abs).map_err(errno)?.is_dir() {
                    std::fs::remove_dir_all(&abs).map_err(errno)?;
                } else {
                    std::fs::remove_file(&abs).map_err(errno)?;
                }
                self.paths.remove(&ino);
                Ok(Some(format!("created {}", rel.display())))
            }
            EntryChange::Removed { dir, name, ino } => {
                let rel = self.child(dir, &name)?;
                let kept = self.path(ino)?;
                if self.ino_at(&rel).is_some() || !kept.starts_with(REMOVED) {
                    return Ok(None);
                }
                self.move_entry(&kept, &rel)?;
                Ok(Some(format!("unlinked {}", rel.display())))
            }
            EntryChange::Renamed {
                from,
                to,
                ino,
                replaced,
            } => {
                let old = self.child(from.0, &from.1)?;
                let new = self.child(to.0, &to.1)?;
                if self.ino_at(&new) != Some(ino) || self.ino_at(&old).is_some() {
                    return Ok(None);
                }
                self.move_entry(&new, &old)?;
                if let Some(replaced) = replaced {
                    let kept = self.path(replaced)?;
                    if kept.starts_with(REMOVED) {
                        self.move_entry(&kept, &new)?;
                    }
                }
                Ok(Some(format!(
                    "renamed {} -> {}",
                    old.display(),
                    new.display()
                )))
            }
        }
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nsecs.max(0) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH
    }
}

/// The FUSE side: every request runs under the state's lock.
struct Passthrough {
    state: Arc<Mutex<State>>,
}

impl Passthrough {
    /// Runs `op` on the state unless the power was cut.
    fn with<T>(&self, op: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut state = lock(&self.state);
        if state.powered_off {
            return Err(Errno::EIO);
        }
        op(&mut state)
    }

    /// Creates `name` in `parent` with `make`, records it, and returns its
    /// attributes.
    fn add_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Result<FileAttr> {
        self.with(|state| {
            let rel = state.child(parent.0, name)?;
            make(&state.abs(&rel)).map_err(errno)?;
            let attr = state.register(rel)?;
            state.journal.push(EntryChange::Added {
                dir: parent.0,
                name: name.to_os_string(),
                ino: attr.ino.0,
            });
            Ok(attr)
        })
    }

    fn remove_entry(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<()> {
        self.with(|state| {
            let rel = state.child(parent.0, name)?;
            let abs = state.abs(&rel);
            let meta = std::fs::symlink_metadata(&abs).map_err(errno)?;
            if dir {
                if !meta.is_dir() {
                    return Err(Errno::ENOTDIR);
                }
                if std::fs::read_dir(&abs).map_err(errno)?.next().is_some() {
                    return Err(Errno::ENOTEMPTY);
                }
            } else if meta.is_dir() {
                return Err(Errno::EISDIR);
            }
            let ino = state.keep_removed(&rel)?;
            state.journal.push(EntryChange::Removed {
                dir: parent.0,
                name: name.to_os_string(),
                ino,
            });
            Ok(())
        })
    }

    fn open_handle(&self, state: &mut State, ino: u64, file: File, flags: i32) -> u64 {
        let fh = state.next_fh;
        state.next_fh += 1;
        state.handles.insert(
            fh,
            Handle {
                ino,
                file,
                append: flags & libc_flags::O_APPEND != 0,
            },
        );
        fh
    }
}

/// The open(2) flags this filesystem looks at.
mod libc_flags {
    pub const O_APPEND: i32 = 0o2000;
    pub const O_TRUNC: i32 = 0o1000;
    pub const O_EXCL: i32 = 0o200;
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with(|state| {
            let rel = state.child(parent.0, name)?;
            state.register(rel)
        }) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|state| {
            if let Some(handle) = fh.and_then(|fh| state.handles.get(&fh.0)) {
                let ino = handle.ino;
                return state.attr(&state.path(ino)?);
            }
            state.attr(&state.path(ino.0)?)
        }) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with(|state| {
            let rel = state.path(ino.0)?;
            let abs = state.abs(&rel);
            if let Some(size) = size {
                let file = match fh.and_then(|fh| state.handles.get(&fh.0)) {
                    Some(handle) => handle.file.try_clone().map_err(errno)?,
                    None => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&abs)
                        .map_err(errno)?,
                };
                state.truncate(ino.0, &file, size)?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&abs, uid, gid).map_err(errno)?;
            }
            state.attr(&rel)
        }) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(error) => reply.error(error),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|state| std::fs::read_link(state.abs(&state.path(ino.0)?)).map_err(errno)) {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(error) => reply.error(error),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.add_entry(parent, name, |abs| {
            std::fs::create_dir(abs)?;
            std::fs::set_permissions(abs, std::fs::Permissions::from_mode(mode & !umask & 0o7777))
        });
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove_entry(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove_entry(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.add_entry(parent, link_name, |abs| {
            std::os::unix::fs::symlink(target, abs)
        }) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.with(|state| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let from = state.child(parent.0, name)?;
            let to = state.child(newparent.0, newname)?;
            let source = std::fs::symlink_metadata(state.abs(&from)).map_err(errno)?;
            let ino = state.mount_ino(source.ino());
            let mut replaced = None;
            if let Ok(target) = std::fs::symlink_metadata(state.abs(&to)) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if state.mount_ino(target.ino()) == ino {
                    return Ok(());
                }
                match (source.is_dir(), target.is_dir()) {
                    (false, true) => return Err(Errno::EISDIR),
                    (true, false) => return Err(Errno::ENOTDIR),
                    (true, true) => {
                        if std::fs::read_dir(state.abs(&to))
                            .map_err(errno)?
                            .next()
                            .is_some()
                        {
                            return Err(Errno::ENOTEMPTY);
                        }
                    }
                    (false, false) => {}
                }
                replaced = Some(state.keep_removed(&to)?);
            }
            if let Err(error) = state.move_entry(&from, &to) {
                if let Some(replaced) = replaced {
                    let kept = state.path(replaced)?;
                    state.move_entry(&kept, &to)?;
                }
                return Err(error);
            }
            state.journal.push(EntryChange::Renamed {
                from: (parent.0, name.to_os_string()),
                to: (newparent.0, newname.to_os_string()),
                ino,
                replaced,
            });
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|state| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(state.abs(&state.path(ino.0)?))
                .map_err(errno)?;
            if flags.0 & libc_flags::O_TRUNC != 0 {
                state.truncate(ino.0, &file, 0)?;
            }
            Ok(self.open_handle(state, ino.0, file, flags.0))
        }) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|state| {
            let handle = state.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let mut buf = vec![0; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match handle
                    .file
                    .read_at(&mut buf[filled..], offset + filled as u64)
                {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => return Err(errno(error)),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        }) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with(|state| {
            let handle = state.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let (ino, append) = (handle.ino, handle.append);
            let file = handle.file.try_clone().map_err(errno)?;
            let offset = if append {
                file.metadata().map_err(errno)?.len()
            } else {
                offset
            };
            if let Some(fault) = state.write_fault {
                return Err(fault);
            }
            state.record(ino, &file, offset, data.len() as u64)?;
            file.write_all_at(data, offset).map_err(errno)?;
            Ok(data.len() as u32)
        }) {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(error),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.with(|_| Ok(())) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|state| {
            let ino = state.handles.get(&fh.0).map_or(ino.0, |handle| handle.ino);
            let undos = state.unsynced.remove(&ino);
            if let Some(fault) = state.sync_fault {
                if let Some(undos) = undos {
                    state.lost.entry(ino).or_default().extend(undos);
                }
                return Err(fault);
            }
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.with(|state| {
            let rel = state.path(ino.0)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            let mut names = Vec::new();
            for entry in std::fs::read_dir(state.abs(&rel)).map_err(errno)? {
                let entry = entry.map_err(errno)?;
                let name = entry.file_name();
                if ino == INodeNo::ROOT && name == REMOVED {
                    continue;
                }
                let meta = entry.metadata().map_err(errno)?;
                let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
                names.push((state.mount_ino(meta.ino()), kind, name));
            }
            names.sort_by(|a, b| a.2.cmp(&b.2));
            entries.extend(names);
            Ok(entries)
        });
        match listed {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(error) => reply.error(error),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.with(|state| {
            if let Some(fault) = state.sync_fault {
                return Err(fault);
            }
            state.journal.retain(|change| !change.in_dir(ino.0));
            Ok(())
        }) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with(|state| rustix::fs::statvfs(&state.root).map_err(|e| errno(e.into()))) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(error) => reply.error(error),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|state| {
            let rel = state.child(parent.0, name)?;
            let abs = state.abs(&rel);
            let created = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(&abs);
            let file = match created {
                Ok(file) => {
                    let attr = state.register(rel)?;
                    state.journal.push(EntryChange::Added {
                        dir: parent.0,
                        name: name.to_os_string(),
                        ino: attr.ino.0,
                    });
                    file
                }
                // Lost a race with another creator: an open, unless O_EXCL.
                Err(error)
                    if error.kind() == io::ErrorKind::AlreadyExists
                        && flags & libc_flags::O_EXCL == 0 =>
                {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&abs)
                        .map_err(errno)?;
                    state.register(rel)?;
                    file
                }
                Err(error) => return Err(errno(error)),
            };
            let ino = state.mount_ino(file.metadata().map_err(errno)?.ino());
            if flags & libc_flags::O_TRUNC != 0 {
                state.truncate(ino, &file, 0)?;
            }
            let attr = state.attr(&state.path(ino)?)?;
            let fh = self.open_handle(state, ino, file, flags);
            Ok((attr, fh))
        }) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(error) => reply.error(error),
        }
    }
}
