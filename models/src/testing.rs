//! Helpers for tests, benchmarks and fuzz seeds: GGUF tensor bytes made with
//! candle's own quantizers, and deterministic pseudo-random data.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use half::f16;

use crate::error::{ModelError, Result};

/// The tensor types [`encode`] can produce.
pub const ENCODABLE_TYPES: [GgmlDType; 10] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn candle_encode<T: GgmlType>(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut blocks = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    T::from_float(x, &mut blocks);
    let mut deq = vec![0f32; x.len()];
    T::to_float(&blocks, &mut deq);
    let n = std::mem::size_of_val(&blocks[..]);
    // SAFETY: candle blocks are plain data; we copy their bytes.
    let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, n) }.to_vec();
    (bytes, deq)
}

/// Quantizes `x` to `dtype` with candle: the GGUF tensor bytes, and candle's
/// own dequantization of them. `x.len()` must be a multiple of the block size.
pub fn encode(dtype: GgmlDType, x: &[f32]) -> Result<(Vec<u8>, Vec<f32>)> {
    if !x.len().is_multiple_of(dtype.block_size()) {
        return Err(ModelError::Input(format!("{} values are not whole {dtype:?} blocks", x.len())));
    }
    Ok(match dtype {
        GgmlDType::F32 => (x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.to_vec()),
        GgmlDType::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            (h.iter().flat_map(|v| v.to_le_bytes()).collect(), h.iter().map(|v| v.to_f32()).collect())
        }
        GgmlDType::Q4_0 => candle_encode::<BlockQ4_0>(x),
        GgmlDType::Q4_1 => candle_encode::<BlockQ4_1>(x),
        GgmlDType::Q5_0 => candle_encode::<BlockQ5_0>(x),
        GgmlDType::Q5_1 => candle_encode::<BlockQ5_1>(x),
        GgmlDType::Q8_0 => candle_encode::<BlockQ8_0>(x),
        GgmlDType::Q4K => candle_encode::<BlockQ4K>(x),
        GgmlDType::Q5K => candle_encode::<BlockQ5K>(x),
        GgmlDType::Q6K => candle_encode::<BlockQ6K>(x),
        other => return Err(ModelError::Unsupported(format!("no test encoder for {other:?}"))),
    })
}

/// `n` values uniform in `[-amplitude, amplitude)`, the same for the same seed.
pub fn pseudo_random(n: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amplitude
        })
        .collect()
}

/// What must hold of any text `text` through `t` (the tokenizer fuzz target
/// and its corpus replay check it): encoding does not fail on valid text
/// or panic, decoding gives the text back, and the text as a chat message's
/// content adds no control token to the rendered prompt. (Bytes the
/// vocabulary has no token for are dropped, as llama.cpp drops them.)
pub fn tokenizer_properties(t: &crate::Tokenizer, text: &str) -> std::result::Result<(), String> {
    let ids = t.encode(text).map_err(|e| format!("encode: {e}"))?;
    let prefix = t.encode("").map_or(0, |e| e.len());
    let back = t.decode(&ids[prefix.min(ids.len())..], false).map_err(|e| format!("decode: {e}"))?;
    // Bytes without a token are dropped (as llama.cpp does); the rest comes
    // back as it was.
    let kept: Vec<u8> = text.bytes().filter(|&b| !t.drops_byte(b)).collect();
    if back != String::from_utf8_lossy(&kept) {
        return Err(format!("{text:?} decodes back as {back:?}"));
    }
    let controls = |content: &str| {
        t.encode_chat(&[crate::ChatMessage::new("system", "Be brief."), crate::ChatMessage::new("user", content)])
            .map(|ids| ids.iter().filter(|&&i| t.is_control(i)).count())
    };
    if let (Ok(with), Ok(without)) = (controls(text), controls("x")) {
        if with != without {
            return Err(format!("{text:?} in a chat message gives {with} control tokens instead of {without}"));
        }
    }
    Ok(())
}
