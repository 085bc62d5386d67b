//! The hub handle front-ends call: proposes commands through Raft (forwarding to the leader when
//! this node is a follower) and serves linearizable reads from the local state machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::time::{Instant, sleep};
use tonic::transport::Channel;

use crate::domain::{HubCommand, HubError, HubResponse, HubResult, HubState};
use crate::raft::state_machine::SharedState;
use crate::raft::{HubRaft, NodeId, network};
use meridian_proto::ErrorCode;
use meridian_proto::hub::hub_forward_client::HubForwardClient;
use meridian_proto::hub::{ClientWriteRequest, ReadIndexRequest};

/// How a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Confirms leadership with a quorum (read index) and waits for the local state machine to
    /// catch up before reading. The default for every registry and twin read.
    Linearizable,
    /// Reads the local state as applied, possibly behind the leader. Only for data Azure itself
    /// serves eventually consistent (statistics).
    Stale,
}

/// Cloneable handle to the local hub node.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    raft: HubRaft,
    events: tokio::sync::broadcast::Sender<crate::domain::events::HubEvent>,
    state: SharedState,
    request_timeout: Duration,
    forward_clients: Mutex<HashMap<String, HubForwardClient<Channel>>>,
    gate: Arc<crate::region::RegionGate>,
    /// Set while this node hands its leadership over by letting its lease lapse: it proposes
    /// nothing and confirms no read (both would renew the followers' leases); callers wait.
    handing_over: Arc<std::sync::atomic::AtomicBool>,
    /// Whether leadership transfers let the lease lapse (sync mode) instead of stepping out of
    /// the voters.
    lapse_transfers: std::sync::atomic::AtomicBool,
}

fn unavailable(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::ServiceUnavailable, message)
}

/// Whether a forwarding failure means the request was certainly not proposed, so a retry cannot
/// apply it twice: the peer refused it as not leader, or the connection was never made.
fn safe_to_retry(status: &tonic::Status) -> bool {
    let message = status.message();
    (status.code() == tonic::Code::FailedPrecondition
        && message.contains(crate::raft::service::NOT_LEADER))
        || message.contains("tcp connect error")
        || message.contains("Connection refused")
}

