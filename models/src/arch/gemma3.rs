//! The Gemma 3 block: RMSNorm, attention whose queries and keys are
//! RMS-normed per head before RoPE (half-split pairs; the local or global
//! base by layer), within the sliding window on local layers, RMSNorm of
//! the attention output, residual; then RMSNorm, GeGLU feed-forward (tanh
//! GELU), RMSNorm of its output, residual. The first stage scales the
//! embeddings by √d (in `shard.rs`).

use std::io::{Read, Seek};

use super::{Loader, Pass, add, attend, gated, held_bytes, matmul_stacked, norm_rows, rotate_and_store, stack};
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::ops;
use crate::quant::Weights;

/// One Gemma 3 block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked when their layouts allow, else three matrices.
    qkv: Vec<Weights>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: Weights,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    gate_up: Vec<Weights>,
    down: Weights,
    post_ffn_norm: Vec<f32>,
}

impl Layer {
    /// Reads block `i`'s tensors.
    pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
        let (d, qd, kvd, ffn, hd) = (cfg.hidden, cfg.q_dim, cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(Layer {
            attn_norm: ld.vector(&n("attn_norm"), d)?,
            qkv: stack(vec![
                ld.matrix(&n("attn_q"), d, qd)?,
                ld.matrix(&n("attn_k"), d, kvd)?,
                ld.matrix(&n("attn_v"), d, kvd)?,
            ]),
            q_norm: ld.vector(&n("attn_q_norm"), hd)?,
            k_norm: ld.vector(&n("attn_k_norm"), hd)?,
            wo: ld.matrix(&n("attn_output"), qd, d)?,
            post_attn_norm: ld.vector(&n("post_attention_norm"), d)?,
            ffn_norm: ld.vector(&n("ffn_norm"), d)?,
            gate_up: stack(vec![ld.matrix(&n("ffn_gate"), d, ffn)?, ld.matrix(&n("ffn_up"), d, ffn)?]),
            down: ld.matrix(&n("ffn_down"), ffn, d)?,
            post_ffn_norm: ld.vector(&n("post_ffw_norm"), d)?,
        })
    }

    /// Bytes of weights it holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        let norms: [&[f32]; 6] = [&self.attn_norm, &self.q_norm, &self.k_norm, &self.post_attn_norm, &self.ffn_norm, &self.post_ffn_norm];
        let (wo, down) = (std::slice::from_ref(&self.wo), std::slice::from_ref(&self.down));
        held_bytes(&norms, &[&self.qkv, &self.gate_up, wo, down])
    }

    /// Runs the block over `x` (the rows of every session of the pass, one
    /// after another) with this layer's RoPE tables and window, appending
    /// its keys and values to each session's cache.
    pub(crate) fn forward(&self, p: Pass<'_, '_>, x: &mut [f32]) -> Result<()> {
        let Pass { cfg, pool, segs, s, window } = p;
        let l = self;
        let (d, qd, kvd, ffn, hd) = (cfg.hidden, cfg.q_dim, cfg.kv_dim(), cfg.ffn, cfg.head_dim);
        let tokens = x.len() / d;
        let eps = cfg.eps;

        // Attention.
        norm_rows(x, &l.attn_norm, eps, d, &mut s.xn);
        let qkv_w = qd + 2 * kvd;
        matmul_stacked(pool, &l.qkv, &s.xn, &mut s.acts, &mut s.qkv, qkv_w)?;
        s.tmp.resize(hd, 0.0);
        let tmp = &mut s.tmp;
        rotate_and_store(segs, &mut s.qkv, qkv_w, qd, kvd, hd / 2, |row, rt| {
            for h in 0..cfg.heads + cfg.kv_heads {
                let head = &mut row[h * hd..(h + 1) * hd];
                let w = if h < cfg.heads { &l.q_norm } else { &l.k_norm };
                tmp.copy_from_slice(head);
                ops::rms_norm(tmp, w, eps, head);
                ops::rope_neox(head, rt);
            }
        });
        s.att.resize(tokens * qd, 0.0);
        attend(pool, cfg, segs, window, &s.qkv, qkv_w, &mut s.att);
        s.out.resize(tokens * d, 0.0);
        l.wo.matmul(pool, &s.att, &mut s.acts, &mut s.out)?;
        norm_rows(&s.out, &l.post_attn_norm, eps, d, &mut s.h);
        add(x, &s.h);

        // Feed-forward.
        norm_rows(x, &l.ffn_norm, eps, d, &mut s.xn);
        matmul_stacked(pool, &l.gate_up, &s.xn, &mut s.acts, &mut s.gu, 2 * ffn)?;
        gated(pool, &s.gu, ffn, ops::gelu, &mut s.h);
        l.down.matmul(pool, &s.h, &mut s.acts, &mut s.out)?;
        norm_rows(&s.out, &l.post_ffn_norm, eps, d, &mut s.xn);
        add(x, &s.xn);
        Ok(())
    }
}
