//! Which waiting steps share a shard's next forward pass (sans-I/O).
//!
//! Continuous batching: whenever a pass ends, the next one takes what has
//! come in meanwhile. Decode-sized steps go first, so a long prompt never
//! stalls anyone's next token; prompt chunks then fill the pass up to its
//! token bound. Within each kind, owners take turns (each owner's oldest
//! step, then each one's next, …; arrival order within an owner), so an
//! owner with many sessions cannot crowd out one with few. A session contributes
//! at most its earliest waiting step (its steps build on each other), and a
//! session whose earliest step does not fit waits whole. A pass is never
//! empty: a step bigger than the bound runs alone when it is the oldest and
//! nothing else fits. Prompt chunks wait only while decode steps fill the
//! bound, which a bound above the prompt chunk plus one token per session
//! never allows (the runtime's defaults: 256 against 64 + 64).

/// How long a pass may wait at most for sessions that come back quickly
/// (their next step follows their last result within this), so that they
/// share it rather than each wait a whole pass; never more than a quarter of
/// the last pass's time.
pub const LINGER_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// Steps of at most this many tokens count as decode steps.
pub const DECODE_TOKENS: usize = 4;

/// A waiting step as the batcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// Its session.
    pub session: u64,
    /// The peer that owns its session (any value that tells owners apart).
    pub owner: u64,
    /// Its tokens (input rows).
    pub tokens: usize,
}

/// Indexes into `waiting` (oldest first) of the steps of the next pass, in
/// ascending order, at most `max_tokens` tokens in all unless the oldest
/// step alone is bigger (then it runs alone).
pub fn pick(waiting: &[Waiting], max_tokens: usize) -> Vec<usize> {
    let mut taken: Vec<usize> = Vec::new();
    let mut used = 0;
    // A session's earliest waiting step, and whether it is decode-sized.
    let mut seen: Vec<u64> = Vec::new();
    let mut heads: Vec<usize> = Vec::new();
    for (i, w) in waiting.iter().enumerate() {
        if !seen.contains(&w.session) {
            seen.push(w.session);
            heads.push(i);
        }
    }
    for small in [true, false] {
        // This kind's heads, owners taking turns: by each head's rank among
        // its owner's heads of this kind, then by arrival.
        let mut turn: Vec<(usize, usize)> = Vec::new();
        let mut per_owner: Vec<(u64, usize)> = Vec::new();
        for &i in &heads {
            let w = waiting[i];
            if (w.tokens <= DECODE_TOKENS) != small {
                continue;
            }
            let rank = match per_owner.iter_mut().find(|(o, _)| *o == w.owner) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    per_owner.push((w.owner, 0));
                    0
                }
            };
            turn.push((rank, i));
        }
        turn.sort_unstable();
        for (_, i) in turn {
            let w = waiting[i];
            if used + w.tokens <= max_tokens || (taken.is_empty() && i == 0) {
                taken.push(i);
                used += w.tokens;
            }
        }
    }
    if taken.is_empty() && !waiting.is_empty() {
        taken.push(0);
    }
    taken.sort_unstable();
    taken
}

#[cfg(test)]
mod tests {
    use super::{Waiting, pick};

    fn w(session: u64, tokens: usize) -> Waiting {
        Waiting { session, owner: 0, tokens }
    }

    fn wo(session: u64, owner: u64, tokens: usize) -> Waiting {
        Waiting { session, owner, tokens }
    }

    #[test]
    fn owners_take_turns_when_the_bound_is_tight() {
        // Owner 1's four prompts arrived before owner 2's one: with room for
        // two chunks, owner 2's goes in beside owner 1's oldest.
        let q = [wo(1, 1, 64), wo(2, 1, 64), wo(3, 1, 64), wo(4, 1, 64), wo(5, 2, 64)];
        assert_eq!(pick(&q, 128), vec![0, 4]);
        // Decode steps too: 6 of owner 1, then 2 of owner 2, room for 4.
        let d: Vec<Waiting> = (0..6).map(|s| wo(s, 1, 1)).chain((6..8).map(|s| wo(s, 2, 1))).collect();
        assert_eq!(pick(&d, 4), vec![0, 1, 6, 7]);
        // With room for all, everyone goes.
        assert_eq!(pick(&d, 64).len(), 8);
    }

    #[test]
    fn decode_steps_go_first_and_prompt_chunks_fill_the_rest() {
        // A long prompt's chunks arrived before three decode steps.
        let q = [w(1, 64), w(1, 64), w(2, 1), w(3, 1), w(1, 64), w(4, 1)];
        assert_eq!(pick(&q, 128), vec![0, 2, 3, 5]);
        // Too small a bound for the chunk: the decode steps still run.
        assert_eq!(pick(&q, 16), vec![2, 3, 5]);
    }

    #[test]
    fn one_step_per_session_and_a_pass_is_never_empty() {
        assert_eq!(pick(&[w(7, 1), w(7, 1), w(8, 1)], 64), vec![0, 2]);
        assert_eq!(pick(&[w(7, 500), w(8, 300)], 256), vec![0]);
        assert_eq!(pick(&[], 256), Vec::<usize>::new());
        // A session whose earliest step does not fit is not served a later one.
        assert_eq!(pick(&[w(1, 2), w(2, 200), w(2, 1), w(3, 100)], 128), vec![0, 3]);
    }

    #[test]
    fn the_bound_holds_unless_one_step_alone_exceeds_it() {
        let q: Vec<Waiting> = (0..40).map(|s| w(s, if s % 5 == 0 { 64 } else { 1 })).collect();
        for max in [1, 8, 32, 64, 100, 256] {
            let p = pick(&q, max);
            let used: usize = p.iter().map(|&i| q[i].tokens).sum();
            assert!(used <= max.max(q[0].tokens), "{max}: {used}");
            assert!(!p.is_empty());
        }
    }
}
