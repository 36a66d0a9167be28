//! One Watch stream's outbox: the events its task has taken from the store
//! and its connection has not sent yet.
//!
//! The outbox holds at most [`QUEUE_CAPACITY`] events; when it is full the
//! task stops reading the store and waits for the connection to take some
//! (the store's log keeps what it has not read). A client that stops
//! reading fills its HTTP/2 window, the connection stops taking events, and
//! the client falls behind the log. Once it is behind by more than
//! `max_backlog` changes, or its events have waited `max_unread`, the
//! stream is expired, as Kubernetes' watch cache closes a watcher that does
//! not keep up: what waits is dropped at once, the task ends, and the next
//! thing the connection sends is RESOURCE_EXHAUSTED saying how far behind
//! the client fell and from which resource version to watch again. A slow
//! client costs the node one bounded queue, for a bounded time.
//!
//! The objects of an initial list are not in version order, so the client
//! has no position in the log until it has taken the whole list: only the
//! time bound applies to it until then.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use persys_api::v1::WatchEvent;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Status;

/// Events an outbox holds: its memory bound (a few hundred KiB of objects).
pub const QUEUE_CAPACITY: usize = 256;

/// How far a Watch client may fall behind before its stream is expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchBounds {
    /// Changes the client may be behind the log (`PERSYS_WATCH_MAX_BACKLOG`).
    pub max_backlog: u64,
    /// How long events may wait without the connection taking one
    /// (`PERSYS_WATCH_MAX_UNREAD`).
    pub max_unread: Duration,
}

impl Default for WatchBounds {
    fn default() -> Self {
        WatchBounds {
            max_backlog: 10_000,
            max_unread: Duration::from_secs(60),
        }
    }
}

/// Why a stream was expired: the `reason` label of
/// `persys_agent_watch_expired_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The client was more than `max_backlog` changes behind the log.
    Backlog,
    /// Events had waited `max_unread` without the connection taking one.
    Unread,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Expiry::Backlog => "backlog",
            Expiry::Unread => "unread",
        }
    }
}

/// Why the task feeding an outbox must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client went away (the response stream was dropped).
    Gone,
    /// The client fell behind: the stream was expired.
    Expired(Expiry),
}

/// One event and the client's position in the log once it has it: `None`
/// for the objects of an initial list.
struct Entry {
    event: WatchEvent,
    position: Option<u64>,
}

struct State {
    queue: VecDeque<Entry>,
    /// When the connection last took an event, or when the queue last
    /// turned non-empty if that is later.
    waiting_since: Instant,
    /// The last resource version the client has every change through
    /// (that matches its filter): where it may watch again from. `None`
    /// until it has taken a whole initial list.
    position: Option<u64>,
    /// Sent once `queue` is empty: the status that ends the stream (`None`:
    /// the stream ends without one).
    end: Option<Option<Status>>,
    /// The response stream ended: nothing more to send.
    done: bool,
    /// The connection waiting for an event.
    waker: Option<Waker>,
}

/// What both ends share.
struct Shared {
    state: Mutex<State>,
    /// Notified when the connection takes an event (room in the queue).
    taken: tokio::sync::Notify,
}

/// The task's end of an outbox.
pub struct Sender {
    shared: Arc<Shared>,
    bounds: WatchBounds,
    /// The newest resource version of the log, as it moves.
    head: watch::Receiver<u64>,
    /// Cancelled when the response stream is dropped (the client went away).
    gone: CancellationToken,
}

/// The connection's end: the response stream of the Watch call.
pub struct Receiver {
    shared: Arc<Shared>,
    _gone: DropGuard,
}

/// An empty outbox for a client at `position` in the log (`None` while it
/// is sent an initial list), behind `head`.
pub fn outbox(
    bounds: WatchBounds,
    head: watch::Receiver<u64>,
    position: Option<u64>,
) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waiting_since: Instant::now(),
            position,
            end: None,
            done: false,
            waker: None,
        }),
        taken: tokio::sync::Notify::new(),
    });
    let gone = CancellationToken::new();
    (
        Sender {
            shared: shared.clone(),
            bounds,
            head,
            gone: gone.clone(),
        },
        Receiver {
            shared,
            _gone: gone.drop_guard(),
        },
    )
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state stays consistent whatever panicked while holding it.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

