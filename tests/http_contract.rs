//! The HTTP contract with a fake engine (fast): where the mask lands, every error class, upload limits,
//! overload, sessions and model filters. The fake engine's logits are the positive guidance map - 0.5, so
//! the mask is a small blob exactly around the foreground click.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use deepgrow_server::engine::Engine;
use deepgrow_server::models::Registry;

const MODEL: &str = "deepgrow_2d";

/// Default configuration (`Config::parse_from(["deepgrow-server"])`) with the fake registry.
fn server() -> SocketAddr {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER
        .get_or_init(|| start(config(&[]), fake_registry()))
        .addr
}

fn python_click(
    addr: SocketAddr,
    target: &str,
    params: &str,
    file: Option<(&str, &[u8])>,
) -> Reply {
    let mut parts = vec![text_part("params", params)];
    if let Some((filename, data)) = file {
        parts.push(file_part("datapoint", filename, data));
    }
    send(addr, python_request(addr, "POST", target, &parts))
}

fn liver_params() -> String {
    let [i, j, k] = ct().liver;
    format!(
        r#"{{"foreground": [[{i}, {j}, {k}]], "background": [], "current_point": [{i}, {j}, {k}]}}"#
    )
}

fn create_session(addr: SocketAddr, target: &str) -> String {
    let reply = send(
        addr,
        python_request(
            addr,
            "PUT",
            target,
            &[file_part("image", "/data/in.nii.gz", &ct().gz)],
        ),
    );
    reply.ok();
    assert!(
        reply.content_type().starts_with("application/json"),
        "{}",
        reply.content_type()
    );
    let body = reply.json();
    body["session_id"].as_str().expect("session_id").to_owned()
}

