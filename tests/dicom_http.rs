//! DICOM through the HTTP APIs, with each client's framing: OHIF v2's multi-instance session upload (`image0..N`,
//! `params` = null), DICOM parts on `POST /v1/deepgrow`, a zip, MONAI Label's several `files`, and every
//! transfer syntax. Each click on the series gives the same mask as the same click on its NIfTI conversion
//! (whose rows run the other way), on the bundled model.

mod common;

use std::sync::OnceLock;

use common::*;
use deepgrow_server::nifti_io::{self, VoxelData};

const MODEL: &str = "deepgrow_2d";
const SERIES: &str = "tests/fixtures/dicom/ct_series_j2k";
/// The slice of the series that the NIfTI fixture holds.
const K: usize = 10;
const LIVER_LABEL: u8 = 5;

fn series_files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        (0..20)
            .map(|k| {
                let name = format!("image_{k}.dcm");
                (name, read_fixture(&format!("{SERIES}/slice_{k:02}.dcm")))
            })
            .collect()
    })
}

/// The fixture series as `(file name, bytes)`.
fn series() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    series_files()
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
}

/// `params`, then one part per file named as OHIF v2 names them: `image0` … `imageN`.
fn instance_parts<'a, 'f: 'a>(
    params: &'a str,
    files: impl Iterator<Item = (&'f str, &'f [u8])>,
) -> Vec<Part<'a>> {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    let fields = FIELDS.get_or_init(|| (0..64).map(|n| format!("image{n}")).collect());
    let mut parts = vec![text_part("params", params)];
    parts.extend(
        files
            .enumerate()
            .map(|(n, (name, bytes))| file_part(&fields[n], name, bytes)),
    );
    parts
}

/// A liver voxel near the liver's centroid on the NIfTI slice, as `[i, j]` of the NIfTI (j reversed from DICOM).
fn liver_in_nifti() -> [usize; 2] {
    let label = nifti_io::decode(
        &read_fixture("tests/fixtures/dicom/totalseg_example_ct_dicom_slice10_label.nii.gz"),
        LIMITS,
    )
    .unwrap();
    let VoxelData::U8(values) = &label.data else {
        panic!("uint8 label")
    };
    let liver: Vec<[usize; 2]> = (0..512)
        .flat_map(|j| (0..512).map(move |i| [i, j]))
        .filter(|&[i, j]| values[i + 512 * j] == LIVER_LABEL)
        .collect();
    assert!(liver.len() > 1000, "liver on the fixture slice");
    let mean = |a: usize| liver.iter().map(|p| p[a] as f64).sum::<f64>() / liver.len() as f64;
    let (ci, cj) = (mean(0), mean(1));
    *liver
        .iter()
        .min_by(|a, b| {
            let d = |p: &[usize; 2]| (p[0] as f64 - ci).powi(2) + (p[1] as f64 - cj).powi(2);
            d(a).total_cmp(&d(b))
        })
        .unwrap()
}

fn nrrd_params(i: usize, j: usize, k: usize) -> String {
    format!(
        r#"{{"foreground":[[{i},{j},{k}]],"background":[],"current_point":[[{i},{j},{k}]],"result_extension":".nrrd","result_dtype":"uint16","result_compress":true}}"#
    )
}

/// The mask's non-zero `[i, j]` on slice `k` of an NRRD reply (uint16 or uint8), checking it is zero elsewhere.
fn mask_pixels(nrrd: &Nrrd, shape: [usize; 3], k: usize) -> Vec<[usize; 2]> {
    let sizes = format!("{} {} {}", shape[0], shape[1], shape[2]);
    assert_eq!(nrrd.field("sizes"), sizes);
    let values: Vec<u16> = match nrrd.field("type") {
        "uint16" => nrrd
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
        "uint8" => nrrd.data.iter().map(|&v| u16::from(v)).collect(),
        other => panic!("NRRD type {other}"),
    };
    nonzero_voxels(&values, shape, k)
        .into_iter()
        .map(|[i, j, _]| [i, j])
        .collect()
}

