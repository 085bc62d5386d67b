//! Workloads that record every acknowledged operation, for the checker.
//!
//! * Telemetry: devices publish numbered QoS 1 messages (message id `{device}-{seq}`, property
//!   `seq`), one in flight, and move to the next node when their connection breaks, resending the
//!   unacknowledged message there (so a duplicate always carries the same message id).
//! * Registry: a writer creates devices one after another through a rotating node and records
//!   each create answered 200.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use meridian::client::ServiceClient;
use meridian::client::device::{ConnAckCode, RawMqtt, device_token, tls_config};
use serde_json::json;

/// Acknowledged telemetry: device → sequence numbers PUBACKed, in send order.
pub type Acked = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// Messages acknowledged so far.
pub fn total(acked: &Acked) -> usize {
    acked
        .lock()
        .map(|a| a.values().map(Vec::len).sum())
        .unwrap_or(0)
}

/// Waits until `more` further messages are acknowledged; returns how long that took.
pub async fn progress(acked: &Acked, more: usize, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let from = total(acked);
    while total(acked) < from + more {
        if start.elapsed() > timeout {
            bail!(
                "telemetry stalled: {} acked in {timeout:?}",
                total(acked) - from
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// When each acknowledged message was acknowledged (same order as [`Acked`]).
pub type AckTimes = Arc<Mutex<BTreeMap<String, Vec<Instant>>>>;

/// A running telemetry workload.
pub struct TelemetryLoad {
    /// What was acknowledged.
    pub acked: Acked,
    /// When.
    pub times: AckTimes,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl TelemetryLoad {
    /// Starts one task per `(device id, primary key)`, spreading first connections over `nodes`.
    pub fn start(
        devices: Vec<(String, String)>,
        nodes: Vec<SocketAddr>,
        ca: &std::path::Path,
    ) -> Self {
        Self::start_paced(devices, nodes, ca, Duration::ZERO)
    }

    /// Like [`TelemetryLoad::start`], each device waiting `interval` after each acknowledged
    /// message (a fleet sending periodically rather than as fast as it can).
    pub fn start_paced(
        devices: Vec<(String, String)>,
        nodes: Vec<SocketAddr>,
        ca: &std::path::Path,
        interval: Duration,
    ) -> Self {
        let acked: Acked = Arc::default();
        let times: AckTimes = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = devices
            .into_iter()
            .enumerate()
            .map(|(i, (id, key))| {
                tokio::spawn(device_loop(
                    id,
                    key,
                    nodes.clone(),
                    i % nodes.len().max(1),
                    ca.to_path_buf(),
                    (acked.clone(), times.clone()),
                    (stop.clone(), interval),
                ))
            })
            .collect();
        Self {
            acked,
            times,
            stop,
            tasks,
        }
    }

    /// Stops every device and returns what was acknowledged.
    pub async fn stop(self) -> Result<BTreeMap<String, Vec<u64>>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(self.acked.lock().map(|a| a.clone()).unwrap_or_default())
    }
}

async fn device_loop(
    id: String,
    key: String,
    nodes: Vec<SocketAddr>,
    mut node: usize,
    ca: std::path::PathBuf,
    (acked, times): (Acked, AckTimes),
    (stop, interval): (Arc<AtomicBool>, Duration),
) -> Result<()> {
    let tls = tls_config(&ca)?;
    let token = device_token("localhost", &id, &key, 3600)?;
    let mut seq = 1u64;
    // Like the SDKs: exponential backoff with jitter between failed connects, so a fleet refused
    // by a region that is not primary does not turn into a TLS handshake storm.
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let connected =
            RawMqtt::connect_with(nodes[node], None, tls.clone(), &id, &token, true, 60).await;
        let mut device = match connected {
            Ok((d, ConnAckCode::Success, _)) => {
                backoff = Duration::from_millis(100);
                d
            }
            _ => {
                node = (node + 1) % nodes.len();
                let jitter = Duration::from_millis({
                    use std::hash::BuildHasher;
                    std::collections::hash_map::RandomState::new().hash_one(&id) % 100
                });
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let topic = format!("devices/{id}/messages/events/%24.mid={id}-{seq}&seq={seq}");
            let pkid = (seq % 60000) as u16 + 1;
            let sent = device
                .publish_acked(
                    &topic,
                    seq.to_string().as_bytes(),
                    pkid,
                    Duration::from_secs(15),
                )
                .await;
            if let Ok(true) = sent {
                if let Ok(mut a) = acked.lock() {
                    a.entry(id.clone()).or_default().push(seq);
                }
                if let Ok(mut t) = times.lock() {
                    t.entry(id.clone()).or_default().push(Instant::now());
                }
                seq += 1;
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            } else {
                node = (node + 1) % nodes.len();
                break;
            }
        }
    }
    Ok(())
}

/// A running registry writer.
pub struct RegistryLoad {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RegistryLoad {
    /// Creates devices `{prefix}-{n}` one after another, each through the next of `clients`.
    pub fn start(prefix: &str, clients: Vec<ServiceClient>) -> Self {
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, prefix) = (acked.clone(), stop.clone(), prefix.to_string());
        let task = tokio::spawn(async move {
            let mut n = 0usize;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("{prefix}-{n}");
                let client = &clients[n % clients.len()];
                let ok = match client.connect().await {
                    Ok(mut c) => c
                        .json(
                            "PUT",
                            &format!("/devices/{id}"),
                            Some(&json!({"deviceId": id})),
                        )
                        .await
                        .is_ok_and(|r| r.status == 200),
                    Err(_) => false,
                };
                if ok {
                    if let Ok(mut a) = a.lock() {
                        a.push((id, Instant::now()));
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { acked, stop, task }
    }

    /// Creates acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Stops and returns the acknowledged device ids.
    pub async fn stop(self) -> Vec<String> {
        self.stop_with_times()
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Stops and returns the acknowledged device ids with when each was acknowledged.
    pub async fn stop_with_times(self) -> Vec<(String, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.acked.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// One device id per telemetry partition (`probe-{n}` ids hashed like the hub does).
pub fn probe_ids(prefix: &str, partitions: u32) -> Vec<String> {
    let mut ids = vec![String::new(); partitions as usize];
    let mut n = 0;
    while ids.iter().any(String::is_empty) {
        let id = format!("{prefix}-{n}");
        let p = meridian::domain::telemetry::partition_for(&id, partitions) as usize;
        if ids[p].is_empty() {
            ids[p] = id;
        }
        n += 1;
    }
    ids
}

/// Publishes from `(id, key)` through `addr` until a PUBACK arrives (reconnecting as needed);
/// returns when.
pub async fn probe_until_acked(
    addrs: Vec<SocketAddr>,
    ca: std::path::PathBuf,
    (id, key): (String, String),
    deadline: Instant,
) -> Result<Instant> {
    let tls = tls_config(&ca)?;
    let token = device_token("localhost", &id, &key, 3600)?;
    let topic = format!("devices/{id}/messages/events/");
    let mut seq = 0u64;
    // Each failed try moves to the next node: the probe finds whichever region or node takes
    // writes now (a paused node accepts TCP but never answers, hence the bound on each try).
    let mut next = 0usize;
    // The last try's outcome, for the error when none succeeds.
    let mut last = String::from("no try");
    while Instant::now() < deadline {
        let Some(addr) = addrs.get(next % addrs.len().max(1)).copied() else {
            bail!("{id}: no address to probe");
        };
        next += 1;
        let connected = tokio::time::timeout(
            Duration::from_secs(2),
            RawMqtt::connect_with(addr, None, tls.clone(), &id, &token, true, 60),
        )
        .await;
        let mut c = match connected {
            Ok(Ok((c, ConnAckCode::Success, _))) => c,
            other => {
                last = match other {
                    Ok(Ok((_, code, _))) => format!("{addr}: CONNACK {code:?}"),
                    Ok(Err(e)) => format!("{addr}: connect: {e}"),
                    Err(_) => format!("{addr}: no CONNACK within 2 s"),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        seq += 1;
        // One try per connection: a node that could not store the message closes it.
        match c
            .publish_acked(
                &topic,
                b"probe",
                (seq % 60_000) as u16 + 1,
                Duration::from_secs(5),
            )
            .await
        {
            Ok(true) => return Ok(Instant::now()),
            Ok(false) => last = format!("{addr}: closed before the PUBACK"),
            Err(e) => last = format!("{addr}: publish: {e}"),
        }
    }
    bail!("{id}: no PUBACK before the deadline after {next} tries (last: {last})")
}

/// Time from `trigger` until every probe (one per partition) got a PUBACK through one of `addrs`.
pub async fn all_partitions_writable(
    addrs: &[SocketAddr],
    ca: &std::path::Path,
    probes: &[(String, String)],
    trigger: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let tasks: Vec<_> = probes
        .iter()
        .cloned()
        .map(|p| {
            tokio::spawn(probe_until_acked(
                addrs.to_vec(),
                ca.to_path_buf(),
                p,
                trigger + timeout,
            ))
        })
        .collect();
    let mut last = trigger;
    for t in tasks {
        last = last.max(t.await??);
    }
    Ok(last - trigger)
}

/// Time from `trigger` until a create through one of `clients` (tried in turn) is answered 200;
/// the last try's outcome when none is within `timeout`. Each try creates its own device
/// (`{id}-{try}`): a try whose answer was lost (its node paused past the 3 s limit) may still
/// commit, and a retry of the same id would then be answered 409 for ever.
pub async fn registry_writable(
    clients: &[ServiceClient],
    id: &str,
    trigger: Instant,
    timeout: Duration,
) -> Result<Duration, String> {
    let mut next = 0usize;
    let mut last = String::from("no try");
    while trigger.elapsed() < timeout {
        let Some(client) = clients.get(next % clients.len().max(1)) else {
            return Err("no node to write through".into());
        };
        next += 1;
        let device = format!("{id}-{next}");
        let attempt = async {
            let mut c = client
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let r = c
                .json(
                    "PUT",
                    &format!("/devices/{device}"),
                    Some(&json!({"deviceId": device})),
                )
                .await
                .map_err(|e| format!("PUT: {e}"))?;
            if r.status == 200 {
                Ok(())
            } else {
                Err(format!("status {}", r.status))
            }
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(())) => return Ok(trigger.elapsed()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer within 3 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "no create answered 200 within {timeout:?} after {next} tries (last: {last})"
    ))
}

/// Official Python SDK devices (`chaos/sdk/sdk_devices.py`, azure-iot-device 2.14 from the venv
/// that `node/tests/sdk/setup.sh` installs), publishing numbered messages like [`TelemetryLoad`].
pub struct SdkLoad {
    child: std::process::Child,
    stop_file: std::path::PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

/// The venv python of the official SDKs (`MERIDIAN_SDK_CACHE`, default `~/.cache/meridian-sdk`).
pub fn sdk_python() -> std::path::PathBuf {
    std::env::var_os("MERIDIAN_SDK_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/meridian-sdk")
        })
        .join("venv/bin/python")
}

impl SdkLoad {
    /// Starts the SDK devices (already registered: `(id, primary key)`) against `nodes` (MQTT/TLS
    /// endpoints) and waits until every one is connected.
    pub async fn start(
        devices: &[(String, String)],
        nodes: &[SocketAddr],
        ca: &std::path::Path,
        work: &std::path::Path,
    ) -> Result<Self> {
        use std::io::BufRead;
        let python = sdk_python();
        anyhow::ensure!(
            python.exists(),
            "{} missing: run `bash node/tests/sdk/setup.sh` (deploy/test.sh does)",
            python.display()
        );
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/sdk_devices.py");
        let stop_file = work.join("sdk-stop");
        let _ = std::fs::remove_file(&stop_file);
        let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        let mut child = std::process::Command::new(python)
            .arg(script)
            .env("MERIDIAN_CA_CERT", ca)
            .env("CHAOS_NODES", nodes.join(","))
            .env("CHAOS_DEVICES", serde_json::to_string(devices)?)
            .env("CHAOS_STOP_FILE", &stop_file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(work.join("sdk-devices.log"))?)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let load = Self {
            child,
            stop_file,
            lines,
        };
        load.wait_line("ready", Duration::from_secs(60)).await?;
        Ok(load)
    }

    async fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.try_recv() {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => continue,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    bail!("SDK devices exited before printing {prefix:?}")
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if Instant::now() > deadline {
                bail!("SDK devices did not print {prefix:?} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the devices and returns what they got acknowledged.
    pub async fn stop(mut self) -> Result<BTreeMap<String, Vec<u64>>> {
        std::fs::write(&self.stop_file, b"stop")?;
        let line = self.wait_line("ACKED ", Duration::from_secs(90)).await;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let line = line?;
        Ok(serde_json::from_str(line.trim_start_matches("ACKED "))?)
    }
}

/// Registers `ids` through `client` (a few connections in parallel) and returns each with its
/// generated primary key.
pub async fn create_many(client: &ServiceClient, ids: &[String]) -> Result<Vec<(String, String)>> {
    // A few connections in parallel: 10k registrations take seconds, not minutes.
    let chunks: Vec<Vec<String>> = ids
        .chunks(ids.len().div_ceil(8).max(1))
        .map(<[String]>::to_vec)
        .collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut c = client.connect().await?;
                let mut out = Vec::new();
                for id in chunk {
                    let mut attempt = 0;
                    let r = loop {
                        attempt += 1;
                        let r = c
                            .json(
                                "PUT",
                                &format!("/devices/{id}"),
                                Some(&json!({"deviceId": id})),
                            )
                            .await?;
                        // A leader change while the write was forwarded (503, outcome unknown):
                        // try again; if the first attempt did land, read what it stored.
                        if r.status == 503 && attempt < 10 {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        if r.status == 409 && attempt > 1 {
                            break c.json("GET", &format!("/devices/{id}"), None).await?;
                        }
                        break r;
                    };
                    anyhow::ensure!(r.status == 200, "create {id}: {} {}", r.status, r.json());
                    let key = r.json()["authentication"]["symmetricKey"]["primaryKey"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    out.push((id, key));
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await??);
    }
    Ok(out)
}
