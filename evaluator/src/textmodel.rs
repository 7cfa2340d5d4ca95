//! The [`Scorer`] implementation of the runtime's [`TextModel`]: the one
//! place where the evaluator talks to the generation API.
//!
//! Log-likelihoods are `TextModel::loglikelihood_batch` (lm-eval's
//! tokenization: the context encoded with BOS, the continuation raw; an
//! empty context scores the text right after BOS). Generation encodes the
//! prompt with [`TextModel::encode`] (so it starts with BOS, as the models
//! saw `<s>{prompt}{answer}</s>` in training), decodes greedily
//! (temperature 0) and stops at an end-of-sequence token. Token counts are
//! of the raw text, without BOS.

use runtime::generate::{SamplingParams, TextModel};

use crate::error::Result;
use crate::runner::{Loglikelihood, Scorer};

impl Scorer for TextModel {
    fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<Loglikelihood>> {
        Ok(TextModel::loglikelihood_batch(self, pairs)?
            .into_iter()
            .map(|l| Loglikelihood {
                logprob: l.logprob,
                tokens: l.tokens,
                is_greedy: l.is_greedy,
            })
            .collect())
    }

    fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> Result<String> {
        let ids = self.encode(prompt)?;
        let params = SamplingParams::greedy(max_tokens.max(1));
        Ok(self.generate(&ids, &params, &mut |_| true)?.text)
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer().encode(text)?.len())
    }
}
