//! Taking over the compose projects the Go agent left running.
//!
//! The Go agent wrote a workload's `docker-compose.yml` and `.env` to
//! `/var/lib/persys/compose/<id>/` and ran `docker-compose -p <id> up -d`
//! there, ignoring the spec's `project_name`: its containers carry
//! `com.docker.compose.project=<id>` (as compose normalises the name) and
//! none of this agent's labels. For a compose workload in the store whose
//! Go folder is there, that project is the workload's: it runs under the
//! Go agent's project name from then on, so compose finds its own
//! containers.
//!
//! When the Go agent's files say what the spec says (the compose file as
//! YAML, `.env` as variables), the project is adopted as it runs: no `up`,
//! no recreate; the spec is recorded as brought up, and the containers keep
//! the restart policy the engine has for them until a later `up` (a new
//! spec, a repair) recreates them with this agent's override. Otherwise the
//! next `up`, from the spec, replaces what differs, once. The adoption is
//! recorded in the workload's project folder ([`ADOPTED_FILE`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::naming::is_valid_project_name;
use super::project::{COMPOSE_FILE, ENV_FILE, ProjectDir};

/// In the workload's project folder: the Go agent's project name, which
/// the workload keeps.
pub const ADOPTED_FILE: &str = ".persys-adopted";

/// The project name compose (v1) made of the Go agent's `-p <id>`: in
/// lowercase, without the characters a project name cannot have.
pub fn go_project_name(id: &str) -> String {
    id.to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
        .collect()
}

/// The Go agent's project of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoProject {
    /// The project name it runs under.
    pub(crate) name: String,
    /// The Go agent's folder (`<go root>/<id>`); it may be gone once
    /// adopted.
    pub(crate) dir: Option<PathBuf>,
    /// Already adopted: the workload's folder records it.
    pub(crate) adopted: bool,
}

/// The Go agent's project of workload `id`: the one the workload's folder
/// `dir` records as adopted, else the one whose folder is under `go_root`
/// (a `docker-compose.yml` in `<go_root>/<id>/`). Blocking (file reads).
pub(crate) fn find(dir: &ProjectDir, go_root: Option<&Path>, id: &str) -> Option<GoProject> {
    let go_dir = go_root.map(|root| root.join(id));
    if let Ok(recorded) = std::fs::read_to_string(dir.path().join(ADOPTED_FILE)) {
        let name = recorded.trim().to_string();
        if is_valid_project_name(&name) {
            return Some(GoProject {
                name,
                dir: go_dir,
                adopted: true,
            });
        }
    }
    let go_dir = go_dir?;
    let name = go_project_name(id);
    (go_dir.join(COMPOSE_FILE).is_file() && is_valid_project_name(&name)).then_some(GoProject {
        name,
        dir: Some(go_dir),
        adopted: false,
    })
}

/// Variables of a `.env` as the Go agent wrote it (`KEY=value` lines).
fn env_file_variables(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .collect()
}

/// The first way the Go agent's files in `go_dir` differ from the spec's
/// compose file `compose` and variables `env`; none when they say the
/// same. Values are never named: they may be secrets. Blocking.
pub(crate) fn difference(
    go_dir: &Path,
    compose: &str,
    env: &BTreeMap<String, String>,
) -> Option<String> {
    let file = go_dir.join(COMPOSE_FILE);
    let theirs = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(error) => return Some(format!("{COMPOSE_FILE}: unreadable ({error})")),
    };
    let parsed = |text: &str| serde_yaml_ng::from_str::<Value>(text).ok();
    if parsed(&theirs).is_none() || parsed(&theirs) != parsed(compose) {
        return Some(format!(
            "{COMPOSE_FILE}: the Go agent's file differs from the spec's compose_yaml"
        ));
    }
    let env_text = std::fs::read_to_string(go_dir.join(ENV_FILE)).unwrap_or_default();
    let theirs = env_file_variables(&env_text);
    let ours: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if let Some(key) = theirs
        .iter()
        .find(|(k, v)| ours.get(*k) != Some(*v))
        .map(|(k, _)| *k)
        .or_else(|| ours.keys().find(|k| !theirs.contains_key(*k)).copied())
    {
        return Some(format!("{ENV_FILE}: {key} differs from the spec's env"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_project_name_is_compose_v1s_normalisation_of_the_id() {
        assert_eq!(go_project_name("Shop.Front_1"), "shopfront_1");
        assert_eq!(go_project_name("web-1"), "web-1");
    }

    #[test]
    fn only_a_go_folder_with_a_compose_file_or_a_recorded_adoption_is_found() {
        let root = tempfile::tempdir().unwrap();
        let go_root = root.path().join("go");
        let dir = ProjectDir::for_workload(&root.path().join("ours"), "web").unwrap();
        assert_eq!(find(&dir, Some(&go_root), "web"), None);
        std::fs::create_dir_all(go_root.join("web")).unwrap();
        assert_eq!(find(&dir, Some(&go_root), "web"), None, "no compose file");
        std::fs::write(go_root.join("web").join(COMPOSE_FILE), "services: {}\n").unwrap();
        let found = find(&dir, Some(&go_root), "web").unwrap();
        assert_eq!((found.name.as_str(), found.adopted), ("web", false));
        assert_eq!(find(&dir, None, "web"), None, "no Go root, no Go project");
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join(ADOPTED_FILE), "web\n").unwrap();
        assert!(find(&dir, None, "web").unwrap().adopted);
    }

    #[test]
    fn the_go_files_are_compared_as_yaml_and_variables_without_values() {
        let root = tempfile::tempdir().unwrap();
        let go = root.path();
        std::fs::write(
            go.join(COMPOSE_FILE),
            "services:\n  web:\n    image: app:1\n",
        )
        .unwrap();
        std::fs::write(go.join(ENV_FILE), "A=1\nTOKEN=s3cret").unwrap();
        let env = BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("TOKEN".to_string(), "s3cret".to_string()),
        ]);
        let same = "services: {web: {image: 'app:1'}}";
        assert_eq!(difference(go, same, &env), None);
        let other = "services: {web: {image: 'app:2'}}";
        assert!(
            difference(go, other, &env)
                .unwrap()
                .starts_with(COMPOSE_FILE)
        );
        let mut changed = env.clone();
        changed.insert("TOKEN".into(), "other".into());
        let found = difference(go, same, &changed).unwrap();
        assert!(
            found.starts_with(".env: TOKEN") && !found.contains("s3cret"),
            "{found}"
        );
        changed.remove("TOKEN");
        assert!(difference(go, same, &changed).is_some());
    }
}
