//! A single node killed with SIGKILL and restarted keeps its registry, twins and policies.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::start_dev;
use meridian::client::Authorization;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_restart_keeps_registry_twins_and_policies() -> Result<()> {
    let mut cluster = start_dev()?;
    let before = cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    let mut conn = client.connect().await?;
    let created = conn
        .json(
            "PUT",
            "/devices/keep-me",
            Some(&json!({"deviceId": "keep-me"})),
        )
        .await?;
    assert_eq!(created.status, 200, "{:?}", created.json());
    let twin = conn
        .json(
            "PATCH",
            "/twins/keep-me",
            Some(&json!({"tags": {"site": "x"}, "properties": {"desired": {"mode": "eco"}}})),
        )
        .await?;
    assert_eq!(twin.status, 200, "{:?}", twin.json());
    // A custom policy: read-only registry access.
    let custom = conn
        .json(
            "PUT",
            "/meridian/policies/auditor",
            Some(&json!({"rights": ["RegistryRead"]})),
        )
        .await?;
    assert_eq!(custom.status, 200, "{:?}", custom.json());
    let auditor_key = custom.json()["primaryKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    drop(conn);

    cluster.node(1).kill9();
    // Remove the credentials file so the wait below sees the restarted node's own answer.
    std::fs::remove_file(cluster.node(1).data_dir.join("dev-credentials.json"))?;
    cluster.restart(1)?;
    let after = cluster.credentials(Duration::from_secs(60)).await?;
    assert_eq!(
        before.service_connection_string, after.service_connection_string,
        "policy keys changed across restart"
    );
    for policy in &before.shared_access_policies {
        assert!(
            after.shared_access_policies.contains(policy),
            "{} changed",
            policy.key_name
        );
    }
    assert!(
        after
            .shared_access_policies
            .iter()
            .any(|p| p.key_name == "auditor")
    );

    let mut conn = client.connect().await?;
    let device = conn.json("GET", "/devices/keep-me", None).await?;
    assert_eq!(device.status, 200, "{}", cluster.logs());
    assert_eq!(device.json()["etag"], created.json()["etag"]);
    assert_eq!(
        device.json()["authentication"],
        created.json()["authentication"]
    );
    let twin_after = conn.json("GET", "/twins/keep-me", None).await?;
    assert_eq!(twin_after.status, 200);
    assert_eq!(twin_after.json()["tags"], json!({"site": "x"}));
    assert_eq!(
        twin_after.json()["properties"]["desired"]["mode"],
        json!("eco")
    );
    assert_eq!(twin_after.json()["etag"], twin.json()["etag"]);

    // The custom policy survived and authenticates reads, but not writes.
    let host = client_host(&after.service_connection_string);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = meridian::auth::sign(&host, &auditor_key, now + 600, Some("auditor"))?;
    let read = conn
        .send(
            "GET",
            "/devices/keep-me",
            None,
            &[],
            Authorization::Header(token.clone()),
        )
        .await?;
    assert_eq!(read.status, 200);
    let write = conn
        .send(
            "DELETE",
            "/devices/keep-me",
            None,
            &[("if-match", "*")],
            Authorization::Header(token.clone()),
        )
        .await?;
    assert_eq!(write.status, 401);
    let manage = conn
        .send(
            "GET",
            "/meridian/policies",
            None,
            &[],
            Authorization::Header(token),
        )
        .await?;
    assert_eq!(manage.status, 401);
    Ok(())
}

/// The hub group builds snapshots itself (`Hub::snapshot_policy`, spaced by the registry's size);
/// a node restarted after them loads the snapshot and replays the rest of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_snapshots_are_built_and_a_restart_loads_them() -> Result<()> {
    // Nothing kept behind the snapshot: the restart cannot rebuild the state by replaying the
    // whole log, it must load the snapshot.
    let mut cluster = common::start_dev_with_env(&[
        ("MERIDIAN_CLUSTER__SNAPSHOT_EVERY_LOGS", "20"),
        ("MERIDIAN_CLUSTER__MAX_IN_SNAPSHOT_LOG_TO_KEEP", "0"),
    ])?;
    cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    let mut conn = client.connect().await?;
    // 30 devices and 60 twin writes: due at max(20, 30 devices) entries after the last.
    for i in 0..30 {
        let id = format!("snap-{i}");
        let r = conn
            .json(
                "PUT",
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await?;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    for round in 0..2 {
        for i in 0..30 {
            let r = conn
                .json(
                    "PATCH",
                    &format!("/twins/snap-{i}"),
                    Some(&json!({"tags": {"round": round}})),
                )
                .await?;
            assert_eq!(r.status, 200, "{:?}", r.json());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cluster.node(1).log_tail(10_000).contains("built snapshot") {
        assert!(
            std::time::Instant::now() < deadline,
            "no hub snapshot after 90 writes:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(conn);
    cluster.node(1).kill9();
    std::fs::remove_file(cluster.node(1).data_dir.join("dev-credentials.json"))?;
    cluster.restart(1)?;
    cluster.credentials(Duration::from_secs(60)).await?;
    let mut conn = client.connect().await?;
    for i in [0, 29] {
        let twin = conn.json("GET", &format!("/twins/snap-{i}"), None).await?;
        assert_eq!(twin.status, 200, "{}", cluster.logs());
        assert_eq!(twin.json()["tags"]["round"], json!(1));
    }
    let devices = conn.json("GET", "/devices?top=100", None).await?;
    assert_eq!(devices.status, 200);
    let listed = devices.json().as_array().map_or(0, |a| {
        a.iter()
            .filter(|d| {
                d["deviceId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("snap-"))
            })
            .count()
    });
    assert_eq!(listed, 30);
    Ok(())
}

fn client_host(connection_string: &str) -> String {
    connection_string
        .split(';')
        .find_map(|p| p.strip_prefix("HostName="))
        .unwrap_or_default()
        .to_string()
}
