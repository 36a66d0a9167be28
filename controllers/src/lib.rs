//! The engine every runtime controller of persys-agent stands on, the kit
//! they share, and the three runtime controllers. Only what the agent and
//! the tests use is public: the controllers, their configuration, the
//! [`Reconciler`] trait and its runner, the informer and the validators.
//!
//! - [`source`] (from `persys-api`): the two small traits through which
//!   controllers see the store: a list + watch source of workload changes,
//!   and a writer for status, finalizers and events.
//! - `informer`: lists, then follows the change log into one shared cache
//!   ([`Cache`]) and fans changes out to every subscriber.
//! - `queue`: the work queue — deduplicating, one reconcile per key at a
//!   time, with delayed re-adds.
//! - [`backoff`]: exponential backoff with jitter, per key.
//! - `crash_loop`: kubelet's crash-loop rule for restarts, and the same
//!   spacing for any repeated attempt.
//! - `usage`: the last usage sample of each running workload, as the
//!   Docker, Compose and VM samplers leave it.
//! - [`cgroup`]: container usage read from cgroup files and network
//!   namespaces, without asking the engine.
//! - `kit`: what every runtime reconciler shares: per-workload memory, the
//!   event recorder, status building and publishing
//!   (resource-version check, conflict requeue, requeue floor), the start
//!   gate and failed-start policy, and error classes ([`ErrorClass`]).
//! - `controller`: the [`Reconciler`] trait and the runner ([`Controller`])
//!   that drives one from informer changes, runtime triggers and a periodic
//!   resync, and counts how long each orphaned key has been without a
//!   workload ([`orphan_grace_left`]).
//! - [`docker`]: the Docker controller — container workloads.
//! - [`compose`]: the Compose controller — compose projects through the
//!   compose CLI, observed through the Docker API.
//! - [`vm`]: the VM controller — libvirt domains, disks and cloud-init seeds.
//! - [`probes`]: liveness and readiness probes, all on one timer wheel,
//!   for the Docker and Compose controllers.
//! - [`policy`]: the node's workload policy — what a spec may ask of the
//!   host (bind roots, privileges, compose features, VM networks,
//!   ceilings) — which the validators enforce.

pub mod backoff;
pub mod cgroup;
pub mod compose;
mod controller;
mod crash_loop;
pub mod docker;
mod informer;
mod kit;
pub mod policy;
pub mod probes;
mod queue;
mod spec;
mod usage;
pub mod vm;

pub use controller::{
    Action, Cleanup, Controller, ControllerConfig, ControllerObserver, DEFAULT_CONCURRENCY,
    NoObserver, Reconciler, controller_name, orphan_grace_left,
};
pub use informer::{Cache, Informer, Notification};
pub use kit::io;
pub use kit::{Classify, ErrorClass};
/// The store-facing types, defined once in `persys-api`.
pub use persys_api::source;
pub use persys_api::source::{
    Change, ChangeKind, Listing, SourceError, WorkloadSource, WorkloadWriter, WriteError,
};
pub use queue::WorkQueue;
pub use spec::SpecError;
