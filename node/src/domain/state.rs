//! The replicated hub state and the one function that changes it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::c2d::{
    C2dQueue, FeedbackRecord, FeedbackStatus, MAX_DELIVERY_COUNT, MAX_QUEUE_DEPTH, feedback_for,
};
use super::command::{HubCommand, HubResponse, IfMatch};
use super::error::{HubError, HubResult};
use super::ids::{DeviceId, ModuleId};
use super::policy::SharedAccessPolicy;
use super::registry::{
    Authentication, ConnectionState, Device, DeviceSpec, DeviceStatus, GeneratedKeys,
    IdentityRecord, MAX_STATUS_REASON, Module, ModuleSpec,
};
use super::twin::{TwinLimits, TwinState};
use meridian_proto::ErrorCode;

/// Hub-wide settings, fixed at hub creation and replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubSettings {
    /// Shared access policies by name.
    pub policies: BTreeMap<String, SharedAccessPolicy>,
    /// Twin document limits.
    pub twin_limits: TwinLimits,
    /// Most devices the registry holds (Azure: 1,000,000).
    pub max_devices: u64,
    /// Most modules per device (Azure: 20).
    pub max_modules_per_device: usize,
    /// Routing and consumer-group limits.
    #[serde(default)]
    pub routing_limits: super::routing::RoutingLimits,
    /// The voters (id → gRPC address) the hub was created with. Telemetry partition groups are
    /// initialized over exactly these, once, by each partition's preferred node; a node that
    /// joins later is never among them, so it never initializes a second group.
    #[serde(default)]
    pub initial_members: BTreeMap<u64, String>,
    /// Key of the operator credential (`SharedAccessKeyName=meridian-operator`) that the
    /// control-plane API requires; hub policies, iothubowner included, cannot manage the cluster.
    #[serde(default)]
    pub operator_key: String,
    /// When the hub was created (Unix ms; 0 for hubs created before this was recorded).
    #[serde(default)]
    pub created_ms: u64,
}

/// A device with its twin and modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Registry identity.
    pub device: Device,
    /// Device twin.
    pub twin: TwinState,
    /// Modules by id.
    pub modules: BTreeMap<ModuleId, ModuleEntry>,
    /// Cloud-to-device queue.
    #[serde(default)]
    pub c2d: C2dQueue,
}

/// A module with its twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleEntry {
    /// Registry identity.
    pub module: Module,
    /// Module twin.
    pub twin: TwinState,
}

/// Registry statistics (`GET /statistics/devices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatistics {
    /// All devices.
    pub total_device_count: u64,
    /// Enabled devices.
    pub enabled_device_count: u64,
    /// Disabled devices.
    pub disabled_device_count: u64,
}

/// Everything the hub's Raft group replicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubState {
    /// None until `InitHub` is applied.
    pub settings: Option<HubSettings>,
    /// Devices by id.
    pub devices: BTreeMap<DeviceId, DeviceEntry>,
    /// Source of registry ETags, generation ids and C2D lock tokens; increases on every write
    /// that needs a new one.
    pub sequence: u64,
    /// Persistent MQTT sessions: subscriptions by client id.
    #[serde(default)]
    pub sessions: BTreeMap<String, Vec<(String, u8)>>,
    /// Feedback records waiting for the service.
    #[serde(default)]
    pub feedback: VecDeque<FeedbackRecord>,
    /// Feedback handed to a receiver, by lock token: (lock expiry in Unix ms, records).
    #[serde(default)]
    pub feedback_locks: BTreeMap<String, (u64, Vec<FeedbackRecord>)>,
    /// CA certificates for devices with `certificateAuthority` authentication, by name.
    #[serde(default)]
    pub certificates: BTreeMap<String, CaCertificate>,
    /// Consumer groups of the built-in events stream: name → partition → last processed offset.
    #[serde(default = "default_consumer_groups")]
    pub consumer_groups: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Routes, custom endpoints and the fallback route.
    #[serde(default)]
    pub routing: super::routing::RoutingConfig,
    /// Nodes being drained (control plane).
    #[serde(default)]
    pub draining: BTreeSet<u64>,
    /// This region's fencing epoch and copy position (geo-paired hubs; region-local, never copied).
    #[serde(default)]
    pub region: super::region::RegionRecord,
    /// Index of the last applied hub log entry (so a copy of the state names its position).
    #[serde(default)]
    pub applied_index: u64,
}

impl Default for HubState {
    fn default() -> Self {
        Self {
            settings: None,
            devices: BTreeMap::new(),
            sequence: 0,
            sessions: BTreeMap::new(),
            feedback: VecDeque::new(),
            feedback_locks: BTreeMap::new(),
            certificates: BTreeMap::new(),
            consumer_groups: default_consumer_groups(),
            routing: Default::default(),
            draining: BTreeSet::new(),
            region: Default::default(),
            applied_index: 0,
        }
    }
}

/// The consumer group every hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

fn default_consumer_groups() -> BTreeMap<String, BTreeMap<u32, u64>> {
    BTreeMap::from([(DEFAULT_CONSUMER_GROUP.to_string(), BTreeMap::new())])
}

/// Consumer group names: 1 to 50 characters of letters, digits, `-`, `.`, `_` and a leading `$`
/// only for `$Default`.
fn validate_consumer_group(name: &str) -> HubResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 50
        && (name == DEFAULT_CONSUMER_GROUP
            || name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')));
    if ok {
        Ok(())
    } else {
        Err(HubError::invalid(format!(
            "consumer group name {name:?} must be 1 to 50 letters, digits, '-', '.' or '_'"
        )))
    }
}

/// A CA certificate registered with the hub (Azure's "certificates" of a hub).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// Name it is registered under.
    pub name: String,
    /// The certificate, PEM.
    pub certificate: String,
    /// Upper-case hex SHA-256 of its DER.
    pub thumbprint: String,
    /// Only verified certificates (proof of possession done) authenticate devices.
    pub is_verified: bool,
}

/// The policy every hub has and keeps, with every permission.
pub const OWNER_POLICY: &str = "iothubowner";

