//! The link loops of the AMQP endpoint: `$cbs` and `$management` request/response, C2D sends,
//! feedback, Event Hubs partition receivers and the `/messages/events` redirect.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{self, Fields};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations, MessageId,
    Outcome, Properties, annotations::OwnedKey,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{
    Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Value,
};
use tokio::sync::{Notify, mpsc};

use super::address::{AmqpNode, EventPosition, parse_selector};
use super::{ConnectionState, TOKEN_CHECK, amqp_error, hub_error};
use crate::domain::c2d::C2dSendRequest;
use crate::domain::{DeviceId, HubCommand, HubError, HubResponse};
use crate::hub::ReadConsistency;
use crate::telemetry_api::{Event, StartAt};
use meridian_proto::ErrorCode;

/// An accepted link: we send on it (the client receives) or receive on it.
pub(crate) enum Link {
    Sender(Sender),
    Receiver(Receiver),
}

pub(crate) type AmqpMessage = Message<Body<Value>>;

/// The reply links of one session (`$cbs` and `$management` receivers): a request is answered on
/// the link named by its `reply-to` (a link name or target address), else on the only one there.
#[derive(Default)]
pub(crate) struct Replies {
    links: Mutex<Vec<ReplyLink>>,
    changed: Notify,
}

struct ReplyLink {
    id: u64,
    node: &'static str,
    name: String,
    target: String,
    tx: mpsc::Sender<AmqpMessage>,
}

impl Replies {
    fn add(
        &self,
        id: u64,
        node: &'static str,
        name: String,
        target: String,
    ) -> mpsc::Receiver<AmqpMessage> {
        let (tx, rx) = mpsc::channel(64);
        if let Ok(mut links) = self.links.lock() {
            links.push(ReplyLink {
                id,
                node,
                name,
                target,
                tx,
            });
        }
        self.changed.notify_waiters();
        rx
    }

    fn remove(&self, id: u64) {
        if let Ok(mut links) = self.links.lock() {
            links.retain(|l| l.id != id);
        }
    }

    fn find(&self, node: &str, reply_to: Option<&str>) -> Option<mpsc::Sender<AmqpMessage>> {
        let links = self.links.lock().ok()?;
        let of_node = || links.iter().filter(|l| l.node == node);
        reply_to
            .and_then(|r| of_node().find(|l| l.name == r || l.target == r))
            .or_else(|| of_node().next())
            .map(|l| l.tx.clone())
    }

