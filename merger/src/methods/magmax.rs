//! MagMax, maximum-magnitude selection (FusionBench `magmax`; Marczak et
//! al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
//! Learning", arXiv:2407.06322).
//!
//! ```text
//! τt = θt − θ0
//! τmax[j] = τ_{t*(j)}[j],   t*(j) = the last t with |τt[j]| = max_s |τs[j]|
//! θ = θ0 + s · τmax
//! ```
//!
//! Per entry, the task vector of largest magnitude wins, with its sign;
//! on a tie the later expert wins (the official release folds the task
//! vectors in order with `>=`, as FusionBench does). Every tensor is merged.
//!
//! Parameters: `scaling_factor` s (also `scaling_coefficient`, `lambda`;
//! default 0.5, FusionBench's and the release's 8-task setting), any finite
//! number.

use candle_core::Tensor;

use super::schema::{DefaultValue, Param, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// θ0 + s · τmax.
#[derive(Debug)]
struct MagMax {
    scale: Num,
}

/// s, the scale of the selected task vector.
static SCALING_FACTOR: Param = Param::global(
    "scaling_factor",
    Type::Number,
    DefaultValue::Number(0.5),
    "scale s of the maximum-magnitude task vector",
)
.aliases(&["scaling_coefficient", "lambda"]);

/// The parameters of `magmax`.
pub static PARAMS: &[&Param] = &[&SCALING_FACTOR];

/// Builds `magmax`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(MagMax {
        scale: p.number(&SCALING_FACTOR)?,
    }))
}

impl MergeMethod for MagMax {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let base = inputs.base_f32().map_err(|_| MergeError::MissingBase {
            method: "magmax".into(),
        })?;
        let s = self.scale.at(&inputs.ctx)?;
        let mut taus = inputs.task_vectors()?.into_iter();
        let first = taus.next().expect("at least one expert");
        let picked = taus.try_fold(first, |best, tau| -> candle_core::Result<Tensor> {
            let later_wins = tau.abs()?.ge(&best.abs()?)?;
            later_wins.where_cond(&tau, &best)
        });
        let picked = picked.map_err(|e| inputs.err(e))?;
        (base + (picked * s).map_err(|e| inputs.err(e))?).map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn the_largest_magnitude_wins_with_its_sign() {
        // θ0 = [1, 1, 1, 1]; τ1 = [2, 0, −1, 1], τ2 = [−1, 0, 0, −3]:
        // τmax = [2, 0, −1, −3]; θ = θ0 + 0.5·τmax = [2, 1, 0.5, −0.5]
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[1., 1., 1., 1.]),
            &[&[3., 1., 0., 2.], &[0., 1., 1., -2.]],
        );
        assert_close(
            &merge1(&MergeSpec::new("magmax", Some("b"), &["x", "y"]), &fx),
            &[2., 1., 0.5, -0.5],
            1e-6,
        );
    }

    #[test]
    fn a_tie_goes_to_the_later_expert() {
        // τ1 = [1, −2], τ2 = [−1, 2], τ3 = [0, −2]: |τ| ties everywhere it
        // can, the later one wins: τmax = [−1, −2]; s = 1 (as `lambda`).
        let fx = Fixture::new(
            "w",
            &[2],
            Some(&[0., 0.]),
            &[&[1., -2.], &[-1., 2.], &[0., -2.]],
        );
        let s = MergeSpec::new("magmax", Some("b"), &["x", "y", "z"]).with("lambda", 1.0);
        assert_close(&merge1(&s, &fx), &[-1., -2.], 1e-6);
    }

    #[test]
    fn one_expert_is_scaled_task_arithmetic() {
        // θ0 = [2, 0], θ1 = [4, −2]: θ0 + 0.25·[2, −2] = [2.5, −0.5]
        let fx = Fixture::new("w", &[2], Some(&[2., 0.]), &[&[4., -2.]]);
        let s = MergeSpec::new("magmax", Some("b"), &["x"]).with("scaling_factor", 0.25);
        assert_close(&merge1(&s, &fx), &[2.5, -0.5], 1e-6);
    }

    #[test]
    fn needs_a_base() {
        assert!(crate::methods::build(&MergeSpec::new("magmax", None, &["x"])).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // θ0 = [1, 1]; τ1 = [2, −1] (bf16 [3, 0]), τ2 = [−3, 0.5] (f16 [−2, 1.5]):
        // τmax = [−3, −1]; θ = [1, 1] + 0.5·τmax = [−0.5, 0.5]
        let got = merge_typed(
            &MergeSpec::new("magmax", Some("b"), &["x", "y"]),
            "w",
            &[2],
            Some((DType::F32, &[1., 1.])),
            &[(DType::BF16, &[3., 0.]), (DType::F16, &[-2., 1.5])],
        );
        assert_close(&got, &[-0.5, 0.5], 1e-6);
    }
}
