//! What went wrong, with the workload and the operation, and the failure
//! reasons status reports.

use std::fmt;
use std::path::PathBuf;

use bollard::errors::Error as EngineError;

use super::binary::DetectError;
use super::cli::Verb;
use crate::docker::binds::BindViolation;
use crate::docker::errors::{engine_detail, is_unreachable};
use crate::kit::{Classify, ErrorClass, store_class};
use crate::source::WriteError;

/// An engine call of the Compose controller, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Connect,
    ListContainers,
    InspectContainer,
    StopContainer,
    RemoveContainer,
    ListNetworks,
    RemoveNetwork,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Connect => "connect",
            Operation::ListContainers => "list the project's containers",
            Operation::InspectContainer => "inspect a container",
            Operation::StopContainer => "stop a container",
            Operation::RemoveContainer => "remove a container",
            Operation::ListNetworks => "list the project's networks",
            Operation::RemoveNetwork => "remove a network",
        })
    }
}

/// Why a workload is not running as declared: one vocabulary for every
/// runtime (`persys_api::failure`).
pub use persys_api::FailureReason;

/// Classifies a failed compose command by what it wrote to stderr.
///
/// The compose CLI exits 1 whatever went wrong and v1 has no machine
/// readable output, so its words are all there is; they are read here and
/// nowhere else. Status itself never relies on them: it comes from the
/// engine.
pub fn classify_stderr(stderr: &str) -> FailureReason {
    let text = stderr.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["port is already allocated", "address already in use"]) {
        return FailureReason::PortBindConflict;
    }
    if has(&[
        "no space left on device",
        "cannot allocate memory",
        "out of memory",
    ]) {
        return FailureReason::InsufficientResources;
    }
    if has(&[
        "is invalid because",
        "unsupported config option",
        "invalid interpolation format",
        "additional properties",
        "additional property",
        "services must be a mapping",
        "refers to undefined",
        "mapping values are not allowed",
        "found character that cannot start any token",
        "yaml: ",
        "validating ",
        "invalid compose project",
        "top-level object must be a mapping",
    ]) {
        return FailureReason::InvalidSpec;
    }
    if has(&[
        "pull access denied",
        "manifest unknown",
        "failed to resolve reference",
        "repository does not exist",
        "error pulling image",
    ]) || pull_was_last_step(&text)
    {
        return FailureReason::ImagePullFailed;
    }
    FailureReason::RuntimeError
}

/// True when the last progress line is a pull: v1 prints `Pulling web
/// (image)...` and then only the registry's error (`no such host`,
/// `unauthorized`…), which names no pull at all.
fn pull_was_last_step(text: &str) -> bool {
    const LATER_STEPS: &[&str] = &[
        "creating",
        "created",
        "recreating",
        "starting",
        "started",
        "stopping",
        "removing",
    ];
    let lines: Vec<&str> = text.lines().collect();
    let last_pull = lines.iter().rposition(|l| l.contains("pulling"));
    let last_other = lines
        .iter()
        .rposition(|l| LATER_STEPS.iter().any(|s| l.contains(s)));
    match (last_pull, last_other) {
        (Some(pull), Some(other)) => pull > other,
        (Some(_), None) => true,
        _ => false,
    }
}

/// An error of the Compose controller, with the workload and what was
/// being done.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// An engine call failed: it answered with an error, or did not answer
    /// at all (unreachable: see [`is_unreachable`]).
    #[error("workload {id}: docker could not {operation}: {source}")]
    Engine {
        id: String,
        operation: Operation,
        #[source]
        source: EngineError,
    },
    /// No usable compose binary.
    #[error("workload {id}: no compose binary: {source}")]
    NoBinary {
        id: String,
        #[source]
        source: DetectError,
    },
    /// A compose command failed, timed out or could not be started.
    #[error("workload {id}: `compose {verb}` failed ({reason}): {detail}")]
    Command {
        id: String,
        verb: Verb,
        reason: FailureReason,
        /// The end of its stderr, or why it did not run.
        detail: String,
    },
    /// The project folder could not be written or read.
    #[error("workload {id}: project files at {}: {source}", path.display())]
    Files {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bind source may not be mounted now (checked before every `up`):
    /// the node's files changed since apply. Retried: putting the
    /// directory back is enough.
    #[error("workload {id}: policy violation: {violation}")]
    PolicyViolation {
        id: String,
        violation: BindViolation,
    },
    /// The spec cannot be run as it is.
    #[error("workload {id}: invalid spec: {message}")]
    InvalidSpec { id: String, message: String },
    /// The status could not be written.
    #[error("workload {id}: writing status: {source}")]
    Store {
        id: String,
        #[source]
        source: WriteError,
    },
}

impl ComposeError {
    /// Wraps an engine error (the class tells an unreachable engine from a
    /// refusal).
    pub fn engine(id: &str, operation: Operation, source: EngineError) -> ComposeError {
        ComposeError::Engine {
            id: id.to_string(),
            operation,
            source,
        }
    }
}

