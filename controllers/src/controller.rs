//! The controller runtime: drives a [`Reconciler`] from informer changes,
//! runtime triggers and a periodic resync, through a [`WorkQueue`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use persys_api::v1::{Workload, WorkloadType};
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Backoff, KeyedBackoff};
use crate::informer::Informer;
use crate::kit::{Classify, ErrorClass};
use crate::queue::WorkQueue;
use crate::source::WorkloadWriter;

/// The longest a reconcile waits for the cache to hold its key's last
/// status write; past it, it reconciles from the cache as it is.
const READ_OWN_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What to do after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Action {
    /// Reconcile again after this long even if nothing changes.
    pub requeue_after: Option<Duration>,
    /// The resource version of the status this reconcile wrote: the next
    /// reconcile of the key starts once the cache holds it, so it never
    /// acts on a status older than its own last word.
    pub wrote: Option<u64>,
}

impl Action {
    /// Wait for the next change or resync.
    pub fn await_change() -> Self {
        Action::default()
    }

    pub fn requeue(after: Duration) -> Self {
        Action {
            requeue_after: Some(after),
            wrote: None,
        }
    }

    /// Records that the reconcile wrote the object at `resource_version`.
    pub fn wrote(self, resource_version: u64) -> Self {
        Action {
            wrote: Some(resource_version),
            ..self
        }
    }
}

/// The outcome of tearing a deleted workload's runtime objects down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Everything is gone: the finalizer may be removed.
    Done,
    /// Still in progress (a VM shutting down…): look again after this long.
    RequeueAfter(Duration),
}

/// One runtime's convergence logic. Every method is level-triggered: it reads
/// the desired object and the runtime's actual state, acts on the difference,
/// and is harmless to run twice.
pub trait Reconciler: Send + Sync + 'static {
    type Error: std::error::Error + Classify + Send + Sync + 'static;

    /// The workload type this controller owns.
    const WORKLOAD_TYPE: WorkloadType;

    /// Short name for logs and metrics: "docker", "compose", "vm".
    const NAME: &'static str = controller_name(Self::WORKLOAD_TYPE);

    /// Makes the runtime match a live workload.
    fn reconcile(
        &self,
        workload: Arc<Workload>,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// Tears down the runtime objects of a deleted workload.
    fn cleanup(
        &self,
        workload: Arc<Workload>,
    ) -> impl Future<Output = Result<Cleanup, Self::Error>> + Send;

    /// Whether `error` says the runtime itself could not be reached (engine
    /// or daemon down) rather than something about one workload. While the
    /// runtime is down the runner retries one workload as a probe instead of
    /// every workload on its own back-off, and reconciles the others as soon
    /// as the runtime answers again.
    fn is_runtime_unreachable(&self, error: &Self::Error) -> bool {
        error.class() == ErrorClass::Unreachable
    }

    /// A key with no workload in the cache: a runtime object whose workload is
    /// gone, or a deletion that already completed. `orphaned_for` is how long
    /// the key has been without a workload, counted by the runner from the
    /// first such reconcile until one returns without a requeue (nothing
    /// left) or the workload reappears; see [`orphan_grace_left`].
    fn reconcile_missing(
        &self,
        id: &str,
        orphaned_for: Duration,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send {
        let _ = (id, orphaned_for);
        async { Ok(Action::await_change()) }
    }
}

/// The controller of each workload type, by name.
pub const fn controller_name(workload_type: WorkloadType) -> &'static str {
    match workload_type {
        WorkloadType::Container => "docker",
        WorkloadType::Compose => "compose",
        WorkloadType::Vm => "vm",
        WorkloadType::Unspecified => "unspecified",
    }
}

/// How much longer a runtime object without a workload is spared, orphaned
/// for `orphaned_for`: `None` once `grace` has passed and it may be removed.
/// The grace covers a workload deleted and re-applied, and a store restored
/// from an older copy: the runtime object outlives a short absence.
pub fn orphan_grace_left(grace: Duration, orphaned_for: Duration) -> Option<Duration> {
    grace
        .checked_sub(orphaned_for)
        .filter(|left| !left.is_zero())
}

