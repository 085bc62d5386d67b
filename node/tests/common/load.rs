//! Telemetry load for cluster tests: devices that publish numbered messages and move to the next
//! node when their connection breaks, and readers that collect what every replica stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use meridian::client::device::{RawMqtt, device_token, tls_config};
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use meridian_proto::telemetry::{PartitionInfoRequest, ReadPartitionRequest};
use rumqttc::mqttbytes::v4::ConnectReturnCode;

pub type Acked = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

pub fn total(acked: &Acked) -> usize {
    acked
        .lock()
        .map(|a| a.values().map(Vec::len).sum())
        .unwrap_or(0)
}

/// Waits until `more` further messages are acknowledged; returns how long that took.
pub async fn progress(acked: &Acked, more: usize, timeout: Duration) -> Result<Duration> {
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
pub async fn run_device(
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
pub async fn read_all(grpc: SocketAddr) -> Result<Vec<(u32, u64, String, u64)>> {
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

pub async fn end_offsets(grpc: SocketAddr) -> Option<Vec<u64>> {
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
pub async fn all_partitions_advance(
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

/// Checks one replica's records against what was acknowledged: every acknowledged message is
/// there, each device's messages are in send order, and the only duplicates are a resend stored
/// right after itself (same message id). Returns (stored, duplicates).
pub fn check_acked(
    acked: &BTreeMap<String, Vec<u64>>,
    records: &[(u32, u64, String, u64)],
) -> Result<(usize, usize)> {
    let mut stored: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (_, _, device, seq) in records {
        stored.entry(device.as_str()).or_default().push(*seq);
    }
    let mut duplicates = 0;
    for (device, seqs) in acked {
        let mut log = stored.get(device.as_str()).cloned().unwrap_or_default();
        let len = log.len();
        log.dedup();
        duplicates += len - log.len();
        if !log.windows(2).all(|w| w[0] < w[1]) {
            bail!("{device}: out of order: {log:?}");
        }
        if let Some(lost) = seqs.iter().find(|s| log.binary_search(s).is_err()) {
            bail!("{device}: acknowledged message {lost} lost");
        }
    }
    Ok((records.len(), duplicates))
}

/// Waits until every node at `grpcs` reports the same end offsets.
pub async fn wait_converged(grpcs: &[SocketAddr], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut ends = Vec::new();
        for g in grpcs {
            ends.push(end_offsets(*g).await);
        }
        if ends.iter().all(|e| e.is_some() && *e == ends[0]) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("replicas did not converge: {ends:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running set of [`run_device`] tasks.
pub struct Devices {
    /// What they got acknowledged so far.
    pub acked: Acked,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl Devices {
    /// Starts one [`run_device`] per `(id, key)`, rotating over `nodes`.
    pub fn start(
        keys: Vec<(String, String)>,
        nodes: Vec<SocketAddr>,
        ca: std::path::PathBuf,
    ) -> Self {
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = keys
            .into_iter()
            .map(|(id, key)| {
                tokio::spawn(run_device(
                    id,
                    key,
                    nodes.clone(),
                    ca.clone(),
                    acked.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Self { acked, stop, tasks }
    }

    /// Stops every device and returns what was acknowledged.
    pub async fn stop(self) -> Result<BTreeMap<String, Vec<u64>>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(self.acked.lock().map(|a| a.clone()).unwrap_or_default())
    }
}

/// Waits until the nodes at `grpcs` converge, requires them to hold identical partitions, and
/// checks them against `acked` ([`check_acked`]). Returns (stored, duplicates).
pub async fn check_replicas(
    acked: &BTreeMap<String, Vec<u64>>,
    grpcs: &[SocketAddr],
) -> Result<(usize, usize)> {
    wait_converged(grpcs, Duration::from_secs(60)).await?;
    let mut stored = Vec::new();
    for g in grpcs {
        stored.push(read_all(*g).await?);
    }
    if !stored.iter().all(|s| *s == stored[0]) {
        bail!("replicas differ");
    }
    check_acked(acked, &stored[0])
}