/// Policy names: 1 to 64 ASCII letters, digits, `-`, `.` and `_`.
fn validate_policy_name(name: &str) -> HubResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(HubError::invalid(format!(
            "policy name {name:?} must be 1 to 64 ASCII letters, digits, '-', '.' or '_'"
        )));
    }
    Ok(())
}

/// Base of generation ids, so they look like Azure's (a .NET tick count in 2017).
const GENERATION_BASE: u64 = 636_510_460_778_278_549;

impl HubState {
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    fn registry_etag(seq: u64) -> String {
        // Azure's registry ETags are base64 of a decimal counter ("MQ==" is 1).
        base64::engine::general_purpose::STANDARD.encode(seq.to_string())
    }

    fn settings_mut(&mut self) -> HubResult<&mut HubSettings> {
        self.settings.as_mut().ok_or_else(|| {
            HubError::new(
                ErrorCode::ServiceUnavailable,
                "the hub is not initialized yet",
            )
        })
    }

    fn settings(&self) -> HubResult<&HubSettings> {
        self.settings.as_ref().ok_or_else(|| {
            HubError::new(
                ErrorCode::ServiceUnavailable,
                "the hub is not initialized yet",
            )
        })
    }

    /// Removes a delivered C2D message the device completed or rejected, with its feedback.
    fn settle_c2d(
        &mut self,
        device_id: &DeviceId,
        lock_token: &str,
        now: &str,
        outcome: FeedbackStatus,
    ) -> HubResult<HubResponse> {
        let entry = self
            .devices
            .get_mut(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        let generation = entry.device.identity.generation_id.clone();
        let done = entry.c2d.take(lock_token).ok_or_else(|| {
            HubError::new(
                ErrorCode::DeviceMessageLockLost,
                format!("no message with lock token {lock_token} for device {device_id}"),
            )
        })?;
        entry.device.identity.cloud_to_device_message_count = entry.c2d.messages.len() as u64;
        entry.device.identity.last_activity_time = now.to_string();
        self.feedback.extend(feedback_for(
            &done,
            outcome,
            device_id.as_str(),
            &generation,
            now,
        ));
        Ok(HubResponse::Applied)
    }

    /// Applies a command. On error the state is unchanged.
    pub fn apply(&mut self, command: HubCommand) -> HubResult<HubResponse> {
        match command {
            HubCommand::InitHub { settings } => {
                let created = self.settings.is_none();
                if created {
                    self.settings = Some(settings);
                }
                Ok(HubResponse::Initialized { created })
            }
            HubCommand::PutDevice {
                device_id,
                spec,
                if_match,
                now,
                keys,
            } => self.put_device(device_id, spec, if_match, &now, &keys),
            HubCommand::DeleteDevice {
                device_id,
                if_match,
            } => {
                let entry = self
                    .devices
                    .get(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                if !if_match.matches(&entry.device.identity.etag) {
                    return Err(HubError::precondition_failed(&entry.device.identity.etag));
                }
                self.devices.remove(&device_id);
                self.next_sequence();
                Ok(HubResponse::Deleted)
            }
            HubCommand::PutModule {
                device_id,
                module_id,
                spec,
                if_match,
                now,
                keys,
            } => self.put_module(device_id, module_id, spec, if_match, &now, &keys),
            HubCommand::DeleteModule {
                device_id,
                module_id,
                if_match,
            } => {
                let entry = self
                    .devices
                    .get_mut(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                let module = entry.modules.get(&module_id).ok_or_else(|| {
                    HubError::module_not_found(device_id.as_str(), module_id.as_str())
                })?;
                if !if_match.matches(&module.module.identity.etag) {
                    return Err(HubError::precondition_failed(&module.module.identity.etag));
                }
                entry.modules.remove(&module_id);
                self.next_sequence();
                Ok(HubResponse::Deleted)
            }
            HubCommand::UpdateTwin {
                device_id,
                module_id,
                patch,
                if_match,
                now,
            } => self.write_twin(&device_id, module_id.as_ref(), &if_match, |twin, limits| {
                twin.apply_patch(&patch, limits, &now)
            }),
            HubCommand::ReplaceTwin {
                device_id,
                module_id,
                replacement,
                if_match,
                now,
            } => self.write_twin(&device_id, module_id.as_ref(), &if_match, |twin, limits| {
                twin.replace(&replacement, limits, &now)
            }),
            HubCommand::PutPolicy {
                key_name,
                rights,
                primary_key,
                secondary_key,
                keys,
            } => {
                validate_policy_name(&key_name)?;
                if rights.is_empty() {
                    return Err(HubError::invalid("a policy needs at least one permission"));
                }
                let pick = |given: String, generated: &String| {
                    if given.is_empty() {
                        generated.clone()
                    } else {
                        given
                    }
                };
                let policy = SharedAccessPolicy {
                    key_name: key_name.clone(),
                    primary_key: pick(primary_key, &keys.primary),
                    secondary_key: pick(secondary_key, &keys.secondary),
                    rights,
                };
                for k in [&policy.primary_key, &policy.secondary_key] {
                    super::registry::validate_key(k)?;
                }
                let settings = self.settings_mut()?;
                if key_name == OWNER_POLICY && policy.rights.len() < 4 {
                    return Err(HubError::invalid(
                        "iothubowner must keep all four permissions",
                    ));
                }
                settings.policies.insert(key_name, policy.clone());
                Ok(HubResponse::Policy(policy))
            }
            HubCommand::DeletePolicy { key_name } => {
                if key_name == OWNER_POLICY {
                    return Err(HubError::invalid("iothubowner cannot be deleted"));
                }
                let settings = self.settings_mut()?;
                settings.policies.remove(&key_name).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::ResourceNotFound,
                        format!("no shared access policy named {key_name}"),
                    )
                })?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::SetConnectionState {
                device_id,
                module_id,
                connected,
                node_id,
                now,
            } => {
                let entry = self
                    .devices
                    .get_mut(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                let identity = match &module_id {
                    None => &mut entry.device.identity,
                    Some(m) => {
                        &mut entry
                            .modules
                            .get_mut(m)
                            .ok_or_else(|| {
                                HubError::module_not_found(device_id.as_str(), m.as_str())
                            })?
                            .module
                            .identity
                    }
                };
                if !connected
                    && node_id.is_some()
                    && identity.connected_node.is_some()
                    && identity.connected_node != node_id
                {
                    // A stale disconnect: another node holds the device now.
                    return Ok(HubResponse::Applied);
                }
                identity.connected_node = if connected { node_id } else { None };
                let state = if connected {
                    ConnectionState::Connected
                } else {
                    ConnectionState::Disconnected
                };
                if identity.connection_state != state {
                    identity.connection_state = state;
                    identity.connection_state_updated_time = now.clone();
                }
                identity.last_activity_time = now;
                Ok(HubResponse::Applied)
            }
            HubCommand::SetSession {
                client_id,
                subscriptions,
            } => {
                let existed = self.sessions.insert(client_id, subscriptions).is_some();
                Ok(HubResponse::Session { existed })
            }
            HubCommand::ClearSession { client_id, node_id } => {
                if node_id.is_some()
                    && self
                        .connected_node(&client_id)
                        .is_some_and(|n| Some(n) != node_id)
                {
                    return Ok(HubResponse::Session {
                        existed: self.sessions.contains_key(&client_id),
                    });
                }
                let existed = self.sessions.remove(&client_id).is_some();
                Ok(HubResponse::Session { existed })
            }
            HubCommand::SendC2d {
                device_id,
                mut message,
            } => {
                let depth = self
                    .devices
                    .get(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?
                    .c2d
                    .messages
                    .len();
                if depth >= MAX_QUEUE_DEPTH {
                    return Err(HubError::new(
                        ErrorCode::DeviceMaximumQueueDepthExceeded,
                        format!(
                            "device {device_id} already has {MAX_QUEUE_DEPTH} messages waiting"
                        ),
                    ));
                }
                let lock_token = self.next_sequence().to_string();
                message.lock_token = lock_token.clone();
                message.delivery_count = 0;
                let entry = self
                    .devices
                    .get_mut(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                entry.c2d.messages.push_back(message);
                entry.device.identity.cloud_to_device_message_count =
                    entry.c2d.messages.len() as u64;
                Ok(HubResponse::C2dEnqueued { lock_token })
            }
            HubCommand::C2dDelivered {
                device_id,
                lock_token,
                now,
            } => {
                let entry = self
                    .devices
                    .get_mut(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                let Some(message) = entry
                    .c2d
                    .messages
                    .iter_mut()
                    .find(|m| m.lock_token == lock_token)
                else {
                    return Ok(HubResponse::Applied);
                };
                message.delivery_count += 1;
                if message.delivery_count > MAX_DELIVERY_COUNT {
                    let generation = entry.device.identity.generation_id.clone();
                    if let Some(dead) = entry.c2d.take(&lock_token) {
                        entry.device.identity.cloud_to_device_message_count =
                            entry.c2d.messages.len() as u64;
                        self.feedback.extend(feedback_for(
                            &dead,
                            FeedbackStatus::DeliveryCountExceeded,
                            device_id.as_str(),
                            &generation,
                            &now,
                        ));
                    }
                }
                Ok(HubResponse::Applied)
            }
            HubCommand::CompleteC2d {
                device_id,
                lock_token,
                now,
            } => self.settle_c2d(&device_id, &lock_token, &now, FeedbackStatus::Success),
            HubCommand::RejectC2d {
                device_id,
                lock_token,
                now,
            } => self.settle_c2d(&device_id, &lock_token, &now, FeedbackStatus::Rejected),
            HubCommand::ExpireC2d { now_ms, now } => {
                let mut count = 0;
                for (id, entry) in self.devices.iter_mut() {
                    let expired = entry.c2d.take_expired(now_ms);
                    count += expired.len();
                    entry.device.identity.cloud_to_device_message_count =
                        entry.c2d.messages.len() as u64;
                    let generation = &entry.device.identity.generation_id;
                    for m in &expired {
                        self.feedback.extend(feedback_for(
                            m,
                            FeedbackStatus::Expired,
                            id.as_str(),
                            generation,
                            &now,
                        ));
                    }
                }
                Ok(HubResponse::Purged { count })
            }
            HubCommand::PurgeC2d { device_id, now } => {
                let entry = self
                    .devices
                    .get_mut(&device_id)
                    .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
                let generation = entry.device.identity.generation_id.clone();
                let purged: Vec<_> = entry.c2d.messages.drain(..).collect();
                entry.device.identity.cloud_to_device_message_count = 0;
                for m in &purged {
                    self.feedback.extend(feedback_for(
                        m,
                        FeedbackStatus::Purged,
                        device_id.as_str(),
                        &generation,
                        &now,
                    ));
                }
                Ok(HubResponse::Purged {
                    count: purged.len(),
                })
            }
            HubCommand::LockFeedback {
                lock_token,
                now_ms,
                lock_ms,
            } => {
                // Locks that ran out return their records to the front of the queue first.
                let expired: Vec<String> = self
                    .feedback_locks
                    .iter()
                    .filter(|(_, (until, _))| *until <= now_ms)
                    .map(|(t, _)| t.clone())
                    .collect();
                for t in expired {
                    if let Some((_, records)) = self.feedback_locks.remove(&t) {
                        for r in records.into_iter().rev() {
                            self.feedback.push_front(r);
                        }
                    }
                }
                let records: Vec<FeedbackRecord> = self.feedback.drain(..).collect();
                if !records.is_empty() {
                    self.feedback_locks
                        .insert(lock_token.clone(), (now_ms + lock_ms, records.clone()));
                }
                Ok(HubResponse::Feedback {
                    lock_token,
                    records,
                })
            }
            HubCommand::CompleteFeedback { lock_token } => {
                self.feedback_locks.remove(&lock_token).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::DeviceMessageLockLost,
                        format!("no feedback locked with {lock_token}"),
                    )
                })?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::AbandonFeedback { lock_token } => {
                let (_, records) = self.feedback_locks.remove(&lock_token).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::DeviceMessageLockLost,
                        format!("no feedback locked with {lock_token}"),
                    )
                })?;
                for r in records.into_iter().rev() {
                    self.feedback.push_front(r);
                }
                Ok(HubResponse::Applied)
            }
            HubCommand::PutCertificate { certificate } => {
                validate_policy_name(&certificate.name)?;
                self.certificates
                    .insert(certificate.name.clone(), certificate.clone());
                Ok(HubResponse::Certificate(certificate))
            }
            HubCommand::DeleteCertificate { name } => {
                self.certificates.remove(&name).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::ResourceNotFound,
                        format!("no certificate named {name}"),
                    )
                })?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::PutRoute { route } => {
                let limits = self.settings()?.routing_limits.clone();
                Ok(HubResponse::Route(self.routing.put_route(route, &limits)?))
            }
            HubCommand::DeleteRoute { name } => {
                self.routing.delete_route(&name)?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::PutEndpoint { endpoint } => {
                let limits = self.settings()?.routing_limits.clone();
                Ok(HubResponse::Endpoint(
                    self.routing.put_endpoint(endpoint, &limits)?,
                ))
            }
            HubCommand::DeleteEndpoint { name } => {
                self.routing.delete_endpoint(&name)?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::PutEnrichment { enrichment } => {
                let limits = self.settings()?.routing_limits.clone();
                Ok(HubResponse::Enrichment(
                    self.routing.put_enrichment(enrichment, &limits)?,
                ))
            }
            HubCommand::DeleteEnrichment { key } => {
                self.routing.delete_enrichment(&key)?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::SetNodeDraining { node_id, draining } => {
                if draining {
                    self.draining.insert(node_id);
                } else {
                    self.draining.remove(&node_id);
                }
                Ok(HubResponse::Applied)
            }
            HubCommand::SetFallbackRoute { enabled } => {
                self.routing.fallback_enabled = enabled;
                Ok(HubResponse::Applied)
            }
            HubCommand::CreateConsumerGroup { name } => {
                validate_consumer_group(&name)?;
                if self.consumer_groups.contains_key(&name) {
                    return Err(HubError::new(
                        ErrorCode::ConsumerGroupAlreadyExists,
                        format!("consumer group {name} already exists"),
                    ));
                }
                let max = self.settings()?.routing_limits.max_consumer_groups;
                if self.consumer_groups.len() >= max {
                    return Err(HubError::new(
                        ErrorCode::IotHubQuotaExceeded,
                        format!("the hub already has {max} consumer groups"),
                    ));
                }
                self.consumer_groups.insert(name, BTreeMap::new());
                Ok(HubResponse::Applied)
            }
            HubCommand::DeleteConsumerGroup { name } => {
                if name == DEFAULT_CONSUMER_GROUP {
                    return Err(HubError::invalid("$Default cannot be deleted"));
                }
                self.consumer_groups.remove(&name).ok_or_else(|| {
                    HubError::new(
                        ErrorCode::ResourceNotFound,
                        format!("no consumer group named {name}"),
                    )
                })?;
                Ok(HubResponse::Deleted)
            }
            HubCommand::Checkpoint {
                consumer_group,
                partition,
                offset,
            } => {
                let group = self
                    .consumer_groups
                    .get_mut(&consumer_group)
                    .ok_or_else(|| {
                        HubError::new(
                            ErrorCode::ResourceNotFound,
                            format!("no consumer group named {consumer_group}"),
                        )
                    })?;
                // Checkpoints only move forward: a slow, stale reader cannot rewind a group.
                let current = group.entry(partition).or_insert(offset);
                *current = (*current).max(offset);
                Ok(HubResponse::Applied)
            }
            HubCommand::UpdateReported {
                device_id,
                module_id,
                patch,
                now,
            } => {
                let limits = self.settings()?.twin_limits.clone();
                let twin = self.twin_mut(&device_id, module_id.as_ref())?;
                let version = twin.apply_reported(&patch, &limits, &now)?;
                Ok(HubResponse::ReportedVersion(version))
            }
            HubCommand::SetRegionEpoch {
                epoch,
                kind,
                at_unix_secs,
                reset_shipping,
                promoted_ends,
            } => {
                self.region
                    .set_epoch(epoch, &kind, at_unix_secs, reset_shipping, promoted_ends)?;
                Ok(HubResponse::Applied)
            }
            HubCommand::ApplyShipped {
                entries,
                through_index,
                local_members,
            } => {
                let mut copied = self.region.shipped_index;
                for (index, command) in entries {
                    if copied.is_some_and(|c| index <= c) {
                        continue;
                    }
                    copied = Some(index);
                    let Some(command) = command else { continue };
                    if !super::region::shipped_applies(&command) {
                        continue;
                    }
                    let command = match command {
                        HubCommand::InitHub { mut settings } => {
                            settings.initial_members = local_members.clone();
                            HubCommand::InitHub { settings }
                        }
                        other => other,
                    };
                    // The source answered this command already; a refusal there is one here too.
                    let _ = self.apply(command);
                }
                if copied.is_none_or(|c| c < through_index) {
                    copied = Some(through_index);
                }
                self.region.shipped_index = copied;
                Ok(HubResponse::Applied)
            }
            HubCommand::InstallShippedState {
                state,
                index,
                local_members,
            } => {
                let mut state = *state;
                state.region = std::mem::take(&mut self.region);
                // Complete only once the devices are in (an empty `ApplyShipped` through `index`).
                let _ = index;
                state.region.shipped_index = None;
                state.draining = std::mem::take(&mut self.draining);
                state.applied_index = self.applied_index;
                if let Some(settings) = state.settings.as_mut() {
                    settings.initial_members = local_members;
                }
                *self = state;
                Ok(HubResponse::Applied)
            }
            HubCommand::InstallShippedDevices { devices } => {
                self.devices.extend(devices);
                Ok(HubResponse::Applied)
            }
        }
    }

    fn put_device(
        &mut self,
        device_id: DeviceId,
        spec: DeviceSpec,
        if_match: IfMatch,
        now: &str,
        keys: &GeneratedKeys,
    ) -> HubResult<HubResponse> {
        let max_devices = self.settings()?.max_devices;
        if let Some(body_id) = &spec.device_id
            && body_id != device_id.as_str()
        {
            return Err(HubError::invalid(format!(
                "deviceId {body_id:?} in the body does not match {device_id:?} in the path"
            )));
        }
        let status = match &spec.status {
            Some(s) => DeviceStatus::parse(s)?,
            None => DeviceStatus::Enabled,
        };
        if spec
            .status_reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_STATUS_REASON)
        {
            return Err(HubError::invalid(format!(
                "statusReason is longer than {MAX_STATUS_REASON} characters"
            )));
        }
        let existing = self.devices.get(&device_id);
        match (existing, &if_match) {
            (Some(_), IfMatch::Absent) => {
                return Err(HubError::new(
                    ErrorCode::DeviceAlreadyExists,
                    format!("a device with id {device_id} already exists"),
                ));
            }
            (Some(entry), m) if !m.matches(&entry.device.identity.etag) => {
                return Err(HubError::precondition_failed(&entry.device.identity.etag));
            }
            (None, IfMatch::Etag(_)) => return Err(HubError::device_not_found(device_id.as_str())),
            (None, _) if self.devices.len() as u64 >= max_devices => {
                return Err(HubError::new(
                    ErrorCode::IotHubQuotaExceeded,
                    format!("the hub holds its maximum of {max_devices} devices"),
                ));
            }
            _ => {}
        }
        let auth = spec
            .authentication
            .clone()
            .unwrap_or_default()
            .normalize(keys, existing.map(|e| &e.device.identity.authentication))?;
        let seq = self.next_sequence();
        let etag = Self::registry_etag(seq);
        let entry = match self.devices.get_mut(&device_id) {
            Some(entry) => {
                let device = &mut entry.device;
                if device.status != status {
                    device.status_updated_time = now.to_string();
                }
                device.status = status;
                device.status_reason = spec.status_reason;
                device.identity.authentication = auth;
                device.identity.etag = etag;
                if let Some(c) = spec.capabilities {
                    device.capabilities = c;
                }
                if spec.device_scope.is_some() {
                    device.device_scope = spec.device_scope;
                }
                if let Some(p) = spec.parent_scopes {
                    device.parent_scopes = p;
                }
                entry
            }
            None => {
                let generation = (GENERATION_BASE + seq).to_string();
                let device = Device {
                    identity: IdentityRecord::new(generation, etag, auth),
                    status,
                    status_reason: spec.status_reason,
                    status_updated_time: now.to_string(),
                    capabilities: spec.capabilities.unwrap_or_default(),
                    device_scope: spec.device_scope,
                    parent_scopes: spec.parent_scopes.unwrap_or_default(),
                };
                self.devices
                    .entry(device_id.clone())
                    .or_insert(DeviceEntry {
                        device,
                        twin: TwinState::default(),
                        modules: BTreeMap::new(),
                        c2d: C2dQueue::default(),
                    })
            }
        };
        Ok(HubResponse::Device(entry.device.render(device_id.as_str())))
    }

