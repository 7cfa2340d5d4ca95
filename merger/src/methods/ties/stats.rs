//! FusionBench TIES statistics: per-task thresholds (exact order statistics
//! of |τ| over a scope) and the majority sign, by the sampled range pass
//! described in the header of [`super`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::super::task_vectors::{
    add_trimmed, for_each_flag, mask16, sgn, Chunk, Source, BLOCK, CHUNK, SMALL,
};
use super::onepass::Hold;
use super::ROW_CAP_BYTES;
use crate::error::Result;
use crate::kernels::multiversion;
use crate::select::{
    abs_key, add_into, count_high_ways, fold_ways, locate_high, order_small, Pool, BUCKETS, WAYS,
};
use rayon::prelude::*;

/// Per-task thresholds (order keys: keep |τ| with `abs_key(τ) >= key`) and
/// the majority sign that zero elected signs take.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TiesStats {
    pub keys: Vec<u32>,
    /// Σ over the scope of sign(Σi trimmed τi), exact.
    pub sign_sum: i64,
    /// sign(`sign_sum`).
    pub majority: f32,
}

impl TiesStats {
    fn new(keys: Vec<u32>, sign_sum: i64) -> Self {
        TiesStats {
            keys,
            sign_sum,
            majority: sign_sum.signum() as f32,
        }
    }
}

/// FusionBench's rank: k = d − int(d·density), the k-th smallest |τ| is the
/// threshold; `None` when everything is kept.
fn fb_rank(d: u64, density: f64) -> Option<u64> {
    if density >= 1.0 || d == 0 {
        return None;
    }
    let k = d - ((d as f64 * density) as u64).min(d);
    (k > 0).then_some(k)
}

/// Σ sign(x) over a slice.
#[inline(always)]
fn sign_count(s: &[f32]) -> i64 {
    s.iter()
        .map(|&x| i32::from(x > 0.0) - i32::from(x < 0.0))
        .sum::<i32>() as i64
}

multiversion!(
    /// Σ over entries of sign(Σi trimmed τi), for the entries of `c`.
    fn sign_total => sign_total_body(c: &mut Chunk, keys: &[u32]) -> i64
);

#[inline(always)]
fn sign_total_body(c: &mut Chunk, keys: &[u32]) -> i64 {
    let n = c.len;
    let Chunk { tau, sum, .. } = c;
    let s = &mut sum[..n];
    s.fill(0.0);
    for (t, &k) in tau.iter().zip(keys) {
        add_trimmed(s, &t[..n], k);
    }
    sign_count(s)
}

/// The sign contribution of one stored row (τ of every task at one entry).
fn row_sign(row: &[f32], keys: &[u32]) -> i64 {
    let mut s = 0f32;
    for (&v, &k) in row.iter().zip(keys) {
        if abs_key(v) >= k {
            s += v;
        }
    }
    sgn(s)
}

/// Statistics of one tensor held in memory (small tensors, and the oracle
/// of the tests).
pub(super) fn fb_stats_direct(c: &mut Chunk, density: f64) -> TiesStats {
    let keys: Vec<u32> = c
        .tau
        .iter()
        .map(|t| match fb_rank(c.len as u64, density) {
            None => 0,
            Some(k) => {
                let mut ks: Vec<u32> = t[..c.len].iter().map(|&v| abs_key(v)).collect();
                order_small(&mut ks, k).key
            }
        })
        .collect();
    let sign_sum = sign_total(c, &keys);
    TiesStats::new(keys, sign_sum)
}

/// Runs a closure over the sources of a scope (one tensor or a whole model).
pub(crate) type Visit<'v> =
    &'v (dyn Fn(&(dyn Fn(&Source) -> Result<()> + Sync)) -> Result<()> + Sync);

/// How a task is trimmed while its threshold is being found: a known
/// threshold, or a range of keys [from, from + width) that holds it
/// (probably, when estimated from a sample) and is counted at full
/// resolution.
#[derive(Clone, Copy)]
pub(super) enum Cut {
    Known(u32),
    Range { from: u32, width: u32 },
}

impl Cut {
    /// Counters needed at full resolution.
    fn width(&self) -> usize {
        match self {
            Cut::Known(_) => 0,
            Cut::Range { width, .. } => *width as usize,
        }
    }
}

/// Widest range (in high-half buckets) a sample may propose.
const MAX_SPAN: u32 = 4;
/// The sample is the first 1/`SAMPLE_PART` of every chunk.
pub(super) const SAMPLE_PART: usize = 8;
/// The small sample that proposes the buckets to look in is the first
/// 1/`PRE_PART` of every chunk.
const PRE_PART: usize = 64;

/// Options of [`fb_stats_radix`].
#[derive(Debug, Clone, Copy)]
pub(super) struct RadixOpts {
    /// Undecided rows kept before falling back to a recount pass.
    pub row_cap_bytes: usize,
    /// Estimate the ranges from a sample first (else: exact pass 1).
    pub sample: bool,
}

