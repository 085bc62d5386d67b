//! The device endpoint's rules of the road (Azure's behaviour), each checked with a bare MQTT
//! client: credentials, topic scope, QoS 2, oversize messages, malformed packets, keep-alive,
//! token expiry, one connection per device, persistent sessions, connection state, C2D depth.

mod common;

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::start_dev;
use meridian::client::device::{RawMqtt, device_token};
use meridian::client::{Authorization, Connection};
use meridian_proto::telemetry::ReadPartitionRequest;
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, Subscribe, SubscribeReasonCode};
use serde_json::json;

async fn create(conn: &mut Connection, id: &str, status: &str) -> Result<String> {
    let r = conn
        .json(
            "PUT",
            &format!("/devices/{id}"),
            Some(&json!({"deviceId": id, "status": status})),
        )
        .await?;
    assert_eq!(r.status, 200, "{:?}", r.json());
    Ok(r.json()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_endpoint_enforces_azure_rules() -> Result<()> {
    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let host = "localhost";
    let k1 = create(&mut svc, "d1", "enabled").await?;
    let k10 = create(&mut svc, "d10", "enabled").await?;
    let koff = create(&mut svc, "off", "disabled").await?;
    let t1 = device_token(host, "d1", &k1, 600)?;

    // --- credentials ---
    let refused = |code: ConnectReturnCode| code == ConnectReturnCode::NotAuthorized;
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "d10", &t1, false, 60).await?;
    assert!(refused(code), "d1's token must not open d10: {code:?}");
    let wrong = device_token(host, "d1", &k10, 600)?;
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "d1", &wrong, false, 60).await?;
    assert!(refused(code), "wrong key: {code:?}");
    let expired = device_token(host, "d1", &k1, -5)?;
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "d1", &expired, false, 60).await?;
    assert!(refused(code), "expired: {code:?}");
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "ghost", &t1, false, 60).await?;
    assert!(refused(code), "unknown device: {code:?}");
    let toff = device_token(host, "off", &koff, 600)?;
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "off", &toff, false, 60).await?;
    assert!(refused(code), "disabled device: {code:?}");
    let (_, code, _) = RawMqtt::connect(mqtt, &ca, "bad id", &t1, false, 60).await?;
    assert_eq!(code, ConnectReturnCode::BadClientId);

    // --- a good connection, state and persistent session ---
    let (mut d1, code, present) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    assert_eq!((code, present), (ConnectReturnCode::Success, false));
    let state = svc.json("GET", "/devices/d1", None).await?.json();
    assert_eq!(state["connectionState"], json!("Connected"));
    // QoS 2 subscription is granted QoS 1
    d1.send(Packet::Subscribe(Subscribe::new(
        "devices/d1/messages/devicebound/#",
        QoS::ExactlyOnce,
    )))
    .await?;
    match d1.recv(Duration::from_secs(10)).await? {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            )
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert!(
        d1.publish_acked(
            "devices/d1/messages/events/a=1",
            b"hi",
            1,
            Duration::from_secs(10)
        )
        .await?
    );
    d1.send(Packet::Disconnect).await?;
    let (mut d1, code, present) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    assert_eq!(
        (code, present),
        (ConnectReturnCode::Success, true),
        "session must persist"
    );

    // --- one connection per device: a second CONNECT closes the first ---
    let (mut d1b, code, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(
        d1.closed_within(Duration::from_secs(5)).await,
        "old connection must close"
    );

    // --- topics outside the identity close the connection ---
    let mut p = Publish::new(
        "devices/d10/messages/events/",
        QoS::AtLeastOnce,
        b"spoof".to_vec(),
    );
    p.pkid = 2;
    d1b.send(Packet::Publish(p)).await?;
    assert!(
        d1b.closed_within(Duration::from_secs(5)).await,
        "spoofed publish"
    );
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    d1.send(Packet::Subscribe(Subscribe::new(
        "devices/d10/messages/devicebound/#",
        QoS::AtLeastOnce,
    )))
    .await?;
    assert!(
        d1.closed_within(Duration::from_secs(5)).await,
        "foreign subscription"
    );

    // --- QoS 2 publish closes the connection ---
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    let mut p = Publish::new(
        "devices/d1/messages/events/",
        QoS::ExactlyOnce,
        b"q2".to_vec(),
    );
    p.pkid = 3;
    d1.send(Packet::Publish(p)).await?;
    assert!(d1.closed_within(Duration::from_secs(5)).await, "QoS 2");

    // --- oversize telemetry is refused without PUBACK ---
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    let big = vec![b'x'; 300 * 1024];
    assert!(
        !d1.publish_acked(
            "devices/d1/messages/events/",
            &big,
            4,
            Duration::from_secs(10)
        )
        .await?
    );

    // --- malformed packets close the connection; the node keeps serving ---
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    d1.send_raw(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).await?;
    assert!(
        d1.closed_within(Duration::from_secs(5)).await,
        "malformed remaining length"
    );

    // --- keep-alive: silence beyond 1.5 x keep-alive closes the connection ---
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 1).await?;
    assert!(d1.closed_within(Duration::from_secs(5)).await, "keep-alive");
    // ... while a device that pings every 0.5 s stays connected well past its first deadline.
    let (mut d1, _, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 1).await?;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        d1.send(Packet::PingReq).await?;
        assert!(
            matches!(
                d1.recv(Duration::from_secs(2)).await?,
                Some(Packet::PingResp)
            ),
            "an active device keeps its connection"
        );
    }

    // --- the connection closes when its token expires ---
    let short = device_token(host, "d1", &k1, 2)?;
    let (mut d1, code, _) = RawMqtt::connect(mqtt, &ca, "d1", &short, false, 60).await?;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(
        d1.closed_within(Duration::from_secs(8)).await,
        "token expiry"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = svc.json("GET", "/devices/d1", None).await?.json();
    assert_eq!(state["connectionState"], json!("Disconnected"));

    // --- disabling a connected device drops it ---
    let (mut d10, code, _) = RawMqtt::connect(
        mqtt,
        &ca,
        "d10",
        &device_token(host, "d10", &k10, 600)?,
        true,
        60,
    )
    .await?;
    assert_eq!(code, ConnectReturnCode::Success);
    let r = svc
        .send(
            "PUT",
            "/devices/d10",
            Some(Bytes::from(
                json!({"deviceId": "d10", "status": "disabled"}).to_string(),
            )),
            &[("if-match", "*")],
            Authorization::Policy,
        )
        .await?;
    assert_eq!(r.status, 200);
    assert!(
        d10.closed_within(Duration::from_secs(5)).await,
        "disabled device"
    );

    // --- C2D queue depth: the 51st message is refused ---
    for i in 0..50 {
        let r = svc
            .send(
                "POST",
                "/devices/d10/messages/devicebound",
                Some(Bytes::from(format!("m{i}"))),
                &[],
                Authorization::Policy,
            )
            .await?;
        assert_eq!(r.status, 204, "message {i}");
    }
    let r = svc
        .send(
            "POST",
            "/devices/d10/messages/devicebound",
            Some(Bytes::from("m50")),
            &[],
            Authorization::Policy,
        )
        .await?;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.headers.get("iothub-errorcode").map(String::as_str),
        Some("DeviceMaximumQueueDepthExceeded")
    );
    let purged = svc.json("DELETE", "/devices/d10/commands", None).await?;
    assert_eq!(purged.json()["totalMessagesPurged"], json!(50));

    // --- direct method to an offline device: 404; the node is still healthy ---
    let r = svc
        .json(
            "POST",
            "/twins/d1/methods",
            Some(&json!({"methodName": "x", "payload": {}})),
        )
        .await?;
    assert_eq!(r.status, 404);
    let (mut d1, code, _) = RawMqtt::connect(mqtt, &ca, "d1", &t1, false, 60).await?;
    assert_eq!(code, ConnectReturnCode::Success);

    // --- a subscribed device that never answers: 504 after responseTimeoutInSeconds ---
    d1.send(Packet::Subscribe(Subscribe::new(
        "$iothub/methods/POST/#",
        QoS::AtLeastOnce,
    )))
    .await?;
    assert!(matches!(
        d1.recv(Duration::from_secs(10)).await?,
        Some(Packet::SubAck(_))
    ));
    let started = std::time::Instant::now();
    let r = svc
        .json(
            "POST",
            "/twins/d1/methods",
            Some(
                &json!({"methodName": "slow", "payload": {"a": 1}, "responseTimeoutInSeconds": 5}),
            ),
        )
        .await?;
    assert_eq!(r.status, 504, "{:?}", r.json());
    assert!(started.elapsed() >= Duration::from_secs(5));
    match d1.recv(Duration::from_secs(1)).await? {
        Some(Packet::Publish(p)) => {
            assert!(p.topic.starts_with("$iothub/methods/POST/slow/?$rid="))
        }
        other => panic!("expected the method request, got {other:?}"),
    }
    d1.send(Packet::Disconnect).await?;

    // --- connect and disconnect events are recorded for routing ---
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grpc = cluster.node(1).grpc;
    let mut reader = TelemetryReadClient::connect(format!("http://{grpc}")).await?;
    let mut stream = reader
        .read_partition(ReadPartitionRequest {
            partition: u32::MAX,
            from_offset: 0,
            max_records: 10_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ops = Vec::new();
    while let Some(record) = stream.message().await? {
        if record
            .system_properties
            .get("iothub-connection-device-id")
            .map(String::as_str)
            == Some("d1")
        {
            ops.push(record.application_properties["opType"].clone());
        }
    }
    assert!(ops.len() >= 4, "{ops:?}");
    assert_eq!(ops.first().map(String::as_str), Some("deviceConnected"));
    assert_eq!(ops.last().map(String::as_str), Some("deviceDisconnected"));
    Ok(())
}

/// Connects `id` (persistent session) and subscribes it to its C2D messages.
async fn connect_subscribed_to_c2d(
    mqtt: std::net::SocketAddr,
    ca: &std::path::Path,
    id: &str,
    token: &str,
) -> Result<RawMqtt> {
    let (mut device, code, _) = RawMqtt::connect(mqtt, ca, id, token, false, 60).await?;
    assert_eq!(code, ConnectReturnCode::Success);
    device
        .send(Packet::Subscribe(Subscribe::new(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        )))
        .await?;
    assert!(matches!(
        device.recv(Duration::from_secs(10)).await?,
        Some(Packet::SubAck(_))
    ));
    Ok(device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_c2d_is_redelivered_and_completion_yields_feedback() -> Result<()> {
    let mut cluster = common::start_dev_with_env(&[("MERIDIAN_MQTT__C2D_LOCK_TIMEOUT_SECS", "1")])?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let key = create(&mut svc, "c2d-dev", "enabled").await?;
    let token = device_token("localhost", "c2d-dev", &key, 600)?;
    let mut device = connect_subscribed_to_c2d(mqtt, &ca, "c2d-dev", &token).await?;
    let r = svc
        .send(
            "POST",
            "/devices/c2d-dev/messages/devicebound",
            Some(Bytes::from_static(b"on")),
            &[
                ("iothub-messageid", "c2d-1"),
                ("iothub-ack", "full"),
                ("iothub-app-color", "blue"),
            ],
            Authorization::Policy,
        )
        .await?;
    assert_eq!(r.status, 204);
    let first = match device.recv(Duration::from_secs(10)).await? {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected the C2D message, got {other:?}"),
    };
    assert!(first.topic.contains("%24.mid=c2d-1"), "{}", first.topic);
    assert!(first.topic.contains("color=blue"), "{}", first.topic);
    assert!(first.topic.contains("iothub-ack=full"), "{}", first.topic);
    assert!(!first.dup);
    // No PUBACK: after the lock timeout the same packet comes again, marked DUP.
    let again = match device.recv(Duration::from_secs(10)).await? {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected a redelivery, got {other:?}"),
    };
    assert!(again.dup);
    assert_eq!(again.pkid, first.pkid);
    device
        .send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(
            first.pkid,
        )))
        .await?;
    // Completion produces a Success feedback record, received once and completed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let feedback = loop {
        let r = svc
            .json("GET", "/messages/serviceBound/feedback", None)
            .await?;
        if r.status == 200 {
            break r;
        }
        assert_eq!(r.status, 204);
        assert!(std::time::Instant::now() < deadline, "no feedback");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let records = feedback.json();
    assert_eq!(records[0]["originalMessageId"], json!("c2d-1"));
    assert_eq!(records[0]["statusCode"], json!("Success"));
    assert_eq!(records[0]["deviceId"], json!("c2d-dev"));
    let lock = feedback
        .headers
        .get("etag")
        .map(|e| e.trim_matches('"').to_string())
        .unwrap_or_default();
    let done = svc
        .json(
            "DELETE",
            &format!("/messages/serviceBound/feedback/{lock}"),
            None,
        )
        .await?;
    assert_eq!(done.status, 204);
    assert_eq!(
        svc.json("GET", "/messages/serviceBound/feedback", None)
            .await?
            .status,
        204
    );
    let device_json = svc.json("GET", "/devices/c2d-dev", None).await?.json();
    assert_eq!(device_json["cloudToDeviceMessageCount"], json!(0));
    Ok(())
}

/// A device that keeps its socket full (QoS 0 telemetry written without pause) still gets its
/// C2D messages and is still closed when its token expires: the connection reads its socket
/// first, but not only. Fails if outbound work or the token's expiry wait for the socket to go
/// quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_its_connection_still_gets_c2d_and_its_token_expiry() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut cluster = start_dev()?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let (mqtt, ca) = (cluster.node(1).mqtt, cluster.ca.clone());
    let key = create(&mut svc, "flood", "enabled").await?;
    let token_secs = 5;
    let token = device_token("localhost", "flood", &key, token_secs)?;
    let device = connect_subscribed_to_c2d(mqtt, &ca, "flood", &token).await?;
    let mut burst = bytes::BytesMut::new();
    for _ in 0..256 {
        Packet::Publish(Publish::new(
            "devices/flood/messages/events/",
            QoS::AtMostOnce,
            vec![b'x'; 64],
        ))
        .write(&mut burst, usize::MAX)?;
    }
    let (mut reader, mut writer) = device.into_split();
    let start = std::time::Instant::now();
    // Writes until the connection closes (or 20 s): the node always has a packet to read.
    let flood = tokio::spawn(async move {
        let mut bursts = 0u64;
        while start.elapsed() < Duration::from_secs(20) {
            if writer.write_all(&burst).await.is_err() {
                break;
            }
            bursts += 1;
        }
        bursts
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = svc
        .send(
            "POST",
            "/devices/flood/messages/devicebound",
            Some(Bytes::from_static(b"while flooding")),
            &[("iothub-messageid", "flood-1")],
            Authorization::Policy,
        )
        .await?;
    assert_eq!(r.status, 204);
    let (mut c2d_received, mut closed) = (None, None);
    while start.elapsed() < Duration::from_secs(20) {
        match reader.recv(Duration::from_secs(20)).await {
            Ok(Some(Packet::Publish(p))) if p.topic.contains("/messages/devicebound") => {
                c2d_received.get_or_insert(start.elapsed());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                closed = Some(start.elapsed());
                break;
            }
        }
    }
    let bursts = flood.await?;
    assert!(bursts > 20, "the device kept writing: {bursts} bursts");
    let c2d_received = c2d_received.expect("the C2D message arrives while the device floods");
    assert!(
        c2d_received < Duration::from_secs(4),
        "C2D after {c2d_received:?}"
    );
    let closed = closed.expect("the connection closes at its token's expiry while flooding");
    assert!(
        closed < Duration::from_secs(token_secs as u64 + 4),
        "closed after {closed:?}"
    );
    Ok(())
}
