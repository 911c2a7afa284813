//! `fogmesh generate`: a generation with the model in this process.

use std::io::Write;

use anyhow::{Result, bail};
use clap::Args;
use fogmesh_models::{GenerateRequest, TokenLogit};
use serde::Serialize;

use super::{ModelArgs, load, timing_line};
use crate::api::types::GenFlags;

/// Options of `fogmesh generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
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

/// Runs `fogmesh generate`.
pub fn generate(a: GenerateArgs) -> Result<()> {
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

