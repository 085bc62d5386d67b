//! What an AMQP link address names, and the Event Hubs selector filter: pure parsing, no I/O.
//!
//! Clients spell addresses differently (`amqps://host/messages/devicebound`, `/messages/devicebound`,
//! `messages/events/...`, `hub/ConsumerGroups/$Default/Partitions/0`), so the scheme and host are
//! dropped and segments compare case-insensitively.

use crate::domain::{HubError, HubResult};

/// A node of the hub's AMQP address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmqpNode {
    /// `$cbs`: claims-based security (put-token).
    Cbs,
    /// `$management` of the Event Hub-compatible endpoint (runtime information).
    Management,
    /// `/messages/devicebound`: C2D sends from the service SDKs.
    DeviceBound,
    /// `/messages/serviceBound/feedback`: C2D delivery feedback.
    Feedback,
    /// `/messages/serviceBound/filenotifications`: file upload notifications.
    FileNotifications,
    /// `{eventhub}/ConsumerGroups/{group}/Partitions/{partition}`: the Event Hub-compatible
    /// endpoint's partition receivers.
    EventHubPartition {
        /// The Event Hub-compatible name.
        event_hub: String,
        /// Consumer group.
        consumer_group: String,
        /// Partition id.
        partition: u32,
    },
    /// A device link (the device SDKs' AMQP transport) under `/devices/{id}[/modules/{m}]`.
    Device {
        /// Device id.
        device_id: String,
        /// Module id for a module identity.
        module_id: Option<String>,
        /// Which link.
        link: DeviceLink,
    },
    /// `/messages/events/...`: the IoT Hub form of the events endpoint, answered with a redirect to
    /// the Event Hub-compatible name (`rest` is what follows `messages/events`, e.g.
    /// `/ConsumerGroups/$Default/Partitions/0` or `/$management`).
    IotHubEvents {
        /// The path after `messages/events`.
        rest: String,
    },
}

/// The path segments of an address, without scheme and host.
pub fn path_segments(address: &str) -> Vec<&str> {
    let path = match address.split_once("://") {
        // `amqps://host[:port]/path`: drop the authority.
        Some((_, after)) => after.split_once('/').map_or("", |(_, p)| p),
        None => address,
    };
    path.split('/').filter(|s| !s.is_empty()).collect()
}

impl AmqpNode {
    /// Resolves `address` for the hub whose Event Hub-compatible name is `event_hub`.
    pub fn parse(address: &str, event_hub: &str) -> HubResult<Self> {
        let segments = path_segments(address);
        let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
        let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
        let unknown = || {
            HubError::new(
                meridian_proto::ErrorCode::ResourceNotFound,
                format!("no AMQP node at address {address:?}"),
            )
        };
        match lower.as_slice() {
            ["$cbs"] => Ok(Self::Cbs),
            ["messages", "devicebound"] => Ok(Self::DeviceBound),
            ["messages", "servicebound", "feedback"] => Ok(Self::Feedback),
            ["messages", "servicebound", "filenotifications"]
            | ["messages", "servicebound", "fileuploadnotifications"] => {
                Ok(Self::FileNotifications)
            }
            ["messages", "events", ..] => Ok(Self::IotHubEvents {
                rest: segments[2..].iter().fold(String::new(), |mut acc, s| {
                    acc.push('/');
                    acc.push_str(s);
                    acc
                }),
            }),
            ["devices", _, rest @ ..] => {
                let device_id = percent_encoding::percent_decode_str(segments[1])
                    .decode_utf8_lossy()
                    .into_owned();
                let (module_id, rest) = match rest {
                    ["modules", _, rest @ ..] => (
                        Some(
                            percent_encoding::percent_decode_str(segments[3])
                                .decode_utf8_lossy()
                                .into_owned(),
                        ),
                        rest,
                    ),
                    _ => (None, rest),
                };
                let link = match rest {
                    ["messages", "events"] => DeviceLink::Telemetry,
                    ["messages", "devicebound"] => DeviceLink::CloudToDevice,
                    ["methods", "devicebound"] => DeviceLink::Methods,
                    ["twin"] => DeviceLink::Twin,
                    _ => return Err(unknown()),
                };
                Ok(Self::Device {
                    device_id,
                    module_id,
                    link,
                })
            }
            ["$management"] => Ok(Self::Management),
            [eh, "$management"] if eh.eq_ignore_ascii_case(event_hub) => Ok(Self::Management),
            [eh, "consumergroups", _, "partitions", p] if eh.eq_ignore_ascii_case(event_hub) => {
                let partition = p.parse::<u32>().map_err(|_| {
                    HubError::new(
                        meridian_proto::ErrorCode::ResourceNotFound,
                        format!("partition {p:?} is not a partition id"),
                    )
                })?;
                Ok(Self::EventHubPartition {
                    event_hub: segments[0].to_string(),
                    consumer_group: segments[2].to_string(),
                    partition,
                })
            }
            _ => Err(unknown()),
        }
    }

