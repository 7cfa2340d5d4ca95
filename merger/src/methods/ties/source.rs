//! Task vectors chunk by chunk, straight from the stored bytes: the loader
//! and output writer that every fused TIES and DARE loop runs on, and the
//! small branch-free loops they share.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::super::dare::TensorDropout;
use super::super::TensorInputs;
use super::CHUNK;
use crate::checkpoint::reader::decode_chunk;
use crate::checkpoint::writer::bf16_bits;
use crate::checkpoint::TensorRef;
use crate::error::{MergeError, Result};
use crate::kernels::output_vec;
use crate::select::abs_key;

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
    pub which: Vec<u32>,
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
    pub(super) fn load_all(&self) -> Chunk {
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
    pub(super) fn map_chunk_heads<R: Send>(
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
pub(super) fn sgn(x: f32) -> i64 {
    i64::from(x > 0.0) - i64::from(x < 0.0)
}

/// `s += τ` where `abs_key(τ) >= key`, else `s += 0` (branchless, so the
/// loop vectorises; keys of magnitudes fit in i31).
#[inline(always)]
pub(super) fn add_trimmed(s: &mut [f32], t: &[f32], key: u32) {
    let key = key.min(i32::MAX as u32) as i32;
    for (s, &v) in s.iter_mut().zip(t) {
        *s += if abs_key(v) as i32 >= key { v } else { 0.0 };
    }
}

/// Calls `f(j)` for every j with `hit(xs[j])`: 32 entries at a time are
/// tested into a bit mask (one vector compare) and only set bits visited,
/// so rare hits cost neither a branch per entry nor a misprediction.
#[inline(always)]
pub(crate) fn for_each_hit<T: Copy>(xs: &[T], hit: impl Fn(T) -> bool, mut f: impl FnMut(usize)) {
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::methods::testutil::typed_bytes;
    use crate::spec::TensorCtx;

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
