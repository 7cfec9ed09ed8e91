//! Each AIAA client's exact wire framing against the real server with the bundled (tract) model, on real CT.
//!
//! One server (and one model load) is shared by every test of this file. Real inference is slow in a test
//! build, so the file makes 7 clicks in all; where the mask lands is checked with a fake engine in
//! `http_contract.rs`, here every mask is checked for geometry, values and slice.

mod common;

use common::*;
use serde_json::Value;

const MODEL: &str = "deepgrow_2d";

fn liver_params_python() -> (String, [usize; 3]) {
    let [i, j, k] = ct().liver;
    (
        format!(
            r#"{{"foreground": [[{i}, {j}, {k}]], "background": [], "current_point": [{i}, {j}, {k}]}}"#
        ),
        [i, j, k],
    )
}

#[test]
fn model_list_matches_what_every_client_parses() {
    let addr = real_server().addr;
    let list = get(addr, "/v1/models");
    list.ok();
    assert!(list.content_type().starts_with("application/json"));
    let models = list.json();
    let models = models.as_array().expect("GET /v1/models is a JSON array");
    let ours = models
        .iter()
        .find(|m| m["name"] == MODEL)
        .expect("the bundled model is listed");
    assert!(ours["labels"].is_array(), "labels is an array: {ours}");
    assert!(
        ours["description"].is_string(),
        "Slicer needs description: {ours}"
    );
    assert!(
        ours["version"].is_string(),
        "C++ needs version as a string: {ours}"
    );
    assert_eq!(ours["type"], "deepgrow");
    assert_eq!(ours["deepgrow"], "2D");

    // C++ and MITK: ?model= is ONE object.
    let one = get(addr, &format!("/v1/models?model={MODEL}"));
    one.ok();
    let one = one.json();
    assert!(one.is_object(), "?model= returns a single object: {one}");
    assert_eq!(&one, ours);

    assert_aiaa_error(&get(addr, "/v1/models?model=nope"), 404, "nope");

    for (query, listed) in [
        ("type=deepgrow", true),
        ("type=DeepGrow", true),
        ("type=segmentation", false),
        ("type=annotation", false),
        ("label=liver", false),
        ("type=", true),
    ] {
        let reply = get(addr, &format!("/v1/models?{query}"));
        reply.ok();
        let names: Vec<Value> = reply
            .json()
            .as_array()
            .expect("filtered list is an array")
            .iter()
            .map(|m| m["name"].clone())
            .collect();
        assert_eq!(
            names.contains(&Value::from(MODEL)),
            listed,
            "{query}: {names:?}"
        );
    }
}

#[tokio::test]
async fn model_list_through_reqwest() {
    let addr = real_server().addr;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("http://{addr}/v1/models"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(models
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == MODEL));
}

/// AIAA_API.md 1.2 and 6.3: the request bytes `client_api.py deepgrow()` sends, and the reply it can parse.
#[test]
fn python_client_deepgrow_on_ct() {
    let addr = real_server().addr;
    let ct = ct();
    let (params, [_, _, k]) = liver_params_python();
    let request = python_request(
        addr,
        "POST",
        &format!("/v1/deepgrow?model={MODEL}"),
        &[
            text_part("params", &params),
            file_part("datapoint", "/home/user/data/in.nii.gz", &ct.gz),
        ],
    );
    let reply = send(addr, request);
    let result = aiaa_multipart(&reply);
    assert!(result.filename.ends_with(".nii.gz"), "{}", result.filename);
    assert_eq!(result.params["slice"], k);
    check_nifti_mask(&result.file, &ct.raw, k, true);
}

/// The Slicer plugin: /v1/inference, `current_point` as `[[i, j, k]]`, both click lists, `spatial_size`;
/// with "Compress data" off it uploads `.nii` and must get a `.nii` back.
#[test]
fn slicer_inference_compressed_and_uncompressed() {
    let addr = real_server().addr;
    let ct = ct();
    let [i, j, k] = ct.liver;
    let [bi, bj, _] = ct.outside;
    let params = format!(
        r#"{{"foreground": [[{i}, {j}, {k}]], "background": [[{bi}, {bj}, {k}]], "current_point": [[{i}, {j}, {k}]], "spatial_size": [128, 128]}}"#
    );
    for (upload, filename, gz) in [
        (
            &ct.gz,
            "/tmp/Slicer-user/vtkMRMLScalarVolumeNode1.nii.gz",
            true,
        ),
        (
            &ct.raw,
            "C:\\Users\\me\\AppData\\Local\\Temp\\Slicer\\volume.nii",
            false,
        ),
    ] {
        let request = python_request(
            addr,
            "POST",
            &format!("/v1/inference?model={MODEL}"),
            &[
                text_part("params", &params),
                file_part("datapoint", filename, upload),
            ],
        );
        let result = aiaa_multipart(&send(addr, request));
        let expected_suffix = if gz { ".nii.gz" } else { ".nii" };
        assert!(
            result.filename.ends_with(expected_suffix),
            "{filename} -> {}",
            result.filename
        );
        assert_eq!(result.params["slice"], k);
        assert_eq!(result.params["foreground"], serde_json::json!([[i, j, k]]));
        assert_eq!(
            result.params["background"],
            serde_json::json!([[bi, bj, k]])
        );
        check_nifti_mask(&result.file, &ct.raw, k, gz);
    }
}

