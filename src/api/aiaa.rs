//! AIAA v1 routes: model list, deepgrow / inference, and segmentation (refused for deepgrow models).

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::multipart::{drain, file_reply, multipart_reply, read_upload_request};
use super::params::DeepgrowParams;
use super::SharedState;
use crate::annotate::{annotate, ImageSource};
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct ModelsQuery {
    model: Option<String>,
    label: Option<String>,
    #[serde(rename = "type")]
    model_type: Option<String>,
}

/// `GET /v1/models`: all models (filtered by `label` / `type`), or one object for `?model=`.
pub async fn list_models(
    State(state): State<SharedState>,
    Query(query): Query<ModelsQuery>,
) -> Response {
    if let Some(name) = query.model.as_deref().filter(|n| !n.is_empty()) {
        return match state.registry.get(name) {
            Some(model) => Json(&model.info).into_response(),
            None => ApiError::UnknownModel(name.to_owned()).into_response(),
        };
    }
    let infos: Vec<_> = state
        .registry
        .models()
        .iter()
        .map(|m| &m.info)
        .filter(|info| {
            query
                .model_type
                .as_deref()
                .is_none_or(|t| t.is_empty() || info.model_type.eq_ignore_ascii_case(t))
        })
        .filter(|info| {
            query.label.as_deref().is_none_or(|label| {
                label.is_empty() || info.labels.iter().any(|l| l.eq_ignore_ascii_case(label))
            })
        })
        .collect();
    Json(infos).into_response()
}

#[derive(Debug, Deserialize)]
pub struct InferQuery {
    model: Option<String>,
    session_id: Option<String>,
    output: Option<String>,
}

enum ReplyKind {
    Multipart,
    Image,
    Json,
}

fn reply_kind(output: Option<&str>) -> Result<ReplyKind, ApiError> {
    match output.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("all") => Ok(ReplyKind::Multipart),
        Some("image") => Ok(ReplyKind::Image),
        Some("json") => Ok(ReplyKind::Json),
        Some(other) => Err(ApiError::BadRequest(format!(
            "output '{other}' is not supported (use image or json)"
        ))),
    }
}

/// `POST /v1/deepgrow` and `POST /v1/inference` on a deepgrow model: one click, one mask.
pub async fn deepgrow(
    State(state): State<SharedState>,
    Query(query): Query<InferQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    // The body is read before anything can be refused (see `drain`).
    let upload = read_upload_request(request, state.policy.max_upload_bytes).await?;
    let model = state.model(query.model.as_deref())?;
    if !model.is_deepgrow_2d() {
        return Err(ApiError::WrongModelType(format!(
            "model '{}' is of type '{}', not a Deepgrow 2D model",
            model.info.name, model.info.model_type
        )));
    }
    let kind = reply_kind(query.output.as_deref())?;
    let params = DeepgrowParams::parse(upload.params.as_deref())?;
    let source = match (query.session_id.as_deref().filter(|id| !id.is_empty()), upload.file) {
        (Some(id), _) => ImageSource::Session(
            state.sessions.volume(id).ok_or_else(|| ApiError::SessionExpired(id.to_owned()))?,
        ),
        (None, Some(file)) => ImageSource::Upload(file.bytes),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "no image: send the volume as a file part (e.g. 'datapoint') or a session_id query parameter".into(),
            ))
        }
    };
    let limits = state.decode_limits;
    let annotation = state
        .run_cpu(move || annotate(&model, source, &params.clicks, params.output, limits))
        .await?;
    tracing::info!(
        model = %annotation.params.model,
        slice = annotation.params.slice,
        mask_pixels = annotation.params.mask_pixels,
        total_ms = annotation.params.latencies.total,
        infer_ms = annotation.params.latencies.infer,
        "deepgrow click answered"
    );
    let params_json = serde_json::to_string(&annotation.params)
        .map_err(|e| ApiError::Internal(format!("serialising reply params: {e}")))?;
    Ok(match kind {
        ReplyKind::Multipart => {
            multipart_reply(&params_json, annotation.file_name, annotation.file)
        }
        ReplyKind::Image => file_reply(annotation.file_name, annotation.file),
        ReplyKind::Json => Json(annotation.params).into_response(),
    })
}

/// `POST /v1/segmentation`: this server serves only deepgrow models, which need clicks.
pub async fn segmentation(
    State(state): State<SharedState>,
    Query(query): Query<InferQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    drain(body, state.policy.max_upload_bytes).await;
    let model = state.model(query.model.as_deref())?;
    Err(ApiError::WrongModelType(format!(
        "model '{}' is a {} model: it needs foreground/background clicks; call /v1/deepgrow or /v1/inference instead of /v1/segmentation",
        model.info.name, model.info.model_type
    )))
}
