//! The product of a few rows by a linear layer's weight, `y = x Wᵀ` with
//! `x` of `m ≤ MAX_ROWS` rows: what every linear layer computes in a
//! decoding step, one row per running sequence.
//!
//! ```text
//! y[r, j] = Σ_k x[r, k] · W[j, k]      W: (out, in), row-major
//! ```
//!
//! A general matrix product packs `Wᵀ` into panels before it multiplies;
//! for a handful of rows that packing reads and writes the whole weight
//! once more and dominates (candle's product of 8 rows by a 2304 × 768
//! weight takes 6× its 1-row time on this machine). Here every weight row
//! is streamed once from memory and multiplied with all `m` input rows
//! while it sits in L1: register tiles of 3 weight rows × 4 input rows
//! (12 accumulators, the 3 weight vectors held, each input vector loaded
//! once for its 3 products), 8 lanes wide (AVX2 + FMA), threads splitting
//! the output features. On the 2-core development machine, streaming a
//! 92M-parameter decoding step's distinct weights, that tile takes the
//! products of 8 rows in 31.6 ms against 37.8 ms with 2 × 4 tiles (1 row:
//! 22.6 ms either way, the memory floor).
//!
//! **Batch invariance.** Each `y[r, j]` is summed in one fixed order (8
//! lane partial sums over `k ≡ l mod 8`, added pairwise, then the `k`
//! tail) whatever `m` is and wherever row `r` sits in the batch. A
//! sequence's logits in a batched step are therefore bit for bit the ones
//! it gets alone, which is what keeps batched greedy decoding token for
//! token equal to decoding alone.
//!
//! Taken only on x86-64 CPUs with AVX2 and FMA, for f32 tensors on the
//! CPU that track no gradient; [`product`] returns `None` otherwise and
//! the layer uses candle's product.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::host_terms::Host;

/// The most rows taken here; past it a general product packs once for
/// many rows and wins.
pub(crate) const MAX_ROWS: usize = 16;

/// Output features per task handed to a thread (a multiple of the tile's
/// 3 weight rows).
const CHUNK: usize = 66;

/// `x Wᵀ` for `x` of shape `(.., in)` with at most [`MAX_ROWS`] rows and
/// `w` of shape `(out, in)`, or `None` when this path does not apply.
pub(crate) fn product(x: &Tensor, w: &Tensor) -> Option<Result<Tensor>> {
    if !available()
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !x.device().is_cpu()
        || x.track_op()
        || w.track_op()
    {
        return None;
    }
    let (out, inp) = w.dims2().ok()?;
    let dims = x.dims();
    if dims.last() != Some(&inp) || inp == 0 {
        return None;
    }
    let m = x.elem_count() / inp;
    if m == 0 || m > MAX_ROWS || !x.is_contiguous() {
        return None;
    }
    let wh = Host::of(w)?;
    let xh = Host::of(x)?;
    let (ws, xs) = (wh.f32()?, xh.f32()?);
    let yt = transposed_product(xs, m, ws, out, inp);
    let mut y = vec![0f32; m * out];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * out + j] = v;
        }
    }
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    Some(Tensor::from_vec(y, shape, x.device()))
}

