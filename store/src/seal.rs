//! Values at rest, sealed with XChaCha20-Poly1305 under the node key.
//!
//! A sealed value is `version (1) | key id (4) | nonce (24) | ciphertext |
//! tag (16)`. The key id is the first 4 bytes of the key's SHA-256: it
//! says which key a value is under without revealing it. Each value gets a
//! fresh nonce: 16 bytes drawn from the OS once per key and process, then an
//! 8-byte counter, so no two values under a key share one (a 128-bit random
//! prefix per start makes a repeat across restarts as unlikely as a random
//! 24-byte nonce would), without a system call per value. The associated data binds a value to what
//! it is and where it belongs ([`Aad`]): an object sealed for one id does not
//! open as another's, nor as an event.
//!
//! The key is 32 random bytes, written as 64 hex digits in the key file
//! (mode 0600, beside the state directory, never inside it).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{AeadInOut, Generate, Key, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::StoreError;

/// The format of a sealed value.
const VERSION_SEALED: u8 = 1;
/// A value of a store opened with sealing off (measurement only).
const VERSION_PLAIN: u8 = 0;
const NONCE_BYTES: usize = 24;
const HEADER_BYTES: usize = 1 + 4 + NONCE_BYTES;
const TAG_BYTES: usize = 16;
/// Sealing adds this much to a value.
pub const OVERHEAD: usize = HEADER_BYTES + TAG_BYTES;
const KEY_BYTES: usize = 32;

/// Identifies a key without revealing it: the first 4 bytes of its SHA-256.
pub type KeyId = [u8; 4];

/// What a sealed value is, bound into it as associated data.
#[derive(Debug, Clone, Copy)]
pub enum Aad<'a> {
    /// A workload (in the objects keyspace and in the change log), by id.
    Object(&'a [u8]),
    /// An event, by its key in the events keyspace.
    Event(&'a [u8]),
    /// The key check in `meta`.
    KeyCheck,
}

impl Aad<'_> {
    fn bytes(self) -> Vec<u8> {
        let (domain, rest): (&[u8], &[u8]) = match self {
            Aad::Object(id) => (b"persys/object\0", id),
            Aad::Event(key) => (b"persys/event\0", key),
            Aad::KeyCheck => (b"persys/key-check\0", b""),
        };
        let mut aad = Vec::with_capacity(domain.len() + rest.len());
        aad.extend_from_slice(domain);
        aad.extend_from_slice(rest);
        aad
    }
}

/// A node key, wiped from memory when dropped.
pub struct NodeKey(Zeroizing<[u8; KEY_BYTES]>);

impl NodeKey {
    /// A new key from the OS random number generator.
    pub fn generate() -> Result<NodeKey, StoreError> {
        let key = Key::<XChaCha20Poly1305>::try_generate().map_err(|e| StoreError::Key {
            message: format!("the OS random number generator failed: {e}"),
        })?;
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        bytes.copy_from_slice(&key);
        Ok(NodeKey(bytes))
    }

    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(&self.0[..]);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest[..4]);
        id
    }

    fn to_hex(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(KEY_BYTES * 2 + 1));
        for byte in self.0.iter() {
            text.push(HEX[usize::from(byte >> 4)] as char);
            text.push(HEX[usize::from(byte & 0xf)] as char);
        }
        text.push('\n');
        text
    }

    fn from_hex(text: &str) -> Option<NodeKey> {
        let text = text.trim().as_bytes();
        if text.len() != KEY_BYTES * 2 {
            return None;
        }
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        for (i, pair) in text.chunks(2).enumerate() {
            let high = hex_value(pair[0])?;
            let low = hex_value(pair[1])?;
            bytes[i] = (high << 4) | low;
        }
        Some(NodeKey(bytes))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// A key id as hex, for messages and logs.
pub fn key_id_hex(id: &KeyId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

struct Keyed {
    id: KeyId,
    cipher: XChaCha20Poly1305,
    /// The random first 16 bytes of every nonce this process seals with.
    nonce_prefix: [u8; NONCE_PREFIX_BYTES],
    /// The last 8 bytes: one more for every value sealed.
    nonce_counter: AtomicU64,
}

const NONCE_PREFIX_BYTES: usize = 16;

impl Keyed {
    fn new(key: &NodeKey) -> Result<Keyed, StoreError> {
        let cipher =
            XChaCha20Poly1305::new_from_slice(&key.0[..]).map_err(|_| StoreError::Key {
                message: "a node key is 32 bytes".into(),
            })?;
        let random = XNonce::try_generate()
            .map_err(|e| StoreError::Io(format!("the OS random number generator failed: {e}")))?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_BYTES];
        nonce_prefix.copy_from_slice(&random[..NONCE_PREFIX_BYTES]);
        Ok(Keyed {
            id: key.id(),
            cipher,
            nonce_prefix,
            nonce_counter: AtomicU64::new(0),
        })
    }

    fn next_nonce(&self) -> Result<XNonce, StoreError> {
        let count = self
            .nonce_counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| StoreError::Io("the nonce counter is spent; restart the agent".into()))?;
        let mut nonce = XNonce::default();
        nonce[..NONCE_PREFIX_BYTES].copy_from_slice(&self.nonce_prefix);
        nonce[NONCE_PREFIX_BYTES..].copy_from_slice(&count.to_le_bytes());
        Ok(nonce)
    }
}

