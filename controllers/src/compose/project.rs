//! A workload's project on disk: `<project_root>/<id>/` with the compose
//! file, its `.env`, the agent's override file that labels the services,
//! the project's name and the spec hash last brought up.
//!
//! Every file is written atomically (a temporary file, fsynced, renamed), so
//! a crash leaves either the old or the new version. The folder is the
//! controller's record of what it runs: after a restart, a folder whose
//! workload is gone is an orphan to take down, and a folder naming a
//! project is what lets the workload adopt that project (see
//! [`super::observe`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde_yaml_ng::{Mapping, Value};

use super::binds::Resolved;
use super::cli::is_reserved_env;
use super::naming::{derive_project_name, is_valid_project_name};
use super::restarts::{RESTART_LABEL, Restarts};
use super::services::DeclaredServices;
use crate::docker::labels::{MANAGED, WORKLOAD_ID};

/// The compose file's name in the project folder.
pub const COMPOSE_FILE: &str = "docker-compose.yml";
/// Interpolation variables: the only way a spec's variables reach compose
/// (never through its process environment). 0600: they may be secrets.
pub const ENV_FILE: &str = ".env";
/// The agent's own compose file, passed after the spec's: it labels every
/// declared service's containers `persys.managed` and `persys.workload-id`,
/// so the project says whose it is even without this folder; takes restarts
/// from the engine (`restart: "no"`, the asked policy as a label); and,
/// when written for an `up`, gives bind volumes their resolved sources.
pub const OVERRIDE_FILE: &str = ".persys-labels.yml";
/// The project name the folder's containers run under.
pub const PROJECT_FILE: &str = ".persys-project";
/// The spec hash of the last successful `up`. Not a container label: a
/// label would change with every spec change, and compose would then
/// recreate every service instead of what changed.
pub const SPEC_HASH_FILE: &str = ".persys-spec-hash";

/// An id usable as a folder name: the API server's id rule. Checked again
/// here because it becomes a path.
fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Why `value` cannot be written to `.env` so that every compose reads it
/// back as it is, if it cannot. v1 expands `${NAME}` in every `.env` value,
/// quoted or not, with no escape; v2 expands `$NAME` in double quotes, and
/// v1 keeps a `\$` there. So `${` is never carried, and a `$` only in a
/// value that single quotes can hold (one without `'`, `\` or a line
/// break).
pub fn env_value_problem(value: &str) -> Option<&'static str> {
    if value.contains("${") {
        return Some(
            "holds \"${\", which compose's .env reader expands whatever the quoting: the value would not reach compose as written",
        );
    }
    if needs_double_quotes(value) && value.contains('$') {
        return Some(
            "holds a '$' with a quote ('), a backslash or a line break: no .env quoting carries that to every compose version unchanged",
        );
    }
    None
}

/// Single quotes hold neither a quote nor (in v1) a backslash, and a line
/// break is written as an escape, which only double quotes read.
fn needs_double_quotes(value: &str) -> bool {
    value.contains(['\'', '\\', '\n', '\r'])
}

/// The `.env` text of `env`, one `KEY=value` a line. Values that are not
/// plain are single-quoted (literal), or double-quoted with escapes when
/// they hold a quote, a backslash or a line break.
/// Reserved names ([`is_reserved_env`]) and values
/// [`env_value_problem`] refuses (validation refuses both at apply; a
/// spec stored before that rule still runs without them) are left out, so
/// no value can end its line early, set another variable or expand one.
pub fn render_env(env: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (key, value) in env {
        if is_reserved_env(key) || env_value_problem(value).is_some() || value.contains('\0') {
            continue;
        }
        let plain = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+%".contains(c));
        let rendered = if plain {
            value.clone()
        } else if !needs_double_quotes(value) {
            format!("'{value}'")
        } else {
            let escaped = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
                .replace('\r', "\\r");
            format!("\"{escaped}\"")
        };
        text.push_str(key);
        text.push('=');
        text.push_str(&rendered);
        text.push('\n');
    }
    text
}

/// What the override file says of the services besides whose they are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Override<'a> {
    /// The policy each service asked for: recorded as [`RESTART_LABEL`],
    /// while the engine's is `no`.
    pub(crate) restarts: &'a Restarts,
    /// Services whose file sets `deploy.restart_policy`, which compose v2
    /// prefers to `restart`: its condition is set to `none` too.
    pub(crate) deploy_restarts: &'a BTreeSet<String>,
    /// Bind volumes with their sources resolved, written right before an
    /// `up`; none in the copy a reconcile writes for the other commands.
    pub(crate) binds: &'a [Resolved],
}

