//! Devices through any node: with devices connected to nodes 2 and 3, a service talking to node 1
//! invokes direct methods (forwarded to the node holding the connection), sends C2D messages and
//! patches desired properties, and every one reaches the device. A device that reconnects to
//! another node takes over: the old connection is closed, and methods follow it.

mod common;

use std::time::Duration;

use anyhow::{Result, bail};
use bytes::Bytes;
use common::start_cluster;
use meridian::client::device::{ConnAckCode, RawMqtt, device_token};
use meridian::client::{Authorization, Connection};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use serde_json::json;
use tokio::sync::mpsc;

/// What a simulated device saw.
#[derive(Debug)]
enum Seen {
    C2d(String),
    Desired(String),
    Closed,
}

/// Connects a device, subscribes to everything, answers every direct method with
/// `{"node": node, "echo": payload}`, and reports C2D messages and desired patches.
async fn device(
    mqtt: std::net::SocketAddr,
    ca: std::path::PathBuf,
    id: String,
    key: String,
    node: u64,
) -> Result<mpsc::Receiver<Seen>> {
    let token = device_token("localhost", &id, &key, 600)?;
    let (mut client, code, _) = RawMqtt::connect(mqtt, &ca, &id, &token, false, 60).await?;
    if code != ConnAckCode::Success {
        bail!("{id}: {code:?}");
    }
    let filters = [
        format!("devices/{id}/messages/devicebound/#"),
        "$iothub/methods/POST/#".to_string(),
        "$iothub/twin/PATCH/properties/desired/#".to_string(),
    ];
    let mut subscribe = Subscribe::new(&filters[0], QoS::AtLeastOnce);
    for f in &filters[1..] {
        subscribe
            .filters
            .push(SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
    }
    client.send(Packet::Subscribe(subscribe)).await?;
    match client.recv(Duration::from_secs(10)).await? {
        Some(Packet::SubAck(_)) => {}
        other => bail!("{id}: expected SUBACK, got {other:?}"),
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let packet = match client.recv(Duration::from_secs(120)).await {
                Ok(Some(p)) => p,
                _ => {
                    let _ = tx.send(Seen::Closed).await;
                    return;
                }
            };
            let Packet::Publish(p) = packet else { continue };
            if p.qos == QoS::AtLeastOnce {
                let _ = client.send(Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            let body = String::from_utf8_lossy(&p.payload).to_string();
            if let Some(rest) = p.topic.strip_prefix("$iothub/methods/POST/") {
                let rid = rest.split("$rid=").nth(1).unwrap_or_default().to_string();
                let payload: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let answer = json!({"node": node, "echo": payload}).to_string();
                let reply = Publish::new(
                    format!("$iothub/methods/res/200/?$rid={rid}"),
                    QoS::AtMostOnce,
                    answer.into_bytes(),
                );
                let _ = client.send(Packet::Publish(reply)).await;
            } else if p.topic.contains("/messages/devicebound/") {
                let _ = tx.send(Seen::C2d(body)).await;
            } else if p
                .topic
                .starts_with("$iothub/twin/PATCH/properties/desired/")
            {
                let _ = tx.send(Seen::Desired(body)).await;
            }
        }
    });
    Ok(rx)
}

async fn next(rx: &mut mpsc::Receiver<Seen>) -> Result<Seen> {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("device task ended"))
}

async fn create(svc: &mut Connection, id: &str) -> Result<String> {
    let r = svc
        .json(
            "PUT",
            &format!("/devices/{id}"),
            Some(&json!({"deviceId": id})),
        )
        .await?;
    anyhow::ensure!(r.status == 200, "create {id}: {}", r.status);
    Ok(r.json()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_c2d_and_desired_patches_reach_devices_on_any_node() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let service = cluster.client(1).await?;
    let mut svc = service.connect().await?;
    let ca = cluster.ca.clone();
    let k2 = create(&mut svc, "on-2").await?;
    let k3 = create(&mut svc, "on-3").await?;
    let mut seen2 = device(
        cluster.node(2).mqtt,
        ca.clone(),
        "on-2".into(),
        k2.clone(),
        2,
    )
    .await?;
    let mut seen3 = device(cluster.node(3).mqtt, ca.clone(), "on-3".into(), k3, 3).await?;

    // Direct methods from node 1 reach the devices on nodes 2 and 3.
    for (id, node) in [("on-2", 2), ("on-3", 3)] {
        let r = svc
            .json(
                "POST",
                &format!("/twins/{id}/methods"),
                Some(&json!({"methodName": "ping", "payload": {"n": 1}})),
            )
            .await?;
        assert_eq!(r.status, 200, "{id}: {:?}\n{}", r.json(), cluster.logs());
        assert_eq!(
            r.json(),
            json!({"status": 200, "payload": {"node": node, "echo": {"n": 1}}})
        );
    }
    // C2D sent through node 1 is delivered by node 3.
    let r = svc
        .send(
            "POST",
            "/devices/on-3/messages/devicebound",
            Some(Bytes::from_static(b"hello-3")),
            &[],
            Authorization::Policy,
        )
        .await?;
    assert_eq!(r.status, 204);
    match next(&mut seen3).await? {
        Seen::C2d(body) => assert_eq!(body, "hello-3"),
        other => bail!("on-3 saw {other:?}"),
    }
    // A desired patch through node 1 is pushed by node 2.
    let r = svc
        .json(
            "PATCH",
            "/twins/on-2",
            Some(&json!({"properties": {"desired": {"mode": "eco"}}})),
        )
        .await?;
    assert_eq!(r.status, 200);
    match next(&mut seen2).await? {
        Seen::Desired(body) => {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            assert_eq!(v["mode"], json!("eco"));
            assert!(v["$version"].is_number());
        }
        other => bail!("on-2 saw {other:?}"),
    }

    // on-2 reconnects to node 3: node 2 drops its old connection, and methods follow.
    let _moved = device(cluster.node(3).mqtt, ca.clone(), "on-2".into(), k2, 3).await?;
    loop {
        match next(&mut seen2).await? {
            Seen::Closed => break,
            Seen::Desired(_) | Seen::C2d(_) => continue,
        }
    }
    let r = svc
        .json(
            "POST",
            "/twins/on-2/methods",
            Some(&json!({"methodName": "ping", "payload": {"n": 2}})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["payload"]["node"], json!(3));
    let state = svc.json("GET", "/devices/on-2", None).await?.json();
    assert_eq!(
        state["connectionState"],
        json!("Connected"),
        "the old node's disconnect must not win"
    );
    Ok(())
}
