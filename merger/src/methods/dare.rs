//! DARE, "drop and rescale" (Yu et al., "Language Models are Super Mario:
//! Absorbing Abilities from Homologous Models as a Free Lunch",
//! arXiv:2311.03099), as FusionBench's `dare` and mergekit's `dare_linear`
//! and `dare_ties`.
//!
//! Each task vector is sparsified entrywise: τi′ = τi ⊙ m / q with
//! m ~ Bernoulli(q) (keep probability q; no division when `rescale` is
//! false), then combined.
//!
//! **`dare` (FusionBench)**: q = 1 − p with `sparsity_ratio` p in [0, 1)
//! (default 0.5); `rescale` (true); `only_linear_weights` (also FusionBench's
//! `only_on_linear_weights`, false): when true only 2-D linear weights
//! ([`crate::spec::TensorCtx::is_linear_weight`]) are sparsified, other
//! tensors keep their whole τi. `combine`:
//! - `task_arithmetic` (default): θ0 + λ Σ τi′, `scaling_coefficient` λ
//!   (also `lambda`, `scaling_factor`; 0.3);
//! - `simple_average`: θ0 + (1/T) Σ τi′ (FusionBench's DareSimpleAverage;
//!   no λ parameter);
//! - `ties`: FusionBench's DareTiesMerging, i.e. the full `ties_merging`
//!   procedure of [`super::ties`] (trim, elect, disjoint merge) run on the
//!   sparsified τi′, with its parameters `density` / `threshold` (default
//!   0.2, FusionBench's `threshold: 20`), `merge_func` (sum), `trim_scope`
//!   (model) and λ defaulting to 0.5 (FusionBench's `scaling_factor: 0.5`).
//!   Pass `density: 1` for sign election and disjoint merge without trimming.
//!
//! **`dare_linear` / `dare_ties` (mergekit)**: per-model `density` q
//! (default 1.0 = no dropout, in (0, 1], per-tensor resolvable) and `weight`
//! (1), `rescale` (true), `normalize` (false for both, mergekit's
//! `default_normalize=False`), `lambda` (1.0), `int8_mask` (accepted, no
//! effect); then [`super::ties`]'s mergekit mixing without (`dare_linear`)
//! or with (`dare_ties`) the sign consensus: θ0 + λ·(Σ wi τi′ [·mask] /
//! divisor).
//!
//! Randomness: a counter-based hash, so that a mask is cheap (a few
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

