//! What the engine last showed of the managed containers, kept until the
//! engine reports a change.
//!
//! A resync reconciles every workload; without this each reconcile would
//! list its workload's containers and inspect the one it found — two engine
//! calls per workload per cycle. With it, one list serves the whole cycle
//! and an inspect is reused until the container's state changes.
//!
//! Validity: every container event the trigger receives, every reconnect of
//! the event stream, and every change the controller makes itself bump a
//! generation, which discards what was seen before. A listing also expires
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
    /// The container's state when inspected, as a listing shows it.
    state: Option<String>,
    response: ContainerInspectResponse,
}

#[derive(Default)]
struct Cached {
    listing: Option<Listing>,
    inspected: HashMap<String, Inspected>,
}

/// The observation cache of one Docker controller.
#[derive(Default)]
pub struct Observed {
    /// Bumped on every change the engine reports or the controller makes.
    generation: AtomicU64,
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
    /// Something changed: nothing seen before can be trusted.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The workload's containers from a listing still valid, if there is one.
    fn listed(&self, id: &str) -> Option<Listed> {
        let generation = self.generation.load(Ordering::Acquire);
        let cached = self.cached();
        let listing = cached.listing.as_ref()?;
        if listing.generation != generation || listing.taken.elapsed() >= LISTING_MAX_AGE {
            return None;
        }
        self.reused.fetch_add(1, Ordering::Relaxed);
        Some(listing.of(id))
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
        if let Some(mine) = self.listed(id) {
            return Ok(mine);
        }
        let _refreshing = self.refreshing.lock().await;
        // Another reconcile may have listed while this one waited.
        if let Some(mine) = self.listed(id) {
            return Ok(mine);
        }
        let generation = self.generation.load(Ordering::Acquire);
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
        let listing = Listing {
            generation,
            taken: Instant::now(),
            by_workload,
            go_by_workload,
        };
        let mine = listing.of(id);
        cached.listing = Some(listing);
        Ok(mine)
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
        let listed_state = summary_state(summary);
        {
            let cached = self.cached();
            if let Some(entry) = cached.inspected.get(cid)
                && entry.generation == generation
                && entry.state == listed_state
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
                self.cached().inspected.insert(
                    cid.to_string(),
                    Inspected {
                        generation,
                        state,
                        response: response.clone(),
                    },
                );
            }
        }
        Ok(found)
    }
}
