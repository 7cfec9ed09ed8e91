//! The HTTP harness of the fuzz targets that drive the real router: a fresh state per input (fake engine,
//! small limits), `oneshot` requests on one current-thread runtime, and the checks every reply must pass:
//! never a 500, `Content-Length` equal to the body, and every error a JSON error body of one of the APIs.
#![allow(dead_code)]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clap::Parser;
use deepgrow_server::config::Config;
use deepgrow_server::models::Registry;
use serde_json::{json, Value};
use tower::ServiceExt;

pub const MODEL: &str = "deepgrow_2d";
pub const MAX_UPLOAD: usize = 4 << 20;
pub const MAX_DECOMPRESSED: u64 = 64 << 20;

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

pub fn make_config(extra: &[&str]) -> Config {
    let limits = [
        "deepgrow-server".to_owned(),
        "--max-upload-bytes".to_owned(),
        MAX_UPLOAD.to_string(),
        "--max-decompressed-bytes".to_owned(),
        MAX_DECOMPRESSED.to_string(),
        "--session-memory-bytes".to_owned(),
        (256usize << 20).to_string(),
        "--max-sessions".to_owned(),
        "4".to_owned(),
        "--workers".to_owned(),
        "1".to_owned(),
    ];
    Config::parse_from(
        limits
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string())),
    )
}

/// The configuration without (`false`) or with (`true`) `--auth-token fuzz-token`.
pub fn config(auth: bool) -> &'static Config {
    static OPEN: OnceLock<Config> = OnceLock::new();
    static AUTH: OnceLock<Config> = OnceLock::new();
    if auth {
        AUTH.get_or_init(|| make_config(&["--auth-token", "fuzz-token"]))
    } else {
        OPEN.get_or_init(|| make_config(&[]))
    }
}

/// A fresh router and state per input, so that inputs do not depend on each other.
pub fn router(auth: bool) -> axum::Router {
    router_with(config(auth))
}

/// A fresh router and state of `config`, serving the fake model.
pub fn router_with(config: &Config) -> axum::Router {
    let registry = Registry::new(vec![crate::common::fake_model(MODEL)]);
    let state = deepgrow_server::build_state(config, registry).expect("state");
    deepgrow_server::app(state, &config.cors_origins)
}

/// `DEEPGROW_FUZZ_TRACE=1` prints every request's status (to see how deep a corpus gets).
pub fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("DEEPGROW_FUZZ_TRACE").is_some())
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Vec<u8>,
}

pub async fn send(
    app: &axum::Router,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    send_with(app, method, uri, content_type, None, body).await
}

pub async fn send_with(
    app: &axum::Router,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("valid method"))
        .uri(uri);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    let request = request.body(Body::from(body)).expect("valid request");
    let response = app
        .clone()
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("reply body")
        .to_vec();
    if trace() {
        eprintln!("TRACE {method} {uri} -> {}", status.as_u16());
    }
    assert_ne!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {uri} answered 500: {}",
        String::from_utf8_lossy(&body)
    );
    if let Some(declared) = declared {
        assert_eq!(declared, body.len(), "Content-Length differs from the body");
    }
    if !status.is_success() {
        let error: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{status} reply is not a JSON error body ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        // the AIAA body, or MONAI Label's `{"detail"}` where the request is that client's (a `files` upload)
        assert!(
            error["success"] == json!(false) || error.get("detail").is_some(),
            "{status} reply is neither error body: {error}"
        );
    }
    Reply {
        status,
        content_type,
        body,
    }
}