    /// The right a token's policy (or device key) must give for this node.
    pub fn permission(&self) -> crate::domain::Permission {
        match self {
            Self::Device { .. } => crate::domain::Permission::DeviceConnect,
            _ => crate::domain::Permission::ServiceConnect,
        }
    }

    /// The resource path a token's scope must cover for this node (after the host), and whether
    /// the node needs a token at all (`$cbs` is how tokens arrive; redirects carry no data).
    pub fn resource(&self, event_hub: &str) -> Option<Vec<String>> {
        let owned = |s: &[&str]| Some(s.iter().map(|s| s.to_string()).collect());
        match self {
            Self::Cbs | Self::IotHubEvents { .. } => None,
            Self::Management => owned(&[event_hub, "$management"]),
            Self::DeviceBound => owned(&["messages", "devicebound"]),
            Self::Feedback => owned(&["messages", "servicebound", "feedback"]),
            Self::FileNotifications => owned(&["messages", "servicebound", "filenotifications"]),
            Self::Device {
                device_id,
                module_id,
                ..
            } => {
                let mut r = vec!["devices".to_string(), device_id.clone()];
                if let Some(m) = module_id {
                    r.extend(["modules".to_string(), m.clone()]);
                }
                Some(r)
            }
            Self::EventHubPartition {
                event_hub,
                consumer_group,
                partition,
            } => Some(vec![
                event_hub.clone(),
                "consumergroups".into(),
                consumer_group.clone(),
                "partitions".into(),
                partition.to_string(),
            ]),
        }
    }
}

/// The links of a device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLink {
    /// `messages/events`: telemetry from the device.
    Telemetry,
    /// `messages/devicebound`: C2D messages to the device.
    CloudToDevice,
    /// `methods/devicebound`: direct method requests and responses.
    Methods,
    /// `twin`: twin requests, responses and desired-property pushes.
    Twin,
}

/// Where an Event Hubs receiver starts, from its selector filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPosition {
    /// At this offset (= sequence number) inclusive.
    At(u64),
    /// After the last event: only new ones (`@latest`).
    Latest,
    /// At the first event enqueued at or after this time (Unix ms).
    EnqueuedAtOrAfter(i64),
}

