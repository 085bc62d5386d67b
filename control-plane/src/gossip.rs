//! Node liveness and metadata over SWIM gossip (foca), on UDP.
//!
//! Every node runs one [`Gossip`] agent bound to the UDP port with the same number as its gRPC
//! (TCP) port, so a member's gRPC address is also where to gossip with it and no extra address
//! has to be configured. The agent announces itself to the configured members, probes peers
//! (direct and indirect probes, suspicion, then down) and keeps a view of who is up with their
//! metadata (id, region, public addresses, roles). Load (connected devices, partitions led)
//! changes all the time, so it travels as versioned custom broadcasts instead of in the identity.
//!
//! Gossip is advisory: it never changes Raft voters. Raft membership stays the authority on who
//! votes; gossip tells operators and the node which peers are alive right now.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use foca::{Config, Foca, OwnedNotification, PostcardCodec, Timer};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// What a node tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeMeta {
    /// Raft node id (0 for a seed address whose identity is not known yet).
    pub id: u64,
    /// Region the node runs in.
    pub region: String,
    /// Service API address (`host:port`).
    pub https: String,
    /// MQTT device endpoint address.
    pub mqtt: String,
    /// Roles (for example `voter`, `gateway`).
    pub roles: Vec<String>,
}

/// A gossip identity: the UDP address, the metadata and an incarnation that grows when the node
/// restarts (so a restarted node wins over its dead former self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Gossip (UDP) address.
    pub addr: SocketAddr,
    /// Incarnation: milliseconds since the epoch at start, bumped on renew.
    pub incarnation: u64,
    /// Metadata.
    pub meta: NodeMeta,
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            incarnation: self.incarnation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// Liveness of a peer as gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Answering probes (directly or through others).
    Up,
    /// Declared down after failed probes and the suspicion period.
    Down,
}

/// What a node is carrying now, as it last announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Device connections open on the node.
    pub devices: u64,
    /// Telemetry partitions the node leads.
    pub partitions_led: u64,
}

/// One peer in the gossip view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// Its identity and metadata.
    pub identity: NodeIdentity,
    /// Up or down.
    pub health: Health,
    /// When the health last changed, as seen here.
    pub since: Instant,
    /// Its last announced load, if any arrived yet.
    pub load: Option<NodeLoad>,
}

/// A load announcement: the newest version per node wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoadItem {
    node: u64,
    version: u64,
    load: NodeLoad,
}

/// Broadcast key of a load announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoadKey {
    node: u64,
    version: u64,
}

impl foca::Invalidates for LoadKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.version > other.version
    }
}

type Loads = Arc<RwLock<BTreeMap<u64, (u64, NodeLoad)>>>;

/// Keeps the newest load of every node and tells foca which announcements to pass on.
struct LoadHandler {
    loads: Loads,
}

#[derive(Debug, thiserror::Error)]
#[error("bad load announcement: {0}")]
struct BadLoad(String);

impl foca::BroadcastHandler<NodeIdentity> for LoadHandler {
    type Key = LoadKey;
    type Error = BadLoad;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeIdentity>,
    ) -> Result<Option<LoadKey>, BadLoad> {
        let item: LoadItem = serde_json::from_slice(data).map_err(|e| BadLoad(e.to_string()))?;
        let Ok(mut loads) = self.loads.write() else {
            return Ok(None);
        };
        let newer = loads
            .get(&item.node)
            .is_none_or(|(version, _)| *version < item.version);
        if !newer {
            return Ok(None);
        }
        loads.insert(item.node, (item.version, item.load));
        Ok(Some(LoadKey {
            node: item.node,
            version: item.version,
        }))
    }
}

/// The gossip view: peers by node id.
pub type View = BTreeMap<u64, PeerState>;

/// Timing of the failure detector.
#[derive(Debug, Clone)]
pub struct GossipTiming {
    /// Period between probes of one random peer.
    pub probe_period: Duration,
    /// How long a direct probe may take before indirect probes start.
    pub probe_rtt: Duration,
    /// How long a suspected peer has to refute before it is declared down.
    pub suspect_to_down_after: Duration,
}

impl Default for GossipTiming {
    /// Detects a dead peer in about 2-3 s on a LAN.
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_to_down_after: Duration::from_millis(1500),
        }
    }
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The UDP socket could not be bound.
    #[error("bind gossip socket {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

enum Input {
    Data(Bytes),
    Timer(Timer<NodeIdentity>),
    Announce(SocketAddr),
    Load(NodeLoad),
}

/// A running gossip agent. Dropping every handle does not stop it; it stops at shutdown.
#[derive(Clone)]
pub struct Gossip {
    view: Arc<RwLock<View>>,
    loads: Loads,
    changes: watch::Receiver<u64>,
    local: NodeIdentity,
    input: mpsc::Sender<Input>,
}

