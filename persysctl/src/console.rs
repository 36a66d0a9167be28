//! `persysctl console ID [--force]`: a VM's serial console. Standard input
//! goes raw when it is a terminal (restored on every way out); Ctrl-]
//! leaves. Without a terminal, input is forwarded until its end and the
//! output shown until Ctrl-C.

use std::io::Write;

use futures::StreamExt;
use futures::stream;
use persys_api::v1::{ConsoleRequest, ConsoleStart, console_request};
use tokio::sync::mpsc;

use crate::cli::ConsoleArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::raw::{self, Endings, RawTerminal};

/// The byte Ctrl-] sends: leaves the console, as in telnet and virsh.
const ESCAPE: u8 = 0x1d;

pub async fn run(agent: &Agent, args: ConsoleArgs) -> Result<(), CliError> {
    let mut endings = Endings::listen()?;
    let mut interrupt = crate::interrupt()?;
    let (tx, rx) = mpsc::channel(16);
    let start = ConsoleRequest {
        request: Some(console_request::Request::Start(ConsoleStart {
            id: args.id.clone(),
            force: args.force,
        })),
    };
    let requests = stream::once(async move { start }).chain(stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|request| (request, rx))
    }));
    let mut responses = agent.console(requests).await?;
    eprint!("Connected to {} (escape character is ^])\r\n", args.id);
    let raw = RawTerminal::enter()?;
    let mut chunks = raw::stdin_chunks();
    let mut typing = true;
    let mut stdout = std::io::stdout();
    let ended = loop {
        tokio::select! {
            message = responses.message() => match message {
                Ok(Some(message)) => {
                    stdout.write_all(&message.output)?;
                    stdout.flush()?;
                }
                Ok(None) => break Ok("the console closed"),
                Err(status) => break Err(agent.failure(&status).await),
            },
            chunk = chunks.recv(), if typing => match chunk {
                Some(chunk) => {
                    let (input, leave) = until_escape(&chunk);
                    if !input.is_empty() {
                        let request = console_request::Request::Input(input.to_vec());
                        let _ = tx.send(ConsoleRequest { request: Some(request) }).await;
                    }
                    if leave {
                        break Ok("left");
                    }
                }
                None => typing = false,
            },
            _ = interrupt.recv() => break Ok("interrupted"),
            signal = endings.next() => {
                break Err(CliError::SessionEnded(format!("{}: ended by {signal}", args.id)));
            }
        }
    };
    drop(raw);
    let how = ended?;
    eprintln!("\npersysctl: console of {}: {how}", args.id);
    Ok(())
}

/// The bytes before the escape byte, and whether it was typed.
fn until_escape(chunk: &[u8]) -> (&[u8], bool) {
    match chunk.iter().position(|b| *b == ESCAPE) {
        Some(at) => (&chunk[..at], true),
        None => (chunk, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_right_bracket_leaves_after_sending_what_came_before_it() {
        assert_eq!(until_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(until_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(until_escape(b"\x1d"), (&b""[..], true));
        // Ctrl-C is just a byte for the guest.
        assert_eq!(until_escape(b"\x03"), (&b"\x03"[..], false));
    }
}
