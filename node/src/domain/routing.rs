//! Message routing: routes, custom endpoints and the fallback route, as hub configuration, and the
//! pure decision of where a message goes.
//!
//! Every endpoint is a stream in the node's partition log: the built-in `events` stream, or a
//! custom stream with its own id. Routing happens when a message is stored, so a PUBACK means the
//! message is durable in every stream it was routed to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{HubError, HubResult};
use meridian_proto::ErrorCode;
use meridian_query::ast::{Path, Segment};
use meridian_query::{Document, evaluate_condition, parse_condition, walk_value};

/// Routing limits, replicated with the hub (defaults are Azure's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingLimits {
    /// Most routes (Azure: 100).
    pub max_routes: usize,
    /// Most custom endpoints (Azure: 10).
    pub max_endpoints: usize,
    /// Most message enrichments (Azure: 10).
    pub max_enrichments: usize,
    /// Most consumer groups of the events stream (Azure standard tier: 20).
    pub max_consumer_groups: usize,
}

impl Default for RoutingLimits {
    fn default() -> Self {
        Self {
            max_routes: 100,
            max_endpoints: 10,
            max_enrichments: 10,
            max_consumer_groups: 20,
        }
    }
}
/// Partition keys of stream `s` start at `s * STREAM_STRIDE` (the built-in stream is 0).
pub const STREAM_STRIDE: u32 = 1024;
/// The built-in endpoint's name.
pub const EVENTS: &str = "events";

/// What a route listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteSource {
    /// Device-to-cloud telemetry.
    DeviceMessages,
    /// Twin changes.
    TwinChangeEvents,
    /// Device and module creation and deletion.
    DeviceLifecycleEvents,
    /// Connects and disconnects.
    DeviceConnectionStateEvents,
}

/// A route (Azure's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// What it listens to.
    pub source: RouteSource,
    /// Routing query; `true` when empty.
    #[serde(default)]
    pub condition: String,
    /// Where matching messages go (exactly one in Azure's API; several allowed here).
    pub endpoint_names: Vec<String>,
    /// Disabled routes are ignored.
    #[serde(default = "enabled")]
    pub is_enabled: bool,
}

fn enabled() -> bool {
    true
}

/// A custom endpoint. Every endpoint is a named partitioned stream inside Meridian, readable
/// like `events`; a `webhook` endpoint's stream is also delivered, in order, to an HTTP(S) URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Unique name.
    pub name: String,
    /// `stream` or `webhook`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Assigned by the hub: this endpoint's stream id.
    #[serde(default)]
    pub stream_id: u32,
    /// Webhook target (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PEM of the CA that signs an `https` webhook's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
    /// A webhook that keeps failing this long is dead: its pending messages are dropped
    /// (default 3600 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_after_secs: Option<u64>,
    /// File endpoint: the directory batches are written under (on every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// File endpoint: seconds between batches (Azure: 60–720, default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_frequency_secs: Option<u64>,
}

/// A message enrichment: an application property added to messages sent to some endpoints. The
/// value is a literal, `$iothubname`, or a path into the device twin (`$twin.tags.site`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrichment {
    /// Property name.
    pub key: String,
    /// Literal, `$iothubname` or `$twin.<path>`.
    pub value: String,
    /// Endpoints whose messages get it (`events` included).
    pub endpoint_names: Vec<String>,
}

impl Enrichment {
    /// The value for a message from a device with `twin`; `None` when a `$twin` path is missing
    /// (the property is then not added, as in Azure).
    pub fn resolve(&self, twin: Option<&Value>, hub_name: &str) -> Option<String> {
        if self.value.eq_ignore_ascii_case("$iothubname") {
            return Some(hub_name.to_string());
        }
        match self.value.strip_prefix("$twin.") {
            Some(path) => {
                let segments: Vec<Segment> = path
                    .split('.')
                    .map(|f| Segment::Field(f.to_string()))
                    .collect();
                match walk_value(twin?, &segments)? {
                    Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                }
            }
            None => Some(self.value.clone()),
        }
    }
}

/// The hub's routing configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingConfig {
    /// Routes in evaluation order.
    pub routes: Vec<Route>,
    /// Custom endpoints by name.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Messages no route matched go to `events` when true (Azure's fallback route).
    pub fallback_enabled: bool,
    /// Next stream id to hand out.
    pub next_stream_id: u32,
    /// Message enrichments.
    #[serde(default)]
    pub enrichments: Vec<Enrichment>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            endpoints: BTreeMap::new(),
            fallback_enabled: true,
            next_stream_id: 1,
            enrichments: Vec::new(),
        }
    }
}

