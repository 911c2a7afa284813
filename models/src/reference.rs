//! A slow, plain f32 forward pass built only from candle-core tensor ops, used
//! as an independent oracle for the engine on prompts no reference file
//! covers: weights are dequantized by candle (not by our repacking), products
//! are f32 matmuls (no activation quantization), attention is a masked softmax
//! over whole matrices.

use std::io::{Read, Seek};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{D, DType, Device, Tensor};

use crate::config::LlamaConfig;
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

/// Rotates adjacent pairs of `x` `[heads, tokens, head_dim]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rope_dims: usize) -> Result<Tensor> {
    let (h, t, hd) = x.dims3()?;
    let rot = x.narrow(2, 0, rope_dims)?.reshape((h, t, rope_dims / 2, 2))?;
    let a = rot.narrow(3, 0, 1)?.squeeze(3)?;
    let b = rot.narrow(3, 1, 1)?.squeeze(3)?;
    let ra = (a.broadcast_mul(cos)? - b.broadcast_mul(sin)?)?;
    let rb = (a.broadcast_mul(sin)? + b.broadcast_mul(cos)?)?;
    let mut out = Tensor::stack(&[ra, rb], 3)?.reshape((h, t, rope_dims))?;
    if rope_dims < hd {
        out = Tensor::cat(&[out, x.narrow(2, rope_dims, hd - rope_dims)?], 2)?;
    }
    Ok(out)
}

/// Logits `[tokens, vocab]` for every position of `tokens`, from the whole model.
pub fn reference_logits<R: Read + Seek>(g: &Gguf, file: &mut R, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let cfg = LlamaConfig::from_gguf(g)?;
    let dev = Device::Cpu;
    let t = tokens.len();
    let (hd, nh, nkv) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
    let eps = cfg.eps as f64;
    let emb = load(g, file, "token_embd.weight")?;
    let ids = Tensor::new(tokens, &dev)?;
    let mut x = emb.index_select(&ids, 0)?;
    let half = cfg.rope_dims / 2;
    let mut cos = vec![0f32; t * half];
    let mut sin = vec![0f32; t * half];
    for p in 0..t {
        for i in 0..half {
            let f = (cfg.rope_base as f64).powf(-((2 * i) as f64) / cfg.rope_dims as f64);
            let (s, c) = (p as f64 * f).sin_cos();
            cos[p * half + i] = c as f32;
            sin[p * half + i] = s as f32;
        }
    }
    let cos = Tensor::from_vec(cos, (1, t, half), &dev)?;
    let sin = Tensor::from_vec(sin, (1, t, half), &dev)?;
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in i + 1..t {
            mask[i * t + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (1, t, t), &dev)?;
    for l in 0..cfg.layers {
        let w = |s: &str| format!("blk.{l}.{s}.weight");
        let xn = rms_norm(&x, &load(g, file, &w("attn_norm"))?, eps)?;
        let heads = |m: Tensor, n: usize| -> Result<Tensor> {
            Ok(xn.matmul(&m.t()?)?.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let q = rope(&heads(load(g, file, &w("attn_q"))?, nh)?, &cos, &sin, cfg.rope_dims)?;
        let k = rope(&heads(load(g, file, &w("attn_k"))?, nkv)?, &cos, &sin, cfg.rope_dims)?;
        let v = heads(load(g, file, &w("attn_v"))?, nkv)?;
        let group = nh / nkv;
        let expand = |x: Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(1)?.expand((nkv, group, t, hd))?.reshape((nh, t, hd))?.contiguous()?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let att = p.matmul(&v)?.transpose(0, 1)?.reshape((t, cfg.hidden))?;
        x = (x + att.matmul(&load(g, file, &w("attn_output"))?.t()?)?)?;
        let xn = rms_norm(&x, &load(g, file, &w("ffn_norm"))?, eps)?;
        let gate = xn.matmul(&load(g, file, &w("ffn_gate"))?.t()?)?.silu()?;
        let up = xn.matmul(&load(g, file, &w("ffn_up"))?.t()?)?;
        x = (x + (gate * up)?.matmul(&load(g, file, &w("ffn_down"))?.t()?)?)?;
    }
    let xn = rms_norm(&x, &load(g, file, "output_norm.weight")?, eps)?;
    let head = if g.tensors.contains_key("output.weight") { load(g, file, "output.weight")? } else { emb };
    let logits = xn.matmul(&head.t()?)?.to_dtype(DType::F32)?;
    Ok(logits.to_vec2()?)
}
