//! Bind-mount sources: what the engine is given, and the check they pass
//! before every create and every start.
//!
//! At apply the API server resolved each `host_path` and judged it against
//! the node policy, but the filesystem changes afterwards: a directory
//! swapped for a symbolic link after apply would have the engine mount
//! whatever the link points at, at the next start. So:
//! - a create resolves each source afresh ([`HostPathPolicy::check`]), and
//!   the engine receives the resolved path, never the spec's string;
//! - before every create and every start (the first, and every restart the
//!   agent makes after an exit: containers run with the engine's restart
//!   policy `no`, so there is no start the agent does not make), each
//!   source the engine will mount is walked without following any symbolic
//!   link ([`check_source`]) and judged against the allowed roots and the
//!   forbidden paths. For an existing container that is the source it
//!   recorded (`HostConfig.Binds`, bind `Mounts`).
//!
//! A source that fails is a `POLICY_VIOLATION`: nothing is created or
//! started, a `PolicyViolation` event says why, and the start is retried
//! with the back-off of failed starts, so putting the directory back lets
//! the workload run again.
//!
//! Compose services follow the same rule before every `up`
//! (`crate::compose` resolves their sources with [`resolve_source`]).
//!
//! Residual window: the engine resolves the path once more itself, when it
//! starts the container, after this check. A swap in the moments between
//! the check and the engine's mount is not caught; one made at any time
//! before the check is.

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};

use bollard::models::{ContainerInspectResponse, MountType};
use persys_api::v1::ContainerSpec;
use rustix::fs::{CWD, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::validate::HostPathPolicy;
use crate::policy::{ALWAYS, refusal};

/// One bind mount as the engine receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The resolved host path: no symbolic link, no `..`.
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

impl Bind {
    /// The `source:target:mode` form of `HostConfig.Binds`.
    pub fn engine_form(&self) -> String {
        let mode = if self.read_only { "ro" } else { "rw" };
        format!("{}:{}:{mode}", self.source.display(), self.target)
    }
}

/// A bind source that may not be mounted now: `what` names it (the spec's
/// field, or the container's recorded bind), `message` the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindViolation {
    pub what: String,
    pub message: String,
}

impl fmt::Display for BindViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.message)
    }
}

/// The spec's bind mounts with their sources resolved and checked: what a
/// create gives the engine.
pub fn resolve(spec: &ContainerSpec, policy: &HostPathPolicy) -> Result<Vec<Bind>, BindViolation> {
    spec.volumes
        .iter()
        .enumerate()
        .map(|(i, volume)| {
            let violation = |message| BindViolation {
                what: format!("spec.container.volumes[{i}].host_path"),
                message,
            };
            let source = resolve_source(policy, &volume.host_path).map_err(violation)?;
            Ok(Bind {
                source,
                target: volume.container_path.clone(),
                read_only: volume.read_only,
            })
        })
        .collect()
}

/// `host_path` as a create gives it to the engine: resolved through the
/// filesystem and judged ([`HostPathPolicy::check`]), then walked without
/// following any link ([`check_source`]). The rule for every bind source
/// the agent hands an engine, a container's or a compose service's.
pub fn resolve_source(policy: &HostPathPolicy, host_path: &str) -> Result<PathBuf, String> {
    let source = policy.check(host_path)?;
    check_source(policy, &source)?;
    Ok(source)
}

/// Checks every bind source `found` records, as the engine will mount it
/// at its next start.
pub fn recheck(
    found: &ContainerInspectResponse,
    policy: &HostPathPolicy,
) -> Result<(), BindViolation> {
    for source in recorded_sources(found) {
        check_source(policy, Path::new(&source)).map_err(|message| BindViolation {
            what: format!("bind source {source:?} of the container"),
            message,
        })?;
    }
    Ok(())
}

