//! What a compose reconcile does, decided from what it read: the workload
//! ([`Desired`]), the project ([`Observation`]) and what was remembered
//! ([`Memory`]). Pure: the time is a parameter, nothing is written, so
//! every rule is tested below without an engine. The back-offs it applies
//! are [`Rules`].

use std::time::Duration;

use tokio::time::Instant;

use super::desired::Desired;
use super::memory::{Failure, Memory, Rules};
use super::observe::{Observation, ServiceReport, assess, describe, names};
use super::restarts::{Verdict, verdict};
use crate::crash_loop::Gate;
use crate::kit::restart::RestartRule;

/// What a reconcile does about a workload's project.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// Another workload runs the project name: report it, touch nothing,
    /// and look again later (nothing says when the owner goes).
    NameTaken { owner: String },
    /// The project exists and the adoption rule says it is not the
    /// workload's: report why, touch nothing, look again later.
    NotAdopted { why: String },
    /// Every service runs: report it; a failed command's back-off is over.
    Running,
    /// The only services down are ones the engine is restarting itself
    /// (containers made before the agent took restarts from the engine):
    /// wait for it.
    EngineRestarting { message: String },
    /// Every service that should run does, but some exited and their
    /// restart policy does not restart them (`no`, or on-failure's limit):
    /// report it; nothing is started.
    GaveUp { message: String },
    /// Desired stopped, and nothing runs.
    AlreadyStopped,
    /// Desired stopped, and something runs: `compose stop`.
    Stop,
    /// A compose command failed and its back-off runs: report the failure
    /// again, and look once it is over (engine events do not shorten it).
    HoldFailure {
        failure: Failure,
        remaining: Duration,
        due_ms: i64,
    },
    /// Services keep exiting: the crash-loop gap since the last repair
    /// runs.
    CrashBackOff {
        message: String,
        remaining: Duration,
        due_ms: i64,
    },
    /// `compose up`, for a reason.
    Up(Up),
}

/// Why `up` runs: it says so in the `Up` event and the crash loop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Up {
    /// The spec was never brought up, or changed since.
    NewSpec,
    /// The desired state turned to running after a stop: not a repair.
    Start,
    /// Services stopped running or went missing and their restart policy
    /// brings them back: a counted repair, of those services only
    /// (`services`; none: every service), so a finished one-shot service
    /// stays finished.
    Repair {
        unsatisfied: Vec<ServiceReport>,
        services: Vec<String>,
    },
    /// Services run in containers made before the agent took restarts from
    /// the engine (no restart label): recreated with the override, so the
    /// engine restarts none of them by itself.
    TakeOver { services: Vec<String> },
}

impl Up {
    /// The services `up` is limited to; none: every service.
    pub(crate) fn services(&self) -> &[String] {
        match self {
            Up::Repair { services, .. } | Up::TakeOver { services } => services,
            Up::NewSpec | Up::Start => &[],
        }
    }
}

/// The services not running as declared, by what their restart policy
/// says of them after `restarts` restarts: those to bring up, and those
/// that failed and stay exited. Finished ones are neither.
pub(crate) fn judge(
    desired: &Desired,
    reports: Vec<ServiceReport>,
    restarts: i32,
) -> (Vec<ServiceReport>, Vec<ServiceReport>) {
    let mut bring_up = Vec::new();
    let mut gave_up = Vec::new();
    for report in reports.into_iter().filter(|r| !r.is_satisfied()) {
        let rule = desired.prepared.restarts.get(&report.name).copied();
        match verdict(&report, rule.unwrap_or(RestartRule::Always), restarts) {
            Verdict::Restart => bring_up.push(report),
            Verdict::Completed => {}
            Verdict::GaveUp => gave_up.push(report),
        }
    }
    (bring_up, gave_up)
}

/// What is done first once the project is the workload's, whatever the
/// plan: the old project of a renamed spec goes, and a project found on
/// first sight is adopted as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The project the spec renamed away from: taken down.
    pub(crate) take_down: Option<String>,
    /// Containers of a project this process had not seen: adopted.
    pub(crate) adopt: Option<usize>,
}

