//! The decoder-only transformer: embedding, `num_hidden_layers` blocks of
//! grouped-query attention and a gated MLP (both pre-normed, with residuals),
//! a final RMS norm and the output projection.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};

use super::config::ModelConfig;
use super::layers::{linear, softmax_last, take, GatedMlp, Hooks, Linear, Mlp, RmsNorm, Rope};
use crate::checkpoint::Checkpoint;
use crate::error::{MergeError, Result};

/// How to build a [`Model`].
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Where the weights and activations live.
    pub device: Device,
    /// Compute dtype; `None` means f32 on the CPU and the checkpoint's dtype
    /// elsewhere.
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

/// Keys and values of past positions, one entry per layer, for one sequence
/// batch. Its length is the position of the next token.
///
/// It also holds one MLP state slot per layer (see [`Mlp::forward_cached`]):
/// a routed MLP stores the routing weights it computed on the first forward
/// call through the cache (the prompt) and reuses them for every later call
/// (the generated tokens).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    mlp_state: Vec<Option<Tensor>>,
    /// Positions the MLP states were computed from (0: none computed yet).
    mlp_state_len: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            len: 0,
            mlp_state: vec![None; layers],
            mlp_state_len: 0,
        }
    }

    /// An empty cache (no positions) that keeps this cache's MLP states: a
    /// forward pass through it reuses the routing computed on this cache's
    /// prompt instead of computing its own.
    pub fn fork_mlp_state(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            mlp_state: self.mlp_state.clone(),
            mlp_state_len: 0,
        }
    }

    /// The MLP state of block `layer`, if one was stored.
    pub fn mlp_state(&self, layer: usize) -> Option<&Tensor> {
        self.mlp_state.get(layer).and_then(Option::as_ref)
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No position cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position past `len` (to rewind to a shared prefix). MLP
    /// states computed from positions past `len` are dropped too; the next
    /// forward call then computes them again from the tokens it is given.
    pub fn truncate(&mut self, len: usize) -> candle_core::Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if len < self.mlp_state_len {
            self.mlp_state.iter_mut().for_each(|s| *s = None);
            self.mlp_state_len = 0;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        self.len = len;
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        start: usize,
        rope: &Rope,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        differentiable: bool,
        hooks: &mut Hooks,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x, hooks)?, self.heads)?;
        let k = split(self.k.forward(x, hooks)?, self.kv_heads)?;
        let v = split(self.v.forward(x, hooks)?, self.kv_heads)?;
        let q = rope.apply(&q, start)?;
        let mut k = rope.apply(&k, start)?;
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let k = repeat_kv(k, self.heads / self.kv_heads)?;
        let v = repeat_kv(v, self.heads / self.kv_heads)?;
        let in_dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let total = start + t;
            let mask = causal_mask(t, total, start, x.device())?;
            att = att.broadcast_add(&mask)?;
        }
        let att = softmax_last(&att, differentiable)?;
        let y = att.matmul(&v.contiguous()?)?.to_dtype(in_dtype)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        self.o.forward(&y, hooks)
    }
}

/// `(t, total)` additive mask: 0 where query `i` (at position `start + i`)
/// may attend key `j`, −∞ past it.
fn causal_mask(
    t: usize,
    total: usize,
    start: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (t, total), device)
}

/// Repeats each key/value head `n` times (grouped-query attention).
fn repeat_kv(x: Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    Tensor::cat(&vec![&x; n], 2)?.reshape((b, kv * n, t, d))
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Box<dyn Mlp>,
}

/// A Llama-family decoder-only language model.
pub struct Model {
    config: ModelConfig,
    embed: candle_nn::Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    device: Device,
    dtype: DType,
    differentiable: bool,
}

