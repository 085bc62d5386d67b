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

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meridian::client::device::{
    ConnAckCode as ConnectReturnCode, RawMqtt, device_token, tls_config,
};
use meridian_chaos::cluster::{ChaosCluster, ClusterOptions};
use meridian_chaos::proc::percentile;
use meridian_chaos::workload::{all_partitions_writable, probe_ids};
use serde_json::json;

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

async fn start(args: &Args, dir: &std::path::Path, rf: usize) -> Result<ChaosCluster> {
    let mut opts = ClusterOptions::new(args.meridian_bin.clone());
    opts.nodes = args.nodes;
    opts.replication_factor = rf;
    opts.log_filter = "warn".into();
    ChaosCluster::start(&opts, dir).await
}

async fn create_devices(cluster: &ChaosCluster, ids: &[String]) -> Result<Vec<(String, String)>> {
    let mut conn = cluster.service.connect().await?;
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
        out.push((id.clone(), key));
    }
    Ok(out)
}

/// Publishes from every device for `seconds`; returns (acked/s, p50, p99, failed devices).
async fn load(
    cluster: &ChaosCluster,
    devices: &[(String, String)],
    seconds: u64,
) -> Result<(f64, Duration, Duration, usize)> {
    let tls = tls_config(&cluster.ca)?;
    let mut clients = Vec::new();
    for (i, (id, key)) in devices.iter().enumerate() {
        let addr = cluster.nodes[i % cluster.nodes.len()].mqtt;
        let password = device_token("localhost", id, key, 24 * 3600)?;
        let (c, code, _) =
            RawMqtt::connect_with(addr, None, tls.clone(), id, &password, true, 600).await?;
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

async fn recovery_trials(cluster: &mut ChaosCluster, trials: usize) -> Result<Vec<Duration>> {
    let probes = create_devices(cluster, &probe_ids("probe", cluster.partitions)).await?;
    let all: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let mut times = Vec::new();
    for trial in 0..trials {
        let victim = cluster
            .busiest_partition_leader(&all)
            .await
            .with_context(|| format!("no partition leader before trial {trial}"))?;
        let survivor = cluster
            .nodes
            .iter()
            .find(|n| n.id != victim)
            .map(|n| n.mqtt)
            .context("survivor")?;
        let killed = Instant::now();
        cluster.kill9(victim)?;
        let took = all_partitions_writable(
            &[survivor],
            &cluster.ca,
            &probes,
            killed,
            Duration::from_secs(30),
        )
        .await?;
        println!(
            "  trial {trial}: killed node {victim}, every partition acked again after {took:?}"
        );
        times.push(took);
        cluster.restart(victim)?;
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
