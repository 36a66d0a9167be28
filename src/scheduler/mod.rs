//! The scheduler link: when PERSYS_SCHEDULER_ADDR is set, the agent
//! registers with the Persys scheduler's `persys.control.v1.AgentControl`,
//! heartbeats with its usage and every workload's status, and follows the
//! scheduler's drain order. Without it the agent runs standalone.
//!
//! - [`link`]: the state machine — Registering → Heartbeating → Backoff.
//! - [`client`]: the scheduler over gRPC, with the agent's own certificate.
//! - [`report`]: the registration and heartbeats, built from the
//!   configuration, the host, the runtime board and the informer cache.
//! - [`drain`]: the drain flag the API server consults.
//! - [`status`]: the link's state for HealthCheck and logs.
//!
//! `persys.control.v1` is the Go scheduler's own control.proto, copied
//! field for field; the `compat` tests hold our encoding to bytes protoc
//! produced from the scheduler's file.
//!
//! The link never blocks the agent: while the scheduler is away the agent
//! keeps serving and reconciling, and rejoins by itself.

pub mod client;
#[cfg(test)]
mod compat;
pub mod drain;
pub mod link;
pub mod report;
pub mod status;

pub use drain::Drain;
pub use link::{Link, LinkError, Scheduler};
pub use report::NodeReporter;
pub use status::{LinkPhase, LinkStatus};

use persys_controllers::Informer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::node::NodeSampler;
use crate::runtimes::RuntimeBoard;
use crate::server::UsageLookup;

/// What the rest of the agent holds of the link.
pub struct SchedulerLink {
    /// Consulted by the API server before it accepts a new workload.
    pub drain: Drain,
    /// The link's state, for HealthCheck.
    pub status: watch::Receiver<LinkStatus>,
    /// The link's task; none when standalone. Ends on the shutdown token.
    pub task: Option<JoinHandle<()>>,
}

/// What heartbeats read and count besides the cache and the board.
pub struct Reporting {
    /// The runtimes' last usage samples.
    pub usage: Option<UsageLookup>,
    /// Counts heartbeats trimmed to fit the scheduler's message limit.
    pub heartbeats_trimmed: prometheus_client::metrics::counter::Counter,
}

/// Starts the link when a scheduler is configured. The first registration
/// waits for the informer's first list, so no heartbeat ever reports an
/// empty node by mistake.
pub fn start(
    config: &Config,
    informer: &Informer,
    node: NodeSampler,
    runtimes: RuntimeBoard,
    reporting: Reporting,
    tasks: &crate::tasks::Tasks,
    shutdown: CancellationToken,
) -> SchedulerLink {
    let drain = Drain::new();
    let Some(addr) = config.scheduler_addr.clone() else {
        tracing::info!("PERSYS_SCHEDULER_ADDR is not set: running standalone");
        return SchedulerLink {
            drain,
            status: LinkStatus::standalone_watch(),
            task: None,
        };
    };
    if config.scheduler_insecure {
        tracing::warn!(
            scheduler = %addr,
            "PERSYS_SCHEDULER_INSECURE=true: dialling the scheduler in PLAINTEXT, without authentication"
        );
    }
    let reporter = NodeReporter::new(config, informer.cache(), node, runtimes, reporting.usage)
        .with_trim_counter(reporting.heartbeats_trimmed);
    let scheduler = client::GrpcScheduler::new(config, addr.clone());
    let (link, status) = Link::new(
        scheduler,
        &addr,
        reporter,
        drain.clone(),
        link::UNREACHABLE_BACKOFF,
    );
    let informer = informer.clone();
    let task = tasks.spawn("scheduler-link", async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = informer.wait_until_synced() => {}
        }
        tracing::info!(scheduler = %addr, "scheduler link started");
        link.run(shutdown).await;
    });
    SchedulerLink {
        drain,
        status,
        task: Some(task),
    }
}
