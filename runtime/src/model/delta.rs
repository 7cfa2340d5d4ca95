//! A merge held as a delta over a resident base: `θ = θ₀ + ΔW`, with ΔW in
//! a compact form per tensor, so many merges of one base cost their deltas
//! only and a batch that mixes them reads the base's weights once.
//!
//! For a linear layer the base's product is computed once for every row of
//! the batch and each sequence adds its own merge's term (S-LoRA's and
//! Punica's batched adapter products, here for merges):
//!
//! ```text
//! y_s = x_s W₀ᵀ + x_s ΔW_sᵀ
//!   dense:    x ΔWᵀ
//!   low rank: ΔW ≈ U V, U (out, r), V (r, in):   (x Vᵀ) Uᵀ
//!   sparse:   ΔW ≈ Σ_k v_k e_{r_k} e_{c_k}ᵀ:      y[:, r_k] += v_k x[:, c_k]
//!   linear combination of task vectors τ_i:      Σ_i λ_i (x τ_iᵀ)
//!   masked view of a shared U, ΔW = s (m ⊙ U):   s · x (m ⊙ U)ᵀ
//! ```
//!
//! A masked view (a task of a per-task retrieval merge) holds one bit per
//! entry and its scale; U is shared by every task's view of the merge. Its
//! term costs a dense product: the host pass reads U and the bits in place
//! ([`super::host_terms`]), the tensor path expands m ⊙ U for the layer.
//!
//! The embedding adds its delta's rows for the sequence's token ids; 1-D
//! tensors (RMS norm scales, biases) are held dense and added to the base's.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::mask::BitMask;

/// Most elements of the intermediate `(rows, nnz)` product a sparse term
/// materialises at once (16 Mi f32 = 64 MiB); more entries are taken in
/// chunks.
const SPARSE_CHUNK_ELEMENTS: usize = 1 << 24;

/// One tensor's delta in a compact form.
#[derive(Clone, Debug)]
pub enum TensorDelta {
    /// ΔW as it is, any shape (the 1-D deltas of norms and biases too).
    Dense(Tensor),
    /// A 2-D ΔW ≈ U V at rank r.
    LowRank {
        /// `Uᵀ`, `(r, out)`, contiguous.
        ut: Tensor,
        /// `Vᵀ`, `(in, r)`, contiguous.
        vt: Tensor,
        /// Rows of the embedding's U, `(out, r)` (kept only for an
        /// embedding delta, whose rows are gathered by token id).
        u: Option<Tensor>,
    },
    /// A 2-D ΔW with its largest entries kept, in coordinate form sorted by
    /// row.
    Sparse {
        /// Row of each entry, u32, `(nnz)`.
        rows: Tensor,
        /// Column of each entry, u32, `(nnz)`.
        cols: Tensor,
        /// Value of each entry, `(nnz)`, in the compute dtype.
        values: Tensor,
        /// `(out, in)`.
        shape: (usize, usize),
        /// Host offsets of each row's entries (CSR), `out + 1` of them.
        row_ptr: Vec<u32>,
    },
    /// A task's view ΔW = s (m ⊙ U) of a unified delta U shared by every
    /// task's view (resident once, counted where it is held).
    Masked {
        /// U, any shape, contiguous, in the compute dtype (a clone shares
        /// its storage).
        unified: Tensor,
        /// m, one bit per entry of U in storage order.
        mask: BitMask,
        /// s.
        scale: f64,
    },
}

impl TensorDelta {
    /// A low-rank delta `U V` from `u` `(out, r)` and `v` `(r, in)`;
    /// `embedding` keeps U's rows for gathering by token id.
    pub fn low_rank(u: &Tensor, v: &Tensor, embedding: bool) -> Result<Self> {
        let (out, r) = u.dims2()?;
        let (r2, _) = v.dims2()?;
        if r != r2 {
            candle_core::bail!("low-rank factors of ranks {r} and {r2} ({out} rows)");
        }
        Ok(TensorDelta::LowRank {
            ut: u.t()?.contiguous()?,
            vt: v.t()?.contiguous()?,
            u: if embedding {
                Some(u.contiguous()?)
            } else {
                None
            },
        })
    }

