//! Router training by test-time adaptation (WE-MoE, AdaMerging): minimise
//! the entropy of the model's next-token distribution, −Σv p(v) log p(v),
//! on unlabeled inputs, with Adam (candle's AdamW with weight decay 0,
//! β = (0.9, 0.999), ε = 1e-8). Only the routers are `Var`s; the backbone
//! and the experts are frozen, and the model is built with
//! `differentiable: true` so candle's autograd reaches the routers.
//!
//! Which predictions ([`EntropyPositions`]):
//! - `answer` (default): the model's whole answer to each input, the
//!   analogue of FusionBench's image classifiers, whose entropy is that of
//!   the one prediction per input.
//!   - A text (a prompt) is continued greedily by the current model, routed
//!     on the prompt (no gradient), until it predicts EOS or made
//!     [`ANSWER_TOKENS`] predictions; its loss is the mean entropy of those
//!     predictions plus −log(1 − p(EOS)) at the first: the answer exists.
//!   - A multiple-choice input's loss is the entropy of the softmax over its
//!     choices' summed log-likelihoods ℓc, plus −log Σc exp ℓc: the answer
//!     is one of the choices. Inputs of a batch offering the same choices
//!     (one task's) also share −H(p̄), the entropy of their mean choice
//!     distribution (the diversity term of information maximisation, Liang
//!     et al. 2020, "SHOT").
//!
//!   Each extra term closes a degenerate minimum that plain entropy
//!   minimisation found on the demo pool: answering nothing with certainty
//!   (EOS at once), answering none of the choices (all ℓc very low, yet far
//!   apart, so their softmax is sharp), and answering one class for every
//!   input.
//! - `last`: the prediction at each input's last position (the answer's
//!   first token); a multiple-choice input's choice entropy alone. The other
//!   positions predict the input's own tokens (digits, letters drawn at
//!   random), whose uncertainty is the data's, not the model's.
//! - `all`: the mean over every position of every input.
//!
//! Batches: the calibration inputs are grouped by source (the task pool
//! file they came from, i.e. the task). A step takes `batch_size` inputs
//! from the sources in turn, starting at a seeded random one, each drawn
//! uniformly within its source, so that every task weighs on every step as
//! in FusionBench, where each step sums the entropy of one batch per task
//! (here the batch is shared: `batch_size` in all, not per task). Inputs are
//! right-padded to the longest row. Padding never reaches the loss:
//! attention is causal, per-sequence routing averages over each row's own
//! positions ([`Hooks::routing_on`]; a multiple-choice row is routed on its
//! context, as scoring does), and the entropy reads real positions only.
//!
//! The report's `entropy_before`/`entropy_after` are the objective's mean over
//! a fixed evaluation set (up to four batches: the first input of every
//! source, then the second, …), before and after training.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::assemble::assemble;
use super::calibration::{CalibrationInput, CalibrationItem};
use super::progress::bar_for;
use super::{MoeParts, Routers};
use crate::error::{MergeError, Result};
use runtime::model::{Hooks, Model};

/// Evaluation batches of the report.
const EVAL_BATCHES: usize = 4;

/// Most tokens of a text's greedy answer ([`EntropyPositions::Answer`]).
pub const ANSWER_TOKENS: usize = 16;

/// The predictions whose entropy the routers minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntropyPositions {
    /// The model's whole answer: a text's greedy continuation (up to
    /// [`ANSWER_TOKENS`] tokens or EOS), a multiple-choice input's choice,
    /// which must be one of the choices.
    #[default]
    Answer,
    /// Each input's last position: its answer's first token.
    Last,
    /// Every position of every input.
    All,
}

impl EntropyPositions {
    /// The parameter value (`answer`, `last`, `all`).
    pub fn name(self) -> &'static str {
        match self {
            EntropyPositions::Answer => "answer",
            EntropyPositions::Last => "last",
            EntropyPositions::All => "all",
        }
    }

    /// The variant called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            EntropyPositions::Answer,
            EntropyPositions::Last,
            EntropyPositions::All,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The predictions whose entropy is minimised.
    pub positions: EntropyPositions,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Stops the training between steps ([`MergeError::Cancelled`]).
    pub cancel: crate::bounds::Cancel,
}

