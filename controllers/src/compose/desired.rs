//! What a compose workload asks for, read from its spec and stored status
//! without touching anything: the plan's first input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use persys_api::v1::{ActualState, ComposeSpec, DesiredState, Workload, workload_spec};
use serde_yaml_ng::Value;

use super::adopt::{self, GoProject};
use super::binds::{Binds, Resolved, binds_of};
use super::cli::ComposeEnvironment;
use super::document;
use super::errors::ComposeError;
use super::naming::{self, project_name_of};
use super::project::{Override, ProjectDir, ProjectFiles, render_env, render_override};
use super::restarts::{Restarts, restarts_of};
use super::services::DeclaredServices;
use super::validate::validate_compose_spec;

/// The project a valid spec describes, ready to write and run.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// The compose project name: the label its containers are found by.
    pub(crate) project: String,
    /// Where the files are written and compose runs.
    pub(crate) dir: ProjectDir,
    pub(crate) files: ProjectFiles,
    /// What "every service runs" means for this file.
    pub(crate) declared: DeclaredServices,
    /// The restart policy each service asks for, which the agent applies.
    pub(crate) restarts: Restarts,
    /// Services whose file sets `deploy.restart_policy`.
    pub(crate) deploy_restarts: BTreeSet<String>,
    /// The bind mounts of the interpolated file: resolved and checked
    /// before every `up`.
    pub(crate) binds: Binds,
    /// The file's `version`, which the override repeats.
    pub(crate) version: Option<Value>,
    /// The Go agent's project the workload runs as, if it does.
    pub(crate) go: Option<GoProject>,
    /// How the Go agent's files differ from the spec, when it is not
    /// adopted yet; none: they say the same.
    pub(crate) go_difference: Option<String>,
}

impl Prepared {
    /// Runs the workload as the Go agent's project, when there is one
    /// (`super::adopt`): under its name, whatever the spec's
    /// `project_name`. Blocking (file reads).
    pub(crate) fn take_go_project(&mut self, workload: &Workload, go_root: Option<&Path>) {
        if let Some(go) = adopt::find(&self.dir, go_root, workload.id()) {
            self.project = go.name.clone();
            self.files.project = format!("{}\n", go.name);
            if !go.adopted
                && let (Some(go_dir), Some(workload_spec::Spec::Compose(spec))) =
                    (&go.dir, workload.workload_spec())
            {
                self.go_difference = adopt::difference(go_dir, &self.files.compose, &spec.env);
            }
            self.go = Some(go);
        }
    }

    /// The override file for workload `id`, with `binds` (resolved right
    /// before an `up`, or none).
    pub(crate) fn override_file(&self, id: &str, binds: &[Resolved]) -> String {
        let extra = Override {
            restarts: &self.restarts,
            deploy_restarts: &self.deploy_restarts,
            binds,
        };
        render_override(id, self.version.as_ref(), &self.declared, extra)
    }
}

/// A workload with a valid spec, as the plan needs it: the project, and the
/// few facts of the workload that decide what to do with it.
#[derive(Debug, Clone)]
pub(crate) struct Desired {
    /// The workload, for events, errors and memory.
    pub(crate) id: String,
    /// The spec's hash: the project is brought up again when it differs
    /// from the one recorded at the last `up`.
    pub(crate) hash: String,
    /// For the `Up` event.
    pub(crate) revision: String,
    /// The desired state is stopped (unspecified means running).
    pub(crate) stopped: bool,
    /// The stored status says stopped: a start then is not a repair.
    pub(crate) reported_stopped: bool,
    /// The stored restart count, carried over when this process first
    /// sees the workload.
    pub(crate) restarts: i32,
    /// What to run.
    pub(crate) prepared: Prepared,
}

impl Desired {
    /// [`Desired::read`] on a blocking thread: the compose file is parsed
    /// (up to 1 MiB and 100,000 nodes), which is no work for the async
    /// runtime's threads. None when the runtime is shutting down.
    pub(crate) async fn read_off_runtime(
        workload: Arc<Workload>,
        (root, go_root): (PathBuf, Option<PathBuf>),
        environment: ComposeEnvironment,
    ) -> Option<Result<Desired, ComposeError>> {
        let read = move || {
            let mut desired = Desired::read(&workload, &root, &environment)?;
            desired
                .prepared
                .take_go_project(&workload, go_root.as_deref());
            Ok(desired)
        };
        match tokio::task::spawn_blocking(read).await {
            Ok(read) => Some(read),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => None,
        }
    }

