//! MONAI Label's REST API (shared/specs/MONAI_LABEL_API.md), with the exact bytes its clients send: the 20 cases
//! of its §12, on the bundled model and the CT fixture, over a real socket.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

const MODEL: &str = "deepgrow_2d";
/// `requests`' multipart boundary is 32 random hex digits (Slicer's and the Python client's `PUT /session/`).
const REQUESTS_BOUNDARY: &str = "0aaa50d8a62653471127f2b80cb37950";

fn server() -> SocketAddr {
    real_server().addr
}

/// A server on the fake guidance engine (a mask exactly around the foreground clicks, none without them).
fn fake_server() -> SocketAddr {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER
        .get_or_init(|| start(config(&[]), fake_registry()))
        .addr
}

/// `requests.put(url, files=[("files", (name, fh))], data={"client_id": "user-xyz"})`, as MONAI Label's
/// `create_session` sends it: the file part has no Content-Type.
fn requests_session_upload(addr: SocketAddr, file_name: &str, data: &[u8]) -> Vec<u8> {
    let parts = [
        text_part("client_id", "user-xyz"),
        Part {
            name: "files",
            filename: Some(file_name),
            content_type: None,
            data,
        },
    ];
    let body = form(REQUESTS_BOUNDARY, &parts, false);
    request(
        "PUT /session/ HTTP/1.1",
        &[
            ("Host", addr.to_string()),
            ("User-Agent", "python-requests/2.32.3".into()),
            ("Accept-Encoding", "gzip, deflate".into()),
            ("Accept", "*/*".into()),
            ("Connection", "keep-alive".into()),
            ("Content-Length", body.len().to_string()),
            (
                "Content-Type",
                format!("multipart/form-data; boundary={REQUESTS_BOUNDARY}"),
            ),
        ],
        &body,
    )
}

fn monai_session(addr: SocketAddr) -> String {
    let reply = send(
        addr,
        requests_session_upload(addr, "tmpab12cd34.nii.gz", &ct().gz),
    );
    let body = reply.ok().json();
    assert!(body["session_info"].is_object(), "{body}");
    body["session_id"].as_str().expect("session_id").to_owned()
}

/// Slicer's `client.infer`: http.client, its `$` boundary, a `params` part without Content-Type, and the
/// closing delimiter followed by an extra CRLF.
fn slicer_infer(addr: SocketAddr, target: &str, params: &str) -> Reply {
    send(
        addr,
        python_request(addr, "POST", target, &[text_part("params", params)]),
    )
}

