//! The controller runtime's rules, under paused time.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use persys_api::v1::{ActualState, ObjectStatus, Workload, WorkloadType};
use persys_controllers::{
    Action, Classify, Cleanup, Controller, ControllerConfig, ErrorClass, Informer, Reconciler,
    WorkloadWriter, orphan_grace_left,
};
use support::MemoryLog;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TestError(String);

impl Classify for TestError {
    fn class(&self) -> ErrorClass {
        if self.0 == RUNTIME_DOWN {
            ErrorClass::Unreachable
        } else {
            ErrorClass::Retryable
        }
    }
}

/// Records every call; behaviour per id is scripted.
struct Recorder {
    writer: Arc<MemoryLog>,
    calls: Mutex<Vec<(String, Instant)>>,
    /// The actual state each reconcile read, in order.
    seen: Mutex<Vec<(String, ActualState)>>,
    cleanups: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_parallel_per_key: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashMap<String, usize>>,
    /// Ids whose reconcile fails this many more times.
    failures: Mutex<HashMap<String, usize>>,
    /// Ids whose reconcile panics this many more times.
    panics: Mutex<HashMap<String, usize>>,
    /// When set, each reconcile waits for a permit.
    gate: Option<Arc<Semaphore>>,
    requeue: Option<Duration>,
    write_status: bool,
    /// While set, every reconcile fails as if the runtime were down.
    runtime_down: AtomicBool,
    /// Each reconcile of a key without a workload: how long the runner said
    /// it had been orphaned.
    orphans: Mutex<Vec<(String, Duration)>>,
}

/// The orphan grace of the test reconciler: it removes what it finds once
/// a key has been without a workload this long.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);

const RUNTIME_DOWN: &str = "runtime unreachable";

impl Recorder {
    fn new(writer: Arc<MemoryLog>) -> Self {
        Recorder {
            writer,
            calls: Mutex::default(),
            seen: Mutex::default(),
            cleanups: Mutex::default(),
            running: AtomicUsize::new(0),
            max_parallel_per_key: Mutex::default(),
            in_flight: Mutex::default(),
            failures: Mutex::default(),
            panics: Mutex::default(),
            gate: None,
            requeue: None,
            write_status: false,
            runtime_down: AtomicBool::new(false),
            orphans: Mutex::default(),
        }
    }

    fn calls_of(&self, id: &str) -> Vec<Instant> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == id)
            .map(|(_, t)| *t)
            .collect()
    }
}

impl Reconciler for Recorder {
    type Error = TestError;

    const WORKLOAD_TYPE: WorkloadType = WorkloadType::Container;
    const NAME: &'static str = "test";

