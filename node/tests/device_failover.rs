//! The official Python device SDK loses the node holding its connection (kill -9), reconnects to
//! another node without re-subscribing, gets the C2D message queued meanwhile, and answers a
//! direct method sent through a third node.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{run_sdk_script, sdk_cache, start_cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_device_resumes_its_session_on_another_node_after_kill9() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    // The service talks to the leader; the device starts on a follower that will die, then moves
    // to the other follower, so a quorum survives.
    let followers: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != leader)
        .collect();
    let (a, b) = (followers[0], followers[1]);
    let service_port = cluster.node(leader).https.port();
    let connection_string = common::with_host(
        &creds.service_connection_string,
        &format!("localhost:{service_port}"),
    );
    let out = run_sdk_script(
        &sdk_cache().join("venv/bin/python"),
        "device_failover.py",
        &[
            ("MERIDIAN_CONNECTION_STRING", connection_string),
            ("MERIDIAN_CA_CERT", cluster.ca.display().to_string()),
            ("MERIDIAN_MQTT_A", cluster.node(a).mqtt.port().to_string()),
            ("MERIDIAN_MQTT_B", cluster.node(b).mqtt.port().to_string()),
            ("MERIDIAN_HTTPS_PORT", service_port.to_string()),
            (
                "MERIDIAN_KILL_PID",
                cluster.node(a).pid().context("node A pid")?.to_string(),
            ),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    assert!(out.contains("PASS device_failover.py"), "{out}");
    Ok(())
}
