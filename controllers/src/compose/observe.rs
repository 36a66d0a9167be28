//! A project as the engine has it: its containers, found by compose's own
//! `com.docker.compose.project` label — never by parsing `compose ps`
//! (v1 has no machine-readable output).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerStateStatusEnum, ContainerSummaryStateEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};

use persys_api::v1::Workload;

use super::desired::Desired;
use super::errors::{ComposeError, Operation};
use super::naming;
use super::restarts::RESTART_LABEL;
use super::runtime::ComposeRuntime;
use super::services::DeclaredServices;
use crate::docker::labels::{MANAGED, WORKLOAD_ID};

/// The label compose puts on everything of a project, with its name.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// The service a container runs.
pub(crate) const SERVICE_LABEL: &str = "com.docker.compose.service";
/// `True` on `compose run` containers, which are not the project's services.
pub(crate) const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// Containers the engine reported dead (a `die` event) and not started
/// since: the engine publishes `die` before its list shows the container
/// exited, so a list that still says running is checked with an inspect,
/// which reads the container itself. Filled by the event trigger, read by
/// every observation; shared (a clone is the same set).
#[derive(Debug, Clone, Default)]
pub(crate) struct Exits {
    died: Arc<Mutex<HashMap<String, Instant>>>,
}

/// How long a `die` is remembered: long past any lag of the list.
const EXIT_MEMORY: Duration = Duration::from_secs(120);

impl Exits {
    fn died_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.died.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine reported `action` of container `cid`.
    pub(crate) fn record(&self, action: &str, cid: &str) {
        let mut died = self.died_map();
        match action {
            "die" => {
                died.retain(|_, at| at.elapsed() < EXIT_MEMORY);
                died.insert(cid.to_string(), Instant::now());
            }
            "start" => {
                died.remove(cid);
            }
            _ => {}
        }
    }

    /// True when container `cid` died and has not started since.
    pub(crate) fn died(&self, cid: &str) -> bool {
        self.died_map()
            .get(cid)
            .is_some_and(|at| at.elapsed() < EXIT_MEMORY)
    }
}

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
    /// The state an inspect reports.
    fn from_inspect(state: Option<ContainerStateStatusEnum>) -> ContainerState {
        match state {
            Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
            Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
            Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
            Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
            Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
            Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
            _ => ContainerState::Dead,
        }
    }

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
    /// The workload the agent's labels say it is of (`persys.managed=true`
    /// and `persys.workload-id`); none on a container the agent did not
    /// label.
    pub(crate) workload: Option<String>,
    /// The restart policy its service asked for, as the agent's override
    /// recorded it ([`super::restarts::RESTART_LABEL`]); none on a
    /// container made before the agent took restarts from the engine.
    pub(crate) asked_restart: Option<String>,
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

    /// True when every container carries the agent's labels for workload
    /// `id` (and there is at least one).
    pub(crate) fn labelled_for(&self, id: &str) -> bool {
        !self.is_empty() && self.containers().all(|c| c.workload.as_deref() == Some(id))
    }
}

/// Why a project found on the engine is not the workload's to take over,
/// if it is not: the adoption rule. A project is the workload's when it
/// has no containers yet, when every container carries the agent's labels
/// for the workload, or when the workload's folder under the agent's state
/// records that project (`recorded`). Anything else (a project started by
/// hand, or by another tool, under the same name) is left alone: neither
/// brought up over nor taken down.
pub(crate) fn adoption_refusal(
    id: &str,
    project: &str,
    recorded: bool,
    observed: &Observed,
) -> Option<String> {
    if observed.is_empty() || recorded || observed.labelled_for(id) {
        return None;
    }
    let unlabelled: Vec<&str> = observed
        .containers()
        .filter(|c| c.workload.as_deref() != Some(id))
        .map(|c| c.name.as_str())
        .take(3)
        .collect();
    Some(crate::policy::refusal(
        format_args!(
            "compose project {project} exists but the agent did not make it for workload {id}: its containers ({}) lack the labels {MANAGED}=true and {WORKLOAD_ID}={id}, and no project folder of the workload records it; the adoption rule takes over only the agent's own projects, so it is neither brought up over nor taken down (remove it, or give the workload another project_name)",
            unlabelled.join(", ")
        ),
        crate::policy::ALWAYS,
    ))
}

