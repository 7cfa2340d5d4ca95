//! Scoring text with a [`TextModel`]: log-likelihoods of continuations (what
//! the evaluator's multiple-choice tasks need) and mean-pooled embeddings.
//!
//! `loglikelihood(context, continuation)` follows lm-eval-harness:
//! trailing whitespace of the context moves to the front of the
//! continuation; context and continuation are tokenized separately (the
//! context with [`TextModel::encode`], so it starts with BOS when the model
//! has one; the continuation raw) and the ids concatenated; the result is
//! `sum_i log p(cont_i | context, cont_<i)` over the continuation tokens, and
//! `is_greedy` says whether every continuation token is the argmax of its
//! position. Sequences longer than the context window lose tokens from the
//! left of the context. Batches are right-padded (the causal mask keeps
//! padding out of every scored position), so they give the same numbers.
//! A routed (MoE) model routes each sequence on its context tokens, the way
//! cached decoding routes on the prompt, so padding and the continuation
//! being scored never change the routing.

use candle_core::{DType, Tensor, D};

use super::text_model::TextModel;
use crate::error::{Result, RuntimeError};
use crate::model::Hooks;

/// The log-likelihood of a continuation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLikelihood {
    /// Sum of the log-probabilities of the continuation tokens.
    pub logprob: f64,
    /// Every continuation token is the most likely one at its position.
    pub is_greedy: bool,
    /// Number of continuation tokens.
    pub tokens: usize,
}

/// Bytes of f32 logits one forward pass of a batch may produce.
const LOGITS_BUDGET: usize = 256 << 20;

/// Tokens (padding included) of one embedding batch: bounds the attention
/// scores a batch holds, and how long a cancelled request runs on.
const EMBED_BATCH_TOKENS: usize = 8192;

/// One scoring request, tokenized the way lm-eval does
/// ([`TextModel::score_request`]); a [`crate::generate::Scheduler`] scores
/// it in its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreRequest {
    /// Model input (context and continuation minus the last token).
    pub(crate) input: Vec<u32>,
    /// Continuation ids (the targets of the last `cont.len()` positions).
    pub(crate) cont: Vec<u32>,
}

impl TextModel {
    /// The log-likelihood of `continuation` after `context`.
    pub fn loglikelihood(&self, context: &str, continuation: &str) -> Result<LogLikelihood> {
        let req = self.prepare(context, continuation)?;
        Ok(self.score(&[&req])?.remove(0))
    }

