//! AIAA v1 routes: model list, deepgrow / inference, and segmentation (refused for deepgrow models).

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::multipart::{drain, file_reply, multipart_reply, UploadForm};
use super::params::DeepgrowParams;
use super::SharedState;
use crate::admission::{off_runtime, ClickTickets};
use crate::annotate::{annotate, ImageSource};
use crate::error::ApiError;
use crate::nifti_io::FileBytes;

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
    let mut form = UploadForm::from_request(request, state.policy.max_upload_bytes).await?;
    let result = click(&state, &query, &mut form).await;
    if result.is_err() {
        // The body is read before an error is answered (see `drain`).
        form.drain().await;
    }
    result
}

async fn click(
    state: &SharedState,
    query: &InferQuery,
    form: &mut UploadForm,
) -> Result<Response, ApiError> {
    let image = form.next_image().await?;
    let model = state.model(query.model.as_deref())?;
    if !model.is_deepgrow_2d() {
        return Err(ApiError::WrongModelType(format!(
            "model '{}' is of type '{}', not a Deepgrow 2D model",
            model.info.name, model.info.model_type
        )));
    }
    let kind = reply_kind(query.output.as_deref())?;
    let limits = state.decode_limits;
    let session_id = query.session_id.as_deref().filter(|id| !id.is_empty());
    let annotation = match (session_id, image) {
        (Some(id), image) => {
            // A session wins over an uploaded file, which is read and dropped.
            drop(image);
            form.finish().await?;
            let params = DeepgrowParams::parse(form.params())?;
            let volume = state
                .sessions
                .volume(id)
                .ok_or_else(|| ApiError::SessionExpired(id.to_owned()))?;
            let tickets = ClickTickets::new(None, state.infer_pool.admit()?);
            off_runtime(move || {
                let source = ImageSource::Session(volume);
                annotate(&model, source, &params.clicks, params.output, limits, &tickets)
            })
            .await?
        }
        // The params came first (as every client sends them): the upload is decoded while it arrives, and
        // only as far as the clicked slice.
        (None, Some(part)) if form.params().is_some() => {
            let params = DeepgrowParams::parse(form.params())?;
            let decode = state.decode_pool.admit()?;
            // the reader takes decode workers as the bytes arrive
            let tickets = ClickTickets::new(None, state.infer_pool.admit()?);
            let (reader, pump) = part.pipe(decode);
            let job = off_runtime(move || {
                let source = ImageSource::Upload(FileBytes::Stream(Box::new(reader)));
                annotate(&model, source, &params.clicks, params.output, limits, &tickets)
            });
            let (pumped, annotation) = tokio::join!(pump, job);
            // A broken upload explains a failed decode better than the decode does.
            pumped?;
            form.finish().await?;
            annotation?
        }
        // The params come after the file: the file is buffered (against the in-flight budget) until they do.
        (None, Some(part)) => {
            let mut reservation = state.budget.empty();
            let bytes = form.buffer(part, &mut reservation).await?;
            form.finish().await?;
            let params = DeepgrowParams::parse(form.params())?;
            let tickets = ClickTickets::new(
                Some(state.decode_pool.admit()?),
                state.infer_pool.admit()?,
            );
            off_runtime(move || {
                let _held = reservation;
                let source = ImageSource::Upload(FileBytes::Memory(&bytes));
                annotate(&model, source, &params.clicks, params.output, limits, &tickets)
            })
            .await?
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "no image: send the volume as a file part (e.g. 'datapoint') or a session_id query parameter".into(),
            ))
        }
    };
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
