//! Exponential backoff with jitter, and its per-key bookkeeping.

use std::collections::HashMap;
use std::time::Duration;

/// `base · 2^attempt`, capped, stretched by up to `jitter` (a fraction) so
/// many keys failing together do not retry in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub jitter: f64,
}

impl Backoff {
    /// Error backoff of the work queue: 1 s doubling to 5 min.
    pub const ERRORS: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(300),
        jitter: 0.1,
    };

    /// Probes of a runtime that could not be reached: 1 s doubling to 30 s,
    /// so a restarted engine is noticed within half a minute.
    pub const OUTAGE_PROBE: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        jitter: 0.1,
    };

    /// Crash-loop backoff, as kubelet does it: 10 s doubling to 5 min.
    pub const CRASH_LOOP: Backoff = Backoff {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(300),
        jitter: 0.0,
    };

    /// The delay before retry number `attempt` (0 for the first retry),
    /// without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let factor = 1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX);
        let nanos = (self.base.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.cap)
    }

    /// The delay before retry number `attempt`, with jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal(attempt);
        if self.jitter <= 0.0 {
            return nominal;
        }
        nominal.mul_f64(1.0 + fastrand::f64() * self.jitter)
    }
}

/// Failure counts per key: the delay grows with each failure of a key and
/// resets when it succeeds.
#[derive(Debug)]
pub struct KeyedBackoff {
    backoff: Backoff,
    failures: HashMap<String, u32>,
}

impl KeyedBackoff {
    pub fn new(backoff: Backoff) -> Self {
        KeyedBackoff {
            backoff,
            failures: HashMap::new(),
        }
    }

    /// Counts a failure of `key` and returns how long to wait before retrying.
    pub fn failed(&mut self, key: &str) -> Duration {
        let attempt = self.failures.entry(key.to_string()).or_insert(0);
        let delay = self.backoff.delay(*attempt);
        *attempt = attempt.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key`.
    pub fn succeeded(&mut self, key: &str) {
        self.failures.remove(key);
    }

    pub fn failures(&self, key: &str) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_backoff_doubles_from_one_second_to_a_five_minute_cap() {
        let b = Backoff::ERRORS;
        let nominal: Vec<u64> = (0..12).map(|a| b.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_only_stretches_within_its_fraction() {
        let b = Backoff::ERRORS;
        for attempt in 0..10 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= b.nominal(attempt));
                assert!(d <= b.nominal(attempt).mul_f64(1.1));
            }
        }
    }

    #[test]
    fn keyed_backoff_grows_per_key_and_resets_on_success() {
        let mut keyed = KeyedBackoff::new(Backoff {
            jitter: 0.0,
            ..Backoff::ERRORS
        });
        assert_eq!(keyed.failed("a"), Duration::from_secs(1));
        assert_eq!(keyed.failed("a"), Duration::from_secs(2));
        assert_eq!(keyed.failed("b"), Duration::from_secs(1));
        assert_eq!(keyed.failed("a"), Duration::from_secs(4));
        keyed.succeeded("a");
        assert_eq!(keyed.failures("a"), 0);
        assert_eq!(keyed.failed("a"), Duration::from_secs(1));
    }

    #[test]
    fn crash_loop_backoff_is_ten_seconds_doubling_to_five_minutes() {
        let b = Backoff::CRASH_LOOP;
        let nominal: Vec<u64> = (0..7).map(|a| b.nominal(a).as_secs()).collect();
        assert_eq!(nominal, [10, 20, 40, 80, 160, 300, 300]);
    }
}
