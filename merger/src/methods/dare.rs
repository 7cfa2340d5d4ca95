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
//! Randomness: the mask of expert i in tensor `name` is drawn from ChaCha8
//! seeded with SHA-256(seed, name, i), seed = the spec's `seed` (0 when
//! absent); entry j uses word j of that stream (keep iff word < q·2³², a
//! resolution of 2⁻³²), so the masks do not depend on thread scheduling or
//! chunking, and every pass over a tensor redraws the same mask.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::params::LAMBDA_KEYS;
use super::ties::{densities, FbTies, MkMerge, Source, CHUNK, FB_LAMBDA_KEYS};
use super::{MergeMethod, ModelScan, Num, Params, TensorInputs};
use crate::error::{MergeError, Result};

/// The dropout of a whole merge: seed, per-model keep probability and
/// options; resolved per tensor by [`Dropout::for_tensor`].
#[derive(Debug)]
pub(crate) struct Dropout {
    pub seed: u64,
    /// Keep probability q per model.
    pub keep: Vec<Num>,
    pub rescale: bool,
    pub only_linear: bool,
}

/// One expert's dropout in one tensor.
#[derive(Debug, Clone)]
struct ExpertDrop {
    seed: [u8; 32],
    /// Keep an entry when its random word is below this.
    keep_below: u64,
    /// q when rescaling, else 1.
    divisor: f32,
}

/// The dropout of one tensor, per expert (`None`: kept whole).
#[derive(Debug, Clone)]
pub(crate) struct TensorDropout {
    experts: Vec<Option<ExpertDrop>>,
}

/// The ChaCha8 seed of (seed, tensor, expert): a stable hash, the same on
/// every platform and run.
fn stream_seed(seed: u64, name: &str, expert: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fusion-gateway/dare/v1\0");
    h.update(seed.to_le_bytes());
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update((expert as u64).to_le_bytes());
    h.finalize().into()
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
                let q = q.at(ctx)?;
                Ok((q < 1.0).then(|| ExpertDrop {
                    seed: stream_seed(self.seed, &ctx.name, i),
                    keep_below: (q * 4_294_967_296.0).round() as u64,
                    divisor: if self.rescale { q as f32 } else { 1.0 },
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(experts.iter().any(Option::is_some).then_some(TensorDropout { experts }))
    }
}

/// Calls `f(j, keep)` for entries `start..start + len` of one stream.
#[inline]
fn draws(e: &ExpertDrop, start: usize, len: usize, mut f: impl FnMut(usize, bool)) {
    let mut rng = ChaCha8Rng::from_seed(e.seed);
    rng.set_word_pos(start as u128);
    let mut words = [0u32; 256];
    let mut j = 0;
    while j < len {
        let w = &mut words[..(len - j).min(256)];
        rng.fill(w);
        for &r in w.iter() {
            f(j, u64::from(r) < e.keep_below);
            j += 1;
        }
    }
}

impl TensorDropout {
    /// Sparsifies entries `start..start + tau.len()` of expert `i` in place.
    pub fn apply(&self, i: usize, start: usize, tau: &mut [f32]) {
        if let Some(e) = &self.experts[i] {
            let div = e.divisor;
            draws(e, start, tau.len(), |j, keep| {
                tau[j] = if keep { tau[j] / div } else { 0.0 };
            });
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
            draws(e, k * CHUNK, m.len(), |j, keep| m[j] = u8::from(keep));
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
        self.ties.prepare(scan, Some(&self.dropout))
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
        rescale: p.boolean(&["rescale"], true)?,
        only_linear: p.boolean(&["only_linear_weights", "only_on_linear_weights"], false)?,
    };
    let combine = p.choice(&["combine"], &["task_arithmetic", "simple_average", "ties"], "task_arithmetic")?;
    let lambda = match combine.as_str() {
        "ties" => {
            let ties = FbTies::from_params(p, 0.2)?;
            let lambda = p.number(FB_LAMBDA_KEYS, 0.5)?;
            return Ok(Box::new(DareTies { dropout, ties, lambda }));
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
