//! Follows the agent's Watch stream through expired versions: what `watch`,
//! `get -w` and `delete --wait` read.
//!
//! A stream from version 0 starts with the current objects, then follows
//! changes; its first BOOKMARK says the list part is over. When a version
//! has been compacted away the agent answers FAILED_PRECONDITION "expired";
//! the watcher then lists again (a new stream from 0) and reports only what
//! differs from what it reported before — objects that vanished meanwhile as
//! DELETED — so the relist is invisible to the reader. It does the same
//! when the agent expired the stream because the watcher fell behind
//! (RESOURCE_EXHAUSTED "watch expired": a terminal that stopped reading).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use persys_api::v1::{WatchEvent, WatchEventType, WatchRequest, Workload, WorkloadType};
use tonic::{Code, Status, Streaming};

use crate::connection::Agent;
use crate::error::CliError;

pub use persys_api::source::ChangeKind;

/// One change of one workload.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    pub resource_version: u64,
    /// The object after the change (for DELETED: as it was last).
    pub workload: Workload,
    /// When the change was written, ms since the epoch.
    pub at_ms: i64,
}

/// What the watcher reports.
#[derive(Debug)]
pub enum Item {
    Change(Box<Change>),
    /// Every object that existed when the (re)list started has been
    /// reported.
    Synced,
}

/// Which workloads to watch.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub id: Option<String>,
    pub kind: Option<WorkloadType>,
}

/// The watcher's state.
enum State {
    /// Open a stream after `from`; from 0 it starts with the current objects.
    Connect { from: u64 },
    /// Reading the current objects of a stream from 0, up to its first
    /// BOOKMARK. `listed` collects their ids: a known object missing from
    /// the list was deleted while we were not looking.
    Listing {
        stream: Streaming<WatchEvent>,
        listed: BTreeSet<String>,
    },
    /// Following changes; `last` is the newest version seen, bookmarks
    /// included.
    Following {
        stream: Streaming<WatchEvent>,
        last: u64,
    },
}

/// A stream of changes that survives expired versions.
pub struct Watcher {
    agent: Agent,
    filter: Filter,
    state: State,
    /// Every object reported and not deleted, by id; what a relist is
    /// compared with. `None` while the watch started from a given version:
    /// then the objects that existed before it are unknown, and every event
    /// is reported as the agent sent it.
    known: Option<BTreeMap<String, Workload>>,
    /// Reported by a step and not yet returned by `next`.
    pending: VecDeque<Item>,
}

/// Bookmarks every second while idle: the first one ends the list part.
const BOOKMARK_SECONDS: u32 = 1;

/// The version asked for is gone from the log, or the agent ended a
/// stream that fell behind: either way, list again.
fn is_expired(status: &Status) -> bool {
    (status.code() == Code::FailedPrecondition && status.message().starts_with("expired"))
        || (status.code() == Code::ResourceExhausted
            && status.message().starts_with("watch expired"))
}

impl Watcher {
    /// Starts with the current objects (`since` None) or after a version.
    pub fn new(agent: Agent, filter: Filter, since: Option<u64>) -> Watcher {
        let from = since.unwrap_or(0);
        Watcher {
            agent,
            filter,
            state: State::Connect { from },
            known: None,
            pending: VecDeque::new(),
        }
    }

    /// Opens the stream now rather than at the first `next`: whatever
    /// happens after this returns is seen.
    pub async fn open(&mut self) -> Result<(), CliError> {
        while matches!(self.state, State::Connect { .. }) {
            self.step().await?;
        }
        Ok(())
    }

