//! How the Compose controller is set up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::crash_loop::CrashLoopPolicy;
use crate::docker::HostPathPolicy;
use crate::policy::DEFAULT_VOLUME_ROOT;

/// Settings of a [`super::ComposeController`].
#[derive(Debug, Clone)]
pub struct ComposeConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`);
    /// none: `DOCKER_HOST`, else the default socket. The compose CLI is
    /// pointed at the same engine through its `DOCKER_HOST`.
    pub host: Option<String>,
    /// Where project folders live: `<PERSYS_STATE_PATH>/compose`. Each
    /// workload gets `<project_root>/<id>/`; the folders are also how
    /// orphans are found after a restart.
    pub project_root: PathBuf,
    /// `PERSYS_COMPOSE_BINARY`: a path or a command line such as
    /// `docker compose`; none: `docker compose` (v2), then `docker-compose`
    /// (v1).
    pub binary: Option<String>,
    /// `PERSYS_COMPOSE_TIMEOUT`: a compose command still running after this
    /// long is killed with its whole process group.
    pub command_timeout: Duration,
    /// Compose commands running at once. Each is a process (v1 is a Python
    /// program of ~40 MB), so a burst of applies must not start hundreds.
    pub max_concurrent_commands: usize,
    /// A project folder whose workload is gone is taken down after this
    /// long: longer than the scheduler's 300 s re-list, so an agent that
    /// lost its state gets the workload re-applied and adopts the project.
    pub orphan_grace: Duration,
    /// Which host paths services may bind-mount: the container rule. Every
    /// bind source is resolved and checked against it before every `up`,
    /// and the engine is given the resolved path.
    pub host_paths: HostPathPolicy,
    /// Back-off between repairs of a project whose services keep exiting
    /// (kubelet's 10 s doubling to 5 min, reset after 10 min).
    pub crash_loop: CrashLoopPolicy,
    /// Back-off between compose commands that failed (a pull, a taken
    /// port…), also when engine events ask for a reconcile sooner.
    pub failure_backoff: Backoff,
    /// Reconnect back-off of the `/events` stream after the engine went away.
    pub events_backoff: Backoff,
    /// `DOCKER_CONFIG` of every compose process: the directory of the
    /// `config.json` container pulls take credentials from, so compose
    /// pulls with the same ones. None: the agent's own `DOCKER_CONFIG`, or
    /// `$HOME/.docker`.
    pub docker_config: Option<PathBuf>,
    /// Where the Go agent kept its project folders (`/var/lib/persys/compose`
    /// beside the state directory `/var/lib/persys/state` an upgrade
    /// makes): a workload whose folder is there runs as the Go agent's
    /// project (see `super::adopt`). None: no Go agent to take over from.
    pub go_project_root: Option<PathBuf>,
}

impl ComposeConfig {
    /// The defaults, with project folders under `<state_path>/compose`,
    /// and bind sources only under the node policy's default root (never
    /// the state directory).
    pub fn new(state_path: &Path) -> ComposeConfig {
        ComposeConfig {
            host: None,
            project_root: state_path.join("compose"),
            binary: None,
            command_timeout: Duration::from_secs(300),
            max_concurrent_commands: 4,
            orphan_grace: Duration::from_secs(600),
            host_paths: HostPathPolicy::new(
                Some(state_path),
                vec![PathBuf::from(DEFAULT_VOLUME_ROOT)],
            ),
            crash_loop: CrashLoopPolicy::default(),
            failure_backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(300),
                jitter: 0.0,
            },
            events_backoff: Backoff {
                base: Duration::from_millis(250),
                cap: Duration::from_secs(5),
                jitter: 0.2,
            },
            docker_config: None,
            go_project_root: state_path
                .parent()
                .map(|parent| parent.join("compose"))
                .filter(|root| *root != state_path.join("compose")),
        }
    }
}
