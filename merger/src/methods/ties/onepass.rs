//! One-pass FusionBench TIES: the range pass of [`super::stats`] merges
//! every entry while it counts, so that a model is read once for its
//! thresholds and its result together.
//!
//! The range pass knows, per task, a range of keys [from, last] that holds
//! the exact threshold (checked when the pass ends). An entry whose keys
//! are all outside [from, last) is trimmed exactly whatever the threshold
//! inside the range: a key ≥ last is kept, a key < from dropped, and a key
//! of 0 adds nothing either way. Its elected sign is then exact too, unless
//! the trimmed sum is 0 (or NaN), where the majority sign decides. So the
//! pass writes the merged value of every entry with the trimming at `last`,
//! and records as *pending* the entries that are not settled yet: a nonzero
//! key in [from, last), or a zero sum with a kept τ or with θ0 = −0 (where
//! `max` writes λ·(0·majority), whose sign shows on −0). Once the exact
//! thresholds and the majority are known, [`Hold::finish`] merges the
//! pending entries again with them, through the same per-entry arithmetic
//! ([`fb_entry`]) as the two-pass loops: the result is the same bits.
//!
//! The same pass does the bookkeeping of the range pass: keys below each
//! range, the keys at `last` and at 0 counted in the vector loop, the
//! pending entries' keys inside [from, last) counted one by one with their
//! majority corrections (the difference tables and kept rows of
//! [`super::stats`]).
//!
//! It applies to inputs stored as aligned bf16 without dropout, up to 4
//! tasks, on the CPU, and only while the pending entries of the whole scope
//! fit in [`HOLD_CAP_BYTES`]; past that (many magnitudes tied inside a
//! range) every held output is dropped and the tensors are merged in their
//! own pass as before. Model scope holds every merged tensor from the
//! model-wide pass until `merge` hands it over, so it is used only where
//! the merged tensors are kept in memory anyway
//! ([`crate::methods::ModelScan::keeps_outputs`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::super::task_vectors::{mask16, Source, BLOCK, CHUNK};
use super::stats::{sgn32, Cut, Lane, Pass2, PerChunk, TiesStats};
use super::{bf16_value, fb_entry, trimmed, trimmed_sum, MergeFunc};
use crate::error::{MergeError, Result};
use crate::kernels::{output_vec, Isa, OutElem};
use crate::methods::TensorInputs;
use crate::select::abs_key;

/// Bytes of pending entries (an index and the stored words of every
/// input) a scope may record before the one-pass route gives up on it.
pub(crate) const HOLD_CAP_BYTES: usize = 256 << 20;

/// λ of a tensor.
pub(crate) type Lambda<'l> = &'l (dyn Fn(&TensorInputs) -> Result<f32> + Sync);

/// The tensors merged by a range pass, with their pending entries.
pub(crate) struct Hold<'l> {
    func: MergeFunc,
    lambda: Lambda<'l>,
    /// Bytes of pending entries allowed over the scope.
    cap: usize,
    /// Bytes of pending entries recorded.
    pending: AtomicUsize,
    overflow: AtomicBool,
    held: Mutex<Vec<Held>>,
    /// The build of the loop that runs.
    pub(super) isa: Isa,
}

/// A merged tensor of a [`Hold`].
struct Held {
    name: String,
    shape: Vec<usize>,
    lambda: f32,
    out: Out,
    /// Entries to merge again, ascending.
    pending: Vec<u32>,
    /// θ0's and every θi's stored words at each pending entry, in turn.
    words: Vec<u16>,
}

/// A merged tensor's values in its output dtype.
enum Out {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

/// The per-task bounds of the one-pass loop: keys ≥ `keep` are kept, keys
/// in [`from`, `keep`) other than 0 leave the entry pending (a known
/// threshold k is the empty range from = keep = k).
#[derive(Clone, Copy)]
struct Bounds<const T: usize> {
    from: [i32; T],
    keep: [i32; T],
}

impl<const T: usize> Bounds<T> {
    fn new(cuts: &[Cut]) -> Self {
        let at = |i: usize| -> (i32, i32) {
            match cuts[i] {
                Cut::Known(k) => {
                    let k = k.min(i32::MAX as u32) as i32;
                    (k, k)
                }
                Cut::Range { from, width } => {
                    let last = u64::from(from) + u64::from(width.max(1)) - 1;
                    (
                        from.min(i32::MAX as u32) as i32,
                        last.min(i32::MAX as u64) as i32,
                    )
                }
            }
        };
        Bounds {
            from: std::array::from_fn(|i| at(i).0),
            keep: std::array::from_fn(|i| at(i).1),
        }
    }
}

/// What the one-pass loop works on.
struct Args<'s, const T: usize> {
    base: &'s [u16],
    ex: [&'s [u16]; T],
    bounds: Bounds<T>,
    /// Counters of the tasks with a range (`None`: a known threshold).
    lanes: [Option<Lane>; T],
    lambda: f32,
}

impl<'l> Hold<'l> {
    /// An empty hold for a scope merged with `func` and λ from `lambda`,
    /// recording at most `cap_bytes` of pending entries.
    pub(crate) fn new(func: MergeFunc, lambda: Lambda<'l>, cap_bytes: usize) -> Self {
        Hold {
            func,
            lambda,
            cap: cap_bytes,
            pending: AtomicUsize::new(0),
            overflow: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            isa: Isa::detect(),
        }
    }

