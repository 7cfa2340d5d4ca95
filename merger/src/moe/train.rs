//! Router training by test-time adaptation (WE-MoE, AdaMerging): minimise
//! the entropy of the model's next-token distribution on unlabeled inputs,
//! H = mean over positions of −Σv p(v) log p(v), with Adam (candle's AdamW
//! with weight decay 0, β = (0.9, 0.999), ε = 1e-8). Only the routers are
//! `Var`s; the backbone and the experts are frozen, and the model is built
//! with `differentiable: true` so candle's autograd reaches the routers.
//!
//! Batches: per-sequence routing averages the router's outputs over every
//! position, so a batch must not contain padding. The calibration sequences
//! (each cut to `max_position_embeddings`) are sorted by length; a step
//! takes `batch_size` consecutive sequences of that order from a seeded
//! random start and cuts them to the shortest one's length, so sequences of
//! a batch have nearly equal lengths and little is cut.
//!
//! The report's `entropy_before`/`entropy_after` are the mean entropy per
//! position over up to four fixed batches spread over the length order,
//! before and after training.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::build::{assemble, bar_for};
use super::{MoeParts, Routers};
use crate::error::{MergeError, Result};
use crate::model::Model;

/// Evaluation batches of the report.
const EVAL_BATCHES: usize = 4;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
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
    /// Wall time of the training loop, in seconds.
    pub seconds: f64,
    /// Mean next-token entropy (nats) on the evaluation batches before training.
    pub entropy_before: f64,
    /// The same after training.
    pub entropy_after: f64,
}

/// Calibration sequences sorted by length, cut into padding-free batches.
struct Batches {
    seqs: Vec<Vec<u32>>,
    size: usize,
}

impl Batches {
    fn new(calibration: &[Vec<u32>], max_len: usize, batch_size: usize) -> Result<Self> {
        let mut seqs: Vec<Vec<u32>> = calibration
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s[..s.len().min(max_len)].to_vec())
            .collect();
        if seqs.is_empty() {
            return Err(MergeError::BadParameter {
                param: "calibration".into(),
                reason: "no non-empty token sequence to train the routers on".into(),
            });
        }
        seqs.sort_by_key(Vec::len);
        let size = batch_size.min(seqs.len());
        Ok(Batches { seqs, size })
    }

    /// `(size, L)` token ids of the sequences `start..start + size`, cut to
    /// the shortest one's length L.
    fn batch(&self, start: usize, device: &Device) -> candle_core::Result<Tensor> {
        let group = &self.seqs[start..start + self.size];
        let len = group.iter().map(Vec::len).min().unwrap_or(0);
        let ids: Vec<u32> = group
            .iter()
            .flat_map(|s| s[..len].iter().copied())
            .collect();
        Tensor::from_vec(ids, (self.size, len), device)
    }

    /// Last valid batch start.
    fn last_start(&self) -> usize {
        self.seqs.len() - self.size
    }

    /// Starts of the evaluation batches: up to four, spread over the order.
    fn eval_starts(&self) -> Vec<usize> {
        let last = self.last_start();
        let n = EVAL_BATCHES.min(last + 1);
        let mut starts: Vec<usize> = (0..n)
            .map(|k| if n == 1 { 0 } else { k * last / (n - 1) })
            .collect();
        starts.dedup();
        starts
    }
}

/// Mean over positions of the entropy of the next-token distribution,
/// −Σv p log p, for logits `(batch, seq, vocab)` (a scalar tensor; it is
/// differentiable).
pub fn mean_entropy(logits: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let h = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    h.mean_all()
}

/// The mean entropy per position over `starts`' batches.
fn evaluate(model: &Model, batches: &Batches, starts: &[usize]) -> Result<f64> {
    let (mut total, mut positions) = (0f64, 0usize);
    for &s in starts {
        let ids = batches.batch(s, model.device())?;
        let n = ids.elem_count();
        let h = mean_entropy(&model.forward(&ids, None)?)?.to_scalar::<f32>()?;
        total += h as f64 * n as f64;
        positions += n;
    }
    Ok(total / positions.max(1) as f64)
}

/// Trains copies of `parts`' routers on `calibration`; returns the trained
/// routers (plain tensors) and the report.
pub fn adapt(
    parts: &MoeParts,
    calibration: &[Vec<u32>],
    opts: &TrainOptions,
) -> Result<(Routers, TrainReport)> {
    let batches = Batches::new(
        calibration,
        parts.config.max_position_embeddings,
        opts.batch_size,
    )?;
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
    let eval = batches.eval_starts();
    let entropy_before = evaluate(&model, &batches, &eval)?;
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
        let s = rng.random_range(0..=batches.last_start());
        let ids = batches.batch(s, model.device())?;
        let loss = mean_entropy(&model.forward(&ids, None)?)?;
        adam.backward_step(&loss)?;
        if step % 10 == 0 || step + 1 == opts.steps {
            bar.set_message(format!("entropy {:.4}", loss.to_scalar::<f32>()?));
        }
        bar.inc(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let entropy_after = evaluate(&model, &batches, &eval)?;
    drop(model);
    let trained = routers.try_map(|r| r.try_map(|t| Ok(t.detach().copy()?)))?;
    Ok((
        trained,
        TrainReport {
            steps: opts.steps,
            lr: opts.lr,
            batch_size: batches.size,
            seed: opts.seed,
            sequences: batches.seqs.len(),
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

    #[test]
    fn batches_have_no_padding() {
        let cal = vec![
            vec![1, 2, 3, 4, 5],
            vec![],
            vec![1, 2],
            vec![7, 8, 9],
            vec![4; 10],
        ];
        let b = Batches::new(&cal, 8, 2).unwrap();
        // Sorted lengths (empty dropped, 10 cut to 8): 2, 3, 5, 8.
        assert_eq!(
            b.seqs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 3, 5, 8]
        );
        assert_eq!(b.last_start(), 2);
        let ids = b.batch(1, &Device::Cpu).unwrap();
        assert_eq!(
            ids.to_vec2::<u32>().unwrap(),
            vec![vec![7, 8, 9], vec![1, 2, 3]]
        );
        assert_eq!(b.eval_starts(), vec![0, 1, 2]);
        assert!(Batches::new(&[vec![]], 8, 2).is_err());
    }
}