/// What training did, recorded in the saved MoE's config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainReport {
    /// Adam steps run.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Calibration sequences available.
    pub sequences: usize,
    /// The predictions whose entropy was minimised (`all` for MoEs saved
    /// before the choice existed).
    #[serde(default = "entropy_positions_before_the_choice")]
    pub entropy_positions: EntropyPositions,
    /// Wall time of the training loop, in seconds.
    pub seconds: f64,
    /// The training objective (nats; see [`EntropyPositions`]) on the
    /// evaluation batches before training: the mean entropy, plus with
    /// `answer` the answer-exists and diversity terms (so it can be < 0).
    pub entropy_before: f64,
    /// The same after training.
    pub entropy_after: f64,
}

fn entropy_positions_before_the_choice() -> EntropyPositions {
    EntropyPositions::All
}

/// Calibration inputs grouped by source (task): every training step draws
/// from every source.
struct Batches {
    /// The inputs of each source that has any, cut to fit the model.
    groups: Vec<Vec<CalibrationInput>>,
    /// Inputs per batch.
    size: usize,
}

/// How the rows of a [`Batch`] make up its inputs.
enum BatchInput {
    /// A text in row `row`.
    Text { row: usize },
    /// A multiple-choice input: one row per choice (context + choice),
    /// `rows`, whose context has `context` tokens.
    Choices {
        rows: std::ops::Range<usize>,
        context: usize,
    },
}

/// One training batch: `(rows, L)` token ids right-padded with token 0,
/// each row's length, the positions its routing averages over, and the
/// inputs the rows belong to.
struct Batch {
    ids: Tensor,
    lens: Vec<usize>,
    route_lens: Vec<usize>,
    inputs: Vec<BatchInput>,
}

impl Batches {
    /// Keeps the non-empty inputs, each cut to `max_len` tokens: a text is
    /// truncated, a choice that does not fit after its context is dropped
    /// (and an input left with fewer than two choices trains on its context
    /// as a text). With [`EntropyPositions::All`] every input is a text (a
    /// multiple-choice input's context).
    fn new(
        calibration: &[CalibrationItem],
        max_len: usize,
        batch_size: usize,
        positions: EntropyPositions,
    ) -> Result<Self> {
        let cut = |ids: &[u32]| CalibrationInput::Text(ids[..ids.len().min(max_len)].to_vec());
        let mut groups: std::collections::BTreeMap<u32, Vec<CalibrationInput>> = Default::default();
        for item in calibration.iter().filter(|i| !i.is_empty()) {
            let input = match &item.input {
                CalibrationInput::Text(ids) => cut(ids),
                CalibrationInput::Choices { context, .. } if positions == EntropyPositions::All => {
                    cut(context)
                }
                CalibrationInput::Choices { context, choices } => {
                    let fit: Vec<Vec<u32>> = choices
                        .iter()
                        .filter(|c| !c.is_empty() && context.len() + c.len() <= max_len)
                        .cloned()
                        .collect();
                    if fit.len() >= 2 {
                        CalibrationInput::Choices {
                            context: context.clone(),
                            choices: fit,
                        }
                    } else {
                        cut(context)
                    }
                }
            };
            groups.entry(item.source).or_default().push(input);
        }
        let groups: Vec<Vec<CalibrationInput>> = groups.into_values().collect();
        let total: usize = groups.iter().map(Vec::len).sum();
        if total == 0 {
            return Err(MergeError::BadParameter {
                param: "calibration".into(),
                reason: "no non-empty input to train the routers on".into(),
            });
        }
        Ok(Batches {
            groups,
            size: batch_size.min(total),
        })
    }

    /// Inputs kept.
    fn len(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }

