//! `persysctl get [ID]`: a table of workloads, or the objects as JSON or
//! YAML; with `-w`, then every change.

use futures::{StreamExt, TryStreamExt};
use persys_api::v1::{ActualState, DesiredState, Workload, WorkloadStatus, WorkloadType};
use serde_json::Value;

use crate::cli::{GetArgs, OutputFormat};
use crate::connection::Agent;
use crate::error::CliError;
use crate::output::{
    self, Cell, Palette, Table, age, one_line, print, seconds_to_ms, state_style, truncate,
};
use crate::watcher::{Filter, Item, Watcher};

/// How many Describe calls run at once when fetching whole objects.
const CONCURRENT_DESCRIBES: usize = 8;

/// MESSAGE is cut to this many characters in the narrow table.
const MESSAGE_WIDTH: usize = 60;

pub async fn run(agent: &Agent, args: GetArgs, palette: Palette) -> Result<(), CliError> {
    if args.watch {
        return watch(agent, args, palette).await;
    }
    let kind = args.kind.map(WorkloadType::from);
    match args.output {
        OutputFormat::Table | OutputFormat::Wide => {
            let statuses = match &args.id {
                Some(id) => {
                    let status = agent
                        .status(id)
                        .await?
                        .ok_or_else(|| CliError::not_found(id))?;
                    check_kind(&status, kind)?;
                    vec![status]
                }
                None => {
                    agent
                        .list(kind.unwrap_or(WorkloadType::Unspecified))
                        .await?
                }
            };
            if statuses.is_empty() {
                eprintln!("No workloads found.");
                return Ok(());
            }
            let wide = args.output == OutputFormat::Wide;
            let now = output::now_ms();
            let rows: Vec<Vec<Cell>> = statuses.iter().map(|s| row(s, wide, now)).collect();
            print(&Table::new(header(wide)).render(&rows, palette))
        }
        OutputFormat::Json | OutputFormat::Yaml => {
            let value = match &args.id {
                Some(id) => {
                    let workload = agent
                        .describe(id)
                        .await?
                        .and_then(|d| d.workload)
                        .ok_or_else(|| CliError::not_found(id))?;
                    check_kind(&workload.to_wire_status(), kind)?;
                    output::workload_value(&workload)
                }
                None => {
                    let items: Vec<Value> = objects(agent, kind)
                        .await?
                        .iter()
                        .map(output::workload_value)
                        .collect();
                    serde_json::json!({ "items": items })
                }
            };
            print_value(&value, args.output, false)
        }
    }
}

/// Every workload as a whole object: the list names them, Describe returns
/// each (one deleted meanwhile is left out).
async fn objects(agent: &Agent, kind: Option<WorkloadType>) -> Result<Vec<Workload>, CliError> {
    let statuses = agent
        .list(kind.unwrap_or(WorkloadType::Unspecified))
        .await?;
    let described: Vec<Option<Workload>> = futures::stream::iter(statuses)
        .map(|status| async move {
            Ok::<_, CliError>(agent.describe(&status.id).await?.and_then(|d| d.workload))
        })
        .buffered(CONCURRENT_DESCRIBES)
        .try_collect()
        .await?;
    Ok(described.into_iter().flatten().collect())
}

/// `get ID -t TYPE` of a workload of another type.
fn check_kind(status: &WorkloadStatus, kind: Option<WorkloadType>) -> Result<(), CliError> {
    match kind {
        Some(kind) if status.r#type() != kind => Err(CliError::Agent {
            code: tonic::Code::NotFound,
            reason: format!(
                "workload {} not found among {} workloads (it is a {} workload)",
                status.id,
                kind.short_name(),
                status.r#type().short_name()
            ),
        }),
        _ => Ok(()),
    }
}

/// JSON pretty-printed, or YAML; `stream` separates YAML documents for a
/// sequence of objects.
fn print_value(value: &Value, format: OutputFormat, stream: bool) -> Result<(), CliError> {
    match format {
        OutputFormat::Yaml if stream => {
            print(&format!("---\n{}", output::to_yaml(value).trim_end()))
        }
        OutputFormat::Yaml => print(output::to_yaml(value).trim_end()),
        _ => print(&output::to_json(value)),
    }
}

pub fn header(wide: bool) -> Vec<&'static str> {
    let mut header = vec![
        "ID", "TYPE", "DESIRED", "ACTUAL", "READY", "RESTARTS", "AGE",
    ];
    if wide {
        header.extend([
            "REVISION",
            "GENERATION",
            "OBSERVED",
            "RUNTIME REF",
            "FAILURE",
        ]);
    }
    header.push("MESSAGE");
    header
}

/// The word for where a workload is: its actual state, or Terminating once
/// its deletion was requested.
pub fn actual_word(status: &WorkloadStatus) -> &'static str {
    if status.metadata.contains_key("deletion_timestamp") {
        "Terminating"
    } else {
        match status.actual_state() {
            ActualState::Unspecified => ActualState::Pending.short_name(),
            state => state.short_name(),
        }
    }
}

