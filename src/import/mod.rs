//! Import from the Go agent: its bbolt `state.db` becomes this agent's
//! objects, once, before anything is served.
//!
//! - **Where.** `PERSYS_STATE_PATH` naming a bbolt file (its header says
//!   so, not its name), or the Go agent's `state.db` beside the state
//!   directory (`/var/lib/persys/state.db` next to `/var/lib/persys/state`).
//!   This agent's state goes in the directory beside the file: the file's
//!   name without its extension (`state.db` → `state`), or with `.state`
//!   added when it has none ([`state_dir_beside`]).
//! - **What.** Every `workloads` record ([`convert`]) passes the checks an
//!   ApplyWorkload passes — validation, node policy, the runtime being
//!   enabled, VM disk ownership, the ceilings — and is stored with its
//!   revision and desired state, and an `Imported` event. A refused one is
//!   reported with the rule and left out; the rest are imported.
//! - **Safely.** The file is opened read-only and never written. Each
//!   workload is one durable store write, skipped when the store already
//!   holds that id at that revision, so an import cut short (kill -9) is
//!   completed by the next start without duplicates. The marker
//!   `<file>.imported` is written (atomically) only after every write is
//!   acknowledged; while it exists, starts import nothing.
//! - **Or not at all.** A file that cannot be read stops the agent with the
//!   file's name and the way out; it never starts empty over it.

pub mod bolt;
pub mod convert;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use persys_api::v1::{EventType, ObjectMeta, ObjectSpec, Workload, WorkloadType, workload_spec};
use persys_controllers::Informer;
use persys_controllers::policy::NodePolicy;

use crate::config::Config;
use crate::runtimes::Registry;
use crate::server::ceilings::{Admission, Reservation};
use crate::server::validate::{self, FieldError, Limits};
use crate::store::{ApplyRequest, Caller, Store, StoreError};

/// Reason of the event each imported workload gets.
pub const REASON_IMPORTED: &str = "Imported";

/// Store writes in flight at once: enough for group commit to fold many
/// into one sync.
const CONCURRENT_WRITES: usize = 64;

/// The Go agent's state file, found where this agent's state belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoStateFile {
    /// The bbolt file.
    pub file: PathBuf,
    /// Where this agent's state directory is.
    pub state_dir: PathBuf,
    /// `PERSYS_STATE_PATH` named the file itself (else it was found beside
    /// the state directory).
    pub named: bool,
}

impl GoStateFile {
    /// `<file>.imported`: written once the import is committed.
    pub fn marker(&self) -> PathBuf {
        with_suffix(&self.file, ".imported")
    }

