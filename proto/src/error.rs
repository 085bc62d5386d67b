//! The error-code table: one place that says how every hub error looks on every protocol.
//!
//! Azure IoT Hub reports errors as an HTTP status, a six-digit code (`status * 1000 + sub-code`) and a
//! name (`iothub-errorcode` header, `ErrorCode:<name>;` prefix in the body's `Message`). Codes with no
//! Azure counterpart are marked as Meridian's own in `docs/error-codes.md`.

use serde::{Deserialize, Serialize};

/// Every error a hub operation can end with, by Azure name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A request argument is invalid (bad deviceId, bad field value).
    ArgumentInvalid,
    /// The request body is not the JSON the operation expects.
    IotHubFormatError,
    /// A twin section is larger than the hub's limit (8 KB by default).
    TwinSizeExceeded,
    /// The twin document breaks a structural rule (depth, key, value type).
    TwinInvalid,
    /// Missing, malformed, expired or wrongly signed credentials.
    IotHubUnauthorizedAccess,
    /// Valid credentials that lack the permission the operation needs.
    Unauthorized,
    /// The hub's device-count quota is reached.
    IotHubQuotaExceeded,
    /// Too many modules on one device.
    ModuleQuotaExceeded,
    /// The device's C2D queue is full.
    DeviceMaximumQueueDepthExceeded,
    /// The device does not exist.
    DeviceNotFound,
    /// The device has no live connection (direct methods).
    DeviceNotOnline,
    /// The module does not exist.
    ModuleNotFound,
    /// No route matches the path and method.
    ResourceNotFound,
    /// The HTTP method is not allowed on this path.
    MethodNotAllowed,
    /// A device with this id already exists.
    DeviceAlreadyExists,
    /// A module with this id already exists on the device.
    ModuleAlreadyExistsOnDevice,
    /// A consumer group with this name already exists.
    ConsumerGroupAlreadyExists,
    /// `If-Match` did not match the current ETag.
    PreconditionFailed,
    /// A C2D lock token or feedback lock is unknown or expired.
    DeviceMessageLockLost,
    /// The request body is larger than the endpoint accepts.
    MessageTooLarge,
    /// The cluster cannot serve the request now (no leader, no quorum); retryable.
    ServiceUnavailable,
    /// An internal failure (storage, replication); retryable.
    ServerError,
    /// The operation did not complete within its deadline; retryable.
    GatewayTimeout,
}

impl ErrorCode {
    /// The HTTP status the service REST API answers with.
    pub fn http_status(self) -> u16 {
        // Azure's codes are the status times 1000 plus a sub-code, so the status is recovered exactly.
        (self.azure_code() / 1000) as u16
    }

    /// Azure's six-digit error code (`http_status * 1000 + sub-code`).
    pub fn azure_code(self) -> u32 {
        match self {
            ErrorCode::ArgumentInvalid => 400_004,
            ErrorCode::IotHubFormatError => 400_006,
            ErrorCode::TwinSizeExceeded => 400_027,
            ErrorCode::TwinInvalid => 400_028,
            ErrorCode::IotHubUnauthorizedAccess => 401_002,
            ErrorCode::Unauthorized => 401_003,
            ErrorCode::IotHubQuotaExceeded => 403_002,
            ErrorCode::ModuleQuotaExceeded => 403_009,
            ErrorCode::DeviceMaximumQueueDepthExceeded => 403_004,
            ErrorCode::DeviceNotFound => 404_001,
            ErrorCode::DeviceNotOnline => 404_103,
            ErrorCode::DeviceMessageLockLost => 412_002,
            ErrorCode::ModuleNotFound => 404_010,
            ErrorCode::ResourceNotFound => 404_000,
            ErrorCode::MethodNotAllowed => 405_000,
            ErrorCode::DeviceAlreadyExists => 409_001,
            ErrorCode::ModuleAlreadyExistsOnDevice => 409_301,
            ErrorCode::ConsumerGroupAlreadyExists => 409_005,
            ErrorCode::PreconditionFailed => 412_001,
            ErrorCode::MessageTooLarge => 413_001,
            ErrorCode::ServerError => 500_001,
            ErrorCode::ServiceUnavailable => 503_001,
            ErrorCode::GatewayTimeout => 504_101,
        }
    }

