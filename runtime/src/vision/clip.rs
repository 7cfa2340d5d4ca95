//! CLIP's vision transformer (`CLIPVisionModel`,
//! `CLIPVisionModelWithProjection`) on candle, with Hugging Face's tensor
//! names (`vision_model.*`, `visual_projection.weight`).
//!
//! ```text
//! x₀   = [c ‖ conv_p(pixels)ᵀ] + E_pos           (class token, p×p patches)
//! x    = LN_pre(x₀)
//! per block: x += O · softmax((Q x)(K x)ᵀ / √d) (V x)   on LN₁(x), per head
//!            x += fc₂ · act(fc₁ · LN₂(x))           act: quick_gelu x·σ(1.702x) | gelu
//! pooled = LN_post(x[:, 0]);   embeds = P · pooled   (no bias)
//! ```
//!
//! The linear layers are the decoder's [`Linear`], so the same hooks apply:
//! captured inputs (RegMean), deltas over a base, and with
//! `differentiable: true` a forward pass of differentiable candle ops (the
//! data-driven methods). The pooled output matches candle-transformers'
//! `ClipVisionTransformer` within 1e-4 in f32 (tests below).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::config::{VisionActivation, VisionConfig};
use crate::checkpoint::Checkpoint;
use crate::encoder::bert::LayerNorm;
use crate::error::{Result, RuntimeError};
use crate::model::layers::softmax_last;
use crate::model::weights::Weights;
use crate::model::{Hooks, Linear, Model, ModelOptions};

/// One pre-LN encoder block.
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
}

/// What one forward pass gives.
#[derive(Debug)]
pub struct VisionOutput {
    /// The last hidden states, `(batch, positions, hidden)`.
    pub hidden: Tensor,
    /// The class token after the final layer norm, `(batch, hidden)`.
    pub pooled: Tensor,
    /// The pooled output projected, `(batch, projection_dim)`, when the
    /// checkpoint has `visual_projection.weight`.
    pub embeds: Option<Tensor>,
}

