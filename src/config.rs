//! Server configuration: one clap struct, every flag also read from a `DEEPGROW_*` environment variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::dicom::{ae_title, PacsNode};
use crate::engine::Kernels;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "deepgrow-server",
    version,
    about = "Deepgrow 2D annotation server speaking the NVIDIA Clara AIAA and MONAI Label APIs"
)]
pub struct Config {
    /// Address to listen on (127.0.0.1 keeps the server local; use 0.0.0.0 to expose it).
    #[arg(long, env = "DEEPGROW_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// TCP port to listen on (AIAA clients default to 5000, MONAI Label clients to 8000).
    #[arg(long, env = "DEEPGROW_PORT", default_value_t = 5000)]
    pub port: u16,

    /// Folder with one sub-folder per model (model.onnx + config.json, or + Clara config_aiaa.json).
    #[arg(long, env = "DEEPGROW_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,

    /// Requests that may run CPU work (decode, inference) at the same time; defaults to the number of cores.
    #[arg(long, env = "DEEPGROW_WORKERS")]
    pub workers: Option<usize>,

    /// Uploads that may be decoded at the same time (session uploads, and the slice of an upload click);
    /// defaults to the number of cores. Decoding has workers of its own, so uploads and clicks do not queue
    /// behind each other.
    #[arg(long, env = "DEEPGROW_DECODE_WORKERS")]
    pub decode_workers: Option<usize>,

    /// Bytes that all requests together may hold in flight: buffered uploads and volumes being decoded (a
    /// session's volume counts against --session-memory-bytes once stored). Defaults to a quarter of the
    /// machine's memory (or of the cgroup's limit). A request that would exceed it waits up to
    /// --inflight-wait, then gets 503; one that could never fit gets 413.
    #[arg(long, env = "DEEPGROW_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<usize>,

    /// Seconds a request waits for room in the in-flight budget before it gets 503.
    #[arg(long, env = "DEEPGROW_INFLIGHT_WAIT", default_value = "2", value_parser = parse_seconds)]
    pub inflight_wait: Duration,

    /// Requests that may wait for a worker (per pool: decoding, inference); beyond workers + queue the
    /// server answers 503 at once.
    #[arg(long, env = "DEEPGROW_QUEUE", default_value_t = 8)]
    pub queue: usize,

    /// Threads one inference may use (tract's executor); defaults to the number of cores.
    #[arg(long, env = "DEEPGROW_INFERENCE_THREADS")]
    pub inference_threads: Option<usize>,

    /// Kernels for the network: `auto` (the default: `fast-bf16` on a CPU with AMX, else `fast`), `fast`
    /// (Winograd F(2x2, 3x3) convolutions and fused layers on top of tract, float32), `fast-bf16` (bfloat16
    /// products with float32 sums, on AMX or AVX-512-BF16), `fast-f4` (Winograd F(4x4, 3x3): faster, less
    /// exact) or `tract` (tract's own, the unmodified graph).
    #[arg(long, env = "DEEPGROW_KERNELS", value_enum, default_value_t = Kernels::Auto)]
    pub kernels: Kernels,

    /// Largest accepted request body in bytes (uploads are whole CT volumes).
    #[arg(long, env = "DEEPGROW_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: usize,

    /// Largest accepted decompressed NIfTI in bytes (bounds what a small .nii.gz may expand to).
    #[arg(long, env = "DEEPGROW_MAX_DECOMPRESSED_BYTES", default_value_t = 4 << 30)]
    pub max_decompressed_bytes: u64,

    /// Session expiry in seconds when the client asks for none (expiry=0 or absent).
    #[arg(long, env = "DEEPGROW_SESSION_EXPIRY", default_value_t = 3600)]
    pub session_expiry: u64,

    /// Longest session expiry a client may ask for, in seconds (also caps the default expiry).
    #[arg(long, env = "DEEPGROW_SESSION_MAX_EXPIRY", default_value_t = 86400)]
    pub session_max_expiry: u64,

    /// Memory the session store may hold, in bytes; least recently used sessions are evicted beyond it.
    #[arg(long, env = "DEEPGROW_SESSION_MEMORY_BYTES", default_value_t = 8 << 30)]
    pub session_memory_bytes: usize,

    /// Most sessions held at once; least recently used sessions are evicted beyond it.
    #[arg(long, env = "DEEPGROW_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,

