//! Behaviour of the object model: what a workload is, how its spec is
//! identified, and how it is shown to the scheduler.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::v1::{
    ActualState, Condition, DesiredState, ObjectStatus, Workload, WorkloadSpec, WorkloadStatus,
    WorkloadType, workload_spec,
};

/// The finalizer each runtime controller owns on the workloads of its type.
pub const FINALIZER_DOCKER: &str = "persys.io/docker";
pub const FINALIZER_COMPOSE: &str = "persys.io/compose";
pub const FINALIZER_VM: &str = "persys.io/vm";

/// Condition types.
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Hex SHA-256 of the spec's protobuf encoding. Maps are ordered, so equal
/// specs always hash equally, across processes and versions of the agent.
pub fn spec_hash(spec: &WorkloadSpec) -> String {
    hex::encode(Sha256::digest(spec.encode_to_vec()))
}

/// The text of a compose file sent as base64 (what the scheduler sends) or
/// as plain YAML. A compose file always holds a `:`, which base64 never does,
/// so the two cannot be confused.
pub fn compose_file_text(compose_yaml: &str) -> Result<String, String> {
    use base64::Engine;
    let trimmed = compose_yaml.trim();
    if trimmed.is_empty() {
        return Err("is empty".into());
    }
    if trimmed.contains(':') {
        return Ok(compose_yaml.to_string());
    }
    let compact: String = trimmed.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.as_bytes()))
        .map_err(|e| format!("is neither YAML nor valid base64 ({e})"))?;
    String::from_utf8(bytes)
        .map_err(|_| "decodes from base64 to something that is not UTF-8 text".into())
}

/// The revision used when a request carries none: a short hash of the spec.
pub fn derived_revision(spec: &WorkloadSpec) -> String {
    spec_hash(spec)[..12].to_string()
}

impl WorkloadType {
    /// The type a spec variant belongs to.
    pub fn of(spec: &workload_spec::Spec) -> WorkloadType {
        match spec {
            workload_spec::Spec::Container(_) => WorkloadType::Container,
            workload_spec::Spec::Compose(_) => WorkloadType::Compose,
            workload_spec::Spec::Vm(_) => WorkloadType::Vm,
        }
    }

    /// Lower-case name used by the CLI, labels and metrics.
    pub fn short_name(self) -> &'static str {
        match self {
            WorkloadType::Unspecified => "unspecified",
            WorkloadType::Container => "container",
            WorkloadType::Compose => "compose",
            WorkloadType::Vm => "vm",
        }
    }

    pub fn from_short_name(name: &str) -> Option<WorkloadType> {
        match name.to_ascii_lowercase().as_str() {
            "container" | "docker" => Some(WorkloadType::Container),
            "compose" => Some(WorkloadType::Compose),
            "vm" => Some(WorkloadType::Vm),
            _ => None,
        }
    }

    /// The finalizer of the controller that owns this type.
    pub fn finalizer(self) -> Option<&'static str> {
        match self {
            WorkloadType::Container => Some(FINALIZER_DOCKER),
            WorkloadType::Compose => Some(FINALIZER_COMPOSE),
            WorkloadType::Vm => Some(FINALIZER_VM),
            WorkloadType::Unspecified => None,
        }
    }
}

impl DesiredState {
    pub fn short_name(self) -> &'static str {
        match self {
            DesiredState::Unspecified => "unspecified",
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
    }

    pub fn from_short_name(name: &str) -> Option<DesiredState> {
        match name.to_ascii_lowercase().as_str() {
            "running" | "run" => Some(DesiredState::Running),
            "stopped" | "stop" => Some(DesiredState::Stopped),
            _ => None,
        }
    }
}

impl ActualState {
    /// The word the scheduler's heartbeat and the CLI use.
    pub fn short_name(self) -> &'static str {
        match self {
            ActualState::Unspecified => "Unspecified",
            ActualState::Pending => "Pending",
            ActualState::Running => "Running",
            ActualState::Stopped => "Stopped",
            ActualState::Failed => "Failed",
            ActualState::Unknown => "Unknown",
        }
    }
}

impl Workload {
    pub fn id(&self) -> &str {
        self.metadata.as_ref().map(|m| m.id.as_str()).unwrap_or("")
    }

