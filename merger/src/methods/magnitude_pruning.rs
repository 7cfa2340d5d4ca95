//! Magnitude pruning (FusionBench `magnitude_diff_pruning` and
//! `magnitude_prune`; Han et al. 2015, arXiv:1506.02626, and the 2:4 n:m
//! sparsity of Mishra et al. 2021, arXiv:2104.08378), with exactly one expert.
//!
//! Which tensors are pruned: 2-D linear-layer weights, i.e. 2-D tensors whose
//! name ends in `.weight` and names no embedding or norm
//! ([`TensorCtx::is_linear_weight`], plus GPT-2's `wte`/`wpe` excluded),
//! standing for FusionBench's `nn.Linear` weights.
//!
//! - `mode: diff` (default, FusionBench's `MagnitudeDiffPruningAlgorithm`):
//!   needs the base θ0. For each pruned tensor, τ = θ1 − θ0 and, per output
//!   row, the ⌊prune_ratio·cols⌋ entries of smallest |τ| (`prune_type:
//!   minor`) or largest |τ| (`major`) are zeroed; θ = θ0 + τ. Every other
//!   tensor is θ0, as in FusionBench, which starts from the pretrained model
//!   and only adds the pruned differences of the linear weights (biases,
//!   norms and embeddings stay pretrained).
//! - `mode: weights` (FusionBench's `MagnitudePruningForLlama`): prunes the
//!   single model's own weights, no base (a base in the spec is an error: it
//!   would be unclear which model is pruned). Only linear weights inside the
//!   transformer layers (tensors with a layer index) are pruned, as
//!   FusionBench prunes `model.layers` and leaves `lm_head` alone; every
//!   other tensor is copied. Unstructured: per row, the ⌊prune_ratio·cols⌋
//!   entries of smallest (`minor`) or largest (`major`) |w| are zeroed. With
//!   `n` and `m` (n:m semi-structured, e.g. 2:4): in every group of m
//!   consecutive input columns the n entries of smallest (`minor`) or largest
//!   (`major`) |w| are zeroed; the column count must be a multiple of m.
//!
//! Ties are broken by position (the earlier entry is pruned first), as
//! FusionBench's stable sort does. Pruning is a selection, so it runs on the
//! host; the result is moved to the merge device.
//!
//! Parameters: `mode` diff | weights (diff); `prune_ratio` (FusionBench's
//! llama pruning calls it `sparsity_ratio`) in [0, 1), default 0.5,
//! per-tensor resolvable; `prune_type` minor | major (minor); `n`, `m`
//! integers with 1 ≤ n < m, weights mode only, and then without
//! `prune_ratio`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::schema::{DefaultValue, Param, Range, Type};
use super::{MergeMethod, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};
use crate::select::rank_range_mask;
use crate::spec::TensorCtx;

/// Which model's tensors are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The task vector θ1 − θ0.
    Diff,
    /// The model's own weights θ1.
    Weights,
}

/// How many entries of a row are zeroed.
#[derive(Debug)]
enum Sparsity {
    /// ⌊ratio·cols⌋ per row.
    Ratio(Num),
    /// n in every m consecutive columns.
    NOfM(usize, usize),
}

/// Magnitude pruning of one expert.
#[derive(Debug)]
struct MagnitudePruning {
    mode: Mode,
    sparsity: Sparsity,
    /// Prune the largest magnitudes instead of the smallest.
    major: bool,
}

/// What is pruned.
static MODE: Param = Param::global(
    "mode",
    Type::Choice(&["diff", "weights"]),
    DefaultValue::Word("diff"),
    "prune the task vector (`diff`, base needed) or the weights themselves (`weights`, no base)",
);

/// Which magnitudes are pruned.
static PRUNE_TYPE: Param = Param::global(
    "prune_type",
    Type::Choice(&["minor", "major"]),
    DefaultValue::Word("minor"),
    "prune the smallest (`minor`) or the largest (`major`) magnitudes",
);

/// The fraction of each row pruned.
static PRUNE_RATIO: Param = Param::global(
    "prune_ratio",
    Type::Number,
    DefaultValue::Number(0.5),
    "fraction of each row pruned (not with `n`/`m`)",
)
.aliases(&["sparsity_ratio"])
.range(Range::UNIT_OPEN_ABOVE);

/// n of n:m pruning.
static N: Param = Param::global(
    "n",
    Type::Integer,
    DefaultValue::Unset,
    "n:m pruning (`mode: weights`): zero n of every m consecutive input columns, n < m",
)
.range(Range::at_least(1.0));

/// m of n:m pruning.
static M: Param = Param::global(
    "m",
    Type::Integer,
    DefaultValue::Unset,
    "n:m pruning: the group size m",
)
.range(Range::at_least(2.0));

