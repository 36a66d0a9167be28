//! Opening the state directory: its lock, the node key, and the schema
//! (migrating a plain store of schema 1 or 2 to sealed schema 3).

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use fjall::compaction::Fifo;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use persys_api::v1::{Event, Workload};
use prost::Message;

use super::StoreConfig;
use super::error::StoreError;
use super::record::*;
use super::seal::{self, Aad, Sealer};

/// Block cache for reads that miss the in-memory views (log replay,
/// ListActions, events).
const BLOCK_CACHE_BYTES: u64 = 16 * 1024 * 1024;

pub(super) fn open_error(path: &Path, message: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Creates the state directory 0700, or makes an existing one 0700.
pub(super) fn prepare_state_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| open_error(path, e))
}

/// Fsyncs every directory of the state tree, and the state directory's
/// parent, so every entry made while opening is durable before the first
/// write is acknowledged. Neither our own entries (the lock, `db`) nor
/// fjall's new keyspace folders are synced into their parent directory
/// otherwise, and a power cut could then take the whole database with it
/// (shown by tests/power_loss.rs).
pub(super) fn sync_state_tree(path: &Path) -> Result<(), StoreError> {
    sync_tree(path)
        .and_then(|()| match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
            _ => Ok(()),
        })
        .map_err(|e| open_error(path, format!("syncing the state directory: {e}")))
}

/// Fsyncs `dir` and every directory under it, deepest first.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// The state directory's lock file, there from the first start on.
pub(super) const LOCK_FILE: &str = "persys.lock";

