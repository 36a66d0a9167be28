//! The operations a [`Plan`](super::plan::Plan) is carried out with: each
//! drives libvirt through the [`Hypervisor`](super::libvirt::Hypervisor),
//! records its events and updates the workload's memory.

use std::time::Duration;

use persys_api::now_ms;
use persys_api::v1::EventType;
use tokio::time::Instant;

use super::errors::{FailureReason, VmError};
use super::libvirt::FoundDomain;
use super::plan::{Replacement, Restart, StopStep};
use super::reconciler::{Layout, VmController};
use super::status::Outcome;
use crate::kit::{self, Failed};

/// How soon to retry when the domain name is held by a domain the agent
/// does not manage.
const NAME_TAKEN_RETRY: Duration = Duration::from_secs(30);

/// How a convergence stopped short of the desired state.
pub(crate) type Halt = kit::Halt<VmError>;

impl From<VmError> for Halt {
    fn from(error: VmError) -> Self {
        Halt::Error(error)
    }
}

/// The result of one convergence, to publish as status.
pub(crate) struct Converged {
    /// Where the workload is.
    pub(crate) outcome: Outcome,
    /// The domain to describe in status.
    pub(crate) uuid: Option<String>,
    /// When to look again, if before the next change.
    pub(crate) requeue: Option<Duration>,
}

impl Converged {
    pub(crate) fn new(outcome: Outcome, uuid: Option<String>) -> Self {
        Converged {
            outcome,
            uuid,
            requeue: None,
        }
    }

    pub(crate) fn requeue(mut self, after: Duration) -> Self {
        self.requeue = Some(after);
        self
    }
}

/// Where a stop is after a step.
pub(crate) enum StopProgress {
    /// The domain is off.
    Off,
    /// Waiting for the guest to power off; look again after this long.
    Waiting(Duration),
}

/// Which start a domain is getting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartKind {
    /// A first start, or a start after a requested stop.
    First,
    /// After it stopped on its own: counts as a restart.
    Restart(String),
}

/// The domain name is held by a domain that is not the workload's.
pub(crate) fn name_taken(name: &str, holder: &str) -> Halt {
    Halt::Failed(Failed {
        reason: FailureReason::RuntimeError,
        detail: format!("the domain name {name:?} is taken by {holder}"),
        retry_in: Some(NAME_TAKEN_RETRY),
        due_ms: Some(now_ms() + NAME_TAKEN_RETRY.as_millis() as i64),
    })
}

impl VmController {
    /// Removes domains that carry the workload's marks besides its own.
    pub(crate) async fn remove_duplicates(
        &self,
        id: &str,
        duplicates: &[FoundDomain],
    ) -> Result<(), VmError> {
        for duplicate in duplicates {
            tracing::warn!(domain = %duplicate.name, "removing a duplicate domain");
            self.hypervisor.destroy(id, &duplicate.uuid).await?;
            self.hypervisor.undefine(id, &duplicate.uuid).await?;
            let message = format!(
                "undefined duplicate domain {} ({})",
                duplicate.name, duplicate.uuid
            );
            self.events
                .event(id, EventType::Normal, "Undefined", message)
                .await;
        }
        Ok(())
    }

    /// Says that the workload's domain, found on the first look, is adopted.
    pub(crate) async fn adopted(&self, id: &str, found: &FoundDomain) {
        tracing::info!(domain = %found.name, uuid = %found.uuid, "adopted an existing domain");
        let message = format!("adopted domain {} ({})", found.name, found.uuid);
        self.events
            .event(id, EventType::Normal, "Adopted", message)
            .await;
    }

    /// Readies a guest that stopped on its own for its restart: a crashed
    /// one keeps its qemu process, destroyed here; one found off has no
    /// shutdown in progress.
    pub(crate) async fn clear_stopped(&self, id: &str, restart: &Restart) -> Result<(), VmError> {
        if restart.crashed {
            self.hypervisor.destroy(id, &restart.domain.uuid).await
        } else {
            self.shutdown_over(id);
            Ok(())
        }
    }

    /// Reports the crash-loop back-off of a restart.
    pub(crate) async fn back_off(
        &self,
        id: &str,
        restart: Restart,
        delay: Duration,
        due_ms: i64,
    ) -> Converged {
        let Restart { domain, why, .. } = restart;
        let message = format!("back-off restarting domain {}: {why}", domain.name);
        self.events
            .event(id, EventType::Warning, "BackOff", message)
            .await;
        Converged::new(
            Outcome::BackingOff { delay, due_ms, why },
            Some(domain.uuid),
        )
    }

