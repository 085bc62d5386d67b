//! The service REST API (Azure IoT Hub's data-plane paths) over HTTPS.
//!
//! Handlers decode the request, authenticate its SAS token against the hub's shared access
//! policies, call the [`Hub`] and encode Azure's response shapes and status codes (the exact codes
//! the official SDKs accept: PUT device 200, DELETE 204, ...). Errors become Azure's error body and
//! `iothub-errorcode` header through the one table in `meridian_proto::ErrorCode`.

mod serve;

use std::collections::HashMap;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::Instrument;

pub use serve::{serve_https, serve_https_and_amqp};

use crate::auth::authorize_service;
use crate::clock::{iso_now, unix_ms, unix_now};
use crate::domain::registry::{DeviceSpec, GeneratedKeys, ModuleSpec};
use crate::domain::twin::TwinPatch;
use crate::domain::{
    DeviceId, HubCommand, HubError, HubResponse, HubResult, IfMatch, ModuleId, Permission,
    SharedAccessPolicy,
};
use crate::hub::{Hub, ReadConsistency};
use crate::observability::metrics;
use meridian_proto::ErrorCode;

/// Most devices one list call returns (Azure: 1000).
const MAX_LIST: usize = 1000;

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The hub.
    pub hub: Hub,
    /// The device endpoint (direct methods, MQTT over WebSockets).
    pub mqtt: std::sync::Arc<crate::mqtt::MqttContext>,
    /// Telemetry partitions and consumer groups.
    pub events: crate::telemetry_api::EventReader,
    /// Health of webhook endpoints on this node.
    pub webhooks: crate::webhook::WebhookHealth,
    /// The control plane (operator API) and its gossip view.
    pub control: crate::control::ControlPlane,
    /// The AMQP endpoint, for AMQP over WebSockets (set once it exists).
    pub amqp: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<crate::amqp::AmqpContext>>>,
}

/// An error answered in Azure's format.
#[derive(Debug)]
pub struct ApiError(pub HubError);

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code;
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let now = crate::clock::utc_now().format("%m/%d/%Y %H:%M:%S");
        let body = json!({
            "Message": format!("ErrorCode:{};{}", code.name(), self.0.message),
            "ExceptionMessage": format!("ErrorCode:{} ({});TimeStamp:{now}", code.name(), code.azure_code()),
            "errorCode": code.azure_code(),
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(code.name()) {
            response.headers_mut().insert("iothub-errorcode", v);
        }
        if code.retryable() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// Builds the router with every service route.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/devices", get(list_devices))
        .route("/devices/", get(list_devices))
        .route(
            "/devices/{id}",
            get(get_device).put(put_device).delete(delete_device),
        )
        .route("/devices/{id}/modules", get(list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(get_module).put(put_module).delete(delete_module),
        )
        .route(
            "/twins/{id}",
            get(get_twin).patch(patch_twin).put(replace_twin),
        )
        .route(
            "/twins/{id}/modules/{mid}",
            get(get_module_twin)
                .patch(patch_module_twin)
                .put(replace_module_twin),
        )
        .route("/twins/{id}/methods", post(invoke_device_method))
        .route(
            "/twins/{id}/modules/{mid}/methods",
            post(invoke_module_method),
        )
        .route("/devices/{id}/messages/devicebound", post(send_c2d))
        .route("/devices/{id}/messages/deviceBound", post(send_c2d))
        .route("/devices/{id}/commands", delete(purge_c2d))
        .route("/messages/serviceBound/feedback", get(receive_feedback))
        .route("/messages/servicebound/feedback", get(receive_feedback))
        .route(
            "/messages/serviceBound/feedback/{lock}",
            delete(complete_feedback),
        )
        .route(
            "/messages/servicebound/feedback/{lock}",
            delete(complete_feedback),
        )
        .route(
            "/messages/serviceBound/feedback/{lock}/abandon",
            post(abandon_feedback),
        )
        .route(
            "/messages/servicebound/feedback/{lock}/abandon",
            post(abandon_feedback),
        )
        .route("/$iothub/websocket", get(mqtt_websocket))
        .route("/$servicebus/websocket", get(mqtt_websocket))
        .route("/devices/query", post(query_hub))
        .route("/meridian/cluster/nodes", get(cluster_nodes).post(add_node))
        .route("/meridian/cluster/nodes/{id}", delete(remove_node))
        .route("/meridian/cluster/partitions", get(cluster_partitions))
        .route("/meridian/cluster/nodes/{id}/drain", post(drain_node))
        .route("/meridian/cluster/leader", post(transfer_leadership))
        .route("/meridian/cluster/faults", get(get_faults).put(put_faults))
        .route("/meridian/region", get(region_status))
        .route("/meridian/region/failover", post(region_failover))
        .route("/meridian/routing", get(get_routing))
        .route("/meridian/routing/fallback", put(set_fallback))
        .route(
            "/meridian/routing/routes/{name}",
            put(put_route).delete(delete_route),
        )
        .route(
            "/meridian/routing/endpoints/{name}",
            put(put_endpoint).delete(delete_endpoint),
        )
        .route(
            "/meridian/routing/endpoints/{name}/health",
            get(endpoint_health),
        )
        .route(
            "/meridian/routing/enrichments/{key}",
            put(put_enrichment).delete(delete_enrichment),
        )
        .route("/meridian/events/endpoint", get(event_hub_endpoint))
        .route("/meridian/events/partitions", get(partition_info))
        .route("/meridian/events/partitions/{partition}", get(read_events))
        .route("/meridian/events/consumergroups", get(list_consumer_groups))
        .route(
            "/meridian/events/consumergroups/{name}",
            put(create_consumer_group).delete(delete_consumer_group),
        )
        .route(
            "/meridian/events/consumergroups/{name}/checkpoints",
            post(store_checkpoint),
        )
        .route("/statistics/devices", get(registry_statistics))
        .route("/meridian/certificates", get(list_certificates))
        .route(
            "/meridian/certificates/{name}",
            get(get_certificate)
                .put(put_certificate)
                .delete(delete_certificate),
        )
        .route("/meridian/policies", get(list_policies))
        .route(
            "/meridian/policies/{name}",
            get(get_policy).put(put_policy).delete(delete_policy),
        )
        .route("/statistics/service", get(service_statistics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(check_api_version))
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError(HubError::new(
        ErrorCode::ResourceNotFound,
        format!("no route for {method} {}", uri.path()),
    ))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError(HubError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

/// Records a span, a latency sample and a request count for every request.
async fn observe(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let span = tracing::info_span!("api", %method, route = %route, status = tracing::field::Empty);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    let m = metrics();
    m.api_requests
        .with_label_values(&[method.as_str(), &route, &status.to_string()])
        .inc();
    m.api_latency
        .with_label_values(&[method.as_str(), &route])
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(parent: &span, %status, elapsed_ms = started.elapsed().as_millis() as u64, "request done");
    response
}

/// Accepts any `api-version` that looks like an Azure API version; a malformed one is a 400.
async fn check_api_version(request: Request, next: Next) -> Response {
    let bad = request.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "api-version")
            .map(|(_, v)| v.to_string())
            .filter(|v| !valid_api_version(v))
    });
    match bad {
        Some(v) => ApiError(HubError::invalid(format!(
            "api-version {v:?} is not a valid version (YYYY-MM-DD[-preview])"
        )))
        .into_response(),
        None => next.run(request).await,
    }
}

fn valid_api_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

impl ApiState {
    /// Authenticates the request for one of `needed` on `resource`.
    async fn authorize(
        &self,
        headers: &HeaderMap,
        needed: &[Permission],
        resource: &[&str],
    ) -> HubResult<SharedAccessPolicy> {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // Policies change rarely; a local read is enough unless this node has not yet applied the
        // hub's creation, in which case it catches up with the leader first.
        let initialized = self
            .hub
            .read(ReadConsistency::Stale, |s| Ok(s.settings.is_some()))
            .await?;
        let consistency = if initialized {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        };
        let now = unix_now();
        self.hub
            .read(consistency, |s| {
                let lookup = |name: &str| -> Option<&SharedAccessPolicy> { s.policy(name) };
                authorize_service(auth, lookup, needed, resource, now).cloned()
            })
            .await
    }
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> HubResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        HubError::new(
            ErrorCode::IotHubFormatError,
            format!("the request body is not valid JSON for this operation: {e}"),
        )
    })
}

