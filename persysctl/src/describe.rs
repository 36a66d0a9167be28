//! `persysctl describe ID`: everything about one workload, laid out like
//! `kubectl describe`.

use std::time::Duration;

use persys_api::v1::{
    DescribeWorkloadResponse, ObjectMeta, ObjectStatus, Probe, WorkloadType, workload_spec,
};
use serde_json::Value;

use crate::cli::DescribeArgs;
use crate::connection::Agent;
use crate::error::CliError;
use crate::get::actual_word;
use crate::output::{
    self, Cell, Palette, Table, age, event_type_name, human_duration, print, state_style,
    timestamp_and_age, until,
};
use crate::terminal;

pub async fn run(agent: &Agent, args: DescribeArgs, palette: Palette) -> Result<(), CliError> {
    let described = agent
        .describe(&args.id)
        .await?
        .ok_or_else(|| CliError::not_found(&args.id))?;
    print(&render(&described, palette, output::now_ms()))
}

/// Label column width: labels and values line up under each other.
const LABEL_WIDTH: usize = 19;

/// Builds the text, section by section. Every value and block is text from
/// the agent, printed with its control characters escaped (see
/// [`terminal`]).
struct Page {
    text: String,
    palette: Palette,
}

impl Page {
    /// "Label:   value" at `indent` spaces.
    fn field(&mut self, indent: usize, label: &str, value: impl AsRef<str>) {
        let value = terminal::text(value.as_ref()).into_owned();
        self.painted_field(indent, label, &value);
    }

    /// A field whose value persysctl wrote itself (colour codes included).
    fn painted_field(&mut self, indent: usize, label: &str, value: &str) {
        let label = format!("{}{label}:", " ".repeat(indent));
        let pad = LABEL_WIDTH.saturating_sub(label.chars().count()).max(1);
        let label = if indent == 0 {
            self.palette.bold(&label)
        } else {
            label
        };
        self.text
            .push_str(&format!("{label}{}{value}\n", " ".repeat(pad)));
    }

    /// A section title on its own line.
    fn section(&mut self, title: &str) {
        self.text
            .push_str(&format!("{}\n", self.palette.bold(&format!("{title}:"))));
    }

    /// Text from the agent, indented under the last section.
    fn text_block(&mut self, text: &str) {
        self.block(&terminal::text(text));
    }

    /// Lines persysctl laid out itself (a table, whose cells escape their
    /// text), indented under the last section.
    fn block(&mut self, text: &str) {
        for line in text.lines() {
            self.text.push_str(&format!("  {line}\n"));
        }
    }
}

