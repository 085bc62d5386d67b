//! Events derived from applied commands, for the parts of a node that act on state changes (the
//! MQTT front-end pushes desired patches, delivers C2D messages, drops disabled devices). Every
//! replica derives the same events; each node acts only for the connections it holds.

use serde_json::{Map, Value};

use super::command::{HubCommand, HubResponse};
use super::ids::{DeviceId, ModuleId};
use super::routing::RouteSource;
use super::state::HubState;

/// Something a node may need to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum HubEvent {
    /// Desired properties changed; `patch` is what the device receives (with `$version`).
    DesiredPropertiesChanged {
        /// Device id.
        device_id: DeviceId,
        /// Module id for a module twin.
        module_id: Option<ModuleId>,
        /// The patch (or the whole desired document after a replace), with `$version`.
        patch: Value,
    },
    /// A C2D message is waiting.
    C2dEnqueued {
        /// Device id.
        device_id: DeviceId,
    },
    /// A device or module identity changed or was deleted: live connections must re-check it.
    IdentityChanged {
        /// Device id.
        device_id: DeviceId,
    },
    /// A twin-change or lifecycle notification for routes with that source.
    Notification(Notification),
    /// A device or module connected to `node_id`: any other node holding a connection for the
    /// same client id closes it (one live connection per device in the cluster).
    Connected {
        /// `deviceId` or `deviceId/moduleId`.
        client_id: String,
        /// The node that holds the new connection.
        node_id: u64,
    },
}

/// A hub notification in Azure's shape, to be routed like a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// `TwinChangeEvents` or `DeviceLifecycleEvents`.
    pub source: RouteSource,
    /// Device id.
    pub device_id: DeviceId,
    /// Module id for module notifications.
    pub module_id: Option<ModuleId>,
    /// `updateTwin`, `replaceTwin`, `createDeviceIdentity`, `deleteDeviceIdentity`, ...
    pub op_type: &'static str,
    /// `twinChangeNotification` or `deviceLifecycleNotification` / `moduleLifecycleNotification`.
    pub schema: &'static str,
    /// When the operation happened (ISO-8601; empty when the command carries no time).
    pub timestamp: String,
    /// The JSON body.
    pub body: Value,
}

fn with_version(mut patch: Map<String, Value>, version: u64) -> Value {
    patch.insert("$version".into(), Value::from(version));
    Value::Object(patch)
}

fn twin_doc(state: &HubState, device_id: &DeviceId, module_id: Option<&ModuleId>) -> Value {
    state
        .render_twin(device_id, module_id)
        .unwrap_or_else(|_| serde_json::json!({"deviceId": device_id.as_str()}))
}

fn notification(
    source: RouteSource,
    device_id: &DeviceId,
    module_id: Option<&ModuleId>,
    op_type: &'static str,
    timestamp: &str,
    body: Value,
) -> HubEvent {
    let schema = match (source, module_id) {
        (RouteSource::TwinChangeEvents, _) => "twinChangeNotification",
        (_, Some(_)) => "moduleLifecycleNotification",
        _ => "deviceLifecycleNotification",
    };
    HubEvent::Notification(Notification {
        source,
        device_id: device_id.clone(),
        module_id: module_id.cloned(),
        op_type,
        schema,
        timestamp: timestamp.to_string(),
        body,
    })
}

