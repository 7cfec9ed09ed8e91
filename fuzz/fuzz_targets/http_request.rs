//! Requests through the real axum router (`deepgrow_server::app`) with `tower::ServiceExt::oneshot`, against a
//! registry holding the fake guidance engine (64 x 64). No response may be a 500 (503 is fine), and nothing may
//! panic (libFuzzer's panic hook aborts on a panic in any thread, including the blocking pool).
//!
//! The first byte picks the mode:
//! * even: raw. Byte 1 picks the route, byte 2 the boundary (bits 0-1), the content type (bits 2-3) and the
//!   bearer-token case (bits 4-5); the rest is the body as is.
//! * odd: structured. The rest drives `arbitrary::Unstructured` to build a well-formed multipart body: a
//!   `params` JSON with clicks and output options, and a small NIfTI whose header fields are fuzzed; optionally
//!   through a session (PUT /session/, then POST /v1/deepgrow?session_id=..., GET and DELETE).
#![no_main]

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/http.rs"]
mod harness;

use arbitrary::{Result as ArbResult, Unstructured};
use axum::http::StatusCode;
use deepgrow_server::nifti_io::{self, DecodeLimits};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

use common::NiftiSpec;
use harness::{router, runtime, send, send_with, MAX_DECOMPRESSED};

const BOUNDARIES: [&str; 4] = [
    "----------lImIt_of_THE_fIle_eW_$", // Python AIAA client
    "MIME_boundary_0123456789ABCDEF",   // Poco (C++ / MITK)
    "----WebKitFormBoundaryAbC123",     // browsers (OHIF)
    "x",
];

const ROUTES: [(&str, &str); 7] = [
    ("POST", "/v1/deepgrow"),
    ("POST", "/v1/inference"),
    ("PUT", "/session/"),
    ("POST", "/v1/deepgrow?output=image"),
    ("POST", "/v1/inference?output=json&model=deepgrow_2d"),
    ("PUT", "/session?expiry=1"),
    ("POST", "/v1/v1/deepgrow?model=deepgrow_2d&output=all"),
];

