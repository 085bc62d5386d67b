//! Command-line interface of the `meridian` binary.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::server;

/// Meridian: a self-hosted, multi-region IoT hub compatible with the Azure IoT SDKs.
#[derive(Debug, Parser)]
#[command(name = "meridian", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs a single-node hub with embedded defaults (generated test CA and server certificate,
    /// local data dir) and prints its connection string.
    Dev(DevArgs),
    /// Runs a cluster node from a configuration file.
    Node(NodeArgs),
    /// Checks a configuration file and prints the effective configuration.
    CheckConfig(NodeArgs),
    /// Prints telemetry as it arrives, one JSON line per message (like
    /// `az iot hub monitor-events`).
    MonitorEvents(MonitorArgs),
    /// Shows and changes message routing: routes, endpoints, enrichments, the fallback route.
    Routing(RoutingArgs),
    /// Lists, adds and removes cluster nodes (Raft voters).
    Cluster(ClusterArgs),
    /// Runs a local N-node cluster on loopback in one process, for trying Meridian out; writes
    /// `<data-dir>/cluster.json` and prints the connection strings. Ctrl-C stops it.
    Demo(DemoArgs),
}

/// `meridian cluster`
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Operator connection string (`HostName=...;SharedAccessKeyName=meridian-operator;...`,
    /// `operator_connection_string` in credentials.json).
    #[arg(long, env = "MERIDIAN_OPERATOR_CONNECTION_STRING")]
    pub operator_connection_string: String,
    /// CA certificate (PEM) the node's HTTPS certificate chains to.
    #[arg(long, env = "MERIDIAN_CA_CERT")]
    pub ca: PathBuf,
    /// Node address; defaults to the connection string's HostName.
    #[arg(long)]
    pub address: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub action: ClusterAction,
}

/// Cluster membership changes.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Lists the nodes, their roles and replication progress.
    Nodes,
    /// Adds a node (started with the cluster's members in its config): it catches up as a learner,
    /// then becomes a voter.
    Add {
        /// Its node id.
        #[arg(long)]
        id: u64,
        /// Its gRPC address.
        #[arg(long)]
        grpc_addr: String,
    },
    /// Removes a voter.
    Remove {
        /// Its node id.
        #[arg(long)]
        id: u64,
    },
    /// Replaces a voter: adds the new node (learner, catch-up, voter), then removes the old one.
    Replace {
        /// The node to replace.
        #[arg(long)]
        old: u64,
        /// The new node's id.
        #[arg(long)]
        new_id: u64,
        /// The new node's gRPC address.
        #[arg(long)]
        grpc_addr: String,
    },
    /// Drains a node before maintenance: it closes its device connections (devices reconnect to
    /// other nodes), refuses new ones, and its telemetry partition replicas and leaderships move
    /// to other nodes. `meridian cluster nodes` shows when it leads no partition any more.
    Drain {
        /// Its node id.
        #[arg(long)]
        id: u64,
    },
    /// Puts a drained node back in service.
    Undrain {
        /// Its node id.
        #[arg(long)]
        id: u64,
    },
    /// Shows each telemetry partition's Raft group: leader, voters, learners.
    Partitions,
    /// Shows this node's region of a geo-paired hub: epoch, primary, role, writability,
    /// replication lag, failover history.
    Region,
    /// Fails the hub over to another region (or back), printing progress. Planned: the primary
    /// is demoted and everything it acknowledged is copied first. `--force`: the primary is lost;
    /// writes it acknowledged but had not shipped are lost with it.
    Failover {
        /// The region to promote.
        #[arg(long)]
        to: String,
        /// The hub's name (`region.hub_name`), as confirmation.
        #[arg(long)]
        hub_name: String,
        /// Promote without the primary's consent.
        #[arg(long)]
        force: bool,
    },
    /// Moves leadership of the hub group (or of one telemetry partition) to a chosen voter.
    TransferLeader {
        /// The node that should lead.
        #[arg(long)]
        to: u64,
        /// A telemetry partition instead of the hub group.
        #[arg(long)]
        partition: Option<u32>,
    },
}

