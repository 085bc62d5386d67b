//! Gossip on 3 real nodes: every node sees the others up with their metadata; a node killed with
//! SIGKILL is reported down within seconds while the Raft voters stay unchanged (gossip never
//! changes voters); a direct method for a device that was connected to the dead node answers 404
//! DeviceNotOnline instead of failing on the dead node; the restarted node is up again.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::{create_device, start_cluster};
use meridian::client::ServiceClient;
use meridian::client::device::{ConnAckCode, RawMqtt, device_token};
use meridian_proto::control::ListNodesRequest;
use meridian_proto::control::control_plane_client::ControlPlaneClient;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Subscribe};
use serde_json::{Value, json};

/// Node id → (health, role) as `answering` reports them.
async fn health(
    base: &ServiceClient,
    answering: std::net::SocketAddr,
) -> BTreeMap<u64, (String, String)> {
    let Ok(mut c) = base.with_addr(answering).connect().await else {
        return BTreeMap::new();
    };
    let Ok(r) = c.json("GET", "/meridian/cluster/nodes", None).await else {
        return BTreeMap::new();
    };
    r.json()["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            Some((
                n["id"].as_u64()?,
                (
                    n["health"].as_str()?.to_string(),
                    n["role"].as_str()?.to_string(),
                ),
            ))
        })
        .collect()
}

async fn wait_health(
    base: &ServiceClient,
    answering: std::net::SocketAddr,
    node: u64,
    want: &str,
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let h = health(base, answering).await;
        if h.get(&node).is_some_and(|(health, _)| health == want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("node {node} never {want}: {h:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_reports_dead_nodes_without_touching_voters() -> Result<()> {
    let mut cluster = start_cluster(3, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let base = cluster.operator(1).await?;
    let owner = cluster.client(1).await?;
    let n1 = cluster.node(1).https;
    for id in 2..=3 {
        wait_health(&base, n1, id, "up", Duration::from_secs(15)).await?;
    }
    let mut c = base.connect().await?;
    let mut svc = owner.connect().await?;
    let listing = c.json("GET", "/meridian/cluster/nodes", None).await?.json();
    let node3 = listing["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["id"] == json!(3)))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(node3["region"], json!("local"), "{listing}");
    assert_eq!(
        node3["mqttAddr"],
        json!(cluster.node(3).mqtt.to_string()),
        "gossip carries the node's addresses: {listing}"
    );

    // The gRPC form of the control plane answers the same listing, with the operator token only.
    let mut grpc = ControlPlaneClient::connect(format!("http://{}", cluster.node(2).grpc)).await?;
    let mut request = tonic::Request::new(ListNodesRequest {});
    request.metadata_mut().insert(
        "authorization",
        base.token(Duration::from_secs(300)).parse()?,
    );
    let reply: Value = serde_json::from_str(&grpc.list_nodes(request).await?.into_inner().json)?;
    assert_eq!(reply["nodes"].as_array().map(Vec::len), Some(3), "{reply}");
    let mut request = tonic::Request::new(ListNodesRequest {});
    request.metadata_mut().insert(
        "authorization",
        owner.token(Duration::from_secs(300)).parse()?,
    );
    let refused = grpc.list_nodes(request).await.err().map(|s| s.code());
    assert_eq!(
        refused,
        Some(tonic::Code::Unauthenticated),
        "iothubowner is not an operator"
    );

    // A device connected to node 3 with a method subscription.
    let key = create_device(&mut svc, "gossip-dev").await?;
    let token = device_token("localhost", "gossip-dev", &key, 600)?;
    let (mut device, code, _) = RawMqtt::connect(
        cluster.node(3).mqtt,
        &cluster.ca,
        "gossip-dev",
        &token,
        true,
        60,
    )
    .await?;
    assert_eq!(code, ConnAckCode::Success);
    device
        .send(Packet::Subscribe(Subscribe::new(
            "$iothub/methods/POST/#",
            QoS::AtLeastOnce,
        )))
        .await?;
    match device.recv(Duration::from_secs(10)).await? {
        Some(Packet::SubAck(_)) => {}
        other => bail!("expected SUBACK, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Gossip carries node 3's load: the device connected there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listing = c.json("GET", "/meridian/cluster/nodes", None).await?.json();
        let devices = listing["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == json!(3)))
            .and_then(|n| n["load"]["devices"].as_u64());
        if devices.is_some_and(|d| d >= 1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("node 3's load never showed the device: {listing}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.node(3).kill9();
    let detected = wait_health(&base, n1, 3, "down", Duration::from_secs(15)).await?;
    println!("node 3 reported down {detected:?} after kill -9");
    assert!(detected < Duration::from_secs(8), "{detected:?}");
    let h = health(&base, n1).await;
    assert_eq!(
        h.get(&3).map(|(_, role)| role.as_str()),
        Some("voter"),
        "gossip must not change voters: {h:?}"
    );
    let started = Instant::now();
    let r = svc
        .json(
            "POST",
            "/twins/gossip-dev/methods",
            Some(&json!({"methodName": "m", "payload": {}, "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 1})),
        )
        .await?;
    assert_eq!(r.status, 404, "{:?}", r.json());
    assert!(started.elapsed() < Duration::from_secs(4));

    cluster.restart(3)?;
    let back = wait_health(&base, n1, 3, "up", Duration::from_secs(20)).await?;
    println!("node 3 reported up {back:?} after restart");
    Ok(())
}
