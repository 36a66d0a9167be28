//! A probe as the API gives it, checked ([`validate_probe`]) and read with
//! kubelet's defaults ([`ProbeSpec`]).

use std::time::Duration;

use persys_api::v1::Probe;

use crate::spec::SpecError;

/// kubelet's defaults, in seconds and counts.
const DEFAULT_PERIOD: i32 = 10;
const DEFAULT_TIMEOUT: i32 = 1;
const DEFAULT_SUCCESS: i32 = 1;
const DEFAULT_FAILURE: i32 = 3;

/// Longest delay, period or timeout accepted, in seconds (a day): a
/// longer one is a typo, and keeps the timer wheel's range sane.
const MAX_SECONDS: i32 = 86_400;

/// Most consecutive results a threshold may ask for.
const MAX_THRESHOLD: i32 = 1_000;

/// Most arguments and bytes of an exec probe's command.
const MAX_EXEC_ARGS: usize = 64;
const MAX_EXEC_BYTES: usize = 16 * 1024;

/// Most headers of an HTTP probe, and bytes of its path.
const MAX_HEADERS: usize = 32;
const MAX_PATH_BYTES: usize = 2048;

/// Which probe: what a failure beyond threshold does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// Restarts the container.
    Liveness,
    /// Sets the Ready condition.
    Readiness,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
        }
    }

    fn field(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "liveness_probe",
            ProbeKind::Readiness => "readiness_probe",
        }
    }
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Runs the command in the container; exit 0 passes.
    Exec(Vec<String>),
    /// GET `path` on the container's address; 200–399 passes.
    HttpGet {
        path: String,
        port: u16,
        https: bool,
        headers: Vec<(String, String)>,
    },
    /// Connects to the container's port.
    TcpSocket { port: u16 },
    /// grpc.health.v1.Health/Check for `service`; SERVING passes.
    Grpc { port: u16, service: String },
}

/// A validated probe with kubelet's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeSpec {
    /// The probe `probe` describes, or `None` when it is not one a
    /// validator would pass (the stored spec is validated before use, so
    /// this is only a guard).
    pub fn of(kind: ProbeKind, probe: &Probe) -> Option<ProbeSpec> {
        validate_probe("", kind == ProbeKind::Liveness, probe).ok()?;
        let or = |value: i32, default: i32| if value == 0 { default } else { value };
        let seconds = |value: i32| Duration::from_secs(u64::try_from(value).unwrap_or(0));
        let count = |value: i32| u32::try_from(value).unwrap_or(1);
        let port = |value: i32| u16::try_from(value).unwrap_or(0);
        let action = if let Some(exec) = &probe.exec {
            Action::Exec(exec.command.clone())
        } else if let Some(http) = &probe.http_get {
            Action::HttpGet {
                path: if http.path.is_empty() {
                    "/".to_string()
                } else {
                    http.path.clone()
                },
                port: port(http.port),
                https: http.scheme.eq_ignore_ascii_case("https"),
                headers: http
                    .http_headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            Action::TcpSocket {
                port: port(tcp.port),
            }
        } else {
            let grpc = probe.grpc.as_ref()?;
            Action::Grpc {
                port: port(grpc.port),
                service: grpc.service.clone(),
            }
        };
        Some(ProbeSpec {
            action,
            initial_delay: seconds(probe.initial_delay_seconds),
            period: seconds(or(probe.period_seconds, DEFAULT_PERIOD)),
            timeout: seconds(or(probe.timeout_seconds, DEFAULT_TIMEOUT)),
            success_threshold: count(or(probe.success_threshold, DEFAULT_SUCCESS)),
            failure_threshold: count(or(probe.failure_threshold, DEFAULT_FAILURE)),
        })
    }

    /// The probe as an operator reads it (`exec [test -f /tmp/ready]`,
    /// `http-get http://:8080/healthz`), with its timing.
    pub fn describe(&self) -> String {
        let action = match &self.action {
            Action::Exec(command) => format!("exec {command:?}"),
            Action::HttpGet {
                path, port, https, ..
            } => {
                let scheme = if *https { "https" } else { "http" };
                format!("http-get {scheme}://:{port}{path}")
            }
            Action::TcpSocket { port } => format!("tcp-socket :{port}"),
            Action::Grpc { port, service } => format!("grpc :{port} {service:?}"),
        };
        format!(
            "{action} delay={}s timeout={}s period={}s #success={} #failure={}",
            self.initial_delay.as_secs(),
            self.timeout.as_secs(),
            self.period.as_secs(),
            self.success_threshold,
            self.failure_threshold
        )
    }
}