    /// `<file>.importing`: written before the first store write, so that an
    /// import cut short is resumed into the directory it started.
    fn in_progress(&self) -> PathBuf {
        with_suffix(&self.file, ".importing")
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The state directory for the Go agent's `file`: beside it, named after it
/// without its extension (`/var/lib/persys/state.db` →
/// `/var/lib/persys/state`), or with `.state` added when it has none.
pub fn state_dir_beside(file: &Path) -> PathBuf {
    match (file.extension(), file.file_stem()) {
        (Some(_), Some(stem)) => file.with_file_name(stem),
        _ => with_suffix(file, ".state"),
    }
}

/// Why the import did not happen, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "cannot import the Go agent's state {}: {}. Nothing was imported and the file was not changed. Fix what is named (stop the Go agent; restore the file from a backup), or move the file aside to start without its workloads (the scheduler applies them again)",
        .0.path.display(), .0.reason
    )]
    Read(bolt::ReadError),
    #[error(
        "PERSYS_STATE_PATH {} is a file, but not a bbolt database (no bbolt header): not a state directory, and not the Go agent's state file. Point PERSYS_STATE_PATH at a directory, or restore the Go agent's state.db from a backup",
        .0.display()
    )]
    NotAState(PathBuf),
    #[error("importing the Go agent's state into {}: {error}", .state_dir.display())]
    Store {
        state_dir: PathBuf,
        error: StoreError,
    },
    #[error("importing the Go agent's state: writing {}: {error}", .path.display())]
    Marker {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Finds the Go agent's state file for `config` and points
/// `config.state_path` at the directory this agent uses: when
/// `PERSYS_STATE_PATH` names a bbolt file, the directory beside it. A
/// file that is not bbolt is refused (it is not a state directory either).
pub fn resolve(config: &mut Config) -> Result<Option<GoStateFile>, ImportError> {
    let path = config.state_path.clone();
    if path.is_file() {
        return match bolt::has_bolt_header(&path) {
            Ok(true) => {
                let state_dir = state_dir_beside(&path);
                config.state_path = state_dir.clone();
                Ok(Some(GoStateFile {
                    file: path,
                    state_dir,
                    named: true,
                }))
            }
            Ok(false) => Err(ImportError::NotAState(path)),
            Err(error) => Err(ImportError::Read(bolt::ReadError {
                path,
                reason: format!("cannot be read: {error}"),
            })),
        };
    }
    let beside = path.parent().map(|parent| parent.join("state.db"));
    Ok(beside
        .filter(|file| file.is_file())
        .map(|file| GoStateFile {
            file,
            state_dir: path,
            named: false,
        }))
}

/// Whether a start imports `found`, and if not, why not.
#[derive(Debug)]
pub enum StartPlan {
    /// Import what the file holds (or finish an import cut short).
    Import(bolt::GoState),
    /// The marker says it was done.
    AlreadyImported,
    /// Found beside a state directory this agent already uses, which no
    /// import started: it is not imported behind the operator's back
    /// (`persys-agent import --from` does it on purpose).
    Unrelated,
}

/// Decides what a start does with `found`; for an import, reads the file
/// (a file that cannot be read stops the start before anything is
/// created), then records (durably) that the import started.
pub async fn plan_start(found: &GoStateFile) -> Result<StartPlan, ImportError> {
    if found.marker().exists() {
        return Ok(StartPlan::AlreadyImported);
    }
    let in_progress = found.in_progress();
    if !in_progress.exists() {
        let used = std::fs::read_dir(&found.state_dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if used && !found.named {
            return Ok(StartPlan::Unrelated);
        }
    }
    let state = read(&found.file).await?;
    if !in_progress.exists() {
        let note = format!(
            "# persys-agent: importing {} into {} (started {}); {} is written when done\n",
            found.file.display(),
            found.state_dir.display(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            found.marker().display()
        );
        write_durably(&in_progress, note.as_bytes()).map_err(|error| ImportError::Marker {
            path: in_progress.clone(),
            error,
        })?;
    }
    Ok(StartPlan::Import(state))
}

/// Reads `file` off the async runtime.
pub async fn read(file: &Path) -> Result<bolt::GoState, ImportError> {
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || bolt::read(&path))
        .await
        .map_err(|e| {
            ImportError::Read(bolt::ReadError {
                path: file.to_path_buf(),
                reason: format!("reading failed: {e}"),
            })
        })?
        .map_err(ImportError::Read)
}

/// The checks an ApplyWorkload passes, for the import to pass them too.
pub struct Gate {
    pub limits: Arc<Limits>,
    pub registry: Registry,
    pub informer: Informer,
    pub admission: Admission,
}

/// What the import did, or would do, with one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Imported now (or, in a dry run, would be).
    Imported,
    /// The store already held this id at this revision (an earlier import,
    /// cut short or not): nothing written but a missing event.
    AlreadyPresent,
    /// The store holds this id at another revision: kept as it is.
    Kept { revision: String },
    /// Refused by the named field and rule: not imported.
    Refused(String),
}

/// One workload of the file and its verdict.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    /// Type and desired state as read; empty when the record was unreadable.
    pub workload_type: String,
    pub desired_state: String,
    pub revision: String,
    pub verdict: Verdict,
    /// Keys of the record this agent has no field for: left out, reported.
    pub unrepresented: Vec<String>,
}

