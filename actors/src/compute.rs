//! The compute thread: one long-lived thread runs every forward pass of this
//! peer, fed through a bounded queue.
//!
//! The shards' thread pool serializes passes anyway, and staying on one thread
//! (which the OS keeps on one core) keeps caches warm, unlike a hop through
//! tokio's blocking pool per pass.

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

type Job = Box<dyn FnOnce() + Send>;

/// Forward passes wait here at most (beyond: BUSY).
pub const COMPUTE_QUEUE: usize = 1024;

/// Why a job did not run to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ComputeError {
    /// [`COMPUTE_QUEUE`] jobs already wait; nothing ran.
    #[error("the compute queue is full")]
    Full,
    /// The job panicked (or the thread is gone); its work is lost.
    #[error("the forward pass panicked")]
    Panicked,
}

/// A handle to the compute thread; cheap to clone. The thread ends when the
/// last handle is dropped.
#[derive(Debug, Clone)]
pub struct Compute(SyncSender<Job>);

impl Compute {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Compute> {
        let (tx, rx) = sync_channel::<Job>(COMPUTE_QUEUE);
        std::thread::Builder::new().name("fogmesh-compute".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                // A panicking pass drops its reply sender: its caller hears of it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(Compute(tx))
    }

    /// Runs `f` on the compute thread and waits for its result. Cancel-safe:
    /// dropping the future leaves the job to run, its result unread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ComputeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.0.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => ComputeError::Full,
            TrySendError::Disconnected(_) => ComputeError::Panicked,
        })?;
        rx.await.map_err(|_| ComputeError::Panicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_return_their_results_and_a_panic_is_an_error() {
        let c = Compute::start().unwrap();
        assert_eq!(c.run(|| 6 * 7).await, Ok(42));
        let r: Result<(), _> = c.run(|| panic!("boom")).await;
        assert_eq!(r, Err(ComputeError::Panicked));
        // The thread survives a panicking job.
        assert_eq!(c.run(|| "still here").await, Ok("still here"));
    }
}
