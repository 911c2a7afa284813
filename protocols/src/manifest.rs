//! Content addressing of model files: a [`Manifest`] cuts a file into
//! chunks (the header and metadata first, then tensor data, large tensors in
//! pieces), each with its own SHA-256, so that a peer can fetch only the
//! chunks its layers need, from anyone, and check each one alone.
//!
//! The manifest's bytes ([`Manifest::encode`]) are canonical: its
//! [`Manifest::digest`] names exactly one way to cut exactly one file.

use sha2::{Digest, Sha256};

use crate::error::{ProtocolError, Result};
use crate::messages::ModelHash;

/// The size pieces aim at (a tensor larger than this is cut; smaller
/// neighbours of one layer share a chunk up to it).
pub const CHUNK_BYTES: u64 = 1 << 20;
/// The largest chunk a manifest may name (bounds what one reply carries).
pub const MAX_CHUNK_BYTES: u32 = 4 << 20;
/// The most chunks one manifest may name (4 TiB of pieces at the aim).
pub const MAX_CHUNKS: usize = 1 << 22;
/// The chunk index that asks for the manifest itself.
pub const MANIFEST_CHUNK: u32 = u32::MAX;

const MAGIC: &[u8; 8] = b"FGMSMAN1";
const ENTRY_LEN: usize = 8 + 4 + 32;
const FIXED_LEN: usize = 8 + 32 + 8 + 4 + 4;

/// One chunk: where it lies in the file and the SHA-256 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// First byte in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// SHA-256 of those bytes.
    pub hash: [u8; 32],
}

impl ChunkEntry {
    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// A model file cut into verifiable chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The SHA-256 of the whole file (the model's identity in the mesh).
    pub model: ModelHash,
    /// Bytes in the file.
    pub file_len: u64,
    /// How many leading chunks hold the GGUF header, metadata and tensor
    /// directory (everything before the first tensor's data).
    pub header_chunks: u32,
    /// The chunks, in file order, tiling it exactly.
    pub chunks: Vec<ChunkEntry>,
}

fn bad(what: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidMessage(format!("manifest: {}", what.into()))
}

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Manifest {
    /// The canonical bytes: magic, model, file length, header chunk count,
    /// chunk count, then per chunk its offset, length and hash
    /// (little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.chunks.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.model);
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&self.header_chunks.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.hash);
        }
        out
    }

    /// Reads canonical bytes back, checking that the chunks tile the file
    /// exactly, each within [`MAX_CHUNK_BYTES`], and that nothing trails.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let fixed = bytes
            .get(..FIXED_LEN)
            .ok_or(ProtocolError::Truncated { what: "manifest", need: FIXED_LEN as u64, have: bytes.len() as u64 })?;
        if &fixed[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let model: ModelHash = fixed[8..40].try_into().expect("32 bytes");
        let file_len = u64_at(fixed, 40);
        let header_chunks = u32_at(fixed, 48);
        let n = u32_at(fixed, 52) as usize;
        if n == 0 || n > MAX_CHUNKS {
            return Err(bad(format!("{n} chunks (1 to {MAX_CHUNKS})")));
        }
        let need = FIXED_LEN + n * ENTRY_LEN;
        if bytes.len() != need {
            return Err(bad(format!("{} bytes for {n} chunks, which take {need}", bytes.len())));
        }
        if header_chunks == 0 || header_chunks as usize > n {
            return Err(bad(format!("{header_chunks} header chunks of {n}")));
        }
        let mut chunks = Vec::with_capacity(n);
        let mut at = 0u64;
        for e in bytes[FIXED_LEN..].chunks_exact(ENTRY_LEN) {
            let c = ChunkEntry { offset: u64_at(e, 0), len: u32_at(e, 8), hash: e[12..44].try_into().expect("32 bytes") };
            if c.offset != at || c.len == 0 || c.len > MAX_CHUNK_BYTES {
                return Err(bad(format!("chunk {} at {} of {} bytes does not follow byte {at}", chunks.len(), c.offset, c.len)));
            }
            at = c.end();
            chunks.push(c);
        }
        if at != file_len {
            return Err(bad(format!("chunks end at byte {at}, the file at {file_len}")));
        }
        Ok(Manifest { model, file_len, header_chunks, chunks })
    }

    /// SHA-256 of the canonical bytes.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.encode())
    }

    /// Bytes before the first tensor's data (the header chunks).
    pub fn header_len(&self) -> u64 {
        self.chunks[self.header_chunks as usize - 1].end()
    }

    /// The chunk holding byte `offset`.
    pub fn locate(&self, offset: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.end() <= offset);
        (i < self.chunks.len()).then_some(i)
    }

    /// Indices of the chunks overlapping bytes `start..end`.
    pub fn covering(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        if start >= end {
            return 0..0;
        }
        let first = self.chunks.partition_point(|c| c.end() <= start);
        let last = self.chunks.partition_point(|c| c.offset < end);
        first..last.max(first)
    }

    /// Whether `data` is chunk `i`'s bytes.
    pub fn verify(&self, i: usize, data: &[u8]) -> bool {
        self.chunks.get(i).is_some_and(|c| c.len as usize == data.len() && sha256(data) == c.hash)
    }
}

