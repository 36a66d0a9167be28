//! `persysctl console`.

use crate::cli::ConsoleArgs;
use crate::connection::Agent;
use crate::error::CliError;

pub async fn run(agent: &Agent, args: ConsoleArgs) -> Result<(), CliError> {
    let _ = (agent, args);
    Err(CliError::Config("not built yet".into()))
}
