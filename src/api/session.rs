//! AIAA sessions: `PUT /session/` stores a decoded volume, `GET`/`DELETE /session/{id}`; 440 when unknown.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::multipart::{content_type, drain, UploadForm};
use super::SharedState;
use crate::admission::off_runtime;
use crate::error::ApiError;
use crate::nifti_io::{self, FileBytes};
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

/// `PUT /session/?expiry=<s>` with a multipart image (Python, C++, OHIF form); OHIF's DICOM-fetch JSON is refused.
pub async fn create(
    State(state): State<SharedState>,
    Query(query): Query<CreateQuery>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    if content_type(&request).starts_with("application/json") {
        drain(request.into_body(), state.policy.max_upload_bytes).await;
        return Err(ApiError::Unsupported(
            "creating a session by fetching from a DICOM server is not supported; upload the volume as a \
             multipart file instead (in OHIF, untick 'Fetch Images From Dicom Server')"
                .into(),
        ));
    }
    let mut form = UploadForm::from_request(request, state.policy.max_upload_bytes).await?;
    let result = create_from_form(&state, &query, &mut form).await;
    if result.is_err() {
        // The body is read before an error is answered (see `drain`).
        form.drain().await;
    }
    result
}

/// Decodes the upload while it arrives, into a volume of exactly its image's size held against the in-flight
/// budget until the session store takes it.
async fn create_from_form(
    state: &SharedState,
    query: &CreateQuery,
    form: &mut UploadForm,
) -> Result<Json<Value>, ApiError> {
    let expiry = parse_expiry(query.expiry.as_deref())?;
    let part = form.next_image().await?.ok_or_else(|| {
        ApiError::BadRequest("no image file in the request (send it as the 'image' part)".into())
    })?;
    let name = part.name.clone();
    // the reader takes decode workers as the bytes arrive
    let (reader, pump) = part.pipe(state.decode_pool.admit()?);
    let limits = state.decode_limits;
    let decoder_state = state.clone();
    let job = off_runtime(move || {
        let file = nifti_io::open(FileBytes::Stream(Box::new(reader)), limits)?;
        let held = decoder_state.budget.reserve_blocking(file.volume_bytes())?;
        Ok((file.read_volume()?, held))
    });
    let (pumped, decoded) = tokio::join!(pump, job);
    // A broken upload explains a failed decode better than the decode does.
    pumped?;
    form.finish().await?;
    let (volume, _held) = decoded?;
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

pub async fn get(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(query): Query<GetQuery>,
) -> Result<Json<Value>, ApiError> {
    let refresh = query
        .update_ts
        .as_deref()
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1"));
    let info = state
        .sessions
        .info(&id, refresh)
        .ok_or(ApiError::SessionExpired(id))?;
    Ok(Json(
        serde_json::to_value(info).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let info = state
        .sessions
        .remove(&id)
        .ok_or(ApiError::SessionExpired(id.clone()))?;
    tracing::info!(session = %id, "session closed");
    Ok(Json(
        json!({ "session_id": id, "session_info": info, "deleted": true }),
    ))
}
