//! The work queue against a model: random sequences of `add`, `add_after`,
//! `next`, `done` and the passing of (paused) time. The model is what the
//! queue owes: which keys need a run and from when, and which are being
//! run. Checked after every step: a key is never handed out while it is
//! being run, `next` hands out a key exactly when one is owed and due, and
//! at the end every owed key comes out exactly once (dedup, nothing lost).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::FutureExt;
use proptest::prelude::*;

use super::WorkQueue;

const KEYS: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Debug, Clone)]
enum Op {
    Add(usize),
    /// Key, delay in seconds (0 is an immediate add).
    AddAfter(usize, u64),
    Next,
    /// `done` for any key, handed out or not.
    Done(usize),
    /// Seconds of paused time.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    prop_oneof![
        3 => key.clone().prop_map(Op::Add),
        2 => (key.clone(), 0..6u64).prop_map(|(k, s)| Op::AddAfter(k, s)),
        4 => Just(Op::Next),
        2 => key.prop_map(Op::Done),
        1 => (0..5u64).prop_map(Op::Advance),
    ]
}

/// What the queue owes.
#[derive(Debug, Default)]
struct Model {
    /// Keys that need a run, by the second they are due (an immediate add
    /// is due at 0, which supersedes any deadline).
    owed: BTreeMap<&'static str, u64>,
    /// Keys handed out and not yet done.
    running: BTreeSet<&'static str>,
    /// Seconds since the start.
    now: u64,
}

impl Model {
    fn add_after(&mut self, key: &'static str, delay: u64) {
        let due = if delay == 0 { 0 } else { self.now + delay };
        let entry = self.owed.entry(key).or_insert(due);
        *entry = (*entry).min(due);
    }

    /// Keys `next` may hand out now.
    fn ready(&self) -> BTreeSet<&'static str> {
        self.owed
            .iter()
            .filter(|(key, due)| **due <= self.now && !self.running.contains(*key))
            .map(|(key, _)| *key)
            .collect()
    }
}

fn next_now(queue: &WorkQueue) -> Option<String> {
    queue.next().now_or_never().flatten()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| TestCaseError::fail(format!("runtime: {e}")))?;
    runtime.block_on(async {
        let queue = WorkQueue::new();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Add(k) => {
                    queue.add(KEYS[k]);
                    model.add_after(KEYS[k], 0);
                }
                Op::AddAfter(k, secs) => {
                    queue.add_after(KEYS[k], Duration::from_secs(secs));
                    model.add_after(KEYS[k], secs);
                }
                Op::Next => {
                    let ready = model.ready();
                    match next_now(&queue) {
                        None => prop_assert!(
                            ready.is_empty(),
                            "next handed out nothing while {ready:?} were owed and due ({model:?})"
                        ),
                        Some(key) => {
                            let key = KEYS
                                .iter()
                                .find(|k| **k == key)
                                .copied()
                                .ok_or_else(|| TestCaseError::fail(format!("unknown {key}")))?;
                            prop_assert!(
                                !model.running.contains(key),
                                "{key} handed out while it is being run ({model:?})"
                            );
                            prop_assert!(
                                ready.contains(key),
                                "{key} handed out but not owed or not due ({model:?})"
                            );
                            model.owed.remove(key);
                            model.running.insert(key);
                        }
                    }
                }
                Op::Done(k) => {
                    queue.done(KEYS[k]);
                    model.running.remove(KEYS[k]);
                }
                Op::Advance(secs) => {
                    tokio::time::advance(Duration::from_secs(secs)).await;
                    model.now += secs;
                }
            }
        }
        // Finish what runs, let every deadline pass: each owed key comes
        // out exactly once, and then nothing.
        for key in std::mem::take(&mut model.running) {
            queue.done(key);
        }
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut handed = Vec::new();
        while let Some(key) = next_now(&queue) {
            queue.done(&key);
            handed.push(key);
            prop_assert!(handed.len() <= KEYS.len(), "handed out {handed:?}");
        }
        handed.sort();
        let owed: Vec<&str> = model.owed.keys().copied().collect();
        prop_assert_eq!(handed, owed, "owed keys, each once");
        Ok::<(), TestCaseError>(())
    })
}

proptest! {
    #[test]
    fn queue_hands_out_every_owed_key_once_and_never_one_being_run(
        ops in prop::collection::vec(op(), 0..40)
    ) {
        run(ops)?;
    }
}
