//! The local terminal in raw mode for `exec -t` and `console`: keys go to
//! the remote side as typed (Ctrl-C included, as a byte), and the saved
//! settings come back when the [`RawTerminal`] is dropped — on success,
//! on error, on SIGTERM or SIGHUP (the commands turn those into a return),
//! and on a panic (unwinding drops it too).

use std::io::IsTerminal;

use rustix::termios::{self, OptionalActions, Termios};

use crate::error::CliError;

/// Standard input switched to raw mode; restored on drop.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Raw mode on standard input, when it is a terminal (none otherwise:
    /// piped input stays as it is).
    pub fn enter() -> Result<Option<RawTerminal>, CliError> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin)
            .map_err(|e| CliError::Config(format!("reading the terminal's settings: {e}")))?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)
            .map_err(|e| CliError::Config(format!("putting the terminal in raw mode: {e}")))?;
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // Output already written is kept (Now, not Flush); nothing can be
        // done about a failure here but leave the terminal as it is.
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

/// The terminal's size (rows, columns), when standard input or output is
/// one.
pub fn size() -> Option<(u32, u32)> {
    let size = termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then(|| (u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// Reads standard input on a thread of its own (a blocking read cannot be
/// cancelled, and a runtime would wait for it at exit); chunks arrive
/// through a bounded channel, and the channel closes at end of file.
pub fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(read) => {
                        if tx.blocking_send(buffer[..read].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
    rx
}

/// The signals that end a session with the terminal restored.
pub struct Endings {
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Endings {
    pub fn listen() -> Result<Endings, CliError> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| {
            signal(kind).map_err(|e| CliError::Config(format!("cannot listen for signals: {e}")))
        };
        Ok(Endings {
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    /// Resolves when SIGTERM or SIGHUP arrives, with the signal's name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}
