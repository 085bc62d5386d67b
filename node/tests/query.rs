//! `POST /devices/query` with the official Python service SDK: paging through more than 1000
//! twins with continuation tokens, a filtered query, and a bad query.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{run_sdk_script, sdk_cache, start_dev};
use serde_json::json;

const TOTAL: usize = 1050;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_pages_through_1050_twins() -> Result<()> {
    let mut cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let client = cluster.client(1).await?;
    // Create the devices over four keep-alive connections; every third one gets a tag.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await?;
            for i in (w..TOTAL).step_by(4) {
                let id = format!("q-{i:04}");
                let r = conn
                    .json(
                        "PUT",
                        &format!("/devices/{id}"),
                        Some(&json!({"deviceId": id})),
                    )
                    .await?;
                anyhow::ensure!(r.status == 200, "create {id}: {}", r.status);
                if i % 3 == 0 {
                    let r = conn
                        .json(
                            "PATCH",
                            &format!("/twins/{id}"),
                            Some(&json!({"tags": {"fleet": "blue"}})),
                        )
                        .await?;
                    anyhow::ensure!(r.status == 200, "tag {id}: {}", r.status);
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let tagged = (0..TOTAL).filter(|i| i % 3 == 0).count();
    let out = run_sdk_script(
        &sdk_cache().join("venv/bin/python"),
        "service_query.py",
        &[
            (
                "MERIDIAN_CONNECTION_STRING",
                creds.service_connection_string.clone(),
            ),
            ("MERIDIAN_CA_CERT", cluster.ca.display().to_string()),
            ("MERIDIAN_QUERY_PREFIX", "q-".into()),
            ("MERIDIAN_QUERY_TOTAL", TOTAL.to_string()),
            ("MERIDIAN_QUERY_TAGGED", tagged.to_string()),
        ],
    )?;
    assert!(out.contains("PASS service_query.py"), "{out}");

    // Aggregates come back as raw rows.
    let mut conn = client.connect().await?;
    let r = conn
        .json(
            "POST",
            "/devices/query",
            Some(&json!({"query": "SELECT tags.fleet AS fleet, COUNT() AS n FROM devices WHERE IS_DEFINED(tags.fleet) GROUP BY tags.fleet"})),
        )
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("x-ms-item-type").map(String::as_str),
        Some("raw")
    );
    assert_eq!(r.json(), json!([{"fleet": "blue", "n": tagged}]));
    Ok(())
}
