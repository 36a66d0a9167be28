//! `persysctl logs`.

use crate::cli::LogsArgs;
use crate::connection::Agent;
use crate::error::CliError;

pub async fn run(agent: &Agent, args: LogsArgs) -> Result<(), CliError> {
    let _ = (agent, args);
    Err(CliError::Config("not built yet".into()))
}
