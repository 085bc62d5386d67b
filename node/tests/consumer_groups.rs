//! Consumer groups on the built-in events stream: a reader that stops mid-stream resumes from its
//! (replicated) checkpoint with no gap and no repeat, through the REST/JSON API and through
//! `meridian monitor-events`.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::start_dev;
use meridian::client::device::{RawMqtt, device_token};
use serde_json::{Value, json};

fn offsets(body: &Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["offset"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_resume_from_checkpoints() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let key = common::create_device(&mut svc, "cg-dev").await?;
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let token = device_token("localhost", "cg-dev", &key, 600)?;
    let (mut device, _, _) = RawMqtt::connect(mqtt, &ca, "cg-dev", &token, true, 60).await?;
    for i in 1..=20u16 {
        let topic = format!("devices/cg-dev/messages/events/%24.mid=m{i}&n={i}");
        assert!(
            device
                .publish_acked(
                    &topic,
                    format!("{{\"n\":{i}}}").as_bytes(),
                    i,
                    Duration::from_secs(10)
                )
                .await?
        );
    }
    // The device's partition is the one holding its messages.
    let info = svc
        .json("GET", "/meridian/events/partitions", None)
        .await?
        .json();
    let partition = info["endOffsets"]
        .as_array()
        .and_then(|a| a.iter().position(|o| o.as_u64() == Some(20)))
        .expect("one partition holds the 20 messages");

    // consumer group management
    assert_eq!(
        svc.json("PUT", "/meridian/events/consumergroups/analytics", None)
            .await?
            .status,
        200
    );
    assert_eq!(
        svc.json("PUT", "/meridian/events/consumergroups/analytics", None)
            .await?
            .status,
        409
    );
    assert_eq!(
        svc.json("PUT", "/meridian/events/consumergroups/bad%20name", None)
            .await?
            .status,
        400
    );
    assert_eq!(
        svc.json("DELETE", "/meridian/events/consumergroups/$Default", None)
            .await?
            .status,
        400
    );

    // read 8, checkpoint, "die", resume: 8..19 exactly
    let base = format!("/meridian/events/partitions/{partition}");
    let first = svc
        .json(
            "GET",
            &format!("{base}?consumerGroup=analytics&max=8"),
            None,
        )
        .await?
        .json();
    assert_eq!(offsets(&first), (0..8).collect::<Vec<_>>());
    assert_eq!(
        first["events"][0]["systemProperties"]["message-id"],
        json!("m1")
    );
    assert_eq!(first["events"][0]["properties"]["n"], json!("1"));
    assert_eq!(first["events"][0]["body"], json!("{\"n\":1}"));
    let r = svc
        .json(
            "POST",
            "/meridian/events/consumergroups/analytics/checkpoints",
            Some(&json!({"partition": partition, "offset": 7})),
        )
        .await?;
    assert_eq!(r.status, 204);
    let resumed = svc
        .json(
            "GET",
            &format!("{base}?consumerGroup=analytics&max=100"),
            None,
        )
        .await?
        .json();
    assert_eq!(offsets(&resumed), (8..20).collect::<Vec<_>>());
    // a stale checkpoint never rewinds the group
    svc.json(
        "POST",
        "/meridian/events/consumergroups/analytics/checkpoints",
        Some(&json!({"partition": partition, "offset": 2})),
    )
    .await?;
    let again = svc
        .json(
            "GET",
            &format!("{base}?consumerGroup=analytics&max=1"),
            None,
        )
        .await?
        .json();
    assert_eq!(offsets(&again), vec![8]);

    // other start positions
    let all = svc
        .json(
            "GET",
            &format!("{base}?enqueuedAfter=2000-01-01T00:00:00Z&max=100"),
            None,
        )
        .await?
        .json();
    assert_eq!(offsets(&all).len(), 20);
    let end = svc
        .json("GET", &format!("{base}?from=end"), None)
        .await?
        .json();
    assert!(offsets(&end).is_empty());
    assert_eq!(end["nextOffset"], json!(20));

    // the CLI tails the stream as a consumer group and checkpoints
    let run = |max: usize| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args([
                "monitor-events",
                "--consumer-group",
                "cli",
                "--checkpoint",
                "--timeout-secs",
                "20",
            ])
            .args(["--max-events", &max.to_string(), "--device-id", "cg-dev"])
            .arg("--address")
            .arg(format!("127.0.0.1:{}", creds.https_port))
            .env(
                "MERIDIAN_CONNECTION_STRING",
                &creds.service_connection_string,
            )
            .env("MERIDIAN_CA_CERT", &ca)
            .output()
    };
    assert_eq!(
        svc.json("PUT", "/meridian/events/consumergroups/cli", None)
            .await?
            .status,
        200
    );
    let out = run(20)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 20);
    assert_eq!(lines[0]["deviceId"], json!("cg-dev"));
    for i in 21..=23u16 {
        let topic = format!("devices/cg-dev/messages/events/%24.mid=m{i}");
        assert!(
            device
                .publish_acked(&topic, b"late", i, Duration::from_secs(10))
                .await?
        );
    }
    let out = run(3)?;
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["systemProperties"]["message-id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec!["m21", "m22", "m23"],
        "resumed after the checkpoint"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_records_while_writers_and_readers_go_on() -> Result<()> {
    let mut cluster = common::start_dev_with_env(&[
        ("MERIDIAN_MQTT__RETENTION_SECS", "2"),
        ("MERIDIAN_MQTT__RETENTION_CHECK_SECS", "1"),
    ])?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let key = common::create_device(&mut svc, "ret-dev").await?;
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let token = device_token("localhost", "ret-dev", &key, 600)?;
    let (mut device, _, _) = RawMqtt::connect(mqtt, &ca, "ret-dev", &token, true, 60).await?;
    for i in 1..=5u16 {
        let topic = format!("devices/ret-dev/messages/events/%24.mid=old{i}");
        assert!(
            device
                .publish_acked(&topic, b"old", i, Duration::from_secs(10))
                .await?
        );
    }
    let info = svc
        .json("GET", "/meridian/events/partitions", None)
        .await?
        .json();
    let partition = info["endOffsets"]
        .as_array()
        .and_then(|a| a.iter().position(|o| o.as_u64() == Some(5)))
        .expect("one partition holds the messages");
    // Keep writing and reading across the retention sweeps.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut pkid = 100u16;
    loop {
        pkid += 1;
        let topic = format!("devices/ret-dev/messages/events/%24.mid=new{pkid}");
        assert!(
            device
                .publish_acked(&topic, b"new", pkid, Duration::from_secs(10))
                .await?
        );
        let page = svc
            .json(
                "GET",
                &format!("/meridian/events/partitions/{partition}?from=start&max=1000"),
                None,
            )
            .await?
            .json();
        let ids: Vec<String> = page["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| {
                        e["systemProperties"]["message-id"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !ids.iter().any(|id| id.starts_with("old")) && !ids.is_empty() {
            // Offsets are never reused: the first kept record is past the dropped ones.
            assert!(offsets(&page)[0] >= 5);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old records were never dropped: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
