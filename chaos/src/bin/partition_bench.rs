//! `partition-bench`: the cost of replicating telemetry partitions and the time to recover from a
//! node loss, on real `meridian node` processes on loopback.
//!
//! For each replication factor: start `--nodes` nodes, create `--devices` devices, connect them
//! round-robin to every node over MQTT/TLS and publish 256-byte QoS 1 messages (one in flight per
//! device) for `--seconds`, timing PUBLISH → PUBACK. Then, for the last factor, `--trials` times:
//! kill -9 the node leading the most partitions and time until every partition accepted a PUBACKed
//! message again (one probe device per partition, connected to a surviving node), restart it.
//!
//! `cargo run --release -p meridian-chaos --bin partition-bench -- --help`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meridian::client::ServiceClient;
use meridian::client::device::{
    ConnAckCode as ConnectReturnCode, RawMqtt, device_token, tls_config,
};
use meridian_chaos::proc::{Proc, free_ports, metric, percentile};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    about = "Replicated telemetry partitions: acked msg/s by replication factor, node-loss recovery"
)]
struct Args {
    /// The meridian binary.
    #[arg(long, default_value = "target/release/meridian")]
    meridian_bin: PathBuf,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Devices publishing (one QoS 1 message in flight each).
    #[arg(long, default_value_t = 300)]
    devices: usize,
    /// Seconds of load per replication factor.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Replication factors to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replication_factors: Vec<usize>,
    /// Node-loss trials on the last factor.
    #[arg(long, default_value_t = 10)]
    trials: usize,
}

const PARTITIONS: u32 = 4;

struct Node {
    proc: Proc,
    https: SocketAddr,
    mqtt: SocketAddr,
    metrics: SocketAddr,
}

struct Cluster {
    nodes: Vec<Node>,
    client: ServiceClient,
    ca: PathBuf,
}

