//! `persys-agent store rotate-key`: every value re-sealed under a new key,
//! offline, crash-safely.
//!
//! 1. The new key is written to `<key file>.new` (0600, synced), unless a
//!    rotation that stopped left one there. While it exists the agent
//!    refuses to start.
//! 2. Every value is opened under the old key and sealed under the new one
//!    into a fresh database beside the live one (`db.next`), whose key
//!    check is then written under the new key, and synced.
//! 3. The fresh database replaces the live one (renames, directory synced)
//!    and the old one is removed whole. Rebuilding rather than rewriting in
//!    place matters: an LSM tree keeps superseded values in older tables and
//!    in its journal until they are compacted or rotated away (the FIFO
//!    change log is never merged), so old-key values would stay on disk.
//! 4. `<key file>.new` is renamed over the key file; the directory synced.
//!
//! Stopped anywhere, running it again finishes the job: before the swap the
//! live database is whole under the old key (an unfinished rebuild is
//! dropped and done again); after it, the key check says the new key and
//! only step 4 remains.

use fjall::{Database, Keyspace, PersistMode};
use prost::Message;

use super::StoreConfig;
use super::error::StoreError;
use super::record::*;
use super::schema::{self, Keyspaces, NextDb, read_meta_u64};
use super::seal::{self, Aad, Sealer, key_id_hex};

/// Values copied per batch.
const BATCH: usize = 4096;

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotateReport {
    pub objects: u64,
    pub log_entries: u64,
    pub events: u64,
    /// The id (not the key) values are now sealed under, as hex.
    pub key_id: String,
    /// True when this run only finished a rotation whose values were
    /// already re-sealed.
    pub finished_interrupted: bool,
}

impl std::fmt::Display for RotateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.finished_interrupted {
            write!(
                f,
                "finished an interrupted key rotation: every value is sealed under key {}",
                self.key_id
            )
        } else {
            write!(
                f,
                "re-sealed {} objects, {} log entries and {} events under key {}; the old key is gone",
                self.objects, self.log_entries, self.events, self.key_id
            )
        }
    }
}

/// Steps a test can stop a rotation after, as a crash would.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAfter {
    Never,
    /// The new key is written; nothing copied.
    NewKey,
    /// The rebuilt database holds part of the values.
    PartialCopy,
    /// The rebuilt database is live; the key file is still the old key.
    Swapped,
}

/// Re-seals the store in `config.path` under a new key. Takes the state
/// directory's lock: refused while the agent runs.
pub fn rotate_key(config: &StoreConfig) -> Result<RotateReport, StoreError> {
    rotate_key_until(config, StopAfter::Never)
}

#[doc(hidden)]
pub fn rotate_key_until(config: &StoreConfig, stop: StopAfter) -> Result<RotateReport, StoreError> {
    let path = &config.path;
    if !path.join("db").is_dir() && !path.join("db.next").is_dir() {
        return Err(schema::open_error(
            path,
            "no store here to rotate the key of",
        ));
    }
    let _lock = match schema::lock_state_dir(path) {
        Err(StoreError::Locked { path }) => {
            return Err(StoreError::Key {
                message: format!(
                    "state directory {} is in use by a running persys-agent: stop it, then rotate the key",
                    path.display()
                ),
            });
        }
        other => other?,
    };
    schema::finish_swap(path)?;
    let db = schema::open_db(path)?;
    let meta = schema::open_meta(&db, config)?;
    if read_meta_u64(&meta, META_SCHEMA_VERSION)? != Some(SCHEMA_VERSION)
        || meta.get(META_PLAIN)?.is_some()
    {
        return Err(schema::open_error(
            path,
            "this store is not sealed yet: start the agent once (it seals the store), then rotate",
        ));
    }
    let old_key =
        seal::read_key_file(&config.key_file)?.ok_or_else(|| schema::missing_key_error(config))?;
    let new_file = seal::new_key_file(&config.key_file);
    let new_key = match seal::read_key_file(&new_file)? {
        Some(key) => key,
        None => seal::create_key_file(&new_file)?,
    };
    if new_key.id() == old_key.id() {
        return Err(StoreError::Key {
            message: format!(
                "{} holds the same key as {}: remove it and run again",
                new_file.display(),
                config.key_file.display()
            ),
        });
    }
    let mut report = RotateReport {
        key_id: key_id_hex(&new_key.id()),
        ..Default::default()
    };
    if stop == StopAfter::NewKey {
        return Ok(report);
    }
    let old = Sealer::new(&old_key)?;
    // Opens under either key; seals under the new one.
    let new = Sealer::rotating(&new_key, &old_key)?;
    let check = meta
        .get(META_KEY_CHECK)?
        .ok_or_else(|| StoreError::Corrupt("the key check is missing from meta".into()))?;
    if seal::key_check_opens(&Sealer::new(&new_key)?, &check) {
        // Rebuilt and swapped in before: only the key file is left.
        report.finished_interrupted = true;
    } else if seal::key_check_opens(&old, &check) {
        let from = Keyspaces::open(&db, config)?;
        let next = NextDb::create(config)?;
        let to = &next.keyspaces;
        let compacted_through = read_meta_u64(&meta, META_COMPACTED_THROUGH)?.unwrap_or(0);
        report.objects = copy(&next.db, &from.objects, &to.objects, .., |key, value| {
            reseal(&new, Aad::Object(key), value, "object")
        })?;
        if stop == StopAfter::PartialCopy {
            next.db.persist(PersistMode::SyncAll)?;
            return Ok(report);
        }
        report.events = copy(&next.db, &from.events, &to.events, .., |key, value| {
            reseal(&new, Aad::Event(key), value, "event")
        })?;
        report.log_entries = copy(
            &next.db,
            &from.log,
            &to.log,
            log_key(compacted_through + 1)..,
            |_, value| {
                let mut record = schema::decode_sealed_record(value)?;
                record.sealed_object = reseal(
                    &new,
                    Aad::Object(record.id.as_bytes()),
                    &record.sealed_object,
                    "log entry",
                )?;
                Ok(record.encode_to_vec())
            },
        )?;
        next.finish(&meta, &new)?;
        drop(from);
        drop(meta);
        drop(db);
        schema::swap_in(path)?;
        if stop == StopAfter::Swapped {
            return Ok(report);
        }
    } else {
        return Err(StoreError::Key {
            message: format!(
                "neither {} nor {} opens the state in {}: restore the right key file",
                config.key_file.display(),
                new_file.display(),
                path.display()
            ),
        });
    }
    seal::install_key_file(&new_file, &config.key_file)?;
    Ok(report)
}

fn reseal(new: &Sealer, aad: Aad<'_>, value: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
    let plain = zeroize::Zeroizing::new(new.open(aad, value, what)?);
    new.seal(aad, &plain)
}

/// Copies `range` of `from` into `to` through `convert`, in batches.
fn copy<R: std::ops::RangeBounds<[u8; 8]>>(
    db: &Database,
    from: &Keyspace,
    to: &Keyspace,
    range: R,
    mut convert: impl FnMut(&[u8], &[u8]) -> Result<Vec<u8>, StoreError>,
) -> Result<u64, StoreError> {
    let mut copied = 0u64;
    let mut batch = db.batch();
    let mut pending = 0;
    for guard in from.range(range) {
        let (key, value) = guard.into_inner()?;
        let converted = convert(&key, &value)?;
        batch.insert(to, key, converted);
        copied += 1;
        pending += 1;
        if pending == BATCH {
            std::mem::replace(&mut batch, db.batch()).commit()?;
            pending = 0;
        }
    }
    batch.commit()?;
    Ok(copied)
}
