//! Following the engine's `/events` as a trigger: the cycle shared by the
//! controllers that run containers on the engine (single containers and
//! compose projects).
//!
//! On connect, the trigger takes everything there is to reconcile (what
//! happened while it was away was not seen) and opens the event stream from
//! just before, so nothing in between is missed. It then follows the
//! events, turning them into workload ids. When the engine goes away
//! (restart, upgrade) it waits with back-off and connects again. What
//! differs between the controllers sits behind [`Follower`]: which events,
//! what "everything" is, and how events name workloads.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use futures::stream::{self, BoxStream};

use super::engine::Engine;
use crate::backoff::Backoff;

/// The engine's events, as followed.
pub type Events = BoxStream<'static, Result<EventMessage, EngineError>>;

/// How far back a (re)connecting stream asks the engine to replay its
/// events (from the whole second before): the overlap costs a few
/// duplicate, harmless reconciles, and nothing between the reconcile of
/// everything and the stream opening is missed.
pub const REPLAYED: Duration = Duration::from_secs(1);

/// Container actions that can change what a reconcile would find.
pub const CONTAINER_ACTIONS: &[&str] = &[
    "create",
    "start",
    "die",
    "stop",
    "kill",
    "oom",
    "pause",
    "unpause",
    "destroy",
    "rename",
    // HEALTHCHECK transitions (the engine matches `health_status: …`):
    // readiness without a readiness probe.
    "health_status",
];

/// Why a followed stream stopped.
#[derive(Debug)]
pub enum Lost {
    Failed(EngineError),
    Ended,
}

/// What one trigger makes of the engine's events.
pub trait Follower: Send + Sync + 'static {
    /// Names the trigger in log lines.
    const NAME: &'static str;

    /// The `/events` filters: the events that can change what a reconcile
    /// of this controller would find.
    fn filters(&self) -> HashMap<String, Vec<String>>;

    /// Every workload id to reconcile on a (re)connect. An error counts as
    /// a failed connect: the trigger waits and tries again.
    fn everything(
        &self,
        docker: &Docker,
    ) -> impl Future<Output = Result<Vec<String>, EngineError>> + Send;

    /// The ids to reconcile for `event`. It may read more of `events` (the
    /// burst that usually follows one), and says why the stream stopped if
    /// it did meanwhile; the ids it found are queued all the same.
    fn ids(
        &self,
        event: EventMessage,
        events: &mut Events,
    ) -> impl Future<Output = (Vec<String>, Option<Lost>)> + Send;
}

/// Where the trigger is in its connect–follow cycle.
enum State {
    /// `attempt` counts the connects that failed in a row.
    Connecting {
        attempt: u32,
    },
    Following {
        events: Events,
    },
    /// The engine is gone: connect again after a pause.
    Waiting {
        attempt: u32,
    },
}

/// The workload ids `follower` finds in the engine's events, for as long
/// as the stream is polled.
pub fn trigger<F: Follower>(
    engine: Engine,
    backoff: Backoff,
    follower: F,
) -> BoxStream<'static, String> {
    let cycle = Cycle {
        engine,
        backoff,
        follower,
    };
    stream::unfold(
        (cycle, State::Connecting { attempt: 0 }),
        |(cycle, state)| async move {
            let (ids, next) = cycle.step(state).await;
            Some((stream::iter(ids), (cycle, next)))
        },
    )
    .flatten()
    .boxed()
}

struct Cycle<F> {
    engine: Engine,
    backoff: Backoff,
    follower: F,
}

impl<F: Follower> Cycle<F> {
    async fn step(&self, state: State) -> (Vec<String>, State) {
        match state {
            State::Connecting { attempt } => match self.connect().await {
                Ok((ids, events)) => {
                    if attempt > 0 {
                        tracing::info!(
                            trigger = F::NAME,
                            workloads = ids.len(),
                            "reconnected to docker events; reconciling everything"
                        );
                    }
                    (ids, State::Following { events })
                }
                Err(error) => {
                    if attempt == 0 {
                        tracing::warn!(trigger = F::NAME, %error, "docker events unavailable; retrying");
                    } else {
                        tracing::debug!(trigger = F::NAME, %error, attempt, "docker events still unavailable");
                    }
                    (Vec::new(), State::Waiting { attempt })
                }
            },
            State::Following { mut events } => {
                let (ids, lost) = match events.next().await {
                    Some(Ok(event)) => self.follower.ids(event, &mut events).await,
                    Some(Err(error)) => (Vec::new(), Some(Lost::Failed(error))),
                    None => (Vec::new(), Some(Lost::Ended)),
                };
                match lost {
                    None => (ids, State::Following { events }),
                    Some(lost) => {
                        match lost {
                            Lost::Failed(error) => tracing::warn!(
                                trigger = F::NAME,
                                %error,
                                "docker event stream failed; reconnecting"
                            ),
                            Lost::Ended => tracing::warn!(
                                trigger = F::NAME,
                                "docker event stream ended; reconnecting"
                            ),
                        }
                        (ids, State::Waiting { attempt: 0 })
                    }
                }
            }
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
    async fn connect(&self) -> Result<(Vec<String>, Events), EngineError> {
        let docker = self.engine.client().await?;
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(REPLAYED.as_secs()))
            .unwrap_or(0);
        let ids = self.follower.everything(&docker).await?;
        let events = docker
            .events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(self.follower.filters()),
            }))
            .boxed();
        Ok((ids, events))
    }
}