    /// The reply link for a request, waiting briefly for it: clients may attach it after the
    /// request link.
    async fn wait(&self, node: &str, reply_to: Option<&str>) -> Option<mpsc::Sender<AmqpMessage>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let notified = self.changed.notified();
            if let Some(tx) = self.find(node, reply_to) {
                return Some(tx);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

static NEXT_LINK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The selector filter string on a receiver's source, whichever descriptor carries it (pyamqp:
/// the symbol `apache.org:selector-filter:string`; rhea: the code 0x0000468C00000004).
pub(crate) fn selector_of(attach: &Attach) -> Option<String> {
    let filter = attach.source.as_ref()?.filter.as_ref()?;
    filter.iter().find_map(|(_, v)| match v {
        Value::Described(d) => match &d.value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
        Value::String(s) => Some(s.clone()),
        _ => None,
    })
}

/// Closes a just-attached link with `error`.
pub(crate) async fn refuse(link: super::LinkEndpoint, error: definitions::Error) {
    tracing::debug!(%error, "amqp link refused");
    let _ = match link {
        super::LinkEndpoint::Sender(s) => s.close_with_error(error).await,
        super::LinkEndpoint::Receiver(r) => r.close_with_error(error).await,
    };
}

/// Runs one link until it closes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    conn: Arc<ConnectionState>,
    replies: Arc<Replies>,
    node: AmqpNode,
    name: String,
    address: String,
    filter: Option<String>,
    link: super::LinkEndpoint,
) {
    let link = Link::from(link);
    let id = NEXT_LINK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = match (node, link) {
        (AmqpNode::Cbs, Link::Receiver(r)) => requests(&conn, &replies, "$cbs", r).await,
        (AmqpNode::Management, Link::Receiver(r)) => {
            requests(&conn, &replies, "$management", r).await
        }
        (node @ (AmqpNode::Cbs | AmqpNode::Management), Link::Sender(s)) => {
            let kind = if node == AmqpNode::Cbs {
                "$cbs"
            } else {
                "$management"
            };
            let target = s
                .target()
                .as_ref()
                .and_then(|t| t.address.clone())
                .unwrap_or_default();
            let rx = replies.add(id, kind, name, target);
            let r = reply_link(&conn, s, rx).await;
            replies.remove(id);
            r
        }
        (AmqpNode::DeviceBound, Link::Receiver(r)) => c2d_sends(&conn, r).await,
        (node @ AmqpNode::Feedback, Link::Sender(s)) => feedback(&conn, &node, s).await,
        (node @ AmqpNode::FileNotifications, Link::Sender(s)) => {
            // File upload is not part of Meridian yet, so no notification ever exists: the link
            // stays open (the SDK keeps it) and only its token is enforced.
            idle(&conn, &node, s).await
        }
        (
            AmqpNode::EventHubPartition {
                partition,
                consumer_group,
                ..
            },
            Link::Sender(s),
        ) => events(&conn, partition, &consumer_group, filter, s).await,
        (AmqpNode::IotHubEvents { rest }, Link::Sender(s)) => redirect(&conn, &rest, s).await,
        (
            AmqpNode::Device {
                device_id,
                module_id,
                link: device_link,
            },
            link,
        ) => super::device::serve(conn.clone(), device_id, module_id, device_link, link).await,
        (_, Link::Sender(s)) => {
            let e = amqp_error(
                "amqp:not-allowed",
                format!("{address} cannot be received from"),
            );
            s.close_with_error(e).await.map_err(|e| e.to_string())
        }
        (_, Link::Receiver(r)) => {
            let e = amqp_error("amqp:not-allowed", format!("{address} cannot be sent to"));
            r.close_with_error(e).await.map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        tracing::debug!(%address, error = %e, "amqp link ended");
    }
}

type LinkResult = Result<(), String>;

/// What an outgoing link that sends work from a channel gets next.
pub(crate) enum Next<T> {
    /// Work to send.
    Work(T),
    /// The channel closed.
    Done,
    /// The link's token expired: close the link with this error.
    Expired(definitions::Error),
    /// The client detached the link.
    Detached(String),
}

/// Waits for the next work on `rx` while the client keeps `sender` attached and, for a node that
/// needs one, the connection's token still covers it (checked every [`TOKEN_CHECK`]).
pub(crate) async fn next_work<T>(
    conn: &ConnectionState,
    node: Option<&AmqpNode>,
    sender: &mut Sender,
    rx: &mut mpsc::Receiver<T>,
) -> Next<T> {
    loop {
        tokio::select! {
            work = rx.recv() => return work.map_or(Next::Done, Next::Work),
            _ = tokio::time::sleep(TOKEN_CHECK), if node.is_some() => {
                if let Some(Err(e)) = node.map(|n| still_allowed(conn, n)) {
                    return Next::Expired(e);
                }
            }
            detached = sender.on_detach() => return Next::Detached(detached.to_string()),
        }
    }
}

/// Sends what the request links queue, pre-settled.
async fn reply_link(
    conn: &ConnectionState,
    mut sender: Sender,
    mut rx: mpsc::Receiver<AmqpMessage>,
) -> LinkResult {
    loop {
        match next_work(conn, None, &mut sender, &mut rx).await {
            Next::Work(m) => {
                sender.send(m).await.map_err(|e| e.to_string())?;
            }
            // No token to expire on a reply link (`node` is None).
            Next::Done | Next::Expired(_) => return Ok(()),
            Next::Detached(why) => return Err(why),
        }
    }
}

fn app_property<'a>(m: &'a AmqpMessage, key: &str) -> Option<&'a SimpleValue> {
    m.application_properties.as_ref()?.0.get(key)
}

