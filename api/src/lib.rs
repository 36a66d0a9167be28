//! The `persys.agent.v1` contract and the workload object model.
//!
//! - [`v1`]: the generated protobuf types and the tonic client and server of
//!   `AgentService`. The messages the Persys scheduler uses keep their names
//!   and field numbers; the object model (`Workload`, `ObjectMeta`,
//!   `ObjectStatus`, `Condition`, `Event`, `WatchEvent`) is defined there too,
//!   so the stored form, the Watch stream and the CLI speak one language.
//! - [`model`]: behaviour of those types — spec hashes, derived revisions,
//!   conditions, and the flattening into the scheduler's `WorkloadStatus`.
//! - [`failure`]: why a workload is not running, in one vocabulary for
//!   status, the scheduler's metadata and the heartbeat.
//! - [`source`]: what a change of the store is ([`source::Change`]), its one
//!   mapping to and from the wire's `WatchEventType`, and the two traits
//!   through which controllers see the store.
//! - [`yaml`]: YAML read within bounds (size, alias expansion, depth), for
//!   compose files and `persysctl` manifests.
//! - [`control::v1`]: `persys.control.v1.AgentControl`, the service the
//!   scheduler serves and the agent calls to register and heartbeat.

pub mod failure;
pub mod model;
pub mod source;
pub mod yaml;

pub mod v1 {
    #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("persys.agent.v1");

    /// Encoded `FileDescriptorSet`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("persys_agent_v1_descriptor");
}

pub mod control {
    pub mod v1 {
        #![allow(clippy::doc_lazy_continuation)]
        include!(concat!(env!("OUT_DIR"), "/control/persys.control.v1.rs"));
    }
}

pub use failure::FailureReason;
pub use model::*;
