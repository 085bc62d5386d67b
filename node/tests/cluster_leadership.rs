//! Leadership transfer through the control-plane CLI, under telemetry load: the hub group's
//! leadership moves to a chosen node and the old leader is a voter again; a telemetry partition's
//! leadership moves to a chosen replica and its voters are restored by placement. Writes go on and
//! no acknowledged message is lost.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::load::{Devices, check_replicas, progress};
use common::{create_device, start_cluster, wait_partition_voters};
use serde_json::{Value, json};

fn cli(cluster: &common::Cluster, operator: &str, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["cluster", "--address", &cluster.nodes[1].https.to_string()])
        .args(args)
        .env("MERIDIAN_OPERATOR_CONNECTION_STRING", operator)
        .env("MERIDIAN_CA_CERT", &cluster.ca)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "meridian cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn voters(listing: &Value) -> BTreeSet<u64> {
    listing["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] == json!("voter"))
        .filter_map(|n| n["id"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_chosen_node() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let op = cluster.operator(1).await?;
    let mut svc = cluster.client(1).await?.connect().await?;
    let mut keys = Vec::new();
    for i in 0..20 {
        let id = format!("lt-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let mqtt: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let devices = Devices::start(keys, mqtt.clone(), cluster.ca.clone());
    let acked = devices.acked.clone();
    progress(&acked, 500, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;

    // The hub group.
    let target = (1..=3u64).find(|n| *n != leader).unwrap_or(1);
    let started = Instant::now();
    cli(
        &cluster,
        &creds.operator_connection_string,
        &["transfer-leader", "--to", &target.to_string()],
    )?;
    println!(
        "hub leadership {leader} → {target} in {:?}",
        started.elapsed()
    );
    let mut c = op.with_addr(cluster.node(target).https).connect().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = c.json("GET", "/meridian/cluster/nodes", None).await?.json();
        if voters(&listing) == BTreeSet::from([1, 2, 3]) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the old leader is not a voter again: {listing}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cluster.leader().await, Some(target));
    let r = svc
        .json(
            "PUT",
            "/devices/lt-after",
            Some(&json!({"deviceId": "lt-after"})),
        )
        .await?;
    assert_eq!(r.status, 200);

    // Partition 0.
    let p0 = cluster.partition_leaders(4).await[0].context("partition 0 leader")?;
    let to = (1..=3u64).find(|n| *n != p0).unwrap_or(1);
    cli(
        &cluster,
        &creds.operator_connection_string,
        &[
            "transfer-leader",
            "--to",
            &to.to_string(),
            "--partition",
            "0",
        ],
    )?;
    wait_partition_voters(
        &cluster,
        &op,
        |r| r.iter().all(|s| s.len() == 3),
        Duration::from_secs(30),
    )
    .await?;
    // Metrics refresh every second; the old leader's view is fresh again once it is a voter.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.partition_leaders(4).await[0] != Some(to) {
        if Instant::now() > deadline {
            bail!(
                "partition 0 is led by {:?}, not {to}",
                cluster.partition_leaders(4).await[0]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("partition 0 leadership {p0} → {to}, voters restored");
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
