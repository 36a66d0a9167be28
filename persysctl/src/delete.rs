//! `persysctl delete ID...`: request deletion; with `--wait`, follow the
//! Watch stream until each workload is gone.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::cli::DeleteArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::output::print;
use crate::terminal;
use crate::watcher::{ChangeKind, Filter, Item, Watcher};

pub async fn run(agent: &Agent, args: DeleteArgs, wait_for: Duration) -> Result<(), CliError> {
    // The stream opens before the deletes, so their DELETED events cannot be
    // missed, however fast they come.
    let mut watcher = if args.wait {
        let filter = Filter {
            id: match args.ids.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            },
            kind: None,
        };
        let mut watcher = Watcher::new(agent.clone(), filter, None);
        watcher.open().await?;
        Some(watcher)
    } else {
        None
    };
    let mut failures = Vec::new();
    let mut waiting = BTreeSet::new();
    for id in &args.ids {
        match delete_one(agent, id, args.ignore_not_found, args.wait).await {
            Ok(true) => {
                waiting.insert(id.clone());
            }
            Ok(false) => {}
            Err(error @ (CliError::Connect { .. } | CliError::Tls { .. })) => return Err(error),
            Err(error) => failures.push(error),
        }
    }
    if let Some(watcher) = &mut watcher
        && let Err(error) = wait(watcher, waiting, wait_for).await
    {
        failures.push(error);
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.remove(0)),
        _ => {
            let total = failures.len();
            for failure in &failures {
                eprintln!("persysctl: {}", terminal::line(&failure.to_string()));
            }
            Err(CliError::Partial {
                failed: total,
                total: args.ids.len(),
                what: "workloads not deleted",
            })
        }
    }
}

/// Deletes one workload; true when it is to be waited for.
async fn delete_one(
    agent: &Agent,
    id: &str,
    ignore_not_found: bool,
    wait: bool,
) -> Result<bool, CliError> {
    if agent.status(id).await?.is_none() {
        return if ignore_not_found {
            Ok(false)
        } else {
            Err(CliError::not_found(id))
        };
    }
    agent.delete(id).await.map_err(|error| CliError::Workload {
        id: id.to_string(),
        source: Box::new(error),
    })?;
    if wait {
        return Ok(true);
    }
    // Gone at once when nothing holds it; otherwise its controller removes
    // the runtime objects first.
    let word = match agent.status(id).await? {
        None => "deleted",
        Some(_) => "deleting",
    };
    print(&format!("{} {word}", terminal::line(id)))?;
    Ok(false)
}

/// Waits for a DELETED event of every id, printing each as it comes.
async fn wait(
    watcher: &mut Watcher,
    mut waiting: BTreeSet<String>,
    wait_for: Duration,
) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + wait_for;
    while !waiting.is_empty() {
        let item = match tokio::time::timeout_at(deadline, watcher.next()).await {
            Ok(item) => item?,
            Err(_) => return Err(timed_out(watcher, &waiting, wait_for)),
        };
        if let Item::Change(change) = item
            && change.kind == ChangeKind::Deleted
            && waiting.remove(change.workload.id())
        {
            print(&format!("{} deleted", terminal::line(change.workload.id())))?;
        }
    }
    Ok(())
}

/// Says what still holds each workload.
fn timed_out(watcher: &Watcher, waiting: &BTreeSet<String>, wait_for: Duration) -> CliError {
    let held: Vec<String> = waiting
        .iter()
        .map(
            |id| match watcher.last_seen(id).and_then(|w| w.metadata.as_ref()) {
                Some(meta) if !meta.finalizers.is_empty() => format!(
                    "{id} is still terminating, waiting for finalizers {}",
                    meta.finalizers.join(", ")
                ),
                _ => format!("{id} is still there"),
            },
        )
        .collect();
    CliError::WaitTimedOut(format!(
        "timed out after {} waiting for deletion: {}",
        humantime::format_duration(wait_for),
        held.join("; ")
    ))
}