fn app_string(m: &AmqpMessage, key: &str) -> Option<String> {
    match app_property(m, key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn body_string(body: &Body<Value>) -> Option<String> {
    match body {
        Body::Value(AmqpValue(Value::String(s))) => Some(s.clone()),
        Body::Value(AmqpValue(Value::Binary(b))) => String::from_utf8(b.to_vec()).ok(),
        Body::Data(batch) => String::from_utf8(body_bytes_of(batch)).ok(),
        _ => None,
    }
}

fn body_bytes_of(batch: &Batch<Data>) -> Vec<u8> {
    batch.iter().flat_map(|d| d.0.iter().copied()).collect()
}

pub(crate) fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(batch) => body_bytes_of(batch),
        Body::Value(AmqpValue(Value::String(s))) => s.as_bytes().to_vec(),
        Body::Value(AmqpValue(Value::Binary(b))) => b.to_vec(),
        _ => Vec::new(),
    }
}

pub(crate) fn id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid_string(u.as_ref()),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

pub(crate) fn uuid_string(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if hex.len() == 32 {
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    } else {
        hex
    }
}

fn response(
    correlation: Option<MessageId>,
    status: i32,
    description: &str,
    body: Value,
) -> AmqpMessage {
    let mut props = OrderedMap::new();
    props.insert("status-code".to_string(), SimpleValue::Int(status));
    props.insert(
        "status-description".to_string(),
        SimpleValue::String(description.to_string()),
    );
    // `status-code` must be an int: Node's CBS client compares it with `=== 200`.
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: correlation,
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(props)),
        body: Body::Value(AmqpValue(body)),
        footer: None,
    }
}

/// `$cbs` / `$management` request links: settle each request, answer on the session's reply link.
async fn requests(
    conn: &ConnectionState,
    replies: &Replies,
    node: &'static str,
    mut receiver: Receiver,
) -> LinkResult {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                let _ = receiver.close().await;
                return Err(e.to_string());
            }
        };
        receiver
            .accept(&delivery)
            .await
            .map_err(|e| e.to_string())?;
        let request = delivery.message();
        // The reply's correlation-id is the request's message-id, of the same type (uamqp sends
        // a ulong and matches on it).
        let correlation = request
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        let reply_to = request.properties.as_ref().and_then(|p| p.reply_to.clone());
        let (status, description, body) = if node == "$cbs" {
            put_token(conn, request)
        } else {
            management(conn, request).await
        };
        let reply = response(correlation, status, &description, body);
        match replies.wait(node, reply_to.as_deref()).await {
            Some(tx) => {
                let _ = tx.send(reply).await;
            }
            None => tracing::debug!(node, "amqp request without a reply link"),
        }
    }
}

fn put_token(conn: &ConnectionState, request: &AmqpMessage) -> (i32, String, Value) {
    let operation = app_string(request, "operation").unwrap_or_default();
    if operation != "put-token" {
        return (
            400,
            format!("unsupported $cbs operation {operation:?}"),
            Value::Null,
        );
    }
    let Some(audience) = app_string(request, "name") else {
        return (
            400,
            "put-token needs the audience in `name`".into(),
            Value::Null,
        );
    };
    let Some(token) = body_string(&request.body) else {
        return (
            400,
            "put-token needs the token as the body".into(),
            Value::Null,
        );
    };
    match conn.verify(&token, &audience) {
        Ok(grant) => {
            conn.put(grant);
            (200, "OK".into(), Value::Null)
        }
        Err(e) => {
            tracing::debug!(%audience, error = %e.message, "put-token refused");
            (401, e.message, Value::Null)
        }
    }
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = OrderedMap::new();
    for (k, v) in entries {
        m.insert(Value::String(k.to_string()), v);
    }
    Value::Map(m)
}

