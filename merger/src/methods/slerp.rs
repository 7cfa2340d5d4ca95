//! Spherical linear interpolation (FusionBench and mergekit `slerp`; Shoemake
//! 1985, as used for model merging by mergekit and FusionBench).
//!
//! Exactly two models: v0 = models[0] (the result at t = 0) and v1 =
//! models[1] (at t = 1); a base model, if given, is not used (mergekit's
//! `base_model` is one of the two endpoints and the spec importer puts it
//! first). Per tensor, flattened, in f32:
//!
//! - v̂ = v / ‖v‖ when ‖v‖ > ε, else v unchanged (both references skip the
//!   normalisation of near-zero tensors rather than dividing by ε);
//! - c = v̂0 · v̂1;
//! - |c| > `dot_threshold`: θ = (1 − t) v0 + t v1 (nearly collinear: lerp);
//! - otherwise Ω = arccos c and
//!   θ = [sin((1 − t) Ω) v0 + sin(t Ω) v1] / sin Ω, on the unnormalised v0, v1.
//!
//! Parameters:
//! - `t` (default 0.5; mergekit requires it) in [0, 1], per-tensor
//!   resolvable: mergekit configs give gradients and filter lists;
//! - `dot_threshold` (FusionBench also `DOT_THRESHOLD`, default 0.9995) in
//!   [0, 1];
//! - `epsilon` (default 1e-8) ≥ 0.
//!
//! The dot products come from one 2×2 Gram matrix (a matmul on the merge
//! device); the result is one linear combination of the stored tensors.

use candle_core::{Device, Tensor};

use super::schema::{DefaultValue, Param, Range, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::Result;
use crate::kernels::linear_combination_as;
use runtime::checkpoint::TensorRef;

/// Slerp between the two experts.
#[derive(Debug)]
struct Slerp {
    t: Num,
    dot_threshold: f64,
    epsilon: f64,
}

/// The interpolation factor t.
static T: Param = Param::global(
    "t",
    Type::Number,
    DefaultValue::Number(0.5),
    "interpolation factor: 0 gives the first model, 1 the second",
)
.range(Range::UNIT);

/// Above this |cos|, plain linear interpolation.
static DOT_THRESHOLD: Param = Param::global(
    "dot_threshold",
    Type::Scalar,
    DefaultValue::Number(0.9995),
    "above this |cos| of the two tensors, interpolate linearly",
)
.aliases(&["DOT_THRESHOLD"])
.range(Range::UNIT);

/// Guard of the normalisation.
static EPSILON: Param = Param::global(
    "epsilon",
    Type::Scalar,
    DefaultValue::Number(1e-8),
    "norms below it are not divided by",
)
.range(Range::NON_NEGATIVE);

/// The parameters of `slerp`.
pub static PARAMS: &[&Param] = &[&T, &DOT_THRESHOLD, &EPSILON];

/// Builds `slerp`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let t = p.number(&T)?;
    let dot_threshold = p.scalar(&DOT_THRESHOLD)?;
    let epsilon = p.scalar(&EPSILON)?;
    Ok(Box::new(Slerp {
        t,
        dot_threshold,
        epsilon,
    }))
}

impl Slerp {
    /// The coefficients (c0, c1) of θ = c0 v0 + c1 v1, from the Gram matrix
    /// entries v0·v0, v0·v1 and v1·v1.
    fn coefficients(&self, t: f64, v00: f64, v01: f64, v11: f64) -> (f64, f64) {
        let norm = |sq: f64| {
            let n = sq.max(0.0).sqrt();
            if n > self.epsilon {
                n
            } else {
                1.0
            }
        };
        let c = v01 / (norm(v00) * norm(v11));
        if c.abs() > self.dot_threshold {
            return (1.0 - t, t);
        }
        let omega = c.acos();
        let s = omega.sin();
        (((1.0 - t) * omega).sin() / s, (t * omega).sin() / s)
    }
}