impl Default for RadixOpts {
    fn default() -> Self {
        RadixOpts {
            row_cap_bytes: ROW_CAP_BYTES,
            sample: true,
        }
    }
}

/// Range-pass accumulator: per task the keys below its range and the
/// full-resolution counts inside it, the majority's settled part, the
/// difference tables (indexed like the counts) and the undecided rows.
pub(super) struct Pass2 {
    pub below: Vec<u64>,
    pub low: Vec<u64>,
    pub diff: Vec<i64>,
    pub settled: i64,
    pub rows: Vec<f32>,
}

multiversion!(
    /// The range pass over one chunk: counts below and inside each task's
    /// range and the majority-sign bookkeeping (see the module header).
    /// `offsets[i]` is where task i's counters start.
    fn pass2_chunk => pass2_body(c: &mut Chunk, cuts: &[Cut], lanes: &[Lane], acc: &mut Pass2, overflowed: bool)
);

/// Where the range pass counts a task's keys: its range (empty for a
/// known threshold), where its counters start, and a spare counter (past
/// every task's counters) for the keys outside the range.
#[derive(Clone, Copy)]
pub(super) struct Lane {
    pub from: u32,
    pub width: u32,
    pub offset: usize,
    spare: usize,
    /// The last key of the range, which the fused pass counts apart
    /// ([`NO_LAST`] for an empty range or one that reaches past the i32
    /// keys).
    last: u32,
}

#[inline(always)]
fn pass2_body(c: &mut Chunk, cuts: &[Cut], lanes: &[Lane], acc: &mut Pass2, overflowed: bool) {
    let n = c.len;
    // The spare counter of the difference table, never read.
    let spare = acc.diff.len() - 1;
    let Chunk {
        tau,
        sum,
        acc: with,
        undecided,
        picks,
        ..
    } = c;
    // s0: the sum over the tasks kept whatever is undecided; s1: the same
    // plus every τ inside its task's range (the sum with the undecided task
    // kept, when there is exactly one); `hit`: some task is inside its range.
    let (s0, s1) = (&mut sum[..n], &mut with[..n]);
    s0.fill(0.0);
    s1.fill(0.0);
    let hit = &mut undecided[..n];
    hit.fill(0);
    for (t, (i, cut)) in tau.iter().zip(cuts.iter().enumerate()) {
        let t = &t[..n];
        match *cut {
            Cut::Known(k) => {
                let k = k.min(i32::MAX as u32) as i32;
                for ((a, b), &v) in s0.iter_mut().zip(s1.iter_mut()).zip(t) {
                    let kept = if abs_key(v) as i32 >= k { v } else { 0.0 };
                    *a += kept;
                    *b += kept;
                }
            }
            Cut::Range { from, width } => {
                // One loop: s0 keeps keys past the range, s1 keys from its
                // start, the keys below it are counted and hits flagged.
                let past = from.saturating_add(width).min(i32::MAX as u32) as i32;
                let start = from.min(i32::MAX as u32) as i32;
                let mut below = 0u32;
                for (((a, b), h), &v) in s0.iter_mut().zip(s1.iter_mut()).zip(hit.iter_mut()).zip(t)
                {
                    let key = abs_key(v) as i32;
                    let (up, inside) = (key >= past, key >= start);
                    *a += if up { v } else { 0.0 };
                    *b += if inside { v } else { 0.0 };
                    below += u32::from(!inside);
                    *h |= u32::from(inside & !up);
                }
                acc.below[i] += u64::from(below);
            }
        }
    }
    // Every entry counts sign(s0) now; the visits below correct the entries
    // with an undecided task.
    let mut settled = 0i32;
    for &x0 in s0.iter() {
        settled += i32::from(x0 > 0.0) - i32::from(x0 < 0.0);
    }
    let flags: &mut [u8] = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut picks[..])[..n];
    for (f, &h) in flags.iter_mut().zip(hit.iter()) {
        *f = if h != 0 { 0xff } else { 0 };
    }
    for_each_flag(flags, |j| {
        // Count the keys inside the ranges; a zero adds nothing whether
        // kept or not, so it leaves the entry decided. Branch-free: a key
        // outside its task's range counts in the task's spare slot.
        let (mut undecided, mut at) = (0u32, spare);
        for (t, l) in tau.iter().zip(lanes) {
            let key = abs_key(t[j]);
            let d = key.wrapping_sub(l.from);
            let inside = d < l.width;
            acc.low[if inside {
                l.offset + d as usize
            } else {
                l.spare
            }] += 1;
            let open = inside & (key != 0);
            undecided += u32::from(open);
            at = if open { l.offset + d as usize } else { at };
        }
        let (x0, x1) = (s0[j], s1[j]);
        let d = sgn(x1) - sgn(x0);
        acc.diff[if undecided == 1 { at } else { spare }] += d;
        if undecided >= 2 {
            settled -= sgn(x0) as i32;
            if !overflowed {
                acc.rows.extend(tau.iter().map(|t| t[j]));
            }
        }
    });
    acc.settled += i64::from(settled);
}

