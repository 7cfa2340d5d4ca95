//! TIES merging (Yadav et al., "TIES-Merging: Resolving Interference When
//! Merging Models", arXiv:2306.01708), as FusionBench's `ties_merging` and
//! as mergekit's `ties`. Both run on the task-vector engine
//! ([`super::task_vectors`]: the chunk source, the sign elections, and for
//! mergekit's `ties` its generalized task arithmetic with magnitude
//! trimming); the exact model-wide trimming of `ties_merging` is here
//! ([`stats`], [`onepass`]), and `dare` with `combine: ties` runs it on the
//! dropped-out task vectors.
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
//! FusionBench's `≥ v` keeps int(d·density) + 1 entries when the magnitudes
//! are distinct, and every entry tied with v; we do the same.
//!
//! The scope (`trim_scope`) is the whole model (`model`, FusionBench, which
//! flattens the state dict) or each tensor (`tensor`). Model scope runs a
//! model-wide pass in [`MergeMethod::prepare`] that never holds the model:
//! thresholds are exact order statistics found by radix selection on the
//! bit patterns of |τ| ([`crate::select`]).
//! - A small sample (the first 1/64 of every chunk of every tensor) counts
//!   the high 16 bits of |τi|: each task gets a coarse range of keys (at
//!   most 4 high-half buckets) that should hold its k-th. A larger sample
//!   (the first 1/8 of every chunk) counts its keys inside those ranges
//!   and narrows each to the exact keys at its sample ranks q·m ± (8σ + 64);
//!   if that fails, the 1/8 sample's high halves propose whole buckets.
//! - The range pass reads everything once: per task it counts the keys
//!   below the range and, at full 32-bit resolution, the keys inside it,
//!   which gives the exact k-th when it is inside the range. If it is not
//!   (or a range would be too wide), the exact route runs instead: a full
//!   pass of high halves, then the range pass on the bucket holding the k-th.
//! - The same range pass gathers the majority sign without another pass:
//!   an entry whose trimming is decided (no task inside its range, or only
//!   zeros there) adds its sign at once; an entry with exactly one undecided
//!   task a adds sign(S without a), and sign(S with a) − sign(S without a)
//!   at a's key in a per-task difference table, which summed from the final
//!   threshold upwards gives the exact total; entries with several
//!   undecided tasks keep their τ row and are settled once the thresholds
//!   are known (past [`ROW_CAP_BYTES`] of rows, a recount pass replaces
//!   them). Sums are formed in task order exactly as the merge forms them,
//!   so the majority equals the one of the merged signs bit for bit.
//!
//! - Where the merged tensors are kept in memory anyway (the in-memory
//!   merge the gateway serves from) and the inputs are stored as bf16 (up
//!   to 4 tasks, CPU), the range pass merges every tensor too and the model
//!   is read once ([`onepass`]): each entry is merged with the trimming at
//!   the last key of each range, and the few entries that the exact
//!   thresholds or the majority could still change (a key inside a range,
//!   or an elected sign of 0) are recorded with their stored words and
//!   merged again once both are known, with the same arithmetic, so the
//!   result is the same bits as the two-pass route.
//!
//! Tensor scope does the same per tensor (tensors up to 2¹⁶ entries by an
//! in-memory selection; larger bf16 tensors in one pass).
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
//! of the stored bytes, in parallel (the FusionBench passes in L1-sized
//! blocks, the next block's bytes prefetched), task by task over contiguous
//! slices so that the loops vectorise (built for AVX2 too, and the one-pass
//! loop for AVX-512, chosen at run time), and the
//! result is written in the output dtype in the same pass (inputs stored as
//! bf16 without dropout, up to 4 tasks: the FusionBench range and merge
//! passes decode straight from the stored words with every τ in registers,
//! and the range pass counts the last key of each range, where ties at the
//! threshold gather, in the vector loop); elsewhere the
//! merge runs as candle ops and returns f32 (the thresholds are always found
//! on the CPU, from the stored bytes).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::schema::{DefaultValue, Limit, Param, Range, Type};
use super::task_vectors::{
    add_trimmed, elect, elect_tensor, picked, Chunk, Dropout, Source, BLOCK, CHUNK, SMALL,
};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};
use crate::kernels::{multiversion, output_vec, OutElem};
use crate::select::{abs_key, key_value};

