//! One click as both APIs take it: the image from a session, or from the uploaded file (decoded while it
//! arrives when the params came first, buffered against the in-flight budget when they come after it), then
//! [`annotate`] on the worker pools, then the reply in the form the client asked for.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::multipart::{file_reply, multipart_reply, UploadForm};
use super::params::DeepgrowParams;
use super::SharedState;
use crate::admission::{off_runtime, ClickTickets};
use crate::annotate::{annotate, Annotation, ImageSource};
use crate::error::ApiError;
use crate::image::{Format, Upload};
use crate::models::Model;
use crate::nifti_io::{FileBytes, MaskFile, Volume};

/// The body of a click request.
pub enum ClickBody {
    /// A multipart form: `params`, and the image file unless a session is named.
    Form(UploadForm),
    /// The `params` text alone (MONAI Label's url-encoded form, or no body at all).
    Params(Option<String>),
}

impl ClickBody {
    fn params(&self) -> Option<&str> {
        match self {
            ClickBody::Form(form) => form.params(),
            ClickBody::Params(text) => text.as_deref(),
        }
    }

    /// Reads what is left of the body, before an error is answered (see `multipart::drain`).
    pub async fn drain(&mut self) {
        if let ClickBody::Form(form) = self {
            form.drain().await;
        }
    }
}

/// What the client asked to get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// `params` JSON and the mask file, as multipart (the default).
    Multipart,
    /// The mask file alone.
    Image,
    /// The `params` JSON alone.
    Json,
}

impl ReplyKind {
    /// The `output` query value (absent, `all`, `image` or `json`); `None` for any other.
    pub fn parse(output: Option<&str>) -> Option<ReplyKind> {
        match output.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("all") => Some(ReplyKind::Multipart),
            Some("image") => Some(ReplyKind::Image),
            Some("json") => Some(ReplyKind::Json),
            Some(_) => None,
        }
    }

    /// The reply to a click: `params` is the JSON the API reports, `file` the mask file named `file_name`.
    pub fn respond(
        self,
        params: &impl Serialize,
        file_name: &str,
        file: MaskFile,
    ) -> Result<Response, ApiError> {
        Ok(match self {
            ReplyKind::Multipart => {
                let params_json = serde_json::to_string(params)
                    .map_err(|e| ApiError::Internal(format!("serialising reply params: {e}")))?;
                multipart_reply(&params_json, file_name, file)
            }
            ReplyKind::Image => file_reply(file_name, file),
            ReplyKind::Json => Json(params).into_response(),
        })
    }
}

/// What a click request names besides its body: a session, or a series on the PACS (OHIF v3's
/// `image=<SeriesInstanceUID>`, with `--dicomweb-url`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Named<'a> {
    pub session_id: Option<&'a str>,
    pub series: Option<&'a str>,
}

/// The click on a decoded volume (a session's, or a fetched series').
async fn on_volume(
    state: &SharedState,
    model: Arc<Model>,
    volume: Arc<Volume>,
    params: DeepgrowParams,
) -> Result<(Annotation, Option<String>), ApiError> {
    let limits = state.decode_limits;
    let tickets = ClickTickets::new(None, state.infer_pool.admit()?);
    let label = params.label.clone();
    let annotation = off_runtime(move || {
        let source = ImageSource::Session(volume);
        annotate(
            &model,
            source,
            &params.clicks,
            params.output,
            limits,
            &tickets,
        )
    })
    .await?;
    Ok((annotation, label))
}

/// The volume of series `uid`: cached (as a session named after it, under the session memory budget and
/// expiry), or retrieved over DICOMweb and decoded on a decode worker.
async fn fetched_series(state: &SharedState, uid: &str) -> Result<Arc<Volume>, ApiError> {
    let key = format!("dicomweb:{uid}");
    if let Some(volume) = state.sessions.volume(&key).await? {
        return Ok(volume);
    }
    let client = state
        .dicomweb
        .as_ref()
        .ok_or_else(|| ApiError::Internal("no DICOMweb client".into()))?;
    let started = std::time::Instant::now();
    let files = client.retrieve_series(uid).await?;
    let fetched_ms = started.elapsed().as_millis() as u64;
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    let mut files_held = state.budget.empty();
    files_held.grow_to(bytes as u64).await?;
    let (volume, _held) = super::session::decode_series(state, files, files_held).await?;
    let volume = Arc::new(volume);
    state
        .sessions
        .insert(key, volume.clone(), uid.to_owned(), None)
        .await?;
    tracing::info!(
        series = %uid,
        shape = ?volume.geometry.shape,
        bytes,
        fetched_ms,
        ready_ms = started.elapsed().as_millis() as u64,
        "series fetched over DICOMweb"
    );
    Ok(volume)
}

