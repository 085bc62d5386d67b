//! The device endpoint: MQTT 3.1.1 over TLS (and over WebSockets on the HTTPS port), built on the
//! rumqtt project's codec (docs/adr/001). Protocol handling lives in [`connection`]; this module
//! holds the listener, the shared context and the bridge from state-machine events to live
//! connections.

pub mod connection;
mod outlet;
pub mod session;
pub mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::domain::events::HubEvent;
use crate::domain::{HubError, HubResult};
use crate::hub::Hub;
use meridian_proto::ErrorCode;
pub use session::{MethodReply, Outbound, Sessions};

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// MQTT over TLS (default `127.0.0.1:8883`, the port the Azure SDKs dial).
    pub tls_listen: SocketAddr,
    /// Telemetry partitions per hub (default 4; fixed once the hub has data).
    pub partitions: u32,
    /// Largest MQTT packet accepted, in bytes (default 512 KiB; telemetry bodies stop at 256 KB).
    pub max_packet_bytes: usize,
    /// Largest telemetry body in bytes (Azure: 256 KB); bigger messages close the connection.
    pub max_telemetry_bytes: usize,
    /// Telemetry kept on this node, in bytes (default 64 GiB); past it the oldest is dropped.
    pub retention_bytes: u64,
    /// Seconds a delivered C2D message waits for its PUBACK before it is delivered again
    /// (Azure's lock timeout, default 60).
    pub c2d_lock_timeout_secs: u64,
    /// Seconds telemetry is kept (Azure: 1 to 7 days, default 1 day).
    pub retention_secs: u64,
    /// Seconds between retention sweeps (default 60).
    pub retention_check_secs: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            tls_listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            partitions: 4,
            max_packet_bytes: 512 * 1024,
            max_telemetry_bytes: crate::domain::telemetry::MAX_TELEMETRY_BYTES,
            retention_bytes: 64 * 1024 * 1024 * 1024,
            c2d_lock_timeout_secs: 60,
            retention_secs: 24 * 3600,
            retention_check_secs: 60,
        }
    }
}

/// What every connection shares.
pub struct MqttContext {
    /// The hub.
    pub hub: Hub,
    /// The replicated partition groups every telemetry append goes through.
    pub partition_groups: crate::partition::Partitions,
    /// Set while the control plane drains this node: new connections are refused.
    pub draining: std::sync::atomic::AtomicBool,
    /// Live connections on this node.
    pub sessions: Sessions,
    /// Partition count.
    pub partitions: u32,
    /// Largest packet.
    pub max_packet_bytes: usize,
    /// Largest telemetry body.
    pub max_telemetry_bytes: usize,
    /// This node's Raft id (recorded as the owner of its device connections).
    pub node_id: u64,
    /// How long a delivered C2D message stays locked before redelivery.
    pub c2d_lock_timeout: Duration,
}

/// The partition that records device connect/disconnect events (outside the telemetry range), for
/// routing to consume later (Azure's DeviceConnected/DeviceDisconnected). Its offsets are the
/// events' increasing sequence numbers.
pub const CONNECTION_EVENTS_PARTITION: u32 = u32::MAX;

/// Longest direct-method payload (Azure: 128 KB).
pub const MAX_METHOD_PAYLOAD: usize = 128 * 1024;

