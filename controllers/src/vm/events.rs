//! The trigger: libvirt domain lifecycle events, as workload ids to
//! reconcile. Drift (a guest destroyed, crashed or started out of band) is
//! repaired because of these, within about a second — not by the resync.
//!
//! `virt` 0.5 has no safe event API, so this file holds the FFI: libvirt's
//! default event loop runs on a thread of its own (registered once per
//! process, before any connection is opened — keepalives need it too), and
//! a dedicated thread keeps an event connection with a lifecycle callback
//! registered. The callback only copies the domain's UUID into a channel;
//! an async task maps UUIDs to workload ids (a cache filled by reconciles,
//! else the domain's marks). When the connection closes (libvirtd
//! restarted), the thread reconnects with back-off, and every (re)connect
//! yields every VM workload and every managed domain, since whatever
//! happened meanwhile was not seen. A driver without events falls back to
//! a 1 s poll of all domains' states.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use persys_api::v1::WorkloadType;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use virt::connect::Connect;
use virt::sys;

use super::errors::LibvirtError;
use super::libvirt::{Connection, DomainState, Hypervisor, state_of};
use crate::backoff::Backoff;
use crate::informer::Cache;

/// How often the event thread checks that its connection and its consumer
/// are still there, and how often the fallback poll looks.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);
const POLL_INTERVAL: Duration = Duration::from_secs(1);

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop and runs it on a thread, once
/// per process; also silences libvirt's default error printer (errors are
/// reported through results). Returns why the loop is unavailable, if it
/// is.
pub(crate) fn ensure_event_loop() -> Result<(), String> {
    EVENT_LOOP
        .get_or_init(|| {
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl()
                .map_err(|e| format!("registering libvirt's event loop: {e}"))?;
            std::thread::Builder::new()
                .name("libvirt-event-loop".into())
                .spawn(|| {
                    loop {
                        if let Err(error) = virt::event::event_run_default_impl() {
                            tracing::warn!(%error, "libvirt event loop iteration failed");
                            std::thread::sleep(CHECK_INTERVAL);
                        }
                    }
                })
                .map(|_| ())
                .map_err(|e| format!("starting libvirt's event loop thread: {e}"))
        })
        .clone()
}

/// Which workload each known domain belongs to, by UUID: filled by
/// reconciles (and by the trigger itself), read by the trigger so most
/// events need no libvirt call. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct DomainIndex {
    /// A std lock: held only to read or write one entry.
    inner: Arc<RwLock<HashMap<String, String>>>,
}

impl DomainIndex {
    pub(crate) fn get(&self, uuid: &str) -> Option<String> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uuid)
            .cloned()
    }

    pub(crate) fn insert(&self, uuid: &str, workload_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uuid.to_string(), workload_id.to_string());
    }

    /// Forgets every domain of a workload.
    pub(crate) fn remove_workload(&self, workload_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, id| id != workload_id);
    }
}

/// What the event thread reports.
#[derive(Debug)]
enum Signal {
    /// (Re)connected: anything may have happened meanwhile.
    Connected,
    /// The domain's lifecycle changed.
    Domain { uuid: String },
}

/// Builds the trigger stream; see [`super::VmController::trigger`].
pub(crate) struct LifecycleTrigger {
    pub(crate) hypervisor: Hypervisor,
    pub(crate) scope: String,
    /// Every VM workload is queued on (re)connect.
    pub(crate) cache: Cache,
    pub(crate) index: DomainIndex,
    pub(crate) backoff: Backoff,
}

