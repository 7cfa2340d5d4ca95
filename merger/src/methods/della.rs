//! DELLA, drop and rescale by magnitude rank (mergekit `della` and
//! `della_linear`; Deep et al. 2024, "DELLA-Merging: Reducing Interference
//! in Model Merging through Magnitude-Based Sampling", arXiv:2406.11617).
//!
//! Per tensor and expert, τi = θi − θ0, with density d and `epsilon` ε
//! (mergekit's `della_magprune`):
//!
//! ```text
//! view τ as [d0, d1, rest] (a 1-D tensor as one row) and rank each
//! line along dim 1 by |τ| ascending: r = 0 … d1 − 1
//! p = (d − ε) + 2ε · r / (d1 − 1)        (larger magnitudes kept more often)
//! m ~ Bernoulli(p),  τ′ = τ ⊙ m
//! rescale:  τ′ ← τ′ · ‖τ‖₁ / ‖τ′‖₁        (skipped when either is < 1e-7)
//! ```
//!
//! then mergekit's generalized task arithmetic ([`super::task_vectors::Mix`])
//! on δi = wi τi′: `della` with the sign consensus (+ where Σ δi ≥ 0),
//! `della_linear` without; θ = θ0 + λ · mix, divided first by the (agreeing)
//! weights' sum when `normalize`.
//!
//! d = 1 keeps τ whole (no draw). d ± ε must lie in (0, 1) otherwise (the
//! error names both). As in mergekit the rescaling matches the L1 norm of
//! the whole tensor (mergekit's `RescaleNorm.l1`), not 1/p per entry as
//! the paper writes it. Where mergekit leaves details open, here: equal
//! magnitudes rank by position (torch's `argsort` is not stable), and a
//! line of one entry (d1 = 1, where mergekit divides 0 by 0) is kept with
//! probability d.
//!
//! Parameters (mergekit's names and defaults):
//! - per-model `weight` (1; mergekit requires it), `density` d in (0, 1]
//!   (1), `epsilon` ε ≥ 0 (0.15);
//! - `lambda` or `scaling_coefficient` λ (1.0), `normalize` (`della`: true,
//!   `della_linear`: false), `rescale` (true), `int8_mask` (accepted, no
//!   effect); all numbers per-tensor resolvable;
//! - the spec's `seed` (0 when absent) draws the masks.
//!
//! Randomness: entry j of model i keeps with U < ⌊p·2³²⌉, U the keyed
//! per-entry hash of the DARE masks ([`super::task_vectors::EntryWords`])
//! under the domain `fusion-gateway/della/v1`, keyed by (seed, tensor,
//! model name and repeat), so a seed gives the same masks everywhere,
//! whatever the thread count or the order the models are listed in. The
//! ranking is a sort per line, so the method runs on the host and moves the
//! result to the merge device.

use candle_core::Tensor;
use rayon::prelude::*;

use super::lines::Lines;
use super::schema::{common, DefaultValue, Param, Range, Type};
use super::task_arithmetic::NORMALIZE as NORMALIZE_OFF;
use super::task_vectors::{rescale_l1, streams, EntryWords, Mix};
use super::ties::{MK_DENSITY, MK_LAMBDA};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// The domain of DELLA's random words.
const DOMAIN: &str = "fusion-gateway/della/v1";

/// DELLA's sparsification, then mergekit's generalized task arithmetic.
#[derive(Debug)]
struct Della {
    name: &'static str,
    weights: Vec<Num>,
    density: Vec<Num>,
    epsilon: Vec<Num>,
    lambda: Num,
    normalize: bool,
    rescale: bool,
    consensus: bool,
    seed: u64,
    streams: Vec<(String, u64)>,
}

/// The half-width ε of the keep probabilities around the density.
static EPSILON: Param = Param::per_model(
    "epsilon",
    0.15,
    "half-width of the keep probabilities around the density: the smallest magnitude of a \
     row keeps with density − epsilon, the largest with density + epsilon",
)
.range(Range::NON_NEGATIVE);

/// `normalize` of `della` (on).
static NORMALIZE_ON: Param = Param::global(
    "normalize",
    Type::Bool,
    DefaultValue::Bool(true),
    "divide by Σ wi over the entries that agree with the elected sign",
);

/// `rescale` (on): restore each sparsified task vector's L1 norm.
static RESCALE: Param = Param::global(
    "rescale",
    Type::Bool,
    DefaultValue::Bool(true),
    "scale each sparsified task vector back to its L1 norm",
);

/// The parameters of `della`.
pub static PARAMS: &[&Param] = &[
    &common::WEIGHT,
    &MK_DENSITY,
    &EPSILON,
    &MK_LAMBDA,
    &NORMALIZE_ON,
    &RESCALE,
    &common::INT8_MASK,
];

