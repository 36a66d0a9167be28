//! persysctl: the command line of persys-agent.
//!
//! - `cli`: flags, environment variables and subcommands.
//! - `connection`: the mTLS (or plaintext) channel to the agent, request
//!   timeouts, and transport failures in plain words.
//! - `manifest`: what `apply -f` reads, with file:line:column errors and
//!   unknown keys refused.
//! - `watcher`: the Watch stream followed through expired versions.
//! - `output`: tables, ages, colour, and the JSON/YAML form of objects.
//! - `terminal`: control characters in what the agent sends, escaped.
//! - One file per command: `apply`, `get`, `describe`, `delete`, `watch`,
//!   `logs`, `exec`, `console`, `health` (with `version`).
//!
//! - `raw`: the local terminal in raw mode for `exec -t` and `console`.
//!
//! Exit status: 0 on success, 1 on any failure (one line on standard error,
//! prefixed "persysctl: "), 2 on a usage error; `exec` ends with the remote
//! command's status.

mod apply;
mod cli;
mod connection;
mod console;
mod delete;
mod describe;
mod error;
mod exec;
mod get;
mod health;
mod logs;
mod manifest;
mod output;
mod raw;
mod terminal;
mod watch;
mod watcher;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command, DEFAULT_WAIT_TIMEOUT};
use crate::connection::Agent;
use crate::error::CliError;
use crate::output::Palette;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("persysctl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) | Err(CliError::BrokenPipe) => ExitCode::SUCCESS,
        // The remote command has said what it had to on its own streams.
        Err(error @ CliError::RemoteExit(_)) => ExitCode::from(error::exit_status(&error)),
        Err(error) => {
            let text = error.to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("persysctl: {}", terminal::line(&line.join("; ")));
            ExitCode::from(error::exit_status(&error))
        }
    }
}

/// Ctrl-C, listened for from now on: commands that run until interrupted
/// create it before they print anything, so that an early Ctrl-C is not
/// the default (killing) action.
pub fn interrupt() -> Result<tokio::signal::unix::Signal, CliError> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Config(format!("cannot listen for Ctrl-C: {e}")))
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let palette = Palette::detect();
    let connection = &cli.connection;
    match cli.command {
        Command::Completion(args) => {
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "persysctl", &mut script);
            output::print(String::from_utf8_lossy(&script).trim_end())
        }
        Command::Version(args) => health::version(connection, args).await,
        Command::Apply(args) => apply::run(connection, args).await,
        Command::Get(args) => get::run(&Agent::connect(connection).await?, args, palette).await,
        Command::Describe(args) => {
            describe::run(&Agent::connect(connection).await?, args, palette).await
        }
        Command::Delete(args) => {
            let wait_for = connection.timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT);
            delete::run(&Agent::connect(connection).await?, args, wait_for).await
        }
        Command::Watch(args) => watch::run(&Agent::connect(connection).await?, args, palette).await,
        Command::Logs(args) => logs::run(&Agent::connect(connection).await?, args).await,
        Command::Exec(args) => exec::run(&Agent::connect(connection).await?, args).await,
        Command::Console(args) => console::run(&Agent::connect(connection).await?, args).await,
        Command::Health(args) => {
            health::health(&Agent::connect(connection).await?, args, palette).await
        }
    }
}