/// Runs one chunk's range pass `pass(acc, overflowed)` on a pooled
/// accumulator, then applies the row budget.
pub(super) type PerChunk<'p> = &'p (dyn Fn(&mut dyn FnMut(&mut Pass2, bool)) + Sync);

/// The range pass over `src` straight from the stored words (bf16 inputs
/// without dropout, up to 4 tasks; `false`, doing nothing, otherwise):
/// the same sums, in the same order, as [`pass2_chunk`], with every τ in
/// registers.
fn pass2_fused(src: &Source, cuts: &[Cut], lanes: &[Lane], per_chunk: PerChunk) -> bool {
    let Some((base, experts)) = src.bf16_inputs() else {
        return false;
    };
    fn run<const T: usize>(
        src: &Source,
        base: &[u16],
        experts: &[&[u16]],
        cuts: &[Cut],
        lanes: &[Lane],
        per_chunk: PerChunk,
    ) {
        let ex: [&[u16]; T] = std::array::from_fn(|i| experts[i]);
        let lanes: [Lane; T] = std::array::from_fn(|i| lanes[i]);
        // The i32 bounds of `pass2_body`: keys from `start` are inside or
        // past the range, keys from `past` past it (a known threshold is
        // an empty range at it).
        let bounds: [(i32, i32); T] = std::array::from_fn(|i| match cuts[i] {
            Cut::Known(k) => {
                let k = k.min(i32::MAX as u32) as i32;
                (k, k)
            }
            Cut::Range { from, width } => (
                from.min(i32::MAX as u32) as i32,
                from.saturating_add(width).min(i32::MAX as u32) as i32,
            ),
        });
        #[cfg(target_arch = "x86_64")]
        let wide = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let n = base.len();
        (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|k| {
            let a = Pass2Args {
                src,
                base,
                ex: &ex,
                lanes: &lanes,
                bounds: &bounds,
            };
            let (start, len) = (k * CHUNK, CHUNK.min(n - k * CHUNK));
            per_chunk(&mut |acc, overflowed| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    return unsafe { pass2_fused_chunk_wide(&a, start, len, acc, overflowed) };
                }
                pass2_fused_chunk(&a, start, len, acc, overflowed)
            })
        });
    }
    match experts.len() {
        1 => run::<1>(src, base, &experts, cuts, lanes, per_chunk),
        2 => run::<2>(src, base, &experts, cuts, lanes, per_chunk),
        3 => run::<3>(src, base, &experts, cuts, lanes, per_chunk),
        4 => run::<4>(src, base, &experts, cuts, lanes, per_chunk),
        _ => return false,
    }
    true
}

/// What [`pass2_fused_chunk`] works on.
struct Pass2Args<'s, 'a, const T: usize> {
    src: &'s Source<'a>,
    base: &'s [u16],
    ex: &'s [&'s [u16]; T],
    lanes: &'s [Lane; T],
    bounds: &'s [(i32, i32); T],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass2_fused_chunk_wide<const T: usize>(
    a: &Pass2Args<T>,
    start: usize,
    len: usize,
    acc: &mut Pass2,
    overflowed: bool,
) {
    pass2_fused_chunk(a, start, len, acc, overflowed)
}

