//! Shared prompt prefixes of a shard: the keys and values of finished
//! sessions' histories, kept read-only so that a new session whose history
//! starts the same way (the same system prompt, a chat's earlier turns)
//! copies them instead of computing them again. Bounded in count and in
//! bytes; the least recently used go first, and all of them give way
//! before any running session would be refused room.
//!
//! A prefix serves only sessions of the owner whose session left it: the
//! answer to an open says how much of a history is cached, which would tell
//! another peer what someone else's prompts began with.

use std::time::Instant;

use fogmesh_models::SessionCache;

/// Prefixes kept at most per shard.
pub const MAX_PREFIXES: usize = 8;
/// Shorter common prefixes are not worth a copy.
pub const MIN_PREFIX_TOKENS: usize = 16;

struct Entry {
    owner: String,
    tokens: Vec<u32>,
    cache: SessionCache,
    last_used: Instant,
}

/// A shard's shared prefixes.
#[derive(Default)]
pub struct Prefixes {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Prefixes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefixes").field("entries", &self.entries.len()).field("bytes", &self.bytes()).finish()
    }
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Prefixes {
    /// Bytes the kept prefixes hold.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.memory_bytes()).sum()
    }

    /// Starts `cache` (empty) with the longest prefix `owner` left here
    /// that `history` shares, leaving at least its last token to compute (its logits are
    /// needed); returns how many tokens it holds now (0: no use).
    pub fn load_into(&mut self, owner: &str, history: &[u32], cache: &mut SessionCache) -> usize {
        let most = history.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.owner == owner)
            .map(|e| (common(&e.tokens, history).min(most).min(e.cache.pos()), e))
            .filter(|(n, _)| *n >= MIN_PREFIX_TOKENS)
            .max_by_key(|(n, e)| (*n, e.last_used));
        let Some((n, e)) = best else { return 0 };
        if cache.load_prefix(&e.cache, n).is_err() {
            return 0;
        }
        e.last_used = Instant::now();
        n
    }

    /// Keeps `cache` (cut to `tokens`) as a prefix of `owner`'s, unless one
    /// of its kept ones already covers it; its kept ones it covers go. Past [`MAX_PREFIXES`] or
    /// `max_bytes`, the least recently used go.
    pub fn keep(&mut self, owner: &str, tokens: Vec<u32>, mut cache: SessionCache, max_bytes: usize) {
        if tokens.len() < MIN_PREFIX_TOKENS || cache.pos() < tokens.len() {
            return;
        }
        let mine = |e: &Entry| e.owner == owner;
        if let Some(e) = self.entries.iter_mut().find(|e| mine(e) && common(&e.tokens, &tokens) == tokens.len()) {
            e.last_used = Instant::now();
            return;
        }
        self.entries.retain(|e| !mine(e) || common(&e.tokens, &tokens) < e.tokens.len());
        cache.shrink_to(tokens.len());
        self.entries.push(Entry { owner: owner.to_string(), tokens, cache, last_used: Instant::now() });
        while self.entries.len() > MAX_PREFIXES || (self.bytes() > max_bytes && !self.entries.is_empty()) {
            self.drop_oldest();
        }
    }

    /// Drops the least recently used prefix; false when none is left.
    pub fn drop_oldest(&mut self) -> bool {
        let Some(i) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else { return false };
        self.entries.remove(i);
        true
    }
}
