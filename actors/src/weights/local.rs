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

/// How a file with directory `g` is cut into chunks: `(offset, len)` of
/// each, and how many hold the header (from the directory alone, so every
/// peer with the model knows it).
pub fn layout(g: &Gguf) -> (Vec<(u64, u32)>, u32) {
    let data_start = g.tensors.values().map(|t| t.offset).min().unwrap_or(g.file_size);
    let tensors: Vec<(u64, u64)> = g.tensors.iter().enumerate().map(|(k, (n, t))| (group(n, k), t.offset)).collect();
    cut(g.file_size, data_start, &tensors)
}

/// What each chunk of a model holds, for costing what a peer lacks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChunkParts {
    /// Per chunk: its bytes, and the layer it belongs to (`None`: a tensor
    /// of no layer, or the header).
    chunks: Vec<(u32, Option<usize>)>,
    /// Per chunk: it holds the embedding (the first stage's) or the output
    /// norm or head (the last stage's).
    first: Vec<bool>,
    last: Vec<bool>,
    layers: usize,
}

impl ChunkParts {
    /// The parts of a model with directory `g` and `layers` layers.
    pub fn of(g: &Gguf, layers: usize) -> ChunkParts {
        let (spans, _) = layout(g);
        let starts: Vec<u64> = spans.iter().map(|s| s.0).collect();
        let chunk_of = |off: u64| starts.partition_point(|&s| s <= off).saturating_sub(1);
        let mut chunks: Vec<(u32, Option<usize>)> = spans.iter().map(|s| (s.1, None)).collect();
        let (mut first, mut last) = (vec![false; spans.len()], vec![false; spans.len()]);
        for (name, t) in &g.tensors {
            let (a, b) = (chunk_of(t.offset), chunk_of((t.offset + t.size).saturating_sub(1)));
            let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
            for c in a..=b.min(spans.len().saturating_sub(1)) {
                match name.as_str() {
                    "token_embd.weight" => first[c] = true,
                    "output.weight" | "output_norm.weight" => last[c] = true,
                    _ => chunks[c].1 = layer.filter(|&l| l < layers),
                }
            }
        }
        ChunkParts { chunks, first, last, layers }
    }

    /// The bytes lacking by layer for a peer holding the chunks of `bitmap`
    /// (bit `i % 8` of byte `i / 8`).
    pub fn missing(&self, bitmap: &[u8]) -> crate::placement::Missing {
        let mut m = crate::placement::Missing { layer: vec![0; self.layers], first: 0, last: 0 };
        for (i, &(len, layer)) in self.chunks.iter().enumerate() {
            if bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
                continue;
            }
            let len = len as u64;
            if self.first[i] {
                m.first += len;
            } else if self.last[i] {
                m.last += len;
            } else if let Some(l) = layer {
                m.layer[l] += len;
            }
        }
        m
    }
}

/// The manifest of the GGUF file at `path`, whose SHA-256 is `hash`: it is
/// read once, each chunk hashed.
pub fn manifest_of(path: &Path, hash: ModelHash) -> Result<Manifest, WeightsError> {
    let bad = |e: String| WeightsError::Manifest(format!("{}: {e}", path.display()));
    let g = Gguf::open(path).map_err(|e| bad(e.to_string()))?;
    let (spans, header_chunks) = layout(&g);
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
