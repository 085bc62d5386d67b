//! Device and module identities as Azure's registry API shapes them.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::{HubError, HubResult};
use super::twin::NEVER;

/// How a device or module authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AuthenticationType {
    /// Symmetric keys (SAS tokens).
    #[default]
    #[serde(rename = "sas")]
    Sas,
    /// X.509 certificate matched by thumbprint.
    #[serde(rename = "selfSigned")]
    SelfSigned,
    /// X.509 certificate chained to a registered CA.
    #[serde(rename = "certificateAuthority")]
    CertificateAuthority,
    /// No credentials (the device cannot connect).
    #[serde(rename = "none")]
    None,
}

/// Symmetric key pair (base64).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SymmetricKey {
    /// Primary key, base64; empty or absent on create means "generate one".
    pub primary_key: Option<String>,
    /// Secondary key, base64; empty or absent on create means "generate one".
    pub secondary_key: Option<String>,
}

/// X.509 thumbprint pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct X509Thumbprint {
    /// Primary thumbprint (hex SHA-1 or SHA-256 of the DER certificate).
    pub primary_thumbprint: Option<String>,
    /// Secondary thumbprint.
    pub secondary_thumbprint: Option<String>,
}

/// A device's or module's credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Authentication {
    /// The mechanism.
    #[serde(rename = "type")]
    pub kind: AuthenticationType,
    /// Keys, for `sas`.
    pub symmetric_key: SymmetricKey,
    /// Thumbprints, for `selfSigned`.
    pub x509_thumbprint: X509Thumbprint,
}

/// Device capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Capabilities {
    /// Whether the device is an IoT Edge device.
    pub iot_edge: bool,
}

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// The device may connect.
    #[default]
    Enabled,
    /// The device is refused on every device-facing endpoint.
    Disabled,
}

impl DeviceStatus {
    /// Parses a status case-insensitively (the seed writes `Enabled`, the SDKs `enabled`).
    pub fn parse(s: &str) -> HubResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            _ => Err(HubError::invalid(format!(
                "status {s:?} is not enabled or disabled"
            ))),
        }
    }
}

/// Whether a device has a live connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    /// Connected over MQTT or AMQP.
    Connected,
    /// Not connected.
    #[default]
    Disconnected,
}

/// A key pair chosen by the proposing node, used when a create asks the hub to generate keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedKeys {
    /// Base64 primary key.
    pub primary: String,
    /// Base64 secondary key.
    pub secondary: String,
}

impl GeneratedKeys {
    /// Draws two random 32-byte keys.
    pub fn random() -> Self {
        Self {
            primary: random_key(),
            secondary: random_key(),
        }
    }
}

/// A random 32-byte key, base64.
pub fn random_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn empty(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(str::is_empty)
}

impl Authentication {
    /// Validates the credentials and fills in generated keys where a `sas` create left them empty.
    /// `existing` keeps the current keys when an update leaves them empty.
    pub fn normalize(
        mut self,
        generated: &GeneratedKeys,
        existing: Option<&Authentication>,
    ) -> HubResult<Self> {
        match self.kind {
            AuthenticationType::Sas => {
                let keep = existing.filter(|e| e.kind == AuthenticationType::Sas);
                let key = &mut self.symmetric_key;
                if empty(&key.primary_key) {
                    key.primary_key = keep
                        .and_then(|e| e.symmetric_key.primary_key.clone())
                        .or_else(|| Some(generated.primary.clone()));
                }
                if empty(&key.secondary_key) {
                    key.secondary_key = keep
                        .and_then(|e| e.symmetric_key.secondary_key.clone())
                        .or_else(|| Some(generated.secondary.clone()));
                }
                for k in [&key.primary_key, &key.secondary_key].into_iter().flatten() {
                    validate_key(k)?;
                }
                self.x509_thumbprint = X509Thumbprint::default();
            }
            AuthenticationType::SelfSigned => {
                let t = &self.x509_thumbprint;
                if empty(&t.primary_thumbprint) && empty(&t.secondary_thumbprint) {
                    return Err(HubError::invalid(
                        "selfSigned authentication needs a primary or secondary thumbprint",
                    ));
                }
                for tp in [&t.primary_thumbprint, &t.secondary_thumbprint]
                    .into_iter()
                    .flatten()
                    .filter(|s| !s.is_empty())
                {
                    validate_thumbprint(tp)?;
                }
                self.symmetric_key = SymmetricKey::default();
            }
            AuthenticationType::CertificateAuthority | AuthenticationType::None => {
                self.symmetric_key = SymmetricKey::default();
                self.x509_thumbprint = X509Thumbprint::default();
            }
        }
        Ok(self)
    }
}