/// `$management` READ of the Event Hub-compatible endpoint's runtime information.
async fn management(conn: &ConnectionState, request: &AmqpMessage) -> (i32, String, Value) {
    let ctx = &conn.ctx;
    let operation = app_string(request, "operation").unwrap_or_default();
    let kind = app_string(request, "type").unwrap_or_default();
    let name = app_string(request, "name").unwrap_or_default();
    if operation != "READ" {
        return (
            501,
            format!("unsupported operation {operation:?}"),
            Value::Null,
        );
    }
    if let Some(token) = app_string(request, "security_token") {
        let checked = conn.verify(&token, "").and_then(|g| {
            let mut grants = super::cbs::Grants::default();
            grants.put(g);
            grants.check(
                &[ctx.event_hub.clone(), "$management".into()],
                crate::domain::Permission::ServiceConnect,
                crate::clock::unix_now(),
            )
        });
        if let Err(e) = checked {
            return (401, e.message, Value::Null);
        }
    }
    if !name.eq_ignore_ascii_case(&ctx.event_hub) {
        return (404, format!("no event hub named {name:?}"), Value::Null);
    }
    let partitions = ctx.reader.partitions();
    match kind.as_str() {
        "com.microsoft:eventhub" => (
            200,
            "OK".into(),
            map(vec![
                ("name", Value::String(ctx.event_hub.clone())),
                ("type", Value::String(kind.clone())),
                (
                    "created_at",
                    Value::Timestamp(Timestamp::from_milliseconds(
                        ctx.hub
                            .read_local(|s| s.settings.as_ref().map_or(0, |h| h.created_ms))
                            .unwrap_or(0) as i64,
                    )),
                ),
                ("partition_count", Value::Int(partitions as i32)),
                (
                    "partition_ids",
                    Value::Array(Array::from(
                        (0..partitions)
                            .map(|p| Value::String(p.to_string()))
                            .collect::<Vec<_>>(),
                    )),
                ),
            ]),
        ),
        "com.microsoft:partition" => {
            let id = app_string(request, "partition").unwrap_or_default();
            let Some(p) = id.parse::<u32>().ok().filter(|p| *p < partitions) else {
                return (404, format!("no partition {id:?}"), Value::Null);
            };
            match partition_info(conn, p).await {
                Ok(info) => (
                    200,
                    "OK".into(),
                    map(vec![
                        ("name", Value::String(ctx.event_hub.clone())),
                        ("type", Value::String(kind.clone())),
                        ("partition", Value::String(id)),
                        ("begin_sequence_number", Value::Long(info.begin)),
                        ("last_enqueued_sequence_number", Value::Long(info.last)),
                        ("last_enqueued_offset", Value::String(info.last.to_string())),
                        (
                            "last_enqueued_time_utc",
                            Value::Timestamp(Timestamp::from_milliseconds(info.last_time_ms)),
                        ),
                        ("is_partition_empty", Value::Bool(info.empty)),
                    ]),
                ),
                Err(e) => (e.code.http_status() as i32, e.message, Value::Null),
            }
        }
        other => (404, format!("unknown entity type {other:?}"), Value::Null),
    }
}

struct PartitionInfo {
    begin: i64,
    last: i64,
    last_time_ms: i64,
    empty: bool,
}

async fn partition_info(conn: &ConnectionState, p: u32) -> Result<PartitionInfo, HubError> {
    let reader = &conn.ctx.reader;
    let end = reader.start_offset(p, &StartAt::End).await?;
    let begin = reader
        .read_any(p, 0, 1)
        .await?
        .first()
        .map_or(end, |e| e.offset);
    if begin >= end {
        return Ok(PartitionInfo {
            begin: end as i64,
            last: end as i64 - 1,
            last_time_ms: 0,
            empty: true,
        });
    }
    let last = reader.read_any(p, end - 1, 1).await?;
    Ok(PartitionInfo {
        begin: begin as i64,
        last: end as i64 - 1,
        last_time_ms: last.first().map_or(0, enqueued_ms),
        empty: false,
    })
}

