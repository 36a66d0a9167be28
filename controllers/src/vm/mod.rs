//! The VM controller: VM workloads as libvirt domains (KVM, or TCG where
//! `/dev/kvm` is not usable).
//!
//! - `reconciler`: [`VmController`], the [`crate::Reconciler`] for
//!   `WorkloadType::Vm` — each reconcile observes, plans, acts and writes
//!   status; cleanup on delete; orphan collection.
//! - `observe`: the workload's domains, found by their marks; `memory`:
//!   what is remembered between reconciles; `plan`: the decision, a pure
//!   function of the two and the spec, table-tested; `act` and `host`:
//!   the operations a plan is carried out with (libvirt, disks, seed).
//! - `events`: libvirt's lifecycle events as the controller's trigger
//!   (the default event loop on a thread of its own), so drift is repaired
//!   within about a second; reconnects after a libvirtd restart.
//! - [`libvirt`]: the blocking wrapper over `virt`, used only through
//!   `spawn_blocking`; one shared connection, reconnected with back-off.
//! - [`domain_xml`]: a `VMSpec` as domain XML; [`marks`]: the `<metadata>`
//!   element domains are adopted by; [`xml`]: escaping and reading XML.
//! - `adopt`: taking over the domains the Go agent left defined.
//! - [`disks`]: disk plans, path rules, managed volumes, `qemu-img create`
//!   for missing files, and the record of agent-created disks; [`image`]:
//!   `qemu-img info` and the format and backing-file rules; [`ownership`]:
//!   which workload a disk belongs to; `seed`: the cloud-init NoCloud seed
//!   ISO; `graphics`: the display password.
//! - `crash_loop`: kubelet's restart back-off; [`errors`]: typed errors
//!   classified from libvirt's error codes; `status`: what a reconcile
//!   found, as the workload's status; [`usage`]: the background sampler
//!   behind `WorkloadStatus.usage`.
//!
//! Wiring, in the agent:
//!
//! ```ignore
//! let vm = Arc::new(VmController::new(VmConfig::new(uri, state_dir), store.clone()));
//! let controller = Controller::new(vm.clone(), informer.clone(), store, ControllerConfig::default())
//!     .with_trigger(vm.trigger(informer.cache()));
//! tokio::spawn(controller.run(shutdown.clone()));
//! tokio::spawn(vm.usage_sampler().run(shutdown));
//! ```

mod act;
mod adopt;
pub mod config;
mod console;
pub mod disks;
pub mod domain_xml;
pub mod errors;
mod events;
mod graphics;
mod host;
pub mod image;
pub mod io;
pub mod libvirt;
pub mod marks;
mod memory;
mod observe;
pub mod ownership;
mod plan;
mod reconciler;
mod seed;
mod serial;
pub(crate) mod status;
pub mod usage;
mod validate;
pub mod xml;

pub use crate::crash_loop::CrashLoopPolicy;
pub use config::{VmConfig, default_disk_roots, resolve_domain_type, vm_root};
pub use errors::{FailureReason, SpecError, VmError};
pub use io::VmIo;
pub use marks::Marks;
pub use ownership::check_disk_owners;
pub use reconciler::VmController;
pub use serial::{CONSOLE_LOG, CONSOLE_LOG_CAP, rotate_console_logs};
pub use usage::{UsageSampler, UsageSnapshots};
pub use validate::{SYS_CLASS_NET, check_vm_networks, validate_vm_spec};
