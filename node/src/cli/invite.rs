//! `fogmesh invite`: asks a running node (the local one by default) for a
//! token another host joins its mesh with: `fogmesh node --join TOKEN`.

use anyhow::{Context, Result, bail};

use super::NodeQueryArgs;

/// Prints the invite of a running node, the token on the last line.
pub fn run_invite(args: NodeQueryArgs) -> Result<()> {
    let (node, body) = args.get("/v1/fogmesh/invite")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{node} sent a malformed invite"))?;
    let Some(token) = v["token"].as_str() else {
        bail!("{node} answered without a token: {body}");
    };
    let addrs: Vec<&str> = v["addrs"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
    if v["secret"].as_bool() == Some(true) {
        println!("invite to the private mesh of {node}: it carries the cluster secret, so pass it on privately.");
    } else {
        println!("invite to the open mesh of {node} (no cluster secret: anyone who can reach it may join).");
    }
    println!("it reaches the mesh at: {}", addrs.join(" "));
    println!("on another host: fogmesh node --join TOKEN (or FOGMESH_JOIN=TOKEN), TOKEN being the next line");
    println!("{token}");
    Ok(())
}
