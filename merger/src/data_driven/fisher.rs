//! `fisher_merging` (Matena & Raffel 2022, "Merging Models with
//! Fisher-Weighted Averaging"), as FusionBench computes it.
//!
//! For each expert i, the diagonal empirical Fisher on its own task's
//! inputs, with the model's own predictions standing in for labels:
//!
//! ```text
//! L_b  = Σ_{rows of batch b} Σ_k sg(√p_k) · log p_k        (sg: no gradient)
//! F_i  = Σ_b (∂L_b/∂θ_i)² / N_i                          (N_i inputs read)
//! ```
//!
//! (√p is squared by the square of the gradient, so `F_i` is the expected
//! squared score under the model's own distribution, one batch at a time).
//! Then, elementwise for every tensor the model reads,
//!
//! ```text
//! θ = Σ_i c_i (F_i + m) θ_i / Σ_i c_i (F_i + m),     m = minimal_fisher_weight
//! c_i = 1/T, times (1/(‖F_i‖ + ε)) / Σ_j 1/(‖F_j‖ + ε) when normalize_fisher_weight
//! ```
//!
//! with ‖F_i‖ the L2 norm of the whole Fisher of expert i. Tensors the
//! model does not read (a BERT pooler) are averaged. Each `F_i` depends
//! only on (checkpoint, inputs, `num_samples`, `batch_size`): it goes to
//! the statistics cache.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::network::Family;
use super::stats::{StatKey, StatKind};
use super::{bar, expert_tensors, mean_of, DataContext, DataReport, Expert};
use crate::error::{MergeError, Result};
use crate::moe::build::calibration_digest;

/// `Σ_rows Σ_k sg(√p) log p` of one batch's predictions (None: nothing
/// predicted).
pub fn fisher_loss(predictions: &[Tensor]) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for lp in predictions {
        let w = lp.exp()?.sqrt()?.detach();
        let term = (w * lp)?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    Ok(total)
}

/// The diagonal Fisher of `tensors` (an expert's) on `items`, in batches
/// of `ctx.params.batch_size`: one map entry per tensor the predictions
/// depend on.
pub fn diagonal_fisher(
    ctx: &DataContext,
    family: &Family,
    tensors: &HashMap<String, Tensor>,
    items: &[crate::moe::calibration::CalibrationItem],
    progress: &indicatif::ProgressBar,
    batches_run: &mut u64,
) -> Result<HashMap<String, Tensor>> {
    let (device, batch_size) = (ctx.device, ctx.params.batch_size);
    let vars: HashMap<String, Var> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?)))
        .collect::<Result<_>>()?;
    let net = family.build(
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        device,
        DType::F32,
        true,
    )?;
    let mut acc: HashMap<String, Tensor> = HashMap::new();
    let mut examples = 0usize;
    for batch in super::batches(items, batch_size) {
        ctx.cancel.step()?;
        let preds = net.predictions(&batch)?;
        *batches_run += 1;
        progress.inc(1);
        let Some(loss) = fisher_loss(&preds)? else {
            continue;
        };
        examples += batch.len();
        let grads = loss.backward()?;
        for (name, v) in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let sq = g.sqr()?;
                let e = match acc.remove(name) {
                    Some(a) => (a + sq)?,
                    None => sq,
                };
                acc.insert(name.clone(), e);
            }
        }
    }
    let n = examples.max(1) as f64;
    acc.into_iter().map(|(k, v)| Ok((k, (v / n)?))).collect()
}

/// The Fisher-weighted mean of one tensor: `Σ c_i (F_i + m) θ_i / Σ c_i
/// (F_i + m)`; where every weight is 0, the plain mean.
pub fn combine(
    thetas: &[&Tensor],
    fishers: &[&Tensor],
    coeffs: &[f64],
    minimal: f64,
) -> Result<Tensor> {
    let mut num: Option<Tensor> = None;
    let mut den: Option<Tensor> = None;
    for ((t, f), &c) in thetas.iter().zip(fishers).zip(coeffs) {
        let w = ((*f + minimal)? * c)?;
        let n = (&w * *t)?;
        num = Some(match num {
            None => n,
            Some(a) => (a + n)?,
        });
        den = Some(match den {
            None => w,
            Some(a) => (a + w)?,
        });
    }
    let (num, den) = (num.expect("one expert"), den.expect("one expert"));
    let zero = den.eq(0.0)?;
    let safe = zero.where_cond(&den.ones_like()?, &den)?;
    let merged = (num / safe)?;
    Ok(zero.where_cond(&mean_of(thetas)?, &merged)?)
}

/// The experts' coefficients: 1/T each, rescaled by the normalised inverse
/// norms of their Fishers when `normalize`.
pub fn coefficients(norms: &[f64], normalize: bool, epsilon: f64) -> Vec<f64> {
    let t = norms.len() as f64;
    if !normalize {
        return vec![1.0 / t; norms.len()];
    }
    let inv: Vec<f64> = norms.iter().map(|n| 1.0 / (n + epsilon)).collect();
    let total: f64 = inv.iter().sum();
    inv.iter().map(|v| v / total / t).collect()
}

