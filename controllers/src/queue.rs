//! The work queue of a controller.
//!
//! Rules, as client-go's workqueue has them:
//! - a key waiting in the queue is there once, however often it is added;
//! - a key handed out is not handed out again until [`WorkQueue::done`]; if it
//!   was added meanwhile it comes back once, after `done` (one running, one
//!   pending);
//! - [`WorkQueue::add_after`] keeps the earliest deadline of a key, and an
//!   immediate add supersedes a delayed one.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct QueueState {
    /// Keys ready to hand out, in order of arrival.
    ready: VecDeque<String>,
    /// Keys that need a reconcile and have not been handed out yet.
    dirty: HashSet<String>,
    /// Keys handed out and not yet done.
    processing: HashSet<String>,
    /// Delayed keys by deadline; `deadlines` is the same, by key.
    delayed: BTreeSet<(Instant, String)>,
    deadlines: HashMap<String, Instant>,
    shut_down: bool,
}

impl QueueState {
    fn add(&mut self, key: &str) -> bool {
        if let Some(at) = self.deadlines.remove(key) {
            self.delayed.remove(&(at, key.to_string()));
        }
        if self.shut_down || !self.dirty.insert(key.to_string()) {
            return false;
        }
        if self.processing.contains(key) {
            return false;
        }
        self.ready.push_back(key.to_string());
        true
    }

    fn promote_due(&mut self, now: Instant) -> bool {
        let mut promoted = false;
        while let Some((at, _)) = self.delayed.first() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.delayed.pop_first() else {
                break;
            };
            self.deadlines.remove(&key);
            promoted |= self.add(&key);
        }
        promoted
    }
}

/// A deduplicating, delay-capable queue of workload ids, for one consumer.
#[derive(Debug, Default)]
pub struct WorkQueue {
    /// A std mutex: every critical section is short and never awaits.
    state: Mutex<QueueState>,
    /// Wakes the consumer when a key becomes ready or the queue shuts down.
    wake: Notify,
}

impl WorkQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `key` now.
    pub fn add(&self, key: &str) {
        if self.state().add(key) {
            self.wake.notify_one();
        }
    }

    /// Queues `key` after `delay`, unless it is already due earlier.
    pub fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let at = Instant::now() + delay;
        let mut state = self.state();
        if state.shut_down || state.dirty.contains(key) {
            // Already due to run: the delayed add adds nothing.
            return;
        }
        match state.deadlines.get(key).copied() {
            Some(existing) if existing <= at => return,
            Some(existing) => {
                state.delayed.remove(&(existing, key.to_string()));
            }
            None => {}
        }
        state.deadlines.insert(key.to_string(), at);
        state.delayed.insert((at, key.to_string()));
        drop(state);
        // The consumer may be sleeping until a later deadline.
        self.wake.notify_one();
    }

    /// The next ready key, waiting for one; `None` once shut down.
    pub async fn next(&self) -> Option<String> {
        loop {
            let deadline = {
                let mut state = self.state();
                if state.shut_down {
                    return None;
                }
                state.promote_due(Instant::now());
                if let Some(key) = state.ready.pop_front() {
                    state.dirty.remove(&key);
                    state.processing.insert(key.clone());
                    return Some(key);
                }
                state.delayed.first().map(|(at, _)| *at)
            };
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Marks `key` finished; if it was added meanwhile it is ready again.
    /// A `done` for a key that was not handed out changes nothing (it must
    /// not queue a key that is already waiting a second time).
    pub fn done(&self, key: &str) {
        let mut state = self.state();
        if !state.processing.remove(key) {
            return;
        }
        if state.dirty.contains(key) && !state.shut_down {
            state.ready.push_back(key.to_string());
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Stops handing out keys; [`WorkQueue::next`] returns `None`.
    pub fn shut_down(&self) {
        self.state().shut_down = true;
        self.wake.notify_one();
    }

    /// Keys waiting to run now.
    pub fn len(&self) -> usize {
        self.state().ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys waiting for a deadline.
    pub fn delayed_len(&self) -> usize {
        self.state().delayed.len()
    }

    /// When `key` is due, if it is waiting for a deadline.
    pub fn deadline(&self, key: &str) -> Option<Instant> {
        self.state().deadlines.get(key).copied()
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn next_now(queue: &WorkQueue) -> Option<String> {
        tokio::time::timeout(Duration::from_millis(1), queue.next())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test(start_paused = true)]
    async fn queue_dedupes_a_key_added_many_times() {
        let queue = WorkQueue::new();
        for _ in 0..5 {
            queue.add("a");
        }
        queue.add("b");
        assert_eq!(queue.len(), 2);
        assert_eq!(next_now(&queue).await.as_deref(), Some("a"));
        assert_eq!(next_now(&queue).await.as_deref(), Some("b"));
        assert_eq!(next_now(&queue).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_never_hands_out_a_key_that_is_processing() {
        let queue = WorkQueue::new();
        queue.add("a");
        let key = next_now(&queue).await.unwrap();
        queue.add("a");
        queue.add("a");
        assert_eq!(next_now(&queue).await, None, "a is still processing");
        queue.done(&key);
        assert_eq!(
            next_now(&queue).await.as_deref(),
            Some("a"),
            "one pending run"
        );
        queue.done("a");
        assert_eq!(next_now(&queue).await, None, "and only one");
    }

    /// Found by the queue's model test: a `done` for a key that was
    /// waiting, not handed out, queued it a second time, so it was handed
    /// out twice, the second time while the first run was going on.
    #[tokio::test(start_paused = true)]
    async fn queue_ignores_done_for_a_key_it_did_not_hand_out() {
        let queue = WorkQueue::new();
        queue.add("a");
        queue.done("a");
        assert_eq!(queue.len(), 1);
        assert_eq!(next_now(&queue).await.as_deref(), Some("a"));
        assert_eq!(
            next_now(&queue).await,
            None,
            "a is running, and queued once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn queue_add_after_waits_for_the_deadline() {
        let queue = Arc::new(WorkQueue::new());
        let started = Instant::now();
        queue.add_after("a", Duration::from_secs(5));
        assert_eq!(next_now(&queue).await, None);
        let key = queue.next().await.unwrap();
        assert_eq!(key, "a");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_dedupe_should_keep_earlier_deadline() {
        let queue = WorkQueue::new();
        let started = Instant::now();
        queue.add_after("a", Duration::from_secs(10));
        queue.add_after("a", Duration::from_secs(3));
        queue.add_after("a", Duration::from_secs(20));
        assert_eq!(queue.delayed_len(), 1);
        assert_eq!(queue.next().await.as_deref(), Some("a"));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        queue.done("a");
        assert_eq!(next_now(&queue).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_immediate_add_supersedes_a_delayed_one() {
        let queue = WorkQueue::new();
        queue.add_after("a", Duration::from_secs(60));
        queue.add("a");
        assert_eq!(queue.delayed_len(), 0);
        assert_eq!(next_now(&queue).await.as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wakes_a_waiting_consumer_for_an_earlier_deadline() {
        let queue = Arc::new(WorkQueue::new());
        let started = Instant::now();
        queue.add_after("late", Duration::from_secs(100));
        let consumer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.add_after("early", Duration::from_secs(2));
        assert_eq!(consumer.await.unwrap().as_deref(), Some("early"));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_shut_down_ends_next() {
        let queue = Arc::new(WorkQueue::new());
        let consumer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.shut_down();
        assert_eq!(consumer.await.unwrap(), None);
    }
}
