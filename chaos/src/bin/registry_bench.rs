//! Registry benchmark: device creates/s and latency through the service REST API on a 3-node
//! loopback Meridian cluster, side by side with a 3-member etcd 3.4 cluster storing the same JSON
//! document per device key (through etcd's JSON gateway, also over TLS, also fsync'd), driven by
//! the same client code; then leader-failover time (kill -9 leader → first successful write).
//!
//! `cargo run --release -p meridian-chaos --bin registry-bench -- --help`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use meridian::client::{Authorization, ServiceClient};
use meridian_chaos::proc::{Proc, free_ports, metric, percentile};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// The meridian binary (build it with `cargo build --release -p meridian`).
    #[arg(long, default_value = "target/release/meridian")]
    meridian_bin: PathBuf,
    /// The etcd binary (Debian package etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Concurrent clients (each with one keep-alive connection, spread over the three nodes).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of load per system.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Leader-failover trials on Meridian (0 skips).
    #[arg(long, default_value_t = 10)]
    failover_trials: usize,
    /// Skip etcd.
    #[arg(long)]
    no_etcd: bool,
}

struct Stats {
    ops: usize,
    errors: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// One request a client sends for device `id`: (method, path, body).
type MakeRequest = fn(&str) -> (&'static str, String, Bytes);

/// Runs `clients` concurrent loops for `seconds`, each on one keep-alive connection.
async fn drive(
    targets: Vec<ServiceClient>,
    clients: usize,
    seconds: u64,
    tag: &str,
    make: MakeRequest,
) -> Result<Stats> {
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = targets[c % targets.len()].clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut conn = target.connect().await?;
            let mut i = 0u64;
            while Instant::now() < stop_at {
                i += 1;
                let id = format!("{tag}-{c}-{i}");
                let (method, path, body) = make(&id);
                let t0 = Instant::now();
                match conn
                    .send(method, &path, Some(body), &[], Authorization::Policy)
                    .await
                {
                    Ok(r) if r.status == 200 => latencies.push(t0.elapsed()),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = target.connect().await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((latencies, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    Ok(Stats {
        ops: all.len(),
        errors,
        elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    })
}

/// The JSON document Meridian stores for a new device, as the SDK creates it.
fn device_body(id: &str) -> Value {
    json!({
        "deviceId": id,
        "status": "enabled",
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}},
        "capabilities": {"iotEdge": false}
    })
}

fn meridian_request(id: &str) -> (&'static str, String, Bytes) {
    (
        "PUT",
        format!("/devices/{id}"),
        Bytes::from(device_body(id).to_string()),
    )
}

/// The same document, as Meridian returns it (with generated keys), stored under `devices/<id>`.
fn etcd_request(id: &str) -> (&'static str, String, Bytes) {
    let b64 = base64::engine::general_purpose::STANDARD;
    let doc = json!({
        "deviceId": id, "generationId": "636510460778278550", "etag": "MQ==",
        "connectionState": "Disconnected", "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "lastActivityTime": "0001-01-01T00:00:00Z", "cloudToDeviceMessageCount": 0,
        "authentication": {"type": "sas", "symmetricKey": {
            "primaryKey": "9Yxw9uYgC8fXNWnQ1cX3Qn0m8R7c2w8eZb1sT3Ck1Uo=",
            "secondaryKey": "Qm4a2o0q3nXk7f0c6H1s9Jt5p8Lw2Zr4Yv6Bu1Ne3Dg="},
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}},
        "status": "enabled", "statusReason": null, "statusUpdatedTime": "2026-11-27T12:00:00.000Z",
        "capabilities": {"iotEdge": false}, "parentScopes": []
    });
    let body =
        json!({"key": b64.encode(format!("devices/{id}")), "value": b64.encode(doc.to_string())});
    (
        "POST",
        "/v3/kv/put".to_string(),
        Bytes::from(body.to_string()),
    )
}

async fn wait_http_ok(
    client: &ServiceClient,
    method: &str,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = client.connect().await
            && let Ok(r) = c
                .send(method, path, body.clone(), &[], Authorization::Policy)
                .await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after {timeout:?}", client.addr());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct MeridianCluster {
    nodes: Vec<(u64, Proc, SocketAddr, SocketAddr)>,
    client: ServiceClient,
}

async fn start_meridian(
    bin: &Path,
    dir: &Path,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<MeridianCluster> {
    let p = free_ports(9)?;
    let specs: Vec<(u64, u16, u16, u16)> = (0..3)
        .map(|i| (i as u64 + 1, p[3 * i], p[3 * i + 1], p[3 * i + 2]))
        .collect();
    let members: Vec<String> = specs
        .iter()
        .map(|(id, _, g, _)| format!("{{ id = {id}, grpc_addr = \"127.0.0.1:{g}\" }}"))
        .collect();
    let mut nodes = Vec::new();
    for (id, https, grpc, metrics) in &specs {
        let config = dir.join(format!("m{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id}\ndata_dir = \"{d}\"\n[cluster]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nmembers = [{m}]\n[api]\nhttps_listen = \"127.0.0.1:{https}\"\n[tls]\ncert = \"{c}\"\nkey = \"{k}\"\n[observability]\nmetrics_listen = \"127.0.0.1:{metrics}\"\n",
                d = dir.join(format!("m{id}")).display(),
                m = members.join(", "),
                c = cert.display(),
                k = key.display(),
            ),
        )?;
        let proc = Proc::start(
            vec![
                bin.display().to_string(),
                "node".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            dir.join(format!("m{id}.log")),
        )?;
        nodes.push((
            *id,
            proc,
            SocketAddr::from(([127, 0, 0, 1], *https)),
            SocketAddr::from(([127, 0, 0, 1], *metrics)),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let creds_path = loop {
        if let Some(p) = (1..=3)
            .map(|id| dir.join(format!("m{id}/credentials.json")))
            .find(|p| p.exists())
        {
            break p;
        }
        if Instant::now() > deadline {
            bail!("meridian cluster did not come up; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let creds: Value = serde_json::from_slice(&std::fs::read(creds_path)?)?;
    let cs = creds["service_connection_string"]
        .as_str()
        .unwrap_or_default();
    let client = ServiceClient::new(cs, nodes[0].2, ca)?.with_timeout(Duration::from_secs(20));
    Ok(MeridianCluster { nodes, client })
}

async fn leader(cluster: &MeridianCluster) -> Option<usize> {
    for (i, (_, p, _, m)) in cluster.nodes.iter().enumerate() {
        if p.is_running() && metric(*m, "meridian_raft_is_leader").await == Some(1.0) {
            return Some(i);
        }
    }
    None
}

async fn failover_trials(cluster: &mut MeridianCluster, trials: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for trial in 0..trials {
        let deadline = Instant::now() + Duration::from_secs(30);
        let l = loop {
            if let Some(l) = leader(cluster).await {
                break l;
            }
            if Instant::now() > deadline {
                bail!("no leader before trial {trial}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let survivor = cluster.nodes[(l + 1) % 3].2;
        let client = cluster
            .client
            .with_addr(survivor)
            .with_timeout(Duration::from_secs(5));
        // Warm: one write through the survivor so its connection state is normal.
        wait_http_ok(
            &client,
            "PUT",
            &format!("/devices/warm-{trial}"),
            Some(Bytes::from(
                device_body(&format!("warm-{trial}")).to_string(),
            )),
            Duration::from_secs(20),
        )
        .await?;
        let killed_at = Instant::now();
        cluster.nodes[l].1.kill9();
        let mut i = 0;
        loop {
            i += 1;
            let id = format!("fo-{trial}-{i}");
            if let Ok(mut c) = client.connect().await
                && let Ok(r) = c
                    .send(
                        "PUT",
                        &format!("/devices/{id}"),
                        Some(Bytes::from(device_body(&id).to_string())),
                        &[],
                        Authorization::Policy,
                    )
                    .await
                && r.status == 200
            {
                break;
            }
            if killed_at.elapsed() > Duration::from_secs(30) {
                bail!("no write succeeded within 30 s of killing the leader (trial {trial})");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = killed_at.elapsed();
        println!("  failover trial {trial}: {took:?}");
        times.push(took);
        cluster.nodes[l].1.spawn()?;
        // Let the restarted node rejoin before the next kill, so each trial starts from 3 healthy nodes.
        let m = cluster.nodes[l].3;
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(m, "meridian_raft_last_applied_index")
            .await
            .unwrap_or(0.0)
            < 1.0
        {
            if Instant::now() > deadline {
                bail!("restarted node did not rejoin");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(times)
}

fn start_etcd(
    bin: &Path,
    dir: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(Vec<Proc>, Vec<SocketAddr>)> {
    let p = free_ports(6)?;
    let specs: Vec<(usize, u16, u16)> = (0..3).map(|i| (i + 1, p[2 * i], p[2 * i + 1])).collect();
    let initial: Vec<String> = specs
        .iter()
        .map(|(i, _, peer)| format!("e{i}=http://127.0.0.1:{peer}"))
        .collect();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for (i, client, peer) in &specs {
        let cmd = vec![
            bin.display().to_string(),
            format!("--name=e{i}"),
            format!("--data-dir={}", dir.join(format!("e{i}")).display()),
            format!("--listen-client-urls=https://127.0.0.1:{client}"),
            format!("--advertise-client-urls=https://127.0.0.1:{client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster={}", initial.join(",")),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=bench".into(),
            format!("--cert-file={}", cert.display()),
            format!("--key-file={}", key.display()),
            "--log-level=error".into(),
        ];
        procs.push(Proc::start(cmd, dir.join(format!("e{i}.log")))?);
        addrs.push(SocketAddr::from(([127, 0, 0, 1], *client)));
    }
    Ok((procs, addrs))
}

fn row(name: &str, s: &Stats) -> String {
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} | {} | {} |",
        s.rate(),
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.ops,
        s.errors
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    println!("work dir (logs): {}", dir.path().display());
    let tls = meridian::tls::ensure_dev_certificates(&dir.path().join("tls"))?;
    let ca = tls.ca_cert.clone().context("generated CA")?;

    println!("starting 3 meridian nodes");
    let mut meridian =
        start_meridian(&args.meridian_bin, dir.path(), &tls.cert, &tls.key, &ca).await?;
    let targets: Vec<ServiceClient> = meridian
        .nodes
        .iter()
        .map(|n| meridian.client.with_addr(n.2))
        .collect();
    wait_http_ok(
        &targets[0],
        "GET",
        "/statistics/devices",
        None,
        Duration::from_secs(30),
    )
    .await?;
    println!("meridian: {} clients for {} s", args.clients, args.seconds);
    let m = drive(
        targets,
        args.clients,
        args.seconds,
        "bench",
        meridian_request,
    )
    .await?;
    println!("{}", row("Meridian (3 nodes)", &m));

    let mut lines = vec![
        "| system | creates/s | p50 ms | p99 ms | ops | errors |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
        row("Meridian (3 nodes)", &m),
    ];
    if !args.no_etcd {
        println!("starting 3 etcd members");
        let (_etcd, addrs) = start_etcd(&args.etcd_bin, dir.path(), &tls.cert, &tls.key)?;
        let etcd_clients: Vec<ServiceClient> = addrs
            .iter()
            .map(|a| meridian.client.with_addr(*a).plain_https())
            .collect();
        let probe = etcd_request("probe");
        wait_http_ok(
            &etcd_clients[0],
            probe.0,
            &probe.1,
            Some(probe.2),
            Duration::from_secs(30),
        )
        .await?;
        println!("etcd: {} clients for {} s", args.clients, args.seconds);
        let e = drive(
            etcd_clients,
            args.clients,
            args.seconds,
            "bench",
            etcd_request,
        )
        .await?;
        println!("{}", row("etcd 3.4 (3 members)", &e));
        lines.push(row("etcd 3.4 (3 members)", &e));
        lines.push(format!(
            "\nratio Meridian/etcd creates/s: {:.2}",
            m.rate() / e.rate()
        ));
    }
    if args.failover_trials > 0 {
        println!("leader failover: {} trials", args.failover_trials);
        let mut times = failover_trials(&mut meridian, args.failover_trials).await?;
        times.sort_unstable();
        lines.push(format!(
            "\nleader failover (kill -9 leader -> first successful write), {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            times.len(),
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        ));
    }
    println!("\n{}", lines.join("\n"));
    if std::env::var_os("MERIDIAN_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}
