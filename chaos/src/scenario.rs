//! Scenarios: a workload, a sequence of nemeses, then the checker.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use meridian::client::device::{ConnAckCode, RawMqtt, device_token};
use serde_json::json;

use crate::checker::{self, check_registry, check_telemetry};
use crate::cluster::{ChaosCluster, ClusterOptions};
use crate::report::{NemesisResult, Report, Timeline};
use crate::workload::{
    RegistryLoad, SdkLoad, TelemetryLoad, all_partitions_writable, create_many, probe_ids,
    progress, registry_writable,
};

/// Settings of [`cluster_nemeses`].
#[derive(Debug, Clone)]
pub struct NemesesOptions {
    /// The cluster.
    pub cluster: ClusterOptions,
    /// Telemetry devices (Rust load generator).
    pub devices: usize,
    /// Devices run by the official Python SDK (0: none).
    pub sdk_devices: usize,
    /// Messages to see acknowledged before the first nemesis.
    pub warmup_messages: usize,
    /// How long a paused node stays paused.
    pub pause: Duration,
}

/// Median latency of `n` sequential creates through `client`.
async fn create_latency(
    client: &meridian::client::ServiceClient,
    prefix: &str,
    n: usize,
) -> Option<Duration> {
    let mut c = client.connect().await.ok()?;
    let mut times = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let started = Instant::now();
        let r = c
            .json(
                "PUT",
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await
            .ok()?;
        if r.status == 200 {
            times.push(started.elapsed());
        }
    }
    times.sort_unstable();
    times.get(times.len() / 2).copied()
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis() as u64)
}

