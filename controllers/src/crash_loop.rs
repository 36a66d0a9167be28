//! Kubelet's crash-loop rule, shared by the runtimes that restart what
//! stopped on its own (containers, compose services, guests): the first
//! restart is immediate, each further one waits a doubling back-off since
//! the previous start, and a start that held long enough forgets it all.
//! [`RetryGate`] is the same spacing for any repeated attempt (image pulls,
//! failed project ups).

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;

/// Crash-loop timing: kubelet's 10 s doubling to 5 min, forgotten after
/// 10 min without a restart.
#[derive(Debug, Clone, Copy)]
pub struct CrashLoopPolicy {
    pub backoff: Backoff,
    /// A start this long ago resets the backoff: the workload ran cleanly.
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

/// Whether an attempt may be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Back off: `delay` after the last attempt, so due in `remaining`, at
    /// wall-clock `due_ms`.
    Closed {
        delay: Duration,
        remaining: Duration,
        due_ms: i64,
    },
}

/// One point in time, monotonic for the arithmetic and wall-clock for the
/// status (`next_retry_at_ms`), so a status written twice is the same.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    at: Instant,
    wall_ms: i64,
}

/// Spaces out attempts at one thing: after `n` counted attempts the next
/// waits `backoff.nominal(n - 1)` since the last attempt; a last attempt
/// older than `reset_after` forgets the count.
#[derive(Debug, Clone, Default)]
pub struct RetryGate {
    /// Counted attempts since the last reset.
    attempts: u32,
    /// The last attempt, counted or not.
    last: Option<Stamp>,
}

impl RetryGate {
    /// Whether an attempt may be made at `now`.
    pub fn gate(&mut self, backoff: &Backoff, reset_after: Duration, now: Instant) -> Gate {
        let Some(last) = self.last else {
            return Gate::Open;
        };
        let since = now.saturating_duration_since(last.at);
        if since >= reset_after {
            self.attempts = 0;
        }
        if self.attempts == 0 {
            return Gate::Open;
        }
        let delay = backoff.nominal(self.attempts - 1);
        if since >= delay {
            return Gate::Open;
        }
        Gate::Closed {
            delay,
            remaining: delay - since,
            due_ms: last.wall_ms + delay.as_millis() as i64,
        }
    }

    /// What [`RetryGate::gate`] would answer at `now`, without forgetting
    /// a stale count: for a plan that only reads the memory.
    pub fn peek(&self, backoff: &Backoff, reset_after: Duration, now: Instant) -> Gate {
        self.clone().gate(backoff, reset_after, now)
    }

    /// An attempt that does not make the next one wait.
    pub fn attempted(&mut self, now: Instant, now_ms: i64) {
        self.last = Some(Stamp {
            at: now,
            wall_ms: now_ms,
        });
    }

    /// An attempt that makes the next one wait longer.
    pub fn counted(&mut self, now: Instant, now_ms: i64) {
        self.attempts = self.attempts.saturating_add(1);
        self.attempted(now, now_ms);
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// The crash-loop state of one workload, as kubelet keeps it: the first
/// restart after an exit is immediate; each further one waits the back-off
/// since the previous start, doubling; a start that held for `reset_after`
/// forgets it all. Failed starts (a port taken…) count as attempts.
#[derive(Debug, Clone, Default)]
pub struct CrashLoop {
    gate: RetryGate,
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

    /// Whether a start may happen at `now`.
    pub fn gate(&mut self, policy: &CrashLoopPolicy, now: Instant) -> Gate {
        self.gate.gate(&policy.backoff, policy.reset_after, now)
    }

    /// What [`CrashLoop::gate`] would answer at `now`, changing nothing.
    pub fn peek(&self, policy: &CrashLoopPolicy, now: Instant) -> Gate {
        self.gate.peek(&policy.backoff, policy.reset_after, now)
    }

    /// A first start (or one asked for after a requested stop): no back-off
    /// yet.
    pub fn started(&mut self, now: Instant, now_ms: i64) {
        self.gate.attempted(now, now_ms);
    }

    /// A restart of what stopped on its own (a container exited, a guest
    /// shut down).
    pub fn restarted(&mut self, now: Instant, now_ms: i64) {
        self.restarts = self.restarts.saturating_add(1);
        self.gate.counted(now, now_ms);
    }

    /// A start (or create) that the runtime refused.
    pub fn start_failed(&mut self, now: Instant, now_ms: i64) {
        self.gate.counted(now, now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CrashLoopPolicy {
        CrashLoopPolicy::default()
    }

    #[test]
    fn crash_loop_first_restart_is_immediate_then_waits_double_each_time() {
        let policy = policy();
        let t0 = Instant::now();
        let mut state = CrashLoop::new(0);
        state.started(t0, 0);
        assert_eq!(
            state.gate(&policy, t0),
            Gate::Open,
            "first exit restarts at once"
        );
        state.restarted(t0, 0);
        let mut at = t0;
        let mut at_ms = 0;
        for expected in [10, 20, 40, 80, 160, 300, 300] {
            let delay = Duration::from_secs(expected);
            match state.gate(&policy, at + Duration::from_secs(1)) {
                Gate::Closed {
                    remaining, due_ms, ..
                } => {
                    assert_eq!(remaining, delay - Duration::from_secs(1));
                    assert_eq!(due_ms, at_ms + delay.as_millis() as i64);
                }
                Gate::Open => panic!("expected a {expected}s back-off"),
            }
            at += delay;
            at_ms += delay.as_millis() as i64;
            assert_eq!(state.gate(&policy, at), Gate::Open);
            state.restarted(at, at_ms);
        }
        assert_eq!(state.restarts(), 8);
    }

    #[test]
    fn crash_loop_resets_after_ten_minutes_of_running() {
        let policy = policy();
        let t0 = Instant::now();
        let mut state = CrashLoop::new(3);
        for _ in 0..5 {
            state.restarted(t0, 0);
        }
        assert!(matches!(
            state.gate(&policy, t0 + Duration::from_secs(100)),
            Gate::Closed { .. }
        ));
        assert_eq!(
            state.gate(&policy, t0 + Duration::from_secs(600)),
            Gate::Open
        );
        assert_eq!(state.gate.attempts(), 0);
        state.restarted(t0 + Duration::from_secs(600), 600_000);
        assert!(matches!(
            state.gate(&policy, t0 + Duration::from_secs(601)),
            Gate::Closed { remaining, .. } if remaining == Duration::from_secs(9)
        ));
        assert_eq!(state.restarts(), 9, "the count carries on");
    }

    #[test]
    fn peeking_answers_like_the_gate_but_forgets_nothing() {
        let policy = policy();
        let t0 = Instant::now();
        let mut state = CrashLoop::new(0);
        state.restarted(t0, 0);
        state.restarted(t0, 0);
        let late = t0 + Duration::from_secs(600);
        assert_eq!(state.peek(&policy, late), Gate::Open);
        assert_eq!(state.gate.attempts(), 2, "a peek keeps the count");
        assert_eq!(state.gate(&policy, late), Gate::Open);
        assert_eq!(state.gate.attempts(), 0, "the gate forgets it");
    }

    #[test]
    fn crash_loop_counts_failed_starts_as_attempts_but_not_restarts() {
        let policy = policy();
        let t0 = Instant::now();
        let mut state = CrashLoop::new(0);
        state.start_failed(t0, 0);
        assert!(matches!(state.gate(&policy, t0), Gate::Closed { .. }));
        assert_eq!(state.restarts(), 0);
    }
}
