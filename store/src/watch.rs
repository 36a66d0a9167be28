//! Watching the log: replay from a resource version, then follow live,
//! without gaps or duplicates.
//!
//! The watcher subscribes to live changes *before* it reads the log, so a
//! change is either read from the log or received live (and then skipped if
//! already read). If it falls behind the live buffer, it reads the log again.

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
    live: broadcast::Receiver<Arc<Change>>,
    /// The next resource version to deliver.
    next: u64,
    phase: Phase,
    pending: std::collections::VecDeque<Change>,
}

pub(super) fn watch(
    inner: Arc<Inner>,
    after: u64,
) -> impl Stream<Item = Result<Change, StoreError>> + Send + 'static {
    let live = inner.changes.subscribe();
    let state = Watch {
        inner,
        live,
        next: after + 1,
        phase: Phase::Replaying,
        pending: Default::default(),
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
            self.pending.push_back(change_of(record));
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
