//! A cluster of real `meridian node` processes for chaos runs and benchmarks: on loopback ports,
//! or each node in its own network namespace so links between nodes can be cut.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meridian::client::ServiceClient;
use serde_json::Value;

use crate::netns::Netns;
use crate::proc::{Proc, free_ports, metric};

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `meridian` binary users run.
    pub meridian_bin: PathBuf,
    /// Number of nodes (ids 1..=nodes).
    pub nodes: usize,
    /// Replicas per telemetry partition.
    pub replication_factor: usize,
    /// Telemetry partitions.
    pub partitions: u32,
    /// One network namespace per node (root only), so links can be cut.
    pub netns: bool,
    /// Log filter of the nodes.
    pub log_filter: String,
    /// Regions (None: one region). Node ids count up from 1 over the regions in order.
    pub regions: Option<RegionLayout>,
}

/// How the nodes are spread over regions.
#[derive(Debug, Clone)]
pub struct RegionLayout {
    /// `sync`: one cluster over all regions; `async`: a cluster per region, geo-paired.
    pub sync: bool,
    /// (name, nodes, witness) per region; the first is the initial primary.
    pub regions: Vec<(String, usize, bool)>,
    /// Extra keys of every node's `[region]` section (leases, automatic failover).
    pub region_toml: String,
    /// Extra keys of every node's `[cluster]` section (Raft timing across a WAN).
    pub cluster_toml: String,
    /// Added to every call between nodes of different regions (one way).
    pub wan_delay: Duration,
}

impl RegionLayout {
    /// The region of node `id`.
    pub fn region_of(&self, id: u64) -> Option<&str> {
        let mut next = 1u64;
        for (name, n, _) in &self.regions {
            if id < next + *n as u64 {
                return Some(name);
            }
            next += *n as u64;
        }
        None
    }

    /// The node ids of region `name`.
    pub fn nodes_of(&self, name: &str) -> Vec<u64> {
        let total: usize = self.regions.iter().map(|r| r.1).sum();
        (1..=total as u64)
            .filter(|id| self.region_of(*id) == Some(name))
            .collect()
    }
}

impl ClusterOptions {
    /// Defaults: 3 nodes, RF 3, 4 partitions, loopback, `info,openraft=warn` logs.
    pub fn new(meridian_bin: PathBuf) -> Self {
        Self {
            meridian_bin,
            nodes: 3,
            replication_factor: 3,
            partitions: 4,
            netns: false,
            log_filter: "info,openraft=warn".into(),
            regions: None,
        }
    }
}

/// One node process and its addresses.
pub struct ChaosNode {
    /// Node id.
    pub id: u64,
    /// Service API.
    pub https: SocketAddr,
    /// Node-to-node gRPC (and telemetry reads).
    pub grpc: SocketAddr,
    /// MQTT/TLS device endpoint.
    pub mqtt: SocketAddr,
    /// Prometheus metrics.
    pub metrics: SocketAddr,
    /// The process.
    pub proc: Proc,
    /// Its log file.
    pub log: PathBuf,
}

/// A running cluster. Processes and namespaces are removed when it is dropped.
pub struct ChaosCluster {
    /// The nodes, by position (node id = position + 1).
    pub nodes: Vec<ChaosNode>,
    /// CA certificate clients trust.
    pub ca: PathBuf,
    /// A service client (iothubowner) pointed at node 1.
    pub service: ServiceClient,
    /// A control-plane client (operator credential) pointed at node 1.
    pub operator: ServiceClient,
    /// Partition count.
    pub partitions: u32,
    /// The region layout, if any.
    pub regions: Option<RegionLayout>,
    /// The faults set on each node (the fault API replaces them all at once; a restarted node
    /// starts without any and gets them again from here).
    faults: std::sync::Mutex<BTreeMap<u64, serde_json::Map<String, serde_json::Value>>>,
    // Declared last: dropped after the processes.
    net: Option<Netns>,
}

