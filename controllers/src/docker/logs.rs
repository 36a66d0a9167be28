//! A container's logs from the engine: `GET /containers/{id}/logs`, always
//! with the engine's timestamps (stripped from the data and kept in
//! [`LogChunk::timestamp`]), stdout and stderr apart.

use std::time::{SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::query_parameters::{InspectContainerOptions, LogsOptions};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use persys_api::v1::Workload;

use super::engine::Engine;
use super::labels::{Marks, container_name};
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions, OutputStream};

/// The logs of a container workload's container: the one its status names
/// (`runtime_ref`), else the one named after it; either only when its
/// marks say it is this workload's.
pub(crate) fn container_logs(
    engine: &Engine,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let engine = engine.clone();
    let id = workload.id().to_string();
    let mut candidates = Vec::with_capacity(2);
    if let Some(reference) = workload
        .status
        .as_ref()
        .map(|s| s.runtime_ref.clone())
        .filter(|r| !r.is_empty())
    {
        candidates.push(reference);
    }
    candidates.push(container_name(&id));
    stream::once(async move {
        let docker = engine.client().await.map_err(|e| runtime_error(&id, &e))?;
        for candidate in &candidates {
            let found = match docker
                .inspect_container(candidate, None::<InspectContainerOptions>)
                .await
            {
                Ok(found) => found,
                Err(error) if is_not_found(&error) => continue,
                Err(error) => return Err(runtime_error(&id, &error)),
            };
            let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
            // The agent's, or the Go agent's (adopted by the workload).
            if Marks::read(labels).workload_id.as_deref() != Some(id.as_str())
                && !super::adopt::is_go_inspected_of(&found, &id)
            {
                continue;
            }
            let Some(container) = found.id else { continue };
            let instance = found
                .name
                .as_deref()
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_else(|| container.chars().take(12).collect());
            return Ok(engine_logs(
                docker,
                container,
                instance,
                String::new(),
                options,
            ));
        }
        Err(IoError::NotFound(format!(
            "workload {id}: no container (it has not been created yet, or was removed)"
        )))
    })
    .try_flatten()
    .boxed()
}

/// The logs of one container as chunks of `service` (empty outside
/// compose) and `instance` (the container's name). Pulled: the engine's
/// response body is read only as fast as the stream is.
pub(crate) fn engine_logs(
    docker: Docker,
    container: String,
    instance: String,
    service: String,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let since = options.since;
    let request = LogsOptions {
        follow: options.follow,
        stdout: true,
        stderr: true,
        // The engine takes whole seconds; the exact bound is applied below.
        since: since.map(unix_seconds).unwrap_or(0),
        until: 0,
        timestamps: true,
        tail: options
            .tail
            .map(|n| n.to_string())
            .unwrap_or_else(|| "all".to_string()),
    };
    docker
        .logs(&container, Some(request))
        .map_err(move |error| {
            if is_not_found(&error) {
                IoError::NotFound(format!("container {container} is gone"))
            } else {
                IoError::Runtime(format!(
                    "reading the logs of container {container}: {error}"
                ))
            }
        })
        .try_filter_map(move |output| {
            let chunk = chunk_of(output, &service, &instance);
            let keep = match (since, chunk.as_ref().and_then(|c| c.timestamp)) {
                (Some(since), Some(at)) => at >= since,
                _ => true,
            };
            futures::future::ready(Ok(chunk.filter(|_| keep)))
        })
        .boxed()
}

/// One engine frame as a chunk: its `<RFC 3339> ` prefix read as the
/// timestamp and cut off. Stdin echoes are not output.
fn chunk_of(output: LogOutput, service: &str, instance: &str) -> Option<LogChunk> {
    let (stream, message) = match output {
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            (OutputStream::Stdout, message)
        }
        LogOutput::StdErr { message } => (OutputStream::Stderr, message),
        LogOutput::StdIn { .. } => return None,
    };
    let (timestamp, data) = split_timestamp(message);
    Some(LogChunk {
        stream,
        service: service.to_string(),
        instance: instance.to_string(),
        timestamp,
        data,
    })
}

/// Splits `2026-12-03T15:16:16.123456789Z data` into its time and data;
/// a frame without a readable time is kept whole.
pub(crate) fn split_timestamp(message: Bytes) -> (Option<SystemTime>, Bytes) {
    let Some(space) = message.iter().take(40).position(|b| *b == b' ') else {
        return (None, message);
    };
    let parsed = std::str::from_utf8(&message[..space])
        .ok()
        .and_then(|text| humantime::parse_rfc3339(text).ok());
    match parsed {
        Some(at) => (Some(at), message.slice(space + 1..)),
        None => (None, message),
    }
}

fn unix_seconds(at: SystemTime) -> i32 {
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

pub(crate) fn is_not_found(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn runtime_error(id: &str, error: &EngineError) -> IoError {
    IoError::Runtime(format!(
        "workload {id}: the docker engine could not be reached: {error}"
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_engine_timestamp_is_cut_off_and_read() {
        let (at, data) = split_timestamp(Bytes::from_static(
            b"2026-12-03T15:16:16.123456789Z line 1\n",
        ));
        assert_eq!(data, Bytes::from_static(b"line 1\n"));
        let expected = humantime::parse_rfc3339("2026-12-03T15:16:16Z").unwrap()
            + Duration::from_nanos(123_456_789);
        assert_eq!(at, Some(expected));
        let (at, data) = split_timestamp(Bytes::from_static(b"no time here\n"));
        assert_eq!((at, data), (None, Bytes::from_static(b"no time here\n")));
    }

    #[test]
    fn stdout_and_stderr_stay_apart() {
        let err = chunk_of(
            LogOutput::StdErr {
                message: Bytes::from_static(b"2026-12-03T15:16:16Z oops\n"),
            },
            "",
            "web",
        )
        .unwrap();
        assert_eq!(err.stream, OutputStream::Stderr);
        assert_eq!(err.instance, "web");
        assert!(
            chunk_of(
                LogOutput::StdIn {
                    message: Bytes::new()
                },
                "",
                "web"
            )
            .is_none()
        );
    }
}
