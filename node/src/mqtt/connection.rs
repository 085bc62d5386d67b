//! One device connection: CONNECT and authentication, then the packet loop that routes telemetry
//! into the partition log (PUBACK only after fsync), serves twin requests, relays direct methods,
//! delivers C2D messages and enforces the hub's rules (own topics only, no QoS 2, keep-alive,
//! token expiry, one connection per device).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use super::MqttContext;
use super::outlet::{NO_PUBACK, Outlet, Stopped};
use super::session::{MethodReply, Outbound};
use super::topics::{self, ClientIdentity, DeviceRequest};
use crate::auth::{DeviceCredential, authenticate_device};
use crate::clock::{iso_now, unix_now};
use crate::domain::routing::{RouteSource, RoutingDocument, STREAM_STRIDE, json_body};
use crate::domain::telemetry::{Sender, TelemetryMessage, encode_property_bag, partition_for};
use crate::domain::{DeviceId, HubCommand, HubError, HubResponse, ModuleId};
use crate::hub::ReadConsistency;
use crate::partition::AppendWatcher;
use meridian_proto::error::MqttBehaviour;

/// The hub name enrichments and notifications carry (`$iothubname`).
const HUB_NAME: &str = "meridian";

/// How long a client has to send CONNECT after the transport is up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// C2D messages in flight (delivered, not yet acknowledged) per connection.
const MAX_C2D_INFLIGHT: usize = 10;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client sent DISCONNECT.
    Graceful,
    /// Transport closed, keep-alive missed, or a protocol error: the will message is published.
    Ungraceful,
    /// The hub closed it (rule broken, token expired, taken over, identity disabled).
    ByHub,
}

/// A C2D message sent and not yet acknowledged (Azure's "invisible" state).
struct InflightC2d {
    lock_token: String,
    sent: Instant,
    topic: String,
    payload: Bytes,
}

struct Conn<S> {
    ctx: Arc<MqttContext>,
    identity: ClientIdentity,
    device_id: DeviceId,
    module_id: Option<ModuleId>,
    client_id: String,
    clean_session: bool,
    subscriptions: Vec<(String, u8)>,
    /// Every packet to the device goes through here; telemetry PUBACKs are written into it by
    /// the partition batch that stored the message.
    outlet: Arc<Outlet<S>>,
    /// Who this connection's messages are stamped as sent by (anti-spoofing).
    sender: Sender,
    next_pkid: u16,
    c2d_inflight: HashMap<u16, InflightC2d>,
    pending_methods: HashMap<String, oneshot::Sender<Result<MethodReply, &'static str>>>,
    next_rid: u64,
}