impl Classify for ComposeError {
    fn class(&self) -> ErrorClass {
        match self {
            ComposeError::Engine { source, .. } if is_unreachable(source) => {
                ErrorClass::Unreachable
            }
            // The engine refused, no binary yet, a full disk: may pass.
            ComposeError::Engine { .. }
            | ComposeError::NoBinary { .. }
            | ComposeError::Files { .. }
            | ComposeError::PolicyViolation { .. } => ErrorClass::Retryable,
            ComposeError::Command { reason, .. } => ErrorClass::of(*reason),
            ComposeError::InvalidSpec { .. } => ErrorClass::Terminal,
            ComposeError::Store { source, .. } => store_class(source),
        }
    }

    /// The failure reason this error is reported under.
    fn reason(&self) -> FailureReason {
        match self {
            ComposeError::Command { reason, .. } => *reason,
            ComposeError::InvalidSpec { .. } => FailureReason::InvalidSpec,
            ComposeError::PolicyViolation { .. } => FailureReason::PolicyViolation,
            ComposeError::Files { .. } => FailureReason::StorageError,
            ComposeError::Engine { .. }
            | ComposeError::NoBinary { .. }
            | ComposeError::Store { .. } => FailureReason::RuntimeError,
        }
    }

    /// What went wrong without the workload prefix: for status.
    fn detail(&self) -> String {
        match self {
            ComposeError::Engine {
                operation, source, ..
            } => engine_detail(operation, source),
            ComposeError::NoBinary { source, .. } => format!("no compose binary: {source}"),
            ComposeError::Command { verb, detail, .. } => format!("compose {verb}: {detail}"),
            ComposeError::Files { path, source, .. } => {
                format!("project files at {}: {source}", path.display())
            }
            ComposeError::InvalidSpec { message, .. } => message.clone(),
            ComposeError::PolicyViolation { violation, .. } => violation.to_string(),
            ComposeError::Store { source, .. } => source.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What docker-compose 1.29.2 wrote to stderr, captured on this engine.
    const V1_PULL_FAILED: &str = "Creating network \"p_default\" with the default driver\n\
        Pulling web (registry.invalid/x:1)...\n\
        Get \"https://registry.invalid/v2/\": dial tcp: lookup registry.invalid on 10.255.255.53:53: no such host\n";
    const V1_INVALID: &str = "The Compose file './invalid.yml' is invalid because:\n\
        Unsupported config option for services.web: 'imagez'\n";
    const V1_PORT_TAKEN: &str = "Creating network \"p_default\" with the default driver\n\
        Creating p_a_1 ... \n\
        Host is already in use by another container\n\
        Creating p_a_1 ... error\n\n\
        ERROR: for p_a_1  Cannot start service a: driver failed programming external connectivity on endpoint p_a_1 (a285): Bind for 0.0.0.0:18777 failed: port is already allocated\n\n\
        Encountered errors while bringing up the project.\n";
    const V1_PULLED_THEN_FAILED: &str = "Pulling web (registry.local/x:1)...\n\
        1: Pulling from x\nDigest: sha256:00\n\
        Creating p_web_1 ... \nCreating p_web_1 ... error\n\n\
        ERROR: for web  Cannot start service web: OCI runtime create failed: exec: \"nope\": executable file not found in $PATH\n";

    #[test]
    fn compose_failures_are_classified_from_what_compose_wrote() {
        assert_eq!(
            classify_stderr(V1_PULL_FAILED),
            FailureReason::ImagePullFailed
        );
        assert_eq!(classify_stderr(V1_INVALID), FailureReason::InvalidSpec);
        assert_eq!(
            classify_stderr(V1_PORT_TAKEN),
            FailureReason::PortBindConflict
        );
        assert_eq!(
            classify_stderr(V1_PULLED_THEN_FAILED),
            FailureReason::RuntimeError,
            "a pull that succeeded is not the failure"
        );
        assert_eq!(
            classify_stderr(
                "Error response from daemon: pull access denied for nope, repository does not exist"
            ),
            FailureReason::ImagePullFailed
        );
        assert_eq!(
            classify_stderr("write /var/lib/docker/x: no space left on device"),
            FailureReason::InsufficientResources
        );
        assert_eq!(
            classify_stderr("Couldn't connect to Docker daemon"),
            FailureReason::RuntimeError
        );
    }

    #[test]
    fn errors_name_the_workload_and_only_invalid_specs_are_terminal() {
        let failed = ComposeError::Command {
            id: "shop".into(),
            verb: Verb::Up,
            reason: FailureReason::ImagePullFailed,
            detail: "no such host".into(),
        };
        assert!(failed.to_string().contains("workload shop"));
        assert!(failed.to_string().contains("compose up"));
        assert_eq!(failed.class(), ErrorClass::Retryable);
        let invalid = ComposeError::Command {
            id: "shop".into(),
            verb: Verb::Up,
            reason: FailureReason::InvalidSpec,
            detail: "is invalid because".into(),
        };
        assert_eq!(invalid.class(), ErrorClass::Terminal);
        let no_socket = EngineError::SocketNotFoundError("/nope.sock".into());
        let unreachable = ComposeError::engine("shop", Operation::ListContainers, no_socket);
        assert_eq!(unreachable.class(), ErrorClass::Unreachable);
        assert_eq!(unreachable.reason(), FailureReason::RuntimeError);
    }
}
