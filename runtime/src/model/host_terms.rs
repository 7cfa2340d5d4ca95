//! The delta terms of every run of a batch for one linear layer, computed in
//! one pass over host memory (CPU tensors in f32). For each row, each
//! compact delta λ·ΔW its run holds (its own, or a combination's task
//! vectors, flattened) adds
//!
//! ```text
//! low rank, ΔW ≈ U V:   λ (x Vᵀ) Uᵀ           r·(in + out) multiply-adds
//! sparse entries:       y[r_k] += λ v_k x[c_k]  nnz multiply-adds
//! masked, s (m ⊙ U):    y_j += λ s Σ_i m_ji U_ji x_i   in·out (U and bits read in place)
//! bias:                 λ Δb
//! ```
//!
//! into one term that is added to the base's product: two tensor
//! operations per layer, where the tensor path ([`super::delta`]) takes a
//! few small products, narrows and a concatenation per run, each with the
//! dispatch cost that dominates a CPU step mixing many merges. Anything
//! else (a dense 2-D delta, another dtype or device) is left to the tensor
//! path.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::delta::{DeltaRun, TensorDelta};

/// Most rows of one run for which the host pass takes a masked view (each
/// row expands the view's bits again); more go to the tensor path.
const MASKED_HOST_ROWS: usize = 4;

/// What the host pass made of a layer's runs.
pub(crate) enum HostTerms {
    /// Some delta it does not compute (the tensor path does).
    Unsupported,
    /// No run changes the layer.
    Nothing,
    /// The summed term, shaped as the layer's output.
    Term(Tensor),
}

/// A contiguous CPU tensor's values, read in place.
pub(super) struct Host<'a> {
    guard: StorageRef<'a>,
    range: Range<usize>,
}

impl<'a> Host<'a> {
    pub(super) fn of(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() || !matches!(&*guard, Storage::Cpu(_)) {
            return None;
        }
        let start = layout.start_offset();
        Some(Host {
            guard,
            range: start..start + t.elem_count(),
        })
    }

    pub(super) fn f32(&self) -> Option<&[f32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => v.get(self.range.clone()),
            _ => None,
        }
    }

    fn u32(&self) -> Option<&[u32]> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::U32(v)) => v.get(self.range.clone()),
            _ => None,
        }
    }
}

/// One compact delta of a row, read in place.
enum Kernel<'a> {
    LowRank {
        /// `(r, out)`.
        ut: &'a [f32],
        /// `(in, r)`.
        vt: &'a [f32],
        r: usize,
    },
    Sparse {
        row_ptr: &'a [u32],
        cols: &'a [u32],
        values: &'a [f32],
    },
    Masked {
        /// U, `(out, in)`.
        unified: &'a [f32],
        /// m's words.
        words: &'a [u64],
        scale: f32,
    },
    Bias(&'a [f32]),
}

/// The tensors of one delta, held while the pass reads them.
struct Held<'a> {
    lambda: f32,
    form: HeldForm<'a>,
}

