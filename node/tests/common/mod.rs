//! Harness for integration tests: starts real `meridian` processes (the binary `main` builds) on
//! loopback with fresh data directories, kills and restarts them, and talks to them with the
//! service client. Every wait is bounded; every process is killed when the harness drops.

#![allow(dead_code)]

pub mod load;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use meridian::client::ServiceClient;
use meridian::server::Credentials;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free loopback port (bound and released; good enough on a test machine).
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free loopback ports (see `meridian::client::free_ports`).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    Ok(meridian::client::free_ports(n)?)
}

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub https: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub mqtt: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Network namespace the process runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl NodeProc {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), env!("CARGO_BIN_EXE_meridian")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_meridian")),
        };
        let child = command
            .args(&self.args)
            .env("MERIDIAN_OBSERVABILITY__LOG_FILTER", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meridian")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, no shutdown path.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's log so far (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // A node that exits with an error prints it, then a long backtrace: keep the error.
        let text = text.split("\nStack backtrace:").next().unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Reads one metric value from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.metrics, "/metrics").await.ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, anyhow::Error>(buf)
    };
    tokio::time::timeout(Duration::from_secs(3), fut).await?
}

/// A set of nodes sharing one TLS certificate and one Raft group.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub ca: PathBuf,
}

/// Writes node `id`'s config (ports: https, grpc, metrics, mqtt) and returns its unstarted process.
fn configured_node(
    dir: &Path,
    id: u64,
    ports: [u16; 4],
    members: &str,
    tls: &meridian::tls::TlsFiles,
    env: &[(&str, &str)],
) -> Result<NodeProc> {
    configured_node_at(dir, id, Ipv4Addr::LOCALHOST, ports, members, tls, env)
}

/// Like [`configured_node`], listening on `host` (a network namespace's address).
fn configured_node_at(
    dir: &Path,
    id: u64,
    host: Ipv4Addr,
    [https, grpc, metrics, mqtt]: [u16; 4],
    members: &str,
    tls: &meridian::tls::TlsFiles,
    env: &[(&str, &str)],
) -> Result<NodeProc> {
    let data_dir = dir.join(format!("node{id}"));
    let config_path = dir.join(format!("node{id}.toml"));
    let toml = format!(
        "[node]\nid = {id}\ndata_dir = \"{data}\"\n\n[cluster]\ngrpc_listen = \"{host}:{grpc}\"\nmembers = [{members}]\n\n[api]\nhttps_listen = \"{host}:{https}\"\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\n[observability]\nmetrics_listen = \"{host}:{metrics}\"\n\n[mqtt]\ntls_listen = \"{host}:{mqtt}\"\n\n[amqp]\ntls_listen = \"{host}:0\"\n",
        data = data_dir.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
    );
    std::fs::write(&config_path, toml)?;
    Ok(NodeProc {
        id,
        data_dir,
        args: vec![
            "node".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
        config_path,
        https: SocketAddr::from((host, https)),
        grpc: SocketAddr::from((host, grpc)),
        metrics: SocketAddr::from((host, metrics)),
        mqtt: SocketAddr::from((host, mqtt)),
        child: None,
        log: dir.join(format!("node{id}.log")),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        netns: None,
    })
}

/// Starts `size` nodes; `env` adds `MERIDIAN_<SECTION>__<KEY>` overrides to every node.
pub fn start_cluster(size: usize, env: &[(&str, &str)]) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let tls = meridian::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
    let ca = tls.ca_cert.clone().context("generated CA")?;
    // All ports are reserved at once, so no two can collide.
    let ports = free_ports(4 * size)?;
    let specs: Vec<(u64, u16, u16, u16, u16)> = (0..size)
        .map(|i| {
            (
                i as u64 + 1,
                ports[4 * i],
                ports[4 * i + 1],
                ports[4 * i + 2],
                ports[4 * i + 3],
            )
        })
        .collect();
    let members: Vec<String> = specs
        .iter()
        .map(|(id, _, grpc, _, _)| format!("{{ id = {id}, grpc_addr = \"127.0.0.1:{grpc}\" }}"))
        .collect();
    let members = members.join(", ");
    let mut nodes = Vec::new();
    for (id, https, grpc, metrics, mqtt) in specs {
        let mut node = configured_node(
            dir.path(),
            id,
            [https, grpc, metrics, mqtt],
            &members,
            &tls,
            env,
        )?;
        node.spawn()?;
        nodes.push(node);
    }
    Ok(Cluster { dir, nodes, ca })
}

