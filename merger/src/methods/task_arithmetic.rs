//! Task arithmetic (FusionBench and mergekit `task_arithmetic`; Ilharco et
//! al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089).
//!
//! θ = θ0 + λ Σi wi τi with τi = θi − θ0, computed in one pass as
//! θ = (1 − λ Σ wi) θ0 + Σi λ wi θi. With `normalize`, Σ wi τi is divided by
//! Σ wi first (a sum with |Σ wi| < 1e-8 is left undivided, as mergekit does).
//!
//! Parameters:
//! - `scaling_coefficient` or `lambda` (λ, any finite number, per-tensor
//!   resolvable): default 0.3 in FusionBench-style specs (FusionBench's
//!   setting), 1.0 in mergekit YAML (mergekit's default);
//! - per-model `weight` (default 1; mergekit requires it, FusionBench has no
//!   per-model weights), any finite number, per-tensor resolvable;
//! - `normalize` (mergekit, default false);
//! - `int8_mask` (mergekit, default false): accepted so that mergekit YAML
//!   loads unchanged; it only picks the dtype of a sign mask in mergekit,
//!   and task arithmetic has no mask, so it cannot change the result.

use candle_core::Tensor;

use super::schema::{common, DefaultValue, Param, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// mergekit leaves Σ wi undivided below this.
const ZERO_SUM: f64 = 1e-8;

/// θ0 + λ Σ wi τi.
#[derive(Debug)]
struct TaskArithmetic {
    lambda: Num,
    weights: Vec<Num>,
    normalize: bool,
}

/// λ, whose default depends on the spec's dialect: FusionBench 0.3,
/// mergekit 1.0 (`breadcrumbs` shares it).
pub(super) static LAMBDA: Param = Param::global(
    "scaling_coefficient",
    Type::Number,
    DefaultValue::ByDialect {
        fusionbench: 0.3,
        mergekit: 1.0,
    },
    "scale λ of the summed task vectors",
)
.aliases(&["lambda"]);

/// `normalize` (off): divide by Σ wi (`breadcrumbs` shares it).
pub(super) static NORMALIZE: Param = Param::global(
    "normalize",
    Type::Bool,
    DefaultValue::Bool(false),
    "divide the weighted sum by Σ wi",
);

/// The parameters of `task_arithmetic`.
pub static PARAMS: &[&Param] = &[&LAMBDA, &common::WEIGHT, &NORMALIZE, &common::INT8_MASK];

/// Builds `task_arithmetic`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let lambda = p.number(&LAMBDA)?;
    let weights = p.per_model(&common::WEIGHT)?;
    let normalize = p.boolean(&NORMALIZE)?;
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(TaskArithmetic {
        lambda,
        weights,
        normalize,
    }))
}