    /// A sparse delta of shape `(out, inp)` from entries `(row, col, value)`
    /// (any order), in `dtype` on `device`.
    pub fn sparse(
        shape: (usize, usize),
        mut entries: Vec<(u32, u32, f32)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (out, inp) = shape;
        if let Some(&(r, c, _)) = entries
            .iter()
            .find(|&&(r, c, _)| r as usize >= out || c as usize >= inp)
        {
            candle_core::bail!("sparse entry ({r}, {c}) is outside a {out}×{inp} delta");
        }
        entries.sort_unstable_by_key(|&(r, c, _)| (r, c));
        let mut row_ptr = vec![0u32; out + 1];
        for &(r, _, _) in &entries {
            row_ptr[r as usize + 1] += 1;
        }
        for i in 0..out {
            row_ptr[i + 1] += row_ptr[i];
        }
        let n = entries.len();
        let rows: Vec<u32> = entries.iter().map(|e| e.0).collect();
        let cols: Vec<u32> = entries.iter().map(|e| e.1).collect();
        let values: Vec<f32> = entries.iter().map(|e| e.2).collect();
        Ok(TensorDelta::Sparse {
            rows: Tensor::from_vec(rows, n, device)?,
            cols: Tensor::from_vec(cols, n, device)?,
            values: Tensor::from_vec(values, n, device)?.to_dtype(dtype)?,
            shape,
            row_ptr,
        })
    }

    /// A masked view s (m ⊙ U) of the shared `unified` U.
    pub fn masked(unified: &Tensor, mask: BitMask, scale: f64) -> Result<Self> {
        if mask.len() != unified.elem_count() {
            candle_core::bail!(
                "a mask of {} entries over a unified delta of {} ({:?})",
                mask.len(),
                unified.elem_count(),
                unified.dims()
            );
        }
        Ok(TensorDelta::Masked {
            unified: unified.contiguous()?,
            mask,
            scale,
        })
    }

    /// The shape of ΔW.
    pub fn dims(&self) -> Result<Vec<usize>> {
        Ok(match self {
            TensorDelta::Dense(d) => d.dims().to_vec(),
            TensorDelta::LowRank { ut, vt, .. } => vec![ut.dim(1)?, vt.dim(0)?],
            TensorDelta::Sparse { shape, .. } => vec![shape.0, shape.1],
            TensorDelta::Masked { unified, .. } => unified.dims().to_vec(),
        })
    }

    /// Bytes held (device tensors and host offsets).
    pub fn bytes(&self) -> u64 {
        let t = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match self {
            TensorDelta::Dense(d) => t(d),
            TensorDelta::LowRank { ut, vt, u } => t(ut) + t(vt) + u.as_ref().map_or(0, t),
            TensorDelta::Sparse {
                rows,
                cols,
                values,
                row_ptr,
                ..
            } => t(rows) + t(cols) + t(values) + 4 * row_ptr.len() as u64,
            // U is the merge's, shared: the view holds its bits and scale.
            TensorDelta::Masked { mask, .. } => mask.bytes() + 8,
        }
    }

    /// Bytes of the shared tensor a masked view reads (0 for the others).
    pub fn shared_bytes(&self) -> u64 {
        match self {
            TensorDelta::Masked { unified, .. } => {
                (unified.elem_count() * unified.dtype().size_in_bytes()) as u64
            }
            _ => 0,
        }
    }