impl LifecycleTrigger {
    /// The ids to reconcile, for as long as the stream is polled; dropping
    /// it stops the event thread (within [`CHECK_INTERVAL`]).
    pub(crate) fn into_stream(self) -> BoxStream<'static, String> {
        let (tx, rx) = unbounded_channel();
        let uri = self.hypervisor.uri().to_string();
        let backoff = self.backoff;
        let spawned = std::thread::Builder::new()
            .name("persys-vm-events".into())
            .spawn(move || follow_events(&uri, backoff, tx));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the libvirt event thread; relying on the resync");
            return stream::pending().boxed();
        }
        stream::unfold(
            (self, rx),
            |(trigger, mut rx): (Self, UnboundedReceiver<Signal>)| async move {
                let signal = rx.recv().await?;
                let ids = trigger.resolve(signal).await;
                Some((stream::iter(ids), (trigger, rx)))
            },
        )
        .flatten()
        .boxed()
    }

    async fn resolve(&self, signal: Signal) -> Vec<String> {
        match signal {
            Signal::Connected => {
                let mut ids: BTreeSet<String> = self
                    .cache
                    .ids_of_type(WorkloadType::Vm)
                    .into_iter()
                    .collect();
                match self.hypervisor.list_managed(&self.scope).await {
                    Ok(managed) => {
                        for domain in managed {
                            if let Some(marks) = domain.marks {
                                self.index.insert(&domain.uuid, &marks.workload_id);
                                ids.insert(marks.workload_id);
                            }
                        }
                    }
                    Err(error) => tracing::debug!(%error, "listing managed domains failed"),
                }
                ids.into_iter().collect()
            }
            Signal::Domain { uuid } => {
                if let Some(id) = self.index.get(&uuid) {
                    return vec![id];
                }
                match self.hypervisor.marks(&uuid).await {
                    Ok(Some(marks)) if marks.scope == self.scope => {
                        self.index.insert(&uuid, &marks.workload_id);
                        vec![marks.workload_id]
                    }
                    Ok(_) => Vec::new(),
                    Err(error) => {
                        tracing::debug!(%error, uuid, "cannot read the marks of a domain");
                        Vec::new()
                    }
                }
            }
        }
    }
}

/// The event thread: connect, follow, reconnect — until nobody listens.
fn follow_events(uri: &str, backoff: Backoff, tx: UnboundedSender<Signal>) {
    let mut attempt: u32 = 0;
    while !tx.is_closed() {
        match EventConnection::open(uri, &tx) {
            Ok(connection) => {
                if attempt > 0 {
                    tracing::info!(uri, "reconnected to libvirt events");
                }
                attempt = 0;
                let _ = tx.send(Signal::Connected);
                connection.follow(&tx);
                if tx.is_closed() {
                    return;
                }
                tracing::warn!(uri, "libvirt event connection lost; reconnecting");
            }
            Err(error) => {
                if attempt == 0 {
                    tracing::warn!(uri, %error, "libvirt events unavailable; retrying");
                }
                attempt = attempt.saturating_add(1);
            }
        }
        let mut wait = backoff.delay(attempt.saturating_sub(1));
        while !wait.is_zero() && !tx.is_closed() {
            let step = wait.min(CHECK_INTERVAL);
            std::thread::sleep(step);
            wait -= step;
        }
    }
}

/// How an event connection learns about changes.
enum Mode {
    /// A registered lifecycle callback (its id).
    Events(c_int),
    /// The driver has no events: poll states.
    Poll,
}

/// A connection with the lifecycle callback registered; deregisters and
/// closes on drop.
struct EventConnection {
    connection: Connection,
    mode: Mode,
    /// Set by libvirt's close callback when the connection dies.
    closed: Arc<AtomicBool>,
    close_registered: bool,
}

