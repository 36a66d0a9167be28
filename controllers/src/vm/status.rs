//! What a reconcile found, as the workload's status.
//!
//! Built from the previous status so condition transition times survive, and
//! from nothing that changes by itself between two reconciles (no CPU time,
//! no "last checked"), so a reconcile that changes nothing writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use persys_api::v1::{ActualState, ObjectStatus};
use persys_api::{CONDITION_DEGRADED, CONDITION_READY};

use super::errors::FailureReason;
use super::libvirt::LiveDomain;

/// `last_error` holds at most this many bytes.
pub const MAX_LAST_ERROR: usize = 4096;

/// The state a reconcile left the workload in.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The guest runs.
    Running,
    /// Stopped, as desired (or not defined at all).
    Stopped,
    /// On its way somewhere: shutting down, being replaced.
    Pending { message: String },
    /// Stopped on its own; restarts once the crash-loop back-off expires.
    BackingOff {
        delay: Duration,
        due_ms: i64,
        why: String,
    },
    /// Something failed; retried at `due_ms` unless the reason is terminal.
    Failed {
        reason: FailureReason,
        detail: String,
        due_ms: Option<i64>,
    },
    /// libvirt cannot be reached; nothing is known.
    Unknown { detail: String },
}

/// Everything the status is made from.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub outcome: Outcome,
    pub generation: i64,
    /// The domain as last inspected, if there is one.
    pub domain: Option<&'a LiveDomain>,
    pub restarts: i32,
}

/// The status `report` describes, starting from `previous`.
pub fn build(previous: &ObjectStatus, report: Report<'_>) -> ObjectStatus {
    let mut status = previous.clone();
    status.observed_generation = report.generation;
    status.restart_count = report.restarts;
    if !matches!(report.outcome, Outcome::Unknown { .. }) {
        status.runtime_ref = report.domain.map(|d| d.uuid.clone()).unwrap_or_default();
        status.facts = facts(report.domain);
    }
    status.next_retry_at_ms = 0;
    status.failure_reason.clear();
    status.retry_terminal = false;
    status.last_error.clear();
    match report.outcome {
        Outcome::Running => {
            status.transition_to(ActualState::Running);
            status.message = "running".into();
            status.set_condition(CONDITION_READY, true, "Running", "");
            status.set_condition(CONDITION_DEGRADED, false, "Running", "");
        }
        Outcome::Stopped => {
            status.transition_to(ActualState::Stopped);
            status.message = "stopped".into();
            status.set_condition(
                CONDITION_READY,
                false,
                "Stopped",
                "desired state is stopped",
            );
            status.set_condition(CONDITION_DEGRADED, false, "Stopped", "");
        }
        Outcome::Pending { message } => {
            status.transition_to(ActualState::Pending);
            status.set_condition(CONDITION_READY, false, "Progressing", &message);
            status.set_condition(CONDITION_DEGRADED, false, "Progressing", "");
            status.message = message;
        }
        Outcome::BackingOff { delay, due_ms, why } => {
            let message = format!("back-off {}s restarting the VM: {why}", delay.as_secs());
            fail(
                &mut status,
                FailureReason::CrashLoopBackOff,
                &message,
                Some(due_ms),
            );
        }
        Outcome::Failed {
            reason,
            detail,
            due_ms,
        } => fail(&mut status, reason, &detail, due_ms),
        Outcome::Unknown { detail } => {
            status.transition_to(ActualState::Unknown);
            status.message = detail.clone();
            status.last_error = truncate(&detail);
            status.failure_reason = FailureReason::RuntimeError.code().into();
            status.set_condition(CONDITION_READY, false, "RuntimeUnreachable", &detail);
            status.set_condition(CONDITION_DEGRADED, true, "RuntimeUnreachable", &detail);
        }
    }
    status
}

fn fail(status: &mut ObjectStatus, reason: FailureReason, message: &str, due_ms: Option<i64>) {
    status.transition_to(ActualState::Failed);
    status.message = message.to_string();
    status.failure_reason = reason.code().into();
    status.retry_terminal = reason.is_terminal();
    status.next_retry_at_ms = due_ms.unwrap_or(0);
    status.last_error = truncate(message);
    status.set_condition(CONDITION_READY, false, reason.condition_reason(), message);
    status.set_condition(CONDITION_DEGRADED, true, reason.condition_reason(), message);
}