    /// ΔW as a dense tensor.
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            TensorDelta::Dense(d) => Ok(d.clone()),
            TensorDelta::LowRank { ut, vt, .. } => vt.matmul(ut)?.t()?.contiguous(),
            TensorDelta::Sparse {
                rows,
                cols,
                values,
                shape,
                ..
            } => {
                let (out, inp) = *shape;
                let r: Vec<u32> = rows.to_vec1()?;
                let c: Vec<u32> = cols.to_vec1()?;
                let flat: Vec<i64> = r
                    .iter()
                    .zip(&c)
                    .map(|(&r, &c)| r as i64 * inp as i64 + c as i64)
                    .collect();
                let flat = Tensor::new(flat.as_slice(), values.device())?;
                Tensor::zeros(out * inp, values.dtype(), values.device())?
                    .index_add(&flat, values, 0)?
                    .reshape((out, inp))
            }
            TensorDelta::Masked {
                unified,
                mask,
                scale,
            } => {
                let m = Tensor::from_vec(mask.to_f32(0, mask.len()), unified.dims(), &Device::Cpu)?
                    .to_device(unified.device())?
                    .to_dtype(unified.dtype())?;
                (m * unified)? * *scale
            }
        }
    }

    /// `x ΔWᵀ` for `x` `(.., in)`: `(.., out)`.
    pub fn linear_term(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().unwrap_or(&0);
        let n = x.elem_count() / inp.max(1);
        let x2 = x.reshape((n, inp))?;
        let y = match self {
            TensorDelta::Dense(d) => x2.matmul(&d.t()?)?,
            TensorDelta::Masked { .. } => x2.matmul(&self.to_dense()?.t()?)?,
            TensorDelta::LowRank { ut, vt, .. } => x2.matmul(vt)?.matmul(ut)?,
            TensorDelta::Sparse {
                rows,
                cols,
                values,
                shape,
                ..
            } => {
                let nnz = values.elem_count();
                let mut y = Tensor::zeros((n, shape.0), x.dtype(), x.device())?;
                let chunk = (SPARSE_CHUNK_ELEMENTS / n.max(1)).max(1);
                let mut at = 0;
                while at < nnz {
                    let k = chunk.min(nnz - at);
                    let gathered = x2
                        .index_select(&cols.narrow(0, at, k)?, 1)?
                        .broadcast_mul(&values.narrow(0, at, k)?.unsqueeze(0)?)?;
                    y = y.index_add(&rows.narrow(0, at, k)?, &gathered, 1)?;
                    at += k;
                }
                y
            }
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(out)
    }

    /// The delta's rows for token ids `ids` (an embedding's): `(len, in)`.
    pub fn rows_of(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            TensorDelta::Dense(d) => d.index_select(&Tensor::new(ids, device)?, 0),
            TensorDelta::Masked {
                unified,
                mask,
                scale,
            } => {
                let inp = unified.dim(1)?;
                let bits: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| mask.to_f32(id as usize * inp, inp))
                    .collect();
                let m = Tensor::from_vec(bits, (ids.len(), inp), &Device::Cpu)?
                    .to_device(device)?
                    .to_dtype(unified.dtype())?;
                (unified.index_select(&Tensor::new(ids, device)?, 0)? * m)? * *scale
            }
            TensorDelta::LowRank { ut, vt, u } => {
                let u = match u {
                    Some(u) => u.clone(),
                    None => ut.t()?.contiguous()?,
                };
                u.index_select(&Tensor::new(ids, device)?, 0)?
                    .matmul(&vt.t()?)
            }
            TensorDelta::Sparse {
                cols,
                values,
                shape,
                row_ptr,
                ..
            } => {
                let inp = shape.1;
                let mut entries = Vec::new();
                let mut base = Vec::new();
                for (i, &id) in ids.iter().enumerate() {
                    let (a, b) = (row_ptr[id as usize], row_ptr[id as usize + 1]);
                    entries.extend(a..b);
                    base.extend(std::iter::repeat_n((i * inp) as i64, (b - a) as usize));
                }
                let out = Tensor::zeros(ids.len() * inp, values.dtype(), device)?;
                if entries.is_empty() {
                    return out.reshape((ids.len(), inp));
                }
                let idx = Tensor::new(entries.as_slice(), device)?;
                let col: Vec<u32> = cols.index_select(&idx, 0)?.to_vec1()?;
                let flat: Vec<i64> = base.iter().zip(&col).map(|(b, &c)| b + c as i64).collect();
                out.index_add(
                    &Tensor::new(flat.as_slice(), device)?,
                    &values.index_select(&idx, 0)?,
                    0,
                )?
                .reshape((ids.len(), inp))
            }
        }
    }
}

