//! Hostile clients and faults (issue 6): slow headers, stalled and trickled bodies, the connection cap, the
//! optional bearer token, and a panicking engine. Each test fails when its protection is switched off.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use deepgrow_server::engine::{Engine, EngineError};
use deepgrow_server::models::Registry;
use ndarray::{Array2, Array4};

const MODEL: &str = "deepgrow_2d";

fn liver_params() -> String {
    let [i, j, k] = ct().liver;
    format!(r#"{{"foreground": [[{i}, {j}, {k}]], "background": []}}"#)
}

fn click_request(addr: SocketAddr) -> Vec<u8> {
    python_request(
        addr,
        "POST",
        &format!("/v1/deepgrow?model={MODEL}"),
        &[
            text_part("params", &liver_params()),
            file_part("datapoint", "/data/in.nii.gz", &ct().gz),
        ],
    )
}

/// Reads until the server closes the connection or `within` passes; true when it closed.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn headers_sent_byte_by_byte_are_cut_off_at_the_header_timeout() {
    let server = start(config(&["--header-read-timeout", "0.5"]), fake_registry());
    let addr = server.addr;
    let mut slow = TcpStream::connect(addr).unwrap();
    let mut writer = slow.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    // A slowloris client: one byte of an endless header every 50 ms.
    let trickle = std::thread::spawn(move || {
        let head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
            if stop_writer.load(Ordering::Relaxed) || writer.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // Other clients are served meanwhile.
    get(addr, "/health").ok();
    let started = Instant::now();
    assert!(
        closed_within(&mut slow, Duration::from_secs(10)),
        "the trickling connection was still open after 10 s"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    get(addr, "/health").ok();
}

#[test]
fn a_stalled_upload_gets_408_at_the_body_timeout() {
    let server = start(
        config(&["--body-timeout", "0.5", "--request-timeout", "60"]),
        fake_registry(),
    );
    let addr = server.addr;
    let request = click_request(addr);
    // Headers and a first part of the body, then silence.
    let head_end = head_length(&request);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&request[..head_end + 1000]).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let reply = read_reply(&mut stream);
    assert_aiaa_error(&reply, 408, "body timeout");
    assert_eq!(reply.header("connection"), Some("close"));
    // The server is still fine.
    let ok = send(addr, click_request(addr));
    aiaa_multipart(&ok);
}

#[test]
fn a_trickled_upload_gets_408_at_the_request_timeout() {
    let server = start(
        config(&["--body-timeout", "5", "--request-timeout", "1"]),
        fake_registry(),
    );
    let addr = server.addr;
    let request = click_request(addr);
    let head_end = head_length(&request);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&request[..head_end]).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let body = request[head_end..].to_vec();
    // 100 bytes every 50 ms: never idle for the body timeout, far too slow for the request timeout.
    let trickle = std::thread::spawn(move || {
        for chunk in body.chunks(100) {
            if writer.write_all(chunk).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let started = Instant::now();
    let reply = read_reply(&mut stream);
    assert_aiaa_error(&reply, 408, "--request-timeout");
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(stream);
    trickle.join().unwrap();
}

#[test]
fn connections_beyond_max_connections_wait_for_a_free_one() {
    let server = start(config(&["--max-connections", "1"]), fake_registry());
    let addr = server.addr;
    // The first client keeps its (keep-alive) connection open after a request.
    let mut first = TcpStream::connect(addr).unwrap();
    first
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_reply(&mut first).ok();

    let mut second = TcpStream::connect(addr).unwrap();
    second
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut byte = [0u8; 1];
    match second.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the second connection was served past the cap: {other:?}"),
    }
    drop(first);
    read_reply(&mut second).ok();
}

#[test]
fn the_bearer_token_guards_everything_but_the_health_probes() {
    let server = start(config(&["--auth-token", "s3cret-token"]), fake_registry());
    let addr = server.addr;
    let with = |token: Option<&str>, target: &str| {
        let mut headers = vec![("Host", addr.to_string()), ("Connection", "close".into())];
        if let Some(token) = token {
            headers.push(("Authorization", token.to_owned()));
        }
        send(
            addr,
            request(&format!("GET {target} HTTP/1.1"), &headers, b""),
        )
    };
    for token in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("Basic s3cret-token"),
    ] {
        let reply = with(token, "/v1/models");
        assert_aiaa_error(&reply, 401, "bearer");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    with(Some("Bearer s3cret-token"), "/v1/models").ok();
    with(Some("bearer s3cret-token"), "/v1/models").ok();
    with(None, "/health").ok();
    with(None, "/ready").ok();
    // A CORS preflight carries no credentials and must pass.
    let preflight = send_raw(
        addr,
        request(
            "OPTIONS /v1/deepgrow HTTP/1.1",
            &[
                ("Host", addr.to_string()),
                ("Origin", "http://localhost:3000".into()),
                ("Access-Control-Request-Method", "POST".into()),
                ("Access-Control-Request-Headers", "authorization".into()),
            ],
            b"",
        ),
    );
    assert_eq!(preflight.status, 200, "{}", preflight.text());

    // An upload without the token is read to its end before the 401, so the client sees the reply.
    let unauthorised = send_then_read(addr, &click_request(addr)).expect("whole upload written");
    assert_aiaa_error(&unauthorised, 401, "bearer");
    let mut authorised = click_request(addr);
    let at = authorised.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    authorised.splice(
        at..at,
        b"Authorization: Bearer s3cret-token\r\n".iter().copied(),
    );
    aiaa_multipart(&send(addr, authorised));
}

/// Panics on its first inference, then answers like [`GuidanceEngine`].
struct PanicOnceEngine {
    panicked: AtomicBool,
    inner: GuidanceEngine,
}

impl Engine for PanicOnceEngine {
    fn input_size(&self) -> [usize; 2] {
        self.inner.size
    }

    fn infer(&self, input: Array4<f32>) -> Result<Array2<f32>, EngineError> {
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected engine panic");
        }
        self.inner.infer(input)
    }
}

#[test]
fn a_panic_in_a_request_is_a_500_and_the_server_keeps_serving() {
    let engine = Arc::new(PanicOnceEngine {
        panicked: AtomicBool::new(false),
        inner: GuidanceEngine { size: [256, 256] },
    });
    let server = start(
        config(&["--workers", "1", "--queue", "0"]),
        Registry::new(vec![model(MODEL, "deepgrow", &[], engine)]),
    );
    let addr = server.addr;
    let crashed = send(addr, click_request(addr));
    assert_aiaa_error(&crashed, 500, "internal error");
    assert!(
        !crashed.text().contains("injected"),
        "panic details stay in the log: {}",
        crashed.text()
    );
    get(addr, "/health").ok();
    // The worker permit came back: with one worker and no queue, a leak would make this a 503.
    let reply = send(addr, click_request(addr));
    assert_blob_around(
        &check_nifti_mask(&aiaa_multipart(&reply).file, &ct().raw, CLICK_SLICE, true),
        ct().liver,
    );
}

#[test]
fn a_small_gzip_bomb_is_413_at_the_decompressed_limit() {
    let server = start(
        config(&["--max-decompressed-bytes", "50000000"]),
        fake_registry(),
    );
    let addr = server.addr;
    // The fixture's header claiming 512 x 512 x 400 int16 (200 MiB of zeros): a few hundred KB of gzip.
    let raw = &ct().raw;
    let vox_offset = f32::from_le_bytes(raw[108..112].try_into().unwrap()) as usize;
    let mut header = raw[..vox_offset].to_vec();
    for (n, d) in [512i16, 512, 400].iter().enumerate() {
        header[42 + 2 * n..44 + 2 * n].copy_from_slice(&d.to_le_bytes());
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..200 {
        encoder.write_all(&zeros).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes of gzip", bomb.len());

    let reply = send(
        addr,
        python_request(
            addr,
            "PUT",
            "/session/",
            &[file_part("image", "bomb.nii.gz", &bomb)],
        ),
    );
    assert_aiaa_error(&reply, 413, "50000000 bytes");
    let reply = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}"),
            &[
                text_part("params", &liver_params()),
                file_part("datapoint", "bomb.nii.gz", &bomb),
            ],
        ),
    );
    assert_aiaa_error(&reply, 413, "limit");
    // A real volume under the limit still works.
    aiaa_multipart(&send(addr, click_request(addr)));
}
