//! Compressing a merge into a delta over its base ([`Residency`]).
//!
//! For every tensor, ΔW = W_merged − W_base (formed in f64 on the host from
//! the merged tensor and the base's stored one):
//!
//! - an all-zero ΔW is dropped (the base's tensor serves as it is);
//! - a 1-D ΔW (norms, biases) is kept dense, and so is every ΔW of form
//!   `dense`;
//! - `lowrank`: the thin SVD ΔW = U Σ Vᵀ ([`crate::linalg::thin_svd`], f64)
//!   truncated to the rank r that keeps `energy` of Σσᵢ² (the smallest r
//!   with Σ_{i≤r} σᵢ² ≥ energy·Σσᵢ²), or the leading triplets of a fixed
//!   `rank` ([`crate::linalg::randomized_svd`], O(m·n·r)), never
//!   keeping values under [`NOISE_FLOOR`]·σ₁ (rounding noise); stored as
//!   U_r Σ_r `(out, r)` and V_rᵀ `(r, in)`. The embedding keeps U's rows for
//!   gathering by token id.
//! - `sparse`: the k = ⌈density·out·in⌉ entries of largest |ΔW| (ties
//!   broken by position), in coordinate form.
//!
//! A compact form that would take at least the dense delta's bytes (a rank
//! with r(out + in) ≥ out·in, a density whose entries with their two u32
//! indices and the row offsets outweigh the dense tensor) falls back to the dense delta.
//!
//! Every compressed tensor is measured as it will be served: its stored
//! factors (rounded to the serving dtype) are expanded back and compared,
//! ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F; the report has the largest and the mean.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use faer::Mat;
use runtime::checkpoint::Checkpoint;
use runtime::model::{ModelDelta, TensorDelta, EMBED};
use serde::Serialize;

use crate::bounds::Cancel;
use crate::error::{MergeError, Result};
use crate::linalg::{randomized_svd, thin_svd};
use crate::spec::residency::{Form, Residency, Truncation};

/// What compression made of a merge, as `GET /v1/merges/{id}` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResidencyReport {
    /// The form asked for.
    pub form: Form,
    /// `lowrank`: the energy kept per tensor (when truncated by energy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// `lowrank`: the smallest and largest rank of the low-rank tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<RankRange>,
    /// `sparse`: the fraction of entries kept, asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// Tensors whose delta is held (the others equal the base's).
    pub tensors: usize,
    /// Of those, the ones held dense (1-D, or no smaller compressed).
    pub dense_tensors: usize,
    /// Bytes of the delta (what the merge costs over the shared base).
    pub bytes: u64,
    /// Bytes the merge's own full weights would take.
    pub dense_bytes: u64,
    /// `combination`: bytes of the task vectors it reads, resident once
    /// and shared by every combination of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
    /// Largest ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over the held tensors (for a
    /// combination, over its task vectors' tensors: ‖τ − τ̂‖/‖τ‖).
    pub max_error: f64,
    /// Mean of that relative error over the held tensors.
    pub mean_error: f64,
    /// Seconds the compression took.
    pub seconds: f64,
}

/// The ranks a lowrank delta used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RankRange {
    /// Smallest rank of a low-rank tensor.
    pub min: usize,
    /// Largest rank of a low-rank tensor.
    pub max: usize,
}

/// A merge compressed: its delta over the base and how it went.
pub struct Compressed {
    /// The delta, in `dtype` on `device`.
    pub delta: ModelDelta,
    /// Sizes and errors.
    pub report: ResidencyReport,
}

