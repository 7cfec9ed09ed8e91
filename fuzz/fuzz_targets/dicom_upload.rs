//! DICOM through the HTTP paths that carry it, on the real router: the input's first byte picks the framing,
//! the rest is cut into up to four files (as `dicom_series` cuts it) and sent as
//! * OHIF v2's session upload: `params` = null, then `image0..N` (`image_<i>.dcm`), `PUT /session/`;
//! * a click with its DICOM parts after the params (`POST /v1/deepgrow`), each part named `image<i>`;
//! * MONAI Label's session upload: several `files` parts and a `client_id`;
//! * the files as they are in one part (a zip, when the input is one), on a click;
//! * the rest of the input as OHIF v2's DICOM-fetch JSON body, against an allowed PACS that refuses the
//!   connection (nothing listens on its port).
//!
//! Every reply passes the harness's checks (never a 500, a JSON error body, `Content-Length`), and nothing
//! panics.
#![no_main]

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/http.rs"]
mod harness;

use std::sync::OnceLock;

use axum::http::StatusCode;
use libfuzzer_sys::fuzz_target;

use harness::{runtime, send, Reply};

const BOUNDARY: &str = "----WebKitFormBoundaryAbC123";
/// A loopback port nothing listens on: the PACS `--pacs` allows, which refuses every connection.
const REFUSING_PACS: &str = "127.0.0.1:9";

fn router() -> axum::Router {
    static CONFIG: OnceLock<deepgrow_server::config::Config> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        harness::make_config(&["--pacs", REFUSING_PACS, "--pacs-connect-timeout", "1", "--pacs-timeout", "2"])
    });
    harness::router_with(config)
}

fn form(parts: &[(String, Option<String>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(filename) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

const PARAMS: &[u8] = br#"{"foreground":[[1,1,0]],"background":[],"result_extension":".nrrd"}"#;

async fn upload(mode: u8, data: &[u8]) -> Reply {
    let app = router();
    let multipart = format!("multipart/form-data; boundary={BOUNDARY}");
    let files = common::cut_files(data);
    let numbered = |prefix: &str| -> Vec<(String, Option<String>, &[u8])> {
        files
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("{prefix}{i}"), Some(format!("image_{i}.dcm")), *f))
            .collect()
    };
    let reply = match mode % 5 {
        0 => {
            let mut parts = vec![("params".to_owned(), None, b"null".as_slice())];
            parts.extend(numbered("image"));
            send(&app, "PUT", "/session/?expiry=60&save_as=.nii", Some(&multipart), form(&parts)).await
        }
        1 => {
            let mut parts = vec![("params".to_owned(), None, PARAMS)];
            parts.extend(numbered("image"));
            send(&app, "POST", "/v1/deepgrow?model=deepgrow_2d&output=image", Some(&multipart), form(&parts))
                .await
        }
        2 => {
            let mut parts: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| ("files".to_owned(), Some(format!("{i}.dcm")), *f))
                .collect();
            parts.push(("client_id".to_owned(), None, b"user-xyz".as_slice()));
            send(&app, "PUT", "/session/", Some(&multipart), form(&parts)).await
        }
        3 => {
            let parts = vec![
                ("params".to_owned(), None, PARAMS),
                ("image".to_owned(), Some("series.zip".to_owned()), data),
            ];
            send(&app, "POST", "/v1/deepgrow?model=deepgrow_2d", Some(&multipart), form(&parts)).await
        }
        _ => {
            let reply = send(&app, "PUT", "/session/", Some("application/json"), data.to_vec()).await;
            // a body that names the allowed PACS reaches it, which refuses: 502; never a 5xx otherwise
            assert!(
                !reply.status.is_server_error() || reply.status == StatusCode::BAD_GATEWAY
                    || reply.status == StatusCode::GATEWAY_TIMEOUT
                    || reply.status == StatusCode::SERVICE_UNAVAILABLE,
                "DICOM-fetch body answered {}",
                reply.status
            );
            reply
        }
    };
    reply
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let reply = runtime().block_on(upload(mode, rest));
    if reply.status == StatusCode::OK && matches!(mode % 5, 1 | 3) {
        assert!(!reply.body.is_empty(), "an empty click reply ({})", reply.content_type);
    }
});
