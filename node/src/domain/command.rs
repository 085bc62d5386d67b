//! Commands proposed through Raft and the responses the state machine answers with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ids::{DeviceId, ModuleId};
use super::registry::{DeviceSpec, GeneratedKeys, ModuleSpec};
use super::state::HubSettings;
use super::twin::TwinPatch;

/// An `If-Match` precondition (RFC 7232).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IfMatch {
    /// No header: create-only for PUT, unconditional for others.
    Absent,
    /// `*`: any current version.
    Any,
    /// A specific ETag (without quotes).
    Etag(String),
}

impl IfMatch {
    /// Parses the header value; the SDKs send quoted ETags, some tools unquoted.
    pub fn from_header(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") => IfMatch::Absent,
            Some("*") | Some("\"*\"") => IfMatch::Any,
            Some(v) => {
                let v = v.strip_prefix("W/").unwrap_or(v);
                IfMatch::Etag(v.trim_matches('"').to_string())
            }
        }
    }

    /// Whether the precondition holds for an entity whose current ETag is `current`.
    pub fn matches(&self, current: &str) -> bool {
        match self {
            IfMatch::Absent | IfMatch::Any => true,
            IfMatch::Etag(e) => e == current,
        }
    }
}

/// A change to the hub state. Carries every non-deterministic input (time, generated keys) so all
/// replicas apply it identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HubCommand {
    /// Creates the hub once: policies with their keys and the replicated limits. A second
    /// `InitHub` changes nothing.
    InitHub {
        /// The hub's settings.
        settings: HubSettings,
    },
    /// Creates or updates a device (PUT /devices/{id}).
    PutDevice {
        /// Device id from the path.
        device_id: DeviceId,
        /// Body.
        spec: DeviceSpec,
        /// Precondition.
        if_match: IfMatch,
        /// Proposer's clock, ISO-8601.
        now: String,
        /// Keys to use where the body asks the hub to generate them.
        keys: GeneratedKeys,
    },
    /// Deletes a device, its modules and twins.
    DeleteDevice {
        /// Device id.
        device_id: DeviceId,
        /// Precondition.
        if_match: IfMatch,
    },
    /// Creates or updates a module.
    PutModule {
        /// Device id.
        device_id: DeviceId,
        /// Module id.
        module_id: ModuleId,
        /// Body.
        spec: ModuleSpec,
        /// Precondition.
        if_match: IfMatch,
        /// Proposer's clock.
        now: String,
        /// Keys for generation.
        keys: GeneratedKeys,
    },
    /// Deletes a module.
    DeleteModule {
        /// Device id.
        device_id: DeviceId,
        /// Module id.
        module_id: ModuleId,
        /// Precondition.
        if_match: IfMatch,
    },
    /// Merges a service patch into a twin (PATCH /twins/{id}).
    UpdateTwin {
        /// Device id.
        device_id: DeviceId,
        /// Module id for a module twin.
        module_id: Option<ModuleId>,
        /// Tags and desired patch.
        patch: TwinPatch,
        /// Precondition on the twin ETag.
        if_match: IfMatch,
        /// Proposer's clock.
        now: String,
    },
    /// Replaces tags and desired properties (PUT /twins/{id}).
    ReplaceTwin {
        /// Device id.
        device_id: DeviceId,
        /// Module id for a module twin.
        module_id: Option<ModuleId>,
        /// New tags and desired properties.
        replacement: TwinPatch,
        /// Precondition on the twin ETag.
        if_match: IfMatch,
        /// Proposer's clock.
        now: String,
    },
    /// Creates or replaces a shared access policy (operator API).
    PutPolicy {
        /// Policy name (`skn`).
        key_name: String,
        /// Permissions.
        rights: Vec<super::policy::Permission>,
        /// Primary key; empty means use `keys.primary`.
        primary_key: String,
        /// Secondary key; empty means use `keys.secondary`.
        secondary_key: String,
        /// Keys chosen by the proposer for generation.
        keys: GeneratedKeys,
    },
    /// Deletes a shared access policy.
    DeletePolicy {
        /// Policy name.
        key_name: String,
    },
    /// Records a device or module connecting or disconnecting.
    SetConnectionState {
        /// Device id.
        device_id: DeviceId,
        /// Module id for a module connection.
        module_id: Option<ModuleId>,
        /// True on connect.
        connected: bool,
        /// The node holding the connection. A disconnect from a node that no longer holds the
        /// device (another node took it over) changes nothing.
        #[serde(default)]
        node_id: Option<u64>,
        /// Proposer's clock, ISO-8601.
        now: String,
    },
    /// Replaces a persistent MQTT session's subscriptions (clean_session = 0).
    SetSession {
        /// MQTT client id (`deviceId` or `deviceId/moduleId`).
        client_id: String,
        /// Topic filters with their granted QoS.
        subscriptions: Vec<(String, u8)>,
    },
    /// Forgets a session (clean_session = 1).
    ClearSession {
        /// MQTT client id.
        client_id: String,
        /// When set, the session is cleared only if this node still holds the device's connection
        /// (a node closing a connection another node took over must not clear the new session).
        #[serde(default)]
        node_id: Option<u64>,
    },
    /// Enqueues a cloud-to-device message.
    SendC2d {
        /// Target device.
        device_id: DeviceId,
        /// The message (lock token and delivery count are assigned by the state machine).
        message: super::c2d::C2dMessage,
    },
    /// Counts a delivery attempt; dead-letters the message past the maximum delivery count.
    C2dDelivered {
        /// Device id.
        device_id: DeviceId,
        /// Lock token.
        lock_token: String,
        /// Proposer's clock, ISO-8601.
        now: String,
    },
    /// Completes a delivered message (MQTT PUBACK).
    CompleteC2d {
        /// Device id.
        device_id: DeviceId,
        /// Lock token.
        lock_token: String,
        /// Proposer's clock, ISO-8601.
        now: String,
    },
    /// Drops every expired message of every queue.
    ExpireC2d {
        /// Proposer's clock, Unix ms.
        now_ms: u64,
        /// The same instant, ISO-8601.
        now: String,
    },
    /// Empties a device's queue (`DELETE /devices/{id}/commands`).
    PurgeC2d {
        /// Device id.
        device_id: DeviceId,
        /// Proposer's clock, ISO-8601.
        now: String,
    },
    /// Locks the pending feedback records for a receiver.
    LockFeedback {
        /// Lock token chosen by the proposer.
        lock_token: String,
        /// Proposer's clock, Unix ms.
        now_ms: u64,
        /// Lock duration.
        lock_ms: u64,
    },
    /// Completes (deletes) locked feedback.
    CompleteFeedback {
        /// Lock token.
        lock_token: String,
    },
    /// Returns locked feedback to the queue.
    AbandonFeedback {
        /// Lock token.
        lock_token: String,
    },
    /// Registers (or replaces) a CA certificate for X.509 CA device authentication.
    PutCertificate {
        /// The certificate, already parsed and checked by the proposer.
        certificate: super::state::CaCertificate,
    },
    /// Removes a CA certificate.
    DeleteCertificate {
        /// Its name.
        name: String,
    },
    /// Adds or replaces a route.
    PutRoute {
        /// The route.
        route: super::routing::Route,
    },
    /// Removes a route.
    DeleteRoute {
        /// Its name.
        name: String,
    },
    /// Adds a custom endpoint (its stream id is assigned by the state machine).
    PutEndpoint {
        /// The endpoint.
        endpoint: super::routing::Endpoint,
    },
    /// Removes a custom endpoint.
    DeleteEndpoint {
        /// Its name.
        name: String,
    },
    /// Adds or replaces a message enrichment.
    PutEnrichment {
        /// The enrichment.
        enrichment: super::routing::Enrichment,
    },
    /// Removes a message enrichment.
    DeleteEnrichment {
        /// Its key.
        key: String,
    },
    /// Marks a node as draining (or not): it takes no device connections and holds no telemetry
    /// partition replicas, so it can be stopped without affecting devices or partitions.
    SetNodeDraining {
        /// The node.
        node_id: u64,
        /// Draining or back in service.
        draining: bool,
    },
    /// Turns the fallback route (unmatched messages → `events`) on or off.
    SetFallbackRoute {
        /// On or off.
        enabled: bool,
    },
    /// Creates a consumer group of the built-in events stream.
    CreateConsumerGroup {
        /// Its name.
        name: String,
    },
    /// Deletes a consumer group and its checkpoints.
    DeleteConsumerGroup {
        /// Its name.
        name: String,
    },
    /// Records that a consumer group has processed a partition up to `offset` (inclusive).
    Checkpoint {
        /// Consumer group.
        consumer_group: String,
        /// Partition.
        partition: u32,
        /// Last processed offset.
        offset: u64,
    },
    /// Moves this region to a newer fencing epoch (region failover, failback, or an epoch heard
    /// from another region). Refused when older than the current one.
    SetRegionEpoch {
        /// The epoch.
        epoch: meridian_failover::RegionEpoch,
        /// `manual`, `forced`, `automatic`, `initial` or `learned`.
        kind: String,
        /// Proposer's clock, Unix seconds (for the failover caps).
        at_unix_secs: u64,
        /// This region stops being primary: its copy of the new primary restarts from a whole state.
        reset_shipping: bool,
        /// This region becomes primary: its partitions' ends at promotion.
        promoted_ends: Option<BTreeMap<u32, BTreeMap<u32, u64>>>,
    },
    /// Applies entries copied from the primary region's hub log (a secondary region's shipper).
    ApplyShipped {
        /// (source index, command) in index order; entries at or below the copied index are skipped.
        entries: Vec<(u64, Option<HubCommand>)>,
        /// The source index the copy reaches with these entries.
        through_index: u64,
        /// This region's initial voters (a copied `InitHub` keeps them, not the source's).
        local_members: BTreeMap<u64, String>,
    },
    /// Replaces the hub with a whole state copied from the primary region (a new secondary, or
    /// one whose place in the source log was purged, or a demoted old primary). Devices follow in
    /// `InstallShippedDevices` chunks; an empty `ApplyShipped` through `index` then marks the copy
    /// complete (until then the copy position is unset, so an interrupted install starts over).
    InstallShippedState {
        /// The source's state.
        state: Box<super::HubState>,
        /// The source index it reflects.
        index: u64,
        /// This region's initial voters.
        local_members: BTreeMap<u64, String>,
    },
    /// Adds devices of a whole state being copied (after `InstallShippedState`, in chunks small
    /// enough for one Raft entry each).
    InstallShippedDevices {
        /// Devices with their twins, modules and C2D queues.
        devices: Vec<(DeviceId, super::state::DeviceEntry)>,
    },
    /// Merges a device's reported-properties patch.
    UpdateReported {
        /// Device id.
        device_id: DeviceId,
        /// Module id for a module twin.
        module_id: Option<ModuleId>,
        /// Merge patch.
        patch: Map<String, Value>,
        /// Proposer's clock.
        now: String,
    },
    /// The device rejected a delivered message (AMQP `rejected`): it is dead-lettered at once,
    /// with `Rejected` feedback when the sender asked for negative acks.
    RejectC2d {
        /// Device id.
        device_id: DeviceId,
        /// Lock token.
        lock_token: String,
        /// Proposer's clock, ISO-8601.
        now: String,
    },
}