impl MqttContext {
    /// Routes a twin-change, lifecycle or connection-state notification: it is stored in the
    /// streams of the routes listening to its source (no fallback: without a route it is dropped,
    /// as in Azure).
    pub async fn route_notification(&self, n: &crate::domain::events::Notification) {
        use crate::domain::routing::{RouteSource, RoutingDocument, STREAM_STRIDE};
        let now = crate::clock::iso_now();
        let timestamp = if n.timestamp.is_empty() {
            now.clone()
        } else {
            n.timestamp.clone()
        };
        let source_name = match n.source {
            RouteSource::TwinChangeEvents => "twinChangeEvents",
            RouteSource::DeviceLifecycleEvents => "deviceLifecycleEvents",
            RouteSource::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
            RouteSource::DeviceMessages => "Telemetry",
        };
        let mut system = std::collections::BTreeMap::new();
        system.insert("iothub-message-source".to_string(), source_name.to_string());
        system.insert(
            "iothub-connection-device-id".to_string(),
            n.device_id.to_string(),
        );
        if let Some(m) = &n.module_id {
            system.insert("iothub-connection-module-id".to_string(), m.to_string());
        }
        system.insert("iothub-enqueuedtime".to_string(), now);
        system.insert("content-type".to_string(), "application/json".to_string());
        system.insert("content-encoding".to_string(), "utf-8".to_string());
        let mut application = std::collections::BTreeMap::new();
        application.insert("hubName".to_string(), "meridian".to_string());
        application.insert("deviceId".to_string(), n.device_id.to_string());
        if let Some(m) = &n.module_id {
            application.insert("moduleId".to_string(), m.to_string());
        }
        application.insert("opType".to_string(), n.op_type.to_string());
        application.insert("iothub-message-schema".to_string(), n.schema.to_string());
        application.insert("operationTimestamp".to_string(), timestamp);
        let message = crate::domain::telemetry::TelemetryMessage {
            system_properties: system,
            application_properties: application,
            body: n.body.to_string().into_bytes(),
        };
        let device_id = n.device_id.clone();
        let streams = self
            .hub
            .read(crate::hub::ReadConsistency::Stale, |s| {
                let twin = s
                    .routing
                    .needs_twin(n.source)
                    .then(|| s.render_twin(&device_id, None).ok())
                    .flatten();
                let document = RoutingDocument {
                    system: &message.system_properties,
                    application: &message.application_properties,
                    body: Some(n.body.clone()),
                    twin,
                };
                Ok(s.routing.streams_for(n.source, &document))
            })
            .await
            .unwrap_or_default();
        if streams.is_empty() {
            return;
        }
        let partition =
            crate::domain::telemetry::partition_for(n.device_id.as_str(), self.partitions);
        let encoded = message.encode();
        let records = streams
            .into_iter()
            .map(|stream| (stream * STREAM_STRIDE + partition, encoded.clone()))
            .collect();
        if let Err(e) = self.partition_groups.append(records).await {
            tracing::warn!(device_id = %n.device_id, error = %e, "storing a routed notification failed");
        }
    }

    /// Appends a connection-state event (fsync'd) to [`CONNECTION_EVENTS_PARTITION`].
    pub async fn record_connection_event(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        connected: bool,
        now: &str,
    ) {
        let op = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        let mut system = std::collections::BTreeMap::new();
        system.insert(
            "iothub-message-source".to_string(),
            "deviceConnectionStateEvents".to_string(),
        );
        system.insert(
            "iothub-connection-device-id".to_string(),
            device_id.to_string(),
        );
        if let Some(m) = module_id {
            system.insert("iothub-connection-module-id".to_string(), m.to_string());
        }
        system.insert("iothub-enqueuedtime".to_string(), now.to_string());
        system.insert("content-type".to_string(), "application/json".to_string());
        let mut application = std::collections::BTreeMap::new();
        application.insert("opType".to_string(), op.to_string());
        let body = serde_json::json!({
            "deviceId": device_id, "moduleId": module_id, "opType": op, "operationTimestamp": now
        });
        let message = crate::domain::telemetry::TelemetryMessage {
            system_properties: system,
            application_properties: application,
            body: body.to_string().into_bytes(),
        };
        if let Err(e) = self
            .partition_groups
            .append(vec![(CONNECTION_EVENTS_PARTITION, message.encode())])
            .await
        {
            tracing::warn!(device_id, error = %e, "recording connection event failed");
        }
        // Routes listening to connection-state events get it too.
        if let Ok(device) = crate::domain::DeviceId::new(device_id) {
            let notification = crate::domain::events::Notification {
                source: crate::domain::routing::RouteSource::DeviceConnectionStateEvents,
                device_id: device,
                module_id: module_id.and_then(|m| crate::domain::ModuleId::new(m).ok()),
                op_type: op,
                schema: "deviceConnectionStateNotification",
                timestamp: now.to_string(),
                body: serde_json::json!({"deviceId": device_id, "moduleId": module_id, "opType": op}),
            };
            self.route_notification(&notification).await;
        }
    }