/// Whether the CPU runs the kernel.
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `yᵀ`, `(out, m)`: `x` is `(m, inp)`, `w` is `(out, inp)`.
fn transposed_product(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut yt = vec![0f32; out * m];
    yt.par_chunks_mut(CHUNK * m)
        .enumerate()
        .for_each(|(c, block)| {
            let j0 = c * CHUNK;
            let rows = block.len() / m;
            let wb = &w[j0 * inp..(j0 + rows) * inp];
            // SAFETY: `available()` checked AVX2 and FMA before any call.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx2::block(x, m, wb, rows, inp, block)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (wb, rows);
        });
    yt
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const TW: usize = 3;
    const TX: usize = 4;

    /// `yt[j * m + r] = Σ_k x[r, k] w[j, k]` for the `rows` weight rows of
    /// `w`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: &[f32],
        m: usize,
        w: &[f32],
        rows: usize,
        inp: usize,
        yt: &mut [f32],
    ) {
        let mut j = 0;
        while j + TW <= rows {
            strip::<TW>(
                x,
                m,
                &w[j * inp..(j + TW) * inp],
                inp,
                &mut yt[j * m..(j + TW) * m],
            );
            j += TW;
        }
        while j < rows {
            strip::<1>(
                x,
                m,
                &w[j * inp..(j + 1) * inp],
                inp,
                &mut yt[j * m..(j + 1) * m],
            );
            j += 1;
        }
    }

    /// [`block`] for the `W` weight rows of `w`: every input row, `TX` at a
    /// time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn strip<const W: usize>(x: &[f32], m: usize, w: &[f32], inp: usize, yt: &mut [f32]) {
        let ws: [&[f32]; W] = std::array::from_fn(|t| &w[t * inp..(t + 1) * inp]);
        let mut r = 0;
        while r + TX <= m {
            let xs: [&[f32]; TX] = std::array::from_fn(|b| &x[(r + b) * inp..(r + b + 1) * inp]);
            let sums = tile::<W, TX>(ws, xs, inp);
            for (t, s) in sums.iter().enumerate() {
                yt[t * m + r..t * m + r + TX].copy_from_slice(s);
            }
            r += TX;
        }
        while r < m {
            let sums = tile::<W, 1>(ws, [&x[r * inp..(r + 1) * inp]], inp);
            for (t, s) in sums.iter().enumerate() {
                yt[t * m + r] = s[0];
            }
            r += 1;
        }
    }

    /// The `W × X` dot products of weight rows `ws` with input rows `xs`,
    /// each summed in the one order the module documents.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const W: usize, const X: usize>(
        ws: [&[f32]; W],
        xs: [&[f32]; X],
        inp: usize,
    ) -> [[f32; X]; W] {
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let full = inp / 8 * 8;
        let mut k = 0;
        while k < full {
            let mut wv = [_mm256_setzero_ps(); W];
            for a in 0..W {
                wv[a] = _mm256_loadu_ps(ws[a].as_ptr().add(k));
            }
            for b in 0..X {
                let xv = _mm256_loadu_ps(xs[b].as_ptr().add(k));
                for a in 0..W {
                    acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            k += 8;
        }
        let mut out = [[0f32; X]; W];
        for a in 0..W {
            for b in 0..X {
                let mut s = hsum(acc[a][b]);
                for kk in full..inp {
                    s = ws[a][kk].mul_add(xs[b][kk], s);
                }
                out[a][b] = s;
            }
        }
        out
    }

    /// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every row count up to the bound and shapes with tails in both
    /// dimensions give the f64 product within f32 rounding, and each row
    /// is the same bits whatever batch it is in.
    #[test]
    fn equals_the_product_and_each_row_is_batch_invariant() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA, the kernel is not used");
            return;
        }
        for (out, inp) in [(7usize, 13usize), (130, 72), (64, 8)] {
            let w = values(out * inp, 1);
            let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            let x = values(MAX_ROWS * inp, 2);
            let alone: Vec<Vec<f32>> = (0..MAX_ROWS)
                .map(|r| {
                    let xr = Tensor::from_vec(
                        x[r * inp..(r + 1) * inp].to_vec(),
                        (1, 1, inp),
                        &Device::Cpu,
                    )
                    .unwrap();
                    product(&xr, &wt)
                        .unwrap()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            for m in 1..=MAX_ROWS {
                let xm =
                    Tensor::from_vec(x[..m * inp].to_vec(), (1, m, inp), &Device::Cpu).unwrap();
                let y = product(&xm, &wt).unwrap().unwrap();
                assert_eq!(y.dims(), &[1, m, out]);
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                for r in 0..m {
                    for j in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| x[r * inp + k] as f64 * w[j * inp + k] as f64)
                            .sum();
                        let got = y[r * out + j];
                        assert!(
                            (got as f64 - want).abs() < 1e-5,
                            "{out}x{inp} m={m} [{r},{j}]: {got} vs {want}"
                        );
                        assert_eq!(
                            got.to_bits(),
                            alone[r][j].to_bits(),
                            "row {r} of {m} differs from alone"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_take() {
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let many = Tensor::zeros((1, MAX_ROWS + 1, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(product(&many, &w).is_none());
        let f64x = Tensor::zeros((1, 2, 8), DType::F64, &Device::Cpu).unwrap();
        assert!(product(&f64x, &w).is_none());
        let var = candle_core::Var::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::zeros((1, 2, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(
            product(&x, var.as_tensor()).is_none(),
            "a weight that tracks gradients"
        );
        let strided = Tensor::zeros((8, 2), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(product(&strided.unsqueeze(0).unwrap(), &w).is_none());
    }
}