impl Model {
    /// Loads `DIR/config.json` and the checkpoint's weights. A folder written
    /// by [`crate::moe::MoeModel::save`] (its config.json has a `fusion_moe`
    /// object) loads as the routed ensemble it holds.
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        if crate::moe::is_moe_folder(dir)? {
            return Ok(crate::moe::MoeModel::load(dir, opts)?.into_model());
        }
        let config = ModelConfig::from_dir(dir)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let ck = Checkpoint::open(&name, dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_checkpoint(
        config: ModelConfig,
        ck: &Checkpoint,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let mut weights = HashMap::new();
        for name in ck.tensors().keys() {
            let t = ck.tensor(name)?;
            let tensor = Tensor::from_raw_buffer(t.bytes, t.dtype, t.shape, &Device::Cpu)
                .map_err(|e| MergeError::in_tensor(name, e))?;
            let tensor = if opts.device.is_cpu() {
                tensor
            } else {
                tensor
                    .to_device(&opts.device)
                    .map_err(|e| MergeError::in_tensor(name, e))?
            };
            weights.insert(name.clone(), tensor);
        }
        Self::from_tensors(config, weights, opts).map_err(|e| match e {
            MergeError::MissingTensor { tensor, .. } => MergeError::MissingTensor {
                tensor,
                model: ck.name().to_string(),
                path: ck.dir().to_path_buf(),
            },
            e => e,
        })
    }

    /// Builds the model from tensors named as in Hugging Face checkpoints.
    /// Tensors already in the compute dtype and on the device are used as they
    /// are (no copy): the merged weights the gateway caches, or `Var`s being
    /// trained. Extra tensors are ignored; a missing one is an error naming it.
    pub fn from_tensors(
        config: ModelConfig,
        mut weights: HashMap<String, Tensor>,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let device = opts.device.clone();
        let dtype = match opts.dtype {
            Some(d) => d,
            None if device.is_cpu() => DType::F32,
            None => weights
                .get("model.embed_tokens.weight")
                .map(|t| t.dtype())
                .unwrap_or(DType::F32),
        };
        for (name, t) in weights.iter_mut() {
            let check = |e| MergeError::in_tensor(name, e);
            if !t.device().same_device(&device) {
                *t = t.to_device(&device).map_err(check)?;
            }
            if t.dtype() != dtype {
                *t = t.to_dtype(dtype).map_err(check)?;
            }
        }
        let c = &config;
        let shape_check = |name: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.dims() != want {
                return Err(MergeError::ShapeMismatch {
                    tensor: name.to_string(),
                    model: "model".into(),
                    found: t.dims().into(),
                    reference: "config.json".into(),
                    expected: want.into(),
                });
            }
            Ok(())
        };
        let embed_w = take(&mut weights, "model.embed_tokens.weight")?;
        shape_check(
            "model.embed_tokens.weight",
            &embed_w,
            &[c.vocab_size, c.hidden_size],
        )?;
        let lm_head = if c.tie_word_embeddings {
            weights.remove("lm_head.weight");
            Linear::new("lm_head.weight", embed_w.clone(), None)
        } else {
            let l = linear("lm_head", &mut weights, false)?;
            shape_check("lm_head.weight", l.weight(), &[c.vocab_size, c.hidden_size])?;
            l
        };
        let embed = candle_nn::Embedding::new(embed_w, c.hidden_size);
        let diff = opts.differentiable;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let q = linear(&format!("{p}.self_attn.q_proj"), &mut weights, c.qkv_bias)?;
            let k = linear(&format!("{p}.self_attn.k_proj"), &mut weights, c.qkv_bias)?;
            let v = linear(&format!("{p}.self_attn.v_proj"), &mut weights, c.qkv_bias)?;
            let o = linear(&format!("{p}.self_attn.o_proj"), &mut weights, c.o_bias)?;
            let qd = c.num_attention_heads * c.head_dim;
            let kvd = c.num_key_value_heads * c.head_dim;
            shape_check(q.name(), q.weight(), &[qd, c.hidden_size])?;
            shape_check(k.name(), k.weight(), &[kvd, c.hidden_size])?;
            shape_check(v.name(), v.weight(), &[kvd, c.hidden_size])?;
            shape_check(o.name(), o.weight(), &[c.hidden_size, qd])?;
            let mlp = GatedMlp::from_weights(&format!("{p}.mlp"), &mut weights, c.mlp_bias)?;
            shape_check(
                mlp.gate.name(),
                mlp.gate.weight(),
                &[c.intermediate_size, c.hidden_size],
            )?;
            shape_check(
                mlp.up.name(),
                mlp.up.weight(),
                &[c.intermediate_size, c.hidden_size],
            )?;
            shape_check(
                mlp.down.name(),
                mlp.down.weight(),
                &[c.hidden_size, c.intermediate_size],
            )?;
            let attn_norm = take(&mut weights, &format!("{p}.input_layernorm.weight"))?;
            let mlp_norm = take(
                &mut weights,
                &format!("{p}.post_attention_layernorm.weight"),
            )?;
            blocks.push(Block {
                attn_norm: RmsNorm::new(attn_norm, c.rms_norm_eps, diff),
                attn: Attention {
                    q,
                    k,
                    v,
                    o,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp_norm: RmsNorm::new(mlp_norm, c.rms_norm_eps, diff),
                mlp: Box::new(mlp),
            });
        }
        let norm = RmsNorm::new(
            take(&mut weights, "model.norm.weight")?,
            c.rms_norm_eps,
            diff,
        );
        let rope = Rope::new(
            c.head_dim,
            c.max_position_embeddings,
            c.rope_theta,
            dtype,
            &device,
            diff,
        )?;
        Ok(Model {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device,
            dtype,
            differentiable: diff,
        })
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

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// Replaces the MLP of block `layer` (a routed ensemble of experts, say).
    pub fn set_mlp(&mut self, layer: usize, mlp: Box<dyn Mlp>) -> Result<()> {
        let n = self.blocks.len();
        let block = self.blocks.get_mut(layer).ok_or_else(|| {
            MergeError::Generation(format!("layer {layer} does not exist (the model has {n})"))
        })?;
        block.mlp = mlp;
        Ok(())
    }

    /// Hidden states after the final norm, `(batch, seq, hidden)`, for token
    /// ids `(batch, seq)` that follow the cached positions.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len);
        if start + t > self.rope.max_positions() {
            return Err(MergeError::Generation(format!(
                "sequence of {} tokens exceeds max_position_embeddings ({})",
                start + t,
                self.rope.max_positions()
            )));
        }
        let mut x = self.embed.forward(ids)?;
        let mut cache = cache;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = block.attn_norm.forward(&x)?;
            let h = block
                .attn
                .forward(&h, start, &self.rope, slot, self.differentiable, hooks)?;
            x = (x + h)?;
            let h = block.mlp_norm.forward(&x)?;
            let state = cache.as_deref_mut().map(|c| &mut c.mlp_state[i]);
            let h = block.mlp.forward_cached(&h, state, hooks)?;
            x = (x + h)?;
        }
        if let Some(c) = cache {
            c.len = start + t;
            if c.mlp_state_len == 0 && c.mlp_state.iter().any(Option::is_some) {
                c.mlp_state_len = c.len;
            }
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Logits `(batch, seq, vocab)` of every position (f32).
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
        let h = self.hidden_states(ids, cache, hooks)?;
        Ok(self.lm_head.forward(&h, hooks)?.to_dtype(DType::F32)?)
    }

