//! What a reconcile found, as the workload's status.
//!
//! Built from the previous status so condition transition times survive, and
//! from nothing that changes by itself between two reconciles (no CPU time,
//! no "last checked"), so a reconcile that changes nothing writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use persys_api::v1::ObjectStatus;

use super::errors::FailureReason;
use super::libvirt::LiveDomain;
use crate::kit::Failed;
use crate::kit::status::{MAX_LAST_ERROR, StatusBuilder, keep_start};

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
    Failed(Failed),
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
    let mut status = StatusBuilder::new(previous, report.generation, report.restarts);
    if !matches!(report.outcome, Outcome::Unknown { .. }) {
        status.observed(
            report.domain.map(|d| d.uuid.clone()).unwrap_or_default(),
            facts(report.domain),
        );
    }
    let last_error = |text: &str| keep_start(text, MAX_LAST_ERROR).to_string();
    match report.outcome {
        Outcome::Running => status.running("running"),
        Outcome::Stopped => status.stopped(),
        Outcome::Pending { message } => status.pending("Progressing", &message),
        Outcome::BackingOff { delay, due_ms, why } => {
            let message = format!("back-off {}s restarting the VM: {why}", delay.as_secs());
            status.failed(
                FailureReason::CrashLoopBackOff,
                &message,
                last_error(&message),
                Some(due_ms),
            )
        }
        Outcome::Failed(Failed {
            reason,
            detail,
            due_ms,
            ..
        }) => status.failed(reason, &detail, last_error(&detail), due_ms),
        Outcome::Unknown { detail } => status.unknown(&detail, last_error(&detail)),
    }
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
    use persys_api::CONDITION_READY;
    use persys_api::v1::ActualState;

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
                outcome: Outcome::Failed(Failed::invalid_spec("spec.vm.disks[0].path: outside")),
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