    async fn reconcile(&self, workload: Arc<Workload>) -> Result<Action, TestError> {
        let id = workload.id().to_string();
        self.calls
            .lock()
            .unwrap()
            .push((id.clone(), Instant::now()));
        let panic_now = {
            let mut panics = self.panics.lock().unwrap();
            panics.get_mut(&id).is_some_and(|n| {
                let now = *n > 0;
                *n = n.saturating_sub(1);
                now
            })
        };
        if panic_now {
            panic!("reconcile of {id} hit a defect");
        }
        self.seen.lock().unwrap().push((
            id.clone(),
            workload
                .status
                .as_ref()
                .map_or(ActualState::Unspecified, |s| s.actual_state()),
        ));
        {
            let mut in_flight = self.in_flight.lock().unwrap();
            let n = in_flight.entry(id.clone()).or_default();
            *n += 1;
            let mut max = self.max_parallel_per_key.lock().unwrap();
            let m = max.entry(id.clone()).or_default();
            *m = (*m).max(*n);
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        *self.in_flight.lock().unwrap().get_mut(&id).unwrap() -= 1;
        if self.runtime_down.load(Ordering::SeqCst) {
            return Err(TestError(RUNTIME_DOWN.into()));
        }
        {
            let mut failures = self.failures.lock().unwrap();
            if let Some(n) = failures.get_mut(&id)
                && *n > 0
            {
                *n -= 1;
                return Err(TestError(format!("{id} failed")));
            }
        }
        let action = match self.requeue {
            Some(after) => Action::requeue(after),
            None => Action::await_change(),
        };
        if self.write_status {
            let status = ObjectStatus {
                actual_state: ActualState::Running as i32,
                observed_generation: workload.generation(),
                ..Default::default()
            };
            let written = self
                .writer
                .update_status(id, workload.resource_version(), status)
                .await
                .map_err(|e| TestError(e.to_string()))?;
            return Ok(action.wrote(written.resource_version()));
        }
        Ok(action)
    }

    async fn reconcile_missing(
        &self,
        id: &str,
        orphaned_for: Duration,
    ) -> Result<Action, TestError> {
        self.orphans
            .lock()
            .unwrap()
            .push((id.to_string(), orphaned_for));
        Ok(match orphan_grace_left(ORPHAN_GRACE, orphaned_for) {
            Some(left) => Action::requeue(left),
            None => Action::await_change(),
        })
    }

    async fn cleanup(&self, workload: Arc<Workload>) -> Result<Cleanup, TestError> {
        self.cleanups
            .lock()
            .unwrap()
            .push(workload.id().to_string());
        Ok(Cleanup::Done)
    }
}

struct Harness {
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn config(resync: Option<Duration>) -> ControllerConfig {
    ControllerConfig {
        concurrency: 4,
        resync_interval: resync,
        error_backoff: persys_controllers::backoff::Backoff {
            jitter: 0.0,
            ..persys_controllers::backoff::Backoff::ERRORS
        },
        outage_backoff: persys_controllers::backoff::Backoff {
            jitter: 0.0,
            ..persys_controllers::backoff::Backoff::OUTAGE_PROBE
        },
        ..ControllerConfig::default()
    }
}

async fn start(
    log: Arc<MemoryLog>,
    recorder: Recorder,
    config: ControllerConfig,
    trigger: Option<futures::stream::BoxStream<'static, String>>,
) -> Harness {
    let recorder = Arc::new(recorder);
    let informer = Informer::new(log.clone());
    let shutdown = CancellationToken::new();
    let mut controller = Controller::new(recorder.clone(), informer.clone(), log.clone(), config);
    if let Some(trigger) = trigger {
        controller = controller.with_trigger(trigger);
    }
    let tasks = vec![
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move { informer.run(shutdown).await }
        }),
        tokio::spawn(controller.run(shutdown.clone())),
    ];
    Harness {
        recorder,
        shutdown,
        tasks,
    }
}

/// A controller with a trigger stream the test feeds ids into.
async fn start_triggered(
    log: Arc<MemoryLog>,
) -> (Harness, tokio::sync::mpsc::UnboundedSender<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let trigger = Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    let recorder = Recorder::new(log.clone());
    (start(log, recorder, config(None), Some(trigger)).await, tx)
}

/// Lets every runnable task run (time is paused and only advances when all
/// tasks are idle).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

impl Harness {
    async fn stop(self) -> Arc<Recorder> {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.recorder
    }
}

