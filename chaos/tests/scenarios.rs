//! The short chaos scenario that CI runs: 3 nodes in network namespaces, 200 devices publishing
//! and a registry writer, then kill -9 twice, SIGSTOP, +100 ms latency and a partition of the hub
//! leader; the report must show no lost acknowledged message or create, order kept, replicas
//! identical, and a minority that neither PUBACKed nor committed anything.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use meridian_chaos::cluster::ClusterOptions;
use meridian_chaos::scenario::{NemesesOptions, cluster_nemeses};

/// The `meridian` binary of this build (`cargo build --workspace` puts it next to the tests).
fn meridian_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("target dir")?;
    let bin = dir.join("meridian");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: run cargo build --workspace first",
        bin.display()
    );
    Ok(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_pause_and_partition_lose_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = ClusterOptions::new(meridian_bin()?);
    cluster.netns = true;
    let report = cluster_nemeses(
        &NemesesOptions {
            cluster,
            devices: 200,
            sdk_devices: 10,
            warmup_messages: 2000,
            pause: Duration::from_secs(4),
        },
        dir.path(),
    )
    .await?;
    println!("{}", report.markdown());
    assert!(report.passed, "{:?}", report.failures);
    assert_eq!(report.nemeses.len(), 5);
    assert!(report.telemetry.acked > 5000, "{}", report.telemetry.acked);
    assert!(report.registry.acked > 10, "{}", report.registry.acked);
    Ok(())
}
