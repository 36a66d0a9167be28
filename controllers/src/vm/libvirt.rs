//! A small blocking wrapper over the `virt` crate, used only through
//! [`tokio::task::spawn_blocking`]: every libvirt call is blocking FFI.
//!
//! One connection is shared by every call (libvirt connections are
//! thread-safe). When it is lost — libvirtd restarted, socket gone,
//! keepalive timed out — it is dropped and reopened on the next call, no
//! sooner than a back-off allows, so a down daemon is not hammered.
//!
//! `virt`'s `Connect` panics in `Drop` when `virConnectClose` fails (as it
//! may on a broken connection); [`Connection`] closes it itself and ignores
//! the result. The event loop behind keepalives and lifecycle events is
//! registered before the first connection is opened (see `events.rs`).

use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};
use virt::sys;

use super::errors::{FailureReason, LibvirtError, Operation, VmError};
use super::marks::{Marks, NAMESPACE};
use super::xml::Element;
use crate::backoff::Backoff;

/// Seconds between keepalive probes, and probes missed before the
/// connection counts as dead: a hung libvirtd is noticed within ~20 s.
const KEEPALIVE_INTERVAL: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// A libvirt connection that closes without panicking.
pub struct Connection {
    connect: ManuallyDrop<Connect>,
}

impl Connection {
    pub(super) fn new(connect: Connect) -> Self {
        Connection {
            connect: ManuallyDrop::new(connect),
        }
    }
}

impl Deref for Connection {
    type Target = Connect;

    fn deref(&self) -> &Connect {
        &self.connect
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the pointer is this wrapper's own reference, never used
        // again: `connect` is not dropped (ManuallyDrop), so its panicking
        // Drop never runs.
        unsafe {
            sys::virConnectClose(self.connect.as_ptr());
        }
    }
}

/// Why a call did not happen or failed.
enum CallError {
    /// No connection could be opened (or the back-off holds).
    Connect(LibvirtError),
    /// The call failed.
    Call(LibvirtError),
}

impl From<virt::error::Error> for CallError {
    fn from(error: virt::error::Error) -> Self {
        CallError::Call(error.into())
    }
}

impl From<LibvirtError> for CallError {
    fn from(error: LibvirtError) -> Self {
        CallError::Call(error)
    }
}

/// The connection and its reconnect bookkeeping.
#[derive(Default)]
struct ConnectionState {
    connection: Option<Arc<Connection>>,
    /// Opens that failed in a row.
    failures: u32,
    /// No new open before this.
    retry_after: Option<Instant>,
    last_error: Option<LibvirtError>,
}

struct Shared {
    uri: String,
    backoff: Backoff,
    /// A std mutex held by blocking threads only, for the time it takes to
    /// clone the connection (or to open one, which every caller needs).
    state: Mutex<ConnectionState>,
}

impl Shared {
    fn connection(&self) -> Result<Arc<Connection>, LibvirtError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = &state.connection {
            return Ok(connection.clone());
        }
        if let Some(at) = state.retry_after
            && Instant::now() < at
        {
            return Err(state.last_error.clone().unwrap_or_else(|| {
                LibvirtError::new(
                    ErrorNumber::NoConnect,
                    ErrorDomain::None,
                    "not connected; waiting to reconnect",
                )
            }));
        }
        match Connect::open(Some(&self.uri)) {
            Ok(connect) => {
                let connection = Arc::new(Connection::new(connect));
                // Not every driver has keepalives (test:///default has none).
                let _ = connection.set_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT);
                if state.failures > 0 {
                    tracing::info!(uri = %self.uri, "reconnected to libvirt");
                }
                state.connection = Some(connection.clone());
                state.failures = 0;
                state.retry_after = None;
                state.last_error = None;
                Ok(connection)
            }
            Err(error) => {
                let error = LibvirtError::from(error);
                let delay = self.backoff.delay(state.failures);
                if state.failures == 0 {
                    tracing::warn!(uri = %self.uri, %error, "cannot connect to libvirt");
                }
                state.failures = state.failures.saturating_add(1);
                state.retry_after = Some(Instant::now() + delay);
                state.last_error = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Drops `connection` if it is still the current one.
    fn forget(&self, connection: &Arc<Connection>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .connection
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, connection))
        {
            tracing::warn!(uri = %self.uri, "lost the connection to libvirt; reconnecting");
            state.connection = None;
        }
    }

    fn with_connection<T>(
        &self,
        f: impl FnOnce(&Connect) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let connection = self.connection().map_err(CallError::Connect)?;
        let result = f(&connection);
        if let Err(CallError::Call(error)) = &result
            && (error.is_connection_lost() || !connection.is_alive().unwrap_or(false))
        {
            self.forget(&connection);
        }
        result
    }
}