fn slicer_params(points: &str, slice: Option<usize>) -> String {
    let slice = slice
        .map(|k| format!(r#""slice": {k}, "#))
        .unwrap_or_default();
    format!(
        r#"{{"label": "spleen", "foreground": {points}, "background": [], {slice}"reset_state": true, "result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}}"#
    )
}

fn liver_point() -> String {
    let [i, j, k] = ct().liver;
    format!("[[{i}, {j}, {k}]]")
}

/// What Slicer and the Python client read of a default (multipart) reply, as `cgi.FieldStorage` splits it:
/// parts with a filename are files, the others form fields.
struct SlicerResult {
    params: Value,
    filename: String,
    nrrd: Nrrd,
}

fn slicer_result(reply: &Reply) -> SlicerResult {
    reply.ok();
    let content_type = reply.content_type();
    assert!(
        content_type.starts_with("multipart/form-data; boundary="),
        "{content_type}"
    );
    let parts = parse_multipart(content_type, &reply.body);
    let (files, texts): (Vec<_>, Vec<_>) = parts.iter().partition(|p| p.filename.is_some());
    assert_eq!(files.len(), 1, "one label file");
    let params = texts
        .iter()
        .find(|p| p.name.as_deref() == Some("params"))
        .expect("a params part");
    let params: Value = serde_json::from_slice(&params.data).expect("params part is JSON");
    for key in ["label_names", "latencies", "centroids"] {
        assert!(params.get(key).is_some(), "{key} in {params}");
    }
    let filename = files[0].filename.clone().unwrap();
    assert!(
        !filename.contains(['/', '\\']) && filename.ends_with(".nrrd"),
        "a bare .nrrd basename: {filename}"
    );
    SlicerResult {
        params,
        filename,
        nrrd: parse_nrrd(&files[0].data),
    }
}

/// The label's geometry is the input's (sizes, directions, origin in RAS as the NIfTI affine gives them),
/// uint8, raw; returns its non-zero voxels, all on slice `k`.
fn check_label(nrrd: &Nrrd, k: usize) -> Vec<[usize; 3]> {
    let geometry = &ct().volume.geometry;
    let [h, w, d] = geometry.shape;
    assert_eq!(nrrd.field("sizes"), format!("{h} {w} {d}"));
    assert_eq!(nrrd.field("type"), "uint8");
    assert_eq!(nrrd.field("encoding"), "raw");
    assert_eq!(nrrd.field("space"), "right-anterior-superior");
    let a = &geometry.affine;
    let column = |c: usize| format!("({},{},{})", a[0][c], a[1][c], a[2][c]);
    assert_eq!(
        nrrd.field("space directions"),
        format!("{} {} {}", column(0), column(1), column(2))
    );
    assert_eq!(
        nrrd.field("space origin"),
        format!("({},{},{})", a[0][3], a[1][3], a[2][3])
    );
    assert_eq!(nrrd.data.len(), h * w * d, "exactly one byte per voxel");
    let values: Vec<u16> = nrrd.data.iter().map(|&v| u16::from(v)).collect();
    assert!(values.iter().all(|&v| v <= 1), "binary label");
    nonzero_voxels(&values, geometry.shape, k)
}

/// Dice of a label (its non-zero voxels, all on [`CLICK_SLICE`]) against the fixture's liver on that slice;
/// the bundled model segments the clicked liver at this level or better.
fn assert_liver(voxels: &[[usize; 3]]) {
    static LIVER_VOXELS: OnceLock<Vec<[usize; 3]>> = OnceLock::new();
    let liver = LIVER_VOXELS.get_or_init(|| {
        let labels = deepgrow_server::nifti_io::decode(
            &read_fixture("tests/fixtures/ct/totalseg_example_ct_sm_label.nii.gz"),
            LIMITS,
        )
        .unwrap();
        let deepgrow_server::nifti_io::VoxelData::U8(values) = &labels.data else {
            panic!("uint8 labels")
        };
        let [h, w, _] = labels.geometry.shape;
        let k = CLICK_SLICE;
        (0..w)
            .flat_map(|j| (0..h).map(move |i| [i, j, k]))
            .filter(|&[i, j, k]| values[i + h * (j + w * k)] == LIVER)
            .collect()
    });
    let both = voxels.iter().filter(|v| liver.contains(v)).count();
    let dice = 2.0 * both as f64 / (voxels.len() + liver.len()) as f64;
    assert!(
        dice >= MIN_LIVER_DICE,
        "liver Dice {dice:.3} ({} voxels, liver {})",
        voxels.len(),
        liver.len()
    );
    assert!(
        voxels.contains(&ct().liver),
        "the clicked voxel is in the label"
    );
}

/// The bundled model's Dice on the fixture's liver click is 0.58 (on this downsampled CT; tests/trained_model.rs
/// measures it on full-size cases); a mask elsewhere, or on another slice's geometry, scores near 0.
const MIN_LIVER_DICE: f64 = 0.5;

#[test]
fn info_has_the_shape_slicer_and_ohif_require() {
    let addr = server();
    for path in ["/info/", "/info"] {
        let reply = get(addr, path);
        reply.ok();
        assert!(reply.content_type().starts_with("application/json"));
        let info = reply.json();
        assert!(info.get("config").is_none(), "no top-level config: {info}");
        let model = &info["models"][MODEL];
        assert_eq!(model["type"], "deepgrow");
        assert!(
            model["dimension"].is_u64() && model["dimension"] == 2,
            "{model}"
        );
        assert!(model["description"].as_str().is_some_and(|d| !d.is_empty()));
        let labels = model["labels"].as_array().expect("model labels array");
        assert!(!labels.is_empty());
        let top = info["labels"].as_array().expect("top-level labels array");
        assert!(
            !top.is_empty() && top.iter().all(Value::is_string),
            "{info}"
        );
        assert!(labels.iter().all(|l| top.contains(l)));
        for empty in ["trainers", "strategies", "scoring", "train_stats"] {
            assert_eq!(info[empty], serde_json::json!({}), "{empty}");
        }
        assert!(info["datastore"].is_object());
        assert!(info["name"].is_string());
    }
}

#[test]
fn status_probes_say_no_auth_no_training() {
    let addr = server();
    for path in ["/auth/", "/auth"] {
        let reply = get(addr, path);
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json(), serde_json::json!({"detail": "Not Found"}));
    }
    let running = get(addr, "/train/?check_if_running=true");
    assert_eq!(running.status, 404);
    assert_eq!(
        running.json()["detail"],
        "No Train Tasks are currently Running"
    );
    for path in ["/train/", "/train"] {
        let reply = get(addr, path);
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json()["detail"], "No Train Tasks Found");
    }
    for (method, path) in [
        ("POST", "/train/"),
        ("POST", "/train/deepgrow_2d"),
        ("DELETE", "/train/"),
    ] {
        let reply = send(
            addr,
            request(
                &format!("{method} {path} HTTP/1.1"),
                &[
                    ("Host", addr.to_string()),
                    ("Content-Type", "application/json".into()),
                    ("Content-Length", "2".into()),
                ],
                b"{}",
            ),
        );
        assert_eq!(reply.status, 404, "{method} {path}");
        assert!(reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("no trainers"));
    }
    // OHIF's "Next Sample": MONAI Label's answer when nothing is left to label.
    let body = br#"{"client_id":"user-xyz"}"#;
    let next = send(
        addr,
        request(
            "POST /activelearning/random HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                ("Content-Type", "application/json".into()),
                ("Content-Length", body.len().to_string()),
            ],
            body,
        ),
    );
    assert_eq!(next.ok().json(), serde_json::json!({}));
}

