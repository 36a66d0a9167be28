//! The Compose runtime as the controller acts on it: the compose CLI (found
//! once, forgotten when it disappears, looked for again on every use until
//! found), the processes that run it, and the engine the projects'
//! containers are read and removed through.

use std::sync::atomic::{AtomicBool, Ordering};

use bollard::Docker;
use bollard::query_parameters::{
    ListNetworksOptions, RemoveContainerOptions, StopContainerOptions,
};

use super::binary::{self, ComposeBinary, DetectError};
use super::cli::{self, ComposeEnvironment, Verb};
use super::command::{CommandRunner, Output, RunError};
use super::config::ComposeConfig;
use super::errors::{ComposeError, FailureReason, Operation, classify_stderr};
use super::observe::{self, Exits, Observed, project_filter};
use super::project::ProjectDir;
use crate::docker::{Engine, EngineVersion};

/// The facade every compose command and engine call goes through, so the
/// detected CLI is cached in one place and dropped in the same place when
/// it can no longer be started.
pub(crate) struct ComposeRuntime {
    engine: Engine,
    runner: CommandRunner,
    /// `PERSYS_COMPOSE_BINARY`, if set.
    configured: Option<String>,
    /// The detected compose CLI. A tokio mutex: held across the detection,
    /// so concurrent reconciles detect once. Empty until a detection
    /// succeeds; cleared when the binary disappears.
    binary: tokio::sync::Mutex<Option<ComposeBinary>>,
    /// Whether the last detection found nothing, or the detected CLI could
    /// no longer be started.
    missing: AtomicBool,
    /// Bumped when a compose CLI is found after it was missing, so the
    /// workloads that failed for want of it run at once rather than on
    /// their back-off (which grows to minutes): see [`Self::found_again`].
    found_again: tokio::sync::watch::Sender<u64>,
    /// The environment of every compose process: the allow-list of the
    /// agent's own, read once here, and `DOCKER_HOST`. Never a spec's.
    environment: ComposeEnvironment,
    /// Containers reported dead by the engine's events, for every
    /// observation (shared with the event trigger).
    pub(crate) exits: Exits,
}

impl ComposeRuntime {
    /// Contacts neither the engine nor the CLI: both are found on first use.
    pub(crate) fn new(config: &ComposeConfig) -> Self {
        let engine = Engine::new(config.host.clone());
        let mut environment = ComposeEnvironment::new(std::env::vars(), engine.host());
        if let Some(dir) = &config.docker_config {
            environment = environment.with_docker_config(dir);
        }
        ComposeRuntime {
            environment,
            engine,
            runner: CommandRunner::new(config.max_concurrent_commands, config.command_timeout),
            configured: config.binary.clone(),
            binary: tokio::sync::Mutex::new(None),
            missing: AtomicBool::new(false),
            found_again: tokio::sync::watch::Sender::new(0),
            exits: Exits::default(),
        }
    }

    /// Changes each time a compose CLI is found after a detection found
    /// none (or the one found could no longer be started). The health
    /// probe looks for it every few seconds, so an installed compose is
    /// noticed within one probe.
    pub(crate) fn found_again(&self) -> tokio::sync::watch::Receiver<u64> {
        self.found_again.subscribe()
    }

