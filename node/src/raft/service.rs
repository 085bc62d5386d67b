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
    ClientWriteRequest, ClientWriteResponse, InvokeMethodRequest, InvokeMethodResponse,
    ReadIndexRequest, ReadIndexResponse,
};
use meridian_proto::raft::RaftPayload;
use meridian_proto::raft::raft_service_server::RaftService;

/// Serves openraft's RPCs from peers.
pub struct RaftServiceImpl {
    raft: HubRaft,
}

impl RaftServiceImpl {
    /// Wraps the local Raft node.
    pub fn new(raft: HubRaft) -> Self {
        Self { raft }
    }
}

fn decode<T: serde::de::DeserializeOwned>(payload: &RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&payload.json)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    serde_json::to_vec(value)
        .map(|json| Response::new(RaftPayload { json }))
        .map_err(|e| Status::internal(format!("encode raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req = decode(request.get_ref())?;
        encode(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req = decode(request.get_ref())?;
        encode(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req = decode(request.get_ref())?;
        encode(&self.raft.install_snapshot(req).await)
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

#[tonic::async_trait]
impl HubForward for HubForwardImpl {
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
