//! Membership through the control plane, under telemetry load: add a 4th node with `meridian
//! cluster add` (sent to a follower, forwarded to the leader), it catches up, serves reads and
//! takes over partition replicas; then remove node 1 and kill it: partitions move off it, the
//! cluster keeps taking writes, and no acknowledged message is lost.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::load::{Devices, check_replicas, progress};
use common::{create_device, start_cluster, wait_partition_voters as wait_replicas};
use serde_json::{Value, json};

fn voters(listing: &Value) -> BTreeSet<u64> {
    listing["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["role"] == json!("voter"))
                .filter_map(|n| n["id"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_node_then_remove_the_first() -> Result<()> {
    // Small snapshots, so the new node gets partitions through snapshot + record fetch.
    let mut cluster = start_cluster(
        3,
        &[
            ("MERIDIAN_CLUSTER__SNAPSHOT_EVERY_LOGS", "10"),
            ("MERIDIAN_CLUSTER__MAX_IN_SNAPSHOT_LOG_TO_KEEP", "2"),
        ],
    )?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let base = cluster.client(1).await?;
    let op = cluster.operator(1).await?;
    let mut n1 = base.connect().await?;
    assert_eq!(
        n1.json("PUT", "/devices/m-1", Some(&json!({"deviceId": "m-1"})))
            .await?
            .status,
        200
    );

    // Telemetry load from 30 devices through nodes 1-3 for the whole test.
    let mut keys = Vec::new();
    for i in 0..30 {
        let id = format!("mt-{i}");
        keys.push((id.clone(), create_device(&mut n1, &id).await?));
    }
    let mqtt: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let devices = Devices::start(keys, mqtt.clone(), cluster.ca.clone());
    let acked = devices.acked.clone();
    progress(&acked, 1500, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;

    cluster.spawn_extra_node(4)?;
    let grpc4 = cluster.node(4).grpc.to_string();
    let follower = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader && n.id <= 3)
        .map(|n| n.https)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["cluster", "--address", &follower.to_string()])
        .args(["add", "--id", "4", "--grpc-addr", &grpc4])
        .env(
            "MERIDIAN_OPERATOR_CONNECTION_STRING",
            &creds.operator_connection_string,
        )
        .env("MERIDIAN_CA_CERT", &cluster.ca)
        .output()?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );

    // Node 4 serves linearizable reads of data written before it joined.
    let n4 = base.with_addr(cluster.node(4).https);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = n4.connect().await
            && let Ok(r) = c.json("GET", "/devices/m-1", None).await
            && r.status == 200
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("node 4 never served the device:\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The control plane takes only the operator credential, not even iothubowner.
    let refused = n1.json("GET", "/meridian/cluster/nodes", None).await?;
    assert_eq!(refused.status, 401, "{:?}", refused.json());
    let mut op1 = op.connect().await?;
    let listing = op1
        .json("GET", "/meridian/cluster/nodes", None)
        .await?
        .json();
    assert_eq!(voters(&listing), BTreeSet::from([1, 2, 3, 4]), "{listing}");
    // Partitions rebalance onto node 4: 3 replicas each, node 4 among some of them.
    let placed = wait_replicas(
        &cluster,
        &op,
        |r| r.iter().all(|s| s.len() == 3) && r.iter().any(|s| s.contains(&4)),
        Duration::from_secs(60),
    )
    .await?;
    println!("partition replicas with 4 nodes: {placed:?}");
    // Node 4 joined behind purged logs: it installs snapshots and fetches their records.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster
        .node(4)
        .log_tail(100_000)
        .contains("installed partition snapshot")
    {
        if Instant::now() > deadline {
            bail!(
                "node 4 did not install a partition snapshot:\n{}",
                cluster.node(4).log_tail(50)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress(&acked, 500, Duration::from_secs(30))
        .await
        .with_context(|| cluster.logs())?;

    // Remove node 1 (through node 3), then stop it: writes go on.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["cluster", "--address", &cluster.node(3).https.to_string()])
        .args(["remove", "--id", "1"])
        .env(
            "MERIDIAN_OPERATOR_CONNECTION_STRING",
            &creds.operator_connection_string,
        )
        .env("MERIDIAN_CA_CERT", &cluster.ca)
        .output()?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let placed = wait_replicas(
        &cluster,
        &op,
        |r| r.iter().all(|s| *s == BTreeSet::from([2, 3, 4])),
        Duration::from_secs(60),
    )
    .await?;
    println!("partition replicas after removing node 1: {placed:?}");
    cluster.node(1).kill9();
    progress(&acked, 500, Duration::from_secs(30))
        .await
        .with_context(|| cluster.logs())?;
    let acked = devices.stop().await?;
    let grpcs: Vec<SocketAddr> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != 1)
        .map(|n| n.grpc)
        .collect();
    let (count, duplicates) = check_replicas(&acked, &grpcs)
        .await
        .with_context(|| cluster.logs())?;
    println!(
        "acked {}, stored {count} on each of nodes 2-4, duplicates {duplicates}, lost 0",
        acked.values().map(Vec::len).sum::<usize>()
    );
    let mut n4c = n4.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = n4c
            .json("PUT", "/devices/m-2", Some(&json!({"deviceId": "m-2"})))
            .await?;
        if r.status == 200 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no write after removing node 1: {} {:?}\n{}",
                r.status,
                r.json(),
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut n2 = base.with_addr(cluster.node(2).https).connect().await?;
    assert_eq!(n2.json("GET", "/devices/m-2", None).await?.status, 200);
    let mut op2 = op.with_addr(cluster.node(2).https).connect().await?;
    let listing = op2
        .json("GET", "/meridian/cluster/nodes", None)
        .await?
        .json();
    assert_eq!(voters(&listing), BTreeSet::from([2, 3, 4]), "{listing}");
    let r = op2
        .json("DELETE", "/meridian/cluster/nodes/9", None)
        .await?;
    assert_eq!(r.status, 400, "removing a non-voter is refused");
    Ok(())
}
