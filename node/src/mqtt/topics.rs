//! Azure IoT Hub's MQTT topic space: what a device may publish and subscribe to, and the topics the
//! hub publishes on.

/// Who is connected: a device, or a module of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Device id.
    pub device_id: String,
    /// Module id for a module connection.
    pub module_id: Option<String>,
}

impl ClientIdentity {
    /// Parses an MQTT client id: `deviceId` or `deviceId/moduleId`.
    pub fn parse(client_id: &str) -> Option<Self> {
        let mut parts = client_id.split('/');
        let device_id = parts.next().filter(|s| !s.is_empty())?.to_string();
        let module_id = match parts.next() {
            Some(m) if !m.is_empty() => Some(m.to_string()),
            Some(_) => return None,
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            device_id,
            module_id,
        })
    }

    /// The client id form.
    pub fn client_id(&self) -> String {
        match &self.module_id {
            Some(m) => format!("{}/{m}", self.device_id),
            None => self.device_id.clone(),
        }
    }

    /// `topic` after this identity's own prefix (see [`Self::own_prefix`]), if it starts with it.
    fn strip_own_prefix<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic
            .strip_prefix("devices/")?
            .strip_prefix(self.device_id.as_str())?;
        match &self.module_id {
            Some(m) => rest.strip_prefix("/modules/")?.strip_prefix(m.as_str()),
            None => Some(rest),
        }
    }

    /// Prefix of this identity's own topics: `devices/{d}` or `devices/{d}/modules/{m}`.
    fn own_prefix(&self) -> String {
        match &self.module_id {
            Some(m) => format!("devices/{}/modules/{m}", self.device_id),
            None => format!("devices/{}", self.device_id),
        }
    }
}

