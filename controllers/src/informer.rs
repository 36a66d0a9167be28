//! The informer: one shared, always-current cache of every workload.
//!
//! It lists the source, then follows its change log from the listed version.
//! When the log has been compacted past that version (the watch is
//! "expired", a 410 Gone), it lists again and tells subscribers what changed
//! in between, so nobody misses a change.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use persys_api::v1::{Workload, WorkloadType};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::source::{Change, ChangeKind, SourceError, WorkloadSource};

/// How many notifications a slow subscriber may fall behind before it is told
/// it lagged (and must resync from the cache).
const NOTIFICATION_BUFFER: usize = 16 * 1024;

/// A change seen by the informer, with the object before and after.
#[derive(Debug, Clone)]
pub struct Notification {
    pub kind: ChangeKind,
    pub resource_version: u64,
    /// The cached object before this change (none for `Added`).
    pub old: Option<Arc<Workload>>,
    /// The object after it; for `Deleted`, its last state.
    pub new: Arc<Workload>,
}

impl Notification {
    pub fn id(&self) -> &str {
        self.new.id()
    }

    pub fn workload_type(&self) -> WorkloadType {
        self.new.workload_type()
    }

    /// True unless this change only touched the status: what a controller
    /// must act on. Its own status writes do not trigger it again.
    pub fn changes_intent(&self) -> bool {
        let Some(old) = &self.old else {
            return true;
        };
        if self.kind != ChangeKind::Modified {
            return true;
        }
        let (Some(a), Some(b)) = (&old.metadata, &self.new.metadata) else {
            return true;
        };
        a.generation != b.generation
            || a.uid != b.uid
            || a.deletion_timestamp_ms != b.deletion_timestamp_ms
            || a.finalizers != b.finalizers
    }
}

#[derive(Debug, Default)]
struct CacheState {
    objects: HashMap<String, Arc<Workload>>,
    by_type: HashMap<WorkloadType, BTreeSet<String>>,
    resource_version: u64,
}

impl CacheState {
    fn insert(&mut self, object: Arc<Workload>) -> Option<Arc<Workload>> {
        let id = object.id().to_string();
        let kind = object.workload_type();
        let old = self.objects.insert(id.clone(), object);
        match &old {
            // Most changes are of an object already indexed under its type.
            Some(old) if old.workload_type() == kind => {}
            Some(old) => {
                if let Some(ids) = self.by_type.get_mut(&old.workload_type()) {
                    ids.remove(&id);
                }
                self.by_type.entry(kind).or_default().insert(id);
            }
            None => {
                self.by_type.entry(kind).or_default().insert(id);
            }
        }
        old
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Workload>> {
        let old = self.objects.remove(id)?;
        if let Some(ids) = self.by_type.get_mut(&old.workload_type()) {
            ids.remove(id);
        }
        Some(old)
    }
}

/// Read-only, cheap-to-clone view of the informer's cache.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    /// A std lock: readers copy out `Arc`s and never hold it across awaits.
    state: Arc<RwLock<CacheState>>,
}

