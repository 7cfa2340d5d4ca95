//! The decoder-only transformer: embedding, `num_hidden_layers` blocks of
//! grouped-query attention and a gated MLP (both pre-normed, with
//! residuals), a final RMS norm and the output projection.
//!
//! ```text
//! x₀ = embed[ids]
//! hᵢ = xᵢ + attn(norm₁(xᵢ));  xᵢ₊₁ = hᵢ + mlp(norm₂(hᵢ))
//! logits = lm_head(norm(x_L))
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use super::attention::{causal_mask, Attention, AttentionContext};
use super::cache::KvCache;
use super::config::ModelConfig;
use super::delta::{DeltaRun, ModelDelta};
use super::layers::{Hooks, Linear, LinearCapture, Mlp, RmsNorm, Rope};
use super::random::tensor_shapes;
use super::weights::Weights;
use crate::checkpoint::Checkpoint;
use crate::error::{Result, RuntimeError};

/// How to build a [`Model`].
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Where the weights and activations live.
    pub device: Device,
    /// Compute dtype; `None` means f32 on the CPU and the dtype of
    /// `model.embed_tokens.weight` elsewhere.
    pub dtype: Option<DType>,
    /// Use differentiable compositions instead of fused kernels, so gradients
    /// flow to any weight that is a `Var` (or computed from one).
    pub differentiable: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            device: Device::Cpu,
            dtype: None,
            differentiable: false,
        }
    }
}

/// One decoder block.
pub(super) struct Block {
    pub(super) attn_norm: RmsNorm,
    pub(super) attn: Attention,
    pub(super) mlp_norm: RmsNorm,
    pub(super) mlp: Box<dyn Mlp>,
}

/// A Llama-family decoder-only language model (Llama, Mistral, Qwen2).
///
/// Immutable once built (except [`Model::set_mlp`]), `Send + Sync`: many
/// threads can run it at once, each with its own [`KvCache`].
pub struct Model {
    pub(super) config: ModelConfig,
    pub(super) embed: candle_nn::Embedding,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: Linear,
    pub(super) rope: Rope,
    pub(super) device: Device,
    pub(super) dtype: DType,
    differentiable: bool,
    /// A merge held as a delta over these weights (see [`Model::with_delta`]).
    pub(super) delta: Option<Arc<ModelDelta>>,
}

/// The embedding's tensor name.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The final norm's tensor name.
pub(super) const FINAL_NORM: &str = "model.norm.weight";

/// The names of block `i`'s norms: before attention, before the MLP.
pub(super) fn norm_names(i: usize) -> (String, String) {
    (
        format!("model.layers.{i}.input_layernorm.weight"),
        format!("model.layers.{i}.post_attention_layernorm.weight"),
    )
}

