//! Kernel and repacking tests against candle's own quantizers and dequantizers.

use candle_core::quantized::GgmlDType;
use proptest::prelude::*;

use super::*;
use crate::testing::{ENCODABLE_TYPES as ALL, pseudo_random as random};

fn encode(dtype: GgmlDType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    crate::testing::encode(dtype, x).unwrap()
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    random(n, seed, 2.0)
}

/// Every type with a repacked layout (the encodable ones but floats).
fn quantized() -> impl Iterator<Item = GgmlDType> {
    ALL.into_iter().filter(|d| !matches!(d, GgmlDType::F32 | GgmlDType::F16))
}

#[test]
fn k_quant_scales_unpack_as_one_by_one() {
    let mut s = [0u8; 12];
    for seed in 0..200u64 {
        for (i, b) in s.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(i as u32 * 5) >> 13) as u8;
        }
        let (sc, m) = scales::k_scales_mins(&s);
        for j in 0..8 {
            assert_eq!((sc[j], m[j]), scales::scale_min_k4(j, &s), "seed {seed} block {j}");
        }
    }
}

/// Decode streams every weight byte per token: no repacked type may hold
/// more bytes than the file does (odd block counts pad one block per row).
#[test]
fn repacked_matrices_take_no_more_bytes_than_the_file() {
    for dtype in quantized() {
        let (rows, cols) = (6, 1024);
        let (bytes, _) = encode(dtype, &pseudo_random(rows * cols, 21));
        let m = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap();
        assert!(matches!(m, Weights::Affine(_)), "{dtype:?} not repacked");
        assert_eq!(m.memory_bytes(), bytes.len(), "{dtype:?}: {} bytes held for {} in the file", m.memory_bytes(), bytes.len());
    }
}

/// Q6_K's scales are per 16 weights and signed: a matrix whose groups have
/// very different (and negative) scales still multiplies exactly like its
/// dequantized weights on every kernel.
#[test]
fn q6k_groups_keep_their_own_scales() {
    let (rows, cols, tokens) = (5, 512, 2);
    // Amplitude changing every 16 weights, sign every 48.
    let w: Vec<f32> = pseudo_random(rows * cols, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 + (i / 16) % 7) as f32 * if (i / 48) % 2 == 0 { 1.0 } else { -0.25 })
        .collect();
    let (bytes, deq) = encode(GgmlDType::Q6K, &w);
    let m = Weights::from_gguf("t", GgmlDType::Q6K, rows, cols, &bytes).unwrap();
    let x = pseudo_random(tokens * cols, 4);
    let mut out = vec![0f32; tokens * rows];
    m.matmul(&ThreadPool::new(2), &x, &mut ActBuf::default(), &mut out).unwrap();
    for t in 0..tokens {
        for r in 0..rows {
            let terms = (0..cols).map(|c| deq[r * cols + c] as f64 * x[t * cols + c] as f64);
            let exact: f64 = terms.clone().sum();
            let norm: f64 = terms.map(f64::abs).sum();
            let got = out[t * rows + r] as f64;
            assert!((got - exact).abs() <= 0.02 * norm + 1e-3, "t{t} r{r}: {got} vs {exact}");
        }
    }
}

#[test]
fn repacked_rows_equal_candle_dequantization() {
    let (rows, cols) = (5, 512);
    for dtype in ALL {
        let x = pseudo_random(rows * cols, dtype as u64 + 1);
        let (bytes, deq) = encode(dtype, &x);
        let w = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap();
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.row_f32(r, &mut row).unwrap();
            for (c, (a, b)) in row.iter().zip(&deq[r * cols..(r + 1) * cols]).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{dtype:?} row {r} col {c}: {a} vs {b}");
            }
        }
        let affine = matches!(w, Weights::Affine(_));
        let expect_affine = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16);
        assert_eq!(matches!(w, Weights::Float(_)), !expect_affine, "{dtype:?} layout");
        assert_eq!(affine, expect_affine, "{dtype:?} layout");
    }
}

