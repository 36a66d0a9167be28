//! What the engine shows of one workload, read into an [`Observation`] the
//! plan decides from.

use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary, ContainerSummaryStateEnum,
};

use super::errors::DockerError;
use super::labels::Marks;
use super::runtime::Runtime;

/// One workload's containers as the engine shows them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// The container of the current spec the workload keeps, as inspected:
    /// the running one, else the newest.
    pub(crate) kept: Option<ContainerInspectResponse>,
    /// Further containers of the current spec: a workload runs one.
    pub(crate) duplicates: Vec<String>,
    /// Containers of an older spec, to be replaced.
    pub(crate) stale: Vec<ContainerSummary>,
    /// Whether the engine has the spec's image. Read only when a create
    /// needs to know (`Plan::LookForImage`): none until then.
    pub(crate) image_present: Option<bool>,
    /// The kept container runs and its liveness probe failed beyond its
    /// threshold: the probe's output. Read from the prober, not the
    /// engine.
    pub(crate) unhealthy: Option<String>,
}

/// Reads the workload's containers: the listing (cached while it holds),
/// and the kept container's inspect.
pub(crate) async fn observe(
    runtime: &Runtime<'_>,
    spec_hash: &str,
) -> Result<Observation, DockerError> {
    let (current, stale) = partition(runtime.listed().await?, spec_hash);
    let mut current = current.into_iter();
    let keep = current.next();
    let duplicates = current.filter_map(|c| c.id).collect();
    let kept = match &keep {
        Some(summary) => runtime.inspect_listed(summary).await?,
        None => None,
    };
    Ok(Observation {
        kept,
        duplicates,
        stale,
        image_present: None,
        unhealthy: None,
    })
}

/// The kept container, looked at afresh, for a failure report; none when it
/// cannot be read (a report should not fail for want of it).
pub(crate) async fn kept_afresh(
    runtime: &Runtime<'_>,
    spec_hash: &str,
) -> Option<ContainerInspectResponse> {
    let found = runtime.list().await.ok()?;
    let cid = partition(found, spec_hash).0.into_iter().next()?.id?;
    runtime.inspect(&cid).await.ok().flatten()
}

pub(crate) fn state_of(container: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
    container.state.as_ref().and_then(|s| s.status)
}

/// The container's name for events: its name, else its short id.
pub(crate) fn display_name(container: &ContainerInspectResponse) -> String {
    container
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_string())
        .or_else(|| {
            container
                .id
                .as_ref()
                .map(|id| id.chars().take(12).collect())
        })
        .unwrap_or_default()
}

/// Splits a workload's containers into those of the current spec (newest
/// first; running ones before others) and those of an older spec.
fn partition(
    containers: Vec<ContainerSummary>,
    spec_hash: &str,
) -> (Vec<ContainerSummary>, Vec<ContainerSummary>) {
    let (mut current, stale): (Vec<_>, Vec<_>) = containers
        .into_iter()
        .partition(|c| Marks::read(c.labels.as_ref()).spec_hash.as_deref() == Some(spec_hash));
    current.sort_by_key(|c| {
        let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
        (
            std::cmp::Reverse(running),
            std::cmp::Reverse(c.created.unwrap_or(0)),
        )
    });
    (current, stale)
}

#[cfg(test)]
mod tests {
    use super::super::labels;
    use super::*;
    use std::collections::HashMap;

    fn summary(
        id: &str,
        hash: &str,
        created: i64,
        state: ContainerSummaryStateEnum,
    ) -> ContainerSummary {
        ContainerSummary {
            id: Some(id.into()),
            created: Some(created),
            state: Some(state),
            labels: Some(HashMap::from([
                (labels::MANAGED.to_string(), "true".to_string()),
                (labels::SPEC_HASH.to_string(), hash.to_string()),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn partition_prefers_the_running_then_newest_container_of_the_current_spec() {
        let (current, stale) = partition(
            vec![
                summary("old-spec", "h0", 5, ContainerSummaryStateEnum::RUNNING),
                summary("exited-new", "h1", 4, ContainerSummaryStateEnum::EXITED),
                summary("running", "h1", 3, ContainerSummaryStateEnum::RUNNING),
                summary("exited-old", "h1", 1, ContainerSummaryStateEnum::EXITED),
            ],
            "h1",
        );
        let ids: Vec<_> = current.iter().map(|c| c.id.clone().unwrap()).collect();
        assert_eq!(ids, ["running", "exited-new", "exited-old"]);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].id.as_deref(), Some("old-spec"));
    }
}
