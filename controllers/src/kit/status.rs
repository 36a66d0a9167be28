//! The parts of a workload's status every runtime writes the same way.
//!
//! A status is built from the previous one, so condition transition times
//! survive, and from nothing that changes by itself between two reconciles,
//! so a reconcile that changes nothing writes nothing. Each runtime maps its
//! own outcome onto the states below; what differs between runtimes is a
//! parameter here, never a copy there.

use std::collections::BTreeMap;

use persys_api::v1::{ActualState, ObjectStatus};
use persys_api::{CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, FailureReason};

/// `last_error` holds at most this many bytes.
pub(crate) const MAX_LAST_ERROR: usize = 4096;

/// The status fact (and `WorkloadStatus` metadata key) saying whether the
/// workload is ready: `true` or `false`.
pub(crate) const READY_FACT: &str = "ready";

/// Whether a running workload serves: its readiness probe, else its
/// image's HEALTHCHECK, else running is ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Readiness {
    #[default]
    Ready,
    /// Running, not serving: `reason` names the check
    /// (`ReadinessProbeFailed`), `message` is its output.
    NotReady { reason: String, message: String },
}

/// A status being built for one reconcile.
pub(crate) struct StatusBuilder {
    status: ObjectStatus,
    /// Whether the runtime reports the `Progressing` condition. Compose
    /// does: its `up` brings services up one by one, and an operator wants
    /// to tell "still coming up" from "stuck". A container or a guest is up
    /// or not, so Docker and VM leave the condition out.
    progressing: bool,
    /// Whether `message` is cut to this many bytes. Compose messages quote
    /// its output, which can run to pages.
    max_message: Option<usize>,
}

impl StatusBuilder {
    /// Starts from `previous` for a reconcile of `generation`: the failure
    /// fields are cleared, and set again only by a failure.
    pub(crate) fn new(previous: &ObjectStatus, generation: i64, restarts: i32) -> Self {
        let mut status = previous.clone();
        status.observed_generation = generation;
        status.restart_count = restarts;
        status.next_retry_at_ms = 0;
        status.failure_reason.clear();
        status.retry_terminal = false;
        status.last_error.clear();
        StatusBuilder {
            status,
            progressing: false,
            max_message: None,
        }
    }

    /// Reports the `Progressing` condition too.
    pub(crate) fn with_progressing(mut self) -> Self {
        self.progressing = true;
        self
    }

    /// Cuts `message` to at most `max` bytes.
    pub(crate) fn with_max_message(mut self, max: usize) -> Self {
        self.max_message = Some(max);
        self
    }

    /// What the runtime holds for the workload, as just observed. Not
    /// called when the runtime could not be reached: what was last known
    /// stays.
    pub(crate) fn observed(&mut self, runtime_ref: String, facts: BTreeMap<String, String>) {
        self.status.runtime_ref = runtime_ref;
        self.status.facts = facts;
    }

    /// The object under its runtime reference, its facts unchanged.
    pub(crate) fn runtime_ref(&mut self, runtime_ref: String) {
        self.status.runtime_ref = runtime_ref;
    }

    /// Runs, as desired.
    pub(crate) fn running(mut self, message: &str) -> ObjectStatus {
        self.settle(ActualState::Running, message);
        self.conditions((true, "Running", ""), (false, "Running"), (false, ""));
        self.status
    }

    /// Runs, as desired, but is not ready: its readiness probe (or the
    /// image's HEALTHCHECK) does not pass. `reason` says which
    /// (`ReadinessProbeFailed`), `why` gives the probe's output. Not
    /// degraded: the runtime did its part, the workload is not serving.
    pub(crate) fn running_unready(
        mut self,
        message: &str,
        reason: &str,
        why: &str,
    ) -> ObjectStatus {
        self.settle(ActualState::Running, message);
        self.conditions((false, reason, why), (false, "Running"), (false, ""));
        self.status
    }

