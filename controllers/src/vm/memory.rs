//! What the VM controller remembers of one workload between reconciles.

use tokio::time::Instant;

use super::errors::FailureReason;
use crate::crash_loop::CrashLoop;

/// The attempt memory of one workload. None of it needs to survive an
/// agent restart: a shutdown in progress starts over (ACPI again, a full
/// timeout), back-offs are forgotten as kubelet forgets them, and the
/// restart count comes back from the stored status.
#[derive(Debug, Clone, Default)]
pub(crate) struct Memory {
    /// The spec the state below belongs to: a new spec starts afresh.
    /// Empty until the first look since the agent started.
    pub(crate) spec_hash: String,
    /// Restarts of a guest that stopped on its own, and failed starts.
    pub(crate) crash: CrashLoop,
    /// When the ACPI shutdown in progress was asked for.
    pub(crate) shutdown_since: Option<Instant>,
    /// Why the last define or start failed, reported while backing off.
    pub(crate) last_failure: Option<(FailureReason, String)>,
    /// The Go agent's domain was looked for since the agent started (or
    /// since the spec changed).
    pub(crate) go_checked: bool,
    /// The name of the Go agent's domain adopted here, until the status
    /// records it; kept across spec changes.
    pub(crate) adopted_name: Option<String>,
}

impl Memory {
    /// Starts afresh for a spec not seen before, carrying the stored
    /// restart count over an agent restart only. Answers whether this is
    /// the first look since the agent started: every domain is then
    /// searched for the workload's marks, and what is found is adopted.
    pub(crate) fn track(&mut self, spec_hash: &str, stored_restarts: i32) -> bool {
        let first_look = self.spec_hash.is_empty();
        if self.spec_hash != spec_hash {
            let carried = if first_look { stored_restarts } else { 0 };
            *self = Memory {
                spec_hash: spec_hash.to_string(),
                crash: CrashLoop::new(carried),
                adopted_name: self.adopted_name.take(),
                ..Default::default()
            };
        }
        first_look
    }

    /// The workload is to stay stopped: a later start is a fresh start,
    /// not a crash-loop restart, and no failed start holds it.
    pub(crate) fn forget_starts(&mut self) {
        self.crash = CrashLoop::new(self.crash.restarts());
        self.last_failure = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_spec_starts_afresh_and_only_the_first_look_carries_the_stored_restarts() {
        let mut memory = Memory::default();
        assert!(memory.track("h1", 4), "the first look");
        assert_eq!(memory.crash.restarts(), 4);
        memory.shutdown_since = Some(Instant::now());
        assert!(!memory.track("h1", 9), "the same spec again");
        assert_eq!(memory.crash.restarts(), 4);
        assert!(
            memory.shutdown_since.is_some(),
            "same spec: nothing forgotten"
        );
        assert!(!memory.track("h2", 9));
        assert_eq!(memory.crash.restarts(), 0, "a new spec counts anew");
        assert_eq!(memory.shutdown_since, None);
    }
}