/// Where a controller reports what it does (metrics). Every method has a
/// no-op default.
pub trait ControllerObserver: Send + Sync + 'static {
    /// A reconcile (or cleanup) finished: `result` is "success" or "error".
    fn reconciled(&self, controller: &'static str, result: &'static str, took: Duration) {
        let _ = (controller, result, took);
    }

    /// A key was scheduled for a retry after an error.
    fn retried(&self, controller: &'static str) {
        let _ = controller;
    }

    /// Keys waiting to run now.
    fn queue_depth(&self, controller: &'static str, depth: usize) {
        let _ = (controller, depth);
    }
}

/// Observes nothing.
#[derive(Debug, Default)]
pub struct NoObserver;

impl ControllerObserver for NoObserver {}

/// Reconciles of one controller running at once unless
/// `PERSYS_MAX_CONCURRENT_RECONCILES` says. Chosen from the scale benchmark
/// (`benches/scale.rs`, BENCHMARKS.md): on 2 cores the engine still takes
/// more creates and starts at once than 4. 200 containers converged in
/// 85 s at 4 slots and 45 s at 16 (the CLI's best, `xargs -P 16 docker
/// run`, took 47 s; `-P 4` 76 s and `-P 8` 71 s), and 100 killed
/// containers were back in 54 s at 4 and 30 s at 16. A reconcile waiting
/// on the engine costs the agent little, and pulls run outside these slots.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// How a controller runs.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Reconciles of different keys running at once.
    pub concurrency: usize,
    /// Every key of the type is queued this often (the safety net).
    pub resync_interval: Option<Duration>,
    /// Delay before retrying a key whose reconcile failed.
    pub error_backoff: Backoff,
    /// Delay between probes of a runtime that could not be reached.
    pub outage_backoff: Backoff,
    /// Receives reconcile outcomes and queue depth.
    pub observer: Arc<dyn ControllerObserver>,
}

impl std::fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("concurrency", &self.concurrency)
            .field("resync_interval", &self.resync_interval)
            .field("error_backoff", &self.error_backoff)
            .field("outage_backoff", &self.outage_backoff)
            .finish_non_exhaustive()
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            concurrency: DEFAULT_CONCURRENCY,
            resync_interval: Some(Duration::from_secs(30)),
            error_backoff: Backoff::ERRORS,
            outage_backoff: Backoff::OUTAGE_PROBE,
            observer: Arc::new(NoObserver),
        }
    }
}

/// Drives one [`Reconciler`].
pub struct Controller<R: Reconciler> {
    reconciler: Arc<R>,
    informer: Informer,
    writer: Arc<dyn WorkloadWriter>,
    queue: Arc<WorkQueue>,
    triggers: Vec<BoxStream<'static, String>>,
    config: ControllerConfig,
}

/// What every reconcile task shares.
struct Shared<R: Reconciler> {
    reconciler: Arc<R>,
    informer: Informer,
    writer: Arc<dyn WorkloadWriter>,
    queue: Arc<WorkQueue>,
    /// A std mutex: held only to count a result, never across an await.
    backoff: Mutex<KeyedBackoff>,
    /// A std mutex: held only to park or release keys, never across an await.
    outage: Arc<Mutex<Outage>>,
    outage_backoff: Backoff,
    observer: Arc<dyn ControllerObserver>,
    /// Key → resource version of the last status its reconcile wrote, until
    /// the next reconcile of the key has seen it in the cache. A std mutex:
    /// never held across an await.
    written: Mutex<HashMap<String, u64>>,
    /// Key → when it was first reconciled without a workload, while its
    /// runtime objects are spared (the orphan grace). A std mutex: never
    /// held across an await.
    orphans: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// The runtime could not be reached: the keys that failed for that reason
/// wait for it instead of each retrying on its own back-off, and one of them
/// (the probe) is retried on the outage back-off. Whatever reconcile next
/// gets an answer from the runtime ends the outage and queues them all.
#[derive(Debug, Default)]
struct Outage {
    /// The key retried to find out whether the runtime is back; `None` when
    /// the runtime is not known to be down.
    probe: Option<String>,
    /// Probes that failed so far.
    attempts: u32,
    /// Keys waiting for the runtime (never the probe).
    parked: HashSet<String>,
}

impl<R: Reconciler> Controller<R> {
    pub fn new(
        reconciler: Arc<R>,
        informer: Informer,
        writer: Arc<dyn WorkloadWriter>,
        config: ControllerConfig,
    ) -> Self {
        Controller {
            reconciler,
            informer,
            writer,
            queue: Arc::new(WorkQueue::new()),
            triggers: Vec::new(),
            config,
        }
    }

