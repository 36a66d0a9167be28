//! The engine's `/events` as a trigger: workload ids to reconcile.
//!
//! Drift is repaired because of these events, within about a second — not by
//! the resync. When the engine goes away (restart, upgrade) the stream
//! reconnects with back-off, and on every (re)connect it yields every
//! container workload and every managed container, since whatever happened
//! while it was away was not seen.

use std::collections::{BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use bollard::errors::Error as EngineError;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use persys_api::v1::WorkloadType;

use super::container;
use super::engine::Engine;
use super::labels;
use crate::backoff::Backoff;
use crate::informer::Cache;

/// Container actions that can change what a reconcile would find.
const ACTIONS: &[&str] = &[
    "create", "start", "die", "stop", "kill", "oom", "pause", "unpause", "destroy", "rename",
];

/// Where the trigger is in its connect–follow cycle.
enum State {
    /// List every managed container and open the event stream from just
    /// before the list, so nothing between the two is missed.
    /// `attempt` counts the connects that failed in a row.
    Connecting { attempt: u32 },
    /// Following the engine's events.
    Following {
        events: BoxStream<'static, Result<EventMessage, EngineError>>,
    },
    /// The engine is gone: reconnect after a pause.
    Waiting { attempt: u32 },
}

/// Builds the trigger stream; see [`super::DockerController::trigger`].
pub struct EventTrigger {
    pub engine: Engine,
    pub scope: String,
    /// Ids of the container workloads, all queued on (re)connect.
    pub cache: Cache,
    pub backoff: Backoff,
    /// Invalidated by every event and reconnect: what was observed before
    /// may no longer hold.
    pub observed: std::sync::Arc<super::observed::Observed>,
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
                    self.observed.invalidate();
                    if attempt > 0 {
                        tracing::info!(
                            workloads = ids.len(),
                            "reconnected to docker events; reconciling everything"
                        );
                    }
                    (ids, State::Following { events })
                }
                Err(error) => {
                    if attempt == 0 {
                        tracing::warn!(%error, "docker events unavailable; retrying");
                    } else {
                        tracing::debug!(%error, attempt, "docker events still unavailable");
                    }
                    (Vec::new(), State::Waiting { attempt })
                }
            },
            State::Following { mut events } => match events.next().await {
                Some(Ok(event)) => {
                    // Before the id is queued, so its reconcile looks afresh.
                    self.observed.invalidate();
                    let id = workload_of(&event);
                    (id.into_iter().collect(), State::Following { events })
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
        let managed = container::list(&docker, &self.scope, None).await?;
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
        let mut filters: HashMap<String, Vec<String>> = labels::filter(&self.scope, None);
        filters.insert("type".into(), vec!["container".into()]);
        filters.insert(
            "event".into(),
            ACTIONS.iter().map(|a| a.to_string()).collect(),
        );
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

/// The workload a container event concerns, from the container's labels
/// (the engine copies them into the event's attributes).
fn workload_of(event: &EventMessage) -> Option<String> {
    let attributes = event.actor.as_ref()?.attributes.as_ref()?;
    labels::Marks::read(Some(attributes)).workload_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

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
            workload_of(&event(&[
                (labels::MANAGED, "true"),
                (labels::WORKLOAD_ID, "web"),
                ("exitCode", "137"),
            ]))
            .as_deref(),
            Some("web")
        );
        assert_eq!(workload_of(&event(&[(labels::WORKLOAD_ID, "web")])), None);
    }
}