    /// A training batch: `size` inputs taken from the sources in turn,
    /// starting at a random one, each drawn uniformly within its source.
    fn draw(&self, rng: &mut ChaCha8Rng) -> Vec<&CalibrationInput> {
        let start = rng.random_range(0..self.groups.len());
        (0..self.size)
            .map(|k| {
                let g = &self.groups[(start + k) % self.groups.len()];
                &g[rng.random_range(0..g.len())]
            })
            .collect()
    }

    /// The fixed evaluation set of the report, in batches of `size`: up to
    /// four batches' worth of inputs, the first input of every source, then
    /// the second, and so on.
    fn eval_batches(&self) -> Vec<Vec<&CalibrationInput>> {
        let want = (EVAL_BATCHES * self.size).min(self.len());
        let mut picked = Vec::with_capacity(want);
        let mut round = 0;
        while picked.len() < want {
            for g in &self.groups {
                if let Some(input) = g.get(round) {
                    if picked.len() < want {
                        picked.push(input);
                    }
                }
            }
            round += 1;
        }
        picked.chunks(self.size).map(<[_]>::to_vec).collect()
    }
}

/// `inputs` as one right-padded batch; each text row passes through
/// `extend` first, which may append tokens to it (its routing stays on the
/// input's own tokens).
fn make_batch(
    inputs: &[&CalibrationInput],
    device: &Device,
    mut extend: impl FnMut(&mut Vec<u32>) -> Result<()>,
) -> Result<Batch> {
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut route_lens = Vec::new();
    let mut parts = Vec::new();
    for input in inputs {
        match input {
            CalibrationInput::Text(ids) => {
                parts.push(BatchInput::Text { row: rows.len() });
                let mut row = ids.clone();
                extend(&mut row)?;
                rows.push(row);
                route_lens.push(ids.len());
            }
            CalibrationInput::Choices { context, choices } => {
                let first = rows.len();
                for c in choices {
                    rows.push([context.as_slice(), c].concat());
                    route_lens.push(context.len());
                }
                parts.push(BatchInput::Choices {
                    rows: first..rows.len(),
                    context: context.len(),
                });
            }
        }
    }
    let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
    let len = lens.iter().copied().max().unwrap_or(0);
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(len))
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
        lens,
        route_lens,
        inputs: parts,
    })
}

/// The batch that `positions` trains on: with [`EntropyPositions::Answer`]
/// each text is continued by the model's answer ([`append_answer`]).
fn training_batch(
    model: &Model,
    inputs: &[&CalibrationInput],
    positions: EntropyPositions,
    max_len: usize,
) -> Result<Batch> {
    make_batch(inputs, model.device(), |row| match positions {
        EntropyPositions::Answer => append_answer(model, row, max_len),
        EntropyPositions::Last | EntropyPositions::All => Ok(()),
    })
}

/// Appends the model's greedy answer to the prompt `row` (no gradient),
/// decoded as serving decodes it: the prompt prefilled into a KV cache
/// (which routes on the prompt), then one token at a time, until the model
/// predicts EOS, made [`ANSWER_TOKENS`] predictions or the row fills
/// `max_len`. The EOS itself is not appended: the row's last position is
/// the prediction that ended the answer.
fn append_answer(model: &Model, row: &mut Vec<u32>, max_len: usize) -> Result<()> {
    if row.len() >= max_len {
        return Ok(());
    }
    let device = model.device();
    let eos = &model.config().eos_token_ids;
    let mut cache = model.new_cache();
    let mut input = Tensor::new(row.as_slice(), device)?.unsqueeze(0)?;
    for _ in 1..ANSWER_TOKENS {
        let logits = model.forward_last(&input, Some(&mut cache))?.detach();
        let token = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if eos.contains(&token) {
            break;
        }
        row.push(token);
        if row.len() >= max_len {
            break;
        }
        input = Tensor::new(&[token], device)?.unsqueeze(0)?;
    }
    Ok(())
}

