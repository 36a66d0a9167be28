//! The event log on a real fjall database in a temporary directory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use persys_agent::store::{
    ApplyOutcome, ApplyRequest, Caller, DeleteOutcome, Store, StoreConfig, StoreError,
};
use persys_api::v1::{
    ActualState, ContainerSpec, DesiredState, EventType, ObjectStatus, WorkloadSpec, WorkloadType,
    workload_spec,
};
use persys_controllers::{ChangeKind, Informer};
use tokio_util::sync::CancellationToken;

fn container_spec(image: &str) -> WorkloadSpec {
    WorkloadSpec {
        spec: Some(workload_spec::Spec::Container(ContainerSpec {
            image: image.into(),
            ..Default::default()
        })),
    }
}

fn apply_request(id: &str, revision: &str, image: &str) -> ApplyRequest {
    ApplyRequest {
        id: id.into(),
        workload_type: WorkloadType::Container,
        revision_id: revision.into(),
        desired_state: DesiredState::Running,
        spec: container_spec(image),
        finalizers: vec![persys_api::FINALIZER_DOCKER.into()],
        labels: BTreeMap::new(),
        caller: Caller::default(),
    }
}

/// The state directory of a test: inside its temporary directory, so the
/// key file beside it is too.
fn state(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("state")
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(StoreConfig::new(state(dir))).expect("open store")
}

/// Applies workloads `w<i>` for each `i` in `ids`, one after another.
async fn apply_each(store: &Store, ids: std::ops::Range<usize>) {
    for i in ids {
        store
            .apply(apply_request(&format!("w{i}"), "", "busybox"))
            .await
            .unwrap();
    }
}

async fn next_change(
    stream: &mut (impl futures::Stream<Item = Result<persys_controllers::Change, StoreError>> + Unpin),
) -> persys_controllers::Change {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a change within 5 s")
        .expect("stream open")
        .expect("no error")
}