/// The host sources of a container's bind mounts: from the create request
/// it keeps (`HostConfig.Binds`, bind `HostConfig.Mounts`) and from the
/// mounts the engine recorded.
pub fn recorded_sources(found: &ContainerInspectResponse) -> Vec<String> {
    let mut sources = Vec::new();
    let mut add = |source: &str| {
        if source.starts_with('/') && !sources.iter().any(|s| s == source) {
            sources.push(source.to_string());
        }
    };
    if let Some(host) = &found.host_config {
        // `source:target[:mode]`; a source without '/' names a volume.
        for bind in host.binds.iter().flatten() {
            add(bind.split(':').next().unwrap_or_default());
        }
        for mount in host.mounts.iter().flatten() {
            if mount.typ == Some(MountType::BIND) {
                add(mount.source.as_deref().unwrap_or_default());
            }
        }
    }
    for mount in found.mounts.iter().flatten() {
        if mount.typ.as_deref() == Some("bind") {
            add(mount.source.as_deref().unwrap_or_default());
        }
    }
    sources
}

/// Whether the engine may mount `source` now: an absolute path without `.`
/// or `..`, whose every existing component is reached without following a
/// symbolic link, and which the policy allows. What does not exist yet
/// (the engine creates a missing source directory) holds no link.
///
/// Without links or `..` the path names exactly what it spells, so judging
/// it as written against the roots and forbidden paths is judging where it
/// leads.
pub fn check_source(policy: &HostPathPolicy, source: &Path) -> Result<(), String> {
    let shown = source.display().to_string();
    if !source.is_absolute() {
        return Err(format!("{shown:?} is not an absolute path"));
    }
    if source
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(refusal(
            format_args!("{shown:?} contains '.' or '..'; a bind source must be resolved"),
            ALWAYS,
        ));
    }
    match open_existing_prefix(source) {
        Ok(()) => {}
        Err((Errno::LOOP, at)) => {
            return Err(refusal(
                format_args!(
                    "{shown:?} passes through a symbolic link (at or below {}); bind sources are checked without following links",
                    at.display()
                ),
                ALWAYS,
            ));
        }
        Err((errno, at)) => {
            return Err(refusal(
                format_args!(
                    "{shown:?} cannot be checked: {} at {}",
                    io::Error::from(errno),
                    at.display()
                ),
                ALWAYS,
            ));
        }
    }
    policy.judge(&shown, source)
}

/// Opens the longest existing prefix of `path` without following links;
/// the error comes with the prefix that answered it.
fn open_existing_prefix(path: &Path) -> Result<(), (Errno, PathBuf)> {
    let mut prefix = path.to_path_buf();
    loop {
        match open_no_symlinks(&prefix) {
            Ok(()) => return Ok(()),
            Err(Errno::NOENT) if prefix.pop() && prefix.parent().is_some() => continue,
            Err(Errno::NOENT) => return Ok(()),
            Err(errno) => return Err((errno, prefix)),
        }
    }
}

/// Opens `path` (`O_PATH`) with no symbolic link in any component:
/// `openat2` with `RESOLVE_NO_SYMLINKS`, or where the kernel has no
/// `openat2` (before 5.6), one `O_NOFOLLOW` open per component. A link
/// answers `ELOOP` either way.
fn open_no_symlinks(path: &Path) -> Result<(), Errno> {
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(CWD, path, flags, Mode::empty(), resolve) {
        Ok(_) => Ok(()),
        Err(Errno::NOSYS) => open_component_wise(path),
        Err(errno) => Err(errno),
    }
}

/// The fallback of [`open_no_symlinks`]: from `/`, each component opened
/// `O_PATH | O_NOFOLLOW` relative to the last, refusing one that is a link
/// (`O_NOFOLLOW` with `O_PATH` opens the link itself rather than failing).
fn open_component_wise(path: &Path) -> Result<(), Errno> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open("/", flags | OFlags::DIRECTORY, Mode::empty())?;
    for component in path.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        let next = rustix::fs::openat(&dir, name, flags, Mode::empty())?;
        if FileType::from_raw_mode(rustix::fs::fstat(&next)?.st_mode) == FileType::Symlink {
            return Err(Errno::LOOP);
        }
        dir = next;
    }
    Ok(())
}

