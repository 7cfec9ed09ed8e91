//! Shared helpers for the HTTP integration tests: a real server on a free port, raw HTTP/1.x over TCP with
//! each AIAA client's exact framing, parsers for the replies (status line, headers, multipart bodies the way
//! Python's `cgi` and Poco's `MultipartReader` read them, NRRD), fake engines and mask checks.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use clap::Parser;
use deepgrow_server::config::Config;
use deepgrow_server::deepgrow::PipelineConfig;
use deepgrow_server::engine::{Engine, EngineError};
use deepgrow_server::models::{Model, ModelInfo, Registry};
use deepgrow_server::nifti_io::{self, DecodeLimits, Volume, VoxelData};
use flate2::read::MultiGzDecoder;
use ndarray::{s, Array2, Array4};
use serde_json::Value;

pub const PYTHON_BOUNDARY: &str = "----------lImIt_of_THE_fIle_eW_$";
pub const POCO_BOUNDARY: &str = "MIME_boundary_0123456789ABCDEF";
pub const BROWSER_BOUNDARY: &str = "----WebKitFormBoundaryAbC123";

// ---------------------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------------------

/// A server running on its own thread and runtime (so it outlives any one test's runtime).
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

/// `Config::parse_from(["deepgrow-server", args...])`.
pub fn config(args: &[&str]) -> Config {
    Config::parse_from(std::iter::once("deepgrow-server").chain(args.iter().copied()))
}

/// Starts `deepgrow_server::serve` on 127.0.0.1:0 with `build_state(config, registry)`.
pub fn start(config: Config, registry: Registry) -> TestServer {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a free port");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let state = deepgrow_server::build_state(&config, registry).expect("state");
            let shutdown = async move {
                let _ = shutdown_rx.await;
            };
            deepgrow_server::serve(listener, state, &config, shutdown)
                .await
                .expect("server ran");
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server started");
    TestServer {
        addr,
        shutdown: Mutex::new(Some(shutdown_tx)),
    }
}

/// A loopback port nothing listens on (for a peer a test starts: Orthanc, redis-server, a server process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server binary cargo built for the tests, in a process of its own, with the bundled model, on a port it
/// chose itself (read back from its "ready" log line, so no other process can take it first); killed when
/// dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// With these environment variables set for it as well (`SSL_CERT_FILE`, say).
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> Self {
        use std::process::{Command, Stdio};
        let models = manifest_path("models");
        let mut child = Command::new(env!("CARGO_BIN_EXE_deepgrow-server"))
            .args(["--port", "0", "--log-format", "json", "--models-dir"])
            .arg(&models)
            .args(args)
            // the "ready" line is an info line, whatever the caller's RUST_LOG
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // reads the log to its end, so that the server never blocks on a full pipe
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("deepgrow-server ready") {
                    let log: Value = serde_json::from_str(&line).unwrap();
                    let address = log["fields"]["address"].as_str().unwrap().to_owned();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(address);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server reports its address")
            .parse()
            .unwrap();
        ServerProcess { child, addr }
    }

    /// SIGKILL, and the process reaped.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn manifest_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The bundled real model (tract), loaded once per test binary and shared by its tests.
pub fn real_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let models_dir = manifest_path("models");
        let config = config(&["--models-dir", models_dir.to_str().unwrap()]);
        let registry = deepgrow_server::load_models(&config).expect("the bundled model loads");
        start(config, registry)
    })
}

// ---------------------------------------------------------------------------------------------------------
// Fake engines
// ---------------------------------------------------------------------------------------------------------

/// Logits = positive guidance channel - 0.5: the mask is a small blob exactly around the foreground clicks.
pub struct GuidanceEngine {
    pub size: [usize; 2],
}

impl Engine for GuidanceEngine {
    fn input_size(&self) -> [usize; 2] {
        self.size
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        Ok(input.slice(s![0, 1, .., ..]).mapv(|v| v - 0.5))
    }
}

/// Open/closed gate the blocking engine waits on (with a timeout, so a failing test never hangs the pool).
#[derive(Default)]
pub struct Gate {
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Gate {
    /// Waits until `n` inferences have entered the engine.
    pub fn wait_entered(&self, n: usize, timeout: Duration) -> bool {
        let guard = self.state.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| s.0 < n)
            .unwrap();
        guard.0 >= n
    }

