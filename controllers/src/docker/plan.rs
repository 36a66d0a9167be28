//! What to do about one container workload, decided from what it asks for,
//! what the engine shows and what is remembered of it. A pure function: no
//! engine, no clock, no events, so every rule is a row in the table below.

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use persys_api::v1::{ContainerSpec, DesiredState, Workload};
use tokio::time::Instant;

use super::config::DockerConfig;
use super::errors::FailureReason;
use super::image::PullPolicy;
use super::memory::Memory;
use super::observe::{Observation, state_of};
use crate::backoff::Backoff;
use crate::crash_loop::{CrashLoopPolicy, Gate};
use crate::kit::restart::{ExitDecision, RestartRule};
use crate::kit::{self, Failed};

/// What the workload asks for, and the rules it is held to.
#[derive(Debug, Clone)]
pub(crate) struct Desired {
    /// Running (or unspecified), rather than stopped.
    pub(crate) running: bool,
    /// The spec's image: what a create needs on the node.
    pub(crate) image: String,
    /// When that image is pulled.
    pub(crate) pull: PullPolicy,
    /// Whether an exited container starts again.
    pub(crate) restart: RestartRule,
    /// When it starts again, and how long a failed start holds the next.
    pub(crate) crash_loop: CrashLoopPolicy,
    /// How long a failed pull holds the next.
    pub(crate) pull_backoff: Backoff,
}

impl Desired {
    /// What `workload`, whose validated spec is `spec`, asks for.
    pub(crate) fn of(workload: &Workload, spec: &ContainerSpec, config: &DockerConfig) -> Desired {
        Desired {
            running: workload.desired_state() != DesiredState::Stopped,
            image: spec.image.clone(),
            pull: PullPolicy::parse(&spec.image_pull_policy).unwrap_or(PullPolicy::IfNotPresent),
            restart: RestartRule::of(spec),
            crash_loop: config.crash_loop,
            pull_backoff: config.pull_backoff,
        }
    }
}

/// The decision of one reconcile. Containers of an older spec are replaced
/// first unless a create replaces them (see [`replaces_stale_first`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// Desired stopped, and the container runs (or is paused or
    /// restarting): stop it with the spec's grace.
    Stop,
    /// Desired stopped, and nothing runs: report it so.
    StayStopped,
    /// The container runs, as desired.
    ReportRunning,
    /// It runs, but its liveness probe failed beyond its threshold: stop
    /// it (with the spec's grace), and let its restart policy and the
    /// crash loop restart it, as after any exit.
    RestartUnhealthy { output: String },
    /// Someone paused it: a paused workload serves nothing.
    Unpause,
    /// Created but not started (or its first start failed): start it.
    StartFirst,
    /// It exited and its restart policy starts it again; the crash loop's
    /// first restart is immediate, later ones once the back-off passed.
    RestartAfterExit { exit_code: i64 },
    /// It exited and restarts once the crash-loop back-off passed.
    CrashLoopBackOff {
        exit_code: i64,
        delay: Duration,
        remaining: Duration,
        due_ms: i64,
    },
    /// It exited with code 0 and its policy does not restart it.
    Completed,
    /// It failed and its policy does not restart it (`no`, or on-failure's
    /// limit reached): reported with its log.
    GaveUp { detail: String },
    /// A dead container cannot start again: remove it, count a restart, and
    /// plan again without it.
    ReplaceDead,
    /// Restarting, stopping or being removed: look again shortly.
    WaitTransient { state: String },
    /// A failure no retry fixes was met with this spec: nothing starts until
    /// a new spec. `announced_restart`: the container exited and its policy
    /// would restart it; the restart is announced before the hold.
    HeldByTerminalFailure {
        reason: FailureReason,
        detail: String,
        announced_restart: Option<i64>,
    },
    /// A start (or a restart after an exit) failed lately (a port taken, a
    /// bind source the policy refuses…): the next waits its back-off, and
    /// that failure is what is reported meanwhile.
    HeldByStartBackOff(Failed),
    /// No container: whether the image is there decides the create; look.
    LookForImage,
    /// No container: create one, pulling its image first if asked, then
    /// replace the stale ones (after the pull, so a bad new image leaves
    /// the old container running) and start it.
    Create { pull_first: bool },
    /// No container, and a pull failed lately: it waits its back-off.
    PullBackOff(Failed),
    /// No container, the image is not on the node and the policy forbids
    /// pulling it: a failed pull, counted the same.
    PullPolicyNever { detail: String },
}

/// Whether containers of an older spec go before the plan acts: always but
/// when there is no container of the current spec to run; then a create
/// replaces them once its image is there.
pub(crate) fn replaces_stale_first(desired: &Desired, observed: &Observation) -> bool {
    !desired.running || observed.kept.is_some()
}