/// An answered click, with the label name its params asked for.
pub struct Answered {
    pub annotation: Annotation,
    pub label: Option<String>,
}

/// Runs one click on `model` with the image of `session_id`, or else the body's file. A session wins over an
/// uploaded file, which is then read and dropped (both APIs do so). [`ApiError::NoImage`] when there is neither.
pub async fn click(
    state: &SharedState,
    model: Arc<Model>,
    named: Named<'_>,
    body: &mut ClickBody,
) -> Result<Answered, ApiError> {
    let image = match body {
        ClickBody::Form(form) => form.next_image().await?,
        ClickBody::Params(_) => None,
    };
    if !model.is_deepgrow_2d() {
        return Err(ApiError::WrongModelType(format!(
            "model '{}' is of type '{}', not a Deepgrow 2D model",
            model.info.name, model.info.model_type
        )));
    }
    let limits = state.decode_limits;
    let session_id = named.session_id.filter(|id| !id.is_empty());
    let image = match (session_id, image) {
        (None, Some(mut part)) => {
            let format = part.format().await?;
            Some((part, format))
        }
        // a session wins: the file is read and dropped, whatever it is
        (_, part) => part.map(|part| (part, Format::Nifti)),
    };
    let (annotation, label) = match (session_id, image, body) {
        (Some(id), image, body) => {
            drop(image);
            if let ClickBody::Form(form) = &mut *body {
                form.finish().await?;
            }
            let params = DeepgrowParams::parse(body.params())?;
            let volume = state
                .sessions
                .volume(id)
                .await?
                .ok_or_else(|| ApiError::SessionExpired(id.to_owned()))?;
            on_volume(state, model, volume, params).await?
        }
        // No file: the series the request names, fetched from the PACS (or its cached volume).
        (None, None, body) if named.series.is_some() && state.dicomweb.is_some() => {
            if let ClickBody::Form(form) = &mut *body {
                form.finish().await?;
            }
            let params = DeepgrowParams::parse(body.params())?;
            let uid = named.series.unwrap_or_default();
            let volume = fetched_series(state, uid).await?;
            on_volume(state, model, volume, params).await?
        }
        // The params came first (as every client sends them): the upload is decoded while it arrives, and
        // only as far as the clicked slice.
        (None, Some((part, Format::Nifti)), ClickBody::Form(form)) if form.params().is_some() => {
            let params = DeepgrowParams::parse(form.params())?;
            let decode = state.decode_pool.admit()?;
            // the reader takes decode workers as the bytes arrive
            let tickets = ClickTickets::new(None, state.infer_pool.admit()?);
            let (reader, pump) = part.pipe(decode);
            let label = params.label.clone();
            let job = off_runtime(move || {
                let source =
                    ImageSource::Upload(Upload::Nifti(FileBytes::Stream(Box::new(reader))));
                annotate(
                    &model,
                    source,
                    &params.clicks,
                    params.output,
                    limits,
                    &tickets,
                )
            });
            let (pumped, annotation) = tokio::join!(pump, job);
            // A broken upload explains a failed decode better than the decode does.
            pumped?;
            form.finish().await?;
            (annotation?, label)
        }
        // The params come after the file, or the upload is a DICOM series (its instances as parts, or a zip):
        // buffered against the in-flight budget, then only the clicked slice is decoded.
        (None, Some((part, format)), ClickBody::Form(form)) => {
            let mut reservation = state.budget.empty();
            let files = if format == Format::Nifti {
                let bytes = form.buffer(part, &mut reservation, 0).await?;
                form.finish().await?;
                vec![(String::new(), bytes)]
            } else {
                form.buffer_series(part, &mut reservation).await?
            };
            let params = DeepgrowParams::parse(form.params())?;
            let tickets =
                ClickTickets::new(Some(state.decode_pool.admit()?), state.infer_pool.admit()?);
            let label = params.label.clone();
            let annotation = off_runtime(move || {
                let _held = reservation;
                let upload = match format {
                    Format::Nifti => Upload::Nifti(FileBytes::Memory(&files[0].1)),
                    _ => Upload::Dicom(files),
                };
                annotate(
                    &model,
                    ImageSource::Upload(upload),
                    &params.clicks,
                    params.output,
                    limits,
                    &tickets,
                )
            })
            .await?;
            (annotation, label)
        }
        (None, _, _) => return Err(ApiError::NoImage),
    };
    state.metrics.observe_click(&annotation.params.latencies);
    tracing::info!(
        model = %annotation.params.model,
        slice = annotation.params.slice,
        mask_pixels = annotation.params.mask_pixels,
        total_ms = annotation.params.latencies.total,
        infer_ms = annotation.params.latencies.infer,
        "deepgrow click answered"
    );
    Ok(Answered { annotation, label })
}
