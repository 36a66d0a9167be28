//! The link's state machine: register, heartbeat, back off, register again.
//!
//! ```text
//!            accepted                     acknowledged
//! Registering ───────▶ Heartbeating ◀──────────────┐
//!    ▲   │                 │  └────────────────────┘
//!    │   │ refused,        │ lease lapsed, not acknowledged,
//!    │   │ unreachable     │ node unknown, runtimes changed ──▶ Registering
//!    │   ▼                 │ unreachable
//!    └─ Backoff ◀──────────┘
//! ```

use std::time::{Duration, SystemTime};

use persys_api::control::v1::{
    HeartbeatRequest, HeartbeatResponse, RegisterNodeRequest, RegisterNodeResponse,
};
use persys_controllers::backoff::Backoff;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::drain::Drain;
use super::report::NodeReporter;
use super::status::{LinkPhase, LinkStatus};

/// Retries while the scheduler is unreachable: 1 s doubling, at most 30 s
/// with the jitter (which spreads a fleet reconnecting after a scheduler
/// restart).
pub const UNREACHABLE_BACKOFF: Backoff = Backoff {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(25),
    jitter: 0.2,
};

/// The heartbeat interval when the scheduler names none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The soonest a heartbeat follows the previous one, however close the
/// lease's end.
const MIN_HEARTBEAT_GAP: Duration = Duration::from_millis(100);

/// The longest heartbeat interval the link keeps to, whatever the scheduler
/// asks (it may name up to 68 years): a node silent for longer is lost to
/// any scheduler, and heartbeating more often than asked is harmless.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The furthest end of a lease the link plans by. The scheduler may name
/// any time a Timestamp holds (up to 292 billion years on), and a
/// monotonic deadline that far off overflows; a longer lease is held as
/// this long, and each heartbeat renews it anyway.
pub const MAX_LEASE: Duration = Duration::from_secs(365 * 24 * 3600);

/// The most of a scheduler's text (a refusal's reason, an error message)
/// the link keeps for its status and logs: the scheduler is a peer, and
/// what it says is shown in HealthCheck.
pub const MAX_PEER_TEXT: usize = 512;

/// Why a call to the scheduler failed. The link retries every one of them
/// (registering again, with backoff): an agent must rejoin by itself.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The certificate, key or CA cannot be read or used. Retried: a
    /// rotation may be half-written.
    #[error("TLS configuration for the scheduler link: {0}")]
    Tls(String),
    /// Name resolution or the connection failed. Retried with backoff.
    #[error("cannot reach the scheduler at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    /// The scheduler answered with an error. Retried; `NotFound` (the
    /// scheduler lost the node) registers again at once.
    #[error("{rpc}: {code:?}: {message}")]
    Rpc {
        rpc: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// A heartbeat without a registration's connection. Registers again.
    #[error("not connected to the scheduler")]
    NotConnected,
}

impl LinkError {
    /// The scheduler does not know this node: register again without
    /// waiting.
    pub fn is_unregistered(&self) -> bool {
        matches!(
            self,
            LinkError::Rpc {
                code: tonic::Code::NotFound,
                ..
            } | LinkError::NotConnected
        )
    }
}

/// The scheduler, as the link sees it. [`super::client::GrpcScheduler`]
/// speaks gRPC; the link's tests script a recording fake.
pub trait Scheduler: Send {
    /// Registers over a fresh connection (the TLS files are read again).
    fn register(
        &mut self,
        request: RegisterNodeRequest,
    ) -> impl Future<Output = Result<RegisterNodeResponse, LinkError>> + Send;

    /// Renews the lease over the last registration's connection.
    fn heartbeat(
        &mut self,
        request: HeartbeatRequest,
    ) -> impl Future<Output = Result<HeartbeatResponse, LinkError>> + Send;

    /// host:port the scheduler should dial this agent at.
    fn advertised_endpoint(&mut self) -> impl Future<Output = Result<String, LinkError>> + Send;
}

