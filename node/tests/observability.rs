//! Traces leave the node over OTLP/gRPC when an endpoint is configured, and `/metrics` serves
//! Prometheus text with the request counters.

mod common;

use std::time::Duration;

use anyhow::{Result, bail};
use common::{free_port, start_dev_with_env};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_metrics_count_requests() -> Result<()> {
    // A stand-in collector: we only need to see the exporter open an HTTP/2 (gRPC) connection and
    // send its preface, which it does when the batch processor flushes spans.
    let port = free_port()?;
    let collector = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut cluster = start_dev_with_env(&[("MERIDIAN_OBSERVABILITY__OTLP_ENDPOINT", &endpoint)])?;
    let client = cluster.client(1).await?;
    let mut conn = client.connect().await?;
    for _ in 0..3 {
        assert_eq!(
            conn.json("GET", "/statistics/devices", None).await?.status,
            200
        );
    }
    let accepted = tokio::time::timeout(Duration::from_secs(30), collector.accept()).await;
    let Ok(Ok((mut socket, _))) = accepted else {
        bail!("no OTLP connection within 30 s:\n{}", cluster.logs());
    };
    let mut preface = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut preface)).await??;
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

    let served = cluster
        .node(1)
        .metric("meridian_api_requests_total{method=\"GET\",route=\"/statistics/devices\",status=\"200\"}")
        .await;
    assert_eq!(served, Some(3.0));
    Ok(())
}
