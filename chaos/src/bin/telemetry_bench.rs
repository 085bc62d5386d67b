//! Telemetry benchmark: acknowledged QoS 1 messages/s and PUBACK latency over TLS from many
//! connected devices on one node, side by side with Mosquitto 2.0 (persistence on) driven by the
//! same client; CONNECT rate; memory per idle connected TLS device.
//!
//! `cargo run --release -p meridian-chaos --bin telemetry-bench -- --help`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meridian::client::ServiceClient;
use meridian::client::device::{
    ConnAckCode as ConnectReturnCode, RawMqtt, device_token, tls_config,
};
use meridian_chaos::cluster::{ChaosCluster, ClusterOptions};
use meridian_chaos::proc::free_ports;
use meridian_chaos::workload::create_many;
use serde_json::Value;

#[derive(Debug, Parser)]
struct Args {
    /// The meridian binary.
    #[arg(long, default_value = "target/release/meridian")]
    meridian_bin: PathBuf,
    /// The mosquitto binary (Debian package mosquitto).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Connected devices publishing (one QoS 1 message in flight each).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds of load per system.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Telemetry payload bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Skip Mosquitto.
    #[arg(long)]
    no_mosquitto: bool,
    /// Rounds of Meridian then Mosquitto, each on fresh data; the report gives every round and
    /// the median ratios (runs on a shared 2-core machine vary by ±10%).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Instead of the load test: connect this many idle devices to Meridian and report the
    /// server's memory per connection (comma-separated list, e.g. 10000,100000).
    #[arg(long, value_delimiter = ',')]
    idle: Vec<usize>,
    /// With `--idle`: nodes of a loopback cluster (`meridian node`) the idle devices are spread
    /// over, round-robin; held by several load-generator processes. 1 = one `meridian dev`.
    /// Needed beyond ~19k devices where a process may hold at most 20000 open files.
    #[arg(long, default_value_t = 1)]
    idle_nodes: usize,
    /// Internal: hold the connections listed in this file (a load-generator worker of
    /// `--idle-nodes`), print `HELD {devices} {CONNACK 3 retried} {seconds}`, and keep them until
    /// stdin closes.
    #[arg(long, hide = true)]
    hold: Option<PathBuf>,
}

/// Devices one load-generator process holds at most (each holds one socket per device).
const HELD_PER_WORKER: usize = 15_000;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system, all threads) a process has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks_per_second = clock_ticks_per_second();
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_second,
    ))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct Target {
    /// The broker's process, whose CPU time the load is charged with.
    pid: u32,
    addr: SocketAddr,
    /// (client id, password) per device.
    devices: Vec<(String, String)>,
}

async fn start_meridian(args: &Args, dir: &Path, devices: usize) -> Result<(Proc, Target)> {
    let p = free_ports(4)?;
    let data = dir.join("meridian");
    let child = Command::new(&args.meridian_bin)
        .args(["dev", "--data-dir"])
        .arg(&data)
        .args([
            "--https-port",
            &p[0].to_string(),
            "--grpc-port",
            &p[1].to_string(),
        ])
        .args([
            "--metrics-port",
            &p[2].to_string(),
            "--mqtt-port",
            &p[3].to_string(),
        ])
        .env("MERIDIAN_OBSERVABILITY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("meridian.log"))?)
        .spawn()
        .context("spawn meridian")?;
    let proc = Proc(child);
    let creds_path = data.join("dev-credentials.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !creds_path.exists() {
        if Instant::now() > deadline {
            bail!("meridian did not start; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let creds: Value = serde_json::from_slice(&std::fs::read(&creds_path)?)?;
    let ca = data.join("tls/ca.pem");
    let service = ServiceClient::new(
        creds["service_connection_string"]
            .as_str()
            .unwrap_or_default(),
        SocketAddr::from(([127, 0, 0, 1], p[0])),
        &ca,
    )?;
    let ids: Vec<String> = (0..devices).map(|i| format!("bench-{i}")).collect();
    let all = create_many(&service, &ids)
        .await?
        .into_iter()
        .map(|(id, key)| {
            let password = device_token("localhost", &id, &key, 24 * 3600)?;
            Ok((id, password))
        })
        .collect::<Result<Vec<_>>>()?;
    let target = Target {
        pid: proc.0.id(),
        addr: SocketAddr::from(([127, 0, 0, 1], p[3])),
        devices: all,
    };
    Ok((proc, target))
}

async fn start_mosquitto(
    args: &Args,
    dir: &Path,
    devices: usize,
    cert: &Path,
    key: &Path,
) -> Result<(Proc, Target)> {
    let port = free_ports(1)?[0];
    let persistence = dir.join("mosquitto-data");
    std::fs::create_dir_all(&persistence)?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_connections -1\nlog_dest none\n",
            cert.display(),
            key.display(),
            persistence.display()
        ),
    )?;
    let child = Command::new(&args.mosquitto_bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log"))?)
        .spawn()
        .context("spawn mosquitto")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id();
    Ok((
        Proc(child),
        Target {
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            devices: (0..devices)
                .map(|i| (format!("bench-{i}"), String::new()))
                .collect(),
        },
    ))
}

/// Loopback source addresses, so many connections fit in the ephemeral port range.
fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 1, (1 + i / 20_000) as u8)))
}

