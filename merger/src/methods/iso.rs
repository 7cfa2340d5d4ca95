//! ISO-C and ISO-CTS: isotropic merging in the common (and task-specific)
//! subspace.
//!
//! Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
//! and Task-Specific Subspaces", arXiv:2502.04959, as implemented by
//! FusionBench (`method/isotropic_merging/iso_utils.py`).
//!
//! `iso_c`, per matrix (every 2-D tensor not named in `exclude_keys`, the
//! token embedding and `lm_head` included, as in FusionBench):
//!
//! ```text
//! Δ = Σi τi = U diag(s) Vᵀ          (thin SVD, r = min(rows, cols) values)
//! s̄ = (1/r) Σj sj
//! θ = θ0 + α·s̄·U Vᵀ
//! ```
//!
//! `iso_cts`, per matrix, with f = `common_space_fraction`:
//!
//! ```text
//! k0 = ⌊f·r⌋;  n = round((r − k0)/T) (half to even, as Python's round),
//!      capped at ⌊r/T⌋;  k = r − T·n
//! Uc, sc, Vc = the top k triplets of the SVD of Σi τi       (common subspace)
//! for each task i: the top n triplets Ui, si, Vi of the SVD of
//!      τi − Uc Ucᵀ τi                                      (task subspaces)
//! U = polar([Uc, U1, …, UT]),  V = polar([Vc, V1, …, VT])     (rows×r, cols×r)
//! s̄ = mean of the r values [sc, s1, …, sT]
//! θ = θ0 + α·s̄·U Vᵀ
//! ```
//!
//! polar(A) = X Yᵀ for A = X Σ Yᵀ, the nearest matrix with orthonormal
//! columns. When n = 0 (f = 1, or too few dimensions per task) the common
//! subspace is everything and `iso_cts` equals `iso_c`.
//!
//! Every other tensor (1-D norms and biases, and the tensors named in
//! `exclude_keys`): θ0 + α·(1/T) Σ τi.
//!
//! Parameters:
//! - `alpha` (alias FusionBench's `scaling_factor`): any finite number,
//!   default 1.0; per-tensor values allowed. FusionBench's ISO-CTS table used
//!   1.5, ISO-C 1.0.
//! - `common_space_fraction` (`iso_cts` only): in (0, 1], default 0.8.
//! - `exclude_keys`: tensor names (or `*` patterns) left to the plain mean,
//!   default none; see `matrix_targets`. The embedding is the costly
//!   matrix (an SVD of vocab × hidden, and for `iso_cts` one per task too).
//!
//! Choices against FusionBench: (1) FusionBench's k = r − T·round((r −
//! ⌊f r⌋)/T) turns negative when the rounding goes up past r (r = 2, T = 3,
//! f = 0.1); here n is capped so that k ≥ 0; otherwise the split is
//! FusionBench's. (2) Singular
//! values equal to zero keep their (arbitrary) singular vectors, as in
//! FusionBench: a rank-deficient Σ τi gives a result that is s̄ times an
//! orthogonal map on the whole space, not unique on the null space.

use candle_core::Tensor;
use faer::{Mat, Scale};

use super::matrix_targets::MatrixTargets;
use super::schema::{common, DefaultValue, Param, Range, Type};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};
use crate::linalg::{self, TaskVectors, ThinSvd};

/// The global scale α.
static ALPHA: Param = Param::global(
    "alpha",
    Type::Number,
    DefaultValue::Number(1.0),
    "scale α of the merged task vector",
)
.aliases(&["scaling_factor"]);

/// `common_space_fraction` of `iso_cts`.
static COMMON_SPACE_FRACTION: Param = Param::global(
    "common_space_fraction",
    Type::Number,
    DefaultValue::Number(0.8),
    "fraction of the rank given to the common subspace",
)
.range(Range::UNIT_OPEN_BELOW);

/// The parameters of `iso_c`.
pub static PARAMS_ISO_C: &[&Param] = &[&ALPHA, &common::EXCLUDE_KEYS];

/// The parameters of `iso_cts`.
pub static PARAMS_ISO_CTS: &[&Param] = &[&ALPHA, &COMMON_SPACE_FRACTION, &common::EXCLUDE_KEYS];

/// Builds `iso_c`.
pub fn build_iso_c(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let alpha = p.number(&ALPHA)?;
    let targets = MatrixTargets::from_params(p)?;
    Ok(Box::new(IsoC { alpha, targets }))
}

