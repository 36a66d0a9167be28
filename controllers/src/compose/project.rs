//! A workload's project on disk: `<project_root>/<id>/` with the compose
//! file, its `.env`, the project's name and the spec hash last brought up.
//!
//! Every file is written atomically (a temporary file, fsynced, renamed), so
//! a crash leaves either the old or the new version. The folder is the
//! controller's record of what it runs: after a restart, a folder whose
//! workload is gone is an orphan to take down.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::cli::is_reserved_env;
use super::naming::{derive_project_name, is_valid_project_name};

/// The compose file's name in the project folder.
pub const COMPOSE_FILE: &str = "docker-compose.yml";
/// Interpolation variables, for compose run by hand and for taking an
/// orphan down; the controller passes them in the process environment too.
pub const ENV_FILE: &str = ".env";
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

/// The `.env` text of `env`, one `KEY=value` a line. Values that are not
/// plain are single-quoted (literal in v1 and v2), or double-quoted with
/// escapes when they hold a quote or a line break.
pub fn render_env(env: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (key, value) in env {
        if is_reserved_env(key) {
            continue;
        }
        let plain = value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+%".contains(c));
        let rendered = if plain {
            value.clone()
        } else if !value.contains(['\'', '\n', '\r', '\\']) {
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

/// What a project folder holds, rendered from a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectFiles {
    pub compose: String,
    pub env: String,
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

    /// The project name the folder was last written for.
    pub async fn recorded_project(&self) -> Option<String> {
        read_trimmed(self.path.join(PROJECT_FILE))
            .await
            .filter(|p| is_valid_project_name(p))
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
            ("C".to_string(), "it's\nmulti".to_string()),
            ("DOCKER_HOST".to_string(), "tcp://x".to_string()),
        ]);
        assert_eq!(
            render_env(&env),
            "A=plain-1.2\nB='hi there $x'\nC=\"it's\\nmulti\"\n"
        );
    }

    #[tokio::test]
    async fn files_are_written_atomically_and_only_when_changed() {
        let root = tempfile::tempdir().unwrap();
        let dir = ProjectDir::for_workload(root.path(), "shop").unwrap();
        let files = ProjectFiles {
            compose: "services: {}\n".into(),
            env: "A=1\n".into(),
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