/// Entries `start..start + len`, block by block (the next block's bytes
/// prefetched, see [`Source::blocks`]).
#[inline(always)]
fn pass2_fused_chunk<const T: usize>(
    a: &Pass2Args<T>,
    start: usize,
    len: usize,
    acc: &mut Pass2,
    overflowed: bool,
) {
    let spare = acc.diff.len() - 1;
    let froms: [u32; T] = std::array::from_fn(|i| a.lanes[i].from);
    let widths: [u32; T] = std::array::from_fn(|i| a.lanes[i].width);
    let lasts: [u32; T] = std::array::from_fn(|i| a.lanes[i].last);
    let mut dds = [0i32; BLOCK];
    let mut hits = [0u32; BLOCK];
    let mut flags = [0u8; BLOCK];
    let mut off = 0;
    while off < len {
        let l = BLOCK.min(len - off);
        let s = start + off;
        a.src.prefetch((s + l)..(start + (off + 2 * l).min(len)));
        let b = &a.base[s..s + l];
        let e: [&[u16]; T] = std::array::from_fn(|i| &a.ex[i][s..s + l]);
        let dds = &mut dds[..l];
        let flags_all = &mut flags;
        flags_all[l..l.div_ceil(32) * 32].fill(0);
        let (hits, flags) = (&mut hits[..l], &mut flags_all[..l]);
        let mut below = [0u32; T];
        let mut at_last = [0u32; T];
        let mut diff_last = [0i32; T];
        let mut settled = 0i32;
        for j in 0..l {
            let bj = f32::from_bits(u32::from(b[j]) << 16);
            let (mut x0, mut x1, mut hit) = (0f32, 0f32, 0u32);
            // Tasks inside their range (`undecided`: with a key other than
            // 0), whether some task is inside at another key than the last
            // of its range, and (as masks) the tasks undecided at it.
            let (mut undecided, mut odd) = (0u32, 0u32);
            let mut last = [0i32; T];
            for i in 0..T {
                let v = f32::from_bits(u32::from(e[i][j]) << 16) - bj;
                let k = abs_key(v);
                let key = k as i32;
                let (from, past) = a.bounds[i];
                let (up, inside) = (key >= past, key >= from);
                x0 += if up { v } else { 0.0 };
                x1 += if inside { v } else { 0.0 };
                below[i] += u32::from(!inside);
                hit |= u32::from(inside & !up);
                let within = u32::from(k.wrapping_sub(froms[i]) < widths[i]);
                let nonzero = u32::from(k != 0);
                let is_last = u32::from(k == lasts[i]);
                undecided += within & nonzero;
                odd |= within & u32::from(k != lasts[i]);
                at_last[i] += is_last;
                last[i] = -((is_last & nonzero) as i32);
            }
            let (sx0, dd) = (sgn32(x0), sgn32(x1) - sgn32(x0));
            let many = hit & u32::from(undecided >= 2);
            settled += sx0 & (many as i32 - 1);
            let one = -i32::from(undecided == 1);
            for i in 0..T {
                diff_last[i] += dd & one & last[i];
            }
            dds[j] = dd;
            hits[j] = hit & (many | odd);
        }
        for (f, &h) in flags.iter_mut().zip(hits.iter()) {
            *f = if h != 0 { 0xff } else { 0 };
        }
        // (A known threshold's `below` is never read.)
        for (total, &c) in acc.below.iter_mut().zip(&below) {
            *total += u64::from(c);
        }
        for (lane, (&c, &d)) in a.lanes.iter().zip(at_last.iter().zip(&diff_last)) {
            if lane.last != NO_LAST {
                let slot = lane.offset + (lane.last - lane.from) as usize;
                acc.low[slot] += u64::from(c);
                acc.diff[slot] += i64::from(d);
            }
        }
        // The entries left (a key inside a range at another key than its
        // last, or several tasks undecided), 32 flags at a time as a bit
        // mask (the flags past `l` are zero).
        for (g, group) in flags_all[..l.div_ceil(32) * 32]
            .chunks_exact(32)
            .enumerate()
        {
            let mut mask = mask16(&group[..16]) | mask16(&group[16..]) << 16;
            while mask != 0 {
                let j = g * 32 + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                pass2_visit(b, &e, j, a.lanes, dds[j], spare, acc, overflowed);
            }
        }
        acc.settled += i64::from(settled);
        off += l;
    }
}

/// sign(x) as -1, 0 or 1 (0 for NaN).
#[inline(always)]
pub(super) fn sgn32(x: f32) -> i32 {
    i32::from(x > 0.0) - i32::from(x < 0.0)
}

/// [`Lane::last`] of a lane whose last key is not counted apart.
const NO_LAST: u32 = u32::MAX;

/// One entry left by the vector loop of [`pass2_fused_chunk`]: counts the
/// keys inside the ranges other than each range's last (counted in the
/// loop), the difference of a single undecided task at such a key, and
/// keeps the row when two or more tasks are undecided (see
/// [`pass2_body`]). Branch-free but for the rows: a key not counted here
/// counts in the task's spare counter.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pass2_visit<const T: usize>(
    b: &[u16],
    e: &[&[u16]; T],
    j: usize,
    lanes: &[Lane; T],
    dd: i32,
    spare: usize,
    acc: &mut Pass2,
    overflowed: bool,
) {
    let bj = f32::from_bits(u32::from(b[j]) << 16);
    let tau: [f32; T] = std::array::from_fn(|i| f32::from_bits(u32::from(e[i][j]) << 16) - bj);
    let pick = |c: bool, x: usize, y: usize| {
        let m = usize::from(c).wrapping_neg();
        (x & m) | (y & !m)
    };
    let (mut undecided, mut at) = (0u32, spare);
    for (&v, l) in tau.iter().zip(lanes) {
        let key = abs_key(v);
        let d = key.wrapping_sub(l.from);
        let inside = d < l.width;
        let odd = inside & (key != l.last);
        let slot = l.offset.wrapping_add(d as usize);
        acc.low[pick(odd, slot, l.spare)] += 1;
        let open = inside & (key != 0);
        undecided += u32::from(open);
        at = pick(open & odd, slot, at);
    }
    acc.diff[pick(undecided == 1, at, spare)] += i64::from(dd);
    if undecided >= 2 && !overflowed {
        acc.rows.extend(tau);
    }
}

