//! Device and module twins: tags, desired and reported properties with `$version` and `$metadata`.
//!
//! A patch is a JSON merge: keys are added or replaced, `null` deletes a key, nothing else changes.
//! Every change is validated against [`TwinLimits`] on the merged result before it is kept, so a
//! rejected patch leaves the twin untouched.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{HubError, HubResult};
use meridian_proto::ErrorCode;

/// The largest and smallest integers a twin may hold (±2^52).
const MAX_TWIN_INT: i64 = 4_503_599_627_370_495;
const MIN_TWIN_INT: i64 = -4_503_599_627_370_496;

/// Azure's twin document limits; replicated with the hub so every replica enforces the same ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwinLimits {
    /// Largest size of each of `tags`, `properties.desired`, `properties.reported`, counted as
    /// compact JSON (Azure: 8 KB).
    pub max_section_bytes: usize,
    /// Deepest nesting of objects below a section (Azure: 5).
    pub max_depth: usize,
    /// Longest key in bytes (Azure: 64).
    pub max_key_bytes: usize,
    /// Longest string value in bytes (Azure: 512).
    pub max_string_bytes: usize,
    /// Whether arrays are accepted as values (Azure's 2019 documents forbid them).
    pub allow_arrays: bool,
}

impl Default for TwinLimits {
    fn default() -> Self {
        Self {
            max_section_bytes: 8 * 1024,
            max_depth: 5,
            max_key_bytes: 64,
            max_string_bytes: 512,
            allow_arrays: false,
        }
    }
}

fn twin_invalid(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::TwinInvalid, message)
}

impl TwinLimits {
    /// Checks a section's content (keys, values, depth) against the limits.
    ///
    /// `allow_null` is true for patches, where `null` means "delete this key".
    pub fn validate_section(
        &self,
        section: &Map<String, Value>,
        allow_null: bool,
    ) -> HubResult<()> {
        self.validate_object(section, 1, allow_null)
    }

    fn validate_object(
        &self,
        object: &Map<String, Value>,
        depth: usize,
        allow_null: bool,
    ) -> HubResult<()> {
        for (key, value) in object {
            self.validate_key(key)?;
            self.validate_value(key, value, depth, allow_null)?;
        }
        Ok(())
    }

