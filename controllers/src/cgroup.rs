//! Container usage read from the kernel, as kubelet and cAdvisor do: each
//! container's cgroup files (CPU time, memory, block I/O) and the network
//! counters of its network namespace. No engine call per container.
//!
//! - [`Hierarchy`]: where the host mounts its cgroups, v2 (unified) or v1
//!   (one mount per controller), found once from `/proc/self/mountinfo`.
//! - [`CgroupSampler`]: finds each container's cgroup from the engine's
//!   cgroup driver and parent (`docker/<id>` with cgroupfs,
//!   `system.slice/docker-<id>.scope` with systemd); a container found
//!   elsewhere is learned once from its process's `/proc/<pid>/cgroup`,
//!   and its parent then serves every later container. CPU use is the
//!   delta of CPU time between two rounds.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Where the mounts are listed.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The cgroup hierarchy of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one tree, every controller in it.
    V2 { root: PathBuf },
    /// cgroup v1: a tree per controller. `blkio` may be missing (block
    /// I/O is then reported as 0).
    V1 {
        cpuacct: PathBuf,
        memory: PathBuf,
        blkio: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// The host's hierarchy, from this process's mount table. A hybrid host
    /// (v1 controllers beside an empty unified tree) is v1: the
    /// controllers are where the counters are.
    pub fn detect() -> Result<Hierarchy, String> {
        let mountinfo = std::fs::read_to_string(MOUNTINFO)
            .map_err(|e| format!("cannot read {MOUNTINFO}: {e}"))?;
        Hierarchy::from_mountinfo(&mountinfo)
    }

    /// The hierarchy a mount table describes.
    pub fn from_mountinfo(mountinfo: &str) -> Result<Hierarchy, String> {
        let (mut v2, mut cpuacct, mut memory, mut blkio) = (None, None, None, None);
        for line in mountinfo.lines() {
            // `id parent major:minor root mountpoint options [optional...] - type source super-options`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (fstype, super_options) = (right.next(), right.nth(1).unwrap_or(""));
            let mountpoint = PathBuf::from(unescape(mountpoint));
            match fstype {
                Some("cgroup2") => {
                    v2.get_or_insert(mountpoint);
                }
                Some("cgroup") => {
                    let has = |c: &str| super_options.split(',').any(|o| o == c);
                    if has("cpuacct") {
                        cpuacct.get_or_insert(mountpoint.clone());
                    }
                    if has("memory") {
                        memory.get_or_insert(mountpoint.clone());
                    }
                    if has("blkio") {
                        blkio.get_or_insert(mountpoint);
                    }
                }
                _ => {}
            }
        }
        match (cpuacct, memory, v2) {
            (Some(cpuacct), Some(memory), _) => Ok(Hierarchy::V1 {
                cpuacct,
                memory,
                blkio,
            }),
            (_, _, Some(root)) => Ok(Hierarchy::V2 { root }),
            _ => Err("no cgroup v2 mount and no cgroup v1 cpuacct and memory mounts".into()),
        }
    }

    /// `1` or `2`, as the engine reports its cgroup version.
    pub fn version(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "2",
            Hierarchy::V1 { .. } => "1",
        }
    }

    /// The directory where a cgroup's existence is checked.
    fn probe_dir(&self, relative: &str) -> PathBuf {
        match self {
            Hierarchy::V2 { root } => join(root, relative),
            Hierarchy::V1 { memory, .. } => join(memory, relative),
        }
    }

    /// The counters of the cgroup at `relative`, each file opened for this
    /// one read (and closed when it returns). Fails when its CPU or memory file cannot be read (the
    /// container is gone, or the files are not visible from here); block
    /// I/O and network are best effort.
    pub fn read(&self, relative: &str) -> io::Result<Counters> {
        self.read_kept(relative, &mut Files::default())
    }

    /// As [`Hierarchy::read`], through `files`: the container's files kept
    /// open from earlier rounds, and those opened now kept while the
    /// process's budget allows.
    fn read_kept(&self, relative: &str, files: &mut Files) -> io::Result<Counters> {
        let mut counters = match self {
            Hierarchy::V2 { root } => {
                let dir = join(root, relative);
                let mut read = |file| files.read(&dir, file);
                let cpu = read("cpu.stat")?;
                let usage_usec = field(&cpu, "usage_usec").ok_or_else(|| missing("usage_usec"))?;
                let current = parse_number(&read("memory.current")?)?;
                let stat = read("memory.stat").unwrap_or_default();
                let (disk_read_bytes, disk_write_bytes) =
                    read("io.stat").map(|s| io_stat(&s)).unwrap_or((0, 0));
                Counters {
                    cpu_time_ns: usage_usec.saturating_mul(1000),
                    memory_bytes: current
                        .saturating_sub(field(&stat, "inactive_file").unwrap_or(0)),
                    disk_read_bytes,
                    disk_write_bytes,
                    pid: read("cgroup.procs").ok().as_deref().and_then(first_pid),
                    ..Counters::default()
                }
            }
            Hierarchy::V1 {
                cpuacct,
                memory,
                blkio,
            } => {
                let cpu = parse_number(&files.read(&join(cpuacct, relative), "cpuacct.usage")?)?;
                let memory_dir = join(memory, relative);
                let usage = parse_number(&files.read(&memory_dir, "memory.usage_in_bytes")?)?;
                let stat = files.read(&memory_dir, "memory.stat").unwrap_or_default();
                let (disk_read_bytes, disk_write_bytes) = blkio
                    .as_ref()
                    .map(|b| blkio_bytes(&join(b, relative), files))
                    .unwrap_or((0, 0));
                Counters {
                    cpu_time_ns: cpu,
                    memory_bytes: usage
                        .saturating_sub(field(&stat, "total_inactive_file").unwrap_or(0)),
                    disk_read_bytes,
                    disk_write_bytes,
                    pid: files
                        .read(&memory_dir, "cgroup.procs")
                        .ok()
                        .as_deref()
                        .and_then(first_pid),
                    ..Counters::default()
                }
            }
        };
        // Opened each round, never kept: an open `net/dev` holds the
        // network namespace it was opened in, which would outlive the
        // container's process until the next round.
        if let Some(pid) = counters.pid
            && let Ok(dev) = read_file(Path::new(&format!("/proc/{pid}/net/dev")))
        {
            (counters.net_rx_bytes, counters.net_tx_bytes) = net_dev(&dev);
        }
        Ok(counters)
    }

    /// The cgroup of process `pid` in this hierarchy, relative to its root
    /// (from `/proc/<pid>/cgroup`).
    pub fn cgroup_of(&self, pid: u32) -> io::Result<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        self.cgroup_in(&text)
            .ok_or_else(|| missing("the process's cgroup in this hierarchy"))
    }

    /// The path a `/proc/<pid>/cgroup` text gives in this hierarchy.
    fn cgroup_in(&self, text: &str) -> Option<String> {
        text.lines().find_map(|line| {
            // `hierarchy-id:controllers:path`
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let wanted = match self {
                Hierarchy::V2 { .. } => controllers.is_empty(),
                Hierarchy::V1 { .. } => controllers.split(',').any(|c| c == "memory"),
            };
            wanted.then(|| path.to_string())
        })
    }
}

