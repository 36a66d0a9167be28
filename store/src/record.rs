//! The stored forms: keys, and the change-log record.

use persys_api::v1::{WatchEventType, Workload};

/// One change-log entry, keyed by its resource version (big-endian u64).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    #[prost(enumeration = "WatchEventType", tag = "1")]
    pub kind: i32,
    #[prost(uint64, tag = "2")]
    pub resource_version: u64,
    #[prost(message, optional, tag = "3")]
    pub object: Option<Workload>,
    /// What caused the write: apply, delete, status, finalize.
    #[prost(string, tag = "4")]
    pub action: String,
    #[prost(int64, tag = "5")]
    pub at_ms: i64,
    /// Who asked for an apply or a delete (empty for the agent's own
    /// status and finalizer writes).
    #[prost(string, tag = "6")]
    pub caller: String,
    /// The role the caller had.
    #[prost(string, tag = "7")]
    pub role: String,
}

/// A change-log entry as stored (schema 3): what watches and audits sort
/// by in clear, the object sealed ([`super::seal`]) under its id. The
/// sealed bytes are the very ones stored in the objects keyspace: the
/// committer encodes and seals each written object once. The sealed object
/// has its own tag, so a plain record (tag 3) never passes for a sealed one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SealedLogRecord {
    #[prost(enumeration = "WatchEventType", tag = "1")]
    pub kind: i32,
    #[prost(uint64, tag = "2")]
    pub resource_version: u64,
    #[prost(string, tag = "4")]
    pub action: String,
    #[prost(int64, tag = "5")]
    pub at_ms: i64,
    #[prost(string, tag = "6")]
    pub caller: String,
    #[prost(string, tag = "7")]
    pub role: String,
    /// The object's id: the associated data its seal is bound to.
    #[prost(string, tag = "8")]
    pub id: String,
    #[prost(bytes = "vec", tag = "9")]
    pub sealed_object: Vec<u8>,
}

pub const ACTION_APPLY: &str = "apply";
pub const ACTION_DELETE: &str = "delete";
pub const ACTION_RECONCILE: &str = "reconcile";
pub const ACTION_FINALIZE: &str = "finalize";

/// Keys of the `meta` keyspace.
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub const META_LAST_RESOURCE_VERSION: &[u8] = b"last_resource_version";
pub const META_COMPACTED_THROUGH: &[u8] = b"compacted_through";
/// A known constant sealed under the node key: a wrong key is caught at open.
pub const META_KEY_CHECK: &[u8] = b"key_check";
/// Present when the store was created with sealing off (measurement only).
pub const META_PLAIN: &[u8] = b"plain";
/// Schema 3: every value sealed, in the sealed keyspaces.
pub const SCHEMA_VERSION: u64 = 3;

/// Where schemas 1 and 2 kept values in clear.
pub const PLAIN_OBJECTS_KEYSPACE: &str = "objects";
pub const PLAIN_EVENTS_KEYSPACE: &str = "events";
/// Schema 2's log (FIFO compaction, trimmed logically).
pub const SCHEMA_2_LOG_KEYSPACE: &str = "changelog";
/// Schema 1's log (leveled, trimmed with deletes).
pub const SCHEMA_1_LOG_KEYSPACE: &str = "log";

/// The sealed keyspaces: objects, change log, events.
pub const SEALED_KEYSPACES: [&str; 3] = ["objects_sealed", "changelog_sealed", "events_sealed"];

pub fn log_key(resource_version: u64) -> [u8; 8] {
    resource_version.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Events of a workload are keyed `<id> 0x00 <fold hash>`: ids never contain
/// a NUL, so a prefix scan of `<id> 0x00` finds exactly that workload's.
pub fn event_prefix(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

pub fn event_key(id: &str, fold: &[u8; 8]) -> Vec<u8> {
    let mut key = event_prefix(id);
    key.extend_from_slice(fold);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use persys_api::v1::ObjectMeta;
    use prost::Message;

    #[test]
    fn plain_and_sealed_records_are_never_taken_for_each_other() {
        let object = Workload {
            metadata: Some(ObjectMeta {
                id: "web".into(),
                resource_version: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        let plain = LogRecord {
            kind: WatchEventType::Modified as i32,
            resource_version: 7,
            object: Some(object.clone()),
            action: ACTION_APPLY.into(),
            at_ms: 42,
            caller: "CN=persys-scheduler".into(),
            role: "scheduler".into(),
        };
        let as_sealed = SealedLogRecord::decode(&*plain.encode_to_vec()).unwrap();
        assert!(as_sealed.sealed_object.is_empty());
        assert_eq!(as_sealed.caller, "CN=persys-scheduler");
        let sealed = SealedLogRecord {
            kind: WatchEventType::Modified as i32,
            resource_version: 7,
            action: ACTION_APPLY.into(),
            at_ms: 42,
            caller: String::new(),
            role: String::new(),
            id: "web".into(),
            sealed_object: object.encode_to_vec(),
        };
        assert_eq!(
            LogRecord::decode(&*sealed.encode_to_vec()).unwrap().object,
            None
        );
    }
}
