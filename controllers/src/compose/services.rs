//! The services a compose file declares, and how many containers of each
//! should run: what "every service runs" means for a project.

use std::collections::BTreeMap;

/// Service name → containers that should run (0: declared but not started
/// by `up`: `scale: 0`, `deploy.replicas: 0`, or a profile not enabled).
pub type DeclaredServices = BTreeMap<String, u32>;

/// Reads the services of a compose file, as [`super::document::load`]
/// read it. `env` is the spec's environment, for `COMPOSE_PROFILES`. A
/// scale compose would interpolate (`${N}`) counts as 1.
pub fn declared_services(
    document: &serde_yaml_ng::Value,
    env: &BTreeMap<String, String>,
) -> Result<DeclaredServices, String> {
    let Some(services) = document.get("services").and_then(|s| s.as_mapping()) else {
        return Err("has no `services` map".into());
    };
    let profiles: Vec<&str> = env
        .get("COMPOSE_PROFILES")
        .map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut declared = DeclaredServices::new();
    for (name, service) in services {
        let Some(name) = name.as_str() else {
            return Err(format!("has a service named {name:?}, not a string"));
        };
        declared.insert(name.to_string(), scale_of(service, &profiles));
    }
    if declared.is_empty() {
        return Err("declares no services".into());
    }
    Ok(declared)
}

fn scale_of(service: &serde_yaml_ng::Value, enabled_profiles: &[&str]) -> u32 {
    if let Some(profiles) = service.get("profiles").and_then(|p| p.as_sequence())
        && !profiles.is_empty()
        && !profiles
            .iter()
            .filter_map(|p| p.as_str())
            .any(|p| enabled_profiles.contains(&p) || enabled_profiles.contains(&"*"))
    {
        return 0;
    }
    let count = |value: Option<&serde_yaml_ng::Value>| -> Option<u32> {
        match value? {
            serde_yaml_ng::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            serde_yaml_ng::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    count(service.get("scale"))
        .or_else(|| count(service.get("deploy").and_then(|d| d.get("replicas"))))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared_services(
        compose: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<DeclaredServices, String> {
        super::declared_services(&crate::compose::document::load(compose)?, env)
    }

    #[test]
    fn services_scales_and_profiles_are_read() {
        let compose = r#"
services:
  web:
    image: nginx
  workers:
    image: w
    scale: 3
  replicas:
    image: w
    deploy:
      replicas: "2"
  off:
    image: w
    scale: 0
  debug:
    image: w
    profiles: [debug]
  interpolated:
    image: w
    scale: ${N}
x-anchor: &a {}
"#;
        let none = BTreeMap::new();
        let declared = declared_services(compose, &none).unwrap();
        assert_eq!(
            declared,
            BTreeMap::from([
                ("web".to_string(), 1),
                ("workers".to_string(), 3),
                ("replicas".to_string(), 2),
                ("off".to_string(), 0),
                ("debug".to_string(), 0),
                ("interpolated".to_string(), 1),
            ])
        );
        let debug = BTreeMap::from([("COMPOSE_PROFILES".to_string(), "x, debug".to_string())]);
        assert_eq!(declared_services(compose, &debug).unwrap()["debug"], 1);
    }

    #[test]
    fn files_without_services_are_refused() {
        let none = BTreeMap::new();
        assert!(declared_services("version: '3'\n", &none).is_err());
        assert!(declared_services("services: {}\n", &none).is_err());
        assert!(declared_services("services: [a]\n", &none).is_err());
        assert!(declared_services("services:\n  a: {image: x}\n  - b\n", &none).is_err());
    }
}