/// Starts `meridian dev` in a fresh directory.
pub fn start_dev() -> Result<Cluster> {
    start_dev_with_env(&[])
}

/// Starts `meridian dev` with extra `MERIDIAN_*` environment overrides.
pub fn start_dev_with_env(env: &[(&str, &str)]) -> Result<Cluster> {
    start_dev_with_amqp_port(env, 0)
}

/// Starts `meridian dev` with its AMQP/TLS listener on `amqp_port` (0: a free one; the Python
/// service SDK needs 5671).
pub fn start_dev_with_amqp_port(env: &[(&str, &str)], amqp_port: u16) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let ports = free_ports(4)?;
    let (https, grpc, metrics, mqtt) = (ports[0], ports[1], ports[2], ports[3]);
    let data_dir = dir.path().join("data");
    let mut node = NodeProc {
        id: 1,
        args: vec![
            "dev".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--https-port".into(),
            https.to_string(),
            "--grpc-port".into(),
            grpc.to_string(),
            "--metrics-port".into(),
            metrics.to_string(),
            "--mqtt-port".into(),
            mqtt.to_string(),
            "--amqp-port".into(),
            amqp_port.to_string(),
        ],
        data_dir: data_dir.clone(),
        config_path: PathBuf::new(),
        https: SocketAddr::from(([127, 0, 0, 1], https)),
        grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
        metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
        mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt)),
        child: None,
        log: dir.path().join("dev.log"),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        netns: None,
    };
    node.spawn()?;
    let ca = data_dir.join("tls").join("ca.pem");
    Ok(Cluster {
        dir,
        nodes: vec![node],
        ca,
    })
}

impl Cluster {
    /// Starts one more node (`id`) with the cluster's TLS and every existing node plus itself as
    /// configured members; it does not initialize anything and waits to be added.
    pub fn spawn_extra_node(&mut self, id: u64) -> Result<()> {
        let ports = free_ports(4)?;
        let (https, grpc, metrics, mqtt) = (ports[0], ports[1], ports[2], ports[3]);
        let mut members: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{{ id = {}, grpc_addr = \"{}\" }}", n.id, n.grpc))
            .collect();
        members.push(format!("{{ id = {id}, grpc_addr = \"127.0.0.1:{grpc}\" }}"));
        let tls_dir = self.dir.path().join("tls");
        let tls = meridian::tls::TlsFiles {
            cert: tls_dir.join("server.pem"),
            key: tls_dir.join("server.key"),
            ca_cert: Some(self.ca.clone()),
        };
        let mut node = configured_node(
            self.dir.path(),
            id,
            [https, grpc, metrics, mqtt],
            &members.join(", "),
            &tls,
            &[],
        )?;
        node.spawn()?;
        self.nodes.push(node);
        Ok(())
    }

    pub fn node(&mut self, id: u64) -> &mut NodeProc {
        let idx = self.nodes.iter().position(|n| n.id == id).unwrap_or(0);
        &mut self.nodes[idx]
    }

    pub fn restart(&mut self, id: u64) -> Result<()> {
        let node = self.node(id);
        node.kill9();
        node.spawn()
    }

