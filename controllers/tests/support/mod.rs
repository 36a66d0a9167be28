#![allow(dead_code)] // each test binary uses part of the support module
//! An in-memory change log implementing the store traits, so the controller
//! runtime can be tested deterministically under paused time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use persys_api::v1::{
    DesiredState, EventType, ObjectMeta, ObjectSpec, ObjectStatus, Workload, WorkloadType,
};
use persys_controllers::{
    Change, ChangeKind, Listing, SourceError, WorkloadSource, WorkloadWriter, WriteError,
};
use tokio::sync::broadcast;

#[derive(Default)]
struct State {
    log: Vec<Change>,
    objects: BTreeMap<String, Arc<Workload>>,
    events: Vec<(String, String)>,
}

pub struct MemoryLog {
    state: Mutex<State>,
    live: broadcast::Sender<Change>,
    /// Live changes up to this resource version reach watchers; later ones
    /// wait (see [`MemoryLog::hold`]).
    delivered_through: Arc<tokio::sync::watch::Sender<u64>>,
}

impl MemoryLog {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryLog {
            state: Mutex::new(State::default()),
            live: broadcast::channel(1024).0,
            delivered_through: Arc::new(tokio::sync::watch::channel(u64::MAX).0),
        })
    }

    /// Holds back every later write from watchers (a lagging informer)
    /// until [`MemoryLog::release`].
    pub fn hold(&self) {
        let through = self.state.lock().unwrap().log.len() as u64;
        self.delivered_through.send_replace(through);
    }

    pub fn release(&self) {
        self.delivered_through.send_replace(u64::MAX);
    }

    fn write(&self, state: &mut State, kind: ChangeKind, mut object: Workload) -> Arc<Workload> {
        let rv = state.log.len() as u64 + 1;
        object.metadata.as_mut().unwrap().resource_version = rv;
        let object = Arc::new(object);
        let change = Change {
            kind,
            resource_version: rv,
            object: object.clone(),
        };
        match kind {
            ChangeKind::Deleted => state.objects.remove(object.id()),
            _ => state
                .objects
                .insert(object.id().to_string(), object.clone()),
        };
        state.log.push(change.clone());
        let _ = self.live.send(change);
        object
    }

    /// Creates or changes a workload's spec (bumping its generation).
    pub fn apply(&self, id: &str, kind: WorkloadType, image: &str) -> Arc<Workload> {
        let mut state = self.state.lock().unwrap();
        let existing = state.objects.get(id).cloned();
        let object = match existing {
            Some(current) => {
                let mut object = (*current).clone();
                let meta = object.metadata.as_mut().unwrap();
                meta.generation += 1;
                meta.revision_id = image.to_string();
                object
            }
            None => Workload {
                metadata: Some(ObjectMeta {
                    id: id.into(),
                    r#type: kind as i32,
                    generation: 1,
                    revision_id: image.to_string(),
                    finalizers: kind.finalizer().into_iter().map(String::from).collect(),
                    ..Default::default()
                }),
                spec: Some(ObjectSpec {
                    desired_state: DesiredState::Running as i32,
                    workload: None,
                }),
                status: Some(ObjectStatus::default()),
            },
        };
        let kind = if state.objects.contains_key(id) {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.write(&mut state, kind, object)
    }

    pub fn delete(&self, id: &str) {
        let mut state = self.state.lock().unwrap();
        let mut object = (*state.objects[id]).clone();
        object.metadata.as_mut().unwrap().deletion_timestamp_ms = 1;
        self.write(&mut state, ChangeKind::Modified, object);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Workload>> {
        self.state.lock().unwrap().objects.get(id).cloned()
    }

    /// Events recorded, as (workload id, reason).
    pub fn events(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().events.clone()
    }
}

impl WorkloadSource for MemoryLog {
    fn list(&self) -> BoxFuture<'_, Result<Listing, SourceError>> {
        let state = self.state.lock().unwrap();
        let listing = Listing {
            objects: state.objects.values().cloned().collect(),
            resource_version: state.log.len() as u64,
        };
        async move { Ok(listing) }.boxed()
    }

    fn watch(&self, after: u64) -> BoxStream<'static, Result<Change, SourceError>> {
        let state = self.state.lock().unwrap();
        let live = self.live.subscribe();
        let replay: Vec<_> = state.log[after as usize..]
            .iter()
            .cloned()
            .map(Ok)
            .collect();
        let next = state.log.len() as u64;
        let delivered_through = self.delivered_through.clone();
        let live = tokio_stream::wrappers::BroadcastStream::new(live)
            .filter_map(move |c| async move { c.ok().filter(|c| c.resource_version > next) })
            .then(move |change| {
                let mut through = delivered_through.subscribe();
                async move {
                    let _ = through.wait_for(|t| change.resource_version <= *t).await;
                    Ok(change)
                }
            });
        futures::stream::iter(replay).chain(live).boxed()
    }
}

impl WorkloadWriter for MemoryLog {
    fn update_status(
        &self,
        id: String,
        expected: u64,
        status: ObjectStatus,
    ) -> BoxFuture<'_, Result<Arc<Workload>, WriteError>> {
        let result = (|| {
            let mut state = self.state.lock().unwrap();
            let current = state
                .objects
                .get(&id)
                .cloned()
                .ok_or_else(|| WriteError::NotFound(id.clone()))?;
            if current.resource_version() != expected {
                return Err(WriteError::Conflict {
                    id: id.clone(),
                    expected,
                    actual: current.resource_version(),
                });
            }
            let mut object = (*current).clone();
            object.status = Some(status);
            Ok(self.write(&mut state, ChangeKind::Modified, object))
        })();
        async move { result }.boxed()
    }

    fn remove_finalizer(
        &self,
        id: String,
        finalizer: String,
    ) -> BoxFuture<'_, Result<(), WriteError>> {
        let mut state = self.state.lock().unwrap();
        if let Some(current) = state.objects.get(&id).cloned() {
            let mut object = (*current).clone();
            let meta = object.metadata.as_mut().unwrap();
            meta.finalizers.retain(|f| *f != finalizer);
            let kind = if meta.finalizers.is_empty() && meta.deletion_timestamp_ms != 0 {
                ChangeKind::Deleted
            } else {
                ChangeKind::Modified
            };
            self.write(&mut state, kind, object);
        }
        async { Ok(()) }.boxed()
    }

    fn record_event(
        &self,
        id: String,
        _kind: EventType,
        reason: String,
        _message: String,
    ) -> BoxFuture<'_, Result<(), WriteError>> {
        self.state.lock().unwrap().events.push((id, reason));
        async { Ok(()) }.boxed()
    }
}