/// For tests of bind sources (here and compose's): a canonical temporary
/// directory holding `root/data` and `outside`, and a policy that allows
/// only `root`.
#[cfg(test)]
pub(crate) fn test_root() -> (tempfile::TempDir, PathBuf, HostPathPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let root = base.join("root");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(base.join("outside")).unwrap();
    let policy = HostPathPolicy::new(None, vec![root.clone()]);
    (dir, root, policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::VolumeMount;

    use super::test_root as setup;

    #[test]
    fn a_plain_directory_under_the_root_passes_and_so_does_one_not_made_yet() {
        let (_dir, root, policy) = setup();
        check_source(&policy, &root.join("data")).unwrap();
        check_source(&policy, &root.join("data/not/made/yet")).unwrap();
        assert!(open_component_wise(&root.join("data")).is_ok());
    }

    #[test]
    fn a_symbolic_link_in_any_component_is_refused_even_one_that_stays_inside() {
        let (_dir, root, policy) = setup();
        let outside = root.parent().unwrap().join("outside");
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("data"), root.join("alias")).unwrap();
        for path in [
            root.join("escape"),
            root.join("escape/below"),
            root.join("alias"),
            root.join("alias/below/missing"),
        ] {
            let error = check_source(&policy, &path).expect_err(&path.display().to_string());
            assert!(error.contains("symbolic link"), "{error}");
            assert!(error.contains("whatever the policy"), "{error}");
            assert_eq!(open_component_wise(&path), Err(Errno::LOOP), "{path:?}");
        }
    }

    #[test]
    fn dot_dot_escapes_and_paths_outside_the_roots_are_refused() {
        let (_dir, root, policy) = setup();
        let escape = root.join("data/../../outside");
        let error = check_source(&policy, &escape).unwrap_err();
        assert!(error.contains("'..'"), "{error}");
        let outside = root.parent().unwrap().join("outside");
        let error = check_source(&policy, &outside).unwrap_err();
        assert!(error.contains("host_paths.allowed_roots"), "{error}");
        assert!(check_source(&policy, Path::new("data")).is_err());
    }

    #[test]
    fn a_create_gets_the_resolved_source_and_a_swapped_link_is_a_violation_naming_the_field() {
        let (_dir, root, policy) = setup();
        std::os::unix::fs::symlink(root.join("data"), root.join("current")).unwrap();
        let spec = ContainerSpec {
            volumes: vec![VolumeMount {
                host_path: format!("{}/./current", root.display()),
                container_path: "/data".into(),
                read_only: true,
            }],
            ..Default::default()
        };
        let binds = resolve(&spec, &policy).unwrap();
        assert_eq!(binds[0].source, root.join("data"));
        assert_eq!(
            binds[0].engine_form(),
            format!("{}:/data:ro", root.join("data").display())
        );

        std::fs::remove_file(root.join("current")).unwrap();
        let outside = root.parent().unwrap().join("outside");
        std::os::unix::fs::symlink(&outside, root.join("current")).unwrap();
        let violation = resolve(&spec, &policy).unwrap_err();
        assert_eq!(violation.what, "spec.container.volumes[0].host_path");
        assert!(
            violation.message.contains("host_paths.allowed_roots"),
            "{violation}"
        );
    }

    #[test]
    fn recorded_sources_come_from_binds_and_bind_mounts_not_volumes() {
        use bollard::models::{HostConfig, Mount, MountPoint};
        let found = ContainerInspectResponse {
            host_config: Some(HostConfig {
                binds: Some(vec![
                    "/srv/a:/a:ro".into(),
                    "named:/n".into(),
                    "/srv/b:/b".into(),
                ]),
                mounts: Some(vec![Mount {
                    typ: Some(MountType::BIND),
                    source: Some("/srv/c".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mounts: Some(vec![
                MountPoint {
                    typ: Some("bind".into()),
                    source: Some("/srv/a".into()),
                    ..Default::default()
                },
                MountPoint {
                    typ: Some("volume".into()),
                    source: Some("/var/lib/docker/volumes/x/_data".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        assert_eq!(recorded_sources(&found), ["/srv/a", "/srv/b", "/srv/c"]);
    }
}
