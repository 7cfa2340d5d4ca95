//! Dense linear algebra for the SVD-based merge methods (`iso_c`, `iso_cts`,
//! `tsv_m`): thin SVD, the orthogonal polar factor, and the way from stored
//! task vectors to faer matrices and back to candle tensors.
//!
//! Decompositions run on the CPU with faer (candle has no SVD), whatever the
//! merge device; the result goes back to `inputs.device` as f32.
//!
//! Precision: f64 throughout. Stored weights (f32/f16/bf16) are decoded and
//! the task vectors θi − θ0 formed directly in f64, so subtracting two nearby
//! weights loses nothing, the factors are orthonormal to ~1e-15 and the tests
//! can use tight tolerances. Only θ0 + α·Δ is rounded to f32. The price is the
//! SVD's time: faer 0.24 measured 1.6 s in f64 against 0.8 s in f32 for a
//! 2048×2048 matrix on two cores, and the output is rounded to f32 (or bf16)
//! anyway, so f32 would do for accuracy; f64 was chosen for robustness.
//!
//! Robustness: faer 0.24 returned NaN singular vectors for one structured,
//! highly rank-deficient 512×512 matrix (entries ((7919 i + 104729 j) mod 1000)
//! /1000 − 0.5) while its transpose and a rescaled copy decomposed cleanly, so
//! [`thin_svd`] checks its factors and retries on those before giving up.

use candle_core::{Device, Tensor};
use faer::{Mat, MatRef, Scale};

use crate::error::{MergeError, Result};
use crate::inputs::TensorInputs;
use runtime::checkpoint::TensorRef;

/// A thin SVD A = U diag(s) Vᵀ of an m×n matrix: U is m×r, V is n×r with
/// r = min(m, n), and s is non-negative and non-increasing.
pub struct ThinSvd {
    /// Left singular vectors, one per column.
    pub u: Mat<f64>,
    /// Singular values, largest first.
    pub s: Vec<f64>,
    /// Right singular vectors, one per column.
    pub v: Mat<f64>,
}

impl ThinSvd {
    /// The threshold below which a singular value counts as zero: the
    /// largest one times max(m, n)·ε (numpy's `matrix_rank` convention).
    pub fn tolerance(&self) -> f64 {
        let dim = self.u.nrows().max(self.v.nrows()) as f64;
        self.s.first().copied().unwrap_or(0.0) * dim * f64::EPSILON
    }
}

/// The thin SVD of `a`, retried on the transpose and on a rescaled copy when
/// faer's factors come back non-finite; an error names the matrix's shape.
pub fn thin_svd(a: MatRef<'_, f64>) -> candle_core::Result<ThinSvd> {
    let (m, n) = a.shape();
    if m == 0 || n == 0 {
        return Ok(ThinSvd {
            u: Mat::zeros(m, 0),
            s: Vec::new(),
            v: Mat::zeros(n, 0),
        });
    }
    if !all_finite(a) {
        return Err(candle_core::Error::Msg(format!(
            "cannot take the SVD of a {m}×{n} matrix with NaN or infinite entries"
        )));
    }
    if let Some(svd) = try_svd(a) {
        return Ok(svd);
    }
    if let Some(t) = try_svd(a.transpose()) {
        return Ok(ThinSvd {
            u: t.v,
            s: t.s,
            v: t.u,
        });
    }
    let peak = (0..n)
        .flat_map(|j| (0..m).map(move |i| a[(i, j)].abs()))
        .fold(0.0, f64::max);
    if peak > 0.0 {
        let scaled = a * Scale(1.0 / peak);
        if let Some(mut svd) = try_svd(scaled.as_ref()) {
            svd.s.iter_mut().for_each(|x| *x *= peak);
            return Ok(svd);
        }
    }
    Err(candle_core::Error::Msg(format!(
        "the SVD of a {m}×{n} matrix did not converge"
    )))
}

fn try_svd(a: MatRef<'_, f64>) -> Option<ThinSvd> {
    let svd = a.thin_svd().ok()?;
    let s: Vec<f64> = (0..a.nrows().min(a.ncols())).map(|i| svd.S()[i]).collect();
    let ok = s.iter().all(|x| x.is_finite()) && all_finite(svd.U()) && all_finite(svd.V());
    ok.then(|| ThinSvd {
        u: svd.U().to_owned(),
        s,
        v: svd.V().to_owned(),
    })
}

fn all_finite(a: MatRef<'_, f64>) -> bool {
    (0..a.ncols()).all(|j| (0..a.nrows()).all(|i| a[(i, j)].is_finite()))
}

/// Columns of oversampling of [`randomized_svd`] beyond the rank asked for.
pub const OVERSAMPLING: usize = 10;

/// Power iterations of [`randomized_svd`] (each sharpens the spectrum's
/// decay by a power of two).
pub const POWER_ITERATIONS: usize = 2;

