//! The marks the agent puts on what it creates, and reads back to adopt it.

use std::collections::HashMap;

use persys_api::v1::Workload;
use sha2::{Digest, Sha256};

use super::validate::is_docker_name;

/// Label keys starting with this are the agent's; specs may not set them.
pub const RESERVED_PREFIX: &str = "persys.";

/// `"true"` on every container and volume the agent manages.
pub const MANAGED: &str = "persys.managed";
/// The workload the object belongs to.
pub const WORKLOAD_ID: &str = "persys.workload-id";
/// The workload's revision when the object was created.
pub const REVISION: &str = "persys.revision";
/// Hash of the workload spec the object was created from; a different hash
/// means the object is replaced.
pub const SPEC_HASH: &str = "persys.spec-hash";
/// The workload's generation when the object was created.
pub const GENERATION: &str = "persys.generation";
/// Which agent manages the object, so agents (or test runs) sharing one
/// engine never adopt or collect each other's containers.
pub const SCOPE: &str = "persys.scope";
/// On a managed volume: `"true"` keeps it when its workload is deleted.
pub const RETAIN: &str = "persys.retain";

/// The labels of a container created for `workload` in `scope`.
pub fn for_workload(workload: &Workload, scope: &str) -> HashMap<String, String> {
    HashMap::from([
        (MANAGED.to_string(), "true".to_string()),
        (WORKLOAD_ID.to_string(), workload.id().to_string()),
        (REVISION.to_string(), workload.revision_id().to_string()),
        (SPEC_HASH.to_string(), workload.spec_hash()),
        (GENERATION.to_string(), workload.generation().to_string()),
        (SCOPE.to_string(), scope.to_string()),
    ])
}

/// The engine-side filter selecting the managed objects of one scope,
/// optionally of one workload.
pub fn filter(scope: &str, workload_id: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut labels = vec![format!("{MANAGED}=true"), format!("{SCOPE}={scope}")];
    if let Some(id) = workload_id {
        labels.push(format!("{WORKLOAD_ID}={id}"));
    }
    HashMap::from([("label".to_string(), labels)])
}

/// What the labels of an existing object say about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    pub workload_id: Option<String>,
    pub spec_hash: Option<String>,
    pub revision: Option<String>,
    pub generation: Option<i64>,
}

impl Marks {
    pub fn read(labels: Option<&HashMap<String, String>>) -> Marks {
        let Some(labels) = labels else {
            return Marks::default();
        };
        if labels.get(MANAGED).map(String::as_str) != Some("true") {
            return Marks::default();
        }
        Marks {
            workload_id: labels.get(WORKLOAD_ID).cloned(),
            spec_hash: labels.get(SPEC_HASH).cloned(),
            revision: labels.get(REVISION).cloned(),
            generation: labels.get(GENERATION).and_then(|g| g.parse().ok()),
        }
    }
}

/// The container name of a workload: its id when that is a valid Docker
/// name, so `docker logs <id>` works; otherwise a cleaned-up id with a hash
/// suffix, so distinct ids never share a name.
pub fn container_name(workload_id: &str) -> String {
    if workload_id.len() >= 2 && workload_id.len() <= 200 && is_docker_name(workload_id) {
        return workload_id.to_string();
    }
    let mut clean: String = workload_id
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !clean.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        clean.insert(0, 'w');
    }
    let digest = Sha256::digest(workload_id.as_bytes());
    let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{clean}-{suffix}")
}

/// The Docker volume backing a managed volume of a workload.
pub fn volume_name(workload_id: &str, volume: &str) -> String {
    format!("persys-{}-{volume}", container_name(workload_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_their_own_container_names() {
        assert_eq!(container_name("web-1"), "web-1");
        assert_eq!(container_name("a.b_c"), "a.b_c");
    }

    #[test]
    fn other_ids_get_distinct_valid_names() {
        let a = container_name("team/web");
        let b = container_name("team:web");
        assert_ne!(a, b);
        assert!(is_docker_name(&a) && is_docker_name(&b), "{a} {b}");
        let short = container_name("x");
        assert!(short.len() >= 2 && is_docker_name(&short));
        assert!(is_docker_name(&container_name("-lead")));
    }

    #[test]
    fn marks_are_read_only_from_managed_objects() {
        let labels = HashMap::from([
            (MANAGED.to_string(), "true".to_string()),
            (WORKLOAD_ID.to_string(), "w".to_string()),
            (GENERATION.to_string(), "4".to_string()),
        ]);
        let marks = Marks::read(Some(&labels));
        assert_eq!(marks.workload_id.as_deref(), Some("w"));
        assert_eq!(marks.generation, Some(4));
        let mut unmanaged = labels.clone();
        unmanaged.remove(MANAGED);
        assert_eq!(Marks::read(Some(&unmanaged)), Marks::default());
    }
}