fn validate_name(kind: &str, name: &str) -> HubResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(HubError::invalid(format!(
            "{kind} name {name:?} must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

/// Replaces the item `same` finds, or appends `item` while fewer than `max` exist.
fn upsert_limited<T: Clone>(
    items: &mut Vec<T>,
    item: &T,
    same: impl Fn(&T) -> bool,
    max: usize,
    what: &str,
) -> HubResult<()> {
    match items.iter_mut().find(|x| same(x)) {
        Some(existing) => *existing = item.clone(),
        None => {
            if items.len() >= max {
                return Err(HubError::new(
                    ErrorCode::IotHubQuotaExceeded,
                    format!("the hub already has {max} {what}"),
                ));
            }
            items.push(item.clone());
        }
    }
    Ok(())
}

/// Removes the items `same` finds; `ResourceNotFound` when there were none.
fn remove_matching<T>(items: &mut Vec<T>, same: impl Fn(&T) -> bool, what: &str) -> HubResult<()> {
    let before = items.len();
    items.retain(|x| !same(x));
    if items.len() == before {
        return Err(HubError::new(
            ErrorCode::ResourceNotFound,
            format!("no {what}"),
        ));
    }
    Ok(())
}

impl RoutingConfig {
    /// Whether messages go to the built-in `events` stream as sent: no route selects another
    /// stream and no enrichment changes them.
    pub fn passes_through(&self) -> bool {
        self.routes.is_empty() && self.enrichments.is_empty()
    }

    /// Fails unless every name is `events` or a custom endpoint.
    fn check_endpoints(&self, names: &[String]) -> HubResult<()> {
        match names
            .iter()
            .find(|e| *e != EVENTS && !self.endpoints.contains_key(*e))
        {
            Some(e) => Err(HubError::invalid(format!("endpoint {e} does not exist"))),
            None => Ok(()),
        }
    }

    /// Adds or replaces a route after checking its condition parses and its endpoints exist.
    pub fn put_route(&mut self, route: Route, limits: &RoutingLimits) -> HubResult<Route> {
        validate_name("route", &route.name)?;
        if !route.condition.trim().is_empty() {
            parse_condition(&route.condition)
                .map_err(|e| HubError::invalid(format!("route condition: {e}")))?;
        }
        if route.endpoint_names.is_empty() {
            return Err(HubError::invalid("a route needs an endpoint"));
        }
        self.check_endpoints(&route.endpoint_names)?;
        upsert_limited(
            &mut self.routes,
            &route,
            |r| r.name == route.name,
            limits.max_routes,
            "routes",
        )?;
        Ok(route)
    }

    /// Removes a route.
    pub fn delete_route(&mut self, name: &str) -> HubResult<()> {
        remove_matching(
            &mut self.routes,
            |r| r.name == name,
            &format!("route named {name}"),
        )
    }

    /// Adds a custom endpoint (names are unique and `events` is reserved).
    pub fn put_endpoint(
        &mut self,
        mut endpoint: Endpoint,
        limits: &RoutingLimits,
    ) -> HubResult<Endpoint> {
        validate_name("endpoint", &endpoint.name)?;
        if endpoint.name.eq_ignore_ascii_case(EVENTS) {
            return Err(HubError::invalid("events is the built-in endpoint's name"));
        }
        match endpoint.kind.as_str() {
            "stream" => {}
            "webhook" => {
                let url = endpoint.url.as_deref().unwrap_or_default();
                let https = url.starts_with("https://");
                if !(https || url.starts_with("http://")) || url.len() < 10 {
                    return Err(HubError::invalid(
                        "a webhook endpoint needs an http:// or https:// url",
                    ));
                }
                if https && endpoint.ca_certificate.is_none() {
                    return Err(HubError::invalid(
                        "an https webhook needs caCertificate (the PEM of the CA that signs it)",
                    ));
                }
            }
            "file" => {
                let dir = endpoint.directory.as_deref().unwrap_or_default();
                if !dir.starts_with('/') {
                    return Err(HubError::invalid(
                        "a file endpoint needs an absolute directory",
                    ));
                }
                if endpoint
                    .batch_frequency_secs
                    .is_some_and(|s| !(1..=720).contains(&s))
                {
                    return Err(HubError::invalid("batchFrequencySecs must be 1 to 720"));
                }
            }
            other => {
                return Err(HubError::invalid(format!(
                    "endpoint type {other:?} is not supported; use stream, webhook or file"
                )));
            }
        }
        if let Some(existing) = self.endpoints.get(&endpoint.name) {
            return Ok(existing.clone());
        }
        if self.endpoints.len() >= limits.max_endpoints {
            return Err(HubError::new(
                ErrorCode::IotHubQuotaExceeded,
                format!(
                    "the hub already has {} custom endpoints",
                    limits.max_endpoints
                ),
            ));
        }
        endpoint.stream_id = self.next_stream_id;
        self.next_stream_id += 1;
        self.endpoints
            .insert(endpoint.name.clone(), endpoint.clone());
        Ok(endpoint)
    }

    /// Removes a custom endpoint no route uses.
    pub fn delete_endpoint(&mut self, name: &str) -> HubResult<()> {
        if let Some(r) = self
            .routes
            .iter()
            .find(|r| r.endpoint_names.iter().any(|e| e == name))
        {
            return Err(HubError::invalid(format!(
                "route {} still sends to endpoint {name}",
                r.name
            )));
        }
        self.endpoints.remove(name).map(|_| ()).ok_or_else(|| {
            HubError::new(
                ErrorCode::ResourceNotFound,
                format!("no endpoint named {name}"),
            )
        })
    }

    /// Adds or replaces an enrichment (by key).
    pub fn put_enrichment(
        &mut self,
        enrichment: Enrichment,
        limits: &RoutingLimits,
    ) -> HubResult<Enrichment> {
        if enrichment.key.is_empty() || enrichment.key.len() > 64 || enrichment.key.starts_with('$')
        {
            return Err(HubError::invalid(
                "an enrichment key must be 1 to 64 characters and not start with '$'",
            ));
        }
        if enrichment.endpoint_names.is_empty() {
            return Err(HubError::invalid("an enrichment needs an endpoint"));
        }
        self.check_endpoints(&enrichment.endpoint_names)?;
        upsert_limited(
            &mut self.enrichments,
            &enrichment,
            |x| x.key == enrichment.key,
            limits.max_enrichments,
            "enrichments",
        )?;
        Ok(enrichment)
    }

    /// Removes an enrichment.
    pub fn delete_enrichment(&mut self, key: &str) -> HubResult<()> {
        remove_matching(
            &mut self.enrichments,
            |e| e.key == key,
            &format!("enrichment {key}"),
        )
    }

    /// The enrichments that apply to stream `stream_id`.
    pub fn enrichments_for(&self, stream_id: u32) -> Vec<&Enrichment> {
        self.enrichments
            .iter()
            .filter(|e| {
                e.endpoint_names.iter().any(|n| {
                    if n == EVENTS {
                        stream_id == 0
                    } else {
                        self.endpoints
                            .get(n)
                            .is_some_and(|ep| ep.stream_id == stream_id)
                    }
                })
            })
            .collect()
    }

    /// Whether any enabled route for `source` needs the device twin.
    pub fn needs_twin(&self, source: RouteSource) -> bool {
        self.routes.iter().any(|r| {
            r.is_enabled && r.source == source && r.condition.to_ascii_lowercase().contains("$twin")
        })
    }

    /// The stream ids a message goes to (0 is `events`), in ascending order.
    pub fn streams_for(&self, source: RouteSource, message: &dyn Document) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        let mut matched = false;
        for route in self
            .routes
            .iter()
            .filter(|r| r.is_enabled && r.source == source)
        {
            let holds = route.condition.trim().is_empty()
                || parse_condition(&route.condition)
                    .map(|c| evaluate_condition(&c, message))
                    .unwrap_or(false);
            if holds {
                matched = true;
                for e in &route.endpoint_names {
                    if e == EVENTS {
                        out.insert(0);
                    } else if let Some(ep) = self.endpoints.get(e) {
                        out.insert(ep.stream_id);
                    }
                }
            }
        }
        if !matched && self.fallback_enabled && source == RouteSource::DeviceMessages {
            out.insert(0);
        }
        out
    }
}

/// A message as routing queries see it: `$`-prefixed system properties, application properties
/// (names case-insensitive), `$body` (only for JSON in a UTF encoding) and `$twin` (the device's).
pub struct RoutingDocument<'a> {
    /// System properties by their stored names (`content-type`, `iothub-connection-device-id`).
    pub system: &'a BTreeMap<String, String>,
    /// Application properties.
    pub application: &'a BTreeMap<String, String>,
    /// The parsed body, when it is JSON.
    pub body: Option<Value>,
    /// The device twin.
    pub twin: Option<Value>,
}

/// Routing names of system properties (lower case) → stored names.
const SYSTEM_NAMES: [(&str, &str); 10] = [
    ("contenttype", "content-type"),
    ("contentencoding", "content-encoding"),
    ("connectiondeviceid", "iothub-connection-device-id"),
    ("connectionmoduleid", "iothub-connection-module-id"),
    ("enqueuedtime", "iothub-enqueuedtime"),
    ("messageid", "message-id"),
    ("correlationid", "correlation-id"),
    ("userid", "user-id"),
    (
        "connectiondevicegenerationid",
        "iothub-connection-auth-generation-id",
    ),
    ("iothub-message-source", "iothub-message-source"),
];

/// Parses a body for `$body` queries: only `application/json` in UTF-8/16/32 is evaluated.
pub fn json_body(system: &BTreeMap<String, String>, body: &[u8]) -> Option<Value> {
    let content_type = system.get("content-type")?.to_ascii_lowercase();
    let encoding = system
        .get("content-encoding")
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    if !content_type.starts_with("application/json")
        || !matches!(encoding.as_str(), "utf-8" | "utf-16" | "utf-32")
    {
        return None;
    }
    serde_json::from_slice(body).ok()
}

fn find_ci(map: &BTreeMap<String, String>, key: &str) -> Option<Value> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| Value::String(v.clone()))
}

