//! The single writer of the store, with group commit.
//!
//! Every write goes through one thread. It takes the first queued write, then
//! every write queued behind it (up to `max_group`), applies them in order to
//! an overlay of the current objects, and commits them as one atomic batch
//! with one fsync. Only after the sync are callers answered and changes
//! published to watchers — so an acknowledged write is durable, a watcher
//! never sees a write that could be lost, and one sync serves many writers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fjall::PersistMode;
use persys_api::now_ms;
use persys_api::source::{Change, ChangeKind};
use persys_api::v1::{
    DesiredState, Event, EventType, ObjectMeta, ObjectSpec, ObjectStatus, WatchEventType, Workload,
    WorkloadSpec, WorkloadType,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::error::StoreError;
use super::record::*;
use super::seal::Aad;
use super::{Inner, MAX_EVENTS_PER_WORKLOAD};

/// How a commit group is made durable before anyone is answered: fsync of
/// data and metadata. The `unsafe-no-fsync` feature (tests only) stops at the
/// OS buffers, which survives a killed process but not a power cut.
const GROUP_DURABILITY: PersistMode = if cfg!(feature = "unsafe-no-fsync") {
    PersistMode::Buffer
} else {
    PersistMode::SyncAll
};

/// Who asked for a write, for the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The authenticated identity, e.g. `CN=persys-scheduler`.
    pub identity: String,
    /// The role policy gave it, e.g. `scheduler`.
    pub role: String,
}

/// Reason of the event an attributed apply records.
pub const REASON_APPLIED: &str = "Applied";
/// Reason of the event an attributed delete request records.
pub const REASON_DELETE_REQUESTED: &str = "DeleteRequested";

/// A request to create or update a workload's desired state.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    pub id: String,
    pub workload_type: WorkloadType,
    /// Empty: derived from the spec.
    pub revision_id: String,
    pub desired_state: DesiredState,
    pub spec: WorkloadSpec,
    /// Finalizers a new object starts with (its controller's).
    pub finalizers: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Who asked: recorded in the log record and, when known, as an event.
    pub caller: Caller,
}

#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Created(Arc<Workload>),
    Updated(Arc<Workload>),
    /// Same revision, spec and desired state: nothing was written.
    Unchanged(Arc<Workload>),
}

impl ApplyOutcome {
    pub fn workload(&self) -> &Arc<Workload> {
        match self {
            ApplyOutcome::Created(w) | ApplyOutcome::Updated(w) | ApplyOutcome::Unchanged(w) => w,
        }
    }

    pub fn is_unchanged(&self) -> bool {
        matches!(self, ApplyOutcome::Unchanged(_))
    }
}

#[derive(Debug, Clone)]
pub enum DeleteOutcome {
    /// No such workload: nothing to do.
    NotFound,
    /// Marked for deletion; its controller is tearing it down.
    Deleting(Arc<Workload>),
    /// Gone from the store.
    Deleted(Arc<Workload>),
}

