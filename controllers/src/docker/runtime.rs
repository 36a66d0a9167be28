//! The engine as one reconcile of one workload uses it: every call names
//! the workload in its errors, and every change it makes discards the
//! observation cache first, so no later look trusts what was seen before.

use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, ContainerUpdateBody,
    RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{CreateContainerOptions, StartContainerOptions};
use persys_api::v1::ContainerSpec;

use super::binds::{self, Bind, BindViolation};
use super::container;
use super::engine::Engine;
use super::errors::{DockerError, FailureReason, Operation};
use super::observed::{Listed, Observed, Whose};
use super::validate::HostPathPolicy;

/// The engine client of one reconcile, and the observation cache it keeps
/// coherent. Made per reconcile: connecting is where an unreachable engine
/// is first noticed.
pub(crate) struct Runtime<'a> {
    /// The connected, version-negotiated client.
    docker: Docker,
    /// Shared with the event trigger, which marks a workload's part stale
    /// on each of its events; this facade does on every change of its own.
    observed: &'a Observed,
    /// The agent's `persys.scope`: only its containers are looked at.
    scope: &'a str,
    /// The workload every call is made for, named in every error.
    id: &'a str,
}

impl<'a> Runtime<'a> {
    /// Connects to the engine for workload `id`.
    pub(crate) async fn connect(
        engine: &Engine,
        observed: &'a Observed,
        scope: &'a str,
        id: &'a str,
    ) -> Result<Runtime<'a>, DockerError> {
        let docker = engine
            .client()
            .await
            .map_err(|e| DockerError::engine(id, Operation::Connect, e))?;
        Ok(Runtime {
            docker,
            observed,
            scope,
            id,
        })
    }

    /// The workload this reconcile is for.
    pub(crate) fn id(&self) -> &str {
        self.id
    }

    /// Called before every change: what was observed no longer holds.
    fn changing(&self) {
        self.observed.invalidate_workload(self.id, Whose::Any);
    }

    /// Makes the engine `call` (sent when awaited, so after the cache is
    /// invalidated), its error naming the workload and `operation`.
    async fn change<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, DockerError> {
        self.changing();
        call.await
            .map_err(|e| DockerError::engine(self.id, operation, e))
    }

    /// The workload's containers (and the Go agent's labelled with it), from
    /// the cached listing while it holds.
    pub(crate) async fn listed(&self) -> Result<Listed, DockerError> {
        self.observed
            .list_for(&self.docker, self.scope, self.id)
            .await
    }

    /// A listed container, inspected (reused while its state holds).
    pub(crate) async fn inspect_listed(
        &self,
        summary: &ContainerSummary,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        self.observed.inspect(&self.docker, self.id, summary).await
    }

    /// The workload's containers, listed afresh.
    pub(crate) async fn list(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        container::list_for(&self.docker, self.scope, self.id).await
    }

    /// The Go agent's containers of the workload, listed afresh.
    pub(crate) async fn list_go(&self) -> Result<Vec<ContainerSummary>, DockerError> {
        container::list_go(&self.docker, self.id).await
    }

    /// The environment `image` brings (merged by the engine into every
    /// container's); empty when the image cannot be read.
    pub(crate) async fn image_env(&self, image: &str) -> Vec<String> {
        match self.docker.inspect_image(image).await {
            Ok(found) => found.config.and_then(|c| c.env).unwrap_or_default(),
            Err(error) => {
                tracing::debug!(%error, image, "image not readable; its environment is unknown");
                Vec::new()
            }
        }
    }

    /// Sets the container's engine restart policy to `no` while it runs (no
    /// restart): restarts are this agent's, with its crash-loop back-off.
    pub(crate) async fn hand_over_restarts(&self, cid: &str) -> Result<(), DockerError> {
        let body = ContainerUpdateBody {
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        let call = self.docker.update_container(cid, body);
        self.change(Operation::Update, call).await
    }

    /// The container, inspected afresh; none if it is gone. Kept for the
    /// next reconcile while nothing changes.
    pub(crate) async fn inspect(
        &self,
        cid: &str,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        self.observed
            .inspect_afresh(&self.docker, self.id, cid)
            .await
    }

    /// True if the engine has `image`.
    pub(crate) async fn image_present(&self, image: &str) -> Result<bool, DockerError> {
        container::image_present(&self.docker, self.id, image).await
    }

    /// The last `lines` lines of the container's output, if they can be read.
    pub(crate) async fn tail_log(&self, cid: &str, lines: usize) -> Option<String> {
        container::tail_log(&self.docker, cid, lines).await
    }

    /// The spec's bind mounts with their sources resolved and checked
    /// (`binds::resolve`), for a create. Filesystem calls, so off the
    /// async threads.
    pub(crate) async fn resolve_binds(
        &self,
        spec: &ContainerSpec,
        policy: &HostPathPolicy,
    ) -> Result<Vec<Bind>, DockerError> {
        let (spec, policy) = (spec.clone(), policy.clone());
        self.blocking_check(move || binds::resolve(&spec, &policy))
            .await
    }

    /// Checks the bind sources the container recorded, before a start
    /// (`binds::recheck`).
    pub(crate) async fn recheck_binds(
        &self,
        found: &ContainerInspectResponse,
        policy: &HostPathPolicy,
    ) -> Result<(), DockerError> {
        let (found, policy) = (found.clone(), policy.clone());
        self.blocking_check(move || binds::recheck(&found, &policy))
            .await
    }

    async fn blocking_check<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> Result<T, BindViolation> + Send + 'static,
    ) -> Result<T, DockerError> {
        let checked = match tokio::task::spawn_blocking(check).await {
            Ok(checked) => checked,
            Err(join) => Err(BindViolation {
                what: "bind sources".to_string(),
                message: format!("the check did not complete: {join}"),
            }),
        };
        checked.map_err(|violation| DockerError::PolicyViolation {
            id: self.id.to_string(),
            violation,
        })
    }

    /// Creates a named volume (the engine returns an existing one).
    pub(crate) async fn create_volume(
        &self,
        request: VolumeCreateRequest,
    ) -> Result<(), DockerError> {
        let call = self.docker.create_volume(request);
        self.change(Operation::CreateVolume, call).await.map(drop)
    }

    /// Creates the container `name`; answers its id.
    pub(crate) async fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        self.changing();
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        // The reconcile inspects what it created: the engine's `create`
        // event tells nothing new.
        self.observed.expect(self.id, "create");
        let created = self.docker.create_container(Some(options), body).await;
        if created.is_err() {
            self.observed.unexpect(self.id, "create");
        }
        match created {
            Ok(created) => Ok(created.id),
            // The name is held by a container the agent does not manage
            // (its own would have been listed).
            Err(EngineError::DockerResponseServerError {
                status_code: 409, ..
            }) => Err(DockerError::Engine {
                id: self.id.to_string(),
                operation: Operation::Create,
                reason: FailureReason::RuntimeError,
                source: EngineError::DockerResponseServerError {
                    status_code: 409,
                    message: format!(
                        "the container name {name:?} is taken by a container persys does not manage"
                    ),
                },
            }),
            Err(e) => Err(DockerError::engine(self.id, Operation::Create, e)),
        }
    }

    /// Starts the container (the engine answers once its process runs).
    /// The reconcile inspects it right after: the engine's `start` event
    /// tells nothing new (an exit that follows is a `die` event).
    pub(crate) async fn start(&self, cid: &str) -> Result<(), DockerError> {
        let call = self
            .docker
            .start_container(cid, None::<StartContainerOptions>);
        self.observed.expect(self.id, "start");
        let started = self.change(Operation::Start, call).await;
        if started.is_err() {
            self.observed.unexpect(self.id, "start");
        }
        started
    }

    /// Resumes a paused container.
    pub(crate) async fn unpause(&self, cid: &str) -> Result<(), DockerError> {
        let call = self.docker.unpause_container(cid);
        self.change(Operation::Unpause, call).await
    }

    /// Stops with `grace` (none: the container's own stop timeout).
    pub(crate) async fn stop(&self, cid: &str, grace: Option<Duration>) -> Result<(), DockerError> {
        self.changing();
        container::stop(&self.docker, self.id, cid, grace).await
    }

    /// Removes the container and its anonymous volumes.
    pub(crate) async fn remove(&self, cid: &str) -> Result<(), DockerError> {
        self.changing();
        container::remove(&self.docker, self.id, cid).await
    }

    /// Stops with `grace`, then removes.
    pub(crate) async fn stop_and_remove(
        &self,
        cid: &str,
        grace: Option<Duration>,
    ) -> Result<(), DockerError> {
        self.changing();
        container::stop_and_remove(&self.docker, self.id, cid, grace).await
    }

    /// Removes the workload's managed volumes, except retained ones.
    pub(crate) async fn remove_volumes(&self) -> Result<(), DockerError> {
        self.changing();
        container::remove_volumes(&self.docker, self.scope, self.id).await
    }
}
