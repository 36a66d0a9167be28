//! How controllers see the store: a source of changes and a writer of status.
//!
//! The store implements both; tests can feed an in-memory log instead.

use std::sync::Arc;

use crate::v1::{EventType, ObjectStatus, WatchEventType, Workload};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// What happened to an object at one resource version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    /// The wire name, as a watch prints it.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }

    /// The change a Watch event carries; `None` for a bookmark (or an
    /// unset type), which carries no change.
    pub fn from_wire(kind: WatchEventType) -> Option<ChangeKind> {
        match kind {
            WatchEventType::Added => Some(ChangeKind::Added),
            WatchEventType::Modified => Some(ChangeKind::Modified),
            WatchEventType::Deleted => Some(ChangeKind::Deleted),
            WatchEventType::Bookmark | WatchEventType::Unspecified => None,
        }
    }
}

impl From<ChangeKind> for WatchEventType {
    fn from(kind: ChangeKind) -> WatchEventType {
        match kind {
            ChangeKind::Added => WatchEventType::Added,
            ChangeKind::Modified => WatchEventType::Modified,
            ChangeKind::Deleted => WatchEventType::Deleted,
        }
    }
}

/// One entry of the change log.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    pub resource_version: u64,
    /// The object as written; for `Deleted`, its last state.
    pub object: Arc<Workload>,
}

/// Every object at one resource version.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub objects: Vec<Arc<Workload>>,
    pub resource_version: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    /// The log no longer holds the versions after `requested`: list again.
    #[error(
        "resource version {requested} is expired (the log was compacted through {compacted_through}); list again"
    )]
    Expired {
        requested: u64,
        compacted_through: u64,
    },
    /// The store could not be read; retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A list + watch view of the workloads.
pub trait WorkloadSource: Send + Sync + 'static {
    /// Every current object and the resource version they are consistent at.
    fn list(&self) -> BoxFuture<'_, Result<Listing, SourceError>>;

    /// Every change after `after`, in order, without gaps or duplicates:
    /// first what the log holds, then live writes.
    fn watch(&self, after: u64) -> BoxStream<'static, Result<Change, SourceError>>;
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    /// The object changed since it was read; read it again and retry.
    #[error("workload {id} changed (resource version {actual}, expected {expected})")]
    Conflict {
        id: String,
        expected: u64,
        actual: u64,
    },
    #[error("workload {0} not found")]
    NotFound(String),
    /// The store could not write; retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The writes a controller may make. Status writes never bump `generation`.
pub trait WorkloadWriter: Send + Sync + 'static {
    /// Replaces the status, if the object is still at `expected_resource_version`.
    fn update_status(
        &self,
        id: String,
        expected_resource_version: u64,
        status: ObjectStatus,
    ) -> BoxFuture<'_, Result<Arc<Workload>, WriteError>>;

    /// Removes a finalizer; a deleted object with none left leaves the store.
    fn remove_finalizer(
        &self,
        id: String,
        finalizer: String,
    ) -> BoxFuture<'_, Result<(), WriteError>>;

    /// Records a Kubernetes-style event; repeats fold into a count.
    fn record_event(
        &self,
        id: String,
        kind: EventType,
        reason: String,
        message: String,
    ) -> BoxFuture<'_, Result<(), WriteError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_kind_goes_to_the_wire_and_back_and_a_bookmark_is_no_change() {
        for kind in [ChangeKind::Added, ChangeKind::Modified, ChangeKind::Deleted] {
            let wire = WatchEventType::from(kind);
            assert_eq!(ChangeKind::from_wire(wire), Some(kind));
            assert!(wire.as_str_name().ends_with(kind.name()), "{wire:?}");
        }
        assert_eq!(ChangeKind::from_wire(WatchEventType::Bookmark), None);
        assert_eq!(ChangeKind::from_wire(WatchEventType::Unspecified), None);
    }
}