/// Takes the state directory's lock: one process at a time.
pub(super) fn lock_state_dir(path: &Path) -> Result<File, StoreError> {
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(|e| open_error(path, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(open_error(path, e)),
    }
}

/// The way out a damaged state directory's error names.
pub(super) const WAY_OUT: &str = "Nothing was changed. `persys-agent store check` tells what else is damaged; restore the state directory from a backup, or move it aside and start the agent empty (the scheduler applies its workloads again)";

/// A damaged state directory: the file, what is wrong, and the way out.
pub(super) fn damaged(path: &Path, file: &Path, what: impl std::fmt::Display) -> StoreError {
    open_error(path, format!("{}: {what}. {WAY_OUT}", file.display()))
}

/// Refuses a state directory that has lost what a store there must have,
/// before fjall sees it: given a database folder without its version
/// marker, fjall would make a new, empty database in it; and a directory
/// whose lock shows a store ran there, but whose database is gone, would
/// start empty.
/// `ran_here`: the lock file was there before this process came.
pub(super) fn check_state_files(config: &StoreConfig, ran_here: bool) -> Result<(), StoreError> {
    let path = &config.path;
    let db = path.join(DB_DIR);
    match std::fs::read_dir(&db) {
        Ok(mut entries) => {
            let version = db.join("version");
            if entries.next().is_some() && !version.exists() {
                return Err(damaged(
                    path,
                    &version,
                    "missing, though the database folder holds files (fjall's format marker)",
                ));
            }
            // Every keyspace folder has its version pointer from its
            // creation on; without it fjall would make the keyspace anew.
            let keyspaces = db.join("keyspaces");
            for entry in std::fs::read_dir(&keyspaces)
                .into_iter()
                .flatten()
                .flatten()
            {
                let current = entry.path().join("current");
                if entry.path().is_dir() && !current.exists() {
                    return Err(damaged(
                        path,
                        &current,
                        "missing (a keyspace's pointer to its version file)",
                    ));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if ran_here && config.key_file.exists() {
                return Err(damaged(
                    path,
                    &db,
                    format!(
                        "missing, though a store ran here (its lock is there, and its key {})",
                        config.key_file.display()
                    ),
                ));
            }
        }
        Err(e) => return Err(damaged(path, &db, e)),
    }
    Ok(())
}

pub(super) fn open_db(path: &Path) -> Result<Database, StoreError> {
    Database::builder(path.join("db"))
        .cache_size(BLOCK_CACHE_BYTES)
        .open()
        .map_err(|e| unreadable(path, &e.to_string()))
}

/// The database cannot be read: the error names the kind of file fjall
/// failed on (its errors carry no path) and the way out.
pub(super) fn unreadable(path: &Path, error: &str) -> StoreError {
    let db = path.join(DB_DIR);
    let file = if error.contains("JournalRecovery") {
        let mut journals: Vec<String> = std::fs::read_dir(&db)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
            .map(|p| p.display().to_string())
            .collect();
        journals.sort();
        format!("its journal ({})", journals.join(", "))
    } else if error.contains("InvalidVersion") {
        format!("its format marker {}", db.join("version").display())
    } else {
        format!(
            "a table or version file of a keyspace ({}/<n>/tables/*, v<n> or current)",
            db.join("keyspaces").display()
        )
    };
    damaged(
        path,
        &db,
        format!("the database cannot be read ({error}): {file} is damaged or missing"),
    )
}

/// A lower bound of the store's resource version, kept outside fjall:
/// written at every open and clean close, it catches a database that
/// comes back with acknowledged writes missing (a journal truncated or
/// lost, which fjall takes for a crash and recovers from silently).
pub(super) const RV_FILE: &str = "persys.rv";

pub(super) fn read_rv_bound(path: &Path) -> Result<Option<u64>, StoreError> {
    let file = path.join(RV_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| damaged(path, &file, "not a resource version")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(damaged(path, &file, e)),
    }
}

/// Records `rv` as reached: written aside, synced, renamed over, and the
/// directory synced.
pub(super) fn write_rv_bound(path: &Path, rv: u64) -> Result<(), StoreError> {
    let file = path.join(RV_FILE);
    let next = path.join(format!("{RV_FILE}.next"));
    (|| {
        let mut out = File::create(&next)?;
        std::io::Write::write_all(&mut out, format!("{rv}\n").as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&next, &file)?;
        sync_dir(path)
    })()
    .map_err(|e| {
        open_error(
            path,
            format!("recording the resource version in {}: {e}", file.display()),
        )
    })
}

/// Refuses a database that ends before a resource version it reached.
pub(super) fn check_rv_bound(path: &Path, last: u64) -> Result<(), StoreError> {
    match read_rv_bound(path)? {
        Some(bound) if last < bound => Err(unreadable_behind(path, last, bound)),
        _ => Ok(()),
    }
}

fn unreadable_behind(path: &Path, last: u64, bound: u64) -> StoreError {
    let error = unreadable(path, "JournalRecovery");
    let StoreError::Open { message, .. } = error else {
        return error;
    };
    open_error(
        path,
        message.replace(
            "the database cannot be read (JournalRecovery)",
            &format!(
                "the database ends at resource version {last}, but reached {bound} before ({}): acknowledged writes are missing",
                path.join(RV_FILE).display()
            ),
        ),
    )
}

pub(super) fn memtable_bytes(config: &StoreConfig) -> u64 {
    config.memtable_bytes.max(64 * 1024)
}

pub(super) fn open_meta(db: &Database, config: &StoreConfig) -> Result<Keyspace, StoreError> {
    let memtable = memtable_bytes(config);
    db.keyspace("meta", || {
        KeyspaceCreateOptions::default().max_memtable_size(memtable)
    })
    .map_err(|e| open_error(&config.path, e))
}

pub(super) fn read_meta_u64(meta: &Keyspace, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match meta.get(key)? {
        Some(v) => decode_u64(&v)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt(format!("meta key {:?}", key))),
        None => Ok(None),
    }
}

/// The keyspaces of one generation.
pub(super) struct Keyspaces {
    pub objects: Keyspace,
    pub log: Keyspace,
    pub events: Keyspace,
}

impl Keyspaces {
    pub fn open(db: &Database, config: &StoreConfig) -> Result<Self, StoreError> {
        let memtable = memtable_bytes(config);
        let [objects, log, events] = SEALED_KEYSPACES;
        let leveled = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable)
            })
            .map_err(|e| open_error(&config.path, e))
        };
        // The log is insert-only with increasing keys, and trimmed logically
        // (see `compacted_through`): its tables never need merging, and the
        // oldest are dropped whole once it passes its size bound.
        // The newest table always stays (the bound is at least two
        // memtables): a replay from a dropped version then meets a later
        // entry and sees the gap, and the journal never replays dropped
        // entries behind newer ones at the next open.
        let max_log_bytes = config.max_log_bytes.max(2 * memtable);
        let log = db
            .keyspace(log, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable)
                    .compaction_strategy(Arc::new(Fifo::new(max_log_bytes, None)))
            })
            .map_err(|e| open_error(&config.path, e))?;
        Ok(Keyspaces {
            objects: leveled(objects)?,
            log,
            events: leveled(events)?,
        })
    }
}

