//! What every runtime reconciler needs besides its runtime, written once:
//! - [`Workloads`]: the per-workload attempt memory between reconciles, and
//!   the orphan timer of runtime objects whose workload is gone;
//! - [`Recorder`]: events, where a failed write is logged, never fatal
//!   (the store folds repeats);
//! - [`publish_status`]: writes a status only when it changed, guarded by
//!   the resource version it was built from;
//! - [`start_held`] and [`failed_start`]: the back-off of failed starts;
//! - [`ErrorClass`]: retryable, terminal or unreachable, for every error
//!   of every runtime;
//! - [`status::StatusBuilder`]: the states and conditions every runtime's
//!   status shares, with the few differences as parameters;
//! - [`io::WorkloadIo`]: logs, exec and console, one trait the three
//!   runtimes implement and the gRPC server calls;
//! - [`restart::RestartRule`]: whether something that exited starts again,
//!   for containers and compose services alike (the engine's own restart
//!   policy is always `no`: every start is the agent's).
//!
//! The rules decided here hold for Docker, Compose and VM alike:
//! - a status write that lost a race with another write requeues after
//!   [`CONFLICT_REQUEUE`]; the object then comes from the informer again;
//! - a status write for an object that left the store awaits the next
//!   change (the delete reaches the controller as one);
//! - every requeue is at least [`MIN_REQUEUE`], so a computed delay that
//!   rounds to zero does not spin;
//! - a failed start or create counts toward the crash-loop back-off only
//!   when a retry can help and the runtime answered: a terminal failure
//!   waits for a new spec, and an unreachable runtime is the outage probe's
//!   to wait out. The next start waits the back-off since the failed one
//!   (the base, then doubling), never less than the base.

pub mod io;
pub(crate) mod restart;
pub(crate) mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use persys_api::FailureReason;
use persys_api::v1::{EventType, ObjectStatus, Workload};

use crate::controller::Action;
use crate::crash_loop::{CrashLoop, CrashLoopPolicy, Gate};
use crate::source::{WorkloadWriter, WriteError};

/// How soon to look again after a status write lost a race with another
/// write. The informer catches up within milliseconds.
pub(crate) const CONFLICT_REQUEUE: Duration = Duration::from_millis(200);

/// The shortest requeue any reconciler asks for.
pub(crate) const MIN_REQUEUE: Duration = Duration::from_millis(10);

/// What a controller remembers per workload between reconciles (`M`). None
/// of it needs to survive a restart: kubelet forgets its back-offs too.
///
/// Std mutexes: held only to read or update an entry, never across an
/// await; the work queue runs one reconcile per workload at a time, so
/// entries are not contended.
pub(crate) struct Workloads<M> {
    memory: Mutex<HashMap<String, M>>,
}

impl<M> Default for Workloads<M> {
    fn default() -> Self {
        Workloads {
            memory: Mutex::default(),
        }
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A reconcile that panicked while holding the lock left the map whole:
    // every update is a single insert or field write.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl<M: Default> Workloads<M> {
    /// Runs `f` on the workload's memory, made fresh if there was none.
    pub(crate) fn with<T>(&self, id: &str, f: impl FnOnce(&mut M) -> T) -> T {
        f(locked(&self.memory).entry(id.to_string()).or_default())
    }
}

impl<M> Workloads<M> {
    /// Reads the workload's memory, if there is any.
    pub(crate) fn get<T>(&self, id: &str, f: impl FnOnce(&M) -> T) -> Option<T> {
        locked(&self.memory).get(id).map(f)
    }

    /// Drops everything remembered of the workload: it is gone.
    pub(crate) fn forget(&self, id: &str) {
        locked(&self.memory).remove(id);
    }
}

/// Records events for a controller. The store folds a repeat into a count,
/// so a reconcile may record the same event each time it sees the same
/// thing.
#[derive(Clone)]
pub(crate) struct Recorder {
    writer: Arc<dyn WorkloadWriter>,
}

impl Recorder {
    pub(crate) fn new(writer: Arc<dyn WorkloadWriter>) -> Self {
        Recorder { writer }
    }

