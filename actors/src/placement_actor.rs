//! PlacementActor: looks at the membership view every interval, computes the
//! plan (the same one every peer computes from the same view), loads this
//! peer's own ranges ahead of the first session and unloads idle ranges the
//! plan no longer gives it.

use std::ops::Range;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::policy::Hop;
use crate::runtime::Runtime;

/// Messages of the [`PlacementActor`].
#[derive(Debug)]
pub enum PlacementMsg {
    /// Look at the view again (sent by the actor to itself).
    Tick,
    /// The current plan (empty until one could be made).
    Plan(RpcReplyPort<Vec<Hop>>),
}

/// State of the [`PlacementActor`].
pub struct PlacementState {
    rt: Runtime,
    plan: Vec<Hop>,
}

/// The actor keeping this peer's shards in line with the plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementActor;

impl Actor for PlacementActor {
    type Msg = PlacementMsg;
    type State = PlacementState;
    type Arguments = Runtime;

    async fn pre_start(&self, myself: ActorRef<PlacementMsg>, rt: Runtime) -> Result<PlacementState, ActorProcessingErr> {
        // The first look waits one interval, so peers starting together see
        // each other before anyone loads a range.
        myself.send_after(rt.config().placement_interval, || PlacementMsg::Tick);
        Ok(PlacementState { rt, plan: Vec::new() })
    }

    async fn handle(&self, myself: ActorRef<PlacementMsg>, msg: PlacementMsg, st: &mut PlacementState) -> Result<(), ActorProcessingErr> {
        match msg {
            PlacementMsg::Tick => {
                match st.rt.route(&[]).await {
                    Ok(plan) if plan != st.plan => {
                        let map: Vec<String> =
                            plan.iter().map(|h| format!("{}:{}..{}", short(&h.peer), h.start, h.end)).collect();
                        tracing::info!(stages = plan.len(), plan = %map.join(" "), "placement plan");
                        let me = st.rt.local_peer().to_string();
                        let mine: Vec<Range<usize>> =
                            plan.iter().filter(|h| h.peer == me).map(|h| h.start..h.end).collect();
                        // Standby ranges: what this peer would serve if any one
                        // other peer of the plan were lost, loaded ahead so a
                        // failover finds them ready (as memory and the shard
                        // bound allow).
                        let mut standby: Vec<Range<usize>> = Vec::new();
                        if st.rt.config().standby_shards {
                            for lost in plan.iter().filter(|h| h.peer != me) {
                                if let Ok(alt) = st.rt.route(std::slice::from_ref(&lost.peer)).await {
                                    for h in alt.iter().filter(|h| h.peer == me) {
                                        let r = h.start..h.end;
                                        if !mine.contains(&r) && !standby.contains(&r) {
                                            standby.push(r);
                                        }
                                    }
                                }
                            }
                        }
                        let keep: Vec<Range<usize>> = mine.iter().chain(&standby).cloned().collect();
                        st.rt.unload_except(&keep).await;
                        for r in &mine {
                            if let Err(e) = st.rt.ensure_shard(r.clone()).await {
                                tracing::warn!(layers = ?r, error = %e, "could not load the planned shard");
                            }
                        }
                        for r in &standby {
                            if !st.rt.room_for(r.clone()).await {
                                break;
                            }
                            match st.rt.ensure_shard(r.clone()).await {
                                Ok(_) => tracing::info!(layers = ?r, "standby shard ready for a failover"),
                                Err(e) => tracing::debug!(layers = ?r, error = %e, "no standby shard"),
                            }
                        }
                        st.plan = plan;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "no plan yet"),
                }
                let every = st.rt.config().placement_interval;
                myself.send_after(every, || PlacementMsg::Tick);
            }
            PlacementMsg::Plan(reply) => {
                let _ = reply.send(st.plan.clone());
            }
        }
        Ok(())
    }
}

/// The last characters of a peer id, for logs and stage maps.
pub fn short(peer: &str) -> &str {
    let n = peer.len();
    &peer[n.saturating_sub(8)..]
}
