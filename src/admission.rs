//! Admission: which requests may use the CPU and memory now, which wait, and which get a 503 at once.
//!
//! * Two worker pools, one for decoding uploads and one for running the network, so that a session upload
//!   never queues behind clicks and a click with a session never queues behind uploads. Each pool lets
//!   `workers` requests work at once and `queue` more wait; beyond that a request is refused at once.
//! * One budget for the bytes that requests hold in flight (buffered uploads, volumes being decoded), so that
//!   concurrent large uploads wait or get a 503 instead of exhausting memory.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// A pool of workers behind a bounded queue.
pub struct Pool {
    name: &'static str,
    admission: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    worker_count: usize,
    capacity: usize,
}

impl Pool {
    pub fn new(name: &'static str, workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Pool {
            name,
            admission: Arc::new(Semaphore::new(workers + queue)),
            workers: Arc::new(Semaphore::new(workers)),
            worker_count: workers,
            capacity: workers + queue,
        }
    }

    /// A place in this pool (working or waiting), or 503 at once when every place is taken.
    pub fn admit(&self) -> Result<Ticket, ApiError> {
        let place = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded(self.name))?;
        Ok(Ticket {
            _place: place,
            workers: self.workers.clone(),
        })
    }

    /// Requests admitted (working or waiting) right now.
    pub fn admitted(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }

    /// Admitted requests whose work is running on a worker right now (the rest are queued).
    pub fn working(&self) -> usize {
        self.worker_count
            .saturating_sub(self.workers.available_permits())
    }
}

/// A request's place in a [`Pool`]; it runs its work once a worker is free.
pub struct Ticket {
    _place: OwnedSemaphorePermit,
    workers: Arc<Semaphore>,
}

/// Runs `work` on the blocking pool (where [`Ticket::work`] may wait for a worker), in the request's span; a
/// panic becomes a 500.
pub async fn off_runtime<T, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let span = tracing::Span::current();
    let result = tokio::task::spawn_blocking(move || span.in_scope(work)).await;
    result.unwrap_or_else(|join_error| {
        Err(ApiError::Internal(format!(
            "worker task failed: {join_error}"
        )))
    })
}

impl Ticket {
    /// Runs `work` on this (blocking-pool) thread once a worker is free, holding the worker while it runs.
    pub fn work<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError> {
        let _worker = self.worker()?;
        Ok(work())
    }

    /// Waits, on this (blocking-pool) thread, for a worker; it is given back when the permit is dropped.
    pub fn worker(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        tokio::runtime::Handle::current()
            .block_on(self.workers.clone().acquire_owned())
            .map_err(|_| ApiError::Internal("worker pool closed".into()))
    }
}

/// Where the CPU stages of a click run: the decode of an upload on a decode worker, the network on an
/// inference worker. [`Inline`] runs them on the caller's thread (tools, tests).
pub trait Stages {
    fn decode<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError>;
    fn infer<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError>;
}

/// Every stage on the caller's thread, with no admission.
pub struct Inline;

impl Stages for Inline {
    fn decode<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError> {
        Ok(work())
    }
    fn infer<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError> {
        Ok(work())
    }
}

/// A click's tickets: one for the inference pool, and one for the decode pool when it brings an upload (given
/// back as soon as the decode is done, so that clicks waiting for the network hold no place among decodes).
pub struct ClickTickets {
    decode: Cell<Option<Ticket>>,
    infer: Ticket,
}

impl ClickTickets {
    pub fn new(decode: Option<Ticket>, infer: Ticket) -> Self {
        ClickTickets {
            decode: Cell::new(decode),
            infer,
        }
    }
}

impl Stages for ClickTickets {
    fn decode<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError> {
        match self.decode.take() {
            Some(ticket) => ticket.work(work),
            None => Ok(work()),
        }
    }
    fn infer<T>(&self, work: impl FnOnce() -> T) -> Result<T, ApiError> {
        self.infer.work(work)
    }
}

/// Bytes a request may hold without asking the budget: what a click with a session, a model list or a health
/// check needs, so that small requests never wait behind large uploads.
pub const SMALL_REQUEST_BYTES: usize = 64 << 10;

/// The budget for bytes held in flight by all requests together.
pub struct Budget {
    kib: Arc<Semaphore>,
    total_kib: usize,
    wait: Duration,
}

