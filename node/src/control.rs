//! The control plane's operations, shared by the REST mapping (`/meridian/cluster/...` in
//! [`crate::api`]) and the gRPC service ([`ControlPlaneService`], `proto/control.proto`). Every
//! call is authorized with the operator credential ([`crate::auth::authorize_operator`]).

use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::domain::{HubCommand, HubError, HubResult};
use crate::hub::{Hub, ReadConsistency};
use crate::partition::Partitions;
use meridian_control_plane::gossip::Gossip;
use meridian_proto::control::control_plane_server::ControlPlane as ControlPlaneRpc;
use meridian_proto::control::{
    AddNodeRequest, Done, JsonReply, ListNodesRequest, ListPartitionsRequest, RemoveNodeRequest,
    SetDrainingRequest, TransferLeadershipRequest,
};

/// The control plane of this node.
#[derive(Clone)]
pub struct ControlPlane {
    hub: Hub,
    partitions: Partitions,
    gossip: Gossip,
    node_id: u64,
    sessions: crate::mqtt::Sessions,
    region: std::sync::Arc<crate::region::Region>,
}

fn unix_now() -> u64 {
    crate::clock::unix_now()
}

impl ControlPlane {
    /// The control plane over this node's hub group, partitions and gossip view.
    pub fn new(
        hub: Hub,
        partitions: Partitions,
        gossip: Gossip,
        node_id: u64,
        sessions: crate::mqtt::Sessions,
        region: std::sync::Arc<crate::region::Region>,
    ) -> Self {
        Self {
            hub,
            partitions,
            gossip,
            node_id,
            sessions,
            region,
        }
    }

    /// This node's region: epoch, role, writability, copy lag, failover history and progress.
    /// In sync mode: the regions of the voters and where the leaders are.
    pub fn region_status(&self) -> Value {
        if !self.region.sync_mode() {
            return self.region.status();
        }
        let regions = self.partitions.regions();
        let m = self.hub.raft().metrics().borrow().clone();
        let leader_region = m.current_leader.and_then(|l| regions.get(&l).cloned());
        let partition_leaders: Vec<Value> = (0..self.partitions.count())
            .map(|p| {
                let leader = self.partitions.leader(p).map(|(id, _)| id);
                json!({"partition": p, "leader": leader, "region": leader.and_then(|l| regions.get(&l))})
            })
            .collect();
        json!({
            "mode": "sync",
            "region": self.region.my_region(),
            "nodeId": self.node_id,
            "primary": leader_region,
            "role": if leader_region.as_deref() == Some(self.region.my_region()) { "primary" } else { "secondary" },
            "writable": true,
            "hubLeader": m.current_leader,
            "regions": regions,
            "partitionLeaders": partition_leaders,
        })
    }