    pub fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

/// A [`GuidanceEngine`] that blocks in `infer` until its gate opens (at most 30 s).
pub struct BlockingEngine {
    pub inner: GuidanceEngine,
    pub gate: Arc<Gate>,
}

impl Engine for BlockingEngine {
    fn input_size(&self) -> [usize; 2] {
        self.inner.size
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        {
            let mut state = self.gate.state.lock().unwrap();
            state.0 += 1;
            self.gate.changed.notify_all();
            let _ = self
                .gate
                .changed
                .wait_timeout_while(state, Duration::from_secs(30), |s| !s.1)
                .unwrap();
        }
        self.inner.infer(input)
    }
}

pub fn model(name: &str, model_type: &str, labels: &[&str], engine: Arc<dyn Engine>) -> Arc<Model> {
    Arc::new(Model {
        info: ModelInfo {
            name: name.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            description: format!("fake {model_type} model for tests"),
            version: "1".into(),
            model_type: model_type.into(),
            deepgrow: (model_type == "deepgrow").then(|| "2D".to_owned()),
        },
        pipeline: PipelineConfig::clara_deepgrow_2d(),
        engine,
    })
}

/// `deepgrow_2d` (fake guidance engine) plus a segmentation-type model `spleen_seg` labelled `spleen`.
pub fn fake_registry() -> Registry {
    let engine: Arc<dyn Engine> = Arc::new(GuidanceEngine { size: [256, 256] });
    Registry::new(vec![
        model("deepgrow_2d", "deepgrow", &[], engine.clone()),
        model("spleen_seg", "segmentation", &["spleen"], engine),
    ])
}

// ---------------------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------------------

pub const LIMITS: DecodeLimits = DecodeLimits {
    max_decompressed_bytes: 1 << 32,
};
/// The slice the tests click on (the liver is present on every slice of the fixture).
pub const CLICK_SLICE: usize = 14;
pub const LIVER: u8 = 5;

pub struct Ct {
    /// `tests/fixtures/ct/totalseg_example_ct_sm.nii.gz` as stored.
    pub gz: Vec<u8>,
    /// The same, decompressed (a valid single-file `.nii`).
    pub raw: Vec<u8>,
    pub volume: Volume,
    /// A liver voxel `[i, j, k]` on [`CLICK_SLICE`] (label 5), near the liver's centroid on that slice.
    pub liver: [usize; 3],
    /// A voxel on the same slice far from the liver (label 0), for background clicks.
    pub outside: [usize; 3],
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// The parity fixture's network input (tests/fixtures/model_reference/README.md): `1 × 3 × size × size`, every
/// value exact in float32.
pub fn fixture_network_input(size: usize) -> Array4<f32> {
    Array4::from_shape_fn((1, 3, size, size), |(_, c, h, w)| {
        ((h * 7 + w * 13 + c * 101) % 256) as f32 / 128.0 - 1.0
    })
}

/// MONAI's network input for a golden case of tests/fixtures/golden (shape from its case.json).
pub fn golden_network_input(case: &str) -> Array4<f32> {
    let dir = manifest_path("tests/fixtures/golden").join(case);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let shape: Vec<usize> =
        serde_json::from_value(meta["files"]["network_input.f32.gz"].clone()).unwrap();
    let values: Vec<f32> = gunzip(&std::fs::read(dir.join("network_input.f32.gz")).unwrap())
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Array4::from_shape_vec((shape[0], shape[1], shape[2], shape[3]), values).unwrap()
}

pub fn read_fixture(relative: &str) -> Vec<u8> {
    std::fs::read(manifest_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

pub fn ct() -> &'static Ct {
    static CT: OnceLock<Ct> = OnceLock::new();
    CT.get_or_init(|| {
        let gz = read_fixture("tests/fixtures/ct/totalseg_example_ct_sm.nii.gz");
        let raw = gunzip(&gz);
        let volume = nifti_io::decode(&gz, LIMITS).expect("fixture decodes");
        assert_eq!(volume.geometry.shape, [122, 101, 30]);
        let label = nifti_io::decode(
            &read_fixture("tests/fixtures/ct/totalseg_example_ct_sm_label.nii.gz"),
            LIMITS,
        )
        .expect("label decodes");
        assert_eq!(label.geometry.shape, volume.geometry.shape);
        let VoxelData::U8(labels) = &label.data else {
            panic!("labels are uint8")
        };
        let [h, w, _] = volume.geometry.shape;
        let k = CLICK_SLICE;
        let at = |i: usize, j: usize| labels[i + j * h + k * h * w];
        let liver: Vec<[usize; 2]> = (0..h)
            .flat_map(|i| (0..w).map(move |j| [i, j]))
            .filter(|&[i, j]| at(i, j) == LIVER)
            .collect();
        assert!(liver.len() > 100, "the fixture has liver on slice {k}");
        let mean =
            |axis: usize| liver.iter().map(|p| p[axis] as f64).sum::<f64>() / liver.len() as f64;
        let (ci, cj) = (mean(0), mean(1));
        let dist = |p: &[usize; 2]| (p[0] as f64 - ci).powi(2) + (p[1] as f64 - cj).powi(2);
        let best = liver
            .iter()
            .min_by(|a, b| dist(a).total_cmp(&dist(b)))
            .unwrap();
        // A background voxel: far from the liver and not on it.
        let outside = (0..h)
            .flat_map(|i| (0..w).map(move |j| [i, j]))
            .filter(|&[i, j]| at(i, j) == 0)
            .max_by(|a, b| dist(a).total_cmp(&dist(b)).then(b.cmp(a)))
            .unwrap();
        Ct {
            gz,
            raw,
            volume,
            liver: [best[0], best[1], k],
            outside: [outside[0], outside[1], k],
        }
    })
}

// ---------------------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Reply {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server closed the connection right after the reply (EOF within 150 ms).
    pub closed: bool,
}

impl Reply {
    /// The single value of a header (case-insensitive name); panics if it is repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next();
        assert!(
            values.next().is_none(),
            "header {name} repeated: {:?}",
            self.headers
        );
        first
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type")
            .unwrap_or_else(|| panic!("no Content-Type: {self:?}"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// Status 200 (with the body in the message otherwise).
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.status,
            200,
            "expected 200, got {} {}: {}",
            self.status,
            self.reason,
            self.text()
        );
        self
    }

