//! Whether the store may write: the free-space reserve and the failed state.
//!
//! fjall poisons its database for good after any failed journal write or
//! sync (`Error::Poisoned` from then on; so does a background flush or
//! compaction that fails), and a failed fsync may already have lost what it
//! covered even if a later one succeeds. So the store keeps fjall from
//! meeting a full disk: before each commit group it checks the state
//! filesystem's free space and, below the reserve, refuses the group without
//! writing anything ([`StoreError::NoSpace`]); writes resume by themselves
//! once space is freed. A write or sync that fails anyway is fatal
//! ([`StoreError::Failed`]): nothing is acknowledged after it, and the agent
//! exits so that its service manager restarts it and recovery replays what
//! is on disk.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use super::error::StoreError;

pub(crate) struct WriteGate {
    /// The state directory, whose filesystem is checked.
    path: PathBuf,
    /// Free bytes kept for fjall's own flushes and compactions.
    reserve: u64,
    /// The free space was below the reserve at the last check: the store
    /// reports itself not writable until a check finds space again.
    short_of_space: AtomicBool,
    /// Set once, for good, when a write or sync failed.
    failed: watch::Sender<Option<StoreError>>,
}

impl WriteGate {
    pub fn new(path: PathBuf, reserve: u64) -> WriteGate {
        WriteGate {
            path,
            reserve,
            short_of_space: AtomicBool::new(false),
            failed: watch::Sender::new(None),
        }
    }

    /// Refuses a write while the free space is below the reserve.
    pub fn check_space(&self) -> Result<(), StoreError> {
        if self.reserve == 0 {
            return Ok(());
        }
        let available = match rustix::fs::statvfs(&self.path) {
            Ok(stat) => stat.f_bavail.saturating_mul(stat.f_frsize),
            // Cannot tell: let the write try (and fail, if it must).
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot read the state filesystem's free space");
                u64::MAX
            }
        };
        let short = available < self.reserve;
        if short != self.short_of_space.swap(short, Ordering::AcqRel) {
            if short {
                tracing::error!(
                    path = %self.path.display(),
                    available,
                    reserve = self.reserve,
                    "the state filesystem is full: writes are refused until space is freed"
                );
            } else {
                tracing::warn!(path = %self.path.display(), available, "space freed: the store writes again");
            }
        }
        if short {
            return Err(StoreError::NoSpace {
                path: self.path.clone(),
                available,
                reserve: self.reserve,
            });
        }
        Ok(())
    }

    /// Marks the store failed for good (the first failure is kept).
    pub fn fail(&self, error: &StoreError) {
        self.failed.send_if_modified(|failed| {
            if failed.is_some() {
                return false;
            }
            *failed = Some(error.clone());
            true
        });
    }

    pub fn failure(&self) -> Option<StoreError> {
        self.failed.borrow().clone()
    }

    /// Resolves with the failure once there is one.
    pub fn failed(&self) -> impl Future<Output = StoreError> + Send + 'static {
        let mut failed = self.failed.subscribe();
        async move {
            let seen = failed
                .wait_for(Option::is_some)
                .await
                .map(|error| error.clone());
            match seen {
                Ok(error) => error.unwrap_or(StoreError::Closed),
                // The store is gone: it can fail no more.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Why a write would be refused now, if it would: the failure, or the
    /// lack of space (checked again here, so the store turns writable once
    /// space is freed, whether or not anyone writes).
    pub fn problem(&self) -> Option<StoreError> {
        if let Some(error) = self.failure() {
            return Some(error);
        }
        if self.short_of_space.load(Ordering::Acquire) {
            return self.check_space().err();
        }
        None
    }
}
