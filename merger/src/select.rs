//! Exact order statistics of magnitudes without sorting (radix selection).
//!
//! TIES keeps the entries of |τ| at or above the k-th smallest magnitude of a
//! task vector that may span a whole model (10⁹ entries, read tensor by
//! tensor and never held in memory at once). The magnitude of an f32 with its
//! sign bit cleared, read as a u32 ([`abs_key`]), is ordered exactly like the
//! magnitude itself (non-negative IEEE floats sort like their bit patterns;
//! NaN sorts above +∞). So the k-th smallest magnitude is found by radix
//! selection on those keys in two streaming passes:
//!
//! 1. count the high 16 bits of every key (65536 buckets) and find the bucket
//!    holding the k-th smallest and its rank inside the bucket
//!    ([`locate_high`] → [`Pending`]);
//! 2. count the low 16 bits of the keys that fall in that bucket, and read off
//!    the exact key ([`Pending::resolve`] → [`Order`]).
//!
//! Histograms are plain `u64` slices, so partial counts from different
//! threads add up; [`Pool`] hands out per-thread accumulators and merges them
//! at the end without a lock per element.
//!
//! Within one tensor held in memory, [`rank_range_mask`] selects by rank
//! with ties ordered by position (magnitude pruning, breadcrumbs).

use std::sync::Mutex;

/// Buckets of one 16-bit histogram.
pub const BUCKETS: usize = 1 << 16;

/// The order key of |x|: the bits of x with the sign cleared.
#[inline(always)]
pub fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The magnitude an order key stands for.
#[inline]
pub fn key_value(key: u32) -> f32 {
    f32::from_bits(key)
}

/// Where a rank falls after counting high halves: the bucket, the rank
/// inside it (1-indexed) and how many keys lie in lower buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// High 16 bits of the sought key.
    pub high: u32,
    /// 1-indexed rank of the sought key among the keys of the bucket.
    pub rank: u64,
    /// Number of keys in lower buckets.
    pub below: u64,
}

/// The k-th smallest key and how many keys are below it and equal to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    /// The key.
    pub key: u32,
    /// Keys strictly smaller.
    pub below: u64,
    /// Keys equal to it (at least 1).
    pub equal: u64,
}

/// Finds the bucket of the `rank`-th smallest (1-indexed) of the counted
/// values. Panics when `rank` is 0 or exceeds the count.
pub fn locate_high(counts: &[u64], rank: u64) -> Pending {
    assert!(rank >= 1, "ranks are 1-indexed");
    let mut below = 0u64;
    for (b, &c) in counts.iter().enumerate() {
        if below + c >= rank {
            return Pending {
                high: b as u32,
                rank: rank - below,
                below,
            };
        }
        below += c;
    }
    panic!("rank {rank} exceeds the {below} values counted");
}

impl Pending {
    /// True when `key` falls in this bucket.
    #[inline]
    pub fn holds(&self, key: u32) -> bool {
        key >> 16 == self.high
    }

    /// The exact order statistic from the low-half counts of this bucket.
    pub fn resolve(&self, low_counts: &[u64]) -> Order {
        let inner = locate_high(low_counts, self.rank);
        Order {
            key: self.high << 16 | inner.high,
            below: self.below + inner.below,
            equal: low_counts[inner.high as usize],
        }
    }
}

/// Adds `key`'s high half to a histogram.
#[inline]
pub fn count_high(counts: &mut [u64], key: u32) {
    counts[(key >> 16) as usize] += 1;
}

/// Copies of an interleaved high-half histogram: consecutive values go to
/// different copies, so a run of equal magnitudes (common in bf16 task
/// vectors) does not serialise every increment on one counter.
pub const WAYS: usize = 4;

