//! `fogmesh bench`: prefill and decode speed of this host, or one shard's
//! memory.

use anyhow::{Context, Result, bail};
use clap::Args;
use fogmesh_models::stats::median;

use super::{ModelArgs, load, model_path};

/// Options of `fogmesh bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
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

/// Runs `fogmesh bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
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
    let pp = (0..a.reps).map(|_| run_prefill()).collect::<Result<Vec<_>>>()?;
    let tg = (0..a.reps).map(|_| run_decode()).collect::<Result<Vec<_>>>()?;
    let threads = model.shards()[0].pool().threads();
    let (pp_med, tg_med) = (median(&pp), median(&tg));
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