/// The whole import: what happened to each workload, and what else the
/// file held.
#[derive(Debug, Clone)]
pub struct Report {
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub dry_run: bool,
    pub entries: Vec<Entry>,
    /// `status` records: not imported (this agent observes the runtimes).
    pub status_records: usize,
    /// `volumes` / `attachments` record keys: not imported (a workload's
    /// managed volumes come from its spec).
    pub volumes: Vec<String>,
    pub attachments: Vec<String>,
}

impl Report {
    pub fn count(&self, pick: impl Fn(&Verdict) -> bool) -> usize {
        self.entries.iter().filter(|e| pick(&e.verdict)).count()
    }

    pub fn refused(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Refused(_)))
    }

    /// One line: the counts.
    pub fn summary(&self) -> String {
        let imported = self.count(|v| *v == Verdict::Imported);
        let present = self.count(|v| *v == Verdict::AlreadyPresent);
        let kept = self.count(|v| matches!(v, Verdict::Kept { .. }));
        let partial = self
            .entries
            .iter()
            .filter(|e| !e.unrepresented.is_empty() && !matches!(e.verdict, Verdict::Refused(_)))
            .count();
        let verb = if self.dry_run {
            "would be imported"
        } else {
            "imported"
        };
        format!(
            "{} workloads in {}: {imported} {verb}, {present} already in {}, {kept} kept at the store's own revision, {} refused (not imported); {partial} with fields this agent cannot represent (left out); {} status, {} volume and {} attachment records not imported (this agent observes the runtimes, and a workload's managed volumes come from its spec)",
            self.entries.len(),
            self.file.display(),
            self.state_dir.display(),
            self.refused(),
            self.status_records,
            self.volumes.len(),
            self.attachments.len(),
        )
    }

    /// A line per workload, then the summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            let (word, why) = match &entry.verdict {
                Verdict::Imported if self.dry_run => ("import", String::new()),
                Verdict::Imported => ("imported", String::new()),
                Verdict::AlreadyPresent => ("present", "already in the state directory".into()),
                Verdict::Kept { revision } => (
                    "kept",
                    format!("the state directory holds revision {revision}; not overwritten"),
                ),
                Verdict::Refused(why) => ("REFUSED", why.clone()),
            };
            let mut line = format!(
                "{word:<9} {:<24} {:<9} {:<8} {:<16}",
                entry.id, entry.workload_type, entry.desired_state, entry.revision
            );
            if !why.is_empty() {
                let _ = write!(line, " {why}");
            }
            if !entry.unrepresented.is_empty() {
                let _ = write!(
                    line,
                    " [not represented here, left out: {}]",
                    entry.unrepresented.join(", ")
                );
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if !self.volumes.is_empty() {
            let _ = writeln!(
                out,
                "volume records not imported: {}",
                self.volumes.join(", ")
            );
        }
        if !self.attachments.is_empty() {
            let _ = writeln!(
                out,
                "attachment records not imported: {}",
                self.attachments.join(", ")
            );
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }
}

/// A workload that passed the checks, waiting to be written.
struct Admitted {
    apply: ApplyRequest,
    /// Its share under the ceilings until the ledger has the write.
    reservation: Option<Reservation>,
    event: (EventType, String),
    index: usize,
}

