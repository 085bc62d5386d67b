//! Replicated telemetry partitions: one openraft group per partition (docs/adr/007).
//!
//! Each partition's records (every stream key `stream * 1024 + partition`) are proposed as
//! [`PartitionCommand::Append`] to that partition's Raft group, whose voters are
//! `replication_factor` nodes chosen by [`meridian_control_plane::placement`]. A device's PUBACK is
//! sent only after the entry is committed (fsync'd by a quorum) and applied on the leader. The
//! state machine writes the records into the node's [`TelemetryLog`] at offsets derived from the
//! log, so every replica holds the same offsets and a consumer checkpoint stays valid whichever
//! replica leads. Reads see only applied (committed) records.
//!
//! Any node accepts an append: it batches appends per partition and proposes locally when it leads
//! the partition, or forwards the batch over `PartitionService.Append` to the leader.

mod intake;
pub mod service;
pub mod state_machine;

pub(crate) use intake::AppendWatcher;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::domain::HubError;
use crate::raft::network::{GrpcNetworkFactory, channel};
use meridian_proto::ErrorCode;
use meridian_proto::partition::partition_service_client::PartitionServiceClient;
use meridian_proto::partition::{AppendRequest, KeyedRecord};
use meridian_storage::TelemetryLog;
pub use state_machine::PartitionStateMachine;

/// Raft node id (shared with the hub group).
pub type NodeId = u64;

/// One record for one stream key of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Stream key: `stream * STREAM_STRIDE + partition` (or the connection-events key).
    pub key: u32,
    /// The encoded telemetry message. Shared, not copied, when a batch is retried or merged;
    /// serialized as bytes (one copy) rather than as a sequence of `u8` (a call per byte), the
    /// same on postcard's wire and in JSON.
    pub data: bytes::Bytes,
}

/// A command of a partition's Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartitionCommand {
    /// Appends records (all or none); offsets are the next ones of each key, in order.
    Append {
        /// The records.
        records: Vec<Record>,
        /// The region epoch under which the proposing leader's region was primary (0 in a
        /// one-region hub). An append that reaches the log after the partition was cut back to a
        /// newer primary's history (`Truncate` of a later epoch) is discarded, not applied: its
        /// offsets belong to the new primary's records now.
        #[serde(default)]
        epoch: u64,
    },
    /// Moves an outbound endpoint's delivery cursor, so the next leader resumes where this one
    /// stopped (webhooks and file endpoints are delivered by the partition's leader).
    SetCursor {
        /// Cursor name (`webhook/{endpoint}/{key}`).
        name: String,
        /// Next offset to deliver.
        next: u64,
    },
    /// Records copied from the primary region's replica of this partition, at the offsets they
    /// have there (a secondary region's shipper). Records already held are skipped; a gap (the
    /// source's retention removed records never copied) moves the end forward. Written by
    /// versions before `ShipInEpoch`; applied as before, whatever the epoch.
    Ship {
        /// Stream key.
        key: u32,
        /// Offset of the first record.
        first_offset: u64,
        /// The records, in offset order.
        records: Vec<Vec<u8>>,
    },
    /// Cuts stream keys back to the new primary's ends at its promotion (`epoch`), discarding
    /// records this region took as primary that the new primary never received.
    Truncate {
        /// The promotion this reconciles with; applied once.
        epoch: u64,
        /// Stream key → the new primary's end at its promotion. The cuts are computed when the
        /// entry applies, not when it is proposed: appends committed in between (a cut-off
        /// leader's entries that commit after healing) must be cut too.
        promoted_ends: BTreeMap<u32, u64>,
    },
    /// `Ship`, taken while the source region was primary in `epoch`. A copy that reaches the log
    /// after this partition took appends of a later epoch (this region was promoted while the
    /// copy was in flight) or was cut back to a later promotion is discarded: its offsets belong
    /// to newer records now, and applying it would put the old primary's records after them
    /// (found by `chaos --regions async`: devices stored out of order).
    ShipInEpoch {
        /// The source's promotion epoch when the shipper asked it for its ends.
        epoch: u64,
        /// Stream key.
        key: u32,
        /// Offset of the first record.
        first_offset: u64,
        /// The records, in offset order.
        records: Vec<Vec<u8>>,
    },
}

