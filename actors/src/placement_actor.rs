//! PlacementActor: looks at the membership view every interval, computes the
//! plan (the same one every peer computes from the same view), loads this
//! peer's own ranges ahead of the first session and unloads idle ranges the
//! plan no longer gives it.

use std::ops::Range;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::host::Host;
use crate::error::RuntimeError;
use crate::link::PeerView;
use crate::model::ModelInfo;
use crate::policy::{self, Hop};

/// What the placement actor needs of its peer beyond [`Host`]: the view
/// and the model, and loading and unloading this peer's shards.
#[async_trait::async_trait]
pub trait PlacementHost: Host {
    /// The model this peer holds.
    fn model(&self) -> Option<&Arc<ModelInfo>>;
    /// The peers as placement sees them (this one included).
    async fn view(&self) -> Vec<PeerView>;
    /// Unloads shards outside `keep` that serve no session.
    async fn unload_except(&self, keep: &[Range<usize>]);
    /// Loads `range` unless it is loaded.
    async fn load(&self, range: Range<usize>) -> Result<(), RuntimeError>;
    /// Whether a standby copy of `range` fits.
    async fn room_for(&self, range: Range<usize>) -> bool;
    /// Whether the weights of `range` are all here (a model held whole, or
    /// every chunk of the range fetched).
    fn holds(&self, range: Range<usize>) -> bool;
}

/// A plan that would have this peer fetch weights from peers is acted on
/// only once it has held this long: while peers join one by one, each
/// interim plan would cost a fetch of its ranges.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Messages of the [`PlacementActor`].
#[derive(Debug)]
pub enum PlacementMsg {
    /// Look at the view again (sent by the actor to itself).
    Tick,
    /// The preferred route of the current plan (empty until one could be
    /// made).
    Plan(RpcReplyPort<Vec<Hop>>),
}

/// State of the [`PlacementActor`].
pub struct PlacementState {
    rt: Arc<dyn PlacementHost>,
    plan: policy::Assignment,
    /// A plan waiting to settle, and since when it has been the plan.
    pending: Option<(policy::Assignment, std::time::Instant)>,
}

/// The actor keeping this peer's shards in line with the plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementActor;

impl Actor for PlacementActor {
    type Msg = PlacementMsg;
    type State = PlacementState;
    type Arguments = Arc<dyn PlacementHost>;

    async fn pre_start(&self, myself: ActorRef<PlacementMsg>, rt: Arc<dyn PlacementHost>) -> Result<PlacementState, ActorProcessingErr> {
        // The first look waits one interval, so peers starting together see
        // each other before anyone loads a range.
        myself.send_after(rt.config().placement_interval, || PlacementMsg::Tick);
        Ok(PlacementState { rt, plan: policy::Assignment { routes: Vec::new(), mine: Vec::new() }, pending: None })
    }

    async fn handle(&self, myself: ActorRef<PlacementMsg>, msg: PlacementMsg, st: &mut PlacementState) -> Result<(), ActorProcessingErr> {
        match msg {
            PlacementMsg::Tick => {
                let Some(model) = st.rt.model().cloned() else {
                    return Ok(());
                };
                let view = st.rt.view().await;
                let cands = policy::candidates_for(&view, &model, &[], st.rt.config().memory_cap);
                let me = st.rt.local_peer().to_string();
                match policy::assignment(&model.costs, &cands, &me) {
                    Ok(plan) if plan != st.plan && !settled(st, &plan) => {
                        tracing::debug!(routes = plan.routes.len(), "a plan that needs weights fetched; waiting for it to settle");
                    }
                    Ok(plan) if plan != st.plan => {
                        st.pending = None;
                        let map: Vec<String> = plan
                            .routes
                            .iter()
                            .map(|r| r.iter().map(|h| format!("{}:{}..{}", short(&h.peer), h.start, h.end)).collect::<Vec<_>>().join(" "))
                            .collect();
                        tracing::info!(routes = plan.routes.len(), stages = plan.routes.first().map_or(0, Vec::len), plan = %map.join(" | "), "placement plan");
                        // Standby ranges: what this peer would serve if any one
                        // other peer of the plan were lost, loaded ahead so a
                        // failover finds them ready (as memory and the shard
                        // bound allow).
                        let standby = if st.rt.config().standby_shards {
                            policy::standby_ranges(&model.costs, &cands, &plan, &me)
                        } else {
                            Vec::new()
                        };
                        let keep: Vec<Range<usize>> = plan.mine.iter().chain(&standby).cloned().collect();
                        st.rt.unload_except(&keep).await;
                        let mut loaded = true;
                        for r in &plan.mine {
                            if let Err(e) = st.rt.load(r.clone()).await {
                                tracing::warn!(layers = ?r, error = %e, "could not load the planned shard; trying again at the next look");
                                loaded = false;
                            }
                        }
                        for r in &standby {
                            if !st.rt.room_for(r.clone()).await {
                                break;
                            }
                            match st.rt.load(r.clone()).await {
                                Ok(()) => tracing::info!(layers = ?r, "standby shard ready for a failover"),
                                Err(e) => tracing::debug!(layers = ?r, error = %e, "no standby shard"),
                            }
                        }
                        if loaded {
                            st.plan = plan;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "no plan yet"),
                }
                let every = st.rt.config().placement_interval;
                myself.send_after(every, || PlacementMsg::Tick);
            }
            PlacementMsg::Plan(reply) => {
                let _ = reply.send(st.plan.routes.first().cloned().unwrap_or_default());
            }
        }
        Ok(())
    }
}

/// Whether `plan` can be acted on: this peer holds the weights of its
/// ranges in it, or the plan has stayed the same for [`SETTLE`].
fn settled(st: &mut PlacementState, plan: &policy::Assignment) -> bool {
    if plan.mine.iter().all(|r| st.rt.holds(r.clone())) {
        return true;
    }
    match &st.pending {
        Some((p, since)) if p == plan => since.elapsed() >= SETTLE,
        _ => {
            st.pending = Some((plan.clone(), std::time::Instant::now()));
            false
        }
    }
}

/// The last eight characters of a peer id, for logs and stage maps (cut
/// at a character boundary, whatever the id holds).
pub fn short(peer: &str) -> &str {
    let cut = peer.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
    &peer[cut..]
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn short_ids_cut_at_character_boundaries() {
        assert_eq!(short("12D3KooWabcdefgh"), "abcdefgh");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("ééééééééé"), "éééééééé");
        assert_eq!(short(""), "");
    }
}