#[test]
fn mask_lands_on_the_clicked_voxel_with_every_client_framing() {
    let addr = server();
    let ct = ct();
    let [i, j, k] = ct.liver;
    let target = format!("/v1/deepgrow?model={MODEL}");

    let python = python_click(
        addr,
        &target,
        &liver_params(),
        Some(("/home/user/data/in.nii.gz", &ct.gz)),
    );
    let set = check_nifti_mask(&aiaa_multipart(&python).file, &ct.raw, k, true);
    assert_blob_around(&set, ct.liver);

    let cpp_params = format!(r#"{{"foreground":[[{i},{j},{k}]],"background":[]}}"#);
    let cpp = send(
        addr,
        poco_request(
            addr,
            "POST",
            &target,
            &[
                text_part("params", &cpp_params),
                file_part("image", "in.nii.gz", &ct.gz),
            ],
        ),
    );
    let set = check_nifti_mask(&aiaa_multipart(&cpp).file, &ct.raw, k, true);
    assert_blob_around(&set, ct.liver);

    // A browser form with the file first, an uncompressed upload: .nii back.
    let browser = send(
        addr,
        browser_request(
            addr,
            "POST",
            &target,
            &[
                file_part("image", "image.nii", &ct.raw),
                text_part("params", &cpp_params),
            ],
        ),
    );
    let result = aiaa_multipart(&browser);
    assert!(
        result.filename.ends_with(".nii") && !result.filename.ends_with(".gz"),
        "{}",
        result.filename
    );
    let set = check_nifti_mask(&result.file, &ct.raw, k, false);
    assert_blob_around(&set, ct.liver);
}

#[test]
fn slice_choice_follows_slice_then_current_point_then_lowest_click() {
    let addr = server();
    let ct = ct();
    let target = format!("/v1/inference?model={MODEL}");
    let (a, b) = ([40, 50, 5], [60, 45, 9]);
    let clicks = format!(
        r#""foreground": [[{}, {}, {}], [{}, {}, {}]], "background": []"#,
        a[0], a[1], a[2], b[0], b[1], b[2]
    );
    for (extra, expected) in [
        ("".to_owned(), a),
        (
            format!(r#", "current_point": [[{}, {}, {}]]"#, b[0], b[1], b[2]),
            b,
        ),
        (
            format!(
                r#", "current_point": [{}, {}, {}], "slice": 5"#,
                b[0], b[1], b[2]
            ),
            a,
        ),
    ] {
        let params = format!("{{{clicks}{extra}}}");
        let reply = python_click(addr, &target, &params, Some(("in.nii.gz", &ct.gz)));
        let result = aiaa_multipart(&reply);
        assert_eq!(result.params["slice"], expected[2], "{params}");
        let set = check_nifti_mask(&result.file, &ct.raw, expected[2], true);
        assert_blob_around(&set, expected);
    }
    // Only a background click on the slice: a valid, empty mask.
    let params = r#"{"foreground": [], "background": [[30, 30, 7]]}"#;
    let result = aiaa_multipart(&python_click(
        addr,
        &target,
        params,
        Some(("in.nii.gz", &ct.gz)),
    ));
    assert!(check_nifti_mask(&result.file, &ct.raw, 7, true).is_empty());
}

/// OHIF: float i/j (truncated), session, `output=image` NRRD uint16 gzip with the blob at the click.
#[test]
fn ohif_nrrd_mask_lands_on_the_truncated_click() {
    let addr = server();
    let ct = ct();
    let created = send(
        addr,
        browser_request(
            addr,
            "PUT",
            "/session/?save_as=.nii",
            &[
                text_part("params", "null"),
                file_part("image", "image.nii", &ct.gz),
            ],
        ),
    );
    let session_id = created.ok().json()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let [i, j, k] = ct.liver;
    let params = format!(
        r#"{{"foreground":[[{}.7,{}.2,{k}]],"background":[],"current_point":[[{}.7,{}.2,{k}]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}}"#,
        i, j, i, j
    );
    let reply = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=image&session_id={session_id}"),
            &[text_part("params", &params)],
        ),
    );
    reply.ok();
    let nrrd = parse_nrrd(&reply.body);
    assert_eq!(nrrd.field("type"), "uint16");
    assert_eq!(nrrd.field("encoding"), "gzip");
    let shape = ct.volume.geometry.shape;
    assert_eq!(
        nrrd.field("sizes"),
        format!("{} {} {}", shape[0], shape[1], shape[2])
    );
    let values: Vec<u16> = nrrd
        .data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_blob_around(&nonzero_voxels(&values, shape, k), ct.liver);

    // Uncompressed NRRD and a .nii.gz override of a .nii session work too.
    let raw_params = params.replace("true", "false");
    let reply = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=image&session_id={session_id}"),
            &[text_part("params", &raw_params)],
        ),
    );
    let nrrd = parse_nrrd(&reply.ok().body);
    assert_eq!(nrrd.field("encoding"), "raw");
    assert_eq!(nrrd.data.len(), shape.iter().product::<usize>() * 2);
}

#[test]
fn model_filters_and_model_types() {
    let addr = server();
    let names = |query: &str| -> Vec<String> {
        let reply = get(addr, &format!("/v1/models{query}"));
        reply
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(""), ["deepgrow_2d", "spleen_seg"]);
    // C++ users who enter ".../v1" as the server URL send /v1/v1/...: served the same.
    let doubled = get(addr, "/v1/v1/models");
    assert_eq!(doubled.ok().json(), get(addr, "/v1/models").ok().json());
    assert!(
        doubled.header("x-request-id").is_some(),
        "every reply carries its request id"
    );
    assert_eq!(names("?label=spleen"), ["spleen_seg"]);
    assert_eq!(names("?label=Spleen"), ["spleen_seg"]);
    assert!(names("?label=liver").is_empty());
    assert_eq!(names("?type=segmentation"), ["spleen_seg"]);
    assert_eq!(names("?type=deepgrow"), ["deepgrow_2d"]);
    assert_eq!(names("?type=deepgrow&label=spleen"), Vec::<String>::new());
    let one = get(addr, "/v1/models?model=spleen_seg").ok().json();
    assert_eq!(one["labels"], serde_json::json!(["spleen"]));
    assert!(
        one.get("deepgrow").is_none(),
        "only deepgrow models carry a deepgrow key"
    );

    let ct = ct();
    assert_aiaa_error(
        &python_click(
            addr,
            "/v1/deepgrow?model=spleen_seg",
            &liver_params(),
            Some(("in.nii.gz", &ct.gz)),
        ),
        400,
        "not a Deepgrow 2D model",
    );
    assert_aiaa_error(
        &python_click(
            addr,
            "/v1/deepgrow",
            &liver_params(),
            Some(("in.nii.gz", &ct.gz)),
        ),
        400,
        "model",
    );
}