impl HubCommand {
    /// The command for a device's reported-properties patch as it arrived (MQTT payload, AMQP
    /// body): it must be a JSON object.
    pub fn reported_patch(
        device_id: DeviceId,
        module_id: Option<ModuleId>,
        body: &[u8],
        now: String,
    ) -> super::HubResult<Self> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(patch)) => Ok(HubCommand::UpdateReported {
                device_id,
                module_id,
                patch,
                now,
            }),
            _ => Err(super::HubError::new(
                meridian_proto::ErrorCode::IotHubFormatError,
                "a reported-properties patch must be a JSON object",
            )),
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            HubCommand::InitHub { .. } => "init_hub",
            HubCommand::PutDevice { .. } => "put_device",
            HubCommand::DeleteDevice { .. } => "delete_device",
            HubCommand::PutModule { .. } => "put_module",
            HubCommand::DeleteModule { .. } => "delete_module",
            HubCommand::UpdateTwin { .. } => "update_twin",
            HubCommand::ReplaceTwin { .. } => "replace_twin",
            HubCommand::UpdateReported { .. } => "update_reported",
            HubCommand::PutPolicy { .. } => "put_policy",
            HubCommand::PutCertificate { .. } => "put_certificate",
            HubCommand::PutRoute { .. } => "put_route",
            HubCommand::DeleteRoute { .. } => "delete_route",
            HubCommand::PutEndpoint { .. } => "put_endpoint",
            HubCommand::DeleteEndpoint { .. } => "delete_endpoint",
            HubCommand::SetFallbackRoute { .. } => "set_fallback_route",
            HubCommand::SetNodeDraining { .. } => "set_node_draining",
            HubCommand::PutEnrichment { .. } => "put_enrichment",
            HubCommand::DeleteEnrichment { .. } => "delete_enrichment",
            HubCommand::CreateConsumerGroup { .. } => "create_consumer_group",
            HubCommand::DeleteConsumerGroup { .. } => "delete_consumer_group",
            HubCommand::Checkpoint { .. } => "checkpoint",
            HubCommand::DeleteCertificate { .. } => "delete_certificate",
            HubCommand::SetConnectionState { .. } => "set_connection_state",
            HubCommand::SetSession { .. } => "set_session",
            HubCommand::ClearSession { .. } => "clear_session",
            HubCommand::SendC2d { .. } => "send_c2d",
            HubCommand::C2dDelivered { .. } => "c2d_delivered",
            HubCommand::CompleteC2d { .. } => "complete_c2d",
            HubCommand::RejectC2d { .. } => "reject_c2d",
            HubCommand::ExpireC2d { .. } => "expire_c2d",
            HubCommand::PurgeC2d { .. } => "purge_c2d",
            HubCommand::LockFeedback { .. } => "lock_feedback",
            HubCommand::CompleteFeedback { .. } => "complete_feedback",
            HubCommand::AbandonFeedback { .. } => "abandon_feedback",
            HubCommand::DeletePolicy { .. } => "delete_policy",
            HubCommand::SetRegionEpoch { .. } => "set_region_epoch",
            HubCommand::ApplyShipped { .. } => "apply_shipped",
            HubCommand::InstallShippedState { .. } => "install_shipped_state",
            HubCommand::InstallShippedDevices { .. } => "install_shipped_devices",
        }
    }
}

