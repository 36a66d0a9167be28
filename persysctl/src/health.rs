//! `persysctl health` and `persysctl version`.

use crate::cli::{ConnectionArgs, HealthArgs, OutputFormat, VersionArgs};
use crate::connection::Agent;
use crate::error::CliError;
use crate::output::{self, Cell, Palette, Table, print, state_style};
use crate::terminal;

/// Prints the agent's health; fails when the agent says it is unhealthy.
pub async fn health(agent: &Agent, args: HealthArgs, palette: Palette) -> Result<(), CliError> {
    let health = agent.health().await?;
    match args.output {
        OutputFormat::Json | OutputFormat::Yaml => {
            let value = serde_json::to_value(&health).unwrap_or_default();
            if args.output == OutputFormat::Json {
                print(&output::to_json(&value))?;
            } else {
                print(output::to_yaml(&value).trim_end())?;
            }
        }
        OutputFormat::Table | OutputFormat::Wide => {
            let verdict = if health.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            let mut lines = vec![
                format!("Agent:     {}", agent.server()),
                format!(
                    "Health:    {}",
                    palette.paint(state_style(verdict), verdict)
                ),
                format!("Version:   {}", terminal::line(&health.version)),
                format!("CPU:       {:.1}%", health.cpu_utilization),
                format!("Memory:    {:.1}%", health.memory_utilization),
                format!("Disk:      {:.1}%", health.disk_utilization),
            ];
            if health.runtime_status.is_empty() {
                lines.push("Runtimes:  <none>".into());
            } else {
                lines.push("Runtimes:".into());
                let rows: Vec<Vec<Cell>> = health
                    .runtime_status
                    .iter()
                    .map(|(name, status)| {
                        vec![Cell::plain(name), Cell::styled(status, state_style(status))]
                    })
                    .collect();
                let table = Table::new(vec!["RUNTIME", "STATUS"]).render(&rows, palette);
                lines.extend(table.lines().map(|l| format!("  {l}")));
            }
            print(&lines.join("\n"))?;
        }
    }
    if health.healthy {
        Ok(())
    } else {
        Err(CliError::Unhealthy {
            server: agent.server().to_string(),
        })
    }
}

/// The client version, then the agent's (from HealthCheck).
pub async fn version(connection: &ConnectionArgs, args: VersionArgs) -> Result<(), CliError> {
    print(&format!("Client Version: {}", env!("CARGO_PKG_VERSION")))?;
    if args.client {
        return Ok(());
    }
    let agent = Agent::connect(connection).await?;
    let health = agent.health().await?;
    print(&format!(
        "Server Version: {}",
        terminal::line(&health.version)
    ))
}