/// The leading `rank` singular triplets of `a` by the randomized range
/// finder (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1): an
/// orthonormal basis Q of A Ω for a seeded test matrix Ω of `rank` +
/// [`OVERSAMPLING`] columns, refined by [`POWER_ITERATIONS`] rounds of
/// (A Aᵀ), then the exact SVD of the small Qᵀ A. O(m·n·k) instead of the
/// full SVD's O(m·n·min(m, n)); falls back to [`thin_svd`] when k is not
/// much smaller than min(m, n). Deterministic: Ω is drawn from `seed`.
pub fn randomized_svd(a: MatRef<'_, f64>, rank: usize, seed: u64) -> candle_core::Result<ThinSvd> {
    let (m, n) = a.shape();
    let k = rank + OVERSAMPLING;
    if 2 * k >= m.min(n) {
        return thin_svd(a);
    }
    let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let omega = Mat::from_fn(n, k, |_, _| next());
    // An orthonormal basis of the columns of `y` (its left singular
    // vectors: robust where Gram-Schmidt loses orthogonality).
    let basis = |y: Mat<f64>| -> candle_core::Result<Mat<f64>> { Ok(thin_svd(y.as_ref())?.u) };
    let mut q = basis(a * omega.as_ref())?;
    for _ in 0..POWER_ITERATIONS {
        let z = basis(a.transpose() * q.as_ref())?;
        q = basis(a * z.as_ref())?;
    }
    let b = q.transpose() * a;
    let small = thin_svd(b.as_ref())?;
    let r = rank.min(small.s.len());
    Ok(ThinSvd {
        u: (q.as_ref() * small.u.as_ref()).subcols(0, r).to_owned(),
        s: small.s[..r].to_vec(),
        v: small.v.as_ref().subcols(0, r).to_owned(),
    })
}

/// The orthogonal polar factor of `a` (m×k): the matrix with orthonormal
/// columns (rows, when k > m) nearest to `a`, X Yᵀ where a = X Σ Yᵀ.
pub fn polar(a: MatRef<'_, f64>) -> candle_core::Result<Mat<f64>> {
    let svd = thin_svd(a)?;
    Ok(svd.u.as_ref() * svd.v.transpose())
}

/// U diag(s) Vᵀ for U m×k, V n×k and k values in `s`.
pub fn usv(u: MatRef<'_, f64>, s: &[f64], v: MatRef<'_, f64>) -> Mat<f64> {
    assert_eq!(u.ncols(), s.len(), "one singular value per column of U");
    assert_eq!(v.ncols(), s.len(), "one singular value per column of V");
    let us = Mat::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] * s[j]);
    us.as_ref() * v.transpose()
}

/// The columns of `blocks` side by side (all with the same number of rows).
pub fn hcat(rows: usize, blocks: &[MatRef<'_, f64>]) -> Mat<f64> {
    let cols = blocks.iter().map(|b| b.ncols()).sum();
    let mut out = Mat::zeros(rows, cols);
    let mut at = 0;
    for b in blocks {
        assert_eq!(b.nrows(), rows, "blocks of hcat must have {rows} rows");
        out.as_mut().subcols_mut(at, b.ncols()).copy_from(b);
        at += b.ncols();
    }
    out
}

/// θ0 + α·(1/T) Σ τi = (1 − α)·θ0 + (α/T)·Σ θi, in f32 on the merge device:
/// how the matrix methods (iso, tsv_m, wudi) merge every tensor they do not
/// treat as a matrix: 1-D tensors and those named in `exclude_keys`.
pub fn base_plus_mean(inputs: &TensorInputs, alpha: f64) -> Result<Tensor> {
    let t = inputs.experts.len();
    inputs.combine(
        Some((1.0 - alpha) as f32),
        &vec![(alpha / t as f64) as f32; t],
    )
}

fn base_ref<'a>(inputs: &TensorInputs<'a>) -> Result<TensorRef<'a>> {
    inputs.base.ok_or_else(|| {
        MergeError::Spec(format!(
            "tensor `{}`: this method needs a base model",
            inputs.ctx.name
        ))
    })
}

/// The task vectors of one 2-D tensor as f64 matrices, built on demand so
/// that no more than one or two are held at a time.
pub struct TaskVectors<'i, 'a> {
    inputs: &'i TensorInputs<'a>,
    base: Vec<f32>,
    /// Rows of the tensor.
    pub rows: usize,
    /// Columns of the tensor.
    pub cols: usize,
}

impl<'i, 'a> TaskVectors<'i, 'a> {
    /// Decodes θ0 of a 2-D tensor once.
    pub fn new(inputs: &'i TensorInputs<'a>) -> Result<Self> {
        let base = base_ref(inputs)?;
        let shape = inputs.shape();
        assert_eq!(shape.len(), 2, "TaskVectors needs a 2-D tensor");
        Ok(TaskVectors {
            inputs,
            base: base.to_f32_vec(),
            rows: shape[0],
            cols: shape[1],
        })
    }