pub(crate) fn merge(
    ctx: &DataContext,
    family: &Family,
    experts: &[Expert],
    report: &mut DataReport,
) -> Result<HashMap<String, Tensor>> {
    let p = ctx.params;
    let thetas = expert_tensors(experts, ctx.device)?;
    let total_batches: usize = experts
        .iter()
        .map(|e| e.items.len().div_ceil(p.batch_size))
        .sum();
    let progress = bar(total_batches as u64, "fisher_merging: Fisher", ctx.progress);
    let mut fishers = Vec::with_capacity(experts.len());
    for (e, theta) in experts.iter().zip(&thetas) {
        let key = StatKey::new(
            StatKind::Fisher,
            e.checkpoint.fingerprint()?,
            &calibration_digest(&e.items),
            &[
                ("num_samples", p.num_samples as f64),
                ("batch_size", p.batch_size as f64),
            ],
        );
        if let Some(f) = ctx.stats.and_then(|s| s.get(&key, ctx.device)) {
            report.stats_hits += 1;
            progress.inc(e.items.len().div_ceil(p.batch_size) as u64);
            fishers.push(f);
            continue;
        }
        let start = Instant::now();
        let f = diagonal_fisher(
            ctx,
            family,
            theta,
            &e.items,
            &progress,
            &mut report.forward_batches,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        report.calibration_seconds += seconds;
        report.stats_misses += 1;
        if let Some(s) = ctx.stats {
            s.put(&key, &f, seconds)?;
        }
        fishers.push(f);
    }
    progress.finish_and_clear();
    let norms: Vec<f64> = fishers
        .iter()
        .map(|f| {
            let mut sq = 0.0;
            for t in f.values() {
                sq += t
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
            Ok(sq.sqrt())
        })
        .collect::<Result<_>>()?;
    let coeffs = coefficients(&norms, p.normalize_fisher_weight, p.epsilon);
    let mut out = HashMap::new();
    for name in thetas[0].keys() {
        let ts: Vec<&Tensor> = thetas.iter().map(|m| &m[name]).collect();
        let fs: Option<Vec<&Tensor>> = fishers.iter().map(|f| f.get(name)).collect();
        let merged = match fs {
            Some(fs) => combine(&ts, &fs, &coeffs, p.minimal_fisher_weight),
            None => mean_of(&ts),
        }
        .map_err(|e| match e {
            MergeError::Candle(c) => MergeError::in_tensor(name, c),
            other => other,
        })?;
        out.insert(name.clone(), merged);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn equal_fishers_average_and_a_zero_fisher_yields_to_the_others() {
        let (a, b) = (t(&[1.0, 2.0, 3.0]), t(&[3.0, 6.0, -1.0]));
        let f = t(&[0.5, 2.0, 7.0]);
        let m = combine(&[&a, &b], &[&f, &f], &[0.5, 0.5], 1e-6)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (got, want) in m.iter().zip([2.0, 4.0, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{m:?}");
        }
        // Fisher 0 in expert a at entries 0 and 2: those take b's value
        // (up to the minimal weight 1e-6 against b's Fisher).
        let fa = t(&[0.0, 1.0, 0.0]);
        let fb = t(&[1.0, 1.0, 2.0]);
        let m = combine(&[&a, &b], &[&fa, &fb], &[0.5, 0.5], 1e-6)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (m[0] - 3.0).abs() < 1e-5 && (m[2] + 1.0).abs() < 1e-5,
            "{m:?}"
        );
        assert!((m[1] - 4.0).abs() < 1e-6);
        // By hand: weights 1·0.25 and 3·0.75 on 1 and 3 → (0.25 + 2.25·3)/2.5.
        let m = combine(
            &[&a, &b],
            &[&t(&[1.0, 0.0, 0.0]), &t(&[3.0, 0.0, 0.0])],
            &[0.25, 0.75],
            0.0,
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert!((m[0] - (0.25 + 2.25 * 3.0) / 2.5).abs() < 1e-6, "{m:?}");
        // Both weights 0 (m = 0): the plain mean.
        assert_eq!(m[1], 4.0);
    }

    #[test]
    fn coefficients_follow_fusionbench() {
        assert_eq!(coefficients(&[1.0, 3.0], false, 1e-6), vec![0.5, 0.5]);
        let c = coefficients(&[1.0, 3.0], true, 0.0);
        // 1/1 and 1/3 normalised to 0.75 and 0.25, times 1/T.
        assert!((c[0] - 0.375).abs() < 1e-12 && (c[1] - 0.125).abs() < 1e-12);
    }

    #[test]
    fn the_fisher_loss_is_the_sqrt_weighted_log_likelihood() {
        let lp = t(&[0.25f32.ln(), 0.75f32.ln()]).unsqueeze(0).unwrap();
        let l = fisher_loss(&[lp])
            .unwrap()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = 0.5 * 0.25f32.ln() + 0.75f32.sqrt() * 0.75f32.ln();
        assert!((l - want).abs() < 1e-6);
        assert!(fisher_loss(&[]).unwrap().is_none());
    }
}