/// Seals and opens the store's values.
pub struct Sealer {
    /// `None`: sealing is off (a store opened for measurement only).
    current: Option<Keyed>,
    /// A key values may still be under while a rotation runs: opened, never
    /// used to seal.
    previous: Option<Keyed>,
}

impl Sealer {
    pub fn new(key: &NodeKey) -> Result<Sealer, StoreError> {
        Ok(Sealer {
            current: Some(Keyed::new(key)?),
            previous: None,
        })
    }

    /// Seals under `key`; also opens what is still under `previous`.
    pub fn rotating(key: &NodeKey, previous: &NodeKey) -> Result<Sealer, StoreError> {
        Ok(Sealer {
            current: Some(Keyed::new(key)?),
            previous: Some(Keyed::new(previous)?),
        })
    }

    /// No sealing: values are stored as they are, behind a version byte.
    pub fn plain() -> Sealer {
        Sealer {
            current: None,
            previous: None,
        }
    }

    pub fn is_plain(&self) -> bool {
        self.current.is_none()
    }

    /// The key new values are sealed under.
    pub fn key_id(&self) -> Option<KeyId> {
        self.current.as_ref().map(|k| k.id)
    }

    /// Seals what `encode` appends to a buffer: the value is encoded
    /// straight into the sealed buffer and encrypted in place, so sealing
    /// costs no copy. `size` is the encoded length, when known.
    pub fn seal_with(
        &self,
        aad: Aad<'_>,
        size: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<u8>, StoreError> {
        let Some(keyed) = &self.current else {
            let mut out = Vec::with_capacity(1 + size);
            out.push(VERSION_PLAIN);
            encode(&mut out);
            return Ok(out);
        };
        let nonce = keyed.next_nonce()?;
        let mut out = Vec::with_capacity(OVERHEAD + size);
        out.push(VERSION_SEALED);
        out.extend_from_slice(&keyed.id);
        out.extend_from_slice(&nonce);
        encode(&mut out);
        let tag = keyed
            .cipher
            .encrypt_inout_detached(&nonce, &aad.bytes(), (&mut out[HEADER_BYTES..]).into())
            .map_err(|_| StoreError::Io("a value too large to seal".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    pub fn seal(&self, aad: Aad<'_>, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.seal_with(aad, value.len(), |out| out.extend_from_slice(value))
    }

    /// The key id a stored value is under (`None` for a plain value or one
    /// too short to be sealed).
    pub fn key_id_of(value: &[u8]) -> Option<KeyId> {
        if value.len() < OVERHEAD || value[0] != VERSION_SEALED {
            return None;
        }
        value[1..5].try_into().ok()
    }

    /// Opens a stored value; `what` names it in errors. A value under
    /// another key, or altered, or moved from elsewhere, is an error, never
    /// a panic.
    pub fn open(&self, aad: Aad<'_>, value: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
        let Some(current) = &self.current else {
            return match value.split_first() {
                Some((&VERSION_PLAIN, rest)) => Ok(rest.to_vec()),
                _ => Err(StoreError::Corrupt(format!(
                    "{what}: a sealed value in a store opened without sealing"
                ))),
            };
        };
        let Some(id) = Sealer::key_id_of(value) else {
            return Err(StoreError::Corrupt(format!("{what}: not a sealed value")));
        };
        let keyed = if id == current.id {
            current
        } else {
            match &self.previous {
                Some(previous) if previous.id == id => previous,
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "{what}: sealed under key {}, not the node key ({})",
                        key_id_hex(&id),
                        key_id_hex(&current.id)
                    )));
                }
            }
        };
        let nonce = XNonce::try_from(&value[5..HEADER_BYTES])
            .map_err(|_| StoreError::Corrupt(format!("{what}: nonce")))?;
        let (ciphertext, tag) = value[HEADER_BYTES..].split_at(value.len() - OVERHEAD);
        let tag =
            Tag::try_from(tag).map_err(|_| StoreError::Corrupt(format!("{what}: tag length")))?;
        let mut plain = ciphertext.to_vec();
        keyed
            .cipher
            .decrypt_inout_detached(&nonce, &aad.bytes(), plain.as_mut_slice().into(), &tag)
            .map_err(|_| {
                StoreError::Corrupt(format!(
                    "{what}: does not authenticate under key {} (altered, or moved from elsewhere)",
                    key_id_hex(&keyed.id)
                ))
            })?;
        Ok(plain)
    }
}

