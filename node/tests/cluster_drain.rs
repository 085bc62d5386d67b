//! Draining a node through the control-plane CLI under telemetry load: its device connections
//! close and devices carry on through other nodes, it refuses new connections, its partition
//! replicas and leaderships move away; then it is stopped for maintenance with no stall, comes
//! back, is undrained and takes replicas again. No acknowledged message is lost.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use common::load::{Devices, check_replicas, progress};
use common::{create_device, start_cluster, wait_partition_voters};
use meridian::client::device::{ConnAckCode, RawMqtt, device_token};

/// Runs `meridian cluster` against a node other than `avoid` (which may be down).
fn cluster_cli(
    cluster: &common::Cluster,
    avoid: u64,
    operator: &str,
    args: &[&str],
) -> Result<String> {
    let address = cluster
        .nodes
        .iter()
        .find(|n| n.id != avoid)
        .map(|n| n.https.to_string())
        .unwrap_or_default();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["cluster", "--address", &address])
        .args(args)
        .env("MERIDIAN_OPERATOR_CONNECTION_STRING", operator)
        .env("MERIDIAN_CA_CERT", &cluster.ca)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "meridian cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_devices_and_partitions_away_before_maintenance() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let op = cluster.operator(1).await?;
    let mut svc = cluster.client(1).await?.connect().await?;
    let mut keys = Vec::new();
    for i in 0..30 {
        let id = format!("dr-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let watcher_key = create_device(&mut svc, "dr-watch").await?;
    let mqtt: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let devices = Devices::start(keys, mqtt.clone(), cluster.ca.clone());
    let acked = devices.acked.clone();
    progress(&acked, 1000, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;

    // Drain the node leading the most partitions; a device connected to it gets closed.
    let leaders = cluster.partition_leaders(4).await;
    let x = (1..=3u64)
        .max_by_key(|n| leaders.iter().filter(|l| **l == Some(*n)).count())
        .unwrap_or(1);
    let token = device_token("localhost", "dr-watch", &watcher_key, 600)?;
    let (mut watcher, code, _) = RawMqtt::connect(
        cluster.node(x).mqtt,
        &cluster.ca,
        "dr-watch",
        &token,
        true,
        60,
    )
    .await?;
    assert_eq!(code, ConnAckCode::Success);
    println!("draining node {x} (leads partitions {leaders:?})");
    cluster_cli(
        &cluster,
        x,
        &creds.operator_connection_string,
        &["drain", "--id", &x.to_string()],
    )?;
    assert!(
        watcher.closed_within(Duration::from_secs(10)).await,
        "the drained node kept its device connection"
    );
    let others: BTreeSet<u64> = (1..=3).filter(|n| *n != x).collect();
    let placed = wait_partition_voters(
        &cluster,
        &op,
        |r| r.iter().all(|s| *s == others),
        Duration::from_secs(30),
    )
    .await?;
    println!("partition voters while {x} drains: {placed:?}");
    let listing = cluster_cli(&cluster, x, &creds.operator_connection_string, &["nodes"])?;
    let listing: serde_json::Value = serde_json::from_str(&listing)?;
    let entry = listing["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == serde_json::json!(x)))
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["draining"], serde_json::json!(true), "{listing}");
    assert_eq!(entry["partitionsLed"], serde_json::json!(0), "{listing}");
    let (_, code, _) = RawMqtt::connect(
        cluster.node(x).mqtt,
        &cluster.ca,
        "dr-watch",
        &token,
        true,
        60,
    )
    .await?;
    assert_eq!(
        code,
        ConnAckCode::ServiceUnavailable,
        "a draining node refuses devices"
    );
    progress(&acked, 500, Duration::from_secs(30))
        .await
        .with_context(|| cluster.logs())?;

    // Maintenance: stopping the drained node does not stall telemetry.
    cluster.node(x).kill9();
    let took = progress(&acked, 500, Duration::from_secs(10))
        .await
        .with_context(|| cluster.logs())?;
    println!("500 more messages {took:?} after stopping the drained node");
    cluster.restart(x)?;
    cluster_cli(
        &cluster,
        x,
        &creds.operator_connection_string,
        &["undrain", "--id", &x.to_string()],
    )?;
    wait_partition_voters(
        &cluster,
        &op,
        |r| r.iter().all(|s| s.len() == 3),
        Duration::from_secs(60),
    )
    .await?;
    progress(&acked, 500, Duration::from_secs(30))
        .await
        .with_context(|| cluster.logs())?;

    let acked = devices.stop().await?;
    let grpcs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    let (count, duplicates) = check_replicas(&acked, &grpcs)
        .await
        .with_context(|| cluster.logs())?;
    println!("stored {count}, duplicates {duplicates}, lost 0");
    Ok(())
}
