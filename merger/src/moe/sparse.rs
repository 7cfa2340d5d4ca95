//! `sparse_we_moe`'s task vectors: each MLP task-vector tensor keeps only
//! the entries whose magnitude is strictly above its `tv_prune_ratio`
//! quantile (FusionBench's `_magnitude_prune`: `|τ| > quantile(|τ|, ratio)`,
//! the quantile interpolated linearly between order statistics as
//! `torch.quantile` does). With n distinct magnitudes that keeps
//! n − 1 − ⌊ratio·(n − 1)⌋ entries. One router is shared by every block.

use candle_core::Tensor;

use crate::error::Result;

/// The `q`-quantile of `values` (any order), with linear interpolation
/// between the order statistics at ⌊q(n−1)⌋ and ⌈q(n−1)⌉; `None` when empty.
pub fn quantile(values: &[f32], q: f64) -> Option<f32> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let mut v = values.to_vec();
    let (_, &mut at_lo, upper) = v.select_nth_unstable_by(lo, f32::total_cmp);
    if frac == 0.0 || upper.is_empty() {
        return Some(at_lo);
    }
    let at_hi = upper.iter().copied().fold(f32::INFINITY, f32::min);
    Some((at_lo as f64 + frac * (at_hi as f64 - at_lo as f64)) as f32)
}

/// Zeroes every entry whose magnitude is not strictly above the `ratio`
/// quantile of the magnitudes; returns how many entries were kept.
pub fn prune(values: &mut [f32], ratio: f64) -> usize {
    let mags: Vec<f32> = values.iter().map(|x| x.abs()).collect();
    let Some(threshold) = quantile(&mags, ratio) else {
        return 0;
    };
    let mut kept = 0;
    for v in values.iter_mut() {
        if v.abs() > threshold {
            kept += 1;
        } else {
            *v = 0.0;
        }
    }
    kept
}

/// Number of non-zero entries of a tensor.
pub fn count_nonzero(t: &Tensor) -> Result<usize> {
    Ok(crate::merge::with_f32_data(t, |d| {
        d.iter().filter(|x| **x != 0.0).count()
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_torch() {
        // 1..=10 at q = 0.9: position 8.1 between 9 and 10 → 9.1.
        let v: Vec<f32> = (1..=10).rev().map(|x| x as f32).collect();
        assert!((quantile(&v, 0.9).unwrap() - 9.1).abs() < 1e-6);
        // q = 0.5 of 1..=4: position 1.5 → 2.5; q = 0 and 1 are min and max.
        let v = [4.0f32, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn prune_keeps_the_largest_magnitudes() {
        // |values| = 1..=10; the 0.9 quantile is 9.1: only −10 stays.
        let mut v: Vec<f32> = (1..=10)
            .map(|x| if x % 2 == 0 { -(x as f32) } else { x as f32 })
            .collect();
        assert_eq!(prune(&mut v, 0.9), 1);
        assert_eq!(v.iter().filter(|x| **x != 0.0).count(), 1);
        assert_eq!(v[9], -10.0);
        // Ratio 0.5 of 1..=4 (quantile 2.5) keeps 3 and 4.
        let mut v = vec![1.0f32, -2.0, 3.0, -4.0];
        assert_eq!(prune(&mut v, 0.5), 2);
        assert_eq!(v, vec![0.0, 0.0, 3.0, -4.0]);
        // Ratio 0 keeps everything above the minimum.
        let mut v = vec![0.5f32, 0.25, 1.0];
        assert_eq!(prune(&mut v, 0.0), 2);
    }
}
