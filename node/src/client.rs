//! Minimal clients for Meridian's APIs, used by the integration tests, the chaos harness and the
//! benchmark drivers so they all speak to a node exactly as the SDKs do:
//! * [`ServiceClient`]: the service REST API (SAS signing with a hub policy, HTTPS with a given CA,
//!   keep-alive HTTP/1.1 connections);
//! * [`device::RawMqtt`]: a device over MQTT/TLS with packet-level control.

pub mod device;
pub mod region;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::auth;

/// `n` distinct loopback ports that were free a moment ago, for test and benchmark nodes.
///
/// They come from below the kernel's ephemeral range (32768 and up by default): a port from that
/// range can be taken as the source port of any outgoing connection (nodes dialling each other)
/// between this check and the node's bind, which made a node occasionally fail to start. All are
/// held at once before any is released, so none is handed out twice.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes start at different points of the span, so concurrent test binaries rarely probe
    // the same ports (and the bind below settles it when they do).
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if listeners.len() == n {
            break;
        }
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            listeners.push(l);
        }
    }
    if listeners.len() < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "fewer than {n} free loopback ports in {FIRST}..{}",
                FIRST + SPAN
            ),
        ));
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection string lacks a field or is malformed.
    #[error("connection string: {0}")]
    ConnectionString(String),
    /// Reading the CA file.
    #[error("ca: {0}")]
    Ca(String),
    /// TCP, TLS or HTTP failure.
    #[error("transport: {0}")]
    Transport(String),
    /// The request timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// Parsed `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName` (may include a port).
    pub host_name: String,
    /// `SharedAccessKeyName`.
    pub key_name: String,
    /// `SharedAccessKey` (base64).
    pub key: String,
}

impl ConnectionString {
    /// Parses a service connection string.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let fields: HashMap<&str, &str> = s
            .split(';')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .collect();
        let get = |k: &str| {
            fields
                .get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| ClientError::ConnectionString(format!("missing {k}")))
        };
        Ok(Self {
            host_name: get("HostName")?,
            key_name: get("SharedAccessKeyName")?,
            key: get("SharedAccessKey")?,
        })
    }
}

/// A service client bound to one node address.
#[derive(Clone)]
pub struct ServiceClient {
    addr: SocketAddr,
    credentials: ConnectionString,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    /// False for plain HTTPS peers: no api-version, no SAS.
    api_version: bool,
}

/// An HTTP reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response headers (lower-case names; last value wins).
    pub headers: HashMap<String, String>,
    /// Body bytes.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`Null` when empty or invalid).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What to put in the `Authorization` header.
#[derive(Debug, Clone)]
pub enum Authorization {
    /// A fresh token signed with the connection string's policy (valid for an hour).
    Policy,
    /// This exact header value.
    Header(String),
    /// No header.
    None,
}

impl ServiceClient {
    /// Creates a client for the node at `addr`, trusting the CA in `ca_pem`.
    pub fn new(
        connection_string: &str,
        addr: SocketAddr,
        ca_pem: &Path,
    ) -> Result<Self, ClientError> {
        let credentials = ConnectionString::parse(connection_string)?;
        let pem = std::fs::read(ca_pem)
            .map_err(|e| ClientError::Ca(format!("{}: {e}", ca_pem.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| ClientError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Ca(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(transport)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            addr,
            credentials,
            tls: Arc::new(tls),
            timeout: Duration::from_secs(30),
            api_version: true,
        })
    }

    /// The same client pointed at another node.
    pub fn with_addr(&self, addr: SocketAddr) -> Self {
        Self {
            addr,
            ..self.clone()
        }
    }

    /// Sets the per-request timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Speaks plain HTTPS: no `api-version` query and no SAS token for [`Authorization::Policy`]
    /// (for non-hub services, such as the peers the benchmarks compare against).
    pub fn plain_https(mut self) -> Self {
        self.api_version = false;
        self
    }

    /// The node address this client dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A SAS token for the whole hub signed with the policy, valid for `ttl`.
    pub fn token(&self, ttl: Duration) -> String {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + ttl.as_secs();
        auth::sign(
            &self.credentials.host_name,
            &self.credentials.key,
            expiry,
            Some(&self.credentials.key_name),
        )
        .unwrap_or_default()
    }

    /// Opens a keep-alive connection.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let fut = async {
            let tcp = TcpStream::connect(self.addr).await.map_err(transport)?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("localhost").map_err(transport)?;
            let tls = TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(transport)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(transport)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, ClientError>(sender)
        };
        let sender = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))??;
        Ok(Connection {
            client: self.clone(),
            sender,
        })
    }

    /// One request on a fresh connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, ClientError> {
        self.connect()
            .await?
            .send(
                method,
                path,
                body.map(Value::to_string).map(Bytes::from),
                headers,
                Authorization::Policy,
            )
            .await
    }
}

/// A keep-alive connection to one node.
pub struct Connection {
    client: ServiceClient,
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Sends a request; `path` includes the query (api-version is added when missing).
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
        authorization: Authorization,
    ) -> Result<Reply, ClientError> {
        let uri = if !self.client.api_version || path.contains("api-version=") {
            path.to_string()
        } else if path.contains('?') {
            format!("{path}&api-version=2021-04-12")
        } else {
            format!("{path}?api-version=2021-04-12")
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", &self.client.credentials.host_name)
            .header("accept", "application/json");
        match authorization {
            Authorization::Policy if self.client.api_version => {
                builder = builder.header(
                    "authorization",
                    self.client.token(Duration::from_secs(3600)),
                );
            }
            Authorization::Policy => {}
            Authorization::Header(h) => builder = builder.header("authorization", h),
            Authorization::None => {}
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json; charset=utf-8");
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(transport)?;
        let timeout = self.client.timeout;
        let fut = async {
            self.sender.ready().await.map_err(transport)?;
            let response = self.sender.send_request(request).await.map_err(transport)?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(transport)?
                .to_bytes();
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Sends a JSON request signed with the policy.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        self.send(
            method,
            path,
            body.map(|b| Bytes::from(b.to_string())),
            &[],
            Authorization::Policy,
        )
        .await
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = super::free_ports(40).expect("ports");
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 40);
        assert!(
            ports.iter().all(|p| (20_000..32_000).contains(p)),
            "{ports:?}"
        );
        let held: Vec<_> = ports
            .iter()
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).expect("bindable"))
            .collect();
        // A port in use is skipped, not handed out.
        let more = super::free_ports(5).expect("more");
        assert!(more.iter().all(|p| !ports.contains(p)), "{more:?}");
        drop(held);
    }

    use super::*;

    #[test]
    fn parses_connection_strings() {
        let cs = ConnectionString::parse(
            "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5PQ==",
        )
        .expect("valid");
        assert_eq!(cs.host_name, "localhost:8443");
        assert_eq!(cs.key, "a2V5PQ==");
        assert!(ConnectionString::parse("HostName=x").is_err());
    }
}
