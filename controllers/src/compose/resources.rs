//! What a compose project promises in CPU and memory: the limits its
//! services declare, times the containers each runs. This is what the
//! node's ceilings count for a compose workload, as they count a
//! container's limits and a VM's size.
//!
//! Per service, read as compose reads it (the file as the policy check
//! interpolated it):
//! - memory: `mem_limit`, or `deploy.resources.limits.memory` (the larger
//!   when both are set), in compose's byte units (`512m`, `1g`, `1.5GiB`,
//!   a plain number of bytes);
//! - CPU: `cpus`, or `deploy.resources.limits.cpus` (the larger); without
//!   either, `cpu_shares` at 1024 a CPU, as a container's shares count;
//! - containers: `scale`, else `deploy.replicas`, else 1; none for a
//!   service whose profiles are not enabled.
//!
//! A service that declares no limit promises nothing, as a container
//! without limits does. A value compose could not read is refused here,
//! naming the field (compose would refuse the file at `up`).

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::services::declared_services;
use crate::spec::SpecError;

const FILE: &str = "spec.compose.compose_yaml";
const MIB: f64 = 1024.0 * 1024.0;

/// The CPU and memory a compose project's services are limited to, in
/// all. Saturating: a file may declare any figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComposeResources {
    pub millicpus: i64,
    pub memory_mib: i64,
}

/// Sums the limits of the services of `interpolated` (the file as
/// [`super::check_compose_policy`] answers it: read as compose reads it
/// and interpolated), times each service's containers. `env` is the
/// spec's environment, for `COMPOSE_PROFILES`.
pub fn declared_resources(
    interpolated: &Value,
    env: &BTreeMap<String, String>,
) -> Result<ComposeResources, SpecError> {
    let Some(services) = interpolated.get("services").and_then(Value::as_mapping) else {
        return Ok(ComposeResources::default());
    };
    let scales = declared_services(interpolated, env).map_err(|why| SpecError::new(FILE, why))?;
    let mut total = ComposeResources::default();
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        let containers = i64::from(scales.get(name).copied().unwrap_or(1));
        if containers == 0 {
            continue;
        }
        let one = service_limits(name, service)?;
        total.millicpus = total
            .millicpus
            .saturating_add(one.millicpus.saturating_mul(containers));
        total.memory_mib = total
            .memory_mib
            .saturating_add(one.memory_mib.saturating_mul(containers));
    }
    Ok(total)
}

/// One container of service `name`.
fn service_limits(name: &str, service: &Value) -> Result<ComposeResources, SpecError> {
    let field = |path: &str| format!("services.{name}.{path}");
    let refuse = |path: &str, why: String| SpecError::new(FILE, format!("{}: {why}", field(path)));
    let limits = service
        .get("deploy")
        .and_then(|d| d.get("resources"))
        .and_then(|r| r.get("limits"));
    let memory = |path: &str, value: Option<&Value>| -> Result<i64, SpecError> {
        match value {
            None | Some(Value::Null) => Ok(0),
            Some(value) => bytes(value)
                .map(|b| (b as f64 / MIB).ceil() as i64)
                .ok_or_else(|| {
                    refuse(
                        path,
                        format!(
                            "{} is not a size compose reads (bytes, or a number with b, k, m, g, t or p)",
                            shown(value)
                        ),
                    )
                }),
        }
    };
    let cpus = |path: &str, value: Option<&Value>| -> Result<i64, SpecError> {
        match value {
            None | Some(Value::Null) => Ok(0),
            Some(value) => number(value)
                .filter(|cpus| cpus.is_finite() && *cpus >= 0.0)
                .map(|cpus| (cpus * 1000.0).ceil() as i64)
                .ok_or_else(|| refuse(path, format!("{} is not a number of CPUs", shown(value)))),
        }
    };
    let memory_mib = memory("mem_limit", service.get("mem_limit"))?.max(memory(
        "deploy.resources.limits.memory",
        limits.and_then(|l| l.get("memory")),
    )?);
    let mut millicpus = cpus("cpus", service.get("cpus"))?.max(cpus(
        "deploy.resources.limits.cpus",
        limits.and_then(|l| l.get("cpus")),
    )?);
    if millicpus == 0
        && let Some(shares) = service.get("cpu_shares").filter(|v| !v.is_null())
    {
        let shares = number(shares)
            .filter(|s| s.is_finite() && *s >= 0.0)
            .ok_or_else(|| {
                refuse(
                    "cpu_shares",
                    format!("{} is not a number of shares", shown(shares)),
                )
            })?;
        millicpus = (shares * 1000.0 / 1024.0).round() as i64;
    }
    Ok(ComposeResources {
        millicpus,
        memory_mib,
    })
}