    /// The next change, or the end of a list.
    pub async fn next(&mut self) -> Result<Item, CliError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            self.step().await?;
        }
    }

    /// The object as last reported, if it still exists.
    pub fn last_seen(&self, id: &str) -> Option<&Workload> {
        self.known.as_ref()?.get(id)
    }

    async fn step(&mut self) -> Result<(), CliError> {
        let state = std::mem::replace(&mut self.state, State::Connect { from: 0 });
        self.state = match state {
            State::Connect { from } => {
                let request = WatchRequest {
                    resource_version: from,
                    r#type: self.filter.kind.unwrap_or(WorkloadType::Unspecified) as i32,
                    id: self.filter.id.clone().unwrap_or_default(),
                    bookmark_interval_seconds: BOOKMARK_SECONDS,
                };
                match self.agent.watch(request).await {
                    Ok(stream) if from == 0 => {
                        self.known.get_or_insert_with(BTreeMap::new);
                        State::Listing {
                            stream,
                            listed: BTreeSet::new(),
                        }
                    }
                    Ok(stream) => State::Following { stream, last: from },
                    Err(status) if is_expired(&status) => State::Connect { from: 0 },
                    Err(status) => {
                        self.state = State::Connect { from };
                        return Err(self.agent.failure(&status).await);
                    }
                }
            }
            State::Listing {
                mut stream,
                mut listed,
            } => match self.receive(&mut stream).await? {
                None => State::Connect { from: 0 },
                Some(event) if event.r#type() == WatchEventType::Bookmark => {
                    self.end_list(&listed);
                    State::Following {
                        stream,
                        last: event.resource_version,
                    }
                }
                Some(event) => {
                    if let Some(object) = &event.object {
                        listed.insert(object.id().to_string());
                    }
                    self.observe(event);
                    State::Listing { stream, listed }
                }
            },
            State::Following { mut stream, last } => match self.receive(&mut stream).await? {
                None => State::Connect { from: 0 },
                Some(event) => {
                    let last = last.max(event.resource_version);
                    if event.r#type() != WatchEventType::Bookmark {
                        self.observe(event);
                    }
                    State::Following { stream, last }
                }
            },
        };
        Ok(())
    }

    /// The next event; `None` when the version expired and the watcher
    /// must list again.
    async fn receive(
        &self,
        stream: &mut Streaming<WatchEvent>,
    ) -> Result<Option<WatchEvent>, CliError> {
        match stream.message().await {
            Ok(Some(event)) => Ok(Some(event)),
            Ok(None) => Err(CliError::WatchEnded {
                server: self.agent.server().to_string(),
                reason: String::new(),
            }),
            Err(status) if is_expired(&status) => Ok(None),
            Err(status) => Err(match self.agent.failure(&status).await {
                CliError::Agent { reason, .. } => CliError::WatchEnded {
                    server: self.agent.server().to_string(),
                    reason,
                },
                other => other,
            }),
        }
    }

    /// The list part is over: what we knew and the list lacks is gone.
    fn end_list(&mut self, listed: &BTreeSet<String>) {
        if let Some(known) = &mut self.known {
            let gone: Vec<String> = known
                .keys()
                .filter(|id| !listed.contains(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(workload) = known.remove(&id) {
                    self.pending.push_back(Item::Change(Box::new(Change {
                        kind: ChangeKind::Deleted,
                        resource_version: workload.resource_version(),
                        workload,
                        at_ms: persys_api::now_ms(),
                    })));
                }
            }
        }
        self.pending.push_back(Item::Synced);
    }

    /// Records an event and reports it, unless it repeats what was
    /// reported already (a relist resends every object).
    fn observe(&mut self, event: WatchEvent) {
        let Some(kind) = ChangeKind::from_wire(event.r#type()) else {
            return;
        };
        let Some(workload) = event.object else {
            return;
        };
        let id = workload.id().to_string();
        let kind = match &mut self.known {
            None => kind,
            Some(known) if kind == ChangeKind::Deleted => {
                if known.remove(&id).is_none() {
                    return;
                }
                kind
            }
            Some(known) => {
                let kind = match known.get(&id) {
                    Some(before) if before.resource_version() >= workload.resource_version() => {
                        return;
                    }
                    Some(before) if before.uid() == workload.uid() => ChangeKind::Modified,
                    _ => ChangeKind::Added,
                };
                known.insert(id, workload.clone());
                kind
            }
        };
        let at_ms = workload
            .metadata
            .as_ref()
            .map(|m| m.updated_at_ms)
            .filter(|ms| *ms > 0)
            .unwrap_or_else(persys_api::now_ms);
        self.pending.push_back(Item::Change(Box::new(Change {
            kind,
            resource_version: event.resource_version,
            workload,
            at_ms,
        })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_version_and_a_stream_that_fell_behind_both_list_again() {
        assert!(is_expired(&Status::failed_precondition(
            "expired: resource version 3 is compacted"
        )));
        assert!(is_expired(&Status::resource_exhausted(
            "watch expired: the client fell behind by 10001 changes (resource_version 5 of 10006), more than PERSYS_WATCH_MAX_BACKLOG allows (10000); every change through resource_version 5 was sent: watch again from 5, or list again from 0"
        )));
        assert!(!is_expired(&Status::resource_exhausted("too many streams")));
        assert!(!is_expired(&Status::unavailable("expired")));
    }
}
