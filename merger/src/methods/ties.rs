//! TIES merging (Yadav et al., "TIES-Merging: Resolving Interference When
//! Merging Models", arXiv:2306.01708), as FusionBench's `ties_merging` and
//! as mergekit's `ties`; plus the task-vector engine the DARE variants share.
//!
//! **`ties_merging` (FusionBench)**, τi = θi − θ0:
//! 1. trim: per task keep τi where |τi| ≥ v, v the k-th smallest |τi| with
//!    k = d − int(d·density) over the d entries of the scope (FusionBench's
//!    `topk_values_mask`: ties at v are kept; density 1 keeps everything);
//! 2. elect: s = sign(Σi trimmed τi); where s = 0, s = sign(Σ over the scope
//!    of s) (`resolve_zero_signs(.., "majority")`);
//! 3. disjoint merge of the trimmed entries selected by
//!    `where(s > 0, τ > 0, τ < 0)` (FusionBench's test, so where s is still 0
//!    the negative entries are selected): `sum`, `mean` (sum / number
//!    selected, at least 1) or `max` (largest selected |τ| times s);
//! 4. θ = θ0 + λ·merged.
//!
//! The scope (`trim_scope`) is the whole model (`model`, FusionBench, which
//! flattens the state dict) or each tensor (`tensor`). Model scope runs a
//! model-wide pass in [`MergeMethod::prepare`]: thresholds are exact order
//! statistics by radix selection ([`crate::select`]): pass 1 counts the high
//! 16 bits of every |τi|, pass 2 the low 16 bits inside the bucket holding
//! the k-th. Pass 2 also gathers the majority sign without a third pass: an
//! entry whose inclusion does not depend on the still-unknown low bits
//! contributes its sign at once; an entry where exactly one task a sits in
//! its bucket contributes sign(S without a) plus, at index lo(a) of a
//! per-task difference table, sign(S with a) − sign(S without a), and the
//! table summed from the final low bits upwards gives the exact total; the
//! rare entries with several undecided tasks are kept (their τ row) and
//! settled once the thresholds are known. When more than [`ROW_CAP_BYTES`]
//! of such rows pile up, a third pass recounts the majority instead.
//!
//! Parameters: `density` in (0, 1] (default 0.2) or FusionBench's
//! `threshold` (a percentage in (0, 100]; a value ≤ 1 is read as a fraction,
//! FusionBench's rule), `scaling_coefficient` λ (also `lambda`,
//! `scaling_factor`; default 0.3, any finite number, per-tensor resolvable),
//! `merge_func` sum | mean | max (sum), `trim_scope` model | tensor (model).
//!
//! **`ties` (mergekit)**, per tensor: per model keep exactly k = int(density·n)
//! largest |τi| (ties at the k-th broken by position, first kept; k = 0 keeps
//! nothing where mergekit refuses), δi = wi·kept τi, elected sign + where
//! Σi δi ≥ 0 else −, mask_i = sign(δi) == elected (zeros never match),
//! mixed = Σ δi·mask_i, divided by Σ wi·mask_i when `normalize` (a divisor
//! with |·| < 1e-8 becomes 1), θ = θ0 + λ·mixed. Per-model `weight` (1) and
//! `density` (1.0, in (0, 1]), both per-tensor resolvable; `normalize`
//! (true); `lambda` (1.0); `int8_mask` accepted (it only picks the dtype of
//! mergekit's sign mask, never the result).
//!
//! All arithmetic is f32. On the CPU every pass is a fused loop over chunks
//! of the stored bytes, in parallel; elsewhere the merge runs as candle ops
//! (the thresholds are always found on the CPU, from the memory-mapped bytes).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::dare::{Dropout, TensorDropout};
use super::params::LAMBDA_KEYS;
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::checkpoint::reader::decode_chunk;
use crate::checkpoint::writer::bf16_bits;
use crate::checkpoint::TensorRef;
use crate::error::{MergeError, Result};
use crate::kernels::output_vec;
use crate::select::{
    abs_key, add_into, count_high_ways, count_low, fold_ways, key_value, locate_high, order_small,
    Order, Pending, Pool, BUCKETS, WAYS,
};

/// Defines `fn $name(args)` that runs `$body(args)` compiled for AVX2 and
/// FMA when the CPU has them (checked at run time; the loops are
/// compute-bound at SSE2 width), else the baseline build. `$body` must be
/// `#[inline(always)]` so that it is compiled into each version. No floating
/// point contraction happens in either build, so both give the same bits.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Entries per chunk of the fused loops.
pub(crate) const CHUNK: usize = 1 << 14;
/// Tensors up to this size find their thresholds by in-memory selection.
const SMALL: usize = 1 << 16;
/// Undecided rows kept during the majority pass before falling back to a
/// third pass.
pub(crate) const ROW_CAP_BYTES: usize = 64 << 20;
/// mergekit leaves a divisor below this undivided.
const ZERO_DIVISOR: f32 = 1e-8;
/// FusionBench's and mergekit's spellings of λ.
pub(crate) const FB_LAMBDA_KEYS: &[&str] = &["scaling_coefficient", "lambda", "scaling_factor"];

// ---------------------------------------------------------------------------
// Task vectors, chunk by chunk.

/// θ0 and every (possibly DARE-sparsified) τi for `len` consecutive
/// entries, with the kernels' scratch.
pub(crate) struct Chunk {
    pub base: Vec<f32>,
    pub tau: Vec<Vec<f32>>,
    pub len: usize,
    sum: Vec<f32>,
    acc: Vec<f32>,
    aux: Vec<f32>,
    undecided: Vec<u32>,
    which: Vec<u32>,
    /// Positions picked by a branchless compaction (one spare slot).
    picks: Vec<u32>,
}

/// Where a tensor's task vectors come from: the stored bytes, and the DARE
/// dropout applied to them, if any.
pub(crate) struct Source<'a> {
    pub inputs: &'a TensorInputs<'a>,
    pub dropout: Option<TensorDropout>,
}

impl<'a> Source<'a> {
    /// The task vectors of `inputs` (which must have a base).
    pub fn new(inputs: &'a TensorInputs<'a>, dropout: Option<TensorDropout>) -> Result<Self> {
        if inputs.base.is_none() {
            return Err(MergeError::Spec(format!(
                "tensor `{}`: this method needs a base model",
                inputs.ctx.name
            )));
        }
        Ok(Source { inputs, dropout })
    }

    pub fn numel(&self) -> usize {
        self.inputs.experts[0].numel()
    }

    pub fn tasks(&self) -> usize {
        self.inputs.experts.len()
    }

    fn chunk(&self, len: usize) -> Chunk {
        Chunk {
            base: vec![0.0; len],
            tau: vec![vec![0.0; len]; self.tasks()],
            len: 0,
            sum: vec![0.0; len],
            acc: vec![0.0; len],
            aux: vec![0.0; len],
            undecided: vec![0; len],
            which: vec![0; len],
            picks: vec![0; len + 1],
        }
    }

    /// Decodes entries `start..start + len` into `c`: θ0, and τi = θi − θ0
    /// (sparsified when there is a dropout).
    pub fn load(&self, start: usize, len: usize, c: &mut Chunk) {
        load_chunk(self, start, len, c)
    }

    /// Every entry at once (for small tensors).
    fn load_all(&self) -> Chunk {
        let n = self.numel();
        let mut c = self.chunk(n);
        self.load(0, n, &mut c);
        c
    }