enum HeldForm<'a> {
    LowRank(Host<'a>, Host<'a>, usize),
    Sparse(&'a [u32], Host<'a>, Host<'a>),
    Masked(Host<'a>, &'a [u64], f32),
    Bias(Host<'a>),
}

impl<'a> Held<'a> {
    /// The delta `d` of a `(out, inp)` weight (or of an `out` bias),
    /// `None` when the host pass does not take it.
    fn of(lambda: f64, d: &'a TensorDelta, out: usize, inp: usize, bias: bool) -> Option<Self> {
        let form = match d {
            TensorDelta::LowRank { ut, vt, .. } if !bias => {
                let (r, o) = ut.dims2().ok()?;
                let (i, r2) = vt.dims2().ok()?;
                if (o, i, r2) != (out, inp, r) || ut.dtype() != DType::F32 {
                    return None;
                }
                HeldForm::LowRank(Host::of(ut)?, Host::of(vt)?, r)
            }
            TensorDelta::Sparse {
                cols,
                values,
                shape,
                row_ptr,
                ..
            } if !bias => {
                if *shape != (out, inp) || values.dtype() != DType::F32 {
                    return None;
                }
                HeldForm::Sparse(row_ptr, Host::of(cols)?, Host::of(values)?)
            }
            TensorDelta::Masked {
                unified,
                mask,
                scale,
            } if !bias => {
                if unified.dims() != [out, inp] || unified.dtype() != DType::F32 {
                    return None;
                }
                HeldForm::Masked(Host::of(unified)?, mask.words(), *scale as f32)
            }
            TensorDelta::Dense(b) if bias => {
                if b.dims() != [out] || b.dtype() != DType::F32 {
                    return None;
                }
                HeldForm::Bias(Host::of(b)?)
            }
            _ => return None,
        };
        Some(Held {
            lambda: lambda as f32,
            form,
        })
    }

    fn kernel(&self) -> Option<(f32, Kernel<'_>)> {
        let k = match &self.form {
            HeldForm::LowRank(ut, vt, r) => Kernel::LowRank {
                ut: ut.f32()?,
                vt: vt.f32()?,
                r: *r,
            },
            HeldForm::Sparse(row_ptr, cols, values) => Kernel::Sparse {
                row_ptr,
                cols: cols.u32()?,
                values: values.f32()?,
            },
            HeldForm::Masked(u, words, scale) => Kernel::Masked {
                unified: u.f32()?,
                words,
                scale: *scale,
            },
            HeldForm::Bias(b) => Kernel::Bias(b.f32()?),
        };
        Some((self.lambda, k))
    }
}

/// The summed delta terms of linear layer `weight` (bias `bias`) with
/// `out` outputs over input `x` for `runs` (one run: every row of `x`;
/// several: consecutive rows of a `(1, rows, in)` stream), computed on the
/// host; [`HostTerms::Unsupported`] leaves them to the tensor path.
pub(crate) fn linear_terms(
    x: &Tensor,
    runs: &[DeltaRun],
    weight: &str,
    bias: Option<&str>,
    out: usize,
) -> Result<HostTerms> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(HostTerms::Unsupported);
    }
    let inp = x.dim(candle_core::D::Minus1)?;
    let n = x.elem_count() / inp.max(1);
    let rows: Vec<usize> = match runs {
        [_] => vec![n],
        _ if runs.iter().map(|r| r.rows).sum::<usize>() == n => {
            runs.iter().map(|r| r.rows).collect()
        }
        _ => return Ok(HostTerms::Unsupported),
    };
    // Each run's deltas of this layer, held.
    let mut held: Vec<Vec<Held>> = Vec::with_capacity(runs.len());
    for run in runs {
        let mut mine = Vec::new();
        if let Some(d) = run.delta {
            for (lambda, t) in d.parts_of(weight) {
                if matches!(t, TensorDelta::Masked { .. }) && run.rows > MASKED_HOST_ROWS {
                    // A prompt's many rows: one expanded m ⊙ U and a
                    // matrix product (the tensor path) cost less than
                    // expanding the bits for every row.
                    return Ok(HostTerms::Unsupported);
                }
                match Held::of(lambda, t, out, inp, false) {
                    Some(h) => mine.push(h),
                    None => return Ok(HostTerms::Unsupported),
                }
            }
            for (lambda, t) in bias.map_or_else(Vec::new, |b| d.parts_of(b)) {
                match Held::of(lambda, t, out, inp, true) {
                    Some(h) => mine.push(h),
                    None => return Ok(HostTerms::Unsupported),
                }
            }
        }
        held.push(mine);
    }
    if held.iter().all(Vec::is_empty) {
        return Ok(HostTerms::Nothing);
    }
    let kernels: Option<Vec<Vec<(f32, Kernel)>>> = held
        .iter()
        .map(|hs| hs.iter().map(Held::kernel).collect())
        .collect();
    let Some(kernels) = kernels else {
        return Ok(HostTerms::Unsupported);
    };
    let x = x.contiguous()?;
    let Some(xh) = Host::of(&x) else {
        return Ok(HostTerms::Unsupported);
    };
    let Some(xs) = xh.f32() else {
        return Ok(HostTerms::Unsupported);
    };
    let run_of: Vec<usize> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, &k)| std::iter::repeat_n(i, k))
        .collect();
    let mut term = vec![0f32; n * out];
    term.par_chunks_mut(out.max(1))
        .enumerate()
        .for_each(|(row, t)| {
            let xr = &xs[row * inp..(row + 1) * inp];
            for (lambda, k) in &kernels[run_of[row]] {
                add_row(t, xr, *lambda, k);
            }
        });
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    Ok(HostTerms::Term(Tensor::from_vec(term, shape, x.device())?))
}

