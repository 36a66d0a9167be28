//! What the engine last showed of the managed containers, kept until the
//! engine reports a change.
//!
//! A resync reconciles every workload; without this each reconcile would
//! list its workload's containers and inspect the one it found — two engine
//! calls per workload per cycle. With it, one list serves the whole cycle
//! and an inspect is reused until the container's state changes.
//!
//! Validity: a container event the trigger receives, and a change the
//! controller makes itself, make what was seen of that one workload stale:
//! its next reconcile lists its own containers afresh (one filtered list)
//! while the listing keeps serving every other workload, so a burst of
//! drift costs a list per drifted workload, not a full listing each. An
//! event of one of this agent's containers makes only this agent's part
//! stale; the Go agent's containers of the workload are listed again only
//! after an event of theirs or a change of the controller's own. An
//! event the controller announced before making the change itself
//! ([`Observed::expect`]: the `create` and `start` of its own container)
//! changes nothing it has not seen, so it neither marks anything stale nor
//! wakes the workload again. A
//! reconnect of the event stream (events may have been lost) bumps a
//! generation, which discards everything seen before. A listing also expires
//! after [`LISTING_MAX_AGE`], so each resync lists afresh — the safety net
//! for a change whose event was lost. A cached inspect is used only while
//! the fresh-enough listing still shows the container in the same state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, ContainerSummary};

use super::adopt;
use super::container;
use super::errors::{DockerError, Operation};
use super::labels;

/// How long one listing serves reconciles when no event arrives: long
/// enough for one resync's burst, short enough that each resync relists.
pub const LISTING_MAX_AGE: Duration = Duration::from_secs(5);

struct Listing {
    generation: u64,
    /// [`Observed::changes`] when the list call started: a workload changed
    /// later than that is stale in it.
    change: u64,
    taken: Instant,
    by_workload: HashMap<String, Vec<ContainerSummary>>,
    /// The Go agent's containers, by the workload they are labelled with
    /// (see `super::adopt`): listed in the same call.
    go_by_workload: HashMap<String, Vec<ContainerSummary>>,
}

/// One workload's containers in a listing.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    /// This agent's, of its scope.
    pub ours: Vec<ContainerSummary>,
    /// The Go agent's, labelled with the workload (its name is checked by
    /// whoever takes them over).
    pub go: Vec<ContainerSummary>,
}

struct Inspected {
    generation: u64,
    /// The workload, and [`Observed::changes`] when the inspect started.
    workload: String,
    change: u64,
    /// The container's state when inspected, as a listing shows it.
    state: Option<String>,
    response: ContainerInspectResponse,
}

#[derive(Default)]
struct Cached {
    listing: Option<Listing>,
    inspected: HashMap<String, Inspected>,
    /// The last change of each workload that changed since the listing was
    /// taken (a value of [`Observed::changes`]).
    changed: HashMap<String, u64>,
    /// The last change of the Go agent's containers of each workload
    /// whose Go containers changed since the listing was taken.
    go_changed: HashMap<String, u64>,
    /// Workloads listed on their own since they changed, with the change
    /// count their list call started at.
    relisted: HashMap<String, (u64, Listed)>,
    /// Events the controller's own changes will cause, by workload and
    /// action, with when each was announced.
    expected: HashMap<(String, String), Vec<Instant>>,
}

impl Cached {
    /// True when what was taken at `change` still holds for `workload`.
    fn fresh(&self, workload: &str, change: u64) -> bool {
        self.ours_fresh(workload, change) && self.go_fresh(workload, change)
    }

    fn ours_fresh(&self, workload: &str, change: u64) -> bool {
        self.changed
            .get(workload)
            .is_none_or(|last| *last <= change)
    }

    fn go_fresh(&self, workload: &str, change: u64) -> bool {
        self.go_changed
            .get(workload)
            .is_none_or(|last| *last <= change)
    }
}

/// How long an announced event is waited for: one that has not come by
/// then (a refused change, a lost event) no longer stands for anything.
pub const EXPECTED_MAX_AGE: Duration = Duration::from_secs(30);