/// The C++ client / MITK (Poco 1.9.0): HTTP/1.0, quoted boundary, `image` field with a basename, no
/// current_point; then the session flow MITK always uses.
#[test]
fn cpp_client_deepgrow_and_session_flow() {
    let addr = real_server().addr;
    let ct = ct();
    let [i, j, k] = ct.liver;
    let params = format!(r#"{{"foreground":[[{i},{j},{k}]],"background":[]}}"#);
    let reply = send(
        addr,
        poco_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}"),
            &[
                text_part("params", &params),
                file_part("image", "in.nii.gz", &ct.gz),
            ],
        ),
    );
    assert!(
        reply.closed,
        "an HTTP/1.0 request without keep-alive gets its connection closed"
    );
    let result = aiaa_multipart(&reply);
    assert_eq!(
        result.params["slice"], k,
        "without current_point the clicks' slice is used"
    );
    check_nifti_mask(&result.file, &ct.raw, k, true);

    // createSession: PUT /session/ with params {} and the image.
    let created = send(
        addr,
        poco_request(
            addr,
            "PUT",
            "/session/",
            &[
                text_part("params", "{}"),
                file_part("image", "in.nii.gz", &ct.gz),
            ],
        ),
    );
    created.ok();
    assert!(
        created.content_type().starts_with("application/json"),
        "{}",
        created.content_type()
    );
    let session_id = created.json()["session_id"]
        .as_str()
        .expect("session_id string")
        .to_owned();
    assert!(!session_id.is_empty());

    // deepgrow with session_id: params only, no file.
    let reply = send(
        addr,
        poco_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&session_id={session_id}"),
            &[text_part("params", &params)],
        ),
    );
    let result = aiaa_multipart(&reply);
    assert_eq!(result.params["slice"], k);
    check_nifti_mask(&result.file, &ct.raw, k, true);
    assert!(delete(addr, &format!("/session/{session_id}")).status == 200);
}

/// The OHIF extension: cross-origin FormData, session with `params` = "null", float clicks, NRRD uint16 gzip
/// as the raw body for `output=image`, JSON for `output=json`, and a CORS preflight.
#[test]
fn ohif_session_nrrd_json_and_cors() {
    let addr = real_server().addr;
    let ct = ct();

    let preflight = send_raw(
        addr,
        request(
            "OPTIONS /v1/deepgrow?model=deepgrow_2d HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                ("Origin", "http://localhost:3000".into()),
                ("Access-Control-Request-Method", "POST".into()),
                (
                    "Access-Control-Request-Headers",
                    "accept,content-type".into(),
                ),
                ("Connection", "close".into()),
            ],
            b"",
        ),
    );
    assert!(
        preflight.status == 200 || preflight.status == 204,
        "preflight {}",
        preflight.status
    );
    assert!(
        preflight.header("access-control-allow-origin").is_some(),
        "{:?}",
        preflight.headers
    );
    let methods = preflight
        .header("access-control-allow-methods")
        .unwrap_or_default()
        .to_ascii_uppercase();
    assert!(
        methods.contains("POST") && methods.contains("PUT"),
        "allow-methods {methods}"
    );

    let created = send(
        addr,
        browser_request(
            addr,
            "PUT",
            "/session/?save_as=.nii",
            &[
                file_part("image", "image.nii", &ct.raw),
                text_part("params", "null"),
            ],
        ),
    );
    created.ok();
    assert!(created.content_type().starts_with("application/json"));
    assert!(
        created.header("access-control-allow-origin").is_some(),
        "CORS on the actual reply"
    );
    let session_id = created.json()["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();

    let info = get(addr, &format!("/session/{session_id}?update_ts=true"));
    info.ok();
    assert!(info.json().is_object());

    let [i, j, k] = ct.liver;
    let (fi, fj) = (i as f64 + 0.7, j as f64 + 0.2);
    let params = format!(
        r#"{{"foreground":[[{fi},{fj},{k}]],"background":[],"current_point":[[{fi},{fj},{k}]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}}"#
    );
    let image = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=image&session_id={session_id}"),
            &[text_part("params", &params)],
        ),
    );
    image.ok();
    assert!(
        !image.content_type().contains("multipart"),
        "output=image is the raw file: {}",
        image.content_type()
    );
    let nrrd = parse_nrrd(&image.body);
    check_nrrd(&nrrd, k);

    let json = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=json&session_id={session_id}"),
            &[text_part("params", &params)],
        ),
    );
    json.ok();
    assert!(
        json.content_type().starts_with("application/json"),
        "{}",
        json.content_type()
    );
    let params = json.json();
    assert_eq!(params["slice"], k);
    assert_eq!(
        params["foreground"],
        serde_json::json!([[i, j, k]]),
        "float clicks are truncated"
    );
}

fn check_nrrd(nrrd: &Nrrd, k: usize) {
    let shape = ct().volume.geometry.shape;
    assert_eq!(nrrd.field("type"), "uint16");
    assert_eq!(nrrd.field("dimension"), "3");
    assert_eq!(nrrd.field("encoding"), "gzip");
    assert_eq!(nrrd.field("endian"), "little");
    assert_eq!(
        nrrd.field("sizes"),
        format!("{} {} {}", shape[0], shape[1], shape[2])
    );
    let affine = ct().volume.geometry.affine;
    let origin: Vec<f64> = nrrd
        .field("space origin")
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(origin, vec![affine[0][3], affine[1][3], affine[2][3]]);
    let values: Vec<u16> = nrrd
        .data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    nonzero_voxels(&values, shape, k);
}
