//! The one place where core errors become gRPC statuses.

use crate::auth::AuthError;
use crate::core::CoreError;
use crate::core::error_chain;
use crate::lease::TransitionError;
use tonic::{Code, Status};

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        let code = match &e {
            CoreError::InvalidArgument { .. } => Code::InvalidArgument,
            CoreError::NotFound { .. } => Code::NotFound,
            CoreError::PermissionDenied { .. } => Code::PermissionDenied,
            CoreError::Unsatisfiable { .. } => Code::FailedPrecondition,
            CoreError::Busy => Code::ResourceExhausted,
            CoreError::Transition(
                TransitionError::LeaseNotActive { .. } | TransitionError::LeaseExpired { .. },
            ) => Code::FailedPrecondition,
            CoreError::Transition(_) => Code::FailedPrecondition,
            CoreError::Store(_) => Code::Unavailable,
            // The inventory error carries file:line:column: reason.
            CoreError::Inventory(_) => Code::FailedPrecondition,
            CoreError::ShuttingDown => Code::Unavailable,
        };
        Status::new(code, error_chain(&e))
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        Status::unauthenticated(e.to_string())
    }
}

/// INVALID_ARGUMENT naming the field.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}
