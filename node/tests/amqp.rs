//! The AMQP endpoint: the official service SDKs (C2D send and feedback; the Event Hub-compatible
//! endpoint with the Event Hubs SDKs), tokens enforced per link, and malformed frames.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{
    amqp_anonymous_session, create_device, put_token, run_sdk_script, sdk_cache, start_cluster,
    start_dev, start_dev_with_amqp_port, tls_to,
};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `keyName`'s primary key from a node's credentials.
fn policy_key(creds: &meridian::server::Credentials, name: &str) -> String {
    creds
        .shared_access_policies
        .iter()
        .find(|p| p.key_name == name)
        .map(|p| p.primary_key.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_service_sdks_send_c2d_and_read_events_over_amqp() -> Result<()> {
    // uamqp (azure-iot-hub) can only dial 5671.
    let mut cluster = start_dev_with_amqp_port(&[], 5671)?;
    let _ = cluster.credentials(Duration::from_secs(60)).await?;
    let node = cluster.node(1);
    let (mqtt, https) = (node.mqtt.port(), node.https.port());
    let credentials = node.data_dir.join("dev-credentials.json");
    let python = sdk_cache().join("venv/bin/python");
    let out = run_sdk_script(
        &python,
        "service_amqp.py",
        &[
            ("MERIDIAN_CREDENTIALS", credentials.display().to_string()),
            ("MERIDIAN_MQTT_PORT", mqtt.to_string()),
            ("MERIDIAN_HTTPS_PORT", https.to_string()),
            ("MERIDIAN_EVENT_HUB", "localhost".into()),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    assert!(out.contains("PASS service_amqp.py"), "{out}");
    for step in [
        "c2d",
        "c2d_unknown_device",
        "c2d_queue_full",
        "c2d_wrong_key",
        "c2d_no_permission",
        "eh_from_start",
        "eh_from_start_logging",
        "eh_every_partition",
        "eh_from_offset",
        "eh_from_sequence",
        "eh_from_enqueued_time",
        "eh_checkpoint_restart",
        "eh_wrong_key",
    ] {
        assert!(
            out.contains(&format!("ok {step}\n")),
            "{step} missing:\n{out}"
        );
    }
    Ok(())
}

/// The `node` executable on PATH.
fn node_program() -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("node"))
        .find(|p| p.is_file())
        .context("node is not on PATH")
}

fn node_modules() -> String {
    sdk_cache().join("node/node_modules").display().to_string()
}

/// Runs `service_amqp.js` (Node `azure-iothub` and `@azure/event-hubs`) against one node.
#[allow(clippy::too_many_arguments)]
fn run_node_sdk(
    connection_string: &str,
    service_key: &str,
    device: &str,
    device_key: &str,
    mqtt: u16,
    https: u16,
    ca: &str,
) -> Result<String> {
    let text = run_sdk_script(
        &node_program()?,
        "service_amqp.js",
        &[
            ("MERIDIAN_NODE_MODULES", node_modules()),
            ("NODE_EXTRA_CA_CERTS", ca.to_string()),
            ("MERIDIAN_CA_CERT", ca.to_string()),
            ("MERIDIAN_CONNECTION_STRING", connection_string.to_string()),
            ("MERIDIAN_SERVICE_KEY", service_key.to_string()),
            ("MERIDIAN_DEVICE_ID", device.to_string()),
            ("MERIDIAN_DEVICE_KEY", device_key.to_string()),
            ("MERIDIAN_MQTT_PORT", mqtt.to_string()),
            ("MERIDIAN_HTTPS_PORT", https.to_string()),
            ("MERIDIAN_EVENT_HUB", "localhost".to_string()),
        ],
    )?;
    for step in [
        "c2d_with_feedback",
        "c2d_unknown_device",
        "eh_from_start",
        "eh_from_offset",
        "eh_from_enqueued_time",
        "eh_websocket",
        "eh_wrong_key",
    ] {
        if !text.contains(&format!("ok {step}\n")) {
            bail!("{step} missing:\n{text}");
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_service_sdks_send_c2d_get_feedback_and_read_events_over_amqp() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let mut svc = cluster.client(1).await?.connect().await?;
    let device = "js-amqp-device";
    let device_key = create_device(&mut svc, device).await?;
    let (mqtt, https) = (cluster.node(1).mqtt.port(), cluster.node(1).https.port());
    let ca = cluster.ca.display().to_string();
    // The built-in endpoint's settings, as `az iot hub show` lists them.
    let r = svc.json("GET", "/meridian/events/endpoint", None).await?;
    let events = &r.json()["eventHubEndpoints"]["events"];
    assert_eq!(events["path"], "localhost", "{}", r.json());
    assert_eq!(events["endpoint"], format!("sb://localhost:{https}/"));
    assert_eq!(
        events["partitionIds"],
        serde_json::json!(["0", "1", "2", "3"])
    );
    run_node_sdk(
        &creds.service_connection_string,
        &policy_key(&creds, "service"),
        device,
        &device_key,
        mqtt,
        https,
        &ca,
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_works_on_a_follower_that_holds_no_partition_of_the_device() -> Result<()> {
    // One replica per partition: most partitions live on other nodes, so the Event Hubs reads
    // of a node go to the replicas, and C2D sends are forwarded to the hub leader.
    let mut cluster = start_cluster(3, &[("MERIDIAN_CLUSTER__REPLICATION_FACTOR", "1")])?;
    let leader = cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let mut svc = cluster.client(follower).await?.connect().await?;
    let device = "js-amqp-follower";
    let device_key = create_device(&mut svc, device).await?;
    let (mqtt, https) = (
        cluster.node(follower).mqtt.port(),
        cluster.node(follower).https.port(),
    );
    let connection_string = common::with_host(
        &creds.service_connection_string,
        &format!("localhost:{https}"),
    );
    let ca = cluster.ca.display().to_string();
    run_node_sdk(
        &connection_string,
        &policy_key(&creds, "service"),
        device,
        &device_key,
        mqtt,
        https,
        &ca,
    )
    .map_err(|e| anyhow::anyhow!("node {follower}: {e}\n{}", cluster.logs()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_device_sdk_over_amqp_sends_receives_c2d_answers_methods_and_syncs_its_twin()
-> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let mut svc = cluster.client(1).await?.connect().await?;
    let device = "js-amqp-transport";
    let device_key = create_device(&mut svc, device).await?;
    let https = cluster.node(1).https.port();
    let ca = cluster.ca.display().to_string();
    let text = run_sdk_script(
        &node_program()?,
        "device_amqp.js",
        &[
            ("MERIDIAN_NODE_MODULES", node_modules()),
            ("NODE_EXTRA_CA_CERTS", ca.clone()),
            ("MERIDIAN_CA_CERT", ca.clone()),
            (
                "MERIDIAN_CONNECTION_STRING",
                creds.service_connection_string.clone(),
            ),
            ("MERIDIAN_SERVICE_KEY", policy_key(&creds, "service")),
            ("MERIDIAN_DEVICE_ID", device.to_string()),
            ("MERIDIAN_DEVICE_KEY", device_key.clone()),
            ("MERIDIAN_HTTPS_PORT", https.to_string()),
            ("MERIDIAN_EVENT_HUB", "localhost".to_string()),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cluster.logs()))?;
    for step in [
        "telemetry",
        "c2d_complete",
        "c2d_reject",
        "c2d_abandon",
        "twin_get_and_reported",
        "desired_patch",
        "direct_method",
        "close",
    ] {
        assert!(
            text.contains(&format!("ok {step}\n")),
            "{step} missing:\n{text}"
        );
    }
    println!("{text}");
    // The AMQP connection was the device's connection: connected while it ran, then not.
    let r = svc.json("GET", &format!("/devices/{device}"), None).await?;
    assert_eq!(r.json()["connectionState"], "Disconnected", "{}", r.json());
    Ok(())
}

/// The error a receiver the node attached and closed at once reports (Debug form).
async fn closed_with_error(receiver: &mut Receiver) -> Result<String> {
    let err = tokio::time::timeout(Duration::from_secs(10), receiver.recv::<Body<Value>>())
        .await
        .context("the link was not closed")?
        .err()
        .context("the link delivered a message instead of closing")?;
    Ok(format!("{err:?}"))
}

fn now() -> u64 {
    meridian::clock::unix_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_per_link_and_expire_and_bad_frames_leave_the_node_up() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let service_key = policy_key(&creds, "service");
    let read_key = policy_key(&creds, "registryRead");
    let https = cluster.node(1).https;
    let ca = cluster.ca.clone();
    let open = |ca: std::path::PathBuf| async move {
        amqp_anonymous_session(https, &ca, "meridian-test").await
    };
    let audience = "sb://localhost/localhost";
    let partition = "localhost/ConsumerGroups/$Default/Partitions/0";

    // A wrong signature and a device token: 401, no link.
    let (_c, mut session) = open(ca.clone()).await?;
    let forged = meridian::auth::sign(audience, &read_key, now() + 600, Some("service"))?;
    assert_eq!(put_token(&mut session, audience, &forged).await?, 401);
    let no_policy = meridian::auth::sign(audience, &service_key, now() + 600, None)?;
    assert_eq!(put_token(&mut session, audience, &no_policy).await?, 401);
    // No token at all: the receiver is attached and closed with amqp:unauthorized-access.
    let mut receiver = Receiver::attach(&mut session, "r0", partition).await?;
    let err = closed_with_error(&mut receiver).await?;
    assert!(err.contains("UnauthorizedAccess"), "{err}");

    // registryRead lacks ServiceConnect: the token is accepted, the link is not.
    let (_c, mut session) = open(ca.clone()).await?;
    let token = meridian::auth::sign(audience, &read_key, now() + 600, Some("registryRead"))?;
    assert_eq!(put_token(&mut session, audience, &token).await?, 200);
    let mut receiver = Receiver::attach(&mut session, "r1", partition).await?;
    let err = closed_with_error(&mut receiver).await?;
    assert!(err.contains("UnauthorizedAccess"), "{err}");

    // A token valid for 3 s: the link works, then is closed when the token expires.
    let (_c, mut session) = open(ca.clone()).await?;
    let token = meridian::auth::sign(audience, &service_key, now() + 3, Some("service"))?;
    assert_eq!(put_token(&mut session, audience, &token).await?, 200);
    let mut receiver = Receiver::attach(&mut session, "r2", partition).await?;
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match receiver.recv::<Body<Value>>().await {
                Ok(d) => receiver.accept(&d).await?,
                Err(e) => return Ok::<_, anyhow::Error>(e),
            }
        }
    })
    .await
    .context("the link outlived its token")??;
    assert!(format!("{err:?}").contains("UnauthorizedAccess"), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before expiry"
    );

    // The IoT Hub name of the events endpoint, after a SASL PLAIN login as the official
    // redirect samples do it: attached, then closed with amqp:link:redirect naming the Event
    // Hub-compatible address with an explicit port.
    {
        let tls = tls_to(https, &ca).await?;
        let hub_token =
            meridian::auth::sign("localhost", &service_key, now() + 600, Some("service"))?;
        let mut connection = Connection::builder()
            .container_id("redirect-sample")
            .hostname("localhost")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
                username: "service@sas.root.localhost".into(),
                password: hub_token,
            })
            .open_with_stream(tls)
            .await?;
        let mut session = Session::begin(&mut connection).await?;
        let mut receiver = Receiver::attach(
            &mut session,
            "redirected",
            "amqps://localhost/messages/events/ConsumerGroups/$Default/Partitions/0",
        )
        .await?;
        let text = closed_with_error(&mut receiver).await?;
        assert!(text.contains("Redirect"), "{text}");
        // `amqps://localhost:<port>/localhost/ConsumerGroups/...`: the samples need the port.
        let address = text
            .split("amqps://localhost:")
            .nth(1)
            .context("no amqps://localhost:<port> address")?;
        let (port, rest) = address.split_once('/').context("no path")?;
        assert!(port.parse::<u16>().is_ok(), "{text}");
        assert!(
            rest.starts_with("localhost/ConsumerGroups/$Default/Partitions/0"),
            "{text}"
        );
        // A wrong PLAIN password fails the SASL exchange.
        let tls = tls_to(https, &ca).await?;
        let refused = Connection::builder()
            .container_id("redirect-sample")
            .hostname("localhost")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
                username: "service@sas.root.localhost".into(),
                password: "SharedAccessSignature sr=localhost&sig=x&se=1&skn=service".into(),
            })
            .open_with_stream(tls)
            .await;
        assert!(refused.is_err(), "a bad PLAIN password was accepted");
    }

    // C2D sends are rejected with Azure's conditions: unknown device, full queue (51st),
    // expiry beyond two days; an expired token is refused on $cbs.
    {
        use fe2o3_amqp::types::messaging::{Batch, Data, Message, Outcome, Properties};
        let mut svc = cluster.client(1).await?.connect().await?;
        create_device(&mut svc, "amqp-queue").await?;
        let (_c, mut session) = open(ca.clone()).await?;
        let expired = meridian::auth::sign("localhost", &service_key, now() - 10, Some("service"))?;
        assert_eq!(
            put_token(&mut session, "https://localhost", &expired).await?,
            401
        );
        let token = meridian::auth::sign("localhost", &service_key, now() + 600, Some("service"))?;
        assert_eq!(
            put_token(&mut session, "https://localhost", &token).await?,
            200
        );
        let mut sender =
            fe2o3_amqp::Sender::attach(&mut session, "c2d", "/messages/devicebound").await?;
        let message = |to: &str, expiry_ms: Option<i64>| Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                to: Some(to.to_string()),
                absolute_expiry_time: expiry_ms
                    .map(fe2o3_amqp::types::primitives::Timestamp::from_milliseconds),
                ..Default::default()
            }),
            application_properties: None,
            body: Body::<Value>::Data(Batch::new(vec![Data(b"x".to_vec().into())])),
            footer: None,
        };
        let condition = |outcome: Outcome| match outcome {
            Outcome::Rejected(r) => r
                .error
                .map(|e| format!("{:?}", e.condition))
                .unwrap_or_default(),
            other => format!("not rejected: {other:?}"),
        };
        let unknown = sender
            .send(message("/devices/amqp-nobody/messages/devicebound", None))
            .await?;
        assert!(condition(unknown).contains("NotFound"), "unknown device");
        let far = now() as i64 * 1000 + 3 * 24 * 3600 * 1000;
        let too_late = sender
            .send(message(
                "/devices/amqp-queue/messages/devicebound",
                Some(far),
            ))
            .await?;
        assert!(
            condition(too_late).contains("argument-error"),
            "expiry beyond two days"
        );
        for i in 0..50 {
            let ok = sender
                .send(message("/devices/amqp-queue/messages/devicebound", None))
                .await?;
            assert!(matches!(ok, Outcome::Accepted(_)), "message {i}: {ok:?}");
        }
        let full = sender
            .send(message("/devices/amqp-queue/messages/devicebound", None))
            .await?;
        assert!(
            condition(full).contains("ResourceLimitExceeded"),
            "51st message"
        );
        let _ = sender.close().await;
    }

    // Malformed input: random bytes after each protocol header, truncated frames, oversize
    // frame lengths. Each connection ends; the node keeps serving.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut probes = tokio::task::JoinSet::new();
    for round in 0..120u64 {
        let header: &[u8] = match round % 3 {
            0 => b"AMQP\x03\x01\x00\x00",
            1 => b"AMQP\x00\x01\x00\x00",
            _ => b"AMQP\x02\x01\x00\x00",
        };
        let mut junk = header.to_vec();
        let len = (next() % 300) as usize;
        match round % 4 {
            // A frame header claiming a huge size.
            0 => junk.extend_from_slice(&[0xff, 0xff, 0xff, 0xf0, 2, 0, 0, 0]),
            // A plausible frame header with a random body.
            1 => junk.extend_from_slice(&[0, 0, 0, (8 + len as u8).max(8), 2, 0, 0, 0]),
            _ => {}
        }
        junk.extend((0..len).map(|_| next() as u8));
        let ca = ca.clone();
        probes.spawn(async move {
            let mut tls = tls_to(https, &ca).await?;
            let _ = tls.write_all(&junk).await;
            let mut sink = vec![0u8; 4096];
            // The node answers (or not) and closes, at the latest when the Open is overdue.
            tokio::time::timeout(Duration::from_secs(20), async {
                while let Ok(n) = tls.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await
            .with_context(|| format!("round {round}: the node kept a malformed connection open"))
        });
    }
    while let Some(probe) = probes.join_next().await {
        probe??;
    }
    assert!(cluster.node(1).is_running(), "the node died");
    // Still serving AMQP: a good token and a partition receiver work.
    let (_c, mut session) = open(ca.clone()).await?;
    let token = meridian::auth::sign(audience, &service_key, now() + 600, Some("service"))?;
    assert_eq!(put_token(&mut session, audience, &token).await?, 200);
    Ok(())
}