/// Undecided rows kept during the range pass before the majority is
/// recounted in a pass of its own instead.
pub(crate) const ROW_CAP_BYTES: usize = 64 << 20;

/// FusionBench's λ of `ties_merging` (0.3), under FusionBench's and
/// mergekit's spellings.
static LAMBDA: Param = Param::global(
    "scaling_coefficient",
    Type::Number,
    DefaultValue::Number(0.3),
    "scale λ of the merged task vector",
)
.aliases(&["lambda", "scaling_factor"]);

/// The fraction of each task vector kept.
pub(crate) static DENSITY: Param = Param::global(
    "density",
    Type::Scalar,
    DefaultValue::Number(0.2),
    "fraction of each task vector kept (or give `threshold`)",
)
.range(Range::UNIT_OPEN_BELOW);

/// FusionBench's `threshold`, a percentage.
pub(crate) static THRESHOLD: Param = Param::global(
    "threshold",
    Type::Scalar,
    DefaultValue::Unset,
    "FusionBench's percentage kept, instead of `density` (a value ≤ 1 is read as a fraction)",
)
.range(Range::new(Limit::Exclusive(0.0), Limit::Inclusive(100.0)));

/// How the agreeing entries combine.
pub(crate) static MERGE_FUNC: Param = Param::global(
    "merge_func",
    Type::Choice(&["sum", "mean", "max"]),
    DefaultValue::Word("sum"),
    "how the entries that agree with the elected sign combine",
);

/// Where the trimming threshold is taken.
pub(crate) static TRIM_SCOPE: Param = Param::global(
    "trim_scope",
    Type::Choice(&["model", "tensor"]),
    DefaultValue::Word("model"),
    "rank magnitudes over the whole model or per tensor",
);

/// The parameters of FusionBench's `ties_merging`.
pub static PARAMS: &[&Param] = &[&DENSITY, &THRESHOLD, &LAMBDA, &MERGE_FUNC, &TRIM_SCOPE];

mod mergekit;
mod onepass;
mod stats;

pub use mergekit::build_mergekit;
pub use mergekit::PARAMS as PARAMS_MERGEKIT;
pub(crate) use mergekit::{DENSITY as MK_DENSITY, LAMBDA as MK_LAMBDA};
use onepass::{Hold, Lambda, HOLD_CAP_BYTES};
use stats::{fb_stats_radix_hold, fb_stats_tensor, RadixOpts, TiesStats};

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
    sign.iter_mut().for_each(|x| *x = elect(*x, m));
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

/// The fused merge for inputs stored as bf16 without dropout, `T` tasks:
/// one loop per L1 block decodes θ0 and every θi straight from the stored
/// words and keeps every τ in registers (the same operations, in the same
/// order, as [`fb_kernel`], so the same bits), the result written in the
/// output dtype.
fn fb_fused<const T: usize, O: OutElem>(
    src: &Source,
    base: &[u16],
    experts: &[&[u16]],
    stats: &TiesStats,
    func: MergeFunc,
    lambda: f32,
) -> Vec<O> {
    let ex: [&[u16]; T] = std::array::from_fn(|i| experts[i]);
    let keys: [i32; T] = std::array::from_fn(|i| stats.keys[i].min(i32::MAX as u32) as i32);
    let mut out: Vec<O> = output_vec(base.len());
    #[cfg(target_arch = "x86_64")]
    let wide =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; BLOCK],
        |res, (k, o)| {
            let args = FusedArgs {
                src,
                base,
                ex: &ex,
                keys: &keys,
                majority: stats.majority,
                func,
                lambda,
            };
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                return unsafe { fb_fused_chunk_wide(&args, k * CHUNK, o, res) };
            }
            fb_fused_chunk(&args, k * CHUNK, o, res)
        },
    );
    out
}

/// What [`fb_fused_chunk`] works on.
struct FusedArgs<'s, 'a, const T: usize> {
    src: &'s Source<'a>,
    base: &'s [u16],
    ex: &'s [&'s [u16]; T],
    keys: &'s [i32; T],
    majority: f32,
    func: MergeFunc,
    lambda: f32,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fb_fused_chunk_wide<const T: usize, O: OutElem>(
    a: &FusedArgs<T>,
    start: usize,
    o: &mut [O],
    res: &mut [f32],
) {
    fb_fused_chunk(a, start, o, res)
}

