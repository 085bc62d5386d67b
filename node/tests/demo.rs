//! `meridian demo --nodes 3`: one command starts a 3-node cluster, writes cluster.json with every
//! node's addresses and connection string, serves requests on every node, and stops cleanly on
//! SIGTERM.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meridian::client::ServiceClient;
use serde_json::{Value, json};

/// A base port with `n` consecutive free ports after it.
fn free_run(n: u16) -> Result<u16> {
    for attempt in 0..200u16 {
        let base = 21000 + attempt * 37;
        let held: std::io::Result<Vec<TcpListener>> = (0..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if held.is_ok() {
            return Ok(base);
        }
    }
    bail!("no run of {n} free ports")
}

/// Waits (up to 60 s) for the demo to write `cluster.json`; kills it if it never does.
async fn wait_cluster_json(
    dir: &std::path::Path,
    child: &mut std::process::Child,
) -> Result<Value> {
    let path = dir.join("cluster.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(v) = serde_json::from_slice(&bytes)
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("no cluster.json");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_a_three_node_cluster_and_stops_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = free_run(12)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "demo",
            "--nodes",
            "3",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("MERIDIAN_OBSERVABILITY__LOG_FILTER", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let cluster = wait_cluster_json(dir.path(), &mut child).await?;
    let nodes = cluster["nodes"].as_array().context("nodes")?.clone();
    assert_eq!(nodes.len(), 3);
    let ca = std::path::PathBuf::from(cluster["ca_cert"].as_str().context("ca")?);
    let clients: Vec<ServiceClient> = nodes
        .iter()
        .map(|n| {
            ServiceClient::new(
                n["service_connection_string"].as_str().unwrap_or_default(),
                n["https"].as_str().unwrap_or_default().parse()?,
                &ca,
            )
            .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let mut first = clients[0].connect().await?;
    let r = first
        .json(
            "PUT",
            "/devices/demo-1",
            Some(&json!({"deviceId": "demo-1"})),
        )
        .await?;
    assert_eq!(r.status, 200);
    for client in &clients {
        let r = client
            .connect()
            .await?
            .json("GET", "/devices/demo-1", None)
            .await?;
        assert_eq!(r.status, 200, "via {}", client.addr());
    }
    // SIGTERM stops every node and the process exits on its own.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("demo did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_two_regions_fails_over_to_the_secondary() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = free_run(12)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "demo",
            "--regions",
            "2",
            "--nodes-per-region",
            "1",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("MERIDIAN_OBSERVABILITY__LOG_FILTER", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let cluster = wait_cluster_json(dir.path(), &mut child).await?;
    let result = async {
        let nodes = cluster["nodes"].as_array().context("nodes")?.clone();
        let regions: Vec<&str> = nodes.iter().filter_map(|n| n["region"].as_str()).collect();
        assert_eq!(regions, vec!["east", "west", "witness"]);
        assert_eq!(cluster["primary_region"], "east");
        let ca = std::path::PathBuf::from(cluster["ca_cert"].as_str().context("ca")?);
        let operator = cluster["operator_connection_string"]
            .as_str()
            .context("operator")?;
        let west = nodes[1]["https"].as_str().context("west")?.to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["cluster", "--address", &west])
            .args(["failover", "--to", "west", "--hub-name", "meridian"])
            .env("MERIDIAN_OPERATOR_CONNECTION_STRING", operator)
            .env("MERIDIAN_CA_CERT", &ca)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "failover: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("epoch 2"), "{text}");
        let west_client = ServiceClient::new(
            nodes[1]["service_connection_string"]
                .as_str()
                .unwrap_or_default(),
            west.parse()?,
            &ca,
        )?;
        let r = west_client
            .connect()
            .await?
            .json("PUT", "/devices/after", Some(&json!({"deviceId": "after"})))
            .await?;
        assert_eq!(r.status, 200);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("demo did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result
}
