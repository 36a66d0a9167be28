//! Validation of an ApplyWorkload request: every refusal names the field,
//! and nothing is stored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use persys_api::v1::{
    ApplyWorkloadRequest, ComposeSpec, ContainerSpec, DesiredState, VmSpec, WorkloadType,
    workload_spec,
};

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
    /// The agent's state directory: never mountable.
    pub state_path: PathBuf,
    /// When not empty, bind mounts must lie under one of these.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Roots VM disk files must lie under.
    pub vm_disk_roots: Vec<PathBuf>,
}

/// Host paths a container may never mount, nor any folder holding them.
const CRITICAL_HOST_PATHS: &[&str] = &[
    "/",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/root",
    "/run",
    "/var/run",
    "/var/run/docker.sock",
    "/run/docker.sock",
];

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

/// A Docker image reference: `[host[:port]/]path[:tag][@digest]`.
pub fn validate_image(field: &str, image: &str) -> Result<(), FieldError> {
    if image.is_empty() {
        return refuse(field, "is required");
    }
    let bad = |why: &str| {
        refuse(
            field,
            format!("{image:?} is not a valid image reference: {why}"),
        )
    };
    if image.len() > 512 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("no whitespace, at most 512 characters");
    }
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return bad("a digest is algorithm:hex");
        };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-_".contains(c));
        if !algorithm_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return bad("malformed digest");
        }
    }
    // A tag follows the last ':' after the last '/'.
    let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let mut chars = tag.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            && tag.len() <= 128;
        if !ok {
            return bad("malformed tag");
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 {
        let first = components[0];
        let is_host = first.contains('.') || first.contains(':') || first == "localhost";
        if is_host {
            let (host, port) = match first.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (first, None),
            };
            let host_ok = !host.is_empty()
                && host.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
            if !host_ok || !port_ok {
                return bad("malformed registry host");
            }
            components.remove(0);
        }
    }
    for component in components {
        let ok = !component.is_empty()
            && component
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && component.starts_with(|c: char| c.is_ascii_alphanumeric())
            && component.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return bad("repository names are lowercase letters, digits and separators");
        }
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

/// Resolves a host path as far as it exists (symlinks included), keeping the
/// part that does not exist yet, and normalises `.` and `..`.
pub fn canonical_host_path(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            let mut full = resolved;
            for part in rest.iter().rev() {
                full.push(part);
            }
            return normalise(&full);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return normalise(path),
        }
    }
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

/// Refuses bind mounts of the host's critical paths, of any folder holding
/// one, of the agent's state, and (with an allow-list) of anything outside it.
pub fn validate_host_path(field: &str, host_path: &str, limits: &Limits) -> Result<(), FieldError> {
    if host_path.is_empty() {
        return refuse(field, "is required");
    }
    if !host_path.starts_with('/') {
        return refuse(field, format!("{host_path:?} must be an absolute path"));
    }
    let path = canonical_host_path(Path::new(host_path));
    let mut forbidden: Vec<PathBuf> = CRITICAL_HOST_PATHS.iter().map(PathBuf::from).collect();
    if !limits.state_path.as_os_str().is_empty() {
        forbidden.push(canonical_host_path(&limits.state_path));
    }
    for critical in &forbidden {
        // The critical path itself, anything under it (but `/`), or a folder holding it.
        let is_or_under =
            path == *critical || (critical != Path::new("/") && path.starts_with(critical));
        if is_or_under || critical.starts_with(&path) {
            return refuse(
                field,
                format!(
                    "{host_path:?} (resolved to {}) exposes the host's {} and cannot be mounted",
                    path.display(),
                    critical.display()
                ),
            );
        }
    }
    if !limits.allowed_host_paths.is_empty()
        && !limits
            .allowed_host_paths
            .iter()
            .any(|prefix| path.starts_with(canonical_host_path(prefix)))
    {
        return refuse(
            field,
            format!("{host_path:?} is outside the allowed host paths (PERSYS_ALLOWED_HOST_PATHS)"),
        );
    }
    Ok(())
}

