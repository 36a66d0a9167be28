//! The durable event log: every workload write, in order, on fjall.
//!
//! Keyspaces:
//! - `objects`: id → current [`Workload`];
//! - `changelog`: resource version (big-endian u64) → [`LogRecord`], the
//!   ordered change log that watches replay. It is insert-only and trimmed
//!   logically: entries at or below `compacted_through` are no longer
//!   served, and its oldest tables are dropped whole (FIFO compaction) once
//!   it passes [`StoreConfig::max_log_bytes`], so it never carries
//!   tombstones for compaction to merge;
//! - `events`: `<id> 0x00 <fold>` → [`Event`];
//! - `meta`: schema version, last resource version, compacted-through.
//!
//! Writes go through the [`committer`] (one thread, group commit, fsync
//! before acknowledging); reads go straight to fjall and see every
//! acknowledged write. [`Store::watch`] replays the log, then follows live.

mod committer;
mod error;
mod record;
mod source;
mod watch;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fjall::compaction::Fifo;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable};
use persys_api::v1::{Event, EventType, ObjectStatus, Workload, WorkloadType};
use persys_controllers::{Change, Listing};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot};

pub use committer::{
    ApplyOutcome, ApplyRequest, Caller, DeleteOutcome, REASON_APPLIED, REASON_DELETE_REQUESTED,
};
use committer::{Committer, Op};
pub use error::StoreError;
use record::*;
pub use record::{ACTION_APPLY, ACTION_DELETE, ACTION_FINALIZE, ACTION_RECONCILE, LogRecord};

/// Events kept per workload; the least recently seen go first.
pub const MAX_EVENTS_PER_WORKLOAD: usize = 50;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The state directory; created if missing.
    pub path: PathBuf,
    /// Writes committed by one sync at most. 1 disables group commit.
    pub max_group: usize,
    /// The log keeps about this many entries…
    pub max_log_entries: u64,
    /// …and nothing older than this (the newest entry always stays).
    pub max_log_age: Duration,
    /// On disk the log takes about this much at most: its oldest tables are
    /// dropped whole past it, even if they hold entries within the bounds
    /// above. At least two memtables, so the newest table always stays.
    /// Fixed when the store is created.
    pub max_log_bytes: u64,
    /// Each keyspace's memtable is flushed to a table at this size (fjall's
    /// default is 64 MiB). A node's objects are small; under a storm of
    /// updates, bigger memtables only hold superseded versions in memory.
    /// Fixed when the store is created.
    pub memtable_bytes: u64,
}

impl StoreConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            max_group: 1024,
            max_log_entries: 100_000,
            max_log_age: Duration::from_secs(24 * 3600),
            max_log_bytes: 256 * 1024 * 1024,
            memtable_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What the store measures about itself (exported as metrics).
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Batches committed (each one sync).
    pub commits: Counter,
    /// Changes written (each one resource version).
    pub changes: Counter,
    pub compactions: Counter,
    /// Time to commit and sync one group.
    pub commit_seconds: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            commits: Counter::default(),
            changes: Counter::default(),
            compactions: Counter::default(),
            // 50 µs … ~100 ms
            commit_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 12)),
        }
    }
}

impl StoreMetrics {
    fn observe_commit(&self, took: Duration, changes: usize) {
        self.commits.inc();
        self.changes.inc_by(changes as u64);
        self.commit_seconds.observe(took.as_secs_f64());
    }
}

/// What the committer and every reader share.
pub(crate) struct Inner {
    db: Database,
    objects: Keyspace,
    log: Keyspace,
    events: Keyspace,
    meta: Keyspace,
    /// Committed changes, published after their sync, for live watches.
    changes: broadcast::Sender<Arc<Change>>,
    /// The last committed resource version.
    last_resource_version: AtomicU64,
    /// The log serves nothing at or below this version.
    compacted_through: AtomicU64,
    metrics: StoreMetrics,
    path: PathBuf,
    /// Held for the life of the store: one process per state directory.
    _lock: File,
}