/// The parameters of `magnitude_pruning`.
pub static PARAMS: &[&Param] = &[&MODE, &PRUNE_TYPE, &PRUNE_RATIO, &N, &M];

/// Builds `magnitude_pruning`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let mode = match p.choice(&MODE)? {
        "weights" => Mode::Weights,
        _ => Mode::Diff,
    };
    let major = p.choice(&PRUNE_TYPE)? == "major";
    let ratio_set = p.is_set(&PRUNE_RATIO);
    let ratio = p.number(&PRUNE_RATIO)?;
    let n = p.integer_opt(&N)?.map(|n| n as usize);
    let m = p.integer_opt(&M)?.map(|m| m as usize);
    let sparsity = match (n, m) {
        (None, None) => Sparsity::Ratio(ratio),
        (Some(_), None) | (None, Some(_)) => {
            return Err(MergeError::BadParameter {
                param: if n.is_some() { "m" } else { "n" }.into(),
                reason: "n:m pruning needs both `n` and `m`".into(),
            })
        }
        (Some(n), Some(m)) => {
            if mode == Mode::Diff {
                return Err(MergeError::BadParameter {
                    param: "n".into(),
                    reason: "n:m pruning applies to mode=weights only".into(),
                });
            }
            if ratio_set {
                return Err(MergeError::BadParameter {
                    param: "prune_ratio".into(),
                    reason:
                        "n:m pruning fixes the ratio at n/m; give either prune_ratio or n and m"
                            .into(),
                });
            }
            if n >= m {
                return Err(MergeError::range(
                    "n",
                    n,
                    &format!("an integer in [1, m) = [1, {m})"),
                ));
            }
            Sparsity::NOfM(n, m)
        }
    };
    Ok(Box::new(MagnitudePruning {
        mode,
        sparsity,
        major,
    }))
}

/// True for a 2-D linear-layer weight.
fn is_linear_2d(ctx: &TensorCtx, shape: &[usize]) -> bool {
    shape.len() == 2
        && ctx.is_linear_weight()
        && !ctx.name.contains("wte")
        && !ctx.name.contains("wpe")
}

/// The pruning key: ascending key order = pruning order.
fn key(major: bool) -> fn(&f32) -> f32 {
    if major {
        |x| -x.abs()
    } else {
        |x| x.abs()
    }
}

/// Zeroes the first `k` entries in key order of every row of `cols`.
fn prune_rows(data: &mut [f32], cols: usize, k: usize, major: bool) {
    if k == 0 {
        return;
    }
    let key = key(major);
    data.par_chunks_mut(cols).for_each(|row| {
        let keys: Vec<f32> = row.iter().map(key).collect();
        let keep = rank_range_mask(&keys, k, cols);
        row.iter_mut()
            .zip(keep)
            .filter(|(_, k)| !k)
            .for_each(|(x, _)| *x = 0.0);
    });
}

/// Zeroes the first `n` entries in key order of every group of `m` columns.
fn prune_n_of_m(data: &mut [f32], cols: usize, n: usize, m: usize, major: bool) {
    let key = key(major);
    data.par_chunks_mut(cols).for_each(|row| {
        let mut order: Vec<usize> = Vec::with_capacity(m);
        for group in row.chunks_mut(m) {
            order.clear();
            order.extend(0..group.len());
            // Stable: equal keys keep their column order.
            order.sort_by(|&i, &j| key(&group[i]).total_cmp(&key(&group[j])));
            for &i in &order[..n] {
                group[i] = 0.0;
            }
        }
    });
}

impl MagnitudePruning {
    /// Prunes `data` (a [rows, cols] weight or task vector) in place.
    fn prune(&self, inputs: &TensorInputs, data: &mut [f32], cols: usize) -> Result<()> {
        match &self.sparsity {
            Sparsity::Ratio(ratio) => {
                let k = (ratio.at(&inputs.ctx)? * cols as f64).floor() as usize;
                prune_rows(data, cols, k, self.major);
            }
            Sparsity::NOfM(n, m) => {
                if cols / m * m != cols {
                    return Err(MergeError::BadParameter {
                        param: "m".into(),
                        reason: format!(
                            "tensor `{}` has {cols} input columns, not a multiple of m = {m}",
                            inputs.ctx.name
                        ),
                    });
                }
                prune_n_of_m(data, cols, *n, *m, self.major);
            }
        }
        Ok(())
    }
}

