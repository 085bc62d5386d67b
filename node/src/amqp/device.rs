//! Device-side AMQP (the device SDKs' AMQP transport): telemetry, C2D with complete / reject /
//! abandon, direct methods and twins, on links under `/devices/{id}[/modules/{m}]/`.
//!
//! A connection carries one device identity. Its first device link authenticates the identity
//! with the token put on `$cbs` and registers the connection like an MQTT one (one live
//! connection per device in the cluster, connection state and events), so direct methods,
//! desired-property pushes and C2D notifications reach it the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations, MessageId, Outcome,
    Properties, annotations::OwnedKey,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use serde_json::Value as Json;
use tokio::sync::{Notify, mpsc, oneshot};

use super::ConnectionState;
use super::address::{AmqpNode, DeviceLink};
use super::links::{
    AmqpMessage, Next, body_bytes, detached_within, id_string, next_work, still_allowed,
    uuid_string,
};
use crate::auth::{DeviceAuth, DeviceCredential, authenticate_device};
use crate::clock::iso_now;
use crate::domain::telemetry::{Sender as TelemetrySender, TelemetryMessage, encode_property_bag};
use crate::domain::{DeviceId, HubCommand, HubError, HubResponse};
use crate::hub::ReadConsistency;
use crate::mqtt::session::{MethodReply, Outbound};
use meridian_proto::ErrorCode;

type MethodResult = Result<MethodReply, &'static str>;

/// The device identity of one AMQP connection, registered like an MQTT connection.
pub(crate) struct DeviceSession {
    device_id: DeviceId,
    module_id: Option<String>,
    client_id: String,
    registration: u64,
    auth: DeviceAuth,
    token: String,
    c2d: Notify,
    methods: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<MethodResult>>>,
    twin_out: Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    desired: AtomicBool,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl DeviceSession {
    /// Answers the method call waiting under `cid` (every waiting call when `None`) with `why`.
    fn fail_pending(&self, cid: Option<&str>, why: &'static str) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let failed: Vec<oneshot::Sender<MethodResult>> = match cid {
            Some(cid) => pending.remove(cid).into_iter().collect(),
            None => pending.drain().map(|(_, r)| r).collect(),
        };
        for reply in failed {
            let _ = reply.send(Err(why));
        }
    }
}

/// The session for `device_id`/`module_id` on this connection, created (authenticated,
/// registered, recorded as connected) by the first device link.
async fn session_for(
    conn: &Arc<ConnectionState>,
    device_id: &str,
    module_id: Option<&str>,
) -> Result<Arc<DeviceSession>, HubError> {
    let mut slot = conn.device.lock().await;
    if let Some(s) = slot.as_ref() {
        if s.device_id.as_str() == device_id && s.module_id.as_deref() == module_id {
            return Ok(s.clone());
        }
        return Err(HubError::new(
            ErrorCode::Unauthorized,
            "one AMQP connection carries one device identity",
        ));
    }
    let node = AmqpNode::Device {
        device_id: device_id.to_string(),
        module_id: module_id.map(str::to_string),
        link: DeviceLink::Telemetry,
    };
    let resource = node.resource(&conn.ctx.event_hub).unwrap_or_default();
    let now = crate::clock::unix_now();
    let token = conn
        .grants
        .lock()
        .ok()
        .and_then(|g| g.token_for(&resource, crate::domain::Permission::DeviceConnect, now))
        .ok_or_else(|| {
            HubError::new(
                ErrorCode::IotHubUnauthorizedAccess,
                "put a device token on $cbs first",
            )
        })?;
    let (d, m, t) = (
        device_id.to_string(),
        module_id.map(str::to_string),
        token.clone(),
    );
    let auth = conn
        .ctx
        .hub
        .read(ReadConsistency::Linearizable, move |s| {
            authenticate_device(s, &d, m.as_deref(), DeviceCredential::Sas(&t), now)
        })
        .await?;
    let mqtt = &conn.ctx.mqtt;
    let client_id = match module_id {
        Some(m) => format!("{device_id}/{m}"),
        None => device_id.to_string(),
    };
    let id = DeviceId::new(device_id)?;
    let module = module_id
        .map(|m| crate::domain::ModuleId::new(m.to_string()))
        .transpose()?;
    let registration = mqtt.sessions.register(&client_id);
    if let Err(e) = mqtt
        .hub
        .write(HubCommand::SetConnectionState {
            device_id: id.clone(),
            module_id: module,
            connected: true,
            node_id: Some(mqtt.node_id),
            now: iso_now(),
        })
        .await
    {
        mqtt.sessions.unregister(&client_id, registration.id);
        return Err(e);
    }
    {
        let (mqtt, device, module, now) = (
            mqtt.clone(),
            device_id.to_string(),
            module_id.map(str::to_string),
            iso_now(),
        );
        tokio::spawn(async move {
            mqtt.record_connection_event(&device, module.as_deref(), true, &now)
                .await;
        });
    }
    tracing::info!(
        client_id,
        auth = auth.auth_type,
        "device connected over amqp"
    );
    let session = Arc::new(DeviceSession {
        device_id: id,
        module_id: module_id.map(str::to_string),
        client_id,
        registration: registration.id,
        auth,
        token,
        c2d: Notify::new(),
        methods: Mutex::new(None),
        pending: Mutex::new(HashMap::new()),
        twin_out: Mutex::new(None),
        desired: AtomicBool::new(false),
        pump: Mutex::new(None),
    });
    let pump = tokio::spawn(pump(conn.clone(), session.clone(), registration.rx));
    if let Ok(mut p) = session.pump.lock() {
        *p = Some(pump);
    }
    *slot = Some(session.clone());
    Ok(session)
}

