//! `fogmesh peers`: the membership view of a running node.

use anyhow::{Context, Result};

use super::NodeQueryArgs;
use crate::api::types::PeerInfo;

/// Prints the view of a running node.
pub fn run_peers(args: NodeQueryArgs) -> Result<()> {
    let (node, body) = args.get("/peers")?;
    let peers: Vec<PeerInfo> = serde_json::from_str(&body).with_context(|| format!("{node} sent a malformed peer list"))?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    if peers.is_empty() {
        println!("no peers in the view of {node}");
        return Ok(());
    }
    println!("{:<54} {:>5} {:>9} {:>7} {:>8} {:>9}  ADDRESS", "PEER", "CORES", "MEM MiB", "GFLOPS", "RTT ms", "SEEN ms");
    for p in &peers {
        let rtt = p.rtt_ms.map_or("-".to_string(), |r| format!("{r:.2}"));
        println!(
            "{:<54} {:>5} {:>9} {:>7.1} {:>8} {:>9}  {}",
            p.peer_id,
            p.cores,
            p.memory_bytes >> 20,
            p.gflops,
            rtt,
            p.last_seen_ms,
            p.addrs.first().map_or("", |a| a.as_str())
        );
    }
    Ok(())
}

