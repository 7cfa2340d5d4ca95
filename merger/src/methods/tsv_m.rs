//! TSV-M: Task Singular Vectors merging.
//!
//! Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
//! Model Merging", arXiv:2412.00081 (CVPR 2025), as implemented by
//! FusionBench (`method/task_singular_vector/utils/TSVM_utils.py`,
//! `compute_and_sum_svd_mem_reduction`).
//!
//! Per matrix (every 2-D tensor not named in `exclude_keys`, the token
//! embedding and `lm_head` included, as in FusionBench), with T tasks and
//! r = min(rows, cols):
//!
//! ```text
//! k = ⌊r/T⌋
//! τi = Ui diag(si) Viᵀ, keep its top k triplets         (each task)
//! U = [U1, …, UT] (rows×Tk),  s = [s1, …, sT],  V = [V1, …, VT] (cols×Tk)
//! τm = polar(U) diag(s) polar(V)ᵀ
//! θ = θ0 + α·τm
//! ```
//!
//! polar(A) = X Yᵀ for A = X Σ Yᵀ, the nearest matrix with orthonormal
//! columns: it decorrelates the tasks' singular vectors while keeping each
//! task's singular values. Every other tensor (1-D norms and biases, and
//! the tensors named in `exclude_keys`): θ0 + α·(1/T) Σ τi, FusionBench's
//! mean.
//!
//! Parameters: `alpha`, any finite number, default 1.0, per-tensor values
//! allowed; it scales the whole merged task vector, as FusionBench's scalar
//! `alpha` does (FusionBench's per-model list form is not supported).
//! `exclude_keys`: tensor names (or `*` patterns) left to the plain mean,
//! default none (see `matrix_targets`); the embedding costs T SVDs of
//! vocab × hidden.
//!
//! Choices against FusionBench: (1) A triplet whose singular value is numerically zero (below
//! s_max·max(rows, cols)·ε) is dropped: it adds nothing to τm, but its
//! arbitrary singular vectors would tilt the other tasks' vectors through
//! the polar factor. FusionBench keeps them; results agree whenever every
//! τi has rank ≥ k. (2) As in FusionBench, T > r gives k = 0: the tensor
//! keeps θ0.

use candle_core::Tensor;
use faer::Mat;

use super::matrix_targets::MatrixTargets;
use super::schema::{common, DefaultValue, Param, Type};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::Result;
use crate::linalg::{self, TaskVectors};

/// α, the scale of the merged task vector.
static ALPHA: Param = Param::global(
    "alpha",
    Type::Number,
    DefaultValue::Number(1.0),
    "scale α of the merged task vector",
);

/// The parameters of `tsv_m`.
pub static PARAMS: &[&Param] = &[&ALPHA, &common::EXCLUDE_KEYS];

/// Builds `tsv_m`.
pub fn build(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let alpha = p.number(&ALPHA)?;
    let targets = MatrixTargets::from_params(p)?;
    Ok(Box::new(TsvM { alpha, targets }))
}

/// TSV-M with its validated scale.
struct TsvM {
    alpha: Num,
    targets: MatrixTargets,
}

impl MergeMethod for TsvM {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.targets.check(scan)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let alpha = self.alpha.at(&inputs.ctx)?;
        if !self.targets.includes(inputs) {
            return linalg::base_plus_mean(inputs, alpha);
        }
        let tv = TaskVectors::new(inputs)?;
        let delta = tsv_delta(&tv).map_err(|e| inputs.err(e))?;
        tv.base_plus(alpha, delta.as_ref())
    }
}