    fn validate_value(
        &self,
        key: &str,
        value: &Value,
        depth: usize,
        allow_null: bool,
    ) -> HubResult<()> {
        match value {
            Value::Null if allow_null => Ok(()),
            Value::Null => Err(twin_invalid(format!("key {key:?} is null"))),
            Value::Bool(_) => Ok(()),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    if !(MIN_TWIN_INT..=MAX_TWIN_INT).contains(&i) {
                        return Err(twin_invalid(format!(
                            "integer {i} under key {key:?} is outside [{MIN_TWIN_INT}, {MAX_TWIN_INT}]"
                        )));
                    }
                } else if n.as_u64().is_some() {
                    return Err(twin_invalid(format!(
                        "integer {n} under key {key:?} is larger than {MAX_TWIN_INT}"
                    )));
                }
                Ok(())
            }
            Value::String(s) => {
                if s.len() > self.max_string_bytes {
                    return Err(twin_invalid(format!(
                        "string under key {key:?} is {} bytes; the limit is {}",
                        s.len(),
                        self.max_string_bytes
                    )));
                }
                Ok(())
            }
            Value::Array(items) => {
                if !self.allow_arrays {
                    return Err(twin_invalid(format!(
                        "key {key:?} holds an array; twins accept booleans, numbers, strings and objects"
                    )));
                }
                for item in items {
                    self.validate_value(key, item, depth, false)?;
                }
                Ok(())
            }
            Value::Object(inner) => {
                if depth > self.max_depth {
                    return Err(twin_invalid(format!(
                        "object under key {key:?} is nested {depth} levels deep; the limit is {}",
                        self.max_depth
                    )));
                }
                self.validate_object(inner, depth + 1, allow_null)
            }
        }
    }

    fn validate_key(&self, key: &str) -> HubResult<()> {
        if key.is_empty() || key.len() > self.max_key_bytes {
            return Err(twin_invalid(format!(
                "key {key:?} must be 1 to {} bytes long",
                self.max_key_bytes
            )));
        }
        if let Some(bad) = key
            .chars()
            .find(|c| c.is_control() || matches!(c, '.' | '$' | ' '))
        {
            return Err(twin_invalid(format!(
                "key {key:?} contains {bad:?}; keys may not contain '.', '$', spaces or control characters"
            )));
        }
        Ok(())
    }

    /// Fails with `TwinSizeExceeded` when a section is larger than the limit.
    pub fn check_size(&self, name: &str, section: &Map<String, Value>) -> HubResult<()> {
        let size = section_size(section);
        if size > self.max_section_bytes {
            return Err(HubError::new(
                ErrorCode::TwinSizeExceeded,
                format!(
                    "{name} would be {size} bytes; the limit is {} bytes",
                    self.max_section_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// A section's size as Azure counts it: every character except whitespace outside strings, i.e.
/// the length of its compact JSON.
pub fn section_size(section: &Map<String, Value>) -> usize {
    // Serializing a Map of Values cannot fail; fall back to a size that is surely over the limit.
    serde_json::to_string(section).map_or(usize::MAX, |s| s.len())
}

/// One properties section (desired or reported) with its version and metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PropertySection {
    /// The properties, without `$version`/`$metadata`.
    pub values: Map<String, Value>,
    /// Increases by one on every change.
    pub version: u64,
    /// Parallel tree of `$lastUpdated` (and, for desired, `$lastUpdatedVersion`) per key.
    pub metadata: Map<String, Value>,
}

impl PropertySection {
    fn new() -> Self {
        let mut metadata = Map::new();
        metadata.insert("$lastUpdated".into(), Value::String(NEVER.into()));
        Self {
            values: Map::new(),
            version: 1,
            metadata,
        }
    }

    /// The section as the service sees it: values plus `$metadata` and `$version`.
    pub fn render(&self) -> Value {
        let mut out = self.values.clone();
        out.insert("$metadata".into(), Value::Object(self.metadata.clone()));
        out.insert("$version".into(), Value::from(self.version));
        Value::Object(out)
    }

    /// The section as a device sees it in a twin GET: values plus `$version`.
    pub fn render_for_device(&self) -> Value {
        let mut out = self.values.clone();
        out.insert("$version".into(), Value::from(self.version));
        Value::Object(out)
    }
}

/// A timestamp meaning "never" in Azure's documents.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// A twin's state (for a device or a module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinState {
    /// Back-end metadata, never seen by the device.
    pub tags: Map<String, Value>,
    /// Properties the back end wants the device to take.
    pub desired: PropertySection,
    /// Properties the device reports.
    pub reported: PropertySection,
    /// Increases on every change of any section.
    pub version: u64,
    /// Increases on every change of tags or desired properties; the twin ETag is derived from it.
    pub etag_counter: u64,
}

impl Default for TwinState {
    fn default() -> Self {
        Self {
            tags: Map::new(),
            desired: PropertySection::new(),
            reported: PropertySection::new(),
            version: 1,
            etag_counter: 1,
        }
    }
}

/// A patch of a twin from the service: tags and/or desired properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinPatch {
    /// Merge patch for tags, if present.
    pub tags: Option<Map<String, Value>>,
    /// Merge patch for desired properties, if present.
    pub desired: Option<Map<String, Value>>,
}

impl TwinPatch {
    /// Reads the writable parts of a service twin body (`tags`, `properties.desired`), ignoring
    /// read-only fields the SDKs echo back (`etag`, `version`, `properties.reported`, `$metadata`,
    /// `$version`).
    pub fn from_service_body(body: &Value) -> HubResult<Self> {
        let Value::Object(root) = body else {
            return Err(HubError::new(
                ErrorCode::IotHubFormatError,
                "twin body must be a JSON object",
            ));
        };
        let tags = match root.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(t)) => Some(strip_read_only(t.clone())),
            Some(_) => return Err(twin_invalid("tags must be a JSON object")),
        };
        let desired = match root.get("properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(props)) => match props.get("desired") {
                None | Some(Value::Null) => None,
                Some(Value::Object(d)) => Some(strip_read_only(d.clone())),
                Some(_) => return Err(twin_invalid("properties.desired must be a JSON object")),
            },
            Some(_) => return Err(twin_invalid("properties must be a JSON object")),
        };
        Ok(Self { tags, desired })
    }
}

/// Removes the read-only `$metadata` and `$version` that SDKs send back from a fetched twin.
fn strip_read_only(mut section: Map<String, Value>) -> Map<String, Value> {
    section.remove("$metadata");
    section.remove("$version");
    section.remove("$etag");
    section
}