/// Where the link is; [`Link::step`] moves it on.
#[derive(Debug)]
pub enum State {
    /// Not registered — at start, after a failure, when the lease lapsed,
    /// a heartbeat was not acknowledged or the reachable runtimes changed:
    /// register. `failures` counts failed attempts in a row, for the backoff.
    Registering { failures: u32 },
    /// Registered: heartbeat at the scheduler's interval, and always before
    /// the lease runs out.
    Heartbeating(Lease),
    /// The scheduler was unreachable or refused the node: wait until
    /// `until`, then register again.
    Backoff { failures: u32, until: Instant },
}

/// An accepted registration.
#[derive(Debug)]
pub struct Lease {
    interval: Duration,
    /// When the scheduler will consider the node lost, on this clock; unknown
    /// when it named no time (or one already past, i.e. the clocks disagree).
    expires: Option<Instant>,
    next_heartbeat: Instant,
    /// What the registration offered; a change means registering again.
    supported_types: Vec<String>,
}

/// Registers this node with the scheduler and keeps it registered.
pub struct Link<S> {
    scheduler: S,
    reporter: NodeReporter,
    drain: Drain,
    status: watch::Sender<LinkStatus>,
    backoff: Backoff,
}

impl<S: Scheduler> Link<S> {
    /// The link and the receiver of its status.
    pub fn new(
        scheduler: S,
        scheduler_addr: &str,
        reporter: NodeReporter,
        drain: Drain,
        backoff: Backoff,
    ) -> (Self, watch::Receiver<LinkStatus>) {
        let (status, receiver) = watch::channel(LinkStatus {
            phase: LinkPhase::Registering,
            scheduler: Some(scheduler_addr.to_string()),
            node_id: reporter.node_id().to_string(),
            ..LinkStatus::standalone()
        });
        let link = Link {
            scheduler,
            reporter,
            drain,
            status,
            backoff,
        };
        (link, receiver)
    }