fn if_match(headers: &HeaderMap) -> IfMatch {
    IfMatch::from_header(headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()))
}

fn ok_json(value: Value) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn unexpected(response: HubResponse) -> ApiError {
    ApiError(HubError::new(
        ErrorCode::ServerError,
        format!("unexpected state machine response {response:?}"),
    ))
}

// ---- devices ----

async fn list_devices(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryRead], &["devices"])
        .await?;
    let top = match q.get("top") {
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|t| (1..=MAX_LIST).contains(t))
            .ok_or_else(|| HubError::invalid(format!("top must be 1 to {MAX_LIST}")))?,
        None => MAX_LIST,
    };
    let devices = s
        .hub
        .read(ReadConsistency::Linearizable, |st| Ok(st.list_devices(top)))
        .await?;
    Ok(ok_json(devices))
}

async fn get_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryRead], &["devices", &id])
        .await?;
    let id = DeviceId::new(id)?;
    let device = s
        .hub
        .read(ReadConsistency::Linearizable, |st| st.get_device(&id))
        .await?;
    Ok(ok_json(device))
}

async fn put_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryWrite], &["devices", &id])
        .await?;
    let device_id = DeviceId::new(id)?;
    let spec: DeviceSpec = parse_body(&body)?;
    let command = HubCommand::PutDevice {
        device_id,
        spec,
        if_match: if_match(&headers),
        now: iso_now(),
        keys: GeneratedKeys::random(),
    };
    match s.hub.write(command).await? {
        HubResponse::Device(d) => Ok(ok_json(d)),
        other => Err(unexpected(other)),
    }
}

async fn delete_device(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryWrite], &["devices", &id])
        .await?;
    let device_id = DeviceId::new(id)?;
    match s
        .hub
        .write(HubCommand::DeleteDevice {
            device_id,
            if_match: if_match(&headers),
        })
        .await?
    {
        HubResponse::Deleted => Ok(no_content()),
        other => Err(unexpected(other)),
    }
}

// ---- modules ----

async fn list_modules(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryRead], &["devices", &id])
        .await?;
    let id = DeviceId::new(id)?;
    let modules = s
        .hub
        .read(ReadConsistency::Linearizable, |st| st.list_modules(&id))
        .await?;
    Ok(ok_json(modules))
}

async fn get_module(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    s.authorize(
        &headers,
        &[Permission::RegistryRead],
        &["devices", &id, "modules", &mid],
    )
    .await?;
    let (id, mid) = (DeviceId::new(id)?, ModuleId::new(mid)?);
    let module = s
        .hub
        .read(ReadConsistency::Linearizable, |st| st.get_module(&id, &mid))
        .await?;
    Ok(ok_json(module))
}

