//! Replicated telemetry partitions on 3 real nodes: 200 devices stream telemetry through every
//! node while one node is killed with SIGKILL, restarted, and then another. Every PUBACKed message
//! must be readable afterwards on every replica, each device's messages in send order, duplicates
//! only as resends with the same message id, and all replicas must hold identical partitions.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use common::load::{
    Devices, all_partitions_advance, check_acked, check_replicas, end_offsets, progress, read_all,
    total,
};
use common::{create_device, start_cluster};

const DEVICES: usize = 200;

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
    let tasks = Devices::start(keys, nodes.clone(), cluster.ca.clone());
    let acked = tasks.acked.clone();
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
    let acked = tasks.stop().await?;
    let total_acked: usize = acked.values().map(Vec::len).sum();

    // Replicas converge: the same end offsets everywhere, then the same records.
    let grpcs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    let (stored_total, duplicates) = check_replicas(&acked, &grpcs)
        .await
        .with_context(|| cluster.logs())?;
    println!(
        "acked {total_acked}, stored {stored_total}, duplicates {duplicates}, lost 0; \
         recovery (victim, acked before the kill, kill → every partition appended again): {recovery:?}"
    );
    Ok(())
}

/// With one replica per partition, each node holds only some partitions: devices on every node
/// still get PUBACKs (appends are forwarded to the partition's only replica) and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_replica_partitions_take_appends_from_every_node() -> Result<()> {
    let mut cluster = start_cluster(3, &[("MERIDIAN_CLUSTER__REPLICATION_FACTOR", "1")])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let mut keys = Vec::new();
    for i in 0..30 {
        let id = format!("rf1-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let tasks = Devices::start(keys, nodes.clone(), cluster.ca.clone());
    let acked = tasks.acked.clone();
    progress(&acked, 1500, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    let acked = tasks.stop().await?;
    assert_eq!(acked.len(), 30, "every device got PUBACKs");
    // Each partition lives on exactly one node: the union of the nodes' logs is the whole stream.
    let leaders = cluster.partition_leaders(4).await;
    assert!(leaders.iter().all(Option::is_some), "{leaders:?}");
    let mut all = Vec::new();
    for (p, leader) in leaders.iter().enumerate() {
        let grpc = cluster.node(leader.unwrap_or(1)).grpc;
        all.extend(
            read_all(grpc)
                .await?
                .into_iter()
                .filter(|r| r.0 == p as u32),
        );
    }
    let (stored, duplicates) = check_acked(&acked, &all)?;
    println!("RF=1: stored {stored}, duplicates {duplicates}, lost 0");
    Ok(())
}

/// Wall clocks minutes apart (one node ahead, one behind): appends forwarded to a partition's
/// only replica carry their expiry in the receiver's time (offset measured on earlier answers),
/// so none is refused as expired and every device gets PUBACKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_wall_clocks_do_not_stop_forwarded_appends() -> Result<()> {
    let mut cluster = start_cluster(3, &[("MERIDIAN_CLUSTER__REPLICATION_FACTOR", "1")])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    for (node, skew_ms) in [(1u64, 600_000i64), (2, -600_000)] {
        let mut op = cluster.operator(node).await?.connect().await?;
        let r = op
            .json(
                "PUT",
                "/meridian/cluster/faults",
                Some(&serde_json::json!({"clockSkewMs": skew_ms})),
            )
            .await?;
        anyhow::ensure!(r.status == 204, "set skew: {} {}", r.status, r.json());
    }
    let client = cluster.client(3).await?;
    let mut svc = client.connect().await?;
    let mut keys = Vec::new();
    for i in 0..30 {
        let id = format!("skew-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let nodes: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let tasks = Devices::start(keys, nodes.clone(), cluster.ca.clone());
    let acked = tasks.acked.clone();
    progress(&acked, 1500, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    let acked = tasks.stop().await?;
    anyhow::ensure!(
        acked.len() == 30,
        "only {} of 30 devices got PUBACKs\n{}",
        acked.len(),
        cluster.logs()
    );
    Ok(())
}

/// A node cut off from a partition's leader but not from the partition's other replicas (two
/// regions cut apart while a third reaches both) still gets its devices' messages stored: after
/// one unanswered try, its appends go through another replica, which submits them to the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_reach_a_leader_cut_off_from_this_node_through_another_replica() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    let hub_leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    // Partition 0 led by a node other than the hub leader (devices connecting to the cut-off node
    // need the hub leader for their connection); the third node is the one cut off.
    let leader = (1..=3u64).find(|n| *n != hub_leader).unwrap_or(1);
    let cut_off = (1..=3u64)
        .find(|n| *n != hub_leader && *n != leader)
        .unwrap_or(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = cluster.partition_leaders(4).await[0];
        if now == Some(leader) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "partition 0 is led by {now:?}, not {leader}"
        );
        if now.is_some() {
            let mut op = cluster.operator(hub_leader).await?.connect().await?;
            let r = op
                .json(
                    "POST",
                    "/meridian/cluster/leader",
                    Some(&serde_json::json!({"partition": 0, "to": leader})),
                )
                .await?;
            println!("partition 0: {now:?} → {leader}: {}", r.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let client = cluster.client(cut_off).await?;
    let mut svc = client.connect().await?;
    let mut keys = Vec::new();
    for i in 0..30 {
        let id = format!("relay-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let in_partition_0 = keys
        .iter()
        .filter(|(id, _)| meridian::domain::telemetry::partition_for(id, 4) == 0)
        .count();
    anyhow::ensure!(in_partition_0 > 0, "no device in partition 0");
    let leader_grpc = cluster.node(leader).grpc.to_string();
    let mut op = cluster.operator(cut_off).await?.connect().await?;
    let r = op
        .json(
            "PUT",
            "/meridian/cluster/faults",
            Some(&serde_json::json!({"blockedPeers": [leader_grpc]})),
        )
        .await?;
    anyhow::ensure!(r.status == 204, "block: {} {}", r.status, r.json());
    // Every device connects to the cut-off node only.
    let tasks = Devices::start(keys, vec![cluster.node(cut_off).mqtt], cluster.ca.clone());
    let acked = tasks.acked.clone();
    progress(&acked, 600, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    let acked = tasks.stop().await?;
    let in_partition_0_acked = acked
        .iter()
        .filter(|(id, seqs)| {
            meridian::domain::telemetry::partition_for(id, 4) == 0 && !seqs.is_empty()
        })
        .count();
    println!(
        "node {cut_off} cut off from partition 0's leader {leader}: {} devices acknowledged, {in_partition_0_acked} of {in_partition_0} in partition 0",
        acked.len()
    );
    anyhow::ensure!(
        acked.len() == 30 && in_partition_0_acked == in_partition_0,
        "only {} of 30 devices got PUBACKs ({in_partition_0_acked} of {in_partition_0} in partition 0)\n{}",
        acked.len(),
        cluster.logs()
    );
    Ok(())
}