impl Hub {
    /// Wraps a started Raft node and its state machine's shared state.
    pub fn new(
        raft: HubRaft,
        state: SharedState,
        events: tokio::sync::broadcast::Sender<crate::domain::events::HubEvent>,
        request_timeout: Duration,
        gate: Arc<crate::region::RegionGate>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                raft,
                events,
                state,
                request_timeout,
                forward_clients: Mutex::new(HashMap::new()),
                gate,
                handing_over: Arc::default(),
                lapse_transfers: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Set while this node hands its leadership over (see `raft::transfer::hand_over_leadership`).
    pub fn handing_over(&self) -> &Arc<std::sync::atomic::AtomicBool> {
        &self.inner.handing_over
    }

    /// Whether this node is handing its leadership over right now.
    pub fn is_handing_over(&self) -> bool {
        self.inner
            .handing_over
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes leadership transfers of the hub group keep the voters and let the leader's lease
    /// lapse (sync mode: a group over three regions must not run a voter short), instead of
    /// stepping out of the voters.
    pub fn use_lapse_transfers(&self, on: bool) {
        self.inner
            .lapse_transfers
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether transfers let the lease lapse (see [`Hub::use_lapse_transfers`]).
    pub fn lapse_transfers(&self) -> bool {
        self.inner
            .lapse_transfers
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits while this node hands its leadership over (false: still at `deadline`).
    async fn wait_hand_over(&self, deadline: Instant) -> bool {
        while self.is_handing_over() {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// The region write gate (fencing epoch and lease).
    pub fn gate(&self) -> &Arc<crate::region::RegionGate> {
        &self.inner.gate
    }

    /// Reads the local state as applied, without waiting (None if the lock is poisoned).
    pub fn read_local<T>(&self, f: impl FnOnce(&HubState) -> T) -> Option<T> {
        self.inner.state.read().ok().map(|s| f(&s))
    }

    /// Events of commands applied on this node from now on.
    pub fn subscribe_events(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::domain::events::HubEvent> {
        self.inner.events.subscribe()
    }

    /// The Raft handle (for admin and metrics).
    pub fn raft(&self) -> &HubRaft {
        &self.inner.raft
    }

    fn forward_client(&self, addr: &str) -> HubResult<HubForwardClient<Channel>> {
        let mut clients =
            self.inner.forward_clients.lock().map_err(|_| {
                HubError::new(ErrorCode::ServerError, "forward client cache poisoned")
            })?;
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = network::channel(addr)
            .map_err(|e| unavailable(format!("bad leader address {addr}: {e}")))?;
        let client = HubForwardClient::new(channel);
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Proposes a command and returns the state machine's answer once it is committed by a quorum
    /// and applied. Followers forward to the leader; elections in progress are waited out up to
    /// the request timeout.
    pub async fn write(&self, command: HubCommand) -> HubResult<HubResponse> {
        // Client writes pass the region gate before they are proposed and again before they are
        // acknowledged; region bookkeeping (epochs, copies of the primary's log, drains) does not.
        // (Creating the hub changes nothing once it exists, and the state machine admits it only
        // in the primary region.)
        let gated = crate::domain::region::shipped_applies(&command)
            && !matches!(command, HubCommand::InitHub { .. });
        if gated {
            self.inner.gate.check()?;
        }
        let result = self.propose(command).await;
        if gated && result.is_ok() {
            self.inner.gate.check()?;
        }
        result
    }

    async fn propose(&self, command: HubCommand) -> HubResult<HubResponse> {
        let deadline = Instant::now() + self.inner.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            if !self.wait_hand_over(deadline).await {
                return Err(unavailable(
                    "the leadership hand-over did not finish in time",
                ));
            }
            let leader = match self.inner.raft.client_write(command.clone()).await {
                Ok(resp) => return resp.data,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    f.leader_node.map(|n| (f.leader_id, n.addr))
                }
                Err(RaftError::APIError(e)) => return Err(unavailable(e.to_string())),
                Err(RaftError::Fatal(e)) => return Err(unavailable(format!("raft stopped: {e}"))),
            };
            if let Some((leader_id, addr)) = leader {
                match self.forward_write(leader_id, &addr, &command).await {
                    Ok(result) => return result,
                    Err(status) if safe_to_retry(&status) => {
                        tracing::debug!(?leader_id, %status, "forward refused; retrying");
                    }
                    Err(status) => {
                        return Err(unavailable(format!(
                            "forwarding to leader {leader_id:?} failed: {}",
                            status.message()
                        )));
                    }
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(unavailable("no Raft leader could take the write in time"));
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(300));
        }
    }

    async fn forward_write(
        &self,
        leader_id: Option<NodeId>,
        addr: &str,
        command: &HubCommand,
    ) -> Result<HubResult<HubResponse>, tonic::Status> {
        let mut client = self
            .forward_client(addr)
            .map_err(|e| tonic::Status::unavailable(e.message))?;
        let command_json = serde_json::to_vec(command)
            .map_err(|e| tonic::Status::internal(format!("encode command: {e}")))?;
        tracing::debug!(
            ?leader_id,
            addr,
            command = command.name(),
            "forwarding write to leader"
        );
        // When this node learns of another leader while waiting, the old leader can no longer
        // answer in time (it is deposed or cut off): give up early. The outcome is unknown, so
        // the caller gets 503 and decides whether to retry, instead of waiting out the timeout.
        let leader_changed = self.until_leader_changes(leader_id);
        let call = tokio::time::timeout(self.inner.request_timeout, async move {
            crate::faults::before_peer_call_to(addr).await;
            client
                .client_write(ClientWriteRequest { command_json })
                .await
        });
        let reply = tokio::select! {
            reply = call => reply
                .map_err(|_| tonic::Status::deadline_exceeded("forwarded write timed out"))??,
            () = leader_changed => {
                return Err(tonic::Status::aborted(
                    "the leader changed while the write was forwarded; outcome unknown",
                ));
            }
        };
        serde_json::from_slice(&reply.get_ref().response_json)
            .map_err(|e| tonic::Status::internal(format!("decode response: {e}")))
    }

    /// Reads the hub state with the given consistency.
    pub async fn read<T>(
        &self,
        consistency: ReadConsistency,
        f: impl FnOnce(&HubState) -> HubResult<T>,
    ) -> HubResult<T> {
        if consistency == ReadConsistency::Linearizable {
            self.linearize().await?;
        }
        let state = self
            .inner
            .state
            .read()
            .map_err(|_| HubError::new(ErrorCode::ServerError, "hub state lock poisoned"))?;
        f(&state)
    }

    /// Waits until the local state machine reflects every write committed before this call.
    async fn linearize(&self) -> HubResult<()> {
        let deadline = Instant::now() + self.inner.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            if !self.wait_hand_over(deadline).await {
                return Err(unavailable(
                    "the leadership hand-over did not finish in time",
                ));
            }
            let leader = match self.inner.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    f.leader_node.map(|n| (f.leader_id, n.addr))
                }
                Err(RaftError::APIError(e)) => return Err(unavailable(e.to_string())),
                Err(RaftError::Fatal(e)) => return Err(unavailable(format!("raft stopped: {e}"))),
            };
            if let Some((leader_id, addr)) = leader {
                match self.read_index_from(leader_id, &addr).await {
                    Ok(index) => {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return self
                            .inner
                            .raft
                            .wait(Some(remaining))
                            .applied_index_at_least(Some(index), "linearizable read")
                            .await
                            .map(|_| ())
                            .map_err(|e| unavailable(format!("catching up to the leader: {e}")));
                    }
                    Err(status) => {
                        tracing::debug!(%status, "read index from leader failed; retrying");
                    }
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(unavailable("no Raft leader confirmed the read in time"));
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(300));
        }
    }

    /// Changes the Raft voters through the leader (forwarding when this node is a follower).
    pub async fn change_membership(
        &self,
        change: meridian_control_plane::MembershipChange,
    ) -> HubResult<()> {
        use meridian_control_plane::MembershipChange;
        let deadline = Instant::now() + self.inner.request_timeout * 6;
        loop {
            match crate::raft::service::change_membership_locally(&self.inner.raft, &change).await {
                Err(e) if e.message == crate::raft::service::NOT_LEADER => {}
                other => return other,
            }
            let leader = self.inner.raft.metrics().borrow().current_leader;
            if let Some(addr) = leader.and_then(|l| self.node_addr(l)) {
                let (add_id, add_addr, remove_id) = match &change {
                    MembershipChange::Add { id, addr } => (*id, addr.clone(), 0),
                    MembershipChange::Remove { id } => (0, String::new(), *id),
                };
                let mut client = self.forward_client(&addr)?;
                match client
                    .change_membership(meridian_proto::hub::ChangeMembershipRequest {
                        add_id,
                        add_addr,
                        remove_id,
                    })
                    .await
                {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        if reply.error_json.is_empty() {
                            return Ok(());
                        }
                        return Err(serde_json::from_slice(&reply.error_json).unwrap_or_else(
                            |e| HubError::new(ErrorCode::ServerError, e.to_string()),
                        ));
                    }
                    Err(status) if safe_to_retry(&status) => {}
                    Err(status) => return Err(unavailable(status.message().to_string())),
                }
            }
            if Instant::now() > deadline {
                return Err(unavailable("no leader could change the membership in time"));
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// The gRPC address of cluster member `node_id`.
    pub fn node_addr(&self, node_id: NodeId) -> Option<String> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node_id)
            .map(|n| n.addr.clone())
    }

    /// Runs a direct method on the node that holds the device's connection.
    pub async fn forward_method(
        &self,
        node_id: NodeId,
        request: meridian_proto::hub::InvokeMethodRequest,
        timeout: Duration,
    ) -> HubResult<(i32, serde_json::Value)> {
        let addr = self
            .node_addr(node_id)
            .ok_or_else(|| unavailable(format!("node {node_id} is not a cluster member")))?;
        let mut client = self.forward_client(&addr)?;
        let reply = tokio::time::timeout(timeout, client.invoke_method(request))
            .await
            .map_err(|_| {
                HubError::new(
                    ErrorCode::GatewayTimeout,
                    "the device's node did not answer in time",
                )
            })?
            .map_err(|s| unavailable(format!("node {node_id}: {}", s.message())))?
            .into_inner();
        if !reply.error_json.is_empty() {
            let error: HubError = serde_json::from_slice(&reply.error_json)
                .map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()))?;
            return Err(error);
        }
        let payload =
            serde_json::from_slice(&reply.payload_json).unwrap_or(serde_json::Value::Null);
        Ok((reply.status, payload))
    }

    async fn read_index_from(
        &self,
        leader_id: Option<NodeId>,
        addr: &str,
    ) -> Result<u64, tonic::Status> {
        let mut client = self
            .forward_client(addr)
            .map_err(|e| tonic::Status::unavailable(e.message))?;
        let call = tokio::time::timeout(self.inner.request_timeout, async move {
            crate::faults::before_peer_call_to(addr).await;
            client.read_index(ReadIndexRequest {}).await
        });
        // A read is safe to retry: when another leader appears, ask it instead of waiting out a
        // deposed (paused, cut off) one.
        let reply = tokio::select! {
            reply = call => reply
                .map_err(|_| tonic::Status::deadline_exceeded("read index timed out"))??,
            () = self.until_leader_changes(leader_id) => {
                return Err(tonic::Status::unavailable("the leader changed; retrying"));
            }
        };
        Ok(reply.get_ref().read_index)
    }

    /// Resolves once this node knows a leader other than `from`.
    async fn until_leader_changes(&self, from: Option<NodeId>) {
        let mut metrics = self.inner.raft.metrics();
        loop {
            let current = metrics.borrow_and_update().current_leader;
            if current.is_some() && current != from {
                return;
            }
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Entries between two snapshots of the hub group: at least `every_logs`, and at least `per_item`
/// per item of the state (device, persistent session). A snapshot serializes the whole state, so
/// its cost grows with the registry; spacing snapshots in proportion keeps the amortized cost per
/// entry constant (a 100k-device registry is a ~90 MB snapshot: every 5000 entries, every node
/// would spend most of a connect storm building them and miss its heartbeats).
pub fn snapshot_due(
    applied: u64,
    last_snapshot: u64,
    state_items: u64,
    every_logs: u64,
    per_item: u64,
) -> bool {
    // At least one entry: an empty hub with `every_logs = 0` would rebuild every second.
    applied.saturating_sub(last_snapshot)
        >= every_logs.max(state_items.saturating_mul(per_item)).max(1)
}

impl Hub {
    /// Builds the hub group's snapshots (its Raft config says `SnapshotPolicy::Never`) when
    /// [`snapshot_due`]; checked every second until shutdown.
    pub async fn snapshot_policy(
        self,
        every_logs: u64,
        per_item: u64,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // Applied index a snapshot was requested at, until one at least that recent exists.
        let mut requested: Option<(u64, Instant)> = None;
        loop {
            tokio::select! {
                _ = sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            let (applied, snapshot) = {
                let m = self.inner.raft.metrics().borrow().clone();
                (
                    m.last_applied.map_or(0, |l| l.index),
                    m.snapshot.map_or(0, |l| l.index),
                )
            };
            if let Some((at, since)) = requested {
                // One build at a time; asked again if none came out in a minute.
                if snapshot < at && since.elapsed() < Duration::from_secs(60) {
                    continue;
                }
                requested = None;
            }
            let items = self
                .read_local(|s| (s.devices.len() + s.sessions.len()) as u64)
                .unwrap_or(0);
            if snapshot_due(applied, snapshot, items, every_logs, per_item) {
                if let Err(e) = self.inner.raft.trigger().snapshot().await {
                    tracing::warn!(error = %e, "could not trigger a hub snapshot");
                    return;
                }
                requested = Some((applied, Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::snapshot_due;

    #[test]
    fn snapshots_are_spaced_by_the_larger_of_the_setting_and_the_state_size() {
        // A small registry: every `every_logs` entries.
        assert!(!snapshot_due(4_999, 0, 10, 5_000, 1));
        assert!(snapshot_due(5_000, 0, 10, 5_000, 1));
        // 100k devices: not before 100k entries since the last snapshot.
        assert!(!snapshot_due(150_000, 60_000, 100_000, 5_000, 1));
        assert!(snapshot_due(160_000, 60_000, 100_000, 5_000, 1));
        assert!(!snapshot_due(250_000, 60_000, 100_000, 5_000, 2));
        // 0 per item: the fixed interval alone.
        assert!(snapshot_due(65_000, 60_000, 100_000, 5_000, 0));
        // A snapshot newer than the applied index (just installed) is never "due".
        assert!(!snapshot_due(10, 20, 0, 5_000, 1));
        // Nothing new since the last snapshot is never due, even with every_logs = 0.
        assert!(!snapshot_due(7, 7, 0, 0, 0));
        assert!(snapshot_due(8, 7, 0, 0, 0));
    }
}