    /// Drops every held tensor (a range pass starts again). A scope that
    /// overflowed stays given up.
    pub(super) fn clear(&self) {
        self.held.lock().expect("hold poisoned").clear();
        self.pending.store(0, Ordering::Relaxed);
    }

    /// The range pass over `src` that merges it too (see the module
    /// header); `false`, doing nothing, where the one-pass route does not
    /// apply.
    pub(super) fn pass(
        &self,
        src: &Source,
        cuts: &[Cut],
        lanes: &[Lane],
        per_chunk: PerChunk,
    ) -> Result<bool> {
        if self.overflow.load(Ordering::Relaxed)
            || !src.inputs.device.is_cpu()
            || src.numel() > u32::MAX as usize
        {
            return Ok(false);
        }
        let Some((base, experts)) = src.bf16_inputs() else {
            return Ok(false);
        };
        let lambda = (self.lambda)(src.inputs)?;
        let go = Go {
            hold: self,
            base,
            experts: &experts,
            cuts,
            lanes,
            per_chunk,
            lambda,
        };
        let (out, (pending, words)) = match src.inputs.out_dtype {
            DType::BF16 => match go.tasks::<half::bf16>() {
                Some((o, p)) => (Out::BF16(o), p),
                None => return Ok(false),
            },
            DType::F16 => match go.tasks::<half::f16>() {
                Some((o, p)) => (Out::F16(o), p),
                None => return Ok(false),
            },
            _ => match go.tasks::<f32>() {
                Some((o, p)) => (Out::F32(o), p),
                None => return Ok(false),
            },
        };
        if !self.overflow.load(Ordering::Relaxed) {
            self.held.lock().expect("hold poisoned").push(Held {
                name: src.inputs.ctx.name.clone(),
                shape: src.inputs.shape().to_vec(),
                lambda,
                out,
                pending,
                words,
            });
        }
        Ok(true)
    }

    /// Merges the pending entries of every held tensor again with the
    /// exact `stats` and returns the tensors by name (none when the scope
    /// overflowed).
    pub(crate) fn finish(self, stats: &TiesStats) -> Result<HashMap<String, Tensor>> {
        let held = self.held.into_inner().expect("hold poisoned");
        if self.overflow.into_inner() {
            return Ok(HashMap::new());
        }
        let func = self.func;
        held.into_par_iter()
            .map(|mut h| {
                let patch = Patch {
                    stats,
                    lambda: h.lambda,
                    pending: &h.pending,
                    words: &h.words,
                };
                match &mut h.out {
                    Out::F32(o) => patch.tasks(func, o),
                    Out::BF16(o) => patch.tasks(func, o),
                    Out::F16(o) => patch.tasks(func, o),
                }
                let shape = h.shape.as_slice();
                let t = match h.out {
                    Out::F32(o) => Tensor::from_vec(o, shape, &Device::Cpu),
                    Out::BF16(o) => Tensor::from_vec(o, shape, &Device::Cpu),
                    Out::F16(o) => Tensor::from_vec(o, shape, &Device::Cpu),
                }
                .map_err(|e| MergeError::in_tensor(&h.name, e))?;
                Ok((h.name, t))
            })
            .collect()
    }
}

/// One source's one-pass merge, before the task count and merge function
/// are fixed.
struct Go<'g> {
    hold: &'g Hold<'g>,
    base: &'g [u16],
    experts: &'g [&'g [u16]],
    cuts: &'g [Cut],
    lanes: &'g [Lane],
    per_chunk: PerChunk<'g>,
    lambda: f32,
}

/// Pending entries and their words.
type Pending = (Vec<u32>, Vec<u16>);