async fn put_module(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    s.authorize(
        &headers,
        &[Permission::RegistryWrite],
        &["devices", &id, "modules", &mid],
    )
    .await?;
    let (device_id, module_id) = (DeviceId::new(id)?, ModuleId::new(mid)?);
    let spec: ModuleSpec = parse_body(&body)?;
    let command = HubCommand::PutModule {
        device_id,
        module_id,
        spec,
        if_match: if_match(&headers),
        now: iso_now(),
        keys: GeneratedKeys::random(),
    };
    match s.hub.write(command).await? {
        HubResponse::Module(m) => Ok(ok_json(m)),
        other => Err(unexpected(other)),
    }
}

async fn delete_module(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    s.authorize(
        &headers,
        &[Permission::RegistryWrite],
        &["devices", &id, "modules", &mid],
    )
    .await?;
    let (device_id, module_id) = (DeviceId::new(id)?, ModuleId::new(mid)?);
    match s
        .hub
        .write(HubCommand::DeleteModule {
            device_id,
            module_id,
            if_match: if_match(&headers),
        })
        .await?
    {
        HubResponse::Deleted => Ok(no_content()),
        other => Err(unexpected(other)),
    }
}

// ---- twins ----

/// Twin reads need ServiceConnect (or RegistryRead); writes need ServiceConnect.
const TWIN_READ: &[Permission] = &[Permission::ServiceConnect, Permission::RegistryRead];
const TWIN_WRITE: &[Permission] = &[Permission::ServiceConnect];

async fn read_twin(
    s: &ApiState,
    headers: &HeaderMap,
    id: String,
    mid: Option<String>,
) -> ApiResult {
    let mut resource = vec!["devices", id.as_str()];
    if let Some(m) = &mid {
        resource.extend(["modules", m.as_str()]);
    }
    s.authorize(headers, TWIN_READ, &resource).await?;
    let id = DeviceId::new(id.clone())?;
    let mid = mid.map(ModuleId::new).transpose()?;
    let twin = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            st.render_twin(&id, mid.as_ref())
        })
        .await?;
    Ok(ok_json(twin))
}

async fn write_twin(
    s: &ApiState,
    headers: &HeaderMap,
    id: String,
    mid: Option<String>,
    body: &Bytes,
    replace: bool,
) -> ApiResult {
    let mut resource = vec!["devices", id.as_str()];
    if let Some(m) = &mid {
        resource.extend(["modules", m.as_str()]);
    }
    s.authorize(headers, TWIN_WRITE, &resource).await?;
    let device_id = DeviceId::new(id.clone())?;
    let module_id = mid.map(ModuleId::new).transpose()?;
    let value: Value = parse_body(body)?;
    let patch = TwinPatch::from_service_body(&value)?;
    let if_match = if_match(headers);
    let now = iso_now();
    let command = if replace {
        HubCommand::ReplaceTwin {
            device_id,
            module_id,
            replacement: patch,
            if_match,
            now,
        }
    } else {
        HubCommand::UpdateTwin {
            device_id,
            module_id,
            patch,
            if_match,
            now,
        }
    };
    match s.hub.write(command).await? {
        HubResponse::Twin(t) => Ok(ok_json(t)),
        other => Err(unexpected(other)),
    }
}

async fn get_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    read_twin(&s, &headers, id, None).await
}

async fn patch_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    write_twin(&s, &headers, id, None, &body, false).await
}

async fn replace_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    write_twin(&s, &headers, id, None, &body, true).await
}

async fn get_module_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    read_twin(&s, &headers, id, Some(mid)).await
}

async fn patch_module_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    write_twin(&s, &headers, id, Some(mid), &body, false).await
}

async fn replace_module_twin(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    write_twin(&s, &headers, id, Some(mid), &body, true).await
}

// ---- query ----

/// Body of `POST /devices/query`.
#[derive(Debug, serde::Deserialize)]
struct QuerySpec {
    query: String,
}

/// Largest page (`x-ms-max-item-count`); Azure's SDKs ask for 100 at most by default.
const MAX_QUERY_PAGE: usize = 1000;

/// `POST /devices/query`: IoT Hub's query language over device twins, module twins and device
/// jobs, paged with `x-ms-max-item-count` and `x-ms-continuation` as the SDKs use them.
async fn query_hub(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    use base64::Engine;
    use meridian_query::ast::{Projection, Source};
    s.authorize(
        &headers,
        &[Permission::ServiceConnect, Permission::RegistryRead],
        &["devices"],
    )
    .await?;
    let spec: QuerySpec = parse_body(&body)?;
    let query = meridian_query::parse_query(&spec.query)
        .map_err(|e| HubError::invalid(format!("query: {e}")))?;
    let page = match header(&headers, "x-ms-max-item-count") {
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_QUERY_PAGE).contains(n))
            .ok_or_else(|| {
                HubError::invalid(format!("x-ms-max-item-count must be 1 to {MAX_QUERY_PAGE}"))
            })?,
        None => 100,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let offset = match header(&headers, "x-ms-continuation") {
        Some(token) => b64
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                s.strip_prefix("offset:")
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .ok_or_else(|| HubError::invalid("x-ms-continuation is not a token this hub issued"))?,
        None => 0,
    };
    let source = query.from;
    let documents = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            let mut docs = Vec::new();
            for (id, entry) in &st.devices {
                match source {
                    Source::Devices => docs.push(st.render_twin(id, None)?),
                    Source::DevicesModules => {
                        for mid in entry.modules.keys() {
                            docs.push(st.render_twin(id, Some(mid))?);
                        }
                    }
                    // No device jobs exist until the jobs feature lands.
                    Source::DevicesJobs => {}
                }
            }
            Ok(docs)
        })
        .await?;
    let rows = meridian_query::execute(&query, documents.iter())
        .map_err(|e| HubError::invalid(format!("query: {e}")))?;
    let end = rows.len().min(offset.saturating_add(page));
    let items: Vec<Value> = rows
        .get(offset..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let mut response = ok_json(Value::Array(items));
    let item_type = match (&query.projection, source) {
        (Projection::Star, Source::DevicesJobs) => "deviceJob",
        (Projection::Star, _) => "twin",
        _ => "raw",
    };
    response
        .headers_mut()
        .insert("x-ms-item-type", HeaderValue::from_static(item_type));
    if end < rows.len()
        && let Ok(v) = HeaderValue::from_str(&b64.encode(format!("offset:{end}")))
    {
        response.headers_mut().insert("x-ms-continuation", v);
    }
    Ok(response)
}