    /// The environment of every compose process, which is also what
    /// compose interpolates a file from (under the spec's `.env`).
    pub(crate) fn environment(&self) -> &ComposeEnvironment {
        &self.environment
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's version: half of the health probe.
    pub(crate) async fn engine_version(&self) -> Result<EngineVersion, bollard::errors::Error> {
        self.engine.version().await
    }

    /// The compose CLI, detected on first use.
    pub(crate) async fn binary(&self) -> Result<ComposeBinary, DetectError> {
        let mut cached = self.binary.lock().await;
        if let Some(found) = cached.as_ref() {
            return Ok(found.clone());
        }
        let detected = binary::detect(
            self.configured.as_deref(),
            &self.environment.for_command(None),
        )
        .await;
        let found = match detected {
            Ok(found) => found,
            Err(error) => {
                self.missing.store(true, Ordering::Relaxed);
                return Err(error);
            }
        };
        tracing::info!(compose = %found, "compose CLI detected");
        *cached = Some(found.clone());
        if self.missing.swap(false, Ordering::Relaxed) {
            self.found_again.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(found)
    }

    /// The compose CLI, or why there is none, as the workload's error.
    pub(crate) async fn binary_for(&self, id: &str) -> Result<ComposeBinary, ComposeError> {
        self.binary()
            .await
            .map_err(|source| ComposeError::NoBinary {
                id: id.to_string(),
                source,
            })
    }

    /// The engine client, connecting on first use.
    pub(crate) async fn docker(&self, id: &str) -> Result<Docker, ComposeError> {
        self.engine
            .client()
            .await
            .map_err(|e| ComposeError::engine(id, Operation::Connect, e))
    }

    /// The containers of `project` now.
    pub(crate) async fn containers(
        &self,
        id: &str,
        project: &str,
    ) -> Result<Observed, ComposeError> {
        observe::observe(&self.docker(id).await?, id, project, &self.exits).await
    }

    /// Runs `verb` on a project (limited to `services`, if any); a
    /// non-zero exit is a classified error.
    pub(crate) async fn run(
        &self,
        id: &str,
        binary: &ComposeBinary,
        (project, dir): (&str, &ProjectDir),
        verb: Verb,
        services: &[String],
    ) -> Result<Output, ComposeError> {
        let labelled = dir.has_override().await;
        let command = cli::Command {
            verb,
            services,
            labelled,
        };
        let invocation = cli::invocation(binary, project, dir, command, &self.environment);
        tracing::info!(project, %verb, ?services, compose = %binary.command_line(), "running compose");
        let failed = |reason: FailureReason, detail: String| ComposeError::Command {
            id: id.to_string(),
            verb,
            reason,
            detail,
        };
        match self.runner.run(&invocation).await {
            Ok(output) if output.status.success() => {
                if cli::printed_usage(&output.stdout, &output.stderr) {
                    return Err(failed(
                        FailureReason::RuntimeError,
                        format!(
                            "compose printed its usage instead of running: {}",
                            output.stderr.trim()
                        ),
                    ));
                }
                tracing::debug!(project, %verb, took = ?output.took, "compose finished");
                Ok(output)
            }
            Ok(output) => {
                let stderr = output.stderr.trim();
                let detail = if stderr.is_empty() {
                    format!("exited with {}: {}", output.status, output.stdout.trim())
                } else {
                    stderr.to_string()
                };
                Err(failed(classify_stderr(stderr), detail))
            }
            Err(RunError::Spawn { program, source }) => {
                // Uninstalled or replaced: detect again next time.
                *self.binary.lock().await = None;
                self.missing.store(true, Ordering::Relaxed);
                Err(failed(
                    FailureReason::RuntimeError,
                    format!("could not start {program}: {source}"),
                ))
            }
            Err(error) => Err(failed(FailureReason::RuntimeError, error.to_string())),
        }
    }

    /// Stops what `compose stop` left up: containers of services no longer
    /// in the file.
    pub(crate) async fn stop_leftovers(&self, id: &str, project: &str) -> Result<(), ComposeError> {
        let docker = self.docker(id).await?;
        let observed = observe::observe(&docker, id, project, &self.exits).await?;
        for container in observed.containers().filter(|c| c.state.is_up()) {
            tracing::info!(container = %container.name, "stopping a container compose left running");
            docker
                .stop_container(&container.id, None::<StopContainerOptions>)
                .await
                .map_err(|e| ComposeError::engine(id, Operation::StopContainer, e))?;
        }
        Ok(())
    }

    /// Takes a project down: `compose down --remove-orphans` when the folder
    /// and a compose CLI allow, then whatever is left of it (containers,
    /// networks; never volumes) through the engine, so a delete completes
    /// even when the compose file no longer parses.
    pub(crate) async fn take_down(
        &self,
        id: &str,
        project: &str,
        dir: &ProjectDir,
    ) -> Result<(), ComposeError> {
        let docker = self.docker(id).await?;
        if dir.exists().await {
            match self.binary().await {
                Ok(binary) => {
                    if let Err(error) = self.run(id, &binary, (project, dir), Verb::Down, &[]).await
                    {
                        tracing::warn!(%error, "compose down failed; removing what is left through the engine");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "no compose CLI; removing the project through the engine");
                }
            }
        }
        let observed = observe::observe(&docker, id, project, &self.exits).await?;
        for container in observed.containers() {
            tracing::info!(container = %container.name, "removing a container compose left behind");
            let options = RemoveContainerOptions {
                force: true,
                v: false,
                link: false,
            };
            match docker.remove_container(&container.id, Some(options)).await {
                Err(e) if !is_not_found(&e) => {
                    return Err(ComposeError::engine(id, Operation::RemoveContainer, e));
                }
                _ => {}
            }
        }
        let networks = docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some(project_filter(project)),
            }))
            .await
            .map_err(|e| ComposeError::engine(id, Operation::ListNetworks, e))?;
        for network in networks {
            let Some(name) = network.id.or(network.name) else {
                continue;
            };
            match docker.remove_network(&name).await {
                Err(e) if !is_not_found(&e) => {
                    return Err(ComposeError::engine(id, Operation::RemoveNetwork, e));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Already gone: what a removal wanted.
fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real docker-compose on PATH; `None` when there is none (the test
    /// is skipped, or fails in CI).
    fn docker_compose(test: &str) -> Option<std::path::PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let found = std::env::split_paths(&path)
            .map(|dir| dir.join("docker-compose"))
            .find(|p| p.is_file());
        if found.is_none() {
            persys_test_support::skip(test, "docker-compose", &"not on PATH");
        }
        found
    }

    fn runtime_with(binary: &std::path::Path, state: &std::path::Path) -> ComposeRuntime {
        ComposeRuntime::new(&ComposeConfig {
            binary: Some(binary.display().to_string()),
            ..ComposeConfig::new(state)
        })
    }

    #[tokio::test]
    async fn a_compose_cli_installed_while_the_agent_runs_is_found_and_announced_once() {
        let Some(real) = docker_compose(
            "a_compose_cli_installed_while_the_agent_runs_is_found_and_announced_once",
        ) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("docker-compose");
        let runtime = runtime_with(&link, dir.path());
        let mut found = runtime.found_again();
        for _ in 0..2 {
            let error = runtime.binary().await.unwrap_err();
            assert!(error.to_string().contains("docker-compose"), "{error}");
        }
        assert!(!found.has_changed().unwrap(), "nothing found yet");

        std::os::unix::fs::symlink(&real, &link).unwrap();
        runtime.binary().await.unwrap();
        assert!(found.has_changed().unwrap(), "found after it was missing");
        found.mark_unchanged();
        runtime.binary().await.unwrap();
        assert!(!found.has_changed().unwrap(), "announced once");

        // Present from the start: nothing was waiting for it.
        let present = runtime_with(&link, dir.path());
        let found = present.found_again();
        present.binary().await.unwrap();
        assert!(!found.has_changed().unwrap());
    }
}
