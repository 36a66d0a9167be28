//! The store's watch against a model: random applies and deletes, then a
//! watch from a random resource version, on one real store (fjall, in a
//! temporary directory) whose log keeps only [`MAX_LOG`] entries. The model
//! is the change log as it should be: one entry per change, the version one
//! past the last, the kind and id; and what is compacted.
//!
//! Checked for every case: the store's last and compacted-through versions
//! are the model's; a watch from a compacted version is `Expired`; any
//! other delivers every change after it in order (no gap, no duplicate),
//! and then the next write and nothing before it. The same for a watch of
//! each id (`Store::watch_id`), with that id's changes only. One store serves all the
//! cases of a run (opening one per case would cost more than the case), so
//! the model carries over from case to case and a failure is reported
//! without shrinking.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use persys_api::source::ChangeKind;
use persys_api::v1::{ContainerSpec, DesiredState, WorkloadSpec, WorkloadType, workload_spec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::{ApplyOutcome, ApplyRequest, DeleteOutcome, Store, StoreConfig, StoreError};

/// Entries the log keeps: small, so compaction happens all the time.
const MAX_LOG: u64 = 16;
const IDS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    /// Applies image `img:<n>` to an id (the same image again is no change).
    Apply(usize, u8),
    Delete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..IDS.len(), 0..3u8).prop_map(|(id, image)| Op::Apply(id, image)),
        1 => (0..IDS.len()).prop_map(Op::Delete),
    ]
}

/// Ops, then a watch from this far before the last version.
fn case() -> impl Strategy<Value = (Vec<Op>, u64)> {
    (prop::collection::vec(op(), 0..8), 0..MAX_LOG + 6)
}

/// The log as it should be.
#[derive(Debug, Default)]
struct Model {
    /// Id → image, of what exists.
    objects: BTreeMap<&'static str, u8>,
    /// The entries after `compacted`: version, kind, id.
    log: VecDeque<(u64, ChangeKind, &'static str)>,
    last: u64,
    compacted: u64,
}

impl Model {
    fn change(&mut self, kind: ChangeKind, id: &'static str) {
        self.last += 1;
        self.log.push_back((self.last, kind, id));
        if self.last - self.compacted > MAX_LOG {
            self.compacted = self.last - MAX_LOG;
        }
        while self
            .log
            .front()
            .is_some_and(|(rv, ..)| *rv <= self.compacted)
        {
            self.log.pop_front();
        }
    }
}

fn apply_request(id: &str, image: u8) -> ApplyRequest {
    ApplyRequest {
        id: id.to_string(),
        workload_type: WorkloadType::Container,
        revision_id: String::new(),
        desired_state: DesiredState::Running,
        spec: WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: format!("img:{image}"),
                ..Default::default()
            })),
        },
        finalizers: Vec::new(),
        labels: Default::default(),
        caller: Default::default(),
    }
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

async fn step(store: &Store, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match *op {
        Op::Apply(i, image) => {
            let id = IDS[i];
            let outcome = store.apply(apply_request(id, image)).await.map_err(fail)?;
            match (model.objects.insert(id, image), outcome) {
                (Some(old), ApplyOutcome::Unchanged(_)) if old == image => {}
                (None, ApplyOutcome::Created(_)) => model.change(ChangeKind::Added, id),
                (Some(old), ApplyOutcome::Updated(_)) if old != image => {
                    model.change(ChangeKind::Modified, id)
                }
                (old, outcome) => {
                    return Err(fail(format!(
                        "apply {id} img:{image} over {old:?}: {outcome:?}"
                    )));
                }
            }
        }
        Op::Delete(i) => {
            let id = IDS[i];
            match (
                model.objects.remove(id),
                store.delete(id).await.map_err(fail)?,
            ) {
                (None, DeleteOutcome::NotFound) => {}
                (Some(_), DeleteOutcome::Deleted(_)) => model.change(ChangeKind::Deleted, id),
                (old, outcome) => {
                    return Err(fail(format!("delete {id} over {old:?}: {outcome:?}")));
                }
            }
        }
    }
    Ok(())
}

/// The next item of a watch. The timeout guards against a hang; it is not
/// a timing assertion: every item asked for is already committed.
async fn next_item<S: futures::Stream + Unpin>(
    watch: &mut S,
    from: u64,
) -> Result<Option<S::Item>, TestCaseError> {
    tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .map_err(|_| fail(format!("watch from {from} stalled")))
}