#[test]
fn datastore_is_empty_and_refuses_writes() {
    let addr = server();
    let stats = get(addr, "/datastore/");
    assert_eq!(stats.ok().json()["total"], 0);
    let all = get(addr, "/datastore/?output=all");
    assert_eq!(all.ok().json()["objects"], serde_json::json!({}));
    assert_eq!(
        get(addr, "/datastore?output=train").ok().json(),
        serde_json::json!([])
    );
    // Slicer's "Save Label": the image upload, then the label; refused, so Slicer says the save failed.
    let params = r#"{"client_id": "user-xyz"}"#;
    for target in [
        "/datastore/?image=MRHead",
        "/datastore/label?image=MRHead&tag=final",
    ] {
        let reply = send(
            addr,
            python_request(
                addr,
                "PUT",
                target,
                &[
                    text_part("params", params),
                    file_part("file", "tmp1.nii.gz", &ct().gz),
                ],
            ),
        );
        assert_eq!(reply.status, 404, "{target}");
        assert!(reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("no datastore"));
    }
    let label = get(addr, "/datastore/label?label=MRHead&tag=final");
    assert_eq!(label.status, 404);
    assert_eq!(label.json()["detail"], "Label NOT Found or is a directory");
}

#[test]
fn slicer_session_and_click() {
    let addr = server();
    let id = monai_session(addr);
    let info = get(addr, &format!("/session/{id}"));
    let info = info.ok().json();
    assert!(
        info.as_object().is_some_and(|o| !o.is_empty()),
        "non-empty session info"
    );
    let k = CLICK_SLICE;

    // Case 7: the exact request of Slicer 0.8.x.
    let target = format!("/infer/{MODEL}?image=MRHead&session_id={id}");
    let with_slice = slicer_result(&slicer_infer(
        addr,
        &target,
        &slicer_params(&liver_point(), Some(k)),
    ));
    assert_eq!(
        with_slice.params["label_names"],
        serde_json::json!(["spleen"])
    );
    let latencies = &with_slice.params["latencies"];
    for key in ["pre", "infer", "invert", "post", "write", "total"] {
        assert!(
            latencies[key].is_f64() || latencies[key].is_u64(),
            "{key}: {latencies}"
        );
    }
    assert!(latencies["transform"].is_null());
    assert!(
        latencies["total"].as_f64().unwrap() < 60.0,
        "seconds, not milliseconds"
    );
    assert_eq!(with_slice.params["centroids"], serde_json::json!({}));
    let voxels = check_label(&with_slice.nrrd, k);
    assert_liver(&voxels);

    // Case 8: Slicer 0.7 sends no slice; the points' k is used. Case 10: extra keys are ignored.
    let without_slice = slicer_result(&slicer_infer(
        addr,
        &target,
        &slicer_params(&liver_point(), None),
    ));
    assert_eq!(without_slice.nrrd.data, with_slice.nrrd.data);
    let extra = slicer_params(&liver_point(), Some(k)).replace(
        r#""reset_state": true"#,
        r#""reset_state": true, "device": "cuda", "roi": [1, 50, 1, 50, 10, 20], "cache_transforms": true"#,
    );
    let extra = slicer_result(&slicer_infer(addr, &target, &extra));
    assert_eq!(extra.nrrd.data, with_slice.nrrd.data);

    // Case 9: a click on k = 0 makes Slicer send the points of every slice with "slice": 0.
    let [i, j, _] = ct().liver;
    let quirk = slicer_params(
        &format!("[[{i}, {j}, 0], [{i}, {j}, {k}], [3, 4, 7]]"),
        Some(0),
    );
    let quirk = slicer_result(&slicer_infer(addr, &target, &quirk));
    assert_eq!(quirk.params["slice"], 0);
    let on_zero = check_label(&quirk.nrrd, 0);
    assert!(!on_zero.is_empty(), "the k = 0 point segments slice 0");
    assert_ne!(quirk.filename, "", "a label file");

    // Case 20: a Slicer node name as the image id ("2: CT Chest", quote_plus-encoded) with the session.
    let named = format!("/infer/{MODEL}?image=2%3A+CT+Chest&session_id={id}");
    let named = slicer_result(&slicer_infer(
        addr,
        &named,
        &slicer_params(&liver_point(), Some(k)),
    ));
    assert_eq!(named.nrrd.data, with_slice.nrrd.data);

    // Case 15: params url-encoded, as MONAI's own tests post them.
    let encoded = format!(
        "params={}",
        slicer_params(&liver_point(), Some(k))
            .replace('%', "%25")
            .replace(' ', "+")
            .replace('"', "%22")
            .replace(',', "%2C")
            .replace('[', "%5B")
            .replace(']', "%5D")
            .replace('{', "%7B")
            .replace('}', "%7D")
            .replace(':', "%3A")
    );
    let urlencoded = send(
        addr,
        request(
            &format!("POST {target} HTTP/1.1"),
            &[
                ("Host", addr.to_string()),
                ("Content-Type", "application/x-www-form-urlencoded".into()),
                ("Content-Length", encoded.len().to_string()),
            ],
            encoded.as_bytes(),
        ),
    );
    assert_eq!(slicer_result(&urlencoded).nrrd.data, with_slice.nrrd.data);

    // Case 2: the trailing slash is served, not redirected.
    let slashed = format!("/infer/{MODEL}/?image=MRHead&session_id={id}");
    let slashed = slicer_result(&slicer_infer(
        addr,
        &slashed,
        &slicer_params(&liver_point(), Some(k)),
    ));
    assert_eq!(slashed.nrrd.data, with_slice.nrrd.data);

    // Case 12: output=json is the result JSON alone.
    let json = slicer_infer(
        addr,
        &format!("/infer/{MODEL}?image=MRHead&session_id={id}&output=json"),
        &slicer_params(&liver_point(), Some(k)),
    );
    json.ok();
    assert!(json.content_type().starts_with("application/json"));
    assert_eq!(json.json()["label_names"], serde_json::json!(["spleen"]));
    assert_eq!(
        json.json()["mask_pixels"].as_u64().unwrap() as usize,
        voxels.len()
    );

    // The Python client's remove_session.
    let removed = delete(addr, &format!("/session/{id}"));
    assert_eq!(removed.ok().json()["session_id"], id.as_str());
    assert_unknown_session(&get(addr, &format!("/session/{id}")), &id);
}