    /// The framing every client relies on: a Content-Type, an exact Content-Length, never chunked.
    pub fn assert_framing(&self) {
        assert!(
            self.version == "HTTP/1.1" || self.version == "HTTP/1.0",
            "status line version {}",
            self.version
        );
        self.content_type();
        let length: usize = self
            .header("content-length")
            .unwrap_or_else(|| panic!("no Content-Length: {:?}", self.headers))
            .parse()
            .expect("numeric Content-Length");
        assert_eq!(
            length,
            self.body.len(),
            "Content-Length equals the body length"
        );
        assert!(
            self.header("transfer-encoding")
                .is_none_or(|te| !te.to_ascii_lowercase().contains("chunked")),
            "chunked reply"
        );
        assert!(
            self.header("content-encoding").is_none(),
            "no Content-Encoding"
        );
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of a raw request's head (request line and headers, through the blank line).
pub fn head_length(request: &[u8]) -> usize {
    find(request, b"\r\n\r\n").expect("a request head") + 4
}

/// Writes `request` (from a second thread, so an early reply cannot deadlock) and reads the whole reply.
pub fn send_raw(addr: SocketAddr, request: Vec<u8>) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut writer = stream.try_clone().unwrap();
    let write = std::thread::spawn(move || {
        // The server may answer (413) and close before reading everything: ignore write errors.
        let _ = writer.write_all(&request);
        let _ = writer.flush();
    });
    let reply = read_reply(&mut stream);
    drop(stream);
    write.join().unwrap();
    reply
}

/// Like Python's `http.client` and Poco: the whole request is written first, only then is the reply read.
/// A server that answers early and closes without reading the body makes the write fail here.
pub fn send_then_read(addr: SocketAddr, request: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(request)?;
    stream.flush()?;
    Ok(read_reply(&mut stream))
}

/// Reads the head, then exactly Content-Length bytes (or up to EOF without one), then checks nothing follows.
pub fn read_reply(stream: &mut TcpStream) -> Reply {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut eof = false;
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed before a full reply head: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the reply head: {e}"),
        }
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .expect("ASCII reply head")
        .to_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut words = status_line.splitn(3, ' ');
    let version = words.next().unwrap().to_owned();
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line}"));
    let reason = words.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("header line {line:?}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().expect("numeric Content-Length"));
    match length {
        Some(length) => {
            while body.len() < length {
                match stream.read(&mut chunk) {
                    Ok(0) => panic!("EOF after {} of {length} body bytes", body.len()),
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("reading the body: {e}"),
                }
            }
        }
        None => loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("reading a close-delimited body: {e}"),
            }
        },
    }
    if !eof {
        // Nothing may follow the body (a keep-alive connection just stays silent).
        stream
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => panic!(
                "{n} bytes after the Content-Length body: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => eof = true,
            Err(e) => panic!("after the body: {e}"),
        }
    }
    Reply {
        version,
        status,
        reason,
        headers,
        body,
        closed: eof,
    }
}

