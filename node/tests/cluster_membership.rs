//! Membership through the control plane: add a 4th node with `meridian cluster add` (sent to a
//! follower, forwarded to the leader), it catches up and serves reads; then remove node 1 and kill
//! it, and the cluster keeps taking writes.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::start_cluster;
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
    let mut cluster = start_cluster(3, &[])?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let base = cluster.client(1).await?;
    let mut n1 = base.connect().await?;
    assert_eq!(
        n1.json("PUT", "/devices/m-1", Some(&json!({"deviceId": "m-1"})))
            .await?
            .status,
        200
    );

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
            "MERIDIAN_CONNECTION_STRING",
            &creds.service_connection_string,
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
    let listing = n1
        .json("GET", "/meridian/cluster/nodes", None)
        .await?
        .json();
    assert_eq!(voters(&listing), BTreeSet::from([1, 2, 3, 4]), "{listing}");

    // Remove node 1 (through node 3), then stop it: writes go on.
    let mut n3 = base.with_addr(cluster.node(3).https).connect().await?;
    let r = n3.json("DELETE", "/meridian/cluster/nodes/1", None).await?;
    assert_eq!(r.status, 204, "{:?}", r.json());
    cluster.node(1).kill9();
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
    let listing = n2
        .json("GET", "/meridian/cluster/nodes", None)
        .await?
        .json();
    assert_eq!(voters(&listing), BTreeSet::from([2, 3, 4]), "{listing}");
    let r = n2.json("DELETE", "/meridian/cluster/nodes/9", None).await?;
    assert_eq!(r.status, 400, "removing a non-voter is refused");
    Ok(())
}