/// `t += λ · term(x_row)` of one compact delta.
fn add_row(t: &mut [f32], x: &[f32], lambda: f32, k: &Kernel) {
    match k {
        Kernel::LowRank { ut, vt, r } => {
            let r = *r;
            let mut z = vec![0f32; r];
            for (i, &xi) in x.iter().enumerate() {
                if xi != 0.0 {
                    for (zk, &v) in z.iter_mut().zip(&vt[i * r..(i + 1) * r]) {
                        *zk += xi * v;
                    }
                }
            }
            let out = t.len();
            for (k, &zk) in z.iter().enumerate() {
                let c = lambda * zk;
                for (tj, &u) in t.iter_mut().zip(&ut[k * out..(k + 1) * out]) {
                    *tj += c * u;
                }
            }
        }
        Kernel::Sparse {
            row_ptr,
            cols,
            values,
        } => {
            for (o, tj) in t.iter_mut().enumerate() {
                let (a, b) = (row_ptr[o] as usize, row_ptr[o + 1] as usize);
                let mut s = 0f32;
                for (&c, &v) in cols[a..b].iter().zip(&values[a..b]) {
                    s += v * x[c as usize];
                }
                *tj += lambda * s;
            }
        }
        Kernel::Masked {
            unified,
            words,
            scale,
        } => {
            let inp = x.len();
            // Per output: its row's bits expanded to 0/1 (a word at a
            // time), then one dot product of bits ⊙ U ⊙ x in 8 lanes.
            let mut bits = vec![0f32; inp];
            for (o, tj) in t.iter_mut().enumerate() {
                let start = o * inp;
                unpack(words, start, &mut bits);
                let row = &unified[start..start + inp];
                *tj += lambda * scale * masked_dot(&bits, row, x);
            }
        }
        Kernel::Bias(b) => {
            for (tj, &bj) in t.iter_mut().zip(b.iter()) {
                *tj += lambda * bj;
            }
        }
    }
}

/// `out[i]` = bit `start + i` of `words`, as 0.0 or 1.0.
fn unpack(words: &[u64], start: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < out.len() {
        let (w, b) = ((start + i) / 64, (start + i) % 64);
        let span = (64 - b).min(out.len() - i);
        let word = words[w] >> b;
        for (k, o) in out[i..i + span].iter_mut().enumerate() {
            *o = ((word >> k) & 1) as f32;
        }
        i += span;
    }
}