/// Mean over positions of the entropy of the next-token distribution,
/// −Σv p log p, for logits `(batch, seq, vocab)` (a scalar tensor; it is
/// differentiable).
pub fn mean_entropy(logits: &Tensor) -> candle_core::Result<Tensor> {
    entropies(logits)?.mean_all()
}

/// The entropy `(batch, seq)` of each position's next-token distribution.
fn entropies(logits: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    entropy_of(&logp, D::Minus1)
}

/// −Σ p log p along `dim` of log-probabilities `logp`.
fn entropy_of<Dim: candle_core::shape::Dim>(
    logp: &Tensor,
    dim: Dim,
) -> candle_core::Result<Tensor> {
    (logp.exp()? * logp)?.sum(dim)?.neg()
}

/// The training loss of one batch (a differentiable scalar) and the number
/// of predictions it averages. With [`EntropyPositions::Last`], the mean
/// over the inputs of: a text's next-token entropy at its last position; a
/// multiple-choice input's entropy of the softmax over its choices' summed
/// log-likelihoods. With [`EntropyPositions::All`], the mean next-token
/// entropy over every real position.
fn batch_entropy(
    model: &Model,
    batch: &Batch,
    positions: EntropyPositions,
) -> Result<(Tensor, usize)> {
    let logits = model.forward_with(&batch.ids, None, &mut Hooks::routing_on(&batch.route_lens))?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let (r, t, _) = logp.dims3()?;
    let device = logp.device();
    // Next-token entropies of the text rows' trained positions.
    let mut weights = vec![0f32; r * t];
    let mut count = 0usize;
    for input in &batch.inputs {
        if let BatchInput::Text { row } = input {
            let n = batch.lens[*row];
            match positions {
                EntropyPositions::Answer => {
                    // The prompt's last position, then the answer's tokens
                    // (see `append_answer`), each input weighing one.
                    let prompt = batch.route_lens[*row];
                    let share = 1.0 / (n + 1 - prompt) as f32;
                    weights[row * t + prompt - 1..row * t + n].fill(share);
                    count += 1;
                }
                EntropyPositions::Last => {
                    weights[row * t + n - 1] = 1.0;
                    count += 1;
                }
                EntropyPositions::All => {
                    weights[row * t..row * t + n].fill(1.0);
                    count += n;
                }
            }
        }
    }
    let h = entropy_of(&logp, D::Minus1)?;
    let mut total = (h * Tensor::from_vec(weights, (r, t), device)?)?.sum_all()?;
    if positions == EntropyPositions::Answer {
        total = (total + empty_answer_losses(&logp, batch, &model.config().eos_token_ids)?)?;
    }
    let choices = choice_losses(&logp, batch, positions == EntropyPositions::Answer)?;
    count += choices.len();
    for h in choices {
        total = (total + h)?;
    }
    Ok(((total / count.max(1) as f64)?, count))
}

/// The sum over the text rows of `batch` of −log(1 − p(EOS)) at the
/// prompt's last position: the negative log-probability that the answer is
/// not empty. Without it, answering nothing with certainty (EOS at once)
/// would have the lowest entropy of all.
fn empty_answer_losses(logp: &Tensor, batch: &Batch, eos: &[u32]) -> Result<Tensor> {
    let (_, t, v) = logp.dims3()?;
    let device = logp.device();
    let firsts: Vec<u32> = batch
        .inputs
        .iter()
        .filter_map(|i| match i {
            BatchInput::Text { row } => Some((row * t + batch.route_lens[*row] - 1) as u32),
            BatchInput::Choices { .. } => None,
        })
        .collect();
    if firsts.is_empty() || eos.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, device)?);
    }
    let p_eos = logp
        .reshape(((), v))?
        .index_select(&Tensor::new(firsts.as_slice(), device)?, 0)?
        .index_select(&Tensor::new(eos, device)?, 1)?
        .exp()?
        .sum(1)?;
    Ok((1.0 - p_eos)?.clamp(1e-12, 1.0)?.log()?.neg()?.sum_all()?)
}