/// High-half histograms of every task over the scope (of the first
/// 1/`part` of every chunk), and the number of entries of the scope.
fn high_pass(tasks: usize, part: usize, visit: Visit) -> Result<(Vec<u64>, u64)> {
    let pool: Pool<Vec<u64>> = Pool::default();
    let entries = std::sync::atomic::AtomicU64::new(0);
    visit(&|src: &Source| {
        entries.fetch_add(src.numel() as u64, Ordering::Relaxed);
        src.for_each_chunk_blocks(part, |load| {
            pool.with(
                || vec![0u64; tasks * WAYS * BUCKETS],
                |h| {
                    load(&mut |c| {
                        for (t, h) in c.tau.iter().zip(h.chunks_mut(WAYS * BUCKETS)) {
                            count_high_ways(h, &t[..c.len]);
                        }
                    })
                },
            )
        });
        Ok(())
    })?;
    let mut high = vec![0u64; tasks * BUCKETS];
    for h in pool.into_inner() {
        for (dst, h) in high.chunks_mut(BUCKETS).zip(h.chunks(WAYS * BUCKETS)) {
            fold_ways(dst, h);
        }
    }
    Ok((high, entries.into_inner()))
}

/// The sample ranks q·m ± (`sigmas`·σ + 64) (clamped to 1..=m) around the
/// sample's estimate of rank k of d, q = k/d, σ = √(m·q·(1 − q)).
fn sample_ranks(k: u64, d: u64, m: u64, sigmas: f64) -> (u64, u64) {
    let q = k as f64 / d as f64;
    let (center, margin) = (
        q * m as f64,
        sigmas * (m as f64 * q * (1.0 - q)).sqrt() + 64.0,
    );
    let lo = ((center - margin).floor().max(1.0) as u64).min(m);
    let hi = ((center + margin).ceil().max(1.0) as u64).min(m);
    (lo, hi)
}

/// Sample accumulator of [`fine_cuts`]: per task the sampled keys below
/// its coarse range and the counts of the sampled keys inside it (one
/// counter per key of the range, at most [`MAX_SPAN`] buckets).
struct Fine {
    below: Vec<u64>,
    counts: Vec<Vec<u64>>,
}

multiversion!(
    /// [`fine_cuts`] over one block.
    fn fine_block => fine_body(c: &mut Chunk, coarse: &[Cut], acc: &mut Fine)
);

#[inline(always)]
fn fine_body(c: &mut Chunk, coarse: &[Cut], acc: &mut Fine) {
    let n = c.len;
    let Chunk { tau, picks, .. } = c;
    let flags: &mut [u8] = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut picks[..])[..n];
    for (i, (t, cut)) in tau.iter().zip(coarse).enumerate() {
        let Cut::Range { from, width } = *cut else {
            continue;
        };
        let t = &t[..n];
        let mut below = 0u32;
        for (f, &v) in flags.iter_mut().zip(t) {
            let d = abs_key(v).wrapping_sub(from);
            below += u32::from(abs_key(v) < from);
            *f = if d < width { 0xff } else { 0 };
        }
        acc.below[i] += u64::from(below);
        let counts = &mut acc.counts[i];
        for_each_flag(flags, |j| counts[(abs_key(t[j]) - from) as usize] += 1);
    }
}

/// Narrows coarse ranges (whole high-half buckets, from a small sample) to
/// the exact keys at the sample ranks of [`sample_ranks`] in the larger
/// sample (the first 1/[`SAMPLE_PART`] of every chunk), whose keys inside
/// the coarse ranges are collected; `None` when the sought ranks of some
/// task are not inside its coarse range.
fn fine_cuts(
    coarse: &[Cut],
    ranks: &[Option<u64>],
    d: u64,
    visit: Visit,
) -> Result<Option<Vec<Cut>>> {
    let tasks = coarse.len();
    let pool: Pool<Fine> = Pool::default();
    let sampled = std::sync::atomic::AtomicU64::new(0);
    visit(&|src: &Source| {
        let n = src.numel();
        let m: usize = (0..n.div_ceil(CHUNK))
            .map(|k| CHUNK.min(n - k * CHUNK).div_ceil(SAMPLE_PART))
            .sum();
        sampled.fetch_add(m as u64, Ordering::Relaxed);
        src.for_each_chunk_blocks(SAMPLE_PART, |load| {
            pool.with(
                || Fine {
                    below: vec![0; tasks],
                    counts: coarse.iter().map(|c| vec![0; c.width()]).collect(),
                },
                |acc| load(&mut |c| fine_block(c, coarse, acc)),
            )
        });
        Ok(())
    })?;
    let m = sampled.into_inner();
    let accs = pool.into_inner();
    let mut cuts = Vec::with_capacity(tasks);
    for (i, (cut, rank)) in coarse.iter().zip(ranks).enumerate() {
        let (&Cut::Range { from, .. }, Some(k)) = (cut, rank) else {
            cuts.push(*cut);
            continue;
        };
        let below: u64 = accs.iter().map(|a| a.below[i]).sum();
        let mut counts = vec![0u64; cut.width()];
        for a in &accs {
            add_into(&mut counts, &a.counts[i]);
        }
        let (lo, hi) = sample_ranks(*k, d, m, 8.0);
        let inside: u64 = counts.iter().sum();
        if lo <= below || hi > below + inside {
            return Ok(None);
        }
        // The keys at the two sample ranks, from the counts.
        let first = from + locate_high(&counts, lo - below).high;
        let last = from + locate_high(&counts, hi - below).high;
        cuts.push(Cut::Range {
            from: first,
            width: last - first + 1,
        });
    }
    Ok(Some(cuts))
}

