//! The engine calls the controller makes on containers, volumes and images,
//! each failing with the workload and the operation in its error.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{
    CreateImageOptions, InspectContainerOptions, ListContainersOptions, ListVolumesOptions,
    LogsOptions, RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
};
use futures::{StreamExt, TryStreamExt};

use super::errors::{DockerError, Operation};
use super::image::ImageReference;
use super::labels;
use super::status::keep_end;
use super::validate::MAX_STOP_GRACE_SECONDS;

/// Extra time a stop request is given beyond the grace period before the
/// client gives up on the answer.
const STOP_REQUEST_SLACK: Duration = Duration::from_secs(30);

fn status_code(error: &EngineError) -> Option<u16> {
    match error {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Every managed container of `scope` (of one workload, when given), in any
/// state.
pub async fn list(
    docker: &Docker,
    scope: &str,
    workload_id: Option<&str>,
) -> Result<Vec<ContainerSummary>, EngineError> {
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(labels::filter(scope, workload_id)),
            ..Default::default()
        }))
        .await
}

/// Every container labelled `persys.managed=true`, of any scope and of the
/// Go agent: the caller sorts out which are whose.
pub async fn list_managed(docker: &Docker) -> Result<Vec<ContainerSummary>, EngineError> {
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{}=true", labels::MANAGED)],
            )])),
            ..Default::default()
        }))
        .await
}

/// The Go agent's containers labelled with workload `id` (see
/// `super::adopt`), listed afresh.
pub async fn list_go(docker: &Docker, id: &str) -> Result<Vec<ContainerSummary>, DockerError> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={id}", super::adopt::GO_WORKLOAD_ID),
        ],
    )]);
    let found = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|e| DockerError::engine(id, Operation::List, e))?;
    Ok(found
        .into_iter()
        .filter(|c| super::adopt::is_go_container_of(c, id))
        .collect())
}

/// The workload's containers.
pub async fn list_for(
    docker: &Docker,
    scope: &str,
    id: &str,
) -> Result<Vec<ContainerSummary>, DockerError> {
    list(docker, scope, Some(id))
        .await
        .map_err(|e| DockerError::engine(id, Operation::List, e))
}

/// The container, or none if it is gone.
pub async fn inspect(
    docker: &Docker,
    id: &str,
    container: &str,
) -> Result<Option<ContainerInspectResponse>, DockerError> {
    match docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
    {
        Ok(found) => Ok(Some(found)),
        Err(e) if status_code(&e) == Some(404) => Ok(None),
        Err(e) => Err(DockerError::engine(id, Operation::Inspect, e)),
    }
}

/// SIGTERM, then SIGKILL after `grace` (none: the container's own stop
/// timeout, which the agent sets at create). Stopping a stopped or missing
/// container succeeds.
pub async fn stop(
    docker: &Docker,
    id: &str,
    container: &str,
    grace: Option<Duration>,
) -> Result<(), DockerError> {
    let wait = grace.unwrap_or(Duration::from_secs(MAX_STOP_GRACE_SECONDS as u64));
    let options = StopContainerOptions {
        t: grace.map(|g| g.as_secs().min(i32::MAX as u64) as i32),
        signal: None,
    };
    match docker
        .clone()
        .with_timeout(wait + STOP_REQUEST_SLACK)
        .stop_container(container, Some(options))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if matches!(status_code(&e), Some(304 | 404)) => Ok(()),
        Err(e) => Err(DockerError::engine(id, Operation::Stop, e)),
    }
}

/// Removes the container and its anonymous volumes, killing it if it still
/// runs. A missing container, or one already being removed, is fine.
pub async fn remove(docker: &Docker, id: &str, container: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            container,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if matches!(status_code(&e), Some(404 | 409)) => Ok(()),
        Err(e) => Err(DockerError::engine(id, Operation::Remove, e)),
    }
}

/// Stops with grace, then removes.
pub async fn stop_and_remove(
    docker: &Docker,
    id: &str,
    container: &str,
    grace: Option<Duration>,
) -> Result<(), DockerError> {
    if let Err(error) = stop(docker, id, container, grace).await {
        // Removal kills what a failed stop left running; an unreachable
        // engine fails the removal too.
        tracing::warn!(%error, container, "graceful stop failed; removing by force");
    }
    remove(docker, id, container).await
}

/// Removes the workload's managed volumes, except those marked to retain.
pub async fn remove_volumes(docker: &Docker, scope: &str, id: &str) -> Result<(), DockerError> {
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(labels::filter(scope, Some(id))),
        }))
        .await
        .map_err(|e| DockerError::engine(id, Operation::RemoveVolume, e))?;
    for volume in volumes.volumes.unwrap_or_default() {
        if volume.labels.get(labels::RETAIN).map(String::as_str) == Some("true") {
            continue;
        }
        match docker
            .remove_volume(&volume.name, None::<RemoveVolumeOptions>)
            .await
        {
            Ok(()) => {}
            Err(e) if status_code(&e) == Some(404) => {}
            Err(e) => return Err(DockerError::engine(id, Operation::RemoveVolume, e)),
        }
    }
    Ok(())
}

/// The last `lines` lines of the container's output, at most 4 KiB; none if
/// they cannot be read (a failure report should not fail for want of them).
pub async fn tail_log(docker: &Docker, container: &str, lines: usize) -> Option<String> {
    if lines == 0 {
        return None;
    }
    let chunks: Result<Vec<_>, _> = docker
        .logs(
            container,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: lines.to_string(),
                ..Default::default()
            }),
        )
        .take(4 * lines)
        .try_collect()
        .await;
    let chunks = chunks.ok()?;
    let mut text = String::new();
    for chunk in chunks {
        text.push_str(&String::from_utf8_lossy(chunk.as_ref()));
    }
    let text = keep_end(text.trim_end(), super::status::MAX_LAST_ERROR);
    (!text.is_empty()).then(|| text.to_string())
}

/// True if the engine has `image`.
pub async fn image_present(docker: &Docker, id: &str, image: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(e) if status_code(&e) == Some(404) => Ok(false),
        Err(e) => Err(DockerError::engine(id, Operation::InspectImage, e)),
    }
}

/// Pulls `reference`, following the progress stream to its end (errors
/// arrive in it after a 200).
pub async fn pull(
    docker: &Docker,
    id: &str,
    reference: &ImageReference,
    credentials: Option<DockerCredentials>,
) -> Result<(), DockerError> {
    let (from_image, tag) = reference.pull_target();
    let mut progress = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(from_image),
            tag: Some(tag),
            ..Default::default()
        }),
        None,
        credentials,
    );
    while let Some(step) = progress.next().await {
        step.map_err(|e| DockerError::engine(id, Operation::Pull, e))?;
    }
    Ok(())
}
