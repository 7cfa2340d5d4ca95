//! Choosing the next token from the logits: OpenAI's sampling parameters.
//!
//! For each step, over the logits `l` of the vocabulary and the counts `c[t]`
//! of every token `t` generated so far (the prompt does not count):
//! 1. penalties, as OpenAI defines them:
//!    `l[t] -= c[t] * frequency_penalty + (c[t] > 0) * presence_penalty`;
//! 2. temperature 0: the argmax (the lowest id among ties); otherwise
//!    `l / temperature`;
//! 3. `top_k`: only the `k` largest logits stay candidates;
//! 4. softmax, then `top_p` (nucleus): the smallest set of most likely tokens
//!    whose probability sums to at least `top_p` stays;
//! 5. a draw from the renormalised distribution, with a ChaCha20 generator
//!    seeded from `seed` (so a seed reproduces a completion exactly) or from
//!    the operating system.
//!
//! Ranges (checked by [`SamplingParams::validate`]): temperature in [0, 2],
//! top_p in (0, 1], top_k >= 1, penalties in [-2, 2], max_tokens >= 1, stop
//! sequences non-empty.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// How to decode a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most tokens to generate (default 256); the model's context may stop
    /// generation earlier (finish reason `length`).
    pub max_tokens: usize,
    /// Softmax temperature in [0, 2] (default 1); 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus mass in (0, 1] (default 1: no truncation).
    pub top_p: f32,
    /// Keep only the `k` most likely tokens (default: all).
    pub top_k: Option<usize>,
    /// Seed of the sampler: the same seed reproduces the same completion.
    pub seed: Option<u64>,
    /// Subtracted once per earlier occurrence of a token, in [-2, 2] (default 0).
    pub frequency_penalty: f32,
    /// Subtracted once from every token already generated, in [-2, 2] (default 0).
    pub presence_penalty: f32,
    /// Generation stops before the first of these strings (not returned).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every range; the error names the parameter and its range.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens < 1 {
            return Err(RuntimeError::range(
                "max_tokens",
                self.max_tokens,
                "at least 1",
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(RuntimeError::range(
                "temperature",
                self.temperature,
                "between 0 and 2",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::range(
                "top_p",
                self.top_p,
                "greater than 0 and at most 1",
            ));
        }
        if self.top_k == Some(0) {
            return Err(RuntimeError::range("top_k", 0, "at least 1"));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(RuntimeError::range(name, v, "between -2 and 2"));
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(RuntimeError::BadParameter {
                param: "stop".into(),
                reason: "stop sequences must not be empty strings".into(),
            });
        }
        Ok(())
    }
}

/// Applies OpenAI's penalties in place:
/// `logits[t] -= counts[t] * frequency + (counts[t] > 0) * presence`.
pub fn apply_penalties(
    logits: &mut [f32],
    counts: &HashMap<u32, u32>,
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    for (&t, &c) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            if c > 0 {
                *l -= c as f32 * frequency + presence;
            }
        }
    }
}

