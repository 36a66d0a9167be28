//! Watching the log: replay from a resource version, then follow live,
//! without gaps or duplicates.
//!
//! The watcher subscribes to live changes *before* it reads the log, so a
//! change is either read from the log or received live (and then skipped if
//! already read). If it falls behind the live buffer, it reads the log again.
//!
//! A watch of one id subscribes to that id's channel instead of every
//! change's: the committer publishes each change on both. Its live changes
//! are not consecutive versions, so it cannot see a gap by their numbers;
//! it needs none: the id's channel carries every change of the id in order,
//! and one it lagged behind is reported (then the log is read again).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::Stream;
use persys_api::source::{Change, ChangeKind};
use tokio::sync::broadcast;

use super::record::{LogRecord, log_key};
use super::{Inner, StoreError};

/// Log entries read per step of a replay.
const REPLAY_CHUNK: usize = 256;

/// Where a watch is.
enum Phase {
    /// Reading the log from `next`.
    Replaying,
    /// Caught up: taking live changes.
    Following,
    /// Ended (after an error).
    Done,
}

struct Watch {
    inner: Arc<Inner>,
    /// Dropped before `_subscription`, which then finds the id unwatched.
    live: broadcast::Receiver<Arc<Change>>,
    /// Only this workload's changes, when set.
    id: Option<String>,
    /// The next resource version to deliver (or, for one id, to consider).
    next: u64,
    phase: Phase,
    pending: std::collections::VecDeque<Change>,
    _subscription: Option<IdSubscription>,
}

/// Removes an id's channel when its last watcher goes.
struct IdSubscription {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for IdSubscription {
    fn drop(&mut self) {
        let mut by_id = self
            .inner
            .changes_by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if by_id
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            by_id.remove(&self.id);
        }
    }
}

pub(super) fn watch(
    inner: Arc<Inner>,
    after: u64,
    id: Option<String>,
) -> impl Stream<Item = Result<Change, StoreError>> + Send + 'static {
    let (live, subscription) = match &id {
        None => (inner.changes.subscribe(), None),
        Some(id) => {
            let mut by_id = inner
                .changes_by_id
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let live = by_id
                .entry(id.clone())
                .or_insert_with(|| broadcast::channel(super::LIVE_BUFFER_ONE_ID).0)
                .subscribe();
            let subscription = IdSubscription {
                inner: inner.clone(),
                id: id.clone(),
            };
            (live, Some(subscription))
        }
    };
    let state = Watch {
        inner,
        live,
        id,
        next: after + 1,
        phase: Phase::Replaying,
        pending: Default::default(),
        _subscription: subscription,
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.step().await?;
        Some((item, state))
    })
}

impl Watch {
    async fn step(&mut self) -> Option<Result<Change, StoreError>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some(Ok(change));
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Replaying => match self.read_chunk() {
                    Ok(caught_up) => {
                        if caught_up {
                            self.phase = Phase::Following;
                        }
                    }
                    Err(error) => {
                        self.phase = Phase::Done;
                        return Some(Err(error));
                    }
                },
                Phase::Following => match self.live.recv().await {
                    Ok(change) if self.id.is_some() => {
                        // Only this id's changes come: a later version is
                        // the next one of the id, not a gap.
                        if change.resource_version < self.next {
                            continue;
                        }
                        self.next = change.resource_version + 1;
                        return Some(Ok((*change).clone()));
                    }
                    Ok(change) => {
                        if change.resource_version < self.next {
                            continue;
                        }
                        if change.resource_version > self.next {
                            // Something between was not seen live: read it.
                            self.phase = Phase::Replaying;
                            continue;
                        }
                        self.next += 1;
                        return Some(Ok((*change).clone()));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.phase = Phase::Replaying;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.phase = Phase::Done;
                        return Some(Err(StoreError::Closed));
                    }
                },
            }
        }
    }

    /// Reads up to a chunk of the log from `next` into `pending`. Returns
    /// true when the log holds nothing more.
    fn read_chunk(&mut self) -> Result<bool, StoreError> {
        let compacted = self.inner.compacted_through.load(Ordering::Acquire);
        if self.next <= compacted {
            return Err(StoreError::Expired {
                requested: self.next - 1,
                compacted_through: compacted,
            });
        }
        let mut read = 0;
        for guard in self.inner.log.range(log_key(self.next)..) {
            let value = guard.value()?;
            let record = super::schema::open_record(&self.inner.sealer, &value)?;
            if record.resource_version != self.next {
                // Dropped by the log's size bound before it was trimmed.
                let compacted = self.inner.compacted_through.load(Ordering::Acquire);
                return Err(StoreError::Expired {
                    requested: self.next - 1,
                    compacted_through: compacted.max(record.resource_version - 1),
                });
            }
            let wanted = self
                .id
                .as_deref()
                .is_none_or(|id| record.object.as_ref().is_some_and(|o| o.id() == id));
            if wanted {
                self.pending.push_back(change_of(record));
            }
            self.next += 1;
            read += 1;
            if read == REPLAY_CHUNK {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

pub(super) fn change_of(record: LogRecord) -> Change {
    // The log holds only changes; a record of any other type reads as a
    // modification, as it always has.
    let kind = ChangeKind::from_wire(record.kind()).unwrap_or(ChangeKind::Modified);
    Change {
        kind,
        resource_version: record.resource_version,
        object: Arc::new(record.object.unwrap_or_default()),
    }
}

#[cfg(test)]
mod proptests;
