//! Attaching to a VM's serial console (`virDomainOpenConsole`).
//!
//! Each session has a libvirt connection of its own, so a console held
//! open never shares a connection (and its lock) with the controller's
//! calls. The stream is non-blocking and driven by one thread: libvirt's
//! event loop (see `events.rs`) wakes it when the console has output or
//! room for input, the client's input arrives through a bounded channel,
//! and output leaves through another. The stream callback is one-shot,
//! re-armed by the thread once it has drained the stream, so a slow reader
//! never makes the event loop spin.

use std::os::raw::{c_int, c_void};

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use persys_api::v1::Workload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::stream::Stream;
use virt::sys;

use super::errors::LibvirtError;
use super::io::VmIo;
use super::libvirt::Connection;
use crate::kit::io::{IoError, IoStream};

/// Console output pieces held for a slow client; beyond this the console
/// is not read (the guest's serial port then blocks, as on real hardware).
const OUTPUT_BUFFER: usize = 16;
/// Wake-ups queued for the session thread (stream events, input, close).
const WAKE_BUFFER: usize = 32;
/// Input accepted but not yet taken by the console: beyond this the
/// session fails rather than buffer without bound.
const MAX_PENDING_INPUT: usize = 1024 * 1024;
/// Bytes read from the console at once.
const READ_SIZE: usize = 16 * 1024;

const WATCHED: sys::virStreamEventType =
    sys::VIR_STREAM_EVENT_READABLE | sys::VIR_STREAM_EVENT_ERROR | sys::VIR_STREAM_EVENT_HANGUP;

/// What wakes the session thread.
enum Wake {
    /// The stream has output, room for input, or ended.
    Stream,
    /// Bytes the client typed.
    Input(Bytes),
    /// The client went away.
    Close,
}

pub(crate) fn attach(
    io: &VmIo,
    workload: &Workload,
    force: bool,
    input: BoxStream<'static, Bytes>,
) -> IoStream<Bytes> {
    let hypervisor = io.hypervisor.clone();
    let id = workload.id().to_string();
    let uuid = workload
        .status
        .as_ref()
        .map(|s| s.runtime_ref.clone())
        .unwrap_or_default();
    stream::once(async move {
        if uuid.is_empty() {
            return Err(IoError::NotReady(format!(
                "workload {id} has no domain yet"
            )));
        }
        let runtime = |e: super::errors::VmError| IoError::Runtime(e.to_string());
        let marks = hypervisor.marks(&uuid).await.map_err(runtime)?;
        if marks.is_none_or(|m| m.workload_id != id) {
            return Err(IoError::NotReady(format!(
                "workload {id} has no domain of its own (not defined yet, or being replaced)"
            )));
        }
        let state = hypervisor.state(&id, &uuid).await.map_err(runtime)?;
        match state {
            Some(state) if state.power.is_active() => {}
            Some(state) => {
                return Err(IoError::NotReady(format!(
                    "workload {id}: the VM is {}; its console needs it running",
                    state.power.name()
                )));
            }
            None => {
                return Err(IoError::NotReady(format!("workload {id} has no domain")));
            }
        }
        Ok(start(hypervisor.uri().to_string(), id, uuid, force, input))
    })
    .try_flatten()
    .boxed()
}

