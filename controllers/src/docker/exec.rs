//! A command run in a container (Docker exec): create the exec, start it
//! attached over the engine's hijacked connection, pump its output into a
//! bounded channel and the client's input into the connection, and end with
//! the exit status from the engine.
//!
//! [`session`] takes a container id, so compose services share it.

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{InspectContainerOptions, ResizeExecOptions};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use persys_api::v1::Workload;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::engine::Engine;
use super::labels;
use crate::kit::io::{ExecInput, ExecOptions, ExecOutput, IoError, IoStream};

/// Output pieces held between the engine and a slow client: beyond this
/// the engine connection is not read, and the command blocks on its output.
const OUTPUT_BUFFER: usize = 16;

pub(crate) fn container_exec(
    engine: &Engine,
    workload: &Workload,
    options: ExecOptions,
    input: BoxStream<'static, ExecInput>,
) -> IoStream<ExecOutput> {
    let engine = engine.clone();
    let id = workload.id().to_string();
    let reference = workload
        .status
        .as_ref()
        .map(|s| s.runtime_ref.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| labels::container_name(&id));
    stream::once(async move {
        let docker = engine.client().await.map_err(|e| unreachable(&id, &e))?;
        let container = running_container(&docker, &id, &reference).await?;
        session(docker, &id, &container, options, input).await
    })
    .try_flatten()
    .boxed()
}

pub(crate) fn unreachable(id: &str, error: &EngineError) -> IoError {
    IoError::Runtime(format!("workload {id}: the docker engine: {error}"))
}

fn status_code(error: &EngineError) -> Option<u16> {
    match error {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The workload's container, when it is the agent's and running.
async fn running_container(docker: &Docker, id: &str, reference: &str) -> Result<String, IoError> {
    let found = match docker
        .inspect_container(reference, None::<InspectContainerOptions>)
        .await
    {
        Ok(found) => found,
        Err(e) if status_code(&e) == Some(404) => {
            return Err(IoError::NotReady(format!(
                "workload {id} has no container (not started yet, or being replaced)"
            )));
        }
        Err(e) => return Err(unreachable(id, &e)),
    };
    let marks = labels::Marks::read(found.config.as_ref().and_then(|c| c.labels.as_ref()));
    if marks.workload_id.as_deref() != Some(id) && !super::adopt::is_go_inspected_of(&found, id) {
        return Err(IoError::NotReady(format!(
            "workload {id} has no container of its own (not started yet, or being replaced)"
        )));
    }
    let state = found.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false);
    let paused = state.and_then(|s| s.paused).unwrap_or(false);
    let container = found.id.unwrap_or_else(|| reference.to_string());
    if !running || paused {
        let what = state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "not running".to_string());
        return Err(IoError::NotReady(format!(
            "workload {id}: its container is {what}; exec needs it running"
        )));
    }
    Ok(container)
}

/// Runs `options.command` in `container` (of workload `id`), attached.
/// The stream ends with [`ExecOutput::Exit`]; dropping it closes the
/// connection (the command loses its stdin and terminal) and ends both
/// pumps.
pub(crate) async fn session(
    docker: Docker,
    id: &str,
    container: &str,
    options: ExecOptions,
    input: BoxStream<'static, ExecInput>,
) -> Result<IoStream<ExecOutput>, IoError> {
    let create = CreateExecOptions {
        attach_stdin: Some(options.stdin),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(options.tty),
        cmd: Some(options.command.clone()),
        ..Default::default()
    };
    let mut config: bollard::models::ExecConfig = create.into();
    if let (true, Some((rows, columns))) = (options.tty, options.size) {
        config.console_size = Some(vec![usize::from(rows), usize::from(columns)]);
    }
    let exec = docker
        .create_exec(container, config)
        .await
        .map_err(|e| match status_code(&e) {
            Some(404) => IoError::NotReady(format!(
                "workload {id}: its container is gone (being replaced?)"
            )),
            Some(409) => IoError::NotReady(format!(
                "workload {id}: its container is not running (paused or restarting)"
            )),
            _ => IoError::Runtime(format!("workload {id}: creating the exec: {e}")),
        })?
        .id;
    let started = docker
        .start_exec(
            &exec,
            Some(StartExecOptions {
                detach: false,
                tty: options.tty,
                output_capacity: None,
            }),
        )
        .await
        .map_err(|e| IoError::Runtime(format!("workload {id}: starting the exec: {e}")))?;
    let StartExecResults::Attached {
        output,
        input: writer,
    } = started
    else {
        return Err(IoError::Runtime(format!(
            "workload {id}: the engine started the exec detached"
        )));
    };
    if let (true, Some((rows, columns))) = (options.tty, options.size) {
        resize(&docker, &exec, rows, columns).await;
    }

    let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
    let stdin = tokio::spawn(pump_input(
        docker.clone(),
        exec.clone(),
        options.stdin,
        input,
        writer,
    ));
    tokio::spawn(pump_output(docker, id.to_string(), exec, output, tx, stdin));
    Ok(ReceiverStream::new(rx).boxed())
}