/// What to do about the workload at `now`.
pub(crate) fn plan(
    desired: &Desired,
    observed: &Observation,
    memory: &Memory,
    now: Instant,
) -> Plan {
    use ContainerStateStatusEnum as State;
    let state = observed.kept.as_ref().and_then(state_of);
    if !desired.running {
        return match state {
            Some(State::RUNNING | State::PAUSED | State::RESTARTING) => Plan::Stop,
            _ => Plan::StayStopped,
        };
    }
    let Some(kept) = &observed.kept else {
        return create(desired, observed, memory, now);
    };
    match state {
        Some(State::RUNNING) => match &observed.unhealthy {
            Some(output) => Plan::RestartUnhealthy {
                output: output.clone(),
            },
            None => Plan::ReportRunning,
        },
        Some(State::PAUSED) => Plan::Unpause,
        Some(State::CREATED) => held(desired, memory, now).unwrap_or(Plan::StartFirst),
        Some(State::EXITED | State::DEAD) => after_exit(desired, kept, memory, now),
        other => Plan::WaitTransient {
            state: other.map(|s| s.to_string()).unwrap_or_default(),
        },
    }
}

/// A start held by a terminal failure or by the back-off of failed starts.
fn held(desired: &Desired, memory: &Memory, now: Instant) -> Option<Plan> {
    if let Some((reason, detail)) = &memory.terminal {
        return Some(Plan::HeldByTerminalFailure {
            reason: *reason,
            detail: detail.clone(),
            announced_restart: None,
        });
    }
    kit::start_held(
        &memory.crash,
        memory.last_failure.as_ref(),
        &desired.crash_loop,
        now,
    )
    .map(Plan::HeldByStartBackOff)
}

/// An exited (or dead) container: its restart policy, then the crash loop.
fn after_exit(
    desired: &Desired,
    kept: &ContainerInspectResponse,
    memory: &Memory,
    now: Instant,
) -> Plan {
    let exit_code = kept.state.as_ref().and_then(|s| s.exit_code).unwrap_or(0);
    let restarts = memory.crash.restarts();
    match desired.restart.decide(exit_code, restarts) {
        ExitDecision::Completed => Plan::Completed,
        ExitDecision::GaveUp { limit_reached } => Plan::GaveUp {
            detail: if limit_reached {
                format!("container exited; restart limit of {restarts} reached")
            } else {
                "container exited; its restart policy is no".to_string()
            },
        },
        ExitDecision::Restart => {
            // A restart refused since the exit (a bind source the policy
            // refuses, a port taken) is what is reported while its
            // back-off runs, not the exit.
            if memory.terminal.is_none()
                && let Some(failed) = kit::start_held(
                    &memory.crash,
                    memory.last_failure.as_ref(),
                    &desired.crash_loop,
                    now,
                )
            {
                return Plan::HeldByStartBackOff(failed);
            }
            restart_after_exit(desired, kept, memory, now, exit_code)
        }
    }
}

/// An exited container its policy restarts: the crash loop says when.
fn restart_after_exit(
    desired: &Desired,
    kept: &ContainerInspectResponse,
    memory: &Memory,
    now: Instant,
    exit_code: i64,
) -> Plan {
    match memory.crash.peek(&desired.crash_loop, now) {
        Gate::Closed {
            delay,
            remaining,
            due_ms,
        } => Plan::CrashLoopBackOff {
            exit_code,
            delay,
            remaining,
            due_ms,
        },
        Gate::Open if state_of(kept) == Some(ContainerStateStatusEnum::DEAD) => Plan::ReplaceDead,
        Gate::Open => match &memory.terminal {
            Some((reason, detail)) => Plan::HeldByTerminalFailure {
                reason: *reason,
                detail: detail.clone(),
                announced_restart: Some(exit_code),
            },
            None => Plan::RestartAfterExit { exit_code },
        },
    }
}

/// No container of the current spec: the gates of a start, then the image.
fn create(desired: &Desired, observed: &Observation, memory: &Memory, now: Instant) -> Plan {
    if let Some(held) = held(desired, memory, now) {
        return held;
    }
    if desired.pull != PullPolicy::Always {
        match observed.image_present {
            None => return Plan::LookForImage,
            Some(true) => return Plan::Create { pull_first: false },
            Some(false) => {}
        }
    }
    let gate = if memory.pull_image == desired.image {
        memory.pull.peek(&desired.pull_backoff, Duration::MAX, now)
    } else {
        Gate::Open
    };
    if let Gate::Closed {
        remaining, due_ms, ..
    } = gate
    {
        let (reason, detail) = memory.last_failure.clone().unwrap_or((
            FailureReason::ImagePullFailed,
            format!("back-off pulling image {}", desired.image),
        ));
        return Plan::PullBackOff(Failed {
            reason,
            detail,
            retry_in: Some(remaining),
            due_ms: Some(due_ms),
        });
    }
    if desired.pull == PullPolicy::Never {
        return Plan::PullPolicyNever {
            detail: format!(
                "image {} is not on this node and the pull policy is Never",
                desired.image
            ),
        };
    }
    Plan::Create { pull_first: true }
}

/// The rules as tables, in their own file for its length.
#[cfg(test)]
mod tests;
