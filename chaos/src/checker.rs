//! Compares what was acknowledged with what every replica can read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use meridian::client::ServiceClient;
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use meridian_proto::telemetry::{PartitionInfoRequest, ReadPartitionRequest};
use serde::Serialize;

/// One stored telemetry message: (partition, offset, device, seq).
pub type StoredMessage = (u32, u64, String, u64);

/// Reads every message of every partition stored on the node at `grpc`.
pub async fn read_all(grpc: SocketAddr) -> Result<Vec<StoredMessage>> {
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
            let Some(seq) = r
                .application_properties
                .get("seq")
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            if r.system_properties.get("message-id") != Some(&format!("{device}-{seq}")) {
                bail!("message id and seq disagree at {partition}:{}", r.offset);
            }
            out.push((partition, r.offset, device, seq));
        }
    }
    Ok(out)
}

/// The next offset of each partition on the node at `grpc`.
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

/// Waits until every partition's end offset on `grpc` moved past `ends` (each partition took an
/// append again); returns how long that took.
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
            bail!("not every partition took an append within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the nodes at `grpcs` report the same end offsets.
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

/// The telemetry verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TelemetryCheck {
    /// Messages PUBACKed.
    pub acked: usize,
    /// Messages stored (each replica holds the same).
    pub stored: usize,
    /// PUBACKed but not stored (must be 0).
    pub lost: usize,
    /// Stored twice in a row: a resend after a broken connection, same message id.
    pub duplicates: usize,
    /// Devices whose stored messages are out of send order (must be 0).
    pub out_of_order_devices: usize,
    /// Whether every replica holds exactly the same partitions.
    pub replicas_identical: bool,
    /// Lost messages, first few, as `device-seq`.
    pub lost_examples: Vec<String>,
    /// Devices out of order, first few: the device, then the stored sequence numbers around the
    /// first place they go backwards, each with its partition and offset (`seq@p:offset`).
    pub out_of_order_examples: Vec<String>,
}

/// Checks the replicas' stored messages against the acknowledged ones.
pub fn check_telemetry(
    acked: &BTreeMap<String, Vec<u64>>,
    replicas: &[Vec<StoredMessage>],
) -> TelemetryCheck {
    let mut check = TelemetryCheck {
        acked: acked.values().map(Vec::len).sum(),
        replicas_identical: replicas.iter().all(|r| *r == replicas[0]),
        ..TelemetryCheck::default()
    };
    let Some(first) = replicas.first() else {
        check.lost = check.acked;
        return check;
    };
    check.stored = first.len();
    let mut stored: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut placed: BTreeMap<&str, Vec<(u64, u32, u64)>> = BTreeMap::new();
    for (partition, offset, device, seq) in first {
        stored.entry(device.as_str()).or_default().push(*seq);
        placed
            .entry(device.as_str())
            .or_default()
            .push((*seq, *partition, *offset));
    }
    for (device, seqs) in acked {
        let mut log = stored.get(device.as_str()).cloned().unwrap_or_default();
        let len = log.len();
        log.dedup();
        check.duplicates += len - log.len();
        if !log.windows(2).all(|w| w[0] < w[1]) {
            check.out_of_order_devices += 1;
            if check.out_of_order_examples.len() < 5 {
                let all = placed.get(device.as_str()).cloned().unwrap_or_default();
                let back = all.windows(2).position(|w| w[1].0 < w[0].0).unwrap_or(0);
                let around: Vec<String> = all
                    .iter()
                    .skip(back.saturating_sub(3))
                    .take(8)
                    .map(|(seq, p, o)| format!("{seq}@{p}:{o}"))
                    .collect();
                check
                    .out_of_order_examples
                    .push(format!("{device}: {}", around.join(" ")));
            }
        }
        let mut sorted = log.clone();
        sorted.sort_unstable();
        for s in seqs {
            if sorted.binary_search(s).is_err() {
                check.lost += 1;
                if check.lost_examples.len() < 10 {
                    check.lost_examples.push(format!("{device}-{s}"));
                }
            }
        }
    }
    check
}

/// The registry verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegistryCheck {
    /// Creates answered 200.
    pub acked: usize,
    /// Of those, missing on some node (must be 0).
    pub lost: usize,
    /// Missing ones, first few, as `device@node`.
    pub lost_examples: Vec<String>,
}

/// Checks that every acknowledged create is readable through every client.
pub async fn check_registry(
    acked: &[String],
    clients: &[(u64, ServiceClient)],
) -> Result<RegistryCheck> {
    let mut check = RegistryCheck {
        acked: acked.len(),
        ..RegistryCheck::default()
    };
    for (node, client) in clients {
        let mut c = client.connect().await?;
        for id in acked {
            let status = c.json("GET", &format!("/devices/{id}"), None).await?.status;
            if status != 200 {
                check.lost += 1;
                if check.lost_examples.len() < 10 {
                    check.lost_examples.push(format!("{id}@{node}"));
                }
            }
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(p: u32, o: u64, d: &str, s: u64) -> StoredMessage {
        (p, o, d.to_string(), s)
    }

    #[test]
    fn the_checker_finds_loss_reordering_and_divergence() {
        let acked = BTreeMap::from([("a".to_string(), vec![1, 2, 3])]);
        let good = vec![
            msg(0, 0, "a", 1),
            msg(0, 1, "a", 2),
            msg(0, 2, "a", 2),
            msg(0, 3, "a", 3),
        ];
        let c = check_telemetry(&acked, &[good.clone(), good.clone()]);
        assert_eq!((c.lost, c.duplicates, c.out_of_order_devices), (0, 1, 0));
        assert!(c.replicas_identical);
        let lossy = vec![msg(0, 0, "a", 1), msg(0, 1, "a", 3)];
        let c = check_telemetry(&acked, &[lossy.clone(), good]);
        assert_eq!(c.lost, 1);
        assert_eq!(c.lost_examples, vec!["a-2".to_string()]);
        assert!(!c.replicas_identical);
        let reordered = vec![msg(0, 0, "a", 2), msg(0, 1, "a", 1), msg(0, 2, "a", 3)];
        let c = check_telemetry(&acked, &[reordered]);
        assert_eq!((c.lost, c.out_of_order_devices), (0, 1));
        assert_eq!(
            c.out_of_order_examples,
            vec!["a: 2@0:0 1@0:1 3@0:2".to_string()]
        );
    }
}
