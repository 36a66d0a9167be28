//! Validation of an ApplyWorkload request: every refusal names the field,
//! and nothing is stored.

use std::path::PathBuf;
use std::sync::Arc;

use persys_api::v1::{ApplyWorkloadRequest, DesiredState, Workload, WorkloadType, workload_spec};

use persys_controllers::SpecError;
use persys_controllers::compose::{
    ComposeEnvironment, ComposeRules, check_compose_policy, declared_resources,
    derive_project_name, validate_compose_spec,
};
use persys_controllers::docker::{HostPathPolicy, validate_container_spec};
use persys_controllers::policy::NodePolicy;
use persys_controllers::vm::{
    SYS_CLASS_NET, check_disk_owners, check_vm_networks, validate_vm_spec,
};

use crate::store::ApplyRequest;

/// A refused field: its path in the request and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn refuse<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// What validation needs to know about this node.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Which host paths workloads may bind-mount: the policy's roots, never
    /// the host's critical paths, the agent's own files or the Docker
    /// socket.
    pub host_paths: HostPathPolicy,
    /// Roots VM disk files must lie under.
    pub vm_disk_roots: Vec<PathBuf>,
    /// `<state>/vm`, where each VM's own files live (`<state>/vm/<id>/`):
    /// a spec names only its own there. Empty: no such folder.
    pub vm_root: PathBuf,
    /// The node's workload policy.
    pub policy: Arc<NodePolicy>,
    /// Where host network interfaces are listed (a parameter so tests can
    /// fake a bridge).
    pub sys_class_net: PathBuf,
    /// The environment compose processes run with (made once at start, as
    /// the compose controller makes its own): part of what compose files
    /// interpolate from.
    pub compose_env: ComposeEnvironment,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            host_paths: HostPathPolicy::default(),
            vm_disk_roots: Vec::new(),
            vm_root: PathBuf::new(),
            policy: Arc::default(),
            sys_class_net: PathBuf::from(SYS_CLASS_NET),
            compose_env: ComposeEnvironment::new(std::env::vars(), ""),
        }
    }
}

/// Checks a request and turns it into a store apply. Unspecified type is
/// taken from the spec (container when there is none); unspecified desired
/// state means running — as the scheduler assumes.
pub fn apply_request(
    request: ApplyWorkloadRequest,
    limits: &Limits,
) -> Result<ApplyRequest, FieldError> {
    validate_id(&request.id)?;
    let Some(spec) = request.spec.as_ref().and_then(|s| s.spec.as_ref()) else {
        return refuse("spec", "is required (one of container, compose, vm)");
    };
    let spec_type = WorkloadType::of(spec);
    let workload_type = match request.r#type() {
        WorkloadType::Unspecified => spec_type,
        t if t == spec_type => t,
        t => {
            return refuse(
                "type",
                format!(
                    "is {} but the spec is a {} spec",
                    t.short_name(),
                    spec_type.short_name()
                ),
            );
        }
    };
    if request.r#type != 0 && WorkloadType::try_from(request.r#type).is_err() {
        return refuse("type", format!("unknown value {}", request.r#type));
    }
    let desired_state = match DesiredState::try_from(request.desired_state) {
        Ok(DesiredState::Unspecified) => DesiredState::Running,
        Ok(state) => state,
        Err(_) => {
            return refuse(
                "desired_state",
                format!("unknown value {}", request.desired_state),
            );
        }
    };
    if request.revision_id.len() > 128 || request.revision_id.chars().any(char::is_control) {
        return refuse("revision_id", "must be at most 128 printable characters");
    }
    // Each runtime owns its rules; the controller checks them again before
    // acting, so a spec refused here is one it would refuse too. The node
    // policy's compose and VM network rules are enforced here, at apply;
    // container bind paths at apply and again by the Docker controller.
    // A compose workload's limits are read here, once, and recorded with
    // the object for the ceilings (see `ceilings::Figures`).
    let mut labels = std::collections::BTreeMap::new();
    match spec {
        workload_spec::Spec::Container(c) => validate_container_spec(c, &limits.host_paths),
        // The compose file is parsed once, within its bounds, by
        // `validate_compose_spec`; the policy reads that document.
        workload_spec::Spec::Compose(c) => validate_compose_spec(c).and_then(|valid| {
            // What compose will interpolate from: its own process's
            // environment over the spec's variables in `.env`.
            let project = match c.project_name.as_str() {
                "" => derive_project_name(&request.id),
                named => named.to_string(),
            };
            let vars = limits.compose_env.interpolation(&c.env, &project);
            let interpolated = check_compose_policy(
                c,
                &valid.document,
                &ComposeRules {
                    policy: &limits.policy,
                    host_paths: &limits.host_paths,
                    vars: &vars,
                },
            )?;
            labels = super::ceilings::compose_labels(declared_resources(&interpolated, &c.env)?);
            Ok(())
        }),
        workload_spec::Spec::Vm(v) => {
            validate_vm_spec(&request.id, v, &limits.vm_disk_roots, &limits.vm_root).and_then(
                |()| check_vm_networks(&request.id, v, &limits.policy.vm, &limits.sys_class_net),
            )
        }
    }
    .map_err(FieldError::from)?;
    Ok(ApplyRequest {
        id: request.id,
        workload_type,
        revision_id: request.revision_id,
        desired_state,
        spec: request.spec.unwrap_or_default(),
        finalizers: workload_type
            .finalizer()
            .into_iter()
            .map(String::from)
            .collect(),
        labels,
        caller: Default::default(),
    })
}

/// Refuses a VM apply whose disks belong to another workload: named by
/// another stored VM workload in `stored` (being deleted or stopped, it
/// still holds them), or created by the agent for another workload.
pub fn check_vm_disk_owners(
    apply: &ApplyRequest,
    stored: &[Arc<Workload>],
    limits: &Limits,
) -> Result<(), FieldError> {
    let Some(workload_spec::Spec::Vm(spec)) = &apply.spec.spec else {
        return Ok(());
    };
    let others = stored.iter().filter_map(|w| match w.workload_spec() {
        Some(workload_spec::Spec::Vm(other)) => Some((w.id(), other)),
        _ => None,
    });
    check_disk_owners(
        &apply.id,
        spec,
        &limits.vm_disk_roots,
        &limits.vm_root,
        others,
    )
    .map_err(FieldError::from)
}

/// Docker's container-name rule: a letter or digit, then letters, digits,
/// `_`, `.`, `-`; at most 128. Never `/`, whitespace or a bare `..`.
pub fn validate_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return refuse("id", "is required");
    }
    if id.len() > 128 {
        return refuse("id", "must be at most 128 characters");
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return refuse(
            "id",
            format!(
                "{id:?} is not a valid id: use letters, digits, '_', '.' and '-', starting with a letter or digit"
            ),
        );
    }
    Ok(())
}

impl From<SpecError> for FieldError {
    fn from(error: SpecError) -> Self {
        FieldError {
            field: error.field,
            message: error.message,
        }
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_container_name_rule() {
        for good in ["web", "a1", "web-1.prod_2", "0abc"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "ümlaut",
            &"x".repeat(129),
        ] {
            assert_eq!(validate_id(bad).unwrap_err().field, "id", "{bad}");
        }
    }
}