/// Runs `meridian cluster ...`.
pub async fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let args_for_progress = ServiceArgs {
        connection_string: args.operator_connection_string.clone(),
        ca: args.ca.clone(),
        address: args.address.clone(),
    };
    let mut conn = connect_service(&args_for_progress).await?;
    let (method, path, body) = match args.action {
        ClusterAction::Failover {
            to,
            hub_name,
            force,
        } => {
            return run_failover(&args_for_progress, &to, &hub_name, force).await;
        }
        ClusterAction::Region => ("GET", "/meridian/region".to_string(), None),
        ClusterAction::Replace {
            old,
            new_id,
            grpc_addr,
        } => {
            let add = serde_json::json!({"id": new_id, "grpcAddr": grpc_addr});
            let reply = conn
                .json("POST", "/meridian/cluster/nodes", Some(&add))
                .await?;
            if !(200..300).contains(&reply.status) {
                anyhow::bail!("adding node {new_id}: {} {}", reply.status, reply.json());
            }
            println!("node {new_id} added as a voter; removing node {old}");
            ("DELETE", format!("/meridian/cluster/nodes/{old}"), None)
        }
        ClusterAction::Drain { id } => (
            "POST",
            format!("/meridian/cluster/nodes/{id}/drain"),
            Some(serde_json::json!({"draining": true})),
        ),
        ClusterAction::Undrain { id } => (
            "POST",
            format!("/meridian/cluster/nodes/{id}/drain"),
            Some(serde_json::json!({"draining": false})),
        ),
        ClusterAction::Partitions => ("GET", "/meridian/cluster/partitions".to_string(), None),
        ClusterAction::TransferLeader { to, partition } => (
            "POST",
            "/meridian/cluster/leader".to_string(),
            Some(serde_json::json!({"to": to, "partition": partition})),
        ),
        ClusterAction::Nodes => ("GET", "/meridian/cluster/nodes".to_string(), None),
        ClusterAction::Add { id, grpc_addr } => (
            "POST",
            "/meridian/cluster/nodes".to_string(),
            Some(serde_json::json!({"id": id, "grpcAddr": grpc_addr})),
        ),
        ClusterAction::Remove { id } => ("DELETE", format!("/meridian/cluster/nodes/{id}"), None),
    };
    let reply = conn.json(method, &path, body.as_ref()).await?;
    if !(200..300).contains(&reply.status) {
        anyhow::bail!("{method} {path}: {} {}", reply.status, reply.json());
    }
    if !reply.body.is_empty() {
        println!("{}", serde_json::to_string_pretty(&reply.json())?);
    }
    Ok(())
}

/// Runs a failover and prints its steps as the target node reports them.
async fn run_failover(
    service: &ServiceArgs,
    to: &str,
    hub_name: &str,
    force: bool,
) -> anyhow::Result<()> {
    let mut conn = connect_service(service).await?;
    let mut progress = connect_service(service).await?;
    let body = serde_json::json!({"region": to, "hubName": hub_name, "force": force});
    println!(
        "failing over to region '{to}'{}",
        if force { " (forced)" } else { "" }
    );
    let request = conn.json("POST", "/meridian/region/failover", Some(&body));
    tokio::pin!(request);
    let mut printed = 0usize;
    let reply = loop {
        tokio::select! {
            reply = &mut request => break reply?,
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                if let Ok(status) = progress.json("GET", "/meridian/region", None).await {
                    let steps = status.json()["lastFailover"]["steps"].as_array().cloned().unwrap_or_default();
                    for step in steps.iter().skip(printed) {
                        println!("  {:>6} ms  {}", step[1], step[0].as_str().unwrap_or_default());
                    }
                    printed = printed.max(steps.len());
                }
            }
        }
    };
    if !(200..300).contains(&reply.status) {
        anyhow::bail!("failover: {} {}", reply.status, reply.json());
    }
    let report = reply.json();
    for step in report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(printed)
    {
        println!(
            "  {:>6} ms  {}",
            step[1],
            step[0].as_str().unwrap_or_default()
        );
    }
    println!(
        "region '{}' is primary at epoch {} after {} ms",
        report["primary"].as_str().unwrap_or_default(),
        report["epoch"],
        report["totalMs"]
    );
    Ok(())
}

