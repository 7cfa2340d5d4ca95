//! Magnitude sparsification of task vectors, tensor by tensor:
//! - mergekit's `magnitude` ([`magnitude_keeps`], mergekit's `ties`): per
//!   task exactly k = int(density·n) largest |τi| are kept (ties at the k-th
//!   broken by position, first kept; k = 0 keeps nothing), the k-th found by
//!   in-memory selection for small tensors and by two radix passes over the
//!   stored chunks otherwise ([`crate::select`]);
//! - mergekit's `magnitude_outliers` ([`magnitude_outliers`], breadcrumbs):
//!   the smallest and the largest |τ| are zeroed, ⌊density·n⌋ kept in
//!   between, optionally rescaled to the original L1 norm.
//!
//! FusionBench's TIES trimming, whose thresholds span the whole model, is
//! TIES's own (`methods/ties/stats.rs`), on the same [`Source`].

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::source::Source;
use super::SMALL;
use crate::select::{
    abs_key, add_into, count_high_ways, count_low, fold_ways, locate_high, order_small,
    rank_range_mask, Order, Pending, Pool, BUCKETS, WAYS,
};

/// mergekit skips the L1 rescale when a norm is below this.
const RESCALE_EPS: f64 = 1e-7;

/// Which entries of one task vector mergekit's magnitude trim keeps.
#[derive(Debug, Clone)]
pub(crate) enum Keep {
    All,
    Nothing,
    /// Keys ≥ this.
    AtLeast(u32),
    /// Keys > `key`, and the first `need` keys equal to it in position order;
    /// `before[c]` = equal keys in the chunks before chunk c.
    Ties {
        key: u32,
        need: u64,
        before: Vec<u64>,
    },
}

/// mergekit's `magnitude`: exactly int(density·n) largest |τ| per task.
pub(crate) fn magnitude_keeps(src: &Source, densities: &[f64]) -> Vec<Keep> {
    let n = src.numel() as u64;
    let mut keeps = vec![Keep::All; densities.len()];
    // Rank (1-indexed from the smallest) of the smallest kept key, per task.
    let mut ranks = vec![None; densities.len()];
    for (i, &d) in densities.iter().enumerate() {
        if d >= 1.0 || n == 0 {
            continue;
        }
        let k = ((d * n as f64) as u64).min(n);
        if k == 0 {
            keeps[i] = Keep::Nothing;
        } else if k < n {
            ranks[i] = Some((n - k + 1, k));
        }
    }
    let orders = orders(
        src,
        &ranks
            .iter()
            .map(|r| r.map(|(rank, _)| rank))
            .collect::<Vec<_>>(),
    );
    let mut tie_tasks = Vec::new();
    for (i, (o, r)) in orders.iter().zip(&ranks).enumerate() {
        let (Some(o), Some((_, k))) = (o, r) else {
            continue;
        };
        let greater = n - o.below - o.equal;
        let need = k - greater;
        if need == o.equal {
            keeps[i] = Keep::AtLeast(o.key);
        } else {
            tie_tasks.push((i, o.key, need));
        }
    }
    if !tie_tasks.is_empty() {
        let counts = src.map_chunks(|_, c| {
            tie_tasks
                .iter()
                .map(|&(i, key, _)| {
                    c.tau[i][..c.len]
                        .iter()
                        .filter(|&&v| abs_key(v) == key)
                        .count() as u64
                })
                .collect::<Vec<_>>()
        });
        for (t, &(i, key, need)) in tie_tasks.iter().enumerate() {
            let mut before = Vec::with_capacity(counts.len());
            let mut acc = 0;
            for c in &counts {
                before.push(acc);
                acc += c[t];
            }
            keeps[i] = Keep::Ties { key, need, before };
        }
    }
    keeps
}

/// Order statistics of |τi| at the given ranks, by in-memory selection for
/// small tensors and by the two radix passes otherwise.
fn orders(src: &Source, ranks: &[Option<u64>]) -> Vec<Option<Order>> {
    if ranks.iter().all(Option::is_none) {
        return vec![None; ranks.len()];
    }
    if src.numel() <= SMALL {
        let c = src.load_all();
        return ranks
            .iter()
            .zip(&c.tau)
            .map(|(r, t)| {
                r.map(|r| {
                    let mut ks: Vec<u32> = t[..c.len].iter().map(|&v| abs_key(v)).collect();
                    order_small(&mut ks, r)
                })
            })
            .collect();
    }
    let tasks = ranks.len();
    let pool: Pool<Vec<u64>> = Pool::default();
    src.map_chunks(|_, c| {
        pool.with(
            || vec![0u64; tasks * WAYS * BUCKETS],
            |h| {
                for ((t, h), r) in c.tau.iter().zip(h.chunks_mut(WAYS * BUCKETS)).zip(ranks) {
                    if r.is_some() {
                        count_high_ways(h, &t[..c.len]);
                    }
                }
            },
        )
    });
    let mut high = vec![0u64; tasks * BUCKETS];
    for h in pool.into_inner() {
        for (dst, h) in high.chunks_mut(BUCKETS).zip(h.chunks(WAYS * BUCKETS)) {
            fold_ways(dst, h);
        }
    }
    let pending: Vec<Option<Pending>> = ranks
        .iter()
        .zip(high.chunks(BUCKETS))
        .map(|(r, h)| r.map(|r| locate_high(h, r)))
        .collect();
    let pool: Pool<Vec<u64>> = Pool::default();
    src.map_chunks(|_, c| {
        pool.with(
            || vec![0u64; tasks * BUCKETS],
            |h| {
                for ((t, h), p) in c.tau.iter().zip(h.chunks_mut(BUCKETS)).zip(&pending) {
                    if let Some(p) = p {
                        t[..c.len].iter().for_each(|&v| count_low(h, p, abs_key(v)));
                    }
                }
            },
        )
    });
    let mut low = vec![0u64; tasks * BUCKETS];
    pool.into_inner().iter().for_each(|h| add_into(&mut low, h));
    pending
        .iter()
        .zip(low.chunks(BUCKETS))
        .map(|(p, l)| p.map(|p| p.resolve(l)))
        .collect()
}