/// Checks a probe at `field` (`spec.container.readiness_probe`): exactly
/// one handler, ports 1–65535, a non-empty exec command, scheme HTTP or
/// HTTPS, no `host` (a probe reaches only the workload's own address),
/// delays ≥ 0, periods, timeouts and thresholds ≥ 1 when set, and a
/// liveness probe's success threshold of 1 (kubelet's rules).
pub fn validate_probe(field: &str, liveness: bool, probe: &Probe) -> Result<(), SpecError> {
    let at = |name: &str| format!("{field}.{name}");
    let handlers = [
        probe.exec.is_some(),
        probe.http_get.is_some(),
        probe.tcp_socket.is_some(),
        probe.grpc.is_some(),
    ];
    match handlers.iter().filter(|set| **set).count() {
        1 => {}
        0 => {
            return Err(SpecError::new(
                field,
                "a probe needs one handler: exec, http_get, tcp_socket or grpc",
            ));
        }
        _ => {
            return Err(SpecError::new(
                field,
                "a probe takes exactly one handler of exec, http_get, tcp_socket and grpc",
            ));
        }
    }
    if let Some(exec) = &probe.exec {
        let command = at("exec.command");
        if exec.command.is_empty() || exec.command[0].is_empty() {
            return Err(SpecError::new(command, "must name a command"));
        }
        if exec.command.len() > MAX_EXEC_ARGS
            || exec.command.iter().map(String::len).sum::<usize>() > MAX_EXEC_BYTES
        {
            return Err(SpecError::new(
                command,
                format!("at most {MAX_EXEC_ARGS} arguments and {MAX_EXEC_BYTES} bytes"),
            ));
        }
        if exec.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::new(command, "must not contain NUL"));
        }
    }
    if let Some(http) = &probe.http_get {
        port(&at("http_get.port"), http.port)?;
        no_host(&at("http_get.host"), &http.host)?;
        if !matches!(
            http.scheme.as_str(),
            "" | "HTTP" | "HTTPS" | "http" | "https"
        ) {
            return Err(SpecError::new(
                at("http_get.scheme"),
                format!("{:?} is not HTTP or HTTPS", http.scheme),
            ));
        }
        let path_ok = http.path.is_empty()
            || (http.path.starts_with('/')
                && http.path.len() <= MAX_PATH_BYTES
                && http.path.parse::<hyper::Uri>().is_ok());
        if !path_ok {
            return Err(SpecError::new(
                at("http_get.path"),
                format!(
                    "must be an absolute request path (starting with '/', at most {MAX_PATH_BYTES} bytes)"
                ),
            ));
        }
        if http.http_headers.len() > MAX_HEADERS {
            return Err(SpecError::new(
                at("http_get.http_headers"),
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        for (i, header) in http.http_headers.iter().enumerate() {
            let field = at(&format!("http_get.http_headers[{i}]"));
            if hyper::header::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                return Err(SpecError::new(
                    format!("{field}.name"),
                    "is not an HTTP header name",
                ));
            }
            if hyper::header::HeaderValue::from_str(&header.value).is_err() {
                return Err(SpecError::new(
                    format!("{field}.value"),
                    "is not an HTTP header value (visible ASCII, no line breaks)",
                ));
            }
        }
    }
    if let Some(tcp) = &probe.tcp_socket {
        port(&at("tcp_socket.port"), tcp.port)?;
        no_host(&at("tcp_socket.host"), &tcp.host)?;
    }
    if let Some(grpc) = &probe.grpc {
        port(&at("grpc.port"), grpc.port)?;
    }
    seconds(&at("initial_delay_seconds"), probe.initial_delay_seconds, 0)?;
    seconds(&at("period_seconds"), probe.period_seconds, 1)?;
    seconds(&at("timeout_seconds"), probe.timeout_seconds, 1)?;
    threshold(&at("success_threshold"), probe.success_threshold)?;
    threshold(&at("failure_threshold"), probe.failure_threshold)?;
    if liveness && probe.success_threshold > 1 {
        return Err(SpecError::new(
            at("success_threshold"),
            "must be 1 for a liveness probe",
        ));
    }
    Ok(())
}

/// The probes of a container spec, or of one compose service, at `field`
/// (`spec.container`, `spec.compose.probes["web"]`).
pub(crate) fn validate_pair(
    field: &str,
    liveness: Option<&Probe>,
    readiness: Option<&Probe>,
) -> Result<(), SpecError> {
    for (kind, probe) in [
        (ProbeKind::Liveness, liveness),
        (ProbeKind::Readiness, readiness),
    ] {
        if let Some(probe) = probe {
            validate_probe(
                &format!("{field}.{}", kind.field()),
                kind == ProbeKind::Liveness,
                probe,
            )?;
        }
    }
    Ok(())
}

fn port(field: &str, port: i32) -> Result<(), SpecError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{port} is not a port (1-65535)"),
        ))
    }
}

fn no_host(field: &str, host: &str) -> Result<(), SpecError> {
    if host.is_empty() {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{host:?}: a probe reaches only the workload's own address; leave host empty"),
        ))
    }
}

