//! 3-node cluster: kill -9 the leader while clients write devices through every node. Every write
//! that got a 2xx must be readable from the survivors after re-election, and the restarted node
//! must catch up (here by snapshot: logs are purged aggressively so the log alone cannot do it).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::start_cluster;
use meridian::client::ServiceClient;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_loses_no_acknowledged_write() -> Result<()> {
    let mut cluster = start_cluster(
        3,
        &[
            ("MERIDIAN_CLUSTER__SNAPSHOT_EVERY_LOGS", "40"),
            // Every 40 entries however many devices: the restarted leader must be behind one.
            ("MERIDIAN_CLUSTER__HUB_SNAPSHOT_LOGS_PER_ITEM", "0"),
            ("MERIDIAN_CLUSTER__MAX_IN_SNAPSHOT_LOG_TO_KEEP", "0"),
        ],
    )?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let base = cluster.client(1).await?;
    let clients: Vec<ServiceClient> = cluster
        .nodes
        .iter()
        .map(|n| {
            base.with_addr(n.https)
                .with_timeout(Duration::from_secs(15))
        })
        .collect();

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let first_ack_after_kill: Arc<Mutex<Option<Instant>>> = Arc::default();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6usize {
        let clients = clients.clone();
        let (acked, first, killed, stop) = (
            acked.clone(),
            first_ack_after_kill.clone(),
            killed_at.clone(),
            stop.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // Each writer rotates over the nodes, so some requests hit followers (forwarding)
                // and, after the kill, the dead node (errors that must not count as acks).
                let client = &clients[(w + i as usize) % clients.len()];
                let id = format!("w{w}-{i}");
                let reply = match client.connect().await {
                    Ok(mut c) => {
                        c.json(
                            "PUT",
                            &format!("/devices/{id}"),
                            Some(&json!({"deviceId": id})),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(r) if r.status == 200 => {
                        acked.lock().map(|mut a| a.insert(id)).ok();
                        if let (Ok(k), Ok(mut f)) = (killed.lock(), first.lock())
                            && k.is_some()
                            && f.is_none()
                        {
                            *f = Some(Instant::now());
                        }
                    }
                    _ => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            errors
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_before_kill = acked.lock().map(|a| a.len()).unwrap_or(0);
    if acked_before_kill == 0 {
        bail!("no writes succeeded before the kill:\n{}", cluster.logs());
    }
    cluster.node(leader).kill9();
    *killed_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(Instant::now());
    let kill_time = Instant::now();
    // Keep writing until enough happened after the failover for snapshots to purge old logs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = acked.lock().map(|a| a.len()).unwrap_or(0) - acked_before_kill;
        if after >= 200 || Instant::now() > deadline {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut errors = 0;
    for w in writers {
        errors += w.await?;
    }
    let acked: BTreeSet<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let recovery = first_ack_after_kill
        .lock()
        .ok()
        .and_then(|f| *f)
        .map(|t| t.duration_since(kill_time));
    println!(
        "acked {} writes ({} before the kill), {} failed requests, first ack after kill: {:?}",
        acked.len(),
        acked_before_kill,
        errors,
        recovery
    );
    if recovery.is_none() {
        bail!(
            "no write succeeded after killing the leader:\n{}",
            cluster.logs()
        );
    }
    if acked.len() < acked_before_kill + 100 {
        bail!(
            "too few writes after failover ({}):\n{}",
            acked.len(),
            cluster.logs()
        );
    }

    // Every acknowledged device is readable from every survivor.
    let survivors: Vec<ServiceClient> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != leader)
        .map(|n| base.with_addr(n.https))
        .collect();
    for client in &survivors {
        let mut conn = client.connect().await?;
        let listed = conn.json("GET", "/devices?top=1000", None).await?;
        assert_eq!(listed.status, 200);
        let ids: BTreeSet<String> = listed
            .json()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["deviceId"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if acked.len() <= 1000 {
            let missing: Vec<&String> = acked.difference(&ids).collect();
            assert!(missing.is_empty(), "{} lost: {missing:?}", client.addr());
        }
        for id in acked.iter().step_by(7) {
            let r = conn.json("GET", &format!("/devices/{id}"), None).await?;
            assert_eq!(r.status, 200, "{id} via {}", client.addr());
        }
    }

    // The old leader restarts and catches up by snapshot.
    cluster.restart(leader)?;
    let restarted = base.with_addr(cluster.node(leader).https);
    let expected = cluster
        .nodes
        .iter()
        .find(|n| n.id != leader)
        .map(|n| n.metrics)
        .ok_or_else(|| anyhow::anyhow!("no survivor"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mine = cluster
            .node(leader)
            .metric("meridian_registry_devices")
            .await;
        let theirs = cluster
            .nodes
            .iter()
            .find(|n| n.metrics == expected)
            .map(|n| n.metric("meridian_registry_devices"));
        let theirs = match theirs {
            Some(f) => f.await,
            None => None,
        };
        if mine.is_some() && mine == theirs {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "restarted node did not catch up ({mine:?} vs {theirs:?}):\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut conn = restarted.connect().await?;
    for id in acked.iter().rev().take(20) {
        let r = conn.json("GET", &format!("/devices/{id}"), None).await?;
        assert_eq!(r.status, 200, "{id} via restarted node");
    }
    let log = cluster.node(leader).log_tail(10_000);
    assert!(
        log.contains("installed snapshot from leader"),
        "expected catch-up by snapshot; log:\n{}",
        cluster.node(leader).log_tail(40)
    );
    Ok(())
}