/// At most [`MAX_LAST_ERROR`] bytes, on a character boundary.
fn truncate(text: &str) -> String {
    if text.len() <= MAX_LAST_ERROR {
        return text.to_string();
    }
    let mut end = MAX_LAST_ERROR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Runtime facts: what an operator or the scheduler wants to know about the
/// domain without asking libvirt.
fn facts(domain: Option<&LiveDomain>) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let Some(domain) = domain else {
        return facts;
    };
    let mut put = |key: &str, value: String| {
        if !value.is_empty() {
            facts.insert(format!("vm.{key}"), value);
        }
    };
    put("domain", domain.name.clone());
    put("uuid", domain.uuid.clone());
    put("domain_type", domain.domain_type.clone());
    put("state", domain.state.power.name().to_string());
    put("state_reason", domain.state.reason_text().to_string());
    put("vcpus", domain.vcpus.to_string());
    put("memory_mb", (domain.memory_kib / 1024).to_string());
    put(
        "disks",
        domain
            .disks
            .iter()
            .filter(|d| d.device == "disk")
            .map(|d| format!("{}={}", d.target, d.source))
            .collect::<Vec<_>>()
            .join(","),
    );
    put(
        "cdroms",
        domain
            .disks
            .iter()
            .filter(|d| d.device == "cdrom")
            .map(|d| format!("{}={}", d.target, d.source))
            .collect::<Vec<_>>()
            .join(","),
    );
    if let Some(seed) = domain.marks.as_ref().and_then(|m| m.seed.clone()) {
        put("seed", seed);
    }
    put(
        "macs",
        domain
            .interfaces
            .iter()
            .map(|i| i.mac.clone())
            .collect::<Vec<_>>()
            .join(","),
    );
    put("ips", domain.ips.join(","));
    if let Some(ip) = domain.ips.first() {
        put("ip", ip.clone());
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::libvirt::{DomainState, LiveDisk, PowerState};

    fn domain() -> LiveDomain {
        LiveDomain {
            uuid: "u-1".into(),
            name: "web".into(),
            state: DomainState {
                power: PowerState::Running,
                reason: 1,
            },
            vcpus: 2,
            memory_kib: 131072,
            domain_type: "kvm".into(),
            disks: vec![
                LiveDisk {
                    target: "vda".into(),
                    source: "/img/web.qcow2".into(),
                    device: "disk".into(),
                },
                LiveDisk {
                    target: "sda".into(),
                    source: "/state/vm/web/seed.iso".into(),
                    device: "cdrom".into(),
                },
            ],
            interfaces: Vec::new(),
            ips: vec!["10.0.0.5".into()],
            marks: None,
        }
    }

    #[test]
    fn a_running_domain_is_ready_with_its_facts() {
        let d = domain();
        let status = build(
            &ObjectStatus::default(),
            Report {
                outcome: Outcome::Running,
                generation: 4,
                domain: Some(&d),
                restarts: 1,
            },
        );
        assert_eq!(status.actual_state(), ActualState::Running);
        assert_eq!(status.observed_generation, 4);
        assert_eq!(status.runtime_ref, "u-1");
        assert_eq!(status.restart_count, 1);
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "True");
        assert_eq!(status.facts["vm.disks"], "vda=/img/web.qcow2");
        assert_eq!(status.facts["vm.cdroms"], "sda=/state/vm/web/seed.iso");
        assert_eq!(status.facts["vm.memory_mb"], "128");
        assert_eq!(status.facts["vm.state_reason"], "booted");
        assert_eq!(status.facts["vm.ip"], "10.0.0.5");
    }

    #[test]
    fn the_same_report_twice_gives_the_same_status() {
        let d = domain();
        let report = || Report {
            outcome: Outcome::Running,
            generation: 1,
            domain: Some(&d),
            restarts: 0,
        };
        let first = build(&ObjectStatus::default(), report());
        assert_eq!(build(&first, report()), first);
    }

    #[test]
    fn failures_carry_reason_terminality_and_keep_facts_when_unknown() {
        let d = domain();
        let running = build(
            &ObjectStatus::default(),
            Report {
                outcome: Outcome::Running,
                generation: 1,
                domain: Some(&d),
                restarts: 0,
            },
        );
        let invalid = build(
            &running,
            Report {
                outcome: Outcome::Failed {
                    reason: FailureReason::InvalidSpec,
                    detail: "spec.vm.disks[0].path: outside".into(),
                    due_ms: None,
                },
                generation: 2,
                domain: None,
                restarts: 0,
            },
        );
        assert_eq!(invalid.actual_state(), ActualState::Failed);
        assert_eq!(invalid.failure_reason, "INVALID_SPEC");
        assert!(invalid.retry_terminal);
        assert!(invalid.facts.is_empty());
        let unknown = build(
            &running,
            Report {
                outcome: Outcome::Unknown {
                    detail: "libvirt unreachable".into(),
                },
                generation: 1,
                domain: None,
                restarts: 0,
            },
        );
        assert_eq!(unknown.actual_state(), ActualState::Unknown);
        assert_eq!(unknown.runtime_ref, "u-1", "what was known stays");
        assert_eq!(unknown.last_error, "libvirt unreachable");
    }
}
