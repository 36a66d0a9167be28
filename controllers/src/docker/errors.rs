//! What went wrong, classified from the engine's typed errors.

use std::fmt;
use std::time::Duration;

use bollard::errors::Error as EngineError;

use super::binds::BindViolation;
use super::validate::SpecError;
use crate::kit::{Classify, ErrorClass, store_class};
use crate::source::WriteError;

/// An engine operation, for classification and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Connect,
    List,
    Inspect,
    InspectImage,
    Pull,
    CreateVolume,
    RemoveVolume,
    Create,
    Start,
    Stop,
    Remove,
    Unpause,
    Update,
    Logs,
    Stats,
    Ping,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect",
            Operation::List => "list containers",
            Operation::Inspect => "inspect the container",
            Operation::InspectImage => "inspect the image",
            Operation::Pull => "pull the image",
            Operation::CreateVolume => "create a volume",
            Operation::RemoveVolume => "remove a volume",
            Operation::Create => "create the container",
            Operation::Start => "start the container",
            Operation::Stop => "stop the container",
            Operation::Remove => "remove the container",
            Operation::Unpause => "unpause the container",
            Operation::Update => "update the container's restart policy",
            Operation::Logs => "read the container log",
            Operation::Stats => "read container stats",
            Operation::Ping => "ping the engine",
        })
    }
}

/// Why a workload is not running as declared: one vocabulary for every
/// runtime (`persys_api::failure`).
pub use persys_api::FailureReason;

/// True when `error` means the engine did not answer at all (no socket,
/// connection refused or reset, timeout), as opposed to an answer that
/// refused the request.
pub fn is_unreachable(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::HyperLegacyError { .. }
            | EngineError::HyperResponseError { .. }
            | EngineError::IOError { .. }
            | EngineError::SocketNotFoundError(_)
            | EngineError::RequestTimeoutError
    )
}

/// Classifies an engine error by the operation and the HTTP status the
/// engine answered. The engine reports a taken port or an exhausted node
/// only as a 500 with a message, so those two are recognised by their
/// message here, and nowhere else.
pub fn classify(operation: Operation, error: &EngineError) -> FailureReason {
    match error {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => match (operation, *status_code) {
            (Operation::Pull, _) if is_unauthorized(message) => {
                FailureReason::ImagePullUnauthorized
            }
            (Operation::Pull, 404) => FailureReason::ImageNotFound,
            (Operation::Pull, _) => FailureReason::ImagePullFailed,
            (Operation::InspectImage | Operation::Create, 404) => FailureReason::ImageNotFound,
            (Operation::Create | Operation::Start | Operation::CreateVolume, 400) => {
                FailureReason::InvalidSpec
            }
            (_, 500) if is_port_conflict(message) => FailureReason::PortBindConflict,
            (_, 500) if is_resource_exhaustion(message) => FailureReason::InsufficientResources,
            _ => FailureReason::RuntimeError,
        },
        EngineError::DockerStreamError { error } if operation == Operation::Pull => {
            if is_unauthorized(error) {
                FailureReason::ImagePullUnauthorized
            } else {
                FailureReason::ImagePullFailed
            }
        }
        _ => FailureReason::RuntimeError,
    }
}

/// True when the registry refused the pull for want of (valid)
/// credentials, as the engine words it: `unauthorized: authentication
/// required`, `no basic auth credentials`, `denied: requested access to the
/// resource is denied` (also what Docker Hub answers for a repository that
/// does not exist, which no retry makes appear either).
pub fn is_unauthorized(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied: requested access",
    ]
    .iter()
    .any(|words| message.contains(words))
}

fn is_port_conflict(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("port is already allocated") || message.contains("address already in use")
}

fn is_resource_exhaustion(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("no space left on device")
        || message.contains("cannot allocate memory")
        || message.contains("out of memory")
}

/// An error of the Docker controller, with the workload and what was being
/// done.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine did not answer; retry with back-off.
    #[error("workload {id}: docker engine unreachable while trying to {operation}: {source}")]
    Unreachable {
        id: String,
        operation: Operation,
        #[source]
        source: EngineError,
    },
    /// The engine answered with an error.
    #[error("workload {id}: docker could not {operation} ({reason}): {source}")]
    Engine {
        id: String,
        operation: Operation,
        reason: FailureReason,
        #[source]
        source: EngineError,
    },
    /// The spec cannot be run as it is.
    #[error("workload {id}: invalid spec: {source}")]
    InvalidSpec {
        id: String,
        #[source]
        source: SpecError,
    },
    /// A bind source may not be mounted now (swapped for a link, moved
    /// outside the allowed roots): nothing is created or started; retried
    /// with the back-off of failed starts.
    #[error("workload {id}: policy violation: {violation}")]
    PolicyViolation {
        id: String,
        violation: BindViolation,
    },
    /// A pull ran past its deadline and was abandoned; retried with the
    /// pull back-off.
    #[error("workload {id}: pulling image {image}: {}", pull_deadline_detail(*after))]
    PullTimedOut {
        id: String,
        image: String,
        after: Duration,
    },
    /// The status or an event could not be written.
    #[error("workload {id}: writing status: {source}")]
    Store {
        id: String,
        #[source]
        source: WriteError,
    },
}

