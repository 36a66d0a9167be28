//! What one reconcile does about a VM workload, decided from what the
//! workload asks for, what libvirt shows and what the controller remembers.
//!
//! [`plan`] is pure: no I/O, no clock (time is a parameter), no events, no
//! memory written, so every rule is a row of a table test (`tests.rs`). What
//! it leaves to others: an invalid spec is refused before anything is
//! observed, and an unreachable libvirt is the error path's to report.

use std::time::Duration;

use tokio::time::Instant;

use super::libvirt::{FoundDomain, PowerState};
use super::marks::Marks;
use super::memory::Memory;
use super::observe::Observation;
use crate::crash_loop::{CrashLoopPolicy, Gate};
use crate::kit::{self, Failed, MIN_REQUEUE};

/// The controller's timing rules a plan applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// Restarts of a guest that stopped on its own, and failed starts.
    pub(crate) crash_loop: CrashLoopPolicy,
    /// How long a guest has to power off after an ACPI shutdown.
    pub(crate) stop_timeout: Duration,
}

/// What the workload asks for, as a plan reads it.
#[derive(Debug, Clone)]
pub(crate) struct Desired<'a> {
    /// The domain name the spec gives.
    pub(crate) name: &'a str,
    /// The marks its domain carries: workload id, scope, revision and the
    /// hash of the spec a current domain must have been defined from.
    pub(crate) marks: &'a Marks,
    /// Running (or unspecified) rather than stopped.
    pub(crate) running: bool,
    /// The stored status says this generation was running (or backing off
    /// between restarts): a guest found off since then stopped on its own.
    /// Read from the status, so it holds across agent restarts.
    pub(crate) reported_running: bool,
    /// The controller's timings, from its configuration.
    pub(crate) rules: Rules,
}

/// The decision of one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// The domain name is held by a domain that is not this workload's:
    /// report it and look again later, never touching that domain.
    NameTaken { holder: String },
    /// More than one domain carries the workload's marks (an interrupted
    /// rename): remove the others, then carry `then` out.
    RemoveDuplicates {
        duplicates: Vec<FoundDomain>,
        then: Box<Plan>,
    },
    /// The first look since the agent started found the workload's domain:
    /// it is adopted, never defined twice; then `then`.
    Adopt {
        domain: FoundDomain,
        then: Box<Plan>,
    },
    /// Desired stopped and nothing is defined: nothing is created to stay
    /// stopped.
    StayUndefined,
    /// Desired stopped: one step of a graceful stop.
    Stop { domain: FoundDomain, step: StopStep },
    /// Desired running and nothing is defined: prepare disks and seed,
    /// define, start.
    Create,
    /// A start is due, but the back-off of failed starts runs: report the
    /// last failure until it has passed.
    HoldStart {
        failed: Failed,
        /// The domain was found off, so no shutdown is in progress.
        domain_off: bool,
    },
    /// The guest runs (or is blocked on I/O): report it.
    Report { domain: FoundDomain },
    /// The guest is paused (by a user, an I/O error…): resume it.
    Resume { domain: FoundDomain },
    /// The guest is shutting down on its own or suspended: look again soon.
    AwaitTransient { domain: FoundDomain },
    /// The guest stopped (or crashed) on its own and the crash loop allows:
    /// start it again, counting a restart.
    Restart(Restart),
    /// As [`Plan::Restart`], but the crash-loop back-off runs: report it and
    /// look again when it has passed.
    BackOff {
        restart: Restart,
        /// The back-off since the last restart, due in `remaining`, at
        /// wall-clock `due_ms` (the crash loop's [`Gate::Closed`]).
        delay: Duration,
        remaining: Duration,
        due_ms: i64,
    },
    /// The domain is off, and not because it stopped on its own (just
    /// defined, or stopped by the agent): start it.
    Start { domain: FoundDomain },
    /// The domain is of an older spec (or name): stop it with grace,
    /// redefine, start.
    Replace(Replacement),
}

/// A restart of a guest that stopped on its own.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Restart {
    pub(crate) domain: FoundDomain,
    /// Why, as events and status say it.
    pub(crate) why: String,
    /// A crashed guest keeps its qemu process: it is destroyed first. A
    /// guest found off has no shutdown in progress.
    pub(crate) crashed: bool,
}

/// A replacement of a domain of an older spec.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Replacement {
    pub(crate) domain: FoundDomain,
    /// Why, as events and status say it.
    pub(crate) why: String,
    /// Where its graceful stop is.
    pub(crate) step: StopStep,
    /// The name changed: undefine it and define anew, rather than redefine
    /// it in place (keeping its UUID).
    pub(crate) renamed: bool,
    /// The back-off of failed starts holds the start once it is off.
    pub(crate) held: Option<Failed>,
}

/// One step of a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopStep {
    /// The domain is off.
    AlreadyOff,
    /// Ask the guest to power off (ACPI); the stop timeout runs from now.
    Shutdown,
    /// The guest did not power off within the stop timeout: destroy it.
    ForceOff,
    /// A shutdown was asked for: look again after this long.
    Wait(Duration),
}

