//! Delivery of outbound endpoints. Files: each file endpoint's stream is written in batches of
//! JSON lines under its directory. Webhooks: each webhook's stream (written before PUBACK by routing) is
//! POSTed, in order per partition, to its URL by a worker of its own, so a slow or dead webhook
//! never slows ingestion or another endpoint. At least once: the delivery cursor moves only after
//! a 2xx. Failing deliveries are retried with exponential backoff; an endpoint failing longer
//! than `deadAfterSecs` is dead and its pending messages are dropped (counted), as Azure drops
//! messages of a dead endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::domain::routing::{Endpoint, STREAM_STRIDE};
use crate::hub::{Hub, ReadConsistency};
use crate::partition::Partitions;
use crate::telemetry_api::EventReader;

/// Default time a webhook may keep failing before it is dead.
const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(3600);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Health of a webhook endpoint (Azure's endpoint health states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Delivering.
    Healthy,
    /// Delivering, but recent attempts failed and were retried.
    Degraded,
    /// Failing, still retrying.
    Unhealthy,
    /// Failed for longer than `deadAfterSecs`: pending messages are dropped.
    Dead,
    /// No delivery attempted yet.
    Unknown,
}

/// What a node knows about one webhook.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Status.
    pub status: HealthStatus,
    /// Messages delivered by this node.
    pub delivered: u64,
    /// Messages dropped because the endpoint was dead.
    pub dropped: u64,
    /// Failed attempts.
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            status: HealthStatus::Unknown,
            delivered: 0,
            dropped: 0,
            failures: 0,
            last_error: None,
        }
    }
}

/// Health of every webhook on this node. Cheap to clone.
#[derive(Clone, Default)]
pub struct WebhookHealth {
    inner: Arc<Mutex<HashMap<String, Health>>>,
}

impl WebhookHealth {
    /// The health of `endpoint`.
    pub fn get(&self, endpoint: &str) -> Health {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(endpoint).cloned())
            .unwrap_or_default()
    }

    fn update(&self, endpoint: &str, f: impl FnOnce(&mut Health)) {
        if let Ok(mut m) = self.inner.lock() {
            f(m.entry(endpoint.to_string()).or_default());
        }
    }
}

/// POSTs `body` as JSON to `url`, trusting `ca_pem` for https; returns the status.
async fn post_json(url: &str, ca_pem: Option<&str>, body: Bytes) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("url has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let request = hyper::Request::post(path)
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    async fn send<S>(io: S, request: hyper::Request<Full<Bytes>>) -> Result<u16, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Ok(status)
    }
    if https {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.unwrap_or_default().as_bytes()) {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        send(tls, request).await
    } else {
        send(tcp, request).await
    }
}