    /// Number of tasks T.
    pub fn len(&self) -> usize {
        self.inputs.experts.len()
    }

    /// True when there are no experts.
    pub fn is_empty(&self) -> bool {
        self.inputs.experts.is_empty()
    }

    /// min(rows, cols), the number of singular values.
    pub fn rank(&self) -> usize {
        self.rows.min(self.cols)
    }

    /// τi = θi − θ0, formed in f64.
    pub fn task(&self, i: usize) -> Mat<f64> {
        let e = self.inputs.experts[i].to_f32_vec();
        let (b, c) = (&self.base, self.cols);
        Mat::from_fn(self.rows, self.cols, |r, k| {
            e[r * c + k] as f64 - b[r * c + k] as f64
        })
    }

    /// Σi τi, formed in f64.
    pub fn sum(&self) -> Mat<f64> {
        let mut acc = Mat::<f64>::zeros(self.rows, self.cols);
        let c = self.cols;
        for x in &self.inputs.experts {
            let e = x.to_f32_vec();
            for k in 0..self.cols {
                for r in 0..self.rows {
                    acc[(r, k)] += e[r * c + k] as f64 - self.base[r * c + k] as f64;
                }
            }
        }
        acc
    }

    /// θ0 + α·Δ as an f32 tensor on the merge device.
    pub fn base_plus(&self, alpha: f64, delta: MatRef<'_, f64>) -> Result<Tensor> {
        assert_eq!(
            delta.shape(),
            (self.rows, self.cols),
            "Δ has the tensor's shape"
        );
        let c = self.cols;
        let out: Vec<f32> = (0..self.rows * c)
            .map(|i| (self.base[i] as f64 + alpha * delta[(i / c, i % c)]) as f32)
            .collect();
        to_device(
            Tensor::from_vec(out, (self.rows, c), &Device::Cpu),
            self.inputs,
        )
    }
}