pub(super) enum Op {
    /// Finish the writes queued before this, sync, and stop.
    Close,
    /// Boxed: the request is most of the op's size.
    Apply(
        Box<ApplyRequest>,
        oneshot::Sender<Result<ApplyOutcome, StoreError>>,
    ),
    Delete(
        String,
        Caller,
        oneshot::Sender<Result<DeleteOutcome, StoreError>>,
    ),
    UpdateStatus {
        id: String,
        expected_resource_version: u64,
        status: ObjectStatus,
        reply: oneshot::Sender<Result<Arc<Workload>, StoreError>>,
    },
    RemoveFinalizer {
        id: String,
        finalizer: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    RecordEvent {
        id: String,
        kind: EventType,
        reason: String,
        message: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// A reply waiting for the group's sync.
enum Reply {
    Apply(
        oneshot::Sender<Result<ApplyOutcome, StoreError>>,
        Result<ApplyOutcome, StoreError>,
    ),
    Delete(
        oneshot::Sender<Result<DeleteOutcome, StoreError>>,
        Result<DeleteOutcome, StoreError>,
    ),
    Status(
        oneshot::Sender<Result<Arc<Workload>, StoreError>>,
        Result<Arc<Workload>, StoreError>,
    ),
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Reply {
    fn send(self) {
        match self {
            Reply::Apply(tx, r) => drop(tx.send(r)),
            Reply::Delete(tx, r) => drop(tx.send(r)),
            Reply::Status(tx, r) => drop(tx.send(r)),
            Reply::Unit(tx, r) => drop(tx.send(r)),
        }
    }

    /// The group's commit failed: every write in it fails.
    fn fail(self, error: &StoreError) {
        match self {
            Reply::Apply(tx, r) => drop(tx.send(r.and(Err(error.clone())))),
            Reply::Delete(tx, r) => drop(tx.send(r.and(Err(error.clone())))),
            Reply::Status(tx, r) => drop(tx.send(r.and(Err(error.clone())))),
            Reply::Unit(tx, r) => drop(tx.send(r.and(Err(error.clone())))),
        }
    }
}

/// The committer's own view of current state. Only this thread writes, so it
/// is the authority; readers go to fjall.
pub(super) struct Committer {
    pub inner: Arc<Inner>,
    pub objects: HashMap<String, Arc<Workload>>,
    pub events: HashMap<String, Vec<([u8; 8], Event)>>,
    pub last_resource_version: u64,
    pub compacted_through: u64,
    pub max_group: usize,
    pub max_log_entries: u64,
    pub max_log_age_ms: i64,
    pub last_age_check_ms: i64,
}

/// Pending changes of one group, applied on top of the committed state.
#[derive(Default)]
struct Group {
    /// `None`: removed in this group.
    objects: HashMap<String, Option<Arc<Workload>>>,
    events: HashMap<String, Vec<([u8; 8], Event)>>,
    changes: Vec<Arc<Change>>,
    replies: Vec<Reply>,
    next_resource_version: u64,
    dirty: bool,
}

impl Committer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut closing = false;
        while let Some(first) = rx.blocking_recv() {
            if matches!(first, Op::Close) {
                break;
            }
            let mut batch = self.inner.db.batch().durability(Some(GROUP_DURABILITY));
            let mut group = Group {
                next_resource_version: self.last_resource_version,
                ..Group::default()
            };
            self.process(first, &mut group, &mut batch);
            let mut taken = 1;
            while taken < self.max_group {
                match rx.try_recv() {
                    Ok(Op::Close) => {
                        closing = true;
                        break;
                    }
                    Ok(op) => {
                        self.process(op, &mut group, &mut batch);
                        taken += 1;
                    }
                    Err(_) => break,
                }
            }
            self.finish(group, batch);
            if closing {
                break;
            }
        }
        rx.close();
        if let Some(error) = self.inner.gate.failure() {
            // fjall refuses every write now; the next start recovers.
            tracing::error!(%error, "store closed after a failed write: not synced");
            return;
        }
        if let Err(error) = self.inner.db.persist(PersistMode::SyncAll) {
            tracing::error!(%error, "final store sync failed");
        }
        // Flush memtables to tables, so the next open does not replay the
        // journal (a crash still recovers from it).
        for keyspace in [
            &self.inner.objects,
            &self.inner.log,
            &self.inner.events,
            &self.inner.meta,
        ] {
            if let Err(error) = keyspace.rotate_memtable_and_wait() {
                tracing::warn!(%error, "flushing the store on close failed");
            }
        }
        if let Err(error) =
            super::schema::write_rv_bound(&self.inner.path, self.last_resource_version)
        {
            tracing::warn!(%error, "recording the resource version on close failed");
        }
    }

    fn finish(&mut self, group: Group, mut batch: fjall::OwnedWriteBatch) {
        // After a failed write or sync, nothing is answered OK: not even a
        // write with nothing to do, which would vouch for state that the
        // failed sync may have taken with it.
        if let Some(error) = self.inner.gate.failure() {
            group.replies.into_iter().for_each(|r| r.fail(&error));
            return;
        }
        if !group.dirty {
            group.replies.into_iter().for_each(Reply::send);
            return;
        }
        // A full disk is met here, before fjall writes anything: fjall
        // poisons itself for good after a failed journal write.
        if let Err(error) = self.inner.gate.check_space() {
            group.replies.into_iter().for_each(|r| r.fail(&error));
            return;
        }
        let rv = group.next_resource_version;
        batch.insert(
            &self.inner.meta,
            META_LAST_RESOURCE_VERSION,
            &rv.to_be_bytes()[..],
        );
        let compact_to = self.compaction_target(rv);
        if let Some(to) = compact_to {
            // Trimming is logical: the entries stay in their tables (no
            // tombstones for compaction to merge away) until the log's size
            // bound drops those tables whole.
            batch.insert(
                &self.inner.meta,
                META_COMPACTED_THROUGH,
                &to.to_be_bytes()[..],
            );
        }
        let started = std::time::Instant::now();
        match batch.commit() {
            Ok(()) => {
                self.inner
                    .metrics
                    .observe_commit(started.elapsed(), group.changes.len());
                for (id, object) in group.objects {
                    match object {
                        Some(o) => self.objects.insert(id, o),
                        None => self.objects.remove(&id),
                    };
                }
                for (id, events) in group.events {
                    if events.is_empty() {
                        self.events.remove(&id);
                    } else {
                        self.events.insert(id, events);
                    }
                }
                self.last_resource_version = rv;
                if let Some(to) = compact_to {
                    self.compacted_through = to;
                    self.inner.compacted_through.store(to, Ordering::Release);
                    self.inner.metrics.compactions.inc();
                }
                self.inner
                    .last_resource_version
                    .store(rv, Ordering::Release);
                group.replies.into_iter().for_each(Reply::send);
                let by_id = self
                    .inner
                    .changes_by_id
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for change in group.changes {
                    if let Some(watchers) = by_id.get(change.object.id()) {
                        let _ = watchers.send(change.clone());
                    }
                    let _ = self.inner.changes.send(change);
                }
            }
            Err(error) => {
                let error = StoreError::Failed(format!(
                    "writing the journal in {} failed: {}",
                    self.inner.path.display(),
                    describe_fjall_error(&error)
                ));
                tracing::error!(%error, "store commit failed; the group's writes are refused, and every later one");
                self.inner.gate.fail(&error);
                group.replies.into_iter().for_each(|r| r.fail(&error));
            }
        }
    }

    /// Where to compact the log to, if it is over its count or age bound.
    fn compaction_target(&mut self, last: u64) -> Option<u64> {
        let retained = last.saturating_sub(self.compacted_through);
        let mut target = self.compacted_through;
        // Each group trims what it took the log over its bound, so the
        // trimming is spread evenly: trimming in steps of a tenth made one
        // group in 10,000 carry 10,000 deletes, and every writer queued
        // behind that group waited for it.
        if retained > self.max_log_entries {
            target = last - self.max_log_entries;
        }
        let now = now_ms();
        if now - self.last_age_check_ms >= 1000 {
            self.last_age_check_ms = now;
            target = self.age_target(target, last, now - self.max_log_age_ms);
        }
        (target > self.compacted_through).then_some(target)
    }

    /// How far the log can be trimmed by age from `from`: through the last
    /// entry written before `cutoff`, and past any entries the log's size
    /// bound has already dropped. The newest entry always stays, so the log
    /// always says where it ends. `last` is the group being written; only
    /// what is already committed is looked at.
    fn age_target(&self, from: u64, last: u64, cutoff: i64) -> u64 {
        let limit = last.saturating_sub(1).min(self.last_resource_version);
        if from >= limit {
            return from;
        }
        const MAX_SCAN: usize = 100_000;
        let mut target = from;
        let mut scanned = 0;
        for guard in self
            .inner
            .log
            .range(log_key(from + 1)..=log_key(limit))
            .take(MAX_SCAN)
        {
            scanned += 1;
            let Ok((key, value)) = guard.into_inner() else {
                return target;
            };
            let Some(version) = decode_u64(&key) else {
                return target;
            };
            match SealedLogRecord::decode(&*value) {
                Ok(record) if record.at_ms < cutoff => target = version,
                // Entries between the last one seen and this are gone.
                _ => return target.max(version - 1),
            }
        }
        if scanned < MAX_SCAN {
            // Nothing younger before the newest entry, and whatever the scan
            // did not find is gone.
            limit
        } else {
            target
        }
    }

    fn current(&self, group: &Group, id: &str) -> Option<Arc<Workload>> {
        match group.objects.get(id) {
            Some(pending) => pending.clone(),
            None => self.objects.get(id).cloned(),
        }
    }

    fn process(&mut self, op: Op, group: &mut Group, batch: &mut fjall::OwnedWriteBatch) {
        let reply = match op {
            Op::Close => return,
            Op::Apply(request, tx) => Reply::Apply(tx, self.apply(*request, group, batch)),
            Op::Delete(id, caller, tx) => Reply::Delete(tx, self.delete(&id, caller, group, batch)),
            Op::UpdateStatus {
                id,
                expected_resource_version,
                status,
                reply,
            } => Reply::Status(
                reply,
                self.update_status(&id, expected_resource_version, status, group, batch),
            ),
            Op::RemoveFinalizer {
                id,
                finalizer,
                reply,
            } => Reply::Unit(reply, self.remove_finalizer(&id, &finalizer, group, batch)),
            Op::RecordEvent {
                id,
                kind,
                reason,
                message,
                reply,
            } => Reply::Unit(
                reply,
                self.record_event(&id, kind, reason, message, group, batch),
            ),
        };
        group.replies.push(reply);
    }

    /// Writes `object` at the next resource version and logs the change.
    /// The object is encoded and sealed once: the same sealed bytes go to
    /// the objects keyspace and into the log record. Writes nothing if the
    /// seal fails.
    fn write(
        &self,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
        kind: ChangeKind,
        mut object: Workload,
        action: &str,
        caller: &Caller,
    ) -> Result<Arc<Workload>, StoreError> {
        let rv = group.next_resource_version + 1;
        let now = now_ms();
        let meta = object.metadata.get_or_insert_with(Default::default);
        meta.resource_version = rv;
        meta.updated_at_ms = now;
        let id = meta.id.clone();
        let sealed = self.inner.sealer.seal_with(
            Aad::Object(id.as_bytes()),
            object.encoded_len(),
            |out| object.encode_raw(out),
        )?;
        group.next_resource_version = rv;
        let object = Arc::new(object);
        let mut record = SealedLogRecord {
            kind: WatchEventType::from(kind) as i32,
            resource_version: rv,
            action: action.to_string(),
            at_ms: now,
            caller: caller.identity.clone(),
            role: caller.role.clone(),
            id,
            sealed_object: sealed,
        };
        match kind {
            ChangeKind::Deleted => {
                batch.insert(&self.inner.log, log_key(rv), record.encode_to_vec());
                let id = record.id;
                batch.remove(&self.inner.objects, id.as_bytes());
                for (fold, _) in self.events_of(group, &id) {
                    batch.remove(&self.inner.events, event_key(&id, &fold));
                }
                group.events.insert(id.clone(), Vec::new());
                group.objects.insert(id, None);
            }
            _ => {
                // The record is encoded first, then gives its sealed object
                // up to the objects keyspace: no copy of it.
                batch.insert(&self.inner.log, log_key(rv), record.encode_to_vec());
                let sealed = std::mem::take(&mut record.sealed_object);
                batch.insert(&self.inner.objects, record.id.as_bytes(), sealed);
                group.objects.insert(record.id, Some(object.clone()));
            }
        }
        group.changes.push(Arc::new(Change {
            kind,
            resource_version: rv,
            object: object.clone(),
        }));
        group.dirty = true;
        Ok(object)
    }

    fn apply(
        &mut self,
        request: ApplyRequest,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<ApplyOutcome, StoreError> {
        // Never empty: `Store::apply` derives it from the spec first.
        let revision = request.revision_id.clone();
        let caller = request.caller;
        let Some(current) = self.current(group, &request.id) else {
            let now = now_ms();
            let object = Workload {
                metadata: Some(ObjectMeta {
                    id: request.id.clone(),
                    uid: new_uid(),
                    r#type: request.workload_type as i32,
                    revision_id: revision,
                    generation: 1,
                    resource_version: 0,
                    created_at_ms: now,
                    updated_at_ms: now,
                    deletion_timestamp_ms: 0,
                    finalizers: request.finalizers,
                    labels: request.labels,
                }),
                spec: Some(ObjectSpec {
                    desired_state: request.desired_state as i32,
                    workload: Some(request.spec),
                }),
                status: Some(ObjectStatus {
                    actual_state: persys_api::v1::ActualState::Pending as i32,
                    last_transition_ms: now,
                    ..Default::default()
                }),
            };
            let written = self.write(
                group,
                batch,
                ChangeKind::Added,
                object,
                ACTION_APPLY,
                &caller,
            )?;
            self.audit(
                &written,
                &caller,
                REASON_APPLIED,
                "Applied by",
                group,
                batch,
            );
            return Ok(ApplyOutcome::Created(written));
        };
        if current.is_deleting() {
            return Err(StoreError::BeingDeleted { id: request.id });
        }
        if current.workload_type() != request.workload_type {
            return Err(StoreError::TypeMismatch {
                id: request.id,
                existing: current.workload_type().short_name().to_string(),
                requested: request.workload_type.short_name().to_string(),
            });
        }
        let current_spec = current.spec.as_ref().and_then(|s| s.workload.as_ref());
        let same_spec = current_spec == Some(&request.spec);
        if current.revision_id() == revision {
            if !same_spec {
                return Err(StoreError::RevisionConflict {
                    id: request.id,
                    revision,
                });
            }
            let same_labels = current
                .metadata
                .as_ref()
                .is_some_and(|m| m.labels == request.labels);
            if current.desired_state() == request.desired_state && same_labels {
                return Ok(ApplyOutcome::Unchanged(current));
            }
        }
        // Built from the parts that stay, not cloned whole: the old spec
        // would only be cloned to be dropped.
        let mut meta = current.metadata.clone().unwrap_or_default();
        let intent_changed = !same_spec
            || meta.revision_id != revision
            || current.desired_state() != request.desired_state;
        if intent_changed {
            meta.generation += 1;
        }
        meta.revision_id = revision;
        meta.labels = request.labels;
        let object = Workload {
            metadata: Some(meta),
            spec: Some(ObjectSpec {
                desired_state: request.desired_state as i32,
                workload: Some(request.spec),
            }),
            status: current.status.clone(),
        };
        let written = self.write(
            group,
            batch,
            ChangeKind::Modified,
            object,
            ACTION_APPLY,
            &caller,
        )?;
        self.audit(
            &written,
            &caller,
            REASON_APPLIED,
            "Applied by",
            group,
            batch,
        );
        Ok(ApplyOutcome::Updated(written))
    }

    fn delete(
        &mut self,
        id: &str,
        caller: Caller,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<DeleteOutcome, StoreError> {
        let Some(current) = self.current(group, id) else {
            return Ok(DeleteOutcome::NotFound);
        };
        if current.is_deleting() {
            return Ok(DeleteOutcome::Deleting(current));
        }
        let mut object = (*current).clone();
        let meta = object.metadata.get_or_insert_with(Default::default);
        meta.deletion_timestamp_ms = now_ms();
        if meta.finalizers.is_empty() {
            // Gone with its events at once: the log record names the caller.
            let written = self.write(
                group,
                batch,
                ChangeKind::Deleted,
                object,
                ACTION_DELETE,
                &caller,
            )?;
            return Ok(DeleteOutcome::Deleted(written));
        }
        let written = self.write(
            group,
            batch,
            ChangeKind::Modified,
            object,
            ACTION_DELETE,
            &caller,
        )?;
        self.audit(
            &written,
            &caller,
            REASON_DELETE_REQUESTED,
            "Deletion requested by",
            group,
            batch,
        );
        Ok(DeleteOutcome::Deleting(written))
    }

    fn update_status(
        &mut self,
        id: &str,
        expected: u64,
        status: ObjectStatus,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<Arc<Workload>, StoreError> {
        let current = self
            .current(group, id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if current.resource_version() != expected {
            return Err(StoreError::Conflict {
                id: id.to_string(),
                expected,
                actual: current.resource_version(),
            });
        }
        if current.status.as_ref() == Some(&status) {
            return Ok(current);
        }
        // Built from the parts that stay, not cloned whole: the old status
        // would only be cloned to be dropped.
        let object = Workload {
            metadata: current.metadata.clone(),
            spec: current.spec.clone(),
            status: Some(status),
        };
        self.write(
            group,
            batch,
            ChangeKind::Modified,
            object,
            ACTION_RECONCILE,
            &Caller::default(),
        )
    }

    fn remove_finalizer(
        &mut self,
        id: &str,
        finalizer: &str,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<(), StoreError> {
        let Some(current) = self.current(group, id) else {
            return Ok(());
        };
        if !current.has_finalizer(finalizer) {
            return Ok(());
        }
        let mut object = (*current).clone();
        let meta = object.metadata.get_or_insert_with(Default::default);
        meta.finalizers.retain(|f| f != finalizer);
        let kind = if meta.deletion_timestamp_ms != 0 && meta.finalizers.is_empty() {
            ChangeKind::Deleted
        } else {
            ChangeKind::Modified
        };
        self.write(
            group,
            batch,
            kind,
            object,
            ACTION_FINALIZE,
            &Caller::default(),
        )?;
        Ok(())
    }

    fn events_of(&self, group: &Group, id: &str) -> Vec<([u8; 8], Event)> {
        match group.events.get(id) {
            Some(events) => events.clone(),
            None => self.events.get(id).cloned().unwrap_or_default(),
        }
    }

    /// An event as stored: sealed, bound to its key. Event messages can
    /// carry runtime output.
    fn seal_event(&self, key: &[u8], event: &Event) -> Result<Vec<u8>, StoreError> {
        self.inner
            .sealer
            .seal_with(Aad::Event(key), event.encoded_len(), |out| {
                event.encode_raw(out)
            })
    }

    /// Records, in the same batch, who made a write to `object`: a Normal
    /// event `reason`, "<what> <identity> (role <role>)". Nothing for an
    /// anonymous caller.
    fn audit(
        &mut self,
        object: &Workload,
        caller: &Caller,
        reason: &str,
        what: &str,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) {
        if caller.identity.is_empty() {
            return;
        }
        let message = format!("{what} {} (role {})", caller.identity, caller.role);
        // The object was just written in this group, so it is found.
        let _ = self.record_event(
            object.id(),
            EventType::Normal,
            reason.to_string(),
            message,
            group,
            batch,
        );
    }

    fn record_event(
        &mut self,
        id: &str,
        kind: EventType,
        reason: String,
        message: String,
        group: &mut Group,
        batch: &mut fjall::OwnedWriteBatch,
    ) -> Result<(), StoreError> {
        if self.current(group, id).is_none() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let fold = fold_key(kind, &reason, &message);
        let now = now_ms();
        let mut events = self.events_of(group, id);
        match events.iter_mut().find(|(f, _)| *f == fold) {
            Some((_, event)) => {
                let mut counted = event.clone();
                counted.count = counted.count.saturating_add(1);
                counted.last_seen_ms = now;
                let key = event_key(id, &fold);
                let sealed = self.seal_event(&key, &counted)?;
                batch.insert(&self.inner.events, key, sealed);
                *event = counted;
            }
            None => {
                let event = Event {
                    workload_id: id.to_string(),
                    r#type: kind as i32,
                    reason,
                    message,
                    count: 1,
                    first_seen_ms: now,
                    last_seen_ms: now,
                };
                let key = event_key(id, &fold);
                let sealed = self.seal_event(&key, &event)?;
                batch.insert(&self.inner.events, key, sealed);
                events.push((fold, event));
                if events.len() > MAX_EVENTS_PER_WORKLOAD {
                    events.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_seen_ms));
                    for (old, _) in events.drain(MAX_EVENTS_PER_WORKLOAD..) {
                        batch.remove(&self.inner.events, event_key(id, &old));
                    }
                }
            }
        }
        group.events.insert(id.to_string(), events);
        group.dirty_events();
        Ok(())
    }
}

impl Group {
    /// Events change no object and take no resource version, but the batch
    /// still has to be committed.
    fn dirty_events(&mut self) {
        self.dirty = true;
    }
}

/// fjall's error, saying what poisoned means.
fn describe_fjall_error(error: &fjall::Error) -> String {
    match error {
        fjall::Error::Poisoned => {
            "the storage engine stopped after an earlier write, flush or compaction failed (see the log before this)".to_string()
        }
        other => other.to_string(),
    }
}

/// Repeats of the same type, reason and message share this key.
fn fold_key(kind: EventType, reason: &str, message: &str) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update([kind as u8]);
    hasher.update(reason.as_bytes());
    hasher.update([0]);
    hasher.update(message.as_bytes());
    let digest = hasher.finalize();
    let mut fold = [0u8; 8];
    fold.copy_from_slice(&digest[..8]);
    fold
}

/// A random version-4 UUID.
fn new_uid() -> String {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}