    /// Runs until `shutdown`. The scheduler has no deregistration: a stopped
    /// agent's lease lapses.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut state = State::Registering { failures: 0 };
        loop {
            state = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = self.step(state) => next,
            };
        }
        tracing::info!("scheduler link stopped");
    }

    pub async fn step(&mut self, state: State) -> State {
        match state {
            State::Registering { failures } => self.register(failures).await,
            State::Heartbeating(lease) => self.heartbeat(lease).await,
            State::Backoff { failures, until } => {
                tokio::time::sleep_until(until).await;
                State::Registering { failures }
            }
        }
    }

    async fn register(&mut self, failures: u32) -> State {
        self.status.send_modify(|s| {
            s.phase = LinkPhase::Registering;
            s.registered = false;
            s.retry_at = None;
        });
        let endpoint = match self.scheduler.advertised_endpoint().await {
            Ok(endpoint) => endpoint,
            Err(error) => return self.failed(failures, error.to_string()),
        };
        let request = self.reporter.registration(endpoint.clone());
        let supported_types = request
            .capabilities
            .as_ref()
            .map(|c| c.supported_workload_types.clone())
            .unwrap_or_default();
        let response = match self.scheduler.register(request).await {
            Ok(response) => response,
            Err(error) => return self.failed(failures, error.to_string()),
        };
        if !response.accepted {
            return self.failed(
                failures,
                format!(
                    "the scheduler refused the registration: {}",
                    peer_text(&response.reason)
                ),
            );
        }
        let now = Instant::now();
        let interval = interval(response.heartbeat_interval_seconds);
        let lease_end = lease_end(response.lease_expires_at);
        let expires = lease_end.and_then(|end| lease_deadline(end, now));
        tracing::info!(
            node_id = %self.reporter.node_id(),
            %endpoint,
            ?interval,
            supported_types = ?supported_types,
            "registered with the scheduler"
        );
        self.status.send_modify(|s| {
            s.phase = LinkPhase::Heartbeating;
            s.registered = true;
            s.lease_expires_at = lease_end;
            s.last_error = None;
        });
        State::Heartbeating(Lease {
            interval,
            expires,
            next_heartbeat: next_heartbeat(now, interval, expires),
            supported_types,
        })
    }

    async fn heartbeat(&mut self, mut lease: Lease) -> State {
        tokio::time::sleep_until(lease.next_heartbeat).await;
        let now = Instant::now();
        if lease.expires.is_some_and(|expires| expires <= now) {
            tracing::warn!("the lease with the scheduler lapsed; registering again");
            return State::Registering { failures: 0 };
        }
        let supported_types = self.reporter.supported_workload_types();
        if supported_types != lease.supported_types {
            tracing::info!(
                before = ?lease.supported_types,
                now = ?supported_types,
                "reachable runtimes changed; registering again"
            );
            return State::Registering { failures: 0 };
        }
        let response = match self.scheduler.heartbeat(self.reporter.heartbeat()).await {
            Ok(response) => response,
            Err(error) if error.is_unregistered() => {
                tracing::warn!(%error, "the scheduler does not know this node; registering again");
                self.status.send_modify(|s| s.registered = false);
                return State::Registering { failures: 0 };
            }
            Err(error) => return self.failed(0, error.to_string()),
        };
        if !response.acknowledged {
            tracing::warn!("the scheduler did not acknowledge the heartbeat; registering again");
            self.status.send_modify(|s| {
                s.registered = false;
                s.last_error = Some("heartbeat not acknowledged".into());
            });
            return State::Registering { failures: 0 };
        }
        self.drain.set(response.drain_node);
        // No lease named: the last one stands.
        let lease_end = lease_end(response.lease_expires_at);
        if let Some(end) = lease_end {
            lease.expires = lease_deadline(end, now);
        }
        lease.next_heartbeat = next_heartbeat(Instant::now(), lease.interval, lease.expires);
        self.status.send_modify(|s| {
            s.last_heartbeat = Some(SystemTime::now());
            s.draining = response.drain_node;
            if lease_end.is_some() {
                s.lease_expires_at = lease_end;
            }
            s.last_error = None;
        });
        State::Heartbeating(lease)
    }

    fn failed(&mut self, failures: u32, error: String) -> State {
        let error = peer_text(&error);
        let delay = self.backoff.delay(failures);
        tracing::warn!(%error, retry_in = ?delay, "scheduler link failed");
        self.status.send_modify(|s| {
            s.phase = LinkPhase::Backoff;
            s.registered = false;
            s.last_error = Some(error);
            s.retry_at = Some(SystemTime::now() + delay);
        });
        State::Backoff {
            failures: failures.saturating_add(1),
            until: Instant::now() + delay,
        }
    }
}

/// The heartbeat interval the scheduler asked for, within
/// [`MAX_INTERVAL`]; [`DEFAULT_INTERVAL`] when it named none.
fn interval(seconds: i32) -> Duration {
    match u64::try_from(seconds) {
        Ok(seconds) if seconds > 0 => Duration::from_secs(seconds).min(MAX_INTERVAL),
        _ => DEFAULT_INTERVAL,
    }
}

