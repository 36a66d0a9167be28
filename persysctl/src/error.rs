//! What can go wrong, as one line a person can act on.

use tonic::{Code, Status};

/// Every failure ends the command with exit status 1 (usage errors are
/// clap's, with status 2), except [`CliError::RemoteExit`], whose status
/// is the remote command's. None is retried by persysctl itself: the user
/// fixes the cause and runs the command again.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A flag, file or setting that cannot be used as given.
    #[error("{0}")]
    Config(String),

    /// A manifest that cannot be read, parsed or converted; the message
    /// starts with the file (and line and column where known).
    #[error("{0}")]
    Manifest(String),

    /// No connection: refused, unreachable, timed out.
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },

    /// The TLS handshake failed: a certificate was not trusted on one side.
    #[error("TLS handshake with {server} failed: {reason}")]
    Tls { server: String, reason: String },

    /// The agent answered with an error; `reason` is its own message.
    #[error("{}", friendly(*.code, .reason))]
    Agent { code: Code, reason: String },

    /// The agent did not answer in time.
    #[error("{what}: no answer from {server} within {}", humantime::format_duration(*.after))]
    Timeout {
        what: String,
        server: String,
        after: std::time::Duration,
    },

    /// A wait that ran out of time (`delete --wait`).
    #[error("{0}")]
    WaitTimedOut(String),

    /// HealthCheck answered, and not healthy.
    #[error("the agent at {server} is not healthy")]
    Unhealthy { server: String },

    /// The agent ended a watch stream (it is shutting down).
    #[error("the agent at {server} ended the watch{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    WatchEnded { server: String, reason: String },

    /// An operation on one workload failed.
    #[error("{id}: {source}")]
    Workload { id: String, source: Box<CliError> },

    /// Several operations failed; each was reported on its own line already.
    #[error("{failed} of {total} {what}")]
    Partial {
        failed: usize,
        total: usize,
        what: &'static str,
    },

    /// `exec`: the remote command ended with this nonzero status, which
    /// becomes persysctl's own (nothing is printed).
    #[error("the command exited with status {0}")]
    RemoteExit(i32),

    /// An exec or console session cut short: a signal, or the agent
    /// ending the stream without an exit status.
    #[error("{0}")]
    SessionEnded(String),

    /// Writing to standard output failed.
    #[error("writing output: {0}")]
    Output(std::io::Error),

    /// The reader of our output went away (`persysctl get | head`): not an
    /// error, the command just stops.
    #[error("broken pipe")]
    BrokenPipe,
}

impl CliError {
    /// An error status answered by the agent itself (transport failures are
    /// classified by the connection, which knows the server and the TLS
    /// files).
    pub fn from_agent(status: &Status) -> CliError {
        CliError::Agent {
            code: status.code(),
            reason: status.message().to_string(),
        }
    }

    /// What the agent answers for an unknown id, for lookups that learn it
    /// another way.
    pub fn not_found(id: &str) -> CliError {
        CliError::Agent {
            code: Code::NotFound,
            reason: format!("workload {id} not found"),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            CliError::Agent {
                code: Code::NotFound,
                ..
            }
        )
    }
}

/// The exit status persysctl ends with for `error`: the remote command's
/// for `exec` (1 when it does not fit one), 1 for its own failures.
pub fn exit_status(error: &CliError) -> u8 {
    match error {
        CliError::RemoteExit(code) => u8::try_from(*code).ok().filter(|c| *c != 0).unwrap_or(1),
        _ => 1,
    }
}

/// The agent's message, prefixed with what its code means to a user.
fn friendly(code: Code, message: &str) -> String {
    let word = match code {
        // The agent's messages say "workload X not found" themselves.
        Code::NotFound => return message.to_string(),
        Code::InvalidArgument | Code::OutOfRange => "invalid",
        Code::FailedPrecondition | Code::Aborted => "refused",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied | Code::Unauthenticated => "access denied",
        Code::ResourceExhausted => "too large or too many",
        Code::Unimplemented => "not supported by this agent",
        Code::Unavailable => "agent unavailable",
        Code::DeadlineExceeded => "timed out",
        Code::Cancelled => "cancelled",
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => "agent error",
    };
    if message.is_empty() {
        word.to_string()
    } else {
        format!("{word}: {message}")
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> CliError {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::Output(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_say_what_their_code_means() {
        let refused = CliError::from_agent(&Status::failed_precondition("revision r1 reused"));
        assert_eq!(refused.to_string(), "refused: revision r1 reused");
        let invalid = CliError::from_agent(&Status::invalid_argument("spec.image: is required"));
        assert_eq!(invalid.to_string(), "invalid: spec.image: is required");
        let missing = CliError::from_agent(&Status::not_found("workload web not found"));
        assert_eq!(missing.to_string(), "workload web not found");
        assert!(missing.is_not_found());
        assert_eq!(exit_status(&CliError::RemoteExit(3)), 3);
        assert_eq!(exit_status(&CliError::RemoteExit(300)), 1);
        assert_eq!(exit_status(&CliError::RemoteExit(-1)), 1);
        assert_eq!(exit_status(&missing), 1);
        let old = CliError::from_agent(&Status::unimplemented(""));
        assert_eq!(old.to_string(), "not supported by this agent");
    }
}