/// Every error class answers a 4xx with the AIAA JSON error body naming the problem.
#[test]
fn bad_requests_get_aiaa_error_bodies() {
    let addr = server();
    let ct = ct();
    let host = addr.to_string();
    let deepgrow = format!("/v1/deepgrow?model={MODEL}");
    let [i, j, k] = ct.liver;
    let image = Some(("in.nii.gz", ct.gz.as_slice()));

    // Framing problems.
    let garbage = b"this is not a multipart body at all\r\n".to_vec();
    let reply = send(
        addr,
        request(
            &format!("POST {deepgrow} HTTP/1.1"),
            &[
                ("Host", host.clone()),
                (
                    "content-type",
                    format!("multipart/form-data; boundary={PYTHON_BOUNDARY}"),
                ),
                ("content-length", garbage.len().to_string()),
            ],
            &garbage,
        ),
    );
    assert_aiaa_error(&reply, 400, "multipart");
    let json = br#"{"foreground": [[1, 2, 3]]}"#;
    let reply = send(
        addr,
        request(
            &format!("POST {deepgrow} HTTP/1.1"),
            &[
                ("Host", host.clone()),
                ("Content-Type", "application/json".into()),
                ("Content-Length", json.len().to_string()),
            ],
            json,
        ),
    );
    assert_aiaa_error(&reply, 400, "multipart");
    let reply = send(
        addr,
        request(
            &format!("POST {deepgrow} HTTP/1.1"),
            &[("Host", host.clone()), ("Content-Length", "0".into())],
            b"",
        ),
    );
    assert_aiaa_error(&reply, 400, "multipart");
    // Two image files.
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &deepgrow,
            &[
                text_part("params", &liver_params()),
                file_part("image0", "a.nii.gz", &ct.gz),
                file_part("image1", "b.nii.gz", &ct.gz),
            ],
        ),
    );
    assert_aiaa_error(&reply, 400, "one image");

    // params problems.
    for (params, status, keyword) in [
        ("{foreground: [[1, 2, 3]]", 400, "JSON"),
        ("[1, 2, 3]", 400, "object"),
        (r#"{"foreground": [["a", 2, 3]]}"#, 400, "numbers"),
        (r#"{"foreground": [[1, 2]]}"#, 400, "3 coordinates"),
        ("{}", 422, "no clicks"),
        (r#"{"foreground": [], "background": []}"#, 422, "no clicks"),
        (
            &format!(r#"{{"foreground": [[122, {j}, {k}]]}}"#),
            422,
            "outside the volume",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, 101, {k}]]}}"#),
            422,
            "outside the volume",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, 30]]}}"#),
            422,
            "outside the volume",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, -1]]}}"#),
            422,
            "outside the volume",
        ),
        (
            &format!(r#"{{"background": [[-3, {j}, {k}]]}}"#),
            422,
            "background click",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, {k}]], "slice": 999}}"#),
            422,
            "slice 999",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, {k}]], "slice": -2}}"#),
            422,
            "slice -2",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, {k}]], "slice": 3}}"#),
            422,
            "no click lies on slice 3",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, {k}]], "result_extension": ".png"}}"#),
            400,
            "result_extension",
        ),
        (
            &format!(r#"{{"foreground": [[{i}, {j}, {k}]], "result_dtype": "float32"}}"#),
            400,
            "result_dtype",
        ),
    ] {
        let reply = python_click(addr, &deepgrow, params, image);
        let message = assert_aiaa_error(&reply, status, keyword);
        assert!(!message.is_empty(), "{params}");
    }
    assert_aiaa_error(
        &python_click(
            addr,
            &format!("{deepgrow}&output=dicom"),
            &liver_params(),
            image,
        ),
        400,
        "output",
    );

    // Model and endpoint problems.
    assert_aiaa_error(
        &python_click(addr, "/v1/deepgrow?model=nope", &liver_params(), image),
        404,
        "'nope'",
    );
    assert_aiaa_error(
        &python_click(addr, "/v1/inference?model=nope", &liver_params(), image),
        404,
        "not served",
    );
    let segmentation = python_click(
        addr,
        &format!("/v1/segmentation?model={MODEL}"),
        "{}",
        image,
    );
    assert_aiaa_error(&segmentation, 400, "/v1/deepgrow");
    assert_aiaa_error(
        &python_click(addr, &deepgrow, &liver_params(), None),
        400,
        "no image",
    );
    assert_aiaa_error(
        &python_click(
            addr,
            &format!("{deepgrow}&session_id=not-a-session"),
            &liver_params(),
            None,
        ),
        440,
        "not-a-session",
    );
    assert_aiaa_error(&get(addr, "/v2/models"), 404, "endpoint");
    assert_aiaa_error(&get(addr, "/v1/deepgrow"), 405, "method");
    // OHIF's default "fetch from DICOM server" session body: this server may contact no PACS until --pacs
    // names one, so it is refused without a connection (tests/dicom_http.rs pulls from a real one).
    let dicom = br#"{"dicom": {"server_address": "localhost", "server_port": 4242, "ae_title": "ORTHANC", "query_level": "SERIES", "patient_id": "1", "study_uid": "1.2", "series_uid": "1.2.3"}}"#;
    let reply = send(
        addr,
        request(
            "PUT /session/ HTTP/1.1",
            &[
                ("Host", host.clone()),
                ("Content-Type", "application/json".into()),
                ("Content-Length", dicom.len().to_string()),
            ],
            dicom,
        ),
    );
    assert_aiaa_error(&reply, 403, "--pacs HOST:PORT");
    assert_aiaa_error(
        &send(
            addr,
            python_request(
                addr,
                "PUT",
                "/session/?expiry=soon",
                &[file_part("image", "in.nii.gz", &ct.gz)],
            ),
        ),
        400,
        "expiry",
    );
    assert_aiaa_error(
        &send(
            addr,
            python_request(addr, "PUT", "/session/", &[text_part("params", "{}")]),
        ),
        400,
        "no image",
    );
}

