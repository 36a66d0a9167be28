//! Validation of an ApplyWorkload request: every refusal names the field,
//! and nothing is stored.

use std::path::PathBuf;

use persys_api::v1::{
    ApplyWorkloadRequest, ComposeSpec, ContainerSpec, DesiredState, VmSpec, WorkloadType,
    workload_spec,
};

use persys_controllers::docker::{HostPathPolicy, validate_container_spec};
use persys_controllers::vm::disks::check_disk_path;

use crate::store::ApplyRequest;

/// A refused field: its path in the request and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn refuse<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// What validation needs to know about this node.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Which host paths containers may bind-mount (never the host's critical
    /// paths nor the agent's state; within PERSYS_ALLOWED_HOST_PATHS).
    pub host_paths: HostPathPolicy,
    /// Roots VM disk files must lie under.
    pub vm_disk_roots: Vec<PathBuf>,
}

/// Checks a request and turns it into a store apply. Unspecified type is
/// taken from the spec (container when there is none); unspecified desired
/// state means running — as the scheduler assumes.
pub fn apply_request(
    request: ApplyWorkloadRequest,
    limits: &Limits,
) -> Result<ApplyRequest, FieldError> {
    validate_id(&request.id)?;
    let Some(spec) = request.spec.as_ref().and_then(|s| s.spec.as_ref()) else {
        return refuse("spec", "is required (one of container, compose, vm)");
    };
    let spec_type = WorkloadType::of(spec);
    let workload_type = match request.r#type() {
        WorkloadType::Unspecified => spec_type,
        t if t == spec_type => t,
        t => {
            return refuse(
                "type",
                format!(
                    "is {} but the spec is a {} spec",
                    t.short_name(),
                    spec_type.short_name()
                ),
            );
        }
    };
    if request.r#type != 0 && WorkloadType::try_from(request.r#type).is_err() {
        return refuse("type", format!("unknown value {}", request.r#type));
    }
    let desired_state = match DesiredState::try_from(request.desired_state) {
        Ok(DesiredState::Unspecified) => DesiredState::Running,
        Ok(state) => state,
        Err(_) => {
            return refuse(
                "desired_state",
                format!("unknown value {}", request.desired_state),
            );
        }
    };
    if request.revision_id.len() > 128 || request.revision_id.chars().any(char::is_control) {
        return refuse("revision_id", "must be at most 128 printable characters");
    }
    match spec {
        workload_spec::Spec::Container(c) => validate_container(c, limits)?,
        workload_spec::Spec::Compose(c) => validate_compose(c)?,
        workload_spec::Spec::Vm(v) => validate_vm(v, limits)?,
    }
    Ok(ApplyRequest {
        id: request.id,
        workload_type,
        revision_id: request.revision_id,
        desired_state,
        spec: request.spec.unwrap_or_default(),
        finalizers: workload_type
            .finalizer()
            .into_iter()
            .map(String::from)
            .collect(),
        labels: Default::default(),
        caller: Default::default(),
    })
}

/// Docker's container-name rule: a letter or digit, then letters, digits,
/// `_`, `.`, `-`; at most 128. Never `/`, whitespace or a bare `..`.
pub fn validate_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return refuse("id", "is required");
    }
    if id.len() > 128 {
        return refuse("id", "must be at most 128 characters");
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return refuse(
            "id",
            format!(
                "{id:?} is not a valid id: use letters, digits, '_', '.' and '-', starting with a letter or digit"
            ),
        );
    }
    Ok(())
}

fn validate_env(
    field: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), FieldError> {
    for (name, value) in env {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return refuse(
                format!("{field}[{name:?}]"),
                "environment variable names are letters, digits, '_', '.', '-' and do not start with a digit",
            );
        }
        if value.contains('\0') {
            return refuse(format!("{field}[{name:?}]"), "value contains a NUL byte");
        }
    }
    Ok(())
}

/// The Docker controller's own checks, run at apply time so a bad spec is
/// refused with INVALID_ARGUMENT instead of failing later.
fn validate_container(spec: &ContainerSpec, limits: &Limits) -> Result<(), FieldError> {
    validate_container_spec(spec, &limits.host_paths).map_err(|e| FieldError {
        field: e.field,
        message: e.message,
    })
}