impl MergeMethod for MagnitudePruning {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let shape = inputs.shape().to_vec();
        let expert = &inputs.experts[0];
        let out = match self.mode {
            Mode::Diff => {
                let base = inputs.base.as_ref().ok_or_else(|| MergeError::MissingBase {
                    method: "magnitude_pruning (mode=diff; use mode=weights to prune one model without a base)".into(),
                })?;
                if !is_linear_2d(&inputs.ctx, &shape) || shape[1] == 0 {
                    return inputs.base_f32();
                }
                let b = base.to_f32_vec();
                let mut tau = expert.to_f32_vec();
                tau.par_iter_mut().zip(&b).for_each(|(t, b)| *t -= b);
                self.prune(inputs, &mut tau, shape[1])?;
                tau.par_iter_mut().zip(&b).for_each(|(t, b)| *t += b);
                tau
            }
            Mode::Weights => {
                if inputs.base.is_some() {
                    return Err(MergeError::BadParameter {
                        param: "mode".into(),
                        reason: "mode=weights prunes one model's own weights, but a base model was given too; \
                                 drop the base, or use mode=diff to prune the expert's difference from the base"
                            .into(),
                    });
                }
                let in_layer = inputs.ctx.layer.is_some();
                if !in_layer || !is_linear_2d(&inputs.ctx, &shape) || shape[1] == 0 {
                    return inputs.expert_f32(0);
                }
                let mut w = expert.to_f32_vec();
                self.prune(inputs, &mut w, shape[1])?;
                w
            }
        };
        Tensor::from_vec(out, shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_device(inputs.device))
            .map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use crate::error::MergeError;
    use crate::methods::testutil::{assert_close, build, merge1, merge_typed, Fixture};
    use crate::spec::{MergeSpec, ParamValue};

    const W: &str = "model.layers.0.mlp.up_proj.weight";

    fn diff() -> MergeSpec {
        MergeSpec::new("magnitude_pruning", Some("base"), &["x"])
    }

    fn weights() -> MergeSpec {
        MergeSpec::new("magnitude_pruning", None, &["x"])
            .with_value("mode", ParamValue::Text("weights".into()))
    }

    #[test]
    fn diff_minor_prunes_the_smallest_per_row() {
        // θ0 = 1 everywhere. τ row 0 = [0.1, −3, 0.5, 2], row 1 = [1, 1, −1, 4].
        // ratio 0.5 of 4 cols → 2 per row. Row 0 drops 0.1, 0.5; row 1 drops
        // the first two of the tied |1|s: τ' = [0, −3, 0, 2 | 0, 0, −1, 4].
        let base = [1f32; 8];
        let fx = Fixture::new(
            W,
            &[2, 4],
            Some(&base),
            &[&[1.1, -2., 1.5, 3., 2., 2., 0., 5.]],
        );
        assert_close(
            &merge1(&diff(), &fx),
            &[1., -2., 1., 3., 1., 1., 0., 5.],
            1e-6,
        );
    }

    #[test]
    fn diff_major_prunes_the_largest_per_row() {
        // Same τ; major drops the two largest |τ| per row:
        // row 0 drops −3, 2 → [0.1, 0, 0.5, 0]; row 1 drops 4 then the first |1| → [0, 1, −1, 0].
        let base = [1f32; 8];
        let fx = Fixture::new(
            W,
            &[2, 4],
            Some(&base),
            &[&[1.1, -2., 1.5, 3., 2., 2., 0., 5.]],
        );
        let s = diff().with_value("prune_type", ParamValue::Text("major".into()));
        assert_close(&merge1(&s, &fx), &[1.1, 1., 1.5, 1., 1., 2., 0., 1.], 1e-6);
    }

    #[test]
    fn ratio_is_floored_per_row() {
        // 3 cols, ratio 0.7 → ⌊2.1⌋ = 2 per row; θ0 = 0: keeps only the largest.
        let fx = Fixture::new(W, &[1, 3], Some(&[0., 0., 0.]), &[&[-1., 3., 2.]]);
        assert_close(
            &merge1(&diff().with("prune_ratio", 0.7), &fx),
            &[0., 3., 0.],
            0.0,
        );
        // ratio 0.3 → ⌊0.9⌋ = 0: nothing pruned.
        assert_close(
            &merge1(&diff().with("prune_ratio", 0.3), &fx),
            &[-1., 3., 2.],
            0.0,
        );
    }

    #[test]
    fn diff_mode_keeps_the_base_for_other_tensors() {
        let bias = Fixture::new(
            "model.layers.0.mlp.up_proj.bias",
            &[2],
            Some(&[1., 2.]),
            &[&[5., 6.]],
        );
        assert_close(&merge1(&diff(), &bias), &[1., 2.], 0.0);
        let emb = Fixture::new(
            "model.embed_tokens.weight",
            &[1, 2],
            Some(&[1., 2.]),
            &[&[5., 6.]],
        );
        assert_close(&merge1(&diff(), &emb), &[1., 2.], 0.0);
    }

    #[test]
    fn diff_mode_needs_a_base() {
        let fx = Fixture::new(W, &[1, 2], None, &[&[1., 2.]]);
        let m = build(&MergeSpec::new("magnitude_pruning", None, &["x"]));
        assert!(matches!(
            m.merge(&fx.inputs()),
            Err(MergeError::MissingBase { .. })
        ));
    }

