//! Network partition with 3 nodes in network namespaces, under telemetry load from 60 devices: the
//! hub leader is cut off from the other two. The minority side (the old leader) neither commits a
//! registry write nor PUBACKs telemetry; the majority elects new leaders and keeps taking both.
//! After healing, every replica holds the same history: the majority's writes everywhere, the
//! minority's refused write nowhere, every PUBACKed message once, in order.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::load::{Acked, check_acked, progress, read_all, run_device, wait_converged};
use common::netns::Netns;
use common::{create_device, start_netns_cluster};
use meridian::client::device::{ConnAckCode, RawMqtt, device_token};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_refuses_writes_and_history_converges_after_healing() -> Result<()> {
    let net = Netns::create(3)?;
    let mut cluster = start_netns_cluster(&net, 3, &[])?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let base = cluster
        .client(leader)
        .await?
        .with_timeout(Duration::from_secs(15));
    let mut svc = base.connect().await?;
    let mut keys = Vec::new();
    for i in 0..60 {
        let id = format!("np-{i}");
        keys.push((id.clone(), create_device(&mut svc, &id).await?));
    }
    let probe_key = create_device(&mut svc, "np-probe").await?;
    let mqtt: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut devices = Vec::new();
    for (id, key) in keys {
        devices.push(tokio::spawn(run_device(
            id,
            key,
            mqtt.clone(),
            cluster.ca.clone(),
            acked.clone(),
            stop.clone(),
        )));
    }
    progress(&acked, 1000, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    // A device on the leader, connected before the partition.
    let token = device_token("localhost", "np-probe", &probe_key, 600)?;
    let (mut probe, code, _) = RawMqtt::connect(
        cluster.node(leader).mqtt,
        &cluster.ca,
        "np-probe",
        &token,
        true,
        120,
    )
    .await?;
    assert_eq!(code, ConnAckCode::Success);

    net.isolate(leader)?;
    let partitioned = Instant::now();
    println!("isolated node {leader} (hub leader)");

    // Minority: a registry write is not committed, a telemetry message is not PUBACKed.
    let minority_write = base.connect().await?;
    let minority = tokio::spawn(async move {
        let mut c = minority_write;
        c.json(
            "PUT",
            "/devices/np-minority",
            Some(&json!({"deviceId": "np-minority"})),
        )
        .await
        .map(|r| r.status)
    });
    let probe_task = tokio::spawn(async move {
        probe
            .publish_acked(
                "devices/np-probe/messages/events/%24.mid=np-probe-1&seq=1",
                b"1",
                7,
                Duration::from_secs(15),
            )
            .await
            .unwrap_or(false)
    });

    // Majority: writes go on (after it elects new leaders).
    let majority_node = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .map(|n| (n.id, n.https))
        .context("majority node")?;
    let majority = base.with_addr(majority_node.1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = majority.connect().await
            && let Ok(r) = c
                .json(
                    "PUT",
                    "/devices/np-majority",
                    Some(&json!({"deviceId": "np-majority"})),
                )
                .await
            && r.status == 200
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the majority took no registry write:\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let majority_write = partitioned.elapsed();
    let acked_before = common::load::total(&acked);
    progress(&acked, 500, Duration::from_secs(30))
        .await
        .with_context(|| cluster.logs())?;
    assert!(!probe_task.await?, "the minority PUBACKed a message");
    let status = minority.await?;
    assert!(
        !matches!(status, Ok(200)),
        "the minority answered a registry write with 200"
    );
    println!(
        "majority registry write {majority_write:?} after the cut; minority write: {status:?}; \
         {acked_before} acked before, telemetry kept flowing"
    );

    net.rejoin(leader)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.await??;
    }
    let acked: BTreeMap<String, Vec<u64>> = acked.lock().map(|a| a.clone()).unwrap_or_default();

    // One history: the same telemetry on every replica, every PUBACKed message in it, and the
    // registry holds the majority's write and not the minority's.
    let grpcs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.grpc).collect();
    wait_converged(&grpcs, Duration::from_secs(60))
        .await
        .with_context(|| cluster.logs())?;
    let mut stored = Vec::new();
    for g in &grpcs {
        stored.push(read_all(*g).await?);
    }
    assert!(stored.iter().all(|s| *s == stored[0]), "replicas diverge");
    let (count, duplicates) = check_acked(&acked, &stored[0])?;
    assert!(
        !stored[0].iter().any(|r| r.2 == "np-probe"),
        "the minority's unacknowledged message must not survive"
    );
    for n in &cluster.nodes {
        let mut c = base.with_addr(n.https).connect().await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let present = c.json("GET", "/devices/np-majority", None).await?.status;
            if present == 200 {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} lacks the majority's write ({present})", n.id);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let absent = c.json("GET", "/devices/np-minority", None).await?.status;
        assert_eq!(absent, 404, "node {} has the minority's write", n.id);
    }
    println!(
        "acked {}, stored {count} on each node, duplicates {duplicates}, lost 0",
        acked.values().map(Vec::len).sum::<usize>()
    );
    drop(cluster);
    drop(net);
    Ok(())
}