/// The constant sealed as `meta`'s key check.
const KEY_CHECK: &[u8] = b"persys-agent state key check";

pub fn key_check(sealer: &Sealer) -> Result<Vec<u8>, StoreError> {
    sealer.seal(Aad::KeyCheck, KEY_CHECK)
}

/// True when `stored` is the key check sealed under a key `sealer` has.
pub fn key_check_opens(sealer: &Sealer, stored: &[u8]) -> bool {
    sealer
        .open(Aad::KeyCheck, stored, "key check")
        .is_ok_and(|v| v == KEY_CHECK)
}

/// `<path>.key`: beside the state directory, named after it.
pub fn default_key_file(state_path: &Path) -> PathBuf {
    // Through components, so a trailing `/` does not put the key inside.
    let normalized: PathBuf = state_path.components().collect();
    let mut name = normalized.into_os_string();
    name.push(".key");
    PathBuf::from(name)
}

/// Where a rotation keeps the next key until it is installed.
pub fn new_key_file(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

fn key_error(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Key {
        message: format!("state key file {}: {what}", path.display()),
    }
}

/// Reads a key file: `None` when there is none. Refuses a file that group
/// or others may read, as ssh does with private keys.
pub fn read_key_file(path: &Path) -> Result<Option<NodeKey>, StoreError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(key_error(path, e)),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(key_error(
            path,
            format!(
                "mode {mode:04o} lets others read it; it must be readable by its owner only (chmod 600 {})",
                path.display()
            ),
        ));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| key_error(path, e))?);
    NodeKey::from_hex(&text)
        .map(Some)
        .ok_or_else(|| {
            key_error(
                path,
                "not a key (64 hex digits expected). Nothing was changed: restore the node's key file from a backup",
            )
        })
}

/// Writes a new random key to `path`, which must not exist: mode 0600,
/// synced, and its directory synced.
pub fn create_key_file(path: &Path) -> Result<NodeKey, StoreError> {
    let key = NodeKey::generate()?;
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| key_error(path, e))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_error(path, format!("creating it: {e}")))?;
    let written = file
        .write_all(key.to_hex().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(key_error(path, format!("writing it: {e}")));
    }
    Ok(key)
}

