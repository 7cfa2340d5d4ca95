//! The BERT encoder (`BertModel`) on candle: word, absolute position and
//! token-type embeddings, then post-LN blocks
//!
//! ```text
//! e   = LN(W_word[ids] + W_pos[0..t] + W_type[type_ids])
//! a   = LN(x + O · softmax(Q Kᵀ / √d + (1 − mask)·min) V)      (per head)
//! out = LN(a + W_out · act(W_in · a + b_in) + b_out)
//! ```
//!
//! with Hugging Face's tensor names (`embeddings.*`, `encoder.layer.N.*`; a
//! `bert.` prefix is accepted). Like the decoder, every linear layer's input
//! can be captured ([`Hooks::capturing`]) and `differentiable: true` builds
//! the forward pass from differentiable candle ops (candle's fused layer norm
//! and softmax have no backward pass). Hidden states match
//! candle-transformers' `bert` within 1e-4 in f32 (`runtime/tests/parity.rs`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, EncoderConfig};
use crate::checkpoint::Checkpoint;
use crate::error::{Result, RuntimeError};
use crate::model::layers::softmax_last;
use crate::model::weights::Weights;
use crate::model::{Hooks, Linear, Model, ModelOptions};

/// Layer norm with a learned scale and shift over the last dimension
/// (shared with the CLIP vision tower).
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
    pub(crate) differentiable: bool,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.differentiable {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            );
        }
        let dtype = x.dtype();
        // f32 at least (f64 stays f64, so f64 gradient checks are exact).
        let x = if dtype == DType::F64 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// One post-LN encoder block.
struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_norm: LayerNorm,
}

