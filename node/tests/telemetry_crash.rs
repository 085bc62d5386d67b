//! kill -9 the node while 100 devices stream telemetry: after a restart, every message that was
//! PUBACKed is in the partition log exactly once, and each device's messages are in send order.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::start_dev;
use meridian::client::device::{RawMqtt, device_token};
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use meridian_proto::telemetry::{PartitionInfoRequest, ReadPartitionRequest};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::json;

const DEVICES: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_telemetry_keeps_every_acked_message_once_in_order() -> Result<()> {
    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let mut keys = Vec::new();
    for i in 0..DEVICES {
        let id = format!("crash-{i}");
        let r = svc
            .json(
                "PUT",
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await?;
        assert_eq!(r.status, 200);
        let key = r.json()["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        keys.push((id, key));
    }
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    // message ids PUBACKed per device, in send order
    let acked: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let mut tasks = Vec::new();
    for (id, key) in keys {
        let (acked, ca) = (acked.clone(), ca.clone());
        tasks.push(tokio::spawn(async move {
            let token = device_token("localhost", &id, &key, 600)?;
            let (mut device, code, _) = RawMqtt::connect(mqtt, &ca, &id, &token, true, 60).await?;
            if code != ConnectReturnCode::Success {
                bail!("{id}: {code:?}");
            }
            let mut seq = 0u64;
            loop {
                seq += 1;
                let topic = format!("devices/{id}/messages/events/%24.mid={id}-{seq}&seq={seq}");
                let pkid = (seq % 60000) as u16 + 1;
                match device
                    .publish_acked(
                        &topic,
                        seq.to_string().as_bytes(),
                        pkid,
                        Duration::from_secs(30),
                    )
                    .await
                {
                    Ok(true) => {
                        if let Ok(mut a) = acked.lock() {
                            a.entry(id.clone()).or_default().push(seq);
                        }
                    }
                    // The node died: stop this device.
                    _ => return Ok::<_, anyhow::Error>(()),
                }
            }
        }));
    }
    // Let the stream run, then kill the node mid-flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let total: usize = acked
            .lock()
            .map(|a| a.values().map(Vec::len).sum())
            .unwrap_or(0);
        if total >= 3000 || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    cluster.node(1).kill9();
    for t in tasks {
        t.await??;
    }
    let acked: BTreeMap<String, Vec<u64>> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let total_acked: usize = acked.values().map(Vec::len).sum();
    println!(
        "{total_acked} messages acknowledged by {} devices before kill -9",
        acked.len()
    );
    if total_acked < 500 {
        bail!(
            "too few messages before the kill ({total_acked}):\n{}",
            cluster.logs()
        );
    }

    cluster.restart(1)?;
    let grpc = cluster.node(1).grpc;
    let mut reader = None;
    for _ in 0..100 {
        if let Ok(c) = TelemetryReadClient::connect(format!("http://{grpc}")).await {
            reader = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reader = reader.context("telemetry read API after restart")?;
    let info = reader
        .partition_info(PartitionInfoRequest {})
        .await?
        .into_inner();
    // per device: sequence numbers in log order
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for partition in 0..info.partition_count {
        let mut stream = reader
            .read_partition(ReadPartitionRequest {
                partition,
                from_offset: 0,
                max_records: 1_000_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(r) = stream.message().await? {
            let device = r.system_properties["iothub-connection-device-id"].clone();
            let seq: u64 = r.application_properties["seq"].parse()?;
            assert_eq!(
                r.system_properties["message-id"],
                format!("{device}-{seq}"),
                "message id and body agree"
            );
            stored.entry(device).or_default().push(seq);
        }
    }
    for (device, seqs) in &acked {
        let log = stored.get(device).cloned().unwrap_or_default();
        // in order and no duplicates: strictly increasing
        assert!(
            log.windows(2).all(|w| w[0] < w[1]),
            "{device}: out of order or duplicated: {log:?}"
        );
        // every acked message is there (the log may also hold at most the one in flight)
        for s in seqs {
            assert!(
                log.binary_search(s).is_ok(),
                "{device}: acked message {s} lost"
            );
        }
        assert!(
            log.len() <= seqs.len() + 1,
            "{device}: unexpected extra messages"
        );
    }
    Ok(())
}