/// [`send_raw`] plus the framing checks every reply must pass.
pub fn send(addr: SocketAddr, request: Vec<u8>) -> Reply {
    let reply = send_raw(addr, request);
    reply.assert_framing();
    reply
}

/// A request with exactly these header lines (in this order) and body.
pub fn request(request_line: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{request_line}\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

pub fn get(addr: SocketAddr, target: &str) -> Reply {
    let host = addr.to_string();
    send(
        addr,
        request(
            &format!("GET {target} HTTP/1.1"),
            &[("Host", host), ("Connection", "close".into())],
            b"",
        ),
    )
}

/// Python's `http_method('DELETE', ...)`.
pub fn delete(addr: SocketAddr, target: &str) -> Reply {
    let host = addr.to_string();
    send(
        addr,
        request(
            &format!("DELETE {target} HTTP/1.1"),
            &[("Host", host), ("Accept-Encoding", "identity".into())],
            b"",
        ),
    )
}

// ---------------------------------------------------------------------------------------------------------
// Multipart requests as each client writes them
// ---------------------------------------------------------------------------------------------------------

pub struct Part<'a> {
    pub name: &'a str,
    pub filename: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub data: &'a [u8],
}

pub fn text_part<'a>(name: &'a str, value: &'a str) -> Part<'a> {
    Part {
        name,
        filename: None,
        content_type: None,
        data: value.as_bytes(),
    }
}

pub fn file_part<'a>(name: &'a str, filename: &'a str, data: &'a [u8]) -> Part<'a> {
    Part {
        name,
        filename: Some(filename),
        content_type: Some("application/octet-stream"),
        data,
    }
}