/// Writes a new revision of workload `tick` every 50 ms until `done` holds:
/// the log's age check runs when a group is written, at most once a second.
/// Panics naming `what` after 10 s.
async fn tick_until(store: &Store, what: &str, done: impl Fn(&Store) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        store
            .apply(apply_request(
                "tick",
                "",
                &format!("busybox:{}", store.resource_version()),
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log versions `log_records` serves, oldest first.
fn served_versions(store: &Store) -> Vec<u64> {
    store
        .log_records(false, usize::MAX, |_| true)
        .unwrap()
        .iter()
        .map(|r| r.resource_version)
        .collect()
}

async fn expect_expired(store: &Store, from: u64) -> StoreError {
    let mut watch = Box::pin(store.watch(from));
    let error = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an answer within 5 s")
        .expect("stream open")
        .expect_err("expired");
    assert!(matches!(error, StoreError::Expired { .. }), "{error}");
    error
}

#[tokio::test]
async fn resource_versions_strictly_increase_across_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for round in 0..3 {
        let store = open(&dir);
        for i in 0..5 {
            let outcome = store
                .apply(apply_request(
                    &format!("w{i}"),
                    &format!("r{round}"),
                    "busybox",
                ))
                .await
                .unwrap();
            seen.push(outcome.workload().resource_version());
        }
        store.close().await;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.len(), 15);
    let store = open(&dir);
    assert_eq!(store.resource_version(), *seen.last().unwrap());
}

#[tokio::test]
async fn watch_from_a_version_replays_exactly_what_follows_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut versions = Vec::new();
    for i in 0..10 {
        let o = store
            .apply(apply_request(&format!("w{i}"), "", "busybox"))
            .await
            .unwrap();
        versions.push(o.workload().resource_version());
    }
    let from = versions[3];
    let mut watch = Box::pin(store.watch(from));
    for expected in &versions[4..] {
        let change = next_change(&mut watch).await;
        assert_eq!(change.resource_version, *expected);
        assert_eq!(change.kind, ChangeKind::Added);
    }
    // Live: writes after the replay arrive in order, each once.
    let mut live = Vec::new();
    for i in 0..300 {
        let o = store
            .apply(apply_request(&format!("live{i}"), "", "busybox"))
            .await
            .unwrap();
        live.push(o.workload().resource_version());
    }
    for expected in live {
        assert_eq!(next_change(&mut watch).await.resource_version, expected);
    }
    let nothing = tokio::time::timeout(Duration::from_millis(100), watch.next()).await;
    assert!(nothing.is_err(), "no duplicate or extra change");
}

#[tokio::test]
async fn concurrent_writers_and_a_watch_see_one_gapless_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut watch = Box::pin(store.watch(0));
    let mut writers = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .apply(apply_request(&format!("w{w}-{i}"), "", "busybox"))
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    for expected in 1..=800u64 {
        assert_eq!(next_change(&mut watch).await.resource_version, expected);
    }
    assert!(
        store.metrics().commits.get() < 800,
        "concurrent writes share syncs"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_is_expired() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(state(&dir));
    config.max_log_entries = 20;
    let store = Store::open(config).unwrap();
    apply_each(&store, 0..100).await;
    // Trimmed as it goes: the log holds exactly its bound, never more.
    let compacted = store.compacted_through();
    assert_eq!(compacted, 80, "log compacted by count");
    assert_eq!(store.log_len(), 20);
    // Trimmed entries stay on disk until their table goes, but are not
    // served, oldest or newest first.
    assert_eq!(served_versions(&store), (81..=100).collect::<Vec<_>>());
    let newest: Vec<u64> = store
        .log_records(true, 3, |_| true)
        .unwrap()
        .iter()
        .map(|r| r.resource_version)
        .collect();
    assert_eq!(newest, vec![100, 99, 98]);
    let error = expect_expired(&store, 1).await;
    assert!(
        matches!(error, StoreError::Expired { requested: 1, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("expired"));
    expect_expired(&store, 79).await;
    // The retained tail is still watchable.
    let mut watch = Box::pin(store.watch(compacted));
    assert_eq!(
        next_change(&mut watch).await.resource_version,
        compacted + 1
    );
    drop(watch);
    // Reopened, the bound still holds.
    store.close().await;
    drop(store);
    let store = open(&dir);
    assert_eq!(store.compacted_through(), 80);
    assert_eq!(served_versions(&store), (81..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn log_is_compacted_by_age_keeping_the_newest_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(state(&dir));
    config.max_log_age = Duration::from_millis(1);
    let store = Store::open(config).unwrap();
    apply_each(&store, 0..5).await;
    tick_until(&store, "compaction by age", |s| s.compacted_through() > 0).await;
    assert!(store.log_len() >= 1);
    assert_eq!(
        store.list(None).unwrap().len(),
        6,
        "objects are never compacted"
    );
}

#[tokio::test]
async fn log_size_bound_drops_whole_tables_and_watches_from_them_expire() {
    let dir = tempfile::tempdir().unwrap();
    // Small tables and the smallest size bound (two memtables), so a few
    // thousand writes take the log past it.
    let mut config = StoreConfig::new(state(&dir));
    config.memtable_bytes = 64 * 1024;
    config.max_log_bytes = 1;
    let store = Store::open(config).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while served_versions(&store).first() == Some(&1) || store.resource_version() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no table dropped after {} writes",
            store.resource_version()
        );
        let writes = (0..64).map(|i| {
            let store = store.clone();
            async move {
                store
                    .apply(apply_request(
                        &format!("w{i}"),
                        "",
                        &format!("busybox:{round}"),
                    ))
                    .await
                    .unwrap();
            }
        });
        futures::future::join_all(writes).await;
        round += 1;
    }
    // What is served is whole and ends at the newest entry.
    let served = served_versions(&store);
    let first = served[0];
    assert!(
        served.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in {served:?}"
    );
    assert_eq!(*served.last().unwrap(), store.resource_version());
    let error = expect_expired(&store, 0).await;
    assert!(
        matches!(error, StoreError::Expired { compacted_through, .. } if compacted_through >= first - 1),
        "{error}"
    );
    let mut watch = Box::pin(store.watch(first - 1));
    assert_eq!(next_change(&mut watch).await.resource_version, first);
    // The trim point catches up with what was dropped at the next age check.
    tick_until(&store, "the trim point past the dropped tables", |s| {
        s.compacted_through() >= first - 1
    })
    .await;
    assert_eq!(
        store.log_len(),
        store.resource_version() - store.compacted_through()
    );
    let kept = store.list(None).unwrap();
    assert_eq!(
        kept.iter().filter(|w| w.id().starts_with('w')).count(),
        64,
        "objects are never dropped"
    );
}

/// The real store, with its first watch held back until the test lets it go:
/// the way an informer falls behind a compaction.
struct HeldBackWatch {
    store: Store,
    gate: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl persys_controllers::WorkloadSource for HeldBackWatch {
    fn list(
        &self,
    ) -> futures::future::BoxFuture<
        '_,
        Result<persys_controllers::Listing, persys_controllers::SourceError>,
    > {
        persys_controllers::WorkloadSource::list(&self.store)
    }

    fn watch(
        &self,
        after: u64,
    ) -> futures::stream::BoxStream<
        'static,
        Result<persys_controllers::Change, persys_controllers::SourceError>,
    > {
        let gate = self.gate.lock().unwrap().take();
        let inner = persys_controllers::WorkloadSource::watch(&self.store, after);
        match gate {
            Some(gate) => futures::stream::once(async move {
                let _ = gate.await;
                inner
            })
            .flatten()
            .boxed(),
            None => inner,
        }
    }
}

#[tokio::test]
async fn informer_relists_after_expiry_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(state(&dir));
    config.max_log_entries = 10;
    let store = Store::open(config).unwrap();
    let mut gone = apply_request("gone", "", "busybox");
    gone.finalizers.clear();
    store.apply(gone).await.unwrap();
    apply_each(&store, 0..5).await;
    let (open_gate, gate) = tokio::sync::oneshot::channel();
    let source = HeldBackWatch {
        store: store.clone(),
        gate: std::sync::Mutex::new(Some(gate)),
    };
    let informer = Informer::new(Arc::new(source));
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn({
        let informer = informer.clone();
        let shutdown = shutdown.clone();
        async move { informer.run(shutdown).await }
    });
    tokio::time::timeout(Duration::from_secs(5), informer.wait_until_synced())
        .await
        .unwrap();
    let cache = informer.cache();
    assert_eq!(cache.len(), 6);
    let mut notifications = informer.subscribe();

    // While the informer's watch is held back: a delete and enough writes to
    // compact its version away.
    assert!(matches!(
        store.delete("gone").await.unwrap(),
        DeleteOutcome::Deleted(_)
    ));
    apply_each(&store, 5..60).await;
    store
        .apply(apply_request("w0", "r2", "busybox:2"))
        .await
        .unwrap();
    assert!(store.compacted_through() > 7);
    open_gate.send(()).unwrap();

    let mut deleted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(deleted && cache.len() == 60 && cache.resource_version() == store.resource_version()) {
        let n = tokio::time::timeout_at(deadline, notifications.recv())
            .await
            .expect("informer converges within 10 s")
            .unwrap();
        if n.kind == ChangeKind::Deleted && n.id() == "gone" {
            deleted = true;
        }
    }
    assert!(cache.get("gone").is_none());
    assert_eq!(cache.get("w0").unwrap().revision_id(), "r2");
    assert_eq!(cache.list_type(WorkloadType::Container).len(), 60);
    shutdown.cancel();
    runner.await.unwrap();
}

#[tokio::test]
async fn identical_apply_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    assert!(matches!(first, ApplyOutcome::Created(_)));
    let rv = store.resource_version();
    let again = store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    assert!(again.is_unchanged());
    assert_eq!(store.resource_version(), rv, "nothing written");
    assert_eq!(again.workload().generation(), 1);
}

#[tokio::test]
async fn empty_revision_is_derived_from_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = store
        .apply(apply_request("web", "", "nginx:1"))
        .await
        .unwrap();
    let revision = first.workload().revision_id().to_string();
    assert_eq!(
        revision,
        persys_api::derived_revision(&container_spec("nginx:1"))
    );
    assert!(
        store
            .apply(apply_request("web", "", "nginx:1"))
            .await
            .unwrap()
            .is_unchanged()
    );
    let changed = store
        .apply(apply_request("web", "", "nginx:2"))
        .await
        .unwrap();
    assert!(matches!(changed, ApplyOutcome::Updated(_)));
    assert_ne!(changed.workload().revision_id(), revision);
    assert_eq!(changed.workload().generation(), 2);
}

#[tokio::test]
async fn same_revision_with_another_spec_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    let rv = store.resource_version();
    let error = store
        .apply(apply_request("web", "r1", "nginx:2"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        StoreError::RevisionConflict {
            id: "web".into(),
            revision: "r1".into()
        }
    );
    assert_eq!(store.resource_version(), rv);
    let stored = store.get("web").unwrap().unwrap();
    assert_eq!(
        stored.workload_spec(),
        container_spec("nginx:1").spec.as_ref()
    );
}

#[tokio::test]
async fn generation_moves_only_on_spec_or_desired_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let w = store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    assert_eq!(w.workload().generation(), 1);

    let mut stop = apply_request("web", "r1", "nginx:1");
    stop.desired_state = DesiredState::Stopped;
    let w = store.apply(stop).await.unwrap();
    assert!(matches!(w, ApplyOutcome::Updated(_)));
    assert_eq!(w.workload().generation(), 2);
    assert_eq!(w.workload().desired_state(), DesiredState::Stopped);

    let w = store
        .apply(apply_request("web", "r2", "nginx:2"))
        .await
        .unwrap();
    assert_eq!(w.workload().generation(), 3);

    // Status writes never bump it.
    let rv = w.workload().resource_version();
    let status = ObjectStatus {
        actual_state: ActualState::Running as i32,
        observed_generation: 3,
        ..Default::default()
    };
    let written = store
        .update_status("web", rv, status.clone())
        .await
        .unwrap();
    assert_eq!(written.generation(), 3);
    assert!(written.resource_version() > rv);
    assert_eq!(
        written.status.as_ref().unwrap().actual_state(),
        ActualState::Running
    );
    // An identical status write writes nothing.
    let rv = written.resource_version();
    let same = store.update_status("web", rv, status).await.unwrap();
    assert_eq!(same.resource_version(), rv);
    assert_eq!(store.resource_version(), rv);
}