/// Entries `start..start + o.len()` block by block, the next block's bytes
/// prefetched (see [`Source::blocks`]).
#[inline(always)]
fn fb_fused_chunk<const T: usize, O: OutElem>(
    a: &FusedArgs<T>,
    start: usize,
    o: &mut [O],
    res: &mut [f32],
) {
    let len = o.len();
    let mut off = 0;
    while off < len {
        let l = BLOCK.min(len - off);
        let s = start + off;
        a.src.prefetch((s + l)..(start + (off + 2 * l).min(len)));
        let b = &a.base[s..s + l];
        let e: [&[u16]; T] = std::array::from_fn(|i| &a.ex[i][s..s + l]);
        let r = &mut res[..l];
        match a.func {
            MergeFunc::Sum => fb_fused_block::<T, 0>(b, &e, a, r),
            MergeFunc::Mean => fb_fused_block::<T, 1>(b, &e, a, r),
            MergeFunc::Max => fb_fused_block::<T, 2>(b, &e, a, r),
        }
        O::store(r, &mut o[off..off + l]);
        off += l;
    }
}

/// One block: `F` = 0 sum, 1 mean, 2 max.
#[inline(always)]
fn fb_fused_block<const T: usize, const F: u8>(
    b: &[u16],
    e: &[&[u16]; T],
    a: &FusedArgs<T>,
    r: &mut [f32],
) {
    let (keys, m, lambda) = (a.keys, a.majority, a.lambda);
    let n = r.len();
    let (b, e) = (&b[..n], e.map(|e| &e[..n]));
    for j in 0..n {
        let bj = bf16_value(b[j]);
        let tau: [f32; T] = std::array::from_fn(|i| bf16_value(e[i][j]) - bj);
        r[j] = fb_entry::<T, F>(bj, &trimmed(&tau, keys), m, lambda);
    }
}

/// The f32 value of a stored bf16 word.
#[inline(always)]
pub(crate) fn bf16_value(w: u16) -> f32 {
    f32::from_bits(u32::from(w) << 16)
}

/// Every τ trimmed at its task's key (keys of magnitudes fit in i31): τ
/// where `abs_key(τ) >= key`, else 0.
#[inline(always)]
pub(crate) fn trimmed<const T: usize>(tau: &[f32; T], keys: &[i32; T]) -> [f32; T] {
    std::array::from_fn(|i| {
        if abs_key(tau[i]) as i32 >= keys[i] {
            tau[i]
        } else {
            0.0
        }
    })
}

/// Σi trimmed τi, in task order from 0.
#[inline(always)]
pub(crate) fn trimmed_sum<const T: usize>(kt: &[f32; T]) -> f32 {
    let mut s = 0f32;
    for &v in kt {
        s += v;
    }
    s
}

/// θ0 + λ·merged for one entry from its trimmed τ (`F` = 0 sum, 1 mean,
/// 2 max; `m` the majority sign): the arithmetic of every fused
/// FusionBench loop, the same operations in the same order as
/// [`fb_kernel`], so the same bits.
#[inline(always)]
pub(crate) fn fb_entry<const T: usize, const F: u8>(
    bj: f32,
    kt: &[f32; T],
    m: f32,
    lambda: f32,
) -> f32 {
    // `picked(sg, v) & kept` is `picked(sg, trimmed v)` (a dropped entry
    // is 0, which is never picked).
    let sg = elect(trimmed_sum(kt), m);
    // `picked(sg, v)` is `v > 0` where sg > 0, else `-v > 0`.
    let flip = if sg > 0.0 { 0 } else { 0x8000_0000u32 };
    let (mut acc, mut aux) = (0f32, 0f32);
    for &v in kt {
        let p = f32::from_bits(v.to_bits() ^ flip) > 0.0;
        match F {
            0 => acc += if p { v } else { 0.0 },
            1 => {
                acc += if p { v } else { 0.0 };
                aux += if p { 1.0 } else { 0.0 };
            }
            _ => aux = aux.max(if p { v.abs() } else { 0.0 }),
        }
    }
    match F {
        0 => bj + lambda * acc,
        1 => bj + lambda * (acc / aux.max(1.0)),
        _ => bj + lambda * (aux * sg),
    }
}

