//! Sessions: decoded volumes kept in memory so a click with `session_id` skips upload and decode.
//! Expiry is sliding (each use refreshes it); a memory budget and a count bound evict the least recently
//! used sessions, which then answer 440 like expired ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use crate::nifti_io::Volume;

#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub default_expiry: Duration,
    pub max_expiry: Duration,
    pub memory_budget: usize,
    pub max_sessions: usize,
}

/// What `PUT /session/` and `GET /session/{id}` report (MONAI Label's session-info fields, minus server paths).
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub name: String,
    pub image: String,
    pub meta: SessionMeta,
    pub create_ts: u64,
    pub last_access_ts: u64,
    pub expiry: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionMeta {
    pub shape: [usize; 3],
    pub datatype: &'static str,
    pub bytes: usize,
    pub compressed: bool,
}

struct Entry {
    volume: Arc<Volume>,
    image_name: String,
    created: SystemTime,
    last_access: Instant,
    last_access_wall: SystemTime,
    expiry: Duration,
}

impl Entry {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_access) > self.expiry
    }

    fn info(&self, id: &str) -> SessionInfo {
        let epoch = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        SessionInfo {
            name: id.to_owned(),
            image: self.image_name.clone(),
            meta: SessionMeta {
                shape: self.volume.geometry.shape,
                datatype: self.volume.data.datatype_name(),
                bytes: self.volume.byte_size(),
                compressed: self.volume.was_compressed,
            },
            create_ts: epoch(self.created),
            last_access_ts: epoch(self.last_access_wall),
            expiry: self.expiry.as_secs(),
        }
    }
}

#[derive(Default)]
struct Store {
    entries: HashMap<String, Entry>,
    used_bytes: usize,
}

impl Store {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        self.used_bytes -= entry.volume.byte_size();
        Some(entry)
    }

    fn drop_expired(&mut self, now: Instant) -> usize {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remove(id);
        }
        expired.len()
    }

    fn evict_least_recently_used(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_access)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => {
                tracing::info!(session = %id, "session evicted (memory or count bound)");
                self.remove(&id);
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "the volume needs {needed} bytes, more than the session memory budget of {budget} bytes"
    )]
    TooLarge { needed: usize, budget: usize },
}

pub struct SessionStore {
    limits: SessionLimits,
    store: Mutex<Store>,
}

impl SessionStore {
    pub fn new(limits: SessionLimits) -> Self {
        SessionStore {
            limits,
            store: Mutex::new(Store::default()),
        }
    }

    /// The expiry a request gets: 0 or absent means the default; anything else is capped at the maximum.
    pub fn expiry_for(&self, requested_secs: Option<u64>) -> Duration {
        match requested_secs {
            None | Some(0) => self.limits.default_expiry,
            Some(secs) => Duration::from_secs(secs).min(self.limits.max_expiry),
        }
    }