/// The live database, and where a rebuilt one waits to replace it.
const DB_DIR: &str = "db";
const NEXT_DB_DIR: &str = "db.next";
const OLD_DB_DIR: &str = "db.old";

fn io_error(path: &Path, what: &str, error: std::io::Error) -> StoreError {
    open_error(path, format!("{what}: {error}"))
}

/// Completes or undoes a database swap ([`swap_in`]) a crash interrupted:
/// a rebuilt database beside the live one was not finished and goes; one
/// without a live one was finished and moves in; an old one goes.
pub(super) fn finish_swap(path: &Path) -> Result<(), StoreError> {
    let (db, next, old) = (
        path.join(DB_DIR),
        path.join(NEXT_DB_DIR),
        path.join(OLD_DB_DIR),
    );
    if next.exists() {
        if db.exists() {
            std::fs::remove_dir_all(&next)
                .map_err(|e| io_error(path, "removing an unfinished rebuild", e))?;
        } else {
            std::fs::rename(&next, &db)
                .and_then(|()| sync_dir(path))
                .map_err(|e| io_error(path, "installing the rebuilt database", e))?;
        }
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)
            .map_err(|e| io_error(path, "removing the replaced database", e))?;
    }
    Ok(())
}

/// A fresh database in `db.next`, to be filled and then swapped in. It has
/// its own journal: nothing of the live database's reaches it.
pub(super) struct NextDb {
    pub db: Database,
    pub meta: Keyspace,
    pub keyspaces: Keyspaces,
}

impl NextDb {
    pub fn create(config: &StoreConfig) -> Result<NextDb, StoreError> {
        let next = config.path.join(NEXT_DB_DIR);
        if next.exists() {
            std::fs::remove_dir_all(&next)
                .map_err(|e| io_error(&config.path, "removing an unfinished rebuild", e))?;
        }
        let db = Database::builder(&next)
            .cache_size(BLOCK_CACHE_BYTES)
            .open()
            .map_err(|e| open_error(&config.path, e))?;
        let meta = open_meta(&db, config)?;
        let keyspaces = Keyspaces::open(&db, config)?;
        // fjall does not sync its new keyspace folders into their parent.
        sync_tree(&next).map_err(|e| io_error(&config.path, "syncing the rebuild", e))?;
        Ok(NextDb {
            db,
            meta,
            keyspaces,
        })
    }

    /// Records the schema, the key check and `from`'s versions, and syncs.
    pub fn finish(self, from: &Keyspace, sealer: &Sealer) -> Result<(), StoreError> {
        let mut batch = self.db.batch();
        for key in [META_LAST_RESOURCE_VERSION, META_COMPACTED_THROUGH] {
            if let Some(value) = from.get(key)? {
                batch.insert(&self.meta, key, value);
            }
        }
        write_schema(&mut batch, &self.meta, sealer)?;
        batch.commit()?;
        self.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }
}

fn write_schema(
    batch: &mut fjall::OwnedWriteBatch,
    meta: &Keyspace,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    batch.insert(meta, META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes());
    if sealer.is_plain() {
        batch.insert(meta, META_PLAIN, [1u8]);
    } else {
        batch.insert(meta, META_KEY_CHECK, seal::key_check(sealer)?);
    }
    Ok(())
}

