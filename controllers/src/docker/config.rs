//! How the Docker controller is set up.

use std::time::Duration;

use super::credentials::RegistryAuthFile;
use super::validate::HostPathPolicy;
use crate::backoff::Backoff;
use crate::crash_loop::CrashLoopPolicy;

/// The scope an agent labels its containers with unless told otherwise.
pub const DEFAULT_SCOPE: &str = "default";

/// How long an image pull may run unless `PERSYS_PULL_TIMEOUT` says.
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Image pulls running at once unless `PERSYS_MAX_CONCURRENT_PULLS` says:
/// the engine pulls layers in parallel itself (3 per pull by default), so a
/// few pulls fill a node's link.
pub const DEFAULT_PULL_CONCURRENCY: usize = 2;

/// Settings of a [`super::DockerController`].
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Engine address (`unix:///var/run/docker.sock`, `tcp://host:2375`);
    /// none: `DOCKER_HOST`, else the default socket.
    pub host: Option<String>,
    /// Value of the `persys.scope` label: an agent adopts, watches and
    /// collects only containers of its own scope, so two agents (or
    /// parallel test runs) sharing an engine leave each other alone.
    pub scope: String,
    /// A managed container whose workload is gone is removed after this
    /// long. Longer than the scheduler's 300 s re-list, so an agent that lost
    /// its state gets the workload re-applied and adopts the container
    /// instead of recreating it.
    pub orphan_grace: Duration,
    /// Crash-loop back-off (kubelet: 10 s doubling to 5 min, reset after
    /// 10 min of running).
    pub crash_loop: CrashLoopPolicy,
    /// Back-off between pulls of an image that failed to pull (kubelet's
    /// ImagePullBackOff: 10 s doubling to 5 min).
    pub pull_backoff: Backoff,
    /// An image pull still running after this long is abandoned and the
    /// workload fails with IMAGE_PULL_FAILED, so a registry that never
    /// answers cannot hold a controller slot (`PERSYS_PULL_TIMEOUT`).
    pub pull_timeout: Duration,
    /// Image pulls running at once (`PERSYS_MAX_CONCURRENT_PULLS`). Pulls
    /// run outside the reconcile slots, so slow pulls wait for these and
    /// never for, or in, a slot a quick reconcile needs.
    pub pull_concurrency: usize,
    /// A Docker `config.json` pulls take registry credentials from
    /// (`credHelpers`, `credsStore`, `auths`); none: anonymous pulls.
    pub registry_auth: Option<RegistryAuthFile>,
    /// Which host paths containers may bind-mount.
    pub host_paths: HostPathPolicy,
    /// Log lines put into `last_error` when a container fails.
    pub log_tail_lines: usize,
    /// Reconnect back-off of the `/events` stream after the engine went away.
    pub events_backoff: Backoff,
    /// How often running containers' usage is sampled.
    pub usage_interval: Duration,
    /// Stats requests in flight at once where usage comes from the
    /// engine's stats (each takes about a second: the engine samples twice
    /// to compute CPU use); unused on the cgroup path.
    pub usage_concurrency: usize,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: None,
            scope: DEFAULT_SCOPE.to_string(),
            orphan_grace: Duration::from_secs(600),
            crash_loop: CrashLoopPolicy::default(),
            pull_backoff: Backoff {
                base: Duration::from_secs(10),
                cap: Duration::from_secs(300),
                jitter: 0.0,
            },
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            pull_concurrency: DEFAULT_PULL_CONCURRENCY,
            registry_auth: None,
            host_paths: HostPathPolicy::default(),
            log_tail_lines: 20,
            events_backoff: Backoff {
                base: Duration::from_millis(250),
                cap: Duration::from_secs(5),
                jitter: 0.2,
            },
            usage_interval: Duration::from_secs(15),
            usage_concurrency: 4,
        }
    }
}