/// Merges `patch` into `target` (null deletes) and updates the metadata tree alongside.
fn merge(
    target: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    stamp(metadata, now, version);
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                metadata.remove(key);
            }
            Value::Object(inner) => {
                let child = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !child.is_object() {
                    *child = Value::Object(Map::new());
                }
                let child_meta = metadata
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !child_meta.is_object() {
                    *child_meta = Value::Object(Map::new());
                }
                if let (Value::Object(child), Value::Object(child_meta)) = (child, child_meta) {
                    merge(child, child_meta, inner, now, version);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
                let mut leaf = Map::new();
                stamp(&mut leaf, now, version);
                metadata.insert(key.clone(), Value::Object(leaf));
            }
        }
    }
}

fn stamp(metadata: &mut Map<String, Value>, now: &str, version: Option<u64>) {
    metadata.insert("$lastUpdated".into(), Value::String(now.into()));
    if let Some(v) = version {
        metadata.insert("$lastUpdatedVersion".into(), Value::from(v));
    }
}

/// Builds a fresh metadata tree for a whole section, every key stamped `now`.
fn metadata_for(
    values: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) -> Map<String, Value> {
    let mut meta = Map::new();
    merge(&mut Map::new(), &mut meta, values, now, version);
    meta
}

impl TwinState {
    /// The twin ETag: base64 of the 8-byte big-endian counter, as Azure encodes twin ETags.
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.etag_counter.to_be_bytes())
    }

    /// Applies a service patch (PATCH /twins/{id}); validates the result before keeping it.
    pub fn apply_patch(
        &mut self,
        patch: &TwinPatch,
        limits: &TwinLimits,
        now: &str,
    ) -> HubResult<()> {
        let mut next = self.clone();
        if let Some(tags) = &patch.tags {
            limits.validate_section(tags, true)?;
            let mut ignored = Map::new();
            merge(&mut next.tags, &mut ignored, tags, now, None);
            limits.check_size("tags", &next.tags)?;
        }
        if let Some(desired) = &patch.desired {
            limits.validate_section(desired, true)?;
            let version = next.desired.version + 1;
            merge(
                &mut next.desired.values,
                &mut next.desired.metadata,
                desired,
                now,
                Some(version),
            );
            next.desired.version = version;
            limits.check_size("properties.desired", &next.desired.values)?;
        }
        if patch.tags.is_some() || patch.desired.is_some() {
            next.version += 1;
            next.etag_counter += 1;
        }
        *self = next;
        Ok(())
    }

    /// Replaces tags and desired properties (PUT /twins/{id}); reported properties are the device's
    /// and stay as they are.
    pub fn replace(
        &mut self,
        replacement: &TwinPatch,
        limits: &TwinLimits,
        now: &str,
    ) -> HubResult<()> {
        let tags = replacement.tags.clone().unwrap_or_default();
        let desired = replacement.desired.clone().unwrap_or_default();
        limits.validate_section(&tags, false)?;
        limits.validate_section(&desired, false)?;
        limits.check_size("tags", &tags)?;
        limits.check_size("properties.desired", &desired)?;
        let version = self.desired.version + 1;
        self.tags = tags;
        self.desired.metadata = metadata_for(&desired, now, Some(version));
        self.desired.values = desired;
        self.desired.version = version;
        self.version += 1;
        self.etag_counter += 1;
        Ok(())
    }

    /// Applies a device's reported-properties patch; returns the new reported `$version`.
    pub fn apply_reported(
        &mut self,
        patch: &Map<String, Value>,
        limits: &TwinLimits,
        now: &str,
    ) -> HubResult<u64> {
        limits.validate_section(patch, true)?;
        let mut reported = self.reported.clone();
        merge(
            &mut reported.values,
            &mut reported.metadata,
            patch,
            now,
            None,
        );
        reported.version += 1;
        limits.check_size("properties.reported", &reported.values)?;
        self.reported = reported;
        self.version += 1;
        Ok(self.reported.version)
    }

    /// The twin's `tags` and `properties` as the service API renders them.
    pub fn render_sections(&self, out: &mut Map<String, Value>) {
        out.insert("tags".into(), Value::Object(self.tags.clone()));
        let mut props = Map::new();
        props.insert("desired".into(), self.desired.render());
        props.insert("reported".into(), self.reported.render());
        out.insert("properties".into(), Value::Object(props));
    }

    /// The document a device receives for `$iothub/twin/GET`.
    pub fn render_for_device(&self) -> Value {
        serde_json::json!({
            "desired": self.desired.render_for_device(),
            "reported": self.reported.render_for_device(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    const T1: &str = "2026-01-01T00:00:00.000Z";

    #[test]
    fn patch_merges_and_null_deletes() {
        let mut twin = TwinState::default();
        let limits = TwinLimits::default();
        let p1 = TwinPatch {
            tags: Some(obj(json!({"site": "a", "floor": 1}))),
            desired: Some(obj(json!({"t": 1, "nested": {"x": 1, "y": 2}}))),
        };
        twin.apply_patch(&p1, &limits, T1).expect("valid patch");
        assert_eq!(twin.desired.version, 2);
        let etag1 = twin.etag();
        let p2 = TwinPatch {
            tags: Some(obj(json!({"floor": null}))),
            desired: Some(obj(json!({"t": null, "nested": {"y": null, "z": 3}}))),
        };
        twin.apply_patch(&p2, &limits, T1).expect("valid patch");
        assert_eq!(Value::Object(twin.tags.clone()), json!({"site": "a"}));
        assert_eq!(
            Value::Object(twin.desired.values.clone()),
            json!({"nested": {"x": 1, "z": 3}})
        );
        assert_eq!(twin.desired.version, 3);
        assert_ne!(etag1, twin.etag());
        assert!(twin.desired.metadata.get("t").is_none());
        assert_eq!(
            twin.desired.metadata["nested"]["z"]["$lastUpdatedVersion"],
            json!(3)
        );
    }

    #[test]
    fn rejected_patch_changes_nothing() {
        let mut twin = TwinState::default();
        let limits = TwinLimits::default();
        let before = twin.clone();
        let big: Map<String, Value> = (0..20)
            .map(|i| (format!("k{i}"), Value::String("x".repeat(500))))
            .collect();
        let err = twin
            .apply_patch(
                &TwinPatch {
                    tags: Some(obj(json!({"ok": 1}))),
                    desired: Some(big),
                },
                &limits,
                T1,
            )
            .expect_err("oversize");
        assert_eq!(err.code, ErrorCode::TwinSizeExceeded);
        assert_eq!(twin, before);
    }

    #[test]
    fn depth_limit_matches_azure_example() {
        let limits = TwinLimits::default();
        let five = obj(json!({"one": {"two": {"three": {"four": {"five": {"property": "v"}}}}}}));
        assert!(limits.validate_section(&five, false).is_ok());
        let six = obj(json!({"one": {"two": {"three": {"four": {"five": {"six": {"p": 1}}}}}}}));
        assert_eq!(
            limits.validate_section(&six, false).map_err(|e| e.code),
            Err(ErrorCode::TwinInvalid)
        );
    }

    #[test]
    fn key_and_value_rules() {
        let limits = TwinLimits::default();
        for bad in [
            json!({"a.b": 1}),
            json!({"$x": 1}),
            json!({"a b": 1}),
            json!({"arr": [1, 2]}),
            json!({"big": 4_503_599_627_370_496i64}),
            json!({"s": "x".repeat(513)}),
        ] {
            assert!(
                limits.validate_section(&obj(bad.clone()), true).is_err(),
                "{bad}"
            );
        }
        assert!(
            limits
                .validate_section(&obj(json!({"a,b": 1})), true)
                .is_ok()
        );
    }

    #[test]
    fn replace_keeps_reported_and_strips_read_only() {
        let mut twin = TwinState::default();
        let limits = TwinLimits::default();
        twin.apply_reported(&obj(json!({"fw": "1.0"})), &limits, T1)
            .expect("valid reported");
        let body = json!({
            "etag": "AAAAAAAAAAE=",
            "tags": {"only": "b"},
            "properties": {
                "desired": {"v": 3, "$version": 9, "$metadata": {}},
                "reported": {"ignored": true}
            }
        });
        let replacement = TwinPatch::from_service_body(&body).expect("valid body");
        twin.replace(&replacement, &limits, T1)
            .expect("valid replace");
        assert_eq!(Value::Object(twin.tags.clone()), json!({"only": "b"}));
        assert_eq!(Value::Object(twin.desired.values.clone()), json!({"v": 3}));
        assert_eq!(twin.reported.values["fw"], json!("1.0"));
        assert_eq!(twin.desired.version, 2);
    }

    #[test]
    fn device_shape_has_versions() {
        let twin = TwinState::default();
        assert_eq!(
            twin.render_for_device(),
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
    }
}
