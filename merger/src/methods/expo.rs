//! ExPO, model extrapolation (FusionBench `expo`; Zheng et al. 2024,
//! "Weak-to-Strong Extrapolation Expedites Alignment", arXiv:2404.16792).
//!
//! θ = θe + α (θe − θ0), where θe is the expert (with several experts, their
//! mean, as FusionBench averages them first) and θ0 the base (the SFT model
//! in the paper). Computed in one pass as θ = (1 + α)/T Σi θi − α θ0, on
//! every tensor.
//!
//! Parameters: `alpha` (FusionBench calls it `extrapolation_factor`;
//! default 0.1), any finite number: α > 0 extrapolates past the experts,
//! α = 0 returns θe, −1 < α < 0 interpolates back towards θ0.

use candle_core::Tensor;

use super::schema::{DefaultValue, Param, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// θe + α (θe − θ0).
#[derive(Debug)]
struct Expo {
    alpha: Num,
}

/// α, the extrapolation factor.
static ALPHA: Param = Param::global(
    "alpha",
    Type::Number,
    DefaultValue::Number(0.1),
    "extrapolation factor α away from the base",
)
.aliases(&["extrapolation_factor"]);

/// The parameters of `expo`.
pub static PARAMS: &[&Param] = &[&ALPHA];

/// Builds `expo`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(Expo {
        alpha: p.number(&ALPHA)?,
    }))
}

impl MergeMethod for Expo {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        inputs.base.ok_or_else(|| MergeError::MissingBase {
            method: "expo".into(),
        })?;
        let alpha = self.alpha.at(&inputs.ctx)?;
        let each = ((1.0 + alpha) / inputs.experts.len() as f64) as f32;
        inputs.combine(Some(-alpha as f32), &vec![each; inputs.experts.len()])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn default_alpha_extrapolates_one_expert() {
        // θe = [2, −1], θ0 = [1, 1]: [2, −1] + 0.1·([2, −1] − [1, 1]) = [2.1, −1.2]
        let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[2., -1.]]);
        assert_close(
            &merge1(&MergeSpec::new("expo", Some("b"), &["x"]), &fx),
            &[2.1, -1.2],
            1e-6,
        );
    }

    #[test]
    fn several_experts_are_averaged_first() {
        // θe = ([4, 0] + [2, 2]) / 2 = [3, 1], θ0 = [1, 1], α = 0.5 (FusionBench name):
        // [3, 1] + 0.5·[2, 0] = [4, 1]
        let fx = Fixture::new("w", &[2], Some(&[1., 1.]), &[&[4., 0.], &[2., 2.]]);
        let s = MergeSpec::new("expo", Some("b"), &["x", "y"]).with("extrapolation_factor", 0.5);
        assert_close(&merge1(&s, &fx), &[4., 1.], 1e-6);
    }

    #[test]
    fn alpha_zero_is_the_mean() {
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[9., 9., 9.]),
            &[&[1., 2., 3.], &[3., 2., 1.]],
        );
        let s = MergeSpec::new("expo", Some("b"), &["x", "y"]).with("alpha", 0.0);
        assert_close(&merge1(&s, &fx), &[2., 2., 2.], 1e-6);
    }

    #[test]
    fn needs_a_base() {
        assert!(crate::methods::build(&MergeSpec::new("expo", None, &["x"])).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // θe = ([1, 3] + [3, 1]) / 2 = [2, 2], θ0 = [0, 4], α = 0.5:
        // [2, 2] + 0.5·[2, −2] = [3, 1]
        let got = merge_typed(
            &MergeSpec::new("expo", Some("b"), &["x", "y"]).with("alpha", 0.5),
            "w",
            &[2],
            Some((DType::F32, &[0., 4.])),
            &[(DType::BF16, &[1., 3.]), (DType::F16, &[3., 1.])],
        );
        assert_close(&got, &[3., 1.], 1e-6);
    }
}
