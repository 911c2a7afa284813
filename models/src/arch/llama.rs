//! The Llama block (also Mistral and Granite files): RMSNorm, attention
//! with grouped-query heads and RoPE, RMSNorm, SwiGLU feed-forward, each
//! with a residual.

use std::io::{Read, Seek};

use super::{Loader, Pass, add, attend, gated, held_bytes, matmul_stacked, norm_rows, rotate_and_store, stack};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::ops;
use crate::quant::Weights;

/// One transformer block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked when their layouts allow, else three matrices.
    qkv: Vec<Weights>,
    wo: Weights,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked when their layouts allow, else two matrices.
    gate_up: Vec<Weights>,
    down: Weights,
}

impl Layer {
    /// Reads block `i`'s tensors.
    pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
        let (d, kvd, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(Layer {
            attn_norm: ld.vector(&n("attn_norm"), d)?,
            qkv: stack(vec![
                ld.matrix(&n("attn_q"), d, d)?,
                ld.matrix(&n("attn_k"), d, kvd)?,
                ld.matrix(&n("attn_v"), d, kvd)?,
            ]),
            wo: ld.matrix(&n("attn_output"), d, d)?,
            ffn_norm: ld.vector(&n("ffn_norm"), d)?,
            gate_up: stack(vec![ld.matrix(&n("ffn_gate"), d, ffn)?, ld.matrix(&n("ffn_up"), d, ffn)?]),
            down: ld.matrix(&n("ffn_down"), ffn, d)?,
        })
    }

    /// Bytes of weights it holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        let (wo, down) = (std::slice::from_ref(&self.wo), std::slice::from_ref(&self.down));
        held_bytes(&[&self.attn_norm, &self.ffn_norm], &[&self.qkv, &self.gate_up, wo, down])
    }

    /// Runs the block over `x` (the rows of every session of the pass, one
    /// after another), appending this layer's keys and values to each
    /// session's cache.
    pub(crate) fn forward(&self, p: Pass<'_, '_>, x: &mut [f32]) -> Result<()> {
        let Pass { cfg, pool, segs, s, window } = p;
        let l = self;
        let (d, kvd, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let tokens = x.len() / d;

        // Attention.
        norm_rows(x, &l.attn_norm, cfg.eps, d, &mut s.xn);
        let qkv_w = d + 2 * kvd;
        matmul_stacked(pool, &l.qkv, &s.xn, &mut s.acts, &mut s.tmp, &mut s.qkv, qkv_w)?;
        let (heads, hd, rd) = (cfg.heads + cfg.kv_heads, cfg.head_dim, cfg.rope_dims);
        rotate_and_store(segs, &mut s.qkv, qkv_w, d, kvd, rd / 2, |row, rt| {
            for h in 0..heads {
                ops::rope(&mut row[h * hd..h * hd + rd], rt);
            }
        });
        s.att.resize(tokens * d, 0.0);
        attend(pool, cfg, segs, window, &s.qkv, qkv_w, &mut s.att);
        s.out.resize(tokens * d, 0.0);
        l.wo.matmul(pool, &s.att, &mut s.acts, &mut s.out)?;
        add(x, &s.out);

        // Feed-forward.
        norm_rows(x, &l.ffn_norm, cfg.eps, d, &mut s.xn);
        matmul_stacked(pool, &l.gate_up, &s.xn, &mut s.acts, &mut s.tmp, &mut s.gu, 2 * ffn)?;
        gated(&s.gu, ffn, ops::silu, &mut s.h);
        l.down.matmul(pool, &s.h, &mut s.acts, &mut s.out)?;
        add(x, &s.out);
        Ok(())
    }
}