/// At most [`MAX_PEER_TEXT`] bytes of `text`, cut at a character boundary.
fn peer_text(text: &str) -> String {
    if text.len() <= MAX_PEER_TEXT {
        return text.to_string();
    }
    let mut end = MAX_PEER_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

/// The lease's end on this clock, from its end on the scheduler's: at most
/// [`MAX_LEASE`] from `now`, so no peer-supplied time can overflow the
/// monotonic clock.
fn lease_deadline(lease_end: SystemTime, now: Instant) -> Option<Instant> {
    match lease_end.duration_since(SystemTime::now()) {
        Ok(remaining) => now.checked_add(remaining.min(MAX_LEASE)),
        Err(_) => {
            tracing::warn!(
                lease_expires_at = %humantime::format_rfc3339_millis(lease_end),
                "the scheduler's lease ends in the past by this clock; are the clocks in sync? Heartbeating at the interval"
            );
            None
        }
    }
}

/// The end of the lease the scheduler named in a `google.protobuf.Timestamp`
/// (generic over the Timestamp type, which converts to `SystemTime`). None
/// when it named none: unset, or not after the Unix epoch (Go's zero
/// `time.Time` encodes as year 1), or beyond what `SystemTime` holds.
pub(super) fn lease_end<T>(timestamp: Option<T>) -> Option<SystemTime>
where
    SystemTime: TryFrom<T>,
{
    SystemTime::try_from(timestamp?)
        .ok()
        .filter(|end| *end > SystemTime::UNIX_EPOCH)
}

/// After `interval`, or halfway to the lease's end if that is sooner, so a
/// failed heartbeat still leaves time to retry before the lease lapses.
fn next_heartbeat(now: Instant, interval: Duration, expires: Option<Instant>) -> Instant {
    let gap = match expires {
        Some(expires) => interval.min(expires.saturating_duration_since(now) / 2),
        None => interval,
    };
    let gap = gap.clamp(MIN_HEARTBEAT_GAP, MAX_INTERVAL);
    now.checked_add(gap).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use persys_controllers::Cache;

    use super::*;
    use crate::config::Config;
    use crate::node::NodeSampler;
    use crate::runtimes::{HEALTHY, RuntimeBoard};

    /// What the fake scheduler answers, in order; the last answer repeats.
    #[derive(Debug, Clone, Copy)]
    enum Reply {
        /// Registration accepted with this interval and a lease ending this
        /// many seconds from now (0: none).
        Accept {
            interval: i32,
            lease_in: u64,
        },
        Refuse(&'static str),
        /// Heartbeat acknowledged; a lease of 0 leaves it as it was.
        Ack {
            drain: bool,
            lease_in: u64,
        },
        Nack,
        Unreachable,
        UnknownNode,
    }

    #[derive(Debug)]
    enum Call {
        Register(Box<RegisterNodeRequest>),
        Heartbeat,
    }

    /// A scheduler that answers from a script and records each call with the
    /// (paused) time it came at.
    struct ScriptedScheduler {
        registrations: VecDeque<Reply>,
        heartbeats: VecDeque<Reply>,
        calls: Arc<Mutex<Vec<(Instant, Call)>>>,
    }

    fn next(script: &mut VecDeque<Reply>) -> Reply {
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            *script.front().expect("a scripted reply")
        }
    }

    /// A Timestamp this many whole seconds from now, as the scheduler
    /// sends; none for 0.
    fn unix_in<T: From<SystemTime>>(seconds: u64) -> Option<T> {
        if seconds == 0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Saturates at the last second a Timestamp holds, as a hostile
        // scheduler may send.
        let end = now.saturating_add(seconds).min(i64::MAX as u64);
        Some((SystemTime::UNIX_EPOCH + Duration::from_secs(end)).into())
    }

    fn failure(reply: Reply) -> LinkError {
        match reply {
            Reply::UnknownNode => LinkError::Rpc {
                rpc: "Heartbeat",
                code: tonic::Code::NotFound,
                message: "node not registered".into(),
            },
            _ => LinkError::Unreachable {
                addr: "sched:8085".into(),
                detail: "connection refused".into(),
            },
        }
    }

    impl Scheduler for ScriptedScheduler {
        async fn register(
            &mut self,
            request: RegisterNodeRequest,
        ) -> Result<RegisterNodeResponse, LinkError> {
            self.calls
                .lock()
                .unwrap()
                .push((Instant::now(), Call::Register(Box::new(request))));
            match next(&mut self.registrations) {
                Reply::Accept { interval, lease_in } => Ok(RegisterNodeResponse {
                    accepted: true,
                    reason: "registered".into(),
                    heartbeat_interval_seconds: interval,
                    lease_expires_at: unix_in(lease_in),
                }),
                Reply::Refuse(reason) => Ok(RegisterNodeResponse {
                    accepted: false,
                    reason: reason.into(),
                    ..Default::default()
                }),
                other => Err(failure(other)),
            }
        }

        async fn heartbeat(
            &mut self,
            _request: HeartbeatRequest,
        ) -> Result<HeartbeatResponse, LinkError> {
            self.calls
                .lock()
                .unwrap()
                .push((Instant::now(), Call::Heartbeat));
            match next(&mut self.heartbeats) {
                Reply::Ack { drain, lease_in } => Ok(HeartbeatResponse {
                    acknowledged: true,
                    drain_node: drain,
                    lease_expires_at: unix_in(lease_in),
                }),
                Reply::Nack => Ok(HeartbeatResponse::default()),
                other => Err(failure(other)),
            }
        }

        async fn advertised_endpoint(&mut self) -> Result<String, LinkError> {
            Ok("10.0.0.7:50051".into())
        }
    }

    struct Fixture {
        link: Link<ScriptedScheduler>,
        status: watch::Receiver<LinkStatus>,
        drain: Drain,
        board: RuntimeBoard,
        calls: Arc<Mutex<Vec<(Instant, Call)>>>,
    }

    impl Fixture {
        fn new(registrations: &[Reply], heartbeats: &[Reply]) -> Fixture {
            let config = Config::try_parse_from_iter(["persys-agent", "--node-id", "n1"]).unwrap();
            let board = RuntimeBoard::default();
            let reporter = NodeReporter::new(
                &config,
                Cache::default(),
                NodeSampler::default(),
                board.clone(),
                None,
            );
            let calls = Arc::new(Mutex::new(Vec::new()));
            let scheduler = ScriptedScheduler {
                registrations: registrations.iter().copied().collect(),
                heartbeats: heartbeats.iter().copied().collect(),
                calls: calls.clone(),
            };
            let drain = Drain::new();
            let (link, status) = Link::new(
                scheduler,
                "sched:8085",
                reporter,
                drain.clone(),
                UNREACHABLE_BACKOFF,
            );
            Fixture {
                link,
                status,
                drain,
                board,
                calls,
            }
        }

        /// Steps until `stop` holds for the new state, at most `limit` steps.
        async fn step_until(
            &mut self,
            mut state: State,
            limit: usize,
            stop: impl Fn(&State) -> bool,
        ) -> State {
            for _ in 0..limit {
                state = self.link.step(state).await;
                if stop(&state) {
                    return state;
                }
            }
            panic!("no such state within {limit} steps; last: {state:?}");
        }

        fn register_times(&self) -> Vec<Instant> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, c)| matches!(c, Call::Register(_)))
                .map(|(at, _)| *at)
                .collect()
        }

        fn heartbeat_times(&self) -> Vec<Instant> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, c)| matches!(c, Call::Heartbeat))
                .map(|(at, _)| *at)
                .collect()
        }
    }

    fn is_registering(state: &State) -> bool {
        matches!(state, State::Registering { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_scheduler_is_retried_from_one_second_doubling_to_thirty() {
        let mut f = Fixture::new(&[Reply::Unreachable], &[]);
        let mut state = State::Registering { failures: 0 };
        for _ in 0..16 {
            state = f.link.step(state).await;
        }
        let times = f.register_times();
        assert_eq!(times.len(), 8);
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, nominal) in gaps.iter().zip([1, 2, 4, 8, 16, 25, 25]) {
            let nominal = Duration::from_secs(nominal);
            assert!(*gap >= nominal, "{gaps:?}");
            assert!(*gap <= nominal.mul_f64(1.2), "{gaps:?}");
            assert!(*gap <= Duration::from_secs(30), "{gaps:?}");
        }
        let status = f.status.borrow().clone();
        assert_eq!(status.phase, LinkPhase::Backoff);
        assert!(!status.registered);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("connection refused")),
            "{status:?}"
        );
        assert!(status.retry_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_registration_backs_off_and_says_why() {
        let mut f = Fixture::new(&[Reply::Refuse("scheduler degraded")], &[]);
        let state = f.link.step(State::Registering { failures: 0 }).await;
        assert!(
            matches!(state, State::Backoff { failures: 1, .. }),
            "{state:?}"
        );
        let status = f.status.borrow().clone();
        assert_eq!(status.phase, LinkPhase::Backoff);
        assert_eq!(
            status.last_error.as_deref(),
            Some("the scheduler refused the registration: scheduler degraded")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_follow_the_interval_and_come_before_the_lease_ends() {
        // The lease (20 s) is shorter than the interval (60 s): the first
        // heartbeat goes out halfway to its end, then at the interval once
        // the lease is long.
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 60,
                lease_in: 20,
            }],
            &[Reply::Ack {
                drain: false,
                lease_in: 600,
            }],
        );
        let mut state = f.link.step(State::Registering { failures: 0 }).await;
        assert!(matches!(state, State::Heartbeating(_)), "{state:?}");
        assert!(f.status.borrow().registered);
        assert_eq!(f.status.borrow().phase, LinkPhase::Heartbeating);
        for _ in 0..3 {
            state = f.link.step(state).await;
        }
        let registered = f.register_times()[0];
        let beats = f.heartbeat_times();
        assert_eq!(beats.len(), 3);
        let first = beats[0] - registered;
        assert!(
            first >= Duration::from_secs(9) && first <= Duration::from_secs(10),
            "{first:?}"
        );
        assert_eq!(beats[1] - beats[0], Duration::from_secs(60));
        assert_eq!(beats[2] - beats[1], Duration::from_secs(60));
        assert!(f.status.borrow().last_heartbeat.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_beyond_any_clock_is_held_as_a_year_and_heartbeats_go_on() {
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 1,
                lease_in: u64::MAX,
            }],
            &[Reply::Ack {
                drain: false,
                lease_in: u64::MAX,
            }],
        );
        let registered = Instant::now();
        let state = f
            .step_until(State::Registering { failures: 0 }, 1, |s| {
                matches!(s, State::Heartbeating(_))
            })
            .await;
        let State::Heartbeating(lease) = &state else {
            unreachable!()
        };
        assert_eq!(lease.expires, Some(registered + MAX_LEASE));
        assert_eq!(lease.next_heartbeat, registered + Duration::from_secs(1));
        let mut state = state;
        for _ in 0..3 {
            state = f.link.step(state).await;
            assert!(matches!(state, State::Heartbeating(_)), "{state:?}");
        }
        assert_eq!(f.heartbeat_times().len(), 3);
        let status = f.status.borrow().clone();
        assert!(status.registered);
        assert!(
            status
                .summary()
                .contains("lease until after 9999-12-31T23:59:59Z"),
            "{}",
            status.summary()
        );
    }

    #[test]
    fn peer_supplied_intervals_and_texts_are_bounded() {
        assert_eq!(interval(0), DEFAULT_INTERVAL);
        assert_eq!(interval(-5), DEFAULT_INTERVAL);
        assert_eq!(interval(7), Duration::from_secs(7));
        assert_eq!(interval(i32::MAX), MAX_INTERVAL);
        let now = Instant::now();
        assert_eq!(next_heartbeat(now, Duration::MAX, None), now + MAX_INTERVAL);
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64);
        assert_eq!(lease_deadline(far, now), Some(now + MAX_LEASE));
        assert_eq!(peer_text("refused"), "refused");
        let long = "é".repeat(MAX_PEER_TEXT);
        let cut = peer_text(&long);
        assert!(cut.len() < MAX_PEER_TEXT + 32, "{}", cut.len());
        assert!(cut.ends_with(&format!("… ({} bytes cut)", long.len() - MAX_PEER_TEXT)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_interval_means_ten_seconds() {
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 0,
                lease_in: 0,
            }],
            &[Reply::Ack {
                drain: false,
                lease_in: 0,
            }],
        );
        let mut state = State::Registering { failures: 0 };
        for _ in 0..3 {
            state = f.link.step(state).await;
        }
        let beats = f.heartbeat_times();
        assert_eq!(beats[1] - beats[0], DEFAULT_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_is_not_renewed_lapses_into_registering_again() {
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 60,
                lease_in: 4,
            }],
            &[Reply::Ack {
                drain: false,
                lease_in: 0,
            }],
        );
        let state = f
            .step_until(State::Registering { failures: 0 }, 100, is_registering)
            .await;
        assert!(matches!(state, State::Registering { failures: 0 }));
        let lapsed = Instant::now() - f.register_times()[0];
        assert!(
            lapsed >= Duration::from_secs(3) && lapsed <= Duration::from_millis(4100),
            "{lapsed:?}"
        );
        assert!(f.heartbeat_times().len() >= 2, "heartbeats kept trying");
        f.link.step(state).await;
        assert_eq!(f.register_times().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_heartbeat_or_an_unknown_node_registers_again_at_once() {
        let accept = Reply::Accept {
            interval: 1,
            lease_in: 60,
        };
        for reply in [Reply::Nack, Reply::UnknownNode] {
            let mut f = Fixture::new(&[accept], &[reply]);
            let registered = f.link.step(State::Registering { failures: 0 }).await;
            let state = f.link.step(registered).await;
            assert!(
                matches!(state, State::Registering { failures: 0 }),
                "{reply:?}: {state:?}"
            );
            assert!(!f.status.borrow().registered, "{reply:?}");
        }
        // A scheduler that cannot be reached is backed off from instead.
        let mut f = Fixture::new(&[accept], &[Reply::Unreachable]);
        let registered = f.link.step(State::Registering { failures: 0 }).await;
        let state = f.link.step(registered).await;
        assert!(matches!(state, State::Backoff { .. }), "{state:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_follows_the_latest_heartbeat_and_outlives_an_outage() {
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 1,
                lease_in: 60,
            }],
            &[
                Reply::Ack {
                    drain: true,
                    lease_in: 60,
                },
                Reply::Unreachable,
                Reply::Ack {
                    drain: false,
                    lease_in: 60,
                },
            ],
        );
        let mut state = f.link.step(State::Registering { failures: 0 }).await;
        state = f.link.step(state).await;
        assert!(f.drain.is_draining());
        assert!(f.status.borrow().draining);
        // The scheduler is away: its last word stands.
        state = f.link.step(state).await;
        assert!(matches!(state, State::Backoff { .. }), "{state:?}");
        assert!(f.drain.is_draining());
        let state = f
            .step_until(state, 10, |s| matches!(s, State::Heartbeating(_)))
            .await;
        assert!(f.drain.is_draining(), "registering does not lift the drain");
        f.link.step(state).await;
        assert!(!f.drain.is_draining());
        assert!(!f.status.borrow().draining);
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_that_becomes_reachable_is_offered_by_registering_again() {
        let mut f = Fixture::new(
            &[Reply::Accept {
                interval: 5,
                lease_in: 60,
            }],
            &[Reply::Ack {
                drain: false,
                lease_in: 60,
            }],
        );
        let mut state = f.link.step(State::Registering { failures: 0 }).await;
        state = f.link.step(state).await;
        assert_eq!(f.heartbeat_times().len(), 1);
        f.board.set("docker", HEALTHY);
        state = f.link.step(state).await;
        assert!(is_registering(&state), "{state:?}");
        f.link.step(state).await;
        let calls = f.calls.lock().unwrap();
        let offered: Vec<Vec<String>> = calls
            .iter()
            .filter_map(|(_, call)| match call {
                Call::Register(request) => Some(
                    request
                        .capabilities
                        .clone()
                        .unwrap_or_default()
                        .supported_workload_types,
                ),
                Call::Heartbeat => None,
            })
            .collect();
        assert_eq!(offered, [vec![], vec!["container".to_string()]]);
        let Some((_, Call::Register(request))) = calls.last() else {
            panic!("{calls:?}");
        };
        assert_eq!(request.node_id, "n1");
        assert_eq!(request.grpc_endpoint, "10.0.0.7:50051");
    }
}