impl Budget {
    /// `total` bytes; a request waits up to `wait` for room before it is refused.
    pub fn new(total: usize, wait: Duration) -> Self {
        let total_kib = (total / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            kib: Arc::new(Semaphore::new(total_kib)),
            total_kib,
            wait,
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.total_kib * 1024
    }

    /// Bytes held by requests now.
    pub fn held_bytes(&self) -> usize {
        (self.total_kib - self.kib.available_permits()) * 1024
    }

    /// A reservation of nothing yet, to be grown as a request buffers.
    pub fn empty(&self) -> Reservation {
        Reservation {
            budget: self.kib.clone(),
            total_kib: self.total_kib,
            wait: self.wait,
            permit: None,
            kib: 0,
        }
    }

    /// Reserves `bytes`, waiting briefly for room (async side).
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, ApiError> {
        let mut reservation = self.empty();
        reservation.grow_to(bytes).await?;
        Ok(reservation)
    }

    /// Reserves `bytes` from a blocking-pool thread.
    pub fn reserve_blocking(&self, bytes: u64) -> Result<Reservation, ApiError> {
        tokio::runtime::Handle::current().block_on(self.reserve(bytes))
    }
}

/// Bytes held against the [`Budget`]; they return to it when this is dropped, whatever ends the request.
pub struct Reservation {
    budget: Arc<Semaphore>,
    total_kib: usize,
    wait: Duration,
    permit: Option<OwnedSemaphorePermit>,
    kib: usize,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.kib as u64 * 1024
    }

    /// The whole budget: no reservation can grow beyond it.
    pub fn limit(&self) -> u64 {
        self.total_kib as u64 * 1024
    }

    /// Grows the reservation to at least `bytes`; waits up to the budget's wait for room, then refuses with
    /// a 503. What can never fit the whole budget is refused at once with a 413.
    pub async fn grow_to(&mut self, bytes: u64) -> Result<(), ApiError> {
        let wanted_kib = bytes.div_ceil(1024);
        if wanted_kib > self.total_kib as u64 {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request needs {bytes} bytes in memory, more than this server lets all requests hold at once \
                 ({} bytes, --max-inflight-bytes)",
                self.total_kib * 1024
            )));
        }
        let wanted_kib = wanted_kib as usize;
        if wanted_kib <= self.kib {
            return Ok(());
        }
        let more = u32::try_from(wanted_kib - self.kib).map_err(|_| {
            ApiError::PayloadTooLarge(format!("the request needs {bytes} bytes in memory"))
        })?;
        let acquired =
            tokio::time::timeout(self.wait, self.budget.clone().acquire_many_owned(more)).await;
        let permit = match acquired {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(ApiError::Internal("memory budget closed".into())),
            Err(_) => return Err(ApiError::Overloaded("memory budget")),
        };
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.kib = wanted_kib;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_then_refuse_and_return_their_bytes_when_dropped() {
        let budget = Budget::new(10 << 20, Duration::from_millis(50));
        let first = budget.reserve(6 << 20).await.unwrap();
        assert_eq!(budget.held_bytes(), 6 << 20);
        match budget.reserve(6 << 20).await {
            Err(ApiError::Overloaded(_)) => {}
            other => panic!("expected a 503, got {:?}", other.err()),
        }
        assert!(matches!(
            budget.reserve(11 << 20).await,
            Err(ApiError::PayloadTooLarge(_))
        ));
        let mut growing = budget.empty();
        growing.grow_to(1 << 20).await.unwrap();
        growing.grow_to(3 << 20).await.unwrap();
        assert_eq!(budget.held_bytes(), 9 << 20);
        drop(first);
        drop(growing);
        assert_eq!(budget.held_bytes(), 0);
        // a waiting reservation gets the room freed while it waits
        let budget = Arc::new(Budget::new(4 << 20, Duration::from_secs(10)));
        let held = budget.reserve(4 << 20).await.unwrap();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(2 << 20).await.map(|r| r.bytes()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 2 << 20);
    }

    #[tokio::test]
    async fn a_full_pool_refuses_at_once_and_frees_places_as_tickets_end() {
        let pool = Pool::new("inference", 1, 1);
        let a = pool.admit().unwrap();
        let b = pool.admit().unwrap();
        assert!(matches!(
            pool.admit(),
            Err(ApiError::Overloaded("inference"))
        ));
        assert_eq!(pool.admitted(), 2);
        assert_eq!(off_runtime(move || a.work(|| 7)).await.unwrap(), 7);
        drop(b);
        assert_eq!(pool.admitted(), 0);
    }
}