/// `--B CRLF headers CRLF CRLF data CRLF` per part, then `--B--` CRLF, plus one more CRLF if `epilogue`
/// (Python's `encode_multipart_formdata`); Poco and browsers write the same bytes without the epilogue.
pub fn form(boundary: &str, parts: &[Part], epilogue: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match part.filename {
            Some(filename) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{}\"; filename=\"{filename}\"\r\n",
                    part.name
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{}\"\r\n", part.name).as_bytes(),
            ),
        }
        if let Some(content_type) = part.content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(part.data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    if epilogue {
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// Python `client_api.py`: HTTP/1.1, Host, `Accept-Encoding: identity`, lower-case `content-type` and
/// `content-length`, text fields first, the closing delimiter followed by one extra CRLF.
pub fn python_request(addr: SocketAddr, method: &str, target: &str, parts: &[Part]) -> Vec<u8> {
    let body = form(PYTHON_BOUNDARY, parts, true);
    request(
        &format!("{method} {target} HTTP/1.1"),
        &[
            ("Host", addr.to_string()),
            ("Accept-Encoding", "identity".into()),
            (
                "content-type",
                format!("multipart/form-data; boundary={PYTHON_BOUNDARY}"),
            ),
            ("content-length", body.len().to_string()),
        ],
        &body,
    )
}

/// The C++ client (Poco 1.9.0 `HTMLForm`): HTTP/1.0, a quoted boundary, Content-Length.
pub fn poco_request(addr: SocketAddr, method: &str, target: &str, parts: &[Part]) -> Vec<u8> {
    let body = form(POCO_BOUNDARY, parts, false);
    request(
        &format!("{method} {target} HTTP/1.0"),
        &[
            ("Host", addr.to_string()),
            (
                "Content-Type",
                format!("multipart/form-data; boundary=\"{POCO_BOUNDARY}\""),
            ),
            ("Content-Length", body.len().to_string()),
        ],
        &body,
    )
}

/// A browser `FormData` POST/PUT from axios (OHIF), cross-origin.
pub fn browser_request(addr: SocketAddr, method: &str, target: &str, parts: &[Part]) -> Vec<u8> {
    let body = form(BROWSER_BOUNDARY, parts, false);
    request(
        &format!("{method} {target} HTTP/1.1"),
        &[
            ("Host", addr.to_string()),
            ("Connection", "keep-alive".into()),
            ("Content-Length", body.len().to_string()),
            ("accept", "multipart/form-data".into()),
            (
                "Content-Type",
                format!("multipart/form-data; boundary={BROWSER_BOUNDARY}"),
            ),
            ("Origin", "http://localhost:3000".into()),
            ("Referer", "http://localhost:3000/viewer/1.2.3".into()),
            ("Accept-Encoding", "gzip, deflate, br".into()),
        ],
        &body,
    )
}

// ---------------------------------------------------------------------------------------------------------
// Reply parsing
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct ReplyPart {
    pub headers: Vec<(String, String)>,
    pub name: Option<String>,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

impl ReplyPart {
    /// A file for Python's cgi (a `filename` parameter) and Poco (`filename="` or `octet-stream` anywhere).
    pub fn is_file(&self) -> bool {
        self.filename.is_some()
    }

    fn poco_thinks_file(&self) -> bool {
        self.headers
            .iter()
            .any(|(_, v)| v.contains("filename=\"") || v.contains("octet-stream"))
    }
}

fn parameter(value: &str, key: &str) -> Option<String> {
    // `key="..."` preceded by `;` or the start (so `name=` does not match inside `filename=`).
    value.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(key)).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The boundary parameter of a multipart Content-Type (quoted or not).
pub fn boundary_of(content_type: &str) -> String {
    assert!(
        content_type.to_ascii_lowercase().starts_with("multipart/"),
        "not multipart: {content_type}"
    );
    parameter(content_type, "boundary").unwrap_or_else(|| panic!("no boundary in {content_type}"))
}

/// Parses a multipart body strictly: it starts with `--B` CRLF (no preamble, as Poco requires), parts are
/// delimited by CRLF `--B`, the last delimiter is `--B--`.
pub fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<ReplyPart> {
    let boundary = boundary_of(content_type);
    assert!(
        boundary.bytes().all(|b| (b' '..=b'~').contains(&b))
            && boundary.len() <= 200
            && !boundary.ends_with(' '),
        "cgi needs a printable boundary: {boundary:?}"
    );
    let opening = format!("--{boundary}\r\n");
    assert!(
        body.starts_with(opening.as_bytes()),
        "body must start with {opening:?}: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(80)])
    );
    let delimiter = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    let mut rest = &body[opening.len()..];
    loop {
        let end = find(rest, delimiter.as_bytes()).expect("a closing delimiter");
        let part = &rest[..end];
        let head_end = find(part, b"\r\n\r\n")
            .map(|at| (at, at + 4))
            .unwrap_or_else(|| {
                // A part without headers starts with the blank line itself.
                assert!(part.starts_with(b"\r\n"), "part head");
                (0, 2)
            });
        let head = std::str::from_utf8(&part[..head_end.0]).expect("ASCII part headers");
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("part header");
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let disposition = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-disposition"))
            .map(|(_, v)| v.clone())
            .expect("every part has a Content-Disposition");
        let filename = disposition
            .contains("filename=\"")
            .then(|| parameter(&disposition, "filename").unwrap());
        parts.push(ReplyPart {
            name: parameter(&disposition, "name"),
            filename,
            content_type: headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.clone()),
            headers,
            data: part[head_end.1..].to_vec(),
        });
        rest = &rest[end + delimiter.len()..];
        if rest.starts_with(b"--") {
            assert!(
                rest == b"--\r\n" || rest == b"--",
                "only a CRLF may follow the closing delimiter: {:?}",
                String::from_utf8_lossy(rest)
            );
            break;
        }
        assert!(rest.starts_with(b"\r\n"), "CRLF after a delimiter");
        rest = &rest[2..];
    }
    parts
}

/// The AIAA success reply as Python, Slicer and C++ read it: `params` JSON text part + exactly one file part.
pub struct AiaaReply {
    pub params: Value,
    pub filename: String,
    pub file: Vec<u8>,
}

pub fn aiaa_multipart(reply: &Reply) -> AiaaReply {
    reply.ok();
    let content_type = reply.content_type();
    assert!(
        content_type.contains("multipart"),
        "multipart reply expected, got {content_type}"
    );
    let parts = parse_multipart(content_type, &reply.body);
    let files: Vec<&ReplyPart> = parts.iter().filter(|p| p.is_file()).collect();
    assert_eq!(files.len(), 1, "exactly one file part: {parts:?}");
    assert!(files[0].poco_thinks_file());
    let disposition = files[0]
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-disposition"))
        .unwrap();
    assert!(
        disposition.1.contains("filename=\""),
        "the file part's filename is quoted"
    );
    let texts: Vec<&ReplyPart> = parts.iter().filter(|p| !p.is_file()).collect();
    assert!(
        texts.iter().all(|p| !p.poco_thinks_file()),
        "Poco would take a text part for a file"
    );
    let params = texts
        .iter()
        .find(|p| p.name.as_deref() == Some("params"))
        .expect("a params text part");
    assert_eq!(params.content_type.as_deref(), Some("application/json"));
    // Poco returns the last text part as the JSON string.
    assert_eq!(texts.last().unwrap().name.as_deref(), Some("params"));
    AiaaReply {
        params: serde_json::from_slice(&params.data).expect("params part is JSON"),
        filename: files[0].filename.clone().unwrap(),
        file: files[0].data.clone(),
    }
}

/// `{"error":{"message":[<non-empty string>],"type":<string>},"success":false}` with `status`, a JSON
/// Content-Type and a message containing `keyword` (case-insensitive); returns the message.
pub fn assert_aiaa_error(reply: &Reply, status: u16, keyword: &str) -> String {
    assert_eq!(reply.status, status, "status for {}", reply.text());
    let body = reply.json();
    let object = body.as_object().expect("error body is an object");
    assert_eq!(object.len(), 2, "only error and success: {body}");
    aiaa_error_message(reply, keyword)
}

/// What `GET`/`DELETE /session/{id}` answer for an unknown session, which AIAA's and MONAI Label's clients
/// request with the same bytes: 404 (MONAI Label's status; AIAA's clients take any non-200), with AIAA's
/// error body and FastAPI's `detail` beside it, both naming the session.
pub fn assert_unknown_session(reply: &Reply, id: &str) {
    assert_eq!(reply.status, 404, "status for {}", reply.text());
    let body = reply.json();
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(3),
        "error, success and detail: {body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains(id)),
        "detail names the session: {body}"
    );
    assert_eq!(
        aiaa_error_message(reply, id),
        body["detail"].as_str().unwrap()
    );
}

pub fn aiaa_error_message(reply: &Reply, keyword: &str) -> String {
    assert!(
        reply.content_type().starts_with("application/json"),
        "JSON error type: {}",
        reply.content_type()
    );
    let body = reply.json();
    assert_eq!(body["success"], Value::Bool(false), "{body}");
    let error = body["error"].as_object().expect("error object");
    assert!(
        error["type"].as_str().is_some_and(|t| !t.is_empty()),
        "error.type: {body}"
    );
    let messages = error["message"]
        .as_array()
        .expect("error.message is an array");
    assert!(!messages.is_empty(), "{body}");
    let message = messages[0].as_str().expect("message strings").to_owned();
    assert!(!message.is_empty(), "{body}");
    assert!(
        message
            .to_ascii_lowercase()
            .contains(&keyword.to_ascii_lowercase()),
        "message {message:?} should name {keyword:?}"
    );
    message
}

// ---------------------------------------------------------------------------------------------------------
// Mask checks
// ---------------------------------------------------------------------------------------------------------

/// Checks a NIfTI mask against the input it answers (decompressed `input_raw`): same shape and affine, same
/// header bytes except datatype/bitpix, vox_offset/scl and cal, values in {0, 1}, non-zero only on slice `k`.
/// Returns the non-zero voxels `[i, j, k]`.
pub fn check_nifti_mask(mask: &[u8], input_raw: &[u8], k: usize, gzipped: bool) -> Vec<[usize; 3]> {
    assert_eq!(
        mask.starts_with(&[0x1f, 0x8b]),
        gzipped,
        "gzip magic iff a .nii.gz mask"
    );
    let mask_raw = if gzipped { gunzip(mask) } else { mask.to_vec() };
    let input = nifti_io::decode(input_raw, LIMITS).expect("input decodes");
    let decoded = nifti_io::decode(mask, LIMITS).expect("the mask is a valid NIfTI-1 file");
    assert_eq!(decoded.geometry.shape, input.geometry.shape);
    assert_eq!(decoded.geometry.affine, input.geometry.affine);
    for n in 0..348 {
        if !((68..76).contains(&n) || (108..120).contains(&n) || (124..132).contains(&n)) {
            assert_eq!(
                mask_raw[n], input_raw[n],
                "header byte {n} differs from the input's"
            );
        }
    }
    let values: Vec<u16> = match &decoded.data {
        VoxelData::U8(v) => v.iter().map(|&x| x as u16).collect(),
        VoxelData::U16(v) => v.clone(),
        other => panic!("mask datatype {}", other.datatype_name()),
    };
    nonzero_voxels(&values, decoded.geometry.shape, k)
}

/// Non-zero voxels of an i-fastest volume, asserting values in {0, 1} and that they all lie on slice `k`.
pub fn nonzero_voxels(values: &[u16], shape: [usize; 3], k: usize) -> Vec<[usize; 3]> {
    let [h, w, d] = shape;
    assert_eq!(values.len(), h * w * d);
    let mut set = Vec::new();
    for (n, &v) in values.iter().enumerate() {
        assert!(v <= 1, "mask value {v} at {n}");
        if v == 1 {
            let voxel = [n % h, (n / h) % w, n / (h * w)];
            assert_eq!(
                voxel[2], k,
                "non-zero voxel {voxel:?} off the clicked slice {k}"
            );
            set.push(voxel);
        }
    }
    set
}

/// The mask is a small blob around `click`: some voxel within 1 of it, none further than 3 (in-plane).
pub fn assert_blob_around(set: &[[usize; 3]], click: [usize; 3]) {
    let distance = |v: &[usize; 3]| v[0].abs_diff(click[0]).max(v[1].abs_diff(click[1]));
    assert!(
        set.iter().any(|v| distance(v) <= 1),
        "no mask voxel at the click {click:?}: {set:?}"
    );
    assert!(
        set.iter().all(|v| distance(v) <= 3),
        "mask voxels far from the click {click:?}: {set:?}"
    );
}

/// A parsed NRRD file (the header fields OHIF's nrrd-js reads, and the inflated voxel bytes).
pub struct Nrrd {
    pub fields: Vec<(String, String)>,
    pub data: Vec<u8>,
}

impl Nrrd {
    pub fn field(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("NRRD field {key}"))
    }
}

