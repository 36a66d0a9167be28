//! Restarts of compose services are the agent's, as containers' are: the
//! agent's override file gives every service the engine's restart policy
//! `no` (so the engine never starts a container by itself, past the bind
//! checks), and records the policy the compose file asked for as the label
//! [`RESTART_LABEL`]. The controller then restarts exited services by that
//! policy ([`RestartRule`], the one containers follow), on the crash loop,
//! with every `up` re-checking bind sources first.
//!
//! What a service asks for is read as compose v2 reads it:
//! `deploy.restart_policy` when present, else `restart`. A service that
//! says nothing is restarted whatever its exit code, as a container
//! without a policy is: the workload's desired state is that it runs.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::observe::ServiceReport;
use super::policy::{entries, text, untagged};
use crate::kit::restart::{ExitDecision, RestartRule};

/// The label on each service's containers recording the restart policy
/// its compose file asked for (the engine's own is `no`). A running
/// container without it was made before the agent took restarts over.
pub const RESTART_LABEL: &str = "persys.restart-policy";

/// Service name → the restart policy its compose file asks for.
pub(crate) type Restarts = BTreeMap<String, RestartRule>;

/// What every service of an interpolated compose file asks for; the
/// error names `services.<name>.<field>` with a value compose would not
/// run.
pub(crate) fn restarts_of(document: &Value) -> Result<Restarts, String> {
    let mut restarts = Restarts::new();
    for (name, service) in entries(&document["services"]) {
        let service = untagged(service);
        let key = format!("services.{name}");
        let policy = &service["deploy"]["restart_policy"];
        let rule = if !policy.is_null() {
            let attempts = match untagged(&policy["max_attempts"]) {
                Value::Null => 0,
                value => value
                    .as_u64()
                    .or_else(|| text(value).and_then(|t| t.trim().parse().ok()))
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        format!("{key}.deploy.restart_policy.max_attempts: not a count")
                    })?,
            };
            match text(&policy["condition"]).map(str::trim) {
                None | Some("any") => RestartRule::Always,
                Some("on-failure") => RestartRule::OnFailure {
                    max_restarts: attempts,
                },
                Some("none") => RestartRule::Never,
                Some(other) => {
                    return Err(format!(
                        "{key}.deploy.restart_policy.condition: {other:?} is not none, on-failure or any"
                    ));
                }
            }
        } else {
            match untagged(&service["restart"]) {
                Value::Null => RestartRule::Always,
                // YAML 1.1 readers take an unquoted `no` for false.
                Value::Bool(false) => RestartRule::Never,
                value => text(value)
                    .and_then(RestartRule::parse_compose)
                    .ok_or_else(|| {
                        format!(
                            "{key}.restart: {value:?} is not no, always, unless-stopped, on-failure or on-failure:N"
                        )
                    })?,
            }
        };
        restarts.insert(name, rule);
    }
    Ok(restarts)
}

/// What becomes of a service that is not running as declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Brought up again (once the crash loop allows).
    Restart,
    /// It exited with code 0 and its policy does not restart it: done.
    Completed,
    /// It failed and its policy does not restart it (`no`, or
    /// on-failure's limit reached).
    GaveUp,
}

/// The verdict on `service`, asking `rule`, after `restarts` restarts of
/// the workload's spec. Only a service whose containers stopped with an
/// exit code is judged by its policy: a missing or never started one is
/// brought up whatever it asks.
pub(crate) fn verdict(service: &ServiceReport, rule: RestartRule, restarts: i32) -> Verdict {
    let exited = matches!(service.state, "exited" | "dead") && !service.orphan;
    let Some(code) = service.exit_code.filter(|_| exited) else {
        return Verdict::Restart;
    };
    match rule.decide(code, restarts) {
        ExitDecision::Restart => Verdict::Restart,
        ExitDecision::Completed => Verdict::Completed,
        ExitDecision::GaveUp { .. } => Verdict::GaveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(yaml: &str) -> Result<Restarts, String> {
        restarts_of(&super::super::document::load(yaml).unwrap())
    }

    #[test]
    fn each_service_s_asked_policy_is_read_as_compose_reads_it() {
        let restarts = read(
            "services:\n  web: {image: x}\n  job: {image: x, restart: 'no'}\n  bare: {image: x, restart: no}\n  db: {image: x, restart: unless-stopped}\n  worker: {image: x, restart: 'on-failure:3'}\n  swarm:\n    image: x\n    restart: always\n    deploy: {restart_policy: {condition: on-failure, max_attempts: 2}}\n  once:\n    image: x\n    deploy: {restart_policy: {condition: none}}\n",
        )
        .unwrap();
        assert_eq!(
            restarts,
            Restarts::from([
                ("web".to_string(), RestartRule::Always),
                ("job".to_string(), RestartRule::Never),
                ("bare".to_string(), RestartRule::Never),
                ("db".to_string(), RestartRule::Always),
                (
                    "worker".to_string(),
                    RestartRule::OnFailure { max_restarts: 3 }
                ),
                (
                    "swarm".to_string(),
                    RestartRule::OnFailure { max_restarts: 2 }
                ),
                ("once".to_string(), RestartRule::Never),
            ])
        );
        let error = read("services:\n  web: {image: x, restart: sometimes}\n").unwrap_err();
        assert!(error.starts_with("services.web.restart"), "{error}");
        let error = read(
            "services:\n  web:\n    image: x\n    deploy: {restart_policy: {condition: maybe}}\n",
        )
        .unwrap_err();
        assert!(
            error.starts_with("services.web.deploy.restart_policy.condition"),
            "{error}"
        );
    }

    fn service(state: &'static str, exit_code: Option<i64>) -> ServiceReport {
        ServiceReport {
            name: "job".into(),
            scale: 1,
            running: 0,
            state,
            exit_code,
            orphan: false,
        }
    }

    #[test]
    fn an_exited_service_is_judged_by_its_policy_and_a_missing_one_is_brought_up() {
        let never = RestartRule::Never;
        let on_failure = RestartRule::OnFailure { max_restarts: 2 };
        for (service, rule, restarts, expected) in [
            (service("exited", Some(0)), never, 0, Verdict::Completed),
            (service("exited", Some(1)), never, 0, Verdict::GaveUp),
            (
                service("exited", Some(0)),
                RestartRule::Always,
                9,
                Verdict::Restart,
            ),
            (
                service("exited", Some(0)),
                on_failure,
                0,
                Verdict::Completed,
            ),
            (service("dead", Some(137)), on_failure, 1, Verdict::Restart),
            (service("exited", Some(1)), on_failure, 2, Verdict::GaveUp),
            (service("missing", None), never, 0, Verdict::Restart),
            (service("created", None), never, 0, Verdict::Restart),
        ] {
            assert_eq!(
                verdict(&service, rule, restarts),
                expected,
                "{service:?} {rule} after {restarts}"
            );
        }
    }
}