/// Routes the work the hub sends to this device's connection onto its links.
async fn pump(
    conn: Arc<ConnectionState>,
    session: Arc<DeviceSession>,
    mut rx: mpsc::Receiver<Outbound>,
) {
    while let Some(work) = rx.recv().await {
        match work {
            Outbound::DesiredPatch { payload, .. } => {
                if !session.desired.load(Ordering::Relaxed) {
                    continue;
                }
                let tx = session.twin_out.lock().ok().and_then(|t| t.clone());
                if let Some(tx) = tx {
                    let _ = tx
                        .send(data_message(payload.to_vec(), None, Vec::new()))
                        .await;
                }
            }
            Outbound::Method {
                name,
                payload,
                reply,
            } => {
                let tx = session.methods.lock().ok().and_then(|t| t.clone());
                let Some(tx) = tx else {
                    let _ = reply.send(Err("the device has not opened its methods link"));
                    continue;
                };
                // The request carries `IoThub-methodname` and a correlation id the response
                // echoes; the reply waits in `pending` until then (or until the link closes).
                let cid = uuid_string(&rand::random::<[u8; 16]>());
                if let Ok(mut p) = session.pending.lock() {
                    p.insert(cid.clone(), reply);
                }
                let mut app = OrderedMap::new();
                app.insert("IoThub-methodname".to_string(), SimpleValue::String(name));
                let mut message = data_message(
                    payload.to_vec(),
                    Some(MessageId::String(cid.clone())),
                    Vec::new(),
                );
                message.application_properties = Some(ApplicationProperties(app));
                if tx.send(message).await.is_err() {
                    session.fail_pending(Some(&cid), "the methods link is closed");
                }
            }
            Outbound::C2dAvailable => session.c2d.notify_one(),
            Outbound::Recheck => {
                // The identity changed (disabled, deleted, keys regenerated): the token must
                // still authenticate it.
                let (d, m, token) = (
                    session.device_id.to_string(),
                    session.module_id.clone(),
                    session.token.clone(),
                );
                let now = crate::clock::unix_now();
                let still = conn
                    .ctx
                    .hub
                    .read(ReadConsistency::Stale, move |s| {
                        authenticate_device(s, &d, m.as_deref(), DeviceCredential::Sas(&token), now)
                    })
                    .await;
                if still.is_err() {
                    conn.close();
                    return;
                }
            }
            Outbound::TakenOver | Outbound::Drain => {
                conn.close();
                return;
            }
        }
    }
}

