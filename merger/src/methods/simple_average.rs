//! Simple average (FusionBench `simple_average`; "model soups", Wortsman et
//! al. 2022, arXiv:2203.05482).
//!
//! θ = (1/T) Σi θi over the T experts, every tensor of the state dict.
//!
//! Parameters: none. The base θ0 plays no part: when a spec names one it is
//! read (the checkpoints are opened for validation) but ignored, as in
//! FusionBench, whose pool may hold `_pretrained_` without averaging it in.

use candle_core::Tensor;

use super::schema::Param;
use super::{MergeMethod, Params, TensorInputs};
use crate::error::Result;

/// The uniform mean of the experts.
#[derive(Debug)]
struct SimpleAverage;

/// `simple_average` takes no parameter.
pub static PARAMS: &[&Param] = &[];

/// Builds `simple_average`; it accepts no parameters.
pub fn build(_p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(SimpleAverage))
}

impl MergeMethod for SimpleAverage {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let t = inputs.experts.len();
        let coeffs = vec![1.0 / t as f32; t];
        inputs.combine(None, &coeffs)
    }

    /// `(0, [1/T; T])`.
    fn affine_coefficients(&self, experts: usize) -> Option<(f64, Vec<f64>)> {
        (experts > 0).then(|| (0.0, vec![1.0 / experts as f64; experts]))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture};
    use crate::spec::MergeSpec;

    #[test]
    fn averages_three_experts_and_ignores_the_base() {
        // ([1, 2] + [3, -4] + [5, 8]) / 3 = [9/3, 6/3] = [3, 2]; the base
        // [100, 100] must not enter the mean.
        let fx = Fixture::new(
            "w",
            &[2],
            Some(&[100., 100.]),
            &[&[1., 2.], &[3., -4.], &[5., 8.]],
        );
        let spec = MergeSpec::new("simple_average", Some("b"), &["a", "c", "d"]);
        assert_close(&merge1(&spec, &fx), &[3., 2.], 1e-6);
    }

    #[test]
    fn identical_experts_average_to_themselves() {
        let x = [0.1f32, -2.5, 3.75, 1e-3, -7.0, 0.0];
        let fx = Fixture::new("w", &[2, 3], None, &[&x, &x, &x]);
        let spec = MergeSpec::new("simple_average", None, &["a", "b", "c"]);
        assert_close(&merge1(&spec, &fx), &x, 1e-6);
    }

    #[test]
    fn extra_parameters_are_rejected() {
        let spec =
            MergeSpec::new("simple_average", None, &["a", "b"]).with("scaling_coefficient", 0.3);
        assert!(crate::methods::build(&spec).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // (1.5 + 2.5) / 2 = 2, (−4 + 8) / 2 = 2: all exact in bf16 and f16.
        let got = merge_typed(
            &MergeSpec::new("simple_average", Some("b"), &["a", "c"]),
            "w",
            &[2],
            Some((DType::F32, &[9., 9.])),
            &[(DType::BF16, &[1.5, -4.]), (DType::F16, &[2.5, 8.])],
        );
        assert_close(&got, &[2., 2.], 0.0);
    }
}