struct Load {
    connect_rate: f64,
    acked: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    failed_devices: usize,
    /// The broker's CPU time during the load phase.
    cpu: Duration,
    /// This generator's own CPU time during the load phase: on shared cores, taken from the broker.
    generator_cpu: Duration,
}

async fn run_load(target: &Target, ca: &Path, seconds: u64, payload: usize) -> Result<Load> {
    let tls = tls_config(ca)?;
    // Connect everyone first (bounded concurrency), measuring the CONNECT + auth rate.
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut connecting = Vec::new();
    for (i, (id, password)) in target.devices.iter().cloned().enumerate() {
        let (tls, semaphore, addr) = (tls.clone(), semaphore.clone(), target.addr);
        connecting.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            let (client, code, _) =
                RawMqtt::connect_with(addr, source(i), tls, &id, &password, true, 600).await?;
            if code != ConnectReturnCode::Success {
                bail!("{id}: {code:?}");
            }
            Ok::<_, anyhow::Error>((id, client))
        }));
    }
    let mut clients = Vec::new();
    for c in connecting {
        clients.push(c.await??);
    }
    let connect_rate = clients.len() as f64 / started.elapsed().as_secs_f64();

    let body = vec![b'x'; payload];
    let cpu_before = cpu_time(target.pid).unwrap_or_default();
    let generator_before = cpu_time(std::process::id()).unwrap_or_default();
    let load_start = Instant::now();
    let stop = load_start + Duration::from_secs(seconds);
    // One deadline per device for the whole run instead of a timer per message: the generator
    // shares the machine's cores with the broker, so what it spends per message is taken from the
    // broker being measured.
    let give_up = tokio::time::Instant::from_std(stop + Duration::from_secs(30));
    let mut tasks = Vec::new();
    for (id, client) in clients {
        let mut publisher =
            client.into_publisher(&format!("devices/{id}/messages/events/"), &body)?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let run = async {
                let mut seq: u64 = 0;
                while Instant::now() < stop {
                    seq += 1;
                    let t0 = Instant::now();
                    match publisher.publish_acked((seq % 60_000) as u16 + 1).await {
                        Ok(true) => latencies.push(t0.elapsed()),
                        _ => return true,
                    }
                }
                false
            };
            let failed = tokio::time::timeout_at(give_up, run).await.unwrap_or(true);
            (latencies, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await?;
        all.extend(l);
        failed += usize::from(f);
    }
    let elapsed = load_start.elapsed();
    let cpu = cpu_time(target.pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    let generator_cpu = cpu_time(std::process::id())
        .unwrap_or_default()
        .saturating_sub(generator_before);
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(Load {
        connect_rate,
        acked: all.len(),
        elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
        failed_devices: failed,
        cpu,
        generator_cpu,
    })
}

impl Load {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_message(&self) -> f64 {
        self.cpu.as_secs_f64() / self.acked.max(1) as f64
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn join(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn row(name: &str, l: &Load) -> String {
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {} | {:.0}% | {:.1} | {:.0}% | {:.1} |",
        l.acked as f64 / l.elapsed.as_secs_f64(),
        l.p50.as_secs_f64() * 1e3,
        l.p99.as_secs_f64() * 1e3,
        l.acked,
        l.connect_rate,
        l.failed_devices,
        l.cpu.as_secs_f64() / l.elapsed.as_secs_f64() * 100.0,
        l.cpu.as_secs_f64() * 1e6 / (l.acked.max(1) as f64),
        l.generator_cpu.as_secs_f64() / l.elapsed.as_secs_f64() * 100.0,
        l.generator_cpu.as_secs_f64() * 1e6 / (l.acked.max(1) as f64)
    )
}

async fn idle_memory(args: &Args, dir: &Path, count: usize) -> Result<String> {
    let (proc, target) = start_meridian(args, dir, count).await?;
    let ca = dir.join("meridian/tls/ca.pem");
    let tls = tls_config(&ca)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(proc.0.id()).context("rss")?;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for (i, (id, password)) in target.devices.iter().cloned().enumerate() {
        let (tls, semaphore, addr) = (tls.clone(), semaphore.clone(), target.addr);
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            let (client, code, _) =
                RawMqtt::connect_with(addr, source(i), tls, &id, &password, true, 1000).await?;
            if code != ConnectReturnCode::Success {
                bail!("{id}: {code:?}");
            }
            Ok::<_, anyhow::Error>(client)
        }));
    }
    let started = Instant::now();
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await??);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(proc.0.id()).context("rss")?;
    drop(held);
    Ok(format!(
        "| {count} | {:.1} | {:.1} | {:.0} |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 * 1024.0 / count as f64 / 1024.0
    ) + &format!(" (connected in {connect_secs:.1} s)"))
}

