//! The regions scenario: geo-paired regions (async pair with a witness, or one sync cluster over
//! three regions) in network namespaces with a WAN delay between regions, under a workload of
//! telemetry (Rust devices and official Python SDK devices), registry creates, twin desired
//! patches and C2D sends, every acknowledged operation recorded with its time. Steps: planned
//! failover, planned failback, loss of the primary region (kill -9 of all its nodes), and a
//! partition that cuts the primary region off from the others. For each step the report gives
//! the RTO (trigger → first successful device send and registry write in the new primary, and →
//! every device sending again) and, per data type, the RPO (acknowledged but lost: how many, and
//! how many seconds of history), next to Azure IoT Hub's documented figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use meridian::client::ServiceClient;
use meridian::client::region::{WritableAnswer, surely_writable_together};
use serde::Serialize;
use serde_json::{Value, json};

use crate::checker::{self, TelemetryCheck, check_telemetry};
use crate::cluster::{ChaosCluster, ClusterOptions, RegionLayout};
use crate::report::Timeline;
use crate::workload::{
    SdkLoad, TelemetryLoad, all_partitions_writable, create_many, probe_ids, progress,
    registry_writable,
};

/// Region lease length in the scenario's layout (ms).
const LEASE_MS: u64 = 1000;
/// Automatic failover grace time in the scenario's layout (ms).
const GRACE_MS: u64 = 4000;

/// Settings of [`regions`].
#[derive(Debug, Clone)]
pub struct RegionsOptions {
    /// The nodes (the `regions` layout is filled in by [`RegionsOptions::new`]).
    pub cluster: ClusterOptions,
    /// Sync mode (one cluster over three regions) instead of the async pair with a witness.
    pub sync: bool,
    /// Nodes per data region.
    pub nodes_per_region: usize,
    /// Devices registered before the run (besides the workload's).
    pub registered: usize,
    /// Telemetry devices of the Rust load generator (connected all the time).
    pub devices: usize,
    /// Official Python SDK devices.
    pub sdk_devices: usize,
    /// Messages acknowledged before the first step.
    pub warmup_messages: usize,
    /// WAN delay between regions (one way, added by the nodes' transport).
    pub wan_delay: Duration,
    /// Each Rust device waits this long after each acknowledged message (zero: as fast as acked).
    pub send_interval: Duration,
}

impl RegionsOptions {
    /// Two data regions `east` (initial primary) and `west` of `nodes_per_region` nodes and a
    /// one-node region `arbiter` (the witness in async mode, the fifth voter in sync mode).
    pub fn new(meridian_bin: std::path::PathBuf, sync: bool, nodes_per_region: usize) -> Self {
        let mut cluster = ClusterOptions::new(meridian_bin);
        cluster.netns = true;
        cluster.regions = Some(RegionLayout {
            sync,
            regions: vec![
                ("east".into(), nodes_per_region, false),
                ("west".into(), nodes_per_region, false),
                // Async: the witness (leases, votes); sync: the tie-breaker voter.
                ("arbiter".into(), 1, true),
            ],
            region_toml: format!(
                "lease_ms = {LEASE_MS}\nlease_margin_ms = 100\nautomatic_failover = true\nfailover_grace_ms = {GRACE_MS}\nship_interval_ms = 50\n"
            ),
            // One Raft group over a WAN (sync) needs heartbeats and elections slower than the
            // round trip plus a replication batch; inside a region (async) the defaults fit.
            cluster_toml: if sync {
                "heartbeat_interval_ms = 500\nelection_timeout_min_ms = 2000\nelection_timeout_max_ms = 4000\n".into()
            } else {
                String::new()
            },
            wan_delay: Duration::from_millis(40),
        });
        Self {
            cluster,
            sync,
            nodes_per_region,
            registered: 1000,
            devices: 100,
            sdk_devices: 5,
            warmup_messages: 2000,
            wan_delay: Duration::from_millis(40),
            send_interval: Duration::ZERO,
        }
    }
}

/// Loss of one data type in one step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Loss {
    /// Acknowledged operations lost.
    pub lost: usize,
    /// Seconds of acknowledged history lost: from the earliest to the latest lost
    /// acknowledgement.
    pub seconds: f64,
    /// The earliest and latest lost acknowledgement relative to the trigger, in seconds
    /// (negative: before it; positive: acknowledged by the old primary after it).
    pub window: (f64, f64),
}

/// One failover step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepResult {
    /// What was done.
    pub step: String,
    /// The region primary afterwards.
    pub new_primary: String,
    /// Trigger → every partition took a device send in the new primary (ms).
    pub rto_telemetry_ms: Option<u64>,
    /// Trigger → a registry write answered 200 in the new primary (ms).
    pub rto_registry_ms: Option<u64>,
    /// Trigger → every Rust load-generator device had a message acknowledged again (ms).
    pub rto_all_devices_ms: Option<u64>,
    /// Per data type (telemetry, registry, twins, c2d): what was lost.
    pub loss: BTreeMap<String, Loss>,
    /// Observations.
    pub notes: Vec<String>,
}

/// The report of a regions run.
#[derive(Debug, Clone, Serialize)]
pub struct RegionsReport {
    /// `regions-async` or `regions-sync`.
    pub scenario: String,
    /// Layout, e.g. "east 2 + west 2 + arbiter 1 (witness)".
    pub layout: String,
    /// WAN delay (ms, one way).
    pub wan_delay_ms: u64,
    /// Devices registered (workload included).
    pub registered: usize,
    /// Rust load-generator devices connected.
    pub devices: usize,
    /// Official SDK devices connected.
    pub sdk_devices: usize,
    /// Each Rust device's pause after each acknowledged message, ms (0: as fast as acknowledged).
    pub send_interval_ms: u64,
    /// The steps.
    pub steps: Vec<StepResult>,
    /// Acknowledged operations per data type over the run.
    pub acknowledged: BTreeMap<String, usize>,
    /// The final telemetry check (both regions converged to the same history).
    pub telemetry: TelemetryCheck,
    /// Samples in which nodes of two data regions both accepted writes (must be 0).
    pub two_primaries_samples: usize,
    /// Status samples taken during the partition step.
    pub partition_samples: usize,
    /// Checks that failed.
    pub failures: Vec<String>,
    /// Whether every check passed.
    pub passed: bool,
    /// Wall time (s).
    pub duration_secs: f64,
    /// (ms since start, event).
    pub timeline: Vec<(u64, String)>,
}

