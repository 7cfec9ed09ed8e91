//! MONAI Label's REST API (`shared/specs/MONAI_LABEL_API.md`), for its Slicer extension, OHIF v3 and
//! `monailabel.client`, on the same models and sessions as the AIAA routes. Every error is FastAPI's
//! `{"detail": ...}`; every success is exactly 200, with or without the trailing slash.
//!
//! There is no training, no active learning and no datastore: `/train/` and `/auth/` answer 404 (the GUIs
//! read 200 as "training running" and "auth on"), and datastore writes are refused, which keeps Slicer in
//! session mode rather than letting it believe a label was saved.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::click::{click, Answered, ClickBody, Named, ReplyKind};
use super::multipart::{content_type, drain, UploadForm, MAX_TEXT_PART};
use super::SharedState;
use crate::annotate::Latencies;
use crate::error::{ApiError, FieldError};
use crate::models::Model;

/// Segment names for a class-agnostic model whose config lists none: Slicer creates its segments from
/// `/info/`'s `labels` and refuses a click without one; these are MONAI Label's radiology deepgrow labels.
pub const DEFAULT_LABELS: [&str; 7] = [
    "spleen",
    "right kidney",
    "left kidney",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
];

/// A result in MONAI Label's error shape.
fn detailed(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(ApiError::into_detail_response)
}

fn model_labels(model: &Model) -> Vec<String> {
    if model.info.labels.is_empty() {
        DEFAULT_LABELS.iter().map(|l| l.to_string()).collect()
    } else {
        model.info.labels.clone()
    }
}

/// `GET /info/`: the app, shaped as Slicer and OHIF read it. No top-level `config` (Slicer would ask for
/// an upgrade), a numeric `dimension`, and a non-empty top-level `labels` array.
pub async fn info(State(state): State<SharedState>) -> Json<Value> {
    let mut labels: Vec<String> = Vec::new();
    let mut models = serde_json::Map::new();
    for model in state.registry.models() {
        let model_labels = model_labels(model);
        for label in &model_labels {
            if !labels.contains(label) {
                labels.push(label.clone());
            }
        }
        models.insert(
            model.info.name.clone(),
            json!({
                "type": model.info.model_type.to_ascii_lowercase(),
                "labels": model_labels,
                "dimension": if model.is_deepgrow_2d() { 2 } else { 3 },
                "description": model.info.description,
                "config": {},
            }),
        );
    }
    Json(json!({
        "name": "deepgrow-server",
        "description": "Deepgrow 2D interactive segmentation on the CPU (a MONAI Label and NVIDIA AIAA compatible server)",
        "version": env!("CARGO_PKG_VERSION"),
        "labels": labels,
        "models": models,
        "trainers": {},
        "strategies": {},
        "scoring": {},
        "train_stats": {},
        "datastore": datastore_stats(),
    }))
}

fn datastore_stats() -> Value {
    json!({ "total": 0, "completed": 0, "label_tags": {} })
}

#[derive(Debug, Deserialize)]
pub struct InferQuery {
    #[serde(default)]
    image: String,
    #[serde(default)]
    session_id: String,
    output: Option<String>,
}

/// The result JSON MONAI Label sends (`label_names`, `latencies` in seconds, `centroids`), plus what this
/// server knows of the click.
#[derive(Debug, Serialize)]
struct InferResult {
    label_names: Vec<String>,
    latencies: SecondLatencies,
    centroids: BTreeMap<String, Value>,
    model: String,
    slice: usize,
    mask_pixels: usize,
}

/// MONAI Label's latency keys, in seconds to two decimals (`transform` is its per-transform breakdown).
#[derive(Debug, Serialize)]
struct SecondLatencies {
    pre: f64,
    infer: f64,
    invert: f64,
    post: f64,
    write: f64,
    total: f64,
    transform: Option<Value>,
    /// Waiting for an inference worker.
    wait: f64,
}

fn seconds(millis: f64) -> f64 {
    (millis / 10.0).round() / 100.0
}

impl SecondLatencies {
    fn new(ms: &Latencies) -> Self {
        SecondLatencies {
            pre: seconds(ms.decode + ms.pre),
            infer: seconds(ms.infer),
            invert: 0.0,
            post: seconds(ms.post),
            write: seconds(ms.write),
            total: seconds(ms.total),
            transform: None,
            wait: seconds(ms.wait),
        }
    }
}

/// The params of a MONAI Label click: a multipart form (Slicer, OHIF, the Python client), a url-encoded
/// form (FastAPI's `Form` takes both), or no body, which means `{}`.
async fn click_body(request: Request, limit: usize) -> Result<ClickBody, ApiError> {
    let kind = content_type(&request);
    if kind.starts_with("multipart/") {
        return Ok(ClickBody::Form(
            UploadForm::from_request(request, limit).await?,
        ));
    }
    let body = request.into_body();
    let bytes = match axum::body::to_bytes(body, MAX_TEXT_PART).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return Err(ApiError::BadRequest(format!(
            "a click body that is not multipart holds only 'params', at most {MAX_TEXT_PART} bytes"
        )))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ClickBody::Params(None));
    }
    if !kind.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::BadRequest(format!(
            "expected a multipart/form-data or application/x-www-form-urlencoded body with 'params', got content type '{kind}'"
        )));
    }
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed url-encoded body: {e}")))?;
    let params = fields
        .into_iter()
        .find(|(name, _)| name == "params")
        .map(|(_, value)| value);
    Ok(ClickBody::Params(params))
}

