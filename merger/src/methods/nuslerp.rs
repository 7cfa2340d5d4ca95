//! NuSLERP, spherical interpolation by weights, optionally of task vectors
//! and row by row (mergekit `nuslerp`).
//!
//! Exactly two models v0, v1 with weights w0, w1 and an optional base θ0;
//! t = w1 / (w0 + w1) (0.5 when |w0 + w1| < 1e-6). With a base the task
//! vectors are interpolated: θ = θ0 + slerp(t, v0 − θ0, v1 − θ0); without
//! one, θ = slerp(t, v0, v1). Per vector:
//!
//! ```text
//! ûi = vi / max(‖vi‖, 1e-7);   Ω = arccos(clamp(û0 · û1, −1, 1))
//! slerp = [sin((1 − t) Ω) v0 + sin(t Ω) v1] / sin Ω,
//!         or (1 − t) v0 + t v1 where |sin Ω| < 1e-8
//! ```
//!
//! The vectors: with `nuslerp_flatten` (the default) the whole tensor is one
//! vector; without it, each line along the last dimension (the rows of a
//! matrix), or along the first (its columns) with `nuslerp_row_wise`, as
//! mergekit's `dim` reads those options. A 1-D tensor is one vector either
//! way.
//!
//! Parameters: per-model `weight` (1; mergekit requires it), any finite
//! number; `nuslerp_flatten` (true), `nuslerp_row_wise` (false).

use candle_core::Tensor;
use rayon::prelude::*;

use super::lines::Lines;
use super::schema::{common, DefaultValue, Param, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::Result;

/// Below this |w0 + w1|, t = 0.5.
const ZERO_SUM: f64 = 1e-6;
/// Norms are floored here before normalising.
const NORM_FLOOR: f64 = 1e-7;
/// Below this |sin Ω| the vectors are collinear: interpolate linearly.
const COLLINEAR: f64 = 1e-8;

/// Slerp of two models (or of their task vectors) by their weights.
#[derive(Debug)]
struct NuSlerp {
    weights: Vec<Num>,
    flatten: bool,
    row_wise: bool,
}

/// `nuslerp_flatten` (on): the whole tensor is one vector.
static FLATTEN: Param = Param::global(
    "nuslerp_flatten",
    Type::Bool,
    DefaultValue::Bool(true),
    "interpolate each tensor as one flat vector (false: row by row, or column by column with \
     nuslerp_row_wise)",
);

/// `nuslerp_row_wise` (off): lines along the first dimension.
static ROW_WISE: Param = Param::global(
    "nuslerp_row_wise",
    Type::Bool,
    DefaultValue::Bool(false),
    "without flattening, interpolate the vectors along the first dimension (columns) instead \
     of the last (rows)",
);

/// The parameters of `nuslerp`.
pub static PARAMS: &[&Param] = &[&common::WEIGHT, &FLATTEN, &ROW_WISE];

/// Builds `nuslerp`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(NuSlerp {
        weights: p.per_model(&common::WEIGHT)?,
        flatten: p.boolean(&FLATTEN)?,
        row_wise: p.boolean(&ROW_WISE)?,
    }))
}

/// Slerp of `v0` (overwritten with the result) towards `v1` at `t`.
fn slerp_into(t: f64, v0: &mut [f32], v1: &[f32]) {
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let (n0, n1) = (norm(v0).max(NORM_FLOOR), norm(v1).max(NORM_FLOOR));
    let cos: f64 = v0
        .iter()
        .zip(v1)
        .map(|(a, b)| (*a as f64 / n0) * (*b as f64 / n1))
        .sum();
    let omega = cos.clamp(-1.0, 1.0).acos();
    let sin = omega.sin();
    let (c0, c1) = if sin.abs() < COLLINEAR {
        (1.0 - t, t)
    } else {
        (((1.0 - t) * omega).sin() / sin, (t * omega).sin() / sin)
    };
    for (a, b) in v0.iter_mut().zip(v1) {
        *a = (c0 * *a as f64 + c1 * *b as f64) as f32;
    }
}

