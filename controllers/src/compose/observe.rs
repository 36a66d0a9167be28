//! A project as the engine has it: its containers, found by compose's own
//! `com.docker.compose.project` label — never by parsing `compose ps`
//! (v1 has no machine-readable output).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bollard::Docker;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};

use persys_api::v1::Workload;

use super::desired::Desired;
use super::errors::{ComposeError, Operation};
use super::naming;
use super::runtime::ComposeRuntime;
use super::services::DeclaredServices;

/// The label compose puts on everything of a project, with its name.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// The service a container runs.
pub(crate) const SERVICE_LABEL: &str = "com.docker.compose.service";
/// `True` on `compose run` containers, which are not the project's services.
pub(crate) const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// What a container is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContainerState {
    Running,
    /// The engine restarts it (a compose `restart:` policy).
    Restarting,
    Paused,
    Created,
    Exited,
    Dead,
    Removing,
}

impl ContainerState {
    fn from_summary(state: Option<ContainerSummaryStateEnum>) -> ContainerState {
        match state {
            Some(ContainerSummaryStateEnum::RUNNING) => ContainerState::Running,
            Some(ContainerSummaryStateEnum::RESTARTING) => ContainerState::Restarting,
            Some(ContainerSummaryStateEnum::PAUSED) => ContainerState::Paused,
            Some(ContainerSummaryStateEnum::CREATED) => ContainerState::Created,
            Some(ContainerSummaryStateEnum::EXITED) => ContainerState::Exited,
            Some(ContainerSummaryStateEnum::REMOVING) => ContainerState::Removing,
            _ => ContainerState::Dead,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ContainerState::Running => "running",
            ContainerState::Restarting => "restarting",
            ContainerState::Paused => "paused",
            ContainerState::Created => "created",
            ContainerState::Exited => "exited",
            ContainerState::Dead => "dead",
            ContainerState::Removing => "removing",
        }
    }

    /// Still holds its process (what `compose stop` stops).
    pub(crate) fn is_up(self) -> bool {
        matches!(
            self,
            ContainerState::Running | ContainerState::Restarting | ContainerState::Paused
        )
    }
}

/// One container of the project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceContainer {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) state: ContainerState,
    /// For a container that has stopped.
    pub(crate) exit_code: Option<i64>,
}

/// The project's containers by service (`compose run` ones left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) by_service: BTreeMap<String, Vec<ServiceContainer>>,
}

impl Observed {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_service.values().all(Vec::is_empty)
    }

    pub(crate) fn containers(&self) -> impl Iterator<Item = &ServiceContainer> {
        self.by_service.values().flatten()
    }

    /// True when any container still runs (or restarts, or is paused).
    pub(crate) fn any_up(&self) -> bool {
        self.containers().any(|c| c.state.is_up())
    }
}

/// The engine-side filter selecting one project's containers.
pub(crate) fn project_filter(project: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![format!("{PROJECT_LABEL}={project}")],
    )])
}

/// The containers of `project` now. Stopped ones are inspected for their
/// exit code (the list does not carry it).
pub(crate) async fn observe(
    docker: &Docker,
    id: &str,
    project: &str,
) -> Result<Observed, ComposeError> {
    let listed = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(project_filter(project)),
            ..Default::default()
        }))
        .await
        .map_err(|e| ComposeError::engine(id, Operation::ListContainers, e))?;
    let mut observed = Observed::default();
    for summary in listed {
        let labels = summary.labels.clone().unwrap_or_default();
        if labels.get(ONEOFF_LABEL).is_some_and(|v| v == "True") {
            continue;
        }
        let Some(container_id) = summary.id.clone() else {
            continue;
        };
        let service = labels.get(SERVICE_LABEL).cloned().unwrap_or_default();
        let name = summary
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| container_id.chars().take(12).collect());
        let state = ContainerState::from_summary(summary.state);
        let exit_code = if matches!(state, ContainerState::Exited | ContainerState::Dead) {
            match docker
                .inspect_container(&container_id, None::<InspectContainerOptions>)
                .await
            {
                Ok(found) => found.state.and_then(|s| s.exit_code),
                // Removed in between: it is gone, as the next list will say.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => continue,
                Err(e) => return Err(ComposeError::engine(id, Operation::InspectContainer, e)),
            }
        } else {
            None
        };
        observed
            .by_service
            .entry(service)
            .or_default()
            .push(ServiceContainer {
                id: container_id,
                name,
                state,
                exit_code,
            });
    }
    for containers in observed.by_service.values_mut() {
        containers.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(observed)
}

/// Everything a reconcile decides from, read before anything is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Observation {
    /// Another live workload that runs the spec's project name. When set,
    /// nothing else was looked at: the project is not this workload's.
    pub(crate) owner: Option<String>,
    /// The project the folder was last written for, when the spec renamed
    /// it and no other workload runs that name: left over, to take down.
    pub(crate) renamed_from: Option<String>,
    /// The spec hash of the last successful `up`.
    pub(crate) brought_up: Option<String>,
    /// The project's containers.
    pub(crate) containers: Observed,
}