/// Builds `iso_cts`.
pub fn build_iso_cts(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let alpha = p.number(&ALPHA)?;
    let fraction = p.number(&COMMON_SPACE_FRACTION)?;
    let targets = MatrixTargets::from_params(p)?;
    Ok(Box::new(IsoCts {
        alpha,
        fraction,
        targets,
    }))
}

/// ISO-C: the SVD of the summed task vectors with a flat spectrum.
struct IsoC {
    alpha: Num,
    targets: MatrixTargets,
}

/// ISO-CTS: common plus task-specific subspaces with a flat spectrum.
struct IsoCts {
    alpha: Num,
    fraction: Num,
    targets: MatrixTargets,
}

impl MergeMethod for IsoC {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.targets.check(scan)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let alpha = self.alpha.at(&inputs.ctx)?;
        if !self.targets.includes(inputs) {
            return linalg::base_plus_mean(inputs, alpha);
        }
        let tv = TaskVectors::new(inputs)?;
        let svd = linalg::thin_svd(tv.sum().as_ref()).map_err(|e| inputs.err(e))?;
        tv.base_plus(alpha, isotropic(&svd).as_ref())
    }
}

impl MergeMethod for IsoCts {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.targets.check(scan)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let alpha = self.alpha.at(&inputs.ctx)?;
        if !self.targets.includes(inputs) {
            return linalg::base_plus_mean(inputs, alpha);
        }
        let fraction = self.fraction.at(&inputs.ctx)?;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(MergeError::range(
                "common_space_fraction",
                fraction,
                "in (0, 1]",
            ));
        }
        let tv = TaskVectors::new(inputs)?;
        let delta = iso_cts_delta(&tv, fraction).map_err(|e| inputs.err(e))?;
        tv.base_plus(alpha, delta.as_ref())
    }
}

/// s̄·U Vᵀ: the matrix with the same singular vectors and every singular
/// value replaced by their mean.
fn isotropic(svd: &ThinSvd) -> Mat<f64> {
    let mean = svd.s.iter().sum::<f64>() / svd.s.len() as f64;
    (svd.u.as_ref() * svd.v.transpose()) * Scale(mean)
}

/// (k, n): the common subspace's size and each task's, with k + T·n = r.
fn split(r: usize, tasks: usize, fraction: f64) -> (usize, usize) {
    let k0 = ((r as f64 * fraction).floor() as usize).min(r);
    let n = ((r - k0) as f64 / tasks as f64).round_ties_even() as usize;
    let n = n.min(r / tasks);
    (r - tasks * n, n)
}