#[test]
fn an_empty_body_means_empty_params() {
    let addr = server();
    let id = monai_session(addr);
    // No body at all: params are {}, so there is no click to segment; the answer is a 4xx that says so.
    let reply = send(
        addr,
        request(
            &format!("POST /infer/{MODEL}?session_id={id} HTTP/1.1"),
            &[("Host", addr.to_string()), ("Content-Length", "0".into())],
            b"",
        ),
    );
    assert!((400..500).contains(&reply.status), "{}", reply.status);
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("click"),
        "{}",
        reply.text()
    );
}

#[test]
fn a_session_upload_of_200_mb() {
    let addr = server();
    let big = restacked_ct(8600);
    assert!(big.len() > 200 << 20);
    let reply = send(addr, requests_session_upload(addr, "tmpbig.nii", &big));
    let id = reply.ok().json()["session_id"].as_str().unwrap().to_owned();
    assert_eq!(
        get(addr, &format!("/session/{id}")).ok().json()["meta"]["shape"],
        serde_json::json!([122, 101, 8600])
    );
    delete(addr, &format!("/session/{id}")).ok();
}

#[test]
fn inline_file_and_the_same_mask_as_aiaa() {
    let addr = server();
    let k = CLICK_SLICE;
    let params = slicer_params(&liver_point(), Some(k));
    // Case 14: the Python client's infer(model, "", params, file=...): the image as a `file` part.
    let mut parts = vec![text_part("params", &params)];
    parts.push(Part {
        name: "file",
        filename: Some("vol.nii.gz"),
        content_type: Some("application/octet-stream"),
        data: &ct().gz,
    });
    let inline = send(
        addr,
        python_request(addr, "POST", &format!("/infer/{MODEL}?image="), &parts),
    );
    let inline = slicer_result(&inline);
    assert_liver(&check_label(&inline.nrrd, k));

    // The same click through the AIAA API gives the same mask.
    let [i, j, _] = ct().liver;
    let aiaa_params = format!(
        r#"{{"foreground": [[{i}, {j}, {k}]], "background": [], "current_point": [{i}, {j}, {k}], "result_extension": ".nrrd", "result_dtype": "uint8"}}"#
    );
    let aiaa = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}"),
            &[
                text_part("params", &aiaa_params),
                file_part("datapoint", "vol.nii.gz", &ct().gz),
            ],
        ),
    );
    let aiaa = aiaa_multipart(&aiaa);
    assert_eq!(parse_nrrd(&aiaa.file).data, inline.nrrd.data);

    // A session made by the AIAA API serves a MONAI Label click, and the other way round.
    let aiaa_session = send(
        addr,
        python_request(
            addr,
            "PUT",
            "/session/",
            &[file_part("image", "/data/in.nii.gz", &ct().gz)],
        ),
    );
    let aiaa_session = aiaa_session.ok().json()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let monai_click = slicer_result(&slicer_infer(
        addr,
        &format!("/infer/{MODEL}?session_id={aiaa_session}"),
        &params,
    ));
    assert_eq!(monai_click.nrrd.data, inline.nrrd.data);
    let monai_session = monai_session(addr);
    let aiaa_click = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&session_id={monai_session}"),
            &[text_part("params", &aiaa_params)],
        ),
    );
    assert_eq!(
        parse_nrrd(&aiaa_multipart(&aiaa_click).file).data,
        inline.nrrd.data
    );
}