    /// Adds a stream of workload ids to reconcile (runtime events).
    pub fn with_trigger(mut self, trigger: BoxStream<'static, String>) -> Self {
        self.triggers.push(trigger);
        self
    }

    /// The controller's queue, so other parts can nudge a key.
    pub fn queue(&self) -> Arc<WorkQueue> {
        self.queue.clone()
    }

    /// Runs until `shutdown` is cancelled, then lets running reconciles finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let kind = R::WORKLOAD_TYPE;
        let name = R::NAME;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.informer.wait_until_synced() => {}
        }
        tracing::info!(controller = name, "controller started");

        let mut feeders = JoinSet::new();
        let notifications = self.informer.subscribe();
        for id in self.informer.cache().ids_of_type(kind) {
            self.queue.add(&id);
        }
        feeders.spawn(follow_informer(
            notifications,
            self.informer.clone(),
            self.queue.clone(),
            kind,
        ));
        for trigger in self.triggers {
            let queue = self.queue.clone();
            feeders.spawn(async move {
                let mut trigger = trigger;
                while let Some(id) = trigger.next().await {
                    queue.add(&id);
                }
            });
        }
        let outage = Arc::new(Mutex::new(Outage::default()));
        if let Some(interval) = self.config.resync_interval {
            let queue = self.queue.clone();
            let cache = self.informer.cache();
            let outage = outage.clone();
            feeders.spawn(async move {
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                loop {
                    ticker.tick().await;
                    let ids = cache.ids_of_type(kind);
                    // Workloads waiting for an unreachable runtime are not
                    // resynced: the probe finds out when it is back.
                    let outage = outage.lock().unwrap_or_else(|p| p.into_inner());
                    for id in ids.iter().filter(|id| !outage.parked.contains(*id)) {
                        queue.add(id);
                    }
                }
            });
        }

        let shared = Arc::new(Shared {
            reconciler: self.reconciler,
            informer: self.informer,
            writer: self.writer,
            queue: self.queue.clone(),
            backoff: Mutex::new(KeyedBackoff::new(self.config.error_backoff)),
            outage: outage.clone(),
            outage_backoff: self.config.outage_backoff,
            observer: self.config.observer.clone(),
            written: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
        });
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut running = JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let key = tokio::select! {
                _ = shutdown.cancelled() => break,
                key = self.queue.next() => match key {
                    Some(key) => key,
                    None => break,
                },
            };
            shared.observer.queue_depth(name, self.queue.len());
            let shared = shared.clone();
            running.spawn(async move {
                shared.process(&key).await;
                shared.queue.done(&key);
                drop(permit);
            });
            // Reap finished tasks so the set does not grow.
            while running.try_join_next().is_some() {}
        }
        self.queue.shut_down();
        feeders.abort_all();
        while running.join_next().await.is_some() {}
        tracing::info!(controller = name, "controller stopped");
    }
}