    /// [`TextModel::loglikelihood`] of many pairs, in batches (right
    /// padding, longest first); results in the order of `pairs`.
    pub fn loglikelihood_batch(&self, pairs: &[(String, String)]) -> Result<Vec<LogLikelihood>> {
        let reqs: Vec<ScoreRequest> = pairs
            .iter()
            .map(|(c, x)| self.prepare(c, x))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(reqs[i].input.len()));
        let vocab = self.model().config().vocab_size;
        let mut out = vec![None; reqs.len()];
        let mut start = 0;
        while start < order.len() {
            // Longest first: the first sequence of a chunk sets its width.
            let width = reqs[order[start]].input.len().max(1);
            let rows = (LOGITS_BUDGET / (width * vocab * 4)).max(1);
            let chunk = &order[start..(start + rows).min(order.len())];
            let batch: Vec<&ScoreRequest> = chunk.iter().map(|&i| &reqs[i]).collect();
            for (&i, r) in chunk.iter().zip(self.score(&batch)?) {
                out[i] = Some(r);
            }
            start += chunk.len();
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every pair scored"))
            .collect())
    }

    /// `(context, continuation)` tokenized for scoring, as
    /// [`TextModel::loglikelihood`] tokenizes it.
    pub fn score_request(&self, context: &str, continuation: &str) -> Result<ScoreRequest> {
        self.prepare(context, continuation)
    }

    /// Mean-pooled final hidden states of each text (tokenized with
    /// [`TextModel::encode`]), and the number of tokens read.
    pub fn embed(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, usize)> {
        self.embed_until(texts, &|| false)
    }

    /// [`TextModel::embed`] that stops with [`RuntimeError::Cancelled`] as
    /// soon as `cancelled()` says so (checked before each text is tokenized
    /// and before each batch runs; a client that went away, say).
    pub fn embed_until(
        &self,
        texts: &[String],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<Vec<f32>>, usize)> {
        let stop = || -> Result<()> {
            if cancelled() {
                Err(RuntimeError::Cancelled)
            } else {
                Ok(())
            }
        };
        let max_pos = self.model().config().max_position_embeddings;
        let mut seqs = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            stop()?;
            let ids = self.encode(t)?;
            if ids.is_empty() {
                return Err(RuntimeError::InvalidInput(format!(
                    "input {i} has no tokens"
                )));
            }
            if ids.len() > max_pos {
                return Err(RuntimeError::ContextLength {
                    what: format!("input {i}"),
                    tokens: ids.len(),
                    max: max_pos,
                });
            }
            seqs.push(ids);
        }
        let total = seqs.iter().map(Vec::len).sum();
        let hidden = self.model().config().hidden_size;
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            stop()?;
            let width = seqs[start].len();
            let mut end = start + 1;
            let mut w = width;
            while end < seqs.len() {
                let nw = w.max(seqs[end].len());
                if (end - start + 1) * nw * hidden * 4 > LOGITS_BUDGET
                    || (end - start + 1) * nw > EMBED_BATCH_TOKENS
                {
                    break;
                }
                w = nw;
                end += 1;
            }
            let refs: Vec<&[u32]> = seqs[start..end].iter().map(Vec::as_slice).collect();
            let ids = self.padded(&refs, w)?;
            // Routed (MoE) models route each text on its own tokens only.
            let lens: Vec<usize> = refs.iter().map(|s| s.len()).collect();
            let h = self
                .model()
                .hidden_states(&ids, None, &mut Hooks::routing_on(&lens))?;
            for (row, seq) in refs.iter().enumerate() {
                let mean = h
                    .get(row)?
                    .narrow(0, 0, seq.len())?
                    .to_dtype(DType::F32)?
                    .mean(0)?;
                out.push(mean.to_vec1::<f32>()?);
            }
            start = end;
        }
        Ok((out, total))
    }

    /// Tokenizes one request the way lm-eval does.
    fn prepare(&self, context: &str, continuation: &str) -> Result<ScoreRequest> {
        let keep = context.trim_end().len();
        let (context, moved) = context.split_at(keep);
        let continuation = format!("{moved}{continuation}");
        let mut ids = self.encode(context)?;
        if ids.is_empty() {
            // An empty context is scored after an end-of-text token (lm-eval's
            // prefix token) when there is no BOS.
            let prefix = self.eos_ids().first().copied().ok_or_else(|| {
                RuntimeError::InvalidInput(
                    "empty context and the tokenizer has neither a BOS nor an EOS token".into(),
                )
            })?;
            ids.push(prefix);
        }
        let cont = self.tokenizer().encode(&continuation)?;
        let max_pos = self.model().config().max_position_embeddings;
        if cont.len() > max_pos {
            return Err(RuntimeError::InvalidInput(format!(
                "the continuation has {} tokens, more than the model's context \
                 (max_position_embeddings = {max_pos})",
                cont.len()
            )));
        }
        ids.extend_from_slice(&cont);
        // Keep the last max_pos + 1 tokens; the last one is only a target.
        let from = ids.len().saturating_sub(max_pos + 1);
        let mut input = ids.split_off(from);
        input.pop();
        Ok(ScoreRequest { input, cont })
    }

    /// Ids `(batch, width)` right-padded with the pad token (or 0).
    fn padded(&self, seqs: &[&[u32]], width: usize) -> Result<Tensor> {
        let pad = self.tokenizer().pad_id().unwrap_or(0);
        let mut flat = Vec::with_capacity(seqs.len() * width);
        for s in seqs {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(pad, width - s.len()));
        }
        Ok(Tensor::from_vec(
            flat,
            (seqs.len(), width),
            self.model().device(),
        )?)
    }

    /// Scores a batch of prepared requests in one forward pass.
    fn score(&self, reqs: &[&ScoreRequest]) -> Result<Vec<LogLikelihood>> {
        let vocab = self.model().config().vocab_size;
        for r in reqs {
            if let Some(&bad) = r
                .input
                .iter()
                .chain(&r.cont)
                .find(|&&t| t as usize >= vocab)
            {
                return Err(RuntimeError::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary ({vocab} tokens)"
                )));
            }
        }
        let scored: Vec<&ScoreRequest> = reqs
            .iter()
            .copied()
            .filter(|r| !r.cont.is_empty())
            .collect();
        let mut results = Vec::with_capacity(scored.len());
        if !scored.is_empty() {
            let width = scored.iter().map(|r| r.input.len()).max().unwrap_or(1);
            let inputs: Vec<&[u32]> = scored.iter().map(|r| r.input.as_slice()).collect();
            let ids = self.padded(&inputs, width)?;
            // Routed (MoE) models route each sequence on its context, as
            // cached decoding routes on the prompt (and never on padding).
            let context: Vec<usize> = scored
                .iter()
                .map(|r| r.input.len() + 1 - r.cont.len())
                .collect();
            let logits = self
                .model()
                .forward_with(&ids, None, &mut Hooks::routing_on(&context))?;
            let device = self.model().device();
            for (row, r) in scored.iter().enumerate() {
                let n = r.cont.len();
                let at = r.input.len() - n;
                let lp =
                    candle_nn::ops::log_softmax(&logits.get(row)?.narrow(0, at, n)?, D::Minus1)?;
                let targets = Tensor::new(r.cont.as_slice(), device)?.unsqueeze(1)?;
                let picked = lp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
                let best = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
                results.push(LogLikelihood {
                    logprob: picked.iter().map(|&p| p as f64).sum(),
                    is_greedy: best == r.cont,
                    tokens: n,
                });
            }
        }
        let mut it = results.into_iter();
        Ok(reqs
            .iter()
            .map(|r| {
                if r.cont.is_empty() {
                    LogLikelihood {
                        logprob: 0.0,
                        is_greedy: true,
                        tokens: 0,
                    }
                } else {
                    it.next().expect("one result per scored request")
                }
            })
            .collect())
    }
}