impl DockerError {
    /// Wraps an engine error, telling an unreachable engine from a refusal.
    pub fn engine(id: &str, operation: Operation, source: EngineError) -> DockerError {
        if is_unreachable(&source) {
            DockerError::Unreachable {
                id: id.to_string(),
                operation,
                source,
            }
        } else {
            DockerError::Engine {
                id: id.to_string(),
                operation,
                reason: classify(operation, &source),
                source,
            }
        }
    }
}

/// The variable that sets the deadline of a pull.
pub const PULL_TIMEOUT_VARIABLE: &str = "PERSYS_PULL_TIMEOUT";

/// What a status says of a pull abandoned at its deadline (after the
/// image it names).
pub(crate) fn pull_deadline_detail(after: Duration) -> String {
    format!(
        "abandoned after {}, the pull deadline ({PULL_TIMEOUT_VARIABLE})",
        humantime::format_duration(after)
    )
}

/// What a status says of an engine that could not be reached.
pub(crate) fn unreachable_detail(
    operation: impl std::fmt::Display,
    source: &EngineError,
) -> String {
    format!("docker engine unreachable while trying to {operation}: {source}")
}

/// What a status says of a failed engine call: unreachable, or the
/// engine's own words. Docker and Compose word it alike.
pub(crate) fn engine_detail(operation: impl std::fmt::Display, source: &EngineError) -> String {
    if is_unreachable(source) {
        unreachable_detail(operation, source)
    } else {
        format!("docker could not {operation}: {}", engine_says(source))
    }
}