/// Starts the session thread and the input pump.
fn start(
    uri: String,
    id: String,
    uuid: String,
    force: bool,
    mut input: BoxStream<'static, Bytes>,
) -> IoStream<Bytes> {
    let (out_tx, out_rx) = mpsc::channel(OUTPUT_BUFFER);
    let (wake_tx, wake_rx) = mpsc::channel(WAKE_BUFFER);
    let waker = wake_tx.clone();
    let spawned = std::thread::Builder::new()
        .name("vm-console".into())
        .spawn({
            let out_tx = out_tx.clone();
            let id = id.clone();
            move || session(&uri, &id, &uuid, force, waker, wake_rx, out_tx)
        });
    if let Err(error) = spawned {
        return crate::kit::io::failed(IoError::Runtime(format!(
            "workload {id}: cannot start a console thread: {error}"
        )));
    }
    drop(out_tx);
    let forward = wake_tx.clone();
    tokio::spawn(async move {
        loop {
            let bytes = tokio::select! {
                _ = forward.closed() => break,
                bytes = input.next() => bytes,
            };
            // The client stops typing: the console goes on showing output.
            let Some(bytes) = bytes else { break };
            if forward.send(Wake::Input(bytes)).await.is_err() {
                break;
            }
        }
    });
    let guard = CloseOnDrop(wake_tx);
    ReceiverStream::new(out_rx)
        .map(move |item| {
            let _ = &guard;
            item
        })
        .boxed()
}

/// Wakes the session thread to end when the client's stream is dropped.
/// (When the queue is full the thread is awake anyway, and sees the
/// output channel closed.)
struct CloseOnDrop(mpsc::Sender<Wake>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.try_send(Wake::Close);
    }
}

/// How a session ended.
enum Ended {
    /// The console closed (the domain stopped, or another session took it).
    Finished,
    /// The client went away, or the stream failed.
    Aborted,
}

/// The session thread: connect, open the console, pump until either side
/// ends, then release the console.
fn session(
    uri: &str,
    id: &str,
    uuid: &str,
    force: bool,
    waker: mpsc::Sender<Wake>,
    mut wakes: mpsc::Receiver<Wake>,
    out: mpsc::Sender<Result<Bytes, IoError>>,
) {
    let fail = |error: IoError| {
        let _ = out.blocking_send(Err(error));
    };
    let runtime = |what: &str, error: virt::error::Error| {
        IoError::Runtime(format!(
            "workload {id}: {what}: {}",
            LibvirtError::from(error)
        ))
    };
    let connection = match Connect::open(Some(uri)) {
        Ok(connect) => Connection::new(connect),
        Err(error) => return fail(runtime("connecting to libvirt", error)),
    };
    let domain = match connection.lookup_domain_by_uuid_string(uuid) {
        Ok(domain) => domain,
        Err(error) => return fail(runtime("looking up its domain", error)),
    };
    let stream = match Stream::new(&connection, sys::VIR_STREAM_NONBLOCK) {
        Ok(stream) => stream,
        Err(error) => return fail(runtime("creating a console stream", error)),
    };
    let mut flags = sys::VIR_DOMAIN_CONSOLE_SAFE;
    if force {
        flags |= sys::VIR_DOMAIN_CONSOLE_FORCE;
    }
    if let Err(error) = domain.open_console(None, &stream, flags) {
        let error = LibvirtError::from(error);
        if error.is(ErrorNumber::OperationFailed) && error.message.contains("console session") {
            return fail(IoError::NotReady(format!(
                "workload {id}: another session holds the console; take it over with `persysctl console {id} --force` (force in the Console RPC)"
            )));
        }
        return fail(IoError::Runtime(format!(
            "workload {id}: opening the console: {error}"
        )));
    }
    let opaque = Box::into_raw(Box::new(waker)).cast::<c_void>();
    // SAFETY: `on_event` and `free_waker` have libvirt's stream callback
    // signatures; `opaque` is a leaked Box<Sender> that only `free_waker`
    // reclaims, which libvirt calls once the callback is removed (or here,
    // when adding it failed).
    let added = unsafe {
        sys::virStreamEventAddCallback(
            stream.as_ptr(),
            WATCHED as c_int,
            Some(on_event),
            opaque,
            Some(free_waker),
        )
    };
    if added < 0 {
        free_waker(opaque);
        let _ = stream.abort();
        return fail(IoError::Runtime(format!(
            "workload {id}: watching the console stream: {}",
            LibvirtError::from(virt::error::Error::last_error())
        )));
    }
    tracing::debug!(workload_id = %id, force, "console attached");
    let ended = pump(id, &stream, &mut wakes, &out);
    // SAFETY: the stream is alive; removing its callback makes libvirt
    // free the waker, and no callback runs after this returns.
    unsafe {
        sys::virStreamEventRemoveCallback(stream.as_ptr());
    }
    let _ = match ended {
        Ended::Finished => stream.finish(),
        Ended::Aborted => stream.abort(),
    };
    drop(domain);
    drop(connection);
    tracing::debug!(workload_id = %id, "console detached");
}