/// The counters of one cgroup at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// CPU time of every task in the cgroup, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Memory in use without the inactive page cache, as `docker stats`
    /// counts it.
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Every interface of the network namespace but loopback.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// A process in the cgroup, whose network namespace was read.
    pub pid: Option<u32>,
}

/// One container's usage from two rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ContainerUsage {
    /// Percent of one core over the time since the previous round; 0 on
    /// the first.
    pub cpu_percent: f64,
    pub counters: Counters,
}

/// How the engine names container cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `<parent>/<id>`; default parent `docker`.
    Cgroupfs,
    /// `<parent>/docker-<id>.scope`; default parent `system.slice`.
    Systemd,
}

impl Driver {
    /// The engine's `CgroupDriver` (`cgroupfs`, `systemd`); anything else
    /// is read as cgroupfs.
    pub fn from_engine(name: &str) -> Driver {
        if name.eq_ignore_ascii_case("systemd") {
            Driver::Systemd
        } else {
            Driver::Cgroupfs
        }
    }

    fn default_parent(self) -> &'static str {
        match self {
            Driver::Cgroupfs => "/docker",
            Driver::Systemd => "/system.slice",
        }
    }

    fn leaf(self, container_id: &str) -> String {
        match self {
            Driver::Cgroupfs => container_id.to_string(),
            Driver::Systemd => format!("docker-{container_id}.scope"),
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Cgroupfs => "cgroupfs",
            Driver::Systemd => "systemd",
        })
    }
}

