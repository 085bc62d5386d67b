//! Message routing end to end with the official Python device SDK: routes on an application
//! property, on `$body` (only for JSON content), and on `$twin.tags` send messages to custom
//! stream endpoints; unmatched messages reach `events` through the fallback route; a route with a
//! bad condition is refused at creation.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use common::{run_sdk_script, sdk_cache, start_dev};
use meridian::client::Connection;
use serde_json::json;

async fn message_ids(
    svc: &mut Connection,
    endpoint: Option<&str>,
    partitions: u64,
) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for p in 0..partitions {
        let path = match endpoint {
            Some(e) => format!("/meridian/events/partitions/{p}?endpoint={e}&max=1000"),
            None => format!("/meridian/events/partitions/{p}?max=1000"),
        };
        let r = svc.json("GET", &path, None).await?;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
        for e in r.json()["events"].as_array().cloned().unwrap_or_default() {
            if let Some(id) = e["systemProperties"]["message-id"].as_str() {
                ids.insert(id.to_string());
            }
        }
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_sdk_telemetry_to_custom_streams_and_fallback_to_events() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    let mut svc = client.connect().await?;
    let mut devices = Vec::new();
    for id in ["rt-plain", "rt-site"] {
        let r = svc
            .json(
                "PUT",
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await?;
        let key = r.json()["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        devices.push(format!("{id}:{key}"));
    }
    let r = svc
        .json(
            "PATCH",
            "/twins/rt-site",
            Some(&json!({"tags": {"site": "a"}})),
        )
        .await?;
    assert_eq!(r.status, 200);
    for endpoint in ["hot", "sites", "audit"] {
        let r = svc
            .json(
                "PUT",
                &format!("/meridian/routing/endpoints/{endpoint}"),
                Some(&json!({"type": "stream"})),
            )
            .await?;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let route = |condition: &str, endpoint: &str| json!({"source": "DeviceMessages", "condition": condition, "endpointNames": [endpoint], "isEnabled": true});
    // The "critical" route also goes to an HTTPS webhook, configured with the CLI.
    let dir = tempfile::tempdir()?;
    let (hook_port, hook_ca, hooked) = common::start_https_receiver(dir.path(), 0).await?;
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("routing")
            .args(["--address", &format!("127.0.0.1:{}", creds.https_port)])
            .args(args)
            .env(
                "MERIDIAN_CONNECTION_STRING",
                &creds.service_connection_string,
            )
            .env("MERIDIAN_CA_CERT", &cluster.ca)
            .output()
    };
    let out = cli(&[
        "set-endpoint",
        "hook",
        "--type",
        "webhook",
        "--url",
        &format!("https://localhost:{hook_port}/hook"),
        "--ca-certificate-file",
        &hook_ca.display().to_string(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "set-route",
        "critical",
        "--condition",
        "level = 'critical'",
        "--endpoint",
        "hot",
        "--endpoint",
        "hook",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "set-route",
        "broken",
        "--condition",
        "$body.temp >",
        "--endpoint",
        "hot",
    ])?;
    assert!(
        !out.status.success(),
        "a bad condition is refused by the CLI too"
    );
    for (name, body) in [
        ("hotbody", route("$body.temp > 30", "hot")),
        ("bysite", route("$twin.tags.site = 'a'", "sites")),
        (
            "twins",
            json!({"source": "TwinChangeEvents", "condition": "", "endpointNames": ["audit"]}),
        ),
        (
            "lifecycle",
            json!({"source": "DeviceLifecycleEvents", "condition": "opType = 'createDeviceIdentity' OR opType = 'deleteDeviceIdentity'", "endpointNames": ["audit"]}),
        ),
        (
            "connections",
            json!({"source": "DeviceConnectionStateEvents", "condition": "$connectionDeviceId = 'rt-site'", "endpointNames": ["audit"]}),
        ),
    ] {
        let r = svc
            .json(
                "PUT",
                &format!("/meridian/routing/routes/{name}"),
                Some(&body),
            )
            .await?;
        assert_eq!(r.status, 200, "{name}: {:?}", r.json());
    }
    // A condition that does not parse is refused with the parse error.
    let r = svc
        .json(
            "PUT",
            "/meridian/routing/routes/broken",
            Some(&route("$body.temp >", "hot")),
        )
        .await?;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("route condition")
    );
    let config = svc.json("GET", "/meridian/routing", None).await?.json();
    assert_eq!(config["routes"].as_array().map(Vec::len), Some(6));
    let shown = cli(&["show"])?;
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout)?;
    assert_eq!(shown["endpoints"]["hook"]["type"], json!("webhook"));
    // enrichments: a twin tag on the sites stream, a literal on events
    for (key, body) in [
        (
            "site",
            json!({"value": "$twin.tags.site", "endpointNames": ["sites"]}),
        ),
        (
            "region",
            json!({"value": "eu-west", "endpointNames": ["events"]}),
        ),
    ] {
        let r = svc
            .json(
                "PUT",
                &format!("/meridian/routing/enrichments/{key}"),
                Some(&body),
            )
            .await?;
        assert_eq!(r.status, 200, "{key}: {:?}", r.json());
    }
    // lifecycle and twin-change notifications for a device created, patched and deleted now
    assert_eq!(
        svc.json(
            "PUT",
            "/devices/rt-life",
            Some(&json!({"deviceId": "rt-life"}))
        )
        .await?
        .status,
        200
    );
    assert_eq!(
        svc.json(
            "PATCH",
            "/twins/rt-life",
            Some(&json!({"tags": {"x": 1}, "properties": {"desired": {"y": 2}}}))
        )
        .await?
        .status,
        200
    );
    assert_eq!(
        svc.send(
            "DELETE",
            "/devices/rt-life",
            None,
            &[("if-match", "*")],
            meridian::client::Authorization::Policy
        )
        .await?
        .status,
        204
    );

    let out = run_sdk_script(
        &sdk_cache().join("venv/bin/python"),
        "device_routing.py",
        &[
            ("MERIDIAN_CA_CERT", cluster.ca.display().to_string()),
            (
                "MERIDIAN_MQTT_PORT",
                cluster.node(1).mqtt.port().to_string(),
            ),
            ("MERIDIAN_HTTPS_PORT", creds.https_port.to_string()),
            ("MERIDIAN_DEVICES", devices.join(",")),
        ],
    )?;
    assert!(out.contains("PASS device_routing.py"), "{out}");

    let partitions = svc
        .json("GET", "/meridian/events/partitions", None)
        .await?
        .json()["partitionCount"]
        .as_u64()
        .unwrap_or(0);
    let hot = message_ids(&mut svc, Some("hot"), partitions).await?;
    let sites = message_ids(&mut svc, Some("sites"), partitions).await?;
    let events = message_ids(&mut svc, None, partitions).await?;
    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(hot, set(&["rt-crit", "rt-json-hot"]), "hot stream");
    assert_eq!(sites, set(&["rt-site"]), "sites stream");
    assert_eq!(
        events,
        set(&["rt-text-hot", "rt-cold"]),
        "fallback to events"
    );

    // the webhook got the critical message
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<String> = hooked
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
        if !ids.is_empty() {
            assert_eq!(ids, vec!["rt-crit".to_string()]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook got nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // enrichment properties were added per endpoint
    let mut enriched = Vec::new();
    for (endpoint, id) in [(Some("sites"), "rt-site"), (None, "rt-cold")] {
        for p in 0..partitions {
            let path = match endpoint {
                Some(e) => format!("/meridian/events/partitions/{p}?endpoint={e}&max=1000"),
                None => format!("/meridian/events/partitions/{p}?max=1000"),
            };
            let page = svc.json("GET", &path, None).await?.json();
            for e in page["events"].as_array().cloned().unwrap_or_default() {
                if e["systemProperties"]["message-id"] == json!(id) {
                    enriched.push(e["properties"].clone());
                }
            }
        }
    }
    assert_eq!(enriched.len(), 2, "{enriched:?}");
    assert_eq!(enriched[0]["site"], json!("a"));
    assert!(
        enriched[0].get("region").is_none(),
        "region is only for events"
    );
    assert_eq!(enriched[1]["region"], json!("eu-west"));

    // the audit stream holds the notifications, in Azure's shape
    let mut audit = Vec::new();
    for p in 0..partitions {
        let r = svc
            .json(
                "GET",
                &format!("/meridian/events/partitions/{p}?endpoint=audit&max=1000"),
                None,
            )
            .await?;
        audit.extend(r.json()["events"].as_array().cloned().unwrap_or_default());
    }
    let ops: BTreeSet<(String, String, String)> = audit
        .iter()
        .map(|e| {
            (
                e["properties"]["deviceId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["properties"]["opType"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["systemProperties"]["iothub-message-source"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let want = |d: &str, op: &str, src: &str| (d.to_string(), op.to_string(), src.to_string());
    for expected in [
        want("rt-life", "createDeviceIdentity", "deviceLifecycleEvents"),
        want("rt-life", "updateTwin", "twinChangeEvents"),
        want("rt-life", "deleteDeviceIdentity", "deviceLifecycleEvents"),
        want("rt-site", "deviceConnected", "deviceConnectionStateEvents"),
        want(
            "rt-site",
            "deviceDisconnected",
            "deviceConnectionStateEvents",
        ),
    ] {
        assert!(ops.contains(&expected), "missing {expected:?} in {ops:?}");
    }
    assert!(
        !ops.iter()
            .any(|(d, op, _)| d == "rt-plain" && op.starts_with("device")),
        "the connection route only matches rt-site: {ops:?}"
    );
    let twin_change = audit
        .iter()
        .find(|e| {
            e["properties"]["opType"] == json!("updateTwin")
                && e["properties"]["deviceId"] == json!("rt-life")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        twin_change["properties"]["iothub-message-schema"],
        json!("twinChangeNotification")
    );
    let body: serde_json::Value =
        serde_json::from_str(twin_change["body"].as_str().unwrap_or("{}"))?;
    assert_eq!(body["tags"], json!({"x": 1}));
    assert_eq!(body["properties"]["desired"]["y"], json!(2));
    assert!(body["properties"]["desired"]["$version"].is_number());
    Ok(())
}
