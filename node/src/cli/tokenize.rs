//! `fogmesh tokenize`: the token ids of a text under a model's tokenizer
//! (only the file's vocabulary is read, not its weights).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Options of `fogmesh tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// GGUF model file or catalogue name [default: $FOGMESH_MODEL, else the default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Read control-token texts in TEXT (such as `<start_of_turn>`) as
    /// those tokens; without it they are plain text, as a user's text is.
    #[arg(long)]
    special: bool,
    /// Print `{"ids":[…]}`.
    #[arg(long)]
    json: bool,
    /// The text.
    text: String,
}

/// Prints the ids of the text, BOS included when the file adds one.
pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = super::resolve_model(a.model.as_deref())?;
    let g = fogmesh_models::gguf::Gguf::open(&path).with_context(|| format!("reading {}", path.display()))?;
    let tok = fogmesh_models::Tokenizer::from_gguf(&g).with_context(|| format!("the tokenizer of {}", path.display()))?;
    let ids = tok.encode_with(&a.text, a.special)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        let shown: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("{}", shown.join(" "));
    }
    Ok(())
}