/// One round: each container's usage, and the containers whose cgroup
/// was not found where the engine puts them (learn each with
/// [`CgroupSampler::learn`] and its pid).
#[derive(Debug, Default)]
pub struct Round {
    pub usage: HashMap<String, ContainerUsage>,
    pub unresolved: Vec<String>,
    /// Containers whose cgroup was found but could not be read.
    pub failed: usize,
}

/// Reads containers' cgroups round after round, remembering where each
/// one is and its previous CPU time.
#[derive(Debug)]
pub struct CgroupSampler {
    hierarchy: Hierarchy,
    driver: Driver,
    /// Directories containers' cgroups were found in, the engine's default
    /// first.
    parents: Vec<String>,
    /// Container id → its cgroup, relative to the hierarchy's root.
    paths: HashMap<String, String>,
    /// Container id → CPU time and when it was read, for the next delta.
    previous: HashMap<String, (u64, Instant)>,
    /// Container id → its counter files kept open.
    files: HashMap<String, Files>,
}

impl CgroupSampler {
    pub fn new(hierarchy: Hierarchy, driver: Driver) -> Self {
        CgroupSampler {
            hierarchy,
            parents: vec![driver.default_parent().to_string()],
            driver,
            paths: HashMap::new(),
            previous: HashMap::new(),
            files: HashMap::new(),
        }
    }