/// Uploads that are not a usable 3D scalar NIfTI-1 volume: 422 with a message saying why.
#[test]
fn unsupported_nifti_uploads_are_rejected_with_the_reason() {
    let addr = server();
    let ct = ct();
    let deepgrow = format!("/v1/deepgrow?model={MODEL}");
    // A click on the last slice: a click reads an upload up to its slice, so a cut file is caught there.
    let params = r#"{"foreground": [[1, 1, 29]], "background": []}"#;
    assert_eq!(ct.volume.geometry.shape[2], 30);
    let truncated_raw = ct.raw[..ct.raw.len() / 2].to_vec();
    let truncated_gz = ct.gz[..ct.gz.len() / 2].to_vec();
    let mut header_only = ct.raw[..352].to_vec();
    header_only[344..348].copy_from_slice(b"ni1\0");
    for (name, bytes, keyword) in [
        (
            "rgb_3d.nii",
            read_fixture("tests/fixtures/nifti/rgb_3d.nii"),
            "RGB",
        ),
        (
            "5D_small.nii",
            read_fixture("tests/fixtures/nifti/5D_small.nii"),
            "more than one volume",
        ),
        (
            "example_nifti2.nii.gz",
            read_fixture("tests/fixtures/nifti/example_nifti2.nii.gz"),
            "NIfTI-2",
        ),
        (
            "not-nifti.nii",
            read_fixture("tests/fixtures/nifti/not-nifti.nii"),
            "not a NIfTI",
        ),
        ("tiny.nii", b"hello".to_vec(), "not a NIfTI"),
        ("truncated.nii", truncated_raw, "truncated"),
        ("truncated.nii.gz", truncated_gz, "gzip"),
        ("in.hdr", header_only, "header-only"),
    ] {
        let reply = python_click(addr, &deepgrow, params, Some((name, &bytes)));
        assert_aiaa_error(&reply, 422, keyword);
        // A session create decodes the same way.
        let reply = send(
            addr,
            python_request(
                addr,
                "PUT",
                "/session/",
                &[file_part("image", name, &bytes)],
            ),
        );
        assert_aiaa_error(&reply, 422, keyword);
    }
}

