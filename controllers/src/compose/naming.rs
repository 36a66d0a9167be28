//! Project names: the spec's `project_name`, else one derived from the
//! workload id; and which workload owns a name when two ask for the same.

use std::sync::Arc;

use persys_api::v1::{Workload, workload_spec};

/// The project name of a workload without an explicit one: its id in
/// lowercase, every character outside `[a-z0-9_-]` replaced by `-`,
/// starting with a letter or digit.
pub fn derive_project_name(id: &str) -> String {
    let mut name: String = id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        name.insert(0, 'p');
    }
    name
}

/// Compose's project-name rule (the API server checks it at apply).
pub fn is_valid_project_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The project a compose workload runs as; none for another kind of spec.
pub fn project_name_of(workload: &Workload) -> Option<String> {
    match workload.workload_spec()? {
        workload_spec::Spec::Compose(spec) if !spec.project_name.is_empty() => {
            Some(spec.project_name.clone())
        }
        workload_spec::Spec::Compose(_) => Some(derive_project_name(workload.id())),
        _ => None,
    }
}

/// The workload that runs `project` when several ask for it: one not being
/// deleted, then the oldest, then the smallest id. The others fail rather
/// than fight over the same containers (`Web` and `web` derive the same
/// name; two specs may name the same project).
pub fn owner<'a>(project: &str, workloads: &'a [Arc<Workload>]) -> Option<&'a Arc<Workload>> {
    workloads
        .iter()
        .filter(|w| project_name_of(w).as_deref() == Some(project))
        .min_by_key(|w| {
            let created = w.metadata.as_ref().map(|m| m.created_at_ms).unwrap_or(0);
            (w.is_deleting(), created, w.id().to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::{ComposeSpec, ObjectMeta, ObjectSpec, WorkloadSpec};

    fn compose(id: &str, project: &str, created: i64, deleting: bool) -> Arc<Workload> {
        Arc::new(Workload {
            metadata: Some(ObjectMeta {
                id: id.into(),
                created_at_ms: created,
                deletion_timestamp_ms: if deleting { 1 } else { 0 },
                ..Default::default()
            }),
            spec: Some(ObjectSpec {
                workload: Some(WorkloadSpec {
                    spec: Some(workload_spec::Spec::Compose(ComposeSpec {
                        project_name: project.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            status: None,
        })
    }

    #[test]
    fn derived_project_names_follow_compose_rules() {
        assert_eq!(derive_project_name("shop"), "shop");
        assert_eq!(derive_project_name("Shop.Front_1"), "shop-front_1");
        assert_eq!(derive_project_name("-x"), "p-x");
        for id in ["A.b", "web-1", "9lives", "x"] {
            assert!(is_valid_project_name(&derive_project_name(id)), "{id}");
        }
        assert!(!is_valid_project_name("Shop"));
        assert!(!is_valid_project_name("_x"));
        assert!(!is_valid_project_name(""));
    }

    #[test]
    fn an_explicit_name_wins_over_the_id() {
        assert_eq!(
            project_name_of(&compose("Web.1", "", 0, false)).as_deref(),
            Some("web-1")
        );
        assert_eq!(
            project_name_of(&compose("web", "shop", 0, false)).as_deref(),
            Some("shop")
        );
    }

    #[test]
    fn the_oldest_live_workload_owns_a_contested_name() {
        let all = vec![
            compose("b", "shop", 1, false),
            compose("a", "shop", 2, false),
            compose("old", "shop", 0, true),
            compose("c", "other", 0, false),
        ];
        assert_eq!(owner("shop", &all).map(|w| w.id()), Some("b"));
        assert_eq!(owner("other", &all).map(|w| w.id()), Some("c"));
        assert!(owner("none", &all).is_none());
        let only_deleting = vec![compose("old", "shop", 0, true)];
        assert_eq!(owner("shop", &only_deleting).map(|w| w.id()), Some("old"));
    }
}
