//! Restarts of guests that stopped on their own, spaced out as kubelet
//! spaces out container restarts.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// Crash-loop timing: kubelet's 10 s doubling to 5 min, forgotten after
/// 10 min of running.
#[derive(Debug, Clone, Copy)]
pub struct CrashLoopPolicy {
    pub backoff: Backoff,
    /// A start this long ago resets the back-off: the guest ran cleanly.
    pub reset_after: Duration,
}

impl Default for CrashLoopPolicy {
    fn default() -> Self {
        CrashLoopPolicy {
            backoff: Backoff::CRASH_LOOP,
            reset_after: Duration::from_secs(600),
        }
    }
}

/// Whether a start may be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Back off: `delay` after the last start, so due in `remaining`, at
    /// wall-clock `due_ms`.
    Closed {
        delay: Duration,
        remaining: Duration,
        due_ms: i64,
    },
}

/// The crash-loop state of one workload: the first restart after a stop is
/// immediate; each further one waits the back-off since the previous start,
/// doubling; a start that held for `reset_after` forgets it all. A start
/// that failed counts like a restart.
#[derive(Debug, Clone, Default)]
pub struct CrashLoop {
    /// Restarts (and failed starts) since the last reset.
    attempts: u32,
    /// The last start: monotonic for the arithmetic, wall-clock for status.
    last_start: Option<(Instant, i64)>,
    /// Restarts of the current spec: the status's `restart_count`.
    restarts: i32,
}

impl CrashLoop {
    /// A fresh state; `restarts` carries the count over an agent restart.
    pub fn new(restarts: i32) -> Self {
        CrashLoop {
            restarts: restarts.max(0),
            ..Default::default()
        }
    }

    pub fn restarts(&self) -> i32 {
        self.restarts
    }

    /// Whether a (re)start may be made at `now`.
    pub fn gate(&mut self, policy: &CrashLoopPolicy, now: Instant) -> Gate {
        let Some((at, wall_ms)) = self.last_start else {
            return Gate::Open;
        };
        let since = now.saturating_duration_since(at);
        if since >= policy.reset_after {
            self.attempts = 0;
        }
        if self.attempts == 0 {
            return Gate::Open;
        }
        let delay = policy.backoff.nominal(self.attempts - 1);
        if since >= delay {
            return Gate::Open;
        }
        Gate::Closed {
            delay,
            remaining: delay - since,
            due_ms: wall_ms + delay.as_millis() as i64,
        }
    }

    /// A start asked for (first start, or start after a requested stop):
    /// does not count.
    pub fn started(&mut self, now: Instant, now_ms: i64) {
        self.last_start = Some((now, now_ms));
    }

    /// A restart of a guest that stopped on its own.
    pub fn restarted(&mut self, now: Instant, now_ms: i64) {
        self.attempts = self.attempts.saturating_add(1);
        self.restarts = self.restarts.saturating_add(1);
        self.last_start = Some((now, now_ms));
    }

    /// A start that failed: the next attempt waits.
    pub fn start_failed(&mut self, now: Instant, now_ms: i64) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_start = Some((now, now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CrashLoopPolicy {
        CrashLoopPolicy {
            backoff: Backoff {
                base: Duration::from_secs(10),
                cap: Duration::from_secs(300),
                jitter: 0.0,
            },
            reset_after: Duration::from_secs(600),
        }
    }

    #[test]
    fn the_first_restart_is_immediate_then_restarts_back_off_doubling() {
        let policy = policy();
        let mut crash = CrashLoop::new(0);
        let t0 = Instant::now();
        crash.started(t0, 0);
        assert_eq!(crash.gate(&policy, t0), Gate::Open);
        crash.restarted(t0, 0);
        assert_eq!(crash.restarts(), 1);
        match crash.gate(&policy, t0 + Duration::from_secs(4)) {
            Gate::Closed {
                delay, remaining, ..
            } => {
                assert_eq!(delay, Duration::from_secs(10));
                assert_eq!(remaining, Duration::from_secs(6));
            }
            Gate::Open => panic!("the second restart must wait"),
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(crash.gate(&policy, t1), Gate::Open);
        crash.restarted(t1, 10_000);
        match crash.gate(&policy, t1) {
            Gate::Closed { delay, due_ms, .. } => {
                assert_eq!(delay, Duration::from_secs(20));
                assert_eq!(due_ms, 30_000);
            }
            Gate::Open => panic!("the third restart must wait longer"),
        }
    }

    #[test]
    fn a_guest_that_ran_long_enough_forgets_its_back_off_but_not_its_count() {
        let policy = policy();
        let mut crash = CrashLoop::new(3);
        let t0 = Instant::now();
        crash.restarted(t0, 0);
        crash.restarted(t0, 0);
        let later = t0 + Duration::from_secs(601);
        assert_eq!(crash.gate(&policy, later), Gate::Open);
        crash.restarted(later, 0);
        assert_eq!(crash.restarts(), 6);
        assert!(matches!(
            crash.gate(&policy, later),
            Gate::Closed { delay, .. } if delay == Duration::from_secs(10)
        ));
    }

    #[test]
    fn failed_starts_wait_but_do_not_count_as_restarts() {
        let policy = policy();
        let mut crash = CrashLoop::new(0);
        let t0 = Instant::now();
        crash.start_failed(t0, 0);
        assert_eq!(crash.restarts(), 0);
        assert!(matches!(crash.gate(&policy, t0), Gate::Closed { .. }));
    }
}
