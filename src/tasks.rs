//! The agent's long-running background tasks, watched: the informer, each
//! runtime's controller, sampler and probe, the scheduler link, the
//! ceilings' ledger, the node sampler, the metrics endpoint, the health
//! reporter, and the TLS and authorization-policy reloaders. (Each Watch
//! stream's task is not among them: it ends with its stream.)
//!
//! Each is meant to run until shutdown. One that ends before it (returns
//! or panics) is dead, and never silently: it is logged at error level,
//! HealthCheck names it (`runtime_status["tasks"]`, `healthy: false`),
//! grpc.health.v1 turns NOT_SERVING, `/readyz` answers 503 and
//! `persys_agent_background_task_up{task}` drops to 0. A dead task is not
//! restarted: what killed it (a defect) would most likely kill it again,
//! and a restarted agent starts from the store with every task fresh.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The board of the agent's background tasks: which run and which died.
#[derive(Clone)]
pub struct Tasks {
    /// Task name → why it died; none while it runs (or ended at shutdown).
    board: Arc<Mutex<BTreeMap<String, Option<String>>>>,
    /// Cancelled at shutdown, when every task is meant to end.
    stop: CancellationToken,
}

impl Tasks {
    /// Tasks meant to run until `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Tasks {
        Tasks {
            board: Arc::default(),
            stop,
        }
    }

    /// The token the tasks end on.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `task` as the background task `name` until it ends. It should
    /// end only once [`Tasks::stop`] is cancelled; ending earlier, or
    /// panicking at any time, marks it dead.
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        self.lock().insert(name.clone(), None);
        let tasks = self.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            match AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) if stop.is_cancelled() => {}
                Ok(()) => tasks.died(&name, "ended before shutdown".to_string()),
                Err(panic) => tasks.died(&name, format!("panicked: {}", panic_message(&*panic))),
            }
        })
    }

    /// Marks `name` dead for `why`, and says so in the log.
    pub fn died(&self, name: &str, why: String) {
        tracing::error!(
            task = name,
            why = %why,
            "a background task of the agent died; HealthCheck and grpc.health report NOT_SERVING until the agent is restarted"
        );
        self.lock().insert(name.to_string(), Some(why));
    }

    /// The dead tasks, by name, with why each died.
    pub fn dead(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter_map(|(name, why)| why.clone().map(|why| (name.clone(), why)))
            .collect()
    }

    /// Whether every task is running.
    pub fn all_alive(&self) -> bool {
        self.lock().values().all(Option::is_none)
    }

    /// Every task by name, and whether it runs.
    pub fn states(&self) -> Vec<(String, bool)> {
        self.lock()
            .iter()
            .map(|(name, why)| (name.clone(), why.is_none()))
            .collect()
    }

    /// One line for HealthCheck's `runtime_status["tasks"]`.
    pub fn summary(&self) -> String {
        let dead = self.dead();
        if dead.is_empty() {
            return format!("{} running", self.lock().len());
        }
        let dead: Vec<String> = dead
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        format!("DEAD: {}", dead.join("; "))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Option<String>>> {
        // The map stays consistent whatever panicked while holding it.
        self.board
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_early_is_dead_and_named_and_one_stopped_is_not() {
        let stop = CancellationToken::new();
        let tasks = Tasks::new(stop.clone());
        let panicking = tasks.spawn("scheduler-link", async {
            panic!("overflow when adding duration to instant");
        });
        let ending = tasks.spawn("informer", async {});
        let running = tasks.spawn("metrics-endpoint", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        panicking.await.unwrap();
        ending.await.unwrap();
        assert!(!tasks.all_alive());
        assert_eq!(
            tasks.dead(),
            [
                ("informer".to_string(), "ended before shutdown".to_string()),
                (
                    "scheduler-link".to_string(),
                    "panicked: overflow when adding duration to instant".to_string()
                ),
            ]
        );
        assert_eq!(
            tasks.summary(),
            "DEAD: informer (ended before shutdown); scheduler-link (panicked: overflow when adding duration to instant)"
        );
        assert_eq!(
            tasks.states(),
            [
                ("informer".to_string(), false),
                ("metrics-endpoint".to_string(), true),
                ("scheduler-link".to_string(), false),
            ]
        );

        // Ending at shutdown is what a task should do.
        stop.cancel();
        running.await.unwrap();
        assert_eq!(tasks.dead().len(), 2);
    }

    #[tokio::test]
    async fn tasks_that_end_at_shutdown_are_all_running() {
        let stop = CancellationToken::new();
        let tasks = Tasks::new(stop.clone());
        let one = tasks.spawn("a", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        assert!(tasks.all_alive());
        assert_eq!(tasks.summary(), "1 running");
        stop.cancel();
        one.await.unwrap();
        assert!(tasks.all_alive());
    }
}