impl Sender {
    /// Queues `event`, after which the client is at `position` (`None`
    /// for an object of an initial list), once there is room. Expires the
    /// stream instead when the client falls too far behind.
    pub async fn push(&self, event: WatchEvent, position: Option<u64>) -> Result<(), Closed> {
        loop {
            if self.gone.is_cancelled() {
                return Err(Closed::Gone);
            }
            let taken = self.shared.taken.notified();
            let (deadline, limit) = {
                let mut state = lock(&self.shared.state);
                if let Some(expiry) = self.overdue(&state) {
                    return Err(self.expire(&mut state, expiry));
                }
                if state.queue.len() < QUEUE_CAPACITY {
                    if state.queue.is_empty() {
                        state.waiting_since = Instant::now();
                    }
                    state.queue.push_back(Entry { event, position });
                    state.wake();
                    return Ok(());
                }
                (
                    state.waiting_since + self.bounds.max_unread,
                    state
                        .position
                        .map(|at| at.saturating_add(self.bounds.max_backlog).saturating_add(1)),
                )
            };
            let mut head = self.head.clone();
            let passed = async move {
                match limit {
                    Some(limit) => {
                        let _ = head.wait_for(|v| *v >= limit).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = taken => {}
                _ = passed => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.gone.cancelled() => return Err(Closed::Gone),
            }
        }
    }

    /// The task has read the log through `version`: a client with nothing
    /// waiting has every change through it too.
    pub fn progress(&self, version: u64) {
        let mut state = lock(&self.shared.state);
        if state.queue.is_empty() && state.position.is_some() {
            state.position = Some(version);
        }
    }

    /// Whether the client has fallen too far behind to be sent more.
    fn overdue(&self, state: &State) -> Option<Expiry> {
        let head = *self.head.borrow();
        if state
            .position
            .is_some_and(|at| head.saturating_sub(at) > self.bounds.max_backlog)
        {
            Some(Expiry::Backlog)
        } else if !state.queue.is_empty() && state.waiting_since.elapsed() >= self.bounds.max_unread
        {
            Some(Expiry::Unread)
        } else {
            None
        }
    }

    /// Drops what waits and ends the stream with why.
    fn expire(&self, state: &mut State, expiry: Expiry) -> Closed {
        let head = *self.head.borrow();
        let status = expired_status(expiry, state, head, self.bounds);
        state.queue.clear();
        state.queue.shrink_to_fit();
        state.end = Some(Some(status));
        state.wake();
        Closed::Expired(expiry)
    }

    /// Ends the stream after the events queued, with `status` if given.
    pub fn finish(self, status: Option<Status>) {
        let mut state = lock(&self.shared.state);
        state.end = Some(status);
        state.wake();
    }

    /// Resolves when the client went away; it does not borrow the sender,
    /// so one can be kept across the sender's use.
    pub fn gone(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.gone.clone().cancelled_owned()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // A task that ends without `finish` (shutdown, a panic) ends the
        // stream too, after what it queued.
        let mut state = lock(&self.shared.state);
        if state.end.is_none() {
            state.end = Some(None);
        }
        state.wake();
    }
}

/// RESOURCE_EXHAUSTED, naming the bound that was passed and how to go on.
fn expired_status(expiry: Expiry, state: &State, head: u64, bounds: WatchBounds) -> Status {
    let waiting = state.queue.len();
    let why = match (expiry, state.position) {
        (Expiry::Backlog, Some(at)) => format!(
            "watch expired: the client fell behind by {} changes (resource_version {at} of {head}), more than PERSYS_WATCH_MAX_BACKLOG allows ({})",
            head.saturating_sub(at),
            bounds.max_backlog
        ),
        _ => format!(
            "watch expired: the client did not read for {} (PERSYS_WATCH_MAX_UNREAD), {waiting} events waiting",
            humantime::format_duration(bounds.max_unread)
        ),
    };
    let next = match state.position {
        Some(at) => format!(
            "every change through resource_version {at} was sent: watch again from {at}, or list again from 0"
        ),
        None => "the initial list was not all sent: list again from resource_version 0".to_string(),
    };
    Status::resource_exhausted(format!("{why}; {next}"))
}

impl Stream for Receiver {
    type Item = Result<WatchEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = lock(&self.shared.state);
        if state.done {
            return Poll::Ready(None);
        }
        if let Some(entry) = state.queue.pop_front() {
            state.waiting_since = Instant::now();
            if entry.position.is_some() {
                state.position = entry.position;
            }
            self.shared.taken.notify_one();
            return Poll::Ready(Some(Ok(entry.event)));
        }
        match state.end.take() {
            Some(status) => {
                state.done = true;
                Poll::Ready(status.map(Err))
            }
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use persys_api::v1::WatchEventType;

    fn event(version: u64) -> WatchEvent {
        WatchEvent {
            r#type: WatchEventType::Modified as i32,
            resource_version: version,
            object: None,
        }
    }

    fn bounds(max_backlog: u64) -> WatchBounds {
        WatchBounds {
            max_backlog,
            max_unread: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_client_that_keeps_up_gets_every_event_in_order_then_the_end() {
        let (head, versions) = watch::channel(0);
        let (tx, mut rx) = outbox(bounds(2), versions, Some(0));
        for version in 1..=1000 {
            head.send_replace(version);
            tx.push(event(version), Some(version)).await.unwrap();
            assert_eq!(rx.next().await.unwrap().unwrap().resource_version, version);
        }
        tx.push(event(1001), Some(1001)).await.unwrap();
        tx.finish(Some(Status::failed_precondition(
            "expired: gone from the log",
        )));
        assert_eq!(rx.next().await.unwrap().unwrap().resource_version, 1001);
        let end = rx.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::FailedPrecondition);
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_expired_past_the_backlog_and_told_where_to_resume() {
        let (head, versions) = watch::channel(10);
        let (tx, mut rx) = outbox(bounds(1000), versions, Some(10));
        head.send_replace(11);
        tx.push(event(11), Some(11)).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap().resource_version, 11);
        // The queue fills, and the task waits for room while the log moves on.
        for version in 12..12 + QUEUE_CAPACITY as u64 {
            head.send_replace(version);
            tx.push(event(version), Some(version)).await.unwrap();
        }
        let next = 12 + QUEUE_CAPACITY as u64;
        let waiting = tokio::spawn(async move { tx.push(event(next), Some(next)).await });
        head.send_replace(1011);
        tokio::task::yield_now().await;
        head.send_replace(1012);
        assert_eq!(
            waiting.await.unwrap(),
            Err(Closed::Expired(Expiry::Backlog))
        );
        // What waited is dropped: the status comes next, and nothing after it.
        let status = rx.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "watch expired: the client fell behind by 1001 changes (resource_version 11 of 1012), more than PERSYS_WATCH_MAX_BACKLOG allows (1000); every change through resource_version 11 was sent: watch again from 11, or list again from 0"
        );
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn a_client_filtered_out_of_the_changes_is_not_behind() {
        let (head, versions) = watch::channel(0);
        let (tx, _rx) = outbox(bounds(10), versions, Some(0));
        for version in 1..=100 {
            head.send_replace(version);
            tx.progress(version);
        }
        tx.push(event(100), Some(100)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_longer_than_the_queue_is_sent_as_the_client_takes_it_and_only_time_expires_it()
    {
        let (head, versions) = watch::channel(5);
        let (tx, mut rx) = outbox(bounds(1), versions, None);
        let reader = tokio::spawn(async move {
            let mut versions = Vec::new();
            while let Some(Ok(event)) = rx.next().await {
                versions.push(event.resource_version);
            }
            versions
        });
        head.send_replace(5_000);
        for version in 1..=1000 {
            tx.push(event(version), None).await.unwrap();
        }
        tx.finish(None);
        assert_eq!(reader.await.unwrap(), (1..=1000).collect::<Vec<_>>());

        // A client that takes none of it is expired after max_unread.
        let (_head, versions) = watch::channel(5);
        let (tx, mut rx) = outbox(bounds(1), versions, None);
        for version in 0..QUEUE_CAPACITY as u64 {
            tx.push(event(version), None).await.unwrap();
        }
        assert_eq!(
            tx.push(event(0), None).await,
            Err(Closed::Expired(Expiry::Unread))
        );
        let status = rx.next().await.unwrap().unwrap_err();
        assert_eq!(
            status.message(),
            "watch expired: the client did not read for 1m (PERSYS_WATCH_MAX_UNREAD), 256 events waiting; the initial list was not all sent: list again from resource_version 0"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_for_the_unread_bound_is_expired() {
        let (_head, versions) = watch::channel(0);
        let (tx, mut rx) = outbox(bounds(1000), versions, Some(0));
        tx.push(event(1), Some(1)).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        tx.push(event(2), Some(2)).await.unwrap();
        // Taking an event resets the clock.
        assert_eq!(rx.next().await.unwrap().unwrap().resource_version, 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        tx.push(event(3), Some(3)).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            tx.push(event(4), Some(4)).await,
            Err(Closed::Expired(Expiry::Unread))
        );
        let status = rx.next().await.unwrap().unwrap_err();
        assert_eq!(
            status.message(),
            "watch expired: the client did not read for 1m (PERSYS_WATCH_MAX_UNREAD), 2 events waiting; every change through resource_version 1 was sent: watch again from 1, or list again from 0"
        );
    }

    #[tokio::test]
    async fn a_client_that_went_away_stops_its_task() {
        let (_head, versions) = watch::channel(0);
        let (tx, rx) = outbox(bounds(10), versions, Some(0));
        drop(rx);
        tx.gone().await;
        assert_eq!(tx.push(event(1), Some(1)).await, Err(Closed::Gone));
    }
}