/// τm, the merged task vector of one matrix (before α).
fn tsv_delta(tv: &TaskVectors) -> candle_core::Result<Mat<f64>> {
    let k = tv.rank() / tv.len();
    let mut us = Vec::new();
    let mut vs = Vec::new();
    let mut s = Vec::new();
    if k > 0 {
        for i in 0..tv.len() {
            let svd = linalg::thin_svd(tv.task(i).as_ref())?;
            let tol = svd.tolerance();
            let keep = svd.s[..k].iter().take_while(|&&x| x > tol).count();
            us.push(svd.u.as_ref().subcols(0, keep).to_owned());
            vs.push(svd.v.as_ref().subcols(0, keep).to_owned());
            s.extend_from_slice(&svd.s[..keep]);
        }
    }
    if s.is_empty() {
        return Ok(Mat::zeros(tv.rows, tv.cols));
    }
    let u = linalg::hcat(tv.rows, &us.iter().map(|m| m.as_ref()).collect::<Vec<_>>());
    let v = linalg::hcat(tv.cols, &vs.iter().map(|m| m.as_ref()).collect::<Vec<_>>());
    let pu = linalg::polar(u.as_ref())?;
    let pv = linalg::polar(v.as_ref())?;
    Ok(linalg::usv(pu.as_ref(), &s, pv.as_ref()))
}

#[cfg(test)]
mod tests {
    use crate::methods::testutil::{
        assert_close, generic_embedding, merge1, spec_n, Fixture, GENERIC_EMBEDDING_MEAN,
    };
    use crate::spec::{MergeSpec, ParamValue};

    const W: &str = "model.layers.1.self_attn.o_proj.weight";

    fn spec(n: usize) -> MergeSpec {
        spec_n("tsv_m", n)
    }

    /// Experts θi = θ0 + τi for a base θ0 and task vectors τi.
    fn fixture(name: &str, shape: &[usize], base: &[f32], taus: &[&[f32]]) -> Fixture {
        Fixture::from_task_vectors(name, shape, base, taus)
    }

    #[test]
    fn single_task_is_reconstructed() {
        // T = 1: k = r, every triplet is kept, U and V are already
        // orthonormal (polar leaves them), τm = U diag(s) Vᵀ = τ.
        // θ0 = 1, τ = [[1, 2, 0], [0, 1, −1]], α = 0.5 → 1 + τ/2.
        let fx = fixture(W, &[2, 3], &[1.; 6], &[&[1., 2., 0., 0., 1., -1.]]);
        let s = spec(1).with("alpha", 0.5);
        assert_close(&merge1(&s, &fx), &[1.5, 2., 1., 1., 1.5, 0.5], 1e-5);
        // A full-rank square one with α = 1: θ0 + τ = [[2, 3], [4, 5]].
        let fx = fixture(W, &[2, 2], &[1.; 4], &[&[1., 2., 3., 4.]]);
        assert_close(&merge1(&spec(1), &fx), &[2., 3., 4., 5.], 1e-5);
    }

    #[test]
    fn orthogonal_supports_add_up() {
        // τ1 = diag(2, 0), τ2 = diag(0, 3): k = 1 each, U = [e1, e2] = V,
        // s = (2, 3): τm = diag(2, 3).
        let fx = fixture(
            W,
            &[2, 2],
            &[0.; 4],
            &[&[2., 0., 0., 0.], &[0., 0., 0., 3.]],
        );
        assert_close(&merge1(&spec(2), &fx), &[2., 0., 0., 3.], 1e-5);
    }

    #[test]
    fn overlapping_directions_are_decorrelated() {
        // τ1 = 2·e1e1ᵀ, τ2 = 3·w wᵀ with w = (1, 1)/√2 (entries 1.5).
        // U = V = [e1, w]; polar turns them into p1 = (0.9238795, −0.3826834)
        // and p2 = (0.3826834, 0.9238795) (rotation by −22.5°).
        // τm = 2 p1p1ᵀ + 3 p2p2ᵀ = 2.5·I − 0.5·[[c, −c], [−c, −c]], c = 1/√2:
        // [[2.1464466, 0.3535534], [0.3535534, 2.8535534]].
        let fx = fixture(
            W,
            &[2, 2],
            &[0.; 4],
            &[&[2., 0., 0., 0.], &[1.5, 1.5, 1.5, 1.5]],
        );
        let want = [2.1464466, 0.3535534, 0.3535534, 2.8535534];
        assert_close(&merge1(&spec(2), &fx), &want, 1e-5);
    }