impl MergeMethod for NuSlerp {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let (w0, w1) = (self.weights[0].at(ctx)?, self.weights[1].at(ctx)?);
        let t = if (w0 + w1).abs() < ZERO_SUM {
            0.5
        } else {
            w1 / (w0 + w1)
        };
        let base = inputs.base.as_ref().map(|b| b.to_f32_vec());
        let mut vs = inputs.host_vectors(base.as_deref());
        let v1 = vs.pop().expect("two models");
        let mut v0 = vs.pop().expect("two models");
        let shape = inputs.shape();
        let lines = if self.flatten || shape.len() < 2 {
            Lines::whole(v0.len())
        } else if self.row_wise {
            Lines::along(shape, 0)
        } else {
            Lines::along(shape, shape.len() - 1)
        };
        lines.for_each_mut(&mut v0, |line, a| {
            slerp_into(t, a, &lines.gather(&v1, line))
        });
        if let Some(b) = &base {
            v0.par_iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
        inputs.from_host(v0)
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    fn spec(base: Option<&str>, w0: f64, w1: f64) -> MergeSpec {
        let mut s = MergeSpec::new("nuslerp", base, &["a", "b"]);
        s.models[0].weight = Some(ParamValue::Number(w0));
        s.models[1].weight = Some(ParamValue::Number(w1));
        s
    }

    #[test]
    fn quarter_circle_by_weights() {
        // v0 = [1, 0], v1 = [0, 1]: Ω = π/2; weights 1 and 2 → t = 2/3:
        // [sin(π/6), sin(π/3)] = [0.5, 0.8660254].
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[0., 1.]]);
        assert_close(&merge1(&spec(None, 1., 2.), &fx), &[0.5, 0.8660254], 1e-6);
        // Weights that cancel: t = 0.5.
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&merge1(&spec(None, 1., -1.), &fx), &[h, h], 1e-6);
    }

    #[test]
    fn task_vectors_with_a_base_and_collinear_lerp() {
        // θ0 = [1, 1]; τ0 = [2, 0], τ1 = [0, 2], t = 0.5: θ0 + 2·[h, h].
        let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[3., 1.], &[1., 3.]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert_close(
            &merge1(&spec(Some("base"), 1., 1.), &fx),
            &[1. + 2. * h, 1. + 2. * h],
            1e-6,
        );
        // Collinear vectors: linear interpolation, t = 0.25.
        let fx = Fixture::new("w", &[2], None, &[&[1., 2.], &[3., 6.]]);
        assert_close(&merge1(&spec(None, 3., 1.), &fx), &[1.5, 3.], 1e-6);
    }

    #[test]
    fn rows_and_columns() {
        // Rows: [1, 0] → [0, 1] and [2, 0] → [0, 2] (each Ω = π/2); t = 0.5.
        let fx = Fixture::new("w", &[2, 2], None, &[&[1., 0., 2., 0.], &[0., 1., 0., 2.]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let rows = spec(None, 1., 1.).with_value("nuslerp_flatten", ParamValue::Bool(false));
        assert_close(&merge1(&rows, &fx), &[h, h, 2. * h, 2. * h], 1e-6);
        // Flattened, the same tensors are one pair of orthogonal vectors too.
        assert_close(
            &merge1(&spec(None, 1., 1.), &fx),
            &[h, h, 2. * h, 2. * h],
            1e-6,
        );
        // Columns: v0's columns are [1, 2] and [0, 0], v1's [0, 0] and [1, 2]:
        // Ω = π/2 for both (a zero vector is orthogonal), so each is scaled by sin(π/4)/1.
        let cols = rows
            .clone()
            .with_value("nuslerp_row_wise", ParamValue::Bool(true));
        assert_close(&merge1(&cols, &fx), &[h, h, 2. * h, 2. * h], 1e-6);
        // Where rows and columns differ: v0 = [[1, 0], [0, 1]], v1 = [[1, 0], [1, 0]].
        let fx = Fixture::new("w", &[2, 2], None, &[&[1., 0., 0., 1.], &[1., 0., 1., 0.]]);
        // Rows: row 0 identical → [1, 0]; row 1 [0, 1] → [1, 0] at Ω = π/2 → [h, h].
        assert_close(&merge1(&rows, &fx), &[1., 0., h, h], 1e-6);
        // Columns: col 0 [1, 0] vs [1, 1] (Ω = π/4), col 1 [0, 1] vs [0, 0] (Ω = π/2).
        let q = std::f64::consts::FRAC_PI_4;
        let (a, b) = (
            ((q / 2.).sin() / q.sin()) as f32,
            std::f32::consts::FRAC_1_SQRT_2,
        );
        assert_close(&merge1(&cols, &fx), &[2. * a, 0., a, b], 1e-6);
    }

    #[test]
    fn exactly_two_models() {
        assert!(crate::methods::build(&MergeSpec::new("nuslerp", None, &["a"])).is_err());
        assert!(crate::methods::build(&MergeSpec::new("nuslerp", None, &["a", "b", "c"])).is_err());
        assert!(
            crate::methods::build(&MergeSpec::new("nuslerp", Some("base"), &["a", "b"])).is_ok()
        );
    }
}
