//! deepgrow-server: a Deepgrow 2D annotation server speaking the NVIDIA Clara AIAA and MONAI Label HTTP APIs.
//!
//! Data flows one way: HTTP ([`api`]) -> decode ([`nifti_io`]) -> pipeline ([`deepgrow`]) -> engine
//! ([`engine`]) -> pipeline -> encode, with the whole click in [`annotate::annotate`].

pub mod admission;
pub mod annotate;
pub mod api;
pub mod config;
pub mod deepgrow;
pub mod dicom;
pub mod engine;
pub mod error;
pub mod image;
pub mod metrics;
pub mod models;
pub mod nifti_io;
pub mod sessions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ndarray::Array4;
use tracing_subscriber::EnvFilter;

use crate::admission::{Budget, Pool};
use crate::api::{AppState, RequestPolicy, SharedState};
use crate::config::{Config, LogFormat, SessionBackend};
use crate::dicom::{DicomWebClient, DicomWebConfig, DimseClient, DimseConfig};
use crate::engine::{Engine, TractEngine};
use crate::metrics::{Metrics, ModelLabels};
use crate::models::Registry;
use crate::nifti_io::DecodeLimits;
use crate::sessions::{MemoryStore, RedisConfig, RedisStore, SessionLimits, SessionStore};

pub use crate::api::app;

/// Initialises logging (RUST_LOG filters, default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Loads every model under the configured folder with tract, and warms each one up with a full run.
pub fn load_models(config: &Config) -> anyhow::Result<Registry> {
    let threads = config.inference_threads();
    let registry = Registry::load(&config.models_dir, |path, input_size| {
        let start = Instant::now();
        let engine = TractEngine::load(path, input_size, threads, config.kernels)?;
        let loaded = start.elapsed();
        let [h, w] = input_size;
        engine.infer(Array4::zeros((1, 3, h, w)))?;
        tracing::info!(
            path = %path.display(),
            kernels = ?engine.kernels(),
            bf16 = ?engine::fast::bf16::hardware(),
            load_ms = loaded.as_millis() as u64,
            warmup_ms = (start.elapsed() - loaded).as_millis() as u64,
            "model optimised and warmed up"
        );
        Ok(Arc::new(engine) as Arc<dyn Engine>)
    })
    .with_context(|| format!("loading models from {}", config.models_dir.display()))?;
    Ok(registry)
}

/// The shared state for a registry under a configuration.
pub fn build_state(config: &Config, registry: Registry) -> anyhow::Result<SharedState> {
    let metrics = Arc::new(Metrics::new());
    for model in registry.models() {
        metrics
            .models
            .get_or_create(&ModelLabels {
                name: model.info.name.clone(),
                version: model.info.version.clone(),
                model_type: model.info.model_type.clone(),
                kernels: model.engine.kernel_name(),
            })
            .set(1);
    }
    let limits = SessionLimits {
        // The operator's cap wins over the default.
        default_expiry: Duration::from_secs(config.session_expiry.min(config.session_max_expiry)),
        max_expiry: Duration::from_secs(config.session_max_expiry),
        memory_budget: config.session_memory_bytes,
        max_sessions: config.max_sessions.max(1),
    };
    let decode_limits = DecodeLimits {
        max_decompressed_bytes: config.max_decompressed_bytes,
    };
    let sessions: Box<dyn SessionStore> = match &config.session_store {
        SessionBackend::Memory => Box::new(MemoryStore::new(limits)),
        SessionBackend::Redis(url) => Box::new(
            RedisStore::new(
                &RedisConfig {
                    url: url.clone(),
                    timeout: config.session_store_timeout,
                },
                limits,
                metrics.clone(),
                decode_limits,
            )
            .map_err(anyhow::Error::msg)?,
        ),
    };
    Ok(Arc::new(AppState {
        registry,
        sessions,
        metrics,
        draining: std::sync::atomic::AtomicBool::new(false),
        decode_pool: Pool::new("decode queue", config.decode_workers(), config.queue),
        infer_pool: Pool::new("inference queue", config.workers(), config.queue),
        budget: Budget::new(config.max_inflight_bytes(), config.inflight_wait),
        decode_limits,
        policy: RequestPolicy {
            max_upload_bytes: config.max_upload_bytes,
            body_timeout: config.body_timeout,
            request_timeout: config.request_timeout,
            auth_token: config.auth_token.clone().filter(|t| !t.is_empty()),
        },
        dicomweb: config.dicomweb_url.as_ref().map(|url| {
            DicomWebClient::new(DicomWebConfig {
                url: url.clone(),
                authorization: config.dicomweb_auth.clone().filter(|a| !a.is_empty()),
                connect_timeout: config.pacs_connect_timeout,
                timeout: config.pacs_timeout,
                max_bytes: config.max_upload_bytes as u64,
                max_instances: config.pacs_max_instances,
            })
            .expect("the HTTP client for DICOMweb builds")
        }),
        pacs: DimseClient::new(DimseConfig {
            ae_title: config.ae_title.clone(),
            allowed: config.pacs.clone(),
            connect_timeout: config.pacs_connect_timeout,
            timeout: config.pacs_timeout,
            max_bytes: config.max_upload_bytes as u64,
            max_instances: config.pacs_max_instances,
        }),
        started: Instant::now(),
    }))
}

