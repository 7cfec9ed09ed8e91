//! Multipart request reading (any file field name, any boundary the clients use) and reply framing.
//!
//! Replies follow the AIAA contract the clients parse: exact Content-Length (never chunked), the body starts
//! at the first boundary (no preamble), a `params` JSON part without a filename, then exactly one file part
//! with a quoted filename and an octet-stream type.

use axum::body::Body;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::Bytes;

use crate::error::ApiError;

/// The parts of an AIAA request: the `params` text and at most one image file.
#[derive(Debug, Default)]
pub struct Upload {
    pub params: Option<String>,
    pub file: Option<UploadedFile>,
}

#[derive(Debug)]
pub struct UploadedFile {
    /// The client's file name without its directories (clients send full local paths).
    pub name: String,
    pub bytes: Bytes,
}

fn multipart_error(error: MultipartError) -> ApiError {
    if body_timed_out(&error) {
        return body_timeout_error();
    }
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!(
            "the upload is larger than this server accepts ({}); the limit is set with --max-upload-bytes",
            error.body_text()
        ))
    } else {
        ApiError::BadRequest(format!("malformed multipart body: {}", error.body_text()))
    }
}

/// Whether a body error comes from the body timeout (`--body-timeout`) somewhere down its source chain.
pub fn body_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source())
        .any(|e| e.is::<tower_http::timeout::TimeoutError>())
}

pub fn body_timeout_error() -> ApiError {
    ApiError::RequestTimeout(
        "the request body stopped arriving: no data within the body timeout (--body-timeout)"
            .into(),
    )
}

/// Field names that carry the image even without a filename.
fn is_image_field(name: &str) -> bool {
    matches!(name, "datapoint" | "file" | "files") || name.starts_with("image")
}

/// Reads the body to its end (bounded) and drops it. Python, Slicer and C++ clients write the whole upload
/// before reading the reply: an error answered before the body is read would reach them as a broken pipe.
/// Chunks are dropped as they arrive, so a refused upload holds no memory; it stops at `limit` bytes, at the
/// body timeout, or at the first body error.
pub async fn drain(body: Body, limit: usize) {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut read = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        read = read.saturating_add(chunk.len());
        if read > limit {
            break;
        }
    }
}

/// The request's content type, lower-cased ("" when absent).
pub fn content_type(request: &Request) -> String {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Reads a multipart request's `params` and image; any other body is drained and refused.
pub async fn read_upload_request(request: Request, limit: usize) -> Result<Upload, ApiError> {
    let content_type = content_type(&request);
    if !content_type.starts_with("multipart/form-data") {
        drain(request.into_body(), limit).await;
        return Err(ApiError::BadRequest(format!(
            "expected a multipart/form-data body with 'params' and the image file, got content type '{content_type}'"
        )));
    }
    let multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("expected a multipart/form-data body: {e}")))?;
    read_upload(multipart).await
}

async fn read_upload(mut multipart: Multipart) -> Result<Upload, ApiError> {
    let mut upload = Upload::default();
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        if file_name.is_none() && name == "params" {
            upload.params = Some(field.text().await.map_err(multipart_error)?);
            continue;
        }
        if file_name.is_none() && !is_image_field(&name) {
            // Unknown text fields (e.g. a client's extra options) are ignored.
            continue;
        }
        if upload.file.is_some() {
            return Err(ApiError::BadRequest(format!(
                "expected exactly one image file, got a second part '{name}' (multi-file DICOM uploads are not supported; send one NIfTI volume)"
            )));
        }
        let bytes = field.bytes().await.map_err(multipart_error)?;
        let base_name = file_name
            .as_deref()
            .and_then(|n| n.rsplit(['/', '\\']).next())
            .unwrap_or(&name)
            .to_owned();
        upload.file = Some(UploadedFile {
            name: base_name,
            bytes,
        });
    }
    Ok(upload)
}

/// A random boundary: 32 hex characters, printable and unquoted as every client's parser wants.
fn boundary() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The AIAA success reply: `params` JSON part + one file part. The mask is sent as it is, between a small head
/// and tail, without copying it into a second buffer; the Content-Length is still exact.
pub fn multipart_reply(params_json: &str, file_name: &str, file: Vec<u8>) -> Response {
    let boundary = boundary();
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json\r\n\r\n{params_json}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    sized_response(
        format!("multipart/form-data; boundary={boundary}"),
        vec![head.into(), file.into(), tail.into()],
        None,
    )
}

/// The bare mask file (`output=image`, what OHIF reads).
pub fn file_reply(file_name: &str, file: Vec<u8>) -> Response {
    let content_type = if file_name.ends_with(".gz") {
        "application/gzip"
    } else {
        "application/octet-stream"
    };
    sized_response(
        content_type.to_owned(),
        vec![file.into()],
        Some(format!("attachment; filename=\"{file_name}\"")),
    )
}

/// A reply made of `chunks`, with an exact Content-Length (clients reject chunked replies).
fn sized_response(
    content_type: String,
    chunks: Vec<Bytes>,
    disposition: Option<String>,
) -> Response {
    let length: usize = chunks.iter().map(Bytes::len).sum();
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, length);
    if let Some(disposition) = disposition {
        builder = builder.header(header::CONTENT_DISPOSITION, disposition);
    }
    let body = Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    builder.body(body).expect("static headers are valid")
}