impl Go<'_> {
    fn tasks<O: OutElem>(&self) -> Option<(Vec<O>, Pending)> {
        Some(match self.experts.len() {
            1 => self.func::<1, O>(),
            2 => self.func::<2, O>(),
            3 => self.func::<3, O>(),
            4 => self.func::<4, O>(),
            _ => return None,
        })
    }

    fn func<const T: usize, O: OutElem>(&self) -> (Vec<O>, Pending) {
        match self.hold.func {
            MergeFunc::Sum => self.run::<T, 0, O>(),
            MergeFunc::Mean => self.run::<T, 1, O>(),
            MergeFunc::Max => self.run::<T, 2, O>(),
        }
    }

    /// Every chunk in parallel: the merged values and the pending entries.
    fn run<const T: usize, const F: u8, O: OutElem>(&self) -> (Vec<O>, Pending) {
        let a = Args::<T> {
            base: self.base,
            ex: std::array::from_fn(|i| self.experts[i]),
            bounds: Bounds::new(self.cuts),
            lanes: std::array::from_fn(|i| match self.cuts[i] {
                Cut::Known(_) => None,
                Cut::Range { .. } => Some(self.lanes[i]),
            }),
            lambda: self.lambda,
        };
        let (hold, isa) = (self.hold, self.hold.isa);
        let mut out: Vec<O> = output_vec(self.base.len());
        let parts: Vec<Pending> = out
            .par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(k, o)| {
                let (mut pending, mut words) = (Vec::new(), Vec::new());
                (self.per_chunk)(&mut |acc, overflowed| {
                    let record = !hold.overflow.load(Ordering::Relaxed);
                    let mut c = ChunkOut {
                        start: k * CHUNK,
                        out: &mut *o,
                        pending: &mut pending,
                        words: &mut words,
                        record,
                    };
                    match isa {
                        // SAFETY: `isa` is only ever what the CPU supports
                        // (`Isa::detect`, or lowered by the tests).
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe {
                            chunk_avx512::<T, F, O>(&a, &mut c, acc, overflowed)
                        },
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { chunk_avx2::<T, F, O>(&a, &mut c, acc, overflowed) },
                        _ => chunk::<T, F, O>(&a, &mut c, acc, overflowed),
                    }
                });
                let n = pending.len() * 4 + words.len() * 2;
                if n > 0 && hold.pending.fetch_add(n, Ordering::Relaxed) + n > hold.cap {
                    hold.overflow.store(true, Ordering::Relaxed);
                }
                if hold.overflow.load(Ordering::Relaxed) {
                    (Vec::new(), Vec::new())
                } else {
                    (pending, words)
                }
            })
            .collect();
        let pending = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
        let words = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
        (out, (pending, words))
    }
}

/// One chunk's output and pending entries.
struct ChunkOut<'c, O> {
    /// Index of the chunk's first entry in the tensor.
    start: usize,
    out: &'c mut [O],
    pending: &'c mut Vec<u32>,
    /// θ0's and every θi's stored words at each pending entry.
    words: &'c mut Vec<u16>,
    /// Record pending entries (false once the scope overflowed).
    record: bool,
}

/// [`chunk`] built for AVX-512 (measured 30% faster than AVX2 here: twice
/// the lanes, and registers for every counter).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn chunk_avx512<const T: usize, const F: u8, O: OutElem>(
    a: &Args<T>,
    c: &mut ChunkOut<O>,
    acc: &mut Pass2,
    overflowed: bool,
) {
    chunk::<T, F, O>(a, c, acc, overflowed)
}

/// [`chunk`] built for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<const T: usize, const F: u8, O: OutElem>(
    a: &Args<T>,
    c: &mut ChunkOut<O>,
    acc: &mut Pass2,
    overflowed: bool,
) {
    chunk::<T, F, O>(a, c, acc, overflowed)
}

/// One chunk, block by block: merged
/// values with the trimming at each range's last key, the counts, and the
/// pending entries recorded and visited one by one.
#[inline(always)]
fn chunk<const T: usize, const F: u8, O: OutElem>(
    a: &Args<T>,
    c: &mut ChunkOut<O>,
    acc: &mut Pass2,
    overflowed: bool,
) {
    let (start, len) = (c.start, c.out.len());
    let spare = acc.diff.len() - 1;
    let Bounds { from, keep } = a.bounds;
    // Keys below `under` are counted: those below the range, or the
    // zeros when the range starts at 0 (and 0 is not its last key), which
    // count at 0 inside it.
    let zeros_inside: [bool; T] = std::array::from_fn(|i| from[i] == 0 && keep[i] > 0);
    let under: [i32; T] = std::array::from_fn(|i| if zeros_inside[i] { 1 } else { from[i] });
    let mut res = [0f32; BLOCK];
    let mut hits = [0u32; BLOCK];
    let mut flags = [0u8; BLOCK];
    let mut off = 0;
    while off < len {
        let l = BLOCK.min(len - off);
        let s = start + off;
        let b = &a.base[s..s + l];
        let e: [&[u16]; T] = std::array::from_fn(|i| &a.ex[i][s..s + l]);
        let r = &mut res[..l];
        let (low, at_keep, settled) =
            block::<T, F>(b, &e, &a.bounds, &under, a.lambda, r, &mut hits[..l]);
        O::store(r, &mut c.out[off..off + l]);
        for (i, lane) in a.lanes.iter().enumerate() {
            // (A known threshold's `below` is never read.)
            if let Some(lane) = lane {
                let last = (keep[i] as u32 - lane.from) as usize;
                acc.low[lane.offset + last] += u64::from(at_keep[i]);
                if zeros_inside[i] {
                    acc.low[lane.offset] += u64::from(low[i]);
                } else {
                    acc.below[i] += u64::from(low[i]);
                }
            }
        }
        // The pending entries, 32 flags at a time as a bit mask (the
        // flags past `l` are zero).
        let padded = l.div_ceil(32) * 32;
        for (f, &h) in flags[..l].iter_mut().zip(hits[..l].iter()) {
            *f = if h != 0 { 0xff } else { 0 };
        }
        flags[l..padded].fill(0);
        for (g, group) in flags[..padded].chunks_exact(32).enumerate() {
            let mut mask = mask16(&group[..16]) | mask16(&group[16..]) << 16;
            while mask != 0 {
                let j = g * 32 + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                if c.record {
                    c.pending.push((s + j) as u32);
                    c.words.push(b[j]);
                    c.words.extend(e.iter().map(|e| e[j]));
                }
                if hits[j] & 2 != 0 {
                    visit(b, &e, j, a, spare, acc, overflowed);
                }
            }
        }
        acc.settled += i64::from(settled);
        off += l;
    }
}