/// [`fb_fused`] for up to 4 tasks, in the output dtype; `None` where it
/// does not apply.
fn fb_fused_tensor(
    src: &Source,
    stats: &TiesStats,
    func: MergeFunc,
    lambda: f32,
) -> Option<Result<Tensor>> {
    let (base, experts) = src.bf16_inputs()?;
    fn run<O: OutElem>(
        src: &Source,
        base: &[u16],
        ex: &[&[u16]],
        stats: &TiesStats,
        func: MergeFunc,
        lambda: f32,
    ) -> Option<Vec<O>> {
        Some(match ex.len() {
            1 => fb_fused::<1, O>(src, base, ex, stats, func, lambda),
            2 => fb_fused::<2, O>(src, base, ex, stats, func, lambda),
            3 => fb_fused::<3, O>(src, base, ex, stats, func, lambda),
            4 => fb_fused::<4, O>(src, base, ex, stats, func, lambda),
            _ => return None,
        })
    }
    let (shape, device) = (src.inputs.shape(), src.inputs.device);
    let t = match src.inputs.out_dtype {
        DType::BF16 => Tensor::from_vec(
            run::<half::bf16>(src, base, &experts, stats, func, lambda)?,
            shape,
            device,
        ),
        DType::F16 => Tensor::from_vec(
            run::<half::f16>(src, base, &experts, stats, func, lambda)?,
            shape,
            device,
        ),
        _ => Tensor::from_vec(
            run::<f32>(src, base, &experts, stats, func, lambda)?,
            shape,
            device,
        ),
    };
    Some(t.map_err(|e| src.inputs.err(e)))
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
    let sign = elect_tensor(&s, stats.majority)?;
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
    /// Tensors merged by the one-pass route of the model-wide pass
    /// ([`onepass`]), handed over (once) by [`FbTies::merge`].
    pub held: Mutex<HashMap<String, Tensor>>,
}

impl FbTies {
    /// Reads `density`/`threshold`, `merge_func` and `trim_scope`.
    pub fn from_params(p: &mut Params) -> Result<Self> {
        let density = p.scalar_opt(&DENSITY)?;
        let threshold = p.scalar_opt(&THRESHOLD)?;
        let density =
            match (density, threshold) {
                (None, None) => p.scalar(&DENSITY)?,
                (Some(density), None) => density,
                (None, Some(threshold)) => {
                    if threshold > 1.0 {
                        threshold / 100.0
                    } else {
                        threshold
                    }
                }
                (Some(_), Some(_)) => return Err(MergeError::BadParameter {
                    param: "threshold".into(),
                    reason:
                        "give either `density` (a fraction) or `threshold` (a percentage), not both"
                            .into(),
                }),
            };
        let func = match p.choice(&MERGE_FUNC)? {
            "mean" => MergeFunc::Mean,
            "max" => MergeFunc::Max,
            _ => MergeFunc::Sum,
        };
        let scope = match p.choice(&TRIM_SCOPE)? {
            "tensor" => Scope::Tensor,
            _ => Scope::Model,
        };
        Ok(FbTies {
            density,
            func,
            scope,
            tasks: p.num_models,
            stats: None,
            held: Mutex::default(),
        })
    }

    /// The model-wide pass (model scope only). With `lambda` (λ of each
    /// tensor), and where the scan keeps every merged tensor in memory, the
    /// pass merges the tensors it can too ([`onepass`]).
    pub fn prepare(
        &mut self,
        scan: &dyn ModelScan,
        dropout: Option<&Dropout>,
        lambda: Option<Lambda>,
    ) -> Result<()> {
        if self.scope == Scope::Model {
            let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| {
                scan.for_each(&|inputs: &TensorInputs| {
                    let d = dropout.map(|d| d.for_tensor(inputs)).transpose()?.flatten();
                    f(&Source::new(inputs, d)?)
                })
            };
            let hold = lambda
                .filter(|_| dropout.is_none() && scan.keeps_outputs())
                .map(|l| Hold::new(self.func, l, HOLD_CAP_BYTES));
            let opts = RadixOpts::default();
            let stats =
                fb_stats_radix_hold(self.density, self.tasks, &visit, opts, hold.as_ref())?.0;
            let held = match hold {
                Some(h) => h.finish(&stats)?,
                None => HashMap::new(),
            };
            self.stats = Some(stats);
            self.held = Mutex::new(held);
        }
        Ok(())
    }