// ---- cluster membership (operator API: the REST mapping of crate::control) ----

async fn authorize_operator(s: &ApiState, headers: &HeaderMap) -> HubResult<()> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    s.control.authorize(auth).await
}

async fn cluster_nodes(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    Ok(ok_json(s.control.nodes().await?))
}

async fn cluster_partitions(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    Ok(ok_json(s.control.partitions()))
}

/// Body of `POST /meridian/cluster/nodes`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddNodeSpec {
    id: u64,
    grpc_addr: String,
}

async fn add_node(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let spec: AddNodeSpec = parse_body(&body)?;
    s.control.add_node(spec.id, spec.grpc_addr).await?;
    Ok(no_content())
}

/// Body of `POST /meridian/cluster/nodes/{id}/drain`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainSpec {
    draining: bool,
}

async fn drain_node(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: Bytes,
) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let spec: DrainSpec = parse_body(&body)?;
    s.control.set_draining(id, spec.draining).await?;
    Ok(no_content())
}

/// Body of `PUT /meridian/cluster/faults`: fault injection on the node that receives it.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FaultSpec {
    #[serde(default)]
    peer_delay_ms: u64,
    /// Extra delay of calls to `wan_peers` (gRPC addresses of other regions' nodes).
    #[serde(default)]
    wan_delay_ms: u64,
    #[serde(default)]
    wan_peers: Vec<String>,
    /// Calls to these peers are blackholed (a partition seen from this node); empty heals.
    #[serde(default)]
    blocked_peers: Vec<String>,
    /// Skew of this node's wall clock in ms (negative: behind); 0 removes it.
    #[serde(default)]
    clock_skew_ms: i64,
}

async fn get_faults(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let (wan, peers) = crate::faults::wan_delay();
    Ok(ok_json(json!({
        "peerDelayMs": crate::faults::peer_delay().as_millis() as u64,
        "wanDelayMs": wan.as_millis() as u64,
        "wanPeers": peers,
        "blockedPeers": crate::faults::blocked(),
        "clockSkewMs": crate::clock::skew_ms(),
    })))
}

async fn put_faults(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let spec: FaultSpec = parse_body(&body)?;
    if spec.peer_delay_ms > 10_000 || spec.wan_delay_ms > 10_000 {
        return Err(HubError::invalid("peerDelayMs and wanDelayMs must be at most 10000").into());
    }
    if spec.clock_skew_ms.unsigned_abs() > 86_400_000 {
        return Err(HubError::invalid("clockSkewMs must be within one day").into());
    }
    crate::faults::set_wan_delay(
        std::time::Duration::from_millis(spec.wan_delay_ms),
        spec.wan_peers.clone(),
    );
    crate::faults::set_blocked(spec.blocked_peers.clone());
    crate::clock::set_skew_ms(spec.clock_skew_ms);
    tracing::warn!(
        clock_skew_ms = spec.clock_skew_ms,
        "fault injection: wall clock skew"
    );
    tracing::warn!(
        peer_delay_ms = spec.peer_delay_ms,
        "fault injection: delaying node-to-node calls"
    );
    crate::faults::set_peer_delay(std::time::Duration::from_millis(spec.peer_delay_ms));
    Ok(no_content())
}

async fn region_status(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    Ok(ok_json(s.control.region_status()))
}

/// Body of `POST /meridian/region/failover`: the region to promote, the hub's name as
/// confirmation, and whether to promote without the primary (it may hold unshipped writes).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FailoverSpec {
    region: String,
    hub_name: String,
    #[serde(default)]
    force: bool,
}

async fn region_failover(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let spec: FailoverSpec = parse_body(&body)?;
    Ok(ok_json(
        s.control
            .failover(&spec.region, &spec.hub_name, spec.force)
            .await?,
    ))
}

/// Body of `POST /meridian/cluster/leader`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferSpec {
    to: u64,
    #[serde(default)]
    partition: Option<u32>,
}

async fn transfer_leadership(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    let spec: TransferSpec = parse_body(&body)?;
    s.control
        .transfer_leadership(spec.partition, spec.to)
        .await?;
    Ok(no_content())
}

async fn remove_node(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    authorize_operator(&s, &headers).await?;
    s.control.remove_node(id).await?;
    Ok(no_content())
}

// ---- routing (Meridian's operator API; Azure configures routes through ARM) ----

async fn get_routing(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let routing = s
        .hub
        .read(ReadConsistency::Linearizable, |st| Ok(st.routing.clone()))
        .await?;
    Ok(ok_json(
        serde_json::to_value(routing).unwrap_or(Value::Null),
    ))
}