fn enqueued_ms(e: &Event) -> i64 {
    e.message
        .system_properties
        .get("iothub-enqueuedtime")
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or(0, |t| t.timestamp_millis())
}

/// Fails once the connection's tokens no longer allow `node` (expired and not refreshed).
pub(crate) fn still_allowed(
    conn: &ConnectionState,
    node: &AmqpNode,
) -> Result<(), definitions::Error> {
    conn.check(node).map_err(|e| hub_error(&e))
}

/// C2D sends: each message is enqueued (committed by the hub's Raft group) before it is accepted;
/// queue limits and unknown devices come back as rejections with Azure's conditions.
async fn c2d_sends(conn: &ConnectionState, mut receiver: Receiver) -> LinkResult {
    let node = AmqpNode::DeviceBound;
    loop {
        let delivery = tokio::select! {
            d = receiver.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(e) => {
                    let _ = receiver.close().await;
                    return Err(e.to_string());
                }
            },
            _ = tokio::time::sleep(TOKEN_CHECK) => {
                if let Err(e) = still_allowed(conn, &node) {
                    let _ = receiver.close_with_error(e).await;
                    return Err("token expired".into());
                }
                continue;
            }
        };
        if let Err(e) = still_allowed(conn, &node) {
            let _ = receiver.reject(&delivery, e.clone()).await;
            let _ = receiver.close_with_error(e).await;
            return Err("token expired".into());
        }
        let outcome = enqueue_c2d(conn, delivery.message()).await;
        match outcome {
            Ok(()) => receiver.accept(&delivery).await,
            Err(e) => {
                tracing::debug!(error = %e.message, "amqp c2d send rejected");
                receiver.reject(&delivery, hub_error(&e)).await
            }
        }
        .map_err(|e| e.to_string())?;
    }
}

pub(crate) fn simple_string(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Uuid(u) => uuid_string(u.as_ref()),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleValue::Null => String::new(),
        other => format!("{other:?}"),
    }
}

/// The device a C2D message is for: `to = /devices/{id}/messages/devicebound`.
fn c2d_device(to: Option<&str>) -> Result<DeviceId, HubError> {
    let to = to.ok_or_else(|| HubError::invalid("a C2D message needs `to`"))?;
    let segments: Vec<&str> = to.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["devices", id, "messages", "devicebound"] => {
            let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
            DeviceId::new(id.into_owned())
        }
        _ => Err(HubError::invalid(format!(
            "`to` must be /devices/{{deviceId}}/messages/devicebound, not {to:?}"
        ))),
    }
}

async fn enqueue_c2d(conn: &ConnectionState, m: &AmqpMessage) -> Result<(), HubError> {
    let props = m.properties.clone().unwrap_or_default();
    let device_id = c2d_device(props.to.as_deref())?;
    let mut properties = BTreeMap::new();
    let mut ack = None;
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            if k.eq_ignore_ascii_case("iothub-ack") {
                ack = Some(simple_string(v));
            } else {
                properties.insert(k.clone(), simple_string(v));
            }
        }
    }
    let now = crate::clock::unix_ms();
    let message = C2dSendRequest {
        message_id: props.message_id.as_ref().map(id_string),
        correlation_id: props.correlation_id.as_ref().map(id_string),
        user_id: props
            .user_id
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        content_type: props.content_type.as_ref().map(|s| s.as_str().to_string()),
        content_encoding: props
            .content_encoding
            .as_ref()
            .map(|s| s.as_str().to_string()),
        ack,
        expiry_ms: props
            .absolute_expiry_time
            .as_ref()
            .map(|t| t.milliseconds().max(0) as u64),
        properties,
        body: body_bytes(&m.body),
    }
    .into_message(now, random_id)?;
    match conn
        .ctx
        .hub
        .write(HubCommand::SendC2d { device_id, message })
        .await?
    {
        HubResponse::C2dEnqueued { .. } => Ok(()),
        other => Err(HubError::new(
            ErrorCode::ServerError,
            format!("unexpected hub response {other:?}"),
        )),
    }
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid_string(&bytes)
}