    /// Merges one tensor: θ0 + λ·merged.
    pub fn merge(&self, src: &Source, lambda: f32, fused: bool) -> Result<Tensor> {
        let stats = match (self.scope, &self.stats) {
            (Scope::Tensor, _) if fused && src.numel() > SMALL => {
                // One pass for the thresholds and the merge.
                let l = |_: &TensorInputs| Ok(lambda);
                let hold = Hold::new(self.func, &l, HOLD_CAP_BYTES);
                let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| f(src);
                let opts = RadixOpts::default();
                let stats =
                    fb_stats_radix_hold(self.density, src.tasks(), &visit, opts, Some(&hold))?.0;
                if let Some(t) = hold.finish(&stats)?.remove(&src.inputs.ctx.name) {
                    return Ok(t);
                }
                stats
            }
            (Scope::Tensor, _) => fb_stats_tensor(src, self.density)?,
            (Scope::Model, Some(s)) => {
                let held = self
                    .held
                    .lock()
                    .expect("held tensors poisoned")
                    .remove(&src.inputs.ctx.name);
                if let Some(t) = held {
                    return Ok(t);
                }
                s.clone()
            }
            (Scope::Model, None) => {
                return Err(MergeError::Spec(format!(
                    "tensor `{}` merged before the model-wide TIES pass",
                    src.inputs.ctx.name
                )))
            }
        };
        if fused {
            if let Some(t) = fb_fused_tensor(src, &stats, self.func, lambda) {
                return t;
            }
            src.fill_blocks(|c, o| fb_kernel(c, &stats, self.func, lambda, o))
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
        let lambda = &self.lambda;
        let at = |inputs: &TensorInputs| Ok(lambda.at(&inputs.ctx)? as f32);
        self.ties.prepare(scan, None, Some(&at))
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        let lambda = self.lambda.at(&inputs.ctx)? as f32;
        self.ties
            .merge(&Source::new(inputs, None)?, lambda, inputs.device.is_cpu())
    }
}

/// Builds FusionBench's `ties_merging`.
pub fn build_fusionbench(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let lambda = p.number(&LAMBDA)?;
    build_scaled(p, lambda)
}

/// `ties_merging` with its λ given by the caller (a method that merges on
/// top of TIES and declares its own scale: `tall_masks`).
pub(crate) fn build_scaled(p: &mut Params, lambda: Num) -> Result<Box<dyn MergeMethod>> {
    let ties = FbTies::from_params(p)?;
    Ok(Box::new(TiesMerging { ties, lambda }))
}

#[cfg(test)]
pub(crate) mod test_data {
    //! Inputs shared by the tests of `ties` and its submodules.

    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    use crate::methods::testutil::Fixture;
    use crate::spec::{Dialect, MergeSpec, ModelSpec, ParamValue};