    /// Counter files held open, over every container.
    pub fn files_held(&self) -> usize {
        self.files.values().map(Files::held).sum()
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// Where container `id`'s cgroup is: remembered, else under a known
    /// parent.
    fn locate(&mut self, id: &str) -> Option<String> {
        if let Some(path) = self.paths.get(id) {
            return Some(path.clone());
        }
        let leaf = self.driver.leaf(id);
        let found = self
            .parents
            .iter()
            .map(|parent| format!("{}/{leaf}", parent.trim_end_matches('/')))
            .find(|path| self.hierarchy.probe_dir(path).is_dir())?;
        self.paths.insert(id.to_string(), found.clone());
        Some(found)
    }

    /// Learns container `id`'s cgroup from its process `pid`, and its
    /// parent for later containers. False when the process's cgroup is not
    /// readable from here.
    pub fn learn(&mut self, id: &str, pid: u32) -> bool {
        let Ok(path) = self.hierarchy.cgroup_of(pid) else {
            return false;
        };
        if !self.hierarchy.probe_dir(&path).is_dir() {
            return false;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            let parent = if parent.is_empty() { "/" } else { parent };
            if !self.parents.iter().any(|p| p == parent) {
                tracing::info!(parent, "container cgroups found under another parent");
                self.parents.push(parent.to_string());
            }
        }
        self.paths.insert(id.to_string(), path);
        true
    }

    /// Reads every container of `ids` (blocking: file reads). Forgets
    /// containers not among them.
    pub fn sample(&mut self, ids: &[String]) -> Round {
        let mut round = Round::default();
        let listed: HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.previous.retain(|id, _| listed.contains(id.as_str()));
        self.paths.retain(|id, _| listed.contains(id.as_str()));
        self.files.retain(|id, _| listed.contains(id.as_str()));
        for id in ids {
            match self.read_one(id) {
                Some(Ok(usage)) => {
                    round.usage.insert(id.clone(), usage);
                }
                Some(Err(error)) => {
                    tracing::debug!(container = %id, %error, "cannot read the container's cgroup");
                    round.failed += 1;
                }
                None => round.unresolved.push(id.clone()),
            }
        }
        round
    }

    /// Reads container `id`: none when its cgroup is not found.
    pub fn read_one(&mut self, id: &str) -> Option<io::Result<ContainerUsage>> {
        let path = self.locate(id)?;
        let files = self.files.entry(id.to_string()).or_default();
        let counters = match self.hierarchy.read_kept(&path, files) {
            Ok(counters) => counters,
            Err(error) => {
                // It may have moved (restarted under another parent).
                self.paths.remove(id);
                self.previous.remove(id);
                self.files.remove(id);
                return Some(Err(error));
            }
        };
        let now = Instant::now();
        let cpu_percent = self
            .previous
            .get(id)
            .map(|(cpu, at)| cpu_percent(*cpu, counters.cpu_time_ns, now - *at))
            .unwrap_or(0.0);
        self.previous
            .insert(id.to_string(), (counters.cpu_time_ns, now));
        Some(Ok(ContainerUsage {
            cpu_percent,
            counters,
        }))
    }
}

/// CPU use between two readings, in percent of one core.
pub fn cpu_percent(before_ns: u64, after_ns: u64, elapsed: std::time::Duration) -> f64 {
    let elapsed = elapsed.as_nanos() as f64;
    if elapsed <= 0.0 || after_ns < before_ns {
        return 0.0;
    }
    (after_ns - before_ns) as f64 / elapsed * 100.0
}

fn join(root: &Path, relative: &str) -> PathBuf {
    root.join(relative.trim_start_matches('/'))
}

/// A small kernel file, whole: opened for this one read.
fn read_file(path: &Path) -> io::Result<String> {
    read_from_start(&std::fs::File::open(path)?)
}

/// A container's counter files, kept open from one round to the next and
/// read again from their start. Opening a cgroup file costs several times
/// reading it (a kernfs lookup and open; measured here: about 7 µs of CPU
/// against 1 µs for reading a small one again), and a round reads five
/// per container. The kernel writes a seq file's text afresh for a read
/// from offset 0.
///
/// A kept file that cannot be read any more (its cgroup was removed: the
/// container stopped or restarted) is opened again, once per read; a file
/// the cgroup does not have is remembered as missing. Files are kept only
/// while the process's budget of descriptors allows ([`SPARE`]); beyond
/// it, each read opens its file. Dropping a container's `Files` closes
/// them and returns them to the budget.
#[derive(Debug, Default)]
pub(crate) struct Files {
    /// By file name (unique within a hierarchy's files): the open file, or
    /// none for one the cgroup does not have.
    by_name: Vec<(&'static str, Option<std::fs::File>)>,
}

/// Descriptors every sampler of this process may still keep open, shared:
/// half of the process's limit when first asked (the agent raises its
/// soft limit to the hard one at start), the other half left to
/// connections, the store and streams.
static SPARE: OnceLock<AtomicUsize> = OnceLock::new();

fn spare() -> &'static AtomicUsize {
    SPARE.get_or_init(|| {
        use rustix::process::{Resource, getrlimit};
        let limit = getrlimit(Resource::Nofile).current.unwrap_or(1 << 20);
        AtomicUsize::new(usize::try_from(limit / 2).unwrap_or(usize::MAX))
    })
}

impl Files {
    /// The text of `dir/name`.
    fn read(&mut self, dir: &Path, name: &'static str) -> io::Result<String> {
        if let Some(at) = self.by_name.iter().position(|(n, _)| *n == name) {
            let Some(file) = &self.by_name[at].1 else {
                return Err(io::ErrorKind::NotFound.into());
            };
            if let Ok(text) = read_from_start(file) {
                return Ok(text);
            }
            // Stale: its cgroup was removed. Opened again below.
            self.by_name.remove(at);
            spare().fetch_add(1, Ordering::Relaxed);
        }
        let file = match std::fs::File::open(dir.join(name)) {
            Ok(file) => file,
            Err(error) => {
                if error.kind() == io::ErrorKind::NotFound && dir.is_dir() {
                    self.by_name.push((name, None));
                }
                return Err(error);
            }
        };
        let text = read_from_start(&file)?;
        let taken =
            spare().fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if taken.is_ok() {
            self.by_name.push((name, Some(file)));
        }
        Ok(text)
    }

