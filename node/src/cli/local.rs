//! The commands that run the model in this process: `fogmesh generate`,
//! `fogmesh score` and `fogmesh bench`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use fogmesh_models::{GenerateRequest, LocalModel, TokenLogit, uneven_ranges};
use serde::Serialize;

use super::resolve_model;
use crate::api::types::GenFlags;

#[derive(Debug, Args)]
pub(super) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length of the prefill test.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens of the decode test (one at a time from an empty context).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions of each test (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Only load layers START..END as one shard and report its memory.
    #[arg(long, value_name = "START..END")]
    shard: Option<String>,
}

#[derive(Debug, Args)]
pub(super) struct ModelArgs {
    /// GGUF model file [default: $FOGMESH_MODEL, else the fetched default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Run through K in-process shards chained one after another (uneven ranges).
    #[arg(long, default_value_t = 1)]
    split: usize,
}

#[derive(Debug, Args)]
pub(super) struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    flags: GenFlags,
    /// With --json, report the K best logits of every step.
    #[arg(long, default_value_t = 0)]
    top_logits: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(super) struct ScoreArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// How many best logits to report per position.
    #[arg(long, default_value_t = 5)]
    top_logits: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the command line; the binary's whole `main`.
fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    resolve_model(m.model.as_deref())
}

/// The model file: `path` if given (it must exist), else the default model,
/// fetched when missing.
fn load(m: &ModelArgs) -> Result<LocalModel> {
    let path = model_path(m)?;
    let threads = match m.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) if t > 1024 => bail!("--threads {t} is more than 1024; this host has {} cores", std::thread::available_parallelism().map_or(1, |n| n.get())),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let g = fogmesh_models::gguf::Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = fogmesh_models::LlamaConfig::from_gguf(&g)?;
    let ranges = uneven_ranges(cfg.layers, m.split).context("--split")?;
    let bar = indicatif::ProgressBar::new(cfg.layers as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} layers ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("loading");
    let m = LocalModel::load_with_progress(&path, Some(&ranges), threads, &mut |done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    m.with_context(|| format!("loading {}", path.display()))
}

#[derive(Serialize)]
struct GenerateJson<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    finish_reason: fogmesh_models::FinishReason,
    seed: u64,
    timings: &'a fogmesh_models::Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logits: Option<&'a [Vec<TokenLogit>]>,
}