impl Model {
    /// Loads `DIR/config.json` and the checkpoint's weights
    /// (`model.safetensors` or a sharded index). Folders that hold more than
    /// one architecture's weights (a saved routed ensemble) are loaded by the
    /// layer that wrote them (`merger::load_model`).
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let ck = Checkpoint::open_folder(dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    /// Builds the model from an opened checkpoint, reading only the tensors
    /// the architecture uses.
    pub fn from_checkpoint(
        config: ModelConfig,
        ck: &Checkpoint,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let mut weights = HashMap::new();
        for (name, _) in tensor_shapes(&config) {
            if ck.entry(&name).is_none() {
                continue; // reported by name below
            }
            let tensor = ck
                .tensor(&name)?
                .into_tensor()
                .map_err(|e| RuntimeError::in_tensor(&name, e))?;
            weights.insert(name, tensor);
        }
        let source = Weights::new(
            &mut weights,
            ck.name(),
            ck.dir().to_path_buf(),
            Some(Self::target(
                &opts.device,
                opts.dtype,
                ck.entry("model.embed_tokens.weight").map(|e| e.dtype),
            )),
        );
        Self::build(config, source, opts)
    }

    /// Builds the model from tensors named as in Hugging Face checkpoints.
    /// Tensors already in the compute dtype and on the device are used as
    /// they are, without a copy: the merged weights the gateway caches, or
    /// `Var`s being trained. Extra tensors are ignored; a missing tensor or
    /// a wrong shape is an error naming the tensor.
    pub fn from_tensors(
        config: ModelConfig,
        mut weights: HashMap<String, Tensor>,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let embed_dtype = weights.get("model.embed_tokens.weight").map(|t| t.dtype());
        let target = Self::target(&opts.device, opts.dtype, embed_dtype);
        let source = Weights::new(
            &mut weights,
            "in-memory weights",
            Default::default(),
            Some(target),
        );
        Self::build(config, source, opts)
    }

    /// The compute dtype and device for `opts`.
    pub(crate) fn target(
        device: &Device,
        dtype: Option<DType>,
        stored: Option<DType>,
    ) -> (DType, Device) {
        let dtype = match dtype {
            Some(d) => d,
            None if device.is_cpu() => DType::F32,
            None => stored.unwrap_or(DType::F32),
        };
        (dtype, device.clone())
    }

    fn build(config: ModelConfig, mut w: Weights, opts: &ModelOptions) -> Result<Self> {
        let c = &config;
        let (h, m) = (c.hidden_size, c.intermediate_size);
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let diff = opts.differentiable;
        let norm = |w: &mut Weights, name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(w.take(name, &[h])?, c.rms_norm_eps, diff))
        };
        let embed_w = w.take(EMBED, &[c.vocab_size, h])?;
        let dtype = embed_w.dtype();
        let lm_head = if c.tie_word_embeddings {
            w.discard("lm_head.weight");
            Linear::tied("lm_head.weight", embed_w.clone(), EMBED)
        } else {
            w.linear("lm_head", c.vocab_size, h, false)?
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let attn = Attention {
                q: w.linear(&format!("{a}.q_proj"), qd, h, c.qkv_bias)?,
                k: w.linear(&format!("{a}.k_proj"), kvd, h, c.qkv_bias)?,
                v: w.linear(&format!("{a}.v_proj"), kvd, h, c.qkv_bias)?,
                o: w.linear(&format!("{a}.o_proj"), h, qd, c.o_bias)?,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            blocks.push(Block {
                attn_norm: norm(&mut w, &format!("{p}.input_layernorm.weight"))?,
                attn,
                mlp_norm: norm(&mut w, &format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Box::new(w.mlp(&format!("{p}.mlp"), h, m, c.mlp_bias)?),
            });
        }
        let final_norm = norm(&mut w, "model.norm.weight")?;
        Ok(Model {
            embed: candle_nn::Embedding::new(embed_w, h),
            blocks,
            norm: final_norm,
            lm_head,
            rope: Rope::new(c.head_dim, c.rope_theta, diff),
            device: opts.device.clone(),
            dtype,
            differentiable: diff,
            delta: None,
            config,
        })
    }

    /// The model `base + delta`: shares every tensor of `base` (no copy)
    /// and adds the delta's terms in its forward passes, so it costs the
    /// delta's bytes only. Every tensor of the delta must be one of the
    /// base's, with its shape. A base whose MLPs cannot take a delta (a
    /// routed merge) is refused.
    pub fn with_delta(base: &Model, delta: Arc<ModelDelta>) -> Result<Model> {
        let shapes: HashMap<String, Vec<usize>> = tensor_shapes(&base.config).into_iter().collect();
        for (name, d) in delta.tensors() {
            let dims = d.dims()?;
            match shapes.get(name) {
                None => {
                    return Err(RuntimeError::Model(format!(
                        "the delta has tensor `{name}`, which the base model does not"
                    )))
                }
                Some(want) if *want != dims => {
                    return Err(RuntimeError::Model(format!(
                        "the delta of `{name}` has shape {dims:?}; the base's is {want:?}"
                    )))
                }
                Some(_) => {}
            }
        }
        let mut blocks = Vec::with_capacity(base.blocks.len());
        for (i, b) in base.blocks.iter().enumerate() {
            let mlp = b.mlp.clone_mlp().ok_or_else(|| {
                RuntimeError::Model(format!(
                    "block {i}'s MLP (a routed one) cannot take a merge's delta"
                ))
            })?;
            blocks.push(Block {
                attn_norm: b.attn_norm.clone(),
                attn: b.attn.clone(),
                mlp_norm: b.mlp_norm.clone(),
                mlp,
            });
        }
        Ok(Model {
            config: base.config.clone(),
            embed: base.embed.clone(),
            blocks,
            norm: base.norm.clone(),
            lm_head: base.lm_head.clone(),
            rope: base.rope.clone(),
            device: base.device.clone(),
            dtype: base.dtype,
            differentiable: base.differentiable,
            delta: Some(delta),
        })
    }

    /// The delta this model adds to its base's weights, if it is one.
    pub fn delta(&self) -> Option<&Arc<ModelDelta>> {
        self.delta.as_ref()
    }

    /// The one run of this model's own delta, for hooks that carry none.
    fn own_runs(&self) -> Vec<DeltaRun<'_>> {
        self.delta
            .as_deref()
            .map(|d| DeltaRun {
                rows: 0,
                delta: Some(d),
            })
            .into_iter()
            .collect()
    }

