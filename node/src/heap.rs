//! Handing freed heap memory back to the system. glibc's allocator keeps
//! the pages a burst of work freed until told otherwise: after a join storm
//! (a few dozen connections at once, then trimmed to a handful) an idle
//! node of a 64-member mesh held ~40 MiB of heap, ~23 MiB of it free. A
//! node trims its heap every [`TRIM_EVERY`].

use std::time::Duration;

/// How often `fogmesh node` trims its heap.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Returns the heap's free pages to the system (glibc's `malloc_trim`);
/// whether any went. Does nothing under other allocators and C libraries.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks and only
        // releases pages no allocation uses.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims the heap every `period`, for as long as the task runs (off the
/// async threads: a trim walks the heap).
pub async fn trim_every(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if tokio::task::spawn_blocking(trim).await.is_err() {
            return;
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn a_trim_returns_the_pages_a_burst_freed() {
        // 200 000 small blocks (~54 MiB), then one more kept alive above
        // them: freeing the blocks leaves a hole glibc does not return by
        // itself (only the heap's top is returned on free).
        // (black_box: an optimized build would not allocate what nothing
        // reads.)
        let burst: Vec<Box<[u8; 256]>> = std::hint::black_box((0..200_000).map(|i| Box::new([i as u8; 256])).collect());
        let kept = std::hint::black_box(Box::new([7u8; 256]));
        drop(burst);
        let before = rss_bytes();
        assert!(trim(), "something to return");
        let after = rss_bytes();
        assert!(before.saturating_sub(after) > 20 << 20, "RSS {} MiB before the trim, {} MiB after", before >> 20, after >> 20);
        assert_eq!(kept[0], 7);
    }
}