/// Puts `db.next` in place of `db` (closed, both): two renames and a
/// directory sync, then the old database is removed whole, its journal
/// and tables with it.
pub(super) fn swap_in(path: &Path) -> Result<(), StoreError> {
    std::fs::rename(path.join(DB_DIR), path.join(OLD_DB_DIR))
        .and_then(|()| std::fs::rename(path.join(NEXT_DB_DIR), path.join(DB_DIR)))
        .and_then(|()| sync_dir(path))
        .map_err(|e| io_error(path, "swapping in the rebuilt database", e))?;
    finish_swap(path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) fn missing_key_error(config: &StoreConfig) -> StoreError {
    StoreError::Key {
        message: format!(
            "state key file {} is missing, and the state in {} is sealed under it. \
             Nothing was changed: restore the key file (PERSYS_STATE_KEY_FILE) and start again; \
             no new key is created over existing data",
            config.key_file.display(),
            config.path.display()
        ),
    }
}

pub(super) fn wrong_key_error(config: &StoreConfig) -> StoreError {
    StoreError::Key {
        message: format!(
            "state key file {} does not open the state in {} (a key of another node, or an older one). \
             Nothing was changed: restore the right key file and start again",
            config.key_file.display(),
            config.path.display()
        ),
    }
}

/// The store's database, `meta`, sealer and keyspaces. Creates the key of
/// a new store, seals a plain one, and refuses (changing nothing) a missing
/// or wrong key or an unfinished rotation.
pub(super) fn prepare(
    config: &StoreConfig,
    ran_here: bool,
) -> Result<(Database, Keyspace, Sealer, Keyspaces), StoreError> {
    let path = &config.path;
    let new_key = seal::new_key_file(&config.key_file);
    if config.seal && new_key.exists() {
        return Err(StoreError::Key {
            message: format!(
                "a key rotation of {} was interrupted ({} exists): run `persys-agent store rotate-key` again to finish it",
                path.display(),
                new_key.display()
            ),
        });
    }
    finish_swap(path)?;
    check_state_files(config, ran_here)?;
    let db = open_db(path)?;
    let meta = open_meta(&db, config)?;
    let schema = read_meta_u64(&meta, META_SCHEMA_VERSION)?;
    match schema {
        Some(SCHEMA_VERSION) => {
            let plain = meta.get(META_PLAIN)?.is_some();
            if plain == config.seal {
                return Err(open_error(
                    path,
                    if plain {
                        "this store was created with sealing off (for a measurement); it cannot be opened sealed"
                    } else {
                        "this store is sealed; it cannot be opened with sealing off"
                    },
                ));
            }
            let sealer = if config.seal {
                let key = seal::read_key_file(&config.key_file)?
                    .ok_or_else(|| missing_key_error(config))?;
                let sealer = Sealer::new(&key)?;
                let check = meta.get(META_KEY_CHECK)?.ok_or_else(|| {
                    StoreError::Corrupt("the key check is missing from meta".into())
                })?;
                if !seal::key_check_opens(&sealer, &check) {
                    return Err(wrong_key_error(config));
                }
                sealer
            } else {
                Sealer::plain()
            };
            // fjall takes a keyspace whose folder or `current` pointer is
            // gone for one never made, and would make it anew, empty.
            for name in SEALED_KEYSPACES {
                if !db.keyspace_exists(name) {
                    return Err(damaged(
                        path,
                        &path.join(DB_DIR).join("keyspaces"),
                        format!(
                            "keyspace {name} is missing (its folder, or the `current` file in it, is gone)"
                        ),
                    ));
                }
            }
            let keyspaces = Keyspaces::open(&db, config)?;
            Ok((db, meta, sealer, keyspaces))
        }
        None if SEALED_KEYSPACES.iter().any(|name| db.keyspace_exists(name))
            || read_rv_bound(path)?.is_some_and(|rv| rv > 0) =>
        {
            // A store ran here, and its `meta` keyspace is gone: made
            // anew, it would start empty.
            Err(damaged(
                path,
                &path.join(DB_DIR).join("keyspaces"),
                "the store's meta keyspace is missing or empty (its folder, or the `current` file in it, is gone), though the store holds data",
            ))
        }
        Some(1) | Some(2) | None => {
            let sealer = if config.seal {
                // The store is plain or new: there is nothing a key could
                // already be needed for, so a missing one is created (and an
                // existing one kept).
                let key = match seal::read_key_file(&config.key_file)? {
                    Some(key) => key,
                    None => seal::create_key_file(&config.key_file)?,
                };
                Sealer::new(&key)?
            } else {
                Sealer::plain()
            };
            let Some(schema) = schema else {
                let keyspaces = Keyspaces::open(&db, config)?;
                let mut batch = db.batch();
                write_schema(&mut batch, &meta, &sealer)?;
                batch.commit()?;
                db.persist(fjall::PersistMode::SyncAll)?;
                return Ok((db, meta, sealer, keyspaces));
            };
            let next = NextDb::create(config)?;
            let (objects, entries, events) = seal_plain(&db, &meta, &next, &sealer, schema)?;
            next.finish(&meta, &sealer)?;
            drop(meta);
            drop(db);
            swap_in(path)?;
            tracing::info!(
                objects,
                log_entries = entries,
                events,
                "store sealed: migrated from schema {schema} to {SCHEMA_VERSION}"
            );
            let db = open_db(path)?;
            let meta = open_meta(&db, config)?;
            let keyspaces = Keyspaces::open(&db, config)?;
            Ok((db, meta, sealer, keyspaces))
        }
        Some(other) => Err(open_error(
            path,
            format!("schema version {other} is not supported (this agent reads {SCHEMA_VERSION})"),
        )),
    }
}

/// Copies a plain store's values (schema 1 or 2) sealed into `to`, the
/// keyspaces of a fresh database that then replaces the plain one whole:
/// no plain value stays behind in a table or the journal. A crash before
/// the swap leaves the plain store as it was, and the next open does it
/// again.
fn seal_plain(
    db: &Database,
    meta: &Keyspace,
    next: &NextDb,
    sealer: &Sealer,
    schema: u64,
) -> Result<(u64, u64, u64), StoreError> {
    let to = &next.keyspaces;
    let mut batch = next.db.batch();
    let (mut objects, mut entries, mut events) = (0u64, 0u64, 0u64);
    let compacted_through = read_meta_u64(meta, META_COMPACTED_THROUGH)?.unwrap_or(0);
    let existing = |name: &str| -> Result<Option<Keyspace>, StoreError> {
        if db.keyspace_exists(name) {
            Ok(Some(db.keyspace(name, KeyspaceCreateOptions::default)?))
        } else {
            Ok(None)
        }
    };
    if let Some(old) = existing(PLAIN_OBJECTS_KEYSPACE)? {
        for guard in old.iter() {
            let (key, value) = guard.into_inner()?;
            batch.insert(
                &to.objects,
                key.clone(),
                sealer.seal(Aad::Object(&key), &value)?,
            );
            objects += 1;
        }
    }
    if let Some(old) = existing(PLAIN_EVENTS_KEYSPACE)? {
        for guard in old.iter() {
            let (key, value) = guard.into_inner()?;
            batch.insert(
                &to.events,
                key.clone(),
                sealer.seal(Aad::Event(&key), &value)?,
            );
            events += 1;
        }
    }
    let log_name = if schema == 1 {
        SCHEMA_1_LOG_KEYSPACE
    } else {
        SCHEMA_2_LOG_KEYSPACE
    };
    if let Some(old) = existing(log_name)? {
        for guard in old.range(log_key(compacted_through + 1)..) {
            let (key, value) = guard.into_inner()?;
            let record =
                LogRecord::decode(&*value).map_err(|e| StoreError::Corrupt(format!("log: {e}")))?;
            batch.insert(&to.log, key, seal_record(sealer, record)?);
            entries += 1;
        }
    }
    batch.commit()?;
    Ok((objects, entries, events))
}

/// A plain log record, stored sealed.
fn seal_record(sealer: &Sealer, record: LogRecord) -> Result<Vec<u8>, StoreError> {
    let object = record.object.unwrap_or_default();
    let id = object.id().to_string();
    let sealed_object =
        sealer.seal_with(Aad::Object(id.as_bytes()), object.encoded_len(), |out| {
            object.encode_raw(out)
        })?;
    Ok(SealedLogRecord {
        kind: record.kind,
        resource_version: record.resource_version,
        action: record.action,
        at_ms: record.at_ms,
        caller: record.caller,
        role: record.role,
        id,
        sealed_object,
    }
    .encode_to_vec())
}

pub(super) fn open_object(
    sealer: &Sealer,
    id: &[u8],
    value: &[u8],
) -> Result<Workload, StoreError> {
    let what = || format!("object {}", String::from_utf8_lossy(id));
    let plain = sealer.open(Aad::Object(id), value, &what())?;
    Workload::decode(&*plain).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))
}

pub(super) fn open_event(sealer: &Sealer, key: &[u8], value: &[u8]) -> Result<Event, StoreError> {
    let plain = sealer.open(Aad::Event(key), value, "event")?;
    Event::decode(&*plain).map_err(|e| StoreError::Corrupt(format!("event: {e}")))
}

pub(super) fn open_record(sealer: &Sealer, value: &[u8]) -> Result<LogRecord, StoreError> {
    let record = decode_sealed_record(value)?;
    let object = open_object(sealer, record.id.as_bytes(), &record.sealed_object)?;
    Ok(LogRecord {
        kind: record.kind,
        resource_version: record.resource_version,
        object: Some(object),
        action: record.action,
        at_ms: record.at_ms,
        caller: record.caller,
        role: record.role,
    })
}

/// The stored record, its object still sealed.
pub(super) fn decode_sealed_record(value: &[u8]) -> Result<SealedLogRecord, StoreError> {
    let record =
        SealedLogRecord::decode(value).map_err(|e| StoreError::Corrupt(format!("log: {e}")))?;
    if record.sealed_object.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "log entry {}: no sealed object",
            record.resource_version
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod proptests;
