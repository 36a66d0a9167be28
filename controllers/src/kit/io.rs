//! What an operator reaches into a running workload with: its output
//! ([`WorkloadIo::logs`]), a command run inside it ([`WorkloadIo::exec`])
//! and its console ([`WorkloadIo::console`]). Each runtime implements the
//! trait over its own client; the gRPC server maps requests and
//! authorization onto it and knows nothing of Docker or libvirt.
//!
//! Every stream is pulled: a reader that stops reading stops the runtime
//! side too (bounded buffers only), and dropping a stream ends the
//! session in the runtime.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use persys_api::v1::Workload;

/// Which output a chunk of a log came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// A VM's serial console.
    Console,
}

/// What part of a workload's output to stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Compose: only this service (None: every service).
    pub service: Option<String>,
    /// Keep streaming new output as it comes.
    pub follow: bool,
    /// Only the last lines of each source (None: all of them).
    pub tail: Option<u64>,
    /// Only output from this time on.
    pub since: Option<SystemTime>,
}

/// One line of output (or, where the source has no lines, a piece).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: OutputStream,
    /// The compose service; empty for other workloads.
    pub service: String,
    /// The container or domain it came from.
    pub instance: String,
    /// When the runtime recorded it, when it says.
    pub timestamp: Option<SystemTime>,
    /// The bytes, newline included.
    pub data: Bytes,
}

/// A command to run inside a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Compose: the service whose container runs it.
    pub service: Option<String>,
    pub command: Vec<String>,
    /// A pseudo-terminal: output arrives as stdout only.
    pub tty: bool,
    /// Whether stdin is attached.
    pub stdin: bool,
    /// The terminal's first size (rows, columns).
    pub size: Option<(u16, u16)>,
}

/// What the client sends while a command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Bytes),
    Resize {
        rows: u16,
        columns: u16,
    },
    /// No more stdin.
    CloseStdin,
}

/// What a running command sends back; `Exit` comes last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(i64),
}

/// Why a session could not start or went wrong, as the server maps it
/// onto gRPC codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// The workload, its service or its runtime object does not exist
    /// (NOT_FOUND).
    NotFound(String),
    /// The workload is not in a state that allows it, e.g. not running
    /// (FAILED_PRECONDITION).
    NotReady(String),
    /// The request itself is wrong (INVALID_ARGUMENT).
    Invalid(String),
    /// This runtime has no such thing; the text says what to use instead
    /// (UNIMPLEMENTED).
    Unsupported(String),
    /// The runtime could not be reached or failed (UNAVAILABLE).
    Runtime(String),
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::NotFound(text)
            | IoError::NotReady(text)
            | IoError::Invalid(text)
            | IoError::Unsupported(text)
            | IoError::Runtime(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for IoError {}

/// A stream of results that ends after its first error.
pub type IoStream<T> = BoxStream<'static, Result<T, IoError>>;

/// One runtime's way into its workloads. `workload` is the stored object,
/// as the informer has it (status included: the runtime reference).
pub trait WorkloadIo: Send + Sync {
    /// The workload's output, oldest first. Without `follow` it ends at the
    /// end of what is recorded; with it, it ends when the runtime object
    /// goes away (the caller resumes across restarts).
    fn logs(&self, workload: &Workload, options: LogOptions) -> IoStream<LogChunk>;

    /// Runs a command; `input` is what the client sends after the start.
    fn exec(
        &self,
        workload: &Workload,
        options: ExecOptions,
        input: BoxStream<'static, ExecInput>,
    ) -> IoStream<ExecOutput> {
        let _ = (workload, options, input);
        failed(IoError::Unsupported(
            "this workload type has no exec".to_string(),
        ))
    }

    /// Attaches to the console; `input` is what the client types.
    fn console(
        &self,
        workload: &Workload,
        force: bool,
        input: BoxStream<'static, Bytes>,
    ) -> IoStream<Bytes> {
        let _ = (workload, force, input);
        failed(IoError::Unsupported(
            "this workload type has no console; use exec".to_string(),
        ))
    }
}

/// A stream that fails at once.
pub fn failed<T: Send + 'static>(error: IoError) -> IoStream<T> {
    stream::once(async move { Err(error) }).boxed()
}