/// What a successfully applied command answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HubResponse {
    /// `InitHub`: whether this command created the hub.
    Initialized {
        /// False when the hub already existed.
        created: bool,
    },
    /// A device, rendered in Azure's JSON.
    Device(Value),
    /// A module, rendered.
    Module(Value),
    /// A twin, rendered in the service shape.
    Twin(Value),
    /// The new reported `$version`.
    ReportedVersion(u64),
    /// An enrichment, as stored.
    Enrichment(super::routing::Enrichment),
    /// A route, as stored.
    Route(super::routing::Route),
    /// A custom endpoint, as stored (with its stream id).
    Endpoint(super::routing::Endpoint),
    /// A CA certificate, as stored.
    Certificate(super::state::CaCertificate),
    /// A shared access policy, as stored.
    Policy(super::policy::SharedAccessPolicy),
    /// The entity was deleted.
    Deleted,
    /// The command was applied; nothing to return.
    Applied,
    /// Whether a session existed before (`SetSession`) — MQTT's session-present flag.
    Session {
        /// A session with this client id existed.
        existed: bool,
    },
    /// A C2D message was enqueued under this lock token.
    C2dEnqueued {
        /// Lock token.
        lock_token: String,
    },
    /// Messages removed from a queue.
    Purged {
        /// How many.
        count: usize,
    },
    /// Locked feedback records.
    Feedback {
        /// Lock token to complete or abandon them with.
        lock_token: String,
        /// The records (empty when none are pending).
        records: Vec<super::c2d::FeedbackRecord>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_parsing() {
        assert_eq!(IfMatch::from_header(None), IfMatch::Absent);
        assert_eq!(IfMatch::from_header(Some("\"*\"")), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("*")), IfMatch::Any);
        assert_eq!(
            IfMatch::from_header(Some("\"MQ==\"")),
            IfMatch::Etag("MQ==".into())
        );
        assert_eq!(
            IfMatch::from_header(Some("W/\"MQ==\"")),
            IfMatch::Etag("MQ==".into())
        );
        assert!(IfMatch::Etag("a".into()).matches("a"));
        assert!(!IfMatch::Etag("a".into()).matches("b"));
    }
}