/// Lanes of the one-pass loop: entries are taken 16 at a time in fixed-size
/// arrays, so that the loop over them vectorises without a scalar
/// remainder (left for the last entries of a tensor).
const LANES: usize = 16;

/// What the one-pass loop finds at one entry.
struct Entry<const T: usize> {
    /// θ0 + λ·merged with the trimming at each range's last key.
    r: f32,
    /// Per task: the key is below `under`; the key is the range's last.
    low: [u32; T],
    at_keep: [u32; T],
    /// sign(trimmed sum).
    sign: i32,
    /// Pending (nonzero): bit 1 for a task undecided, bit 0 for a sign
    /// the majority decides.
    hit: u32,
}

/// One entry of the one-pass loop from its stored words. Three compares
/// per task: `key < under` (counted; its negation starts the undecided
/// keys), `key >= keep` (kept; its negation ends them) and `key == keep`
/// (counted).
#[inline(always)]
fn entry<const T: usize, const F: u8>(
    bw: u16,
    ew: [u16; T],
    bounds: &Bounds<T>,
    under: &[i32; T],
    lambda: f32,
) -> Entry<T> {
    let keep = bounds.keep;
    let bj = bf16_value(bw);
    let tau: [f32; T] = std::array::from_fn(|i| bf16_value(ew[i]) - bj);
    let (mut low, mut at_keep, mut open) = ([0u32; T], [0u32; T], 0u32);
    let mut live = u32::from(bw == 0x8000);
    let mut kt = [0f32; T];
    for i in 0..T {
        let key = abs_key(tau[i]) as i32;
        let (lo, kept) = (key < under[i], key >= keep[i]);
        low[i] = u32::from(lo);
        at_keep[i] = u32::from(key == keep[i]);
        // Undecided: in [from, keep) and not 0 (`under` is past 0 when
        // the range starts there).
        open |= u32::from(!lo & !kept & (key != 0));
        // A kept τ is nonzero unless the range is [0, 0].
        live |= u32::from(kept & (key != 0));
        kt[i] = if kept { tau[i] } else { 0.0 };
    }
    // sign(sum), 0 for a zero or NaN sum (the majority decides).
    let sign = sgn32(trimmed_sum(&kt));
    let zero = u32::from(sign == 0);
    Entry {
        // The majority is not known yet: entries that need it are pending
        // and merged again.
        r: fb_entry::<T, F>(bj, &kt, 0.0, lambda),
        low,
        at_keep,
        sign,
        hit: (zero & live) | open << 1,
    }
}

/// The vector loop of one block: merged values into `r`, pending flags
/// (nonzero) into `h`; returns per task the keys below `under` and the
/// keys at `keep`, and Σ sign(trimmed sum).
#[inline(always)]
fn block<const T: usize, const F: u8>(
    b: &[u16],
    e: &[&[u16]; T],
    bounds: &Bounds<T>,
    under: &[i32; T],
    lambda: f32,
    r: &mut [f32],
    h: &mut [u32],
) -> ([u32; T], [u32; T], i32) {
    let n = r.len();
    let whole = n / LANES * LANES;
    let mut low = [[0u32; LANES]; T];
    let mut at_keep = [[0u32; LANES]; T];
    let mut settled = [0i32; LANES];
    for g in (0..whole).step_by(LANES) {
        let bg: &[u16; LANES] = b[g..g + LANES].try_into().expect("lanes");
        let eg: [&[u16; LANES]; T] =
            std::array::from_fn(|i| e[i][g..g + LANES].try_into().expect("lanes"));
        let rg: &mut [f32; LANES] = (&mut r[g..g + LANES]).try_into().expect("lanes");
        let hg: &mut [u32; LANES] = (&mut h[g..g + LANES]).try_into().expect("lanes");
        for l in 0..LANES {
            let x = entry::<T, F>(
                bg[l],
                std::array::from_fn(|i| eg[i][l]),
                bounds,
                under,
                lambda,
            );
            rg[l] = x.r;
            hg[l] = x.hit;
            for i in 0..T {
                low[i][l] += x.low[i];
                at_keep[i][l] += x.at_keep[i];
            }
            settled[l] += x.sign;
        }
    }
    let mut low: [u32; T] = std::array::from_fn(|i| low[i].iter().sum());
    let mut at_keep: [u32; T] = std::array::from_fn(|i| at_keep[i].iter().sum());
    let mut settled: i32 = settled.iter().sum();
    for j in whole..n {
        let x = entry::<T, F>(
            b[j],
            std::array::from_fn(|i| e[i][j]),
            bounds,
            under,
            lambda,
        );
        r[j] = x.r;
        h[j] = x.hit;
        for i in 0..T {
            low[i] += x.low[i];
            at_keep[i] += x.at_keep[i];
        }
        settled += x.sign;
    }
    (low, at_keep, settled)
}

