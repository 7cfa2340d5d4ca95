//! Text generation: tokenizer, chat template, sampling, KV cache, token
//! stream and log-likelihoods on top of the [`crate::model`] runtime.

pub mod bytelevel;
