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
//!   `init`; Adam (torch.optim.Adam's update in f64: weight decay 0,
//!   β = (0.9, 0.999), ε = 1e-8) at `lr` for `steps` steps; each step sums the mean entropy of
//!   one batch of `batch_size` inputs of every task (each expert's own
//!   inputs, a seeded shuffle per task), as FusionBench does; `clamp`
//!   clips every λ to [0, 1] after each step.
//!
//! Predictions and their entropy are the model's own on unlabeled inputs
//! ([`super::network`]). Gradients reach λ through θ(λ) by the chain rule
//! ([`Coefficients`]).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::network::{float_tensors, Family, Net};
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

/// Task arithmetic with trainable coefficients: θ0, the task vectors
/// stacked per tensor, and λ.
///
/// A step never builds θ(λ) inside the autograd graph: θ_g is written into
/// one persistent `Var` per tensor (`θ0_g + λ_{:,g}ᵀ τ_g`, one matrix
/// product), the network's backward gives ∂L/∂θ_g, and the chain rule
/// through the linear θ(λ) is ∂L/∂λ_{i,g} = ⟨∂L/∂θ_g, τ_{i,g}⟩, another
/// matrix product (`granularity: task` sums it over g). That is the
/// gradient autograd would give through θ(λ), without the graph's
/// per-element broadcast products and their gradients, and without a
/// second copy of the weights per step.
pub struct Coefficients {
    /// Parameter tensors in group order.
    pub names: Vec<String>,
    base: Vec<Tensor>,
    /// `taus[g]`: the experts' task vectors of tensor g, `(T, numel)`.
    taus: Vec<Tensor>,
    /// θ(λ) per tensor, rewritten in place when λ changes.
    theta: Vec<Var>,
    /// `[expert][group]`: `(T, G)` (layer) or `(T, 1)` (task).
    lambda: Vec<Vec<f64>>,
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
        let taus = names
            .iter()
            .map(|n| {
                let rows = experts
                    .iter()
                    .map(|e| Ok((&e[n] - &base[n])?.flatten_all()?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&rows, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let groups = match granularity {
            Granularity::Layer => names.len(),
            Granularity::Task => 1,
        };
        let theta = names
            .iter()
            .map(|n| Ok(Var::from_tensor(&base[n])?))
            .collect::<Result<Vec<_>>>()?;
        let mut c = Coefficients {
            base: names.iter().map(|n| base[n].clone()).collect(),
            names,
            taus,
            theta,
            lambda: vec![vec![init; groups]; experts.len()],
        };
        c.update()?;
        Ok(c)
    }

    fn column(&self, g: usize) -> usize {
        if self.lambda[0].len() == 1 {
            0
        } else {
            g
        }
    }

    /// Rewrites θ(λ) from the current λ.
    fn update(&mut self) -> Result<()> {
        for g in 0..self.names.len() {
            let col = self.column(g);
            let tau = &self.taus[g];
            let lam: Vec<f64> = self.lambda.iter().map(|l| l[col]).collect();
            let lam = Tensor::from_vec(lam, (1, self.lambda.len()), tau.device())?
                .to_dtype(tau.dtype())?;
            let base = &self.base[g];
            let delta = lam.matmul(tau)?.reshape(base.shape())?;
            self.theta[g].set(&(base + delta)?)?;
        }
        Ok(())
    }

    /// θ(λ) by name (detached copies).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.names
            .iter()
            .zip(&self.theta)
            .map(|(n, t)| Ok((n.clone(), t.as_tensor().copy()?.detach())))
            .collect()
    }

    /// λ as numbers, `[expert][group]`.
    pub fn values(&self) -> Vec<Vec<f64>> {
        self.lambda.clone()
    }

    /// Sets λ and rewrites θ(λ).
    pub fn set(&mut self, lambda: Vec<Vec<f64>>) -> Result<()> {
        self.lambda = lambda;
        self.update()
    }

    /// The objective on `batches` (one per task), no gradient.
    pub fn loss(&self, family: &Family, batches: &[Vec<&CalibrationItem>]) -> Result<f64> {
        let net = self.net(family, false)?;
        match total_entropy(&net, batches)? {
            Some(t) => Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => Ok(0.0),
        }
    }

    /// The objective on `batches` and ∂L/∂λ, `[expert][group]`.
    pub fn gradient(
        &self,
        family: &Family,
        batches: &[Vec<&CalibrationItem>],
    ) -> Result<(f64, Vec<Vec<f64>>)> {
        let mut grad = vec![vec![0.0; self.lambda[0].len()]; self.lambda.len()];
        let net = self.net(family, true)?;
        let Some(total) = total_entropy(&net, batches)? else {
            return Ok((0.0, grad));
        };
        let grads = total.backward()?;
        for (g, theta) in self.theta.iter().enumerate() {
            let Some(d) = grads.get(theta.as_tensor()) else {
                continue;
            };
            let d = d.flatten_all()?.unsqueeze(1)?;
            let dots = self.taus[g]
                .matmul(&d)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let col = self.column(g);
            for (row, v) in grad.iter_mut().zip(dots) {
                row[col] += v;
            }
        }
        Ok((total.to_dtype(DType::F64)?.to_scalar::<f64>()?, grad))
    }

    fn net(&self, family: &Family, differentiable: bool) -> Result<Net> {
        let tensors: HashMap<String, Tensor> = self
            .names
            .iter()
            .zip(&self.theta)
            .map(|(n, t)| (n.clone(), t.as_tensor().clone()))
            .collect();
        let dtype = self.base.first().map_or(DType::F32, Tensor::dtype);
        let device = self
            .base
            .first()
            .map_or(candle_core::Device::Cpu, |t| t.device().clone());
        // candle's fused norms have no f64 kernel; the differentiable ops do.
        family.build(
            tensors,
            &device,
            dtype,
            differentiable || dtype == DType::F64,
        )
    }
}

/// Summed mean entropies of `batches` under `net` (None: nothing
/// predicted).
fn total_entropy(net: &Net, batches: &[Vec<&CalibrationItem>]) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for b in batches {
        if let Some(h) = mean_entropy(&net.predictions(b)?)? {
            total = Some(match total {
                None => h,
                Some(t) => (t + h)?,
            });
        }
    }
    Ok(total)
}

/// Adam (Kingma & Ba, as torch.optim.Adam with weight decay 0) on λ, in
/// f64: m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²,
/// λ ← λ − lr m̂ / (√v̂ + ε) with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t).
struct Adam {
    lr: f64,
    t: i32,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(lr: f64, like: &[Vec<f64>]) -> Self {
        let zeros: Vec<Vec<f64>> = like.iter().map(|r| vec![0.0; r.len()]).collect();
        Adam {
            lr,
            t: 0,
            m: zeros.clone(),
            v: zeros,
        }
    }

