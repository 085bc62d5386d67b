//! The official device SDKs, unmodified, against `meridian dev`: Python `azure-iot-device` over
//! MQTT/TLS (SAS and X.509 thumbprint) and over MQTT/WebSockets, and Node
//! `azure-iot-device-mqtt`. Every telemetry message a script reports as sent (PUBACKed) must be in
//! the partition log with its properties, read back through the gRPC partition API.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{Cluster, run_sdk_script, sdk_cache, start_dev};
use meridian_proto::telemetry::telemetry_read_client::TelemetryReadClient;
use meridian_proto::telemetry::{PartitionInfoRequest, ReadPartitionRequest, TelemetryRecord};
use serde_json::Value;

/// Every record in every partition of the node.
async fn all_records(cluster: &mut Cluster) -> Result<Vec<TelemetryRecord>> {
    let addr = cluster.node(1).grpc;
    let mut client = TelemetryReadClient::connect(format!("http://{addr}")).await?;
    let info = client
        .partition_info(PartitionInfoRequest {})
        .await?
        .into_inner();
    let mut out = Vec::new();
    for partition in 0..info.partition_count {
        let mut stream = client
            .read_partition(ReadPartitionRequest {
                partition,
                from_offset: 0,
                max_records: 100_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        while let Some(record) = stream.message().await? {
            out.push(record);
        }
    }
    Ok(out)
}

/// The `SENT {...}` lines a script printed.
fn sent(output: &str) -> Vec<Value> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("SENT "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

fn check_stored(records: &[TelemetryRecord], sent: &[Value]) -> Result<()> {
    let by_id: BTreeMap<&str, &TelemetryRecord> = records
        .iter()
        .filter_map(|r| {
            r.system_properties
                .get("message-id")
                .map(|m| (m.as_str(), r))
        })
        .collect();
    for s in sent {
        let id = s["message_id"].as_str().context("message_id")?;
        let record = by_id
            .get(id)
            .with_context(|| format!("{id} was acknowledged but is not in the log"))?;
        let device = s["device_id"].as_str().unwrap_or_default();
        assert_eq!(
            record
                .system_properties
                .get("iothub-connection-device-id")
                .map(String::as_str),
            Some(device),
            "{id}: device stamp"
        );
        assert!(record.system_properties.contains_key("iothub-enqueuedtime"));
        assert!(
            record
                .system_properties
                .contains_key("iothub-connection-auth-generation-id")
        );
        if let Some(seq) = s["seq"].as_i64() {
            assert_eq!(
                record.application_properties.get("seq").map(String::as_str),
                Some(seq.to_string().as_str()),
                "{id}: seq property"
            );
        }
    }
    Ok(())
}

fn x509_files(dir: &std::path::Path) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["x509-device".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "x509-device");
    let cert = params.self_signed(&key)?;
    let cert_path = dir.join("device.pem");
    let key_path = dir.join("device.key");
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((
        cert_path.display().to_string(),
        key_path.display().to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_device_sdk_mqtt_websockets_x509_and_node_device_sdk() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let mqtt_port = cluster.node(1).mqtt.port().to_string();
    let https_port = cluster.node(1).https.port().to_string();
    let ca = cluster.ca.display().to_string();
    let (cert, key) = x509_files(cluster.dir.path())?;
    let python = sdk_cache().join("venv/bin/python");
    let base = |prefix: &str, transport: &str| {
        vec![
            (
                "MERIDIAN_CONNECTION_STRING",
                creds.service_connection_string.clone(),
            ),
            ("MERIDIAN_CA_CERT", ca.clone()),
            ("MERIDIAN_MQTT_PORT", mqtt_port.clone()),
            ("MERIDIAN_HTTPS_PORT", https_port.clone()),
            ("MERIDIAN_TEST_PREFIX", prefix.to_string()),
            ("MERIDIAN_TRANSPORT", transport.to_string()),
        ]
    };

    let mut env = base("py-mqtt-", "mqtt");
    env.push(("MERIDIAN_X509_CERT", cert));
    env.push(("MERIDIAN_X509_KEY", key));
    let mqtt_out = run_sdk_script(&python, "device_e2e.py", &env)
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    assert!(mqtt_out.contains("ok x509"), "{mqtt_out}");
    assert!(mqtt_out.contains("PASS device_e2e.py"), "{mqtt_out}");

    let ws_out = run_sdk_script(&python, "device_e2e.py", &base("py-ws-", "ws"))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    assert!(ws_out.contains("PASS device_e2e.py"), "{ws_out}");

    let node_modules = sdk_cache().join("node/node_modules");
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg("node")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/device_e2e.js"))
        .env("NODE_PATH", &node_modules)
        .envs(base("js-", "mqtt"))
        .output()?;
    let node_out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !node_out.contains("PASS device_e2e.js") {
        bail!("node device sdk failed:\n{node_out}\n{}", cluster.logs());
    }

    let records = all_records(&mut cluster).await?;
    let mut all_sent = sent(&mqtt_out);
    all_sent.extend(sent(&ws_out));
    all_sent.extend(sent(&node_out));
    assert!(
        all_sent.len() >= 5 + 1 + 5 + 3,
        "too few SENT lines: {}",
        all_sent.len()
    );
    check_stored(&records, &all_sent)?;
    // Python's properties arrive decoded, including characters the SDK percent-encodes.
    let probe = records
        .iter()
        .find(|r| r.system_properties.get("message-id").map(String::as_str) == Some("py-mqtt-m0"))
        .context("py-mqtt-m0")?;
    assert_eq!(
        probe
            .application_properties
            .get("needs encoding")
            .map(String::as_str),
        Some("a/b&c=d ü")
    );
    assert_eq!(
        probe
            .system_properties
            .get("content-type")
            .map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        probe
            .system_properties
            .get("content-encoding")
            .map(String::as_str),
        Some("utf-8")
    );
    assert_eq!(probe.body, br#"{"seq": 0}"#.to_vec());
    let x509 = records
        .iter()
        .find(|r| {
            r.system_properties
                .get("iothub-connection-device-id")
                .map(String::as_str)
                == Some("py-mqtt-x509")
        })
        .context("x509 device telemetry")?;
    assert!(x509.system_properties["iothub-connection-auth-method"].contains("x509Certificate"));
    Ok(())
}