    /// The workload's spec, checked and rendered into project files under
    /// `root`, interpolated as compose will in `environment`;
    /// `InvalidSpec` when it cannot run as it is.
    pub(crate) fn read(
        workload: &Workload,
        root: &Path,
        environment: &ComposeEnvironment,
    ) -> Result<Desired, ComposeError> {
        let status = workload.status.as_ref();
        Ok(Desired {
            id: workload.id().to_string(),
            hash: workload.spec_hash(),
            revision: workload.revision_id().to_string(),
            stopped: workload.desired_state() == DesiredState::Stopped,
            reported_stopped: status.map(|s| s.actual_state()) == Some(ActualState::Stopped),
            restarts: status.map(|s| s.restart_count).unwrap_or(0),
            prepared: prepare(workload, root, environment)?,
        })
    }
}

/// The spec, checked and rendered into project files; its file read as
/// compose will interpolate it in `environment` (the restart policies and
/// bind mounts it asks for).
pub(crate) fn prepare(
    workload: &Workload,
    root: &Path,
    environment: &ComposeEnvironment,
) -> Result<Prepared, ComposeError> {
    let id = workload.id();
    let invalid = |message: String| ComposeError::InvalidSpec {
        id: id.to_string(),
        message,
    };
    let spec: &ComposeSpec = match workload.workload_spec() {
        Some(workload_spec::Spec::Compose(spec)) => spec,
        _ => return Err(invalid("a compose workload needs a compose spec".into())),
    };
    let dir = ProjectDir::for_workload(root, id)
        .ok_or_else(|| invalid(format!("id {id:?} cannot name a project folder")))?;
    let project = project_name_of(workload).unwrap_or_default();
    if !naming::is_valid_project_name(&project) {
        return Err(invalid(format!(
            "spec.compose.project_name: {project:?} is not a valid compose project name"
        )));
    }
    let valid = validate_compose_spec(spec).map_err(|e| invalid(e.to_string()))?;
    let file = |why: String| invalid(format!("spec.compose.compose_yaml: {why}"));
    let version = valid.document.get("version").cloned();
    let mut interpolated = valid.document;
    let vars = environment.interpolation(&spec.env, &project);
    document::interpolate(&mut interpolated, &vars, "")
        .map_err(|why| file(format!("{why} (compose would fail to interpolate it)")))?;
    let restarts = restarts_of(&interpolated).map_err(file)?;
    let mut prepared = Prepared {
        files: ProjectFiles {
            compose: valid.text,
            env: render_env(&spec.env),
            labels: String::new(),
            project: format!("{project}\n"),
        },
        project,
        dir,
        declared: valid.declared,
        restarts,
        deploy_restarts: deploy_restarts(&interpolated),
        binds: binds_of(&interpolated),
        version,
        go: None,
        go_difference: None,
    };
    prepared.files.labels = prepared.override_file(id, &[]);
    Ok(prepared)
}

/// The services whose file sets `deploy.restart_policy`.
fn deploy_restarts(document: &Value) -> BTreeSet<String> {
    document
        .get("services")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter(|(_, service)| !service["deploy"]["restart_policy"].is_null())
        .filter_map(|(name, _)| name.as_str().map(String::from))
        .collect()
}

#[cfg(test)]
impl Desired {
    /// A workload `shop` running web and db, of spec `hash`, with 4
    /// restarts in its stored status.
    pub(crate) fn example(hash: &str, stopped: bool) -> Desired {
        let dir = ProjectDir::for_workload(Path::new("/nowhere"), "shop");
        Desired {
            id: "shop".into(),
            hash: hash.into(),
            revision: "r2".into(),
            stopped,
            reported_stopped: false,
            restarts: 4,
            prepared: Prepared {
                project: "shop".into(),
                dir: dir.expect("a safe id"),
                files: ProjectFiles {
                    compose: String::new(),
                    env: String::new(),
                    labels: String::new(),
                    project: "shop\n".into(),
                },
                declared: [("web".to_string(), 1), ("db".to_string(), 1)].into(),
                restarts: Restarts::new(),
                deploy_restarts: BTreeSet::new(),
                binds: Binds::default(),
                version: None,
                go: None,
                go_difference: None,
            },
        }
    }
}
