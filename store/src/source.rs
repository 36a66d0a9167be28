//! The store as the controllers see it.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use persys_api::source::{
    Change, Listing, SourceError, WorkloadSource, WorkloadWriter, WriteError,
};
use persys_api::v1::{EventType, ObjectStatus, Workload};

use super::{Store, StoreError};

impl From<StoreError> for SourceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Expired {
                requested,
                compacted_through,
            } => SourceError::Expired {
                requested,
                compacted_through,
            },
            other => SourceError::Unavailable(other.to_string()),
        }
    }
}

impl From<StoreError> for WriteError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict {
                id,
                expected,
                actual,
            } => WriteError::Conflict {
                id,
                expected,
                actual,
            },
            StoreError::NotFound(id) => WriteError::NotFound(id),
            other => WriteError::Unavailable(other.to_string()),
        }
    }
}

impl Store {
    /// Every change after `after`: the log, then live writes.
    pub fn watch(
        &self,
        after: u64,
    ) -> impl futures::Stream<Item = Result<Change, StoreError>> + Send + 'static {
        super::watch::watch(self.inner.clone(), after, None)
    }

    /// [`Store::watch`] of one workload id: the changes of that id after
    /// `after`, in order, with no gap. Woken only by that id's changes.
    pub fn watch_id(
        &self,
        after: u64,
        id: &str,
    ) -> impl futures::Stream<Item = Result<Change, StoreError>> + Send + 'static {
        super::watch::watch(self.inner.clone(), after, Some(id.to_string()))
    }
}

impl WorkloadSource for Store {
    fn list(&self) -> BoxFuture<'_, Result<Listing, SourceError>> {
        let store = self.clone();
        async move {
            tokio::task::spawn_blocking(move || store.snapshot())
                .await
                .map_err(|e| SourceError::Unavailable(e.to_string()))?
                .map_err(SourceError::from)
        }
        .boxed()
    }

    fn watch(&self, after: u64) -> BoxStream<'static, Result<Change, SourceError>> {
        Store::watch(self, after)
            .map(|r| r.map_err(SourceError::from))
            .boxed()
    }
}

impl WorkloadWriter for Store {
    fn update_status(
        &self,
        id: String,
        expected_resource_version: u64,
        status: ObjectStatus,
    ) -> BoxFuture<'_, Result<Arc<Workload>, WriteError>> {
        async move {
            Store::update_status(self, &id, expected_resource_version, status)
                .await
                .map_err(WriteError::from)
        }
        .boxed()
    }

    fn remove_finalizer(
        &self,
        id: String,
        finalizer: String,
    ) -> BoxFuture<'_, Result<(), WriteError>> {
        async move {
            Store::remove_finalizer(self, &id, &finalizer)
                .await
                .map_err(WriteError::from)
        }
        .boxed()
    }

    fn record_event(
        &self,
        id: String,
        kind: EventType,
        reason: String,
        message: String,
    ) -> BoxFuture<'_, Result<(), WriteError>> {
        async move {
            Store::record_event(self, &id, kind, &reason, &message)
                .await
                .map_err(WriteError::from)
        }
        .boxed()
    }
}
