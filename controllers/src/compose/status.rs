//! What a reconcile found, as the workload's status.
//!
//! Built from the previous status, so condition transition times survive,
//! and from nothing that changes by itself between two reconciles, so a
//! reconcile that changes nothing writes nothing.

use std::collections::BTreeMap;

use persys_api::v1::ObjectStatus;

use super::errors::FailureReason;
use super::observe::ServiceReport;
pub(crate) use crate::kit::status::{MAX_LAST_ERROR, keep_end};
use crate::kit::status::{READY_FACT, Readiness, StatusBuilder};
/// `message` holds at most this many bytes.
const MAX_MESSAGE: usize = 512;

/// The state a reconcile left the project in.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every service with a non-zero scale runs.
    Running,
    /// Nothing runs, as desired.
    Stopped,
    /// Not every service runs yet, and nothing has failed (yet).
    Pending { message: String },
    /// Services keep exiting: the next repair waits until `due_ms`.
    BackingOff { message: String, due_ms: i64 },
    /// Compose (or the project folder) failed; retried at `due_ms` when
    /// set.
    Failed {
        reason: FailureReason,
        message: String,
        /// Compose's own words, for `last_error`.
        detail: String,
        due_ms: Option<i64>,
    },
    /// The engine cannot be reached; nothing is known.
    Unknown { detail: String },
}

/// Everything the status is made from.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub outcome: Outcome,
    pub generation: i64,
    pub project: &'a str,
    /// The services as last observed; none when not observed.
    pub services: Option<&'a [ServiceReport]>,
    /// Repairs of services that had stopped running.
    pub restarts: i32,
    /// Whether every probed service's containers pass their readiness
    /// probes.
    pub readiness: Readiness,
    /// What the probes last said, per service, for `describe`.
    pub probe_facts: BTreeMap<String, String>,
}

/// The status `report` describes, starting from `previous`.
pub fn build(previous: &ObjectStatus, report: Report<'_>) -> ObjectStatus {
    let mut status = StatusBuilder::new(previous, report.generation, report.restarts)
        .with_progressing()
        .with_max_message(MAX_MESSAGE);
    if !matches!(report.outcome, Outcome::Unknown { .. }) {
        match report.services {
            Some(services) => {
                let mut facts = facts(services);
                let ready =
                    report.outcome == Outcome::Running && report.readiness == Readiness::Ready;
                facts.insert(READY_FACT.to_string(), ready.to_string());
                facts.extend(report.probe_facts.clone());
                status.observed(report.project.to_string(), facts)
            }
            None => status.runtime_ref(report.project.to_string()),
        }
    }
    // Compose writes the error last: keep the end.
    let last_error = |detail: &str| keep_end(detail.trim(), MAX_LAST_ERROR).to_string();
    match report.outcome {
        Outcome::Running => match report.readiness {
            Readiness::Ready => status.running("all services running"),
            Readiness::NotReady { reason, message } => {
                status.running_unready("all services running, not all ready", &reason, &message)
            }
        },
        Outcome::Stopped => status.stopped(),
        Outcome::Pending { message } => status.pending("Starting", &message),
        Outcome::BackingOff { message, due_ms } => status.failed(
            FailureReason::CrashLoopBackOff,
            &message,
            last_error(&message),
            Some(due_ms),
        ),
        Outcome::Failed {
            reason,
            message,
            detail,
            due_ms,
        } => status.failed(reason, &message, last_error(&detail), due_ms),
        Outcome::Unknown { detail } => {
            let kept = keep_end(&detail, MAX_LAST_ERROR).to_string();
            status.unknown(&detail, kept)
        }
    }
}