#[tokio::test]
async fn a_stale_status_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let w = store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    let stale = w.workload().resource_version();
    store
        .apply(apply_request("web", "r2", "nginx:2"))
        .await
        .unwrap();
    let error = store
        .update_status("web", stale, ObjectStatus::default())
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Conflict { expected, .. } if expected == stale));
    assert!(error.is_retryable());
    let error = store
        .update_status("nope", 1, ObjectStatus::default())
        .await
        .unwrap_err();
    assert_eq!(error, StoreError::NotFound("nope".into()));
}

#[tokio::test]
async fn apply_of_another_type_or_during_deletion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    let mut other = apply_request("web", "r1", "nginx:1");
    other.workload_type = WorkloadType::Compose;
    assert!(matches!(
        store.apply(other).await.unwrap_err(),
        StoreError::TypeMismatch { .. }
    ));
    store.delete("web").await.unwrap();
    assert_eq!(
        store
            .apply(apply_request("web", "r3", "nginx:3"))
            .await
            .unwrap_err(),
        StoreError::BeingDeleted { id: "web".into() }
    );
}

#[tokio::test]
async fn finalizers_hold_a_deleted_object_until_removed_then_deleted_is_emitted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    let mut watch = Box::pin(store.watch(store.resource_version()));

    let outcome = store.delete("web").await.unwrap();
    let DeleteOutcome::Deleting(marked) = outcome else {
        panic!("expected Deleting, got {outcome:?}");
    };
    assert!(marked.is_deleting());
    assert!(store.get("web").unwrap().is_some(), "held by its finalizer");
    assert!(matches!(
        store.delete("web").await.unwrap(),
        DeleteOutcome::Deleting(_)
    ));
    let change = next_change(&mut watch).await;
    assert_eq!(change.kind, ChangeKind::Modified);
    assert!(change.object.is_deleting());

    store
        .remove_finalizer("web", persys_api::FINALIZER_DOCKER)
        .await
        .unwrap();
    assert!(store.get("web").unwrap().is_none());
    let change = next_change(&mut watch).await;
    assert_eq!(change.kind, ChangeKind::Deleted);
    assert_eq!(change.object.id(), "web");
    // Removing it again, or deleting again, writes nothing.
    store
        .remove_finalizer("web", persys_api::FINALIZER_DOCKER)
        .await
        .unwrap();
    assert!(matches!(
        store.delete("web").await.unwrap(),
        DeleteOutcome::NotFound
    ));
    let nothing = tokio::time::timeout(Duration::from_millis(100), watch.next()).await;
    assert!(nothing.is_err(), "DELETED exactly once");

    // A re-created workload is a new object.
    let again = store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    assert!(matches!(again, ApplyOutcome::Created(_)));
    assert_ne!(again.workload().uid(), marked.uid());
}

