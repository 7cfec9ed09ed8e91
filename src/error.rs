//! The one error type of the HTTP layer and its one mapping to status codes and the AIAA JSON error body:
//! `{"error": {"message": ["..."], "type": "..."}, "success": false}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::deepgrow::DeepgrowError;
use crate::dicom::{DicomError, PeerError};
use crate::engine::EngineError;
use crate::nifti_io::NiftiError;
use crate::sessions::SessionError;

/// AIAA's status for an unknown or expired session (clients map it to "session expired").
pub const SESSION_EXPIRED: u16 = 440;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Nifti(#[from] NiftiError),
    #[error(transparent)]
    Dicom(#[from] DicomError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Deepgrow(#[from] DeepgrowError),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("model '{0}' is not served here; GET /v1/models (AIAA) or GET /info/ (MONAI Label) lists the models")]
    UnknownModel(String),
    #[error("{0}")]
    WrongModelType(String),
    #[error(
        "session '{0}' is unknown or has expired; upload the image again to create a new session"
    )]
    SessionExpired(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no image: send the volume as a file part ('datapoint' or 'file') or name a session with session_id")]
    NoImage,
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    #[error("{0}")]
    Unsupported(String),
    #[error("this endpoint does not accept that method")]
    MethodNotAllowed,
    #[error("this server requires 'Authorization: Bearer <token>' (set with --auth-token)")]
    Unauthorized,
    #[error("{0}")]
    RequestTimeout(String),
    #[error("the server is busy with other requests ({0} full); retry shortly")]
    Overloaded(&'static str),
    /// The shared session store (Redis) is down, slow or failing: a peer fault, logged where it happened.
    #[error("{0}")]
    StoreUnavailable(String),
    #[error("inference failed")]
    Engine(#[from] EngineError),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::NoImage | ApiError::InvalidField(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Nifti(NiftiError::TooLarge { .. })
            | ApiError::Dicom(DicomError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Deepgrow(e) if !e.is_client_error() => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Nifti(_) | ApiError::Dicom(_) | ApiError::Deepgrow(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnknownModel(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::WrongModelType(_) => StatusCode::BAD_REQUEST,
            ApiError::SessionExpired(_) => {
                StatusCode::from_u16(SESSION_EXPIRED).expect("440 is a valid status code")
            }
            ApiError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded(_) | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Engine(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Peer(e) => {
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    /// The `type` field of the AIAA error body.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Nifti(_) | ApiError::Dicom(_) => "InvalidImage",
            ApiError::Deepgrow(_) => "InvalidClicks",
            ApiError::PayloadTooLarge(_) => "PayloadTooLarge",
            ApiError::UnknownModel(_) => "ModelNotFound",
            ApiError::WrongModelType(_) => "WrongModelType",
            ApiError::SessionExpired(_) => "SessionExpired",
            ApiError::NotFound(_) => "NotFound",
            ApiError::NoImage | ApiError::InvalidField(_) => "BadRequest",
            ApiError::Unsupported(_) => "NotImplemented",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::RequestTimeout(_) => "RequestTimeout",
            ApiError::Overloaded(_) => "Overloaded",
            ApiError::StoreUnavailable(_) => "SessionStoreUnavailable",
            ApiError::Engine(_) => "InferenceError",
            ApiError::Internal(_) => "InternalError",
            ApiError::Peer(PeerError::SeriesNotFound { .. }) => "NotFound",
            ApiError::Peer(PeerError::NotAllowed { .. }) => "Forbidden",
            ApiError::Peer(_) => "PacsError",
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::TooLarge { needed, budget } => ApiError::PayloadTooLarge(format!(
                "the volume needs {needed} bytes in memory, more than the session budget of {budget} bytes"
            )),
            unavailable @ SessionError::Unavailable { .. } => {
                ApiError::StoreUnavailable(unavailable.to_string())
            }
        }
    }
}

/// A query or form field that is missing or out of its allowed values: FastAPI's validation error, which
/// MONAI Label's clients get as a 422 with a list of `{type, loc, msg, input}`.
#[derive(Debug, thiserror::Error)]
#[error("{location} field '{field}': {message}")]
pub struct FieldError {
    /// `query` or `body`.
    pub location: &'static str,
    pub field: &'static str,
    /// FastAPI's error type: `missing` or `enum`.
    pub kind: &'static str,
    pub message: String,
    pub input: Option<String>,
}

/// Builds the AIAA error body for an error kind and message.
fn error_body(kind: &str, message: &str) -> String {
    serde_json::json!({
        "error": { "message": [message], "type": kind },
        "success": false,
    })
    .to_string()
}

impl ApiError {
    /// The message a client gets (server faults are logged with their details and answered without them).
    fn logged_message(&self, status: StatusCode) -> String {
        match self {
            ApiError::Deepgrow(e) if !e.is_client_error() => {
                tracing::error!(error = %e, "pipeline fault");
                "internal error in the deepgrow pipeline".to_owned()
            }
            ApiError::Engine(e) => {
                tracing::error!(error = %e, "inference failed");
                self.to_string()
            }
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                self.to_string()
            }
            ApiError::Peer(e) if status.is_server_error() => {
                tracing::error!(error = %e, "PACS fault");
                self.to_string()
            }
            _ => {
                tracing::info!(status = status.as_u16(), error = %self, "request rejected");
                self.to_string()
            }
        }
    }

    /// An error reply with `body`, a JSON content type, and the headers this error calls for.
    fn reply(&self, status: StatusCode, body: String) -> Response {
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ApiError::Overloaded(_) | ApiError::StoreUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The connection may still hold unread body bytes: close it rather than read on.
            ApiError::RequestTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }

    /// The reply in MONAI Label's shape, FastAPI's `{"detail": "..."}`. An unknown session is a 404 there.
    pub fn into_detail_response(self) -> Response {
        let status = match &self {
            ApiError::SessionExpired(_) => StatusCode::NOT_FOUND,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => self.status(),
        };
        let message = self.logged_message(status);
        let detail = match &self {
            ApiError::InvalidField(field) => serde_json::json!([{
                "type": field.kind,
                "loc": [field.location, field.field],
                "msg": field.message,
                "input": field.input,
            }]),
            _ => serde_json::Value::String(message),
        };
        self.reply(status, serde_json::json!({ "detail": detail }).to_string())
    }

    /// A reply both APIs' clients read, where they send the same request (`GET`/`DELETE /session/{id}`): the
    /// AIAA body with MONAI's `detail` beside it. Both read any non-200 there as "no such session"; an unknown
    /// session is a 404, as MONAI Label answers (a click naming one still gets AIAA's 440 from `/v1`).
    pub fn into_shared_response(self) -> Response {
        let status = match &self {
            ApiError::SessionExpired(_) => StatusCode::NOT_FOUND,
            _ => self.status(),
        };
        let message = self.logged_message(status);
        let body = serde_json::json!({
            "detail": message,
            "error": { "message": [message], "type": self.kind() },
            "success": false,
        });
        self.reply(status, body.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.logged_message(status);
        self.reply(status, error_body(self.kind(), &message))
    }
}