/// A time in seconds: at least `min` when set (0 is the default), at most a
/// day.
fn seconds(field: &str, value: i32, min: i32) -> Result<(), SpecError> {
    if value < 0 || (value != 0 && value < min) || value > MAX_SECONDS {
        return Err(SpecError::new(
            field,
            format!("{value} is not between {min} and {MAX_SECONDS} seconds"),
        ));
    }
    Ok(())
}

/// A threshold: at least 1 when set (0 is the default).
fn threshold(field: &str, value: i32) -> Result<(), SpecError> {
    if !(0..=MAX_THRESHOLD).contains(&value) {
        return Err(SpecError::new(
            field,
            format!("{value} is not between 1 and {MAX_THRESHOLD}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{ExecAction, GrpcAction, HttpGetAction, HttpHeader, TcpSocketAction};

    fn http(port: i32) -> Probe {
        Probe {
            http_get: Some(HttpGetAction {
                path: "/healthz".into(),
                port,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn kubelets_defaults_fill_what_is_unset() {
        let spec = ProbeSpec::of(ProbeKind::Readiness, &http(8080)).unwrap();
        assert_eq!(spec.period, Duration::from_secs(10));
        assert_eq!(spec.timeout, Duration::from_secs(1));
        assert_eq!(spec.initial_delay, Duration::ZERO);
        assert_eq!((spec.success_threshold, spec.failure_threshold), (1, 3));
        assert_eq!(
            spec.action,
            Action::HttpGet {
                path: "/healthz".into(),
                port: 8080,
                https: false,
                headers: vec![],
            }
        );
    }

    #[test]
    fn every_refusal_names_the_field_and_the_rule() {
        let field = "spec.container.readiness_probe";
        let cases: Vec<(&str, bool, Probe, &str)> = vec![
            ("", false, Probe::default(), "one handler"),
            (
                "",
                false,
                Probe {
                    tcp_socket: Some(TcpSocketAction {
                        port: 80,
                        ..Default::default()
                    }),
                    ..http(80)
                },
                "exactly one handler",
            ),
            (".http_get.port", false, http(0), "1-65535"),
            (".http_get.port", false, http(65536), "1-65535"),
            (
                ".http_get.host",
                false,
                Probe {
                    http_get: Some(HttpGetAction {
                        port: 80,
                        host: "169.254.169.254".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "own address",
            ),
            (
                ".tcp_socket.host",
                false,
                Probe {
                    tcp_socket: Some(TcpSocketAction {
                        port: 22,
                        host: "10.0.0.1".into(),
                    }),
                    ..Default::default()
                },
                "own address",
            ),
            (
                ".http_get.scheme",
                false,
                Probe {
                    http_get: Some(HttpGetAction {
                        port: 80,
                        scheme: "FTP".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "HTTP or HTTPS",
            ),
            (
                ".http_get.path",
                false,
                Probe {
                    http_get: Some(HttpGetAction {
                        port: 80,
                        path: "healthz".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "absolute",
            ),
            (
                ".http_get.http_headers[0].value",
                false,
                Probe {
                    http_get: Some(HttpGetAction {
                        port: 80,
                        http_headers: vec![HttpHeader {
                            name: "X-A".into(),
                            value: "a\r\nHost: evil".into(),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "header value",
            ),
            (
                ".exec.command",
                false,
                Probe {
                    exec: Some(ExecAction { command: vec![] }),
                    ..Default::default()
                },
                "name a command",
            ),
            (
                ".grpc.port",
                false,
                Probe {
                    grpc: Some(GrpcAction {
                        port: -1,
                        service: String::new(),
                    }),
                    ..Default::default()
                },
                "1-65535",
            ),
            (
                ".period_seconds",
                false,
                Probe {
                    period_seconds: -1,
                    ..http(80)
                },
                "between 1",
            ),
            (
                ".timeout_seconds",
                false,
                Probe {
                    timeout_seconds: -5,
                    ..http(80)
                },
                "between 1",
            ),
            (
                ".initial_delay_seconds",
                false,
                Probe {
                    initial_delay_seconds: -1,
                    ..http(80)
                },
                "between 0",
            ),
            (
                ".failure_threshold",
                false,
                Probe {
                    failure_threshold: -1,
                    ..http(80)
                },
                "between 1",
            ),
            (
                ".success_threshold",
                true,
                Probe {
                    success_threshold: 2,
                    ..http(80)
                },
                "must be 1 for a liveness probe",
            ),
        ];
        for (suffix, liveness, probe, rule) in cases {
            let error = validate_probe(field, liveness, &probe).unwrap_err();
            assert_eq!(error.field, format!("{field}{suffix}"), "{error}");
            assert!(error.message.contains(rule), "{error}");
        }
        let ready_twice = Probe {
            success_threshold: 2,
            ..http(80)
        };
        assert!(validate_probe(field, false, &ready_twice).is_ok());
    }
}
