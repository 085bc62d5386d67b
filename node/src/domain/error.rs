//! Domain errors: every one carries its Azure [`ErrorCode`] and a message for the caller.

use meridian_proto::ErrorCode;
use serde::{Deserialize, Serialize};

/// An error a hub operation ends with. Serializable, because a follower receives the leader's
/// applied result over gRPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct HubError {
    /// The Azure error code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

impl HubError {
    /// Builds an error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// 400 ArgumentInvalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    /// 404 DeviceNotFound.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(ErrorCode::DeviceNotFound, format!("device {id} not found"))
    }

    /// 404 ModuleNotFound.
    pub fn module_not_found(device: &str, module: &str) -> Self {
        Self::new(
            ErrorCode::ModuleNotFound,
            format!("module {module} not found on device {device}"),
        )
    }

    /// 412 PreconditionFailed.
    pub fn precondition_failed(current: &str) -> Self {
        Self::new(
            ErrorCode::PreconditionFailed,
            format!("precondition failed: the current etag is {current}"),
        )
    }
}

/// Result with a [`HubError`].
pub type HubResult<T> = Result<T, HubError>;
