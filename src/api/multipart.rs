//! Multipart request reading (any file field name, any boundary the clients use) and reply framing.
//!
//! Replies follow the AIAA contract the clients parse: exact Content-Length (never chunked), the body starts
//! at the first boundary (no preamble), a `params` JSON part without a filename, then exactly one file part
//! with a quoted filename and an octet-stream type.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, BodyDataStream};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use multer::{Constraints, Field, Multipart, SizeLimit};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::OwnedSemaphorePermit;

use crate::admission::{Reservation, Ticket, SMALL_REQUEST_BYTES};
use crate::error::ApiError;
use crate::image::{sniff, Format, SNIFF_BYTES};
use crate::nifti_io::MaskFile;

fn multipart_error(error: multer::Error) -> ApiError {
    if body_timed_out(&error) {
        return body_timeout_error();
    }
    match error {
        multer::Error::StreamSizeExceeded { limit } => ApiError::PayloadTooLarge(format!(
            "the upload is larger than this server accepts ({limit} bytes); the limit is set with --max-upload-bytes"
        )),
        other => ApiError::BadRequest(format!("malformed multipart body: {other}")),
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

/// Largest text part (`params`) accepted: clicks and options are a few hundred bytes.
pub const MAX_TEXT_PART: usize = 1 << 20;

/// Chunks of an upload in flight between the HTTP reader and its decoder.
const PIPE_CHUNKS: usize = 16;

/// A multipart request read part by part, so that the image part can be decoded while it arrives.
pub struct UploadForm {
    multipart: Multipart<'static>,
    /// The body under the parser, to read what follows the closing boundary (an epilogue) before replying.
    body: SharedBody,
    limit: usize,
    /// The request's Content-Length, when it sent one (what a buffered upload reserves up front).
    content_length: Option<u64>,
    params: Option<String>,
    images: usize,
    /// Whether more than one image part is taken (the instances of a DICOM series).
    many_images: bool,
    /// The names of the parts read so far (the first few), to tell the clients apart.
    field_names: Vec<String>,
}

/// The image part of an upload, as it arrives.
pub struct ImagePart {
    /// The client's file name without its directories (clients send full local paths).
    pub name: String,
    field: Field<'static>,
    /// Chunks read to sniff the format, handed on before the rest.
    prefix: VecDeque<Bytes>,
}

impl UploadForm {
    /// The request's multipart form (bounded to `limit` bytes); any other body is drained and refused.
    pub async fn from_request(request: Request, limit: usize) -> Result<Self, ApiError> {
        let content_type = content_type(&request);
        // the boundary from the header as sent: it is case-sensitive
        let header_value = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let boundary = match multer::parse_boundary(header_value) {
            Ok(boundary) if content_type.starts_with("multipart/form-data") => boundary,
            _ => {
                drain(request.into_body(), limit).await;
                return Err(ApiError::BadRequest(format!(
                    "expected a multipart/form-data body with a boundary, 'params' and the image file, got content type '{content_type}'"
                )));
            }
        };
        let content_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let constraints =
            Constraints::new().size_limit(SizeLimit::new().whole_stream(limit as u64));
        let body = SharedBody::new(request.into_body().into_data_stream());
        let multipart = Multipart::with_constraints(body.clone(), boundary, constraints);
        Ok(UploadForm {
            multipart,
            body,
            limit,
            content_length,
            params: None,
            images: 0,
            many_images: false,
            field_names: Vec::new(),
        })
    }

    /// Whether a part of this name has been read: MONAI Label's clients send `client_id` and `files`.
    pub fn has_field(&self, name: &str) -> bool {
        self.field_names.iter().any(|n| n == name)
    }

    /// The `params` text, once its part has been read.
    pub fn params(&self) -> Option<&str> {
        self.params.as_deref()
    }

    /// Reads text parts up to the next image part and returns it, or `None` at the end of the form. Unknown
    /// text parts (a client's extra options) are skipped. A second image part is refused.
    pub async fn next_image(&mut self) -> Result<Option<ImagePart>, ApiError> {
        while let Some(mut field) = self.multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            let file_name = field.file_name().map(str::to_owned);
            if self.field_names.len() < 16 {
                self.field_names.push(name.clone());
            }
            if file_name.is_none() && name == "params" {
                self.params = Some(read_text(&mut field).await?);
                continue;
            }
            // unknown text fields (a client's extra options), and MONAI Label's `label` input (a mask, which
            // deepgrow does not take) are read and dropped
            if (file_name.is_none() && !is_image_field(&name)) || name == "label" {
                while field.chunk().await.map_err(multipart_error)?.is_some() {}
                continue;
            }
            self.images += 1;
            if self.images > 1 && !self.many_images {
                return Err(ApiError::BadRequest(format!(
                    "expected one image file, got a second part '{name}' after a NIfTI volume (several parts are taken only as the instances of one DICOM series)"
                )));
            }
            let base_name = file_name
                .as_deref()
                .and_then(|n| n.rsplit(['/', '\\']).next())
                .unwrap_or(&name)
                .to_owned();
            return Ok(Some(ImagePart {
                name: base_name,
                field,
                prefix: VecDeque::new(),
            }));
        }
        Ok(None)
    }

    /// Reads the rest of the form after [`Self::next_image`]: `params` if it comes late, nothing else kept
    /// (a second image part is refused there), then whatever follows the closing boundary.
    pub async fn finish(&mut self) -> Result<(), ApiError> {
        let more = self.next_image().await?;
        debug_assert!(more.is_none(), "next_image refuses a second image part");
        self.drain_epilogue().await;
        Ok(())
    }

    /// Buffers `first` and every image part after it (the instances of a DICOM series, or a zip of them),
    /// all held against the in-flight budget, then reads the rest of the form.
    pub async fn buffer_series(
        &mut self,
        first: ImagePart,
        reservation: &mut Reservation,
    ) -> Result<Vec<(String, Bytes)>, ApiError> {
        self.many_images = true;
        let mut held = 0;
        let mut files = Vec::new();
        let mut next = Some(first);
        while let Some(part) = next {
            let name = part.name.clone();
            let bytes = self.buffer(part, reservation, held).await?;
            held += bytes.len();
            files.push((name, bytes));
            next = self.next_image().await?;
        }
        self.drain_epilogue().await;
        Ok(files)
    }

    /// Reads whatever is left of the body and drops it (see [`drain`]); for replies to refused requests.
    pub async fn drain(&mut self) {
        while let Ok(Some(mut field)) = self.multipart.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
        self.drain_epilogue().await;
    }

    /// Whatever follows the part the parser stopped at (bounded by the upload limit).
    async fn drain_epilogue(&mut self) {
        use futures_util::StreamExt;
        let mut read = 0usize;
        while let Some(Ok(chunk)) = self.body.next().await {
            read = read.saturating_add(chunk.len());
            if read > self.limit {
                break;
            }
        }
    }

    /// Buffers an image part whole, its bytes held against the in-flight budget (reserved up front from the
    /// Content-Length when the client sent one, else as they arrive), beside `held` bytes already buffered
    /// under the same reservation.
    pub async fn buffer(
        &self,
        mut part: ImagePart,
        reservation: &mut Reservation,
        held: usize,
    ) -> Result<Bytes, ApiError> {
        let hint = self.content_length.unwrap_or(0);
        if hint > SMALL_REQUEST_BYTES as u64 {
            reservation.grow_to(hint).await?;
        }
        // the first part may take the whole reservation (one copy for a single file); later ones grow
        let start = (reservation.bytes() as usize).saturating_sub(held);
        let mut buffer = BytesMut::with_capacity(if held == 0 { start } else { 0 });
        while let Some(chunk) = part.next_chunk().await? {
            let needed = buffer.len() + chunk.len();
            if needed > buffer.capacity() {
                // doubling, but never past the whole budget while what is needed would still fit it
                let room = (reservation.limit() as usize).saturating_sub(held);
                let grown = needed.max((buffer.capacity() * 2).min(room));
                if held + grown > SMALL_REQUEST_BYTES {
                    reservation.grow_to((held + grown) as u64).await?;
                }
                buffer.reserve(grown - buffer.len());
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer.freeze())
    }
}

impl ImagePart {
    /// The part's format, from its first bytes (which are kept and handed on first).
    pub async fn format(&mut self) -> Result<Format, ApiError> {
        let mut seen = BytesMut::new();
        for chunk in &self.prefix {
            seen.extend_from_slice(chunk);
        }
        while seen.len() < SNIFF_BYTES {
            match self.field.chunk().await.map_err(multipart_error)? {
                Some(chunk) => {
                    seen.extend_from_slice(&chunk);
                    self.prefix.push_back(chunk);
                }
                None => break,
            }
        }
        Ok(sniff(&seen))
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        match self.prefix.pop_front() {
            Some(chunk) => Ok(Some(chunk)),
            None => self.field.chunk().await.map_err(multipart_error),
        }
    }

    /// Hands the part to a blocking reader as it arrives. The returned future forwards the chunks (the reader
    /// applies back-pressure through a small channel) and, once the reader is dropped, reads the rest of the
    /// part without keeping it; it ends with the part, or with the body's error.
    ///
    /// The reader holds a worker of `ticket`'s pool only while it has bytes to work on: an upload that arrives
    /// slowly does not keep a decode worker from the others while it waits for the network.
    pub fn pipe(
        mut self,
        ticket: Ticket,
    ) -> (
        UploadReader,
        impl std::future::Future<Output = Result<(), ApiError>> + Send,
    ) {
        let (sender, receiver) = mpsc::channel::<Bytes>(PIPE_CHUNKS);
        let pump = async move {
            let mut sender = Some(sender);
            while let Some(chunk) = self.next_chunk().await? {
                if let Some(open) = &sender {
                    if open.send(chunk).await.is_err() {
                        sender = None;
                    }
                }
            }
            Ok(())
        };
        (
            UploadReader {
                receiver,
                chunk: Bytes::new(),
                ticket,
                worker: None,
            },
            pump,
        )
    }
}

/// The blocking side of [`ImagePart::pipe`]: the upload's bytes in order; the end of the part (or of the
/// body, when it broke off) reads as the end of the file. Call it from a blocking-pool thread.
pub struct UploadReader {
    receiver: mpsc::Receiver<Bytes>,
    chunk: Bytes,
    ticket: Ticket,
    worker: Option<OwnedSemaphorePermit>,
}

impl Read for UploadReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.receiver.try_recv() {
                Ok(chunk) => self.chunk = chunk,
                Err(TryRecvError::Disconnected) => return Ok(0),
                Err(TryRecvError::Empty) => {
                    // waiting for the network: the worker goes back to the pool meanwhile
                    self.worker = None;
                    match self.receiver.blocking_recv() {
                        Some(chunk) => self.chunk = chunk,
                        None => return Ok(0),
                    }
                }
            }
        }
        if self.worker.is_none() {
            self.worker = Some(self.ticket.worker().map_err(std::io::Error::other)?);
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

/// The request body, shared by the multipart parser and the form (which reads what the parser leaves).
///
/// It hands out one chunk per poll: multer's buffer pulls every chunk that is ready before it parses, and a
/// fast client on loopback keeps chunks ready for as long as it sends, so without the pause a 900 MB upload
/// could pile up in that buffer (hundreds of MB were measured) instead of flowing through.
#[derive(Clone)]
struct SharedBody(Arc<std::sync::Mutex<SharedState>>);

struct SharedState {
    body: BodyDataStream,
    /// A chunk was handed out by the last poll: the next one yields to the consumer first.
    paced: bool,
}

impl SharedBody {
    fn new(body: BodyDataStream) -> Self {
        SharedBody(Arc::new(std::sync::Mutex::new(SharedState {
            body,
            paced: false,
        })))
    }
}

impl futures_util::Stream for SharedBody {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use futures_util::StreamExt;
        let Ok(mut state) = self.0.lock() else {
            return std::task::Poll::Ready(None);
        };
        if state.paced {
            state.paced = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let next = state.body.poll_next_unpin(cx);
        state.paced = matches!(next, std::task::Poll::Ready(Some(Ok(_))));
        next
    }
}

/// A text part, bounded.
async fn read_text(field: &mut Field<'static>) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if text.len() + chunk.len() > MAX_TEXT_PART {
            return Err(ApiError::PayloadTooLarge(format!(
                "a text part is larger than {MAX_TEXT_PART} bytes"
            )));
        }
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).map_err(|_| ApiError::BadRequest("a text part is not UTF-8".into()))
}

/// A random boundary: 32 hex characters, printable and unquoted as every client's parser wants.
fn boundary() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The AIAA success reply: `params` JSON part + one file part. The mask is sent as it is, between a small head
/// and tail, without copying it into a second buffer; the Content-Length is still exact.
pub fn multipart_reply(params_json: &str, file_name: &str, file: MaskFile) -> Response {
    let boundary = boundary();
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json\r\n\r\n{params_json}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    sized_response(
        format!("multipart/form-data; boundary={boundary}"),
        std::iter::once(Bytes::from(head))
            .chain(file.0)
            .chain(std::iter::once(Bytes::from(tail)))
            .collect(),
        None,
    )
}

/// The bare mask file (`output=image`, what OHIF reads).
pub fn file_reply(file_name: &str, file: MaskFile) -> Response {
    let content_type = if file_name.ends_with(".gz") {
        "application/gzip"
    } else {
        "application/octet-stream"
    };
    sized_response(
        content_type.to_owned(),
        file.0,
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
