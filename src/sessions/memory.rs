//! The in-memory store: one process's sessions, under a memory budget and a count bound that evict the least
//! recently used, which then answer as expired ones do. Also the local volume cache of a [`super::RedisStore`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::{epoch_secs, meta_of, SessionError, SessionInfo, SessionLimits, SessionStore};
use crate::nifti_io::Volume;

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
        SessionInfo {
            name: id.to_owned(),
            image: self.image_name.clone(),
            meta: meta_of(&self.volume),
            create_ts: epoch_secs(self.created),
            last_access_ts: epoch_secs(self.last_access_wall),
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

pub struct MemoryStore {
    limits: SessionLimits,
    store: Mutex<Store>,
}

impl MemoryStore {
    pub fn new(limits: SessionLimits) -> Self {
        MemoryStore {
            limits,
            store: Mutex::new(Store::default()),
        }
    }

    /// Stores a volume under `id`, replacing what was there, and evicting the least recently used beyond the
    /// budget or the count bound.
    pub fn insert(
        &self,
        id: String,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<SessionInfo, SessionError> {
        self.limits.check_fits(&volume)?;
        let needed = volume.byte_size();
        let now = Instant::now();
        let entry = Entry {
            volume,
            image_name,
            created: SystemTime::now(),
            last_access: now,
            last_access_wall: SystemTime::now(),
            expiry: self.limits.expiry_for(requested_expiry),
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
        store.entries.insert(id, entry);
        Ok(info)
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

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn insert(
        &self,
        id: String,
        volume: Arc<Volume>,
        image_name: String,
        requested_expiry: Option<u64>,
    ) -> Result<SessionInfo, SessionError> {
        MemoryStore::insert(self, id, volume, image_name, requested_expiry)
    }

    async fn volume(&self, id: &str) -> Result<Option<Arc<Volume>>, SessionError> {
        Ok(MemoryStore::volume(self, id))
    }

    async fn info(&self, id: &str, refresh: bool) -> Result<Option<SessionInfo>, SessionError> {
        Ok(MemoryStore::info(self, id, refresh))
    }

    async fn remove(&self, id: &str) -> Result<Option<SessionInfo>, SessionError> {
        Ok(MemoryStore::remove(self, id))
    }

    fn sweep(&self) -> usize {
        MemoryStore::sweep(self)
    }

    fn usage(&self) -> (usize, usize) {
        MemoryStore::usage(self)
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

    fn store(budget: usize, max_sessions: usize) -> MemoryStore {
        MemoryStore::new(SessionLimits {
            default_expiry: Duration::from_secs(60),
            max_expiry: Duration::from_secs(120),
            memory_budget: budget,
            max_sessions,
        })
    }

    /// Stores a volume of `voxels` under `id` (also its image name); the id back.
    fn add(s: &MemoryStore, id: &str, voxels: usize, expiry: Option<u64>) -> String {
        s.insert(id.into(), volume(voxels), id.into(), expiry)
            .unwrap()
            .name
    }

    #[test]
    fn expiry_defaults_and_caps() {
        let s = store(1 << 20, 10);
        assert_eq!(s.limits.expiry_for(None), Duration::from_secs(60));
        assert_eq!(s.limits.expiry_for(Some(0)), Duration::from_secs(60));
        assert_eq!(s.limits.expiry_for(Some(5)), Duration::from_secs(5));
        assert_eq!(s.limits.expiry_for(Some(10_000)), Duration::from_secs(120));
    }

    #[test]
    fn least_recently_used_is_evicted_beyond_the_budget() {
        let per = volume(1000).byte_size();
        let s = store(per * 2, 10);
        let a = add(&s, "a", 1000, None);
        let b = add(&s, "b", 1000, None);
        assert!(s.volume(&a).is_some()); // a is now more recent than b
        let c = add(&s, "c", 1000, None);
        assert!(s.volume(&b).is_none(), "b was least recently used");
        assert!(s.volume(&a).is_some() && s.volume(&c).is_some());
        assert_eq!(s.usage(), (2, per * 2));
    }

    #[test]
    fn count_bound_and_too_large() {
        let s = store(1 << 20, 1);
        let a = add(&s, "a", 10, None);
        let b = add(&s, "b", 10, None);
        assert!(s.volume(&a).is_none() && s.volume(&b).is_some());
        let tiny = store(100, 10);
        assert!(matches!(
            tiny.insert("x".into(), volume(1000), "x".into(), None),
            Err(SessionError::TooLarge { .. })
        ));
    }

    #[test]
    fn sliding_expiry() {
        // Margins of 0.8 s either side keep this stable on a loaded 2-core machine.
        let s = store(1 << 20, 10);
        let a = add(&s, "a", 10, Some(2));
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
