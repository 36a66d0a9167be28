//! How results are printed: aligned tables, ages, timestamps, colour, and
//! the JSON and YAML form of objects.

use std::io::{IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use anstyle::{AnsiColor, Style};
use persys_api::v1::{ActualState, DesiredState, EventType, Workload, WorkloadType};
use serde_json::Value;

use crate::error::CliError;
use crate::terminal;

/// Writes `text` and a newline to standard output. A reader that went away
/// ends the command quietly (see [`CliError::BrokenPipe`]).
pub fn print(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Colours for a terminal: none when standard output is not one, or when
/// NO_COLOR is set to anything but the empty string.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    enabled: bool,
}

impl Palette {
    pub fn detect() -> Palette {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Palette {
            enabled: std::io::stdout().is_terminal() && !no_color,
        }
    }

    pub fn paint(&self, style: Style, text: &str) -> String {
        if self.enabled && style != Style::new() {
            format!("{style}{text}{style:#}")
        } else {
            text.to_string()
        }
    }

    /// No colour (for tests of the text itself).
    #[cfg(test)]
    pub fn plain() -> Palette {
        Palette { enabled: false }
    }

    /// Colour on or off whatever the terminal (for tests).
    #[cfg(test)]
    pub fn detect_for_tests(enabled: bool) -> Palette {
        Palette { enabled }
    }

    pub fn bold(&self, text: &str) -> String {
        self.paint(Style::new().bold(), text)
    }
}

fn colour(colour: AnsiColor) -> Style {
    Style::new().fg_color(Some(colour.into()))
}

/// The colour of a state word: green when all is well, yellow while
/// something is under way, red when it failed.
pub fn state_style(state: &str) -> Style {
    match state {
        "Running" | "True" | "healthy" | "Normal" => colour(AnsiColor::Green),
        "Pending" | "Terminating" | "Unknown" | "Unspecified" => colour(AnsiColor::Yellow),
        "Failed" | "False" | "Warning" => colour(AnsiColor::Red),
        _ => Style::new(),
    }
}

/// One cell of a table: its text, on one line with every control
/// character escaped (see [`terminal`]), and how to paint it.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub fn plain(text: impl AsRef<str>) -> Cell {
        Cell::styled(text, Style::new())
    }

    pub fn styled(text: impl AsRef<str>, style: Style) -> Cell {
        Cell {
            text: terminal::line(text.as_ref()).into_owned(),
            style,
        }
    }
}

/// A kubectl-style table: no borders, columns three spaces apart, the last
/// column unpadded. Widths only grow, so rows printed one at a time (`get
/// -w`) stay aligned with the rows before them as far as they can.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    widths: Vec<usize>,
}

const GAP: &str = "   ";

impl Table {
    pub fn new(header: Vec<&'static str>) -> Table {
        let widths = header.iter().map(|h| h.chars().count()).collect();
        Table { header, widths }
    }

    /// A table whose columns start at least this wide.
    pub fn with_min_widths(header: Vec<&'static str>, widths: &[usize]) -> Table {
        let mut table = Table::new(header);
        for (width, min) in table.widths.iter_mut().zip(widths) {
            *width = (*width).max(*min);
        }
        table
    }

    fn fit(&mut self, row: &[Cell]) {
        for (width, cell) in self.widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.chars().count());
        }
    }

    fn line(&self, row: &[Cell], palette: Palette) -> String {
        let mut line = String::new();
        let last = row.len().saturating_sub(1);
        for (index, cell) in row.iter().enumerate() {
            let padding = if index == last {
                0
            } else {
                self.widths[index].saturating_sub(cell.text.chars().count())
            };
            line.push_str(&palette.paint(cell.style, &cell.text));
            if index != last {
                line.push_str(&" ".repeat(padding));
                line.push_str(GAP);
            }
        }
        line.trim_end().to_string()
    }

    /// The header and `rows`, aligned.
    pub fn render(&mut self, rows: &[Vec<Cell>], palette: Palette) -> String {
        for row in rows {
            self.fit(row);
        }
        let header: Vec<Cell> = self.header.iter().map(|h| Cell::plain(*h)).collect();
        let mut lines = vec![self.line(&header, palette)];
        lines.extend(rows.iter().map(|row| self.line(row, palette)));
        lines.join("\n")
    }

    /// One more row, aligned with what was printed before.
    pub fn render_row(&mut self, row: &[Cell], palette: Palette) -> String {
        self.fit(row);
        self.line(row, palette)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    persys_api::now_ms()
}