/// The index of the largest value (the lowest index among ties; NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// The sampler of one completion: its parameters, its random generator and
/// the counts of the tokens it produced.
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: Option<usize>,
    frequency_penalty: f32,
    presence_penalty: f32,
    rng: ChaCha20Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for validated `params`.
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_rng(&mut rand::rng()),
        };
        Ok(Sampler {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            rng,
            counts: HashMap::new(),
        })
    }

    /// How often each token was chosen so far.
    pub fn counts(&self) -> &HashMap<u32, u32> {
        &self.counts
    }

    /// The logits after the penalties and the temperature (what the
    /// distribution is built from); `logits` is modified in place.
    pub fn adjust(&self, logits: &mut [f32]) {
        apply_penalties(
            logits,
            &self.counts,
            self.frequency_penalty,
            self.presence_penalty,
        );
        if self.temperature > 0.0 {
            // Shifted so the largest logit is 0 before dividing (softmax,
            // top_k and top_p do not change under a shift), so a tiny
            // temperature sends the others to -inf instead of overflowing
            // the largest to +inf.
            let max = logits
                .iter()
                .copied()
                .filter(|l| l.is_finite())
                .fold(f32::NEG_INFINITY, f32::max);
            let shift = if max.is_finite() { max } else { 0.0 };
            for l in logits.iter_mut() {
                *l = (*l - shift) / self.temperature;
            }
        }
    }

    /// The candidates and their probabilities after top_k, softmax and
    /// top_p, most likely first (ties: lowest id first). `logits` must have
    /// been [`Sampler::adjust`]ed.
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<(u32, f32)>> {
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if let Some(k) = self.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let Some(&first) = order.first() else {
            return Err(RuntimeError::NonFinite {
                what: "the model's logits".into(),
                reason: "every logit is NaN".into(),
            });
        };
        let max = logits[first as usize];
        if !max.is_finite() {
            return Err(RuntimeError::NonFinite {
                what: "the model's logits".into(),
                reason: format!("the largest is {max}"),
            });
        }
        let mut probs: Vec<(u32, f32)> = order
            .iter()
            .map(|&i| (i, (logits[i as usize] - max).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        for p in probs.iter_mut() {
            p.1 /= total;
        }
        if self.top_p < 1.0 {
            let mut mass = 0.0f32;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                mass += p.1;
                if mass >= self.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let kept: f32 = probs.iter().map(|p| p.1).sum();
            for p in probs.iter_mut() {
                p.1 /= kept;
            }
        }
        Ok(probs)
    }

    /// Chooses the next token from the logits of the last position and
    /// counts it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(RuntimeError::Generation("empty logits".into()));
        }
        self.adjust(logits);
        let token = if self.temperature == 0.0 {
            if logits.iter().all(|l| l.is_nan()) {
                return Err(RuntimeError::NonFinite {
                    what: "the model's logits".into(),
                    reason: "every logit is NaN".into(),
                });
            }
            argmax(logits)
        } else {
            let probs = self.distribution(logits)?;
            let u: f32 = self.rng.random();
            let mut acc = 0.0f32;
            let mut chosen = probs[probs.len() - 1].0;
            for &(t, p) in &probs {
                acc += p;
                if u < acc {
                    chosen = t;
                    break;
                }
            }
            chosen
        };
        *self.counts.entry(token).or_insert(0) += 1;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_parameter() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: 2.5,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.1,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: -3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
        ];
        for (p, name) in cases {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{name}`")), "{e}");
        }
        assert!(SamplingParams::default().validate().is_ok());
        let edge = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            max_tokens: 1,
            ..Default::default()
        };
        assert!(edge.validate().is_ok());
    }

    #[test]
    fn penalties_follow_the_openai_formula() {
        // Token 1 generated three times, token 3 once, token 0 never.
        let counts = HashMap::from([(1u32, 3u32), (3, 1)]);
        let mut l = vec![1.0f32, 2.0, -0.5, 0.25];
        apply_penalties(&mut l, &counts, 0.5, 0.25);
        // 2 - (3 * 0.5 + 0.25) = 0.25; 0.25 - (1 * 0.5 + 0.25) = -0.5.
        assert_eq!(l, vec![1.0, 0.25, -0.5, -0.5]);
        // Negative penalties raise the logits of seen tokens.
        let mut l = vec![0.0f32; 4];
        apply_penalties(&mut l, &counts, -1.0, -2.0);
        assert_eq!(l, vec![0.0, 5.0, 0.0, 3.0]);
    }

    #[test]
    fn the_sampler_counts_its_tokens_and_penalises_them() {
        let mut s = Sampler::new(&SamplingParams {
            frequency_penalty: 0.75,
            presence_penalty: 0.5,
            ..SamplingParams::greedy(10)
        })
        .unwrap();
        // Token 2 wins by 1.0; after one pick it loses 1.25, then token 0 wins.
        let logits = [1.0f32, 0.0, 2.0];
        assert_eq!(s.sample(&mut logits.clone()).unwrap(), 2);
        let mut adjusted = logits;
        s.adjust(&mut adjusted);
        assert_eq!(adjusted, [1.0, 0.0, 0.75]);
        assert_eq!(s.sample(&mut logits.clone()).unwrap(), 0);
        assert_eq!(s.counts(), &HashMap::from([(2, 1), (0, 1)]));
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
        let mut s = Sampler::new(&SamplingParams::greedy(4)).unwrap();
        assert_eq!(s.sample(&mut [0.5, 0.1, 0.7, 0.7]).unwrap(), 2);
    }

    #[test]
    fn tiny_temperatures_sample_the_argmax() {
        for t in [1e-38f32, f32::MIN_POSITIVE, 1e-45] {
            let mut s = Sampler::new(&SamplingParams {
                seed: Some(3),
                ..params(t)
            })
            .unwrap();
            for _ in 0..20 {
                let mut l = [10.0f32, 30.0, 29.9999, -5.0];
                assert_eq!(s.sample(&mut l).unwrap(), 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn distribution_is_softmax_over_temperature() {
        let s = Sampler::new(&params(0.5)).unwrap();
        let mut l = vec![0.0f32, 0.0, 2.0f32.ln() * 0.5];
        // After dividing by T = 0.5: [0, 0, ln 2] -> probabilities [1/4, 1/4, 1/2].
        s.adjust(&mut l);
        let d = s.distribution(&l).unwrap();
        assert_eq!(d[0].0, 2);
        assert!((d[0].1 - 0.5).abs() < 1e-6);
        assert_eq!((d[1].0, d[2].0), (0, 1));
        assert!((d[1].1 - 0.25).abs() < 1e-6 && (d[2].1 - 0.25).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_truncate_and_renormalise() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits are log-probabilities).
        let l: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let k2 = Sampler::new(&SamplingParams {
            top_k: Some(2),
            ..params(1.0)
        })
        .unwrap();
        let d = k2.distribution(&l).unwrap();
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-6 && (d[1].1 - 1.0 / 3.0).abs() < 1e-6);
        // top_p 0.7: 0.5 < 0.7 <= 0.75 keeps two tokens.
        let p = Sampler::new(&SamplingParams {
            top_p: 0.7,
            ..params(1.0)
        })
        .unwrap();
        let d = p.distribution(&l).unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        // top_p 0.5 keeps exactly the first token (its mass reaches 0.5).
        let p = Sampler::new(&SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        })
        .unwrap();
        assert_eq!(p.distribution(&l).unwrap(), vec![(0, 1.0)]);
    }

    #[test]
    fn a_seed_reproduces_draws_and_frequencies_match_probabilities() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&SamplingParams {
                seed: Some(seed),
                ..Default::default()
            })
            .unwrap();
            (0..4000)
                .map(|_| s.sample(&mut l.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        for (t, p) in [(0u32, 0.5f64), (1, 0.3), (2, 0.2)] {
            let f = a.iter().filter(|&&x| x == t).count() as f64 / a.len() as f64;
            // Four standard deviations of a binomial frequency over 4000 draws.
            assert!(
                (f - p).abs() < 4.0 * (p * (1.0 - p) / 4000.0).sqrt(),
                "{t}: {f}"
            );
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let l = vec![0.1f32, 2.0, 1.9, -3.0, 2.0];
        let mut s = Sampler::new(&SamplingParams {
            top_k: Some(1),
            temperature: 1.5,
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&mut l.clone()).unwrap(), argmax(&l));
        }
    }

    #[test]
    fn non_finite_logits_are_an_error_not_a_panic() {
        let mut s = Sampler::new(&params(1.0)).unwrap();
        assert!(s.sample(&mut [f32::NAN, f32::NAN]).is_err());
        assert!(s.sample(&mut [f32::INFINITY, 0.0]).is_err());
        let mut g = Sampler::new(&SamplingParams::greedy(1)).unwrap();
        assert!(g.sample(&mut [f32::NAN]).is_err());
        assert!(g.sample(&mut []).is_err());
    }
}