#[tokio::test]
async fn events_fold_repeats_are_bounded_and_leave_with_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store
        .apply(apply_request("web", "r1", "nginx:1"))
        .await
        .unwrap();
    for _ in 0..3 {
        store
            .record_event("web", EventType::Warning, "BackOff", "restarting")
            .await
            .unwrap();
    }
    store
        .record_event("web", EventType::Normal, "Started", "up")
        .await
        .unwrap();
    let events = store.events("web").unwrap();
    assert_eq!(events.len(), 2);
    let backoff = events.iter().find(|e| e.reason == "BackOff").unwrap();
    assert_eq!(backoff.count, 3);
    assert!(backoff.last_seen_ms >= backoff.first_seen_ms);

    for i in 0..80 {
        store
            .record_event("web", EventType::Normal, "Pulled", &format!("image {i}"))
            .await
            .unwrap();
    }
    let events = store.events("web").unwrap();
    assert_eq!(events.len(), persys_agent::store::MAX_EVENTS_PER_WORKLOAD);
    assert!(
        events.iter().any(|e| e.message == "image 79"),
        "newest kept"
    );

    // Events survive a restart…
    store.close().await;
    drop(store);
    let store = open(&dir);
    assert_eq!(
        store.events("web").unwrap().len(),
        persys_agent::store::MAX_EVENTS_PER_WORKLOAD
    );
    // …and leave with their workload.
    store.delete("web").await.unwrap();
    store
        .remove_finalizer("web", persys_api::FINALIZER_DOCKER)
        .await
        .unwrap();
    assert!(store.events("web").unwrap().is_empty());
    assert_eq!(
        store
            .record_event("web", EventType::Normal, "X", "y")
            .await
            .unwrap_err(),
        StoreError::NotFound("web".into())
    );
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(&dir);
    let error = Store::open(StoreConfig::new(state(&dir)))
        .err()
        .expect("second open refused");
    assert!(matches!(error, StoreError::Locked { .. }));
    let message = error.to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("in use"), "{message}");
}

