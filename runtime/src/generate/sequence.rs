//! One generation's decoding state: what [`TextModel::generate`] does with
//! each next-token distribution, apart from the forward pass that produces
//! it, so a batching scheduler and the one-sequence
//! loop decode alike (sampling, end-of-sequence ids, `max_tokens` and the
//! context, streamed text, stop sequences).

use super::detokenize::StreamDecoder;
use super::sampling::{Sampler, SamplingParams};
use super::stop::StopMatcher;
use super::text_model::{Completion, FinishReason, TextModel, TokenEvent};
use crate::error::{Result, RuntimeError};

/// A generation between its tokens.
pub struct Sequence {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    tokens: Vec<u32>,
    text: String,
    budget: usize,
    prompt_tokens: usize,
}

impl Sequence {
    /// Checks `prompt` against `model` (not empty, in the vocabulary,
    /// leaving room in the context) and `params`; the completion's budget
    /// is `max_tokens` capped at the end of the context.
    pub fn new(model: &TextModel, prompt: &[u32], params: &SamplingParams) -> Result<Self> {
        let sampler = Sampler::new(params)?;
        let config = model.model().config();
        let (max_pos, vocab) = (config.max_position_embeddings, config.vocab_size);
        if prompt.is_empty() {
            return Err(RuntimeError::InvalidInput(
                "the prompt has no tokens".into(),
            ));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::InvalidInput(format!(
                "prompt token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        if prompt.len() >= max_pos {
            return Err(RuntimeError::InvalidInput(format!(
                "the prompt has {} tokens but the model's context (max_position_embeddings) is {max_pos} \
                 tokens: no room for a completion",
                prompt.len()
            )));
        }
        Ok(Sequence {
            sampler,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            tokens: Vec::new(),
            text: String::new(),
            budget: params.max_tokens.min(max_pos - prompt.len()),
            prompt_tokens: prompt.len(),
        })
    }

    /// Most tokens this generation can still produce.
    pub fn remaining(&self) -> usize {
        self.budget - self.tokens.len()
    }

    /// The most positions the sequence can reach: prompt and budget.
    pub fn max_positions(&self) -> usize {
        self.prompt_tokens + self.budget
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Samples the next token from `logits` (the model's next-token scores,
    /// changed in place by penalties and temperature) and returns what it
    /// releases, with the reason generation ends there, if it does.
    pub fn accept(
        &mut self,
        model: &TextModel,
        logits: &mut [f32],
    ) -> Result<(TokenEvent, Option<FinishReason>)> {
        let token = self.sampler.sample(logits)?;
        self.tokens.push(token);
        let is_eos = model.eos_ids().contains(&token);
        let full = self.tokens.len() == self.budget;
        let tokenizer = model.tokenizer();
        let mut delta = if is_eos {
            String::new()
        } else {
            self.decoder.push(tokenizer, token)?
        };
        if is_eos || full {
            delta.push_str(&self.decoder.finish(tokenizer)?);
        }
        let step = self.stops.push(&delta);
        let mut released = step.text;
        if (is_eos || full) && !step.stopped {
            released.push_str(&self.stops.finish());
        }
        self.text.push_str(&released);
        let end = if step.stopped || is_eos {
            Some(FinishReason::Stop)
        } else if full {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok((
            TokenEvent {
                token,
                text: released,
            },
            end,
        ))
    }

    /// The completion, ended for `reason`.
    pub fn finish(self, reason: FinishReason) -> Completion {
        Completion {
            text: self.text,
            completion_tokens: self.tokens.len(),
            tokens: self.tokens,
            prompt_tokens: self.prompt_tokens,
            finish_reason: reason,
        }
    }
}
