//! The drain flag: the scheduler's order to cordon this node.

use std::sync::Arc;

use tokio::sync::watch;

/// Whether the scheduler has asked this node to drain. While it has, the API
/// server refuses new workload ids; existing workloads keep running and can
/// still be updated or deleted. Cheap to clone: every clone is the same flag.
#[derive(Debug, Clone)]
pub struct Drain {
    /// A watch rather than an atomic: reads are as cheap, and whoever needs
    /// to react to a change (logs, a future eviction) can await it.
    state: Arc<watch::Sender<bool>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// A node that is schedulable.
    pub fn new() -> Self {
        let (state, _) = watch::channel(false);
        Drain {
            state: Arc::new(state),
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.state.borrow()
    }

    /// Sets the flag; returns true when it changed.
    pub fn set(&self, draining: bool) -> bool {
        let changed = self.state.send_if_modified(|current| {
            let changed = *current != draining;
            *current = draining;
            changed
        });
        if changed {
            if draining {
                tracing::warn!("the scheduler drains this node: new workloads are refused");
            } else {
                tracing::info!("drain lifted: the node is schedulable again");
            }
        }
        changed
    }

    /// Follows the flag.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }

    /// What HealthCheck reports as `runtime_status["node"]`.
    pub fn describe(&self) -> &'static str {
        if self.is_draining() {
            "draining"
        } else {
            "schedulable"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clone_sees_the_same_flag_and_changes_are_reported_once() {
        let drain = Drain::new();
        let server_side = drain.clone();
        let mut follower = drain.subscribe();
        assert!(!server_side.is_draining());
        assert_eq!(server_side.describe(), "schedulable");
        assert!(drain.set(true));
        assert!(!drain.set(true), "no change the second time");
        assert!(server_side.is_draining());
        assert_eq!(server_side.describe(), "draining");
        assert!(follower.has_changed().unwrap());
        assert!(*follower.borrow_and_update());
        assert!(drain.set(false));
        assert!(!server_side.is_draining());
    }
}