/// Imports `state`, read from `file`, into `store` (`None`: a dry run,
/// nothing written), every workload through `gate`.
pub async fn import(
    file: &Path,
    state: bolt::GoState,
    state_dir: &Path,
    store: Option<&Store>,
    gate: &Gate,
) -> Result<Report, ImportError> {
    let mut report = Report {
        file: file.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
        dry_run: store.is_none(),
        entries: Vec::with_capacity(state.workloads.len()),
        status_records: state.status,
        volumes: state
            .volumes
            .iter()
            .map(|(k, _)| convert::key_id(k))
            .collect(),
        attachments: state
            .attachments
            .iter()
            .map(|(k, _)| convert::key_id(k))
            .collect(),
    };
    let store_error = |error: StoreError| ImportError::Store {
        state_dir: state_dir.to_path_buf(),
        error,
    };
    gate.informer.wait_until_synced().await;
    if let Some(store) = store
        && !gate.admission.caught_up(store.resource_version()).await
    {
        return Err(store_error(StoreError::Failed(
            "the ceilings' ledger did not catch up with the store".into(),
        )));
    }
    tracing::info!(
        file = %file.display(),
        state_dir = %state_dir.display(),
        workloads = state.workloads.len(),
        dry_run = store.is_none(),
        "importing the Go agent's state"
    );
    let caller = Caller {
        identity: format!("import of {}", file.display()),
        role: "import".to_string(),
    };
    let mut admitted = Vec::new();
    // VMs accepted so far: a disk belongs to one workload, in the file too.
    let mut accepted_vms: Vec<Arc<Workload>> = Vec::new();
    for (index, (key, value)) in state.workloads.iter().enumerate() {
        let mut entry = Entry {
            id: convert::key_id(key),
            workload_type: String::new(),
            desired_state: String::new(),
            revision: String::new(),
            verdict: Verdict::Imported,
            unrepresented: Vec::new(),
        };
        match check(key, value, store, gate, &accepted_vms, &mut entry).await {
            Err(refusal) => entry.verdict = Verdict::Refused(refusal),
            Ok(None) => {}
            Ok(Some((mut apply, reservation, go))) => {
                if let Some(workload_spec::Spec::Vm(_)) = &apply.spec.spec {
                    accepted_vms.push(Arc::new(as_workload(&apply)));
                }
                apply.caller = caller.clone();
                admitted.push(Admitted {
                    event: imported_event(file, &go, &apply.revision_id),
                    apply,
                    reservation,
                    index,
                });
            }
        }
        if let Verdict::Refused(why) = &entry.verdict {
            tracing::warn!(workload_id = %entry.id, refusal = %why, "Go agent workload refused: not imported");
        }
        report.entries.push(entry);
    }
    let Some(store) = store else {
        return Ok(report);
    };
    tracing::info!(
        workloads = admitted.len(),
        "Go agent import: writing the workloads admitted"
    );
    // Workloads already present still need their event, if the last run
    // was cut short between the two writes. Entries are in record order.
    for (index, entry) in report.entries.iter().enumerate() {
        if entry.verdict != Verdict::AlreadyPresent
            || has_imported_event(store, &entry.id).map_err(store_error)?
        {
            continue;
        }
        let (key, value) = &state.workloads[index];
        if let Ok(go) = convert::go_workload(key, value) {
            let (kind, message) = imported_event(file, &go, &entry.revision);
            record_imported(store, &entry.id, kind, &message)
                .await
                .map_err(store_error)?;
        }
    }
    let results: Vec<(usize, Result<(), StoreError>)> = futures::stream::iter(admitted)
        .map(|admitted| write_one(store, &gate.admission, admitted))
        .buffer_unordered(CONCURRENT_WRITES)
        .collect()
        .await;
    for (index, result) in results {
        match result {
            Ok(()) => {}
            // The store cannot write: stop, no marker; the next start resumes.
            Err(error) if error.is_retryable() || is_fatal(&error) => {
                return Err(store_error(error));
            }
            Err(error) => {
                let entry = &mut report.entries[index];
                tracing::warn!(workload_id = %entry.id, %error, "Go agent workload refused by the store: not imported");
                entry.verdict = Verdict::Refused(error.to_string());
            }
        }
    }
    Ok(report)
}

fn is_fatal(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Closed
            | StoreError::Failed(_)
            | StoreError::Corrupt(_)
            | StoreError::Key { .. }
    )
}

