//! The Raft transport's server side, and the forwarding service followers call on the leader.
//!
//! Node-to-node only: never expose these services to external clients.

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::HubRaft;
use crate::domain::HubCommand;
use meridian_proto::hub::hub_forward_server::HubForward;
use meridian_proto::hub::{
    ChangeMembershipRequest, ChangeMembershipResponse, ClientWriteRequest, ClientWriteResponse,
    GroupLeaderRequest, GroupLeaderResponse, InvokeMethodRequest, InvokeMethodResponse,
    ReadIndexRequest, ReadIndexResponse, SuppressElectionRequest, SuppressElectionResponse,
    TransferLeadershipRequest, TransferLeadershipResponse,
};
use meridian_proto::raft::RaftPayload;
use meridian_proto::raft::raft_service_server::RaftService;

/// Serves openraft's RPCs from peers, for the hub group and every partition group.
pub struct RaftServiceImpl {
    raft: HubRaft,
    partitions: crate::partition::Partitions,
}

impl RaftServiceImpl {
    /// Wraps the local Raft nodes.
    pub fn new(raft: HubRaft, partitions: crate::partition::Partitions) -> Self {
        Self { raft, partitions }
    }

    fn partition(&self, group: u32) -> Result<&crate::partition::PartitionRaft, Status> {
        self.partitions
            .raft(group - 1)
            .ok_or_else(|| Status::not_found(format!("no raft group {group}")))
    }
}

fn decode<T: serde::de::DeserializeOwned>(payload: &RaftPayload) -> Result<T, Status> {
    if payload.group == super::network::HUB_GROUP {
        serde_json::from_slice(&payload.json)
            .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
    } else {
        postcard::from_bytes(&payload.json)
            .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
    }
}

