//! Four nodes with 3 replicas per partition: each node holds only some partitions, yet a reader
//! on any node sees every partition whole (the node reads the ones it does not hold from a
//! replica), over gRPC and over REST.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use common::load::{Devices, check_replicas, progress};
use common::{create_device, start_cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reads_every_partition() -> Result<()> {
    let mut cluster = start_cluster(4, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let mut svc = cluster.client(1).await?.connect().await?;
    let mut keys = Vec::new();
    for i in 0..20 {
        let id = format!("rd-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let mqtt: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let devices = Devices::start(keys, mqtt.clone(), cluster.ca.clone());
    let acked = devices.acked.clone();
    progress(&acked, 1000, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    let acked = devices.stop().await?;

    // With 4 nodes and 3 replicas, some node lacks some partition.
    let mut holders: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for n in &cluster.nodes {
        for p in 0..4u32 {
            let name = format!("meridian_partition_is_replica{{partition=\"{p}\"}}");
            if n.metric(&name).await == Some(1.0) {
                holders.entry(p).or_default().insert(n.id);
            }
        }
    }
    println!("replicas per partition: {holders:?}");
    assert!(holders.values().all(|h| h.len() == 3), "{holders:?}");

    let grpcs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    // Every node must serve the same, whole partitions.
    let (count, _) = check_replicas(&acked, &grpcs)
        .await
        .with_context(|| cluster.logs())?;

    // REST too: the end offsets every node reports are the same.
    let base = cluster.client(1).await?;
    let mut ends = Vec::new();
    for n in &cluster.nodes {
        let mut c = base.with_addr(n.https).connect().await?;
        let r = c.json("GET", "/meridian/events/partitions", None).await?;
        ends.push(r.json()["endOffsets"].clone());
    }
    assert!(ends.iter().all(|e| *e == ends[0]), "{ends:?}");
    println!(
        "{count} messages readable on all 4 nodes; end offsets {}",
        ends[0]
    );
    Ok(())
}