/// Reads and checks one record as ApplyWorkload would. `Ok(None)`: nothing
/// to write (`entry` says why); `Err`: refused, with the field and rule.
async fn check(
    key: &[u8],
    value: &[u8],
    store: Option<&Store>,
    gate: &Gate,
    accepted_vms: &[Arc<Workload>],
    entry: &mut Entry,
) -> Result<Option<(ApplyRequest, Option<Reservation>, convert::GoWorkload)>, String> {
    let go = convert::go_workload(key, value).map_err(|e| e.to_string())?;
    entry.id = go.request.id.clone();
    entry.workload_type = go.workload_type.short_name().to_string();
    entry.desired_state = go.desired_state.short_name().to_string();
    entry.unrepresented = go.unrepresented.clone();
    entry.revision = match go.request.revision_id.as_str() {
        "" => persys_api::derived_revision(go.request.spec.as_ref().unwrap_or(&Default::default())),
        revision => revision.to_string(),
    };
    let runtime = gate.registry.get(go.workload_type);
    if !runtime.enabled {
        return Err(format!(
            "{} workloads are disabled on this node ({}=false)",
            go.workload_type.short_name(),
            runtime.variable
        ));
    }
    let mut apply = validated(go.request.clone(), &gate.limits)
        .await
        .map_err(|e| e.to_string())?;
    apply.revision_id = entry.revision.clone();
    if let Some(store) = store {
        match store.get(&apply.id) {
            Ok(Some(existing)) if existing.revision_id() == apply.revision_id => {
                entry.verdict = Verdict::AlreadyPresent;
                return Ok(None);
            }
            Ok(Some(existing)) => {
                entry.verdict = Verdict::Kept {
                    revision: existing.revision_id().to_string(),
                };
                return Ok(None);
            }
            Ok(None) => {}
            Err(error) => return Err(format!("the state directory cannot be read: {error}")),
        }
    }
    if apply.workload_type == WorkloadType::Vm {
        let mut vms = gate.informer.cache().list_type(WorkloadType::Vm);
        vms.extend(accepted_vms.iter().cloned());
        validate::check_vm_disk_owners(&apply, &vms, &gate.limits).map_err(|e| e.to_string())?;
    }
    let reservation = gate
        .admission
        .admit(&apply.id, &apply.spec, &apply.labels, apply.desired_state)
        .await
        .map_err(|e| e.message)?;
    Ok(Some((apply, Some(reservation), go)))
}

/// Validation as ApplyWorkload does it; a compose file is parsed off the
/// async runtime.
async fn validated(
    request: persys_api::v1::ApplyWorkloadRequest,
    limits: &Arc<Limits>,
) -> Result<ApplyRequest, FieldError> {
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || validate::apply_request(request, &limits))
        .await
        .unwrap_or_else(|e| {
            Err(FieldError {
                field: "spec".into(),
                message: format!("validation failed: {e}"),
            })
        })
}

/// A stored-looking object for an accepted VM, for the disk-ownership check
/// of the VMs after it.
fn as_workload(apply: &ApplyRequest) -> Workload {
    Workload {
        metadata: Some(ObjectMeta {
            id: apply.id.clone(),
            r#type: apply.workload_type as i32,
            ..Default::default()
        }),
        spec: Some(ObjectSpec {
            desired_state: apply.desired_state as i32,
            workload: Some(apply.spec.clone()),
        }),
        status: None,
    }
}

/// The `Imported` event: the same text every time for the same record, so
/// a repeat folds into it. A Warning when fields were left out.
fn imported_event(file: &Path, go: &convert::GoWorkload, revision: &str) -> (EventType, String) {
    let mut message = format!(
        "Imported from the Go agent's state {}: revision {revision}, desired {}",
        file.display(),
        go.desired_state.short_name()
    );
    if !go.created_at.is_empty() {
        let _ = write!(message, "; created there {}", go.created_at);
    }
    if !go.updated_at.is_empty() {
        let _ = write!(message, ", updated {}", go.updated_at);
    }
    if go.unrepresented.is_empty() {
        (EventType::Normal, message)
    } else {
        let _ = write!(
            message,
            "; not represented by this agent, left out: {}",
            go.unrepresented.join(", ")
        );
        (EventType::Warning, message)
    }
}

fn has_imported_event(store: &Store, id: &str) -> Result<bool, StoreError> {
    Ok(store
        .events(id)?
        .iter()
        .any(|event| event.reason == REASON_IMPORTED))
}