/// How long ago, as kubectl prints an age: "45s", "5m30s", "3h", "12d".
pub fn age(since_ms: i64, now_ms: i64) -> String {
    if since_ms <= 0 {
        return "<unknown>".into();
    }
    human_duration(Duration::from_millis(
        now_ms.saturating_sub(since_ms).max(0) as u64,
    ))
}

/// A duration the way kubectl's `HumanDuration` writes it: precise when
/// short, coarser as it grows.
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let minutes = seconds / 60;
    let hours = seconds / 3600;
    let days = hours / 24;
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        }
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else if days < 365 * 8 {
        match days % 365 {
            0 => format!("{}y", days / 365),
            d => format!("{}y{d}d", days / 365),
        }
    } else {
        format!("{}y", days / 365)
    }
}

/// RFC 3339 in UTC, to the second.
pub fn timestamp(ms: i64) -> String {
    if ms <= 0 {
        return "<unknown>".into();
    }
    let at = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// "2025-01-01T10:00:00Z (5m ago)"
pub fn timestamp_and_age(ms: i64, now_ms: i64) -> String {
    if ms <= 0 {
        return "<unknown>".into();
    }
    format!("{} ({} ago)", timestamp(ms), age(ms, now_ms))
}

/// "in 10s", or "now" when it is due.
pub fn until(ms: i64, now_ms: i64) -> String {
    if ms <= now_ms {
        "now".into()
    } else {
        format!(
            "in {}",
            human_duration(Duration::from_millis((ms - now_ms) as u64))
        )
    }
}

pub fn seconds_to_ms(seconds: i64) -> i64 {
    seconds.saturating_mul(1000)
}

/// The object as JSON for people and scripts: enums by name
/// (`"container"`, `"running"`, `"Pending"`), and the spec under the name
/// of its type (`spec.workload.container`), as the protobuf JSON mapping
/// writes a oneof.
pub fn workload_value(workload: &Workload) -> Value {
    let mut value = serde_json::to_value(workload).unwrap_or(Value::Null);
    let rename = |value: &mut Value, path: &[&str], name: &dyn Fn(i32) -> &'static str| {
        let mut at = &mut *value;
        for key in path {
            match at.get_mut(*key) {
                Some(next) => at = next,
                None => return,
            }
        }
        if let Some(number) = at.as_i64() {
            *at = Value::String(name(number as i32).to_string());
        }
    };
    rename(&mut value, &["metadata", "type"], &|n| {
        WorkloadType::try_from(n)
            .unwrap_or(WorkloadType::Unspecified)
            .short_name()
    });
    rename(&mut value, &["spec", "desired_state"], &|n| {
        DesiredState::try_from(n)
            .unwrap_or(DesiredState::Unspecified)
            .short_name()
    });
    rename(&mut value, &["status", "actual_state"], &|n| {
        ActualState::try_from(n)
            .unwrap_or(ActualState::Unspecified)
            .short_name()
    });
    if let Some(workload) = value.get_mut("spec").and_then(|s| s.get_mut("workload"))
        && let Some(inner) = workload.get_mut("spec").map(Value::take)
    {
        *workload = inner;
    }
    value
}

pub fn event_type_name(kind: i32) -> &'static str {
    match EventType::try_from(kind) {
        Ok(EventType::Normal) => "Normal",
        Ok(EventType::Warning) => "Warning",
        _ => "Unspecified",
    }
}