/// The product of every layout against an f64 product of the dequantized
/// weights with the exact activations: only activation rounding may differ.
#[test]
fn matmul_matches_dequantized_reference_for_every_type() {
    let (rows, cols, tokens) = (37, 256, 3);
    let x = pseudo_random(tokens * cols, 99);
    for dtype in ALL {
        let w = pseudo_random(rows * cols, dtype as u64 + 7);
        let (bytes, deq) = encode(dtype, &w);
        let m = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap();
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut out = vec![0f32; tokens * rows];
            m.matmul(&pool, &x, &mut ActBuf::default(), &mut out).unwrap();
            for t in 0..tokens {
                for r in 0..rows {
                    let exact: f64 =
                        (0..cols).map(|c| deq[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                    let norm: f64 = (0..cols).map(|c| (deq[r * cols + c] as f64 * x[t * cols + c] as f64).abs()).sum();
                    let got = out[t * rows + r] as f64;
                    // int8 activations: relative error of the terms ~ 1/127.
                    assert!((got - exact).abs() <= 0.02 * norm + 1e-3, "{dtype:?} t{t} r{r}: {got} vs {exact}");
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_kernels_agree_with_portable_kernel() {
    use super::x86::{Level, best_level, dot_rows_at};
    let (rows, tokens) = (13, 4);
    for dtype in quantized() {
        let cols = if dtype.block_size() == 256 { 768 } else { 576 };
        let x = pseudo_random(tokens * cols, 5);
        let (bytes, _) = encode(dtype, &pseudo_random(rows * cols, 11));
        let Weights::Affine(m) = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap() else {
            panic!("{dtype:?} not affine")
        };
        let mut a = QActs::default();
        a.quantize(&x, cols, m.nb);
        let mut want = vec![0f32; tokens * rows];
        m.dot_rows_portable(0, rows, &a, &mut want, rows);
        for lvl in [Level::Avx2, Level::Vnni] {
            if lvl > best_level() {
                eprintln!("skipping {lvl:?}: not supported by this CPU");
                continue;
            }
            let mut got = vec![0f32; tokens * rows];
            assert!(dot_rows_at(lvl, &m, 0, rows, &a, &mut got, rows));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{dtype:?} {lvl:?}: {g} vs {w}");
            }
        }
    }
}

/// A token's products do not depend on how many tokens share the call
/// (the kernels tile tokens by four): bit for bit, on every level.
#[cfg(target_arch = "x86_64")]
#[test]
fn each_token_gets_the_same_bits_alone_or_in_a_batch() {
    use super::x86::{Level, best_level, dot_rows_at};
    let (rows, tokens) = (13, 9);
    for dtype in quantized() {
        let cols = if dtype.block_size() == 256 { 768 } else { 576 };
        let x = pseudo_random(tokens * cols, 7);
        let (bytes, _) = encode(dtype, &pseudo_random(rows * cols, 13));
        let Weights::Affine(m) = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap() else {
            panic!("{dtype:?} not affine")
        };
        for lvl in [Level::Portable, Level::Avx2, Level::Vnni] {
            if lvl > best_level() {
                continue;
            }
            let run = |x: &[f32], n: usize| {
                let mut a = QActs::default();
                a.quantize(x, cols, m.nb);
                let mut out = vec![0f32; n * rows];
                if !dot_rows_at(lvl, &m, 0, rows, &a, &mut out, rows) {
                    m.dot_rows_portable(0, rows, &a, &mut out, rows);
                }
                out
            };
            let all = run(&x, tokens);
            for t in 0..tokens {
                let one = run(&x[t * cols..(t + 1) * cols], 1);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&all[t * rows..(t + 1) * rows]), "{dtype:?} {lvl:?} token {t}");
            }
        }
    }
}

/// Float weights (F32, F16, BF16): held in the file's bytes, every kernel
/// level within rounding of an f64 product, each token's bits the same
/// alone or in a batch, on any tail of columns.
#[cfg(target_arch = "x86_64")]
#[test]
fn float_kernels_are_exact_and_tile_independent() {
    use super::float::FloatMatrix;
    use super::x86::{Level, best_level, float_rows_at};
    use candle_core::quantized::GgmlDType::{BF16, F16, F32};
    for (dtype, cols) in [(F32, 100), (F16, 517), (BF16, 64), (F16, 40)] {
        let (rows, tokens) = (9, 6);
        let w = pseudo_random(rows * cols, 31);
        let bytes: Vec<u8> = match dtype {
            F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            F16 => w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => w.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        let m = FloatMatrix::new(dtype, rows, cols, &bytes).unwrap();
        assert_eq!(m.memory_bytes(), bytes.len());
        let x = pseudo_random(tokens * cols, 32);
        let mut deq = vec![0f32; cols];
        for lvl in [Level::Portable, Level::Avx2, Level::Vnni] {
            if lvl > best_level() {
                continue;
            }
            let run = |x: &[f32]| {
                let mut out = vec![0f32; x.len() / cols * rows];
                if !float_rows_at(lvl, &m, 0, rows, x, &mut out, rows) {
                    m.dot_rows_portable(0, rows, x, &mut out, rows);
                }
                out
            };
            let all = run(&x);
            for t in 0..tokens {
                let one = run(&x[t * cols..(t + 1) * cols]);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&all[t * rows..(t + 1) * rows]), "{dtype:?} {lvl:?} token {t}");
                for r in 0..rows {
                    m.row_f32(r, &mut deq);
                    let exact: f64 = (0..cols).map(|c| deq[c] as f64 * x[t * cols + c] as f64).sum();
                    let got = all[t * rows + r] as f64;
                    assert!((got - exact).abs() <= 1e-5 * (1.0 + exact.abs()) * cols as f64, "{dtype:?} {lvl:?} {got} vs {exact}");
                }
            }
        }
    }
}

/// The SIMD activation quantizer gives the portable one's bits, zeros,
/// ties and signs included.
#[test]
fn simd_quantization_equals_portable() {
    let cols = 96;
    let mut x = pseudo_random(cols, 8);
    x[3] = 0.0;
    x[4] = -0.0;
    x[40..72].iter_mut().for_each(|v| *v = 0.0);
    // Exact ties at half a step: amax 127 makes the step 1.
    x[80] = 127.0;
    x[81] = 2.5;
    x[82] = -2.5;
    let nb = 4;
    let run = |f: fn(&[f32], &mut [i8], &mut [f32], &mut [f32])| {
        let (mut q, mut d, mut s) = (vec![0i8; nb * 32], vec![0f32; nb], vec![0f32; nb]);
        f(&x, &mut q, &mut d, &mut s);
        (q, d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    let want = run(super::quantize_token_portable);
    let got = run(super::quantize_token);
    assert_eq!(got, want);
}

#[test]
fn odd_block_counts_are_padded() {
    // 96 columns = 3 blocks: the pair layout pads a fourth, zero block.
    let (rows, cols) = (4, 96);
    let (bytes, deq) = encode(GgmlDType::Q8_0, &pseudo_random(rows * cols, 3));
    let m = Weights::from_gguf("t", GgmlDType::Q8_0, rows, cols, &bytes).unwrap();
    let x = vec![1.0f32; cols];
    let mut out = vec![0f32; rows];
    m.matmul(&ThreadPool::new(1), &x, &mut ActBuf::default(), &mut out).unwrap();
    for r in 0..rows {
        let exact: f32 = deq[r * cols..(r + 1) * cols].iter().sum();
        assert!((out[r] - exact).abs() < 1e-3 * (1.0 + exact.abs()), "{} vs {exact}", out[r]);
    }
}

#[test]
fn wrong_sizes_are_errors() {
    assert!(Weights::from_gguf("t", GgmlDType::Q4_1, 2, 64, &[0u8; 79]).is_err());
    assert!(Weights::from_gguf("t", GgmlDType::Q4_1, 2, 48, &[0u8; 60]).is_err());
    let m = Weights::from_gguf("t", GgmlDType::Q8_0, 2, 64, &[0u8; 136]).unwrap();
    let mut out = vec![0f32; 3];
    assert!(m.matmul(&ThreadPool::new(1), &[0.0; 64], &mut ActBuf::default(), &mut out).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn activation_quantization_round_trips_within_half_a_step(x in proptest::collection::vec(-100f32..100.0, 64)) {
        let mut a = QActs::default();
        a.quantize(&x, 64, 2);
        for j in 0..2 {
            let d = a.d[j];
            let mut sum = 0i32;
            for e in 0..32 {
                let q = a.q[pair_pos(j, e)] as i32;
                sum += q;
                // f16 rounding of d adds a relative error of at most 2^-11 per value.
                prop_assert!((q as f32 * d - x[j * 32 + e]).abs() <= 0.5 * d + 127.0 * d / 2048.0 + 1e-6);
            }
            prop_assert!((a.s[j] - d * sum as f32).abs() <= 1e-3 * (1.0 + a.s[j].abs()));
        }
    }
}

/// Kernel speed per type (a measurement, not a check): `cargo test --release
/// -p fogmesh-models --lib kernel_speed -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints GMAC/s per type"]
fn kernel_speed_per_type() {
    let (rows, cols) = (2048, 1024);
    let pool = ThreadPool::new(1);
    for tokens in [1, 128] {
        for dtype in quantized().chain([GgmlDType::F16, GgmlDType::F32]) {
            let (bytes, _) = encode(dtype, &pseudo_random(rows * cols, 5));
            let m = Weights::from_gguf("t", dtype, rows, cols, &bytes).unwrap();
            let x = pseudo_random(tokens * cols, 6);
            let mut out = vec![0f32; tokens * rows];
            let mut acts = ActBuf::default();
            let reps = if tokens == 1 { 200 } else { 4 };
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    m.matmul(&pool, &x, &mut acts, &mut out).unwrap();
                }
                best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
            }
            let macs = (rows * cols * tokens) as f64;
            eprintln!("{tokens:>3} tokens {dtype:?}: {:.1} GMAC/s, {:.2} GB/s of weights", macs / best / 1e9, m.memory_bytes() as f64 / best / 1e9);
        }
    }
}
