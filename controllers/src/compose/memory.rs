//! What the Compose controller remembers of each workload between
//! reconciles, and the back-offs a plan judges it by.

use persys_api::FailureReason;

use super::config::ComposeConfig;
use super::desired::Desired;
use crate::backoff::Backoff;
use crate::crash_loop::{CrashLoop, CrashLoopPolicy, RetryGate};

/// A failed compose command, remembered to report it again while its
/// back-off runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) reason: FailureReason,
    pub(crate) message: String,
    pub(crate) detail: String,
}

/// What the controller remembers of one workload between reconciles. None
/// of it needs to survive an agent restart: the spec hash brought up is on
/// disk, back-offs start afresh, and the restart count is carried over from
/// the stored status.
#[derive(Debug, Clone, Default)]
pub(crate) struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    pub(crate) spec_hash: String,
    /// Repairs of services that stopped running.
    pub(crate) crash: CrashLoop,
    /// Compose commands that failed.
    pub(crate) failures: RetryGate,
    pub(crate) last_failure: Option<Failure>,
}

impl Memory {
    /// Nothing remembered yet: this process has not reconciled the
    /// workload, so a project found running is adopted.
    pub(crate) fn is_first_sight(&self) -> bool {
        self.spec_hash.is_empty()
    }

    /// The memory `desired` is judged by: this one, or a fresh one for a
    /// new spec (with the stored restart count on first sight). While the
    /// workload is desired stopped its crash loop starts over: a later
    /// start is a fresh start, not a repair.
    pub(crate) fn for_spec(&self, desired: &Desired) -> Memory {
        let mut memory = if self.spec_hash == desired.hash {
            self.clone()
        } else {
            let carried = if self.is_first_sight() {
                desired.restarts
            } else {
                0
            };
            Memory {
                spec_hash: desired.hash.clone(),
                crash: CrashLoop::new(carried),
                ..Default::default()
            }
        };
        if desired.stopped {
            memory.crash = CrashLoop::new(memory.crash.restarts());
        }
        memory
    }
}

/// The back-offs a plan applies, both the compose controller's own:
/// - `crash_loop`: services that stopped running are repaired by `up` on
///   kubelet's crash loop (the first repair at once, then a doubling gap
///   since the previous one, forgotten after `reset_after`);
/// - `failure_backoff`: a failed compose command (`up` or `stop`) holds
///   the next one for this back-off since the failure, doubling with each
///   failure, never forgotten with time: only a successful command or a
///   new spec ends it. Not `kit::failed_start`: its own gate and base
///   (1 s, not the crash loop's 10 s), `stop` failures count too, and a
///   failure that compose's stderr reads as terminal is counted and
///   retried like any other, its error also going to the runtime's
///   back-off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) crash_loop: CrashLoopPolicy,
    pub(crate) failure_backoff: Backoff,
}

impl Rules {
    pub(crate) fn of(config: &ComposeConfig) -> Rules {
        Rules {
            crash_loop: config.crash_loop,
            failure_backoff: config.failure_backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use crate::crash_loop::{CrashLoopPolicy, Gate};

    use super::*;

    #[test]
    fn a_new_spec_forgets_what_the_old_one_left_and_carries_restarts_only_on_first_sight() {
        let running = Desired::example("h2", false);
        let fresh = Memory::default().for_spec(&running);
        assert_eq!(
            (fresh.spec_hash.as_str(), fresh.crash.restarts()),
            ("h2", 4)
        );
        let t0 = Instant::now();
        let mut seen = fresh.clone();
        seen.crash.restarted(t0, 0);
        seen.failures.counted(t0, 0);
        seen.last_failure = Some(Failure {
            reason: FailureReason::ImagePullFailed,
            message: "pull".into(),
            detail: "pull".into(),
        });
        let backing_off = |crash: &CrashLoop| {
            matches!(
                crash.peek(&CrashLoopPolicy::default(), t0),
                Gate::Closed { .. }
            )
        };
        let kept = seen.for_spec(&running);
        assert!(backing_off(&kept.crash) && kept.last_failure.is_some());
        assert_eq!(kept.crash.restarts(), 5);
        let renewed = seen.for_spec(&Desired::example("h3", false));
        assert_eq!(
            (renewed.spec_hash.as_str(), renewed.crash.restarts()),
            ("h3", 0)
        );
        assert!(!backing_off(&renewed.crash) && renewed.failures.attempts() == 0);
        assert!(renewed.last_failure.is_none());
        // Desired stopped: the crash loop starts over, the count and the
        // failure stay.
        let stopped = seen.for_spec(&Desired::example("h2", true));
        assert!(!backing_off(&stopped.crash) && stopped.last_failure.is_some());
        assert_eq!(stopped.crash.restarts(), 5);
    }
}