/// Waits up to `wait` for the client to detach; true when it did (fe2o3 has answered the detach).
pub(crate) async fn detached_within(sender: &mut Sender, wait: Duration) -> bool {
    tokio::time::timeout(wait, sender.on_detach()).await.is_ok()
}

/// Keeps a link that has nothing to send open while its token is valid.
async fn idle(conn: &ConnectionState, node: &AmqpNode, mut sender: Sender) -> LinkResult {
    loop {
        if let Err(e) = still_allowed(conn, node) {
            let _ = sender.close_with_error(e).await;
            return Err("token expired".into());
        }
        if detached_within(&mut sender, TOKEN_CHECK).await {
            return Ok(());
        }
    }
}

/// How long the AMQP feedback receiver holds a batch before it returns to the queue.
const FEEDBACK_LOCK_MS: u64 = 60_000;

/// Feedback: each batch the hub locks goes out as one unsettled message (a JSON array, Azure's
/// feedback format); the client's outcome completes it (accepted, rejected) or returns it
/// (released, modified).
async fn feedback(conn: &ConnectionState, node: &AmqpNode, mut sender: Sender) -> LinkResult {
    let hub = &conn.ctx.hub;
    loop {
        if let Err(e) = still_allowed(conn, node) {
            let _ = sender.close_with_error(e).await;
            return Err("token expired".into());
        }
        let now = crate::clock::unix_ms();
        let pending = hub
            .read(ReadConsistency::Stale, move |s| {
                Ok(!s.feedback.is_empty() || s.feedback_locks.values().any(|(u, _)| *u <= now))
            })
            .await
            .unwrap_or(false);
        if !pending {
            if detached_within(&mut sender, Duration::from_millis(200)).await {
                return Ok(());
            }
            continue;
        }
        let lock_token = random_id();
        let records = match hub
            .write(HubCommand::LockFeedback {
                lock_token: lock_token.clone(),
                now_ms: now,
                lock_ms: FEEDBACK_LOCK_MS,
            })
            .await
        {
            Ok(HubResponse::Feedback { records, .. }) => records,
            Ok(_) | Err(_) => {
                // Not the leader's turn yet (election, forwarding): try again shortly.
                if detached_within(&mut sender, Duration::from_millis(500)).await {
                    return Ok(());
                }
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        let body = serde_json::to_vec(&records).unwrap_or_default();
        let message: AmqpMessage = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                message_id: Some(MessageId::String(lock_token.clone())),
                content_type: Some(Symbol::from(
                    "application/vnd.microsoft.iothub.feedback.json",
                )),
                content_encoding: Some(Symbol::from("utf-8")),
                ..Default::default()
            }),
            application_properties: None,
            body: Body::Data(Batch::new(vec![Data(Binary::from(body))])),
            footer: None,
        };
        let outcome = sender.send(message).await;
        let command = match &outcome {
            Ok(Outcome::Accepted(_) | Outcome::Rejected(_)) => {
                HubCommand::CompleteFeedback { lock_token }
            }
            _ => HubCommand::AbandonFeedback { lock_token },
        };
        if let Err(e) = hub.write(command).await {
            // The lock runs out and the batch returns on its own.
            tracing::debug!(error = %e.message, "settling amqp feedback");
        }
        if let Err(e) = outcome {
            return Err(e.to_string());
        }
    }
}

