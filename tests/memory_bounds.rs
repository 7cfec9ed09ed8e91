//! Bounded memory under hostile and heavy load (issue 14): a gzip bomb, concurrent uploads far above the
//! in-flight budget, buffered uploads held against the budget and given back on every end, and clicks with a
//! session answered while large uploads are in flight. The peak-RSS tests run the real server binary in a
//! process of its own and read its peak from /proc (after resetting it), so nothing else in the test binary
//! counts. Each test fails when its protection is switched off.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use flate2::{Compress, Compression, FlushCompress};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------------------
// The server in a process of its own
// ---------------------------------------------------------------------------------------------------------

impl ServerProcess {
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc status"))
    }

    /// Resets the peak resident size to the current one (`clear_refs` 5) and returns the current one, in bytes.
    fn reset_peak(&self) -> u64 {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").unwrap();
        self.status_kib("VmRSS:") * 1024
    }

    /// Peak resident size since the last reset, in bytes.
    fn peak(&self) -> u64 {
        self.status_kib("VmHWM:") * 1024
    }
}

// ---------------------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------------------

/// A valid 64 × 64 × 8 int16 NIfTI, then `extra` bytes of zeros, as one gzip stream: the first 4 MiB of
/// deflate hold 4 GiB. Built from one fully flushed deflate segment of 1 MiB zeros repeated, which decodes on
/// its own, so the stream is made in milliseconds; the trailer's CRC and size are those of the whole data.
fn gzip_bomb(extra: u64) -> Vec<u8> {
    let file = nifti_i16([64, 64, 8], |i, j, k| (i + j + k) as i16);
    let mut crc = flate2::Crc::new();
    crc.update(&file);
    let segment = |data: &[u8], flush: FlushCompress| {
        let mut deflate = Compress::new(Compression::best(), false);
        let mut out = Vec::with_capacity(data.len() + 1024);
        deflate.compress_vec(data, &mut out, flush).unwrap();
        out
    };
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    gz.extend(segment(&file, FlushCompress::Full));
    let zeros = vec![0u8; MIB as usize];
    let zeros_segment = segment(&zeros, FlushCompress::Full);
    for _ in 0..extra / MIB {
        gz.extend_from_slice(&zeros_segment);
        crc.update(&zeros);
    }
    gz.extend(segment(&[], FlushCompress::Finish));
    gz.extend_from_slice(&crc.sum().to_le_bytes());
    gz.extend_from_slice(&((file.len() as u64 + extra) as u32).to_le_bytes());
    gz
}

/// A little-endian int16 NIfTI-1 file of `shape` with voxel values `value(i, j, k)`.
fn nifti_i16(shape: [usize; 3], value: impl Fn(usize, usize, usize) -> i16) -> Vec<u8> {
    let mut file = ct().raw[..352].to_vec();
    for (n, &d) in shape.iter().enumerate() {
        file[42 + 2 * n..44 + 2 * n].copy_from_slice(&(d as i16).to_le_bytes());
    }
    file[70..72].copy_from_slice(&4i16.to_le_bytes());
    file[72..74].copy_from_slice(&16i16.to_le_bytes());
    file[108..112].copy_from_slice(&352f32.to_le_bytes());
    file[112..116].copy_from_slice(&1f32.to_le_bytes());
    file[116..120].copy_from_slice(&0f32.to_le_bytes());
    file.reserve(shape.iter().product::<usize>() * 2);
    for k in 0..shape[2] {
        for j in 0..shape[1] {
            for i in 0..shape[0] {
                file.extend_from_slice(&value(i, j, k).to_le_bytes());
            }
        }
    }
    file
}