/// The range-pass bookkeeping of one pending entry: its keys inside
/// [from, last) other than 0 counted, and the majority of an entry with
/// one such task corrected in that task's difference table, or its row
/// kept when there are several (see [`super::stats`]).
#[inline(always)]
fn visit<const T: usize>(
    b: &[u16],
    e: &[&[u16]; T],
    j: usize,
    a: &Args<T>,
    spare: usize,
    acc: &mut Pass2,
    overflowed: bool,
) {
    let Bounds { from, keep } = a.bounds;
    let bj = bf16_value(b[j]);
    let tau: [f32; T] = std::array::from_fn(|i| bf16_value(e[i][j]) - bj);
    // x0: the sum as merged (trimmed at `keep`); x1: with every key from
    // `from` kept (the sum with the one undecided task kept).
    let (mut x0, mut x1, mut undecided, mut at) = (0f32, 0f32, 0u32, spare);
    for (i, (&v, lane)) in tau.iter().zip(&a.lanes).enumerate() {
        let k = abs_key(v);
        let key = k as i32;
        x0 += if key >= keep[i] { v } else { 0.0 };
        x1 += if key >= from[i] { v } else { 0.0 };
        if let Some(lane) = lane {
            if key >= from[i] && key < keep[i] && k != 0 {
                let slot = lane.offset + (k - lane.from) as usize;
                acc.low[slot] += 1;
                undecided += 1;
                at = slot;
            }
        }
    }
    acc.diff[if undecided == 1 { at } else { spare }] += i64::from(sgn32(x1) - sgn32(x0));
    if undecided >= 2 {
        acc.settled -= i64::from(sgn32(x0));
        if !overflowed {
            acc.rows.extend(tau);
        }
    }
}

/// Pending entries of one held tensor, merged again with exact statistics.
struct Patch<'p> {
    stats: &'p TiesStats,
    lambda: f32,
    pending: &'p [u32],
    words: &'p [u16],
}

