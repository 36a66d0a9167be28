//! Liveness and readiness probes, run by the agent against the containers
//! of container and compose workloads, with kubelet's names, defaults and
//! rules.
//!
//! - [`spec`]: a `Probe` from the API checked at apply ([`validate_probe`])
//!   and read with kubelet's defaults ([`ProbeSpec`]).
//! - `check`: one execution of a probe: exec (Docker exec), HTTP(S) GET,
//!   TCP connect, grpc.health.v1 Check, each against the container's own
//!   address only.
//! - `prober`: the [`Prober`]: every registered probe on one timer wheel
//!   (`DelayQueue`) in one task, a bounded number of checks in flight,
//!   thresholds, and the verdicts the controllers read; it wakes a
//!   controller only when a verdict changes.
//!
//! The controllers register what they observe (container id, address,
//! start time) after each reconcile; a probe's state starts over with each
//! start of its container, and ends when the container stops or the
//! workload goes.

mod check;
mod prober;
pub mod spec;

pub use prober::Prober;
pub use prober::{DEFAULT_CONCURRENCY, Instance, InstanceHealth, Notifier, Verdict};
pub use spec::validate_probe;
pub use spec::{ProbeKind, ProbeSpec};
