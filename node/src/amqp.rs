//! The AMQP 1.0 endpoint the official service SDKs use: C2D sends and feedback (`azure-iot-hub`,
//! `azure-iothub`) and the Event Hub-compatible telemetry endpoint (`azure-eventhub`,
//! `@azure/event-hubs`). Built on fe2o3-amqp's acceptor (docs/adr/010-amqp-endpoint.md); TLS is
//! ours, on port 5671 and on the HTTPS port (a TLS connection whose first bytes are `AMQP`).
//!
//! Front-end only: it decodes frames and calls the hub (C2D queues, feedback), the partition
//! reader and the token checks of [`cbs`]; address and selector parsing are pure ([`address`]).

pub mod address;
pub mod cbs;
mod device;
mod links;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
    ListenerSessionHandle, SaslAcceptor, SessionAcceptor, SupportedReceiverSettleModes,
    SupportedSenderSettleModes,
};
use fe2o3_amqp::types::definitions::{
    self, ErrorCondition, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp::types::messaging::TargetArchetype;
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::address::AmqpNode;
use self::cbs::{Grant, Grants};
use crate::domain::HubError;
use crate::hub::Hub;
use crate::telemetry_api::EventReader;

/// `[amqp]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSection {
    /// AMQP over TLS (default `127.0.0.1:5671`, Azure's port: the Python service SDK cannot use
    /// another). Port 0 picks a free one.
    pub tls_listen: SocketAddr,
    /// Also accept AMQP on the HTTPS port (default true): SDKs that take the port from
    /// `HostName=host:port` (Node `azure-iothub`) or `Endpoint=sb://host:port` connect there.
    pub on_https: bool,
    /// The Event Hub-compatible name of the built-in events endpoint (default: the first DNS label
    /// of the hub's host name, as Azure's redirect samples derive it).
    pub event_hub_name: Option<String>,
    /// Most links one connection may open (default 256).
    pub max_links_per_connection: usize,
}

impl Default for AmqpSection {
    fn default() -> Self {
        Self {
            tls_listen: SocketAddr::from(([127, 0, 0, 1], 5671)),
            on_https: true,
            event_hub_name: None,
            max_links_per_connection: 256,
        }
    }
}

impl AmqpSection {
    /// The Event Hub-compatible name for a hub reached at `host_name` (`host[:port]`).
    pub fn event_hub_name(&self, host_name: &str) -> String {
        self.event_hub_name.clone().unwrap_or_else(|| {
            host_name
                .split([':', '.'])
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("meridian")
                .to_string()
        })
    }
}

/// What the AMQP endpoint serves from.
pub struct AmqpContext {
    /// The hub (policies, C2D queues, feedback).
    pub hub: Hub,
    /// Telemetry partitions.
    pub reader: EventReader,
    /// The host name clients use (`HostName=`), for redirects.
    pub host_name: String,
    /// The Event Hub-compatible name.
    pub event_hub: String,
    /// The port redirects point at (the AMQP TLS listener's).
    pub redirect_port: u16,
    /// Most links per connection.
    pub max_links: usize,
    /// The device endpoint's context: device AMQP connections register there like MQTT ones.
    pub mqtt: Arc<crate::mqtt::MqttContext>,
}

