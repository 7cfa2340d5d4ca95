//! DARE, "drop and rescale" (Yu et al., "Language Models are Super Mario:
//! Absorbing Abilities from Homologous Models as a Free Lunch",
//! arXiv:2311.03099), as FusionBench's `dare` and mergekit's `dare_linear`
//! and `dare_ties`.
//!
//! Each task vector is sparsified entrywise: τi′ = τi ⊙ m / q with
//! m ~ Bernoulli(q) (keep probability q; no division when `rescale` is
//! false), then combined.
//!
//! **`dare` (FusionBench)**: q = 1 − p with `sparsity_ratio` p in [0, 1)
//! (default 0.5); `rescale` (true); `only_linear_weights` (also FusionBench's
//! `only_on_linear_weights`, false): when true only 2-D linear weights
//! ([`crate::spec::TensorCtx::is_linear_weight`]) are sparsified, other
//! tensors keep their whole τi. `combine`:
//! - `task_arithmetic` (default): θ0 + λ Σ τi′, `scaling_coefficient` λ
//!   (also `lambda`, `scaling_factor`; 0.3);
//! - `simple_average`: θ0 + (1/T) Σ τi′ (FusionBench's DareSimpleAverage;
//!   no λ parameter);
//! - `ties`: FusionBench's DareTiesMerging, i.e. the full `ties_merging`
//!   procedure of [`super::ties`] (trim, elect, disjoint merge) run on the
//!   sparsified τi′, with its parameters `density` / `threshold` (default
//!   0.2, FusionBench's `threshold: 20`), `merge_func` (sum), `trim_scope`
//!   (model) and λ defaulting to 0.5 (FusionBench's `scaling_factor: 0.5`).
//!   Pass `density: 1` for sign election and disjoint merge without trimming.
//!
//! **`dare_linear` / `dare_ties` (mergekit)**: per-model `density` q
//! (default 1.0 = no dropout, in (0, 1], per-tensor resolvable) and `weight`
//! (1), `rescale` (true), `normalize` (false for both, mergekit's
//! `default_normalize=False`), `lambda` (1.0), `int8_mask` (accepted, no
//! effect); then mergekit's generalised task arithmetic (the task-vector
//! engine's, shared with mergekit's `ties`) without (`dare_linear`) or with
//! (`dare_ties`) the sign consensus: θ0 + λ·(Σ wi τi′ [·mask] / divisor).
//!
//! Randomness: the masks are drawn by the task-vector engine's dropout
//! ([`super::task_vectors`]): a counter-based hash of the seed, the tensor,
//! the model and the entry, so a seed gives the same masks on every
//! platform, whatever the thread count.

use candle_core::Tensor;

use super::schema::{common, DefaultValue, Param, Range, Type};
use super::task_vectors::{streams, Dropout, MkMerge, Source};
use super::ties::{FbTies, DENSITY, MERGE_FUNC, MK_DENSITY, MK_LAMBDA, THRESHOLD, TRIM_SCOPE};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::Result;

/// FusionBench `dare` with `combine: ties`.
#[derive(Debug)]
struct DareTies {
    dropout: Dropout,
    ties: FbTies,
    lambda: Num,
}

impl DareTies {
    fn merge_with(&self, inputs: &TensorInputs, fused: bool) -> Result<Tensor> {
        let lambda = self.lambda.at(&inputs.ctx)? as f32;
        let src = Source::new(inputs, self.dropout.for_tensor(inputs)?)?;
        self.ties.merge(&src, lambda, fused)
    }
}

impl MergeMethod for DareTies {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.ties.prepare(scan, Some(&self.dropout), None)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        self.merge_with(inputs, inputs.device.is_cpu())
    }
}

/// The dropout probability p of FusionBench's `dare`.
static SPARSITY_RATIO: Param = Param::global(
    "sparsity_ratio",
    Type::Scalar,
    DefaultValue::Number(0.5),
    "probability p that an entry of a task vector is dropped",
)
.range(Range::UNIT_OPEN_ABOVE);

/// Divide the kept entries by the keep probability.
static RESCALE: Param = Param::global(
    "rescale",
    Type::Bool,
    DefaultValue::Bool(true),
    "divide the kept entries by the keep probability",
);

