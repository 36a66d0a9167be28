//! persys-agent: the node agent of the Persys Cloud platform.
//!
//! - [`store`]: the durable event log on fjall — every desired-state and
//!   status write, group-committed, watchable from any resource version.
//! - [`server`]: `persys.agent.v1.AgentService` over reloading mutual TLS;
//!   validation, Watch, Describe; every RPC answers from the store.
//! - [`agent`]: wiring — store, informer, controllers, server, samplers —
//!   and orderly shutdown; [`config`]: every setting as env var and flag;
//!   [`commands`]: one-shot commands (`persys-agent authz check`).
//! - [`runtimes`]: starts the runtime controllers and probes their health.
//! - [`policy`]: the node's workload policy, loaded once at start.
//! - [`import`]: the Go agent's bbolt `state.db`, imported once at start.
//! - [`scheduler`]: registration and heartbeats to the Persys scheduler.
//! - [`metrics`]: Prometheus metrics, `/healthz`, `/readyz`; [`node`]: host
//!   utilisation sampling.
//! - [`tasks`]: the background tasks, watched: one that dies is reported.
//! - The runtime engine (informer, work queue, controllers) lives in the
//!   `persys-controllers` crate and sees the store only through its
//!   `WorkloadSource` and `WorkloadWriter` traits.

pub mod agent;
pub mod commands;
pub mod config;
pub mod import;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod runtimes;
pub mod scheduler;
pub mod server;
pub mod tasks;
/// The durable event log (the `persys-store` crate).
pub use persys_store as store;
