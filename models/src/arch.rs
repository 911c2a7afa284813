//! The blocks of each architecture, one file each (`llama.rs`), and what
//! they share: reading a layer's tensors ([`Loader`]), the per-session
//! scratch buffers, and matrices stacked by rows.

use std::io::{Read, Seek};

use crate::error::{ModelError, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::pool::ThreadPool;
use crate::quant::{ActBuf, Weights};

pub(crate) mod llama;

/// Reads tensors of one file, keeping count of the bytes read.
pub(crate) struct Loader<'a, R> {
    g: &'a Gguf,
    file: R,
}

impl<'a, R: Read + Seek> Loader<'a, R> {
    /// Reads tensors of `g` from `file`.
    pub(crate) fn new(g: &'a Gguf, file: R) -> Self {
        Loader { g, file }
    }

    /// Whether the file holds tensor `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.g.tensors.contains_key(name)
    }

    fn info(&self, name: &str, dims: &[usize]) -> Result<&TensorInfo> {
        let t = self.g.tensor(name)?;
        if t.dims != dims {
            return Err(ModelError::Tensor {
                name: name.into(),
                problem: format!("shape {:?}, expected {:?}", t.dims, dims),
            });
        }
        Ok(t)
    }

    /// A matrix of `rows` rows of `cols`.
    pub(crate) fn matrix(&mut self, name: &str, cols: usize, rows: usize) -> Result<Weights> {
        let t = self.info(name, &[cols, rows])?.clone();
        let data = self.g.read_tensor(&mut self.file, &t)?;
        Weights::from_gguf(name, t.dtype, rows, cols, &data)
    }

    /// A vector of `n` values as f32.
    pub(crate) fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.info(name, &[n])?.clone();
        let data = self.g.read_tensor(&mut self.file, &t)?;
        let w = Weights::from_gguf(name, t.dtype, 1, n, &data)?;
        let mut out = vec![0.0; n];
        w.row_f32(0, &mut out)?;
        if out.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Tensor { name: name.into(), problem: "holds NaN or infinity".into() });
        }
        Ok(out)
    }
}

/// Stacks matrices into one when possible.
pub(crate) fn stack(parts: Vec<Weights>) -> Vec<Weights> {
    match Weights::concat(&parts) {
        Some(w) => vec![w],
        None => parts,
    }
}

#[derive(Debug, Default)]
/// Reusable buffers of one session's forward passes.
pub(crate) struct Scratch {
    pub(crate) xn: Vec<f32>,
    pub(crate) qkv: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) gu: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) acts: ActBuf,
}

/// Multiplies `x` by matrices stacked by rows, writing `[tokens, width]` to `out`.
pub(crate) fn matmul_stacked(
    pool: &ThreadPool,
    parts: &[Weights],
    x: &[f32],
    acts: &mut ActBuf,
    tmp: &mut Vec<f32>,
    out: &mut Vec<f32>,
    width: usize,
) -> Result<()> {
    let tokens = x.len() / parts[0].cols();
    out.resize(tokens * width, 0.0);
    if let [one] = parts {
        return one.matmul(pool, x, acts, out);
    }
    let mut col = 0;
    for p in parts {
        let rows = p.rows();
        tmp.resize(tokens * rows, 0.0);
        p.matmul(pool, x, acts, tmp)?;
        for t in 0..tokens {
            out[t * width + col..t * width + col + rows].copy_from_slice(&tmp[t * rows..(t + 1) * rows]);
        }
        col += rows;
    }
    Ok(())
}