/// Σ_i m_i u_i x_i in 8 accumulators (vectorised), then the tail.
fn masked_dot(m: &[f32], u: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = m.len() / 8;
    for c in 0..chunks {
        let r = c * 8..c * 8 + 8;
        for ((a, (&mi, &ui)), &xi) in acc
            .iter_mut()
            .zip(m[r.clone()].iter().zip(&u[r.clone()]))
            .zip(&x[r])
        {
            *a += mi * ui * xi;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..m.len() {
        s += m[i] * u[i] * x[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;
    use crate::model::delta::{add_runs, ModelDelta};
    use crate::model::tests::max_abs_diff;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The host pass equals the tensor path on a batch mixing a low-rank
    /// merge, a sparse one with a bias delta, a row of the base and two
    /// combinations sharing task vectors.
    #[test]
    fn the_host_pass_equals_the_tensor_path() {
        let (out, inp) = (6, 5);
        let low = TensorDelta::low_rank(&randn(&[out, 2], 1), &randn(&[2, inp], 2), false).unwrap();
        let entries: Vec<(u32, u32, f32)> = (0..9u32)
            .map(|k| {
                (
                    (k * 5) % out as u32,
                    (k * 3) % inp as u32,
                    k as f32 / 4.0 - 1.0,
                )
            })
            .collect();
        let sparse = TensorDelta::sparse((out, inp), entries, DType::F32, &Device::Cpu).unwrap();
        let one = |name: &str, d: TensorDelta| (name.to_string(), Arc::new(d));
        let a = ModelDelta::Owned(HashMap::from([one("w", low.clone())]));
        let b = ModelDelta::Owned(HashMap::from([
            one("w", sparse.clone()),
            one("b", TensorDelta::Dense(randn(&[out], 3))),
        ]));
        let (ta, tb) = (Arc::new(a.clone()), Arc::new(b.clone()));
        let c1 = ModelDelta::Combination(vec![(0.5, ta.clone()), (-2.0, tb.clone())]);
        let c2 = ModelDelta::Combination(vec![(1.5, ta)]);
        let runs = [
            DeltaRun {
                rows: 2,
                delta: Some(&a),
            },
            DeltaRun {
                rows: 1,
                delta: None,
            },
            DeltaRun {
                rows: 3,
                delta: Some(&b),
            },
            DeltaRun {
                rows: 1,
                delta: Some(&c1),
            },
            DeltaRun {
                rows: 2,
                delta: Some(&c2),
            },
        ];
        let x = randn(&[1, 9, inp], 4);
        let y = Tensor::zeros((1, 9, out), DType::F32, &Device::Cpu).unwrap();
        let want = add_runs(y, &x, &runs, |d, x| {
            let t = d.linear_term("w", x)?;
            let bias = d.vector("b")?;
            Ok(match (t, bias) {
                (Some(t), Some(b)) => Some(t.broadcast_add(&b)?),
                (Some(t), None) => Some(t),
                (None, Some(b)) => Some(b.broadcast_as((1, x.dim(1)?, out))?.contiguous()?),
                (None, None) => None,
            })
        })
        .unwrap();
        let HostTerms::Term(got) = linear_terms(&x, &runs, "w", Some("b"), out).unwrap() else {
            panic!("the host pass takes these deltas")
        };
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
        // A dense 2-D delta is the tensor path's; an untouched layer nothing.
        let dense = ModelDelta::Owned(HashMap::from([one(
            "w",
            TensorDelta::Dense(randn(&[out, inp], 5)),
        )]));
        let runs = [DeltaRun {
            rows: 9,
            delta: Some(&dense),
        }];
        assert!(matches!(
            linear_terms(&x, &runs, "w", None, out).unwrap(),
            HostTerms::Unsupported
        ));
        assert!(matches!(
            linear_terms(&x, &runs, "other", None, out).unwrap(),
            HostTerms::Nothing
        ));
    }

    /// A masked view's host term (bits read word by word, rows that start
    /// and end inside words) equals the tensor path's expanded s (m ⊙ U),
    /// next to a row of the base and another task's view of the same U.
    #[test]
    fn masked_views_on_the_host_equal_the_tensor_path() {
        use crate::model::BitMask;
        let (out, inp) = (7, 19);
        let u = randn(&[out, inp], 11);
        let view = |seed: u64, scale: f64| {
            let m = BitMask::from_fn(out * inp, |i| {
                !(i as u64 * 2654435761 + seed).is_multiple_of(3)
            });
            ModelDelta::Owned(HashMap::from([(
                "w".to_string(),
                Arc::new(TensorDelta::masked(&u, m, scale).unwrap()),
            )]))
        };
        let (a, b) = (view(1, 1.25), view(2, -0.5));
        let runs = [
            DeltaRun {
                rows: 2,
                delta: Some(&a),
            },
            DeltaRun {
                rows: 1,
                delta: None,
            },
            DeltaRun {
                rows: 3,
                delta: Some(&b),
            },
        ];
        let x = randn(&[1, 6, inp], 12);
        let y = Tensor::zeros((1, 6, out), DType::F32, &Device::Cpu).unwrap();
        let want = add_runs(y, &x, &runs, |d, x| d.linear_term("w", x)).unwrap();
        let HostTerms::Term(got) = linear_terms(&x, &runs, "w", None, out).unwrap() else {
            panic!("the host pass takes masked views")
        };
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
    }
}
