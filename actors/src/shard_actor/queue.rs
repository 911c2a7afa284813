//! A shard's waiting stage requests, counted in all and per session owner.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::link::PeerKey;

/// A shard's waiting stage requests, counted in all and per session owner:
/// one owner may hold at most half the queue, so another's next step still
/// gets in.
#[derive(Debug, Default)]
pub struct WorkQueue {
    total: AtomicUsize,
    by_owner: Mutex<HashMap<PeerKey, usize>>,
}

impl WorkQueue {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts one more request of `owner`, or says why not: `max` wait in
    /// all, or `owner` already has half of them waiting.
    pub fn enter(&self, owner: &str, max: usize) -> Result<(), String> {
        let mut by = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        let share = (max / 2).max(1);
        let mine = by.get(owner).copied().unwrap_or(0);
        if self.len() >= max {
            return Err(format!("{max} stage requests already wait here"));
        }
        if mine >= share {
            return Err(format!("{owner} already has {mine} stage requests waiting here, its share of {max}"));
        }
        *by.entry(owner.to_string()).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One request of `owner` left the queue.
    pub fn leave(&self, owner: &str) {
        let mut by = self.by_owner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                by.remove(owner);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WorkQueue;

    #[test]
    fn one_owner_fills_at_most_half_the_queue_and_another_still_gets_in() {
        let q = WorkQueue::default();
        for _ in 0..4 {
            q.enter("flood", 8).unwrap();
        }
        assert!(q.enter("flood", 8).unwrap_err().contains("its share"));
        for _ in 0..4 {
            q.enter("calm", 8).unwrap();
        }
        assert!(q.enter("third", 8).unwrap_err().contains("already wait"));
        q.leave("flood");
        q.enter("third", 8).unwrap();
        assert_eq!(q.len(), 8);
        // A leave of an owner with nothing waiting changes nothing.
        q.leave("nobody");
        assert_eq!(q.len(), 8);
    }
}