/// The libvirt daemon as the controller uses it. Cheap to clone.
#[derive(Clone)]
pub struct Hypervisor {
    shared: Arc<Shared>,
}

/// A domain's power state (libvirt's `virDomainState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    NoState,
    Running,
    Blocked,
    Paused,
    /// Being shut down by the guest.
    ShuttingDown,
    Shutoff,
    Crashed,
    Suspended,
}

impl PowerState {
    fn from_raw(raw: i32) -> PowerState {
        match raw as u32 {
            sys::VIR_DOMAIN_RUNNING => PowerState::Running,
            sys::VIR_DOMAIN_BLOCKED => PowerState::Blocked,
            sys::VIR_DOMAIN_PAUSED => PowerState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => PowerState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => PowerState::Shutoff,
            sys::VIR_DOMAIN_CRASHED => PowerState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => PowerState::Suspended,
            _ => PowerState::NoState,
        }
    }

    /// True while a qemu process exists for the domain.
    pub fn is_active(self) -> bool {
        !matches!(self, PowerState::Shutoff)
    }

    pub fn name(self) -> &'static str {
        match self {
            PowerState::NoState => "no state",
            PowerState::Running => "running",
            PowerState::Blocked => "blocked",
            PowerState::Paused => "paused",
            PowerState::ShuttingDown => "shutting down",
            PowerState::Shutoff => "shut off",
            PowerState::Crashed => "crashed",
            PowerState::Suspended => "suspended",
        }
    }
}

/// A state and the reason libvirt gives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    pub power: PowerState,
    pub reason: i32,
}

impl DomainState {
    /// The reason in words, as `virsh domstate --reason` says it.
    pub fn reason_text(&self) -> &'static str {
        let reason = self.reason as u32;
        match self.power {
            PowerState::Running => match reason {
                sys::VIR_DOMAIN_RUNNING_BOOTED => "booted",
                sys::VIR_DOMAIN_RUNNING_MIGRATED => "migrated",
                sys::VIR_DOMAIN_RUNNING_RESTORED => "restored",
                sys::VIR_DOMAIN_RUNNING_FROM_SNAPSHOT => "from snapshot",
                sys::VIR_DOMAIN_RUNNING_UNPAUSED => "unpaused",
                sys::VIR_DOMAIN_RUNNING_WAKEUP => "event wakeup",
                sys::VIR_DOMAIN_RUNNING_CRASHED => "crashed",
                _ => "unknown",
            },
            PowerState::Paused => match reason {
                sys::VIR_DOMAIN_PAUSED_USER => "user",
                sys::VIR_DOMAIN_PAUSED_IOERROR => "I/O error",
                sys::VIR_DOMAIN_PAUSED_WATCHDOG => "watchdog",
                sys::VIR_DOMAIN_PAUSED_SHUTTING_DOWN => "shutting down",
                sys::VIR_DOMAIN_PAUSED_CRASHED => "crashed",
                sys::VIR_DOMAIN_PAUSED_STARTING_UP => "starting up",
                _ => "unknown",
            },
            PowerState::Shutoff => match reason {
                sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => "shutdown",
                sys::VIR_DOMAIN_SHUTOFF_DESTROYED => "destroyed",
                sys::VIR_DOMAIN_SHUTOFF_CRASHED => "crashed",
                sys::VIR_DOMAIN_SHUTOFF_MIGRATED => "migrated",
                sys::VIR_DOMAIN_SHUTOFF_SAVED => "saved",
                sys::VIR_DOMAIN_SHUTOFF_FAILED => "failed",
                sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT => "from snapshot",
                sys::VIR_DOMAIN_SHUTOFF_DAEMON => "daemon",
                _ => "unknown",
            },
            PowerState::ShuttingDown => "user",
            PowerState::Crashed => "panicked",
            _ => "unknown",
        }
    }

    /// Shut off without ever having run (just defined).
    pub fn never_ran(&self) -> bool {
        self.power == PowerState::Shutoff && self.reason as u32 == sys::VIR_DOMAIN_SHUTOFF_UNKNOWN
    }
}