/// A merge's delta over its base, by the base's tensor names.
#[derive(Clone, Debug)]
pub enum ModelDelta {
    /// Deltas held by this merge.
    Owned(HashMap<String, Arc<TensorDelta>>),
    /// `Σ_i λ_i τ_i` over shared task vectors: the merge holds only its
    /// coefficients.
    Combination(Vec<(f64, Arc<ModelDelta>)>),
}

impl ModelDelta {
    /// Whether the delta touches tensor `name`.
    pub fn touches(&self, name: &str) -> bool {
        match self {
            ModelDelta::Owned(m) => m.contains_key(name),
            ModelDelta::Combination(parts) => parts.iter().any(|(_, d)| d.touches(name)),
        }
    }

    /// The compact deltas of tensor `name` with their coefficients: this
    /// merge's own (coefficient 1), or a combination's task vectors' (each
    /// scaled by its λ, nested combinations flattened).
    pub fn parts_of(&self, name: &str) -> Vec<(f64, &TensorDelta)> {
        match self {
            ModelDelta::Owned(m) => m
                .get(name)
                .map(|d| vec![(1.0, d.as_ref())])
                .unwrap_or_default(),
            ModelDelta::Combination(parts) => parts
                .iter()
                .flat_map(|(c, d)| d.parts_of(name).into_iter().map(move |(k, t)| (c * k, t)))
                .collect(),
        }
    }

    /// The tensors it holds, with their deltas (the parts' for a
    /// combination, each once).
    pub fn tensors(&self) -> Vec<(&str, &TensorDelta)> {
        match self {
            ModelDelta::Owned(m) => m.iter().map(|(k, v)| (k.as_str(), v.as_ref())).collect(),
            ModelDelta::Combination(parts) => parts.iter().flat_map(|(_, d)| d.tensors()).collect(),
        }
    }

    /// Bytes this merge holds itself: its deltas (a tensor shared under two
    /// names counted once), or a combination's coefficients.
    pub fn own_bytes(&self) -> u64 {
        match self {
            ModelDelta::Owned(m) => {
                let mut seen = std::collections::HashSet::new();
                m.values()
                    .filter(|d| seen.insert(Arc::as_ptr(d)))
                    .map(|d| d.bytes())
                    .sum()
            }
            ModelDelta::Combination(parts) => 8 * parts.len() as u64,
        }
    }

    /// Bytes of the shared task vectors a combination reads (0 otherwise).
    pub fn shared_bytes(&self) -> u64 {
        match self {
            ModelDelta::Owned(_) => 0,
            ModelDelta::Combination(parts) => parts.iter().map(|(_, d)| d.own_bytes()).sum(),
        }
    }

    /// `x ΔWᵀ` of linear layer `name`, `None` when the delta leaves it as
    /// the base has it.
    pub fn linear_term(&self, name: &str, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            ModelDelta::Owned(m) => m.get(name).map(|d| d.linear_term(x)).transpose(),
            ModelDelta::Combination(parts) => combine(parts, |d| d.linear_term(name, x)),
        }
    }

    /// The delta of a 1-D tensor (a norm's scale, a bias), dense.
    pub fn vector(&self, name: &str) -> Result<Option<Tensor>> {
        match self {
            ModelDelta::Owned(m) => m.get(name).map(|d| d.to_dense()).transpose(),
            ModelDelta::Combination(parts) => combine(parts, |d| d.vector(name)),
        }
    }

    /// The delta of embedding `name`'s rows for `ids`, `(len, hidden)`.
    pub fn rows_of(&self, name: &str, ids: &[u32], device: &Device) -> Result<Option<Tensor>> {
        match self {
            ModelDelta::Owned(m) => m.get(name).map(|d| d.rows_of(ids, device)).transpose(),
            ModelDelta::Combination(parts) => combine(parts, |d| d.rows_of(name, ids, device)),
        }
    }

    /// The delta of tensor `name`, dense (`None` when untouched).
    pub fn dense(&self, name: &str) -> Result<Option<Tensor>> {
        match self {
            ModelDelta::Owned(m) => m.get(name).map(|d| d.to_dense()).transpose(),
            ModelDelta::Combination(parts) => combine(parts, |d| d.dense(name)),
        }
    }
}

