//! Restarts are the agent's job, not the engine's: containers are created
//! with the engine's restart policy `no`, and this module decides whether an
//! exited container starts again and when, with kubelet's crash-loop rule.

use std::time::Duration;

use persys_api::v1::ContainerSpec;
use tokio::time::Instant;

use crate::backoff::Backoff;

/// What the spec's `restart_policy` asks for when a container exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartRule {
    /// Restart whatever the exit code: `always`, `unless-stopped` (the
    /// desired state is how a workload is stopped) and the default.
    Always,
    /// Restart after a non-zero exit code; with `max_restarts` > 0, at most
    /// that many times.
    OnFailure { max_restarts: u32 },
    /// `no`: an exited container stays exited.
    Never,
}

/// What becomes of an exited container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitDecision {
    /// Start it again (once the crash-loop backoff allows).
    Restart,
    /// It finished successfully and is not restarted.
    Completed,
    /// It failed and is not restarted: the policy is `no`, or on-failure's
    /// limit was reached.
    GaveUp { limit_reached: bool },
}

impl RestartRule {
    /// The policy name alone (`max_retry_count` applies separately).
    pub fn parse(policy: &str) -> Option<RestartRule> {
        match policy.to_ascii_lowercase().as_str() {
            "" | "always" | "unless-stopped" => Some(RestartRule::Always),
            "on-failure" => Some(RestartRule::OnFailure { max_restarts: 0 }),
            "no" | "never" => Some(RestartRule::Never),
            _ => None,
        }
    }

    /// The rule of a (validated) spec.
    pub fn of(spec: &ContainerSpec) -> RestartRule {
        let Some(policy) = &spec.restart_policy else {
            return RestartRule::Always;
        };
        match RestartRule::parse(&policy.policy) {
            Some(RestartRule::OnFailure { .. }) => RestartRule::OnFailure {
                max_restarts: policy.max_retry_count.max(0) as u32,
            },
            Some(rule) => rule,
            None => RestartRule::Always,
        }
    }

    /// Whether a container that exited with `exit_code`, after `restarts`
    /// restarts of its spec, is started again.
    pub fn decide(&self, exit_code: i64, restarts: i32) -> ExitDecision {
        match *self {
            RestartRule::Always => ExitDecision::Restart,
            RestartRule::Never if exit_code == 0 => ExitDecision::Completed,
            RestartRule::Never => ExitDecision::GaveUp {
                limit_reached: false,
            },
            RestartRule::OnFailure { .. } if exit_code == 0 => ExitDecision::Completed,
            RestartRule::OnFailure { max_restarts }
                if max_restarts > 0 && restarts >= max_restarts as i32 =>
            {
                ExitDecision::GaveUp {
                    limit_reached: true,
                }
            }
            RestartRule::OnFailure { .. } => ExitDecision::Restart,
        }
    }
}

/// Crash-loop timing: kubelet's 10 s doubling to 5 min, forgotten after
/// 10 min without a restart.
#[derive(Debug, Clone, Copy)]
pub struct CrashLoopPolicy {
    pub backoff: Backoff,
    /// A start this long ago resets the backoff: the container ran cleanly.
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

    /// True while a back-off is building up.
    pub fn is_backing_off(&self) -> bool {
        self.gate.attempts() > 0
    }

    /// Whether a start may happen at `now`.
    pub fn gate(&mut self, policy: &CrashLoopPolicy, now: Instant) -> Gate {
        self.gate.gate(&policy.backoff, policy.reset_after, now)
    }

    /// The first start of a new container: no back-off yet.
    pub fn started(&mut self, now: Instant, now_ms: i64) {
        self.gate.attempted(now, now_ms);
    }

    /// A restart of a container that had exited.
    pub fn restarted(&mut self, now: Instant, now_ms: i64) {
        self.restarts = self.restarts.saturating_add(1);
        self.gate.counted(now, now_ms);
    }

    /// A start (or create) that the engine refused.
    pub fn start_failed(&mut self, now: Instant, now_ms: i64) {
        self.gate.counted(now, now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::RestartPolicy;

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
        assert!(!state.is_backing_off());
        state.restarted(t0 + Duration::from_secs(600), 600_000);
        assert!(matches!(
            state.gate(&policy, t0 + Duration::from_secs(601)),
            Gate::Closed { remaining, .. } if remaining == Duration::from_secs(9)
        ));
        assert_eq!(state.restarts(), 9, "the count carries on");
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

    #[test]
    fn restart_rules_follow_the_docker_policy_names() {
        let spec = |policy: &str, max: i32| ContainerSpec {
            restart_policy: Some(RestartPolicy {
                policy: policy.into(),
                max_retry_count: max,
            }),
            ..Default::default()
        };
        assert_eq!(
            RestartRule::of(&ContainerSpec::default()),
            RestartRule::Always
        );
        assert_eq!(
            RestartRule::of(&spec("unless-stopped", 0)),
            RestartRule::Always
        );
        assert_eq!(
            RestartRule::of(&spec("no", 0)).decide(0, 0),
            ExitDecision::Completed
        );
        assert_eq!(
            RestartRule::of(&spec("no", 0)).decide(1, 0),
            ExitDecision::GaveUp {
                limit_reached: false
            }
        );
        let on_failure = RestartRule::of(&spec("on-failure", 2));
        assert_eq!(on_failure.decide(0, 0), ExitDecision::Completed);
        assert_eq!(on_failure.decide(1, 1), ExitDecision::Restart);
        assert_eq!(
            on_failure.decide(1, 2),
            ExitDecision::GaveUp {
                limit_reached: true
            }
        );
        assert_eq!(RestartRule::Always.decide(0, 100), ExitDecision::Restart);
    }
}
