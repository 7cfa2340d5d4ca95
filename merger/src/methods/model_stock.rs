//! Model Stock (FusionBench and mergekit `model_stock`; Jang et al. 2024,
//! "Model Stock: All we need is just a few fine-tuned models",
//! arXiv:2403.19522).
//!
//! Per tensor, with τi = θi − θ0 flattened and T ≥ 2 experts:
//!
//! - cos φ from the pairwise cosines cij = τi·τj / (‖τi‖ ‖τj‖), clamped to
//!   [−1, 1];
//! - t = T cos φ / ((T − 1) cos φ + 1);
//! - θ = t · mean(θi) + (1 − t) θ0.
//!
//! The two references share this formula and differ in details that only
//! show with T > 2 or degenerate tensors; the spec's dialect picks one:
//!
//! - mergekit: cos φ is the mean of the cij; cij = τi·τj / max(‖τi‖‖τj‖, 1e-6).
//! - FusionBench: cos φ is the cosine of the mean pairwise *angle*
//!   arccos cij (for T = 2 the same thing); cij = τi·τj / (‖τi‖‖τj‖ + 1e-8),
//!   and t's denominator gets + 1e-8.
//!
//! Zero task vectors: both guards make cij = 0 when τi or τj is zero, so an
//! expert equal to the base pulls cos φ towards 0; cos φ = 0 gives t = 0, the
//! base. Exactly opposite task vectors (the denominator (T − 1) cos φ + 1
//! vanishes, t → −∞) also give the base, t = 0, instead of inf/NaN.
//!
//! Parameters: `filter_wise` (mergekit, default false): cos φ and t per row
//! (over the last dimension; a 1-D tensor is one row) instead of per tensor.
//!
//! The pairwise dot products come from one batched Gram matmul on the merge
//! device.

use candle_core::Tensor;

use super::schema::{DefaultValue, Param, Type};
use super::{MergeMethod, Params, TensorInputs};
use crate::error::{MergeError, Result};
use crate::kernels::linear_combination;
use crate::spec::Dialect;
use runtime::checkpoint::TensorRef;

/// Below this, (T − 1) cos φ + 1 is treated as zero (opposite task vectors).
const DEGENERATE: f64 = 1e-8;

/// Model Stock's interpolation towards the base.
#[derive(Debug)]
struct ModelStock {
    dialect: Dialect,
    filter_wise: bool,
}

/// `filter_wise`: one ratio per row instead of per tensor.
static FILTER_WISE: Param = Param::global(
    "filter_wise",
    Type::Bool,
    DefaultValue::Bool(false),
    "one interpolation ratio per row (filter) instead of per tensor",
);

/// The parameters of `model_stock`.
pub static PARAMS: &[&Param] = &[&FILTER_WISE];

/// Builds `model_stock`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(ModelStock {
        dialect: p.dialect(),
        filter_wise: p.boolean(&FILTER_WISE)?,
    }))
}

impl ModelStock {
    /// t from one T×T Gram matrix of task vectors.
    fn ratio(&self, g: &[Vec<f32>]) -> f64 {
        let n = g.len();
        let mut sum = 0.0;
        let mut pairs = 0usize;
        for i in 0..n {
            for j in i + 1..n {
                let dot = g[i][j] as f64;
                let norms = (g[i][i] as f64).max(0.0).sqrt() * (g[j][j] as f64).max(0.0).sqrt();
                let c = match self.dialect {
                    Dialect::Mergekit => dot / norms.max(1e-6),
                    Dialect::Fusionbench => dot / (norms + 1e-8),
                }
                .clamp(-1.0, 1.0);
                sum += match self.dialect {
                    Dialect::Mergekit => c,
                    Dialect::Fusionbench => c.acos(),
                };
                pairs += 1;
            }
        }
        let mean = sum / pairs as f64;
        let (cos, eps) = match self.dialect {
            Dialect::Mergekit => (mean, 0.0),
            Dialect::Fusionbench => (mean.cos(), 1e-8),
        };
        let k = n as f64;
        let denom = (k - 1.0) * cos + 1.0;
        if denom <= DEGENERATE {
            return 0.0;
        }
        k * cos / (denom + eps)
    }
}

