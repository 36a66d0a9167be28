//! `Exec` and `Console`: sessions inside a workload through its runtime's
//! [`WorkloadIo`].
//!
//! The first request names the session (`start`); later ones are its
//! input. The workload comes from the informer cache, the runtime from the
//! node's enabled runtimes. Each session is audited with one line: who,
//! which workload, which program (never its arguments or its input: they
//! may carry secrets). Sessions end when the agent shuts down.

use std::future::ready;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use persys_api::v1::{
    ConsoleRequest, ConsoleResponse, ExecRequest, ExecResponse, TerminalSize, Workload,
    WorkloadType, console_request, exec_request, exec_response,
};
use persys_controllers::io::{ExecInput, ExecOptions, ExecOutput, IoError, WorkloadIo};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};

use super::Agent;
use super::authz::Caller;

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, Status>> + Send>>;
pub type ConsoleStream = Pin<Box<dyn Stream<Item = Result<ConsoleResponse, Status>> + Send>>;

/// A runtime's refusal or failure as the gRPC code `kit::io` documents.
fn io_status(error: IoError) -> Status {
    match error {
        IoError::NotFound(text) => Status::not_found(text),
        IoError::NotReady(text) => Status::failed_precondition(text),
        IoError::Invalid(text) => Status::invalid_argument(text),
        IoError::Unsupported(text) => Status::unimplemented(text),
        IoError::Runtime(text) => Status::unavailable(text),
    }
}

/// Who asked, for the audit line.
fn caller_of<T>(request: &Request<T>) -> (String, &'static str) {
    match Caller::of(request) {
        Some(caller) => (caller.identity.to_string(), caller.role.name()),
        None => ("unidentified".to_string(), "none"),
    }
}

/// The workload and its runtime's io, or why there is none.
fn target(agent: &Agent, id: &str) -> Result<(Arc<Workload>, Arc<dyn WorkloadIo>), Status> {
    let workload = agent
        .informer
        .cache()
        .get(id)
        .ok_or_else(|| Status::not_found(format!("workload {id} not found")))?;
    let kind = workload.workload_type();
    let io = agent.io.get(kind).ok_or_else(|| {
        Status::failed_precondition(format!(
            "workload {id}: the {} runtime is disabled on this node",
            type_name(kind)
        ))
    })?;
    Ok((workload, io))
}

fn type_name(kind: WorkloadType) -> &'static str {
    match kind {
        WorkloadType::Container | WorkloadType::Unspecified => "container",
        WorkloadType::Compose => "compose",
        WorkloadType::Vm => "vm",
    }
}

/// A terminal size as the runtimes take it; none when unset or zero.
fn size_of(size: Option<TerminalSize>) -> Option<(u16, u16)> {
    let size = size?;
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    (size.rows > 0 && size.columns > 0).then(|| (clamp(size.rows), clamp(size.columns)))
}

/// `outputs`, mapped, ending with UNAVAILABLE when the agent shuts down.
fn until_shutdown<T, U>(
    outputs: BoxStream<'static, Result<T, IoError>>,
    shutdown: CancellationToken,
    map: fn(T) -> U,
) -> impl Stream<Item = Result<U, Status>> + Send + 'static
where
    T: Send + 'static,
    U: Send + 'static,
{
    stream::unfold(
        (outputs, shutdown, false),
        move |(mut outputs, shutdown, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                _ = shutdown.cancelled() => Some((
                    Err(Status::unavailable("the agent is shutting down")),
                    (outputs, shutdown, true),
                )),
                item = outputs.next() => {
                    let item = item?;
                    let done = item.is_err();
                    Some((item.map(map).map_err(io_status), (outputs, shutdown, done)))
                }
            }
        },
    )
}