fn shown(value: &Value) -> String {
    serde_yaml_ng::to_string(value)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A size as compose reads it (docker's `RAMInBytes`): a number of bytes,
/// or digits with an optional fraction and a unit `b`, `k`, `m`, `g`, `t`,
/// `p` (any case, powers of 1024, optionally followed by `i` and/or `b`).
fn bytes(value: &Value) -> Option<u64> {
    let text = match value {
        Value::Number(n) => return n.as_u64(),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    let digits = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (figure, unit) = text.split_at(digits);
    if figure.is_empty() || figure.starts_with('.') || figure.ends_with('.') {
        return None;
    }
    let figure: f64 = figure.parse().ok()?;
    let unit = unit.trim_start_matches(' ').to_ascii_lowercase();
    let (power, rest) = match unit.chars().next() {
        Some('k') => (1, &unit[1..]),
        Some('m') => (2, &unit[1..]),
        Some('g') => (3, &unit[1..]),
        Some('t') => (4, &unit[1..]),
        Some('p') => (5, &unit[1..]),
        _ => (0, unit.as_str()),
    };
    if !matches!(rest, "" | "b" | "i" | "ib") || (power == 0 && rest.starts_with('i')) {
        return None;
    }
    let bytes = figure * 1024f64.powi(power);
    // Saturating: an absurd size counts as the most there is.
    Some(if bytes >= u64::MAX as f64 {
        u64::MAX
    } else {
        bytes as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `yaml` read and interpolated from `vars` as the policy check does.
    fn resources(yaml: &str, vars: &[(&str, &str)]) -> Result<ComposeResources, SpecError> {
        let mut document = crate::compose::document::load(yaml).expect("valid YAML");
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::compose::document::interpolate(&mut document, &vars, "").expect("interpolated");
        declared_resources(&document, &BTreeMap::new())
    }

    #[test]
    fn limits_are_summed_over_services_times_their_containers() {
        let yaml = r#"
services:
  web:
    image: nginx
    mem_limit: 512m
    cpus: 0.5
    scale: 3
  db:
    image: postgres
    deploy:
      replicas: 2
      resources:
        limits: { memory: 1g, cpus: "1.25" }
  tool:
    image: busybox
    profiles: [debug]
    mem_limit: 64g
  free:
    image: busybox
"#;
        assert_eq!(
            resources(yaml, &[]).unwrap(),
            ComposeResources {
                millicpus: 3 * 500 + 2 * 1250,
                memory_mib: 3 * 512 + 2 * 1024,
            }
        );
    }

    #[test]
    fn limits_are_read_after_interpolation() {
        let yaml = r#"
services:
  web:
    image: nginx
    mem_limit: ${MEM:-128m}
    cpus: ${CPUS}
    scale: ${N}
"#;
        assert_eq!(
            resources(yaml, &[("CPUS", "2"), ("N", "4")]).unwrap(),
            ComposeResources {
                millicpus: 8000,
                memory_mib: 512,
            }
        );
    }

    #[test]
    fn compose_byte_units_are_read_as_docker_reads_them() {
        let cases = [
            ("1048576", Some(1 << 20)),
            ("100k", Some(100 << 10)),
            ("100KB", Some(100 << 10)),
            ("1.5g", Some(3 << 29)),
            ("2GiB", Some(2 << 30)),
            ("1 m", Some(1 << 20)),
            ("7b", Some(7)),
            ("1t", Some(1 << 40)),
            ("", None),
            ("m", None),
            ("1x", None),
            ("1.g", None),
            ("-1g", None),
            ("1gbb", None),
            ("12i", None),
        ];
        for (text, expected) in cases {
            assert_eq!(bytes(&Value::from(text)), expected, "{text:?}");
        }
        assert_eq!(bytes(&Value::from(4096u64)), Some(4096));
    }

    #[test]
    fn cpu_shares_count_only_without_a_cpu_limit() {
        let yaml = r#"
services:
  a: { image: x, cpu_shares: 512 }
  b: { image: x, cpu_shares: 512, cpus: 2 }
"#;
        assert_eq!(resources(yaml, &[]).unwrap().millicpus, 500 + 2000);
    }

    #[test]
    fn a_value_compose_could_not_read_is_refused_naming_the_field() {
        for (yaml, field) in [
            (
                "services:\n  web: { image: x, mem_limit: lots }\n",
                "services.web.mem_limit",
            ),
            (
                "services:\n  web: { image: x, deploy: { resources: { limits: { cpus: many } } } }\n",
                "services.web.deploy.resources.limits.cpus",
            ),
            (
                "services:\n  web: { image: x, cpus: -1 }\n",
                "services.web.cpus",
            ),
        ] {
            let error = resources(yaml, &[]).unwrap_err().to_string();
            assert!(error.contains(field), "{error}");
        }
    }

    #[test]
    fn absurd_figures_saturate() {
        let yaml = r#"
services:
  web: { image: x, mem_limit: 9000000p, cpus: 1e300, scale: 4000000000 }
"#;
        let total = resources(yaml, &[]).unwrap();
        assert_eq!(total.memory_mib, i64::MAX);
        assert_eq!(total.millicpus, i64::MAX);
    }
}
