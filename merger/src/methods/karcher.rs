//! The Karcher mean, the Riemannian centre of mass of the models' directions
//! on the unit sphere (mergekit `karcher`).
//!
//! Per tensor, flattened, with the N models vi, equal weights ai = 1/N,
//! ni = ‖vi‖ and ûi = vi / ni:
//!
//! ```text
//! V = {i : ni > tol};  αi = ai / Σ_{V} a   (i in V)
//! u = Σ_V αi ûi / ‖·‖                 (ûfirst in V when that norm is < tol)
//! repeat max_iter times:
//!     θi = arccos(clamp(u · ûi, −1, 1))
//!     T = Σ_{V, θi ≥ tol} αi (θi / sin θi) (ûi − (u · ûi) u)   (log map)
//!     stop when ‖T‖ < tol
//!     u = cos‖T‖ u + sin‖T‖ T/‖T‖;  u = u / ‖u‖             (exp map)
//! θ = (Σi ai ni) · u
//! ```
//!
//! Every model's norm counts in the scale, a zero one too; when every
//! model is zero (none in V) the result is zero. One model returns it
//! unchanged. mergekit's `base_model` is not used.
//!
//! Parameters: `max_iter` (10) ≥ 1, bounded by the configured iteration
//! limit; `tol` (1e-5) ≥ 0.

use candle_core::Tensor;
use rayon::prelude::*;

use super::schema::{DefaultValue, Param, Range, Type};
use super::{MergeMethod, Params, TensorInputs};
use crate::error::Result;
use crate::work::Work;

/// The Karcher mean of the models' directions, scaled by their mean norm.
#[derive(Debug)]
struct Karcher {
    max_iter: u64,
    tol: f64,
}

/// Fixed-point iterations.
static MAX_ITER: Param = Param::global(
    "max_iter",
    Type::Integer,
    DefaultValue::Number(10.0),
    "iterations of the log/exp map update",
)
.range(Range::at_least(1.0))
.work(Work::Iterations);

/// The convergence and zero-norm tolerance.
static TOL: Param = Param::global(
    "tol",
    Type::Scalar,
    DefaultValue::Number(1e-5),
    "stop when the update's norm is below it; norms and angles below it count as zero",
)
.range(Range::NON_NEGATIVE);

/// The parameters of `karcher`.
pub static PARAMS: &[&Param] = &[&MAX_ITER, &TOL];

/// Builds `karcher`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(Karcher {
        max_iter: p.integer(&MAX_ITER)?,
        tol: p.scalar(&TOL)?,
    }))
}