/// Puts `new` in place of `key_file` (a rename) and syncs the directory.
pub fn install_key_file(new: &Path, key_file: &Path) -> Result<(), StoreError> {
    std::fs::rename(new, key_file)
        .and_then(|()| sync_dir(parent_dir(key_file)))
        .map_err(|e| key_error(key_file, format!("installing {}: {e}", new.display())))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> (NodeKey, Sealer) {
        let key = NodeKey::generate().unwrap();
        let sealer = Sealer::new(&key).unwrap();
        (key, sealer)
    }

    #[test]
    fn a_sealed_value_opens_only_where_it_was_sealed() {
        let (key, sealer) = sealer();
        let sealed = sealer.seal(Aad::Object(b"web"), b"SECRET=hunter2").unwrap();
        assert_eq!(sealed.len(), b"SECRET=hunter2".len() + OVERHEAD);
        assert_eq!(Sealer::key_id_of(&sealed), Some(key.id()));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            sealer.open(Aad::Object(b"web"), &sealed, "web").unwrap(),
            b"SECRET=hunter2"
        );
        // Another id, another kind of value: refused.
        for aad in [Aad::Object(b"db"), Aad::Event(b"web")] {
            let error = sealer.open(aad, &sealed, "x").unwrap_err();
            assert!(
                error.to_string().contains("does not authenticate"),
                "{error}"
            );
        }
        // Altered: refused.
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(sealer.open(Aad::Object(b"web"), &altered, "x").is_err());
        // Two seals of one value differ (fresh nonces).
        assert_ne!(
            sealed,
            sealer.seal(Aad::Object(b"web"), b"SECRET=hunter2").unwrap()
        );
    }

    #[test]
    fn nonces_never_repeat_under_a_key_within_a_run_or_across_runs() {
        let key = NodeKey::generate().unwrap();
        let nonce = |sealed: &[u8]| sealed[5..HEADER_BYTES].to_vec();
        let first_run = Sealer::new(&key).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let sealed = first_run.seal(Aad::KeyCheck, b"v").unwrap();
            assert!(seen.insert(nonce(&sealed)), "a nonce repeated in one run");
        }
        // A restart (a new sealer for the same key) starts from a new
        // random prefix, not from the first run's nonces.
        let second_run = Sealer::new(&key).unwrap();
        let sealed = second_run.seal(Aad::KeyCheck, b"v").unwrap();
        assert!(seen.insert(nonce(&sealed)), "a restart reused a nonce");
        assert_ne!(
            sealed[5..5 + NONCE_PREFIX_BYTES],
            first_run.seal(Aad::KeyCheck, b"v").unwrap()[5..5 + NONCE_PREFIX_BYTES]
        );
        assert_eq!(second_run.open(Aad::KeyCheck, &sealed, "x").unwrap(), b"v");
    }

    #[test]
    fn another_key_is_named_and_refused_and_a_rotating_sealer_opens_both() {
        let (old_key, old) = sealer();
        let (new_key, new) = sealer();
        let sealed = old.seal(Aad::Event(b"e"), b"v").unwrap();
        let error = new.open(Aad::Event(b"e"), &sealed, "event e").unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&key_id_hex(&old_key.id())), "{message}");
        let rotating = Sealer::rotating(&new_key, &old_key).unwrap();
        assert_eq!(rotating.open(Aad::Event(b"e"), &sealed, "e").unwrap(), b"v");
        let resealed = rotating.seal(Aad::Event(b"e"), b"v").unwrap();
        assert_eq!(Sealer::key_id_of(&resealed), Some(new_key.id()));
        assert!(key_check_opens(&new, &key_check(&rotating).unwrap()));
        assert!(!key_check_opens(&old, &key_check(&new).unwrap()));
    }

    #[test]
    fn plain_and_sealed_values_are_never_taken_for_each_other() {
        let (_, sealer) = sealer();
        let plain = Sealer::plain().seal(Aad::Object(b"w"), b"v").unwrap();
        assert!(sealer.open(Aad::Object(b"w"), &plain, "w").is_err());
        let sealed = sealer.seal(Aad::Object(b"w"), b"v").unwrap();
        assert!(
            Sealer::plain()
                .open(Aad::Object(b"w"), &sealed, "w")
                .is_err()
        );
        assert!(sealer.open(Aad::Object(b"w"), b"", "w").is_err());
    }

    #[test]
    fn key_files_are_0600_refused_when_others_may_read_them_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.key");
        assert!(read_key_file(&path).unwrap().is_none());
        let key = create_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap().unwrap().id(), key.id());
        assert!(
            create_key_file(&path).is_err(),
            "never over an existing key"
        );
        assert_eq!(read_key_file(&path).unwrap().unwrap().id(), key.id());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let message = read_key_file(&path).err().unwrap().to_string();
        assert!(message.contains("chmod 600"), "{message}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex").unwrap();
        assert!(read_key_file(&path).is_err());
    }

    #[test]
    fn the_default_key_file_sits_beside_the_state_directory() {
        for (state, key) in [
            ("/var/lib/persys/state", "/var/lib/persys/state.key"),
            ("/var/lib/persys/state/", "/var/lib/persys/state.key"),
            ("state", "state.key"),
        ] {
            assert_eq!(default_key_file(Path::new(state)), PathBuf::from(key));
        }
        assert_eq!(
            new_key_file(Path::new("/k/state.key")),
            PathBuf::from("/k/state.key.new")
        );
    }
}