/// Ranges that probably hold the k-th smallest key of each task, from a
/// sample's histograms: the buckets of sample ranks q·m ± (8σ + 64) with
/// q = k/d; `None` when a range would be wider than [`MAX_SPAN`].
fn sampled_cuts(ranks: &[Option<u64>], d: u64, sample: &[u64], sigmas: f64) -> Option<Vec<Cut>> {
    ranks
        .iter()
        .zip(sample.chunks(BUCKETS))
        .map(|(rank, h)| {
            let Some(k) = rank else {
                return Some(Cut::Known(0));
            };
            let m = h.iter().sum::<u64>();
            if m == 0 {
                return None;
            }
            let (lo, hi) = sample_ranks(*k, d, m, sigmas);
            let (b0, b1) = (locate_high(h, lo).high, locate_high(h, hi).high);
            (b1 - b0 < MAX_SPAN).then_some(Cut::Range {
                from: b0 << 16,
                width: (b1 - b0 + 1) << 16,
            })
        })
        .collect()
}

/// Counters of every task's range together.
fn width_total(cuts: &[Cut]) -> usize {
    cuts.iter().map(Cut::width).sum()
}

/// The range pass over the scope, then the exact thresholds and majority;
/// `None` when some task's k-th smallest key is not inside its range.
fn range_pass(
    cuts: &[Cut],
    ranks: &[Option<u64>],
    visit: Visit,
    opts: RadixOpts,
    hold: Option<&Hold>,
) -> Result<Option<TiesStats>> {
    if let Some(h) = hold {
        // Whatever an earlier range pass merged is stale.
        h.clear();
    }
    let tasks = cuts.len();
    let mut offsets = Vec::with_capacity(tasks);
    let mut width = 0;
    for c in cuts {
        offsets.push(width);
        width += c.width();
    }
    // Counters: every task's range, one spare per task, one spare for the
    // difference table.
    let lanes: Vec<Lane> = cuts
        .iter()
        .zip(&offsets)
        .enumerate()
        .map(|(i, (c, &offset))| {
            let (from, width) = match *c {
                Cut::Known(_) => (0, 0),
                Cut::Range { from, width } => (from, width),
            };
            let end = u64::from(from) + u64::from(width);
            Lane {
                from,
                width,
                offset,
                spare: width_total(cuts) + i,
                last: if width > 0 && end <= i32::MAX as u64 {
                    from + width - 1
                } else {
                    NO_LAST
                },
            }
        })
        .collect();
    let row_cap = opts.row_cap_bytes / (4 * tasks);
    let rows_kept = AtomicUsize::new(0);
    let overflow = AtomicBool::new(false);
    let pool: Pool<Pass2> = Pool::default();
    let make = || Pass2 {
        below: vec![0; tasks],
        low: vec![0; width + tasks + 1],
        diff: vec![0; width + tasks + 1],
        settled: 0,
        rows: Vec::new(),
    };
    // One chunk: `pass(acc, overflowed)`, then the row budget.
    let per_chunk = |pass: &mut dyn FnMut(&mut Pass2, bool)| {
        pool.with(make, |acc| {
            let before = acc.rows.len();
            let overflowed = overflow.load(Ordering::Relaxed);
            pass(acc, overflowed);
            let added = (acc.rows.len() - before) / tasks;
            if added > 0 && rows_kept.fetch_add(added, Ordering::Relaxed) + added > row_cap {
                overflow.store(true, Ordering::Relaxed);
            }
            if overflow.load(Ordering::Relaxed) {
                acc.rows = Vec::new();
            }
        })
    };
    visit(&|src: &Source| {
        if let Some(h) = hold {
            if h.pass(src, cuts, &lanes, &per_chunk)? {
                return Ok(());
            }
        }
        if !pass2_fused(src, cuts, &lanes, &per_chunk) {
            src.for_each_chunk_blocks(1, |load| {
                per_chunk(&mut |acc, overflowed| {
                    load(&mut |c| pass2_chunk(c, cuts, &lanes, acc, overflowed))
                })
            });
        }
        Ok(())
    })?;
    let accs = pool.into_inner();
    let mut keys = Vec::with_capacity(tasks);
    let mut total: i64 = accs.iter().map(|a| a.settled).sum();
    for (i, (cut, rank)) in cuts.iter().zip(ranks).enumerate() {
        match (*cut, rank) {
            (Cut::Known(k), _) => keys.push(k),
            (Cut::Range { from, .. }, Some(k)) => {
                let (at, w) = (offsets[i], cut.width());
                let below: u64 = accs.iter().map(|a| a.below[i]).sum();
                let mut low = vec![0u64; w];
                let mut diff = vec![0i64; w];
                for a in &accs {
                    add_into(&mut low, &a.low[at..at + w]);
                    add_into(&mut diff, &a.diff[at..at + w]);
                }
                let inside: u64 = low.iter().sum();
                if *k <= below || *k > below + inside {
                    return Ok(None);
                }
                let pos = locate_high(&low, k - below).high as usize;
                total += diff[pos..].iter().sum::<i64>();
                keys.push(from + pos as u32);
            }
            (Cut::Range { .. }, None) => unreachable!("ranges are made for ranked tasks"),
        }
    }
    if overflow.load(Ordering::Relaxed) {
        // Recount the majority with the exact thresholds.
        let pool: Pool<i64> = Pool::default();
        visit(&|src: &Source| {
            src.for_each_chunk_blocks(1, |load| {
                pool.with(|| 0, |acc| load(&mut |c| *acc += sign_total(c, &keys)))
            });
            Ok(())
        })?;
        total = pool.into_inner().iter().sum();
    } else {
        total += accs
            .iter()
            .flat_map(|a| a.rows.chunks_exact(tasks))
            .map(|row| row_sign(row, &keys))
            .sum::<i64>();
    }
    Ok(Some(TiesStats::new(keys, total)))
}