    /// Open files held.
    fn held(&self) -> usize {
        self.by_name.iter().filter(|(_, f)| f.is_some()).count()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let held = self.held();
        if held > 0 {
            spare().fetch_add(held, Ordering::Relaxed);
        }
    }
}

/// A file's whole text, read from offset 0 whatever was read before.
fn read_from_start(file: &std::fs::File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file.read_at(&mut chunk, bytes.len() as u64)?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn missing(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("no {what}"))
}

fn parse_number(text: &str) -> io::Result<u64> {
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
}

/// The value of `key` in a flat keyed file (`cpu.stat`, `memory.stat`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The first process of a cgroup, from its `cgroup.procs`.
fn first_pid(procs: &str) -> Option<u32> {
    procs.lines().find_map(|l| l.trim().parse().ok())
}

/// Bytes read and written, summed over devices, from a v2 `io.stat`
/// (`8:0 rbytes=1 wbytes=2 rios=3 ...`).
fn io_stat(text: &str) -> (u64, u64) {
    let (mut read, mut write) = (0u64, 0u64);
    for pair in text.split_whitespace() {
        match pair.split_once('=') {
            Some(("rbytes", v)) => read = read.saturating_add(v.parse().unwrap_or(0)),
            Some(("wbytes", v)) => write = write.saturating_add(v.parse().unwrap_or(0)),
            _ => {}
        }
    }
    (read, write)
}

/// Bytes read and written from a v1 blkio cgroup: the CFQ counters when
/// the kernel keeps them and they list a device, else the throttle
/// layer's (which every block device goes through), as runc reads them.
/// The throttle file that exists is read once, even when it lists no
/// device (a container that has done no block I/O).
fn blkio_bytes(dir: &Path, files: &mut Files) -> (u64, u64) {
    if let Ok(text) = files.read(dir, "blkio.io_service_bytes_recursive")
        && let Some(bytes) = blkio_service_bytes(&text)
    {
        return bytes;
    }
    [
        "blkio.throttle.io_service_bytes_recursive",
        "blkio.throttle.io_service_bytes",
    ]
    .iter()
    .find_map(|file| files.read(dir, file).ok())
    .and_then(|text| blkio_service_bytes(&text))
    .unwrap_or((0, 0))
}

/// `8:0 Read 123` lines, summed; none when the file lists no device.
fn blkio_service_bytes(text: &str) -> Option<(u64, u64)> {
    let (mut read, mut write, mut devices) = (0u64, 0u64, 0usize);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_device), Some(op), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        devices += 1;
        match op {
            "Read" => read = read.saturating_add(value),
            "Write" => write = write.saturating_add(value),
            _ => {}
        }
    }
    (devices > 0).then_some((read, write))
}

