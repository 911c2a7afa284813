//! A model file held here: its manifest (how it is cut, each chunk's
//! SHA-256) and reading one chunk's bytes.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use fogmesh_models::gguf::Gguf;
use fogmesh_protocols::{ChunkEntry, Manifest, ModelHash, cut, sha256};

use super::WeightsError;

/// The group a tensor's bytes are cut with: its layer, or a group of its
/// own for a tensor of no layer.
fn group(name: &str, rank: usize) -> u64 {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(1 << 32 | rank as u64, u64::from)
}

/// The manifest of the GGUF file at `path`, whose SHA-256 is `hash`: it is
/// read once, each chunk hashed.
pub fn manifest_of(path: &Path, hash: ModelHash) -> Result<Manifest, WeightsError> {
    let bad = |e: String| WeightsError::Manifest(format!("{}: {e}", path.display()));
    let g = Gguf::open(path).map_err(|e| bad(e.to_string()))?;
    let data_start = g.tensors.values().map(|t| t.offset).min().unwrap_or(g.file_size);
    let tensors: Vec<(u64, u64)> = g.tensors.iter().enumerate().map(|(k, (n, t))| (group(n, k), t.offset)).collect();
    let (spans, header_chunks) = cut(g.file_size, data_start, &tensors);
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| bad(e.to_string()))?);
    let mut buf = Vec::new();
    let mut chunks = Vec::with_capacity(spans.len());
    for (offset, len) in spans {
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(|e| bad(format!("reading bytes {offset}..: {e}")))?;
        chunks.push(ChunkEntry { offset, len, hash: sha256(&buf) });
    }
    Ok(Manifest { model: hash, file_len: g.file_size, header_chunks, chunks })
}

/// `len` bytes at `offset` of the file at `path`.
pub fn read_span(path: &Path, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0; len as usize];
    f.read_exact(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(buf)
}