#[test]
fn uploads_over_max_upload_bytes_are_413() {
    let server = start(config(&["--max-upload-bytes", "100000"]), fake_registry());
    let addr = server.addr;
    let ct = ct();
    assert!(ct.gz.len() > 100_000);
    let deepgrow = format!("/v1/deepgrow?model={MODEL}");
    let reply = python_click(
        addr,
        &deepgrow,
        &liver_params(),
        Some(("in.nii.gz", &ct.gz)),
    );
    assert_aiaa_error(&reply, 413, "max-upload-bytes");
    let reply = send(
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
    assert_aiaa_error(&reply, 413, "max-upload-bytes");
    // Under the limit still works: a 2-slice cut of the CT (49 kB).
    let small = restacked_ct(2);
    assert!(small.len() < 100_000);
    let [i, j, _] = ct.liver;
    let params = format!(r#"{{"foreground": [[{i}, {j}, 1]], "background": []}}"#);
    let result = aiaa_multipart(&python_click(
        addr,
        &deepgrow,
        &params,
        Some(("small.nii", &small)),
    ));
    assert_blob_around(&check_nifti_mask(&result.file, &small, 1, false), [i, j, 1]);
}

#[test]
fn default_upload_limit_is_one_gib_and_large_volumes_pass() {
    assert_eq!(config(&[]).max_upload_bytes, 1 << 30);
    assert_eq!(config(&[]).max_upload_bytes, 1_073_741_824);
    let addr = server();
    // 122 x 101 x 150 int16 = 3.7 MB, well over axum's 2 MB default body limit.
    let big = restacked_ct(150);
    assert!(big.len() > 3_000_000);
    let [i, j, _] = ct().liver;
    let click = [i, j, 120];
    let params = format!(
        r#"{{"foreground": [[{i}, {j}, 120]], "background": [], "current_point": [[{i}, {j}, 120]]}}"#
    );
    let reply = python_click(
        addr,
        &format!("/v1/deepgrow?model={MODEL}"),
        &params,
        Some(("/data/big.nii", &big)),
    );
    let result = aiaa_multipart(&reply);
    assert_blob_around(&check_nifti_mask(&result.file, &big, 120, false), click);
    // And as a session.
    let created = send(
        addr,
        python_request(
            addr,
            "PUT",
            "/session/?expiry=0",
            &[file_part("image", "/data/big.nii", &big)],
        ),
    );
    assert_eq!(
        created.ok().json()["session_info"]["meta"]["shape"],
        serde_json::json!([122, 101, 150])
    );
}

#[test]
fn overload_answers_503_with_retry_after() {
    let gate = Arc::new(Gate::default());
    let engine: Arc<dyn Engine> = Arc::new(BlockingEngine {
        inner: GuidanceEngine { size: [256, 256] },
        gate: gate.clone(),
    });
    let server = start(
        config(&["--workers", "1", "--queue", "0"]),
        Registry::new(vec![model(MODEL, "deepgrow", &[], engine)]),
    );
    let addr = server.addr;
    let first = std::thread::spawn(move || {
        python_click(
            addr,
            &format!("/v1/deepgrow?model={MODEL}"),
            &liver_params(),
            Some(("in.nii.gz", &ct().gz)),
        )
    });
    assert!(
        gate.wait_entered(1, Duration::from_secs(30)),
        "the first click reached the engine"
    );

    let second = python_click(
        addr,
        &format!("/v1/deepgrow?model={MODEL}"),
        &liver_params(),
        Some(("in.nii.gz", &ct().gz)),
    );
    assert_aiaa_error(&second, 503, "busy");
    let retry: u64 = second
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    // Cheap endpoints still answer while the worker is busy.
    get(addr, "/v1/models").ok();
    get(addr, "/health").ok();

    gate.open();
    let first = first.join().unwrap();
    assert_blob_around(
        &check_nifti_mask(&aiaa_multipart(&first).file, &ct().raw, CLICK_SLICE, true),
        ct().liver,
    );
    let third = python_click(
        addr,
        &format!("/v1/deepgrow?model={MODEL}"),
        &liver_params(),
        Some(("in.nii.gz", &ct().gz)),
    );
    aiaa_multipart(&third);
}

#[test]
fn session_lifecycle() {
    let addr = server();
    let ct = ct();
    // Python create_session: PUT /session/?expiry=0, one file part `image`, no params.
    let id = create_session(addr, "/session/?expiry=0");
    let info = get(addr, &format!("/session/{id}"));
    let info = info.ok().json();
    assert_eq!(info["meta"]["shape"], serde_json::json!([122, 101, 30]));
    assert_eq!(info["expiry"], 3600, "expiry=0 means the server default");

    // Python deepgrow with the session: params only.
    let target = format!("/v1/deepgrow?model={MODEL}&session_id={id}");
    let result = aiaa_multipart(&python_click(addr, &target, &liver_params(), None));
    assert_blob_around(
        &check_nifti_mask(&result.file, &ct.raw, CLICK_SLICE, true),
        ct.liver,
    );

    let deleted = delete(addr, &format!("/session/{id}"));
    deleted.ok();
    assert!(deleted.content_type().starts_with("application/json"));
    assert_unknown_session(&get(addr, &format!("/session/{id}")), &id);
    assert_aiaa_error(
        &python_click(addr, &target, &liver_params(), None),
        440,
        "expired",
    );
    assert_unknown_session(&delete(addr, &format!("/session/{id}")), &id);
    assert_unknown_session(
        &get(addr, "/session/00000000-0000-0000-0000-000000000000"),
        "00000000-0000-0000-0000-000000000000",
    );

    // PUT /session without the trailing slash, C++ style (no expiry).
    let reply = send(
        addr,
        poco_request(
            addr,
            "PUT",
            "/session",
            &[
                text_part("params", "{}"),
                file_part("image", "in.nii.gz", &ct.gz),
            ],
        ),
    );
    let id = reply.ok().json()["session_id"].as_str().unwrap().to_owned();
    get(addr, &format!("/session/{id}")).ok();
    delete(addr, &format!("/session/{id}")).ok();
}

#[test]
fn sessions_expire() {
    let addr = server();
    let id = create_session(addr, "/session/?expiry=1");
    let info = get(addr, &format!("/session/{id}")).ok().json();
    assert_eq!(info["expiry"], 1);
    std::thread::sleep(Duration::from_millis(2500));
    let target = format!("/v1/deepgrow?model={MODEL}&session_id={id}");
    assert_aiaa_error(
        &python_click(addr, &target, &liver_params(), None),
        440,
        "expired",
    );
    assert_unknown_session(&get(addr, &format!("/session/{id}")), &id);
}

/// Python's http.client, Slicer and Poco write the whole request before reading the reply. A 4xx decided
/// from the URL alone (unknown model, wrong endpoint, bad `output`, a mistyped path) must still reach them with a realistic CT upload
/// (16 MB here): the server has to read the body before it answers, or the client only sees a broken pipe.
#[test]
fn early_errors_reach_clients_that_upload_the_whole_body_first() {
    let addr = server();
    let big = restacked_ct(650);
    assert!(big.len() > 15_000_000);

    // Control: the same upload in a valid request is answered.
    let params = r#"{"foreground": [[60, 50, 600]], "background": []}"#;
    let upload = [
        text_part("params", params),
        file_part("datapoint", "/data/ct.nii", &big),
    ];
    let request = python_request(addr, "POST", "/v1/deepgrow?model=deepgrow_2d", &upload);
    let reply = send_then_read(addr, &request).expect("a valid request is answered");
    reply.assert_framing();
    let result = aiaa_multipart(&reply);
    assert_blob_around(
        &check_nifti_mask(&result.file, &big, 600, false),
        [60, 50, 600],
    );

    let mut failures = Vec::new();
    let session_upload = [file_part("image", "/data/ct.nii", &big)];
    for (method, target, status, keyword) in [
        ("POST", "/v1/deepgrow?model=nope", 404, "nope"),
        (
            "POST",
            "/v1/segmentation?model=deepgrow_2d",
            400,
            "/v1/deepgrow",
        ),
        (
            "POST",
            "/v1/deepgrow?model=deepgrow_2d&output=bad",
            400,
            "output",
        ),
        ("POST", "/v1/deepgrow?model=spleen_seg", 400, "deepgrow"),
        ("POST", "/v2/deepgrow?model=deepgrow_2d", 404, "endpoint"),
        ("PUT", "/session/?expiry=soon", 400, "expiry"),
    ] {
        let parts: &[Part] = if method == "PUT" {
            &session_upload
        } else {
            &upload
        };
        let request = python_request(addr, method, target, parts);
        match send_then_read(addr, &request) {
            Ok(reply) => {
                reply.assert_framing();
                assert_aiaa_error(&reply, status, keyword);
            }
            Err(e) => failures.push(format!(
                "{method} {target}: the client never sees the {status}: {e}"
            )),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn session_bounds_expiry_cap_and_eviction() {
    let server = start(
        config(&[
            "--max-sessions",
            "1",
            "--session-expiry",
            "60",
            "--session-max-expiry",
            "600",
        ]),
        fake_registry(),
    );
    let addr = server.addr;
    let first = create_session(addr, "/session/?expiry=999999");
    let info = get(addr, &format!("/session/{first}")).ok().json();
    assert_eq!(
        info["expiry"], 600,
        "a requested expiry is capped at --session-max-expiry"
    );
    let second = create_session(addr, "/session/");
    let info = get(addr, &format!("/session/{second}")).ok().json();
    assert_eq!(info["expiry"], 60, "no expiry means --session-expiry");
    assert_unknown_session(&get(addr, &format!("/session/{first}")), &first);
    let target = format!("/v1/deepgrow?model={MODEL}&session_id={first}");
    assert_aiaa_error(
        &python_click(addr, &target, &liver_params(), None),
        440,
        "expired",
    );
    get(addr, &format!("/session/{second}")).ok();
}

/// `serve`'s shutdown future: the in-flight click still gets its mask, then the server stops listening.
#[test]
fn shutdown_finishes_in_flight_requests() {
    let gate = Arc::new(Gate::default());
    let engine: Arc<dyn Engine> = Arc::new(BlockingEngine {
        inner: GuidanceEngine { size: [256, 256] },
        gate: gate.clone(),
    });
    let server = start(
        config(&[]),
        Registry::new(vec![model(MODEL, "deepgrow", &[], engine)]),
    );
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        python_click(
            addr,
            &format!("/v1/deepgrow?model={MODEL}"),
            &liver_params(),
            Some(("in.nii.gz", &ct().gz)),
        )
    });
    assert!(gate.wait_entered(1, Duration::from_secs(30)));
    drop(server); // resolves the shutdown future
    std::thread::sleep(Duration::from_millis(300));
    gate.open();
    let reply = in_flight.join().unwrap();
    let set = check_nifti_mask(&aiaa_multipart(&reply).file, &ct().raw, CLICK_SLICE, true);
    assert_blob_around(&set, ct().liver);
    let mut refused = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(addr).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused, "the listener is closed after shutdown");
}
