//! Multi-SLERP, barycentric interpolation of any number of models on the
//! hypersphere (mergekit `multislerp`; C. Goddard, "Multi-SLERP").
//!
//! Per tensor, flattened, with vectors vi (the models, or their task vectors
//! vi = θi − θ0 when a base is given) and weights wi (normalised to sum to
//! 1 with `normalize_weights`):
//!
//! ```text
//! ûi = vi / (‖vi‖ + ε)
//! m = Σi wi ûi;   m̂ = m / ‖m‖                 (the tangent point)
//! ti = ûi − (ûi · m̂) m̂;   T = Σi wi ti        (tangent space at m̂)
//! u = m̂ cos(‖T‖ + ε) + T sin(‖T‖ + ε) / (‖T‖ + ε)   (exponential map)
//! θ = (Σi wi ‖vi‖) · u  [+ θ0]
//! ```
//!
//! One model returns it unchanged (with or without a base). Where ‖m‖ < ε
//! (antipodal vectors whose weights cancel), two models fall back to the
//! weighted sum Σ wi vi [+ θ0], and more are refused with an error naming
//! the tensor, as mergekit does.
//!
//! Parameters: per-model `weight` (1; mergekit requires it), any finite
//! number; `normalize_weights` (true); `eps` ε (1e-8) ≥ 0.

use candle_core::Tensor;
use rayon::prelude::*;

use super::schema::{common, DefaultValue, Param, Range, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// Weighted spherical barycentre.
#[derive(Debug)]
struct MultiSlerp {
    weights: Vec<Num>,
    normalize: bool,
    eps: f64,
}

/// `normalize_weights` (on).
static NORMALIZE_WEIGHTS: Param = Param::global(
    "normalize_weights",
    Type::Bool,
    DefaultValue::Bool(true),
    "divide the weights by their sum",
);

/// ε of the normalisations.
static EPS: Param = Param::global(
    "eps",
    Type::Scalar,
    DefaultValue::Number(1e-8),
    "added to the norms before dividing by them",
)
.range(Range::NON_NEGATIVE);

/// The parameters of `multislerp`.
pub static PARAMS: &[&Param] = &[&common::WEIGHT, &NORMALIZE_WEIGHTS, &EPS];

/// Builds `multislerp`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(MultiSlerp {
        weights: p.per_model(&common::WEIGHT)?,
        normalize: p.boolean(&NORMALIZE_WEIGHTS)?,
        eps: p.scalar(&EPS)?,
    }))
}

fn norm(v: &[f32]) -> f64 {
    v.par_iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b)
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum()
}

