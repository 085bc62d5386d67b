//! Wiring of one node, top to bottom: storage, Raft, the node-to-node gRPC server, hub creation,
//! the HTTPS service API and the metrics endpoint. `main` and every test start nodes through
//! [`start`], so tests run exactly what production runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::domain::HubCommand;
use crate::domain::policy::SharedAccessPolicy;
use crate::domain::registry::random_key;
use crate::domain::state::HubSettings;
use crate::hub::{Hub, ReadConsistency};
use crate::mqtt::{MqttContext, Sessions};
use crate::observability::metrics;
use crate::partition::service::PartitionServiceImpl;
use crate::raft::network::GrpcNetworkFactory;
use crate::raft::service::{HubForwardImpl, RaftServiceImpl};
use crate::raft::state_machine::HubStateMachine;
use crate::raft::{HubRaft, TypeConfig};
use crate::telemetry_api::TelemetryReadImpl;
use crate::tls::{self, TlsFiles};
use meridian_proto::hub::hub_forward_server::HubForwardServer;
use meridian_proto::partition::partition_service_server::PartitionServiceServer;
use meridian_proto::raft::raft_service_server::RaftServiceServer;
use meridian_proto::telemetry::telemetry_read_server::TelemetryReadServer;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Data directory or socket I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// RocksDB.
    #[error("storage: {0}")]
    Storage(#[from] meridian_storage::Error),
    /// TLS material.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// openraft.
    #[error("raft: {0}")]
    Raft(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// A running node.
pub struct Node {
    /// The hub handle.
    pub hub: Hub,
    /// Bound address of the HTTPS service API.
    pub https_addr: SocketAddr,
    /// Bound address of the node-to-node gRPC server.
    pub grpc_addr: SocketAddr,
    /// Bound address of the MQTT/TLS device endpoint.
    pub mqtt_addr: SocketAddr,
    /// Where the AMQP/TLS endpoint listens.
    pub amqp_addr: SocketAddr,
    /// The Event Hub-compatible name of the events endpoint.
    pub event_hub: String,
    /// Bound address of the metrics endpoint, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// TLS files the public listeners use.
    pub tls: TlsFiles,
    /// The hub host name clients use.
    pub host_name: String,
    /// The node's telemetry partition groups.
    pub partitions: crate::partition::Partitions,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Node {
    /// Waits until the hub exists (created by the leader on first start) and returns its
    /// `iothubowner` policy.
    pub async fn wait_hub_ready(&self, timeout: Duration) -> Option<SharedAccessPolicy> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let owner = self
                .hub
                .read(ReadConsistency::Linearizable, |s| {
                    Ok(s.policy("iothubowner").cloned())
                })
                .await
                .ok()
                .flatten();
            if owner.is_some() {
                return owner;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Waits for every task to end (after shutdown), then stops Raft.
    pub async fn join(self) {
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(task = name, error = %e, "task failed");
            }
        }
        self.partitions.shutdown().await;
        if let Err(e) = self.hub.raft().shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        tracing::info!("node stopped");
    }
}

/// openraft settings of the hub group (`snapshot_policy: Never`: [`Hub::snapshot_policy`] builds
/// its snapshots, spaced by the state's size) or, with `hub = false`, of a partition group (whose
/// snapshots are small: every `snapshot_every_logs` entries).
fn raft_config(config: &Config, hub: bool) -> Result<Arc<openraft::Config>, StartError> {
    let c = &config.cluster;
    let raft = openraft::Config {
        cluster_name: "meridian-hub".into(),
        heartbeat_interval: c.heartbeat_interval_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        snapshot_policy: if hub {
            openraft::SnapshotPolicy::Never
        } else {
            openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_every_logs)
        },
        max_in_snapshot_log_to_keep: c.max_in_snapshot_log_to_keep,
        ..Default::default()
    };
    Ok(Arc::new(
        raft.validate()
            .map_err(|e| StartError::Raft(e.to_string()))?,
    ))
}

/// The settings a new hub is created with: the default policies with fresh keys, and limits.
fn new_hub_settings(config: &Config) -> HubSettings {
    let keys = std::array::from_fn(|_| (random_key(), random_key()));
    HubSettings {
        policies: SharedAccessPolicy::defaults(keys)
            .into_iter()
            .map(|p| (p.key_name.clone(), p))
            .collect(),
        twin_limits: config.hub.twin_limits.clone(),
        max_devices: config.hub.max_devices,
        max_modules_per_device: config.hub.max_modules_per_device,
        routing_limits: config.hub.routing_limits.clone(),
        operator_key: random_key(),
        created_ms: crate::clock::unix_ms(),
        initial_members: config
            .members()
            .into_iter()
            .map(|m| (m.id, m.grpc_addr))
            .collect(),
    }
}

/// Starts a node; it runs until `shutdown` turns true, then [`Node::join`] returns.
pub async fn start(config: Config, shutdown: watch::Receiver<bool>) -> Result<Node, StartError> {
    config.validate()?;
    let node_id = config.node.id;
    let data_dir: PathBuf = config.node.data_dir.clone();
    tracing::info!(node_id, data_dir = %data_dir.display(), "starting meridian node");

    // ---- storage ----
    std::fs::create_dir_all(&data_dir).map_err(io(format!("create {}", data_dir.display())))?;
    let (log_store, snapshots) = meridian_storage::open::<TypeConfig>(&data_dir.join("raft"))?;
    let geo_paired = !config.region.peers.is_empty();
    let state_machine =
        HubStateMachine::open_in_region(snapshots, geo_paired.then(|| config.node.region.clone()))
            .map_err(|e| StartError::Raft(e.to_string()))?;
    let state = state_machine.shared_state();
    let gate = crate::region::RegionGate::new(&config.region, &config.node.region, state.clone());
    let region_log = log_store.clone();
    let events = state_machine.events();
    let telemetry = meridian_storage::TelemetryLog::open(
        &data_dir.join("telemetry"),
        config.mqtt.retention_bytes,
    )?;

    // ---- tls ----
    let tls_files = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca_cert: None,
        },
        _ => tls::ensure_dev_certificates(&data_dir.join("tls"))?,
    };
    let https_tls = tls::server_config(&tls_files, &[b"h2", b"http/1.1"])?;

    // ---- raft ----
    let raft: HubRaft = openraft::Raft::new(
        node_id,
        raft_config(&config, true)?,
        GrpcNetworkFactory::hub(),
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let hub = Hub::new(
        raft.clone(),
        state,
        events,
        Duration::from_millis(config.cluster.request_timeout_ms),
        gate.clone(),
    );
    hub.use_lapse_transfers(config.region.mode == crate::region::ReplicationMode::Sync);
    let partitions = crate::partition::Partitions::open(
        node_id,
        &data_dir.join("partitions"),
        telemetry.clone(),
        &crate::partition::PartitionSettings {
            partitions: config.mqtt.partitions,
            replication_factor: config.cluster.replication_factor,
            request_timeout: Duration::from_millis(config.cluster.request_timeout_ms),
            raft: raft_config(&config, false)?,
            advertise: config.cluster.advertise(),
            gate: geo_paired.then(|| gate.clone()),
        },
    )
    .await
    .map_err(StartError::Raft)?;
    // Regions of the configured members (identical on every node, so every node computes the
    // same placement): replicas spread over regions when the cluster spans them (sync mode).
    partitions.learn_regions(
        config
            .cluster
            .members
            .iter()
            .filter_map(|m| m.region.clone().map(|r| (m.id, r))),
    );
    let event_reader = crate::telemetry_api::EventReader::new(
        telemetry.clone(),
        config.mqtt.partitions,
        hub.clone(),
    )
    .with_groups(partitions.clone());
    let mqtt = Arc::new(MqttContext {
        hub: hub.clone(),
        partition_groups: partitions.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
        sessions: Sessions::default(),
        partitions: config.mqtt.partitions,
        max_packet_bytes: config.mqtt.max_packet_bytes,
        max_telemetry_bytes: config.mqtt.max_telemetry_bytes,
        node_id,
        c2d_lock_timeout: Duration::from_secs(config.mqtt.c2d_lock_timeout_secs),
    });
    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();

    let control_slot: Arc<std::sync::OnceLock<crate::control::ControlPlane>> = Arc::default();
    let region = crate::region::Region::new(
        config.region.clone(),
        config.node.region.clone(),
        node_id,
        hub.clone(),
        partitions.clone(),
        gate.clone(),
        region_log,
        config
            .members()
            .into_iter()
            .map(|m| (m.id, m.grpc_addr))
            .collect(),
    );
    let region_slot: Arc<std::sync::OnceLock<Arc<crate::region::Region>>> = Arc::default();
    let _ = region_slot.set(region.clone());

    // ---- node-to-node grpc ----
    let grpc_listener = TcpListener::bind(config.cluster.grpc_listen)
        .await
        .map_err(io(format!("bind grpc {}", config.cluster.grpc_listen)))?;
    let grpc_addr = grpc_listener.local_addr().map_err(io("grpc local addr"))?;
    {
        let raft = raft.clone();
        let partitions_for_grpc = partitions.clone();
        let control_for_grpc = control_slot.clone();
        let telemetry_for_grpc = telemetry.clone();
        let reader_for_grpc = event_reader.clone();
        let mqtt_for_grpc = mqtt.clone();
        let region_for_grpc = region_slot.clone();
        let mut shutdown = shutdown.clone();
        tasks.push((
            "grpc",
            tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener)
                    .with_nodelay(Some(true));
                let result = tonic::transport::Server::builder()
                    .add_service(
                        RaftServiceServer::new(RaftServiceImpl::new(
                            raft.clone(),
                            partitions_for_grpc.clone(),
                        ))
                        .max_decoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES),
                    )
                    .add_service(
                        meridian_proto::control::control_plane_server::ControlPlaneServer::new(
                            crate::control::ControlPlaneService::new(control_for_grpc),
                        ),
                    )
                    .add_service(PartitionServiceServer::new(PartitionServiceImpl::new(
                        partitions_for_grpc,
                        telemetry_for_grpc,
                    )))
                    .add_service(
                        HubForwardServer::new(HubForwardImpl::new(raft, mqtt_for_grpc))
                            .max_decoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES),
                    )
                    .add_service(TelemetryReadServer::new(TelemetryReadImpl::new(
                        reader_for_grpc,
                    )))
                    .add_service(
                        meridian_proto::region::region_server::RegionServer::new(
                            crate::region::RegionService::new(region_for_grpc),
                        )
                        .max_decoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES),
                    )
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = shutdown.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "grpc server failed");
                }
            }),
        ));
    }
    tracing::info!(%grpc_addr, "raft grpc listening");

    // ---- bootstrap the raft group ----
    let members = config.members();
    let lowest = members.iter().map(|m| m.id).min().unwrap_or(node_id);
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if !initialized && lowest == node_id {
        let voters: BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|m| (m.id, BasicNode::new(m.grpc_addr.clone())))
            .collect();
        tracing::info!(?voters, "initializing raft group");
        if let Err(e) = raft.initialize(voters).await {
            tracing::warn!(error = %e, "initialize raft group");
        }
    }

    // ---- drain: follow the replicated draining set; close device connections when drained ----
    {
        let (hub, mqtt, mut shutdown) = (hub.clone(), mqtt.clone(), shutdown.clone());
        tasks.push((
            "drain-watch",
            tokio::spawn(async move {
                loop {
                    // A node of a region that is not the hub's primary takes no devices either:
                    // they reconnect (the SDKs retry) and reach the primary region.
                    let draining = hub
                        .read(ReadConsistency::Stale, |s| {
                            Ok(s.draining.contains(&node_id))
                        })
                        .await
                        .unwrap_or(false)
                        || !hub.gate().is_primary();
                    let was = mqtt
                        .draining
                        .swap(draining, std::sync::atomic::Ordering::Relaxed);
                    if draining && !was {
                        let closed = mqtt.sessions.close_all();
                        tracing::info!(closed, "node draining: closed device connections");
                    } else if !draining && was {
                        tracing::info!("node back in service");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }

    // ---- bootstrap the partition groups (once the hub exists), then keep their placement ----
    {
        let (hub, partitions, mut shutdown) = (hub.clone(), partitions.clone(), shutdown.clone());
        tasks.push((
            "partition-bootstrap",
            tokio::spawn(async move {
                loop {
                    let initial = hub
                        .read(ReadConsistency::Stale, |s| {
                            Ok(s.settings.as_ref().map(|s| s.initial_members.clone()))
                        })
                        .await
                        .ok()
                        .flatten();
                    if let Some(members) = initial {
                        partitions.bootstrap(&members).await;
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }
    tasks.push(("region", tokio::spawn(region.clone().run(shutdown.clone()))));
    tasks.push((
        "hub-snapshots",
        tokio::spawn(hub.clone().snapshot_policy(
            config.cluster.snapshot_every_logs,
            config.cluster.hub_snapshot_logs_per_item,
            shutdown.clone(),
        )),
    ));
    tasks.push((
        "partition-rebalance",
        tokio::spawn(partitions.clone().rebalance(hub.clone(), shutdown.clone())),
    ));

    // ---- create the hub once a leader exists ----
    {
        let hub = hub.clone();
        let config = config.clone();
        let mut shutdown = shutdown.clone();
        tasks.push((
            "hub-creation",
            tokio::spawn(async move {
                loop {
                    let exists = hub
                        .read(ReadConsistency::Stale, |s| Ok(s.settings.is_some()))
                        .await
                        .unwrap_or(false);
                    if exists {
                        return;
                    }
                    let leader = hub.raft().metrics().borrow().current_leader;
                    // In a geo-paired hub only the initial primary region creates the hub (with its
                    // first epoch); the others receive it by copying the primary's log.
                    let creates = !geo_paired
                        || (!config.region.witness
                            && config
                                .region
                                .primary
                                .as_deref()
                                .unwrap_or(&config.node.region)
                                == config.node.region);
                    if geo_paired && !creates {
                        return;
                    }
                    if leader == Some(node_id) {
                        if geo_paired && hub.gate().epoch().number == 0 {
                            let first = HubCommand::SetRegionEpoch {
                                epoch: meridian_failover::RegionEpoch {
                                    number: 1,
                                    primary: config.node.region.clone(),
                                },
                                kind: "initial".into(),
                                at_unix_secs: 0,
                                reset_shipping: false,
                                promoted_ends: None,
                            };
                            if let Err(e) = hub.write(first).await {
                                tracing::warn!(error = %e, "first region epoch");
                            }
                        }
                        let settings = new_hub_settings(&config);
                        match hub.write(HubCommand::InitHub { settings }).await {
                            Ok(r) => tracing::info!(?r, "hub created"),
                            Err(e) => tracing::warn!(error = %e, "hub creation"),
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }

    // ---- raft metrics ----
    {
        let hub = hub.clone();
        let mut rx = raft.metrics();
        let mut shutdown = shutdown.clone();
        tasks.push((
            "raft-metrics",
            tokio::spawn(async move {
                loop {
                    {
                        let m = rx.borrow_and_update();
                        let gauges = metrics();
                        gauges.raft_term.set(m.current_term as i64);
                        gauges
                            .raft_last_applied
                            .set(m.last_applied.map_or(0, |l| l.index) as i64);
                        gauges
                            .raft_is_leader
                            .set(i64::from(m.current_leader == Some(m.id)));
                    }
                    if let Ok(n) = hub
                        .read(ReadConsistency::Stale, |s| Ok(s.devices.len() as i64))
                        .await
                    {
                        metrics().registry_devices.set(n);
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return },
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }

    // ---- mqtt device endpoint ----
    let mqtt_listener = TcpListener::bind(config.mqtt.tls_listen)
        .await
        .map_err(io(format!("bind mqtt {}", config.mqtt.tls_listen)))?;
    let mqtt_addr = mqtt_listener.local_addr().map_err(io("mqtt local addr"))?;
    let mqtt_tls = tls::mqtt_server_config(&tls_files)?;
    {
        tasks.push((
            "mqtt",
            tokio::spawn(crate::mqtt::serve_tls(
                mqtt.clone(),
                mqtt_listener,
                mqtt_tls,
                shutdown.clone(),
            )),
        ));
        tasks.push((
            "mqtt-events",
            tokio::spawn(crate::mqtt::pump_events(
                mqtt.clone(),
                hub.subscribe_events(),
                shutdown.clone(),
            )),
        ));
    }
    tracing::info!(%mqtt_addr, "mqtt device endpoint listening (tls)");

    // ---- c2d expiry: the leader drops expired messages and records their feedback ----
    {
        let hub = hub.clone();
        let mut shutdown = shutdown.clone();
        tasks.push((
            "c2d-expiry",
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    if hub.raft().metrics().borrow().current_leader != Some(node_id) {
                        continue;
                    }
                    let now_ms = crate::clock::unix_ms();
                    let any_expired = hub
                        .read(ReadConsistency::Stale, |s| {
                            Ok(s.devices
                                .values()
                                .any(|e| e.c2d.messages.iter().any(|m| m.expiry_ms <= now_ms)))
                        })
                        .await
                        .unwrap_or(false);
                    if any_expired {
                        let now = crate::clock::iso_now();
                        if let Err(e) = hub.write(HubCommand::ExpireC2d { now_ms, now }).await {
                            tracing::warn!(error = %e, "c2d expiry");
                        }
                    }
                }
            }),
        ));
    }

    // ---- telemetry retention ----
    {
        let (reader, mut shutdown) = (event_reader.clone(), shutdown.clone());
        let (retention, every) = (
            config.mqtt.retention_secs,
            Duration::from_secs(config.mqtt.retention_check_secs.max(1)),
        );
        tasks.push((
            "retention",
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    let cutoff =
                        chrono::TimeDelta::try_seconds(retention.min(i64::MAX as u64) as i64)
                            .and_then(|d| crate::clock::utc_now().checked_sub_signed(d))
                            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    match reader.apply_retention(&cutoff).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(partitions = n, %cutoff, "telemetry retention applied")
                        }
                        Err(e) => tracing::warn!(error = %e, "telemetry retention"),
                    }
                }
            }),
        ));
    }

    // ---- webhook endpoints ----
    let webhook_health = crate::webhook::WebhookHealth::default();
    tasks.push((
        "webhooks",
        tokio::spawn(crate::webhook::run(
            hub.clone(),
            partitions.clone(),
            event_reader.clone(),
            webhook_health.clone(),
            shutdown.clone(),
        )),
    ));

    // ---- https service api ----
    let https_listener = TcpListener::bind(config.api.https_listen)
        .await
        .map_err(io(format!("bind https {}", config.api.https_listen)))?;
    let https_addr = https_listener
        .local_addr()
        .map_err(io("https local addr"))?;

    // ---- gossip: liveness and metadata of the other nodes (UDP, on the gRPC port number) ----
    let gossip_advertise: SocketAddr = config.cluster.advertise().parse().unwrap_or(grpc_addr);
    let seeds: Vec<SocketAddr> = members
        .iter()
        .filter_map(|m| m.grpc_addr.parse().ok())
        .collect();
    let gossip = meridian_control_plane::gossip::Gossip::start(
        SocketAddr::new(config.cluster.grpc_listen.ip(), grpc_addr.port()),
        gossip_advertise,
        meridian_control_plane::gossip::NodeMeta {
            id: node_id,
            region: config.node.region.clone(),
            https: https_addr.to_string(),
            mqtt: mqtt_addr.to_string(),
            roles: vec!["voter".into()],
        },
        seeds,
        meridian_control_plane::gossip::GossipTiming::default(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;
    {
        let (gossip, mqtt, partitions, mut shutdown) = (
            gossip.clone(),
            mqtt.clone(),
            partitions.clone(),
            shutdown.clone(),
        );
        tasks.push((
            "gossip-load",
            tokio::spawn(async move {
                // Announced every 2 s even when unchanged: the newest version wins, so an
                // announcement that did not spread is superseded quickly.
                loop {
                    let load = meridian_control_plane::gossip::NodeLoad {
                        devices: mqtt.sessions.count() as u64,
                        partitions_led: (0..partitions.count())
                            .filter(|p| partitions.is_leader(*p))
                            .count() as u64,
                    };
                    gossip.set_load(load).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }
    {
        let (gossip, mut shutdown) = (gossip.clone(), shutdown.clone());
        tasks.push((
            "gossip-metrics",
            tokio::spawn(async move {
                let mut changes = gossip.changes();
                loop {
                    let up = gossip
                        .view()
                        .values()
                        .filter(|p| p.health == meridian_control_plane::gossip::Health::Up)
                        .count();
                    metrics().gossip_peers_up.set(up as i64);
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { return },
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                }
            }),
        ));
    }
    let amqp_slot: Arc<std::sync::OnceLock<Arc<crate::amqp::AmqpContext>>> = Arc::default();
    let router = api::router(
        ApiState {
            hub: hub.clone(),
            mqtt: mqtt.clone(),
            events: event_reader.clone(),
            webhooks: webhook_health.clone(),
            amqp: amqp_slot.clone(),
            control: {
                let control = crate::control::ControlPlane::new(
                    hub.clone(),
                    partitions.clone(),
                    gossip,
                    node_id,
                    mqtt.sessions.clone(),
                    region.clone(),
                );
                let _ = control_slot.set(control.clone());
                control
            },
        },
        config.api.max_body_bytes,
    );
    // ---- sync mode: a tie-breaker region's node votes but hands on every leadership ----
    if config.region.mode == crate::region::ReplicationMode::Sync
        && config.region.witness
        && let Some(control) = control_slot.get().cloned()
    {
        let mut shutdown = shutdown.clone();
        // Campaign only after two maximal election timeouts without any leader.
        let patience = Duration::from_millis(2 * config.cluster.election_timeout_max_ms);
        tasks.push((
            "tie-breaker",
            tokio::spawn(async move {
                let mut leaderless_since = std::collections::BTreeMap::new();
                loop {
                    control.tie_breaker_elections(&mut leaderless_since, patience);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    control.shed_leadership().await;
                }
            }),
        ));
    }
    // ---- amqp: service C2D/feedback and the Event Hub-compatible endpoint ----
    let amqp_listener = TcpListener::bind(config.amqp.tls_listen)
        .await
        .map_err(io(format!("bind amqp {}", config.amqp.tls_listen)))?;
    let amqp_addr = amqp_listener.local_addr().map_err(io("amqp local addr"))?;
    let host_name = config
        .api
        .host_name
        .clone()
        .unwrap_or_else(|| format!("localhost:{}", https_addr.port()));
    let amqp = Arc::new(crate::amqp::AmqpContext {
        hub: hub.clone(),
        reader: event_reader.clone(),
        event_hub: config.amqp.event_hub_name(&host_name),
        host_name: host_name.clone(),
        redirect_port: amqp_addr.port(),
        max_links: config.amqp.max_links_per_connection,
        mqtt: mqtt.clone(),
    });
    tasks.push((
        "amqp",
        tokio::spawn(crate::amqp::serve_listener(
            amqp_listener,
            tls::server_config(&tls_files, &[])?,
            amqp.clone(),
            shutdown.clone(),
        )),
    ));
    tracing::info!(%amqp_addr, event_hub = %amqp.event_hub, "amqp endpoint listening (tls)");
    let _ = amqp_slot.set(amqp.clone());
    {
        let shutdown = shutdown.clone();
        let amqp = config.amqp.on_https.then_some(amqp.clone());
        tasks.push((
            "https",
            tokio::spawn(async move {
                if let Err(e) =
                    api::serve_https_and_amqp(https_listener, https_tls, router, amqp, shutdown)
                        .await
                {
                    tracing::error!(error = %e, "https server failed");
                }
            }),
        ));
    }
    tracing::info!(%https_addr, "service api listening (https)");

    // ---- metrics ----
    let metrics_addr = match config.observability.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(io(format!("bind metrics {addr}")))?;
            let bound = listener.local_addr().map_err(io("metrics local addr"))?;
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(|| async { metrics().render() }),
            );
            let mut shutdown = shutdown.clone();
            tasks.push((
                "metrics",
                tokio::spawn(async move {
                    let result = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = shutdown.wait_for(|s| *s).await;
                        })
                        .await;
                    if let Err(e) = result {
                        tracing::error!(error = %e, "metrics server failed");
                    }
                }),
            ));
            tracing::info!(addr = %bound, "metrics listening (http)");
            Some(bound)
        }
        None => None,
    };

    Ok(Node {
        hub,
        partitions,
        https_addr,
        grpc_addr,
        mqtt_addr,
        metrics_addr,
        amqp_addr,
        event_hub: amqp.event_hub.clone(),
        tls: tls_files,
        host_name,
        tasks,
    })
}

/// The hub's owner credentials as a node writes them to `<data_dir>/credentials.json` (mode 0600)
/// once the hub exists, for operators and tests.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// `HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=...`
    pub service_connection_string: String,
    /// PEM file clients trust, when Meridian generated the certificate.
    pub ca_cert: Option<PathBuf>,
    /// HTTPS service API port.
    pub https_port: u16,
    /// MQTT/TLS device port.
    pub mqtt_port: Option<u16>,
    /// Every shared access policy with its keys (as Azure's portal lists them).
    #[serde(default)]
    pub shared_access_policies: Vec<SharedAccessPolicy>,
    /// `HostName=...;SharedAccessKeyName=meridian-operator;SharedAccessKey=...`: the credential
    /// of the control-plane API (`meridian cluster`).
    #[serde(default)]
    pub operator_connection_string: String,
}

impl Node {
    /// Waits for the hub and returns the owner credentials.
    pub async fn credentials(&self, timeout: Duration) -> Option<Credentials> {
        let owner = self.wait_hub_ready(timeout).await?;
        let (policies, operator_key) = self
            .hub
            .read(ReadConsistency::Linearizable, |s| {
                Ok(s.settings
                    .as_ref()
                    .map(|h| {
                        (
                            h.policies.values().cloned().collect(),
                            h.operator_key.clone(),
                        )
                    })
                    .unwrap_or_default())
            })
            .await
            .unwrap_or_default();
        Some(Credentials {
            service_connection_string: format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                self.host_name, owner.key_name, owner.primary_key
            ),
            ca_cert: self
                .tls
                .ca_cert
                .as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
            https_port: self.https_addr.port(),
            mqtt_port: Some(self.mqtt_addr.port()),
            shared_access_policies: policies,
            operator_connection_string: format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={operator_key}",
                self.host_name,
                crate::auth::OPERATOR_KEY_NAME
            ),
        })
    }
}

/// Writes credentials as JSON readable only by the owner.
pub fn write_credentials(path: &std::path::Path, credentials: &Credentials) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(credentials).map_err(std::io::Error::other)?;
    std::fs::write(path, json)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Tokio polls for I/O events after this many task polls (its default is 61), and only then
/// resumes yielded tasks such as the partition batchers. A node's tasks poll briefly (a read and
/// decode, a hand-over, a settle), so under load fewer driver polls mean more devices' packets
/// per `epoll` round and larger partition batches (docs/adr/020); I/O (Raft heartbeats,
/// keep-alives) still waits at most 255 short polls, a millisecond or two.
const EVENT_INTERVAL: u32 = 255;

/// The multi-threaded runtime a node runs on (`meridian node`, `dev`, `demo`).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()
}

/// Starts a node and runs it until `shutdown` turns true; writes `<data_dir>/credentials.json`
/// once the hub exists.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), StartError> {
    let node = start(config.clone(), shutdown.clone()).await?;
    let path = config.node.data_dir.join("credentials.json");
    let mut stop = shutdown;
    tokio::select! {
        creds = node.credentials(Duration::from_secs(3600)) => match creds {
            Some(c) => match write_credentials(&path, &c) {
                Ok(()) => tracing::info!(path = %path.display(), "hub credentials written"),
                Err(e) => tracing::warn!(error = %e, "writing hub credentials"),
            },
            None => tracing::warn!("the hub was not created within an hour"),
        },
        _ = stop.wait_for(|s| *s) => {}
    }
    node.join().await;
    Ok(())
}
