//! Work splitting for the fast ops: contiguous ranges of blocks on the inference's thread pool (tract's
//! executor, so one click uses the threads it was given and no more).

use std::sync::Arc;

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

/// The threads an op may use: tract's current executor's pool, or the calling thread alone.
pub struct Parallel {
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Parallel {
    /// The pool tract runs the current plan on (set by `multithread_tract_scope`).
    pub fn current() -> Self {
        match current_tract_executor() {
            Executor::MultiThread(pool) if pool.current_num_threads() > 1 => {
                Parallel { pool: Some(pool) }
            }
            _ => Parallel { pool: None },
        }
    }

    /// A private pool of `threads` (tests and benches).
    pub fn new(threads: usize) -> Self {
        let pool = (threads > 1).then(|| {
            Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool"),
            )
        });
        Parallel { pool }
    }

    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.current_num_threads())
    }

    /// Runs `f(scratch, block)` for every block in `0..blocks`, each thread taking one contiguous range with one
    /// scratch from `init`; returns the results in block order.
    pub fn map_blocks<S, R, I, F>(&self, blocks: usize, init: I, f: F) -> Vec<R>
    where
        R: Send,
        I: Fn() -> S + Sync,
        F: Fn(&mut S, usize) -> R + Sync,
    {
        let threads = self.threads().min(blocks).max(1);
        let range = |i: usize| (i * blocks / threads)..((i + 1) * blocks / threads);
        let run = |i: usize| {
            let mut scratch = init();
            range(i).map(|b| f(&mut scratch, b)).collect::<Vec<R>>()
        };
        match &self.pool {
            Some(pool) if threads > 1 => pool
                .install(|| {
                    (0..threads)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(run)
                        .collect::<Vec<_>>()
                })
                .into_iter()
                .flatten()
                .collect(),
            _ => run(0),
        }
    }

    /// Runs `f(block)` for every block in `0..blocks`.
    pub fn for_each<F: Fn(usize) + Sync>(&self, blocks: usize, f: F) {
        self.map_blocks(blocks, || (), |_, b| f(b));
    }
}

/// A raw pointer that may cross threads: each thread writes a disjoint part of what it points to.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);

// SAFETY: users guarantee that threads touch disjoint elements.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    pub fn get(self) -> *mut T {
        self.0
    }
}