use super::params::LAMBDA_KEYS;
use super::ties::{densities, FbTies, MkMerge, Source, CHUNK, FB_LAMBDA_KEYS};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};
use crate::kernels::Isa;

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
    /// k0, k1, k2 of the stream.
    key: [u32; 3],
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
    /// The part of U shared by the entries whose index has high half `hi`:
    /// k1 ⊕ mix(hi ⊕ k2).
    #[inline(always)]
    fn high(&self, hi: u32) -> u32 {
        self.key[1] ^ mix32(hi ^ self.key[2])
    }

    /// U of the entry with low half `lo`, given [`ExpertDrop::high`].
    #[inline(always)]
    fn word(&self, lo: u32, high: u32) -> u32 {
        mix32(mix32(lo ^ self.key[0]) ^ high)
    }

    /// Calls `f(x, keep)` on `xs`, entries `start..start + xs.len()` of
    /// the stream, in order: a plain loop over the entries that share the
    /// high half of their index, so that it vectorises.
    #[inline(always)]
    fn for_each_keep<X>(&self, start: usize, xs: &mut [X], f: impl Fn(&mut X, bool)) {
        let mut off = 0;
        while off < xs.len() {
            let j = (start + off) as u64;
            let run = ((1u64 << 32) - (j & 0xffff_ffff)).min((xs.len() - off) as u64) as usize;
            let (lo, high) = (j as u32, self.high((j >> 32) as u32));
            for (k, x) in (0u32..).zip(&mut xs[off..off + run]) {
                f(x, self.word(lo.wrapping_add(k), high) < self.keep_below);
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
fn stream_key(seed: u64, tensor: &str, stream: &(String, u64)) -> [u32; 3] {
    let mut h = Sha256::new();
    h.update(b"fusion-gateway/dare/v2\0");
    h.update(seed.to_le_bytes());
    for part in [tensor, stream.0.as_str()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(stream.1.to_le_bytes());
    let root: [u8; 32] = h.finalize().into();
    std::array::from_fn(|i| u32::from_le_bytes(root[4 * i..4 * i + 4].try_into().expect("4 bytes")))
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
                let below = (q * 4_294_967_296.0).round();
                Ok((below < 4_294_967_296.0).then(|| ExpertDrop {
                    key: stream_key(self.seed, &ctx.name, &self.streams[i]),
                    keep_below: below as u32,
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

/// FusionBench `dare` with `combine: ties`.
#[derive(Debug)]
struct DareTies {
    dropout: Dropout,
    ties: FbTies,
    lambda: Num,
}

impl DareTies {
    fn merge_with(&self, inputs: &TensorInputs, fused: bool) -> Result<Tensor> {
        let lambda = self.lambda.at(&inputs.ctx)? as f32;
        let src = Source::new(inputs, self.dropout.for_tensor(inputs)?)?;
        self.ties.merge(&src, lambda, fused)
    }
}

impl MergeMethod for DareTies {
    fn prepare(&mut self, scan: &dyn ModelScan) -> Result<()> {
        self.ties.prepare(scan, Some(&self.dropout), None)
    }

    fn merge(&self, inputs: &TensorInputs) -> Result<Tensor> {
        self.merge_with(inputs, inputs.device.is_cpu())
    }
}

/// Builds FusionBench's `dare`.
pub fn build_fusionbench(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    let ratio = p.scalar(&["sparsity_ratio"], 0.5)?;
    if !(0.0..1.0).contains(&ratio) {
        return Err(MergeError::range("sparsity_ratio", ratio, "in [0, 1)"));
    }
    let dropout = Dropout {
        seed: p.seed().unwrap_or(0),
        keep: vec![Num::constant("sparsity_ratio", 1.0 - ratio); p.num_models],
        streams: streams(&p.model_names()),
        rescale: p.boolean(&["rescale"], true)?,
        only_linear: p.boolean(&["only_linear_weights", "only_on_linear_weights"], false)?,
    };
    let combine = p.choice(
        &["combine"],
        &["task_arithmetic", "simple_average", "ties"],
        "task_arithmetic",
    )?;
    let lambda = match combine.as_str() {
        "ties" => {
            let ties = FbTies::from_params(p, 0.2)?;
            let lambda = p.number(FB_LAMBDA_KEYS, 0.5)?;
            return Ok(Box::new(DareTies {
                dropout,
                ties,
                lambda,
            }));
        }
        "simple_average" => Num::constant("1/T", 1.0 / p.num_models as f64),
        _ => p.number(FB_LAMBDA_KEYS, 0.3)?,
    };
    Ok(Box::new(MkMerge {
        weights: vec![Num::constant("weight", 1.0); p.num_models],
        trim: None,
        dropout: Some(dropout),
        consensus: false,
        normalize: false,
        lambda,
    }))
}

fn build_mergekit(p: &mut Params, consensus: bool) -> Result<Box<dyn MergeMethod>> {
    let weights = p.per_model("weight", 1.0)?;
    let keep = densities(p)?;
    let dropout = Dropout {
        seed: p.seed().unwrap_or(0),
        keep,
        streams: streams(&p.model_names()),
        rescale: p.boolean(&["rescale"], true)?,
        only_linear: false,
    };
    let normalize = p.boolean(&["normalize"], false)?;
    let lambda = p.number(LAMBDA_KEYS, 1.0)?;
    p.boolean(&["int8_mask"], false)?;
    Ok(Box::new(MkMerge {
        weights,
        trim: None,
        dropout: Some(dropout),
        consensus,
        normalize,
        lambda,
    }))
}

/// Builds mergekit's `dare_linear`.
pub fn build_mergekit_linear(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_mergekit(p, false)
}

/// Builds mergekit's `dare_ties`.
pub fn build_mergekit_ties(p: &mut Params) -> Result<Box<dyn MergeMethod>> {
    build_mergekit(p, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::testutil::{assert_close, merge1, merge_all, Fixture};
    use crate::methods::ties::test_data::mk_spec;
    use crate::spec::{MergeSpec, ParamValue};

    fn fb(models: &[&str]) -> MergeSpec {
        MergeSpec::new("dare", Some("base"), models)
    }

    fn ones(n: usize) -> Fixture {
        // θ0 = 0, θ1 = 1: τ = 1 everywhere.
        Fixture::new(
            "model.layers.0.mlp.up_proj.weight",
            &[n / 100, 100],
            Some(&vec![0.0; n]),
            &[&vec![1.0; n]],
        )
    }

    #[test]
    fn zero_sparsity_is_task_arithmetic() {
        // p = 0 keeps every entry, 1/(1 − 0) = 1: θ0 + 0.3(τ1 + τ2).
        // θ0 = [1, -2, 0.5], τ1 = [0.5, 1, -1], τ2 = [-0.25, 0.5, 2]
        // → [1 + 0.075, -2 + 0.45, 0.5 + 0.3] = [1.075, -1.55, 0.8].
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[1.0, -2.0, 0.5]),
            &[&[1.5, -1.0, -0.5], &[0.75, -1.5, 2.5]],
        );
        let spec = fb(&["a", "b"]).with("sparsity_ratio", 0.0);
        assert_close(&merge1(&spec, &fx), &[1.075, -1.55, 0.8], 1e-6);
        // simple_average: λ = 1/2 → [1.125, -1.25, 1.0].
        let spec = spec.with_value("combine", ParamValue::Text("simple_average".into()));
        assert_close(&merge1(&spec, &fx), &[1.125, -1.25, 1.0], 1e-6);
    }

    #[test]
    fn rescale_keeps_the_mean() {
        // 200k entries of τ = 1, p = 0.5, λ = 1: kept entries become
        // 1/(1 − 0.5) = 2, dropped 0; mean 1 with standard error
        // sqrt(p/(1−p)/n) = sqrt(1/200000) ≈ 0.00224; allow 5 of them.
        let n = 200_000;
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with("sparsity_ratio", 0.5);
        let got = merge1(&spec, &ones(n));
        assert!(got.iter().all(|&v| v == 0.0 || v == 2.0));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * (1.0f64 / n as f64).sqrt(),
            "mean {mean}"
        );
        // p = 0.9: kept = 10, se = sqrt(9/n) ≈ 0.0067.
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with("sparsity_ratio", 0.9);
        let got = merge1(&spec, &ones(n));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * (9.0f64 / n as f64).sqrt(),
            "mean {mean}"
        );
        // Without rescaling the mean is the keep rate, 0.1 (se sqrt(0.09/n)).
        let spec = spec.with_value("rescale", ParamValue::Bool(false));
        let got = merge1(&spec, &ones(n));
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 0.1).abs() < 5.0 * (0.09f64 / n as f64).sqrt(),
            "mean {mean}"
        );
    }

    #[test]
    fn seeded_masks_are_deterministic_and_differ_across_seeds() {
        let fx = ones(20_000);
        let with_seed = |s: Option<u64>| {
            let mut spec = fb(&["a"]);
            spec.seed = s;
            merge1(&spec, &fx)
        };
        assert_eq!(with_seed(Some(7)), with_seed(Some(7)));
        assert_eq!(with_seed(None), with_seed(Some(0)));
        let (a, b) = (with_seed(Some(7)), with_seed(Some(8)));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        // Independent masks at p = 0.5 disagree on about half the entries.
        assert!(differ > 8_000 && differ < 12_000, "{differ}");
    }

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
    fn masks_follow_model_names_not_positions() {
        // dare_linear, density 0.5, weights 1: listing the models in the
        // other order gives the same merge (up to the order of the f32 sum),
        // and the same model listed twice draws two different masks.
        let n = 4000;
        let base = vec![0f32; n];
        let ea: Vec<f32> = (0..n).map(|j| (j % 7) as f32 + 1.0).collect();
        let eb: Vec<f32> = (0..n).map(|j| -((j % 5) as f32) - 1.0).collect();
        let spec = |names: &[&str]| {
            let mut s = mk_spec("dare_linear", &[(1.0, 0.5), (1.0, 0.5)]);
            for (m, name) in s.models.iter_mut().zip(names) {
                m.name = name.to_string();
            }
            s.seed = Some(1);
            s
        };
        let ab = merge1(
            &spec(&["a", "b"]),
            &Fixture::new("w", &[n], Some(&base), &[&ea, &eb]),
        );
        let ba = merge1(
            &spec(&["b", "a"]),
            &Fixture::new("w", &[n], Some(&base), &[&eb, &ea]),
        );
        assert_close(&ab, &ba, 1e-6);
        let aa = merge1(
            &spec(&["a", "a"]),
            &Fixture::new("w", &[n], Some(&base), &[&ea, &ea]),
        );
        // Two independent masks at q = 0.5: an entry gets 0, 2τ or 4τ.
        assert!(aa.iter().zip(&ea).any(|(v, e)| *v == 2.0 * e));
        assert!(aa.iter().zip(&ea).any(|(v, e)| *v == 4.0 * e));
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
                let u = mix32(mix32(lo ^ e.key[0]) ^ e.key[1] ^ mix32(hi ^ e.key[2]));
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

    #[test]
    fn only_linear_weights_leaves_other_tensors_whole() {
        // A norm is not a linear weight: τ = 1 stays, θ = 0 + 1·1.
        let norm = Fixture::new(
            "model.norm.weight",
            &[1000],
            Some(&[0.0; 1000]),
            &[&[1.0; 1000]],
        );
        let lin = ones(1000);
        let spec = fb(&["a"])
            .with("scaling_coefficient", 1.0)
            .with_value("only_linear_weights", ParamValue::Bool(true));
        let out = merge_all(&spec, &[norm, lin]);
        assert!(out[0].iter().all(|&v| v == 1.0));
        assert!(out[1].iter().all(|&v| v == 0.0 || v == 2.0));
        assert!(out[1].contains(&0.0));
    }

    /// The same experts with DARE's mask already applied to their τ.
    fn pre_dropped(fx: &Fixture, d: &Dropout) -> Fixture {
        let inputs = fx.inputs();
        let base = inputs.base.unwrap().to_f32_vec();
        let td = d.for_tensor(&inputs).unwrap().unwrap();
        let experts: Vec<Vec<f32>> = (0..fx.experts.len())
            .map(|i| {
                let mut tau: Vec<f32> = inputs.experts[i]
                    .to_f32_vec()
                    .iter()
                    .zip(&base)
                    .map(|(e, b)| e - b)
                    .collect();
                td.apply(i, 0, &mut tau);
                tau.iter().zip(&base).map(|(t, b)| b + t).collect()
            })
            .collect();
        let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        Fixture::new(&fx.name, &fx.shape, Some(&base), &refs)
    }

    #[test]
    fn dare_ties_is_ties_merging_of_the_sparsified_task_vectors() {
        // Two tensors, model scope: dare(combine: ties) with seed 5 equals
        // ties_merging over experts whose τ were masked by the same draws.
        let mk = |name: &str, n: usize, k: f32| {
            let base: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.25 - 0.5).collect();
            let e: Vec<Vec<f32>> = (0..3)
                .map(|i| {
                    (0..n)
                        .map(|j| base[j] + (((j * 31 + i * 17) % 13) as f32 - 6.0) * k)
                        .collect()
                })
                .collect();
            Fixture::new(name, &[n], Some(&base), &[&e[0], &e[1], &e[2]])
        };
        let fxs = [mk("a.weight", 3000, 0.125), mk("b.weight", 1000, 0.5)];
        let d = Dropout {
            seed: 5,
            // q = 0.5 keeps τ/q exact, so base + τ′ − base round-trips.
            keep: vec![Num::constant("q", 0.5); 3],
            streams: streams(&["x", "y", "z"]),
            rescale: true,
            only_linear: false,
        };
        let dropped = [pre_dropped(&fxs[0], &d), pre_dropped(&fxs[1], &d)];
        let mut dare = fb(&["x", "y", "z"])
            .with("sparsity_ratio", 0.5)
            .with_value("combine", ParamValue::Text("ties".into()));
        dare.seed = Some(5);
        let ties = MergeSpec::new("ties_merging", Some("base"), &["x", "y", "z"])
            .with("scaling_coefficient", 0.5);
        let got = merge_all(&dare, &fxs);
        let want = merge_all(&ties, &dropped);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-6);
        }
        // And the candle path agrees with the fused loop.
        let mut m = DareTies {
            dropout: d,
            ties: FbTies {
                density: 0.2,
                func: super::super::ties::MergeFunc::Sum,
                scope: super::super::ties::Scope::Tensor,
                tasks: 3,
                stats: None,
                held: Default::default(),
            },
            lambda: Num::constant("l", 0.5),
        };
        m.prepare(&crate::methods::testutil::FixtureScan(&fxs))
            .unwrap();
        let inputs = fxs[0].inputs();
        let fused = m
            .merge_with(&inputs, true)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let generic = m
            .merge_with(&inputs, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_close(&generic, &fused, 1e-6);
    }

    #[test]
    fn mergekit_dare_linear_and_ties_by_hand() {
        // density 1: no dropout. θ0 = [1, 1, 1], τ1 = [0.5, -1, 2] (w 2),
        // τ2 = [-0.5, 0.5, 1] (w 1).
        let fx = Fixture::new(
            "w",
            &[3],
            Some(&[1.0; 3]),
            &[&[1.5, 0.0, 3.0], &[0.5, 1.5, 2.0]],
        );
        // dare_linear: Σ wτ = [0.5, -1.5, 5] → θ = [1.5, -0.5, 6].
        assert_close(
            &merge1(&mk_spec("dare_linear", &[(2.0, 1.0), (1.0, 1.0)]), &fx),
            &[1.5, -0.5, 6.0],
            1e-6,
        );
        // normalize: / Σw = 3 → [1.16667, 0.5, 2.66667].
        let spec = mk_spec("dare_linear", &[(2.0, 1.0), (1.0, 1.0)])
            .with_value("normalize", ParamValue::Bool(true));
        assert_close(
            &merge1(&spec, &fx),
            &[1.0 + 0.5 / 3.0, 0.5, 1.0 + 5.0 / 3.0],
            1e-6,
        );
        // dare_ties: δ1 = [1, -2, 4], δ2 = [-0.5, 0.5, 1]; Σ = [0.5, -1.5, 5]
        // → elected [+, -, +]; mixed = [1, -2, 5] → θ = [2, -1, 6] (no normalize).
        assert_close(
            &merge1(&mk_spec("dare_ties", &[(2.0, 1.0), (1.0, 1.0)]), &fx),
            &[2.0, -1.0, 6.0],
            1e-6,
        );
        // normalize: divisors Σ w·mask = [2, 2, 3] → [0.5, -1, 5/3] → θ = [1.5, 0, 2.6667].
        let spec = mk_spec("dare_ties", &[(2.0, 1.0), (1.0, 1.0)])
            .with_value("normalize", ParamValue::Bool(true));
        assert_close(&merge1(&spec, &fx), &[1.5, 0.0, 1.0 + 5.0 / 3.0], 1e-6);
    }

    #[test]
    fn mergekit_dare_density_is_the_keep_rate() {
        // density 0.25, weight 1, λ 1: entries are 0 or τ/0.25 = 4; about a
        // quarter kept (se sqrt(0.25·0.75/n) ≈ 0.00137 for n = 100k).
        let n = 100_000;
        let got = merge1(&mk_spec("dare_linear", &[(1.0, 0.25)]), &ones(n));
        assert!(got.iter().all(|&v| v == 0.0 || v == 4.0));
        let rate = got.iter().filter(|&&v| v == 4.0).count() as f64 / n as f64;
        assert!((rate - 0.25).abs() < 5.0 * 0.00137, "{rate}");
    }

    #[test]
    fn parameters_are_validated() {
        for (k, v) in [("sparsity_ratio", 1.0), ("sparsity_ratio", -0.1)] {
            let err = crate::methods::build(&fb(&["a"]).with(k, v))
                .err()
                .expect("rejected");
            assert!(err.to_string().contains(k), "{err}");
        }
        // λ is not a parameter of simple_average; trimming only of ties.
        let sa = fb(&["a"])
            .with_value("combine", ParamValue::Text("simple_average".into()))
            .with("scaling_coefficient", 0.3);
        assert!(crate::methods::build(&sa).is_err());
        assert!(crate::methods::build(&fb(&["a"]).with("density", 0.2)).is_err());
        let err = crate::methods::build(&mk_spec("dare_ties", &[(1.0, 0.0)]))
            .err()
            .expect("density 0");
        assert!(err.to_string().contains("density"), "{err}");
    }
}