openraft::declare_raft_types!(
    /// openraft type configuration of a telemetry partition group.
    pub PartitionTypeConfig:
        D = PartitionCommand,
        R = bool,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<PartitionTypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A partition group's Raft handle.
pub type PartitionRaft = openraft::Raft<PartitionTypeConfig>;

/// Marker before the leader's address in a "not leader" answer.
pub const LEADER_HINT: &str = "leader=";

/// Records proposed in one Raft entry at most.
const MAX_BATCH_RECORDS: usize = 2048;
/// Batches of one partition in flight at once (proposed or forwarded, awaiting commit).
const MAX_IN_FLIGHT: usize = 8;
/// Raft entries of one partition its leader has proposed and not yet seen applied. openraft 0.9
/// appends (and fsyncs) each `client_write` as its own round, one after another, so a second
/// entry queued behind the one being made durable only makes what arrives next wait one more
/// round: with one, everything arriving meanwhile goes into the next entry, proposed as soon as
/// the current one is applied (docs/adr/012, amended in session 12: +37% acked msg/s with 50
/// devices, +15% with forwarded appends, the same with 1,000 devices).
const PROPOSALS_IN_FLIGHT: usize = 1;
/// How often placement and preferred leaders are checked.
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// The partition (Raft group) a stream key belongs to.
pub fn partition_of_key(key: u32) -> u32 {
    if key == crate::mqtt::CONNECTION_EVENTS_PARTITION {
        0
    } else {
        key % crate::domain::routing::STREAM_STRIDE
    }
}

/// Records the leader proposes (from this node's batcher or forwarded by another node), merged
/// with others into one Raft entry by [`propose_merged`].
struct Proposal {
    records: Vec<Record>,
    epoch: u64,
    /// Not proposed after this (None: no deadline).
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<(), Option<HubError>>>,
}

struct Group {
    raft: PartitionRaft,
    proposals: mpsc::Sender<Proposal>,
    applied: state_machine::SharedApplied,
    /// This node's appends waiting to be batched. An append is never proposed after its
    /// deadline: the device has given up on it (and may have resent it elsewhere), so a late
    /// proposal would store it after its successors.
    intake: Arc<intake::Intake>,
    /// Set while this node hands its leadership over: it proposes nothing, so that the
    /// followers' leases lapse (appends wait and then go to the new leader).
    handing_over: Arc<std::sync::atomic::AtomicBool>,
}

struct Inner {
    node_id: NodeId,
    groups: Vec<Group>,
    replication_factor: usize,
    request_timeout: Duration,
    clients: std::sync::Mutex<HashMap<String, PartitionServiceClient<Channel>>>,
    /// The region write gate: appends are refused unless this region is the writable primary.
    gate: Option<Arc<crate::region::RegionGate>>,
    /// Region of each known node (placement spreads replicas over regions).
    regions: std::sync::RwLock<BTreeMap<NodeId, String>>,
    /// Where to send appends of partitions this node does not replicate (it has no leader for
    /// them): the last leader a peer named, else the placement's nodes in turn.
    routes: std::sync::Mutex<HashMap<u32, Route>>,
    /// Per peer address: how far its wall clock is ahead of this node's, as measured on appends
    /// (expiry times sent there are translated to its clock).
    clock_offsets: std::sync::Mutex<HashMap<String, ClockOffset>>,
    /// Peers whose append calls recently went unanswered (or could not connect), until when:
    /// appends for a leader among them go through another replica meanwhile.
    unreachable: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How long one forwarded append waits for the leader before it is tried through another
/// replica (the leader may be cut off from this node but not from the others).
const LEADER_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a peer that did not answer is reached through others.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// One peer's wall-clock offset, NTP-style from an append's send and reply times and the time
/// the peer stamped on its answer: `offset = t_peer - (t_sent + t_answered) / 2`, within
/// ± half the round trip.
#[derive(Debug, Clone, Copy)]
struct ClockOffset {
    offset_ms: i64,
    error_ms: u64,
    measured: Instant,
}

impl ClockOffset {
    /// The sample to keep: the more precise one, unless the kept one is old (clocks drift and
    /// get stepped).
    fn better(self, old: Option<Self>) -> Self {
        match old {
            Some(o)
                if o.error_ms < self.error_ms && o.measured.elapsed() < Duration::from_secs(30) =>
            {
                o
            }
            _ => self,
        }
    }
}

/// Metadata key with which a partition service stamps its wall clock (ms since the Unix epoch)
/// on every append answer, so the sender can measure the clock offset.
pub const CLOCK_METADATA: &str = "x-meridian-unix-ms";

/// The wall-clock stamp in an answer's metadata.
fn stamped_clock(metadata: &tonic::metadata::MetadataMap) -> Option<u64> {
    metadata.get(CLOCK_METADATA)?.to_str().ok()?.parse().ok()
}

#[derive(Default)]
struct Route {
    leader_hint: Option<String>,
    placement: Vec<String>,
    next: usize,
}

/// Settings of the partition groups.
#[derive(Debug, Clone)]
pub struct PartitionSettings {
    /// Partition count (fixed per hub).
    pub partitions: u32,
    /// Replicas per partition (capped by the number of voters).
    pub replication_factor: usize,
    /// How long an append may wait for a leader.
    pub request_timeout: Duration,
    /// openraft timing (shared with the hub group).
    pub raft: Arc<openraft::Config>,
    /// This node's gRPC address, named in snapshots as where to fetch their records.
    pub advertise: String,
    /// The region write gate (None: appends are never fenced).
    pub gate: Option<Arc<crate::region::RegionGate>>,
}

/// The node's partition groups. Cheap to clone.
#[derive(Clone)]
pub struct Partitions {
    inner: Arc<Inner>,
}

impl Partitions {
    /// Opens every partition group's log and state machine under `dir` and starts its Raft node
    /// and append batcher. Must run inside the Tokio runtime.
    pub async fn open(
        node_id: NodeId,
        dir: &Path,
        log: TelemetryLog,
        settings: &PartitionSettings,
    ) -> Result<Self, String> {
        let mut groups = Vec::new();
        let names: Vec<String> = (0..settings.partitions).map(|p| format!("p{p}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if dir.join("p0").exists() && !dir.join("groups").exists() {
            // Written by a version with one instance per partition (before ADR 011): starting
            // would silently begin empty logs beside it.
            return Err(format!(
                "{} holds partition logs in the old layout (p0/, p1/, ...); this version keeps them in groups/ (docs/adr/011)",
                dir.display()
            ));
        }
        // Every partition's Raft log entries in one segment log (each entry written once, one
        // fsync per round makes the appends of all partitions durable; docs/adr/018), their
        // votes, markers and snapshots in one RocksDB instance.
        let stores = meridian_storage::open_groups_in_segments::<PartitionTypeConfig>(
            &dir.join("groups"),
            &dir.join("segments"),
            meridian_storage::EntryCodec::Binary,
            &names,
        )
        .map_err(|e| format!("open partition logs: {e}"))?;
        for (p, (log_store, snapshots)) in (0..settings.partitions).zip(stores) {
            let sm =
                PartitionStateMachine::open(p, log.clone(), snapshots, settings.advertise.clone())
                    .map_err(|e| format!("open partition {p} state machine: {e}"))?;
            let applied = sm.shared();
            let raft = openraft::Raft::new(
                node_id,
                settings.raft.clone(),
                GrpcNetworkFactory::partition(p),
                log_store.bulk(),
                sm,
            )
            .await
            .map_err(|e| format!("start partition {p} raft: {e}"))?;
            let (proposals, proposals_rx) = mpsc::channel(4096);
            let handing_over = Arc::<std::sync::atomic::AtomicBool>::default();
            tokio::spawn(propose_merged(
                raft.clone(),
                p,
                handing_over.clone(),
                proposals_rx,
            ));
            groups.push(Group {
                proposals,
                raft,
                applied,
                intake: Arc::new(intake::Intake::new(MAX_BATCH_RECORDS)),
                handing_over,
            });
        }
        let partitions = Self {
            inner: Arc::new(Inner {
                node_id,
                groups,
                replication_factor: settings.replication_factor.max(1),
                request_timeout: settings.request_timeout,
                clients: std::sync::Mutex::new(HashMap::new()),
                routes: std::sync::Mutex::new(HashMap::new()),
                clock_offsets: std::sync::Mutex::new(HashMap::new()),
                unreachable: std::sync::Mutex::new(HashMap::new()),
                gate: settings.gate.clone(),
                regions: std::sync::RwLock::new(BTreeMap::new()),
            }),
        };
        for (p, group) in partitions.inner.groups.iter().enumerate() {
            tokio::spawn(batch_appends(
                partitions.clone(),
                p as u32,
                group.intake.clone(),
            ));
        }
        Ok(partitions)
    }

    /// Partition count.
    pub fn count(&self) -> u32 {
        self.inner.groups.len() as u32
    }

    /// The Raft handle of `partition`.
    pub fn raft(&self, partition: u32) -> Option<&PartitionRaft> {
        self.inner.groups.get(partition as usize).map(|g| &g.raft)
    }

    /// Whether this node leads `partition` now.
    pub fn is_leader(&self, partition: u32) -> bool {
        // Borrowed, not cloned: called per batch, and the metrics hold maps.
        self.raft(partition).is_some_and(|r| {
            let m = r.metrics();
            let m = m.borrow();
            m.current_leader == Some(m.id)
        })
    }

    /// Whether this node is a voter of `partition` (so its local log holds the partition).
    pub fn is_replica(&self, partition: u32) -> bool {
        self.raft(partition).is_some_and(|r| {
            let m = r.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.inner.node_id)
        })
    }

    /// The current leader of `partition` and its gRPC address, when known.
    pub fn leader(&self, partition: u32) -> Option<(NodeId, String)> {
        let metrics = self.raft(partition)?.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// A delivery cursor of `partition`'s group (replicated), 0 when never set.
    pub fn cursor(&self, partition: u32, name: &str) -> u64 {
        self.inner
            .groups
            .get(partition as usize)
            .and_then(|g| {
                g.applied
                    .read()
                    .ok()
                    .and_then(|a| a.cursors.get(name).copied())
            })
            .unwrap_or(0)
    }

    /// The configured region of each node (sync mode).
    pub fn regions(&self) -> BTreeMap<NodeId, String> {
        self.inner
            .regions
            .read()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// The replicas `partition` should have among `voters`, spread over the nodes' regions.
    pub fn placement(&self, partition: u32, voters: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
        let regions = self
            .inner
            .regions
            .read()
            .map(|r| r.clone())
            .unwrap_or_default();
        meridian_control_plane::placement_in_regions(
            partition,
            voters,
            &regions,
            self.inner.replication_factor,
        )
    }

    /// Records the regions of nodes (from the configuration and gossip), for placement.
    pub fn learn_regions(&self, regions: impl IntoIterator<Item = (NodeId, String)>) {
        if let Ok(mut known) = self.inner.regions.write() {
            for (id, region) in regions {
                known.entry(id).or_insert(region);
            }
        }
    }

    /// Whether this node delivers `partition` to outbound endpoints: it leads the partition in
    /// the hub's primary region.
    pub fn delivers(&self, partition: u32) -> bool {
        self.is_leader(partition) && self.inner.gate.as_ref().is_none_or(|g| g.is_primary())
    }

    /// What `partition`'s group has applied on this node (None: no such partition).
    pub fn applied(&self, partition: u32) -> Option<state_machine::Applied> {
        self.inner
            .groups
            .get(partition as usize)
            .and_then(|g| g.applied.read().ok().map(|a| a.clone()))
    }

    /// Moves a delivery cursor through `partition`'s group (this node must lead it).
    pub async fn set_cursor(&self, partition: u32, name: &str, next: u64) -> Result<(), HubError> {
        let raft = self
            .raft(partition)
            .ok_or_else(|| HubError::invalid(format!("no partition {partition}")))?;
        raft.client_write(PartitionCommand::SetCursor {
            name: name.to_string(),
            next,
        })
        .await
        .map(|_| ())
        .map_err(|e| HubError::new(ErrorCode::ServiceUnavailable, e.to_string()))
    }

    /// Appends `records` (stream keys of one partition) and returns once a quorum of the
    /// partition's replicas stored them durably. On error nothing may be assumed either way: the
    /// device gets no PUBACK and sends again (a duplicate keeps its message id).
    pub async fn append<D: Into<bytes::Bytes>>(
        &self,
        records: Vec<(u32, D)>,
    ) -> Result<(), HubError> {
        self.check_gate()?;
        // The batcher checks the gate again once the records are stored (`batch_appends`).
        self.append_unchecked(records).await
    }

    /// Ok while this region may take appends (always, in a one-region hub).
    fn check_gate(&self) -> Result<(), HubError> {
        match &self.inner.gate {
            Some(gate) => gate.check(),
            None => Ok(()),
        }
    }

    /// Like [`Partitions::append`] without waiting: `watcher` is told the outcome with `tag`
    /// once the records are committed and applied (and this region still holds the primary's
    /// lease), or failed. `Err` here means nothing was appended and the watcher is not called.
    pub(crate) fn append_watched(
        &self,
        records: Vec<(u32, bytes::Bytes)>,
        watcher: Arc<dyn intake::AppendWatcher>,
        tag: u64,
    ) -> Result<(), HubError> {
        self.check_gate()?;
        let (group, records) = self.group_of(records)?;
        group
            .intake
            .push_watched(records, self.inner.request_timeout, Some((watcher, tag)))
            .map(drop)
    }

    /// The partition group the records go to; they must all be of one partition.
    fn group_of<D: Into<bytes::Bytes>>(
        &self,
        records: Vec<(u32, D)>,
    ) -> Result<(&Group, impl ExactSizeIterator<Item = Record>), HubError> {
        let Some((first, _)) = records.first() else {
            return Err(HubError::invalid("an append needs at least one record"));
        };
        let partition = partition_of_key(*first);
        if records
            .iter()
            .any(|(k, _)| partition_of_key(*k) != partition)
        {
            return Err(HubError::invalid("records of one append span partitions"));
        }
        let group = self
            .inner
            .groups
            .get(partition as usize)
            .ok_or_else(|| HubError::invalid(format!("no partition {partition}")))?;
        let records = records.into_iter().map(|(key, data)| Record {
            key,
            data: data.into(),
        });
        Ok((group, records))
    }

    async fn append_unchecked<D: Into<bytes::Bytes>>(
        &self,
        records: Vec<(u32, D)>,
    ) -> Result<(), HubError> {
        if records.is_empty() {
            return Ok(());
        }
        let (group, records) = self.group_of(records)?;
        group
            .intake
            .push(records, self.inner.request_timeout)?
            .outcome()
            .await
    }

    /// Proposes on this node (which must lead the partition), not after `deadline`. `Err(None)`
    /// means "not the leader": nothing was proposed.
    pub(crate) async fn propose_locally(
        &self,
        partition: u32,
        records: Vec<Record>,
        deadline: Option<Instant>,
    ) -> Result<(), Option<HubError>> {
        let group = self
            .inner
            .groups
            .get(partition as usize)
            .ok_or_else(|| Some(HubError::invalid(format!("no partition {partition}"))))?;
        if group.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            // Like "not the leader": the caller retries until the new leader is known.
            return Err(None);
        }
        // Proposed only while this region is the primary, tagged with that epoch (see `Append`).
        let epoch = match &self.inner.gate {
            Some(gate) => {
                gate.check().map_err(Some)?;
                gate.epoch().number
            }
            None => 0,
        };
        let stopped = || {
            Some(HubError::new(
                ErrorCode::ServiceUnavailable,
                format!("partition {partition} stopped"),
            ))
        };
        let (reply, rx) = oneshot::channel();
        group
            .proposals
            .send(Proposal {
                records,
                epoch,
                deadline,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Resolves when this node, as a replica of `partition`, knows a leader other than `from`;
    /// never on a node outside the group.
    async fn leader_changed_from(&self, partition: u32, from: NodeId) {
        let Some(mut metrics) = self
            .raft(partition)
            .filter(|_| self.is_replica(partition) && from != 0)
            .map(|r| r.metrics())
        else {
            return std::future::pending().await;
        };
        loop {
            let current = metrics.borrow_and_update().current_leader;
            if current.is_some() && current != Some(from) {
                return;
            }
            if metrics.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    fn client(&self, addr: &str) -> Result<PartitionServiceClient<Channel>, HubError> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .map_err(|_| HubError::new(ErrorCode::ServerError, "client cache poisoned"))?;
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let c = PartitionServiceClient::new(
            channel(addr).map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()))?,
        );
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// gRPC addresses of `partition`'s replicas per the current placement (for a node that is
    /// not one of them and must read elsewhere).
    pub fn replica_addrs(&self, partition: u32) -> Vec<String> {
        self.inner
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&partition).map(|route| route.placement.clone()))
            .unwrap_or_default()
    }

    /// The node to send `partition`'s appends to when this node knows no leader for it.
    fn routed(&self, partition: u32) -> Option<(NodeId, String)> {
        let mut routes = self.inner.routes.lock().ok()?;
        let route = routes.get_mut(&partition)?;
        if let Some(hint) = &route.leader_hint {
            return Some((0, hint.clone()));
        }
        let n = route.placement.len();
        (n > 0).then(|| {
            route.next = (route.next + 1) % n;
            (0, route.placement[route.next].clone())
        })
    }

    fn note_leader_hint(&self, partition: u32, message: &str) {
        if let Ok(mut routes) = self.inner.routes.lock() {
            let route = routes.entry(partition).or_default();
            route.leader_hint = message
                .split_once(LEADER_HINT)
                .map(|(_, addr)| addr.trim().to_string())
                .filter(|a| !a.is_empty());
        }
    }

    /// Submits an append relayed by a peer that cannot reach the leader (never relayed again).
    pub(crate) async fn submit_relayed(
        &self,
        partition: u32,
        records: Vec<Record>,
        deadline: Instant,
    ) -> Result<(), HubError> {
        self.submit(partition, records, deadline, false).await
    }

    fn is_unreachable(&self, addr: &str) -> bool {
        self.inner
            .unreachable
            .lock()
            .ok()
            .and_then(|u| u.get(addr).copied())
            .is_some_and(|until| Instant::now() < until)
    }

    fn mark_unreachable(&self, addr: &str) {
        if let Ok(mut u) = self.inner.unreachable.lock() {
            tracing::info!(
                peer = addr,
                "no answer to an append; relaying through other replicas for a while"
            );
            u.insert(addr.to_string(), Instant::now() + UNREACHABLE_FOR);
        }
    }

    /// Another replica of `partition` (not `leader_addr`, not this node, not itself unreachable)
    /// to relay an append through.
    fn relay_for(&self, partition: u32, leader_addr: &str) -> Option<String> {
        let candidates: Vec<String> =
            match self.raft(partition).filter(|_| self.is_replica(partition)) {
                Some(raft) => raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(id, _)| **id != self.inner.node_id)
                    .map(|(_, n)| n.addr.clone())
                    .collect(),
                None => self
                    .inner
                    .routes
                    .lock()
                    .ok()?
                    .get(&partition)?
                    .placement
                    .clone(),
            };
        candidates
            .into_iter()
            .find(|a| a != leader_addr && !self.is_unreachable(a))
    }

    /// How far `addr`'s wall clock is ahead of this node's, in ms (0 until measured).
    fn clock_offset(&self, addr: &str) -> i64 {
        self.inner
            .clock_offsets
            .lock()
            .ok()
            .and_then(|o| o.get(addr).map(|c| c.offset_ms))
            .unwrap_or(0)
    }

    /// Records the offset of `addr`'s clock from an answer stamped with it.
    fn learn_clock_offset(&self, addr: &str, sent: u64, metadata: &tonic::metadata::MetadataMap) {
        let Some(peer) = stamped_clock(metadata) else {
            return;
        };
        let answered = crate::clock::unix_ms().max(sent);
        let sample = ClockOffset {
            offset_ms: peer as i64 - ((sent + answered) / 2) as i64,
            error_ms: (answered - sent) / 2,
            measured: Instant::now(),
        };
        if let Ok(mut offsets) = self.inner.clock_offsets.lock() {
            let kept = sample.better(offsets.get(addr).copied());
            let previous = offsets.get(addr).map_or(0, |c| c.offset_ms);
            if (kept.offset_ms - previous).abs() > 1000 {
                tracing::warn!(
                    peer = addr,
                    offset_ms = kept.offset_ms,
                    "a peer's wall clock differs from this node's by more than 1 s"
                );
            }
            offsets.insert(addr.to_string(), kept);
        }
    }

    /// Proposes a batch on the partition's leader, wherever it is, retrying while there is none
    /// or while a peer answers that it is not the leader (nothing was proposed then).
    /// With `may_relay`, a leader that does not answer is tried through another replica (see
    /// `AppendRequest.relay`); a relayed append itself is submitted without.
    async fn submit(
        &self,
        partition: u32,
        records: Vec<Record>,
        deadline: Instant,
        may_relay: bool,
    ) -> Result<(), HubError> {
        loop {
            // Checked before every attempt, not only after failures: a node that was paused
            // (SIGSTOP, a stalled VM) must not propose appends whose devices gave up on them.
            if Instant::now() >= deadline {
                return Err(HubError::new(
                    ErrorCode::ServiceUnavailable,
                    format!("partition {partition}: append expired before it could be proposed"),
                ));
            }
            let target = if self.is_replica(partition) {
                self.leader(partition)
            } else {
                self.routed(partition)
            };
            match target {
                Some((leader, _)) if leader == self.inner.node_id => {
                    match self
                        .propose_locally(partition, records.clone(), Some(deadline))
                        .await
                    {
                        Ok(()) => return Ok(()),
                        Err(Some(e)) => return Err(e),
                        Err(None) => {}
                    }
                }
                Some((target_leader, leader_addr)) => {
                    let relay = if may_relay && self.is_unreachable(&leader_addr) {
                        self.relay_for(partition, &leader_addr)
                    } else {
                        None
                    };
                    let relayed = relay.is_some();
                    let addr = relay.unwrap_or_else(|| leader_addr.clone());
                    let mut client = self.client(&addr)?;
                    // The expiry on the leader's clock: a skewed clock there must neither refuse
                    // every forwarded append nor accept stale ones.
                    let offset = self.clock_offset(&addr);
                    let expires = unix_ms_after(deadline.saturating_duration_since(Instant::now()));
                    let request = AppendRequest {
                        expires_unix_ms: expires.saturating_add_signed(offset).max(1),
                        partition,
                        records: records
                            .iter()
                            .map(|r| KeyedRecord {
                                key: r.key,
                                data: r.data.to_vec(),
                            })
                            .collect(),
                        relay: relayed,
                    };
                    // A direct call waits only so long when another replica could relay.
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let direct_with_fallback = may_relay && !relayed;
                    let wait = if direct_with_fallback {
                        wait.min(LEADER_ANSWER_TIMEOUT)
                    } else {
                        wait
                    };
                    let call = tokio::time::timeout(wait, async {
                        crate::faults::before_peer_call_to(&addr).await;
                        let sent = crate::clock::unix_ms();
                        let answer = client.append(request).await;
                        (sent, answer)
                    });
                    // A replica that learns of a new leader stops waiting for the old one (cut
                    // off or deposed): the outcome is unknown, so the device gets no PUBACK and
                    // resends, instead of waiting out the timeout.
                    let leader_changed = self.leader_changed_from(partition, target_leader);
                    let call = tokio::select! {
                        call = call => call,
                        () = leader_changed => {
                            return Err(HubError::new(
                                ErrorCode::ServiceUnavailable,
                                format!("partition {partition}: leader changed during the append"),
                            ));
                        }
                    };
                    if let Ok((sent, answer)) = &call {
                        let metadata = match answer {
                            Ok(r) => r.metadata(),
                            Err(status) => status.metadata(),
                        };
                        self.learn_clock_offset(&addr, *sent, metadata);
                    }
                    match call.map(|(_, answer)| answer) {
                        Ok(Ok(_)) => return Ok(()),
                        // Refused as expired on the leader's clock: nothing was proposed, and the
                        // offset just measured corrects the next expiry.
                        Ok(Err(status))
                            if status.code() == tonic::Code::DeadlineExceeded
                                && Instant::now() < deadline => {}
                        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                            self.note_leader_hint(partition, status.message());
                        }
                        Ok(Err(status)) if is_connect_error(&status) => {
                            if !relayed {
                                self.mark_unreachable(&addr);
                            }
                            self.note_leader_hint(partition, "");
                        }
                        Ok(Err(status)) => {
                            return Err(HubError::new(
                                ErrorCode::ServiceUnavailable,
                                format!("partition {partition} leader: {}", status.message()),
                            ));
                        }
                        // No answer from the leader directly: perhaps only this node is cut off
                        // from it. Another replica relays the next try; should the unanswered
                        // call still commit, the message is stored twice (same message id), which
                        // at-least-once delivery allows.
                        Err(_)
                            if direct_with_fallback
                                && Instant::now() < deadline
                                && self.relay_for(partition, &addr).is_some() =>
                        {
                            self.mark_unreachable(&addr);
                        }
                        Err(_) => {
                            return Err(HubError::new(
                                ErrorCode::ServiceUnavailable,
                                format!("partition {partition}: no answer from the leader"),
                            ));
                        }
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(HubError::new(
                    ErrorCode::ServiceUnavailable,
                    format!("partition {partition} has no reachable leader"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Hands this node's leadership of `partition` to voter `to` or one of `also`, keeping the
    /// group's voters (see `raft::transfer::hand_over_leadership`). Returns the new leader.
    pub async fn hand_over(
        &self,
        partition: u32,
        to: NodeId,
        also: &[NodeId],
    ) -> Result<NodeId, HubError> {
        let group = self
            .inner
            .groups
            .get(partition as usize)
            .ok_or_else(|| HubError::invalid(format!("no partition {partition}")))?;
        crate::raft::transfer::hand_over_leadership(
            &group.raft,
            partition + 1,
            to,
            also,
            &group.handing_over,
        )
        .await
    }

    /// Initializes the never-initialized partition groups whose preferred leader (placement over
    /// `members`) is this node. One node initializes each group, and it becomes its first
    /// candidate, so partition leaders start spread over the nodes.
    pub async fn bootstrap(&self, members: &BTreeMap<NodeId, String>) {
        let voters: BTreeSet<NodeId> = members.keys().copied().collect();
        for (p, group) in self.inner.groups.iter().enumerate() {
            let preferred = meridian_control_plane::preferred_leader(p as u32, &voters);
            if preferred != Some(self.inner.node_id)
                || group.raft.is_initialized().await.unwrap_or(true)
            {
                continue;
            }
            let replicas = self.placement(p as u32, &voters);
            let nodes: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .filter_map(|id| members.get(id).map(|a| (*id, BasicNode::new(a.clone()))))
                .collect();
            if let Err(e) = group.raft.initialize(nodes).await {
                tracing::warn!(partition = p, error = %e, "initialize partition group");
            }
        }
    }

    /// Keeps each partition's voters equal to the placement over the hub's voters (the hub group
    /// is the authority for who is in the cluster). Runs on every node; each changes only the
    /// partitions it leads.
    pub async fn rebalance(self, hub: crate::hub::Hub, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REBALANCE_EVERY) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let hub_metrics = hub.raft().metrics().borrow().clone();
            let membership = hub_metrics.membership_config.membership().clone();
            let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            // Draining nodes hold no replicas (unless every voter is draining).
            let draining = hub
                .read(crate::hub::ReadConsistency::Stale, |s| {
                    Ok(s.draining.clone())
                })
                .await
                .unwrap_or_default();
            if voters.iter().any(|v| !draining.contains(v)) {
                voters.retain(|v| !draining.contains(v));
            }
            let addrs: BTreeMap<NodeId, String> = membership
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect();
            if voters.is_empty() {
                continue;
            }
            for p in 0..self.count() {
                if let Ok(mut routes) = self.inner.routes.lock() {
                    routes.entry(p).or_default().placement = self
                        .placement(p, &voters)
                        .iter()
                        .filter_map(|id| addrs.get(id).cloned())
                        .collect();
                }
                let label = p.to_string();
                let gauges = crate::observability::metrics();
                gauges
                    .partition_is_leader
                    .with_label_values(&[label.as_str()])
                    .set(i64::from(self.is_leader(p)));
                gauges
                    .partition_is_replica
                    .with_label_values(&[label.as_str()])
                    .set(i64::from(self.is_replica(p)));
                let desired = self.placement(p, &voters);
                if let Err(e) = self.reconcile(p, &desired, &addrs).await {
                    tracing::warn!(partition = p, error = %e, "partition rebalance");
                }
            }
        }
    }

    async fn reconcile(
        &self,
        p: u32,
        desired: &BTreeSet<NodeId>,
        addrs: &BTreeMap<NodeId, String>,
    ) -> Result<(), String> {
        let Some(raft) = self.raft(p) else {
            return Ok(());
        };
        let m = raft.metrics().borrow().clone();
        let current: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let leads = m.current_leader == Some(m.id);
        if leads && &current != desired {
            for id in desired.difference(&current) {
                let Some(addr) = addrs.get(id) else {
                    return Err(format!("no address for node {id}"));
                };
                tracing::info!(partition = p, node = id, "adding partition replica");
                tokio::time::timeout(
                    Duration::from_secs(60),
                    raft.add_learner(*id, BasicNode::new(addr.clone()), true),
                )
                .await
                .map_err(|_| format!("node {id} did not catch up in 60 s"))?
                .map_err(|e| e.to_string())?;
            }
            tracing::info!(partition = p, ?desired, "changing partition voters");
            raft.change_membership(desired.clone(), false)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(());
        }
        Ok(())
    }

    /// Stops every partition's Raft node.
    pub async fn shutdown(&self) {
        for (p, g) in self.inner.groups.iter().enumerate() {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(partition = p, error = %e, "partition raft shutdown");
            }
        }
    }
}

/// How far a forwarded append's expiry may be behind this node's clock before the leader refuses
/// it: the allowance for clock differences between nodes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_millis(500);

/// Milliseconds since the Unix epoch, `after` from now.
pub fn unix_ms_after(after: Duration) -> u64 {
    crate::clock::unix_ms() + after.as_millis() as u64
}

fn is_connect_error(status: &tonic::Status) -> bool {
    // tonic reports a refused connection as Unavailable before anything was sent.
    status.code() == tonic::Code::Unavailable
        && (status.message().contains("connect") || status.message().contains("Connection refused"))
}

/// Collects appends of one partition into batches and proposes them, up to [`MAX_IN_FLIGHT`]
/// batches at once. Each connection waits for its own append, so a device's messages stay in
/// order; batching only merges different devices' messages.
async fn batch_appends(partitions: Partitions, partition: u32, intake: Arc<intake::Intake>) {
    // Appends made after the batcher is gone fail at once instead of waiting forever.
    struct CloseOnExit(Arc<intake::Intake>);
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseOnExit(intake.clone());
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        // The batch is formed once it may go: everything queued while the window was full
        // joins it, instead of waiting behind batches formed before.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = intake.next().await;
        let partitions = partitions.clone();
        // Unconstrained: settling writes each watched append's PUBACK (one socket write per
        // device), and Tokio's cooperative budget (128 I/O operations per poll) would turn the
        // rest of a large batch into wake-ups of their connections.
        tokio::spawn(tokio::task::unconstrained(async move {
            let Some(deadline) = batch.drop_expired(Instant::now()) else {
                return batch.settle(Ok(()));
            };
            let records = batch.take_records();
            let result = partitions.submit(partition, records, deadline, true).await;
            drop(permit);
            // Stored, but acknowledged only while this region still holds the primary's lease
            // (watchers acknowledge to devices straight from the settle).
            let result = result.and_then(|()| partitions.check_gate());
            batch.settle(result);
        }));
    }
}

/// Proposals merged into one Raft entry.
struct MergedEntry {
    epoch: u64,
    records: Vec<Record>,
    replies: Vec<oneshot::Sender<Result<(), Option<HubError>>>>,
}

/// Merges `first` and the proposals queued behind it into one entry: same region epoch, up to
/// [`MAX_BATCH_RECORDS`] records (a larger proposal alone). Returns the entry (None: every
/// proposal had expired) and a proposal of another epoch that must start the next entry.
/// Deadlines are checked here, right before the entry is proposed: a proposal may have queued
/// behind entries that could not commit (no quorum) past its device's deadline, and is then
/// answered with an error instead of being proposed.
fn form_entry(
    first: Proposal,
    rx: &mut mpsc::Receiver<Proposal>,
    now: Instant,
    partition: u32,
) -> (Option<MergedEntry>, Option<Proposal>) {
    let mut entry: Option<MergedEntry> = None;
    let mut next = Some(first);
    while let Some(p) = next.take() {
        if p.deadline.is_some_and(|d| d <= now) {
            let _ = p.reply.send(Err(Some(HubError::new(
                ErrorCode::ServiceUnavailable,
                format!("partition {partition}: append expired before it could be proposed"),
            ))));
        } else {
            match &mut entry {
                None => {
                    entry = Some(MergedEntry {
                        epoch: p.epoch,
                        records: p.records,
                        replies: vec![p.reply],
                    })
                }
                Some(e) if e.epoch == p.epoch => {
                    e.records.extend(p.records);
                    e.replies.push(p.reply);
                }
                Some(_) => return (entry, Some(p)),
            }
        }
        if entry
            .as_ref()
            .is_some_and(|e| e.records.len() >= MAX_BATCH_RECORDS)
        {
            break;
        }
        next = rx.try_recv().ok();
    }
    (entry, None)
}

/// Proposes the leader's appends of one partition: everything queued (same region epoch) goes
/// into one Raft entry, at most [`PROPOSALS_IN_FLIGHT`] entries at once. All records of an entry
/// share its fate (committed and applied, or not), so every proposer gets the entry's outcome.
async fn propose_merged(
    raft: PartitionRaft,
    partition: u32,
    handing_over: Arc<std::sync::atomic::AtomicBool>,
    mut rx: mpsc::Receiver<Proposal>,
) {
    let in_flight = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT));
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => {
                    // As the intake's batcher does: deferred until the worker runs out of tasks
                    // or polls for I/O, so proposals already on their way join this entry
                    // (docs/adr/020).
                    tokio::task::yield_now().await;
                    p
                }
                None => return,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let (entry, carry) = form_entry(first, &mut rx, Instant::now(), partition);
        carried = carry;
        let Some(MergedEntry {
            epoch,
            records,
            replies,
        }) = entry
        else {
            continue;
        };
        if handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            // Queued before the hand-over began: answered like "not the leader", so the callers
            // retry at the new leader.
            for reply in replies {
                let _ = reply.send(Err(None));
            }
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let result = raft
                .client_write(PartitionCommand::Append { records, epoch })
                .await;
            drop(permit);
            let outcome = match result {
                Ok(r) if r.data => Ok(()),
                Ok(_) => Err(Some(HubError::new(
                    ErrorCode::ServiceUnavailable,
                    format!(
                        "partition {partition}: the region failed over before the append committed; it was discarded"
                    ),
                ))),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
                Err(e) => Err(Some(HubError::new(
                    ErrorCode::ServiceUnavailable,
                    e.to_string(),
                ))),
            };
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PartitionSettings {
        PartitionSettings {
            partitions: 2,
            replication_factor: 1,
            request_timeout: Duration::from_secs(1),
            raft: Arc::new(openraft::Config::default()),
            advertise: "127.0.0.1:1".into(),
            gate: None,
        }
    }

    fn proposal(
        keys: &[u32],
        epoch: u64,
        deadline: Option<Instant>,
    ) -> (Proposal, oneshot::Receiver<Result<(), Option<HubError>>>) {
        let (reply, rx) = oneshot::channel();
        let records = keys
            .iter()
            .map(|k| Record {
                key: *k,
                data: bytes::Bytes::from(vec![*k as u8]),
            })
            .collect();
        (
            Proposal {
                records,
                epoch,
                deadline,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn queued_proposals_merge_by_epoch_and_expired_ones_are_answered_not_proposed() {
        let now = Instant::now();
        let (tx, mut rx) = mpsc::channel(16);
        let (first, _r1) = proposal(&[1, 2], 0, Some(now + Duration::from_secs(1)));
        let (expired, mut expired_rx) = proposal(&[3], 0, Some(now - Duration::from_millis(1)));
        let (second, _r3) = proposal(&[4], 0, None);
        let (other_epoch, _r4) = proposal(&[5], 1, None);
        let (after, _r5) = proposal(&[6], 0, None);
        for p in [expired, second, other_epoch, after] {
            assert!(tx.try_send(p).is_ok());
        }
        let (entry, carried) = form_entry(first, &mut rx, now, 0);
        let entry = entry.expect("an entry");
        assert_eq!(entry.epoch, 0);
        let keys: Vec<u32> = entry.records.iter().map(|r| r.key).collect();
        assert_eq!(keys, [1, 2, 4], "the expired proposal is left out");
        assert_eq!(entry.replies.len(), 2);
        assert!(
            matches!(expired_rx.try_recv(), Ok(Err(Some(e))) if e.code == ErrorCode::ServiceUnavailable),
            "the expired proposal is answered with an error"
        );
        let carried = carried.expect("the other epoch starts the next entry");
        assert_eq!(carried.epoch, 1);
        // The next entry starts with the carried proposal and stops before epoch 0 again.
        let (next, carried) = form_entry(carried, &mut rx, now, 0);
        assert_eq!(next.map(|e| e.records.len()), Some(1));
        assert_eq!(carried.map(|p| p.epoch), Some(0));

        // Everything expired: no entry at all.
        let (gone, _r) = proposal(&[7], 0, Some(now));
        let (entry, carried) = form_entry(gone, &mut rx, now, 0);
        assert!(entry.is_none() && carried.is_none());

        // A full entry stops merging; the rest waits for the next one.
        let big: Vec<u32> = (0..MAX_BATCH_RECORDS as u32).collect();
        let (full, _r) = proposal(&big, 0, None);
        let (rest, _r) = proposal(&[9], 0, None);
        assert!(tx.try_send(rest).is_ok());
        let (entry, _) = form_entry(full, &mut rx, now, 0);
        assert_eq!(entry.map(|e| e.records.len()), Some(MAX_BATCH_RECORDS));
        assert!(rx.try_recv().is_ok(), "left queued for the next entry");
    }

    #[tokio::test]
    async fn a_data_dir_in_the_old_layout_is_refused_and_the_new_one_reopens() {
        let dir = tempfile::tempdir().expect("dir");
        let log = TelemetryLog::open(&dir.path().join("telemetry"), 1 << 30).expect("log");
        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("p0")).expect("mkdir");
        let refused = Partitions::open(1, &old, log.clone(), &settings()).await;
        assert!(
            refused.is_err_and(|e| e.contains("old layout")),
            "a p0/ directory is not silently ignored"
        );

        let new = dir.path().join("new");
        let partitions = Partitions::open(1, &new, log.clone(), &settings())
            .await
            .expect("open");
        partitions.shutdown().await;
        drop(partitions);
        let reopened = Partitions::open(1, &new, log, &settings()).await;
        assert!(reopened.is_ok(), "{:?}", reopened.err());
    }
}
