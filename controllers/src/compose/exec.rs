//! A command run in a compose service's container: the service's running
//! container with the lowest `com.docker.compose.container-number`, found
//! by compose's own labels, then the same session as a container's exec.

use std::collections::BTreeMap;

use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::ListContainersOptions;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use persys_api::v1::Workload;

use super::naming;
use super::observe::{ONEOFF_LABEL, SERVICE_LABEL, project_filter};
use crate::docker::Engine;
use crate::docker::exec::{session, unreachable};
use crate::docker::labels::WORKLOAD_ID;
use crate::kit::io::{ExecInput, ExecOptions, ExecOutput, IoError, IoStream};

/// Which replica of a service a container is.
const NUMBER_LABEL: &str = "com.docker.compose.container-number";

pub(crate) fn service_exec(
    engine: &Engine,
    workload: &Workload,
    options: ExecOptions,
    input: BoxStream<'static, ExecInput>,
) -> IoStream<ExecOutput> {
    let engine = engine.clone();
    let id = workload.id().to_string();
    let project = naming::project_name_of(workload);
    stream::once(async move {
        let project = project
            .ok_or_else(|| IoError::Invalid(format!("workload {id} is not a compose project")))?;
        let docker = engine.client().await.map_err(|e| unreachable(&id, &e))?;
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(project_filter(&project)),
                ..Default::default()
            }))
            .await
            .map_err(|e| unreachable(&id, &e))?;
        let replicas = listed.into_iter().filter_map(|summary| {
            let labels = summary.labels.unwrap_or_default();
            if labels.get(ONEOFF_LABEL).is_some_and(|v| v == "True")
                || labels.get(WORKLOAD_ID).is_some_and(|w| *w != id)
            {
                return None;
            }
            Some(Replica {
                service: labels.get(SERVICE_LABEL)?.clone(),
                number: labels
                    .get(NUMBER_LABEL)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u32::MAX),
                running: summary.state == Some(ContainerSummaryStateEnum::RUNNING),
                container: summary.id?,
            })
        });
        let container = pick(&id, &project, options.service.as_deref(), replicas)?;
        session(docker, &id, &container, options, input).await
    })
    .try_flatten()
    .boxed()
}

/// One container of a service, as the engine lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replica {
    service: String,
    number: u32,
    running: bool,
    container: String,
}

/// The container to run in: the named service's (or the only service's)
/// running replica with the lowest number.
fn pick(
    id: &str,
    project: &str,
    service: Option<&str>,
    replicas: impl Iterator<Item = Replica>,
) -> Result<String, IoError> {
    let mut by_service: BTreeMap<String, Vec<Replica>> = BTreeMap::new();
    for replica in replicas {
        by_service
            .entry(replica.service.clone())
            .or_default()
            .push(replica);
    }
    let names = || by_service.keys().cloned().collect::<Vec<_>>().join(", ");
    let (name, replicas) = match service.filter(|s| !s.is_empty()) {
        Some(wanted) => match by_service.get_key_value(wanted) {
            Some(found) => found,
            None if by_service.is_empty() => {
                return Err(IoError::NotReady(format!(
                    "workload {id}: compose project {project} has no containers"
                )));
            }
            None => {
                return Err(IoError::NotFound(format!(
                    "workload {id}: compose project {project} has no service {wanted} (services: {})",
                    names()
                )));
            }
        },
        None => match by_service.len() {
            0 => {
                return Err(IoError::NotReady(format!(
                    "workload {id}: compose project {project} has no containers"
                )));
            }
            1 => by_service
                .iter()
                .next()
                .ok_or_else(|| IoError::NotReady(format!("workload {id}: no service")))?,
            _ => {
                return Err(IoError::Invalid(format!(
                    "service: is required, compose project {project} of workload {id} has several (services: {})",
                    names()
                )));
            }
        },
    };
    replicas
        .iter()
        .filter(|r| r.running)
        .min_by_key(|r| r.number)
        .map(|r| r.container.clone())
        .ok_or_else(|| {
            IoError::NotReady(format!(
                "workload {id}: service {name} has no running container"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(service: &str, number: u32, running: bool) -> Replica {
        Replica {
            service: service.into(),
            number,
            running,
            container: format!("{service}-{number}"),
        }
    }

    #[test]
    fn the_lowest_running_replica_of_the_named_service_runs_the_command() {
        let replicas = vec![
            replica("web", 1, false),
            replica("web", 3, true),
            replica("web", 2, true),
            replica("db", 1, true),
        ];
        let picked = pick("w", "p", Some("web"), replicas.into_iter());
        assert_eq!(picked, Ok("web-2".to_string()));
    }

    #[test]
    fn a_project_of_several_services_needs_one_named() {
        let replicas = vec![replica("web", 1, true), replica("db", 1, true)];
        let Err(IoError::Invalid(text)) = pick("w", "p", None, replicas.clone().into_iter()) else {
            panic!("expected an invalid request");
        };
        assert!(
            text.contains("service") && text.contains("db, web"),
            "{text}"
        );
        let Err(IoError::NotFound(text)) = pick("w", "p", Some("cache"), replicas.into_iter())
        else {
            panic!("expected not found");
        };
        assert!(text.contains("cache") && text.contains("db, web"), "{text}");
    }

    #[test]
    fn a_single_service_needs_no_name_but_a_running_container() {
        let one = vec![replica("web", 1, true)];
        assert_eq!(
            pick("w", "p", None, one.into_iter()),
            Ok("web-1".to_string())
        );
        let stopped = vec![replica("web", 1, false)];
        assert!(matches!(
            pick("w", "p", None, stopped.into_iter()),
            Err(IoError::NotReady(_))
        ));
    }
}
