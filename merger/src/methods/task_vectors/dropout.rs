//! DARE's dropout of task vectors (Yu et al., arXiv:2311.03099): each task
//! vector is sparsified entrywise, τi′ = τi ⊙ m / q with m ~ Bernoulli(q)
//! (keep probability q; no division without rescaling). FusionBench's
//! `dare` and mergekit's `dare_linear` / `dare_ties` draw their masks here;
//! the chunk loader ([`super::Source`]) applies them as it decodes.
//!
//! The masks come from a counter-based hash, so that a mask is cheap (a few
//! integer operations per entry, in vector registers) and depends on
//! nothing but (seed, tensor, model, c, j): not on the thread count nor on
//! how a tensor is split into chunks, and every pass over a tensor redraws
//! the same mask. The stream key is SHA-256("fusion-gateway/dare/v2",
//! seed, tensor name, model name, c) for the model's mask in that tensor, c
//! counting the models of the same name listed before it (so the masks do
//! not depend on the order of the models, which the canonical id of these
//! order-free methods ignores, and a model listed twice draws two masks);
//! its first 12 bytes are three little-endian words k0, k1, k2. Entry j
//! (lo, hi its low and high 32 bits) draws the 32-bit word
//! U = mix(mix(lo ⊕ k0) ⊕ k1 ⊕ mix(hi ⊕ k2)), mix being the `lowbias32`
//! integer hash (x ⊕= x≫16; x ·= 0x21f0aaad; x ⊕= x≫15; x ·= 0x735a2d97;
//! x ⊕= x≫15, wrapping), a bijection of 32 bits; the entry is kept iff
//! U < ⌊q·2³²⌉ (keep probability ⌊q·2³²⌉/2³², a resolution of 2⁻³²). One
//! word per entry: for a fixed high half, U is a bijection of lo, so over a
//! whole run of 2³² entries exactly ⌊q·2³²⌉ are kept. The fused CPU loop
//! and the tensor path (mask drawn on the CPU, then moved to the device)
//! call the same function. Versions before this scheme drew the masks from
//! ChaCha8 streams: the same seed now gives other masks.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::CHUNK;
use crate::error::Result;
use crate::inputs::TensorInputs;
use crate::kernels::Isa;
use crate::methods::Num;

/// The dropout of a whole merge: seed, per-model keep probability and
/// options; resolved per tensor by [`Dropout::for_tensor`].
#[derive(Debug)]
pub(crate) struct Dropout {
    pub seed: u64,
    /// Keep probability q per model.
    pub keep: Vec<Num>,
    /// Per model, the name of its mask stream (see [`streams`]).
    pub streams: Vec<(String, u64)>,
    pub rescale: bool,
    pub only_linear: bool,
}

/// One expert's dropout in one tensor: its mask stream (see the module
/// header) and rescaling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExpertDrop {
    /// The stream's words.
    words: EntryWords,
    /// Keep an entry when its random word is below this.
    keep_below: u32,
    /// q when rescaling, else 1.
    divisor: f32,
}

/// `lowbias32` (C. Wellons): a bijective 32-bit integer hash with strong
/// avalanche, wrapping multiplications only, so that it vectorises.
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21f0_aaad);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735a_2d97);
    x ^ (x >> 15)
}

impl ExpertDrop {
    /// Calls `f(x, keep)` on `xs`, entries `start..start + xs.len()` of
    /// the stream, in order: a plain loop over the entries that share the
    /// high half of their index, so that it vectorises.
    #[inline(always)]
    fn for_each_keep<X>(&self, start: usize, xs: &mut [X], f: impl Fn(&mut X, bool)) {
        let mut off = 0;
        while off < xs.len() {
            let j = (start + off) as u64;
            let run = ((1u64 << 32) - (j & 0xffff_ffff)).min((xs.len() - off) as u64) as usize;
            let (lo, high) = (j as u32, self.words.high((j >> 32) as u32));
            for (k, x) in (0u32..).zip(&mut xs[off..off + run]) {
                f(
                    x,
                    self.words.word(lo.wrapping_add(k), high) < self.keep_below,
                );
            }
            off += run;
        }
    }
}

/// The dropout of one tensor, per expert (`None`: kept whole).
#[derive(Debug, Clone)]
pub(crate) struct TensorDropout {
    experts: Vec<Option<ExpertDrop>>,
}