    pub fn workload_type(&self) -> WorkloadType {
        self.metadata
            .as_ref()
            .map(|m| m.r#type())
            .unwrap_or(WorkloadType::Unspecified)
    }

    pub fn generation(&self) -> i64 {
        self.metadata.as_ref().map(|m| m.generation).unwrap_or(0)
    }

    pub fn resource_version(&self) -> u64 {
        self.metadata
            .as_ref()
            .map(|m| m.resource_version)
            .unwrap_or(0)
    }

    pub fn uid(&self) -> &str {
        self.metadata.as_ref().map(|m| m.uid.as_str()).unwrap_or("")
    }

    pub fn revision_id(&self) -> &str {
        self.metadata
            .as_ref()
            .map(|m| m.revision_id.as_str())
            .unwrap_or("")
    }

    /// True once a delete has been requested.
    pub fn is_deleting(&self) -> bool {
        self.metadata
            .as_ref()
            .is_some_and(|m| m.deletion_timestamp_ms != 0)
    }

    pub fn has_finalizer(&self, finalizer: &str) -> bool {
        self.metadata
            .as_ref()
            .is_some_and(|m| m.finalizers.iter().any(|f| f == finalizer))
    }

    pub fn desired_state(&self) -> DesiredState {
        self.spec
            .as_ref()
            .map(|s| s.desired_state())
            .unwrap_or(DesiredState::Running)
    }

    pub fn workload_spec(&self) -> Option<&workload_spec::Spec> {
        self.spec.as_ref()?.workload.as_ref()?.spec.as_ref()
    }

    pub fn status_or_default(&self) -> ObjectStatus {
        self.status.clone().unwrap_or_default()
    }

    /// Hash of the runtime spec; what the runtime objects are labelled with.
    pub fn spec_hash(&self) -> String {
        let empty = WorkloadSpec::default();
        let spec = self
            .spec
            .as_ref()
            .and_then(|s| s.workload.as_ref())
            .unwrap_or(&empty);
        spec_hash(spec)
    }

    /// The flat status the scheduler reads. Its `metadata` carries the keys
    /// the scheduler acts on (`failure_reason`, `retry_terminal`,
    /// `last_error`) and the object's bookkeeping.
    pub fn to_wire_status(&self) -> WorkloadStatus {
        // Borrowed, not cloned: the API answers every apply with this.
        let meta = self
            .metadata
            .as_ref()
            .map_or_else(Cow::default, Cow::Borrowed);
        let status = self
            .status
            .as_ref()
            .map_or_else(Cow::default, Cow::Borrowed);
        let mut metadata = BTreeMap::new();
        metadata.insert("resource_version".into(), meta.resource_version.to_string());
        metadata.insert("generation".into(), meta.generation.to_string());
        metadata.insert(
            "observed_generation".into(),
            status.observed_generation.to_string(),
        );
        metadata.insert("restart_count".into(), status.restart_count.to_string());
        metadata.insert("uid".into(), meta.uid.clone());
        if !status.failure_reason.is_empty() {
            // The agent's codes in the scheduler's words (it halts on
            // INVALID_SPECIFICATION); any other code goes as it is.
            let code = match crate::FailureReason::from_code(&status.failure_reason) {
                Some(reason) if reason.code() == status.failure_reason => reason.scheduler_code(),
                _ => status.failure_reason.as_str(),
            };
            metadata.insert("failure_reason".into(), code.to_string());
        }
        if status.retry_terminal {
            metadata.insert("retry_terminal".into(), "true".into());
            // Why no retry helps, in the agent's own code.
            if !status.failure_reason.is_empty() {
                metadata.insert(
                    "retry_terminal_reason".into(),
                    status.failure_reason.clone(),
                );
            }
        }
        if !status.last_error.is_empty() {
            metadata.insert("last_error".into(), status.last_error.clone());
            metadata.insert("last_runtime_error".into(), status.last_error.clone());
        }
        if !status.runtime_ref.is_empty() {
            metadata.insert("runtime_ref".into(), status.runtime_ref.clone());
        }
        if meta.deletion_timestamp_ms != 0 {
            metadata.insert(
                "deletion_timestamp".into(),
                (meta.deletion_timestamp_ms / 1000).to_string(),
            );
        }
        for condition in &status.conditions {
            metadata.insert(
                format!("condition.{}", condition.r#type),
                condition.status.clone(),
            );
        }
        for (key, value) in &status.facts {
            metadata.entry(key.clone()).or_insert_with(|| value.clone());
        }
        let actual = match status.actual_state() {
            ActualState::Unspecified => ActualState::Pending,
            other => other,
        };
        WorkloadStatus {
            id: meta.id.clone(),
            r#type: meta.r#type,
            revision_id: meta.revision_id.clone(),
            desired_state: self.desired_state() as i32,
            actual_state: actual as i32,
            message: status.message.clone(),
            created_at: meta.created_at_ms / 1000,
            updated_at: meta.updated_at_ms / 1000,
            metadata,
            usage: None,
        }
    }
}

impl ObjectStatus {
    /// The condition of this type, if set.
    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.r#type == kind)
    }

    /// Sets a condition; its transition time moves only when its status does.
    pub fn set_condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let status = if status { "True" } else { "False" };
        let now = now_ms();
        match self.conditions.iter_mut().find(|c| c.r#type == kind) {
            Some(existing) => {
                if existing.status != status {
                    existing.last_transition_ms = now;
                    existing.status = status.to_string();
                }
                existing.reason = reason.to_string();
                existing.message = message.to_string();
            }
            None => self.conditions.push(Condition {
                r#type: kind.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition_ms: now,
            }),
        }
    }

