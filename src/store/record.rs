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

/// [`LogRecord`] with its object already encoded: the same bytes on the
/// wire (a message field and a bytes field are both length-delimited), so the
/// committer encodes each written object once for the log and the objects
/// keyspace.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedLogRecord {
    #[prost(enumeration = "WatchEventType", tag = "1")]
    pub kind: i32,
    #[prost(uint64, tag = "2")]
    pub resource_version: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub object: Vec<u8>,
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

pub const ACTION_APPLY: &str = "apply";
pub const ACTION_DELETE: &str = "delete";
pub const ACTION_RECONCILE: &str = "reconcile";
pub const ACTION_FINALIZE: &str = "finalize";

/// Keys of the `meta` keyspace.
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub const META_LAST_RESOURCE_VERSION: &[u8] = b"last_resource_version";
pub const META_COMPACTED_THROUGH: &[u8] = b"compacted_through";
pub const SCHEMA_VERSION: u64 = 2;

/// The change log's keyspace (FIFO compaction, trimmed logically).
pub const LOG_KEYSPACE: &str = "changelog";
/// Where schema 1 kept the log.
pub const SCHEMA_1_LOG_KEYSPACE: &str = "log";

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
    fn a_record_with_its_object_encoded_ahead_decodes_as_a_log_record() {
        let object = Workload {
            metadata: Some(ObjectMeta {
                id: "web".into(),
                resource_version: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        let encoded = EncodedLogRecord {
            kind: WatchEventType::Modified as i32,
            resource_version: 7,
            object: object.encode_to_vec(),
            action: ACTION_APPLY.into(),
            at_ms: 42,
            caller: "CN=persys-scheduler".into(),
            role: "scheduler".into(),
        }
        .encode_to_vec();
        let whole = LogRecord {
            kind: WatchEventType::Modified as i32,
            resource_version: 7,
            object: Some(object),
            action: ACTION_APPLY.into(),
            at_ms: 42,
            caller: "CN=persys-scheduler".into(),
            role: "scheduler".into(),
        };
        assert_eq!(encoded, whole.encode_to_vec());
        assert_eq!(LogRecord::decode(&*encoded).unwrap(), whole);
    }
}