    fn step(&mut self, lambda: &mut [Vec<f64>], grad: &[Vec<f64>]) {
        self.t += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.t);
        let c2 = 1.0 - Self::BETA2.powi(self.t);
        for (i, row) in lambda.iter_mut().enumerate() {
            for (g, l) in row.iter_mut().enumerate() {
                let d = grad[i][g];
                let m = &mut self.m[i][g];
                let v = &mut self.v[i][g];
                *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * d;
                *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * d * d;
                *l -= self.lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS);
            }
        }
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
    let mut coeffs = Coefficients::new(&base, &all, p.granularity, p.init)?;
    drop(all);
    drop(base);
    if p.steps > 0 {
        let start = Instant::now();
        let eval: Vec<Vec<&CalibrationItem>> = experts
            .iter()
            .map(|e| e.items.iter().take(p.batch_size).collect())
            .collect();
        let before = coeffs.loss(family, &eval)?;
        report.forward_batches += experts.len() as u64;
        let mut lambda = coeffs.values();
        let mut adam = Adam::new(p.lr, &lambda);
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
            ctx.cancel.step()?;
            let batches: Vec<Vec<&CalibrationItem>> = shuffles
                .iter_mut()
                .map(|s| s.next(p.batch_size, &mut rng))
                .collect();
            let (loss, grad) = coeffs.gradient(family, &batches)?;
            report.forward_batches += experts.len() as u64;
            adam.step(&mut lambda, &grad);
            if p.clamp {
                lambda
                    .iter_mut()
                    .flatten()
                    .for_each(|l| *l = l.clamp(0.0, 1.0));
            }
            coeffs.set(lambda.clone())?;
            progress.set_message(format!("adamerging (entropy {loss:.4})"));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let after = coeffs.loss(family, &eval)?;
        report.forward_batches += experts.len() as u64;
        let seconds = start.elapsed().as_secs_f64();
        report.calibration_seconds += seconds;
        report.training = Some(AdaReport {
            steps: p.steps,
            entropy_before: before,
            entropy_after: after,
            coefficients: coeffs.values(),
            groups: match p.granularity {
                Granularity::Layer => coeffs.names.clone(),
                Granularity::Task => Vec::new(),
            },
            seconds,
        });
    }
    coeffs.tensors()
}
