//! AMQP benchmark: Event Hub-compatible read throughput with the official Python consumer
//! (`azure-eventhub`) against Meridian's own gRPC read API (`TelemetryRead`) on the same data, one
//! partition and all; C2D sends/s through AMQP with the official Python service SDK.
//!
//! `cargo run --release -p meridian-chaos --bin amqp-bench -- --help` (needs port 5671 free: the
//! Python C2D client dials no other, and the SDKs from `node/tests/sdk/setup.sh`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meridian::client::ServiceClient;
use meridian_chaos::proc::{Proc, free_ports};
use meridian_chaos::workload::{TelemetryLoad, create_many, progress};
use meridian_proto::telemetry::ReadPartitionRequest;
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use serde_json::Value;

#[derive(Debug, Parser)]
struct Args {
    /// The meridian binary.
    #[arg(long, default_value = "target/release/meridian")]
    meridian_bin: PathBuf,
    /// Telemetry events to load (and read back).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Devices sending them over MQTT/TLS (also the C2D targets).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// C2D messages to send (at most 49 per device: the queue holds 50).
    #[arg(long, default_value_t = 2000)]
    c2d: usize,
    /// Python with the official SDKs.
    #[arg(long)]
    python: Option<PathBuf>,
}

/// Reads partition `p` from offset 0 until `want` records arrived; returns the seconds taken.
async fn grpc_read(grpc: SocketAddr, p: u32, want: usize) -> Result<f64> {
    let channel = meridian::raft::network::channel(&grpc.to_string())?;
    let mut client = TelemetryReadClient::new(channel);
    let start = Instant::now();
    let (mut got, mut offset) = (0usize, 0u64);
    while got < want {
        let mut stream = client
            .read_partition(ReadPartitionRequest {
                partition: p,
                from_offset: offset,
                max_records: 10_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let before = got;
        while let Some(r) = stream.message().await? {
            got += 1;
            offset = r.offset + 1;
        }
        if got == before {
            bail!("partition {p}: {got} of {want} records");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.c2d > args.devices * 49 {
        bail!("--c2d {} exceeds 49 per device", args.c2d);
    }
    let dir = tempfile::tempdir()?;
    let p = free_ports(4)?;
    let data = dir.path().join("meridian");
    let _node = Proc::start(
        [
            args.meridian_bin.display().to_string(),
            "dev".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--https-port".into(),
            p[0].to_string(),
            "--grpc-port".into(),
            p[1].to_string(),
            "--metrics-port".into(),
            p[2].to_string(),
            "--mqtt-port".into(),
            p[3].to_string(),
            "--amqp-port".into(),
            "5671".into(),
        ]
        .to_vec(),
        dir.path().join("meridian.log"),
    )
    .context("spawn meridian")?;
    let creds_path = data.join("dev-credentials.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !creds_path.exists() {
        if Instant::now() > deadline {
            bail!("meridian did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let creds: Value = serde_json::from_slice(&std::fs::read(&creds_path)?)?;
    let ca = data.join("tls/ca.pem");
    let https = SocketAddr::from(([127, 0, 0, 1], p[0]));
    let service = ServiceClient::new(
        creds["service_connection_string"]
            .as_str()
            .unwrap_or_default(),
        https,
        &ca,
    )?;
    let ids: Vec<String> = (0..args.devices)
        .map(|i| format!("amqp-bench-{i}"))
        .collect();
    let devices = create_many(&service, &ids).await?;

    // Load: the devices send as fast as their PUBACKs come back.
    let load = TelemetryLoad::start(devices, vec![SocketAddr::from(([127, 0, 0, 1], p[3]))], &ca);
    let loaded = Instant::now();
    progress(&load.acked, args.events, Duration::from_secs(600)).await?;
    let acked = load.stop().await?;
    let sent: usize = acked.values().map(Vec::len).sum();
    eprintln!(
        "loaded {sent} events in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );

    // Meridian's own read API: per partition, from the start.
    let grpc = SocketAddr::from(([127, 0, 0, 1], p[1]));
    let partitions = 4u32;
    let mut expected = Vec::new();
    let mut grpc_all = 0.0;
    let mut grpc_p0 = 0.0;
    for part in 0..partitions {
        // Count what the partition holds, then time a full read of it.
        let mut client =
            TelemetryReadClient::new(meridian::raft::network::channel(&grpc.to_string())?);
        let info = client
            .partition_info(meridian_proto::telemetry::PartitionInfoRequest {})
            .await?
            .into_inner();
        let n = info.end_offsets.get(part as usize).copied().unwrap_or(0) as usize;
        expected.push(n);
        let secs = grpc_read(grpc, part, n).await?;
        if part == 0 {
            grpc_p0 = secs;
        }
        grpc_all += secs;
    }
    let all_events: usize = expected.iter().sum();

    // The official Python consumer and C2D sender on the same node and data.
    let python = args.python.clone().unwrap_or_else(|| {
        let cache = std::env::var("MERIDIAN_SDK_CACHE").map_or_else(
            |_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/meridian-sdk")
            },
            PathBuf::from,
        );
        cache.join("venv/bin/python")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/tests/sdk/bench_amqp.py");
    let c2d_devices: Vec<String> = ids.clone();
    let out = Command::new("timeout")
        .arg("900")
        .arg(&python)
        .arg(&script)
        .env("MERIDIAN_CREDENTIALS", &creds_path)
        .env("MERIDIAN_HTTPS_PORT", p[0].to_string())
        .env("MERIDIAN_EVENT_HUB", "localhost")
        .env("MERIDIAN_EXPECTED", serde_json::to_string(&expected)?)
        .env("MERIDIAN_C2D_DEVICES", serde_json::to_string(&c2d_devices)?)
        .env("MERIDIAN_C2D_MESSAGES", args.c2d.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(result) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        bail!(
            "bench_amqp.py failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let py: Value = serde_json::from_str(result)?;
    let rate = |v: &Value| v["events_per_s"].as_f64().unwrap_or(0.0);
    println!(
        "| read | events | gRPC TelemetryRead (events/s) | azure-eventhub receive_batch (events/s) | ratio |"
    );
    println!("|---|---:|---:|---:|---:|");
    let g0 = expected[0] as f64 / grpc_p0;
    let ga = all_events as f64 / grpc_all;
    println!(
        "| partition 0 | {} | {:.0} | {:.0} | {:.2} |",
        expected[0],
        g0,
        rate(&py["partition0"]),
        rate(&py["partition0"]) / g0
    );
    println!(
        "| all {partitions} partitions | {all_events} | {:.0} | {:.0} | {:.2} |",
        ga,
        rate(&py["all"]),
        rate(&py["all"]) / ga
    );
    println!();
    println!(
        "C2D through AMQP (azure-iot-hub send_c2d_message, sequential, each committed before its accept): {} messages in {:.2} s = {:.0} sends/s",
        py["c2d"]["messages"],
        py["c2d"]["seconds"].as_f64().unwrap_or(0.0),
        py["c2d"]["sends_per_s"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}