/// Schema 1 kept the log in a leveled keyspace and trimmed it with deletes,
/// whose tombstones compaction then had to merge away. Schema 2 keeps it in
/// [`LOG_KEYSPACE`] and trims it logically. Copies the entries schema 1
/// retained and records schema 2 in one atomic batch, then drops the old
/// keyspace.
fn migrate_schema_1_log(
    db: &Database,
    meta: &Keyspace,
    log: &Keyspace,
    compacted_through: u64,
) -> Result<(), StoreError> {
    let old = db.keyspace(SCHEMA_1_LOG_KEYSPACE, KeyspaceCreateOptions::default)?;
    let mut batch = db.batch();
    let mut copied = 0u64;
    for guard in old.range(log_key(compacted_through + 1)..) {
        let (key, value) = guard.into_inner()?;
        batch.insert(log, key, value);
        copied += 1;
    }
    batch.insert(meta, META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes());
    batch.commit()?;
    db.persist(fjall::PersistMode::SyncAll)?;
    db.delete_keyspace(old)?;
    tracing::info!(copied, "store migrated from schema 1 to {SCHEMA_VERSION}");
    Ok(())
}

/// Drops the schema 1 log if a migration stopped after its commit.
fn drop_schema_1_log(db: &Database) -> Result<(), StoreError> {
    if db.keyspace_exists(SCHEMA_1_LOG_KEYSPACE) {
        let old = db.keyspace(SCHEMA_1_LOG_KEYSPACE, KeyspaceCreateOptions::default)?;
        db.delete_keyspace(old)?;
    }
    Ok(())
}

/// A handle to the store; cheap to clone. The committer stops when the last
/// handle is dropped or [`Store::close`] is called.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Writes to the committer. Bounded, so a flood of writers waits rather
    /// than growing memory without limit.
    ops: mpsc::Sender<Op>,
    committer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Live changes buffered per watcher before it must catch up from the log.
const LIVE_BUFFER: usize = 8192;

