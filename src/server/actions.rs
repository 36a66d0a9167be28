//! ListActions' vocabulary: the Go agent's, which Persys tools filter by.
//! The change log records `apply`, `delete`, `reconcile` and `finalize`
//! (the last finalizer removed: the workload is gone); the wire says
//! `apply_workload`, `delete_workload`, `reconcile` and `finalize`, with
//! the statuses
//! `pending`, `running`, `completed` and `failed`. Filters take either
//! spelling of a type, and `succeeded` for `completed`, as this agent
//! answered before.

use tonic::Status;

pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";

/// Every action type, as the wire names it, with the log's name.
const TYPES: [(&str, &str); 4] = [
    ("apply_workload", crate::store::ACTION_APPLY),
    ("delete_workload", crate::store::ACTION_DELETE),
    ("reconcile", crate::store::ACTION_RECONCILE),
    ("finalize", crate::store::ACTION_FINALIZE),
];

/// Every status a filter may name. A log record is written once its action
/// is done, so `pending` and `running` match nothing; they are accepted
/// because the Go agent's clients send them.
const STATUSES: [&str; 4] = ["pending", "running", COMPLETED, FAILED];

/// The wire name of a log record's action.
pub fn action_type(logged: &str) -> &str {
    TYPES
        .iter()
        .find(|(_, log)| *log == logged)
        .map_or(logged, |(wire, _)| wire)
}

/// A type filter in the wire's words (empty: every type), or
/// INVALID_ARGUMENT naming what is accepted.
pub fn type_filter(asked: &str) -> Result<String, Status> {
    let asked = asked.trim();
    if asked.is_empty() {
        return Ok(String::new());
    }
    TYPES
        .iter()
        .find(|(wire, log)| asked.eq_ignore_ascii_case(wire) || asked.eq_ignore_ascii_case(log))
        .map(|(wire, _)| wire.to_string())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "action_type: unknown type {asked:?}; one of {}",
                TYPES.map(|(wire, _)| wire).join(", ")
            ))
        })
}

/// A status filter in the wire's words (empty: every status), or
/// INVALID_ARGUMENT naming what is accepted.
pub fn status_filter(asked: &str) -> Result<String, Status> {
    let asked = asked.trim();
    if asked.is_empty() {
        return Ok(String::new());
    }
    if asked.eq_ignore_ascii_case("succeeded") {
        return Ok(COMPLETED.to_string());
    }
    STATUSES
        .iter()
        .find(|status| asked.eq_ignore_ascii_case(status))
        .map(|status| status.to_string())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "status: unknown status {asked:?}; one of {}",
                STATUSES.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_actions_read_in_the_go_agent_s_words() {
        assert_eq!(action_type("apply"), "apply_workload");
        assert_eq!(action_type("delete"), "delete_workload");
        assert_eq!(action_type("reconcile"), "reconcile");
    }

    #[test]
    fn filters_take_either_spelling_and_refuse_the_unknown() {
        assert_eq!(type_filter("apply_workload").unwrap(), "apply_workload");
        assert_eq!(type_filter("apply").unwrap(), "apply_workload");
        assert_eq!(type_filter(" Delete_Workload ").unwrap(), "delete_workload");
        assert_eq!(type_filter("").unwrap(), "");
        let refused = type_filter("restart").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused
                .message()
                .contains("apply_workload, delete_workload, reconcile, finalize")
        );
        assert_eq!(status_filter("succeeded").unwrap(), "completed");
        assert_eq!(status_filter("running").unwrap(), "running");
        assert!(status_filter("done").is_err());
    }
}
