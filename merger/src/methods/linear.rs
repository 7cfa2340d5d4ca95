//! Linear merge (mergekit `linear`; model soups, Wortsman et al. 2022,
//! arXiv:2203.05482).
//!
//! θ = Σi wi θi / Σi wi when `normalize` (the default), else Σi wi θi.
//!
//! Parameters:
//! - per-model `weight`: mergekit requires it; here a missing weight is 1,
//!   so a YAML that leaves every weight out gets the plain mean. Any finite
//!   number, per-tensor resolvable (scalar, gradient or filter list).
//! - `normalize` (default true). mergekit divides by Σ wi unguarded (a zero
//!   sum gives inf/NaN weights); here |Σ wi| < 1e-8 for some tensor is an
//!   error naming it.
//!
//! The base model is not used: in mergekit a linear merge only includes the
//! base when it is also listed among the models. The computation is the one
//! of FusionBench's `weighted_average` and shares its implementation.

use super::weighted_average::WeightedAverage;
use super::{MergeMethod, Params};
use crate::error::Result;

/// Builds `linear`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    Ok(Box::new(WeightedAverage::from_params(p)?))
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, build, merge1, merge_typed, Fixture};
    use crate::spec::{Dialect, MergeSpec, ParamValue, TensorCtx};

    fn spec(weights: &[ParamValue]) -> MergeSpec {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("m{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = MergeSpec::new("linear", None, &names);
        s.dialect = Dialect::Mergekit;
        for (m, w) in s.models.iter_mut().zip(weights) {
            m.weight = Some(w.clone());
        }
        s
    }

    #[test]
    fn normalised_by_the_weight_sum() {
        // (0.6·[10, 0] + 0.2·[0, 10]) / 0.8 = [6/0.8, 2/0.8] = [7.5, 2.5]
        let fx = Fixture::new("w", &[2], None, &[&[10., 0.], &[0., 10.]]);
        let s = spec(&[ParamValue::Number(0.6), ParamValue::Number(0.2)]);
        assert_close(&merge1(&s, &fx), &[7.5, 2.5], 1e-5);
    }

    #[test]
    fn unnormalised_sum() {
        // 0.6·[10, 0] + 0.2·[0, 10] = [6, 2]
        let fx = Fixture::new("w", &[2], None, &[&[10., 0.], &[0., 10.]]);
        let s = spec(&[ParamValue::Number(0.6), ParamValue::Number(0.2)])
            .with_value("normalize", ParamValue::Bool(false));
        assert_close(&merge1(&s, &fx), &[6., 2.], 1e-5);
    }

    #[test]
    fn weights_follow_a_gradient_over_layers() {
        // Layer 1 of 3 sits at depth 0.5: model 0's weight [1, 0] gives 0.5,
        // model 1's constant 0.5 → equal weights → mean of [2] and [4] = 3.
        // Layer 0 (depth 0): weights 1 and 0.5 → (2 + 0.5·4)/1.5 = 4/1.5 = 2.6667.
        let s = spec(&[
            ParamValue::Gradient(vec![1.0, 0.0]),
            ParamValue::Number(0.5),
        ]);
        let m = build(&s);
        let mut fx = Fixture::new("model.layers.1.mlp.w", &[1], None, &[&[2.], &[4.]]);
        fx.num_layers = 3;
        let got = m.merge(&fx.inputs()).unwrap().to_vec1::<f32>().unwrap();
        assert_close(&got, &[3.], 1e-6);
        let mut fx0 = Fixture::new("model.layers.0.mlp.w", &[1], None, &[&[2.], &[4.]]);
        fx0.num_layers = 3;
        assert_eq!(TensorCtx::new(&fx0.name, 3).depth(), 0.0);
        let got = m.merge(&fx0.inputs()).unwrap().to_vec1::<f32>().unwrap();
        assert_close(&got, &[2.666_666_7], 1e-6);
    }

    #[test]
    fn identical_experts_average_to_themselves() {
        let x = [1.5f32, -0.25, 3e-4, 12.0, -9.5, 0.0];
        let fx = Fixture::new("w", &[3, 2], None, &[&x, &x]);
        let s = spec(&[ParamValue::Number(0.3), ParamValue::Number(0.9)]);
        assert_close(&merge1(&s, &fx), &x, 1e-6);
    }

    #[test]
    fn missing_weights_default_to_one() {
        // no weights → (1·[1, 5] + 1·[3, 7]) / 2 = [2, 6]
        let mut s = MergeSpec::new("linear", None, &["a", "b"]);
        s.dialect = Dialect::Mergekit;
        let fx = Fixture::new("w", &[2], None, &[&[1., 5.], &[3., 7.]]);
        assert_close(&merge1(&s, &fx), &[2., 6.], 1e-6);
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // (1·4 + 3·(−2)) / 4 = −0.5; (1·0.5 + 3·1.5) / 4 = 1.25
        let got = merge_typed(
            &spec(&[ParamValue::Number(1.), ParamValue::Number(3.)]),
            "w",
            &[2],
            Some((DType::F32, &[1., 1.])),
            &[(DType::BF16, &[4., 0.5]), (DType::F16, &[-2., 1.5])],
        );
        assert_close(&got, &[-0.5, 1.25], 1e-6);
    }
}