async fn check(
    store: &Store,
    model: &mut Model,
    (ops, back): (Vec<Op>, u64),
) -> Result<(), TestCaseError> {
    for op in &ops {
        step(store, model, op).await?;
    }
    prop_assert_eq!(store.resource_version(), model.last);
    prop_assert_eq!(store.compacted_through(), model.compacted);
    let from = model.last.saturating_sub(back);
    let mut watch = Box::pin(store.watch(from));
    let mut by_id: Vec<_> = IDS
        .iter()
        .map(|id| Box::pin(store.watch_id(from, id)))
        .collect();
    let next = next_item;
    if from < model.compacted {
        let item: Option<Result<_, StoreError>> = next(&mut watch, from).await?;
        let expired = |item: &Option<Result<persys_api::source::Change, StoreError>>| {
            matches!(
                item,
                Some(Err(StoreError::Expired { requested, compacted_through }))
                    if *requested == from && *compacted_through == model.compacted
            )
        };
        prop_assert!(
            expired(&item),
            "watch from {} under {}: {:?}",
            from,
            model.compacted,
            item.map(|r| r.map(|c| c.resource_version))
        );
        for watch in &mut by_id {
            let item = next_item(watch, from).await?;
            prop_assert!(
                expired(&item),
                "watch of one id from {} under {}",
                from,
                model.compacted
            );
        }
        return Ok(());
    }
    let expected: Vec<_> = model
        .log
        .iter()
        .filter(|(rv, ..)| *rv > from)
        .copied()
        .collect();
    for (rv, kind, id) in expected {
        let change = next(&mut watch, from)
            .await?
            .ok_or_else(|| fail(format!("watch from {from} ended before {rv}")))?
            .map_err(fail)?;
        prop_assert_eq!(
            (change.resource_version, change.kind, change.object.id()),
            (rv, kind, id),
            "watch from {}",
            from
        );
    }
    for (i, watch) in by_id.iter_mut().enumerate() {
        let expected: Vec<_> = model
            .log
            .iter()
            .filter(|(rv, _, id)| *rv > from && *id == IDS[i])
            .copied()
            .collect();
        for (rv, kind, id) in expected {
            let change = next_item(watch, from)
                .await?
                .ok_or_else(|| fail(format!("watch of {id} from {from} ended before {rv}")))?
                .map_err(fail)?;
            prop_assert_eq!(
                (change.resource_version, change.kind, change.object.id()),
                (rv, kind, id),
                "watch of one id from {}",
                from
            );
        }
        // Nothing more is ready: the watch has read the whole log (a watch
        // never polled would not have, and could find it compacted by the
        // writes below) and follows live.
        let more = futures::FutureExt::now_or_never(watch.next());
        prop_assert!(
            more.is_none(),
            "watch of {} from {}: more than its changes: {:?}",
            IDS[i],
            from,
            more.map(|item| item.map(|r| r.map(|c| c.resource_version)))
        );
    }
    // Then exactly the next write: nothing extra was in between.
    let image = model.objects.get("a").map_or(0, |i| (i + 1) % 3);
    step(store, model, &Op::Apply(0, image)).await?;
    let change = next(&mut watch, from)
        .await?
        .ok_or_else(|| fail("watch ended"))?
        .map_err(fail)?;
    prop_assert_eq!(change.resource_version, model.last, "watch from {}", from);
    // And for each id, its own next write, with nothing of the others'
    // (written before it) in between.
    for (i, watch) in by_id.iter_mut().enumerate() {
        if i > 0 {
            let image = model.objects.get(IDS[i]).map_or(0, |v| (v + 1) % 3);
            step(store, model, &Op::Apply(i, image)).await?;
        }
        let change = next_item(watch, from)
            .await?
            .ok_or_else(|| fail("watch of one id ended"))?
            .map_err(fail)?;
        prop_assert_eq!(
            (change.resource_version, change.object.id()),
            (model.last, IDS[i]),
            "watch of one id from {}",
            from
        );
    }
    Ok(())
}

#[test]
fn watch_from_any_version_delivers_each_change_once_in_order_or_is_expired() {
    // In memory where there is a tmpfs: the cases are about order, not
    // durability, and a disk's fsyncs would make them a hundred times dearer.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("temporary directory");
    let mut config = StoreConfig::new(dir.path().join("state"));
    config.max_log_entries = MAX_LOG;
    // Each case is a few small commits; group commit would change nothing.
    config.max_group = 1;
    let store = Store::open(config).expect("store");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let model = std::cell::RefCell::new(Model::default());
    let mut runner = TestRunner::new(Config {
        // The model carries over from case to case: a shrunk case would not
        // replay the failure.
        max_shrink_iters: 0,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        runtime.block_on(check(&store, &mut model.borrow_mut(), case))
    });
    if let Err(error) = result {
        panic!("{error}\nmodel: {:?}", model.borrow());
    }
    runtime.block_on(store.close());
}