    pub fn create(
        &self,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<(String, SessionInfo), SessionError> {
        self.insert(
            uuid::Uuid::new_v4().to_string(),
            volume,
            image_name,
            requested_expiry,
        )
    }

    /// Stores a volume under `id` (a series fetched from a PACS, keyed by its UID), replacing what was there.
    pub fn insert(
        &self,
        id: String,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<(String, SessionInfo), SessionError> {
        let needed = volume.byte_size();
        if needed > self.limits.memory_budget {
            return Err(SessionError::TooLarge {
                needed,
                budget: self.limits.memory_budget,
            });
        }
        let now = Instant::now();
        let entry = Entry {
            volume,
            image_name,
            created: SystemTime::now(),
            last_access: now,
            last_access_wall: SystemTime::now(),
            expiry: self.expiry_for(requested_expiry),
        };
        let info = entry.info(&id);
        let mut store = self.store.lock();
        store.remove(&id);
        store.drop_expired(now);
        while store.used_bytes + needed > self.limits.memory_budget
            || store.entries.len() >= self.limits.max_sessions
        {
            if !store.evict_least_recently_used() {
                break;
            }
        }
        store.used_bytes += needed;
        store.entries.insert(id.clone(), entry);
        Ok((id, info))
    }

    /// The session's volume, refreshing its expiry; `None` if unknown, expired or evicted.
    pub fn volume(&self, id: &str) -> Option<Arc<Volume>> {
        self.touch(id, true).map(|(volume, _)| volume)
    }

    /// The session's info; `refresh` also extends its expiry (`update_ts=true`).
    pub fn info(&self, id: &str, refresh: bool) -> Option<SessionInfo> {
        self.touch(id, refresh).map(|(_, info)| info)
    }

    fn touch(&self, id: &str, refresh: bool) -> Option<(Arc<Volume>, SessionInfo)> {
        let now = Instant::now();
        let mut store = self.store.lock();
        if store.entries.get(id)?.expired(now) {
            store.remove(id);
            return None;
        }
        let entry = store.entries.get_mut(id)?;
        if refresh {
            entry.last_access = now;
            entry.last_access_wall = SystemTime::now();
        }
        Some((entry.volume.clone(), entry.info(id)))
    }

    pub fn remove(&self, id: &str) -> Option<SessionInfo> {
        self.store.lock().remove(id).map(|entry| entry.info(id))
    }

    /// Drops expired sessions now (a background task calls this periodically); returns how many.
    pub fn sweep(&self) -> usize {
        self.store.lock().drop_expired(Instant::now())
    }

    /// (session count, bytes held).
    pub fn usage(&self) -> (usize, usize) {
        let store = self.store.lock();
        (store.entries.len(), store.used_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti_io::tests::synthetic_nifti;
    use crate::nifti_io::{decode, DecodeLimits};

    fn volume(voxels: usize) -> Arc<Volume> {
        // A real decode of a tiny synthetic file keeps the store's accounting honest.
        let file = synthetic_nifti([voxels as u16, 1, 1], 2, 8, &vec![1u8; voxels], false);
        Arc::new(
            decode(
                &file,
                DecodeLimits {
                    max_decompressed_bytes: 1 << 20,
                },
            )
            .unwrap(),
        )
    }

    fn store(budget: usize, max_sessions: usize) -> SessionStore {
        SessionStore::new(SessionLimits {
            default_expiry: Duration::from_secs(60),
            max_expiry: Duration::from_secs(120),
            memory_budget: budget,
            max_sessions,
        })
    }

    #[test]
    fn expiry_defaults_and_caps() {
        let s = store(1 << 20, 10);
        assert_eq!(s.expiry_for(None), Duration::from_secs(60));
        assert_eq!(s.expiry_for(Some(0)), Duration::from_secs(60));
        assert_eq!(s.expiry_for(Some(5)), Duration::from_secs(5));
        assert_eq!(s.expiry_for(Some(10_000)), Duration::from_secs(120));
    }

    #[test]
    fn least_recently_used_is_evicted_beyond_the_budget() {
        let per = volume(1000).byte_size();
        let s = store(per * 2, 10);
        let (a, _) = s.create(volume(1000), "a".into(), None).unwrap();
        let (b, _) = s.create(volume(1000), "b".into(), None).unwrap();
        assert!(s.volume(&a).is_some()); // a is now more recent than b
        let (c, _) = s.create(volume(1000), "c".into(), None).unwrap();
        assert!(s.volume(&b).is_none(), "b was least recently used");
        assert!(s.volume(&a).is_some() && s.volume(&c).is_some());
        assert_eq!(s.usage(), (2, per * 2));
    }

    #[test]
    fn count_bound_and_too_large() {
        let s = store(1 << 20, 1);
        let (a, _) = s.create(volume(10), "a".into(), None).unwrap();
        let (b, _) = s.create(volume(10), "b".into(), None).unwrap();
        assert!(s.volume(&a).is_none() && s.volume(&b).is_some());
        let tiny = store(100, 10);
        assert!(matches!(
            tiny.create(volume(1000), "x".into(), None),
            Err(SessionError::TooLarge { .. })
        ));
    }

    #[test]
    fn sliding_expiry() {
        // Margins of 0.8 s either side keep this stable on a loaded 2-core machine.
        let s = store(1 << 20, 10);
        let (a, _) = s.create(volume(10), "a".into(), Some(2)).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(s.volume(&a).is_some(), "use refreshes the expiry");
        std::thread::sleep(Duration::from_millis(1200));
        assert!(
            s.volume(&a).is_some(),
            "alive 2.4 s after creation thanks to the refresh"
        );
        std::thread::sleep(Duration::from_millis(2800));
        assert!(s.volume(&a).is_none());
        assert_eq!(s.usage(), (0, 0));
    }
}
