//! Generation: the sans-I/O token loop ([`GenerationState`]) and a model run
//! in one process as a chain of shards ([`LocalModel`]).
//!
//! `GenerationState` turns logits into tokens and text (sampling, end tokens,
//! stop strings, token limits, streamed text that never shows a stop string),
//! whoever computed the logits; the mesh drives the same state machine.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::gguf::Gguf;
use crate::pool::ThreadPool;
use crate::sampling::{Sampler, SamplingParams, TokenLogit, top_logits};
use crate::shard::{LogitsFor, SessionCache, Shard, ShardInput, ShardOutput};
use crate::tokenizer::Tokenizer;
use crate::config::LlamaConfig;

/// Prompt tokens fed to the model per forward call (bounds scratch memory).
pub const PREFILL_CHUNK: usize = 256;

/// A transformation of the hidden states leaving shard `i` (see
/// [`LocalModel::forward_hooked`]).
pub type BoundaryHook<'a> = dyn FnMut(usize, &mut Vec<f32>) -> Result<()> + 'a;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
}

/// What one generated token adds.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The token.
    pub token: u32,
    /// Text that is now final (may be empty while a stop string or an
    /// incomplete character could still be forming).
    pub text: String,
    /// Set when generation is over.
    pub finish: Option<FinishReason>,
}

/// Timings of a generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Timings {
    /// Prompt tokens processed.
    pub prefill_tokens: usize,
    /// Time spent on them (until the first token's logits).
    pub prefill_ms: f64,
    /// Tokens fed back one by one after the first.
    pub decode_tokens: usize,
    /// Time spent on them.
    pub decode_ms: f64,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt's token ids.
    pub prompt_tokens: Vec<u32>,
    /// Generated token ids (including a final end token, if one was produced).
    pub tokens: Vec<u32>,
    /// Generated text, without special tokens, cut before any stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Timings.
    pub timings: Timings,
    /// Per step, the best logits (when asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logits: Vec<Vec<TokenLogit>>,
}

/// The token loop, independent of where logits come from.
#[derive(Debug)]
pub struct GenerationState {
    tokenizer: Arc<Tokenizer>,
    sampler: Sampler,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    history: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    top_k_logits: usize,
    top: Vec<Vec<TokenLogit>>,
    emitted: usize,
    text: String,
    finish: Option<FinishReason>,
}