/// Sparsify linear weights only.
static ONLY_LINEAR_WEIGHTS: Param = Param::global(
    "only_linear_weights",
    Type::Bool,
    DefaultValue::Bool(false),
    "sparsify only 2-D linear weights; other tensors keep their whole task vector",
)
.aliases(&["only_on_linear_weights"]);

/// How FusionBench's `dare` combines the sparsified task vectors.
static COMBINE: Param = Param::global(
    "combine",
    Type::Choice(&["task_arithmetic", "simple_average", "ties"]),
    DefaultValue::Word("task_arithmetic"),
    "how the sparsified task vectors combine (`ties`: then `density`, `threshold`, `merge_func`, `trim_scope` apply)",
);

/// λ of FusionBench's `dare`.
static LAMBDA: Param = Param::global(
    "scaling_coefficient",
    Type::Number,
    DefaultValue::Depends("0.3 (0.5 with `combine: ties`)"),
    "scale λ of the merged task vector (not with `combine: simple_average`)",
)
.aliases(&["lambda", "scaling_factor"]);

/// The parameters of FusionBench's `dare`.
pub static PARAMS_FUSIONBENCH: &[&Param] = &[
    &SPARSITY_RATIO,
    &RESCALE,
    &ONLY_LINEAR_WEIGHTS,
    &COMBINE,
    &LAMBDA,
    &DENSITY,
    &THRESHOLD,
    &MERGE_FUNC,
    &TRIM_SCOPE,
];

/// The parameters of mergekit's `dare_linear` and `dare_ties`.
pub static PARAMS_MERGEKIT: &[&Param] = &[
    &common::WEIGHT,
    &MK_DENSITY,
    &RESCALE,
    &MK_NORMALIZE,
    &MK_LAMBDA,
    &common::INT8_MASK,
];

/// mergekit's `normalize` of the DARE methods (off).
static MK_NORMALIZE: Param = Param::global(
    "normalize",
    Type::Bool,
    DefaultValue::Bool(false),
    "divide by Σ wi (over the agreeing entries with `dare_ties`)",
);

/// Builds FusionBench's `dare`.
pub fn build_fusionbench(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let ratio = p.scalar(&SPARSITY_RATIO)?;
    let dropout = Dropout {
        seed: p.seed().unwrap_or(0),
        keep: vec![Num::constant("sparsity_ratio", 1.0 - ratio); p.num_models],
        streams: streams(&p.model_names()),
        rescale: p.boolean(&RESCALE)?,
        only_linear: p.boolean(&ONLY_LINEAR_WEIGHTS)?,
    };
    let combine = p.choice(&COMBINE)?;
    let lambda = match combine {
        "ties" => {
            let ties = FbTies::from_params(p)?;
            let lambda = p.number_or(&LAMBDA, 0.5)?;
            return Ok(Box::new(DareTies {
                dropout,
                ties,
                lambda,
            }));
        }
        "simple_average" => Num::constant("1/T", 1.0 / p.num_models as f64),
        _ => p.number_or(&LAMBDA, 0.3)?,
    };
    Ok(Box::new(MkMerge {
        weights: vec![Num::constant("weight", 1.0); p.num_models],
        trim: None,
        dropout: Some(dropout),
        consensus: false,
        normalize: false,
        lambda,
    }))
}

fn build_mergekit(p: &mut Params, consensus: bool) -> Result<Box<dyn MergeMethod>> {
    let weights = p.per_model(&common::WEIGHT)?;
    let keep = p.per_model(&MK_DENSITY)?;
    let dropout = Dropout {
        seed: p.seed().unwrap_or(0),
        keep,
        streams: streams(&p.model_names()),
        rescale: p.boolean(&RESCALE)?,
        only_linear: false,
    };
    let normalize = p.boolean(&MK_NORMALIZE)?;
    let lambda = p.number(&MK_LAMBDA)?;
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(MkMerge {
        weights,
        trim: None,
        dropout: Some(dropout),
        consensus,
        normalize,
        lambda,
    }))
}

/// Builds mergekit's `dare_linear`.
pub fn build_mergekit_linear(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_mergekit(p, false)
}