impl MergeMethod for TaskArithmetic {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        inputs.base.ok_or_else(|| MergeError::MissingBase {
            method: "task_arithmetic".into(),
        })?;
        let lambda = self.lambda.at(&inputs.ctx)?;
        let w = self
            .weights
            .iter()
            .map(|w| w.at(&inputs.ctx))
            .collect::<Result<Vec<f64>>>()?;
        let sum: f64 = w.iter().sum();
        let divisor = if self.normalize && sum.abs() >= ZERO_SUM {
            sum
        } else {
            1.0
        };
        let experts: Vec<f64> = w.iter().map(|w| lambda * w / divisor).collect();
        let base_coeff = 1.0 - experts.iter().sum::<f64>();
        let coeffs: Vec<f32> = experts.iter().map(|&c| c as f32).collect();
        inputs.combine(Some(base_coeff as f32), &coeffs)
    }

    /// `(1 − λ Σ wᵢ/d, [λ wᵢ/d])` with d = Σ wᵢ under `normalize`, else 1.
    fn affine_coefficients(&self, experts: usize) -> Option<(f64, Vec<f64>)> {
        let lambda = self.lambda.constant_value()?;
        let w = self
            .weights
            .iter()
            .map(Num::constant_value)
            .collect::<Option<Vec<f64>>>()?;
        if w.len() != experts {
            return None;
        }
        let sum: f64 = w.iter().sum();
        let divisor = if self.normalize && sum.abs() >= ZERO_SUM {
            sum
        } else {
            1.0
        };
        let c: Vec<f64> = w.iter().map(|w| lambda * w / divisor).collect();
        Some((1.0 - c.iter().sum::<f64>(), c))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture};
    use crate::spec::{Dialect, MergeSpec, ParamValue};

    fn fixture() -> Fixture {
        // θ0 = [1, 2], τ1 = [1, −2], τ2 = [3, 4]
        Fixture::new("w", &[2], Some(&[1., 2.]), &[&[2., 0.], &[4., 6.]])
    }

    #[test]
    fn fusionbench_default_lambda_is_0_3() {
        // [1, 2] + 0.3·([1, −2] + [3, 4]) = [1 + 1.2, 2 + 0.6] = [2.2, 2.6]
        let s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"]);
        assert_close(&merge1(&s, &fixture()), &[2.2, 2.6], 1e-6);
    }

    #[test]
    fn mergekit_default_lambda_is_1() {
        // [1, 2] + ([1, −2] + [3, 4]) = [5, 4]
        let mut s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"]);
        s.dialect = Dialect::Mergekit;
        assert_close(&merge1(&s, &fixture()), &[5., 4.], 1e-6);
    }

    #[test]
    fn weights_lambda_and_normalize() {
        // weights 1, 0.5; λ = 2 (as `lambda`):
        // [1, 2] + 2·([1, −2] + 0.5·[3, 4]) = [1, 2] + 2·[2.5, 0] = [6, 2]
        let mut s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"]).with("lambda", 2.0);
        s.models[1].weight = Some(ParamValue::Number(0.5));
        assert_close(&merge1(&s, &fixture()), &[6., 2.], 1e-6);
        // normalize: Σ w = 1.5 → [1, 2] + 2·[2.5, 0]/1.5 = [1 + 3.3333, 2]
        let s = s.with_value("normalize", ParamValue::Bool(true));
        assert_close(&merge1(&s, &fixture()), &[4.333_333_5, 2.], 1e-5);
    }

    #[test]
    fn scaling_zero_returns_the_base_exactly() {
        let base = [0.123_456_79f32, -7.5, 1e-7, 3.0e4];
        let fx = Fixture::new(
            "w",
            &[2, 2],
            Some(&base),
            &[&[9., 9., 9., 9.], &[-3., 0.5, 2., 1.]],
        );
        let s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"])
            .with("scaling_coefficient", 0.0);
        assert_eq!(merge1(&s, &fx), base.to_vec());
    }

    #[test]
    fn mergekit_options_are_accepted() {
        let mut s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"])
            .with_value("int8_mask", ParamValue::Bool(true))
            .with("lambda", 0.5);
        s.dialect = Dialect::Mergekit;
        // [1, 2] + 0.5·[4, 2] = [3, 3]
        assert_close(&merge1(&s, &fixture()), &[3., 3.], 1e-6);
        let bad = MergeSpec::new("task_arithmetic", Some("b"), &["x"]).with("density", 0.5);
        assert!(crate::methods::build(&bad).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // θ0 = [1, −1], τ1 = [0.5, 1], τ2 = [−1, 2]; λ = 1:
        // [1, −1] + [−0.5, 3] = [0.5, 2]
        let s = MergeSpec::new("task_arithmetic", Some("b"), &["x", "y"])
            .with("scaling_coefficient", 1.0);
        let got = merge_typed(
            &s,
            "w",
            &[2],
            Some((DType::F32, &[1., -1.])),
            &[(DType::BF16, &[1.5, 0.]), (DType::F16, &[0., 1.])],
        );
        assert_close(&got, &[0.5, 2.], 1e-6);
    }
}
