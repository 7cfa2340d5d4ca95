//! Model Breadcrumbs (mergekit `breadcrumbs` and `breadcrumbs_ties`; Davari
//! and Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging
//! with Sparse Masks", arXiv:2312.06795): mergekit's `magnitude_outliers`
//! sparsification, then task arithmetic (`breadcrumbs`) or TIES' sign
//! consensus (`breadcrumbs_ties`).
//!
//! Per tensor and expert, with τi = θi − θ0 of n entries ranked by |τi|
//! ascending:
//!
//! - n_keep = ⌊density·n⌋ and n_top = ⌊gamma·n⌋ (integer truncation, as
//!   mergekit's `int()`), n_bot = n − n_keep − n_top; when n_bot < 0, n_top
//!   shrinks to n − n_keep and n_bot = 0 (mergekit's rule, so density + gamma
//!   may exceed 1);
//! - the n_bot smallest and the n_top largest |τi| are zeroed, the n_keep in
//!   between kept (ties ranked by position); density = 1 keeps τi whole;
//! - with `rescale`, the kept τi is scaled to the L1 norm of the original
//!   (skipped when either norm is below 1e-7), mergekit's `rescale` option;
//! - `breadcrumbs`: θ = θ0 + λ Σi wi τi', divided by Σ wi first with
//!   `normalize` (left undivided when |Σ wi| < 1e-8, as mergekit does);
//! - `breadcrumbs_ties`: with δi = wi τi', the sign + where Σi δi ≥ 0 (else
//!   −) is elected per entry and θ = θ0 + λ Σi δi·[sign δi elected], divided
//!   with `normalize` by Σi wi·[sign δi elected] (mergekit's `sum`
//!   consensus, [`super::task_vectors::Mix`]).
//!
//! One deliberate difference from mergekit: mergekit keeps
//! `indices[n_bot:-n_top]`, which is empty when n_top = 0 (any tensor with
//! gamma·n < 1, e.g. a 64-entry norm at gamma 0.01), dropping the whole task
//! vector; here n_top = 0 keeps the n_keep largest, as the method intends.
//!
//! Parameters:
//! - per-model `density` in (0, 1]: default 1.0 in mergekit YAML (mergekit's
//!   default, which makes the sparsification a no-op), 0.9 in FusionBench-
//!   style specs (a sensible breadcrumbs setting, since FusionBench has no
//!   breadcrumbs of its own);
//! - per-model `gamma` in [0, 1) (default 0.01);
//! - per-model `weight` (default 1; mergekit requires it), any finite number;
//! - `lambda` or `scaling_coefficient` (λ; default 1.0 in mergekit YAML, 0.3
//!   in FusionBench-style specs, as for task arithmetic), any finite number;
//! - `normalize` (false), `rescale` (false); `int8_mask` (false) is accepted
//!   for mergekit YAML and has no effect (it only sets the mask's dtype).
//!
//! All numbers are per-tensor resolvable. The ranking is a selection, so the
//! method runs on the host and moves the result to the merge device.

use candle_core::Tensor;

use super::schema::{common, DefaultValue, Param, Range, Scope, Type};
use super::task_arithmetic::{LAMBDA, NORMALIZE};
use super::task_vectors::{magnitude_outliers, Mix};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::Result;

/// Outlier-and-small-magnitude sparsification, then task arithmetic.
#[derive(Debug)]
struct Breadcrumbs {
    lambda: Num,
    weights: Vec<Num>,
    density: Vec<Num>,
    gamma: Vec<Num>,
    normalize: bool,
    rescale: bool,
    /// `breadcrumbs_ties`: keep only the entries of the elected sign.
    consensus: bool,
}

/// The fraction of each task vector kept.
static DENSITY: Param = Param {
    scope: Scope::PerModel,
    ..Param::global(
        "density",
        Type::Number,
        DefaultValue::ByDialect {
            fusionbench: 0.9,
            mergekit: 1.0,
        },
        "fraction of each task vector kept",
    )
    .range(Range::UNIT_OPEN_BELOW)
};

/// The fraction of largest magnitudes dropped.
static GAMMA: Param = Param::per_model(
    "gamma",
    0.01,
    "fraction of the largest magnitudes dropped (outliers)",
)
.range(Range::UNIT_OPEN_ABOVE);