impl MergeMethod for MultiSlerp {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        if inputs.experts.len() == 1 {
            return inputs.from_host(inputs.experts[0].to_f32_vec());
        }
        let ctx = &inputs.ctx;
        let eps = self.eps;
        let base = inputs.base.as_ref().map(|b| b.to_f32_vec());
        let vs = inputs.host_vectors(base.as_deref());
        let mut w = self
            .weights
            .iter()
            .map(|w| w.at(ctx))
            .collect::<Result<Vec<f64>>>()?;
        if self.normalize {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= s);
        }
        let norms: Vec<f64> = vs.iter().map(|v| norm(v)).collect();
        // ûi = vi / (‖vi‖ + ε) is never stored: wi ûi = (wi / (‖vi‖ + ε)) vi.
        let unit_w: Vec<f64> = w.iter().zip(&norms).map(|(w, n)| w / (n + eps)).collect();
        let weighted = |coef: &[f64]| -> Vec<f32> {
            (0..vs[0].len())
                .into_par_iter()
                .map(|j| {
                    vs.iter()
                        .zip(coef)
                        .map(|(v, c)| c * v[j] as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        };
        let mut m = weighted(&unit_w);
        let mean_norm = norm(&m);
        let mut out = if mean_norm < eps {
            if vs.len() != 2 {
                return Err(MergeError::BadParameter {
                    param: "weight".into(),
                    reason: format!(
                        "in tensor `{}` the weighted sum of the unit vectors is zero (antipodal \
                         vectors whose weights cancel); use other weights",
                        ctx.name
                    ),
                });
            }
            weighted(&w)
        } else {
            // m̂ = m / ‖m‖, then T = Σ wi (ûi − (ûi·m̂) m̂) = m − (Σ wi ûi·m̂) m̂,
            // computed entry by entry (it vanishes up to rounding: m·m̂ = ‖m‖).
            let along: f64 = vs
                .iter()
                .zip(&unit_w)
                .map(|(v, c)| c * dot(v, &m) / mean_norm)
                .sum();
            let scale: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum();
            let t_norm = m
                .par_iter()
                .map(|x| {
                    let t = *x as f64 * (1.0 - along / mean_norm);
                    t * t
                })
                .sum::<f64>()
                .sqrt()
                + eps;
            let (c, s) = (t_norm.cos(), t_norm.sin() / t_norm);
            m.par_iter_mut().for_each(|x| {
                let unit = *x as f64 / mean_norm;
                let t = *x as f64 - along * unit;
                *x = (scale * (unit * c + t * s)) as f32;
            });
            m
        };
        if let Some(b) = &base {
            out.par_iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
        inputs.from_host(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    fn spec(base: Option<&str>, weights: &[f64]) -> MergeSpec {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = MergeSpec::new("multislerp", base, &refs);
        for (m, w) in s.models.iter_mut().zip(weights) {
            m.weight = Some(ParamValue::Number(*w));
        }
        s
    }

    #[test]
    fn two_orthogonal_vectors_meet_halfway() {
        // v0 = [2, 0], v1 = [0, 2], equal weights: m̂ = [h, h], the tangents cancel
        // (T = 0), θ = (2·½ + 2·½)·m̂ = [√2, √2] (ε shifts cos/sin by ~1e-8).
        let fx = Fixture::new("w", &[2], None, &[&[2., 0.], &[0., 2.]]);
        let r = std::f32::consts::SQRT_2;
        assert_close(&merge1(&spec(None, &[1., 1.]), &fx), &[r, r], 1e-6);
    }

    #[test]
    fn three_unit_axes_with_weights() {
        // v = e1, e2, e3 (unit norms), w = [0.5, 0.25, 0.25]: m = w, ‖m‖ = √0.375,
        // m̂ = w/‖m‖; ti = ei − (wi/‖m‖) m̂; T = Σ wi ti = m − ‖m‖ m̂ = 0;
        // so u = m̂ (cos ε ≈ 1) and the scale Σ wi·1 = 1.
        let fx = Fixture::new(
            "w",
            &[3],
            None,
            &[&[1., 0., 0.], &[0., 1., 0.], &[0., 0., 1.]],
        );
        let mn = 0.375f32.sqrt();
        let want = [0.5 / mn, 0.25 / mn, 0.25 / mn];
        assert_close(&merge1(&spec(None, &[2., 1., 1.]), &fx), &want, 1e-6);
        // Without normalising, the weights scale the norm: Σ wi ‖vi‖ = 4 and
        // m̂ is the same direction, ‖T‖ = 0 again.
        let raw =
            spec(None, &[2., 1., 1.]).with_value("normalize_weights", ParamValue::Bool(false));
        let want4: Vec<f32> = want.iter().map(|x| 4. * x).collect();
        assert_close(&merge1(&raw, &fx), &want4, 1e-5);
    }

    #[test]
    fn task_vectors_over_a_base_and_one_model() {
        // θ0 = [1, 1]; τ = [2, 0], [0, 2] → θ0 + [√2, √2].
        let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[3., 1.], &[1., 3.]]);
        let r = std::f32::consts::SQRT_2;
        assert_close(
            &merge1(&spec(Some("base"), &[1., 1.]), &fx),
            &[1. + r, 1. + r],
            1e-6,
        );
        let one = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[3., 1.]]);
        assert_close(&merge1(&spec(Some("base"), &[1.]), &one), &[3., 1.], 0.0);
    }

    #[test]
    fn antipodal_vectors() {
        // Two antipodal vectors with equal weights: the weighted sum, 0.
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[-1., 0.]]);
        assert_close(&merge1(&spec(None, &[1., 1.]), &fx), &[0., 0.], 0.0);
        // Three whose unit vectors cancel: refused, naming the tensor.
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[-1., 0.], &[0., 0.]]);
        let m = crate::methods::build(&spec(None, &[1., 1., 1.])).unwrap().1;
        let err = m.merge(&fx.inputs()).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("antipodal"), "{err}");
    }
}