    /// Sets the actual state; the transition time moves only on a change.
    pub fn transition_to(&mut self, state: ActualState) {
        if self.actual_state() != state {
            self.last_transition_ms = now_ms();
            self.set_actual_state(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ContainerSpec, PortMapping};

    fn container(image: &str, env: &[(&str, &str)]) -> WorkloadSpec {
        WorkloadSpec {
            spec: Some(workload_spec::Spec::Container(ContainerSpec {
                image: image.into(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: vec![PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                }],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn equal_specs_hash_equally_whatever_the_map_insertion_order() {
        let a = container("nginx:1", &[("A", "1"), ("B", "2"), ("C", "3")]);
        let b = container("nginx:1", &[("C", "3"), ("A", "1"), ("B", "2")]);
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_eq!(derived_revision(&a).len(), 12);
    }

    #[test]
    fn the_spec_hash_is_lowercase_hex_sha256_of_the_encoding() {
        // SHA-256 of the empty encoding (a default spec encodes to nothing):
        // labels on existing containers carry this form, so it must not change.
        assert_eq!(
            spec_hash(&WorkloadSpec::default()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn different_specs_hash_differently() {
        let a = container("nginx:1", &[("A", "1")]);
        let b = container("nginx:1", &[("A", "2")]);
        assert_ne!(spec_hash(&a), spec_hash(&b));
    }

    #[test]
    fn compose_files_are_accepted_as_base64_or_plain_yaml() {
        let yaml = "services:\n  web:\n    image: nginx\n";
        assert_eq!(compose_file_text(yaml).unwrap(), yaml);
        let encoded = "c2VydmljZXM6CiAgd2ViOgogICAgaW1hZ2U6IG5naW54Cg==";
        assert_eq!(compose_file_text(encoded).unwrap(), yaml);
        assert!(compose_file_text("!!!not base64").is_err());
        assert!(compose_file_text("  ").is_err());
    }

    #[test]
    fn condition_transition_time_moves_only_when_status_changes() {
        let mut status = ObjectStatus::default();
        status.set_condition(CONDITION_READY, false, "Creating", "");
        let first = status
            .condition(CONDITION_READY)
            .unwrap()
            .last_transition_ms;
        status.conditions[0].last_transition_ms = first - 5000;
        status.set_condition(CONDITION_READY, false, "Pulling", "image");
        let cond = status.condition(CONDITION_READY).unwrap();
        assert_eq!(cond.last_transition_ms, first - 5000);
        assert_eq!(cond.reason, "Pulling");
        status.set_condition(CONDITION_READY, true, "Running", "");
        assert!(
            status
                .condition(CONDITION_READY)
                .unwrap()
                .last_transition_ms
                >= first
        );
    }

    #[test]
    fn an_invalid_spec_reaches_the_scheduler_as_the_value_it_halts_on() {
        let workload = |code: &str, terminal: bool| Workload {
            status: Some(ObjectStatus {
                actual_state: ActualState::Failed as i32,
                failure_reason: code.into(),
                retry_terminal: terminal,
                ..Default::default()
            }),
            ..Default::default()
        };
        let wire = workload("INVALID_SPEC", true).to_wire_status();
        assert_eq!(wire.metadata["failure_reason"], "INVALID_SPECIFICATION");
        assert_eq!(wire.metadata["retry_terminal_reason"], "INVALID_SPEC");
        let wire = workload("CRASH_LOOP_BACKOFF", false).to_wire_status();
        assert_eq!(wire.metadata["failure_reason"], "CRASH_LOOP_BACKOFF");
        assert!(!wire.metadata.contains_key("retry_terminal"));
        assert!(!wire.metadata.contains_key("retry_terminal_reason"));
        let wire = workload("SOMETHING_NEW", false).to_wire_status();
        assert_eq!(wire.metadata["failure_reason"], "SOMETHING_NEW");
    }

    #[test]
    fn wire_status_carries_what_the_scheduler_reads() {
        let workload = Workload {
            metadata: Some(crate::v1::ObjectMeta {
                id: "web".into(),
                r#type: WorkloadType::Container as i32,
                generation: 3,
                resource_version: 42,
                ..Default::default()
            }),
            spec: None,
            status: Some(ObjectStatus {
                actual_state: ActualState::Failed as i32,
                failure_reason: "INVALID_IMAGE".into(),
                retry_terminal: true,
                last_error: "no such image".into(),
                ..Default::default()
            }),
        };
        let wire = workload.to_wire_status();
        assert_eq!(wire.actual_state(), ActualState::Failed);
        assert_eq!(wire.desired_state(), DesiredState::Running);
        assert_eq!(wire.metadata["failure_reason"], "INVALID_IMAGE");
        assert_eq!(wire.metadata["retry_terminal"], "true");
        assert_eq!(wire.metadata["retry_terminal_reason"], "INVALID_IMAGE");
        assert_eq!(wire.metadata["last_error"], "no such image");
        assert_eq!(wire.metadata["resource_version"], "42");
        assert_eq!(wire.metadata["generation"], "3");
    }
}