/// `service.<name>` = its state, `service.<name>.exit_code` of a stopped
/// one, `service.<name>.replicas` = running/scale when the scale is not 1.
fn facts(services: &[ServiceReport]) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    for service in services {
        let key = format!("service.{}", service.name);
        let state = if service.orphan {
            format!("{} (not in the compose file)", service.state)
        } else {
            service.state.to_string()
        };
        facts.insert(key.clone(), state);
        if let Some(code) = service.exit_code {
            facts.insert(format!("{key}.exit_code"), code.to_string());
        }
        if service.scale != 1 && !service.orphan {
            facts.insert(
                format!("{key}.replicas"),
                format!("{}/{}", service.running, service.scale),
            );
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::ActualState;
    use persys_api::{CONDITION_DEGRADED, CONDITION_READY};

    fn service(name: &str, state: &'static str, exit_code: Option<i64>) -> ServiceReport {
        ServiceReport {
            name: name.into(),
            scale: 1,
            running: u32::from(state == "running"),
            state,
            exit_code,
            orphan: false,
        }
    }

    fn report<'a>(outcome: Outcome, services: &'a [ServiceReport]) -> Report<'a> {
        Report {
            outcome,
            generation: 2,
            project: "shop",
            services: Some(services),
            restarts: 1,
            readiness: Readiness::Ready,
            probe_facts: BTreeMap::new(),
        }
    }

    #[test]
    fn a_project_with_an_unready_probed_service_runs_but_is_not_ready() {
        let services = [service("web", "running", None)];
        let mut unready = report(Outcome::Running, &services);
        unready.readiness = Readiness::NotReady {
            reason: "ReadinessProbeFailed".into(),
            message: "web: readiness probe failed".into(),
        };
        unready.probe_facts = [("service.web.ready".to_string(), "false".to_string())].into();
        let status = build(&ObjectStatus::default(), unready);
        assert_eq!(status.actual_state(), ActualState::Running);
        let ready = status.condition(CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ReadinessProbeFailed")
        );
        assert_eq!(status.facts["ready"], "false");
        assert_eq!(status.facts["service.web.ready"], "false");
        let ready = build(&status, report(Outcome::Running, &services));
        assert_eq!(ready.facts["ready"], "true");
    }

    #[test]
    fn running_status_names_the_project_and_each_service() {
        let services = [
            service("web", "running", None),
            service("db", "running", None),
        ];
        let previous = ObjectStatus {
            failure_reason: "IMAGE_PULL_FAILED".into(),
            last_error: "old".into(),
            next_retry_at_ms: 9,
            ..Default::default()
        };
        let status = build(&previous, report(Outcome::Running, &services));
        assert_eq!(status.actual_state(), ActualState::Running);
        assert_eq!(status.runtime_ref, "shop");
        assert_eq!(status.observed_generation, 2);
        assert_eq!(status.facts["service.web"], "running");
        assert_eq!(status.facts["service.db"], "running");
        assert!(status.failure_reason.is_empty() && status.last_error.is_empty());
        assert_eq!(status.next_retry_at_ms, 0);
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "True");
        assert_eq!(
            status.condition(CONDITION_DEGRADED).unwrap().status,
            "False"
        );
    }

    #[test]
    fn the_same_report_twice_builds_the_same_status() {
        let services = [service("web", "exited", Some(3))];
        let outcome = Outcome::BackingOff {
            message: "service web exited with code 3".into(),
            due_ms: 1234,
        };
        let first = build(&ObjectStatus::default(), report(outcome.clone(), &services));
        let second = build(&first, report(outcome, &services));
        assert_eq!(first, second);
        assert_eq!(first.failure_reason, "CRASH_LOOP_BACKOFF");
        assert_eq!(first.facts["service.web.exit_code"], "3");
        assert_eq!(first.next_retry_at_ms, 1234);
    }

    #[test]
    fn failures_keep_the_end_of_what_compose_wrote_within_four_kib() {
        let detail = format!("{}THE ERROR", "progress line\n".repeat(1000));
        let status = build(
            &ObjectStatus::default(),
            report(
                Outcome::Failed {
                    reason: FailureReason::InvalidSpec,
                    message: "compose up failed".into(),
                    detail,
                    due_ms: Some(5),
                },
                &[],
            ),
        );
        assert_eq!(status.actual_state(), ActualState::Failed);
        assert!(status.last_error.len() <= MAX_LAST_ERROR);
        assert!(status.last_error.ends_with("THE ERROR"));
        assert!(status.retry_terminal);
        assert_eq!(status.failure_reason, "INVALID_SPEC");
    }

    #[test]
    fn unknown_keeps_what_was_last_known() {
        let services = [service("web", "running", None)];
        let running = build(
            &ObjectStatus::default(),
            report(Outcome::Running, &services),
        );
        let unknown = build(
            &running,
            Report {
                services: None,
                ..report(
                    Outcome::Unknown {
                        detail: "engine unreachable".into(),
                    },
                    &services,
                )
            },
        );
        assert_eq!(unknown.actual_state(), ActualState::Unknown);
        assert_eq!(unknown.facts, running.facts);
        assert_eq!(unknown.runtime_ref, "shop");
        assert_eq!(unknown.message, "engine unreachable");
    }
}
