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

/// The short regions scenario: geo-paired east and west (2 nodes each) and a witness, each node
/// in its own network namespace, 40 ms between regions; planned failover and failback lose
/// nothing, the primary region's loss and its isolation fail over automatically, the old primary
/// comes back as a follower, and two regions never take writes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_fail_over_and_back_without_two_primaries() -> Result<()> {
    use meridian_chaos::regions::{RegionsOptions, regions};
    let dir = tempfile::tempdir()?;
    let mut opts = RegionsOptions::new(meridian_bin()?, false, 2);
    opts.devices = 40;
    opts.sdk_devices = 3;
    opts.registered = 200;
    let report = regions(&opts, dir.path()).await?;
    println!("{}", report.markdown());
    assert!(report.passed, "{:?}", report.failures);
    assert_eq!(report.steps.len(), 9, "every step ran");
    for step in &report.steps[..2] {
        let lost: usize = step.loss.values().map(|l| l.lost).sum();
        assert_eq!(lost, 0, "{}: planned failovers lose nothing", step.step);
    }
    assert!(report.partition_samples > 10);
    assert_eq!(report.two_primaries_samples, 0);
    Ok(())
}
