//! mergekit's generalized task arithmetic, per tensor:
//! θ = θ0 + λ·(Σi δi [·mask_i]) / divisor with δi = wi·τi′, τi′ the task
//! vector trimmed by magnitude ([`super::trim`], mergekit's `ties`) or
//! dropped out ([`super::dropout`], `dare_linear`, `dare_ties` and
//! FusionBench's `dare` with a linear combine) or whole; with the sign
//! consensus, mask_i keeps the δi of the sign elected by Σi δi
//! ([`super::consensus`]) and the divisor, when normalising, is Σi wi·mask_i
//! (else Σi wi; 1 without normalising, or where |divisor| < 1e-8).
//!
//! On the CPU one fused loop over the stored chunks ([`Source::fill`]);
//! elsewhere candle ops, the trim masks drawn on the CPU.

use candle_core::{DType, Tensor};

use super::consensus::{agreement, agrees, elected_tensor};
use super::dropout::Dropout;
use super::source::{Chunk, Source};
use super::trim::{keep_mask, kept, magnitude_keeps, Keep};
use crate::error::Result;
use crate::inputs::TensorInputs;
use crate::kernels::multiversion;
use crate::methods::{MergeMethod, Num};
use crate::select::{abs_key, key_value};

/// mergekit leaves a divisor below this undivided.
const ZERO_DIVISOR: f32 = 1e-8;

/// One tensor's resolved mergekit mixing parameters.
struct Mixing {
    weights: Vec<f32>,
    keeps: Vec<Keep>,
    consensus: bool,
    normalize: bool,
    lambda: f32,
}

multiversion!(
    /// The fused CPU loop of mergekit's generalized task arithmetic, task
    /// by task over contiguous slices.
    fn mk_kernel => mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32])
);

#[inline(always)]
fn mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32]) {
    let n = c.len;
    let Chunk {
        base,
        tau,
        sum,
        acc,
        aux,
        ..
    } = c;
    let (sum, mixed, divisor, out) = (&mut sum[..n], &mut acc[..n], &mut aux[..n], &mut out[..n]);
    sum.fill(0.0);
    // δi = wi·(kept τi), in place.
    for (t, (keep, &w)) in tau.iter_mut().zip(m.keeps.iter().zip(&m.weights)) {
        let t = &mut t[..n];
        match keep {
            Keep::All => t.iter_mut().for_each(|v| *v *= w),
            Keep::Nothing => t.fill(0.0),
            Keep::AtLeast(k) => {
                let k = (*k).min(i32::MAX as u32) as i32;
                t.iter_mut()
                    .for_each(|v| *v = if abs_key(*v) as i32 >= k { w * *v } else { 0.0 });
            }
            Keep::Ties { before, .. } => {
                let mut seen = before[chunk];
                for v in t.iter_mut() {
                    *v = if kept(keep, *v, &mut seen) {
                        w * *v
                    } else {
                        0.0
                    };
                }
            }
        }
        sum.iter_mut().zip(t.iter()).for_each(|(s, v)| *s += v);
    }
    let b = &base[..n];
    if m.consensus {
        // Elected sign: + where Σ δ ≥ 0; keep the δi of that sign.
        mixed.fill(0.0);
        divisor.fill(0.0);
        for (t, &w) in tau.iter().zip(&m.weights) {
            let lanes = mixed
                .iter_mut()
                .zip(divisor.iter_mut())
                .zip(t[..n].iter().zip(sum.iter()));
            lanes.for_each(|((mx, dv), (&d, &s))| {
                let agree = agrees(s, d);
                *mx += if agree { d } else { 0.0 };
                *dv += if agree { w } else { 0.0 };
            });
        }
        let lanes = out.iter_mut().zip(b).zip(mixed.iter().zip(divisor.iter()));
        if m.normalize {
            lanes.for_each(|((o, &b), (&mx, &dv))| {
                *o = b + m.lambda * (mx / if dv.abs() < ZERO_DIVISOR { 1.0 } else { dv });
            });
        } else {
            lanes.for_each(|((o, &b), (&mx, _))| *o = b + m.lambda * mx);
        }
    } else {
        let plain: f32 = m.weights.iter().sum();
        let divisor = if !m.normalize || plain.abs() < ZERO_DIVISOR {
            1.0
        } else {
            plain
        };
        for ((o, &b), &s) in out.iter_mut().zip(b).zip(sum.iter()) {
            *o = b + m.lambda * (s / divisor);
        }
    }
}

