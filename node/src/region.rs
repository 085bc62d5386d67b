//! Geo-paired regions (docs/adr/009-regions.md): each region is a cluster of its own (its own hub
//! group and partition groups); the secondary copies the primary's hub log and partition records
//! (async pair mode), the primary writes only under a fencing epoch and lease, and failover moves
//! the epoch to another region. The rules themselves live in `meridian-failover`, pure; this
//! module runs them: leases, votes, log shipping, planned and forced failover, automatic failover.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::{RaftLogReader, RaftLogStorage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::domain::{HubCommand, HubError, HubResult, HubState};
use crate::hub::Hub;
use crate::partition::{PartitionCommand, Partitions};
use crate::raft::LogStore;
use crate::raft::state_machine::SharedState;
use meridian_failover::{
    AutoDecision, AutoView, Caps, Fence, LeaseMode, LeaseReply, Promiser, RegionEpoch, VoteReply,
};
use meridian_proto::ErrorCode;
use meridian_proto::partition::ReadRawRequest;
use meridian_proto::partition::partition_service_client::PartitionServiceClient;
use meridian_proto::region as pb;
use meridian_proto::region::region_client::RegionClient;

/// What a peer region is to this hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    /// A region holding the hub's data (the primary or its geo-pair).
    Data,
    /// A region that only arbitrates: it grants leases and votes, and holds no hub data.
    Witness,
}

/// How the hub's regions replicate (docs/adr/009-regions.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Each region is a cluster of its own; the secondary copies the primary's logs
    /// asynchronously (writes at LAN latency; a region loss loses the copy lag).
    #[default]
    Async,
    /// One cluster whose voters span three regions (e.g. 2+2+1), telemetry replicas spread over
    /// them: a lost region loses no acknowledged write, at the cost of WAN latency on writes.
    Sync,
}

/// Another region of the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionPeer {
    /// Its name (the `node.region` of its nodes).
    pub name: String,
    /// Data or witness.
    pub role: PeerRole,
    /// gRPC addresses of its nodes (any of them answers).
    pub grpc_addrs: Vec<String>,
}

/// `[region]`: the hub's other regions and the failover policy. Without peers, the hub lives in
/// one region and nothing here applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionSection {
    /// `async` (default): regions are separate clusters, the secondary copies the primary.
    /// `sync`: one cluster spanning the regions named in `cluster.members[].region`.
    pub mode: ReplicationMode,
    /// Whether this node's region only arbitrates (a witness) (default false).
    pub witness: bool,
    /// The other regions (default none).
    pub peers: Vec<RegionPeer>,
    /// The region that is primary when the hub is created (default: this node's region).
    pub primary: Option<String>,
    /// The hub's name, which a failover request must repeat as confirmation (default `meridian`).
    pub hub_name: String,
    /// How long a lease lasts, in ms (default 3000).
    pub lease_ms: u64,
    /// Allowance for clock-rate drift subtracted from each lease, in ms (default 300).
    pub lease_margin_ms: u64,
    /// Promote the secondary when the primary is unreachable for `failover_grace_ms`; needs a
    /// witness region (default false).
    pub automatic_failover: bool,
    /// How long the primary must be unreachable before an automatic failover, in ms
    /// (default 10000; more than `lease_ms`).
    pub failover_grace_ms: u64,
    /// Most failovers in 24 h (default 0: no cap; Azure allows two failovers and two failbacks).
    pub max_failovers_per_day: u32,
    /// Least time between failovers in seconds (default 0: none).
    pub min_failover_spacing_secs: u64,
    /// How often an idle shipper asks the primary for news, in ms (default 100).
    pub ship_interval_ms: u64,
}

impl Default for RegionSection {
    fn default() -> Self {
        Self {
            mode: ReplicationMode::Async,
            witness: false,
            peers: Vec::new(),
            primary: None,
            hub_name: "meridian".into(),
            lease_ms: 3000,
            lease_margin_ms: 300,
            automatic_failover: false,
            failover_grace_ms: 10_000,
            max_failovers_per_day: 0,
            min_failover_spacing_secs: 0,
            ship_interval_ms: 100,
        }
    }
}

impl RegionSection {
    /// Checks the cross-field rules for a node of `my_region`.
    pub fn validate(&self, my_region: &str) -> Result<(), String> {
        if self.mode == ReplicationMode::Sync && !self.peers.is_empty() {
            return Err(
                "region.mode = \"sync\" runs one cluster: list every node in cluster.members (with \
                 its region), not in region.peers"
                    .into(),
            );
        }
        if self.peers.is_empty() {
            return Ok(());
        }
        if self.peers.iter().any(|p| p.name == my_region) {
            return Err(format!(
                "region.peers names this node's own region '{my_region}'"
            ));
        }
        if self.peers.iter().any(|p| p.grpc_addrs.is_empty()) {
            return Err("every region.peers entry needs grpc_addrs".into());
        }
        if self.lease_margin_ms >= self.lease_ms || self.lease_ms < 300 {
            return Err("region.lease_ms must be ≥ 300 and above lease_margin_ms".into());
        }
        if self.automatic_failover && !self.witness {
            if !self.has_witness() {
                return Err(
                    "region.automatic_failover needs a witness region in region.peers".into(),
                );
            }
            if self.failover_grace_ms <= self.lease_ms {
                return Err("region.failover_grace_ms must be above region.lease_ms".into());
            }
        }
        if let Some(p) = &self.primary
            && p != my_region
            && !self
                .peers
                .iter()
                .any(|x| &x.name == p && x.role == PeerRole::Data)
        {
            return Err(format!(
                "region.primary '{p}' is neither this region nor a data peer"
            ));
        }
        Ok(())
    }

    fn has_witness(&self) -> bool {
        self.peers.iter().any(|p| p.role == PeerRole::Witness)
    }

    fn lease_mode(&self) -> LeaseMode {
        if self.peers.is_empty() {
            LeaseMode::None
        } else if self.has_witness() {
            LeaseMode::Continuous
        } else {
            LeaseMode::Confirmation
        }
    }

    fn addrs(&self, region: &str) -> Vec<String> {
        self.peers
            .iter()
            .filter(|p| p.name == region)
            .flat_map(|p| p.grpc_addrs.clone())
            .collect()
    }
}

fn unavailable(message: impl Into<String>) -> HubError {
    HubError::new(ErrorCode::ServiceUnavailable, message)
}

/// The write gate every client write passes, before it is proposed and again before it is
/// acknowledged: this region must be the primary at its epoch and hold a lease.
#[derive(Debug)]
pub struct RegionGate {
    my_region: Option<String>,
    state: SharedState,
    fence: Mutex<Fence>,
    started: std::time::Instant,
}

impl RegionGate {
    /// The gate of a node of `my_region` (None: a one-region hub, where every write passes).
    pub fn new(section: &RegionSection, my_region: &str, state: SharedState) -> Arc<Self> {
        let regional = !section.peers.is_empty();
        Arc::new(Self {
            my_region: regional.then(|| my_region.to_string()),
            state,
            fence: Mutex::new(Fence::new(
                section.lease_mode(),
                section.lease_ms,
                section.lease_margin_ms,
            )),
            started: std::time::Instant::now(),
        })
    }

