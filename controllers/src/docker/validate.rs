//! Checks of a container spec that need no engine.
//!
//! The API server runs [`validate_container_spec`] at apply time, so a bad
//! spec is answered with INVALID_ARGUMENT and never stored; the controller
//! runs the same checks again before acting (host paths as written, see
//! [`HostPathPolicy::check_as_written`]), because a spec stored by an older
//! agent (or under another host-path policy) may no longer pass. Where a
//! host path leads on the filesystem is checked again before every create
//! and start (`super::binds`).

use std::path::{Component, Path, PathBuf};

use persys_api::v1::ContainerSpec;

use super::image::ImageReference;
use super::labels::RESERVED_PREFIX;
use crate::policy::{ALWAYS, DEFAULT_VOLUME_ROOT, refusal};

pub use crate::spec::SpecError;

/// Host paths that are never mountable: the host's identity, kernel
/// interfaces, credentials and the engine's own socket. Anything below them
/// is refused too, and so is any parent of them (mounting `/var` would expose
/// `/var/run/docker.sock`). `/` itself is refused only as itself.
const FORBIDDEN_HOST_PATHS: &[&str] = &[
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
    "/var/lib/docker",
];

/// Which host paths a container may bind-mount.
#[derive(Debug, Clone)]
pub struct HostPathPolicy {
    /// Never mountable, nor anything below or above them; kept both as
    /// written and canonicalised (`/var/run` is a link to `/run`).
    forbidden: Vec<PathBuf>,
    /// A host path must lie under one of these (none: nothing is
    /// mountable; `/`: anything not forbidden).
    allowed_roots: Vec<PathBuf>,
}

impl Default for HostPathPolicy {
    /// The node policy's default: only under `/var/lib/persys/volumes`.
    fn default() -> Self {
        HostPathPolicy::new(None, vec![PathBuf::from(DEFAULT_VOLUME_ROOT)])
    }
}

impl HostPathPolicy {
    /// The built-in forbidden paths, plus the agent's state directory; and
    /// only paths under `allowed_roots`.
    pub fn new(state_dir: Option<&Path>, allowed_roots: Vec<PathBuf>) -> Self {
        let allowed_roots = allowed_roots
            .into_iter()
            .map(|root| canonicalize_lenient(&root).unwrap_or(root))
            .collect();
        let policy = HostPathPolicy {
            forbidden: Vec::new(),
            allowed_roots,
        };
        policy
            .forbidding(FORBIDDEN_HOST_PATHS.iter().map(PathBuf::from))
            .forbidding(state_dir.map(Path::to_path_buf))
    }

    /// Also refuses `paths` (the agent's key files, wherever DOCKER_HOST's
    /// socket is), with what lies below and above them. Relative paths are
    /// taken from the current directory, as the agent opens them.
    pub fn forbidding(mut self, paths: impl IntoIterator<Item = PathBuf>) -> Self {
        for path in paths {
            let path = if path.is_absolute() {
                path
            } else {
                std::env::current_dir()
                    .map(|cwd| cwd.join(&path))
                    .unwrap_or(path)
            };
            if let Ok(canonical) = canonicalize_lenient(&path)
                && !self.forbidden.contains(&canonical)
            {
                self.forbidden.push(canonical);
            }
            if !self.forbidden.contains(&path) {
                self.forbidden.push(path);
            }
        }
        self
    }

    /// The roots host paths must lie under, resolved.
    pub fn allowed_roots(&self) -> &[PathBuf] {
        &self.allowed_roots
    }

    /// The canonical form of `host_path` if a container may mount it:
    /// resolved through the filesystem (symbolic links, `..`), then judged.
    pub fn check(&self, host_path: &str) -> Result<PathBuf, String> {
        let path = well_formed(host_path)?;
        let canonical = canonicalize_lenient(path).map_err(|e| {
            refusal(
                format_args!("{host_path:?} cannot be resolved: {e}"),
                ALWAYS,
            )
        })?;
        self.judge(host_path, &canonical)?;
        Ok(canonical)
    }