/// Reads a routing object from a body, taking its name (or key) from the path.
fn named_body<T: DeserializeOwned>(
    body: &Bytes,
    field: &str,
    name: String,
    what: &str,
) -> HubResult<T> {
    let mut value: Value = parse_body(body)?;
    if let Value::Object(map) = &mut value {
        map.insert(field.into(), Value::String(name));
    }
    serde_json::from_value(value)
        .map_err(|e| HubError::new(ErrorCode::IotHubFormatError, format!("{what}: {e}")))
}

async fn put_route(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let route = named_body(&body, "name", name, "route")?;
    match s.hub.write(HubCommand::PutRoute { route }).await? {
        HubResponse::Route(r) => Ok(ok_json(serde_json::to_value(r).unwrap_or(Value::Null))),
        other => Err(unexpected(other)),
    }
}

async fn delete_route(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    s.hub.write(HubCommand::DeleteRoute { name }).await?;
    Ok(no_content())
}

async fn put_endpoint(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let endpoint = named_body(&body, "name", name, "endpoint")?;
    match s.hub.write(HubCommand::PutEndpoint { endpoint }).await? {
        HubResponse::Endpoint(e) => Ok(ok_json(serde_json::to_value(e).unwrap_or(Value::Null))),
        other => Err(unexpected(other)),
    }
}

async fn delete_endpoint(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    s.hub.write(HubCommand::DeleteEndpoint { name }).await?;
    Ok(no_content())
}

async fn put_enrichment(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let enrichment = named_body(&body, "key", key, "enrichment")?;
    match s
        .hub
        .write(HubCommand::PutEnrichment { enrichment })
        .await?
    {
        HubResponse::Enrichment(e) => Ok(ok_json(serde_json::to_value(e).unwrap_or(Value::Null))),
        other => Err(unexpected(other)),
    }
}

async fn delete_enrichment(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    s.hub.write(HubCommand::DeleteEnrichment { key }).await?;
    Ok(no_content())
}

async fn endpoint_health(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    Ok(ok_json(
        serde_json::to_value(s.webhooks.get(&name)).unwrap_or(Value::Null),
    ))
}

/// Body of `PUT /meridian/routing/fallback`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FallbackSpec {
    is_enabled: bool,
}

async fn set_fallback(State(s): State<ApiState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let spec: FallbackSpec = parse_body(&body)?;
    s.hub
        .write(HubCommand::SetFallbackRoute {
            enabled: spec.is_enabled,
        })
        .await?;
    Ok(no_content())
}

// ---- built-in events stream (Meridian's REST/JSON form of the partition read API) ----

const EVENTS: &[&str] = &["messages", "events"];

async fn partition_info(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    Ok(ok_json(json!({
        "partitionCount": s.events.partitions(),
        "endOffsets": s.events.end_offsets_any().await?,
    })))
}

/// `GET /meridian/events/endpoint`: the built-in events endpoint as Azure describes it in the hub's
/// `properties.eventHubEndpoints.events` (Event Hub-compatible name and endpoint, partitions), for
/// the Event Hubs SDKs' connection string `Endpoint=...;EntityPath=<path>`.
async fn event_hub_endpoint(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    let Some(amqp) = s.amqp.get() else {
        return Err(HubError::new(
            ErrorCode::ServiceUnavailable,
            "the AMQP endpoint is starting",
        )
        .into());
    };
    let partitions = s.events.partitions();
    Ok(ok_json(json!({
        "eventHubEndpoints": {
            "events": {
                "path": amqp.event_hub,
                "endpoint": format!("sb://{}/", amqp.host_name),
                "partitionCount": partitions,
                "partitionIds": (0..partitions).map(|p| p.to_string()).collect::<Vec<_>>(),
                "amqpPort": amqp.redirect_port,
            }
        }
    })))
}

/// `GET /meridian/events/partitions/{p}?from=<offset>|end&enqueuedAfter=<iso>&consumerGroup=<g>&max=<n>`
async fn read_events(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(partition): Path<u32>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    use crate::telemetry_api::StartAt;
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    let start = if let Some(group) = q.get("consumerGroup") {
        StartAt::Checkpoint(group.clone())
    } else if let Some(t) = q.get("enqueuedAfter") {
        StartAt::EnqueuedAt(t.clone())
    } else {
        match q.get("from").map(String::as_str) {
            None | Some("start") => StartAt::Offset(0),
            Some("end") => StartAt::End,
            Some(n) => StartAt::Offset(
                n.parse()
                    .map_err(|_| HubError::invalid("from must be an offset, start or end"))?,
            ),
        }
    };
    let max = match q.get("max") {
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=10_000).contains(m))
            .ok_or_else(|| HubError::invalid("max must be 1 to 10000"))?,
        None => 100,
    };
    // `endpoint=<name>` reads a custom endpoint's stream instead of `events`.
    let partition = match q.get("endpoint").map(String::as_str) {
        None | Some("events") => partition,
        Some(name) => {
            if partition >= crate::domain::routing::STREAM_STRIDE {
                return Err(HubError::invalid("partition out of range").into());
            }
            let name = name.to_string();
            let stream = s
                .hub
                .read(ReadConsistency::Linearizable, move |st| {
                    st.routing
                        .endpoints
                        .get(&name)
                        .map(|e| e.stream_id)
                        .ok_or_else(|| {
                            HubError::new(
                                ErrorCode::ResourceNotFound,
                                format!("no endpoint named {name}"),
                            )
                        })
                })
                .await?;
            stream * crate::domain::routing::STREAM_STRIDE + partition
        }
    };
    let offset = s.events.start_offset(partition, &start).await?;
    let events = s.events.read_any(partition, offset, max).await?;
    let next = events.last().map_or(offset, |e| e.offset + 1);
    Ok(ok_json(json!({
        "partition": partition,
        "events": events.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
        "nextOffset": next,
    })))
}