/// `Σ_i λ_i f(τ_i)` over the parts that touch the tensor.
fn combine(
    parts: &[(f64, Arc<ModelDelta>)],
    mut f: impl FnMut(&ModelDelta) -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    let mut sum: Option<Tensor> = None;
    for (lambda, d) in parts {
        if let Some(t) = f(d)? {
            let t = (t * *lambda)?;
            sum = Some(match sum {
                None => t,
                Some(s) => (s + t)?,
            });
        }
    }
    Ok(sum)
}

/// One run of consecutive rows of a packed batch that share a delta
/// (`None`: the base as it is). A single run applies to every row of the
/// tensor, whatever its shape; several runs split dimension 1 of a
/// `(1, rows, ..)` stream.
#[derive(Clone, Copy)]
pub struct DeltaRun<'a> {
    /// Rows of the run.
    pub rows: usize,
    /// Its delta.
    pub delta: Option<&'a ModelDelta>,
}

/// `y + term(x_run)` for every run with a delta that has a term: the
/// batched addition of each sequence's own delta product. Combinations
/// that share task vectors take one product per shared vector for all
/// their rows ([`SharedParts`]); every other run its own.
pub(crate) fn add_runs(
    y: Tensor,
    x: &Tensor,
    runs: &[DeltaRun],
    mut term: impl FnMut(&ModelDelta, &Tensor) -> Result<Option<Tensor>>,
) -> Result<Tensor> {
    if let [only] = runs {
        return match only.delta {
            Some(d) => match term(d, x)? {
                Some(t) => {
                    let t = t.to_dtype(y.dtype())?;
                    y + t
                }
                None => Ok(y),
            },
            None => Ok(y),
        };
    }
    let shared = SharedParts::of(runs);
    let mut pieces = Vec::with_capacity(runs.len());
    let mut any = false;
    let mut at = 0;
    for run in runs {
        let t = match run.delta {
            Some(ModelDelta::Combination(_)) if shared.is_some() => None,
            Some(d) => term(d, &x.narrow(1, at, run.rows)?)?,
            None => None,
        };
        pieces.push(t);
        any |= pieces.last().is_some_and(Option::is_some);
        at += run.rows;
    }
    let mut y = y;
    if any {
        let mut parts = Vec::with_capacity(pieces.len());
        let mut at = 0;
        for (run, piece) in runs.iter().zip(pieces) {
            parts.push(match piece {
                Some(t) => t.to_dtype(y.dtype())?,
                None => y.narrow(1, at, run.rows)?.zeros_like()?,
            });
            at += run.rows;
        }
        y = (y + Tensor::cat(&parts, 1)?)?;
    }
    match shared {
        Some(shared) => shared.add(y, x, runs, &mut term),
        None => Ok(y),
    }
}

/// The task vectors the combination runs of a batch read, each with its
/// coefficient per run (0 where a run does not use it): their terms are
/// taken over every row at once and scaled row by row,
///
/// ```text
/// y += Σ_p diag(c_p) term_p(x),   c_p[row] = λ_{run(row), p}
/// ```
///
/// so a step costs one product per shared task vector however many
/// merges of them the batch mixes.
struct SharedParts<'a> {
    parts: Vec<(&'a Arc<ModelDelta>, Vec<f64>)>,
}