pub(super) fn generate(a: GenerateArgs) -> Result<()> {
    let model = load(&a.model)?;
    let prompt = a.flags.prompt_tokens(model.tokenizer())?;
    let req = GenerateRequest { prompt, max_tokens: a.flags.max_tokens, sampling: a.flags.sampling(), stop: a.flags.stop.clone() };
    if let Err(e) = req.validate(model.config()) {
        let flag = match e.param {
            "messages" | "prompt" => "prompt",
            p => p,
        };
        bail!("{e} (--{})", flag.replace('_', "-"));
    }
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let out = model.generate(req.prompt, req.max_tokens, req.sampling, req.stop, a.top_logits, |step| {
        if stream && !step.text.is_empty() {
            let _ = stdout.write_all(step.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if a.json {
        let j = GenerateJson {
            prompt_tokens: &out.prompt_tokens,
            tokens: &out.tokens,
            text: &out.text,
            finish_reason: out.finish_reason,
            seed: a.flags.seed,
            timings: &out.timings,
            top_logits: (a.top_logits > 0).then_some(&out.top_logits[..]),
        };
        serde_json::to_writer(&mut stdout, &j)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout)?;
        eprintln!("[{}; {}]", timing_line(&out.timings), fogmesh_models::kernel_name());
    }
    Ok(())
}

pub(super) fn score(a: ScoreArgs) -> Result<()> {
    let model = load(&a.model)?;
    if a.top_logits == 0 {
        bail!("--top-logits must be at least 1");
    }
    let top = model.score(&a.tokens, a.top_logits)?;
    if a.json {
        #[derive(Serialize)]
        struct ScoreJson<'a> {
            tokens: &'a [u32],
            top_logits: &'a [Vec<TokenLogit>],
        }
        println!("{}", serde_json::to_string(&ScoreJson { tokens: &a.tokens, top_logits: &top })?);
    } else {
        let tok = model.tokenizer();
        for (i, (t, best)) in a.tokens.iter().zip(&top).enumerate() {
            let shown: Vec<String> = best
                .iter()
                .map(|b| format!("{:?} {:.3}", tok.decode(&[b.id], false).unwrap_or_default(), b.logit))
                .collect();
            println!("{i:4} {:>8} -> {}", t, shown.join(", "));
        }
    }
    Ok(())
}

/// "N prompt tokens in .. ms (.. tok/s); M tokens decoded in .. ms (.. tok/s)".
pub(super) fn timing_line(t: &fogmesh_models::Timings) -> String {
    format!(
        "{} prompt tokens in {:.0} ms ({:.1} tok/s); {} tokens decoded in {:.0} ms ({:.1} tok/s)",
        t.prefill_tokens,
        t.prefill_ms,
        t.prefill_tokens as f64 / (t.prefill_ms.max(1e-9) / 1e3),
        t.decode_tokens,
        t.decode_ms,
        t.decode_tokens as f64 / (t.decode_ms.max(1e-9) / 1e3),
    )
}

/// Median of `xs` (which must not be empty).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// Resident set size of this process, from /proc (Linux), in bytes.
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn parse_range(s: &str) -> Result<std::ops::Range<usize>> {
    let (a, b) = s.split_once("..").context("expected START..END, e.g. 10..20")?;
    Ok(a.trim().parse().context("range start")?..b.trim().parse().context("range end")?)
}

/// Loads one shard and reports its weight bytes and the process's RSS.
fn bench_shard_memory(a: &BenchArgs, range: &str) -> Result<()> {
    let path = model_path(&a.model)?;
    let range = parse_range(range)?;
    let before = rss_bytes().unwrap_or(0);
    let pool = std::sync::Arc::new(fogmesh_models::ThreadPool::new(1));
    let shard = fogmesh_models::Shard::load(&path, range.clone(), pool)?;
    let after = rss_bytes().unwrap_or(0);
    let file = std::fs::metadata(&path)?.len();
    let j = serde_json::json!({
        "layers": [range.start, range.end], "weights_bytes": shard.memory_bytes(),
        "rss_bytes": after, "rss_growth_bytes": after.saturating_sub(before), "file_bytes": file,
    });
    if a.json {
        println!("{j}");
    } else {
        println!(
            "layers {}..{}: weights {:.1} MiB, process RSS {:.1} MiB (file {:.1} MiB)",
            range.start,
            range.end,
            shard.memory_bytes() as f64 / 1048576.0,
            after as f64 / 1048576.0,
            file as f64 / 1048576.0
        );
    }
    Ok(())
}

pub(super) fn bench(a: BenchArgs) -> Result<()> {
    if let Some(r) = &a.shard {
        return bench_shard_memory(&a, r);
    }
    if a.reps == 0 || a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--reps, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let model = load(&a.model)?;
    let vocab = model.config().vocab as u32;
    if a.prompt_tokens + a.gen_tokens + 1 > model.config().context {
        bail!("--prompt-tokens + --gen-tokens exceed the model's context of {}", model.config().context);
    }
    // Deterministic, varied token ids (as llama-bench uses random ones).
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab).collect();
    let run_prefill = || -> Result<f64> {
        let mut caches = model.new_session();
        let t = std::time::Instant::now();
        for chunk in prompt.chunks(fogmesh_models::PREFILL_CHUNK) {
            model.forward(&mut caches, chunk, fogmesh_models::LogitsFor::Last)?;
        }
        Ok(a.prompt_tokens as f64 / t.elapsed().as_secs_f64())
    };
    let run_decode = || -> Result<f64> {
        let mut caches = model.new_session();
        let mut next = prompt[0];
        let t = std::time::Instant::now();
        for _ in 0..a.gen_tokens {
            let l = model.forward(&mut caches, &[next], fogmesh_models::LogitsFor::Last)?;
            next = fogmesh_models::argmax(&l);
        }
        Ok(a.gen_tokens as f64 / t.elapsed().as_secs_f64())
    };
    run_prefill()?; // warm-up
    run_decode()?;
    let mut pp = (0..a.reps).map(|_| run_prefill()).collect::<Result<Vec<_>>>()?;
    let mut tg = (0..a.reps).map(|_| run_decode()).collect::<Result<Vec<_>>>()?;
    let threads = model.shards()[0].pool().threads();
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "threads": threads, "split": a.model.split, "kernel": fogmesh_models::kernel_name(),
                "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "reps": a.reps,
                "prefill_tok_s_median": pp_med, "decode_tok_s_median": tg_med,
                "prefill_tok_s": pp, "decode_tok_s": tg,
            })
        );
    } else {
        println!(
            "threads {threads} kernel {}: pp{} {:.1} tok/s, tg{} {:.1} tok/s (median of {})",
            fogmesh_models::kernel_name(),
            a.prompt_tokens,
            pp_med,
            a.gen_tokens,
            tg_med,
            a.reps
        );
    }
    Ok(())
}
