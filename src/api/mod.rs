//! The HTTP layer: validates, converts and maps errors; CPU work goes to the blocking pool behind permits.

mod aiaa;
mod click;
mod monai_label;
mod multipart;
mod params;
mod session;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::admission::{Budget, Pool};
use crate::dicom::{DicomWebClient, DimseClient};
use crate::error::ApiError;
use crate::metrics::{Metrics, PoolLabels, RequestLabels};
use crate::models::{Model, Registry};
use crate::nifti_io::DecodeLimits;
use crate::sessions::SessionStore;

pub use params::DeepgrowParams;

/// Per-request limits and access control of the HTTP layer.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// Largest accepted request body.
    pub max_upload_bytes: usize,
    /// Longest pause while a request body arrives.
    pub body_timeout: Duration,
    /// Longest whole request, upload, queueing and inference included.
    pub request_timeout: Duration,
    /// The bearer token every request but /health and /ready must carry, when set.
    pub auth_token: Option<String>,
}

/// Everything the handlers share.
pub struct AppState {
    pub registry: Registry,
    pub sessions: Box<dyn SessionStore>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: `/ready` answers 503 so that load balancers stop sending requests before the listener
    /// closes.
    pub draining: AtomicBool,
    /// Workers for decoding uploads.
    pub decode_pool: Pool,
    /// Workers for running the network.
    pub infer_pool: Pool,
    /// Bytes all requests may hold in flight.
    pub budget: Budget,
    pub decode_limits: DecodeLimits,
    pub policy: RequestPolicy,
    /// The PACS's DICOMweb, when `--dicomweb-url` names one.
    pub dicomweb: Option<DicomWebClient>,
    /// DIMSE C-GET from the PACS nodes `--pacs` allows (OHIF v2's session body).
    pub pacs: DimseClient,
    pub started: Instant,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The model a request names; when it names none and exactly one model is served, that one.
    pub fn model(&self, name: Option<&str>) -> Result<Arc<Model>, ApiError> {
        match name.filter(|n| !n.is_empty()) {
            Some(name) => self
                .registry
                .get(name)
                .cloned()
                .ok_or_else(|| ApiError::UnknownModel(name.to_owned())),
            None => match self.registry.models() {
                [only] => Ok(only.clone()),
                _ => Err(ApiError::BadRequest(
                    "the query parameter 'model' is required when several models are served".into(),
                )),
            },
        }
    }
}

/// CORS for browser viewers: `*` allows any origin, otherwise the listed origins.
fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(Any)
        .expose_headers(Any);
    if origins.is_empty() || origins.iter().any(|o| o.trim() == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// The router; tests drive it over a real socket or with `tower::ServiceExt::oneshot`.
pub fn app(state: SharedState, cors_origins: &[String]) -> Router {
    let policy = state.policy.clone();
    let v1 = Router::new()
        .route("/models", get(aiaa::list_models))
        .route("/deepgrow", post(aiaa::deepgrow))
        .route("/inference", post(aiaa::deepgrow))
        .route("/segmentation", post(aiaa::segmentation));
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/v1", v1.clone())
        // C++/MITK users told to enter ".../v1" as the server send /v1/v1/... (AIAA client issue #21).
        .nest("/v1/v1", v1)
        .route("/session", put(session::create))
        .route("/session/", put(session::create))
        .route("/session/{id}", get(session::get).delete(session::delete))
        .route("/session/{id}/", get(session::get).delete(session::delete))
        .merge(monai_label_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(policy.max_upload_bytes))
        // Requests pass these from the bottom up: body timeout, whole-request deadline, then the token check.
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(RequestBodyTimeoutLayer::new(policy.body_timeout))
        // CORS outside the panic handler: a browser gets to read every reply, errors included.
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(cors(cors_origins))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(middleware::from_fn_with_state(state.clone(), count_request))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// MONAI Label's paths, each with and without its trailing slash (its clients follow no redirects).
fn monai_label_routes() -> Router<SharedState> {
    let both = |router: Router<SharedState>,
                path: &str,
                route: axum::routing::MethodRouter<SharedState>| {
        router
            .route(path, route.clone())
            .route(&format!("{path}/"), route)
    };
    let mut router = Router::new();
    router = both(router, "/info", get(monai_label::info));
    router = both(router, "/infer/{model}", post(monai_label::infer));
    router = both(
        router,
        "/train",
        get(monai_label::train_status)
            .post(monai_label::train_refused)
            .delete(monai_label::train_refused),
    );
    router = both(router, "/train/{model}", post(monai_label::train_refused));
    router = both(router, "/auth", get(monai_label::auth));
    router = both(
        router,
        "/activelearning/{strategy}",
        post(monai_label::next_sample),
    );
    router = both(
        router,
        "/datastore",
        get(monai_label::datastore).put(monai_label::datastore_write),
    );
    router = both(
        router,
        "/datastore/label",
        get(monai_label::datastore_label).put(monai_label::datastore_write),
    );
    both(
        router,
        "/datastore/image",
        get(monai_label::datastore_image),
    )
}

/// Every log line of a request carries its id (also returned as `x-request-id`).
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    ApiError::Internal(format!("request handler panicked: {detail}")).into_response()
}

/// Answers 408 when a request, upload and inference included, outlasts `--request-timeout`.
async fn request_deadline(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.policy.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(format!(
            "the request did not complete within {} s (--request-timeout)",
            limit.as_secs_f64()
        ))
        .into_response(),
    }
}