impl<'a> SharedParts<'a> {
    /// The combinations' task vectors; `None` when no vector is read by
    /// two runs (each run's own terms then cost no more).
    fn of(runs: &[DeltaRun<'a>]) -> Option<Self> {
        let mut parts: Vec<(&'a Arc<ModelDelta>, Vec<f64>)> = Vec::new();
        let mut uses = 0;
        for (i, run) in runs.iter().enumerate() {
            let Some(ModelDelta::Combination(ps)) = run.delta else {
                continue;
            };
            for (c, p) in ps {
                uses += 1;
                let k = match parts.iter().position(|(q, _)| Arc::ptr_eq(q, p)) {
                    Some(k) => k,
                    None => {
                        parts.push((p, vec![0.0; runs.len()]));
                        parts.len() - 1
                    }
                };
                parts[k].1[i] += *c;
            }
        }
        (parts.len() < uses).then_some(SharedParts { parts })
    }

    /// `y` plus every shared vector's scaled term.
    fn add(
        self,
        mut y: Tensor,
        x: &Tensor,
        runs: &[DeltaRun],
        term: &mut impl FnMut(&ModelDelta, &Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Tensor> {
        let rows: usize = runs.iter().map(|r| r.rows).sum();
        for (part, coefficients) in self.parts {
            let Some(t) = term(part, x)? else { continue };
            let per_row: Vec<f32> = runs
                .iter()
                .zip(&coefficients)
                .flat_map(|(r, &c)| std::iter::repeat_n(c as f32, r.rows))
                .collect();
            let scale = Tensor::from_vec(per_row, (1, rows, 1), x.device())?.to_dtype(t.dtype())?;
            let term = t.broadcast_mul(&scale)?.to_dtype(y.dtype())?;
            y = (y + term)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::max_abs_diff as close;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// Every form's term, rows and dense view agree with the dense ΔW they
    /// stand for (worked by hand on a 2×3 delta).
    #[test]
    fn forms_agree_with_their_dense_delta() {
        // ΔW = U V with U = [[1], [2]], V = [[1, 0, -1]]:
        // ΔW = [[1, 0, -1], [2, 0, -2]].
        let dense = t(&[1., 0., -1., 2., 0., -2.], (2, 3));
        let low =
            TensorDelta::low_rank(&t(&[1., 2.], (2, 1)), &t(&[1., 0., -1.], (1, 3)), true).unwrap();
        let sparse = TensorDelta::sparse(
            (2, 3),
            vec![(1, 2, -2.), (0, 0, 1.), (1, 0, 2.), (0, 2, -1.)],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        // s (m ⊙ U) with s = 0.5, U = [[2, 9, −2], [4, 9, −4]], m = [[1, 0, 1], [1, 0, 1]].
        let masked = TensorDelta::masked(
            &t(&[2., 9., -2., 4., 9., -4.], (2, 3)),
            BitMask::from_bools(&[true, false, true, true, false, true]),
            0.5,
        )
        .unwrap();
        assert_eq!(masked.bytes(), 16, "one word of bits and the scale");
        assert_eq!(masked.shared_bytes(), 24);
        let x = Tensor::from_vec(vec![1f32, 2., 3., -1., 0., 5.], (1, 2, 3), &Device::Cpu).unwrap();
        // x ΔWᵀ: row (1,2,3) → (1−3, 2−6) = (−2, −4); row (−1,0,5) → (−6, −12).
        let want = Tensor::from_vec(vec![-2f32, -4., -6., -12.], (1, 2, 2), &Device::Cpu).unwrap();
        for d in [TensorDelta::Dense(dense.clone()), low, sparse, masked] {
            assert_eq!(d.dims().unwrap(), vec![2, 3]);
            assert!(close(&d.to_dense().unwrap(), &dense) < 1e-6);
            assert!(close(&d.linear_term(&x).unwrap(), &want) < 1e-6);
            let rows = d.rows_of(&[1, 1, 0], &Device::Cpu).unwrap();
            let want_rows = t(&[2., 0., -2., 2., 0., -2., 1., 0., -1.], (3, 3));
            assert!(close(&rows, &want_rows) < 1e-6);
        }
    }

    #[test]
    fn sparse_terms_in_chunks_equal_one_pass() {
        // 300 entries against a chunk of at least one: force several chunks
        // by a wide input (rows × chunk bounded).
        let (out, inp) = (20, 30);
        let entries: Vec<(u32, u32, f32)> = (0..300u32)
            .map(|k| (k % out as u32, (k * 7) % inp as u32, k as f32 / 100.0 - 1.0))
            .collect();
        let d = TensorDelta::sparse((out, inp), entries, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, (4 * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((4, inp))
            .unwrap();
        let want = x.matmul(&d.to_dense().unwrap().t().unwrap()).unwrap();
        assert!(close(&d.linear_term(&x).unwrap(), &want) < 1e-3);
    }

    #[test]
    fn a_combination_weighs_its_coefficients_and_sums_its_terms() {
        let a = ModelDelta::Owned(HashMap::from([(
            "w".to_string(),
            Arc::new(TensorDelta::Dense(t(&[1., 2.], (1, 2)))),
        )]));
        let b = ModelDelta::Owned(HashMap::from([(
            "w".to_string(),
            Arc::new(TensorDelta::Dense(t(&[0., 1.], (1, 2)))),
        )]));
        let c = ModelDelta::Combination(vec![(0.5, Arc::new(a)), (2.0, Arc::new(b))]);
        assert_eq!(c.own_bytes(), 16);
        assert_eq!(c.shared_bytes(), 16);
        let x = t(&[1., 1.], (1, 2));
        // 0.5·3 + 2·1 = 3.5
        let y = c.linear_term("w", &x).unwrap().unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), [[3.5]]);
        assert!(c.linear_term("other", &x).unwrap().is_none());
    }

    #[test]
    fn combinations_sharing_task_vectors_take_one_product_per_vector() {
        // τa = [1, 2], τb = [0, 1] (1×2); run 1 (1 row): 0.5 τa + 2 τb,
        // run 2 (2 rows): −1 τa; a row without a delta between them.
        let owned = |v: &[f32]| {
            Arc::new(ModelDelta::Owned(HashMap::from([(
                "w".to_string(),
                Arc::new(TensorDelta::Dense(t(v, (1, 2)))),
            )])))
        };
        let (a, b) = (owned(&[1., 2.]), owned(&[0., 1.]));
        let m1 = ModelDelta::Combination(vec![(0.5, a.clone()), (2.0, b.clone())]);
        let m2 = ModelDelta::Combination(vec![(-1.0, a.clone())]);
        // A merge of its own (ΔW = [1, 0]) after them.
        let own = owned(&[1., 0.]);
        let x = Tensor::from_vec(
            vec![1f32, 1., 5., 5., 1., 0., 0., 1., 2., 1.],
            (1, 5, 2),
            &Device::Cpu,
        )
        .unwrap();
        let runs = [
            DeltaRun {
                rows: 1,
                delta: Some(&m1),
            },
            DeltaRun {
                rows: 1,
                delta: None,
            },
            DeltaRun {
                rows: 2,
                delta: Some(&m2),
            },
            DeltaRun {
                rows: 1,
                delta: Some(own.as_ref()),
            },
        ];
        let y = Tensor::zeros((1, 5, 1), DType::F32, &Device::Cpu).unwrap();
        let mut calls = 0;
        let out = add_runs(y, &x, &runs, |d, x| {
            calls += 1;
            d.linear_term("w", x)
        })
        .unwrap();
        // row 0: 0.5·3 + 2·1 = 3.5; row 1: none; row 2: −1·1 = −1;
        // row 3: −1·2 = −2; row 4: its own 1·2 = 2.
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.5, 0., -1., -2., 2.]
        );
        // One product per task vector (2), not one per combination's part
        // (3), and the merge of its own: 3.
        assert_eq!(calls, 3);
    }

    #[test]
    fn runs_add_each_rows_own_term() {
        let d = ModelDelta::Owned(HashMap::from([(
            "w".to_string(),
            Arc::new(TensorDelta::Dense(t(&[1., 0.], (1, 2)))),
        )]));
        let x = Tensor::from_vec(vec![1f32, 0., 2., 0., 3., 0.], (1, 3, 2), &Device::Cpu).unwrap();
        let y = Tensor::zeros((1, 3, 1), DType::F32, &Device::Cpu).unwrap();
        let runs = [
            DeltaRun {
                rows: 1,
                delta: None,
            },
            DeltaRun {
                rows: 2,
                delta: Some(&d),
            },
        ];
        let out = add_runs(y, &x, &runs, |d, x| d.linear_term("w", x)).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 2., 3.]
        );
    }
}