/// The engine-side filter selecting one project's containers.
pub(crate) fn project_filter(project: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![format!("{PROJECT_LABEL}={project}")],
    )])
}

/// The containers of `project` now. Stopped ones are inspected for their
/// exit code (the list does not carry it), and so are the ones the list
/// shows up though the engine reported them dead (`exits`).
pub(crate) async fn observe(
    docker: &Docker,
    id: &str,
    project: &str,
    exits: &Exits,
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
        let workload = labels
            .get(MANAGED)
            .filter(|v| *v == "true")
            .and(labels.get(WORKLOAD_ID))
            .cloned();
        let asked_restart = labels.get(RESTART_LABEL).cloned();
        let mut state = ContainerState::from_summary(summary.state);
        let stopped = matches!(state, ContainerState::Exited | ContainerState::Dead);
        let exit_code = if stopped || (state.is_up() && exits.died(&container_id)) {
            match docker
                .inspect_container(&container_id, None::<InspectContainerOptions>)
                .await
            {
                Ok(found) => {
                    let found = found.state.unwrap_or_default();
                    state = ContainerState::from_inspect(found.status);
                    found.exit_code.filter(|_| !state.is_up())
                }
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
                workload,
                asked_restart,
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
    /// The project exists but the adoption rule says it is not this
    /// workload's: why ([`adoption_refusal`]).
    pub(crate) foreign: Option<String>,
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
        let containers = runtime.containers(id, &prepared.project).await?;
        // The Go agent's project of the workload is the workload's.
        let recorded = prepared.go.is_some() || prepared.dir.records(&prepared.project, id).await;
        Ok(Observation {
            owner: None,
            foreign: adoption_refusal(id, &prepared.project, recorded, &containers),
            renamed_from,
            brought_up: prepared.dir.recorded_hash().await,
            containers,
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
                workload: Some("shop".into()),
                asked_restart: Some("always".into()),
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

    #[test]
    fn a_died_container_is_checked_until_it_starts_again() {
        let exits = Exits::default();
        let shared = exits.clone();
        assert!(!exits.died("c1"));
        shared.record("die", "c1");
        assert!(exits.died("c1"), "a clone records for all");
        assert!(!exits.died("c2"));
        shared.record("kill", "c1");
        assert!(exits.died("c1"), "only a start ends it");
        shared.record("start", "c1");
        assert!(!exits.died("c1"));
    }

    fn container(name: &str, state: ContainerState, exit_code: Option<i64>) -> ServiceContainer {
        ServiceContainer {
            id: format!("id-{name}"),
            name: name.into(),
            state,
            exit_code,
            workload: None,
            asked_restart: None,
        }
    }

    #[test]
    fn only_a_project_labelled_or_recorded_for_the_workload_is_adopted() {
        let of = |workloads: &[Option<&str>]| Observed {
            by_service: BTreeMap::from([(
                "web".to_string(),
                workloads
                    .iter()
                    .enumerate()
                    .map(|(i, w)| ServiceContainer {
                        workload: w.map(String::from),
                        ..container(&format!("p-web-{i}"), ContainerState::Running, None)
                    })
                    .collect(),
            )]),
        };
        assert_eq!(
            adoption_refusal("shop", "p", false, &Observed::default()),
            None
        );
        assert_eq!(
            adoption_refusal("shop", "p", false, &of(&[Some("shop")])),
            None
        );
        assert_eq!(adoption_refusal("shop", "p", true, &of(&[None])), None);
        for foreign in [of(&[None]), of(&[Some("other")]), of(&[Some("shop"), None])] {
            let why = adoption_refusal("shop", "p", false, &foreign).unwrap();
            assert!(why.contains("compose project p exists"), "{why}");
            assert!(why.contains("adoption rule"), "{why}");
            assert!(why.contains("whatever the policy"), "{why}");
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