/// Which route [`fb_stats_radix`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Nothing to locate (density 1): one majority pass.
    Majority,
    /// Sample pass, then one range pass.
    Sampled,
    /// Full high-half pass, then one range pass (after a failed sample, or
    /// without sampling).
    Exact,
}

/// Model-wide (or tensor-wide) statistics by radix selection. With
/// sampling: a pass over 1/8 of the scope proposes a narrow range of keys
/// per task, and one full pass counts inside it at full resolution (and
/// does the majority bookkeeping); if the k-th falls outside a range, or a
/// range would be too wide, the exact route runs instead: a full pass of
/// high halves, then the same range pass on the bucket holding the k-th.
pub(super) fn fb_stats_radix(
    density: f64,
    tasks: usize,
    visit: Visit,
    opts: RadixOpts,
) -> Result<(TiesStats, Route)> {
    fb_stats_radix_hold(density, tasks, visit, opts, None)
}

/// [`fb_stats_radix`] whose range pass also merges the sources that
/// `hold` takes (their outputs are then patched by [`Hold::finish`] with
/// the statistics returned here).
pub(super) fn fb_stats_radix_hold(
    density: f64,
    tasks: usize,
    visit: Visit,
    opts: RadixOpts,
    hold: Option<&Hold>,
) -> Result<(TiesStats, Route)> {
    if density >= 1.0 {
        let known = vec![Cut::Known(0); tasks];
        let stats = range_pass(&known, &vec![None; tasks], visit, opts, hold)?;
        return Ok((stats.expect("nothing to locate"), Route::Majority));
    }
    if opts.sample {
        // A small sample proposes whole buckets, the larger one narrows
        // them to the keys around its estimate.
        let (pre, d) = high_pass(tasks, PRE_PART, visit)?;
        let ranks = vec![fb_rank(d, density); tasks];
        if let Some(coarse) = sampled_cuts(&ranks, d, &pre, 12.0) {
            if let Some(cuts) = fine_cuts(&coarse, &ranks, d, visit)? {
                if let Some(stats) = range_pass(&cuts, &ranks, visit, opts, hold)? {
                    return Ok((stats, Route::Sampled));
                }
            }
        }
        let (sample, d) = high_pass(tasks, SAMPLE_PART, visit)?;
        if let Some(cuts) = sampled_cuts(&ranks, d, &sample, 8.0) {
            if let Some(stats) = range_pass(&cuts, &ranks, visit, opts, hold)? {
                return Ok((stats, Route::Sampled));
            }
        }
    }
    let (high, d) = high_pass(tasks, 1, visit)?;
    let ranks = vec![fb_rank(d, density); tasks];
    let cuts: Vec<Cut> = ranks
        .iter()
        .zip(high.chunks(BUCKETS))
        .map(|(rank, h)| match rank {
            None => Cut::Known(0),
            Some(k) => Cut::Range {
                from: locate_high(h, *k).high << 16,
                width: 1 << 16,
            },
        })
        .collect();
    let stats = range_pass(&cuts, &ranks, visit, opts, hold)?;
    Ok((
        stats.expect("the bucket of the k-th smallest holds it"),
        Route::Exact,
    ))
}