    /// Fails the hub over to `region` (see [`crate::region::Region::failover`]). In sync mode
    /// no data moves: the hub's and the partitions' leaderships move to nodes of `region`.
    pub async fn failover(&self, region: &str, hub_name: &str, force: bool) -> HubResult<Value> {
        if !self.region.sync_mode() {
            let report = self.region.failover(region, hub_name, force).await?;
            return Ok(serde_json::to_value(report).unwrap_or(Value::Null));
        }
        if hub_name != self.region.hub_name() {
            return Err(HubError::invalid(format!(
                "confirmation failed: the hub is named '{}', not '{hub_name}'",
                self.region.hub_name()
            )));
        }
        let started = std::time::Instant::now();
        let regions = self.partitions.regions();
        let voters: std::collections::BTreeSet<u64> = self
            .hub
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let in_target: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|v| regions.get(v).is_some_and(|r| r == region))
            .collect();
        let Some(first) = in_target.first().copied() else {
            return Err(HubError::invalid(format!(
                "no voter is in region '{region}'"
            )));
        };
        let mut steps = Vec::new();
        // A transfer can lose its reply while leadership moves; it is retried until the leader
        // is where it should be.
        let mut attempts = 0;
        loop {
            let hub_leader = self.hub.raft().metrics().borrow().current_leader;
            if hub_leader.is_some_and(|l| in_target.contains(&l)) {
                break;
            }
            attempts += 1;
            // Any voter of the target region may take over: the freshest log wins.
            if let Err(e) = self
                .transfer_leadership_to_any(None, first, &in_target[1..])
                .await
            {
                // A target still catching up ("not replicating") gets time to.
                if attempts >= 40 {
                    return Err(e);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        steps.push(json!([
            "hub leader moved",
            started.elapsed().as_millis() as u64
        ]));
        for p in 0..self.partitions.count() {
            let replicas = self.partitions.placement(p, &voters);
            let Some(to) = replicas.iter().copied().find(|r| in_target.contains(r)) else {
                continue;
            };
            let mut attempts = 0;
            loop {
                let leader = self.partition_leader(p).await.map(|(id, _)| id);
                if leader.is_some_and(|l| in_target.contains(&l)) {
                    break;
                }
                attempts += 1;
                if let Err(e) = self.transfer_leadership(Some(p), to).await {
                    // A target still catching up ("not replicating") gets time to.
                    if attempts >= 40 {
                        return Err(e);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
        steps.push(json!([
            "partition leaders moved",
            started.elapsed().as_millis() as u64
        ]));
        Ok(json!({
            "mode": "sync",
            "primary": region,
            "kind": "manual",
            "steps": steps,
            "done": true,
            "totalMs": started.elapsed().as_millis() as u64,
        }))
    }

    /// Sync mode, on a node of a tie-breaker (witness) region: keeps its election timers off
    /// while its groups have leaders (see `raft::transfer::tie_breaker_elections`).
    /// `leaderless_since` is per group (0: hub, p + 1: partition p).
    pub fn tie_breaker_elections(
        &self,
        leaderless_since: &mut std::collections::BTreeMap<u32, Option<std::time::Instant>>,
        patience: std::time::Duration,
    ) {
        let alive = |id: &u64| {
            *id == self.node_id
                || self.gossip.health(*id) == Some(meridian_control_plane::gossip::Health::Up)
        };
        crate::raft::transfer::tie_breaker_elections(
            self.hub.raft(),
            leaderless_since.entry(0).or_default(),
            patience,
            alive,
        );
        for p in 0..self.partitions.count() {
            if let Some(raft) = self.partitions.raft(p) {
                crate::raft::transfer::tie_breaker_elections(
                    raft,
                    leaderless_since.entry(p + 1).or_default(),
                    patience,
                    alive,
                );
            }
        }
    }

    /// Sync mode, on a node of a tie-breaker (witness) region: hands every leadership this node
    /// holds (hub group, partition groups) to a voter of another region. A tie-breaker leader
    /// would put a WAN round trip on every write of both data regions, and the hub's primary
    /// region is where its leaders are. Failures are retried on the next call.
    pub async fn shed_leadership(&self) {
        let regions = self.partitions.regions();
        let mine = self.region.my_region().to_string();
        let m = self.hub.raft().metrics().borrow().clone();
        let voters: std::collections::BTreeSet<u64> =
            m.membership_config.membership().voter_ids().collect();
        // Voters of the other regions, those of the hub leader's region first (the primary
        // region's devices then reach their partition leaders without a WAN hop).
        let hub_leader_region = m
            .current_leader
            .filter(|l| *l != self.node_id)
            .and_then(|l| regions.get(&l).cloned());
        let elsewhere = |ids: &[u64]| -> Vec<u64> {
            let mut out: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|v| *v != self.node_id && regions.get(v).is_some_and(|r| *r != mine))
                // Not to a node gossip knows to be down (after a region loss, its nodes).
                .filter(|v| {
                    self.gossip.health(*v) != Some(meridian_control_plane::gossip::Health::Down)
                })
                .collect();
            out.sort_by_key(|v| regions.get(v) != hub_leader_region.as_ref());
            out
        };
        if m.current_leader == Some(self.node_id) {
            let ids: Vec<u64> = voters.iter().copied().collect();
            for to in elsewhere(&ids) {
                match self.transfer_leadership(None, to).await {
                    Ok(()) => {
                        tracing::info!(to, "tie-breaker region: hub leadership handed on");
                        break;
                    }
                    Err(e) => tracing::debug!(to, error = %e, "handing on hub leadership"),
                }
            }
        }
        for p in 0..self.partitions.count() {
            if self.partitions.leader(p).map(|(id, _)| id) != Some(self.node_id) {
                continue;
            }
            let replicas: Vec<u64> = self.partitions.placement(p, &voters).into_iter().collect();
            for to in elsewhere(&replicas) {
                match self.transfer_leadership(Some(p), to).await {
                    Ok(()) => {
                        tracing::info!(
                            partition = p,
                            to,
                            "tie-breaker region: partition leadership handed on"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(partition = p, to, error = %e, "handing on partition leadership")
                    }
                }
            }
        }
    }

    fn devices_here(&self) -> usize {
        self.sessions.count()
    }

    /// The gossip view (liveness of the other nodes).
    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    /// Checks the operator credential (an `Authorization` header or `authorization` metadata).
    pub async fn authorize(&self, authorization: Option<&str>) -> HubResult<()> {
        let key = self
            .hub
            .read(ReadConsistency::Stale, |st| {
                Ok(st
                    .settings
                    .as_ref()
                    .map(|h| h.operator_key.clone())
                    .unwrap_or_default())
            })
            .await?;
        crate::auth::authorize_operator(authorization, &key, unix_now())
    }

    /// The nodes: Raft role and progress, gossip health and metadata, drain state, partitions led.
    pub async fn nodes(&self) -> HubResult<Value> {
        let m = self.hub.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let view = self.gossip.view();
        let draining = self
            .hub
            .read(ReadConsistency::Linearizable, |st| Ok(st.draining.clone()))
            .await?;
        // Partition leaders as this node's replicas see them.
        let groups = &self.partitions;
        let leaders: Vec<Option<u64>> = (0..groups.count())
            .map(|p| groups.leader(p).map(|(id, _)| id))
            .collect();
        let nodes: Vec<Value> = membership
            .nodes()
            .map(|(id, node)| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.as_ref().map(|l| l.index));
                let peer = view.get(id);
                let health = if *id == m.id {
                    "up"
                } else {
                    match peer.map(|p| p.health) {
                        Some(meridian_control_plane::gossip::Health::Up) => "up",
                        Some(meridian_control_plane::gossip::Health::Down) => "down",
                        None => "unknown",
                    }
                };
                let meta = if *id == m.id {
                    Some(self.gossip.local().meta.clone())
                } else {
                    peer.map(|p| p.identity.meta.clone())
                };
                json!({
                    "id": id,
                    "grpcAddr": node.addr,
                    "role": if voters.contains(id) { "voter" } else { "learner" },
                    "leader": m.current_leader == Some(*id),
                    "matchedIndex": matched,
                    "health": health,
                    "draining": draining.contains(id),
                    "partitionsLed": leaders.iter().filter(|l| **l == Some(*id)).count(),
                    "healthSinceMs": peer.map(|p| p.since.elapsed().as_millis() as u64),
                // Load as gossip last carried it (this node: its own numbers).
                "load": if *id == m.id {
                    Some(json!({
                        "devices": self.devices_here(),
                        "partitionsLed": leaders.iter().filter(|l| **l == Some(*id)).count(),
                    }))
                } else {
                    peer.and_then(|p| p.load).map(|l| json!({
                        "devices": l.devices,
                        "partitionsLed": l.partitions_led,
                    }))
                },
                    "region": meta.as_ref().map(|m| m.region.clone()),
                    "httpsAddr": meta.as_ref().map(|m| m.https.clone()),
                    "mqttAddr": meta.as_ref().map(|m| m.mqtt.clone()),
                })
            })
            .collect();
        Ok(json!({
            "nodes": nodes,
            "leader": m.current_leader,
            "term": m.current_term,
            "answeredBy": m.id,
            "lastApplied": m.last_applied.map(|l| l.index),
        }))
    }

    /// Telemetry partition placement as this node sees it: per partition the leader, the voters
    /// and learners, and whether this node leads it (a leader's view is authoritative; a node
    /// removed from a group may keep a stale view of it).
    pub fn partitions(&self) -> Value {
        let groups = &self.partitions;
        let partitions: Vec<Value> = (0..groups.count())
            .filter_map(|p| {
                let m = groups.raft(p)?.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let voters: Vec<u64> = membership.voter_ids().collect();
                let learners: Vec<u64> = membership.learner_ids().collect();
                Some(json!({
                    "partition": p,
                    "leader": m.current_leader,
                    "term": m.current_term,
                    "voters": voters,
                    "learners": learners,
                    "isLeader": m.current_leader == Some(m.id),
                    "lastApplied": m.last_applied.map(|l| l.index),
                }))
            })
            .collect();
        json!({
            "answeredBy": self.node_id,
            "partitions": partitions,
        })
    }

    /// Adds a node (learner, catch-up, voter).
    pub async fn add_node(&self, id: u64, grpc_addr: String) -> HubResult<()> {
        self.hub
            .change_membership(meridian_control_plane::MembershipChange::Add {
                id,
                addr: grpc_addr,
            })
            .await
    }

    /// Removes a voter.
    pub async fn remove_node(&self, id: u64) -> HubResult<()> {
        self.hub
            .change_membership(meridian_control_plane::MembershipChange::Remove { id })
            .await
    }

    /// The leader of partition `p` and its address: as this node's replica sees it, else as a
    /// replica reports it (a node that holds no replica of `p` knows no leader).
    async fn partition_leader(&self, p: u32) -> Option<(u64, String)> {
        if let Some(known) = self.partitions.leader(p) {
            return Some(known);
        }
        let membership = self
            .hub
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        for replica in self.partitions.placement(p, &voters) {
            let Some(addr) = membership.get_node(&replica).map(|n| n.addr.clone()) else {
                continue;
            };
            let Ok(channel) = crate::raft::network::channel(&addr) else {
                continue;
            };
            let reply = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                meridian_proto::hub::hub_forward_client::HubForwardClient::new(channel)
                    .group_leader(meridian_proto::hub::GroupLeaderRequest { group: p + 1 }),
            )
            .await;
            if let Ok(Ok(r)) = reply {
                let leader = r.into_inner().leader;
                if leader != 0
                    && let Some(n) = membership.get_node(&leader)
                {
                    return Some((leader, n.addr.clone()));
                }
            }
        }
        None
    }

    /// Moves leadership of the hub group (`partition` None) or of a partition's group to `to`
    /// (see `raft::transfer`): asks the group's current leader to step aside for it.
    pub async fn transfer_leadership(&self, partition: Option<u32>, to: u64) -> HubResult<()> {
        self.transfer_leadership_to_any(partition, to, &[]).await
    }

    /// Like [`ControlPlane::transfer_leadership`], but any of `also` may take over instead of
    /// `to` (whichever has the freshest log wins).
    pub async fn transfer_leadership_to_any(
        &self,
        partition: Option<u32>,
        to: u64,
        also: &[u64],
    ) -> HubResult<()> {
        use meridian_proto::hub::TransferLeadershipRequest as Forwarded;
        use meridian_proto::hub::hub_forward_client::HubForwardClient;
        let group = partition.map_or(crate::raft::network::HUB_GROUP, |p| p + 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let leader_addr = match partition {
                None => self
                    .hub
                    .raft()
                    .metrics()
                    .borrow()
                    .current_leader
                    .and_then(|l| self.hub.node_addr(l)),
                Some(p) => {
                    if p >= self.partitions.count() {
                        return Err(HubError::invalid(format!("no partition {p}")));
                    }
                    self.partition_leader(p).await.map(|(_, addr)| addr)
                }
            };
            if let Some(addr) = leader_addr {
                let channel = crate::raft::network::channel(&addr).map_err(|e| {
                    HubError::new(meridian_proto::ErrorCode::ServerError, e.to_string())
                })?;
                match HubForwardClient::new(channel)
                    .transfer_leadership(Forwarded {
                        group,
                        to,
                        also: also.to_vec(),
                    })
                    .await
                {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        if reply.error_json.is_empty() {
                            return Ok(());
                        }
                        let error: HubError = serde_json::from_slice(&reply.error_json)
                            .unwrap_or_else(|e| {
                                HubError::new(meridian_proto::ErrorCode::ServerError, e.to_string())
                            });
                        // A target the (possibly new) leader has not heard from yet may catch up
                        // in a moment: try again until the deadline.
                        if !error.message.contains("not replicating")
                            || std::time::Instant::now() > deadline
                        {
                            return Err(error);
                        }
                    }
                    // That node stopped leading meanwhile: look again.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                    Err(status) => {
                        return Err(HubError::new(
                            meridian_proto::ErrorCode::ServiceUnavailable,
                            status.message().to_string(),
                        ));
                    }
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(HubError::new(
                    meridian_proto::ErrorCode::ServiceUnavailable,
                    "no leader to transfer from",
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Drains a voter (or puts it back in service).
    pub async fn set_draining(&self, id: u64, draining: bool) -> HubResult<()> {
        let voter = self
            .hub
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        if !voter {
            return Err(HubError::invalid(format!("node {id} is not a voter")));
        }
        self.hub
            .write(HubCommand::SetNodeDraining {
                node_id: id,
                draining,
            })
            .await
            .map(|_| ())
    }
}

/// The gRPC form of the control plane. The gRPC server starts before the public listeners (whose
/// addresses gossip announces), so the control plane is set once the node is up; until then
/// calls answer UNAVAILABLE.
pub struct ControlPlaneService {
    control: std::sync::Arc<std::sync::OnceLock<ControlPlane>>,
}

impl ControlPlaneService {
    /// Serves the control plane once it is set in `control`.
    pub fn new(control: std::sync::Arc<std::sync::OnceLock<ControlPlane>>) -> Self {
        Self { control }
    }

    async fn authorize<T>(&self, request: &Request<T>) -> Result<&ControlPlane, Status> {
        let control = self
            .control
            .get()
            .ok_or_else(|| Status::unavailable("the node is starting"))?;
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        control.authorize(auth).await.map_err(status)?;
        Ok(control)
    }
}

fn status(e: HubError) -> Status {
    Status::new(e.code.grpc_code(), e.message)
}

#[tonic::async_trait]
impl ControlPlaneRpc for ControlPlaneService {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<JsonReply>, Status> {
        let control = self.authorize(&request).await?;
        let json = control.nodes().await.map_err(status)?;
        Ok(Response::new(JsonReply {
            json: json.to_string(),
        }))
    }

    async fn list_partitions(
        &self,
        request: Request<ListPartitionsRequest>,
    ) -> Result<Response<JsonReply>, Status> {
        let control = self.authorize(&request).await?;
        Ok(Response::new(JsonReply {
            json: control.partitions().to_string(),
        }))
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Done>, Status> {
        let control = self.authorize(&request).await?;
        let r = request.into_inner();
        control.add_node(r.id, r.grpc_addr).await.map_err(status)?;
        Ok(Response::new(Done {}))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<Done>, Status> {
        let control = self.authorize(&request).await?;
        control
            .remove_node(request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(Done {}))
    }

    async fn transfer_leadership(
        &self,
        request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<Done>, Status> {
        let control = self.authorize(&request).await?;
        let r = request.into_inner();
        control
            .transfer_leadership(r.partition, r.to)
            .await
            .map_err(status)?;
        Ok(Response::new(Done {}))
    }

    async fn set_draining(
        &self,
        request: Request<SetDrainingRequest>,
    ) -> Result<Response<Done>, Status> {
        let control = self.authorize(&request).await?;
        let r = request.into_inner();
        control
            .set_draining(r.id, r.draining)
            .await
            .map_err(status)?;
        Ok(Response::new(Done {}))
    }
}
