//! A slow, plain f32 forward pass built only from candle-core tensor ops, used
//! as an independent oracle for the engine on prompts no reference file
//! covers: weights are dequantized by candle (not by our repacking), products
//! are f32 matmuls (no activation quantization), attention is a masked softmax
//! over whole matrices (the window a mask too), GELU candle's own. Every
//! architecture that loads: Llama, Qwen 2 (biases), Qwen 3 (q/k norms),
//! Phi-3 (fused tensors), Gemma 3 (norms around attention and feed-forward,
//! local and global layers, scaled embeddings).

use std::io::{Read, Seek};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{D, DType, Device, Tensor};

use crate::config::{Family, LlamaConfig};
use crate::error::Result;
use crate::gguf::Gguf;

fn load<R: Read + Seek>(g: &Gguf, file: &mut R, name: &str) -> Result<Tensor> {
    let t = g.tensor(name)?;
    let bytes = g.read_tensor(file, t)?;
    let dims: Vec<usize> = t.dims.iter().rev().copied().collect();
    let q = qtensor_from_ggml(t.dtype, &bytes, dims, &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Rotates `x` `[heads, tokens, head_dim]`: adjacent pairs, or half-split
/// ones (`half_split`), of its first `rope_dims`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rope_dims: usize, half_split: bool) -> Result<Tensor> {
    let (h, t, hd) = x.dims3()?;
    let half = rope_dims / 2;
    let (a, b) = if half_split {
        (x.narrow(2, 0, half)?, x.narrow(2, half, half)?)
    } else {
        let rot = x.narrow(2, 0, rope_dims)?.reshape((h, t, half, 2))?;
        (rot.narrow(3, 0, 1)?.squeeze(3)?, rot.narrow(3, 1, 1)?.squeeze(3)?)
    };
    let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
    let mut out = if half_split { Tensor::cat(&[ra, rb], 2)? } else { Tensor::stack(&[ra, rb], 3)?.reshape((h, t, rope_dims))? };
    if rope_dims < hd {
        out = Tensor::cat(&[out, x.narrow(2, rope_dims, hd - rope_dims)?], 2)?;
    }
    Ok(out)
}

/// cos and sin `[1, tokens, rope_dims / 2]` for `base` (scaled positions,
/// frequencies divided by `factors` when given).
fn rope_tables(cfg: &LlamaConfig, t: usize, base: f32, scale: f32, factors: Option<&[f32]>) -> Result<(Tensor, Tensor)> {
    let half = cfg.rope_dims / 2;
    let mut cos = vec![0f32; t * half];
    let mut sin = vec![0f32; t * half];
    for p in 0..t {
        for i in 0..half {
            let mut f = scale as f64 * (base as f64).powf(-((2 * i) as f64) / cfg.rope_dims as f64);
            if let Some(k) = factors {
                f /= k[i] as f64;
            }
            let (s, c) = (p as f64 * f).sin_cos();
            cos[p * half + i] = c as f32;
            sin[p * half + i] = s as f32;
        }
    }
    Ok((Tensor::from_vec(cos, (1, t, half), &Device::Cpu)?, Tensor::from_vec(sin, (1, t, half), &Device::Cpu)?))
}

/// The causal mask `[1, tokens, tokens]`, within `window` positions when given.
fn mask(t: usize, window: Option<usize>) -> Result<Tensor> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            if j > i || window.is_some_and(|w| i - j >= w) {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (1, t, t), &Device::Cpu)?)
}