/// How long a client may take to send its protocol header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take from its protocol header to a completed Open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often links re-check that their token is still valid.
const TOKEN_CHECK: Duration = Duration::from_secs(1);
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// Serves AMQP over TLS on `listener` until `shutdown` turns true.
pub async fn serve_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<AmqpContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "amqp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, ctx, mut conn_shutdown) = (acceptor.clone(), ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "amqp tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            tokio::select! {
                _ = serve_connection(ctx, tls, Vec::new(), peer) => {}
                _ = conn_shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

/// A stream that first replays bytes already read (the protocol header), then reads on.
#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    /// `inner`, of which `prefix` was already read.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one AMQP connection on a TLS stream of which `read` bytes were already consumed (the
/// HTTPS listener reads a few to tell AMQP from HTTP).
pub async fn serve_connection<S>(
    ctx: Arc<AmqpContext>,
    mut stream: S,
    read: Vec<u8>,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    // The 8-byte protocol header says whether a SASL layer comes first: uamqp, pyamqp and
    // rhea 3 send `AMQP 3 1 0 0`; Node `azure-iothub` sends `AMQP 0 1 0 0` straight away.
    let mut header = read;
    if header.len() < 8 {
        let mut rest = vec![0u8; 8 - header.len()];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut rest)).await {
            Ok(Ok(_)) => header.extend_from_slice(&rest),
            _ => return,
        }
    }
    let conn = Arc::new(ConnectionState {
        ctx: ctx.clone(),
        grants: Mutex::new(Grants::default()),
        links: std::sync::atomic::AtomicUsize::new(0),
        device: tokio::sync::Mutex::new(None),
        closing: watch::channel(false).0,
    });
    let replay = Replay {
        prefix: header.clone(),
        at: 0,
        inner: stream,
    };
    // A client that does not finish SASL and Open in time (a stalled or malformed frame) is cut.
    let accepted = if header[..] == SASL_HEADER {
        let sasl = HubSasl { conn: conn.clone() };
        let acceptor = ConnectionAcceptor::builder()
            .container_id("meridian")
            .max_frame_size(MAX_FRAME)
            .channel_max(CHANNEL_MAX)
            .sasl_acceptor(sasl)
            .build();
        tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(replay)).await
    } else if header[..] == AMQP_HEADER {
        let acceptor = ConnectionAcceptor::builder()
            .container_id("meridian")
            .max_frame_size(MAX_FRAME)
            .channel_max(CHANNEL_MAX)
            .build();
        tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(replay)).await
    } else {
        // AMQP §2.2: answer an unsupported header with the one we support, then close.
        let mut stream = replay.inner;
        let _ = stream.write_all(&SASL_HEADER).await;
        let _ = stream.shutdown().await;
        tracing::debug!(%peer, "amqp: unsupported protocol header {header:?}");
        return;
    };
    let mut connection = match accepted {
        Ok(Ok(c)) => c,
        Err(_) => {
            tracing::debug!(%peer, "amqp open timed out");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "amqp open failed");
            return;
        }
    };
    tracing::debug!(%peer, "amqp connection open");
    serve_sessions(conn.clone(), &mut connection).await;
    let _ = connection.close().await;
    device::end(&conn).await;
}

/// Frame size we accept (what uamqp offers; pyamqp reads it as a number).
const MAX_FRAME: u32 = 65_536;
/// Highest session channel (pyamqp starts at 1).
const CHANNEL_MAX: u16 = 255;

/// One connection's shared state: its tokens and its link count.
pub(crate) struct ConnectionState {
    pub(crate) ctx: Arc<AmqpContext>,
    pub(crate) grants: Mutex<Grants>,
    links: std::sync::atomic::AtomicUsize,
    /// The device identity of a device connection, once its first device link attached.
    pub(crate) device: tokio::sync::Mutex<Option<Arc<device::DeviceSession>>>,
    /// Set to close the connection (the device connected elsewhere, was disabled, the node
    /// drains).
    closing: watch::Sender<bool>,
}

impl ConnectionState {
    /// Closes the connection.
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether the connection's tokens allow `node` now.
    pub(crate) fn check(&self, node: &AmqpNode) -> Result<(), HubError> {
        let Some(resource) = node.resource(&self.ctx.event_hub) else {
            return Ok(());
        };
        let now = crate::clock::unix_now();
        match self.grants.lock() {
            Ok(g) => g.check(&resource, node.permission(), now),
            Err(_) => Err(HubError::new(
                meridian_proto::ErrorCode::ServerError,
                "grants lock poisoned",
            )),
        }
    }