    #[test]
    fn zero_task_vector_does_not_tilt_the_others() {
        // τ1 = diag(2, 0), τ2 = 0: τ2's triplet has s = 0 and is dropped;
        // U = V = [e1] → τm = diag(2, 0); θ0 = 1 → [3, 1, 1, 1].
        let fx = fixture(W, &[2, 2], &[1.; 4], &[&[2., 0., 0., 0.], &[0.; 4]]);
        assert_close(&merge1(&spec(2), &fx), &[3., 1., 1., 1.], 1e-5);
    }

    #[test]
    fn more_tasks_than_rank_keeps_base() {
        // 1×3 weight, r = 1, T = 2: k = ⌊1/2⌋ = 0 → θ0.
        let fx = fixture(
            W,
            &[1, 3],
            &[0.5, 0.5, 0.5],
            &[&[1., 2., 3.], &[3., 2., 1.]],
        );
        assert_close(&merge1(&spec(2), &fx), &[0.5, 0.5, 0.5], 0.0);
    }

    #[test]
    fn other_tensors_take_scaled_mean() {
        // Bias: τ1 = [2, 0], τ2 = [0, −4], mean = [1, −2]; α = 2 → θ0 + [2, −4].
        let fx = fixture(
            "model.layers.1.self_attn.o_proj.bias",
            &[2],
            &[1., 1.],
            &[&[2., 0.], &[0., -4.]],
        );
        assert_close(&merge1(&spec(2).with("alpha", 2.0), &fx), &[3., -3.], 1e-6);
        // Norm weight, 1-D; α = 1 → θ0 + mean = [2, −1].
        let fx = fixture(
            "model.norm.weight",
            &[2],
            &[1., 1.],
            &[&[2., 0.], &[0., -4.]],
        );
        assert_close(&merge1(&spec(2), &fx), &[2., -1.], 1e-6);
    }

    #[test]
    fn the_embedding_is_decomposed_unless_excluded() {
        // As a linear weight: τ1 = diag(2, 0), τ2 = diag(0, 3) → τm =
        // diag(2, 3) (see `orthogonal_supports_add_up`); excluded: θ0 + α·mean
        // = diag(1, 1.5), and α = 2 doubles it.
        let embed = "model.embed_tokens.weight";
        let fx = fixture(
            embed,
            &[2, 2],
            &[0.; 4],
            &[&[2., 0., 0., 0.], &[0., 0., 0., 3.]],
        );
        assert_close(&merge1(&spec(2), &fx), &[2., 0., 0., 3.], 1e-5);
        let excluded = spec(2).with_value("exclude_keys", ParamValue::Names(vec![embed.into()]));
        assert_close(&merge1(&excluded, &fx), &[1., 0., 0., 1.5], 1e-6);
        let s = excluded.clone().with("alpha", 2.0);
        assert_close(&merge1(&s, &fx), &[2., 0., 0., 3.], 1e-6);

        // A generic 4×3 embedding: tests/reference/matrix_methods_4x3.py,
        // FusionBench's compute_and_sum_svd_mem_reduction transcribed to
        // numpy (float64); k = ⌊3/2⌋ = 1 triplet per task.
        let fx = generic_embedding();
        // numpy output, as printed (more digits than f32 holds).
        #[allow(clippy::excessive_precision)]
        let want = [
            0.3262777, -1.0874694, 1.5197637, 1.1887725, 2.3768569, 0.9186423, -0.4415667,
            -0.5216222, -0.6448982, 1.2633131, 1.5497474, 3.8582149,
        ];
        assert_close(&merge1(&spec(2), &fx), &want, 1e-5);
        assert_close(&merge1(&excluded, &fx), &GENERIC_EMBEDDING_MEAN, 1e-6);
    }

    #[test]
    fn parameters_are_validated() {
        assert!(crate::methods::build(&spec(2).with("alpha", f64::INFINITY)).is_err());
        assert!(crate::methods::build(&spec(2).with("scaling_coefficient", 0.3)).is_err());
        assert!(crate::methods::build(&spec(2).with("alpha", -0.5)).is_ok());
    }
}
