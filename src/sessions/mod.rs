//! Sessions: decoded volumes kept so that a click with `session_id` skips upload and decode. Expiry is sliding
//! (each use refreshes it).
//!
//! One trait, two stores: [`MemoryStore`] (one process, the default) and [`RedisStore`] (a fleet: every replica
//! serves every session from Redis, through a bounded local cache of decoded volumes).

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::nifti_io::Volume;

pub use self::redis::{RedisConfig, RedisStore};
pub use memory::MemoryStore;

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub default_expiry: Duration,
    pub max_expiry: Duration,
    /// Bytes of decoded volumes one process holds (a Redis store's local cache).
    pub memory_budget: usize,
    /// Volumes one process holds.
    pub max_sessions: usize,
}

impl SessionLimits {
    /// The expiry a request gets: 0 or absent means the default; anything else is capped at the maximum.
    pub fn expiry_for(&self, requested_secs: Option<u64>) -> Duration {
        match requested_secs {
            None | Some(0) => self.default_expiry,
            Some(secs) => Duration::from_secs(secs).min(self.max_expiry),
        }
    }

    /// A volume larger than the whole budget can never be held.
    fn check_fits(&self, volume: &Volume) -> Result<(), SessionError> {
        let needed = volume.byte_size();
        if needed > self.memory_budget {
            return Err(SessionError::TooLarge {
                needed,
                budget: self.memory_budget,
            });
        }
        Ok(())
    }
}

/// What `PUT /session/` and `GET /session/{id}` report (MONAI Label's session-info fields, minus server paths).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub name: String,
    pub image: String,
    pub meta: SessionMeta,
    pub create_ts: u64,
    pub last_access_ts: u64,
    pub expiry: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionMeta {
    pub shape: [usize; 3],
    pub datatype: String,
    pub bytes: usize,
    pub compressed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "the volume needs {needed} bytes, more than the session memory budget of {budget} bytes"
    )]
    TooLarge { needed: usize, budget: usize },
    /// The shared store did not answer, or answered with an error: a server fault, not the client's.
    #[error("the session store ({store}) is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
}

/// Where sessions live. Every method but [`SessionStore::sweep`] and [`SessionStore::usage`] may reach a peer,
/// and fails with [`SessionError::Unavailable`] rather than wait past its timeout.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    fn limits(&self) -> &SessionLimits;

    /// `memory` or `redis`, for logs and `/health`.
    fn kind(&self) -> &'static str;

    /// Stores a volume under `id` (a fresh id, or a series fetched from a PACS keyed by its UID), replacing
    /// what was there.
    async fn insert(
        &self,
        id: String,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<SessionInfo, SessionError>;

    /// The session's volume, refreshing its expiry; `None` if unknown, expired or (in memory) evicted.
    async fn volume(&self, id: &str) -> Result<Option<Arc<Volume>>, SessionError>;

    /// The session's info; `refresh` also extends its expiry (`update_ts=true`).
    async fn info(&self, id: &str, refresh: bool) -> Result<Option<SessionInfo>, SessionError>;

    /// Ends a session everywhere; its info, or `None` if there was none.
    async fn remove(&self, id: &str) -> Result<Option<SessionInfo>, SessionError>;

    /// Drops this process's expired volumes now (a background task calls this periodically); how many.
    fn sweep(&self) -> usize;

    /// (volumes, bytes) this process holds.
    fn usage(&self) -> (usize, usize);

    /// A new session of `volume` under a fresh, unguessable id.
    async fn create(
        &self,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<SessionInfo, SessionError> {
        self.insert(
            uuid::Uuid::new_v4().to_string(),
            volume,
            image_name,
            requested_expiry,
        )
        .await
    }
}

/// Seconds since the Unix epoch.
fn epoch_secs(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn meta_of(volume: &Volume) -> SessionMeta {
    SessionMeta {
        shape: volume.geometry.shape,
        datatype: volume.data.datatype_name().to_owned(),
        bytes: volume.byte_size(),
        compressed: volume.was_compressed,
    }
}