/// With `--auth-token`, every request but the health probes must carry `Authorization: Bearer <token>`.
async fn require_token(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.policy.auth_token.as_deref() else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/health" | "/ready" | "/metrics") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        })
        .map(|(_, token)| token.trim().as_bytes());
    let authorised = presented
        .is_some_and(|token| bool::from(subtle::ConstantTimeEq::ct_eq(token, expected.as_bytes())));
    if authorised {
        next.run(request).await
    } else {
        // Read the upload first, as for every early error (see `multipart::drain`).
        multipart::drain(request.into_body(), state.policy.max_upload_bytes).await;
        ApiError::Unauthorized.into_response()
    }
}

async fn not_found(State(state): State<SharedState>, body: axum::body::Body) -> ApiError {
    multipart::drain(body, state.policy.max_upload_bytes).await;
    ApiError::NotFound("no such endpoint; see GET / for the APIs this server speaks".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts every answered request by its declared route (unmatched paths as one), method and status.
async fn count_request(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: Prometheus' scrape, the gauges read now.
async fn metrics(State(state): State<SharedState>) -> Response {
    let metrics = &state.metrics;
    for (pool, admitted, working) in [
        (
            "decode",
            state.decode_pool.admitted(),
            state.decode_pool.working(),
        ),
        (
            "infer",
            state.infer_pool.admitted(),
            state.infer_pool.working(),
        ),
    ] {
        let labels = PoolLabels { pool };
        metrics.working.get_or_create(&labels).set(working as i64);
        metrics
            .queued
            .get_or_create(&labels)
            .set(admitted.saturating_sub(working) as i64);
    }
    let (sessions, session_bytes) = state.sessions.usage();
    metrics.sessions.set(sessions as i64);
    metrics.session_bytes.set(session_bytes as i64);
    metrics.inflight_bytes.set(state.budget.held_bytes() as i64);
    metrics
        .inflight_budget_bytes
        .set(state.budget.total_bytes() as i64);
    metrics
        .ready
        .set(i64::from(!state.draining.load(Ordering::Relaxed)));
    metrics
        .uptime_seconds
        .set(state.started.elapsed().as_secs_f64());
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        metrics.encode(),
    )
        .into_response()
}

/// `GET /ready`: 200 while the server takes traffic, 503 once it drains for shutdown (`/health` stays 200, so
/// a liveness probe does not kill a draining replica).
async fn ready(State(state): State<SharedState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response();
    }
    health(State(state)).await.into_response()
}

async fn health(State(state): State<SharedState>) -> Json<serde_json::Value> {
    let (sessions, session_bytes) = state.sessions.usage();
    let draining = state.draining.load(Ordering::Relaxed);
    Json(serde_json::json!({
        "status": if draining { "draining" } else { "ready" },
        "session_store": state.sessions.kind(),
        "models": state.registry.models().iter().map(|m| &m.info.name).collect::<Vec<_>>(),
        "sessions": sessions,
        "session_bytes": session_bytes,
        "inflight_bytes": state.budget.held_bytes(),
        "inflight_budget_bytes": state.budget.total_bytes(),
        "decode_admitted": state.decode_pool.admitted(),
        "infer_admitted": state.infer_pool.admitted(),
        "uptime_s": state.started.elapsed().as_secs(),
    }))
}

async fn index(State(state): State<SharedState>) -> Html<String> {
    let models: String = state
        .registry
        .models()
        .iter()
        .map(|m| {
            format!(
                "<li><b>{}</b> ({} {}, version {}): {}</li>",
                escape(&m.info.name),
                escape(&m.info.model_type),
                escape(m.info.deepgrow.as_deref().unwrap_or("")),
                escape(&m.info.version),
                escape(&m.info.description)
            )
        })
        .collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>deepgrow-server</title></head><body>\
         <h1>deepgrow-server {}</h1>\
         <p>A Deepgrow 2D annotation server speaking the NVIDIA Clara AIAA and MONAI Label APIs: point 3D Slicer's \
         NvidiaAIAA or MONAILabel extension, MITK, OHIF or either Python client at this address.</p>\
         <h2>Models</h2><ul>{models}</ul>\
         <h2>Endpoints</h2><ul><li>GET /v1/models</li><li>POST /v1/deepgrow, POST /v1/inference</li>\
         <li>PUT /session/, GET /session/{{id}}, DELETE /session/{{id}}</li>\
         <li>MONAI Label: GET /info/, POST /infer/{{model}}, GET /train/, GET /datastore/</li>\
         <li>GET /health, GET /ready, GET /metrics (Prometheus)</li></ul>\
         </body></html>",
        env!("CARGO_PKG_VERSION")
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