fn raw(data: &[u8]) {
    let (route, kind, body) = match data {
        [route, kind, body @ ..] => (*route, *kind, body),
        _ => return,
    };
    let (method, uri) = ROUTES[route as usize % ROUTES.len()];
    let boundary = BOUNDARIES[kind as usize % BOUNDARIES.len()];
    let content_type = match kind / 4 % 4 {
        0 => Some(format!("multipart/form-data; boundary={boundary}")),
        1 => Some(format!("multipart/form-data; boundary=\"{boundary}\"")),
        2 => Some("multipart/form-data".to_owned()),
        _ => None,
    };
    // kind / 16: 0 no token configured; 1, 2, 3 `--auth-token fuzz-token` with no, the right, a wrong header.
    let (auth, authorization) = match kind / 16 % 4 {
        0 => (false, None),
        1 => (true, None),
        2 => (true, Some("Bearer fuzz-token")),
        _ => (true, Some("bearer fuzz-tokem")),
    };
    let app = router(auth);
    let reply = runtime().block_on(send_with(
        &app,
        method,
        uri,
        content_type.as_deref(),
        authorization,
        body.to_vec(),
    ));
    if auth && authorization != Some("Bearer fuzz-token") {
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{method} {uri} without the token"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Structured mode
// ---------------------------------------------------------------------------------------------------------

fn interesting_f32(u: &mut Unstructured) -> ArbResult<f32> {
    const VALUES: [f32; 16] = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        0.8,
        2.5,
        0.7,
        1e-3,
        1e-30,
        1e30,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    Ok(if u.ratio(3, 4)? {
        *u.choose(&VALUES)?
    } else {
        f32::from_bits(u.arbitrary()?)
    })
}

fn nifti_spec(u: &mut Unstructured) -> ArbResult<NiftiSpec> {
    let mut spec = NiftiSpec::simple([4, 4, 2]);
    spec.big_endian = u.arbitrary()?;
    if u.ratio(1, 16)? {
        spec.sizeof_hdr = *u.choose(&[540, 0, -1, 348i32.swap_bytes()])?;
    }
    let extreme = u.ratio(1, 16)?;
    for d in spec.dim[1..4].iter_mut() {
        *d = if extreme {
            *u.choose(&[0, -1, 1, 2, 255, 4096, i16::MAX, i16::MIN])?
        } else {
            u.int_in_range(1..=24)?
        };
    }
    if u.ratio(1, 8)? {
        spec.dim[0] = u.int_in_range(-1..=8)?;
        for d in spec.dim[4..].iter_mut() {
            *d = *u.choose(&[1, 1, 1, 0, 2, -1])?;
        }
    }
    const TYPES: [(i16, i16); 14] = [
        (2, 8),
        (4, 16),
        (8, 32),
        (16, 32),
        (64, 64),
        (256, 8),
        (512, 16),
        (768, 32),
        (1024, 64),
        (1280, 64),
        (128, 24),
        (32, 64),
        (1, 1),
        (1536, 128),
    ];
    let (datatype, bitpix) = *u.choose(&TYPES)?;
    spec.datatype = datatype;
    spec.bitpix = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        bitpix
    };
    if u.ratio(1, 32)? {
        spec.datatype = u.arbitrary()?;
    }
    if u.arbitrary()? {
        for p in spec.pixdim.iter_mut() {
            *p = interesting_f32(u)?;
        }
    }
    spec.vox_offset = if u.ratio(1, 8)? {
        *u.choose(&[
            0.0,
            348.0,
            352.5,
            353.0,
            400.0,
            1024.0,
            -352.0,
            f32::NAN,
            1e10,
        ])?
    } else {
        352.0
    };
    if u.arbitrary()? {
        spec.scl_slope = interesting_f32(u)?;
        spec.scl_inter = interesting_f32(u)?;
    }
    spec.qform_code = u.int_in_range(0..=2)?;
    spec.sform_code = u.int_in_range(0..=2)?;
    if spec.qform_code != 0 {
        for q in spec.quatern.iter_mut() {
            *q = if u.arbitrary()? {
                interesting_f32(u)?
            } else {
                u.int_in_range(-4..=4)? as f32 * 0.25
            };
        }
    }
    if spec.sform_code != 0 && u.arbitrary()? {
        for row in spec.srow.iter_mut() {
            for v in row.iter_mut() {
                *v = if u.arbitrary()? {
                    interesting_f32(u)?
                } else {
                    u.int_in_range(-4..=4)? as f32 * 0.5
                };
            }
        }
    }
    if u.ratio(1, 32)? {
        spec.magic = *u.choose(&[*b"ni1\0", *b"n+2\0", *b"\0\0\0\0"])?;
    }
    Ok(spec)
}

fn nifti_file(u: &mut Unstructured, spec: &NiftiSpec) -> ArbResult<Vec<u8>> {
    let voxels: usize = spec.dim[1..4]
        .iter()
        .map(|&d| (d.max(1) as usize).min(4096))
        .product();
    let bytes_per_voxel = (spec.bitpix.max(8) as usize / 8).min(16);
    // Bounded: a huge header without its data is a truncated file, which is the interesting case anyway.
    let mut len = (voxels * bytes_per_voxel).min(1 << 20);
    if spec.vox_offset.is_finite() && spec.vox_offset > 352.0 && spec.vox_offset < 2048.0 {
        len += spec.vox_offset as usize - 352;
    }
    if u.ratio(1, 16)? {
        len = len.saturating_sub(u.int_in_range(1..=16)?);
    }
    let seed: Vec<u8> = u.arbitrary::<Vec<u8>>()?.into_iter().take(256).collect();
    let data: Vec<u8> = if seed.is_empty() {
        vec![0; len]
    } else {
        seed.iter().copied().cycle().take(len).collect()
    };
    let file = spec.write(&data);
    Ok(if u.arbitrary()? {
        common::gzip(&file)
    } else {
        file
    })
}

fn coordinate(u: &mut Unstructured, size: i16) -> ArbResult<Value> {
    let size = size.max(1) as i64;
    Ok(match u.int_in_range(0..=31)? {
        0 => json!(-1),
        1 => json!(size),
        2 => json!(u.int_in_range(0..=size - 1)? as f64 + 0.5),
        3 => json!(1e300),
        4 => json!(-0.5),
        5 => json!("3"),
        6 => json!(null),
        7 => json!(u.arbitrary::<f64>()?),
        _ => json!(u.int_in_range(0..=size - 1)?),
    })
}

fn point(u: &mut Unstructured, dims: &[i16; 8]) -> ArbResult<Value> {
    let mut coords = vec![
        coordinate(u, dims[1])?,
        coordinate(u, dims[2])?,
        coordinate(u, dims[3].min(8))?,
    ];
    if u.ratio(1, 32)? {
        coords.pop();
    }
    Ok(Value::Array(coords))
}

fn points(u: &mut Unstructured, dims: &[i16; 8]) -> ArbResult<Option<Value>> {
    let n = u.int_in_range(0..=3)?;
    let list = Value::Array((0..n).map(|_| point(u, dims)).collect::<ArbResult<_>>()?);
    Ok(match u.int_in_range(0..=9)? {
        0 => None,
        1 => Some(Value::String(list.to_string())), // clients before 2021
        2 => Some(json!(null)),
        _ => Some(list),
    })
}

fn params(u: &mut Unstructured, dims: &[i16; 8]) -> ArbResult<String> {
    let mut params = serde_json::Map::new();
    if let Some(fg) = points(u, dims)? {
        params.insert("foreground".into(), fg);
    }
    if let Some(bg) = points(u, dims)? {
        params.insert("background".into(), bg);
    }
    match u.int_in_range(0..=4)? {
        0 => {}
        1 => {
            params.insert("current_point".into(), json!([point(u, dims)?]));
        }
        2 => {
            params.insert("current_point".into(), point(u, dims)?);
        }
        3 => {
            params.insert("current_point".into(), json!([]));
        }
        _ => {
            params.insert("current_point".into(), json!(null));
        }
    }
    if u.ratio(1, 3)? {
        let slice = match u.int_in_range(0..=5)? {
            0 => json!(u.int_in_range(-1..=8)?),
            1 => json!(u.int_in_range(-1..=8)?.to_string()),
            2 => json!(1.5),
            3 => json!(null),
            4 => json!(1e300),
            _ => json!(u.int_in_range(0..=2)?),
        };
        params.insert("slice".into(), slice);
    }
    if u.arbitrary()? {
        let ext = *u.choose(&[".nii.gz", ".nii", ".nrrd", "nrrd", "NII.GZ", "", ".png"])?;
        params.insert("result_extension".into(), json!(ext));
    }
    if u.arbitrary()? {
        let dtype = *u.choose(&["uint8", "uint16", "UINT16", "", "float32"])?;
        params.insert("result_dtype".into(), json!(dtype));
    }
    if u.arbitrary()? {
        let choices = [
            json!(true),
            json!(false),
            json!("true"),
            json!(1),
            json!(0),
            json!("no"),
        ];
        let compress = u.choose(&choices)?.clone();
        params.insert("result_compress".into(), compress);
    }
    params.insert("spatial_size".into(), json!([128, 128]));
    Ok(Value::Object(params).to_string())
}

/// A multipart body: optional `params` part, optional file part, in a fuzzed order and naming.
fn multipart(
    u: &mut Unstructured,
    boundary: &str,
    params: Option<&str>,
    file: Option<&[u8]>,
) -> ArbResult<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    if let Some(params) = params {
        parts.push(
            format!("Content-Disposition: form-data; name=\"params\"\r\n\r\n{params}").into_bytes(),
        );
    }
    if let Some(file) = file {
        let name = *u.choose(&["image", "datapoint", "file", "files", "image_1", "other"])?;
        let disposition = match u.int_in_range(0..=3)? {
            0 => format!("form-data; name=\"{name}\""),
            1 => format!("form-data; name=\"{name}\"; filename=\"C:\\\\data\\\\ct.nii.gz\""),
            2 => format!("form-data; name=\"{name}\"; filename=\"/tmp/x/volume.nii\""),
            _ => format!("form-data; name=\"{name}\"; filename=\"\""),
        };
        let mut part = format!(
            "Content-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        part.extend_from_slice(file);
        parts.push(part);
        if u.ratio(1, 16)? {
            parts.push(parts.last().expect("just pushed").clone());
        }
    }
    if u.ratio(1, 8)? {
        parts.push(b"Content-Disposition: form-data; name=\"extra\"\r\n\r\nignored".to_vec());
    }
    if u.arbitrary()? {
        parts.reverse();
    }
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        body.extend_from_slice(&part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Ok(body)
}

async fn structured(u: &mut Unstructured<'_>) -> ArbResult<()> {
    let spec = nifti_spec(u)?;
    let file = nifti_file(u, &spec)?;
    let params = params(u, &spec.dim)?;
    let boundary = *u.choose(&BOUNDARIES)?;
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let output = *u.choose(&[
        "",
        "&output=image",
        "&output=json",
        "&output=all",
        "&output=png",
    ])?;
    let app = router(false);
    let expected_shape = [
        spec.dim[1] as usize,
        spec.dim[2] as usize,
        spec.dim[3] as usize,
    ];

    let reply = if u.ratio(1, 4)? {
        // Through a session: upload once, click with only the params.
        let body = multipart(u, boundary, None, Some(&file))?;
        let created = send(
            &app,
            "PUT",
            "/session/?expiry=60",
            Some(&content_type),
            body,
        )
        .await;
        if created.status != StatusCode::OK {
            return Ok(());
        }
        let created: Value = serde_json::from_slice(&created.body).expect("session reply is JSON");
        let id = created["session_id"]
            .as_str()
            .expect("session_id")
            .to_owned();
        let body = multipart(u, boundary, Some(&params), None)?;
        let uri = format!("/v1/deepgrow?session_id={id}{output}");
        let reply = send(&app, "POST", &uri, Some(&content_type), body).await;
        let info = send(
            &app,
            "GET",
            &format!("/session/{id}?update_ts=1"),
            None,
            Vec::new(),
        )
        .await;
        assert_eq!(info.status, StatusCode::OK, "the session vanished");
        let gone = send(&app, "DELETE", &format!("/session/{id}"), None, Vec::new()).await;
        assert_eq!(gone.status, StatusCode::OK);
        reply
    } else {
        let with_params = u.ratio(15, 16)?;
        let body = multipart(
            u,
            boundary,
            with_params.then_some(params.as_str()),
            Some(&file),
        )?;
        let route = *u.choose(&[
            "/v1/deepgrow?model=deepgrow_2d",
            "/v1/inference?model=",
            "/v1/deepgrow?x=1",
        ])?;
        send(
            &app,
            "POST",
            &format!("{route}{output}"),
            Some(&content_type),
            body,
        )
        .await
    };
    if reply.status == StatusCode::OK
        && output == "&output=image"
        && !reply.body.starts_with(b"NRRD")
    {
        let limits = DecodeLimits {
            max_decompressed_bytes: MAX_DECOMPRESSED,
        };
        let mask = nifti_io::decode(&reply.body, limits).expect("the returned mask decodes");
        assert_eq!(
            mask.geometry.shape, expected_shape,
            "mask shape differs from the upload's"
        );
        assert_eq!(reply.content_type.contains("gzip"), mask.was_compressed);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 0 => raw(rest),
        Some((_, rest)) => {
            let mut u = Unstructured::new(rest);
            let _ = runtime().block_on(structured(&mut u));
        }
        None => {}
    }
});