/// Checks that a symmetric key is base64 of 16 to 64 bytes.
pub fn validate_key(key: &str) -> HubResult<()> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| HubError::invalid("symmetric keys must be base64"))?;
    if !(16..=64).contains(&decoded.len()) {
        return Err(HubError::invalid(
            "symmetric keys must decode to 16 to 64 bytes",
        ));
    }
    Ok(())
}

fn validate_thumbprint(tp: &str) -> HubResult<()> {
    if !(tp.len() == 40 || tp.len() == 64) || !tp.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(HubError::invalid(
            "thumbprints are 40 (SHA-1) or 64 (SHA-256) hex characters",
        ));
    }
    Ok(())
}

/// An identity's registry fields (shared by devices and modules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// Distinguishes identities that reuse an id after a delete.
    pub generation_id: String,
    /// Registry ETag.
    pub etag: String,
    /// Credentials.
    pub authentication: Authentication,
    /// Live connection state.
    pub connection_state: ConnectionState,
    /// When `connection_state` last changed.
    pub connection_state_updated_time: String,
    /// Last connect, receive or send.
    pub last_activity_time: String,
    /// Messages waiting in the C2D queue.
    pub cloud_to_device_message_count: u64,
    /// The node holding the live connection (not rendered; routes direct methods).
    #[serde(default)]
    pub connected_node: Option<u64>,
}

impl IdentityRecord {
    /// A fresh identity record.
    pub fn new(generation_id: String, etag: String, authentication: Authentication) -> Self {
        Self {
            generation_id,
            etag,
            authentication,
            connection_state: ConnectionState::Disconnected,
            connection_state_updated_time: NEVER.into(),
            last_activity_time: NEVER.into(),
            cloud_to_device_message_count: 0,
            connected_node: None,
        }
    }
}

/// The writable fields of a device, as a PUT /devices/{id} body carries them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceSpec {
    /// Must equal the id in the path when present.
    pub device_id: Option<String>,
    /// `enabled` or `disabled` (any case); absent means enabled.
    pub status: Option<String>,
    /// Why the status was set; ≤ 128 characters.
    pub status_reason: Option<String>,
    /// Credentials.
    pub authentication: Option<Authentication>,
    /// Capabilities.
    pub capabilities: Option<Capabilities>,
    /// Edge scope.
    pub device_scope: Option<String>,
    /// Edge parent scopes.
    pub parent_scopes: Option<Vec<String>>,
    /// ETag echoed by SDKs; `If-Match` takes precedence.
    pub etag: Option<String>,
}

/// The writable fields of a module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ModuleSpec {
    /// Must equal the id in the path when present.
    pub module_id: Option<String>,
    /// Must equal the device id in the path when present.
    pub device_id: Option<String>,
    /// Who manages the module (free text).
    pub managed_by: Option<String>,
    /// Credentials.
    pub authentication: Option<Authentication>,
    /// ETag echoed by SDKs.
    pub etag: Option<String>,
}

/// Longest `statusReason` Azure accepts.
pub const MAX_STATUS_REASON: usize = 128;

/// A device's registry identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Shared identity fields.
    pub identity: IdentityRecord,
    /// Enabled or disabled.
    pub status: DeviceStatus,
    /// Why.
    pub status_reason: Option<String>,
    /// When the status last changed.
    pub status_updated_time: String,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// Edge scope.
    pub device_scope: Option<String>,
    /// Edge parent scopes.
    pub parent_scopes: Vec<String>,
}

/// A module's registry identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Module {
    /// Shared identity fields.
    pub identity: IdentityRecord,
    /// Who manages the module.
    pub managed_by: Option<String>,
}

