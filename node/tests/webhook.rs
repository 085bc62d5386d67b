//! Webhook endpoints: routed telemetry is POSTed in order to an HTTPS receiver; failures are
//! retried (health goes unhealthy → degraded); an unreachable webhook goes dead and drops its
//! messages; none of this delays device PUBACKs.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::{free_port, start_dev};
use meridian::client::device::{RawMqtt, device_token};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivers_in_order_with_retries_and_dead_endpoints_drop() -> Result<()> {
    // An HTTPS receiver that fails its first three requests.
    let dir = tempfile::tempdir()?;
    let (port, ca_file, received) = common::start_https_receiver(dir.path(), 3).await?;
    let ca_pem = std::fs::read_to_string(ca_file)?;

    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let key = common::create_device(&mut svc, "wh-dev").await?;
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/endpoints/hook",
            Some(&json!({"type": "webhook", "url": format!("https://localhost:{port}/hook"), "caCertificate": ca_pem})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let dead_port = free_port()?;
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/endpoints/nowhere",
            Some(&json!({"type": "webhook", "url": format!("http://127.0.0.1:{dead_port}/x"), "deadAfterSecs": 1})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/endpoints/bad",
            Some(&json!({"type": "webhook", "url": "https://x/y"})),
        )
        .await?;
    assert_eq!(r.status, 400, "https without a CA is refused");
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/routes/all",
            Some(&json!({"source": "DeviceMessages", "endpointNames": ["hook", "nowhere", "events"]})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());

    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let token = device_token("localhost", "wh-dev", &key, 600)?;
    let (mut device, _, _) = RawMqtt::connect(mqtt, &ca, "wh-dev", &token, true, 60).await?;
    let started = Instant::now();
    for i in 1..=10u16 {
        let topic = format!("devices/wh-dev/messages/events/%24.mid=w{i}");
        assert!(
            device
                .publish_acked(
                    &topic,
                    format!("{{\"i\":{i}}}").as_bytes(),
                    i,
                    Duration::from_secs(10)
                )
                .await?
        );
    }
    // PUBACKs do not wait for the failing webhooks.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "acks took {:?}",
        started.elapsed()
    );
    // Nor does the events stream: all ten are readable there while the webhooks still fail.
    let info = svc
        .json("GET", "/meridian/events/partitions", None)
        .await?
        .json();
    let in_events: u64 = info["endOffsets"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(in_events, 10, "{info}");
    assert!(
        received.lock().map(|r| r.len()).unwrap_or(0) < 10,
        "the first webhook attempts fail, so it cannot have everything yet"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = received.lock().map(|r| r.len()).unwrap_or(0);
        if got >= 10 {
            break;
        }
        if Instant::now() > deadline {
            bail!("webhook got {got} of 10 messages:\n{}", cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<String> = received
        .lock()
        .map(|r| {
            r.iter()
                .filter_map(|v| {
                    v["systemProperties"]["message-id"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        ids,
        (1..=10).map(|i| format!("w{i}")).collect::<Vec<_>>(),
        "in order, once each"
    );
    let first = received.lock().map(|r| r[0].clone()).unwrap_or_default();
    assert_eq!(first["endpoint"], json!("hook"));
    assert_eq!(first["body"], json!("{\"i\":1}"));

    let health = svc
        .json("GET", "/meridian/routing/endpoints/hook/health", None)
        .await?
        .json();
    assert_eq!(health["delivered"], json!(10));
    assert!(health["failures"].as_u64().unwrap_or(0) >= 3, "{health}");
    assert!(
        matches!(health["status"].as_str(), Some("degraded" | "healthy")),
        "{health}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = svc
            .json("GET", "/meridian/routing/endpoints/nowhere/health", None)
            .await?
            .json();
        if h["status"] == json!("dead") && h["dropped"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the unreachable webhook never went dead: {h}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_endpoint_writes_batches_of_json_lines() -> Result<()> {
    let out = tempfile::tempdir()?;
    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let key = common::create_device(&mut svc, "file-dev").await?;
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/endpoints/archive",
            Some(&json!({"type": "file", "directory": out.path().display().to_string(), "batchFrequencySecs": 1})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/endpoints/rel",
            Some(&json!({"type": "file", "directory": "relative"})),
        )
        .await?;
    assert_eq!(r.status, 400);
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/routes/archive-all",
            Some(&json!({"source": "DeviceMessages", "endpointNames": ["archive", "events"]})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let token = device_token("localhost", "file-dev", &key, 600)?;
    let (mut device, _, _) = RawMqtt::connect(mqtt, &ca, "file-dev", &token, true, 60).await?;
    for i in 1..=5u16 {
        let topic = format!("devices/file-dev/messages/events/%24.mid=f{i}");
        assert!(
            device
                .publish_acked(&topic, b"x", i, Duration::from_secs(10))
                .await?
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ids = Vec::new();
        for entry in walk(out.path()) {
            for line in std::fs::read_to_string(&entry)?.lines() {
                let v: Value = serde_json::from_str(line)?;
                ids.push(
                    v["systemProperties"]["message-id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        if ids.len() >= 5 {
            assert_eq!(ids, (1..=5).map(|i| format!("f{i}")).collect::<Vec<_>>());
            break;
        }
        if Instant::now() > deadline {
            bail!("files hold {ids:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Every file under `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}
