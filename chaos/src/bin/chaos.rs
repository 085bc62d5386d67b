//! `chaos`: runs a chaos scenario against real `meridian` nodes and writes a JSON and Markdown
//! report. The scenario and its checks: `meridian_chaos::scenario`.
//!
//! `cargo run --release -p meridian-chaos --bin chaos -- --out docs/chaos`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use meridian_chaos::cluster::ClusterOptions;
use meridian_chaos::regions::{RegionsOptions, regions};
use meridian_chaos::scenario::{NemesesOptions, cluster_nemeses};

#[derive(Parser, Debug)]
#[command(about = "Chaos scenarios against a Meridian cluster, with a report")]
struct Args {
    /// The meridian binary.
    #[arg(long, default_value = "target/release/meridian")]
    meridian_bin: PathBuf,
    /// Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Telemetry devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Devices run by the official Python SDK (venv from node/tests/sdk/setup.sh; 0: none).
    #[arg(long, default_value_t = 10)]
    sdk_devices: usize,
    /// Run on loopback only (no network namespaces, so no partition nemesis; no root needed).
    #[arg(long)]
    loopback: bool,
    /// Seconds a paused node stays paused.
    #[arg(long, default_value_t = 5)]
    pause_secs: u64,
    /// Keep the nodes' data and logs (the work directory) even when the run passes.
    #[arg(long)]
    keep: bool,
    /// Directory for the report (`<scenario>.json`, `<scenario>.md`).
    #[arg(long, default_value = "chaos-report")]
    out: PathBuf,
    /// Run the regions scenario instead: `async` (geo-paired regions with a witness) or `sync`
    /// (one cluster over three regions).
    #[arg(long)]
    regions: Option<String>,
    /// Regions scenario: nodes per data region.
    #[arg(long, default_value_t = 2)]
    nodes_per_region: usize,
    /// Regions scenario: devices registered besides the connected ones.
    #[arg(long, default_value_t = 1000)]
    registered: usize,
    /// Regions scenario: WAN delay between regions, ms (one way).
    #[arg(long, default_value_t = 40)]
    wan_delay_ms: u64,
    /// Regions scenario: each Rust device sends one message per this many ms (0: as fast as
    /// acknowledged).
    #[arg(long, default_value_t = 0)]
    send_interval_ms: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    println!("work dir: {}", dir.path().display());
    if let Some(mode) = &args.regions {
        anyhow::ensure!(
            mode == "async" || mode == "sync",
            "--regions is async or sync"
        );
        let mut opts = RegionsOptions::new(
            args.meridian_bin.clone(),
            mode == "sync",
            args.nodes_per_region,
        );
        opts.devices = args.devices;
        opts.sdk_devices = args.sdk_devices;
        opts.registered = args.registered;
        opts.wan_delay = Duration::from_millis(args.wan_delay_ms);
        opts.send_interval = Duration::from_millis(args.send_interval_ms);
        if let Some(layout) = opts.cluster.regions.as_mut() {
            layout.wan_delay = opts.wan_delay;
        }
        let report = match regions(&opts, dir.path()).await {
            Ok(r) => r,
            Err(e) => {
                let kept = dir.keep();
                anyhow::bail!("regions run failed: {e:#}; logs kept in {}", kept.display());
            }
        };
        report.write(&args.out)?;
        println!("\n{}", report.markdown());
        if !report.passed {
            let kept = dir.keep();
            anyhow::bail!(
                "regions run failed: {:?}; logs kept in {}",
                report.failures,
                kept.display()
            );
        }
        if args.keep {
            println!("work dir kept: {}", dir.keep().display());
        }
        return Ok(());
    }
    let mut cluster = ClusterOptions::new(args.meridian_bin.clone());
    cluster.nodes = args.nodes;
    cluster.netns = !args.loopback;
    let report = cluster_nemeses(
        &NemesesOptions {
            cluster,
            devices: args.devices,
            sdk_devices: args.sdk_devices,
            warmup_messages: 2000,
            pause: Duration::from_secs(args.pause_secs),
        },
        dir.path(),
    )
    .await?;
    report.write(&args.out)?;
    println!("\n{}", report.markdown());
    println!(
        "report: {}/{}.{{json,md}}",
        args.out.display(),
        report.scenario
    );
    if args.keep && report.passed {
        println!("work dir kept: {}", dir.keep().display());
        return Ok(());
    }
    if !report.passed {
        // Keep the nodes' logs and data for the post-mortem.
        let kept = dir.keep();
        anyhow::bail!(
            "chaos run failed: {:?}; logs kept in {}",
            report.failures,
            kept.display()
        );
    }
    Ok(())
}