/// The NIfTI reference: the click on the NIfTI conversion's slice, its mask's pixels in DICOM's row order.
fn nifti_reference() -> &'static Vec<[usize; 2]> {
    static MASK: OnceLock<Vec<[usize; 2]>> = OnceLock::new();
    MASK.get_or_init(|| {
        let addr = real_server().addr;
        let [i, j] = liver_in_nifti();
        let nifti = read_fixture("tests/fixtures/dicom/totalseg_example_ct_dicom_slice10.nii.gz");
        let reply = send(
            addr,
            python_request(
                addr,
                "POST",
                &format!("/v1/deepgrow?model={MODEL}&output=image"),
                &[
                    text_part("params", &nrrd_params(i, j, 0)),
                    file_part("datapoint", "slice10.nii.gz", &nifti),
                ],
            ),
        );
        let mask = mask_pixels(&parse_nrrd(&reply.ok().body), [512, 512, 1], 0);
        assert!(
            mask.len() > 500,
            "the model segments the liver: {} pixels",
            mask.len()
        );
        mask.into_iter().map(|[i, j]| [i, 511 - j]).collect()
    })
}

fn assert_same_mask(got: &[[usize; 2]], what: &str) {
    let reference = nifti_reference();
    let both = got.iter().filter(|p| reference.contains(p)).count();
    let dice = 2.0 * both as f64 / (got.len() + reference.len()) as f64;
    eprintln!(
        "{what}: Dice {dice:.4} against the NIfTI click ({} vs {} pixels)",
        got.len(),
        reference.len()
    );
    assert!(dice >= 0.99, "{what}: Dice {dice:.4}");
}

/// The liver click in DICOM's voxel order.
fn dicom_click() -> [usize; 2] {
    let [i, j] = liver_in_nifti();
    [i, 511 - j]
}

/// `reply` created a session of the fixture series; OHIF v2's click on it gets the full-volume uint16 NRRD
/// with the NIfTI click's mask on frame K of its stack (OHIF v2 overwrites frame z, in position order, with
/// slice z).
fn assert_ohif_v2_click_on_the_session(addr: std::net::SocketAddr, reply: &Reply, what: &str) {
    let session = reply.ok().json();
    assert_eq!(
        session["session_info"]["meta"]["shape"],
        serde_json::json!([512, 512, 20])
    );
    let id = session["session_id"].as_str().unwrap();
    let [i, j] = dicom_click();
    let click = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&session_id={id}&output=image"),
            &[text_part("params", &nrrd_params(i, j, K))],
        ),
    );
    let nrrd = parse_nrrd(&click.ok().body);
    assert_eq!(nrrd.field("type"), "uint16");
    assert_same_mask(&mask_pixels(&nrrd, [512, 512, 20], K), what);
}

#[test]
fn ohif_v2_session_of_dicom_instances() {
    let addr = real_server().addr;
    // OHIF v2's AIAA upload: params = null, then image0..image19 named image_<i>.dcm.
    let parts = instance_parts("null", series());
    let reply = send(
        addr,
        browser_request(addr, "PUT", "/session/?expiry=600&save_as=.nii", &parts),
    );
    assert_ohif_v2_click_on_the_session(addr, &reply, "OHIF v2 session");
}

#[test]
fn dicom_parts_and_a_zip_on_a_click() {
    let addr = real_server().addr;
    let [i, j] = dicom_click();
    let params = nrrd_params(i, j, K);
    let parts = instance_parts(&params, series());
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=image"),
            &parts,
        ),
    );
    assert_same_mask(
        &mask_pixels(&parse_nrrd(&reply.ok().body), [512, 512, 20], K),
        "DICOM parts",
    );

    // curl -F image=@series.zip
    let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in series_files() {
        archive.start_file(format!("CT/{name}"), options).unwrap();
        std::io::Write::write_all(&mut archive, bytes).unwrap();
    }
    let zipped = archive.finish().unwrap().into_inner();
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&output=image"),
            &[
                text_part("params", &params),
                file_part("image", "series.zip", &zipped),
            ],
        ),
    );
    assert_same_mask(
        &mask_pixels(&parse_nrrd(&reply.ok().body), [512, 512, 20], K),
        "zip",
    );
}