/// What one reconcile does about the workload `desired` describes.
pub(crate) fn plan(
    desired: &Desired<'_>,
    observed: &Observation,
    memory: &Memory,
    now: Instant,
) -> Plan {
    if let Some(holder) = name_holder(desired, observed) {
        return Plan::NameTaken { holder };
    }
    let mut plan = match (&observed.current, desired.running) {
        (None, false) => Plan::StayUndefined,
        (Some(domain), false) => Plan::Stop {
            domain: domain.clone(),
            step: stop_step(
                domain,
                memory.shutdown_since,
                desired.rules.stop_timeout,
                now,
            ),
        },
        (None, true) => {
            start_held(desired, memory, now).map_or(Plan::Create, |failed| Plan::HoldStart {
                failed,
                domain_off: false,
            })
        }
        (Some(domain), true) => run(desired, domain, memory, now),
    };
    if observed.first_look
        && let Some(domain) = &observed.current
    {
        plan = Plan::Adopt {
            domain: domain.clone(),
            then: Box::new(plan),
        };
    }
    if !observed.duplicates.is_empty() {
        plan = Plan::RemoveDuplicates {
            duplicates: observed.duplicates.clone(),
            then: Box::new(plan),
        };
    }
    plan
}

/// Who holds the domain name, when it is not this workload.
fn name_holder(desired: &Desired<'_>, observed: &Observation) -> Option<String> {
    let (id, scope) = (&desired.marks.workload_id, &desired.marks.scope);
    let named = observed.by_name.as_ref()?;
    Some(match &named.marks {
        Some(marks) if marks.is(id, scope) => return None,
        Some(marks) if marks.scope == *scope => {
            format!("the domain of workload {:?}", marks.workload_id)
        }
        Some(marks) => format!("a domain of another persys scope ({:?})", marks.scope),
        None => "a domain persys does not manage".to_string(),
    })
}

/// The plan for a running workload whose domain exists.
fn run(desired: &Desired<'_>, domain: &FoundDomain, memory: &Memory, now: Instant) -> Plan {
    let renamed = domain.name != desired.name;
    let spec_hash = domain.marks.as_ref().map(|m| m.spec_hash.as_str());
    if renamed || spec_hash != Some(desired.marks.spec_hash.as_str()) {
        let old = domain.marks.as_ref().map_or("", |m| m.revision.as_str());
        return Plan::Replace(Replacement {
            domain: domain.clone(),
            why: format!(
                "the spec changed (revision {old} → {})",
                desired.marks.revision
            ),
            step: stop_step(
                domain,
                memory.shutdown_since,
                desired.rules.stop_timeout,
                now,
            ),
            renamed,
            held: start_held(desired, memory, now),
        });
    }
    let domain = domain.clone();
    match domain.state.power {
        PowerState::Running | PowerState::Blocked => Plan::Report { domain },
        PowerState::Paused => Plan::Resume { domain },
        PowerState::ShuttingDown | PowerState::Suspended => Plan::AwaitTransient { domain },
        PowerState::Crashed => restart(desired, domain, "the guest crashed".into(), memory, now),
        PowerState::Shutoff | PowerState::NoState => {
            let on_its_own = !domain.state.never_ran()
                && desired.reported_running
                && memory.shutdown_since.is_none();
            if on_its_own {
                let why = format!("the guest stopped ({})", domain.state.reason_text());
                return restart(desired, domain, why, memory, now);
            }
            match start_held(desired, memory, now) {
                Some(failed) => Plan::HoldStart {
                    failed,
                    domain_off: true,
                },
                None => Plan::Start { domain },
            }
        }
    }
}

/// A restart, or its crash-loop back-off.
fn restart(
    desired: &Desired<'_>,
    domain: FoundDomain,
    why: String,
    memory: &Memory,
    now: Instant,
) -> Plan {
    let crashed = domain.state.power == PowerState::Crashed;
    let restart = Restart {
        domain,
        why,
        crashed,
    };
    match memory.crash.peek(&desired.rules.crash_loop, now) {
        Gate::Open => Plan::Restart(restart),
        Gate::Closed {
            delay,
            remaining,
            due_ms,
        } => Plan::BackOff {
            restart,
            delay,
            remaining,
            due_ms,
        },
    }
}

fn start_held(desired: &Desired<'_>, memory: &Memory, now: Instant) -> Option<Failed> {
    let policy = &desired.rules.crash_loop;
    kit::start_held(&memory.crash, memory.last_failure.as_ref(), policy, now)
}

/// Where a graceful stop of `domain` is, an ACPI shutdown having been
/// asked for at `shutdown_since` (if at all).
pub(crate) fn stop_step(
    domain: &FoundDomain,
    shutdown_since: Option<Instant>,
    timeout: Duration,
    now: Instant,
) -> StopStep {
    if !domain.state.power.is_active() {
        return StopStep::AlreadyOff;
    }
    match shutdown_since.map(|since| now.saturating_duration_since(since)) {
        None => StopStep::Shutdown,
        Some(elapsed) if elapsed >= timeout => StopStep::ForceOff,
        Some(elapsed) => StopStep::Wait((timeout - elapsed).max(MIN_REQUEUE)),
    }
}

#[cfg(test)]
mod tests;