    /// Logits `(batch, vocab)` of the last position only (f32): what decoding
    /// needs, without projecting every prompt position onto the vocabulary.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let mut hooks = Hooks::default();
        let h = self.hidden_states(ids, cache, &mut hooks)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        Ok(self
            .lm_head
            .forward(&last, &mut hooks)?
            .squeeze(1)?
            .to_dtype(DType::F32)?)
    }

    /// Mean-pooled final hidden states `(batch, hidden)` (f32), the
    /// embedding `/v1/embeddings` returns.
    pub fn embed_mean(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.hidden_states(ids, None, &mut Hooks::default())?;
        Ok(h.to_dtype(DType::F32)?.mean(1)?)
    }

    /// Log-softmax over the vocabulary of f32 logits.
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::random_weights;
    use std::path::Path;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"llama","vocab_size":40,"hidden_size":32,"intermediate_size":48,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":64}"#,
            Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn cached_decoding_matches_a_full_forward() {
        let c = tiny();
        let m = Model::from_tensors(
            c.clone(),
            random_weights(&c, 1, 0.2).unwrap(),
            &ModelOptions::default(),
        )
        .unwrap();
        let ids: Vec<u32> = vec![1, 5, 7, 3, 9, 2];
        let full = m
            .forward(
                &Tensor::new(ids.as_slice(), m.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                None,
            )
            .unwrap();
        let mut cache = m.new_cache();
        let first = m
            .forward(
                &Tensor::new(&ids[..4], m.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        let mut rows = vec![first.squeeze(0).unwrap()];
        for &t in &ids[4..] {
            let step = m
                .forward_last(
                    &Tensor::new(&[t], m.device()).unwrap().unsqueeze(0).unwrap(),
                    Some(&mut cache),
                )
                .unwrap();
            rows.push(step);
        }
        assert_eq!(cache.len(), ids.len());
        let inc = Tensor::cat(&rows, 0).unwrap();
        let diff = (full.squeeze(0).unwrap() - inc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "max abs diff {diff}");
    }
}