    /// Runs `f(chunk index, chunk)` over every chunk in parallel; results in
    /// chunk order.
    pub fn map_chunks<R: Send>(&self, f: impl Fn(usize, &mut Chunk) -> R + Sync) -> Vec<R> {
        self.map_chunk_heads(1, f)
    }

    /// [`Source::map_chunks`] over the first ⌈len/`part`⌉ entries of each
    /// chunk only (a sample spread over the whole tensor).
    fn map_chunk_heads<R: Send>(
        &self,
        part: usize,
        f: impl Fn(usize, &mut Chunk) -> R + Sync,
    ) -> Vec<R> {
        let n = self.numel();
        (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map_init(
                || self.chunk(CHUNK.min(n)),
                |c, k| {
                    let start = k * CHUNK;
                    self.load(start, CHUNK.min(n - start).div_ceil(part), c);
                    f(k, c)
                },
            )
            .collect()
    }

    /// Builds the merged tensor by `f(chunk index, chunk, f32 results)` over
    /// every chunk in parallel, stored in the output dtype (the cast fused
    /// into the same pass).
    pub fn fill(&self, f: impl Fn(usize, &mut Chunk, &mut [f32]) + Sync) -> Result<Tensor> {
        let (shape, device) = (self.inputs.shape(), self.inputs.device);
        let t = match self.inputs.out_dtype {
            DType::BF16 => Tensor::from_vec(
                self.fill_cast(&f, |r, o: &mut [half::bf16]| {
                    o.iter_mut()
                        .zip(r)
                        .for_each(|(o, &v)| *o = half::bf16::from_bits(bf16_bits(v)));
                }),
                shape,
                device,
            ),
            DType::F16 => Tensor::from_vec(
                self.fill_cast(&f, |r, o: &mut [half::f16]| {
                    use half::slice::HalfFloatSliceExt;
                    o.convert_from_f32_slice(r);
                }),
                shape,
                device,
            ),
            _ => {
                let n = self.numel();
                let mut out: Vec<f32> = output_vec(n);
                out.par_chunks_mut(CHUNK).enumerate().for_each_init(
                    || self.chunk(CHUNK.min(n)),
                    |c, (k, o)| {
                        self.load(k * CHUNK, o.len(), c);
                        f(k, c, o)
                    },
                );
                Tensor::from_vec(out, shape, device)
            }
        };
        t.map_err(|e| self.inputs.err(e))
    }

    /// [`Source::fill`] through an f32 scratch cast by `store`.
    fn fill_cast<T: bytemuck::Zeroable + Clone + Send>(
        &self,
        f: &(impl Fn(usize, &mut Chunk, &mut [f32]) + Sync),
        store: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> Vec<T> {
        let n = self.numel();
        let mut out: Vec<T> = output_vec(n);
        out.par_chunks_mut(CHUNK).enumerate().for_each_init(
            || (self.chunk(CHUNK.min(n)), vec![0f32; CHUNK.min(n)]),
            |(c, res), (k, o)| {
                self.load(k * CHUNK, o.len(), c);
                let res = &mut res[..o.len()];
                f(k, c, res);
                store(res, o);
            },
        );
        out
    }

    /// θ0 as a tensor on the merge device.
    pub fn base_tensor(&self) -> Result<Tensor> {
        self.inputs.base_f32()
    }

    /// Every τi (after dropout) as tensors on the merge device.
    pub fn task_vectors(&self) -> Result<Vec<Tensor>> {
        let taus = self.inputs.task_vectors()?;
        let Some(d) = &self.dropout else {
            return Ok(taus);
        };
        taus.into_iter()
            .enumerate()
            .map(|(i, t)| d.apply_tensor(i, &t).map_err(|e| self.inputs.err(e)))
            .collect()
    }
}

/// The bf16 values of `bytes` if they can be read in place.
#[inline(always)]
fn bf16_words<'a>(r: &TensorRef<'a>, start: usize, len: usize) -> Option<&'a [u16]> {
    if r.dtype != DType::BF16 {
        return None;
    }
    bytemuck::try_cast_slice(&r.bytes[start * 2..(start + len) * 2]).ok()
}

#[inline(always)]
fn load_body(src: &Source, start: usize, len: usize, c: &mut Chunk) {
    let base = src.inputs.base.as_ref().expect("checked in Source::new");
    let Chunk { base: b, tau, .. } = c;
    let b = &mut b[..len];
    match bf16_words(base, start, len) {
        Some(h) => b
            .iter_mut()
            .zip(h)
            .for_each(|(b, &h)| *b = f32::from_bits(u32::from(h) << 16)),
        None => {
            let w = base.dtype.size_in_bytes();
            decode_chunk(base.dtype, &base.bytes[start * w..(start + len) * w], b);
        }
    }
    for (i, (e, t)) in src.inputs.experts.iter().zip(tau.iter_mut()).enumerate() {
        let t = &mut t[..len];
        match bf16_words(e, start, len) {
            // Decode and subtract in one loop.
            Some(h) => t
                .iter_mut()
                .zip(h.iter().zip(b.iter()))
                .for_each(|(t, (&h, &b))| *t = f32::from_bits(u32::from(h) << 16) - b),
            None => {
                let w = e.dtype.size_in_bytes();
                decode_chunk(e.dtype, &e.bytes[start * w..(start + len) * w], t);
                t.iter_mut().zip(b.iter()).for_each(|(t, b)| *t -= b);
            }
        }
        if let Some(d) = &src.dropout {
            d.apply(i, start, t);
        }
    }
    c.len = len;
}

multiversion!(fn load_chunk => load_body(src: &Source, start: usize, len: usize, c: &mut Chunk));

#[inline]
fn sgn(x: f32) -> i64 {
    i64::from(x > 0.0) - i64::from(x < 0.0)
}

// ---------------------------------------------------------------------------
// FusionBench TIES: statistics.

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