/// The Gram matrix [xi · xj] of the flattened tensors, in f32.
fn gram(xs: &[TensorRef], device: &Device) -> candle_core::Result<Vec<Vec<f32>>> {
    let v: Vec<Tensor> = xs
        .iter()
        .map(|x| x.to_f32_tensor(device)?.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let m = Tensor::stack(&v, 0)?;
    m.matmul(&m.t()?)?.to_vec2::<f32>()
}

impl MergeMethod for Slerp {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let t = self.t.at(&inputs.ctx)?;
        let pair = [inputs.experts[0], inputs.experts[1]];
        let gram = gram(&pair, inputs.device).map_err(|e| inputs.err(e))?;
        let (c0, c1) =
            self.coefficients(t, gram[0][0] as f64, gram[0][1] as f64, gram[1][1] as f64);
        linear_combination_as(
            &pair,
            &[c0 as f32, c1 as f32],
            inputs.device,
            inputs.out_dtype,
        )
        .map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, build, merge1, merge_typed, Fixture};
    use crate::spec::{Dialect, FilterEntry, MergeSpec, ParamValue};

    const H: f32 = std::f32::consts::FRAC_1_SQRT_2;

    fn spec(t: f64) -> MergeSpec {
        MergeSpec::new("slerp", None, &["a", "b"]).with("t", t)
    }

    #[test]
    fn orthogonal_unit_vectors_at_half() {
        // Ω = π/2, sin Ω = 1: sin(π/4)·[1, 0] + sin(π/4)·[0, 1] = [√2/2, √2/2]
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[0., 1.]]);
        assert_close(&merge1(&spec(0.5), &fx), &[H, H], 1e-6);
    }

    #[test]
    fn unnormalised_magnitudes_are_kept() {
        // v0 = [2, 0], v1 = [0, 4]: c = 0, Ω = π/2; at t = 1/3:
        // sin(π/3)·[2, 0] + sin(π/6)·[0, 4] = [2·0.8660254, 4·0.5] = [1.7320508, 2]
        let fx = Fixture::new("w", &[2], None, &[&[2., 0.], &[0., 4.]]);
        assert_close(&merge1(&spec(1.0 / 3.0), &fx), &[1.732_050_8, 2.0], 1e-6);
    }

    #[test]
    fn obtuse_angle() {
        // v0 = [1, 0], v1 = [−1, 1]/√2·2 = [−√2, √2]: c = −1/√2, Ω = 3π/4,
        // sin Ω = √2/2. At t = 0.5: s = sin(3π/8)/sin(3π/4) = 0.9238795/0.7071068 = 1.3065630
        // θ = 1.3065630·([1, 0] + [−1.4142136, 1.4142136]) = [−0.5411961, 1.8477591]
        let r2 = std::f32::consts::SQRT_2;
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[-r2, r2]]);
        assert_close(&merge1(&spec(0.5), &fx), &[-0.541_196_1, 1.847_759_1], 1e-5);
    }

    #[test]
    fn endpoints_are_returned() {
        let v0 = [0.3f32, -1.2, 2.5, 0.01, -0.7, 4.0];
        let v1 = [-2.0f32, 0.4, 1.1, 3.3, 0.0, -0.5];
        let fx = Fixture::new("w", &[2, 3], None, &[&v0, &v1]);
        assert_close(&merge1(&spec(0.0), &fx), &v0, 1e-6);
        assert_close(&merge1(&spec(1.0), &fx), &v1, 1e-6);
    }

    #[test]
    fn near_parallel_vectors_take_the_lerp_branch() {
        // v1 = 2·v0 + a tiny orthogonal part: c ≈ 1 > 0.9995 → lerp:
        // 0.75·[1, 0, 0] + 0.25·[2, 0.01, 0] = [1.25, 0.0025, 0]
        // (slerp would give a different norm: lerp keeps the plain mix).
        let fx = Fixture::new("w", &[3], None, &[&[1., 0., 0.], &[2., 0.01, 0.]]);
        assert_close(&merge1(&spec(0.25), &fx), &[1.25, 0.0025, 0.], 1e-6);
        // Anti-parallel also lerps (|c| = 1): 0.5·[1, 0] + 0.5·[−3, 0] = [−1, 0]
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[-3., 0.]]);
        assert_close(&merge1(&spec(0.5), &fx), &[-1., 0.], 1e-6);
    }

    #[test]
    fn dot_threshold_switches_branches() {
        // c = cos 45° = 0.7071 for [1, 0] and [1, 1]. With dot_threshold 0.7
        // it lerps: 0.5·[1, 0] + 0.5·[1, 1] = [1, 0.5].
        let fx = Fixture::new("w", &[2], None, &[&[1., 0.], &[1., 1.]]);
        assert_close(
            &merge1(&spec(0.5).with("dot_threshold", 0.7), &fx),
            &[1., 0.5],
            1e-6,
        );
        // Default threshold slerps: Ω = π/4, s = sin(π/8)/sin(π/4) = 0.3826834/0.7071068 = 0.5411961
        // θ = 0.5411961·([1, 0] + [1, 1]) = [1.0823922, 0.5411961]
        assert_close(&merge1(&spec(0.5), &fx), &[1.082_392_2, 0.541_196_1], 1e-6);
    }

    #[test]
    fn zero_tensor_is_not_normalised() {
        // v0 = 0: ‖v0‖ ≤ ε, left as is; c = 0 → Ω = π/2 → sin(π/4)·[0, 3] = [0, 2.1213203]
        let fx = Fixture::new("w", &[2], None, &[&[0., 0.], &[0., 3.]]);
        assert_close(&merge1(&spec(0.5), &fx), &[0., 3. * H], 1e-6);
    }

    #[test]
    fn t_per_tensor_from_filters() {
        // t = 0 for `self_attn` tensors, 1 otherwise.
        let t = ParamValue::Filtered(vec![
            FilterEntry {
                filter: Some("self_attn".into()),
                value: ParamValue::Number(0.0),
            },
            FilterEntry {
                filter: None,
                value: ParamValue::Number(1.0),
            },
        ]);
        let mut s = MergeSpec::new("slerp", None, &["a", "b"]).with_value("t", t);
        s.dialect = Dialect::Mergekit;
        let m = build(&s);
        let attn = Fixture::new(
            "model.layers.0.self_attn.q_proj.weight",
            &[2],
            None,
            &[&[1., 2.], &[3., -4.]],
        );
        let mlp = Fixture::new(
            "model.layers.0.mlp.up_proj.weight",
            &[2],
            None,
            &[&[1., 2.], &[3., -4.]],
        );
        let get = |fx: &Fixture| m.merge(&fx.inputs()).unwrap().to_vec1::<f32>().unwrap();
        assert_close(&get(&attn), &[1., 2.], 1e-6);
        assert_close(&get(&mlp), &[3., -4.], 1e-6);
    }

    #[test]
    fn parameter_ranges() {
        assert!(crate::methods::build(&spec(1.5)).is_err());
        assert!(crate::methods::build(&spec(-0.1)).is_err());
        assert!(crate::methods::build(
            &spec(0.5).with_value("t", ParamValue::Gradient(vec![0.0, 1.2]))
        )
        .is_err());
        assert!(crate::methods::build(&spec(0.5).with("dot_threshold", 1.5)).is_err());
        assert!(crate::methods::build(&spec(0.5).with("epsilon", -1.0)).is_err());
        assert!(crate::methods::build(&spec(0.5).with("DOT_THRESHOLD", 0.99)).is_ok());
        assert!(crate::methods::build(&MergeSpec::new("slerp", None, &["a", "b", "c"])).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // The base is ignored; [1, 0] (bf16) and [0, 1] (f16) at t = 0.5 → [√2/2, √2/2].
        let got = merge_typed(
            &spec(0.5),
            "w",
            &[2],
            Some((DType::F32, &[5., 5.])),
            &[(DType::BF16, &[1., 0.]), (DType::F16, &[0., 1.])],
        );
        assert_close(&got, &[H, H], 1e-6);
    }
}