async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, CodecError> {
    loop {
        match Packet::read(buf, max) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(e),
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Reads in a row after which a connection checks its outbound queue and timers without waiting
/// (its select polls the socket first).
const FAIR_EVERY: u32 = 16;

fn connack_code(error: &HubError) -> ConnectReturnCode {
    match error.code.mqtt_behaviour() {
        MqttBehaviour::ConnAckServerUnavailable => ConnectReturnCode::ServiceUnavailable,
        _ => ConnectReturnCode::NotAuthorized,
    }
}

/// How long a closing connection waits for its last telemetry append, so that a stored message
/// is still acknowledged when the device is there to read it.
const SETTLE_ON_CLOSE: Duration = Duration::from_secs(5);

/// Serves one MQTT connection until it ends.
pub async fn serve<S>(
    ctx: Arc<MqttContext>,
    stream: S,
    peer: String,
    client_chain: Option<Vec<Vec<u8>>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    // This task's waker: the outlet polls writes made from other tasks with it, and work queued
    // for the connection rings it (see outlet.rs).
    let task = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
    let outlet = Arc::new(Outlet::new(writer, task));
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let connect = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(&mut reader, &mut buf, ctx.max_packet_bytes),
    )
    .await
    {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        other => {
            tracing::debug!(%peer, ?other, "no CONNECT; closing");
            return;
        }
    };
    let refuse = |code: ConnectReturnCode| Packet::ConnAck(ConnAck::new(code, false));
    let parsed = ClientIdentity::parse(&connect.client_id).and_then(|i| {
        let device_id = DeviceId::new(i.device_id.clone()).ok()?;
        let module_id = match &i.module_id {
            Some(m) => Some(ModuleId::new(m.clone()).ok()?),
            None => None,
        };
        Some((i, device_id, module_id))
    });
    let Some((identity, device_id, module_id)) = parsed else {
        let _ = outlet.send(refuse(ConnectReturnCode::BadClientId)).await;
        return;
    };
    let client_id = identity.client_id();
    let (username, password) = connect
        .login
        .as_ref()
        .map(|l| (l.username.as_str(), l.password.as_str()))
        .unwrap_or(("", ""));
    // Username: `{host}/{clientId}/?api-version=...`; the client id in it must be this one.
    let username_ok = username.is_empty()
        || username
            .split_once('/')
            .is_some_and(|(_, rest)| rest.starts_with(&format!("{client_id}/")));
    if ctx.draining.load(std::sync::atomic::Ordering::Relaxed) {
        // CONNACK 3 (server unavailable): the SDKs retry, with their address list or DNS, elsewhere.
        tracing::info!(%peer, client_id, "connect refused: node draining");
        let _ = outlet
            .send(refuse(ConnectReturnCode::ServiceUnavailable))
            .await;
        return;
    }
    let credential = if !password.is_empty() {
        Some(DeviceCredential::Sas(password))
    } else {
        client_chain
            .as_deref()
            .map(DeviceCredential::ClientCertificate)
    };
    let auth = match credential {
        Some(credential) if username_ok => {
            let (d, m) = (identity.device_id.clone(), identity.module_id.clone());
            ctx.hub
                .read(ReadConsistency::Linearizable, |state| {
                    authenticate_device(state, &d, m.as_deref(), credential, unix_now())
                })
                .await
        }
        _ => Err(HubError::new(
            meridian_proto::ErrorCode::IotHubUnauthorizedAccess,
            "no usable credentials",
        )),
    };
    let auth = match auth {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(%peer, client_id, error = %e, "connect refused");
            let _ = outlet.send(refuse(connack_code(&e))).await;
            return;
        }
    };

    let mut registration = ctx
        .sessions
        .register_with_doorbell(&client_id, Some(outlet.clone()));
    let session = if connect.clean_session {
        ctx.hub
            .write(HubCommand::ClearSession {
                client_id: client_id.clone(),
                node_id: None,
            })
            .await
            .map(|_| (false, Vec::new()))
    } else {
        let cid = client_id.clone();
        match ctx
            .hub
            .read(ReadConsistency::Linearizable, move |s| {
                Ok(s.sessions.get(&cid).cloned())
            })
            .await
        {
            Ok(Some(subs)) => Ok((true, subs)),
            Ok(None) => ctx
                .hub
                .write(HubCommand::SetSession {
                    client_id: client_id.clone(),
                    subscriptions: Vec::new(),
                })
                .await
                .map(|_| (false, Vec::new())),
            Err(e) => Err(e),
        }
    };
    let connected = match session {
        Ok(s) => ctx
            .hub
            .write(HubCommand::SetConnectionState {
                device_id: device_id.clone(),
                module_id: module_id.clone(),
                connected: true,
                node_id: Some(ctx.node_id),
                now: iso_now(),
            })
            .await
            .map(|_| s),
        Err(e) => Err(e),
    };
    let (session_present, subscriptions) = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, client_id, error = %e, "session setup failed");
            let _ = outlet
                .send(refuse(ConnectReturnCode::ServiceUnavailable))
                .await;
            ctx.sessions.unregister(&client_id, registration.id);
            return;
        }
    };
    if outlet
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )))
        .await
        .is_err()
    {
        ctx.sessions.unregister(&client_id, registration.id);
        return;
    }
    tracing::info!(%peer, client_id, session_present, auth = auth.auth_type, "device connected");
    // Recorded in the background: storing the event needs the partition's leader, and a device
    // must not wait for it (during a leader change that can take seconds) before it may publish.
    {
        let (ctx, device, module, now) = (
            ctx.clone(),
            identity.device_id.to_string(),
            identity.module_id.as_ref().map(|m| m.to_string()),
            iso_now(),
        );
        tokio::spawn(async move {
            ctx.record_connection_event(&device, module.as_deref(), true, &now)
                .await;
        });
    }

    let keep_alive = Duration::from_millis(u64::from(connect.keep_alive) * 1500);
    let expires_at = auth.expires_at;
    let sender = Sender {
        device_id: identity.device_id.clone(),
        module_id: identity.module_id.clone(),
        generation_id: auth.generation_id.clone(),
        auth_type: auth.auth_type,
    };
    let mut conn = Conn {
        ctx: ctx.clone(),
        identity,
        device_id,
        module_id,
        client_id: client_id.clone(),
        clean_session: connect.clean_session,
        subscriptions,
        outlet,
        sender,
        next_pkid: 0,
        c2d_inflight: HashMap::new(),
        pending_methods: HashMap::new(),
        next_rid: 0,
    };
    let close = conn
        .run(
            &mut reader,
            &mut buf,
            &mut registration.rx,
            keep_alive,
            expires_at,
            session_present,
        )
        .await;
    conn.finish(close, connect.last_will, registration.id).await;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn<S> {
    async fn run(
        &mut self,
        reader: &mut ReadHalf<S>,
        buf: &mut BytesMut,
        rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
        keep_alive: Duration,
        expires_at: Option<u64>,
        session_present: bool,
    ) -> Close {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let expiry = match expires_at {
            Some(at) => Instant::now() + Duration::from_secs(at.saturating_sub(unix_now())),
            None => far,
        };
        // Both timers are registered once: re-arming the keep-alive timer on every packet cost a
        // timer-wheel insert and removal per message. It fires at the first deadline and is
        // re-armed from the last packet's time if packets came meanwhile.
        let mut last_packet = Instant::now();
        let idle_deadline = |last: Instant| {
            if keep_alive.is_zero() {
                far
            } else {
                last + keep_alive
            }
        };
        let idle = sleep_until(idle_deadline(last_packet));
        let token_expiry = sleep_until(expiry);
        tokio::pin!(idle, token_expiry);
        let mut lock_tick = tokio::time::interval(Duration::from_secs(1));
        lock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if session_present {
            // A resumed session may have C2D messages waiting.
            if let Err(close) = self.deliver_c2d().await {
                return close;
            }
        }
        // The select below polls the socket first (`biased`): nearly every wake-up is the
        // device's next packet, and polling the outbound queue and both timers before it on each
        // one cost ~3% of a node's CPU under telemetry load. So that a device that keeps its
        // socket busy cannot starve them, after FAIR_EVERY reads in a row they are checked
        // without waiting.
        let mut reads_in_a_row = 0u32;
        let outlet = self.outlet.clone();
        loop {
            // Drain every complete packet already buffered before waiting for more bytes.
            loop {
                match Packet::read(buf, self.ctx.max_packet_bytes) {
                    Ok(packet) => {
                        last_packet = Instant::now();
                        if let Err(close) = self.handle(packet).await {
                            return close;
                        }
                    }
                    Err(CodecError::InsufficientBytes(_)) => break,
                    Err(e) => {
                        tracing::info!(client_id = self.client_id, error = %e, "malformed packet; closing");
                        return Close::Ungraceful;
                    }
                }
            }
            if reads_in_a_row >= FAIR_EVERY {
                reads_in_a_row = 0;
                let idle_due = idle_deadline(last_packet);
                if let Err(close) = self.fair_turn(rx, &mut lock_tick, expiry, idle_due).await {
                    return close;
                }
            }
            tokio::select! {
                biased;
                read = reader.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return Close::Ungraceful,
                    Ok(_) => reads_in_a_row += 1,
                },
                // Also rung when work is queued for the connection (`Sessions::send`): polling
                // the queue itself in every select cost ~2% of a node's CPU under telemetry load.
                _ = outlet.attention() => {
                    if let Err(close) = self.attend(rx).await {
                        return close;
                    }
                }
                _ = lock_tick.tick(), if !self.c2d_inflight.is_empty() => {
                    if let Err(close) = self.redeliver_expired().await {
                        return close;
                    }
                }
                _ = &mut idle => {
                    let deadline = idle_deadline(last_packet);
                    if deadline > Instant::now() {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    tracing::info!(client_id = self.client_id, "keep-alive expired; closing");
                    return Close::Ungraceful;
                }
                _ = &mut token_expiry => {
                    tracing::info!(client_id = self.client_id, "SAS token expired; closing");
                    return Close::ByHub;
                }
            }
        }
    }

    /// What the select would have done had the socket not been ready: outbound work queued so
    /// far, the token's expiry, the keep-alive (bytes that never complete a packet do not count),
    /// a due C2D lock check.
    async fn fair_turn(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
        lock_tick: &mut tokio::time::Interval,
        expiry: Instant,
        idle_due: Instant,
    ) -> Result<(), Close> {
        if self.outlet.take_attention() {
            self.attend(rx).await?;
        }
        self.take_queued(rx, FAIR_EVERY as usize).await?;
        let now = Instant::now();
        if now >= expiry {
            tracing::info!(client_id = self.client_id, "SAS token expired; closing");
            return Err(Close::ByHub);
        }
        if now >= idle_due {
            tracing::info!(client_id = self.client_id, "keep-alive expired; closing");
            return Err(Close::Ungraceful);
        }
        if !self.c2d_inflight.is_empty() && lock_tick.tick().now_or_never().is_some() {
            self.redeliver_expired().await?;
        }
        Ok(())
    }

    /// Does what the outlet asked for: finishes its writes (or closes after a failed append or
    /// write), then takes the work queued for the connection if its doorbell rang.
    async fn attend(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
    ) -> Result<(), Close> {
        if let Err(stopped) = self.outlet.attend().await {
            return Err(self.stopped(stopped));
        }
        if self.outlet.take_mail() {
            self.take_queued(rx, usize::MAX).await?;
        }
        Ok(())
    }

    /// Handles up to `limit` pieces of work queued for the connection, without waiting.
    async fn take_queued(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
        limit: usize,
    ) -> Result<(), Close> {
        for _ in 0..limit {
            match rx.try_recv() {
                Ok(work) => self.outbound(work).await?,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(Close::ByHub);
                }
            }
        }
        Ok(())
    }

    async fn send(&mut self, packet: Packet) -> Result<(), Close> {
        self.outlet
            .send(packet)
            .await
            .map_err(|stopped| self.stopped(stopped))
    }

    /// How the connection closes when its outlet stopped.
    fn stopped(&self, stopped: Stopped) -> Close {
        match stopped {
            Stopped::AppendFailed(e) => {
                tracing::error!(client_id = self.client_id, error = %e, "telemetry append failed; closing without ack");
                Close::ByHub
            }
            Stopped::Broken => Close::Ungraceful,
        }
    }

    /// Waits until the connection's last telemetry message is acknowledged (or fails), so that
    /// what the device sent next is answered after it.
    async fn settled(&self) -> Result<(), Close> {
        self.outlet
            .wait_settled()
            .await
            .map_err(|stopped| self.stopped(stopped))
    }

    fn granted_qos(&self, topic: &str) -> Option<QoS> {
        self.subscriptions
            .iter()
            .filter(|(f, _)| topics::matches(f, topic))
            .map(|(_, q)| *q)
            .max()
            .map(|q| {
                if q == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                }
            })
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.c2d_inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Publishes to the device if it subscribed to a matching filter; returns the packet id used
    /// (QoS 1) or `None`.
    async fn publish(&mut self, topic: String, payload: Bytes) -> Result<Option<u16>, Close> {
        let Some(qos) = self.granted_qos(&topic) else {
            return Ok(None);
        };
        let mut publish = Publish::new(topic, qos, payload.to_vec());
        let pkid = (qos == QoS::AtLeastOnce).then(|| self.alloc_pkid());
        publish.pkid = pkid.unwrap_or(0);
        self.send(Packet::Publish(publish)).await?;
        Ok(pkid)
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        self.settled().await?;
        match packet {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::Subscribe(s) => {
                let mut codes = Vec::new();
                for filter in &s.filters {
                    if !topics::subscription_allowed(&self.identity, &filter.path) {
                        tracing::info!(
                            client_id = self.client_id,
                            filter = filter.path,
                            "subscription outside own topics; closing"
                        );
                        return Err(Close::ByHub);
                    }
                    // QoS 2 is granted as 1: the hub never delivers exactly-once.
                    let qos: u8 = if filter.qos == QoS::AtMostOnce { 0 } else { 1 };
                    self.subscriptions.retain(|(f, _)| f != &filter.path);
                    self.subscriptions.push((filter.path.clone(), qos));
                    codes.push(SubscribeReasonCode::Success(if qos == 0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    }));
                }
                self.persist_session().await?;
                self.send(Packet::SubAck(SubAck::new(s.pkid, codes)))
                    .await?;
                self.deliver_c2d().await
            }
            Packet::Unsubscribe(u) => {
                self.subscriptions.retain(|(f, _)| !u.topics.contains(f));
                self.persist_session().await?;
                self.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
            }
            Packet::PubAck(ack) => {
                if let Some(inflight) = self.c2d_inflight.remove(&ack.pkid) {
                    self.complete_c2d(inflight.lock_token).await;
                    return self.deliver_c2d().await;
                }
                Ok(())
            }
            Packet::PingReq => self.send(Packet::PingResp).await,
            Packet::Disconnect => Err(Close::Graceful),
            other => {
                tracing::info!(client_id = self.client_id, packet = ?other, "unexpected packet; closing");
                Err(Close::ByHub)
            }
        }
    }

    async fn persist_session(&mut self) -> Result<(), Close> {
        if self.clean_session {
            return Ok(());
        }
        self.ctx
            .hub
            .write(HubCommand::SetSession {
                client_id: self.client_id.clone(),
                subscriptions: self.subscriptions.clone(),
            })
            .await
            .map(|_| ())
            .map_err(|e| {
                tracing::warn!(client_id = self.client_id, error = %e, "persisting session failed");
                Close::ByHub
            })
    }

    fn device_id(&self) -> DeviceId {
        self.device_id.clone()
    }

    fn module_id(&self) -> Option<ModuleId> {
        self.module_id.clone()
    }

    async fn on_publish(&mut self, p: Publish) -> Result<(), Close> {
        if p.qos == QoS::ExactlyOnce {
            tracing::info!(client_id = self.client_id, "QoS 2 publish; closing");
            return Err(Close::ByHub);
        }
        let Some(request) = topics::classify_publish(&self.identity, &p.topic) else {
            tracing::info!(
                client_id = self.client_id,
                topic = p.topic,
                "publish outside own topics; closing"
            );
            return Err(Close::ByHub);
        };
        let ack = (p.qos == QoS::AtLeastOnce).then(|| PubAck::new(p.pkid));
        match request {
            DeviceRequest::Telemetry { bag } => {
                let tag = ack.as_ref().map_or(NO_PUBACK, |a| u64::from(a.pkid));
                if self
                    .store_telemetry(&bag, &p.payload, p.retain, Some(tag))
                    .await?
                {
                    // Handed over: the outlet acknowledges once it is fsync'd in its partition.
                    return Ok(());
                }
                // Acknowledge only now: the message is fsync'd in its partition.
                if let Some(a) = ack {
                    self.send(Packet::PubAck(a)).await?;
                }
                Ok(())
            }
            DeviceRequest::TwinGet { rid } => {
                if let Some(a) = ack {
                    self.send(Packet::PubAck(a)).await?;
                }
                let (device_id, module_id) = (self.device_id(), self.module_id());
                let twin = self
                    .ctx
                    .hub
                    .read(ReadConsistency::Linearizable, |s| {
                        s.twin_for_device(&device_id, module_id.as_ref())
                    })
                    .await;
                let (status, body) = match twin {
                    Ok(doc) => (200, doc.to_string()),
                    Err(e) => (e.code.http_status(), error_body(&e)),
                };
                self.publish(topics::twin_response(status, &rid, None), Bytes::from(body))
                    .await
                    .map(|_| ())
            }
            DeviceRequest::TwinPatchReported { rid } => {
                if let Some(a) = ack {
                    self.send(Packet::PubAck(a)).await?;
                }
                let result = match HubCommand::reported_patch(
                    self.device_id(),
                    self.module_id(),
                    &p.payload,
                    iso_now(),
                ) {
                    Ok(command) => self.ctx.hub.write(command).await,
                    Err(e) => Err(e),
                };
                let (topic, body) = match result {
                    Ok(HubResponse::ReportedVersion(v)) => {
                        (topics::twin_response(204, &rid, Some(v)), String::new())
                    }
                    Ok(_) => (topics::twin_response(204, &rid, None), String::new()),
                    Err(e) => (
                        topics::twin_response(e.code.http_status(), &rid, None),
                        error_body(&e),
                    ),
                };
                self.publish(topic, Bytes::from(body)).await.map(|_| ())
            }
            DeviceRequest::MethodResponse { status, rid } => {
                if let Some(a) = ack {
                    self.send(Packet::PubAck(a)).await?;
                }
                if let Some(reply) = self.pending_methods.remove(&rid) {
                    let payload = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let _ = reply.send(Ok(MethodReply { status, payload }));
                }
                Ok(())
            }
        }
    }

    /// Stores a telemetry message. With `watched` (the PUBACK tag) and no routes configured,
    /// the append is handed to its partition and this returns `true` at once: the outlet writes
    /// the PUBACK when the message is stored, or wakes the connection to close if it fails.
    /// Otherwise this returns `false` once the message is stored.
    async fn store_telemetry(
        &mut self,
        bag: &str,
        body: &[u8],
        retain: bool,
        watched: Option<u64>,
    ) -> Result<bool, Close> {
        let refused = |e: HubError| {
            tracing::info!(client_id = self.client_id, error = %e, "telemetry refused; closing");
            Close::ByHub
        };
        let enqueued_time = iso_now();
        let stored = if routes_nothing(&self.ctx).await {
            // Only the stored bytes are needed: encoded straight from the topic and the body.
            let encoded = TelemetryMessage::encode_from_device(
                bag,
                body,
                &self.sender,
                &enqueued_time,
                retain,
                self.ctx.max_telemetry_bytes,
            )
            .map_err(refused)?;
            // Stream 0 (`events`): its key in the partition is the partition number itself.
            let key = partition_for(self.device_id.as_str(), self.ctx.partitions);
            if let Some(tag) = watched {
                self.outlet.begin_append();
                let watcher: Arc<dyn AppendWatcher> = self.outlet.clone();
                return match self.ctx.partition_groups.append_watched(
                    vec![(key, Bytes::from(encoded))],
                    watcher,
                    tag,
                ) {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        self.outlet.cancel_append();
                        Err(self.stopped(Stopped::AppendFailed(e)))
                    }
                };
            }
            self.ctx
                .partition_groups
                .append(vec![(key, encoded)])
                .await
                .map_err(|e| e.to_string())
        } else {
            let message = TelemetryMessage::from_device(
                bag,
                body.to_vec(),
                &self.sender,
                &enqueued_time,
                retain,
                self.ctx.max_telemetry_bytes,
            )
            .map_err(refused)?;
            store_message(&self.ctx, &self.device_id(), &message).await
        };
        stored.map(|()| false).map_err(|e| {
            tracing::error!(client_id = self.client_id, error = %e, "telemetry append failed; closing without ack");
            Close::ByHub
        })
    }

    async fn outbound(&mut self, work: Outbound) -> Result<(), Close> {
        match work {
            Outbound::DesiredPatch { version, payload } => self
                .publish(topics::desired_patch(version), payload)
                .await
                .map(|_| ()),
            Outbound::Method {
                name,
                payload,
                reply,
            } => {
                self.next_rid += 1;
                let rid = format!("{:x}", self.next_rid);
                let topic = topics::method_request(&name, &rid);
                if self.granted_qos(&topic).is_none() {
                    let _ = reply.send(Err("the device is not subscribed to direct methods"));
                    return Ok(());
                }
                self.pending_methods.insert(rid, reply);
                self.publish(topic, payload).await.map(|_| ())
            }
            Outbound::C2dAvailable => self.deliver_c2d().await,
            Outbound::Recheck => {
                let (d, m) = (self.device_id(), self.module_id());
                let still_valid = self
                    .ctx
                    .hub
                    .read(ReadConsistency::Stale, |s| {
                        use crate::domain::registry::DeviceStatus;
                        Ok(s.devices.get(&d).is_some_and(|e| {
                            e.device.status == DeviceStatus::Enabled
                                && m.as_ref().is_none_or(|m| e.modules.contains_key(m))
                        }))
                    })
                    .await
                    .unwrap_or(false);
                if still_valid {
                    Ok(())
                } else {
                    tracing::info!(
                        client_id = self.client_id,
                        "identity disabled or deleted; closing"
                    );
                    Err(Close::ByHub)
                }
            }
            Outbound::Drain => {
                tracing::info!(
                    client_id = self.client_id,
                    "node draining; closing so the device reconnects elsewhere"
                );
                Err(Close::ByHub)
            }
            Outbound::TakenOver => {
                tracing::info!(
                    client_id = self.client_id,
                    "a new connection took over this device"
                );
                Err(Close::ByHub)
            }
        }
    }

    /// Sends waiting C2D messages (devices only), up to the in-flight limit.
    async fn deliver_c2d(&mut self) -> Result<(), Close> {
        if self.identity.module_id.is_some() {
            return Ok(());
        }
        let topic_probe = topics::c2d(&self.identity.device_id, "");
        if self.granted_qos(&topic_probe).is_none() {
            return Ok(());
        }
        let device_id = self.device_id();
        let inflight: Vec<String> = self
            .c2d_inflight
            .values()
            .map(|f| f.lock_token.clone())
            .collect();
        let room = MAX_C2D_INFLIGHT.saturating_sub(inflight.len());
        if room == 0 {
            return Ok(());
        }
        let now_ms = unix_now() * 1000;
        let waiting = self
            .ctx
            .hub
            .read(ReadConsistency::Stale, |s| {
                Ok(s.devices
                    .get(&device_id)
                    .map(|e| {
                        e.c2d
                            .messages
                            .iter()
                            .filter(|m| m.expiry_ms > now_ms && !inflight.contains(&m.lock_token))
                            .take(room)
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default())
            })
            .await
            .unwrap_or_default();
        for message in waiting {
            if let Err(e) = self
                .ctx
                .hub
                .write(HubCommand::C2dDelivered {
                    device_id: device_id.clone(),
                    lock_token: message.lock_token.clone(),
                    now: iso_now(),
                })
                .await
            {
                tracing::warn!(client_id = self.client_id, error = %e, "counting c2d delivery failed");
                return Ok(());
            }
            let to = format!("/devices/{}/messages/deviceBound", self.identity.device_id);
            let mut props: Vec<(&str, &str)> = vec![("$.mid", &message.message_id), ("$.to", &to)];
            if let Some(c) = &message.correlation_id {
                props.push(("$.cid", c));
            }
            if let Some(u) = &message.user_id {
                props.push(("$.uid", u));
            }
            if let Some(ct) = &message.content_type {
                props.push(("$.ct", ct));
            }
            if let Some(ce) = &message.content_encoding {
                props.push(("$.ce", ce));
            }
            let ack = serde_json::to_value(message.ack)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if ack != "none" {
                props.push(("iothub-ack", &ack));
            }
            for (k, v) in &message.properties {
                props.push((k, v));
            }
            let topic = topics::c2d(&self.identity.device_id, &encode_property_bag(props));
            let payload = Bytes::from(message.body.clone());
            match self.publish(topic.clone(), payload.clone()).await? {
                Some(pkid) => {
                    self.c2d_inflight.insert(
                        pkid,
                        InflightC2d {
                            lock_token: message.lock_token.clone(),
                            sent: Instant::now(),
                            topic,
                            payload,
                        },
                    );
                }
                // QoS 0 subscription: there will be no PUBACK, so delivery completes the message.
                None => self.complete_c2d(message.lock_token.clone()).await,
            }
        }
        Ok(())
    }

    /// Redelivers C2D messages whose lock expired without a PUBACK (same packet id, DUP set),
    /// counting the delivery; past the maximum delivery count the message is dead-lettered and
    /// dropped from this connection.
    async fn redeliver_expired(&mut self) -> Result<(), Close> {
        let timeout = self.ctx.c2d_lock_timeout;
        let expired: Vec<u16> = self
            .c2d_inflight
            .iter()
            .filter(|(_, f)| f.sent.elapsed() >= timeout)
            .map(|(p, _)| *p)
            .collect();
        for pkid in expired {
            let Some(lock_token) = self.c2d_inflight.get(&pkid).map(|f| f.lock_token.clone())
            else {
                continue;
            };
            let _ = self
                .ctx
                .hub
                .write(HubCommand::C2dDelivered {
                    device_id: self.device_id(),
                    lock_token: lock_token.clone(),
                    now: iso_now(),
                })
                .await;
            let device_id = self.device_id();
            let still_queued = self
                .ctx
                .hub
                .read(ReadConsistency::Stale, |s| {
                    Ok(s.devices
                        .get(&device_id)
                        .is_some_and(|e| e.c2d.messages.iter().any(|m| m.lock_token == lock_token)))
                })
                .await
                .unwrap_or(false);
            if !still_queued {
                self.c2d_inflight.remove(&pkid);
                continue;
            }
            if let Some(f) = self.c2d_inflight.get_mut(&pkid) {
                f.sent = Instant::now();
                let mut publish =
                    Publish::new(f.topic.clone(), QoS::AtLeastOnce, f.payload.to_vec());
                publish.pkid = pkid;
                publish.dup = true;
                self.send(Packet::Publish(publish)).await?;
            }
        }
        Ok(())
    }

    async fn complete_c2d(&mut self, lock_token: String) {
        if let Err(e) = self
            .ctx
            .hub
            .write(HubCommand::CompleteC2d {
                device_id: self.device_id(),
                lock_token,
                now: iso_now(),
            })
            .await
        {
            tracing::debug!(client_id = self.client_id, error = %e, "completing c2d message");
        }
    }

    async fn finish(
        mut self,
        close: Close,
        will: Option<rumqttc::mqttbytes::v4::LastWill>,
        registration: u64,
    ) {
        tracing::info!(client_id = self.client_id, ?close, "device disconnected");
        for (_, reply) in self.pending_methods.drain() {
            let _ = reply.send(Err("the device disconnected"));
        }
        // A message still being stored is acknowledged first (the device may be there to read it).
        if !self.outlet.is_broken() {
            let _ = tokio::time::timeout(SETTLE_ON_CLOSE, self.outlet.wait_settled()).await;
        }
        // Bounded: a device that stopped reading would otherwise keep its registration forever.
        let _ = tokio::time::timeout(SETTLE_ON_CLOSE, self.outlet.shutdown()).await;
        // A will message is published only when the connection ended without DISCONNECT.
        if close == Close::Ungraceful
            && let Some(will) = will
            && let Some(DeviceRequest::Telemetry { bag }) =
                topics::classify_publish(&self.identity, &will.topic)
        {
            let _ = self
                .store_telemetry(&bag, &will.message, will.retain, None)
                .await;
        }
        let still_current = self.ctx.sessions.unregister(&self.client_id, registration);
        if !still_current {
            // A newer connection owns the device now; its state must not be overwritten.
            return;
        }
        if self.clean_session {
            let _ = self
                .ctx
                .hub
                .write(HubCommand::ClearSession {
                    client_id: self.client_id.clone(),
                    node_id: Some(self.ctx.node_id),
                })
                .await;
        }
        let now = iso_now();
        let _ = self
            .ctx
            .hub
            .write(HubCommand::SetConnectionState {
                device_id: self.device_id(),
                module_id: self.module_id(),
                connected: false,
                node_id: Some(self.ctx.node_id),
                now: now.clone(),
            })
            .await;
        self.ctx
            .record_connection_event(
                &self.identity.device_id,
                self.identity.module_id.as_deref(),
                false,
                &now,
            )
            .await;
    }
}

/// The body of a failed `$iothub` request: Azure's shape, which the Node SDK recognises by
/// `errorCode`.
/// The streams a message goes to (`events` is 0 unless routes say otherwise), each with the
/// enrichment properties its endpoint adds.
async fn route(
    ctx: &MqttContext,
    device_id: &DeviceId,
    message: &TelemetryMessage,
) -> Vec<(u32, BTreeMap<String, String>)> {
    let device_id = device_id.clone();
    let routed = ctx
        .hub
        .read(ReadConsistency::Stale, |s| {
            let routing = &s.routing;
            if routing.passes_through() {
                return Ok(None);
            }
            let twin = if routing.needs_twin(RouteSource::DeviceMessages) {
                s.render_twin(&device_id, None).ok()
            } else {
                None
            };
            let streams = if routing.routes.is_empty() {
                std::collections::BTreeSet::from([0])
            } else {
                let document = RoutingDocument {
                    system: &message.system_properties,
                    application: &message.application_properties,
                    body: json_body(&message.system_properties, &message.body),
                    twin: twin.clone(),
                };
                routing.streams_for(RouteSource::DeviceMessages, &document)
            };
            Ok(Some(
                streams
                    .into_iter()
                    .map(|stream| {
                        let extra = routing
                            .enrichments_for(stream)
                            .into_iter()
                            .filter_map(|e| {
                                e.resolve(twin.as_ref(), HUB_NAME)
                                    .map(|v| (e.key.clone(), v))
                            })
                            .collect();
                        (stream, extra)
                    })
                    .collect(),
            ))
        })
        .await;
    match routed {
        Ok(Some(streams)) => streams,
        _ => vec![(0, BTreeMap::new())],
    }
}

/// Whether the hub's messages go to the built-in `events` stream (0) as sent
/// ([`RoutingConfig::passes_through`](crate::domain::routing::RoutingConfig::passes_through)).
async fn routes_nothing(ctx: &MqttContext) -> bool {
    ctx.hub
        .read(ReadConsistency::Stale, |s| Ok(s.routing.passes_through()))
        .await
        .unwrap_or(false)
}

/// Stores a device's telemetry message: routed to its streams, appended to the device's partition
/// (replicated, fsync'd) before this returns. Shared by the MQTT and AMQP device endpoints.
pub(crate) async fn store_message(
    ctx: &MqttContext,
    device_id: &DeviceId,
    message: &TelemetryMessage,
) -> Result<(), String> {
    let partition = partition_for(device_id.as_str(), ctx.partitions);
    let routed = route(ctx, device_id, message).await;
    // Encoded once; a message routed to several streams unenriched shares those bytes.
    let encoded = bytes::Bytes::from(message.encode());
    let records = routed
        .into_iter()
        .map(|(stream, extra)| {
            let key = stream * STREAM_STRIDE + partition;
            if extra.is_empty() {
                (key, encoded.clone())
            } else {
                let mut enriched = message.clone();
                enriched.application_properties.extend(extra);
                (key, bytes::Bytes::from(enriched.encode()))
            }
        })
        .collect();
    ctx.partition_groups
        .append(records)
        .await
        .map_err(|e| e.to_string())
}

fn error_body(e: &HubError) -> String {
    json!({"errorCode": e.code.azure_code(), "message": e.message}).to_string()
}
