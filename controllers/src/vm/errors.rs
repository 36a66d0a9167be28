//! What went wrong, classified from libvirt's typed error codes (number and
//! origin), never from message substrings.

use std::fmt;

use virt::error::{ErrorDomain, ErrorNumber};

use crate::kit::{Classify, ErrorClass, store_class};
use crate::source::WriteError;

/// An operation of the VM controller, for classification and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Connect,
    List,
    Lookup,
    ReadMetadata,
    WriteMetadata,
    Inspect,
    Define,
    Start,
    Resume,
    Shutdown,
    Destroy,
    Undefine,
    UpdateNetwork,
    Stats,
    Ping,
    CreateDisk,
    RemoveDisk,
    InspectDisk,
    BuildSeed,
    SetDisplayPassword,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect to libvirt",
            Operation::List => "list domains",
            Operation::Lookup => "look the domain up",
            Operation::ReadMetadata => "read the domain's metadata",
            Operation::WriteMetadata => "mark the domain as managed",
            Operation::Inspect => "inspect the domain",
            Operation::Define => "define the domain",
            Operation::Start => "start the domain",
            Operation::Resume => "resume the domain",
            Operation::Shutdown => "shut the domain down",
            Operation::Destroy => "destroy the domain",
            Operation::Undefine => "undefine the domain",
            Operation::UpdateNetwork => "update the network's DHCP hosts",
            Operation::Stats => "read domain statistics",
            Operation::Ping => "ping libvirt",
            Operation::CreateDisk => "create a disk",
            Operation::RemoveDisk => "remove a disk",
            Operation::InspectDisk => "inspect a disk image",
            Operation::BuildSeed => "build the cloud-init seed",
            Operation::SetDisplayPassword => "set the display password",
        })
    }
}

/// Why a workload is not running as declared: one vocabulary for every
/// runtime (`persys_api::failure`).
pub use persys_api::FailureReason;

/// A libvirt error, kept as its typed code and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtError {
    /// The error number, when this version of the bindings knows it.
    pub number: Option<ErrorNumber>,
    pub raw_number: u32,
    /// Where in libvirt it came from.
    pub origin: Option<ErrorDomain>,
    pub message: String,
}

impl LibvirtError {
    pub fn new(number: ErrorNumber, origin: ErrorDomain, message: impl Into<String>) -> Self {
        LibvirtError {
            number: Some(number),
            raw_number: 0,
            origin: Some(origin),
            message: message.into(),
        }
    }

    pub fn is(&self, number: ErrorNumber) -> bool {
        self.number == Some(number)
    }

    /// True when the connection to libvirtd is gone (daemon down, socket
    /// missing or closed, keepalive timed out): retry after reconnecting.
    pub fn is_connection_lost(&self) -> bool {
        use ErrorNumber as N;
        matches!(
            (self.number, self.origin),
            (Some(N::NoConnect | N::InvalidConn | N::Rpc), _)
                | (
                    Some(N::SystemError | N::InternalError | N::OperationFailed),
                    Some(ErrorDomain::Rpc | ErrorDomain::Remote),
                )
        )
    }
}

impl From<virt::error::Error> for LibvirtError {
    fn from(error: virt::error::Error) -> Self {
        let code = error.code();
        let origin = error.domain();
        LibvirtError {
            number: Result::<ErrorNumber, _>::from(code).ok(),
            raw_number: code.to_raw(),
            origin: Result::<ErrorDomain, _>::from(origin).ok(),
            message: error.message().to_string(),
        }
    }
}

impl fmt::Display for LibvirtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match self.number {
            Some(number) => write!(f, " [{number:?}]"),
            None => write!(f, " [code {}]", self.raw_number),
        }
    }
}

impl std::error::Error for LibvirtError {}