#[test]
fn ohif_gets_the_raw_label_with_cors() {
    let addr = server();
    let id = monai_session(addr);
    let [i, j, k] = ct().liver;
    // OHIF v3's PointPrompts params: no label, no slice, result_compress false.
    let params = format!(
        r#"{{"foreground":[[{i},{j},{k}]],"background":[],"result_extension":".nrrd","result_dtype":"uint8","result_compress":false,"restore_label_idx":false}}"#
    );
    let reply = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!(
                "/infer/{MODEL}?image=1.2.826.0.1.3680043.2.1125.1&output=image&session_id={id}"
            ),
            &[text_part("params", &params)],
        ),
    );
    reply.ok();
    assert_eq!(reply.content_type(), "application/octet-stream");
    assert!(reply
        .header("content-disposition")
        .is_some_and(|d| d.contains("filename=\"") && d.contains(".nrrd")));
    assert!(reply.header("access-control-allow-origin").is_some());
    let nrrd = parse_nrrd(&reply.body);
    let header_length = reply.body.len() - nrrd.data.len();
    let [h, w, d] = ct().volume.geometry.shape;
    assert_eq!(reply.body.len(), header_length + h * w * d);
    assert_liver(&check_label(&nrrd, k));

    // Case 19: the preflight, and CORS on an error reply.
    let preflight = send_raw(
        addr,
        request(
            &format!("OPTIONS /infer/{MODEL} HTTP/1.1"),
            &[
                ("Host", addr.to_string()),
                ("Origin", "http://localhost:3000".into()),
                ("Access-Control-Request-Method", "POST".into()),
                ("Access-Control-Request-Headers", "content-type".into()),
            ],
            b"",
        ),
    );
    assert_eq!(preflight.status, 200);
    assert!(preflight.header("access-control-allow-origin").is_some());
    assert!(preflight
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    assert!(preflight.header("access-control-allow-headers").is_some());
    let error = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/infer/{MODEL}?image=1.2.3&output=image&session_id=gone"),
            &[text_part("params", &params)],
        ),
    );
    assert_eq!(error.status, 404);
    assert!(error.header("access-control-allow-origin").is_some());
}