    /// Verifies a token for `audience`: a hub policy's, or a device's (or module's) own key.
    pub(crate) fn verify(&self, token: &str, audience: &str) -> Result<Grant, HubError> {
        let now = crate::clock::unix_now();
        if let Some(scope) = cbs::device_scope(token) {
            // `sr` = host/devices/{id}[/modules/{m}], ids as sent (the scope is lower-cased).
            let parsed = crate::auth::SasToken::parse(token)?;
            let decoded = percent_encoding::percent_decode_str(&parsed.resource_raw)
                .decode_utf8_lossy()
                .into_owned();
            let path: Vec<&str> = address::path_segments(&decoded);
            let path: Vec<&str> = if decoded.contains("://") {
                path
            } else {
                // `host/devices/...`: drop the host.
                path.get(1..).map(<[&str]>::to_vec).unwrap_or_default()
            };
            let (device, module) = match path.as_slice() {
                [_, d] => (d.to_string(), None),
                [_, d, _, m] => (d.to_string(), Some(m.to_string())),
                _ => {
                    return Err(HubError::new(
                        meridian_proto::ErrorCode::IotHubUnauthorizedAccess,
                        "a device token's sr must be host/devices/{id}",
                    ));
                }
            };
            self.ctx
                .hub
                .read_local(|s| {
                    crate::auth::authenticate_device(
                        s,
                        &device,
                        module.as_deref(),
                        crate::auth::DeviceCredential::Sas(token),
                        now,
                    )
                })
                .unwrap_or_else(|| {
                    Err(HubError::new(
                        meridian_proto::ErrorCode::ServerError,
                        "hub state unavailable",
                    ))
                })?;
            return cbs::device_grant(token, audience, scope);
        }
        self.ctx
            .hub
            .read_local(|s| cbs::verify_token(token, audience, |name| s.policy(name), now))
            .unwrap_or_else(|| {
                Err(HubError::new(
                    meridian_proto::ErrorCode::ServerError,
                    "hub state unavailable",
                ))
            })
    }

    pub(crate) fn put(&self, grant: Grant) {
        if let Ok(mut g) = self.grants.lock() {
            g.put(grant);
        }
    }
}

/// SASL: `MSSBCBS` and `ANONYMOUS` authenticate nothing (CBS put-token follows); `PLAIN` with
/// `<policy>@sas.root.<hub>` and a SAS token as password authorizes the connection like a
/// put-token (the IoT Hub → Event Hubs redirect samples log in this way).
#[derive(Clone)]
struct HubSasl {
    conn: Arc<ConnectionState>,
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            "MSSBCBS" | "ANONYMOUS" => SaslCode::Ok,
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                let mut parts = response.split(|b| *b == 0);
                let (_authz, _user, password) = (parts.next(), parts.next(), parts.next());
                match password
                    .and_then(|p| std::str::from_utf8(p).ok())
                    .map(|token| self.conn.verify(token, ""))
                {
                    Some(Ok(grant)) => {
                        self.conn.put(grant);
                        SaslCode::Ok
                    }
                    _ => SaslCode::Auth,
                }
            }
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No mechanism here sends challenges, so a response is a protocol error.
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

async fn serve_sessions(conn: Arc<ConnectionState>, connection: &mut ListenerConnectionHandle) {
    let session_acceptor = SessionAcceptor::builder().handle_max(1023u32).build();
    let mut sessions = tokio::task::JoinSet::new();
    let mut closing = conn.closing.subscribe();
    loop {
        let incoming = tokio::select! {
            incoming = connection.next_incoming_session() => incoming,
            _ = closing.wait_for(|c| *c) => None,
        };
        let Some(incoming) = incoming else {
            break;
        };
        let session = match session_acceptor
            .accept_incoming_session(incoming, connection)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "amqp begin refused");
                continue;
            }
        };
        sessions.spawn(serve_links(conn.clone(), session));
    }
    sessions.abort_all();
}

/// The address a remote attach names: the target when the client sends, else the source.
fn attach_address(attach: &Attach) -> String {
    match attach.role {
        Role::Sender => match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone().unwrap_or_default(),
            #[allow(unreachable_patterns)]
            _ => String::new(),
        },
        Role::Receiver => attach
            .source
            .as_ref()
            .and_then(|s| s.address.clone())
            .unwrap_or_default(),
    }
}

