//! The one place where domain errors become gRPC statuses: the core's
//! ([`CoreError`]), the permission rules' ([`Denied`]), the rack
//! registry's ([`RackError`], including an agent's failed command) and
//! authentication's ([`AuthError`]).

use crate::auth::AuthError;
use crate::core::CoreError;
use crate::core::error_chain;
use crate::core::policy::Denied;
use crate::lease::TransitionError;
use crate::racks::{FailureKind, LinkError, RackError};
use tonic::{Code, Status};

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        let code = match &e {
            CoreError::InvalidArgument { .. } => Code::InvalidArgument,
            CoreError::NotFound { .. } => Code::NotFound,
            CoreError::PermissionDenied { .. } => Code::PermissionDenied,
            CoreError::Unsatisfiable { .. } => Code::FailedPrecondition,
            CoreError::Busy | CoreError::BusyBooked { .. } | CoreError::TooManyWaiting { .. } => {
                Code::ResourceExhausted
            }
            CoreError::BookingConflict { .. } => Code::FailedPrecondition,
            CoreError::Superseded { .. } => Code::Aborted,
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

impl From<Denied> for Status {
    fn from(e: Denied) -> Status {
        Status::permission_denied(e.to_string())
    }
}

impl From<RackError> for Status {
    fn from(e: RackError) -> Status {
        let code = match &e {
            RackError::Core(e) => return e.clone().into(),
            RackError::Denied(e) => return e.clone().into(),
            // The transport's own status, as it was.
            RackError::Link(LinkError::Broken(source)) => {
                return match source.downcast_ref::<Status>() {
                    Some(status) => status.clone(),
                    None => Status::unavailable(error_chain(&e)),
                };
            }
            RackError::AgentFailed { kind, message, .. } => {
                return Status::new(code_from_kind(*kind), message.clone());
            }
            RackError::Link(
                LinkError::Empty | LinkError::BadHello { .. } | LinkError::BadReport { .. },
            )
            | RackError::NoHello => Code::InvalidArgument,
            RackError::HelloTimeout { .. } | RackError::Timeout { .. } => Code::DeadlineExceeded,
            RackError::UnknownRack { .. } => Code::NotFound,
            RackError::RackHasNoAgent { .. }
            | RackError::NoAgent { .. }
            | RackError::HostRemoved { .. }
            | RackError::NoBmc { .. }
            | RackError::NoConsole { .. }
            | RackError::NoIpv4 { .. }
            | RackError::ForwardLeaseEnded { .. } => Code::FailedPrecondition,
            RackError::TooManyForwards { .. } => Code::ResourceExhausted,
            RackError::ForwardIdle { .. } => Code::DeadlineExceeded,
            RackError::ForwardBroken { .. } => Code::Unavailable,
            RackError::AgentAway { .. } | RackError::AgentGone { .. } => Code::Unavailable,
            RackError::Replaced { .. } => Code::Aborted,
        };
        Status::new(code, error_chain(&e))
    }
}

/// The user's status code for an agent's failed command.
fn code_from_kind(kind: FailureKind) -> Code {
    match kind {
        FailureKind::InvalidArgument => Code::InvalidArgument,
        FailureKind::NotFound => Code::NotFound,
        FailureKind::FailedPrecondition => Code::FailedPrecondition,
        FailureKind::PermissionDenied => Code::PermissionDenied,
        FailureKind::DeadlineExceeded => Code::DeadlineExceeded,
        FailureKind::Unimplemented => Code::Unimplemented,
        FailureKind::Unavailable => Code::Unavailable,
        FailureKind::Internal => Code::Internal,
        FailureKind::ResourceExhausted => Code::ResourceExhausted,
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