/// The mask stream of each model: its name and how many models of the same
/// name come before it. Seeding by name rather than position keeps a merge
/// independent of the order its models are listed in (the canonical id of
/// an order-free method sorts them), while a model listed twice still
/// draws two masks.
pub(crate) fn streams(names: &[&str]) -> Vec<(String, u64)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                names[..i].iter().filter(|m| *m == n).count() as u64,
            )
        })
        .collect()
}

/// The key of (seed, tensor, model stream): words of a stable hash, the
/// same on every platform and run.
fn stream_key(domain: &str, seed: u64, tensor: &str, stream: &(String, u64)) -> [u32; 3] {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    h.update(b"\0");
    h.update(seed.to_le_bytes());
    for part in [tensor, stream.0.as_str()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(stream.1.to_le_bytes());
    let root: [u8; 32] = h.finalize().into();
    std::array::from_fn(|i| u32::from_le_bytes(root[4 * i..4 * i + 4].try_into().expect("4 bytes")))
}

/// The domain of DARE's mask streams.
const DARE_DOMAIN: &str = "fusion-gateway/dare/v2";

/// One random 32-bit word per entry of a tensor, for a method that draws
/// its own per-entry probabilities (DELLA): the keyed hash of DARE's masks
/// (see the module header) under the method's own `domain`, so its words
/// are independent of DARE's for the same seed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryWords {
    key: [u32; 3],
}

impl EntryWords {
    /// The words of model `stream` (from [`streams`]) in tensor `tensor`.
    pub(crate) fn new(domain: &str, seed: u64, tensor: &str, stream: &(String, u64)) -> Self {
        EntryWords {
            key: stream_key(domain, seed, tensor, stream),
        }
    }

    /// The part of U shared by the entries whose index has high half `hi`:
    /// k1 ⊕ mix(hi ⊕ k2).
    #[inline(always)]
    fn high(&self, hi: u32) -> u32 {
        self.key[1] ^ mix32(hi ^ self.key[2])
    }

    /// U of the entry with low half `lo`, given [`EntryWords::high`].
    #[inline(always)]
    fn word(&self, lo: u32, high: u32) -> u32 {
        mix32(mix32(lo ^ self.key[0]) ^ high)
    }

    /// U of entry `j`: mix(mix(lo ⊕ k0) ⊕ k1 ⊕ mix(hi ⊕ k2)).
    #[inline]
    pub(crate) fn at(&self, j: u64) -> u32 {
        self.word(j as u32, self.high((j >> 32) as u32))
    }

    /// Whether entry `j` is kept with probability `p` (see [`keep_below`]).
    #[inline]
    pub(crate) fn keeps(&self, j: u64, p: f64) -> bool {
        keep_below(p).is_none_or(|below| self.at(j) < below)
    }
}

/// An entry is kept with probability p when its word U < ⌊p·2³²⌉; `None`
/// when that rounds to 2³² or more (every entry is kept).
fn keep_below(p: f64) -> Option<u32> {
    let below = (p * 4_294_967_296.0).round();
    (below < 4_294_967_296.0).then_some(below as u32)
}