    /// The name used in the `iothub-errorcode` header and the `ErrorCode:<name>;` message prefix.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::ArgumentInvalid => "ArgumentInvalid",
            ErrorCode::IotHubFormatError => "IotHubFormatError",
            ErrorCode::TwinSizeExceeded => "TwinSizeExceeded",
            ErrorCode::TwinInvalid => "TwinInvalid",
            ErrorCode::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::IotHubQuotaExceeded => "IotHubQuotaExceeded",
            ErrorCode::ModuleQuotaExceeded => "ModuleQuotaExceeded",
            ErrorCode::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            ErrorCode::DeviceNotFound => "DeviceNotFound",
            ErrorCode::DeviceNotOnline => "DeviceNotOnline",
            ErrorCode::DeviceMessageLockLost => "DeviceMessageLockLost",
            ErrorCode::ModuleNotFound => "ModuleNotFound",
            ErrorCode::ResourceNotFound => "ResourceNotFound",
            ErrorCode::MethodNotAllowed => "MethodNotAllowed",
            ErrorCode::DeviceAlreadyExists => "DeviceAlreadyExists",
            ErrorCode::ModuleAlreadyExistsOnDevice => "ModuleAlreadyExistsOnDevice",
            ErrorCode::ConsumerGroupAlreadyExists => "ConsumerGroupAlreadyExists",
            ErrorCode::PreconditionFailed => "PreconditionFailed",
            ErrorCode::MessageTooLarge => "MessageTooLarge",
            ErrorCode::ServerError => "ServerError",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
            ErrorCode::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// The gRPC status code for node-to-node and future gRPC service APIs.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorCode::ArgumentInvalid
            | ErrorCode::IotHubFormatError
            | ErrorCode::TwinSizeExceeded
            | ErrorCode::TwinInvalid => Code::InvalidArgument,
            ErrorCode::IotHubUnauthorizedAccess => Code::Unauthenticated,
            ErrorCode::Unauthorized => Code::PermissionDenied,
            ErrorCode::IotHubQuotaExceeded
            | ErrorCode::ModuleQuotaExceeded
            | ErrorCode::DeviceMaximumQueueDepthExceeded => Code::ResourceExhausted,
            ErrorCode::DeviceNotFound
            | ErrorCode::ModuleNotFound
            | ErrorCode::ResourceNotFound
            | ErrorCode::DeviceNotOnline => Code::NotFound,
            ErrorCode::MethodNotAllowed => Code::Unimplemented,
            ErrorCode::DeviceAlreadyExists
            | ErrorCode::ModuleAlreadyExistsOnDevice
            | ErrorCode::ConsumerGroupAlreadyExists => Code::AlreadyExists,
            ErrorCode::PreconditionFailed | ErrorCode::DeviceMessageLockLost => {
                Code::FailedPrecondition
            }
            ErrorCode::MessageTooLarge => Code::OutOfRange,
            ErrorCode::ServerError => Code::Internal,
            ErrorCode::ServiceUnavailable => Code::Unavailable,
            ErrorCode::GatewayTimeout => Code::DeadlineExceeded,
        }
    }

    /// What the MQTT front-end does with this error on a device connection.
    pub fn mqtt_behaviour(self) -> MqttBehaviour {
        match self {
            // CONNACK 5: the SDKs raise CredentialError/UnauthorizedError and do not retry.
            ErrorCode::IotHubUnauthorizedAccess
            | ErrorCode::Unauthorized
            | ErrorCode::DeviceNotFound
            | ErrorCode::ModuleNotFound => MqttBehaviour::ConnAckNotAuthorized,
            // CONNACK 3: the SDKs retry.
            ErrorCode::ServiceUnavailable | ErrorCode::ServerError | ErrorCode::GatewayTimeout => {
                MqttBehaviour::ConnAckServerUnavailable
            }
            // Within a session, request/response topics carry the HTTP status.
            _ => MqttBehaviour::ResponseStatus(self.http_status()),
        }
    }

    /// The AMQP error condition the AMQP endpoint rejects a delivery or closes a link with (the
    /// conditions the service SDKs translate: `amqp:not-found` → DeviceNotFoundError,
    /// `amqp:resource-limit-exceeded` → DeviceMaximumQueueDepthExceededError, ...).
    pub fn amqp_condition(self) -> &'static str {
        match self {
            ErrorCode::IotHubUnauthorizedAccess | ErrorCode::Unauthorized => {
                "amqp:unauthorized-access"
            }
            ErrorCode::DeviceNotFound | ErrorCode::ModuleNotFound | ErrorCode::ResourceNotFound => {
                "amqp:not-found"
            }
            ErrorCode::DeviceMaximumQueueDepthExceeded
            | ErrorCode::IotHubQuotaExceeded
            | ErrorCode::ModuleQuotaExceeded => "amqp:resource-limit-exceeded",
            ErrorCode::MessageTooLarge => "amqp:link:message-size-exceeded",
            ErrorCode::ArgumentInvalid
            | ErrorCode::IotHubFormatError
            | ErrorCode::TwinSizeExceeded
            | ErrorCode::TwinInvalid => "com.microsoft:argument-error",
            ErrorCode::PreconditionFailed => "com.microsoft:precondition-failed",
            ErrorCode::DeviceAlreadyExists
            | ErrorCode::ModuleAlreadyExistsOnDevice
            | ErrorCode::ConsumerGroupAlreadyExists => "com.microsoft:entity-already-exists",
            ErrorCode::DeviceMessageLockLost => "com.microsoft:message-lock-lost",
            ErrorCode::MethodNotAllowed | ErrorCode::DeviceNotOnline => "amqp:not-allowed",
            ErrorCode::ServiceUnavailable => "com.microsoft:server-busy",
            ErrorCode::GatewayTimeout => "com.microsoft:timeout",
            ErrorCode::ServerError => "amqp:internal-error",
        }
    }

    /// Whether a client may retry the same request unchanged.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::ServiceUnavailable | ErrorCode::ServerError | ErrorCode::GatewayTimeout
        )
    }
}

