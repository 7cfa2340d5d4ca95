//! `regmean` (Jin et al. 2023, "Dataless Knowledge Fusion by Merging
//! Weights of Language Models"): every linear layer `y = W x` is merged as
//! the least-squares fit of all experts' outputs on their own inputs,
//!
//! ```text
//! G_i  = X_iᵀ X_i / n_i                      (mean Gram of the layer's inputs on task i)
//! G̃_i = α G_i + (1 − α) diag(G_i)           (α = reduce_non_diagonal_ratio)
//! Wᵀ   = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ
//! ```
//!
//! With α = 1 this minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / n_i exactly; α < 1
//! shrinks towards a per-input-feature weighted mean (α = 0), which also
//! keeps the system well conditioned. Every other tensor (embeddings,
//! norms, biases) is the experts' mean.
//!
//! Precision: the Grams are accumulated in f64 and the system is solved in
//! f64 (faer's Cholesky, with a relative ridge of 1e-10 · mean diagonal
//! only if the matrix is singular, e.g. an input feature that is always
//! 0). In f32 the normal equations lose about half the digits: the Grams of
//! a transformer's inputs have condition numbers past 10⁶, so an f32 solve
//! would leave errors around 1e-1 relative where f64 leaves 1e-9.
//!
//! Gram matrices depend only on (checkpoint, inputs, `num_samples`): they go
//! to the statistics cache. Layers that read one input (query, key, value)
//! share one Gram.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use faer::linalg::solvers::Solve;
use faer::Mat;

use super::network::{Family, Net};
use super::stats::{StatKey, StatKind};
use super::{bar, expert_tensors, mean_of, DataContext, DataReport, Expert};
use crate::error::{MergeError, Result};
use crate::moe::build::calibration_digest;
use crate::moe::calibration::CalibrationItem;

/// Inputs per forward pass while collecting Grams.
pub const GRAM_BATCH: usize = 16;

/// Mean Gram matrices (f64, `(in, in)`) by linear weight name; names that
/// read one input share one tensor.
#[derive(Debug, Clone, Default)]
pub struct Grams {
    /// Weight name → mean Gram of its inputs.
    pub by_weight: HashMap<String, Tensor>,
}

impl Grams {
    /// The stored form: each distinct Gram once, and the names that share
    /// it as JSON bytes in `__aliases__`.
    fn to_stored(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut aliases: Vec<(String, String)> = Vec::new();
        let mut names: Vec<&String> = self.by_weight.keys().collect();
        names.sort();
        let mut first_of: HashMap<candle_core::TensorId, String> = HashMap::new();
        for n in names {
            let t = &self.by_weight[n];
            match first_of.get(&t.id()) {
                Some(f) => aliases.push((n.clone(), f.clone())),
                None => {
                    first_of.insert(t.id(), n.clone());
                    out.insert(n.clone(), t.clone());
                }
            }
        }
        let json = serde_json::to_vec(&aliases).expect("strings serialise");
        let len = json.len();
        out.insert(
            "__aliases__".into(),
            Tensor::from_vec(json, len, &Device::Cpu)?,
        );
        Ok(out)
    }

    fn from_stored(mut stored: HashMap<String, Tensor>) -> Result<Self> {
        let aliases: Vec<(String, String)> = match stored.remove("__aliases__") {
            Some(t) => serde_json::from_slice(&t.to_vec1::<u8>()?).unwrap_or_default(),
            None => Vec::new(),
        };
        for (n, f) in aliases {
            if let Some(t) = stored.get(&f).cloned() {
                stored.insert(n, t);
            }
        }
        Ok(Grams { by_weight: stored })
    }
}

/// Collects the mean Grams of `net`'s linear inputs on `items` for the
/// weights `keep` accepts.
pub fn collect_grams(
    net: &Net,
    items: &[CalibrationItem],
    keep: &dyn Fn(&str) -> bool,
    ctx: &DataContext,
    progress: &indicatif::ProgressBar,
    batches_run: &mut u64,
) -> Result<Grams> {
    let mut sums: HashMap<String, Tensor> = HashMap::new();
    let mut rows_of: HashMap<String, usize> = HashMap::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    for batch in super::batches(items, GRAM_BATCH) {
        ctx.cancel.step()?;
        let mut last: Option<(candle_core::TensorId, String)> = None;
        net.capture(&batch, &mut |name: &str, rows: &Tensor| {
            if !keep(name) {
                return Ok(());
            }
            if let Some((id, first)) = &last {
                if *id == rows.id() {
                    alias.insert(name.to_string(), first.clone());
                    return Ok(());
                }
            }
            last = Some((rows.id(), name.to_string()));
            let x = rows.to_dtype(DType::F64)?;
            let g = x.t()?.matmul(&x)?;
            let e = match sums.remove(name) {
                Some(s) => (s + g)?,
                None => g,
            };
            sums.insert(name.to_string(), e);
            *rows_of.entry(name.to_string()).or_default() += rows.dim(0)?;
            Ok(())
        })?;
        *batches_run += 1;
        progress.inc(1);
    }
    let mut by_weight = HashMap::new();
    for (name, s) in sums {
        let n = rows_of[&name].max(1) as f64;
        by_weight.insert(name, (s / n)?);
    }
    for (name, first) in alias {
        if let Some(t) = by_weight.get(&first).cloned() {
            by_weight.insert(name, t);
        }
    }
    Ok(Grams { by_weight })
}

fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::from_fn(r, c, |i, j| v[i * c + j]))
}

/// RegMean's closed form for one linear weight: `grams[i]` is expert i's
/// mean Gram `(in, in)`, `weights[i]` its weight `(out, in)`; the merged
/// weight `(out, in)` in f32 on `device`.
pub fn solve(
    grams: &[&Tensor],
    weights: &[&Tensor],
    alpha: f64,
    device: &Device,
) -> Result<Tensor> {
    let d = grams[0].dim(0)?;
    let out = weights[0].dim(0)?;
    let mut a = Mat::<f64>::zeros(d, d);
    let mut b = Mat::<f64>::zeros(d, out);
    for (g, w) in grams.iter().zip(weights) {
        let mut g = to_mat(g)?;
        for i in 0..d {
            for j in 0..d {
                if i != j {
                    g[(i, j)] *= alpha;
                }
            }
        }
        let wt = to_mat(&w.t()?)?;
        b += &g * &wt;
        a += &g;
    }
    let x = match a.llt(faer::Side::Lower) {
        Ok(llt) => llt.solve(&b),
        Err(_) => {
            let mean_diag = (0..d).map(|i| a[(i, i)]).sum::<f64>() / d as f64;
            let ridge = 1e-10 * mean_diag.max(f64::MIN_POSITIVE);
            let mut r = a.clone();
            for i in 0..d {
                r[(i, i)] += ridge;
            }
            match r.llt(faer::Side::Lower) {
                Ok(llt) => llt.solve(&b),
                Err(_) => r.partial_piv_lu().solve(&b),
            }
        }
    };
    let mut v = Vec::with_capacity(out * d);
    for o in 0..out {
        for i in 0..d {
            v.push(x[(i, o)] as f32);
        }
    }
    Ok(Tensor::from_vec(v, (out, d), device)?)
}

/// The checkpoint tensor a captured weight name is (the encoder strips a
/// `bert.` prefix).
pub(crate) fn stored_name(name: &str, tensors: &HashMap<String, Tensor>) -> Option<String> {
    if tensors.contains_key(name) {
        return Some(name.to_string());
    }
    let prefixed = format!("bert.{name}");
    tensors.contains_key(&prefixed).then_some(prefixed)
}

/// Merges `names` (linear weights, by stored name) by the closed form and
/// every other tensor of `thetas` by the mean; `grams[i]` is keyed by
/// captured names.
pub(crate) fn assemble(
    thetas: &[HashMap<String, Tensor>],
    grams: &[Grams],
    alpha: f64,
    device: &Device,
    only: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut linear: HashMap<String, String> = HashMap::new();
    for captured in grams[0].by_weight.keys() {
        if let Some(stored) = stored_name(captured, &thetas[0]) {
            if grams.iter().all(|g| g.by_weight.contains_key(captured)) {
                linear.insert(stored, captured.clone());
            }
        }
    }
    for name in thetas[0].keys() {
        if !only(name) {
            continue;
        }
        let ts: Vec<&Tensor> = thetas.iter().map(|m| &m[name]).collect();
        let merged = match linear.get(name) {
            Some(captured) if ts[0].rank() == 2 => {
                let gs: Vec<&Tensor> = grams.iter().map(|g| &g.by_weight[captured]).collect();
                solve(&gs, &ts, alpha, device)
            }
            _ => mean_of(&ts),
        }
        .map_err(|e| match e {
            MergeError::Candle(c) => MergeError::in_tensor(name, c),
            other => other,
        })?;
        out.insert(name.clone(), merged);
    }
    Ok(out)
}

