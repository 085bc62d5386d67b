//! A bare MQTT 3.1.1 device client over TLS with exact control of every packet, built on the same
//! codec as the server: used by the rules-of-the-road and crash tests and by the telemetry
//! benchmark, where the official SDKs cannot give per-message PUBACK timing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::ClientError;
use bytes::BytesMut;
pub use rumqttc::mqttbytes::v4::ConnectReturnCode as ConnAckCode;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// One device connection.
pub struct RawMqtt {
    reader: ReadHalf<TlsStream<TcpStream>>,
    writer: WriteHalf<TlsStream<TcpStream>>,
    buf: BytesMut,
}

type Result<T> = std::result::Result<T, ClientError>;

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// A device SAS token for `host/devices/{device}` signed with the device key, valid for
/// `ttl_secs` (negative for an already expired token).
pub fn device_token(host: &str, device: &str, key: &str, ttl_secs: i64) -> Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(transport)?
        .as_secs() as i64;
    crate::auth::sign(
        &format!("{host}/devices/{device}"),
        key,
        (now + ttl_secs).max(0) as u64,
        None,
    )
    .map_err(|e| ClientError::ConnectionString(e.message))
}

/// A TLS client configuration trusting `ca` that presents a client certificate chain (PEM) with its
/// key (PEM), for X.509 devices.
pub fn tls_config_with_certificate(
    ca: &Path,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>> {
    let roots = root_store(ca)?;
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Ca(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| ClientError::Ca(e.to_string()))?
        .ok_or_else(|| ClientError::Ca("no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(transport)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(transport)?,
    ))
}

fn root_store(ca: &Path) -> Result<rustls::RootCertStore> {
    let pem = std::fs::read(ca).map_err(|e| ClientError::Ca(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.map_err(|e| ClientError::Ca(e.to_string()))?)
            .map_err(|e| ClientError::Ca(e.to_string()))?;
    }
    Ok(roots)
}

/// A TLS client configuration trusting the CA in `ca` (PEM).
pub fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let roots = root_store(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(transport)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

impl RawMqtt {
    /// Opens TLS and sends CONNECT; returns the client and the CONNACK code and session flag.
    pub async fn connect(
        addr: std::net::SocketAddr,
        ca: &Path,
        client_id: &str,
        password: &str,
        clean_session: bool,
        keep_alive: u16,
    ) -> Result<(Self, ConnectReturnCode, bool)> {
        let tls = tls_config(ca)?;
        Self::connect_with(
            addr,
            None,
            tls,
            client_id,
            password,
            clean_session,
            keep_alive,
        )
        .await
    }

    /// Like [`RawMqtt::connect`] with a shared TLS configuration and an optional local address
    /// (several loopback source addresses get past the ephemeral-port limit in large tests).
    pub async fn connect_with(
        addr: std::net::SocketAddr,
        local: Option<std::net::IpAddr>,
        tls: Arc<rustls::ClientConfig>,
        client_id: &str,
        password: &str,
        clean_session: bool,
        keep_alive: u16,
    ) -> Result<(Self, ConnectReturnCode, bool)> {
        let tcp = match local {
            Some(ip) => {
                let socket = TcpSocket::new_v4().map_err(transport)?;
                socket
                    .bind(std::net::SocketAddr::new(ip, 0))
                    .map_err(transport)?;
                socket.connect(addr).await.map_err(transport)?
            }
            None => TcpStream::connect(addr).await.map_err(transport)?,
        };
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").map_err(transport)?;
        let tls = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(transport)?;
        let (reader, writer) = tokio::io::split(tls);
        let mut client = Self {
            reader,
            writer,
            buf: BytesMut::new(),
        };
        let mut connect = Connect::new(client_id);
        connect.clean_session = clean_session;
        connect.keep_alive = keep_alive;
        if !password.is_empty() {
            connect.login = Some(Login::new(
                format!("localhost/{client_id}/?api-version=2021-04-12"),
                password,
            ));
        }
        client.send(Packet::Connect(connect)).await?;
        match client.recv(Duration::from_secs(10)).await? {
            Some(Packet::ConnAck(ack)) => Ok((client, ack.code, ack.session_present)),
            other => Err(ClientError::Transport(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    /// Writes one packet.
    pub async fn send(&mut self, packet: Packet) -> Result<()> {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).map_err(transport)?;
        self.writer.write_all(&out).await.map_err(transport)?;
        Ok(())
    }

    /// Writes raw bytes (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes).await.map_err(transport)?;
        Ok(())
    }

    /// The next packet, `None` when the server closed the connection, error on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Packet>> {
        read_packet(&mut self.reader, &mut self.buf, timeout).await
    }

    /// The reading half and the raw writing half, for a test that writes while it reads.
    pub fn into_split(self) -> (RawMqttReader, WriteHalf<TlsStream<TcpStream>>) {
        let reader = RawMqttReader {
            reader: self.reader,
            buf: self.buf,
        };
        (reader, self.writer)
    }

    /// This connection as a load generator's publisher of `body` to `topic`.
    pub fn into_publisher(self, topic: &str, body: &[u8]) -> Result<QosOnePublisher> {
        let (packet, pkid_at) = encode_publish(topic, body)?;
        Ok(QosOnePublisher {
            stream: self.reader.unsplit(self.writer),
            buf: self.buf,
            packet,
            pkid_at,
        })
    }

    /// Whether the server closes the connection within `timeout` (packets before that are
    /// skipped).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Publishes QoS 1 and waits for the PUBACK of `pkid`; `Ok(false)` when the connection closed
    /// first.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payload: &[u8],
        pkid: u16,
        timeout: Duration,
    ) -> Result<bool> {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = pkid;
        if self.send(Packet::Publish(publish)).await.is_err() {
            return Ok(false);
        }
        loop {
            match self.recv(timeout).await? {
                Some(Packet::PubAck(ack)) if ack.pkid == pkid => return Ok(true),
                Some(_) => continue,
                None => return Ok(false),
            }
        }
    }
}

/// The reading half of a [`RawMqtt`] ([`RawMqtt::into_split`]).
pub struct RawMqttReader {
    reader: ReadHalf<TlsStream<TcpStream>>,
    buf: BytesMut,
}

impl RawMqttReader {
    /// The next packet, `None` when the server closed the connection, error on timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Packet>> {
        read_packet(&mut self.reader, &mut self.buf, timeout).await
    }
}

async fn read_packet(
    reader: &mut ReadHalf<TlsStream<TcpStream>>,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Option<Packet>> {
    tokio::time::timeout(timeout, next_packet(reader, buf))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// The next packet, `None` when the connection closed.
async fn next_packet(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<Packet>> {
    loop {
        match Packet::read(buf, 1 << 20) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(transport(format!("decode: {e}"))),
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// A device connection that publishes one QoS 1 message at a time and waits for its PUBACK, for
/// a load generator sharing the cores with the broker it measures: the PUBLISH is encoded once
/// (each message rewrites only its packet id), with no lock between halves of the stream and no
/// timer or allocation per message (the caller bounds the whole run).
pub struct QosOnePublisher {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    packet: Vec<u8>,
    pkid_at: usize,
}

impl QosOnePublisher {
    /// Publishes with packet id `pkid` and waits for its PUBACK (other packets are skipped);
    /// `Ok(false)` when the connection closed first.
    pub async fn publish_acked(&mut self, pkid: u16) -> Result<bool> {
        self.packet[self.pkid_at..self.pkid_at + 2].copy_from_slice(&pkid.to_be_bytes());
        if self.stream.write_all(&self.packet).await.is_err() {
            return Ok(false);
        }
        wait_puback(&mut self.stream, &mut self.buf, pkid).await
    }
}

/// A QoS 1 PUBLISH of `body` to `topic` and where its packet id sits.
fn encode_publish(topic: &str, body: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, body.to_vec());
    // The codec refuses packet id 0; every message rewrites it anyway.
    publish.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Publish(publish)
        .write(&mut out, usize::MAX)
        .map_err(transport)?;
    // MQTT 3.1.1 has no properties: the packet id comes right before the body.
    let pkid_at = out.len() - body.len() - 2;
    Ok((out.to_vec(), pkid_at))
}

/// Reads until the PUBACK of `pkid` (other packets are skipped); false when the connection closed.
async fn wait_puback(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
    pkid: u16,
) -> Result<bool> {
    loop {
        match next_packet(reader, buf).await? {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => return Ok(true),
            Some(_) => continue,
            None => return Ok(false),
        }
    }
}

/// Connects as device `id` through `addr`, subscribes to its cloud-to-device messages and
/// completes (PUBACKs) every one delivered, until none arrives for `quiet`. Returns their bodies
/// in delivery order: a checker's view of what a device's queue held.
pub async fn receive_c2d_bodies(
    addr: std::net::SocketAddr,
    ca: &Path,
    id: &str,
    key: &str,
    quiet: Duration,
) -> Result<Vec<Vec<u8>>> {
    use rumqttc::mqttbytes::v4::{PubAck, Subscribe};
    let token = device_token("localhost", id, key, 600)?;
    let (mut client, code, _) = RawMqtt::connect(addr, ca, id, &token, true, 60).await?;
    if code != ConnectReturnCode::Success {
        return Err(transport(format!("{id}: CONNACK {code:?}")));
    }
    client
        .send(Packet::Subscribe(Subscribe::new(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        )))
        .await?;
    let mut bodies = Vec::new();
    loop {
        match client.recv(quiet).await {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos == QoS::AtLeastOnce {
                    client.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
                }
                bodies.push(p.payload.to_vec());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(ClientError::Timeout(_)) => return Ok(bodies),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_publish_is_mqtt_311_qos1_with_the_packet_id_it_is_given() {
        let with_pkid = |topic: &str, body: &[u8], pkid: u16| {
            let (mut bytes, at) = encode_publish(topic, body).expect("encodes");
            bytes[at..at + 2].copy_from_slice(&pkid.to_be_bytes());
            bytes
        };
        assert_eq!(
            with_pkid("t", b"ab", 0x0102),
            [0x32, 7, 0, 1, b't', 1, 2, b'a', b'b']
        );
        // 256-byte bodies need two bytes of remaining length.
        let body = vec![b'x'; 256];
        let topic = "devices/d1/messages/events/";
        let bytes = with_pkid(topic, &body, 60_001);
        let remaining = 2 + topic.len() + 2 + 256;
        assert_eq!(bytes.len(), 1 + 2 + remaining);
        assert_eq!(bytes[3 + 2 + topic.len()..][..2], 60_001u16.to_be_bytes());
        let mut short = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(matches!(
            Packet::read(&mut short, 1 << 20),
            Err(CodecError::InsufficientBytes(_))
        ));
        match Packet::read(&mut BytesMut::from(&bytes[..]), 1 << 20) {
            Ok(Packet::Publish(p)) => {
                assert_eq!(
                    (p.pkid, p.qos, &p.topic[..]),
                    (60_001, QoS::AtLeastOnce, topic)
                );
                assert_eq!(p.payload, body);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn wait_puback_skips_other_packets_and_waits_for_its_own() {
        // A PUBACK for 7, a PINGRESP, then the PUBACK for 9 and the start of the next packet.
        let wire: &[u8] = &[0x40, 2, 0, 7, 0xd0, 0, 0x40, 2, 0, 9, 0x40];
        let (mut reader, mut buf) = (wire, BytesMut::new());
        assert!(matches!(
            wait_puback(&mut reader, &mut buf, 9).await,
            Ok(true)
        ));
        assert_eq!(&buf[..], [0x40]);
        // The connection closes before the PUBACK of 10 is whole.
        assert!(matches!(
            wait_puback(&mut reader, &mut buf, 10).await,
            Ok(false)
        ));
    }
}
