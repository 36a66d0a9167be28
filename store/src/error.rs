use std::path::PathBuf;

/// Everything a store operation can refuse or fail with. Each variant says
/// whether trying again can help (`is_retryable`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("workload {id}: revision {revision} is already applied with a different spec")]
    RevisionConflict { id: String, revision: String },
    #[error(
        "workload {id} exists with type {existing}; delete it before applying type {requested}"
    )]
    TypeMismatch {
        id: String,
        existing: String,
        requested: String,
    },
    #[error("workload {id} is being deleted")]
    BeingDeleted { id: String },
    #[error("workload {id} changed (resource version {actual}, expected {expected})")]
    Conflict {
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("workload {0} not found")]
    NotFound(String),
    #[error(
        "resource version {requested} is expired (the log was compacted through {compacted_through}); list again"
    )]
    Expired {
        requested: u64,
        compacted_through: u64,
    },
    #[error("state directory {path} is in use by another persys-agent process")]
    Locked { path: PathBuf },
    #[error("state directory {path}: {message}")]
    Open { path: PathBuf, message: String },
    /// The node key is missing, wrong, unreadable or mid-rotation: the
    /// message says which file and what to do.
    #[error("{message}")]
    Key { message: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store write failed: {0}")]
    Io(String),
    /// The state filesystem has less free space than the store keeps in
    /// reserve: nothing was written. Writes resume by themselves once
    /// space is freed.
    #[error(
        "the store cannot write: {path} has {available} bytes free, less than the {reserve} it keeps in reserve (the disk is full); nothing was written, and writes resume by themselves once space is freed"
    )]
    NoSpace {
        path: PathBuf,
        available: u64,
        reserve: u64,
    },
    /// Writing or syncing the journal failed. What the failed sync covered
    /// may be lost even if a later sync succeeds ("fsyncgate"), so nothing
    /// is acknowledged any more: the agent restarts and recovers from what
    /// is on disk.
    #[error(
        "the store cannot write: {0}; nothing is acknowledged any more until the agent is restarted and recovers from the journal"
    )]
    Failed(String),
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// True when the same call may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_) | StoreError::Conflict { .. } | StoreError::NoSpace { .. }
        )
    }
}

impl From<fjall::Error> for StoreError {
    fn from(error: fjall::Error) -> Self {
        StoreError::Io(error.to_string())
    }
}