/// The text a panic was raised with (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Queues the ids of changes that concern this controller: any change of
/// its type except a change of status alone.
async fn follow_informer(
    mut notifications: broadcast::Receiver<Arc<crate::informer::Notification>>,
    informer: Informer,
    queue: Arc<WorkQueue>,
    kind: WorkloadType,
) {
    loop {
        match notifications.recv().await {
            Ok(n) => {
                if n.workload_type() == kind && n.changes_intent() {
                    queue.add(n.id());
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "controller fell behind the informer; resyncing");
                for id in informer.cache().ids_of_type(kind) {
                    queue.add(&id);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl<R: Reconciler> Shared<R> {
    fn backoff(&self) -> std::sync::MutexGuard<'_, KeyedBackoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn process(&self, key: &str) {
        let name = R::NAME;
        // A workload waiting for an unreachable runtime is left alone,
        // whatever changed: its reconcile could only fail the same way. The
        // probe getting through queues it with its latest spec.
        if self.outage().parked.contains(key) {
            return;
        }
        self.read_own_write(key).await;
        let workload = self.informer.cache().get(key);
        let generation = workload.as_ref().map(|w| w.generation()).unwrap_or(0);
        let span = tracing::info_span!(
            "reconcile",
            controller = name,
            workload_id = key,
            generation
        );
        let started = tokio::time::Instant::now();
        // Boxed: a reconcile's future is large (it holds the state of every
        // runtime call it may make), and each key's task is moved whole
        // when it is spawned, even for a key that returns above (parked:
        // under a storm of applies to an unreachable runtime, every one).
        // A panic is caught here, not in the spawned task, so the key is
        // still released (`WorkQueue::done`) and retried on its back-off.
        let outcome = AssertUnwindSafe(Box::pin(
            async {
                match workload {
                    None => {
                        let orphaned_for = self.orphaned_for(key);
                        let outcome = self.reconciler.reconcile_missing(key, orphaned_for).await;
                        if matches!(&outcome, Ok(action) if action.requeue_after.is_none()) {
                            self.lock_orphans().remove(key);
                        }
                        outcome
                    }
                    Some(w) if w.workload_type() != R::WORKLOAD_TYPE => Ok(Action::await_change()),
                    Some(w) if w.is_deleting() => self.finalize(w).await,
                    Some(w) => {
                        self.lock_orphans().remove(key);
                        self.reconciler.reconcile(w).await
                    }
                }
            }
            .instrument(span.clone()),
        ))
        .catch_unwind()
        .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(panic) => {
                self.panicked(key, panic_message(panic.as_ref()), started.elapsed())
                    .instrument(span)
                    .await;
                return;
            }
        };
        let _entered = span.enter();
        let result = if outcome.is_ok() { "success" } else { "error" };
        self.observer.reconciled(name, result, started.elapsed());
        match outcome {
            Err(error) if self.reconciler.is_runtime_unreachable(&error) => {
                self.park(key, &error);
            }
            Ok(action) => {
                if let Some(version) = action.wrote {
                    self.lock_written().insert(key.to_string(), version);
                }
                self.runtime_answered(key);
                self.backoff().succeeded(key);
                if let Some(after) = action.requeue_after {
                    self.queue.add_after(key, after);
                }
            }
            Err(error) => {
                self.runtime_answered(key);
                let delay = self.backoff().failed(key);
                tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed");
                self.observer.retried(name);
                self.queue.add_after(key, delay);
            }
        }
    }

    /// A reconcile panicked (a defect): the workload gets a Warning event
    /// with the panic's message and is retried on its error back-off, like
    /// any failed reconcile, so one bad workload neither stalls its key for
    /// good nor takes the controller down.
    async fn panicked(&self, key: &str, message: String, took: Duration) {
        let name = R::NAME;
        self.observer.reconciled(name, "error", took);
        let delay = self.backoff().failed(key);
        tracing::error!(panic = %message, retry_in = ?delay, "reconcile panicked");
        let recorded = self
            .writer
            .record_event(
                key.to_string(),
                persys_api::v1::EventType::Warning,
                "ReconcilePanicked".to_string(),
                format!("the {name} controller panicked reconciling this workload: {message}"),
            )
            .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not record the ReconcilePanicked event");
        }
        self.observer.retried(name);
        self.queue.add_after(key, delay);
    }

    /// Waits (briefly: the informer follows the log within microseconds)
    /// until the cache holds the status the key's last reconcile wrote. A
    /// trigger that fires right after a write — a runtime event caused by
    /// the reconcile itself, or drift moments later — would otherwise be
    /// judged against the status from before it.
    async fn read_own_write(&self, key: &str) {
        let Some(version) = self.lock_written().remove(key) else {
            return;
        };
        if self.informer.cache().resource_version() >= version {
            return;
        }
        let caught_up = tokio::time::timeout(
            READ_OWN_WRITE_TIMEOUT,
            self.informer.wait_for_version(version),
        )
        .await;
        if caught_up.is_err() {
            tracing::debug!(
                key,
                version,
                "the cache did not reach this key's last status write in time; reconciling from it anyway"
            );
        }
    }

    fn lock_written(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_orphans(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::time::Instant>> {
        self.orphans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `key` has been without a workload, counted from the first
    /// reconcile that found it so.
    fn orphaned_for(&self, key: &str) -> Duration {
        self.lock_orphans()
            .entry(key.to_string())
            .or_insert_with(tokio::time::Instant::now)
            .elapsed()
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key` failed because the runtime could not be reached: the first such
    /// key becomes the probe and is retried on the outage back-off; the rest
    /// wait, without retrying or logging, until the runtime answers.
    fn park(&self, key: &str, error: &R::Error) {
        let name = R::NAME;
        let mut outage = self.outage();
        let retry_in = match outage.probe.as_deref() {
            None => {
                outage.probe = Some(key.to_string());
                outage.attempts = 1;
                let delay = self.outage_backoff.delay(0);
                tracing::warn!(
                    error = %error,
                    retry_in = ?delay,
                    "{name} runtime unreachable; its workloads wait for it"
                );
                delay
            }
            Some(probe) if probe == key => {
                let delay = self.outage_backoff.delay(outage.attempts);
                outage.attempts = outage.attempts.saturating_add(1);
                tracing::debug!(error = %error, retry_in = ?delay, "{name} runtime still unreachable");
                delay
            }
            Some(_) => {
                outage.parked.insert(key.to_string());
                tracing::debug!(error = %error, "waiting for the {name} runtime");
                return;
            }
        };
        drop(outage);
        self.observer.retried(name);
        self.queue.add_after(key, retry_in);
    }

    /// A reconcile of `key` got past the runtime (or failed for another
    /// reason): an outage is over, and every key that waited is queued.
    fn runtime_answered(&self, key: &str) {
        let waiting = {
            let mut outage = self.outage();
            if outage.probe.is_none() {
                return;
            }
            let outage = std::mem::take(&mut *outage);
            outage
                .parked
                .into_iter()
                .chain(outage.probe)
                .filter(|k| k != key)
                .collect::<Vec<_>>()
        };
        tracing::info!(
            workloads = waiting.len(),
            "{} runtime reachable again; reconciling the workloads that waited for it",
            R::NAME
        );
        for id in waiting {
            self.queue.add(&id);
        }
    }

    async fn finalize(&self, workload: Arc<Workload>) -> Result<Action, R::Error> {
        let Some(finalizer) = R::WORKLOAD_TYPE.finalizer() else {
            return Ok(Action::await_change());
        };
        if !workload.has_finalizer(finalizer) {
            return Ok(Action::await_change());
        }
        match self.reconciler.cleanup(workload.clone()).await? {
            Cleanup::RequeueAfter(after) => Ok(Action::requeue(after)),
            Cleanup::Done => {
                if let Err(error) = self
                    .writer
                    .remove_finalizer(workload.id().to_string(), finalizer.to_string())
                    .await
                {
                    tracing::warn!(%error, "removing finalizer failed");
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
                Ok(Action::await_change())
            }
        }
    }
}