    /// Where sessions live: `memory` (this process; the default), or `redis://[:password@]host:port[/db]`
    /// (`rediss://` for TLS, verified against the system's roots or `SSL_CERT_FILE`), shared by every replica
    /// of a fleet: any replica then serves any session, and a replica's restart or
    /// death loses none. The memory bounds above then bound each replica's local cache of volumes.
    #[arg(long, env = "DEEPGROW_SESSION_STORE", default_value = "memory", value_parser = parse_session_store, hide_env_values = true)]
    pub session_store: SessionBackend,

    /// Seconds one operation on a shared session store may take before the request gets 503.
    #[arg(long, env = "DEEPGROW_SESSION_STORE_TIMEOUT", default_value = "2", value_parser = parse_seconds)]
    pub session_store_timeout: Duration,

    /// Seconds between SIGTERM and closing the listener, while `/ready` already answers 503 so that load
    /// balancers stop sending new requests (Kubernetes: a little more than the endpoints' propagation). In-flight
    /// requests then finish before the process exits.
    #[arg(long, env = "DEEPGROW_SHUTDOWN_DELAY", default_value = "0", value_parser = parse_delay)]
    pub shutdown_delay: Duration,

    /// Seconds between sweeps that drop expired sessions and hand freed memory back to the OS.
    #[arg(long, env = "DEEPGROW_SWEEP_INTERVAL", default_value = "30", value_parser = parse_seconds)]
    pub sweep_interval: Duration,

    /// Seconds a client may take to send a request's headers; a slower connection is closed.
    #[arg(long, env = "DEEPGROW_HEADER_READ_TIMEOUT", default_value = "10", value_parser = parse_seconds)]
    pub header_read_timeout: Duration,

    /// Longest pause, in seconds, while a request body is arriving; a stalled upload gets 408.
    #[arg(long, env = "DEEPGROW_BODY_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub body_timeout: Duration,

    /// Seconds a whole request may take, upload, queueing and inference included; beyond it the reply is 408.
    #[arg(long, env = "DEEPGROW_REQUEST_TIMEOUT", default_value = "600", value_parser = parse_seconds)]
    pub request_timeout: Duration,

    /// Most open client connections; further clients wait in the listen backlog.
    #[arg(long, env = "DEEPGROW_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// When set, every request except /health, /ready and /metrics must carry `Authorization: Bearer <token>`.
    /// Off by default: AIAA clients (Slicer, MITK, OHIF, the Python client) send no token.
    #[arg(long, env = "DEEPGROW_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Allowed CORS origins, comma-separated; `*` allows any origin (browser viewers such as OHIF).
    #[arg(
        long,
        env = "DEEPGROW_CORS_ORIGINS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// DICOMweb root of the PACS the viewers display (QIDO-RS and WADO-RS under it), e.g.
    /// `http://pacs:8042/dicom-web`: OHIF v3 names a series (`image=<SeriesInstanceUID>`) and the server
    /// fetches it from there, once per series while it stays cached.
    #[arg(long, env = "DEEPGROW_DICOMWEB_URL")]
    pub dicomweb_url: Option<String>,

    /// `Authorization` header value sent to the DICOMweb server (`Bearer <token>`, `Basic <base64>`).
    #[arg(long, env = "DEEPGROW_DICOMWEB_AUTH", hide_env_values = true)]
    pub dicomweb_auth: Option<String>,

    /// PACS nodes a client may ask this server to pull a series from by DIMSE C-GET (OHIF v2's default
    /// "Fetch Images From Dicom Server" sends `{"dicom": {server_address, server_port, ...}}`), as
    /// `HOST:PORT[,HOST:PORT...]` exactly as the viewer names them. Every other node gets a 403; none listed
    /// allows none.
    #[arg(long, env = "DEEPGROW_PACS", value_delimiter = ',')]
    pub pacs: Vec<PacsNode>,

    /// Our AE title (the calling AE) in DIMSE associations with a PACS.
    #[arg(long, env = "DEEPGROW_AE_TITLE", default_value = "DEEPGROW", value_parser = ae_title)]
    pub ae_title: String,

    /// Seconds to connect to a PACS.
    #[arg(long, env = "DEEPGROW_PACS_CONNECT_TIMEOUT", default_value = "5", value_parser = parse_seconds)]
    pub pacs_connect_timeout: Duration,

    /// Seconds a whole retrieval of a series from a PACS may take.
    #[arg(long, env = "DEEPGROW_PACS_TIMEOUT", default_value = "120", value_parser = parse_seconds)]
    pub pacs_timeout: Duration,

