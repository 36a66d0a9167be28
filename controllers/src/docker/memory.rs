//! What the Docker controller remembers of each workload between
//! reconciles: the plan reads it, acting updates it.

use std::time::Duration;

use tokio::time::Instant;

use super::adopt::Adoption;
use super::errors::FailureReason;
use crate::backoff::Backoff;
use crate::crash_loop::{CrashLoop, CrashLoopPolicy, Gate, RetryGate};
use crate::kit::{self, Failed};

/// What the controller remembers of one workload between reconciles. None of
/// it needs to survive an agent restart: kubelet forgets its back-offs too,
/// and the restart count is carried over from the stored status.
#[derive(Debug, Default, Clone)]
pub(crate) struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    pub(crate) spec_hash: String,
    pub(crate) crash: CrashLoop,
    /// Pull attempts of `pull_image`.
    pub(crate) pull: RetryGate,
    pub(crate) pull_image: String,
    /// Why the last pull, create or start failed, reported while backing off.
    pub(crate) last_failure: Option<(FailureReason, String)>,
    /// The spec failed in a way no retry fixes (the engine answered 400).
    pub(crate) terminal: Option<(FailureReason, String)>,
    /// The Go agent's container adopted for this spec, until its record is
    /// in the stored status.
    pub(crate) adopted: Option<Adoption>,
}

impl Memory {
    /// Makes this the memory of spec `hash`: a new spec starts afresh, and a
    /// workload this process has not seen carries `restarts` (from its
    /// stored status) over. True on that first sight.
    pub(crate) fn renew(&mut self, hash: &str, restarts: i32) -> bool {
        let first_sight = self.spec_hash.is_empty();
        if self.spec_hash != hash {
            *self = Memory {
                spec_hash: hash.to_string(),
                crash: CrashLoop::new(if first_sight { restarts } else { 0 }),
                ..Default::default()
            };
        }
        first_sight
    }

    /// The pull back-off of another image does not hold `image`.
    fn pulling(&mut self, image: &str) {
        if self.pull_image != image {
            self.pull_image = image.to_string();
            self.pull = RetryGate::default();
        }
    }

    /// `image` was pulled: its back-off, and the failure it reported, are
    /// over.
    pub(crate) fn pulled(&mut self, image: &str) {
        self.pulling(image);
        self.pull = RetryGate::default();
        self.last_failure = None;
    }

    /// A pull of `image` failed (or its policy forbids it): the next waits
    /// the pull back-off, and the failure is reported meanwhile. A terminal
    /// failure (the registry refused the credentials) holds every pull and
    /// start until a new spec.
    pub(crate) fn pull_failed(
        &mut self,
        image: &str,
        (reason, detail): (FailureReason, String),
        backoff: &Backoff,
        (now, now_ms): (Instant, i64),
    ) -> Failed {
        self.pulling(image);
        if reason.is_terminal() {
            self.terminal = Some((reason, detail.clone()));
            self.last_failure = Some((reason, detail.clone()));
            return Failed::until_changed(reason, detail);
        }
        self.pull.counted(now, now_ms);
        self.last_failure = Some((reason, detail.clone()));
        let (retry_in, due_ms) = match self.pull.gate(backoff, Duration::MAX, now) {
            Gate::Closed {
                remaining, due_ms, ..
            } => (Some(remaining), Some(due_ms)),
            Gate::Open => (Some(Duration::ZERO), None),
        };
        Failed {
            reason,
            detail,
            retry_in,
            due_ms,
        }
    }

    /// A start the plan let through begins from the count the gate would
    /// have left: one older than the policy's reset is forgotten.
    pub(crate) fn forget_stale_attempts(&mut self, policy: &CrashLoopPolicy, now: Instant) {
        self.crash.gate(policy, now);
    }

    /// A create or start the engine refused: a terminal failure holds
    /// every start until a new spec; the kit's policy says when to retry.
    pub(crate) fn start_failed(
        &mut self,
        reason: FailureReason,
        detail: &str,
        policy: &CrashLoopPolicy,
        now: (Instant, i64),
    ) -> Failed {
        if reason.is_terminal() {
            self.terminal = Some((reason, detail.to_string()));
        }
        let (crash, last) = (&mut self.crash, &mut self.last_failure);
        kit::failed_start(crash, last, reason, detail, policy, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_spec_starts_its_memory_afresh_and_the_first_sight_carries_the_restart_count() {
        let mut memory = Memory::default();
        assert!(memory.renew("h1", 4), "the first look is a first sight");
        assert_eq!(memory.crash.restarts(), 4, "the stored count carries over");
        memory.terminal = Some((FailureReason::InvalidSpec, "bad".into()));
        memory.pulled("app:1");
        assert!(!memory.renew("h1", 9), "a second look is not");
        assert_eq!(memory.crash.restarts(), 4, "the same spec keeps its count");
        assert!(memory.terminal.is_some(), "and its terminal failure");
        assert!(!memory.renew("h2", 9));
        assert_eq!(memory.crash.restarts(), 0, "a new spec counts from zero");
        assert_eq!(memory.terminal, None, "and may run again");
        assert_eq!(memory.pull_image, "", "and pulls afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_pull_holds_every_later_pull_until_a_new_spec() {
        let backoff = Backoff {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(300),
            jitter: 0.0,
        };
        let mut memory = Memory::default();
        memory.renew("h1", 0);
        let refused = (
            FailureReason::ImagePullUnauthorized,
            "unauthorized: authentication required".to_string(),
        );
        let failed = memory.pull_failed("r:5000/app:1", refused, &backoff, (Instant::now(), 0));
        assert_eq!((failed.retry_in, failed.due_ms), (None, None));
        assert_eq!(
            memory.terminal.as_ref().map(|t| t.0),
            Some(FailureReason::ImagePullUnauthorized)
        );
        // An unreachable registry, by contrast, is retried on the back-off.
        let mut other = Memory::default();
        let failed = other.pull_failed(
            "r:5000/app:1",
            (FailureReason::ImagePullFailed, "no such host".into()),
            &backoff,
            (Instant::now(), 0),
        );
        assert_eq!(failed.retry_in, Some(backoff.base));
        assert_eq!(other.terminal, None);
        memory.renew("h2", 0);
        assert_eq!(memory.terminal, None, "a new spec pulls again");
    }
}