/// The ISO-CTS task-vector update Δ (before α).
fn iso_cts_delta(tv: &TaskVectors, fraction: f64) -> candle_core::Result<Mat<f64>> {
    let (k, n) = split(tv.rank(), tv.len(), fraction);
    let common = linalg::thin_svd(tv.sum().as_ref())?;
    if n == 0 {
        return Ok(isotropic(&common));
    }
    let uc = common.u.as_ref().subcols(0, k);
    let vc = common.v.as_ref().subcols(0, k);
    let mut us = vec![uc.to_owned()];
    let mut vs = vec![vc.to_owned()];
    let mut s = common.s[..k].to_vec();
    for i in 0..tv.len() {
        let task = tv.task(i);
        // τi − Uc Ucᵀ τi: the part of τi outside the common left subspace.
        let outside = &task - uc * (uc.transpose() * &task);
        let svd = linalg::thin_svd(outside.as_ref())?;
        us.push(svd.u.as_ref().subcols(0, n).to_owned());
        vs.push(svd.v.as_ref().subcols(0, n).to_owned());
        s.extend_from_slice(&svd.s[..n]);
    }
    let u = linalg::hcat(tv.rows, &us.iter().map(|m| m.as_ref()).collect::<Vec<_>>());
    let v = linalg::hcat(tv.cols, &vs.iter().map(|m| m.as_ref()).collect::<Vec<_>>());
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    let pu = linalg::polar(u.as_ref())?;
    let pv = linalg::polar(v.as_ref())?;
    Ok((pu.as_ref() * pv.transpose()) * Scale(mean))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{
        assert_close, generic_embedding, merge1, merge_one, Fixture, GENERIC_EMBEDDING_MEAN,
    };
    use crate::spec::{MergeSpec, ParamValue};

    const W: &str = "model.layers.0.mlp.up_proj.weight";

    use crate::methods::testutil::spec_n as spec;

    /// Experts θi = θ0 + τi for a base θ0 and task vectors τi.
    fn fixture(name: &str, shape: &[usize], base: &[f32], taus: &[&[f32]]) -> Fixture {
        Fixture::from_task_vectors(name, shape, base, taus)
    }

    #[test]
    fn iso_c_flattens_diag_3_1_to_2_identity() {
        // τ1 = diag(1, 1), τ2 = diag(2, 0): Σ = diag(3, 1), s̄ = (3+1)/2 = 2,
        // U Vᵀ = I → θ0 + 2·I = [1+2, 2, 3, 4+2].
        let fx = fixture(
            W,
            &[2, 2],
            &[1., 2., 3., 4.],
            &[&[1., 0., 0., 1.], &[2., 0., 0., 0.]],
        );
        assert_close(&merge1(&spec("iso_c", 2), &fx), &[3., 2., 3., 6.], 1e-5);
        // α = 0.5: θ0 + 0.5·2·I = [2, 2, 3, 5].
        let s = spec("iso_c", 2).with("alpha", 0.5);
        assert_close(&merge1(&s, &fx), &[2., 2., 3., 5.], 1e-5);
    }

    #[test]
    fn iso_c_rank_one_row_is_kept() {
        // 1×2: τ1 = [1, 0], τ2 = [2, 4]; Σ = [3, 4] = 5·[1]·[0.6, 0.8], r = 1,
        // s̄ = 5 → Δ = [3, 4]; α = 2 (via `scaling_factor`) → θ0 + [6, 8].
        let fx = fixture(W, &[1, 2], &[0.5, -0.5], &[&[1., 0.], &[2., 4.]]);
        let s = spec("iso_c", 2).with("scaling_factor", 2.0);
        assert_close(&merge1(&s, &fx), &[6.5, 7.5], 1e-5);
    }

    #[test]
    fn iso_c_rank_one_square_gives_scaled_orthogonal_map() {
        // Σ = [[1, 1], [1, 1]] = 2·u vᵀ with u = v = (1, 1)/√2; s = (2, 0),
        // s̄ = 1. R = Δ is u vᵀ + u2 v2ᵀ with the null pair's signs arbitrary,
        // so check what is determined: R·(1, 1)ᵀ = √2·u = (1, 1) and RᵀR = I.
        let fx = fixture(
            W,
            &[2, 2],
            &[0.; 4],
            &[&[1., 0., 1., 0.], &[0., 1., 0., 1.]],
        );
        let r = merge1(&spec("iso_c", 2), &fx);
        assert_close(&[r[0] + r[1], r[2] + r[3]], &[1., 1.], 1e-5);
        let gram = [
            r[0] * r[0] + r[2] * r[2],
            r[0] * r[1] + r[2] * r[3],
            r[1] * r[1] + r[3] * r[3],
        ];
        assert_close(&gram, &[1., 0., 1.], 1e-5);
    }

    #[test]
    fn iso_c_one_dim_tensor_takes_scaled_mean() {
        // τ1 = [1, 2, 0], τ2 = [3, 0, −2], mean = [2, 1, −1]; α = 0.5 →
        // θ0 + [1, 0.5, −0.5] = [2, 1.5, 0.5].
        let fx = fixture(
            "model.layers.0.mlp.up_proj.bias",
            &[3],
            &[1., 1., 1.],
            &[&[1., 2., 0.], &[3., 0., -2.]],
        );
        let s = spec("iso_c", 2).with("alpha", 0.5);
        assert_close(&merge1(&s, &fx), &[2., 1.5, 0.5], 1e-6);
    }

    const EMBED: &str = "model.embed_tokens.weight";

    /// `exclude_keys: [names]`.
    fn excluding(spec: MergeSpec, names: &[&str]) -> MergeSpec {
        let names = names.iter().map(|n| n.to_string()).collect();
        spec.with_value("exclude_keys", ParamValue::Names(names))
    }

    #[test]
    fn iso_c_decomposes_the_embedding_unless_excluded() {
        // The embedding is a 2-D tensor like any other, as in FusionBench:
        // τ1 = diag(1, 1), τ2 = diag(2, 0) give 2·I (see the first test).
        let fx = fixture(
            EMBED,
            &[2, 2],
            &[0.; 4],
            &[&[1., 0., 0., 1.], &[2., 0., 0., 0.]],
        );
        assert_close(&merge1(&spec("iso_c", 2), &fx), &[2., 0., 0., 2.], 1e-5);
        // Excluded: θ0 + mean τ = diag(1.5, 0.5).
        let s = excluding(spec("iso_c", 2), &[EMBED]);
        assert_close(&merge1(&s, &fx), &[1.5, 0., 0., 0.5], 1e-6);
        // A pattern excludes it too; α still scales the mean: 0.5·diag(1.5, 0.5).
        let s = excluding(spec("iso_c", 2).with("alpha", 0.5), &["*embed*"]);
        assert_close(&merge1(&s, &fx), &[0.75, 0., 0., 0.25], 1e-6);
        // A name that is not this tensor's leaves it decomposed... and, being
        // in no tensor of the model, is refused by the model-wide check.
        let s = excluding(spec("iso_c", 2), &["model.embed_tokens"]);
        let mut m = crate::methods::testutil::build(&s);
        let err = m
            .prepare(&crate::methods::testutil::FixtureScan(
                std::slice::from_ref(&fx),
            ))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`model.embed_tokens` matches no tensor"),
            "{err}"
        );
        assert_close(&merge_one(m.as_ref(), &fx), &[2., 0., 0., 2.], 1e-5);
    }

    #[test]
    fn embedding_numbers_agree_with_a_numpy_transcription_of_fusionbench() {
        // Expected values: tests/reference/matrix_methods_4x3.py, FusionBench's
        // iso_c and iso_cts (isotropic_merging/iso_utils.py) transcribed line
        // by line to numpy (float64), run on these inputs; iso_cts with
        // common_space_fraction 0.5 (r = 3, T = 2: 1 common + 1 per task).
        let fx = generic_embedding();
        // numpy output, as printed (more digits than f32 holds).
        #[allow(clippy::excessive_precision)]
        let iso_c = [
            1.9776424, -1.5519526, 1.1996147, 0.9122823, 1.2326098, 1.2886396, 0.2596724,
            1.4412991, -1.4926574, 0.9871600, 2.6305004, 2.9003457,
        ];
        assert_close(&merge1(&spec("iso_c", 2), &fx), &iso_c, 1e-5);
        let iso_cts = [
            1.6532804, -2.5904614, 1.9223261, 1.3521308, 1.6363733, 1.0348558, -0.3435444,
            0.4049457, -0.3481564, 0.8027592, 2.2884124, 3.4225694,
        ];
        let s = spec("iso_cts", 2).with("common_space_fraction", 0.5);
        assert_close(&merge1(&s, &fx), &iso_cts, 1e-5);
        for m in ["iso_c", "iso_cts"] {
            let s = excluding(spec(m, 2), &[EMBED]);
            assert_close(&merge1(&s, &fx), &GENERIC_EMBEDDING_MEAN, 1e-6);
        }
    }

    #[test]
    fn iso_cts_decomposes_the_embedding_unless_excluded() {
        // T = 1, τ = diag(3, 1), f = 0.5 → θ0 + 2·I (as for a linear weight);
        // excluded: θ0 + τ.
        let fx = fixture(EMBED, &[2, 2], &[1., 0., 0., 1.], &[&[3., 0., 0., 1.]]);
        let s = spec("iso_cts", 1).with("common_space_fraction", 0.5);
        assert_close(&merge1(&s, &fx), &[3., 0., 0., 3.], 1e-5);
        let s = excluding(s, &[EMBED]);
        assert_close(&merge1(&s, &fx), &[4., 0., 0., 2.], 1e-6);
    }

    #[test]
    fn split_follows_fusionbench_rounding() {
        // r = 768, T = 8, f = 0.8: ⌊614.4⌋ = 614, (768−614)/8 = 19.25 → 19,
        // k = 768 − 152 = 616.
        assert_eq!(split(768, 8, 0.8), (616, 19));
        // r = 10, T = 8, f = 0.8: 2/8 = 0.25 → 0 → everything common.
        assert_eq!(split(10, 8, 0.8), (10, 0));
        // r = 10, T = 2, f = 0.5: 5/2 = 2.5 → 2 (half to even), k = 6.
        assert_eq!(split(10, 2, 0.5), (6, 2));
        // r = 2, T = 2, f = 0.5: 1/2 = 0.5 → 0 (half to even).
        assert_eq!(split(2, 2, 0.5), (2, 0));
        // r = 3, T = 2, f = 0.4: ⌊1.2⌋ = 1, 2/2 = 1 → k = 1.
        assert_eq!(split(3, 2, 0.4), (1, 1));
        // r = 2, T = 3, f = 0.1: 2/3 → 1 would need 3 > 2 dims: capped at 0.
        assert_eq!(split(2, 3, 0.1), (2, 0));
        // f = 1: all common.
        assert_eq!(split(5, 1, 1.0), (5, 0));
    }

    #[test]
    fn iso_cts_single_task_full_rank_equals_iso_c() {
        // T = 1, τ = diag(3, 1), f = 0.5: k = 1 (e1, s = 3); τ − e1e1ᵀτ =
        // diag(0, 1) adds e2 (s = 1); U = V = I, s̄ = 2 → θ0 + 2·I.
        let fx = fixture(W, &[2, 2], &[1., 0., 0., 1.], &[&[3., 0., 0., 1.]]);
        let s = spec("iso_cts", 1).with("common_space_fraction", 0.5);
        assert_close(&merge1(&s, &fx), &[3., 0., 0., 3.], 1e-5);
    }

    #[test]
    fn iso_cts_uses_task_singular_values() {
        // 3×3, T = 2, f = 0.4 → k = 1, n = 1. τ1 = diag(5, 2, 0),
        // τ2 = diag(5, 1, 3); Σ = diag(10, 3, 3).
        // Common: e1 (s = 10). τ1 outside: diag(0, 2, 0) → e2 (s = 2);
        // τ2 outside: diag(0, 1, 3) → e3 (s = 3). U = V = I,
        // s̄ = (10 + 2 + 3)/3 = 5 → Δ = 5·I.
        let t1 = [5., 0., 0., 0., 2., 0., 0., 0., 0.];
        let t2 = [5., 0., 0., 0., 1., 0., 0., 0., 3.];
        let fx = fixture(W, &[3, 3], &[0.; 9], &[&t1, &t2]);
        let s = spec("iso_cts", 2).with("common_space_fraction", 0.4);
        assert_close(
            &merge1(&s, &fx),
            &[5., 0., 0., 0., 5., 0., 0., 0., 5.],
            1e-5,
        );
        // iso_c on the same inputs: s = (10, 3, 3), s̄ = 16/3 = 5.333333.
        let c = 16.0 / 3.0;
        assert_close(
            &merge1(&spec("iso_c", 2), &fx),
            &[c, 0., 0., 0., c, 0., 0., 0., c],
            1e-5,
        );
    }

    #[test]
    fn iso_cts_keeps_signs_of_the_task_directions() {
        // τ1 = diag(5, 2, 0), τ2 = diag(5, 0, −1), f = 0.4 → k = 1, n = 1.
        // Common e1 (10); τ1 → e2·e2ᵀ (2); τ2 → e3·(−e3)ᵀ (1); s̄ = 13/3:
        // Δ = 13/3·diag(1, 1, −1) = diag(4.333333, 4.333333, −4.333333).
        let t1 = [5., 0., 0., 0., 2., 0., 0., 0., 0.];
        let t2 = [5., 0., 0., 0., 0., 0., 0., 0., -1.];
        let fx = fixture(W, &[3, 3], &[0.; 9], &[&t1, &t2]);
        let s = spec("iso_cts", 2).with("common_space_fraction", 0.4);
        let c = 13.0 / 3.0;
        assert_close(&merge1(&s, &fx), &[c, 0., 0., 0., c, 0., 0., 0., -c], 1e-5);
    }

    #[test]
    fn iso_cts_orthogonalises_overlapping_task_directions() {
        // 3×3, T = 2, f = 0.4 → k = 1, n = 1; w = (0, 1, 1)/√2.
        // τ1 = 5·e1e1ᵀ + 2·e2e2ᵀ, τ2 = 5·e1e1ᵀ + 3·w e3ᵀ (3/√2 = 2.1213203).
        // Σ = 10·e1e1ᵀ + (e2/e3 block with singular values 3.38, 1.26):
        // common e1 (10); τ1 outside → u = e2, v = e2 (2); τ2 outside →
        // u = w, v = e3 (3). V = I stays; U = [e1, e2, w] has e2 and w 45°
        // apart, and its polar factor turns them to −22.5° and 67.5° in the
        // e2/e3 plane (see linalg's polar test): columns e1,
        // (0, 0.9238795, −0.3826834), (0, 0.3826834, 0.9238795).
        // s̄ = (10 + 2 + 3)/3 = 5 → Δ = 5·Pu.
        let h = 3.0 * std::f32::consts::FRAC_1_SQRT_2;
        let t1 = [5., 0., 0., 0., 2., 0., 0., 0., 0.];
        let t2 = [5., 0., 0., 0., 0., h, 0., 0., h];
        let fx = fixture(W, &[3, 3], &[0.; 9], &[&t1, &t2]);
        let s = spec("iso_cts", 2).with("common_space_fraction", 0.4);
        let (c, d) = (5.0 * 0.9238795, 5.0 * 0.3826834);
        assert_close(&merge1(&s, &fx), &[5., 0., 0., 0., c, d, 0., -d, c], 1e-5);
    }

    #[test]
    fn iso_cts_fraction_one_equals_iso_c() {
        // f = 1 leaves no task subspace: property check on a generic 3×4.
        let t1 = [
            0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1,
        ];
        let t2 = [
            1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2,
        ];
        let fx = fixture(W, &[3, 4], &[0.1; 12], &[&t1, &t2]);
        let cts = merge1(&spec("iso_cts", 2).with("common_space_fraction", 1.0), &fx);
        let c = merge1(&spec("iso_c", 2), &fx);
        assert_close(&cts, &c, 1e-5);
    }

    #[test]
    fn iso_cts_generic_result_has_flat_spectrum() {
        // Whatever the subspaces, Δ = s̄·P with P having orthonormal columns:
        // ΔᵀΔ = s̄²·I for a tall 4×3 Δ (3 singular values all equal to s̄).
        let t1 = [
            0.3, -1.2, 0.5, 2.0, 1.1, 0.4, -0.7, 0.2, -0.6, 0.9, 1.5, -0.1,
        ];
        let t2 = [
            1.0, 0.2, -0.4, 0.3, -0.8, 1.6, 0.1, 0.5, 0.7, -0.3, 0.2, 1.2,
        ];
        let t3 = [
            0.5, 0.5, -1.0, 0.0, 0.3, -0.2, 0.9, 1.0, -0.4, 0.6, 0.8, 0.1,
        ];
        let fx = fixture(W, &[4, 3], &[0.; 12], &[&t1, &t2, &t3]);
        // r = 3, T = 3, f = 0.34: ⌊1.02⌋ = 1, 2/3 → 1 → capped at 1, k = 0.
        let d = merge1(&spec("iso_cts", 3).with("common_space_fraction", 0.34), &fx);
        let col = |j: usize| [d[j], d[3 + j], d[6 + j], d[9 + j]];
        let dot = |a: [f32; 4], b: [f32; 4]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let n0 = dot(col(0), col(0));
        assert!(n0 > 0.1);
        let gram = [
            dot(col(1), col(1)),
            dot(col(2), col(2)),
            dot(col(0), col(1)),
            dot(col(0), col(2)),
            dot(col(1), col(2)),
        ];
        assert_close(&gram, &[n0, n0, 0., 0., 0.], 1e-4);
    }

    #[test]
    fn parameters_are_validated() {
        for bad in [0.0, -0.1, 1.5] {
            let s = spec("iso_cts", 2).with("common_space_fraction", bad);
            let err = crate::methods::build(&s).err().expect("out of range");
            assert!(err.to_string().contains("common_space_fraction"), "{err}");
        }
        assert!(
            crate::methods::build(&spec("iso_cts", 2).with("common_space_fraction", 1.0)).is_ok()
        );
        assert!(crate::methods::build(&spec("iso_c", 2).with("alpha", f64::NAN)).is_err());
        assert!(
            crate::methods::build(&spec("iso_c", 2).with("common_space_fraction", 0.5)).is_err()
        );
        // exclude_keys is a list of names: a lone word, a number or an empty
        // name is refused with the parameter named.
        for bad in [
            ParamValue::Text(EMBED.into()),
            ParamValue::Number(1.0),
            ParamValue::Names(vec!["".into()]),
        ] {
            let s = spec("iso_cts", 2).with_value("exclude_keys", bad);
            let err = crate::methods::build(&s).err().expect("refused");
            assert!(err.to_string().contains("exclude_keys"), "{err}");
        }
        let s = spec("iso_c", 2).with_value("exclude_keys", ParamValue::Gradient(vec![]));
        assert!(crate::methods::build(&s).is_ok());
    }
}
