//! Carries out a plan's steps through the [`Runtime`] facade: the engine
//! calls, the events that tell of them, and what they teach the workload's
//! memory (a start counted, a failure remembered).

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary};
use persys_api::now_ms;
use persys_api::v1::{ContainerSpec, EventType, Workload};
use tokio::time::Instant;

use super::adopt::{self, Adoption};
use super::binds::recorded_sources;
use super::config::DockerConfig;
use super::credentials::{Found, credentials_for};
use super::errors::{DockerError, FailureReason, Operation};
use super::image::ImageReference;
use super::labels::{self, Marks};
use super::memory::Memory;
use super::observe::{display_name, state_of};
use super::pulls::{Asked, PullOutcome, Pulls};
use super::runtime::Runtime;
use super::spec::{create_body, stop_grace, volume_requests};
use super::status::Outcome;
use crate::crash_loop::CrashLoop;
use crate::kit::{self, Failed, Recorder, Workloads};

/// How a convergence stopped short of the desired state.
pub(crate) type Halt = kit::Halt<DockerError>;

impl From<DockerError> for Halt {
    fn from(error: DockerError) -> Self {
        Halt::Error(error)
    }
}

/// The result of one convergence, to publish as status.
pub(crate) struct Converged {
    pub(crate) outcome: Outcome,
    /// The container the status describes, as last inspected.
    pub(crate) container: Option<ContainerInspectResponse>,
    pub(crate) requeue: Option<Duration>,
    /// The container's last output, for a failure.
    pub(crate) log_tail: Option<String>,
}

impl Converged {
    pub(crate) fn new(outcome: Outcome, container: Option<ContainerInspectResponse>) -> Self {
        Converged {
            outcome,
            container,
            requeue: None,
            log_tail: None,
        }
    }

    /// Asks for another look after `after`.
    pub(crate) fn requeue_after(mut self, after: Duration) -> Self {
        self.requeue = Some(after);
        self
    }
}

/// What became of the Go agent's container of a workload.
#[derive(Debug)]
pub(crate) enum TakeOver {
    /// Adopted as it is; this is the record.
    Adopted(Adoption),
    /// It differs from the spec: replaced like a container of an older spec.
    Replace,
    /// It is gone, or is not the Go agent's after all.
    Gone,
}

/// Where a create's pull stands.
pub(crate) enum Pulling {
    /// Running (or waiting for a pull slot) outside the reconcile.
    UnderWay,
    /// Ended: pulled, or a failure to report.
    Done(Result<(), (FailureReason, String)>),
}

/// Which start a container is getting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartKind {
    /// Its first: after create, or of a container whose start failed.
    First,
    /// After it exited: counts as a restart.
    Restart,
}

/// Everything one reconcile acts with.
pub(crate) struct Act<'a> {
    pub(crate) runtime: &'a Runtime<'a>,
    pub(crate) events: &'a Recorder,
    pub(crate) workloads: &'a Workloads<Memory>,
    pub(crate) config: &'a DockerConfig,
    pub(crate) workload: &'a Workload,
    pub(crate) spec: &'a ContainerSpec,
    /// Where pulls run, outside this reconcile's slot.
    pub(crate) pulls: &'a Pulls,
}

fn cid_of(found: &ContainerInspectResponse) -> String {
    found.id.clone().unwrap_or_default()
}

