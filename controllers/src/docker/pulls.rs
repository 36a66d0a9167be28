//! Image pulls, run outside the reconciles that need them.
//!
//! A pull can take minutes (a large image, a slow or silent registry). Run
//! inside a reconcile it would hold one of the controller's few reconcile
//! slots all that time, and a handful of slow pulls would stop every quick
//! reconcile (a restart, a status) on the node. So a reconcile that needs an
//! image asks [`Pulls`]: the first asker starts the pull in a task of its
//! own, bounded by the pull slots (`PERSYS_MAX_CONCURRENT_PULLS`), and every
//! asker returns at once reporting `Pending`. When the pull ends, each
//! workload that asked for the image is woken, and its next reconcile takes
//! the outcome and goes on to create its container.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::container;
use super::engine::Engine;
use super::errors::{DockerError, FailureReason, Operation};
use super::image::ImageReference;
use crate::kit::Classify;
use crate::probes::Notifier;

/// How a finished pull ended, as each workload that waited for it reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PullOutcome {
    Pulled {
        took: Duration,
    },
    /// The registry or the engine refused, or the deadline passed.
    Failed {
        reason: FailureReason,
        /// The engine's words, without the workload prefix.
        detail: String,
    },
    /// The engine stopped answering during the pull.
    Unreachable {
        detail: String,
    },
}

impl PullOutcome {
    fn of(result: Result<(), DockerError>, took: Duration) -> PullOutcome {
        match result {
            Ok(()) => PullOutcome::Pulled { took },
            Err(error @ DockerError::Unreachable { .. }) => PullOutcome::Unreachable {
                detail: error.detail(),
            },
            Err(error) => PullOutcome::Failed {
                reason: error.reason(),
                detail: error.detail(),
            },
        }
    }
}

/// What a reconcile asking for an image learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Asked {
    /// This ask started the pull (it may still wait for a slot).
    Started,
    /// A pull of the image is under way or waits for a slot.
    Waiting,
    /// The pull this workload waited for has ended; `source` says where
    /// its credentials came from.
    Finished {
        outcome: PullOutcome,
        source: String,
    },
}

/// How long an ended pull's outcome waits for the workloads that asked for
/// it. Each is woken at the end and normally reads it within moments; one
/// that never comes (its spec changed to another image) does not keep the
/// outcome past this.
const OUTCOME_KEPT: Duration = Duration::from_secs(300);

enum Entry {
    /// Running or waiting for a slot; `waiters` are woken when it ends.
    Running {
        waiters: BTreeSet<String>,
        source: String,
    },
    /// Ended: kept for the waiters that have not read it yet.
    Done {
        outcome: PullOutcome,
        waiters: BTreeSet<String>,
        source: String,
        at: Instant,
    },
}

/// The pulls of one Docker controller; cheap to clone.
#[derive(Clone)]
pub(crate) struct Pulls {
    engine: Engine,
    /// Pulls running at once. Separate from the reconcile slots, so a slow
    /// registry holds only these.
    slots: Arc<Semaphore>,
    /// By image reference as written in the spec. A std mutex: held only to
    /// read or change an entry, never across an await.
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    /// Wakes a waiting workload's reconcile when its pull ends.
    wake: Notifier,
}