    /// Records an event; a failure to record one is logged, not fatal.
    pub(crate) async fn event(&self, id: &str, kind: EventType, reason: &str, message: String) {
        if let Err(error) = self
            .writer
            .record_event(id.to_string(), kind, reason.to_string(), message)
            .await
        {
            tracing::debug!(%error, reason, "recording an event failed");
        }
    }
}

/// The action after a reconcile that wants another look after `requeue`,
/// if set, and otherwise waits for a change.
pub(crate) fn next(requeue: Option<Duration>) -> Action {
    match requeue {
        Some(after) => Action::requeue(after.max(MIN_REQUEUE)),
        None => Action::await_change(),
    }
}

/// Writes `status` for `workload` unless it equals the stored one, checked
/// against the resource version the workload was read at. Answers the
/// action to take: `next(requeue)` (with the written version, if any), a
/// conflict requeue, or waiting when the object is gone. Any other write
/// error is the caller's to report, with its workload and operation.
pub(crate) async fn publish_status(
    writer: &dyn WorkloadWriter,
    workload: &Workload,
    status: ObjectStatus,
    requeue: Option<Duration>,
) -> Result<Action, WriteError> {
    let action = next(requeue);
    let unchanged = match &workload.status {
        Some(stored) => *stored == status,
        None => status == ObjectStatus::default(),
    };
    if unchanged {
        return Ok(action);
    }
    match writer
        .update_status(
            workload.id().to_string(),
            workload.resource_version(),
            status,
        )
        .await
    {
        Ok(written) => Ok(action.wrote(written.resource_version())),
        Err(WriteError::Conflict { .. }) => Ok(Action::requeue(CONFLICT_REQUEUE)),
        Err(WriteError::NotFound(_)) => Ok(Action::await_change()),
        Err(other) => Err(other),
    }
}

/// What an error means for what comes next, decided once for every
/// runtime (kube-rs: every error variant says whether it is retryable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The runtime answered, and the same call may succeed later without a
    /// spec change: back off and retry.
    Retryable,
    /// Only a new spec helps (or the object is gone): reported, then held.
    Terminal,
    /// The runtime could not be reached: nothing is known of any workload,
    /// the status is `Unknown`, and the runner's outage probe waits it out.
    Unreachable,
}

impl ErrorClass {
    /// The class of a failure the runtime answered with `reason`.
    pub fn of(reason: FailureReason) -> ErrorClass {
        if reason.is_terminal() {
            ErrorClass::Terminal
        } else {
            ErrorClass::Retryable
        }
    }
}

/// An error of a runtime controller, classified: the runner and the kit
/// decide from the class, each runtime only says which class its errors
/// fall in.
pub trait Classify: std::fmt::Display {
    fn class(&self) -> ErrorClass;

    /// The failure reason a status reports for this error; by default a
    /// runtime error.
    fn reason(&self) -> FailureReason {
        FailureReason::RuntimeError
    }

    /// What happened, without the workload prefix: for a status. By
    /// default the error's own words.
    fn detail(&self) -> String {
        self.to_string()
    }
}

/// A start or create the runtime (or the node's policy) refused. An
/// unreachable runtime halts the reconcile as it is (the outage probe's to
/// wait out); anything else is a warning event ([`refusal_event`]) and a
/// failed start, which `count` records in the workload's memory (through
/// [`failed_start`]) and answers.
pub(crate) async fn refused_start<E: Classify>(
    events: &Recorder,
    id: &str,
    error: E,
    count: impl FnOnce(FailureReason, &str) -> Failed,
) -> Halt<E> {
    if error.class() == ErrorClass::Unreachable {
        return Halt::Error(error);
    }
    let (reason, detail) = (error.reason(), error.detail());
    tracing::warn!(%error, "the start failed");
    events
        .event(
            id,
            EventType::Warning,
            refusal_event(reason),
            detail.clone(),
        )
        .await;
    Halt::Failed(count(reason, &detail))
}

