//! The official Azure service SDKs, unmodified, against `meridian dev` and against every node of a
//! 3-node cluster. The SDK scripts live in `tests/sdk/` and exit 0 only when every step matched.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{run_sdk_script, sdk_cache, start_cluster, start_dev, with_host};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_node_service_sdks_against_dev() -> Result<()> {
    let cluster = start_dev()?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let ca = cluster.ca.display().to_string();
    let python = sdk_cache().join("venv/bin/python");
    let out = run_sdk_script(
        &python,
        "service_registry.py",
        &[
            (
                "MERIDIAN_CONNECTION_STRING",
                creds.service_connection_string.clone(),
            ),
            ("MERIDIAN_CA_CERT", ca.clone()),
            ("MERIDIAN_TEST_PREFIX", "py-dev-".into()),
        ],
    )?;
    assert!(out.contains("PASS service_registry.py"), "{out}");

    let node = std::path::PathBuf::from("/usr/bin/env");
    let node_modules = sdk_cache().join("node/node_modules");
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(&node)
        .arg("node")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/service_registry.js"))
        .env("NODE_PATH", &node_modules)
        .env("NODE_EXTRA_CA_CERTS", &ca)
        .env(
            "MERIDIAN_CONNECTION_STRING",
            &creds.service_connection_string,
        )
        .env("MERIDIAN_CA_CERT", &ca)
        .env("MERIDIAN_TEST_PREFIX", "js-dev-")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "node sdk failed:\n{text}\n{}",
        cluster.logs()
    );
    assert!(text.contains("PASS service_registry.js"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_service_sdk_against_every_node_of_a_cluster() -> Result<()> {
    let cluster = start_cluster(3, &[])?;
    cluster.wait_leader(Duration::from_secs(30)).await?;
    let creds = cluster.credentials(Duration::from_secs(60)).await?;
    let python = sdk_cache().join("venv/bin/python");
    for node in &cluster.nodes {
        let connection_string = with_host(
            &creds.service_connection_string,
            &format!("localhost:{}", node.https.port()),
        );
        let out = run_sdk_script(
            &python,
            "service_registry.py",
            &[
                ("MERIDIAN_CONNECTION_STRING", connection_string),
                ("MERIDIAN_CA_CERT", cluster.ca.display().to_string()),
                ("MERIDIAN_TEST_PREFIX", format!("py-n{}-", node.id)),
            ],
        )
        .map_err(|e| anyhow::anyhow!("node {}: {e}\n{}", node.id, cluster.logs()))?;
        assert!(out.contains("PASS service_registry.py"), "{out}");
    }
    Ok(())
}
