//! What the engine shows of one workload, read into an [`Observation`] the
//! plan decides from.

use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary, ContainerSummaryStateEnum,
};

use super::adopt::{Adoption, is_go_container_of};
use super::errors::DockerError;
use super::labels::Marks;
use super::observed::Listed;
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
    /// The Go agent's container of the workload, not adopted yet: to adopt
    /// or replace (`super::adopt`).
    pub(crate) go: Option<ContainerSummary>,
}

/// This agent's containers of the workload with, marked as its own, the
/// Go agent's container `adoption` records; and the Go agent's container
/// not adopted yet, if there is one.
fn with_adopted(
    listed: Listed,
    id: &str,
    adoption: Option<&Adoption>,
) -> (Vec<ContainerSummary>, Option<ContainerSummary>) {
    let Listed { mut ours, go } = listed;
    let mut candidate = None;
    for mut summary in go.into_iter().filter(|c| is_go_container_of(c, id)) {
        match adoption {
            Some(adoption) if adoption.is(&summary) => {
                adoption.mark(&mut summary);
                ours.push(summary);
            }
            // Names are unique: there is one at most.
            _ => candidate = Some(summary),
        }
    }
    (ours, candidate)
}

/// Reads the workload's containers: the listing (cached while it holds),
/// and the kept container's inspect. The container `adoption` records is
/// read as one of this agent's.
pub(crate) async fn observe(
    runtime: &Runtime<'_>,
    spec_hash: &str,
    adoption: Option<&Adoption>,
) -> Result<Observation, DockerError> {
    let (ours, go) = with_adopted(runtime.listed().await?, runtime.id(), adoption);
    let (current, stale) = partition(ours, spec_hash);
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
        go,
    })
}

/// The kept container, looked at afresh, for a failure report; none when it
/// cannot be read (a report should not fail for want of it).
pub(crate) async fn kept_afresh(
    runtime: &Runtime<'_>,
    spec_hash: &str,
    adoption: Option<&Adoption>,
) -> Option<ContainerInspectResponse> {
    let mut ours = runtime.list().await.ok()?;
    if adoption.is_some() {
        let go = runtime.list_go().await.ok()?;
        ours = with_adopted(Listed { ours, go }, runtime.id(), adoption).0;
    }
    let cid = partition(ours, spec_hash).0.into_iter().next()?.id?;
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