/// The same in candle ops.
fn mk_candle(
    src: &Source,
    base: Tensor,
    taus: &[Tensor],
    m: &Mixing,
) -> candle_core::Result<Tensor> {
    let mut deltas = Vec::with_capacity(taus.len());
    for (i, (t, keep)) in taus.iter().zip(&m.keeps).enumerate() {
        let kept = match keep {
            Keep::All => t.clone(),
            Keep::Nothing => t.zeros_like()?,
            Keep::AtLeast(k) => t.mul(&t.abs()?.ge(key_value(*k))?.to_dtype(DType::F32)?)?,
            Keep::Ties { .. } => t.mul(&keep_mask(src, keep, i)?)?,
        };
        deltas.push((kept * m.weights[i] as f64)?);
    }
    let mut sum = deltas[0].clone();
    for d in &deltas[1..] {
        sum = (sum + d)?;
    }
    let mixed = if m.consensus {
        let elected = elected_tensor(&sum)?;
        let mut mixed = base.zeros_like()?;
        let mut divisor = base.zeros_like()?;
        for (d, &w) in deltas.iter().zip(&m.weights) {
            let mask = agreement(d, &elected)?;
            mixed = (mixed + d.mul(&mask)?)?;
            divisor = (divisor + (mask * w as f64)?)?;
        }
        if m.normalize {
            let small = divisor.abs()?.lt(ZERO_DIVISOR)?;
            let divisor = small.where_cond(&divisor.ones_like()?, &divisor)?;
            (mixed / divisor)?
        } else {
            mixed
        }
    } else if m.normalize {
        let s: f32 = m.weights.iter().sum();
        (sum / if s.abs() < ZERO_DIVISOR {
            1.0
        } else {
            s as f64
        })?
    } else {
        sum
    };
    base + (mixed * m.lambda as f64)?
}

/// mergekit's generalized task arithmetic: `ties` (magnitude trim +
/// consensus), `dare_linear` and `dare_ties` (Bernoulli dropout, with and
/// without consensus); FusionBench's `dare` with a linear combine uses it too.
#[derive(Debug)]
pub(crate) struct MkMerge {
    pub weights: Vec<Num>,
    /// Per-model magnitude-trim densities (`ties`), or none.
    pub trim: Option<Vec<Num>>,
    pub dropout: Option<Dropout>,
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: Num,
}

impl MkMerge {
    /// Merges one tensor, with the fused CPU loop or candle ops.
    pub(crate) fn merge_with(&self, inputs: &TensorInputs, fused: bool) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let dropout = self
            .dropout
            .as_ref()
            .map(|d| d.for_tensor(inputs))
            .transpose()?
            .flatten();
        let src = Source::new(inputs, dropout)?;
        let weights = self
            .weights
            .iter()
            .map(|w| Ok(w.at(ctx)? as f32))
            .collect::<Result<Vec<_>>>()?;
        let keeps = match &self.trim {
            None => vec![Keep::All; weights.len()],
            Some(ds) => {
                let ds = ds.iter().map(|d| d.at(ctx)).collect::<Result<Vec<_>>>()?;
                magnitude_keeps(&src, &ds)
            }
        };
        let m = Mixing {
            weights,
            keeps,
            consensus: self.consensus,
            normalize: self.normalize,
            lambda: self.lambda.at(ctx)? as f32,
        };
        if fused {
            src.fill(|k, c, o| mk_kernel(&m, k, c, o))
        } else {
            let (base, taus) = (src.base_tensor()?, src.task_vectors()?);
            mk_candle(&src, base, &taus, &m).map_err(|e| inputs.err(e))
        }
    }
}

impl MergeMethod for MkMerge {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        self.merge_with(inputs, inputs.device.is_cpu())
    }
}