/// Compresses `merged` (every tensor of a merge) into its delta over
/// `base` in the form `residency` asks for, held in `dtype` on `device`;
/// stops with [`MergeError::Cancelled`] once `cancel` is.
pub fn compress(
    merged: &HashMap<String, Tensor>,
    base: &Checkpoint,
    residency: &Residency,
    dtype: DType,
    device: &Device,
    cancel: &Cancel,
) -> Result<Compressed> {
    if residency.is_combination() {
        return Err(MergeError::Unsupported {
            feature: "compressing merged weights into form `combination`".into(),
            hint: "a combination is built from its task vectors ([`task_vector`], \
                   [`combination`]), not from the merged weights"
                .into(),
        });
    }
    let start = Instant::now();
    let mut names: Vec<&String> = merged.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    let mut errors = Vec::new();
    let mut dense_tensors = 0;
    let mut ranks: Option<RankRange> = None;
    let mut dense_bytes = 0u64;
    for name in names {
        cancel.check()?;
        let w = &merged[name];
        dense_bytes += (w.elem_count() * dtype.size_in_bytes()) as u64;
        let shape = w.dims().to_vec();
        let stored = base.tensor(name)?;
        if stored.view().shape != shape.as_slice() {
            return Err(MergeError::ShapeMismatch {
                tensor: name.clone(),
                model: base.name().to_string(),
                found: stored.view().shape.to_vec().into(),
                reference: "the merge".into(),
                expected: shape.clone().into(),
            });
        }
        let theta0 = stored.to_f32_vec();
        let merged_values: Vec<f32> = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let delta: Vec<f64> = merged_values
            .iter()
            .zip(&theta0)
            .map(|(&m, &b)| m as f64 - b as f64)
            .collect();
        let norm = delta.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let held = match (shape.as_slice(), residency.form) {
            (&[out, inp], Form::Lowrank) => {
                match low_rank(
                    name,
                    &delta,
                    out,
                    inp,
                    residency.truncation(),
                    dtype,
                    device,
                )? {
                    Some((d, r)) => {
                        let range = ranks.get_or_insert(RankRange { min: r, max: r });
                        range.min = range.min.min(r);
                        range.max = range.max.max(r);
                        d
                    }
                    None => dense(&delta, &shape, dtype, device)?,
                }
            }
            (&[out, inp], Form::Sparse) => {
                match sparse(&delta, out, inp, residency.density(), dtype, device)? {
                    Some(d) => d,
                    None => dense(&delta, &shape, dtype, device)?,
                }
            }
            _ => dense(&delta, &shape, dtype, device)?,
        };
        if matches!(held, TensorDelta::Dense(_)) {
            dense_tensors += 1;
        }
        errors.push(relative_error(&delta, norm, &held)?);
        tensors.insert(name.clone(), Arc::new(held));
    }
    let delta = ModelDelta::Owned(tensors);
    let report = ResidencyReport {
        form: residency.form,
        energy: match (residency.form, residency.truncation()) {
            (Form::Lowrank, Truncation::Energy(e)) => Some(e),
            _ => None,
        },
        rank: ranks,
        density: (residency.form == Form::Sparse).then(|| residency.density()),
        tensors: errors.len(),
        dense_tensors,
        bytes: delta.own_bytes(),
        shared_bytes: None,
        dense_bytes,
        max_error: errors.iter().copied().fold(0.0, f64::max),
        mean_error: if errors.is_empty() {
            0.0
        } else {
            errors.iter().sum::<f64>() / errors.len() as f64
        },
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Compressed { delta, report })
}

/// Checkpoint `expert`'s task vector τ = θ − θ₀ over `base`, every tensor
/// of the expert, compressed as `vectors` (form dense, lowrank or sparse);
/// stops with [`MergeError::Cancelled`] once `cancel` is.
pub fn task_vector(
    expert: &Checkpoint,
    base: &Checkpoint,
    vectors: &Residency,
    dtype: DType,
    device: &Device,
    cancel: &Cancel,
) -> Result<Compressed> {
    let mut theta = HashMap::new();
    for name in expert.tensors().keys() {
        cancel.check()?;
        theta.insert(
            name.clone(),
            expert.tensor(name)?.to_f32_tensor(&Device::Cpu)?,
        );
    }
    compress(
        &theta,
        base,
        &vectors.vectors_residency(),
        dtype,
        device,
        cancel,
    )
}

/// A merge held as `Σᵢ λᵢ τ̂ᵢ` over shared compressed task vectors `parts`
/// (each with its coefficient and its compression report): only the
/// coefficients are its own. Its report has form `combination`, the task
/// vectors' ranks, density and errors (largest, and the mean of their
/// means) and their bytes as `shared_bytes`.
pub fn combination(parts: Vec<(f64, Arc<ModelDelta>, &ResidencyReport)>) -> Compressed {
    let reports: Vec<&ResidencyReport> = parts.iter().map(|p| p.2).collect();
    let delta = ModelDelta::Combination(parts.iter().map(|(c, d, _)| (*c, d.clone())).collect());
    let ranks = reports
        .iter()
        .filter_map(|r| r.rank)
        .reduce(|a, b| RankRange {
            min: a.min.min(b.min),
            max: a.max.max(b.max),
        });
    let n = reports.len().max(1) as f64;
    let report = ResidencyReport {
        form: Form::Combination,
        energy: reports.iter().find_map(|r| r.energy),
        rank: ranks,
        density: reports.iter().find_map(|r| r.density),
        tensors: reports.iter().map(|r| r.tensors).max().unwrap_or(0),
        dense_tensors: reports.iter().map(|r| r.dense_tensors).max().unwrap_or(0),
        bytes: delta.own_bytes(),
        shared_bytes: Some(delta.shared_bytes()),
        dense_bytes: reports.iter().map(|r| r.dense_bytes).max().unwrap_or(0),
        max_error: reports.iter().map(|r| r.max_error).fold(0.0, f64::max),
        mean_error: reports.iter().map(|r| r.mean_error).sum::<f64>() / n,
        seconds: reports.iter().map(|r| r.seconds).sum(),
    };
    Compressed { delta, report }
}