impl Cache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CacheState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Workload>> {
        self.read().objects.get(id).cloned()
    }

    /// Every cached object, ordered by id.
    pub fn list(&self) -> Vec<Arc<Workload>> {
        let state = self.read();
        let mut all: Vec<_> = state.objects.values().cloned().collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        all
    }

    /// The cached objects of one type, ordered by id.
    pub fn list_type(&self, kind: WorkloadType) -> Vec<Arc<Workload>> {
        let state = self.read();
        state
            .by_type
            .get(&kind)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| state.objects.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ids of one type, ordered.
    pub fn ids_of_type(&self, kind: WorkloadType) -> Vec<String> {
        self.read()
            .by_type
            .get(&kind)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every object with the version the cache is consistent at.
    pub fn snapshot(&self) -> (Vec<Arc<Workload>>, u64) {
        let state = self.read();
        let mut all: Vec<_> = state.objects.values().cloned().collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        (all, state.resource_version)
    }

    /// The last resource version applied to the cache.
    pub fn resource_version(&self) -> u64 {
        self.read().resource_version
    }

    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the informer is in its list-then-watch cycle.
enum State {
    /// Nothing listed yet, or the watch expired: list everything.
    /// `attempt` counts the lists that failed in a row.
    Listing { attempt: u32 },
    /// Following the log after `after`.
    Watching {
        after: u64,
        stream: BoxStream<'static, Result<Change, SourceError>>,
    },
    /// The source failed; try again after a pause.
    Retrying { attempt: u32, relist: bool },
}

/// Lists and watches a [`WorkloadSource`] into a shared [`Cache`].
#[derive(Clone)]
pub struct Informer {
    source: Arc<dyn WorkloadSource>,
    cache: Cache,
    notifications: broadcast::Sender<Arc<Notification>>,
    /// Turns true after the first complete list; controllers wait on it.
    synced: watch::Sender<bool>,
    /// The resource version the cache has reached, for readers that must
    /// see a write they know was acknowledged.
    version: watch::Sender<u64>,
}

impl Informer {
    pub fn new(source: Arc<dyn WorkloadSource>) -> Self {
        let (notifications, _) = broadcast::channel(NOTIFICATION_BUFFER);
        let (synced, _) = watch::channel(false);
        let (version, _) = watch::channel(0);
        Informer {
            source,
            cache: Cache::default(),
            notifications,
            synced,
            version,
        }
    }

    /// The shared cache.
    pub fn cache(&self) -> Cache {
        self.cache.clone()
    }

    /// Changes applied to the cache from now on. A receiver that lags gets
    /// `RecvError::Lagged` and should resync from the cache.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notification>> {
        self.notifications.subscribe()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the cache holds a complete list.
    pub async fn wait_until_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = synced.wait_for(|s| *s).await;
    }

    /// The resource version the cache has reached, now and as it moves:
    /// how far the log has gone, for a reader that must know how far
    /// behind it is.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Resolves once the cache holds every change up to `resource_version`.
    pub async fn wait_for_version(&self, resource_version: u64) {
        let mut version = self.version.subscribe();
        let _ = version.wait_for(|v| *v >= resource_version).await;
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut state = State::Listing { attempt: 0 };
        loop {
            state = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = self.step(state) => next,
            };
        }
    }

    async fn step(&self, state: State) -> State {
        match state {
            State::Listing { attempt } => match self.source.list().await {
                Ok(listing) => {
                    let after = listing.resource_version;
                    self.replace(listing.objects, after);
                    self.synced.send_replace(true);
                    tracing::debug!(resource_version = after, "informer listed");
                    State::Watching {
                        after,
                        stream: self.source.watch(after),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "informer list failed");
                    State::Retrying {
                        attempt,
                        relist: true,
                    }
                }
            },
            State::Watching { after, mut stream } => match stream.next().await {
                Some(Ok(change)) => {
                    let after = after.max(self.apply(change));
                    State::Watching { after, stream }
                }
                Some(Err(SourceError::Expired { .. })) => {
                    tracing::info!(resource_version = after, "watch expired; listing again");
                    State::Listing { attempt: 0 }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "informer watch failed");
                    State::Retrying {
                        attempt: 0,
                        relist: false,
                    }
                }
                None => State::Watching {
                    after,
                    stream: self.source.watch(after),
                },
            },
            State::Retrying { attempt, relist } => {
                tokio::time::sleep(Backoff::ERRORS.delay(attempt).min(Duration::from_secs(30)))
                    .await;
                if relist {
                    State::Listing {
                        attempt: attempt + 1,
                    }
                } else {
                    let after = self.cache.resource_version();
                    State::Watching {
                        after,
                        stream: self.source.watch(after),
                    }
                }
            }
        }
    }

    /// Applies one logged change; returns the version the cache is now at.
    fn apply(&self, change: Change) -> u64 {
        let notification = {
            let mut state = self.cache.write();
            if change.resource_version <= state.resource_version {
                return state.resource_version;
            }
            state.resource_version = change.resource_version;
            let old = match change.kind {
                ChangeKind::Deleted => state.remove(change.object.id()),
                ChangeKind::Added | ChangeKind::Modified => state.insert(change.object.clone()),
            };
            Notification {
                kind: change.kind,
                resource_version: change.resource_version,
                old,
                new: change.object,
            }
        };
        self.version.send_replace(change.resource_version);
        let _ = self.notifications.send(Arc::new(notification));
        change.resource_version
    }

    /// Replaces the cache with a fresh list and notifies what differs.
    fn replace(&self, objects: Vec<Arc<Workload>>, resource_version: u64) {
        let mut notifications = Vec::new();
        {
            let mut state = self.cache.write();
            let mut fresh: HashMap<String, Arc<Workload>> = objects
                .into_iter()
                .map(|o| (o.id().to_string(), o))
                .collect();
            let gone: Vec<String> = state
                .objects
                .keys()
                .filter(|id| !fresh.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(old) = state.remove(&id) {
                    notifications.push(Notification {
                        kind: ChangeKind::Deleted,
                        resource_version,
                        old: Some(old.clone()),
                        new: old,
                    });
                }
            }
            for (_, object) in fresh.drain() {
                let unchanged = state
                    .objects
                    .get(object.id())
                    .is_some_and(|o| o.resource_version() == object.resource_version());
                if unchanged {
                    continue;
                }
                let old = state.insert(object.clone());
                notifications.push(Notification {
                    kind: if old.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    },
                    resource_version,
                    old,
                    new: object,
                });
            }
            state.resource_version = resource_version;
        }
        self.version.send_replace(resource_version);
        for n in notifications {
            let _ = self.notifications.send(Arc::new(n));
        }
    }
}
