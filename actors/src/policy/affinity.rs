//! Where a conversation's keys and values still are: the routes of this
//! owner's finished sessions, by the history each left. A stage keeps a
//! finished session's history as a shared prefix for the same owner; a
//! follow-up whose history starts the same way is cheaper there, by the
//! tokens it need not compute again. Bounded in entries and in tokens.

use std::collections::VecDeque;

use super::Hop;

/// Finished sessions remembered at most.
pub const MAX_ENTRIES: usize = 64;
/// History tokens remembered at most, over all entries.
pub const MAX_TOKENS: usize = 256 * 1024;
/// Shorter common prefixes are not worth steering a request for (a stage
/// keeps none shorter either).
pub const MIN_TOKENS: usize = 16;

/// A hop of a remembered route and how many tokens of a new history it
/// holds already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The hop (peer and layers) holding them.
    pub hop: Hop,
    /// Tokens of the new history it holds.
    pub tokens: usize,
}

/// The routes of finished sessions by their histories, newest first.
#[derive(Debug, Default)]
pub struct PrefixRoutes {
    entries: VecDeque<(Vec<u32>, Vec<Hop>)>,
    tokens: usize,
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixRoutes {
    /// Remembers that `route` served a session whose history was
    /// `history`. An entry that a newer one extends is dropped; the oldest
    /// go past the bounds. Histories longer than [`MAX_TOKENS`] keep their
    /// start.
    pub fn remember(&mut self, history: &[u32], route: &[Hop]) {
        if history.len() < MIN_TOKENS || route.is_empty() {
            return;
        }
        let history = &history[..history.len().min(MAX_TOKENS)];
        let tokens = &mut self.tokens;
        self.entries.retain(|(h, r)| {
            let superseded = r == route && common(h, history) == h.len();
            if superseded {
                *tokens -= h.len();
            }
            !superseded
        });
        self.entries.push_front((history.to_vec(), route.to_vec()));
        self.tokens += history.len();
        while self.entries.len() > MAX_ENTRIES || self.tokens > MAX_TOKENS {
            let Some((h, _)) = self.entries.pop_back() else { break };
            self.tokens -= h.len();
        }
    }

    /// The hops of the remembered route sharing the longest prefix with
    /// `history` (at least [`MIN_TOKENS`]; ties to the newest), each with
    /// that prefix's length.
    pub fn holders(&self, history: &[u32]) -> Vec<Held> {
        let mut best: Option<(usize, &Vec<Hop>)> = None;
        for (h, r) in &self.entries {
            let n = common(h, history);
            if n >= MIN_TOKENS && best.is_none_or(|(b, _)| n > b) {
                best = Some((n, r));
            }
        }
        best.map(|(n, r)| r.iter().map(|hop| Held { hop: hop.clone(), tokens: n }).collect()).unwrap_or_default()
    }

    /// Entries and tokens held (diagnostics, tests).
    pub fn size(&self) -> (usize, usize) {
        (self.entries.len(), self.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(p: &str) -> Vec<Hop> {
        vec![Hop { peer: p.into(), start: 0, end: 30 }]
    }

    #[test]
    fn a_follow_up_finds_the_route_of_its_conversation() {
        let mut m = PrefixRoutes::default();
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (100..140).collect();
        m.remember(&a, &hop("pa"));
        m.remember(&b, &hop("pb"));
        let follow: Vec<u32> = a.iter().copied().chain(500..520).collect();
        let held = m.holders(&follow);
        assert_eq!(held, vec![Held { hop: hop("pa")[0].clone(), tokens: 40 }]);
        // Too short a common start: nothing.
        let other: Vec<u32> = (0..10).chain(900..950).collect();
        assert!(m.holders(&other).is_empty());
        // The conversation goes on on the same route: one entry, extended.
        m.remember(&follow, &hop("pa"));
        assert_eq!(m.size(), (2, 100));
        assert_eq!(m.holders(&follow)[0].tokens, 60);
    }

    #[test]
    fn bounded_in_entries_and_tokens() {
        let mut m = PrefixRoutes::default();
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let h: Vec<u32> = (0..20).map(|t| t + i * 1000).collect();
            m.remember(&h, &hop("p"));
        }
        assert_eq!(m.size().0, MAX_ENTRIES);
        let long: Vec<u32> = (0..(MAX_TOKENS as u32 + 5)).collect();
        m.remember(&long, &hop("q"));
        assert!(m.size().1 <= MAX_TOKENS);
        assert_eq!(m.holders(&long)[0].tokens, MAX_TOKENS);
        // Nothing remembered of a route-less or short session.
        let before = m.size();
        m.remember(&[1, 2, 3], &hop("r"));
        m.remember(&long, &[]);
        assert_eq!(m.size(), before);
    }
}