/// ΔW held as it is.
fn dense(delta: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Result<TensorDelta> {
    let values: Vec<f32> = delta.iter().map(|&x| x as f32).collect();
    Ok(TensorDelta::Dense(
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?,
    ))
}

/// Singular values below this fraction of the largest are the rounding
/// noise of subtracting two stored (f32, f16, bf16) weights, not part of
/// the delta: the truncation never keeps them (their energy is < 1e-10).
pub const NOISE_FLOOR: f64 = 1e-5;

/// The rank of a truncated SVD with values `s` (largest first): at most
/// the number of values above [`NOISE_FLOOR`]·σ₁.
pub fn truncated_rank(s: &[f64], truncation: Truncation) -> usize {
    let floor = s.first().copied().unwrap_or(0.0) * NOISE_FLOOR;
    let signal = s.iter().take_while(|&&x| x > floor).count();
    truncation_of(&s[..signal], truncation)
}

fn truncation_of(s: &[f64], truncation: Truncation) -> usize {
    match truncation {
        Truncation::Rank(r) => r.min(s.len()),
        Truncation::Energy(energy) => {
            let total: f64 = s.iter().map(|x| x * x).sum();
            let mut kept = 0.0;
            for (i, x) in s.iter().enumerate() {
                kept += x * x;
                // A relative slack of 1e-12 keeps energy = 1 from asking
                // for the rounding error's components.
                if kept >= energy * total * (1.0 - 1e-12) {
                    return i + 1;
                }
            }
            s.len()
        }
    }
}

/// ΔW `(out, inp)` as U_r Σ_r V_rᵀ with its rank, or `None` when that would
/// not be smaller than the dense delta.
fn low_rank(
    name: &str,
    delta: &[f64],
    out: usize,
    inp: usize,
    truncation: Truncation,
    dtype: DType,
    device: &Device,
) -> Result<Option<(TensorDelta, usize)>> {
    let a = Mat::from_fn(out, inp, |i, j| delta[i * inp + j]);
    let svd = match truncation {
        // A fixed rank needs the leading triplets only.
        Truncation::Rank(r) => randomized_svd(a.as_ref(), r, seed_of(name)),
        Truncation::Energy(_) => thin_svd(a.as_ref()),
    }
    .map_err(|source| MergeError::Tensor {
        tensor: name.to_string(),
        source,
    })?;
    let r = truncated_rank(&svd.s, truncation).max(1);
    let embedding = name == EMBED;
    // The embedding also keeps U's rows (gathered by token id).
    let kept = if embedding { 2 * out + inp } else { out + inp };
    if r * kept >= out * inp {
        return Ok(None);
    }
    let mut u = Vec::with_capacity(out * r);
    for i in 0..out {
        for j in 0..r {
            u.push((svd.u[(i, j)] * svd.s[j]) as f32);
        }
    }
    let mut v = Vec::with_capacity(r * inp);
    for j in 0..r {
        for k in 0..inp {
            v.push(svd.v[(k, j)] as f32);
        }
    }
    let u = Tensor::from_vec(u, (out, r), device)?.to_dtype(dtype)?;
    let v = Tensor::from_vec(v, (r, inp), device)?.to_dtype(dtype)?;
    Ok(Some((TensorDelta::low_rank(&u, &v, embedding)?, r)))
}

/// A seed from a tensor's name (FNV-1a), so a compression is reproducible.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `density` largest entries of ΔW `(out, inp)` by magnitude, or `None`
/// when they would not take fewer bytes than the dense delta.
fn sparse(
    delta: &[f64],
    out: usize,
    inp: usize,
    density: f64,
    dtype: DType,
    device: &Device,
) -> Result<Option<TensorDelta>> {
    let n = out * inp;
    let k = ((density * n as f64).ceil() as usize).clamp(1, n);
    let value_bytes = dtype.size_in_bytes();
    if k * (value_bytes + 8) + (out + 1) * 4 >= n * value_bytes {
        return Ok(None);
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    let magnitude = |i: &u32| delta[*i as usize].abs();
    // Largest first; equal magnitudes by position, so the choice is
    // deterministic.
    order.select_nth_unstable_by(k - 1, |a, b| {
        magnitude(b).total_cmp(&magnitude(a)).then(a.cmp(b))
    });
    let entries: Vec<(u32, u32, f32)> = order[..k]
        .iter()
        .filter(|&&i| delta[i as usize] != 0.0)
        .map(|&i| {
            let i = i as usize;
            ((i / inp) as u32, (i % inp) as u32, delta[i] as f32)
        })
        .collect();
    Ok(Some(TensorDelta::sparse(
        (out, inp),
        entries,
        dtype,
        device,
    )?))
}

/// ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of `held` as stored.
fn relative_error(delta: &[f64], norm: f64, held: &TensorDelta) -> Result<f64> {
    let approx: Vec<f32> = held
        .to_dense()?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let diff = delta
        .iter()
        .zip(&approx)
        .map(|(&d, &a)| (d - a as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    Ok(diff / norm)
}

#[cfg(test)]
mod tests;
