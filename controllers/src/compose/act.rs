//! Carrying out a [`super::plan::Plan`]: compose and the engine through the runtime
//! facade, the events that say what was done, and the memory it leaves for
//! the next reconcile. Each step answers what to publish.

use std::time::Duration;

use persys_api::now_ms;
use persys_api::v1::EventType;
use tokio::time::Instant;

use super::binds::{self, Resolved};
use super::cli::Verb;
use super::desired::Desired;
use super::errors::{ComposeError, FailureReason};
use super::memory::Failure;
use super::observe::{Observation, Observed, ServiceReport, assess, describe, names};
use super::plan::{Claim, Up, judge};
use super::project::ProjectFiles;
use super::reconciler::ComposeController;
use super::services::DeclaredServices;
use super::status::{self, Outcome};
use crate::crash_loop::{Gate, RetryGate};
use crate::docker::binds::BindViolation;
use crate::kit::{self, Classify};

/// How soon to look again at a project that is coming up (a service the
/// engine is restarting, one that exited right after `up`): engine events
/// usually come first.
pub(crate) const PENDING_REQUEUE: Duration = Duration::from_secs(5);

/// The result of one convergence, to publish as status.
pub(crate) struct Converged {
    pub(crate) outcome: Outcome,
    pub(crate) services: Option<Vec<ServiceReport>>,
    pub(crate) requeue: Option<Duration>,
    /// A compose failure to hand to the runtime's back-off once the status
    /// says what happened.
    pub(crate) error: Option<ComposeError>,
}

impl Converged {
    /// `outcome`, with the services as `observed`.
    pub(crate) fn new(outcome: Outcome, declared: &DeclaredServices, observed: &Observed) -> Self {
        Converged {
            outcome,
            services: Some(assess(declared, observed)),
            requeue: None,
            error: None,
        }
    }

    /// A spec not acted on: nothing of the project was looked at.
    pub(crate) fn refused(
        reason: FailureReason,
        message: String,
        requeue: Option<Duration>,
    ) -> Self {
        Converged {
            outcome: Outcome::Failed {
                reason,
                detail: message.clone(),
                message,
                due_ms: None,
            },
            services: None,
            requeue,
            error: None,
        }
    }

    /// A compose failure, with the services as `observed`.
    pub(crate) fn failure(
        failure: Failure,
        due_ms: Option<i64>,
        declared: &DeclaredServices,
        observed: &Observed,
    ) -> Self {
        let Failure {
            reason,
            message,
            detail,
        } = failure;
        let outcome = Outcome::Failed {
            reason,
            message,
            detail,
            due_ms,
        };
        Converged::new(outcome, declared, observed)
    }

    /// The same, looked at again after `requeue`.
    pub(crate) fn after(mut self, requeue: Duration) -> Self {
        self.requeue = Some(requeue);
        self
    }
}