/// Called when the connection ends: the device is recorded as disconnected (unless another
/// connection took it over).
pub(crate) async fn end(conn: &ConnectionState) {
    let Some(session) = conn.device.lock().await.take() else {
        return;
    };
    if let Ok(mut p) = session.pump.lock()
        && let Some(p) = p.take()
    {
        p.abort();
    }
    let mqtt = &conn.ctx.mqtt;
    if !mqtt
        .sessions
        .unregister(&session.client_id, session.registration)
    {
        return;
    }
    let module = session
        .module_id
        .clone()
        .and_then(|m| crate::domain::ModuleId::new(m).ok());
    let _ = mqtt
        .hub
        .write(HubCommand::SetConnectionState {
            device_id: session.device_id.clone(),
            module_id: module,
            connected: false,
            node_id: None,
            now: iso_now(),
        })
        .await;
    mqtt.record_connection_event(
        session.device_id.as_str(),
        session.module_id.as_deref(),
        false,
        &iso_now(),
    )
    .await;
    tracing::info!(
        client_id = session.client_id,
        "device disconnected from amqp"
    );
}

fn data_message(
    body: Vec<u8>,
    correlation: Option<MessageId>,
    annotations: Vec<(&str, Value)>,
) -> AmqpMessage {
    let mut ann = OrderedMap::new();
    for (k, v) in annotations {
        ann.insert(OwnedKey::Symbol(Symbol::from(k.to_string())), v);
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: (!ann.is_empty()).then_some(MessageAnnotations(ann)),
        properties: Some(Properties {
            correlation_id: correlation,
            ..Default::default()
        }),
        application_properties: None,
        body: Body::Data(Batch::new(vec![Data(Binary::from(body))])),
        footer: None,
    }
}