    /// Stopped, as desired.
    pub(crate) fn stopped(mut self) -> ObjectStatus {
        self.settle(ActualState::Stopped, "stopped");
        self.conditions(
            (false, "Stopped", "desired state is stopped"),
            (false, "Stopped"),
            (false, ""),
        );
        self.status
    }

    /// Ended on its own without fault (a container that exited 0): not
    /// ready, not degraded.
    pub(crate) fn completed(mut self, message: &str, why: &str) -> ObjectStatus {
        self.settle(ActualState::Stopped, message);
        self.conditions((false, "Completed", why), (false, "Completed"), (false, ""));
        self.status
    }

    /// On its way: `reason` names the step (`Starting`, `Progressing`).
    pub(crate) fn pending(mut self, reason: &str, message: &str) -> ObjectStatus {
        let message = self.settle(ActualState::Pending, message);
        self.conditions((false, reason, &message), (true, reason), (false, ""));
        self.status
    }

    /// Failed for `reason`, retried at `due_ms` unless the reason is
    /// terminal; `last_error` carries the runtime's own words.
    pub(crate) fn failed(
        mut self,
        reason: FailureReason,
        message: &str,
        last_error: String,
        due_ms: Option<i64>,
    ) -> ObjectStatus {
        let message = self.settle(ActualState::Failed, message);
        self.status.failure_reason = reason.code().into();
        self.status.retry_terminal = reason.is_terminal();
        self.status.next_retry_at_ms = due_ms.unwrap_or(0);
        self.status.last_error = last_error;
        let why = reason.condition_reason();
        self.conditions((false, why, &message), (false, why), (true, &message));
        self.status
    }

    /// The runtime cannot be reached: nothing is known, and what was last
    /// known (reference, facts) stays.
    pub(crate) fn unknown(mut self, detail: &str, last_error: String) -> ObjectStatus {
        let message = self.settle(ActualState::Unknown, detail);
        self.status.last_error = last_error;
        self.status.failure_reason = FailureReason::RuntimeError.code().into();
        let why = "RuntimeUnreachable";
        self.conditions((false, why, &message), (false, why), (true, &message));
        self.status
    }

    /// Moves to `state` with `message` (cut as configured), and answers the
    /// message as written.
    fn settle(&mut self, state: ActualState, message: &str) -> String {
        let message = match self.max_message {
            Some(max) => keep_start(message, max),
            None => message,
        }
        .to_string();
        self.status.transition_to(state);
        self.status.message = message.clone();
        message
    }

    /// Sets `Ready` (status, reason, message), `Progressing` (status,
    /// reason; when reported) and `Degraded` (status, message; its reason is
    /// `Ready`'s).
    fn conditions(
        &mut self,
        (ready, reason, message): (bool, &str, &str),
        progressing: (bool, &str),
        (degraded, degraded_message): (bool, &str),
    ) {
        self.status
            .set_condition(CONDITION_READY, ready, reason, message);
        if self.progressing {
            let (on, why) = progressing;
            let message = if on { message } else { "" };
            self.status
                .set_condition(CONDITION_PROGRESSING, on, why, message);
        }
        self.status
            .set_condition(CONDITION_DEGRADED, degraded, reason, degraded_message);
    }
}