/// Twin-change and lifecycle notifications of one applied command.
fn notifications(state: &HubState, command: &HubCommand, response: &HubResponse) -> Vec<HubEvent> {
    use super::command::IfMatch;
    let twin_version = |d: &DeviceId, m: Option<&ModuleId>| {
        twin_doc(state, d, m)
            .get("version")
            .cloned()
            .unwrap_or(Value::Null)
    };
    match (command, response) {
        (
            HubCommand::UpdateTwin {
                device_id,
                module_id,
                patch,
                now,
                ..
            },
            HubResponse::Twin(twin),
        ) => {
            let mut body = Map::new();
            body.insert("version".into(), twin["version"].clone());
            if let Some(tags) = &patch.tags {
                body.insert("tags".into(), Value::Object(tags.clone()));
            }
            if patch.desired.is_some() {
                body.insert(
                    "properties".into(),
                    serde_json::json!({"desired": twin["properties"]["desired"].clone()}),
                );
            }
            vec![notification(
                RouteSource::TwinChangeEvents,
                device_id,
                module_id.as_ref(),
                "updateTwin",
                now,
                Value::Object(body),
            )]
        }
        (
            HubCommand::ReplaceTwin {
                device_id,
                module_id,
                now,
                ..
            },
            HubResponse::Twin(twin),
        ) => vec![notification(
            RouteSource::TwinChangeEvents,
            device_id,
            module_id.as_ref(),
            "replaceTwin",
            now,
            serde_json::json!({
                "version": twin["version"],
                "tags": twin["tags"],
                "properties": {"desired": twin["properties"]["desired"]},
            }),
        )],
        (
            HubCommand::UpdateReported {
                device_id,
                module_id,
                patch,
                now,
            },
            HubResponse::ReportedVersion(v),
        ) => vec![notification(
            RouteSource::TwinChangeEvents,
            device_id,
            module_id.as_ref(),
            "updateTwin",
            now,
            serde_json::json!({
                "version": twin_version(device_id, module_id.as_ref()),
                "properties": {"reported": with_version(patch.clone(), *v)},
            }),
        )],
        (
            HubCommand::PutDevice {
                device_id,
                if_match: IfMatch::Absent,
                now,
                ..
            },
            HubResponse::Device(_),
        ) => vec![notification(
            RouteSource::DeviceLifecycleEvents,
            device_id,
            None,
            "createDeviceIdentity",
            now,
            twin_doc(state, device_id, None),
        )],
        (HubCommand::DeleteDevice { device_id, .. }, HubResponse::Deleted) => vec![notification(
            RouteSource::DeviceLifecycleEvents,
            device_id,
            None,
            "deleteDeviceIdentity",
            "",
            serde_json::json!({"deviceId": device_id.as_str()}),
        )],
        (
            HubCommand::PutModule {
                device_id,
                module_id,
                if_match: IfMatch::Absent,
                now,
                ..
            },
            HubResponse::Module(_),
        ) => vec![notification(
            RouteSource::DeviceLifecycleEvents,
            device_id,
            Some(module_id),
            "createModuleIdentity",
            now,
            twin_doc(state, device_id, Some(module_id)),
        )],
        (
            HubCommand::DeleteModule {
                device_id,
                module_id,
                ..
            },
            HubResponse::Deleted,
        ) => vec![notification(
            RouteSource::DeviceLifecycleEvents,
            device_id,
            Some(module_id),
            "deleteModuleIdentity",
            "",
            serde_json::json!({"deviceId": device_id.as_str(), "moduleId": module_id.as_str()}),
        )],
        _ => Vec::new(),
    }
}

/// The events of one successfully applied command, read from the state after it.
pub fn events_after(
    state: &HubState,
    command: &HubCommand,
    response: &HubResponse,
) -> Vec<HubEvent> {
    let mut events = push_events(state, command, response);
    // Notifications only matter when a route listens to their source.
    if !state.routing.routes.is_empty() {
        events.extend(notifications(state, command, response));
    }
    events
}

fn push_events(state: &HubState, command: &HubCommand, response: &HubResponse) -> Vec<HubEvent> {
    if let HubCommand::SetConnectionState {
        device_id,
        module_id,
        connected: true,
        node_id: Some(node_id),
        ..
    } = command
    {
        let client_id = match module_id {
            Some(m) => format!("{device_id}/{m}"),
            None => device_id.to_string(),
        };
        return vec![HubEvent::Connected {
            client_id,
            node_id: *node_id,
        }];
    }
    let desired_version = |device_id: &DeviceId, module_id: Option<&ModuleId>| {
        let entry = state.devices.get(device_id)?;
        Some(match module_id {
            None => entry.twin.desired.version,
            Some(m) => entry.modules.get(m)?.twin.desired.version,
        })
    };
    match (command, response) {
        (
            HubCommand::UpdateTwin {
                device_id,
                module_id,
                patch,
                ..
            },
            HubResponse::Twin(_),
        ) => match (
            &patch.desired,
            desired_version(device_id, module_id.as_ref()),
        ) {
            (Some(desired), Some(version)) => vec![HubEvent::DesiredPropertiesChanged {
                device_id: device_id.clone(),
                module_id: module_id.clone(),
                patch: with_version(desired.clone(), version),
            }],
            _ => Vec::new(),
        },
        (
            HubCommand::ReplaceTwin {
                device_id,
                module_id,
                ..
            },
            HubResponse::Twin(_),
        ) => {
            let entry = state.devices.get(device_id);
            let desired = entry.and_then(|e| match module_id {
                None => Some(&e.twin.desired),
                Some(m) => e.modules.get(m).map(|m| &m.twin.desired),
            });
            desired
                .map(|d| HubEvent::DesiredPropertiesChanged {
                    device_id: device_id.clone(),
                    module_id: module_id.clone(),
                    patch: with_version(d.values.clone(), d.version),
                })
                .into_iter()
                .collect()
        }
        (HubCommand::SendC2d { device_id, .. }, HubResponse::C2dEnqueued { .. }) => {
            vec![HubEvent::C2dEnqueued {
                device_id: device_id.clone(),
            }]
        }
        (HubCommand::PutDevice { device_id, .. }, _)
        | (HubCommand::DeleteDevice { device_id, .. }, _)
        | (HubCommand::PutModule { device_id, .. }, _)
        | (HubCommand::DeleteModule { device_id, .. }, _) => vec![HubEvent::IdentityChanged {
            device_id: device_id.clone(),
        }],
        _ => Vec::new(),
    }
}