    /// Resumes a paused guest.
    pub(crate) async fn resume(&self, id: &str, domain: FoundDomain) -> Result<Converged, Halt> {
        let reason = domain.state.reason_text();
        tracing::info!(domain = %domain.name, reason, "resuming a paused domain");
        self.hypervisor.resume(id, &domain.uuid).await?;
        let message = format!("resumed domain {} (paused: {reason})", domain.name);
        self.events
            .event(id, EventType::Normal, "Resumed", message)
            .await;
        Ok(Converged::new(Outcome::Running, Some(domain.uuid)))
    }

    /// One step of stopping a workload whose desired state is stopped.
    pub(crate) async fn stop(
        &self,
        id: &str,
        domain: FoundDomain,
        step: StopStep,
    ) -> Result<Converged, Halt> {
        match self
            .stop_step(id, &domain, step, "the desired state is stopped")
            .await?
        {
            StopProgress::Off => Ok(Converged::new(Outcome::Stopped, Some(domain.uuid))),
            StopProgress::Waiting(remaining) => Ok(Converged::new(
                Outcome::Pending {
                    message: format!(
                        "stopping: waiting up to {}s for the guest to power off",
                        remaining.as_secs().max(1)
                    ),
                },
                Some(domain.uuid),
            )
            .requeue(remaining)),
        }
    }

    /// Replaces a domain of an older spec (or name): stop with grace, then
    /// redefine in place (same UUID) or, for a new name, undefine and define
    /// anew; then start.
    pub(crate) async fn replace(
        &self,
        id: &str,
        layout: &Layout,
        replacement: Replacement,
        now: Instant,
    ) -> Result<Converged, Halt> {
        let Replacement {
            domain,
            why,
            step,
            renamed,
            held,
        } = replacement;
        if let StopProgress::Waiting(remaining) = self.stop_step(id, &domain, step, &why).await? {
            return Ok(Converged::new(
                Outcome::Pending {
                    message: format!("replacing: waiting for the guest to power off ({why})"),
                },
                Some(domain.uuid),
            )
            .requeue(remaining));
        }
        let keep_uuid = if renamed {
            self.hypervisor.undefine(id, &domain.uuid).await?;
            let message = format!(
                "undefined domain {} ({why}; renamed to {})",
                domain.name, layout.domain.name
            );
            self.events
                .event(id, EventType::Normal, "Undefined", message)
                .await;
            None
        } else {
            Some(domain.uuid)
        };
        if let Some(failed) = held {
            return Err(Halt::Failed(failed));
        }
        self.pass_start_gate(id, now);
        let uuid = self.define(id, layout, keep_uuid).await?;
        self.start(id, layout, &uuid, StartKind::First).await
    }

    /// Carries one step of a graceful stop out.
    pub(crate) async fn stop_step(
        &self,
        id: &str,
        domain: &FoundDomain,
        step: StopStep,
        why: &str,
    ) -> Result<StopProgress, VmError> {
        let timeout = self.config.stop_timeout;
        let (name, secs) = (&domain.name, timeout.as_secs());
        match step {
            StopStep::AlreadyOff => {
                self.shutdown_over(id);
                Ok(StopProgress::Off)
            }
            StopStep::Shutdown => {
                tracing::info!(domain = %domain.name, why, "shutting down (ACPI)");
                self.hypervisor.shutdown(id, &domain.uuid).await?;
                self.workloads
                    .with(id, |m| m.shutdown_since = Some(Instant::now()));
                let message = format!(
                    "sent an ACPI shutdown to domain {name} ({why}); destroying it after {secs}s"
                );
                self.events
                    .event(id, EventType::Normal, "ShuttingDown", message)
                    .await;
                // Some guests (and the test driver) are off at once.
                let state = self.hypervisor.state(id, &domain.uuid).await?;
                if state.is_none_or(|s| !s.power.is_active()) {
                    self.shutdown_over(id);
                    return Ok(StopProgress::Off);
                }
                Ok(StopProgress::Waiting(timeout))
            }
            StopStep::ForceOff => {
                tracing::info!(domain = %domain.name, ?timeout, "the guest did not power off in time; destroying");
                self.hypervisor.destroy(id, &domain.uuid).await?;
                self.shutdown_over(id);
                let message = format!("domain {name} did not power off within {secs}s; destroyed");
                self.events
                    .event(id, EventType::Warning, "Destroyed", message)
                    .await;
                Ok(StopProgress::Off)
            }
            StopStep::Wait(remaining) => Ok(StopProgress::Waiting(remaining)),
        }
    }