    fn put_module(
        &mut self,
        device_id: DeviceId,
        module_id: ModuleId,
        spec: ModuleSpec,
        if_match: IfMatch,
        now: &str,
        keys: &GeneratedKeys,
    ) -> HubResult<HubResponse> {
        let _ = now;
        let max_modules = self.settings()?.max_modules_per_device;
        if spec
            .module_id
            .as_ref()
            .is_some_and(|m| m != module_id.as_str())
            || spec
                .device_id
                .as_ref()
                .is_some_and(|d| d != device_id.as_str())
        {
            return Err(HubError::invalid(
                "deviceId/moduleId in the body do not match the path",
            ));
        }
        let entry = self
            .devices
            .get(&device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        let existing = entry.modules.get(&module_id);
        match (existing, &if_match) {
            (Some(_), IfMatch::Absent) => {
                return Err(HubError::new(
                    ErrorCode::ModuleAlreadyExistsOnDevice,
                    format!("module {module_id} already exists on device {device_id}"),
                ));
            }
            (Some(m), cond) if !cond.matches(&m.module.identity.etag) => {
                return Err(HubError::precondition_failed(&m.module.identity.etag));
            }
            (None, IfMatch::Etag(_)) => {
                return Err(HubError::module_not_found(
                    device_id.as_str(),
                    module_id.as_str(),
                ));
            }
            (None, _) if entry.modules.len() >= max_modules => {
                return Err(HubError::new(
                    ErrorCode::ModuleQuotaExceeded,
                    format!("device {device_id} already has {max_modules} modules"),
                ));
            }
            _ => {}
        }
        let auth: Authentication = spec
            .authentication
            .clone()
            .unwrap_or_default()
            .normalize(keys, existing.map(|m| &m.module.identity.authentication))?;
        let seq = self.next_sequence();
        let etag = Self::registry_etag(seq);
        let entry = self
            .devices
            .get_mut(&device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        let module_entry = entry
            .modules
            .entry(module_id.clone())
            .or_insert_with(|| ModuleEntry {
                module: Module {
                    identity: IdentityRecord::new(
                        (GENERATION_BASE + seq).to_string(),
                        etag.clone(),
                        auth.clone(),
                    ),
                    managed_by: None,
                },
                twin: TwinState::default(),
            });
        module_entry.module.identity.etag = etag;
        module_entry.module.identity.authentication = auth;
        module_entry.module.managed_by = spec.managed_by;
        Ok(HubResponse::Module(
            module_entry
                .module
                .render(device_id.as_str(), module_id.as_str()),
        ))
    }

    /// Checks the twin ETag, runs a service-side twin change, and renders the result.
    fn write_twin(
        &mut self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        if_match: &IfMatch,
        change: impl FnOnce(&mut TwinState, &TwinLimits) -> HubResult<()>,
    ) -> HubResult<HubResponse> {
        let limits = self.settings()?.twin_limits.clone();
        let twin = self.twin_mut(device_id, module_id)?;
        if !if_match.matches(&twin.etag()) {
            return Err(HubError::precondition_failed(&twin.etag()));
        }
        change(twin, &limits)?;
        Ok(HubResponse::Twin(self.render_twin(device_id, module_id)?))
    }

    fn twin_mut(
        &mut self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> HubResult<&mut TwinState> {
        let entry = self
            .devices
            .get_mut(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        match module_id {
            None => Ok(&mut entry.twin),
            Some(m) => entry
                .modules
                .get_mut(m)
                .map(|m| &mut m.twin)
                .ok_or_else(|| HubError::module_not_found(device_id.as_str(), m.as_str())),
        }
    }

    /// The node holding the live connection of `client_id` (`deviceId` or `deviceId/moduleId`).
    pub fn connected_node(&self, client_id: &str) -> Option<u64> {
        let (device, module) = match client_id.split_once('/') {
            Some((d, m)) => (d, Some(m)),
            None => (client_id, None),
        };
        let entry = self.devices.get(&DeviceId::new(device).ok()?)?;
        match module {
            None => entry.device.identity.connected_node,
            Some(m) => {
                entry
                    .modules
                    .get(&ModuleId::new(m).ok()?)?
                    .module
                    .identity
                    .connected_node
            }
        }
    }

    // ---- reads ----

    /// `GET /devices/{id}`.
    pub fn get_device(&self, device_id: &DeviceId) -> HubResult<Value> {
        self.devices
            .get(device_id)
            .map(|e| e.device.render(device_id.as_str()))
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))
    }

    /// The device's registry record, for authentication.
    pub fn device(&self, device_id: &DeviceId) -> Option<&Device> {
        self.devices.get(device_id).map(|e| &e.device)
    }

    /// `GET /devices?top=N`: the first `top` devices by id.
    pub fn list_devices(&self, top: usize) -> Value {
        Value::Array(
            self.devices
                .iter()
                .take(top)
                .map(|(id, e)| e.device.render(id.as_str()))
                .collect(),
        )
    }

    /// `GET /devices/{id}/modules/{mid}`.
    pub fn get_module(&self, device_id: &DeviceId, module_id: &ModuleId) -> HubResult<Value> {
        let entry = self
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        entry
            .modules
            .get(module_id)
            .map(|m| m.module.render(device_id.as_str(), module_id.as_str()))
            .ok_or_else(|| HubError::module_not_found(device_id.as_str(), module_id.as_str()))
    }

    /// `GET /devices/{id}/modules`.
    pub fn list_modules(&self, device_id: &DeviceId) -> HubResult<Value> {
        let entry = self
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        Ok(Value::Array(
            entry
                .modules
                .iter()
                .map(|(mid, m)| m.module.render(device_id.as_str(), mid.as_str()))
                .collect(),
        ))
    }

    /// A device's (or module's) own twin as the device endpoints answer a twin GET:
    /// `{"desired": ..., "reported": ...}`.
    pub fn twin_for_device(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> HubResult<Value> {
        let (entry, module) = self.device_and_module(device_id, module_id)?;
        let twin = module.map_or(&entry.twin, |m| &m.twin);
        Ok(twin.render_for_device())
    }

    /// A device's entry and, when `module_id` is given, that module's: 404 for either missing.
    fn device_and_module(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> HubResult<(&DeviceEntry, Option<&ModuleEntry>)> {
        let entry = self
            .devices
            .get(device_id)
            .ok_or_else(|| HubError::device_not_found(device_id.as_str()))?;
        let module = match module_id {
            None => None,
            Some(m) => Some(
                entry
                    .modules
                    .get(m)
                    .ok_or_else(|| HubError::module_not_found(device_id.as_str(), m.as_str()))?,
            ),
        };
        Ok((entry, module))
    }

    /// `GET /twins/{id}[/modules/{mid}]` in the service shape.
    pub fn render_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> HubResult<Value> {
        let (entry, module) = self.device_and_module(device_id, module_id)?;
        let device = &entry.device;
        let mut out = Map::new();
        out.insert("deviceId".into(), Value::from(device_id.as_str()));
        let (twin, identity) = match (module_id, module) {
            (Some(mid), Some(m)) => {
                out.insert("moduleId".into(), Value::from(mid.as_str()));
                (&m.twin, &m.module.identity)
            }
            _ => (&entry.twin, &device.identity),
        };
        out.insert("etag".into(), Value::from(twin.etag()));
        out.insert("deviceEtag".into(), Value::from(identity.etag.clone()));
        out.insert(
            "status".into(),
            serde_json::to_value(device.status).unwrap_or(Value::Null),
        );
        out.insert(
            "statusReason".into(),
            device
                .status_reason
                .clone()
                .map_or(Value::Null, Value::from),
        );
        out.insert(
            "statusUpdateTime".into(),
            Value::from(device.status_updated_time.clone()),
        );
        out.insert(
            "connectionState".into(),
            serde_json::to_value(identity.connection_state).unwrap_or(Value::Null),
        );
        out.insert(
            "lastActivityTime".into(),
            Value::from(identity.last_activity_time.clone()),
        );
        out.insert(
            "cloudToDeviceMessageCount".into(),
            Value::from(identity.cloud_to_device_message_count),
        );
        out.insert(
            "authenticationType".into(),
            serde_json::to_value(identity.authentication.kind).unwrap_or(Value::Null),
        );
        out.insert(
            "x509Thumbprint".into(),
            serde_json::to_value(&identity.authentication.x509_thumbprint).unwrap_or(Value::Null),
        );
        out.insert("version".into(), Value::from(twin.version));
        out.insert(
            "capabilities".into(),
            serde_json::to_value(device.capabilities).unwrap_or(Value::Null),
        );
        twin.render_sections(&mut out);
        Ok(Value::Object(out))
    }

    /// `GET /statistics/devices`.
    pub fn registry_statistics(&self) -> RegistryStatistics {
        let total = self.devices.len() as u64;
        let enabled = self
            .devices
            .values()
            .filter(|e| e.device.status == DeviceStatus::Enabled)
            .count() as u64;
        RegistryStatistics {
            total_device_count: total,
            enabled_device_count: enabled,
            disabled_device_count: total - enabled,
        }
    }

    /// Devices with a live connection.
    pub fn connected_device_count(&self) -> u64 {
        self.devices
            .values()
            .filter(|e| {
                e.device.identity.connection_state == super::registry::ConnectionState::Connected
            })
            .count() as u64
    }

    /// The policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&SharedAccessPolicy> {
        self.settings.as_ref()?.policies.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::super::twin::TwinPatch;
    use super::*;
    use serde_json::json;

    const NOW: &str = "2026-11-27T12:00:00.000Z";

    fn hub() -> HubState {
        let mut state = HubState::default();
        let keys = std::array::from_fn(|_| {
            (
                super::super::registry::random_key(),
                super::super::registry::random_key(),
            )
        });
        let policies = SharedAccessPolicy::defaults(keys)
            .into_iter()
            .map(|p| (p.key_name.clone(), p))
            .collect();
        let settings = HubSettings {
            initial_members: BTreeMap::new(),
            operator_key: String::new(),
            policies,
            twin_limits: TwinLimits::default(),
            max_devices: 3,
            max_modules_per_device: 2,
            routing_limits: Default::default(),
            created_ms: 0,
        };
        assert_eq!(
            state.apply(HubCommand::InitHub { settings }),
            Ok(HubResponse::Initialized { created: true })
        );
        state
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("valid id")
    }

    fn put(state: &mut HubState, device: &str, if_match: IfMatch) -> HubResult<Value> {
        let spec: DeviceSpec = serde_json::from_value(json!({
            "deviceId": device, "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}},
            "capabilities": {"iotEdge": false}
        }))
        .expect("valid spec");
        match state.apply(HubCommand::PutDevice {
            device_id: id(device),
            spec,
            if_match,
            now: NOW.into(),
            keys: GeneratedKeys::random(),
        })? {
            HubResponse::Device(v) => Ok(v),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_rejected_c2d_message_is_dead_lettered_with_rejected_feedback() {
        let mut state = hub();
        put(&mut state, "d1", IfMatch::Any).expect("device");
        let send = |state: &mut HubState, mid: &str| {
            let message = crate::domain::c2d::C2dSendRequest {
                message_id: Some(mid.into()),
                ack: Some("full".into()),
                ..Default::default()
            }
            .into_message(1_000, String::new)
            .expect("valid");
            state
                .apply(HubCommand::SendC2d {
                    device_id: id("d1"),
                    message,
                })
                .expect("enqueued");
            state.devices[&id("d1")]
                .c2d
                .messages
                .back()
                .map(|m| m.lock_token.clone())
                .unwrap_or_default()
        };
        let rejected = send(&mut state, "m-rejected");
        let completed = send(&mut state, "m-completed");
        for (token, reject) in [(&rejected, true), (&completed, false)] {
            let command = if reject {
                HubCommand::RejectC2d {
                    device_id: id("d1"),
                    lock_token: token.clone(),
                    now: NOW.into(),
                }
            } else {
                HubCommand::CompleteC2d {
                    device_id: id("d1"),
                    lock_token: token.clone(),
                    now: NOW.into(),
                }
            };
            assert_eq!(state.apply(command), Ok(HubResponse::Applied));
        }
        assert!(state.devices[&id("d1")].c2d.messages.is_empty());
        let outcomes: Vec<(String, FeedbackStatus)> = state
            .feedback
            .iter()
            .map(|f| (f.original_message_id.clone(), f.status_code))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("m-rejected".to_string(), FeedbackStatus::Rejected),
                ("m-completed".to_string(), FeedbackStatus::Success)
            ]
        );
        // Settling twice: the lock is gone.
        let again = HubCommand::RejectC2d {
            device_id: id("d1"),
            lock_token: rejected,
            now: NOW.into(),
        };
        assert_eq!(
            state.apply(again).map_err(|e| e.code),
            Err(ErrorCode::DeviceMessageLockLost)
        );
    }

    #[test]
    fn second_init_changes_nothing() {
        let mut state = hub();
        let before = state.clone();
        let settings = before.settings.clone().expect("initialized");
        let mut other = settings.clone();
        other.max_devices = 99;
        assert_eq!(
            state.apply(HubCommand::InitHub { settings: other }),
            Ok(HubResponse::Initialized { created: false })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn create_update_delete_with_etags() {
        let mut state = hub();
        let created = put(&mut state, "d1", IfMatch::Absent).expect("create");
        assert_eq!(created["connectionState"], json!("Disconnected"));
        assert_eq!(created["status"], json!("enabled"));
        let etag = created["etag"].as_str().expect("etag").to_string();
        // duplicate create
        let dup = put(&mut state, "d1", IfMatch::Absent).expect_err("duplicate");
        assert_eq!(dup.code, ErrorCode::DeviceAlreadyExists);
        // update with the right etag keeps keys and changes the etag
        let updated = put(&mut state, "d1", IfMatch::Etag(etag.clone())).expect("update");
        assert_ne!(updated["etag"], created["etag"]);
        assert_eq!(
            updated["authentication"]["symmetricKey"],
            created["authentication"]["symmetricKey"]
        );
        assert_eq!(updated["generationId"], created["generationId"]);
        // stale etag
        let before = state.clone();
        let stale = put(&mut state, "d1", IfMatch::Etag(etag.clone())).expect_err("stale");
        assert_eq!(stale.code, ErrorCode::PreconditionFailed);
        assert_eq!(state, before);
        let stale_delete = state
            .apply(HubCommand::DeleteDevice {
                device_id: id("d1"),
                if_match: IfMatch::Etag(etag),
            })
            .expect_err("stale delete");
        assert_eq!(stale_delete.code, ErrorCode::PreconditionFailed);
        assert_eq!(
            state.apply(HubCommand::DeleteDevice {
                device_id: id("d1"),
                if_match: IfMatch::Any
            }),
            Ok(HubResponse::Deleted)
        );
        assert_eq!(
            state.get_device(&id("d1")).map_err(|e| e.code),
            Err(ErrorCode::DeviceNotFound)
        );
        // re-created device gets a new generation id
        let again = put(&mut state, "d1", IfMatch::Absent).expect("recreate");
        assert_ne!(again["generationId"], created["generationId"]);
    }

    #[test]
    fn quota_is_enforced() {
        let mut state = hub();
        for d in ["a", "b", "c"] {
            put(&mut state, d, IfMatch::Absent).expect("create");
        }
        let err = put(&mut state, "d", IfMatch::Absent).expect_err("quota");
        assert_eq!(err.code, ErrorCode::IotHubQuotaExceeded);
        assert_eq!(state.registry_statistics().total_device_count, 3);
    }

    #[test]
    fn twin_etag_and_modules() {
        let mut state = hub();
        put(&mut state, "d1", IfMatch::Absent).expect("create");
        let twin = state.render_twin(&id("d1"), None).expect("twin");
        let etag = twin["etag"].as_str().expect("etag").to_string();
        let patch = TwinPatch::from_service_body(&json!({"tags": {"a": 1}})).expect("patch");
        state
            .apply(HubCommand::UpdateTwin {
                device_id: id("d1"),
                module_id: None,
                patch: patch.clone(),
                if_match: IfMatch::Etag(etag.clone()),
                now: NOW.into(),
            })
            .expect("update");
        let err = state
            .apply(HubCommand::UpdateTwin {
                device_id: id("d1"),
                module_id: None,
                patch,
                if_match: IfMatch::Etag(etag),
                now: NOW.into(),
            })
            .expect_err("stale");
        assert_eq!(err.code, ErrorCode::PreconditionFailed);

        let m = |s: &str| ModuleId::new(s).expect("valid");
        for mid in ["m1", "m2"] {
            state
                .apply(HubCommand::PutModule {
                    device_id: id("d1"),
                    module_id: m(mid),
                    spec: ModuleSpec::default(),
                    if_match: IfMatch::Absent,
                    now: NOW.into(),
                    keys: GeneratedKeys::random(),
                })
                .expect("module");
        }
        let err = state
            .apply(HubCommand::PutModule {
                device_id: id("d1"),
                module_id: m("m3"),
                spec: ModuleSpec::default(),
                if_match: IfMatch::Absent,
                now: NOW.into(),
                keys: GeneratedKeys::random(),
            })
            .expect_err("module quota");
        assert_eq!(err.code, ErrorCode::ModuleQuotaExceeded);
        let module_twin = state.render_twin(&id("d1"), Some(&m("m1"))).expect("twin");
        assert_eq!(module_twin["moduleId"], json!("m1"));
        let listed = state.list_modules(&id("d1")).expect("list");
        assert_eq!(listed.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn custom_policies() {
        let mut state = hub();
        let put =
            |state: &mut HubState, name: &str, rights: Vec<super::super::policy::Permission>| {
                state.apply(HubCommand::PutPolicy {
                    key_name: name.into(),
                    rights,
                    primary_key: String::new(),
                    secondary_key: String::new(),
                    keys: GeneratedKeys::random(),
                })
            };
        use super::super::policy::Permission::*;
        assert!(matches!(
            put(&mut state, "ops", vec![RegistryRead, ServiceConnect]),
            Ok(HubResponse::Policy(_))
        ));
        assert!(
            state
                .policy("ops")
                .is_some_and(|p| p.grants(ServiceConnect) && !p.grants(RegistryWrite))
        );
        assert!(put(&mut state, "bad name", vec![RegistryRead]).is_err());
        assert!(put(&mut state, "empty", vec![]).is_err());
        assert!(put(&mut state, "iothubowner", vec![RegistryRead]).is_err());
        assert_eq!(
            state.apply(HubCommand::DeletePolicy {
                key_name: "ops".into()
            }),
            Ok(HubResponse::Deleted)
        );
        assert!(state.policy("ops").is_none());
        assert!(
            state
                .apply(HubCommand::DeletePolicy {
                    key_name: "iothubowner".into()
                })
                .is_err()
        );
        assert!(
            state
                .apply(HubCommand::DeletePolicy {
                    key_name: "ops".into()
                })
                .is_err()
        );
    }

    #[test]
    fn consumer_groups_and_monotonic_checkpoints() {
        let mut state = hub();
        assert!(state.consumer_groups.contains_key(DEFAULT_CONSUMER_GROUP));
        let cp = |state: &mut HubState, offset| {
            state.apply(HubCommand::Checkpoint {
                consumer_group: "analytics".into(),
                partition: 1,
                offset,
            })
        };
        assert!(cp(&mut state, 5).is_err(), "unknown group");
        state
            .apply(HubCommand::CreateConsumerGroup {
                name: "analytics".into(),
            })
            .expect("create");
        assert_eq!(
            state
                .apply(HubCommand::CreateConsumerGroup {
                    name: "analytics".into()
                })
                .map_err(|e| e.code),
            Err(ErrorCode::ConsumerGroupAlreadyExists)
        );
        cp(&mut state, 5).expect("checkpoint");
        cp(&mut state, 3).expect("stale checkpoint is ignored");
        assert_eq!(state.consumer_groups["analytics"][&1], 5);
        assert!(
            state
                .apply(HubCommand::DeleteConsumerGroup {
                    name: "$Default".into()
                })
                .is_err()
        );
        assert!(
            state
                .apply(HubCommand::CreateConsumerGroup {
                    name: "bad name".into()
                })
                .is_err()
        );
    }

    #[test]
    fn a_node_that_lost_the_device_changes_neither_state_nor_session() {
        let mut state = hub();
        put(&mut state, "mover", IfMatch::Absent).expect("create");
        let connect = |node: u64, connected: bool| HubCommand::SetConnectionState {
            device_id: id("mover"),
            module_id: None,
            connected,
            node_id: Some(node),
            now: NOW.into(),
        };
        state.apply(connect(1, true)).expect("on node 1");
        state.apply(connect(2, true)).expect("moved to node 2");
        state
            .apply(HubCommand::SetSession {
                client_id: "mover".into(),
                subscriptions: vec![("$iothub/methods/POST/#".into(), 1)],
            })
            .expect("session");
        // node 1 closes its old connection late
        state
            .apply(HubCommand::ClearSession {
                client_id: "mover".into(),
                node_id: Some(1),
            })
            .expect("ignored");
        state.apply(connect(1, false)).expect("ignored");
        assert!(state.sessions.contains_key("mover"));
        assert_eq!(state.connected_node("mover"), Some(2));
        assert_eq!(
            state.get_device(&id("mover")).expect("device")["connectionState"],
            json!("Connected")
        );
        // node 2's own disconnect counts
        state.apply(connect(2, false)).expect("disconnect");
        assert_eq!(state.connected_node("mover"), None);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut state = hub();
        put(&mut state, "d1", IfMatch::Absent).expect("create");
        let bytes = serde_json::to_vec(&state).expect("serialize");
        let back: HubState = serde_json::from_slice(&bytes).expect("deserialize");
        assert_eq!(back, state);
    }
}