/// Block cache for reads that miss the in-memory views (log replay,
/// ListActions, events).
const BLOCK_CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Store {
    /// Opens (or creates) the store in `config.path`, recovering what the
    /// last run acknowledged.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.clone();
        let open_error = |message: String| StoreError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(&path).map_err(|e| open_error(e.to_string()))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("persys.lock"))
            .map_err(|e| open_error(e.to_string()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: path.clone() });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(open_error(e.to_string())),
        }
        let db = Database::builder(path.join("db"))
            .cache_size(BLOCK_CACHE_BYTES)
            .open()
            .map_err(|e| open_error(e.to_string()))?;
        let memtable_bytes = config.memtable_bytes.max(64 * 1024);
        let keyspace = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
            })
            .map_err(|e| open_error(e.to_string()))
        };
        let objects = keyspace("objects")?;
        let events = keyspace("events")?;
        let meta = keyspace("meta")?;
        // The log is insert-only with increasing keys, and trimmed logically
        // (see `compacted_through`): its tables never need merging, and the
        // oldest are dropped whole once it passes its size bound.
        // The newest table always stays (the bound is at least two
        // memtables): a replay from a dropped version then meets a later
        // entry and sees the gap, and the journal never replays dropped
        // entries behind newer ones at the next open.
        let max_log_bytes = config.max_log_bytes.max(2 * memtable_bytes);
        let log = db
            .keyspace(LOG_KEYSPACE, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable_bytes)
                    .compaction_strategy(Arc::new(Fifo::new(max_log_bytes, None)))
            })
            .map_err(|e| open_error(e.to_string()))?;

        let read_meta = |key: &[u8]| -> Result<Option<u64>, StoreError> {
            match meta.get(key)? {
                Some(v) => decode_u64(&v)
                    .map(Some)
                    .ok_or_else(|| StoreError::Corrupt(format!("meta key {:?}", key))),
                None => Ok(None),
            }
        };
        let compacted_through = read_meta(META_COMPACTED_THROUGH)?.unwrap_or(0);
        match read_meta(META_SCHEMA_VERSION)? {
            Some(SCHEMA_VERSION) => drop_schema_1_log(&db)?,
            Some(1) => migrate_schema_1_log(&db, &meta, &log, compacted_through)?,
            Some(other) => {
                return Err(open_error(format!(
                    "schema version {other} is not supported (this agent reads {SCHEMA_VERSION})"
                )));
            }
            None => meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes())?,
        }
        // The log's last key and the meta record are written in one batch;
        // take the larger to be safe against either being absent.
        let log_last = match log.last_key_value() {
            Some(guard) => decode_u64(&guard.key()?).unwrap_or(0),
            None => 0,
        };
        let last_resource_version = read_meta(META_LAST_RESOURCE_VERSION)?
            .unwrap_or(0)
            .max(log_last)
            .max(compacted_through);

        let mut current = HashMap::new();
        for guard in objects.iter() {
            let (key, value) = guard.into_inner()?;
            let object = Workload::decode(&*value)
                .map_err(|e| StoreError::Corrupt(format!("object {:?}: {e}", key)))?;
            current.insert(object.id().to_string(), Arc::new(object));
        }
        let mut stored_events: HashMap<String, Vec<([u8; 8], Event)>> = HashMap::new();
        for guard in events.iter() {
            let (key, value) = guard.into_inner()?;
            let event =
                Event::decode(&*value).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?;
            let fold: [u8; 8] = key[key.len().saturating_sub(8)..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("event key".into()))?;
            stored_events
                .entry(event.workload_id.clone())
                .or_default()
                .push((fold, event));
        }

        let (changes, _) = broadcast::channel(LIVE_BUFFER);
        let inner = Arc::new(Inner {
            db,
            objects,
            log,
            events,
            meta,
            changes,
            last_resource_version: AtomicU64::new(last_resource_version),
            compacted_through: AtomicU64::new(compacted_through),
            metrics: StoreMetrics::default(),
            path: path.clone(),
            _lock: lock,
        });
        let committer = Committer {
            inner: inner.clone(),
            objects: current,
            events: stored_events,
            last_resource_version,
            compacted_through,
            max_group: config.max_group.max(1),
            max_log_entries: config.max_log_entries.max(1),
            max_log_age_ms: config.max_log_age.as_millis() as i64,
            last_age_check_ms: 0,
        };
        let (ops, rx) = mpsc::channel(4096);
        let handle = std::thread::Builder::new()
            .name("persys-store-committer".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| open_error(format!("starting the committer: {e}")))?;
        tracing::info!(
            path = %path.display(),
            resource_version = last_resource_version,
            "store opened"
        );
        Ok(Store {
            inner,
            ops,
            committer: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(op(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Creates or updates a workload's desired state; durable when it returns.
    /// A request without a revision gets one derived from its spec, here on
    /// the caller's task rather than on the one committer thread.
    pub async fn apply(&self, mut request: ApplyRequest) -> Result<ApplyOutcome, StoreError> {
        if request.revision_id.is_empty() {
            request.revision_id = persys_api::derived_revision(&request.spec);
        }
        self.submit(|tx| Op::Apply(Box::new(request), tx)).await
    }

    /// Requests deletion: the object stays until its finalizers are removed.
    pub async fn delete(&self, id: &str) -> Result<DeleteOutcome, StoreError> {
        self.delete_as(id, Caller::default()).await
    }

    /// [`Store::delete`] on behalf of `caller`, recorded in the log record
    /// and, while the object stays for its finalizers, as a
    /// `DeleteRequested` event.
    pub async fn delete_as(&self, id: &str, caller: Caller) -> Result<DeleteOutcome, StoreError> {
        self.submit(|tx| Op::Delete(id.to_string(), caller, tx))
            .await
    }

    /// Replaces the status if the object is still at `expected_resource_version`.
    pub async fn update_status(
        &self,
        id: &str,
        expected_resource_version: u64,
        status: ObjectStatus,
    ) -> Result<Arc<Workload>, StoreError> {
        self.submit(|reply| Op::UpdateStatus {
            id: id.to_string(),
            expected_resource_version,
            status,
            reply,
        })
        .await
    }

    pub async fn remove_finalizer(&self, id: &str, finalizer: &str) -> Result<(), StoreError> {
        self.submit(|reply| Op::RemoveFinalizer {
            id: id.to_string(),
            finalizer: finalizer.to_string(),
            reply,
        })
        .await
    }

    pub async fn record_event(
        &self,
        id: &str,
        kind: EventType,
        reason: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.submit(|reply| Op::RecordEvent {
            id: id.to_string(),
            kind,
            reason: reason.to_string(),
            message: message.to_string(),
            reply,
        })
        .await
    }

    /// The current object, as of the last acknowledged write.
    pub fn get(&self, id: &str) -> Result<Option<Workload>, StoreError> {
        match self.inner.objects.get(id.as_bytes())? {
            Some(bytes) => Workload::decode(&*bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("object {id}: {e}"))),
            None => Ok(None),
        }
    }

    /// Every object, optionally of one type, ordered by id.
    pub fn list(&self, kind: Option<WorkloadType>) -> Result<Vec<Workload>, StoreError> {
        Ok(self
            .snapshot()?
            .objects
            .into_iter()
            .filter(|w| kind.is_none_or(|k| w.workload_type() == k))
            .map(Arc::unwrap_or_clone)
            .collect())
    }

    /// Every object and the resource version they are consistent at.
    pub fn snapshot(&self) -> Result<Listing, StoreError> {
        let snapshot = self.inner.db.snapshot();
        let resource_version = match snapshot.get(&self.inner.meta, META_LAST_RESOURCE_VERSION)? {
            Some(v) => decode_u64(&v).unwrap_or(0),
            None => 0,
        };
        let mut objects = Vec::new();
        for guard in snapshot.iter(&self.inner.objects) {
            let (_, value) = guard.into_inner()?;
            let object = Workload::decode(&*value)
                .map_err(|e| StoreError::Corrupt(format!("object: {e}")))?;
            objects.push(Arc::new(object));
        }
        Ok(Listing {
            objects,
            resource_version,
        })
    }

    /// The events of a workload, most recent first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        let mut events = Vec::new();
        for guard in self.inner.events.prefix(event_prefix(id)) {
            let value = guard.value()?;
            events.push(
                Event::decode(&*value).map_err(|e| StoreError::Corrupt(format!("event: {e}")))?,
            );
        }
        events.sort_by_key(|e| std::cmp::Reverse(e.last_seen_ms));
        Ok(events)
    }

    /// Log records, newest first when `newest_first`, stopping after `limit`
    /// records that `keep` accepts.
    pub fn log_records(
        &self,
        newest_first: bool,
        limit: usize,
        mut keep: impl FnMut(&LogRecord) -> bool,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let mut records = Vec::new();
        let mut take = |guard: fjall::Guard| -> Result<bool, StoreError> {
            let value = guard.value()?;
            let record =
                LogRecord::decode(&*value).map_err(|e| StoreError::Corrupt(format!("log: {e}")))?;
            if keep(&record) {
                records.push(record);
            }
            Ok(records.len() < limit)
        };
        // Entries at or below `compacted_through` are trimmed: they may
        // still be on disk until their table is dropped, but are not served.
        let retained = self
            .inner
            .log
            .range(log_key(self.compacted_through() + 1)..);
        if newest_first {
            for guard in retained.rev() {
                if !take(guard)? {
                    break;
                }
            }
        } else {
            for guard in retained {
                if !take(guard)? {
                    break;
                }
            }
        }
        Ok(records)
    }

    /// The last committed resource version.
    pub fn resource_version(&self) -> u64 {
        self.inner.last_resource_version.load(Ordering::Acquire)
    }

    /// The log serves nothing at or below this version.
    pub fn compacted_through(&self) -> u64 {
        self.inner.compacted_through.load(Ordering::Acquire)
    }

    /// Bytes the store takes on disk.
    pub fn disk_space(&self) -> u64 {
        self.inner.db.disk_space().unwrap_or(0)
    }

    /// Entries the log holds.
    pub fn log_len(&self) -> u64 {
        self.resource_version() - self.compacted_through()
    }

    /// True when a write can be made: the committer is running.
    pub fn is_writable(&self) -> bool {
        !self.ops.is_closed()
    }

    /// Stops the committer after the writes already queued, syncs, and
    /// waits for it. Later writes through any handle get
    /// [`StoreError::Closed`]; the directory is released when the last handle
    /// is dropped.
    pub async fn close(&self) {
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = self.ops.send(Op::Close).await;
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}