/// Encodes a reply in the group's codec (JSON for the hub group, binary for partitions).
fn encode<T: Serialize>(group: u32, value: &T) -> Result<Response<RaftPayload>, Status> {
    let bytes = if group == super::network::HUB_GROUP {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    } else {
        postcard::to_stdvec(value).map_err(|e| e.to_string())
    };
    bytes
        .map(|json| Response::new(RaftPayload { json, group }))
        .map_err(|e| Status::internal(format!("encode raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let payload = request.get_ref();
        if payload.group == super::network::HUB_GROUP {
            encode(
                payload.group,
                &self.raft.append_entries(decode(payload)?).await,
            )
        } else {
            encode(
                payload.group,
                &self
                    .partition(payload.group)?
                    .append_entries(decode(payload)?)
                    .await,
            )
        }
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let payload = request.get_ref();
        if payload.group == super::network::HUB_GROUP {
            encode(payload.group, &self.raft.vote(decode(payload)?).await)
        } else {
            encode(
                payload.group,
                &self.partition(payload.group)?.vote(decode(payload)?).await,
            )
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let payload = request.get_ref();
        if payload.group == super::network::HUB_GROUP {
            encode(
                payload.group,
                &self.raft.install_snapshot(decode(payload)?).await,
            )
        } else {
            encode(
                payload.group,
                &self
                    .partition(payload.group)?
                    .install_snapshot(decode(payload)?)
                    .await,
            )
        }
    }
}

/// Marker in the status message of a request refused because this node is not the leader; the
/// caller may safely retry elsewhere, since nothing was proposed.
pub const NOT_LEADER: &str = "not leader";

/// Serves writes and read-index requests forwarded by followers, and direct methods for devices
/// connected here.
pub struct HubForwardImpl {
    raft: HubRaft,
    mqtt: std::sync::Arc<crate::mqtt::MqttContext>,
}

impl HubForwardImpl {
    /// Wraps the local Raft node and device endpoint.
    pub fn new(raft: HubRaft, mqtt: std::sync::Arc<crate::mqtt::MqttContext>) -> Self {
        Self { raft, mqtt }
    }
}

/// Applies a membership change on this node, which must be the leader: a new node is added as a
/// learner (blocking until it caught up), then the voters are changed.
pub async fn change_membership_locally(
    raft: &HubRaft,
    change: &meridian_control_plane::MembershipChange,
) -> Result<(), crate::domain::HubError> {
    use crate::domain::HubError;
    use meridian_control_plane::MembershipChange;
    use meridian_proto::ErrorCode;
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(metrics.id) {
        return Err(HubError::new(ErrorCode::ServiceUnavailable, NOT_LEADER));
    }
    let voters: std::collections::BTreeSet<u64> =
        metrics.membership_config.membership().voter_ids().collect();
    let next = meridian_control_plane::plan(&voters, change)
        .map_err(|e| HubError::invalid(e.to_string()))?;
    if let MembershipChange::Add { id, addr } = change
        && !voters.contains(id)
    {
        raft.add_learner(*id, openraft::BasicNode::new(addr.clone()), true)
            .await
            .map_err(|e| HubError::new(ErrorCode::ServiceUnavailable, e.to_string()))?;
    }
    if next != voters {
        raft.change_membership(next, false)
            .await
            .map_err(|e| HubError::new(ErrorCode::ServiceUnavailable, e.to_string()))?;
    }
    Ok(())
}

#[tonic::async_trait]
impl HubForward for HubForwardImpl {
    async fn suppress_election(
        &self,
        request: Request<SuppressElectionRequest>,
    ) -> Result<Response<SuppressElectionResponse>, Status> {
        let req = request.into_inner();
        if req.group == super::network::HUB_GROUP {
            super::transfer::suppress_election(&self.raft, req.millis, req.campaign).await;
        } else {
            let raft = self
                .mqtt
                .partition_groups
                .raft(req.group - 1)
                .ok_or_else(|| Status::not_found(format!("no raft group {}", req.group)))?;
            super::transfer::suppress_election(raft, req.millis, req.campaign).await;
        }
        Ok(Response::new(SuppressElectionResponse {}))
    }

    async fn group_leader(
        &self,
        request: Request<GroupLeaderRequest>,
    ) -> Result<Response<GroupLeaderResponse>, Status> {
        let group = request.into_inner().group;
        let leader = if group == super::network::HUB_GROUP {
            self.raft.metrics().borrow().current_leader
        } else {
            self.mqtt
                .partition_groups
                .raft(group - 1)
                .ok_or_else(|| Status::not_found(format!("no raft group {group}")))?
                .metrics()
                .borrow()
                .current_leader
        };
        Ok(Response::new(GroupLeaderResponse {
            leader: leader.unwrap_or(0),
        }))
    }

    async fn transfer_leadership(
        &self,
        request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<TransferLeadershipResponse>, Status> {
        let req = request.into_inner();
        let result = if req.group == super::network::HUB_GROUP && self.mqtt.hub.lapse_transfers() {
            super::transfer::hand_over_leadership(
                &self.raft,
                req.group,
                req.to,
                &req.also,
                self.mqtt.hub.handing_over(),
            )
            .await
            .map(|_| ())
        } else if req.group == super::network::HUB_GROUP {
            // Our own and the target's addresses, read before we leave the membership.
            let me = self.mqtt.node_id;
            let addr_of = |id: u64| {
                self.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .unwrap_or_default()
            };
            let addr = addr_of(me);
            let addrs: std::collections::BTreeMap<u64, String> = std::iter::once(req.to)
                .chain(req.also.iter().copied())
                .map(|id| (id, addr_of(id)))
                .collect();
            let done =
                super::transfer::transfer_leadership(&self.raft, req.group, req.to, &req.also)
                    .await;
            match done {
                // Back to voter, through the new leader (this node hears of no leader while it
                // is outside the group, so it asks the new leader directly).
                Ok(leader) => {
                    let leader_addr = addrs.get(&leader).cloned().unwrap_or_default();
                    super::transfer::rejoin_through(&leader_addr, me, &addr).await
                }
                Err(e) => Err(e),
            }
        } else {
            self.mqtt
                .partition_groups
                .hand_over(req.group - 1, req.to, &req.also)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => Ok(Response::new(TransferLeadershipResponse {
                error_json: Vec::new(),
            })),
            Err(e) if e.message == NOT_LEADER => Err(Status::failed_precondition(NOT_LEADER)),
            Err(e) => Ok(Response::new(TransferLeadershipResponse {
                error_json: serde_json::to_vec(&e).unwrap_or_default(),
            })),
        }
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        let req = request.into_inner();
        let change = if req.add_id != 0 {
            meridian_control_plane::MembershipChange::Add {
                id: req.add_id,
                addr: req.add_addr,
            }
        } else {
            meridian_control_plane::MembershipChange::Remove { id: req.remove_id }
        };
        match change_membership_locally(&self.raft, &change).await {
            Ok(()) => Ok(Response::new(ChangeMembershipResponse {
                error_json: Vec::new(),
            })),
            Err(e) if e.message == NOT_LEADER => Err(Status::failed_precondition(NOT_LEADER)),
            Err(e) => Ok(Response::new(ChangeMembershipResponse {
                error_json: serde_json::to_vec(&e).unwrap_or_default(),
            })),
        }
    }

    async fn invoke_method(
        &self,
        request: Request<InvokeMethodRequest>,
    ) -> Result<Response<InvokeMethodResponse>, Status> {
        let req = request.into_inner();
        let payload: serde_json::Value = serde_json::from_slice(&req.payload_json)
            .map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))?;
        let result = self
            .mqtt
            .invoke_method(
                &req.client_id,
                &req.method_name,
                &payload,
                std::time::Duration::from_millis(req.response_timeout_ms),
                std::time::Duration::from_millis(req.connect_timeout_ms),
            )
            .await;
        Ok(Response::new(match result {
            Ok(reply) => InvokeMethodResponse {
                status: reply.status,
                payload_json: serde_json::to_vec(&reply.payload).unwrap_or_default(),
                error_json: Vec::new(),
            },
            Err(e) => InvokeMethodResponse {
                status: 0,
                payload_json: Vec::new(),
                error_json: serde_json::to_vec(&e).unwrap_or_default(),
            },
        }))
    }

    async fn client_write(
        &self,
        request: Request<ClientWriteRequest>,
    ) -> Result<Response<ClientWriteResponse>, Status> {
        let command: HubCommand = serde_json::from_slice(&request.get_ref().command_json)
            .map_err(|e| Status::invalid_argument(format!("bad command: {e}")))?;
        if self.mqtt.hub.is_handing_over() {
            // Nothing proposed: the forwarder retries, and reaches the new leader.
            return Err(Status::failed_precondition(NOT_LEADER));
        }
        match self.raft.client_write(command).await {
            Ok(resp) => {
                let response_json = serde_json::to_vec(&resp.data)
                    .map_err(|e| Status::internal(format!("encode response: {e}")))?;
                Ok(Response::new(ClientWriteResponse {
                    response_json,
                    log_index: resp.log_id.index,
                }))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Status::failed_precondition(NOT_LEADER))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        if self.mqtt.hub.is_handing_over() {
            return Err(Status::failed_precondition(NOT_LEADER));
        }
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(Response::new(ReadIndexResponse {
                read_index: log_id.map_or(0, |l| l.index),
            })),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(Status::failed_precondition(NOT_LEADER))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