    /// Local monotonic milliseconds (never compared with another node's).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// This node's region when the hub is geo-paired.
    pub fn region(&self) -> Option<&str> {
        self.my_region.as_deref()
    }

    /// The epoch as applied on this node.
    pub fn epoch(&self) -> RegionEpoch {
        self.state
            .read()
            .map(|s| s.region.epoch.clone())
            .unwrap_or_default()
    }

    /// Whether this node's region is the primary at its epoch (true in a one-region hub).
    pub fn is_primary(&self) -> bool {
        match &self.my_region {
            None => true,
            Some(mine) => self.epoch().primary == *mine,
        }
    }

    /// Passes when this node may accept a client write now.
    pub fn check(&self) -> HubResult<()> {
        let Some(mine) = &self.my_region else {
            return Ok(());
        };
        let (epoch, forced_here) = match self.state.read() {
            Ok(s) => (
                s.region.epoch.clone(),
                s.region
                    .history
                    .last()
                    .is_some_and(|h| h.kind == "forced" && h.primary == *mine),
            ),
            Err(_) => return Err(unavailable("hub state lock poisoned")),
        };
        let fence = self
            .fence
            .lock()
            .map_err(|_| unavailable("fence lock poisoned"))?;
        // An operator's forced promotion vouches for this region when there is no witness to ask.
        if forced_here && fence.mode() == LeaseMode::Confirmation && epoch.primary == *mine {
            return Ok(());
        }
        fence
            .check(mine, &epoch, self.now_ms())
            .map_err(|r| unavailable(r.to_string()))
    }

    /// How long this node's lease stays valid (None: no continuous lease).
    fn lease_remaining_ms(&self) -> Option<u64> {
        self.fence
            .lock()
            .ok()
            .and_then(|f| f.remaining(self.now_ms()))
    }

    fn granted(&self, sent_at: u64) {
        if let Ok(mut f) = self.fence.lock() {
            f.on_granted(sent_at);
        }
    }

    fn revoke(&self) {
        if let Ok(mut f) = self.fence.lock() {
            f.revoke();
        }
    }
}

/// A failover's progress and outcome, as the status API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverReport {
    /// The epoch it established.
    pub epoch: u64,
    /// The new primary.
    pub primary: String,
    /// `manual`, `forced` or `automatic`.
    pub kind: String,
    /// Steps done so far: (name, ms since the start).
    pub steps: Vec<(String, u64)>,
    /// Whether it finished (successfully or not).
    pub done: bool,
    /// The error, if it failed.
    pub error: Option<String>,
    /// Total duration in ms.
    pub total_ms: u64,
}

/// The region runtime of one node.
pub struct Region {
    section: RegionSection,
    my_region: String,
    node_id: u64,
    hub: Hub,
    partitions: Partitions,
    gate: Arc<RegionGate>,
    log: LogStore,
    local_members: BTreeMap<u64, String>,
    promiser: Mutex<Promiser>,
    /// Local ms since which this node leads its region's hub group (u64::MAX: not leader).
    leader_since: AtomicU64,
    primary_last_seen: AtomicU64,
    /// Local ms when this node, leading its region's hub group, last had that confirmed by a
    /// quorum (u64::MAX: never).
    leader_confirmed_at: AtomicU64,
    /// Local ms when the copy last matched the source's applied index.
    caught_up_at: AtomicU64,
    /// Per partition this node leads: local ms when its copy last matched the source.
    partition_caught_up: Mutex<BTreeMap<u32, u64>>,
    auto: Mutex<AutoState>,
    progress: Mutex<Option<FailoverReport>>,
    failover_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct AutoState {
    sealed_until: Option<u64>,
    witness_granted: bool,
}

fn pb_epoch(e: &RegionEpoch) -> pb::RegionEpoch {
    pb::RegionEpoch {
        number: e.number,
        primary: e.primary.clone(),
    }
}

fn from_pb(e: Option<pb::RegionEpoch>) -> RegionEpoch {
    e.map(|e| RegionEpoch {
        number: e.number,
        primary: e.primary,
    })
    .unwrap_or_default()
}

fn unix_secs() -> u64 {
    crate::clock::unix_now()
}

const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// A client for one call to `addr` (after the injected WAN delay, in chaos runs).
async fn client(addr: &str) -> Result<RegionClient<tonic::transport::Channel>, String> {
    if crate::faults::is_blocked(addr) {
        // A blackholed peer: the call would time out.
        tokio::time::sleep(Duration::from_millis(700)).await;
        return Err(format!("{addr}: timed out (blocked)"));
    }
    crate::faults::before_peer_call_to(addr).await;
    crate::raft::network::channel(addr)
        .map(|c| {
            RegionClient::new(c).max_decoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES)
        })
        .map_err(|e| format!("{addr}: {e}"))
}