    /// Most instances one series fetched from a PACS may have (its bytes are bounded by --max-upload-bytes).
    #[arg(long, env = "DEEPGROW_PACS_MAX_INSTANCES", default_value_t = 5000)]
    pub pacs_max_instances: usize,

    /// Log format.
    #[arg(long, env = "DEEPGROW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where sessions are kept (`--session-store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionBackend {
    Memory,
    /// A Redis URL, checked when parsed.
    Redis(String),
}

fn parse_session_store(text: &str) -> Result<SessionBackend, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("memory") {
        return Ok(SessionBackend::Memory);
    }
    let schemes = ["redis://", "rediss://", "redis+unix://", "unix://"];
    if !schemes.iter().any(|scheme| text.starts_with(scheme)) {
        return Err(format!(
            "expected 'memory' or a redis://host:port[/db] (rediss:// for TLS) URL, got '{}'",
            text.split('@').next_back().unwrap_or(text)
        ));
    }
    redis::Client::open(text)
        .map(|_| SessionBackend::Redis(text.to_owned()))
        .map_err(|e| format!("not a usable Redis URL: {e}"))
}

/// A finite number of seconds, zero allowed.
fn parse_delay(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => parse_seconds(text),
    }
}

/// A positive, finite number of seconds ("2", "0.5").
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds, got '{text}'"))?;
    if seconds.is_finite() && seconds > 0.0 && seconds <= 1e9 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!(
            "expected a positive number of seconds, got '{text}'"
        ))
    }
}

impl Config {
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(num_cpus::get).max(1)
    }

    pub fn inference_threads(&self) -> usize {
        self.inference_threads.unwrap_or_else(num_cpus::get).max(1)
    }

    pub fn decode_workers(&self) -> usize {
        self.decode_workers.unwrap_or_else(num_cpus::get).max(1)
    }

    pub fn max_inflight_bytes(&self) -> usize {
        self.max_inflight_bytes
            .unwrap_or_else(|| (machine_memory_bytes() / 4).max(256 << 20) as usize)
    }
}

/// Memory this process may use: the machine's, or its cgroup's limit when that is lower (containers).
fn machine_memory_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(8 << 30);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|limit| limit.trim().parse::<u64>().ok());
    cgroup.map_or(total, |limit| limit.min(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_fractional_seconds_and_refuse_nonsense() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds(" 600 "), Ok(Duration::from_secs(600)));
        for bad in ["0", "-1", "NaN", "inf", "ten", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_keep_the_server_local_and_open_to_aiaa_clients() {
        let config = Config::parse_from(["deepgrow-server"]);
        assert_eq!(config.host.to_string(), "127.0.0.1");
        assert_eq!(config.port, 5000);
        assert_eq!(config.auth_token, None);
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.body_timeout, Duration::from_secs(30));
        assert_eq!(config.request_timeout, Duration::from_secs(600));
        assert_eq!(config.session_store, SessionBackend::Memory);
        assert_eq!(config.shutdown_delay, Duration::ZERO);
    }

    #[test]
    fn session_stores_parse() {
        assert_eq!(
            parse_session_store("redis://cache:6379/1"),
            Ok(SessionBackend::Redis("redis://cache:6379/1".into()))
        );
        assert_eq!(parse_session_store("MEMORY"), Ok(SessionBackend::Memory));
        assert!(matches!(
            parse_session_store("rediss://:pw@cache:6380/0"),
            Ok(SessionBackend::Redis(_))
        ));
        let refused = parse_session_store("http://user:secret@cache:6379").unwrap_err();
        assert!(
            refused.contains("redis://") && !refused.contains("secret"),
            "{refused}"
        );
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert!(parse_delay("-1").is_err());
    }

    #[test]
    fn the_inflight_budget_defaults_to_a_quarter_of_the_memory() {
        let config = Config::parse_from(["deepgrow-server"]);
        let quarter = machine_memory_bytes() as usize / 4;
        assert_eq!(config.max_inflight_bytes(), quarter.max(256 << 20));
        assert!(quarter > 64 << 20, "memory read as {quarter} bytes / 4");
        let set = Config::parse_from(["deepgrow-server", "--max-inflight-bytes", "1000000"]);
        assert_eq!(set.max_inflight_bytes(), 1_000_000);
    }
}