async fn start(args: &Args, dir: &Path, rf: usize) -> Result<Cluster> {
    let tls = meridian::tls::ensure_dev_certificates(&dir.join("tls"))?;
    let ca = tls.ca_cert.clone().context("generated CA")?;
    let n = args.nodes;
    let p = free_ports(4 * n)?;
    let members: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{ id = {}, grpc_addr = \"127.0.0.1:{}\" }}",
                i + 1,
                p[4 * i + 1]
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for i in 0..n {
        let id = i + 1;
        let (https, grpc, metrics, mqtt) = (p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]);
        let config = dir.join(format!("n{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\ndata_dir = \"{d}\"\n[cluster]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nmembers = [{m}]\nreplication_factor = {rf}\n[api]\nhttps_listen = \"127.0.0.1:{https}\"\n[tls]\ncert = \"{c}\"\nkey = \"{k}\"\n[observability]\nmetrics_listen = \"127.0.0.1:{metrics}\"\n[mqtt]\ntls_listen = \"127.0.0.1:{mqtt}\"\npartitions = {PARTITIONS}\n",
                d = dir.join(format!("n{id}")).display(),
                m = members.join(", "),
                c = tls.cert.display(),
                k = tls.key.display(),
            ),
        )?;
        let proc = Proc::start(
            vec![
                args.meridian_bin.display().to_string(),
                "node".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            dir.join(format!("n{id}.log")),
        )?;
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        nodes.push(Node {
            proc,
            https: addr(https),
            mqtt: addr(mqtt),
            metrics: addr(metrics),
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let creds_path = loop {
        if let Some(p) = (1..=n)
            .map(|id| dir.join(format!("n{id}/credentials.json")))
            .find(|p| p.exists())
        {
            break p;
        }
        if Instant::now() > deadline {
            bail!("cluster did not come up; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let creds: Value = serde_json::from_slice(&std::fs::read(creds_path)?)?;
    let cs = creds["service_connection_string"]
        .as_str()
        .unwrap_or_default();
    let client = ServiceClient::new(cs, nodes[0].https, &ca)?.with_timeout(Duration::from_secs(20));
    Ok(Cluster { nodes, client, ca })
}

async fn create_devices(cluster: &Cluster, ids: &[String]) -> Result<Vec<(String, String)>> {
    let mut conn = cluster.client.connect().await?;
    let mut out = Vec::new();
    for id in ids {
        let r = conn
            .json(
                "PUT",
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await?;
        if r.status != 200 {
            bail!("create {id}: {} {}", r.status, r.json());
        }
        let key = r.json()["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.push((id.clone(), device_token("localhost", id, &key, 24 * 3600)?));
    }
    Ok(out)
}

/// Publishes from every device for `seconds`; returns (acked/s, p50, p99, failed devices).
async fn load(
    cluster: &Cluster,
    devices: &[(String, String)],
    seconds: u64,
) -> Result<(f64, Duration, Duration, usize)> {
    let tls = tls_config(&cluster.ca)?;
    let mut clients = Vec::new();
    for (i, (id, password)) in devices.iter().enumerate() {
        let addr = cluster.nodes[i % cluster.nodes.len()].mqtt;
        let (c, code, _) =
            RawMqtt::connect_with(addr, None, tls.clone(), id, password, true, 600).await?;
        if code != ConnectReturnCode::Success {
            bail!("{id}: {code:?}");
        }
        clients.push((id.clone(), c));
    }
    let started = Instant::now();
    let stop = started + Duration::from_secs(seconds);
    let body = vec![b'x'; 256];
    let mut tasks = Vec::new();
    for (id, mut c) in clients {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{id}/messages/events/");
            let mut lat = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < stop {
                seq += 1;
                let t0 = Instant::now();
                match c
                    .publish_acked(
                        &topic,
                        &body,
                        (seq % 60_000) as u16 + 1,
                        Duration::from_secs(30),
                    )
                    .await
                {
                    Ok(true) => lat.push(t0.elapsed()),
                    _ => return (lat, true),
                }
            }
            (lat, false)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        all.extend(l);
        failed += usize::from(f);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_unstable();
    Ok((rate, percentile(&all, 0.5), percentile(&all, 0.99), failed))
}

/// Index of the running node that leads the most partitions.
async fn busiest_leader(cluster: &Cluster) -> Option<usize> {
    let mut best = None;
    for (i, n) in cluster.nodes.iter().enumerate() {
        if !n.proc.is_running() {
            continue;
        }
        let mut led = 0;
        for p in 0..PARTITIONS {
            let name = format!("meridian_partition_is_leader{{partition=\"{p}\"}}");
            if metric(n.metrics, &name).await == Some(1.0) {
                led += 1;
            }
        }
        if led > 0 && best.is_none_or(|(_, b)| led > b) {
            best = Some((i, led));
        }
    }
    best.map(|(i, _)| i)
}

/// Publishes from `probe` (connected to `addr`) until a PUBACK arrives, reconnecting as needed.
async fn probe_until_acked(
    addr: SocketAddr,
    ca: PathBuf,
    (id, password): (String, String),
    deadline: Instant,
) -> Result<Instant> {
    let tls = tls_config(&ca)?;
    let topic = format!("devices/{id}/messages/events/");
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let Ok((mut c, ConnectReturnCode::Success, _)) =
            RawMqtt::connect_with(addr, None, tls.clone(), &id, &password, true, 60).await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        seq += 1;
        // One try per connection: a node that could not store the message closes it.
        if let Ok(true) = c
            .publish_acked(
                &topic,
                b"probe",
                (seq % 60_000) as u16 + 1,
                Duration::from_secs(5),
            )
            .await
        {
            return Ok(Instant::now());
        }
    }
    bail!("{id}: no PUBACK before the deadline")
}

async fn recovery_trials(cluster: &mut Cluster, trials: usize) -> Result<Vec<Duration>> {
    // One probe device per partition.
    let mut probe_ids = vec![String::new(); PARTITIONS as usize];
    let mut i = 0;
    while probe_ids.iter().any(String::is_empty) {
        let id = format!("probe-{i}");
        let p = meridian::domain::telemetry::partition_for(&id, PARTITIONS) as usize;
        if probe_ids[p].is_empty() {
            probe_ids[p] = id;
        }
        i += 1;
    }
    let probes = create_devices(cluster, &probe_ids).await?;
    let mut times = Vec::new();
    for trial in 0..trials {
        let deadline = Instant::now() + Duration::from_secs(30);
        let victim = loop {
            if let Some(v) = busiest_leader(cluster).await {
                break v;
            }
            if Instant::now() > deadline {
                bail!("no partition leader before trial {trial}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let survivor = cluster.nodes[(victim + 1) % cluster.nodes.len()].mqtt;
        let killed = Instant::now();
        cluster.nodes[victim].proc.kill9();
        let mut tasks = Vec::new();
        for probe in probes.clone() {
            tasks.push(tokio::spawn(probe_until_acked(
                survivor,
                cluster.ca.clone(),
                probe,
                killed + Duration::from_secs(30),
            )));
        }
        let mut last = killed;
        for t in tasks {
            last = last.max(t.await??);
        }
        let took = last - killed;
        println!(
            "  trial {trial}: killed node {}, every partition acked again after {took:?}",
            victim + 1
        );
        times.push(took);
        cluster.nodes[victim].proc.spawn()?;
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    Ok(times)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    println!("work dir: {}", dir.path().display());
    let ids: Vec<String> = (0..args.devices).map(|i| format!("pb-{i}")).collect();
    let mut rows = vec![
        format!(
            "| {} nodes, {} devices, 256 B QoS 1 over TLS | acked msg/s | p50 ms | p99 ms | failed devices |",
            args.nodes, args.devices
        ),
        "|---|---|---|---|---|".to_string(),
    ];
    let mut recovery = Vec::new();
    let last = args.replication_factors.len().saturating_sub(1);
    for (k, rf) in args.replication_factors.iter().enumerate() {
        let sub = dir.path().join(format!("rf{rf}"));
        std::fs::create_dir_all(&sub)?;
        let mut cluster = start(&args, &sub, *rf).await?;
        let devices = create_devices(&cluster, &ids).await?;
        // Let every partition elect its leader before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rate, p50, p99, failed) = load(&cluster, &devices, args.seconds).await?;
        let row = format!(
            "| RF={rf} | {rate:.0} | {:.2} | {:.2} | {failed} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        println!("{row}");
        rows.push(row);
        if k == last && args.trials > 0 {
            recovery = recovery_trials(&mut cluster, args.trials).await?;
        }
    }
    println!("\n{}", rows.join("\n"));
    if !recovery.is_empty() {
        let mut sorted = recovery.clone();
        sorted.sort_unstable();
        println!(
            "\nnode loss → every partition writable again, {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            sorted.len(),
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            sorted.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