impl ComposeController {
    /// The plan's first steps (see [`Claim`]), and the project folder
    /// written from the spec: what every command runs from.
    pub(crate) async fn claim(&self, desired: &Desired, claim: Claim) -> Result<(), ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        if let Some(previous) = claim.take_down {
            // With the files it was brought up from, still on disk.
            tracing::info!(from = %previous, to = %prepared.project, "the project was renamed; taking the old one down");
            self.runtime.take_down(id, &previous, &prepared.dir).await?;
            let message = format!(
                "took down compose project {previous}; the workload now runs as {}",
                prepared.project
            );
            self.event(id, EventType::Normal, "ProjectRenamed", message)
                .await;
        }
        if let Err(source) = prepared.dir.write(&prepared.files).await {
            return Err(self.files_error(id, &prepared.dir, source));
        }
        self.index.insert(&prepared.project, id);
        self.workloads.with(id, |m| *m = m.for_spec(desired));
        if let Some(count) = claim.adopt {
            tracing::info!(project = %prepared.project, containers = count, "adopted an existing compose project");
            let message = format!(
                "adopted compose project {} ({count} containers)",
                prepared.project
            );
            self.event(id, EventType::Normal, "Adopted", message).await;
        }
        Ok(())
    }

    /// `compose stop`, then whatever it left running (containers of
    /// services no longer in the file) through the engine.
    pub(crate) async fn stop(
        &self,
        desired: &Desired,
        observation: &Observation,
    ) -> Result<Converged, ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        let binary = self.runtime.binary_for(id).await?;
        let project = (prepared.project.as_str(), &prepared.dir);
        if let Err(error) = self
            .runtime
            .run(id, &binary, project, Verb::Stop, &[])
            .await
        {
            let observed = &observation.containers;
            return Ok(self.failed(id, &prepared.declared, observed, error).await);
        }
        self.succeeded(id);
        self.runtime.stop_leftovers(id, &prepared.project).await?;
        let message = format!("stopped compose project {}", prepared.project);
        self.event(id, EventType::Normal, "Stopped", message).await;
        let observed = self.runtime.containers(id, &prepared.project).await?;
        Ok(Converged::new(
            Outcome::Stopped,
            &prepared.declared,
            &observed,
        ))
    }

    /// `compose up`, once every bind source passed the container rule
    /// (else nothing starts: a `PolicyViolation`, retried with the failure
    /// back-off); counted in the crash loop when a repair (with an event
    /// per service it repairs), then reported as it came up.
    pub(crate) async fn up(&self, desired: &Desired, up: Up) -> Result<Converged, ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        let resolved = match self.resolve_binds(desired).await {
            Ok(resolved) => resolved,
            Err(error) => {
                let observed = self.runtime.containers(id, &prepared.project).await?;
                return Ok(self.failed(id, &prepared.declared, &observed, error).await);
            }
        };
        // Now, not when planned: claiming may have taken a project down.
        let (now, now_wall) = (Instant::now(), now_ms());
        if let Up::Repair { unsatisfied, .. } = &up {
            for service in unsatisfied {
                let (kind, reason, message) = repair_event(service);
                self.event(id, kind, reason, message).await;
            }
            let policy = self.config.crash_loop;
            self.workloads.with(id, |m| {
                // Forgets a count older than the policy's reset first.
                m.crash.gate(&policy, now);
                m.crash.restarted(now, now_wall);
            });
        } else {
            self.workloads.with(id, |m| m.crash.started(now, now_wall));
        }
        let binary = self.runtime.binary_for(id).await?;
        // The engine is given the sources just checked.
        let files = ProjectFiles {
            labels: prepared.override_file(id, &resolved),
            ..prepared.files.clone()
        };
        if let Err(source) = prepared.dir.write(&files).await {
            return Err(self.files_error(id, &prepared.dir, source));
        }
        let project = (prepared.project.as_str(), &prepared.dir);
        let services = up.services();
        if let Err(error) = self
            .runtime
            .run(id, &binary, project, Verb::Up, services)
            .await
        {
            let observed = self.runtime.containers(id, &prepared.project).await?;
            return Ok(self.failed(id, &prepared.declared, &observed, error).await);
        }
        self.succeeded(id);
        if let Err(source) = prepared.dir.record_hash(&desired.hash).await {
            return Err(self.files_error(id, &prepared.dir, source));
        }
        let observed = self.runtime.containers(id, &prepared.project).await?;
        let message = match &up {
            Up::NewSpec => format!(
                "compose project {} is up (revision {})",
                prepared.project, desired.revision
            ),
            Up::Repair { unsatisfied, .. } => format!(
                "compose project {} repaired: {}",
                prepared.project,
                names(unsatisfied)
            ),
            Up::Start => format!("compose project {} started", prepared.project),
            Up::TakeOver { services } => format!(
                "compose project {}: {} recreated with the engine's restart policy no; the agent restarts them",
                prepared.project,
                services.join(", ")
            ),
        };
        self.event(id, EventType::Normal, "Up", message).await;
        let converged = Converged::new(Outcome::Running, &prepared.declared, &observed);
        let reports = converged.services.clone().unwrap_or_default();
        let restarts = self.restarts_of(id);
        let (still, _) = judge(desired, reports, restarts);
        if still.is_empty() {
            return Ok(converged);
        }
        let message = format!("waiting for services: {}", describe(&still));
        let outcome = Outcome::Pending { message };
        Ok(Converged::new(outcome, &prepared.declared, &observed).after(PENDING_REQUEUE))
    }

    /// The project's bind sources, resolved and checked now (on a blocking
    /// thread: it walks the filesystem).
    async fn resolve_binds(&self, desired: &Desired) -> Result<Vec<Resolved>, ComposeError> {
        let binds = desired.prepared.binds.clone();
        let policy = self.config.host_paths.clone();
        let checked =
            match tokio::task::spawn_blocking(move || binds::resolve(&binds, &policy)).await {
                Ok(checked) => checked,
                Err(join) => Err(BindViolation {
                    what: "bind sources".to_string(),
                    message: format!("the check did not complete: {join}"),
                }),
            };
        checked.map_err(|violation| ComposeError::PolicyViolation {
            id: desired.id.clone(),
            violation,
        })
    }

    /// The restart count of the workload's current spec.
    fn restarts_of(&self, id: &str) -> i32 {
        self.workloads.get(id, |m| m.crash.restarts()).unwrap_or(0)
    }

    /// Counts a failed command (or a bind source refused before one) and
    /// reports it: status, and a `ComposeFailed` event (`PolicyViolation`
    /// for a refused source); the error goes to the runtime's back-off
    /// once the status is written.
    async fn failed(
        &self,
        id: &str,
        declared: &DeclaredServices,
        observed: &Observed,
        error: ComposeError,
    ) -> Converged {
        let reason = error.reason();
        let detail = match &error {
            ComposeError::Command { detail, .. } => detail.clone(),
            other => other.detail(),
        };
        let message = match &error {
            ComposeError::Command { verb, .. } => format!(
                "compose {verb} failed ({reason}): {}",
                last_line(&detail).unwrap_or("no output")
            ),
            other => other.detail(),
        };
        let backoff = self.config.failure_backoff;
        let (now, now_wall) = (Instant::now(), now_ms());
        let failure = Failure {
            reason,
            message,
            detail,
        };
        let gate = self.workloads.with(id, |m| {
            m.failures.counted(now, now_wall);
            m.last_failure = Some(failure.clone());
            m.failures.gate(&backoff, Duration::MAX, now)
        });
        let due_ms = match gate {
            Gate::Closed { due_ms, .. } => Some(due_ms),
            Gate::Open => None,
        };
        tracing::warn!(%error, "compose failed");
        let event = if failure.detail == failure.message {
            failure.message.clone()
        } else {
            format!(
                "{}\n{}",
                failure.message,
                status::keep_end(&failure.detail, 1024)
            )
        };
        let kind = match reason {
            FailureReason::PolicyViolation => kit::refusal_event(reason),
            _ => "ComposeFailed",
        };
        self.event(id, EventType::Warning, kind, event).await;
        Converged {
            error: Some(error),
            ..Converged::failure(failure, due_ms, declared, observed)
        }
    }

    /// A command succeeded: the failure back-off is over.
    pub(crate) fn succeeded(&self, id: &str) {
        self.workloads.with(id, |m| {
            if m.last_failure.is_some() || m.failures.attempts() > 0 {
                m.failures = RetryGate::default();
                m.last_failure = None;
            }
        });
    }

    pub(crate) async fn event(&self, id: &str, kind: EventType, reason: &str, message: String) {
        self.events.event(id, kind, reason, message).await;
    }
}

/// The event saying why a service is repaired.
fn repair_event(service: &ServiceReport) -> (EventType, &'static str, String) {
    match (service.state, service.orphan) {
        (_, true) => (
            EventType::Normal,
            "RemovingOrphans",
            format!("service {} is no longer in the compose file", service.name),
        ),
        ("missing", _) => (
            EventType::Warning,
            "ServiceMissing",
            format!("service {} has no container; recreating it", service.name),
        ),
        (state, _) => (
            EventType::Warning,
            "ServiceExited",
            match service.exit_code {
                Some(code) => format!("service {} {state} with code {code}", service.name),
                None => format!("service {} is {state}", service.name),
            },
        ),
    }
}

fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}
