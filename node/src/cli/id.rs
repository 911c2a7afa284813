//! `fogmesh id`: the id hosts without a model file serve it under
//! (`sha256:FILE@DIGEST`: the file's SHA-256 and its manifest's digest),
//! read from the file here.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fogmesh_actors::protocols::hex;

/// Options of `fogmesh id`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// GGUF model file or catalogue name [default: $FOGMESH_MODEL, else the default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print `{"id":…, "sha256":…, "manifest":…, "chunks":…, "bytes":…}`.
    #[arg(long)]
    json: bool,
}

/// Prints the model's id (two reads of the file: its hash, then its chunks').
pub fn id(a: IdArgs) -> Result<()> {
    let path = super::resolve_model(a.model.as_deref())?;
    let hash = crate::fetch::sha256_digest(&path, !a.json).with_context(|| format!("hashing {}", path.display()))?;
    let m = fogmesh_actors::weights::local::manifest_of(&path, hash)?;
    let id = format!("sha256:{}@{}", hex(&hash), hex(&m.digest()));
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "id": id, "sha256": hex(&hash), "manifest": hex(&m.digest()), "chunks": m.chunks.len(), "bytes": m.file_len })
        );
    } else {
        println!("{id}");
        eprintln!("{} chunks over {} bytes; on a host without the file: fogmesh node --model {id}", m.chunks.len(), m.file_len);
    }
    Ok(())
}