async fn resize(docker: &Docker, exec: &str, rows: u16, columns: u16) {
    let size = ResizeExecOptions {
        h: i32::from(rows),
        w: i32::from(columns),
    };
    if let Err(error) = docker.resize_exec(exec, size).await {
        // The command may have ended already; a size is not worth failing for.
        tracing::debug!(%error, "resizing an exec terminal");
    }
}

/// The client's input into the command. Half-closing the connection is
/// how the engine learns that stdin ended (the command reads end of file).
async fn pump_input(
    docker: Docker,
    exec: String,
    stdin: bool,
    mut input: BoxStream<'static, ExecInput>,
    mut writer: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
) {
    let mut open = stdin;
    while let Some(item) = input.next().await {
        match item {
            ExecInput::Stdin(bytes) if open => {
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    open = false;
                }
            }
            ExecInput::Stdin(_) => {}
            ExecInput::Resize { rows, columns } => resize(&docker, &exec, rows, columns).await,
            ExecInput::CloseStdin => {
                if open {
                    let _ = writer.shutdown().await;
                    open = false;
                }
            }
        }
    }
    // The client sends nothing more: that is the end of stdin too. The
    // writer is kept until the session ends, so the connection stays open.
    if open {
        let _ = writer.shutdown().await;
    }
    std::future::pending::<()>().await;
}

/// The command's output to the client, then its exit status. Ends early,
/// ending the input pump too, when the client goes away.
async fn pump_output(
    docker: Docker,
    id: String,
    exec: String,
    mut output: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<LogOutput, EngineError>> + Send>,
    >,
    tx: mpsc::Sender<Result<ExecOutput, IoError>>,
    stdin: tokio::task::JoinHandle<()>,
) {
    loop {
        let item = tokio::select! {
            _ = tx.closed() => break,
            item = output.next() => item,
        };
        let message = match item {
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                Ok(ExecOutput::Stdout(message))
            }
            Some(Ok(LogOutput::StdErr { message })) => Ok(ExecOutput::Stderr(message)),
            Some(Ok(LogOutput::StdIn { .. })) => continue,
            Some(Err(e)) => Err(IoError::Runtime(format!(
                "workload {id}: reading the command's output: {e}"
            ))),
            None => exit_status(&docker, &id, &exec).await,
        };
        let last = !matches!(message, Ok(ExecOutput::Stdout(_) | ExecOutput::Stderr(_)));
        if tx.send(message).await.is_err() || last {
            break;
        }
    }
    stdin.abort();
}

async fn exit_status(docker: &Docker, id: &str, exec: &str) -> Result<ExecOutput, IoError> {
    let inspected = docker
        .inspect_exec(exec)
        .await
        .map_err(|e| IoError::Runtime(format!("workload {id}: the command's exit status: {e}")))?;
    match inspected.exit_code {
        Some(code) if inspected.running != Some(true) => Ok(ExecOutput::Exit(code)),
        _ => Err(IoError::Runtime(format!(
            "workload {id}: the command's output ended but the engine reports no exit status"
        ))),
    }
}
