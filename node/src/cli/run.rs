//! `fogmesh run`: a generation on the mesh through a running node.

use std::io::Write;

use anyhow::Result;
use clap::Args;

use fogmesh_actors::placement_actor::short;

use super::NodeQueryArgs;
use super::data_dir;
use crate::api::types::{GenFlags, RouteHop};
use crate::client::{generate_on_with, node_addr};

/// Options of `fogmesh run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeQueryArgs,
    #[command(flatten)]
    flags: GenFlags,
}

/// A route in one line: `…peer [start..end) → …`.
pub fn route_line(route: &[RouteHop]) -> String {
    let hops: Vec<String> =
        route.iter().map(|h| format!("…{} [{}..{})", short(&h.peer), h.layers[0], h.layers[1])).collect();
    hops.join(" → ")
}

/// `fogmesh run`.
pub fn run(a: RunArgs) -> Result<()> {
    let node = node_addr(&a.node.node, &data_dir(&a.node.data_dir));
    let json = a.node.json;
    let mut stdout = std::io::stdout().lock();
    let r = generate_on_with(&node, a.node.api_key.as_deref(), &a.flags, |t| {
        if !json && !t.is_empty() {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&r.done)?)?;
    } else {
        writeln!(stdout)?;
        for i in &r.incidents {
            eprintln!("[{}]", serde_json::to_string(i)?);
        }
        eprintln!("[{}; route {}]", super::timing_line(&r.done.timings), route_line(&r.done.route));
    }
    Ok(())
}

