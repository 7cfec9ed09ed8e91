//! Sessions, shared by both APIs: `PUT /session/` stores a decoded volume, `GET`/`DELETE /session/{id}` (404
//! when unknown). A click naming an unknown session gets AIAA's 440, or MONAI Label's 404, from its own API.
//!
//! MONAI Label's clients upload the volume as `files` beside a `client_id` field; their errors are answered in
//! FastAPI's shape, everyone else's in AIAA's.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::multipart::{content_type, drain, UploadForm};
use super::SharedState;
use crate::admission::off_runtime;
use crate::error::{ApiError, FieldError};
use crate::image::{self, Format, Upload};
use crate::nifti_io::FileBytes;
use crate::sessions::SessionError;

#[derive(Debug, Deserialize)]
pub struct CreateQuery {
    expiry: Option<String>,
}

fn parse_expiry(value: Option<&str>) -> Result<Option<u64>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| Some(v as u64))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("expiry must be a number of seconds, got '{text}'"))
            }),
    }
}

/// `PUT /session/?expiry=<s>` with a multipart image (AIAA's Python, C++ and OHIF clients, MONAI Label's
/// Slicer and Python clients); OHIF's DICOM-fetch JSON is refused.
pub async fn create(
    State(state): State<SharedState>,
    Query(query): Query<CreateQuery>,
    request: Request,
) -> Response {
    if content_type(&request).starts_with("application/json") {
        drain(request.into_body(), state.policy.max_upload_bytes).await;
        return ApiError::Unsupported(
            "creating a session by fetching from a DICOM server is not supported; upload the volume as a \
             multipart file instead (in OHIF, untick 'Fetch Images From Dicom Server')"
                .into(),
        )
        .into_response();
    }
    let mut form = match UploadForm::from_request(request, state.policy.max_upload_bytes).await {
        Ok(form) => form,
        Err(error) => return error.into_response(),
    };
    match create_from_form(&state, &query, &mut form).await {
        Ok(reply) => reply.into_response(),
        Err(error) => {
            // The body is read before an error is answered (see `drain`).
            form.drain().await;
            if is_monai_label(&form) {
                error.into_detail_response()
            } else {
                error.into_response()
            }
        }
    }
}

/// MONAI Label's clients send the file as `files` with a `client_id` field; AIAA's never do.
fn is_monai_label(form: &UploadForm) -> bool {
    form.has_field("files") || form.has_field("client_id")
}

/// Decodes the upload while it arrives, into a volume of exactly its image's size held against the in-flight
/// budget until the session store takes it.
async fn create_from_form(
    state: &SharedState,
    query: &CreateQuery,
    form: &mut UploadForm,
) -> Result<Json<Value>, ApiError> {
    let expiry = parse_expiry(query.expiry.as_deref())?;
    let mut part = match form.next_image().await? {
        Some(part) => part,
        None if is_monai_label(form) => {
            return Err(FieldError {
                location: "body",
                field: "files",
                kind: "missing",
                message: "Field required".into(),
                input: None,
            }
            .into())
        }
        None => {
            return Err(ApiError::BadRequest(
                "no image file in the request (send it as the 'image' part)".into(),
            ))
        }
    };
    let name = part.name.clone();
    let limits = state.decode_limits;
    let decoder_state = state.clone();
    let decode = move |upload: Upload<'_>| {
        let file = image::open(upload, limits)?;
        let held = decoder_state.budget.reserve_blocking(file.volume_bytes())?;
        Ok::<_, ApiError>((file.read_volume()?, held))
    };
    let (volume, _held) = if part.format().await? == Format::Nifti {
        // the reader takes decode workers as the bytes arrive
        let (reader, pump) = part.pipe(state.decode_pool.admit()?);
        let job = off_runtime(move || decode(Upload::Nifti(FileBytes::Stream(Box::new(reader)))));
        let (pumped, decoded) = tokio::join!(pump, job);
        // A broken upload explains a failed decode better than the decode does.
        pumped?;
        form.finish().await?;
        decoded?
    } else {
        // a DICOM series (OHIF's image0..N parts, MONAI Label's several `files`, or a zip): buffered, then
        // decoded whole on a decode worker
        let mut reservation = state.budget.empty();
        let files = form.buffer_series(part, &mut reservation).await?;
        let worker = state.decode_pool.admit()?;
        off_runtime(move || {
            let _held = reservation;
            worker.work(|| decode(Upload::Dicom(files)))
        })
        .await??
    };
    let (id, info) = state
        .sessions
        .create(Arc::new(volume), name, expiry)
        .map_err(|SessionError::TooLarge { needed, budget }| {
            ApiError::PayloadTooLarge(format!(
                "the volume needs {needed} bytes in memory, more than the session budget of {budget} bytes"
            ))
        })?;
    tracing::info!(session = %id, shape = ?info.meta.shape, "session created");
    Ok(Json(json!({ "session_id": id, "session_info": info })))
}

#[derive(Debug, Deserialize)]
pub struct GetQuery {
    update_ts: Option<String>,
}

/// `GET /session/{id}[?update_ts=true]`: the session's info (never empty: Slicer re-uploads on an empty one).
pub async fn get(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(query): Query<GetQuery>,
) -> Response {
    let refresh = query
        .update_ts
        .as_deref()
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1"));
    match state.sessions.info(&id, refresh) {
        Some(info) => Json(info).into_response(),
        None => ApiError::SessionExpired(id).into_shared_response(),
    }
}

pub async fn delete(State(state): State<SharedState>, Path(id): Path<String>) -> Response {
    match state.sessions.remove(&id) {
        Some(info) => {
            tracing::info!(session = %id, "session closed");
            Json(json!({ "session_id": id, "session_info": info, "deleted": true })).into_response()
        }
        None => ApiError::SessionExpired(id).into_shared_response(),
    }
}