/// The first steps for a project that is the workload's.
pub(crate) fn claim(observation: &Observation, memory: &Memory) -> Claim {
    let containers = &observation.containers;
    Claim {
        take_down: observation.renamed_from.clone(),
        adopt: (memory.is_first_sight() && !containers.is_empty())
            .then(|| containers.containers().count()),
    }
}

/// Decides what to do about the project. `memory` as stored: judged for
/// the desired spec here.
pub(crate) fn plan(
    desired: &Desired,
    observation: &Observation,
    memory: &Memory,
    rules: &Rules,
    now: Instant,
) -> Plan {
    if let Some(owner) = &observation.owner {
        return Plan::NameTaken {
            owner: owner.clone(),
        };
    }
    if let Some(why) = &observation.foreign {
        return Plan::NotAdopted { why: why.clone() };
    }
    let memory = memory.for_spec(desired);
    let containers = &observation.containers;
    if desired.stopped {
        if !containers.any_up() {
            return Plan::AlreadyStopped;
        }
        return held(&memory, rules, now).unwrap_or(Plan::Stop);
    }
    let reports = assess(&desired.prepared.declared, containers);
    let running: Vec<String> = reports
        .iter()
        .filter(|r| r.is_satisfied() && r.running > 0)
        .map(|r| r.name.clone())
        .collect();
    let (unsatisfied, gave_up) = judge(desired, reports, memory.crash.restarts());
    let up = if observation.brought_up.as_deref() != Some(desired.hash.as_str()) {
        Up::NewSpec
    } else if unsatisfied.is_empty() {
        let engine_restarts = not_taken_over(desired, observation);
        if !engine_restarts.is_empty() {
            Up::TakeOver {
                services: engine_restarts,
            }
        } else if !gave_up.is_empty() {
            return Plan::GaveUp {
                message: format!(
                    "exited and not restarted by their restart policy: {}",
                    describe(&gave_up)
                ),
            };
        } else {
            return Plan::Running;
        }
    } else if desired.reported_stopped {
        Up::Start
    } else if unsatisfied.iter().all(|r| r.state == "restarting") {
        return Plan::EngineRestarting {
            message: format!("restarting: {}", names(&unsatisfied)),
        };
    } else {
        // Only what is brought back; with nothing but services no longer in
        // the file to remove, the running ones (`up` with none would start
        // every finished one).
        let mut services: Vec<String> = unsatisfied
            .iter()
            .filter(|r| !r.orphan)
            .map(|r| r.name.clone())
            .collect();
        if services.is_empty() {
            services = running;
        }
        Up::Repair {
            unsatisfied,
            services,
        }
    };
    if let Some(hold) = held(&memory, rules, now) {
        return hold;
    }
    if let Up::Repair { unsatisfied, .. } = &up
        && let Gate::Closed {
            delay,
            remaining,
            due_ms,
        } = memory.crash.peek(&rules.crash_loop, now)
    {
        return Plan::CrashBackOff {
            message: format!(
                "back-off {}s restarting: {}",
                delay.as_secs().max(1),
                describe(unsatisfied)
            ),
            remaining,
            due_ms,
        };
    }
    Plan::Up(up)
}

/// Declared services with a running container that lacks the restart
/// label: the engine may restart those by itself. None in a project taken
/// over from the Go agent.
fn not_taken_over(desired: &Desired, observation: &Observation) -> Vec<String> {
    if desired.prepared.go.is_some() {
        // The Go agent's containers, adopted as they run: recreating them
        // to take their restarts would restart them.
        return Vec::new();
    }
    observation
        .containers
        .by_service
        .iter()
        .filter(|(name, _)| desired.prepared.declared.contains_key(*name))
        .filter(|(_, containers)| {
            containers
                .iter()
                .any(|c| c.state.is_up() && c.asked_restart.is_none())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The failed command's back-off, while it runs. Never reset by time: only
/// a success or a new spec ends it.
fn held(memory: &Memory, rules: &Rules, now: Instant) -> Option<Plan> {
    let gate = memory
        .failures
        .peek(&rules.failure_backoff, Duration::MAX, now);
    match (gate, &memory.last_failure) {
        (
            Gate::Closed {
                remaining, due_ms, ..
            },
            Some(failure),
        ) => Some(Plan::HoldFailure {
            failure: failure.clone(),
            remaining,
            due_ms,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