/// Logits `[tokens, vocab]` for every position of `tokens`, from the whole model.
pub fn reference_logits<R: Read + Seek>(g: &Gguf, file: &mut R, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let cfg = LlamaConfig::from_gguf(g)?;
    let dev = Device::Cpu;
    let t = tokens.len();
    let (hd, nh, nkv, qd, kvd) = (cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.q_dim, cfg.kv_dim());
    let eps = cfg.eps as f64;
    let gemma = cfg.family == Family::Gemma3;
    let half_split = cfg.family.rope_half_split();
    let emb = load(g, file, "token_embd.weight")?;
    let ids = Tensor::new(tokens, &dev)?;
    let mut x = emb.index_select(&ids, 0)?;
    if gemma {
        x = (x * (cfg.hidden as f64).sqrt())?;
    }
    let factors = if g.tensors.contains_key("rope_freqs.weight") { Some(load(g, file, "rope_freqs.weight")?.to_vec1::<f32>()?) } else { None };
    let global = rope_tables(&cfg, t, cfg.rope_base, cfg.rope_scale, factors.as_deref())?;
    let local = rope_tables(&cfg, t, cfg.rope_base_local, 1.0, None)?;
    for l in 0..cfg.layers {
        let w = |s: &str| format!("blk.{l}.{s}.weight");
        let has = |s: &str| g.tensors.contains_key(&w(s));
        let window = cfg.window_of(l);
        let (cos, sin) = if gemma && window.is_some() { &local } else { &global };
        let xn = rms_norm(&x, &load(g, file, &w("attn_norm"))?, eps)?;
        // Q, K and V `[tokens, width]`, from one tensor or three.
        let (q, k, v) = if has("attn_qkv") {
            let qkv = xn.matmul(&load(g, file, &w("attn_qkv"))?.t()?)?;
            (qkv.narrow(1, 0, qd)?, qkv.narrow(1, qd, kvd)?, qkv.narrow(1, qd + kvd, kvd)?)
        } else {
            let mut m = |s: &str| -> Result<Tensor> {
                let mut y = xn.matmul(&load(g, file, &w(s))?.t()?)?;
                let bias = format!("blk.{l}.{s}.bias");
                if g.tensors.contains_key(&bias) {
                    y = y.broadcast_add(&load(g, file, &bias)?)?;
                }
                Ok(y)
            };
            (m("attn_q")?, m("attn_k")?, m("attn_v")?)
        };
        let heads = |m: Tensor, n: usize| -> Result<Tensor> { Ok(m.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?) };
        let (mut q, mut k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        if has("attn_q_norm") {
            q = rms_norm(&q, &load(g, file, &w("attn_q_norm"))?, eps)?;
            k = rms_norm(&k, &load(g, file, &w("attn_k_norm"))?, eps)?;
        }
        let q = rope(&q, cos, sin, cfg.rope_dims, half_split)?;
        let k = rope(&k, cos, sin, cfg.rope_dims, half_split)?;
        let group = nh / nkv;
        let expand = |x: Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(1)?.expand((nkv, group, t, hd))?.reshape((nh, t, hd))?.contiguous()?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores = (q.matmul(&k.t()?)? * cfg.attn_scale as f64)?.broadcast_add(&mask(t, window)?)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let att = p.matmul(&v)?.transpose(0, 1)?.reshape((t, qd))?;
        let mut out = att.matmul(&load(g, file, &w("attn_output"))?.t()?)?;
        if gemma {
            out = rms_norm(&out, &load(g, file, &w("post_attention_norm"))?, eps)?;
        }
        x = (x + out)?;
        let xn = rms_norm(&x, &load(g, file, &w("ffn_norm"))?, eps)?;
        let (gate, up) = if has("ffn_gate") {
            (xn.matmul(&load(g, file, &w("ffn_gate"))?.t()?)?, xn.matmul(&load(g, file, &w("ffn_up"))?.t()?)?)
        } else {
            let gu = xn.matmul(&load(g, file, &w("ffn_up"))?.t()?)?;
            (gu.narrow(1, 0, cfg.ffn)?, gu.narrow(1, cfg.ffn, cfg.ffn)?)
        };
        let gate = if gemma { gate.gelu()? } else { gate.silu()? };
        let mut out = (gate * up)?.matmul(&load(g, file, &w("ffn_down"))?.t()?)?;
        if gemma {
            out = rms_norm(&out, &load(g, file, &w("post_ffw_norm"))?, eps)?;
        }
        x = (x + out)?;
    }
    let xn = rms_norm(&x, &load(g, file, "output_norm.weight")?, eps)?;
    let head = if g.tensors.contains_key("output.weight") { load(g, file, "output.weight")? } else { emb };
    let logits = xn.matmul(&head.t()?)?.to_dtype(DType::F32)?;
    Ok(logits.to_vec2()?)
}