impl EventConnection {
    fn open(uri: &str, tx: &UnboundedSender<Signal>) -> Result<EventConnection, LibvirtError> {
        ensure_event_loop().map_err(|message| {
            LibvirtError::new(
                virt::error::ErrorNumber::NoSupport,
                virt::error::ErrorDomain::Event,
                message,
            )
        })?;
        let connection = Connection::new(Connect::open(Some(uri))?);
        let _ = connection.set_keep_alive(5, 3);
        // SAFETY: the pointer is only used while `connection` lives.
        let raw = unsafe { connection.as_ptr() };

        let closed = Arc::new(AtomicBool::new(false));
        let close_state = Box::into_raw(Box::new(closed.clone())) as *mut c_void;
        // SAFETY: `on_close` matches virConnectCloseFunc; libvirt owns
        // `close_state` from here and frees it through `free_close`.
        let close_registered = unsafe {
            sys::virConnectRegisterCloseCallback(raw, Some(on_close), close_state, Some(free_close))
        } >= 0;
        if !close_registered {
            // libvirt did not take it; the flag is then polled through
            // `is_alive` instead. Leaking one Arc is cheaper than guessing
            // whether libvirt freed it.
            tracing::debug!("close callback not supported by this driver");
        }

        let sender = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
        // SAFETY: the lifecycle callback has virConnectDomainEventCallback's
        // signature; libvirt calls it with that signature for
        // VIR_DOMAIN_EVENT_ID_LIFECYCLE (the C API's
        // VIR_DOMAIN_EVENT_CALLBACK cast). `sender` is owned by libvirt
        // from here and freed through `free_sender`.
        let callback_id = unsafe {
            let callback: unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) -> c_int = on_lifecycle;
            let generic: unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void) =
                std::mem::transmute(callback as *const ());
            sys::virConnectDomainEventRegisterAny(
                raw,
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(generic),
                sender,
                Some(free_sender),
            )
        };
        let mode = if callback_id >= 0 {
            Mode::Events(callback_id)
        } else {
            let error = LibvirtError::from(virt::error::Error::last_error());
            tracing::warn!(%error, "libvirt lifecycle events unavailable; polling domain states every {POLL_INTERVAL:?}");
            Mode::Poll
        };
        Ok(EventConnection {
            connection,
            mode,
            closed,
            close_registered,
        })
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.connection.is_alive().unwrap_or(false)
    }

    /// Returns when the connection is lost or nobody listens any more.
    fn follow(&self, tx: &UnboundedSender<Signal>) {
        let mut states: HashMap<String, DomainState> = HashMap::new();
        let mut since_poll = POLL_INTERVAL;
        while self.is_open() && !tx.is_closed() {
            if matches!(self.mode, Mode::Poll) && since_poll >= POLL_INTERVAL {
                since_poll = Duration::ZERO;
                if let Err(error) = self.poll(&mut states, tx) {
                    tracing::debug!(%error, "polling domain states failed");
                }
            }
            std::thread::sleep(CHECK_INTERVAL);
            since_poll += CHECK_INTERVAL;
        }
    }

    /// One poll: reports the domains whose state changed or that went away.
    fn poll(
        &self,
        states: &mut HashMap<String, DomainState>,
        tx: &UnboundedSender<Signal>,
    ) -> Result<(), LibvirtError> {
        let mut seen = HashMap::new();
        for domain in self.connection.list_all_domains(0)? {
            let uuid = domain.uuid_string()?;
            let Ok(state) = state_of(&domain) else {
                continue;
            };
            if states.get(&uuid) != Some(&state) {
                let _ = tx.send(Signal::Domain { uuid: uuid.clone() });
            }
            seen.insert(uuid, state);
        }
        for gone in states.keys().filter(|u| !seen.contains_key(*u)) {
            let _ = tx.send(Signal::Domain { uuid: gone.clone() });
        }
        *states = seen;
        Ok(())
    }
}

impl Drop for EventConnection {
    fn drop(&mut self) {
        // SAFETY: `connection` is still open here; the ids and callbacks
        // are the ones registered on it. libvirt frees the opaque states.
        unsafe {
            let raw = self.connection.as_ptr();
            if let Mode::Events(id) = self.mode {
                sys::virConnectDomainEventDeregisterAny(raw, id);
            }
            if self.close_registered {
                sys::virConnectUnregisterCloseCallback(raw, Some(on_close));
            }
        }
    }
}

/// The lifecycle callback, on the event loop thread: copies the UUID out
/// (a local call, no RPC) and hands it over. Never panics, never blocks.
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    if domain.is_null() || opaque.is_null() {
        return 0;
    }
    // SAFETY: `opaque` is the sender boxed in `EventConnection::open`,
    // alive until `free_sender`; `domain` is valid during the callback.
    unsafe {
        let tx = &*(opaque as *const UnboundedSender<Signal>);
        let mut buffer = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        if sys::virDomainGetUUIDString(domain, buffer.as_mut_ptr()) == 0 {
            let uuid = CStr::from_ptr(buffer.as_ptr())
                .to_string_lossy()
                .into_owned();
            let _ = tx.send(Signal::Domain { uuid });
        }
    }
    0
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: boxed in `EventConnection::open`; libvirt frees it once.
        drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<Signal>) });
    }
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, _reason: c_int, opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: the flag boxed in `EventConnection::open`, alive until
        // `free_close`.
        unsafe { (*(opaque as *const Arc<AtomicBool>)).store(true, Ordering::Release) };
    }
}

unsafe extern "C" fn free_close(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: boxed in `EventConnection::open`; libvirt frees it once.
        drop(unsafe { Box::from_raw(opaque as *mut Arc<AtomicBool>) });
    }
}
