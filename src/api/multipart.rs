//! Multipart request reading (any file field name, any boundary the clients use) and reply framing.
//!
//! Replies follow the AIAA contract the clients parse: exact Content-Length (never chunked), the body starts
//! at the first boundary (no preamble), a `params` JSON part without a filename, then exactly one file part
//! with a quoted filename and an octet-stream type.

use std::io::Write;

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
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!(
            "the upload is larger than this server accepts ({}); the limit is set with --max-upload-bytes",
            error.body_text()
        ))
    } else {
        ApiError::BadRequest(format!("malformed multipart body: {}", error.body_text()))
    }
}

/// Field names that carry the image even without a filename.
fn is_image_field(name: &str) -> bool {
    matches!(name, "datapoint" | "file" | "files") || name.starts_with("image")
}

/// Reads the body to its end (bounded) and drops it. Python, Slicer and C++ clients write the whole upload
/// before reading the reply: an error answered before the body is read would reach them as a broken pipe.
pub async fn drain(body: Body, limit: usize) {
    let _ = axum::body::to_bytes(body, limit).await;
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

/// The AIAA success reply: `params` JSON part + one file part.
pub fn multipart_reply(params_json: &str, file_name: &str, file: &[u8]) -> Response {
    let boundary = boundary();
    let mut body = Vec::with_capacity(file.len() + params_json.len() + 400);
    let _ = write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json\r\n\r\n{params_json}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    body.extend_from_slice(file);
    let _ = write!(body, "\r\n--{boundary}--\r\n");
    sized_response(
        format!("multipart/form-data; boundary={boundary}"),
        body,
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
        file,
        Some(format!("attachment; filename=\"{file_name}\"")),
    )
}

fn sized_response(content_type: String, body: Vec<u8>, disposition: Option<String>) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(disposition) = disposition {
        builder = builder.header(header::CONTENT_DISPOSITION, disposition);
    }
    builder
        .body(Body::from(body))
        .expect("static headers are valid")
}
