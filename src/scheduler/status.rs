//! What the link reports about itself: a snapshot for HealthCheck and logs.

use std::time::SystemTime;

use tokio::sync::watch;

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    /// No scheduler configured.
    Standalone,
    /// Dialling the scheduler and registering.
    Registering,
    /// Registered and renewing the lease.
    Heartbeating,
    /// The last attempt failed; waiting before registering again.
    Backoff,
}

/// A snapshot of the link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkStatus {
    pub phase: LinkPhase,
    /// host:port of the scheduler; none when standalone.
    pub scheduler: Option<String>,
    /// The id this node registers under.
    pub node_id: String,
    /// True from an accepted registration until the link fails or the
    /// scheduler stops acknowledging.
    pub registered: bool,
    /// When the lease runs out, by the scheduler's clock.
    pub lease_expires_at: Option<SystemTime>,
    /// The last acknowledged heartbeat.
    pub last_heartbeat: Option<SystemTime>,
    /// Why the last attempt failed; cleared by the next success.
    pub last_error: Option<String>,
    /// When the next registration attempt is due, while backing off.
    pub retry_at: Option<SystemTime>,
    /// The scheduler's last word on draining.
    pub draining: bool,
}

impl LinkStatus {
    pub fn standalone() -> Self {
        LinkStatus {
            phase: LinkPhase::Standalone,
            scheduler: None,
            node_id: String::new(),
            registered: false,
            lease_expires_at: None,
            last_heartbeat: None,
            last_error: None,
            retry_at: None,
            draining: false,
        }
    }

    /// A receiver that always reads "standalone".
    pub fn standalone_watch() -> watch::Receiver<LinkStatus> {
        watch::channel(LinkStatus::standalone()).1
    }

    /// One line for HealthCheck's `runtime_status["scheduler"]`.
    pub fn summary(&self) -> String {
        let at = rfc3339;
        let scheduler = self.scheduler.as_deref().unwrap_or("?");
        let error = self
            .last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default();
        match self.phase {
            LinkPhase::Standalone => "standalone (PERSYS_SCHEDULER_ADDR is not set)".to_string(),
            LinkPhase::Registering => format!("registering with {scheduler}{error}"),
            LinkPhase::Heartbeating => {
                let lease = self
                    .lease_expires_at
                    .map(at)
                    .unwrap_or_else(|| "unknown".into());
                let heartbeat = self
                    .last_heartbeat
                    .map(at)
                    .unwrap_or_else(|| "none yet".into());
                format!(
                    "registered with {scheduler} as {}; lease until {lease}; last heartbeat {heartbeat}",
                    self.node_id
                )
            }
            LinkPhase::Backoff => {
                let retry = self
                    .retry_at
                    .map(|t| format!("; retrying at {}", at(t)))
                    .unwrap_or_default();
                format!("not registered with {scheduler}{error}{retry}")
            }
        }
    }
}

/// `time` in RFC 3339 to the second. humantime formats years up to 9999
/// and fails beyond (where `to_string` would panic); a lease the scheduler
/// set further away is written as such.
pub fn rfc3339(time: SystemTime) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_seconds(time)) {
        Ok(()) => text,
        Err(_) => "after 9999-12-31T23:59:59Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn the_summary_says_where_the_link_is_and_why() {
        assert_eq!(
            LinkStatus::standalone_watch().borrow().summary(),
            "standalone (PERSYS_SCHEDULER_ADDR is not set)"
        );
        let mut status = LinkStatus {
            phase: LinkPhase::Heartbeating,
            scheduler: Some("sched:8085".into()),
            node_id: "node-1".into(),
            registered: true,
            lease_expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            ..LinkStatus::standalone()
        };
        assert_eq!(
            status.summary(),
            "registered with sched:8085 as node-1; lease until 2027-01-15T08:00:00Z; last heartbeat none yet"
        );
        // A lease the scheduler set beyond what a date can say.
        status.lease_expires_at = Some(UNIX_EPOCH + Duration::from_secs(i64::MAX as u64));
        assert_eq!(
            status.summary(),
            "registered with sched:8085 as node-1; lease until after 9999-12-31T23:59:59Z; last heartbeat none yet"
        );
        status.phase = LinkPhase::Backoff;
        status.last_error = Some("connection refused".into());
        status.retry_at = Some(UNIX_EPOCH + Duration::from_secs(1_800_000_004));
        assert_eq!(
            status.summary(),
            "not registered with sched:8085; last error: connection refused; retrying at 2027-01-15T08:00:04Z"
        );
    }
}
