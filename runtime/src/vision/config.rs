//! The architecture of a CLIP vision tower, read from a Hugging Face
//! `config.json`: a vision-only config (`model_type: clip_vision_model`,
//! `CLIPVisionModel` / `CLIPVisionModelWithProjection`) or a full CLIP
//! config (`model_type: clip`), whose `vision_config` it reads and whose
//! `projection_dim` sizes the projection.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RuntimeError};

/// The activation of the MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionActivation {
    /// `quick_gelu`: `x · σ(1.702 x)` (OpenAI's CLIP).
    QuickGelu,
    /// `gelu`: the exact GELU (erf form).
    Gelu,
}

/// Everything the vision tower needs from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (`hidden_size` is a multiple of it).
    pub num_attention_heads: usize,
    /// Input channels (3 for RGB).
    pub num_channels: usize,
    /// Side of the (square) input image, in pixels.
    pub image_size: usize,
    /// Side of a patch; `image_size` is a multiple of it.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: VisionActivation,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
    /// Width of the projected embedding (`visual_projection`).
    pub projection_dim: usize,
}

#[derive(Deserialize)]
struct RawVision {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    projection_dim: Option<usize>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vision_config: Option<RawVision>,
    projection_dim: Option<usize>,
    #[serde(flatten)]
    own: RawVision,
}