/// Link acceptors: incoming links settle first (uamqp hangs on `second`); replies and events go
/// pre-settled (pyamqp never settles them); feedback stays unsettled so complete/abandon return.
type HubLinkAcceptor = LinkAcceptor<
    fn(fe2o3_amqp::types::messaging::Source) -> Option<fe2o3_amqp::types::messaging::Source>,
    fn(fe2o3_amqp::types::messaging::Target) -> Option<fe2o3_amqp::types::messaging::Target>,
>;

struct Acceptors {
    incoming: HubLinkAcceptor,
    presettled: HubLinkAcceptor,
    unsettled: HubLinkAcceptor,
}

fn acceptors() -> Acceptors {
    let base = || {
        LinkAcceptor::builder()
            .verify_incoming_source(false)
            .verify_incoming_target(false)
            .max_message_size(1024 * 1024u64)
    };
    Acceptors {
        incoming: base()
            .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
            .fallback_receiver_settle_mode(ReceiverSettleMode::First)
            .build(),
        presettled: base()
            .supported_sender_settle_modes(SupportedSenderSettleModes::Settled)
            .fallback_sender_settle_mode(SenderSettleMode::Settled)
            .build(),
        unsettled: base()
            .supported_sender_settle_modes(SupportedSenderSettleModes::Unsettled)
            .fallback_sender_settle_mode(SenderSettleMode::Unsettled)
            .build(),
    }
}

/// An AMQP error with an Azure condition.
pub(crate) fn amqp_error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition.to_string())),
        Some(description.into()),
        None,
    )
}

pub(crate) fn hub_error(e: &HubError) -> definitions::Error {
    amqp_error(e.code.amqp_condition(), e.message.clone())
}

async fn serve_links(conn: Arc<ConnectionState>, mut session: ListenerSessionHandle) {
    let acceptors = acceptors();
    let replies = Arc::new(links::Replies::default());
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let address = attach_address(&attach);
        let role = attach.role.clone();
        let node = AmqpNode::parse(&address, &conn.ctx.event_hub);
        let over_limit = conn
            .links
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            >= conn.ctx.max_links;
        let acceptor = match (&node, &role) {
            (_, Role::Sender) => &acceptors.incoming,
            (
                Ok(
                    AmqpNode::Feedback
                    | AmqpNode::FileNotifications
                    | AmqpNode::Device {
                        link: address::DeviceLink::CloudToDevice,
                        ..
                    },
                ),
                Role::Receiver,
            ) => &acceptors.unsettled,
            (_, Role::Receiver) => &acceptors.presettled,
        };
        let filter = links::selector_of(&attach);
        let name = attach.name.clone();
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, %address, "amqp attach failed");
                conn.links
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
        };
        // Refusals: AMQP has no "refuse attach", so the link is attached and closed at once
        // with the error (what brokers do too).
        let refusal = match &node {
            _ if over_limit => Some(amqp_error(
                "amqp:resource-limit-exceeded",
                format!("at most {} links per connection", conn.ctx.max_links),
            )),
            Err(e) => Some(hub_error(e)),
            Ok(n) => conn.check(n).err().map(|e| hub_error(&e)),
        };
        let conn2 = conn.clone();
        let replies = replies.clone();
        tasks.spawn(async move {
            match (refusal, node, link) {
                (Some(error), _, link) => links::refuse(link, error).await,
                (None, Ok(node), link) => {
                    links::serve(conn2.clone(), replies, node, name, address, filter, link).await
                }
                (None, Err(_), _) => {}
            }
            conn2
                .links
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    tasks.abort_all();
}

impl From<LinkEndpoint> for links::Link {
    fn from(l: LinkEndpoint) -> Self {
        match l {
            LinkEndpoint::Sender(s) => links::Link::Sender(s),
            LinkEndpoint::Receiver(r) => links::Link::Receiver(r),
        }
    }
}
