//! A spec a runtime cannot accept, named by the field at fault. Each
//! runtime's validator answers one: the API server turns it into
//! INVALID_ARGUMENT at apply time, and the controller, which checks again
//! before acting, into an `InvalidSpec` failure.

/// A spec field that cannot be accepted, named by its path in the request
/// (`spec.container.volumes[0].host_path`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}
