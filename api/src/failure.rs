//! Why a workload is not running as declared: one vocabulary for every
//! runtime, for status, the scheduler's metadata and the heartbeat.
//!
//! Each runtime classifies its own errors into a [`FailureReason`]; what the
//! reason means downstream is decided here, once:
//! - [`FailureReason::code`] is the agent's code in `status.failure_reason`
//!   (what `persysctl` shows);
//! - [`FailureReason::scheduler_code`] is the value of the `failure_reason`
//!   key in AgentService status metadata, in the vocabulary the Persys
//!   scheduler halts re-applying on (`INVALID_SPECIFICATION`,
//!   `PORT_BIND_CONFLICT`; WIRE.md);
//! - [`FailureReason::control`] is the `persys.control.v1.FailureReason`
//!   the heartbeat carries;
//! - [`FailureReason::is_terminal`] says whether a retry can help before
//!   the spec changes (`status.retry_terminal`).

use std::fmt;

use crate::control::v1::FailureReason as ControlReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The registry could not be reached, or the pull broke off. Retried
    /// with back-off.
    ImagePullFailed,
    /// The registry refused the pull: no credentials, wrong ones, or no
    /// access to the repository. Reported under the same code as
    /// [`FailureReason::ImagePullFailed`] (the scheduler's vocabulary has
    /// no other), but terminal: pulling again with the same credentials
    /// only hammers the registry, so nothing is pulled until the spec
    /// changes.
    ImagePullUnauthorized,
    /// The image does not exist (in the registry, or locally under the
    /// `Never` pull policy). Retried with back-off: a tag can be pushed later.
    ImageNotFound,
    /// The spec cannot be run as it is: the runtime refused it (a bad
    /// entrypoint, a compose file compose rejects, domain XML libvirt
    /// rejects) or it failed validation. Terminal until the spec changes.
    InvalidSpec,
    /// A published host port is taken. Retried with back-off.
    PortBindConflict,
    /// The node is out of memory or disk. Retried with back-off.
    InsufficientResources,
    /// Anything else the runtime failed at, a timeout, and an unreachable
    /// runtime.
    RuntimeError,
    /// A disk, seed or project folder could not be created, found or
    /// written. Retried: a file can appear, a full disk can be cleaned up.
    StorageError,
    /// A libvirt network or host bridge is missing or failed.
    NetworkError,
    /// The hypervisor refused to start the guest. Retried with the
    /// crash-loop back-off.
    VmBootFailed,
    /// The workload keeps exiting; restarts are spaced out.
    CrashLoopBackOff,
    /// The container exited and its restart policy does not restart it.
    /// Terminal until the spec changes.
    ContainerExited,
    /// What the workload would use on the node breaks the node's policy
    /// now, though its spec passed at apply: a bind source swapped for a
    /// symbolic link, or moved outside the allowed roots. Nothing is
    /// started; retried with the back-off of failed starts, so putting the
    /// path back lets the workload run again.
    PolicyViolation,
}

impl FailureReason {
    pub const ALL: [FailureReason; 13] = [
        FailureReason::ImagePullFailed,
        FailureReason::ImagePullUnauthorized,
        FailureReason::ImageNotFound,
        FailureReason::InvalidSpec,
        FailureReason::PortBindConflict,
        FailureReason::InsufficientResources,
        FailureReason::RuntimeError,
        FailureReason::StorageError,
        FailureReason::NetworkError,
        FailureReason::VmBootFailed,
        FailureReason::CrashLoopBackOff,
        FailureReason::ContainerExited,
        FailureReason::PolicyViolation,
    ];