pub fn parse_nrrd(file: &[u8]) -> Nrrd {
    assert!(
        file.starts_with(b"NRRD0004\n"),
        "NRRD magic: {:?}",
        String::from_utf8_lossy(&file[..file.len().min(16)])
    );
    let end = find(file, b"\n\n").expect("NRRD header ends with a blank line");
    let head = std::str::from_utf8(&file[..end]).expect("ASCII NRRD header");
    let fields = head
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("NRRD field line {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect::<Vec<_>>();
    let raw = &file[end + 2..];
    let nrrd = Nrrd {
        fields,
        data: Vec::new(),
    };
    let data = match nrrd.field("encoding") {
        "gzip" | "gz" => gunzip(raw),
        "raw" => raw.to_vec(),
        other => panic!("NRRD encoding {other}"),
    };
    Nrrd { data, ..nrrd }
}

/// The CT fixture re-stacked to `slices` slices (cycling its own slices), as an uncompressed `.nii`.
pub fn restacked_ct(slices: usize) -> Vec<u8> {
    let raw = &ct().raw;
    let offset = f32::from_le_bytes(raw[108..112].try_into().unwrap()) as usize;
    let [h, w, d] = ct().volume.geometry.shape;
    let plane = h * w * 2;
    let mut out = raw[..offset].to_vec();
    out[46..48].copy_from_slice(&(slices as i16).to_le_bytes());
    for k in 0..slices {
        let source = k % d;
        out.extend_from_slice(&raw[offset + source * plane..offset + (source + 1) * plane]);
    }
    out
}