/// The event as Azure's Event Hub-compatible endpoint sends it.
fn event_message(e: &Event) -> AmqpMessage {
    let sys = &e.message.system_properties;
    let mut annotations = OrderedMap::new();
    let mut annotate = |k: &str, v: Value| {
        annotations.insert(OwnedKey::Symbol(Symbol::from(k.to_string())), v);
    };
    let enqueued = Timestamp::from_milliseconds(enqueued_ms(e));
    annotate("x-opt-sequence-number", Value::Long(e.offset as i64));
    annotate("x-opt-offset", Value::String(e.offset.to_string()));
    annotate("x-opt-enqueued-time", Value::Timestamp(enqueued.clone()));
    for (key, value) in sys {
        match key.as_str() {
            "iothub-enqueuedtime" => annotate(key, Value::Timestamp(enqueued.clone())),
            k if k.starts_with("iothub-") || k.starts_with("dt-") => {
                annotate(k, Value::String(value.clone()))
            }
            _ => {}
        }
    }
    let text = |k: &str| sys.get(k).cloned();
    let symbol = |k: &str| sys.get(k).map(|v| Symbol::from(v.clone()));
    let properties = Properties {
        message_id: text("message-id").map(MessageId::String),
        correlation_id: text("correlation-id").map(MessageId::String),
        user_id: text("user-id").map(|u| Binary::from(u.into_bytes())),
        content_type: symbol("content-type"),
        content_encoding: symbol("content-encoding"),
        ..Default::default()
    };
    let mut app = OrderedMap::new();
    for (k, v) in &e.message.application_properties {
        app.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(MessageAnnotations(annotations)),
        properties: Some(properties),
        application_properties: Some(ApplicationProperties(app)),
        body: Body::Data(Batch::new(vec![Data(Binary::from(e.message.body.clone()))])),
        footer: None,
    }
}

/// Where a receiver starts, from its selector filter (no filter: the start of the partition).
async fn start_of(conn: &ConnectionState, p: u32, filter: Option<&str>) -> Result<u64, HubError> {
    let reader = &conn.ctx.reader;
    let position = match filter {
        Some(f) => parse_selector(f)?,
        None => EventPosition::At(0),
    };
    match position {
        EventPosition::At(o) => Ok(o),
        EventPosition::Latest => reader.start_offset(p, &StartAt::End).await,
        EventPosition::EnqueuedAtOrAfter(ms) => {
            let at = chrono::DateTime::from_timestamp_millis(ms)
                .ok_or_else(|| HubError::invalid("enqueued time out of range"))?
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            reader.start_offset(p, &StartAt::EnqueuedAt(at)).await
        }
    }
}

/// Most events read from the partition log per batch.
const EVENT_BATCH: usize = 100;

/// An Event Hubs partition receiver: events from the partition log, pre-settled, as the client's
/// credit allows; polls the log for new ones.
async fn events(
    conn: &ConnectionState,
    partition: u32,
    consumer_group: &str,
    filter: Option<String>,
    mut sender: Sender,
) -> LinkResult {
    let ctx = &conn.ctx;
    let node = AmqpNode::EventHubPartition {
        event_hub: ctx.event_hub.clone(),
        consumer_group: consumer_group.to_string(),
        partition,
    };
    let group_known = consumer_group.eq_ignore_ascii_case("$Default")
        || ctx
            .hub
            .read(ReadConsistency::Stale, {
                let g = consumer_group.to_string();
                move |s| Ok(s.consumer_groups.contains_key(&g))
            })
            .await
            .unwrap_or(false);
    if !group_known || partition >= ctx.reader.partitions() {
        let e = amqp_error(
            "amqp:not-found",
            format!("no consumer group {consumer_group:?} / partition {partition}"),
        );
        return sender.close_with_error(e).await.map_err(|e| e.to_string());
    }
    let mut next = match start_of(conn, partition, filter.as_deref()).await {
        Ok(o) => o,
        Err(e) => {
            return sender
                .close_with_error(hub_error(&e))
                .await
                .map_err(|e| e.to_string());
        }
    };
    let mut checked = tokio::time::Instant::now();
    let mut idle = Duration::from_millis(20);
    loop {
        if checked.elapsed() >= TOKEN_CHECK {
            checked = tokio::time::Instant::now();
            if let Err(e) = still_allowed(conn, &node) {
                let _ = sender.close_with_error(e).await;
                return Err("token expired".into());
            }
        }
        let batch = match ctx.reader.read_any(partition, next, EVENT_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(partition, error = %e.message, "amqp event read");
                Vec::new()
            }
        };
        if batch.is_empty() {
            if detached_within(&mut sender, idle).await {
                return Ok(());
            }
            idle = (idle * 2).min(Duration::from_millis(200));
            continue;
        }
        idle = Duration::from_millis(20);
        for event in &batch {
            sender
                .send(event_message(event))
                .await
                .map_err(|e| e.to_string())?;
            next = event.offset + 1;
        }
    }
}

