//! The engine's `/events` as a trigger: workload ids to reconcile when a
//! container of one of their projects changes.
//!
//! Compose labels each container with its project; the project names the
//! workload (through the informer cache, or the project folders on disk for
//! one whose workload is gone). When the engine goes away the stream
//! reconnects with back-off, and on every (re)connect it yields every
//! compose workload and every project folder, since whatever happened while
//! it was away was not seen.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use bollard::errors::Error as EngineError;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use persys_api::v1::WorkloadType;

use super::naming;
use super::observe::PROJECT_LABEL;
use super::project::{ProjectIndex, scan};
use crate::backoff::Backoff;
use crate::docker::Engine;
use crate::informer::Cache;

/// Container actions that can change what a reconcile would find.
const ACTIONS: &[&str] = &[
    "create", "start", "die", "stop", "kill", "oom", "pause", "unpause", "destroy", "rename",
];

/// How long after an event the workloads it names are queued. The engine
/// publishes a container's `die` before its list shows it exited (seen
/// here: a list 100 ms after the event still said running), and a reconcile
/// that looks too early finds nothing to do.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest a burst of events holds back the first of them.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the trigger is in its connect–follow cycle.
enum State {
    /// Scan the project folders, then open the event stream from just
    /// before, so nothing in between is missed. `attempt` counts the
    /// connects that failed in a row.
    Connecting { attempt: u32 },
    /// Following the engine's events.
    Following {
        events: BoxStream<'static, Result<EventMessage, EngineError>>,
    },
    /// The engine is gone: reconnect after a pause.
    Waiting { attempt: u32 },
}

/// Builds the trigger stream; see [`super::ComposeController::trigger`].
pub struct EventTrigger {
    pub engine: Engine,
    /// The compose workloads, and the projects they run.
    pub cache: Cache,
    /// Project folders on disk, refreshed on every (re)connect.
    pub index: ProjectIndex,
    pub project_root: PathBuf,
    pub backoff: Backoff,
}

impl EventTrigger {
    pub fn into_stream(self) -> BoxStream<'static, String> {
        stream::unfold(
            (self, State::Connecting { attempt: 0 }),
            |(trigger, state)| async move {
                let (ids, next) = trigger.step(state).await;
                Some((stream::iter(ids), (trigger, next)))
            },
        )
        .flatten()
        .boxed()
    }

    async fn step(&self, state: State) -> (Vec<String>, State) {
        match state {
            State::Connecting { attempt } => match self.connect().await {
                Ok((ids, events)) => {
                    if attempt > 0 {
                        tracing::info!(
                            workloads = ids.len(),
                            "reconnected to docker events; reconciling every compose project"
                        );
                    }
                    (ids, State::Following { events })
                }
                Err(error) => {
                    if attempt == 0 {
                        tracing::warn!(%error, "docker events unavailable to compose; retrying");
                    } else {
                        tracing::debug!(%error, attempt, "docker events still unavailable");
                    }
                    (Vec::new(), State::Waiting { attempt })
                }
            },
            State::Following { mut events } => match events.next().await {
                Some(Ok(event)) => {
                    let mut ids = BTreeSet::new();
                    ids.extend(self.id_of(&event));
                    // The engine publishes `die` a moment before a list
                    // shows the container as exited: let it settle, and
                    // take the burst that usually follows along.
                    let first = tokio::time::Instant::now();
                    let mut settled = first + SETTLE;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(settled) => break,
                            next = events.next() => match next {
                                Some(Ok(event)) => {
                                    ids.extend(self.id_of(&event));
                                    // Settle after the last event of a
                                    // burst, but never hold one back long.
                                    settled = (tokio::time::Instant::now() + SETTLE)
                                        .min(first + MAX_HOLD);
                                }
                                Some(Err(error)) => {
                                    tracing::warn!(%error, "docker event stream failed; reconnecting");
                                    return (ids.into_iter().collect(), State::Waiting { attempt: 0 });
                                }
                                None => {
                                    tracing::warn!("docker event stream ended; reconnecting");
                                    return (ids.into_iter().collect(), State::Waiting { attempt: 0 });
                                }
                            },
                        }
                    }
                    (ids.into_iter().collect(), State::Following { events })
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "docker event stream failed; reconnecting");
                    (Vec::new(), State::Waiting { attempt: 0 })
                }
                None => {
                    tracing::warn!("docker event stream ended; reconnecting");
                    (Vec::new(), State::Waiting { attempt: 0 })
                }
            },
            State::Waiting { attempt } => {
                tokio::time::sleep(self.backoff.delay(attempt)).await;
                (
                    Vec::new(),
                    State::Connecting {
                        attempt: attempt.saturating_add(1),
                    },
                )
            }
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

    /// Everything to reconcile now, and the events from here on.
    async fn connect(
        &self,
    ) -> Result<
        (
            Vec<String>,
            BoxStream<'static, Result<EventMessage, EngineError>>,
        ),
        EngineError,
    > {
        let docker = self.engine.client().await?;
        // The engine replays its recent events from `since`; a second of
        // overlap costs a few duplicate (harmless) reconciles.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or(0);
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
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![PROJECT_LABEL.to_string()]),
            (
                "event".to_string(),
                ACTIONS.iter().map(|a| a.to_string()).collect(),
            ),
        ]);
        let events = docker
            .events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(filters),
            }))
            .boxed();
        Ok((ids.into_iter().collect(), events))
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