async fn list_consumer_groups(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    let groups = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            Ok(st.consumer_groups.clone())
        })
        .await?;
    Ok(ok_json(json!(
        groups
            .into_iter()
            .map(|(name, checkpoints)| json!({"name": name, "checkpoints": checkpoints}))
            .collect::<Vec<_>>()
    )))
}

async fn create_consumer_group(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    s.hub
        .write(HubCommand::CreateConsumerGroup { name: name.clone() })
        .await?;
    Ok(ok_json(json!({"name": name, "checkpoints": {}})))
}

async fn delete_consumer_group(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    s.hub
        .write(HubCommand::DeleteConsumerGroup { name })
        .await?;
    Ok(no_content())
}

/// Body of `POST /meridian/events/consumergroups/{name}/checkpoints`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointSpec {
    partition: u32,
    offset: u64,
}

async fn store_checkpoint(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], EVENTS)
        .await?;
    let spec: CheckpointSpec = parse_body(&body)?;
    s.events
        .checkpoint(&name, spec.partition, spec.offset)
        .await?;
    Ok(no_content())
}

// ---- statistics ----

async fn registry_statistics(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers, &[Permission::RegistryRead], &["devices"])
        .await?;
    // Azure serves statistics eventually consistent; a local read is enough.
    let stats = s
        .hub
        .read(ReadConsistency::Stale, |st| Ok(st.registry_statistics()))
        .await?;
    Ok(ok_json(serde_json::to_value(stats).unwrap_or(Value::Null)))
}

async fn service_statistics(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], &[])
        .await?;
    let connected = s
        .hub
        .read(ReadConsistency::Stale, |st| Ok(st.connected_device_count()))
        .await?;
    Ok(ok_json(json!({ "connectedDeviceCount": connected })))
}

// ---- shared access policies (Meridian's operator API; Azure manages them through ARM) ----

const ALL_RIGHTS: [Permission; 4] = [
    Permission::RegistryRead,
    Permission::RegistryWrite,
    Permission::ServiceConnect,
    Permission::DeviceConnect,
];

/// Managing policies needs a token from a policy holding every permission.
async fn authorize_owner(s: &ApiState, headers: &HeaderMap) -> HubResult<()> {
    let policy = s
        .authorize(headers, &[Permission::RegistryWrite], &[])
        .await?;
    if !ALL_RIGHTS.iter().all(|r| policy.grants(*r)) {
        return Err(HubError::new(
            ErrorCode::Unauthorized,
            "managing shared access policies needs a policy with every permission",
        ));
    }
    Ok(())
}

/// Body of `PUT /meridian/policies/{name}`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    rights: Vec<Permission>,
    #[serde(default)]
    primary_key: String,
    #[serde(default)]
    secondary_key: String,
}

async fn list_policies(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let policies = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            Ok(st
                .settings
                .as_ref()
                .map(|h| h.policies.values().cloned().collect::<Vec<_>>())
                .unwrap_or_default())
        })
        .await?;
    Ok(ok_json(
        serde_json::to_value(policies).unwrap_or(Value::Null),
    ))
}

async fn get_policy(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let policy = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            st.policy(&name).cloned().ok_or_else(|| {
                HubError::new(
                    ErrorCode::ResourceNotFound,
                    format!("no shared access policy named {name}"),
                )
            })
        })
        .await?;
    Ok(ok_json(serde_json::to_value(policy).unwrap_or(Value::Null)))
}

async fn put_policy(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let spec: PolicySpec = parse_body(&body)?;
    let command = HubCommand::PutPolicy {
        key_name: name,
        rights: spec.rights,
        primary_key: spec.primary_key,
        secondary_key: spec.secondary_key,
        keys: GeneratedKeys::random(),
    };
    match s.hub.write(command).await? {
        HubResponse::Policy(p) => Ok(ok_json(serde_json::to_value(p).unwrap_or(Value::Null))),
        other => Err(unexpected(other)),
    }
}

async fn delete_policy(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    match s
        .hub
        .write(HubCommand::DeletePolicy { key_name: name })
        .await?
    {
        HubResponse::Deleted => Ok(no_content()),
        other => Err(unexpected(other)),
    }
}

// ---- CA certificates (operator API; Azure registers them through ARM) ----

/// Body of `PUT /meridian/certificates/{name}`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CertificateSpec {
    certificate: String,
    #[serde(default)]
    is_verified: bool,
}

async fn list_certificates(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let certs = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            Ok(st.certificates.values().cloned().collect::<Vec<_>>())
        })
        .await?;
    Ok(ok_json(serde_json::to_value(certs).unwrap_or(Value::Null)))
}

async fn get_certificate(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let cert = s
        .hub
        .read(ReadConsistency::Linearizable, |st| {
            st.certificates.get(&name).cloned().ok_or_else(|| {
                HubError::new(
                    ErrorCode::ResourceNotFound,
                    format!("no certificate named {name}"),
                )
            })
        })
        .await?;
    Ok(ok_json(serde_json::to_value(cert).unwrap_or(Value::Null)))
}

async fn put_certificate(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    let spec: CertificateSpec = parse_body(&body)?;
    let der = crate::auth::pem_certificate(&spec.certificate)?;
    let trust = rustls::pki_types::CertificateDer::from(der.as_slice());
    webpki::anchor_from_trusted_cert(&trust)
        .map_err(|e| HubError::invalid(format!("not a usable CA certificate: {e}")))?;
    let certificate = crate::domain::state::CaCertificate {
        name,
        certificate: spec.certificate,
        thumbprint: crate::auth::thumbprints(&der).1,
        is_verified: spec.is_verified,
    };
    match s
        .hub
        .write(HubCommand::PutCertificate { certificate })
        .await?
    {
        HubResponse::Certificate(c) => Ok(ok_json(serde_json::to_value(c).unwrap_or(Value::Null))),
        other => Err(unexpected(other)),
    }
}