/// `meridian demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Data directory (one sub-directory per node).
    #[arg(long, default_value = "meridian-demo")]
    pub data_dir: PathBuf,
    /// First port; each node uses four consecutive ports from here (HTTPS, MQTT, gRPC, metrics).
    #[arg(long, default_value_t = 18440)]
    pub base_port: u16,
    /// Geo-paired regions (1 or 2). With 2, regions `east` (the hub's primary) and `west` of
    /// `--nodes-per-region` nodes each, plus a one-node witness region `witness`, with automatic
    /// failover; `--nodes` is then ignored.
    #[arg(long, default_value_t = 1)]
    pub regions: u64,
    /// Nodes in each data region when `--regions 2`.
    #[arg(long, default_value_t = 2)]
    pub nodes_per_region: u64,
}

/// One node in `cluster.json`.
#[derive(Debug, serde::Serialize)]
pub struct DemoNode {
    /// Raft node id.
    pub id: u64,
    /// Region.
    pub region: String,
    /// HTTPS service API (and MQTT over WebSockets).
    pub https: String,
    /// MQTT/TLS.
    pub mqtt: String,
    /// Node-to-node gRPC.
    pub grpc: String,
    /// Prometheus metrics.
    pub metrics: String,
    /// Service connection string pointing at this node (empty on a witness, which holds no
    /// hub).
    pub service_connection_string: String,
}

/// What `meridian demo` writes to `<data-dir>/cluster.json`.
#[derive(Debug, serde::Serialize)]
pub struct DemoCluster {
    /// Every node.
    pub nodes: Vec<DemoNode>,
    /// CA certificate all nodes' certificates chain to.
    pub ca_cert: PathBuf,
    /// Operator credential of the control-plane API (`meridian cluster`).
    pub operator_connection_string: String,
    /// The hub's primary region when the demo started.
    pub primary_region: String,
    /// The hub's name (`meridian cluster failover --hub-name`).
    pub hub_name: String,
}

/// How to reach a hub's service API.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Service connection string (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`).
    #[arg(long, env = "MERIDIAN_CONNECTION_STRING")]
    pub connection_string: String,
    /// CA certificate (PEM) the node's HTTPS certificate chains to.
    #[arg(long, env = "MERIDIAN_CA_CERT")]
    pub ca: PathBuf,
    /// Node address; defaults to the connection string's HostName.
    #[arg(long)]
    pub address: Option<String>,
}

/// `meridian routing`
#[derive(Debug, Args)]
pub struct RoutingArgs {
    /// The hub.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: RoutingAction,
}

