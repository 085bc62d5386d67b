//! Bad input gets Azure's status and error code, and changes nothing.

mod common;

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use common::start_dev;
use meridian::auth;
use meridian::client::{Authorization, Connection, Reply};
use serde_json::{Value, json};

fn code(reply: &Reply) -> String {
    reply
        .headers
        .get("iothub-errorcode")
        .cloned()
        .unwrap_or_default()
}

async fn raw(
    conn: &mut Connection,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<Reply> {
    Ok(conn
        .send(
            method,
            path,
            Some(Bytes::from(body.to_string())),
            headers,
            Authorization::Policy,
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_azure_errors_and_changes_nothing() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    let mut conn = client.connect().await?;
    let device = conn
        .json("PUT", "/devices/d1", Some(&json!({"deviceId": "d1"})))
        .await?;
    assert_eq!(device.status, 200);
    let twin = conn.json("GET", "/twins/d1", None).await?;
    let snapshot = |d: &Value, t: &Value| {
        (
            d["etag"].clone(),
            t["etag"].clone(),
            t["properties"]["desired"].clone(),
        )
    };
    let before = snapshot(&device.json(), &twin.json());
    let stats_before = conn.json("GET", "/statistics/devices", None).await?.json();

    // invalid device ids
    for path in [
        "/devices/bad%20id",
        "/devices/semi%3Bcolon",
        &format!("/devices/{}", "x".repeat(129)),
    ] {
        let r = raw(&mut conn, "PUT", path, "{}", &[]).await?;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (400, "ArgumentInvalid"),
            "{path}"
        );
    }
    // duplicate create
    let r = conn
        .json("PUT", "/devices/d1", Some(&json!({"deviceId": "d1"})))
        .await?;
    assert_eq!((r.status, code(&r).as_str()), (409, "DeviceAlreadyExists"));
    // stale etags
    let stale = [("if-match", "\"c3RhbGU=\"")];
    let r = raw(
        &mut conn,
        "PUT",
        "/devices/d1",
        r#"{"deviceId":"d1","status":"disabled"}"#,
        &stale,
    )
    .await?;
    assert_eq!((r.status, code(&r).as_str()), (412, "PreconditionFailed"));
    let r = raw(
        &mut conn,
        "PATCH",
        "/twins/d1",
        r#"{"tags":{"a":1}}"#,
        &stale,
    )
    .await?;
    assert_eq!((r.status, code(&r).as_str()), (412, "PreconditionFailed"));
    let r = raw(&mut conn, "DELETE", "/devices/d1", "", &stale).await?;
    assert_eq!((r.status, code(&r).as_str()), (412, "PreconditionFailed"));
    // oversize and too-deep twins
    let big: serde_json::Map<String, Value> = (0..20)
        .map(|i| (format!("k{i}"), json!("x".repeat(500))))
        .collect();
    let r = conn
        .json(
            "PATCH",
            "/twins/d1",
            Some(&json!({"properties": {"desired": big}})),
        )
        .await?;
    assert_eq!((r.status, code(&r).as_str()), (400, "TwinSizeExceeded"));
    let deep =
        json!({"properties": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}});
    let r = conn.json("PATCH", "/twins/d1", Some(&deep)).await?;
    assert_eq!((r.status, code(&r).as_str()), (400, "TwinInvalid"));
    // malformed JSON
    let r = raw(&mut conn, "PUT", "/devices/d2", "{not json", &[]).await?;
    assert_eq!((r.status, code(&r).as_str()), (400, "IotHubFormatError"));
    let r = raw(&mut conn, "PATCH", "/twins/d1", "[1,2]", &[]).await?;
    assert_eq!((r.status, code(&r).as_str()), (400, "IotHubFormatError"));
    // bad api-version
    let r = conn
        .json("GET", "/devices/d1?api-version=tomorrow", None)
        .await?;
    assert_eq!((r.status, code(&r).as_str()), (400, "ArgumentInvalid"));

    // credentials: missing, expired, wrong key, under-privileged, device key
    let owner = creds
        .shared_access_policies
        .iter()
        .find(|p| p.key_name == "iothubowner")
        .expect("owner policy");
    let reader = creds
        .shared_access_policies
        .iter()
        .find(|p| p.key_name == "registryRead")
        .expect("registryRead policy");
    let host = format!("localhost:{}", cluster.node(1).https.port());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let expired = auth::sign(&host, &owner.primary_key, now - 10, Some("iothubowner"))?;
    let wrong_key = auth::sign(&host, &reader.primary_key, now + 600, Some("iothubowner"))?;
    let read_only = auth::sign(&host, &reader.primary_key, now + 600, Some("registryRead"))?;
    let device_key = device.json()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let device_token = auth::sign(&format!("{host}/devices/d1"), &device_key, now + 600, None)?;
    let body = Bytes::from(r#"{"deviceId":"d3"}"#);
    for (name, authz) in [
        ("missing", Authorization::None),
        ("expired", Authorization::Header(expired)),
        ("wrong key", Authorization::Header(wrong_key)),
        ("under-privileged", Authorization::Header(read_only.clone())),
        ("device key", Authorization::Header(device_token)),
        ("garbage", Authorization::Header("Bearer nope".into())),
    ] {
        let r = conn
            .send("PUT", "/devices/d3", Some(body.clone()), &[], authz)
            .await?;
        assert_eq!(r.status, 401, "{name}: {:?}", r.json());
    }
    // registryRead can read but not write
    let r = conn
        .send(
            "GET",
            "/devices/d1",
            None,
            &[],
            Authorization::Header(read_only),
        )
        .await?;
    assert_eq!(r.status, 200);

    // unknown route and method
    let r = conn.json("GET", "/no/such/route", None).await?;
    assert_eq!((r.status, code(&r).as_str()), (404, "ResourceNotFound"));
    let r = conn.json("POST", "/devices/d1", Some(&json!({}))).await?;
    assert_eq!(r.status, 405);
    // missing device
    let r = conn.json("GET", "/devices/ghost", None).await?;
    assert_eq!((r.status, code(&r).as_str()), (404, "DeviceNotFound"));
    assert!(
        r.json()["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ErrorCode:DeviceNotFound;"))
    );

    // nothing changed
    let device_after = conn.json("GET", "/devices/d1", None).await?.json();
    let twin_after = conn.json("GET", "/twins/d1", None).await?.json();
    assert_eq!(snapshot(&device_after, &twin_after), before);
    let stats_after = conn.json("GET", "/statistics/devices", None).await?.json();
    assert_eq!(stats_after, stats_before);
    for id in ["d2", "d3"] {
        assert_eq!(
            conn.json("GET", &format!("/devices/{id}"), None)
                .await?
                .status,
            404
        );
    }
    Ok(())
}
