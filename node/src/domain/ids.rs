//! Device and module ids, validated by Azure's rules.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{HubError, HubResult};

/// Longest id Azure accepts.
pub const MAX_ID_LEN: usize = 128;

/// Characters Azure allows in a device or module id besides ASCII letters and digits.
const ID_PUNCTUATION: &str = "-.+%_#*?!(),=@$'";

fn validate_id(kind: &str, id: &str) -> HubResult<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(HubError::invalid(format!(
            "{kind} id must be 1 to {MAX_ID_LEN} characters long"
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(*c)))
    {
        return Err(HubError::invalid(format!(
            "{kind} id {id:?} contains {bad:?}; allowed are ASCII letters, digits and {ID_PUNCTUATION}"
        )));
    }
    Ok(())
}

/// A device id: case-sensitive, 1–128 characters from Azure's allowed set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates and wraps a device id.
    pub fn new(id: impl Into<String>) -> HubResult<Self> {
        let id = id.into();
        validate_id("device", &id)?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = HubError;
    fn try_from(s: String) -> HubResult<Self> {
        Self::new(s)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A module id: the same rules as a device id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModuleId(String);

impl ModuleId {
    /// Validates and wraps a module id.
    pub fn new(id: impl Into<String>) -> HubResult<Self> {
        let id = id.into();
        validate_id("module", &id)?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModuleId {
    type Error = HubError;
    fn try_from(s: String) -> HubResult<Self> {
        Self::new(s)
    }
}

impl From<ModuleId> for String {
    fn from(id: ModuleId) -> String {
        id.0
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_azure_charset() {
        assert!(DeviceId::new("dev-1.a+b%c_d#e*f?g!h(i)j,k=l@m$n'o").is_ok());
        assert!(DeviceId::new("x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in ["", "has space", "slash/y", "ünï", "semi;colon", "q\"uote"] {
            let err = DeviceId::new(bad).expect_err(bad);
            assert_eq!(err.code, meridian_proto::ErrorCode::ArgumentInvalid);
        }
        assert!(DeviceId::new("x".repeat(129)).is_err());
        assert!(ModuleId::new("m/1").is_err());
    }

    #[test]
    fn ids_are_case_sensitive() {
        assert_ne!(DeviceId::new("Dev").ok(), DeviceId::new("dev").ok());
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<DeviceId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"not ok\"").is_err());
    }
}
