//! `fogmesh score`: the best next-token logits after every position of
//! given token ids.

use anyhow::{Result, bail};
use fogmesh_models::TokenLogit;
use serde::Serialize;
use clap::Args;

use super::{ModelArgs, load};

/// Options of `fogmesh score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
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

/// Runs `fogmesh score`.
pub fn score(a: ScoreArgs) -> Result<()> {
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
