//! `persysctl apply -f FILE`: create or update workloads from manifests.

use crate::cli::{ApplyArgs, ConnectionArgs};
use crate::connection::Agent;
use crate::error::CliError;
use crate::manifest;
use crate::output::print;
use crate::terminal;

/// Reads every file first (a broken file applies nothing, and is reported
/// without an agent), then applies each manifest in order; a refused one
/// does not stop the others.
pub async fn run(connection: &ConnectionArgs, args: ApplyArgs) -> Result<(), CliError> {
    let mut manifests = Vec::new();
    for file in &args.files {
        manifests.extend(manifest::read(file)?);
    }
    let agent = Agent::connect(connection).await?;
    let total = manifests.len();
    let mut failures = Vec::new();
    for manifest in manifests {
        let id = manifest.request.id.clone();
        match agent.apply(manifest.request).await {
            Ok(response) if response.skipped => {
                print(&format!("{} unchanged", terminal::line(&id)))?
            }
            Ok(_) => print(&format!("{} applied", terminal::line(&id)))?,
            Err(
                error
                @ (CliError::Connect { .. } | CliError::Tls { .. } | CliError::Timeout { .. }),
            ) => return Err(error),
            Err(error) => failures.push(CliError::Workload {
                id,
                source: Box::new(error),
            }),
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if total == 1 => Err(failures.remove(0)),
        _ => {
            for failure in &failures {
                eprintln!("persysctl: {}", terminal::line(&failure.to_string()));
            }
            Err(CliError::Partial {
                failed: failures.len(),
                total,
                what: "manifests not applied",
            })
        }
    }
}