/// Renders the shared identity fields in Azure's JSON names.
fn render_identity(id: &IdentityRecord, out: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    out.insert("generationId".into(), Value::from(id.generation_id.clone()));
    out.insert("etag".into(), Value::from(id.etag.clone()));
    out.insert(
        "connectionState".into(),
        serde_json::to_value(id.connection_state).unwrap_or(Value::Null),
    );
    out.insert(
        "connectionStateUpdatedTime".into(),
        Value::from(id.connection_state_updated_time.clone()),
    );
    out.insert(
        "lastActivityTime".into(),
        Value::from(id.last_activity_time.clone()),
    );
    out.insert(
        "cloudToDeviceMessageCount".into(),
        Value::from(id.cloud_to_device_message_count),
    );
    out.insert(
        "authentication".into(),
        serde_json::to_value(&id.authentication).unwrap_or(Value::Null),
    );
}

impl Device {
    /// The device as `GET /devices/{id}` returns it.
    pub fn render(&self, device_id: &str) -> serde_json::Value {
        use serde_json::Value;
        let mut out = serde_json::Map::new();
        out.insert("deviceId".into(), Value::from(device_id));
        render_identity(&self.identity, &mut out);
        out.insert(
            "status".into(),
            serde_json::to_value(self.status).unwrap_or(Value::Null),
        );
        out.insert(
            "statusReason".into(),
            self.status_reason.clone().map_or(Value::Null, Value::from),
        );
        out.insert(
            "statusUpdatedTime".into(),
            Value::from(self.status_updated_time.clone()),
        );
        out.insert(
            "capabilities".into(),
            serde_json::to_value(self.capabilities).unwrap_or(Value::Null),
        );
        if let Some(scope) = &self.device_scope {
            out.insert("deviceScope".into(), Value::from(scope.clone()));
        }
        out.insert(
            "parentScopes".into(),
            Value::from(self.parent_scopes.clone()),
        );
        Value::Object(out)
    }
}

impl Module {
    /// The module as `GET /devices/{id}/modules/{mid}` returns it.
    pub fn render(&self, device_id: &str, module_id: &str) -> serde_json::Value {
        use serde_json::Value;
        let mut out = serde_json::Map::new();
        out.insert("moduleId".into(), Value::from(module_id));
        out.insert("deviceId".into(), Value::from(device_id));
        out.insert(
            "managedBy".into(),
            self.managed_by.clone().map_or(Value::Null, Value::from),
        );
        render_identity(&self.identity, &mut out);
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> GeneratedKeys {
        GeneratedKeys {
            primary: random_key(),
            secondary: random_key(),
        }
    }

    #[test]
    fn empty_sas_keys_are_generated() {
        let generated = keys();
        let auth = Authentication {
            kind: AuthenticationType::Sas,
            symmetric_key: SymmetricKey {
                primary_key: Some(String::new()),
                secondary_key: None,
            },
            ..Default::default()
        }
        .normalize(&generated, None)
        .expect("valid");
        assert_eq!(auth.symmetric_key.primary_key, Some(generated.primary));
        assert_eq!(auth.symmetric_key.secondary_key, Some(generated.secondary));
    }

    #[test]
    fn bad_keys_and_thumbprints_are_rejected() {
        let bad_key = Authentication {
            symmetric_key: SymmetricKey {
                primary_key: Some("c2hvcnQ=".into()),
                secondary_key: None,
            },
            ..Default::default()
        };
        assert!(bad_key.normalize(&keys(), None).is_err());
        let bad_tp = Authentication {
            kind: AuthenticationType::SelfSigned,
            x509_thumbprint: X509Thumbprint {
                primary_thumbprint: Some("xyz".into()),
                secondary_thumbprint: None,
            },
            ..Default::default()
        };
        assert!(bad_tp.normalize(&keys(), None).is_err());
    }

    #[test]
    fn update_keeps_existing_keys() {
        let first = Authentication::default()
            .normalize(&keys(), None)
            .expect("valid");
        let again = Authentication::default()
            .normalize(&keys(), Some(&first))
            .expect("valid");
        assert_eq!(first, again);
    }

    #[test]
    fn status_parses_any_case() {
        assert_eq!(
            DeviceStatus::parse("Disabled").ok(),
            Some(DeviceStatus::Disabled)
        );
        assert!(DeviceStatus::parse("paused").is_err());
    }
}