/// Classifies a libvirt error by its number and origin and the operation
/// that failed.
pub fn classify(operation: Operation, error: &LibvirtError) -> FailureReason {
    use ErrorNumber as N;
    let storage = matches!(
        error.number,
        Some(
            N::NoStorage
                | N::NoStoragePool
                | N::NoStorageVolume
                | N::InvalidStoragePool
                | N::InvalidStorageVol
                | N::StorageProbeFailed
                | N::StorageVolExist
                | N::NoSource
        )
    ) || error.origin == Some(ErrorDomain::Storage);
    let network = matches!(
        error.number,
        Some(
            N::NoNetwork
                | N::InvalidNetwork
                | N::NetworkExist
                | N::NoNetworkStart
                | N::NoInterface
                | N::InvalidInterface
                | N::NoInterfaceStart
                | N::BuildFirewall
        )
    ) || matches!(
        error.origin,
        Some(ErrorDomain::Network | ErrorDomain::Net | ErrorDomain::Firewall)
    );
    let malformed = matches!(
        error.number,
        Some(
            N::XmlError
                | N::XmlDetail
                | N::XmlInvalidSchema
                | N::OsType
                | N::NoOs
                | N::NoKernel
                | N::NoName
                | N::NoTarget
                | N::InvalidMac
                | N::ConfigUnsupported
                | N::InvalidArg
        )
    );
    if storage {
        return FailureReason::StorageError;
    }
    if network {
        return FailureReason::NetworkError;
    }
    match operation {
        Operation::Define if malformed => FailureReason::InvalidSpec,
        Operation::Define if error.is(N::CpuIncompatible) => FailureReason::InvalidSpec,
        Operation::Start | Operation::Resume => FailureReason::VmBootFailed,
        Operation::CreateDisk
        | Operation::RemoveDisk
        | Operation::InspectDisk
        | Operation::BuildSeed
        | Operation::SetDisplayPassword => FailureReason::StorageError,
        _ => FailureReason::RuntimeError,
    }
}

pub use crate::spec::SpecError;

/// `workload <id>: `, or nothing for calls made for no one workload (the
/// health probe, the event trigger, the usage sampler).
fn subject(id: &str) -> String {
    if id.is_empty() {
        String::new()
    } else {
        format!("workload {id}: ")
    }
}

/// An error of the VM controller, with the workload and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// libvirtd did not answer; retried with back-off after reconnecting.
    #[error("{}libvirt unreachable while trying to {operation}: {source}", subject(.id))]
    Unreachable {
        id: String,
        operation: Operation,
        #[source]
        source: LibvirtError,
    },
    /// libvirt answered with an error.
    #[error("{}libvirt could not {operation} ({reason}): {source}", subject(.id))]
    Libvirt {
        id: String,
        operation: Operation,
        reason: FailureReason,
        #[source]
        source: LibvirtError,
    },
    /// Something on the host failed: qemu-img, the ISO tool, the file system.
    #[error("{}could not {operation} ({reason}): {message}", subject(.id))]
    Host {
        id: String,
        operation: Operation,
        reason: FailureReason,
        message: String,
    },
    /// The spec cannot be run as it is.
    #[error("{}invalid spec: {source}", subject(.id))]
    InvalidSpec {
        id: String,
        #[source]
        source: SpecError,
    },
    /// What the host holds breaks the node policy now (a disk attached to
    /// or recorded for another workload, a backing file outside the
    /// workload's folder, an image not of its declared format): retried
    /// with the failed-start back-off, as the host can change back.
    #[error("{}{source}", subject(.id))]
    PolicyViolation {
        id: String,
        #[source]
        source: SpecError,
    },
    /// The status or an event could not be written.
    #[error("{}writing status: {source}", subject(.id))]
    Store {
        id: String,
        #[source]
        source: WriteError,
    },
}

impl VmError {
    /// Wraps a libvirt error, telling a lost connection from a refusal.
    pub fn libvirt(id: &str, operation: Operation, source: LibvirtError) -> VmError {
        if source.is_connection_lost() || operation == Operation::Connect {
            VmError::Unreachable {
                id: id.to_string(),
                operation,
                source,
            }
        } else {
            VmError::Libvirt {
                id: id.to_string(),
                operation,
                reason: classify(operation, &source),
                source,
            }
        }
    }