impl GenerationState {
    /// A new loop over `prompt`.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
        top_k_logits: usize,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(GenerationState {
            tokenizer,
            sampler: Sampler::new(sampling)?,
            history: prompt.clone(),
            prompt,
            tokens: Vec::new(),
            max_tokens,
            stop,
            top_k_logits,
            top: Vec::new(),
            emitted: 0,
            text: String::new(),
            finish: if max_tokens == 0 { Some(FinishReason::Length) } else { None },
        })
    }

    /// The prompt.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Ends the generation by the time prompt and answer fill `positions`
    /// (where it runs holds no more), with [`FinishReason::Length`].
    pub fn limit_positions(&mut self, positions: usize) {
        let most = positions.saturating_sub(self.prompt.len()).max(self.tokens.len() + 1);
        self.max_tokens = self.max_tokens.min(most);
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Whether the loop has ended.
    pub fn finished(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the loop because the context is full.
    pub fn end_context(&mut self) -> Step {
        self.finish = Some(FinishReason::Context);
        Step { token: 0, text: self.flush_text(), finish: self.finish }
    }

    fn flush_text(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// Consumes the logits of the last position and returns the chosen token.
    pub fn push_logits(&mut self, logits: &[f32]) -> Result<Step> {
        if self.finish.is_some() {
            return Err(ModelError::Input("generation already finished".into()));
        }
        if self.top_k_logits > 0 {
            self.top.push(top_logits(logits, self.top_k_logits));
        }
        let token = self.sampler.sample(logits, &self.history)?;
        self.push_token(token)
    }

    /// The sampler (its parameters and how many random draws it has made).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Every token of the session so far: the prompt, then generated tokens.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Accepts a token sampled elsewhere (the last stage of a pipeline, with a
    /// sampler in the same state as this one) and advances this loop's
    /// sampler as that draw did.
    pub fn push_sampled(&mut self, token: u32) -> Result<Step> {
        if self.finish.is_some() {
            return Err(ModelError::Input("generation already finished".into()));
        }
        self.sampler.skip_draw();
        self.push_token(token)
    }

    fn push_token(&mut self, token: u32) -> Result<Step> {
        if token as usize >= self.tokenizer.vocab_size() {
            return Err(ModelError::Input(format!("token id {token} is outside the vocabulary")));
        }
        self.tokens.push(token);
        self.history.push(token);
        let full = self.tokenizer.decode(&self.tokens, true)?;
        let mut done = None;
        let mut text_end = full.len();
        if let Some(cut) = self.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            text_end = cut;
            done = Some(FinishReason::Stop);
        } else if self.tokenizer.is_end(token) {
            done = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.max_tokens {
            done = Some(FinishReason::Length);
        }
        self.text = full[..text_end].to_string();
        let stable = if done.is_some() {
            self.text.len()
        } else {
            // Hold back what could still become a stop string or an
            // incomplete character.
            let mut end = self.text.len();
            let hold = self.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
            end = end.saturating_sub(hold).max(self.emitted);
            if self.text.ends_with('\u{fffd}') {
                end = end.min(self.text.len() - '\u{fffd}'.len_utf8()).max(self.emitted);
            }
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
            end
        };
        let text = self.text[self.emitted..stable.max(self.emitted)].to_string();
        self.emitted = stable.max(self.emitted);
        self.finish = done;
        Ok(Step { token, text, finish: done })
    }

    /// The final result.
    pub fn into_generation(self, timings: Timings) -> Generation {
        Generation {
            prompt_tokens: self.prompt,
            tokens: self.tokens,
            text: self.text,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            timings,
            top_logits: self.top,
        }
    }
}

/// `k` contiguous layer ranges covering `0..layers`, deliberately uneven
/// (sizes grow roughly as 1, 2, 3, ...), for split tests and `--split`.
pub fn uneven_ranges(layers: usize, k: usize) -> Result<Vec<Range<usize>>> {
    if k == 0 || k > layers {
        return Err(ModelError::Input(format!("cannot cut {layers} layers into {k} shards")));
    }
    let total: usize = (1..=k).sum();
    let mut sizes: Vec<usize> = (1..=k).map(|w| (layers * w / total).max(1)).collect();
    let mut sum: usize = sizes.iter().sum();
    let mut i = k;
    while sum > layers {
        i = if i == 0 { k - 1 } else { i - 1 };
        if sizes[i] > 1 {
            sizes[i] -= 1;
            sum -= 1;
        }
    }
    sizes[k - 1] += layers - sum;
    let mut start = 0;
    Ok(sizes
        .into_iter()
        .map(|s| {
            let r = start..start + s;
            start += s;
            r
        })
        .collect())
}

/// A whole model in one process, as a chain of shards.
#[derive(Debug)]
pub struct LocalModel {
    shards: Vec<Shard>,
    tokenizer: Arc<Tokenizer>,
    config: LlamaConfig,
}

impl LocalModel {
    /// Loads the model at `path` cut into `ranges` (which must cover every
    /// layer in order), computing with `threads` threads.
    pub fn load(path: &Path, ranges: Option<&[Range<usize>]>, threads: usize) -> Result<Self> {
        Self::load_with_progress(path, ranges, threads, &mut |_, _| {})
    }

    /// [`LocalModel::load`], calling `progress(layers_read, layers)` as it
    /// goes (progress bars).
    pub fn load_with_progress(
        path: &Path,
        ranges: Option<&[Range<usize>]>,
        threads: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let g = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let tokenizer = Arc::new(Tokenizer::from_gguf(&g)?);
        let whole = [0..config.layers];
        let ranges = ranges.unwrap_or(&whole);
        let mut next = 0;
        for r in ranges {
            if r.start != next || r.end <= r.start {
                return Err(ModelError::LayerRange { start: r.start, end: r.end, layers: config.layers });
            }
            next = r.end;
        }
        if next != config.layers {
            return Err(ModelError::Input(format!("ranges end at layer {next}, the model has {}", config.layers)));
        }
        let pool = Arc::new(ThreadPool::new(threads));
        let total = config.layers;
        let mut done = 0;
        let shards = ranges
            .iter()
            .map(|r| {
                let file = std::fs::File::open(path)
                    .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
                Shard::load_from_with_progress(&g, std::io::BufReader::new(file), r.clone(), pool.clone(), &mut |_| {
                    done += 1;
                    progress(done, total);
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalModel { shards, tokenizer, config })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The shards, in pipeline order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Fresh per-session caches, one per shard.
    pub fn new_session(&self) -> Vec<SessionCache> {
        self.shards.iter().map(Shard::new_session).collect()
    }

    /// Runs `tokens` through every shard; returns the last stage's logits.
    pub fn forward(&self, caches: &mut [SessionCache], tokens: &[u32], which: LogitsFor) -> Result<Vec<f32>> {
        self.forward_hooked(caches, tokens, which, &mut |_, _| Ok(()))
    }

    /// Like [`LocalModel::forward`], passing the hidden states that leave
    /// shard `i` through `hook(i, hidden)` before shard `i + 1` sees them (what
    /// a wire codec does between peers).
    pub fn forward_hooked(
        &self,
        caches: &mut [SessionCache],
        tokens: &[u32],
        which: LogitsFor,
        hook: &mut BoundaryHook<'_>,
    ) -> Result<Vec<f32>> {
        if caches.len() != self.shards.len() {
            return Err(ModelError::Input(format!("{} caches for {} shards", caches.len(), self.shards.len())));
        }
        let mut out = ShardOutput::Hidden(Vec::new());
        for (i, (shard, cache)) in self.shards.iter().zip(caches.iter_mut()).enumerate() {
            let input = match (&out, i) {
                (_, 0) => ShardInput::Tokens(tokens),
                (ShardOutput::Hidden(h), _) => ShardInput::Hidden(h),
                (ShardOutput::Logits(_), _) => return Err(ModelError::Input("logits before the last stage".into())),
            };
            out = shard.forward(cache, input, which)?;
            if let ShardOutput::Hidden(h) = &mut out {
                hook(i, h)?;
            }
        }
        match out {
            ShardOutput::Logits(l) => Ok(l),
            ShardOutput::Hidden(_) => Err(ModelError::Input("the shards do not end with the output head".into())),
        }
    }

    /// Best `k` next-token logits after every position of `tokens`.
    pub fn score(&self, tokens: &[u32], k: usize) -> Result<Vec<Vec<TokenLogit>>> {
        let mut caches = self.new_session();
        let vocab = self.config.vocab;
        let mut out = Vec::with_capacity(tokens.len());
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            let logits = self.forward(&mut caches, chunk, LogitsFor::All)?;
            out.extend(logits.chunks_exact(vocab).map(|l| top_logits(l, k)));
        }
        Ok(out)
    }

    /// Generates from `prompt`, calling `on_step` for every token.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
        top_k_logits: usize,
        on_step: impl FnMut(&Step),
    ) -> Result<Generation> {
        self.generate_hooked(prompt, max_tokens, sampling, stop, top_k_logits, on_step, &mut |_, _| Ok(()))
    }

    /// [`LocalModel::generate`] with a hook on the hidden states between
    /// shards (see [`LocalModel::forward_hooked`]).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_hooked(
        &self,
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
        top_k_logits: usize,
        mut on_step: impl FnMut(&Step),
        hook: &mut BoundaryHook<'_>,
    ) -> Result<Generation> {
        let mut state = GenerationState::new(self.tokenizer.clone(), prompt, max_tokens, sampling, stop, top_k_logits)?;
        let mut caches = self.new_session();
        let mut timings = Timings::default();
        let ctx = self.config.context;
        if state.prompt().len() >= ctx {
            return Err(ModelError::ContextFull { pos: 0, tokens: state.prompt().len(), ctx });
        }
        let t0 = Instant::now();
        let prompt = state.prompt().to_vec();
        let mut logits = Vec::new();
        for chunk in prompt.chunks(PREFILL_CHUNK) {
            logits = self.forward_hooked(&mut caches, chunk, LogitsFor::Last, hook)?;
        }
        timings.prefill_tokens = prompt.len();
        timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        if state.finished().is_some() {
            return Ok(state.into_generation(timings));
        }
        let t1 = Instant::now();
        loop {
            let step = state.push_logits(&logits)?;
            on_step(&step);
            if step.finish.is_some() {
                break;
            }
            if caches[0].pos() >= ctx {
                on_step(&state.end_context());
                break;
            }
            logits = self.forward_hooked(&mut caches, &[step.token], LogitsFor::Last, hook)?;
            timings.decode_tokens += 1;
        }
        timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(state.into_generation(timings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uneven_ranges_cover_all_layers_unevenly() {
        for layers in [1usize, 2, 7, 30, 31] {
            for k in 1..=layers.min(30) {
                let r = uneven_ranges(layers, k).unwrap();
                assert_eq!(r.len(), k);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[k - 1].end, layers);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start && w[0].start < w[0].end));
            }
        }
        let r = uneven_ranges(30, 3).unwrap();
        assert!(r[0].len() != r[2].len());
        assert!(uneven_ranges(30, 31).is_err());
        assert!(uneven_ranges(30, 0).is_err());
    }
}