/// Whether the workload serves: the `ready` status key (a running
/// workload whose readiness probe or HEALTHCHECK fails is not), else its
/// Ready condition; `-` before either is known.
pub fn ready_word(status: &WorkloadStatus) -> &'static str {
    let ready = status
        .metadata
        .get("ready")
        .map(|r| r == "true")
        .or_else(|| status.metadata.get("condition.Ready").map(|r| r == "True"));
    match ready {
        Some(true) => "true",
        Some(false) => "false",
        None => "-",
    }
}

/// A container id is long; its first 12 characters name it, as in Docker.
fn short_ref(runtime_ref: &str) -> &str {
    if runtime_ref.len() == 64 && runtime_ref.chars().all(|c| c.is_ascii_hexdigit()) {
        &runtime_ref[..12]
    } else {
        runtime_ref
    }
}

pub fn row(status: &WorkloadStatus, wide: bool, now_ms: i64) -> Vec<Cell> {
    let meta = |key: &str| status.metadata.get(key).cloned().unwrap_or_default();
    let actual = actual_word(status);
    let desired = match status.desired_state() {
        DesiredState::Unspecified => DesiredState::Running,
        state => state,
    };
    let mut cells = vec![
        Cell::plain(&status.id),
        Cell::plain(status.r#type().short_name()),
        Cell::plain(desired.short_name()),
        Cell::styled(actual, state_style(actual)),
        Cell::plain(ready_word(status)),
        Cell::plain(match meta("restart_count") {
            count if count.is_empty() => "0".to_string(),
            count => count,
        }),
        Cell::plain(age(seconds_to_ms(status.created_at), now_ms)),
    ];
    if wide {
        let mut failure = meta("failure_reason");
        if meta("retry_terminal") == "true" {
            failure.push_str(" (terminal)");
        }
        cells.extend([
            Cell::plain(&status.revision_id),
            Cell::plain(meta("generation")),
            Cell::plain(meta("observed_generation")),
            Cell::plain(short_ref(&meta("runtime_ref"))),
            Cell::styled(failure, state_style("Failed")),
        ]);
    }
    let message = if status.message.is_empty() {
        one_line(&meta("last_error"))
    } else {
        one_line(&status.message)
    };
    cells.push(Cell::plain(if wide {
        message
    } else {
        truncate(&message, MESSAGE_WIDTH)
    }));
    cells
}

/// `get -w`: the current workloads, then a row (or object) per change,
/// until Ctrl-C.
async fn watch(agent: &Agent, args: GetArgs, palette: Palette) -> Result<(), CliError> {
    let filter = Filter {
        id: args.id.clone(),
        kind: args.kind.map(WorkloadType::from),
    };
    let mut interrupt = crate::interrupt()?;
    let mut watcher = Watcher::new(agent.clone(), filter, None);
    let wide = args.output == OutputFormat::Wide;
    let mut table = Table::new(header(wide));
    let mut listed: Option<Vec<Workload>> = Some(Vec::new());
    loop {
        let item = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            item = watcher.next() => item?,
        };
        match (item, &mut listed) {
            (Item::Change(change), Some(list)) => list.push(change.workload),
            (Item::Change(change), None) => {
                print_objects(&[change.workload], &args, &mut table, palette, false)?
            }
            (Item::Synced, Some(list)) => {
                if let Some(id) = &args.id
                    && list.is_empty()
                {
                    return Err(CliError::not_found(id));
                }
                print_objects(list, &args, &mut table, palette, true)?;
                listed = None;
            }
            (Item::Synced, None) => {}
        }
    }
}

fn print_objects(
    workloads: &[Workload],
    args: &GetArgs,
    table: &mut Table,
    palette: Palette,
    first: bool,
) -> Result<(), CliError> {
    let now = output::now_ms();
    match args.output {
        OutputFormat::Table | OutputFormat::Wide => {
            let wide = args.output == OutputFormat::Wide;
            let rows: Vec<Vec<Cell>> = workloads
                .iter()
                .map(|w| row(&w.to_wire_status(), wide, now))
                .collect();
            if first {
                print(&table.render(&rows, palette))
            } else {
                rows.iter()
                    .try_for_each(|r| print(&table.render_row(r, palette)))
            }
        }
        format => workloads
            .iter()
            .try_for_each(|w| print_value(&output::workload_value(w), format, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_controls(text: &str) -> Vec<char> {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n')
            .collect()
    }

    #[test]
    fn tables_json_and_yaml_show_no_raw_control_character_from_the_agent() {
        let workload = crate::describe::hostile_workload();
        let status = workload.to_wire_status();
        for wide in [false, true] {
            let text =
                Table::new(header(wide)).render(&[row(&status, wide, 10_000)], Palette::plain());
            assert_eq!(raw_controls(&text), [], "{text}");
            assert_eq!(text.lines().count(), 2, "one row on one line:\n{text}");
            assert!(text.contains("id\\u{1b}[2J"), "{text}");
        }
        // Scripts read the same value; the terminal sees escapes.
        let value = output::workload_value(&workload);
        let json = output::to_json(&value);
        assert_eq!(raw_controls(&json), [], "{json}");
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), value);
        let yaml = output::to_yaml(&value);
        assert_eq!(raw_controls(&yaml), [], "{yaml}");
        assert_eq!(serde_yaml_ng::from_str::<Value>(&yaml).unwrap(), value);
    }
}