/// Counts the high halves of |v| for every value into `counts`, which
/// holds [`WAYS`] histograms of [`BUCKETS`] counters back to back (sum them
/// with [`fold_ways`]).
pub fn count_high_ways(counts: &mut [u64], values: &[f32]) {
    assert_eq!(counts.len(), WAYS * BUCKETS, "interleaved histogram size");
    let (h0, rest) = counts.split_at_mut(BUCKETS);
    let (h1, rest) = rest.split_at_mut(BUCKETS);
    let (h2, h3) = rest.split_at_mut(BUCKETS);
    // Fixed-size views let the compiler drop the bounds checks (a high half
    // is below 2¹⁶).
    let h: [&mut [u64; BUCKETS]; WAYS] =
        [h0, h1, h2, h3].map(|h| h.try_into().expect("bucket count"));
    let [h0, h1, h2, h3] = h;
    let mut quads = values.chunks_exact(WAYS);
    for q in &mut quads {
        h0[(abs_key(q[0]) >> 16) as usize] += 1;
        h1[(abs_key(q[1]) >> 16) as usize] += 1;
        h2[(abs_key(q[2]) >> 16) as usize] += 1;
        h3[(abs_key(q[3]) >> 16) as usize] += 1;
    }
    for &v in quads.remainder() {
        h0[(abs_key(v) >> 16) as usize] += 1;
    }
}

/// Adds the [`WAYS`] copies of an interleaved histogram into `dst`.
pub fn fold_ways(dst: &mut [u64], counts: &[u64]) {
    for way in counts.chunks(BUCKETS) {
        add_into(dst, way);
    }
}

/// Adds `key`'s low half to the histogram of `bucket` (if it falls there).
#[inline]
pub fn count_low(counts: &mut [u64], bucket: &Pending, key: u32) {
    if bucket.holds(key) {
        counts[(key & 0xffff) as usize] += 1;
    }
}

/// The `rank`-th smallest (1-indexed) of `keys` by the two radix passes,
/// with its counts. Panics when `rank` is 0 or exceeds `keys.len()`.
pub fn order_radix(keys: &[u32], rank: u64) -> Order {
    let mut high = vec![0u64; BUCKETS];
    keys.iter().for_each(|&k| count_high(&mut high, k));
    let pending = locate_high(&high, rank);
    let mut low = vec![0u64; BUCKETS];
    keys.iter().for_each(|&k| count_low(&mut low, &pending, k));
    pending.resolve(&low)
}

/// The `rank`-th smallest (1-indexed) of `keys` by an in-place selection
/// (reorders `keys`); best for small slices. Panics like [`order_radix`].
pub fn order_small(keys: &mut [u32], rank: u64) -> Order {
    assert!(
        rank >= 1 && rank as usize <= keys.len(),
        "rank {rank} of {}",
        keys.len()
    );
    let key = *keys.select_nth_unstable(rank as usize - 1).1;
    let (mut below, mut equal) = (0u64, 0u64);
    for &k in keys.iter() {
        below += u64::from(k < key);
        equal += u64::from(k == key);
    }
    Order { key, below, equal }
}

/// Per-thread accumulators handed out and taken back, merged at the end:
/// rayon jobs borrow one for a whole chunk, so the lock is taken twice per
/// chunk, never per element.
pub struct Pool<A> {
    items: Mutex<Vec<A>>,
}

impl<A> Default for Pool<A> {
    fn default() -> Self {
        Pool {
            items: Mutex::new(Vec::new()),
        }
    }
}

impl<A> Pool<A> {
    /// Runs `f` with an accumulator from the pool (made by `make` when none
    /// is free) and puts it back.
    pub fn with<R>(&self, make: impl FnOnce() -> A, f: impl FnOnce(&mut A) -> R) -> R {
        let taken = self.items.lock().expect("pool poisoned").pop();
        let mut acc = taken.unwrap_or_else(make);
        let r = f(&mut acc);
        self.items.lock().expect("pool poisoned").push(acc);
        r
    }

    /// Every accumulator made.
    pub fn into_inner(self) -> Vec<A> {
        self.items.into_inner().expect("pool poisoned")
    }
}

