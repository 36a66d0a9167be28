//! The Go agent's state file, read: a bbolt 1.3 file opened read-only
//! (`bbolt-rs`), checked page by page, its buckets copied out.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bbolt_rs::{BoltOptions, BucketApi, DbApi, TxApi, TxCheck};

/// bbolt's meta-page magic, little-endian at byte 16 of the file (after
/// the 16-byte page header), followed by the format version, 2.
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;

/// The buckets the Go agent creates at start.
pub const WORKLOADS: &str = "workloads";
pub const STATUS: &str = "status";
pub const VOLUMES: &str = "volumes";
pub const ATTACHMENTS: &str = "attachments";

/// What the file holds, copied out of its read transaction.
#[derive(Debug, Default)]
pub struct GoState {
    /// `workloads`: key (the workload id) and JSON value, in key order.
    pub workloads: Vec<(Vec<u8>, Vec<u8>)>,
    /// `status` entries: informational, this agent observes the runtimes.
    pub status: usize,
    /// `volumes`: volume id and JSON record.
    pub volumes: Vec<(Vec<u8>, Vec<u8>)>,
    /// `attachments`: key and JSON record.
    pub attachments: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why the file cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ReadError {
    pub path: PathBuf,
    pub reason: String,
}

fn read_error(path: &Path, reason: impl Into<String>) -> ReadError {
    ReadError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `path` starts with a bbolt meta page (magic and version), as
/// a file the Go agent wrote does; its name says nothing.
pub fn has_bolt_header(path: &Path) -> std::io::Result<bool> {
    let mut header = [0u8; 24];
    let mut file = File::open(path)?;
    match file.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(error) => return Err(error),
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    Ok(word(16) == MAGIC && word(20) == VERSION)
}

/// Reads every bucket the import needs, read-only: the file's bytes and
/// times are left as they are. Refused while another process (the Go
/// agent) holds the file's lock, and when bbolt's own consistency check
/// finds damage.
pub fn read(path: &Path) -> Result<GoState, ReadError> {
    match has_bolt_header(path) {
        Ok(true) => {}
        Ok(false) => {
            return Err(read_error(
                path,
                "is not a bbolt database (no bbolt meta page at its start): damaged, or not the Go agent's state file",
            ));
        }
        Err(error) => return Err(read_error(path, format!("cannot be read: {error}"))),
    }
    // The Go agent holds an exclusive lock while it runs; bbolt-rs's own
    // shared lock would wait for it forever. Held until the read is done.
    let guard = File::open(path).map_err(|e| read_error(path, format!("cannot be opened: {e}")))?;
    if let Err(error) = rustix::fs::flock(&guard, rustix::fs::FlockOperation::NonBlockingLockShared)
    {
        return Err(read_error(
            path,
            format!(
                "is locked by another process ({error}): stop the Go agent first (systemctl stop persys-agent), then start this one"
            ),
        ));
    }
    // bbolt-rs asserts on some damage rather than returning an error: a
    // panic here is damage too, reported, never a crash.
    let result = std::panic::catch_unwind(|| read_unguarded(path));
    drop(guard);
    match result {
        Ok(result) => result,
        Err(panic) => {
            let message = if let Some(text) = panic.downcast_ref::<&str>() {
                (*text).to_string()
            } else if let Some(text) = panic.downcast_ref::<String>() {
                text.clone()
            } else {
                "no message".to_string()
            };
            Err(read_error(
                path,
                format!("is damaged: the bbolt reader failed on it ({message})"),
            ))
        }
    }
}

fn read_unguarded(path: &Path) -> Result<GoState, ReadError> {
    let db = BoltOptions::builder()
        .preload_freelist()
        .build()
        .open_ro(path)
        .map_err(|e| read_error(path, format!("is not a readable bbolt database: {e}")))?;
    let tx = db
        .begin()
        .map_err(|e| read_error(path, format!("cannot be read: {e}")))?;
    let problems = tx.check();
    if !problems.is_empty() {
        let shown: Vec<_> = problems.iter().take(5).cloned().collect();
        return Err(read_error(
            path,
            format!(
                "is damaged: bbolt's consistency check found {} problem(s): {}",
                problems.len(),
                shown.join("; ")
            ),
        ));
    }
    let entries = |name: &str| -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
        let bucket = tx.bucket(name)?;
        Some(
            bucket
                .iter_entries()
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .collect(),
        )
    };
    let Some(workloads) = entries(WORKLOADS) else {
        return Err(read_error(
            path,
            "is a bbolt database without a `workloads` bucket: not the Go agent's state file",
        ));
    };
    let state = GoState {
        workloads,
        status: entries(STATUS).map_or(0, |e| e.len()),
        volumes: entries(VOLUMES).unwrap_or_default(),
        attachments: entries(ATTACHMENTS).unwrap_or_default(),
    };
    drop(tx);
    Ok(state)
}