/// Which of a workload's containers an event or change concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// This agent's containers only.
    Ours,
    /// This agent's and the Go agent's.
    Any,
}

/// What is missing to serve a workload's containers from the cache.
enum Missing {
    /// No listing that holds: list everything.
    Listing,
    /// The listing holds for the others; this workload is stale (its Go
    /// agent's containers too when `go`).
    Workload { go: bool },
}

/// The observation cache of one Docker controller.
#[derive(Default)]
pub struct Observed {
    /// Bumped when anything may have changed unseen (an event stream
    /// reconnect): everything seen before is discarded.
    generation: AtomicU64,
    /// Counts the changes of single workloads (events, the controller's
    /// own changes).
    changes: AtomicU64,
    /// A std mutex: held to read or store an entry, never across an await.
    cached: Mutex<Cached>,
    /// One listing at a time: reconciles that find the cache stale together
    /// wait for one list instead of each making their own.
    refreshing: tokio::sync::Mutex<()>,
    /// Engine calls saved, for tests and benchmarks.
    pub reused: AtomicU64,
}

fn summary_state(summary: &ContainerSummary) -> Option<String> {
    summary.state.as_ref().map(|s| s.to_string())
}

fn inspect_state(response: &ContainerInspectResponse) -> Option<String> {
    response
        .state
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .map(|s| s.to_string())
}

impl Listing {
    fn of(&self, id: &str) -> Listed {
        Listed {
            ours: self.by_workload.get(id).cloned().unwrap_or_default(),
            go: self.go_by_workload.get(id).cloned().unwrap_or_default(),
        }
    }
}