/// Moves bytes both ways until the console or the client ends.
fn pump(
    id: &str,
    stream: &Stream,
    wakes: &mut mpsc::Receiver<Wake>,
    out: &mpsc::Sender<Result<Bytes, IoError>>,
) -> Ended {
    let failed = |what: &str, error: virt::error::Error| {
        let _ = out.blocking_send(Err(IoError::Runtime(format!(
            "workload {id}: {what} the console: {}",
            LibvirtError::from(error)
        ))));
        Ended::Aborted
    };
    let mut pending = BytesMut::new();
    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        while !pending.is_empty() {
            match stream.send(&pending) {
                Ok(sent) if sent > 0 => pending.advance(sent.unsigned_abs()),
                // -2: no room now; the writable event says when.
                Ok(_) => break,
                Err(error) => return failed("writing to", error),
            }
        }
        loop {
            match stream.recv(&mut buffer) {
                Ok(read) if read > 0 => {
                    let piece = Bytes::copy_from_slice(&buffer[..read.unsigned_abs()]);
                    if out.blocking_send(Ok(piece)).is_err() {
                        return Ended::Aborted;
                    }
                }
                Ok(0) => return Ended::Finished,
                // -2: nothing more for now.
                Ok(_) => break,
                Err(error) => return failed("reading from", error),
            }
        }
        let mut events = WATCHED;
        if !pending.is_empty() {
            events |= sys::VIR_STREAM_EVENT_WRITABLE;
        }
        // SAFETY: the stream is alive and has a callback registered.
        unsafe {
            sys::virStreamEventUpdateCallback(stream.as_ptr(), events as c_int);
        }
        match wakes.blocking_recv() {
            None | Some(Wake::Close) => return Ended::Aborted,
            Some(Wake::Stream) => {}
            Some(Wake::Input(bytes)) => {
                if pending.len() + bytes.len() > MAX_PENDING_INPUT {
                    let _ = out.blocking_send(Err(IoError::Runtime(format!(
                        "workload {id}: the console takes no input ({MAX_PENDING_INPUT} bytes waiting)"
                    ))));
                    return Ended::Aborted;
                }
                pending.extend_from_slice(&bytes);
            }
        }
        if out.is_closed() {
            return Ended::Aborted;
        }
    }
}

/// On libvirt's event loop thread: wake the session thread, and stay
/// quiet until it re-arms the callback.
extern "C" fn on_event(stream: sys::virStreamPtr, _events: c_int, opaque: *mut c_void) {
    // Quiet first, then wake: the thread re-arms only after taking a wake,
    // so its re-arm can never be undone by this callback's (the other
    // order loses the console's output for good). A wake that does not fit
    // is not needed: the thread has wakes queued and re-arms after them.
    // SAFETY: libvirt passes the stream the callback is registered on.
    unsafe {
        sys::virStreamEventUpdateCallback(stream, 0);
    }
    // SAFETY: `opaque` is the Box<Sender> registered with this callback,
    // alive until `free_waker` runs after the callback is removed.
    let waker = unsafe { &*opaque.cast::<mpsc::Sender<Wake>>() };
    let _ = waker.try_send(Wake::Stream);
}

extern "C" fn free_waker(opaque: *mut c_void) {
    // SAFETY: `opaque` came from Box::into_raw in `session`, and libvirt
    // calls this once.
    drop(unsafe { Box::from_raw(opaque.cast::<mpsc::Sender<Wake>>()) });
}