impl Gossip {
    /// Binds `bind` (UDP), announces to `seeds` (retrying until a peer answers) and runs until
    /// `shutdown` turns true.
    pub async fn start(
        bind: SocketAddr,
        advertise: SocketAddr,
        meta: NodeMeta,
        seeds: Vec<SocketAddr>,
        timing: GossipTiming,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Self, GossipError> {
        let socket = Arc::new(
            UdpSocket::bind(bind)
                .await
                .map_err(|source| GossipError::Bind { addr: bind, source })?,
        );
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let local = NodeIdentity {
            addr: advertise,
            incarnation,
            meta,
        };
        let size = NonZeroU32::new(seeds.len().max(3) as u32).unwrap_or(NonZeroU32::MIN);
        let mut config = Config::new_lan(size);
        config.probe_period = timing.probe_period;
        config.probe_rtt = timing.probe_rtt;
        config.suspect_to_down_after = timing.suspect_to_down_after;
        // Keep announcing to down members, so a healed partition or restarted node rejoins fast.
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(2),
            num_members: std::num::NonZeroUsize::MIN,
        });
        let max_packet = config.max_packet_size.get();
        let rng: rand::rngs::StdRng = rand::make_rng();
        let loads: Loads = Arc::default();
        let mut foca = Foca::with_custom_broadcast(
            local.clone(),
            config,
            rng,
            PostcardCodec,
            LoadHandler {
                loads: loads.clone(),
            },
        );

        let view: Arc<RwLock<View>> = Arc::default();
        let (changes_tx, changes) = watch::channel(0u64);
        let (tx, mut rx) = mpsc::channel::<Input>(1024);

        // Receiver.
        {
            let (socket, tx, mut shutdown) = (socket.clone(), tx.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; max_packet.max(65_536)];
                loop {
                    tokio::select! {
                        r = socket.recv_from(&mut buf) => {
                            if let Ok((len, _)) = r
                                && tx.send(Input::Data(Bytes::copy_from_slice(&buf[..len]))).await.is_err()
                            {
                                return;
                            }
                        }
                        _ = stopped(&mut shutdown) => return,
                    }
                }
            });
        }
        // Seeds: announce until some peer is up (a seed may start later than us).
        {
            let (tx, view, mut shutdown) = (tx.clone(), view.clone(), shutdown.clone());
            let seeds: Vec<SocketAddr> = seeds.into_iter().filter(|s| *s != advertise).collect();
            tokio::spawn(async move {
                loop {
                    let anyone_up = view
                        .read()
                        .map(|v| v.values().any(|p| p.health == Health::Up))
                        .unwrap_or(false);
                    if !anyone_up {
                        for seed in &seeds {
                            if tx.send(Input::Announce(*seed)).await.is_err() {
                                return;
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopped(&mut shutdown) => return,
                    }
                }
            });
        }
        // The agent loop owns foca.
        {
            let (view, local_addr, timer_tx) = (view.clone(), advertise, tx.clone());
            let local_id = local.meta.id;
            tokio::spawn(async move {
                let mut runtime = foca::AccumulatingRuntime::new();
                let mut version = 0u64;
                loop {
                    let input = tokio::select! {
                        input = rx.recv() => match input { Some(i) => i, None => return },
                        _ = stopped(&mut shutdown) => return,
                    };
                    let result = match input {
                        Input::Data(data) => foca.handle_data(&data, &mut runtime),
                        Input::Timer(timer) => foca.handle_timer(timer, &mut runtime),
                        Input::Load(load) => {
                            let item = LoadItem {
                                node: local_id,
                                version: SystemTime::now()
                                    .duration_since(UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis() as u64),
                                load,
                            };
                            tracing::debug!(?load, "gossip: announcing load");
                            match serde_json::to_vec(&item) {
                                Ok(bytes) => foca.add_broadcast(&bytes).map(|_| ()),
                                Err(_) => Ok(()),
                            }
                        }
                        Input::Announce(addr) => foca.announce(
                            NodeIdentity {
                                addr,
                                incarnation: 0,
                                meta: NodeMeta::default(),
                            },
                            &mut runtime,
                        ),
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "gossip input ignored");
                    }
                    while let Some((dst, data)) = runtime.to_send() {
                        if dst.addr != local_addr {
                            let _ = socket.send_to(&data, dst.addr).await;
                        }
                    }
                    while let Some((delay, timer)) = runtime.to_schedule() {
                        let tx = timer_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(Input::Timer(timer)).await;
                        });
                    }
                    let mut changed = false;
                    while let Some(n) = runtime.to_notify() {
                        changed |= apply_notification(&view, n);
                    }
                    if changed {
                        version += 1;
                        let _ = changes_tx.send(version);
                    }
                }
            });
        }
        Ok(Self {
            view,
            loads,
            changes,
            local,
            input: tx,
        })
    }

    /// This node's identity.
    pub fn local(&self) -> &NodeIdentity {
        &self.local
    }

    /// The current view of the other nodes, with their last announced load.
    pub fn view(&self) -> View {
        let mut view = self.view.read().map(|v| v.clone()).unwrap_or_default();
        if let Ok(loads) = self.loads.read() {
            for (id, peer) in view.iter_mut() {
                peer.load = loads.get(id).map(|(_, l)| *l);
            }
        }
        view
    }

    /// Announces this node's load to the cluster (newest wins).
    pub async fn set_load(&self, load: NodeLoad) {
        let _ = self.input.send(Input::Load(load)).await;
    }

    /// Health of node `id`, if gossip has heard of it.
    pub fn health(&self, id: u64) -> Option<Health> {
        self.view
            .read()
            .ok()
            .and_then(|v| v.get(&id).map(|p| p.health))
    }

    /// A receiver that changes whenever the view changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Applies one foca notification to the view; returns whether it changed.
