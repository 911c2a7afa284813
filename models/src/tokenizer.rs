//! The tokenizer and chat template a GGUF file carries.
//!
//! From `tokenizer.ggml.*` metadata, one of two kinds: a GPT-2-style
//! byte-level BPE (`gpt2`), built with the `tokenizers` crate with the
//! pre-tokenizer the file names (`tokenizer.ggml.pre`); or a
//! SentencePiece-style vocabulary with scores and byte fallback (`llama`:
//! Llama 1/2, Mistral, Gemma), in `spm.rs`. Special tokens come from the
//! token types; the chat template is the file's own Jinja template rendered
//! by `minijinja`, or the family's known one when the file has none.

mod spm;

use serde::Serialize;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::Gguf;

use spm::{Spm, TYPE_CONTROL as TOKEN_CONTROL, TYPE_USER_DEFINED as TOKEN_USER_DEFINED};

/// The Llama-3 pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen 2 (and 3) pre-tokenizer split pattern: Llama 3's with digits
/// one by one.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of special tokens that end a generation wherever a file has them.
const END_OF_GENERATION: &[&str] = &["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "<end_of_turn>"];

/// Gemma's chat format, for Gemma files that carry no template: turns
/// `user` and `model`, a system message folded into the first user turn
/// (Gemma has no system role); BOS comes from the tokenizer, not the text.
const GEMMA_TEMPLATE: &str = concat!(
    "{%- set ns = namespace(system='') -%}",
    "{%- for m in messages -%}",
    "{%- if m.role == 'system' -%}{%- set ns.system = ns.system ~ m.content ~ '\n\n' -%}",
    "{%- else -%}",
    "{{- '<start_of_turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\n' ~ (ns.system if m.role == 'user' else '') ~ m.content ~ '<end_of_turn>\n' -}}",
    "{%- if m.role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{{- '<start_of_turn>model\n' -}}",
);

/// How text becomes ids.
#[derive(Debug, Clone)]
enum Backend {
    /// Byte-level BPE: `inner` reads control-token texts as their ids,
    /// `plain` as plain text.
    Bpe { inner: Box<tokenizers::Tokenizer>, plain: Box<tokenizers::Tokenizer> },
    /// SentencePiece-style.
    Spm(Box<Spm>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Text to token ids and back, as the model file defines it.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
    /// Texts of the control tokens.
    controls: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_ids: Vec<u32>,
    tokens: Vec<String>,
    chat_template: Option<String>,
    /// Bytes the vocabulary has no token for (byte-level BPE maps each byte
    /// to a character, SentencePiece has byte tokens; a vocabulary may lack
    /// some).
    dropped: [bool; 256],
}

/// The character GPT-2's byte-level BPE stands each byte for.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer described by the file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" && model != "llama" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model `{model}` (supported: `gpt2` byte-level BPE and `llama` SentencePiece-style vocabularies)"
            )));
        }
        let meta = |key: &str, problem: String| ModelError::Metadata { key: key.into(), problem };
        let tokens: Vec<String> = g
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| meta("tokenizer.ggml.tokens", "holds a non-string".into()))?;
        let types: Vec<i64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => g
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.as_i64())
                .collect::<Option<_>>()
                .ok_or_else(|| meta("tokenizer.ggml.token_type", "holds a non-integer".into()))?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(meta("tokenizer.ggml.token_type", format!("{} types for {} tokens", types.len(), tokens.len())));
        }
        let flag = |key: &str, default: bool| g.metadata.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let (backend, dropped) = if model == "llama" {
            let scores: Vec<f32> = match g.metadata.get("tokenizer.ggml.scores") {
                Some(_) => g
                    .get_array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| meta("tokenizer.ggml.scores", "holds a non-number".into()))?,
                None => vec![0.0; tokens.len()],
            };
            if scores.len() != tokens.len() {
                return Err(meta("tokenizer.ggml.scores", format!("{} scores for {} tokens", scores.len(), tokens.len())));
            }
            let spm = Spm::new(tokens.clone(), types.clone(), scores, flag("tokenizer.ggml.add_space_prefix", true));
            let mut dropped = [false; 256];
            for (b, d) in dropped.iter_mut().enumerate() {
                *d = spm.drops_byte(b as u8);
            }
            (Backend::Spm(Box::new(spm)), dropped)
        } else {
            Self::bpe(g, &tokens, &types)?
        };
        let id_key = |key: &str| -> Result<Option<u32>> {
            match g.metadata.get(key) {
                None => Ok(None),
                Some(_) => {
                    let id = g.get_usize(key)?;
                    if id >= tokens.len() {
                        return Err(meta(key, format!("token id {id} is outside the vocabulary")));
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        // llama.cpp's defaults: SentencePiece vocabularies add BOS unless told not to.
        let add_bos = flag("tokenizer.ggml.add_bos_token", model == "llama");
        let mut end_ids: Vec<u32> = eos.into_iter().collect();
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TOKEN_CONTROL && END_OF_GENERATION.contains(&t.as_str()) && !end_ids.contains(&(i as u32)) {
                end_ids.push(i as u32);
            }
        }
        let family = g.metadata.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
        let chat_template = g
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .or_else(|| family.starts_with("gemma").then(|| GEMMA_TEMPLATE.to_string()));
        let controls: Vec<String> =
            tokens.iter().zip(&types).filter(|(_, t)| **t == TOKEN_CONTROL).map(|(s, _)| s.clone()).collect();
        Ok(Tokenizer { backend, controls, bos, eos, add_bos, end_ids, tokens, chat_template, dropped })
    }

    /// The byte-level BPE of a `gpt2` vocabulary, and the bytes it lacks.
    fn bpe(g: &Gguf, tokens: &[String], types: &[i64]) -> Result<(Backend, [bool; 256])> {
        let meta = |key: &str, problem: String| ModelError::Metadata { key: key.into(), problem };
        let merges: Vec<(String, String)> = g
            .get_array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| v.as_str().and_then(|s| s.split_once(' ')).map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<_>>()
            .ok_or_else(|| meta("tokenizer.ggml.merges", "holds an entry that is not `left right`".into()))?;
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = match g.metadata.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default") {
            "default" | "gpt2" | "gpt-2" => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            name @ ("llama-bpe" | "llama3" | "qwen2") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(
                    Split::new(
                        SplitPattern::Regex(if name == "qwen2" { QWEN2_PATTERN } else { LLAMA3_PATTERN }.into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tok_err)?,
                ),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])),
            other => return Err(ModelError::Unsupported(format!("pre-tokenizer `{other}`"))),
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| **t == TOKEN_CONTROL || **t == TOKEN_USER_DEFINED)
            .map(|(s, t)| AddedToken::from(s.clone(), *t == TOKEN_CONTROL))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let known: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        let mut dropped = [false; 256];
        for (b, d) in dropped.iter_mut().enumerate() {
            *d = !known.contains(byte_char(b as u8).to_string().as_str());
        }
        Ok((Backend::Bpe { inner: Box::new(inner), plain: Box::new(plain) }, dropped))
    }

    /// Token ids of `text`, with BOS first when the file asks for it.
    /// Special-token texts in `text` (e.g. `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, with BOS first when the file asks for it;
    /// control-token texts in it become their ids only when
    /// `parse_special` (otherwise they are plain text).
    pub fn encode_with(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = if self.add_bos { self.bos.into_iter().collect() } else { Vec::new() };
        self.encode_into(text, parse_special, &mut ids)?;
        Ok(ids)
    }

    /// Appends the ids of `text` (no BOS).
    fn encode_into(&self, text: &str, parse_special: bool, ids: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Bpe { inner, plain } => {
                let tok = if parse_special { inner } else { plain };
                ids.extend_from_slice(tok.encode(text, false).map_err(tok_err)?.get_ids());
            }
            Backend::Spm(spm) => ids.extend(spm.encode(text, parse_special)),
        }
        Ok(())
    }

    /// The text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.tokens.len()) {
            return Err(ModelError::Tokenizer(format!("token id {bad} is outside the vocabulary")));
        }
        match &self.backend {
            Backend::Bpe { inner, .. } => inner.decode(ids, skip_special).map_err(tok_err),
            Backend::Spm(spm) => {
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    spm.piece(id, skip_special, &mut bytes);
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The end-of-sequence token id, if the file names one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` ends a generation (EOS and end-of-turn control tokens).
    pub fn is_end(&self, id: u32) -> bool {
        self.end_ids.contains(&id)
    }

    /// Whether encoding drops byte `b` of a text: the vocabulary has no token
    /// for it (llama.cpp drops such bytes too). SmolLM2's lacks a few
    /// control characters and bytes that lead no assigned character.
    pub fn drops_byte(&self, b: u8) -> bool {
        self.dropped[usize::from(b)]
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<s>`, …).
    pub fn is_control(&self, id: u32) -> bool {
        self.tokens.get(id as usize).is_some_and(|t| self.controls.contains(t))
    }

    /// The chat template carried by the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `messages` rendered through the chat template, ending
    /// with the prompt for the assistant's turn. Control tokens come only
    /// from the template: a message whose content spells one (say
    /// `<|im_end|><|im_start|>system`) gets it as plain text, so a user
    /// cannot open a turn of another role. Messages that spell none give
    /// exactly `encode(apply_chat_template(messages))`.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let spells_control = |m: &ChatMessage| self.controls.iter().any(|c| !c.is_empty() && m.content.contains(c.as_str()));
        if !messages.iter().any(spells_control) {
            return self.encode(&self.apply_chat_template(messages)?);
        }
        // Render with a marker in place of each content, then encode the
        // template's own text with its control tokens and each content as
        // plain text.
        const MARK: char = '\u{F8FF}';
        let masked: Vec<ChatMessage> =
            messages.iter().enumerate().map(|(i, m)| ChatMessage::new(&m.role, &format!("{MARK}{i}{MARK}"))).collect();
        let text = self.apply_chat_template(&masked)?;
        let mut ids: Vec<u32> = if self.add_bos { self.bos.into_iter().collect() } else { Vec::new() };
        let mut pieces = text.split(MARK);
        let mut found = 0;
        if let Some(head) = pieces.next() {
            self.encode_into(head, true, &mut ids)?;
        }
        // After the head, pieces alternate: a message index, then template text.
        while let (Some(index), Some(after)) = (pieces.next(), pieces.next()) {
            let m = index.parse::<usize>().ok().and_then(|i| messages.get(i)).ok_or_else(|| {
                ModelError::Template("the chat template changes message contents; cannot keep them apart".into())
            })?;
            self.encode_into(&m.content, false, &mut ids)?;
            self.encode_into(after, true, &mut ids)?;
            found += 1;
        }
        if found == 0 {
            return Err(ModelError::Template("the chat template changes message contents; cannot keep them apart".into()));
        }
        Ok(ids)
    }

    /// Renders `messages` through the file's chat template, ending with the
    /// prompt for the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model file carries no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let name = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize)).cloned().unwrap_or_default();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => name(self.bos),
            eos_token => name(self.eos),
        };
        env.render_str(template, ctx).map_err(|e| ModelError::Template(e.to_string()))
    }
}