/// A domain as a listing found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundDomain {
    pub uuid: String,
    pub name: String,
    /// The persys marks, if the domain has them.
    pub marks: Option<Marks>,
    pub state: DomainState,
}

/// What a lookup of one workload's domains found.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The domain called by the workload's domain name, whoever owns it.
    pub by_name: Option<FoundDomain>,
    /// Every domain marked as this workload's, in this scope.
    pub managed: Vec<FoundDomain>,
}

/// A disk of a running (or defined) domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    pub target: String,
    pub source: String,
    /// `disk` or `cdrom`.
    pub device: String,
}

/// A network interface of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveInterface {
    /// `network`, `bridge`, `user`…
    pub kind: String,
    pub mac: String,
    /// The host-side device (`vnet0`), when there is one: what interface
    /// statistics are read from.
    pub host_device: Option<String>,
}

/// What status facts and usage read from a domain's live description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDomain {
    pub uuid: String,
    pub name: String,
    pub state: DomainState,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub domain_type: String,
    pub disks: Vec<LiveDisk>,
    pub interfaces: Vec<LiveInterface>,
    /// Guest IP addresses, when libvirt knows them (DHCP leases, ARP).
    pub ips: Vec<String>,
    pub marks: Option<Marks>,
}

impl LiveDomain {
    /// Reads the description `virDomainGetXMLDesc` returned.
    pub fn from_xml(uuid: &str, state: DomainState, xml: &str) -> Option<LiveDomain> {
        let domain = Element::parse(xml)?;
        let memory_kib = domain
            .child("currentMemory")
            .or_else(|| domain.child("memory"))
            .map(|m| {
                let value: u64 = m.text.trim().parse().unwrap_or(0);
                match m.attribute("unit").unwrap_or("KiB") {
                    "b" | "bytes" => value / 1024,
                    // Saturating: a figure past u64 in KiB is no reason to
                    // panic the observer.
                    "MiB" | "M" => value.saturating_mul(1024),
                    "GiB" | "G" => value.saturating_mul(1024 * 1024),
                    _ => value,
                }
            })
            .unwrap_or(0);
        let devices = domain.child("devices");
        let disks = devices
            .into_iter()
            .flat_map(|d| d.children_named("disk"))
            .map(|disk| LiveDisk {
                target: disk
                    .child("target")
                    .and_then(|t| t.attribute("dev"))
                    .unwrap_or("")
                    .to_string(),
                source: disk
                    .child("source")
                    .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                    .unwrap_or("")
                    .to_string(),
                device: disk.attribute("device").unwrap_or("disk").to_string(),
            })
            .collect();
        let interfaces = devices
            .into_iter()
            .flat_map(|d| d.children_named("interface"))
            .map(|nic| LiveInterface {
                kind: nic.attribute("type").unwrap_or("").to_string(),
                mac: nic
                    .child("mac")
                    .and_then(|m| m.attribute("address"))
                    .unwrap_or("")
                    .to_string(),
                host_device: nic
                    .child("target")
                    .and_then(|t| t.attribute("dev"))
                    .map(String::from),
            })
            .collect();
        Some(LiveDomain {
            uuid: uuid.to_string(),
            name: domain.child_text("name").unwrap_or("").to_string(),
            state,
            vcpus: domain
                .child_text("vcpu")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            memory_kib,
            domain_type: domain.attribute("type").unwrap_or("").to_string(),
            disks,
            interfaces,
            ips: Vec::new(),
            marks: Marks::parse(xml),
        })
    }
}

