//! `adamerging` (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for
//! Multi-Task Learning"): task arithmetic whose coefficients are learned by
//! test-time adaptation,
//!
//! ```text
//! θ(λ) = θ0 + Σ_i λ_{i,g} τ_{i,g}        τ_i = θ_i − θ0,  g = the parameter tensor
//! min_λ Σ_t mean_{x in a batch of task t} H(p(· | x; θ(λ))),   H(p) = −Σ_k p_k log p_k
//! ```
//!
//! - `granularity: task`: one λ_i per expert (λ_{i,g} = λ_i), T numbers;
//! - `granularity: layer` (default): one λ_{i,g} per expert per parameter
//!   tensor g (every float tensor of the checkpoint, in name order), T·G
//!   numbers, FusionBench's layer-wise AdaMerging;
//! - every λ starts at `init` (0.3), so 0 steps is task arithmetic at
//!   `init`; Adam (candle's AdamW, weight decay 0, β = (0.9, 0.999), ε =
//!   1e-8) at `lr` for `steps` steps; each step sums the mean entropy of
//!   one batch of `batch_size` inputs of every task (each expert's own
//!   inputs, a seeded shuffle per task), as FusionBench does; `clamp`
//!   clips every λ to [0, 1] after each step.
//!
//! Predictions and their entropy are the model's own on unlabeled inputs
//! ([`super::network`]). Gradients reach λ through θ(λ): the network is
//! built from the tensors computed from the `Var` λ, with differentiable
//! ops.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::network::{float_tensors, Family};
use super::params::Granularity;
use super::{bar, check_same, DataContext, DataReport, Expert};
use crate::error::Result;
use crate::moe::calibration::CalibrationItem;
use runtime::checkpoint::Checkpoint;

/// What training did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdaReport {
    /// Adam steps run.
    pub steps: usize,
    /// The objective (summed mean entropies, nats) on the first batch of
    /// every task, before training.
    pub entropy_before: f64,
    /// The same after training.
    pub entropy_after: f64,
    /// Coefficients per expert: `granularity: task`, one each; `layer`,
    /// one per parameter tensor (in the order of `groups`).
    pub coefficients: Vec<Vec<f64>>,
    /// The parameter tensors, in coefficient order (`layer`); empty for
    /// `task`.
    pub groups: Vec<String>,
    /// Seconds of training.
    pub seconds: f64,
}

/// Mean over rows of the entropy of each prediction row, summed over the
/// prediction matrices (None: nothing predicted).
pub fn mean_entropy(predictions: &[Tensor]) -> Result<Option<Tensor>> {
    let mut sum: Option<Tensor> = None;
    let mut rows = 0usize;
    for lp in predictions {
        let h = (lp.exp()? * lp)?.sum(D::Minus1)?.neg()?.sum_all()?;
        rows += lp.dim(0)?;
        sum = Some(match sum {
            None => h,
            Some(s) => (s + h)?,
        });
    }
    Ok(match sum {
        Some(s) => Some((s / rows as f64)?),
        None => None,
    })
}

/// Task arithmetic with trainable coefficients: θ0 and the task vectors.
pub struct Coefficients {
    /// Parameter tensors in group order.
    pub names: Vec<String>,
    base: Vec<Tensor>,
    /// `taus[i][g]`.
    taus: Vec<Vec<Tensor>>,
    /// `(T, G)` (layer) or `(T, 1)` (task).
    pub lambda: Var,
}