/// Per-row Gram matrices [rows][T][T] of the task vectors, each viewed as
/// [rows, cols].
fn grams(tvs: &[Tensor], rows: usize, cols: usize) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let v: Vec<Tensor> = tvs
        .iter()
        .map(|t| t.reshape((rows, cols)))
        .collect::<candle_core::Result<_>>()?;
    let m = Tensor::stack(&v, 1)?; // [rows, T, cols]
    m.matmul(&m.transpose(1, 2)?)?.to_vec3::<f32>()
}

/// θ0 + t_r (mean − θ0) with one t per row of the [rows, cols] view.
fn per_row(
    inputs: &TensorInputs,
    base: &TensorRef,
    ts: Vec<f32>,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Tensor> {
    let device = inputs.device;
    let k = inputs.experts.len();
    let mean = linear_combination(&inputs.experts, &vec![1.0 / k as f32; k], device)?
        .reshape((rows, cols))?;
    let base = base.to_f32_tensor(device)?.reshape((rows, cols))?;
    let t = Tensor::from_vec(ts, (rows, 1), device)?;
    (&base + (mean - &base)?.broadcast_mul(&t)?)?.reshape(inputs.shape())
}

impl MergeMethod for ModelStock {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let shape = inputs.shape().to_vec();
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return inputs.base_f32();
        }
        let cols = match shape.last() {
            Some(&c) if self.filter_wise => c,
            _ => numel,
        };
        let rows = numel / cols;
        let base = inputs.base.ok_or_else(|| MergeError::MissingBase {
            method: "model_stock".into(),
        })?;
        let tvs = inputs.task_vectors()?;
        let g = grams(&tvs, rows, cols).map_err(|e| inputs.err(e))?;
        drop(tvs);
        if rows == 1 {
            let t = self.ratio(&g[0]);
            let k = inputs.experts.len();
            return inputs.combine(Some((1.0 - t) as f32), &vec![(t / k as f64) as f32; k]);
        }
        let ts: Vec<f32> = g.iter().map(|g| self.ratio(g) as f32).collect();
        per_row(inputs, &base, ts, rows, cols).map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture};
    use crate::spec::{Dialect, MergeSpec, ParamValue};

    fn spec(n: usize, dialect: Dialect) -> MergeSpec {
        let names = ["a", "b", "c", "d"];
        let mut s = MergeSpec::new("model_stock", Some("base"), &names[..n]);
        s.dialect = dialect;
        s
    }

    #[test]
    fn orthogonal_task_vectors_give_the_base() {
        // τ1 = [1, 0], τ2 = [0, 1]: cos φ = 0 → t = 0 → θ0.
        for d in [Dialect::Fusionbench, Dialect::Mergekit] {
            let fx = Fixture::new("w", &[2], Some(&[5., -5.]), &[&[6., -5.], &[5., -4.]]);
            assert_close(&merge1(&spec(2, d), &fx), &[5., -5.], 1e-6);
        }
    }

    #[test]
    fn sixty_degrees_two_experts() {
        // θ0 = [1, 1], τ1 = [2, 0], τ2 = [1, √3] (|τ2| = 2): cos φ = 2/4 = 0.5,
        // t = 2·0.5 / (0.5 + 1) = 2/3. mean(θi) = [1, 1] + [1.5, √3/2] = [2.5, 1.8660254];
        // θ = [1, 1] + 2/3·[1.5, 0.8660254] = [2, 1.5773503]
        let r3 = 3f32.sqrt();
        for d in [Dialect::Fusionbench, Dialect::Mergekit] {
            let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[3., 1.], &[2., 1. + r3]]);
            assert_close(&merge1(&spec(2, d), &fx), &[2., 1.577_350_3], 1e-5);
        }
    }

    #[test]
    fn identical_task_vectors_give_their_mean() {
        // cos φ = 1 → t = T/T = 1 → θ = mean(θi) = the expert.
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[0., 0., 0.]),
            &[&[1., 2., 3.], &[1., 2., 3.], &[1., 2., 3.]],
        );
        assert_close(
            &merge1(&spec(3, Dialect::Mergekit), &fx),
            &[1., 2., 3.],
            1e-5,
        );
    }

    #[test]
    fn three_experts_mean_cosine_vs_mean_angle() {
        // θ0 = 0, τ1 = [1, 0, 0], τ2 = [0, 1, 0], τ3 = [1, 1, 0]/√2·... = [1, 1, 0]:
        // cos12 = 0, cos13 = cos23 = 1/√2.
        // mergekit: cos φ = (0 + 2·0.7071068)/3 = 0.4714045;
        //   t = 3·0.4714045 / (2·0.4714045 + 1) = 1.4142136/1.9428090 = 0.7279221.
        // FusionBench: mean angle = (90° + 45° + 45°)/3 = 60°, cos φ = 0.5;
        //   t = 1.5 / 2 = 0.75.
        // mean(θi) = [2, 2, 0]/3 = [0.6666667, 0.6666667, 0].
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[0., 0., 0.]),
            &[&[1., 0., 0.], &[0., 1., 0.], &[1., 1., 0.]],
        );
        let mk = 0.727_922_1f32 * 2. / 3.;
        assert_close(
            &merge1(&spec(3, Dialect::Mergekit), &fx),
            &[mk, mk, 0.],
            1e-5,
        );
        let fb = 0.75f32 * 2. / 3.;
        assert_close(
            &merge1(&spec(3, Dialect::Fusionbench), &fx),
            &[fb, fb, 0.],
            1e-5,
        );
    }

    #[test]
    fn zero_task_vector_is_guarded() {
        // τ1 = 0: c12 = 0 (no NaN) → t = 0 → θ0.
        let fx = Fixture::new("w", &[2], Some(&[1., 2.]), &[&[1., 2.], &[3., 3.]]);
        for d in [Dialect::Fusionbench, Dialect::Mergekit] {
            assert_close(&merge1(&spec(2, d), &fx), &[1., 2.], 1e-6);
        }
    }

    #[test]
    fn opposite_task_vectors_give_the_base() {
        // τ1 = [1, 0], τ2 = [−1, 0]: cos φ = −1, denominator 0 → t = 0 → θ0.
        let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[2., 1.], &[0., 1.]]);
        for d in [Dialect::Fusionbench, Dialect::Mergekit] {
            assert_close(&merge1(&spec(2, d), &fx), &[1., 1.], 1e-6);
        }
    }

    #[test]
    fn filter_wise_uses_one_ratio_per_row() {
        // Row 0: τ1 = [1, 0], τ2 = [0, 1] → t = 0 → θ0 row [0, 0].
        // Row 1: τ1 = τ2 = [2, 2] → t = 1 → mean row [2, 2].
        // Per tensor instead: τ1 = [1, 0, 2, 2], τ2 = [0, 1, 2, 2]: dot 8, norms 3·3,
        // cos φ = 8/9, t = 2·(8/9)/(8/9 + 1) = 16/17 = 0.9411765, mean = [0.5, 0.5, 2, 2]:
        // θ = 16/17·mean = [0.4705882, 0.4705882, 1.8823529, 1.8823529].
        let fx = Fixture::new(
            "w",
            &[2, 2],
            Some(&[0., 0., 0., 0.]),
            &[&[1., 0., 2., 2.], &[0., 1., 2., 2.]],
        );
        let s = spec(2, Dialect::Mergekit).with_value("filter_wise", ParamValue::Bool(true));
        assert_close(&merge1(&s, &fx), &[0., 0., 2., 2.], 1e-5);
        assert_close(
            &merge1(&spec(2, Dialect::Mergekit), &fx),
            &[0.470_588_2, 0.470_588_2, 1.882_353, 1.882_353],
            1e-5,
        );
    }

    #[test]
    fn needs_two_experts_and_a_base() {
        assert!(crate::methods::build(&spec(1, Dialect::Fusionbench)).is_err());
        assert!(crate::methods::build(&MergeSpec::new("model_stock", None, &["a", "b"])).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // As `sixty_degrees_two_experts` with τ2 = [1, 1.75] (exact in both
        // dtypes): |τ2| = √(1 + 3.0625) = 2.0155644, cos φ = 2/(2·2.0155644) = 0.4961389,
        // t = 0.9922779/1.4961389 = 0.6632258; θ = [1, 1] + t·[1.5, 0.875] = [1.9948386, 1.5803225]
        let got = merge_typed(
            &spec(2, Dialect::Mergekit),
            "w",
            &[2],
            Some((DType::F32, &[1., 1.])),
            &[(DType::BF16, &[3., 1.]), (DType::F16, &[2., 2.75])],
        );
        assert_close(&got, &[1.994_838_6, 1.580_322_5], 1e-5);
    }
}
