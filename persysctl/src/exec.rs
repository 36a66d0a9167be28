//! `persysctl exec ID [-i] [-t] [--service S] -- CMD ARGS…`: runs a command
//! in a container or a compose service and ends with its exit status.
//!
//! With `-t` the agent allocates a terminal; when standard input is one,
//! it goes raw here (restored on every way out) and follows the window's
//! size. With `-i` standard input is streamed, its end closing the
//! command's stdin.

use std::io::Write;

use futures::StreamExt;
use futures::stream;
use persys_api::v1::{ExecRequest, ExecStart, TerminalSize, exec_request, exec_response};
use tokio::sync::mpsc;

use crate::cli::ExecArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::raw::{self, Endings, RawTerminal};

/// Requests queued for the agent (stdin chunks, resizes).
const REQUEST_BUFFER: usize = 16;

pub async fn run(agent: &Agent, args: ExecArgs) -> Result<(), CliError> {
    let mut endings = Endings::listen()?;
    let size = if args.tty { raw::size() } else { None };
    let mut winch = if args.tty && size.is_some() {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .map_err(|e| CliError::Config(format!("cannot listen for resizes: {e}")))?,
        )
    } else {
        None
    };
    let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
    let start = ExecRequest {
        request: Some(exec_request::Request::Start(ExecStart {
            id: args.id.clone(),
            service: args.service.clone().unwrap_or_default(),
            command: args.command.clone(),
            tty: args.tty,
            stdin: args.stdin,
            size: size.map(|(rows, columns)| TerminalSize { rows, columns }),
        })),
    };
    let requests = stream::once(async move { start }).chain(stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|request| (request, rx))
    }));
    let mut responses = agent.exec(requests).await?;
    // Raw only once the session is open, so an early failure prints on a
    // cooked terminal.
    let _raw = if args.tty {
        RawTerminal::enter()?
    } else {
        None
    };
    if args.stdin {
        tokio::spawn(forward_stdin(tx.clone()));
    }

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            message = responses.message() => match message {
                Ok(Some(message)) => match message.response {
                    Some(exec_response::Response::Stdout(bytes)) => {
                        stdout.write_all(&bytes)?;
                        stdout.flush()?;
                    }
                    Some(exec_response::Response::Stderr(bytes)) => {
                        stderr.write_all(&bytes)?;
                        stderr.flush()?;
                    }
                    Some(exec_response::Response::ExitCode(0)) => return Ok(()),
                    Some(exec_response::Response::ExitCode(code)) => {
                        return Err(CliError::RemoteExit(code));
                    }
                    None => {}
                },
                Ok(None) => {
                    return Err(CliError::SessionEnded(format!(
                        "{}: the session ended without an exit status",
                        args.id
                    )));
                }
                Err(status) => return Err(agent.failure(&status).await),
            },
            signal = endings.next() => {
                return Err(CliError::SessionEnded(format!("{}: ended by {signal}", args.id)));
            }
            Some(()) = next_resize(&mut winch) => {
                if let Some((rows, columns)) = raw::size() {
                    let resize = exec_request::Request::Resize(TerminalSize { rows, columns });
                    let _ = tx.try_send(ExecRequest { request: Some(resize) });
                }
            }
        }
    }
}

async fn next_resize(winch: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match winch {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Standard input to the command; its end closes the command's stdin.
async fn forward_stdin(tx: mpsc::Sender<ExecRequest>) {
    let mut chunks = raw::stdin_chunks();
    while let Some(chunk) = chunks.recv().await {
        let request = exec_request::Request::Stdin(chunk);
        if tx
            .send(ExecRequest {
                request: Some(request),
            })
            .await
            .is_err()
        {
            return;
        }
    }
    let close = exec_request::Request::CloseStdin(true);
    let _ = tx
        .send(ExecRequest {
            request: Some(close),
        })
        .await;
}