    /// `hooks`, with this model's own delta when they carry none.
    fn own_hooks<'b>(hooks: &'b mut Hooks<'_>, runs: &'b [DeltaRun<'b>]) -> Hooks<'b> {
        // The match re-borrows the capture at the shorter lifetime (a
        // coercion `as_deref_mut` alone does not make).
        #[allow(clippy::needless_match)]
        let capture: Option<&'b mut dyn LinearCapture> = match hooks.capture.as_deref_mut() {
            Some(c) => Some(c),
            None => None,
        };
        Hooks {
            capture,
            routing_lens: hooks.routing_lens,
            deltas: hooks
                .deltas
                .or(if runs.is_empty() { None } else { Some(runs) }),
        }
    }

    /// The embedding of `ids` plus each run's delta of the embedding's rows.
    pub(super) fn embed_runs(&self, ids: &Tensor, runs: Option<&[DeltaRun]>) -> Result<Tensor> {
        let x = self.embed.forward(ids)?;
        let Some(runs) =
            runs.filter(|r| r.iter().any(|r| r.delta.is_some_and(|d| d.touches(EMBED))))
        else {
            return Ok(x);
        };
        let host: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let rows = |d: Option<&ModelDelta>, ids: &[u32]| -> Result<Tensor> {
            let h = self.config.hidden_size;
            Ok(
                match d
                    .map(|d| d.rows_of(EMBED, ids, &self.device))
                    .transpose()?
                    .flatten()
                {
                    Some(r) => r.to_dtype(self.dtype)?,
                    None => Tensor::zeros((ids.len(), h), self.dtype, &self.device)?,
                },
            )
        };
        let delta = if let [only] = runs {
            rows(only.delta, &host)?.reshape(x.shape())?
        } else {
            let mut parts = Vec::with_capacity(runs.len());
            let mut at = 0;
            for run in runs {
                parts.push(rows(run.delta, &host[at..at + run.rows])?);
                at += run.rows;
            }
            Tensor::cat(&parts, 0)?.reshape(x.shape())?
        };
        Ok((x + delta)?)
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Built with differentiable ops (see [`ModelOptions::differentiable`]).
    pub fn is_differentiable(&self) -> bool {
        self.differentiable
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// Replaces the MLP of block `layer` (a routed ensemble of experts, say).
    pub fn set_mlp(&mut self, layer: usize, mlp: Box<dyn Mlp>) -> Result<()> {
        let n = self.blocks.len();
        let block = self.blocks.get_mut(layer).ok_or_else(|| {
            RuntimeError::Model(format!(
                "layer {layer} does not exist (the model has {n} layers)"
            ))
        })?;
        block.mlp = mlp;
        Ok(())
    }

    /// The dtype attention scores are computed in: f32 for half-precision
    /// models (as candle-transformers and Hugging Face do), else the model's.
    pub(super) fn attention_dtype(&self) -> DType {
        match self.dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        }
    }

    /// The residual stream after the last block (before the final norm).
    fn residual_stream(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2().map_err(|_| {
            RuntimeError::Model(format!(
                "token ids must be a (batch, seq) tensor, got shape {:?}",
                ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(RuntimeError::Model(format!(
                "token ids of shape ({b}, {t}) are empty"
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(RuntimeError::Model(format!(
                "token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size {
            return Err(RuntimeError::Model(format!(
                "token id {max_id} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            )));
        }
        let start = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = &cache {
            if c.layers.len() != self.blocks.len() {
                return Err(RuntimeError::Model(format!(
                    "KV cache for {} layers used with a model of {}",
                    c.layers.len(),
                    self.blocks.len()
                )));
            }
        }
        if start + t > self.config.max_position_embeddings {
            return Err(RuntimeError::Model(format!(
                "sequence of {} tokens exceeds max_position_embeddings ({})",
                start + t,
                self.config.max_position_embeddings
            )));
        }
        let dtype = self.attention_dtype();
        let ctx = AttentionContext {
            rope: &self.rope,
            tables: self.rope.tables(start, t, self.dtype, &self.device)?,
            mask: if t > 1 {
                Some(causal_mask(t, start, dtype, &self.device)?)
            } else {
                None
            },
            dtype,
            differentiable: self.differentiable,
        };
        let mut x = self.embed_runs(ids, hooks.deltas)?;
        let mut cache = cache;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (n1, n2) = norm_names(i);
            let h = block.attn_norm.forward_runs(&x, &n1, hooks.deltas)?;
            x = (x + block.attn.forward(&h, &ctx, slot, hooks)?)?;
            let h = block.mlp_norm.forward_runs(&x, &n2, hooks.deltas)?;
            let state = cache.as_deref_mut().map(|c| &mut c.mlp_state[i]);
            x = (x + block.mlp.forward_cached(&h, state, hooks)?)?;
        }
        if let Some(c) = cache {
            c.len = start + t;
            c.note_mlp_state();
        }
        Ok(x)
    }

    /// Hidden states after the final norm, `(batch, seq, hidden)` in the
    /// compute dtype, for token ids `(batch, seq)` (u32) that follow the
    /// cached positions. With right padding, padded positions never
    /// influence earlier ones (the attention is causal).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let runs = self.own_runs();
        let hooks = &mut Self::own_hooks(hooks, &runs);
        let x = self.residual_stream(ids, cache, hooks)?;
        Ok(self.norm.forward_runs(&x, FINAL_NORM, hooks.deltas)?)
    }

    /// Logits `(batch, seq, vocab)` of every position: f32 (f64 for a model
    /// computing in f64). The first position is `cache.len()`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_with(ids, cache, &mut Hooks::default())
    }

    /// [`Model::forward`] with hooks.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let runs = self.own_runs();
        let hooks = &mut Self::own_hooks(hooks, &runs);
        let h = self.hidden_states(ids, cache, hooks)?;
        self.logits(&h, hooks)
    }

    /// Logits `(batch, vocab)` of the last position only: what decoding
    /// needs, without projecting every prompt position onto the vocabulary.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_last_with(ids, cache, &mut Hooks::default())
    }

    /// [`Model::forward_last`] with hooks (`lm_head` sees the last position only).
    pub fn forward_last_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let runs = self.own_runs();
        let hooks = &mut Self::own_hooks(hooks, &runs);
        let x = self.residual_stream(ids, cache, hooks)?;
        let t = x.dim(1)?;
        let last = x.narrow(1, t - 1, 1)?.contiguous()?;
        let h = self.norm.forward_runs(&last, FINAL_NORM, hooks.deltas)?;
        Ok(self.logits(&h, hooks)?.squeeze(1)?)
    }

    /// Projects normed hidden states onto the vocabulary.
    pub(super) fn logits(&self, h: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let logits = self.lm_head.forward(h, hooks)?;
        Ok(match logits.dtype() {
            DType::F64 | DType::F32 => logits,
            _ => logits.to_dtype(DType::F32)?,
        })
    }

    /// Mean-pooled final hidden states `(batch, hidden)` (f32), the
    /// embedding `/v1/embeddings` returns. Every position counts; for
    /// right-padded batches use [`Model::embed_mean_lengths`].
    pub fn embed_mean(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(ids, None, &mut Hooks::default())?;
        Ok(h.to_dtype(DType::F32)?.mean(1)?)
    }

    /// Mean-pooled final hidden states `(batch, hidden)` (f32) of a
    /// right-padded batch: row `i` averages its first `lengths[i]` positions.
    pub fn embed_mean_lengths(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            return Err(RuntimeError::Model(format!(
                "lengths {lengths:?} must give 1..={t} positions for each of the {b} rows"
            )));
        }
        let h = self
            .hidden_states(ids, None, &mut Hooks::default())?
            .to_dtype(DType::F32)?;
        let weights: Vec<f32> = lengths
            .iter()
            .flat_map(|&l| (0..t).map(move |j| if j < l { 1.0 / l as f32 } else { 0.0 }))
            .collect();
        let weights = Tensor::from_vec(weights, (b, 1, t), &self.device)?;
        Ok(weights.matmul(&h)?.squeeze(1)?)
    }

    /// Log-softmax over the vocabulary (last dimension) of logits.
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
    }
}