    /// The agent's code, in `status.failure_reason`.
    pub fn code(self) -> &'static str {
        match self {
            FailureReason::ImagePullFailed | FailureReason::ImagePullUnauthorized => {
                "IMAGE_PULL_FAILED"
            }
            FailureReason::ImageNotFound => "IMAGE_NOT_FOUND",
            FailureReason::InvalidSpec => "INVALID_SPEC",
            FailureReason::PortBindConflict => "PORT_BIND_CONFLICT",
            FailureReason::InsufficientResources => "INSUFFICIENT_RESOURCES",
            FailureReason::RuntimeError => "RUNTIME_ERROR",
            FailureReason::StorageError => "STORAGE_ERROR",
            FailureReason::NetworkError => "NETWORK_ERROR",
            FailureReason::VmBootFailed => "VM_BOOT_FAILED",
            FailureReason::CrashLoopBackOff => "CRASH_LOOP_BACKOFF",
            FailureReason::ContainerExited => "CONTAINER_EXITED",
            FailureReason::PolicyViolation => "POLICY_VIOLATION",
        }
    }

    /// The reason a code in `status.failure_reason` names. Also reads the
    /// scheduler's names for the same failures (`INVALID_SPECIFICATION`,
    /// `INVALID_CONFIGURATION`, `INVALID_IMAGE`), so a status written in
    /// either vocabulary reads back. `None` for an empty or unknown code.
    /// `IMAGE_PULL_FAILED` reads back as [`FailureReason::ImagePullFailed`]:
    /// whether a refused pull was terminal is `status.retry_terminal`'s to
    /// say.
    pub fn from_code(code: &str) -> Option<FailureReason> {
        match code {
            "INVALID_SPECIFICATION" | "INVALID_CONFIGURATION" => Some(FailureReason::InvalidSpec),
            "INVALID_IMAGE" => Some(FailureReason::ImageNotFound),
            _ => FailureReason::ALL.into_iter().find(|r| r.code() == code),
        }
    }

    /// The value of `failure_reason` in the scheduler's status metadata.
    /// Where the scheduler has its own name for a failure it halts on, that
    /// name; otherwise the agent's code, which the scheduler records and
    /// retries.
    pub fn scheduler_code(self) -> &'static str {
        match self {
            FailureReason::InvalidSpec => "INVALID_SPECIFICATION",
            other => other.code(),
        }
    }

    /// The heartbeat's `persys.control.v1.FailureReason`. The scheduler's
    /// enum is coarser; where it has no value that says the same thing, the
    /// nearest one: a workload that keeps crashing or has exited ran and
    /// then failed (a runtime error); a taken host port is a network failure;
    /// a policy violation is a spec the node will not run as it stands.
    pub fn control(self) -> ControlReason {
        match self {
            FailureReason::ImagePullFailed | FailureReason::ImagePullUnauthorized => {
                ControlReason::ImagePullFailed
            }
            FailureReason::ImageNotFound => ControlReason::ImageNotFound,
            FailureReason::InvalidSpec | FailureReason::PolicyViolation => {
                ControlReason::InvalidSpec
            }
            FailureReason::PortBindConflict | FailureReason::NetworkError => {
                ControlReason::NetworkError
            }
            FailureReason::InsufficientResources => ControlReason::InsufficientResources,
            FailureReason::RuntimeError
            | FailureReason::CrashLoopBackOff
            | FailureReason::ContainerExited => ControlReason::RuntimeError,
            FailureReason::StorageError => ControlReason::StorageError,
            FailureReason::VmBootFailed => ControlReason::VmBootFailed,
        }
    }

    /// The heartbeat's reason for a `status.failure_reason` code: unset
    /// without a failure, and a runtime error for a code this agent does
    /// not know (it is still a failure).
    pub fn control_of_code(code: &str) -> ControlReason {
        if code.is_empty() {
            return ControlReason::Unspecified;
        }
        FailureReason::from_code(code).map_or(ControlReason::RuntimeError, FailureReason::control)
    }

    /// True when retrying cannot help until the spec changes
    /// (`status.retry_terminal`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FailureReason::InvalidSpec
                | FailureReason::ContainerExited
                | FailureReason::ImagePullUnauthorized
        )
    }

    /// The reason of the `Ready` (and `Degraded`) condition, in the
    /// CamelCase of conditions.
    pub fn condition_reason(self) -> &'static str {
        match self {
            FailureReason::ImagePullFailed | FailureReason::ImageNotFound => "ImagePullBackOff",
            FailureReason::ImagePullUnauthorized => "ImagePullUnauthorized",
            FailureReason::InvalidSpec => "InvalidSpec",
            FailureReason::PortBindConflict => "PortBindConflict",
            FailureReason::InsufficientResources => "InsufficientResources",
            FailureReason::RuntimeError => "RuntimeError",
            FailureReason::StorageError => "StorageError",
            FailureReason::NetworkError => "NetworkError",
            FailureReason::VmBootFailed => "BootFailed",
            FailureReason::CrashLoopBackOff => "CrashLoopBackOff",
            FailureReason::ContainerExited => "Exited",
            FailureReason::PolicyViolation => "PolicyViolation",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_as_its_reason_and_the_schedulers_names_too() {
        for reason in FailureReason::ALL {
            // A refused pull shares its code with every failed pull.
            let read_back = match reason {
                FailureReason::ImagePullUnauthorized => FailureReason::ImagePullFailed,
                other => other,
            };
            assert_eq!(FailureReason::from_code(reason.code()), Some(read_back));
            assert_eq!(
                FailureReason::from_code(reason.scheduler_code()),
                Some(read_back)
            );
        }
        assert_eq!(
            FailureReason::from_code("INVALID_CONFIGURATION"),
            Some(FailureReason::InvalidSpec)
        );
        assert_eq!(
            FailureReason::from_code("INVALID_IMAGE"),
            Some(FailureReason::ImageNotFound)
        );
        assert_eq!(FailureReason::from_code(""), None);
        assert_eq!(FailureReason::from_code("SOMETHING_NEW"), None);
    }

    #[test]
    fn the_scheduler_halts_on_an_invalid_spec_and_a_taken_port_and_on_nothing_retryable() {
        // The values WIRE.md says stop the scheduler from re-applying.
        const HALTS: [&str; 4] = [
            "INVALID_IMAGE",
            "INVALID_SPECIFICATION",
            "INVALID_CONFIGURATION",
            "PORT_BIND_CONFLICT",
        ];
        for reason in FailureReason::ALL {
            let halts = HALTS.contains(&reason.scheduler_code());
            match reason {
                FailureReason::InvalidSpec | FailureReason::PortBindConflict => {
                    assert!(halts, "{reason:?}")
                }
                // A retryable failure must not stop the scheduler; an exited
                // container is terminal but ran, so it is not a bad spec.
                _ => assert!(!halts, "{reason:?} halts the scheduler"),
            }
        }
        assert_eq!(
            FailureReason::InvalidSpec.scheduler_code(),
            "INVALID_SPECIFICATION"
        );
    }

    #[test]
    fn every_reason_has_the_nearest_heartbeat_reason() {
        use ControlReason as C;
        use FailureReason as F;
        for (reason, expected) in [
            (F::ImagePullFailed, C::ImagePullFailed),
            (F::ImagePullUnauthorized, C::ImagePullFailed),
            (F::ImageNotFound, C::ImageNotFound),
            (F::InvalidSpec, C::InvalidSpec),
            (F::PortBindConflict, C::NetworkError),
            (F::InsufficientResources, C::InsufficientResources),
            (F::RuntimeError, C::RuntimeError),
            (F::StorageError, C::StorageError),
            (F::NetworkError, C::NetworkError),
            (F::VmBootFailed, C::VmBootFailed),
            (F::CrashLoopBackOff, C::RuntimeError),
            (F::ContainerExited, C::RuntimeError),
            (F::PolicyViolation, C::InvalidSpec),
        ] {
            assert_eq!(reason.control(), expected, "{reason:?}");
            assert_eq!(FailureReason::control_of_code(reason.code()), expected);
        }
        assert_eq!(FailureReason::control_of_code(""), C::Unspecified);
        assert_eq!(
            FailureReason::control_of_code("SOMETHING_NEW"),
            C::RuntimeError
        );
        assert_eq!(
            FailureReason::control_of_code("INVALID_IMAGE"),
            C::ImageNotFound
        );
    }

    #[test]
    fn only_a_bad_spec_an_exited_container_and_a_refused_pull_are_terminal() {
        for reason in FailureReason::ALL {
            assert_eq!(
                reason.is_terminal(),
                matches!(
                    reason,
                    FailureReason::InvalidSpec
                        | FailureReason::ContainerExited
                        | FailureReason::ImagePullUnauthorized
                ),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn a_refused_pull_tells_the_scheduler_image_pull_failed_and_is_not_retried() {
        let reason = FailureReason::ImagePullUnauthorized;
        assert_eq!(reason.code(), "IMAGE_PULL_FAILED");
        assert_eq!(reason.scheduler_code(), "IMAGE_PULL_FAILED");
        assert_eq!(reason.control(), ControlReason::ImagePullFailed);
        assert!(reason.is_terminal());
        assert!(!FailureReason::ImagePullFailed.is_terminal());
    }

    #[test]
    fn a_policy_violation_has_its_own_code_and_is_retried_not_halted_on() {
        let reason = FailureReason::PolicyViolation;
        assert_eq!(reason.code(), "POLICY_VIOLATION");
        assert_eq!(reason.scheduler_code(), "POLICY_VIOLATION");
        assert_eq!(
            FailureReason::from_code("POLICY_VIOLATION"),
            Some(FailureReason::PolicyViolation)
        );
        assert!(!reason.is_terminal(), "restoring the path must let it run");
        assert_eq!(reason.condition_reason(), "PolicyViolation");
    }
}