/// One device a worker connects: (MQTT address, source address, client id, password).
type HeldDevice = (SocketAddr, IpAddr, String, String);

/// `--idle` over a cluster: devices spread over `nodes` nodes, held by worker processes of this
/// binary (`--hold`), the nodes' summed RSS measured before and after.
async fn idle_memory_cluster(
    args: &Args,
    dir: &Path,
    count: usize,
    nodes: usize,
) -> Result<String> {
    let mut opts = ClusterOptions::new(
        args.meridian_bin
            .canonicalize()
            .context("the meridian binary")?,
    );
    opts.nodes = nodes;
    opts.log_filter = "warn".into();
    let cluster = ChaosCluster::start(&opts, dir).await?;
    let result = hold_on_cluster(&cluster, dir, count, nodes).await;
    if result.is_err() {
        eprintln!("{}", cluster.logs(20));
    }
    result
}

async fn hold_on_cluster(
    cluster: &ChaosCluster,
    dir: &Path,
    count: usize,
    nodes: usize,
) -> Result<String> {
    let ids: Vec<String> = (0..count).map(|i| format!("idle-{i}")).collect();
    let created_at = Instant::now();
    let keys = create_many(&cluster.service, &ids).await?;
    println!(
        "{count} devices created in {:.1} s",
        created_at.elapsed().as_secs_f64()
    );
    let mut devices: Vec<HeldDevice> = Vec::with_capacity(count);
    for (i, (id, key)) in keys.into_iter().enumerate() {
        let node = &cluster.nodes[i % nodes];
        let password = device_token("localhost", &id, &key, 24 * 3600)?;
        let source = source(i).context("source address")?;
        devices.push((node.mqtt, source, id, password));
    }
    // Let every node apply the registrations before the baseline.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_all = |cluster: &ChaosCluster| -> Result<Vec<u64>> {
        cluster
            .nodes
            .iter()
            .map(|n| n.proc.pid().and_then(rss_kib).context("node rss"))
            .collect()
    };
    let before = rss_all(cluster)?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for (w, chunk) in devices.chunks(HELD_PER_WORKER).enumerate() {
        let file = dir.join(format!("hold{w}.json"));
        std::fs::write(&file, serde_json::to_vec(chunk)?)?;
        let mut child = Command::new(&exe)
            .arg("--hold")
            .arg(&file)
            .arg("--idle")
            .arg(chunk.len().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("hold{w}.log")))?)
            .spawn()
            .context("spawn a load-generator worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        });
        workers.push((Proc(child), ready));
    }
    let (mut held, mut refusals) = (0, 0);
    for (w, (_, ready)) in workers.iter_mut().enumerate() {
        let line = ready.await??;
        // `HELD {devices} {CONNACK 3 retried} {seconds}`
        let fields: Vec<u64> = line
            .strip_prefix("HELD ")
            .map(|rest| {
                rest.split_whitespace()
                    .take(2)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let [n, refused] = fields[..] else {
            bail!("worker {w}: {line:?} (log in {})", dir.display());
        };
        held += n as usize;
        refusals += refused;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    if held != count {
        bail!("{held} of {count} devices connected");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_all(cluster)?;
    // Everything still connected when measured: every node still holds its share.
    for (i, node) in cluster.nodes.iter().enumerate() {
        if !node.proc.is_running() {
            bail!("node {} exited; logs in {}", i + 1, dir.display());
        }
    }
    drop(workers);
    let (b, a): (u64, u64) = (before.iter().sum(), after.iter().sum());
    let per_node: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| format!("{:.0}→{:.0}", *b as f64 / 1024.0, *a as f64 / 1024.0))
        .collect();
    Ok(format!(
        "| {count} over {nodes} nodes | {:.1} | {:.1} | {:.0} |",
        b as f64 / 1024.0,
        a as f64 / 1024.0,
        a.saturating_sub(b) as f64 / count as f64
    ) + &format!(
        " (connected in {connect_secs:.1} s, {refusals} CONNACK 3 retried; per node MiB {})",
        per_node.join(", ")
    ))
}

/// A load-generator worker: connects the devices in `file`, reports, holds them until stdin
/// closes.
async fn hold(file: &Path) -> Result<()> {
    let devices: Vec<HeldDevice> = serde_json::from_slice(&std::fs::read(file)?)?;
    let ca = file.parent().context("work dir")?.join("tls/ca.pem");
    let tls = tls_config(&ca)?;
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for (addr, source, id, password) in devices {
        let (tls, semaphore) = (tls.clone(), semaphore.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            // As the SDKs do: CONNACK 3 (server unavailable, e.g. the connection state could not
            // be replicated in time under the connect storm) is retried after a pause.
            let mut refused = 0;
            loop {
                let (client, code, _) = RawMqtt::connect_with(
                    addr,
                    Some(source),
                    tls.clone(),
                    &id,
                    &password,
                    true,
                    3000,
                )
                .await?;
                match code {
                    ConnectReturnCode::Success => return Ok::<_, anyhow::Error>((client, refused)),
                    ConnectReturnCode::ServiceUnavailable if refused < 20 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(500 * refused)).await;
                    }
                    _ => bail!("{id}: {code:?} after {refused} refusals"),
                }
            }
        }));
    }
    let mut held = Vec::new();
    let mut refusals = 0;
    for t in tasks {
        match t.await? {
            Ok((c, refused)) => {
                held.push(c);
                refusals += refused;
            }
            Err(e) => {
                println!("FAILED {e:#}");
                return Err(e);
            }
        }
    }
    println!(
        "HELD {} {refusals} {:.1}",
        held.len(),
        started.elapsed().as_secs_f64()
    );
    // Until the parent closes stdin (or dies).
    tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    })
    .await??;
    drop(held);
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(file) = &args.hold {
        return hold(file).await;
    }
    let dir = tempfile::tempdir()?;
    println!("work dir: {}", dir.path().display());
    if !args.idle.is_empty() {
        let mut lines = vec![
            "| idle devices | server RSS before (MiB) | after (MiB) | KiB per device |".to_string(),
            "|---|---|---|---|".to_string(),
        ];
        for (n, count) in args.idle.iter().enumerate() {
            let sub = dir.path().join(format!("idle{n}"));
            std::fs::create_dir_all(&sub)?;
            let line = if args.idle_nodes > 1 {
                idle_memory_cluster(&args, &sub, *count, args.idle_nodes).await?
            } else {
                idle_memory(&args, &sub, *count).await?
            };
            println!("{line}");
            lines.push(line);
        }
        println!("\n{}", lines.join("\n"));
        return Ok(());
    }
    let mut lines = vec![
        format!(
            "| broker ({} devices, {} B payload, QoS 1, TLS) | acked msg/s | p50 ms | p99 ms | acked | CONNECTs/s | failed devices | broker CPU | broker CPU µs/msg | generator CPU | generator CPU µs/msg |",
            args.devices, args.payload
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let (mut rate_ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let round_dir = dir.path().join(format!("round{round}"));
        std::fs::create_dir_all(&round_dir)?;
        let meridian = {
            let (_proc, target) = start_meridian(&args, &round_dir, args.devices).await?;
            let ca = round_dir.join("meridian/tls/ca.pem");
            println!(
                "round {round}: meridian, {} devices for {} s",
                args.devices, args.seconds
            );
            run_load(&target, &ca, args.seconds, args.payload).await?
        };
        let r = row("Meridian (fsync before PUBACK)", &meridian);
        println!("{r}");
        lines.push(r);
        if args.no_mosquitto {
            continue;
        }
        let tls = round_dir.join("meridian/tls");
        let mosquitto = {
            let (_proc, target) = start_mosquitto(
                &args,
                &round_dir,
                args.devices,
                &tls.join("server.pem"),
                &tls.join("server.key"),
            )
            .await?;
            println!(
                "round {round}: mosquitto, {} devices for {} s",
                args.devices, args.seconds
            );
            run_load(&target, &tls.join("ca.pem"), args.seconds, args.payload).await?
        };
        let r = row("Mosquitto 2.0 (persistence on)", &mosquitto);
        println!("{r}");
        lines.push(r);
        rate_ratios.push(meridian.rate() / mosquitto.rate());
        cpu_ratios.push(meridian.cpu_per_message() / mosquitto.cpu_per_message());
    }
    if !rate_ratios.is_empty() {
        lines.push(format!(
            "\nratio Meridian/Mosquitto acked msg/s: median {:.2} of {}",
            median(&mut rate_ratios),
            join(&rate_ratios)
        ));
        lines.push(format!(
            "ratio Meridian/Mosquitto broker CPU per acked message: median {:.2} of {}",
            median(&mut cpu_ratios),
            join(&cpu_ratios)
        ));
    }
    println!("\n{}", lines.join("\n"));
    Ok(())
}
