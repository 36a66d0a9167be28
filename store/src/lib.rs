//! The durable event log: every workload write, in order, on fjall.
//!
//! Keyspaces (schema 3):
//! - `objects_sealed`: id → current [`Workload`], sealed;
//! - `changelog_sealed`: resource version (big-endian u64) → the change-log
//!   record that watches replay, read back as a [`LogRecord`]: kind,
//!   version, action, time and caller in clear, the object sealed. It is
//!   insert-only and trimmed logically: entries at or below
//!   `compacted_through` are no longer served, and its oldest tables are
//!   dropped whole (FIFO compaction) once it passes
//!   [`StoreConfig::max_log_bytes`], so it never carries tombstones for
//!   compaction to merge;
//! - `events_sealed`: `<id> 0x00 <fold>` → [`Event`], sealed;
//! - `meta` (clear): schema version, last resource version,
//!   compacted-through, and the key check.
//!
//! Specs carry secrets, so every value but `meta`'s is sealed ([`seal`]:
//! XChaCha20-Poly1305) under the node key in [`StoreConfig::key_file`],
//! beside the state directory (0700), never inside it. The committer seals
//! each written object once, for both the objects keyspace and the log. A
//! missing or wrong key refuses the open and changes nothing; a plain store
//! (schemas 1 and 2) is sealed into a fresh database that replaces it whole,
//! and [`rotate_key`] re-seals everything under a new key the same way.
//!
//! Writes go through the committer (`committer.rs`) (one thread, group commit, fsync
//! before acknowledging); reads go straight to fjall and see every
//! acknowledged write. [`Store::watch`] replays the log, then follows live.

mod check;
mod committer;
mod error;
mod gate;
mod record;
mod rotate;
mod schema;
pub mod seal;
mod source;
mod watch;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fjall::{Database, Keyspace, Readable};
use persys_api::source::{Change, Listing};
use persys_api::v1::{Event, EventType, ObjectStatus, Workload, WorkloadType};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use check::{CheckReport, check};
pub use committer::{
    ApplyOutcome, ApplyRequest, Caller, DeleteOutcome, REASON_APPLIED, REASON_DELETE_REQUESTED,
};
use committer::{Committer, Op};
pub use error::StoreError;
use record::*;
pub use record::{ACTION_APPLY, ACTION_DELETE, ACTION_FINALIZE, ACTION_RECONCILE, LogRecord};
pub use rotate::{RotateReport, rotate_key};
#[doc(hidden)]
pub use rotate::{StopAfter, rotate_key_until};
use schema::{Keyspaces, open_error};
use seal::Sealer;

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
    /// The node key (see [`seal`]): beside the state directory, never
    /// inside it, so a copy of the directory alone is unreadable. Created
    /// (0600) with a new store; never over existing data.
    pub key_file: PathBuf,
    /// Seal values at rest. Always true in the agent: turning it off exists
    /// only so the store bench can measure what sealing costs. A store
    /// created with one setting refuses to open with the other.
    pub seal: bool,
    /// Free bytes kept on the state filesystem: below this, writes are
    /// refused (nothing written) until space is freed, so the storage
    /// engine never meets a full disk. Room for its own flushes and
    /// compactions: two memtables by default. 0 turns the check off.
    pub min_free_bytes: u64,
}