#[tokio::test(start_paused = true)]
async fn controller_reconciles_each_workload_of_its_type_after_sync() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    log.apply("b", WorkloadType::Container, "x:1");
    log.apply("vm", WorkloadType::Vm, "x:1");
    let h = start(log.clone(), Recorder::new(log.clone()), config(None), None).await;
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 1);
    assert_eq!(h.recorder.calls_of("b").len(), 1);
    assert_eq!(
        h.recorder.calls_of("vm").len(),
        0,
        "another controller's type"
    );
    log.apply("c", WorkloadType::Container, "x:1");
    settle().await;
    assert_eq!(h.recorder.calls_of("c").len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_is_not_retriggered_by_its_own_status_write() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let mut recorder = Recorder::new(log.clone());
    recorder.write_status = true;
    let h = start(log.clone(), recorder, config(None), None).await;
    settle().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.recorder.calls_of("a").len(), 1);
    assert_eq!(
        log.get("a")
            .unwrap()
            .status
            .as_ref()
            .unwrap()
            .actual_state(),
        ActualState::Running
    );
    // A spec change (new generation) does trigger it.
    log.apply("a", WorkloadType::Container, "x:2");
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_never_runs_two_reconciles_of_one_key_at_once() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let gate = Arc::new(Semaphore::new(0));
    let mut recorder = Recorder::new(log.clone());
    recorder.gate = Some(gate.clone());
    let h = start(log.clone(), recorder, config(None), None).await;
    settle().await;
    assert_eq!(h.recorder.running.load(Ordering::SeqCst), 1);
    // Five changes while the first reconcile is blocked…
    for i in 2..7 {
        log.apply("a", WorkloadType::Container, &format!("x:{i}"));
    }
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 1, "nothing runs beside it");
    gate.add_permits(100);
    settle().await;
    // …make exactly one more run, with the latest object.
    assert_eq!(h.recorder.calls_of("a").len(), 2);
    assert_eq!(h.recorder.max_parallel_per_key.lock().unwrap()["a"], 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_backs_errors_off_exponentially_and_resets_after_success() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let recorder = Recorder::new(log.clone());
    recorder.failures.lock().unwrap().insert("a".into(), 4);
    let started = Instant::now();
    let h = start(log.clone(), recorder, config(None), None).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let offsets: Vec<u64> = h
        .recorder
        .calls_of("a")
        .iter()
        .map(|t| (*t - started).as_secs())
        .collect();
    // Fails at 0, retried after 1, 2, 4, 8 s; the fifth run succeeds.
    assert_eq!(offsets, [0, 1, 3, 7, 15]);
    // After a success the next failure starts from 1 s again.
    h.recorder.failures.lock().unwrap().insert("a".into(), 1);
    let before = Instant::now();
    log.apply("a", WorkloadType::Container, "x:2");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after: Vec<u64> = h
        .recorder
        .calls_of("a")
        .iter()
        .filter(|t| **t >= before)
        .map(|t| (*t - before).as_secs())
        .collect();
    assert_eq!(after, [0, 1]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_waits_out_a_runtime_outage_with_one_probe_then_reconciles_everything() {
    let log = MemoryLog::new();
    let ids: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    for id in &ids {
        log.apply(id, WorkloadType::Container, "x:1");
    }
    let recorder = Recorder::new(log.clone());
    recorder.runtime_down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let h = start(log.clone(), recorder, config(None), None).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    // A workload applied while the runtime is down is reconciled once (to
    // report it), then waits with the others.
    log.apply("late", WorkloadType::Container, "x:1");
    tokio::time::sleep(Duration::from_secs(40)).await;

    let calls = h.recorder.calls.lock().unwrap().clone();
    let probes: Vec<&String> = ids
        .iter()
        .filter(|id| h.recorder.calls_of(id).len() > 1)
        .collect();
    assert_eq!(
        probes.len(),
        1,
        "one workload probes the runtime: {probes:?}"
    );
    let probe_offsets: Vec<u64> = h
        .recorder
        .calls_of(probes[0])
        .iter()
        .map(|t| (*t - started).as_secs())
        .collect();
    // Probed after 1, 2, 4, 8 and 16 s; every other workload ran once.
    assert_eq!(probe_offsets, [0, 1, 3, 7, 15, 31]);
    assert_eq!(calls.len(), ids.len() + 5 + 1);
    assert_eq!(h.recorder.calls_of("late").len(), 1);

    // The runtime comes back: the next probe gets through and everything
    // that waited is reconciled at once.
    h.recorder.runtime_down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let back = started + Duration::from_secs(61);
    for id in ids.iter().chain(std::iter::once(&"late".to_string())) {
        let last = *h.recorder.calls_of(id).last().unwrap();
        assert_eq!(last, back, "{id} reconciled when the probe got through");
    }
    // Nothing is retried after that.
    let settled = h.recorder.calls.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(h.recorder.calls.lock().unwrap().len(), settled);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resync_leaves_workloads_waiting_for_an_unreachable_runtime_alone() {
    let log = MemoryLog::new();
    let ids: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    for id in &ids {
        log.apply(id, WorkloadType::Container, "x:1");
    }
    let recorder = Recorder::new(log.clone());
    recorder.runtime_down.store(true, Ordering::SeqCst);
    let h = start(
        log.clone(),
        recorder,
        config(Some(Duration::from_secs(10))),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(65)).await;
    let waited: Vec<usize> = ids
        .iter()
        .map(|id| h.recorder.calls_of(id).len())
        .filter(|calls| *calls == 1)
        .collect();
    assert_eq!(waited.len(), ids.len() - 1, "six resyncs passed them over");
    // Once the runtime answers, the next resync (or probe) brings them all.
    h.recorder.runtime_down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(31)).await;
    for id in &ids {
        assert!(h.recorder.calls_of(id).len() >= 2, "{id} reconciled again");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn changes_to_a_workload_waiting_for_the_runtime_are_acted_on_when_it_is_back() {
    let log = MemoryLog::new();
    log.apply("first", WorkloadType::Container, "x:1");
    let recorder = Recorder::new(log.clone());
    recorder.runtime_down.store(true, Ordering::SeqCst);
    let h = start(log.clone(), recorder, config(None), None).await;
    settle().await;
    log.apply("waiting", WorkloadType::Container, "x:1");
    settle().await;
    assert_eq!(h.recorder.calls_of("waiting").len(), 1, "reported once");
    // New revisions while the runtime is down: nothing to do until it is back.
    for i in 2..6 {
        log.apply("waiting", WorkloadType::Container, &format!("x:{i}"));
        settle().await;
    }
    assert_eq!(h.recorder.calls_of("waiting").len(), 1);
    h.recorder.runtime_down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.recorder.calls_of("waiting").len(),
        2,
        "reconciled once more"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_error_backoff_is_capped_at_five_minutes() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let recorder = Recorder::new(log.clone());
    recorder.failures.lock().unwrap().insert("a".into(), 1000);
    let h = start(log.clone(), recorder, config(None), None).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let calls = h.recorder.calls_of("a");
    let gaps: Vec<u64> = calls.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect();
    assert_eq!(&gaps[..9], [1, 2, 4, 8, 16, 32, 64, 128, 256]);
    assert!(gaps[9..].iter().all(|g| *g == 300), "{gaps:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_resyncs_every_key_each_interval() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    log.apply("b", WorkloadType::Container, "x:1");
    let h = start(
        log.clone(),
        Recorder::new(log.clone()),
        config(Some(Duration::from_secs(30))),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(95)).await;
    assert_eq!(h.recorder.calls_of("a").len(), 4, "start + 30, 60, 90 s");
    assert_eq!(h.recorder.calls_of("b").len(), 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_honours_requeue_after() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let mut recorder = Recorder::new(log.clone());
    recorder.requeue = Some(Duration::from_secs(7));
    let started = Instant::now();
    let h = start(log.clone(), recorder, config(None), None).await;
    tokio::time::sleep(Duration::from_secs(22)).await;
    let offsets: Vec<u64> = h
        .recorder
        .calls_of("a")
        .iter()
        .map(|t| (*t - started).as_secs())
        .collect();
    assert_eq!(offsets, [0, 7, 14, 21]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_reconciles_keys_from_trigger_streams() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let (h, tx) = start_triggered(log.clone()).await;
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 1);
    tx.send("a".into()).unwrap();
    settle().await;
    assert_eq!(
        h.recorder.calls_of("a").len(),
        2,
        "a runtime event reconciles"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_orphan_is_spared_for_its_grace_from_first_sight_and_its_workload_coming_back_resets_the_count()
 {
    let log = MemoryLog::new();
    let (h, tx) = start_triggered(log.clone()).await;
    let second = Duration::from_secs(1);
    let seen = |recorder: &Recorder| -> Vec<Duration> {
        let orphans = recorder.orphans.lock().unwrap();
        orphans.iter().map(|(_, d)| *d).collect()
    };
    settle().await;
    tx.send("gone".into()).unwrap();
    settle().await;
    assert_eq!(seen(&h.recorder), [Duration::ZERO]);
    tokio::time::advance(10 * second).await;
    tx.send("gone".into()).unwrap();
    settle().await;
    assert_eq!(
        seen(&h.recorder),
        [Duration::ZERO, 10 * second],
        "counted from first sight, not from this look"
    );
    // The first reconcile's requeue comes due at the end of the grace; the
    // reconciler removes it and asks for nothing more, which ends the count.
    tokio::time::advance(20 * second).await;
    settle().await;
    assert_eq!(seen(&h.recorder).last(), Some(&(30 * second)));
    tx.send("gone".into()).unwrap();
    settle().await;
    assert_eq!(seen(&h.recorder).last(), Some(&Duration::ZERO));
    // Its workload comes back, then goes: the count starts over.
    tokio::time::advance(10 * second).await;
    log.apply("gone", WorkloadType::Container, "x:1");
    settle().await;
    assert_eq!(h.recorder.calls_of("gone").len(), 1);
    log.delete("gone");
    settle().await;
    tx.send("gone".into()).unwrap();
    settle().await;
    assert_eq!(seen(&h.recorder).last(), Some(&Duration::ZERO));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reconcile_right_after_a_status_write_waits_for_the_cache_to_hold_it() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    // The informer lists "a" and then lags: the status the first reconcile
    // writes does not reach the cache until released.
    log.hold();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let trigger = Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    let mut recorder = Recorder::new(log.clone());
    recorder.write_status = true;
    let h = start(log.clone(), recorder, config(None), Some(trigger)).await;
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 1);

    // A runtime event right after the write: the reconcile waits for the
    // cache instead of judging the workload by its status from before.
    tx.send("a".into()).unwrap();
    settle().await;
    assert_eq!(
        h.recorder.calls_of("a").len(),
        1,
        "no reconcile from a cache without its own last write"
    );
    log.release();
    settle().await;
    let seen = h.recorder.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ("a".to_string(), ActualState::Unspecified),
            ("a".to_string(), ActualState::Running)
        ]
    );

    // A cache that never catches up delays the reconcile, never loses it.
    log.hold();
    tx.send("a".into()).unwrap();
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 3, "its cache is current");
    tx.send("a".into()).unwrap();
    settle().await;
    assert_eq!(h.recorder.calls_of("a").len(), 3, "waits for its write");
    let waited = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.recorder.calls_of("a").len(), 4);
    let last = *h.recorder.calls_of("a").last().unwrap();
    assert_eq!(last - waited, Duration::from_secs(2), "after the 2 s limit");
    log.release();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_cleans_up_a_deleted_workload_then_removes_its_finalizer() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let h = start(log.clone(), Recorder::new(log.clone()), config(None), None).await;
    settle().await;
    log.delete("a");
    settle().await;
    assert_eq!(*h.recorder.cleanups.lock().unwrap(), ["a"]);
    assert!(log.get("a").is_none(), "finalizer removed, object gone");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn controller_shutdown_lets_a_running_reconcile_finish() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let gate = Arc::new(Semaphore::new(0));
    let mut recorder = Recorder::new(log.clone());
    recorder.gate = Some(gate.clone());
    let h = start(log.clone(), recorder, config(None), None).await;
    settle().await;
    let recorder = h.recorder.clone();
    h.shutdown.cancel();
    settle().await;
    assert_eq!(recorder.running.load(Ordering::SeqCst), 1, "still running");
    gate.add_permits(1);
    for t in h.tasks {
        t.await.unwrap();
    }
    assert_eq!(recorder.running.load(Ordering::SeqCst), 0);
}

/// Records what the runner reports. It is called on the controller's
/// tasks, where a failed assert would be lost: it only records, and the
/// tests assert on what it recorded.
#[derive(Default)]
struct Counting {
    outcomes: Mutex<Vec<&'static str>>,
    /// The controller named by each report, outcomes and retries alike.
    controllers: Mutex<Vec<&'static str>>,
    retries: AtomicUsize,
}

impl persys_controllers::ControllerObserver for Counting {
    fn reconciled(&self, controller: &'static str, result: &'static str, _took: Duration) {
        self.controllers.lock().unwrap().push(controller);
        self.outcomes.lock().unwrap().push(result);
    }

    fn retried(&self, controller: &'static str) {
        self.controllers.lock().unwrap().push(controller);
        self.retries.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn controller_reports_outcomes_and_retries_to_its_observer() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    let recorder = Recorder::new(log.clone());
    recorder.failures.lock().unwrap().insert("a".into(), 2);
    let observer = Arc::new(Counting::default());
    let mut config = config(None);
    config.observer = observer.clone();
    let h = start(log.clone(), recorder, config, None).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        *observer.outcomes.lock().unwrap(),
        ["error", "error", "success"]
    );
    assert_eq!(observer.retries.load(Ordering::SeqCst), 2);
    assert_eq!(
        *observer.controllers.lock().unwrap(),
        ["test"; 5],
        "every report names the controller (3 outcomes, 2 retries)"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconcile_releases_its_key_records_an_event_and_backs_off() {
    let log = MemoryLog::new();
    log.apply("a", WorkloadType::Container, "x:1");
    log.apply("b", WorkloadType::Container, "x:1");
    let recorder = Recorder::new(log.clone());
    recorder.panics.lock().unwrap().insert("a".into(), 2);
    let observer = Arc::new(Counting::default());
    let mut config = config(None);
    config.observer = observer.clone();
    let started = Instant::now();
    let h = start(log.clone(), recorder, config, None).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let offsets: Vec<u64> = h
        .recorder
        .calls_of("a")
        .iter()
        .map(|t| (*t - started).as_secs())
        .collect();
    // Panics at 0 and after 1 s; retried after 2 s more, and that run ends.
    assert_eq!(offsets, [0, 1, 3]);
    assert_eq!(h.recorder.calls_of("b").len(), 1, "other keys go on");
    let panicked = log
        .events()
        .iter()
        .filter(|(id, reason)| id == "a" && reason == "ReconcilePanicked")
        .count();
    assert_eq!(panicked, 2);
    assert_eq!(observer.retries.load(Ordering::SeqCst), 2);
    let controllers = observer.controllers.lock().unwrap().clone();
    assert!(
        !controllers.is_empty() && controllers.iter().all(|c| *c == "test"),
        "{controllers:?}"
    );
    // The key is released: a later change is reconciled at once.
    let before = Instant::now();
    log.apply("a", WorkloadType::Container, "x:2");
    settle().await;
    assert!(h.recorder.calls_of("a").iter().any(|t| *t >= before));
    h.stop().await;
}
