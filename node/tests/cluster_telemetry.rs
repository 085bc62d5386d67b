//! Replicated telemetry partitions on 3 real nodes: 200 devices stream telemetry through every
//! node while one node is killed with SIGKILL, restarted, and then another. Every PUBACKed message
//! must be readable afterwards on every replica, each device's messages in send order, duplicates
//! only as resends with the same message id, and all replicas must hold identical partitions.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{create_device, start_cluster};
use meridian::client::device::{RawMqtt, device_token, tls_config};
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use meridian_proto::telemetry::{PartitionInfoRequest, ReadPartitionRequest};
use rumqttc::mqttbytes::v4::ConnectReturnCode;

const DEVICES: usize = 200;

type Acked = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

fn total(acked: &Acked) -> usize {
    acked
        .lock()
        .map(|a| a.values().map(Vec::len).sum())
        .unwrap_or(0)
}

/// Waits until `more` further messages are acknowledged; returns how long that took.
async fn progress(acked: &Acked, more: usize, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let from = total(acked);
    while total(acked) < from + more {
        if start.elapsed() > timeout {
            bail!(
                "telemetry stalled: {} acked in {timeout:?}",
                total(acked) - from
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// One device: publishes seq 1, 2, ... with message id `{id}-{seq}`, moving to the next node when
/// its connection breaks and resending the unacknowledged message there.
async fn run_device(
    id: String,
    key: String,
    nodes: Vec<SocketAddr>,
    ca: std::path::PathBuf,
    acked: Acked,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let tls = tls_config(&ca)?;
    let token = device_token("localhost", &id, &key, 3600)?;
    let mut node = id
        .rsplit('-')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        % nodes.len();
    let mut seq = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let connected =
            RawMqtt::connect_with(nodes[node], None, tls.clone(), &id, &token, true, 60).await;
        let mut device = match connected {
            Ok((d, ConnectReturnCode::Success, _)) => d,
            _ => {
                node = (node + 1) % nodes.len();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let topic = format!("devices/{id}/messages/events/%24.mid={id}-{seq}&seq={seq}");
            let pkid = (seq % 60000) as u16 + 1;
            match device
                .publish_acked(
                    &topic,
                    seq.to_string().as_bytes(),
                    pkid,
                    Duration::from_secs(15),
                )
                .await
            {
                Ok(true) => {
                    if let Ok(mut a) = acked.lock() {
                        a.entry(id.clone()).or_default().push(seq);
                    }
                    seq += 1;
                }
                _ => {
                    node = (node + 1) % nodes.len();
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Every stored message of every partition on the node at `grpc`: (partition, offset, device, seq).
async fn read_all(grpc: SocketAddr) -> Result<Vec<(u32, u64, String, u64)>> {
    let mut reader = TelemetryReadClient::connect(format!("http://{grpc}")).await?;
    let info = reader
        .partition_info(PartitionInfoRequest {})
        .await?
        .into_inner();
    let mut out = Vec::new();
    for partition in 0..info.partition_count {
        let mut stream = reader
            .read_partition(ReadPartitionRequest {
                partition,
                from_offset: 0,
                max_records: 10_000_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(r) = stream.message().await? {
            let device = r.system_properties["iothub-connection-device-id"].clone();
            let seq: u64 = r.application_properties["seq"].parse()?;
            if r.system_properties["message-id"] != format!("{device}-{seq}") {
                bail!("message id and seq disagree at {partition}:{}", r.offset);
            }
            out.push((partition, r.offset, device, seq));
        }
    }
    Ok(out)
}

async fn end_offsets(grpc: SocketAddr) -> Option<Vec<u64>> {
    let mut reader = TelemetryReadClient::connect(format!("http://{grpc}"))
        .await
        .ok()?;
    Some(
        reader
            .partition_info(PartitionInfoRequest {})
            .await
            .ok()?
            .into_inner()
            .end_offsets,
    )
}

/// Waits until every partition's end offset on the node at `grpc` moved past `ends` (each
/// partition accepted a new append), returning how long that took.
async fn all_partitions_advance(
    grpc: SocketAddr,
    ends: &[u64],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if let Some(now) = end_offsets(grpc).await
            && now.len() == ends.len()
            && now.iter().zip(ends).all(|(n, e)| n > e)
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("not every partition accepted appends within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_survives_node_kills_on_every_replica() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let mut keys = Vec::new();
    for i in 0..DEVICES {
        let id = format!("ct-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (id, key) in keys {
        tasks.push(tokio::spawn(run_device(
            id,
            key,
            nodes.clone(),
            cluster.ca.clone(),
            acked.clone(),
            stop.clone(),
        )));
    }
    progress(&acked, 2000, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;

    // Kill node 1, see telemetry flow again, restart it; then the same with node 2.
    let mut recovery = Vec::new();
    let mut killed = Vec::new();
    for _ in 0..2 {
        // The node leading the most partitions that was not killed yet.
        let leaders = cluster.partition_leaders(4).await;
        let victim = (1..=3u64)
            .filter(|n| !killed.contains(n))
            .max_by_key(|n| leaders.iter().filter(|l| **l == Some(*n)).count())
            .unwrap_or(1);
        let led = leaders.iter().filter(|l| **l == Some(victim)).count();
        println!("partition leaders {leaders:?}; killing node {victim} (leads {led})");
        assert!(led > 0, "the victim should lead a partition: {leaders:?}");
        killed.push(victim);
        let survivor = cluster.nodes[victim as usize % 3].grpc;
        let before = total(&acked);
        let ends = end_offsets(survivor).await.context("end offsets")?;
        cluster.node(victim).kill9();
        let took = all_partitions_advance(survivor, &ends, Duration::from_secs(30))
            .await
            .with_context(|| cluster.logs())?;
        recovery.push((victim, before, took));
        cluster.restart(victim)?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        progress(&acked, 500, Duration::from_secs(30))
            .await
            .with_context(|| cluster.logs())?;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let acked: BTreeMap<String, Vec<u64>> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let total_acked: usize = acked.values().map(Vec::len).sum();

    // Replicas converge: the same end offsets everywhere.
    let grpcs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ends = Vec::new();
        for g in &grpcs {
            ends.push(end_offsets(*g).await);
        }
        if ends.iter().all(|e| e.is_some() && *e == ends[0]) {
            break;
        }
        if Instant::now() > deadline {
            bail!("replicas did not converge: {ends:?}\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut replicas = Vec::new();
    for g in &grpcs {
        replicas.push(read_all(*g).await?);
    }
    for (i, r) in replicas.iter().enumerate().skip(1) {
        assert!(
            *r == replicas[0],
            "node {} holds different partitions than node 1",
            i + 1
        );
    }
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, _, device, seq) in &replicas[0] {
        stored.entry(device.clone()).or_default().push(*seq);
    }
    let mut duplicates = 0;
    for (device, seqs) in &acked {
        let mut log = stored.get(device).cloned().unwrap_or_default();
        let len = log.len();
        // A resend after a broken connection may be stored twice, right after itself.
        log.dedup();
        duplicates += len - log.len();
        assert!(
            log.windows(2).all(|w| w[0] < w[1]),
            "{device}: out of order: {log:?}"
        );
        for s in seqs {
            assert!(
                log.binary_search(s).is_ok(),
                "{device}: acknowledged message {s} lost"
            );
        }
    }
    let stored_total: usize = stored.values().map(Vec::len).sum();
    println!(
        "acked {total_acked}, stored {stored_total}, duplicates {duplicates}, lost 0; \
         recovery (victim, acked before the kill, kill → every partition appended again): {recovery:?}"
    );
    Ok(())
}
