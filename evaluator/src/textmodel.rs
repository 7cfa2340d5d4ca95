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
use runtime::Runnable;

use crate::error::{EvalError, Result};
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

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(TextModel::embed(self, texts)?.0)
    }
}

/// A text model scores every text task kind; an embedding model only the
/// embedding tasks (`similarity`, `embedding_classification`); an image
/// model only `image_classification`; each says so for the others.
impl Scorer for Runnable {
    fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<Loglikelihood>> {
        Scorer::loglikelihood_batch(text_only(self)?, pairs)
    }

    fn generate_greedy(&self, prompt: &str, max_tokens: usize) -> Result<String> {
        Scorer::generate_greedy(text_only(self)?, prompt, max_tokens)
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        match self {
            Runnable::Text(t) => Scorer::count_tokens(t.as_ref(), text),
            Runnable::Embedding(e) => Ok(e.tokenize(text)?.0.len()),
            Runnable::Vision(_) => Err(EvalError::Scoring {
                task: "(any)".to_string(),
                reason: "an image model reads no text".to_string(),
            }),
        }
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(Runnable::embed(self, texts)?.vectors)
    }

    fn embed_images(&self, images: &[runtime::vision::RgbImage]) -> Result<Vec<Vec<f32>>> {
        Ok(self.embed_images_until(images, &|| false)?)
    }
}

fn text_only(model: &Runnable) -> Result<&TextModel> {
    match model {
        Runnable::Text(t) => Ok(t),
        Runnable::Embedding(_) => Err(EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "an embedding model scores only `similarity` and `embedding_classification` \
                     tasks (log-likelihood and generation tasks need a text-generation model)"
                .to_string(),
        }),
        Runnable::Vision(_) => Err(EvalError::Scoring {
            task: "(any)".to_string(),
            reason: "an image model scores only `image_classification` tasks".to_string(),
        }),
    }
}
