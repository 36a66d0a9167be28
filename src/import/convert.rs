//! One Go agent `workloads` record → this agent's apply request.
//!
//! The Go agent keeps `{id, type, revision_id, desired_state, spec,
//! created_at, updated_at}`, its spec being the request's ContainerSpec,
//! ComposeSpec or VMSpec as Go's `encoding/json` writes a protoc-gen-go
//! struct: proto field names in snake_case, zero values omitted, enums and
//! int64 as JSON numbers. This agent's messages carry the same fields under
//! the same names (WIRE.md), so the spec is read by name into them; a key
//! they have no field for is listed, never dropped unsaid.

use persys_api::v1::{
    ApplyWorkloadRequest, ComposeSpec, ContainerSpec, DesiredState, VmSpec, WorkloadSpec,
    WorkloadType, workload_spec,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::server::validate::FieldError;

/// A Go agent workload, read.
#[derive(Debug, Clone)]
pub struct GoWorkload {
    pub request: ApplyWorkloadRequest,
    pub workload_type: WorkloadType,
    pub desired_state: DesiredState,
    /// The Go record's times (RFC 3339), kept in the `Imported` event: the
    /// object's own creation time is the import's.
    pub created_at: String,
    pub updated_at: String,
    /// Keys of the record this agent has no field for (`spec.runtime_class`).
    pub unrepresented: Vec<String>,
}

/// The record's top-level keys this agent reads.
const RECORD_KEYS: [&str; 7] = [
    "id",
    "type",
    "revision_id",
    "desired_state",
    "spec",
    "created_at",
    "updated_at",
];

fn refuse<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// The id a record is reported under before its JSON is read: its key.
pub fn key_id(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Reads the record stored under `key`. Refused (naming the field) when it
/// is not the Go agent's JSON or a value does not fit its field.
pub fn go_workload(key: &[u8], value: &[u8]) -> Result<GoWorkload, FieldError> {
    let record: Value = match serde_json::from_slice(value) {
        Ok(record) => record,
        Err(error) => return refuse("record", format!("is not JSON: {error}")),
    };
    let Value::Object(mut record) = record else {
        return refuse("record", "is not a JSON object");
    };
    let key = key_id(key);
    let id = match record.remove("id") {
        None | Some(Value::Null) => key.clone(),
        Some(Value::String(id)) if id.is_empty() => key.clone(),
        Some(Value::String(id)) => id,
        Some(other) => return refuse("id", format!("is {other}, not a string")),
    };
    if id != key {
        return refuse(
            "id",
            format!("{id:?} differs from the key {key:?} the record is stored under"),
        );
    }
    let workload_type = match record.remove("type") {
        Some(Value::String(name)) => match WorkloadType::from_short_name(&name) {
            Some(t) => t,
            None => return refuse("type", format!("{name:?} is not container, compose or vm")),
        },
        Some(Value::Number(n)) => match n.as_i64().map(i32::try_from) {
            Some(Ok(n)) => match WorkloadType::try_from(n) {
                Ok(WorkloadType::Unspecified) | Err(_) => {
                    return refuse("type", format!("{n} is not a workload type"));
                }
                Ok(t) => t,
            },
            _ => return refuse("type", format!("{n} is not a workload type")),
        },
        None | Some(Value::Null) => return refuse("type", "is missing"),
        Some(other) => return refuse("type", format!("is {other}, not a type name")),
    };
    let desired_state = match record.remove("desired_state") {
        None | Some(Value::Null) => DesiredState::Running,
        Some(Value::String(name)) if name.is_empty() => DesiredState::Running,
        Some(Value::String(name)) => match DesiredState::from_short_name(&name) {
            Some(state) => state,
            None => {
                return refuse(
                    "desired_state",
                    format!("{name:?} is not running or stopped"),
                );
            }
        },
        Some(Value::Number(n)) => match n.as_i64().map(i32::try_from) {
            Some(Ok(n)) => match DesiredState::try_from(n) {
                Ok(DesiredState::Unspecified) => DesiredState::Running,
                Ok(state) => state,
                Err(_) => return refuse("desired_state", format!("{n} is not a state")),
            },
            _ => return refuse("desired_state", format!("{n} is not a state")),
        },
        Some(other) => return refuse("desired_state", format!("is {other}, not a state")),
    };
    let revision_id = match record.remove("revision_id") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(revision)) => revision,
        Some(other) => return refuse("revision_id", format!("is {other}, not a string")),
    };
    let time = |record: &mut Map<String, Value>, name: &str| match record.remove(name) {
        Some(Value::String(at)) => at,
        _ => String::new(),
    };
    let created_at = time(&mut record, "created_at");
    let updated_at = time(&mut record, "updated_at");
    let spec = match record.remove("spec") {
        Some(Value::Object(spec)) => Value::Object(spec),
        None | Some(Value::Null) => return refuse("spec", "is missing"),
        Some(other) => return refuse("spec", format!("is {other}, not an object")),
    };
    let mut unrepresented: Vec<String> = record
        .keys()
        .filter(|k| !RECORD_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    let path = format!("spec.{}", workload_type.short_name());
    let spec = match workload_type {
        WorkloadType::Container => {
            let (spec, left) = read_spec::<ContainerSpec>(spec, &path)?;
            unrepresented.extend(left);
            workload_spec::Spec::Container(spec)
        }
        WorkloadType::Compose => {
            let (spec, left) = read_spec::<ComposeSpec>(spec, &path)?;
            unrepresented.extend(left);
            workload_spec::Spec::Compose(spec)
        }
        WorkloadType::Vm => {
            let (spec, left) = read_spec::<VmSpec>(spec, &path)?;
            unrepresented.extend(left);
            workload_spec::Spec::Vm(spec)
        }
        WorkloadType::Unspecified => return refuse("type", "is unspecified"),
    };
    Ok(GoWorkload {
        request: ApplyWorkloadRequest {
            id,
            r#type: workload_type as i32,
            revision_id,
            desired_state: desired_state as i32,
            spec: Some(WorkloadSpec { spec: Some(spec) }),
        },
        workload_type,
        desired_state,
        created_at,
        updated_at,
        unrepresented,
    })
}

/// Reads `value` into `T` by field name; returns it with the paths of the
/// keys `T` has no field for. A value of the wrong type is refused, naming
/// the field it was under.
fn read_spec<T: DeserializeOwned + serde::Serialize>(
    value: Value,
    path: &str,
) -> Result<(T, Vec<String>), FieldError> {
    let spec: T = match serde_json::from_value(value.clone()) {
        Ok(spec) => spec,
        Err(error) => {
            // Which field: the first one that fails on its own.
            if let Value::Object(map) = &value {
                for (key, field) in map {
                    let alone = Value::Object(Map::from_iter([(key.clone(), field.clone())]));
                    if let Err(error) = serde_json::from_value::<T>(alone) {
                        return refuse(
                            format!("{path}.{key}"),
                            format!("cannot be read as this agent's field: {error}"),
                        );
                    }
                }
            }
            return refuse(path, format!("cannot be read: {error}"));
        }
    };
    // What was read, written back: every field the message has. A key of
    // the input missing from it is one the message has no field for.
    let read = serde_json::to_value(&spec).unwrap_or(Value::Null);
    let mut left = Vec::new();
    unmatched_keys(&value, &read, path, &mut left);
    Ok((spec, left))
}

fn unmatched_keys(input: &Value, read: &Value, path: &str, out: &mut Vec<String>) {
    match (input, read) {
        (Value::Object(input), Value::Object(read)) => {
            for (key, value) in input {
                let at = format!("{path}.{key}");
                match read.get(key) {
                    Some(read) => unmatched_keys(value, read, &at, out),
                    None => out.push(at),
                }
            }
        }
        (Value::Array(input), Value::Array(read)) => {
            for (i, (value, read)) in input.iter().zip(read).enumerate() {
                unmatched_keys(value, read, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Result<GoWorkload, FieldError> {
        let value: Value = serde_json::from_str(json).unwrap();
        let key = value["id"].as_str().unwrap_or("k").to_string();
        go_workload(key.as_bytes(), json.as_bytes())
    }

    #[test]
    fn a_container_record_keeps_every_field_and_its_revision() {
        let w = record(
            r#"{"id":"web","type":"container","revision_id":"r1","desired_state":"stopped",
            "spec":{"image":"nginx","command":["sh"],"args":["-c","x"],"env":{"A":"1"},
              "volumes":[{"container_path":"/d","host_path":"/var/lib/persys/volumes/w","read_only":true}],
              "ports":[{"container_port":80,"host_port":8080,"protocol":"tcp"}],
              "resources":{"cpu_shares":512,"memory_bytes":268435456,"memory_swap_bytes":536870912},
              "restart_policy":{"max_retry_count":3,"policy":"on-failure"},
              "labels":{"t":"w"},
              "managed_volumes":[{"driver":"local","mount_path":"/c","name":"c","size_gb":1}]},
            "created_at":"2025-03-01T12:00:00Z","updated_at":"2025-03-02T08:30:00Z"}"#,
        )
        .unwrap();
        assert_eq!(w.request.revision_id, "r1");
        assert_eq!(w.desired_state, DesiredState::Stopped);
        assert_eq!(w.created_at, "2025-03-01T12:00:00Z");
        assert!(w.unrepresented.is_empty(), "{:?}", w.unrepresented);
        let Some(workload_spec::Spec::Container(c)) = w.request.spec.unwrap().spec else {
            panic!("not a container");
        };
        assert_eq!(c.args, ["-c", "x"]);
        assert_eq!(c.volumes[0].host_path, "/var/lib/persys/volumes/w");
        assert!(c.volumes[0].read_only);
        assert_eq!(c.ports[0].host_port, 8080);
        assert_eq!(c.resources.unwrap().memory_swap_bytes, 536_870_912);
        assert_eq!(c.restart_policy.unwrap().max_retry_count, 3);
        assert_eq!(c.managed_volumes[0].size_gb, 1);
    }

    #[test]
    fn keys_this_agent_has_no_field_for_are_listed_with_their_path() {
        let w = record(
            r#"{"id":"v","type":"vm","spec":{"vcpus":1,"memory_mb":512,"gpu":"a100",
            "disks":[{"path":"/x","iops":5}]},"owner":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            w.unrepresented,
            ["owner", "spec.vm.disks[0].iops", "spec.vm.gpu"]
        );
        assert_eq!(w.desired_state, DesiredState::Running);
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_its_field() {
        let error = record(r#"{"id":"v","type":"vm","spec":{"vcpus":"two"}}"#).unwrap_err();
        assert_eq!(error.field, "spec.vm.vcpus");
        let error = record(r#"{"id":"v","type":"pod","spec":{}}"#).unwrap_err();
        assert_eq!(error.field, "type");
        let error = go_workload(b"a", br#"{"id":"b","type":"vm","spec":{}}"#).unwrap_err();
        assert_eq!(error.field, "id");
        let error = go_workload(b"a", b"not json").unwrap_err();
        assert_eq!(error.field, "record");
    }

    #[test]
    fn enums_written_as_numbers_are_read() {
        let w =
            record(r#"{"id":"c","type":2,"desired_state":2,"spec":{"compose_yaml":"x"}}"#).unwrap();
        assert_eq!(w.workload_type, WorkloadType::Compose);
        assert_eq!(w.desired_state, DesiredState::Stopped);
    }
}