#[test]
fn client_mistakes_get_detail_errors() {
    let addr = server();
    let params = slicer_params(&liver_point(), Some(CLICK_SLICE));
    let detail = |reply: &Reply, status: u16, needle: &str| {
        assert_eq!(reply.status, status, "{}", reply.text());
        assert!(reply.content_type().starts_with("application/json"));
        let body = reply.json();
        assert_eq!(body.as_object().unwrap().len(), 1, "only detail: {body}");
        let text = body["detail"].to_string();
        assert!(text.contains(needle), "{needle:?} in {text}");
    };
    // Case 13.
    detail(
        &slicer_infer(addr, &format!("/infer/{MODEL}"), &params),
        400,
        "no image",
    );
    detail(
        &slicer_infer(addr, "/infer/nosuch?image=x", &params),
        404,
        "nosuch",
    );
    detail(
        &slicer_infer(
            addr,
            &format!("/infer/{MODEL}?image=x&session_id=expired"),
            &params,
        ),
        404,
        "expired",
    );
    // An image id alone: there is no datastore to look it up in (case 20's decoding shows in the message).
    detail(
        &slicer_infer(
            addr,
            &format!("/infer/{MODEL}?image=2%3A+CT+Chest"),
            &params,
        ),
        404,
        "Image (2: CT Chest) Not Found",
    );
    // Case 12: an output outside the enum is FastAPI's validation error.
    let bogus = slicer_infer(
        addr,
        &format!("/infer/{MODEL}?image=x&output=bogus"),
        &params,
    );
    assert_eq!(bogus.status, 422);
    let item = &bogus.json()["detail"][0];
    assert_eq!(item["loc"], serde_json::json!(["query", "output"]));
    assert_eq!(item["type"], "enum");
    assert_eq!(item["input"], "bogus");
    // A session upload without its file, as FastAPI reports a missing form field.
    let missing = send(
        addr,
        request(
            "PUT /session/ HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                (
                    "Content-Type",
                    format!("multipart/form-data; boundary={REQUESTS_BOUNDARY}"),
                ),
                (
                    "Content-Length",
                    form(
                        REQUESTS_BOUNDARY,
                        &[text_part("client_id", "user-xyz")],
                        false,
                    )
                    .len()
                    .to_string(),
                ),
            ],
            &form(
                REQUESTS_BOUNDARY,
                &[text_part("client_id", "user-xyz")],
                false,
            ),
        ),
    );
    assert_eq!(missing.status, 422, "{}", missing.text());
    assert_eq!(
        missing.json()["detail"][0]["loc"],
        serde_json::json!(["body", "files"])
    );
    // A bad file in a MONAI Label session upload: the reason, in detail.
    let broken = send(
        addr,
        requests_session_upload(addr, "tmp.nii.gz", b"not a nifti file"),
    );
    assert!((400..500).contains(&broken.status));
    assert!(broken.json()["detail"].is_string(), "{}", broken.text());
    // A click whose point lies outside the volume is refused, not clamped into a wrong place.
    let id = monai_session(addr);
    detail(
        &slicer_infer(
            addr,
            &format!("/infer/{MODEL}?session_id={id}"),
            &slicer_params("[[5000, 10, 3]]", Some(3)),
        ),
        422,
        "outside",
    );
}

#[test]
fn an_empty_prediction_is_still_a_label_file() {
    // Case 16: background clicks only give the fake engine nothing to segment; Slicer still needs a file.
    let addr = fake_server();
    let id = monai_session(addr);
    let [i, j, k] = ct().outside;
    let params = format!(
        r#"{{"label": "spleen", "foreground": [], "background": [[{i}, {j}, {k}]], "slice": {k}, "result_extension": ".nrrd", "result_dtype": "uint8"}}"#
    );
    let result = slicer_result(&slicer_infer(
        addr,
        &format!("/infer/{MODEL}?image=MRHead&session_id={id}"),
        &params,
    ));
    assert!(check_label(&result.nrrd, k).is_empty());
    assert!(result.nrrd.data.iter().all(|&v| v == 0));
    assert_eq!(result.params["mask_pixels"], 0);
}