impl VisionConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let (path, text) = crate::architectures::config_json(dir)?;
        Self::from_json(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    /// Missing fields take `transformers`' `CLIPVisionConfig` defaults
    /// (ViT-B/32).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| RuntimeError::ModelConfig {
            path: PathBuf::from(path),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let (v, projection) = match (raw.model_type.as_deref(), raw.vision_config) {
            (Some("clip"), Some(v)) => {
                let p = raw.projection_dim.or(v.projection_dim);
                (v, p)
            }
            (Some("clip"), None) => {
                return Err(bad("a `clip` config without `vision_config`".into()));
            }
            (Some("clip_vision_model") | None, _) => {
                let p = raw.projection_dim.or(raw.own.projection_dim);
                (raw.own, p)
            }
            (Some(other), _) => {
                return Err(bad(format!(
                    "model_type `{other}` is not a CLIP vision model (clip, clip_vision_model)"
                )));
            }
        };
        let act = v.hidden_act.as_deref().unwrap_or("quick_gelu");
        let hidden_act = match act {
            "quick_gelu" => VisionActivation::QuickGelu,
            "gelu" => VisionActivation::Gelu,
            other => {
                return Err(bad(format!(
                    "hidden_act `{other}` is not supported (quick_gelu, gelu)"
                )))
            }
        };
        let c = VisionConfig {
            hidden_size: v.hidden_size.unwrap_or(768),
            intermediate_size: v.intermediate_size.unwrap_or(3072),
            num_hidden_layers: v.num_hidden_layers.unwrap_or(12),
            num_attention_heads: v.num_attention_heads.unwrap_or(12),
            num_channels: v.num_channels.unwrap_or(3),
            image_size: v.image_size.unwrap_or(224),
            patch_size: v.patch_size.unwrap_or(32),
            hidden_act,
            layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
            projection_dim: projection.unwrap_or(512),
        };
        for (field, value) in [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("num_channels", c.num_channels),
            ("image_size", c.image_size),
            ("patch_size", c.patch_size),
            ("projection_dim", c.projection_dim),
        ] {
            if value == 0 {
                return Err(bad(format!("`{field}` must be positive")));
            }
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if !c.image_size.is_multiple_of(c.patch_size) {
            return Err(bad(format!(
                "image_size ({}) is not a multiple of patch_size ({})",
                c.image_size, c.patch_size
            )));
        }
        if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0) {
            return Err(bad(format!(
                "`layer_norm_eps` ({}) must be positive",
                c.layer_norm_eps
            )));
        }
        Ok(c)
    }

    /// The vision-only config.json `transformers` loads as
    /// `CLIPVisionModelWithProjection`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": match self.hidden_act {
                VisionActivation::QuickGelu => "quick_gelu",
                VisionActivation::Gelu => "gelu",
            },
            "layer_norm_eps": self.layer_norm_eps,
            "projection_dim": self.projection_dim,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "torch_dtype": "float32",
        })
    }
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per image side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Positions of the encoder: the class token and every patch.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side().pow(2) + 1
    }

    /// Every weight the tower reads, by its Hugging Face name (with the
    /// `vision_model.` prefix), with its shape; the projection
    /// (`visual_projection.weight`) last.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let e = "vision_model.embeddings";
        let mut out = vec![
            (format!("{e}.class_embedding"), vec![h]),
            (
                format!("{e}.patch_embedding.weight"),
                vec![h, self.num_channels, p, p],
            ),
            (
                format!("{e}.position_embedding.weight"),
                vec![self.num_positions(), h],
            ),
            ("vision_model.pre_layrnorm.weight".into(), vec![h]),
            ("vision_model.pre_layrnorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let pre = format!("vision_model.encoder.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.q_proj.bias", vec![h]),
                ("self_attn.k_proj.weight", vec![h, h]),
                ("self_attn.k_proj.bias", vec![h]),
                ("self_attn.v_proj.weight", vec![h, h]),
                ("self_attn.v_proj.bias", vec![h]),
                ("self_attn.out_proj.weight", vec![h, h]),
                ("self_attn.out_proj.bias", vec![h]),
                ("layer_norm1.weight", vec![h]),
                ("layer_norm1.bias", vec![h]),
                ("mlp.fc1.weight", vec![i, h]),
                ("mlp.fc1.bias", vec![i]),
                ("mlp.fc2.weight", vec![h, i]),
                ("mlp.fc2.bias", vec![h]),
                ("layer_norm2.weight", vec![h]),
                ("layer_norm2.bias", vec![h]),
            ] {
                out.push((format!("{pre}.{name}"), shape));
            }
        }
        out.push(("vision_model.post_layernorm.weight".into(), vec![h]));
        out.push(("vision_model.post_layernorm.bias".into(), vec![h]));
        out.push((
            "visual_projection.weight".into(),
            vec![self.projection_dim, h],
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vision_only_and_full_clip_configs() {
        let p = Path::new("config.json");
        let own = VisionConfig::from_json(
            r#"{"model_type":"clip_vision_model","hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"image_size":28,"patch_size":7,
            "projection_dim":16,"hidden_act":"gelu"}"#,
            p,
        )
        .unwrap();
        assert_eq!((own.num_positions(), own.head_dim()), (17, 8));
        assert_eq!(own.hidden_act, VisionActivation::Gelu);
        let full = VisionConfig::from_json(
            r#"{"model_type":"clip","projection_dim":24,"text_config":{},
            "vision_config":{"hidden_size":32,"num_attention_heads":4,"image_size":28,"patch_size":14}}"#,
            p,
        )
        .unwrap();
        assert_eq!((full.projection_dim, full.num_positions()), (24, 5));
        assert_eq!(full.hidden_act, VisionActivation::QuickGelu);
        assert_eq!(full.tensor_shapes().len(), 5 + 16 * 12 + 3);
    }

    #[test]
    fn errors_name_the_field() {
        let p = Path::new("config.json");
        for (json, want) in [
            (
                r#"{"image_size":30,"patch_size":7}"#,
                "multiple of patch_size",
            ),
            (
                r#"{"hidden_size":30,"num_attention_heads":4}"#,
                "num_attention_heads",
            ),
            (r#"{"hidden_act":"swish"}"#, "hidden_act `swish`"),
            (r#"{"model_type":"llama"}"#, "not a CLIP vision model"),
            (r#"{"model_type":"clip"}"#, "without `vision_config`"),
            (r#"{"patch_size":0}"#, "`patch_size` must be positive"),
        ] {
            let err = VisionConfig::from_json(json, p).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