/// Compose's project-name rule: lowercase letters, digits, `-` and `_`,
/// starting with a letter or digit.
pub fn validate_project_name(field: &str, name: &str) -> Result<(), FieldError> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        return refuse(
            field,
            format!(
                "{name:?} is not a valid compose project name: lowercase letters, digits, '-' and '_', starting with a letter or digit"
            ),
        );
    }
    Ok(())
}

fn validate_compose(spec: &ComposeSpec) -> Result<(), FieldError> {
    if !spec.project_name.is_empty() {
        validate_project_name("spec.compose.project_name", &spec.project_name)?;
    }
    let text = persys_api::compose_file_text(&spec.compose_yaml)
        .or_else(|why| refuse("spec.compose.compose_yaml", why))?;
    let document: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).or_else(|e| {
        refuse(
            "spec.compose.compose_yaml",
            format!("is not valid YAML: {e}"),
        )
    })?;
    match document.get("services") {
        Some(serde_yaml_ng::Value::Mapping(services)) if !services.is_empty() => {}
        _ => return refuse("spec.compose.compose_yaml", "has no `services` map"),
    }
    validate_env("spec.compose.env", &spec.env)
}

fn validate_vm(spec: &VmSpec, limits: &Limits) -> Result<(), FieldError> {
    if !spec.name.is_empty() {
        validate_id(&spec.name).map_err(|e| FieldError {
            field: "spec.vm.name".into(),
            message: e.message,
        })?;
    }
    if spec.vcpus < 1 {
        return refuse("spec.vm.vcpus", "must be at least 1");
    }
    if spec.memory_mb < 64 {
        return refuse("spec.vm.memory_mb", "must be at least 64 (MiB)");
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = format!("spec.vm.disks[{i}]");
        if !matches!(disk.format.as_str(), "" | "qcow2" | "raw" | "iso") {
            return refuse(
                format!("{field}.format"),
                format!("{:?} is not one of qcow2, raw, iso", disk.format),
            );
        }
        if !matches!(disk.r#type.as_str(), "" | "disk" | "cdrom") {
            return refuse(
                format!("{field}.type"),
                format!("{:?} is not disk or cdrom", disk.r#type),
            );
        }
        if disk.size_gb < 0 {
            return refuse(format!("{field}.size_gb"), "must not be negative");
        }
        // The VM controller's own check, so a path it would refuse is
        // refused at apply.
        check_disk_path(&format!("{field}.path"), &disk.path, &limits.vm_disk_roots).map_err(
            |e| FieldError {
                field: e.field,
                message: e.message,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_container_name_rule() {
        for good in ["web", "a1", "web-1.prod_2", "0abc"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "ümlaut",
            &"x".repeat(129),
        ] {
            assert_eq!(validate_id(bad).unwrap_err().field, "id", "{bad}");
        }
    }

    #[test]
    fn vm_disk_paths_must_be_plain_files_under_the_roots() {
        let limits = Limits {
            vm_disk_roots: vec![PathBuf::from("/var/lib/libvirt/images")],
            ..Default::default()
        };
        let vm = |path: &str| VmSpec {
            vcpus: 1,
            memory_mb: 128,
            disks: vec![persys_api::v1::DiskConfig {
                path: path.into(),
                format: "qcow2".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(validate_vm(&vm("/var/lib/libvirt/images/a.qcow2"), &limits).is_ok());
        for bad in [
            "/var/lib/libvirt/images/../images/a.qcow2",
            "relative.qcow2",
            "/dev/sda",
            "/var/lib/libvirt/images",
            "/etc/passwd",
        ] {
            let error = validate_vm(&vm(bad), &limits).unwrap_err();
            assert_eq!(error.field, "spec.vm.disks[0].path", "{bad}");
        }
    }

    #[test]
    fn project_names_follow_compose() {
        assert!(validate_project_name("p", "my-app_1").is_ok());
        for bad in ["My-App", "_x", "a.b", ""] {
            assert!(validate_project_name("p", bad).is_err(), "{bad}");
        }
    }
}