/// Serves `state` on `listener` until `shutdown` resolves; in-flight requests finish first.
///
/// The accept loop is hyper-util's (rather than `axum::serve`) for the limits axum does not expose: a
/// header read timeout, so a client trickling its headers cannot hold a connection, and a cap on open
/// connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharedState,
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let sweeper_state = state.clone();
    let sweep_interval = config.sweep_interval;
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_interval);
        loop {
            tick.tick().await;
            let dropped = sweeper_state.sessions.sweep();
            if dropped > 0 {
                tracing::info!(dropped, "expired sessions dropped");
            }
            release_free_heap();
        }
    });
    let router = app(state, &config.cors_origins);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.context("connection limiter closed")?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    sweeper.abort();
    Ok(())
}

/// Hands heap memory freed by finished clicks and dropped sessions back to the OS. glibc keeps freed memory in
/// its per-thread arenas, so without this the resident size stays at the high-water mark of past load.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures, under their locks; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tunes glibc's malloc for this server; call it first thing in `main`, before other threads exist.
///
/// * One arena: with one arena per thread (tokio, blocking pool, tract's pool), `malloc_trim` empties the main
///   heap but leaves freed memory at the top of the other arenas, and RSS stayed 56-88 MiB above its idle level
///   after a load test; with one arena it returns to within 1 MiB, at no measurable cost to a click.
/// * No mmap for large blocks and no trimming on free: a network run allocates its activations (up to 64 MiB
///   each) afresh for every layer, and as separate mappings each one page-faults on first touch, which cost
///   50 ms of a 240 ms click. Kept in the heap, they are reused from one layer and one click to the next. The
///   session sweeper's `malloc_trim` (every 30 s) still hands the freed heap back to the OS.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc tunables; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown requested");
}

/// Loads and warms the models, then listens (the server answers only once it is ready).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let start = Instant::now();
    let load_config = config.clone();
    let registry = tokio::task::spawn_blocking(move || load_models(&load_config)).await??;
    let state = build_state(&config, registry)?;
    let address = std::net::SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(
        address = %listener.local_addr()?,
        models = ?state.registry.models().iter().map(|m| m.info.name.as_str()).collect::<Vec<_>>(),
        session_store = state.sessions.kind(),
        workers = config.workers(),
        decode_workers = config.decode_workers(),
        inflight_budget_bytes = state.budget.total_bytes(),
        ready_ms = start.elapsed().as_millis() as u64,
        "deepgrow-server ready"
    );
    let draining = state.clone();
    let delay = config.shutdown_delay;
    let shutdown = async move {
        shutdown_signal().await;
        // Readiness first, so that load balancers stop routing here while the listener still accepts.
        draining
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(
                delay_s = delay.as_secs_f64(),
                "draining: /ready answers 503, requests are still served until the listener closes"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("closing the listener: finishing in-flight requests");
    };
    serve(listener, state, &config, shutdown).await?;
    tracing::info!("in-flight requests finished; exiting");
    Ok(())
}