/// The loss of each multiple-choice input of `batch` (scalars, in input
/// order): the entropy of the softmax over its choices' log-likelihoods
/// ℓc, each the sum of log p(token | prefix) over the choice's tokens, read
/// from the batch's next-token log-probabilities `logp` `(rows, L, vocab)`.
/// With `in_choices`, plus −log Σc exp ℓc, the negative log-probability that
/// the answer is one of the choices: without it a mixture that answers
/// none of them (all ℓc very low) still has a near-zero entropy over them,
/// since their differences grow with their size.
fn choice_losses(logp: &Tensor, batch: &Batch, in_choices: bool) -> Result<Vec<Tensor>> {
    let choice_inputs: Vec<(&std::ops::Range<usize>, usize)> = batch
        .inputs
        .iter()
        .filter_map(|i| match i {
            BatchInput::Choices { rows, context } => Some((rows, *context)),
            BatchInput::Text { .. } => None,
        })
        .collect();
    if choice_inputs.is_empty() {
        return Ok(Vec::new());
    }
    let (r, t, v) = logp.dims3()?;
    let device = logp.device();
    let ids = batch.ids.to_vec2::<u32>()?;
    // For every continuation token: its flat position, its id, its row.
    let (mut picks, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    let mut n_rows = 0usize;
    for (rows, context) in &choice_inputs {
        for row in (*rows).clone() {
            // Position p − 1 predicts the continuation's token at p.
            for (p, &token) in ids[row]
                .iter()
                .enumerate()
                .take(batch.lens[row])
                .skip(*context)
            {
                picks.push((row * t + p - 1) as u32);
                targets.push(token);
                owner.push(n_rows);
            }
            n_rows += 1;
        }
    }
    let picked = logp
        .reshape((r * t, v))?
        .index_select(&Tensor::new(picks.as_slice(), device)?, 0)?
        .gather(&Tensor::from_vec(targets, (owner.len(), 1), device)?, 1)?;
    // Sum each row's tokens: a (rows, tokens) 0/1 matrix times the picks.
    let mut sum_matrix = vec![0f32; n_rows * owner.len()];
    for (k, &o) in owner.iter().enumerate() {
        sum_matrix[o * owner.len() + k] = 1.0;
    }
    let scores = Tensor::from_vec(sum_matrix, (n_rows, owner.len()), device)?
        .matmul(&picked)?
        .squeeze(1)?;
    let mut first = 0usize;
    let mut out = Vec::with_capacity(choice_inputs.len());
    let mut dists = Vec::with_capacity(choice_inputs.len());
    for (rows, _) in &choice_inputs {
        let k = rows.len();
        let scores = scores.narrow(0, first, k)?;
        let lp = candle_nn::ops::log_softmax(&scores, 0)?;
        let h = entropy_of(&lp, 0)?;
        out.push(if in_choices {
            // log Σ exp ℓc = ℓc − log softmax(ℓ)c, for any c.
            let mass = (scores.narrow(0, 0, 1)? - lp.narrow(0, 0, 1)?)?.squeeze(0)?;
            (h - mass)?
        } else {
            h
        });
        if in_choices {
            dists.push(lp.exp()?);
        }
        first += k;
    }
    if in_choices {
        // Diversity: inputs offering the same choices (one task's) share
        // −H(p̄), the entropy of their mean choice distribution.
        let mut groups: std::collections::BTreeMap<Vec<&[u32]>, Vec<usize>> = Default::default();
        for (i, (rows, context)) in choice_inputs.iter().enumerate() {
            let key = (*rows)
                .clone()
                .map(|row| &ids[row][*context..batch.lens[row]])
                .collect();
            groups.entry(key).or_default().push(i);
        }
        for members in groups.values().filter(|m| m.len() >= 2) {
            let stacked =
                Tensor::stack(&members.iter().map(|&i| &dists[i]).collect::<Vec<_>>(), 0)?;
            let mean = stacked.mean(0)?;
            let h_mean = entropy_of(&mean.clamp(1e-12, 1.0)?.log()?, 0)?;
            for &i in members {
                out[i] = (&out[i] - &h_mean)?;
            }
        }
    }
    Ok(out)
}

/// The mean entropy of the trained positions over the evaluation batches.
fn evaluate(
    model: &Model,
    batches: &Batches,
    positions: EntropyPositions,
    max_len: usize,
) -> Result<f64> {
    let (mut total, mut count) = (0f64, 0usize);
    for inputs in batches.eval_batches() {
        let batch = training_batch(model, &inputs, positions, max_len)?;
        let (h, n) = batch_entropy(model, &batch, positions)?;
        total += h.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// Trains copies of `parts`' routers on `calibration`; returns the trained
/// routers (plain tensors) and the report.
pub fn adapt(
    parts: &MoeParts,
    calibration: &[CalibrationItem],
    opts: &TrainOptions,
) -> Result<(Routers, TrainReport)> {
    let max_len = parts.config.max_position_embeddings;
    let batches = Batches::new(calibration, max_len, opts.batch_size, opts.positions)?;
    // Fresh copies as Vars: the optimiser updates them in place, and the
    // routed MLPs hold the same storage.
    let routers = parts
        .routers
        .try_map(|r| r.try_map(|t| Ok(Var::from_tensor(&t.copy()?)?.into_inner())))?;
    let mut vars = Vec::new();
    for r in routers.all() {
        for (_, t) in r.tensors() {
            vars.push(Var::from_tensor(t)?);
        }
    }
    let model = assemble(parts, &routers, true)?;
    let entropy_before = evaluate(&model, &batches, opts.positions, max_len)?;
    let mut adam = AdamW::new(
        vars,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let bar = bar_for(
        opts.steps,
        &format!("{} routers", parts.meta.method.name()),
        opts.progress,
    );
    let start = Instant::now();
    for step in 0..opts.steps {
        opts.cancel.step()?;
        let batch = training_batch(&model, &batches.draw(&mut rng), opts.positions, max_len)?;
        let (loss, _) = batch_entropy(&model, &batch, opts.positions)?;
        adam.backward_step(&loss)?;
        if step % 10 == 0 || step + 1 == opts.steps {
            bar.set_message(format!("entropy {:.4}", loss.to_scalar::<f32>()?));
        }
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let entropy_after = evaluate(&model, &batches, opts.positions, max_len)?;
    drop(model);
    let trained = routers.try_map(|r| r.try_map(|t| Ok(t.detach().copy()?)))?;
    Ok((
        trained,
        TrainReport {
            steps: opts.steps,
            lr: opts.lr,
            batch_size: batches.size,
            seed: opts.seed,
            sequences: batches.len(),
            entropy_positions: opts.positions,
            seconds,
            entropy_before,
            entropy_after,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_peaked_distributions() {
        // Uniform over 4 tokens: ln 4. A one-hot-like distribution: ≈ 0.
        let dev = Device::Cpu;
        let uniform = Tensor::zeros((1, 2, 4), DType::F32, &dev).unwrap();
        let h = mean_entropy(&uniform).unwrap().to_scalar::<f32>().unwrap();
        assert!((h - 4f32.ln()).abs() < 1e-6, "{h}");
        let peaked = Tensor::new(&[[[100f32, 0.0, 0.0, 0.0]]], &dev).unwrap();
        let h = mean_entropy(&peaked).unwrap().to_scalar::<f32>().unwrap();
        assert!(h.abs() < 1e-6, "{h}");
        // Two tokens with p = (0.75, 0.25): logits (ln 3, 0);
        // H = −0.75 ln 0.75 − 0.25 ln 0.25 = 0.562335.
        let two = Tensor::new(&[[[3f32.ln(), 0.0]]], &dev).unwrap();
        let h = mean_entropy(&two).unwrap().to_scalar::<f32>().unwrap();
        assert!((h - 0.562335).abs() < 1e-5, "{h}");
    }

    /// A batch of `rows` over a 4-token vocabulary whose next-token
    /// distribution at position 0 of row i is `first[i]` (position 1: uniform).
    fn batch_with_first_distributions(
        ids: Vec<Vec<u32>>,
        inputs: Vec<BatchInput>,
        route_lens: Vec<usize>,
        first: &[[f32; 4]],
    ) -> (Tensor, Batch) {
        let dev = Device::Cpu;
        let rows = ids.len();
        let lp: Vec<f32> = first
            .iter()
            .flat_map(|p| p.iter().map(|x| x.ln()).chain([0.25f32.ln(); 4]))
            .collect();
        let logp = Tensor::from_vec(lp, (rows, 2, 4), &dev).unwrap();
        let lens = ids.iter().map(Vec::len).collect();
        let flat: Vec<u32> = ids.concat();
        let batch = Batch {
            ids: Tensor::from_vec(flat, (rows, 2), &dev).unwrap(),
            lens,
            route_lens,
            inputs,
        };
        (logp, batch)
    }

    #[test]
    fn choice_loss_adds_the_choice_mass_and_a_shared_diversity_term() {
        // Two inputs, context [1], choices [2] and [3]. Input A: p(2) = 0.6,
        // p(3) = 0.2, so the choices' softmax is (0.75, 0.25): H = 0.562335,
        // and their mass is 0.8: −ln 0.8 = 0.223144. Input B mirrors it:
        // (0.25, 0.75), the same H and mass. Same choices, so they share
        // −H(p̄) with p̄ = (0.5, 0.5): −ln 2 = −0.693147.
        let a = [0.1, 0.1, 0.6, 0.2];
        let b = [0.1, 0.1, 0.2, 0.6];
        // Input A's choices are rows 0 and 1, B's rows 2 and 3 (context [1]);
        // the losses of `ids`' batch.
        let losses = |ids: Vec<Vec<u32>>, in_choices| -> Vec<f32> {
            let inputs = [0..2, 2..4]
                .into_iter()
                .map(|rows| BatchInput::Choices { rows, context: 1 })
                .collect();
            let (logp, batch) =
                batch_with_first_distributions(ids, inputs, vec![1; 4], &[a, a, b, b]);
            choice_losses(&logp, &batch, in_choices)
                .unwrap()
                .iter()
                .map(|t| t.to_scalar::<f32>().unwrap())
                .collect()
        };
        let same = vec![vec![1, 2], vec![1, 3], vec![1, 2], vec![1, 3]];
        for h in losses(same.clone(), false) {
            assert!((h - 0.562335).abs() < 1e-5, "{h}");
        }
        for l in losses(same, true) {
            assert!(
                (l - (0.562335 + 0.223144 - std::f32::consts::LN_2)).abs() < 1e-5,
                "{l}"
            );
        }
        // Different choices: no shared term. B's choices [2] and [0]:
        // p = 0.2 and 0.1, softmax (2/3, 1/3): H = 0.636514, mass 0.3:
        // −ln 0.3 = 1.203973.
        let l = losses(vec![vec![1, 2], vec![1, 3], vec![1, 2], vec![1, 0]], true);
        assert!((l[0] - (0.562335 + 0.223144)).abs() < 1e-5, "{l:?}");
        assert!((l[1] - (0.636514 + 1.203973)).abs() < 1e-5, "{l:?}");
    }

    #[test]
    fn an_empty_answer_costs_minus_log_of_one_minus_p_eos() {
        // EOS is token 3; the text rows' prompts end at position 0 with
        // p(EOS) = 0.25 and 0.5: −ln 0.75 − ln 0.5 = 0.980829. The choice
        // rows are not texts.
        let (logp, batch) = batch_with_first_distributions(
            vec![vec![1, 2], vec![1, 1], vec![1, 2]],
            vec![
                BatchInput::Text { row: 0 },
                BatchInput::Text { row: 1 },
                BatchInput::Choices {
                    rows: 2..3,
                    context: 1,
                },
            ],
            vec![1, 1, 1],
            &[
                [0.25, 0.25, 0.25, 0.25],
                [0.2, 0.2, 0.1, 0.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
        );
        let l = empty_answer_losses(&logp, &batch, &[3])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 0.980829).abs() < 1e-5, "{l}");
        let none = empty_answer_losses(&logp, &batch, &[])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(none, 0.0);
    }

    fn text(source: u32, ids: Vec<u32>) -> CalibrationItem {
        CalibrationItem {
            source,
            input: CalibrationInput::Text(ids),
        }
    }

    #[test]
    fn steps_draw_from_every_source_and_pad_on_the_right() {
        let cal = vec![
            text(0, vec![1, 2, 3, 4, 5]),
            text(0, vec![]),
            text(2, vec![1, 2]),
            text(2, vec![7, 8, 9]),
            text(1, vec![4; 10]),
        ];
        let b = Batches::new(&cal, 8, 3, EntropyPositions::Last).unwrap();
        // Empty dropped, 10 cut to 8; sources in order 0, 1, 2.
        assert_eq!(b.len(), 4);
        assert_eq!(
            b.groups
                .iter()
                .map(|g| g
                    .iter()
                    .map(|i| match i {
                        CalibrationInput::Text(ids) => ids.len(),
                        CalibrationInput::Choices { .. } => unreachable!(),
                    })
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            vec![vec![5], vec![8], vec![2, 3]]
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let drawn = b.draw(&mut rng);
            assert_eq!(drawn.len(), 3);
            // One input of each source per batch of 3.
            let mut lens: Vec<usize> = drawn
                .iter()
                .map(|i| match i {
                    CalibrationInput::Text(ids) => ids.len(),
                    CalibrationInput::Choices { .. } => unreachable!(),
                })
                .collect();
            lens.sort();
            assert!(lens == vec![2, 5, 8] || lens == vec![3, 5, 8], "{lens:?}");
        }
        // Evaluation: sources in turn, then their second inputs.
        let eval = b.eval_batches();
        assert_eq!(eval.len(), 2);
        let batch = make_batch(&eval[0], &Device::Cpu, |_| Ok(())).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![
                vec![1, 2, 3, 4, 5, 0, 0, 0],
                vec![4; 8],
                vec![1, 2, 0, 0, 0, 0, 0, 0]
            ]
        );
        assert_eq!(batch.lens, vec![5, 8, 2]);
        assert_eq!(batch.route_lens, vec![5, 8, 2]);
        assert_eq!(eval[1].len(), 1);
        assert!(Batches::new(&[text(0, vec![])], 8, 2, EntropyPositions::Last).is_err());
    }

    #[test]
    fn choices_become_rows_routed_on_their_context() {
        let mc = CalibrationItem {
            source: 0,
            input: CalibrationInput::Choices {
                context: vec![1, 2],
                choices: vec![vec![5], vec![6, 7], vec![8; 9]],
            },
        };
        // The 9-token choice does not fit in 8 positions after the context.
        let b = Batches::new(
            &[text(0, vec![3, 3, 3]), mc.clone()],
            8,
            2,
            EntropyPositions::Last,
        )
        .unwrap();
        let batch = make_batch(&b.eval_batches()[0], &Device::Cpu, |_| Ok(())).unwrap();
        assert_eq!(
            batch.ids.to_vec2::<u32>().unwrap(),
            vec![vec![3, 3, 3, 0], vec![1, 2, 5, 0], vec![1, 2, 6, 7]]
        );
        assert_eq!(batch.lens, vec![3, 3, 4]);
        assert_eq!(batch.route_lens, vec![3, 2, 2]);
        assert!(matches!(batch.inputs[0], BatchInput::Text { row: 0 }));
        assert!(matches!(
            &batch.inputs[1],
            BatchInput::Choices { rows, context: 2 } if *rows == (1..3)
        ));
        // With `all`, a multiple-choice input trains on its context.
        let b = Batches::new(&[mc], 8, 1, EntropyPositions::All).unwrap();
        assert_eq!(b.groups, vec![vec![CalibrationInput::Text(vec![1, 2])]]);
    }
}