/// Builds mergekit's `dare_ties`.
pub fn build_mergekit_ties(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_mergekit(p, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{assert_close, merge1, merge_all, ones, Fixture};
    use crate::methods::ties::test_data::mk_spec;
    use crate::spec::{MergeSpec, ParamValue};

    fn fb(models: &[&str]) -> MergeSpec {
        MergeSpec::new("dare", Some("base"), models)
    }

    #[test]
    fn zero_sparsity_is_task_arithmetic() {
        // p = 0 keeps every entry, 1/(1 − 0) = 1: θ0 + 0.3(τ1 + τ2).
        // θ0 = [1, -2, 0.5], τ1 = [0.5, 1, -1], τ2 = [-0.25, 0.5, 2]
        // → [1 + 0.075, -2 + 0.45, 0.5 + 0.3] = [1.075, -1.55, 0.8].
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[1.0, -2.0, 0.5]),
            &[&[1.5, -1.0, -0.5], &[0.75, -1.5, 2.5]],
        );
        let spec = fb(&["a", "b"]).with("sparsity_ratio", 0.0);
        assert_close(&merge1(&spec, &fx), &[1.075, -1.55, 0.8], 1e-6);
        // simple_average: λ = 1/2 → [1.125, -1.25, 1.0].
        let spec = spec.with_value("combine", ParamValue::Text("simple_average".into()));
        assert_close(&merge1(&spec, &fx), &[1.125, -1.25, 1.0], 1e-6);
    }

    #[test]
    fn rescale_keeps_the_mean() {
        // 200k entries of τ = 1, p = 0.5, λ = 1: kept entries become
        // 1/(1 − 0.5) = 2, dropped 0; mean 1 with standard error
        // sqrt(p/(1−p)/n) = sqrt(1/200000) ≈ 0.00224; allow 5 of them.
        let n = 200_000;
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with("sparsity_ratio", 0.5);
        let got = merge1(&spec, &ones(n));
        assert!(got.iter().all(|&v| v == 0.0 || v == 2.0));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * (1.0f64 / n as f64).sqrt(),
            "mean {mean}"
        );
        // p = 0.9: kept = 10, se = sqrt(9/n) ≈ 0.0067.
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with("sparsity_ratio", 0.9);
        let got = merge1(&spec, &ones(n));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * (9.0f64 / n as f64).sqrt(),
            "mean {mean}"
        );
        // Without rescaling the mean is the keep rate, 0.1 (se sqrt(0.09/n)).
        let spec = spec.with_value("rescale", ParamValue::Bool(false));
        let got = merge1(&spec, &ones(n));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 0.1).abs() < 5.0 * (0.09f64 / n as f64).sqrt(),
            "mean {mean}"
        );
    }

    #[test]
    fn seeded_masks_are_deterministic_and_differ_across_seeds() {
        let fx = ones(20_000);
        let with_seed = |s: Option<u64>| {
            let mut spec = fb(&["a"]);
            spec.seed = s;
            merge1(&spec, &fx)
        };
        assert_eq!(with_seed(Some(7)), with_seed(Some(7)));
        assert_eq!(with_seed(None), with_seed(Some(0)));
        let (a, b) = (with_seed(Some(7)), with_seed(Some(8)));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        // Independent masks at p = 0.5 disagree on about half the entries.
        assert!(differ > 8_000 && differ < 12_000, "{differ}");
    }

    #[test]
    fn masks_follow_model_names_not_positions() {
        // dare_linear, density 0.5, weights 1: listing the models in the
        // other order gives the same merge (up to the order of the f32 sum),
        // and the same model listed twice draws two different masks.
        let n = 4000;
        let base = vec![0f32; n];
        let ea: Vec<f32> = (0..n).map(|j| (j % 7) as f32 + 1.0).collect();
        let eb: Vec<f32> = (0..n).map(|j| -((j % 5) as f32) - 1.0).collect();
        let spec = |names: &[&str]| {
            let mut s = mk_spec("dare_linear", &[(1.0, 0.5), (1.0, 0.5)]);
            for (m, name) in s.models.iter_mut().zip(names) {
                m.name = name.to_string();
            }
            s.seed = Some(1);
            s
        };
        let ab = merge1(
            &spec(&["a", "b"]),
            &Fixture::new("w", &[n], Some(&base), &[&ea, &eb]),
        );
        let ba = merge1(
            &spec(&["b", "a"]),
            &Fixture::new("w", &[n], Some(&base), &[&eb, &ea]),
        );
        assert_close(&ab, &ba, 1e-6);
        let aa = merge1(
            &spec(&["a", "a"]),
            &Fixture::new("w", &[n], Some(&base), &[&ea, &ea]),
        );
        // Two independent masks at q = 0.5: an entry gets 0, 2τ or 4τ.
        assert!(aa.iter().zip(&ea).any(|(v, e)| *v == 2.0 * e));
        assert!(aa.iter().zip(&ea).any(|(v, e)| *v == 4.0 * e));
    }

    #[test]
    fn only_linear_weights_leaves_other_tensors_whole() {
        // A norm is not a linear weight: τ = 1 stays, θ = 0 + 1·1.
        let norm = Fixture::new(
            "model.norm.weight",
            &[1000],
            Some(&[0.0; 1000]),
            &[&[1.0; 1000]],
        );
        let lin = ones(1000);
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with_value("only_linear_weights", ParamValue::Bool(true));
        let out = merge_all(&spec, &[norm, lin]);
        assert!(out[0].iter().all(|&v| v == 1.0));
        assert!(out[1].iter().all(|&v| v == 0.0 || v == 2.0));
        assert!(out[1].contains(&0.0));
    }

    /// The same experts with DARE's mask already applied to their τ.
    fn pre_dropped(fx: &Fixture, d: &Dropout) -> Fixture {
        let inputs = fx.inputs();
        let base = inputs.base.unwrap().to_f32_vec();
        let td = d.for_tensor(&inputs).unwrap().unwrap();
        let experts: Vec<Vec<f32>> = (0..fx.experts.len())
            .map(|i| {
                let mut tau: Vec<f32> = inputs.experts[i]
                    .to_f32_vec()
                    .iter()
                    .zip(&base)
                    .map(|(e, b)| e - b)
                    .collect();
                td.apply(i, 0, &mut tau);
                tau.iter().zip(&base).map(|(t, b)| b + t).collect()
            })
            .collect();
        let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        Fixture::new(&fx.name, &fx.shape, Some(&base), &refs)
    }

    #[test]
    fn dare_ties_is_ties_merging_of_the_sparsified_task_vectors() {
        // Two tensors, model scope: dare(combine: ties) with seed 5 equals
        // ties_merging over experts whose τ were masked by the same draws.
        let mk = |name: &str, n: usize, k: f32| {
            let base: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.25 - 0.5).collect();
            let e: Vec<Vec<f32>> = (0..3)
                .map(|i| {
                    (0..n)
                        .map(|j| base[j] + (((j * 31 + i * 17) % 13) as f32 - 6.0) * k)
                        .collect()
                })
                .collect();
            Fixture::new(name, &[n], Some(&base), &[&e[0], &e[1], &e[2]])
        };
        let fxs = [mk("a.weight", 3000, 0.125), mk("b.weight", 1000, 0.5)];
        let d = Dropout {
            seed: 5,
            // q = 0.5 keeps τ/q exact, so base + τ′ − base round-trips.
            keep: vec![Num::constant("q", 0.5); 3],
            streams: streams(&["x", "y", "z"]),
            rescale: true,
            only_linear: false,
        };
        let dropped = [pre_dropped(&fxs[0], &d), pre_dropped(&fxs[1], &d)];
        let mut dare = fb(&["x", "y", "z"])
            .with("sparsity_ratio", 0.5)
            .with_value("combine", ParamValue::Text("ties".into()));
        dare.seed = Some(5);
        let ties = MergeSpec::new("ties_merging", Some("base"), &["x", "y", "z"])
            .with("scaling_coefficient", 0.5);
        let got = merge_all(&dare, &fxs);
        let want = merge_all(&ties, &dropped);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-6);
        }
        // And the candle path agrees with the fused loop.
        let mut m = DareTies {
            dropout: d,
            ties: FbTies {
                density: 0.2,
                func: super::super::ties::MergeFunc::Sum,
                scope: super::super::ties::Scope::Tensor,
                tasks: 3,
                stats: None,
                held: Default::default(),
            },
            lambda: Num::constant("l", 0.5),
        };
        m.prepare(&crate::methods::testutil::FixtureScan(&fxs))
            .unwrap();
        let inputs = fxs[0].inputs();
        let fused = m
            .merge_with(&inputs, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let generic = m
            .merge_with(&inputs, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&generic, &fused, 1e-6);
    }

    #[test]
    fn mergekit_dare_linear_and_ties_by_hand() {
        // density 1: no dropout. θ0 = [1, 1, 1], τ1 = [0.5, -1, 2] (w 2),
        // τ2 = [-0.5, 0.5, 1] (w 1).
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[1.0; 3]),
            &[&[1.5, 0.0, 3.0], &[0.5, 1.5, 2.0]],
        );
        // dare_linear: Σ wτ = [0.5, -1.5, 5] → θ = [1.5, -0.5, 6].
        assert_close(
            &merge1(&mk_spec("dare_linear", &[(2.0, 1.0), (1.0, 1.0)]), &fx),
            &[1.5, -0.5, 6.0],
            1e-6,
        );
        // normalize: / Σw = 3 → [1.16667, 0.5, 2.66667].
        let spec = mk_spec("dare_linear", &[(2.0, 1.0), (1.0, 1.0)])
            .with_value("normalize", ParamValue::Bool(true));
        assert_close(
            &merge1(&spec, &fx),
            &[1.0 + 0.5 / 3.0, 0.5, 1.0 + 5.0 / 3.0],
            1e-6,
        );
        // dare_ties: δ1 = [1, -2, 4], δ2 = [-0.5, 0.5, 1]; Σ = [0.5, -1.5, 5]
        // → elected [+, -, +]; mixed = [1, -2, 5] → θ = [2, -1, 6] (no normalize).
        assert_close(
            &merge1(&mk_spec("dare_ties", &[(2.0, 1.0), (1.0, 1.0)]), &fx),
            &[2.0, -1.0, 6.0],
            1e-6,
        );
        // normalize: divisors Σ w·mask = [2, 2, 3] → [0.5, -1, 5/3] → θ = [1.5, 0, 2.6667].
        let spec = mk_spec("dare_ties", &[(2.0, 1.0), (1.0, 1.0)])
            .with_value("normalize", ParamValue::Bool(true));
        assert_close(&merge1(&spec, &fx), &[1.5, 0.0, 1.0 + 5.0 / 3.0], 1e-6);
    }

    #[test]
    fn mergekit_dare_density_is_the_keep_rate() {
        // density 0.25, weight 1, λ 1: entries are 0 or τ/0.25 = 4; about a
        // quarter kept (se sqrt(0.25·0.75/n) ≈ 0.00137 for n = 100k).
        let n = 100_000;
        let got = merge1(&mk_spec("dare_linear", &[(1.0, 0.25)]), &ones(n));
        assert!(got.iter().all(|&v| v == 0.0 || v == 4.0));
        let rate = got.iter().filter(|&&v| v == 4.0).count() as f64 / n as f64;
        assert!((rate - 0.25).abs() < 5.0 * 0.00137, "{rate}");
    }

    #[test]
    fn parameters_are_validated() {
        for (k, v) in [("sparsity_ratio", 1.0), ("sparsity_ratio", -0.1)] {
            let err = crate::methods::build(&fb(&["a"]).with(k, v))
                .err()
                .expect("rejected");
            assert!(err.to_string().contains(k), "{err}");
        }
        // λ is not a parameter of simple_average; trimming only of ties.
        let sa = fb(&["a"])
            .with_value("combine", ParamValue::Text("simple_average".into()))
            .with("scaling_coefficient", 0.3);
        assert!(crate::methods::build(&sa).is_err());
        assert!(crate::methods::build(&fb(&["a"]).with("density", 0.2)).is_err());
        let err = crate::methods::build(&mk_spec("dare_ties", &[(1.0, 0.0)]))
            .err()
            .expect("density 0");
        assert!(err.to_string().contains("density"), "{err}");
    }
}