async fn record_imported(
    store: &Store,
    id: &str,
    kind: EventType,
    message: &str,
) -> Result<(), StoreError> {
    store.record_event(id, kind, REASON_IMPORTED, message).await
}

/// Writes one admitted workload and its event (each durable when it
/// returns), and hands its reservation to the ledger.
async fn write_one(
    store: &Store,
    admission: &Admission,
    admitted: Admitted,
) -> (usize, Result<(), StoreError>) {
    let Admitted {
        apply,
        reservation,
        event: (kind, message),
        index,
    } = admitted;
    let id = apply.id.clone();
    let result = async {
        let outcome = store.apply(apply).await?;
        if let Some(reservation) = reservation {
            admission.release_after(reservation, outcome.workload().resource_version());
        }
        tracing::debug!(workload_id = %id, "Go agent workload imported");
        record_imported(store, &id, kind, &message).await
    }
    .await;
    (index, result)
}

/// Writes the marker beside the file: when, from where, into where, and
/// what became of each workload. Atomic (a whole file or none).
pub fn write_marker(found: &GoStateFile, report: &Report) -> Result<(), ImportError> {
    let marker = found.marker();
    let mut text = format!(
        "# persys-agent imported the Go agent's state in {}.\n# While this file exists, the agent does not import it again at start\n# (`persys-agent import --from {}` still does, skipping what is there).\nimported_at: {}\nsource: {}\nstate_dir: {}\n",
        found.file.display(),
        found.file.display(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        found.file.display(),
        found.state_dir.display(),
    );
    text.push_str(&report.table());
    write_durably(&marker, text.as_bytes()).map_err(|error| ImportError::Marker {
        path: marker.clone(),
        error,
    })?;
    let _ = std::fs::remove_file(found.in_progress());
    Ok(())
}

/// Writes `path` whole or not at all: a temporary file, synced, renamed
/// over it, and the directory synced.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = with_suffix(path, ".tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The checks of an apply on a node configured by `config`: its limits,
/// its runtimes, and the ceilings over what `informer` lists.
pub fn gate(
    config: &Config,
    policy: &Arc<NodePolicy>,
    informer: &Informer,
    tasks: &crate::tasks::Tasks,
) -> Gate {
    Gate {
        limits: Arc::new(crate::agent::apply_limits(config, policy)),
        registry: Registry::new(config),
        informer: informer.clone(),
        admission: Admission::start(policy.ceilings.clone(), informer, tasks),
    }
}

/// What a start does: import `found` if it has not been, then log the
/// outcome. Refusals leave the rest imported; a file that cannot be read,
/// or a store that cannot write, is an error (the agent stops).
pub async fn at_start(
    found: &GoStateFile,
    state: bolt::GoState,
    store: &Store,
    gate: &Gate,
) -> Result<(), ImportError> {
    let report = import(&found.file, state, &found.state_dir, Some(store), gate).await?;
    write_marker(found, &report)?;
    if report.refused() > 0 {
        tracing::warn!(
            marker = %found.marker().display(),
            "Go agent import done, with REFUSED workloads (listed above and in the marker): {}. Fix the policy or the spec, then run `persys-agent import --from {}` to import them",
            report.summary(),
            found.file.display()
        );
    } else {
        tracing::info!(
            marker = %found.marker().display(),
            "Go agent import done: {}",
            report.summary()
        );
    }
    Ok(())
}

/// `persys-agent import --from <file> [--dry-run]`: imports `file` into
/// the configured state directory (offline: the store's lock refuses while
/// an agent runs), then writes the marker; a dry run reads the file and
/// checks every workload against an empty node, and writes nothing.
pub async fn command(
    config: &Config,
    policy: &Arc<NodePolicy>,
    file: &Path,
    dry_run: bool,
) -> Result<Report, ImportError> {
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = crate::tasks::Tasks::new(stop.clone());
    let follow = |informer: &Informer| {
        let (informer, stop) = (informer.clone(), stop.clone());
        tokio::spawn(async move { informer.run(stop).await })
    };
    let state = read(file).await?;
    let result = if dry_run {
        let informer = Informer::new(Arc::new(NothingStored));
        let following = follow(&informer);
        let gate = gate(config, policy, &informer, &tasks);
        let result = import(file, state, &config.state_path, None, &gate).await;
        stop.cancel();
        let _ = following.await;
        result
    } else {
        let store = crate::agent::open_store(config).map_err(|error| match error {
            crate::agent::AgentError::Store(error) => ImportError::Store {
                state_dir: config.state_path.clone(),
                error,
            },
            other => ImportError::Store {
                state_dir: config.state_path.clone(),
                error: StoreError::Failed(other.to_string()),
            },
        })?;
        let informer = Informer::new(Arc::new(store.clone()));
        let following = follow(&informer);
        let gate = gate(config, policy, &informer, &tasks);
        let result = import(file, state, &config.state_path, Some(&store), &gate).await;
        let found = GoStateFile {
            file: file.to_path_buf(),
            state_dir: config.state_path.clone(),
            named: true,
        };
        let result = result.and_then(|report| write_marker(&found, &report).map(|()| report));
        stop.cancel();
        let _ = following.await;
        store.close().await;
        result
    };
    stop.cancel();
    result
}

/// The node of a dry run: nothing stored.
struct NothingStored;

impl persys_controllers::WorkloadSource for NothingStored {
    fn list(
        &self,
    ) -> futures::future::BoxFuture<
        '_,
        Result<persys_api::source::Listing, persys_api::source::SourceError>,
    > {
        Box::pin(async { Ok(persys_api::source::Listing::default()) })
    }

    fn watch(
        &self,
        _after: u64,
    ) -> futures::stream::BoxStream<
        'static,
        Result<persys_api::source::Change, persys_api::source::SourceError>,
    > {
        futures::stream::pending().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_is_beside_the_file_named_after_it() {
        assert_eq!(
            state_dir_beside(Path::new("/var/lib/persys/state.db")),
            PathBuf::from("/var/lib/persys/state")
        );
        assert_eq!(
            state_dir_beside(Path::new("/srv/bolt")),
            PathBuf::from("/srv/bolt.state")
        );
    }

    fn config_with(state: &Path) -> Config {
        Config::try_parse_from_iter(["persys-agent", "--state-dir", state.to_str().unwrap()])
            .unwrap()
    }

    #[test]
    fn a_bbolt_file_as_the_state_path_is_found_by_its_header_not_its_name() {
        let dir = tempfile::tempdir().unwrap();
        // A bbolt meta page: page header (16 bytes), magic, version 2.
        let mut header = vec![0u8; 4096];
        header[16..20].copy_from_slice(&MAGIC_FOR_TESTS.to_le_bytes());
        header[20..24].copy_from_slice(&2u32.to_le_bytes());
        let file = dir.path().join("agent-data");
        std::fs::write(&file, &header).unwrap();
        let mut config = config_with(&file);
        let found = resolve(&mut config).unwrap().unwrap();
        assert_eq!(found.file, file);
        assert!(found.named);
        assert_eq!(config.state_path, dir.path().join("agent-data.state"));
        assert_eq!(found.marker(), dir.path().join("agent-data.imported"));

        let text = dir.path().join("state.db");
        std::fs::write(&text, "not bbolt").unwrap();
        let mut config = config_with(&text);
        assert!(matches!(
            resolve(&mut config),
            Err(ImportError::NotAState(path)) if path == text
        ));
    }

    #[test]
    fn the_go_agents_state_db_beside_the_state_directory_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut config = config_with(&state);
        assert_eq!(resolve(&mut config).unwrap(), None);
        std::fs::write(dir.path().join("state.db"), "x").unwrap();
        let found = resolve(&mut config).unwrap().unwrap();
        assert_eq!(found.file, dir.path().join("state.db"));
        assert!(!found.named);
        assert_eq!(config.state_path, state);
    }

    const MAGIC_FOR_TESTS: u32 = 0xED0C_DAED;
}
