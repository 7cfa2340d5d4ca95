//! mergekit's generalized task arithmetic on host vectors, for the methods
//! whose sparsification needs a whole tensor in memory (breadcrumbs'
//! ranking, DELLA's per-row ranks):
//!
//! ```text
//! δi = wi · τi′
//! consensus:  s = Σi δi;  mask_i = [sign δi = (+ if s ≥ 0 else −)]
//!             θ = θ0 + λ · Σi δi·mask_i / (Σi wi·mask_i  if normalize)
//! otherwise:  θ = θ0 + λ · Σi δi / (Σi wi  if normalize)
//! ```
//!
//! A divisor with |divisor| < 1e-8 is left undivided (1), as mergekit does;
//! a zero δi never agrees with the elected sign. The fused loop of
//! [`super::MkMerge`] computes the same for the methods that trim or drop
//! chunk by chunk.

use candle_core::Tensor;
use rayon::prelude::*;

use super::consensus::agrees;
use crate::error::{MergeError, Result};
use crate::inputs::TensorInputs;
use crate::methods::Num;

/// mergekit leaves a divisor below this undivided.
const ZERO_DIVISOR: f32 = 1e-8;

/// How the sparsified task vectors are combined.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    /// Keep only the δi that agree with the elected sign.
    pub consensus: bool,
    /// Divide by the (agreeing) weights' sum.
    pub normalize: bool,
    /// λ, applied after the division.
    pub lambda: f32,
}

impl Mix {
    /// θ0 + λ·mix(wi·τi′) for the sparsified task vectors `taus` (each
    /// the length of `base`), entry by entry.
    pub(crate) fn apply(&self, base: &[f32], taus: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
        let plain: f32 = weights.iter().sum();
        let plain_divisor = if self.normalize && plain.abs() >= ZERO_DIVISOR {
            plain
        } else {
            1.0
        };
        let mut out = vec![0f32; base.len()];
        out.par_iter_mut().enumerate().for_each(|(j, o)| {
            let sum: f32 = taus.iter().zip(weights).map(|(t, w)| w * t[j]).sum();
            let mixed = if self.consensus {
                let (mut kept, mut divisor) = (0f32, 0f32);
                for (t, &w) in taus.iter().zip(weights) {
                    let d = w * t[j];
                    if agrees(sum, d) {
                        kept += d;
                        divisor += w;
                    }
                }
                if self.normalize && divisor.abs() >= ZERO_DIVISOR {
                    kept / divisor
                } else {
                    kept
                }
            } else {
                sum / plain_divisor
            };
            *o = base[j] + self.lambda * mixed;
        });
        out
    }
}

impl Mix {
    /// One tensor of a method that sparsifies on the host: θ0 and the task
    /// vectors τi in host memory, `sparsify(i, τi)` in place, then the mix
    /// with the weights resolved for this tensor, moved to the merge device.
    pub(crate) fn merge_host(
        &self,
        inputs: &TensorInputs,
        method: &str,
        weights: &[Num],
        mut sparsify: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<Tensor> {
        let base = inputs
            .base
            .as_ref()
            .ok_or_else(|| MergeError::MissingBase {
                method: method.into(),
            })?
            .to_f32_vec();
        let mut taus = inputs.host_vectors(Some(&base));
        for (i, tau) in taus.iter_mut().enumerate() {
            sparsify(i, tau)?;
        }
        let weights = weights
            .iter()
            .map(|w| Ok(w.at(&inputs.ctx)? as f32))
            .collect::<Result<Vec<_>>>()?;
        inputs.from_host(self.apply(&base, &taus, &weights))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consensus_keeps_the_elected_sign_and_divides_by_its_weights() {
        // τ1 = [1, −2, 0], τ2 = [−3, −1, 2], w = [1, 0.5]:
        // δ1 = [1, −2, 0], δ2 = [−1.5, −0.5, 1]; s = [−0.5, −2.5, 1] → signs [−, −, +]
        // entry 0: δ2 = −1.5 / 0.5 = −3; entry 1: (−2 − 0.5)/1.5; entry 2: 1/0.5 = 2.
        let taus = vec![vec![1., -2., 0.], vec![-3., -1., 2.]];
        let m = Mix {
            consensus: true,
            normalize: true,
            lambda: 1.0,
        };
        let got = m.apply(&[0.; 3], &taus, &[1.0, 0.5]);
        let want = [-3.0, -2.5 / 1.5, 2.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // Without normalising: the kept sum, times λ, on θ0.
        let m = Mix {
            normalize: false,
            lambda: 2.0,
            ..m
        };
        assert_eq!(m.apply(&[1.; 3], &taus, &[1.0, 0.5]), [-2.0, -4.0, 3.0]);
    }

    #[test]
    fn linear_divides_by_the_weights_unless_they_cancel() {
        let taus = vec![vec![2., 4.], vec![4., -2.]];
        let m = Mix {
            consensus: false,
            normalize: true,
            lambda: 1.0,
        };
        // (1·τ1 + 3·τ2)/4 = [14/4, −2/4]
        assert_eq!(m.apply(&[0.; 2], &taus, &[1.0, 3.0]), [3.5, -0.5]);
        // Σw = 0: left undivided.
        assert_eq!(m.apply(&[0.; 2], &taus, &[1.0, -1.0]), [-2.0, 6.0]);
    }
}
