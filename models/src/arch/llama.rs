//! The Llama block (also Mistral and Granite files): RMSNorm, attention
//! with grouped-query heads and RoPE, RMSNorm, SwiGLU feed-forward, each
//! with a residual. Qwen 2, Qwen 3 and Phi-3 run this block too, with what
//! their files add (`qwen2.rs`, `qwen3.rs`, `phi3.rs`): biases on Q, K and
//! V, q/k RMSNorm per head, RoPE on half-split pairs.

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
    /// Biases of Q, K and V, one after another (Qwen 2).
    pub(crate) qkv_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights of queries and keys, applied before RoPE
    /// (Qwen 3).
    pub(crate) qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: Weights,
    ffn_norm: Vec<f32>,
    /// Gate and up stacked when their layouts allow, else two matrices.
    gate_up: Vec<Weights>,
    down: Weights,
}

impl Layer {
    /// Reads block `i`'s tensors.
    pub(crate) fn load<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Layer> {
        let qkv = Self::separate_qkv(ld, cfg, i)?;
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let gate_up = stack(vec![ld.matrix(&n("ffn_gate"), cfg.hidden, cfg.ffn)?, ld.matrix(&n("ffn_up"), cfg.hidden, cfg.ffn)?]);
        Self::assemble(ld, cfg, i, qkv, gate_up)
    }

    /// Q, K and V of block `i` from their own tensors.
    pub(crate) fn separate_qkv<R: Read + Seek>(ld: &mut Loader<'_, R>, cfg: &LlamaConfig, i: usize) -> Result<Vec<Weights>> {
        let (d, qd, kvd) = (cfg.hidden, cfg.q_dim, cfg.kv_dim());
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(stack(vec![ld.matrix(&n("attn_q"), d, qd)?, ld.matrix(&n("attn_k"), d, kvd)?, ld.matrix(&n("attn_v"), d, kvd)?]))
    }

    /// Block `i` with its attention input and feed-forward gate/up given;
    /// reads the rest.
    pub(crate) fn assemble<R: Read + Seek>(
        ld: &mut Loader<'_, R>,
        cfg: &LlamaConfig,
        i: usize,
        qkv: Vec<Weights>,
        gate_up: Vec<Weights>,
    ) -> Result<Layer> {
        let (d, qd, ffn) = (cfg.hidden, cfg.q_dim, cfg.ffn);
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        Ok(Layer {
            attn_norm: ld.vector(&n("attn_norm"), d)?,
            qkv,
            qkv_bias: None,
            qk_norm: None,
            wo: ld.matrix(&n("attn_output"), qd, d)?,
            ffn_norm: ld.vector(&n("ffn_norm"), d)?,
            gate_up,
            down: ld.matrix(&n("ffn_down"), ffn, d)?,
        })
    }

    /// Bytes of weights it holds.
    pub(crate) fn memory_bytes(&self) -> usize {
        let (wo, down) = (std::slice::from_ref(&self.wo), std::slice::from_ref(&self.down));
        let bias = self.qkv_bias.as_deref().unwrap_or_default();
        let (qn, kn) = self.qk_norm.as_ref().map_or((&[][..], &[][..]), |(q, k)| (&q[..], &k[..]));
        held_bytes(&[&self.attn_norm, &self.ffn_norm, bias, qn, kn], &[&self.qkv, &self.gate_up, wo, down])
    }

    /// Runs the block over `x` (the rows of every session of the pass, one
    /// after another), appending this layer's keys and values to each
    /// session's cache.
    pub(crate) fn forward(&self, p: Pass<'_, '_>, x: &mut [f32]) -> Result<()> {
        let Pass { cfg, pool, segs, s, window } = p;
        let l = self;
        let (d, qd, kvd, ffn) = (cfg.hidden, cfg.q_dim, cfg.kv_dim(), cfg.ffn);
        let tokens = x.len() / d;

        // Attention.
        norm_rows(x, &l.attn_norm, cfg.eps, d, &mut s.xn);
        let qkv_w = qd + 2 * kvd;
        matmul_stacked(pool, &l.qkv, &s.xn, &mut s.acts, &mut s.qkv, qkv_w)?;
        if let Some(b) = &l.qkv_bias {
            for row in s.qkv.chunks_exact_mut(qkv_w) {
                add(row, b);
            }
        }
        let (heads, hd, rd) = (cfg.heads + cfg.kv_heads, cfg.head_dim, cfg.rope_dims);
        let half_split = cfg.family.rope_half_split();
        s.tmp.resize(hd, 0.0);
        let tmp = &mut s.tmp;
        rotate_and_store(segs, &mut s.qkv, qkv_w, qd, kvd, rd / 2, |row, rt| {
            for h in 0..heads {
                let head = &mut row[h * hd..(h + 1) * hd];
                if let Some((qn, kn)) = &l.qk_norm {
                    tmp.copy_from_slice(head);
                    ops::rms_norm(tmp, if h < cfg.heads { qn } else { kn }, cfg.eps, head);
                }
                if half_split {
                    ops::rope_neox(&mut head[..rd], rt);
                } else {
                    ops::rope(&mut head[..rd], rt);
                }
            }
        });
        s.att.resize(tokens * qd, 0.0);
        attend(pool, cfg, segs, window, &s.qkv, qkv_w, &mut s.att);
        s.out.resize(tokens * d, 0.0);
        l.wo.matmul(pool, &s.att, &mut s.acts, &mut s.out)?;
        add(x, &s.out);

        // Feed-forward.
        norm_rows(x, &l.ffn_norm, cfg.eps, d, &mut s.xn);
        matmul_stacked(pool, &l.gate_up, &s.xn, &mut s.acts, &mut s.gu, 2 * ffn)?;
        gated(pool, &s.gu, ffn, ops::silu, &mut s.h);
        l.down.matmul(pool, &s.h, &mut s.acts, &mut s.out)?;
        add(x, &s.out);
        Ok(())
    }
}