type Acks = Arc<Mutex<Vec<(String, u64, Instant)>>>;

/// Service-side writers: twin desired patches and C2D sends, each acknowledged one recorded.
struct ServiceLoad {
    twins: Acks,
    c2d: Acks,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ServiceLoad {
    fn start(
        clients: Vec<ServiceClient>,
        twin_devices: Vec<String>,
        c2d_devices: Vec<String>,
    ) -> Self {
        let twins: Acks = Arc::default();
        let c2d: Acks = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let twin_task = {
            let (acks, stop, clients) = (twins.clone(), stop.clone(), clients.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut node = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let device = &twin_devices[n as usize % twin_devices.len()];
                    let ok = match clients[node % clients.len()].connect().await {
                        Ok(mut c) => c
                            .json(
                                "PATCH",
                                &format!("/twins/{device}"),
                                Some(&json!({"properties": {"desired": {"n": n}}})),
                            )
                            .await
                            .is_ok_and(|r| r.status == 200),
                        Err(_) => false,
                    };
                    if ok {
                        if let Ok(mut a) = acks.lock() {
                            a.push((device.clone(), n, Instant::now()));
                        }
                    } else {
                        node += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        let c2d_task = {
            let (acks, stop) = (c2d.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = 0usize;
                let mut node = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let device = &c2d_devices[n % c2d_devices.len()];
                    let count = sent.get(device).copied().unwrap_or(0);
                    // Azure's queue holds 50 per device; the sink devices never connect.
                    if count >= 45 {
                        if sent.values().all(|c| *c >= 45) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        continue;
                    }
                    let ok = match clients[node % clients.len()].connect().await {
                        Ok(mut c) => c
                            .json(
                                "POST",
                                &format!("/devices/{device}/messages/devicebound"),
                                Some(&json!({"n": count + 1})),
                            )
                            .await
                            .is_ok_and(|r| r.status == 204),
                        Err(_) => false,
                    };
                    if ok {
                        sent.insert(device.clone(), count + 1);
                        if let Ok(mut a) = acks.lock() {
                            a.push((device.clone(), count + 1, Instant::now()));
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else {
                        node += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        Self {
            twins,
            c2d,
            stop,
            tasks: vec![twin_task, c2d_task],
        }
    }

    async fn stop(self) -> (Vec<(String, u64, Instant)>, Vec<(String, u64, Instant)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.twins.lock().map(|a| a.clone()).unwrap_or_default(),
            self.c2d.lock().map(|a| a.clone()).unwrap_or_default(),
        )
    }
}

async fn region_status(cluster: &ChaosCluster, id: u64) -> Option<Value> {
    let mut c = cluster
        .operator
        .with_addr(cluster.node(id).ok()?.https)
        .connect()
        .await
        .ok()?;
    let r = c.json("GET", "/meridian/region", None).await.ok()?;
    (r.status == 200).then(|| r.json())
}

/// The data region whose nodes accept writes now (async: `writable`; sync: the hub leader's).
async fn current_primary(cluster: &ChaosCluster, layout: &RegionLayout) -> Option<String> {
    for (name, _, witness) in &layout.regions {
        if *witness {
            continue;
        }
        for id in layout.nodes_of(name) {
            if let Some(s) = region_status(cluster, id).await {
                if layout.sync {
                    return s["primary"].as_str().map(str::to_string);
                }
                if s["writable"] == true {
                    return Some(name.clone());
                }
            }
        }
    }
    None
}

async fn wait_primary(
    cluster: &ChaosCluster,
    layout: &RegionLayout,
    region: &str,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if current_primary(cluster, layout).await.as_deref() == Some(region) {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("region {region} not primary after {timeout:?}")
}

/// Time from `trigger` until every device has a message acknowledged after it.
async fn all_devices_again(
    times: &crate::workload::AckTimes,
    devices: usize,
    trigger: Instant,
    timeout: Duration,
) -> Option<Duration> {
    while trigger.elapsed() < timeout {
        let again = times
            .lock()
            .map(|t| {
                t.values()
                    .filter(|v| v.last().is_some_and(|l| *l > trigger))
                    .count()
            })
            .unwrap_or(0);
        if again >= devices {
            return Some(trigger.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

struct Step {
    name: String,
    trigger: Instant,
    result: StepResult,
}

/// Measures a step's RTO from `trigger`: the probes try every data node in turn, so they find
/// whichever region (and node) takes writes again.
async fn measure(
    cluster: &ChaosCluster,
    layout: &RegionLayout,
    trigger: Instant,
    probes: &[(String, String)],
    times: &crate::workload::AckTimes,
    devices: usize,
    name: &str,
) -> StepResult {
    let data_nodes = data_nodes(layout);
    let mqtt: Vec<SocketAddr> = data_nodes
        .iter()
        .filter_map(|id| cluster.node(*id).ok().map(|n| n.mqtt))
        .collect();
    let apis: Vec<ServiceClient> = data_nodes
        .iter()
        .filter_map(|id| cluster.service_for(*id).ok())
        .collect();
    let probe_id = format!("rto-{}", name.replace(' ', "-"));
    let (telemetry, registry, all) = tokio::join!(
        all_partitions_writable(&mqtt, &cluster.ca, probes, trigger, Duration::from_secs(90)),
        registry_writable(&apis, &probe_id, trigger, Duration::from_secs(90)),
        all_devices_again(times, devices, trigger, Duration::from_secs(120)),
    );
    // Why a recovery was not measured, so a failed run says which probe gave up and how.
    let mut notes = Vec::new();
    if let Err(e) = &telemetry {
        notes.push(format!("device-send probe: {e:#}"));
    }
    if let Err(e) = &registry {
        notes.push(format!("registry probe through {} nodes: {e}", apis.len()));
    }
    StepResult {
        step: name.into(),
        new_primary: current_primary(cluster, layout).await.unwrap_or_default(),
        rto_telemetry_ms: telemetry.ok().map(|d| d.as_millis() as u64),
        rto_registry_ms: registry.ok().map(|d| d.as_millis() as u64),
        rto_all_devices_ms: all.map(|d| d.as_millis() as u64),
        notes,
        ..Default::default()
    }
}

/// Region status samples taken while a fault lasts.
#[derive(Debug, Default)]
struct Sampled {
    samples: usize,
    two_writable: usize,
    /// Per region: samples in which it took writes.
    writable: BTreeMap<String, usize>,
}

impl Sampled {
    fn describe(&self, primary: &str) -> String {
        format!(
            "{} status samples: {} with two writable regions; {primary} writable in {}",
            self.samples,
            self.two_writable,
            self.writable.get(primary).copied().unwrap_or(0)
        )
    }

    fn add_to(&self, samples: usize, two: usize) -> (usize, usize) {
        (samples + self.samples, two + self.two_writable)
    }
}

/// Samples every data node's region status every 100 ms for `hold`. Sync mode has no region
/// fencing to sample (Raft keeps a cut-off minority from committing): only the primary's name.
async fn sample_writable(cluster: &ChaosCluster, layout: &RegionLayout, hold: Duration) -> Sampled {
    let mut out = Sampled::default();
    let started = Instant::now();
    while started.elapsed() < hold {
        let mut writable = std::collections::BTreeSet::new();
        let mut split = false;
        if layout.sync {
            if let Some(p) = current_primary(cluster, layout).await {
                writable.insert(p);
            }
        } else {
            let now = writable_regions_now(cluster, layout).await;
            split = now.split;
            writable = now.regions;
        }
        out.samples += 1;
        out.two_writable += usize::from(split);
        for r in writable {
            *out.writable.entry(r).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out
}

/// Which regions have a node that reports itself writable, every data node asked at the same
/// moment, and whether the answers prove two regions writable at one instant (answers taken at
/// once are still not one instant: see `meridian::client::region`).
struct WritableNow {
    regions: std::collections::BTreeSet<String>,
    split: bool,
}

async fn writable_regions_now(cluster: &ChaosCluster, layout: &RegionLayout) -> WritableNow {
    let nodes = data_nodes(layout);
    let replies = futures::future::join_all(nodes.iter().map(|id| async move {
        let asked = Instant::now();
        let status = region_status(cluster, *id).await;
        status.map(|s| WritableAnswer::from_status(&s, asked, Instant::now()))
    }))
    .await;
    let answers: Vec<(String, WritableAnswer)> = nodes
        .iter()
        .zip(replies)
        .filter_map(|(id, a)| Some((layout.region_of(*id).unwrap_or("").to_string(), a?)))
        .collect();
    let split = answers.iter().enumerate().any(|(i, (ra, a))| {
        answers[i + 1..]
            .iter()
            .any(|(rb, b)| ra != rb && surely_writable_together(a, b))
    });
    WritableNow {
        regions: answers
            .into_iter()
            .filter(|(_, a)| a.writable)
            .map(|(r, _)| r)
            .collect(),
        split,
    }
}

/// The node leading `region`'s hub group (sync mode: the one hub group).
async fn region_leader(cluster: &ChaosCluster, layout: &RegionLayout, region: &str) -> Option<u64> {
    if layout.sync {
        return cluster.hub_leader().await;
    }
    for id in layout.nodes_of(region) {
        if region_status(cluster, id)
            .await
            .is_some_and(|s| s["leader"] == true)
        {
            return Some(id);
        }
    }
    None
}

/// The leader of `region`'s hub group, waiting up to 30 s for one (a step right after another
/// may find an election or a hand-over under way); None only if there is none by then.
async fn wait_region_leader(
    cluster: &ChaosCluster,
    layout: &RegionLayout,
    region: &str,
) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(l) = region_leader(cluster, layout, region).await {
            return Some(l);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The nodes of the data regions (not the witness).
fn data_nodes(layout: &RegionLayout) -> Vec<u64> {
    layout
        .regions
        .iter()
        .filter(|r| !r.2)
        .flat_map(|r| layout.nodes_of(&r.0))
        .collect()
}

/// Waits until the leader of `region` (a secondary) reports a copy lag under 1 s.
async fn wait_caught_up(
    cluster: &ChaosCluster,
    layout: &RegionLayout,
    region: &str,
) -> Option<u64> {
    if layout.sync {
        return Some(0);
    }
    // Every node reports the lag of the copies it makes (hub log on the leader, the partitions
    // it leads).
    // The hub log's lag (on the region's leader) and every partition's (on its leader there).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut hub = None;
        let mut partitions: BTreeMap<String, u64> = BTreeMap::new();
        for id in layout.nodes_of(region) {
            let Some(s) = region_status(cluster, id).await else {
                continue;
            };
            if s["role"] != "secondary" {
                continue;
            }
            if s["leader"] == true {
                hub = s["lagMs"].as_u64();
            }
            for (p, lag) in s["partitionLagMs"].as_object().into_iter().flatten() {
                partitions.insert(p.clone(), lag.as_u64().unwrap_or(u64::MAX));
            }
        }
        let worst = partitions.values().copied().max().unwrap_or(u64::MAX);
        if let Some(h) = hub
            && partitions.len() == cluster.partitions as usize
            && h.max(worst) < 1000
        {
            return Some(h.max(worst));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn failover_api(
    cluster: &ChaosCluster,
    via: u64,
    region: &str,
    force: bool,
) -> Result<Value> {
    let mut c = cluster
        .operator
        .with_addr(cluster.node(via)?.https)
        .with_timeout(Duration::from_secs(120))
        .connect()
        .await?;
    let r = c
        .json(
            "POST",
            "/meridian/region/failover",
            Some(&json!({"region": region, "hubName": "meridian", "force": force})),
        )
        .await?;
    anyhow::ensure!(
        r.status == 200,
        "failover to {region}: {} {}",
        r.status,
        r.json()
    );
    Ok(r.json())
}

/// Runs the regions scenario.
pub async fn regions(opts: &RegionsOptions, dir: &Path) -> Result<RegionsReport> {
    let mut timeline = Timeline::default();
    let layout = opts.cluster.regions.clone().context("a region layout")?;
    let mut cluster = ChaosCluster::start(&opts.cluster, dir).await?;
    let east = layout.nodes_of("east");
    let west = layout.nodes_of("west");
    let arbiter = layout.nodes_of("arbiter");
    timeline.note(format!(
        "{} mode: east {:?}, west {:?}, arbiter {:?}; {} ms WAN delay between regions",
        if opts.sync { "sync" } else { "async" },
        east,
        west,
        arbiter,
        opts.wan_delay.as_millis()
    ));
    wait_primary(&cluster, &layout, "east", Duration::from_secs(60)).await?;
    let primary_client = cluster.service_for(east[0])?;
    let filler: Vec<String> = (0..opts.registered)
        .map(|i| format!("reg-fill-{i}"))
        .collect();
    create_many(&primary_client, &filler).await?;
    let ids: Vec<String> = (0..opts.devices).map(|i| format!("geo-{i}")).collect();
    let devices = create_many(&primary_client, &ids).await?;
    let probes = create_many(&primary_client, &probe_ids("geo-probe", cluster.partitions)).await?;
    let twin_devices: Vec<String> = ids.iter().take(20).cloned().collect();
    let c2d_sinks: Vec<String> = (0..20).map(|i| format!("geo-c2d-{i}")).collect();
    let c2d_sink_keys = create_many(&primary_client, &c2d_sinks).await?;
    timeline.note(format!(
        "{} devices registered",
        opts.registered + opts.devices + probes.len() + c2d_sinks.len()
    ));
    let data_nodes: Vec<u64> = east.iter().chain(&west).copied().collect();
    let mqtt: Vec<SocketAddr> = data_nodes
        .iter()
        .map(|id| cluster.node(*id).map(|n| n.mqtt))
        .collect::<Result<_>>()?;
    let clients: Vec<ServiceClient> = data_nodes
        .iter()
        .map(|id| cluster.service_for(*id))
        .collect::<Result<_>>()?;
    let sdk = if opts.sdk_devices > 0 {
        let ids: Vec<String> = (0..opts.sdk_devices)
            .map(|i| format!("geo-sdk-{i}"))
            .collect();
        let sdk_devices = create_many(&primary_client, &ids).await?;
        Some(SdkLoad::start(&sdk_devices, &mqtt, &cluster.ca, dir).await?)
    } else {
        None
    };
    let telemetry =
        TelemetryLoad::start_paced(devices, mqtt.clone(), &cluster.ca, opts.send_interval);
    let registry = crate::workload::RegistryLoad::start("geo-reg", clients.clone());
    let service = ServiceLoad::start(clients.clone(), twin_devices.clone(), c2d_sinks.clone());
    progress(
        &telemetry.acked,
        opts.warmup_messages,
        Duration::from_secs(120),
    )
    .await
    .with_context(|| cluster.logs(30))?;
    timeline.note(format!(
        "workload running: {} devices + {} SDK devices sending, creates, twin patches, C2D sends",
        opts.devices, opts.sdk_devices
    ));
    let mut steps: Vec<Step> = Vec::new();
    let mut failures = Vec::new();

    // 1-2. Planned failover east → west, then failback west → east (async: demote, copy,
    // promote; sync: leaders move).
    for (target, via, what, name) in [
        (
            "west",
            west[0],
            "planned failover",
            "planned failover east → west",
        ),
        (
            "east",
            east[0],
            "planned failback",
            "planned failback west → east",
        ),
    ] {
        if opts.sync {
            // A planned failover in sync mode only moves leaders (a membership change per group
            // across the WAN); under this load on 2 cores it takes tens of seconds, so it is
            // left to node/tests/regions_sync.rs and not timed here.
            timeline.note(format!("sync mode: {what} not run (leadership moves only)"));
            continue;
        }
        let lag = wait_caught_up(&cluster, &layout, target).await;
        timeline.note(format!("{target}'s copy lag before the step: {lag:?} ms"));
        let trigger = Instant::now();
        let report = failover_api(&cluster, via, target, false).await;
        timeline.note(format!("{what} to {target}: {report:?}"));
        if let Err(e) = &report {
            failures.push(format!("{what}: {e}"));
        }
        let mut r = measure(
            &cluster,
            &layout,
            trigger,
            &probes,
            &telemetry.times,
            opts.devices,
            what,
        )
        .await;
        if let Ok(v) = &report {
            r.notes.push(format!("API answered in {} ms", v["totalMs"]));
        }
        steps.push(Step {
            name: name.into(),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(60)).await?;
    }

    // 3. Region loss: kill -9 every node of the primary region (east in async mode after the
    // failback; in sync mode wherever the leaders are).
    let lost_name = match current_primary(&cluster, &layout).await.as_deref() {
        Some("west") => "west",
        _ => "east",
    };
    let kept_name = if lost_name == "east" { "west" } else { "east" };
    let (lost, kept) = (layout.nodes_of(lost_name), layout.nodes_of(kept_name));
    let lag = wait_caught_up(&cluster, &layout, kept_name).await;
    timeline.note(format!(
        "{kept_name}'s copy lag before the step: {lag:?} ms"
    ));
    let trigger = Instant::now();
    for id in &lost {
        cluster.kill9(*id)?;
    }
    timeline.note(format!(
        "region loss: kill -9 nodes {lost:?} ({lost_name}, the primary)"
    ));
    let took = wait_primary(&cluster, &layout, kept_name, Duration::from_secs(90)).await;
    timeline.note(format!("{kept_name} primary after {took:?}"));
    let mut r = measure(
        &cluster,
        &layout,
        trigger,
        &probes,
        &telemetry.times,
        opts.devices,
        "region loss",
    )
    .await;
    if took.is_err() {
        failures.push("no automatic failover after losing the primary region".into());
    }
    for id in &lost {
        cluster.restart(*id)?;
    }
    for id in &lost {
        cluster.reapply_faults(*id).await?;
    }
    if !opts.sync {
        let mut rejoined = true;
        for id in &lost {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = region_status(&cluster, *id).await;
                if s.as_ref()
                    .is_some_and(|s| s["role"] == "secondary" && s["writable"] == false)
                {
                    break;
                }
                if Instant::now() > deadline {
                    rejoined = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        r.notes.push(format!(
            "{lost_name} restarted: {}",
            if rejoined {
                "rejoined as secondary, refuses writes"
            } else {
                "did NOT rejoin as secondary"
            }
        ));
        if !rejoined {
            failures.push("the old primary did not rejoin as secondary".into());
        }
    }
    timeline.note(format!("{lost_name} restarted"));
    steps.push(Step {
        name: "region loss (kill -9 of the primary region)".into(),
        trigger,
        result: r,
    });
    progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;

    // 4. Partition: cut the primary region (kept) off from the others; clients reach everyone.
    let mut two_primaries = 0usize;
    let mut samples = 0usize;
    if opts.cluster.netns {
        let lag = wait_caught_up(&cluster, &layout, lost_name).await;
        timeline.note(format!(
            "{lost_name}'s copy lag before the step: {lag:?} ms"
        ));
        let trigger = Instant::now();
        let others: Vec<u64> = lost.iter().chain(&arbiter).copied().collect();
        for w in &kept {
            for o in &others {
                cluster.cut(*w, *o)?;
            }
        }
        timeline.note(format!(
            "partition: {kept_name} (the primary) cut off from {lost_name} and the arbiter"
        ));
        // Sample every node's writability until lost is primary and a while after.
        let mut east_since: Option<Instant> = None;
        while trigger.elapsed() < Duration::from_secs(60) {
            // Sync mode has no region fencing to sample: a cut-off minority of voters cannot
            // commit (Raft), which the loss check confirms.
            let (writable_regions, split) = if opts.sync {
                (std::collections::BTreeSet::new(), false)
            } else {
                let now = writable_regions_now(&cluster, &layout).await;
                (now.regions, now.split)
            };
            samples += 1;
            if split {
                two_primaries += 1;
            }
            let east_primary = if opts.sync {
                current_primary(&cluster, &layout).await.as_deref() == Some(lost_name)
            } else {
                writable_regions.contains(lost_name)
            };
            if east_primary && east_since.is_none() {
                east_since = Some(Instant::now());
            }
            if east_since.is_some_and(|t| t.elapsed() > Duration::from_secs(4)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut r = measure(
            &cluster,
            &layout,
            trigger,
            &probes,
            &telemetry.times,
            opts.devices,
            "partition",
        )
        .await;
        r.notes.push(format!(
            "{samples} status samples, {two_primaries} with two writable regions"
        ));
        for w in &kept {
            for o in &others {
                cluster.heal(*w, *o)?;
            }
        }
        timeline.note(format!(
            "healed; {lost_name} primary {:?} after the cut",
            east_since.map(|t| t - trigger)
        ));
        if east_since.is_none() {
            failures.push("no failover while the primary region was cut off".into());
        }
        if !opts.sync {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut demoted = false;
            while Instant::now() < deadline {
                let mut all = true;
                for w in &kept {
                    all &= region_status(&cluster, *w)
                        .await
                        .is_some_and(|s| s["role"] == "secondary" && s["writable"] == false);
                }
                if all {
                    demoted = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r.notes.push(format!(
                "after healing {kept_name} {}",
                if demoted {
                    format!("follows {lost_name} and refuses writes")
                } else {
                    "did NOT demote".into()
                }
            ));
            if !demoted {
                failures.push("the cut-off old primary did not demote after healing".into());
            }
        }
        steps.push(Step {
            name: "partition: primary region cut off".into(),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;
    }

    // 5-9. Faults that must not move the primary (or, for a region that loses its quorum, move
    // it safely): a cut between the data regions only, the primary's hub leader cut off,
    // paused, a crash-restart of one of its nodes, and its wall clock skewed.
    let lease_wait = Duration::from_millis(GRACE_MS + 2 * LEASE_MS);
    let nodes_of_primary = |primary: &str| layout.nodes_of(primary);
    if opts.cluster.netns {
        let before = current_primary(&cluster, &layout).await.unwrap_or_default();
        let trigger = Instant::now();
        for e in &east {
            for w in &west {
                cluster.cut(*e, *w)?;
            }
        }
        timeline.note("partition between the data regions only (the arbiter reaches both)");
        let (mut r, sampled) = tokio::join!(
            measure(
                &cluster,
                &layout,
                trigger,
                &probes,
                &telemetry.times,
                opts.devices,
                "data regions cut"
            ),
            sample_writable(&cluster, &layout, lease_wait + Duration::from_secs(2)),
        );
        for e in &east {
            for w in &west {
                cluster.heal(*e, *w)?;
            }
        }
        let after = current_primary(&cluster, &layout).await.unwrap_or_default();
        r.notes.push(sampled.describe(&before));
        if !opts.sync && after != before {
            failures.push(format!(
                "a cut between the data regions alone moved the primary from {before} to {after}"
            ));
        }
        (samples, two_primaries) = sampled.add_to(samples, two_primaries);
        steps.push(Step {
            name: "partition between the data regions (arbiter reaches both)".into(),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;

        let primary = current_primary(&cluster, &layout).await.unwrap_or_default();
        let leader = wait_region_leader(&cluster, &layout, &primary).await;
        if leader.is_none() {
            failures.push(format!(
                "no hub leader in {primary} to cut off within 30 s: step not run"
            ));
        }
        if let Some(leader) = leader {
            let trigger = Instant::now();
            cluster.isolate(leader)?;
            timeline.note(format!(
                "node {leader} ({primary}'s hub leader) cut off from every node"
            ));
            let (mut r, sampled) = tokio::join!(
                measure(
                    &cluster,
                    &layout,
                    trigger,
                    &probes,
                    &telemetry.times,
                    opts.devices,
                    "leader cut off"
                ),
                sample_writable(&cluster, &layout, lease_wait + Duration::from_secs(2)),
            );
            cluster.rejoin(leader)?;
            r.notes.push(sampled.describe(&primary));
            r.notes.push(format!(
                "node {leader} cut off; primary afterwards: {}",
                r.new_primary
            ));
            (samples, two_primaries) = sampled.add_to(samples, two_primaries);
            steps.push(Step {
                name: format!("primary's hub leader (node {leader}) cut off"),
                trigger,
                result: r,
            });
            progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;
        }
    }
    let primary = current_primary(&cluster, &layout).await.unwrap_or_default();
    let leader = wait_region_leader(&cluster, &layout, &primary).await;
    if leader.is_none() {
        failures.push(format!(
            "no hub leader in {primary} to pause within 30 s: step not run"
        ));
    }
    if let Some(leader) = leader {
        let pause = Duration::from_millis(GRACE_MS / 2);
        let trigger = Instant::now();
        cluster.pause(leader)?;
        timeline.note(format!(
            "SIGSTOP node {leader} ({primary}'s hub leader) for {pause:?}"
        ));
        let (mut r, sampled, resumed) = tokio::join!(
            measure(
                &cluster,
                &layout,
                trigger,
                &probes,
                &telemetry.times,
                opts.devices,
                "leader paused"
            ),
            sample_writable(&cluster, &layout, pause + Duration::from_secs(3)),
            async {
                tokio::time::sleep(pause).await;
                cluster.resume(leader)
            },
        );
        resumed?;
        r.notes.push(sampled.describe(&primary));
        (samples, two_primaries) = sampled.add_to(samples, two_primaries);
        steps.push(Step {
            name: format!(
                "primary's hub leader (node {leader}) paused {:.1} s",
                pause.as_secs_f64()
            ),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;
    }
    let primary = current_primary(&cluster, &layout).await.unwrap_or_default();
    let leader = wait_region_leader(&cluster, &layout, &primary).await;
    // A follower if there is one (the leader was paused above).
    if let Some(victim) = nodes_of_primary(&primary)
        .into_iter()
        .find(|n| Some(*n) != leader)
        .or(leader)
    {
        let trigger = Instant::now();
        cluster.restart(victim)?;
        timeline.note(format!("kill -9 and restart of node {victim} in {primary}"));
        let (mut r, reapplied) = tokio::join!(
            measure(
                &cluster,
                &layout,
                trigger,
                &probes,
                &telemetry.times,
                opts.devices,
                "node crash-restart",
            ),
            cluster.reapply_faults(victim),
        );
        reapplied?;
        r.notes.push(format!(
            "node {victim} of {primary} killed (-9) and restarted at once"
        ));
        steps.push(Step {
            name: format!("node {victim} of the primary region killed and restarted"),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;
    }
    let primary = current_primary(&cluster, &layout).await.unwrap_or_default();
    if let Some(leader) = region_leader(&cluster, &layout, &primary).await {
        let skewed: Vec<(u64, i64)> = std::iter::once((leader, 300_000))
            .chain(
                data_nodes
                    .iter()
                    .copied()
                    .find(|n| *n != leader)
                    .map(|n| (n, -300_000)),
            )
            .collect();
        let trigger = Instant::now();
        for (id, ms) in &skewed {
            cluster.set_clock_skew(*id, *ms).await?;
        }
        timeline.note(format!("wall clocks skewed (node, ms): {skewed:?}"));
        let (mut r, sampled) = tokio::join!(
            measure(
                &cluster,
                &layout,
                trigger,
                &probes,
                &telemetry.times,
                opts.devices,
                "clock skew"
            ),
            sample_writable(&cluster, &layout, lease_wait),
        );
        for (id, _) in &skewed {
            cluster.set_clock_skew(*id, 0).await?;
        }
        let after = current_primary(&cluster, &layout).await.unwrap_or_default();
        r.notes.push(sampled.describe(&primary));
        if after != primary {
            failures.push(format!(
                "clock skew moved the primary from {primary} to {after}"
            ));
        }
        (samples, two_primaries) = sampled.add_to(samples, two_primaries);
        steps.push(Step {
            name: "wall clocks skewed ±5 min (primary's hub leader ahead, another node behind)"
                .into(),
            trigger,
            result: r,
        });
        progress(&telemetry.acked, 500, Duration::from_secs(90)).await?;
    }
    if two_primaries > 0 {
        failures.push(format!("{two_primaries} samples saw two writable regions"));
    }

    // Stop and check.
    let ack_times = telemetry.times.clone();
    let mut acked = telemetry.stop().await?;
    if let Some(sdk) = sdk {
        let sdk_acked = sdk.stop().await?;
        let count: usize = sdk_acked.values().map(Vec::len).sum();
        timeline.note(format!(
            "official SDK devices: {count} messages acknowledged across the failovers"
        ));
        if count == 0 {
            failures.push("the SDK devices got nothing acknowledged".into());
        }
        acked.extend(sdk_acked);
    }
    let created = registry.stop_with_times().await;
    let (twins, c2d) = service.stop().await;
    timeline.note("workload stopped; checking against the final primary");
    let final_primary = current_primary(&cluster, &layout).await.unwrap_or_default();
    let data_grpc: Vec<SocketAddr> = data_nodes
        .iter()
        .map(|id| cluster.node(*id).map(|n| n.grpc))
        .collect::<Result<_>>()?;
    if let Err(e) = checker::wait_converged(&data_grpc, Duration::from_secs(90)).await {
        failures.push(e.to_string());
    }
    let mut replicas = Vec::new();
    for g in &data_grpc {
        replicas.push(checker::read_all(*g).await?);
    }
    let telemetry_check = check_telemetry(&acked, &replicas);
    if !telemetry_check.replicas_identical {
        let mut detail = String::new();
        for (i, r) in replicas.iter().enumerate().skip(1) {
            if let Some(k) =
                (0..r.len().max(replicas[0].len())).find(|k| r.get(*k) != replicas[0].get(*k))
            {
                detail.push_str(&format!(
                    " node {} vs node {}: {} vs {} records, first difference at #{k}: {:?} vs {:?};",
                    data_nodes[0],
                    data_nodes[i],
                    replicas[0].len(),
                    r.len(),
                    replicas[0].get(k),
                    r.get(k)
                ));
            }
        }
        failures.push(format!("the regions hold different telemetry:{detail}"));
    }
    if telemetry_check.out_of_order_devices > 0 {
        failures.push(format!(
            "{} devices out of order: {}",
            telemetry_check.out_of_order_devices,
            telemetry_check.out_of_order_examples.join("; ")
        ));
    }
    // Lost acknowledged operations, by type, with their acknowledgement times.
    let mut lost: BTreeMap<&str, Vec<Instant>> = BTreeMap::new();
    {
        let stored: std::collections::BTreeSet<(String, u64)> = replicas
            .first()
            .into_iter()
            .flatten()
            .map(|m| (m.2.clone(), m.3))
            .collect();
        let t = ack_times.lock().map(|t| t.clone()).unwrap_or_default();
        let mut sdk_lost = 0usize;
        for (device, seqs) in &acked {
            for (i, seq) in seqs.iter().enumerate() {
                if !stored.contains(&(device.clone(), *seq)) {
                    // The SDK devices report no acknowledgement times: counted, not attributed.
                    match t.get(device).and_then(|v| v.get(i)).copied() {
                        Some(at) => lost.entry("telemetry").or_default().push(at),
                        None => sdk_lost += 1,
                    }
                }
            }
        }
        timeline.note(format!(
            "official SDK devices: {sdk_lost} acknowledged messages lost over all steps"
        ));
    }
    let final_node = layout
        .nodes_of(&final_primary)
        .first()
        .copied()
        .unwrap_or(east[0]);
    let mut c = cluster.service_for(final_node)?.connect().await?;
    for (id, at) in &created {
        if c.json("GET", &format!("/devices/{id}"), None).await?.status != 200 {
            lost.entry("registry").or_default().push(*at);
        }
    }
    let mut desired: BTreeMap<String, u64> = BTreeMap::new();
    for d in &twin_devices {
        let r = c.json("GET", &format!("/twins/{d}"), None).await?;
        desired.insert(
            d.clone(),
            r.json()["properties"]["desired"]["n"].as_u64().unwrap_or(0),
        );
    }
    // A patch is lost when the twin does not reflect it (an older value is there).
    for (d, n, at) in &twins {
        if desired.get(d).copied().unwrap_or(0) < *n {
            lost.entry("twins").or_default().push(*at);
        }
    }
    // Each C2D sink device connects once at the end and receives its queue: an acknowledged send
    // is lost when its body (`{"n": k}`) is not among what the device receives.
    let sink_keys = c2d_sink_keys.clone();
    let final_mqtt = cluster.node(final_node)?.mqtt;
    let mut received: std::collections::BTreeSet<(String, u64)> = std::collections::BTreeSet::new();
    for (d, key) in &sink_keys {
        let bodies = meridian::client::device::receive_c2d_bodies(
            final_mqtt,
            &cluster.ca,
            d,
            key,
            Duration::from_secs(5),
        )
        .await?;
        for b in bodies {
            if let Some(n) = serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v["n"].as_u64())
            {
                received.insert((d.clone(), n));
            }
        }
    }
    for (d, n, at) in &c2d {
        if !received.contains(&(d.clone(), *n)) {
            lost.entry("c2d").or_default().push(*at);
            eprintln!(
                "lost C2D: {d} n={n}, acknowledged {:.3} s before this check; {d} received {:?}",
                at.elapsed().as_secs_f64(),
                received
                    .iter()
                    .filter(|(x, _)| x == d)
                    .map(|(_, k)| *k)
                    .collect::<Vec<_>>()
            );
        }
    }
    // Attribute each loss to the first step triggered after it was acknowledged.
    for step in &mut steps {
        for ty in ["telemetry", "registry", "twins", "c2d"] {
            step.result.loss.insert(ty.into(), Loss::default());
        }
    }
    // Attribute each loss to the step nearest to its acknowledgement: what the old primary
    // acknowledged before the trigger and had not copied, or after it while its lease ran. The
    // seconds are the span of acknowledged history lost.
    let mut spans: BTreeMap<(usize, &str), (Instant, Instant)> = BTreeMap::new();
    for (ty, ats) in &lost {
        for at in ats {
            let distance = |s: &Step| {
                if s.trigger >= *at {
                    s.trigger - *at
                } else {
                    *at - s.trigger
                }
            };
            let Some((i, _)) = steps.iter().enumerate().min_by_key(|(_, s)| distance(s)) else {
                continue;
            };
            let span = spans.entry((i, *ty)).or_insert((*at, *at));
            span.0 = span.0.min(*at);
            span.1 = span.1.max(*at);
            if let Some(l) = steps[i].result.loss.get_mut(*ty) {
                l.lost += 1;
            }
        }
    }
    for ((i, ty), (from, to)) in spans {
        let trigger = steps[i].trigger;
        let rel = |t: Instant| {
            if t >= trigger {
                (t - trigger).as_secs_f64()
            } else {
                -(trigger - t).as_secs_f64()
            }
        };
        if let Some(l) = steps[i].result.loss.get_mut(ty) {
            l.seconds = (to - from).as_secs_f64().max(0.001);
            l.window = (rel(from), rel(to));
        }
    }
    let total_lost: usize = lost.values().map(Vec::len).sum();
    if opts.sync && total_lost > 0 {
        failures.push(format!(
            "sync mode lost {total_lost} acknowledged operations"
        ));
    }
    for s in &steps {
        if s.name.starts_with("planned") {
            let l: usize = s.result.loss.values().map(|l| l.lost).sum();
            if l > 0 {
                failures.push(format!("{}: {l} acknowledged operations lost", s.name));
            }
        }
        if s.result.rto_telemetry_ms.is_none() || s.result.rto_registry_ms.is_none() {
            failures.push(format!(
                "{}: no recovery measured ({})",
                s.name,
                s.result.notes.join("; ")
            ));
        }
    }
    let acknowledged = BTreeMap::from([
        ("telemetry".to_string(), telemetry_check.acked),
        ("registry".to_string(), created.len()),
        ("twins".to_string(), twins.len()),
        ("c2d".to_string(), c2d.len()),
    ]);
    timeline.note(format!(
        "checked: acknowledged {acknowledged:?}; lost {:?}",
        lost.iter()
            .map(|(k, v)| (*k, v.len()))
            .collect::<BTreeMap<_, _>>()
    ));
    Ok(RegionsReport {
        scenario: if opts.sync {
            "regions-sync".into()
        } else {
            "regions-async".into()
        },
        layout: format!(
            "east {n} + west {n} + arbiter 1 ({})",
            if opts.sync {
                "tie-breaker voter"
            } else {
                "witness"
            },
            n = opts.nodes_per_region
        ),
        wan_delay_ms: opts.wan_delay.as_millis() as u64,
        registered: opts.registered
            + opts.devices
            + opts.sdk_devices
            + probes.len()
            + c2d_sinks.len(),
        devices: opts.devices,
        sdk_devices: opts.sdk_devices,
        send_interval_ms: opts.send_interval.as_millis() as u64,
        steps: steps.into_iter().map(|s| s.result).collect(),
        acknowledged,
        telemetry: telemetry_check,
        two_primaries_samples: two_primaries,
        partition_samples: samples,
        passed: failures.is_empty(),
        failures,
        duration_secs: timeline.elapsed_secs(),
        timeline: timeline.events(),
    })
}

fn opt_ms(v: Option<u64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} s", v as f64 / 1000.0))
}

impl RegionsReport {
    /// The report as Markdown, with Azure IoT Hub's documented figures next to the measured ones.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# Regions run: {}\n\n{}; {} ms WAN delay between regions (one way, in the nodes' transport); \
             {} devices registered, {} Rust devices{} + {} official Python SDK devices connected and \
             sending; registry creates, twin desired patches and C2D sends running throughout. \
             {:.0} s. Verdict: **{}**.\n\n",
            self.scenario,
            self.layout,
            self.wan_delay_ms,
            self.registered,
            self.devices,
            if self.send_interval_ms > 0 {
                format!(" (one message every {} ms each)", self.send_interval_ms)
            } else {
                " (as fast as acknowledged)".to_string()
            },
            self.sdk_devices,
            self.duration_secs,
            if self.passed { "passed" } else { "FAILED" }
        );
        md.push_str("## RTO and RPO per step\n\n| step | new primary | RTO: device sends (all partitions) | RTO: registry write | RTO: all devices sending | RPO telemetry | RPO registry | RPO twins | RPO C2D | notes |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for s in &self.steps {
            let loss = |t: &str| {
                s.loss.get(t).map_or("–".into(), |l| {
                    if l.lost == 0 {
                        "0".to_string()
                    } else {
                        format!(
                            "{} lost: {:.2} s of history (acknowledged {:+.2} s to {:+.2} s around the trigger)",
                            l.lost, l.seconds, l.window.0, l.window.1
                        )
                    }
                })
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.step,
                s.new_primary,
                opt_ms(s.rto_telemetry_ms),
                opt_ms(s.rto_registry_ms),
                opt_ms(s.rto_all_devices_ms),
                loss("telemetry"),
                loss("registry"),
                loss("twins"),
                loss("c2d"),
                s.notes.join("; ")
            ));
        }
        md.push_str(&format!(
            "\nAcknowledged over the run: {}. Telemetry: {} acknowledged, {} stored, {} duplicates (same \
             message id), {} devices out of order, regions identical: {}. Two writable regions seen in \
             {} of {} status samples during the partition.\n",
            self.acknowledged.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
            self.telemetry.acked,
            self.telemetry.stored,
            self.telemetry.duplicates,
            self.telemetry.out_of_order_devices,
            self.telemetry.replicas_identical,
            self.two_primaries_samples,
            self.partition_samples
        ));
        md.push_str(
            "\n## Azure IoT Hub, as documented (seed: \"IoT Hub high availability and disaster recovery\")\n\n\
             | | Azure IoT Hub | Meridian (this run) |\n|---|---|---|\n\
             | RPO, registry / twins / C2D | 0–5 min of data loss | see the table above (0 for planned failovers and in sync mode) |\n\
             | RPO, telemetry | all unread telemetry lost; the endpoint changes, readers lose offsets | only what the secondary had not copied (async) or nothing (sync); same offsets, same endpoint names, checkpoints kept |\n\
             | RTO, manual failover | 10 min – 2 h | see \"planned failover\" above |\n\
             | RTO, Microsoft-initiated (automatic) failover | 2 – 26 h | see \"region loss\" above (grace time 4 s included) |\n\
             | failovers allowed | 2 failovers and 2 failbacks a day | configurable caps, off by default |\n",
        );
        if !self.failures.is_empty() {
            md.push_str("\nFailures:\n");
            for f in &self.failures {
                md.push_str(&format!("- {f}\n"));
            }
        }
        md.push_str("\nTimeline:\n\n");
        for (at, e) in &self.timeline {
            md.push_str(&format!("- {:.1} s: {e}\n", *at as f64 / 1000.0));
        }
        md
    }

    /// Writes `{scenario}.json` and `{scenario}.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(format!("{}.json", self.scenario)),
            serde_json::to_vec_pretty(self)?,
        )?;
        std::fs::write(dir.join(format!("{}.md", self.scenario)), self.markdown())?;
        Ok(())
    }
}