/// What a device's PUBLISH asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Telemetry; the property bag after `messages/events/`.
    Telemetry {
        /// Percent-encoded property bag.
        bag: String,
    },
    /// `$iothub/twin/GET/?$rid=`
    TwinGet {
        /// Request id.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=`
    TwinPatchReported {
        /// Request id.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid=`
    MethodResponse {
        /// Status the device answered with.
        status: i32,
        /// Request id (the hub's).
        rid: String,
    },
}

/// Reads `key=value` pairs after the `?` of a `$iothub` topic.
fn query_param(topic: &str, key: &str) -> Option<String> {
    let query = topic.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// Classifies a device's PUBLISH topic; `None` means the topic is not one this identity may
/// publish to (the connection is then closed).
pub fn classify_publish(identity: &ClientIdentity, topic: &str) -> Option<DeviceRequest> {
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        if rest.starts_with("twin/GET/") {
            return query_param(topic, "$rid").map(|rid| DeviceRequest::TwinGet { rid });
        }
        if rest.starts_with("twin/PATCH/properties/reported/") {
            return query_param(topic, "$rid").map(|rid| DeviceRequest::TwinPatchReported { rid });
        }
        if let Some(after) = rest.strip_prefix("methods/res/") {
            let status = after.split('/').next()?.parse().ok()?;
            let rid = query_param(topic, "$rid")?;
            return Some(DeviceRequest::MethodResponse { status, rid });
        }
        return None;
    }
    // Matched piece by piece: this runs for every telemetry message.
    let bag = identity
        .strip_own_prefix(topic)?
        .strip_prefix("/messages/events/")?;
    // The bag is one segment: a raw '/' would be a different topic.
    (!bag.contains('/')).then(|| DeviceRequest::Telemetry {
        bag: bag.to_string(),
    })
}

/// Whether this identity may subscribe to `filter`.
pub fn subscription_allowed(identity: &ClientIdentity, filter: &str) -> bool {
    const HUB_FILTERS: [&str; 3] = [
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
    ];
    if HUB_FILTERS.contains(&filter) {
        return true;
    }
    let own = match &identity.module_id {
        Some(_) => format!("{}/inputs/#", identity.own_prefix()),
        None => format!("{}/messages/devicebound/#", identity.own_prefix()),
    };
    filter == own
}

/// Whether `topic` matches an MQTT `filter` (`+` one level, `#` the rest).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`
pub fn twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`
pub fn desired_patch(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`
pub fn method_request(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={rid}")
}

/// `devices/{d}/messages/devicebound/{bag}`
pub fn c2d(device_id: &str, bag: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/{bag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> ClientIdentity {
        ClientIdentity::parse(id).expect("valid")
    }

    #[test]
    fn client_ids() {
        assert_eq!(dev("d1").module_id, None);
        assert_eq!(dev("d1/m1").module_id.as_deref(), Some("m1"));
        assert!(ClientIdentity::parse("").is_none());
        assert!(ClientIdentity::parse("a/b/c").is_none());
        assert!(ClientIdentity::parse("a/").is_none());
    }

    #[test]
    fn publishes_are_scoped_to_the_identity() {
        let d1 = dev("d1");
        assert_eq!(
            classify_publish(&d1, "devices/d1/messages/events/%24.mid=1&a=b"),
            Some(DeviceRequest::Telemetry {
                bag: "%24.mid=1&a=b".into()
            })
        );
        assert!(classify_publish(&d1, "devices/d1/messages/events/").is_some());
        assert!(classify_publish(&d1, "devices/d10/messages/events/").is_none());
        assert!(classify_publish(&d1, "devices/d2/messages/events/").is_none());
        assert!(classify_publish(&d1, "devices/d1/messages/events/a/b").is_none());
        assert!(classify_publish(&d1, "devices/d1/modules/m/messages/events/").is_none());
        assert!(
            classify_publish(&dev("d1/m"), "devices/d1/modules/m/messages/events/x=1").is_some()
        );
        for other in [
            "devices/d1/modules/m2/messages/events/",
            "devices/d1/modules/messages/events/",
            "devices/d1/messages/events/",
            "devices/d1/modules/m/messages/events",
        ] {
            assert!(classify_publish(&dev("d1/m"), other).is_none(), "{other}");
        }
        assert_eq!(
            classify_publish(&d1, "$iothub/twin/GET/?$rid=abc"),
            Some(DeviceRequest::TwinGet { rid: "abc".into() })
        );
        assert_eq!(
            classify_publish(&d1, "$iothub/methods/res/200/?$rid=7"),
            Some(DeviceRequest::MethodResponse {
                status: 200,
                rid: "7".into()
            })
        );
        assert!(classify_publish(&d1, "$iothub/twin/GET/").is_none());
        assert!(classify_publish(&d1, "$iothub/other").is_none());
        assert!(classify_publish(&d1, "anything/else").is_none());
    }

    #[test]
    fn subscriptions_are_scoped() {
        let d1 = dev("d1");
        assert!(subscription_allowed(
            &d1,
            "devices/d1/messages/devicebound/#"
        ));
        assert!(subscription_allowed(&d1, "$iothub/twin/res/#"));
        assert!(!subscription_allowed(
            &d1,
            "devices/d2/messages/devicebound/#"
        ));
        assert!(!subscription_allowed(
            &d1,
            "devices/d10/messages/devicebound/#"
        ));
        assert!(!subscription_allowed(&d1, "#"));
        assert!(subscription_allowed(
            &dev("d1/m"),
            "devices/d1/modules/m/inputs/#"
        ));
    }

    #[test]
    fn filter_matching() {
        assert!(matches(
            "$iothub/twin/res/#",
            "$iothub/twin/res/200/?$rid=1"
        ));
        assert!(matches(
            "devices/d1/messages/devicebound/#",
            "devices/d1/messages/devicebound/a=b"
        ));
        assert!(!matches(
            "$iothub/twin/res/#",
            "$iothub/methods/POST/x/?$rid=1"
        ));
        assert!(matches("a/+/c", "a/b/c"));
    }
}