fn apply_notification(view: &RwLock<View>, n: OwnedNotification<NodeIdentity>) -> bool {
    let Ok(mut view) = view.write() else {
        return false;
    };
    let mut set = |identity: NodeIdentity, health: Health| {
        if identity.meta.id == 0 {
            return false;
        }
        let id = identity.meta.id;
        let same = view
            .get(&id)
            .is_some_and(|p| p.health == health && p.identity == identity);
        if same {
            return false;
        }
        // A late "down" about an older incarnation must not hide the newer one that is up.
        if health == Health::Down
            && view
                .get(&id)
                .is_some_and(|p| p.identity.incarnation > identity.incarnation)
        {
            return false;
        }
        tracing::info!(node = id, ?health, addr = %identity.addr, "gossip: node {}", if health == Health::Up { "up" } else { "down" });
        view.insert(
            id,
            PeerState {
                identity,
                health,
                since: Instant::now(),
                load: None,
            },
        );
        true
    };
    match n {
        OwnedNotification::MemberUp(identity) => set(identity, Health::Up),
        OwnedNotification::MemberDown(identity) => set(identity, Health::Down),
        OwnedNotification::Rename(_, new) => set(new, Health::Up),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn agent(
        port: u16,
        id: u64,
        seeds: Vec<SocketAddr>,
        shutdown: watch::Receiver<bool>,
    ) -> Gossip {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Gossip::start(
            addr,
            addr,
            NodeMeta {
                id,
                region: "r1".into(),
                ..NodeMeta::default()
            },
            seeds,
            GossipTiming::default(),
            shutdown,
        )
        .await
        .expect("start gossip")
    }

    fn free_udp_ports(n: usize) -> Vec<u16> {
        let sockets: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        sockets
            .iter()
            .map(|s| s.local_addr().expect("addr").port())
            .collect()
    }

    async fn wait_for(g: &Gossip, what: impl Fn(&View) -> bool, timeout: Duration) -> Duration {
        let start = Instant::now();
        while !what(&g.view()) {
            assert!(
                start.elapsed() < timeout,
                "gossip view stuck at {:?}",
                g.view()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn members_find_each_other_and_a_stopped_one_goes_down_then_comes_back() {
        let ports = free_udp_ports(3);
        let seeds: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let (stop_all, all) = watch::channel(false);
        let (stop_3, only_3) = watch::channel(false);
        let g1 = agent(ports[0], 1, seeds.clone(), all.clone()).await;
        let g2 = agent(ports[1], 2, seeds.clone(), all.clone()).await;
        g2.set_load(NodeLoad {
            devices: 1,
            partitions_led: 0,
        })
        .await;
        let _g3 = agent(ports[2], 3, seeds.clone(), only_3).await;
        wait_for(
            &g1,
            |v| v.len() == 2 && v.values().all(|p| p.health == Health::Up),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            g1.view().get(&3).map(|p| p.identity.meta.region.clone()),
            Some("r1".to_string())
        );
        // Load announcements reach the others; the newest wins.
        wait_for(
            &g1,
            |v| v.get(&2).and_then(|p| p.load).map(|l| l.devices) == Some(1),
            Duration::from_secs(10),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        g2.set_load(NodeLoad {
            devices: 9,
            partitions_led: 2,
        })
        .await;
        wait_for(
            &g1,
            |v| v.get(&2).and_then(|p| p.load).map(|l| l.devices) == Some(9),
            Duration::from_secs(10),
        )
        .await;
        // Node 3 stops answering: it is declared down within a few seconds.
        let _ = stop_3.send(true);
        let took = wait_for(
            &g1,
            |v| v.get(&3).is_some_and(|p| p.health == Health::Down),
            Duration::from_secs(10),
        )
        .await;
        assert!(took < Duration::from_secs(6), "detection took {took:?}");
        assert_eq!(g1.health(2), Some(Health::Up));
        // It restarts (new incarnation on the same address) and is up again.
        let (_keep, again) = watch::channel(false);
        let _g3b = agent(ports[2], 3, seeds, again).await;
        wait_for(
            &g1,
            |v| v.get(&3).is_some_and(|p| p.health == Health::Up),
            Duration::from_secs(10),
        )
        .await;
        let _ = stop_all.send(true);
    }
}