fn to_device(t: candle_core::Result<Tensor>, inputs: &TensorInputs) -> Result<Tensor> {
    let t = t.map_err(|e| inputs.err(e))?;
    if inputs.device.is_cpu() {
        Ok(t)
    } else {
        t.to_device(inputs.device).map_err(|e| inputs.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat(rows: usize, cols: usize, v: &[f64]) -> Mat<f64> {
        Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
    }

    #[track_caller]
    fn assert_mat(got: &Mat<f64>, want: &Mat<f64>, tol: f64) {
        assert_eq!(got.shape(), want.shape());
        for i in 0..got.nrows() {
            for j in 0..got.ncols() {
                let (g, w) = (got[(i, j)], want[(i, j)]);
                assert!((g - w).abs() <= tol, "({i}, {j}): got {g}, want {w}");
            }
        }
    }

    #[test]
    fn randomized_svd_finds_the_leading_triplets() {
        // A 120×90 matrix of rank 3 plus tiny noise: σ = 5, 3, 1.
        let (m, n) = (120, 90);
        let col = |i: usize, c: usize| (((i * (7 + 2 * c) + 3 * c) % 17) as f64 - 8.0) / 8.0;
        let mut u = Mat::from_fn(m, 3, col);
        let mut v = Mat::from_fn(n, 3, |j, c| col(j + 5, c + 3));
        u = polar(u.as_ref()).unwrap();
        v = polar(v.as_ref()).unwrap();
        let a = usv(u.as_ref(), &[5.0, 3.0, 1.0], v.as_ref())
            + Mat::from_fn(m, n, |i, j| 1e-9 * ((i * 31 + j * 17) % 7) as f64);
        let exact = thin_svd(a.as_ref()).unwrap();
        let fast = randomized_svd(a.as_ref(), 2, 7).unwrap();
        assert_eq!((fast.u.ncols(), fast.v.ncols(), fast.s.len()), (2, 2, 2));
        for i in 0..2 {
            assert!((fast.s[i] - exact.s[i]).abs() < 1e-8, "{:?}", fast.s);
        }
        // The rank-2 reconstructions agree.
        let r_fast = usv(fast.u.as_ref(), &fast.s, fast.v.as_ref());
        let r_exact = usv(
            exact.u.as_ref().subcols(0, 2),
            &exact.s[..2],
            exact.v.as_ref().subcols(0, 2),
        );
        let diff = (0..n)
            .flat_map(|j| (0..m).map(move |i| (i, j)))
            .map(|(i, j)| (r_fast[(i, j)] - r_exact[(i, j)]).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-8, "{diff}");
        // A rank close to the size takes the exact path.
        let full = randomized_svd(a.as_ref(), 40, 7).unwrap();
        assert_eq!(full.s.len(), 90);
    }

    #[test]
    fn thin_svd_of_diagonal_sorts_values() {
        // diag(1, 3) has singular values 3 ≥ 1; U diag(s) Vᵀ rebuilds it.
        let a = mat(2, 2, &[1.0, 0.0, 0.0, 3.0]);
        let svd = thin_svd(a.as_ref()).unwrap();
        assert!((svd.s[0] - 3.0).abs() < 1e-12 && (svd.s[1] - 1.0).abs() < 1e-12);
        assert_mat(&usv(svd.u.as_ref(), &svd.s, svd.v.as_ref()), &a, 1e-12);
    }

    #[test]
    fn thin_svd_of_wide_and_empty_matrices() {
        // [3, 4] is 5·[1]·[0.6, 0.8].
        let svd = thin_svd(mat(1, 2, &[3.0, 4.0]).as_ref()).unwrap();
        assert_eq!(svd.s.len(), 1);
        assert!((svd.s[0] - 5.0).abs() < 1e-12);
        assert!((svd.v[(0, 0)] * svd.u[(0, 0)] - 0.6).abs() < 1e-12);
        let empty = thin_svd(Mat::<f64>::zeros(0, 3).as_ref()).unwrap();
        assert!(empty.s.is_empty());
    }

    #[test]
    fn thin_svd_rejects_nan() {
        let a = mat(1, 2, &[f64::NAN, 1.0]);
        assert!(thin_svd(a.as_ref()).is_err());
    }

    #[test]
    fn structured_rank_deficient_matrix_decomposes() {
        // The matrix on which faer 0.24's f64 SVD produced NaN: the retry path
        // must still give finite factors that rebuild it.
        let n = 512;
        let a = Mat::<f64>::from_fn(n, n, |i, j| {
            ((i * 7919 + j * 104729) % 1000) as f64 / 1000.0 - 0.5
        });
        let svd = thin_svd(a.as_ref()).unwrap();
        let back = usv(svd.u.as_ref(), &svd.s, svd.v.as_ref());
        assert_mat(&back, &a, 1e-9);
    }

    #[test]
    fn polar_of_orthogonal_is_itself() {
        // A rotation [[0.6, −0.8], [0.8, 0.6]] is already orthogonal.
        let q = mat(2, 2, &[0.6, -0.8, 0.8, 0.6]);
        assert_mat(&polar(q.as_ref()).unwrap(), &q, 1e-12);
    }

    #[test]
    fn polar_of_positive_diagonal_is_identity() {
        // diag(2, 3) = I · diag(2, 3): the orthogonal factor is I.
        let d = mat(2, 2, &[2.0, 0.0, 0.0, 3.0]);
        assert_mat(
            &polar(d.as_ref()).unwrap(),
            &mat(2, 2, &[1.0, 0.0, 0.0, 1.0]),
            1e-12,
        );
    }

    #[test]
    fn polar_normalises_orthogonal_columns_of_tall_matrix() {
        // Columns (2, 0, 0) and (0, 0, −3) are orthogonal: polar keeps their
        // directions and makes them unit: (1, 0, 0), (0, 0, −1).
        let a = mat(3, 2, &[2.0, 0.0, 0.0, 0.0, 0.0, -3.0]);
        let want = mat(3, 2, &[1.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
        assert_mat(&polar(a.as_ref()).unwrap(), &want, 1e-12);
    }

    #[test]
    fn polar_spreads_two_unit_vectors_symmetrically() {
        // U = [e1, w], w = (1, 1)/√2 (45° apart). Polar = U (UᵀU)^(−1/2); with
        // c = 1/√2, a = 1/√(1+c) = 0.765367, b = 1/√(1−c) = 1.847759, the
        // inverse root is ½[[a+b, a−b], [a−b, a+b]] and U times it is the
        // rotation by −22.5°: [[cos 22.5°, sin 22.5°], [−sin 22.5°, cos 22.5°]]
        // = [[0.923880, 0.382683], [−0.382683, 0.923880]].
        let c = std::f64::consts::FRAC_1_SQRT_2;
        let u = mat(2, 2, &[1.0, c, 0.0, c]);
        let want = mat(2, 2, &[0.9238795, 0.3826834, -0.3826834, 0.9238795]);
        assert_mat(&polar(u.as_ref()).unwrap(), &want, 1e-6);
    }

    #[test]
    fn hcat_places_blocks_side_by_side() {
        let a = mat(2, 1, &[1.0, 2.0]);
        let b = mat(2, 2, &[3.0, 4.0, 5.0, 6.0]);
        let want = mat(2, 3, &[1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
        assert_mat(&hcat(2, &[a.as_ref(), b.as_ref()]), &want, 0.0);
    }
}