    /// Waits until some node writes its credentials file and returns them.
    pub async fn credentials(&self, timeout: Duration) -> Result<Credentials> {
        let deadline = Instant::now() + timeout;
        loop {
            for n in &self.nodes {
                for name in ["dev-credentials.json", "credentials.json"] {
                    if let Ok(bytes) = std::fs::read(n.data_dir.join(name))
                        && let Ok(c) = serde_json::from_slice::<Credentials>(&bytes)
                    {
                        return Ok(c);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no credentials after {timeout:?}; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client for node `id` with the operator credential (control-plane API).
    pub async fn operator(&mut self, id: u64) -> Result<ServiceClient> {
        let creds = self.credentials(Duration::from_secs(60)).await?;
        let ca = self.ca.clone();
        let addr = self.node(id).https;
        Ok(ServiceClient::new(
            &creds.operator_connection_string,
            addr,
            &ca,
        )?)
    }

    /// A client for node `id`.
    pub async fn client(&mut self, id: u64) -> Result<ServiceClient> {
        let creds = self.credentials(Duration::from_secs(60)).await?;
        let ca = self.ca.clone();
        let addr = self.node(id).https;
        Ok(ServiceClient::new(
            &creds.service_connection_string,
            addr,
            &ca,
        )?)
    }

    /// The id of the node reporting itself leader, if exactly one does.
    pub async fn leader(&self) -> Option<u64> {
        let mut leaders = Vec::new();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            if n.metric("meridian_raft_is_leader").await == Some(1.0) {
                leaders.push(n.id);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Waits until every running node serves metrics and has applied the hub's creation, and
    /// exactly one of them leads.
    /// The leader of each telemetry partition (from the nodes' metrics), `None` while unknown.
    pub async fn partition_leaders(&self, partitions: u32) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        for p in 0..partitions {
            let mut leader = None;
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                let name = format!("meridian_partition_is_leader{{partition=\"{p}\"}}");
                if n.metric(&name).await == Some(1.0) {
                    leader = Some(n.id);
                }
            }
            out.push(leader);
        }
        out
    }

    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all_up = true;
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                let applied = n.metric("meridian_raft_last_applied_index").await;
                all_up &= applied.is_some_and(|a| a >= 2.0);
            }
            if all_up && let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no single leader after {timeout:?}; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.id, n.log_tail(60)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Where `node/tests/sdk/setup.sh` put the SDKs.
pub fn sdk_cache() -> PathBuf {
    std::env::var_os("MERIDIAN_SDK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/meridian-sdk")
        })
}

/// `connection_string` with its `HostName=` replaced by `host` (e.g. `localhost:<port>` of one node).
pub fn with_host(connection_string: &str, host: &str) -> String {
    connection_string
        .split(';')
        .map(|p| {
            if p.starts_with("HostName=") {
                format!("HostName={host}")
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Runs an SDK script with a bounded time; fails with its output unless it exits 0.
pub fn run_sdk_script(program: &Path, script: &str, envs: &[(&str, String)]) -> Result<String> {
    let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    if !program.exists() {
        bail!(
            "{} is missing: run `bash node/tests/sdk/setup.sh` (deploy/test.sh does)",
            program.display()
        );
    }
    let mut cmd = Command::new("timeout");
    cmd.arg("180").arg(program).arg(&script_path);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().context("run sdk script")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{script} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// An HTTPS webhook receiver on loopback: records every JSON body POSTed to `/hook`, answering
/// 503 to the first `fail_first` requests. Returns its port, the CA file that signs its
/// certificate, and the recorded bodies.
pub async fn start_https_receiver(
    dir: &Path,
    fail_first: usize,
) -> Result<(
    u16,
    PathBuf,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let tls = meridian::tls::ensure_dev_certificates(&dir.join("receiver"))?;
    let ca = tls.ca_cert.clone().context("receiver CA")?;
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let (received, calls) = (received.clone(), calls.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (received, calls) = (received.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                        && let Ok(mut r) = received.lock()
                    {
                        r.push(v);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let port = free_port()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // The receiver lives as long as the test process; keep the sender alive with it.
    std::mem::forget(stop);
    tokio::spawn(meridian::api::serve_https(
        listener,
        meridian::tls::server_config(&tls, &[b"http/1.1"])?,
        app,
        stop_rx,
    ));
    Ok((port, ca, received))
}

/// Creates a device with generated SAS keys and returns its primary key.
pub async fn create_device(conn: &mut meridian::client::Connection, id: &str) -> Result<String> {
    let r = conn
        .json(
            "PUT",
            &format!("/devices/{id}"),
            Some(&serde_json::json!({"deviceId": id})),
        )
        .await?;
    if r.status != 200 {
        bail!("create {id}: {} {:?}", r.status, r.json());
    }
    Ok(r.json()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Per partition, its voters as its leader reports them (`/meridian/cluster/partitions`).
pub async fn partition_voters(
    cluster: &Cluster,
    base: &ServiceClient,
    partitions: u32,
) -> Vec<BTreeSet<u64>> {
    let mut out = vec![BTreeSet::new(); partitions as usize];
    for n in cluster.nodes.iter().filter(|n| n.is_running()) {
        let Ok(mut c) = base.with_addr(n.https).connect().await else {
            continue;
        };
        let Ok(r) = c.json("GET", "/meridian/cluster/partitions", None).await else {
            continue;
        };
        for p in r.json()["partitions"].as_array().into_iter().flatten() {
            let i = p["partition"].as_u64().unwrap_or(u64::MAX) as usize;
            if p["isLeader"] == serde_json::json!(true) && i < out.len() {
                out[i] = p["voters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64)
                    .collect();
            }
        }
    }
    out
}

pub async fn wait_partition_voters(
    cluster: &Cluster,
    base: &ServiceClient,
    ok: impl Fn(&[BTreeSet<u64>]) -> bool,
    timeout: Duration,
) -> Result<Vec<BTreeSet<u64>>> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = partition_voters(cluster, base, 4).await;
        if ok(&r) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("partition replicas stuck at {r:?}:\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One region of a geo-paired test hub.
pub struct RegionSpec {
    pub name: &'static str,
    pub nodes: usize,
    pub witness: bool,
}

/// Starts geo-paired regions on loopback: node ids count up from 1 in the order given, each
/// region is a cluster of its own, and every node names the other regions' nodes as peers.
/// `region_toml` adds keys to every node's `[region]` section (lease, automatic failover, ...).
/// Returns the cluster and each node's region.
pub fn start_regions(
    regions: &[RegionSpec],
    primary: &str,
    region_toml: &str,
) -> Result<(Cluster, Vec<(u64, &'static str)>)> {
    let dir = tempfile::tempdir()?;
    let tls = meridian::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
    let ca = tls.ca_cert.clone().context("generated CA")?;
    let total: usize = regions.iter().map(|r| r.nodes).sum();
    let ports = free_ports(4 * total)?;
    let mut placed = Vec::new();
    let mut i = 0;
    for r in regions {
        for _ in 0..r.nodes {
            placed.push((
                i as u64 + 1,
                r.name,
                r.witness,
                [
                    ports[4 * i],
                    ports[4 * i + 1],
                    ports[4 * i + 2],
                    ports[4 * i + 3],
                ],
            ));
            i += 1;
        }
    }
    let grpc_of = |name: &str| -> Vec<String> {
        placed
            .iter()
            .filter(|p| p.1 == name)
            .map(|p| format!("\"127.0.0.1:{}\"", p.3[1]))
            .collect()
    };
    let mut nodes = Vec::new();
    for (id, region, witness, ports) in &placed {
        let members: Vec<String> = placed
            .iter()
            .filter(|p| p.1 == *region)
            .map(|p| format!("{{ id = {}, grpc_addr = \"127.0.0.1:{}\" }}", p.0, p.3[1]))
            .collect();
        let mut node = configured_node(dir.path(), *id, *ports, &members.join(", "), &tls, &[])?;
        let mut toml = std::fs::read_to_string(&node.config_path)?;
        toml = toml.replacen(
            &format!("[node]\nid = {id}\n"),
            &format!("[node]\nid = {id}\nregion = \"{region}\"\n"),
            1,
        );
        toml.push_str(&format!(
            "\n[region]\nwitness = {witness}\nprimary = \"{primary}\"\n{region_toml}\n"
        ));
        for other in regions.iter().filter(|r| r.name != *region) {
            toml.push_str(&format!(
                "\n[[region.peers]]\nname = \"{}\"\nrole = \"{}\"\ngrpc_addrs = [{}]\n",
                other.name,
                if other.witness { "witness" } else { "data" },
                grpc_of(other.name).join(", ")
            ));
        }
        std::fs::write(&node.config_path, toml)?;
        node.spawn()?;
        nodes.push(node);
    }
    let map = placed.iter().map(|p| (p.0, p.1)).collect();
    Ok((Cluster { dir, nodes, ca }, map))
}

/// Starts one cluster whose nodes span regions (sync mode): `regions` gives each region's name
/// and node count; ids count up from 1 in that order; every member entry names its region.
pub fn start_sync_regions(
    regions: &[(&'static str, usize)],
) -> Result<(Cluster, Vec<(u64, &'static str)>)> {
    let dir = tempfile::tempdir()?;
    let tls = meridian::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
    let ca = tls.ca_cert.clone().context("generated CA")?;
    let total: usize = regions.iter().map(|r| r.1).sum();
    let ports = free_ports(4 * total)?;
    let mut placed = Vec::new();
    for (name, n) in regions {
        for _ in 0..*n {
            let i = placed.len();
            placed.push((
                i as u64 + 1,
                *name,
                [
                    ports[4 * i],
                    ports[4 * i + 1],
                    ports[4 * i + 2],
                    ports[4 * i + 3],
                ],
            ));
        }
    }
    let members: Vec<String> = placed
        .iter()
        .map(|(id, region, p)| {
            format!(
                "{{ id = {id}, grpc_addr = \"127.0.0.1:{}\", region = \"{region}\" }}",
                p[1]
            )
        })
        .collect();
    let members = members.join(", ");
    let mut nodes = Vec::new();
    for (id, region, ports) in &placed {
        let mut node = configured_node(dir.path(), *id, *ports, &members, &tls, &[])?;
        let mut toml = std::fs::read_to_string(&node.config_path)?;
        toml = toml.replacen(
            &format!("[node]\nid = {id}\n"),
            &format!("[node]\nid = {id}\nregion = \"{region}\"\n"),
            1,
        );
        // The region named "witness" only breaks ties: it votes, and hands on any leadership.
        toml.push_str(&format!(
            "\n[region]\nmode = \"sync\"\nhub_name = \"meridian\"\nwitness = {}\n",
            *region == "witness"
        ));
        std::fs::write(&node.config_path, toml)?;
        node.spawn()?;
        nodes.push(node);
    }
    let map = placed.iter().map(|p| (p.0, p.1)).collect();
    Ok((Cluster { dir, nodes, ca }, map))
}

// ---- AMQP clients for tests (fe2o3-amqp as a client) ----

/// A TLS connection to the node's AMQP listener.
pub async fn tls_to(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let pem = std::fs::read(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// Puts `token` for `audience` on `$cbs`; returns the status code.
pub async fn put_token(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    audience: &str,
    token: &str,
) -> Result<i32> {
    let mut sender = Sender::attach(session, "cbs-sender", "$cbs").await?;
    let mut receiver = Receiver::attach(session, "cbs-receiver", "$cbs").await?;
    let mut props = fe2o3_amqp::types::primitives::OrderedMap::new();
    props.insert(
        "operation".to_string(),
        SimpleValue::String("put-token".into()),
    );
    props.insert(
        "type".to_string(),
        SimpleValue::String("servicebus.windows.net:sastoken".into()),
    );
    props.insert("name".to_string(), SimpleValue::String(audience.into()));
    let request = Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(fe2o3_amqp::types::messaging::MessageId::Ulong(7)),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(props)),
        body: Body::Value(AmqpValue(Value::String(token.into()))),
        footer: None,
    };
    sender.send(request).await?;
    let reply = receiver.recv::<Body<Value>>().await?;
    receiver.accept(&reply).await?;
    let message = reply.message();
    assert_eq!(
        message
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone()),
        Some(fe2o3_amqp::types::messaging::MessageId::Ulong(7)),
        "the reply correlates to the request's message-id, keeping its type"
    );
    let status = match message
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get("status-code"))
    {
        Some(SimpleValue::Int(s)) => *s,
        other => bail!("status-code {other:?}"),
    };
    let _ = sender.close().await;
    let _ = receiver.close().await;
    Ok(status)
}

/// An AMQP connection over TLS with SASL ANONYMOUS (tokens come later, per link, through `$cbs`)
/// and a session on it; the connection must outlive the session.
pub async fn amqp_anonymous_session(
    https: SocketAddr,
    ca: &Path,
    container_id: &str,
) -> Result<(
    fe2o3_amqp::connection::ConnectionHandle<()>,
    fe2o3_amqp::session::SessionHandle<()>,
)> {
    let tls = tls_to(https, ca).await?;
    let mut connection = Connection::builder()
        .container_id(container_id)
        .hostname("localhost")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open_with_stream(tls)
        .await?;
    let session = Session::begin(&mut connection).await?;
    Ok((connection, session))
}

/// Reads the first `n` events of Event Hub-compatible partition `partition` over AMQP (SASL
/// ANONYMOUS, put-token with the `service` policy `key`): `(x-opt-offset, message-id)` each.
pub async fn amqp_read_partition(
    https: SocketAddr,
    ca: &Path,
    key: &str,
    partition: u32,
    n: usize,
) -> Result<Vec<(String, String)>> {
    let (mut connection, mut session) =
        amqp_anonymous_session(https, ca, "meridian-test-reader").await?;
    let audience = "sb://localhost/localhost";
    let expiry = meridian::clock::unix_now() + 600;
    let token = meridian::auth::sign(audience, key, expiry, Some("service"))?;
    let status = put_token(&mut session, audience, &token).await?;
    anyhow::ensure!(status == 200, "put-token: {status}");
    let mut receiver = Receiver::attach(
        &mut session,
        "reader",
        format!("localhost/ConsumerGroups/$Default/Partitions/{partition}"),
    )
    .await?;
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), receiver.recv::<Body<Value>>())
            .await
            .context("events stopped")??;
        let m = d.message();
        let offset = m
            .message_annotations
            .as_ref()
            .and_then(|a| {
                a.0.get(
                    &fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(
                        "x-opt-offset".into(),
                    ),
                )
            })
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let id = m
            .properties
            .as_ref()
            .and_then(|p| p.message_id.as_ref())
            .map(|i| format!("{i:?}"))
            .unwrap_or_default();
        out.push((offset, id));
    }
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(out)
}