/// A CLIP vision tower ready to run; shared read-only (`Send + Sync`).
pub struct ClipVision {
    class: Tensor,
    patch: Tensor,
    position: Tensor,
    pre_norm: LayerNorm,
    blocks: Vec<Block>,
    post_norm: LayerNorm,
    projection: Option<Linear>,
    config: VisionConfig,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for ClipVision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVision")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// The tower's tensors of a map whose names may lack the `vision_model.`
/// prefix (a bare `CLIPVisionTransformer`'s state dict): prefixed.
fn with_prefix(weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if weights.keys().any(|k| k.starts_with("vision_model.")) {
        return weights;
    }
    weights
        .into_iter()
        .map(|(k, v)| {
            if k == "visual_projection.weight" {
                (k, v)
            } else {
                (format!("vision_model.{k}"), v)
            }
        })
        .collect()
}

impl ClipVision {
    /// Loads `DIR` (config.json and safetensors).
    pub fn load(dir: &Path, opts: &ModelOptions) -> Result<Self> {
        let config = VisionConfig::from_dir(dir)?;
        let ck = Checkpoint::open_folder(dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    /// Builds the tower from an opened checkpoint, reading only its tensors
    /// (a full CLIP checkpoint's text tower is left alone).
    pub fn from_checkpoint(
        config: VisionConfig,
        ck: &Checkpoint,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let mut weights = HashMap::new();
        for (name, _) in config.tensor_shapes() {
            if ck.entry(&name).is_none() {
                continue; // reported by name when the tower is built
            }
            let t = ck
                .tensor(&name)?
                .into_tensor()
                .map_err(|e| RuntimeError::in_tensor(&name, e))?;
            weights.insert(name, t);
        }
        let stored = ck
            .entry("vision_model.embeddings.patch_embedding.weight")
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

    /// Builds the tower from tensors by Hugging Face name (merged weights,
    /// say). Tensors already in the compute dtype and on the device are
    /// used without a copy.
    pub fn from_tensors(
        config: VisionConfig,
        weights: HashMap<String, Tensor>,
        opts: &ModelOptions,
    ) -> Result<Self> {
        let mut weights = with_prefix(weights);
        let stored = weights
            .get("vision_model.embeddings.patch_embedding.weight")
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

    fn build(config: VisionConfig, mut w: Weights, opts: &ModelOptions) -> Result<Self> {
        let c = &config;
        let (h, i, p) = (c.hidden_size, c.intermediate_size, c.patch_size);
        let diff = opts.differentiable;
        let norm = |w: &mut Weights, pre: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.take(&format!("{pre}.weight"), &[h])?,
                bias: w.take(&format!("{pre}.bias"), &[h])?,
                eps: c.layer_norm_eps,
                differentiable: diff,
            })
        };
        let e = "vision_model.embeddings";
        let patch = w.take(
            &format!("{e}.patch_embedding.weight"),
            &[h, c.num_channels, p, p],
        )?;
        let dtype = patch.dtype();
        let class = w.take(&format!("{e}.class_embedding"), &[h])?;
        let position = w.take(
            &format!("{e}.position_embedding.weight"),
            &[c.num_positions(), h],
        )?;
        let pre_norm = norm(&mut w, "vision_model.pre_layrnorm")?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let pre = format!("vision_model.encoder.layers.{l}");
            blocks.push(Block {
                q: w.linear(&format!("{pre}.self_attn.q_proj"), h, h, true)?,
                k: w.linear(&format!("{pre}.self_attn.k_proj"), h, h, true)?,
                v: w.linear(&format!("{pre}.self_attn.v_proj"), h, h, true)?,
                out: w.linear(&format!("{pre}.self_attn.out_proj"), h, h, true)?,
                norm1: norm(&mut w, &format!("{pre}.layer_norm1"))?,
                fc1: w.linear(&format!("{pre}.mlp.fc1"), i, h, true)?,
                fc2: w.linear(&format!("{pre}.mlp.fc2"), h, i, true)?,
                norm2: norm(&mut w, &format!("{pre}.layer_norm2"))?,
            });
        }
        let post_norm = norm(&mut w, "vision_model.post_layernorm")?;
        let projection = match w.take("visual_projection.weight", &[c.projection_dim, h]) {
            Ok(t) => Some(Linear::new("visual_projection.weight", t, None)),
            Err(RuntimeError::MissingTensor { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(ClipVision {
            class,
            patch,
            position,
            pre_norm,
            blocks,
            post_norm,
            projection,
            config,
            dtype,
            device: opts.device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VisionConfig {
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

    /// Bytes of the tower's tensors in memory.
    pub fn resident_bytes(&self) -> u64 {
        let shapes = self.config.tensor_shapes();
        let n: usize = shapes
            .iter()
            .filter(|(name, _)| self.projection.is_some() || name != "visual_projection.weight")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (n * self.dtype.size_in_bytes()) as u64
    }

    /// Width of [`ClipVision::embed`]'s vectors: `projection_dim` with a
    /// projection, else `hidden_size`.
    pub fn dimension(&self) -> usize {
        if self.projection.is_some() {
            self.config.projection_dim
        } else {
            self.config.hidden_size
        }
    }

    /// Whether the checkpoint projects its embeddings
    /// (`CLIPVisionModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    /// Runs `pixels`, `(batch, channels, image_size, image_size)` already
    /// preprocessed (resized, cropped, normalised).
    pub fn forward(&self, pixels: &Tensor, hooks: &mut Hooks) -> Result<VisionOutput> {
        let c = &self.config;
        let want = [c.num_channels, c.image_size, c.image_size];
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1..] != want || dims[0] == 0 {
            return Err(RuntimeError::InvalidInput(format!(
                "pixel values of shape {dims:?}; this model takes (batch, {}, {}, {})",
                want[0], want[1], want[2]
            )));
        }
        let b = dims[0];
        let h = c.hidden_size;
        let pixels = pixels.to_dtype(self.dtype)?.to_device(&self.device)?;
        // (b, h, s, s) → (b, s², h)
        let patches = pixels
            .conv2d(&self.patch, 0, c.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self.class.reshape((1, 1, h))?.broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position)?;
        let mut x = self.pre_norm.forward(&x)?;
        for block in &self.blocks {
            x = self.block(block, &x, hooks)?;
        }
        let pooled = self.post_norm.forward(&x.i((.., 0, ..))?.contiguous()?)?;
        let embeds = match &self.projection {
            Some(p) => Some(p.forward(&pooled, hooks)?),
            None => None,
        };
        Ok(VisionOutput {
            hidden: x,
            pooled,
            embeds,
        })
    }

    /// The image embeddings: projected when the checkpoint has a
    /// projection, else the pooled output; `(batch, dim)` in f32.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self.forward(pixels, &mut Hooks::default())?;
        Ok(out.embeds.unwrap_or(out.pooled).to_dtype(DType::F32)?)
    }

    fn block(&self, b: &Block, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let (n, t, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();
        let a = b.norm1.forward(x)?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((n, t, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(b.q.forward(&a, hooks)?)?;
        let k = split(b.k.forward(&a, hooks)?)?;
        let v = split(b.v.forward(&a, hooks)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let probs = softmax_last(&scores, b.norm1.differentiable)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, t, h))?;
        let x = (x + b.out.forward(&ctx, hooks)?)?;
        let m = b.fc1.forward(&b.norm2.forward(&x)?, hooks)?;
        let m = match self.config.hidden_act {
            VisionActivation::QuickGelu => (&m * candle_nn::ops::sigmoid(&(&m * 1.702)?)?)?,
            VisionActivation::Gelu => m.gelu_erf()?,
        };
        Ok((&x + b.fc2.forward(&m, hooks)?)?)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_transformers::models::clip::text_model::Activation as CtAct;
    use candle_transformers::models::clip::vision_model::{
        ClipVisionConfig, ClipVisionTransformer,
    };

    use super::*;

    fn config(act: &str) -> VisionConfig {
        VisionConfig::from_json(
            &format!(
                r#"{{"model_type":"clip_vision_model","hidden_size":32,"intermediate_size":48,
                "num_hidden_layers":2,"num_attention_heads":4,"num_channels":3,"image_size":28,
                "patch_size":7,"projection_dim":16,"hidden_act":"{act}"}}"#
            ),
            Path::new("config.json"),
        )
        .unwrap()
    }

    /// Deterministic N(0, σ²)-ish weights for every tensor of `c`.
    fn random(c: &VisionConfig, seed: u64) -> HashMap<String, Tensor> {
        let mut s = seed;
        c.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 0.6
                    })
                    .collect();
                let v = if name.ends_with("norm1.weight")
                    || name.ends_with("norm2.weight")
                    || name.ends_with("layrnorm.weight")
                    || name.ends_with("layernorm.weight")
                {
                    v.iter().map(|x| 1.0 + x).collect()
                } else {
                    v
                };
                (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            })
            .collect()
    }

    fn pixels(b: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..b * 3 * 28 * 28)
            .map(|_| {
                s = s.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, (b, 3, 28, 28), &Device::Cpu).unwrap()
    }

    /// The pooled output equals candle-transformers' CLIP vision tower on
    /// the same random weights (quick_gelu, the one activation it has), and
    /// the projection is `P · pooled`.
    #[test]
    fn matches_candle_transformers_clip_vision() {
        {
            let act = "quick_gelu";
            let c = config(act);
            let weights = random(&c, 3);
            let ours =
                ClipVision::from_tensors(c.clone(), weights.clone(), &ModelOptions::default())
                    .unwrap();
            assert!(ours.has_projection());
            let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
            let theirs = ClipVisionTransformer::new(
                vb.pp("vision_model"),
                &ClipVisionConfig {
                    embed_dim: 32,
                    activation: CtAct::QuickGelu,
                    intermediate_size: 48,
                    num_hidden_layers: 2,
                    num_attention_heads: 4,
                    projection_dim: 16,
                    num_channels: 3,
                    image_size: 28,
                    patch_size: 7,
                },
            )
            .unwrap();
            let px = pixels(2, 9);
            let out = ours.forward(&px, &mut Hooks::default()).unwrap();
            let want = candle_nn::Module::forward(&theirs, &px).unwrap();
            let d = (&out.pooled - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "{act}: max |Δpooled| {d}");
            assert_eq!(out.hidden.dims(), &[2, 17, 32]);
            let p = &weights["visual_projection.weight"];
            let by_hand = out.pooled.matmul(&p.t().unwrap()).unwrap();
            let embeds = out.embeds.unwrap();
            let d = (&embeds - &by_hand)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "projection: {d}");
        }
    }

    /// `gelu` is the exact GELU, not quick_gelu: the same weights give
    /// other embeddings, finite.
    #[test]
    fn gelu_is_its_own_activation() {
        let (q, g) = (config("quick_gelu"), config("gelu"));
        let w = random(&q, 3);
        let opts = ModelOptions::default();
        let a = ClipVision::from_tensors(q, w.clone(), &opts).unwrap();
        let b = ClipVision::from_tensors(g, w, &opts).unwrap();
        let px = pixels(1, 4);
        let (ea, eb) = (a.embed(&px).unwrap(), b.embed(&px).unwrap());
        let eb: Vec<f32> = eb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(eb.iter().all(|v| v.is_finite()));
        let ea: Vec<f32> = ea.flatten_all().unwrap().to_vec1().unwrap();
        let d = ea
            .iter()
            .zip(&eb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d > 1e-3, "gelu and quick_gelu gave the same embeddings");
    }

    #[test]
    fn bad_pixels_and_weights_are_errors_naming_them() {
        let c = config("quick_gelu");
        let ours =
            ClipVision::from_tensors(c.clone(), random(&c, 1), &ModelOptions::default()).unwrap();
        let wrong = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        let err = ours.embed(&wrong).unwrap_err().to_string();
        assert!(err.contains("(batch, 3, 28, 28)"), "{err}");
        let mut missing = random(&c, 1);
        missing.remove("vision_model.encoder.layers.1.mlp.fc2.weight");
        let err = ClipVision::from_tensors(c.clone(), missing, &ModelOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers.1.mlp.fc2.weight"), "{err}");
        // Without a projection: the pooled output is the embedding.
        let mut bare = random(&c, 1);
        bare.remove("visual_projection.weight");
        let bare = ClipVision::from_tensors(c, bare, &ModelOptions::default()).unwrap();
        assert!(!bare.has_projection());
        assert_eq!(bare.embed(&pixels(1, 2)).unwrap().dims(), &[1, 32]);
    }
}