#[tokio::test]
async fn writes_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.close().await;
    assert_eq!(
        store
            .apply(apply_request("web", "", "nginx"))
            .await
            .unwrap_err(),
        StoreError::Closed
    );
}

#[tokio::test]
async fn applies_and_delete_requests_record_who_made_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let scheduler = Caller {
        identity: "CN=persys-scheduler".into(),
        role: "scheduler".into(),
    };
    let mut request = apply_request("web", "r1", "nginx:1");
    request.caller = scheduler.clone();
    store.apply(request.clone()).await.unwrap();
    // An unchanged apply writes nothing: no record, no event.
    let unchanged = store.apply(request).await.unwrap();
    assert!(unchanged.is_unchanged());
    let mut update = apply_request("web", "r2", "nginx:2");
    update.caller = scheduler.clone();
    store.apply(update).await.unwrap();
    // An anonymous write is logged without a caller and records no event.
    store
        .apply(apply_request("web", "r3", "nginx:3"))
        .await
        .unwrap();
    let operator = Caller {
        identity: "CN=persysctl".into(),
        role: "operator".into(),
    };
    let outcome = store.delete_as("web", operator).await.unwrap();
    assert!(matches!(outcome, DeleteOutcome::Deleting(_)));

    let records = store.log_records(false, usize::MAX, |_| true).unwrap();
    let who: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| (r.action.as_str(), r.caller.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(
        who,
        [
            ("apply", "CN=persys-scheduler", "scheduler"),
            ("apply", "CN=persys-scheduler", "scheduler"),
            ("apply", "", ""),
            ("delete", "CN=persysctl", "operator"),
        ]
    );

    let events = store.events("web").unwrap();
    let applied: Vec<_> = events.iter().filter(|e| e.reason == "Applied").collect();
    assert_eq!(applied.len(), 1, "{events:?}");
    assert_eq!(
        applied[0].message,
        "Applied by CN=persys-scheduler (role scheduler)"
    );
    assert_eq!(applied[0].count, 2, "the two attributed applies fold");
    assert_eq!(applied[0].r#type, EventType::Normal as i32);
    let requested: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "DeleteRequested")
        .collect();
    assert_eq!(requested.len(), 1, "{events:?}");
    assert_eq!(
        requested[0].message,
        "Deletion requested by CN=persysctl (role operator)"
    );

    // Status and finalizer writes carry no caller.
    store
        .remove_finalizer("web", persys_api::FINALIZER_DOCKER)
        .await
        .unwrap();
    let last = store.log_records(true, 1, |_| true).unwrap();
    assert_eq!(last[0].action, "finalize");
    assert_eq!((last[0].caller.as_str(), last[0].role.as_str()), ("", ""));
}