#[test]
fn monai_label_session_of_several_files() {
    let addr = real_server().addr;
    let mut parts = vec![text_part("client_id", "user-xyz")];
    for (name, bytes) in series_files() {
        parts.push(Part {
            name: "files",
            filename: Some(name),
            content_type: None,
            data: bytes,
        });
    }
    let reply = send(addr, python_request(addr, "PUT", "/session/", &parts));
    let id = reply.ok().json()["session_id"].as_str().unwrap().to_owned();
    let [i, j] = dicom_click();
    let params = format!(
        r#"{{"foreground":[[{i},{j},{K}]],"background":[],"slice":{K},"result_extension":".nrrd","result_dtype":"uint8"}}"#
    );
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/infer/{MODEL}?session_id={id}&output=image"),
            &[text_part("params", &params)],
        ),
    );
    let nrrd = parse_nrrd(&reply.ok().body);
    assert_eq!(
        nrrd.data.len(),
        512 * 512 * 20,
        "OHIF v3 copies the bytes 1:1"
    );
    assert_same_mask(
        &mask_pixels(&nrrd, [512, 512, 20], K),
        "MONAI Label session",
    );
}

#[test]
fn every_transfer_syntax_gives_the_nifti_mask() {
    let addr = real_server().addr;
    let [i, j] = dicom_click();
    for name in [
        "implicit_le",
        "explicit_le",
        "explicit_be",
        "deflated",
        "rle",
        "jpeg_ls14sv1",
        "jpeg_ls14",
        "j2k_lossy",
    ] {
        let file = format!("slice10_{name}.dcm");
        let bytes = read_fixture(&format!("tests/fixtures/dicom/transfer_syntaxes/{file}"));
        let reply = send(
            addr,
            python_request(
                addr,
                "POST",
                &format!("/v1/deepgrow?model={MODEL}&output=image"),
                &[
                    text_part("params", &nrrd_params(i, j, 0)),
                    file_part("datapoint", &file, &bytes),
                ],
            ),
        );
        reply.ok();
        assert_same_mask(
            &mask_pixels(&parse_nrrd(&reply.body), [512, 512, 1], 0),
            name,
        );
    }
    let name = "slice10_jpegls.dcm";
    let jpegls = read_fixture(&format!("tests/fixtures/dicom/transfer_syntaxes/{name}"));
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}"),
            &[
                text_part("params", &nrrd_params(i, j, 0)),
                file_part("datapoint", name, &jpegls),
            ],
        ),
    );
    assert_aiaa_error(&reply, 422, "1.2.840.10008.1.2.4.80");
}

#[test]
fn bad_dicom_uploads_get_422_with_the_reason() {
    let addr = real_server().addr;
    let [i, j] = dicom_click();
    let params = nrrd_params(i, j, K);
    let click = |files: &[(&str, &[u8])]| {
        let parts = instance_parts(&params, files.iter().copied());
        send(
            addr,
            python_request(addr, "POST", &format!("/v1/deepgrow?model={MODEL}"), &parts),
        )
    };
    let other = read_fixture("tests/fixtures/dicom/other_series_ct_small.dcm");
    let first = &series_files()[0].1;
    assert_aiaa_error(
        &click(&[("a.dcm", first), ("b.dcm", &other)]),
        422,
        "2 series",
    );
    let colour = read_fixture("tests/fixtures/dicom/colour_rgb.dcm");
    assert_aiaa_error(&click(&[("rgb.dcm", &colour)]), 422, "colour");
    // a DICOM upload followed by something that is not DICOM
    assert_aiaa_error(
        &click(&[("a.dcm", first), ("notes.txt", b"not an image")]),
        422,
        "notes.txt",
    );
    // a session upload in MONAI Label's form gets the reason as FastAPI's detail
    let reply = send(
        addr,
        python_request(
            addr,
            "PUT",
            "/session/",
            &[
                text_part("client_id", "user-xyz"),
                file_part("files", "a.dcm", first),
                file_part("files", "rgb.dcm", &colour),
            ],
        ),
    );
    assert_eq!(reply.status, 422);
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("series"),
        "{}",
        reply.text()
    );
}