impl Dropout {
    /// The dropout of one tensor, or `None` when nothing is dropped there.
    pub fn for_tensor(&self, inputs: &TensorInputs) -> Result<Option<TensorDropout>> {
        let ctx = &inputs.ctx;
        if self.only_linear && !(ctx.is_linear_weight() && inputs.shape().len() == 2) {
            return Ok(None);
        }
        let experts = self
            .keep
            .iter()
            .enumerate()
            .map(|(i, q)| {
                // A keep rate within 2⁻³³ of 1 keeps everything (and its
                // divisor q rounds to 1.0 in f32): no dropout.
                let q = q.at(ctx)?;
                Ok(keep_below(q).map(|keep_below| ExpertDrop {
                    words: EntryWords::new(DARE_DOMAIN, self.seed, &ctx.name, &self.streams[i]),
                    keep_below,
                    divisor: if self.rescale { q as f32 } else { 1.0 },
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(experts
            .iter()
            .any(Option::is_some)
            .then_some(TensorDropout { experts }))
    }
}

/// Writes the keep flags (0 or 1) of entries `start..start + out.len()` of
/// one expert's stream into `out`.
fn keep_flags(e: &ExpertDrop, start: usize, out: &mut [u8]) {
    e.for_each_keep(start, out, |f, keep| *f = u8::from(keep));
}

/// τ′ = τ ⊙ m / divisor in place, entries `start..start + tau.len()`.
#[inline(always)]
fn drop_body(e: &ExpertDrop, start: usize, tau: &mut [f32]) {
    let div = e.divisor;
    e.for_each_keep(start, tau, |v, keep| *v = if keep { *v / div } else { 0.0 });
}

/// [`drop_body`] built for AVX-512 (16 lanes of 32-bit multiplies).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn drop_avx512(e: &ExpertDrop, start: usize, tau: &mut [f32]) {
    drop_body(e, start, tau)
}

/// [`drop_body`] built for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn drop_avx2(e: &ExpertDrop, start: usize, tau: &mut [f32]) {
    drop_body(e, start, tau)
}

impl TensorDropout {
    /// Sparsifies entries `start..start + tau.len()` of expert `i` in place,
    /// with the widest build of the loop the CPU runs (the mask is integer
    /// arithmetic and one division per entry: every build gives the same
    /// bits).
    pub fn apply(&self, i: usize, start: usize, tau: &mut [f32]) {
        let Some(e) = &self.experts[i] else {
            return;
        };
        match Isa::detect() {
            // SAFETY: `Isa::detect` reports what the CPU supports.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { drop_avx512(e, start, tau) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { drop_avx2(e, start, tau) },
            _ => drop_body(e, start, tau),
        }
    }

    /// Sparsifies expert `i`'s whole task vector `t` with tensor ops (mask
    /// drawn on the CPU, then moved to `t`'s device).
    pub fn apply_tensor(&self, i: usize, t: &Tensor) -> candle_core::Result<Tensor> {
        let Some(e) = &self.experts[i] else {
            return Ok(t.clone());
        };
        let mut mask = vec![0u8; t.elem_count()];
        mask.par_chunks_mut(CHUNK).enumerate().for_each(|(k, m)| {
            keep_flags(e, k * CHUNK, m);
        });
        let mask = Tensor::from_vec(mask, t.shape(), t.device())?.to_dtype(DType::F32)?;
        let div = Tensor::new(e.divisor, t.device())?;
        t.mul(&mask)?.broadcast_div(&div)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{ones, Fixture};

    #[test]
    fn masks_do_not_depend_on_chunking_or_path() {
        // 40k entries, drawn whole, in uneven pieces and as a tensor.
        let n = 40_000;
        let d = Dropout {
            seed: 3,
            keep: vec![Num::constant("q", 0.3)],
            streams: streams(&["a"]),
            rescale: true,
            only_linear: false,
        };
        let fx = ones(n);
        let td = d.for_tensor(&fx.inputs()).unwrap().unwrap();
        let mut whole = vec![1f32; n];
        td.apply(0, 0, &mut whole);
        // Uneven pieces, drawn separately, give the same mask.
        let mut pieces = vec![1f32; n];
        let mut at = 0;
        for len in [1_001, 4_567, 11_000, 17_000, 6_432] {
            td.apply(0, at, &mut pieces[at..at + len]);
            at += len;
        }
        assert_eq!(at, n);
        assert_eq!(whole, pieces);
        assert!(whole
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.3).abs() < 1e-6));
        // The tensor path (the device merges') draws the same mask and
        // rescales alike: the same bits, on varied τ.
        let tau: Vec<f32> = (0..n).map(|j| ((j % 13) as f32 - 6.0) * 0.37).collect();
        let mut fused = tau.clone();
        td.apply(0, 0, &mut fused);
        let t = Tensor::from_vec(tau, (n / 100, 100), &candle_core::Device::Cpu).unwrap();
        let tensor = td
            .apply_tensor(0, &t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(tensor, fused);
        // Another tensor name gives another mask.
        let other = Fixture::new(
            "model.layers.1.mlp.up_proj.weight",
            &[n / 100, 100],
            Some(&vec![0.0; n]),
            &[&vec![1.0; n]],
        );
        let mut renamed = vec![1f32; n];
        d.for_tensor(&other.inputs())
            .unwrap()
            .unwrap()
            .apply(0, 0, &mut renamed);
        assert_ne!(whole, renamed);
    }

    #[test]
    fn the_keep_rate_has_32_bit_resolution() {
        // q = 1.5·2⁻¹⁶: a 16-bit draw would keep at 1 or 2 in 2¹⁶ (256 or
        // 512 of 2²⁴ entries); 32 bits keep 384 ± 20 (5σ: 98).
        let n = 1 << 24;
        let q = 1.5 / 65536.0;
        let d = Dropout {
            seed: 9,
            keep: vec![Num::constant("q", q)],
            streams: streams(&["a"]),
            rescale: false,
            only_linear: false,
        };
        let fx = ones(1000);
        let td = d.for_tensor(&fx.inputs()).unwrap().unwrap();
        let mut v = vec![1f32; n];
        td.apply(0, 0, &mut v);
        let kept = v.iter().filter(|&&x| x == 1.0).count() as f64;
        let want = n as f64 * q;
        assert!(
            (kept - want).abs() < 5.0 * (want * (1.0 - q)).sqrt(),
            "{kept} vs {want}"
        );
    }

    #[test]
    fn masks_are_pinned_and_continue_past_2_to_the_32() {
        let d = Dropout {
            seed: 42,
            keep: vec![Num::constant("q", 0.5)],
            streams: streams(&["a"]),
            rescale: false,
            only_linear: false,
        };
        let fx = ones(1000);
        let td = d.for_tensor(&fx.inputs()).unwrap().unwrap();
        let e = td.experts[0].expect("dropped");
        // The draw of the module header, spelled out for entries j of
        // 2³² − 3 … 2³² + 2 (high halves 0 and 1).
        let start = (1usize << 32) - 3;
        let want: Vec<u8> = (0..6u64)
            .map(|k| {
                let j = start as u64 + k;
                let (lo, hi) = (j as u32, (j >> 32) as u32);
                let u =
                    mix32(mix32(lo ^ e.words.key[0]) ^ e.words.key[1] ^ mix32(hi ^ e.words.key[2]));
                u8::from(u < 1 << 31)
            })
            .collect();
        let mut flags = vec![0u8; 6];
        keep_flags(&e, start, &mut flags);
        assert_eq!(flags, want);
        let mut tau = vec![1f32; 6];
        td.apply(0, start, &mut tau);
        assert_eq!(tau, want.iter().map(|&f| f32::from(f)).collect::<Vec<_>>());
        // Pieces across the boundary draw the same mask.
        let mut pieces = vec![1f32; 6];
        td.apply(0, start, &mut pieces[..2]);
        td.apply(0, start + 2, &mut pieces[2..]);
        assert_eq!(pieces, tau);
        // The mask of a fixed (seed, tensor, model) is part of the format:
        // the first 32 keep flags of this stream (a change here changes
        // every DARE merge).
        let mut first = vec![0u8; 32];
        keep_flags(&e, 0, &mut first);
        let bits: u32 = first.iter().rev().fold(0, |a, &f| a << 1 | u32::from(f));
        assert_eq!(bits, PINNED, "{bits:#010x}");
    }

    #[test]
    fn every_build_of_the_mask_loop_gives_the_same_bits() {
        let d = Dropout {
            seed: 4,
            keep: vec![Num::constant("q", 0.37)],
            streams: streams(&["a"]),
            rescale: true,
            only_linear: false,
        };
        let td = d.for_tensor(&ones(1000).inputs()).unwrap().unwrap();
        let e = td.experts[0].expect("dropped");
        let tau: Vec<f32> = (0..5000).map(|j| (j as f32 - 2500.0) * 1e-3).collect();
        let start = 123_457;
        let mut want = tau.clone();
        drop_body(&e, start, &mut want);
        #[cfg(target_arch = "x86_64")]
        {
            let isa = Isa::detect();
            if isa != Isa::Base {
                let mut got = tau.clone();
                // SAFETY: the CPU has AVX2 and FMA (`Isa::detect`).
                unsafe { drop_avx2(&e, start, &mut got) };
                assert_eq!(got, want);
            }
            if isa == Isa::Avx512 {
                let mut got = tau.clone();
                // SAFETY: the CPU has AVX-512 (`Isa::detect`).
                unsafe { drop_avx512(&e, start, &mut got) };
                assert_eq!(got, want);
            }
        }
        // Kept entries are τ/q, the others 0.
        assert!(want
            .iter()
            .zip(&tau)
            .all(|(&w, &t)| w == 0.0 || w == t / 0.37f32));
    }

    /// The first 32 keep flags (bit j = entry j) of seed 42, tensor
    /// `model.layers.0.mlp.up_proj.weight`, model `a`, q = 1/2 (also
    /// computed by an independent Python transcription of the header).
    const PINNED: u32 = 0x86d3_2691;
}
