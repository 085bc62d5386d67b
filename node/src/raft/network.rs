//! The Raft transport's client side: openraft RPCs over tonic to `RaftService` on each peer.

use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::NodeId;
use meridian_proto::raft::RaftPayload;
use meridian_proto::raft::raft_service_client::RaftServiceClient;
use openraft::RaftTypeConfig;

/// Creates one connection per peer, lazily dialled, for one Raft group: [`HUB_GROUP`] or a
/// telemetry partition (`partition + 1`). Every group shares the peer's one `RaftService`.
#[derive(Clone, Default)]
pub struct GrpcNetworkFactory {
    group: u32,
}

/// The hub group's number in [`RaftPayload::group`].
pub const HUB_GROUP: u32 = 0;

impl GrpcNetworkFactory {
    /// A factory for the hub group.
    pub fn hub() -> Self {
        Self { group: HUB_GROUP }
    }

    /// A factory for the Raft group of telemetry partition `partition`.
    pub fn partition(partition: u32) -> Self {
        Self {
            group: partition + 1,
        }
    }
}

impl<C> RaftNetworkFactory<C> for GrpcNetworkFactory
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize,
    InstallSnapshotRequest<C>: Serialize,
{
    type Network = GrpcNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GrpcNetwork {
            target,
            group: self.group,
            client: channel(&node.addr)
                .map(|c| RaftServiceClient::new(c).max_decoding_message_size(MAX_MESSAGE_BYTES)),
            addr: node.addr.clone(),
        }
    }
}

/// Largest node-to-node gRPC message: a copied whole hub state (`InstallShippedState`, one Raft
/// entry; about 1.5 KB per device) must fit. tonic's default is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// Builds a lazily connecting channel to a peer's gRPC address (`host:port`).
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .connect_lazy())
}

/// A connection to one peer.
pub struct GrpcNetwork {
    target: NodeId,
    group: u32,
    addr: String,
    client: Result<RaftServiceClient<Channel>, tonic::transport::Error>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl GrpcNetwork {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &self.client {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    format!("bad peer address {}: {e}", self.addr),
                ))));
            }
        };
        // The hub group's RPCs are JSON; partition groups' carry message bodies and use the
        // binary codec (same as their log entries).
        let json = if self.group == HUB_GROUP {
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?
        } else {
            postcard::to_stdvec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?
        };
        let payload = RaftPayload {
            json,
            group: self.group,
        };
        let mut client = client;
        let addr = self.addr.clone();
        let fut = async move {
            crate::faults::before_peer_call_to(&addr).await;
            match rpc {
                Rpc::AppendEntries => client.append_entries(payload).await,
                Rpc::Vote => client.vote(payload).await,
                Rpc::InstallSnapshot => client.install_snapshot(payload).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&TransportError(
                    format!("rpc to node {} timed out", self.target),
                ))));
            }
            Ok(Err(status)) => {
                // A peer that is down is "unreachable": openraft backs off instead of hammering it.
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(
                    format!("node {} at {}: {status}", self.target, self.addr),
                ))));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = if self.group == HUB_GROUP {
            serde_json::from_slice(&reply.json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
        } else {
            postcard::from_bytes(&reply.json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
        };
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<C> RaftNetwork<C> for GrpcNetwork
where
    C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>,
    AppendEntriesRequest<C>: Serialize,
    InstallSnapshotRequest<C>: Serialize,
{
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