/// At most `max` bytes of the start of `text`, on a character boundary.
pub(crate) fn keep_start(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// At most `max` bytes of the end of `text`, on a character boundary.
pub(crate) fn keep_end(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(status: &ObjectStatus, name: &str) -> Option<(String, String, String)> {
        status
            .condition(name)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    }

    #[test]
    fn a_failure_clears_on_the_next_success_and_keeps_transition_times() {
        let failed = StatusBuilder::new(&ObjectStatus::default(), 1, 0).failed(
            FailureReason::PortBindConflict,
            "port 80 is taken",
            "bind: address in use".into(),
            Some(42),
        );
        assert_eq!(failed.actual_state(), ActualState::Failed);
        assert_eq!(failed.failure_reason, "PORT_BIND_CONFLICT");
        assert_eq!(failed.next_retry_at_ms, 42);
        assert!(!failed.retry_terminal);
        let running = StatusBuilder::new(&failed, 2, 1).running("running");
        assert_eq!(running.actual_state(), ActualState::Running);
        assert!(running.failure_reason.is_empty() && running.last_error.is_empty());
        assert_eq!(running.next_retry_at_ms, 0);
        assert_eq!(running.observed_generation, 2);
        assert_eq!(running.restart_count, 1);
        let again = StatusBuilder::new(&running, 2, 1).running("running");
        assert_eq!(again, running, "the same report writes nothing new");
    }

    #[test]
    fn a_running_but_unready_workload_says_why_and_becomes_ready_when_it_passes() {
        let unready = StatusBuilder::new(&ObjectStatus::default(), 1, 0).running_unready(
            "running",
            "ReadinessProbeFailed",
            "no /tmp/ready",
        );
        assert_eq!(unready.actual_state(), ActualState::Running);
        assert_eq!(
            condition(&unready, CONDITION_READY),
            Some((
                "False".into(),
                "ReadinessProbeFailed".into(),
                "no /tmp/ready".into()
            ))
        );
        assert_eq!(
            condition(&unready, CONDITION_DEGRADED).map(|c| c.0),
            Some("False".into())
        );
        let ready = StatusBuilder::new(&unready, 1, 0).running("running");
        assert_eq!(
            condition(&ready, CONDITION_READY).map(|c| c.0),
            Some("True".into())
        );
    }

    #[test]
    fn terminal_reasons_say_no_retry_comes() {
        let status = StatusBuilder::new(&ObjectStatus::default(), 1, 0).failed(
            FailureReason::InvalidSpec,
            "bad",
            "bad".into(),
            None,
        );
        assert!(status.retry_terminal);
        assert_eq!(status.next_retry_at_ms, 0);
        assert_eq!(
            condition(&status, CONDITION_DEGRADED),
            Some(("True".into(), "InvalidSpec".into(), "bad".into()))
        );
    }

    #[test]
    fn progressing_is_reported_only_by_runtimes_that_ask_for_it() {
        let plain = StatusBuilder::new(&ObjectStatus::default(), 1, 0).pending("Starting", "up");
        assert_eq!(condition(&plain, CONDITION_PROGRESSING), None);
        let compose = StatusBuilder::new(&ObjectStatus::default(), 1, 0)
            .with_progressing()
            .pending("Starting", "up");
        assert_eq!(
            condition(&compose, CONDITION_PROGRESSING),
            Some(("True".into(), "Starting".into(), "up".into()))
        );
        let running = StatusBuilder::new(&compose, 1, 0)
            .with_progressing()
            .running("all services running");
        assert_eq!(
            condition(&running, CONDITION_PROGRESSING),
            Some(("False".into(), "Running".into(), String::new()))
        );
    }

    #[test]
    fn unknown_keeps_what_was_last_known() {
        let mut builder = StatusBuilder::new(&ObjectStatus::default(), 1, 0);
        builder.observed("c-1".into(), BTreeMap::from([("k".into(), "v".into())]));
        let running = builder.running("running");
        let unknown = StatusBuilder::new(&running, 1, 0)
            .unknown("engine unreachable", "engine unreachable".into());
        assert_eq!(unknown.actual_state(), ActualState::Unknown);
        assert_eq!(unknown.runtime_ref, "c-1");
        assert_eq!(unknown.facts, running.facts);
        assert_eq!(unknown.failure_reason, "RUNTIME_ERROR");
        assert_eq!(
            condition(&unknown, CONDITION_READY).map(|c| c.1),
            Some("RuntimeUnreachable".into())
        );
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary_when_asked() {
        let long = "é".repeat(400);
        let status = StatusBuilder::new(&ObjectStatus::default(), 1, 0)
            .with_max_message(513)
            .pending("Starting", &long);
        assert_eq!(status.message.len(), 512);
        assert_eq!(keep_end("aé", 1), "");
        assert_eq!(keep_end("abc", 2), "bc");
        assert_eq!(keep_start("éa", 1), "");
    }
}