impl Act<'_> {
    fn id(&self) -> &str {
        self.workload.id()
    }

    fn memory<T>(&self, f: impl FnOnce(&mut Memory) -> T) -> T {
        self.workloads.with(self.workload.id(), f)
    }

    async fn event(&self, kind: EventType, reason: &str, message: String) {
        self.events.event(self.id(), kind, reason, message).await;
    }

    /// Removes further containers of the current spec.
    pub(crate) async fn remove_duplicates(&self, duplicates: &[String]) -> Result<(), DockerError> {
        for cid in duplicates {
            tracing::warn!(container = cid, "removing a duplicate container");
            self.runtime.remove(cid).await?;
        }
        Ok(())
    }

    /// Tells that a container found on the first look is now managed.
    pub(crate) async fn adopted(&self, found: &ContainerInspectResponse) {
        let name = display_name(found);
        tracing::info!(container = %name, "adopted an existing container");
        self.event(
            EventType::Normal,
            "Adopted",
            format!("adopted container {name}"),
        )
        .await;
    }

    /// Takes over the Go agent's container of the workload: adopted as it
    /// runs when it is what the Go agent would have created from the spec
    /// (its restarts handed over to this agent), else to be replaced,
    /// with an event naming what differs.
    pub(crate) async fn take_over(&self, go: &ContainerSummary) -> Result<TakeOver, DockerError> {
        let Some(cid) = go.id.as_deref() else {
            return Ok(TakeOver::Gone);
        };
        let Some(found) = self.runtime.inspect(cid).await? else {
            return Ok(TakeOver::Gone);
        };
        if !adopt::is_go_inspected_of(&found, self.id()) {
            return Ok(TakeOver::Gone);
        }
        let name = display_name(&found);
        let image = found
            .image
            .clone()
            .unwrap_or_else(|| self.spec.image.clone());
        let image_env = self.runtime.image_env(&image).await;
        match adopt::difference(self.spec, &found, &image_env) {
            None => {
                self.runtime.hand_over_restarts(cid).await?;
                let adoption = Adoption::new(cid, self.workload, &self.config.scope);
                self.memory(|m| m.adopted = Some(adoption.clone()));
                tracing::info!(container = %name, "adopted the Go agent's container");
                let message =
                    format!("adopted container {name} of the Go agent as it is (no restart)");
                self.event(EventType::Normal, "Adopted", message).await;
                Ok(TakeOver::Adopted(adoption))
            }
            Some(difference) => {
                tracing::info!(container = %name, %difference, "replacing the Go agent's container");
                let message = format!(
                    "container {name} of the Go agent differs from the spec ({difference}); replacing it"
                );
                self.event(EventType::Normal, "Replacing", message).await;
                Ok(TakeOver::Replace)
            }
        }
    }

    /// Stops and removes containers of an older spec; none are left.
    pub(crate) async fn remove_stale(
        &self,
        stale: &mut Vec<ContainerSummary>,
    ) -> Result<(), DockerError> {
        for old in std::mem::take(stale) {
            let Some(cid) = old.id.as_deref() else {
                continue;
            };
            let marks = Marks::read(old.labels.as_ref());
            if marks.workload_id.is_none() {
                // The Go agent's, not adopted: `take_over` said why.
                tracing::info!(container = cid, "replacing the Go agent's container");
                self.runtime.stop_and_remove(cid, None).await?;
                continue;
            }
            tracing::info!(container = cid, old_revision = ?marks.revision, "replacing: the spec changed");
            let message = format!(
                "spec changed (revision {} → {}); replacing the container",
                marks.revision.as_deref().unwrap_or("?"),
                self.workload.revision_id()
            );
            self.event(EventType::Normal, "Replacing", message).await;
            // The old container's own stop timeout (its spec's grace).
            self.runtime.stop_and_remove(cid, None).await?;
        }
        Ok(())
    }

    /// Desired stopped: stops the container if it runs. A later start is a
    /// fresh start, not a crash-loop restart.
    pub(crate) async fn stop(
        &self,
        found: Option<ContainerInspectResponse>,
        running: bool,
    ) -> Result<Converged, Halt> {
        self.memory(|m| m.crash = CrashLoop::new(m.crash.restarts()));
        let Some(found) = found else {
            return Ok(Converged::new(Outcome::Stopped, None));
        };
        let cid = cid_of(&found);
        if running {
            let grace = stop_grace(self.spec);
            tracing::info!(container = %cid, ?grace, "stopping: desired state is stopped");
            self.runtime.stop(&cid, Some(grace)).await?;
            let message = format!("stopped container {}", display_name(&found));
            self.event(EventType::Normal, "Stopped", message).await;
        }
        let found = self.runtime.inspect(&cid).await?;
        Ok(Converged::new(Outcome::Stopped, found))
    }

    pub(crate) async fn unpause(
        &self,
        found: &ContainerInspectResponse,
    ) -> Result<Converged, Halt> {
        let cid = cid_of(found);
        tracing::info!(container = %cid, "unpausing");
        self.runtime.unpause(&cid).await?;
        let message = format!("unpaused container {}", display_name(found));
        self.event(EventType::Normal, "Unpaused", message).await;
        let found = self.runtime.inspect(&cid).await?;
        Ok(Converged::new(Outcome::Running, found))
    }

    /// Its liveness probe failed beyond threshold: a Warning `Unhealthy`
    /// event with the probe's output, then a stop with the spec's grace.
    /// What follows is an exit like any other: the restart policy and the
    /// crash loop decide the restart, which counts.
    pub(crate) async fn stop_unhealthy(
        &self,
        found: &ContainerInspectResponse,
        output: &str,
    ) -> Result<(), Halt> {
        let cid = cid_of(found);
        let name = display_name(found);
        let message = if output.is_empty() {
            format!("Liveness probe failed on container {name}")
        } else {
            format!("Liveness probe failed on container {name}: {output}")
        };
        self.event(EventType::Warning, "Unhealthy", message).await;
        let grace = stop_grace(self.spec);
        tracing::info!(container = %cid, ?grace, "stopping: liveness probe failed");
        self.runtime.stop(&cid, Some(grace)).await?;
        let message = format!("container {name} failed its liveness probe and will be restarted");
        self.event(EventType::Normal, "Killing", message).await;
        Ok(())
    }

    /// Tells that an exited container is started again.
    pub(crate) async fn announce_restart(&self, found: &ContainerInspectResponse, exit_code: i64) {
        let message = format!(
            "restarting container {} (exit code {exit_code})",
            display_name(found)
        );
        self.event(EventType::Normal, "Restarting", message).await;
    }

    /// The crash loop holds the restart: reported with the container's log.
    pub(crate) async fn back_off(
        &self,
        found: ContainerInspectResponse,
        (exit_code, delay, remaining, due_ms): (i64, Duration, Duration, i64),
    ) -> Converged {
        let name = display_name(&found);
        let log_tail = self.log_tail(&found).await;
        let outcome = Outcome::BackingOff {
            exit_code,
            delay,
            due_ms,
        };
        let mut converged = Converged::new(outcome, Some(found)).requeue_after(remaining);
        converged.log_tail = log_tail;
        let message = format!("back-off restarting failed container {name}");
        self.event(EventType::Warning, "BackOff", message).await;
        converged
    }

    /// Its policy does not restart the failed container: reported with its
    /// log.
    pub(crate) async fn gave_up(
        &self,
        found: ContainerInspectResponse,
        detail: String,
    ) -> Converged {
        let log_tail = self.log_tail(&found).await;
        let outcome = Outcome::Failed(Failed::until_changed(
            FailureReason::ContainerExited,
            detail,
        ));
        let mut converged = Converged::new(outcome, Some(found));
        converged.log_tail = log_tail;
        converged
    }

    async fn log_tail(&self, found: &ContainerInspectResponse) -> Option<String> {
        let lines = self.config.log_tail_lines;
        self.runtime.tail_log(&cid_of(found), lines).await
    }

    /// Removes a dead container and counts its replacement as a restart.
    pub(crate) async fn remove_dead(&self, found: &ContainerInspectResponse) -> Result<(), Halt> {
        self.forget_stale_attempts();
        self.runtime.remove(&cid_of(found)).await?;
        self.memory(|m| m.crash.restarted(Instant::now(), now_ms()));
        Ok(())
    }

    fn forget_stale_attempts(&self) {
        let policy = self.config.crash_loop;
        self.memory(|m| m.forget_stale_attempts(&policy, Instant::now()));
    }

    /// Starts an existing container.
    pub(crate) async fn start(
        &self,
        found: &ContainerInspectResponse,
        kind: StartKind,
    ) -> Result<Converged, Halt> {
        let cid = cid_of(found);
        self.forget_stale_attempts();
        // The bind sources as the engine will mount them, checked right
        // before it does (the window left is `binds`' to tell).
        let policy = &self.config.host_paths;
        if let Err(error) = self.runtime.recheck_binds(found, policy).await {
            if kind == StartKind::Restart
                && let Some(binds) = self.resolved_elsewhere(found).await
            {
                return Box::pin(self.recreate(found, &binds)).await;
            }
            return Err(self.failed_attempt(error).await);
        }
        tracing::info!(container = %cid, restart = (kind == StartKind::Restart), "starting");
        if let Err(error) = self.runtime.start(&cid).await {
            return Err(self.failed_attempt(error).await);
        }
        let (now, now_wall) = (Instant::now(), now_ms());
        self.memory(|m| {
            match kind {
                StartKind::First => m.crash.started(now, now_wall),
                StartKind::Restart => m.crash.restarted(now, now_wall),
            }
            m.last_failure = None;
        });
        let message = format!("started container {}", display_name(found));
        self.event(EventType::Normal, "Started", message).await;
        self.after_start(&cid).await
    }

    /// The spec's bind sources, resolved now, where they pass the check but
    /// differ from what `found` recorded: a container created from the
    /// spec's unresolved path (by an agent that passed the engine the
    /// spec's string), whose recorded source runs through a link that
    /// stays inside the allowed roots. `None` when the spec's sources do not
    /// pass either, or are what the container has: then the refusal stands.
    async fn resolved_elsewhere(&self, found: &ContainerInspectResponse) -> Option<String> {
        let policy = &self.config.host_paths;
        let binds = self.runtime.resolve_binds(self.spec, policy).await.ok()?;
        let mut resolved: Vec<String> = binds
            .iter()
            .map(|b| b.source.display().to_string())
            .collect();
        let mut recorded = recorded_sources(found);
        resolved.sort();
        recorded.sort();
        (resolved != recorded).then(|| resolved.join(", "))
    }

    /// Replaces `found` with a container created from the spec's resolved
    /// bind sources (`resolved`), rather than start it on sources that now
    /// pass through a link.
    async fn recreate(
        &self,
        found: &ContainerInspectResponse,
        resolved: &str,
    ) -> Result<Converged, Halt> {
        let cid = cid_of(found);
        let message = format!(
            "container {} recorded unresolved bind sources; recreating it on {resolved}",
            display_name(found)
        );
        tracing::info!(container = %cid, "{message}");
        self.event(EventType::Normal, "Replacing", message).await;
        self.runtime.stop_and_remove(&cid, None).await?;
        self.create(false, &mut Vec::new()).await
    }

    /// After a start: what the container is doing now.
    async fn after_start(&self, cid: &str) -> Result<Converged, Halt> {
        let found = self.runtime.inspect(cid).await?;
        match found.as_ref().and_then(state_of) {
            Some(ContainerStateStatusEnum::RUNNING) | None => {
                Ok(Converged::new(Outcome::Running, found))
            }
            // It exited already: the next reconcile applies the restart
            // policy.
            Some(state) => {
                let message = format!("container is {state} right after its start");
                Ok(Converged::new(Outcome::Pending { message }, found)
                    .requeue_after(Duration::ZERO))
            }
        }
    }

    /// Creates the workload's container, pulling its image first if asked
    /// and replacing `stale` containers once the image is there, then starts
    /// it.
    pub(crate) async fn create(
        &self,
        pull_first: bool,
        stale: &mut Vec<ContainerSummary>,
    ) -> Result<Converged, Halt> {
        let id = self.id();
        self.forget_stale_attempts();
        // Before the pull and before the stale containers go: a source that
        // may not be mounted leaves the old container running.
        let policy = &self.config.host_paths;
        let binds = match self.runtime.resolve_binds(self.spec, policy).await {
            Ok(binds) => binds,
            Err(error) => return Err(self.failed_attempt(error).await),
        };
        if pull_first {
            let image = &self.spec.image;
            match self.pull(image).await? {
                Pulling::Done(Ok(())) => self.memory(|m| m.pulled(image)),
                Pulling::Done(Err((reason, detail))) => {
                    return Err(self.failed_pull(reason, detail));
                }
                // Woken when the pull ends; the stale containers run on.
                Pulling::UnderWay => {
                    let message = format!("pulling image {image}");
                    return Ok(Converged::new(Outcome::Pending { message }, None));
                }
            }
        }
        // After the pull: a bad new image leaves the old container running.
        self.remove_stale(stale).await?;
        for request in volume_requests(self.workload, self.spec, &self.config.scope) {
            self.runtime.create_volume(request).await?;
        }
        let name = labels::container_name(id);
        let body = create_body(self.workload, self.spec, &binds, &self.config.scope);
        let cid = match self.runtime.create(&name, body).await {
            Ok(cid) => cid,
            Err(error) => return Err(self.failed_attempt(error).await),
        };
        tracing::info!(container = %cid, %name, "created");
        self.event(
            EventType::Normal,
            "Created",
            format!("created container {name}"),
        )
        .await;
        let found = self
            .runtime
            .inspect(&cid)
            .await?
            .unwrap_or_else(|| ContainerInspectResponse {
                id: Some(cid),
                name: Some(name),
                ..Default::default()
            });
        self.start(&found, StartKind::First).await
    }

    /// Asks for the image's pull, which runs outside this reconcile:
    /// `UnderWay` until it ends, then its outcome (`Done(Err(..))` a failed
    /// pull to report); `Err` an engine that could not be reached.
    async fn pull(&self, image: &str) -> Result<Pulling, DockerError> {
        let reference = match ImageReference::parse(image) {
            Ok(reference) => reference,
            Err(message) => return Ok(Pulling::Done(Err((FailureReason::InvalidSpec, message)))),
        };
        let id = self.id();
        let asked = match self.pulls.look(id, image) {
            Some(asked) => asked,
            None => {
                // Credentials are looked up (a helper run) only for a pull
                // about to start, not at every look while one runs.
                let found = match &self.config.registry_auth {
                    Some(file) => match credentials_for(file, reference.registry()).await {
                        Ok(found) => found,
                        Err(message) => {
                            let detail =
                                format!("pulling image {image}: registry credentials: {message}");
                            self.event(EventType::Warning, "Failed", detail.clone())
                                .await;
                            return Ok(Pulling::Done(Err((
                                FailureReason::ImagePullFailed,
                                detail,
                            ))));
                        }
                    },
                    None => Found {
                        credentials: None,
                        source: "no credentials (no registry auth file)".to_string(),
                    },
                };
                let deadline = self.config.pull_timeout;
                let credentials = (found.credentials, found.source);
                self.pulls.ask(id, image, &reference, credentials, deadline)
            }
        };
        let (outcome, source) = match asked {
            Asked::Started => {
                let message = format!("pulling image {image}");
                self.event(EventType::Normal, "Pulling", message).await;
                return Ok(Pulling::UnderWay);
            }
            Asked::Waiting => return Ok(Pulling::UnderWay),
            Asked::Finished { outcome, source } => (outcome, source),
        };
        match outcome {
            PullOutcome::Pulled { took } => {
                let took = took.as_secs_f64();
                let message = format!("pulled image {image} in {took:.1}s");
                self.event(EventType::Normal, "Pulled", message).await;
                Ok(Pulling::Done(Ok(())))
            }
            PullOutcome::Unreachable { detail } => Err(DockerError::Unreachable {
                id: self.id().to_string(),
                operation: Operation::Pull,
                source: bollard::errors::Error::IOError {
                    err: std::io::Error::other(detail),
                },
            }),
            PullOutcome::Failed { reason, detail } => {
                let detail = if reason == FailureReason::ImagePullUnauthorized {
                    // Said in so many words whatever the registry's own
                    // are ("no basic auth credentials"), with where the
                    // credentials came from: not retried until the spec
                    // changes.
                    format!(
                        "pulling image {image}: unauthorized: registry {} refused the pull with {}; not retried until the spec changes: {detail}",
                        reference.registry(),
                        source,
                    )
                } else {
                    format!("pulling image {image}: {detail}")
                };
                tracing::warn!(%detail, "pull failed");
                self.event(EventType::Warning, "Failed", detail.clone())
                    .await;
                Ok(Pulling::Done(Err((reason, detail))))
            }
        }
    }

    /// A pull that failed (or that the policy forbids) waits the pull
    /// back-off; reported meanwhile.
    pub(crate) fn failed_pull(&self, reason: FailureReason, detail: String) -> Halt {
        let (backoff, now) = (self.config.pull_backoff, (Instant::now(), now_ms()));
        let image = &self.spec.image;
        Halt::Failed(self.memory(|m| m.pull_failed(image, (reason, detail), &backoff, now)))
    }

    /// Turns a failed create or start (or a bind source refused before
    /// one) into what is reported: terminal failures are remembered; others
    /// wait the crash-loop back-off.
    async fn failed_attempt(&self, error: DockerError) -> Halt {
        let (policy, now) = (self.config.crash_loop, (Instant::now(), now_ms()));
        kit::refused_start(self.events, self.id(), error, |reason, detail| {
            self.memory(|m| m.start_failed(reason, detail, &policy, now))
        })
        .await
    }
}
