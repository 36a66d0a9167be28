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
use crate::crash_loop::Gate;

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
    /// The only services down are ones the engine is restarting itself (a
    /// compose `restart:` policy): wait for it.
    EngineRestarting { message: String },
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
    /// Services stopped running or went missing: a counted repair.
    Repair { unsatisfied: Vec<ServiceReport> },
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
    let unsatisfied: Vec<ServiceReport> = assess(&desired.prepared.declared, containers)
        .into_iter()
        .filter(|r| !r.is_satisfied())
        .collect();
    let up = if observation.brought_up.as_deref() != Some(desired.hash.as_str()) {
        Up::NewSpec
    } else if unsatisfied.is_empty() {
        return Plan::Running;
    } else if desired.reported_stopped {
        Up::Start
    } else if unsatisfied.iter().all(|r| r.state == "restarting") {
        return Plan::EngineRestarting {
            message: format!("restarting: {}", names(&unsatisfied)),
        };
    } else {
        Up::Repair { unsatisfied }
    };
    if let Some(hold) = held(&memory, rules, now) {
        return hold;
    }
    if let Up::Repair { unsatisfied } = &up
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