/// `s += τ` where `abs_key(τ) >= key`, else `s += 0` (branchless, so the
/// loop vectorises; keys of magnitudes fit in i31).
#[inline(always)]
fn add_trimmed(s: &mut [f32], t: &[f32], key: u32) {
    let key = key.min(i32::MAX as u32) as i32;
    for (s, &v) in s.iter_mut().zip(t) {
        *s += if abs_key(v) as i32 >= key { v } else { 0.0 };
    }
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
fn fb_stats_direct(c: &mut Chunk, density: f64) -> TiesStats {
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
/// threshold, or a range of keys [base, base + span·2¹⁶) that holds it
/// (probably, when estimated from a sample) and is counted at full
/// resolution.
#[derive(Clone, Copy)]
enum Cut {
    Known(u32),
    Range { base: u32, span: u32 },
}

impl Cut {
    /// Counters needed at full resolution.
    fn width(&self) -> usize {
        match self {
            Cut::Known(_) => 0,
            Cut::Range { span, .. } => (*span as usize) << 16,
        }
    }
}

/// Widest range (in high-half buckets) a sample may propose.
const MAX_SPAN: u32 = 4;
/// The sample is the first 1/`SAMPLE_PART` of every chunk.
const SAMPLE_PART: usize = 8;

/// Options of [`fb_stats_radix`].
#[derive(Debug, Clone, Copy)]
struct RadixOpts {
    /// Undecided rows kept before falling back to a recount pass.
    row_cap_bytes: usize,
    /// Estimate the ranges from a sample first (else: exact pass 1).
    sample: bool,
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
struct Pass2 {
    below: Vec<u64>,
    low: Vec<u64>,
    diff: Vec<i64>,
    settled: i64,
    rows: Vec<f32>,
}

multiversion!(
    /// The range pass over one chunk: counts below and inside each task's
    /// range and the majority-sign bookkeeping (see the module header).
    /// `offsets[i]` is where task i's counters start.
    fn pass2_chunk => pass2_body(c: &mut Chunk, cuts: &[Cut], offsets: &[usize], acc: &mut Pass2, overflowed: bool)
);

#[inline(always)]
fn pass2_body(c: &mut Chunk, cuts: &[Cut], offsets: &[usize], acc: &mut Pass2, overflowed: bool) {
    let n = c.len;
    let Chunk {
        tau,
        sum,
        acc: with,
        undecided,
        which,
        picks,
        ..
    } = c;
    // s0: the sum over the tasks kept whatever is undecided; s1: the same
    // plus every non-zero τ inside its task's range (the sum with the
    // undecided task kept, when there is exactly one).
    let (s0, s1) = (&mut sum[..n], &mut with[..n]);
    s0.fill(0.0);
    s1.fill(0.0);
    let und = &mut undecided[..n];
    und.fill(0);
    let which = &mut which[..n];
    for (i, (t, cut)) in tau.iter().zip(cuts).enumerate() {
        let t = &t[..n];
        match *cut {
            Cut::Known(k) => {
                add_trimmed(s0, t, k);
                add_trimmed(s1, t, k);
            }
            Cut::Range { base, span } => {
                let width = span << 16;
                add_trimmed(s0, t, base.saturating_add(width));
                add_trimmed(s1, t, base);
                acc.below[i] += t.iter().map(|&v| u64::from(abs_key(v) < base)).sum::<u64>();
                // The entries inside the range, found 32 at a time.
                let low = &mut acc.low[offsets[i]..offsets[i] + width as usize];
                for_each_hit(
                    t,
                    |v| abs_key(v).wrapping_sub(base) < width,
                    |j| {
                        let key = abs_key(t[j]);
                        low[(key - base) as usize] += 1;
                        // A zero adds nothing whether kept or not.
                        if key != 0 {
                            und[j] += 1;
                            which[j] = i as u32;
                        }
                    },
                );
            }
        }
    }
    // Entries with at most one undecided task count sign(s0) now.
    let mut settled = 0i32;
    for (&x, &u) in s0.iter().zip(und.iter()) {
        let sign = i32::from(x > 0.0) - i32::from(x < 0.0);
        settled += sign & -i32::from(u <= 1);
    }
    acc.settled += i64::from(settled);
    // The rest: one undecided task that flips the sign (a difference-table
    // entry at its key), or several (a row); flagged in one vector loop,
    // then visited.
    let flags = &mut picks[..n];
    for (((f, &x0), &x1), &u) in flags
        .iter_mut()
        .zip(s0.iter())
        .zip(s1.iter())
        .zip(und.iter())
    {
        let flips = ((x1 > 0.0) != (x0 > 0.0)) | ((x1 < 0.0) != (x0 < 0.0));
        *f = u32::from(((u == 1) & flips) | (u >= 2));
    }
    for_each_hit(
        flags,
        |f| f != 0,
        |j| {
            if und[j] == 1 {
                let a = which[j] as usize;
                let Cut::Range { base, .. } = cuts[a] else {
                    unreachable!("only ranged tasks are undecided")
                };
                let at = offsets[a] + (abs_key(tau[a][j]) - base) as usize;
                acc.diff[at] += sgn(s1[j]) - sgn(s0[j]);
            } else if !overflowed {
                acc.rows.extend(tau.iter().map(|t| t[j]));
            }
        },
    );
}

/// Calls `f(j)` for every j with `hit(xs[j])`: 32 entries at a time are
/// tested into a bit mask (one vector compare) and only set bits visited,
/// so rare hits cost neither a branch per entry nor a misprediction.
#[inline(always)]
fn for_each_hit<T: Copy>(xs: &[T], hit: impl Fn(T) -> bool, mut f: impl FnMut(usize)) {
    let mut blocks = xs.chunks_exact(32);
    for (b, block) in (&mut blocks).enumerate() {
        let mut mask = 0u32;
        for (l, &x) in block.iter().enumerate() {
            mask |= u32::from(hit(x)) << l;
        }
        while mask != 0 {
            f(b * 32 + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }
    let tail = xs.len() - blocks.remainder().len();
    for (l, &x) in blocks.remainder().iter().enumerate() {
        if hit(x) {
            f(tail + l);
        }
    }
}

/// High-half histograms of every task over the scope (of the first
/// 1/`part` of every chunk), and the number of entries of the scope.
fn high_pass(tasks: usize, part: usize, visit: Visit) -> Result<(Vec<u64>, u64)> {
    let pool: Pool<Vec<u64>> = Pool::default();
    let entries = std::sync::atomic::AtomicU64::new(0);
    visit(&|src: &Source| {
        entries.fetch_add(src.numel() as u64, Ordering::Relaxed);
        src.map_chunk_heads(part, |_, c| {
            pool.with(
                || vec![0u64; tasks * WAYS * BUCKETS],
                |h| {
                    for (t, h) in c.tau.iter().zip(h.chunks_mut(WAYS * BUCKETS)) {
                        count_high_ways(h, &t[..c.len]);
                    }
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

/// Ranges that probably hold the k-th smallest key of each task, from a
/// sample's histograms: the buckets of sample ranks q·m ± (8σ + 64) with
/// q = k/d; `None` when a range would be wider than [`MAX_SPAN`].
fn sampled_cuts(ranks: &[Option<u64>], d: u64, sample: &[u64]) -> Option<Vec<Cut>> {
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
            let q = *k as f64 / d as f64;
            let (center, margin) = (q * m as f64, 8.0 * (m as f64 * q * (1.0 - q)).sqrt() + 64.0);
            let lo = ((center - margin).floor().max(1.0) as u64).min(m);
            let hi = ((center + margin).ceil().max(1.0) as u64).min(m);
            let (b0, b1) = (locate_high(h, lo).high, locate_high(h, hi).high);
            (b1 - b0 < MAX_SPAN).then_some(Cut::Range {
                base: b0 << 16,
                span: b1 - b0 + 1,
            })
        })
        .collect()
}

/// The range pass over the scope, then the exact thresholds and majority;
/// `None` when some task's k-th smallest key is not inside its range.
fn range_pass(
    cuts: &[Cut],
    ranks: &[Option<u64>],
    visit: Visit,
    opts: RadixOpts,
) -> Result<Option<TiesStats>> {
    let tasks = cuts.len();
    let mut offsets = Vec::with_capacity(tasks);
    let mut width = 0;
    for c in cuts {
        offsets.push(width);
        width += c.width();
    }
    let row_cap = opts.row_cap_bytes / (4 * tasks);
    let rows_kept = AtomicUsize::new(0);
    let overflow = AtomicBool::new(false);
    let pool: Pool<Pass2> = Pool::default();
    let make = || Pass2 {
        below: vec![0; tasks],
        low: vec![0; width],
        diff: vec![0; width],
        settled: 0,
        rows: Vec::new(),
    };
    visit(&|src: &Source| {
        src.map_chunks(|_, c| {
            pool.with(make, |acc| {
                let before = acc.rows.len();
                pass2_chunk(c, cuts, &offsets, acc, overflow.load(Ordering::Relaxed));
                let added = (acc.rows.len() - before) / tasks;
                if added > 0 && rows_kept.fetch_add(added, Ordering::Relaxed) + added > row_cap {
                    overflow.store(true, Ordering::Relaxed);
                }
                if overflow.load(Ordering::Relaxed) {
                    acc.rows = Vec::new();
                }
            })
        });
        Ok(())
    })?;
    let accs = pool.into_inner();
    let mut keys = Vec::with_capacity(tasks);
    let mut total: i64 = accs.iter().map(|a| a.settled).sum();
    for (i, (cut, rank)) in cuts.iter().zip(ranks).enumerate() {
        match (*cut, rank) {
            (Cut::Known(k), _) => keys.push(k),
            (Cut::Range { base, .. }, Some(k)) => {
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
                keys.push(base + pos as u32);
            }
            (Cut::Range { .. }, None) => unreachable!("ranges are made for ranked tasks"),
        }
    }
    if overflow.load(Ordering::Relaxed) {
        // Recount the majority with the exact thresholds.
        let pool: Pool<i64> = Pool::default();
        visit(&|src: &Source| {
            src.map_chunks(|_, c| pool.with(|| 0, |acc| *acc += sign_total(c, &keys)));
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
enum Route {
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
fn fb_stats_radix(
    density: f64,
    tasks: usize,
    visit: Visit,
    opts: RadixOpts,
) -> Result<(TiesStats, Route)> {
    if density >= 1.0 {
        let known = vec![Cut::Known(0); tasks];
        let stats = range_pass(&known, &vec![None; tasks], visit, opts)?;
        return Ok((stats.expect("nothing to locate"), Route::Majority));
    }
    if opts.sample {
        let (sample, d) = high_pass(tasks, SAMPLE_PART, visit)?;
        let ranks = vec![fb_rank(d, density); tasks];
        if let Some(cuts) = sampled_cuts(&ranks, d, &sample) {
            if let Some(stats) = range_pass(&cuts, &ranks, visit, opts)? {
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
                base: locate_high(h, *k).high << 16,
                span: 1,
            },
        })
        .collect();
    let stats = range_pass(&cuts, &ranks, visit, opts)?;
    Ok((
        stats.expect("the bucket of the k-th smallest holds it"),
        Route::Exact,
    ))
}

/// Statistics of one tensor on its own (trim scope `tensor`).
fn fb_stats_tensor(src: &Source, density: f64) -> Result<TiesStats> {
    if src.numel() <= SMALL {
        return Ok(fb_stats_direct(&mut src.load_all(), density));
    }
    Ok(fb_stats_radix(density, src.tasks(), &|f| f(src), RadixOpts::default())?.0)
}

// ---------------------------------------------------------------------------
// FusionBench TIES: merging.

/// How the selected entries are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeFunc {
    Sum,
    Mean,
    Max,
}

/// Where thresholds and the majority sign are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Model,
    Tensor,
}

/// FusionBench's selection: `where(s > 0, τ > 0, τ < 0)`, branchless.
#[inline(always)]
fn picked(sign: f32, v: f32) -> bool {
    let up = sign > 0.0;
    (up & (v > 0.0)) | (!up & (v < 0.0))
}

multiversion!(
    /// The fused CPU loop: θ0 + λ·disjoint merge for one chunk, task by
    /// task over contiguous slices so that every loop vectorises.
    fn fb_kernel => fb_kernel_body(c: &mut Chunk, stats: &TiesStats, func: MergeFunc, lambda: f32, out: &mut [f32])
);

#[inline(always)]
fn fb_kernel_body(c: &mut Chunk, stats: &TiesStats, func: MergeFunc, lambda: f32, out: &mut [f32]) {
    let n = c.len;
    let Chunk {
        base,
        tau,
        sum,
        acc,
        aux,
        ..
    } = c;
    let (sign, acc, aux, out) = (&mut sum[..n], &mut acc[..n], &mut aux[..n], &mut out[..n]);
    sign.fill(0.0);
    for (t, &k) in tau.iter().zip(&stats.keys) {
        add_trimmed(sign, &t[..n], k);
    }
    let m = stats.majority;
    sign.iter_mut().for_each(|x| {
        *x = if *x > 0.0 {
            1.0
        } else if *x < 0.0 {
            -1.0
        } else {
            m
        }
    });
    acc.fill(0.0);
    aux.fill(0.0);
    for (t, &k) in tau.iter().zip(&stats.keys) {
        let k = k.min(i32::MAX as u32) as i32;
        let t = &t[..n];
        let lanes = acc
            .iter_mut()
            .zip(aux.iter_mut())
            .zip(t.iter().zip(sign.iter()));
        match func {
            MergeFunc::Sum => lanes.for_each(|((a, _), (&v, &sg))| {
                *a += if picked(sg, v) & (abs_key(v) as i32 >= k) {
                    v
                } else {
                    0.0
                };
            }),
            MergeFunc::Mean => lanes.for_each(|((a, cnt), (&v, &sg))| {
                let p = picked(sg, v) & (abs_key(v) as i32 >= k);
                *a += if p { v } else { 0.0 };
                *cnt += if p { 1.0 } else { 0.0 };
            }),
            MergeFunc::Max => lanes.for_each(|((_, top), (&v, &sg))| {
                let p = picked(sg, v) & (abs_key(v) as i32 >= k);
                *top = top.max(if p { v.abs() } else { 0.0 });
            }),
        }
    }
    let b = &base[..n];
    match func {
        MergeFunc::Sum => {
            for ((o, &b), &a) in out.iter_mut().zip(b).zip(acc.iter()) {
                *o = b + lambda * a;
            }
        }
        MergeFunc::Mean => {
            for ((o, &b), (&a, &cnt)) in out.iter_mut().zip(b).zip(acc.iter().zip(aux.iter())) {
                *o = b + lambda * (a / cnt.max(1.0));
            }
        }
        MergeFunc::Max => {
            for ((o, &b), (&top, &sg)) in out.iter_mut().zip(b).zip(aux.iter().zip(sign.iter())) {
                *o = b + lambda * (top * sg);
            }
        }
    }
}

/// The same in candle ops (any device).
fn fb_candle(
    base: Tensor,
    taus: &[Tensor],
    stats: &TiesStats,
    func: MergeFunc,
    lambda: f32,
) -> candle_core::Result<Tensor> {
    let trimmed = taus
        .iter()
        .zip(&stats.keys)
        .map(|(t, &k)| t.mul(&t.abs()?.ge(key_value(k))?.to_dtype(DType::F32)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut s = trimmed[0].clone();
    for t in &trimmed[1..] {
        s = (s + t)?;
    }
    let sign = s.sign()?;
    let sign = (&sign + (sign.eq(0f32)?.to_dtype(DType::F32)? * stats.majority as f64)?)?;
    let pos = sign.gt(0f32)?.to_dtype(DType::F32)?;
    let neg = pos.affine(-1.0, 1.0)?;
    let mut sum = base.zeros_like()?;
    let mut count = base.zeros_like()?;
    let mut top = base.zeros_like()?;
    for t in &trimmed {
        let picked = ((&pos * t.gt(0f32)?.to_dtype(DType::F32)?)?
            + (&neg * t.lt(0f32)?.to_dtype(DType::F32)?)?)?;
        let v = (t * &picked)?;
        sum = (sum + &v)?;
        count = (count + picked)?;
        top = top.maximum(&v.abs()?)?;
    }
    let merged = match func {
        MergeFunc::Sum => sum,
        MergeFunc::Mean => (sum / count.maximum(1f32)?)?,
        MergeFunc::Max => (top * sign)?,
    };
    base + (merged * lambda as f64)?
}

/// TIES with FusionBench's semantics, as used by `ties_merging` and by
/// `dare` with `combine: ties`.
#[derive(Debug)]
pub(crate) struct FbTies {
    pub density: f64,
    pub func: MergeFunc,
    pub scope: Scope,
    pub tasks: usize,
    pub stats: Option<TiesStats>,
}

impl FbTies {
    /// Reads `density`/`threshold`, `merge_func` and `trim_scope`.
    pub fn from_params(p: &mut Params, default_density: f64) -> Result<Self> {
        let density = p.scalar(&["density"], f64::NAN)?;
        let threshold = p.scalar(&["threshold"], f64::NAN)?;
        let density = match (density.is_nan(), threshold.is_nan()) {
            (true, true) => default_density,
            (false, true) => {
                if !(density > 0.0 && density <= 1.0) {
                    return Err(MergeError::range("density", density, "in (0, 1]"));
                }
                density
            }
            (true, false) => {
                if !(threshold > 0.0 && threshold <= 100.0) {
                    return Err(MergeError::range(
                        "threshold",
                        threshold,
                        "a percentage in (0, 100] (values up to 1 are read as a fraction, as FusionBench does)",
                    ));
                }
                if threshold > 1.0 {
                    threshold / 100.0
                } else {
                    threshold
                }
            }
            (false, false) => {
                return Err(MergeError::BadParameter {
                    param: "threshold".into(),
                    reason:
                        "give either `density` (a fraction) or `threshold` (a percentage), not both"
                            .into(),
                })
            }
        };
        let func = match p
            .choice(&["merge_func"], &["sum", "mean", "max"], "sum")?
            .as_str()
        {
            "mean" => MergeFunc::Mean,
            "max" => MergeFunc::Max,
            _ => MergeFunc::Sum,
        };
        let scope = match p
            .choice(&["trim_scope"], &["model", "tensor"], "model")?
            .as_str()
        {
            "tensor" => Scope::Tensor,
            _ => Scope::Model,
        };
        Ok(FbTies {
            density,
            func,
            scope,
            tasks: p.num_models,
            stats: None,
        })
    }

    /// The model-wide pass (model scope only).
    pub fn prepare(&mut self, scan: &dyn ModelScan, dropout: Option<&Dropout>) -> Result<()> {
        if self.scope == Scope::Model {
            let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| {
                scan.for_each(&|inputs: &TensorInputs| {
                    let d = dropout.map(|d| d.for_tensor(inputs)).transpose()?.flatten();
                    f(&Source::new(inputs, d)?)
                })
            };
            self.stats =
                Some(fb_stats_radix(self.density, self.tasks, &visit, RadixOpts::default())?.0);
        }
        Ok(())
    }

    /// Merges one tensor: θ0 + λ·merged.
    pub fn merge(&self, src: &Source, lambda: f32, fused: bool) -> Result<Tensor> {
        let stats = match (self.scope, &self.stats) {
            (Scope::Tensor, _) => fb_stats_tensor(src, self.density)?,
            (Scope::Model, Some(s)) => s.clone(),
            (Scope::Model, None) => {
                return Err(MergeError::Spec(format!(
                    "tensor `{}` merged before the model-wide TIES pass",
                    src.inputs.ctx.name
                )))
            }
        };
        if fused {
            src.fill(|_, c, o| fb_kernel(c, &stats, self.func, lambda, o))
        } else {
            let (base, taus) = (src.base_tensor()?, src.task_vectors()?);
            fb_candle(base, &taus, &stats, self.func, lambda).map_err(|e| src.inputs.err(e))
        }
    }
}

/// FusionBench `ties_merging`.
#[derive(Debug)]
struct TiesMerging {
    ties: FbTies,
    lambda: Num,
}

impl MergeMethod for TiesMerging {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.ties.prepare(scan, None)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let lambda = self.lambda.at(&inputs.ctx)? as f32;
        self.ties
            .merge(&Source::new(inputs, None)?, lambda, inputs.device.is_cpu())
    }
}

/// Builds FusionBench's `ties_merging`.
pub fn build_fusionbench(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let ties = FbTies::from_params(p, 0.2)?;
    let lambda = p.number(FB_LAMBDA_KEYS, 0.3)?;
    Ok(Box::new(TiesMerging { ties, lambda }))
}

// ---------------------------------------------------------------------------
// mergekit: magnitude trim (ties), weights, sign consensus, normalisation.

/// Which entries of one task vector mergekit's magnitude trim keeps.
#[derive(Debug, Clone)]
enum Keep {
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
fn magnitude_keeps(src: &Source, densities: &[f64]) -> Vec<Keep> {
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
fn kept(keep: &Keep, v: f32, seen: &mut u64) -> bool {
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

/// One tensor's resolved mergekit mixing parameters.
struct Mixing {
    weights: Vec<f32>,
    keeps: Vec<Keep>,
    consensus: bool,
    normalize: bool,
    lambda: f32,
}

multiversion!(
    /// The fused CPU loop of mergekit's generalized task arithmetic, task
    /// by task over contiguous slices.
    fn mk_kernel => mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32])
);

#[inline(always)]
fn mk_kernel_body(m: &Mixing, chunk: usize, c: &mut Chunk, out: &mut [f32]) {
    let n = c.len;
    let Chunk {
        base,
        tau,
        sum,
        acc,
        aux,
        ..
    } = c;
    let (sum, mixed, divisor, out) = (&mut sum[..n], &mut acc[..n], &mut aux[..n], &mut out[..n]);
    sum.fill(0.0);
    // δi = wi·(kept τi), in place.
    for (t, (keep, &w)) in tau.iter_mut().zip(m.keeps.iter().zip(&m.weights)) {
        let t = &mut t[..n];
        match keep {
            Keep::All => t.iter_mut().for_each(|v| *v *= w),
            Keep::Nothing => t.fill(0.0),
            Keep::AtLeast(k) => {
                let k = (*k).min(i32::MAX as u32) as i32;
                t.iter_mut()
                    .for_each(|v| *v = if abs_key(*v) as i32 >= k { w * *v } else { 0.0 });
            }
            Keep::Ties { before, .. } => {
                let mut seen = before[chunk];
                for v in t.iter_mut() {
                    *v = if kept(keep, *v, &mut seen) {
                        w * *v
                    } else {
                        0.0
                    };
                }
            }
        }
        sum.iter_mut().zip(t.iter()).for_each(|(s, v)| *s += v);
    }
    let b = &base[..n];
    if m.consensus {
        // Elected sign: + where Σ δ ≥ 0; keep the δi of that sign.
        mixed.fill(0.0);
        divisor.fill(0.0);
        for (t, &w) in tau.iter().zip(&m.weights) {
            let lanes = mixed
                .iter_mut()
                .zip(divisor.iter_mut())
                .zip(t[..n].iter().zip(sum.iter()));
            lanes.for_each(|((mx, dv), (&d, &s))| {
                let up = s >= 0.0;
                let agree = (up & (d > 0.0)) | (!up & (d < 0.0));
                *mx += if agree { d } else { 0.0 };
                *dv += if agree { w } else { 0.0 };
            });
        }
        let lanes = out.iter_mut().zip(b).zip(mixed.iter().zip(divisor.iter()));
        if m.normalize {
            lanes.for_each(|((o, &b), (&mx, &dv))| {
                *o = b + m.lambda * (mx / if dv.abs() < ZERO_DIVISOR { 1.0 } else { dv });
            });
        } else {
            lanes.for_each(|((o, &b), (&mx, _))| *o = b + m.lambda * mx);
        }
    } else {
        let plain: f32 = m.weights.iter().sum();
        let divisor = if !m.normalize || plain.abs() < ZERO_DIVISOR {
            1.0
        } else {
            plain
        };
        for ((o, &b), &s) in out.iter_mut().zip(b).zip(sum.iter()) {
            *o = b + m.lambda * (s / divisor);
        }
    }
}

/// The keep mask of task `i` as a 0/1 f32 tensor, computed on the CPU
/// (position-ordered tie breaking has no cheap tensor form).
fn keep_mask(src: &Source, keep: &Keep, i: usize) -> candle_core::Result<Tensor> {
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

/// The same in candle ops.
fn mk_candle(
    src: &Source,
    base: Tensor,
    taus: &[Tensor],
    m: &Mixing,
) -> candle_core::Result<Tensor> {
    let mut deltas = Vec::with_capacity(taus.len());
    for (i, (t, keep)) in taus.iter().zip(&m.keeps).enumerate() {
        let kept = match keep {
            Keep::All => t.clone(),
            Keep::Nothing => t.zeros_like()?,
            Keep::AtLeast(k) => t.mul(&t.abs()?.ge(key_value(*k))?.to_dtype(DType::F32)?)?,
            Keep::Ties { .. } => t.mul(&keep_mask(src, keep, i)?)?,
        };
        deltas.push((kept * m.weights[i] as f64)?);
    }
    let mut sum = deltas[0].clone();
    for d in &deltas[1..] {
        sum = (sum + d)?;
    }
    let mixed = if m.consensus {
        let elected = sum.ge(0f32)?.to_dtype(DType::F32)?.affine(2.0, -1.0)?;
        let mut mixed = base.zeros_like()?;
        let mut divisor = base.zeros_like()?;
        for (d, &w) in deltas.iter().zip(&m.weights) {
            let mask = d.sign()?.eq(&elected)?.to_dtype(DType::F32)?;
            mixed = (mixed + d.mul(&mask)?)?;
            divisor = (divisor + (mask * w as f64)?)?;
        }
        if m.normalize {
            let small = divisor.abs()?.lt(ZERO_DIVISOR)?;
            let divisor = small.where_cond(&divisor.ones_like()?, &divisor)?;
            (mixed / divisor)?
        } else {
            mixed
        }
    } else if m.normalize {
        let s: f32 = m.weights.iter().sum();
        (sum / if s.abs() < ZERO_DIVISOR {
            1.0
        } else {
            s as f64
        })?
    } else {
        sum
    };
    base + (mixed * m.lambda as f64)?
}

/// mergekit's generalized task arithmetic: `ties` (magnitude trim +
/// consensus), `dare_linear` and `dare_ties` (Bernoulli dropout, with and
/// without consensus); FusionBench's `dare` with a linear combine uses it too.
#[derive(Debug)]
pub(crate) struct MkMerge {
    pub weights: Vec<Num>,
    /// Per-model magnitude-trim densities (`ties`), or none.
    pub trim: Option<Vec<Num>>,
    pub dropout: Option<Dropout>,
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: Num,
}

impl MkMerge {
    /// Merges one tensor, with the fused CPU loop or candle ops.
    pub(crate) fn merge_with(&self, inputs: &TensorInputs, fused: bool) -> Result<Tensor> {
        let ctx = &inputs.ctx;
        let dropout = self
            .dropout
            .as_ref()
            .map(|d| d.for_tensor(inputs))
            .transpose()?
            .flatten();
        let src = Source::new(inputs, dropout)?;
        let weights = self
            .weights
            .iter()
            .map(|w| Ok(w.at(ctx)? as f32))
            .collect::<Result<Vec<_>>>()?;
        let keeps = match &self.trim {
            None => vec![Keep::All; weights.len()],
            Some(ds) => {
                let ds = ds.iter().map(|d| d.at(ctx)).collect::<Result<Vec<_>>>()?;
                magnitude_keeps(&src, &ds)
            }
        };
        let m = Mixing {
            weights,
            keeps,
            consensus: self.consensus,
            normalize: self.normalize,
            lambda: self.lambda.at(ctx)? as f32,
        };
        if fused {
            src.fill(|k, c, o| mk_kernel(&m, k, c, o))
        } else {
            let (base, taus) = (src.base_tensor()?, src.task_vectors()?);
            mk_candle(&src, base, &taus, &m).map_err(|e| inputs.err(e))
        }
    }
}

impl MergeMethod for MkMerge {
    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        self.merge_with(inputs, inputs.device.is_cpu())
    }
}

/// Checks per-model densities against (0, 1].
pub(crate) fn densities(p: &mut Params) -> Result<Vec<Num>> {
    p.per_model("density", 1.0)?
        .into_iter()
        .map(|d| d.check(|x| x > 0.0 && x <= 1.0, "in (0, 1]"))
        .collect()
}

/// Builds mergekit's `ties`.
pub fn build_mergekit(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let weights = p.per_model("weight", 1.0)?;
    let trim = densities(p)?;
    let normalize = p.boolean(&["normalize"], true)?;
    let lambda = p.number(LAMBDA_KEYS, 1.0)?;
    p.boolean(&["int8_mask"], false)?;
    Ok(Box::new(MkMerge {
        weights,
        trim: Some(trim),
        dropout: None,
        consensus: true,
        normalize,
        lambda,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{
        assert_close, build, merge1, merge_all, merge_one, Fixture, FixtureScan,
    };
    use crate::spec::{Dialect, MergeSpec, ModelSpec, ParamValue};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const BASE: [f32; 5] = [1.0, -2.0, 0.5, 0.0, 3.0];
    // τ in eighths: τ1 = [4, -2, 0, 3, -1], τ2 = [-4, 1, 5, -6, 2],
    // τ3 = [1, -5, -2, 4, 4]; θi = θ0 + τi (all exact in f32).
    const E1: [f32; 5] = [1.5, -2.25, 0.5, 0.375, 2.875];
    const E2: [f32; 5] = [0.5, -1.875, 1.125, -0.75, 3.25];
    const E3: [f32; 5] = [1.125, -2.625, 0.25, 0.5, 3.5];

    fn hand_fixture() -> Fixture {
        Fixture::new("w", &[5], Some(&BASE), &[&E1, &E2, &E3])
    }

    fn ties_spec(func: &str, lambda: f64) -> MergeSpec {
        MergeSpec::new("ties_merging", Some("base"), &["a", "b", "c"])
            .with("density", 0.4)
            .with("scaling_coefficient", lambda)
            .with_value("merge_func", ParamValue::Text(func.into()))
    }

    // Trim, density 0.4 over d = 5: k = 5 − int(2.0) = 3, keep |τ| ≥ the 3rd
    // smallest (eighths): τ1 |4 2 0 3 1| → 2: [4, -2, 0, 3, 0];
    // τ2 |4 1 5 6 2| → 4: [-4, 0, 5, -6, 0]; τ3 |1 5 2 4 4| → 4: [0, -5, 0, 4, 4].
    // Elect: sums [0, -7, 5, 1, 4] → signs [0, -, +, +, +]; majority
    // sign(0 - 1 + 1 + 1 + 1) = + fills entry 0.
    // Selected: e0 {4}, e1 {-2, -5}, e2 {5}, e3 {3, 4}, e4 {4}.
    #[test]
    fn ties_sum_by_hand() {
        // sum = [4, -7, 5, 7, 4]/8; θ0 + 0.5·sum = [1.25, -2.4375, 0.8125, 0.4375, 3.25]
        let got = merge1(&ties_spec("sum", 0.5), &hand_fixture());
        assert_close(&got, &[1.25, -2.4375, 0.8125, 0.4375, 3.25], 1e-6);
    }

    #[test]
    fn ties_mean_by_hand() {
        // mean = [4, -3.5, 5, 3.5, 4]/8; θ0 + 0.5·mean = [1.25, -2.21875, 0.8125, 0.21875, 3.25]
        let got = merge1(&ties_spec("mean", 0.5), &hand_fixture());
        assert_close(&got, &[1.25, -2.21875, 0.8125, 0.21875, 3.25], 1e-6);
    }

    #[test]
    fn ties_max_by_hand() {
        // max = [4, -5, 5, 4, 4]/8; θ0 + 0.5·max = [1.25, -2.3125, 0.8125, 0.25, 3.25]
        let got = merge1(&ties_spec("max", 0.5), &hand_fixture());
        assert_close(&got, &[1.25, -2.3125, 0.8125, 0.25, 3.25], 1e-6);
    }

    #[test]
    fn ties_defaults_and_threshold_percentage() {
        // Default λ 0.3: θ0 + 0.3·[0.5, -0.875, 0.625, 0.875, 0.5]
        // = [1.15, -2.2625, 0.6875, 0.2625, 3.15]; `threshold: 40` = density 0.4.
        let spec =
            MergeSpec::new("ties_merging", Some("base"), &["a", "b", "c"]).with("threshold", 40.0);
        let got = merge1(&spec, &hand_fixture());
        assert_close(&got, &[1.15, -2.2625, 0.6875, 0.2625, 3.15], 1e-6);
    }

    #[test]
    fn zero_majority_selects_negatives_like_fusionbench() {
        // One entry pair: τ1 = [1, -1], τ2 = [-1, 1], density 1: sums [0, 0],
        // majority sign(0) = 0, so `where(s > 0, τ > 0, τ < 0)` picks the
        // negatives: sum = [-1, -1], mean = [-1, -1], max = |1|·0 = [0, 0].
        let fx = Fixture::new("w", &[2], Some(&[0.0, 0.0]), &[&[1.0, -1.0], &[-1.0, 1.0]]);
        let spec = |f: &str| {
            MergeSpec::new("ties_merging", Some("base"), &["a", "b"])
                .with("density", 1.0)
                .with("scaling_coefficient", 1.0)
                .with_value("merge_func", ParamValue::Text(f.into()))
        };
        assert_close(&merge1(&spec("sum"), &fx), &[-1.0, -1.0], 0.0);
        assert_close(&merge1(&spec("mean"), &fx), &[-1.0, -1.0], 0.0);
        assert_close(&merge1(&spec("max"), &fx), &[0.0, 0.0], 0.0);
    }

    #[test]
    fn model_and_tensor_scope_differ() {
        // One task, λ 1, density 0.5; |τ| = A [1, 2], B [10, 20, 30, 40].
        // Model: d = 6, k = 6 − 3 = 3 → 10: A drops all, B keeps all.
        // Tensor: A d = 2, k = 1 → 1: keeps both; B d = 4, k = 2 → 20: drops 10.
        let a = Fixture::new("a", &[2], Some(&[1.0, 1.0]), &[&[2.0, -1.0]]);
        let b = Fixture::new(
            "b",
            &[2, 2],
            Some(&[0.0; 4]),
            &[&[10.0, -20.0, 30.0, -40.0]],
        );
        let spec = MergeSpec::new("ties_merging", Some("base"), &["x"])
            .with("density", 0.5)
            .with("scaling_coefficient", 1.0);
        let model = merge_all(&spec, &[a, b]);
        assert_close(&model[0], &[1.0, 1.0], 0.0);
        assert_close(&model[1], &[10.0, -20.0, 30.0, -40.0], 0.0);
        let a = Fixture::new("a", &[2], Some(&[1.0, 1.0]), &[&[2.0, -1.0]]);
        let b = Fixture::new(
            "b",
            &[2, 2],
            Some(&[0.0; 4]),
            &[&[10.0, -20.0, 30.0, -40.0]],
        );
        let spec = spec.with_value("trim_scope", ParamValue::Text("tensor".into()));
        let tensor = merge_all(&spec, &[a, b]);
        assert_close(&tensor[0], &[2.0, -1.0], 0.0);
        assert_close(&tensor[1], &[0.0, -20.0, 30.0, -40.0], 0.0);
    }

    /// Random experts around a base on a coarse grid (many equal
    /// magnitudes, zeros) or continuous.
    fn random_fixture(
        rng: &mut ChaCha8Rng,
        name: &str,
        n: usize,
        tasks: usize,
        coarse: bool,
    ) -> Fixture {
        let base: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let experts: Vec<Vec<f32>> = (0..tasks)
            .map(|_| {
                base.iter()
                    .map(|&b| {
                        if coarse {
                            b + rng.random_range(-6i32..=6) as f32 * 0.125
                        } else {
                            b + rng.random_range(-0.01f32..0.01)
                        }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        Fixture::new(name, &[n], Some(&base), &refs)
    }

    fn concat(fxs: &[Fixture]) -> Fixture {
        let n: usize = fxs.iter().map(|f| f.shape.iter().product::<usize>()).sum();
        Fixture {
            name: "all".into(),
            shape: vec![n],
            base: Some(fxs.iter().flat_map(|f| f.base.clone().unwrap()).collect()),
            experts: (0..fxs[0].experts.len())
                .map(|i| fxs.iter().flat_map(|f| f.experts[i].clone()).collect())
                .collect(),
            num_layers: 1,
        }
    }

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

    #[test]
    fn candle_path_matches_fused_loop() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let fx = random_fixture(&mut rng, "w", 3000, 3, true);
        let inputs = fx.inputs();
        let src = Source::new(&inputs, None).unwrap();
        for func in [MergeFunc::Sum, MergeFunc::Mean, MergeFunc::Max] {
            let ties = FbTies {
                density: 0.3,
                func,
                scope: Scope::Tensor,
                tasks: 3,
                stats: None,
            };
            let fused = ties
                .merge(&src, 0.7, true)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let generic = ties
                .merge(&src, 0.7, false)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_close(&generic, &fused, 1e-6);
        }
    }

    #[test]
    fn one_expert_full_density_is_task_arithmetic() {
        // density 1, T = 1: trimmed = τ, every non-zero τ matches its own
        // sign, so θ = θ0 + λτ exactly, in both scopes.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for scope in ["model", "tensor"] {
            let fxs = [
                random_fixture(&mut rng, "a", 1000, 1, false),
                random_fixture(&mut rng, "b", 300, 1, true),
            ];
            let spec = MergeSpec::new("ties_merging", Some("base"), &["x"])
                .with("density", 1.0)
                .with("scaling_coefficient", 0.7)
                .with_value("trim_scope", ParamValue::Text(scope.into()));
            for (got, fx) in merge_all(&spec, &fxs).iter().zip(&fxs) {
                let inputs = fx.inputs();
                let base = inputs.base.unwrap().to_f32_vec();
                let e = inputs.experts[0].to_f32_vec();
                let want: Vec<f32> = base
                    .iter()
                    .zip(&e)
                    .map(|(b, e)| b + 0.7 * (e - b))
                    .collect();
                assert_close(got, &want, 0.0);
            }
        }
    }

    #[test]
    fn parameters_are_validated() {
        let spec =
            |k: &str, v: f64| MergeSpec::new("ties_merging", Some("base"), &["a"]).with(k, v);
        for (k, v) in [
            ("density", 0.0),
            ("density", 1.5),
            ("threshold", 0.0),
            ("threshold", 101.0),
        ] {
            let err = crate::methods::build(&spec(k, v)).err().expect("rejected");
            assert!(err.to_string().contains(k), "{err}");
        }
        let both = spec("density", 0.2).with("threshold", 20.0);
        assert!(crate::methods::build(&both).is_err());
        let bad = spec("density", 0.2).with_value("merge_func", ParamValue::Text("median".into()));
        assert!(crate::methods::build(&bad)
            .err()
            .unwrap()
            .to_string()
            .contains("merge_func"));
        // FusionBench's rule: 20 is a percentage, 0.2 a fraction; same result.
        let fx = hand_fixture();
        let s = |k: &str, v: f64| {
            MergeSpec::new("ties_merging", Some("base"), &["a", "b", "c"]).with(k, v)
        };
        assert_eq!(
            merge1(&s("threshold", 40.0), &fx),
            merge1(&s("threshold", 0.4), &fx)
        );
    }

    fn mk_spec(method: &str, models: &[(f64, f64)]) -> MergeSpec {
        let mut spec = MergeSpec::new(method, Some("base"), &[]);
        spec.dialect = Dialect::Mergekit;
        spec.models = models
            .iter()
            .enumerate()
            .map(|(i, &(w, d))| {
                let mut m = ModelSpec::named(format!("m{i}"));
                m.weight = Some(ParamValue::Number(w));
                m.parameters.insert("density".into(), ParamValue::Number(d));
                m
            })
            .collect();
        spec
    }

    // τ1 = [0.5, -0.25, 0.125, -1], w 1, density 0.5: k = 2 → [0.5, 0, 0, -1].
    // τ2 = [-0.25, 0.5, 0.5, 0.5], w 0.5, density 0.75: k = 3 → [0, 0.5, 0.5, 0.5].
    // δ1 = [0.5, 0, 0, -1], δ2 = [0, 0.25, 0.25, 0.25]; Σ = [0.5, 0.25, 0.25, -0.75]
    // → elected [+, +, +, -]; masks m1 = [1, 0, 0, 1], m2 = [0, 1, 1, 0].
    // mixed = [0.5, 0.25, 0.25, -1]; divisor Σ w·m = [1, 0.5, 0.5, 1].
    fn mk_fixture() -> Fixture {
        Fixture::new(
            "w",
            &[4],
            Some(&[1.0; 4]),
            &[&[1.5, 0.75, 1.125, 0.0], &[0.75, 1.5, 1.5, 1.5]],
        )
    }

    #[test]
    fn mergekit_ties_weights_and_normalize() {
        // normalize (default): [0.5, 0.5, 0.5, -1] → θ = [1.5, 1.5, 1.5, 0]
        let spec = mk_spec("ties", &[(1.0, 0.5), (0.5, 0.75)]);
        assert_close(&merge1(&spec, &mk_fixture()), &[1.5, 1.5, 1.5, 0.0], 1e-6);
        // normalize false, lambda 2: θ = 1 + 2·mixed = [2, 1.5, 1.5, -1]
        let spec = spec
            .with_value("normalize", ParamValue::Bool(false))
            .with("lambda", 2.0);
        assert_close(&merge1(&spec, &mk_fixture()), &[2.0, 1.5, 1.5, -1.0], 1e-6);
    }

    #[test]
    fn mergekit_ties_keeps_exactly_k_breaking_ties_by_position() {
        // |τ| = [0.5, 0.5, 0.5, 0.25], density 0.5: k = 2 → the first two 0.5s.
        let fx = Fixture::new("w", &[4], Some(&[0.0; 4]), &[&[0.5, -0.5, 0.5, 0.25]]);
        let spec = mk_spec("ties", &[(1.0, 0.5)]);
        assert_close(&merge1(&spec, &fx), &[0.5, -0.5, 0.0, 0.0], 0.0);
        // k = int(0.2·4) = 0 keeps nothing: θ = θ0.
        let spec = mk_spec("ties", &[(1.0, 0.2)]);
        assert_close(&merge1(&spec, &fx), &[0.0; 4], 0.0);
    }

    #[test]
    fn mergekit_tie_breaking_across_chunks_on_both_paths() {
        // A large coarse tensor (radix path, many chunks): each task keeps
        // exactly int(density·n) entries, and the candle path agrees.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let n = SMALL + 40_000;
        let fx = random_fixture(&mut rng, "w", n, 2, true);
        let inputs = fx.inputs();
        for (i, d) in [0.3f64, 0.55].iter().enumerate() {
            let single = Fixture {
                name: "w".into(),
                shape: fx.shape.clone(),
                base: fx.base.clone(),
                experts: vec![fx.experts[i].clone()],
                num_layers: 1,
            };
            let got = merge1(&mk_spec("ties", &[(1.0, *d)]), &single);
            let base = inputs.base.unwrap().to_f32_vec();
            let e = inputs.experts[i].to_f32_vec();
            let kept = got.iter().zip(&base).filter(|(g, b)| g != b).count();
            let nonzero = base.iter().zip(&e).filter(|(b, e)| b != e).count();
            assert_eq!(kept, ((d * n as f64) as usize).min(nonzero), "density {d}");
        }
        let mk = MkMerge {
            weights: vec![Num::constant("weight", 0.7), Num::constant("weight", 1.3)],
            trim: Some(vec![
                Num::constant("density", 0.3),
                Num::constant("density", 0.55),
            ]),
            dropout: None,
            consensus: true,
            normalize: true,
            lambda: Num::constant("lambda", 0.9),
        };
        let fused = mk
            .merge_with(&inputs, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let generic = mk
            .merge_with(&inputs, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&generic, &fused, 1e-6);
    }

    #[test]
    fn model_scope_needs_prepare() {
        let m = build(&ties_spec("sum", 0.5));
        let fx = hand_fixture();
        assert!(m.merge(&fx.inputs()).is_err());
        // After prepare over the one tensor it merges.
        let mut m = build(&ties_spec("sum", 0.5));
        m.prepare(&FixtureScan(std::slice::from_ref(&fx))).unwrap();
        assert_close(
            &merge_one(m.as_ref(), &fx),
            &[1.25, -2.4375, 0.8125, 0.4375, 3.25],
            1e-6,
        );
    }
}