pub async fn exec(
    agent: &Agent,
    request: Request<Streaming<ExecRequest>>,
) -> Result<ExecStream, Status> {
    let (identity, role) = caller_of(&request);
    let mut inbound = request.into_inner();
    let start = match inbound.message().await? {
        Some(ExecRequest {
            request: Some(exec_request::Request::Start(start)),
        }) => start,
        _ => {
            return Err(Status::invalid_argument(
                "the first request must be start (id and command)",
            ));
        }
    };
    if start.id.is_empty() {
        return Err(Status::invalid_argument("start.id: is required"));
    }
    let program = match start.command.first() {
        Some(program) if !program.is_empty() => program.clone(),
        _ => {
            return Err(Status::invalid_argument(
                "start.command: is required (the program and its arguments)",
            ));
        }
    };
    let (workload, io) = target(agent, &start.id)?;
    tracing::info!(
        caller = %identity,
        role,
        workload_id = %start.id,
        service = %start.service,
        program = ?program,
        tty = start.tty,
        stdin = start.stdin,
        "exec session"
    );
    let options = ExecOptions {
        service: Some(start.service).filter(|s| !s.is_empty()),
        command: start.command,
        tty: start.tty,
        stdin: start.stdin,
        size: size_of(start.size),
    };
    let input = inbound
        .take_while(|r| ready(r.is_ok()))
        .filter_map(|r| {
            ready(match r.ok().and_then(|r| r.request) {
                Some(exec_request::Request::Stdin(bytes)) => {
                    Some(ExecInput::Stdin(Bytes::from(bytes)))
                }
                Some(exec_request::Request::Resize(size)) => {
                    size_of(Some(size)).map(|(rows, columns)| ExecInput::Resize { rows, columns })
                }
                Some(exec_request::Request::CloseStdin(true)) => Some(ExecInput::CloseStdin),
                // A second start, or an empty message: nothing to do.
                _ => None,
            })
        })
        .boxed();
    let outputs = io.exec(&workload, options, input);
    Ok(until_shutdown(outputs, agent.shutdown.clone(), |output| {
        let response = match output {
            ExecOutput::Stdout(bytes) => exec_response::Response::Stdout(bytes.to_vec()),
            ExecOutput::Stderr(bytes) => exec_response::Response::Stderr(bytes.to_vec()),
            ExecOutput::Exit(code) => {
                exec_response::Response::ExitCode(i32::try_from(code).unwrap_or(if code < 0 {
                    i32::MIN
                } else {
                    i32::MAX
                }))
            }
        };
        ExecResponse {
            response: Some(response),
        }
    })
    .boxed())
}

pub async fn console(
    agent: &Agent,
    request: Request<Streaming<ConsoleRequest>>,
) -> Result<ConsoleStream, Status> {
    let (identity, role) = caller_of(&request);
    let mut inbound = request.into_inner();
    let start = match inbound.message().await? {
        Some(ConsoleRequest {
            request: Some(console_request::Request::Start(start)),
        }) => start,
        _ => {
            return Err(Status::invalid_argument(
                "the first request must be start (the VM's id)",
            ));
        }
    };
    if start.id.is_empty() {
        return Err(Status::invalid_argument("start.id: is required"));
    }
    let (workload, io) = target(agent, &start.id)?;
    tracing::info!(
        caller = %identity,
        role,
        workload_id = %start.id,
        force = start.force,
        "console session"
    );
    let input = inbound
        .take_while(|r| ready(r.is_ok()))
        .filter_map(|r| {
            ready(match r.ok().and_then(|r| r.request) {
                Some(console_request::Request::Input(bytes)) => Some(Bytes::from(bytes)),
                _ => None,
            })
        })
        .boxed();
    let outputs = io.console(&workload, start.force, input);
    Ok(
        until_shutdown(outputs, agent.shutdown.clone(), |bytes| ConsoleResponse {
            output: bytes.to_vec(),
        })
        .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_refusals_keep_the_codes_the_kit_documents() {
        use tonic::Code;
        let code = |e| io_status(e).code();
        assert_eq!(code(IoError::NotFound("x".into())), Code::NotFound);
        assert_eq!(
            code(IoError::NotReady("x".into())),
            Code::FailedPrecondition
        );
        assert_eq!(code(IoError::Invalid("x".into())), Code::InvalidArgument);
        assert_eq!(code(IoError::Unsupported("x".into())), Code::Unimplemented);
        assert_eq!(code(IoError::Runtime("x".into())), Code::Unavailable);
    }

    #[test]
    fn a_terminal_size_is_taken_only_when_both_sides_are_set() {
        let size = |rows, columns| Some(TerminalSize { rows, columns });
        assert_eq!(size_of(size(24, 80)), Some((24, 80)));
        assert_eq!(size_of(size(0, 80)), None);
        assert_eq!(size_of(size(100_000, 80)), Some((u16::MAX, 80)));
        assert_eq!(size_of(None), None);
    }
}