/// A BERT encoder ready to run; shared read-only (`Send + Sync`).
pub struct Encoder {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    blocks: Vec<Block>,
    config: EncoderConfig,
    device: Device,
    dtype: DType,
    differentiable: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// `bert.` when every encoder tensor of the map carries that prefix
/// (checkpoints saved from `BertFor…` heads), else nothing.
fn prefix_of<'a>(mut names: impl Iterator<Item = &'a str>) -> &'static str {
    if names.any(|n| n == "bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

impl Encoder {
    /// Loads `DIR` (config.json and safetensors).
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        let config = EncoderConfig::from_dir(dir)?;
        let ck = Checkpoint::open_folder(dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    /// Builds the encoder from an opened checkpoint, reading only the
    /// tensors it uses (the pooler and buffers such as
    /// `embeddings.position_ids` are left alone).
    pub fn from_checkpoint(
        config: EncoderConfig,
        ck: &Checkpoint,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let prefix = prefix_of(ck.tensors().keys().map(String::as_str));
        let mut weights = HashMap::new();
        for (name, _) in config.tensor_shapes() {
            let stored = format!("{prefix}{name}");
            if ck.entry(&stored).is_none() {
                continue; // reported by name when the encoder is built
            }
            let tensor = ck
                .tensor(&stored)?
                .into_tensor()
                .map_err(|e| RuntimeError::in_tensor(&stored, e))?;
            weights.insert(name, tensor);
        }
        let stored = ck
            .entry(&format!("{prefix}embeddings.word_embeddings.weight"))
            .map(|e| e.dtype);
        let target = Model::target(&opts.device, opts.dtype, stored);
        let source = Weights::new(
            &mut weights,
            ck.name(),
            ck.dir().to_path_buf(),
            Some(target),
        );
        Self::build(config, source, opts)
    }

    /// Builds the encoder from tensors by Hugging Face name (merged
    /// weights, say; a `bert.` prefix is accepted). Tensors already in the
    /// compute dtype and on the device are used without a copy.
    pub fn from_tensors(
        config: EncoderConfig,
        weights: HashMap<String, Tensor>,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let prefix = prefix_of(weights.keys().map(String::as_str));
        let mut weights: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v))
            .collect();
        let stored = weights
            .get("embeddings.word_embeddings.weight")
            .map(|t| t.dtype());
        let target = Model::target(&opts.device, opts.dtype, stored);
        let source = Weights::new(
            &mut weights,
            "in-memory weights",
            Default::default(),
            Some(target),
        );
        Self::build(config, source, opts)
    }

    fn build(config: EncoderConfig, mut w: Weights, opts: &ModelOptions) -> Result<Self> {
        let c = &config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let diff = opts.differentiable;
        let norm = |w: &mut Weights, p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.take(&format!("{p}.weight"), &[h])?,
                bias: w.take(&format!("{p}.bias"), &[h])?,
                eps: c.layer_norm_eps,
                differentiable: diff,
            })
        };
        let word = w.take("embeddings.word_embeddings.weight", &[c.vocab_size, h])?;
        let dtype = word.dtype();
        let position = w.take(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
        )?;
        let token_type = w.take(
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab_size, h],
        )?;
        let embed_norm = norm(&mut w, "embeddings.LayerNorm")?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            blocks.push(Block {
                query: w.linear(&format!("{p}.attention.self.query"), h, h, true)?,
                key: w.linear(&format!("{p}.attention.self.key"), h, h, true)?,
                value: w.linear(&format!("{p}.attention.self.value"), h, h, true)?,
                attn_out: w.linear(&format!("{p}.attention.output.dense"), h, h, true)?,
                attn_norm: norm(&mut w, &format!("{p}.attention.output.LayerNorm"))?,
                ffn_in: w.linear(&format!("{p}.intermediate.dense"), i, h, true)?,
                ffn_out: w.linear(&format!("{p}.output.dense"), h, i, true)?,
                ffn_norm: norm(&mut w, &format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Encoder {
            word,
            position,
            token_type,
            embed_norm,
            blocks,
            config,
            device: opts.device.clone(),
            dtype,
            differentiable: diff,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of the weights in memory.
    pub fn resident_bytes(&self) -> u64 {
        (self.config.num_parameters() * self.dtype.size_in_bytes()) as u64
    }

    /// The last hidden states `(batch, seq, hidden)` of `ids` `(batch,
    /// seq)`. `type_ids` (same shape) default to segment 0; `mask` (same
    /// shape, 1 for a token, 0 for padding; any dtype) defaults to all
    /// tokens. Positions count from 0 in every row (right padding).
    pub fn forward(
        &self,
        ids: &Tensor,
        type_ids: Option<&Tensor>,
        mask: Option<&Tensor>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let c = &self.config;
        if t == 0 {
            return Err(RuntimeError::InvalidInput("the input has no tokens".into()));
        }
        if t > c.max_position_embeddings {
            return Err(RuntimeError::ContextLength {
                what: "the input".into(),
                tokens: t,
                max: c.max_position_embeddings,
            });
        }
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= c.vocab_size {
            return Err(RuntimeError::InvalidInput(format!(
                "token id {max_id} is outside the vocabulary ({} tokens)",
                c.vocab_size
            )));
        }
        let type_ids = match type_ids {
            Some(tt) => {
                let m = tt.flatten_all()?.max(0)?.to_scalar::<u32>()?;
                if m as usize >= c.type_vocab_size {
                    return Err(RuntimeError::InvalidInput(format!(
                        "token type id {m} is outside type_vocab_size ({})",
                        c.type_vocab_size
                    )));
                }
                tt.clone()
            }
            None => ids.zeros_like()?,
        };
        let embed = |table: &Tensor, idx: &Tensor| -> candle_core::Result<Tensor> {
            let (b, t) = idx.dims2()?;
            table
                .index_select(&idx.flatten_all()?, 0)?
                .reshape((b, t, c.hidden_size))
        };
        let x = embed(&self.word, ids)?;
        let x = (x + embed(&self.token_type, &type_ids)?)?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, t)?)?;
        let mut x = self.embed_norm.forward(&x)?;
        let bias = match mask {
            Some(m) => Some(attention_bias(m, self.dtype)?),
            None => None,
        };
        for block in &self.blocks {
            x = self.block(block, &x, bias.as_ref(), hooks)?;
        }
        Ok(x)
    }

    fn block(
        &self,
        b: &Block,
        x: &Tensor,
        bias: Option<&Tensor>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let (n, t, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((n, t, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(b.query.forward(x, hooks)?)?;
        let k = split(b.key.forward(x, hooks)?)?;
        let v = split(b.value.forward(x, hooks)?)?;
        let mut scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = softmax_last(&scores, self.differentiable)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, t, h))?;
        let a = b
            .attn_norm
            .forward(&(b.attn_out.forward(&ctx, hooks)? + x)?)?;
        let inner = b.ffn_in.forward(&a, hooks)?;
        let inner = match self.config.hidden_act {
            Activation::Gelu => inner.gelu_erf()?,
            Activation::GeluTanh => inner.gelu()?,
            Activation::Relu => inner.relu()?,
        };
        Ok(b.ffn_norm
            .forward(&(b.ffn_out.forward(&inner, hooks)? + a)?)?)
    }
}

/// `(1 − mask) · min` as `(batch, 1, 1, seq)`: what Hugging Face adds to the
/// attention scores so that padding gets no weight.
fn attention_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?;
    let bias = ((m.ones_like()? - m)? * f64::from(f32::MIN))?;
    bias.unsqueeze(1)?.unsqueeze(1)?.to_dtype(dtype)
}