/// How a file of `file_len` bytes is cut, given where its tensor data
/// begins (`data_start`) and its tensors as `(group, offset)` in any order
/// (`group`: the layer a tensor belongs to, or a value of its own for a
/// tensor of no layer). Returns `(offset, len)` per chunk and how many hold
/// the header: the header in [`CHUNK_BYTES`] pieces; then a new chunk at
/// every tensor whose group differs from the one before, or that would take
/// the current chunk past [`CHUNK_BYTES`]; a tensor longer than that in
/// pieces. Padding goes with the bytes before it.
pub fn cut(file_len: u64, data_start: u64, tensors: &[(u64, u64)]) -> (Vec<(u64, u32)>, u32) {
    let mut ts: Vec<(u64, u64)> = tensors.iter().map(|&(g, o)| (o, g)).collect();
    ts.sort_unstable();
    let mut starts: Vec<u64> = Vec::new();
    let mut at = 0;
    while at < data_start.min(file_len) {
        starts.push(at);
        at += CHUNK_BYTES;
    }
    let header = starts.len().max(1) as u32;
    if starts.is_empty() {
        starts.push(0);
    }
    let mut chunk_start = data_start;
    let mut group = None;
    for (k, &(off, g)) in ts.iter().enumerate() {
        if off < data_start || off >= file_len {
            continue;
        }
        let next = ts.get(k + 1).map_or(file_len, |t| t.0.min(file_len));
        if group != Some(g) || off + (next - off).min(CHUNK_BYTES) - chunk_start > CHUNK_BYTES || off == data_start {
            if starts.last() != Some(&off) {
                starts.push(off);
            }
            chunk_start = off;
        }
        group = Some(g);
        let mut p = off + CHUNK_BYTES;
        while p < next {
            starts.push(p);
            chunk_start = p;
            p += CHUNK_BYTES;
        }
    }
    starts.dedup();
    let spans = starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let e = starts.get(i + 1).copied().unwrap_or(file_len);
            (s, (e - s) as u32)
        })
        .filter(|&(_, l)| l > 0)
        .collect();
    (spans, header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(spans: &[(u64, u32)], header: u32, file_len: u64) -> Manifest {
        Manifest {
            model: [7; 32],
            file_len,
            header_chunks: header,
            chunks: spans.iter().map(|&(o, l)| ChunkEntry { offset: o, len: l, hash: [o as u8; 32] }).collect(),
        }
    }

    #[test]
    fn a_manifest_reads_back_and_refuses_what_does_not_tile_the_file() {
        let m = manifest(&[(0, 100), (100, 50), (150, 10)], 1, 160);
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.digest(), Manifest::decode(&bytes).unwrap().digest());
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        let gap = manifest(&[(0, 100), (101, 49), (150, 10)], 1, 160);
        assert!(Manifest::decode(&gap.encode()).is_err());
        let short = manifest(&[(0, 100), (100, 50)], 1, 160);
        assert!(Manifest::decode(&short.encode()).is_err());
        let no_header = manifest(&[(0, 160)], 0, 160);
        assert!(Manifest::decode(&no_header.encode()).is_err());
        let mut big = bytes.clone();
        big[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&big).is_err());
        assert_eq!(m.locate(0), Some(0));
        assert_eq!(m.locate(149), Some(1));
        assert_eq!(m.locate(160), None);
        assert_eq!(m.covering(99, 151), 0..3);
        assert_eq!(m.covering(100, 150), 1..2);
        assert_eq!(m.covering(5, 5), 0..0);
    }

    #[test]
    fn a_file_is_cut_at_layers_and_in_pieces() {
        let mb = CHUNK_BYTES;
        // Header of 2.5 pieces; layer 0: two small tensors; layer 1: one of
        // 2.5 pieces; a global tensor.
        let data = 5 * mb / 2 + 32;
        let t = [(0, data), (0, data + 100), (1, data + 200), (99, data + 200 + 5 * mb / 2)];
        let len = data + 200 + 5 * mb / 2 + 64;
        let (spans, header) = cut(len, data, &t);
        assert_eq!(header, 3);
        let starts: Vec<u64> = spans.iter().map(|s| s.0).collect();
        assert_eq!(
            starts,
            vec![0, mb, 2 * mb, data, data + 200, data + 200 + mb, data + 200 + 2 * mb, data + 200 + 5 * mb / 2]
        );
        assert_eq!(spans.iter().map(|s| s.1 as u64).sum::<u64>(), len);
        assert!(spans.iter().all(|s| s.1 as u64 <= mb));
    }
}
