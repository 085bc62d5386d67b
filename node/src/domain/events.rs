//! Events derived from applied commands, for the parts of a node that act on state changes (the
//! MQTT front-end pushes desired patches, delivers C2D messages, drops disabled devices). Every
//! replica derives the same events; each node acts only for the connections it holds.

use serde_json::{Map, Value};

use super::command::{HubCommand, HubResponse};
use super::ids::{DeviceId, ModuleId};
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
}

fn with_version(mut patch: Map<String, Value>, version: u64) -> Value {
    patch.insert("$version".into(), Value::from(version));
    Value::Object(patch)
}

/// The events of one successfully applied command, read from the state after it.
pub fn events_after(
    state: &HubState,
    command: &HubCommand,
    response: &HubResponse,
) -> Vec<HubEvent> {
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