impl ChaosCluster {
    /// Starts the nodes under `dir` and waits until the hub exists and every partition has a
    /// leader.
    pub async fn start(opts: &ClusterOptions, dir: &Path) -> Result<Self> {
        let tls = meridian::tls::ensure_dev_certificates(&dir.join("tls"))?;
        let ca = tls.ca_cert.clone().context("generated CA")?;
        let n = opts
            .regions
            .as_ref()
            .map_or(opts.nodes, |l| l.regions.iter().map(|r| r.1).sum());
        let net = if opts.netns {
            Some(Netns::create(n)?)
        } else {
            None
        };
        let ports = free_ports(4 * n)?;
        let addr_of = |id: u64, slot: usize| -> SocketAddr {
            match &net {
                Some(net) => SocketAddr::from((net.ip(id), [8443, 7101, 9100, 8883][slot])),
                None => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, ports[4 * (id as usize - 1) + slot]))
                }
            }
        };
        let layout = opts.regions.clone();
        let region_of = |id: u64| -> String {
            layout
                .as_ref()
                .and_then(|l| l.region_of(id))
                .unwrap_or("local")
                .to_string()
        };
        let member = |id: u64| match &layout {
            Some(l) if l.sync => format!(
                "{{ id = {id}, grpc_addr = \"{}\", region = \"{}\" }}",
                addr_of(id, 1),
                region_of(id)
            ),
            _ => format!("{{ id = {id}, grpc_addr = \"{}\" }}", addr_of(id, 1)),
        };
        let mut nodes = Vec::new();
        for id in 1..=n as u64 {
            let (https, grpc, metrics, mqtt) = (
                addr_of(id, 0),
                addr_of(id, 1),
                addr_of(id, 2),
                addr_of(id, 3),
            );
            // AMQP on a free port of the node's address (clients use the HTTPS port too).
            let amqp = SocketAddr::new(https.ip(), 0);
            let config = dir.join(format!("node{id}.toml"));
            // Async regions are clusters of their own; otherwise one cluster of every node.
            let members: Vec<String> = (1..=n as u64)
                .filter(|m| match &layout {
                    Some(l) if !l.sync => region_of(*m) == region_of(id),
                    _ => true,
                })
                .map(member)
                .collect();
            let mut region_section = String::new();
            if let Some(l) = &layout {
                let primary = &l.regions[0].0;
                let witness = l.regions.iter().any(|r| r.0 == region_of(id) && r.2);
                if l.sync {
                    // A witness region in sync mode is a tie-breaker: it votes, never leads.
                    region_section.push_str(&format!(
                        "[region]\nmode = \"sync\"\nwitness = {witness}\nhub_name = \"meridian\"\n"
                    ));
                } else {
                    region_section.push_str(&format!(
                        "[region]\nwitness = {witness}\nprimary = \"{primary}\"\nhub_name = \"meridian\"\n{}\n",
                        l.region_toml
                    ));
                    for (name, _, is_witness) in l.regions.iter().filter(|r| r.0 != region_of(id)) {
                        let addrs: Vec<String> = l
                            .nodes_of(name)
                            .iter()
                            .map(|m| format!("\"{}\"", addr_of(*m, 1)))
                            .collect();
                        region_section.push_str(&format!(
                            "[[region.peers]]\nname = \"{name}\"\nrole = \"{}\"\ngrpc_addrs = [{}]\n",
                            if *is_witness { "witness" } else { "data" },
                            addrs.join(", ")
                        ));
                    }
                }
            }
            std::fs::write(
                &config,
                format!(
                    "[node]\nid = {id}\nregion = \"{r}\"\ndata_dir = \"{d}\"\n[cluster]\ngrpc_listen = \"{grpc}\"\nmembers = [{m}]\nreplication_factor = {rf}\n{cx}[api]\nhttps_listen = \"{https}\"\n[tls]\ncert = \"{c}\"\nkey = \"{k}\"\n[observability]\nmetrics_listen = \"{metrics}\"\n[mqtt]\ntls_listen = \"{mqtt}\"\npartitions = {p}\n[amqp]\ntls_listen = \"{amqp}\"\n",
                    d = dir.join(format!("node{id}")).display(),
                    m = members.join(", "),
                    rf = opts.replication_factor,
                    c = tls.cert.display(),
                    k = tls.key.display(),
                    p = opts.partitions,
                    r = region_of(id),
                    cx = layout.as_ref().map_or("", |l| l.cluster_toml.as_str()),
                ) + &region_section,
            )?;
            let mut cmd = Vec::new();
            if let Some(net) = &net {
                cmd.extend(["ip".into(), "netns".into(), "exec".into(), net.ns(id)]);
            }
            cmd.extend([
                opts.meridian_bin.display().to_string(),
                "node".into(),
                "--config".into(),
                config.display().to_string(),
            ]);
            let log = dir.join(format!("node{id}.log"));
            let proc = Proc::start_with_log_filter(cmd, log.clone(), &opts.log_filter)?;
            nodes.push(ChaosNode {
                id,
                https,
                grpc,
                mqtt,
                metrics,
                proc,
                log,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let creds_path = loop {
            if let Some(p) = (1..=n)
                .map(|id| dir.join(format!("node{id}/credentials.json")))
                .find(|p| p.exists())
            {
                break p;
            }
            if Instant::now() > deadline {
                bail!("the cluster did not come up; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let creds: Value = serde_json::from_slice(&std::fs::read(creds_path)?)?;
        let cs = creds["service_connection_string"]
            .as_str()
            .unwrap_or_default();
        let service =
            ServiceClient::new(cs, nodes[0].https, &ca)?.with_timeout(Duration::from_secs(15));
        let operator = ServiceClient::new(
            creds["operator_connection_string"]
                .as_str()
                .unwrap_or_default(),
            nodes[0].https,
            &ca,
        )?
        .with_timeout(Duration::from_secs(15));
        let cluster = Self {
            nodes,
            ca,
            service,
            operator,
            partitions: opts.partitions,
            regions: layout.clone(),
            faults: Default::default(),
            net,
        };
        if let Some(l) = &layout
            && !l.wan_delay.is_zero()
        {
            for node in &cluster.nodes {
                let mine = region_of(node.id);
                // An async witness only answers (leases, votes); it calls no one and has no hub
                // (so no operator credential) to configure it with. A sync tie-breaker is a voter.
                if !l.sync && l.regions.iter().any(|r| r.0 == mine && r.2) {
                    continue;
                }
                let remote: Vec<String> = cluster
                    .nodes
                    .iter()
                    .filter(|o| region_of(o.id) != mine)
                    .map(|o| o.grpc.to_string())
                    .collect();
                cluster.set_wan_delay(node.id, l.wan_delay, &remote).await?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leaders = cluster.partition_leaders().await;
            if cluster.hub_leader().await.is_some() && leaders.iter().all(Option::is_some) {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                bail!(
                    "no leaders after 60 s ({leaders:?}); logs in {}",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node with id `id`.
    pub fn node(&self, id: u64) -> Result<&ChaosNode> {
        self.nodes
            .get((id as usize).wrapping_sub(1))
            .with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut ChaosNode> {
        self.nodes
            .get_mut((id as usize).wrapping_sub(1))
            .with_context(|| format!("no node {id}"))
    }

    /// The running node that reports leading the hub group.
    pub async fn hub_leader(&self) -> Option<u64> {
        for n in self.nodes.iter().filter(|n| n.proc.is_running()) {
            if metric(n.metrics, "meridian_raft_is_leader").await == Some(1.0) {
                return Some(n.id);
            }
        }
        None
    }

    /// The leader of each telemetry partition, as the running nodes report.
    pub async fn partition_leaders(&self) -> Vec<Option<u64>> {
        let mut out = vec![None; self.partitions as usize];
        for n in self.nodes.iter().filter(|n| n.proc.is_running()) {
            for (p, slot) in out.iter_mut().enumerate() {
                let name = format!("meridian_partition_is_leader{{partition=\"{p}\"}}");
                if metric(n.metrics, &name).await == Some(1.0) {
                    *slot = Some(n.id);
                }
            }
        }
        out
    }

    /// The running node leading the most partitions, among `candidates`.
    pub async fn busiest_partition_leader(&self, candidates: &[u64]) -> Option<u64> {
        let leaders = self.partition_leaders().await;
        candidates
            .iter()
            .copied()
            .filter(|id| self.node(*id).is_ok_and(|n| n.proc.is_running()))
            .max_by_key(|id| leaders.iter().filter(|l| **l == Some(*id)).count())
    }

    /// A service client for node `id`.
    pub fn service_for(&self, id: u64) -> Result<ServiceClient> {
        Ok(self.service.with_addr(self.node(id)?.https))
    }

    /// Delays every node-to-node call node `id` sends by `delay` (0 turns it off): latency
    /// injection through the node's fault API, since `tc netem` is not available everywhere.
    pub async fn set_peer_delay(&self, id: u64, delay: Duration) -> Result<()> {
        self.set_faults(
            id,
            serde_json::json!({"peerDelayMs": delay.as_millis() as u64}),
        )
        .await
    }

    /// Delays node `id`'s calls to `remote` (other regions' gRPC addresses) by `delay`.
    pub async fn set_wan_delay(&self, id: u64, delay: Duration, remote: &[String]) -> Result<()> {
        self.set_faults(
            id,
            serde_json::json!({"wanDelayMs": delay.as_millis() as u64, "wanPeers": remote}),
        )
        .await
    }

    /// Skews node `id`'s wall clock by `ms` (negative: behind; 0 removes the skew).
    pub async fn set_clock_skew(&self, id: u64, ms: i64) -> Result<()> {
        self.set_faults(id, serde_json::json!({"clockSkewMs": ms}))
            .await
    }

    /// Sets the faults of node `id` again (after a restart, which loses them).
    pub async fn reapply_faults(&self, id: u64) -> Result<()> {
        self.set_faults(id, serde_json::json!({})).await
    }

    /// Merges `fields` into node `id`'s faults and sends them all.
    async fn set_faults(&self, id: u64, fields: serde_json::Value) -> Result<()> {
        let body = {
            let mut all = self
                .faults
                .lock()
                .map_err(|_| anyhow::anyhow!("faults lock poisoned"))?;
            let mine = all.entry(id).or_default();
            for (k, v) in fields.as_object().into_iter().flatten() {
                mine.insert(k.clone(), v.clone());
            }
            serde_json::Value::Object(mine.clone())
        };
        // The operator credential arrives with the hub: a secondary region may need a moment.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = async {
                let mut c = self
                    .operator
                    .with_addr(self.node(id)?.https)
                    .connect()
                    .await?;
                let r = c
                    .json("PUT", "/meridian/cluster/faults", Some(&body))
                    .await?;
                Ok::<u16, anyhow::Error>(r.status)
            }
            .await;
            if matches!(reply, Ok(204)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("set faults {body} on node {id}: {reply:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL node `id`.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        self.node_mut(id)?.proc.kill9();
        Ok(())
    }

    /// Starts node `id` again after a kill.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        node.proc.kill9();
        node.proc.spawn()
    }

    /// SIGSTOP node `id`.
    pub fn pause(&self, id: u64) -> Result<()> {
        self.node(id)?.proc.pause()
    }

    /// SIGCONT node `id`.
    pub fn resume(&self, id: u64) -> Result<()> {
        self.node(id)?.proc.resume()
    }

    /// Cuts node `id` off from the other nodes (clients still reach it). Needs `netns`.
    pub fn isolate(&self, id: u64) -> Result<()> {
        self.net
            .as_ref()
            .context("link cuts need a cluster in network namespaces")?
            .isolate(id)
    }

    /// Cuts the link between nodes `a` and `b`. Needs `netns`.
    pub fn cut(&self, a: u64, b: u64) -> Result<()> {
        self.net
            .as_ref()
            .context("link cuts need a cluster in network namespaces")?
            .cut(a, b)
    }

    /// Heals [`ChaosCluster::cut`].
    pub fn heal(&self, a: u64, b: u64) -> Result<()> {
        self.net
            .as_ref()
            .context("link cuts need a cluster in network namespaces")?
            .heal(a, b)
    }

    /// Heals [`ChaosCluster::isolate`].
    pub fn rejoin(&self, id: u64) -> Result<()> {
        self.net
            .as_ref()
            .context("link cuts need a cluster in network namespaces")?
            .rejoin(id)
    }

    /// The last `lines` of every node's log.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node {} ---\n", n.id));
            out.push_str(&all[all.len().saturating_sub(lines)..].join("\n"));
            out.push('\n');
        }
        out
    }
}