/// Drops what says nothing: nulls, empty strings, lists and maps, zeros and
/// false. What `describe` shows of a spec.
pub fn prune(value: Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Bool(false) => None,
        Value::Number(n) if n.as_f64() == Some(0.0) => None,
        Value::String(s) if s.is_empty() => None,
        Value::Array(items) => {
            let items: Vec<Value> = items.into_iter().filter_map(prune).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        Value::Object(map) => {
            let map: serde_json::Map<String, Value> = map
                .into_iter()
                .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                .collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        other => Some(other),
    }
}

/// Pretty JSON, with the control characters serde_json leaves raw escaped
/// (the same value).
pub fn to_json(value: &Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    terminal::json(&text).into_owned()
}

pub fn to_yaml(value: &Value) -> String {
    serde_yaml_ng::to_string(value).unwrap_or_default()
}

/// One line of a possibly multi-line message, for a table cell.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// At most `max` characters, with an ellipsis when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (330, "5m30s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600 + 20 * 60, "3h20m"),
            (8 * 3600, "8h"),
            (47 * 3600, "47h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (seconds, expected) in cases {
            assert_eq!(
                human_duration(Duration::from_secs(seconds)),
                expected,
                "{seconds}s"
            );
        }
    }

    #[test]
    fn ages_of_unknown_times_say_so() {
        assert_eq!(age(0, 1_000), "<unknown>");
        assert_eq!(age(1_000, 61_000), "60s");
        assert_eq!(age(5_000, 1_000), "0s", "a clock behind the agent's");
    }

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let mut table = Table::new(vec!["ID", "STATE", "MESSAGE"]);
        let rows = vec![
            vec![Cell::plain("web"), Cell::plain("Running"), Cell::plain("")],
            vec![
                Cell::plain("database"),
                Cell::plain("Failed"),
                Cell::plain("boom"),
            ],
        ];
        let text = table.render(&rows, Palette { enabled: false });
        assert_eq!(
            text,
            "ID         STATE     MESSAGE\n\
             web        Running\n\
             database   Failed    boom"
        );
        let next = table.render_row(
            &[Cell::plain("db"), Cell::plain("Pending"), Cell::plain("x")],
            Palette { enabled: false },
        );
        assert_eq!(next, "db         Pending   x");
    }

    #[test]
    fn colour_codes_do_not_count_towards_widths() {
        let mut table = Table::new(vec!["A", "B"]);
        let rows = vec![vec![
            Cell::styled("Running", state_style("Running")),
            Cell::plain("x"),
        ]];
        let text = table.render(&rows, Palette { enabled: true });
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("\u{1b}["), "{row:?}");
        assert!(row.ends_with("Running\u{1b}[0m   x"), "{row:?}");
    }

    #[test]
    fn workloads_show_enums_by_name_and_the_spec_by_type() {
        use persys_api::v1::{
            ContainerSpec, ObjectMeta, ObjectSpec, ObjectStatus, WorkloadSpec, workload_spec,
        };
        let workload = Workload {
            metadata: Some(ObjectMeta {
                id: "web".into(),
                r#type: WorkloadType::Container as i32,
                ..Default::default()
            }),
            spec: Some(ObjectSpec {
                desired_state: DesiredState::Stopped as i32,
                workload: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(ContainerSpec {
                        image: "nginx".into(),
                        ..Default::default()
                    })),
                }),
            }),
            status: Some(ObjectStatus {
                actual_state: ActualState::Failed as i32,
                ..Default::default()
            }),
        };
        let value = workload_value(&workload);
        assert_eq!(value["metadata"]["type"], "container");
        assert_eq!(value["spec"]["desired_state"], "stopped");
        assert_eq!(value["status"]["actual_state"], "Failed");
        assert_eq!(value["spec"]["workload"]["container"]["image"], "nginx");
    }

    #[test]
    fn pruning_keeps_only_what_says_something() {
        let value = serde_json::json!({
            "image": "nginx", "command": [], "env": {}, "resources": {"cpu_shares": 0},
            "ports": [{"host_port": 80, "protocol": ""}], "read_only": false,
        });
        assert_eq!(
            prune(value).unwrap(),
            serde_json::json!({"image": "nginx", "ports": [{"host_port": 80}]})
        );
    }
}
