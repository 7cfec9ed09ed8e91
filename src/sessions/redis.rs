//! The shared store of a fleet: every session in Redis, so any replica serves any session and a replica's
//! death loses none. Each replica keeps the volumes it used last in a bounded local cache ([`MemoryStore`]).
//!
//! A session is one Redis hash, `deepgrow:session:<id>`, whose TTL is the session's expiry (sliding: every use
//! renews it, in one script with the access time):
//! - `info`: its [`StoredInfo`] as JSON;
//! - `ttl`, `atime`: its expiry in seconds and its last use (epoch seconds);
//! - `c0`, `c1`, ...: the decoded volume as an uncompressed NIfTI ([`Volume::to_nifti`]) in chunks below
//!   Redis's 512 MiB bulk limit. A cache miss reads it back with one copy, not the upload's inflating or
//!   DICOM decoding.
//!
//! A session is written chunk by chunk and its record last, and read back chunk by chunk: every Redis
//! operation moves at most one chunk, so each fits in the timeout and the copies in flight stay small.
//!
//! Every use of a session asks Redis first (one round trip), even on a cache hit: a delete or an expiry seen
//! by any replica is seen by all. Every call is bounded by `--session-store-timeout`; Redis down or slow is a
//! [`SessionError::Unavailable`] (503), and the connection comes back by itself when Redis does.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::{
    epoch_secs, meta_of, MemoryStore, SessionError, SessionInfo, SessionLimits, SessionMeta,
    SessionStore,
};
use crate::metrics::Metrics;
use crate::nifti_io::{decode, DecodeLimits, Volume};

/// Below Redis's `proto-max-bulk-len` (512 MiB), and small enough that no single reply holds up the others.
const CHUNK_BYTES: usize = 32 << 20;

/// Renews a session's TTL from its own `ttl` field and records its access time; 0 when it is gone.
const TOUCH: &str = r"
local ttl = redis.call('HGET', KEYS[1], 'ttl')
if not ttl then return 0 end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[1], 'atime', ARGV[1])
return 1
";

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// The longest any one store operation may take, connecting included.
    pub timeout: Duration,
}

/// What a session's `info` field holds.
#[derive(Debug, Serialize, Deserialize)]
struct StoredInfo {
    image: String,
    meta: SessionMeta,
    create_ts: u64,
    expiry: u64,
    rows_reversed: bool,
    chunks: usize,
    file_bytes: usize,
}

impl StoredInfo {
    fn session_info(self, id: &str, atime: Option<u64>) -> SessionInfo {
        SessionInfo {
            name: id.to_owned(),
            image: self.image,
            meta: self.meta,
            create_ts: self.create_ts,
            last_access_ts: atime.unwrap_or(self.create_ts),
            expiry: self.expiry,
        }
    }
}

pub struct RedisStore {
    cache: MemoryStore,
    client: Client,
    connection: OnceCell<ConnectionManager>,
    /// "Redis at host:port/db", without credentials: what errors and logs name.
    name: String,
    timeout: Duration,
    touch: Script,
    metrics: Arc<Metrics>,
    /// Bounds the rebuild of a fetched volume (it was checked when stored; this guards a corrupted key).
    decode_limits: DecodeLimits,
}

fn key(id: &str) -> String {
    format!("deepgrow:session:{id}")
}