async fn delete_certificate(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    authorize_owner(&s, &headers).await?;
    match s.hub.write(HubCommand::DeleteCertificate { name }).await? {
        HubResponse::Deleted => Ok(no_content()),
        other => Err(unexpected(other)),
    }
}

// ---- direct methods ----

/// Body of `POST /twins/{id}/methods`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MethodRequest {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

async fn invoke_method(
    s: &ApiState,
    headers: &HeaderMap,
    id: String,
    mid: Option<String>,
    body: &Bytes,
) -> ApiResult {
    let mut resource = vec!["devices", id.as_str()];
    if let Some(m) = &mid {
        resource.extend(["modules", m.as_str()]);
    }
    s.authorize(headers, &[Permission::ServiceConnect], &resource)
        .await?;
    let device_id = DeviceId::new(id)?;
    let module_id = mid.map(ModuleId::new).transpose()?;
    let request: MethodRequest = parse_body(body)?;
    if request.method_name.is_empty() || request.method_name.len() > 128 {
        return Err(HubError::invalid("methodName must be 1 to 128 characters").into());
    }
    let response_timeout = request.response_timeout_in_seconds.unwrap_or(30);
    if !(5..=300).contains(&response_timeout) {
        return Err(HubError::invalid("responseTimeoutInSeconds must be 5 to 300").into());
    }
    let connect_timeout = request.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > 300 {
        return Err(HubError::invalid("connectTimeoutInSeconds must be 0 to 300").into());
    }
    // The device must exist (404 DeviceNotFound) before we wait for it to be online.
    let (d, m) = (device_id.clone(), module_id.clone());
    s.hub
        .read(ReadConsistency::Linearizable, move |st| match &m {
            None => st.get_device(&d).map(|_| ()),
            Some(m) => st.get_module(&d, m).map(|_| ()),
        })
        .await?;
    let client_id = match &module_id {
        Some(m) => format!("{device_id}/{m}"),
        None => device_id.to_string(),
    };
    // The device may be connected to another node: the replicated owner says which.
    let owner = if s.mqtt.sessions.is_connected(&client_id) {
        None
    } else {
        let (d, m) = (device_id.clone(), module_id.clone());
        s.hub
            .read(ReadConsistency::Linearizable, move |st| {
                let entry = st.devices.get(&d);
                Ok(entry.and_then(|e| match &m {
                    None => e.device.identity.connected_node,
                    Some(m) => e
                        .modules
                        .get(m)
                        .and_then(|x| x.module.identity.connected_node),
                }))
            })
            .await?
            .filter(|n| *n != s.mqtt.node_id)
            // A node gossip declared down cannot answer: wait here for the device to reconnect
            // (connectTimeoutInSeconds), then 404, instead of failing on the dead node.
            .filter(|n| {
                s.control.gossip().health(*n) != Some(meridian_control_plane::gossip::Health::Down)
            })
    };
    let (status, payload) = match owner {
        Some(node) => {
            let forwarded = meridian_proto::hub::InvokeMethodRequest {
                client_id,
                method_name: request.method_name,
                payload_json: serde_json::to_vec(&request.payload).unwrap_or_default(),
                response_timeout_ms: response_timeout * 1000,
                connect_timeout_ms: connect_timeout * 1000,
            };
            s.hub
                .forward_method(
                    node,
                    forwarded,
                    std::time::Duration::from_secs(response_timeout + connect_timeout + 5),
                )
                .await?
        }
        None => {
            let reply = s
                .mqtt
                .invoke_method(
                    &client_id,
                    &request.method_name,
                    &request.payload,
                    std::time::Duration::from_secs(response_timeout),
                    std::time::Duration::from_secs(connect_timeout),
                )
                .await?;
            (reply.status, reply.payload)
        }
    };
    Ok(ok_json(json!({"status": status, "payload": payload})))
}

async fn invoke_device_method(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    invoke_method(&s, &headers, id, None, &body).await
}

async fn invoke_module_method(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    invoke_method(&s, &headers, id, Some(mid), &body).await
}

