//! Arcee Fusion, keep the changes that matter most by divergence-weighted
//! magnitude (mergekit `arcee_fusion`).
//!
//! Exactly one model θ1 and a base θ0; per tensor, with rows along the last
//! dimension (a 1-D tensor is one row):
//!
//! ```text
//! p = softmax(θ1 row) + 1e-8,  q = softmax(θ0 row) + 1e-8
//! KL_row = Σ p log(p / q)
//! s = |θ1 − θ0| · KL_row                      (importance of every entry)
//! Q(x) = sorted(s)[⌊x·(n − 1)⌋]
//! threshold = Q(0.5) + 1.5 · (Q(0.75) − Q(0.25))
//! θ = θ0 + (θ1 − θ0) ⊙ [s ≥ threshold]
//! ```
//!
//! The quantiles are exact. mergekit computes them on a random sample of
//! 1,000,000 entries for larger tensors (so its result varies from run to
//! run there); on tensors up to a million entries both agree.
//!
//! No parameters.

use candle_core::Tensor;
use rayon::prelude::*;

use super::schema::Param;
use super::{MergeMethod, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// Added to both softmaxes before the divergence.
const EPS: f64 = 1e-8;

/// Base plus the important part of the expert's change.
#[derive(Debug)]
struct ArceeFusion;

/// The parameters of `arcee_fusion`: none.
pub static PARAMS: &[&Param] = &[];

/// Builds `arcee_fusion`.
pub fn build(_: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(ArceeFusion))
}

/// softmax(x) + ε of one row.
fn softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
    let e: Vec<f64> = x.iter().map(|v| (*v as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s + EPS).collect()
}

/// sorted(s)[⌊q·(n − 1)⌋] for each q, without sorting everything: one copy
/// of `s`, partitioned once per quantile.
fn quantiles<const N: usize>(s: &[f64], qs: [f64; N]) -> [f64; N] {
    let mut v = s.to_vec();
    let last = (v.len() - 1) as f64;
    qs.map(|q| {
        *v.select_nth_unstable_by((q * last) as usize, f64::total_cmp)
            .1
    })
}

impl MergeMethod for ArceeFusion {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let base = inputs
            .base
            .as_ref()
            .ok_or_else(|| MergeError::MissingBase {
                method: "arcee_fusion".into(),
            })?;
        let (b, e) = (base.to_f32_vec(), inputs.experts[0].to_f32_vec());
        let shape = inputs.shape();
        let row = shape.last().copied().unwrap_or(1).max(1);
        let mut s = vec![0f64; b.len()];
        s.par_chunks_mut(row)
            .zip(b.par_chunks(row).zip(e.par_chunks(row)))
            .for_each(|(s, (b, e))| {
                let (p, q) = (softmax(e), softmax(b));
                let kl: f64 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
                for ((s, b), e) in s.iter_mut().zip(b).zip(e) {
                    *s = (*e as f64 - *b as f64).abs() * kl;
                }
            });
        let out: Vec<f32> = if s.is_empty() {
            b
        } else {
            let [q1, median, q3] = quantiles(&s, [0.25, 0.5, 0.75]);
            let threshold = median + 1.5 * (q3 - q1);
            b.par_iter()
                .zip(&e)
                .zip(&s)
                .map(|((b, e), s)| if *s >= threshold { b + (e - b) } else { *b })
                .collect()
        };
        inputs.from_host(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn keeps_the_outlying_changes() {
        // One row of 8 (KL > 0 scales every entry alike): |τ| = [0, 0, 0, 0, 0, 0, 0.1, 2]
        // sorted: Q(0.25) = s[1] = 0, Q(0.5) = s[3] = 0, Q(0.75) = s[5] = 0 → threshold 0:
        // every entry passes (s ≥ 0), θ = θ1.
        let base = [0f32; 8];
        let expert = [0., 0., 0., 0., 0., 0., 0.1, 2.];
        let fx = Fixture::new("w", &[8], Some(&base), &[&expert]);
        let s = MergeSpec::new("arcee_fusion", Some("base"), &["x"]);
        assert_close(&merge1(&s, &fx), &expert, 0.0);
        // |τ| = 1..8 (ranks 0..7): Q(0.25) = 2, Q(0.5) = 4, Q(0.75) = 6 (times KL):
        // threshold (4 + 1.5·4)·KL = 10·KL → nothing passes; θ = θ0.
        let expert: Vec<f32> = (1..=8).map(|x| x as f32).collect();
        let fx = Fixture::new("w", &[8], Some(&base), &[&expert]);
        assert_close(&merge1(&s, &fx), &base, 0.0);
        // One large change among small ones: |τ| = [1, 1, 1, 1, 1, 1, 1, 9] → Q = 1, 1, 1:
        // threshold 1·KL; every entry has s ≥ KL, all kept.
        let expert = [1., 1., 1., 1., 1., 1., 1., 9.];
        let fx = Fixture::new("w", &[8], Some(&base), &[&expert]);
        assert_close(&merge1(&s, &fx), &expert, 0.0);
    }

    #[test]
    fn rows_weigh_by_their_divergence() {
        // Two rows of 2: row 0 changes from [0, 0] to [1, −1] (KL = k > 0), row 1 from
        // [0, 0] to [1, 1] (the same softmax: KL = 0, importance 0).
        // Sorted s = [0, 0, k, k]: Q(.25) = 0, Q(.5) = 0, Q(.75) = k → threshold 1.5k,
        // which no entry reaches: θ = θ0.
        let base = [0f32; 4];
        let fx = Fixture::new("w", &[2, 2], Some(&base), &[&[1., -1., 1., 1.]]);
        let s = MergeSpec::new("arcee_fusion", Some("base"), &["x"]);
        assert_close(&merge1(&s, &fx), &base, 0.0);
        // Three rows, two unchanged: sorted s = [0, 0, 0, 0, k, k] → Q = s[1], s[2], s[3] = 0
        // → threshold 0: every entry passes, θ = θ1 (the unchanged rows add nothing).
        let fx = Fixture::new("w", &[3, 2], Some(&[0.; 6]), &[&[1., -1., 0., 0., 0., 0.]]);
        assert_close(&merge1(&s, &fx), &[1., -1., 0., 0., 0., 0.], 0.0);
    }

    #[test]
    fn exactly_one_model_and_a_base() {
        assert!(crate::methods::build(&MergeSpec::new("arcee_fusion", None, &["x"])).is_err());
        assert!(
            crate::methods::build(&MergeSpec::new("arcee_fusion", Some("b"), &["x", "y"])).is_err()
        );
        let s = MergeSpec::new("arcee_fusion", Some("b"), &["x"]).with("density", 0.5);
        assert!(crate::methods::build(&s).is_err(), "no parameters");
    }
}