impl Pulls {
    pub(crate) fn new(engine: Engine, slots: usize, wake: Notifier) -> Pulls {
        Pulls {
            engine,
            slots: Arc::new(Semaphore::new(slots.max(1))),
            entries: Arc::default(),
            wake,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where workload `id`'s pull of `image` stands: under way (`Waiting`),
    /// or ended (`Finished`, handed over once); none when a pull must be
    /// started ([`Pulls::ask`], after the credentials are looked up).
    pub(crate) fn look(&self, id: &str, image: &str) -> Option<Asked> {
        let mut entries = self.entries();
        Self::take(&mut entries, id, image)
    }

    fn take(entries: &mut HashMap<String, Entry>, id: &str, image: &str) -> Option<Asked> {
        entries.retain(|_, entry| match entry {
            Entry::Done { at, .. } => at.elapsed() < OUTCOME_KEPT,
            Entry::Running { .. } => true,
        });
        match entries.get_mut(image)? {
            Entry::Running { waiters, .. } => {
                waiters.insert(id.to_string());
                Some(Asked::Waiting)
            }
            Entry::Done {
                outcome,
                waiters,
                source,
                ..
            } => {
                // A workload that did not wait for that pull gets one of its
                // own (an `Always` pull is due, or the image went since).
                if !waiters.remove(id) {
                    return None;
                }
                let asked = Asked::Finished {
                    outcome: outcome.clone(),
                    source: source.clone(),
                };
                if waiters.is_empty() {
                    entries.remove(image);
                }
                Some(asked)
            }
        }
    }

    /// Workload `id` needs `image`: starts its pull (with `credentials`
    /// from `source`, abandoned after `deadline`) unless one is under way,
    /// or hands over the outcome of the pull it waited for.
    pub(crate) fn ask(
        &self,
        id: &str,
        image: &str,
        reference: &ImageReference,
        (credentials, source): (Option<DockerCredentials>, String),
        deadline: Duration,
    ) -> Asked {
        let mut entries = self.entries();
        if let Some(asked) = Self::take(&mut entries, id, image) {
            return asked;
        }
        // Those yet to read an older outcome wait for the new one.
        let mut waiters = BTreeSet::from([id.to_string()]);
        if let Some(Entry::Done { waiters: left, .. }) = entries.get_mut(image) {
            waiters.append(left);
        }
        entries.insert(image.to_string(), Entry::Running { waiters, source });
        drop(entries);
        let pulls = self.clone();
        let (id, image, reference) = (id.to_string(), image.to_string(), reference.clone());
        tokio::spawn(async move {
            let outcome = pulls.run(&id, &reference, credentials, deadline).await;
            pulls.finish(&image, outcome);
        });
        Asked::Started
    }

    /// One pull, in a slot, to its end or its deadline.
    async fn run(
        &self,
        id: &str,
        reference: &ImageReference,
        credentials: Option<DockerCredentials>,
        deadline: Duration,
    ) -> PullOutcome {
        // The semaphore is never closed; without a permit the pull still
        // runs rather than never.
        let _slot = self.slots.acquire().await.ok();
        let started = Instant::now();
        let docker = match self.engine.client().await {
            Ok(docker) => docker,
            Err(e) => {
                let error = DockerError::engine(id, Operation::Connect, e);
                return PullOutcome::of(Err(error), started.elapsed());
            }
        };
        let pull = container::pull(&docker, id, reference, credentials);
        let result = match tokio::time::timeout(deadline, pull).await {
            Ok(pulled) => pulled,
            Err(_) => Err(DockerError::PullTimedOut {
                id: id.to_string(),
                image: reference.to_string(),
                after: deadline,
            }),
        };
        PullOutcome::of(result, started.elapsed())
    }

    /// Records how the pull of `image` ended and wakes its waiters.
    fn finish(&self, image: &str, outcome: PullOutcome) {
        let mut entries = self.entries();
        let (waiters, source) = match entries.remove(image) {
            Some(Entry::Running { waiters, source })
            | Some(Entry::Done {
                waiters, source, ..
            }) => (waiters, source),
            None => (BTreeSet::new(), String::new()),
        };
        if waiters.is_empty() {
            return;
        }
        for id in &waiters {
            // A full channel drops the wake; the resync still comes.
            let _ = self.wake.try_send(id.clone());
        }
        entries.insert(
            image.to_string(),
            Entry::Done {
                outcome,
                waiters,
                source,
                at: Instant::now(),
            },
        );
    }

    /// Workload `id` is gone: it waits for nothing any more.
    pub(crate) fn forget(&self, id: &str) {
        self.entries().retain(|_, entry| match entry {
            Entry::Running { waiters, .. } => {
                waiters.remove(id);
                true
            }
            Entry::Done { waiters, .. } => {
                waiters.remove(id);
                !waiters.is_empty()
            }
        });
    }

    /// Pulls running or waiting for a slot.
    pub(crate) fn in_flight(&self) -> usize {
        self.entries()
            .values()
            .filter(|e| matches!(e, Entry::Running { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_pull_keeps_its_reason_and_an_unreachable_engine_is_told_apart() {
        let refused = DockerError::PullTimedOut {
            id: "w".into(),
            image: "registry.invalid/app".into(),
            after: Duration::from_secs(5),
        };
        assert!(matches!(
            PullOutcome::of(Err(refused), Duration::ZERO),
            PullOutcome::Failed {
                reason: FailureReason::ImagePullFailed,
                ..
            }
        ));
        let gone = DockerError::Unreachable {
            id: "w".into(),
            operation: Operation::Pull,
            source: bollard::errors::Error::RequestTimeoutError,
        };
        assert!(matches!(
            PullOutcome::of(Err(gone), Duration::ZERO),
            PullOutcome::Unreachable { .. }
        ));
        assert_eq!(
            PullOutcome::of(Ok(()), Duration::from_secs(2)),
            PullOutcome::Pulled {
                took: Duration::from_secs(2)
            }
        );
    }

    #[tokio::test]
    async fn every_workload_waiting_for_an_image_reads_the_outcome_once_and_it_is_then_dropped() {
        let (wake, mut woken) = tokio::sync::mpsc::channel(8);
        let pulls = Pulls::new(Engine::new(Some("unix:///nonexistent".into())), 1, wake);
        pulls.entries().insert(
            "app:1".into(),
            Entry::Running {
                waiters: BTreeSet::from(["a".to_string()]),
                source: "no credentials".into(),
            },
        );
        assert_eq!(pulls.look("b", "app:1"), Some(Asked::Waiting));
        assert_eq!(pulls.in_flight(), 1);
        let pulled = PullOutcome::Pulled {
            took: Duration::from_secs(1),
        };
        pulls.finish("app:1", pulled.clone());
        let mut wakes = vec![woken.recv().await.unwrap(), woken.recv().await.unwrap()];
        wakes.sort();
        assert_eq!(wakes, ["a", "b"]);
        assert_eq!(pulls.in_flight(), 0);
        assert_eq!(
            pulls.look("a", "app:1"),
            Some(Asked::Finished {
                outcome: pulled.clone(),
                source: "no credentials".into()
            })
        );
        assert_eq!(pulls.look("a", "app:1"), None, "handed over once");
        pulls.forget("b");
        assert!(pulls.entries().is_empty(), "read by all, then dropped");
    }

    #[tokio::test]
    async fn a_workload_that_did_not_wait_for_an_ended_pull_gets_a_pull_of_its_own() {
        let (wake, _woken) = tokio::sync::mpsc::channel(8);
        let pulls = Pulls::new(Engine::new(Some("unix:///nonexistent".into())), 1, wake);
        let failed = PullOutcome::Failed {
            reason: FailureReason::ImagePullFailed,
            detail: "refused".into(),
        };
        pulls.entries().insert(
            "app:1".into(),
            Entry::Done {
                outcome: failed,
                waiters: BTreeSet::from(["a".to_string()]),
                source: "no credentials".into(),
                at: Instant::now(),
            },
        );
        let reference = ImageReference::parse("app:1").unwrap();
        let deadline = Duration::from_secs(1);
        assert_eq!(pulls.look("late", "app:1"), None);
        let anonymous = (None, "no credentials".to_string());
        assert_eq!(
            pulls.ask("late", "app:1", &reference, anonymous, deadline),
            Asked::Started,
            "an old failure is not handed to a workload that did not ask for that pull"
        );
        assert_eq!(
            pulls.look("a", "app:1"),
            Some(Asked::Waiting),
            "the one that had yet to read the old outcome waits for the new pull"
        );
    }
}