    /// `host_path` judged as written, `..` taken lexically, without looking
    /// at the filesystem: what the spec itself asks for. A stored spec is
    /// held to this; where its path leads today is checked before every
    /// create and start (`super::binds`), so a link swapped in after apply
    /// is a policy violation of the node's files, not a bad spec.
    pub fn check_as_written(&self, host_path: &str) -> Result<PathBuf, String> {
        let path = well_formed(host_path)?;
        let mut normal = PathBuf::from("/");
        for component in path.components() {
            match component {
                Component::ParentDir => {
                    normal.pop();
                }
                Component::Normal(part) => normal.push(part),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        self.judge(host_path, &normal)?;
        Ok(normal)
    }

    /// Whether the resolved path `resolved` (of `host_path`, as the error
    /// names it) is clear of the forbidden paths and under an allowed root.
    pub(crate) fn judge(&self, host_path: &str, resolved: &Path) -> Result<(), String> {
        if resolved == Path::new("/") {
            return Err(refusal(
                "the host's root directory cannot be mounted",
                ALWAYS,
            ));
        }
        for forbidden in &self.forbidden {
            if resolved.starts_with(forbidden) || forbidden.starts_with(resolved) {
                return Err(refusal(
                    format_args!(
                        "{host_path:?} (resolved to {}) is or overlaps {}, which containers may not mount",
                        resolved.display(),
                        forbidden.display()
                    ),
                    ALWAYS,
                ));
            }
        }
        if !self
            .allowed_roots
            .iter()
            .any(|root| resolved.starts_with(root))
        {
            let roots = match self.allowed_roots.as_slice() {
                [] => "none".to_string(),
                roots => roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            return Err(refusal(
                format_args!(
                    "{host_path:?} (resolved to {}) is outside the allowed host paths ({roots})",
                    resolved.display(),
                ),
                "host_paths.allowed_roots",
            ));
        }
        Ok(())
    }
}

/// `host_path` as a path, if it is one the engine's bind syntax can carry.
fn well_formed(host_path: &str) -> Result<&Path, String> {
    if host_path.is_empty() {
        return Err("must not be empty".into());
    }
    if host_path.contains(['\0', ':', ',']) {
        return Err("must not contain NUL, ':' or ','".into());
    }
    let path = Path::new(host_path);
    if !path.is_absolute() {
        return Err(format!("{host_path:?} is not an absolute path"));
    }
    Ok(path)
}

/// Resolves `path` through symlinks as far as it exists; the rest, which
/// does not exist and so holds no links, is normalised lexically.
fn canonicalize_lenient(path: &Path) -> std::io::Result<PathBuf> {
    let components: Vec<Component<'_>> = path.components().collect();
    let mut existing = components.len();
    let mut base = loop {
        let prefix: PathBuf = components[..existing].iter().collect();
        match std::fs::canonicalize(&prefix) {
            Ok(resolved) => break resolved,
            // Present but unresolvable: a link to nothing (which the engine
            // would create, following the link) or one it cannot read.
            Err(_) if std::fs::symlink_metadata(&prefix).is_ok() => {
                return Err(std::io::Error::other(format!(
                    "{} is a symbolic link that does not resolve",
                    prefix.display()
                )));
            }
            Err(_) if existing > 1 => existing -= 1,
            Err(error) => return Err(error),
        }
    };
    for component in &components[existing..] {
        match component {
            Component::ParentDir => {
                base.pop();
            }
            Component::Normal(part) => base.push(part),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(base)
}

/// Checks a bind-mount host path; the error names `field`.
pub fn validate_host_path(
    field: &str,
    host_path: &str,
    policy: &HostPathPolicy,
) -> Result<PathBuf, SpecError> {
    policy
        .check(host_path)
        .map_err(|message| SpecError::new(field, message))
}

/// Checks an image reference (`[registry[:port]/]name[:tag][@digest]`); the
/// error names `field`.
pub fn validate_image_reference(field: &str, image: &str) -> Result<ImageReference, SpecError> {
    ImageReference::parse(image).map_err(|message| SpecError::new(field, message))
}

/// Everything the Docker controller needs of a container spec before it
/// touches the engine. Field names in errors are `spec.container.<field>`.
pub fn validate_container_spec(
    spec: &ContainerSpec,
    policy: &HostPathPolicy,
) -> Result<(), SpecError> {
    validate_with(spec, |host_path| policy.check(host_path))
}

/// [`validate_container_spec`] for a stored spec, before the controller
/// acts on it: host paths are judged as written, and where they lead is
/// the start's check (a link swapped in since apply is a policy violation
/// the workload recovers from, not a bad spec).
pub(crate) fn validate_stored_container_spec(
    spec: &ContainerSpec,
    policy: &HostPathPolicy,
) -> Result<(), SpecError> {
    validate_with(spec, |host_path| policy.check_as_written(host_path))
}

/// The checks of a container spec, with host paths judged by `host_path`.
fn validate_with(
    spec: &ContainerSpec,
    host_path: impl Fn(&str) -> Result<PathBuf, String>,
) -> Result<(), SpecError> {
    const PREFIX: &str = "spec.container";
    validate_image_reference(&format!("{PREFIX}.image"), &spec.image)?;

    for key in spec.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(SpecError::new(
                format!("{PREFIX}.env[{key:?}]"),
                "an environment variable name must be non-empty without '=' or NUL",
            ));
        }
    }
    for (key, value) in &spec.env {
        if value.contains('\0') {
            return Err(SpecError::new(
                format!("{PREFIX}.env[{key:?}]"),
                "must not contain NUL",
            ));
        }
    }

    let mut published = std::collections::HashSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("{PREFIX}.ports[{i}]");
        if !(1..=65535).contains(&port.container_port) {
            return Err(SpecError::new(
                format!("{field}.container_port"),
                format!("{} is not a port (1-65535)", port.container_port),
            ));
        }
        if !(0..=65535).contains(&port.host_port) {
            return Err(SpecError::new(
                format!("{field}.host_port"),
                format!("{} is not a port (0-65535)", port.host_port),
            ));
        }
        let protocol = super::spec::port_protocol(&port.protocol).ok_or_else(|| {
            SpecError::new(
                format!("{field}.protocol"),
                format!("{:?} is not tcp or udp", port.protocol),
            )
        })?;
        if port.host_port != 0 && !published.insert((port.host_port, protocol)) {
            return Err(SpecError::new(
                format!("{field}.host_port"),
                format!("host port {}/{protocol} is published twice", port.host_port),
            ));
        }
    }

    for (i, volume) in spec.volumes.iter().enumerate() {
        let field = format!("{PREFIX}.volumes[{i}]");
        host_path(&volume.host_path)
            .map_err(|message| SpecError::new(format!("{field}.host_path"), message))?;
        validate_container_path(&format!("{field}.container_path"), &volume.container_path)?;
    }

    for (i, volume) in spec.managed_volumes.iter().enumerate() {
        let field = format!("{PREFIX}.managed_volumes[{i}]");
        if !is_docker_name(&volume.name) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!(
                    "{:?} must be letters, digits, '_', '.' or '-', starting with a letter or digit",
                    volume.name
                ),
            ));
        }
        match volume.driver.as_str() {
            "" | "local" => {}
            other => {
                return Err(SpecError::new(
                    format!("{field}.driver"),
                    format!(
                        "driver {other:?} is not supported for containers on this node (local is)"
                    ),
                ));
            }
        }
        validate_container_path(&format!("{field}.mount_path"), &volume.mount_path)?;
        if !matches!(
            volume.retain_policy.as_str(),
            "" | "Delete" | "delete" | "Retain" | "retain"
        ) {
            return Err(SpecError::new(
                format!("{field}.retain_policy"),
                format!("{:?} is not Delete or Retain", volume.retain_policy),
            ));
        }
    }

    if let Some(resources) = &spec.resources {
        let field = format!("{PREFIX}.resources");
        if resources.cpu_shares < 0 {
            return Err(SpecError::new(
                format!("{field}.cpu_shares"),
                "must not be negative",
            ));
        }
        if resources.memory_bytes < 0 {
            return Err(SpecError::new(
                format!("{field}.memory_bytes"),
                "must not be negative",
            ));
        }
        if resources.memory_bytes > 0 && resources.memory_bytes < MIN_MEMORY_BYTES {
            return Err(SpecError::new(
                format!("{field}.memory_bytes"),
                format!(
                    "{} is below the engine's minimum of 6 MiB",
                    resources.memory_bytes
                ),
            ));
        }
        match resources.memory_swap_bytes {
            -1 | 0 => {}
            swap if swap < -1 => {
                return Err(SpecError::new(
                    format!("{field}.memory_swap_bytes"),
                    "must be -1 (unlimited), 0 (default) or at least memory_bytes",
                ));
            }
            swap if resources.memory_bytes == 0 || swap < resources.memory_bytes => {
                return Err(SpecError::new(
                    format!("{field}.memory_swap_bytes"),
                    "needs memory_bytes, and must be at least memory_bytes",
                ));
            }
            _ => {}
        }
    }

    if let Some(policy) = &spec.restart_policy {
        if crate::kit::restart::RestartRule::parse(&policy.policy).is_none() {
            return Err(SpecError::new(
                format!("{PREFIX}.restart_policy.policy"),
                format!(
                    "{:?} is not no, always, on-failure or unless-stopped",
                    policy.policy
                ),
            ));
        }
        if policy.max_retry_count < 0 {
            return Err(SpecError::new(
                format!("{PREFIX}.restart_policy.max_retry_count"),
                "must not be negative",
            ));
        }
    }

    for key in spec.labels.keys() {
        if key.starts_with(RESERVED_PREFIX) {
            return Err(SpecError::new(
                format!("{PREFIX}.labels[{key:?}]"),
                format!("labels starting with {RESERVED_PREFIX:?} are reserved for the agent"),
            ));
        }
    }

    if super::image::PullPolicy::parse(&spec.image_pull_policy).is_none() {
        return Err(SpecError::new(
            format!("{PREFIX}.image_pull_policy"),
            format!(
                "{:?} is not IfNotPresent, Always or Never",
                spec.image_pull_policy
            ),
        ));
    }

    crate::probes::spec::validate_pair(
        PREFIX,
        spec.liveness_probe.as_ref(),
        spec.readiness_probe.as_ref(),
    )?;

    if spec.stop_grace_period_seconds < 0 {
        return Err(SpecError::new(
            format!("{PREFIX}.stop_grace_period_seconds"),
            "must not be negative (0 is the default, 10 s)",
        ));
    }
    Ok(())
}

