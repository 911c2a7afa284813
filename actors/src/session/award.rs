//! Choosing a session's route: among the layout's routes by gossip, then
//! each hop by bids: where other peers hold a hop's exact layers (whole
//! replicas, stage copies), they bid for it and the lowest expected
//! completion serves it.

use std::time::Instant;

use super::SessionState;
use crate::policy::Hop;

/// Hop choices made in turn so far (by [`crate::policy::HopChoice::RoundRobin`]).
static TURN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl SessionState {
    /// Takes the route of `routes` gossip expects soonest done; then, where
    /// other peers already hold a hop's exact layers, the holders bid for it
    /// (the chosen peer always among them) and the lowest expected
    /// completion serves it; a holder that keeps this conversation's earlier
    /// turns bids for the rest of the history only.
    pub(super) async fn award_hops(&mut self, mut routes: Vec<Vec<Hop>>, tokens: usize) -> Vec<Hop> {
        self.promises.clear();
        let banned = self.bans.banned(Instant::now());
        let view = self.rt.view().await;
        let pick = crate::policy::choose_route(&routes, &view, &self.model.costs);
        if pick >= routes.len() {
            return Vec::new();
        }
        let mut route = routes.swap_remove(pick);
        // Where this owner's earlier conversation with the same start was
        // left: that holder computes only the rest.
        let held = self.state.as_ref().map(|g| self.rt.prefix_holders(g.history())).unwrap_or_default();
        for i in 0..route.len() {
            let range = (route[i].start as u32, route[i].end as u32);
            let mut cands = vec![route[i].peer.clone()];
            for v in &view {
                let fit = v.shards.contains(&range) && v.models.contains(&self.model.hash);
                if fit && !banned.contains(&v.peer) && !route.iter().any(|h| h.peer == v.peer) && !cands.contains(&v.peer) {
                    cands.push(v.peer.clone());
                }
            }
            if cands.len() < 2 {
                continue;
            }
            let how = self.rt.config().hop_choice;
            if let Some(k) = crate::policy::baseline_choice(how, &cands, &view, TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                route[i].peer = cands[k].clone();
                continue;
            }
            let (start, end) = (route[i].start, route[i].end);
            let cached = held.iter().find(|h| h.hop.start == start && h.hop.end == end && cands.contains(&h.hop.peer));
            let cached = cached.map(|h| (h.hop.peer.as_str(), h.tokens.min(tokens)));
            if let Some((winner, promise)) = self.rt.auction(&cands, start..end, tokens, cached).await {
                tracing::debug!(layers = ?(range.0..range.1), candidates = cands.len(), winner = %winner, "hop awarded by bids");
                if promise.is_finite() {
                    self.promises.push((winner.clone(), promise));
                }
                route[i].peer = winner;
            }
        }
        route
    }
}