impl Coefficients {
    /// θ0 and τ_i = θ_i − θ0 over the float tensors, every λ = `init`, in
    /// the tensors' dtype.
    pub fn new(
        base: &HashMap<String, Tensor>,
        experts: &[HashMap<String, Tensor>],
        granularity: Granularity,
        init: f64,
    ) -> Result<Self> {
        let mut names: Vec<String> = base.keys().cloned().collect();
        names.sort();
        let taus = experts
            .iter()
            .map(|e| {
                names
                    .iter()
                    .map(|n| Ok((&e[n] - &base[n])?))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let groups = match granularity {
            Granularity::Layer => names.len(),
            Granularity::Task => 1,
        };
        let first = &base[&names[0]];
        let lambda = Var::from_tensor(
            &(Tensor::ones((experts.len(), groups), first.dtype(), first.device())? * init)?,
        )?;
        Ok(Coefficients {
            base: names.iter().map(|n| base[n].clone()).collect(),
            names,
            taus,
            lambda,
        })
    }

    /// θ(λ) by name, differentiable in λ.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let lam = self.lambda.as_tensor();
        let groups = lam.dim(1)?;
        let mut out = HashMap::with_capacity(self.names.len());
        for (g, name) in self.names.iter().enumerate() {
            let col = if groups == 1 { 0 } else { g };
            let mut t = self.base[g].clone();
            for (i, taus) in self.taus.iter().enumerate() {
                let l = lam.i((i, col))?;
                t = (t + taus[g].broadcast_mul(&l)?)?;
            }
            out.insert(name.clone(), t);
        }
        Ok(out)
    }

    /// λ as numbers, `[expert][group]`.
    pub fn values(&self) -> Result<Vec<Vec<f64>>> {
        Ok(self
            .lambda
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?)
    }
}

/// The objective on `batches` (one per task) and its gradient in λ.
pub fn objective(
    family: &Family,
    coeffs: &Coefficients,
    batches: &[Vec<&CalibrationItem>],
) -> Result<(Tensor, Option<candle_core::backprop::GradStore>)> {
    let tensors = coeffs.tensors()?;
    let dtype = tensors.values().next().map_or(DType::F32, Tensor::dtype);
    let device = coeffs.lambda.device().clone();
    let net = family.build(tensors, &device, dtype, true)?;
    let mut total: Option<Tensor> = None;
    for b in batches {
        if let Some(h) = mean_entropy(&net.predictions(b)?)? {
            total = Some(match total {
                None => h,
                Some(t) => (t + h)?,
            });
        }
    }
    match total {
        Some(t) => {
            let grads = t.backward()?;
            Ok((t, Some(grads)))
        }
        None => Ok((Tensor::new(0f32, &device)?.to_dtype(dtype)?, None)),
    }
}

/// A seeded endless shuffle of one task's inputs.
struct Shuffle<'a> {
    items: &'a [CalibrationItem],
    order: Vec<usize>,
    at: usize,
}

impl<'a> Shuffle<'a> {
    fn next(&mut self, n: usize, rng: &mut ChaCha8Rng) -> Vec<&'a CalibrationItem> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n.min(self.items.len()) {
            if self.at == 0 {
                self.order.shuffle(rng);
            }
            out.push(&self.items[self.order[self.at]]);
            self.at = (self.at + 1) % self.items.len();
        }
        out
    }
}

pub(crate) fn merge(
    ctx: &DataContext,
    family: &Family,
    reference: &Checkpoint,
    experts: &[Expert],
    report: &mut DataReport,
) -> Result<HashMap<String, Tensor>> {
    let p = ctx.params;
    let base = float_tensors(reference, ctx.device)?;
    let mut all = vec![base];
    for e in experts {
        all.push(float_tensors(&e.checkpoint, ctx.device)?);
    }
    let mut labels = vec![(reference.name(), reference.dir())];
    labels.extend(
        experts
            .iter()
            .map(|e| (e.name.as_str(), e.checkpoint.dir())),
    );
    check_same(&all, &labels)?;
    let base = all.remove(0);
    let coeffs = Coefficients::new(&base, &all, p.granularity, p.init)?;
    drop(all);
    if p.steps > 0 {
        let start = Instant::now();
        let eval: Vec<Vec<&CalibrationItem>> = experts
            .iter()
            .map(|e| e.items.iter().take(p.batch_size).collect())
            .collect();
        let (before, _) = objective(family, &coeffs, &eval)?;
        report.forward_batches += experts.len() as u64;
        let mut adam = AdamW::new(
            vec![coeffs.lambda.clone()],
            ParamsAdamW {
                lr: p.lr,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        let mut shuffles: Vec<Shuffle> = experts
            .iter()
            .map(|e| Shuffle {
                items: &e.items,
                order: (0..e.items.len()).collect(),
                at: 0,
            })
            .collect();
        let progress = bar(p.steps as u64, "adamerging", ctx.progress);
        for _ in 0..p.steps {
            ctx.cancel.check()?;
            let batches: Vec<Vec<&CalibrationItem>> = shuffles
                .iter_mut()
                .map(|s| s.next(p.batch_size, &mut rng))
                .collect();
            let (loss, grads) = objective(family, &coeffs, &batches)?;
            report.forward_batches += experts.len() as u64;
            if let Some(g) = grads {
                adam.step(&g)?;
            }
            if p.clamp {
                coeffs
                    .lambda
                    .set(&coeffs.lambda.as_tensor().clamp(0.0, 1.0)?)?;
            }
            progress.set_message(format!(
                "adamerging (entropy {:.4})",
                loss.to_dtype(DType::F64)?.to_scalar::<f64>()?
            ));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let (after, _) = objective(family, &coeffs, &eval)?;
        report.forward_batches += experts.len() as u64;
        let seconds = start.elapsed().as_secs_f64();
        report.calibration_seconds += seconds;
        report.training = Some(AdaReport {
            steps: p.steps,
            entropy_before: before.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            entropy_after: after.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            coefficients: coeffs.values()?,
            groups: match p.granularity {
                Granularity::Layer => coeffs.names.clone(),
                Granularity::Task => Vec::new(),
            },
            seconds,
        });
    }
    let tensors = coeffs.tensors()?;
    Ok(tensors.into_iter().map(|(k, v)| (k, v.detach())).collect())
}