/// Routing changes.
#[derive(Debug, Subcommand)]
pub enum RoutingAction {
    /// Prints the routing configuration.
    Show,
    /// Creates a custom endpoint.
    SetEndpoint {
        /// Endpoint name.
        name: String,
        /// `stream`, `webhook` or `file`.
        #[arg(long = "type", default_value = "stream")]
        kind: String,
        /// Webhook URL.
        #[arg(long)]
        url: Option<String>,
        /// PEM file of the CA that signs an https webhook.
        #[arg(long)]
        ca_certificate_file: Option<PathBuf>,
        /// Seconds of failure before a webhook is dead.
        #[arg(long)]
        dead_after_secs: Option<u64>,
        /// Directory of a file endpoint.
        #[arg(long)]
        directory: Option<String>,
        /// Seconds between file batches.
        #[arg(long)]
        batch_frequency_secs: Option<u64>,
    },
    /// Deletes a custom endpoint.
    DeleteEndpoint {
        /// Endpoint name.
        name: String,
    },
    /// Creates or replaces a route.
    SetRoute {
        /// Route name.
        name: String,
        /// DeviceMessages, TwinChangeEvents, DeviceLifecycleEvents or DeviceConnectionStateEvents.
        #[arg(long, default_value = "DeviceMessages")]
        source: String,
        /// Routing query (empty: every message).
        #[arg(long, default_value = "")]
        condition: String,
        /// Endpoint(s) the route sends to (`events` is the built-in one).
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
        /// Store the route disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Deletes a route.
    DeleteRoute {
        /// Route name.
        name: String,
    },
    /// Creates or replaces a message enrichment.
    SetEnrichment {
        /// Property name.
        key: String,
        /// Literal, `$iothubname` or `$twin.<path>`.
        #[arg(long)]
        value: String,
        /// Endpoint(s) whose messages get it.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
    },
    /// Deletes a message enrichment.
    DeleteEnrichment {
        /// Property name.
        key: String,
    },
    /// Turns the fallback route on or off.
    Fallback {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

/// `meridian monitor-events`
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Service connection string with ServiceConnect (`HostName=...;SharedAccessKeyName=...`).
    #[arg(long, env = "MERIDIAN_CONNECTION_STRING")]
    pub connection_string: String,
    /// CA certificate (PEM) the node's HTTPS certificate chains to.
    #[arg(long, env = "MERIDIAN_CA_CERT")]
    pub ca: PathBuf,
    /// Node address; defaults to the connection string's HostName.
    #[arg(long)]
    pub address: Option<String>,
    /// Read as this consumer group, starting after its checkpoints.
    #[arg(long)]
    pub consumer_group: Option<String>,
    /// Store the group's checkpoint after printing each batch (needs --consumer-group).
    #[arg(long, requires = "consumer_group")]
    pub checkpoint: bool,
    /// Without a consumer group: `end` (only new messages) or `start`.
    #[arg(long, default_value = "end")]
    pub from: String,
    /// Only messages from this device.
    #[arg(long)]
    pub device_id: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub max_events: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
}

/// `meridian dev`
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory.
    #[arg(long, default_value = "meridian-data")]
    pub data_dir: PathBuf,
    /// HTTPS service API port (Azure uses 443).
    #[arg(long, default_value_t = 8443)]
    pub https_port: u16,
    /// MQTT/TLS device port (the Azure device SDKs dial 8883).
    #[arg(long, default_value_t = 8883)]
    pub mqtt_port: u16,
    /// AMQP/TLS port of the service SDKs and Event Hubs clients (Azure's 5671: the Python service
    /// SDK cannot use another; AMQP is also served on the HTTPS port).
    #[arg(long, default_value_t = 5671)]
    pub amqp_port: u16,
    /// Node-to-node gRPC port (loopback only in dev).
    #[arg(long, default_value_t = 7101)]
    pub grpc_port: u16,
    /// Prometheus metrics port; 0 disables the endpoint.
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// PEM server certificate chain instead of the generated one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `meridian node`
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML configuration file (see deploy/config/meridian.example.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides `node.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DevArgs {
    /// The configuration `dev` runs with: defaults, environment overrides, then these flags.
    pub fn config(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = Config::load(None, env)?;
        config.node.data_dir = self.data_dir.clone();
        config.api.https_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.https_port));
        config.cluster.grpc_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.grpc_port));
        config.mqtt.tls_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.mqtt_port));
        config.amqp.tls_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.amqp_port));
        config.cluster.members.clear();
        config.observability.metrics_listen = (self.metrics_port != 0)
            .then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port)));
        config.tls.cert = self.tls_cert.clone();
        config.tls.key = self.tls_key.clone();
        config.validate()?;
        Ok(config)
    }
}

impl NodeArgs {
    /// The configuration: file, environment overrides, then these flags.
    pub fn config(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = Config::load(Some(&self.config), env)?;
        if let Some(d) = &self.data_dir {
            config.node.data_dir = d.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Waits for SIGINT or SIGTERM and flips the shutdown signal.
pub fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// Runs `meridian dev`: starts the node, waits for the hub, prints and saves the credentials to
/// `<data-dir>/dev-credentials.json`.
pub async fn run_dev(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let node = server::start(config.clone(), shutdown).await?;
    let credentials = node
        .credentials(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("the hub was not created within 30 s"))?;
    let path = config.node.data_dir.join("dev-credentials.json");
    server::write_credentials(&path, &credentials)?;
    println!("Meridian dev hub is ready.");
    println!(
        "  service connection string: {}",
        credentials.service_connection_string
    );
    if let Some(ca) = &credentials.ca_cert {
        println!("  CA certificate (trust it in clients): {}", ca.display());
    }
    println!("  HTTPS service API: https://{}", node.https_addr);
    println!(
        "  MQTT device endpoint: mqtts://{} (and wss://{}/$iothub/websocket)",
        node.mqtt_addr, node.https_addr
    );
    println!(
        "  AMQP service endpoint (C2D send, feedback, Event Hubs): amqps://{} (and amqps://{})",
        node.amqp_addr, node.https_addr
    );
    println!(
        "  Event Hub-compatible endpoint: Endpoint=sb://{}/;SharedAccessKeyName=service;SharedAccessKey=<key>;EntityPath={}",
        node.host_name, node.event_hub
    );
    println!(
        "  operator connection string (meridian cluster): {}",
        credentials.operator_connection_string
    );
    println!("  credentials written to {}", path.display());
    node.join().await;
    Ok(())
}

/// Runs `meridian monitor-events`: polls every partition through the REST/JSON events API.
pub async fn run_monitor(args: MonitorArgs) -> anyhow::Result<()> {
    use crate::client::{ConnectionString, ServiceClient};
    let cs = ConnectionString::parse(&args.connection_string)?;
    let address = args.address.clone().unwrap_or(cs.host_name.clone());
    let addr = tokio::net::lookup_host(&address)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {address}"))?;
    let client = ServiceClient::new(&args.connection_string, addr, &args.ca)?;
    let mut conn = client.connect().await?;
    let info = conn
        .json("GET", "/meridian/events/partitions", None)
        .await?;
    anyhow::ensure!(
        info.status == 200,
        "partition info: {} {:?}",
        info.status,
        info.json()
    );
    let partitions = info.json()["partitionCount"].as_u64().unwrap_or(0) as u32;
    // Per partition: the query that starts the next read.
    let mut next: Vec<String> = (0..partitions)
        .map(|_| match (&args.consumer_group, args.from.as_str()) {
            (Some(g), _) => format!("consumerGroup={g}"),
            (None, "start") => "from=start".to_string(),
            _ => "from=end".to_string(),
        })
        .collect();
    let deadline = args
        .timeout_secs
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut printed = 0usize;
    loop {
        let mut got_any = false;
        for p in 0..partitions {
            let idx = p as usize;
            let r = conn
                .json(
                    "GET",
                    &format!("/meridian/events/partitions/{p}?{}&max=500", next[idx]),
                    None,
                )
                .await?;
            anyhow::ensure!(
                r.status == 200,
                "read partition {p}: {} {:?}",
                r.status,
                r.json()
            );
            let body = r.json();
            let events = body["events"].as_array().cloned().unwrap_or_default();
            next[idx] = format!("from={}", body["nextOffset"].as_u64().unwrap_or(0));
            for e in &events {
                let device = e["systemProperties"]["iothub-connection-device-id"].as_str();
                if args.device_id.as_deref().is_some_and(|d| Some(d) != device) {
                    continue;
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "deviceId": device,
                        "partition": e["partition"],
                        "offset": e["offset"],
                        "enqueuedTime": e["enqueuedTime"],
                        "properties": e["properties"],
                        "systemProperties": e["systemProperties"],
                        "body": e["body"],
                    })
                );
                printed += 1;
                if args.max_events.is_some_and(|m| printed >= m) {
                    if let (Some(g), true) = (&args.consumer_group, args.checkpoint) {
                        checkpoint(&mut conn, g, p, e["offset"].as_u64().unwrap_or(0)).await?;
                    }
                    return Ok(());
                }
            }
            if let (Some(g), true, Some(last)) =
                (&args.consumer_group, args.checkpoint, events.last())
            {
                checkpoint(&mut conn, g, p, last["offset"].as_u64().unwrap_or(0)).await?;
            }
            got_any |= !events.is_empty();
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
        if !got_any {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

async fn checkpoint(
    conn: &mut crate::client::Connection,
    group: &str,
    partition: u32,
    offset: u64,
) -> anyhow::Result<()> {
    let r = conn
        .json(
            "POST",
            &format!("/meridian/events/consumergroups/{group}/checkpoints"),
            Some(&serde_json::json!({"partition": partition, "offset": offset})),
        )
        .await?;
    anyhow::ensure!(r.status == 204, "checkpoint: {} {:?}", r.status, r.json());
    Ok(())
}

async fn connect_service(args: &ServiceArgs) -> anyhow::Result<crate::client::Connection> {
    use crate::client::{ConnectionString, ServiceClient};
    let cs = ConnectionString::parse(&args.connection_string)?;
    let address = args.address.clone().unwrap_or(cs.host_name);
    let addr = tokio::net::lookup_host(&address)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {address}"))?;
    Ok(ServiceClient::new(&args.connection_string, addr, &args.ca)?
        .connect()
        .await?)
}

/// Runs `meridian routing ...` against the REST API and prints the answer.
pub async fn run_routing(args: RoutingArgs) -> anyhow::Result<()> {
    use serde_json::json;
    let mut conn = connect_service(&args.service).await?;
    let (method, path, body) = match args.action {
        RoutingAction::Show => ("GET", "/meridian/routing".to_string(), None),
        RoutingAction::SetEndpoint {
            name,
            kind,
            url,
            ca_certificate_file,
            dead_after_secs,
            directory,
            batch_frequency_secs,
        } => {
            let ca = match ca_certificate_file {
                Some(p) => Some(std::fs::read_to_string(p)?),
                None => None,
            };
            let mut body = json!({"type": kind});
            for (k, v) in [
                ("url", url.map(serde_json::Value::from)),
                ("caCertificate", ca.map(serde_json::Value::from)),
                (
                    "deadAfterSecs",
                    dead_after_secs.map(serde_json::Value::from),
                ),
                ("directory", directory.map(serde_json::Value::from)),
                (
                    "batchFrequencySecs",
                    batch_frequency_secs.map(serde_json::Value::from),
                ),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            (
                "PUT",
                format!("/meridian/routing/endpoints/{name}"),
                Some(body),
            )
        }
        RoutingAction::DeleteEndpoint { name } => (
            "DELETE",
            format!("/meridian/routing/endpoints/{name}"),
            None,
        ),
        RoutingAction::SetRoute {
            name,
            source,
            condition,
            endpoints,
            disabled,
        } => (
            "PUT",
            format!("/meridian/routing/routes/{name}"),
            Some(
                json!({"source": source, "condition": condition, "endpointNames": endpoints, "isEnabled": !disabled}),
            ),
        ),
        RoutingAction::DeleteRoute { name } => {
            ("DELETE", format!("/meridian/routing/routes/{name}"), None)
        }
        RoutingAction::SetEnrichment {
            key,
            value,
            endpoints,
        } => (
            "PUT",
            format!("/meridian/routing/enrichments/{key}"),
            Some(json!({"value": value, "endpointNames": endpoints})),
        ),
        RoutingAction::DeleteEnrichment { key } => (
            "DELETE",
            format!("/meridian/routing/enrichments/{key}"),
            None,
        ),
        RoutingAction::Fallback { state } => (
            "PUT",
            "/meridian/routing/fallback".to_string(),
            Some(json!({"isEnabled": state == "on"})),
        ),
    };
    let reply = conn.json(method, &path, body.as_ref()).await?;
    if !(200..300).contains(&reply.status) {
        anyhow::bail!("{} {path}: {} {}", method, reply.status, reply.json());
    }
    if !reply.body.is_empty() {
        println!("{}", serde_json::to_string_pretty(&reply.json())?);
    }
    Ok(())
}

/// Runs `meridian demo`: N nodes in this process, one Raft group, shared TLS certificate.
pub async fn run_demo(args: DemoArgs, env: &HashMap<String, String>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.regions == 1 || args.regions == 2,
        "--regions must be 1 or 2"
    );
    // (region, nodes, witness) in node-id order.
    let layout: Vec<(String, u64, bool)> = if args.regions == 2 {
        anyhow::ensure!(
            (1..=4).contains(&args.nodes_per_region),
            "--nodes-per-region must be 1 to 4"
        );
        vec![
            ("east".into(), args.nodes_per_region, false),
            ("west".into(), args.nodes_per_region, false),
            ("witness".into(), 1, true),
        ]
    } else {
        anyhow::ensure!((1..=9).contains(&args.nodes), "--nodes must be 1 to 9");
        vec![("local".into(), args.nodes, false)]
    };
    let total: u64 = layout.iter().map(|r| r.1).sum();
    let region_of = |id: u64| -> (String, bool) {
        let mut next = 1;
        for (name, n, witness) in &layout {
            if id < next + n {
                return (name.clone(), *witness);
            }
            next += n;
        }
        (String::new(), false)
    };
    std::fs::create_dir_all(&args.data_dir)?;
    let tls = crate::tls::ensure_dev_certificates(&args.data_dir.join("tls"))?;
    let port = |node: u64, slot: u16| args.base_port + (node as u16 - 1) * 4 + slot;
    let grpc = |id: u64| format!("127.0.0.1:{}", port(id, 2));
    let primary_region = layout[0].0.clone();
    let shutdown = shutdown_on_signal();
    let mut running = Vec::new();
    for id in 1..=total {
        let (region, witness) = region_of(id);
        let mut config = Config::load(None, env)?;
        config.node.id = id;
        config.node.region = region.clone();
        config.node.data_dir = args.data_dir.join(format!("node{id}"));
        config.api.https_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port(id, 0)));
        config.mqtt.tls_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port(id, 1)));
        // AMQP is also served on each node's HTTPS port; the TLS listener takes a free port.
        config.amqp.tls_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        config.cluster.grpc_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port(id, 2)));
        // Each region is a cluster of its own (async pair): members are its own nodes.
        config.cluster.members = (1..=total)
            .filter(|m| region_of(*m).0 == region)
            .map(|m| crate::config::Member {
                id: m,
                grpc_addr: grpc(m),
                region: None,
            })
            .collect();
        if args.regions == 2 {
            config.region.witness = witness;
            config.region.primary = Some(primary_region.clone());
            config.region.automatic_failover = true;
            config.region.peers = layout
                .iter()
                .filter(|(name, _, _)| *name != region)
                .map(|(name, _, is_witness)| crate::region::RegionPeer {
                    name: name.clone(),
                    role: if *is_witness {
                        crate::region::PeerRole::Witness
                    } else {
                        crate::region::PeerRole::Data
                    },
                    grpc_addrs: (1..=total)
                        .filter(|m| region_of(*m).0 == *name)
                        .map(grpc)
                        .collect(),
                })
                .collect();
        }
        config.observability.metrics_listen =
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port(id, 3))));
        config.tls.cert = Some(tls.cert.clone());
        config.tls.key = Some(tls.key.clone());
        config.validate()?;
        running.push((id, server::start(config, shutdown.clone()).await?));
    }
    let mut nodes = Vec::new();
    let mut operator_connection_string = String::new();
    for (id, node) in &running {
        let (region, witness) = region_of(*id);
        // A witness holds no hub; the other regions' nodes get it by copying the primary.
        let service_connection_string = if witness {
            String::new()
        } else {
            let credentials = node
                .credentials(Duration::from_secs(60))
                .await
                .ok_or_else(|| anyhow::anyhow!("the hub was not created within 60 s"))?;
            operator_connection_string = credentials.operator_connection_string;
            credentials.service_connection_string
        };
        nodes.push(DemoNode {
            id: *id,
            region,
            https: node.https_addr.to_string(),
            mqtt: node.mqtt_addr.to_string(),
            grpc: node.grpc_addr.to_string(),
            metrics: node.metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
            service_connection_string,
        });
    }
    let cluster = DemoCluster {
        nodes,
        ca_cert: std::fs::canonicalize(tls.ca_cert.clone().unwrap_or_default())?,
        operator_connection_string,
        primary_region,
        hub_name: "meridian".into(),
    };
    let path = args.data_dir.join("cluster.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cluster)?)?;
    println!(
        "Meridian demo cluster with {} nodes is ready.",
        cluster.nodes.len()
    );
    for n in &cluster.nodes {
        println!(
            "  node {} (region {}): https://{} mqtts://{}",
            n.id, n.region, n.https, n.mqtt
        );
        if !n.service_connection_string.is_empty() {
            println!("    {}", n.service_connection_string);
        }
    }
    if args.regions == 2 {
        println!(
            "  primary region: {} (fail over: meridian cluster failover --to west --hub-name {})",
            cluster.primary_region, cluster.hub_name
        );
    }
    println!("  CA certificate: {}", cluster.ca_cert.display());
    println!(
        "  operator (meridian cluster): {}",
        cluster.operator_connection_string
    );
    println!(
        "  cluster description: {} (Ctrl-C stops the cluster)",
        path.display()
    );
    for (_, node) in running {
        node.join().await;
    }
    Ok(())
}
