//! Issue 13: a fleet of replicas sharing sessions through Debian's `redis-server` (started here on a free
//! loopback port), `/metrics`, the SIGTERM drain, and `tools/fleet.py` with nginx as the load balancer.
//!
//! Where redis-server (or nginx) is not installed the tests that need it are skipped with a note, unless
//! `DEEPGROW_REQUIRE_REDIS` (`DEEPGROW_REQUIRE_NGINX`) is set, as `.ci/run` does.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MODEL: &str = "deepgrow_2d";

/// The tests that start server processes (each loads and warms the model) take turns: on two cores, several
/// at once would stretch the timings the SIGTERM and fleet tests read.
static PROCESSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    PROCESSES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a test's peer program is installed; where it is not, the test skips with a note, unless the CI
/// variable `required_by` is set, which makes that a failure.
fn available(program: &str, required_by: &str, hint: &str) -> bool {
    if installed(program) {
        return true;
    }
    assert!(
        std::env::var_os(required_by).is_none(),
        "{required_by} is set but {program} is not installed"
    );
    eprintln!("SKIPPED: {program} is not installed ({hint})");
    false
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {program} || test -x /usr/sbin/{program}"),
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn redis_available() -> bool {
    available(
        "redis-server",
        "DEEPGROW_REQUIRE_REDIS",
        "apt-get install redis-server; .ci/run does",
    )
}

/// A throw-away redis-server: no persistence, on its own port.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start() -> Option<Redis> {
        if !redis_available() {
            return None;
        }
        Some(Redis::on_port(free_port()))
    }

    fn on_port(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis.command("PING") != "+PONG" {
            assert!(Instant::now() < deadline, "redis-server answers PING");
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One inline command's first reply line ("" when Redis cannot be reached).
    fn command(&self, command: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if stream
            .write_all(format!("{command}\r\n").as_bytes())
            .is_err()
        {
            return String::new();
        }
        let mut reply = [0u8; 256];
        let n = stream.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replica: the server binary in a process of its own (so that it can be SIGKILLed), on one inference thread.
fn replica(args: &[&str]) -> ServerProcess {
    replica_with_env(args, &[])
}

fn replica_with_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> ServerProcess {
    let args: Vec<&str> = ["--inference-threads", "1"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    ServerProcess::start_with_env(&args, env)
}

/// The status of a GET, or `None` while nothing listens.
fn try_get(addr: SocketAddr, target: &str) -> Option<u16> {
    let request = request(
        &format!("GET {target} HTTP/1.1"),
        &[("Host", addr.to_string()), ("Connection", "close".into())],
        b"",
    );
    send_then_read(addr, &request)
        .ok()
        .map(|reply| reply.status)
}

fn create_session(addr: SocketAddr, expiry: u64) -> Reply {
    send(
        addr,
        python_request(
            addr,
            "PUT",
            &format!("/session/?expiry={expiry}"),
            &[file_part("image", "/data/in.nii.gz", &ct().gz)],
        ),
    )
}

fn session_of(reply: &Reply) -> String {
    reply.ok();
    reply.json()["session_id"].as_str().unwrap().to_owned()
}

/// A foreground click on the fixture's liver.
fn click(addr: SocketAddr, session: &str) -> Reply {
    let [i, j, k] = ct().liver;
    click_at(addr, session, [i, j, k])
}

fn click_at(addr: SocketAddr, session: &str, [i, j, k]: [usize; 3]) -> Reply {
    let params = format!(r#"{{"foreground":[[{i},{j},{k}]],"background":[]}}"#);
    send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/v1/deepgrow?model={MODEL}&session_id={session}"),
            &[text_part("params", &params)],
        ),
    )
}

/// AIAA's answer to a click on a session that is gone: 440.
fn assert_expired_click(reply: &Reply, session: &str) {
    let message = assert_aiaa_error(reply, 440, "unknown or has expired");
    assert!(message.contains(session), "{message}");
}

fn mask(reply: &Reply) -> Vec<u8> {
    aiaa_multipart(reply).file
}

fn metrics(addr: SocketAddr) -> String {
    let reply = get(addr, "/metrics");
    reply.ok();
    assert!(
        reply
            .content_type()
            .starts_with("application/openmetrics-text"),
        "{}",
        reply.content_type()
    );
    reply.text()
}

/// The value of the one sample `name{labels...}` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn a_session_is_served_by_every_replica_and_outlives_the_one_that_made_it() {
    let _turn = one_at_a_time();
    let Some(redis) = Redis::start() else { return };
    let store = redis.url();
    let flags = ["--session-store", store.as_str()];
    let a = replica(&flags);
    let b = replica(&flags);

    let session = session_of(&create_session(a.addr, 600));
    let from_a = mask(&click(a.addr, &session));
    let [_, _, k] = ct().liver;
    check_nifti_mask(&from_a, &ct().raw, k, true);
    assert_eq!(
        mask(&click(b.addr, &session)),
        from_a,
        "B's mask of A's session"
    );

    // the replica that created it dies; the session lives on, from B and from a replica started afterwards
    a.kill();
    assert_eq!(mask(&click(b.addr, &session)), from_a);
    let c = replica(&flags);
    assert_eq!(mask(&click(c.addr, &session)), from_a, "a cache miss");
    assert_eq!(mask(&click(c.addr, &session)), from_a, "a cache hit");
    let info = get(c.addr, &format!("/session/{session}"));
    info.ok();
    assert_eq!(
        info.json()["meta"]["shape"][2],
        ct().volume.geometry.shape[2]
    );

    let scraped = metrics(c.addr);
    assert_eq!(
        sample(
            &scraped,
            "deepgrow_session_cache_total",
            &[r#"result="miss""#]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &scraped,
            "deepgrow_session_cache_total",
            &[r#"result="hit""#]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&scraped, "deepgrow_session_fetch_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(sample(&scraped, "deepgrow_sessions", &[]), Some(1.0));
    assert_eq!(
        sample(
            &scraped,
            "deepgrow_http_requests_total",
            &[
                r#"route="/v1/deepgrow""#,
                r#"status="200""#,
                r#"method="POST""#
            ]
        ),
        Some(2.0)
    );
    assert!(
        scraped.contains(r#"deepgrow_model_info{name="deepgrow_2d""#),
        "{scraped}"
    );

    // deleted through B: gone from C as well, although C holds its volume
    delete(b.addr, &format!("/session/{session}")).ok();
    assert_expired_click(&click(c.addr, &session), &session);
    assert_eq!(get(c.addr, &format!("/session/{session}")).status, 404);
    assert_eq!(
        redis.command(&format!("EXISTS deepgrow:session:{session}")),
        ":0"
    );
}

/// `rediss://`: Debian's redis-server on a TLS port with a certificate of a CA made here. A replica that trusts
/// the CA (`SSL_CERT_FILE`) keeps its sessions there; one that does not gets a 503 that says why.
#[test]
fn sessions_go_to_redis_over_tls_and_an_untrusted_certificate_is_refused() {
    if !redis_available() {
        return;
    }
    if !available(
        "openssl",
        "DEEPGROW_REQUIRE_REDIS",
        "the test's certificates need it",
    ) {
        return;
    }
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=deepgrow-test-ca",
    ]);
    std::fs::write(dir.path().join("san.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.pem",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    ]);
    let port = free_port();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &path("redis.pem"),
            "--tls-key-file",
            &path("redis.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no", "--dir", &path("")])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts with TLS");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server listens on its TLS port"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let store = format!("rediss://localhost:{port}/0");
    let flags = ["--session-store", store.as_str()];

    let trusting = replica_with_env(&flags, &[("SSL_CERT_FILE", &dir.path().join("ca.pem"))]);
    let session = session_of(&create_session(trusting.addr, 600));
    let [_, _, k] = ct().liver;
    check_nifti_mask(&mask(&click(trusting.addr, &session)), &ct().raw, k, true);
    get(trusting.addr, &format!("/session/{session}")).ok();

    let untrusting = replica(&flags);
    let message = assert_aiaa_error(&click(untrusting.addr, &session), 503, "session store");
    assert!(message.contains("certificate"), "{message}");
    let _ = redis.kill();
    let _ = redis.wait();
}

/// In-process replicas on the fake engine: their masks come from the clicks alone, so these tests are quick.
fn fake_replica(extra: &[&str]) -> TestServer {
    start(config(extra), fake_registry())
}

#[test]
fn sessions_expire_on_time_in_the_shared_store() {
    let Some(redis) = Redis::start() else { return };
    let store = redis.url();
    let a = fake_replica(&["--session-store", &store]);
    let b = fake_replica(&["--session-store", &store]);
    let session = session_of(&create_session(a.addr, 2));
    let key = format!("deepgrow:session:{session}");
    let ttl: i64 = redis.command(&format!("TTL {key}"))[1..].parse().unwrap();
    assert!((1..=2).contains(&ttl), "TTL {ttl}");

    // Margins of 0.8 s either side keep this stable on a loaded 2-core machine.
    std::thread::sleep(Duration::from_millis(1200));
    click(b.addr, &session).ok();
    std::thread::sleep(Duration::from_millis(1200));
    click(a.addr, &session).ok(); // 2.4 s after creation: alive, thanks to B's click
    std::thread::sleep(Duration::from_millis(2800));
    assert_expired_click(&click(a.addr, &session), &session);
    assert_expired_click(&click(b.addr, &session), &session);
    assert_eq!(redis.command(&format!("EXISTS {key}")), ":0");
}

/// A volume of three 32 MiB chunks, written by one replica and rebuilt by another: the same voxels, so the
/// same mask, on a slice in each chunk.
#[test]
fn a_volume_larger_than_one_chunk_comes_back_whole() {
    let Some(redis) = Redis::start() else { return };
    let store = redis.url();
    let a = fake_replica(&["--session-store", &store]);
    let b = fake_replica(&["--session-store", &store]);
    let [h, w, _] = ct().volume.geometry.shape;
    let slices = (70 << 20) / (h * w * 2);
    let file = restacked_ct(slices);
    let created = send(
        a.addr,
        python_request(
            a.addr,
            "PUT",
            "/session/",
            &[file_part("image", "/data/big.nii", &file)],
        ),
    );
    let session = session_of(&created);
    assert_eq!(
        redis.command(&format!("HEXISTS deepgrow:session:{session} c2")),
        ":1"
    );
    for k in [1, slices / 2, slices - 2] {
        let params = format!(
            r#"{{"foreground":[[{},{},{k}]],"background":[]}}"#,
            h / 2,
            w / 2
        );
        let on = |addr: SocketAddr| {
            mask(&send(
                addr,
                python_request(
                    addr,
                    "POST",
                    &format!("/v1/deepgrow?model={MODEL}&session_id={session}"),
                    &[text_part("params", &params)],
                ),
            ))
        };
        let from_a = on(a.addr);
        check_nifti_mask(&from_a, &file, k, false);
        assert_eq!(on(b.addr), from_a, "slice {k}");
    }
    assert!(metrics(b.addr).contains(r#"deepgrow_session_cache_total{result="miss"} 1"#));
}

#[test]
fn redis_down_or_slow_answers_503_and_the_server_recovers() {
    let Some(redis) = Redis::start() else { return };
    let store = redis.url();
    let server = fake_replica(&["--session-store", &store, "--session-store-timeout", "0.5"]);
    let addr = server.addr;
    let session = session_of(&create_session(addr, 600));
    click(addr, &session).ok();

    // slow: Redis stopped (SIGSTOP) answers nothing, and the click gets 503 after the store timeout
    redis.signal("-STOP");
    let started = Instant::now();
    let reply = click(addr, &session);
    let waited = started.elapsed();
    redis.signal("-CONT");
    let message = assert_aiaa_error(&reply, 503, "Redis at redis://127.0.0.1");
    assert!(message.contains("no answer within 0.5 s"), "{message}");
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    assert_eq!(reply.header("retry-after"), Some("1"));
    click(addr, &session).ok();

    // down: every session operation is a 503 naming the store, in each API's shape
    let port = redis.stop();
    assert_aiaa_error(&click(addr, &session), 503, "session store");
    assert_aiaa_error(&create_session(addr, 600), 503, "unavailable");
    let info = get(addr, &format!("/session/{session}"));
    assert_eq!(info.status, 503);
    assert!(info.json()["detail"].as_str().unwrap().contains("Redis"));
    let monai = send(
        addr,
        python_request(
            addr,
            "POST",
            &format!("/infer/{MODEL}?session_id={session}&output=json"),
            &[text_part(
                "params",
                &format!(
                    r#"{{"foreground":[[{},{},{}]],"background":[]}}"#,
                    ct().liver[0],
                    ct().liver[1],
                    ct().liver[2]
                ),
            )],
        ),
    );
    assert_eq!(monai.status, 503);
    assert!(
        monai.json()["detail"].as_str().unwrap().contains("Redis"),
        "{}",
        monai.text()
    );
    let scraped = metrics(addr);
    let errors: f64 = scraped
        .lines()
        .filter(|l| l.starts_with("deepgrow_session_store_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 4.0, "{scraped}");
    assert_eq!(
        get(addr, "/health").status,
        200,
        "the server itself is fine"
    );

    // back: the old session went with Redis's memory (440), new ones work at once
    let _redis = Redis::on_port(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let created = loop {
        let reply = create_session(addr, 600);
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let fresh = session_of(&created);
    click(addr, &fresh).ok();
    assert_expired_click(&click(addr, &session), &session);
}

#[test]
fn metrics_carry_the_series_to_operate_and_scale_on() {
    let server = fake_replica(&[]);
    let addr = server.addr;
    let session = session_of(&create_session(addr, 600));
    click(addr, &session).ok();
    assert_eq!(get(addr, "/no/such/route").status, 404);
    assert_eq!(get(addr, &format!("/session/{session}")).status, 200);
    let scraped = metrics(addr);
    for (name, labels) in [
        (
            "deepgrow_http_requests_total",
            &[r#"route="/v1/deepgrow""#, r#"status="200""#][..],
        ),
        (
            "deepgrow_http_requests_total",
            &[r#"route="unmatched""#, r#"status="404""#],
        ),
        // the id is not a label: the route is
        (
            "deepgrow_http_requests_total",
            &[r#"route="/session/{id}""#],
        ),
        (
            "deepgrow_http_request_seconds_count",
            &[r#"route="/session/""#],
        ),
        ("deepgrow_click_stage_seconds_count", &[r#"stage="infer""#]),
        ("deepgrow_click_stage_seconds_bucket", &[r#"stage="total""#]),
        ("deepgrow_queued_requests", &[r#"pool="infer""#]),
        ("deepgrow_working_requests", &[r#"pool="decode""#]),
        ("deepgrow_inflight_budget_bytes", &[]),
        ("deepgrow_sessions", &[]),
        ("deepgrow_session_bytes", &[]),
        ("deepgrow_model_info", &[r#"name="deepgrow_2d""#]),
        ("deepgrow_ready", &[]),
    ] {
        assert!(
            sample(&scraped, name, labels).is_some(),
            "no {name} with {labels:?} in:\n{scraped}"
        );
    }
    assert_eq!(sample(&scraped, "deepgrow_sessions", &[]), Some(1.0));
    assert_eq!(
        sample(
            &scraped,
            "deepgrow_click_stage_seconds_count",
            &[r#"stage="infer""#]
        ),
        Some(1.0)
    );
    assert!(!scraped.contains(&session), "a session id became a label");
    assert!(scraped.trim_end().ends_with("# EOF"));
}

/// SIGTERM: `/ready` turns 503 at once while `/health` stays 200; the upload in flight is answered; then
/// the listener closes and the process exits 0.
#[test]
fn sigterm_drains_readiness_first_then_finishes_in_flight_requests() {
    let _turn = one_at_a_time();
    let mut server = replica(&["--shutdown-delay", "1.5"]);
    let addr = server.addr;
    let upload = python_request(
        addr,
        "PUT",
        "/session/?expiry=60",
        &[file_part("image", "/data/in.nii.gz", &ct().gz)],
    );
    let half = upload.len() / 2;
    let mut in_flight = TcpStream::connect(addr).unwrap();
    in_flight.write_all(&upload[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(1);
    while try_get(addr, "/ready") != Some(503) {
        assert!(
            Instant::now() < deadline,
            "/ready turns 503 within the delay"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(try_get(addr, "/health"), Some(200), "liveness stays up");

    // past the delay: no new connections, but the upload that was in flight completes
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(try_get(addr, "/health"), None, "the listener is closed");
    in_flight.write_all(&upload[half..]).unwrap();
    let reply = read_reply(&mut in_flight);
    assert!(!session_of(&reply).is_empty());

    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the server exits once drained");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

/// tools/fleet.py: redis-server, 3 replicas and nginx; clients click while one replica is SIGKILLed and
/// another restarted. No session may be lost, no mask may differ, and no 5xx may happen but on the killed
/// replica's in-flight requests (the tool exits 1 otherwise). BENCHMARKS.md reports a longer run.
#[test]
fn the_fleet_loses_no_session_when_replicas_die_and_restart() {
    let _turn = one_at_a_time();
    if !redis_available() {
        return;
    }
    if !available(
        "nginx",
        "DEEPGROW_REQUIRE_NGINX",
        "apt-get install nginx-light; .ci/run does",
    ) {
        return;
    }
    let report = std::env::temp_dir().join(format!("fleet-{}.json", std::process::id()));
    let output = Command::new("python3")
        .arg(manifest_path("tools/fleet.py"))
        .args(["--binary", env!("CARGO_BIN_EXE_deepgrow-server")])
        .args(["--clients", "4", "--duration", "16", "--throughput-s", "0"])
        .arg("--json")
        .arg(&report)
        .output()
        .expect("python3 runs tools/fleet.py");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tools/fleet.py failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let chaos = &report["chaos"];
    assert_eq!(chaos["sessions_lost"], 0, "{chaos}");
    assert_eq!(chaos["wrong_masks"], 0, "{chaos}");
    assert_eq!(chaos["5xx_or_errors_elsewhere"], 0, "{chaos}");
    assert!(chaos["sessions_created"].as_u64().unwrap() >= 4, "{chaos}");
    assert!(chaos["clicks_ok"].as_u64().unwrap() >= 20, "{chaos}");
    assert_eq!(report["restart"]["exit_code"], 0);
}
