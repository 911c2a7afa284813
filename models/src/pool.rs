//! A small fork-join thread pool for the engine's parallel loops.
//!
//! A decode step runs a few hundred short parallel loops (a few microseconds
//! each), so waking threads through the OS each time would cost more than the
//! work. Workers spin for a short while after each job and only then sleep on a
//! condition variable. The calling thread takes part as worker 0. Calls from
//! several threads are serialized: one loop runs at a time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins before a worker sleeps (a few tens of microseconds).
const SPINS: u32 = 1 << 16;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for each job; workers run a job when they see it change.
    epoch: AtomicU64,
    /// The current job; valid while `pending > 0`.
    job: Mutex<Option<SendJob>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    panicked: AtomicBool,
    /// Set by [`ThreadPool::rest`]: workers sleep at once instead of spinning.
    resting: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the job is `Sync` and outlives every use (the caller waits for all
// workers before returning).
unsafe impl Send for SendJob {}

/// A fixed set of threads that run fork-join loops.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers.
    call: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool").field("threads", &self.threads()).finish()
    }
}

impl ThreadPool {
    /// A pool of `threads` threads in all (the caller counts as one); at least one.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            resting: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("fogmesh-compute-{idx}"))
                    .spawn(move || worker(s, idx))
            })
            .filter_map(|h| h.ok())
            .collect();
        ThreadPool { shared, workers, call: Mutex::new(()) }
    }

    /// Threads that run each loop, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every `i` in `0..threads()`, each on its own thread, and
    /// returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let n = self.workers.len();
        if n == 0 {
            f(0);
            return;
        }
        let _serial = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erase the lifetime; we do not return before every worker has
        // finished with the job (`pending` reaches zero below).
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.resting.store(false, SeqCst);
        s.pending.store(n, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            drop(s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner()));
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        while s.pending.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a compute thread panicked");
        }
    }

    /// Lets the workers sleep now rather than spin for the next loop: for
    /// the end of a forward pass, so that the cores go to whatever else the
    /// process has to do (the next loop wakes them).
    pub fn rest(&self) {
        self.shared.resting.store(true, SeqCst);
    }

    /// Splits `0..total` into one contiguous chunk per thread (chunk edges on
    /// multiples of `align`) and runs `f(start, end)` on each non-empty chunk.
    pub fn run_split(&self, total: usize, align: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        let align = align.max(1);
        if n == 1 || total <= align {
            f(0, total);
            return;
        }
        let units = total.div_ceil(align);
        self.run(&|i| {
            let a = (units * i / n * align).min(total);
            let b = (units * (i + 1) / n * align).min(total);
            if a < b {
                f(a, b);
            }
        });
    }
}

fn worker(s: Arc<Shared>, idx: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.stop.load(SeqCst) {
                return;
            }
            let e = s.epoch.load(SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < SPINS && !s.resting.load(SeqCst) {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            if s.epoch.load(SeqCst) == seen && !s.stop.load(SeqCst) {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            } else {
                drop(guard);
            }
            s.sleepers.fetch_sub(1, SeqCst);
            spins = 0;
        }
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendJob(job)) = job {
            // SAFETY: the job stays alive until `pending` reaches zero.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| f(idx))).is_err() {
                s.panicked.store(true, SeqCst);
            }
        }
        s.pending.fetch_sub(1, SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        drop(self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_split_covers_every_index_once() {
        for threads in 1..=4 {
            let pool = ThreadPool::new(threads);
            for total in [0usize, 1, 3, 4, 17, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
                pool.run_split(total, 4, &|a, b| {
                    assert!(a % 4 == 0);
                    for h in &hits[a..b] {
                        h.fetch_add(1, SeqCst);
                    }
                });
                assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "threads {threads} total {total}");
            }
        }
    }

    #[test]
    fn pool_survives_many_jobs_and_sleeping_workers() {
        let pool = ThreadPool::new(3);
        let count = AtomicUsize::new(0);
        for round in 0..2000 {
            pool.run(&|_| {
                count.fetch_add(1, SeqCst);
            });
            if round == 1000 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        assert_eq!(count.load(SeqCst), 6000);
    }
}