// ---- cloud-to-device ----

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /devices/{id}/messages/devicebound`: Meridian's REST C2D send (the official service
/// SDKs use AMQP). Body = payload; `iothub-messageid`, `iothub-correlationid`, `iothub-userid`,
/// `iothub-ack`, `iothub-expiry` (ISO-8601, absolute), `content-type`, `content-encoding` and
/// `iothub-app-<name>` headers = properties. Answers 204.
async fn send_c2d(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    use crate::domain::c2d::C2dSendRequest;
    s.authorize(&headers, &[Permission::ServiceConnect], &["devices", &id])
        .await?;
    let device_id = DeviceId::new(id)?;
    let expiry_ms = match header(&headers, "iothub-expiry") {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| HubError::invalid("iothub-expiry must be an ISO-8601 time"))?
                .timestamp_millis()
                .max(0) as u64,
        ),
        None => None,
    };
    let properties = headers
        .iter()
        .filter_map(|(k, v)| {
            let name = k.as_str().strip_prefix("iothub-app-")?;
            Some((name.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    let message = C2dSendRequest {
        message_id: header(&headers, "iothub-messageid").map(str::to_string),
        correlation_id: header(&headers, "iothub-correlationid").map(str::to_string),
        user_id: header(&headers, "iothub-userid").map(str::to_string),
        content_type: header(&headers, "content-type").map(str::to_string),
        content_encoding: header(&headers, "content-encoding").map(str::to_string),
        ack: header(&headers, "iothub-ack").map(str::to_string),
        expiry_ms,
        properties,
        body: body.to_vec(),
    }
    .into_message(unix_ms(), random_id)?;
    match s
        .hub
        .write(HubCommand::SendC2d { device_id, message })
        .await?
    {
        HubResponse::C2dEnqueued { .. } => Ok(no_content()),
        other => Err(unexpected(other)),
    }
}

async fn purge_c2d(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    s.authorize(&headers, &[Permission::ServiceConnect], &["devices", &id])
        .await?;
    let device_id = DeviceId::new(id.clone())?;
    match s
        .hub
        .write(HubCommand::PurgeC2d {
            device_id,
            now: iso_now(),
        })
        .await?
    {
        HubResponse::Purged { count } => Ok(ok_json(json!({
            "totalMessagesPurged": count, "deviceId": id, "moduleId": null
        }))),
        other => Err(unexpected(other)),
    }
}

/// How long received feedback stays locked before it returns to the queue.
const FEEDBACK_LOCK_MS: u64 = 60_000;

async fn receive_feedback(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    s.authorize(
        &headers,
        &[Permission::ServiceConnect],
        &["messages", "servicebound", "feedback"],
    )
    .await?;
    match s
        .hub
        .write(HubCommand::LockFeedback {
            lock_token: random_id(),
            now_ms: unix_ms(),
            lock_ms: FEEDBACK_LOCK_MS,
        })
        .await?
    {
        HubResponse::Feedback { records, .. } if records.is_empty() => Ok(no_content()),
        HubResponse::Feedback {
            lock_token,
            records,
        } => {
            let mut response = ok_json(serde_json::to_value(records).unwrap_or(Value::Null));
            if let Ok(v) = HeaderValue::from_str(&format!("\"{lock_token}\"")) {
                response.headers_mut().insert(header::ETAG, v);
            }
            Ok(response)
        }
        other => Err(unexpected(other)),
    }
}

async fn complete_feedback(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(lock): Path<String>,
) -> ApiResult {
    settle_feedback(&s, &headers, &lock, true).await
}

async fn abandon_feedback(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(lock): Path<String>,
) -> ApiResult {
    settle_feedback(&s, &headers, &lock, false).await
}

/// Completes (deletes) or abandons (returns to the queue) locked feedback.
async fn settle_feedback(
    s: &ApiState,
    headers: &HeaderMap,
    lock: &str,
    complete: bool,
) -> ApiResult {
    s.authorize(
        headers,
        &[Permission::ServiceConnect],
        &["messages", "servicebound", "feedback"],
    )
    .await?;
    let lock_token = lock.trim_matches('"').to_string();
    let command = if complete {
        HubCommand::CompleteFeedback { lock_token }
    } else {
        HubCommand::AbandonFeedback { lock_token }
    };
    s.hub.write(command).await?;
    Ok(no_content())
}

// ---- MQTT and AMQP over WebSockets ----

/// The AMQP over WebSockets subprotocol (AMQP WebSocket Binding 1.0).
const AMQP_WS: &str = "AMQPWSB10";

/// `GET /$iothub/websocket` and `/$servicebus/websocket`: MQTT (subprotocol `mqtt`) or AMQP
/// (subprotocol `AMQPWSB10`) over WebSockets, binary frames. The protocol authenticates exactly as
/// on its TLS listener.
async fn mqtt_websocket(
    State(s): State<ApiState>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let amqp = s.amqp.get().cloned();
    ws.protocols(["mqtt", AMQP_WS]).on_upgrade(move |socket| {
        let is_amqp = socket
            .protocol()
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(AMQP_WS.as_bytes()));
        let mqtt = s.mqtt.clone();
        bridge_websocket(socket, move |io| match (is_amqp, amqp) {
            (true, Some(ctx)) => tokio::spawn(crate::amqp::serve_connection(
                ctx,
                io,
                Vec::new(),
                std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            )),
            _ => tokio::spawn(async move {
                crate::mqtt::connection::serve(mqtt, io, "websocket".into(), None).await;
            }),
        })
    })
}

/// Carries a WebSocket's binary frames to and from the protocol task `serve` starts on the
/// other end of an in-memory pipe.
async fn bridge_websocket(
    socket: axum::extract::ws::WebSocket,
    serve: impl FnOnce(tokio::io::DuplexStream) -> tokio::task::JoinHandle<()>,
) {
    use axum::extract::ws::Message;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_mqtt, mut to_mqtt) = tokio::io::split(ours);
    let (mut ws_tx, mut ws_rx) = socket.split();
    let session = serve(theirs);
    let inbound = async move {
        while let Some(Ok(message)) = ws_rx.next().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Close(_) => break,
                _ => continue,
            };
            if to_mqtt.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_mqtt.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_mqtt.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::join!(inbound, outbound);
    let _ = session.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions() {
        assert!(valid_api_version("2021-04-12"));
        assert!(valid_api_version("2020-09-30-preview"));
        assert!(!valid_api_version("yesterday"));
        assert!(!valid_api_version("2021-4-12"));
    }

    #[tokio::test]
    async fn error_body_is_azure_shaped() {
        let response = ApiError(HubError::device_not_found("d1")).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response
                .headers()
                .get("iothub-errorcode")
                .and_then(|v| v.to_str().ok()),
            Some("DeviceNotFound")
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert!(
            v["Message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ErrorCode:DeviceNotFound;"))
        );
        assert_eq!(v["errorCode"], json!(404001));
    }
}
