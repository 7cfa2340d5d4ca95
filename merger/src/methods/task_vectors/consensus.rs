//! Sign consensus: which entries of the task vectors agree with a sign
//! elected per entry, so that opposite updates do not cancel.
//! - TIES (FusionBench): s = sign(Σi trimmed τi), the scope's majority sign
//!   where that sum is 0 ([`elect`]); the entries kept are
//!   `where(s > 0, τ > 0, τ < 0)` ([`picked`]), so where s is still 0 the
//!   negative entries are.
//! - mergekit (`ties`, `dare_ties`): + where Σi δi ≥ 0, else −; the δi of
//!   that sign agree, zeros never do ([`agrees`]).
//!
//! The scalar forms are branch-free and inlined into the fused loops (so
//! they vectorise); the tensor forms are the same tests in candle ops.

use candle_core::{DType, Tensor};

/// FusionBench's elected sign of one entry from s = Σi trimmed τi: the sign
/// of s, or `majority` where s is 0 (or NaN).
#[inline(always)]
pub(crate) fn elect(s: f32, majority: f32) -> f32 {
    if s > 0.0 {
        1.0
    } else if s < 0.0 {
        -1.0
    } else {
        majority
    }
}

/// FusionBench's selection `where(s > 0, τ > 0, τ < 0)` for the elected
/// sign `sign` and an entry `v`, branchless.
#[inline(always)]
pub(crate) fn picked(sign: f32, v: f32) -> bool {
    let up = sign > 0.0;
    (up & (v > 0.0)) | (!up & (v < 0.0))
}

/// mergekit's consensus: whether δ has the sign elected by s = Σi δi (+
/// where s ≥ 0, else −); a zero δ never agrees.
#[inline(always)]
pub(crate) fn agrees(s: f32, d: f32) -> bool {
    let up = s >= 0.0;
    (up & (d > 0.0)) | (!up & (d < 0.0))
}

/// [`elect`] over a tensor of sums.
pub(crate) fn elect_tensor(s: &Tensor, majority: f32) -> candle_core::Result<Tensor> {
    let sign = s.sign()?;
    &sign + (sign.eq(0f32)?.to_dtype(DType::F32)? * majority as f64)?
}

/// mergekit's elected signs over a tensor of sums: 1 where s ≥ 0, else −1.
pub(crate) fn elected_tensor(s: &Tensor) -> candle_core::Result<Tensor> {
    s.ge(0f32)?.to_dtype(DType::F32)?.affine(2.0, -1.0)
}

/// [`agrees`] over tensors, as 0/1 f32: sign(δ) equals the elected sign
/// (from [`elected_tensor`]).
pub(crate) fn agreement(d: &Tensor, elected: &Tensor) -> candle_core::Result<Tensor> {
    d.sign()?.eq(elected)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn fusionbench_elects_the_sum_sign_then_the_majority() {
        assert_eq!(elect(0.25, -1.0), 1.0);
        assert_eq!(elect(-3.0, 1.0), -1.0);
        assert_eq!(elect(0.0, -1.0), -1.0);
        assert_eq!(elect(-0.0, 1.0), 1.0);
        assert_eq!(elect(f32::NAN, 0.0), 0.0);
        // Positive sign: the positive entries; otherwise (0 included) the
        // negative ones; a zero entry never.
        assert!(picked(1.0, 0.5) && !picked(1.0, -0.5));
        assert!(picked(-1.0, -0.5) && !picked(-1.0, 0.5));
        assert!(picked(0.0, -0.5) && !picked(0.0, 0.5));
        assert!(!picked(1.0, 0.0) && !picked(-1.0, 0.0));
    }

    #[test]
    fn mergekit_elects_plus_on_a_zero_sum_and_zeros_never_agree() {
        assert!(agrees(0.0, 0.1) && !agrees(0.0, -0.1));
        assert!(agrees(-2.0, -0.1) && !agrees(-2.0, 0.1));
        assert!(!agrees(1.0, 0.0) && !agrees(-1.0, 0.0));
    }

    #[test]
    fn tensor_forms_match_the_scalar_ones() {
        let sums = [0.5f32, -1.0, 0.0, -0.0, 2.0];
        let deltas = [0.25f32, 0.5, -0.5, 0.0, -1.0];
        let s = Tensor::new(&sums, &Device::Cpu).unwrap();
        let d = Tensor::new(&deltas, &Device::Cpu).unwrap();
        let fb = elect_tensor(&s, -1.0).unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = sums.iter().map(|&x| elect(x, -1.0)).collect();
        assert_eq!(fb, want);
        let elected = elected_tensor(&s).unwrap();
        let mask = agreement(&d, &elected).unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = sums
            .iter()
            .zip(&deltas)
            .map(|(&s, &d)| f32::from(u8::from(agrees(s, d))))
            .collect();
        assert_eq!(mask, want);
    }
}