impl Observation {
    /// Reads the project of `desired` from the informer's `workloads`, the
    /// project folder and the engine (connected first, so an unreachable
    /// one is the error).
    pub(crate) async fn read(
        runtime: &ComposeRuntime,
        workloads: &[Arc<Workload>],
        desired: &Desired,
    ) -> Result<Observation, ComposeError> {
        let (id, prepared) = (desired.id.as_str(), &desired.prepared);
        let other = |project: &str| naming::owner(project, workloads).filter(|w| w.id() != id);
        if let Some(owner) = other(&prepared.project) {
            return Ok(Observation {
                owner: Some(owner.id().to_string()),
                ..Default::default()
            });
        }
        runtime.docker(id).await?;
        let renamed_from = prepared
            .dir
            .recorded_project()
            .await
            .filter(|previous| *previous != prepared.project && other(previous).is_none());
        Ok(Observation {
            owner: None,
            renamed_from,
            brought_up: prepared.dir.recorded_hash().await,
            containers: runtime.containers(id, &prepared.project).await?,
        })
    }
}

/// How one service is doing against its declared scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceReport {
    pub(crate) name: String,
    /// Containers that should run.
    pub(crate) scale: u32,
    pub(crate) running: u32,
    /// `running`, `restarting`, `exited`, `created`, `missing`…
    pub(crate) state: &'static str,
    /// Of a stopped container, when the service is not running.
    pub(crate) exit_code: Option<i64>,
    /// Not in the compose file any more.
    pub(crate) orphan: bool,
}

impl ServiceReport {
    pub(crate) fn is_satisfied(&self) -> bool {
        !self.orphan && self.running >= self.scale
    }
}

/// Every declared service, and every service found that is not declared.
pub(crate) fn assess(declared: &DeclaredServices, observed: &Observed) -> Vec<ServiceReport> {
    let empty = Vec::new();
    let mut reports = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        declared.keys().chain(observed.by_service.keys()).collect();
    for name in names {
        let containers = observed.by_service.get(name).unwrap_or(&empty);
        let scale = declared.get(name).copied();
        if scale == Some(0) && containers.is_empty() {
            continue;
        }
        let running = containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .count() as u32;
        let not_running = containers
            .iter()
            .find(|c| c.state != ContainerState::Running);
        let state = match (scale, not_running) {
            (Some(scale), _) if running >= scale && running > 0 => "running",
            (Some(0), None) => "running",
            (_, Some(c)) => c.state.as_str(),
            (_, None) if running > 0 => "running",
            _ => "missing",
        };
        reports.push(ServiceReport {
            name: name.clone(),
            scale: scale.unwrap_or(0),
            running,
            state,
            exit_code: if state == "running" {
                None
            } else {
                not_running.and_then(|c| c.exit_code)
            },
            orphan: scale.is_none(),
        });
    }
    reports
}

/// `web, db`.
pub(crate) fn names(services: &[ServiceReport]) -> String {
    services
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `web exited (code 3), db missing`.
pub(crate) fn describe<'a>(services: impl IntoIterator<Item = &'a ServiceReport>) -> String {
    services
        .into_iter()
        .map(|s| match s.exit_code {
            Some(code) => format!("{} {} (code {code})", s.name, s.state),
            None => format!("{} {}", s.name, s.state),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
impl Observation {
    /// A project of these services' containers, brought up from `hash`.
    pub(crate) fn example(
        services: &[(&str, ContainerState, Option<i64>)],
        hash: &str,
    ) -> Observation {
        let mut containers = Observed::default();
        for &(service, state, exit_code) in services {
            let container = ServiceContainer {
                id: format!("id-{service}"),
                name: format!("shop-{service}-1"),
                state,
                exit_code,
            };
            let by_service = containers.by_service.entry(service.into());
            by_service.or_default().push(container);
        }
        Observation {
            brought_up: Some(hash.into()),
            containers,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, state: ContainerState, exit_code: Option<i64>) -> ServiceContainer {
        ServiceContainer {
            id: format!("id-{name}"),
            name: name.into(),
            state,
            exit_code,
        }
    }

    #[test]
    fn services_are_assessed_against_their_scale() {
        let declared = DeclaredServices::from([
            ("web".to_string(), 1),
            ("db".to_string(), 1),
            ("workers".to_string(), 2),
            ("cache".to_string(), 1),
            ("off".to_string(), 0),
        ]);
        let observed = Observed {
            by_service: BTreeMap::from([
                (
                    "web".to_string(),
                    vec![container("p_web_1", ContainerState::Running, None)],
                ),
                (
                    "db".to_string(),
                    vec![container("p_db_1", ContainerState::Exited, Some(3))],
                ),
                (
                    "workers".to_string(),
                    vec![
                        container("p_workers_1", ContainerState::Running, None),
                        container("p_workers_2", ContainerState::Restarting, None),
                    ],
                ),
                (
                    "gone".to_string(),
                    vec![container("p_gone_1", ContainerState::Running, None)],
                ),
            ]),
        };
        let reports = assess(&declared, &observed);
        let by_name: BTreeMap<_, _> = reports.iter().map(|r| (r.name.as_str(), r)).collect();
        assert!(by_name["web"].is_satisfied());
        assert_eq!(by_name["web"].state, "running");
        assert!(!by_name["db"].is_satisfied());
        assert_eq!(
            (by_name["db"].state, by_name["db"].exit_code),
            ("exited", Some(3))
        );
        assert_eq!(
            (by_name["workers"].state, by_name["workers"].running),
            ("restarting", 1)
        );
        assert_eq!(by_name["cache"].state, "missing");
        assert!(by_name["gone"].orphan && !by_name["gone"].is_satisfied());
        assert!(
            !by_name.contains_key("off"),
            "scale 0 and absent: nothing to say"
        );
        assert!(observed.any_up());
    }
}