impl RedisStore {
    /// Parses the URL; the connection is made on first use, so the server starts while Redis is down.
    pub fn new(
        config: &RedisConfig,
        limits: SessionLimits,
        metrics: Arc<Metrics>,
        decode_limits: DecodeLimits,
    ) -> Result<Self, String> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| format!("--session-store {}: {e}", redact(&config.url)))?;
        let name = format!("Redis at {}", redact(&config.url));
        Ok(RedisStore {
            cache: MemoryStore::new(limits),
            client,
            connection: OnceCell::new(),
            name,
            timeout: config.timeout,
            touch: Script::new(TOUCH),
            metrics,
            decode_limits,
        })
    }

    fn unavailable(&self, operation: &'static str, reason: String) -> SessionError {
        self.metrics.store_error(operation);
        tracing::error!(store = %self.name, operation, %reason, "session store failed");
        SessionError::Unavailable {
            store: self.name.clone(),
            reason,
        }
    }

    /// Runs one store operation against the (lazily made, self-reconnecting) connection, within the timeout.
    async fn run<T, F, Fut>(&self, operation: &'static str, work: F) -> Result<T, SessionError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = ::redis::RedisResult<T>>,
    {
        let attempt = async {
            let connection = self
                .connection
                .get_or_try_init(|| async {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                })
                .await?
                .clone();
            work(connection).await
        };
        let no_answer = || {
            format!(
                "no answer within {} s (--session-store-timeout)",
                self.timeout.as_secs_f64()
            )
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if error.is_timeout() => Err(self.unavailable(operation, no_answer())),
            Ok(Err(error)) => Err(self.unavailable(operation, error.to_string())),
            Err(_) => Err(self.unavailable(operation, no_answer())),
        }
    }

    /// Renews the session's expiry; whether it still exists.
    async fn touch(&self, id: &str) -> Result<bool, SessionError> {
        let now = epoch_secs(SystemTime::now());
        let found: i64 = self
            .run("touch", |mut connection| async move {
                self.touch
                    .key(key(id))
                    .arg(now)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        Ok(found == 1)
    }

    /// The stored info and access time; `None` when the session is gone.
    async fn stored_info(
        &self,
        id: &str,
    ) -> Result<Option<(StoredInfo, Option<u64>)>, SessionError> {
        let (info, atime): (Option<String>, Option<u64>) = self
            .run("info", |mut connection| async move {
                connection.hmget(key(id), &["info", "atime"]).await
            })
            .await?;
        let Some(info) = info else { return Ok(None) };
        let info: StoredInfo = serde_json::from_str(&info).map_err(|e| {
            self.unavailable(
                "info",
                format!("session {id} has an unreadable record: {e}"),
            )
        })?;
        Ok(Some((info, atime)))
    }

    /// Fetches a session's volume from Redis and rebuilds it (a cache miss), with its record.
    async fn fetch(&self, id: &str) -> Result<Option<(Volume, StoredInfo)>, SessionError> {
        let Some((info, _)) = self.stored_info(id).await? else {
            return Ok(None);
        };
        // chunk by chunk, each read within the timeout, into one buffer: the volume's file, then the volume,
        // are all this holds
        let budget = self.limits().memory_budget;
        if info.file_bytes > budget.saturating_add(1 << 20) {
            return Err(self.unavailable(
                "fetch",
                format!("session {id}'s record claims {} bytes", info.file_bytes),
            ));
        }
        let mut file = Vec::with_capacity(info.file_bytes);
        for n in 0..info.chunks {
            let chunk: Option<Vec<u8>> = self
                .run("fetch", |mut connection| async move {
                    connection.hget(key(id), format!("c{n}")).await
                })
                .await?;
            // the session expired, or was deleted or replaced, between two reads
            let Some(chunk) = chunk else { return Ok(None) };
            if file.len() + chunk.len() > info.file_bytes {
                return Err(self.unavailable(
                    "fetch",
                    format!("session {id}'s volume is longer than its record says"),
                ));
            }
            file.extend_from_slice(&chunk);
        }
        let limits = self.decode_limits;
        let rebuilt = tokio::task::spawn_blocking(move || decode(&file, limits))
            .await
            .map_err(|e| self.unavailable("fetch", format!("rebuilding the volume: {e}")))?;
        let mut volume = rebuilt.map_err(|e| {
            self.unavailable(
                "fetch",
                format!("session {id} holds an unreadable volume: {e}"),
            )
        })?;
        if volume.byte_size() != info.meta.bytes {
            return Err(self.unavailable(
                "fetch",
                format!("session {id}'s volume does not match its record"),
            ));
        }
        volume.geometry.rows_reversed = info.rows_reversed;
        volume.was_compressed = info.meta.compressed;
        Ok(Some((volume, info)))
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    fn limits(&self) -> &SessionLimits {
        self.cache.limits()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn insert(
        &self,
        id: String,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<SessionInfo, SessionError> {
        let limits = *self.limits();
        limits.check_fits(&volume)?;
        let expiry = limits.expiry_for(requested_expiry).as_secs().max(1);
        let serialising = volume.clone();
        let file = tokio::task::spawn_blocking(move || serialising.to_nifti())
            .await
            .map_err(|e| self.unavailable("insert", format!("serialising the volume: {e}")))?;
        let now = epoch_secs(SystemTime::now());
        let stored = StoredInfo {
            image: image_name.clone(),
            meta: meta_of(&volume),
            create_ts: now,
            expiry,
            rows_reversed: volume.geometry.rows_reversed,
            chunks: file.len().div_ceil(CHUNK_BYTES),
            file_bytes: file.len(),
        };
        let record = serde_json::to_string(&stored)
            .map_err(|e| self.unavailable("insert", format!("serialising the record: {e}")))?;
        // The chunks first, each with the session's TTL, so that a write cut short expires by itself; the
        // record last: readers look for its `ttl` field, so none sees a half-written session. One command per
        // chunk keeps every operation within the timeout, and the copies in flight to one chunk's worth.
        let session_key = key(&id);
        for (n, chunk) in file.chunks(CHUNK_BYTES).enumerate() {
            let session_key = &session_key;
            self.run("insert", |mut connection| async move {
                let mut pipe = ::redis::pipe();
                if n == 0 {
                    pipe.del(session_key).ignore();
                }
                pipe.hset(session_key, format!("c{n}"), chunk)
                    .ignore()
                    .expire(session_key, expiry as i64)
                    .ignore();
                pipe.query_async::<()>(&mut connection).await
            })
            .await?;
        }
        drop(file);
        let (ttl, atime) = (expiry.to_string(), now.to_string());
        self.run("insert", |mut connection| async move {
            ::redis::pipe()
                .hset_multiple(
                    &session_key,
                    &[
                        ("info", record.as_bytes()),
                        ("ttl", ttl.as_bytes()),
                        ("atime", atime.as_bytes()),
                    ],
                )
                .ignore()
                .expire(&session_key, expiry as i64)
                .ignore()
                .query_async::<()>(&mut connection)
                .await
        })
        .await?;
        // a write through: this replica then serves its own session from memory
        self.cache
            .insert(id.clone(), volume, image_name, Some(expiry))?;
        Ok(stored.session_info(&id, Some(now)))
    }

    async fn volume(&self, id: &str) -> Result<Option<Arc<Volume>>, SessionError> {
        if !self.touch(id).await? {
            self.cache.remove(id);
            self.metrics.session_lookup("gone");
            return Ok(None);
        }
        if let Some(volume) = self.cache.volume(id) {
            self.metrics.session_lookup("hit");
            return Ok(Some(volume));
        }
        let started = Instant::now();
        let Some((volume, info)) = self.fetch(id).await? else {
            self.metrics.session_lookup("gone");
            return Ok(None);
        };
        let volume = Arc::new(volume);
        // One that no longer fits next to the others evicts the least recently used of them; one larger than
        // this replica's whole budget (a replica configured smaller than the one that created it) is served
        // uncached.
        if let Err(error) =
            self.cache
                .insert(id.to_owned(), volume.clone(), info.image, Some(info.expiry))
        {
            tracing::warn!(session = %id, %error, "a fetched session volume is not cached here");
        }
        self.metrics.session_lookup("miss");
        self.metrics
            .session_fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            session = %id,
            bytes = volume.byte_size(),
            fetch_ms = started.elapsed().as_millis() as u64,
            "session volume fetched from the shared store"
        );
        Ok(Some(volume))
    }

    async fn info(&self, id: &str, refresh: bool) -> Result<Option<SessionInfo>, SessionError> {
        if refresh && !self.touch(id).await? {
            self.cache.remove(id);
            return Ok(None);
        }
        Ok(self
            .stored_info(id)
            .await?
            .map(|(info, atime)| info.session_info(id, atime)))
    }

    async fn remove(&self, id: &str) -> Result<Option<SessionInfo>, SessionError> {
        self.cache.remove(id);
        let found = self.stored_info(id).await?;
        let deleted: i64 = self
            .run("remove", |mut connection| async move {
                connection.del(key(id)).await
            })
            .await?;
        Ok(found
            .filter(|_| deleted == 1)
            .map(|(info, atime)| info.session_info(id, atime)))
    }

    fn sweep(&self) -> usize {
        self.cache.sweep()
    }

    fn usage(&self) -> (usize, usize) {
        self.cache.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn urls_are_named_without_their_password() {
        assert_eq!(
            redact("redis://:secret@cache:6379/2"),
            "redis://***@cache:6379/2"
        );
        assert_eq!(redact("redis://cache:6379"), "redis://cache:6379");
    }
}
