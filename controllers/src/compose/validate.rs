//! The checks of a compose spec that need neither the engine nor the compose
//! CLI: what the API server runs at apply time, and what the controller
//! checks again before it writes a project folder.
//!
//! The compose file is parsed here, once, within the bounds of
//! [`super::document`]; what later checks need of it ([`super::policy`],
//! the services) is read from the [`ValidCompose`] this answers.

use persys_api::v1::ComposeSpec;
use serde_yaml_ng::Value;

use super::naming::is_valid_project_name;
use super::services::{DeclaredServices, declared_services};
use crate::spec::SpecError;

const FILE: &str = "spec.compose.compose_yaml";

/// A compose spec that passed [`validate_compose_spec`], its file read once
/// for every check that follows.
#[derive(Debug, Clone)]
pub struct ValidCompose {
    /// The file's text, decoded from base64 when it came so: what is
    /// written to the project folder.
    pub text: String,
    /// The file as compose reads it: merge keys applied, not yet
    /// interpolated.
    pub document: Value,
    /// The services the file declares, with their scale.
    pub declared: DeclaredServices,
}

/// Checks a compose spec: the project name (when given), the compose file
/// (text, YAML within bounds, a non-empty `services` map, and what it
/// declares under the spec's profiles), the `.env` names and values, and
/// the probes (of services the file declares).
/// CPU work on an input of up to 1 MiB: run it on a blocking thread.
pub fn validate_compose_spec(spec: &ComposeSpec) -> Result<ValidCompose, SpecError> {
    if !spec.project_name.is_empty() && !is_valid_project_name(&spec.project_name) {
        return Err(SpecError::new(
            "spec.compose.project_name",
            format!(
                "{:?} is not a valid compose project name: lowercase letters, digits, '-' and '_', starting with a letter or digit",
                spec.project_name
            ),
        ));
    }
    for (name, value) in &spec.env {
        let field = || format!("spec.compose.env[{name:?}]");
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(SpecError::new(
                field(),
                "environment variable names are letters, digits, '_', '.', '-' and do not start with a digit",
            ));
        }
        if value.contains('\0') {
            return Err(SpecError::new(field(), "value contains a NUL byte"));
        }
    }
    let text = persys_api::compose_file_text(&spec.compose_yaml)
        .map_err(|why| SpecError::new(FILE, why))?;
    let document = super::document::load(&text).map_err(|why| SpecError::new(FILE, why))?;
    let declared =
        declared_services(&document, &spec.env).map_err(|why| SpecError::new(FILE, why))?;
    for (service, probes) in &spec.probes {
        let field = format!("spec.compose.probes[{service:?}]");
        if !declared.contains_key(service) {
            return Err(SpecError::new(
                field,
                "names no service of the compose file (under the spec's profiles)",
            ));
        }
        crate::probes::spec::validate_pair(
            &field,
            probes.liveness_probe.as_ref(),
            probes.readiness_probe.as_ref(),
        )?;
    }
    Ok(ValidCompose {
        text,
        document,
        declared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ComposeSpec {
        ComposeSpec {
            compose_yaml: yaml.into(),
            ..Default::default()
        }
    }

    #[test]
    fn probes_must_name_services_of_the_file_and_be_valid() {
        use persys_api::v1::{ExecAction, Probe, ServiceProbes};
        let exec = |command: Vec<String>| Probe {
            exec: Some(ExecAction { command }),
            ..Default::default()
        };
        let with = |service: &str, probe: Probe| ComposeSpec {
            probes: [(
                service.to_string(),
                ServiceProbes {
                    readiness_probe: Some(probe),
                    liveness_probe: None,
                },
            )]
            .into(),
            ..spec("services:\n  web:\n    image: nginx\n")
        };
        let unknown = validate_compose_spec(&with("db", exec(vec!["true".into()]))).unwrap_err();
        assert_eq!(unknown.field, "spec.compose.probes[\"db\"]");
        assert!(unknown.message.contains("no service"), "{unknown}");
        let empty = validate_compose_spec(&with("web", exec(vec![]))).unwrap_err();
        assert_eq!(
            empty.field,
            "spec.compose.probes[\"web\"].readiness_probe.exec.command"
        );
        validate_compose_spec(&with("web", exec(vec!["true".into()]))).unwrap();
    }

    #[test]
    fn a_good_spec_passes_and_every_rule_names_its_field() {
        let good = spec("services:\n  web:\n    image: nginx\n");
        let valid = validate_compose_spec(&good).unwrap();
        assert_eq!(valid.declared, [("web".to_string(), 1)].into());
        assert_eq!(valid.document["services"]["web"]["image"], "nginx");
        let cases: [(&str, ComposeSpec); 6] = [
            (
                "spec.compose.project_name",
                ComposeSpec {
                    project_name: "My-App".into(),
                    ..good.clone()
                },
            ),
            (
                "spec.compose.env[\"1X\"]",
                ComposeSpec {
                    env: [("1X".to_string(), "v".to_string())].into(),
                    ..good.clone()
                },
            ),
            (
                "spec.compose.env[\"A\"]",
                ComposeSpec {
                    env: [("A".to_string(), "v\0w".to_string())].into(),
                    ..good.clone()
                },
            ),
            (FILE, spec("services: [")),
            (FILE, spec("version: '3'\n")),
            (FILE, spec("services: {}\n")),
        ];
        for (field, bad) in cases {
            assert_eq!(
                validate_compose_spec(&bad).unwrap_err().field,
                field,
                "{bad:?}"
            );
        }
    }
}