    /// Invokes a direct method on a device or module connected to this node.
    ///
    /// Waits up to `connect_timeout` for the device to connect, then up to `response_timeout` for
    /// its answer: 404 DeviceNotOnline when it is not connected (or not subscribed to methods),
    /// 504 GatewayTimeout when it does not answer in time.
    pub async fn invoke_method(
        &self,
        client_id: &str,
        name: &str,
        payload: &Value,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> HubResult<MethodReply> {
        let body = serde_json::to_vec(payload).unwrap_or_default();
        if body.len() > MAX_METHOD_PAYLOAD {
            return Err(HubError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "method payload is {} bytes; the limit is {MAX_METHOD_PAYLOAD}",
                    body.len()
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + connect_timeout;
        while !self.sessions.is_connected(client_id) {
            if tokio::time::Instant::now() >= deadline {
                return Err(HubError::new(
                    ErrorCode::DeviceNotOnline,
                    format!("{client_id} is not connected"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (reply, rx) = oneshot::channel();
        let sent = self.sessions.send(
            client_id,
            Outbound::Method {
                name: name.to_string(),
                payload: Bytes::from(body),
                reply,
            },
        );
        if !sent {
            return Err(HubError::new(
                ErrorCode::DeviceNotOnline,
                format!("{client_id} is not connected"),
            ));
        }
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(why))) => Err(HubError::new(ErrorCode::DeviceNotOnline, why)),
            Ok(Err(_)) => Err(HubError::new(
                ErrorCode::DeviceNotOnline,
                "the device disconnected",
            )),
            Err(_) => Err(HubError::new(
                ErrorCode::GatewayTimeout,
                format!("{client_id} did not answer {name} within {response_timeout:?}"),
            )),
        }
    }
}

/// Forwards state-machine events to the connections on this node that they concern.
pub async fn pump_events(
    ctx: Arc<MqttContext>,
    mut events: broadcast::Receiver<HubEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match event {
            Ok(HubEvent::DesiredPropertiesChanged {
                device_id,
                module_id,
                patch,
            }) => {
                let client_id = match &module_id {
                    Some(m) => format!("{device_id}/{m}"),
                    None => device_id.to_string(),
                };
                let version = patch.get("$version").and_then(Value::as_u64).unwrap_or(0);
                ctx.sessions.send(
                    &client_id,
                    Outbound::DesiredPatch {
                        version,
                        payload: Bytes::from(patch.to_string()),
                    },
                );
            }
            Ok(HubEvent::C2dEnqueued { device_id }) => {
                ctx.sessions
                    .send(device_id.as_str(), Outbound::C2dAvailable);
            }
            Ok(HubEvent::IdentityChanged { device_id }) => {
                for client in ctx.sessions.clients_of(device_id.as_str()) {
                    ctx.sessions.send(&client, Outbound::Recheck);
                }
            }
            Ok(HubEvent::Connected { client_id, node_id }) => {
                if node_id != ctx.node_id {
                    // The device connected elsewhere: one live connection in the whole cluster.
                    ctx.sessions.send(&client_id, Outbound::TakenOver);
                }
            }
            Ok(HubEvent::Notification(n)) => {
                // Every replica derives the notification; the leader stores it, once.
                let metrics = ctx.hub.raft().metrics().borrow().clone();
                if metrics.current_leader == Some(metrics.id) {
                    ctx.route_notification(&n).await;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Missed events: every connection re-checks its identity and its C2D queue.
                tracing::warn!(missed = n, "event pump lagged");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Accepts MQTT/TLS connections until shutdown; each connection runs in its own task, TLS
/// handshake included, so a slow client never holds up the others.
pub async fn serve_tls(
    ctx: Arc<MqttContext>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let tcp = SingleBufferWrites(tcp);
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "mqtt tls handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let client_chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| {
                    chain
                        .iter()
                        .map(|c| c.as_ref().to_vec())
                        .collect::<Vec<_>>()
                })
                .filter(|chain| !chain.is_empty());
            connection::serve(ctx, stream, peer.to_string(), client_chain).await;
        });
    }
}

/// A device's TCP stream that sends a lone buffer with `write(2)`, not `writev(2)`: rustls hands
/// every flush to `write_vectored`, and nearly every flush is one TLS record (a PUBACK), for which
/// the kernel's vectored path costs more than the plain one (see docs/BENCHMARKS.md, session 14).
/// Several buffers still go out in one `writev`.
struct SingleBufferWrites<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SingleBufferWrites<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SingleBufferWrites<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        match (non_empty.next(), non_empty.next()) {
            (Some(only), None) => std::pin::Pin::new(&mut self.0).poll_write(cx, only),
            _ => std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Runs everything the device endpoint does to untrusted bytes before any I/O: packet decoding,
/// client-id and SAS parsing, topic classification, property-bag and telemetry parsing. Must never
/// panic; the fuzz target (`node/fuzz`) and a bounded test drive it with arbitrary input.
pub fn exercise_untrusted_input(data: &[u8]) {
    use rumqttc::mqttbytes::v4::Packet;
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(packet) = Packet::read(&mut buf, 512 * 1024) {
        match packet {
            Packet::Connect(c) => {
                let _ = topics::ClientIdentity::parse(&c.client_id);
                if let Some(login) = &c.login {
                    let _ = crate::auth::SasToken::parse(&login.password);
                }
            }
            Packet::Publish(p) => {
                let identity = topics::ClientIdentity {
                    device_id: "d1".into(),
                    module_id: None,
                };
                if let Some(topics::DeviceRequest::Telemetry { bag }) =
                    topics::classify_publish(&identity, &p.topic)
                {
                    let sender = crate::domain::telemetry::Sender {
                        device_id: "d1".into(),
                        module_id: None,
                        generation_id: "1".into(),
                        auth_type: "sasToken",
                    };
                    if let Ok(m) = crate::domain::telemetry::TelemetryMessage::from_device(
                        &bag,
                        p.payload.to_vec(),
                        &sender,
                        "t",
                        p.retain,
                        crate::domain::telemetry::MAX_TELEMETRY_BYTES,
                    ) {
                        let _ = crate::domain::telemetry::TelemetryMessage::decode(&m.encode());
                    }
                }
                // Stored records are read back from disk and from peers: any bytes must decode
                // to a message or to None.
                let _ = crate::domain::telemetry::TelemetryMessage::decode(&p.payload);
                let _ = serde_json::from_slice::<serde_json::Value>(&p.payload);
            }
            Packet::Subscribe(s) => {
                let identity = topics::ClientIdentity {
                    device_id: "d1".into(),
                    module_id: Some("m".into()),
                };
                for f in &s.filters {
                    let _ = topics::subscription_allowed(&identity, &f.path);
                    let _ = topics::matches(&f.path, "devices/d1/messages/devicebound/x");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    /// Records how each write reached it.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
    }

    impl tokio::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.calls.push(("write", buf.to_vec()));
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.calls.push(("writev", all));
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_lone_buffer_is_written_plainly_and_several_in_one_vectored_write() {
        use std::io::IoSlice;
        use tokio::io::AsyncWriteExt;
        let mut w = super::SingleBufferWrites(Recorder::default());
        let one = [
            IoSlice::new(b""),
            IoSlice::new(b"puback"),
            IoSlice::new(b""),
        ];
        assert_eq!(w.write_vectored(&one).await.ok(), Some(6));
        let two = [IoSlice::new(b"rec1"), IoSlice::new(b"rec2")];
        assert_eq!(w.write_vectored(&two).await.ok(), Some(8));
        assert_eq!(
            w.0.calls,
            vec![
                ("write", b"puback".to_vec()),
                ("writev", b"rec1rec2".to_vec())
            ]
        );
    }

    use super::*;

    /// A bounded, deterministic fuzz run for CI: mutated valid packets and pure noise.
    #[test]
    fn untrusted_input_never_panics() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
        let mut seeds = Vec::new();
        for packet in [
            Packet::Connect({
                let mut c = Connect::new("d1/m");
                c.login = Some(Login::new(
                    "h/d1/?api-version=1",
                    "SharedAccessSignature sr=h%2Fdevices%2Fd1&sig=YQ%3D%3D&se=1",
                ));
                c
            }),
            Packet::Publish(Publish::new(
                "devices/d1/messages/events/%24.mid=1&a=%ZZ&%C3%28=1",
                QoS::AtLeastOnce,
                b"{\"a\":1}".to_vec(),
            )),
            Packet::Subscribe(Subscribe::new("$iothub/twin/res/#", QoS::AtLeastOnce)),
        ] {
            let mut out = bytes::BytesMut::new();
            if packet.write(&mut out, usize::MAX).is_ok() {
                seeds.push(out.to_vec());
            }
        }
        // xorshift: reproducible without a clock or an RNG crate
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            let seed = &seeds[round % seeds.len()];
            let mut input = seed.clone();
            for _ in 0..(next() % 8 + 1) {
                let pos = (next() as usize) % input.len().max(1);
                match next() % 3 {
                    0 if !input.is_empty() => input[pos] = next() as u8,
                    1 => input.insert(pos.min(input.len()), next() as u8),
                    _ if !input.is_empty() => {
                        input.remove(pos.min(input.len() - 1));
                    }
                    _ => {}
                }
            }
            exercise_untrusted_input(&input);
            let noise: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            exercise_untrusted_input(&noise);
        }
    }
}
