//! Choosing the next token from logits: greedy, temperature, top-k, top-p and
//! repetition penalty, with a seeded RNG so a run reproduces exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, RequestError, Result, invalid};

/// Highest sampling temperature (OpenAI's bound).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Highest repetition penalty.
pub const MAX_REPEAT_PENALTY: f32 = 10.0;
/// Recent tokens the repetition penalty looks at, everywhere.
pub const REPEAT_LAST_N: usize = 64;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this; 1 is off.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 40, top_p: 0.95, repetition_penalty: 1.0, repeat_last_n: REPEAT_LAST_N, seed: 0 }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks the parameters, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| ModelError::Sampling(e.message))
    }

    /// Checks the parameters against the bounds every entry point applies,
    /// naming the field at fault.
    pub fn check(&self) -> std::result::Result<(), RequestError> {
        let p = self;
        let t = p.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return Err(invalid("temperature", format!("temperature must be between 0 and {MAX_TEMPERATURE}, got {t}")));
        }
        if !(p.top_p.is_finite() && p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(invalid("top_p", format!("top_p must be in (0, 1], got {}", p.top_p)));
        }
        let r = p.repetition_penalty;
        if !(r.is_finite() && r > 0.0 && r <= MAX_REPEAT_PENALTY) {
            return Err(invalid("repeat_penalty", format!("repeat_penalty must be in (0, {MAX_REPEAT_PENALTY}], got {r}")));
        }
        Ok(())
    }
}

/// One token and its logit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenLogit {
    /// Token id.
    pub id: u32,
    /// Raw logit.
    pub logit: f32,
}

/// The `k` highest logits, best first (ties by lower id).
pub fn top_logits(logits: &[f32], k: usize) -> Vec<TokenLogit> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|id| TokenLogit { id, logit: logits[id as usize] }).collect()
}

/// The log-probability of `token` under the softmax of `logits`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let l = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    ((l - max) as f64 - sum.ln()) as f32
}

/// The index of the highest logit (the lowest such index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A stateful sampler: the RNG advances with every draw.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<f32>,
    draws: u64,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, scratch: Vec::new(), draws: 0 })
    }

    /// A sampler in the state `Sampler::new(params)` reaches after `draws`
    /// random draws (to resume a session's sampling elsewhere), in constant
    /// time: each draw takes one `f64`, two 32-bit words of the ChaCha
    /// stream, so the stream is set to word `2 * draws`.
    pub fn resume(params: SamplingParams, draws: u64) -> Result<Self> {
        let mut s = Sampler::new(params)?;
        if s.params.temperature != 0.0 {
            s.rng.set_word_pos(2 * u128::from(draws));
            s.draws = draws;
        }
        Ok(s)
    }

    /// Random draws made so far (greedy sampling makes none).
    pub fn draws(&self) -> u64 {
        self.draws
    }

    /// Advances the RNG as one [`Sampler::sample`] call would.
    pub fn skip_draw(&mut self) {
        if self.params.temperature != 0.0 {
            let _ = self.rng.random::<f64>();
            self.draws += 1;
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token given the logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::Sampling("no logits".into()));
        }
        let p = &self.params;
        let logits = if p.repetition_penalty != 1.0 && !history.is_empty() {
            self.scratch.clear();
            self.scratch.extend_from_slice(logits);
            let from = history.len().saturating_sub(p.repeat_last_n);
            for &id in &history[from..] {
                if let Some(l) = self.scratch.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
            &self.scratch[..]
        } else {
            logits
        };
        if p.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let k = if p.top_k == 0 { logits.len() } else { p.top_k.min(logits.len()) };
        let cands = top_logits(logits, k);
        let max = cands[0].logit;
        let mut probs: Vec<f64> = cands.iter().map(|c| (((c.logit - max) / p.temperature) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr / total;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        self.draws += 1;
        let mut u = self.rng.random::<f64>() * total;
        for (c, pr) in cands.iter().zip(&probs) {
            if u < *pr {
                return Ok(c.id);
            }
            u -= pr;
        }
        Ok(cands[keep - 1].id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn resumed_sampler_continues_the_same_sequence() {
        let p = SamplingParams { temperature: 0.8, seed: 9, ..SamplingParams::default() };
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 / 3.0).collect();
        let mut a = Sampler::new(p.clone()).unwrap();
        let first: Vec<u32> = (0..5).map(|_| a.sample(&logits, &[]).unwrap()).collect();
        assert_eq!(a.draws(), 5);
        let mut b = Sampler::resume(p, 5).unwrap();
        for _ in 0..5 {
            assert_eq!(a.sample(&logits, &[]).unwrap(), b.sample(&logits, &[]).unwrap());
        }
        assert!(!first.is_empty());
        assert!((log_prob(&[0.0, 0.0], 1) - 0.5f32.ln()).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn resuming_jumps_to_where_the_draws_would_have_left_the_stream(seed: u64, n in 0u64..3000) {
            let p = SamplingParams { temperature: 0.7, seed, ..SamplingParams::default() };
            let mut walked = Sampler::new(p.clone()).unwrap();
            for _ in 0..n {
                walked.skip_draw();
            }
            let mut jumped = Sampler::resume(p, n).unwrap();
            prop_assert_eq!(jumped.draws(), n);
            let logits: Vec<f32> = (0..64).map(|i| ((i * 29) % 13) as f32 / 4.0).collect();
            for _ in 0..4 {
                prop_assert_eq!(walked.sample(&logits, &[]).unwrap(), jumped.sample(&logits, &[]).unwrap());
            }
        }
    }

    #[test]
    fn resuming_after_billions_of_draws_takes_no_time() {
        let p = SamplingParams { temperature: 0.7, seed: 1, ..SamplingParams::default() };
        let t = std::time::Instant::now();
        let s = Sampler::resume(p, u64::from(u32::MAX)).unwrap();
        assert_eq!(s.draws(), u64::from(u32::MAX));
        // Constant time; the old loop took minutes for this count.
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn greedy_picks_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0], &[]).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_demotes_recent_tokens() {
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1]).unwrap(), 2);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        for p in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 has ~88% of the mass: top_p 0.5 must always pick it.
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 7, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        for _ in 0..200 {
            assert_eq!(s.sample(&[3.0, 1.0, 0.0, -1.0], &[]).unwrap(), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let n = 4000;
        let ones = (0..n).filter(|_| s.sample(&logits, &[]).unwrap() == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
    }

    proptest! {
        #[test]
        fn same_seed_same_tokens(seed in any::<u64>(), logits in proptest::collection::vec(-10f32..10.0, 2..64)) {
            let p = SamplingParams { temperature: 0.9, top_k: 10, top_p: 0.9, seed, ..Default::default() };
            let mut a = Sampler::new(p.clone()).unwrap();
            let mut b = Sampler::new(p).unwrap();
            for _ in 0..8 {
                let x = a.sample(&logits, &[]).unwrap();
                prop_assert_eq!(x, b.sample(&logits, &[]).unwrap());
                prop_assert!((x as usize) < logits.len());
            }
        }

        #[test]
        fn top_k_only_returns_top_k(logits in proptest::collection::vec(-10f32..10.0, 5..64), seed in any::<u64>()) {
            let p = SamplingParams { temperature: 2.0, top_k: 3, top_p: 1.0, seed, ..Default::default() };
            let mut s = Sampler::new(p).unwrap();
            let top: Vec<u32> = top_logits(&logits, 3).iter().map(|t| t.id).collect();
            for _ in 0..8 {
                prop_assert!(top.contains(&s.sample(&logits, &[]).unwrap()));
            }
        }
    }
}
