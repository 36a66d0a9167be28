//! What a reconcile found, as the workload's status.
//!
//! Built from the previous status so condition transition times survive, and
//! from nothing that changes by itself between two reconciles (no "last
//! checked" times), so a reconcile that changes nothing writes nothing.

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use persys_api::v1::ObjectStatus;

use super::errors::FailureReason;
use crate::kit::Failed;
pub(crate) use crate::kit::status::{MAX_LAST_ERROR, keep_end};
use crate::kit::status::{READY_FACT, Readiness};
use crate::kit::status::{StatusBuilder, keep_start};

/// Docker's "never" timestamp.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The state a reconcile left the workload in.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The container runs.
    Running,
    /// Stopped, as desired.
    Stopped,
    /// Exited with code 0 and is not restarted by its policy.
    Completed,
    /// Exited, and restarts once the crash-loop back-off expires.
    BackingOff {
        exit_code: i64,
        delay: Duration,
        due_ms: i64,
    },
    /// Something failed; retried at `due_ms` unless the reason is terminal.
    Failed(Failed),
    /// Between two steps (a container that exited right after its start).
    Pending { message: String },
    /// The engine cannot be reached; nothing is known.
    Unknown { detail: String },
}

/// Everything the status is made from.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub outcome: Outcome,
    pub generation: i64,
    /// The spec's image.
    pub image: &'a str,
    /// The container as last inspected, if there is one.
    pub container: Option<&'a ContainerInspectResponse>,
    pub restarts: i32,
    /// The last lines of the container's log, for failures.
    pub log_tail: Option<String>,
    /// Whether the running container serves (probes, HEALTHCHECK).
    pub readiness: Readiness,
    /// What the probes last said (`probe.readiness`: `passing`…), for
    /// `describe`.
    pub probe_facts: std::collections::BTreeMap<String, String>,
}

/// The status `report` describes, starting from `previous`.
pub fn build(previous: &ObjectStatus, report: Report<'_>) -> ObjectStatus {
    let mut status = StatusBuilder::new(previous, report.generation, report.restarts);
    if !matches!(report.outcome, Outcome::Unknown { .. }) {
        let mut facts = facts(report.container, report.image);
        let ready = report.outcome == Outcome::Running && report.readiness == Readiness::Ready;
        facts.insert(READY_FACT.to_string(), ready.to_string());
        facts.extend(report.probe_facts.clone());
        status.observed(
            report
                .container
                .and_then(|c| c.id.clone())
                .unwrap_or_default(),
            facts,
        );
    }
    let exit_code = report
        .container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.exit_code)
        .unwrap_or(0);
    let log_tail = report.log_tail.as_deref();
    match report.outcome {
        Outcome::Running => match report.readiness {
            Readiness::Ready => status.running("running"),
            Readiness::NotReady { reason, message } => {
                status.running_unready("running, not ready", &reason, &message)
            }
        },
        Outcome::Stopped => status.stopped(),
        Outcome::Completed => status.completed("completed (exit code 0)", "exited with code 0"),
        Outcome::BackingOff {
            exit_code,
            delay,
            due_ms,
        } => {
            let message = format!(
                "back-off {} restarting failed container (exit code {exit_code})",
                human(delay)
            );
            let last_error = last_error(&message, log_tail);
            status.failed(
                FailureReason::CrashLoopBackOff,
                &message,
                last_error,
                Some(due_ms),
            )
        }
        Outcome::Failed(Failed {
            reason,
            detail,
            due_ms,
            ..
        }) => {
            let detail = if reason == FailureReason::ContainerExited {
                format!("{detail} (exit code {exit_code})")
            } else {
                detail
            };
            let last_error = last_error(&detail, log_tail);
            status.failed(reason, &detail, last_error, due_ms)
        }
        Outcome::Pending { message } => status.pending("Starting", &message),
        Outcome::Unknown { detail } => {
            status.unknown(&detail, keep_start(&detail, MAX_LAST_ERROR).to_string())
        }
    }
}