/// The override file's text (JSON, which compose reads as YAML), in the
/// compose file's own `version` (v1 refuses files of different versions):
/// every declared service labelled
/// as the workload's and with the policy it asked for, run with the
/// engine's restart policy `no`, and its bind volumes on their resolved
/// sources (compose merges `volumes` by target).
pub(crate) fn render_override(
    id: &str,
    version: Option<&Value>,
    declared: &DeclaredServices,
    extra: Override<'_>,
) -> String {
    let services: Mapping = declared
        .keys()
        .map(|name| {
            let mut labels = Mapping::from_iter([
                (Value::from(MANAGED), Value::from("true")),
                (Value::from(WORKLOAD_ID), Value::from(id)),
            ]);
            if let Some(rule) = extra.restarts.get(name) {
                labels.insert(Value::from(RESTART_LABEL), Value::from(rule.to_string()));
            }
            let mut service = Mapping::from_iter([
                (Value::from("labels"), Value::from(labels)),
                (Value::from("restart"), Value::from("no")),
            ]);
            if extra.deploy_restarts.contains(name) {
                let policy = Mapping::from_iter([
                    (Value::from("condition"), Value::from("none")),
                    (Value::from("max_attempts"), Value::from(0)),
                ]);
                let deploy =
                    Mapping::from_iter([(Value::from("restart_policy"), Value::from(policy))]);
                service.insert(Value::from("deploy"), Value::from(deploy));
            }
            let volumes: Vec<Value> = extra
                .binds
                .iter()
                .filter(|bind| bind.service == *name)
                .map(Resolved::entry)
                .collect();
            if !volumes.is_empty() {
                service.insert(Value::from("volumes"), Value::from(volumes));
            }
            (Value::from(name.as_str()), Value::from(service))
        })
        .collect();
    let mut file = Mapping::new();
    if let Some(version) = version {
        file.insert(Value::from("version"), version.clone());
    }
    file.insert(Value::from("services"), Value::from(services));
    // As JSON, which is YAML with every string quoted: v1 reads YAML 1.1,
    // where an unquoted `no` is false, not the restart policy.
    let json = serde_json::to_string_pretty(&file).unwrap_or_default();
    format!(
        "# Written by persys-agent: whose these containers are, and what the engine may do.\n{json}\n"
    )
}

/// What a project folder holds, rendered from a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectFiles {
    pub compose: String,
    pub env: String,
    /// The override file ([`OVERRIDE_FILE`]).
    pub labels: String,
    pub project: String,
}

/// The folder of one workload's project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectDir {
    path: PathBuf,
}

impl ProjectDir {
    /// `<root>/<id>`; none for an id that is not a safe folder name.
    pub fn for_workload(root: &Path, id: &str) -> Option<ProjectDir> {
        is_safe_id(id).then(|| ProjectDir {
            path: root.join(id),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn compose_file(&self) -> PathBuf {
        self.path.join(COMPOSE_FILE)
    }

    pub fn override_file(&self) -> PathBuf {
        self.path.join(OVERRIDE_FILE)
    }

    /// True when the folder holds the override file (one written by an
    /// agent before labels were added does not, until it is written again).
    pub async fn has_override(&self) -> bool {
        tokio::fs::try_exists(self.override_file())
            .await
            .unwrap_or(false)
    }

    pub async fn exists(&self) -> bool {
        tokio::fs::try_exists(self.path.join(COMPOSE_FILE))
            .await
            .unwrap_or(false)
    }

    /// Writes the files that differ from `files`; true when any did.
    pub async fn write(&self, files: &ProjectFiles) -> std::io::Result<bool> {
        let dir = self.path.clone();
        let files = files.clone();
        blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let mut changed = false;
            for (name, content) in [
                (COMPOSE_FILE, &files.compose),
                (ENV_FILE, &files.env),
                (OVERRIDE_FILE, &files.labels),
                (PROJECT_FILE, &files.project),
            ] {
                changed |= write_if_changed(&dir, name, content.as_bytes())?;
            }
            if changed {
                sync_dir(&dir)?;
            }
            Ok(changed)
        })
        .await
    }

    /// The spec hash of the last successful `up`, if any.
    pub async fn recorded_hash(&self) -> Option<String> {
        read_trimmed(self.path.join(SPEC_HASH_FILE)).await
    }

    /// Records `hash` as brought up.
    pub async fn record_hash(&self, hash: &str) -> std::io::Result<()> {
        let dir = self.path.clone();
        let hash = format!("{hash}\n");
        blocking(move || {
            if write_if_changed(&dir, SPEC_HASH_FILE, hash.as_bytes())? {
                sync_dir(&dir)?;
            }
            Ok(())
        })
        .await
    }

    /// Records that the workload took over the Go agent's `project`
    /// (`super::adopt`), so it keeps that name.
    pub async fn record_adopted(&self, project: &str) -> std::io::Result<()> {
        let dir = self.path.clone();
        let project = format!("{project}\n");
        blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            if write_if_changed(&dir, super::adopt::ADOPTED_FILE, project.as_bytes())? {
                sync_dir(&dir)?;
            }
            Ok(())
        })
        .await
    }

    /// True when the workload took over the Go agent's project.
    pub async fn is_adopted(&self) -> bool {
        tokio::fs::try_exists(self.path.join(super::adopt::ADOPTED_FILE))
            .await
            .unwrap_or(false)
    }

    /// The project name the folder was last written for.
    pub async fn recorded_project(&self) -> Option<String> {
        read_trimmed(self.path.join(PROJECT_FILE))
            .await
            .filter(|p| is_valid_project_name(p))
    }

    /// True when the folder is the agent's record of having made `project`
    /// for workload `id` (the folder is the workload's by its name): its
    /// project file names it, or, in a folder without one that holds a
    /// compose file (as the Go agent left them, run as `-p <id>`), it is
    /// the name derived from the id.
    pub async fn records(&self, project: &str, id: &str) -> bool {
        match self.recorded_project().await {
            Some(recorded) => recorded == project,
            None => {
                let legacy = !tokio::fs::try_exists(self.path.join(PROJECT_FILE))
                    .await
                    .unwrap_or(true);
                legacy && self.exists().await && derive_project_name(id) == project
            }
        }
    }

    /// Removes the folder; a missing one is fine.
    pub async fn remove(&self) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&self.path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