    #[test]
    fn weights_mode_unstructured() {
        // ratio 0.5 of 4 cols → zero the 2 smallest |w| per row:
        // [4, −0.5, 1, −3] → [4, 0, 0, −3]; [0.2, 0.1, −0.3, 9] → [0, 0, −0.3, 9]
        let fx = Fixture::new(
            W,
            &[2, 4],
            None,
            &[&[4., -0.5, 1., -3., 0.2, 0.1, -0.3, 9.]],
        );
        assert_close(
            &merge1(&weights(), &fx),
            &[4., 0., 0., -3., 0., 0., -0.3, 9.],
            0.0,
        );
    }

    #[test]
    fn weights_mode_two_of_four() {
        // groups [1, −5, 3, 0.5] → zero 0.5 and 1 → [0, −5, 3, 0];
        // [2, 2, −7, 1] → zero 1 then the first 2 → [0, 2, −7, 0].
        let s = weights().with("n", 2.).with("m", 4.);
        let fx = Fixture::new(W, &[1, 8], None, &[&[1., -5., 3., 0.5, 2., 2., -7., 1.]]);
        assert_close(&merge1(&s, &fx), &[0., -5., 3., 0., 0., 2., -7., 0.], 0.0);
    }

    #[test]
    fn n_of_m_needs_divisible_columns() {
        let m = build(&weights().with("n", 2.).with("m", 4.));
        let fx = Fixture::new(W, &[1, 6], None, &[&[1., 2., 3., 4., 5., 6.]]);
        match m.merge(&fx.inputs()) {
            Err(MergeError::BadParameter { param, reason }) => {
                assert_eq!(param, "m");
                assert!(reason.contains(W) && reason.contains('6'), "{reason}");
            }
            other => panic!("expected BadParameter, got {other:?}"),
        }
    }

    #[test]
    fn weights_mode_copies_other_tensors() {
        let fx = Fixture::new("lm_head.weight", &[1, 2], None, &[&[1., 2.]]);
        assert_close(&merge1(&weights(), &fx), &[1., 2.], 0.0);
        let fx = Fixture::new(
            "model.layers.0.input_layernorm.weight",
            &[2],
            None,
            &[&[1., 2.]],
        );
        assert_close(&merge1(&weights(), &fx), &[1., 2.], 0.0);
    }

    #[test]
    fn weights_mode_rejects_a_base() {
        let fx = Fixture::new(W, &[1, 2], Some(&[0., 0.]), &[&[1., 2.]]);
        let mut s = weights();
        s.base = Some("base".into());
        assert!(matches!(
            build(&s).merge(&fx.inputs()),
            Err(MergeError::BadParameter { .. })
        ));
    }

    #[test]
    fn parameter_validation() {
        let bad = |s: MergeSpec| assert!(crate::methods::build(&s).is_err(), "{s:?}");
        bad(diff().with("prune_ratio", 1.0));
        bad(diff().with("prune_ratio", -0.1));
        bad(diff().with_value("prune_type", ParamValue::Text("medium".into())));
        bad(diff().with("n", 2.).with("m", 4.));
        bad(weights().with("n", 2.));
        bad(weights().with("n", 4.).with("m", 4.));
        bad(weights().with("n", 0.).with("m", 4.));
        bad(weights()
            .with("n", 2.)
            .with("m", 4.)
            .with("prune_ratio", 0.5));
        bad(MergeSpec::new(
            "magnitude_pruning",
            Some("base"),
            &["x", "y"],
        ));
        bad(MergeSpec::new("magnitude_pruning", None, &["x", "y"])
            .with_value("mode", ParamValue::Text("weights".into())));
        assert!(crate::methods::build(&weights().with("sparsity_ratio", 0.25)).is_ok());
    }

    #[test]
    fn bf16_and_f16_experts_with_an_f32_base() {
        // diff: θ0 = 0 (f32), θ1 bf16 [0.5, −2, 1, 0.25] → drop 0.25, 0.5 → [0, −2, 1, 0]
        let got = merge_typed(
            &diff(),
            W,
            &[1, 4],
            Some((DType::F32, &[0.; 4])),
            &[(DType::BF16, &[0.5, -2., 1., 0.25])],
        );
        assert_close(&got, &[0., -2., 1., 0.], 0.0);
        // weights: f16 [3, −0.5, 0.75, −4] → drop −0.5, 0.75 → [3, 0, 0, −4]
        let got = merge_typed(
            &weights(),
            W,
            &[1, 4],
            None,
            &[(DType::F16, &[3., -0.5, 0.75, -4.])],
        );
        assert_close(&got, &[3., 0., 0., -4.], 0.0);
    }
}
