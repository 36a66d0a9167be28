//! The logs of a compose project's containers, found by compose's own
//! project and service labels: each container's stream as the Docker
//! runtime reads it, merged; without follow, in time order.

use std::time::SystemTime;

use futures::stream::{self, StreamExt, TryStreamExt};
use persys_api::v1::Workload;

use super::naming;
use super::observe;
use crate::docker::Engine;
use crate::docker::logs::engine_logs;
use crate::kit::io::{IoError, IoStream, LogChunk, LogOptions};

pub(crate) fn project_logs(
    engine: &Engine,
    workload: &Workload,
    options: LogOptions,
) -> IoStream<LogChunk> {
    let engine = engine.clone();
    let id = workload.id().to_string();
    let project = workload
        .status
        .as_ref()
        .map(|s| s.runtime_ref.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| naming::project_name_of(workload));
    stream::once(async move {
        let Some(project) = project else {
            return Err(IoError::Invalid(format!(
                "workload {id} is not a compose workload"
            )));
        };
        let docker = engine.client().await.map_err(|e| {
            IoError::Runtime(format!(
                "workload {id}: the docker engine could not be reached: {e}"
            ))
        })?;
        let observed = observe::observe(&docker, &id, &project, &observe::Exits::default())
            .await
            .map_err(|e| IoError::Runtime(e.to_string()))?;
        if observed.is_empty() {
            return Err(IoError::NotFound(format!(
                "workload {id}: compose project {project} has no containers (not up yet, or removed)"
            )));
        }
        let mut chosen = Vec::new();
        for (service, containers) in &observed.by_service {
            if options.service.as_ref().is_some_and(|s| s != service) {
                continue;
            }
            for container in containers {
                chosen.push((service.clone(), container.id.clone(), container.name.clone()));
            }
        }
        if chosen.is_empty() {
            let services: Vec<&str> = observed.by_service.keys().map(String::as_str).collect();
            return Err(IoError::NotFound(format!(
                "workload {id}: compose project {project} has no service {:?}; its services: {}",
                options.service.as_deref().unwrap_or_default(),
                services.join(", ")
            )));
        }
        let streams: Vec<IoStream<LogChunk>> = chosen
            .into_iter()
            .map(|(service, container, name)| {
                engine_logs(docker.clone(), container, name, service, options.clone())
            })
            .collect();
        Ok(if options.follow {
            // Live output comes as it is written, from whichever container.
            stream::select_all(streams).boxed()
        } else {
            merge_by_time(streams)
        })
    })
    .try_flatten()
    .boxed()
}

/// Merges streams that are each in time order into one in time order,
/// holding one chunk per stream (chunks without a time sort first).
pub(crate) fn merge_by_time(streams: Vec<IoStream<LogChunk>>) -> IoStream<LogChunk> {
    struct Source {
        stream: IoStream<LogChunk>,
        head: Option<LogChunk>,
        done: bool,
    }
    let sources: Vec<Source> = streams
        .into_iter()
        .map(|stream| Source {
            stream,
            head: None,
            done: false,
        })
        .collect();
    stream::unfold(Some(sources), |sources| async move {
        let mut sources = sources?;
        for source in sources.iter_mut().filter(|s| s.head.is_none() && !s.done) {
            match source.stream.next().await {
                Some(Ok(chunk)) => source.head = Some(chunk),
                Some(Err(error)) => return Some((Err(error), None)),
                None => source.done = true,
            }
        }
        let earliest = sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.head.as_ref().map(|h| (i, h.timestamp)))
            .min_by_key(|(_, at)| at.unwrap_or(SystemTime::UNIX_EPOCH))
            .map(|(i, _)| i)?;
        let chunk = sources[earliest].head.take()?;
        Some((Ok(chunk), Some(sources)))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use super::*;
    use crate::kit::io::OutputStream;

    fn chunk(service: &str, second: u64) -> Result<LogChunk, IoError> {
        Ok(LogChunk {
            stream: OutputStream::Stdout,
            service: service.into(),
            instance: service.into(),
            timestamp: Some(UNIX_EPOCH + Duration::from_secs(second)),
            data: Bytes::from(format!("{second}\n")),
        })
    }

    #[tokio::test]
    async fn merged_logs_come_in_time_order() {
        let web = stream::iter(vec![chunk("web", 1), chunk("web", 4), chunk("web", 5)]).boxed();
        let db = stream::iter(vec![chunk("db", 2), chunk("db", 3), chunk("db", 6)]).boxed();
        let merged: Vec<String> = merge_by_time(vec![web, db])
            .map(|c| {
                let c = c.unwrap();
                format!("{}:{}", c.service, String::from_utf8_lossy(&c.data).trim())
            })
            .collect()
            .await;
        assert_eq!(merged, ["web:1", "db:2", "db:3", "web:4", "web:5", "db:6"]);
    }

    #[tokio::test]
    async fn a_failing_source_ends_the_merge_with_its_error() {
        let web = stream::iter(vec![chunk("web", 1)]).boxed();
        let bad = stream::iter(vec![Err(IoError::Runtime("gone".into()))]).boxed();
        let merged: Vec<_> = merge_by_time(vec![web, bad]).collect().await;
        assert_eq!(merged, [Err(IoError::Runtime("gone".into()))]);
    }
}