    /// Random experts around a base on a coarse grid (many equal
    /// magnitudes, zeros) or continuous.
    pub(crate) fn random_fixture(
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

    pub(crate) fn concat(fxs: &[Fixture]) -> Fixture {
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

    pub(crate) fn mk_spec(method: &str, models: &[(f64, f64)]) -> MergeSpec {
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
}

#[cfg(test)]
mod tests {
    use super::test_data::{mk_spec, random_fixture};
    use super::*;
    use crate::methods::testutil::{
        assert_close, build, merge1, merge_all, merge_one, Fixture, FixtureScan,
    };
    use crate::spec::{MergeSpec, ParamValue};
    use rand::SeedableRng;
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
                held: Default::default(),
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

    #[test]
    fn results_are_written_in_the_output_dtype() {
        // The fused loops cast in the same pass: the result equals the f32
        // result rounded to bf16 / f16 (round to nearest even).
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let fx = random_fixture(&mut rng, "w", 5000, 3, false);
        let spec = MergeSpec::new("ties_merging", Some("base"), &["a", "b", "c"]);
        let mut m = build(&spec.with_value("trim_scope", ParamValue::Text("tensor".into())));
        m.prepare(&FixtureScan(std::slice::from_ref(&fx))).unwrap();
        let f32_out = merge_one(m.as_ref(), &fx);
        let mk = build(&mk_spec("ties", &[(1.0, 0.4), (0.5, 0.6), (2.0, 0.3)]));
        let mk_f32 = merge_one(mk.as_ref(), &fx);
        for dtype in [DType::BF16, DType::F16] {
            let round = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&x| match dtype {
                        DType::BF16 => half::bf16::from_f32(x).to_f32(),
                        _ => half::f16::from_f32(x).to_f32(),
                    })
                    .collect()
            };
            let mut inputs = fx.inputs();
            inputs.out_dtype = dtype;
            for (method, want) in [(&m, &f32_out), (&mk, &mk_f32)] {
                let t = method.merge(&inputs).unwrap();
                assert_eq!(t.dtype(), dtype);
                let got = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got, round(want));
            }
        }
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

    #[test]
    fn fused_bf16_passes_match_the_generic_loops_bit_for_bit() {
        // Inputs stored as bf16 (on a coarse grid: many equal magnitudes,
        // zeros) take the fused range and merge passes for up to 4 tasks;
        // their thresholds, majority and merged bits must equal the generic
        // loops' (the in-memory selection, and `fb_kernel` on the decoded
        // chunks), for every merge function and output dtype.
        use crate::methods::testutil::typed_bytes;
        use crate::spec::TensorCtx;
        use candle_core::Device;
        use runtime::checkpoint::TensorRef;
        use stats::{fb_stats_direct, fb_stats_radix};
        static CPU: Device = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        // Large enough for the sampled route (bf16 rounding makes many
        // equal magnitudes at the threshold, on either grid).
        let n = 24 * CHUNK + 123;
        let mut sampled = 0;
        let shape = [n];
        for tasks in 1..=5 {
            let fx = random_fixture(&mut rng, "w", n, tasks, tasks % 2 == 0);
            let f32s = |b: &[u8]| -> Vec<f32> {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            let base = typed_bytes(DType::BF16, &f32s(fx.base.as_ref().unwrap()));
            let experts: Vec<Vec<u8>> = fx
                .experts
                .iter()
                .map(|e| typed_bytes(DType::BF16, &f32s(e)))
                .collect();
            let r = |b: &'static [u8]| TensorRef {
                dtype: DType::BF16,
                shape: &shape,
                bytes: b,
            };
            let (base, experts): (&'static [u8], Vec<&'static [u8]>) = (
                Vec::leak(base),
                experts.into_iter().map(Vec::leak).map(|e| &*e).collect(),
            );
            let mut inputs = TensorInputs {
                ctx: TensorCtx::new("w", 1),
                base: Some(r(base)),
                experts: experts.iter().map(|e| r(e)).collect(),
                device: &CPU,
                out_dtype: DType::F32,
                cancel: &crate::methods::testutil::NO_CANCEL,
            };
            let src = Source::new(&inputs, None).unwrap();
            assert!(src.bf16_inputs().is_some());
            for density in [0.2, 0.6, 1.0] {
                let want = fb_stats_direct(&mut src.load_all(), density);
                for sample in [true, false] {
                    let opts = RadixOpts {
                        row_cap_bytes: ROW_CAP_BYTES,
                        sample,
                    };
                    let (got, route) = fb_stats_radix(density, tasks, &|f| f(&src), opts).unwrap();
                    sampled += usize::from(route == stats::Route::Sampled);
                    assert_eq!(got, want, "tasks {tasks} density {density} {opts:?}");
                }
            }
            let stats = fb_stats_direct(&mut src.load_all(), 0.3);
            for out in [DType::F32, DType::BF16, DType::F16] {
                inputs.out_dtype = out;
                let src = Source::new(&inputs, None).unwrap();
                for func in [MergeFunc::Sum, MergeFunc::Mean, MergeFunc::Max] {
                    let generic = src
                        .fill_blocks(|c, o| fb_kernel(c, &stats, func, 0.7, o))
                        .unwrap();
                    let ties = FbTies {
                        density: 0.3,
                        func,
                        scope: Scope::Model,
                        tasks,
                        stats: Some(stats.clone()),
                        held: Default::default(),
                    };
                    let fused = ties.merge(&src, 0.7, true).unwrap();
                    assert_eq!(fused.dtype(), out);
                    let bits = |t: &Tensor| -> Vec<u32> {
                        let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                        v.iter().map(|x| x.to_bits()).collect()
                    };
                    assert_eq!(
                        bits(&fused),
                        bits(&generic),
                        "tasks {tasks} {out:?} {func:?}"
                    );
                }
            }
        }
        assert!(sampled > 0, "no sampled route");
    }
}