impl Observed {
    /// Something changed: nothing seen before can be trusted, and no
    /// announced event is waited for any more (it may have been lost).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cached().expected.clear();
    }

    /// Workload `id`'s containers changed (`whose`): what was seen of them
    /// is stale; what was seen of the others still holds.
    pub fn invalidate_workload(&self, id: &str, whose: Whose) {
        let mut cached = self.cached();
        let change = self.changes.fetch_add(1, Ordering::AcqRel) + 1;
        cached.changed.insert(id.to_string(), change);
        if whose == Whose::Any {
            cached.go_changed.insert(id.to_string(), change);
        }
        cached.relisted.remove(id);
        cached.inspected.retain(|_, entry| entry.workload != id);
    }

    /// The controller is about to make a change to workload `id`'s
    /// container that the engine reports as an `action` event.
    pub fn expect(&self, id: &str, action: &'static str) {
        let mut cached = self.cached();
        let now = Instant::now();
        cached.expected.retain(|_, at| {
            at.retain(|t| now.duration_since(*t) < EXPECTED_MAX_AGE);
            !at.is_empty()
        });
        cached
            .expected
            .entry((id.to_string(), action.to_string()))
            .or_default()
            .push(now);
    }

    /// The announced change was not made (the engine refused it).
    pub fn unexpect(&self, id: &str, action: &'static str) {
        let mut cached = self.cached();
        let key = (id.to_string(), action.to_string());
        if let Some(at) = cached.expected.get_mut(&key) {
            at.pop();
            if at.is_empty() {
                cached.expected.remove(&key);
            }
        }
    }

    /// True, once, for an event of workload `id` the controller announced
    /// (and not too long ago): the controller has seen its effect already.
    pub fn take_expected(&self, id: &str, action: &str) -> bool {
        let mut cached = self.cached();
        let key = (id.to_string(), action.to_string());
        let Some(at) = cached.expected.get_mut(&key) else {
            return false;
        };
        at.retain(|t| t.elapsed() < EXPECTED_MAX_AGE);
        let taken = !at.is_empty();
        if taken {
            at.remove(0);
        }
        if at.is_empty() {
            cached.expected.remove(&key);
        }
        taken
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The workload's containers from a listing still valid, or what is
    /// missing to serve them.
    fn listed(&self, id: &str) -> Result<Listed, Missing> {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = self.cached();
        let Some(listing) = cached.listing.as_ref() else {
            return Err(Missing::Listing);
        };
        if listing.generation != generation || listing.taken.elapsed() >= LISTING_MAX_AGE {
            return Err(Missing::Listing);
        }
        if cached.fresh(id, listing.change) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(listing.of(id));
        }
        match cached.relisted.get(id) {
            Some((change, listed)) if cached.fresh(id, *change) => {
                self.reused.fetch_add(1, Ordering::Relaxed);
                Ok(listed.clone())
            }
            _ => Err(Missing::Workload {
                go: !cached.go_fresh(id, listing.change),
            }),
        }
    }

    /// Lists workload `id`'s containers on their own (one filtered call;
    /// a second for the Go agent's when `go`, else those of the listing),
    /// and keeps them beside the listing.
    async fn relist(
        &self,
        docker: &Docker,
        scope: &str,
        id: &str,
        go: bool,
    ) -> Result<Listed, DockerError> {
        let change = self.changes.load(Ordering::Acquire);
        let ours = container::list(docker, scope, Some(id))
            .await
            .map_err(|e| DockerError::engine(id, Operation::List, e))?;
        let go = if go {
            container::list_go(docker, id).await?
        } else {
            let cached = self.cached();
            let listing = cached.listing.as_ref();
            listing.map(|l| l.of(id).go).unwrap_or_default()
        };
        let listed = Listed { ours, go };
        self.cached()
            .relisted
            .insert(id.to_string(), (change, listed.clone()));
        Ok(listed)
    }

    /// The managed containers of workload `id` in `scope`, and the Go
    /// agent's labelled with it: from the cached listing while it is valid,
    /// else from one listing of every managed container, which then serves
    /// the other workloads too.
    pub async fn list_for(
        &self,
        docker: &Docker,
        scope: &str,
        id: &str,
    ) -> Result<Listed, DockerError> {
        match self.listed(id) {
            Ok(mine) => return Ok(mine),
            Err(Missing::Workload { go }) => return self.relist(docker, scope, id, go).await,
            Err(Missing::Listing) => {}
        }
        let _refreshing = self.refreshing.lock().await;
        // Another reconcile may have listed while this one waited.
        match self.listed(id) {
            Ok(mine) => return Ok(mine),
            Err(Missing::Workload { go }) => return self.relist(docker, scope, id, go).await,
            Err(Missing::Listing) => {}
        }
        let generation = self.generation.load(Ordering::Acquire);
        let change = self.changes.load(Ordering::Acquire);
        let all = container::list_managed(docker)
            .await
            .map_err(|e| DockerError::engine(id, Operation::List, e))?;
        let mut by_workload: HashMap<String, Vec<ContainerSummary>> = HashMap::new();
        let mut go_by_workload: HashMap<String, Vec<ContainerSummary>> = HashMap::new();
        for summary in all {
            let labels = summary.labels.as_ref();
            if labels
                .and_then(|l| l.get(labels::SCOPE))
                .map(String::as_str)
                == Some(scope)
            {
                if let Some(owner) = labels::Marks::read(labels).workload_id {
                    by_workload.entry(owner).or_default().push(summary);
                }
            } else if let Some(owner) = adopt::go_owner(labels) {
                let owner = owner.to_string();
                go_by_workload.entry(owner).or_default().push(summary);
            }
        }
        let mut cached = self.cached();
        // Keep inspects of containers whose state the new listing confirms.
        let live: HashMap<&str, Option<String>> = by_workload
            .values()
            .chain(go_by_workload.values())
            .flatten()
            .filter_map(|c| Some((c.id.as_deref()?, summary_state(c))))
            .collect();
        cached.inspected.retain(|cid, entry| {
            live.get(cid.as_str())
                .is_some_and(|state| *state == entry.state)
        });
        // Changes up to the list call are in it.
        cached.changed.retain(|_, last| *last > change);
        cached.go_changed.retain(|_, last| *last > change);
        cached.relisted.clear();
        let listing = Listing {
            generation,
            change,
            taken: Instant::now(),
            by_workload,
            go_by_workload,
        };
        let mine = listing.of(id);
        cached.listing = Some(listing);
        Ok(mine)
    }

    /// The container `cid` of workload `id`, inspected afresh (after a
    /// change of the controller's own, say); kept as [`Observed::inspect`]
    /// keeps what it inspects, for the reconciles that follow.
    pub async fn inspect_afresh(
        &self,
        docker: &Docker,
        id: &str,
        cid: &str,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        let generation = self.generation.load(Ordering::Acquire);
        let change = self.changes.load(Ordering::Acquire);
        let found = container::inspect(docker, id, cid).await?;
        if let Some(response) = &found {
            self.keep(
                cid,
                id,
                generation,
                change,
                inspect_state(response),
                response,
            );
        }
        Ok(found)
    }

    /// Keeps an inspect started at `generation` and `change`, unless the
    /// workload changed since.
    fn keep(
        &self,
        cid: &str,
        id: &str,
        generation: u64,
        change: u64,
        state: Option<String>,
        response: &ContainerInspectResponse,
    ) {
        let mut cached = self.cached();
        if cached.fresh(id, change) {
            cached.inspected.insert(
                cid.to_string(),
                Inspected {
                    generation,
                    workload: id.to_string(),
                    change,
                    state,
                    response: response.clone(),
                },
            );
        }
    }

    /// The container `cid` of workload `id`: reused while nothing changed
    /// and the listing shows it in the state it was inspected in.
    pub async fn inspect(
        &self,
        docker: &Docker,
        id: &str,
        summary: &ContainerSummary,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        let Some(cid) = summary.id.as_deref() else {
            return Ok(None);
        };
        let generation = self.generation.load(Ordering::Acquire);
        let change = self.changes.load(Ordering::Acquire);
        let listed_state = summary_state(summary);
        {
            let cached = self.cached();
            if let Some(entry) = cached.inspected.get(cid)
                && entry.generation == generation
                && entry.state == listed_state
                && cached.fresh(id, entry.change)
            {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(entry.response.clone()));
            }
        }
        let found = container::inspect(docker, id, cid).await?;
        if let Some(response) = &found {
            let state = inspect_state(response);
            // Only an inspect that agrees with the listing is worth keeping.
            if state == listed_state {
                self.keep(cid, id, generation, change, state, response);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_event_is_taken_once_and_a_refused_change_is_not_waited_for() {
        let observed = Observed::default();
        observed.expect("web", "start");
        assert!(
            !observed.take_expected("web", "die"),
            "only the action announced"
        );
        assert!(
            !observed.take_expected("api", "start"),
            "only the workload's"
        );
        assert!(observed.take_expected("web", "start"));
        assert!(!observed.take_expected("web", "start"), "once");

        observed.expect("web", "create");
        observed.unexpect("web", "create");
        assert!(!observed.take_expected("web", "create"));

        // A reconnect: announced events may have been lost.
        observed.expect("web", "start");
        observed.invalidate();
        assert!(!observed.take_expected("web", "start"));
    }

    #[test]
    fn an_event_of_this_agents_container_leaves_the_go_agents_part_of_the_listing() {
        let observed = Observed::default();
        {
            let mut cached = observed.cached();
            cached.listing = Some(Listing {
                generation: 0,
                change: 0,
                taken: Instant::now(),
                by_workload: HashMap::new(),
                go_by_workload: HashMap::new(),
            });
        }
        assert!(observed.listed("web").is_ok());
        observed.invalidate_workload("web", Whose::Ours);
        assert!(matches!(
            observed.listed("web"),
            Err(Missing::Workload { go: false })
        ));
        assert!(observed.listed("api").is_ok(), "the others still hold");
        observed.invalidate_workload("web", Whose::Any);
        assert!(matches!(
            observed.listed("web"),
            Err(Missing::Workload { go: true })
        ));
    }
}