/// The state of a domain, with libvirt's errors reported (`virt` 0.5's
/// `Domain::state` drops them).
pub(super) fn state_of(domain: &Domain) -> Result<DomainState, LibvirtError> {
    let mut state: std::os::raw::c_int = -1;
    let mut reason: std::os::raw::c_int = -1;
    // SAFETY: `domain` holds a valid reference; the out-pointers are live.
    let rc = unsafe { sys::virDomainGetState(domain.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(virt::error::Error::last_error().into());
    }
    Ok(DomainState {
        power: PowerState::from_raw(state),
        reason,
    })
}

/// The persys marks of a domain; none when it has no persys metadata.
fn marks_of(domain: &Domain) -> Result<Option<Marks>, LibvirtError> {
    match domain.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(NAMESPACE), 0) {
        Ok(xml) => Ok(Marks::parse(&xml)),
        Err(error) => {
            let error = LibvirtError::from(error);
            if error.is(ErrorNumber::NoDomainMetadata) {
                Ok(None)
            } else {
                Err(error)
            }
        }
    }
}

fn describe(domain: &Domain) -> Result<FoundDomain, LibvirtError> {
    Ok(FoundDomain {
        uuid: domain.uuid_string()?,
        name: domain.name()?,
        marks: marks_of(domain)?,
        state: state_of(domain)?,
    })
}

/// The `file` or `dev` of every disk in a domain description.
fn disk_sources(xml: &str) -> Vec<String> {
    let Some(domain) = Element::parse(xml) else {
        return Vec::new();
    };
    domain
        .child("devices")
        .into_iter()
        .flat_map(|d| d.children_named("disk"))
        .filter_map(|disk| {
            let source = disk.child("source")?;
            source
                .attribute("file")
                .or_else(|| source.attribute("dev"))
                .map(String::from)
        })
        .collect()
}

/// A domain that went away between listing and asking is not an error.
fn gone(error: &LibvirtError) -> bool {
    error.is(ErrorNumber::NoDomain)
}

fn lookup_uuid(conn: &Connect, uuid: &str) -> Result<Option<Domain>, LibvirtError> {
    match conn.lookup_domain_by_uuid_string(uuid) {
        Ok(domain) => Ok(Some(domain)),
        Err(error) => {
            let error = LibvirtError::from(error);
            if gone(&error) { Ok(None) } else { Err(error) }
        }
    }
}

/// Errors that mean a driver does not take a flag: retry without it.
fn flag_unsupported(error: &LibvirtError) -> bool {
    matches!(
        error.number,
        Some(ErrorNumber::InvalidArg | ErrorNumber::ArgumentUnsupported | ErrorNumber::NoSupport)
    )
}