/// The failure, then as much of the end of the log as fits in 4 KiB.
fn last_error(message: &str, log_tail: Option<&str>) -> String {
    let message = keep_start(message, MAX_LAST_ERROR);
    let Some(tail) = log_tail.map(str::trim_end).filter(|t| !t.is_empty()) else {
        return message.to_string();
    };
    const HEADER: &str = "\n--- last log lines ---\n";
    let room = MAX_LAST_ERROR.saturating_sub(message.len() + HEADER.len());
    if room == 0 {
        return message.to_string();
    }
    format!("{message}{HEADER}{}", keep_end(tail, room))
}

fn human(delay: Duration) -> String {
    let secs = delay.as_secs();
    if delay.subsec_millis() != 0 && secs < 10 {
        format!("{}ms", delay.as_millis())
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Runtime facts: what an operator or the scheduler wants to know about the
/// container without asking Docker.
fn facts(
    container: Option<&ContainerInspectResponse>,
    image: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut facts = std::collections::BTreeMap::new();
    let Some(container) = container else {
        return facts;
    };
    let mut put = |key: &str, value: String| {
        if !value.is_empty() {
            facts.insert(format!("container.{key}"), value);
        }
    };
    put(
        "name",
        container
            .name
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string(),
    );
    put("image", image.to_string());
    put("image_id", container.image.clone().unwrap_or_default());
    if let Some(state) = &container.state {
        let running = state.status == Some(ContainerStateStatusEnum::RUNNING);
        put(
            "state",
            state.status.map(|s| s.to_string()).unwrap_or_default(),
        );
        if let Some(started) = state.started_at.as_deref().filter(|t| *t != ZERO_TIME) {
            put("started_at", started.to_string());
        }
        if !running {
            if let Some(finished) = state.finished_at.as_deref().filter(|t| *t != ZERO_TIME) {
                put("finished_at", finished.to_string());
            }
            if let Some(code) = state.exit_code {
                put("exit_code", code.to_string());
            }
            if state.oom_killed == Some(true) {
                put("oom_killed", "true".to_string());
            }
        }
    }
    if let Some(network) = &container.network_settings {
        let mut ports: Vec<String> = network
            .ports
            .iter()
            .flatten()
            .flat_map(|(port, bindings)| {
                bindings.iter().flatten().map(move |b| {
                    format!(
                        "{}:{}->{port}",
                        b.host_ip.as_deref().unwrap_or(""),
                        b.host_port.as_deref().unwrap_or("")
                    )
                })
            })
            .collect();
        ports.sort();
        ports.dedup();
        put("ports", ports.join(","));
        let mut networks: Vec<_> = network.networks.iter().flatten().collect();
        networks.sort_by(|a, b| a.0.cmp(b.0));
        if let Some(ip) = networks
            .iter()
            .filter_map(|(_, endpoint)| endpoint.ip_address.clone())
            .find(|ip| !ip.is_empty())
        {
            put("ip", ip);
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerState, EndpointSettings, NetworkSettings, PortBinding};
    use persys_api::CONDITION_READY;
    use persys_api::v1::ActualState;
    use std::collections::HashMap;

    fn container(status: ContainerStateStatusEnum, exit_code: i64) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/web".into()),
            image: Some("sha256:feed".into()),
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(exit_code),
                started_at: Some("2024-05-01T10:00:00.1Z".into()),
                finished_at: Some(ZERO_TIME.into()),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                ports: Some(HashMap::from([(
                    "80/tcp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: Some("0.0.0.0".into()),
                        host_port: Some("8080".into()),
                    }]),
                )])),
                networks: Some(HashMap::from([(
                    "bridge".to_string(),
                    EndpointSettings {
                        ip_address: Some("172.17.0.2".into()),
                        ..Default::default()
                    },
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn report<'a>(outcome: Outcome, c: Option<&'a ContainerInspectResponse>) -> Report<'a> {
        Report {
            outcome,
            generation: 3,
            image: "busybox",
            container: c,
            restarts: 2,
            log_tail: Some("line 1\nboom\n".into()),
            readiness: Readiness::Ready,
            probe_facts: Default::default(),
        }
    }

    #[test]
    fn running_status_carries_facts_and_clears_failures() {
        let c = container(ContainerStateStatusEnum::RUNNING, 0);
        let previous = ObjectStatus {
            failure_reason: "CRASH_LOOP_BACKOFF".into(),
            last_error: "old".into(),
            next_retry_at_ms: 5,
            ..Default::default()
        };
        let status = build(&previous, report(Outcome::Running, Some(&c)));
        assert_eq!(status.actual_state(), ActualState::Running);
        assert_eq!(status.observed_generation, 3);
        assert_eq!(status.restart_count, 2);
        assert_eq!(status.runtime_ref, "abc");
        assert_eq!(status.facts["container.ports"], "0.0.0.0:8080->80/tcp");
        assert_eq!(status.facts["container.ip"], "172.17.0.2");
        assert_eq!(status.facts["container.name"], "web");
        assert!(!status.facts.contains_key("container.exit_code"));
        assert!(status.failure_reason.is_empty() && status.last_error.is_empty());
        assert_eq!(status.next_retry_at_ms, 0);
        assert_eq!(status.condition(CONDITION_READY).unwrap().status, "True");
    }

    #[test]
    fn a_running_container_failing_readiness_is_running_but_not_ready() {
        let c = container(ContainerStateStatusEnum::RUNNING, 0);
        let mut unready = report(Outcome::Running, Some(&c));
        unready.readiness = Readiness::NotReady {
            reason: "ReadinessProbeFailed".into(),
            message: "HTTP probe failed with statuscode: 503".into(),
        };
        let status = build(&ObjectStatus::default(), unready);
        assert_eq!(status.actual_state(), ActualState::Running);
        let ready = status.condition(CONDITION_READY).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "ReadinessProbeFailed");
        assert!(ready.message.contains("503"));
        assert_eq!(status.facts["ready"], "false");
        let passing = build(&status, report(Outcome::Running, Some(&c)));
        assert_eq!(passing.facts["ready"], "true");
        assert_eq!(passing.condition(CONDITION_READY).unwrap().status, "True");
    }

    #[test]
    fn the_same_report_twice_builds_the_same_status() {
        let c = container(ContainerStateStatusEnum::EXITED, 3);
        let outcome = Outcome::BackingOff {
            exit_code: 3,
            delay: Duration::from_secs(20),
            due_ms: 1234,
        };
        let first = build(&ObjectStatus::default(), report(outcome.clone(), Some(&c)));
        let second = build(&first, report(outcome, Some(&c)));
        assert_eq!(first, second);
        assert_eq!(first.failure_reason, "CRASH_LOOP_BACKOFF");
        assert_eq!(first.next_retry_at_ms, 1234);
        assert!(first.message.contains("back-off 20s"), "{}", first.message);
        assert!(
            first.last_error.ends_with("line 1\nboom"),
            "{}",
            first.last_error
        );
        assert_eq!(first.facts["container.exit_code"], "3");
    }

    #[test]
    fn last_error_keeps_the_end_of_a_long_log_within_four_kib() {
        let tail = format!("{}THE END", "é".repeat(5000));
        let error = last_error("exited", Some(&tail));
        assert!(error.len() <= MAX_LAST_ERROR);
        assert!(error.starts_with("exited"));
        assert!(error.ends_with("THE END"));
    }

    #[test]
    fn unknown_keeps_what_was_last_known_of_the_container() {
        let c = container(ContainerStateStatusEnum::RUNNING, 0);
        let running = build(&ObjectStatus::default(), report(Outcome::Running, Some(&c)));
        let unknown = build(
            &running,
            report(
                Outcome::Unknown {
                    detail: "engine unreachable".into(),
                },
                None,
            ),
        );
        assert_eq!(unknown.actual_state(), ActualState::Unknown);
        assert_eq!(unknown.runtime_ref, "abc");
        assert_eq!(unknown.facts, running.facts);
        assert_eq!(unknown.message, "engine unreachable");
    }

    #[test]
    fn terminal_failures_are_marked_for_the_scheduler() {
        let status = build(
            &ObjectStatus::default(),
            report(
                Outcome::Failed(Failed::invalid_spec("spec.container.image: bad")),
                None,
            ),
        );
        assert_eq!(status.actual_state(), ActualState::Failed);
        assert!(status.retry_terminal);
        assert_eq!(status.failure_reason, "INVALID_SPEC");
        assert!(status.runtime_ref.is_empty());
    }
}