fn validate_container(spec: &ContainerSpec, limits: &Limits) -> Result<(), FieldError> {
    validate_image("spec.container.image", &spec.image)?;
    validate_env("spec.container.env", &spec.env)?;
    for (i, volume) in spec.volumes.iter().enumerate() {
        validate_host_path(
            &format!("spec.container.volumes[{i}].host_path"),
            &volume.host_path,
            limits,
        )?;
        if !volume.container_path.starts_with('/') {
            return refuse(
                format!("spec.container.volumes[{i}].container_path"),
                "must be an absolute path",
            );
        }
    }
    let mut bound = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.container.ports[{i}]");
        if !(1..=65535).contains(&port.container_port) {
            return refuse(format!("{field}.container_port"), "must be 1-65535");
        }
        if !(0..=65535).contains(&port.host_port) {
            return refuse(
                format!("{field}.host_port"),
                "must be 0-65535 (0: not published)",
            );
        }
        let protocol = if port.protocol.is_empty() {
            "tcp"
        } else {
            port.protocol.as_str()
        };
        if protocol != "tcp" && protocol != "udp" {
            return refuse(
                format!("{field}.protocol"),
                format!("{:?} is not tcp or udp", port.protocol),
            );
        }
        if port.host_port != 0 && !bound.insert((port.host_port, protocol.to_string())) {
            return refuse(
                format!("{field}.host_port"),
                format!("{}/{protocol} is published twice", port.host_port),
            );
        }
    }
    if let Some(r) = &spec.resources {
        for (name, value) in [
            ("cpu_shares", r.cpu_shares),
            ("memory_bytes", r.memory_bytes),
            ("memory_swap_bytes", r.memory_swap_bytes),
        ] {
            if value < 0 && !(name == "memory_swap_bytes" && value == -1) {
                return refuse(
                    format!("spec.container.resources.{name}"),
                    "must not be negative",
                );
            }
        }
        if r.memory_bytes > 0 && r.memory_bytes < 6 * 1024 * 1024 {
            return refuse(
                "spec.container.resources.memory_bytes",
                "must be at least 6 MiB (Docker's minimum)",
            );
        }
        if r.memory_swap_bytes > 0 && r.memory_bytes > 0 && r.memory_swap_bytes < r.memory_bytes {
            return refuse(
                "spec.container.resources.memory_swap_bytes",
                "is memory plus swap, so it cannot be below memory_bytes",
            );
        }
    }
    if let Some(policy) = &spec.restart_policy {
        if !matches!(
            policy.policy.as_str(),
            "" | "no" | "always" | "on-failure" | "unless-stopped"
        ) {
            return refuse(
                "spec.container.restart_policy.policy",
                format!(
                    "{:?} is not one of no, always, on-failure, unless-stopped",
                    policy.policy
                ),
            );
        }
        if policy.max_retry_count < 0 {
            return refuse(
                "spec.container.restart_policy.max_retry_count",
                "must not be negative",
            );
        }
    }
    if !matches!(
        spec.image_pull_policy.as_str(),
        "" | "IfNotPresent" | "Always" | "Never"
    ) {
        return refuse(
            "spec.container.image_pull_policy",
            format!(
                "{:?} is not one of IfNotPresent, Always, Never",
                spec.image_pull_policy
            ),
        );
    }
    if spec.stop_grace_period_seconds < 0 {
        return refuse(
            "spec.container.stop_grace_period_seconds",
            "must not be negative",
        );
    }
    for key in spec.labels.keys() {
        if key.starts_with("persys.") || key.starts_with("com.docker.compose.") {
            return refuse(
                format!("spec.container.labels[{key:?}]"),
                "is reserved for the agent",
            );
        }
    }
    Ok(())
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
        if disk.path.is_empty() {
            return refuse(format!("{field}.path"), "is required");
        }
        if !limits.vm_disk_roots.is_empty() {
            let path = canonical_host_path(Path::new(&disk.path));
            if !disk.path.starts_with('/')
                || !limits
                    .vm_disk_roots
                    .iter()
                    .any(|root| path.starts_with(canonical_host_path(root)))
            {
                return refuse(
                    format!("{field}.path"),
                    format!(
                        "{:?} is outside the VM disk roots ({})",
                        disk.path,
                        limits
                            .vm_disk_roots
                            .iter()
                            .map(|r| r.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
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
    fn image_references_are_checked() {
        for good in [
            "nginx",
            "nginx:1.25",
            "library/nginx:latest",
            "persys-test/busybox:latest",
            "localhost:5000/team/app:v1.2-rc_3",
            "registry.example.com/a/b",
            "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(validate_image("image", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Nginx",
            "nginx:",
            "nginx::1",
            "a b",
            "nginx@sha256:xyz",
            "-nginx",
            "reg:99999/app",
            "a//b",
        ] {
            assert!(validate_image("image", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn critical_host_paths_are_refused() {
        let limits = Limits {
            state_path: PathBuf::from("/var/lib/persys/state"),
            ..Default::default()
        };
        for bad in [
            "/",
            "/etc",
            "/etc/",
            "/etc/passwd",
            "/proc/1",
            "/sys",
            "/dev/sda",
            "/boot",
            "/root/.ssh",
            "/run",
            "/var/run/docker.sock",
            "/var/lib/persys",
            "/var/lib/persys/state/db",
            "/tmp/../etc",
            "relative/path",
        ] {
            assert!(validate_host_path("v", bad, &limits).is_err(), "{bad}");
        }
        for good in ["/srv/data", "/var/lib/app", "/tmp/x", "/home/user/data"] {
            assert!(validate_host_path("v", good, &limits).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_symlink_to_a_critical_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("innocent");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let error =
            validate_host_path("v", link.to_str().unwrap(), &Limits::default()).unwrap_err();
        assert!(error.message.contains("/etc"), "{error}");
    }

    #[test]
    fn an_allow_list_confines_bind_mounts() {
        let limits = Limits {
            allowed_host_paths: vec![PathBuf::from("/srv")],
            ..Default::default()
        };
        assert!(validate_host_path("v", "/srv/data", &limits).is_ok());
        assert!(validate_host_path("v", "/srv/../home", &limits).is_err());
        assert!(validate_host_path("v", "/home/data", &limits).is_err());
    }

    #[test]
    fn project_names_follow_compose() {
        assert!(validate_project_name("p", "my-app_1").is_ok());
        for bad in ["My-App", "_x", "a.b", ""] {
            assert!(validate_project_name("p", bad).is_err(), "{bad}");
        }
    }
}
