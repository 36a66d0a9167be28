//! The Docker controller: container workloads as Docker containers.
//!
//! - [`reconciler`]: [`DockerController`], the [`crate::Reconciler`] for
//!   `WorkloadType::Container`: each reconcile observes the workload's
//!   containers (`observe`), decides one `Plan` from them and what is
//!   remembered of the workload (`plan`, pure and table-tested; `memory`),
//!   and carries it out (`act`) through the `runtime` facade, which keeps
//!   the observation cache coherent; then writes status. Cleanup on
//!   delete; orphan collection.
//! - [`events`]: the engine's `/events` as the controller's trigger, so drift
//!   is repaired within about a second; reconnects after an engine restart.
//! - [`spec`]: a `ContainerSpec` as the engine's create request.
//! - [`binds`]: bind sources resolved for a create, and checked without
//!   following links before every create and start.
//! - [`labels`]: the `persys.*` marks by which containers are adopted.
//! - `adopt`: taking over the containers the Go agent left running.
//! - [`errors`]: typed errors and the failure reasons reported in status.
//! - `status`: what a reconcile found, as the workload's status.
//! - [`validate`], [`image`]: checks the API server also runs at apply time.
//! - [`usage`]: the sampler behind `WorkloadStatus.usage`: cgroup files,
//!   else the engine's stats.
//! - `observed`: the engine's containers as last seen, kept until an event
//!   says otherwise, so a resync costs one list rather than calls per workload.
//! - [`engine`], `container`, [`credentials`]: the engine connection, the
//!   calls made on it, and registry credentials for pulls.
//!
//! Wiring, in the agent:
//!
//! ```ignore
//! let docker = Arc::new(DockerController::new(config, store.clone()));
//! let controller = Controller::new(docker.clone(), informer.clone(), store, ControllerConfig::default())
//!     .with_trigger(docker.trigger(informer.cache()));
//! tokio::spawn(controller.run(shutdown.clone()));
//! tokio::spawn(docker.usage_sampler().run(shutdown));
//! ```

mod act;
pub(crate) mod adopt;
pub mod binds;
pub mod config;
pub(crate) mod container;
pub mod credentials;
pub mod engine;
pub mod errors;
pub mod events;
pub(crate) mod exec;
pub mod follow;
pub mod image;
pub mod io;
pub mod labels;
pub(crate) mod logs;
mod memory;
mod observe;
pub(crate) mod observed;
mod plan;
mod pulls;
pub mod reconciler;
mod runtime;
pub mod spec;
pub(crate) mod status;
pub mod usage;
pub mod validate;

pub use crate::crash_loop::CrashLoopPolicy;
pub use config::DockerConfig;
pub use engine::{Engine, EngineVersion};
pub use errors::{DockerError, FailureReason};
pub use image::{ImageReference, PullPolicy};
pub use io::DockerIo;
pub use reconciler::DockerController;
pub use usage::{UsageSampler, UsageSnapshots};
pub use validate::{
    HostPathPolicy, SpecError, validate_container_spec, validate_host_path,
    validate_image_reference,
};
