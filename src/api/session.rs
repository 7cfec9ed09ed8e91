//! Sessions, shared by both APIs: `PUT /session/` stores a decoded volume, `GET`/`DELETE /session/{id}` (404
//! when unknown). A click naming an unknown session gets AIAA's 440, or MONAI Label's 404, from its own API.
//!
//! MONAI Label's clients upload the volume as `files` beside a `client_id` field; their errors are answered in
//! FastAPI's shape, everyone else's in AIAA's. OHIF v2 may instead name a series for the server to pull from
//! a PACS (DIMSE C-GET, from the nodes `--pacs` allows).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use bytes::Bytes;

use super::multipart::{content_type, drain, UploadForm};
use super::SharedState;
use crate::admission::{off_runtime, Reservation};
use crate::dicom::{ae_title, SeriesQuery};
use crate::error::{ApiError, FieldError};
use crate::image::{self, Format, Upload};
use crate::nifti_io::{FileBytes, Volume};

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
/// Slicer and Python clients), or OHIF's DICOM-fetch JSON, which names a series to pull from a PACS.
pub async fn create(
    State(state): State<SharedState>,
    Query(query): Query<CreateQuery>,
    request: Request,
) -> Response {
    if content_type(&request).starts_with("application/json") {
        return match pull_from_pacs(&state, &query, request.into_body()).await {
            Ok(reply) => reply.into_response(),
            Err(error) => error.into_response(),
        };
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
    let (volume, _held) = if part.format().await? == Format::Nifti {
        // the reader takes decode workers as the bytes arrive
        let (reader, pump) = part.pipe(state.decode_pool.admit()?);
        let decoder_state = state.clone();
        let job = off_runtime(move || {
            decode_whole(
                &decoder_state,
                Upload::Nifti(FileBytes::Stream(Box::new(reader))),
            )
        });
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
        decode_series(state, files, reservation).await?
    };
    store(state, volume, name, expiry).await
}

/// Decodes a whole image, holding its volume's bytes against the in-flight budget until a session takes it.
fn decode_whole(
    state: &SharedState,
    upload: Upload<'_>,
) -> Result<(Volume, Reservation), ApiError> {
    let file = image::open(upload, state.decode_limits)?;
    let held = state.budget.reserve_blocking(file.volume_bytes())?;
    Ok((file.read_volume()?, held))
}

/// Decodes a DICOM series held in memory (buffered from an upload, or fetched from a PACS) on a decode
/// worker; `files_held` is what its files hold against the in-flight budget, returned once they are read.
pub(super) async fn decode_series(
    state: &SharedState,
    files: Vec<(String, Bytes)>,
    files_held: Reservation,
) -> Result<(Volume, Reservation), ApiError> {
    let worker = state.decode_pool.admit()?;
    let decoder_state = state.clone();
    off_runtime(move || {
        let _files_held = files_held;
        worker.work(|| decode_whole(&decoder_state, Upload::Dicom(files)))
    })
    .await?
}

/// A new session of `volume`, answered as both APIs' clients read it.
async fn store(
    state: &SharedState,
    volume: Volume,
    name: String,
    expiry: Option<u64>,
) -> Result<Json<Value>, ApiError> {
    let info = state
        .sessions
        .create(Arc::new(volume), name, expiry)
        .await?;
    tracing::info!(session = %info.name, shape = ?info.meta.shape, store = state.sessions.kind(), "session created");
    Ok(Json(
        json!({ "session_id": info.name, "session_info": info }),
    ))
}

/// The largest DICOM-fetch body read: it is a few hundred bytes of UIDs.
const MAX_PACS_BODY: usize = 64 << 10;

/// OHIF v2's DICOM-fetch body: `{"dicom": {server_address, server_port, ae_title, query_level, patient_id,
/// study_uid, series_uid}}`.
#[derive(Debug, Deserialize)]
struct PacsPull {
    dicom: PacsSeries,
}

#[derive(Debug, Deserialize)]
struct PacsSeries {
    server_address: String,
    /// A number, or a numeric string (OHIF's settings are text fields).
    server_port: Value,
    ae_title: String,
    query_level: Option<String>,
    patient_id: Option<String>,
    study_uid: String,
    series_uid: String,
}

impl PacsSeries {
    fn query(self) -> Result<SeriesQuery, ApiError> {
        let bad = |message: String| ApiError::BadRequest(format!("dicom.{message}"));
        let port = match &self.server_port {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| {
            bad(format!(
                "server_port must be a port number, got {}",
                self.server_port
            ))
        })?;
        let level = self.query_level.as_deref().unwrap_or("SERIES").trim();
        if !level.eq_ignore_ascii_case("SERIES") {
            return Err(bad(format!(
                "query_level must be SERIES (one series makes one volume), got '{level}'"
            )));
        }
        for (name, value) in [
            ("study_uid", &self.study_uid),
            ("series_uid", &self.series_uid),
        ] {
            let value = value.trim();
            if value.is_empty()
                || value.len() > 64
                || !value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                return Err(bad(format!(
                    "{name} must be a DICOM UID (digits and dots), got '{value}'"
                )));
            }
        }
        let called_ae = ae_title(&self.ae_title).map_err(|e| bad(format!("ae_title: {e}")))?;
        let host = self.server_address.trim();
        if host.is_empty() {
            return Err(bad("server_address is empty".into()));
        }
        Ok(SeriesQuery {
            host: host.to_owned(),
            port,
            called_ae,
            patient_id: self
                .patient_id
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty()),
            study_uid: self.study_uid.trim().to_owned(),
            series_uid: self.series_uid.trim().to_owned(),
        })
    }
}