impl StoreConfig {
    /// The store in `path`, its key at `<path>.key`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        StoreConfig {
            key_file: seal::default_key_file(&path),
            seal: true,
            path,
            max_group: 1024,
            max_log_entries: 100_000,
            max_log_age: Duration::from_secs(24 * 3600),
            max_log_bytes: 256 * 1024 * 1024,
            memtable_bytes: 32 * 1024 * 1024,
            min_free_bytes: 64 * 1024 * 1024,
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
    /// Seals every value written to `objects`, `log` and `events`.
    sealer: Sealer,
    /// Committed changes, published after their sync, for live watches.
    changes: broadcast::Sender<Arc<Change>>,
    /// The same changes, per workload id, for the watches of one id: each
    /// is woken only by its own workload's changes, not by every write.
    /// An id has a channel while someone watches it.
    changes_by_id: std::sync::Mutex<HashMap<String, broadcast::Sender<Arc<Change>>>>,
    /// The last committed resource version.
    last_resource_version: AtomicU64,
    /// The log serves nothing at or below this version.
    compacted_through: AtomicU64,
    metrics: StoreMetrics,
    /// Whether writes may be made: the free-space reserve and the failed
    /// state (see `gate.rs`).
    gate: gate::WriteGate,
    path: PathBuf,
    /// Held for the life of the store: one process per state directory.
    _lock: File,
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

/// The same for a watch of one id: its workload's changes are few, and a
/// channel is allocated whole for every watched id.
const LIVE_BUFFER_ONE_ID: usize = 64;

impl Store {
    /// Opens (or creates) the store in `config.path`, recovering what the
    /// last run acknowledged.
    ///
    /// A damaged state directory is an error naming the file and the way
    /// out, never a panic: the storage engine's own panics on bytes it
    /// cannot read are caught here.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Store::open_unguarded(config)
        })) {
            // What fjall fails to read while the store loads is damage too.
            Ok(Err(StoreError::Io(error) | StoreError::Corrupt(error))) => {
                Err(schema::unreadable(&path, &error))
            }
            Ok(result) => result,
            Err(panic) => {
                let message = if let Some(text) = panic.downcast_ref::<&str>() {
                    (*text).to_string()
                } else if let Some(text) = panic.downcast_ref::<String>() {
                    text.clone()
                } else {
                    "no message".to_string()
                };
                Err(schema::damaged(
                    &path,
                    &path.join("db"),
                    format!("the storage engine failed reading it ({message})"),
                ))
            }
        }
    }

    fn open_unguarded(config: StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.clone();
        if cfg!(feature = "unsafe-no-fsync") {
            tracing::error!(
                "built with unsafe-no-fsync: acknowledged writes do not survive a power cut"
            );
        }
        schema::prepare_state_dir(&path)?;
        let ran_here = path.join(schema::LOCK_FILE).exists();
        let lock = schema::lock_state_dir(&path)?;
        let (
            db,
            meta,
            sealer,
            Keyspaces {
                objects,
                log,
                events,
            },
        ) = schema::prepare(&config, ran_here)?;
        schema::sync_state_tree(&path)?;
        let read_meta = |key: &[u8]| schema::read_meta_u64(&meta, key);
        let compacted_through = read_meta(META_COMPACTED_THROUGH)?.unwrap_or(0);
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
        schema::check_rv_bound(&path, last_resource_version)?;

        let mut current = HashMap::new();
        for guard in objects.iter() {
            let (key, value) = guard.into_inner()?;
            let object = schema::open_object(&sealer, &key, &value)?;
            current.insert(object.id().to_string(), Arc::new(object));
        }
        let mut stored_events: HashMap<String, Vec<([u8; 8], Event)>> = HashMap::new();
        for guard in events.iter() {
            let (key, value) = guard.into_inner()?;
            let event = schema::open_event(&sealer, &key, &value)?;
            let fold: [u8; 8] = key[key.len().saturating_sub(8)..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("event key".into()))?;
            stored_events
                .entry(event.workload_id.clone())
                .or_default()
                .push((fold, event));
        }

        schema::write_rv_bound(&path, last_resource_version)?;
        let (changes, _) = broadcast::channel(LIVE_BUFFER);
        let inner = Arc::new(Inner {
            db,
            objects,
            log,
            events,
            meta,
            sealer,
            changes,
            changes_by_id: Default::default(),
            last_resource_version: AtomicU64::new(last_resource_version),
            compacted_through: AtomicU64::new(compacted_through),
            metrics: StoreMetrics::default(),
            gate: gate::WriteGate::new(path.clone(), config.min_free_bytes),
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
            .map_err(|e| open_error(&path, format!("starting the committer: {e}")))?;
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
            Some(bytes) => schema::open_object(&self.inner.sealer, id.as_bytes(), &bytes).map(Some),
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
            let (key, value) = guard.into_inner()?;
            let object = schema::open_object(&self.inner.sealer, &key, &value)?;
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
            let (key, value) = guard.into_inner()?;
            events.push(schema::open_event(&self.inner.sealer, &key, &value)?);
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
            let record = schema::open_record(&self.inner.sealer, &value)?;
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

    /// True when a write can be made: the committer is running, the state
    /// filesystem has its reserve free, and no write or sync has failed.
    pub fn is_writable(&self) -> bool {
        self.write_problem().is_none()
    }

    /// Why a write would be refused now, if it would.
    pub fn write_problem(&self) -> Option<StoreError> {
        if self.ops.is_closed() {
            return Some(StoreError::Closed);
        }
        self.inner.gate.problem()
    }

    /// The failure that stopped every write, if one did
    /// ([`StoreError::Failed`]).
    pub fn failure(&self) -> Option<StoreError> {
        self.inner.gate.failure()
    }

    /// Resolves when a write or sync fails and the store stops writing for
    /// good: the agent then exits, to be restarted and recover.
    pub fn failed(&self) -> impl Future<Output = StoreError> + Send + 'static {
        self.inner.gate.failed()
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
