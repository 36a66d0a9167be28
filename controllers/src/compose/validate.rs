//! The checks of a compose spec that need neither the engine nor the compose
//! CLI: what the API server runs at apply time, and what the controller
//! checks again before it writes a project folder.

use persys_api::v1::ComposeSpec;

use super::naming::is_valid_project_name;
use super::services::{DeclaredServices, declared_services};
use crate::spec::SpecError;

const FILE: &str = "spec.compose.compose_yaml";

/// Checks a compose spec: the project name (when given), the compose file
/// (text, YAML, a non-empty `services` map, and what it declares under the
/// spec's profiles), and the `.env` names and values. Answers the services
/// the file declares.
pub fn validate_compose_spec(spec: &ComposeSpec) -> Result<DeclaredServices, SpecError> {
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
    declared_services(&text, &spec.env).map_err(|why| SpecError::new(FILE, why))
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
    fn a_good_spec_passes_and_every_rule_names_its_field() {
        let good = spec("services:\n  web:\n    image: nginx\n");
        assert!(validate_compose_spec(&good).is_ok());
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
