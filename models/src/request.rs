//! [`GenerateRequest`]: what a caller asks to generate, and the one set of
//! checks every entry point applies to it (`fogmesh generate`, the runtime,
//! the fogmesh HTTP API and the OpenAI-compatible API).

use crate::config::LlamaConfig;
use crate::error::{RequestError, RequestErrorKind, invalid};
use crate::sampling::SamplingParams;

/// Most stop strings a request may carry (OpenAI's own bound).
pub const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What a caller asks to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl GenerateRequest {
    /// Checks the request against a model: a non-empty prompt of ids in the
    /// vocabulary, at least one token to generate, the prompt plus
    /// `max_tokens` within the context, sampling in range, at most
    /// [`MAX_STOPS`] non-empty stop strings of at most [`MAX_STOP_BYTES`].
    pub fn validate(&self, config: &LlamaConfig) -> Result<(), RequestError> {
        if self.prompt.is_empty() {
            return Err(invalid("prompt", "the prompt is empty".into()));
        }
        if let Some(t) = self.prompt.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(invalid("prompt", format!("token id {t} is outside the vocabulary of {}", config.vocab)));
        }
        let context = config.context;
        if self.prompt.len() >= context {
            let message = format!("the prompt has {} tokens; this model's context is {context} tokens", self.prompt.len());
            return Err(RequestError { param: "messages", kind: RequestErrorKind::ContextExceeded, message });
        }
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", "max_tokens must be at least 1".into()));
        }
        let room = context - self.prompt.len();
        if self.max_tokens > room {
            let message = format!(
                "max_tokens {} plus the prompt's {} tokens exceed this model's context of {context} tokens; ask for at most {room}",
                self.max_tokens,
                self.prompt.len()
            );
            return Err(RequestError { param: "messages", kind: RequestErrorKind::ContextExceeded, message });
        }
        self.sampling.check()?;
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(invalid(
                "stop",
                format!("stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            layers: 2,
            hidden: 8,
            ffn: 16,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            rope_dims: 4,
            rope_base: 10000.0,
            eps: 1e-5,
            vocab: 100,
            context: 32,
            q_dim: 8,
            family: crate::config::Family::Llama,
            window: None,
            rope_base_local: 10000.0,
            rope_scale: 1.0,
            attn_scale: 0.5,
        }
    }

    fn req() -> GenerateRequest {
        GenerateRequest { prompt: vec![1, 2, 3], max_tokens: 10, sampling: SamplingParams::greedy(), stop: vec![] }
    }

    #[test]
    fn a_request_that_fits_is_accepted_and_each_bound_names_its_field() {
        let c = config();
        assert_eq!(req().validate(&c), Ok(()));
        let fail = |f: &dyn Fn(&mut GenerateRequest)| {
            let mut r = req();
            f(&mut r);
            r.validate(&c).unwrap_err()
        };
        assert_eq!(fail(&|r| r.prompt.clear()).param, "prompt");
        assert_eq!(fail(&|r| r.prompt.push(100)).param, "prompt");
        assert_eq!(fail(&|r| r.max_tokens = 0).param, "max_tokens");
        let e = fail(&|r| r.max_tokens = 30);
        assert_eq!((e.kind, e.message.contains("at most 29")), (RequestErrorKind::ContextExceeded, true));
        assert_eq!(fail(&|r| r.prompt = vec![1; 32]).kind, RequestErrorKind::ContextExceeded);
        assert_eq!(fail(&|r| r.sampling.temperature = 2.5).param, "temperature");
        assert_eq!(fail(&|r| r.sampling.temperature = f32::NAN).param, "temperature");
        assert_eq!(fail(&|r| r.sampling.top_p = 0.0).param, "top_p");
        assert_eq!(fail(&|r| r.sampling.repetition_penalty = 11.0).param, "repeat_penalty");
        assert_eq!(fail(&|r| r.stop = vec!["a".into(); 5]).param, "stop");
        assert_eq!(fail(&|r| r.stop = vec![String::new()]).param, "stop");
        assert_eq!(fail(&|r| r.stop = vec!["x".repeat(257)]).param, "stop");
        // Exactly filling the context is fine.
        let mut r = req();
        r.max_tokens = 29;
        assert_eq!(r.validate(&c), Ok(()));
    }
}