/// Parses the `apache.org:selector-filter:string` expression the Event Hubs SDKs send:
/// `amqp.annotation.x-opt-offset > '-1'`, `... x-opt-sequence-number >= '42'`,
/// `... x-opt-enqueued-time > '1700000000000'`. Anything else is refused rather than guessed.
pub fn parse_selector(selector: &str) -> HubResult<EventPosition> {
    let bad = || {
        HubError::invalid(format!(
            "unsupported selector filter {selector:?}: expected amqp.annotation.x-opt-offset, \
             x-opt-sequence-number or x-opt-enqueued-time with > or >= and a quoted value"
        ))
    };
    let rest = selector
        .trim()
        .strip_prefix("amqp.annotation.")
        .ok_or_else(bad)?;
    let (field, rest) = rest.split_once(' ').ok_or_else(bad)?;
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(r) = rest.strip_prefix(">=") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix('>') {
        (false, r)
    } else {
        return Err(bad());
    };
    let value = rest
        .trim()
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(bad)?;
    let after = |n: i64| -> EventPosition {
        // `> n` starts at n + 1; negative offsets ("-1") mean the start of the partition.
        let first = if inclusive { n } else { n.saturating_add(1) };
        EventPosition::At(first.max(0) as u64)
    };
    match field {
        "x-opt-offset" if value == "@latest" => Ok(EventPosition::Latest),
        "x-opt-offset" | "x-opt-sequence-number" => {
            Ok(after(value.parse::<i64>().map_err(|_| bad())?))
        }
        "x-opt-enqueued-time" => {
            let ms = value.parse::<i64>().map_err(|_| bad())?;
            Ok(EventPosition::EnqueuedAtOrAfter(if inclusive {
                ms
            } else {
                ms.saturating_add(1)
            }))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_every_sdk_resolve() {
        let eh = "meridian";
        assert_eq!(AmqpNode::parse("$cbs", eh).ok(), Some(AmqpNode::Cbs));
        for a in [
            "amqps://localhost:8443/messages/devicebound",
            "/messages/devicebound",
            "/messages/deviceBound",
        ] {
            assert_eq!(
                AmqpNode::parse(a, eh).ok(),
                Some(AmqpNode::DeviceBound),
                "{a}"
            );
        }
        assert_eq!(
            AmqpNode::parse("/messages/serviceBound/feedback", eh).ok(),
            Some(AmqpNode::Feedback)
        );
        assert_eq!(
            AmqpNode::parse("/messages/serviceBound/filenotifications", eh).ok(),
            Some(AmqpNode::FileNotifications)
        );
        let partition = AmqpNode::EventHubPartition {
            event_hub: "meridian".into(),
            consumer_group: "$Default".into(),
            partition: 3,
        };
        // pyamqp (absolute URL) and rhea 3 (relative path).
        for a in [
            "amqps://localhost/meridian/ConsumerGroups/$Default/Partitions/3",
            "meridian/ConsumerGroups/$Default/Partitions/3",
        ] {
            assert_eq!(AmqpNode::parse(a, eh).ok(), Some(partition.clone()), "{a}");
        }
        assert_eq!(
            AmqpNode::parse("$management", eh).ok(),
            Some(AmqpNode::Management)
        );
        assert_eq!(
            AmqpNode::parse(
                "amqps://h/messages/events/ConsumerGroups/$Default/Partitions/0",
                eh
            )
            .ok(),
            Some(AmqpNode::IotHubEvents {
                rest: "/ConsumerGroups/$Default/Partitions/0".into()
            })
        );
        assert!(AmqpNode::parse("other/ConsumerGroups/$Default/Partitions/0", eh).is_err());
        assert!(AmqpNode::parse("meridian/ConsumerGroups/$Default/Partitions/x", eh).is_err());
    }

    #[test]
    fn device_links_resolve() {
        let d = |a: &str| AmqpNode::parse(a, "eh").ok();
        assert_eq!(
            d("/devices/d1/messages/events"),
            Some(AmqpNode::Device {
                device_id: "d1".into(),
                module_id: None,
                link: DeviceLink::Telemetry
            })
        );
        assert_eq!(
            d("amqps://h/devices/d1/modules/m%231/twin"),
            Some(AmqpNode::Device {
                device_id: "d1".into(),
                module_id: Some("m#1".into()),
                link: DeviceLink::Twin
            })
        );
        assert!(matches!(
            d("/devices/d1/methods/deviceBound"),
            Some(AmqpNode::Device {
                link: DeviceLink::Methods,
                ..
            })
        ));
        assert!(matches!(
            d("/devices/d1/messages/devicebound"),
            Some(AmqpNode::Device {
                link: DeviceLink::CloudToDevice,
                ..
            })
        ));
        assert!(d("/devices/d1/other").is_none());
        assert_eq!(
            d("/devices/d1/twin").and_then(|n| n.resource("eh")),
            Some(vec!["devices".to_string(), "d1".to_string()])
        );
    }

    #[test]
    fn selectors_of_both_sdks_parse() {
        let p = |s: &str| parse_selector(s).ok();
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '-1'"),
            Some(EventPosition::At(0))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '@latest'"),
            Some(EventPosition::Latest)
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '41'"),
            Some(EventPosition::At(42))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset >= '41'"),
            Some(EventPosition::At(41))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number > '9'"),
            Some(EventPosition::At(10))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueued-time > '1700000000000'"),
            Some(EventPosition::EnqueuedAtOrAfter(1_700_000_000_001))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueued-time >= '1700000000000'"),
            Some(EventPosition::EnqueuedAtOrAfter(1_700_000_000_000))
        );
        for bad in [
            "",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset > 1",
            "amqp.annotation.x-opt-owner > '1'",
            "amqp.annotation.x-opt-offset > 'abc'",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_are_what_a_token_scope_must_cover() {
        assert_eq!(AmqpNode::Cbs.resource("eh"), None);
        assert_eq!(
            AmqpNode::Management.resource("eh"),
            Some(vec!["eh".into(), "$management".into()])
        );
        assert_eq!(
            AmqpNode::Feedback.resource("eh"),
            Some(vec![
                "messages".into(),
                "servicebound".into(),
                "feedback".into()
            ])
        );
    }
}