/// The reason of the event that tells of a refused start: `PolicyViolation`
/// when the node's policy refused it before the runtime was asked,
/// `Failed` when the runtime did.
pub(crate) fn refusal_event(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::PolicyViolation => "PolicyViolation",
        _ => "Failed",
    }
}

/// A status write that failed: retried unless the object left the store.
pub(crate) fn store_class(error: &WriteError) -> ErrorClass {
    match error {
        WriteError::NotFound(_) => ErrorClass::Terminal,
        _ => ErrorClass::Retryable,
    }
}

/// A failure to report, with when it is retried: `retry_in` from now,
/// at wall-clock `due_ms`; neither for a terminal failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failed {
    pub(crate) reason: FailureReason,
    pub(crate) detail: String,
    pub(crate) retry_in: Option<Duration>,
    pub(crate) due_ms: Option<i64>,
}

/// How a convergence stopped short of the desired state.
pub(crate) enum Halt<E> {
    /// A failure to report in status; retried after `retry_in` if set.
    Failed(Failed),
    /// The runtime failed outside what is reported as the workload's
    /// failure (unreachable, or an unexpected answer): the runtime's error
    /// back-off retries.
    Error(E),
}

impl Failed {
    /// A failure not retried on a timer: until the spec changes, or the
    /// runtime's next event or the resync.
    pub(crate) fn until_changed(reason: FailureReason, detail: impl Into<String>) -> Failed {
        Failed {
            reason,
            detail: detail.into(),
            retry_in: None,
            due_ms: None,
        }
    }

    /// A spec the controller cannot act on.
    pub(crate) fn invalid_spec(error: impl std::fmt::Display) -> Failed {
        Failed::until_changed(FailureReason::InvalidSpec, error.to_string())
    }

    /// How a runtime error that halted a reconcile is reported.
    pub(crate) fn of_error(error: &impl Classify) -> Failed {
        Failed::until_changed(error.reason(), error.detail())
    }
}

impl<E> From<Failed> for Halt<E> {
    fn from(failed: Failed) -> Self {
        Halt::Failed(failed)
    }
}

/// The last start failure while the back-off of failed starts runs, else
/// `None`: a start may go. A workload that never failed to start is never
/// held (its crash loop gates restarts, not starts). Reads the memory
/// without changing it, for a plan; the start that follows forgets a count
/// older than the policy's reset (`CrashLoop::gate`).
pub(crate) fn start_held(
    crash: &CrashLoop,
    last_failure: Option<&(FailureReason, String)>,
    policy: &CrashLoopPolicy,
    now: Instant,
) -> Option<Failed> {
    match (crash.peek(policy, now), last_failure) {
        (
            Gate::Closed {
                remaining, due_ms, ..
            },
            Some((reason, detail)),
        ) => Some(Failed {
            reason: *reason,
            detail: detail.clone(),
            retry_in: Some(remaining),
            due_ms: Some(due_ms),
        }),
        _ => None,
    }
}

/// Records a start or create the runtime refused, and answers what to
/// report (see the module's rules).
pub(crate) fn failed_start(
    crash: &mut CrashLoop,
    last_failure: &mut Option<(FailureReason, String)>,
    reason: FailureReason,
    detail: &str,
    policy: &CrashLoopPolicy,
    (now, now_ms): (Instant, i64),
) -> Failed {
    *last_failure = Some((reason, detail.to_string()));
    let (retry_in, due_ms) = if reason.is_terminal() {
        (None, None)
    } else {
        crash.start_failed(now, now_ms);
        match crash.gate(policy, now) {
            Gate::Closed {
                remaining, due_ms, ..
            } => (Some(remaining), Some(due_ms)),
            Gate::Open => (Some(policy.backoff.base), None),
        }
    };
    Failed {
        reason,
        detail: detail.to_string(),
        retry_in,
        due_ms,
    }
}

