//! The engine's `/events` as the Docker controller's trigger: workload ids
//! to reconcile.
//!
//! Drift is repaired because of these events, within about a second — not by
//! the resync. The connect–follow cycle is [`super::follow`]'s; on every
//! (re)connect this yields every container workload and every managed
//! container, since whatever happened while the engine was away was not
//! seen.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::EventMessage;
use persys_api::v1::WorkloadType;

use super::adopt;
use super::container;
use super::follow::{CONTAINER_ACTIONS, Events, Follower, Lost};
use super::labels;
use super::observed::{Observed, Whose};
use crate::informer::Cache;

/// The Docker controller's view of the engine's events; see
/// [`super::DockerController::trigger`].
pub struct ContainerEvents {
    pub scope: String,
    /// Ids of the container workloads, all queued on (re)connect.
    pub cache: Cache,
    /// Invalidated by every event and reconnect: what was observed before
    /// may no longer hold.
    pub observed: Arc<Observed>,
}

impl Follower for ContainerEvents {
    const NAME: &'static str = "containers";

    /// Every managed container's events: the Go agent's containers carry
    /// no scope; `workload_of` keeps the ones of this scope and the Go
    /// agent's.
    fn filters(&self) -> HashMap<String, Vec<String>> {
        let mut filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}=true", labels::MANAGED)],
        )]);
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert(
            "event".into(),
            CONTAINER_ACTIONS.iter().map(|a| a.to_string()).collect(),
        );
        filters
    }

    /// Every container workload and every managed container.
    async fn everything(&self, docker: &Docker) -> Result<Vec<String>, EngineError> {
        let managed = container::list(docker, &self.scope, None).await?;
        let mut ids: BTreeSet<String> = self
            .cache
            .ids_of_type(WorkloadType::Container)
            .into_iter()
            .collect();
        ids.extend(
            managed
                .iter()
                .filter_map(|c| labels::Marks::read(c.labels.as_ref()).workload_id),
        );
        self.observed.invalidate();
        Ok(ids.into_iter().collect())
    }

    async fn ids(&self, event: EventMessage, _: &mut Events) -> (Vec<String>, Option<Lost>) {
        let Some((id, whose)) = workload_of(&event, &self.scope) else {
            // Another scope's container: nothing of ours changed.
            return (Vec::new(), None);
        };
        let action = event.action.as_deref().unwrap_or_default();
        if self.observed.take_expected(&id, action) {
            // The controller's own create or start, which the reconcile
            // that made it has seen already.
            return (Vec::new(), None);
        }
        // Before the id is queued, so its reconcile looks afresh.
        self.observed.invalidate_workload(&id, whose);
        (vec![id], None)
    }
}

/// The workload a container event concerns, from the container's labels
/// (the engine copies them into the event's attributes): a container of
/// `scope`, or the Go agent's (whose workload, if stored, adopts it).
fn workload_of(event: &EventMessage, scope: &str) -> Option<(String, Whose)> {
    let attributes = event.actor.as_ref()?.attributes.as_ref()?;
    if attributes.get(labels::SCOPE).map(String::as_str) == Some(scope) {
        let id = labels::Marks::read(Some(attributes)).workload_id?;
        return Some((id, Whose::Ours));
    }
    adopt::go_owner(Some(attributes)).map(|id| (id.to_string(), Whose::Any))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    #[tokio::test]
    async fn the_controllers_own_start_wakes_nothing_and_a_die_that_follows_does() {
        let observed = Arc::new(Observed::default());
        let trigger = ContainerEvents {
            scope: "s".into(),
            cache: Cache::default(),
            observed: observed.clone(),
        };
        let event = |action: &str| EventMessage {
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some("c0ffee".into()),
                attributes: Some(HashMap::from([
                    (labels::MANAGED.to_string(), "true".to_string()),
                    (labels::WORKLOAD_ID.to_string(), "web".to_string()),
                    (labels::SCOPE.to_string(), "s".to_string()),
                ])),
            }),
            ..Default::default()
        };
        let mut events: Events = Box::pin(futures::stream::empty());
        observed.expect("web", "start");
        let (ids, _) = trigger.ids(event("start"), &mut events).await;
        assert!(ids.is_empty(), "its own start: {ids:?}");
        let (ids, _) = trigger.ids(event("die"), &mut events).await;
        assert_eq!(ids, ["web"]);
        // A start nobody announced (a hand-made `docker start`) is seen.
        let (ids, _) = trigger.ids(event("start"), &mut events).await;
        assert_eq!(ids, ["web"]);
    }

    #[test]
    fn events_name_their_workload_by_label() {
        let event = |attributes: &[(&str, &str)]| EventMessage {
            action: Some("die".into()),
            actor: Some(EventActor {
                id: Some("c0ffee".into()),
                attributes: Some(
                    attributes
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        };
        assert_eq!(
            workload_of(
                &event(&[
                    (labels::MANAGED, "true"),
                    (labels::WORKLOAD_ID, "web"),
                    (labels::SCOPE, "s"),
                    ("exitCode", "137"),
                ]),
                "s"
            ),
            Some(("web".to_string(), Whose::Ours))
        );
        assert_eq!(
            workload_of(
                &event(&[(labels::WORKLOAD_ID, "web"), (labels::SCOPE, "s")]),
                "s"
            ),
            None
        );
        let other_scope = event(&[
            (labels::MANAGED, "true"),
            (labels::WORKLOAD_ID, "web"),
            (labels::SCOPE, "t"),
        ]);
        assert_eq!(workload_of(&other_scope, "s"), None);
        let go = event(&[(labels::MANAGED, "true"), (adopt::GO_WORKLOAD_ID, "web")]);
        assert_eq!(workload_of(&go, "s"), Some(("web".to_string(), Whose::Any)));
    }
}