/// The engine's own words: the message of a refusal, else the error.
pub(crate) fn engine_says(source: &EngineError) -> String {
    match source {
        EngineError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl Classify for DockerError {
    fn class(&self) -> ErrorClass {
        match self {
            DockerError::Unreachable { .. } => ErrorClass::Unreachable,
            DockerError::Engine { reason, .. } => ErrorClass::of(*reason),
            DockerError::InvalidSpec { .. } => ErrorClass::Terminal,
            DockerError::PolicyViolation { .. } | DockerError::PullTimedOut { .. } => {
                ErrorClass::of(self.reason())
            }
            DockerError::Store { source, .. } => store_class(source),
        }
    }

    /// The failure reason this error is reported under.
    fn reason(&self) -> FailureReason {
        match self {
            DockerError::Unreachable { .. } | DockerError::Store { .. } => {
                FailureReason::RuntimeError
            }
            DockerError::Engine { reason, .. } => *reason,
            DockerError::InvalidSpec { .. } => FailureReason::InvalidSpec,
            DockerError::PolicyViolation { .. } => FailureReason::PolicyViolation,
            DockerError::PullTimedOut { .. } => FailureReason::ImagePullFailed,
        }
    }

    /// The engine's own words, without the workload prefix: for status.
    fn detail(&self) -> String {
        match self {
            DockerError::InvalidSpec { source, .. } => source.to_string(),
            DockerError::PolicyViolation { violation, .. } => violation.to_string(),
            DockerError::PullTimedOut { after, .. } => pull_deadline_detail(*after),
            DockerError::Store { source, .. } => source.to_string(),
            DockerError::Unreachable {
                operation, source, ..
            }
            | DockerError::Engine {
                operation, source, ..
            } => engine_detail(operation, source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16, message: &str) -> EngineError {
        EngineError::DockerResponseServerError {
            status_code,
            message: message.into(),
        }
    }

    #[test]
    fn classification_follows_the_status_code_and_operation() {
        let cases = [
            (
                Operation::Pull,
                server(
                    500,
                    "Get \"https://registry.invalid/v2/\": dial tcp: lookup registry.invalid: no such host",
                ),
                FailureReason::ImagePullFailed,
            ),
            (
                Operation::Pull,
                server(
                    404,
                    "pull access denied for nope, repository does not exist",
                ),
                FailureReason::ImageNotFound,
            ),
            (
                Operation::Pull,
                EngineError::DockerStreamError {
                    error: "unauthorized".into(),
                },
                FailureReason::ImagePullUnauthorized,
            ),
            (
                Operation::Pull,
                server(
                    500,
                    "Head \"https://127.0.0.1:5000/v2/private/app/manifests/1\": no basic auth credentials",
                ),
                FailureReason::ImagePullUnauthorized,
            ),
            (
                Operation::Pull,
                server(
                    404,
                    "pull access denied for private/app, repository does not exist or may require 'docker login': denied: requested access to the resource is denied",
                ),
                FailureReason::ImagePullUnauthorized,
            ),
            (
                Operation::Pull,
                EngineError::DockerStreamError {
                    error: "unexpected EOF".into(),
                },
                FailureReason::ImagePullFailed,
            ),
            (
                Operation::InspectImage,
                server(404, "No such image: a:1"),
                FailureReason::ImageNotFound,
            ),
            (
                Operation::Create,
                server(404, "No such image: a:1"),
                FailureReason::ImageNotFound,
            ),
            (
                Operation::Create,
                server(400, "Minimum memory limit allowed is 6MB"),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Start,
                server(
                    400,
                    "OCI runtime create failed: exec: \"/nope\": no such file or directory",
                ),
                FailureReason::InvalidSpec,
            ),
            (
                Operation::Start,
                server(
                    500,
                    "driver failed programming external connectivity on endpoint x: Bind for 0.0.0.0:8080 failed: port is already allocated",
                ),
                FailureReason::PortBindConflict,
            ),
            (
                Operation::Start,
                server(500, "listen tcp4 0.0.0.0:80: bind: address already in use"),
                FailureReason::PortBindConflict,
            ),
            (
                Operation::Create,
                server(500, "write /var/lib/docker/x: no space left on device"),
                FailureReason::InsufficientResources,
            ),
            (
                Operation::Create,
                server(
                    409,
                    "Conflict. The container name \"/web\" is already in use",
                ),
                FailureReason::RuntimeError,
            ),
            (
                Operation::Stop,
                server(500, "port is already allocated"),
                FailureReason::PortBindConflict,
            ),
        ];
        crate::kit::assert_classified(cases, classify);
    }

    #[test]
    fn unreachable_engines_are_retryable_and_not_classified_as_refusals() {
        let error = DockerError::engine(
            "w",
            Operation::Start,
            EngineError::SocketNotFoundError("/nope.sock".into()),
        );
        assert!(matches!(error, DockerError::Unreachable { .. }));
        assert_eq!(error.class(), ErrorClass::Unreachable);
        let refused = DockerError::engine("w", Operation::Create, server(400, "bad"));
        assert_eq!(refused.reason(), FailureReason::InvalidSpec);
        assert_eq!(refused.class(), ErrorClass::Terminal);
        assert!(refused.to_string().contains("workload w"));
    }

    #[test]
    fn terminal_reasons_are_the_ones_a_retry_cannot_fix() {
        assert!(FailureReason::InvalidSpec.is_terminal());
        assert!(FailureReason::ContainerExited.is_terminal());
        assert!(!FailureReason::PortBindConflict.is_terminal());
        assert!(!FailureReason::ImagePullFailed.is_terminal());
        assert!(FailureReason::ImagePullUnauthorized.is_terminal());
        assert_eq!(
            FailureReason::InvalidSpec.scheduler_code(),
            "INVALID_SPECIFICATION"
        );
    }

    #[test]
    fn a_policy_violation_and_an_abandoned_pull_are_retried_under_their_reasons() {
        let violation = DockerError::PolicyViolation {
            id: "w".into(),
            violation: BindViolation {
                what: "bind source \"/srv/data\" of the container".into(),
                message: "passes through a symbolic link".into(),
            },
        };
        assert_eq!(violation.reason(), FailureReason::PolicyViolation);
        assert_eq!(violation.class(), ErrorClass::Retryable);
        assert!(violation.detail().starts_with("bind source"));
        assert_eq!(
            crate::kit::refusal_event(violation.reason()),
            "PolicyViolation"
        );
        let abandoned = DockerError::PullTimedOut {
            id: "w".into(),
            image: "127.0.0.1:5000/app:1".into(),
            after: Duration::from_secs(600),
        };
        assert_eq!(abandoned.reason(), FailureReason::ImagePullFailed);
        assert_eq!(abandoned.class(), ErrorClass::Retryable);
        assert_eq!(
            abandoned.detail(),
            "abandoned after 10m, the pull deadline (PERSYS_PULL_TIMEOUT)"
        );
        assert!(abandoned.to_string().contains("127.0.0.1:5000/app:1"));
    }
}
