//! `persysctl watch [ID]`: a line per change, until Ctrl-C.

use persys_api::v1::WorkloadType;

use crate::cli::WatchArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::get::actual_word;
use crate::output::{Cell, Palette, Table, one_line, print, state_style, timestamp};
use crate::watcher::{Change, Filter, Item, Watcher};

const HEADER: [&str; 8] = [
    "TIME", "EVENT", "ID", "TYPE", "DESIRED", "ACTUAL", "VERSION", "MESSAGE",
];

/// Widths the columns start with, so that the header printed before any
/// event lines up with the rows that follow.
const MIN_WIDTHS: [usize; 8] = [20, 8, 16, 9, 7, 11, 7, 0];

pub async fn run(agent: &Agent, args: WatchArgs, palette: Palette) -> Result<(), CliError> {
    let filter = Filter {
        id: args.id.clone(),
        kind: args.kind.map(WorkloadType::from),
    };
    let mut interrupt = crate::interrupt()?;
    let mut watcher = Watcher::new(agent.clone(), filter, args.since);
    let mut table = Table::with_min_widths(HEADER.to_vec(), &MIN_WIDTHS);
    print(&table.render(&[], palette))?;
    loop {
        let item = tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            item = watcher.next() => item?,
        };
        if let Item::Change(change) = item {
            print(&table.render_row(&row(&change), palette))?;
        }
    }
}

fn row(change: &Change) -> Vec<Cell> {
    let status = change.workload.to_wire_status();
    let actual = actual_word(&status);
    vec![
        Cell::plain(timestamp(change.at_ms)),
        Cell::plain(change.kind.name()),
        Cell::plain(&status.id),
        Cell::plain(status.r#type().short_name()),
        Cell::plain(status.desired_state().short_name()),
        Cell::styled(actual, state_style(actual)),
        Cell::plain(change.resource_version.to_string()),
        Cell::plain(one_line(&status.message)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::ChangeKind;

    #[test]
    fn a_change_prints_on_one_line_with_control_characters_escaped() {
        let change = Change {
            kind: ChangeKind::Modified,
            resource_version: 7,
            workload: crate::describe::hostile_workload(),
            at_ms: 1,
        };
        let mut table = Table::with_min_widths(HEADER.to_vec(), &MIN_WIDTHS);
        let line = table.render_row(&row(&change), Palette::plain());
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.contains("id\\u{1b}[2J\\u{1b}]52;c;ZXZpbA==\\u{7}\\rok\\u{9b}31m"),
            "{line}"
        );
    }
}