/// Per-chunk state of the keep decisions (tie counters).
fn keep_flags(keeps: &[Keep], chunk: usize) -> Vec<u64> {
    keeps
        .iter()
        .map(|k| match k {
            Keep::Ties { before, .. } => before[chunk],
            _ => 0,
        })
        .collect()
}

/// Whether entry `v` is kept; advances the tie counter `seen`.
#[inline(always)]
pub(crate) fn kept(keep: &Keep, v: f32, seen: &mut u64) -> bool {
    match keep {
        Keep::All => true,
        Keep::Nothing => false,
        Keep::AtLeast(k) => abs_key(v) >= *k,
        Keep::Ties { key, need, .. } => {
            let a = abs_key(v);
            if a == *key {
                *seen += 1;
                *seen <= *need
            } else {
                a > *key
            }
        }
    }
}

/// The keep mask of task `i` as a 0/1 f32 tensor, computed on the CPU
/// (position-ordered tie breaking has no cheap tensor form).
pub(crate) fn keep_mask(src: &Source, keep: &Keep, i: usize) -> candle_core::Result<Tensor> {
    let parts = src.map_chunks(|k, c| {
        let mut seen = keep_flags(std::slice::from_ref(keep), k)[0];
        c.tau[i][..c.len]
            .iter()
            .map(|&v| u8::from(kept(keep, v, &mut seen)))
            .collect::<Vec<u8>>()
    });
    let mask: Vec<u8> = parts.concat();
    Tensor::from_vec(mask, src.inputs.shape(), src.inputs.device)?.to_dtype(DType::F32)
}

/// Zeroes the smallest and the largest |τ| of `tau` in place, keeping
/// ⌊density·n⌋ entries in between; optionally restores the L1 norm.
pub(crate) fn magnitude_outliers(tau: &mut [f32], density: f64, gamma: f64, rescale: bool) {
    if density >= 1.0 {
        return;
    }
    let n = tau.len();
    let keep = (density * n as f64) as usize;
    let top = ((gamma * n as f64) as usize).min(n - keep);
    let bottom = n - keep - top;
    let magnitudes: Vec<f32> = tau.par_iter().map(|x| x.abs()).collect();
    let mask = rank_range_mask(&magnitudes, bottom, n - top);
    let before: f64 = magnitudes.par_iter().map(|&x| x as f64).sum();
    drop(magnitudes);
    tau.par_iter_mut()
        .zip(mask)
        .filter(|(_, k)| !k)
        .for_each(|(x, _)| *x = 0.0);
    if rescale {
        rescale_l1(tau, before);
    }
}

/// τ′ ← τ′ · ‖τ‖₁ / ‖τ′‖₁ for a sparsified τ′ whose original had L1 norm
/// `before` (mergekit's `RescaleNorm.l1`); skipped when either norm is
/// below 1e-7.
pub(crate) fn rescale_l1(tau: &mut [f32], before: f64) {
    let after: f64 = tau.par_iter().map(|x| x.abs() as f64).sum();
    if before >= RESCALE_EPS && after >= RESCALE_EPS {
        let s = (before / after) as f32;
        tau.par_iter_mut().for_each(|x| *x *= s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{assert_close, TAU};

    #[test]
    fn drops_outliers_and_small_entries() {
        // n = 10, density 0.5, gamma 0.1: keep 5, top 1, bottom 4 → keep |τ| in {5, 6, 7, 8, 9}.
        let mut t = TAU;
        magnitude_outliers(&mut t, 0.5, 0.1, false);
        assert_eq!(t, [0., -9., 0., 0., -5., 0., -7., 0., 8., -6.]);
    }

    #[test]
    fn gamma_rounding_to_zero_keeps_the_largest() {
        // n = 10, gamma 0.05 → ⌊0.5⌋ = 0 outliers; density 0.3 → keep the 3 largest
        // (mergekit's indices[7:-0] would keep nothing).
        let mut t = TAU;
        magnitude_outliers(&mut t, 0.3, 0.05, false);
        assert_eq!(t, [0., -9., 0., 10., 0., 0., 0., 0., 8., 0.]);
    }

    #[test]
    fn density_plus_gamma_above_one_shrinks_the_outliers() {
        // n = 10, density 0.9 → keep 9, gamma 0.2 → top 2, bottom = −1 → top 1, bottom 0:
        // only |τ| = 10 is dropped.
        let mut t = TAU;
        magnitude_outliers(&mut t, 0.9, 0.2, false);
        assert_eq!(t, [3., -9., 1., 0., -5., 2., -7., 4., 8., -6.]);
        // density 1 keeps everything, whatever gamma.
        let mut t = TAU;
        magnitude_outliers(&mut t, 1.0, 0.5, false);
        assert_eq!(t, TAU);
    }

    #[test]
    fn rescale_restores_the_l1_norm() {
        // Σ|τ| = 55; kept {9, 5, 7, 8, 6} sum to 35 → × 55/35 = 1.5714286.
        let mut t = TAU;
        magnitude_outliers(&mut t, 0.5, 0.1, true);
        let s = 55.0f32 / 35.0;
        assert_close(
            &t,
            &[
                0.,
                -9. * s,
                0.,
                0.,
                -5. * s,
                0.,
                -7. * s,
                0.,
                8. * s,
                -6. * s,
            ],
            1e-5,
        );
    }
}