/// Checks an error-classification table: each operation and error gives
/// the expected failure reason.
#[cfg(test)]
pub(crate) fn assert_classified<O: std::fmt::Display + Copy, E: std::fmt::Display>(
    cases: impl IntoIterator<Item = (O, E, FailureReason)>,
    classify: impl Fn(O, &E) -> FailureReason,
) {
    for (operation, error, expected) in cases {
        assert_eq!(
            classify(operation, &error),
            expected,
            "{operation}: {error}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use persys_api::v1::ObjectMeta;

    /// A writer that answers every status write with one fixed result,
    /// fails every event write, and counts both.
    struct Answering {
        answer: Result<u64, WriteError>,
        writes: Mutex<u32>,
        events: Mutex<u32>,
    }

    impl WorkloadWriter for Answering {
        fn update_status(
            &self,
            id: String,
            _expected: u64,
            status: ObjectStatus,
        ) -> BoxFuture<'_, Result<Arc<Workload>, WriteError>> {
            *locked(&self.writes) += 1;
            let answer = self.answer.clone().map(|rv| {
                Arc::new(Workload {
                    metadata: Some(ObjectMeta {
                        id,
                        resource_version: rv,
                        ..Default::default()
                    }),
                    spec: None,
                    status: Some(status),
                })
            });
            Box::pin(async move { answer })
        }

        fn remove_finalizer(&self, _: String, _: String) -> BoxFuture<'_, Result<(), WriteError>> {
            Box::pin(async { Ok(()) })
        }

        fn record_event(
            &self,
            _: String,
            _: EventType,
            _: String,
            _: String,
        ) -> BoxFuture<'_, Result<(), WriteError>> {
            *locked(&self.events) += 1;
            Box::pin(async { Err(WriteError::Unavailable("down".into())) })
        }
    }

    fn writer(answer: Result<u64, WriteError>) -> Answering {
        Answering {
            answer,
            writes: Mutex::new(0),
            events: Mutex::new(0),
        }
    }

    fn workload(message: &str) -> Workload {
        Workload {
            metadata: Some(ObjectMeta {
                id: "web".into(),
                resource_version: 7,
                ..Default::default()
            }),
            spec: None,
            status: Some(ObjectStatus {
                message: message.into(),
                ..Default::default()
            }),
        }
    }

    fn status(message: &str) -> ObjectStatus {
        ObjectStatus {
            message: message.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_status_is_written_only_when_it_changed_and_each_write_outcome_has_its_action() {
        let second = Some(Duration::from_secs(1));
        // Unchanged: nothing written, the requested requeue stands.
        let w = writer(Ok(8));
        let action = publish_status(&w, &workload("up"), status("up"), second)
            .await
            .unwrap();
        assert_eq!((action.requeue_after, action.wrote), (second, None));
        assert_eq!(*locked(&w.writes), 0);
        // Changed: written, and the written version is reported.
        let action = publish_status(&w, &workload("up"), status("down"), second)
            .await
            .unwrap();
        assert_eq!((action.requeue_after, action.wrote), (second, Some(8)));
        assert_eq!(*locked(&w.writes), 1);
        // Lost a race: look again soon, whatever was asked.
        let w = writer(Err(WriteError::Conflict {
            id: "web".into(),
            expected: 7,
            actual: 9,
        }));
        let action = publish_status(&w, &workload("up"), status("down"), None)
            .await
            .unwrap();
        assert_eq!(action.requeue_after, Some(CONFLICT_REQUEUE));
        // Gone: wait for the delete to arrive as a change.
        let w = writer(Err(WriteError::NotFound("web".into())));
        let action = publish_status(&w, &workload("up"), status("down"), second)
            .await
            .unwrap();
        assert_eq!((action.requeue_after, action.wrote), (None, None));
        // Anything else is the caller's to report.
        let w = writer(Err(WriteError::Unavailable("disk".into())));
        assert_eq!(
            publish_status(&w, &workload("up"), status("down"), None)
                .await
                .unwrap_err(),
            WriteError::Unavailable("disk".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_starts_wait_the_doubling_back_off_and_a_terminal_one_waits_for_a_new_spec() {
        let policy = CrashLoopPolicy::default();
        let base = policy.backoff.base;
        let mut crash = CrashLoop::new(0);
        let mut last = None;
        let at = |_: ()| (Instant::now(), 1_000);
        // Never failed: starts are not held.
        assert_eq!(
            start_held(&crash, last.as_ref(), &policy, Instant::now()),
            None
        );
        // The first failure waits the base, and the start is held meanwhile.
        let reason = FailureReason::PortBindConflict;
        let failed = failed_start(&mut crash, &mut last, reason, "taken", &policy, at(()));
        assert_eq!(failed.retry_in, Some(base));
        assert_eq!(failed.due_ms, Some(1_000 + base.as_millis() as i64));
        let held = start_held(&crash, last.as_ref(), &policy, Instant::now()).unwrap();
        assert_eq!((held.reason, held.detail.as_str()), (reason, "taken"));
        // Once the wait is over the start may go; a second failure doubles it.
        tokio::time::advance(base).await;
        assert_eq!(
            start_held(&crash, last.as_ref(), &policy, Instant::now()),
            None
        );
        let failed = failed_start(&mut crash, &mut last, reason, "taken", &policy, at(()));
        assert_eq!(failed.retry_in, Some(2 * base));
        // A terminal failure is reported, not retried, and not counted.
        let mut fresh = CrashLoop::new(0);
        let mut last = None;
        let failed = failed_start(
            &mut fresh,
            &mut last,
            FailureReason::InvalidSpec,
            "bad",
            &policy,
            at(()),
        );
        assert_eq!((failed.retry_in, failed.due_ms), (None, None));
        assert_eq!(
            start_held(&fresh, last.as_ref(), &policy, Instant::now()),
            None,
            "a terminal failure does not hold the next start"
        );
    }

    #[test]
    fn a_requeue_is_never_shorter_than_the_floor() {
        assert_eq!(next(Some(Duration::ZERO)).requeue_after, Some(MIN_REQUEUE));
        assert_eq!(
            next(Some(Duration::from_secs(3))).requeue_after,
            Some(Duration::from_secs(3))
        );
        assert_eq!(next(None).requeue_after, None);
    }

    #[tokio::test]
    async fn a_failed_event_write_does_not_fail_the_reconcile() {
        let recorder = Recorder::new(Arc::new(writer(Ok(1))));
        recorder
            .event("web", EventType::Warning, "Failed", "boom".into())
            .await;
    }

    /// An error of a given class.
    #[derive(Debug)]
    struct Refusal(ErrorClass);

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused ({:?})", self.0)
        }
    }

    impl Classify for Refusal {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    #[tokio::test]
    async fn a_refused_start_is_told_and_counted_but_an_unreachable_runtime_is_neither() {
        let writer = Arc::new(writer(Ok(1)));
        let recorder = Recorder::new(writer.clone());
        let counted = Mutex::new(Vec::new());
        let count = |reason: FailureReason, detail: &str| {
            locked(&counted).push(detail.to_string());
            Failed {
                reason,
                detail: detail.to_string(),
                retry_in: None,
                due_ms: None,
            }
        };
        let halt = refused_start(&recorder, "web", Refusal(ErrorClass::Unreachable), count).await;
        assert!(matches!(
            halt,
            Halt::Error(Refusal(ErrorClass::Unreachable))
        ));
        assert_eq!((*locked(&writer.events), locked(&counted).len()), (0, 0));
        let halt = refused_start(&recorder, "web", Refusal(ErrorClass::Retryable), count).await;
        let Halt::Failed(failed) = halt else {
            panic!("a refusal is a failure to report");
        };
        assert_eq!(failed.reason, FailureReason::RuntimeError);
        assert_eq!(failed.detail, "refused (Retryable)");
        assert_eq!(*locked(&writer.events), 1, "a Failed event is recorded");
        assert_eq!(*locked(&counted), ["refused (Retryable)"]);
    }
}