/// The parameters of `della_linear`.
pub static PARAMS_LINEAR: &[&Param] = &[
    &common::WEIGHT,
    &MK_DENSITY,
    &EPSILON,
    &MK_LAMBDA,
    &NORMALIZE_OFF,
    &RESCALE,
    &common::INT8_MASK,
];

/// Builds `della`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_with(p, "della", &NORMALIZE_ON, true)
}

/// Builds `della_linear`.
pub fn build_linear(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_with(p, "della_linear", &NORMALIZE_OFF, false)
}

fn build_with(
    p: &mut Params,
    name: &'static str,
    normalize: &Param,
    consensus: bool,
) -> Result<Box<dyn MergeMethod>> {
    p.boolean(&common::INT8_MASK)?;
    Ok(Box::new(Della {
        name,
        weights: p.per_model(&common::WEIGHT)?,
        density: p.per_model(&MK_DENSITY)?,
        epsilon: p.per_model(&EPSILON)?,
        lambda: p.number(&MK_LAMBDA)?,
        normalize: p.boolean(normalize)?,
        rescale: p.boolean(&RESCALE)?,
        consensus,
        seed: p.seed().unwrap_or(0),
        streams: streams(&p.model_names()),
    }))
}

/// The lines DELLA ranks: along dim 1, a 1-D tensor as one row.
fn lines(shape: &[usize]) -> Lines {
    if shape.len() < 2 {
        Lines::whole(shape.iter().product())
    } else {
        Lines::along(shape, 1)
    }
}

/// mergekit's `della_magprune` of one task vector, in place.
fn magprune(tau: &mut [f32], lines: Lines, density: f64, epsilon: f64, words: &EntryWords) {
    let len = lines.len;
    lines.for_each_mut(tau, |line, v| {
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()));
        for (rank, &r) in order.iter().enumerate() {
            let spread = if len > 1 {
                rank as f64 / (len - 1) as f64
            } else {
                0.5
            };
            let p = (density - epsilon) + spread * 2.0 * epsilon;
            if !words.keeps(lines.index(line, r) as u64, p) {
                v[r] = 0.0;
            }
        }
    });
}

