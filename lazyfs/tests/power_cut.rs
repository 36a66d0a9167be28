//! The durability model, on real FUSE mounts: what a power cut keeps and
//! what it drops.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use persys_lazyfs::LazyFs;

struct Mounted {
    backing: tempfile::TempDir,
    _mountpoint: tempfile::TempDir,
    fs: LazyFs,
}

impl Mounted {
    fn new() -> Mounted {
        let backing = tempfile::tempdir().unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let fs = LazyFs::mount(backing.path(), mountpoint.path()).unwrap();
        Mounted {
            backing,
            _mountpoint: mountpoint,
            fs,
        }
    }

    /// A path on the mount.
    fn at(&self, rel: &str) -> PathBuf {
        self.fs.mountpoint().join(rel)
    }

    /// Cuts the power and unmounts; returns the backing directory.
    fn cut(self) -> tempfile::TempDir {
        self.fs.cut_power().unwrap();
        self.fs.unmount().unwrap();
        self.backing
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn unsynced_appends_are_lost_and_synced_ones_stay() {
    let m = Mounted::new();
    let path = m.at("journal");
    let mut file = File::create(&path).unwrap();
    sync_dir(m.fs.mountpoint());
    file.write_all(b"first,").unwrap();
    file.sync_all().unwrap();
    file.write_all(b"second,").unwrap();
    file.sync_data().unwrap();
    file.write_all(b"lost").unwrap();
    assert_eq!(
        fs::read(&path).unwrap(),
        b"first,second,lost",
        "reads see it all"
    );
    let backing = m.cut();
    assert_eq!(
        fs::read(backing.path().join("journal")).unwrap(),
        b"first,second,"
    );
}

#[test]
fn unsynced_overwrites_and_truncations_are_undone() {
    let m = Mounted::new();
    let path = m.at("segment");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    sync_dir(m.fs.mountpoint());
    file.write_all_at(b"0123456789", 0).unwrap();
    file.sync_all().unwrap();
    file.write_all_at(b"abc", 2).unwrap();
    file.set_len(4).unwrap();
    file.set_len(20).unwrap();
    file.write_all_at(b"zz", 15).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 20);
    let backing = m.cut();
    assert_eq!(
        fs::read(backing.path().join("segment")).unwrap(),
        b"0123456789"
    );
}

#[test]
fn a_new_file_is_lost_unless_its_directory_is_synced() {
    let m = Mounted::new();
    fs::create_dir(m.at("db")).unwrap();
    sync_dir(m.fs.mountpoint());
    let mut kept = File::create(m.at("db/kept")).unwrap();
    kept.write_all(b"kept").unwrap();
    kept.sync_all().unwrap();
    sync_dir(&m.at("db"));
    // Never synced at all, in a directory that was: there, but empty.
    let mut empty = File::create(m.at("db/empty")).unwrap();
    sync_dir(&m.at("db"));
    empty.write_all(b"unsynced").unwrap();
    // Synced itself, but its directory not since.
    let mut lost = File::create(m.at("db/lost")).unwrap();
    lost.write_all(b"lost").unwrap();
    lost.sync_all().unwrap();
    // A directory whose parent was never synced goes with all it holds.
    fs::create_dir(m.at("db/sub")).unwrap();
    File::create(m.at("db/sub/f")).unwrap().sync_all().unwrap();
    sync_dir(&m.at("db/sub"));
    let backing = m.cut();
    let db = backing.path().join("db");
    assert_eq!(names(&db), ["empty", "kept"]);
    assert_eq!(fs::read(db.join("kept")).unwrap(), b"kept");
    assert_eq!(fs::read(db.join("empty")).unwrap(), b"");
}

#[test]
fn an_unsynced_rename_over_a_file_brings_the_old_one_back() {
    let m = Mounted::new();
    let mut current = File::create(m.at("current")).unwrap();
    current.write_all(b"v1").unwrap();
    current.sync_all().unwrap();
    sync_dir(m.fs.mountpoint());
    // The atomic-rewrite pattern, without the final directory sync.
    let mut temp = File::create(m.at("tmp1")).unwrap();
    temp.write_all(b"v2").unwrap();
    temp.sync_all().unwrap();
    fs::rename(m.at("tmp1"), m.at("current")).unwrap();
    assert_eq!(fs::read(m.at("current")).unwrap(), b"v2");
    let backing = m.cut();
    assert_eq!(names(backing.path()), ["current"]);
    assert_eq!(fs::read(backing.path().join("current")).unwrap(), b"v1");
}

#[test]
fn a_rename_is_durable_once_its_directory_is_synced() {
    let m = Mounted::new();
    File::create(m.at("current"))
        .unwrap()
        .write_all(b"v1")
        .unwrap();
    sync_dir(m.fs.mountpoint());
    let mut temp = File::create(m.at("tmp1")).unwrap();
    temp.write_all(b"v2").unwrap();
    temp.sync_all().unwrap();
    fs::rename(m.at("tmp1"), m.at("current")).unwrap();
    sync_dir(m.fs.mountpoint());
    fs::create_dir(m.at("later")).unwrap();
    let backing = m.cut();
    assert_eq!(names(backing.path()), ["current"]);
    assert_eq!(fs::read(backing.path().join("current")).unwrap(), b"v2");
}

#[test]
fn an_unsynced_unlink_brings_the_file_back_with_its_synced_contents() {
    let m = Mounted::new();
    let mut file = File::create(m.at("old.jnl")).unwrap();
    file.write_all(b"synced").unwrap();
    file.sync_all().unwrap();
    sync_dir(m.fs.mountpoint());
    File::create(m.at("gone")).unwrap().sync_all().unwrap();
    sync_dir(m.fs.mountpoint());
    fs::remove_file(m.at("gone")).unwrap();
    sync_dir(m.fs.mountpoint());
    file.write_all(b"+unsynced").unwrap();
    drop(file);
    fs::remove_file(m.at("old.jnl")).unwrap();
    assert!(!m.at("old.jnl").exists());
    let backing = m.cut();
    assert_eq!(names(backing.path()), ["old.jnl"]);
    assert_eq!(fs::read(backing.path().join("old.jnl")).unwrap(), b"synced");
}

#[test]
fn a_synced_unlink_stays_unlinked() {
    let m = Mounted::new();
    File::create(m.at("a")).unwrap().sync_all().unwrap();
    fs::create_dir(m.at("d")).unwrap();
    sync_dir(m.fs.mountpoint());
    fs::remove_file(m.at("a")).unwrap();
    fs::remove_dir(m.at("d")).unwrap();
    sync_dir(m.fs.mountpoint());
    let backing = m.cut();
    assert!(names(backing.path()).is_empty());
}

#[test]
fn nothing_reaches_the_disk_after_the_cut() {
    let m = Mounted::new();
    let mut file = File::create(m.at("f")).unwrap();
    file.sync_all().unwrap();
    sync_dir(m.fs.mountpoint());
    m.fs.cut_power().unwrap();
    let error = file.write_all(b"late").and_then(|()| file.sync_all());
    assert!(error.is_err(), "a write after the cut must fail");
    assert!(File::create(m.at("late")).is_err());
    drop(file);
    m.fs.unmount().unwrap();
    assert_eq!(names(m.backing.path()), ["f"]);
    assert_eq!(fs::read(m.backing.path().join("f")).unwrap(), b"");
}

#[test]
fn a_clean_unmount_keeps_everything() {
    let m = Mounted::new();
    File::create(m.at("f")).unwrap().write_all(b"x").unwrap();
    let Mounted { backing, fs, .. } = m;
    fs.unmount().unwrap();
    assert_eq!(names(backing.path()), ["f"]);
    assert_eq!(std::fs::read(backing.path().join("f")).unwrap(), b"x");
}

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[test]
fn a_failed_sync_reports_its_error_and_a_later_sync_does_not_save_what_it_covered() {
    let m = Mounted::new();
    let path = m.at("journal");
    let mut file = File::create(&path).unwrap();
    sync_dir(m.fs.mountpoint());
    file.write_all(b"durable,").unwrap();
    file.sync_all().unwrap();
    file.write_all(b"covered by the failed sync,").unwrap();
    m.fs.fail_syncs(Some(EIO));
    let error = file.sync_all().unwrap_err();
    assert_eq!(error.raw_os_error(), Some(EIO), "{error}");
    assert_eq!(
        sync_dir_result(m.fs.mountpoint()).raw_os_error(),
        Some(EIO),
        "directory syncs fail too"
    );
    // As Linux after a writeback error: still readable, and the next
    // sync succeeds, but what the failed one covered never got out.
    m.fs.fail_syncs(None);
    file.write_all(b"after").unwrap();
    file.sync_all().unwrap();
    assert_eq!(
        fs::read(&path).unwrap(),
        b"durable,covered by the failed sync,after"
    );
    let backing = m.cut();
    assert_eq!(
        fs::read(backing.path().join("journal")).unwrap(),
        b"durable,"
    );
}

#[test]
fn a_full_disk_refuses_writes_without_changing_anything_until_space_returns() {
    let m = Mounted::new();
    let path = m.at("journal");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"before,").unwrap();
    m.fs.fail_writes(Some(ENOSPC));
    let error = file.write_all(b"refused").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(ENOSPC), "{error}");
    assert_eq!(fs::read(&path).unwrap(), b"before,");
    m.fs.fail_writes(None);
    file.write_all(b"after").unwrap();
    file.sync_all().unwrap();
    sync_dir(m.fs.mountpoint());
    let backing = m.cut();
    assert_eq!(
        fs::read(backing.path().join("journal")).unwrap(),
        b"before,after"
    );
}

fn sync_dir_result(dir: &Path) -> std::io::Error {
    File::open(dir).unwrap().sync_all().unwrap_err()
}
