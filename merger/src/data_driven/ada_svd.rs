//! `ada_svd`: every linear layer becomes a dense mixture of its task
//! vectors, each gated by how much of the input lies in its top right
//! singular subspace; the gates are averaged over the calibration tokens
//! and the mixture collapsed into one weight:
//!
//! ```text
//! τ_i = W_i − W0 = U_i S_i V_iᵀ                (thin SVD, per linear weight)
//! g_i(x) = ‖V_{i,1:k}ᵀ x‖,   r(x) = softmax_i g_i(x)        (k = gate_k)
//! w̄_i = mean over the calibration tokens x of r_i(x)      (per layer)
//! W = W0 + Σ_i w̄_i τ_i
//! ```
//!
//! The tokens x are the layer's inputs when the uniform mixture (θ0 + Σ τ_i
//! / T, the gates' starting point) runs on every expert's calibration
//! inputs (each expert's own task, up to `num_samples`). Tensors that are
//! not linear weights (embeddings, norms, biases) are the uniform mixture
//! too. SVDs in f64 (faer), gates in f32.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, D};

use super::network::{float_tensors, Family};
use super::regmean::stored_name;
use super::{bar, check_same, mean_of, DataContext, DataReport, Expert};
use crate::error::{MergeError, Result};
use crate::linalg::thin_svd;
use runtime::checkpoint::Checkpoint;

/// The top-`k` right singular vectors of `tau` `(out, in)`, as `(in, k')`
/// with k' = min(k, rank).
pub fn gate(tau: &Tensor, k: usize) -> Result<Tensor> {
    let (r, c) = tau.dims2()?;
    let v = tau.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let m = faer::Mat::from_fn(r, c, |i, j| v[i * c + j]);
    let svd = thin_svd(m.as_ref())?;
    let tol = svd.tolerance();
    let rank = svd.s.iter().filter(|&&s| s > tol).count();
    let k = k.min(rank).max(1).min(svd.v.ncols());
    let mut out = Vec::with_capacity(c * k);
    for i in 0..c {
        for j in 0..k {
            out.push(svd.v[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(out, (c, k), tau.device())?)
}

/// The gates `r(x)` of input rows `x` `(n, in)` for the experts' subspaces
/// `vs[i]` `(in, k_i)`: `(n, T)`, each row on the simplex.
pub fn gates(x: &Tensor, vs: &[Tensor]) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norms: Vec<Tensor> = vs
        .iter()
        .map(|v| Ok(x.matmul(v)?.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?))
        .collect::<Result<_>>()?;
    let g = Tensor::cat(&norms, 1)?;
    Ok(candle_nn::ops::softmax(&g, D::Minus1)?)
}

pub(crate) fn merge(
    ctx: &DataContext,
    family: &Family,
    reference: &Checkpoint,
    experts: &[Expert],
    report: &mut DataReport,
) -> Result<HashMap<String, Tensor>> {
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
    let t = experts.len();
    // The uniform mixture: θ0 + Σ τ_i / T, the mean of the experts.
    let mut mixture = HashMap::new();
    for name in base.keys() {
        let ts: Vec<&Tensor> = all.iter().map(|m| &m[name]).collect();
        mixture.insert(name.clone(), mean_of(&ts)?);
    }
    let net = family.build(mixture.clone(), ctx.device, DType::F32, false)?;
    // The linear weights: what a forward pass reports inputs for.
    let items: Vec<_> = experts.iter().flat_map(|e| e.items.iter()).collect();
    let mut linear: Vec<String> = Vec::new();
    if let Some(first) = items.first() {
        net.capture(&[first], &mut |name: &str, _x: &Tensor| {
            if !linear.iter().any(|n| n == name) {
                linear.push(name.to_string());
            }
            Ok(())
        })?;
    }
    let mut subspaces: HashMap<String, Vec<Tensor>> = HashMap::new();
    for captured in &linear {
        let Some(stored) = stored_name(captured, &base) else {
            continue; // a tied head: the embedding is not a linear weight here
        };
        if base[&stored].rank() != 2 {
            continue;
        }
        let vs = all
            .iter()
            .map(|m| gate(&(&m[&stored] - &base[&stored])?, ctx.params.gate_k))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| match e {
                MergeError::Candle(c) => MergeError::in_tensor(&stored, c),
                other => other,
            })?;
        subspaces.insert(captured.clone(), vs);
    }
    let start = Instant::now();
    let mut sums: HashMap<String, (Tensor, usize)> = HashMap::new();
    let chunks: Vec<Vec<_>> = items.chunks(16).map(|c| c.to_vec()).collect();
    let progress = bar(chunks.len() as u64, "ada_svd: gates", ctx.progress);
    for batch in chunks {
        ctx.cancel.step()?;
        net.capture(&batch, &mut |name: &str, x: &Tensor| {
            let Some(vs) = subspaces.get(name) else {
                return Ok(());
            };
            let r = gates(x, vs).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let s = r.sum(0)?;
            let n = x.dim(0)?;
            let e = match sums.remove(name) {
                Some((acc, rows)) => ((acc + s)?, rows + n),
                None => (s, n),
            };
            sums.insert(name.to_string(), e);
            Ok(())
        })?;
        report.forward_batches += 1;
        progress.inc(1);
    }
    progress.finish_and_clear();
    report.calibration_seconds += start.elapsed().as_secs_f64();
    let mut out = mixture;
    for (captured, (sum, rows)) in sums {
        let Some(stored) = stored_name(&captured, &base) else {
            continue;
        };
        let w: Vec<f64> = (sum / rows.max(1) as f64)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let mut merged = base[&stored].clone();
        for i in 0..t {
            merged = (merged + ((&all[i][&stored] - &base[&stored])? * w[i])?)?;
        }
        out.insert(stored, merged);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gates_follow_the_subspace_an_input_lies_in() {
        // τ_1 reads input feature 0 only, τ_2 feature 1 only.
        let t1 = Tensor::new(&[[3f32, 0., 0.], [1., 0., 0.]], &Device::Cpu).unwrap();
        let t2 = Tensor::new(&[[0f32, 2., 0.], [0., -1., 0.]], &Device::Cpu).unwrap();
        let v1 = gate(&t1, 16).unwrap();
        let v2 = gate(&t2, 16).unwrap();
        // Rank 1 each: one singular vector, ±e0 and ±e1.
        assert_eq!(v1.dims(), &[3, 1]);
        let v1v = v1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v1v[0].abs() - 1.0).abs() < 1e-6 && v1v[1].abs() < 1e-6);
        let x = Tensor::new(&[[2f32, 0., 5.], [0., 1., 0.]], &Device::Cpu).unwrap();
        let r = gates(&x, &[v1, v2]).unwrap().to_vec2::<f32>().unwrap();
        // Row 0: norms 2 and 0 → softmax (e², 1)/(e² + 1); row 1: 0 and 1.
        let e2 = 2f32.exp();
        assert!((r[0][0] - e2 / (e2 + 1.0)).abs() < 1e-6, "{r:?}");
        let e1 = 1f32.exp();
        assert!((r[1][1] - e1 / (e1 + 1.0)).abs() < 1e-6, "{r:?}");
        assert!((r[1][0] + r[1][1] - 1.0).abs() < 1e-6);
    }
}