async fn read_trimmed(path: PathBuf) -> Option<String> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Replaces `dir/name` with `content` through a fsynced temporary file,
/// unless it already holds exactly that.
fn write_if_changed(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<bool> {
    let target = dir.join(name);
    if std::fs::read(&target).is_ok_and(|existing| existing == content) {
        return Ok(false);
    }
    let temp = dir.join(format!(".{name}.tmp-{:08x}", fastrand::u32(..)));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(content)?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map(|()| true)
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Every project folder under `root`: `(workload id, project name)`.
pub async fn scan(root: &Path) -> std::io::Result<Vec<(String, Option<String>)>> {
    let mut found = Vec::new();
    let mut entries = match tokio::fs::read_dir(root).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    while let Some(entry) = entries.next_entry().await? {
        let Some(id) = entry.file_name().to_str().map(String::from) else {
            continue;
        };
        let Some(dir) = ProjectDir::for_workload(root, &id) else {
            continue;
        };
        if !entry.file_type().await.is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let project = dir.recorded_project().await;
        found.push((id, project));
    }
    found.sort();
    Ok(found)
}

/// Which workload each project folder on disk belongs to, by project name:
/// how an engine event for a project whose workload is gone finds the
/// folder to take down. Cheap to clone; shared with the event trigger.
#[derive(Debug, Clone, Default)]
pub struct ProjectIndex {
    /// A std lock: held only to copy an entry in or out, never across an
    /// await.
    by_project: Arc<RwLock<HashMap<String, String>>>,
}

impl ProjectIndex {
    pub fn insert(&self, project: &str, id: &str) {
        let mut map = self.by_project.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, owner| owner != id);
        map.insert(project.to_string(), id.to_string());
    }

    pub fn remove_workload(&self, id: &str) {
        self.by_project
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, owner| owner != id);
    }

    /// Replaces everything with what a scan found.
    pub fn replace(&self, found: &[(String, Option<String>)]) {
        let map = found
            .iter()
            .map(|(id, project)| {
                let project = project.clone().unwrap_or_else(|| derive_project_name(id));
                (project, id.clone())
            })
            .collect();
        *self.by_project.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    pub fn workload_of(&self, project: &str) -> Option<String> {
        self.by_project
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
            .cloned()
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_ids_get_no_folder() {
        let root = Path::new("/state/compose");
        assert_eq!(
            ProjectDir::for_workload(root, "shop").map(|d| d.path().to_path_buf()),
            Some(PathBuf::from("/state/compose/shop"))
        );
        for id in ["", "..", ".", "../etc", "a/b", ".hidden"] {
            assert!(ProjectDir::for_workload(root, id).is_none(), "{id:?}");
        }
    }

    #[test]
    fn env_files_quote_what_is_not_plain_and_skip_reserved_names() {
        let env = BTreeMap::from([
            ("A".to_string(), "plain-1.2".to_string()),
            ("B".to_string(), "hi there $x".to_string()),
            ("C".to_string(), "it's\nmulti \"q\" \\".to_string()),
            ("D".to_string(), "x\nLD_PRELOAD=/tmp/evil.so".to_string()),
            ("DOCKER_HOST".to_string(), "tcp://x".to_string()),
            ("LD_PRELOAD".to_string(), "/tmp/evil.so".to_string()),
            ("E".to_string(), "${HOME}".to_string()),
            ("F".to_string(), "it's $HOME".to_string()),
        ]);
        assert_eq!(
            render_env(&env),
            "A=plain-1.2\nB='hi there $x'\nC=\"it's\\nmulti \\\"q\\\" \\\\\"\nD=\"x\\nLD_PRELOAD=/tmp/evil.so\"\n"
        );
        assert!(env_value_problem("${HOME}").is_some());
        assert!(env_value_problem("it's $HOME").is_some());
        assert!(env_value_problem("a\\$b").is_some());
        assert!(env_value_problem("$HOME and 'x'").is_some());
        assert!(env_value_problem("$HOME\nx").is_some());
        assert!(env_value_problem("$HOME 'x").is_some());
        assert!(env_value_problem("pa$$word").is_none());
    }

    #[test]
    fn the_override_labels_every_service_takes_its_restarts_and_resolves_its_binds() {
        use crate::compose::binds::Entry;
        use crate::kit::restart::RestartRule;
        let declared =
            DeclaredServices::from([("web".to_string(), 1), ("odd name".to_string(), 0)]);
        let restarts = Restarts::from([
            (
                "web".to_string(),
                RestartRule::OnFailure { max_restarts: 3 },
            ),
            ("odd name".to_string(), RestartRule::Never),
        ]);
        let deploy_restarts = BTreeSet::from(["web".to_string()]);
        let binds = [Resolved {
            service: "web".into(),
            source: PathBuf::from("/var/lib/persys/volumes/web"),
            entry: Entry::Short {
                rest: "/data:ro".into(),
            },
        }];
        let extra = Override {
            restarts: &restarts,
            deploy_restarts: &deploy_restarts,
            binds: &binds,
        };
        let text = render_override("shop", Some(&Value::from("2.4")), &declared, extra);
        let value: Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(value["version"], "2.4");
        for service in ["web", "odd name"] {
            assert_eq!(value["services"][service]["labels"][MANAGED], "true");
            assert_eq!(value["services"][service]["labels"][WORKLOAD_ID], "shop");
            assert_eq!(value["services"][service]["restart"], "no");
        }
        let web = &value["services"]["web"];
        assert_eq!(web["labels"][RESTART_LABEL], "on-failure:3");
        assert_eq!(web["deploy"]["restart_policy"]["condition"], "none");
        assert_eq!(web["volumes"][0], "/var/lib/persys/volumes/web:/data:ro");
        let odd = &value["services"]["odd name"];
        assert_eq!(odd["labels"][RESTART_LABEL], "no");
        assert!(odd.get("deploy").is_none() && odd.get("volumes").is_none());
        let extra = Override {
            binds: &[],
            ..extra
        };
        let text = render_override("shop", None, &declared, extra);
        assert!(
            !text.contains("version") && !text.contains("volumes"),
            "{text}"
        );
        assert!(
            text.contains("\"restart\": \"no\""),
            "quoted, or YAML 1.1 reads false: {text}"
        );
    }

    #[tokio::test]
    async fn files_are_written_atomically_and_only_when_changed() {
        let root = tempfile::tempdir().unwrap();
        let dir = ProjectDir::for_workload(root.path(), "shop").unwrap();
        let files = ProjectFiles {
            compose: "services: {}\n".into(),
            env: "A=1\n".into(),
            labels: "services: {}\n".into(),
            project: "shop\n".into(),
        };
        assert!(!dir.exists().await);
        assert!(dir.write(&files).await.unwrap());
        assert!(!dir.write(&files).await.unwrap(), "unchanged: no write");
        assert!(dir.exists().await);
        assert_eq!(dir.recorded_project().await.as_deref(), Some("shop"));
        assert_eq!(dir.recorded_hash().await, None);
        dir.record_hash("abc").await.unwrap();
        assert_eq!(dir.recorded_hash().await.as_deref(), Some("abc"));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        let mode = std::fs::metadata(dir.path().join(ENV_FILE))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap();
        assert_eq!(mode & 0o077, 0, ".env may hold secrets");

        assert_eq!(
            scan(root.path()).await.unwrap(),
            vec![("shop".to_string(), Some("shop".to_string()))]
        );
        dir.remove().await.unwrap();
        assert!(
            !dir.path().join(ENV_FILE).exists(),
            ".env goes with its workload"
        );
        dir.remove().await.unwrap();
        assert!(scan(root.path()).await.unwrap().is_empty());
    }
}
