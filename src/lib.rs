//! persys-agent: the node agent of the Persys Cloud platform.
//!
//! - [`store`]: the durable event log on fjall — every desired-state and
//!   status write, group-committed, watchable from any resource version.
//! - The runtime engine (informer, work queue, controllers) lives in the
//!   `persys-controllers` crate and sees the store only through its
//!   `WorkloadSource` and `WorkloadWriter` traits.

pub mod agent;
pub mod config;
pub mod metrics;
pub mod node;
pub mod runtimes;
pub mod server;
pub mod store;