/// A throw-away Orthanc (Debian's `orthanc` + `orthanc-dicomweb`, started by tests/support/orthanc.sh on free
/// loopback ports), stopped when dropped.
struct Orthanc {
    dir: tempfile::TempDir,
    http_port: u16,
    dicom_port: u16,
}

impl Orthanc {
    /// Started, or `None` (with a note) where Orthanc is not installed and `DEEPGROW_REQUIRE_ORTHANC` is unset;
    /// `.ci/run` installs it and sets that variable, so CI never skips.
    fn start() -> Option<Orthanc> {
        let installed = std::path::Path::new("/usr/sbin/Orthanc").exists()
            || std::process::Command::new("sh")
                .args(["-c", "command -v Orthanc"])
                .output()
                .is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var_os("DEEPGROW_REQUIRE_ORTHANC").is_none(),
                "DEEPGROW_REQUIRE_ORTHANC is set but Orthanc is not installed"
            );
            eprintln!("SKIPPED: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)");
            return None;
        }
        let orthanc = Orthanc {
            dir: tempfile::tempdir().unwrap(),
            http_port: free_port(),
            dicom_port: free_port(),
        };
        let status = orthanc.script("start", &[]);
        assert!(
            status.status.success(),
            "Orthanc started: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        Some(orthanc)
    }

    fn script(&self, command: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new("bash")
            .arg(manifest_path("tests/support/orthanc.sh"))
            .arg(command)
            .arg(self.dir.path())
            .args(args)
            .env("ORTHANC_HTTP_PORT", self.http_port.to_string())
            .env("ORTHANC_DICOM_PORT", self.dicom_port.to_string())
            .env("DEEPGROW_SCP_PORT", free_port().to_string())
            .output()
            .expect("run tests/support/orthanc.sh")
    }

    fn dicomweb_url(&self) -> String {
        format!("http://127.0.0.1:{}/dicom-web", self.http_port)
    }

    /// Stores the fixture series through Orthanc's REST API.
    fn store_series(&self) {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.http_port).parse().unwrap();
        for (name, bytes) in series_files() {
            let reply = send_raw(
                addr,
                request(
                    "POST /instances HTTP/1.1",
                    &[
                        ("Host", addr.to_string()),
                        ("Content-Type", "application/dicom".into()),
                        ("Content-Length", bytes.len().to_string()),
                        ("Connection", "close".into()),
                    ],
                    bytes,
                ),
            );
            assert_eq!(reply.status, 200, "Orthanc stores {name}: {}", reply.text());
        }
    }

    fn stop(&self) {
        self.script("stop", &[]);
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

const SERIES_UID: &str = "2.25.263589157176749954975981379101980408753";

#[test]
fn ohif_v3_clicks_on_a_series_fetched_over_dicomweb() {
    let Some(orthanc) = Orthanc::start() else {
        return;
    };
    orthanc.store_series();
    let models_dir = manifest_path("models");
    let config = config(&[
        "--models-dir",
        models_dir.to_str().unwrap(),
        "--dicomweb-url",
        &orthanc.dicomweb_url(),
        "--pacs-timeout",
        "30",
    ]);
    let registry = deepgrow_server::load_models(&config).unwrap();
    let server = start(config, registry);
    let addr = server.addr;

    // OHIF v3's PointPrompts: the series by its UID, points in cornerstone's index order, the raw label back.
    let [i, j] = dicom_click();
    let params = format!(
        r#"{{"foreground":[[{i},{j},{K}]],"background":[],"result_extension":".nrrd","result_dtype":"uint8","result_compress":false,"restore_label_idx":false}}"#
    );
    let ohif_click = |uid: &str| {
        send(
            addr,
            browser_request(
                addr,
                "POST",
                &format!("/infer/{MODEL}?image={uid}&output=image"),
                &[text_part("params", &params)],
            ),
        )
    };
    let reply = ohif_click(SERIES_UID);
    reply.ok();
    assert!(reply.header("access-control-allow-origin").is_some());
    let nrrd = parse_nrrd(&reply.body);
    assert_eq!(nrrd.field("type"), "uint8");
    assert_eq!(nrrd.field("encoding"), "raw");
    // copied 1:1 into cornerstone's labelmap: exactly one byte per voxel, the mask on slice K only
    assert_eq!(nrrd.data.len(), 512 * 512 * 20);
    assert_same_mask(
        &mask_pixels(&nrrd, [512, 512, 20], K),
        "OHIF v3 over DICOMweb",
    );

    // The series stays cached: the next click is answered even with the PACS gone.
    orthanc.stop();
    let again = ohif_click(SERIES_UID);
    assert_eq!(parse_nrrd(&again.ok().body).data, nrrd.data);
    // A series not cached, with the PACS down: 502, saying which peer failed.
    let down = ohif_click("1.2.3.4.5");
    assert_eq!(down.status, 502, "{}", down.text());
    assert!(
        down.json()["detail"]
            .as_str()
            .unwrap()
            .contains("DICOMweb server"),
        "{}",
        down.text()
    );
    assert!(down.header("access-control-allow-origin").is_some());
}

#[test]
fn a_series_the_pacs_does_not_have_is_a_404() {
    let Some(orthanc) = Orthanc::start() else {
        return;
    };
    let config = config(&["--dicomweb-url", &orthanc.dicomweb_url()]);
    let server = start(config, fake_registry());
    let addr = server.addr;
    let reply = send(
        addr,
        browser_request(
            addr,
            "POST",
            &format!("/infer/{MODEL}?image=1.2.3.999&output=image"),
            &[text_part(
                "params",
                r#"{"foreground":[[1,2,0]],"background":[]}"#,
            )],
        ),
    );
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply.json()["detail"]
        .as_str()
        .unwrap()
        .contains("1.2.3.999"));
}