/// How an error surfaces on an MQTT device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttBehaviour {
    /// Refuse CONNECT with return code 5 (not authorized).
    ConnAckNotAuthorized,
    /// Refuse CONNECT with return code 3 (server unavailable).
    ConnAckServerUnavailable,
    /// Answer a `$iothub/...` request with this status in the response topic.
    ResponseStatus(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorCode; 23] = [
        ErrorCode::ConsumerGroupAlreadyExists,
        ErrorCode::DeviceMaximumQueueDepthExceeded,
        ErrorCode::DeviceNotOnline,
        ErrorCode::DeviceMessageLockLost,
        ErrorCode::ArgumentInvalid,
        ErrorCode::IotHubFormatError,
        ErrorCode::TwinSizeExceeded,
        ErrorCode::TwinInvalid,
        ErrorCode::IotHubUnauthorizedAccess,
        ErrorCode::Unauthorized,
        ErrorCode::IotHubQuotaExceeded,
        ErrorCode::ModuleQuotaExceeded,
        ErrorCode::DeviceNotFound,
        ErrorCode::ModuleNotFound,
        ErrorCode::ResourceNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::DeviceAlreadyExists,
        ErrorCode::ModuleAlreadyExistsOnDevice,
        ErrorCode::PreconditionFailed,
        ErrorCode::MessageTooLarge,
        ErrorCode::ServerError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::GatewayTimeout,
    ];

    #[test]
    fn codes_are_unique_and_match_their_status() {
        let mut seen = std::collections::HashSet::new();
        for code in ALL {
            assert!(seen.insert(code.azure_code()), "duplicate {code:?}");
            assert_eq!(code.http_status() as u32, code.azure_code() / 1000);
            assert!((400..600).contains(&code.http_status()));
        }
    }

    #[test]
    fn sdk_visible_statuses() {
        assert_eq!(ErrorCode::DeviceNotFound.http_status(), 404);
        assert_eq!(ErrorCode::DeviceAlreadyExists.http_status(), 409);
        assert_eq!(ErrorCode::PreconditionFailed.http_status(), 412);
        assert_eq!(ErrorCode::IotHubUnauthorizedAccess.http_status(), 401);
        assert_eq!(ErrorCode::TwinSizeExceeded.http_status(), 400);
        assert_eq!(
            ErrorCode::IotHubUnauthorizedAccess.mqtt_behaviour(),
            MqttBehaviour::ConnAckNotAuthorized
        );
        assert!(ErrorCode::ServiceUnavailable.retryable());
        assert!(!ErrorCode::PreconditionFailed.retryable());
    }
}