/// Starts and stops webhook workers as the routing configuration changes, until shutdown.
pub async fn run(
    hub: Hub,
    partitions: Partitions,
    reader: EventReader,
    health: WebhookHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let endpoints: Vec<Endpoint> = hub
            .read(ReadConsistency::Stale, |s| {
                Ok(s.routing
                    .endpoints
                    .values()
                    .filter(|e| e.kind == "webhook" || e.kind == "file")
                    .cloned()
                    .collect())
            })
            .await
            .unwrap_or_default();
        workers.retain(|name, task| {
            let keep = endpoints.iter().any(|e| &e.name == name) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for endpoint in endpoints {
            workers.entry(endpoint.name.clone()).or_insert_with(|| {
                if endpoint.kind == "file" {
                    tokio::spawn(write_files(
                        hub.clone(),
                        partitions.clone(),
                        reader.clone(),
                        health.clone(),
                        endpoint.name,
                    ))
                } else {
                    tokio::spawn(deliver(
                        hub.clone(),
                        partitions.clone(),
                        reader.clone(),
                        health.clone(),
                        endpoint.name,
                    ))
                }
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {
                for (_, task) in workers {
                    task.abort();
                }
                return;
            }
        }
    }
}

/// Delivers one webhook endpoint's stream forever (until aborted).
async fn deliver(
    hub: Hub,
    partitions: Partitions,
    reader: EventReader,
    health: WebhookHealth,
    name: String,
) {
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let current = {
            let name = name.clone();
            hub.read(ReadConsistency::Stale, move |s| {
                Ok(s.routing.endpoints.get(&name).cloned())
            })
            .await
            .ok()
            .flatten()
        };
        let Some(endpoint) = current else {
            return;
        };
        let url = endpoint.url.clone().unwrap_or_default();
        let dead_after = endpoint
            .dead_after_secs
            .map_or(DEFAULT_DEAD_AFTER, Duration::from_secs);
        let mut idle = true;
        for partition in 0..reader.partitions() {
            let key = endpoint.stream_id * STREAM_STRIDE + partition;
            // The partition's leader in the primary region delivers; its cursor is replicated
            // (and copied to the secondary region), so the next leader resumes where this one
            // stopped.
            if !partitions.delivers(partition) {
                continue;
            }
            let cursor_name = format!("webhook/{name}/{key}");
            let next = partitions.cursor(partition, &cursor_name);
            let Ok(events) = reader.read(key, next, 100) else {
                continue;
            };
            for event in events {
                idle = false;
                let mut envelope = event.to_json();
                if let Some(obj) = envelope.as_object_mut() {
                    obj.insert("endpoint".into(), serde_json::Value::String(name.clone()));
                }
                let body = Bytes::from(envelope.to_string());
                loop {
                    match post_json(&url, endpoint.ca_certificate.as_deref(), body.clone()).await {
                        Ok(status) if (200..300).contains(&status) => {
                            let degraded = failing_since.take().is_some();
                            backoff = Duration::from_millis(200);
                            health.update(&name, |h| {
                                h.delivered += 1;
                                h.status = if degraded {
                                    HealthStatus::Degraded
                                } else {
                                    HealthStatus::Healthy
                                };
                            });
                            break;
                        }
                        result => {
                            let error = match result {
                                Ok(status) => format!("HTTP {status}"),
                                Err(e) => e,
                            };
                            let since = *failing_since.get_or_insert_with(Instant::now);
                            let dead = since.elapsed() >= dead_after;
                            health.update(&name, |h| {
                                h.failures += 1;
                                h.last_error = Some(error.clone());
                                h.status = if dead {
                                    HealthStatus::Dead
                                } else {
                                    HealthStatus::Unhealthy
                                };
                            });
                            if dead {
                                health.update(&name, |h| h.dropped += 1);
                                break;
                            }
                            tracing::debug!(endpoint = name, %error, ?backoff, "webhook delivery failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                if let Err(e) = partitions
                    .set_cursor(partition, &cursor_name, event.offset + 1)
                    .await
                {
                    tracing::warn!(endpoint = name, error = %e, "saving webhook cursor");
                }
            }
        }
        if idle {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Default seconds between file batches (Azure's default).
const DEFAULT_BATCH_SECS: u64 = 300;

/// Writes one file endpoint's stream as batches of JSON lines, one file per partition and batch,
/// named like Azure's storage endpoints: `{hub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}`, plus the
/// first offset so batches in the same minute never collide. A file is fsync'd before the cursor
/// moves past its records (at least once).
async fn write_files(
    hub: Hub,
    partitions: Partitions,
    reader: EventReader,
    health: WebhookHealth,
    name: String,
) {
    loop {
        let current = {
            let name = name.clone();
            hub.read(ReadConsistency::Stale, move |s| {
                Ok(s.routing.endpoints.get(&name).cloned())
            })
            .await
            .ok()
            .flatten()
        };
        let Some(endpoint) = current else {
            return;
        };
        let every =
            Duration::from_secs(endpoint.batch_frequency_secs.unwrap_or(DEFAULT_BATCH_SECS));
        tokio::time::sleep(every).await;
        let dir = std::path::PathBuf::from(endpoint.directory.clone().unwrap_or_default());
        for partition in 0..reader.partitions() {
            let key = endpoint.stream_id * STREAM_STRIDE + partition;
            // The partition's leader in the primary region delivers; its cursor is replicated
            // (and copied to the secondary region), so the next leader resumes where this one
            // stopped.
            if !partitions.delivers(partition) {
                continue;
            }
            let cursor_name = format!("file/{name}/{key}");
            let next = partitions.cursor(partition, &cursor_name);
            let Ok(events) = reader.read(key, next, 100_000) else {
                continue;
            };
            let (Some(first), Some(last)) = (events.first(), events.last()) else {
                continue;
            };
            let now = crate::clock::utc_now();
            let path = dir
                .join("meridian")
                .join(partition.to_string())
                .join(now.format("%Y/%m/%d/%H/%M").to_string());
            let file = path.join(format!("{:020}.json", first.offset));
            let mut text = String::new();
            for e in &events {
                text.push_str(&e.to_json().to_string());
                text.push('\n');
            }
            let written = tokio::task::spawn_blocking({
                let (path, file) = (path.clone(), file.clone());
                move || -> std::io::Result<()> {
                    use std::io::Write;
                    std::fs::create_dir_all(&path)?;
                    let mut f = std::fs::File::create(&file)?;
                    f.write_all(text.as_bytes())?;
                    f.sync_all()
                }
            })
            .await;
            match written {
                Ok(Ok(())) => {
                    let count = events.len() as u64;
                    health.update(&name, |h| {
                        h.delivered += count;
                        h.status = HealthStatus::Healthy;
                    });
                    if let Err(e) = partitions
                        .set_cursor(partition, &cursor_name, last.offset + 1)
                        .await
                    {
                        tracing::warn!(endpoint = name, error = %e, "saving file cursor");
                    }
                }
                Ok(Err(e)) => health.update(&name, |h| {
                    h.failures += 1;
                    h.status = HealthStatus::Unhealthy;
                    h.last_error = Some(format!("{}: {e}", file.display()));
                }),
                Err(e) => tracing::error!(endpoint = name, error = %e, "file writer panicked"),
            }
        }
    }
}
