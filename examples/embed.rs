//! Embedding fogmesh: two mesh peers inside this program (on loopback, no
//! mDNS), each holding the model file; placement splits the layers between
//! them, and a chat answer streams through both.
//!
//! `cargo run --release --example embed` (needs the default model: `fogmesh fetch`).

use std::time::Duration;

use fogmesh::actors::placement_actor::PlacementMsg;
use fogmesh::models::SamplingParams;
use fogmesh::{Mesh, SessionEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = fogmesh::models::default_model_path();
    anyhow::ensure!(model.exists(), "the default model is missing: run `cargo run --release -- fetch`");
    let first = Mesh::builder().model(&model).mdns(false).threads(1).listen("/ip4/127.0.0.1/tcp/0".parse()?).start().await?;
    let second = Mesh::builder()
        .model(&model)
        .mdns(false)
        .threads(1)
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .bootstrap(first.listen_addrs()[0].clone())
        .start()
        .await?;
    let plan = first.wait_for_stages(2, Duration::from_secs(30)).await?;
    for h in &plan {
        println!("stage: {} layers {}..{}", h.peer, h.start, h.end);
    }
    let mut g = first.chat("Name three uses of edge computing.", 96, SamplingParams::greedy()).await?;
    while let Some(e) = g.next().await {
        match e {
            SessionEvent::Token { step, .. } => {
                print!("{}", step.text);
                use std::io::Write;
                std::io::stdout().flush()?;
            }
            SessionEvent::Done { generation, route, .. } => {
                println!("\n[{} tokens over {} stages]", generation.tokens.len(), route.len());
            }
            SessionEvent::Error(e) => anyhow::bail!(e),
            _ => {}
        }
    }
    // The actors are reachable directly: ask the placement actor for its
    // plan and the runtime for its shards.
    if let Some(p) = first.runtime().placement_actor() {
        let plan = p.call(PlacementMsg::Plan, Some(Duration::from_secs(5))).await?.success_or(anyhow::anyhow!("no answer"))?;
        println!("placement actor's plan: {} stages", plan.len());
    }
    for s in first.runtime().shard_status().await {
        println!("this peer holds layers {}..{} ({} tokens served)", s.start, s.end, s.tokens);
    }
    second.shutdown().await;
    first.shutdown().await;
    Ok(())
}
