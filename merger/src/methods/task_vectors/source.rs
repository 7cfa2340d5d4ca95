//! Task vectors chunk by chunk, straight from the stored bytes: the loader
//! and output writer that every fused TIES, DARE and mergekit loop runs on,
//! and the small branch-free loops they share.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::dropout::TensorDropout;
use super::{BLOCK, CHUNK};
use crate::error::{MergeError, Result};
use crate::inputs::TensorInputs;
use crate::kernels::{multiversion, output_vec, OutElem};
use crate::select::abs_key;
use runtime::checkpoint::codec::decode_chunk;
use runtime::checkpoint::TensorRef;

/// θ0 and every (possibly DARE-sparsified) τi for `len` consecutive
/// entries, with the kernels' scratch.
pub(crate) struct Chunk {
    pub base: Vec<f32>,
    pub tau: Vec<Vec<f32>>,
    pub len: usize,
    pub sum: Vec<f32>,
    pub acc: Vec<f32>,
    pub aux: Vec<f32>,
    pub undecided: Vec<u32>,
    /// Positions picked by a branchless compaction (one spare slot).
    pub picks: Vec<u32>,
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
            picks: vec![0; len + 1],
        }
    }

    /// Decodes entries `start..start + len` into `c`: θ0, and τi = θi − θ0
    /// (sparsified when there is a dropout).
    pub fn load(&self, start: usize, len: usize, c: &mut Chunk) {
        load_chunk(self, start, len, c)
    }

    /// Every entry at once (for small tensors).
    pub(crate) fn load_all(&self) -> Chunk {
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
    pub(crate) fn map_chunk_heads<R: Send>(
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

    /// Scratch for [`Source::blocks`]: one L1-sized block, or a whole chunk
    /// when there is a dropout (its masks are drawn chunk by chunk).
    fn block_scratch(&self) -> Chunk {
        let step = if self.dropout.is_some() { CHUNK } else { BLOCK };
        self.chunk(step.min(self.numel()))
    }

    /// Loads entries `start..start + len` block by block into `c` (made by
    /// [`Source::block_scratch`]) and calls `g(c)` on each.
    #[inline]
    pub(crate) fn blocks(
        &self,
        start: usize,
        len: usize,
        c: &mut Chunk,
        mut g: impl FnMut(&mut Chunk),
    ) {
        let step = c.base.len().max(1);
        let mut off = 0;
        while off < len {
            let l = step.min(len - off);
            // The next block's bytes, requested ahead: the inputs are
            // memory-mapped pages, and hardware prefetchers stop at every
            // page boundary.
            let ahead = (start + off + l)..(start + (off + 2 * l).min(len));
            self.prefetch(ahead);
            self.load(start + off, l, c);
            g(c);
            off += l;
        }
    }

    /// θ0 and every θi as bf16 words read in place, when every input is
    /// stored as aligned bf16 and there is no dropout (the fused loops that
    /// decode straight from the stored words).
    pub(crate) fn bf16_inputs(&self) -> Option<(&'a [u16], Vec<&'a [u16]>)> {
        if self.dropout.is_some() {
            return None;
        }
        let n = self.numel();
        let base = bf16_words(self.inputs.base.as_ref()?, 0, n)?;
        let experts = self
            .inputs
            .experts
            .iter()
            .map(|e| bf16_words(e, 0, n))
            .collect::<Option<Vec<_>>>()?;
        Some((base, experts))
    }

    /// Asks the cache for the stored bytes of entries `range` of every input.
    #[inline]
    pub(crate) fn prefetch(&self, range: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let inputs = self.inputs.base.iter().chain(&self.inputs.experts);
            for r in inputs {
                let w = r.dtype.size_in_bytes();
                let Some(bytes) = r.bytes.get(range.start * w..range.end * w) else {
                    continue;
                };
                for line in bytes.chunks(64) {
                    // SAFETY: SSE is part of the x86_64 baseline; a prefetch
                    // of a valid address has no effect on memory.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = range;
    }

    /// Runs `f(load)` over every chunk in parallel (over the first
    /// ⌈len/`part`⌉ entries of each when `part` > 1), where `load(g)` calls
    /// `g` on the chunk's entries block by block (see [`Source::blocks`]).
    pub(crate) fn for_each_chunk_blocks(
        &self,
        part: usize,
        f: impl Fn(&mut dyn FnMut(&mut dyn FnMut(&mut Chunk))) + Sync,
    ) {
        let n = self.numel();
        (0..n.div_ceil(CHUNK)).into_par_iter().for_each_init(
            || self.block_scratch(),
            |c, k| {
                let start = k * CHUNK;
                let len = CHUNK.min(n - start).div_ceil(part);
                f(&mut |g| self.blocks(start, len, c, g))
            },
        );
    }

    /// [`Source::fill`] block by block: `f(block, f32 results)` with the
    /// block's θ0 and τ loaded, its results cast into the output dtype.
    pub fn fill_blocks(&self, f: impl Fn(&mut Chunk, &mut [f32]) + Sync) -> Result<Tensor> {
        let (shape, device) = (self.inputs.shape(), self.inputs.device);
        let t = match self.inputs.out_dtype {
            DType::BF16 => {
                Tensor::from_vec(self.fill_blocks_cast(&f, half::bf16::store), shape, device)
            }
            DType::F16 => {
                Tensor::from_vec(self.fill_blocks_cast(&f, half::f16::store), shape, device)
            }
            _ => Tensor::from_vec(self.fill_blocks_cast(&f, f32::store), shape, device),
        };
        t.map_err(|e| self.inputs.err(e))
    }

    fn fill_blocks_cast<T: bytemuck::Zeroable + Clone + Send>(
        &self,
        f: &(impl Fn(&mut Chunk, &mut [f32]) + Sync),
        store: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> Vec<T> {
        let n = self.numel();
        let mut out: Vec<T> = output_vec(n);
        out.par_chunks_mut(CHUNK).enumerate().for_each_init(
            || {
                let c = self.block_scratch();
                let res = vec![0f32; c.base.len()];
                (c, res)
            },
            |(c, res), (k, o)| {
                let mut off = 0;
                self.blocks(k * CHUNK, o.len(), c, |c| {
                    let l = c.len;
                    let r = &mut res[..l];
                    f(c, r);
                    store(r, &mut o[off..off + l]);
                    off += l;
                });
            },
        );
        out
    }

    /// Builds the merged tensor by `f(chunk index, chunk, f32 results)` over
    /// every chunk in parallel, stored in the output dtype (the cast fused
    /// into the same pass).
    pub fn fill(&self, f: impl Fn(usize, &mut Chunk, &mut [f32]) + Sync) -> Result<Tensor> {
        let (shape, device) = (self.inputs.shape(), self.inputs.device);
        let t = match self.inputs.out_dtype {
            DType::BF16 => Tensor::from_vec(self.fill_cast(&f, half::bf16::store), shape, device),
            DType::F16 => Tensor::from_vec(self.fill_cast(&f, half::f16::store), shape, device),
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
pub(crate) fn sgn(x: f32) -> i64 {
    i64::from(x > 0.0) - i64::from(x < 0.0)
}

/// `s += τ` where `abs_key(τ) >= key`, else `s += 0` (branchless, so the
/// loop vectorises; keys of magnitudes fit in i31).
#[inline(always)]
pub(crate) fn add_trimmed(s: &mut [f32], t: &[f32], key: u32) {
    let key = key.min(i32::MAX as u32) as i32;
    for (s, &v) in s.iter_mut().zip(t) {
        *s += if abs_key(v) as i32 >= key { v } else { 0.0 };
    }
}

/// The high bits of 16 flag bytes (0 or 0xff) as a mask.
#[inline(always)]
pub(crate) fn mask16(w: &[u8]) -> u32 {
    debug_assert!(w.len() >= 16);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_movemask_epi8};
        // SAFETY: SSE2 is part of the x86_64 baseline, and `w` holds at
        // least 16 bytes (an unaligned load).
        unsafe { _mm_movemask_epi8(_mm_loadu_si128(w.as_ptr().cast::<__m128i>())) as u32 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        w[..16]
            .iter()
            .enumerate()
            .fold(0u32, |m, (l, &b)| m | u32::from(b >> 7) << l)
    }
}

/// Calls `f(j)` for every j with `flags[j] != 0` (flags are 0 or 0xff):
/// 32 flags at a time become a bit mask (two vector moves) and only set
/// bits are visited.
#[inline(always)]
pub(crate) fn for_each_flag(flags: &[u8], mut f: impl FnMut(usize)) {
    let mut blocks = flags.chunks_exact(32);
    for (b, block) in (&mut blocks).enumerate() {
        let mut mask = mask16(&block[..16]) | mask16(&block[16..]) << 16;
        while mask != 0 {
            f(b * 32 + mask.trailing_zeros() as usize);
            mask &= mask - 1;
        }
    }
    let tail = flags.len() - blocks.remainder().len();
    for (l, &x) in blocks.remainder().iter().enumerate() {
        if x != 0 {
            f(tail + l);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::methods::testutil::typed_bytes;
    use crate::spec::TensorCtx;

    #[test]
    fn flags_are_visited_in_order() {
        // 70 flags (two full masks of 32 and a tail of 6), set at 0, 5, 31,
        // 32, 63, 64 and 69: exactly those positions, ascending.
        let set = [0usize, 5, 31, 32, 63, 64, 69];
        let mut flags = vec![0u8; 70];
        set.iter().for_each(|&j| flags[j] = 0xff);
        let mut seen = Vec::new();
        for_each_flag(&flags, |j| seen.push(j));
        assert_eq!(seen, set);
    }

    #[test]
    fn every_stored_dtype_loads_the_same_task_vectors() {
        // Values exact in bf16, f16 and f32; τ = θ1 − θ0 by hand:
        // [0.5 − 1, −1.5 + 2, 0.25 − 0.5, 3 − 0] = [−0.5, 0.5, −0.25, 3].
        let base = [1.0f32, -2.0, 0.5, 0.0];
        let expert = [0.5f32, -1.5, 0.25, 3.0];
        let shape = [4usize];
        static CPU: Device = Device::Cpu;
        for (bd, ed) in [
            (DType::BF16, DType::BF16),
            (DType::F16, DType::BF16),
            (DType::F32, DType::F16),
            (DType::BF16, DType::F32),
        ] {
            for misaligned in [false, true] {
                // One leading byte shifts the data off its natural
                // alignment, which takes the byte-wise decoding path.
                let pad = |d: DType, v: &[f32]| {
                    let mut b = vec![0u8; usize::from(misaligned)];
                    b.extend(typed_bytes(d, v));
                    b
                };
                let (b, e) = (pad(bd, &base), pad(ed, &expert));
                let off = usize::from(misaligned);
                let inputs = TensorInputs {
                    ctx: TensorCtx::new("w", 1),
                    base: Some(TensorRef {
                        dtype: bd,
                        shape: &shape,
                        bytes: &b[off..],
                    }),
                    experts: vec![TensorRef {
                        dtype: ed,
                        shape: &shape,
                        bytes: &e[off..],
                    }],
                    device: &CPU,
                    out_dtype: DType::F32,
                    cancel: &crate::methods::testutil::NO_CANCEL,
                };
                let src = Source::new(&inputs, None).unwrap();
                let c = src.load_all();
                assert_eq!(c.base, base, "{bd:?} {ed:?} misaligned {misaligned}");
                assert_eq!(c.tau[0], [-0.5, 0.5, -0.25, 3.0], "{bd:?} {ed:?}");
                // A load from an offset reads the same entries.
                let mut part = src.chunk(2);
                src.load(2, 2, &mut part);
                assert_eq!(part.tau[0][..2], [-0.25, 3.0]);
            }
        }
    }
}