/// Statistics of one tensor on its own (trim scope `tensor`).
pub(super) fn fb_stats_tensor(src: &Source, density: f64) -> Result<TiesStats> {
    if src.numel() <= SMALL {
        return Ok(fb_stats_direct(&mut src.load_all(), density));
    }
    Ok(fb_stats_radix(density, src.tasks(), &|f| f(src), RadixOpts::default())?.0)
}

#[cfg(test)]
mod tests {
    use super::super::test_data::{concat, random_fixture};
    use super::*;
    use crate::methods::testutil::{merge1, Fixture, FixtureScan};
    use crate::methods::{ModelScan, TensorInputs};
    use crate::spec::{MergeSpec, ParamValue};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn radix_statistics_match_in_memory_selection() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (coarse, density) in [
            (true, 0.2),
            (true, 0.5),
            (false, 0.2),
            (false, 0.9),
            (true, 1.0),
        ] {
            let fxs: Vec<Fixture> = (0..3)
                .map(|t| random_fixture(&mut rng, &format!("t{t}"), 20_000 + 777 * t, 3, coarse))
                .collect();
            let all = concat(&fxs);
            let inputs = all.inputs();
            let want =
                fb_stats_direct(&mut Source::new(&inputs, None).unwrap().load_all(), density);
            let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| {
                FixtureScan(&fxs).for_each(&|i: &TensorInputs| f(&Source::new(i, None)?))
            };
            // Sampled or exact route; rows kept, or a recount pass forced
            // by a zero row budget.
            for sample in [true, false] {
                for row_cap_bytes in [ROW_CAP_BYTES, 0] {
                    let opts = RadixOpts {
                        row_cap_bytes,
                        sample,
                    };
                    let (got, route) = fb_stats_radix(density, 3, &visit, opts).unwrap();
                    assert_eq!(got, want, "coarse {coarse} density {density} {opts:?}");
                    // (Small scopes make wide sampled ranges: either route.)
                    let expected = match (density, sample) {
                        (1.0, _) => Route::Majority,
                        (_, false) => Route::Exact,
                        _ => route,
                    };
                    assert_eq!(route, expected, "coarse {coarse} density {density}");
                }
            }
        }
    }

    #[test]
    fn a_large_scope_takes_the_sampled_route() {
        // 3 × 150k entries per task: the sample (1/8) pins the 80th
        // percentile inside one value of the coarse grid (mass 69–85 %).
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let fxs: Vec<Fixture> = (0..3)
            .map(|t| random_fixture(&mut rng, &format!("t{t}"), 150_000, 3, true))
            .collect();
        let all = concat(&fxs);
        let inputs = all.inputs();
        let want = fb_stats_direct(&mut Source::new(&inputs, None).unwrap().load_all(), 0.2);
        let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| {
            FixtureScan(&fxs).for_each(&|i: &TensorInputs| f(&Source::new(i, None)?))
        };
        let (got, route) = fb_stats_radix(0.2, 3, &visit, RadixOpts::default()).unwrap();
        assert_eq!((got, route), (want, Route::Sampled));
    }

    #[test]
    fn a_misleading_sample_falls_back_to_the_exact_route() {
        // The sample is the first 1/8 of every chunk; make those entries
        // tiny and the rest large, so the sampled range misses the k-th.
        let n = 3 * CHUNK;
        let base = vec![0f32; n];
        let e: Vec<Vec<f32>> = (0..2)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let m = ((j * 7 + i * 3) % 97) as f32 + 1.0;
                        if j % CHUNK < CHUNK / SAMPLE_PART {
                            m * 1e-4
                        } else if j % 2 == 0 {
                            m
                        } else {
                            -m
                        }
                    })
                    .collect()
            })
            .collect();
        let fx = Fixture::new("w", &[n], Some(&base), &[&e[0], &e[1]]);
        let inputs = fx.inputs();
        let src = Source::new(&inputs, None).unwrap();
        let want = fb_stats_direct(&mut src.load_all(), 0.5);
        let (got, route) = fb_stats_radix(0.5, 2, &|f| f(&src), RadixOpts::default()).unwrap();
        assert_eq!((got, route), (want, Route::Exact));
    }

    #[test]
    fn large_tensor_scope_uses_radix_and_agrees() {
        // n > SMALL: tensor scope takes the radix path; compare with the
        // in-memory oracle and with the model scope of a one-tensor model.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let fx = random_fixture(&mut rng, "big", SMALL + 1234, 3, true);
        let inputs = fx.inputs();
        let src = Source::new(&inputs, None).unwrap();
        let want = fb_stats_direct(&mut src.load_all(), 0.3);
        assert_eq!(fb_stats_tensor(&src, 0.3).unwrap(), want);
        let spec =
            MergeSpec::new("ties_merging", Some("base"), &["a", "b", "c"]).with("density", 0.3);
        let model = merge1(&spec, &fx);
        let tensor = merge1(
            &spec.with_value("trim_scope", ParamValue::Text("tensor".into())),
            &fx,
        );
        assert_eq!(model, tensor);
    }
}