/// Received and sent bytes of every interface but loopback, from
/// `/proc/<pid>/net/dev`.
fn net_dev(text: &str) -> (u64, u64) {
    let (mut rx, mut tx) = (0u64, 0u64);
    for line in text.lines().skip(2) {
        let Some((name, numbers)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let numbers: Vec<u64> = numbers
            .split_whitespace()
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        // receive: bytes packets errs drop fifo frame compressed multicast;
        // then transmit: bytes ...
        rx = rx.saturating_add(numbers.first().copied().unwrap_or(0));
        tx = tx.saturating_add(numbers.get(8).copied().unwrap_or(0));
    }
    (rx, tx)
}

/// A mount point as mountinfo escapes it (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
28 25 0:26 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
29 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
30 25 0:28 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
";

    #[test]
    fn a_hybrid_host_is_read_through_its_v1_controllers() {
        assert_eq!(
            Hierarchy::from_mountinfo(HYBRID).unwrap(),
            Hierarchy::V1 {
                cpuacct: "/sys/fs/cgroup/cpuacct".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                blkio: Some("/sys/fs/cgroup/blkio".into()),
            }
        );
        let joint = "27 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                     29 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let Hierarchy::V1 { cpuacct, blkio, .. } = Hierarchy::from_mountinfo(joint).unwrap() else {
            panic!("v1 expected");
        };
        assert_eq!(cpuacct, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(blkio, None);
    }

    #[test]
    fn a_unified_host_is_v2_and_a_host_without_cgroups_is_refused() {
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            Hierarchy::from_mountinfo(unified).unwrap(),
            Hierarchy::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        assert!(Hierarchy::from_mountinfo("1 0 8:1 / / rw - ext4 /dev/vda rw\n").is_err());
    }

    #[test]
    fn a_process_cgroup_is_read_for_the_hierarchy_in_use() {
        let text = "4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/system.slice/docker-abc.scope\n";
        let v1 = Hierarchy::from_mountinfo(HYBRID).unwrap();
        assert_eq!(v1.cgroup_in(text).as_deref(), Some("/docker/abc"));
        let v2 = Hierarchy::V2 { root: "/x".into() };
        assert_eq!(
            v2.cgroup_in(text).as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
    }

    #[test]
    fn counter_files_are_parsed_as_the_kernel_writes_them() {
        let cpu = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(field(cpu, "usage_usec"), Some(1500));
        assert_eq!(field(cpu, "usage"), None);
        assert_eq!(
            io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2\n259:0 rbytes=5 wbytes=1\n"),
            (15, 21)
        );
        assert_eq!(
            blkio_service_bytes("8:0 Read 7\n8:0 Write 9\n8:0 Sync 16\n8:0 Total 16\nTotal 16\n"),
            Some((7, 9))
        );
        assert_eq!(blkio_service_bytes("Total 0\n"), None);
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
                   eth0:    1000      10    0    0    0     0          0         0      500       5    0    0    0     0       0          0\n";
        assert_eq!(net_dev(dev), (1000, 500));
        assert_eq!(unescape("/a\\040b\\"), "/a b\\");
    }

    #[test]
    fn a_kept_file_is_read_afresh_from_its_start() {
        // `rchar` counts the bytes this process has read: it grows between
        // two reads of the same open file only if the kernel writes the
        // text again.
        let rchar = |text: &str| field(&text.replace(':', ""), "rchar").expect("rchar");
        let mut files = Files::default();
        let first = files.read(Path::new("/proc/self"), "io").unwrap();
        assert_eq!(files.held(), 1);
        let second = files.read(Path::new("/proc/self"), "io").unwrap();
        assert_eq!(files.held(), 1, "the same file, not a second one");
        assert!(rchar(&second) > rchar(&first), "{first}\n{second}");
    }

    #[test]
    fn a_sampler_keeps_its_containers_files_open_until_they_are_gone() {
        let root = tempfile::tempdir().unwrap();
        let cgroup = |id: &str, io: bool| {
            let dir = root.path().join("docker").join(id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cpu.stat"), "usage_usec 1000\n").unwrap();
            std::fs::write(dir.join("memory.current"), "100\n").unwrap();
            std::fs::write(dir.join("memory.stat"), "inactive_file 10\n").unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
            if io {
                std::fs::write(dir.join("io.stat"), "8:0 rbytes=5 wbytes=7\n").unwrap();
            }
            dir
        };
        let web = cgroup("web", true);
        cgroup("db", false);
        let hierarchy = Hierarchy::V2 {
            root: root.path().to_path_buf(),
        };
        let mut sampler = CgroupSampler::new(hierarchy, Driver::Cgroupfs);
        let both = ["web".to_string(), "db".to_string()];
        let round = sampler.sample(&both);
        assert_eq!(round.usage.len(), 2, "{round:?}");
        let counters = round.usage["web"].counters;
        assert_eq!(counters.cpu_time_ns, 1_000_000);
        assert_eq!(counters.memory_bytes, 90);
        assert_eq!(
            (counters.disk_read_bytes, counters.disk_write_bytes),
            (5, 7)
        );
        assert_eq!(sampler.files_held(), 5 + 4, "db has no io.stat");
        // The same open file shows what the file holds now.
        std::fs::write(web.join("cpu.stat"), "usage_usec 3000\n").unwrap();
        let round = sampler.sample(&both);
        assert_eq!(round.usage["web"].counters.cpu_time_ns, 3_000_000);
        assert_eq!(sampler.files_held(), 9, "nothing opened twice");
        sampler.sample(&["db".to_string()]);
        assert_eq!(
            sampler.files_held(),
            4,
            "web's closed once it is not listed"
        );
        sampler.sample(&[]);
        assert_eq!(sampler.files_held(), 0);
    }

    #[test]
    fn cpu_use_is_the_cpu_time_delta_over_the_wall_time() {
        let second = std::time::Duration::from_secs(1);
        assert_eq!(cpu_percent(0, 500_000_000, second), 50.0);
        assert_eq!(
            cpu_percent(5, 4, second),
            0.0,
            "a reset is not negative use"
        );
        assert_eq!(cpu_percent(0, 5, std::time::Duration::ZERO), 0.0);
    }

    #[test]
    fn container_cgroups_are_named_as_the_engine_driver_names_them() {
        assert_eq!(
            Driver::from_engine("systemd").leaf("abc"),
            "docker-abc.scope"
        );
        assert_eq!(Driver::from_engine("cgroupfs").leaf("abc"), "abc");
        assert_eq!(Driver::from_engine("").default_parent(), "/docker");
    }
}