    pub fn host(
        id: &str,
        operation: Operation,
        reason: FailureReason,
        message: impl Into<String>,
    ) -> VmError {
        VmError::Host {
            id: id.to_string(),
            operation,
            reason,
            message: message.into(),
        }
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, VmError::Unreachable { .. })
    }

    /// The libvirt error, if this is one.
    pub fn libvirt_error(&self) -> Option<&LibvirtError> {
        match self {
            VmError::Unreachable { source, .. } | VmError::Libvirt { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Classify for VmError {
    fn class(&self) -> ErrorClass {
        match self {
            VmError::Unreachable { .. } => ErrorClass::Unreachable,
            VmError::Libvirt { reason, .. } | VmError::Host { reason, .. } => {
                ErrorClass::of(*reason)
            }
            VmError::InvalidSpec { .. } => ErrorClass::Terminal,
            VmError::PolicyViolation { .. } => ErrorClass::Retryable,
            VmError::Store { source, .. } => store_class(source),
        }
    }

    /// The failure reason this error is reported under.
    fn reason(&self) -> FailureReason {
        match self {
            VmError::Unreachable { .. } | VmError::Store { .. } => FailureReason::RuntimeError,
            VmError::Libvirt { reason, .. } | VmError::Host { reason, .. } => *reason,
            VmError::InvalidSpec { .. } => FailureReason::InvalidSpec,
            VmError::PolicyViolation { .. } => FailureReason::PolicyViolation,
        }
    }

    /// What happened, without the workload prefix: for status.
    fn detail(&self) -> String {
        match self {
            VmError::Unreachable {
                operation, source, ..
            } => format!("libvirt unreachable while trying to {operation}: {source}"),
            VmError::Libvirt {
                operation, source, ..
            } => format!("could not {operation}: {}", source.message),
            VmError::Host {
                operation, message, ..
            } => format!("could not {operation}: {message}"),
            VmError::InvalidSpec { source, .. } | VmError::PolicyViolation { source, .. } => {
                source.to_string()
            }
            VmError::Store { source, .. } => source.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(number: ErrorNumber, origin: ErrorDomain) -> LibvirtError {
        LibvirtError::new(number, origin, "message")
    }

    #[test]
    fn classification_follows_the_error_number_origin_and_operation() {
        use ErrorDomain as D;
        use ErrorNumber as N;
        let cases = [
            (
                Operation::Define,
                error(N::XmlError, D::Domain),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Define,
                error(N::XmlDetail, D::Domain),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Define,
                error(N::ConfigUnsupported, D::Qemu),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Define,
                error(N::InvalidMac, D::Domain),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Start,
                error(N::ConfigUnsupported, D::Qemu),
                FailureReason::VmBootFailed,
            ),
            (
                Operation::Start,
                error(N::InternalError, D::Qemu),
                FailureReason::VmBootFailed,
            ),
            (
                Operation::Start,
                error(N::SystemError, D::Storage),
                FailureReason::StorageError,
            ),
            (
                Operation::Start,
                error(N::NoStorageVolume, D::Qemu),
                FailureReason::StorageError,
            ),
            (
                Operation::Start,
                error(N::NoNetwork, D::Network),
                FailureReason::NetworkError,
            ),
            (
                Operation::Start,
                error(N::OperationFailed, D::Network),
                FailureReason::NetworkError,
            ),
            (
                Operation::Shutdown,
                error(N::OperationInvalid, D::Domain),
                FailureReason::RuntimeError,
            ),
            (
                Operation::Undefine,
                error(N::InvalidArg, D::Domain),
                FailureReason::RuntimeError,
            ),
            (
                Operation::UpdateNetwork,
                error(N::NoNetwork, D::Network),
                FailureReason::NetworkError,
            ),
        ];
        crate::kit::assert_classified(cases, classify);
    }

    #[test]
    fn a_lost_connection_is_unreachable_and_retryable_not_a_refusal() {
        use ErrorDomain as D;
        use ErrorNumber as N;
        for lost in [
            error(N::SystemError, D::Rpc),
            error(N::InternalError, D::Rpc),
            error(N::NoConnect, D::None),
            error(N::InvalidConn, D::Domain),
        ] {
            let e = VmError::libvirt("w", Operation::Start, lost);
            assert!(e.is_unreachable(), "{e}");
            assert_eq!(e.class(), ErrorClass::Unreachable);
            assert_eq!(e.reason(), FailureReason::RuntimeError);
        }
        assert!(!error(N::SystemError, D::Qemu).is_connection_lost());
        let refused = VmError::libvirt("w", Operation::Define, error(N::XmlError, D::Domain));
        assert_eq!(refused.reason(), FailureReason::InvalidSpec);
        assert_eq!(refused.class(), ErrorClass::Terminal);
        assert!(refused.to_string().contains("workload w"));
        assert!(refused.to_string().contains("define the domain"));
    }

    #[test]
    fn only_an_invalid_spec_is_terminal() {
        assert!(FailureReason::InvalidSpec.is_terminal());
        for reason in [
            FailureReason::VmBootFailed,
            FailureReason::StorageError,
            FailureReason::NetworkError,
            FailureReason::RuntimeError,
            FailureReason::CrashLoopBackOff,
        ] {
            assert!(!reason.is_terminal(), "{reason}");
        }
        let storage = VmError::host(
            "w",
            Operation::CreateDisk,
            FailureReason::StorageError,
            "full",
        );
        assert_eq!(storage.class(), ErrorClass::Retryable);
        assert_eq!(storage.detail(), "could not create a disk: full");
    }
}