/// `rescale` (off): divide the kept entries by the density.
static RESCALE: Param = Param::global(
    "rescale",
    Type::Bool,
    DefaultValue::Bool(false),
    "divide the kept entries by the fraction kept",
);

/// The parameters of `breadcrumbs`.
pub static PARAMS: &[&Param] = &[
    &LAMBDA,
    &common::WEIGHT,
    &DENSITY,
    &GAMMA,
    &NORMALIZE,
    &RESCALE,
    &common::INT8_MASK,
];

/// Builds `breadcrumbs`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_with(p, false)
}

/// Builds `breadcrumbs_ties`.
pub fn build_ties(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_with(p, true)
}

fn build_with(p: &mut Params, consensus: bool) -> Result<Box<dyn MergeMethod>> {
    let lambda = p.number(&LAMBDA)?;
    let weights = p.per_model(&common::WEIGHT)?;
    let density = p.per_model(&DENSITY)?;
    let gamma = p.per_model(&GAMMA)?;
    let normalize = p.boolean(&NORMALIZE)?;
    let rescale = p.boolean(&RESCALE)?;
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(Breadcrumbs {
        lambda,
        weights,
        density,
        gamma,
        normalize,
        rescale,
        consensus,
    }))
}

impl MergeMethod for Breadcrumbs {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let mix = Mix {
            consensus: self.consensus,
            normalize: self.normalize,
            lambda: self.lambda.at(ctx)? as f32,
        };
        mix.merge_host(inputs, self.name(), &self.weights, |i, tau| {
            magnitude_outliers(
                tau,
                self.density[i].at(ctx)?,
                self.gamma[i].at(ctx)?,
                self.rescale,
            );
            Ok(())
        })
    }
}