/// `POST /infer/{model}`: one click on a session (`session_id`), an inline `file`, or an image id.
pub async fn infer(
    State(state): State<SharedState>,
    Path(model): Path<String>,
    Query(query): Query<InferQuery>,
    request: Request,
) -> Response {
    let limit = state.policy.max_upload_bytes;
    let mut body = match click_body(request, limit).await {
        Ok(body) => body,
        Err(error) => return error.into_detail_response(),
    };
    let result = infer_click(&state, &model, &query, &mut body).await;
    if result.is_err() {
        // The body is read before an error is answered (see `multipart::drain`).
        body.drain().await;
    }
    detailed(result)
}

async fn infer_click(
    state: &SharedState,
    model_name: &str,
    query: &InferQuery,
    body: &mut ClickBody,
) -> Result<Response, ApiError> {
    let kind = match query.output.as_deref() {
        Some("dicom_seg") => {
            return Err(ApiError::BadRequest(
                "output=dicom_seg needs a DICOMweb datastore, which this server does not have; use image, json or all"
                    .into(),
            ))
        }
        output => ReplyKind::parse(output).ok_or_else(|| FieldError {
            location: "query",
            field: "output",
            kind: "enum",
            message: "Input should be 'image', 'json', 'all' or 'dicom_seg'".into(),
            input: output.map(str::to_owned),
        })?,
    };
    let model = state
        .registry
        .get(model_name)
        .cloned()
        .ok_or_else(|| ApiError::UnknownModel(model_name.to_owned()))?;
    let named = Named {
        session_id: Some(query.session_id.as_str()).filter(|id| !id.is_empty()),
        // an image id is a series on the PACS (OHIF v3), when there is one to ask
        series: Some(query.image.as_str()).filter(|id| !id.is_empty()),
    };
    let answered = match click(state, model.clone(), named, body).await {
        Err(ApiError::NoImage) if !query.image.is_empty() => Err(ApiError::NotFound(format!(
            "Image ({}) Not Found: this server has no datastore and no DICOMweb server (--dicomweb-url) to \
             fetch a series from; create a session with PUT /session/ and pass session_id, or send the image \
             as a 'file' part",
            query.image
        ))),
        other => other,
    }?;
    let Answered { annotation, label } = answered;
    let result = InferResult {
        label_names: label
            .map(|l| vec![l])
            .unwrap_or_else(|| model_labels(&model)),
        latencies: SecondLatencies::new(&annotation.params.latencies),
        centroids: BTreeMap::new(),
        model: annotation.params.model,
        slice: annotation.params.slice,
        mask_pixels: annotation.params.mask_pixels,
    };
    kind.respond(&result, annotation.file_name, annotation.file)
}

#[derive(Debug, Deserialize)]
pub struct TrainQuery {
    check_if_running: Option<String>,
}

/// `GET /train/`: 404, what MONAI Label answers when nothing trains (Slicer reads a 200 as "running").
pub async fn train_status(Query(query): Query<TrainQuery>) -> Response {
    let running_check = query
        .check_if_running
        .as_deref()
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1"));
    ApiError::NotFound(if running_check {
        "No Train Tasks are currently Running".into()
    } else {
        "No Train Tasks Found".into()
    })
    .into_detail_response()
}

/// `POST /train/[{model}]`, `DELETE /train/`: this server has no trainers (`/info/` lists none).
pub async fn train_refused(State(state): State<SharedState>, body: Body) -> Response {
    drain(body, state.policy.max_upload_bytes).await;
    ApiError::NotFound("training is not available on this server: it has no trainers".into())
        .into_detail_response()
}

/// `GET /auth/`: 404, as MONAI Label answers when auth is off (Slicer probes it before every request).
pub async fn auth() -> Response {
    ApiError::NotFound("Not Found".into()).into_detail_response()
}

/// `POST /activelearning/{strategy}`: `{}`, MONAI Label's answer when no image is left to label.
pub async fn next_sample(State(state): State<SharedState>, body: Body) -> Json<Value> {
    drain(body, state.policy.max_upload_bytes).await;
    Json(json!({}))
}

#[derive(Debug, Deserialize)]
pub struct DatastoreQuery {
    output: Option<String>,
}

/// `GET /datastore/?output=stats|all|train`: an empty datastore.
pub async fn datastore(Query(query): Query<DatastoreQuery>) -> Response {
    detailed(match query.output.as_deref().unwrap_or("stats") {
        "stats" => Ok(Json(datastore_stats()).into_response()),
        "all" => Ok(Json(json!({
            "name": "", "description": "", "images_dir": "", "labels_dir": "labels", "objects": {}
        }))
        .into_response()),
        "train" => Ok(Json(json!([])).into_response()),
        other => Err(FieldError {
            location: "query",
            field: "output",
            kind: "enum",
            message: "Input should be 'stats', 'all' or 'train'".into(),
            input: Some(other.to_owned()),
        }
        .into()),
    })
}

/// `PUT /datastore/` and `PUT /datastore/label`: refused, so Slicer stays in session mode and says the save
/// failed rather than believing a label was kept.
pub async fn datastore_write(State(state): State<SharedState>, body: Body) -> Response {
    drain(body, state.policy.max_upload_bytes).await;
    ApiError::NotFound(
        "this server has no datastore: images and labels are not stored (save the segmentation in the viewer)"
            .into(),
    )
    .into_detail_response()
}

/// `GET /datastore/label`: nothing is stored.
pub async fn datastore_label() -> Response {
    ApiError::NotFound("Label NOT Found or is a directory".into()).into_detail_response()
}

/// `GET /datastore/image`: nothing is stored.
pub async fn datastore_image() -> Response {
    ApiError::NotFound("Image NOT Found or is a directory".into()).into_detail_response()
}