fn click_params(i: usize, j: usize, k: usize) -> String {
    format!(r#"{{"foreground": [[{i}, {j}, {k}]], "background": []}}"#)
}

fn session_request(addr: SocketAddr, file: &[u8]) -> Vec<u8> {
    python_request(
        addr,
        "PUT",
        "/session/",
        &[
            text_part("params", "{}"),
            file_part("image", "/data/ct.nii", file),
        ],
    )
}

fn click_request(addr: SocketAddr, params: &str, file: &[u8], params_first: bool) -> Vec<u8> {
    let params_part = text_part("params", params);
    let file_part = file_part("datapoint", "/data/ct.nii", file);
    let parts = if params_first {
        [params_part, file_part]
    } else {
        [file_part, params_part]
    };
    python_request(addr, "POST", "/v1/deepgrow?model=deepgrow_2d", &parts)
}

fn health(addr: SocketAddr) -> serde_json::Value {
    get(addr, "/health").ok().json()
}

/// Waits until no request holds bytes against the budget (the count comes down when requests end).
fn wait_budget_free(addr: SocketAddr) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(addr);
        if h["inflight_bytes"] == 0 || Instant::now() > deadline {
            return h;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_4_gib_gzip_bomb_costs_under_100_mib_and_is_refused_as_a_session() {
    // No sweeps during the test: a sweep hands the network's activations back to the OS, and the next click
    // would page them in again (about 170 MiB that have nothing to do with the upload).
    let server = ServerProcess::start(&["--sweep-interval", "3600"]);
    let bomb = gzip_bomb(4 << 30);
    assert!(bomb.len() < 8 << 20, "the bomb is {} bytes", bomb.len());
    // One click on a plain volume of the same geometry first, so that the network's memory is resident.
    let plain = gzip_bomb(0);
    send_raw(
        server.addr,
        click_request(server.addr, &click_params(30, 30, 4), &plain, true),
    )
    .ok();
    // As a session (a whole volume): refused once the stream goes on past the image.
    let before = server.reset_peak();
    let reply = send_raw(server.addr, session_request(server.addr, &bomb));
    let rise = server.peak().saturating_sub(before);
    eprintln!("4 GiB bomb as a session: peak RSS +{} MiB", rise / MIB);
    assert_aiaa_error(&reply, 422, "goes on past");
    assert!(rise < 100 * MIB, "peak RSS rose {} MiB", rise / MIB);
    // As an upload click: only the clicked slice is inflated, and the click is answered.
    let before = server.reset_peak();
    let reply = send_raw(
        server.addr,
        click_request(server.addr, &click_params(30, 30, 4), &bomb, true),
    );
    let rise = server.peak().saturating_sub(before);
    eprintln!(
        "4 GiB bomb as an upload click: peak RSS +{} MiB",
        rise / MIB
    );
    reply.ok();
    assert!(rise < 100 * MIB, "peak RSS rose {} MiB", rise / MIB);
    assert_eq!(health(server.addr)["inflight_bytes"], 0);
}

#[test]
fn concurrent_uploads_far_above_the_budget_stay_within_it_and_all_get_a_status() {
    // 12 concurrent 40 MiB uploads (480 MiB) against a 96 MiB budget, with decode workers enough for all of
    // them: only the budget keeps them from being held at once. Session uploads are decoded as they arrive;
    // clicks that send their params after the file are buffered first.
    const BUDGET: u64 = 96 * MIB;
    const SESSIONS: u64 = 48 * MIB;
    let budget = BUDGET.to_string();
    let sessions = SESSIONS.to_string();
    let server = ServerProcess::start(&[
        "--max-inflight-bytes",
        &budget,
        "--session-memory-bytes",
        &sessions,
        "--decode-workers",
        "12",
        "--queue",
        "12",
        "--inflight-wait",
        "0.5",
        // one network run at a time, and no sweeps: its memory stays resident from the first click on
        "--workers",
        "1",
        "--sweep-interval",
        "3600",
    ]);
    let shape = [512, 512, 80];
    let file = Arc::new(nifti_i16(shape, |i, j, k| {
        ((i * 3 + j * 5 + k) % 2000) as i16 - 1000
    }));
    send_raw(
        server.addr,
        click_request(server.addr, &click_params(30, 30, 4), &gzip_bomb(0), true),
    )
    .ok();
    let before = server.reset_peak();
    let barrier = Arc::new(Barrier::new(12));
    let clients: Vec<_> = (0..12)
        .map(|n| {
            let (file, barrier, addr) = (file.clone(), barrier.clone(), server.addr);
            std::thread::spawn(move || {
                let request = match n % 3 {
                    0 | 1 => session_request(addr, &file),
                    _ => click_request(addr, &click_params(256, 256, 40), &file, false),
                };
                barrier.wait();
                send_then_read(addr, &request).map(|r| (r.status, r.text()))
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for client in clients {
        let (status, body) = client
            .join()
            .unwrap()
            .expect("every client gets a reply, never a reset");
        assert!(status == 200 || status == 503, "status {status}: {body}");
        statuses.push(status);
    }
    let rise = server.peak().saturating_sub(before);
    eprintln!(
        "statuses {statuses:?}; peak RSS +{} MiB (budget {} + sessions {} MiB)",
        rise / MIB,
        BUDGET / MIB,
        SESSIONS / MIB
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    // The margin: the upload pipes, the clicks' 20 MiB mask replies, allocator slack (measured 30-90 MiB over
    // budget + sessions; without the budget, 12 decodes of 40 MiB at once would put it near 500 MiB).
    let margin = 128 * MIB;
    assert!(
        rise < BUDGET + SESSIONS + margin,
        "peak RSS rose {} MiB, over the budget {} + sessions {} + margin {} MiB",
        rise / MIB,
        BUDGET / MIB,
        SESSIONS / MIB,
        margin / MIB
    );
    assert_eq!(wait_budget_free(server.addr)["inflight_bytes"], 0);
}

#[test]
fn buffered_uploads_wait_for_the_budget_then_get_503_and_give_their_bytes_back() {
    let server = start(
        config(&["--max-inflight-bytes", "52428800", "--inflight-wait", "0.3"]),
        fake_registry(),
    );
    let addr = server.addr;
    let file = nifti_i16([512, 512, 80], |_, _, k| k as i16);
    // A client that sends its params after a 40 MiB file, and stops half-way: its bytes are held.
    let request = click_request(addr, &click_params(10, 10, 3), &file, false);
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(&request[..request.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(addr)["inflight_bytes"].as_u64().unwrap() < 40 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(health(addr)["inflight_bytes"].as_u64().unwrap() >= 40 * MIB);
    // A second such upload does not fit beside it: it waits, then gets 503 (after its body was read).
    let started = Instant::now();
    let reply = send_then_read(
        addr,
        &click_request(addr, &click_params(10, 10, 3), &file, false),
    )
    .expect("the refused client could write its whole upload");
    assert_aiaa_error(&reply, 503, "memory budget");
    assert!(reply.header("retry-after").is_some());
    assert!(started.elapsed() >= Duration::from_millis(300));
    // One that could never fit is refused at once with 413.
    let big = nifti_i16([512, 512, 120], |_, _, _| 0);
    let reply = send_then_read(
        addr,
        &click_request(addr, &click_params(1, 1, 1), &big, false),
    )
    .unwrap();
    assert_aiaa_error(&reply, 413, "--max-inflight-bytes");
    // A click with a session needs no budget: it is answered while the budget is taken.
    let session = send_raw(addr, session_request(addr, &ct().gz)).ok().json();
    let id = session["session_id"].as_str().unwrap().to_owned();
    let [i, j, k] = ct().liver;
    let reply = send_raw(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model=deepgrow_2d&session_id={id}"),
            &[text_part("params", &click_params(i, j, k))],
        ),
    );
    reply.ok();
    // The stalled client goes away: its bytes come back.
    drop(stalled);
    assert_eq!(wait_budget_free(addr)["inflight_bytes"], 0);
    // A chunked upload (no Content-Length) is counted as it arrives and refused when it outgrows the budget.
    let large = nifti_i16([512, 512, 160], |_, _, _| 1);
    let request = click_request(addr, &click_params(10, 10, 3), &large, false);
    let head_end = head_length(&request);
    let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
    let length_line = format!("content-length: {}\r\n", request.len() - head_end);
    assert!(head.contains(&length_line), "{head}");
    let mut chunked = head
        .replace(&length_line, "Transfer-Encoding: chunked\r\n")
        .into_bytes();
    for piece in request[head_end..].chunks(1 << 20) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = send_then_read(addr, &chunked).unwrap();
    assert!(
        reply.status == 413 || reply.status == 503,
        "{} {}",
        reply.status,
        reply.text()
    );
    assert_eq!(wait_budget_free(addr)["inflight_bytes"], 0);
}

#[test]
fn clicks_with_a_session_are_answered_while_large_uploads_trickle_in() {
    // Four session uploads arrive slowly (40 MiB at 4 MiB per 100 ms) while a click with a session is sent:
    // the click waits for neither the uploads' decode workers nor their bytes.
    let server = start(config(&["--decode-workers", "2"]), fake_registry());
    let addr = server.addr;
    let session = send_raw(addr, session_request(addr, &ct().gz)).ok().json();
    let id = session["session_id"].as_str().unwrap().to_owned();
    let file = Arc::new(nifti_i16([512, 512, 80], |i, _, _| i as i16));
    let uploads: Vec<_> = (0..4)
        .map(|_| {
            let file = file.clone();
            std::thread::spawn(move || {
                let request = session_request(addr, &file);
                let mut stream = TcpStream::connect(addr).unwrap();
                for piece in request.chunks(4 << 20) {
                    stream.write_all(piece).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
                let reply = read_reply(&mut stream);
                (reply.status, Instant::now())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let [i, j, k] = ct().liver;
    let click = python_request(
        addr,
        "POST",
        &format!("/v1/deepgrow?model=deepgrow_2d&session_id={id}"),
        &[text_part("params", &click_params(i, j, k))],
    );
    let mut answered = Vec::new();
    for _ in 0..3 {
        send_raw(addr, click.clone()).ok();
        answered.push(Instant::now());
    }
    let in_flight = health(addr);
    assert!(
        in_flight["decode_admitted"].as_u64().unwrap() > 0,
        "the uploads were still arriving when the clicks were answered: {in_flight}"
    );
    for upload in uploads {
        let (status, done) = upload.join().unwrap();
        assert_eq!(status, 200);
        assert!(
            answered.iter().all(|&t| t < done),
            "a click was answered only after an upload finished"
        );
    }
}

#[test]
fn a_broken_off_stream_upload_is_a_client_error_and_frees_its_place() {
    // A session upload that stops arriving: the body timeout answers for it, and the decode place returns.
    let server = start(
        config(&[
            "--body-timeout",
            "0.5",
            "--decode-workers",
            "1",
            "--queue",
            "0",
        ]),
        fake_registry(),
    );
    let addr = server.addr;
    let request = session_request(addr, &ct().raw);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&request[..request.len() / 2]).unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 408, "{}", reply.text());
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(addr)["decode_admitted"] != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The one decode place is free again: the next upload is decoded.
    send_raw(addr, session_request(addr, &ct().raw)).ok();
}
