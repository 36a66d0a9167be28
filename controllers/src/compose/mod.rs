//! The Compose controller: compose workloads as Docker Compose projects.
//!
//! - `reconciler`: [`ComposeController`], the [`crate::Reconciler`] for
//!   `WorkloadType::Compose`, in three steps: `desired` and [`observe`]
//!   read the workload and its project, `plan` decides (pure), `act`
//!   carries the decision out through `runtime` and says what to
//!   publish; cleanup on delete; orphan folders taken down after a grace
//!   period.
//! - `memory`: what is remembered per workload, and the back-offs.
//! - `events`: the engine's `/events` for compose containers as the
//!   controller's trigger, mapped to workloads by project name.
//! - [`binary`]: which compose CLI (`PERSYS_COMPOSE_BINARY`, `docker
//!   compose`, `docker-compose`), its kind and version.
//! - `cli`: the compose commands and their environment: an allow-list of
//!   the agent's, never a spec's (spec variables go to `.env` only).
//! - `command`: running one: a timeout that kills the process group,
//!   bounded concurrency, the end of stderr kept.
//! - `project`: the project folder under the state directory, written
//!   atomically, and the spec hash last brought up.
//! - `naming`: project names, and who owns a contested one.
//! - `adopt`: taking over the projects the Go agent left running.
//! - `services`: the services a compose file declares, with their scale.
//! - `document`: a compose file read within bounds (size, alias expansion,
//!   depth), merge keys applied, `${VAR}` interpolated as compose does.
//! - `policy`: a compose file against the node's workload policy.
//! - `resources`: the CPU and memory a project's services are limited to,
//!   which the node's ceilings count.
//! - `binds`: the file's bind mounts, resolved and checked as containers'
//!   are before every `up`; the engine gets the resolved sources.
//! - `restarts`: the restart policy each service asks for, which the agent
//!   applies (the engine's is `no`).
//! - [`observe`]: the project as found: its containers, from the engine,
//!   and its folder.
//! - `runtime`: the facade over the compose CLI and the engine.
//! - `status`: what a reconcile found, as the workload's status.
//! - `errors`: typed errors and the failure reasons status reports.
//! - [`usage`]: each compose workload's usage, the sum of its services'
//!   containers.
//!
//! Wiring, in the agent:
//!
//! ```ignore
//! let mut config = ComposeConfig::new(&state_path);
//! config.binary = compose_binary;           // PERSYS_COMPOSE_BINARY
//! config.command_timeout = compose_timeout; // PERSYS_COMPOSE_TIMEOUT
//! let compose = Arc::new(ComposeController::new(config, store.clone(), informer.cache()));
//! let controller = Controller::new(compose.clone(), informer.clone(), store, ControllerConfig::default())
//!     .with_trigger(compose.trigger());
//! tokio::spawn(controller.run(shutdown));
//! // HealthCheck: compose.probe().await → status ("healthy" or why), binary kind and version.
//! ```

mod act;
pub(crate) mod adopt;
pub mod binary;
mod binds;
pub(crate) mod cli;
pub(crate) mod command;
pub(crate) mod config;
mod desired;
mod document;
pub(crate) mod errors;
pub(crate) mod events;
mod exec;
pub mod io;
mod logs;
mod memory;
pub(crate) mod naming;
pub mod observe;
mod plan;
mod policy;
mod probing;
pub(crate) mod project;
pub(crate) mod reconciler;
mod resources;
mod restarts;
mod runtime;
pub(crate) mod services;
pub(crate) mod status;
pub mod usage;
mod validate;

pub use binary::{ComposeBinary, ComposeKind, DetectError};
pub use cli::{ComposeEnvironment, INHERITED_ENV};
pub use config::ComposeConfig;
pub use document::MAX_COMPOSE_BYTES;
pub use errors::{ComposeError, FailureReason};
pub use io::ComposeIo;
pub use naming::derive_project_name;
pub use policy::{ComposeRules, check_compose_policy};
pub use reconciler::{ComposeController, ComposeHealth};
pub use resources::{ComposeResources, declared_resources};
pub use restarts::RESTART_LABEL;
pub use validate::{ValidCompose, validate_compose_spec};