impl MergeMethod for Della {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let lines = lines(inputs.shape());
        let mix = Mix {
            consensus: self.consensus,
            normalize: self.normalize,
            lambda: self.lambda.at(ctx)? as f32,
        };
        mix.merge_host(inputs, self.name, &self.weights, |i, tau| {
            let d = self.density[i].at(ctx)?;
            if d >= 1.0 {
                return Ok(());
            }
            let eps = self.epsilon[i].at(ctx)?;
            if d + eps >= 1.0 || d - eps <= 0.0 {
                return Err(MergeError::BadParameter {
                    param: format!("models[{}].epsilon", self.streams[i].0),
                    reason: format!(
                        "density ± epsilon must lie in (0, 1); in tensor `{}` density is {d} \
                         and epsilon {eps}",
                        ctx.name
                    ),
                });
            }
            let before: f64 = tau.par_iter().map(|x| x.abs() as f64).sum();
            let words = EntryWords::new(DOMAIN, self.seed, &ctx.name, &self.streams[i]);
            magprune(tau, lines, d, eps, &words);
            if self.rescale {
                rescale_l1(tau, before);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{assert_close, merge1, Fixture};
    use crate::spec::{Dialect, MergeSpec, ParamValue};

    fn spec(method: &str, models: &[&str]) -> MergeSpec {
        let mut s = MergeSpec::new(method, Some("base"), models);
        s.dialect = Dialect::Mergekit;
        s
    }

    #[test]
    fn density_one_is_the_consensus_or_linear_mix() {
        // θ0 = 0, τ1 = [1, −2, 3, 4], τ2 = [−4, 1, −1, 2], weights 1 and 0.5:
        // δ = [1, −2, 3, 4], [−2, 0.5, −0.5, 1]; Σ = [−1, −1.5, 2.5, 5] → [−, −, +, +];
        // della (normalize): [−2/0.5, −2/1, 3/1, 5/1.5]; della_linear: Σ δ.
        let fx = Fixture::new(
            "w",
            &[4],
            Some(&[0.; 4]),
            &[&[1., -2., 3., 4.], &[-4., 1., -1., 2.]],
        );
        let mut s = spec("della", &["x", "y"]);
        s.models[1].weight = Some(ParamValue::Number(0.5));
        assert_close(&merge1(&s, &fx), &[-4., -2., 3., 5. / 1.5], 1e-6);
        s.method = "della_linear".into();
        assert_close(&merge1(&s, &fx), &[-1., -1.5, 2.5, 5.], 1e-6);
        let s = s.with("lambda", 2.0);
        assert_close(&merge1(&s, &fx), &[-2., -3., 5., 10.], 1e-6);
    }

    /// τ = 1 + c/1000 in row-major order on a rows × cols matrix: every row
    /// ranks its entries by column.
    fn ramp(rows: usize, cols: usize) -> Fixture {
        let tau: Vec<f32> = (0..rows * cols)
            .map(|j| 1.0 + (j % cols) as f32 / 1000.0)
            .collect();
        Fixture::new(
            "model.layers.0.mlp.up_proj.weight",
            &[rows, cols],
            Some(&vec![0.0; rows * cols]),
            &[&tau],
        )
    }

    #[test]
    fn keep_rates_follow_the_magnitude_ranks() {
        // density 0.5, epsilon 0.2: column c keeps with p = 0.3 + 0.4·c/(cols − 1).
        let (rows, cols) = (4000, 5);
        let fx = ramp(rows, cols);
        let s = spec("della_linear", &["x"])
            .with("density", 0.5)
            .with("epsilon", 0.2)
            .with_value("rescale", ParamValue::Bool(false));
        let got = merge1(&s, &fx);
        for c in 0..cols {
            let kept = (0..rows).filter(|r| got[r * cols + c] != 0.0).count();
            let rate = kept as f64 / rows as f64;
            let p = 0.3 + 0.4 * c as f64 / (cols - 1) as f64;
            // 4000 draws: σ ≤ 0.008.
            assert!((rate - p).abs() < 0.035, "column {c}: kept {rate}, p {p}");
        }
        // What is kept is τ itself.
        for (j, g) in got.iter().enumerate() {
            assert!(*g == 0.0 || *g == 1.0 + (j % cols) as f32 / 1000.0);
        }
    }

    #[test]
    fn rescaling_restores_the_l1_norm_and_seeds_repeat() {
        let fx = ramp(50, 40);
        let s = spec("della_linear", &["x"]).with("density", 0.4);
        let got = merge1(&s, &fx);
        let before: f64 = (0..2000).map(|j| 1.0 + (j % 40) as f64 / 1000.0).sum();
        let after: f64 = got.iter().map(|x| x.abs() as f64).sum();
        assert!((after / before - 1.0).abs() < 1e-5, "{after} vs {before}");
        assert!(got.contains(&0.0));
        assert_eq!(got, merge1(&s, &fx), "the same seed gives the same masks");
        let mut other = s.clone();
        other.seed = Some(9);
        assert_ne!(got, merge1(&other, &fx), "another seed draws other masks");
    }

    #[test]
    fn lines_follow_dim_one() {
        // A [2, 3, 2] tensor ranks along dim 1: entries (o, ·, k) form a line.
        assert_eq!(lines(&[2, 3, 2]), Lines::along(&[2, 3, 2], 1));
        assert_eq!(lines(&[7]), Lines::whole(7));
        // ε = 0.5 at density 0.5 gives p = 0 … 1 along each line: the
        // smallest |τ| of a line is never kept, the largest always is.
        // d ± ε must lie in (0, 1), so this is refused ...
        let fx = Fixture::new(
            "w",
            &[2, 3, 2],
            Some(&[0.; 12]),
            &[&[1., 6., 2., 5., 3., 4., 6., 1., 5., 2., 4., 3.]],
        );
        let s = spec("della_linear", &["x"])
            .with("density", 0.5)
            .with("epsilon", 0.5);
        let inputs = fx.inputs();
        let m = crate::methods::build(&s).unwrap().1;
        let err = m.merge(&inputs).unwrap_err().to_string();
        assert!(err.contains("epsilon") && err.contains("(0, 1)"), "{err}");
        // ... and at ε = 0.499 the extremes keep with p = 0.001 and 0.999.
        let s = s
            .with("epsilon", 0.499)
            .with_value("rescale", ParamValue::Bool(false));
        let got = merge1(&s, &fx);
        // Line (o=0, k=0) is [1, 2, 3]: 3 is its largest, 1 its smallest.
        assert_eq!(got[4], 3.0, "{got:?}");
        assert_eq!(got[0], 0.0, "{got:?}");
        // Line (o=1, k=1) is [1, 2, 3] at positions 7, 9, 11.
        assert_eq!(got[11], 3.0, "{got:?}");
        assert_eq!(got[7], 0.0, "{got:?}");
    }

    #[test]
    fn parameter_ranges() {
        let s = |k: &str, v: f64| spec("della", &["x"]).with(k, v);
        assert!(crate::methods::build(&s("density", 0.0)).is_err());
        assert!(crate::methods::build(&s("density", 1.5)).is_err());
        assert!(crate::methods::build(&s("epsilon", -0.1)).is_err());
        assert!(crate::methods::build(&s("epsilon", f64::NAN)).is_err());
        assert!(crate::methods::build(&s("epsilon", 0.1)).is_ok());
        assert!(crate::methods::build(&MergeSpec::new("della", None, &["x"])).is_err());
    }
}