/// Runs one device link until it closes.
pub(crate) async fn serve(
    conn: Arc<ConnectionState>,
    device_id: String,
    module_id: Option<String>,
    link: DeviceLink,
    endpoint: super::links::Link,
) -> Result<(), String> {
    use super::links::Link;
    let session = match session_for(&conn, &device_id, module_id.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            let error = super::hub_error(&e);
            let _ = match endpoint {
                Link::Sender(s) => s.close_with_error(error).await.map(|_| ()),
                Link::Receiver(r) => r.close_with_error(error).await.map(|_| ()),
            };
            return Err(e.message);
        }
    };
    let node = AmqpNode::Device {
        device_id,
        module_id,
        link,
    };
    match (link, endpoint) {
        (DeviceLink::Telemetry, Link::Receiver(r)) => telemetry(&conn, &session, &node, r).await,
        (DeviceLink::CloudToDevice, Link::Sender(s)) => c2d(&conn, &session, &node, s).await,
        (DeviceLink::Methods, Link::Sender(s)) => {
            let r = queue_link(&conn, &node, &session.methods, s).await;
            // Calls sent on this link get no answer any more.
            session.fail_pending(None, "the methods link closed");
            r
        }
        (DeviceLink::Methods, Link::Receiver(r)) => method_responses(&session, r).await,
        (DeviceLink::Twin, Link::Sender(s)) => {
            let r = queue_link(&conn, &node, &session.twin_out, s).await;
            session.desired.store(false, Ordering::Relaxed);
            r
        }
        (DeviceLink::Twin, Link::Receiver(r)) => twin_requests(&conn, &session, r).await,
        (_, Link::Sender(s)) => s
            .close_with_error(super::amqp_error(
                "amqp:not-allowed",
                "wrong link direction",
            ))
            .await
            .map_err(|e| e.to_string()),
        (_, Link::Receiver(r)) => r
            .close_with_error(super::amqp_error(
                "amqp:not-allowed",
                "wrong link direction",
            ))
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The property bag an AMQP telemetry message stands for (`$.mid=...&key=value`), so the same
/// decoding and anti-spoofing stamps apply as over MQTT.
fn property_bag(m: &AmqpMessage) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(p) = &m.properties {
        if let Some(id) = &p.message_id {
            pairs.push(("$.mid".into(), id_string(id)));
        }
        if let Some(id) = &p.correlation_id {
            pairs.push(("$.cid".into(), id_string(id)));
        }
        if let Some(u) = &p.user_id {
            pairs.push(("$.uid".into(), String::from_utf8_lossy(u).into_owned()));
        }
        if let Some(ct) = &p.content_type {
            pairs.push(("$.ct".into(), ct.as_str().to_string()));
        }
        if let Some(ce) = &p.content_encoding {
            pairs.push(("$.ce".into(), ce.as_str().to_string()));
        }
    }
    if let Some(ann) = &m.message_annotations
        && let Some(Value::String(ifid)) = ann
            .0
            .get(&OwnedKey::Symbol(Symbol::from("iothub-interface-id")))
    {
        pairs.push(("$.ifid".into(), ifid.clone()));
    }
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            pairs.push((k.clone(), super::links::simple_string(v)));
        }
    }
    encode_property_bag(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Telemetry: each message is stored (replicated, fsync'd) before it is accepted.
async fn telemetry(
    conn: &ConnectionState,
    session: &DeviceSession,
    node: &AmqpNode,
    mut receiver: Receiver,
) -> Result<(), String> {
    let sender = TelemetrySender {
        device_id: session.device_id.to_string(),
        module_id: session.module_id.clone(),
        generation_id: session.auth.generation_id.clone(),
        auth_type: session.auth.auth_type,
    };
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d.map_err(|e| e.to_string())?,
            _ = tokio::time::sleep(super::TOKEN_CHECK) => {
                if let Err(e) = still_allowed(conn, node) {
                    let _ = receiver.close_with_error(e).await;
                    return Err("token expired".into());
                }
                continue;
            }
        };
        let m = delivery.message();
        let stored = match TelemetryMessage::from_device(
            &property_bag(m),
            body_bytes(&m.body),
            &sender,
            &iso_now(),
            false,
            conn.ctx.mqtt.max_telemetry_bytes,
        ) {
            Ok(message) => {
                crate::mqtt::connection::store_message(&conn.ctx.mqtt, &session.device_id, &message)
                    .await
                    .map_err(|e| HubError::new(ErrorCode::ServiceUnavailable, e))
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => receiver.accept(&delivery).await,
            Err(e) => receiver.reject(&delivery, super::hub_error(&e)).await,
        }
        .map_err(|e| e.to_string())?;
    }
}

/// The C2D message as the device SDKs read it: data body, properties, `iothub-ack`.
fn c2d_message(m: &crate::domain::c2d::C2dMessage, to: &str) -> AmqpMessage {
    let mut app = OrderedMap::new();
    for (k, v) in &m.properties {
        app.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    let ack = serde_json::to_value(m.ack)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if ack != "none" && !ack.is_empty() {
        app.insert("iothub-ack".to_string(), SimpleValue::String(ack));
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(MessageId::String(m.message_id.clone())),
            to: Some(to.to_string()),
            correlation_id: m.correlation_id.clone().map(MessageId::String),
            user_id: m.user_id.clone().map(|u| Binary::from(u.into_bytes())),
            content_type: m.content_type.clone().map(Symbol::from),
            content_encoding: m.content_encoding.clone().map(Symbol::from),
            absolute_expiry_time: Some(
                fe2o3_amqp::types::primitives::Timestamp::from_milliseconds(m.expiry_ms as i64),
            ),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: Body::Data(Batch::new(vec![Data(Binary::from(m.body.clone()))])),
        footer: None,
    }
}

/// C2D: one message at a time, unsettled; accepted completes it, rejected dead-letters it,
/// released/modified (abandon) or no answer within the lock timeout leaves it for redelivery.
async fn c2d(
    conn: &ConnectionState,
    session: &DeviceSession,
    node: &AmqpNode,
    mut sender: Sender,
) -> Result<(), String> {
    if session.module_id.is_some() {
        // Modules receive no C2D messages (Azure); the link stays open and empty.
        loop {
            if detached_within(&mut sender, super::TOKEN_CHECK).await {
                return Ok(());
            }
        }
    }
    let hub = &conn.ctx.hub;
    let to = format!("/devices/{}/messages/devicebound", session.device_id);
    loop {
        if let Err(e) = still_allowed(conn, node) {
            let _ = sender.close_with_error(e).await;
            return Err("token expired".into());
        }
        let device_id = session.device_id.clone();
        let now_ms = crate::clock::unix_ms();
        let next = hub
            .read(ReadConsistency::Stale, move |s| {
                Ok(s.devices.get(&device_id).and_then(|e| {
                    e.c2d
                        .messages
                        .iter()
                        .find(|m| m.expiry_ms > now_ms)
                        .cloned()
                }))
            })
            .await
            .unwrap_or(None);
        let Some(message) = next else {
            tokio::select! {
                _ = session.c2d.notified() => {}
                detached = tokio::time::timeout(super::TOKEN_CHECK, sender.on_detach()) => {
                    if detached.is_ok() {
                        return Ok(());
                    }
                }
            }
            continue;
        };
        if let Err(e) = hub
            .write(HubCommand::C2dDelivered {
                device_id: session.device_id.clone(),
                lock_token: message.lock_token.clone(),
                now: iso_now(),
            })
            .await
        {
            tracing::debug!(error = %e.message, "counting an amqp c2d delivery");
            if detached_within(&mut sender, Duration::from_millis(500)).await {
                return Ok(());
            }
            continue;
        }
        let outcome = tokio::time::timeout(
            conn.ctx.mqtt.c2d_lock_timeout,
            sender.send(c2d_message(&message, &to)),
        )
        .await;
        let command = match &outcome {
            Ok(Ok(Outcome::Accepted(_))) => Some(HubCommand::CompleteC2d {
                device_id: session.device_id.clone(),
                lock_token: message.lock_token.clone(),
                now: iso_now(),
            }),
            Ok(Ok(Outcome::Rejected(_))) => Some(HubCommand::RejectC2d {
                device_id: session.device_id.clone(),
                lock_token: message.lock_token.clone(),
                now: iso_now(),
            }),
            // Abandoned, or not settled within the lock: delivered again (counted above).
            _ => None,
        };
        if let Some(command) = command
            && let Err(e) = hub.write(command).await
        {
            tracing::debug!(error = %e.message, "settling an amqp c2d message");
        }
        match outcome {
            Ok(Err(e)) => return Err(e.to_string()),
            // Abandoned: give the device a moment before the redelivery.
            Ok(Ok(Outcome::Released(_) | Outcome::Modified(_)))
                if detached_within(&mut sender, Duration::from_millis(200)).await =>
            {
                return Ok(());
            }
            _ => {}
        }
    }
}

/// A link that sends what the session queues on it (method requests; twin responses and
/// desired patches), registered in `slot` while it is attached.
async fn queue_link(
    conn: &ConnectionState,
    node: &AmqpNode,
    slot: &Mutex<Option<mpsc::Sender<AmqpMessage>>>,
    mut sender: Sender,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel(64);
    if let Ok(mut s) = slot.lock() {
        *s = Some(tx);
    }
    let result = loop {
        let message = match next_work(conn, Some(node), &mut sender, &mut rx).await {
            Next::Work(message) => message,
            Next::Done => break Ok(()),
            Next::Expired(e) => {
                let _ = sender.close_with_error(e).await;
                break Err("token expired".to_string());
            }
            Next::Detached(why) => break Err(why),
        };
        if let Err(e) = sender.send(message).await {
            break Err(e.to_string());
        }
    };
    if let Ok(mut s) = slot.lock() {
        *s = None;
    }
    result
}

/// Direct method responses: `IoThub-status` and the JSON payload, matched by correlation id.
async fn method_responses(session: &DeviceSession, mut receiver: Receiver) -> Result<(), String> {
    loop {
        let delivery = receiver
            .recv::<Body<Value>>()
            .await
            .map_err(|e| e.to_string())?;
        receiver
            .accept(&delivery)
            .await
            .map_err(|e| e.to_string())?;
        let m = delivery.message();
        let Some(cid) = m
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(id_string)
        else {
            continue;
        };
        let status = match m
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get("IoThub-status"))
        {
            Some(SimpleValue::Int(s)) => *s,
            Some(SimpleValue::Long(s)) => *s as i32,
            Some(SimpleValue::Uint(s)) => *s as i32,
            Some(SimpleValue::String(s)) => s.parse().unwrap_or(500),
            _ => 500,
        };
        let payload = serde_json::from_slice(&body_bytes(&m.body)).unwrap_or(Json::Null);
        if let Some(reply) = session.pending.lock().ok().and_then(|mut p| p.remove(&cid)) {
            let _ = reply.send(Ok(MethodReply { status, payload }));
        }
    }
}

fn annotation(m: &AmqpMessage, key: &str) -> Option<String> {
    match m
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key.to_string())))?
    {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Twin requests: GET, PATCH `/properties/reported`, PUT/DELETE
/// `/notifications/twin/properties/desired`; answered with a `status` annotation (and `version`
/// for patches) and a JSON body, on the twin sender link.
async fn twin_requests(
    conn: &ConnectionState,
    session: &DeviceSession,
    mut receiver: Receiver,
) -> Result<(), String> {
    loop {
        let delivery = receiver
            .recv::<Body<Value>>()
            .await
            .map_err(|e| e.to_string())?;
        // Pre-settled requests (the Node SDK's twin sender) are not in the unsettled map, so
        // this sends nothing for them.
        receiver
            .accept(&delivery)
            .await
            .map_err(|e| e.to_string())?;
        let m = delivery.message();
        let correlation = m.properties.as_ref().and_then(|p| p.correlation_id.clone());
        let operation = annotation(m, "operation").unwrap_or_default();
        let resource = annotation(m, "resource").unwrap_or_default();
        let (status, version, body) =
            match twin_request(conn, session, &operation, &resource, &body_bytes(&m.body)).await {
                Ok((status, version, body)) => (status, version, body),
                Err(e) => (
                    e.code.http_status() as i32,
                    None,
                    serde_json::json!({"Message": e.message, "ExceptionMessage": ""})
                        .to_string()
                        .into_bytes(),
                ),
            };
        let mut annotations = vec![("status", Value::Int(status))];
        if let Some(v) = version {
            annotations.push(("version", Value::Long(v as i64)));
        }
        let reply = data_message(body, correlation, annotations);
        let tx = session.twin_out.lock().ok().and_then(|t| t.clone());
        match tx {
            Some(tx) => {
                let _ = tx.send(reply).await;
            }
            None => tracing::debug!("twin request without a twin sender link"),
        }
    }
}

async fn twin_request(
    conn: &ConnectionState,
    session: &DeviceSession,
    operation: &str,
    resource: &str,
    body: &[u8],
) -> Result<(i32, Option<u64>, Vec<u8>), HubError> {
    let hub = &conn.ctx.hub;
    let module = session
        .module_id
        .clone()
        .map(crate::domain::ModuleId::new)
        .transpose()?;
    match (operation, resource) {
        ("GET", _) => {
            let (d, m) = (session.device_id.clone(), module.clone());
            let twin = hub
                .read(ReadConsistency::Linearizable, move |s| {
                    s.twin_for_device(&d, m.as_ref())
                })
                .await?;
            Ok((200, None, twin.to_string().into_bytes()))
        }
        ("PATCH", "/properties/reported") => {
            let response = hub
                .write(HubCommand::reported_patch(
                    session.device_id.clone(),
                    module,
                    body,
                    iso_now(),
                )?)
                .await?;
            let version = match response {
                HubResponse::ReportedVersion(v) => Some(v),
                _ => None,
            };
            Ok((204, version, Vec::new()))
        }
        ("PUT", "/notifications/twin/properties/desired") => {
            session.desired.store(true, Ordering::Relaxed);
            Ok((200, None, Vec::new()))
        }
        ("DELETE", "/notifications/twin/properties/desired") => {
            session.desired.store(false, Ordering::Relaxed);
            Ok((200, None, Vec::new()))
        }
        _ => Err(HubError::invalid(format!(
            "unsupported twin operation {operation} {resource}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_properties_become_the_mqtt_property_bag() {
        use fe2o3_amqp::types::messaging::AmqpValue;
        let mut app = OrderedMap::new();
        app.insert("temp".to_string(), SimpleValue::Uint(21));
        let m: AmqpMessage = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::String("m 1".into())),
                content_type: Some(Symbol::from("application/json")),
                content_encoding: Some(Symbol::from("utf-8")),
                ..Default::default()
            }),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Value(AmqpValue(Value::Null)),
            footer: None,
        };
        let bag = property_bag(&m);
        let parsed = crate::domain::telemetry::parse_property_bag(&bag).expect("bag");
        let get = |k: &str| parsed.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("$.mid").as_deref(), Some("m 1"));
        assert_eq!(get("$.ct").as_deref(), Some("application/json"));
        assert_eq!(get("temp").as_deref(), Some("21"));
    }
}