/// Reads a JSON body of at most [`MAX_PACS_BODY`] bytes (a longer one is drained and refused).
async fn small_body(body: Body, max_upload: usize) -> Result<Vec<u8>, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_PACS_BODY {
            drain(Body::from_stream(stream), max_upload).await;
            return Err(ApiError::PayloadTooLarge(format!(
                "a DICOM-fetch body is at most {MAX_PACS_BODY} bytes"
            )));
        }
    }
    Ok(bytes)
}

/// `PUT /session/` with OHIF v2's `{"dicom": {...}}`: the series pulled by C-GET from a PACS `--pacs`
/// allows, then decoded as an upload would be.
async fn pull_from_pacs(
    state: &SharedState,
    query: &CreateQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let expiry = parse_expiry(query.expiry.as_deref())?;
    let body = small_body(body, state.policy.max_upload_bytes).await?;
    let pull: PacsPull = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "a JSON session body must be {{\"dicom\": {{server_address, server_port, ae_title, study_uid, \
             series_uid, ...}}}}: {e}"
        ))
    })?;
    let series = pull.dicom.query()?;
    let started = std::time::Instant::now();
    let files = state.pacs.retrieve_series(&series).await?;
    let fetched_ms = started.elapsed().as_millis() as u64;
    let bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let mut files_held = state.budget.empty();
    files_held.grow_to(bytes).await?;
    let instances = files.len();
    let (volume, _held) = decode_series(state, files, files_held).await?;
    tracing::info!(
        series = %series.series_uid,
        pacs = %format!("{}@{}:{}", series.called_ae, series.host, series.port),
        instances,
        bytes,
        fetched_ms,
        ready_ms = started.elapsed().as_millis() as u64,
        "series pulled by C-GET"
    );
    store(state, volume, series.series_uid, expiry).await
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
    match state.sessions.info(&id, refresh).await {
        Ok(Some(info)) => Json(info).into_response(),
        Ok(None) => ApiError::SessionExpired(id).into_shared_response(),
        Err(error) => ApiError::from(error).into_shared_response(),
    }
}

pub async fn delete(State(state): State<SharedState>, Path(id): Path<String>) -> Response {
    match state.sessions.remove(&id).await {
        Ok(Some(info)) => {
            tracing::info!(session = %id, "session closed");
            Json(json!({ "session_id": id, "session_info": info, "deleted": true })).into_response()
        }
        Ok(None) => ApiError::SessionExpired(id).into_shared_response(),
        Err(error) => ApiError::from(error).into_shared_response(),
    }
}