/// `/messages/events/...`: the IoT Hub name of the events endpoint. Azure answers with
/// `amqp:link:redirect` to the Event Hub-compatible name; the official samples read the name
/// from `address` (`amqps://host:port/<name>/...`, port required).
async fn redirect(conn: &ConnectionState, rest: &str, sender: Sender) -> LinkResult {
    let ctx = &conn.ctx;
    let host = ctx
        .host_name
        .rsplit_once(':')
        .map_or(ctx.host_name.as_str(), |(h, _)| h)
        .to_string();
    let mut info = Fields::new();
    info.insert(Symbol::from("hostname"), Value::String(host.clone()));
    info.insert(Symbol::from("network-host"), Value::String(host.clone()));
    info.insert(Symbol::from("port"), Value::Int(ctx.redirect_port as i32));
    info.insert(
        Symbol::from("address"),
        Value::String(format!(
            "amqps://{host}:{}/{}{rest}",
            ctx.redirect_port, ctx.event_hub
        )),
    );
    let error = definitions::Error::new(
        definitions::LinkError::Redirect,
        Some("use the Event Hub-compatible endpoint".to_string()),
        Some(info),
    );
    sender
        .close_with_error(error)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2d_targets_name_one_device() {
        assert_eq!(
            c2d_device(Some("/devices/d1/messages/devicebound"))
                .map(|d| d.as_str().to_string())
                .ok(),
            Some("d1".to_string())
        );
        assert!(c2d_device(Some("/devices/d1/messages/events")).is_err());
        assert!(c2d_device(None).is_err());
    }

    #[test]
    fn events_carry_azure_annotations_and_properties() {
        let mut message = crate::domain::telemetry::TelemetryMessage {
            system_properties: Default::default(),
            application_properties: Default::default(),
            body: Vec::new(),
        };
        message.system_properties.insert(
            "iothub-enqueuedtime".into(),
            "2026-11-28T00:00:00.250Z".into(),
        );
        message
            .system_properties
            .insert("iothub-connection-device-id".into(), "d1".into());
        message
            .system_properties
            .insert("message-id".into(), "m-1".into());
        message
            .system_properties
            .insert("content-type".into(), "application/json".into());
        message
            .application_properties
            .insert("temperature".into(), "21".into());
        message.body = b"{}".to_vec();
        let m = event_message(&Event {
            partition: 2,
            offset: 7,
            message,
        });
        let ann = &m.message_annotations.as_ref().expect("annotations").0;
        let get = |k: &str| {
            ann.get(&OwnedKey::Symbol(Symbol::from(k.to_string())))
                .cloned()
        };
        assert_eq!(get("x-opt-sequence-number"), Some(Value::Long(7)));
        assert_eq!(get("x-opt-offset"), Some(Value::String("7".into())));
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-28T00:00:00.250Z")
            .expect("time")
            .timestamp_millis();
        assert_eq!(
            get("x-opt-enqueued-time"),
            Some(Value::Timestamp(Timestamp::from_milliseconds(at)))
        );
        assert_eq!(
            get("iothub-connection-device-id"),
            Some(Value::String("d1".into()))
        );
        let props = m.properties.as_ref().expect("properties");
        assert_eq!(props.message_id, Some(MessageId::String("m-1".into())));
        assert_eq!(
            props.content_type.as_ref().map(|s| s.as_str().to_string()),
            Some("application/json".to_string())
        );
        assert_eq!(
            m.application_properties
                .as_ref()
                .expect("app")
                .0
                .get("temperature"),
            Some(&SimpleValue::String("21".into()))
        );
    }
}