/// Adds `src` into `dst` elementwise.
pub fn add_into<T: Copy + std::ops::AddAssign>(dst: &mut [T], src: &[T]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}

/// The mask of the entries whose rank lies in [lo, hi) when `keys` are
/// sorted ascending (by `f32::total_cmp`), ties ordered by position.
///
/// O(n): two selections on a copy and two counting passes, no full sort.
pub fn rank_range_mask(keys: &[f32], lo: usize, hi: usize) -> Vec<bool> {
    let n = keys.len();
    let hi = hi.min(n);
    if lo >= hi {
        return vec![false; n];
    }
    if lo == 0 && hi == n {
        return vec![true; n];
    }
    let cmp = |a: &f32, b: &f32| a.total_cmp(b);
    let mut sorted = keys.to_vec();
    let lo_v = *sorted.select_nth_unstable_by(lo, cmp).1;
    let hi_v = if hi - 1 == lo {
        lo_v
    } else {
        *sorted[lo + 1..].select_nth_unstable_by(hi - 2 - lo, cmp).1
    };
    drop(sorted);
    let below = |v: f32| keys.iter().filter(|k| k.total_cmp(&v).is_lt()).count();
    let (below_lo, below_hi) = (below(lo_v), below(hi_v));
    let (mut seen_lo, mut seen_hi) = (0, 0);
    keys.iter()
        .map(|k| {
            let (a, b) = (k.total_cmp(&lo_v), k.total_cmp(&hi_v));
            if a.is_lt() || b.is_gt() {
                return false;
            }
            if a.is_gt() && b.is_lt() {
                return true;
            }
            // Equal to a boundary value: its rank is the count below that
            // value plus the earlier entries equal to it.
            let rank = if a.is_eq() {
                seen_lo += 1;
                below_lo + seen_lo - 1
            } else {
                seen_hi += 1;
                below_hi + seen_hi - 1
            };
            (lo..hi).contains(&rank)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The rank-th smallest with counts, by a full sort (the oracle).
    fn by_sort(keys: &[u32], rank: u64) -> Order {
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        let key = sorted[rank as usize - 1];
        Order {
            key,
            below: sorted.iter().filter(|&&k| k < key).count() as u64,
            equal: sorted.iter().filter(|&&k| k == key).count() as u64,
        }
    }

    #[test]
    fn keys_order_like_magnitudes() {
        let xs = [
            0.0f32,
            -0.0,
            1e-40,
            -1e-38,
            0.5,
            -0.75,
            1.0,
            -3.0e5,
            f32::INFINITY,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(abs_key(a) < abs_key(b), a.abs() < b.abs(), "{a} vs {b}");
            }
        }
        assert_eq!(key_value(abs_key(-2.5)), 2.5);
    }

    #[test]
    fn hand_worked_rank() {
        // |x| = [0, 3, 1, 3, 2, 0]; sorted 0 0 1 2 3 3: the 4th smallest is 2
        // with 3 below and 1 equal; the 5th is 3 with 4 below and 2 equal.
        let keys: Vec<u32> = [0.0f32, -3.0, 1.0, 3.0, -2.0, 0.0]
            .iter()
            .map(|&x| abs_key(x))
            .collect();
        let four = order_radix(&keys, 4);
        assert_eq!((key_value(four.key), four.below, four.equal), (2.0, 3, 1));
        let five = order_radix(&keys, 5);
        assert_eq!((key_value(five.key), five.below, five.equal), (3.0, 4, 2));
        let one = order_radix(&keys, 1);
        assert_eq!((key_value(one.key), one.below, one.equal), (0.0, 0, 2));
    }

    #[test]
    fn radix_and_small_agree_with_sort_on_random_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for trial in 0..40 {
            let n = rng.random_range(1..5000usize);
            // Mix of zeros, repeated values (bf16-like coarse grid), tiny
            // subnormals and wide magnitudes, in both signs.
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    let x: f32 = match rng.random_range(0..5) {
                        0 => 0.0,
                        1 => (rng.random_range(-8i32..8) as f32) * 0.125,
                        2 => rng.random_range(-1e-3f32..1e-3),
                        3 => f32::from_bits(rng.random_range(1u32..1000)),
                        _ => rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-6..6)),
                    };
                    abs_key(x)
                })
                .collect();
            for _ in 0..5 {
                let rank = rng.random_range(1..=n as u64);
                let want = by_sort(&keys, rank);
                assert_eq!(
                    order_radix(&keys, rank),
                    want,
                    "trial {trial} rank {rank} of {n}"
                );
                let mut scratch = keys.clone();
                assert_eq!(
                    order_small(&mut scratch, rank),
                    want,
                    "trial {trial} rank {rank} of {n}"
                );
            }
            // The extremes.
            assert_eq!(order_radix(&keys, 1), by_sort(&keys, 1));
            assert_eq!(order_radix(&keys, n as u64), by_sort(&keys, n as u64));
        }
    }

    #[test]
    fn split_histograms_add_up() {
        // Counting two halves separately and adding gives the same answer.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let keys: Vec<u32> = (0..10_000)
            .map(|_| abs_key(rng.random_range(-2.0f32..2.0)))
            .collect();
        let (a, b) = keys.split_at(4321);
        let mut ha = vec![0u64; BUCKETS];
        let mut hb = vec![0u64; BUCKETS];
        a.iter().for_each(|&k| count_high(&mut ha, k));
        b.iter().for_each(|&k| count_high(&mut hb, k));
        add_into(&mut ha, &hb);
        let p = locate_high(&ha, 8000);
        let mut la = vec![0u64; BUCKETS];
        let mut lb = vec![0u64; BUCKETS];
        a.iter().for_each(|&k| count_low(&mut la, &p, k));
        b.iter().for_each(|&k| count_low(&mut lb, &p, k));
        add_into(&mut la, &lb);
        assert_eq!(p.resolve(&la), by_sort(&keys, 8000));
    }

    #[test]
    fn interleaved_counts_equal_plain_counts() {
        // 4·k + 3 values so the remainder path runs too; runs of equal values.
        let values: Vec<f32> = (0..4003)
            .map(|i| ((i / 7) % 13) as f32 * -0.25 + (i % 3) as f32)
            .collect();
        let mut plain = vec![0u64; BUCKETS];
        values
            .iter()
            .for_each(|&v| count_high(&mut plain, abs_key(v)));
        let mut ways = vec![0u64; WAYS * BUCKETS];
        count_high_ways(&mut ways, &values);
        let mut folded = vec![0u64; BUCKETS];
        fold_ways(&mut folded, &ways);
        assert_eq!(folded, plain);
        assert_eq!(folded.iter().sum::<u64>(), 4003);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn rank_past_the_end_panics() {
        order_radix(&[1, 2, 3], 4);
    }

    #[test]
    fn rank_ranges_with_ties() {
        // keys 3 1 2 1 5: ascending with position ties → ranks 3:3 1:0 2:2 1:1 5:4.
        let k = [3., 1., 2., 1., 5.];
        assert_eq!(
            rank_range_mask(&k, 1, 4),
            vec![true, false, true, true, false]
        );
        assert_eq!(
            rank_range_mask(&k, 0, 1),
            vec![false, true, false, false, false]
        );
        assert_eq!(
            rank_range_mask(&k, 2, 5),
            vec![true, false, true, false, true]
        );
        // all equal: ranks are positions.
        assert_eq!(
            rank_range_mask(&[7.; 5], 1, 3),
            vec![false, true, true, false, false]
        );
        assert_eq!(rank_range_mask(&k, 2, 2), vec![false; 5]);
        assert_eq!(rank_range_mask(&k, 0, 9), vec![true; 5]);
    }
}