const STUDY_UID: &str = "2.25.76380497845291385007932465688983567541";

/// OHIF v2's default session create ("Fetch Images From Dicom Server"): axios's JSON PUT naming the series
/// and the PACS to pull it from.
fn ohif_pacs_session(addr: std::net::SocketAddr, dicom: serde_json::Value) -> Reply {
    let body = serde_json::json!({ "dicom": dicom }).to_string();
    send(
        addr,
        request(
            "PUT /session/?expiry=600&save_as=.nii HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                ("Accept", "application/json, text/plain, */*".into()),
                ("Content-Type", "application/json;charset=utf-8".into()),
                ("Origin", "http://localhost:3000".into()),
                ("Content-Length", body.len().to_string()),
            ],
            body.as_bytes(),
        ),
    )
}

fn pacs_body(port: u16, series_uid: &str) -> serde_json::Value {
    serde_json::json!({
        "server_address": "127.0.0.1",
        "server_port": port,
        "ae_title": "ORTHANC",
        "query_level": "SERIES",
        "patient_id": "",
        "study_uid": STUDY_UID,
        "series_uid": series_uid,
    })
}

#[test]
fn ohif_v2_pulls_the_series_from_the_pacs_by_c_get() {
    let Some(orthanc) = Orthanc::start() else {
        return;
    };
    orthanc.store_series();
    let models_dir = manifest_path("models");
    let pacs = format!("127.0.0.1:{}", orthanc.dicom_port);
    let config = config(&[
        "--models-dir",
        models_dir.to_str().unwrap(),
        "--pacs",
        &pacs,
        "--ae-title",
        "DEEPGROW",
        "--pacs-timeout",
        "60",
    ]);
    let registry = deepgrow_server::load_models(&config).unwrap();
    let server = start(config, registry);
    let addr = server.addr;

    let reply = ohif_pacs_session(addr, pacs_body(orthanc.dicom_port, SERIES_UID));
    assert!(reply.header("access-control-allow-origin").is_some());
    assert_ohif_v2_click_on_the_session(addr, &reply, "OHIF v2 session pulled by C-GET");

    // A series the PACS does not have: 404 naming it; one with more instances than allowed: 413.
    let missing = ohif_pacs_session(addr, pacs_body(orthanc.dicom_port, "1.2.3.999"));
    assert!(assert_aiaa_error(&missing, 404, "1.2.3.999").contains("ORTHANC"));
    drop(server);
    let limited = start(
        common::config(&["--pacs", &pacs, "--pacs-max-instances", "5"]),
        fake_registry(),
    );
    let too_many = ohif_pacs_session(limited.addr, pacs_body(orthanc.dicom_port, SERIES_UID));
    assert_aiaa_error(&too_many, 413, "more than 5 instances");

    // The PACS down: 502, naming it.
    orthanc.stop();
    let down = ohif_pacs_session(limited.addr, pacs_body(orthanc.dicom_port, SERIES_UID));
    let message = assert_aiaa_error(&down, 502, "could not be reached");
    assert!(
        message.contains(&format!("ORTHANC at 127.0.0.1:{}", orthanc.dicom_port)),
        "{message}"
    );
}

#[test]
fn pacs_pulls_that_fail_say_why() {
    // A peer that accepts the connection and never answers: 504 once --pacs-timeout passes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(std::time::Duration::from_secs(30));
        drop(held);
    });
    // A peer that is not a PACS: it answers the association request with an HTTP error and closes.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in http.incoming().take(1) {
            use std::io::{Read, Write};
            let mut stream = stream.unwrap();
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let silent_node = format!("127.0.0.1:{silent_port}");
    let http_node = format!("127.0.0.1:{http_port}");
    let allowed = format!("{silent_node},{http_node}");
    let server = start(
        config(&[
            "--pacs",
            &allowed,
            "--pacs-timeout",
            "1",
            "--pacs-connect-timeout",
            "1",
        ]),
        fake_registry(),
    );
    let addr = server.addr;

    let slow = ohif_pacs_session(addr, pacs_body(silent_port, SERIES_UID));
    assert!(assert_aiaa_error(&slow, 504, "did not answer within 1 s").contains(&silent_node));
    let not_a_pacs = ohif_pacs_session(addr, pacs_body(http_port, SERIES_UID));
    assert_eq!(not_a_pacs.status, 502, "{}", not_a_pacs.text());
    assert!(aiaa_error_message(&not_a_pacs, &http_node).contains("PACS"));

    // A node --pacs does not list is never contacted: 403, saying which are allowed.
    let mut elsewhere = pacs_body(silent_port, SERIES_UID);
    elsewhere["server_address"] = "10.1.2.3".into();
    let forbidden = ohif_pacs_session(addr, elsewhere);
    assert!(assert_aiaa_error(&forbidden, 403, "10.1.2.3").contains(&allowed.replace(',', ", ")));

    // Bodies that name no series properly: 400, naming the field.
    for (field, value, keyword) in [
        ("series_uid", serde_json::json!("1.2.3; DROP"), "series_uid"),
        ("study_uid", serde_json::json!(""), "study_uid"),
        ("server_port", serde_json::json!("http"), "server_port"),
        ("server_port", serde_json::json!(70000), "server_port"),
        ("query_level", serde_json::json!("STUDY"), "query_level"),
        (
            "ae_title",
            serde_json::json!("A_TITLE_LONGER_THAN_16"),
            "ae_title",
        ),
    ] {
        let mut body = pacs_body(silent_port, SERIES_UID);
        body[field] = value;
        assert_aiaa_error(&ohif_pacs_session(addr, body), 400, keyword);
    }
    let not_json = send(
        addr,
        request(
            "PUT /session/ HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                ("Content-Type", "application/json".into()),
                ("Content-Length", "9".into()),
            ],
            b"{\"dicom\":",
        ),
    );
    assert_aiaa_error(&not_json, 400, "dicom");
}