impl Breadcrumbs {
    fn name(&self) -> &'static str {
        if self.consensus {
            "breadcrumbs_ties"
        } else {
            "breadcrumbs"
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::methods::testutil::{assert_close, merge1, merge_typed, Fixture, TAU};
    use crate::spec::{Dialect, MergeSpec, ParamValue};

    fn spec(models: &[&str], dialect: Dialect) -> MergeSpec {
        let mut s = MergeSpec::new("breadcrumbs", Some("base"), models);
        s.dialect = dialect;
        s
    }

    #[test]
    fn merge_with_mergekit_defaults_and_density() {
        // θ0 = 1, one expert θ1 = 1 + τ; density 0.5, gamma 0.1 per model; λ = 1 (mergekit):
        // θ = 1 + [0, −9, 0, 0, −5, 0, −7, 0, 8, −6]
        let base = [1f32; 10];
        let expert: Vec<f32> = TAU.iter().map(|t| 1. + t).collect();
        let fx = Fixture::new("w", &[2, 5], Some(&base), &[&expert]);
        let mut s = spec(&["x"], Dialect::Mergekit);
        s.models[0]
            .parameters
            .insert("density".into(), ParamValue::Number(0.5));
        s.models[0]
            .parameters
            .insert("gamma".into(), ParamValue::Number(0.1));
        assert_close(
            &merge1(&s, &fx),
            &[1., -8., 1., 1., -4., 1., -6., 1., 9., -5.],
            1e-6,
        );
        // mergekit's default density 1.0 is plain task arithmetic: θ = θ1.
        let s = spec(&["x"], Dialect::Mergekit);
        assert_close(&merge1(&s, &fx), &expert, 1e-6);
    }

    #[test]
    fn fusionbench_defaults() {
        // density 0.9, gamma 0.01 on n = 10: keep 9, top 0, bottom 1 → drop |τ| = 1;
        // λ = 0.3: θ = 0.3·τ' with θ0 = 0.
        let fx = Fixture::new("w", &[10], Some(&[0.; 10]), &[&TAU]);
        let want = [0.9, -2.7, 0., 3., -1.5, 0.6, -2.1, 1.2, 2.4, -1.8];
        assert_close(
            &merge1(&spec(&["x"], Dialect::Fusionbench), &fx),
            &want,
            1e-6,
        );
    }

    #[test]
    fn weighted_and_normalised() {
        // θ0 = [0, 0, 0, 0], τ1 = [1, 2, 3, 4] (density 0.5, gamma 0.25: keep 2, top 1,
        // bottom 1 → [0, 2, 3, 0]), τ2 = [4, 0, 0, 0] (density 1: whole).
        // weights 1, 3; λ = 2: 2·([0, 2, 3, 0] + 3·[4, 0, 0, 0]) = [24, 4, 6, 0];
        // normalised by Σw = 4: [6, 1, 1.5, 0].
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[0.; 4]),
            &[&[1., 2., 3., 4.], &[4., 0., 0., 0.]],
        );
        let mut s = spec(&["x", "y"], Dialect::Mergekit).with("lambda", 2.0);
        s.models[0]
            .parameters
            .insert("density".into(), ParamValue::Number(0.5));
        s.models[0]
            .parameters
            .insert("gamma".into(), ParamValue::Number(0.25));
        s.models[1].weight = Some(ParamValue::Number(3.0));
        assert_close(&merge1(&s, &fx), &[24., 4., 6., 0.], 1e-5);
        let s = s
            .with_value("normalize", ParamValue::Bool(true))
            .with_value("int8_mask", ParamValue::Bool(true));
        assert_close(&merge1(&s, &fx), &[6., 1., 1.5, 0.], 1e-5);
    }

    #[test]
    fn ties_variant_keeps_the_elected_sign() {
        // θ0 = 0, τ1 = [1, −2, 3, 4], τ2 = [−4, 1, −1, 2], mergekit defaults (density 1):
        // Σ = [−3, −1, 2, 6] → signs [−, −, +, +]; kept: [−4], [−2], [3], [4, 2].
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[0.; 4]),
            &[&[1., -2., 3., 4.], &[-4., 1., -1., 2.]],
        );
        let mut s = spec(&["x", "y"], Dialect::Mergekit);
        s.method = "breadcrumbs_ties".into();
        assert_close(&merge1(&s, &fx), &[-4., -2., 3., 6.], 1e-6);
        let normalized = s.clone().with_value("normalize", ParamValue::Bool(true));
        assert_close(&merge1(&normalized, &fx), &[-4., -2., 3., 3.], 1e-6);
        // τ1 at density 0.5, gamma 0.25 (keep 2, top 1, bottom 1) → [0, −2, 3, 0]:
        // Σ = [−4, −1, 2, 2]; entry 3 keeps only τ2 = 2 (a zero never agrees).
        s.models[0]
            .parameters
            .insert("density".into(), ParamValue::Number(0.5));
        s.models[0]
            .parameters
            .insert("gamma".into(), ParamValue::Number(0.25));
        assert_close(&merge1(&s, &fx), &[-4., -2., 3., 2.], 1e-6);
    }

    #[test]
    fn parameter_ranges() {
        let with = |k: &str, v: f64| spec(&["x"], Dialect::Mergekit).with(k, v);
        assert!(crate::methods::build(&with("density", 0.0)).is_err());
        assert!(crate::methods::build(&with("density", 1.2)).is_err());
        assert!(crate::methods::build(&with("gamma", 1.0)).is_err());
        assert!(crate::methods::build(&with("gamma", -0.1)).is_err());
        assert!(crate::methods::build(&with("scaling_coefficient", 0.5)).is_ok());
        assert!(crate::methods::build(&MergeSpec::new("breadcrumbs", None, &["x"])).is_err());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // θ0 = [1, 1, 1, 1]; τ1 = [0.5, −2, 1, 4] (bf16 expert), τ2 = [−1, 0.25, 0, 2] (f16);
        // density 0.5, gamma 0.25 (keep 2, top 1, bottom 1), λ = 1:
        // τ1' = [0, −2, 1, 0]; τ2': |.| = 1, 0.25, 0, 2 → ranks 2, 1, 0, 3 → keep
        // ranks 1, 2 → [−1, 0.25, 0, 0]. θ = 1 + [−1, −1.75, 1, 0] = [0, −0.75, 2, 1]
        let s = spec(&["x", "y"], Dialect::Mergekit)
            .with("density", 0.5)
            .with("gamma", 0.25);
        let got = merge_typed(
            &s,
            "w",
            &[4],
            Some((DType::F32, &[1.; 4])),
            &[
                (DType::BF16, &[1.5, -1., 2., 5.]),
                (DType::F16, &[0., 1.25, 1., 3.]),
            ],
        );
        assert_close(&got, &[0., -0.75, 2., 1.], 1e-6);
    }
}
