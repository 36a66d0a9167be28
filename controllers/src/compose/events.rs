//! The engine's `/events` as a trigger: workload ids to reconcile when a
//! container of one of their projects changes.
//!
//! Compose labels each container with its project; the project names the
//! workload (through the informer cache, or the project folders on disk for
//! one whose workload is gone). The connect–follow cycle is
//! [`crate::docker::follow`]'s; on every (re)connect this yields every
//! compose workload and every project folder, since whatever happened while
//! the engine was away was not seen.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::EventMessage;
use futures::StreamExt;
use persys_api::v1::WorkloadType;

use super::naming;
use super::observe::{Exits, PROJECT_LABEL};
use super::project::{ProjectIndex, scan};
use crate::docker::follow::{CONTAINER_ACTIONS, Events, Follower, Lost};
use crate::informer::Cache;

/// How long after an event the workloads it names are queued, so a burst
/// of events wakes each workload once. The engine also publishes a
/// container's `die` before its list shows it exited (seen here: a list
/// 100 ms after the event still said running): the wait lets the list
/// catch up most of the time, and [`Exits`] makes the observation inspect
/// a died container the list still shows running, however long the lag.
const SETTLE: Duration = Duration::from_millis(250);

/// The longest a burst of events holds back the first of them.
const MAX_HOLD: Duration = Duration::from_secs(1);

/// The compose controller's view of the engine's events; see
/// [`super::ComposeController::trigger`].
pub struct ProjectEvents {
    /// The compose workloads, and the projects they run.
    pub cache: Cache,
    /// Project folders on disk, refreshed on every (re)connect.
    pub index: ProjectIndex,
    pub project_root: PathBuf,
    /// Where each `die` and `start` is recorded for the observations.
    pub(crate) exits: Exits,
}

impl Follower for ProjectEvents {
    const NAME: &'static str = "compose";

    fn filters(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![PROJECT_LABEL.to_string()]),
            (
                "event".to_string(),
                CONTAINER_ACTIONS.iter().map(|a| a.to_string()).collect(),
            ),
        ])
    }

    /// Every compose workload and every project folder.
    async fn everything(&self, _: &Docker) -> Result<Vec<String>, EngineError> {
        let mut ids: BTreeSet<String> = self
            .cache
            .ids_of_type(WorkloadType::Compose)
            .into_iter()
            .collect();
        match scan(&self.project_root).await {
            Ok(found) => {
                self.index.replace(&found);
                ids.extend(found.into_iter().map(|(id, _)| id));
            }
            Err(error) => {
                tracing::warn!(%error, root = %self.project_root.display(), "cannot read the compose project folders");
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// The engine publishes `die` a moment before a list shows the
    /// container as exited: the ids wait for it to settle, and take the
    /// burst that usually follows along.
    async fn ids(&self, event: EventMessage, events: &mut Events) -> (Vec<String>, Option<Lost>) {
        let mut ids = BTreeSet::new();
        self.record(&event);
        ids.extend(self.id_of(&event));
        let first = tokio::time::Instant::now();
        let mut settled = first + SETTLE;
        let lost = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(settled) => break None,
                next = events.next() => match next {
                    Some(Ok(event)) => {
                        self.record(&event);
                        ids.extend(self.id_of(&event));
                        // Settle after the last event of a burst, but
                        // never hold one back long.
                        settled = (tokio::time::Instant::now() + SETTLE).min(first + MAX_HOLD);
                    }
                    Some(Err(error)) => break Some(Lost::Failed(error)),
                    None => break Some(Lost::Ended),
                },
            }
        };
        (ids.into_iter().collect(), lost)
    }
}

impl ProjectEvents {
    /// A container's `die` or `start`, for the observations that follow.
    fn record(&self, event: &EventMessage) {
        if let (Some(action), Some(cid)) = (
            event.action.as_deref(),
            event.actor.as_ref().and_then(|a| a.id.as_deref()),
        ) {
            self.exits.record(action, cid);
        }
    }

    fn id_of(&self, event: &EventMessage) -> Option<String> {
        project_of(event).and_then(|p| self.workload_of(p))
    }

    /// The workload running `project`: the cache's owner of the name, else
    /// the folder left on disk by one that is gone.
    fn workload_of(&self, project: &str) -> Option<String> {
        let workloads = self.cache.list_type(WorkloadType::Compose);
        naming::owner(project, &workloads)
            .map(|w| w.id().to_string())
            .or_else(|| self.index.workload_of(project))
    }
}

/// The compose project a container event concerns (the engine copies the
/// container's labels into the event's attributes).
fn project_of(event: &EventMessage) -> Option<&str> {
    event
        .actor
        .as_ref()?
        .attributes
        .as_ref()?
        .get(PROJECT_LABEL)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    #[test]
    fn events_name_their_project_by_label() {
        let event = EventMessage {
            action: Some("die".into()),
            actor: Some(EventActor {
                id: Some("c0ffee".into()),
                attributes: Some(HashMap::from([
                    (PROJECT_LABEL.to_string(), "shop".to_string()),
                    ("exitCode".to_string(), "137".to_string()),
                ])),
            }),
            ..Default::default()
        };
        assert_eq!(project_of(&event), Some("shop"));
        assert_eq!(project_of(&EventMessage::default()), None);
    }
}