/// The engine refuses smaller memory limits.
const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;

/// Longest stop grace period honoured, in seconds; longer ones are cut to it.
pub const MAX_STOP_GRACE_SECONDS: i32 = 3600;

fn validate_container_path(field: &str, path: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') {
        return Err(SpecError::new(
            field,
            format!("{path:?} is not an absolute path"),
        ));
    }
    if path == "/" {
        return Err(SpecError::new(
            field,
            "the container's root cannot be a mount point",
        ));
    }
    if path.contains(['\0', ':', ',']) {
        return Err(SpecError::new(field, "must not contain NUL, ':' or ','"));
    }
    Ok(())
}

/// Docker's rule for container and volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub(crate) fn is_docker_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{PortMapping, ResourceLimits, VolumeMount};

    fn spec(image: &str) -> ContainerSpec {
        ContainerSpec {
            image: image.into(),
            ..Default::default()
        }
    }

    #[test]
    fn forbidden_host_paths_are_refused_with_the_field_named() {
        let policy = HostPathPolicy::default();
        for path in [
            "/",
            "/etc",
            "/etc/",
            "/etc/nginx",
            "/proc/1",
            "/sys",
            "/dev/shm",
            "/boot",
            "/root/.ssh",
            "/run",
            "/var/run/docker.sock",
            "/var",
            "/tmp/../etc",
            "/does-not-exist/../etc/passwd",
        ] {
            let error = validate_host_path("spec.container.volumes[0].host_path", path, &policy)
                .expect_err(path);
            assert_eq!(error.field, "spec.container.volumes[0].host_path", "{path}");
        }
    }

    #[test]
    fn ordinary_host_paths_are_accepted_even_before_they_exist() {
        let policy = HostPathPolicy::new(None, vec![PathBuf::from("/")]);
        let tmp = std::env::temp_dir();
        let ok = validate_host_path("f", tmp.to_str().unwrap(), &policy).unwrap();
        assert!(ok.is_absolute());
        let missing = tmp.join("persys-not-created-yet/data");
        assert_eq!(
            validate_host_path("f", missing.to_str().unwrap(), &policy).unwrap(),
            std::fs::canonicalize(&tmp)
                .unwrap()
                .join("persys-not-created-yet/data")
        );
    }

    #[test]
    fn relative_and_ambiguous_host_paths_are_refused() {
        let policy = HostPathPolicy::default();
        for path in ["", "data", "./data", "/srv/a:b", "/srv/a,b"] {
            assert!(validate_host_path("f", path, &policy).is_err(), "{path}");
        }
    }

    #[test]
    fn the_state_directory_and_its_parents_are_refused() {
        let state = tempfile_dir();
        let policy = HostPathPolicy::new(Some(&state), vec![PathBuf::from("/")]);
        assert!(validate_host_path("f", state.to_str().unwrap(), &policy).is_err());
        assert!(validate_host_path("f", state.join("db").to_str().unwrap(), &policy).is_err());
        assert!(
            validate_host_path("f", state.parent().unwrap().to_str().unwrap(), &policy).is_err()
        );
        let sibling = state.with_file_name("persys-validate-sibling");
        assert!(validate_host_path("f", sibling.to_str().unwrap(), &policy).is_ok());
    }

    #[test]
    fn an_allow_list_confines_host_paths() {
        let root = std::env::temp_dir().join("persys-allowed");
        let policy = HostPathPolicy::new(None, vec![root.clone()]);
        assert!(validate_host_path("f", root.join("a").to_str().unwrap(), &policy).is_ok());
        let error = validate_host_path("f", "/srv/data", &policy).unwrap_err();
        assert!(error.message.contains("outside the allowed"), "{error}");
        let escape = format!("{}/../elsewhere", root.display());
        assert!(validate_host_path("f", &escape, &policy).is_err());
    }

    #[test]
    fn by_default_only_the_volume_root_is_mountable_and_refusals_name_the_rule() {
        let policy = HostPathPolicy::default();
        assert!(validate_host_path("f", "/var/lib/persys/volumes/web/data", &policy).is_ok());
        let error = validate_host_path("f", "/srv/data", &policy).unwrap_err();
        assert!(
            error.message.contains("(policy host_paths.allowed_roots)"),
            "{error}"
        );
        let none = HostPathPolicy::new(None, Vec::new());
        let error = validate_host_path("f", "/var/lib/persys/volumes/a", &none).unwrap_err();
        assert!(error.message.contains("(none)"), "{error}");
        let socket = HostPathPolicy::new(None, vec![PathBuf::from("/")])
            .forbidding([PathBuf::from("/srv/engine/docker.sock")]);
        for path in ["/srv/engine/docker.sock", "/srv/engine", "/srv"] {
            let error = validate_host_path("f", path, &socket).unwrap_err();
            assert!(error.message.contains("whatever the policy"), "{error}");
        }
        assert!(validate_host_path("f", "/srv/other", &socket).is_ok());
    }

    #[test]
    fn a_link_to_nothing_is_refused_not_resolved_lexically() {
        let root = tempfile_dir().join("links");
        std::fs::create_dir_all(&root).unwrap();
        let link = root.join("dangling");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/nonexistent/persys-escape", &link).unwrap();
        let policy = HostPathPolicy::new(None, vec![root.clone()]);
        let error = validate_host_path("f", link.to_str().unwrap(), &policy).unwrap_err();
        assert!(error.message.contains("does not resolve"), "{error}");
        assert!(validate_host_path("f", root.join("absent/x").to_str().unwrap(), &policy).is_ok());
    }

    #[test]
    fn a_stored_spec_is_judged_as_written_and_its_links_are_left_to_the_start() {
        let base = tempfile_dir().join("as-written");
        let root = base.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let link = root.join("swapped");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let policy = HostPathPolicy::new(None, vec![root.clone()]);
        let written = link.to_str().unwrap();
        assert!(policy.check(written).is_err(), "resolved, it is /etc");
        assert_eq!(policy.check_as_written(written).unwrap(), link);
        let spec = ContainerSpec {
            volumes: vec![VolumeMount {
                host_path: written.into(),
                container_path: "/data".into(),
                read_only: false,
            }],
            ..spec("busybox")
        };
        assert!(validate_container_spec(&spec, &policy).is_err());
        validate_stored_container_spec(&spec, &policy).unwrap();
        for bad in [
            format!("{}/../../etc", root.display()),
            "/etc/passwd".to_string(),
            "/".to_string(),
            "relative".to_string(),
        ] {
            assert!(policy.check_as_written(&bad).is_err(), "{bad}");
        }
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("persys-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    #[test]
    fn spec_errors_name_the_offending_field() {
        let policy = HostPathPolicy::new(None, vec![PathBuf::from("/srv")]);
        let cases: Vec<(ContainerSpec, &str)> = vec![
            (spec(""), "spec.container.image"),
            (spec("Bad Image"), "spec.container.image"),
            (
                ContainerSpec {
                    volumes: vec![
                        VolumeMount {
                            host_path: "/srv/ok".into(),
                            container_path: "/data".into(),
                            read_only: false,
                        },
                        VolumeMount {
                            host_path: "/etc".into(),
                            container_path: "/etc-host".into(),
                            read_only: true,
                        },
                    ],
                    ..spec("busybox")
                },
                "spec.container.volumes[1].host_path",
            ),
            (
                ContainerSpec {
                    volumes: vec![VolumeMount {
                        host_path: "/srv/ok".into(),
                        container_path: "data".into(),
                        read_only: false,
                    }],
                    ..spec("busybox")
                },
                "spec.container.volumes[0].container_path",
            ),
            (
                ContainerSpec {
                    ports: vec![PortMapping {
                        host_port: 8080,
                        container_port: 0,
                        protocol: "tcp".into(),
                    }],
                    ..spec("busybox")
                },
                "spec.container.ports[0].container_port",
            ),
            (
                ContainerSpec {
                    ports: vec![PortMapping {
                        host_port: 8080,
                        container_port: 80,
                        protocol: "icmp".into(),
                    }],
                    ..spec("busybox")
                },
                "spec.container.ports[0].protocol",
            ),
            (
                ContainerSpec {
                    ports: vec![
                        PortMapping {
                            host_port: 8080,
                            container_port: 80,
                            protocol: "".into(),
                        },
                        PortMapping {
                            host_port: 8080,
                            container_port: 81,
                            protocol: "TCP".into(),
                        },
                    ],
                    ..spec("busybox")
                },
                "spec.container.ports[1].host_port",
            ),
            (
                ContainerSpec {
                    resources: Some(ResourceLimits {
                        memory_bytes: 1000,
                        ..Default::default()
                    }),
                    ..spec("busybox")
                },
                "spec.container.resources.memory_bytes",
            ),
            (
                ContainerSpec {
                    image_pull_policy: "Sometimes".into(),
                    ..spec("busybox")
                },
                "spec.container.image_pull_policy",
            ),
            (
                ContainerSpec {
                    labels: [("persys.managed".to_string(), "false".to_string())].into(),
                    ..spec("busybox")
                },
                "spec.container.labels[\"persys.managed\"]",
            ),
            (
                ContainerSpec {
                    stop_grace_period_seconds: -1,
                    ..spec("busybox")
                },
                "spec.container.stop_grace_period_seconds",
            ),
        ];
        for (spec, field) in cases {
            let error = validate_container_spec(&spec, &policy).expect_err(field);
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn a_plain_spec_passes() {
        let policy = HostPathPolicy::default();
        let spec = ContainerSpec {
            env: [("A".to_string(), "1".to_string())].into(),
            ports: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                },
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "udp".into(),
                },
            ],
            image_pull_policy: "IfNotPresent".into(),
            ..spec(
                "registry.local:5000/team/app:1.2@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            )
        };
        validate_container_spec(&spec, &policy).unwrap();
    }

    #[test]
    fn probes_are_checked_at_apply_with_their_field_named() {
        use persys_api::v1::{HttpGetAction, Probe, TcpSocketAction};
        let policy = HostPathPolicy::default();
        let http = |port| Probe {
            http_get: Some(HttpGetAction {
                port,
                ..Default::default()
            }),
            ..Default::default()
        };
        let bad_port = ContainerSpec {
            readiness_probe: Some(http(0)),
            ..spec("busybox")
        };
        let error = validate_container_spec(&bad_port, &policy).unwrap_err();
        assert_eq!(error.field, "spec.container.readiness_probe.http_get.port");
        let elsewhere = ContainerSpec {
            liveness_probe: Some(Probe {
                tcp_socket: Some(TcpSocketAction {
                    port: 22,
                    host: "10.0.0.1".into(),
                }),
                ..Default::default()
            }),
            ..spec("busybox")
        };
        let error = validate_container_spec(&elsewhere, &policy).unwrap_err();
        assert_eq!(error.field, "spec.container.liveness_probe.tcp_socket.host");
        let good = ContainerSpec {
            readiness_probe: Some(http(8080)),
            ..spec("busybox")
        };
        validate_container_spec(&good, &policy).unwrap();
    }
}