/// Expert i's Grams on its own inputs, from the statistics cache or
/// computed.
pub(crate) fn expert_grams(
    ctx: &DataContext,
    family: &Family,
    expert: &Expert,
    theta: &HashMap<String, Tensor>,
    progress: &indicatif::ProgressBar,
    report: &mut DataReport,
) -> Result<Grams> {
    let key = StatKey::new(
        StatKind::Gram,
        expert.checkpoint.fingerprint()?,
        &calibration_digest(&expert.items),
        &[("num_samples", ctx.params.num_samples as f64)],
    );
    if let Some(stored) = ctx.stats.and_then(|s| s.get(&key, ctx.device)) {
        report.stats_hits += 1;
        progress.inc(expert.items.len().div_ceil(GRAM_BATCH) as u64);
        return Grams::from_stored(stored);
    }
    let start = Instant::now();
    let net = family.build(theta.clone(), ctx.device, DType::F32, false)?;
    let grams = collect_grams(
        &net,
        &expert.items,
        &|_| true,
        ctx,
        progress,
        &mut report.forward_batches,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    report.calibration_seconds += seconds;
    report.stats_misses += 1;
    if let Some(s) = ctx.stats {
        s.put(&key, &grams.to_stored()?, seconds)?;
    }
    Ok(grams)
}

pub(crate) fn merge(
    ctx: &DataContext,
    family: &Family,
    experts: &[Expert],
    report: &mut DataReport,
) -> Result<HashMap<String, Tensor>> {
    let thetas = expert_tensors(experts, ctx.device)?;
    let total: usize = experts
        .iter()
        .map(|e| e.items.len().div_ceil(GRAM_BATCH))
        .sum();
    let progress = bar(total as u64, "regmean: Gram matrices", ctx.progress);
    let mut grams = Vec::with_capacity(experts.len());
    for (e, theta) in experts.iter().zip(&thetas) {
        grams.push(expert_grams(ctx, family, e, theta, &progress, report)?);
    }
    progress.finish_and_clear();
    assemble(
        &thetas,
        &grams,
        ctx.params.reduce_non_diagonal_ratio,
        ctx.device,
        &|_| true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[f64], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    /// RegMean with α = 1 on one linear layer is the least-squares W of
    /// every expert's inputs X_i against its outputs X_i W_iᵀ stacked (each
    /// weighted by 1/n_i), worked out here by the normal equations by hand.
    #[test]
    fn one_layer_is_the_least_squares_fit_of_the_stacked_experts() {
        // Expert 1: inputs (1,0), (1,1); W1 = [2, 0]. Expert 2: inputs
        // (0,1), (1,1); W2 = [0, 4]. Each X_i has n_i = 2 rows.
        let x1 = m(&[1., 0., 1., 1.], 2, 2);
        let x2 = m(&[0., 1., 1., 1.], 2, 2);
        let g1 = (x1.t().unwrap().matmul(&x1).unwrap() / 2.0).unwrap();
        let g2 = (x2.t().unwrap().matmul(&x2).unwrap() / 2.0).unwrap();
        let w1 = Tensor::new(&[[2f32, 0.]], &Device::Cpu).unwrap();
        let w2 = Tensor::new(&[[0f32, 4.]], &Device::Cpu).unwrap();
        let w = solve(&[&g1, &g2], &[&w1, &w2], 1.0, &Device::Cpu).unwrap();
        // Targets y: expert 1 rows give 2, 2; expert 2 rows give 4, 4.
        // Normal equations (XᵀX) w = Xᵀy over the four rows, all weights ½:
        // XᵀX = ½[[3, 2], [2, 3]], Xᵀy = ½[2+2+4, 2+4+4] = ½[8, 10]
        // → w = [[3,2],[2,3]]⁻¹ [8, 10] = (1/5)[[3,−2],[−2,3]][8,10] = [0.8, 2.8].
        let got = w.to_vec2::<f32>().unwrap();
        assert!(
            (got[0][0] - 0.8).abs() < 1e-6 && (got[0][1] - 2.8).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn identical_grams_with_alpha_one_give_the_simple_average() {
        let g = m(&[2., 0.5, 0.5, 1.], 2, 2);
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let w2 = Tensor::new(&[[5f32, -2.], [1., 0.]], &Device::Cpu).unwrap();
        let w = solve(&[&g, &g], &[&w1, &w2], 1.0, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = [[3.0, 0.0], [2.0, 2.0]];
        for i in 0..2 {
            for j in 0..2 {
                assert!((w[i][j] - want[i][j]).abs() < 1e-5, "{w:?}");
            }
        }
        // α = 0 keeps only the diagonals: a per-input-feature weighted mean
        // of the columns, weights G_i[j][j].
        let ga = m(&[3., 9., 9., 1.], 2, 2);
        let gb = m(&[1., -4., -4., 1.], 2, 2);
        let w = solve(&[&ga, &gb], &[&w1, &w2], 0.0, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((w[0][0] - (3.0 * 1.0 + 5.0) / 4.0).abs() < 1e-6, "{w:?}");
        assert!((w[0][1] - (2.0 - 2.0) / 2.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn a_singular_system_still_solves() {
        // Input feature 1 is always 0: its Gram row and column are 0.
        let g = m(&[1., 0., 0., 0.], 2, 2);
        let w1 = Tensor::new(&[[1f32, 7.]], &Device::Cpu).unwrap();
        let w2 = Tensor::new(&[[3f32, 9.]], &Device::Cpu).unwrap();
        let w = solve(&[&g, &g], &[&w1, &w2], 0.95, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((w[0][0] - 2.0).abs() < 1e-5 && w[0][1].is_finite(), "{w:?}");
    }
}