impl Document for RoutingDocument<'_> {
    fn resolve(&self, path: &Path) -> Option<Value> {
        let Some(Segment::Field(first)) = path.segments.first() else {
            return None;
        };
        let rest = &path.segments[1..];
        let lower = first.to_ascii_lowercase();
        match lower.as_str() {
            "$body" => walk_value(self.body.as_ref()?, rest),
            "$twin" => walk_value(self.twin.as_ref()?, rest),
            _ if !rest.is_empty() => None,
            _ => match lower.strip_prefix('$') {
                Some(name) => SYSTEM_NAMES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, stored)| self.system.get(*stored).cloned().map(Value::String))
                    .or_else(|| find_ci(self.system, name))
                    .or_else(|| find_ci(self.application, name)),
                // `enqueuedTime` without `$` is accepted too (the documentation uses both).
                None if lower == "enqueuedtime" => self
                    .system
                    .get("iothub-enqueuedtime")
                    .cloned()
                    .map(Value::String),
                None => find_ci(self.application, first),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> RoutingConfig {
        let mut c = RoutingConfig::default();
        let hot = c
            .put_endpoint(
                Endpoint {
                    name: "hot".into(),
                    kind: "stream".into(),
                    stream_id: 0,
                    url: None,
                    ca_certificate: None,
                    dead_after_secs: None,
                    directory: None,
                    batch_frequency_secs: None,
                },
                &RoutingLimits::default(),
            )
            .expect("endpoint");
        assert_eq!(hot.stream_id, 1);
        c.put_route(
            Route {
                name: "critical".into(),
                source: RouteSource::DeviceMessages,
                condition: "level = 'critical' OR $body.temp > 30 OR $twin.tags.site = 'a'".into(),
                endpoint_names: vec!["hot".into()],
                is_enabled: true,
            },
            &RoutingLimits::default(),
        )
        .expect("route");
        c
    }

    fn doc<'a>(
        system: &'a BTreeMap<String, String>,
        app: &'a BTreeMap<String, String>,
        body: Option<Value>,
        twin: Option<Value>,
    ) -> RoutingDocument<'a> {
        RoutingDocument {
            system,
            application: app,
            body,
            twin,
        }
    }

    #[test]
    fn routes_fallback_and_conditions() {
        let c = config();
        let json_sys: BTreeMap<String, String> = [
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "utf-8".into()),
            ("iothub-connection-device-id".into(), "d1".into()),
        ]
        .into();
        let empty = BTreeMap::new();
        let app: BTreeMap<String, String> = [("Level".into(), "critical".into())].into();
        // application property, case-insensitive name
        assert_eq!(
            c.streams_for(RouteSource::DeviceMessages, &doc(&empty, &app, None, None)),
            BTreeSet::from([1])
        );
        // $body only with JSON content type
        let body = json_body(&json_sys, br#"{"temp": 35}"#);
        assert_eq!(
            c.streams_for(
                RouteSource::DeviceMessages,
                &doc(&json_sys, &empty, body, None)
            ),
            BTreeSet::from([1])
        );
        assert_eq!(json_body(&empty, br#"{"temp": 35}"#), None);
        // $twin
        let twin = json!({"tags": {"site": "a"}});
        assert_eq!(
            c.streams_for(
                RouteSource::DeviceMessages,
                &doc(&empty, &empty, None, Some(twin))
            ),
            BTreeSet::from([1])
        );
        // no match: fallback to events
        assert_eq!(
            c.streams_for(
                RouteSource::DeviceMessages,
                &doc(&empty, &empty, None, None)
            ),
            BTreeSet::from([0])
        );
        let mut off = c.clone();
        off.fallback_enabled = false;
        assert!(
            off.streams_for(
                RouteSource::DeviceMessages,
                &doc(&empty, &empty, None, None)
            )
            .is_empty()
        );
        assert!(c.needs_twin(RouteSource::DeviceMessages));
        // system properties by routing name
        let d = doc(&json_sys, &empty, None, None);
        let cond =
            parse_condition("$connectionDeviceId = 'd1' AND $contentType = 'application/json'")
                .expect("valid");
        assert!(evaluate_condition(&cond, &d));
    }

    #[test]
    fn enrichments() {
        let mut c = config();
        let e = Enrichment {
            key: "site".into(),
            value: "$twin.tags.site".into(),
            endpoint_names: vec!["hot".into()],
        };
        c.put_enrichment(e.clone(), &RoutingLimits::default())
            .expect("valid");
        assert_eq!(c.enrichments_for(1).len(), 1);
        assert!(c.enrichments_for(0).is_empty());
        let twin = json!({"tags": {"site": "a", "floor": 3}});
        assert_eq!(e.resolve(Some(&twin), "hub"), Some("a".into()));
        let floor = Enrichment {
            value: "$twin.tags.floor".into(),
            ..e.clone()
        };
        assert_eq!(floor.resolve(Some(&twin), "hub"), Some("3".into()));
        let missing = Enrichment {
            value: "$twin.tags.nope".into(),
            ..e.clone()
        };
        assert_eq!(missing.resolve(Some(&twin), "hub"), None);
        let name = Enrichment {
            value: "$iothubname".into(),
            ..e.clone()
        };
        assert_eq!(name.resolve(None, "hub"), Some("hub".into()));
        assert!(
            c.put_enrichment(
                Enrichment {
                    key: "$x".into(),
                    ..e.clone()
                },
                &RoutingLimits::default()
            )
            .is_err()
        );
        assert!(
            c.put_enrichment(
                Enrichment {
                    endpoint_names: vec!["nowhere".into()],
                    ..e
                },
                &RoutingLimits::default()
            )
            .is_err()
        );
        c.delete_enrichment("site").expect("delete");
        assert!(c.delete_enrichment("site").is_err());
    }

    #[test]
    fn bad_routes_and_endpoints_are_refused() {
        let mut c = config();
        let bad = |condition: &str, endpoint: &str| Route {
            name: "r".into(),
            source: RouteSource::DeviceMessages,
            condition: condition.into(),
            endpoint_names: vec![endpoint.into()],
            is_enabled: true,
        };
        let err = c
            .put_route(bad("a = ", "hot"), &RoutingLimits::default())
            .expect_err("parse error");
        assert!(err.message.contains("route condition"), "{err:?}");
        assert!(
            c.put_route(bad("true", "nowhere"), &RoutingLimits::default())
                .is_err()
        );
        assert!(c.delete_endpoint("hot").is_err(), "still in use");
        assert!(
            c.put_endpoint(
                Endpoint {
                    name: "events".into(),
                    kind: "stream".into(),
                    stream_id: 0,
                    url: None,
                    ca_certificate: None,
                    dead_after_secs: None,
                    directory: None,
                    batch_frequency_secs: None,
                },
                &RoutingLimits::default()
            )
            .is_err()
        );
        assert!(
            c.put_endpoint(
                Endpoint {
                    name: "w".into(),
                    kind: "webhook".into(),
                    stream_id: 0,
                    url: Some("ftp://x".into()),
                    ca_certificate: None,
                    dead_after_secs: None,
                    directory: None,
                    batch_frequency_secs: None,
                },
                &RoutingLimits::default()
            )
            .is_err()
        );
        c.delete_route("critical").expect("delete");
        c.delete_endpoint("hot").expect("delete");
    }
}