/// The cluster scenario of the cluster issue: under telemetry load and registry writes, kill -9
/// the node leading the most partitions and restart it; then the same with another node; SIGSTOP
/// the hub leader for a while; isolate the hub leader from the other nodes (a minority of one),
/// checking it PUBACKs nothing and commits no registry write while the majority goes on; heal.
/// Then every acknowledged message and create must be on every node, in order, replicas equal.
pub async fn cluster_nemeses(opts: &NemesesOptions, dir: &Path) -> Result<Report> {
    let mut timeline = Timeline::default();
    let mut cluster = ChaosCluster::start(&opts.cluster, dir).await?;
    let n = cluster.nodes.len() as u64;
    timeline.note(format!("{n} nodes up, every partition has a leader"));
    let ids: Vec<String> = (0..opts.devices).map(|i| format!("chaos-{i}")).collect();
    let devices = create_many(&cluster.service, &ids).await?;
    let probe_key = create_many(&cluster.service, &["chaos-probe".to_string()])
        .await?
        .remove(0)
        .1;
    // One device per partition measures "every partition writable again".
    let probes = create_many(&cluster.service, &probe_ids("chaos-pp", cluster.partitions)).await?;
    let mqtt: Vec<_> = cluster.nodes.iter().map(|n| n.mqtt).collect();
    let sdk = if opts.sdk_devices > 0 {
        let ids: Vec<String> = (0..opts.sdk_devices)
            .map(|i| format!("chaos-sdk-{i}"))
            .collect();
        let sdk_devices = create_many(&cluster.service, &ids).await?;
        let load = SdkLoad::start(&sdk_devices, &mqtt, &cluster.ca, dir).await?;
        timeline.note(format!(
            "{} official Python SDK devices connected",
            opts.sdk_devices
        ));
        Some(load)
    } else {
        None
    };
    let telemetry = TelemetryLoad::start(devices, mqtt, &cluster.ca);
    let clients = (1..=n)
        .map(|id| cluster.service_for(id))
        .collect::<Result<Vec<_>>>()?;
    let registry = RegistryLoad::start("chaos-reg", clients);
    progress(
        &telemetry.acked,
        opts.warmup_messages,
        Duration::from_secs(120),
    )
    .await
    .with_context(|| cluster.logs(30))?;
    timeline.note(format!(
        "workload running: {} devices publishing, registry writer creating",
        opts.devices
    ));

    let mut nemeses = Vec::new();
    let mut failures = Vec::new();
    let all: Vec<u64> = (1..=n).collect();

    // 1-2: kill -9 the busiest partition leader, twice (a different node the second time).
    let mut killed: Vec<u64> = Vec::new();
    for _ in 0..2 {
        let candidates: Vec<u64> = all
            .iter()
            .copied()
            .filter(|i| !killed.contains(i))
            .collect();
        let victim = cluster
            .busiest_partition_leader(&candidates)
            .await
            .context("no partition leader")?;
        let leaders = cluster.partition_leaders().await;
        let led = leaders.iter().filter(|l| **l == Some(victim)).count();
        let survivor_id = all.iter().copied().find(|i| *i != victim).unwrap_or(1);
        let survivor = cluster.node(survivor_id)?.mqtt;
        let survivor_api = cluster.service_for(survivor_id)?;
        cluster.kill9(victim)?;
        let trigger = Instant::now();
        timeline.note(format!(
            "kill -9 node {victim} (leads {led} of {} partitions)",
            leaders.len()
        ));
        let probe_id = format!("chaos-kill-{victim}-{}", killed.len());
        let (telemetry_took, registry_took) = tokio::join!(
            all_partitions_writable(
                std::slice::from_ref(&survivor),
                &cluster.ca,
                &probes,
                trigger,
                Duration::from_secs(30)
            ),
            registry_writable(
                std::slice::from_ref(&survivor_api),
                &probe_id,
                trigger,
                Duration::from_secs(30)
            ),
        );
        if let Err(e) = &telemetry_took {
            failures.push(format!(
                "partitions not writable 30 s after killing node {victim}: {e:#}"
            ));
        }
        timeline.note(format!(
            "every partition writable again after {:?}, registry after {registry_took:?}",
            telemetry_took.as_ref().ok()
        ));
        cluster.restart(victim)?;
        timeline.note(format!("node {victim} restarted"));
        tokio::time::sleep(Duration::from_secs(4)).await;
        nemeses.push(NemesisResult {
            nemesis: "kill -9, restart".into(),
            node: victim,
            why: format!("leads {led} partitions"),
            telemetry_recovery_ms: ms(telemetry_took.ok()),
            registry_recovery_ms: ms(registry_took.ok()),
            notes: Vec::new(),
        });
        killed.push(victim);
    }

    // 3: SIGSTOP the hub leader.
    let leader = cluster.hub_leader().await.context("no hub leader")?;
    let survivor_id = all.iter().copied().find(|i| *i != leader).unwrap_or(1);
    let survivor = cluster.node(survivor_id)?.mqtt;
    let survivor_api = cluster.service_for(survivor_id)?;
    cluster.pause(leader)?;
    let paused = Instant::now();
    timeline.note(format!(
        "SIGSTOP node {leader} (hub leader) for {:?}",
        opts.pause
    ));
    let (telemetry_took, registry_took) = tokio::join!(
        all_partitions_writable(
            std::slice::from_ref(&survivor),
            &cluster.ca,
            &probes,
            paused,
            Duration::from_secs(30)
        ),
        registry_writable(
            std::slice::from_ref(&survivor_api),
            "chaos-paused",
            paused,
            Duration::from_secs(30)
        ),
    );
    tokio::time::sleep(opts.pause.saturating_sub(paused.elapsed())).await;
    cluster.resume(leader)?;
    timeline.note(format!("SIGCONT node {leader}"));
    if let Err(e) = &registry_took {
        failures.push(format!(
            "no registry write while node {leader} was paused: {e}"
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    nemeses.push(NemesisResult {
        nemesis: "SIGSTOP, SIGCONT".into(),
        node: leader,
        why: "hub leader".into(),
        telemetry_recovery_ms: ms(telemetry_took.ok()),
        registry_recovery_ms: ms(registry_took.ok()),
        notes: Vec::new(),
    });

    // 4: WAN-like latency: the hub leader's node-to-node calls take 100 ms longer for a while.
    {
        let leader = cluster.hub_leader().await.context("no hub leader")?;
        let follower = all.iter().copied().find(|i| *i != leader).unwrap_or(1);
        let client = cluster.service_for(follower)?;
        let before = create_latency(&client, "chaos-lat-a", 10).await;
        cluster
            .set_peer_delay(leader, Duration::from_millis(100))
            .await?;
        timeline.note(format!(
            "node {leader} (hub leader): +100 ms on its node-to-node calls"
        ));
        let during = create_latency(&client, "chaos-lat-b", 10).await;
        let flowing = progress(&telemetry.acked, 200, Duration::from_secs(20)).await;
        cluster.set_peer_delay(leader, Duration::ZERO).await?;
        timeline.note(format!("node {leader}: latency removed"));
        if flowing.is_err() {
            failures.push("telemetry stalled while the leader was slow".into());
        }
        nemeses.push(NemesisResult {
            nemesis: "+100 ms on the leader's node-to-node calls".into(),
            node: leader,
            why: "hub leader".into(),
            telemetry_recovery_ms: None,
            registry_recovery_ms: None,
            notes: vec![format!(
                "registry create p50 through a follower: {} ms before, {} ms during",
                before.map_or("–".into(), |d| d.as_millis().to_string()),
                during.map_or("–".into(), |d| d.as_millis().to_string())
            )],
        });
    }

    // 5: isolate the hub leader (needs namespaces).
    if opts.cluster.netns {
        let leader = cluster.hub_leader().await.context("no hub leader")?;
        let token = device_token("localhost", "chaos-probe", &probe_key, 600)?;
        let (mut probe, code, _) = RawMqtt::connect(
            cluster.node(leader)?.mqtt,
            &cluster.ca,
            "chaos-probe",
            &token,
            true,
            120,
        )
        .await?;
        anyhow::ensure!(code == ConnAckCode::Success, "probe connect: {code:?}");
        cluster.isolate(leader)?;
        let cut = Instant::now();
        timeline.note(format!(
            "isolate node {leader} (hub leader) from the other nodes"
        ));
        let minority_client = cluster.service_for(leader)?;
        let minority_write = tokio::spawn(async move {
            let mut c = minority_client.connect().await?;
            let r = c
                .json(
                    "PUT",
                    "/devices/chaos-minority",
                    Some(&json!({"deviceId": "chaos-minority"})),
                )
                .await?;
            Ok::<u16, anyhow::Error>(r.status)
        });
        let minority_puback = tokio::spawn(async move {
            probe
                .publish_acked(
                    "devices/chaos-probe/messages/events/%24.mid=chaos-probe-1&seq=1",
                    b"1",
                    9,
                    Duration::from_secs(12),
                )
                .await
                .unwrap_or(false)
        });
        let majority = all.iter().copied().find(|i| *i != leader).unwrap_or(1);
        let majority_client = cluster.service_for(majority)?;
        let mut registry_took = None;
        while cut.elapsed() < Duration::from_secs(30) {
            if let Ok(mut c) = majority_client.connect().await
                && let Ok(r) = c
                    .json(
                        "PUT",
                        "/devices/chaos-majority",
                        Some(&json!({"deviceId": "chaos-majority"})),
                    )
                    .await
                && r.status == 200
            {
                registry_took = Some(cut.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let telemetry_took = progress(&telemetry.acked, 500, Duration::from_secs(30)).await;
        let acked_on_minority = minority_puback.await?;
        let minority_status = minority_write.await?;
        let minority_committed = matches!(minority_status, Ok(200));
        let mut notes = vec![
            format!(
                "minority PUBACK: {}",
                if acked_on_minority { "YES" } else { "none" }
            ),
            format!(
                "minority registry write: {}",
                match &minority_status {
                    Ok(s) => format!("HTTP {s}"),
                    Err(e) => format!("{e}"),
                }
            ),
        ];
        if acked_on_minority {
            failures.push("the isolated minority PUBACKed a message".into());
        }
        if minority_committed {
            failures.push("the isolated minority answered a registry write with 200".into());
        }
        if registry_took.is_none() {
            failures.push("the majority took no registry write within 30 s".into());
        }
        cluster.rejoin(leader)?;
        timeline.note(format!("healed: node {leader} rejoined"));
        tokio::time::sleep(Duration::from_secs(3)).await;
        // After healing the minority's write must not exist anywhere.
        for id in &all {
            let mut c = cluster.service_for(*id)?.connect().await?;
            let status = c.json("GET", "/devices/chaos-minority", None).await?.status;
            if status != 404 {
                failures.push(format!(
                    "node {id} has the minority's write (HTTP {status})"
                ));
            }
        }
        notes.push("after healing the minority's write exists nowhere".into());
        nemeses.push(NemesisResult {
            nemesis: "isolate (network partition), heal".into(),
            node: leader,
            why: "hub leader: a minority of one".into(),
            telemetry_recovery_ms: telemetry_took.ok().map(|d| d.as_millis() as u64),
            registry_recovery_ms: ms(registry_took),
            notes,
        });
    }

    let mut acked = telemetry.stop().await?;
    if let Some(sdk) = sdk {
        let sdk_acked = sdk.stop().await?;
        let count: usize = sdk_acked.values().map(Vec::len).sum();
        timeline.note(format!(
            "official SDK devices: {count} messages acknowledged by {} devices",
            sdk_acked.len()
        ));
        if count == 0 {
            failures.push("the SDK devices got nothing acknowledged".into());
        }
        acked.extend(sdk_acked);
    }
    let created = registry.stop().await;
    timeline.note("workload stopped; checking");
    let grpcs: Vec<_> = cluster.nodes.iter().map(|n| n.grpc).collect();
    if let Err(e) = checker::wait_converged(&grpcs, Duration::from_secs(60)).await {
        failures.push(e.to_string());
    }
    let mut replicas = Vec::new();
    for g in &grpcs {
        replicas.push(checker::read_all(*g).await?);
    }
    let telemetry_check = check_telemetry(&acked, &replicas);
    let clients: Vec<_> = all
        .iter()
        .map(|id| Ok((*id, cluster.service_for(*id)?)))
        .collect::<Result<_>>()?;
    let registry_check = check_registry(&created, &clients).await?;
    if telemetry_check.lost > 0 {
        failures.push(format!("{} PUBACKed messages lost", telemetry_check.lost));
    }
    if telemetry_check.out_of_order_devices > 0 {
        failures.push(format!(
            "{} devices out of order: {}",
            telemetry_check.out_of_order_devices,
            telemetry_check.out_of_order_examples.join("; ")
        ));
    }
    if !telemetry_check.replicas_identical {
        failures.push("replicas hold different telemetry".into());
    }
    if registry_check.lost > 0 {
        failures.push(format!(
            "{} acknowledged creates missing",
            registry_check.lost
        ));
    }
    timeline.note(format!(
        "checked: {} messages acked, {} lost, {} duplicates; {} creates acked, {} lost",
        telemetry_check.acked,
        telemetry_check.lost,
        telemetry_check.duplicates,
        registry_check.acked,
        registry_check.lost
    ));
    Ok(Report {
        scenario: if opts.cluster.netns {
            "cluster-nemeses".into()
        } else {
            "cluster-nemeses-loopback".into()
        },
        nodes: cluster.nodes.len(),
        devices: opts.devices,
        sdk_devices: opts.sdk_devices,
        partitions: cluster.partitions,
        replication_factor: opts.cluster.replication_factor,
        netns: opts.cluster.netns,
        duration_secs: timeline.elapsed_secs(),
        timeline: timeline.events(),
        nemeses,
        telemetry: telemetry_check,
        registry: registry_check,
        passed: failures.is_empty(),
        failures,
    })
}
