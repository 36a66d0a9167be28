//! `persysctl exec`.

use crate::cli::ExecArgs;
use crate::connection::Agent;
use crate::error::CliError;

pub async fn run(agent: &Agent, args: ExecArgs) -> Result<(), CliError> {
    let _ = (agent, args);
    Err(CliError::Config("not built yet".into()))
}
