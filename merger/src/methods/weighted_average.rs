//! Weighted average (FusionBench `weighted_average`).
//!
//! θ = Σi wi θi, with the weights divided by Σi wi first when `normalize`.
//!
//! Parameters:
//! - per-model `weight` (default 1; any finite number, per-tensor
//!   resolvable: a scalar, a gradient over the layers or a filter list);
//! - `normalize` (default true). Normalising weights that sum to zero
//!   (|Σ wi| < 1e-8 for some tensor) is an error naming the tensor.
//!
//! FusionBench gives the weights as one global list `weights: [..]`; here
//! they are per-model `weight`s (`weighted_average(a:0.3,b:0.7)` in the
//! compact form). The base θ0 is not used. mergekit's `linear`
//! ([`super::linear`]) is the same computation and shares this type.

use candle_core::Tensor;

use super::schema::{common, DefaultValue, Param, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// |Σ wi| below this cannot be normalised.
const ZERO_SUM: f64 = 1e-8;

/// Σ wi θi, optionally with Σ wi = 1.
#[derive(Debug)]
pub(super) struct WeightedAverage {
    /// One weight per expert, in spec order.
    pub(super) weights: Vec<Num>,
    /// Divide the weights by their sum.
    pub(super) normalize: bool,
}

/// `normalize`: divide the weights by their sum.
static NORMALIZE: Param = Param::global(
    "normalize",
    Type::Bool,
    DefaultValue::Bool(true),
    "divide the weights by their sum",
);

/// The parameters of `weighted_average` (and mergekit's `linear`).
pub static PARAMS: &[&Param] = &[&common::WEIGHT, &NORMALIZE];

impl WeightedAverage {
    /// Reads per-model `weight` (default 1) and `normalize` (default true).
    pub(super) fn from_params(p: &mut Params) -> Result<Self> {
        Ok(WeightedAverage {
            weights: p.per_model(&common::WEIGHT)?,
            normalize: p.boolean(&NORMALIZE)?,
        })
    }

    /// The coefficient of each expert for one tensor.
    fn coefficients(&self, inputs: &TensorInputs) -> Result<Vec<f32>> {
        let w = self
            .weights
            .iter()
            .map(|w| w.at(&inputs.ctx))
            .collect::<Result<Vec<f64>>>()?;
        let scale = if self.normalize {
            let sum: f64 = w.iter().sum();
            if sum.abs() < ZERO_SUM {
                return Err(MergeError::BadParameter {
                    param: "weight".into(),
                    reason: format!(
                        "the weights sum to {sum} for tensor `{}`, so they cannot be normalised; \
                         change the weights or set normalize=false",
                        inputs.ctx.name
                    ),
                });
            }
            1.0 / sum
        } else {
            1.0
        };
        Ok(w.iter().map(|w| (w * scale) as f32).collect())
    }
}

/// Builds `weighted_average`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(WeightedAverage::from_params(p)?))
}

impl MergeMethod for WeightedAverage {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let coeffs = self.coefficients(inputs)?;
        inputs.combine(None, &coeffs)
    }

    /// `(0, [wᵢ/Σw])` under `normalize`; without it `(0, [wᵢ])` only when
    /// the weights sum to 1 (Σ wᵢ θᵢ = (Σ wᵢ) θ_b + Σ wᵢ τᵢ scales the base
    /// otherwise: no combination of task vectors).
    fn affine_coefficients(&self, experts: usize) -> Option<(f64, Vec<f64>)> {
        let w = self
            .weights
            .iter()
            .map(Num::constant_value)
            .collect::<Option<Vec<f64>>>()?;
        let sum: f64 = w.iter().sum();
        if w.len() != experts {
            return None;
        }
        if self.normalize {
            (sum.abs() >= ZERO_SUM).then(|| (0.0, w.iter().map(|x| x / sum).collect()))
        } else {
            ((sum - 1.0).abs() <= 1e-9).then_some((0.0, w))
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::error::MergeError;
    use crate::methods::testutil::{assert_close, build, merge1, merge_typed, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    fn spec(weights: &[f64]) -> MergeSpec {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = MergeSpec::new("weighted_average", None, &names);
        for (m, w) in s.models.iter_mut().zip(weights) {
            m.weight = Some(ParamValue::Number(*w));
        }
        s
    }

    #[test]
    fn normalised_weights() {
        // weights 1 and 3 → 1/4 and 3/4: 0.25·[4, 8] + 0.75·[0, -4] = [1, 2 − 3] = [1, −1]
        let fx = Fixture::new("w", &[2], None, &[&[4., 8.], &[0., -4.]]);
        assert_close(&merge1(&spec(&[1., 3.]), &fx), &[1., -1.], 1e-6);
    }

    #[test]
    fn raw_weights_without_normalize() {
        // 2·[1, 2] + 0.5·[4, -2] = [2 + 2, 4 − 1] = [4, 3]
        let fx = Fixture::new("w", &[2], None, &[&[1., 2.], &[4., -2.]]);
        let s = spec(&[2., 0.5]).with_value("normalize", ParamValue::Bool(false));
        assert_close(&merge1(&s, &fx), &[4., 3.], 1e-6);
    }

    #[test]
    fn default_weights_are_the_mean() {
        // no weights → 1, 1 normalised → ([2, 6] + [4, 0]) / 2 = [3, 3]
        let fx = Fixture::new("w", &[2], None, &[&[2., 6.], &[4., 0.]]);
        assert_close(
            &merge1(&MergeSpec::new("weighted_average", None, &["a", "b"]), &fx),
            &[3., 3.],
            1e-6,
        );
    }

    #[test]
    fn identical_experts_average_to_themselves() {
        let x = [0.3f32, -1.25, 8.0, -0.001];
        let fx = Fixture::new("w", &[4], None, &[&x, &x, &x]);
        assert_close(&merge1(&spec(&[0.2, 0.7, 0.1]), &fx), &x, 1e-6);
    }

    #[test]
    fn zero_weight_sum_is_an_error_naming_the_tensor() {
        let fx = Fixture::new("layer.w", &[1], None, &[&[1.], &[2.]]);
        let m = build(&spec(&[1., -1.]));
        match m.merge(&fx.inputs()) {
            Err(MergeError::BadParameter { param, reason }) => {
                assert_eq!(param, "weight");
                assert!(reason.contains("layer.w"), "{reason}");
            }
            other => panic!("expected BadParameter, got {other:?}"),
        }
        // Without normalisation the same weights are fine: 1·1 − 1·2 = −1.
        let s = spec(&[1., -1.]).with_value("normalize", ParamValue::Bool(false));
        assert_close(&merge1(&s, &fx), &[-1.], 0.0);
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // weights 1, 3 → 0.25·2 + 0.75·6 = 5, 0.25·(−4) + 0.75·0.5 = −0.625
        let got = merge_typed(
            &spec(&[1., 3.]),
            "w",
            &[2],
            Some((DType::F32, &[7., 7.])),
            &[(DType::BF16, &[2., -4.]), (DType::F16, &[6., 0.5])],
        );
        assert_close(&got, &[5., -0.625], 1e-6);
    }
}