impl Patch<'_> {
    fn tasks<O: OutElem>(&self, func: MergeFunc, out: &mut [O]) {
        match self.stats.keys.len() {
            1 => self.func::<1, O>(func, out),
            2 => self.func::<2, O>(func, out),
            3 => self.func::<3, O>(func, out),
            4 => self.func::<4, O>(func, out),
            _ => unreachable!("held tensors have 1 to 4 tasks"),
        }
    }

    fn func<const T: usize, O: OutElem>(&self, func: MergeFunc, out: &mut [O]) {
        match func {
            MergeFunc::Sum => self.run::<T, 0, O>(out),
            MergeFunc::Mean => self.run::<T, 1, O>(out),
            MergeFunc::Max => self.run::<T, 2, O>(out),
        }
    }

    /// [`LANES`] entries at a time (the merge vectorises; the stores are
    /// scattered).
    fn run<const T: usize, const F: u8, O: OutElem>(&self, out: &mut [O]) {
        let keys: [i32; T] =
            std::array::from_fn(|i| self.stats.keys[i].min(i32::MAX as u32) as i32);
        let (m, lambda) = (self.stats.majority, self.lambda);
        let merge = |w: &[u16]| -> f32 {
            let bj = bf16_value(w[0]);
            let tau: [f32; T] = std::array::from_fn(|i| bf16_value(w[i + 1]) - bj);
            fb_entry::<T, F>(bj, &trimmed(&tau, &keys), m, lambda)
        };
        let mut values = [0f32; LANES];
        let mut stored = [O::zeroed(); LANES];
        let groups = self
            .pending
            .chunks(LANES)
            .zip(self.words.chunks(LANES * (T + 1)));
        for (idx, words) in groups {
            let v = &mut values[..idx.len()];
            for (v, w) in v.iter_mut().zip(words.chunks_exact(T + 1)) {
                *v = merge(w);
            }
            let st = &mut stored[..idx.len()];
            O::store(v, st);
            for (&j, &x) in idx.iter().zip(st.iter()) {
                out[j as usize] = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::stats::{fb_stats_direct, fb_stats_radix_hold, RadixOpts, Route};
    use super::super::{fb_fused_tensor, FbTies, Scope};
    use super::*;
    use crate::methods::ModelScan;
    use crate::spec::TensorCtx;
    use runtime::checkpoint::TensorRef;

    /// One tensor stored as bf16: θ0 and every θi.
    struct Stored {
        name: String,
        shape: Vec<usize>,
        /// BF16 or F32.
        dtype: DType,
        base: Vec<u8>,
        experts: Vec<Vec<u8>>,
    }

    /// How the task vectors are drawn.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// τ on a grid of eighths: many equal magnitudes, exact
        /// cancellations, zeros, and some θ0 = −0.
        Coarse,
        /// Small continuous τ (then rounded to bf16 like the rest).
        Continuous,
        /// 80 % of τ exactly 0: the threshold sits at or next to 0.
        Zeros,
    }

    fn words(v: &[f32]) -> Vec<u8> {
        encode(v, DType::BF16)
    }

    /// `v` stored as bf16 or f32.
    fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
        match dtype {
            DType::BF16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        }
    }

    fn stored(rng: &mut ChaCha8Rng, name: &str, n: usize, tasks: usize, kind: Kind) -> Stored {
        stored_as(rng, name, n, tasks, kind, DType::BF16)
    }

    fn stored_as(
        rng: &mut ChaCha8Rng,
        name: &str,
        n: usize,
        tasks: usize,
        kind: Kind,
        dtype: DType,
    ) -> Stored {
        let base: Vec<f32> = (0..n)
            .map(|_| match kind {
                Kind::Coarse if rng.random_bool(0.01) => -0.0,
                _ => rng.random_range(-1.0f32..1.0),
            })
            .collect();
        let experts = (0..tasks)
            .map(|_| {
                let e: Vec<f32> = base
                    .iter()
                    .map(|&b| match kind {
                        Kind::Coarse => b + rng.random_range(-6i32..=6) as f32 * 0.125,
                        Kind::Continuous => b + rng.random_range(-0.01f32..0.01),
                        Kind::Zeros if rng.random_bool(0.8) => b,
                        Kind::Zeros => b + rng.random_range(-3i32..=3) as f32 * 0.25,
                    })
                    .collect();
                encode(&e, dtype)
            })
            .collect();
        Stored {
            name: name.into(),
            shape: vec![n],
            dtype,
            base: encode(&base, dtype),
            experts,
        }
    }

    static CPU: Device = Device::Cpu;

    fn inputs(s: &Stored, out: DType) -> TensorInputs<'_> {
        let r = |bytes| TensorRef {
            dtype: s.dtype,
            shape: &s.shape,
            bytes,
        };
        TensorInputs {
            ctx: TensorCtx::new(&s.name, 1),
            base: Some(r(s.base.as_slice())),
            experts: s.experts.iter().map(|e| r(e.as_slice())).collect(),
            device: &CPU,
            out_dtype: out,
            cancel: &crate::methods::testutil::NO_CANCEL,
        }
    }

    /// Every tensor of a model end to end, for the in-memory oracle.
    fn concat(model: &[Stored]) -> Stored {
        Stored {
            name: "all".into(),
            shape: vec![model.iter().map(|s| s.shape[0]).sum()],
            dtype: model[0].dtype,
            base: model.iter().flat_map(|s| s.base.clone()).collect(),
            experts: (0..model[0].experts.len())
                .map(|i| model.iter().flat_map(|s| s.experts[i].clone()).collect())
                .collect(),
        }
    }

    /// A model scan over stored tensors.
    struct Scan<'a> {
        model: &'a [Stored],
        out: DType,
        keeps: bool,
    }

    impl ModelScan for Scan<'_> {
        fn for_each(&self, f: &(dyn Fn(&TensorInputs) -> Result<()> + Sync)) -> Result<()> {
            self.model.iter().try_for_each(|s| f(&inputs(s, self.out)))
        }

        fn keeps_outputs(&self) -> bool {
            self.keeps
        }
    }

    /// λ by tensor: negative for one of them (the sign of λ·0 shows on −0).
    fn lambda_of(name: &str) -> f32 {
        if name.ends_with('1') {
            -0.4
        } else {
            0.7
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The one-pass statistics and merged tensors of `model`, checked
    /// against the in-memory oracle and, tensor by tensor, bit for bit
    /// against the two-pass fused merge. Returns the route and how many
    /// tensors were held.
    fn check(
        model: &[Stored],
        density: f64,
        func: MergeFunc,
        out: DType,
        hold: Hold,
    ) -> (Route, usize) {
        let tasks = model[0].experts.len();
        let visit = |f: &(dyn Fn(&Source) -> Result<()> + Sync)| {
            model
                .iter()
                .try_for_each(|s| f(&Source::new(&inputs(s, out), None)?))
        };
        let (stats, route) =
            fb_stats_radix_hold(density, tasks, &visit, RadixOpts::default(), Some(&hold)).unwrap();
        let all = concat(model);
        let all_inputs = inputs(&all, out);
        let want = fb_stats_direct(
            &mut Source::new(&all_inputs, None).unwrap().load_all(),
            density,
        );
        assert_eq!(stats, want, "statistics");
        let mut held = hold.finish(&stats).unwrap();
        let count = held.len();
        for s in model {
            let inp = inputs(s, out);
            let src = Source::new(&inp, None).unwrap();
            let two_pass = fb_fused_tensor(&src, &stats, func, lambda_of(&s.name))
                .expect("bf16 inputs, up to 4 tasks")
                .unwrap();
            if let Some(t) = held.remove(&s.name) {
                assert_eq!(t.dtype(), out);
                assert_eq!(t.dims(), s.shape.as_slice());
                let (got, want) = (bits(&t), bits(&two_pass));
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                assert!(
                    bad.is_none(),
                    "tensor {}: entry {bad:?} of {}: {:?} vs {:?} ({} differ)",
                    s.name,
                    got.len(),
                    bad.map(|j| f32::from_bits(got[j])),
                    bad.map(|j| f32::from_bits(want[j])),
                    got.iter().zip(&want).filter(|(a, b)| a != b).count()
                );
            }
        }
        (route, count)
    }

    fn model(rng: &mut ChaCha8Rng, tasks: usize, kind: Kind) -> Vec<Stored> {
        [3 * CHUNK + 77, 2 * CHUNK, 5000]
            .iter()
            .enumerate()
            .map(|(t, &n)| stored(rng, &format!("t{t}"), n, tasks, kind))
            .collect()
    }

    #[test]
    fn one_pass_merges_the_same_bits_as_two_passes() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        let mut sampled = 0;
        let combos = [
            (MergeFunc::Sum, DType::BF16),
            (MergeFunc::Mean, DType::F32),
            (MergeFunc::Max, DType::F16),
            (MergeFunc::Max, DType::BF16),
        ];
        for tasks in 1..=4 {
            for kind in [Kind::Coarse, Kind::Continuous, Kind::Zeros] {
                let m = model(&mut rng, tasks, kind);
                for density in [0.2, 0.5, 1.0] {
                    for (func, out) in combos {
                        let hold = Hold::new(func, &lambda, HOLD_CAP_BYTES);
                        let (route, held) = check(&m, density, func, out, hold);
                        assert_eq!(held, m.len(), "{tasks} {kind:?} {density} {func:?}");
                        sampled += usize::from(route == Route::Sampled);
                    }
                }
            }
        }
        assert!(sampled > 0, "no sampled route");
    }

    #[test]
    fn every_build_of_the_loop_gives_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(32);
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        let m = model(&mut rng, 3, Kind::Coarse);
        let detected = Isa::detect();
        for isa in [Isa::Base, Isa::Avx2, Isa::Avx512] {
            let supported = match isa {
                Isa::Base => true,
                Isa::Avx2 => detected != Isa::Base,
                Isa::Avx512 => detected == Isa::Avx512,
            };
            if !supported {
                continue;
            }
            for func in [MergeFunc::Sum, MergeFunc::Mean, MergeFunc::Max] {
                let mut hold = Hold::new(func, &lambda, HOLD_CAP_BYTES);
                hold.isa = isa;
                let (_, held) = check(&m, 0.3, func, DType::BF16, hold);
                assert_eq!(held, m.len(), "{isa:?} {func:?}");
            }
        }
    }

    #[test]
    fn past_the_pending_budget_nothing_is_held() {
        // A budget of 0 bytes: the first pending entry gives up the
        // scope; the statistics are still exact and nothing is held.
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        let m = model(&mut rng, 3, Kind::Coarse);
        let hold = Hold::new(MergeFunc::Sum, &lambda, 0);
        let (_, held) = check(&m, 0.2, MergeFunc::Sum, DType::BF16, hold);
        assert_eq!(held, 0);
    }

    #[test]
    fn a_misleading_sample_still_merges_in_one_pass() {
        // The samples are the first entries of every chunk: make those tiny
        // so that the sampled ranges miss; the exact route's range pass
        // (whole buckets) holds the tensor instead.
        let n = 3 * CHUNK;
        let base = vec![0f32; n];
        let experts: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                let e: Vec<f32> = (0..n)
                    .map(|j| {
                        let m = ((j * 7 + i * 3) % 97) as f32 + 1.0;
                        if j % CHUNK < CHUNK / 8 {
                            m * 1e-4
                        } else if j % 2 == 0 {
                            m
                        } else {
                            -m
                        }
                    })
                    .collect();
                words(&e)
            })
            .collect();
        let m = vec![Stored {
            name: "w".into(),
            shape: vec![n],
            dtype: DType::BF16,
            base: words(&base),
            experts,
        }];
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        let hold = Hold::new(MergeFunc::Mean, &lambda, HOLD_CAP_BYTES);
        let (route, held) = check(&m, 0.5, MergeFunc::Mean, DType::F32, hold);
        assert_eq!((route, held), (Route::Exact, 1));
    }

    fn fb(func: MergeFunc, scope: Scope, tasks: usize) -> FbTies {
        FbTies {
            density: 0.25,
            func,
            scope,
            tasks,
            stats: None,
            held: Default::default(),
        }
    }

    #[test]
    fn model_scope_holds_only_where_outputs_are_kept() {
        // Through `FbTies`: with a scan that keeps its outputs, `prepare`
        // merges every tensor and `merge` hands each over once (then merges
        // it again, the same bits); without, nothing is held.
        let mut rng = ChaCha8Rng::seed_from_u64(34);
        let m = model(&mut rng, 2, Kind::Coarse);
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        for keeps in [true, false] {
            let mut ties = fb(MergeFunc::Sum, Scope::Model, 2);
            let scan = Scan {
                model: &m,
                out: DType::BF16,
                keeps,
            };
            ties.prepare(&scan, None, Some(&lambda)).unwrap();
            let held = ties.held.lock().unwrap().len();
            assert_eq!(held, if keeps { m.len() } else { 0 });
            for s in &m {
                let inp = inputs(s, DType::BF16);
                let src = Source::new(&inp, None).unwrap();
                let l = lambda_of(&s.name);
                let first = ties.merge(&src, l, true).unwrap();
                let again = ties.merge(&src, l, true).unwrap();
                assert_eq!(bits(&first), bits(&again), "{}", s.name);
            }
            assert!(ties.held.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn tensor_scope_merges_large_tensors_in_one_pass() {
        // A bf16 tensor past the in-memory selection size: the one-pass
        // route, against the tensor's statistics and the two-pass merge.
        let mut rng = ChaCha8Rng::seed_from_u64(35);
        let s = stored(
            &mut rng,
            "w",
            crate::methods::task_vectors::SMALL + 3 * CHUNK + 5,
            3,
            Kind::Coarse,
        );
        for func in [MergeFunc::Sum, MergeFunc::Max] {
            let ties = fb(func, Scope::Tensor, 3);
            let inp = inputs(&s, DType::BF16);
            let src = Source::new(&inp, None).unwrap();
            let got = ties.merge(&src, 0.9, true).unwrap();
            let stats = super::super::stats::fb_stats_tensor(&src, 0.25).unwrap();
            let want = fb_fused_tensor(&src, &stats, func, 0.9).unwrap().unwrap();
            assert_eq!(bits(&got), bits(&want), "{func:?}");
        }
    }

    #[test]
    fn in_memory_and_streamed_merges_are_the_same_bits() {
        // The method as the merge engine drives it: `prepare` on a scan that
        // keeps its outputs (the in-memory merge: one pass where it
        // applies) or not (thresholds first, then a merge pass), then
        // `merge` of every tensor. Sizes around the block and chunk sizes;
        // magnitudes tied on a grid, mostly zero, or continuous; density 1,
        // tiny (int(d·density) = 0: only the largest magnitude and its ties
        // are kept) and ordinary; every merge function; bf16 inputs (one
        // pass) and f32 inputs (never held, two passes either way).
        let sizes = [
            1,
            31,
            BLOCK - 1,
            BLOCK + 1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 77,
        ];
        let lambda = |i: &TensorInputs| Ok(lambda_of(&i.ctx.name));
        let mut held_somewhere = 0;
        for seed in 0..3u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(40 + seed);
            let (tasks, kind) =
                [(3, Kind::Coarse), (2, Kind::Zeros), (4, Kind::Continuous)][seed as usize];
            for (dtype, out) in [
                (DType::BF16, DType::BF16),
                (DType::BF16, DType::F32),
                (DType::F32, DType::F32),
            ] {
                let model: Vec<Stored> = sizes
                    .iter()
                    .enumerate()
                    .map(|(t, &n)| stored_as(&mut rng, &format!("t{t}"), n, tasks, kind, dtype))
                    .collect();
                for density in [1.0, 0.2, 1e-6] {
                    for func in [MergeFunc::Sum, MergeFunc::Mean, MergeFunc::Max] {
                        let merged = |keeps: bool| {
                            let mut ties = FbTies {
                                density,
                                ..fb(func, Scope::Model, tasks)
                            };
                            let scan = Scan {
                                model: &model,
                                out,
                                keeps,
                            };
                            ties.prepare(&scan, None, Some(&lambda)).unwrap();
                            let held = ties.held.lock().unwrap().len();
                            let tensors: Vec<Vec<u32>> = model
                                .iter()
                                .map(|s| {
                                    let inp = inputs(s, out);
                                    let src = Source::new(&inp, None).unwrap();
                                    let t = ties.merge(&src, lambda_of(&s.name), true).unwrap();
                                    assert_eq!(t.dtype(), out);
                                    bits(&t)
                                })
                                .collect();
                            (held, tensors)
                        };
                        let ((held, one), (none, two)) = (merged(true), merged(false));
                        let case =
                            format!("seed {seed} {dtype:?}->{out:?} density {density} {func:?}");
                        assert_eq!(none, 0, "{case}");
                        assert_eq!(
                            held,
                            if dtype == DType::BF16 { model.len() } else { 0 },
                            "{case}"
                        );
                        held_somewhere += held;
                        for ((s, a), b) in model.iter().zip(&one).zip(&two) {
                            let bad = a.iter().zip(b).position(|(x, y)| x != y);
                            assert!(bad.is_none(), "{case}: tensor {} entry {bad:?}", s.name);
                        }
                    }
                }
            }
        }
        assert!(held_somewhere > 0);
    }
}
