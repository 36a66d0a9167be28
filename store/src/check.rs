//! `persys-agent store check`: a state directory verified offline.
//!
//! The database is copied and the copy opened, so recovery (which may
//! truncate a torn journal tail) touches nothing of the original. Every
//! value is opened under the node key and decoded; the log is checked to be
//! gapless up to the last resource version, and each object against the
//! newest log entry of its id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use persys_api::v1::WatchEventType;

use super::StoreConfig;
use super::error::StoreError;
use super::record::*;
use super::schema::{self, read_meta_u64};
use super::seal::{self, Sealer, key_id_hex};

/// What a check found: the counts, and every problem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub objects: u64,
    pub log_entries: u64,
    pub events: u64,
    pub resource_version: u64,
    pub compacted_through: u64,
    /// The node key's id, as hex.
    pub key_id: String,
    /// What is wrong, each naming where; empty when the directory is sound.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} objects, {} log entries (resource version {}, compacted through {}), {} events, sealed under key {}",
            self.objects,
            self.log_entries,
            self.resource_version,
            self.compacted_through,
            self.events,
            self.key_id
        )
    }
}

/// A scratch copy of the database, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Checks the store in `config.path` without changing it. An error is a
/// directory that cannot be checked at all (in use, unreadable); what is
/// wrong with a readable one is in the report's problems.
pub fn check(config: &StoreConfig) -> Result<CheckReport, StoreError> {
    let path = &config.path;
    let lock = path.join(schema::LOCK_FILE);
    schema::check_state_files(config, lock.exists())?;
    if lock.exists() {
        let file = std::fs::File::open(&lock).map_err(|e| schema::open_error(path, e))?;
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
            return Err(schema::open_error(
                path,
                "in use by a running persys-agent: stop it first, the check reads a still directory",
            ));
        }
    }
    if !path.join("db").is_dir() {
        return Err(schema::open_error(
            path,
            format!(
                "no store here ({} does not exist)",
                path.join("db").display()
            ),
        ));
    }
    let key =
        seal::read_key_file(&config.key_file)?.ok_or_else(|| schema::missing_key_error(config))?;
    let sealer = Sealer::new(&key)?;
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "persys-store-check-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    )));
    copy_tree(&path.join("db"), &scratch.0.join("db"))
        .map_err(|e| schema::open_error(path, format!("copying the database to check it: {e}")))?;
    let copy = StoreConfig {
        path: scratch.0.clone(),
        ..config.clone()
    };
    let mut report = CheckReport {
        key_id: key_id_hex(&key.id()),
        ..CheckReport::default()
    };
    let db = match schema::open_db(&copy.path) {
        Ok(db) => db,
        Err(error) => {
            report
                .problems
                .push(rename_path(error, &copy.path, path).to_string());
            return Ok(report);
        }
    };
    let meta = schema::open_meta(&db, &copy)?;
    match read_meta_u64(&meta, META_SCHEMA_VERSION)? {
        Some(SCHEMA_VERSION) => {}
        other => {
            report.problems.push(format!(
                "meta: schema version {other:?}, not {SCHEMA_VERSION}: start the agent once to migrate it"
            ));
            return Ok(report);
        }
    }
    match meta.get(META_KEY_CHECK)? {
        Some(stored) if seal::key_check_opens(&sealer, &stored) => {}
        Some(_) => return Err(schema::wrong_key_error(config)),
        None => {
            report
                .problems
                .push("meta: the key check is missing".to_string());
            return Ok(report);
        }
    }
    for name in SEALED_KEYSPACES {
        if !db.keyspace_exists(name) {
            report
                .problems
                .push(format!("keyspace {name} is missing from the database"));
        }
    }
    if !report.problems.is_empty() {
        return Ok(report);
    }
    let keyspaces = schema::Keyspaces::open(&db, &copy)?;
    report.resource_version = read_meta_u64(&meta, META_LAST_RESOURCE_VERSION)?.unwrap_or(0);
    report.compacted_through = read_meta_u64(&meta, META_COMPACTED_THROUGH)?.unwrap_or(0);
    let problems = &mut report.problems;

    // The log: every retained entry opens, sits at its own version, and
    // the entries run without a gap to the last resource version.
    let mut newest: HashMap<String, (u64, i32)> = HashMap::new();
    let mut previous: Option<u64> = None;
    for guard in keyspaces.log.range(log_key(report.compacted_through + 1)..) {
        let (key, value) = guard.into_inner()?;
        let Some(version) = decode_u64(&key) else {
            problems.push(format!("log: a key of {} bytes, not 8", key.len()));
            continue;
        };
        report.log_entries += 1;
        let record = match schema::open_record(&sealer, &value) {
            Ok(record) => record,
            Err(error) => {
                problems.push(format!("log entry {version}: {error}"));
                continue;
            }
        };
        if record.resource_version != version {
            problems.push(format!(
                "log entry {version} holds resource version {}",
                record.resource_version
            ));
        }
        if let Some(previous) = previous
            && version != previous + 1
        {
            problems.push(format!(
                "log: entries {} to {} are missing",
                previous + 1,
                version - 1
            ));
        }
        previous = Some(version);
        let object = record.object.unwrap_or_default();
        if object.resource_version() != version {
            problems.push(format!(
                "log entry {version}: its object {} is at resource version {}",
                object.id(),
                object.resource_version()
            ));
        }
        newest.insert(object.id().to_string(), (version, record.kind));
    }
    if let Err(error) = schema::check_rv_bound(path, report.resource_version) {
        problems.push(error.to_string());
    }
    let first_retained = match previous {
        Some(last) => {
            if last != report.resource_version {
                problems.push(format!(
                    "log: ends at {last}, but meta says the last resource version is {}",
                    report.resource_version
                ));
            }
            last + 1 - report.log_entries
        }
        None => u64::MAX,
    };

    // Objects: each opens under its id, and the newest log entry of its id
    // (when the log still holds it) is this very version.
    let mut ids = std::collections::HashSet::new();
    for guard in keyspaces.objects.iter() {
        let (key, value) = guard.into_inner()?;
        let id = String::from_utf8_lossy(&key).to_string();
        report.objects += 1;
        let object = match schema::open_object(&sealer, &key, &value) {
            Ok(object) => object,
            Err(error) => {
                problems.push(error.to_string());
                continue;
            }
        };
        if object.id() != id {
            problems.push(format!("object {id} holds workload {}", object.id()));
        }
        let version = object.resource_version();
        if version == 0 || version > report.resource_version {
            problems.push(format!(
                "object {id}: resource version {version}, outside 1..={}",
                report.resource_version
            ));
        }
        match newest.get(&id) {
            Some((logged, _)) if *logged != version => problems.push(format!(
                "object {id} is at resource version {version}, its newest log entry at {logged}"
            )),
            Some((_, kind)) if *kind == WatchEventType::Deleted as i32 => problems.push(format!(
                "object {id} is stored, but its newest log entry deleted it"
            )),
            None if version >= first_retained => problems.push(format!(
                "object {id} at resource version {version} has no log entry"
            )),
            _ => {}
        }
        ids.insert(id);
    }
    for (id, (version, kind)) in &newest {
        if *kind != WatchEventType::Deleted as i32 && !ids.contains(id) {
            problems.push(format!(
                "log entry {version} wrote object {id}, which is not stored"
            ));
        }
    }

    // Events: each opens under its key and belongs to a stored object.
    for guard in keyspaces.events.iter() {
        let (key, value) = guard.into_inner()?;
        report.events += 1;
        match schema::open_event(&sealer, &key, &value) {
            Ok(event) if !ids.contains(&event.workload_id) => problems.push(format!(
                "an event of workload {}, which is not stored",
                event.workload_id
            )),
            Ok(_) => {}
            Err(error) => problems.push(error.to_string()),
        }
    }
    problems.sort();
    problems.dedup();
    Ok(report)
}

/// An open error about the scratch copy, told of the original directory.
fn rename_path(error: StoreError, copy: &Path, original: &Path) -> StoreError {
    match error {
        StoreError::Open { message, .. } => StoreError::Open {
            path: original.to_path_buf(),
            message: message.replace(&copy.display().to_string(), &original.display().to_string()),
        },
        other => other,
    }
}