impl Hypervisor {
    /// A handle on `uri`; connects on first use, not here.
    pub fn new(uri: impl Into<String>, backoff: Backoff) -> Self {
        if let Err(error) = super::events::ensure_event_loop() {
            tracing::warn!(%error, "no libvirt event loop: no keepalives, no lifecycle events");
        }
        Hypervisor {
            shared: Arc::new(Shared {
                uri: uri.into(),
                backoff,
                state: Mutex::new(ConnectionState::default()),
            }),
        }
    }

    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// Runs `f` on a blocking thread with the connection, for workload
    /// `id`; errors carry the id and `operation`.
    pub async fn call<T: Send + 'static>(
        &self,
        id: &str,
        operation: Operation,
        f: impl FnOnce(&Connect) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, VmError> {
        let shared = self.shared.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            shared.with_connection(|conn| f(conn).map_err(CallError::Call))
        })
        .await;
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(CallError::Connect(source))) => Err(VmError::Unreachable {
                id: id.to_string(),
                operation,
                source,
            }),
            Ok(Err(CallError::Call(source))) => Err(VmError::libvirt(id, operation, source)),
            Err(join) => Err(VmError::host(
                id,
                operation,
                FailureReason::RuntimeError,
                format!("the libvirt call did not complete: {join}"),
            )),
        }
    }

    /// The hypervisor's version, or why libvirt cannot be reached.
    pub async fn ping(&self) -> Result<u32, VmError> {
        self.call("", Operation::Ping, |conn| Ok(conn.hyp_version()?))
            .await
    }

    /// The domain named `name`, and — when `scan` or when that name is not
    /// this workload's — every domain marked as workload `id` of `scope`.
    pub async fn lookup(
        &self,
        id: &str,
        scope: &str,
        name: &str,
        scan: bool,
    ) -> Result<Lookup, VmError> {
        let (owned_id, owned_scope, owned_name) =
            (id.to_string(), scope.to_string(), name.to_string());
        self.call(id, Operation::Lookup, move |conn| {
            let mut lookup = Lookup::default();
            match conn.lookup_domain_by_name(&owned_name) {
                Ok(domain) => match describe(&domain) {
                    Ok(found) => lookup.by_name = Some(found),
                    Err(error) if gone(&error) => {}
                    Err(error) => return Err(error),
                },
                Err(error) => {
                    let error = LibvirtError::from(error);
                    if !gone(&error) {
                        return Err(error);
                    }
                }
            }
            let ours = |found: &FoundDomain| {
                found
                    .marks
                    .as_ref()
                    .is_some_and(|m| m.is(&owned_id, &owned_scope))
            };
            let named_is_ours = lookup.by_name.as_ref().is_some_and(ours);
            if named_is_ours && !scan {
                lookup.managed = lookup.by_name.clone().into_iter().collect();
                return Ok(lookup);
            }
            for domain in conn.list_all_domains(0)? {
                match describe(&domain) {
                    Ok(found) if ours(&found) => lookup.managed.push(found),
                    Ok(_) => {}
                    Err(error) if gone(&error) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(lookup)
        })
        .await
    }

    /// Every domain marked with `scope`.
    pub async fn list_managed(&self, scope: &str) -> Result<Vec<FoundDomain>, VmError> {
        let scope = scope.to_string();
        self.call("", Operation::List, move |conn| {
            let mut managed = Vec::new();
            for domain in conn.list_all_domains(0)? {
                match describe(&domain) {
                    Ok(found) if found.marks.as_ref().is_some_and(|m| m.scope == scope) => {
                        managed.push(found)
                    }
                    Ok(_) => {}
                    Err(error) if gone(&error) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(managed)
        })
        .await
    }

    /// Every domain that is not workload `id`'s in `scope`, by name, with
    /// the files and devices its disks use: a disk attached there is not
    /// this workload's to attach.
    pub async fn other_domains_disks(
        &self,
        id: &str,
        scope: &str,
    ) -> Result<Vec<(String, Vec<String>)>, VmError> {
        let (owner, scope) = (id.to_string(), scope.to_string());
        self.call(id, Operation::List, move |conn| {
            let mut others = Vec::new();
            for domain in conn.list_all_domains(0)? {
                let described =
                    (|| -> Result<_, LibvirtError> { Ok((domain.name()?, domain.xml_desc(0)?)) })();
                let (name, xml) = match described {
                    Ok(described) => described,
                    Err(error) if gone(&error) => continue,
                    Err(error) => return Err(error),
                };
                if Marks::parse(&xml).is_some_and(|m| m.is(&owner, &scope)) {
                    continue;
                }
                others.push((name, disk_sources(&xml)));
            }
            Ok(others)
        })
        .await
    }

    /// The marks of the domain `uuid`, if it exists and has them.
    pub async fn marks(&self, uuid: &str) -> Result<Option<Marks>, VmError> {
        let uuid = uuid.to_string();
        self.call(
            "",
            Operation::ReadMetadata,
            move |conn| match lookup_uuid(conn, &uuid)? {
                Some(domain) => match marks_of(&domain) {
                    Err(error) if gone(&error) => Ok(None),
                    other => other,
                },
                None => Ok(None),
            },
        )
        .await
    }

    /// Defines (or redefines, when the XML carries the UUID) a domain;
    /// returns its UUID.
    pub async fn define(&self, id: &str, xml: String) -> Result<String, VmError> {
        self.call(id, Operation::Define, move |conn| {
            let domain = conn.define_domain_xml(&xml)?;
            Ok(domain.uuid_string()?)
        })
        .await
    }

    /// The domain's state; none when it does not exist.
    pub async fn state(&self, id: &str, uuid: &str) -> Result<Option<DomainState>, VmError> {
        let uuid = uuid.to_string();
        self.call(id, Operation::Inspect, move |conn| {
            match lookup_uuid(conn, &uuid)? {
                Some(domain) => match state_of(&domain) {
                    Ok(state) => Ok(Some(state)),
                    Err(error) if gone(&error) => Ok(None),
                    Err(error) => Err(error),
                },
                None => Ok(None),
            }
        })
        .await
    }

    /// The live description of the domain, with guest IPs when known.
    pub async fn inspect(&self, id: &str, uuid: &str) -> Result<Option<LiveDomain>, VmError> {
        let uuid = uuid.to_string();
        self.call(id, Operation::Inspect, move |conn| {
            let Some(domain) = lookup_uuid(conn, &uuid)? else {
                return Ok(None);
            };
            let described = (|| -> Result<_, LibvirtError> {
                let state = state_of(&domain)?;
                let xml = domain.xml_desc(0)?;
                Ok((state, xml))
            })();
            let (state, xml) = match described {
                Ok(described) => described,
                Err(error) if gone(&error) => return Ok(None),
                Err(error) => return Err(error),
            };
            let mut live = LiveDomain::from_xml(&uuid, state, &xml).ok_or_else(|| {
                LibvirtError::new(
                    ErrorNumber::XmlError,
                    ErrorDomain::Xml,
                    "libvirt returned a domain description that cannot be read",
                )
            })?;
            if state.power.is_active() && !live.interfaces.is_empty() {
                live.ips = guest_ips(&domain);
            }
            Ok(Some(live))
        })
        .await
    }

    /// Starts a defined domain; one already running is left alone.
    pub async fn start(&self, id: &str, uuid: &str) -> Result<(), VmError> {
        self.on_domain(id, uuid, Operation::Start, |domain| {
            match domain.create() {
                Ok(()) => Ok(()),
                Err(error) => {
                    let error = LibvirtError::from(error);
                    // Already running: what a start wanted.
                    if error.is(ErrorNumber::OperationInvalid)
                        && state_of(domain).is_ok_and(|s| s.power.is_active())
                    {
                        Ok(())
                    } else {
                        Err(error)
                    }
                }
            }
        })
        .await
    }

    /// Resumes a paused domain.
    pub async fn resume(&self, id: &str, uuid: &str) -> Result<(), VmError> {
        self.on_domain(id, uuid, Operation::Resume, |domain| Ok(domain.resume()?))
            .await
    }

    /// Asks the guest to power off (ACPI power button); a domain that is
    /// not running is fine.
    pub async fn shutdown(&self, id: &str, uuid: &str) -> Result<(), VmError> {
        self.on_domain(id, uuid, Operation::Shutdown, |domain| {
            let acpi = domain
                .shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .map_err(LibvirtError::from);
            let result = match acpi {
                Err(error) if flag_unsupported(&error) => {
                    domain.shutdown().map_err(LibvirtError::from)
                }
                other => other,
            };
            not_running_is_fine(domain, result)
        })
        .await
    }

    /// Powers the domain off at once; one not running is fine.
    pub async fn destroy(&self, id: &str, uuid: &str) -> Result<(), VmError> {
        self.on_domain(id, uuid, Operation::Destroy, |domain| {
            let result = domain.destroy().map_err(LibvirtError::from);
            not_running_is_fine(domain, result)
        })
        .await
    }

    /// Adds `marks` to domain `uuid`'s persistent definition, and to the
    /// running guest's when it runs: no restart, no redefinition.
    pub async fn set_marks(&self, id: &str, uuid: &str, marks: &Marks) -> Result<(), VmError> {
        let element = marks.to_bare_xml();
        self.on_domain(id, uuid, Operation::WriteMetadata, move |domain| {
            let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
            if domain.is_active()? {
                flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            domain.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&element),
                Some(super::marks::PREFIX),
                Some(NAMESPACE),
                flags,
            )?;
            Ok(())
        })
        .await
    }

    /// Undefines a (stopped) domain with its NVRAM, managed save, snapshot
    /// and checkpoint metadata. One already gone is fine.
    pub async fn undefine(&self, id: &str, uuid: &str) -> Result<(), VmError> {
        self.on_domain(id, uuid, Operation::Undefine, |domain| {
            let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | sys::VIR_DOMAIN_UNDEFINE_NVRAM
                | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
            match domain.undefine_flags(flags).map_err(LibvirtError::from) {
                Err(error) if flag_unsupported(&error) => Ok(domain.undefine()?),
                other => other,
            }
        })
        .await
    }

    /// Runs `f` on domain `uuid`; a domain that no longer exists is
    /// success (the operations are all "make it so").
    async fn on_domain(
        &self,
        id: &str,
        uuid: &str,
        operation: Operation,
        f: impl FnOnce(&Domain) -> Result<(), LibvirtError> + Send + 'static,
    ) -> Result<(), VmError> {
        let uuid = uuid.to_string();
        self.call(id, operation, move |conn| {
            let Some(domain) = lookup_uuid(conn, &uuid)? else {
                return Ok(());
            };
            match f(&domain) {
                Err(error) if gone(&error) => Ok(()),
                other => other,
            }
        })
        .await
    }

    /// Makes `host` (a `<host mac= name= ip=/>` element) the network's DHCP
    /// host entry for `mac`: any entry for that MAC is replaced.
    pub async fn set_dhcp_host(
        &self,
        id: &str,
        network: &str,
        host: String,
        mac: &str,
    ) -> Result<(), VmError> {
        let (network, mac) = (network.to_string(), mac.to_string());
        self.call(id, Operation::UpdateNetwork, move |conn| {
            let net = conn.lookup_network_by_name(&network)?;
            let xml = network_xml(&net)?;
            let current = dhcp_hosts(&xml).into_iter().find(|h| {
                h.attribute("mac")
                    .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
            });
            let wanted = Element::parse(&host);
            if current.is_some() && current.as_ref() == wanted.as_ref() {
                return Ok(());
            }
            let flags = network_update_flags(&net)?;
            if current.is_some() {
                let delete = format!("<host mac='{}'/>", super::xml::escape(&mac));
                let _ = net.update(
                    sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                    sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                    -1,
                    &delete,
                    flags,
                );
            }
            net.update(
                sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &host,
                flags,
            )?;
            Ok(())
        })
        .await
    }

    /// Removes the network's DHCP host entry for `mac`, if there is one.
    pub async fn remove_dhcp_host(
        &self,
        id: &str,
        network: &str,
        mac: &str,
    ) -> Result<(), VmError> {
        let (network, mac) = (network.to_string(), mac.to_string());
        self.call(id, Operation::UpdateNetwork, move |conn| {
            let net = match conn.lookup_network_by_name(&network) {
                Ok(net) => net,
                Err(error) => {
                    let error = LibvirtError::from(error);
                    return if error.is(ErrorNumber::NoNetwork) {
                        Ok(())
                    } else {
                        Err(error)
                    };
                }
            };
            let xml = network_xml(&net)?;
            let present = dhcp_hosts(&xml).iter().any(|h| {
                h.attribute("mac")
                    .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
            });
            if !present {
                return Ok(());
            }
            let flags = network_update_flags(&net)?;
            net.update(
                sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &format!("<host mac='{}'/>", super::xml::escape(&mac)),
                flags,
            )?;
            Ok(())
        })
        .await
    }
}

/// The network's persistent description (the live one where a driver has
/// no separate persistent one).
fn network_xml(net: &virt::network::Network) -> Result<String, LibvirtError> {
    match net
        .xml_desc(sys::VIR_NETWORK_XML_INACTIVE)
        .map_err(LibvirtError::from)
    {
        Err(error) if flag_unsupported(&error) => Ok(net.xml_desc(0)?),
        other => other,
    }
}

/// Change the persistent config, and the live one of a running network.
fn network_update_flags(net: &virt::network::Network) -> Result<u32, LibvirtError> {
    let mut flags = sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
    if net.is_active()? {
        flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
    }
    Ok(flags)
}

/// The `<host>` entries of every `<ip><dhcp>` of a network description.
fn dhcp_hosts(xml: &str) -> Vec<Element> {
    let Some(network) = Element::parse(xml) else {
        return Vec::new();
    };
    network
        .children_named("ip")
        .filter_map(|ip| ip.child("dhcp"))
        .flat_map(|dhcp| dhcp.children_named("host").cloned())
        .collect()
}

/// A stop or destroy of a domain that is not running did what it wanted.
fn not_running_is_fine(
    domain: &Domain,
    result: Result<(), LibvirtError>,
) -> Result<(), LibvirtError> {
    match result {
        Err(error)
            if error.is(ErrorNumber::OperationInvalid)
                && state_of(domain).is_ok_and(|s| !s.power.is_active()) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Guest addresses from DHCP leases, else the host's ARP table; none when
/// neither knows (no network, a user-mode NIC, no guest agent).
fn guest_ips(domain: &Domain) -> Vec<String> {
    for source in [
        sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
    ] {
        if let Ok(interfaces) = domain.interface_addresses(source, 0) {
            let mut ips: Vec<String> = interfaces
                .iter()
                .flat_map(|i| i.addrs.iter().map(|a| a.addr.clone()))
                .filter(|a| !a.is_empty())
                .collect();
            if !ips.is_empty() {
                ips.sort();
                ips.dedup();
                return ips;
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the domain XML property tests: a memory figure whose KiB
    /// overflow u64 panicked the reader (in a debug build).
    #[test]
    fn a_memory_figure_past_u64_in_kib_reads_as_the_largest_not_a_panic() {
        let state = DomainState {
            power: PowerState::Running,
            reason: 1,
        };
        for unit in ["MiB", "GiB"] {
            let xml = format!(
                "<domain type='kvm'><name>w</name><memory unit='{unit}'>18014398509481984</memory></domain>"
            );
            let live = LiveDomain::from_xml("u", state, &xml).unwrap();
            assert_eq!(live.memory_kib, u64::MAX, "{unit}");
        }
    }

    #[test]
    fn a_live_description_yields_disks_interfaces_and_marks() {
        let marks = Marks {
            workload_id: "w".into(),
            scope: "s".into(),
            ..Default::default()
        };
        let xml = format!(
            r#"<domain type='kvm' id='3'>
              <name>w</name><uuid>u</uuid>
              <metadata>{}</metadata>
              <memory unit='KiB'>131072</memory><currentMemory unit='KiB'>131072</currentMemory>
              <vcpu placement='static'>2</vcpu>
              <devices>
                <disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
                <disk type='file' device='cdrom'><source file='/state/seed.iso'/><target dev='sda' bus='sata'/></disk>
                <interface type='network'><mac address='52:54:00:00:00:01'/><target dev='vnet3'/></interface>
                <interface type='user'><mac address='52:54:00:00:00:02'/></interface>
              </devices>
            </domain>"#,
            marks.to_xml("")
        );
        let state = DomainState {
            power: PowerState::Running,
            reason: sys::VIR_DOMAIN_RUNNING_BOOTED as i32,
        };
        let live = LiveDomain::from_xml("u", state, &xml).unwrap();
        assert_eq!(
            (live.name.as_str(), live.vcpus, live.memory_kib),
            ("w", 2, 131072)
        );
        assert_eq!(live.domain_type, "kvm");
        assert_eq!(live.disks[1].device, "cdrom");
        assert_eq!(live.disks[1].source, "/state/seed.iso");
        assert_eq!(live.interfaces[0].host_device.as_deref(), Some("vnet3"));
        assert_eq!(live.interfaces[1].host_device, None);
        assert_eq!(live.marks, Some(marks));
        assert_eq!(state.reason_text(), "booted");
    }

    #[test]
    fn shutoff_reasons_tell_a_fresh_domain_from_a_destroyed_one() {
        let fresh = DomainState {
            power: PowerState::Shutoff,
            reason: sys::VIR_DOMAIN_SHUTOFF_UNKNOWN as i32,
        };
        let destroyed = DomainState {
            power: PowerState::Shutoff,
            reason: sys::VIR_DOMAIN_SHUTOFF_DESTROYED as i32,
        };
        assert!(fresh.never_ran());
        assert!(!destroyed.never_ran());
        assert_eq!(destroyed.reason_text(), "destroyed");
        assert!(!destroyed.power.is_active());
        assert!(PowerState::Paused.is_active());
    }
}