    /// No shutdown of the workload's guest is in progress any more.
    pub(crate) fn shutdown_over(&self, id: &str) {
        self.workloads.with(id, |m| m.shutdown_since = None);
    }

    /// The plan found the start gate open at `now`: the gate forgets a
    /// count older than the policy's reset, as it does when asked.
    pub(crate) fn pass_start_gate(&self, id: &str, now: Instant) {
        let policy = self.config.crash_loop;
        self.workloads.with(id, |m| {
            m.crash.gate(&policy, now);
        });
    }

    /// Prepares the host and defines the domain (keeping `uuid` when
    /// redefining); returns its UUID.
    pub(crate) async fn define(
        &self,
        id: &str,
        layout: &Layout,
        uuid: Option<String>,
    ) -> Result<String, Halt> {
        let prepared = match self.prepare(id, layout).await {
            Ok(prepared) => prepared,
            Err(error) => return Err(self.failed_attempt(id, error).await),
        };
        let mut domain = layout.domain.clone();
        domain.uuid = uuid;
        domain.marks.created_disks = prepared.created_disks;
        domain.graphics_password = prepared.graphics_password;
        let redefined = domain.uuid.is_some();
        let uuid = match self.hypervisor.define(id, domain.to_xml()).await {
            Ok(uuid) => uuid,
            Err(error) => return Err(self.failed_attempt(id, error).await),
        };
        self.index.insert(&uuid, id);
        tracing::info!(domain = %domain.name, %uuid, redefined, "defined");
        let message = format!(
            "{} domain {} ({uuid}, revision {})",
            if redefined { "redefined" } else { "defined" },
            domain.name,
            domain.marks.revision
        );
        self.events
            .event(id, EventType::Normal, "Defined", message)
            .await;
        Ok(uuid)
    }

    /// Starts a defined domain.
    pub(crate) async fn start(
        &self,
        id: &str,
        layout: &Layout,
        uuid: &str,
        kind: StartKind,
    ) -> Result<Converged, Halt> {
        // Disks or the seed may have been removed since the define.
        if let Err(error) = self.prepare(id, layout).await {
            return Err(self.failed_attempt(id, error).await);
        }
        let started = self.hypervisor.start(id, uuid).await;
        let (now, wall) = (Instant::now(), now_ms());
        if let Err(error) = started {
            return Err(self.failed_attempt(id, error).await);
        }
        let restarts = self.workloads.with(id, |m| {
            match &kind {
                StartKind::First => m.crash.started(now, wall),
                StartKind::Restart(_) => m.crash.restarted(now, wall),
            }
            m.last_failure = None;
            m.shutdown_since = None;
            m.crash.restarts()
        });
        let name = &layout.domain.name;
        let (reason, message) = match &kind {
            StartKind::First => ("Started", format!("started domain {name}")),
            StartKind::Restart(why) => (
                "Restarted",
                format!("restarted domain {name} ({why}; restart {restarts})"),
            ),
        };
        tracing::info!(domain = %name, %uuid, "{}", message);
        self.events
            .event(id, EventType::Normal, reason, message)
            .await;
        Ok(Converged::new(Outcome::Running, Some(uuid.to_string())))
    }

    /// Turns a failed define, start or host preparation into what is
    /// reported: an unreachable libvirt is the error path's; terminal
    /// failures are not retried; others wait the crash-loop back-off.
    async fn failed_attempt(&self, id: &str, error: VmError) -> Halt {
        let (policy, at) = (self.config.crash_loop, (Instant::now(), now_ms()));
        kit::refused_start(&self.events, id, error, |reason, detail| {
            self.workloads.with(id, |m| {
                let (crash, last) = (&mut m.crash, &mut m.last_failure);
                kit::failed_start(crash, last, reason, detail, &policy, at)
            })
        })
        .await
    }
}