impl Region {
    /// The region runtime; start its loops with [`Region::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        section: RegionSection,
        my_region: String,
        node_id: u64,
        hub: Hub,
        partitions: Partitions,
        gate: Arc<RegionGate>,
        log: LogStore,
        local_members: BTreeMap<u64, String>,
    ) -> Arc<Self> {
        let epoch = gate.epoch();
        let now = gate.now_ms();
        Arc::new(Self {
            promiser: Mutex::new(Promiser::new(epoch, section.lease_ms, now)),
            section,
            my_region,
            node_id,
            hub,
            partitions,
            gate,
            log,
            local_members,
            leader_since: AtomicU64::new(u64::MAX),
            primary_last_seen: AtomicU64::new(now),
            leader_confirmed_at: AtomicU64::new(u64::MAX),
            caught_up_at: AtomicU64::new(now),
            partition_caught_up: Mutex::new(BTreeMap::new()),
            auto: Mutex::new(AutoState::default()),
            progress: Mutex::new(None),
            failover_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether the hub is geo-paired (async mode).
    pub fn enabled(&self) -> bool {
        !self.section.peers.is_empty()
    }

    /// Whether the cluster spans regions synchronously.
    pub fn sync_mode(&self) -> bool {
        self.section.mode == ReplicationMode::Sync
    }

    /// The hub's name, which a failover request repeats as confirmation.
    pub fn hub_name(&self) -> &str {
        &self.section.hub_name
    }

    /// This node's region.
    pub fn my_region(&self) -> &str {
        &self.my_region
    }

    fn now(&self) -> u64 {
        self.gate.now_ms()
    }

    fn is_leader(&self) -> bool {
        let m = self.hub.raft().metrics().borrow().clone();
        m.current_leader == Some(m.id)
    }

    fn leader_addr(&self) -> Option<String> {
        let m = self.hub.raft().metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// The region whose log this region copies: the primary at the epoch, or the configured
    /// initial primary before any epoch is known.
    fn source_region(&self) -> String {
        let epoch = self.gate.epoch();
        if epoch.number > 0 {
            epoch.primary
        } else {
            self.section
                .primary
                .clone()
                .unwrap_or_else(|| self.my_region.clone())
        }
    }

    fn state<T>(&self, f: impl FnOnce(&HubState) -> T) -> Option<T> {
        self.hub.read_local(f)
    }

    /// Status of this node's region, for the API and CLI.
    pub fn status(&self) -> Value {
        let epoch = self.gate.epoch();
        let (shipped, history) = self
            .state(|s| (s.region.shipped_index, s.region.history.clone()))
            .unwrap_or_default();
        let primary = epoch.primary == self.my_region;
        json!({
            "region": self.my_region,
            "nodeId": self.node_id,
            "witness": self.section.witness,
            "geoPaired": self.enabled(),
            "epoch": epoch.number,
            "primary": epoch.primary,
            "role": if self.section.witness { "witness" } else if primary { "primary" } else { "secondary" },
            "writable": self.gate.check().is_ok(),
            // Writes stay allowed at least this long without a renewal (continuous leases).
            "leaseRemainingMs": self.gate.lease_remaining_ms(),
            "leader": self.is_leader(),
            "shippedIndex": shipped,
            "lagMs": self.lag_ms(),
            "partitionLagMs": self.partition_lags(),
            "peers": self.section.peers,
            "history": history,
            "lastFailover": self.progress.lock().ok().and_then(|p| p.clone()),
        })
    }

    /// Per partition this node leads (secondary regions): how far behind its copy is, in ms.
    fn partition_lags(&self) -> BTreeMap<u32, u64> {
        if self.gate.is_primary() || self.section.witness {
            return BTreeMap::new();
        }
        let now = self.now();
        let caught = self
            .partition_caught_up
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        (0..self.partitions.count())
            .filter(|p| self.partitions.is_leader(*p))
            .map(|p| (p, now.saturating_sub(caught.get(&p).copied().unwrap_or(0))))
            .collect()
    }

    /// How far behind the primary this node's copies are: the hub log (on the region's leader)
    /// and the partitions it leads; the time since each last matched its source.
    fn lag_ms(&self) -> u64 {
        if self.gate.is_primary() || self.section.witness {
            return 0;
        }
        let now = self.now();
        let mut oldest = if self.is_leader() {
            self.caught_up_at.load(Ordering::Relaxed)
        } else {
            now
        };
        if let Ok(caught) = self.partition_caught_up.lock() {
            for p in 0..self.partitions.count() {
                if self.partitions.is_leader(p) {
                    // Never matched since this node took the partition: as old as the node.
                    oldest = oldest.min(caught.get(&p).copied().unwrap_or(0));
                }
            }
        }
        now.saturating_sub(oldest)
    }

    /// Runs the region loops until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        if !self.enabled() {
            return;
        }
        let tasks = vec![
            tokio::spawn(self.clone().leader_loop(shutdown.clone())),
            tokio::spawn(self.clone().lease_loop(shutdown.clone())),
            tokio::spawn(self.clone().ship_loop(shutdown.clone())),
            tokio::spawn(self.clone().monitor_loop(shutdown.clone())),
        ];
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn leader_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.hub.raft().metrics();
        loop {
            let leading = {
                let m = rx.borrow_and_update();
                m.current_leader == Some(m.id)
            };
            let since = self.leader_since.load(Ordering::Relaxed);
            if leading && since == u64::MAX {
                self.leader_since.store(self.now(), Ordering::Relaxed);
            } else if !leading {
                self.leader_since.store(u64::MAX, Ordering::Relaxed);
            }
            // The promiser follows the replicated epoch.
            let epoch = self.gate.epoch();
            if let Ok(mut p) = self.promiser.lock() {
                p.observe(&epoch);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    // ---------------------------------------------------------------- leases (primary side)

    async fn lease_loop(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        // One loop per other region plus one confirming this node's leadership, so that a region
        // that does not answer (a blackholed link waits out the call timeout) never holds back
        // the renewal from one that does.
        let mut tasks = vec![tokio::spawn(self.clone().every_lease_period(
            shutdown.clone(),
            |r: Arc<Self>| async move {
                r.confirm_leadership().await;
            },
        ))];
        for peer in 0..self.section.peers.len() {
            tasks.push(tokio::spawn(self.clone().every_lease_period(
                shutdown.clone(),
                move |r: Arc<Self>| async move { r.renew_lease_from(peer).await },
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Runs `step` every quarter lease while this node's region is primary.
    async fn every_lease_period<F, Fut>(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        step: F,
    ) where
        F: Fn(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let period = Duration::from_millis((self.section.lease_ms / 4).max(50));
        loop {
            if !self.section.witness && self.gate.is_primary() {
                step(self.clone()).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Asks the region `peers[peer]` for a promise; a grant renews the lease.
    async fn renew_lease_from(&self, peer: usize) {
        let epoch = self.gate.epoch();
        let Some(peer) = self.section.peers.get(peer) else {
            return;
        };
        if epoch.number == 0 {
            return;
        }
        let sent = self.now();
        let leader_confirmed = self.leadership_fresh();
        for addr in &peer.grpc_addrs {
            let Ok(mut c) = client(addr).await else {
                continue;
            };
            let reply = tokio::time::timeout(
                CALL_TIMEOUT,
                c.lease(pb::LeaseRequest {
                    region: self.my_region.clone(),
                    epoch: Some(pb_epoch(&epoch)),
                    leader_confirmed,
                }),
            )
            .await;
            let Ok(Ok(r)) = reply else {
                continue;
            };
            let r = r.into_inner();
            if r.granted {
                self.gate.granted(sent);
                return;
            }
            if let Some(newer) = r.newer
                && newer.number > epoch.number
            {
                let newer = from_pb(Some(newer));
                tracing::warn!(epoch = newer.number, primary = %newer.primary, "another region holds a newer epoch: demoting");
                self.gate.revoke();
                self.learn_epoch(newer).await;
                return;
            }
            // Refused (not that region's leader, or sealed): try its next node.
        }
    }

    /// Whether this node leads its region's hub group with a quorum behind it right now.
    async fn confirm_leadership(&self) -> bool {
        if !self.is_leader() {
            return false;
        }
        let confirmed = matches!(
            tokio::time::timeout(CALL_TIMEOUT, self.hub.raft().ensure_linearizable()).await,
            Ok(Ok(_))
        );
        if confirmed {
            self.leader_confirmed_at
                .store(self.now(), Ordering::Relaxed);
        }
        confirmed
    }

    /// Whether a quorum confirmed this node's leadership within the last half lease.
    fn leadership_fresh(&self) -> bool {
        let at = self.leader_confirmed_at.load(Ordering::Relaxed);
        self.is_leader() && at != u64::MAX && self.now() < at + self.section.lease_ms / 2
    }

    /// Commits an epoch heard from another region.
    async fn learn_epoch(&self, newer: RegionEpoch) {
        let current = self.gate.epoch();
        // An epoch naming this region primary is committed only by `promote`, after the copy is
        // complete (a demoted primary announces it before this region has caught up).
        if newer.number <= current.number || newer.primary == self.my_region {
            return;
        }
        let was_primary = current.primary == self.my_region;
        if let Ok(mut p) = self.promiser.lock() {
            p.observe(&newer);
        }
        let command = HubCommand::SetRegionEpoch {
            epoch: newer.clone(),
            kind: "learned".into(),
            at_unix_secs: unix_secs(),
            reset_shipping: was_primary,
            promoted_ends: None,
        };
        if let Err(e) = self.hub.write(command).await {
            tracing::warn!(error = %e, "recording a newer region epoch");
        }
    }

    // ---------------------------------------------------------------- promises (service side)

    async fn serve_lease(&self, req: pb::LeaseRequest) -> pb::LeaseResponse {
        let asked = from_pb(req.epoch);
        let refused = |why: &str| pb::LeaseResponse {
            granted: false,
            newer: None,
            refused: why.to_string(),
        };
        if !self.is_leader() {
            return refused("not the region's leader");
        }
        // Only a leader confirmed by its quorum promises (a deposed one cannot).
        if self.hub.raft().ensure_linearizable().await.is_err() {
            return refused("leadership not confirmed");
        }
        let local = self.gate.epoch();
        if asked.number > local.number {
            // The asker is ahead: record its epoch here first (this region may be the old primary).
            self.gate.revoke();
            self.learn_epoch(asked.clone()).await;
        }
        let now = self.now();
        let reply = match self.promiser.lock() {
            Ok(mut p) => {
                p.observe(&self.gate.epoch());
                p.lease(&req.region, &asked, now, req.leader_confirmed)
            }
            Err(_) => return refused("promiser lock poisoned"),
        };
        match reply {
            LeaseReply::Granted => pb::LeaseResponse {
                granted: true,
                newer: None,
                refused: String::new(),
            },
            LeaseReply::Fenced(newer) => pb::LeaseResponse {
                granted: false,
                newer: Some(pb_epoch(&newer)),
                refused: String::new(),
            },
            LeaseReply::Refused(why) => refused(&why),
        }
    }

    async fn serve_vote(&self, req: pb::VoteRequest) -> pb::VoteResponse {
        let proposed = from_pb(req.proposed);
        let answer = |granted: bool, wait_ms: u64, refused: &str| pb::VoteResponse {
            granted,
            wait_ms,
            refused: refused.to_string(),
        };
        if !self.is_leader() || self.hub.raft().ensure_linearizable().await.is_err() {
            return answer(false, 0, "not the region's leader");
        }
        let now = self.now();
        // A new leader cannot know what its predecessor promised: one lease first.
        let since = self.leader_since.load(Ordering::Relaxed);
        if since == u64::MAX || now < since + self.section.lease_ms {
            return answer(false, self.section.lease_ms, "");
        }
        let reply = match self.promiser.lock() {
            Ok(mut p) => {
                p.observe(&self.gate.epoch());
                p.vote(&proposed, now)
            }
            Err(_) => return answer(false, 0, "promiser lock poisoned"),
        };
        match reply {
            VoteReply::Granted => {
                let command = HubCommand::SetRegionEpoch {
                    epoch: proposed.clone(),
                    kind: "learned".into(),
                    at_unix_secs: unix_secs(),
                    reset_shipping: self.gate.epoch().primary == self.my_region,
                    promoted_ends: None,
                };
                match self.hub.write(command).await {
                    Ok(_) => answer(true, 0, ""),
                    Err(e) if e.code == ErrorCode::PreconditionFailed => {
                        answer(false, 0, &e.message)
                    }
                    // Unknown outcome: the promiser moved on in memory (the safe direction).
                    Err(e) => answer(false, 500, &e.message),
                }
            }
            VoteReply::Wait(ms) => answer(false, ms.max(1), ""),
            VoteReply::Refused(why) => answer(false, 0, &why),
        }
    }

    async fn serve_demote(&self, req: pb::DemoteRequest) -> Result<pb::DemoteResponse, Status> {
        let next = from_pb(req.next);
        let current = self.gate.epoch();
        if current == next {
            // Demoted for this failover already (a retried failover): answer again.
            let hub_index = self.state(|s| s.applied_index).unwrap_or(0);
            return Ok(pb::DemoteResponse { hub_index });
        }
        if current.primary != self.my_region {
            return Err(Status::failed_precondition(format!(
                "region {} is not primary (epoch {}, primary {})",
                self.my_region, current.number, current.primary
            )));
        }
        if next.number != current.number + 1 || next.primary == self.my_region {
            return Err(Status::invalid_argument(
                "the next epoch must be current + 1, elsewhere",
            ));
        }
        self.gate.revoke();
        self.hub
            .write(HubCommand::SetRegionEpoch {
                epoch: next.clone(),
                kind: "manual".into(),
                at_unix_secs: unix_secs(),
                reset_shipping: true,
                promoted_ends: None,
            })
            .await
            .map_err(|e| Status::unavailable(e.message))?;
        if let Ok(mut p) = self.promiser.lock() {
            p.observe(&next);
        }
        // This node may be a follower: the index it answers must cover the demotion entry, so
        // wait until it applied it (everything before it is what the new primary must copy).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.gate.epoch() != next {
            if tokio::time::Instant::now() > deadline {
                return Err(Status::unavailable(
                    "the demotion was not applied here in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let hub_index = self.state(|s| s.applied_index).unwrap_or(0);
        tracing::info!(epoch = next.number, primary = %next.primary, hub_index, "demoted for a planned failover");
        Ok(pb::DemoteResponse { hub_index })
    }

    async fn serve_pull_hub(&self, req: pb::PullHubRequest) -> Result<pb::PullHubResponse, Status> {
        let mut log = self.log.clone();
        let log_state = log
            .get_log_state()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (applied, epoch) = self
            .state(|s| (s.applied_index, s.region.epoch.clone()))
            .ok_or_else(|| Status::internal("hub state unreadable"))?;
        let purged = log_state.last_purged_log_id.map(|l| l.index);
        let first_available = purged.map_or(0, |p| p + 1);
        // A copy from the start (a new secondary, or a demoted primary whose copy position was
        // reset) takes the whole state: replaying this log from its first entry would apply
        // again, on top of the asker's state, commands it already holds — this region's own
        // commands from before it was ever a secondary (duplicate C2D messages, twin versions
        // counted twice, and queues pushed past their depth limit).
        if req.from_index == 0 && epoch.primary != self.my_region {
            // A whole state is complete only once this region is primary (promoted, every
            // command of the old primary copied): until then the asker waits.
            return Ok(pb::PullHubResponse {
                entries: vec![],
                snapshot_json: Vec::new(),
                snapshot_index: 0,
                applied_index: 0,
                epoch: Some(pb_epoch(&epoch)),
            });
        }
        if req.from_index == 0 || req.from_index < first_available {
            let (json, index) = self
                .state(|s| (serde_json::to_vec(s), s.applied_index))
                .ok_or_else(|| Status::internal("hub state unreadable"))?;
            let json = json.map_err(|e| Status::internal(e.to_string()))?;
            return Ok(pb::PullHubResponse {
                entries: vec![],
                snapshot_json: json,
                snapshot_index: index,
                applied_index: index,
                epoch: Some(pb_epoch(&epoch)),
            });
        }
        let max = u64::from(req.max_entries.clamp(1, 1024));
        let mut entries = Vec::new();
        if req.from_index <= applied {
            let to = applied.min(req.from_index + max - 1);
            let read = log
                .try_get_log_entries(req.from_index..=to)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            for entry in read {
                // Region bookkeeping (epochs, this region's own copies of another's log) is not
                // applied by a copy, and must not travel: copies of copies would nest without end
                // after failovers back and forth.
                let command_json = match &entry.payload {
                    openraft::EntryPayload::Normal(c)
                        if crate::domain::region::shipped_applies(c) =>
                    {
                        serde_json::to_vec(c).map_err(|e| Status::internal(e.to_string()))?
                    }
                    _ => Vec::new(),
                };
                entries.push(pb::ShippedEntry {
                    index: entry.log_id.index,
                    command_json,
                });
            }
        }
        Ok(pb::PullHubResponse {
            entries,
            snapshot_json: Vec::new(),
            snapshot_index: 0,
            applied_index: applied,
            epoch: Some(pb_epoch(&epoch)),
        })
    }

    fn serve_partition_ends(&self, partition: u32) -> Result<pb::PartitionEndsResponse, Status> {
        if !self.partitions.is_replica(partition) {
            return Err(Status::not_found(format!(
                "node {} holds no replica of partition {partition}",
                self.node_id
            )));
        }
        let applied = self
            .partitions
            .applied(partition)
            .ok_or_else(|| Status::not_found(format!("no partition {partition}")))?;
        let (promoted_epoch, promoted_ends) = self
            .state(|s| {
                (
                    s.region.promoted_epoch,
                    s.region
                        .promoted_ends
                        .get(&partition)
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        Ok(pb::PartitionEndsResponse {
            ends: applied.ends.into_iter().collect(),
            cursors: applied.cursors.into_iter().collect(),
            promoted_epoch,
            promoted_ends: promoted_ends.into_iter().collect(),
        })
    }

    // ---------------------------------------------------------------- log shipping (secondary)

    async fn ship_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let idle = Duration::from_millis(self.section.ship_interval_ms.max(10));
        loop {
            let mut busy = false;
            if !self.section.witness && !self.gate.is_primary() {
                let source = self.source_region();
                if source != self.my_region {
                    if self.is_leader() {
                        match self.ship_hub(&source).await {
                            Ok(more) => busy |= more,
                            Err(e) => tracing::debug!(error = %e, "hub shipping"),
                        }
                    }
                    // Partitions copy concurrently (each is its own Raft group and source).
                    let this: &Region = &self;
                    let copies = (0..self.partitions.count())
                        .filter(|p| this.partitions.is_leader(*p))
                        .map(|p| {
                            let source = source.clone();
                            async move { (p, this.ship_partition(&source, p).await) }
                        });
                    for (p, result) in futures::future::join_all(copies).await {
                        match result {
                            Ok(more) => busy |= more,
                            Err(e) => {
                                tracing::debug!(partition = p, error = %e, "partition shipping")
                            }
                        }
                    }
                }
            }
            let pause = if busy { Duration::from_millis(1) } else { idle };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Copies the next entries of the source's hub log; true when there was something to copy.
    async fn ship_hub(&self, source: &str) -> Result<bool, String> {
        let shipped = self.state(|s| s.region.shipped_index).flatten();
        let from = shipped.map_or(0, |i| i + 1);
        let mut last_error = String::from("no address");
        // Once the copy reaches the source's applied index of this answer, it is current as of
        // when the request was sent: the lag is the age of that moment.
        let asked_at = self.now();
        for addr in self.section.addrs(source) {
            let mut c = client(&addr).await?;
            // A whole state (a new or demoted secondary) can take seconds to build and send.
            let reply = tokio::time::timeout(
                Duration::from_secs(30),
                c.pull_hub(pb::PullHubRequest {
                    from_index: from,
                    max_entries: 256,
                }),
            )
            .await;
            let r = match reply {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    last_error = format!("{addr}: {}", s.message());
                    continue;
                }
                Err(_) => {
                    last_error = format!("{addr}: timed out");
                    continue;
                }
            };
            let source_epoch = from_pb(r.epoch.clone());
            if source_epoch.number > self.gate.epoch().number {
                self.learn_epoch(source_epoch).await;
            }
            let command = if !r.snapshot_json.is_empty() {
                let mut state: HubState =
                    serde_json::from_slice(&r.snapshot_json).map_err(|e| e.to_string())?;
                tracing::info!(
                    index = r.snapshot_index,
                    devices = state.devices.len(),
                    "installing the primary's whole hub state"
                );
                // In Raft entries of bounded size: the state, the devices in chunks, then the
                // copy position.
                let devices: Vec<_> = std::mem::take(&mut state.devices).into_iter().collect();
                self.hub
                    .write(HubCommand::InstallShippedState {
                        state: Box::new(state),
                        index: r.snapshot_index,
                        local_members: self.local_members.clone(),
                    })
                    .await
                    .map_err(|e| e.message)?;
                for chunk in devices.chunks(200) {
                    self.hub
                        .write(HubCommand::InstallShippedDevices {
                            devices: chunk.to_vec(),
                        })
                        .await
                        .map_err(|e| e.message)?;
                }
                HubCommand::ApplyShipped {
                    entries: Vec::new(),
                    through_index: r.snapshot_index,
                    local_members: self.local_members.clone(),
                }
            } else if let Some(last) = r.entries.last() {
                let through_index = last.index;
                let mut entries = Vec::with_capacity(r.entries.len());
                for e in r.entries {
                    let command = if e.command_json.is_empty() {
                        None
                    } else {
                        Some(
                            serde_json::from_slice::<HubCommand>(&e.command_json)
                                .map_err(|e| e.to_string())?,
                        )
                        .filter(crate::domain::region::shipped_applies)
                    };
                    entries.push((e.index, command));
                }
                HubCommand::ApplyShipped {
                    entries,
                    through_index,
                    local_members: self.local_members.clone(),
                }
            } else {
                if shipped.is_some_and(|s| s >= r.applied_index) {
                    self.caught_up_at.store(asked_at, Ordering::Relaxed);
                }
                return Ok(false);
            };
            self.hub.write(command).await.map_err(|e| e.message)?;
            let shipped = self.state(|s| s.region.shipped_index).flatten();
            if shipped.is_some_and(|s| s >= r.applied_index) {
                self.caught_up_at.store(asked_at, Ordering::Relaxed);
            }
            metrics_lag(self.lag_ms());
            return Ok(true);
        }
        Err(last_error)
    }

    /// Copies new records of one partition from a source replica; true when there were some.
    async fn ship_partition(&self, source: &str, partition: u32) -> Result<bool, String> {
        let Some(raft) = self.partitions.raft(partition).cloned() else {
            return Ok(false);
        };
        let local = self.partitions.applied(partition).unwrap_or_default();
        let mut last_error = String::from("no replica answered");
        let asked_at = self.now();
        for addr in self.section.addrs(source) {
            let mut c = client(&addr).await?;
            let ends = match tokio::time::timeout(
                CALL_TIMEOUT,
                c.partition_ends(pb::PartitionEndsRequest { partition }),
            )
            .await
            {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    last_error = format!("{addr}: {}", s.message());
                    continue;
                }
                Err(_) => continue,
            };
            if ends.promoted_epoch > local.reconciled_epoch {
                let promoted: BTreeMap<u32, u64> = ends.promoted_ends.into_iter().collect();
                // What it would cut now; the entry recomputes the cuts when it applies.
                let cuts = meridian_failover::truncation_points(&local.ends, &promoted);
                tracing::warn!(
                    partition,
                    epoch = ends.promoted_epoch,
                    ?cuts,
                    "cutting partition back to the new primary's history"
                );
                raft.client_write(PartitionCommand::Truncate {
                    epoch: ends.promoted_epoch,
                    promoted_ends: promoted,
                })
                .await
                .map_err(|e| e.to_string())?;
                return Ok(true);
            }
            let mut copied = false;
            // Whether this pass copies everything the source had when asked.
            let mut complete = true;
            let channel = crate::raft::network::channel(&addr).map_err(|e| e.to_string())?;
            let mut records_client = PartitionServiceClient::new(channel);
            for (key, remote_end) in &ends.ends {
                let local_end = local.ends.get(key).copied().unwrap_or(0);
                if *remote_end <= local_end {
                    continue;
                }
                crate::faults::before_peer_call_to(&addr).await;
                let read = tokio::time::timeout(
                    CALL_TIMEOUT,
                    records_client.read_raw(ReadRawRequest {
                        key: *key,
                        from_offset: local_end,
                        to_offset: *remote_end,
                        max_records: 2000,
                    }),
                )
                .await
                .map_err(|_| format!("{addr}: read timed out"))?
                .map_err(|s| format!("{addr}: {}", s.message()))?
                .into_inner()
                .records;
                let Some(first) = read.first() else { continue };
                let first_offset = first.offset;
                if read.last().is_some_and(|l| l.offset + 1 < *remote_end) {
                    complete = false;
                }
                // Offsets are consecutive in a replica (retention only removes a prefix).
                let records = read.into_iter().map(|r| r.data).collect();
                // Taken in the source's promotion epoch: should this region be promoted before
                // the copy commits, the partition discards it instead of putting the old
                // primary's records behind its new ones.
                let applied = raft
                    .client_write(PartitionCommand::ShipInEpoch {
                        epoch: ends.promoted_epoch,
                        key: *key,
                        first_offset,
                        records,
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .data;
                if !applied {
                    return Err(format!(
                        "partition {partition}: a copy of epoch {} was discarded (promoted meanwhile)",
                        ends.promoted_epoch
                    ));
                }
                copied = true;
            }
            if complete && let Ok(mut caught) = self.partition_caught_up.lock() {
                caught.insert(partition, asked_at);
            }
            for (name, next) in &ends.cursors {
                if local.cursors.get(name).is_none_or(|l| l < next) {
                    raft.client_write(PartitionCommand::SetCursor {
                        name: name.clone(),
                        next: *next,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                }
            }
            return Ok(copied);
        }
        Err(last_error)
    }

    // ---------------------------------------------------------------- health and automatic failover

    async fn monitor_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if !self.section.witness && !self.gate.is_primary() {
                let source = self.source_region();
                if self.probe(&source).await {
                    self.primary_last_seen.store(self.now(), Ordering::Relaxed);
                }
                metrics_lag(self.lag_ms());
                if self.section.automatic_failover && self.is_leader() {
                    self.automatic_step().await;
                }
            } else {
                metrics_lag(0);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Whether `region` is alive and can write: one of its nodes leads its hub group with a quorum
    /// confirmed within the last lease (answering nodes of a region that lost its quorum do not
    /// count).
    async fn probe(&self, region: &str) -> bool {
        for addr in self.section.addrs(region) {
            let Ok(mut c) = client(&addr).await else {
                continue;
            };
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(700), c.status(pb::StatusRequest {}))
                    .await
                && r.into_inner().leader_confirmed
            {
                return true;
            }
        }
        false
    }

    async fn automatic_step(&self) {
        let epoch = self.gate.epoch();
        let history = self
            .state(|s| s.region.failover_times())
            .unwrap_or_default();
        let caps_allow = self.caps().allow(&history, unix_secs()).is_ok();
        let (sealed_until, witness_granted) = match self.auto.lock() {
            Ok(a) => (a.sealed_until, a.witness_granted),
            Err(_) => return,
        };
        let now = self.now();
        let (promiser_sealed, promised_until) = match self.promiser.lock() {
            Ok(p) => (p.is_sealed(), p.promised_until()),
            Err(_) => return,
        };
        let view = AutoView {
            my_region: &self.my_region,
            epoch: &epoch,
            enabled: true,
            primary_last_seen: self.primary_last_seen.load(Ordering::Relaxed),
            leader_since: self.leader_since.load(Ordering::Relaxed).min(now),
            grace_ms: self.section.failover_grace_ms,
            lease_ms: self.section.lease_ms,
            sealed_until,
            promiser_sealed,
            promised_until,
            witness_granted,
            caps_allow,
            now,
        };
        match meridian_failover::plan_automatic(&view) {
            AutoDecision::Wait => {
                if sealed_until.is_some() {
                    if let Ok(mut p) = self.promiser.lock() {
                        p.unseal();
                    }
                    if let Ok(mut a) = self.auto.lock() {
                        *a = AutoState::default();
                    }
                }
            }
            AutoDecision::SealUntil(t) => {
                let until = match self.promiser.lock() {
                    Ok(mut p) => p.seal(now).max(t),
                    Err(_) => return,
                };
                if let Ok(mut a) = self.auto.lock() {
                    a.sealed_until = Some(until);
                }
                tracing::warn!(
                    wait_ms = until.saturating_sub(now),
                    "primary region unreachable past the grace time: sealed for promotion"
                );
            }
            AutoDecision::RequestVote(next) => {
                if self.witness_vote(&next).await == Some(true)
                    && let Ok(mut a) = self.auto.lock()
                {
                    a.witness_granted = true;
                }
            }
            AutoDecision::Promote(next) => {
                let started = std::time::Instant::now();
                let mut report = FailoverReport {
                    epoch: next.number,
                    primary: next.primary.clone(),
                    kind: "automatic".into(),
                    ..Default::default()
                };
                let result = self.promote(&next, "automatic").await;
                report
                    .steps
                    .push(("promoted".into(), started.elapsed().as_millis() as u64));
                report.done = true;
                // A promotion that failed in the same epoch is tried again (the witness's vote
                // stands); once the epoch moved on, the vote is for a stale epoch.
                let retry = result.is_err() && self.gate.epoch() == epoch;
                report.error = result.err().map(|e| e.message);
                if !retry && let Ok(mut a) = self.auto.lock() {
                    *a = AutoState::default();
                }
                if let Ok(mut p) = self.progress.lock() {
                    *p = Some(report);
                }
            }
        }
    }

    fn caps(&self) -> Caps {
        Caps {
            per_day: self.section.max_failovers_per_day,
            spacing_secs: self.section.min_failover_spacing_secs,
        }
    }

    /// Asks the witness for a vote: Some(true) granted, Some(false) refused for good, None: not now.
    async fn witness_vote(&self, next: &RegionEpoch) -> Option<bool> {
        for peer in self
            .section
            .peers
            .iter()
            .filter(|p| p.role == PeerRole::Witness)
        {
            for addr in &peer.grpc_addrs {
                let Ok(mut c) = client(addr).await else {
                    continue;
                };
                let reply = tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.vote(pb::VoteRequest {
                        proposed: Some(pb_epoch(next)),
                    }),
                )
                .await;
                if let Ok(Ok(r)) = reply {
                    let r = r.into_inner();
                    if r.granted {
                        return Some(true);
                    }
                    if r.wait_ms == 0
                        && !r.refused.is_empty()
                        && r.refused != "not the region's leader"
                    {
                        tracing::warn!(reason = %r.refused, "witness refused the promotion");
                        return Some(false);
                    }
                    if r.wait_ms > 0 {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Commits `next` in this region: from then on it is the primary (once it holds a lease).
    async fn promote(&self, next: &RegionEpoch, kind: &str) -> HubResult<()> {
        let promoted_ends: BTreeMap<u32, BTreeMap<u32, u64>> = (0..self.partitions.count())
            .filter_map(|p| self.partitions.applied(p).map(|a| (p, a.ends)))
            .collect();
        self.hub
            .write(HubCommand::SetRegionEpoch {
                epoch: next.clone(),
                kind: kind.into(),
                at_unix_secs: unix_secs(),
                reset_shipping: false,
                promoted_ends: Some(promoted_ends),
            })
            .await?;
        if let Ok(mut p) = self.promiser.lock() {
            p.observe(next);
        }
        tracing::warn!(epoch = next.number, region = %self.my_region, kind, "region promoted to primary");
        Ok(())
    }

    // ---------------------------------------------------------------- manual failover

    /// Fails the hub over to `target` (planned: the primary is demoted first and everything it
    /// acknowledged is copied before promotion; `force`: the primary is not asked). Runs on the
    /// target region's leader; other nodes forward there.
    pub async fn failover(
        &self,
        target: &str,
        hub_name: &str,
        force: bool,
    ) -> HubResult<FailoverReport> {
        if !self.enabled() {
            return Err(HubError::invalid(
                "this hub is not geo-paired (no region.peers)",
            ));
        }
        if hub_name != self.section.hub_name {
            return Err(HubError::invalid(format!(
                "confirmation failed: the hub is named '{}', not '{hub_name}'",
                self.section.hub_name
            )));
        }
        let forward_to = if target != self.my_region {
            if !self
                .section
                .peers
                .iter()
                .any(|p| p.name == target && p.role == PeerRole::Data)
            {
                return Err(HubError::invalid(format!(
                    "'{target}' is not a data region of this hub"
                )));
            }
            self.section.addrs(target)
        } else if !self.is_leader() {
            self.leader_addr().into_iter().collect()
        } else {
            Vec::new()
        };
        if !forward_to.is_empty() {
            return forward_failover(&forward_to, target, hub_name, force).await;
        }
        if self.section.witness {
            return Err(HubError::invalid("a witness region cannot become primary"));
        }
        let _one_at_a_time = self.failover_lock.lock().await;
        let epoch = self.gate.epoch();
        if epoch.primary == self.my_region {
            return Err(HubError::new(
                ErrorCode::PreconditionFailed,
                format!(
                    "region '{}' is already the primary (epoch {})",
                    self.my_region, epoch.number
                ),
            ));
        }
        let history = self
            .state(|s| s.region.failover_times())
            .unwrap_or_default();
        self.caps().allow(&history, unix_secs()).map_err(|e| {
            HubError::new(
                ErrorCode::PreconditionFailed,
                format!("failover refused: {e}"),
            )
        })?;
        let next = epoch.next(&self.my_region);
        let kind = if force { "forced" } else { "manual" };
        let started = std::time::Instant::now();
        let report = Arc::new(Mutex::new(FailoverReport {
            epoch: next.number,
            primary: next.primary.clone(),
            kind: kind.into(),
            ..Default::default()
        }));
        let step = |name: &str| {
            if let Ok(mut r) = report.lock() {
                r.steps
                    .push((name.to_string(), started.elapsed().as_millis() as u64));
                if let Ok(mut p) = self.progress.lock() {
                    *p = Some(r.clone());
                }
            }
        };
        step("started");
        let result = async {
            if force {
                self.prepare_forced(&next, &step).await?;
            } else {
                self.prepare_planned(&epoch, &next, &step).await?;
            }
            self.promote(&next, kind).await?;
            step("promoted");
            // Writable once a lease is held (a grant from the old primary or the witness).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while self.gate.check().is_err() {
                if tokio::time::Instant::now() > deadline {
                    return Err(unavailable(
                        "promoted, but no lease from another region yet",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            step("writable");
            Ok(())
        }
        .await;
        let mut out = report.lock().map(|r| r.clone()).unwrap_or_default();
        out.done = true;
        out.total_ms = started.elapsed().as_millis() as u64;
        out.error = result.as_ref().err().map(|e| e.message.clone());
        if let Ok(mut p) = self.progress.lock() {
            *p = Some(out.clone());
        }
        result.map(|()| out)
    }

    /// Planned: demote the primary, wait until none of its nodes writes, copy everything.
    async fn prepare_planned(
        &self,
        epoch: &RegionEpoch,
        next: &RegionEpoch,
        step: &impl Fn(&str),
    ) -> HubResult<()> {
        let source = epoch.primary.clone();
        let addrs = self.section.addrs(&source);
        let mut demoted = None;
        let mut last_error = String::from("no address");
        for addr in &addrs {
            let Ok(mut c) = client(addr).await else {
                continue;
            };
            match tokio::time::timeout(
                Duration::from_secs(12),
                c.demote(pb::DemoteRequest {
                    next: Some(pb_epoch(next)),
                }),
            )
            .await
            {
                Ok(Ok(r)) => {
                    demoted = Some(r.into_inner().hub_index);
                    break;
                }
                Ok(Err(s)) => last_error = format!("{addr}: {}", s.message()),
                Err(_) => last_error = format!("{addr}: timed out"),
            }
        }
        let Some(hub_index) = demoted else {
            return Err(unavailable(format!(
                "the primary region '{source}' could not be demoted ({last_error}); if it is lost, fail over with force"
            )));
        };
        step("primary demoted");
        // No node of the old primary may still take writes before the copy is declared complete.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut writable = false;
            for addr in &addrs {
                if let Ok(mut c) = client(addr).await
                    && let Ok(Ok(r)) =
                        tokio::time::timeout(CALL_TIMEOUT, c.status(pb::StatusRequest {})).await
                {
                    writable |= r.into_inner().writable;
                }
            }
            if !writable || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        step("old primary fenced");
        // The old primary writes nothing any more: wait for the copy as long as it progresses
        // (a stall of 60 s gives up; the failover can be run again and resumes here).
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            let shipped = self.state(|s| s.region.shipped_index).flatten();
            if shipped != last {
                last = shipped;
                deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            }
            let hub_done = shipped.is_some_and(|s| s >= hub_index);
            let partitions_done = hub_done && self.partitions_caught_up(&source).await;
            if partitions_done {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(unavailable(format!(
                    "copy stalled for 60 s (hub {shipped:?} of {hub_index}); run the failover again to resume"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        step("copy complete");
        Ok(())
    }

    /// Whether every partition here holds at least what the source's replicas hold.
    async fn partitions_caught_up(&self, source: &str) -> bool {
        for p in 0..self.partitions.count() {
            let local = self.partition_ends_anywhere(p).await;
            let mut answered = false;
            for addr in self.section.addrs(source) {
                let Ok(mut c) = client(&addr).await else {
                    continue;
                };
                if let Ok(Ok(r)) = tokio::time::timeout(
                    CALL_TIMEOUT,
                    c.partition_ends(pb::PartitionEndsRequest { partition: p }),
                )
                .await
                {
                    answered = true;
                    let remote = r.into_inner().ends;
                    if remote
                        .iter()
                        .any(|(k, end)| local.get(k).copied().unwrap_or(0) < *end)
                    {
                        return false;
                    }
                }
            }
            if !answered {
                return false;
            }
        }
        true
    }

    /// A partition's ends on its leader in this region (this node or a peer).
    async fn partition_ends_anywhere(&self, partition: u32) -> BTreeMap<u32, u64> {
        if self.partitions.is_leader(partition) {
            return self
                .partitions
                .applied(partition)
                .map(|a| a.ends)
                .unwrap_or_default();
        }
        if let Some((_, addr)) = self.partitions.leader(partition)
            && let Ok(mut c) = client(&addr).await
            && let Ok(Ok(r)) = tokio::time::timeout(
                CALL_TIMEOUT,
                c.partition_ends(pb::PartitionEndsRequest { partition }),
            )
            .await
        {
            return r.into_inner().ends.into_iter().collect();
        }
        BTreeMap::new()
    }

    /// Forced: stop promising the old primary, wait out every promise, get the witness's vote.
    async fn prepare_forced(&self, next: &RegionEpoch, step: &impl Fn(&str)) -> HubResult<()> {
        let now = self.now();
        let sealed_until = match self.promiser.lock() {
            Ok(mut p) => p.seal(now),
            Err(_) => return Err(unavailable("promiser lock poisoned")),
        };
        let since = self.leader_since.load(Ordering::Relaxed).min(now);
        let wait_until = sealed_until.max(since + self.section.lease_ms);
        if wait_until > now {
            tokio::time::sleep(Duration::from_millis(wait_until - now)).await;
        }
        step("leases expired");
        if self.section.has_witness() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match self.witness_vote(next).await {
                    Some(true) => break,
                    Some(false) => {
                        if let Ok(mut p) = self.promiser.lock() {
                            p.unseal();
                        }
                        return Err(HubError::new(
                            ErrorCode::PreconditionFailed,
                            "the witness refused the promotion",
                        ));
                    }
                    None if tokio::time::Instant::now() > deadline => {
                        if let Ok(mut p) = self.promiser.lock() {
                            p.unseal();
                        }
                        return Err(unavailable("the witness did not vote in time"));
                    }
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            step("witness voted");
        }
        Ok(())
    }
}

async fn forward_failover(
    addrs: &[String],
    target: &str,
    hub_name: &str,
    force: bool,
) -> HubResult<FailoverReport> {
    let mut last_error = String::from("no address");
    for addr in addrs {
        let Ok(mut c) = client(addr).await else {
            continue;
        };
        match tokio::time::timeout(
            Duration::from_secs(120),
            c.failover(pb::FailoverRequest {
                region: target.to_string(),
                hub_name: hub_name.to_string(),
                force,
            }),
        )
        .await
        {
            Ok(Ok(r)) => {
                return serde_json::from_slice(&r.into_inner().report_json)
                    .map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()));
            }
            Ok(Err(s)) => {
                let code = match s.code() {
                    tonic::Code::InvalidArgument => ErrorCode::ArgumentInvalid,
                    tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => {
                        ErrorCode::PreconditionFailed
                    }
                    _ => ErrorCode::ServiceUnavailable,
                };
                if code != ErrorCode::ServiceUnavailable {
                    return Err(HubError::new(code, s.message()));
                }
                last_error = format!("{addr}: {}", s.message());
            }
            Err(_) => last_error = format!("{addr}: timed out"),
        }
    }
    Err(unavailable(format!(
        "no node of region '{target}' took the failover: {last_error}"
    )))
}

fn metrics_lag(ms: u64) {
    crate::observability::metrics().region_lag_ms.set(ms as i64);
}

/// gRPC service of the region protocol.
pub struct RegionService {
    region: Arc<std::sync::OnceLock<Arc<Region>>>,
}

impl RegionService {
    /// Serves `region` once it is set (the gRPC server starts before the hub is built).
    pub fn new(region: Arc<std::sync::OnceLock<Arc<Region>>>) -> Self {
        Self { region }
    }

    fn get(&self) -> Result<&Arc<Region>, Status> {
        self.region
            .get()
            .ok_or_else(|| Status::unavailable("node starting"))
    }
}

fn status_of(e: HubError) -> Status {
    match e.code {
        ErrorCode::ArgumentInvalid => Status::invalid_argument(e.message),
        ErrorCode::PreconditionFailed => Status::failed_precondition(e.message),
        _ => Status::unavailable(e.message),
    }
}

#[tonic::async_trait]
impl pb::region_server::Region for RegionService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let r = self.get()?;
        let epoch = r.gate.epoch();
        let (applied, shipped) = r
            .state(|s| (s.applied_index, s.region.shipped_index))
            .unwrap_or_default();
        Ok(Response::new(pb::StatusResponse {
            region: r.my_region.clone(),
            node_id: r.node_id,
            epoch: Some(pb_epoch(&epoch)),
            writable: r.gate.check().is_ok(),
            leader: r.is_leader(),
            hub_applied_index: applied,
            shipped_index: shipped.unwrap_or(0),
            lag_ms: r.lag_ms(),
            leader_confirmed: r.leadership_fresh(),
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        Ok(Response::new(
            self.get()?.serve_lease(request.into_inner()).await,
        ))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        Ok(Response::new(
            self.get()?.serve_vote(request.into_inner()).await,
        ))
    }

    async fn demote(
        &self,
        request: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::DemoteResponse>, Status> {
        self.get()?
            .serve_demote(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn pull_hub(
        &self,
        request: Request<pb::PullHubRequest>,
    ) -> Result<Response<pb::PullHubResponse>, Status> {
        self.get()?
            .serve_pull_hub(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn partition_ends(
        &self,
        request: Request<pb::PartitionEndsRequest>,
    ) -> Result<Response<pb::PartitionEndsResponse>, Status> {
        self.get()?
            .serve_partition_ends(request.into_inner().partition)
            .map(Response::new)
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverResponse>, Status> {
        let req = request.into_inner();
        let report = self
            .get()?
            .failover(&req.region, &req.hub_name, req.force)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::FailoverResponse {
            report_json: serde_json::to_vec(&report)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_validation() {
        let mut s = RegionSection::default();
        assert!(s.validate("east").is_ok());
        s.peers.push(RegionPeer {
            name: "west".into(),
            role: PeerRole::Data,
            grpc_addrs: vec!["127.0.0.1:1".into()],
        });
        assert!(s.validate("east").is_ok());
        assert!(s.validate("west").is_err());
        s.automatic_failover = true;
        assert!(
            s.validate("east").is_err(),
            "automatic failover needs a witness"
        );
        s.peers.push(RegionPeer {
            name: "arbiter".into(),
            role: PeerRole::Witness,
            grpc_addrs: vec!["127.0.0.1:2".into()],
        });
        assert!(s.validate("east").is_ok());
        assert_eq!(s.lease_mode(), LeaseMode::Continuous);
        s.failover_grace_ms = 100;
        assert!(s.validate("east").is_err());
        s.primary = Some("arbiter".into());
        s.failover_grace_ms = 10_000;
        assert!(s.validate("east").is_err(), "a witness cannot be primary");
    }
}