pub fn render(described: &DescribeWorkloadResponse, palette: Palette, now: i64) -> String {
    let workload = described.workload.clone().unwrap_or_default();
    let meta = workload.metadata.clone().unwrap_or_default();
    let status = workload.status.clone().unwrap_or_default();
    let wire = described
        .status
        .clone()
        .unwrap_or_else(|| workload.to_wire_status());
    let mut page = Page {
        text: String::new(),
        palette,
    };

    metadata(&mut page, &meta, &status, now);
    page.field(0, "Desired State", workload.desired_state().short_name());

    page.section("Spec");
    page.text_block(&spec_yaml(workload.workload_spec()));

    page.section("Status");
    let actual = actual_word(&wire);
    let since = if status.last_transition_ms > 0 {
        format!(
            " since {}",
            timestamp_and_age(status.last_transition_ms, now)
        )
    } else {
        String::new()
    };
    page.painted_field(
        2,
        "Actual State",
        &format!("{}{since}", palette.paint(state_style(actual), actual)),
    );
    page.field(2, "Restarts", status.restart_count.to_string());
    if !status.message.is_empty() {
        page.field(2, "Message", &status.message);
    }
    if !status.last_error.is_empty() {
        page.field(2, "Last Error", &status.last_error);
    }
    if !status.failure_reason.is_empty() {
        let terminal = if status.retry_terminal {
            " (terminal: retrying cannot help until the spec changes)"
        } else {
            ""
        };
        page.field(
            2,
            "Failure Reason",
            format!("{}{terminal}", status.failure_reason),
        );
    }
    if status.next_retry_at_ms > 0 {
        page.field(2, "Next Retry", until(status.next_retry_at_ms, now));
    }

    page.section("Conditions");
    page.block(&conditions(&status, palette, now));

    if let Some(text) = probes(workload.workload_spec(), &status) {
        page.section("Probes");
        page.text_block(&text);
    }

    page.section("Runtime");
    page.text_block(&runtime(meta.r#type(), &status, &wire.usage));

    page.section("Events");
    page.block(&events(described, palette, now));
    page.text.trim_end().to_string()
}

fn metadata(page: &mut Page, meta: &ObjectMeta, status: &ObjectStatus, now: i64) {
    page.field(0, "ID", &meta.id);
    page.field(0, "Type", meta.r#type().short_name());
    page.field(0, "UID", &meta.uid);
    page.field(0, "Revision", &meta.revision_id);
    page.field(
        0,
        "Generation",
        format!(
            "{} (observed {})",
            meta.generation, status.observed_generation
        ),
    );
    page.field(0, "Resource Version", meta.resource_version.to_string());
    page.field(0, "Created", timestamp_and_age(meta.created_at_ms, now));
    page.field(0, "Updated", timestamp_and_age(meta.updated_at_ms, now));
    if meta.deletion_timestamp_ms > 0 {
        page.field(
            0,
            "Deletion Requested",
            timestamp_and_age(meta.deletion_timestamp_ms, now),
        );
    }
    page.field(0, "Finalizers", list_or_none(&meta.finalizers));
    let labels: Vec<String> = meta
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    page.field(0, "Labels", list_or_none(&labels));
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "<none>".into()
    } else {
        items.join(", ")
    }
}

/// The spec as YAML without its empty fields; a compose file is shown as
/// text rather than base64.
fn spec_yaml(spec: Option<&workload_spec::Spec>) -> String {
    let Some(spec) = spec else {
        return "<none>".into();
    };
    let mut value = match spec {
        workload_spec::Spec::Container(c) => serde_json::to_value(c),
        workload_spec::Spec::Compose(c) => serde_json::to_value(c),
        workload_spec::Spec::Vm(v) => serde_json::to_value(v),
    }
    .unwrap_or(Value::Null);
    if let workload_spec::Spec::Compose(compose) = spec
        && let Ok(text) = persys_api::compose_file_text(&compose.compose_yaml)
    {
        value["compose_yaml"] = Value::String(text);
    }
    match output::prune(value) {
        Some(value) => output::to_yaml(&value),
        None => "<empty>".into(),
    }
}

fn conditions(status: &ObjectStatus, palette: Palette, now: i64) -> String {
    if status.conditions.is_empty() {
        return "<none>".into();
    }
    let rows: Vec<Vec<Cell>> = status
        .conditions
        .iter()
        .map(|c| {
            vec![
                Cell::plain(&c.r#type),
                Cell::styled(&c.status, state_style(&c.status)),
                Cell::plain(&c.reason),
                Cell::plain(age(c.last_transition_ms, now)),
                Cell::plain(output::one_line(&c.message)),
            ]
        })
        .collect();
    Table::new(vec!["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]).render(&rows, palette)
}

/// The probes the spec defines, as kubectl shows them, each with what it
/// last said (`passing`, `failing`, `pending`); the image's HEALTHCHECK
/// when it decides readiness. None when there is neither.
fn probes(spec: Option<&workload_spec::Spec>, status: &ObjectStatus) -> Option<String> {
    let result = |kind: &str, prefix: &str| {
        let key = if prefix.is_empty() {
            format!("probe.{kind}")
        } else {
            format!("{prefix}.probe.{kind}")
        };
        status
            .facts
            .get(&key)
            .map(|r| format!("  (last result: {r})"))
            .unwrap_or_default()
    };
    let mut lines = Vec::new();
    let mut pair = |label: &str, prefix: &str, live: Option<&Probe>, ready: Option<&Probe>| {
        for (kind, name, probe) in [
            ("liveness", "Liveness", live),
            ("readiness", "Readiness", ready),
        ] {
            if let Some(probe) = probe {
                lines.push(format!(
                    "{label}{name}: {}{}",
                    probe_line(probe),
                    result(kind, prefix)
                ));
            }
        }
    };
    match spec {
        Some(workload_spec::Spec::Container(c)) => pair(
            "",
            "",
            c.liveness_probe.as_ref(),
            c.readiness_probe.as_ref(),
        ),
        Some(workload_spec::Spec::Compose(c)) => {
            let mut services: Vec<_> = c.probes.iter().collect();
            services.sort_by(|a, b| a.0.cmp(b.0));
            for (service, probes) in services {
                pair(
                    &format!("{service}: "),
                    &format!("service.{service}"),
                    probes.liveness_probe.as_ref(),
                    probes.readiness_probe.as_ref(),
                );
            }
        }
        _ => {}
    }
    if let Some(health) = status.facts.get("probe.healthcheck") {
        lines.push(format!("HEALTHCHECK (image): {health}"));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// `http-get http://:8080/healthz delay=0s timeout=1s period=10s
/// #success=1 #failure=3`, with kubelet's defaults for what is unset.
fn probe_line(probe: &Probe) -> String {
    let action = if let Some(exec) = &probe.exec {
        format!("exec {:?}", exec.command)
    } else if let Some(http) = &probe.http_get {
        let scheme = if http.scheme.eq_ignore_ascii_case("https") {
            "https"
        } else {
            "http"
        };
        let path = if http.path.is_empty() {
            "/"
        } else {
            &http.path
        };
        format!("http-get {scheme}://:{}{path}", http.port)
    } else if let Some(tcp) = &probe.tcp_socket {
        format!("tcp-socket :{}", tcp.port)
    } else if let Some(grpc) = &probe.grpc {
        format!("grpc :{} {:?}", grpc.port, grpc.service)
    } else {
        "<no handler>".into()
    };
    let or = |value: i32, default: i32| if value == 0 { default } else { value };
    format!(
        "{action} delay={}s timeout={}s period={}s #success={} #failure={}",
        probe.initial_delay_seconds,
        or(probe.timeout_seconds, 1),
        or(probe.period_seconds, 10),
        or(probe.success_threshold, 1),
        or(probe.failure_threshold, 3)
    )
}

/// What the runtime object is called, and what the controller learnt of it.
fn runtime(
    kind: WorkloadType,
    status: &ObjectStatus,
    usage: &Option<persys_api::v1::WorkloadUsageSnapshot>,
) -> String {
    let mut lines = Vec::new();
    let label = match kind {
        WorkloadType::Container => "Container ID",
        WorkloadType::Compose => "Compose Project",
        WorkloadType::Vm => "Domain UUID",
        WorkloadType::Unspecified => "Runtime Ref",
    };
    let reference = if status.runtime_ref.is_empty() {
        "<none>"
    } else {
        &status.runtime_ref
    };
    lines.push(format!("{label}: {reference}"));
    for (key, value) in &status.facts {
        lines.push(format!("{key}: {value}"));
    }
    if let Some(usage) = usage
        && usage.collected_at > 0
    {
        lines.push(format!(
            "Usage: cpu {:.1}%, memory {}, net rx/tx {}/{}",
            usage.cpu_percent,
            bytes(usage.memory_bytes),
            bytes(usage.net_rx_bytes),
            bytes(usage.net_tx_bytes)
        ));
    }
    lines.join("\n")
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n.max(0) as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// Newest last, as kubectl lists them; a folded event reads
/// "10s (3x over 2m)".
fn events(described: &DescribeWorkloadResponse, palette: Palette, now: i64) -> String {
    if described.events.is_empty() {
        return "<none>".into();
    }
    let mut events = described.events.clone();
    events.sort_by_key(|e| e.last_seen_ms);
    let rows: Vec<Vec<Cell>> = events
        .iter()
        .map(|e| {
            let kind = event_type_name(e.r#type);
            let mut when = age(e.last_seen_ms, now);
            if e.count > 1 {
                let over = Duration::from_millis(
                    e.last_seen_ms.saturating_sub(e.first_seen_ms).max(0) as u64,
                );
                when.push_str(&format!(" ({}x over {})", e.count, human_duration(over)));
            }
            vec![
                Cell::styled(kind, state_style(kind)),
                Cell::plain(&e.reason),
                Cell::plain(when),
                Cell::plain(output::one_line(&e.message)),
            ]
        })
        .collect();
    Table::new(vec!["TYPE", "REASON", "AGE", "MESSAGE"]).render(&rows, palette)
}

/// A workload whose every string says something hostile to a terminal:
/// what a spec author or a runtime could make the agent report.
#[cfg(test)]
pub(crate) fn hostile_workload() -> persys_api::v1::Workload {
    use persys_api::v1::{
        Condition, ContainerSpec, ObjectSpec, Workload, WorkloadSpec, workload_spec,
    };
    let bad = |what: &str| {
        format!(
            "{what}\u{1b}[2J\u{1b}]52;c;ZXZpbA==\u{7}\rok\u{9b}31m\u{7f}\u{8}\u{1b}]0;t\u{1b}\\"
        )
    };
    Workload {
        metadata: Some(ObjectMeta {
            id: bad("id"),
            uid: bad("uid"),
            r#type: WorkloadType::Container as i32,
            revision_id: bad("rev"),
            finalizers: vec![bad("finalizer")],
            labels: [(bad("key"), bad("value"))].into(),
            created_at_ms: 1,
            ..Default::default()
        }),
        spec: Some(ObjectSpec {
            desired_state: 1,
            workload: Some(WorkloadSpec {
                spec: Some(workload_spec::Spec::Container(ContainerSpec {
                    image: bad("image"),
                    command: vec![bad("command")],
                    env: [(bad("ENV"), bad("env"))].into(),
                    labels: [(bad("label"), bad("label"))].into(),
                    ..Default::default()
                })),
            }),
        }),
        status: Some(ObjectStatus {
            actual_state: 4,
            conditions: vec![Condition {
                r#type: bad("Ready"),
                status: bad("False"),
                reason: bad("reason"),
                message: bad("condition\nmessage"),
                last_transition_ms: 1,
            }],
            runtime_ref: bad("ref"),
            message: bad("message"),
            last_error: bad("multi\nline\terror"),
            failure_reason: bad("INVALID_IMAGE"),
            facts: [(bad("fact"), bad("fact"))].into(),
            next_retry_at_ms: 2,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{Event, EventType, Workload};

    #[test]
    fn describe_escapes_every_control_character_from_the_agent() {
        let described = DescribeWorkloadResponse {
            workload: Some(hostile_workload()),
            status: None,
            events: vec![Event {
                workload_id: "web".into(),
                r#type: EventType::Warning as i32,
                reason: "\u{1b}[2JBackOff".into(),
                message: "restarting\r\u{9b}2K\u{7}".into(),
                count: 1,
                first_seen_ms: 1,
                last_seen_ms: 1,
            }],
        };
        let text = render(&described, Palette::plain(), 10_000);
        let raw: Vec<char> = text
            .chars()
            .filter(|c| c.is_control() && *c != '\n' && *c != '\t')
            .collect();
        assert!(raw.is_empty(), "{raw:?} in\n{text}");
        for shown in ["\\u{1b}[2J", "\\u{1b}]52;c;", "\\u{7}", "\\r", "\\u{9b}31m"] {
            assert!(text.contains(shown), "{shown} missing from\n{text}");
        }
        assert!(text.contains("\\u{1b}[2JBackOff"), "{text}");
        // In colour, the only escape sequences are persysctl's own SGR.
        let coloured = render(&described, Palette::detect_for_tests(true), 10_000);
        let stripped = strip_sgr(&coloured);
        assert!(
            !stripped
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{stripped:?}"
        );
    }

    /// `text` without its SGR sequences (ESC [ digits and ; m).
    fn strip_sgr(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('\u{1b}') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let end = after
                .strip_prefix('[')
                .and_then(|a| a.find('m').map(|m| (a, m)))
                .filter(|(a, m)| a[..*m].chars().all(|c| c.is_ascii_digit() || c == ';'));
            match end {
                Some((a, m)) => rest = &a[m + 1..],
                None => {
                    out.push('\u{1b}');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn folded_events_say_how_often_and_over_how_long() {
        let now = 1_000_000_000;
        let described = DescribeWorkloadResponse {
            workload: Some(Workload::default()),
            status: None,
            events: vec![Event {
                workload_id: "web".into(),
                r#type: EventType::Warning as i32,
                reason: "BackOff".into(),
                message: "restarting".into(),
                count: 3,
                first_seen_ms: now - 130_000,
                last_seen_ms: now - 10_000,
            }],
        };
        let text = render(&described, Palette::detect(), now);
        let line = text
            .lines()
            .find(|l| l.contains("BackOff"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("10s (3x over 2m)"), "{line}");
        assert!(line.contains("Warning"), "{line}");
    }

    #[test]
    fn probes_are_shown_with_their_defaults_and_last_results() {
        use persys_api::v1::{ContainerSpec, ExecAction, HttpGetAction, ObjectSpec, WorkloadSpec};
        let spec = ContainerSpec {
            image: "nginx".into(),
            readiness_probe: Some(Probe {
                http_get: Some(HttpGetAction {
                    path: "/healthz".into(),
                    port: 8080,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            liveness_probe: Some(Probe {
                exec: Some(ExecAction {
                    command: vec!["true".into()],
                }),
                period_seconds: 5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let workload = Workload {
            spec: Some(ObjectSpec {
                workload: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Container(spec)),
                }),
                ..Default::default()
            }),
            status: Some(ObjectStatus {
                facts: [
                    ("probe.readiness".to_string(), "failing".to_string()),
                    ("probe.liveness".to_string(), "passing".to_string()),
                ]
                .into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let described = DescribeWorkloadResponse {
            workload: Some(workload),
            status: None,
            events: vec![],
        };
        let text = render(&described, Palette::plain(), 0);
        assert!(text.contains("Probes:"), "{text}");
        assert!(
            text.contains("Readiness: http-get http://:8080/healthz delay=0s timeout=1s period=10s #success=1 #failure=3  (last result: failing)"),
            "{text}"
        );
        assert!(
            text.contains("Liveness: exec [\"true\"] delay=0s timeout=1s period=5s"),
            "{text}"
        );
    }
}
