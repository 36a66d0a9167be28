//! The probes of a compose project's services: each probed service's
//! running containers are registered with the prober; the project is ready
//! only when every probed service's containers are; a container whose
//! liveness probe failed beyond its threshold is stopped, and the repair
//! path brings its service back as its restart policy says.

use std::collections::BTreeMap;

use bollard::Docker;
use bollard::query_parameters::{InspectContainerOptions, StopContainerOptions};
use persys_api::v1::{ComposeSpec, EventType, Workload, workload_spec};

use super::observe::{ContainerState, Observed};
use super::reconciler::ComposeController;
use crate::docker::reconciler::{address_of, readiness_of};
use crate::kit::status::Readiness;
use crate::probes::{Instance, ProbeKind, ProbeSpec};

/// Seconds a container failing its liveness probe gets to stop (compose's
/// own default stop grace).
const STOP_GRACE_SECONDS: i32 = 10;

/// What the probes say of a project.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProjectHealth {
    pub(crate) readiness: Readiness,
    /// `service.<name>.ready`, `service.<name>.probe.readiness`…
    pub(crate) facts: BTreeMap<String, String>,
    /// Containers stopped for failing their liveness probe: look again.
    pub(crate) stopped_unhealthy: bool,
}

fn compose_spec(workload: &Workload) -> Option<&ComposeSpec> {
    match workload.workload_spec() {
        Some(workload_spec::Spec::Compose(spec)) => Some(spec),
        _ => None,
    }
}

impl ComposeController {
    /// Registers the running containers of the probed services of a
    /// running project and answers what the probes say; stops containers
    /// whose liveness probe failed. Drops the registrations when the
    /// project is not running or has no probes.
    pub(crate) async fn probe_services(&self, workload: &Workload, project: &str) -> ProjectHealth {
        let id = workload.id();
        let Some(spec) = compose_spec(workload).filter(|s| !s.probes.is_empty()) else {
            self.prober.forget(id);
            return ProjectHealth::default();
        };
        let (docker, observed) = match self.runtime.docker(id).await {
            Ok(docker) => match self.runtime.containers(id, project).await {
                Ok(observed) => (docker, observed),
                Err(_) => return ProjectHealth::default(),
            },
            Err(_) => return ProjectHealth::default(),
        };
        let probed = probed_containers(&docker, spec, &observed).await;
        let instances: Vec<Instance> = probed.iter().map(|p| p.instance.clone()).collect();
        self.prober
            .watch(id, self.runtime.engine(), &self.probe_wake, &instances);

        let mut health = ProjectHealth::default();
        let mut unready = Vec::new();
        for (service, probes) in &spec.probes {
            let mine: Vec<&Probed> = probed.iter().filter(|p| &p.service == service).collect();
            let mut service_ready = !mine.is_empty();
            for probed in &mine {
                let verdicts = self.prober.health(
                    id,
                    &probed.instance.container_id,
                    &probed.instance.started_at,
                );
                if let Some(output) = verdicts.liveness_failure() {
                    self.stop_unhealthy(&docker, id, probed, output).await;
                    health.stopped_unhealthy = true;
                    service_ready = false;
                    unready.push(format!("{service}: liveness probe failed; restarting"));
                    continue;
                }
                let (readiness, facts) = readiness_of(&verdicts, &probed.inspect);
                for (key, value) in facts {
                    health
                        .facts
                        .insert(format!("service.{service}.{key}"), value);
                }
                if let Readiness::NotReady { message, .. } = readiness {
                    service_ready = false;
                    unready.push(format!("{service}: {message}"));
                }
            }
            if mine.is_empty() && probes.readiness_probe.is_some() {
                unready.push(format!("{service}: no running container to probe"));
            }
            health.facts.insert(
                format!("service.{service}.ready"),
                service_ready.to_string(),
            );
        }
        if !unready.is_empty() {
            health.readiness = Readiness::NotReady {
                reason: "ReadinessProbeFailed".into(),
                message: unready.join("; "),
            };
        }
        health
    }

    async fn stop_unhealthy(&self, docker: &Docker, id: &str, probed: &Probed, output: &str) {
        let message = format!(
            "Liveness probe failed on container {} of service {}: {output}",
            probed.name, probed.service
        );
        self.event(id, EventType::Warning, "Unhealthy", message)
            .await;
        let options = StopContainerOptions {
            t: Some(STOP_GRACE_SECONDS),
            ..Default::default()
        };
        if let Err(error) = docker
            .stop_container(&probed.instance.container_id, Some(options))
            .await
        {
            tracing::warn!(container = %probed.name, %error, "stopping an unhealthy container failed");
            return;
        }
        let message = format!(
            "container {} of service {} failed its liveness probe and will be restarted",
            probed.name, probed.service
        );
        self.event(id, EventType::Normal, "Killing", message).await;
    }
}

/// A running container of a probed service.
struct Probed {
    service: String,
    name: String,
    instance: Instance,
    inspect: bollard::models::ContainerInspectResponse,
}

/// The running containers of the services `spec` probes, inspected for
/// their start and address.
async fn probed_containers(
    docker: &Docker,
    spec: &ComposeSpec,
    observed: &Observed,
) -> Vec<Probed> {
    let mut found = Vec::new();
    for (service, probes) in &spec.probes {
        let liveness = probes
            .liveness_probe
            .as_ref()
            .and_then(|p| ProbeSpec::of(ProbeKind::Liveness, p));
        let readiness = probes
            .readiness_probe
            .as_ref()
            .and_then(|p| ProbeSpec::of(ProbeKind::Readiness, p));
        if liveness.is_none() && readiness.is_none() {
            continue;
        }
        let containers = observed.by_service.get(service).into_iter().flatten();
        for container in containers.filter(|c| c.state == ContainerState::Running) {
            let Ok(inspect) = docker
                .inspect_container(&container.id, None::<InspectContainerOptions>)
                .await
            else {
                continue;
            };
            let Some(started_at) = inspect.state.as_ref().and_then(|s| s.started_at.clone()) else {
                continue;
            };
            let instance = Instance {
                container_id: container.id.clone(),
                started: humantime::parse_rfc3339(&started_at)
                    .unwrap_or_else(|_| std::time::SystemTime::now()),
                started_at,
                address: address_of(&inspect),
                liveness: liveness.clone(),
                readiness: readiness.clone(),
            };
            found.push(Probed {
                service: service.clone(),
                name: container.name.clone(),
                instance,
                inspect,
            });
        }
    }
    found
}