fn norm(v: &[f64]) -> f64 {
    v.par_iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖v‖ of a stored vector, in f64.
fn norm32(v: &[f32]) -> f64 {
    v.par_iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The Karcher mean of `vs` with weights `alphas` (mergekit's
/// `karcher_merge_tensors`). The unit vectors ûi = vi / ni are never
/// stored: every use divides vi by ni on the fly.
fn karcher_mean(vs: &[Vec<f32>], alphas: &[f64], max_iter: u64, tol: f64) -> Vec<f32> {
    let n = vs[0].len();
    let norms: Vec<f64> = vs.iter().map(|v| norm32(v)).collect();
    let valid: Vec<usize> = (0..vs.len()).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let total: f64 = valid.iter().map(|&i| alphas[i]).sum();
    // (model, αi / Σα, 1 / ni) of the valid models.
    let terms: Vec<(&[f32], f64, f64)> = valid
        .iter()
        .map(|&i| (vs[i].as_slice(), alphas[i] / total, 1.0 / norms[i]))
        .collect();
    let mut u: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|j| terms.iter().map(|(v, a, r)| a * r * v[j] as f64).sum())
        .collect();
    let nu = norm(&u);
    if nu < tol {
        let (v, _, r) = terms[0];
        u.par_iter_mut()
            .zip(v)
            .for_each(|(u, x)| *u = r * *x as f64);
    } else {
        u.par_iter_mut().for_each(|x| *x /= nu);
    }
    let mut t = vec![0.0; n];
    for _ in 0..max_iter {
        t.par_iter_mut().for_each(|x| *x = 0.0);
        for &(v, a, r) in &terms {
            let d =
                (r * u.par_iter().zip(v).map(|(u, x)| u * *x as f64).sum::<f64>()).clamp(-1.0, 1.0);
            let theta = d.acos();
            if theta < tol {
                continue;
            }
            let c = a * theta / theta.sin();
            t.par_iter_mut()
                .zip(v.par_iter().zip(&u))
                .for_each(|(t, (x, u))| *t += c * (r * *x as f64 - d * u));
        }
        let nt = norm(&t);
        if nt < tol {
            break;
        }
        let (c, s) = (nt.cos(), nt.sin() / nt);
        u.par_iter_mut()
            .zip(&t)
            .for_each(|(u, t)| *u = c * *u + s * t);
        let nu = norm(&u);
        if nu > tol {
            u.par_iter_mut().for_each(|x| *x /= nu);
        }
    }
    let scale: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
    u.into_par_iter().map(|x| (x * scale) as f32).collect()
}

impl MergeMethod for Karcher {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let out: Vec<f32> = if inputs.experts.len() == 1 {
            inputs.experts[0].to_f32_vec()
        } else {
            let vs = inputs.host_vectors(None);
            let alphas = vec![1.0 / vs.len() as f64; vs.len()];
            karcher_mean(&vs, &alphas, self.max_iter, self.tol)
        };
        inputs.from_host(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn two_directions_meet_on_the_bisector() {
        // v0 = [3, 0], v1 = [0, 1]: the mean direction is [h, h] (the initial guess,
        // already the fixed point) and the scale (3 + 1)/2 = 2.
        let fx = Fixture::new("w", &[2], None, &[&[3., 0.], &[0., 1.]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let s = MergeSpec::new("karcher", None, &["a", "b"]);
        assert_close(&merge1(&s, &fx), &[2. * h, 2. * h], 1e-6);
    }

    #[test]
    fn three_directions_converge_to_the_geodesic_centre() {
        // Directions at angles 0, π/3 and π/2 in a plane: the Karcher mean of equal
        // weights is the mean angle (5π/18), which the arithmetic mean is not.
        let ang = [
            0f64,
            std::f64::consts::FRAC_PI_3,
            std::f64::consts::FRAC_PI_2,
        ];
        let vs: Vec<Vec<f32>> = ang
            .iter()
            .map(|a| vec![a.cos() as f32, a.sin() as f32])
            .collect();
        let refs: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
        let fx = Fixture::new("w", &[2], None, &refs);
        let s = MergeSpec::new("karcher", None, &["a", "b", "c"])
            .with("max_iter", 50.0)
            .with("tol", 1e-9);
        let m = 5.0 * std::f64::consts::PI / 18.0;
        assert_close(&merge1(&s, &fx), &[m.cos() as f32, m.sin() as f32], 1e-6);
    }

    #[test]
    fn zero_models_count_in_the_scale_only() {
        // [0, 0] is not a direction; the scale is (2 + 0)/2 = 1.
        let fx = Fixture::new("w", &[2], None, &[&[2., 0.], &[0., 0.]]);
        let s = MergeSpec::new("karcher", None, &["a", "b"]);
        assert_close(&merge1(&s, &fx), &[1., 0.], 1e-6);
        let zeros = Fixture::new("w", &[2], None, &[&[0., 0.], &[0., 0.]]);
        assert_close(&merge1(&s, &zeros), &[0., 0.], 0.0);
    }

    #[test]
    fn iterations_are_bounded() {
        let s = |k: &str, v: f64| MergeSpec::new("karcher", None, &["a", "b"]).with(k, v);
        assert!(crate::methods::build(&s("max_iter", 0.0)).is_err());
        assert!(crate::methods::build(&s("max_iter", 2.5)).is_err());
        assert!(crate::methods::build(&s("max_iter", 1e12)).is_err());
        assert!(crate::methods::build(&s("tol", -1.0)).is_err());
    }
}
